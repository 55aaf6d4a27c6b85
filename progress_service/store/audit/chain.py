"""Records and their hashes: what a record is and how its hash is computed.

A record's ``hash`` covers its contents and ``prev_hash`` (the hash of the
record before it in its chain). Two kinds:

* **keyed** (``key_id`` set, hash version 2): HMAC-SHA256 under the secret
  named by ``key_id`` in the key file (``PS_AUDIT_KEY_FILE``, kept outside
  the store). Nobody without that file can compute a hash that verifies, so
  a forged or edited row is caught even when its author also rewrote every
  later row and the chain's head.
* **legacy** (``key_id`` NULL, hash version 1): plain SHA-256, as written
  before keyed records existed. They still verify, and ``audit verify``
  reports how many it found; anyone who can write the database can compute
  these, so a legacy record *after* a keyed one in its chain is named as
  forged.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

import msgspec

from progress_service.ids import now_ms

SYSTEM_CHAIN = "system"
GENESIS = "0" * 64
#: Hash version of legacy (SHA-256) records.
HASH_VERSION = 1
#: Hash version of keyed (HMAC-SHA256) records.
KEYED_VERSION = 2

#: Detail keys that may carry a secret; their values never reach the log.
_SECRET_KEYS = frozenset({"token", "ticket", "secret", "authorization", "password", "access_token", "auth"})
_SECRET_PREFIXES = ("ps_", "pst_")



_RELATIVE = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 7 * 86_400_000}


def parse_since(value: str, *, now: int | None = None) -> int:
    """A point in time as epoch ms: ISO 8601 (UTC unless it says otherwise),
    epoch seconds or milliseconds, or an age such as ``90m``, ``24h``, ``7d``.
    """
    from datetime import UTC, datetime  # noqa: PLC0415

    text = value.strip()
    if not text:
        raise ValueError("empty time")
    if text[-1:].lower() in _RELATIVE and text[:-1].isdigit():
        return (now if now is not None else now_ms()) - int(text[:-1]) * _RELATIVE[text[-1].lower()]
    if text.isdigit():
        number = int(text)
        return number if number >= 10**11 else number * 1000  # ms vs s
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a time: {value!r} (ISO 8601, epoch seconds/ms, or an age like 24h)") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


class AuditRecord(msgspec.Struct, kw_only=True):
    """One audit record as the API and ``audit export`` show it."""

    id: int
    chain: str
    teamId: str | None
    actor: str | None
    action: str
    roomId: str | None
    detail: dict[str, Any]
    createdAt: int
    prevHash: str
    hash: str
    #: The key its hash is keyed with; None for a legacy (SHA-256) record.
    keyId: str | None = None


@dataclass(frozen=True)
class Entry:
    """A record to append; ``created_at`` is when the event happened."""

    action: str
    team_id: str | None
    actor: str | None = None
    room_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    created_at: int = field(default_factory=now_ms)

    @property
    def chain(self) -> str:
        """The chain this entry is appended to."""
        return chain_of(self.team_id)


def chain_of(team_id: str | None) -> str:
    """The chain a record of ``team_id`` belongs to."""
    return team_id or SYSTEM_CHAIN


def scrub(detail: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``detail`` without anything that may be a credential."""
    if not detail:
        return {}
    clean: dict[str, Any] = {}
    for key, value in detail.items():
        if str(key).lower() in _SECRET_KEYS:
            clean[key] = "[redacted]"
        elif isinstance(value, str) and value.startswith(_SECRET_PREFIXES) and len(value) > 20:
            clean[key] = "[redacted]"
        elif isinstance(value, dict):
            clean[key] = scrub(value)
        else:
            clean[key] = value
    return clean


