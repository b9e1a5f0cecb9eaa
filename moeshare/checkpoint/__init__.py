"""HuggingFace checkpoint I/O and the per-architecture adapters that know its key names."""

from moeshare.checkpoint import llama, mixtral, switch  # noqa: F401  (register the adapters)
from moeshare.checkpoint.adapters import Adapter, TensorInfo, adapter_for, supported_model_types
from moeshare.checkpoint.io import Checkpoint, open_checkpoint, write_checkpoint, written_by_moeshare
from moeshare.checkpoint.safetensors_file import read_safetensors_header

__all__ = [
    "Adapter",
    "Checkpoint",
    "TensorInfo",
    "adapter_for",
    "open_checkpoint",
    "read_safetensors_header",
    "supported_model_types",
    "write_checkpoint",
    "written_by_moeshare",
]
