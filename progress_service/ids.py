"""Ids, their shapes, and the clock every timestamp comes from.

A job id is what ``POST /api/jobs`` returns (or ``cc-<uuid5>`` for a hook
session); its room is ``job:<id>``; an event id is the Redis stream entry id
``<ms>-<seq>`` of the room's event stream (docs/protocol.md "Event ids").

One event-id shape everywhere (WebSocket ``since``, HTTP ``since``, SSE
``Last-Event-ID``): two decimal parts of at most 19 digits. Every such number
fits a 64-bit stream id part, so Redis never rejects one (a 20-digit part can
exceed 2**64 - 1); real ids have a 13-digit millisecond part.
"""

from __future__ import annotations

import re
import time

#: A job id (without the ``job:`` room prefix). The ``*_RE`` are for ``fullmatch``
#: (``$`` would let a trailing newline through); the ``*_PATTERN`` are msgspec's.
JOB_ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"
JOB_ID_RE = re.compile(JOB_ID_PATTERN)
#: A room id: ``job:<job id>`` (the pattern of :data:`progress_service.events.RoomId`).
ROOM_ID_PATTERN = rf"^job:{JOB_ID_PATTERN}$"
ROOM_ID_RE = re.compile(rf"job:{JOB_ID_PATTERN}")
#: An event id: a Redis stream entry id ``<ms>-<seq>``.
EVENT_ID_PATTERN = r"^[0-9]{1,19}-[0-9]{1,19}$"
EVENT_ID_MAX_LENGTH = 39
EVENT_ID_RE = re.compile(r"[0-9]{1,19}-[0-9]{1,19}")


def is_job_id(value: str) -> bool:
    """True for a well-formed job id (says nothing about whether the job exists)."""
    return JOB_ID_RE.fullmatch(value) is not None


def is_event_id(value: str) -> bool:
    """True for a well-formed event id (see the module docstring for the shape)."""
    return EVENT_ID_RE.fullmatch(value) is not None


def is_room_id(value: str) -> bool:
    """True for a well-formed room id."""
    return ROOM_ID_RE.fullmatch(value) is not None


def room_id(job_id: str) -> str:
    """The room of a job."""
    return f"job:{job_id}"


def job_id_of(room: str) -> str:
    """The job of a room id (``job:<id>``)."""
    return room.split(":", 1)[1]


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds (every ``at``, ``createdAt`` and expiry)."""
    return int(time.time() * 1000)
