// Admin: the users; create one; delete one.

import { call } from "./api.js";
import { $, busy, el, loaded, notice, requireLogin, showError, when } from "./page.js";

const me = await requireLogin();
const table = $("users");
const body = table.querySelector("tbody");
const form = $("user-form");

function row(user) {
  const remove = el("button", { type: "button", "aria-label": `Delete ${user.username}`, disabled: user.username === me.username ? true : null }, "Delete");
  remove.addEventListener("click", () => {
    if (confirm(`Delete user ${user.username}?`)) {
      busy(remove, `Deleting ${user.username} failed`, async () => {
        await call("DELETE", `/api/v1/users/${encodeURIComponent(user.username)}`);
        notice(`Deleted ${user.username}.`);
        await load();
      });
    }
  });
  return el(
    "tr",
    { "data-user": user.username },
    el("th", { scope: "row" }, user.username),
    el("td", {}, user.role),
    el("td", {}, el("time", { datetime: user.created_at }, when(user.created_at))),
    el("td", { class: "actions" }, remove),
  );
}

async function load() {
  try {
    const users = await call("GET", "/api/v1/users");
    body.replaceChildren(...users.map(row));
  } catch (error) {
    showError(error, "Loading the users failed");
  } finally {
    loaded(table);
  }
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const data = new FormData(form);
  const created = await busy(form.querySelector("button[type=submit]"), "Creating the user failed", () =>
    call("POST", "/api/v1/users", { username: data.get("username"), password: data.get("password"), role: data.get("role") }),
  );
  if (created) {
    form.reset();
    notice(`Created ${created.role} ${created.username}.`);
    await load();
  }
});
await load();
