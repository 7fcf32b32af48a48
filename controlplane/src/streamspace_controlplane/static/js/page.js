// What every page shares: the login gate, the nav, messages, and building DOM safely.
//
// Data from the API only ever reaches the page as text (el() sets textContent), never as
// markup, so a template or user name cannot inject script.

import { forgetToken, toLogin, token, whoami } from "./api.js";

/** Return document.getElementById(id), failing loudly when the page lacks it. */
export function $(id) {
  const found = document.getElementById(id);
  if (!found) {
    throw new Error(`the page has no #${id}`);
  }
  return found;
}

/**
 * Build an element: el("a", {href: "/x", class: "btn"}, "text", child...).
 * Attributes set to null or false are left out; `true` sets an empty attribute.
 */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) {
      continue;
    }
    if (name.startsWith("on") && typeof value === "function") {
      node.addEventListener(name.slice(2), value);
    } else {
      node.setAttribute(name, value === true ? "" : String(value));
    }
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

/** Show `error` (an ApiError or any Error) in the page's alert box, saying what failed. */
export function showError(error, doing) {
  const box = $("error");
  const message = error && error.message ? error.message : String(error);
  box.replaceChildren(el("p", {}, doing ? `${doing}: ${message}` : message));
  box.hidden = false;
}

/** Clear the alert box. */
export function clearError() {
  const box = $("error");
  box.hidden = true;
  box.replaceChildren();
}

/** Show a short notice (polite live region), or hide it with null. */
export function notice(text) {
  const box = $("notice");
  box.textContent = text || "";
  box.hidden = !text;
}

/** Format an ISO time for people, in their locale; "—" for none. */
export function when(iso) {
  if (!iso) {
    return "—";
  }
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

/**
 * Run `action()` with `button` disabled meanwhile; show a failure as "doing: message".
 * Returns what the action returned, or undefined when it failed.
 */
export async function busy(button, doing, action) {
  clearError();
  button.disabled = true;
  try {
    return await action();
  } catch (error) {
    showError(error, doing);
    return undefined;
  } finally {
    button.disabled = false;
  }
}

/**
 * The gate of every page but the login: without a valid token, go and log in. Fills in
 * the nav (admin links for admins) and wires the logout button. Resolves to
 * {username, role}; without a token it never resolves, so the page's script waits
 * quietly while the browser leaves for the login page.
 */
export async function requireLogin() {
  const me = token() ? whoami() : null;
  if (!me) {
    toLogin();
    return new Promise(() => {});
  }
  $("whoami").textContent = `${me.username} (${me.role})`;
  for (const item of document.querySelectorAll("[data-admin]")) {
    item.hidden = me.role !== "admin";
  }
  const logout = $("logout");
  logout.hidden = false;
  logout.addEventListener("click", () => {
    forgetToken();
    location.assign("/ui/login");
  });
  return me;
}

/** Mark a table or list as loaded (for assistive technology), or as loading. */
export function loaded(node, done = true) {
  node.setAttribute("aria-busy", done ? "false" : "true");
}
