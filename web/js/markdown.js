// The job result as Markdown: parsed by marked, sanitized by DOMPurify (both
// vendored under /vendor, no CDN). Raw HTML in the text is shown as text,
// never interpreted; links open in a new tab without a referrer.

import { Marked } from "../vendor/marked-18.2.1.esm.js";
import DOMPurify from "../vendor/purify-3.5.0.es.js";

const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

const md = new Marked({ gfm: true, breaks: false, async: false });
md.use({ renderer: { html: (token) => escapeHtml(token.raw ?? token.text ?? "") } });

const PURIFY = {
  ALLOWED_TAGS: ["p", "br", "strong", "em", "del", "code", "pre", "blockquote", "ul", "ol", "li", "a", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "table", "thead", "tbody", "tr", "th", "td"],
  ALLOWED_ATTR: ["href", "title", "start", "align"],
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|#)/i,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

/** Render `text` (Markdown) into `el`, sanitized. */
export function renderMarkdown(el, text) {
  const html = md.parse(text || "");
  el.replaceChildren(DOMPurify.sanitize(html, { ...PURIFY, RETURN_DOM_FRAGMENT: true }));
}
