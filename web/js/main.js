// Entry point: sign-in, the hash router and the one realtime connection.
//
// Routes: `#/` (jobs list and submit form), `#/jobs/<id>` (a job's page).
// `#token=…` (the link `progress-service dev` prints) signs in and is
// removed from the address bar at once.

import { createApi } from "./api.js";
import { clearToken, currentToken, setToken, takeTokenFromFragment } from "./auth.js";
import { RealtimeClient } from "./socket.js";
import { bindIndicator } from "./views/indicator.js";
import { mountJob } from "./views/job.js";
import { mountJobs } from "./views/jobs.js";
import { mountSignIn } from "./views/signin.js";

const main = document.getElementById("main");
const signOutButton = document.getElementById("sign-out");
const whoami = document.getElementById("whoami");
const indicator = document.getElementById("connection");

let unmount = () => {};
let signInMessage = null;

const api = createApi({
  getToken: currentToken,
  onUnauthorized: (message) => signOut(message),
});

const wsUrl = `${window.location.protocol === "https:" ? "wss" : "ws"}://${window.location.host}/ws`;
const client = new RealtimeClient({
  url: wsUrl,
  fetchTicket: () => api.wsTicket(),
});
bindIndicator(indicator, client);
client.addEventListener("state", (e) => {
  if (e.detail.signedOut) signOut(e.detail.reason);
});

signOutButton.addEventListener("click", () => signOut(null));

function signOut(message) {
  clearToken();
  client.stop();
  signInMessage = message;
  route();
}

function navigate(hash) {
  if (window.location.hash === hash) route();
  else window.location.hash = hash;
}

function route() {
  if (takeTokenFromFragment()) signInMessage = null;
  unmount();
  unmount = () => {};
  const token = currentToken();
  signOutButton.hidden = !token;
  whoami.hidden = !token;
  if (!token) {
    client.stop();
    document.title = "Sign in · progress-service";
    unmount = mountSignIn(main, {
      message: signInMessage,
      onToken: async (candidate) => {
        const verdict = await api.checkToken(candidate);
        if (verdict === "refused") return "That token was refused: it is invalid, expired or revoked.";
        if (verdict !== "ok") return "The server cannot be reached. Try again in a moment.";
        setToken(candidate);
        signInMessage = null;
        route();
        return null;
      },
    });
    return;
  }
  client.start();
  showIdentity();
  const hash = window.location.hash.replace(/^#/, "");
  const job = /^\/jobs\/([A-Za-z0-9_-]{1,64})\/?$/.exec(hash);
  if (job) {
    unmount = mountJob(main, job[1], { api, client });
    return;
  }
  if (hash && hash !== "/") {
    window.history.replaceState(null, "", "#/");
  }
  document.title = "Jobs · progress-service";
  unmount = mountJobs(main, { api, client, navigate });
}

let identityFor = null;
/** Show who is signed in (once per token): "name · team (role)". */
function showIdentity() {
  const token = currentToken();
  if (identityFor === token) return;
  identityFor = token;
  api.me().then(
    (me) => {
      whoami.textContent = `${me.userName} · ${me.teamName} (${me.role})`;
    },
    () => {
      identityFor = null; // retried on the next route
    },
  );
}

window.addEventListener("hashchange", route);
window.addEventListener("pagehide", () => client.stop());
// Back from the back/forward cache: the connection was closed on pagehide.
window.addEventListener("pageshow", (e) => {
  if (e.persisted) route();
});
route();
