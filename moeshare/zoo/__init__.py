"""The zoo: small Mixtral and Switch Transformers MoE models and Llama / Qwen2 dense models trained here, a
base and one fine-tuned variant per text domain, with held-out perplexities. See build.py for the layout."""

from moeshare.zoo.build import build_zoo, load_zoo, zoo_dir
from moeshare.zoo.command import main
from moeshare.zoo.report import format_report

__all__ = ["build_zoo", "format_report", "load_zoo", "main", "zoo_dir"]
