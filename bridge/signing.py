"""Request signing (SPEC §4) and signing-secret keeping (SPEC §2 ``signing``, §6 ``secret``).

Owns:

* the two signature schemes a webhook can use:

  - ``standard-webhooks``: ``webhook-signature: v1,<base64 HMAC-SHA256(key, id.ts.body)>``
    exactly per the Standard Webhooks spec (secret ``whsec_<base64 key>``); during a
    rotation one ``v1,`` entry per valid secret, newest first, separated by one space;
  - ``hmac-sha256`` (Biotz style): ``<header>: t=<ts>,v1=<hex HMAC-SHA256(key, ts.body)>``;
    during a rotation ``t=<ts>,v1=<new>,v1=<old>`` (Stripe style);

* secret generation (``whsec_`` + base64 of 32 random bytes);
* :class:`SecretKeeper`, the per-webhook store of generated and rotated secrets in
  ``<state_dir>/secrets.json`` (mode 0600, replaced atomically, re-read when another
  process such as ``webhook-bridge secret rotate`` changes it).

Nothing in this module logs, and no exception message it raises contains a secret.
Standard library only.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import math
import os
import secrets as _secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

try:  # POSIX only; without it concurrent writers fall back to last-writer-wins.
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_ROTATION_GRACE",
    "SCHEME_HMAC_SHA256",
    "SCHEME_STANDARD_WEBHOOKS",
    "SECRETS_FILE",
    "SECRET_PREFIX",
    "SecretKeeper",
    "SecretRotationError",
    "SecretStoreError",
    "decode_secret",
    "generate_secret",
    "hmac_sha256_signature",
    "signature_headers",
    "standard_webhooks_signature",
]

SECRET_PREFIX = "whsec_"
SCHEME_STANDARD_WEBHOOKS = "standard-webhooks"
SCHEME_HMAC_SHA256 = "hmac-sha256"
SECRETS_FILE = "secrets.json"
DEFAULT_ROTATION_GRACE = 86400.0  # seconds the old secret stays valid after a rotation
_SECRET_BYTES = 32


# --------------------------------------------------------------------------- signatures


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret.

    ``whsec_<base64>`` -> the base64-decoded bytes; a secret without the prefix is
    decoded as base64 too. Missing ``=`` padding is tolerated (as the reference
    ``standardwebhooks`` package does). Raises :class:`ValueError` (without the secret in
    the message) if the text is not base64 or decodes to an empty key.
    """
    text = secret[len(SECRET_PREFIX) :] if secret.startswith(SECRET_PREFIX) else secret
    text = text.strip()
    text += "=" * (-len(text) % 4)
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("signing secret is not valid base64 (expected whsec_<base64>)") from None
    if not key:
        raise ValueError("signing secret is empty")
    return key


def _hmac_sha256_key(secret: str) -> bytes:
    """Key for the ``hmac-sha256`` scheme: see :func:`hmac_sha256_signature`."""
    if not secret:
        raise ValueError("signing secret is empty")
    return secret.encode("utf-8")


def _require(secrets: Sequence[str]) -> None:
    if isinstance(secrets, str):  # a lone str is a Sequence[str] of characters: refuse it
        raise TypeError("secrets must be a sequence of secrets, not a single string")
    if not secrets:
        raise ValueError("no signing secret")


def standard_webhooks_signature(
    secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes
) -> str:
    """The ``webhook-signature`` header value per the Standard Webhooks spec.

    For each secret (newest first) ``v1,<base64 HMAC-SHA256(key, f"{msg_id}.{timestamp}."
    + body)>`` where ``key`` is :func:`decode_secret` of the secret; several entries are
    joined with a single space. A ``standardwebhooks.Webhook(secret).verify`` holding any
    one of the secrets accepts the result.
    """
    _require(secrets)
    signed = f"{msg_id}.{int(timestamp)}.".encode() + body
    parts = []
    for secret in secrets:
        digest = hmac.new(decode_secret(secret), signed, hashlib.sha256).digest()
        parts.append("v1," + base64.b64encode(digest).decode("ascii"))
    return " ".join(parts)


