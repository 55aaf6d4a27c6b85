// The job's steps as a CI log: one row per tool call with its time, a stable
// link (`#/jobs/<id>/step-42`), attempts as labelled sections, a filter, and
// a detail panel with the step's input and output.
//
// The list is windowed: only the rows in view (plus a margin) are in the
// DOM, all of one height, inside a scroll box of bounded height. 10,000
// steps cost as much to draw as 30, and nothing overflows the page.

import { h, renderKeyed, setText } from "../dom.js";
import { formatClock, formatDateTime, formatDuration } from "../format.js";
import { attemptDuration, TERMINAL } from "../jobstate.js";

const ROW_H = 32;
const OVERSCAN = 12;
/** Characters of input or output shown before "Show all". */
const PREVIEW_CHARS = 2000;
const STEP_ICON = { started: "…", ok: "✓", error: "✕" };

/**
 * @param {{jobId: string, api: object}} ctx
 * @returns {{el: HTMLElement, update: (state: object) => void, goToStep: (n: number|null) => void, dispose: () => void}}
 */
export function createStepLog({ jobId, api }) {
  let state = null;
  let now; // the job view's clock reading for this render (undefined: read the clock)
  let rows = [];
  let rowsKey = "";
  let shownSteps = 0;
  let query = "";
  let stick = true;
  let openN = null; // the step shown in the detail panel
  let highlight = null;
  let pendingGoTo = null;
  let showAll = { input: false, output: false };
  let fetched = new Map(); // step key -> detail from GET /steps/{id}

  const count = h("span", { class: "count", id: "step-count" });
  const filter = h("input", { type: "search", id: "step-filter", autocomplete: "off", spellcheck: "false", "aria-describedby": "step-filter-status" });
  const filterStatus = h("span", { class: "filter-status", id: "step-filter-status", role: "status" });
  const rawLog = h("a", { class: "btn btn-small btn-quiet", id: "raw-log", href: api.rawLogUrl(jobId), download: `job-${jobId}.jsonl` }, "Download raw log");
  const list = h("ol", { class: "steps", id: "steps", "aria-labelledby": "steps-title" });
  const empty = h("p", { class: "empty" }, "No steps yet.");
  const box = h("div", { class: "steps-box", tabindex: "0", role: "region", "aria-label": "Step log" }, list);
  const detail = h("section", { class: "step-detail", id: "step-detail", hidden: true, "aria-labelledby": "step-detail-title", tabindex: "-1" });
  const el = h(
    "section",
    { class: "card steps-card", "aria-labelledby": "steps-title" },
    h("div", { class: "steps-head" }, h("h2", { id: "steps-title" }, "Steps ", count), rawLog),
    h("div", { class: "steps-tools" }, h("label", { for: "step-filter" }, "Filter steps"), filter, filterStatus),
    box,
    empty,
    detail,
  );

  filter.addEventListener("input", () => {
    query = filter.value.trim().toLowerCase();
    rowsKey = "";
    draw();
  });
  box.addEventListener("scroll", () => {
    stick = box.scrollTop + box.clientHeight >= box.scrollHeight - ROW_H;
    drawWindow();
  });
  const onResize = () => drawWindow();
  window.addEventListener("resize", onResize);

  function matches(step) {
    if (!query) return true;
    // The searchable text of a step, lowercased once per change of the step.
    if (step.hayFor !== step.state) {
      const i = step.input || {};
      step.hay = [step.tool, step.title, i.command, i.path, i.pattern, i.text, step.output, step.error, `#${step.n}`].filter(Boolean).join("\n").toLowerCase();
      step.hayFor = step.state;
    }
    return step.hay.includes(query);
  }

  function buildRows() {
    const key = `${state.version}|${query}|${state.attempts.size}|${state.snapshot.status}`;
    if (key === rowsKey) return;
    rowsKey = key;
    rows = [];
    shownSteps = 0;
    const attempts = [...state.attempts.values()].sort((a, b) => a.attempt - b.attempt);
    const labelled = attempts.length > 1 || (attempts[0]?.attempt ?? 1) > 1;
    for (const a of attempts) {
      const steps = a.steps.filter(matches);
      if (labelled && (a.steps.length || a.startedAt)) rows.push({ type: "attempt", a, key: `a${a.attempt}` });
      for (const step of steps) rows.push({ type: "step", step, key: `s${step.key}` });
      shownSteps += steps.length;
    }
  }

  function draw() {
    if (!state) return;
    buildRows();
    const total = state.stepList.length;
    const shown = shownSteps;
    setText(count, total ? `(${total})` : "");
    setText(filterStatus, query ? `${shown} of ${total} steps match` : "");
    empty.hidden = rows.length > 0;
    setText(empty, query ? "No step matches the filter." : TERMINAL.has(state.snapshot.status) ? "No steps were run." : "No steps yet.");
    box.hidden = rows.length === 0;
    list.style.height = `${rows.length * ROW_H}px`;
    list.dataset.count = String(shown);
    // The box is as tall as its rows, up to the CSS max-height (less on a phone).
    box.style.height = `${rows.length * ROW_H + 2}px`;
    if (pendingGoTo !== null) tryGoTo();
    else if (stick) box.scrollTop = box.scrollHeight;
    drawWindow();
    if (openN !== null) drawDetail();
  }

  function drawWindow() {
    const first = Math.max(0, Math.floor(box.scrollTop / ROW_H) - OVERSCAN);
    const last = Math.min(rows.length, Math.ceil((box.scrollTop + (box.clientHeight || 400)) / ROW_H) + OVERSCAN);
    const visible = rows.slice(first, last).map((r, i) => ({ ...r, index: first + i }));
    renderKeyed(list, visible, (r) => r.key, createRow, updateRow);
  }

  function createRow(r) {
    if (r.type === "attempt") return h("li", { class: "attempt-row" }, h("h3", { class: "attempt-title" }));
    const open = h(
      "button",
      { type: "button", class: "step-open", "aria-controls": "step-detail" },
      h("span", { class: "step-icon", "aria-hidden": "true" }),
      h("span", { class: "step-tool" }),
      h("span", { class: "step-title" }),
      h("span", { class: "step-duration" }),
      h("span", { class: "visually-hidden step-state" }),
    );
    open.addEventListener("click", () => {
      const n = Number(open.closest("li").dataset.n);
      openStep(openN === n ? null : n);
    });
    return h("li", { class: "step" }, h("time", { class: "step-time" }), h("a", { class: "step-num" }), open);
  }

  function updateRow(li, r) {
    // Unchanged rows (most of them, on every event) are left alone.
    const sig = r.type === "attempt" ? `${r.index}|${attemptLabel(r.a)}` : `${r.index}|${r.step.state}|${r.step.durationMs}|${highlight === r.step.n}|${openN === r.step.n}|${r.step.n}`;
    if (li.dataset.sig === sig) return;
    li.dataset.sig = sig;
    li.style.top = `${r.index * ROW_H}px`;
    if (r.type === "attempt") {
      setText(li.querySelector(".attempt-title"), attemptLabel(r.a));
      li.dataset.attempt = String(r.a.attempt);
      return;
    }
    const st = r.step;
    li.dataset.stepId = st.stepId;
    li.dataset.state = st.state;
    li.dataset.n = String(st.n);
    li.dataset.attempt = String(st.attempt);
    li.id = `step-${st.n}`;
    li.dataset.depth = String(st.depth || 0);
    li.toggleAttribute("data-highlight", highlight === st.n);
    const time = li.querySelector(".step-time");
    setText(time, formatClock(st.startedAt));
    if (st.startedAt) time.setAttribute("datetime", new Date(st.startedAt).toISOString());
    time.title = formatDateTime(st.startedAt);
    const num = li.querySelector(".step-num");
    num.href = `#/jobs/${jobId}/step-${st.n}`;
    setText(num, `#${st.n}`);
    num.setAttribute("aria-label", `Link to step ${st.n}`);
    const open = li.querySelector(".step-open");
    open.setAttribute("aria-expanded", String(openN === st.n));
    setText(li.querySelector(".step-icon"), st.interrupted ? "■" : STEP_ICON[st.state] ?? "");
    setText(li.querySelector(".step-tool"), st.tool);
    const titleEl = li.querySelector(".step-title");
    setText(titleEl, st.title);
    titleEl.title = st.title;
    setText(li.querySelector(".step-duration"), st.state === "started" ? "running" : st.durationMs !== null && st.durationMs !== undefined ? formatDuration(st.durationMs) : "");
    setText(li.querySelector(".step-state"), st.state === "started" ? ", running" : st.interrupted ? ", interrupted" : st.state === "ok" ? ", done" : ", failed");
  }

  function attemptLabel(a) {
    const parts = [`Attempt ${a.attempt}`];
    if (a.startedAt) parts.push(`started ${formatClock(a.startedAt)}`);
    const ms = attemptDuration(state, a, now);
    if (ms !== null) parts.push(formatDuration(ms));
    parts.push(`${a.steps.length} step${a.steps.length === 1 ? "" : "s"}`);
    if (a.endReason) parts.push(`ended: ${a.endReason}`);
    else if (!a.endedAt && !TERMINAL.has(state.snapshot.status)) parts.push("running");
    return parts.join(" · ");
  }

  // ----------------------------------------------------------- the detail

  function openStep(n) {
    openN = n;
    showAll = { input: false, output: false };
    detail.hidden = n === null;
    drawWindow();
    if (n !== null) drawDetail();
  }

  function drawDetail() {
    const st = state.stepList[openN - 1];
    if (!st) return;
    const extra = fetched.get(st.key);
    const input = st.input ?? extra?.step?.input ?? null;
    const output = st.output ?? extra?.step?.output ?? null;
    if (!st.input && !st.output && !fetched.has(st.key) && !st.provisional) fetchDetail(st);
    const facts = [
      `${st.tool}`,
      st.startedAt ? `started ${formatClock(st.startedAt)}` : null,
      st.durationMs !== null && st.durationMs !== undefined ? `took ${formatDuration(st.durationMs)}` : st.state === "started" ? "running" : null,
      st.exitCode !== null && st.exitCode !== undefined ? `exit code ${st.exitCode}` : null,
      st.interrupted ? "interrupted" : st.state === "error" ? "failed" : st.state === "ok" ? "succeeded" : null,
      `attempt ${st.attempt}`,
    ].filter(Boolean);
    const parent = st.parentStepId ? state.steps.get(`${st.attempt}:${st.parentStepId}`) : null;
    const key = JSON.stringify([st.key, st.state, showAll, !!extra, st.output?.length, highlight]);
    if (detail.dataset.key === key) return;
    detail.dataset.key = key;
    const close = h("button", { type: "button", class: "btn btn-small btn-quiet" }, "Close");
    close.addEventListener("click", () => openStep(null));
    detail.replaceChildren(
      h("div", { class: "step-detail-head" }, h("h3", { id: "step-detail-title" }, `Step ${st.n}: ${st.title || st.tool}`), close),
      h("p", { class: "step-facts" }, facts.join(" · ")),
      parent ? h("p", { class: "step-facts" }, "Ran inside subagent step ", h("a", { href: `#/jobs/${jobId}/step-${parent.n}` }, `#${parent.n}`), ` (${parent.title})`) : null,
      st.error ? h("p", { class: "step-error" }, st.error) : null,
      inputBlock(input),
      outputBlock(st, output),
    );
  }

  function inputBlock(input) {
    if (!input) return null;
    const rows = [];
    for (const [label, value] of [["Command", input.command], ["File", input.path], ["Pattern", input.pattern], ["Input", input.text]]) {
      if (value) rows.push(h("div", { class: "kv" }, h("dt", {}, label), h("dd", {}, clipBlock(value, "input"))));
    }
    return h(
      "div",
      { class: "step-io" },
      h("h4", {}, "Input"),
      rows.length ? h("dl", { class: "step-input" }, rows) : null,
      input.diff ? diffBlock(input.diff) : null,
    );
  }

  function outputBlock(st, output) {
    if (output === null || output === undefined) {
      return st.state === "started" ? h("p", { class: "hint" }, "Running: the output appears when the step ends.") : h("p", { class: "hint" }, "No output was recorded for this step.");
    }
    const cut = st.outputChars ? h("p", { class: "hint" }, `The log keeps the first ${output.length.toLocaleString()} of ${st.outputChars.toLocaleString()} characters of this output.`) : null;
    return h("div", { class: "step-io" }, h("h4", {}, "Output"), clipBlock(output, "output"), cut);
  }

  function clipBlock(text, which) {
    const long = text.length > PREVIEW_CHARS;
    const shown = long && !showAll[which] ? `${text.slice(0, PREVIEW_CHARS)}…` : text;
    const pre = h("pre", { class: "step-text" }, shown);
    if (!long) return pre;
    const more = h("button", { type: "button", class: "btn btn-small btn-quiet show-all" }, showAll[which] ? "Show less" : `Show all (${text.length.toLocaleString()} characters)`);
    more.addEventListener("click", () => {
      showAll = { ...showAll, [which]: !showAll[which] };
      drawDetail();
    });
    return h("div", {}, pre, more);
  }

  function diffBlock(diff) {
    const lines = diff.split("\n");
    const shownLines = !showAll.input && lines.length > 80 ? lines.slice(0, 80) : lines;
    const pre = h(
      "pre",
      { class: "step-text diff", "aria-label": "Changes" },
      shownLines.map((line) => h("span", { class: line.startsWith("+") && !line.startsWith("+++") ? "add" : line.startsWith("-") && !line.startsWith("---") ? "del" : "ctx" }, `${line}\n`)),
    );
    if (shownLines.length === lines.length) return pre;
    const more = h("button", { type: "button", class: "btn btn-small btn-quiet show-all" }, `Show all (${lines.length} lines)`);
    more.addEventListener("click", () => {
      showAll = { ...showAll, input: true };
      drawDetail();
    });
    return h("div", {}, pre, more);
  }

  async function fetchDetail(st) {
    fetched.set(st.key, null);
    try {
      const found = await api.jobStep(jobId, st.stepId);
      const mine = (found.attempts || []).find((a) => a.attempt === st.attempt) ?? found.attempts?.at(-1);
      fetched.set(st.key, mine ?? null);
    } catch {
      // the panel says no output was recorded
    }
    if (openN === st.n) {
      detail.dataset.key = "";
      drawDetail();
    }
  }

  // ----------------------------------------------------------- anchors

  function tryGoTo() {
    const n = pendingGoTo;
    const st = state.stepList[n - 1];
    if (!st) return; // not arrived yet: try again on the next update
    pendingGoTo = null;
    if (!matches(st)) {
      filter.value = "";
      query = "";
      rowsKey = "";
      buildRows();
    }
    const index = rows.findIndex((r) => r.type === "step" && r.step === st);
    stick = false;
    highlight = n;
    box.scrollTop = Math.max(0, index * ROW_H - box.clientHeight / 2 + ROW_H / 2);
    openStep(n);
    box.scrollIntoView({ block: "center" });
  }

  return {
    el,
    /** Redraw for `next`; `at` is the render's clockNow, so attempt times match the rest of the page. */
    update(next, at) {
      state = next;
      now = at;
      draw();
    },
    /** Stop listening to the window (the view is going away). */
    dispose() {
      window.removeEventListener("resize", onResize);
    },
    /** Scroll to step `n`, highlight it and open it (now, or once it has arrived). */
    goToStep(n) {
      if (n === null || n === undefined) return;
      pendingGoTo = n;
      if (state) draw();
    },
  };
}
