"""Who may call a server: API keys with a role, the models each may use, and quotas.

Keys come from `--api-key` (one admin key) or a TOML keys file (`--keys`), reloaded when the file
changes or on SIGHUP; a bad file keeps the keys in force. A user key sees and uses only its models
(an other model answers as one that does not exist); adapter admin needs an admin key; each key
may have at most `max_concurrent` requests running and `tokens_per_minute` tokens (prompt and
generated) in any 60 s. Audit events are JSON lines on the `prefixport.audit` logger, with key
ids, never keys. docs/security.md, "Tenants".
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import threading
import time
import tomllib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import PrefixportError
from .protocol import ApiError

AUDIT = logging.getLogger("prefixport.audit")
RELOAD_CHECK_S = 1.0  # how often a request may look at the keys file's modification time
WINDOW_S = 60.0  # tokens_per_minute's window, and the penalty box's
DEFAULT_MAX_REFUSED = 60  # refused requests a key may make per window before the penalty box
REFUSED_BYTES = 64 << 10  # a refused request counts one more per this many bytes of its body


def audit(event: str, **fields: Any) -> None:
    """One structured audit line: {"time", "event", ...fields} (key ids, never keys)."""
    AUDIT.info(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, **fields}))


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Key:
    """One API key: its id (in logs, metrics and the prompt cache's salt), the sha256 of the key,
    its role, the models it may use (fnmatch patterns over the base model's and adapters' names)
    and its quotas (None: none)."""

    id: str
    sha256: str
    role: Literal["admin", "user"] = "user"
    models: tuple[str, ...] = ("*",)
    max_concurrent: int | None = None
    tokens_per_minute: int | None = None

    def may_use(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    @property
    def admin(self) -> bool:
        return self.role == "admin"


OPEN = Key("anonymous", "", "admin")  # no keys configured: every caller


def parse_keys(text: str, source: str = "keys file") -> dict[str, Key]:
    """The keys of a TOML keys file, by sha256; a PrefixportError naming the first bad entry.

        [[key]]
        id = "acme"                 # required, unique
        sha256 = "9f86d081..."      # the key's sha256 in hex (or: key = "sk-...", the key itself)
        role = "user"               # or "admin" (default: user)
        models = ["smollm2-135m-instruct", "acme-*"]   # default: all
        max_concurrent = 4          # optional
        tokens_per_minute = 20000   # optional
    """
    try:
        entries = tomllib.loads(text).get("key", [])
    except tomllib.TOMLDecodeError as e:
        raise PrefixportError(f"{source}: not valid TOML: {e}") from None
    keys: dict[str, Key] = {}
    ids: set[str] = set()
    allowed = {"id", "sha256", "key", "role", "models", "max_concurrent", "tokens_per_minute"}
    for i, entry in enumerate(entries if isinstance(entries, list) else [entries]):
        where = f"{source}: key {i + 1}"
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
            raise PrefixportError(f"{where}: needs an `id` (a non-empty string)")
        where += f" ({entry['id']!r})"
        if set(entry) - allowed:
            raise PrefixportError(f"{where}: unknown fields {sorted(set(entry) - allowed)}; the fields are "
                                  f"{sorted(allowed)}")
        if ("sha256" in entry) == ("key" in entry):
            raise PrefixportError(f"{where}: give `sha256` (the key's, hex) or `key`, one of them")
        sha = str(entry["sha256"]).lower() if "sha256" in entry else digest(str(entry["key"]))
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise PrefixportError(f"{where}: sha256 must be 64 hex digits")
        if entry.get("role", "user") not in ("admin", "user"):
            raise PrefixportError(f"{where}: role must be admin or user, got {entry['role']!r}")
        models = entry.get("models", ["*"])
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise PrefixportError(f"{where}: models must be a list of names or patterns")
        limits = {}
        for name in ("max_concurrent", "tokens_per_minute"):
            value = entry.get(name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise PrefixportError(f"{where}: {name} must be a positive integer")
            limits[name] = value
        if entry["id"] in ids or sha in keys:
            raise PrefixportError(f"{where}: the id or the key is used twice")
        ids.add(entry["id"])
        keys[sha] = Key(entry["id"], sha, entry.get("role", "user"), tuple(models), **limits)
    return keys


class KeyRing:
    """The keys in force: from a keys file (reloaded on change, or by `reload()`), or one key, or
    none (every caller is `OPEN`, an admin). Thread-safe; a reload swaps the whole set at once."""

    def __init__(self, path: str | Path | None = None, api_key: str | None = None) -> None:
        if path is not None and api_key is not None:
            raise PrefixportError("give --keys or --api-key, not both")
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._checked = 0.0
        self._mtime: int | None = None
        if self.path is not None:
            self.keys = self._read()
            audit("keys_loaded", path=str(self.path), keys=len(self.keys))
        else:
            self.keys = {digest(api_key): Key("api-key", digest(api_key), "admin")} if api_key is not None else {}

    @property
    def open(self) -> bool:
        """No keys: every caller passes."""
        return self.path is None and not self.keys

    def authenticate(self, authorization: str) -> Key:
        """The key an `Authorization: Bearer KEY` header carries; 401 for none or an unknown one."""
        if self.open:
            return OPEN
        self.maybe_reload()
        key = self.keys.get(digest(authorization.removeprefix("Bearer ").strip()))  # by hash: no timing leak
        if key is None:
            raise ApiError(401, "Incorrect API key provided: pass it as `Authorization: Bearer KEY`",
                           code="invalid_api_key")
        return key

    def maybe_reload(self) -> None:
        """Reload if the file changed (looked at once per RELOAD_CHECK_S at most)."""
        now = time.monotonic()
        if self.path is None or now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        try:
            changed = os.stat(self.path).st_mtime_ns != self._mtime
        except OSError:
            changed = True
        if changed:
            self.reload()

    def reload(self) -> bool:
        """Read the keys file again; on an error keep the keys in force (audited either way)."""
        if self.path is None:
            return False
        with self._lock:
            try:
                keys = self._read()
            except PrefixportError as e:
                audit("keys_reload_failed", path=str(self.path), error=str(e), keys=len(self.keys))
                return False
            self.keys = keys
        audit("keys_reloaded", path=str(self.path), keys=len(keys))
        return True

    def _read(self) -> dict[str, Key]:
        assert self.path is not None
        try:
            self._mtime = os.stat(self.path).st_mtime_ns
            text = self.path.read_text()
        except OSError as e:
            raise PrefixportError(f"cannot read the keys file {self.path}: {e.strerror}") from None
        keys = parse_keys(text, str(self.path))
        if not keys:  # a file caught half-written, or emptied: keep serving with the keys in force
            raise PrefixportError(f"{self.path}: no keys (one [[key]] table per key)")
        return keys


@dataclass
class _Usage:
    running: int = 0
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (time, tokens) in the window


class Quotas:
    """Per key id: requests running, and tokens used in the last WINDOW_S seconds. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._usage: dict[str, _Usage] = {}

    def admit(self, key: Key) -> None:
        """Count a request in, or 429 (with Retry-After) if the key is at a limit: other keys are
        never held back by it."""
        with self._lock:
            usage = self._usage.setdefault(key.id, _Usage())
            now = time.monotonic()
            while usage.tokens and now - usage.tokens[0][0] >= WINDOW_S:
                usage.tokens.popleft()
            if key.max_concurrent is not None and usage.running >= key.max_concurrent:
                raise ApiError(429, f"Rate limit reached for key {key.id!r}: at most {key.max_concurrent} requests at "
                                    "once; retry when one finishes", "requests", code="rate_limit_exceeded",
                               headers={"Retry-After": "1"})
            used = sum(n for _, n in usage.tokens)
            if key.tokens_per_minute is not None and used >= key.tokens_per_minute:
                wait, left = 0.0, used
                for t, n in usage.tokens:  # until enough of the window has passed
                    left -= n
                    wait = WINDOW_S - (now - t)
                    if left < key.tokens_per_minute:
                        break
                raise ApiError(429, f"Rate limit reached for key {key.id!r}: {used} of {key.tokens_per_minute} tokens "
                                    f"per minute used; retry in {wait:.0f} s", "tokens", code="rate_limit_exceeded",
                               headers={"Retry-After": str(max(1, round(wait + 0.5)))})
            usage.running += 1

    def done(self, key: Key, tokens: int) -> None:
        """A request admitted for `key` ended, having used `tokens` (prompt and generated)."""
        with self._lock:
            usage = self._usage.setdefault(key.id, _Usage())
            usage.running -= 1
            if tokens:
                usage.tokens.append((time.monotonic(), tokens))


class Penalties:
    """Refused requests per caller (a key id, or "unauthenticated" for unknown keys) in the last
    WINDOW_S seconds, a request weighing one more per REFUSED_BYTES of its body (a refused 2.4 MB
    body cost the event loop as much as a hundred small ones: it counts 38). A caller over
    `max_refused` is in the penalty box: its requests wait
    `delay_s` and get a 429 before their body is read (`middleware.PenaltyBox`), and each counts
    as refused again, so a client that keeps sending bad requests stays there while it does. A
    flood of bad requests (each cheap to refuse, but parsed first: up to 4 MB) then costs the
    other tenants nothing. Thread-safe."""

    def __init__(self, max_refused: int = DEFAULT_MAX_REFUSED, delay_s: float = 1.0) -> None:
        if max_refused < 1 or delay_s < 0:
            raise PrefixportError(f"max_refused must be >= 1 and delay_s >= 0, got {max_refused}, {delay_s}")
        self.max_refused, self.delay_s = max_refused, delay_s
        self._lock = threading.Lock()
        self._refused: dict[str, deque[tuple[float, int]]] = {}  # caller -> (time, weight)
        self.boxed = 0  # requests answered from the penalty box

    def refused(self, caller: str, body_bytes: int = 0) -> None:
        """One more refused request (a 4xx) of `caller`, with a body of `body_bytes`."""
        now = time.monotonic()
        with self._lock:
            times = self._refused.setdefault(caller, deque())
            times.append((now, 1 + body_bytes // REFUSED_BYTES))
            self._expire(caller, times, now)

    def over(self, caller: str) -> int:
        """`caller`'s refused requests in the window when that is over the bound, else 0."""
        now = time.monotonic()
        with self._lock:
            times = self._refused.get(caller)
            if times is None:
                return 0
            self._expire(caller, times, now)
            weight = sum(w for _, w in times)
            return weight if weight > self.max_refused else 0

    def _expire(self, caller: str, times: deque[tuple[float, int]], now: float) -> None:
        while times and now - times[0][0] >= WINDOW_S:
            times.popleft()
        while len(times) > 2 * self.max_refused:  # bounded per caller
            times.popleft()
        if not times:
            del self._refused[caller]


@dataclass
class Access:
    """How a server admits callers: its keys; whether adapters may be registered and deleted over
    HTTP (by admin keys); whether /metrics and /health need an admin key (`private_ops`; None: when
    the keys come from a keys file, since tenants must not see each other's adapters and traffic
    there); whether the prompt cache is shared across keys (default: each key's own, so no tenant
    can time another's prompts)."""

    keys: KeyRing = field(default_factory=KeyRing)
    adapter_admin: bool = False
    private_ops: bool | None = None
    shared_prompt_cache: bool = False
    penalties: Penalties = field(default_factory=Penalties)  # with keys: refused requests per key and minute

    def caller(self, authorization: str) -> str | None:
        """Whom a request's `Authorization` header names, for the penalty box: a key id,
        "unauthenticated" for an unknown key; None without a keys file (one tenant, maybe with one
        `--api-key`: nobody to protect, and its own client's errors are its business)."""
        if self.keys.path is None:
            return None
        try:
            return self.keys.authenticate(authorization).id
        except ApiError:
            return "unauthenticated"

    @property
    def ops_private(self) -> bool:
        """Whether /metrics and /health need an admin key."""
        return self.private_ops if self.private_ops is not None else self.keys.path is not None

    def authorize(self, authorization: str) -> Key:
        """The key a request's `Authorization` header presents (401 where keys are required and it
        presents none that is valid): the one key check of the server and the Ray ingress."""
        return self.keys.authenticate(authorization)

    def check_operator(self, authorization: str) -> None:
        """For /metrics and /health: 403 unless they are public or the header presents an admin key."""
        if self.ops_private and not self.authorize(authorization).admin:
            raise ApiError(403, "/metrics and /health need an admin key on this server", "permission_error",
                           code="permission_denied")

    def salt(self, key: Key, cache_salt: str | None) -> str:
        """The prompt-cache salt of a request by `key` with the body's `cache_salt`."""
        return (cache_salt or "") if self.shared_prompt_cache else f"{key.id}\x1f{cache_salt or ''}"
