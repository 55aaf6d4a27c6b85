"""A scripted Anthropic Messages API on loopback, for running the real Claude Code CLI.

The CLI is pointed at it with ``ANTHROPIC_BASE_URL``. It answers what the
CLI asks for (``HEAD /api/hello``, ``HEAD /``, ``POST /v1/messages`` with
``stream: true``, ``POST /v1/messages/count_tokens``) and streams the public
API's server-sent events: ``message_start`` (with usage),
``content_block_start`` / ``content_block_delta`` (``text_delta``,
``input_json_delta``) / ``content_block_stop``, ``ping``, ``message_delta``
(stop reason and usage) and ``message_stop``.

What the model "says" is a :class:`Script` chosen by a marker in the
conversation's first user message (``[script:NAME]``) and advanced by
counting the ``tool_result`` blocks of the request: the CLI re-sends the
whole conversation each time, so the count says which turn is next. A
subagent's conversation starts with the Agent tool's ``prompt``, so a marker
there picks the subagent's own script. Requests without ``tools`` are the
CLI's auxiliary calls (titles, summaries) and get a short text answer.

Every request is recorded (:attr:`ModelServer.requests`) so tests can check
what the CLI sent. The server runs in a thread of its own (stdlib
``ThreadingHTTPServer``), so it works beside any event loop; it depends on
nothing in ``progress_service``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: In ``Reply.errors``: close the connection without answering (a network failure).
DROP = 0

MARKER_RE = re.compile(r"\[script:([A-Za-z0-9_.#-]+)\]")

#: The API's error bodies per status (type, message), as the real API sends them.
ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "prompt is too long: 250000 tokens > 200000 maximum"),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "Not found"),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit"),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}


# --------------------------------------------------------------------------
# Scripts
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Text:
    """A text block; streamed as a few ``text_delta`` chunks."""

    text: str


@dataclass(frozen=True)
class ToolUse:
    """A ``tool_use`` block; its input is streamed as ``input_json_delta`` chunks."""

    name: str
    input: dict[str, Any]
    id: str | None = None


Block = Text | ToolUse


@dataclass(frozen=True)
class Reply:
    """One turn of the model: an API response, possibly after errors or a stall.

    ``errors``: HTTP statuses answered (in order) to the first requests of
    this turn before the reply is given (:data:`DROP`: the connection is
    closed unanswered); ``retry_after`` is sent with them
    (seconds, may be fractional: also as ``retry-after-ms``).
    ``stall``: seconds to stall after ``message_start`` (sending only
    ``ping`` events), or until :meth:`ModelServer.release` is called.
    ``delay``: seconds before the response starts. ``chunk_delay``: seconds
    between streamed deltas.
    """

    blocks: tuple[Block, ...]
    errors: tuple[int, ...] = ()
    retry_after: float | None = None
    stall: float = 0.0
    delay: float = 0.0
    chunk_delay: float = 0.01
    input_tokens: int | None = None
    output_tokens: int | None = None

    @property
    def tool_uses(self) -> int:
        return sum(1 for b in self.blocks if isinstance(b, ToolUse))

    @property
    def stop_reason(self) -> str:
        return "tool_use" if self.tool_uses else "end_turn"


def reply(*blocks: Block | str, **kwargs: Any) -> Reply:
    """``reply("text", ToolUse(...), errors=(529,))``: a :class:`Reply`; strings are text blocks."""
    return Reply(blocks=tuple(Text(b) if isinstance(b, str) else b for b in blocks), **kwargs)


@dataclass(frozen=True)
class Script:
    """The turns of one conversation; after the last one the model says ``final``."""

    turns: Sequence[Reply]
    final: str = "Done."
    #: keyword -> the script the conversation follows once a user text block
    #: holding the keyword appears (an instruction sent while the CLI runs);
    #: its turns are counted by the tool results after that block.
    branches: dict[str, Script] = field(default_factory=dict)

    def turn_for(self, tool_results: int) -> tuple[int, Reply]:
        """The turn answering a conversation that already holds ``tool_results`` results."""
        seen = 0
        for index, turn in enumerate(self.turns):
            if seen >= tool_results:
                return index, turn
            seen += turn.tool_uses
        return len(self.turns), reply(self.final)


# --------------------------------------------------------------------------
# Recorded requests
# --------------------------------------------------------------------------


@dataclass
class Recorded:
    """One request the server got."""

    method: str
    path: str
    at: float
    body: Any = None
    script: str | None = None
    turn: int | None = None
    status: int = 200
    tools: list[str] = field(default_factory=list)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_text_of(b.get("text", "")) for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def script_marker(body: dict[str, Any]) -> str | None:
    """The script name marked in the first user message, if any."""
    for message in body.get("messages") or []:
        if isinstance(message, dict) and message.get("role") == "user":
            found = MARKER_RE.search(_text_of(message.get("content")))
            return found.group(1) if found else None
    return None


def results_after(body: dict[str, Any], keyword: str) -> int | None:
    """Tool results after the first user text block (past the prompt) holding ``keyword``; None without one."""
    found, n = False, 0
    for index, message in enumerate(body.get("messages") or []):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        for block in blocks:
            if not isinstance(block, dict):
                continue
            if found and block.get("type") == "tool_result":
                n += 1
            elif not found and index > 0 and block.get("type") == "text" and keyword in _text_of(block.get("text")):
                found = True
    return n if found else None


def count_tool_results(body: dict[str, Any]) -> int:
    """How many ``tool_result`` blocks the conversation holds."""
    n = 0
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            n += sum(1 for b in content if isinstance(b, dict) and b.get("type") == "tool_result")
    return n


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------


class _Gone(Exception):
    """The client closed the connection mid-stream."""


class ModelServer:
    """``with ModelServer() as server: server.script("x", [...]); server.url``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._scripts: dict[str, Script] = {}
        self._attempts: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._ids = itertools.count(1)
        self.requests: list[Recorded] = []
        self.default_text = "OK."
        self._httpd = ThreadingHTTPServer((host, port), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="model-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ModelServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._released.set()  # ends stalls, so handler threads finish
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scripting -----------------------------------------------------------

    def script(
        self, name: str, turns: Sequence[Reply], final: str = "Done.", branches: dict[str, Script] | None = None
    ) -> str:
        """Register a script; returns the marker to put in a prompt.

        ``branches``: keyword -> the script followed once an instruction
        holding the keyword reached the conversation.
        """
        with self._lock:
            self._scripts[name] = Script(turns=list(turns), final=final, branches=dict(branches or {}))
        return f"[script:{name}]"

    def release(self) -> None:
        """End every stall now (and make later stalls end at once)."""
        self._released.set()

    def new_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids):06d}{int(time.time() * 1000) % 10**8:08d}"

    def messages_for(self, script: str) -> list[Recorded]:
        """The ``/v1/messages`` requests of one script, in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.path.startswith("/v1/messages") and r.script == script]

    def _record(self, rec: Recorded) -> None:
        with self._lock:
            self.requests.append(rec)

    def _plan(self, body: dict[str, Any]) -> tuple[str | None, int | None, Reply | int]:
        """What to answer a messages request: (script, turn, reply or error status)."""
        if not body.get("tools"):
            return None, None, reply(self.default_text, chunk_delay=0)
        name = script_marker(body)
        with self._lock:
            script = self._scripts.get(name or "")
        if script is None:
            return name, None, reply(self.default_text)
        index, turn = script.turn_for(count_tool_results(body))
        for keyword, branch in script.branches.items():
            after = results_after(body, keyword)
            if after is not None:
                name = f"{name}#{keyword}"
                script = branch
                index, turn = branch.turn_for(after)
                break
        with self._lock:
            key = (name or "", index)  # the script looked up above
            attempt = self._attempts.get(key, 0)
            self._attempts[key] = attempt + 1
        if attempt < len(turn.errors):
            return name, index, turn.errors[attempt]
        return name, index, turn

    # -- SSE -----------------------------------------------------------------

    def events(self, turn: Reply, model: str, input_tokens: int) -> Iterator[tuple[str, dict[str, Any]] | float]:
        """The SSE events of one reply; a float item means "sleep this long"."""
        msg_id = self.new_id("msg")
        out_tokens = turn.output_tokens or max(
            1,
            sum(len(b.text) // 4 if isinstance(b, Text) else 10 + len(json.dumps(b.input)) // 4 for b in turn.blocks),
        )
        usage = {
            "input_tokens": input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 1,
            "service_tier": "standard",
        }
        yield "message_start", {
            "type": "message_start",
            "message": {
                "id": msg_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": usage,
            },
        }
        yield "ping", {"type": "ping"}
        if turn.stall:
            yield -float(turn.stall)  # negative: a stall that release() can end
        for index, block in enumerate(turn.blocks):
            if isinstance(block, Text):
                yield "content_block_start", {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {"type": "text", "text": ""},
                }
                for chunk in _chunks(block.text, 3):
                    yield float(turn.chunk_delay)
                    yield "content_block_delta", {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "text_delta", "text": chunk},
                    }
            else:
                yield "content_block_start", {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {
                        "type": "tool_use",
                        "id": block.id or self.new_id("toolu"),
                        "name": block.name,
                        "input": {},
                    },
                }
                for chunk in _chunks(json.dumps(block.input), 2):
                    yield float(turn.chunk_delay)
                    yield "content_block_delta", {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": chunk},
                    }
            yield "content_block_stop", {"type": "content_block_stop", "index": index}
        yield "message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": turn.stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": out_tokens},
        }
        yield "message_stop", {"type": "message_stop"}


def _chunks(text: str, parts: int) -> list[str]:
    if not text:
        return [""]
    size = max(1, -(-len(text) // parts))
    return [text[i : i + size] for i in range(0, len(text), size)]


def _handler_for(server: ModelServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass

        # -- plain answers -----------------------------------------------

        def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.send_header("request-id", server.new_id("req"))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, status: int, retry_after: float | None = None) -> None:
            kind, message = ERRORS.get(status, ("api_error", f"HTTP {status}"))
            headers: dict[str, str] = {}
            if retry_after is not None:
                headers["retry-after"] = str(max(0, round(retry_after)))
                headers["retry-after-ms"] = str(int(retry_after * 1000))
            if status in (429, 529, 500):
                headers["x-should-retry"] = "true"
            self._json(status, {"type": "error", "error": {"type": kind, "message": message}}, headers)

        def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
            server._record(Recorded(method="HEAD", path=self.path, at=time.time()))
            self._json(200, {})

        def do_GET(self) -> None:  # noqa: N802
            server._record(Recorded(method="GET", path=self.path, at=time.time()))
            self._json(200, {})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                body = None
            path = self.path.split("?", 1)[0]
            rec = Recorded(method="POST", path=self.path, at=time.time(), body=body)
            if not isinstance(body, dict):
                rec.status = 400
                server._record(rec)
                self._json(400, {"type": "error", "error": {"type": "invalid_request_error", "message": "bad JSON"}})
                return
            rec.tools = [t.get("name", "") for t in body.get("tools") or [] if isinstance(t, dict)]
            if path == "/v1/messages/count_tokens":
                server._record(rec)
                self._json(200, {"input_tokens": max(1, len(raw) // 4)})
                return
            if path != "/v1/messages":
                rec.status = 404
                server._record(rec)
                self._error(404)
                return
            script, turn_index, plan = server._plan(body)
            rec.script, rec.turn = script, turn_index
            if plan == DROP:
                # "No network": the connection closes without an answer.
                rec.status = DROP
                server._record(rec)
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            if isinstance(plan, int):
                rec.status = plan
                server._record(rec)
                turn = server._scripts.get(script or "")
                retry_after = turn.turns[turn_index].retry_after if turn and turn_index is not None else None
                self._error(plan, retry_after)
                return
            server._record(rec)
            if plan.delay:
                time.sleep(plan.delay)
            model = str(body.get("model") or "claude-sonnet-4-5")
            input_tokens = plan.input_tokens or max(1, len(raw) // 40)
            if body.get("stream"):
                self._stream(plan, model, input_tokens)
            else:
                self._whole(plan, model, input_tokens)

        # -- messages ------------------------------------------------------

        def _whole(self, turn: Reply, model: str, input_tokens: int) -> None:
            """A non-streaming answer: the same message as one JSON body."""
            message: dict[str, Any] = {}
            blocks: list[dict[str, Any]] = []
            partial: dict[int, str] = {}
            for item in server.events(turn, model, input_tokens):
                if isinstance(item, float):
                    continue
                name, data = item
                if name == "message_start":
                    message = data["message"]
                elif name == "content_block_start":
                    blocks.append(dict(data["content_block"]))
                elif name == "content_block_delta":
                    delta = data["delta"]
                    if delta["type"] == "text_delta":
                        blocks[data["index"]]["text"] += delta["text"]
                    else:
                        partial[data["index"]] = partial.get(data["index"], "") + delta["partial_json"]
                elif name == "message_delta":
                    message["stop_reason"] = data["delta"]["stop_reason"]
                    message["usage"]["output_tokens"] = data["usage"]["output_tokens"]
            for index, text in partial.items():
                blocks[index]["input"] = json.loads(text)
            message["content"] = blocks
            self._json(200, message)

        def _chunk(self, data: bytes) -> None:
            try:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            except OSError as exc:
                raise _Gone from exc

        def _stream(self, turn: Reply, model: str, input_tokens: int) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/event-stream; charset=utf-8")
            self.send_header("cache-control", "no-cache")
            self.send_header("transfer-encoding", "chunked")
            self.send_header("request-id", server.new_id("req"))
            self.end_headers()
            try:
                for item in server.events(turn, model, input_tokens):
                    if isinstance(item, float):
                        if item < 0:
                            self._stall(-item)
                        elif item:
                            time.sleep(item)
                        continue
                    name, data = item
                    self._chunk(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
                self._chunk(b"")
            except _Gone:
                self.close_connection = True

        def _stall(self, seconds: float) -> None:
            """Send only pings for ``seconds`` (or until released); notice a gone client."""
            deadline = time.monotonic() + seconds
            while not server._released.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                server._released.wait(min(left, 0.5))
                self._chunk(b'event: ping\ndata: {"type": "ping"}\n\n')

    return Handler
