// Admin: the users; create one; disable or enable one; delete one.

import { call } from "./api.js";
import { $, busy, el, loaded, notice, requireLogin, showError, when } from "./page.js";

const me = await requireLogin();
const table = $("users");
const body = table.querySelector("tbody");
const form = $("user-form");

function row(user) {
  const self = user.username === me.username;
  const verb = user.disabled ? "Enable" : "Disable";
  const toggle = el("button", { type: "button", "aria-label": `${verb} ${user.username}`, disabled: self ? true : null, title: self ? "You cannot disable your own user" : null }, verb);
  toggle.addEventListener("click", () => {
    const warning = user.disabled ? "" : " Their logins, tokens and open desktops stop at once; their sessions keep running.";
    if (confirm(`${verb} user ${user.username}?${warning}`)) {
      busy(toggle, `${verb === "Enable" ? "Enabling" : "Disabling"} ${user.username} failed`, async () => {
        await call("PATCH", `/api/v1/users/${encodeURIComponent(user.username)}`, { disabled: !user.disabled });
        notice(`${user.disabled ? "Enabled" : "Disabled"} ${user.username}.`);
        await load();
      });
    }
  });
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
    el("td", {}, user.role, user.disabled ? el("span", { class: "muted" }, " (disabled)") : null),
    el("td", {}, el("time", { datetime: user.created_at }, when(user.created_at))),
    el("td", { class: "actions" }, toggle, remove),
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
