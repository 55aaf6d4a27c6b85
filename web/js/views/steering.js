// Steering a running job from the page: Claude's permission prompts (Allow /
// Deny for those who may answer, the outcome for everyone) and the
// instructions people sent it (queued → delivered, or rejected with why).
//
// Who may answer mirrors the server's rule (progress_service/steering.py):
// the job's submitter, role submitter or above, and reviewers when the job
// was submitted with `steerable: "reviewers"`. The server checks again.

import { announce, h, renderKeyed, setText } from "../dom.js";
import { formatClock } from "../format.js";

const ROLE_RANK = { viewer: 0, reviewer: 1, submitter: 2, admin: 3 };

/** Whether the signed-in user may steer a job (see the header). */
export function maySteer({ role, me, snapshot, spec }) {
  if (!role) return false;
  if ((ROLE_RANK[role] ?? 0) >= ROLE_RANK.submitter) return true;
  if (me && snapshot && snapshot.submittedBy && snapshot.submittedBy === me.userName) return true;
  return spec?.steerable === "reviewers" && (ROLE_RANK[role] ?? 0) >= ROLE_RANK.reviewer;
}

/**
 * @param {{client: import("../socket.js").RealtimeClient, roomId: string}} options
 */
export function createSteeringPanel({ client, roomId }) {
  const prompts = new Map(); // permissionId -> latest permission data (+ local answer state)
  const instructions = new Map(); // requestId -> latest instruction data
  let allowed = false;

  const promptList = h("ul", { class: "permission-list", "aria-label": "Claude's permission requests" });
  const instructionList = h("ol", { class: "instruction-list", "aria-label": "Instructions sent to Claude" });
  const el = h(
    "section",
    { class: "card steering-card", "aria-labelledby": "steering-title", hidden: true },
    h("h2", { id: "steering-title" }, "Steering"),
    promptList,
    instructionList,
  );

  function decide(permissionId, allow) {
    const p = prompts.get(permissionId);
    if (!p || p.state !== "pending" || p.answering) return;
    p.answering = true;
    p.error = null;
    render();
    const { done } = client.sendDecide(roomId, permissionId, allow);
    done.then(
      () => {
        p.answering = false;
        render();
      },
      (err) => {
        p.answering = false;
        p.error = err.code === "already_decided" ? "Someone answered first." : err.message || "Not sent.";
        announce(`Your answer was not taken: ${p.error}`);
        render();
      },
    );
  }

  function render() {
    const items = [...prompts.values()].sort((a, b) => Number(b.state === "pending") - Number(a.state === "pending"));
    renderKeyed(promptList, items, (p) => p.permissionId, createPrompt, updatePrompt);
    renderKeyed(instructionList, [...instructions.values()], (i) => i.requestId, createInstruction, updateInstruction);
    el.hidden = prompts.size === 0 && instructions.size === 0;
  }

  function createPrompt(p) {
    const allow = h("button", { type: "button", class: "btn btn-small btn-primary permission-allow", onclick: () => decide(p.permissionId, true) }, "Allow");
    const deny = h("button", { type: "button", class: "btn btn-small permission-deny", onclick: () => decide(p.permissionId, false) }, "Deny");
    return h(
      "li",
      { class: "permission" },
      h("p", { class: "permission-head" }, h("strong", { class: "permission-tool" }), " ", h("span", { class: "permission-state" })),
      h("pre", { class: "permission-input" }),
      h("div", { class: "permission-actions" }, allow, deny),
      h("p", { class: "permission-error", role: "status" }),
    );
  }

  function updatePrompt(li, p) {
    li.dataset.permissionId = p.permissionId;
    li.dataset.state = p.state;
    setText(li.querySelector(".permission-tool"), `${p.tool} wants to run`);
    const outcome = {
      pending: p.expiresAt ? `waiting for an answer (denied at ${formatClock(p.expiresAt)} if none)` : "waiting for an answer",
      allowed: `allowed by ${p.by ?? "someone"}`,
      denied: `denied by ${p.by ?? "someone"}${p.message ? `: ${p.message}` : ""}`,
      expired: p.message || "no answer in time: denied",
    }[p.state] ?? p.state;
    setText(li.querySelector(".permission-state"), outcome);
    if (p.input) setText(li.querySelector(".permission-input"), p.input.command ?? JSON.stringify(p.input, null, 2));
    const actions = li.querySelector(".permission-actions");
    actions.hidden = p.state !== "pending" || !allowed;
    for (const b of actions.querySelectorAll("button")) b.disabled = Boolean(p.answering);
    const error = li.querySelector(".permission-error");
    setText(error, p.error ?? "");
    error.hidden = !p.error;
  }

  function createInstruction() {
    return h("li", { class: "instruction" }, h("span", { class: "instruction-by" }), " ", h("span", { class: "instruction-text" }), " ", h("span", { class: "instruction-state" }));
  }

  function updateInstruction(li, i) {
    li.dataset.state = i.state;
    li.dataset.requestId = i.requestId;
    setText(li.querySelector(".instruction-by"), `${i.by ?? "You"} → Claude:`);
    setText(li.querySelector(".instruction-text"), i.text);
    const label = { sending: "Sending…", queued: "Queued for Claude", delivered: "✓ Claude has it", rejected: `Not delivered: ${i.reason ?? ""}` }[i.state] ?? i.state;
    setText(li.querySelector(".instruction-state"), label);
  }

  return {
    el,
    /** Whether this user may answer prompts (recomputed by the job view). */
    setAllowed(value) {
      if (allowed === value) return;
      allowed = value;
      render();
    },
    /** `instruction` and `permission` events, replayed or live. */
    onEvent(msg, { live }) {
      const d = msg.data || {};
      if (msg.kind === "permission" && d.permissionId) {
        const before = prompts.get(d.permissionId);
        prompts.set(d.permissionId, { ...before, ...d, input: d.input ?? before?.input, answering: false, error: before?.error ?? null });
        if (live && d.state === "pending") announce(`Claude asks to run ${d.tool}.`);
      } else if (msg.kind === "instruction" && d.requestId) {
        instructions.set(d.requestId, { ...instructions.get(d.requestId), ...d });
      } else return;
      render();
    },
    /** An instruction from the comment box ("send to Claude"). */
    instruct(text) {
      const { requestId, done } = client.sendSteer(roomId, text);
      instructions.set(requestId, { requestId, text, state: "sending" });
      render();
      done.then(
        () => render(),
        (err) => {
          const i = instructions.get(requestId);
          if (i) Object.assign(i, { state: "rejected", reason: err.message || err.code });
          announce(`Your instruction was not delivered: ${err.message || err.code}`);
          render();
        },
      );
    },
  };
}