def hmac_sha256_signature(secrets: Sequence[str], timestamp: int, body: bytes) -> str:
    """The ``hmac-sha256`` (Biotz style) header value: ``t=<ts>,v1=<hex>[,v1=<hex>...]``.

    ``v1`` is the lowercase hex HMAC-SHA256 of ``f"{timestamp}." + body``; with several
    secrets (rotation) one ``v1=`` per secret, newest first (Stripe style).

    Key choice: the secret's UTF-8 bytes exactly as configured or shown by ``secret show``
    are the key, ``whsec_`` prefix included (as Stripe does) - this is what a receiver
    written from the Biotz text does with the string it was given, so the operator never
    has to know about base64.
    """
    _require(secrets)
    signed = f"{int(timestamp)}.".encode() + body
    parts = [f"t={int(timestamp)}"]
    for secret in secrets:
        parts.append("v1=" + hmac.new(_hmac_sha256_key(secret), signed, hashlib.sha256).hexdigest())
    return ",".join(parts)


def generate_secret() -> str:
    """A new random secret: ``whsec_`` + base64 of 32 bytes from :mod:`secrets`."""
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(_SECRET_BYTES)).decode("ascii")


def signature_headers(
    scheme: str,
    header: str,
    secrets: Sequence[str],
    msg_id: str,
    timestamp: int,
    body: bytes,
) -> dict[str, str]:
    """The signing header(s) for one request.

    ``standard-webhooks`` -> ``{"webhook-signature": ...}`` (``header`` is ignored; the
    caller sends ``webhook-id`` and ``webhook-timestamp`` itself, SPEC §4);
    ``hmac-sha256`` -> ``{header: "t=...,v1=..."}``. Raises :class:`ValueError` for an
    unknown scheme or an empty header name.
    """
    if scheme == SCHEME_STANDARD_WEBHOOKS:
        return {"webhook-signature": standard_webhooks_signature(secrets, msg_id, timestamp, body)}
    if scheme == SCHEME_HMAC_SHA256:
        if not header:
            raise ValueError("hmac-sha256 signing needs a header name")
        return {header: hmac_sha256_signature(secrets, timestamp, body)}
    raise ValueError(
        f"unknown signing scheme {scheme!r} "
        f"(expected {SCHEME_STANDARD_WEBHOOKS} or {SCHEME_HMAC_SHA256})"
    )


# --------------------------------------------------------------------------- secret keeping


class SecretStoreError(Exception):
    """``secrets.json`` cannot be read, parsed or written. Never contains a secret."""


class SecretRotationError(Exception):
    """Rotation of a secret that lives in the config file, which the bridge cannot edit.

    By the time this is raised the rotation has been recorded: the old configured secret
    is kept valid until :attr:`expires_at`, and :attr:`new_secret` (also stored as
    ``pending``) is the freshly generated secret the operator must put into the config
    (``signing.secret`` / ``secret_file``). The message never contains a secret; the
    caller (the ``secret rotate`` command) prints :attr:`new_secret` itself.
    """

    def __init__(self, name: str, new_secret: str, expires_at: int) -> None:
        super().__init__(
            f"the signing secret of webhook {name!r} is set in the config file, which "
            f"webhook-bridge does not edit: put the newly generated secret into its "
            f"signing.secret (or secret_file) and reload; the old secret stays valid until "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(expires_at))}"
        )
        self.name = name
        self.new_secret = new_secret
        self.expires_at = expires_at

    def __repr__(self) -> str:  # keep the secret out of reprs too
        return f"SecretRotationError(name={self.name!r}, expires_at={self.expires_at})"


_Entry = dict[str, Any]
_Data = dict[str, _Entry]


def stored_secrets(state_dir: str) -> list[str]:
    """Every secret ``secrets.json`` holds (current, pending, previous): generated secrets
    are secrets too, to be redacted wherever an endpoint echoes one. Empty when the file
    is missing or unreadable (reading it is then someone else's error to report)."""
    try:
        data = SecretKeeper(state_dir)._load()
    except SecretStoreError:
        return []
    found: list[str] = []
    for entry in data.values():
        found += [entry[k] for k in ("current", "pending") if k in entry]
        found += [p["secret"] for p in entry["previous"]]
    return found


