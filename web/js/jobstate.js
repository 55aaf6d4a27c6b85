// A job's state as the page knows it: the snapshot plus what the events add
// (steps, to-dos, phase timeline, messages). Pure functions, no DOM.

export const PHASES = ["queued", "starting", "planning", "editing", "testing", "reviewing", "finishing"];
export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const MAX_MESSAGES = 20;
const MAX_LOGS = 50;

/** Fresh state from a JobSnapshot (GET /api/jobs/{id} or `joined.snapshot`). */
export function createJobState(snapshot) {
  const state = {
    snapshot: clone(snapshot),
    steps: new Map(), // `${attempt}:${stepId}` -> step
    todos: [],
    phases: [], // [{phase, since}] in order of transitions
    messages: [],
    logs: [],
    workerLost: false,
  };
  seedFromSnapshot(state);
  return state;
}

/**
 * Take a newer snapshot (a `joined` after reconnect, or a refetch after a
 * gap). Events already applied stay; the snapshot's fields win.
 */
export function applySnapshot(state, snapshot) {
  state.snapshot = clone(snapshot);
  seedFromSnapshot(state);
}

function seedFromSnapshot(state) {
  const s = state.snapshot;
  if (state.phases.length === 0) state.phases.push({ phase: s.phase || "queued", since: s.startedAt || s.createdAt || null });
  else if (state.phases.at(-1).phase !== s.phase && s.phase) state.phases.push({ phase: s.phase, since: null });
  // The current step may predate the retained events (after a gap).
  if (s.step && s.step.stepId) {
    const key = `${s.attempt || 1}:${s.step.stepId}`;
    if (!state.steps.has(key)) {
      // Provisional: when its own event arrives (a replay after a rejoin) it
      // moves to its place in event order.
      state.steps.set(key, { key, stepId: s.step.stepId, tool: s.step.tool, title: s.step.title, state: s.step.state, durationMs: null, startedAt: s.step.startedAt ?? null, attempt: s.attempt || 1, provisional: true });
    }
  }
  if (TERMINAL.has(s.status)) {
    // A finished job has no running step any more, even if its last "ok" fell out of retention.
    for (const step of state.steps.values()) if (step.state === "started") step.state = s.status === "succeeded" ? "ok" : "error";
  }
}

/**
 * Apply one `event` message. Returns what a user should hear about it (a
 * status change), or null.
 */
export function applyEvent(state, msg) {
  const s = state.snapshot;
  const d = msg.data || {};
  const attempt = msg.attempt || 1;
  if (attempt > (s.attempt || 1)) s.attempt = attempt;
  s.lastEventId = msg.id;
  switch (msg.kind) {
    case "status": {
      const changed = s.status !== d.status;
      s.status = d.status;
      if (d.phase) setPhase(state, d.phase, msg.at);
      if (d.reason !== undefined) s.reason = d.reason;
      if (d.status === "running" && !s.startedAt) s.startedAt = msg.at;
      if (TERMINAL.has(d.status)) {
        s.finishedAt = s.finishedAt || msg.at;
        s.step = null;
        for (const step of state.steps.values()) if (step.state === "started") step.state = d.status === "succeeded" ? "ok" : "error";
      }
      if (d.status === "running") state.workerLost = false;
      return changed ? { status: d.status, reason: d.reason ?? null } : null;
    }
    case "phase":
      setPhase(state, d.phase, d.since ?? msg.at);
      return null;
    case "step": {
      const key = `${attempt}:${d.stepId}`;
      const prev = state.steps.get(key);
      const step = {
        key,
        stepId: d.stepId,
        provisional: false,
        tool: d.tool ?? prev?.tool ?? "",
        title: d.title ?? prev?.title ?? "",
        state: d.state,
        durationMs: d.durationMs ?? prev?.durationMs ?? null,
        startedAt: prev && !prev.provisional ? prev.startedAt : msg.at,
        attempt,
      };
      if (prev?.provisional) state.steps.delete(key);
      state.steps.set(key, step);
      s.step = d.state === "started" ? { stepId: d.stepId, tool: step.tool, title: step.title, state: d.state, startedAt: step.startedAt } : s.step?.stepId === d.stepId ? null : s.step;
      return null;
    }
    case "todo":
      state.todos = Array.isArray(d.items) ? d.items : [];
      s.progress = { done: d.done ?? state.todos.filter((t) => t.state === "completed").length, total: d.total ?? state.todos.length };
      return null;
    case "usage":
      s.usage = { inputTokens: d.inputTokens ?? 0, outputTokens: d.outputTokens ?? 0 };
      if (d.costUsd !== undefined && d.costUsd !== null) s.costUsd = d.costUsd;
      return null;
    case "message":
      state.messages.push({ id: msg.id, at: msg.at, text: d.text ?? "" });
      if (state.messages.length > MAX_MESSAGES) state.messages.shift();
      return null;
    case "log":
      state.logs.push({ id: msg.id, at: msg.at, stream: d.stream, line: d.line ?? "" });
      if (state.logs.length > MAX_LOGS) state.logs.shift();
      return null;
    case "result":
      s.result = { ...d };
      if (d.costUsd !== undefined) s.costUsd = d.costUsd;
      return null;
    case "worker":
      state.workerLost = d.state === "lost";
      return d.state === "lost" ? { workerLost: true } : null;
    default:
      return null; // kinds of a later protocol version
  }
}

function setPhase(state, phase, at) {
  if (!phase) return;
  state.snapshot.phase = phase;
  const last = state.phases.at(-1);
  if (!last || last.phase !== phase) state.phases.push({ phase, since: at ?? null });
}

/**
 * What the progress bar shows: to-dos done/total when known, else how far
 * through the phases the job is. A succeeded job is 100 %.
 */
export function progressOf(snapshot) {
  const { done = 0, total = 0 } = snapshot.progress || {};
  const status = snapshot.status;
  if (status === "succeeded") {
    return { percent: 100, label: total > 0 ? `Done · ${done} of ${total} to-dos` : "Done", byTodos: total > 0 };
  }
  if (total > 0) {
    // All to-dos done is not the end: only the result is. Stay below 100 until then.
    const percent = Math.min(99, Math.round((100 * Math.min(done, total)) / total));
    return { percent, label: `${done} of ${total} to-dos done`, byTodos: true };
  }
  const index = Math.max(0, PHASES.indexOf(snapshot.phase));
  // Phases advance the bar to at most 90 %: only the result says "done".
  const percent = status === "queued" ? 0 : Math.round((90 * index) / (PHASES.length - 1));
  return { percent, label: `Phase ${index + 1} of ${PHASES.length}: ${snapshot.phase}`, byTodos: false };
}

/** Time spent in each phase: [{phase, ms, visited, current}] in PHASES order. */
export function phaseTimeline(state, now = Date.now()) {
  const s = state.snapshot;
  const end = TERMINAL.has(s.status) ? s.finishedAt || now : now;
  const spent = new Map();
  state.phases.forEach((p, i) => {
    const next = state.phases[i + 1];
    const to = next?.since ?? (next ? null : end);
    if (p.since && to) spent.set(p.phase, (spent.get(p.phase) || 0) + Math.max(0, to - p.since));
    else if (!spent.has(p.phase)) spent.set(p.phase, null);
  });
  return PHASES.map((phase) => ({
    phase,
    ms: spent.get(phase) ?? null,
    visited: spent.has(phase),
    current: !TERMINAL.has(s.status) && s.phase === phase,
  }));
}

function clone(value) {
  return value ? JSON.parse(JSON.stringify(value)) : value;
}
