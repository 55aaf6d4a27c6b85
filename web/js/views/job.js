// The job page: progress, phases, steps, to-dos, usage, result, comments.

import { ApiError } from "../api.js";
import { announce, frameScheduler, h, renderKeyed, replaceChildren, setText } from "../dom.js";
import { formatCost, formatDateTime, formatDuration, formatRelative, formatTokens, PHASE_LABEL, promptTitle, STATUS_LABEL } from "../format.js";
import { applyEvent, applySnapshot, clockNow, createJobState, jobDuration, phaseTimeline, progressOf, TERMINAL } from "../jobstate.js";
import { describeOutcome } from "../outcome.js";
import { compareIds, SignedOutError } from "../socket.js";
import { createCommentsPanel } from "./comments.js";
import { createJobActions } from "./actions.js";
import { drawResultCard } from "./result.js";
import { createSteeringPanel, maySteer } from "./steering.js";
import { createStepLog } from "./steps.js";

const TODO_ICON = { pending: "○", in_progress: "◐", completed: "●" };
/** While the model is unknown, re-read the snapshot at most this often. */
const MODEL_POLL_MS = 3000;
/** How often the step log is redrawn while history replays. */
const REPLAY_DRAW_MS = 250;

/**
 * @param {HTMLElement} main
 * @param {string} jobId
 * @param {{api: object, client: import("../socket.js").RealtimeClient, step?: number|null}} ctx
 * @returns {{unmount: () => void, goToStep: (n: number|null) => void}}
 */
