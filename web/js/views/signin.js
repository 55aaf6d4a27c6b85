// The sign-in view: paste an API token (or arrive with `#token=…`).

import { h } from "../dom.js";

/**
 * @param {HTMLElement} main
 * @param {{message?: string|null, onToken: (token: string) => Promise<string|null>}} options
 *   `onToken` checks the token and resolves to an error message, or null when it works.
 */
export function mountSignIn(main, { message = null, onToken }) {
  const error = h("p", { class: "field-error", id: "token-error", role: "alert" });
  const input = h("input", {
    id: "token",
    name: "token",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    autocapitalize: "off",
    required: true,
    "aria-describedby": "token-help token-error",
  });
  const button = h("button", { type: "submit", class: "btn btn-primary" }, "Sign in");
  const form = h(
    "form",
    { class: "card signin-card", novalidate: true, "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title", tabindex: "-1" }, "Sign in"),
    message ? h("p", { class: "notice notice-warn", role: "status" }, message) : null,
    h("div", { class: "field" }, h("label", { for: "token" }, "API token"), input),
    h(
      "p",
      { class: "hint", id: "token-help" },
      "Paste a token from ",
      h("code", {}, "progress-service token create"),
      ", or open the link ",
      h("code", {}, "progress-service dev"),
      " prints. Signing in sets a cookie that this browser's tabs share and no script can read; the token itself is not kept.",
    ),
    error,
    h("div", { class: "form-actions" }, button),
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const token = input.value.trim();
    if (!token) {
      error.textContent = "Paste your API token first.";
      input.setAttribute("aria-invalid", "true");
      input.focus();
      return;
    }
    button.disabled = true;
    button.textContent = "Checking…";
    const problem = await onToken(token);
    if (!form.isConnected) return;
    button.disabled = false;
    button.textContent = "Sign in";
    if (problem) {
      error.textContent = problem;
      input.setAttribute("aria-invalid", "true");
      input.select();
    }
  });
  main.replaceChildren(h("div", { class: "signin" }, form));
  form.querySelector("h1").focus();
  return () => {};
}
