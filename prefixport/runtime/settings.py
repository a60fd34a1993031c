"""`BackendSettings`: which backend runs an export, and how; `EngineSettings`: that and what an
Engine holds beside the export (KV cache bounds, byte budgets, a draft export). Each is one value
from the command line to `Engine.load` (the CLI builds it once; the bench and Ray Serve pass it
along). `GenerationSettings`: the keyword settings of one request."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, TypedDict, get_args

from ..errors import DeviceError, PrefixportError
from .backends import BACKENDS
from .kv_cache import CacheSettings
from .prompt_cache import DEFAULT_BYTES as DEFAULT_PROMPT_CACHE_BYTES


@dataclass(frozen=True)
class BackendSettings:
    """The backend (`kind`: onnxruntime or tensorrt) and its settings, checked when made.

    ONNX Runtime takes a `provider` (cpu, cuda, tensorrt; `device="cuda"` without one means cuda)
    and `threads` (intra-op; None: all cores); the tensorrt backend runs its own engine on an
    NVIDIA GPU, in a `precision` it was built for (fp32, fp16; None: fp32 where both exist).
    `device` is cpu, cuda or None (what the backend and provider run on). Combinations that cannot
    work raise at construction: a PrefixportError, or a DeviceError for tensorrt on the CPU.
    """

    kind: str = "onnxruntime"
    provider: str | None = None
    device: str | None = None
    precision: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse combinations that cannot work (the messages name the command line's flags)."""
        if self.kind == "onnxruntime":
            if self.precision:
                raise PrefixportError("--precision is for the tensorrt backend; ONNX Runtime runs the graph's "
                                      "own dtype")
            provider = self._provider()
            if self.device == "cpu" and provider != "cpu":
                raise PrefixportError(f"provider {provider!r} runs on the GPU: use --device cuda, or leave "
                                      "--device out")
        elif self.kind == "tensorrt":
            if self.provider:
                raise PrefixportError("--provider is for the onnxruntime backend; the tensorrt backend runs its own "
                                      "engine")
            if self.device == "cpu":
                raise DeviceError("the tensorrt backend runs on an NVIDIA GPU: use --device cuda, or leave "
                                  "--device out")
        else:
            raise PrefixportError(f"unknown backend {self.kind!r}; available: {', '.join(BACKENDS)}")

    def _provider(self) -> str:
        return self.provider or ("cuda" if self.device == "cuda" else "cpu")

    def options(self) -> dict[str, Any]:
        """The backend's `Engine.load` keywords: `Engine.load(folder, backend=s.kind, **s.options())`.
        ONNX Runtime: provider (always) and threads (when set); tensorrt: precision (when set)."""
        if self.kind == "onnxruntime":
            return {"provider": self._provider()} | ({"threads": self.threads} if self.threads else {})
        return {"precision": self.precision} if self.precision else {}

    def load_kwargs(self) -> tuple[str, dict[str, Any]]:
        """(backend name, options): what `Engine.load` and `load_backend` take."""
        return self.kind, self.options()

    @property
    def uses_gpu(self) -> bool:
        """Whether the backend runs on an NVIDIA GPU (the tensorrt backend, a cuda or tensorrt provider)."""
        return self.kind == "tensorrt" or self._provider() != "cpu"


@dataclass(frozen=True)
class EngineSettings:
    """What `Engine.load(folder, settings=...)` opens an export with: the `backend`, the KV cache's
    bounds (`cache_settings`), the bytes of adapters kept resident (`adapter_budget_bytes`, LRU; None: all),
    the prompt cache's bytes (0: off) and a `draft` export of the same base model (for
    `speculative="draft"`)."""

    backend: BackendSettings = field(default_factory=BackendSettings)
    cache_settings: CacheSettings = field(default_factory=CacheSettings)
    adapter_budget_bytes: int | None = None
    prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES
    draft: Path | None = None

    def __post_init__(self) -> None:
        if self.adapter_budget_bytes is not None and self.adapter_budget_bytes < 0:
            raise PrefixportError(f"the adapter budget must be >= 0 bytes, got {self.adapter_budget_bytes}")
        if self.prompt_cache_bytes < 0:
            raise PrefixportError(f"the prompt cache budget must be >= 0 bytes, got {self.prompt_cache_bytes}")


Speculative = Literal["prompt-lookup", "draft"]  # speculative decoding methods (docs/runtime.md)
SPECULATIVE: tuple[str, ...] = get_args(Speculative)  # the same, as values


class GenerationSettings(TypedDict, total=False):
    """The keyword settings of one request: `Engine.generate`, `stream` and `generate_batch`,
    `Scheduler.submit`, `AsyncEngine`. Each is optional; its default is in `Engine.prepare`'s
    signature (the one place they are read). Another keyword is an InputError naming the closest."""

    adapter: str | None  # a registered adapter's name; None: the base model
    max_new_tokens: int  # 128
    chat: bool | None  # True the chat template, False raw; None: the adapter's recorded format, else
    #                    raw for a text and the chat template for messages
    temperature: float  # 0.0: greedy
    top_k: int  # 0: off
    top_p: float  # 1.0: off
    seed: int | None
    repetition_penalty: float  # 1.0: off
    stop_token_ids: Sequence[int] | None  # None: the generation config's EOS ids
    logprobs: int | None  # alternatives recorded per token (fills `.logprobs`); None: none
    response_format: dict[str, Any] | None  # OpenAI's: JSON output constrained by a grammar
    speculative: Speculative | None  # docs/runtime.md, "Speculative decoding"
    timeout: float | None  # seconds: the row ends at its first token after it ("timeout")
    stop: str | Sequence[str]  # stop strings, cut from the text
    cache_salt: str | None  # only requests of one salt share prompt-cache blocks (a tenant's: docs/security.md)
    tenant: str | None  # whose request (an API key's id): bounded caches give each tenant a fair share