export function mountJob(main, jobId, { api, client, step = null, me = null }) {
  const roomId = `job:${jobId}`;
  let state = null;
  let role = null;
  let disposed = false;
  let eventsApplied = 0;
  let replayUntil = null; // the room's head at join: events up to it are history
  let lastSeen = null; // id of the last room item shown
  let notFound = false;
  let loadError = null;
  let gapNotice = false;
  let modelAskedAt = 0;
  let finalAsked = false;
  let stepsDrawnAt = 0;

  const steering = createSteeringPanel({ client, roomId });
  const comments = createCommentsPanel({ client, roomId, onInstruct: (text) => steering.instruct(text) });
  let spec = null; // the submitted spec: who may steer (`steerable`)
  const title = h("h1", { class: "job-title", id: "job-title", tabindex: "-1" }, "Loading job…");
  const els = {
    status: h("span", { class: "badge status-badge", id: "job-status" }),
    demo: h("span", { class: "badge badge-demo", hidden: true }, "Replay"),
    meta: h("p", { class: "job-meta" }),
    promptText: h("pre", { class: "prompt-text" }),
    cancelArea: h("div", { class: "cancel-area" }),
    demoBanner: h(
      "p",
      { class: "banner banner-demo", hidden: true },
      h("strong", {}, "Demo run. "),
      "No Claude Code binary is configured, so this job replays a recorded transcript. Everything else (events, comments, reconnects) is real.",
    ),
    gapBanner: h("p", { class: "banner banner-warn", hidden: true, role: "status" }),
    workerBanner: h("p", { class: "banner banner-warn", hidden: true, role: "status" }, "The worker running this job stopped answering. It will be restarted or marked failed shortly."),
    errorBanner: h("div", { class: "banner banner-error", hidden: true, role: "alert" }),
    percent: h("span", { class: "progress-percent" }),
    progressLabel: h("span", { class: "progress-label", id: "progress-label" }),
    bar: h("div", {
      class: "progress-bar",
      id: "job-progress",
      role: "progressbar",
      "aria-valuemin": "0",
      "aria-valuemax": "100",
      "aria-labelledby": "progress-title",
      "aria-describedby": "progress-label",
    }),
    fill: h("div", { class: "progress-fill" }),
    now: h("p", { class: "now" }),
    message: h("blockquote", { class: "agent-message", hidden: true }),
    phases: h("ol", { class: "phases", "aria-label": "Phases" }),
    result: h("section", { class: "card result-card", "aria-labelledby": "result-title", hidden: true }),
    todos: h("ol", { class: "todos", id: "todos" }),
    todosEmpty: h("p", { class: "empty" }, "No to-do list yet."),
    todoCount: h("span", { class: "count" }),
    logs: h("details", { class: "card logs-card", hidden: true }),
    stats: h("dl", { class: "stats" }),
  };
  els.bar.append(els.fill);
  const stepLog = createStepLog({ jobId, api });
  const actions = createJobActions({
    el: els.cancelArea,
    api,
    jobId,
    onChange: () => render(),
    isDisposed: () => disposed,
    onCancelled: (snap) => {
      if (state && snap && compareIds(snap.lastEventId || "0-0", state.snapshot.lastEventId || "0-0") > 0) applySnapshot(state, snap);
    },
  });
  if (step !== null) stepLog.goToStep(step);

  main.replaceChildren(
    h(
      "article",
      { class: "job-page", "aria-labelledby": "job-title", dataset: { jobId } },
      h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, h("a", { href: "#/" }, "← All jobs")),
      h(
        "header",
        { class: "job-head" },
        h("div", { class: "job-head-text" }, h("div", { class: "job-badges" }, els.status, els.demo), title, els.meta),
        els.cancelArea,
      ),
      h("details", { class: "prompt" }, h("summary", {}, "Prompt"), els.promptText),
      els.errorBanner,
      els.demoBanner,
      els.gapBanner,
      els.workerBanner,
      h(
        "div",
        { class: "job-layout" },
        h(
          "div",
          { class: "job-main" },
          h(
            "section",
            { class: "card progress-card", "aria-labelledby": "progress-title" },
            h("div", { class: "progress-head" }, h("h2", { id: "progress-title" }, "Progress"), els.percent),
            els.bar,
            els.progressLabel,
            els.phases,
            els.now,
            els.message,
          ),
          steering.el,
          els.result,
          h(
            "section",
            { class: "card", "aria-labelledby": "todos-title" },
            h("h2", { id: "todos-title" }, "To-dos ", els.todoCount),
            els.todos,
            els.todosEmpty,
          ),
          stepLog.el,
          els.logs,
        ),
        h(
          "aside",
          { class: "job-side" },
          h("section", { class: "card", "aria-labelledby": "stats-title" }, h("h2", { id: "stats-title" }, "Usage"), els.stats),
          comments.el,
        ),
      ),
    ),
  );
  if (step === null) title.focus({ preventScroll: true });

  const render = frameScheduler(renderNow);

  function renderNow() {
    if (disposed) return;
    els.errorBanner.hidden = !(notFound || loadError);
    if (notFound) {
      setText(title, "Job not found");
      replaceChildren(els.errorBanner, h("p", {}, "There is no such job, or it belongs to another team."), h("a", { href: "#/" }, "Back to all jobs"));
      return;
    }
    if (loadError) replaceChildren(els.errorBanner, h("p", {}, loadError));
    if (!state) return;
    const s = state.snapshot;
    const t = promptTitle(s.prompt);
    setText(title, t);
    document.title = `${STATUS_LABEL[s.status] ?? s.status} · ${t} · progress-service`;
    setText(els.status, STATUS_LABEL[s.status] ?? s.status);
    els.status.dataset.status = s.status;
    els.demo.hidden = !s.demo;
    els.demoBanner.hidden = !s.demo;
    els.workerBanner.hidden = !state.workerLost || TERMINAL.has(s.status);
    els.gapBanner.hidden = !gapNotice;
    setText(els.gapBanner, "Some earlier events of this job are no longer kept, so the steps list may be incomplete. The status, progress and totals are current.");
    setText(els.promptText, s.prompt);
    renderMeta(s);
    actions.draw(s, role);
    // One clock reading for every duration this render shows.
    const at = clockNow(state);
    renderProgress(s, at);
    renderResult(s, at);
    renderTodos();
    // While a long history replays, the step log is redrawn a few times a
    // second, not on every frame: the page stays responsive as it catches up.
    const now = performance.now();
    if (!replayUntil || now - stepsDrawnAt > REPLAY_DRAW_MS) {
      stepsDrawnAt = now;
      stepLog.update(state, at);
    } else render();
    renderLogs();
    renderStats(s, at);
    const steer = maySteer({ role, me, snapshot: s, spec }) && !TERMINAL.has(s.status);
    steering.setAllowed(steer);
    comments.setSteerable(steer);
    comments.refresh();
  }

  function renderMeta(s) {
    const parts = [];
    if (s.model) parts.push(h("span", {}, "Model ", h("code", {}, s.model)));
    if (s.kind === "session") parts.push(h("span", {}, "Claude Code session on ", h("strong", {}, s.session?.host || "another machine"), ", reported through hooks"));
    if (s.session?.branch) parts.push(h("span", {}, "branch ", h("code", {}, s.session.branch)));
    parts.push(h("span", {}, "in ", s.workdir && s.workdir !== "." ? h("code", {}, s.workdir) : "the workspace root"));
    if (s.submittedBy) parts.push(h("span", {}, `by ${s.submittedBy}`));
    if (s.createdAt) parts.push(h("time", { datetime: new Date(s.createdAt).toISOString(), title: formatDateTime(s.createdAt) }, formatRelative(s.createdAt)));
    if (s.attempt > 1) parts.push(h("span", {}, `attempt ${s.attempt}`));
    const key = parts.map((p) => p.textContent).join("|");
    if (els.meta.dataset.key !== key) {
      els.meta.dataset.key = key;
      replaceChildren(els.meta, ...parts.flatMap((p, i) => (i ? [h("span", { class: "sep", "aria-hidden": "true" }, "·"), p] : [p])));
    }
  }

  function renderProgress(s, at) {
    const p = progressOf(state);
    const outcome = describeOutcome(s);
    setText(els.percent, `${p.percent}%`);
    setText(els.progressLabel, outcome && s.status !== "succeeded" ? `${STATUS_LABEL[s.status]} at ${p.percent}% · ${p.label}` : p.label);
    els.bar.setAttribute("aria-valuenow", String(p.percent));
    els.bar.setAttribute("aria-valuetext", `${p.percent}%: ${p.label}`);
    els.bar.dataset.percent = String(p.percent);
    els.bar.dataset.status = s.status;
    els.bar.classList.toggle("indeterminate", s.status === "running" && !p.byTodos && p.percent === 0);
    els.fill.style.width = `${p.percent}%`;

    const timeline = phaseTimeline(state, at);
    renderKeyed(
      els.phases,
      timeline,
      (ph) => ph.phase,
      () => h("li", { class: "phase" }, h("span", { class: "phase-dot", "aria-hidden": "true" }), h("span", { class: "phase-name" }), h("span", { class: "phase-time" }), h("span", { class: "visually-hidden phase-state" })),
      (li, ph) => {
        li.dataset.phase = ph.phase;
        li.dataset.state = ph.current ? "current" : ph.skipped ? "skipped" : ph.visited ? "done" : "upcoming";
        if (ph.current) li.setAttribute("aria-current", "step");
        else li.removeAttribute("aria-current");
        setText(li.querySelector(".phase-name"), PHASE_LABEL[ph.phase] ?? ph.phase);
        const shown = ph.ms !== null && !ph.skipped;
        setText(li.querySelector(".phase-time"), shown ? formatDuration(ph.ms) : "");
        // The exact value behind the rounded text, for tools and tests.
        if (shown) li.dataset.ms = String(Math.round(ph.ms));
        else delete li.dataset.ms;
        setText(li.querySelector(".phase-state"), ph.current ? " (current)" : ph.skipped ? " (skipped)" : ph.visited ? " (done)" : " (not reached)");
      },
    );

    const step = s.step;
    if (TERMINAL.has(s.status)) setText(els.now, ""); // the result card says how it ended
    else if (step && step.state === "started") setText(els.now, `Now: ${step.tool} ${step.title}`.trim());
    else setText(els.now, s.status === "queued" ? (s.attempt > 1 ? `Waiting for a worker to start attempt ${s.attempt}…` : "Waiting for a worker…") : `${PHASE_LABEL[s.phase] ?? s.phase}…`);
    const last = state.messages.at(-1);
    els.message.hidden = !last || TERMINAL.has(s.status);
    if (last) setText(els.message, last.text);
  }

  function renderResult(s, at) {
    const r = s.result;
    const terminal = TERMINAL.has(s.status);
    els.result.hidden = !terminal;
    if (els.result.hidden) return;
    // Ended, but the result never reached this page (trimmed log, a race
    // with a rejoin): the stored snapshot has it.
    if (!r && !finalAsked) {
      finalAsked = true;
      api.getJob(jobId).then((snap) => {
        if (disposed || !state || !snap.result) return;
        state.snapshot.result = snap.result;
        state.snapshot.usage = snap.usage;
        if (snap.costUsd !== null && snap.costUsd !== undefined) state.snapshot.costUsd = snap.costUsd;
        render();
      }, () => {});
    }
    drawResultCard(els.result, state, at);
  }

  function renderTodos() {
    const ended = TERMINAL.has(state.snapshot.status);
    const items = state.todos.map((t, i) => ({ ...t, i, unfinished: ended && t.state !== "completed" }));
    renderKeyed(
      els.todos,
      items,
      (t) => `${t.i}:${t.text}`,
      () => h("li", { class: "todo" }, h("span", { class: "todo-icon", "aria-hidden": "true" }), h("span", { class: "todo-text" }), h("span", { class: "todo-state" })),
      (li, t) => {
        li.dataset.state = t.state;
        li.toggleAttribute("data-unfinished", t.unfinished);
        setText(li.querySelector(".todo-icon"), t.unfinished ? "✕" : TODO_ICON[t.state] ?? "○");
        setText(li.querySelector(".todo-text"), t.text);
        const label = li.querySelector(".todo-state");
        // Visible when the job ended without it; otherwise for screen readers only.
        label.classList.toggle("visually-hidden", !t.unfinished);
        label.classList.toggle("badge", t.unfinished);
        setText(label, t.unfinished ? "not finished" : ` (${t.state.replace("_", " ")})`);
      },
    );
    els.todosEmpty.hidden = items.length > 0;
    setText(els.todosEmpty, ended ? "This job kept no to-do list." : "No to-do list yet.");
    const { done = 0, total = 0 } = state.snapshot.progress || {};
    setText(els.todoCount, total ? `${done}/${total}` : "");
  }

  function renderLogs() {
    els.logs.hidden = state.logs.length === 0;
    if (els.logs.hidden) return;
    const key = state.logs.at(-1).id;
    if (els.logs.dataset.key === key) return;
    els.logs.dataset.key = key;
    const open = els.logs.open;
    replaceChildren(
      els.logs,
      h("summary", {}, `Standard error (${state.logs.length} line${state.logs.length === 1 ? "" : "s"})`),
      h("pre", { class: "log-lines" }, state.logs.map((l) => l.line).join("\n")),
    );
    els.logs.open = open;
  }

  function renderStats(s, at) {
    const duration = jobDuration(state, at);
    const cost = s.costUsd ?? s.result?.costUsd ?? null;
    const rows = [
      ["Input tokens", formatTokens(s.usage?.inputTokens ?? 0)],
      ["Output tokens", formatTokens(s.usage?.outputTokens ?? 0)],
      ["Cost", cost !== null ? formatCost(cost) : TERMINAL.has(s.status) ? "not reported" : "when it ends"],
      ["Duration", duration !== null ? formatDuration(duration) : "—", duration],
      ["Turns", s.result ? String(s.result.turns) : "—"],
      ["Attempts", String(s.attempt || 1)],
    ];
    renderKeyed(
      els.stats,
      rows,
      (r) => r[0],
      () => h("div", { class: "stat" }, h("dt", {}), h("dd", {})),
      (div, [label, value, ms]) => {
        setText(div.querySelector("dt"), label);
        const dd = div.querySelector("dd");
        setText(dd, value);
        if (ms !== undefined && ms !== null) dd.dataset.ms = String(Math.round(ms));
        else delete dd.dataset.ms;
      },
    );
  }

  // ------------------------------------------------------------ data flow

  function onRoomMessage(msg) {
    switch (msg.type) {
      case "joined": {
        role = msg.role ?? role;
        const before = state?.snapshot.status;
        if (!state || eventsApplied === 0) state = createJobState(msg.snapshot);
        else applySnapshot(state, msg.snapshot);
        // Items up to the head are history (a replay): shown, not announced.
        replayUntil = msg.head && (!lastSeen || compareIds(msg.head, lastSeen) > 0) ? msg.head : null;
        if (before && before !== state.snapshot.status) announceStatus(state.snapshot);
        comments.onJoined(msg, { replayingUntil: replayUntil });
        if (!replayUntil) comments.liveNow();
        break;
      }
      case "event": {
        if (!state) return;
        eventsApplied += 1;
        lastSeen = msg.id;
        const history = replayUntil && compareIds(msg.id, replayUntil) <= 0;
        const change = applyEvent(state, msg, { live: !history });
        steering.onEvent(msg, { live: !history });
        // The worker sets the model (from Claude Code's first line) and the
        // demo flag in the snapshot without an event of their own: read them.
        if (change?.status === "running") askForModel(true);
        else if (!state.snapshot.model && !TERMINAL.has(state.snapshot.status)) askForModel();
        if (change && !history) {
          if (change.status) announceStatus(state.snapshot);
          if (change.workerLost) announce("The job's worker stopped answering.");
        }
        endOfReplay(msg.id);
        break;
      }
      case "chat":
        lastSeen = msg.id;
        comments.onChat(msg);
        endOfReplay(msg.id);
        break;
      case "presence":
        comments.onPresence(msg);
        break;
      case "gap":
        gapNotice = true;
        refetchAfterGap();
        break;
      case "error":
        if (msg.requestId) comments.onChatError(msg);
        else if (msg.code === "not_found" || msg.code === "forbidden") notFound = true;
        else if (msg.code === "limit") loadError = "Too many live views on this connection; close some tabs or reload.";
        break;
      default:
        break;
    }
    render();
  }

  function endOfReplay(id) {
    if (replayUntil && compareIds(id, replayUntil) >= 0) {
      replayUntil = null;
      comments.liveNow();
    }
  }

  function announceStatus(s) {
    const label = STATUS_LABEL[s.status] ?? s.status;
    announce(s.reason && s.status !== "succeeded" ? `Job ${label.toLowerCase()}: ${s.reason}` : `Job ${label.toLowerCase()}.`);
  }

  async function refetchAfterGap() {
    try {
      const snap = await api.getJob(jobId);
      if (disposed || !state) return;
      if (!state.snapshot.lastEventId || compareIds(snap.lastEventId || "0-0", state.snapshot.lastEventId) >= 0) applySnapshot(state, snap);
      render();
    } catch {
      // the joined snapshot is current enough; the next gap retries
    }
    try {
      // The stream no longer holds the oldest comments; the store has them all.
      let cursor;
      for (let pages = 0; pages < 20 && !disposed; pages += 1) {
        const page = await api.jobComments(jobId, cursor ? { cursor } : {});
        comments.addStored(page.items ?? []);
        cursor = page.nextCursor;
        if (!cursor) break;
      }
    } catch {
      // older comments stay unavailable; the live ones still arrive
    }
  }

  // The model is learnt from Claude Code's first line, which is no event of
  // its own: re-read the snapshot (a few times at most) until it names it.
  async function askForModel(force = false) {
    const now = Date.now();
    if (!force && (now - modelAskedAt < MODEL_POLL_MS || state.snapshot.status === "queued")) return;
    modelAskedAt = now;
    try {
      const snap = await api.getJob(jobId);
      if (disposed || !state) return;
      if (snap.model) state.snapshot.model = snap.model;
      state.snapshot.demo = snap.demo;
      render();
    } catch {
      // asked again after the next event
    }
  }

  async function load() {
    try {
      const snap = await api.getJob(jobId);
      if (disposed) return;
      if (!state) state = createJobState(snap); // the room's `joined` replaces it
    } catch (err) {
      if (disposed || err instanceof SignedOutError) return;
      if (err instanceof ApiError && err.status === 404) notFound = true;
      else loadError = err instanceof ApiError ? `Could not load the job: ${err.detail}` : "The server cannot be reached. The page will update when it is back.";
    }
    render();
  }

  // Who may steer depends on how the job was submitted (`steerable`).
  api.jobSpec(jobId).then(
    (got) => {
      spec = got;
      render();
    },
    () => {},
  );

  const unsubscribe = client.subscribe(roomId, onRoomMessage);
  const onState = () => {
    if (client.state.status === "live" && loadError && !notFound) {
      loadError = null;
      if (!state) load();
    }
    render();
  };
  client.addEventListener("state", onState);
  // Durations and "running for" keep counting between events.
  const ticker = window.setInterval(() => {
    if (state && !TERMINAL.has(state.snapshot.status)) render();
  }, 1000);
  load();

  return {
    unmount: () => {
      disposed = true;
      unsubscribe();
      client.removeEventListener("state", onState);
      window.clearInterval(ticker);
      stepLog.dispose();
    },
    goToStep: (n) => stepLog.goToStep(n),
  };
}
