// The login page: exchange a username and password for a token, then go where we were.

import { call, keepToken } from "./api.js";
import { $, busy } from "./page.js";

function next() {
  const target = new URLSearchParams(location.search).get("next") || "";
  // Only a path of this site: never an open redirect to another origin.
  return target.startsWith("/") && !target.startsWith("//") ? target : "/ui/sessions";
}

const form = $("login-form");
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = form.querySelector("button[type=submit]");
  const answer = await busy(button, "Login failed", () =>
    call("POST", "/api/v1/auth/login", {
      username: $("username").value,
      password: $("password").value,
    }),
  );
  if (answer) {
    keepToken(answer.token, answer.expires_at);
    location.assign(next());
  } else {
    $("password").select();
  }
});
$("username").focus();
