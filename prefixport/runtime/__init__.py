"""The runtime: generation from an export folder. Needs numpy, onnxruntime, tokenizers, jinja2,
llguidance; never torch or transformers."""

from .engine import Engine, GenerationResult, Score, TextStream
from .kv_cache import CacheSettings
from .logprobs import TokenLogprob
from .sampling import SamplingParams
from .scheduler import Event, Scheduler, Ticket
from .settings import BackendSettings

__all__ = ["BackendSettings", "CacheSettings", "Engine", "Event", "GenerationResult", "SamplingParams", "Scheduler",
           "Score", "TextStream", "Ticket", "TokenLogprob"]
