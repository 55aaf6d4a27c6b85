"""Table definitions of the SQL store (SQLAlchemy Core).

This is the schema as of the newest migration; ``migrations.py`` holds the
steps that bring an older database here without losing data.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

teams = sa.Table(
    "teams",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False, unique=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False, unique=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)

memberships = sa.Table(
    "memberships",
    metadata,
    sa.Column("user_id", sa.String(36), sa.ForeignKey("users.id"), primary_key=True),
    sa.Column("team_id", sa.String(36), sa.ForeignKey("teams.id"), primary_key=True),
    sa.Column("role", sa.String(20), nullable=False),
)

api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    # sha256 of the token; the token itself is never stored.
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("user_id", sa.String(36), sa.ForeignKey("users.id"), nullable=False),
    sa.Column("team_id", sa.String(36), sa.ForeignKey("teams.id"), nullable=False),
    sa.Column("label", sa.String(100), nullable=False, server_default=""),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=True),
    sa.Column("revoked_at", sa.BigInteger, nullable=True),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("team_id", sa.String(36), sa.ForeignKey("teams.id"), nullable=False),
    sa.Column("user_id", sa.String(36), sa.ForeignKey("users.id"), nullable=False),
    sa.Column("spec", sa.Text, nullable=False),  # JSON of the submitted JobSpec
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("phase", sa.String(20), nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("result", sa.Text, nullable=True),  # JSON of ResultData
    sa.Column("snapshot", sa.Text, nullable=True),  # JSON of the last JobSnapshot
    sa.Column("cost_usd", sa.Float, nullable=True),
    sa.Column("attempt", sa.Integer, nullable=False, server_default="1"),
    sa.Column("demo", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("started_at", sa.BigInteger, nullable=True),
    sa.Column("finished_at", sa.BigInteger, nullable=True),
    # "job" (run here by a worker) or "session" (a Claude Code session that
    # reports through hooks); source and host say where a session runs.
    sa.Column("kind", sa.String(20), nullable=False, server_default="job"),
    sa.Column("source", sa.String(20), nullable=True),
    sa.Column("host", sa.String(200), nullable=True),
    sa.Index("ix_jobs_team_created", "team_id", "created_at"),
    sa.Index("ix_jobs_team_status", "team_id", "status"),
)

comments = sa.Table(
    "comments",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.id"), nullable=False),
    sa.Column("room_id", sa.String(80), nullable=False),
    sa.Column("team_id", sa.String(36), nullable=False),
    sa.Column("user_id", sa.String(36), nullable=False),
    sa.Column("user_name", sa.String(100), nullable=False),
    sa.Column("request_id", sa.String(100), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    # The stream entry id, set once the comment is appended to the job stream.
    sa.Column("event_id", sa.String(41), nullable=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("room_id", "user_id", "request_id", name="uq_comments_idempotency"),
    sa.Index("ix_comments_room", "room_id", "id"),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("team_id", sa.String(36), nullable=True),
    sa.Column("actor", sa.String(100), nullable=True),
    sa.Column("action", sa.String(50), nullable=False),
    sa.Column("room_id", sa.String(80), nullable=True),
    sa.Column("detail", sa.Text, nullable=False, server_default="{}"),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    # The audit key the hash is keyed with (HMAC-SHA256); NULL: a legacy
    # SHA-256 record written before keyed records (migration 3).
    sa.Column("key_id", sa.String(32), nullable=True),
    sa.Index("ix_audit_team", "team_id", "id"),
    # The comments read path finds a page's comment.create records by room.
    sa.Index("ix_audit_room", "room_id", "created_at"),
)

#: One row per audit chain (a team's id, or "system" for records without a
#: team): the lock that serializes appends to the chain and the anchor that
#: lets ``audit verify`` notice a deleted tail (count and hash of the last record).
audit_heads = sa.Table(
    "audit_heads",
    metadata,
    sa.Column("chain", sa.String(36), primary_key=True),
    sa.Column("count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("last_id", sa.BigInteger, nullable=True),
    sa.Column("last_hash", sa.String(64), nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
)

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", sa.BigInteger, nullable=False),
)
