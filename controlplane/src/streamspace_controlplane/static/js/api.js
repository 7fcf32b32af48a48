// The REST API from the browser: the bearer token, JSON calls, and session event streams.
//
// The token lives in sessionStorage: it is gone when the tab closes and is never sent
// anywhere but this origin's API. Errors carry the API's own message
// ({"error": {"code", "message"}}), so the page can show the user what went wrong.

const TOKEN_KEY = "streamspace.token";
const EXPIRES_KEY = "streamspace.expires_at";

/** An API call that failed: `message` is the API's sentence, `status` the HTTP status. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

/** Return the stored token, or null when there is none or it has expired. */
export function token() {
  const value = sessionStorage.getItem(TOKEN_KEY);
  const expires = Date.parse(sessionStorage.getItem(EXPIRES_KEY) || "");
  if (!value || !(expires > Date.now())) {
    return null;
  }
  return value;
}

/** Keep a token from `POST /api/v1/auth/login`. */
export function keepToken(value, expiresAt) {
  sessionStorage.setItem(TOKEN_KEY, value);
  sessionStorage.setItem(EXPIRES_KEY, expiresAt);
}

/** Forget the token (log out). */
export function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(EXPIRES_KEY);
}

/** Return the claims of the stored token that the page shows: {username, role}. */
export function whoami() {
  const value = token();
  if (!value) {
    return null;
  }
  try {
    const part = value.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part));
    return { username: String(claims.sub), role: String(claims.role) };
  } catch {
    return null;
  }
}

/** Send the browser to the login page, to come back to where it is now. */
export function toLogin() {
  const here = location.pathname + location.search + location.hash;
  location.assign(`/ui/login?next=${encodeURIComponent(here)}`);
}

async function errorOf(response) {
  let code = "error";
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) {
      code = body.error.code || code;
      message = body.error.message;
    }
  } catch {
    // Not the API's error shape (a proxy's page, say): keep the status line.
  }
  return new ApiError(response.status, code, message);
}

function headers(extra) {
  const found = { Accept: "application/json", ...extra };
  const value = token();
  if (value) {
    found.Authorization = `Bearer ${value}`;
  }
  return found;
}

/**
 * Call the API; return the parsed JSON body (null for 204).
 *
 * A 401 on any call but the login itself means the token is no longer good: it is
 * dropped and the browser goes to the login page. Every other failure throws ApiError.
 */
export async function call(method, path, body) {
  const init = { method, headers: headers(), cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, "network", `cannot reach the control plane (${err.message})`);
  }
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 401 && path !== "/api/v1/auth/login") {
      forgetToken();
      toLogin();
    }
    throw error;
  }
  return response.status === 204 ? null : response.json();
}

/**
 * Follow `GET /api/v1/sessions/{id}/events` (Server-Sent Events) with fetch, which, unlike
 * EventSource, can send the Authorization header. Calls `onEvent(event)` for every stored
 * and live event, in order. When the stream breaks it reconnects after the server's
 * `retry:` delay with `Last-Event-ID`, so nothing is missed or repeated. Stops when
 * `signal` aborts; a 4xx answer (the session is gone, say) calls `onError` and stops.
 */
export async function followEvents(sessionId, onEvent, { signal, onError } = {}) {
  const url = `/api/v1/sessions/${encodeURIComponent(sessionId)}/events`;
  let lastId = 0;
  let retryMs = 3000;
  while (!signal?.aborted) {
    const extra = { Accept: "text/event-stream" };
    if (lastId) {
      extra["Last-Event-ID"] = String(lastId);
    }
    try {
      const response = await fetch(url, { headers: headers(extra), signal, cache: "no-store" });
      if (!response.ok) {
        const error = await errorOf(response);
        if (response.status === 401) {
          forgetToken();
          toLogin();
        }
        if (response.status < 500) {
          onError?.(error);
          return;
        }
        throw error;
      }
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      let data = [];
      let id = null;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) {
          break;
        }
        buffer += value;
        let newline;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, newline).replace(/\r$/, "");
          buffer = buffer.slice(newline + 1);
          if (line === "") {
            if (data.length) {
              if (id !== null) {
                lastId = Number(id);
              }
              onEvent(JSON.parse(data.join("\n")));
            }
            data = [];
            id = null;
          } else if (line.startsWith("data:")) {
            data.push(line.slice(5).trimStart());
          } else if (line.startsWith("id:")) {
            id = line.slice(3).trim();
          } else if (line.startsWith("retry:")) {
            retryMs = Number(line.slice(6).trim()) || retryMs;
          }
        }
      }
    } catch (err) {
      if (signal?.aborted) {
        return;
      }
      if (!(err instanceof ApiError) && !(err instanceof TypeError)) {
        throw err;
      }
    }
    await new Promise((resolve) => {
      const timer = setTimeout(resolve, retryMs);
      signal?.addEventListener("abort", () => {
        clearTimeout(timer);
        resolve();
      });
    });
  }
}
