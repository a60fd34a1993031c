"""How an adapter's prompts were formatted in training (a bundle's `prompt_format`), and how a
prompt is rendered for it: the one place that decides (the CLI, the Engine and the server call it).

    raw         the text as is
    chat        the model's chat template, the text as one user message
    a template  a `str.format` string with exactly one field, `{prompt}`, e.g. "Question: {prompt}\\nAnswer:"
                (literal braces are doubled: `{{` `}}`)

Which format a prompt gets (`choose`): the caller's (`chat=True`: chat, `chat=False`: raw), else the
adapter's recorded format, else the default (raw for a text, the chat template for chat messages).

Chat messages rendered for a raw or template format become one text first (`user_text`): the last
user message's content, alone (system messages, assistant turns and earlier user messages are not
sent: such an adapter was trained on single prompts, and a system prompt put before the text breaks
the demo date adapter); the format then applies to that text. Token ids are never reformatted.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..errors import AdapterError, InputError

RAW, CHAT, FIELD = "raw", "chat", "prompt"


@dataclass(frozen=True)
class PromptFormat:
    """`spec` is "raw", "chat" or a template with one `{prompt}`; make one with `PromptFormat.parse`."""

    spec: str

    @classmethod
    def parse(cls, spec: str, where: str = "prompt format") -> "PromptFormat":
        """A checked format; AdapterError says what is wrong with a template."""
        if not isinstance(spec, str):
            raise AdapterError(f"{where}: a prompt format is a string (raw, chat or a template), "
                               f"not {type(spec).__name__}")
        if spec in (RAW, CHAT):
            return cls(spec)
        how = (f"{where}: {spec[:80]!r} is neither raw, chat nor a template with exactly one {{{FIELD}}} "
               "(other braces doubled: {{ }})")
        try:
            fields = [(name, fs, conv) for _, name, fs, conv in string.Formatter().parse(spec) if name is not None]
        except ValueError as e:  # a lone { or }
            raise AdapterError(f"{how}: {e}") from None
        if [name for name, _, _ in fields] != [FIELD]:
            found = ", ".join("{" + name + "}" for name, _, _ in fields) or "no field"
            raise AdapterError(f"{how}; it has {found}")
        _, format_spec, conversion = fields[0]
        if format_spec or conversion:
            raise AdapterError(f"{how}; write {{{FIELD}}} plainly, without a conversion or format spec")
        return cls(spec)

    @property
    def chat(self) -> bool:
        return self.spec == CHAT

    def fill(self, text: str) -> str:
        """`text` as a raw or template adapter was trained on it (the chat template is the tokenizer's)."""
        if self.chat:
            raise ValueError("the chat format is rendered by the chat template, not filled")
        return text if self.spec == RAW else self.spec.format(**{FIELD: text})

    def __str__(self) -> str:
        return self.spec


RAW_FORMAT, CHAT_FORMAT = PromptFormat(RAW), PromptFormat(CHAT)


def choose(chat: bool | None, recorded: PromptFormat | None, messages: bool) -> PromptFormat:
    """The format a prompt gets: the caller's (`chat` True or False), else the adapter's `recorded`
    one, else the chat template for chat messages and raw for a text."""
    if chat is not None:
        return CHAT_FORMAT if chat else RAW_FORMAT
    return recorded or (CHAT_FORMAT if messages else RAW_FORMAT)


def user_text(messages: Sequence[dict[str, Any]]) -> str:
    """Chat messages as one text for a raw or template adapter: the last user message's content."""
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        raise InputError("the chat messages hold no user message: rendered raw or into a template (the adapter's "
                         "prompt format), their prompt is the last user message's text")
    content = users[-1].get("content") or ""
    if not isinstance(content, str):
        raise InputError("the last user message's content must be text to render it raw or into a template (the "
                         "adapter's prompt format)")
    return content


def render(prompt: str | Sequence[dict[str, Any]], fmt: PromptFormat,
           chat_template: Callable[[list[dict[str, Any]]], str]) -> str:
    """The text to tokenize for a text or chat-messages prompt in format `fmt`; `chat_template`
    renders messages with the model's template (with the generation prompt)."""
    if fmt.chat:
        return chat_template([{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt))
    return fmt.fill(prompt if isinstance(prompt, str) else user_text(prompt))
