// The template catalog: one card per template, each with a button that starts a session.

import { call } from "./api.js";
import { $, busy, el, loaded, requireLogin, showError } from "./page.js";

await requireLogin();
const list = $("templates");

function card(template) {
  const title = template.display_name || template.name;
  const start = el("button", { type: "button", "aria-label": `Start ${title}` }, "Start");
  start.addEventListener("click", async () => {
    const session = await busy(start, `Starting ${title} failed`, () =>
      call("POST", "/api/v1/sessions", { template: template.name }),
    );
    if (session) {
      location.assign(`/ui/sessions?started=${encodeURIComponent(session.id)}`);
    }
  });
  const facts = [template.platform && `platform ${template.platform}`, template.region && `region ${template.region}`]
    .filter(Boolean)
    .join(", ");
  return el(
    "li",
    { class: "card", "data-template": template.name },
    el("h2", {}, title),
    template.description ? el("p", {}, template.description) : null,
    el("p", { class: "muted" }, template.name, facts ? ` · ${facts}` : ""),
    el("p", {}, start),
  );
}

try {
  const templates = await call("GET", "/api/v1/templates");
  list.replaceChildren(...templates.map(card));
  if (!templates.length) {
    list.replaceChildren(el("li", {}, "No templates yet; an admin creates them with the API."));
  }
} catch (error) {
  showError(error, "Loading the templates failed");
} finally {
  loaded(list);
}
