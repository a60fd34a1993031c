"""The exporter: Hugging Face causal LM -> ONNX export folder. Needs the `export` extra."""

from .export import ExportReport, export_model
from .loading import DEFAULT_MODEL
from .specs import supported

__all__ = ["DEFAULT_MODEL", "ExportReport", "export_model", "supported"]
