// Small DOM helpers: elements from data (never from HTML strings), tables, times, state
// badges, the confirmation dialog and the notice line.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function badge(state) {
  return h("span", { class: `badge ${state}`, "data-test": "state" }, state);
}

export function table(columns, rows, options = {}) {
  const head = h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : "" }, c.title))));
  const body = h("tbody", {}, rows.length
    ? rows.map((row) => h("tr", { "data-test": options.rowTest ? options.rowTest(row) : undefined },
      columns.map((c) => h("td", { class: c.num ? "num" : c.class || "" }, c.cell(row)))))
    : h("tr", {}, h("td", { colspan: columns.length, class: "muted" }, options.empty || "Nothing here.")));
  return h("table", { "data-test": options.test }, head, body);
}

export function when(iso) {
  if (!iso) return "—";
  const at = new Date(iso);
  return at.toLocaleString(undefined, { hour12: false });
}

export function ago(iso) {
  if (!iso) return "—";
  const seconds = Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000);
  if (seconds < 60) return `${Math.round(seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

export function duration(seconds) {
  if (seconds === undefined || seconds === null) return "—";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  if (seconds < 7200) return `${(seconds / 60).toFixed(1)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

export function shortId(id) {
  return id.length > 13 ? `${id.slice(0, 8)}…` : id;
}

export function json(value) {
  return h("pre", {}, JSON.stringify(value, null, 2));
}

export function confirmAction(text) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

let noticeTimer = null;

export function notice(text, ok = false) {
  const el = document.getElementById("notice");
  el.textContent = text;
  el.className = ok ? "notice ok" : "notice";
  el.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { el.hidden = true; }, ok ? 4000 : 10000);
}

// Run an action from a button: disabled meanwhile, errors shown in the notice line.
export async function act(button, action, done) {
  button.disabled = true;
  try {
    const result = await action();
    if (done) notice(done(result), true);
    return result;
  } catch (error) {
    notice(error.message);
    return undefined;
  } finally {
    button.disabled = false;
  }
}

export function button(label, onclick, attrs = {}) {
  const el = h("button", { type: "button", ...attrs }, label);
  el.addEventListener("click", () => onclick(el));
  return el;
}

// Paging through a list by page token: `back` returns to the previous page, `next` follows the
// next_page_token the last page gave (shown(token) after each load). Each is [label, data-test].
export function pager(load, back = ["← Newer", "newer"], next = ["Older →", "older"]) {
  const backButton = h("button", { type: "button", "data-test": back[1] }, back[0]);
  const nextButton = h("button", { type: "button", "data-test": next[1] }, next[0]);
  const where = h("span", { class: "muted" });
  const tokens = [""];
  backButton.addEventListener("click", () => { tokens.pop(); load(); });
  nextButton.addEventListener("click", () => { tokens.push(nextButton.dataset.token); load(); });
  return {
    buttons: [backButton, nextButton, where],
    token: () => tokens[tokens.length - 1],
    onFirstPage: () => tokens.length === 1,
    shown(nextToken) {
      nextButton.disabled = !nextToken;
      nextButton.dataset.token = nextToken || "";
      backButton.disabled = tokens.length === 1;
      where.textContent = `page ${tokens.length}`;
    },
  };
}
