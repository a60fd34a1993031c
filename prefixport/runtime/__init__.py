"""The runtime: generation from an export folder. Needs numpy, onnxruntime, tokenizers, jinja2,
llguidance; never torch or transformers."""

from .aio import AsyncEngine, AsyncTextStream
from .engine import Engine
from .kv_cache import CacheSettings
from .logprobs import TokenLogprob
from .results import FinishReason, GenerationResult, Score
from .sampling import SamplingParams
from .scheduler import Event, Scheduler, Ticket
from .settings import BackendSettings, EngineSettings
from .stats import EngineStats
from .text import TextStream

__all__ = ["AsyncEngine", "AsyncTextStream", "BackendSettings", "CacheSettings", "Engine", "EngineSettings",
           "EngineStats", "Event", "FinishReason", "GenerationResult", "SamplingParams", "Scheduler", "Score",
           "TextStream", "Ticket", "TokenLogprob"]
