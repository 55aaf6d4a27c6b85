// Human-readable numbers, durations and times.

export function formatDuration(ms) {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return "—";
  if (ms < 1000) return `${Math.max(0, Math.round(ms))} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s < 10 ? s.toFixed(1) : Math.round(s)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.floor(s % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

export function formatCost(usd) {
  if (usd === null || usd === undefined || !Number.isFinite(usd)) return "—";
  if (usd === 0) return "$0.00";
  return usd < 0.01 ? `$${usd.toFixed(4)}` : `$${usd.toFixed(2)}`;
}

export function formatTokens(n) {
  if (!Number.isFinite(n)) return "—";
  if (n < 1000) return String(n);
  if (n < 1_000_000) return `${(n / 1000).toFixed(n < 10_000 ? 1 : 0)}k`;
  return `${(n / 1_000_000).toFixed(1)}M`;
}

const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });

export function formatRelative(ms, now = Date.now()) {
  if (!ms) return "";
  const diff = (ms - now) / 1000;
  const abs = Math.abs(diff);
  if (abs < 45) return "just now";
  if (abs < 3600) return relative.format(Math.round(diff / 60), "minute");
  if (abs < 86400) return relative.format(Math.round(diff / 3600), "hour");
  return relative.format(Math.round(diff / 86400), "day");
}

export function formatDateTime(ms) {
  return ms ? new Date(ms).toLocaleString() : "";
}

// One formatter for all clock times: toLocaleTimeString builds a new one per
// call, which costs more than drawing a row of the step log.
const clock = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });

export function formatClock(ms) {
  return ms ? clock.format(ms) : "";
}

/** The first line of a prompt, shortened: a job's title. */
export function promptTitle(prompt, max = 90) {
  const line = (prompt || "").trim().split("\n", 1)[0].trim() || "(empty prompt)";
  return line.length > max ? `${line.slice(0, max - 1)}…` : line;
}

export const STATUS_LABEL = {
  queued: "Queued",
  running: "Running",
  succeeded: "Succeeded",
  failed: "Failed",
  cancelled: "Cancelled",
};

export const PHASE_LABEL = {
  queued: "Queued",
  starting: "Starting",
  planning: "Planning",
  editing: "Editing",
  testing: "Testing",
  reviewing: "Reviewing",
  finishing: "Finishing",
};
