// The page's one WebSocket client: reconnects, resumes and deduplicates.
//
// It implements the client side of docs/protocol.md:
// - a fresh single-use ticket (POST /api/ws-tickets) for every connect and
//   for every credential refresh; no secret ever goes into a URL;
// - reconnect with exponential backoff and full jitter (base 500 ms, cap
//   20 s, but 1.5 s while the tab is visible, so a restarted server has its
//   watchers back within 2 s); `online` and the tab becoming visible retry at
//   once; the attempt counter resets only after 10 s of stable connection;
// - stop (and say why) on 4403 / 1003 / 1009 / 1000; 4401 fetches a fresh
//   ticket and reconnects; 1008 and 4429 wait a long backoff;
// - rejoin every room with the last event id seen, drop any room item whose
//   id is not greater than that, and ignore room items until `joined`
//   (those belong to a membership that is gone);
// - a heartbeat watchdog: 2 x heartbeatMs without any frame means the
//   connection is dead, even if the browser has not noticed;
// - comments stay pending until acked and are re-sent with the same
//   requestId after a reconnect (the server makes that idempotent).
//
// Views talk to it through `subscribe(roomId, listener)` and `sendChat`; the
// connection indicator listens to its `state` events.

export const BACKOFF_BASE_MS = 500;
export const BACKOFF_CAP_MS = 20_000;
/** The cap while someone is looking at the page. */
export const VISIBLE_CAP_MS = 1_500;
export const STABLE_AFTER_MS = 10_000;
/** Before auth_ok there is no heartbeatMs yet: give the handshake this long. */
const HANDSHAKE_TIMEOUT_MS = 10_000;
/** A comment (or instruction) refused with `unavailable` / `rate_limited` / `timeout` is retried after this. */
const CHAT_RETRY_MS = 2_000;
/** Milliseconds of message handling per task before yielding to the page. */
const DRAIN_BUDGET_MS = 8;

// The close-code policy is progress_service/closes.py's; tests/test_close_codes.py
// fails when these two tables disagree with it.
/** Close codes after which retrying cannot help: the user must act. */
const STOP_CODES = new Map([
  [1000, "The server ended the connection."],
  [1002, "The connection broke the WebSocket protocol (1002). Reload the page."],
  [1003, "The server refused a message from this page (1003). Reload the page."],
  [1007, "The server refused a message from this page as invalid text (1007). Reload the page."],
  [1009, "The server refused a message from this page as too large (1009). Reload the page."],
  [4403, "The server refused your sign-in (auth failed). Sign in again."],
]);
/** Close codes that ask for a long backoff before the next try. */
const LONG_BACKOFF_CODES = new Set([1008, 4429]);

/** Delay before reconnect attempt number `attempt` (0-based): full jitter. */
export function backoffDelay(attempt, random = Math.random, cap = BACKOFF_CAP_MS) {
  return random() * Math.min(cap, BACKOFF_BASE_MS * 2 ** Math.min(attempt, 30));
}

function visibleNow() {
  return typeof document === "undefined" || document.visibilityState === "visible";
}

/** Compare two event ids ("<ms>-<seq>"): negative, zero or positive. */
export function compareIds(a, b) {
  const [am, as = "0"] = a.split("-");
  const [bm, bs = "0"] = b.split("-");
  // Lengths first: ids are decimal without leading zeros, so this is exact
  // even beyond Number's 53 bits.
  if (am.length !== bm.length) return am.length - bm.length;
  if (am !== bm) return am < bm ? -1 : 1;
  if (as.length !== bs.length) return as.length - bs.length;
  return as === bs ? 0 : as < bs ? -1 : 1;
}

/** A random request id for a comment (works in insecure contexts too). */
export function newRequestId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Thrown by a ticket source when the user's credentials were refused. */
export class SignedOutError extends Error {}

/**
 * @typedef {{status: "idle"|"connecting"|"live"|"reconnecting"|"offline",
 *            retryAt: number|null, reason: string|null, signedOut: boolean}} ConnectionState
 */

