// Entry point: sign-in, the hash router and the one realtime connection.
//
// Routes: `#/` (jobs list and submit form), `#/jobs/<id>` (a job's page),
// `#/jobs/<id>/step-<n>` (that page, scrolled to step n).
// `#token=…` (the link `progress-service dev` prints) signs in and is
// removed from the address bar at once.

import { createApi } from "./api.js";
import { currentSession, dropSession, loadSession, onOtherTab, signIn, signOut as endSession, takeTokenFromFragment } from "./auth.js";
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
let mounted = null; // {kind, jobId} of the view shown

const api = createApi({
  getSession: currentSession,
  onUnauthorized: (message) => signedOut(message),
});

const wsUrl = `${window.location.protocol === "https:" ? "wss" : "ws"}://${window.location.host}/ws`;
const client = new RealtimeClient({
  url: wsUrl,
  fetchTicket: () => api.wsTicket(),
});
bindIndicator(indicator, client);
client.addEventListener("state", (e) => {
  if (e.detail.signedOut) signedOut(e.detail.reason);
});

signOutButton.addEventListener("click", async () => {
  await endSession();
  signedOut(null);
});

// Another tab signed in or out: ask the server what is true now.
onOtherTab(async (what) => {
  if (what === "signed-out") {
    dropSession();
    signedOut("You signed out in another tab.");
  } else if (what === "signed-in" && !currentSession()) {
    if ((await loadSession()) === "ok") {
      signInMessage = null;
      route();
    }
  }
});

function signedOut(message) {
  dropSession();
  client.stop();
  signInMessage = message;
  route();
}

function navigate(hash) {
  if (window.location.hash === hash) route();
  else window.location.hash = hash;
}

/** `#/jobs/<id>` with an optional `/step-<n>` (or `#step-<n>`) anchor. */
export function parseJobRoute(hash) {
  const m = /^\/jobs\/([A-Za-z0-9_-]{1,64})(?:[/#]step-(\d{1,7}))?\/?$/.exec(hash);
  return m ? { jobId: m[1], step: m[2] ? Number(m[2]) : null } : null;
}

function route() {
  const session = currentSession();
  signOutButton.hidden = !session;
  whoami.hidden = !session;
  if (!session) {
    unmount();
    unmount = () => {};
    mounted = null;
    client.stop();
    document.title = "Sign in · progress-service";
    unmount = mountSignIn(main, {
      message: signInMessage,
      onToken: async (candidate) => {
        const verdict = await signIn(candidate);
        if (verdict === "refused") return "That token was refused: it is invalid, expired or revoked.";
        if (verdict !== "ok") return "The server cannot be reached. Try again in a moment.";
        signInMessage = null;
        route();
        return null;
      },
    });
    return;
  }
  client.start();
  showIdentity(session.me);
  const hash = window.location.hash.replace(/^#/, "");
  const job = parseJobRoute(hash);
  if (job) {
    // Moving between steps of the same job only scrolls: no remount.
    if (mounted?.kind === "job" && mounted.jobId === job.jobId && mounted.view) {
      mounted.view.goToStep(job.step);
      return;
    }
    unmount();
    const view = mountJob(main, job.jobId, { api, client, step: job.step, me: session.me });
    unmount = view.unmount;
    mounted = { kind: "job", jobId: job.jobId, view };
    return;
  }
  unmount();
  if (hash && hash !== "/") {
    window.history.replaceState(null, "", "#/");
  }
  document.title = "Jobs · progress-service";
  unmount = mountJobs(main, { api, client, navigate, me: session.me });
  mounted = { kind: "jobs" };
}

/** Show who is signed in: "name · team (role)". */
function showIdentity(me) {
  const text = `${me.userName} · ${me.teamName} (${me.role})`;
  if (whoami.textContent !== text) whoami.textContent = text;
  whoami.title = text;
}

async function boot() {
  const token = takeTokenFromFragment();
  if (token) {
    const verdict = await signIn(token);
    signInMessage = verdict === "refused" ? "The token in that link was refused: it is invalid, expired or revoked." : verdict === "ok" ? null : "The server cannot be reached. Try again in a moment.";
  } else {
    const found = await loadSession();
    if (found === "unreachable") signInMessage = "The server cannot be reached. Reload the page when it is back.";
  }
  window.addEventListener("hashchange", () => {
    // A `#token=` link pasted into an open tab.
    if (window.location.hash.includes("token=")) boot();
    else route();
  });
  route();
}

window.addEventListener("pagehide", () => client.stop());
// Back from the back/forward cache: the connection was closed on pagehide.
window.addEventListener("pageshow", (e) => {
  if (e.persisted) route();
});
boot();
