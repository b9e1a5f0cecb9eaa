"""Expert consolidation: similarity, alignment, clustering, merging, export; the format is moeshare.store."""

from moeshare.consolidate.export import export_variant
from moeshare.consolidate.pipeline import Options, Plan, consolidate, plan
from moeshare.consolidate.report import format_report, summarize
from moeshare.store import Store, is_store  # the format's own package; kept here for old importers

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
