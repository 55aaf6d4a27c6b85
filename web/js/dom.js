// Tiny DOM helpers. Text always goes in through textContent, never as HTML:
// prompts, titles, comments and user names are untrusted.

/**
 * h("button", {class: "btn", onclick: fn, disabled: true}, "Text", childNode)
 * Attributes whose value is null/undefined/false are skipped; `true` sets an
 * empty attribute; `on*` adds a listener; `dataset` merges data-* values.
 */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "text") el.textContent = value;
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

/** Replace all children of `el`. */
export function replaceChildren(el, ...children) {
  el.replaceChildren();
  append(el, children);
}

/** Set text only when it changed (keeps screen readers and selection calm). */
export function setText(el, text) {
  const value = text ?? "";
  if (el.textContent !== value) el.textContent = value;
}

/** Announce a status change to screen-reader users (polite). */
export function announce(text) {
  const region = document.getElementById("announcer");
  if (!region) return;
  // Clearing first makes a repeated message be read again.
  region.textContent = "";
  window.setTimeout(() => {
    region.textContent = text;
  }, 50);
}

/**
 * Keyed list rendering: reuse each item's element across renders so focus,
 * scroll position and CSS transitions survive updates.
 * `create(item)` builds an element, `update(el, item)` refreshes it.
 */
export function renderKeyed(container, items, key, create, update) {
  const existing = new Map();
  for (const child of container.children) existing.set(child.dataset.key, child);
  let cursor = container.firstElementChild;
  for (const item of items) {
    const k = String(key(item));
    let el = existing.get(k);
    if (el) existing.delete(k);
    else {
      el = create(item);
      el.dataset.key = k;
    }
    update(el, item);
    if (el !== cursor) container.insertBefore(el, cursor);
    else cursor = cursor.nextElementSibling;
  }
  for (const el of existing.values()) el.remove();
}

/** Run `fn` at most once per animation frame (many events, one render). */
export function frameScheduler(fn) {
  let queued = false;
  return () => {
    if (queued) return;
    queued = true;
    const run = () => {
      queued = false;
      fn();
    };
    // rAF does not run in background tabs; the timeout keeps state current there.
    if (document.hidden) window.setTimeout(run, 250);
    else window.requestAnimationFrame(run);
  };
}
