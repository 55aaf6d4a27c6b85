// The card that says how a job ended: one sentence, the raw error behind a
// disclosure, the result as Markdown, and what it cost.

import { h, replaceChildren } from "../dom.js";
import { formatCost, formatDuration, formatTokens } from "../format.js";
import { jobDuration } from "../jobstate.js";
import { renderMarkdown } from "../markdown.js";
import { describeOutcome } from "../outcome.js";

/** Fill `el` (the result card) for an ended job; a no-op when nothing changed. `now`: the render's clockNow. */
export function drawResultCard(el, state, now = undefined) {
  const s = state.snapshot;
  const r = s.result;
  const outcome = describeOutcome(s);
  const key = JSON.stringify([s.status, r, s.reason, s.costUsd, s.usage, s.finishedAt]);
  if (el.dataset.key === key) return;
  el.dataset.key = key;
  el.dataset.ok = s.status === "cancelled" ? "cancelled" : String(s.status === "succeeded");
  el.dataset.kind = outcome.kind;
  const heading = s.status === "cancelled" ? "Cancelled" : s.status === "succeeded" ? "Finished" : "Failed";
  const summary = r?.summary ? h("div", { class: "result-summary markdown" }) : null;
  if (summary) renderMarkdown(summary, r.summary);
  const cost = s.costUsd ?? r?.costUsd ?? null;
  const usage = s.usage || { inputTokens: 0, outputTokens: 0 };
  const duration = jobDuration(state, now);
  const facts = [
    r ? `${r.turns} turn${r.turns === 1 ? "" : "s"}` : null,
    duration !== null ? formatDuration(duration) : null,
    cost !== null ? `${formatCost(cost)} cost` : "cost not reported",
    `${formatTokens(usage.inputTokens)} input · ${formatTokens(usage.outputTokens)} output tokens`,
    s.attempt > 1 ? `${s.attempt} attempts` : null,
  ].filter(Boolean);
  replaceChildren(
    el,
    h("h2", { id: "result-title" }, h("span", { class: "result-icon", "aria-hidden": "true" }, s.status === "cancelled" ? "■" : s.status === "succeeded" ? "✓" : "✕"), heading),
    h("p", { class: "result-sentence", id: "result-sentence" }, outcome.sentence),
    outcome.detail ? h("details", { class: "result-detail" }, h("summary", {}, "Error details"), h("pre", {}, outcome.detail)) : null,
    summary,
    h("p", { class: "result-stats", id: "result-stats", "data-duration-ms": duration !== null ? String(Math.round(duration)) : null }, facts.join(" · ")),
  );
}
