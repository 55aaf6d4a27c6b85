// A job's actions for submitters: cancel (with a confirmation) while it
// runs, "run again" (a new job with the same spec) once it ended.

import { ApiError } from "../api.js";
import { announce, h, replaceChildren } from "../dom.js";
import { TERMINAL } from "../jobstate.js";
import { SignedOutError } from "../socket.js";

const ROLE_RANK = { viewer: 0, reviewer: 1, submitter: 2, admin: 3 };

/**
 * @param {{el: HTMLElement, api: object, jobId: string, onChange: () => void,
 *          isDisposed: () => boolean, onCancelled: (snapshot: object) => void}} ctx
 * @returns {{draw: (snapshot: object, role: string|null) => void}}
 */
export function createJobActions({ el, api, jobId, onChange, isDisposed, onCancelled }) {
  let cancelState = "idle"; // idle | confirm | sending
  let cancelError = "";
  let rerunState = "idle"; // idle | sending
  let rerunError = "";

  function draw(s, role) {
    // A session reported through hooks runs elsewhere: it can only be stopped there.
    const allowed = s.kind !== "session" && role !== null && (ROLE_RANK[role] ?? 0) >= ROLE_RANK.submitter;
    const active = !TERMINAL.has(s.status);
    const key = `${allowed}|${active}|${cancelState}|${cancelError}|${rerunState}|${rerunError}`;
    if (el.dataset.key === key) return;
    el.dataset.key = key;
    if (!allowed) {
      el.replaceChildren();
      return;
    }
    if (!active) {
      // Run again: a new job with the same spec (read back from the server).
      const again = h("button", { type: "button", class: "btn btn-primary", id: "run-again", disabled: rerunState === "sending" }, rerunState === "sending" ? "Submitting…" : "Run again");
      again.addEventListener("click", doRerun);
      replaceChildren(el, again, rerunError ? h("p", { class: "field-error", role: "alert" }, rerunError) : null);
      return;
    }
    if (cancelState === "confirm") {
      const yes = h("button", { type: "button", class: "btn btn-danger", id: "cancel-confirm" }, "Yes, cancel it");
      const no = h("button", { type: "button", class: "btn btn-quiet" }, "Keep running");
      yes.addEventListener("click", doCancel);
      no.addEventListener("click", () => {
        cancelState = "idle";
        onChange();
      });
      replaceChildren(el, h("p", { class: "cancel-question", id: "cancel-question" }, "Stop this job?"), h("div", { class: "cancel-buttons", role: "group", "aria-labelledby": "cancel-question" }, yes, no));
      queueMicrotask(() => yes.focus());
      return;
    }
    const button = h("button", { type: "button", class: "btn btn-danger-quiet", id: "cancel-job", disabled: cancelState === "sending" }, cancelState === "sending" ? "Cancelling…" : "Cancel job");
    button.addEventListener("click", () => {
      cancelState = "confirm";
      onChange();
    });
    replaceChildren(el, button, cancelError ? h("p", { class: "field-error", role: "alert" }, cancelError) : null);
  }

  async function doRerun() {
    rerunState = "sending";
    rerunError = "";
    onChange();
    try {
      const spec = await api.jobSpec(jobId);
      const snap = await api.submitJob(spec);
      if (isDisposed()) return;
      announce("Submitted again as a new job.");
      window.location.hash = `#/jobs/${snap.id}`;
    } catch (err) {
      if (isDisposed() || err instanceof SignedOutError) return;
      rerunState = "idle";
      rerunError = err instanceof ApiError ? err.detail : "The server cannot be reached; nothing was submitted.";
      onChange();
    }
  }

  async function doCancel() {
    cancelState = "sending";
    cancelError = "";
    onChange();
    try {
      const snap = await api.cancelJob(jobId);
      if (isDisposed()) return;
      announce("Cancel requested.");
      onCancelled(snap);
      cancelState = "idle";
    } catch (err) {
      if (isDisposed() || err instanceof SignedOutError) return;
      cancelState = "idle";
      cancelError = err instanceof ApiError ? err.detail : "The server cannot be reached; the job was not cancelled.";
    }
    onChange();
  }

  return { draw };
}
