// Admin: agent tokens; issue one (shown once); revoke one.

import { call } from "./api.js";
import { $, busy, el, loaded, notice, requireLogin, showError, when } from "./page.js";

await requireLogin();
const table = $("tokens");
const body = table.querySelector("tbody");
const form = $("token-form");
const agentId = $("agent-id");
const only = new URLSearchParams(location.search).get("agent");
if (only) {
  agentId.value = only;
}

function row(item) {
  const revoke = el("button", { type: "button", "aria-label": `Revoke ${item.token_id}`, disabled: item.revoked_at ? true : null }, "Revoke");
  revoke.addEventListener("click", () => {
    if (confirm(`Revoke token ${item.token_id} of ${item.agent_id}? An agent using it is refused from its next connection.`)) {
      busy(revoke, `Revoking ${item.token_id} failed`, async () => {
        await call("DELETE", `/api/v1/agent-tokens/${encodeURIComponent(item.token_id)}`);
        notice(`Revoked ${item.token_id}.`);
        await load();
      });
    }
  });
  return el(
    "tr",
    { "data-token": item.token_id },
    el("th", { scope: "row" }, el("code", {}, item.token_id)),
    el("td", {}, item.agent_id),
    el("td", {}, when(item.created_at)),
    el("td", {}, when(item.last_used_at)),
    el("td", {}, item.revoked_at ? when(item.revoked_at) : "no"),
    el("td", { class: "actions" }, revoke),
  );
}

async function load() {
  const query = only ? `?agent_id=${encodeURIComponent(only)}` : "";
  try {
    const tokens = await call("GET", `/api/v1/agent-tokens${query}`);
    body.replaceChildren(...tokens.map(row));
  } catch (error) {
    showError(error, "Loading the agent tokens failed");
  } finally {
    loaded(table);
  }
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  $("new-token").hidden = true;
  const created = await busy(form.querySelector("button[type=submit]"), "Issuing the token failed", () =>
    call("POST", `/api/v1/agents/${encodeURIComponent(agentId.value.trim())}/tokens`),
  );
  if (created) {
    $("new-token-value").textContent = created.token;
    $("new-token").hidden = false;
    await load();
  }
});
await load();
