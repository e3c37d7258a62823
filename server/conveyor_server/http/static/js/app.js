// The dashboard's entry point: who is logged in, the login form, and the router (#/page/...).
// Each page module exports render(view, params, session) and returns a function that stops
// its live streams when the page is left.

import { ApiError, get, post, del } from "./api.js";
import { h, notice } from "./ui.js";
import * as overview from "./pages/overview.js";
import * as queues from "./pages/queues.js";
import * as workers from "./pages/workers.js";
import * as tasks from "./pages/tasks.js";
import * as task from "./pages/task.js";
import * as workflow from "./pages/workflow.js";
import * as deadLetters from "./pages/dead_letters.js";
import * as schedules from "./pages/schedules.js";
import * as limits from "./pages/limits.js";

const ROUTES = [
  [/^$/, "overview", overview],
  [/^queues$/, "queues", queues],
  [/^workers$/, "workers", workers],
  [/^tasks$/, "tasks", tasks],
  [/^tasks\/(.+)$/, "tasks", task],
  [/^workflows\/(.+)$/, "tasks", workflow],
  [/^dead-letters$/, "dead-letters", deadLetters],
  [/^schedules$/, "schedules", schedules],
  [/^limits$/, "limits", limits],
];

const view = document.getElementById("view");
let session = null;
let leave = () => {};

function route() {
  const hash = decodeURIComponent(window.location.hash.replace(/^#\/?/, ""));
  const [path, search] = hash.split("?");
  for (const [pattern, nav, page] of ROUTES) {
    const found = path.match(pattern);
    if (found) return { nav, page, args: found.slice(1), params: new URLSearchParams(search || "") };
  }
  return null;
}

async function show() {
  leave();
  leave = () => {};
  document.getElementById("notice").hidden = true;
  const found = route();
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("active", found !== null && link.dataset.page === found.nav);
  }
  view.replaceChildren();
  if (found === null) {
    view.append(h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/" }, "Back to the overview")));
    return;
  }
  try {
    leave = (await found.page.render(view, found.args, found.params, session)) || (() => {});
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return;
    view.append(h("p", { class: "notice" }, error.message));
  }
}

function showLogin(message) {
  leave();
  leave = () => {};
  document.getElementById("nav").hidden = true;
  document.getElementById("who").replaceChildren();
  const input = h("input", { type: "password", name: "token", placeholder: "admin or viewer token",
    autocomplete: "current-password", "data-test": "token", required: true });
  const error = h("p", { class: "notice", hidden: !message, "data-test": "login-error" }, message || "");
  const form = h("form", {}, h("label", {}, "Token", input), h("button", { class: "primary", type: "submit" }, "Log in"),
    error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await post("/session", { token: input.value });
      await start();
    } catch (failure) {
      error.textContent = failure.message;
      error.hidden = false;
    }
  });
  view.replaceChildren(h("section", { class: "login panel" }, h("h1", {}, "Log in to Conveyor"),
    h("p", { class: "muted" }, "Use a token with the admin role, or the read-only viewer role."), form));
  input.focus();
}

async function start() {
  session = await get("/session");
  if (session.auth && !session.identity) {
    showLogin("");
    return;
  }
  document.getElementById("nav").hidden = false;
  document.body.classList.toggle("viewer", session.identity && session.identity.role === "viewer");
  const who = document.getElementById("who");
  who.replaceChildren(h("span", { "data-test": "identity" },
    session.auth ? `${session.identity.name} (${session.identity.role})` : "no auth (loopback)"));
  if (session.auth) {
    const out = h("button", { type: "button", "data-test": "logout" }, "Log out");
    out.addEventListener("click", async () => {
      await del("/session");
      session = null;
      showLogin("");
    });
    who.append(out);
  }
  await show();
}

window.addEventListener("hashchange", () => { if (session) show(); });
window.addEventListener("conveyor:logged-out", () => {
  if (session && session.auth && session.identity) {
    session = null;
    showLogin("Your session ended; log in again.");
  }
});

start().catch((error) => notice(`cannot reach the server: ${error.message}`));
