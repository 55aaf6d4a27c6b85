"""The audit key file: the secrets records and checkpoints are keyed with.

The file (``PS_AUDIT_KEY_FILE``; default beside the SQLite file, or
``progress-audit.key`` in the working directory for other stores) is JSON::

    {"version": 1, "current": "k…", "keys": [{"id": "k…", "secret": "<hex>", "created": ms}, …]}

It is created with mode 0600 the first time a process that appends records
starts without one. ``progress-service audit rotate-key`` adds a new key and
makes it current; older keys stay in the file so the records keyed with them
keep verifying. Processes read the file when they start: restart them after
a rotation (until then they keep writing under the previous key, which still
verifies). Every node of a deployment must use the same file.

Why HMAC and not Ed25519 signatures: verifying a million records must take
well under a minute, and HMAC-SHA256 costs about a microsecond a record
(an Ed25519 verification costs ~50-100 µs, so ~1-2 minutes for a million on
this project's 2-core hosts); it needs no new dependency. The price: whoever
verifies holds the secret and could therefore also forge, so give the key
file only to people trusted as much as the service (see docs/audit.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from progress_service.errors import KeyFileError
from progress_service.settings import Settings, load_settings
from progress_service.ids import now_ms

log = logging.getLogger("progress_service.audit")

KEY_FILE_VERSION = 1


class _StoredKey(msgspec.Struct, kw_only=True):
    id: str
    secret: str
    created: int


class _KeyFile(msgspec.Struct, kw_only=True):
    version: int
    current: str
    keys: list[_StoredKey]


@dataclass
class Keyring:
    """The keys of the key file; ``current_id`` is the one new records use."""

    secrets: dict[str, bytes] = field(default_factory=dict)
    current_id: str | None = None
    created: dict[str, int] = field(default_factory=dict)
    path: Path | None = None

    def secret(self, key_id: str | None) -> bytes | None:
        """The secret of ``key_id``; None when unknown (or for a legacy record)."""
        return self.secrets.get(key_id) if key_id is not None else None

    @property
    def current_secret(self) -> bytes:
        """The secret new records and checkpoints are keyed with."""
        if self.current_id is None:
            raise KeyFileError("the key file has no current key")
        return self.secrets[self.current_id]

    def mac(self, key_id: str, data: bytes) -> str | None:
        """HMAC-SHA256 of ``data`` under ``key_id``; None when the key is unknown."""
        key = self.secret(key_id)
        return None if key is None else hmac.new(key, data, hashlib.sha256).hexdigest()

    @property
    def first_key_at(self) -> int | None:
        """When the oldest key was made (records after it should all be keyed)."""
        return min(self.created.values()) if self.created else None

    @classmethod
    def generate(cls) -> Keyring:
        """A keyring with one fresh key (not written anywhere)."""
        ring = cls()
        ring.add_key()
        return ring

    def add_key(self) -> str:
        """Add a new random key and make it current; returns its id."""
        key_id = "k" + secrets.token_hex(6)
        self.secrets[key_id] = secrets.token_bytes(32)
        self.created[key_id] = now_ms()
        self.current_id = key_id
        return key_id

    def to_bytes(self) -> bytes:
        """The key file's contents."""
        if self.current_id is None:
            raise KeyFileError("no current key")
        stored = [_StoredKey(id=k, secret=v.hex(), created=self.created.get(k, 0)) for k, v in self.secrets.items()]
        return msgspec.json.encode(_KeyFile(version=KEY_FILE_VERSION, current=self.current_id, keys=stored)) + b"\n"


def key_file_path(settings: Settings) -> Path:
    """Where the key file is: ``PS_AUDIT_KEY_FILE``, else beside the SQLite file, else the working directory."""
    if settings.audit_key_file:
        return Path(settings.audit_key_file).expanduser()
    db = sqlite_path(settings.database_url)
    if db is not None:
        return db.with_name(db.name + ".audit-key")
    return Path("progress-audit.key")


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite…:///path`` URL; None for other stores or in-memory SQLite."""
    if not url.startswith("sqlite"):
        return None
    _, _, rest = url.partition(":///")
    rest = rest.split("?", 1)[0]
    if not rest or rest == ":memory:":
        return None
    return Path(rest).expanduser()


def read_keyring(path: Path) -> Keyring:
    """Load the key file at ``path``; :class:`KeyFileError` when missing or malformed."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"audit key file {path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"audit key file {path}: {exc.strerror}") from None
    try:
        data = msgspec.json.decode(raw, type=_KeyFile)
        ring = Keyring(
            secrets={k.id: bytes.fromhex(k.secret) for k in data.keys},
            current_id=data.current,
            created={k.id: k.created for k in data.keys},
            path=path,
        )
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise KeyFileError(f"audit key file {path} is malformed: {exc}") from None
    if ring.current_id not in ring.secrets:
        raise KeyFileError(f"audit key file {path}: current key {ring.current_id!r} is not in the file")
    with contextlib.suppress(OSError):
        if path.stat().st_mode & 0o077:
            log.warning("audit key file %s is readable by other users; chmod 600 it", path)
    return ring


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (temp file + fsync + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_or_create(path: Path) -> Keyring:
    """The key file at ``path``, created (mode 0600, one new key) when missing."""
    if not path.exists():
        ring = Keyring.generate()
        try:
            # O_EXCL: two processes starting at once must not both create one.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return read_keyring(path)
        try:
            os.write(fd, ring.to_bytes())
            os.fsync(fd)
        finally:
            os.close(fd)
        ring.path = path
        log.warning("audit: created key file %s (keep a copy somewhere safe; without it records cannot be verified)", path)
        return ring
    return read_keyring(path)


def rotate(path: Path) -> tuple[str, str | None]:
    """Add a new current key to the key file; returns (new id, previous id)."""
    ring = read_keyring(path)
    previous = ring.current_id
    new_id = ring.add_key()
    _write_private(path, ring.to_bytes())
    return new_id, previous


# --------------------------------------------------------------------------
# Which keyring a store's records use
# --------------------------------------------------------------------------

#: Keyrings bound to engines (the app binds its key file to its engine).
_bound: weakref.WeakKeyDictionary[Any, Keyring] = weakref.WeakKeyDictionary()
#: The configured key file's keyring, for engines nobody bound (the CLI, tests).
_configured: Keyring | None = None


def bind(engine: AsyncEngine, ring: Keyring) -> None:
    """Records appended, served and verified through ``engine`` use ``ring``."""
    _bound[engine.sync_engine] = ring


def bound(engine: AsyncEngine | AsyncConnection) -> Keyring | None:
    """The keyring bound to ``engine`` (or a connection of it), if any."""
    return _bound.get(engine.sync_engine)


def for_engine(engine: AsyncEngine | AsyncConnection) -> Keyring:
    """The keyring to append with: the bound one, else the configured key file (created when missing)."""
    global _configured
    ring = bound(engine)
    if ring is not None:
        return ring
    if _configured is None:
        _configured = load_or_create(key_file_path(load_settings()))
    return _configured


def for_verify(path: Path | None, engine: AsyncEngine | None = None) -> tuple[Keyring, str | None]:
    """The keyring to verify with, and a note when there is none (never creates a key file).

    ``path`` None: the engine's bound keyring, else the configured key file.
    """
    if path is None:
        ring = bound(engine) if engine is not None else None
        if ring is not None:
            return ring, None
        if _configured is not None:
            return _configured, None
        path = key_file_path(load_settings())
    try:
        return read_keyring(path), None
    except KeyFileError as exc:
        return Keyring(), str(exc)