export class RealtimeClient extends EventTarget {
  /**
   * @param {{url: string, fetchTicket: () => Promise<string>, clientName?: string}} options
   *   `fetchTicket` resolves to a fresh ticket, throws SignedOutError when the
   *   credentials are refused, and any other error when the server is unreachable.
   */
  constructor({ url, fetchTicket, clientName = "web/1" }) {
    super();
    this.url = url;
    this.fetchTicket = fetchTicket;
    this.clientName = clientName;
    /** @type {ConnectionState} */
    this.state = { status: "idle", retryAt: null, reason: null, signedOut: false };
    this.userId = null;
    this.heartbeatMs = 25_000;
    /** roomId -> {listeners:Set, lastId:string|null, status:"joining"|"joined", role:string|null} */
    this.rooms = new Map();
    /** requestId -> {roomId, text, resolve, reject, sent:boolean} */
    this.pending = new Map();
    this.attempt = 0;
    this.everLive = false;
    this.ws = null;
    this.authed = false;
    this.generation = 0;
    this.timers = { retry: null, stable: null, watchdog: null, refresh: null, chat: null };
    /** Messages received and not yet handled (see `_drain`). */
    this.inbox = [];
    this.inboxHead = 0;
    this.draining = false;
    this._onOnline = () => {
      if (this.state.status === "reconnecting" && this.state.retryAt !== null) this.retryNow();
    };
    // Back to a tab that waited out a long (hidden-tab) backoff: try now.
    this._onVisible = () => {
      if (visibleNow()) this._onOnline();
    };
  }

  // ------------------------------------------------------------------ public

  /** Connect (once); later disconnects reconnect on their own. */
  start() {
    if (this.state.status !== "idle") return;
    window.addEventListener("online", this._onOnline);
    document.addEventListener("visibilitychange", this._onVisible);
    this._connect();
  }

  /** Close for good (sign-out, page teardown). */
  stop(reason = null) {
    window.removeEventListener("online", this._onOnline);
    document.removeEventListener("visibilitychange", this._onVisible);
    this._teardownSocket(1000, "bye");
    this._clearTimer("retry");
    this._clearTimer("chat");
    this._setState({ status: reason ? "offline" : "idle", retryAt: null, reason });
  }

  /** Skip the rest of a backoff wait, or try again after a stop. */
  retryNow() {
    if (this.state.signedOut) return;
    if (this.state.status === "live" || (this.state.status === "connecting" && this.ws)) return;
    this._clearTimer("retry");
    window.addEventListener("online", this._onOnline);
    document.addEventListener("visibilitychange", this._onVisible);
    this._connect();
  }

  /**
   * Watch a room. `listener(msg)` receives that room's `joined`, `gap`,
   * `event`, `chat`, `presence` and `error` messages, deduplicated and in
   * order. `since` starts after a known event id (e.g. a list's snapshot).
   * Returns a function that stops watching (and leaves the room).
   */
  subscribe(roomId, listener, { since = null } = {}) {
    let room = this.rooms.get(roomId);
    if (!room) {
      room = { listeners: new Set(), lastId: since, status: "joining", role: null };
      this.rooms.set(roomId, room);
      this._sendJoin(roomId, room);
    }
    room.listeners.add(listener);
    return () => {
      const current = this.rooms.get(roomId);
      if (current !== room) return;
      room.listeners.delete(listener);
      if (room.listeners.size === 0) {
        this.rooms.delete(roomId);
        this._send({ type: "leave", roomId });
        for (const [requestId, p] of this.pending) {
          if (p.roomId === roomId) {
            this.pending.delete(requestId);
            p.reject(new Error("left the room"));
          }
        }
      }
    };
  }

  /** The role this user has in a joined room (from `joined`), or null. */
  roleIn(roomId) {
    return this.rooms.get(roomId)?.role ?? null;
  }

  /**
   * Post a comment. Returns {requestId, done}; `done` resolves with the
   * comment's event id once the server acked it (stored durably). Until then
   * it is re-sent with the same requestId after every reconnect.
   */
  sendChat(roomId, text, requestId = newRequestId()) {
    return this._request(roomId, { type: "chat", text }, requestId);
  }

  /**
   * An instruction for the job's running Claude Code (`steer`); `done`
   * resolves with the event id once the CLI took it, rejects with the code.
   */
  sendSteer(roomId, text, requestId = newRequestId()) {
    return this._request(roomId, { type: "steer", text }, requestId);
  }