class SecretKeeper:
    """Generated and rotated signing secrets per webhook, in ``<state_dir>/secrets.json``.

    File layout (a JSON object keyed by webhook name)::

        {"cloud-ingest": {"current": "whsec_...",
                          "previous": [{"secret": "whsec_...", "expires_at": 1700000000}],
                          "pending": "whsec_..."}}          # pending: configured secrets only

    * No configured secret (``configured is None``): ``current`` is generated and persisted
      on first use; :meth:`rotate` makes a new ``current`` and moves the old one to
      ``previous`` with ``expires_at = now + grace``.
    * Configured secret (from the YAML): the configured one is always the current one and
      ``current`` in the file is not used. :meth:`rotate` cannot edit the config, so it
      records the configured secret in ``previous`` (valid for ``grace``), stores a fresh
      secret as ``pending`` and raises :class:`SecretRotationError` carrying it. Once the
      operator configures the new secret, :meth:`secrets_for` returns ``[new, old]`` until
      the old one expires - both signatures are sent, so receivers can switch over.

    A previous secret is valid while ``clock() < expires_at`` (whole unix seconds, rounded
    up). Expired entries are never returned and are pruned at the next write.

    Every call stats the file and re-reads it when its mtime, size or inode changed, so a
    rotation done by another process (the CLI while the daemon runs) is seen by the next
    call; otherwise the parsed content is cached. Writes go to a 0600 temp file that is
    fsynced and ``os.replace``-d over the old one, then the directory is fsynced;
    read-modify-write cycles hold an ``flock`` on ``secrets.json.lock`` so two processes do
    not lose each other's changes. Thread-safe.
    """

    def __init__(self, state_dir: str, clock: Callable[[], float] = time.time) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, SECRETS_FILE)
        self._lock_path = self.path + ".lock"
        self._clock = clock
        self._mutex = threading.RLock()
        self._cache: _Data = {}
        self._cache_key: tuple[int, int, int] | None = None  # (mtime_ns, size, inode)
        self._cache_valid = False

    # ----------------------------------------------------------------- public API

    def secrets_for(self, name: str, configured: str | None) -> list[str]:
        """The secrets to sign with now, newest first.

        ``configured`` not None -> ``[configured]`` + unexpired previous secrets that differ
        from it; None -> the generated current secret (generated and persisted on first
        use) + unexpired previous secrets.
        """
        with self._mutex:
            entry = self._entry(name, configured)
            current = configured if configured is not None else entry["current"]
            return [current, *(p["secret"] for p in self._valid_previous(entry, current))]

    def show(self, name: str, configured: str | None) -> dict[str, Any]:
        """What ``webhook-bridge secret show NAME`` prints.

        ``{"current": str, "previous": [{"secret", "expires_at"}...], "source":
        "config" | "generated", "pending": str | None}`` - ``pending`` is the secret a
        rotation of a configured secret generated and the operator has not configured
        yet (None otherwise). Like :meth:`secrets_for`, generates the secret of a
        webhook without one, so the receiver can be set up before the first delivery.
        """
        with self._mutex:
            entry = self._entry(name, configured)
            current = configured if configured is not None else entry["current"]
            pending = entry.get("pending") if configured is not None else None
            return {
                "current": current,
                "previous": [dict(p) for p in self._valid_previous(entry, current)],
                "source": "config" if configured is not None else "generated",
                "pending": pending if pending != configured else None,
            }

    def rotate(
        self, name: str, configured: str | None, grace: float = DEFAULT_ROTATION_GRACE
    ) -> str:
        """Rotate the secret of webhook ``name``; the old one stays valid for ``grace`` s.

        Generated secret: a new ``current`` is generated and returned; the old one moves to
        ``previous``. Configured secret: the configured one moves to ``previous``, a new one
        is generated and stored as ``pending``, and :class:`SecretRotationError` is raised
        with it in ``.new_secret`` (see the class docstring).
        """
        if grace < 0:
            raise ValueError("grace must be >= 0")
        new = generate_secret()
        with self._mutex, self._file_lock():
            data = self._load(force=True)
            now = self._clock()
            expires_at = math.ceil(now + grace)
            entry = data.setdefault(name, {"previous": []})
            old = configured if configured is not None else entry.get("current")
            previous = [
                p for p in entry.get("previous", []) if p["expires_at"] > now and p["secret"] != old
            ]
            if old:
                previous.insert(0, {"secret": old, "expires_at": expires_at})
            entry["previous"] = previous
            if configured is None:
                entry["current"] = new
                entry.pop("pending", None)
            else:
                entry["pending"] = new
            self._write(data)
        if configured is not None:
            raise SecretRotationError(name, new, expires_at)
        return new

    # ----------------------------------------------------------------- internals

    @staticmethod
    def _valid_previous(entry: _Entry, current: str) -> list[dict[str, Any]]:
        return [p for p in entry.get("previous", []) if p["secret"] != current]

    def _entry(self, name: str, configured: str | None) -> _Entry:
        """The (copied, expiry-filtered) entry of ``name``; generates a missing secret."""
        data = self._load()
        entry = data.get(name)
        if configured is None and (entry is None or not entry.get("current")):
            with self._file_lock():
                data = self._load(force=True)  # another process may have generated it
                entry = data.get(name)
                if entry is None or not entry.get("current"):
                    entry = data.setdefault(name, {"previous": []})
                    entry["current"] = generate_secret()
                    self._write(data)
        entry = dict(entry or {"previous": []})
        now = self._clock()
        entry["previous"] = [p for p in entry.get("previous", []) if p["expires_at"] > now]
        return entry

    def _stat_key(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SecretStoreError(f"cannot stat {self.path}: {exc.strerror}") from None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self, force: bool = False) -> _Data:
        """The file's content, re-read if it changed (or ``force``); ``{}`` if missing."""
        key = self._stat_key()
        if not force and self._cache_valid and key == self._cache_key:
            return self._cache
        if key is None:
            data: _Data = {}
        else:
            try:
                with open(self.path, "rb") as f:
                    raw = f.read()
                key = self._stat_key()  # the key of what we actually read (best effort)
            except FileNotFoundError:
                raw, key = b"{}", None
            except OSError as exc:
                raise SecretStoreError(f"cannot read {self.path}: {exc.strerror}") from None
            data = self._parse(raw)
        self._cache, self._cache_key, self._cache_valid = data, key, True
        return data

    def _parse(self, raw: bytes) -> _Data:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:  # the message has no content, only a position
            raise SecretStoreError(
                f"{self.path} is not valid JSON (line {exc.lineno} column {exc.colno})"
            ) from None
        except UnicodeDecodeError:
            raise SecretStoreError(f"{self.path} is not valid UTF-8") from None
        if not isinstance(obj, dict):
            raise SecretStoreError(f"{self.path}: expected a JSON object keyed by webhook name")
        data: _Data = {}
        for name, entry in obj.items():
            bad = SecretStoreError(f"{self.path}: malformed entry for webhook {name!r}")
            if not isinstance(entry, dict):
                raise bad
            current = entry.get("current")
            pending = entry.get("pending")
            previous = entry.get("previous", [])
            if not (current is None or isinstance(current, str)):
                raise bad
            if not (pending is None or isinstance(pending, str)):
                raise bad
            if not isinstance(previous, list):
                raise bad
            clean_prev = []
            for p in previous:
                if not (
                    isinstance(p, dict)
                    and isinstance(p.get("secret"), str)
                    and isinstance(p.get("expires_at"), (int, float))
                    and not isinstance(p.get("expires_at"), bool)
                ):
                    raise bad
                clean_prev.append({"secret": p["secret"], "expires_at": p["expires_at"]})
            clean: _Entry = {"previous": clean_prev}
            if current is not None:
                clean["current"] = current
            if pending is not None:
                clean["pending"] = pending
            data[name] = clean
        return data

    def _write(self, data: _Data) -> None:
        """Prune expired entries and atomically replace the file (0600, fsynced).

        ``data`` is the (mutated) cache; if the write fails the cache is invalidated so
        no secret that is not on disk is ever used for signing.
        """
        try:
            self._write_file(data)
        except BaseException:
            self._cache_valid = False
            raise
        self._cache, self._cache_key, self._cache_valid = data, self._stat_key(), True

    def _write_file(self, data: _Data) -> None:
        now = self._clock()
        for entry in data.values():
            entry["previous"] = [p for p in entry.get("previous", []) if p["expires_at"] > now]
        payload = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")
        self._ensure_dir()
        tmp = os.path.join(
            self.state_dir, f".{SECRETS_FILE}.{os.getpid()}.{_secrets.token_hex(4)}.tmp"
        )
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.fchmod(fd, 0o600)  # in case a permissive ACL/umask interfered
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise SecretStoreError(f"cannot write {self.path}: {exc.strerror}") from None
        self._fsync_dir()

    def _ensure_dir(self) -> None:
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise SecretStoreError(f"cannot create {self.state_dir}: {exc.strerror}") from None

    def _fsync_dir(self) -> None:
        try:
            dfd = os.open(self.state_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:  # pragma: no cover - e.g. platforms that cannot open directories
            return
        try:
            os.fsync(dfd)
        except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
            pass
        finally:
            os.close(dfd)

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Exclusive cross-process lock for a read-modify-write of the secrets file."""
        if fcntl is None:  # pragma: no cover - non-POSIX
            yield
            return
        self._ensure_dir()
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SecretStoreError(f"cannot open {self._lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock
