// The jobs list (live status and progress, newest first) and the submit form.

import { ApiError } from "../api.js";
import { announce, frameScheduler, h, renderKeyed, replaceChildren, setText } from "../dom.js";
import { formatCost, formatDateTime, formatRelative, PHASE_LABEL, promptTitle, STATUS_LABEL } from "../format.js";
import { applyEvent, createJobState, progressOf, TERMINAL } from "../jobstate.js";
import { describeOutcome } from "../outcome.js";
import { SignedOutError } from "../socket.js";

/** Rooms the list may hold open; the protocol allows 32 per connection. */
const MAX_LIVE_ROOMS = 30;
const PAGE_SIZE = 30;
/** New jobs of teammates appear without a reload. */
const REFRESH_MS = 15_000;
const MODELS = ["sonnet", "opus", "haiku"];

/**
 * @param {HTMLElement} main
 * @param {{api: object, client: import("../socket.js").RealtimeClient, navigate: (hash: string) => void}} ctx
 */
export function mountJobs(main, { api, client, navigate, me = null }) {
  const jobs = new Map(); // id -> job state (createJobState)
  const subscriptions = new Map(); // id -> unsubscribe
  let order = []; // ids, newest first
  let nextCursor = null;
  let statusFilter = "";
  let disposed = false;
  let loadError = null;
  let loaded = false;

  // ------------------------------------------------------------- the form
  const form = buildSubmitForm({
    onSubmit: async (spec) => {
      const snapshot = await api.submitJob(spec);
      announce("Job submitted.");
      navigate(`#/jobs/${snapshot.id}`);
    },
  });

  // ------------------------------------------------------------- the list
  const filter = h(
    "select",
    { id: "status-filter", name: "status" },
    h("option", { value: "" }, "All"),
    ...Object.entries(STATUS_LABEL).map(([value, label]) => h("option", { value }, label)),
  );
  const list = h("ul", { class: "job-list", id: "job-list", "aria-label": "Jobs, newest first" });
  const empty = h("p", { class: "empty", hidden: true });
  const more = h("button", { type: "button", class: "btn btn-quiet load-more", hidden: true }, "Show older jobs");
  const listStatus = h("p", { class: "list-status", role: "status" });
  const title = h("h1", { tabindex: "-1" }, "Jobs");

  filter.addEventListener("change", () => {
    statusFilter = filter.value;
    reload();
  });
  more.addEventListener("click", () => load({ append: true }));

  // Only submitters and admins may submit: others see why instead of a form
  // that would answer 403.
  const submitCard = h(
    "section",
    { class: "card submit-card", "aria-labelledby": "submit-title" },
    h("h2", { id: "submit-title" }, "New job"),
    form.el,
  );
  (me ? Promise.resolve(me) : api.me()).then(
    (who) => {
      if (disposed || who.role === "submitter" || who.role === "admin") return;
      submitCard.replaceChildren(
        h("h2", { id: "submit-title" }, "New job"),
        h("p", { class: "hint", id: "submit-disabled" }, `Your role (${who.role}) can watch and comment but not submit jobs; ask an admin for the submitter role.`),
      );
    },
    () => {}, // the form stays; the server still refuses with a clear message
  );

  main.replaceChildren(
    h(
      "div",
      { class: "jobs-layout" },
      submitCard,
      h(
        "section",
        { class: "jobs-section", "aria-labelledby": "jobs-title" },
        h(
          "div",
          { class: "section-head" },
          h("div", { id: "jobs-title" }, title),
          h("div", { class: "filter" }, h("label", { for: "status-filter" }, "Status"), filter),
        ),
        listStatus,
        list,
        empty,
        more,
      ),
    ),
  );
  // Focus the start of the content: the next Tab lands in the job form, the
  // first thing on this page (the list's own controls follow it).
  main.focus({ preventScroll: true });

  const render = frameScheduler(() => {
    if (disposed) return;
    const items = order.map((id) => jobs.get(id)).filter(Boolean);
    renderKeyed(list, items, (job) => job.snapshot.id, createRow, updateRow);
    empty.hidden = !loaded || items.length > 0 || loadError !== null;
    setText(empty, statusFilter ? `No ${STATUS_LABEL[statusFilter].toLowerCase()} jobs.` : "No jobs yet. Submit one with the form.");
    more.hidden = !nextCursor;
    setText(listStatus, loadError ?? (loaded ? "" : "Loading jobs…"));
    listStatus.classList.toggle("notice-error", loadError !== null);
  });

  // ----------------------------------------------------- data and live
  async function load({ append = false } = {}) {
    try {
      const page = await api.listJobs({ status: statusFilter || undefined, limit: PAGE_SIZE, cursor: append ? nextCursor : undefined });
      if (disposed) return;
      loadError = null;
      loaded = true;
      if (!append) {
        // Keep rows that are already live: their state is newer than the page's.
        order = [];
        nextCursor = page.nextCursor;
      } else nextCursor = page.nextCursor;
      for (const snap of page.items) {
        const known = jobs.get(snap.id);
        if (!known || !subscriptions.has(snap.id)) jobs.set(snap.id, createJobState(snap));
        if (!order.includes(snap.id)) order.push(snap.id);
      }
      for (const id of [...jobs.keys()]) if (!order.includes(id)) jobs.delete(id);
      syncSubscriptions();
    } catch (err) {
      if (disposed || err instanceof SignedOutError) return;
      loadError = err instanceof ApiError ? `Could not load jobs: ${err.detail}` : "Could not load jobs: the server cannot be reached. Retrying…";
    }
    render();
  }

  function reload() {
    loaded = false;
    nextCursor = null;
    load();
  }

  /** Watch the rooms of visible unfinished jobs; stop watching finished ones. */
  function syncSubscriptions() {
    const wanted = order.filter((id) => !TERMINAL.has(jobs.get(id)?.snapshot.status)).slice(0, MAX_LIVE_ROOMS);
    for (const [id, unsubscribe] of subscriptions) {
      if (!wanted.includes(id)) {
        unsubscribe();
        subscriptions.delete(id);
      }
    }
    for (const id of wanted) {
      if (subscriptions.has(id)) continue;
      const job = jobs.get(id);
      const unsubscribe = client.subscribe(job.snapshot.roomId || `job:${id}`, (msg) => onRoomMessage(id, msg), {
        since: job.snapshot.lastEventId || null,
      });
      subscriptions.set(id, unsubscribe);
    }
  }

  function onRoomMessage(id, msg) {
    const job = jobs.get(id);
    if (!job) return;
    if (msg.type === "joined") {
      const fresh = createJobState(msg.snapshot);
      fresh.maxPercent = job.maxPercent; // the bar never goes back on a rejoin
      jobs.set(id, fresh);
    } else if (msg.type === "event") {
      const change = applyEvent(job, msg);
      if (change?.status) announce(`${promptTitle(job.snapshot.prompt, 60)}: ${STATUS_LABEL[change.status] ?? change.status}.`);
      if (change?.status && TERMINAL.has(change.status)) {
        // Finished: no more events to wait for. Leave after this turn.
        queueMicrotask(syncSubscriptions);
      }
    } else if (msg.type === "gap") {
      api.getJob(id).then((snap) => {
        if (!disposed && jobs.has(id)) {
          const fresh = createJobState(snap);
          fresh.maxPercent = jobs.get(id).maxPercent;
          jobs.set(id, fresh);
        }
        render();
      }, () => {});
    } else if (msg.type === "error" && (msg.code === "not_found" || msg.code === "forbidden")) {
      subscriptions.get(id)?.();
      subscriptions.delete(id);
    }
    render();
  }

  const refresher = window.setInterval(() => {
    if (!document.hidden && !nextCursor) load();
  }, REFRESH_MS);
  const clock = window.setInterval(() => {
    // Relative times ("2 minutes ago") age even when nothing happens.
    for (const el of list.querySelectorAll("time[data-at]")) setText(el, formatRelative(Number(el.dataset.at)));
  }, 30_000);

  load();
  render();

  return () => {
    disposed = true;
    window.clearInterval(refresher);
    window.clearInterval(clock);
    for (const unsubscribe of subscriptions.values()) unsubscribe();
    subscriptions.clear();
  };
}

// ------------------------------------------------------------------- rows

function createRow(job) {
  const id = job.snapshot.id;
  const el = h(
    "li",
    { class: "job-row", dataset: { jobId: id } },
    h(
      "a",
      { class: "job-link", href: `#/jobs/${id}` },
      h("span", { class: "job-row-top" }, h("span", { class: "badge status-badge" }), h("span", { class: "badge badge-demo", hidden: true, title: "A recorded Claude Code transcript replayed by the demo runner, not a live run" }, "Replay"), h("span", { class: "badge badge-session", hidden: true }), h("span", { class: "job-row-title" })),
      h("span", { class: "job-row-meta" }, h("span", { class: "job-phase" }), h("span", { class: "job-todos" }), h("span", { class: "job-cost" }), h("time", { class: "job-time" }), h("span", { class: "job-by" })),
      h("span", { class: "visually-hidden job-progress-text" }),
      h("span", { class: "mini-bar", "aria-hidden": "true" }, h("span", { class: "mini-bar-fill" })),
    ),
  );
  return el;
}

function updateRow(el, job) {
  const s = job.snapshot;
  el.dataset.status = s.status;
  const badge = el.querySelector(".status-badge");
  setText(badge, STATUS_LABEL[s.status] ?? s.status);
  badge.dataset.status = s.status;
  el.querySelector(".badge-demo").hidden = !s.demo;
  const session = el.querySelector(".badge-session");
  session.hidden = s.kind !== "session";
  if (s.kind === "session") {
    // Reported through Claude Code hooks: it was not started here and runs elsewhere.
    setText(session, s.session?.host ? `Session · ${s.session.host}` : "Session");
    session.title = `A Claude Code session reported through hooks${s.session?.host ? ` from ${s.session.host}` : ""}; not started by this service`;
  }
  setText(el.querySelector(".job-row-title"), promptTitle(s.prompt));
  const running = !TERMINAL.has(s.status);
  setText(el.querySelector(".job-phase"), running ? PHASE_LABEL[s.phase] ?? s.phase : s.status === "succeeded" ? "" : describeOutcome(s)?.sentence ?? "");
  const { done = 0, total = 0 } = s.progress || {};
  setText(el.querySelector(".job-todos"), total > 0 ? `${done}/${total} to-dos` : "");
  setText(el.querySelector(".job-cost"), s.costUsd ? formatCost(s.costUsd) : "");
  const time = el.querySelector(".job-time");
  time.dataset.at = String(s.createdAt || "");
  time.setAttribute("datetime", s.createdAt ? new Date(s.createdAt).toISOString() : "");
  time.title = formatDateTime(s.createdAt);
  setText(time, formatRelative(s.createdAt));
  setText(el.querySelector(".job-by"), s.submittedBy ? `by ${s.submittedBy}` : "");
  const p = progressOf(job);
  el.querySelector(".mini-bar-fill").style.width = `${p.percent}%`;
  el.querySelector(".mini-bar").dataset.status = s.status;
  // The link's name is its visible text (title, status, phase…) plus the progress.
  setText(el.querySelector(".job-progress-text"), ` ${p.percent}% · ${p.label}`);
}

