// Herald's operator console: a login with an API key (when the server asks for one), then five
// views of the public API (overview, connections, subscriptions, events, charts), one shown at
// a time and chosen by the address's hash so that a view can be bookmarked.
import { Client } from "../../clients/js/src/index.js";

import { Api, ApiError, type Stats } from "./api.js";
import { charts } from "./charts.js";
import { connections } from "./connections.js";
import { fill, h, onTicks } from "./dom.js";
import { events } from "./events.js";
import { overview } from "./overview.js";
import { subscriptions } from "./subscriptions.js";
import "./style.css";

/** What every view is given. */
export interface Ctx {
  api: Api;
  /** A TypeScript client on this server with the operator's key (made once, kept). */
  client(): Client;
  /** Shows the server's state (and node) in the header. */
  setState(state: string, node: string | null): void;
}

type View = (ctx: Ctx, root: HTMLElement, params: URLSearchParams) => () => void;

const VIEWS: [string, string, View][] = [
  ["overview", "Overview", overview],
  ["connections", "Connections", connections],
  ["subscriptions", "Subscriptions", subscriptions],
  ["events", "Events", events],
  ["charts", "Charts", charts],
];

const api = new Api();
let client: Client | null = null;
/** The key `client` was made with: another key (a new login) makes another client. */
let clientToken: string | null = null;
const app = document.getElementById("app")!;
const badge = h("span", { class: "badge", "data-testid": "header-state" });
const ctx: Ctx = {
  api,
  client() {
    if (!client || clientToken !== api.token) {
      clientToken = api.token;
      client = new Client({ servers: [api.base], token: api.token ?? undefined, giveUpAfter: null });
    }
    return client;
  },
  setState(state, node) {
    badge.className = `badge ${state}`;
    fill(badge, node ? `${node}: ${state}` : state);
  },
};

let unmount: (() => void) | null = null;

/** Shows the view the hash names (once logged in: before, there is no view to show). */
function route(): void {
  if (!document.getElementById("view")) return;
  const [name, query] = location.hash.slice(1).split("?", 2);
  const view = VIEWS.find(([id]) => id === name) ?? VIEWS[0]!;
  unmount?.();
  for (const a of document.querySelectorAll("nav a")) {
    a.toggleAttribute("aria-current", a.getAttribute("href") === `#${view[0]}`);
  }
  const root = document.getElementById("view")!;
  unmount = view[2](ctx, root, new URLSearchParams(query ?? ""));
}

function shell(): void {
  fill(
    app,
    h(
      "header",
      {},
      h("a", { class: "brand", href: "#overview" }, "Herald"),
      h(
        "nav",
        {},
        VIEWS.map(([id, title]) => h("a", { href: `#${id}` }, title)),
      ),
      badge,
      api.token
        ? h(
            "button",
            {
              class: "secondary small",
              "data-action": "logout",
              onclick: () => {
                api.remember(null);
                location.hash = "";
                location.reload();
              },
            },
            "Log out",
          )
        : null,
    ),
    h("main", { id: "view" }),
  );
  route();
}

function login(message?: string): void {
  const key = h("input", { type: "password", name: "key", autocomplete: "current-password", required: true, "aria-label": "API key" });
  const error = h("p", { class: "error-text", role: "alert" }, message ?? "");
  const form = h(
    "form",
    { class: "login panel", "data-testid": "login" },
    h("h1", {}, "Herald console"),
    h("p", {}, "This server asks for an API key (one of ", h("code", {}, "[auth] keys"), ")."),
    h("label", {}, "API key ", key),
    h("button", { class: "primary", type: "submit" }, "Log in"),
    error,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    api.remember(key.value);
    const why = await check();
    if (why) {
      api.remember(null);
      fill(error, why);
      key.select();
    } else {
      shell();
    }
  });
  fill(app, form);
  key.focus();
}

/** Null when the API answers with the current credentials, else why not. */
async function check(): Promise<string | null> {
  try {
    const s = await api.get<Stats>("/v1/stats?seconds=10");
    ctx.setState(s.state, s.node ?? null);
    return null;
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return "That key was refused.";
    if (e instanceof ApiError && e.status === 403) return "That key may not operate this server (a subscriber token?).";
    return `The server did not answer: ${(e as Error).message}`;
  }
}

window.addEventListener("hashchange", route);

// A key that stops working (revoked, or the server restarted with other keys) sends the
// operator back to the login; a server that does not answer shows a banner until it does.
const banner = h("div", { class: "banner", role: "alert", hidden: true });
document.body.append(banner);
onTicks(
  (e) => {
    if (e instanceof ApiError && e.status === 401) {
      api.remember(null);
      unmount?.();
      unmount = null;
      login("The server no longer accepts that key.");
      return;
    }
    banner.hidden = false;
    fill(banner, e instanceof ApiError ? `The server answered: ${e.message}` : "The server does not answer; retrying…");
  },
  () => {
    banner.hidden = true;
  },
);

void (async () => {
  const why = await check();
  if (why === null) shell();
  else login(api.token ? why : undefined);
})();
