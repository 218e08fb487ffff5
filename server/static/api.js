// The public HTTP API of rvr-serve, as a browser uses it: bearer auth from sessionStorage, the
// {"error": {"code", "message"}} body, Retry-After, and Server-Sent Events read through fetch (an
// EventSource cannot send an Authorization header; the key never goes into a URL).

const KEY_STORAGE = "rvr.apiKey";
export const TERMINAL_EVENTS = new Set(["completed", "failed", "cancelled"]);

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

export class ApiError extends Error {
  // status 0: the request never got an answer (network, server down).
  constructor(status, code, message, retryAfterS = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfterS = retryAfterS;
  }
}

async function errorFrom(resp) {
  let code = "http_" + resp.status;
  let message = resp.statusText || "request failed";
  try {
    const body = await resp.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch {
    // Not our JSON (a proxy's page): keep the status line.
  }
  const retry = resp.headers.get("Retry-After");
  const retryAfterS = retry !== null && /^\d+$/.test(retry.trim()) ? Number(retry) : null;
  return new ApiError(resp.status, code, message, retryAfterS);
}

// fetch() against the API; resolves to the Response when it is 2xx, throws ApiError otherwise.
export async function api(path, { method = "GET", body = undefined, headers = {}, signal = undefined } = {}) {
  const h = new Headers(headers);
  const key = apiKey();
  if (key) h.set("Authorization", "Bearer " + key);
  let resp;
  try {
    resp = await fetch(path, { method, body, headers: h, signal, cache: "no-store" });
  } catch (err) {
    if (signal && signal.aborted) throw err;
    throw new ApiError(0, "network", "could not reach the server");
  }
  if (!resp.ok) throw await errorFrom(resp);
  return resp;
}

export async function getJson(path, opts) {
  return (await api(path, opts)).json();
}

// Parses an SSE byte stream into {id, event, data, retry} records (the WHATWG event-stream format).
async function* parseEventStream(body, signal) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let ev = { id: null, event: "message", data: [], retry: null };
  const onAbort = () => reader.cancel().catch(() => {});
  signal?.addEventListener("abort", onAbort);
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.search(/\r\n|\r|\n/)) >= 0) {
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + (buffer.startsWith("\r\n", nl) ? 2 : 1));
        if (line === "") {
          if (ev.data.length || ev.retry !== null) {
            yield { id: ev.id, event: ev.event, data: ev.data.join("\n"), retry: ev.retry };
          }
          ev = { id: ev.id, event: "message", data: [], retry: null };
          continue;
        }
        if (line.startsWith(":")) continue; // keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "id") ev.id = value;
        else if (field === "event") ev.event = value;
        else if (field === "data") ev.data.push(value);
        else if (field === "retry" && /^\d+$/.test(value)) ev.retry = Number(value);
      }
    }
  } finally {
    signal?.removeEventListener("abort", onAbort);
  }
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(t);
      reject(signal.reason);
    }, { once: true });
  });
}

// A job's events, {type, data} each, until a terminal one. A dropped stream (or a server that drains
// and says `retry:`) is resumed with Last-Event-ID, so no event is lost or repeated.
export async function* jobEvents(jobId, signal) {
  let lastId = null;
  let retryMs = 1000;
  let failures = 0;
  for (;;) {
    const headers = { Accept: "text/event-stream" };
    if (lastId) headers["Last-Event-ID"] = lastId;
    try {
      const resp = await api(`/v1/jobs/${encodeURIComponent(jobId)}/events`, { headers, signal });
      for await (const rec of parseEventStream(resp.body, signal)) {
        if (rec.retry !== null) retryMs = rec.retry;
        if (!rec.data) continue;
        lastId = rec.id;
        failures = 0;
        const data = JSON.parse(rec.data);
        yield { type: rec.event, data };
        if (TERMINAL_EVENTS.has(rec.event)) return;
      }
    } catch (err) {
      if (signal.aborted) throw err;
      const transient = !(err instanceof ApiError) || err.status === 0 || err.status >= 502;
      if (!transient || ++failures > 20) throw err;
    }
    await sleep(retryMs, signal);
  }
}

// One readable sentence for an error, by what the person can do about it.
export function describeError(err) {
  if (!(err instanceof ApiError)) return `Something went wrong: ${err && err.message ? err.message : err}`;
  const msg = err.message;
  switch (err.status) {
    case 0:
      return "Could not reach the server. Is it running?";
    case 400:
      return `The server could not use this request: ${msg}.`;
    case 401:
      return "This server needs an API key, and the one given is missing or wrong. Enter it above.";
    case 404:
      return `Not found: ${msg}.`;
    case 409:
      return `Not available: ${msg}.`;
    case 413:
      return `The upload is too large for this server: ${msg}. Try a smaller image.`;
    case 415:
      return `This file type is not accepted (${msg}). Use a PNG, JPEG or WebP image.`;
    case 422:
      return `Please check the settings: ${msg}.`;
    case 503:
    case 504:
      return `The service is busy: ${msg}.`;
    default:
      return `Error ${err.status} (${err.code}): ${msg}.`;
  }
}
