// The HTTP API client: JSON over fetch with the session cookie and its CSRF header.

import { SignedOutError } from "./socket.js";

/** A 4xx/5xx answer: `detail` and the `extra` messages are for the user. */
export class ApiError extends Error {
  constructor(status, body) {
    const detail = (body && typeof body.detail === "string" && body.detail) || `HTTP ${status}`;
    super(detail);
    this.status = status;
    this.detail = detail;
    this.extra = normalizeExtra(body?.extra);
  }

  /** Per-field messages ({field, message}), from Litestar's validation `extra`. */
  get fieldErrors() {
    return this.extra;
  }
}

function normalizeExtra(extra) {
  if (!extra) return [];
  const list = Array.isArray(extra) ? extra : typeof extra === "object" ? Object.entries(extra).map(([key, message]) => ({ key, message })) : [{ message: String(extra) }];
  return list.map((item) =>
    typeof item === "string" ? { field: null, message: item } : { field: item.key ?? null, message: String(item.message ?? JSON.stringify(item)) },
  );
}

/**
 * @param {{getSession: () => ({csrf: string}|null), onUnauthorized: (message: string) => void}} options
 */
export function createApi({ getSession, onUnauthorized }) {
  async function request(method, path, body) {
    const session = getSession();
    if (!session) {
      onUnauthorized("Sign in to continue.");
      throw new SignedOutError("Sign in to continue.");
    }
    const headers = { Accept: "application/json" };
    if (method !== "GET") headers["X-CSRF-Token"] = session.csrf;
    const init = { method, headers, cache: "no-store", credentials: "same-origin", referrerPolicy: "no-referrer" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init); // network errors propagate as TypeError
    let data = null;
    const text = await response.text();
    if (text) {
      try {
        data = JSON.parse(text);
      } catch {
        data = { detail: text.slice(0, 300) };
      }
    }
    if (response.status === 401) {
      const message = "Your sign-in ended (the token expired or was revoked, or you signed out in another tab). Sign in again.";
      onUnauthorized(message);
      throw new SignedOutError(message);
    }
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }

  const q = (params) => {
    const s = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") s.set(k, String(v));
    const str = s.toString();
    return str ? `?${str}` : "";
  };
  const enc = encodeURIComponent;

  return {
    listJobs: ({ status, limit = 30, cursor } = {}) => request("GET", `/api/jobs${q({ status, limit, cursor })}`),
    getJob: (id) => request("GET", `/api/jobs/${enc(id)}`),
    /** What the job was submitted with (to run it again). */
    jobSpec: (id) => request("GET", `/api/jobs/${enc(id)}/spec`),
    submitJob: (spec) => request("POST", "/api/jobs", spec),
    cancelJob: (id) => request("POST", `/api/jobs/${enc(id)}/cancel`),
    jobEvents: (id, { since, limit } = {}) => request("GET", `/api/jobs/${enc(id)}/events${q({ since, limit })}`),
    /** One step's stored input and output, per attempt. */
    jobStep: (id, stepId) => request("GET", `/api/jobs/${enc(id)}/steps/${enc(stepId)}`),
    /** Where the job's raw log (JSON lines) downloads from; the cookie authenticates it. */
    rawLogUrl: (id) => `/api/jobs/${enc(id)}/log.jsonl`,
    jobComments: (id, params = {}) => request("GET", `/api/jobs/${enc(id)}/comments${q(params)}`),
    /** A fresh single-use WebSocket ticket. */
    wsTicket: async () => (await request("POST", "/api/ws-tickets")).ticket,
    /** {userId, userName, teamId, teamName, role, expiresAt} of the signed-in token. */
    me: () => request("GET", "/api/me"),
  };
}