// ------------------------------------------------------------- submit form

const FIELDS = ["prompt", "workdir", "model", "maxTurns", "permissionMode", "timeoutSeconds"];

function buildSubmitForm({ onSubmit }) {
  const err = {};
  const field = (name, label, control, hint) => {
    err[name] = h("p", { class: "field-error", id: `${name}-error` });
    control.id = `job-${name}`;
    control.name = name;
    control.setAttribute("aria-describedby", [hint ? `${name}-hint` : null, `${name}-error`].filter(Boolean).join(" "));
    return h(
      "div",
      { class: "field", dataset: { field: name } },
      h("label", { for: control.id }, label),
      control,
      hint ? h("p", { class: "hint", id: `${name}-hint` }, hint) : null,
      err[name],
    );
  };
  const prompt = h("textarea", { rows: "4", required: true, maxlength: "100000", placeholder: "e.g. Fix the rounding bug in src/calc.py and add a test" });
  const workdir = h("input", { type: "text", autocomplete: "off", spellcheck: "false", placeholder: "." });
  const model = h("input", { type: "text", list: "model-options", autocomplete: "off", spellcheck: "false", placeholder: "default" });
  const maxTurns = h("input", { type: "number", min: "1", max: "1000", inputmode: "numeric", placeholder: "no limit" });
  const permissionMode = h(
    "select",
    {},
    h("option", { value: "" }, "Default"),
    ...["acceptEdits", "plan", "bypassPermissions", "dontAsk"].map((m) => h("option", { value: m }, m)),
  );
  const timeoutSeconds = h("input", { type: "number", min: "1", inputmode: "numeric", placeholder: "server default" });
  const formError = h("div", { class: "form-error", role: "alert", id: "submit-error" });
  const button = h("button", { type: "submit", class: "btn btn-primary" }, "Submit job");

  const el = h(
    "form",
    { class: "submit-form", novalidate: true, "aria-describedby": "submit-error" },
    field("prompt", "Prompt", prompt),
    h(
      "div",
      { class: "field-row" },
      field("workdir", "Working directory", workdir, "Relative to the workspace root."),
      field("model", "Model", model),
    ),
    h("datalist", { id: "model-options" }, ...MODELS.map((m) => h("option", { value: m }))),
    h(
      "details",
      { class: "advanced" },
      h("summary", {}, "Limits and permissions"),
      h(
        "div",
        { class: "field-row" },
        field("maxTurns", "Max turns", maxTurns),
        field("timeoutSeconds", "Timeout (s)", timeoutSeconds),
      ),
      field("permissionMode", "Permission mode", permissionMode),
    ),
    formError,
    h("div", { class: "form-actions" }, button),
  );
  const controls = { prompt, workdir, model, maxTurns, permissionMode, timeoutSeconds };

  function clearErrors() {
    formError.replaceChildren();
    for (const name of FIELDS) {
      err[name].textContent = "";
      controls[name].removeAttribute("aria-invalid");
    }
  }

  function showErrors(detail, items) {
    const general = [];
    let first = null;
    for (const { field: key, message } of items) {
      const name = key && FIELDS.find((f) => key === f || key.startsWith(`${f}.`) || key.startsWith(`${f}[`));
      if (name) {
        err[name].textContent = err[name].textContent ? `${err[name].textContent} ${message}` : message;
        controls[name].setAttribute("aria-invalid", "true");
        first = first ?? name;
      } else general.push(key ? `${key}: ${message}` : message);
    }
    // "prompt: must not be blank" style details name their field too.
    const m = /^([A-Za-z]+): (.+)$/.exec(detail);
    if (m && FIELDS.includes(m[1]) && items.length === 0) {
      err[m[1]].textContent = m[2];
      controls[m[1]].setAttribute("aria-invalid", "true");
      first = first ?? m[1];
    }
    replaceChildren(
      formError,
      h("p", {}, detail),
      general.length ? h("ul", {}, ...general.map((g) => h("li", {}, g))) : null,
    );
    if (first) controls[first].focus();
  }

  el.addEventListener("submit", async (e) => {
    e.preventDefault();
    clearErrors();
    const spec = { prompt: prompt.value };
    if (!prompt.value.trim()) {
      showErrors("The job was not submitted.", [{ field: "prompt", message: "Write a prompt for Claude Code." }]);
      return;
    }
    if (workdir.value.trim()) spec.workdir = workdir.value.trim();
    if (model.value.trim()) spec.model = model.value.trim();
    if (permissionMode.value) spec.permissionMode = permissionMode.value;
    for (const [name, input] of [["maxTurns", maxTurns], ["timeoutSeconds", timeoutSeconds]]) {
      const raw = input.value.trim();
      if (!raw) continue;
      const n = Number(raw);
      if (!Number.isInteger(n) || n < 1) {
        showErrors("The job was not submitted.", [{ field: name, message: "A whole number, 1 or more." }]);
        return;
      }
      spec[name] = n;
    }
    button.disabled = true;
    button.textContent = "Submitting…";
    try {
      await onSubmit(spec);
    } catch (error) {
      if (error instanceof SignedOutError) return;
      if (error instanceof ApiError) showErrors(error.detail, error.fieldErrors);
      else showErrors("The server cannot be reached. Your job was not submitted; try again.", []);
    } finally {
      button.disabled = false;
      button.textContent = "Submit job";
    }
  });
  // Ctrl/Cmd+Enter submits from the prompt box.
  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) el.requestSubmit();
  });
  return { el };
}
