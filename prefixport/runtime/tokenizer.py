"""Tokenization with `tokenizers` and the export's chat template with Jinja (no transformers)."""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from .. import manifest as mf
from ..errors import ContextLengthError, ExportFolderError, InputError

_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _raise(message: str) -> None:
    raise InputError(f"chat template: {message}")


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's character for each byte (GPT-2's `bytes_to_unicode`), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_BYTE_DECODER = _byte_decoder()
PROBE_CHARS = 8  # a long text's first PROBE_CHARS x limit characters are tokenized to see if it can fit


def _too_long(chars: int, limit: int, why: str) -> ContextLengthError:
    return ContextLengthError(f"the text ({chars} characters) is longer than the context of {limit} tokens "
                              f"({why}); shorten it")
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokenizer:
    """The export's tokenizer.json plus its chat template and special tokens."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        try:
            self._tok = HFTokenizer.from_file(str(folder / mf.TOKENIZER_NAME))
        except Exception as e:  # tokenizers raises a bare Exception on a missing or bad file
            raise ExportFolderError(f"cannot read {folder / mf.TOKENIZER_NAME}: {e}") from e
        config: dict[str, Any] = {}
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text())
        self.special_tokens = {k: _token_text(config.get(k)) for k in _SPECIAL_KEYS}
        template_path = folder / "chat_template.jinja"
        template = template_path.read_text() if template_path.is_file() else config.get("chat_template")
        self.chat_template: str | None = template if isinstance(template, str) else None
        self._template: jinja2.Template | None = None
        decoder = self._tok.decoder  # its own JSON only: serialising the whole tokenizer costs ~70 ms a load
        self._byte_level = decoder is not None and b'"ByteLevel"' in decoder.__getstate__()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True, limit: int | None = None) -> list[int]:
        """The text's token ids. With `limit`, a text that certainly encodes to more than `limit`
        tokens raises ContextLengthError without being tokenized whole (megabytes of text would
        take seconds): one longer than `limit` x the longest token's characters at once; one longer
        than PROBE_CHARS x `limit` characters when its first PROBE_CHARS x `limit` characters
        already give more than `limit` tokens, not counting those of their last word (which the
        cut may have split into more tokens than the whole word makes)."""
        if limit is not None and len(text) > PROBE_CHARS * limit:
            if len(text) > limit * self.max_token_chars:
                raise _too_long(len(text), limit, f"a token is at most {self.max_token_chars} characters")
            probe = self._tok.encode(text[: PROBE_CHARS * limit], add_special_tokens=add_special_tokens).word_ids
            sure = sum(1 for w in probe if w is None or w != probe[-1])
            if sure > limit:
                raise _too_long(len(text), limit, f"its first {PROBE_CHARS * limit} characters give {sure}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    @functools.cached_property
    def max_token_chars(self) -> int:
        """Characters of the longest token's text (byte-level BPE: its bytes): a text of N
        characters encodes to at least N / max_token_chars tokens."""
        return max(len(piece) for piece in self._tok.get_vocab(with_added_tokens=True))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for, exactly: a token holding part of a multi-byte character
        decodes alone to U+FFFD, but its bytes are its own (byte-level BPE, byte fallback)."""
        piece = self._tok.id_to_token(token)
        if piece is not None and self._byte_level and all(c in _BYTE_DECODER for c in piece):
            return bytes(_BYTE_DECODER[c] for c in piece)
        if piece is not None and (match := _BYTE_FALLBACK.fullmatch(piece)):
            return bytes([int(match.group(1), 16)])
        return self._tok.decode([token], skip_special_tokens=False).encode("utf-8")

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def to_json(self) -> str:
        """tokenizer.json as `tokenizers` serialises it (for libraries that build their own view of the vocabulary)."""
        return self._tok.to_str()

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render messages as transformers' apply_chat_template does (same Jinja settings)."""
        if self.chat_template is None:
            raise InputError("this export has no chat template; use a raw prompt (--raw)")
        if self._template is None:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        specials = {k: v for k, v in self.special_tokens.items() if v is not None}
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **specials)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<|im_end|>", ...}
        return value.get("content")
    return value if isinstance(value, str) else None


class IncrementalDecoder:
    """Text deltas from a growing list of token ids, holding back incomplete UTF-8 characters.

    The prefix/read offsets keep each step O(1) in the length so far; `finish()` returns whatever
    the full decode has beyond what was emitted, so joined deltas always equal the full text.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self._prefix : self._read])
        new_text = decode(self.ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.emitted += delta
        return delta

    def finish(self) -> str:
        full = self.tokenizer.decode(self.ids)
        delta = full[len(self.emitted) :] if full.startswith(self.emitted) else ""
        self.emitted += delta
        return delta
