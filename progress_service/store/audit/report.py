"""What verifying found: the named problems and the counts (one home for both)."""

from __future__ import annotations

import msgspec

#: Comment differences named at most per chain (the count is always given).
MAX_COMMENT_PROBLEMS = 100


class Mismatch(msgspec.Struct, kw_only=True):
    """Where a chain breaks: the record (``id`` None for a missing tail) and why."""

    chain: str
    id: int | None
    position: int
    reason: str
    #: What is named when it is not a record (a comment, a witness line).
    subject: str | None = None

    def describe(self) -> str:
        """One line naming the record (or thing) and the reason."""
        what = self.subject or (f"record id={self.id}" if self.id is not None else "chain head")
        where = f"chain {self.chain}, #{self.position}" if self.position else f"chain {self.chain}"
        return f"{what} ({where}): {self.reason}"


class VerifyResult(msgspec.Struct, kw_only=True):
    """What :func:`verify` found: records checked, chains, everything that is wrong."""

    verified: int
    chains: int
    problems: list[Mismatch] = msgspec.field(default_factory=list)
    #: Records verified by SHA-256 only (written before keyed records).
    legacy: int = 0
    #: Chains checked against a checkpoint of the witness.
    checkpointed: int = 0
    comments: int = 0
    #: Things worth saying that are not failures (torn witness lines, no witness).
    notes: list[str] = msgspec.field(default_factory=list)

    @property
    def mismatch(self) -> Mismatch | None:
        """The first problem, if any."""
        return self.problems[0] if self.problems else None

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems
