// Calls to /api/v1/ (JSON in, JSON out) and live streams (Server-Sent Events).
// Changes carry the CSRF token the server set as the conveyor_csrf cookie.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function csrfToken() {
  const found = document.cookie.split("; ").find((c) => c.startsWith("conveyor_csrf="));
  return found ? decodeURIComponent(found.slice("conveyor_csrf=".length)) : "";
}

export async function call(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = csrfToken();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(`/api/v1${path}`, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 204) return null;
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = data.error || {};
    if (response.status === 401) window.dispatchEvent(new CustomEvent("conveyor:logged-out"));
    throw new ApiError(response.status, error.code || "UNKNOWN", error.message || response.statusText);
  }
  return data;
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body);
export const put = (path, body) => call("PUT", path, body);
export const del = (path) => call("DELETE", path);

// Follow a stream: handlers maps event names to functions of the parsed data. Returns a
// function that closes it. The browser reconnects on its own after a drop.
export function follow(path, handlers) {
  const source = new EventSource(`/api/v1${path}`);
  for (const [event, handler] of Object.entries(handlers)) {
    source.addEventListener(event, (message) => handler(JSON.parse(message.data)));
  }
  return () => source.close();
}

export function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(key, value);
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}
