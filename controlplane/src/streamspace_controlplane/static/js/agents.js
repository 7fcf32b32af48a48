// Admin: the agents, their state and load; delete one; issue it a token.

import { call } from "./api.js";
import { $, busy, clearError, el, loaded, requireLogin, showError, when } from "./page.js";

await requireLogin();
const table = $("agents");
const body = table.querySelector("tbody");

function row(agent) {
  const cap = agent.capacity;
  const remove = el("button", { type: "button", "aria-label": `Delete ${agent.agent_id}` }, "Delete");
  remove.addEventListener("click", () => {
    if (confirm(`Delete agent ${agent.agent_id}? Its tokens are revoked and it is disconnected; its sessions stop here (what its platform runs is left there). It comes back only with a new token.`)) {
      busy(remove, `Deleting ${agent.agent_id} failed`, async () => {
        await call("DELETE", `/api/v1/agents/${encodeURIComponent(agent.agent_id)}`);
        await load();
      });
    }
  });
  const labels = Object.entries(agent.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ");
  return el(
    "tr",
    { "data-agent": agent.agent_id },
    el("th", { scope: "row" }, el("code", {}, agent.agent_id), labels ? el("br") : null, labels ? el("span", { class: "muted" }, labels) : null),
    el("td", {}, el("span", { class: `state state-${agent.status}` }, agent.status)),
    el("td", {}, agent.platform),
    el("td", {}, agent.region || "—"),
    el("td", {}, `${cap.current_sessions} of ${cap.max_sessions}`),
    el("td", {}, el("time", { datetime: agent.last_heartbeat || "" }, when(agent.last_heartbeat))),
    el("td", { class: "actions" }, el("a", { class: "button", href: `/ui/admin/tokens?agent=${encodeURIComponent(agent.agent_id)}` }, "Tokens"), remove),
  );
}

async function load() {
  try {
    const agents = await call("GET", "/api/v1/agents");
    body.replaceChildren(...agents.map(row));
    if (!agents.length) {
      body.replaceChildren(el("tr", {}, el("td", { colspan: 7 }, "No agent has registered yet. Issue a token on the Agent tokens page and start one.")));
    }
  } catch (error) {
    showError(error, "Loading the agents failed");
  } finally {
    loaded(table);
  }
}

$("refresh").addEventListener("click", () => {
  clearError();
  load();
});
await load();
