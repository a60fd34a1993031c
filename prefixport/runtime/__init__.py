"""The runtime: generation from an export folder. Needs numpy, onnxruntime, tokenizers, jinja2;
never torch or transformers."""

from .engine import Engine, GenerationResult, TextStream
from .sampling import SamplingParams

__all__ = ["Engine", "GenerationResult", "SamplingParams", "TextStream"]
