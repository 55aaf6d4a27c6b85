"""The contract modules: Redis keys are a deployed layout, ids have one shape, errors one tree."""

from __future__ import annotations

import inspect

import pytest

from progress_service import errors, ids, keys


def test_redis_keys_are_byte_identical_to_the_deployed_layout() -> None:
    # Changing one of these orphans data in a running Redis: a failing line
    # here needs a migration, not a new expected value.
    assert keys.events_key("j1") == "ps:{job:j1}:events"
    assert keys.snapshot_key("j1") == "ps:{job:j1}:snap"
    assert keys.presence_key("j1") == "ps:{job:j1}:presence"
    assert keys.presence_stream_key("j1") == "ps:{job:j1}:presence-log"
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
    assert keys.wake_key("n1") == "ps:gw:n1:wake"
    assert keys.hook_sessions_key("t1", 7) == "ps:hooksessions:t1:7"
    assert (keys.QUEUE_NAME, keys.REVOCATIONS_KEY, keys.AUDIT_WITNESS_STREAM) == (
        "ps:queue", "ps:revocations", "ps:audit:witness",
    )


def test_every_per_job_key_shares_the_jobs_hash_tag() -> None:
    per_job = [f for name, f in inspect.getmembers(keys, inspect.isfunction)
               if list(inspect.signature(f).parameters) == ["job_id"]]
    assert len(per_job) == 13
    for key_of in per_job:
        assert key_of("abc").startswith("ps:{job:abc}:"), key_of


def test_the_keys_module_docstring_lists_every_key() -> None:
    doc = keys.__doc__ or ""
    for key in (keys.events_key("<id>"), keys.hook_owner_key("<id>"), keys.QUEUE_NAME, keys.REVOCATIONS_KEY):
        assert key in doc, key


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