_encoder = msgspec.json.Encoder(order="sorted")


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace (what the hash covers)."""
    return _encoder.encode(value).decode()


class _Legacy(msgspec.Struct):
    """What a legacy hash covers; fields in sorted order, so it encodes as canonical JSON."""

    action: str
    actor: str | None
    at: int
    detail: str
    prev: str
    room: str | None
    team: str | None
    v: int


class _Keyed(msgspec.Struct):
    """What a keyed hash covers (sorted fields: encodes as canonical JSON, faster than a dict)."""

    action: str
    actor: str | None
    at: int
    detail: str
    kid: str
    prev: str
    room: str | None
    team: str | None
    v: int


def _material(
    version: int,
    key_id: str | None,
    prev_hash: str,
    team_id: str | None,
    actor: str | None,
    action: str,
    room_id: str | None,
    detail: str,
    created_at: int,
) -> bytes:
    # Same bytes as canonical_json of the dict of these fields (tests check it).
    if key_id is None:
        return _encoder.encode(_Legacy(action, actor, created_at, detail, prev_hash, room_id, team_id, version))
    return _encoder.encode(_Keyed(action, actor, created_at, detail, key_id, prev_hash, room_id, team_id, version))


def keyed_hash(
    secret: bytes,
    key_id: str,
    prev_hash: str,
    team_id: str | None,
    actor: str | None,
    action: str,
    room_id: str | None,
    detail: str,
    created_at: int,
) -> str:
    """A keyed record's hash, positional (the verify loop's hot path)."""
    return _keyed(
        secret, _encoder.encode(_Keyed(action, actor, created_at, detail, key_id, prev_hash, room_id, team_id, KEYED_VERSION))
    )


def compute_hash(
    *,
    prev_hash: str,
    team_id: str | None,
    actor: str | None,
    action: str,
    room_id: str | None,
    detail: str,
    created_at: int,
    key_id: str | None = None,
    secret: bytes | None = None,
) -> str:
    """A record's hash: HMAC-SHA256 under ``secret`` when keyed, else legacy SHA-256.

    ``detail`` is the stored JSON text, hashed exactly as stored. ``key_id``
    and ``secret`` go together: the key id is part of what is hashed, so a
    record cannot be moved to another key.
    """
    if key_id is None:
        return hashlib.sha256(
            _material(HASH_VERSION, None, prev_hash, team_id, actor, action, room_id, detail, created_at)
        ).hexdigest()
    if secret is None:
        raise ValueError("a keyed hash needs the key's secret")
    material = _material(KEYED_VERSION, key_id, prev_hash, team_id, actor, action, room_id, detail, created_at)
    return _keyed(secret, material)


#: Per secret, an HMAC with the key already mixed in: copying it costs half
#: of keying a new one, which matters over a million records.
_HMAC_BASES: dict[bytes, Any] = {}


def _keyed(secret: bytes, material: bytes) -> str:
    base = _HMAC_BASES.get(secret)
    if base is None:
        if len(_HMAC_BASES) > 64:  # keys are few; never grow without bound
            _HMAC_BASES.clear()
        base = _HMAC_BASES[secret] = hmac.new(secret, digestmod=hashlib.sha256)
    h = base.copy()
    h.update(material)
    return h.hexdigest()


def row_hash(row: Any, secret: bytes | None) -> str:
    """The hash a stored row should have (``secret``: its key's, None for legacy).

    The hot loop of ``verify``: the same as :func:`compute_hash`, without
    keyword passing.
    """
    key_id = row.key_id
    if key_id is None or secret is None:
        return compute_hash(
            prev_hash=row.prev_hash, team_id=row.team_id, actor=row.actor, action=row.action, room_id=row.room_id,
            detail=row.detail, created_at=row.created_at, key_id=key_id, secret=secret,
        )
    material = _material(
        KEYED_VERSION, key_id, row.prev_hash, row.team_id, row.actor, row.action, row.room_id, row.detail, row.created_at
    )
    return _keyed(secret, material)


def to_record(row: Any) -> AuditRecord:
    """A stored row as an :class:`AuditRecord`."""
    try:
        detail = msgspec.json.decode(row.detail)
    except msgspec.DecodeError:
        detail = {"raw": row.detail}
    return AuditRecord(
        id=row.id,
        chain=chain_of(row.team_id),
        teamId=row.team_id,
        actor=row.actor,
        action=row.action,
        roomId=row.room_id,
        detail=detail if isinstance(detail, dict) else {"value": detail},
        createdAt=row.created_at,
        prevHash=row.prev_hash,
        hash=row.hash,
        keyId=row.key_id,
    )
