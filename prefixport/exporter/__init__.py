"""The exporter: Hugging Face causal LM -> ONNX export folder. Needs the `export` extra."""

from .export import ExportReport, export_model
from .weights import LoraOptions
from .loading import DEFAULT_MODEL
from .specs import supported

__all__ = ["DEFAULT_MODEL", "ExportReport", "LoraOptions", "export_model", "supported"]
