// A job's state as the page knows it: the snapshot plus what the events add
// (attempts with their steps and phases, to-dos, messages). Pure functions, no DOM.
//
// Times all come from one clock, the server's: every event's `at`. "Now"
// while a job runs is the browser's clock corrected by the offset seen on
// live events, so a browser whose clock is off does not stretch or shrink
// durations. A view takes one `now` per render (clockNow) for all it shows,
// so the phases add up to the job's duration on screen too.

export const PHASES = ["queued", "starting", "planning", "editing", "testing", "reviewing", "finishing"];
export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const MAX_MESSAGES = 20;
const MAX_LOGS = 50;

/** Fresh state from a JobSnapshot (GET /api/jobs/{id} or `joined.snapshot`). */
export function createJobState(snapshot) {
  const state = {
    snapshot: clone(snapshot),
    steps: new Map(), // `${attempt}:${stepId}` -> step
    stepList: [], // steps in order of first appearance; step.n is its 1-based place
    attempts: new Map(), // attempt -> {attempt, startedAt, endedAt, endReason, phases, steps:[], maxPhase}
    todos: [],
    messages: [],
    logs: [],
    workerLost: false,
    maxPercent: 0, // progress shown never goes down
    clockOffset: 0, // server ms - browser ms, from recent live events
    offsetSamples: [], // (event `at` - arrival time) of the latest live events
    shownNow: -Infinity, // the latest clockNow: what the page showed never runs backwards
    version: 0, // bumps on every change of steps (views re-render lists only then)
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

function attemptOf(state, n) {
  let a = state.attempts.get(n);
  if (!a) {
    a = { attempt: n, startedAt: null, endedAt: null, endReason: null, phases: [], steps: [], maxPhase: 0 };
    state.attempts.set(n, a);
  }
  return a;
}

function seedFromSnapshot(state) {
  const s = state.snapshot;
  const a = attemptOf(state, s.attempt || 1);
  if (a.phases.length === 0 && s.phase && s.phase !== "queued") {
    // A placeholder until the attempt's own phase events arrive (a replay).
    notePhase(a, s.phase, s.startedAt || null);
    a.phases[0].seeded = true;
  }
  if (!a.startedAt && s.startedAt) a.startedAt = s.startedAt;
  // The current step may predate the retained events (after a gap).
  if (s.step && s.step.stepId) {
    const key = `${s.attempt || 1}:${s.step.stepId}`;
    if (!state.steps.has(key)) {
      // Provisional: when its own event arrives (a replay after a rejoin) it
      // moves to its place in event order.
      addStep(state, { key, stepId: s.step.stepId, tool: s.step.tool, title: s.step.title, state: s.step.state, durationMs: null, startedAt: s.step.startedAt ?? null, attempt: s.attempt || 1, provisional: true });
    }
  }
  if (TERMINAL.has(s.status)) finishOpenSteps(state, s.status);
}

function finishOpenSteps(state, status) {
  // A finished job has no running step any more, even if its last "ok" fell out of retention.
  for (const step of state.steps.values()) {
    if (step.state === "started") {
      step.state = status === "succeeded" ? "ok" : "error";
      step.interrupted = status !== "succeeded";
    }
  }
  state.version += 1;
}

function addStep(state, step) {
  step.n = state.stepList.length + 1;
  state.steps.set(step.key, step);
  state.stepList.push(step);
  attemptOf(state, step.attempt).steps.push(step);
  state.version += 1;
}

function removeStep(state, step) {
  state.steps.delete(step.key);
  state.stepList = state.stepList.filter((x) => x !== step);
  state.stepList.forEach((x, i) => {
    x.n = i + 1;
  });
  const a = state.attempts.get(step.attempt);
  if (a) a.steps = a.steps.filter((x) => x !== step);
}

const OFFSET_SAMPLES = 16;

// Each sample is the true offset minus that event's delivery delay, so the
// largest recent one is the best estimate; taking the latest one instead made
// running durations step back whenever an event was a little slower.
function noteClock(state, sample) {
  state.offsetSamples.push(sample);
  if (state.offsetSamples.length > OFFSET_SAMPLES) state.offsetSamples.shift();
  state.clockOffset = Math.max(...state.offsetSamples);
}

/** The server's clock now, as well as this browser can tell. */
export function serverNow(state, now = Date.now()) {
  return now + state.clockOffset;
}

/**
 * The "now" of one render: the server's clock, never earlier than the last
 * render's (a lowered offset estimate must not make a duration shrink).
 * Pass it to phaseTimeline, attemptDuration and jobDuration alike.
 */
export function clockNow(state, now = Date.now()) {
  state.shownNow = Math.max(state.shownNow, serverNow(state, now));
  return state.shownNow;
}

/**
 * Apply one `event` message. `live` says it arrived as it happened (not a
 * replay), so its `at` can calibrate the clock. Returns what a user should
 * hear about it (a status change), or null.
 */
export function applyEvent(state, msg, { live = false } = {}) {
  const s = state.snapshot;
  const d = msg.data || {};
  const attempt = msg.attempt || 1;
  if (attempt > (s.attempt || 1)) s.attempt = attempt;
  s.lastEventId = msg.id;
  if (live && msg.at) noteClock(state, msg.at - Date.now());
  const a = attemptOf(state, attempt);
  switch (msg.kind) {
    case "status": {
      const changed = s.status !== d.status;
      s.status = d.status;
      if (d.phase && d.phase !== "queued" && d.status !== "queued") notePhase(a, d.phase, msg.at);
      // A run starts in "starting"; its phase event follows this one and may
      // be handled in a later task. Until then the attempt's time since its
      // start still belongs to a phase: the strip adds up to the Duration.
      else if (d.status === "running" && a.phases.length === 0) notePhase(a, "starting", msg.at);
      if (d.reason !== undefined) s.reason = d.reason;
      // The worker that runs the job says whether it is the replay demo.
      if (typeof d.demo === "boolean") s.demo = d.demo;
      if (d.status === "running") {
        if (!a.startedAt) a.startedAt = msg.at;
        if (!s.startedAt) s.startedAt = msg.at;
        a.endedAt = null;
      }
      if (d.status === "queued" && a.startedAt) {
        // This attempt is over (its worker was lost); the next one starts later.
        a.endedAt = msg.at;
        a.endReason = d.reason ?? null;
        for (const step of a.steps) {
          if (step.state === "started") {
            step.state = "error";
            step.interrupted = true;
          }
        }
        state.version += 1;
      }
      if (TERMINAL.has(d.status)) {
        s.finishedAt = s.finishedAt || msg.at;
        a.endedAt = a.endedAt || msg.at;
        s.step = null;
        finishOpenSteps(state, d.status);
      }
      if (d.status === "running") state.workerLost = false;
      return changed ? { status: d.status, reason: d.reason ?? null } : null;
    }
    case "phase":
      if (d.phase && d.phase !== "queued") {
        if (!a.startedAt) a.startedAt = d.since ?? msg.at;
        notePhase(a, d.phase, d.since ?? msg.at);
      }
      s.phase = d.phase || s.phase;
      return null;
    case "step": {
      const key = `${attempt}:${d.stepId}`;
      const prev = state.steps.get(key);
      if (prev?.provisional) removeStep(state, prev);
      const known = prev && !prev.provisional ? prev : null;
      const step = known ?? { key, stepId: d.stepId, attempt, startedAt: msg.at, provisional: false };
      step.tool = d.tool ?? step.tool ?? "";
      step.title = d.title ?? step.title ?? "";
      step.state = d.state;
      step.durationMs = d.durationMs ?? step.durationMs ?? null;
      if (d.parentStepId) step.parentStepId = d.parentStepId;
      if (d.input) step.input = d.input;
      if (d.state !== "started") {
        step.finishedAt = msg.at;
        step.output = d.output ?? null;
        step.outputChars = d.outputChars ?? null;
        step.exitCode = d.exitCode ?? null;
        step.error = d.error ?? null;
      }
      if (!known) addStep(state, step);
      else state.version += 1;
      if (step.parentStepId) {
        const parent = state.steps.get(`${attempt}:${step.parentStepId}`);
        step.depth = parent ? Math.min(4, (parent.depth || 0) + 1) : 1;
      }
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

function notePhase(a, phase, at) {
  if (a.phases.length === 1 && a.phases[0].seeded) a.phases = [];
  const last = a.phases.at(-1);
  if (!last || last.phase !== phase) a.phases.push({ phase, since: at ?? null });
  const index = PHASES.indexOf(phase);
  if (index > a.maxPhase) a.maxPhase = index;
}

/** The attempt the page shows as current (the latest one). */
export function currentAttempt(state) {
  return attemptOf(state, state.snapshot.attempt || 1);
}

/**
 * What the progress bar shows: to-dos done/total when known, else how far
 * through the phases the job is; never less than was shown before. A
 * succeeded job is 100 %.
 */
export function progressOf(state) {
  const snapshot = state.snapshot;
  const { done = 0, total = 0 } = snapshot.progress || {};
  const status = snapshot.status;
  const a = currentAttempt(state);
  const phase = PHASES[a.maxPhase] ?? snapshot.phase;
  let percent;
  let label;
  if (status === "succeeded") {
    percent = 100;
    label = total > 0 ? `Done · ${done} of ${total} to-dos` : "Done";
  } else {
    // All to-dos done is not the end: only the result is. Stay below 100 until then.
    // Once there is a to-do list it alone moves the bar (from where the
    // phases left it: the bar never goes back).
    if (total > 0) percent = Math.min(99, Math.round((100 * Math.min(done, total)) / total));
    else if (status === "queued" && !a.startedAt) percent = 0;
    else {
      // Phases advance the bar to at most 90 %; reaching "finishing" by being
      // stopped is no progress.
      const reached = TERMINAL.has(status) ? Math.min(a.maxPhase, PHASES.indexOf("reviewing")) : a.maxPhase;
      percent = Math.round((90 * reached) / (PHASES.length - 1));
    }
    label = total > 0 ? `${done} of ${total} to-dos done` : PHASE_WORDS[phase] ?? phase;
  }
  state.maxPercent = Math.max(state.maxPercent, percent);
  return { percent: state.maxPercent, label, byTodos: total > 0 };
}

const PHASE_WORDS = {
  queued: "Waiting for a worker",
  starting: "Starting",
  planning: "Planning",
  editing: "Editing",
  testing: "Testing",
  reviewing: "Reviewing",
  finishing: "Finishing",
};

/**
 * The phase strip of the current attempt: [{phase, ms, visited, current}] in
 * PHASES order. The current phase is the furthest one reached (a job that
 * reads a file while editing is still editing), so a finished phase is never
 * current again; time spent back in an earlier phase counts to that phase.
 */
export function phaseTimeline(state, now = serverNow(state)) {
  const s = state.snapshot;
  const a = currentAttempt(state);
  const terminal = TERMINAL.has(s.status);
  const end = a.endedAt ?? (terminal ? s.finishedAt || now : now);
  const spent = new Map();
  a.phases.forEach((p, i) => {
    const next = a.phases[i + 1];
    const to = next ? next.since : end;
    if (p.since && to) spent.set(p.phase, (spent.get(p.phase) || 0) + Math.max(0, to - p.since));
    else if (!spent.has(p.phase)) spent.set(p.phase, null);
  });
  // Queued: from submission to this attempt's start (or until now).
  const queuedFrom = a.attempt === 1 ? s.createdAt : state.attempts.get(a.attempt - 1)?.endedAt;
  const queuedTo = a.startedAt ?? (s.status === "queued" ? now : null);
  const queuedMs = queuedFrom && queuedTo ? Math.max(0, queuedTo - queuedFrom) : null;
  return PHASES.map((phase, index) => ({
    phase,
    ms: phase === "queued" ? queuedMs : spent.get(phase) ?? null,
    visited: phase === "queued" ? true : index <= a.maxPhase && (spent.has(phase) || index < a.maxPhase),
    skipped: phase !== "queued" && index < a.maxPhase && !spent.has(phase),
    current: !terminal && (s.status === "queued" ? phase === "queued" : index === a.maxPhase && phase !== "queued"),
  }));
}

/** Wall time of an attempt, on the server's clock: start to end (or now). */
export function attemptDuration(state, a, now = serverNow(state)) {
  if (!a.startedAt) return null;
  const end = a.endedAt ?? (TERMINAL.has(state.snapshot.status) ? state.snapshot.finishedAt : now);
  return end ? Math.max(0, end - a.startedAt) : null;
}

/** Wall time of the whole job: the first attempt's start to the end (or now). */
export function jobDuration(state, now = serverNow(state)) {
  const first = [...state.attempts.values()].map((a) => a.startedAt).filter(Boolean);
  const start = first.length ? Math.min(...first) : state.snapshot.startedAt;
  if (!start) return null;
  const end = TERMINAL.has(state.snapshot.status) ? state.snapshot.finishedAt || now : now;
  return Math.max(0, end - start);
}

function clone(value) {
  return value ? JSON.parse(JSON.stringify(value)) : value;
}
