// The connection indicator in the top bar: live / connecting / reconnecting
// in N s / offline. The visible text ticks every second; the screen-reader
// region only hears about changes of state, not every tick.

import { setText } from "../dom.js";

/** Bind the indicator element to a RealtimeClient. Returns a stop function. */
export function bindIndicator(root, client) {
  const text = root.querySelector(".conn-text");
  const live = root.querySelector("#conn-live");
  const retry = root.querySelector(".conn-retry");
  let ticker = null;
  let lastSpoken = "";

  retry.addEventListener("click", () => client.retryNow());

  function describe(state) {
    switch (state.status) {
      case "live":
        return { text: "Live", spoken: "Connected: updates are live." };
      case "connecting":
        return { text: "Connecting…", spoken: "" };
      case "reconnecting": {
        if (state.retryAt === null) return { text: "Reconnecting…", spoken: "" };
        const s = Math.max(0, Math.ceil((state.retryAt - Date.now()) / 1000));
        return { text: s > 0 ? `Reconnecting in ${s} s` : "Reconnecting…", spoken: "Connection lost. Reconnecting." };
      }
      case "offline":
        return { text: "Offline", spoken: `Offline. ${state.reason ?? ""}` };
      default:
        return { text: "", spoken: "" };
    }
  }

  function render() {
    const state = client.state;
    root.hidden = state.status === "idle";
    root.dataset.state = state.status;
    const d = describe(state);
    setText(text, d.text);
    root.title = state.reason && state.status !== "live" ? state.reason : d.text;
    if (d.spoken && d.spoken !== lastSpoken) {
      lastSpoken = d.spoken;
      setText(live, d.spoken);
    }
    retry.hidden = !((state.status === "reconnecting" && state.retryAt !== null) || (state.status === "offline" && !state.signedOut));
    retry.textContent = state.status === "offline" ? "Retry" : "Retry now";
    const ticking = state.status === "reconnecting" && state.retryAt !== null;
    if (ticking && !ticker) ticker = window.setInterval(render, 1000);
    if (!ticking && ticker) {
      window.clearInterval(ticker);
      ticker = null;
    }
  }

  client.addEventListener("state", render);
  render();
  return () => {
    client.removeEventListener("state", render);
    if (ticker) window.clearInterval(ticker);
  };
}
