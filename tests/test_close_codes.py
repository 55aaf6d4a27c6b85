"""The clients' close-code tables agree with progress_service/closes.py.

The browser's tables (web/js/socket.js) are read from the file and compared
with :data:`closes.POLICIES`; the terminal client is driven against a real
WebSocket server that closes with each code, and what it does (stop, retry,
retry after a long backoff) must be the code's policy.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import anyio
import pytest
from websockets.asyncio.server import ServerConnection, serve

from progress_service import closes
from progress_service.closes import Reconnect
from progress_service.embedded_redis import free_port
from progress_service.errors import FollowError
from progress_service.events import ChatMsg, EventMsg, JobSnapshot
from progress_service.terminal.api import JobsApi
from progress_service.terminal.backoff import Backoff
from progress_service.terminal.client import ConnState, JobFollower

ROOT = Path(__file__).resolve().parent.parent
SOCKET_JS = (ROOT / "web" / "js" / "socket.js").read_text()


def _js_codes(name: str) -> set[int]:
    """The numbers in the JS constant ``name`` (a Map's keys or a Set's members)."""
    match = re.search(rf"const {name} = new (Map|Set)\(\[(.*?)\]\);", SOCKET_JS, re.S)
    assert match, f"{name} not found in web/js/socket.js"
    body = match.group(2)
    if match.group(1) == "Map":
        return {int(code) for code in re.findall(r"\[\s*(\d{4})\s*,", body)}
    return {int(code) for code in re.findall(r"\d{4}", body)}


def _codes(reconnect: Reconnect) -> set[int]:
    return {code for code, p in closes.POLICIES.items() if p.reconnect is reconnect}


def test_browser_stop_codes_are_the_policy() -> None:
    assert _js_codes("STOP_CODES") == _codes(Reconnect.STOP)


def test_browser_long_backoff_codes_are_the_policy() -> None:
    assert _js_codes("LONG_BACKOFF_CODES") == _codes(Reconnect.LONG_BACKOFF)


def test_every_close_the_gateway_sends_has_a_policy_and_fits_a_frame() -> None:
    for close in closes.ALL:
        assert close.code in closes.POLICIES, close
        assert len(close.reason.encode()) <= closes.MAX_REASON_BYTES, close
        assert not close.policy.by_library, close


class _Sink:
    def snapshot(self, snapshot: JobSnapshot, *, reason: Literal["joined", "gap"]) -> None:
        pass

    def event(self, msg: EventMsg) -> None:
        pass

    def chat(self, msg: ChatMsg) -> None:
        pass

    def presence(self, joined: list[str], left: list[str]) -> None:
        pass

    def connection(self, state: ConnState, detail: str = "") -> None:
        pass

    def notice(self, text: str) -> None:
        pass


class _RecordingBackoff(Backoff):
    """A real backoff without the waiting, remembering which delay each retry asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def next_delay(self) -> float:
        self.asked.append("backoff")
        return 0.0

    def long_delay(self) -> float:
        self.asked.append("long_backoff")
        return 0.0


async def _terminal_reaction(code: int) -> str:
    """What the terminal client does when the server closes its first connection with ``code``.

    The second connection is closed 1000 ``bye`` (a stop), so a client that
    retries ends too; the answer is "stop" or the backoff the retry asked for.
    """
    connections = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        await ws.recv()  # the auth frame
        await ws.close(code if connections == 1 else 1000, "test close" if connections == 1 else "bye")

    port = free_port()
    backoff = _RecordingBackoff()
    async with serve(handler, "127.0.0.1", port):
        api = JobsApi(f"http://127.0.0.1:{port}", "ps_test")
        try:
            follower = JobFollower(
                api=api, base_url=f"http://127.0.0.1:{port}", token="ps_test", job_id="j1", sink=_Sink(), backoff=backoff
            )
            with anyio.fail_after(20):
                with pytest.raises(FollowError):
                    await follower.run()
        finally:
            await api.aclose()
    if connections == 1:
        assert backoff.asked == []
        return "stop"
    assert len(backoff.asked) == 1, backoff.asked
    return backoff.asked[0]


# 4000 stands for the unlisted codes (1005/1006/1015 cannot travel in a frame).
@pytest.mark.parametrize("code", [*sorted(closes.POLICIES), 4000])
async def test_terminal_follows_the_policy(code: int) -> None:
    assert await _terminal_reaction(code) == closes.policy_of(code).reconnect.value
