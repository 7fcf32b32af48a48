// The viewer: noVNC's RFB client on the session's VNC socket, /vnc/{id}?token=..., over
// ws:// or wss:// of this host. Each connection needs a fresh single-use token.

import { call } from "./api.js";
import { $, busy, clearError, requireLogin, showError } from "./page.js";

const NOVNC = "/static/vendor/novnc/core/rfb.js";

await requireLogin();
const match = location.pathname.match(/^\/ui\/sessions\/([^/]+)\/view$/);
const sessionId = match ? decodeURIComponent(match[1]) : "";
const screen = $("screen");
const stateText = $("vnc-state");
const reconnect = $("reconnect");
let RFB = null;
let rfb = null;

function setState(state, text) {
  document.body.dataset.vnc = state;
  stateText.textContent = text;
  reconnect.hidden = state !== "disconnected";
}

async function loadNoVnc() {
  const setup = document.body.dataset.novncSetup;
  if (document.getElementById("novnc-missing")) {
    setState("unavailable", "The viewer is not set up.");
    return null;
  }
  try {
    return (await import(NOVNC)).default;
  } catch (error) {
    setState("unavailable", "The viewer is not set up.");
    showError(new Error(`noVNC could not be loaded from ${NOVNC} (${error.message}); run ${setup} and restart the control plane`), "The viewer cannot start");
    return null;
  }
}

async function connect() {
  clearError();
  setState("connecting", "Connecting…");
  try {
    const session = await call("GET", `/api/v1/sessions/${encodeURIComponent(sessionId)}`);
    document.title = `${session.template} ${session.id} · StreamSpace`;
    if (session.state !== "running") {
      throw new Error(`session ${session.id} is ${session.state}, not running; start it from My sessions`);
    }
    const ticket = await call("POST", `/api/v1/sessions/${encodeURIComponent(sessionId)}/vnc-token`);
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    rfb = new RFB(screen, `${scheme}://${location.host}${ticket.url}`, { wsProtocols: ["binary"], shared: true });
    rfb.scaleViewport = true;
    rfb.focusOnClick = true;
    rfb.addEventListener("connect", () => {
      setState("connected", `Connected to ${session.id}.`);
      rfb.focus();
    });
    rfb.addEventListener("disconnect", (event) => {
      rfb = null;
      setState("disconnected", event.detail.clean ? "Disconnected." : "The connection was lost.");
    });
    rfb.addEventListener("securityfailure", (event) => {
      showError(new Error(event.detail.reason || `status ${event.detail.status}`), "The VNC server refused the viewer");
    });
    rfb.addEventListener("desktopname", (event) => {
      document.title = `${event.detail.name} · StreamSpace`;
    });
  } catch (error) {
    setState("disconnected", "Not connected.");
    showError(error, "Opening the desktop failed");
  }
}

reconnect.addEventListener("click", () => busy(reconnect, "Reconnecting failed", connect));
$("fullscreen").addEventListener("click", () => {
  screen.requestFullscreen?.().catch((error) => showError(error, "Full screen failed"));
});

RFB = await loadNoVnc();
if (RFB) {
  await connect();
}
