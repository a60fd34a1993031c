"""The runtime: generation from an export folder. Needs numpy, onnxruntime, tokenizers, jinja2,
llguidance; never torch or transformers."""

from .aio import AsyncEngine, AsyncTextStream
from .engine import Engine, FinishReason, GenerationResult, Score, TextStream
from .kv_cache import CacheSettings
from .logprobs import TokenLogprob
from .sampling import SamplingParams
from .scheduler import Event, Scheduler, Ticket
from .settings import BackendSettings
from .stats import EngineStats

__all__ = ["AsyncEngine", "AsyncTextStream", "BackendSettings", "CacheSettings", "Engine", "EngineStats", "Event", "FinishReason",
           "GenerationResult", "SamplingParams", "Scheduler", "Score", "TextStream", "Ticket", "TokenLogprob"]
