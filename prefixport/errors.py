"""The exception types users catch. Every message says what is wrong and how to fix it."""

from typing import Any


def shown(value: Any) -> str:
    """A value as an error message quotes it: its repr, cut to 60 characters (a file's field may be huge)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class PrefixportError(Exception):
    """Base class of every error prefixport raises on purpose."""


class ModelSpecError(PrefixportError):
    """A model spec names nothing that can be loaded (unknown name, missing folder, not cached)."""


class UnsupportedArchitectureError(PrefixportError):
    """The model's architecture has no spec in the registry."""


class ExportError(PrefixportError):
    """The export failed or its output folder cannot be used."""


class VerificationError(ExportError):
    """The exported graph disagrees with PyTorch beyond the stated tolerance."""


class ExportFolderError(PrefixportError):
    """A folder is not a valid prefixport export (missing or unreadable manifest, model, tokenizer)."""


class InputError(PrefixportError):
    """A generation request is invalid: empty prompt, too long for the context, bad settings."""


class ContextLengthError(InputError):
    """The prompt (with the adapter's virtual tokens) plus max_new_tokens exceed the model's context."""


class SchemaError(InputError):
    """A structured-output request cannot be used: a malformed response_format, an invalid JSON
    schema, or a schema feature the grammar engine cannot enforce."""


class NumericsError(PrefixportError):
    """A row's logits left float range (NaN or Inf): that row fails; the others in its batch go on."""


class AdapterError(PrefixportError):
    """An adapter (PEFT checkpoint or bundle) cannot be used: bad file, wrong shapes, wrong base."""


class BusyError(PrefixportError):
    """The server's queue is full: retry later."""


class DeviceError(PrefixportError):
    """A GPU path cannot run here: no NVIDIA GPU or driver, or a package it needs is missing."""


class EngineError(PrefixportError):
    """A TensorRT engine cannot be built or used: none for this GPU and TensorRT, stale, or out of range."""
