// The comments panel of a job: the room's comments in order, who is
// watching, and a box to comment (reviewers and above).
//
// Own comments show as pending until the server acks them; the socket client
// re-sends them with the same requestId after a reconnect, so a comment is
// stored once however often the network drops.

import { announce, h, renderKeyed, setText } from "../dom.js";
import { formatClock, formatDateTime } from "../format.js";
import { compareIds } from "../socket.js";

const ROLE_RANK = { viewer: 0, reviewer: 1, submitter: 2, admin: 3 };
const MAX_CHARS = 1000;
// Control characters the protocol refuses (all but tab and newline).
const CONTROL = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/g;

/**
 * @param {{client: import("../socket.js").RealtimeClient, roomId: string}} options
 */
export function createCommentsPanel({ client, roomId, onInstruct = null }) {
  const comments = new Map(); // event id -> chat message
  const pending = new Map(); // requestId -> {requestId, text, sentAt, state, error}
  const presence = new Map(); // userId -> userName
  // Users the server counted but did not name: `joined` names at most 100 (protocol, Presence).
  let unnamed = 0;
  let role = null;
  let replaying = true;
  let steerable = false; // this user may send instructions to the running job

  const count = h("span", { class: "count" });
  const presenceList = h("ul", { class: "presence-list", "aria-label": "Watching now" });
  const presenceMore = h("span", { class: "presence-more", hidden: true });
  const list = h("ol", { class: "comment-list", "aria-label": "Comments, oldest first" });
  const empty = h("p", { class: "empty" }, "No comments yet.");
  const textarea = h("textarea", {
    id: "comment-text",
    name: "text",
    rows: "3",
    maxlength: String(MAX_CHARS),
    disabled: true,
    "aria-describedby": "comment-hint comment-reason",
    placeholder: "Share a thought with the team…",
  });
  const counter = h("span", { class: "char-count", "aria-hidden": "true" });
  const hint = h("p", { class: "hint", id: "comment-hint" }, "Ctrl+Enter sends. Everyone watching this job sees it.");
  const reason = h("p", { class: "comment-reason", id: "comment-reason", role: "status" }, "Connecting…");
  const button = h("button", { type: "submit", class: "btn btn-primary", disabled: true }, "Comment");
  // "Send to Claude": the text goes to the running Claude Code as an
  // instruction (steer) instead of the room as a comment.
  const toClaude = h("input", { type: "checkbox", id: "comment-to-claude", class: "to-claude" });
  const toClaudeLabel = h("label", { class: "to-claude-label", for: "comment-to-claude", hidden: true }, toClaude, " Send to Claude");
  toClaude.addEventListener("change", () => renderComposer());
  const form = h(
    "form",
    { class: "comment-form", novalidate: true },
    h("label", { for: "comment-text" }, "Add a comment"),
    textarea,
    h("div", { class: "comment-form-foot" }, hint, counter),
    reason,
    h("div", { class: "form-actions" }, toClaudeLabel, button),
  );
  const el = h(
    "section",
    { class: "card comments-card", "aria-labelledby": "comments-title" },
    h("h2", { id: "comments-title" }, "Comments ", count),
    h("div", { class: "presence" }, h("span", { class: "presence-label" }, "Watching"), presenceList, presenceMore),
    list,
    empty,
    form,
  );

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  textarea.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      send();
    }
  });
  textarea.addEventListener("input", renderCounter);

  function canComment() {
    return role !== null && (ROLE_RANK[role] ?? 0) >= ROLE_RANK.reviewer;
  }

  function send() {
    if (!canComment()) return;
    const text = textarea.value.replace(CONTROL, "").trim();
    if (!text) {
      textarea.focus();
      return;
    }
    if (text.length > MAX_CHARS) return;
    if (steerable && toClaude.checked && onInstruct) {
      onInstruct(text);
      textarea.value = "";
      renderCounter();
      return;
    }
    const { requestId, done } = client.sendChat(roomId, text);
    pending.set(requestId, { requestId, text, sentAt: Date.now(), state: "sending", error: null });
    textarea.value = "";
    renderCounter();
    render();
    done.then(
      () => {
        // The broadcast carries the stored comment; until it arrives, the
        // acked one stays in the list marked as sent.
        const p = pending.get(requestId);
        if (p) p.state = "sent";
        render();
      },
      (err) => {
        const p = pending.get(requestId);
        if (!p) return;
        p.state = "failed";
        p.error = err.code === "forbidden" ? "You may not comment here." : err.message || "Not sent.";
        announce(`Your comment was not posted: ${p.error}`);
        render();
      },
    );
  }

  function renderCounter() {
    const n = textarea.value.length;
    setText(counter, n > MAX_CHARS * 0.8 ? `${n}/${MAX_CHARS}` : "");
  }

  function renderComposer() {
    toClaudeLabel.hidden = !steerable || !onInstruct;
    if (toClaudeLabel.hidden) toClaude.checked = false;
    setText(button, toClaude.checked ? "Send to Claude" : "Comment");
    setText(hint, toClaude.checked
      ? "Ctrl+Enter sends. Claude gets it as an instruction at its next step; everyone watching sees it."
      : "Ctrl+Enter sends. Everyone watching this job sees it.");
    const allowed = canComment();
    textarea.disabled = !allowed;
    button.disabled = !allowed;
    form.dataset.allowed = String(allowed);
    if (role === null) setText(reason, "Connecting…");
    else if (!allowed)
      setText(reason, `You can read comments but not post them: your role here is ${role}, and commenting needs reviewer or above.`);
    else setText(reason, "");
    reason.hidden = allowed;
  }

  function render() {
    const items = [...comments.values()].sort((a, b) => compareIds(a.id, b.id)).map((c) => ({ kind: "stored", c }));
    for (const p of pending.values()) items.push({ kind: "pending", p });
    renderKeyed(list, items, (it) => (it.kind === "stored" ? `c:${it.c.id}` : `p:${it.p.requestId}`), createItem, updateItem);
    empty.hidden = items.length > 0;
    setText(count, comments.size ? `(${comments.size})` : "");
    renderPresence();
    renderComposer();
  }

  function createItem(it) {
    return h(
      "li",
      { class: "comment" },
      h("span", { class: "avatar", "aria-hidden": "true" }),
      h(
        "div",
        { class: "comment-body" },
        h("div", { class: "comment-head" }, h("span", { class: "comment-author" }), h("time", { class: "comment-time" }), h("span", { class: "comment-state" })),
        h("p", { class: "comment-text" }),
        h("button", { type: "button", class: "btn btn-small btn-quiet comment-retry", hidden: true }, "Try again"),
      ),
    );
  }

  function updateItem(li, it) {
    const mine = it.kind === "pending" || it.c.userId === client.userId;
    const myName = presence.get(client.userId) ?? "You";
    const name = it.kind === "pending" ? myName : it.c.userName;
    const userId = it.kind === "pending" ? client.userId ?? "me" : it.c.userId;
    const at = it.kind === "pending" ? it.p.sentAt : it.c.sentAt;
    li.classList.toggle("mine", mine);
    li.dataset.state = it.kind === "pending" ? it.p.state : "stored";
    if (it.kind === "stored") {
      li.dataset.commentId = it.c.id;
      li.dataset.requestId = it.c.requestId;
    } else li.dataset.requestId = it.p.requestId;
    const avatar = li.querySelector(".avatar");
    setText(avatar, initials(name));
    avatar.style.setProperty("--hue", String(hue(userId)));
    setText(li.querySelector(".comment-author"), mine && name !== "You" ? `${name} (you)` : name);
    const time = li.querySelector(".comment-time");
    setText(time, formatClock(at));
    time.title = formatDateTime(at);
    setText(li.querySelector(".comment-text"), it.kind === "pending" ? it.p.text : it.c.text);
    const state = li.querySelector(".comment-state");
    const retry = li.querySelector(".comment-retry");
    if (it.kind === "pending") {
      const label = {
        sending: client.state.status === "live" ? "Sending…" : "Waiting for connection…",
        retrying: "Not stored yet, retrying…",
        // Acked: the server stored it (the broadcast follows).
        sent: "✓ Delivered",
        failed: `Not posted: ${it.p.error}`,
      }[it.p.state];
      setText(state, label);
      retry.hidden = it.p.state !== "failed";
      retry.onclick = () => {
        pending.delete(it.p.requestId);
        textarea.value = it.p.text;
        render();
        textarea.focus();
      };
    } else {
      // Stored in the room: mine are marked delivered (the server acked them).
      setText(state, mine ? "✓ Delivered" : "");
      retry.hidden = true;
    }
  }

  function renderPresence() {
    const people = [...presence.entries()].map(([userId, userName]) => ({ userId, userName }));
    people.sort((a, b) => (a.userId === client.userId ? -1 : b.userId === client.userId ? 1 : a.userName.localeCompare(b.userName)));
    renderKeyed(
      presenceList,
      people,
      (p) => p.userId,
      () => h("li", { class: "presence-item" }, h("span", { class: "avatar avatar-small", "aria-hidden": "true" }), h("span", { class: "presence-name" })),
      (li, p) => {
        li.dataset.userId = p.userId;
        const avatar = li.querySelector(".avatar");
        setText(avatar, initials(p.userName));
        avatar.style.setProperty("--hue", String(hue(p.userId)));
        setText(li.querySelector(".presence-name"), p.userId === client.userId ? `${p.userName} (you)` : p.userName);
      },
    );
    setText(presenceMore, unnamed > 0 ? `and ${unnamed} more` : "");
    presenceMore.hidden = unnamed === 0;
  }

  return {
    el,
    /** `joined`: role and presence; comments arrive as replayed `chat` items. */
    onJoined(msg, { replayingUntil }) {
      role = msg.role ?? role;
      replaying = Boolean(replayingUntil);
      presence.clear();
      for (const m of msg.presence || []) presence.set(m.userId, m.userName);
      unnamed = Math.max(0, (Number.isInteger(msg.presenceCount) ? msg.presenceCount : 0) - presence.size);
      render();
    },
    /** End of the replay: from now on new comments are announced. */
    liveNow() {
      replaying = false;
    },
    onChat(msg) {
      if (comments.has(msg.id)) return;
      comments.set(msg.id, msg);
      if (msg.userId === client.userId && pending.has(msg.requestId)) pending.delete(msg.requestId);
      else if (!replaying && msg.userId !== client.userId) announce(`New comment from ${msg.userName}.`);
      render();
    },
    onPresence(msg) {
      for (const m of msg.joined || []) presence.set(m.userId, m.userName);
      for (const m of msg.left || []) {
        // One the server did not name when we joined leaves from the count.
        if (!presence.delete(m.userId) && unnamed > 0) unnamed -= 1;
      }
      render();
    },
    onChatError(msg) {
      const p = pending.get(msg.requestId);
      if (p && msg.retrying) {
        p.state = "retrying";
        render();
      }
    },
    /** Comments read over HTTP (after a gap: the stream no longer has them). */
    addStored(items) {
      for (const c of items) if (c && c.id && !comments.has(c.id)) comments.set(c.id, c);
      render();
    },
    /** Re-render pending labels when the connection changes. */
    refresh: render,
    /** Whether the "send to Claude" toggle is offered (the job runs and this user may steer it). */
    setSteerable(value) {
      steerable = value;
    },
  };
}

function initials(name) {
  const parts = String(name || "?").trim().split(/[\s._-]+/).filter(Boolean);
  return ((parts[0]?.[0] ?? "?") + (parts[1]?.[0] ?? "")).toUpperCase();
}

function hue(id) {
  let x = 0;
  for (const ch of String(id)) x = (x * 31 + ch.charCodeAt(0)) % 360;
  return x;
}