  /** An answer to a pending permission prompt (`decide`); the first answer wins. */
  sendDecide(roomId, permissionId, allow, message = null, requestId = newRequestId()) {
    const body = { type: "decide", permissionId, allow };
    if (message) body.message = message;
    return this._request(roomId, body, requestId);
  }

  _request(roomId, body, requestId) {
    let resolve, reject;
    const done = new Promise((res, rej) => {
      resolve = res;
      reject = rej;
    });
    // Callers may not await `done` (e.g. fire and forget from a view that
    // went away); a rejection must not surface as an unhandled error.
    done.catch(() => {});
    this.pending.set(requestId, { roomId, body, text: body.text, resolve, reject, sent: false });
    this._flushChats(roomId);
    return { requestId, done };
  }

  // ------------------------------------------------------------ connection

  async _connect() {
    const gen = ++this.generation;
    this._teardownSocket(1000, "bye");
    const reconnecting = this.everLive || this.attempt > 0;
    this._setState({ status: reconnecting ? "reconnecting" : "connecting", retryAt: null, reason: null });
    let ticket;
    try {
      ticket = await this.fetchTicket();
    } catch (err) {
      if (gen !== this.generation) return;
      if (err instanceof SignedOutError) {
        this._stopWith(err.message || "Your token was refused. Sign in again.", { signedOut: true });
      } else {
        this._scheduleReconnect("The server cannot be reached.");
      }
      return;
    }
    if (gen !== this.generation) return;
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (err) {
      this._scheduleReconnect(`Cannot open a WebSocket: ${err.message}`);
      return;
    }
    this.ws = ws;
    this.authed = false;
    this._armWatchdog(HANDSHAKE_TIMEOUT_MS);
    ws.onopen = () => {
      if (this.ws !== ws) return;
      ws.send(JSON.stringify({ type: "auth", token: ticket, batch: true, client: this.clientName }));
    };
    ws.onmessage = (e) => {
      if (this.ws !== ws) return;
      this._onFrame(e.data);
    };
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this._onClose(e.code, e.reason);
    };
    // An error is always followed by a close event; nothing to do here.
    ws.onerror = () => {};
  }

  _onClose(code, reason) {
    this._dropSocket();
    const stopMessage =
      code === 4403 && reason === "token revoked"
        ? "Your sign-in was revoked (4403 token revoked). Sign in again."
        : STOP_CODES.get(code);
    if (stopMessage) {
      this._stopWith(stopMessage, { signedOut: code === 4403 });
      return;
    }
    const why = reason ? `Connection closed: ${reason} (${code}).` : `Connection lost (${code}).`;
    this._scheduleReconnect(why, LONG_BACKOFF_CODES.has(code) ? BACKOFF_CAP_MS / 2 : 0);
  }

  _scheduleReconnect(reason, minDelay = 0) {
    this._clearTimer("retry");
    const delay = Math.max(minDelay, backoffDelay(this.attempt, Math.random, visibleNow() ? VISIBLE_CAP_MS : BACKOFF_CAP_MS));
    this.attempt += 1;
    const retryAt = Date.now() + delay;
    this._setState({ status: "reconnecting", retryAt, reason });
    this.timers.retry = setTimeout(() => {
      this.timers.retry = null;
      this._connect();
    }, delay);
  }

  _stopWith(reason, { signedOut = false } = {}) {
    window.removeEventListener("online", this._onOnline);
    document.removeEventListener("visibilitychange", this._onVisible);
    this._teardownSocket(1000, "bye");
    this._clearTimer("retry");
    this._setState({ status: "offline", retryAt: null, reason, signedOut });
  }

  /** Forget the current socket without reacting to its close. */
  _dropSocket() {
    const ws = this.ws;
    this.ws = null;
    this.authed = false;
    // Unhandled messages of that socket go too: the rejoin resumes after the
    // last event handled, so nothing is lost.
    this.inbox = [];
    this.inboxHead = 0;
    for (const name of ["stable", "watchdog", "refresh"]) this._clearTimer(name);
    for (const room of this.rooms.values()) room.status = "joining";
    for (const p of this.pending.values()) p.sent = false;
    return ws;
  }

  _teardownSocket(code, reason) {
    const ws = this._dropSocket();
    if (ws && ws.readyState <= WebSocket.OPEN) {
      try {
        ws.close(code, reason);
      } catch {
        // Closing a socket that never opened can throw in some browsers.
      }
    }
  }

  _armWatchdog(ms) {
    this._clearTimer("watchdog");
    this.timers.watchdog = setTimeout(() => {
      this.timers.watchdog = null;
      // Silence: the network may be gone without the browser noticing.
      // Close it ourselves (4000: our own code) and reconnect now.
      this._teardownSocket(4000, "heartbeat timeout");
      this._scheduleReconnect("No heartbeat from the server.");
    }, ms);
  }

  // --------------------------------------------------------------- frames

  _onFrame(data) {
    let parsed;
    try {
      parsed = JSON.parse(data);
    } catch {
      return; // the server only sends JSON; ignore anything else
    }
    this._armWatchdog(this.authed ? 2 * this.heartbeatMs : HANDSHAKE_TIMEOUT_MS);
    for (const msg of Array.isArray(parsed) ? parsed : [parsed]) {
      if (msg && typeof msg.type === "string") this.inbox.push(msg);
    }
    this._drain();
  }

  /**
   * Handle queued messages in order, a few milliseconds at a time: a replay
   * of thousands of events is spread over many short tasks, so the page
   * stays responsive (no main-thread task over 50 ms) while it catches up.
   */
  _drain() {
    if (this.draining) return;
    const deadline = performance.now() + DRAIN_BUDGET_MS;
    while (this.inboxHead < this.inbox.length) {
      const msg = this.inbox[this.inboxHead];
      this.inbox[this.inboxHead] = undefined;
      this.inboxHead += 1;
      this._onMessage(msg);
      if (performance.now() > deadline && this.inboxHead < this.inbox.length) {
        this.draining = true;
        this._yield(() => {
          this.draining = false;
          this._drain();
        });
        return;
      }
    }
    this.inbox = [];
    this.inboxHead = 0;
  }

  /** Run `fn` in a new task soon (a MessageChannel is not throttled like setTimeout). */
  _yield(fn) {
    if (!this._channel) {
      this._channel = new MessageChannel();
      this._channel.port1.onmessage = () => this._channelFn?.();
    }
    this._channelFn = fn;
    this._channel.port2.postMessage(0);
  }

  _onMessage(msg) {
    switch (msg.type) {
      case "auth_ok":
        return this._onAuthOk(msg);
      case "joined": {
        const room = this.rooms.get(msg.roomId);
        if (!room) return;
        room.status = "joined";
        room.role = msg.role ?? null;
        this._deliver(room, msg);
        this._flushChats(msg.roomId);
        return;
      }
      case "event":
      case "chat": {
        const room = this.rooms.get(msg.roomId);
        // Items before `joined` belong to a membership we already left.
        if (!room || room.status !== "joined" || typeof msg.id !== "string") return;
        if (room.lastId && compareIds(msg.id, room.lastId) <= 0) return; // duplicate
        room.lastId = msg.id;
        if (msg.type === "chat" && msg.userId === this.userId) this._settleChat(msg.requestId, msg.id);
        this._deliver(room, msg);
        return;
      }
      case "gap":
      case "presence": {
        const room = this.rooms.get(msg.roomId);
        if (room) this._deliver(room, msg);
        return;
      }
      case "ack":
        return this._settleChat(msg.requestId, msg.id);
      case "error":
        return this._onError(msg);
      default:
        return; // heartbeat, pong, left, and types of later protocol versions
    }
  }

  _onAuthOk(msg) {
    const first = !this.authed;
    this.authed = true;
    this.userId = msg.userId ?? this.userId;
    if (Number.isFinite(msg.heartbeatMs) && msg.heartbeatMs > 0) this.heartbeatMs = msg.heartbeatMs;
    this._armWatchdog(2 * this.heartbeatMs);
    this._scheduleRefresh(msg.expiresAt);
    if (!first) return; // a credential refresh: nothing else changes
    this.everLive = true;
    this._setState({ status: "live", retryAt: null, reason: null });
    this.dispatchEvent(new CustomEvent("auth", { detail: { userId: this.userId } }));
    this._clearTimer("stable");
    this.timers.stable = setTimeout(() => {
      this.timers.stable = null;
      this.attempt = 0;
    }, STABLE_AFTER_MS);
    for (const [roomId, room] of this.rooms) this._sendJoin(roomId, room);
  }

  _onError(msg) {
    if (msg.requestId && this.pending.has(msg.requestId)) {
      const p = this.pending.get(msg.requestId);
      if (msg.code === "unavailable" || msg.code === "rate_limited" || msg.code === "timeout") {
        // Not stored: retry later with the same requestId (idempotent).
        p.sent = false;
        this._clearTimer("chat");
        this.timers.chat = setTimeout(() => {
          this.timers.chat = null;
          for (const roomId of new Set([...this.pending.values()].map((x) => x.roomId))) this._flushChats(roomId);
        }, CHAT_RETRY_MS);
        const room = this.rooms.get(p.roomId);
        if (room) this._deliver(room, { ...msg, roomId: p.roomId, retrying: true });
        return;
      }
      this.pending.delete(msg.requestId);
      const err = new Error(msg.message || msg.code);
      err.code = msg.code;
      p.reject(err);
      return;
    }
    const room = msg.roomId ? this.rooms.get(msg.roomId) : null;
    if (room) this._deliver(room, msg);
    else this.dispatchEvent(new CustomEvent("servererror", { detail: msg }));
  }

  _settleChat(requestId, id) {
    const p = requestId ? this.pending.get(requestId) : null;
    if (!p) return;
    this.pending.delete(requestId);
    p.resolve(id);
  }

  _deliver(room, msg) {
    for (const listener of [...room.listeners]) {
      try {
        listener(msg);
      } catch (err) {
        // One broken view must not stop the others, nor the socket.
        console.error("room listener failed", err);
      }
    }
  }

  // ---------------------------------------------------------------- sends

  _send(msg) {
    if (!this.ws || !this.authed || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(msg));
    return true;
  }

  _sendJoin(roomId, room) {
    room.status = "joining";
    const msg = { type: "join", roomId };
    if (room.lastId) msg.since = room.lastId;
    this._send(msg);
  }

  _flushChats(roomId) {
    const room = this.rooms.get(roomId);
    if (!room || room.status !== "joined") return; // sent after the (re)join
    for (const [requestId, p] of this.pending) {
      if (p.roomId !== roomId || p.sent) continue;
      p.sent = this._send({ ...p.body, roomId, requestId });
    }
  }

  _scheduleRefresh(expiresAt) {
    this._clearTimer("refresh");
    if (!Number.isFinite(expiresAt)) return;
    const expiresMs = expiresAt < 1e12 ? expiresAt * 1000 : expiresAt; // seconds or ms
    const left = expiresMs - Date.now();
    // Refresh well before expiry: a fifth of the lifetime, at most a minute early.
    const delay = Math.min(2 ** 31 - 1, Math.max(1000, left - Math.min(60_000, left / 5)));
    this.timers.refresh = setTimeout(() => this._refresh(expiresMs), delay);
  }

  async _refresh(expiresMs) {
    this.timers.refresh = null;
    const ws = this.ws;
    try {
      const ticket = await this.fetchTicket();
      if (this.ws === ws) this._send({ type: "auth", token: ticket, batch: true, client: this.clientName });
    } catch (err) {
      if (err instanceof SignedOutError) {
        this._stopWith(err.message || "Your token was refused. Sign in again.", { signedOut: true });
        return;
      }
      // Try again shortly while there is time; the server closes 4401 otherwise.
      if (this.ws === ws && Date.now() < expiresMs) this.timers.refresh = setTimeout(() => this._refresh(expiresMs), 5000);
    }
  }

  // ---------------------------------------------------------------- state

  _setState(patch) {
    this.state = { ...this.state, signedOut: false, ...patch };
    this.dispatchEvent(new CustomEvent("state", { detail: this.state }));
  }

  _clearTimer(name) {
    if (this.timers[name] !== null) {
      clearTimeout(this.timers[name]);
      this.timers[name] = null;
    }
  }
}
