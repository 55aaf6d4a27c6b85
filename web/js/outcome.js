// How a job ended, in one human sentence per kind of ending; the raw text
// (API error JSON, CLI subtypes) is kept as the detail behind a disclosure.

/**
 * @param {object} s a JobSnapshot
 * @returns {{kind: string, sentence: string, detail: string|null}|null} null while the job runs
 */
export function describeOutcome(s) {
  const r = s.result || null;
  const raw = [s.reason, r?.error].filter((x, i, all) => x && all.indexOf(x) === i).join("\n");
  const text = `${s.reason ?? ""}\n${r?.error ?? ""}`;
  const detail = raw || null;
  if (s.status === "succeeded") return { kind: "succeeded", sentence: "Finished: the agent completed the task.", detail: null };
  if (s.status === "cancelled") {
    const by = /cancelled by (.+?)( before it started)?$/m.exec(s.reason ?? "");
    const who = by ? by[1] : "someone";
    return {
      kind: "cancelled",
      sentence: by?.[2] ? `Cancelled by ${who} before it started.` : `Cancelled by ${who} while it was running.`,
      detail: null,
    };
  }
  if (s.status !== "failed") return null;
  let m;
  if ((m = /timed out after (\d+)\s*s/.exec(text))) {
    return { kind: "timeout", sentence: `Stopped at its time limit of ${formatLimit(Number(m[1]))}.`, detail };
  }
  if (/error_max_turns|maximum number of turns/i.test(text)) {
    const limit = /maximum number of turns \((\d+)\)/i.exec(text)?.[1] ?? (r?.turns ? String(r.turns) : null);
    return {
      kind: "max_turns",
      sentence: limit ? `Stopped at the turn limit: it used all ${limit} turns it was allowed before finishing.` : "Stopped at the turn limit before finishing.",
      detail,
    };
  }
  if (/\b529\b|overloaded/i.test(text)) {
    return { kind: "overloaded", sentence: "The Anthropic API was overloaded (529); Claude Code retried and gave up. Run it again in a few minutes.", detail };
  }
  if (/\b429\b|rate.?limit/i.test(text)) {
    return { kind: "rate_limited", sentence: "The Anthropic API rate limit was reached; Claude Code retried and gave up. Run it again later.", detail };
  }
  if (/invalid api key|\b401\b|authentication|unauthori[sz]ed|\/login|credit balance/i.test(text)) {
    return { kind: "auth", sentence: "Claude Code could not sign in to the Anthropic API (missing or invalid API key, or no credit). An admin must fix the worker's credentials.", detail };
  }
  if (/can't reach|cannot reach|ENOTFOUND|ECONNREFUSED|network/i.test(text)) {
    return { kind: "network", sentence: "Claude Code could not reach the Anthropic API from the worker.", detail };
  }
  if (/prompt is too long|context/i.test(text) && /too long/i.test(text)) {
    return { kind: "too_long", sentence: "The conversation grew too long for the model.", detail };
  }
  if ((m = /worker (lost|stopped)/.exec(text))) {
    return {
      kind: "worker_lost",
      sentence: `The worker running it ${m[1] === "lost" ? "stopped answering" : "was shut down"} on attempt ${s.attempt || 1}, and no attempts were left.`,
      detail,
    };
  }
  if ((m = /exited with code (-?\d+) and no result/.exec(text))) {
    return { kind: "crashed", sentence: `Claude Code exited (code ${m[1]}) without reporting a result.`, detail };
  }
  if (/could not start/.test(text)) {
    return { kind: "not_started", sentence: "The worker could not start Claude Code.", detail };
  }
  return { kind: "error", sentence: "The agent stopped with an error.", detail };
}

function formatLimit(seconds) {
  if (seconds % 3600 === 0) return `${seconds / 3600} h`;
  if (seconds % 60 === 0) return `${seconds / 60} min`;
  return `${seconds} s`;
}
