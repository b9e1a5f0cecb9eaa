"""Expert consolidation: similarity, alignment, clustering, merging, the store format, export."""

from moeshare.consolidate.export import export_variant
from moeshare.consolidate.pipeline import Options, Plan, consolidate, plan
from moeshare.consolidate.report import format_report, summarize
from moeshare.consolidate.store import Store, is_store

__all__ = [
    "Options",
    "Plan",
    "Store",
    "consolidate",
    "plan",
    "export_variant",
    "format_report",
    "is_store",
    "summarize",
]
