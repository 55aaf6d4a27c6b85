// Sign-in: the API token is exchanged once for an HttpOnly session cookie.
//
// The page never keeps the token: `POST /api/session` answers with a cookie
// (HttpOnly, SameSite=Strict) that every tab of this browser shares, and a
// CSRF secret the page sends as `X-CSRF-Token` on state-changing calls. A
// new tab learns it is signed in from `GET /api/session`. Sign-in and
// sign-out are broadcast to the other tabs.
//
// `progress-service dev` prints a link with the token in the fragment
// (`/#token=…`); fragments are never sent to a server. We read it once and
// replace the address so it is not left in the history or a bookmark.

const channel = typeof BroadcastChannel === "function" ? new BroadcastChannel("progress-service.auth") : null;

/** {csrf, me} of the signed-in session, or null. */
let session = null;

export function currentSession() {
  return session;
}

/** Tell other tabs (they re-check with the server; nothing secret is sent). */
function broadcast(what) {
  try {
    channel?.postMessage(what);
  } catch {
    // a closed channel: the other tabs find out on their next request
  }
}

/** `listener("signed-in" | "signed-out")` when another tab changes the session. */
export function onOtherTab(listener) {
  channel?.addEventListener("message", (e) => listener(e.data));
}

/** If the address carries `#token=…`, remove it and return the token (else null). */
export function takeTokenFromFragment() {
  const hash = window.location.hash;
  if (!hash.startsWith("#token=") && !hash.includes("&token=")) return null;
  const params = new URLSearchParams(hash.slice(1));
  const token = params.get("token");
  params.delete("token");
  // Keep a route that came with it (e.g. `#/jobs/…&token=…`), else the list.
  const rest = [...params.keys()].find((k) => k.startsWith("/"));
  const route = rest ? `#${rest}` : "#/";
  window.history.replaceState(null, "", `${window.location.pathname}${window.location.search}${route}`);
  return token && token.trim() ? token.trim() : null;
}

async function call(method, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && session) headers["X-CSRF-Token"] = session.csrf;
  return fetch("/api/session", {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
    cache: "no-store",
  });
}

/** "ok", "refused" or "unreachable": exchange a token for the session cookie. */
export async function signIn(token) {
  try {
    const r = await call("POST", { token });
    if (r.status === 201) {
      session = await r.json();
      broadcast("signed-in");
      return "ok";
    }
    return r.status === 401 || r.status === 400 ? "refused" : "unreachable";
  } catch {
    return "unreachable";
  }
}

/** "ok" (signed in), "none" (no session) or "unreachable": ask the server about the cookie. */
export async function loadSession() {
  try {
    const r = await call("GET");
    if (!r.ok) return "unreachable";
    const found = await r.json();
    session = found.me && found.csrf ? found : null;
    return session ? "ok" : "none";
  } catch {
    return "unreachable";
  }
}

/** End the session on the server (the cookie is cleared) and locally. */
export async function signOut({ tellOthers = true } = {}) {
  const had = session;
  if (had) {
    try {
      await call("DELETE");
    } catch {
      // offline: the cookie expires on its own; this tab forgets it now
    }
  }
  session = null;
  if (tellOthers && had) broadcast("signed-out");
}

/** Forget the session locally (the server said it ended). */
export function dropSession() {
  session = null;
}
