"""Signed checkpoints of the audit chains, kept outside the store (the witness).

A checkpoint says "at time *at*, chain *chain* had *count* records, the last
one being *lastId* with hash *lastHash*", keyed (HMAC-SHA256) with the
current audit key. The app appends one line per chain to the witness
(``PS_AUDIT_WITNESS``, an append-only JSONL file, fsynced, or a Redis
stream) every
``PS_AUDIT_CHECKPOINT_SECONDS`` while records are appended and at shutdown.
Someone who rewrites the database cannot rewrite these lines, so ``audit
verify`` notices a chain that got shorter, a head that moved backwards or a
chain that vanished, however carefully the rows and heads were made to agree.

A crash while a line is written leaves a *torn* line: a prefix of a JSON
object, which never parses. Readers skip such lines and report them; they
are not an error. A line that parses but whose signature does not verify is
an error: someone wrote it without the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from progress_service.keys import AUDIT_WITNESS_STREAM
from progress_service.settings import Settings
from progress_service.store.audit.chain import canonical_json
from progress_service.store.audit.keys import Keyring, key_file_path

WITNESS_VERSION = 1
OFF = "off"


class Checkpoint(msgspec.Struct, kw_only=True):
    """One chain's state at a moment, signed with an audit key."""

    v: int = WITNESS_VERSION
    chain: str
    count: int
    lastId: int | None
    lastHash: str
    at: int
    kid: str = ""
    sig: str = ""

    def _material(self) -> bytes:
        fields = msgspec.structs.asdict(self)
        fields.pop("sig")
        return canonical_json(fields).encode()

    def signed(self, ring: Keyring) -> Checkpoint:
        """This checkpoint signed with ``ring``'s current key."""
        kid = ring.current_id or ""
        unsigned = msgspec.structs.replace(self, kid=kid, sig="")
        return msgspec.structs.replace(unsigned, sig=ring.mac(kid, unsigned._material()) or "")

    def signature_problem(self, ring: Keyring) -> str | None:
        """Why the signature does not verify under ``ring``; None when it does."""
        expected = ring.mac(self.kid, self._material())
        if expected is None:
            return f"signed with unknown key id {self.kid!r} (not in the key file)"
        if expected != self.sig:
            return "bad signature (written or altered without the audit key)"
        return None

    def describe(self) -> str:
        """``count 12 ending at id=40 (at 2026-…)``."""
        from datetime import UTC, datetime  # noqa: PLC0415

        when = datetime.fromtimestamp(self.at / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return f"{self.count} record(s) ending at id={self.lastId} (checkpoint of {when})"


@dataclass
class WitnessContents:
    """What a witness holds: checkpoints by line number, torn lines, bad ones."""

    checkpoints: list[tuple[int, Checkpoint]] = field(default_factory=list)
    #: Line numbers of torn lines (crash mid-write): skipped, reported.
    torn: list[int] = field(default_factory=list)
    #: (line, reason) of checkpoints that do not verify: errors.
    bad: list[tuple[int, str]] = field(default_factory=list)
    source: str = ""

    def latest(self) -> dict[str, tuple[int, Checkpoint]]:
        """Per chain, the checkpoint with the most records (heads only grow)."""
        best: dict[str, tuple[int, Checkpoint]] = {}
        for line, cp in self.checkpoints:
            have = best.get(cp.chain)
            if have is None or (cp.count, cp.at) > (have[1].count, have[1].at):
                best[cp.chain] = (line, cp)
        return best

    def backwards(self) -> list[tuple[int, Checkpoint, Checkpoint]]:
        """Checkpoints that show a chain's head moving backwards: (line, earlier, later)."""
        out: list[tuple[int, Checkpoint, Checkpoint]] = []
        seen: dict[str, Checkpoint] = {}
        for line, cp in sorted(self.checkpoints, key=lambda lc: (lc[1].at, lc[0])):
            before = seen.get(cp.chain)
            if before is not None and (cp.count < before.count or (cp.count == before.count and cp.lastHash != before.lastHash)):
                out.append((line, before, cp))
            if before is None or cp.count >= before.count:
                seen[cp.chain] = cp
        return out


def parse_lines(lines: list[bytes], ring: Keyring, *, source: str = "") -> WitnessContents:
    """Checkpoints from JSONL lines; signatures checked with ``ring``."""
    out = WitnessContents(source=source)
    decoder = msgspec.json.Decoder(Checkpoint)
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            cp = decoder.decode(raw)
        except msgspec.ValidationError as exc:
            out.bad.append((number, f"not a checkpoint: {exc}"))
            continue
        except msgspec.DecodeError:
            out.torn.append(number)
            continue
        problem = cp.signature_problem(ring)
        if problem is not None:
            out.bad.append((number, problem))
        else:
            out.checkpoints.append((number, cp))
    return out


def witness_path(settings: Settings) -> Path | None:
    """The witness file: ``PS_AUDIT_WITNESS``, else beside the key file; None when ``off`` or a Redis witness."""
    if settings.audit_witness:
        if settings.audit_witness.strip().lower() == OFF or _is_redis(settings.audit_witness):
            return None
        return Path(settings.audit_witness).expanduser()
    key = key_file_path(settings)
    stem = key.name.removesuffix(".key").removesuffix("-key")
    return key.with_name(f"{stem}-witness.jsonl")


def _is_redis(value: str) -> bool:
    return value.startswith(("redis://", "rediss://", "unix://"))


def open_witness(settings: Settings, override: str | None = None) -> FileWitness | RedisWitness | None:
    """The witness ``override`` (a path or a Redis URL) or the settings name; None when ``off``."""
    if override:
        return RedisWitness(override) if _is_redis(override) else FileWitness(Path(override).expanduser())
    if settings.audit_witness and _is_redis(settings.audit_witness):
        return RedisWitness(settings.audit_witness)
    path = witness_path(settings)
    return FileWitness(path) if path is not None else None


class FileWitness:
    """An append-only JSONL file of checkpoints (one ``write`` and an fsync per batch)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)

    def exists(self) -> bool:
        """True when the file is there."""
        return self.path.exists()

    def append(self, checkpoints: list[Checkpoint]) -> None:
        """Append ``checkpoints`` durably (blocking: run it in a thread)."""
        if not checkpoints:
            return
        data = b"".join(msgspec.json.encode(cp) + b"\n" for cp in checkpoints)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            # A torn line left by a crash must not swallow this batch's first line.
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, ring: Keyring) -> WitnessContents:
        """Every checkpoint in the file (a missing file holds none)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return WitnessContents(source=str(self.path))
        return parse_lines(raw.split(b"\n"), ring, source=str(self.path))


class RedisWitness:
    """Checkpoints as entries of a Redis stream: ``redis://host:port/db#stream``.

    A second system to hold the checkpoints, for deployments where the
    database's administrator does not administer Redis. The stream name
    defaults to ``ps:audit:witness``. Redis's own persistence (AOF) decides
    how durable an entry is; a file witness is fsynced.
    """

    DEFAULT_STREAM = AUDIT_WITNESS_STREAM

    def __init__(self, url: str) -> None:
        base, _, stream = url.partition("#")
        self.url = base
        self.stream = stream or self.DEFAULT_STREAM
        host = base.split("@", 1)[-1]  # never show credentials
        self.name = f"redis stream {self.stream} at {host.split('://', 1)[-1]}"

    def _client(self) -> Any:
        import redis  # noqa: PLC0415 - only a Redis witness needs it

        return redis.Redis.from_url(self.url, socket_connect_timeout=5, socket_timeout=10)

    def exists(self) -> bool:
        """True when the stream has entries."""
        client = self._client()
        try:
            return bool(client.exists(self.stream))
        finally:
            client.close()

    def append(self, checkpoints: list[Checkpoint]) -> None:
        """XADD each checkpoint, in one transaction (blocking: run it in a thread)."""
        if not checkpoints:
            return
        client = self._client()
        try:
            with client.pipeline(transaction=True) as pipe:
                for cp in checkpoints:
                    pipe.xadd(self.stream, {"cp": msgspec.json.encode(cp)})
                pipe.execute()
        finally:
            client.close()

    def read(self, ring: Keyring) -> WitnessContents:
        """Every checkpoint in the stream, oldest first."""
        client = self._client()
        lines: list[bytes] = []
        try:
            start = "-"
            while True:
                entries = client.xrange(self.stream, min=start, count=1000)
                lines.extend(fields.get(b"cp", b"") for _, fields in entries)
                if len(entries) < 1000:
                    break
                start = "(" + entries[-1][0].decode()
        finally:
            client.close()
        return parse_lines(lines, ring, source=self.name)
