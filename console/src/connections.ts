// Connections: every open stream, session and pushed-to subscription, refreshed every two
// seconds (presence changes show without a reload), with search, filters and a confirmed kick.
// The server searches, filters and cuts the list (at SHOWN rows), so thousands of connections
// cost the page no more than a few.
import type { Ctx } from "./main.js";
import type { Connection } from "./api.js";
import { ago, confirmDialog, every, fill, h, report, shortId, span, toast } from "./dom.js";

/** Rows asked for at most. */
const SHOWN = 500;
/** The transports a connection may have. */
const TRANSPORTS = ["sse", "ws", "poll", "udp", "webhook", "ews", "mapi"];

export function connections(ctx: Ctx, root: HTMLElement): () => void {
  const search = h("input", { type: "search", placeholder: "Search id, owner, target", "aria-label": "Search" });
  const transport = h(
    "select",
    { "aria-label": "Transport" },
    h("option", { value: "" }, "every transport"),
    TRANSPORTS.map((t) => h("option", { value: t }, t)),
  );
  const state = h(
    "select",
    { "aria-label": "State" },
    h("option", { value: "" }, "online and offline"),
    h("option", { value: "online" }, "online"),
    h("option", { value: "offline" }, "offline"),
  );
  const count = h("p", { class: "hint", "data-testid": "count" });
  const body = h("tbody");
  const table = h(
    "table",
    { "data-testid": "connections" },
    h(
      "thead",
      {},
      h("tr", {}, ["Id", "State", "Transport", "Owner", "Target", "Since", "Lease", ""].map((c) => h("th", {}, c))),
    ),
    body,
  );
  fill(
    root,
    h("h1", {}, "Connections"),
    h("div", { class: "filters" }, search, transport, state),
    count,
    h("div", { class: "scroll" }, table),
  );

  let rows: Connection[] = [];
  let total = 0;
  let open = 0;
  const draw = () => {
    fill(count, `${open} open, ${total} match${rows.length < total ? `, first ${rows.length} shown` : ""}`);
    fill(
      body,
      rows.map((r) =>
        h(
          "tr",
          { "data-id": r.id },
          h("td", {}, shortId(r.id)),
          h("td", {}, h("span", { class: `badge ${r.state}` }, r.state)),
          h("td", {}, r.transport),
          h("td", {}, r.owner),
          h("td", { class: "mono" }, r.target),
          h("td", { title: new Date(r.state_since / 1000).toISOString() }, ago(r.state_since)),
          h("td", {}, r.lease === "none" ? "—" : r.lease_left_ms === undefined ? `${r.lease} (held)` : `${r.lease}, ${span(r.lease_left_ms)} left`),
          h("td", {}, h("button", { class: "danger small", "data-action": "kick", onclick: () => void kick(r) }, "Kick")),
        ),
      ),
    );
    if (!rows.length) body.append(h("tr", {}, h("td", { colspan: 8, class: "empty" }, "No connection matches.")));
  };

  // A refresh for an older search that answers late is dropped.
  let latest = 0;
  const refresh = async () => {
    const mine = ++latest;
    const q = new URLSearchParams({ limit: String(SHOWN) });
    if (search.value.trim()) q.set("search", search.value.trim());
    if (transport.value) q.set("transport", transport.value);
    if (state.value) q.set("state", state.value);
    const filtered = q.size > 1;
    const [page, all] = await Promise.all([
      ctx.api.list<Connection>(`/v1/connections?${q}`),
      // How many are open at all: the same count unless a filter is set.
      filtered ? ctx.api.list<Connection>("/v1/connections?limit=0") : null,
    ]);
    if (mine !== latest) return;
    rows = page.items;
    total = page.total;
    open = all?.total ?? page.total;
    draw();
  };
  for (const el of [search, transport, state]) el.addEventListener("input", () => refresh().catch(report));

  async function kick(c: Connection): Promise<void> {
    const sure = await confirmDialog(
      "Kick this connection?",
      `${c.transport} connection ${c.id} of ${c.owner} (${c.target}) is told to close; hooks hear it as a cancel and may refuse.`,
      "Kick",
    );
    if (!sure) return;
    try {
      await ctx.api.send("DELETE", `/v1/connections/${encodeURIComponent(c.id)}`);
      toast(`Kicked ${c.id}.`);
      await refresh();
    } catch (e) {
      toast(`Could not kick ${c.id}: ${(e as Error).message}`, "error");
    }
  }

  return every(2000, refresh);
}
