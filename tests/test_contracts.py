"""The contract modules: Redis keys are a deployed layout, ids have one shape, errors one tree."""

from __future__ import annotations

import inspect
import uuid
from typing import Any

import anyio
import pytest

from progress_service import errors, ids, keys, streams
from progress_service.gateway.presence import Presence
from progress_service.store.identity import Principal


def test_redis_keys_are_byte_identical_to_the_deployed_layout() -> None:
    # Changing one of these orphans data in a running Redis: a failing line
    # here needs a migration, not a new expected value.
    assert keys.events_key("j1") == "ps:{job:j1}:events"
    assert keys.snapshot_key("j1") == "ps:{job:j1}:snap"
    assert keys.presence_key("j1") == "ps:{job:j1}:presence"
    assert keys.presence_stream_key("j1") == "ps:{job:j1}:presence-log"
    assert keys.presence_index_key("j1") == "ps:{job:j1}:presence-idx"
    assert keys.news_channel("j1") == "ps:{job:j1}:news"
    assert keys.cancel_key("j1") == "ps:{job:j1}:cancel"
    assert keys.run_key("j1") == "ps:{job:j1}:run"
    assert keys.lease_key("j1") == "ps:{job:j1}:lease"
    assert keys.inbox_key("j1") == "ps:{job:j1}:inbox"
    assert keys.steer_key("j1") == "ps:{job:j1}:steer"
    assert keys.published_key("j1") == "ps:{job:j1}:chats"
    assert keys.hook_state_key("j1") == "ps:{job:j1}:hookstate"
    assert keys.hook_lock_key("j1") == "ps:{job:j1}:hooklock"
    assert keys.hook_owner_key("j1") == "ps:{job:j1}:owner"
    assert keys.ticket_key("abc") == "ps:ticket:abc"
    assert keys.web_session_key("s") == "websession:043a718774c572bd8a25adbeb1bfcd5c0256ae11cecf9f9c3f925d0e52beaf89"
    assert keys.hook_sessions_key("t1", 7) == "ps:hooksessions:t1:7"
    assert keys.connections_key("u1") == "ps:{user:u1}:conns"
    assert keys.rate_limit_key("ps:queue", "user:u1") == "ps:ratelimit:{ps:queue:user:u1}"
    assert (keys.QUEUE_NAME, keys.REVOCATIONS_KEY, keys.AUDIT_WITNESS_STREAM) == (
        "ps:queue", "ps:revocations", "ps:audit:witness",
    )


def test_every_per_job_key_shares_the_jobs_hash_tag() -> None:
    per_job = [f for name, f in inspect.getmembers(keys, inspect.isfunction)
               if list(inspect.signature(f).parameters) == ["job_id"]]
    assert len(per_job) == 15
    for key_of in per_job:
        assert key_of("abc").startswith("ps:{job:abc}:"), key_of


def test_the_keys_module_docstring_lists_every_key() -> None:
    doc = keys.__doc__ or ""
    listed = (
        keys.events_key("<id>"), keys.presence_index_key("<id>"), keys.news_channel("<id>"), keys.hook_owner_key("<id>"),
        keys.QUEUE_NAME, keys.REVOCATIONS_KEY, keys.connections_key("<id>"),
    )
    for key in listed:
        assert key in doc, key


async def test_the_scripts_derive_the_keys_of_keys_py(redis: Any) -> None:
    """Keys the Lua scripts build from their KEYS (news channel, presence index) are the ones keys.py names."""
    job = f"contracts-{uuid.uuid4().hex[:12]}"
    conn = await redis.connection_pool.get_connection("SSUBSCRIBE")
    try:
        # A write to either of the room's streams notifies keys.news_channel.
        await conn.send_command("SSUBSCRIBE", keys.news_channel(job))
        assert (await conn.read_response())[0] == b"ssubscribe"
        for stream in (keys.events_key(job), keys.presence_stream_key(job)):
            await redis.eval(streams.NOTIFY, 1, stream)
            with anyio.fail_after(5):
                assert await conn.read_response() == [b"smessage", keys.news_channel(job).encode(), b""]
    finally:
        await conn.disconnect()
        await redis.connection_pool.release(conn)
    # A join fills the presence set and its lex index.
    presence = Presence(redis, "contracts", grace=1.0)
    await presence.load_scripts()
    who = Principal(user_id="u1", user_name="U", team_id="t", team_name="t", role="viewer", token_id="k")
    try:
        presence.start_batch()
        async with redis.pipeline(transaction=True) as pipe:
            entry = presence.queue_join(pipe, job, "c1", who)
            await pipe.execute()
        assert await redis.zscore(keys.presence_index_key(job), entry) == 0
        assert await redis.zscore(keys.presence_key(job), entry) is not None
        assert await redis.xlen(keys.presence_stream_key(job)) == 1
    finally:
        await redis.delete(keys.presence_key(job), keys.presence_index_key(job), keys.presence_stream_key(job))


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("1700000000000-0", True),
        ("0-0", True),
        ("9999999999999999999-9999999999999999999", True),  # 19 digits: fits a 64-bit part
        ("99999999999999999999-0", False),  # 20 digits: may not fit, Redis refuses some
        ("1-0\n", False),  # ``$`` would have let the newline through
        ("1-", False),
        ("-1", False),
        ("1", False),
        ("1-0-0", False),
        ("١-٠", False),  # non-ASCII digits
    ],
)
def test_one_event_id_shape(value: str, ok: bool) -> None:
    assert ids.is_event_id(value) is ok


def test_job_and_room_ids() -> None:
    assert ids.is_job_id("a" * 64) and not ids.is_job_id("a" * 65) and not ids.is_job_id("a\n")
    assert ids.is_room_id(ids.room_id("j-1_x")) and ids.job_id_of("job:j-1_x") == "j-1_x"
    assert not ids.is_room_id("job:") and not ids.is_room_id("room:j1")


def test_every_exception_hangs_off_one_base() -> None:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, BaseException)]
    assert len(classes) >= 10
    for cls in classes:
        assert issubclass(cls, errors.ProgressServiceError), cls
        assert cls.__name__ in (errors.__doc__ or ""), f"{cls.__name__} missing from the tree in the docstring"
    # Input errors stay ValueErrors for callers that catch those.
    assert issubclass(errors.InvalidComment, ValueError) and issubclass(errors.WorkdirError, ValueError)
