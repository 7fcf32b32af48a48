// My sessions: the list, live state from each changing session's event stream, and the
// start / stop / hibernate / wake / delete buttons.
//
// Streams are opened for sessions on their way somewhere (their state is not yet what
// was asked for), at most MAX_STREAMS at once: a browser holds only about six HTTP/1.1
// connections per host, and the API calls need some. Settled sessions are refreshed with
// the list every REFRESH_MS while the page is visible.

import { call, followEvents } from "./api.js";
import { $, busy, clearError, el, loaded, notice, requireLogin, showError, when } from "./page.js";

const MAX_STREAMS = 4;
const REFRESH_MS = 10000;
const SETTLED = new Set(["running", "stopped", "hibernated", "failed"]);

const me = await requireLogin();
const table = $("sessions");
const body = table.querySelector("tbody");
const allUsers = $("all-users");
const started = new URLSearchParams(location.search).get("started");
/** Session id → {session, tr, events, stream: AbortController | null}. */
const rows = new Map();

if (me.role === "admin") {
  $("all-users-label").hidden = false;
}

/** A session is settled when it is what was asked for, or has failed. */
function settled(session) {
  return session.state === session.desired_state || session.state === "failed";
}

function streams() {
  return [...rows.values()].filter((row) => row.stream).length;
}

function stateText(session) {
  if (session.deleting) {
    return `${session.state} (deleting)`;
  }
  return session.desired_state === session.state || session.state === "failed"
    ? session.state
    : `${session.state} → ${session.desired_state}`;
}

function actionButton(label, session, doing, action) {
  const button = el("button", { type: "button", "data-action": label.toLowerCase(), "aria-label": `${label} ${session.id}` }, label);
  button.addEventListener("click", () => busy(button, `${doing} ${session.id} failed`, action));
  return button;
}

function desire(session, state) {
  return async () => {
    const changed = await call("PATCH", `/api/v1/sessions/${session.id}`, { state });
    update(changed);
    follow(changed.id, true);
  };
}

async function remove(session) {
  if (!confirm(`Delete session ${session.id}? Its desktop is stopped and the session forgotten.`)) {
    return;
  }
  const answer = await call("DELETE", `/api/v1/sessions/${session.id}`);
  if (answer === null) {
    forget(session.id);
  } else {
    update(answer);
    follow(answer.id, true);
  }
}

function actions(session) {
  if (session.deleting) {
    return [];
  }
  const found = [];
  const { state, desired_state: desired } = session;
  if (state === "running" && desired === "running") {
    found.push(el("a", { class: "button", href: `/ui/sessions/${session.id}/view`, "aria-label": `Open the desktop of ${session.id}` }, "Open desktop"));
    found.push(actionButton("Hibernate", session, "Hibernating", desire(session, "hibernated")));
  }
  if (desired === "hibernated") {
    found.push(actionButton("Wake", session, "Waking", desire(session, "running")));
  }
  if (desired === "stopped" && (state === "stopped" || state === "failed")) {
    found.push(actionButton("Start", session, "Starting", desire(session, "running")));
  }
  if (desired !== "stopped") {
    found.push(actionButton("Stop", session, "Stopping", desire(session, "stopped")));
  }
  found.push(actionButton("Delete", session, "Deleting", () => remove(session)));
  return found;
}

function eventLine(event) {
  const change = event.previous_state && event.previous_state !== event.state ? `${event.previous_state} → ${event.state}` : event.state;
  return el("li", {}, el("time", { datetime: event.at }, when(event.at)), " ", change, event.detail ? ` — ${event.detail}` : "");
}

function render(row) {
  const { session, tr } = row;
  tr.dataset.state = session.state;
  tr.dataset.desired = session.desired_state;
  const cells = tr.children;
  cells[1].replaceChildren(el("span", { class: `state state-${session.state}` }, stateText(session)));
  const last = row.events[row.events.length - 1];
  const progress = [];
  if (!settled(session) && !session.deleting) {
    progress.push(el("progress", { "aria-label": `Progress of ${session.id}` }), " ");
  }
  progress.push((last && last.detail) || session.reason || "");
  if (row.events.length) {
    const details = el("details", { open: row.open || null }, el("summary", {}, `History (${row.events.length})`), el("ol", { class: "events" }, row.events.map(eventLine)));
    details.addEventListener("toggle", () => {
      row.open = details.open;
    });
    progress.push(details);
  }
  cells[2].replaceChildren(...progress);
  cells[3].textContent = session.agent_id || "—";
  cells[4].replaceChildren(el("time", { datetime: session.created_at }, when(session.created_at)));
  cells[5].replaceChildren(...actions(session));
  if (session.id === started) {
    if (session.state === "running") {
      notice(`Session ${session.id} is running: open its desktop from the table.`);
    } else if (session.state === "failed") {
      notice(null);
      showError(new Error(`session ${session.id} failed: ${session.reason || (last && last.detail) || "no reason given"}`), "Starting failed");
    } else {
      notice(`Starting session ${session.id} (${session.template}): ${session.state}…`);
    }
  }
}

function update(session) {
  let row = rows.get(session.id);
  if (!row) {
    const tr = el("tr", { "data-session": session.id }, el("th", { scope: "row" }, el("code", {}, session.id), el("br"), session.template, me.role === "admin" ? ` · ${session.user}` : ""), el("td"), el("td"), el("td"), el("td"), el("td", { class: "actions" }));
    row = { session, tr, events: [], stream: null, open: session.id === started };
    rows.set(session.id, row);
  }
  row.session = session;
  render(row);
  return row;
}

function forget(id) {
  const row = rows.get(id);
  if (row) {
    row.stream?.abort();
    row.tr.remove();
    rows.delete(id);
  }
  $("no-sessions").hidden = rows.size > 0;
}

/** Follow a session's events until it settles; `force` takes a slot even when all are busy. */
function follow(id, force = false) {
  const row = rows.get(id);
  if (!row || row.stream || (!force && streams() >= MAX_STREAMS)) {
    return;
  }
  const stream = new AbortController();
  row.stream = stream;
  row.events = [];
  followEvents(
    id,
    async (event) => {
      row.events.push(event);
      // The stream replays the session's history first: only an event since the session
      // was read may move its state (an old "running" would show a waking session as up).
      if (Date.parse(event.at) >= Date.parse(row.session.updated_at)) {
        row.session = { ...row.session, state: event.state };
      }
      render(row);
      if (SETTLED.has(event.state)) {
        // The event has no desired state: read the session to know whether it is done.
        try {
          const fresh = await call("GET", `/api/v1/sessions/${id}`);
          row.session = fresh;
          render(row);
          if (settled(fresh)) {
            stream.abort();
          }
        } catch (error) {
          if (error.status === 404) {
            forget(id);
          } else {
            showError(error, `Reading session ${id} failed`);
          }
        }
      }
    },
    {
      signal: stream.signal,
      onError: (error) => (error.status === 404 ? forget(id) : showError(error, `Following session ${id} failed`)),
    },
  ).finally(() => {
    if (row.stream === stream) {
      row.stream = null;
    }
  });
}

async function load() {
  const query = new URLSearchParams({ limit: "100" });
  if (!allUsers.checked) {
    query.set("user", me.username);
  }
  try {
    const page = await call("GET", `/api/v1/sessions?${query}`);
    const seen = new Set();
    for (const session of page.items) {
      seen.add(session.id);
      const row = update(session);
      body.append(row.tr); // keeps the API's order, newest first
    }
    for (const id of [...rows.keys()]) {
      if (!seen.has(id)) {
        forget(id);
      }
    }
    $("no-sessions").hidden = rows.size > 0;
    if (started && rows.has(started)) {
      follow(started, true);
    }
    for (const row of rows.values()) {
      if (!settled(row.session)) {
        follow(row.session.id);
      }
    }
  } catch (error) {
    showError(error, "Loading the sessions failed");
  } finally {
    loaded(table);
  }
}

$("refresh").addEventListener("click", () => {
  clearError();
  load();
});
allUsers.addEventListener("change", load);
setInterval(() => {
  if (document.visibilityState === "visible") {
    load();
  }
}, REFRESH_MS);
await load();
if (started && rows.has(started)) {
  rows.get(started).tr.scrollIntoView({ block: "nearest" });
}
