// Connections: every open stream, session and pushed-to subscription, refreshed every two
// seconds (presence changes show without a reload), with search, filters and a confirmed kick.
import type { Ctx } from "./main.js";
import type { Connection } from "./api.js";
import { ago, confirmDialog, every, fill, h, shortId, span, toast } from "./dom.js";

export function connections(ctx: Ctx, root: HTMLElement): () => void {
  const search = h("input", { type: "search", placeholder: "Search id, owner, target", "aria-label": "Search" });
  const transport = h("select", { "aria-label": "Transport" }, h("option", { value: "" }, "every transport"));
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
  const draw = () => {
    const q = search.value.trim().toLowerCase();
    const seen = new Set(rows.map((r) => r.transport));
    const current = transport.value;
    const options = [...seen].sort();
    if (options.join() !== [...transport.options].slice(1).map((o) => o.value).join()) {
      fill(
        transport,
        h("option", { value: "" }, "every transport"),
        options.map((t) => h("option", { value: t }, t)),
      );
      transport.value = seen.has(current) ? current : "";
    }
    const shown = rows.filter(
      (r) =>
        (!q || [r.id, r.owner, r.target].some((f) => f.toLowerCase().includes(q))) &&
        (!transport.value || r.transport === transport.value) &&
        (!state.value || r.state === state.value),
    );
    fill(count, `${rows.length} open, ${shown.length} shown`);
    fill(
      body,
      shown.map((r) =>
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
    if (!shown.length) body.append(h("tr", {}, h("td", { colspan: 8, class: "empty" }, "No connection matches.")));
  };
  for (const el of [search, transport, state]) el.addEventListener("input", draw);

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
      rows = rows.filter((r) => r.id !== c.id);
      draw();
    } catch (e) {
      toast(`Could not kick ${c.id}: ${(e as Error).message}`, "error");
    }
  }

  return every(2000, async () => {
    rows = await ctx.api.get<Connection[]>("/v1/connections");
    draw();
  });
}
