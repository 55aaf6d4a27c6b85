// Where the page keeps the user's API token: sessionStorage, never a URL.
//
// `progress-service dev` prints a link with the token in the fragment
// (`/#token=…`); fragments are never sent to a server. We read it once, store
// it for this tab, and replace the address so it is not left in the history,
// a bookmark, or a screenshot.

const KEY = "progress-service.token";

/** If the address carries `#token=…`, store it and remove it from the address bar. */
export function takeTokenFromFragment() {
  const hash = window.location.hash;
  if (!hash.startsWith("#token=") && !hash.includes("&token=")) return false;
  const params = new URLSearchParams(hash.slice(1));
  const token = params.get("token");
  params.delete("token");
  // Keep a route that came with it (e.g. `#/jobs/…&token=…`), else the list.
  const rest = [...params.keys()].find((k) => k.startsWith("/"));
  const route = rest ? `#${rest}` : "#/";
  window.history.replaceState(null, "", `${window.location.pathname}${window.location.search}${route}`);
  if (token && token.trim()) {
    setToken(token.trim());
    return true;
  }
  return false;
}

export function getToken() {
  try {
    return window.sessionStorage.getItem(KEY);
  } catch {
    return null; // storage disabled: the user signs in again per page load
  }
}

export function setToken(token) {
  try {
    window.sessionStorage.setItem(KEY, token);
  } catch {
    memoryToken = token;
  }
}

export function clearToken() {
  memoryToken = null;
  try {
    window.sessionStorage.removeItem(KEY);
  } catch {
    // nothing stored
  }
}

// Fallback when sessionStorage is unavailable (private modes, sandboxed frames).
let memoryToken = null;
export function currentToken() {
  return getToken() ?? memoryToken;
}
