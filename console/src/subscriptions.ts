// Subscriptions: every durable subscription with its acknowledged and head watermarks and its
// lag in events and time; for webhooks, where deliveries stand, with enable and rotate-secret.
// A row opens its lag chart (sampled by this page every two seconds while it is open) and a
// webhook's last attempts. A rotated secret goes to the clipboard and is never shown.
import type { Ctx } from "./main.js";
import type { DeliveryAttempt, Subscription } from "./api.js";
import { Chart } from "./chart.js";
import { ago, confirmDialog, every, fill, h, num, report, shortId, span, toast, until } from "./dom.js";

/** Lag samples kept per subscription (two hours at one every two seconds... capped). */
const HISTORY = 1800;
/** Rows asked for at most (the server searches and cuts; each row costs it a short read). */
const SHOWN = 200;
/** Subscriptions whose lag is kept; past it, the oldest-seen are forgotten. */
const TRACKED = 1000;

interface History {
  at: number[];
  events: number[];
  seconds: number[];
}
const histories = new Map<string, History>();

function record(s: Subscription, at: number): void {
  let hist = histories.get(s.id);
  if (!hist) {
    if (histories.size >= TRACKED) histories.delete(histories.keys().next().value!);
    hist = { at: [], events: [], seconds: [] };
    histories.set(s.id, hist);
  }
  hist.at.push(at);
  hist.events.push(s.lag);
  hist.seconds.push(s.lag_seconds);
  if (hist.at.length > HISTORY) {
    hist.at.shift();
    hist.events.shift();
    hist.seconds.shift();
  }
}

function filterText(s: Subscription): string {
  const f = s.filter;
  const what = f.key ? `key ${f.key}` : f.subtree ? `subtree ${f.subtree}` : f.children ? `children ${f.children}` : "everything";
  return f.kinds ? `${what} · ${f.kinds}` : what;
}

/** The Events view's address that tails what `s` follows, from its acknowledged watermark. */
function tailHref(s: Subscription): string {
  const q = new URLSearchParams();
  const f = s.filter;
  if (f.key) q.set("key", f.key);
  else if (f.subtree) q.set("subtree", f.subtree);
  else if (f.children) q.set("children", f.children);
  if (f.kinds) q.set("kinds", f.kinds);
  q.set("after", String(s.acked));
  return `#events?${q}`;
}

export function subscriptions(ctx: Ctx, root: HTMLElement): () => void {
  const body = h("tbody");
  const detail = h("section", { class: "panel detail", hidden: true, "data-testid": "detail" });
  const lagChart = new Chart("Lag (events)", "", 150);
  const lagSeconds = new Chart("Lag (seconds)", " s", 150);
  const attempts = h("div");
  const count = h("p", { class: "hint", "data-testid": "count" });
  const search = h("input", { type: "search", placeholder: "Search id, key, owner, URL", "aria-label": "Search" });
  fill(
    root,
    h("h1", {}, "Subscriptions"),
    h("div", { class: "filters" }, search),
    count,
    h(
      "div",
      { class: "scroll" },
      h(
        "table",
        { "data-testid": "subscriptions" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ["Id", "Lag", "Lag time", "Delivery", "Filter", "Transport", "Acked", "Head", "Last error", "Next retry", "Failures", ""].map((c) =>
              h("th", {}, c),
            ),
          ),
        ),
        body,
      ),
    ),
    detail,
  );

  let rows: Subscription[] = [];
  let total = 0;
  let open: string | null = null;

  const draw = () => {
    fill(count, `${total} match${rows.length < total ? `, first ${rows.length} shown` : ""}. Select one for its lag chart.`);
    fill(
      body,
      rows.map((s) => {
        const d = s.delivery;
        const webhook = s.transport === "webhook";
        const stuck = s.state === "paused" || s.state === "disabled";
        return h(
          "tr",
          {
            "data-id": s.id,
            class: s.id === open ? "selected" : "",
            onclick: (e: Event) => {
              if ((e.target as Element).closest("button, a")) return;
              open = open === s.id ? null : s.id;
              draw();
              drawDetail().catch(report);
            },
          },
          h("td", {}, shortId(s.id)),
          h("td", { "data-field": "lag", class: s.lag ? "warn" : "" }, num(s.lag)),
          h("td", { "data-field": "lag-seconds" }, s.lag_seconds ? span(s.lag_seconds * 1000) : "0"),
          h("td", { "data-field": "status" }, d ? h("span", { class: `badge ${d.status}` }, d.status) : s.pending ? "pending" : "—"),
          h("td", { class: "mono" }, filterText(s)),
          h("td", {}, s.transport),
          h("td", { "data-field": "acked" }, num(s.acked)),
          h("td", { "data-field": "head" }, num(s.head)),
          h("td", { class: "error-text" }, d?.last_error ?? (s.reason || "")),
          h("td", {}, d ? until(d.next_attempt_at) : "—"),
          h("td", {}, d ? num(d.attempts) : "—"),
          h(
            "td",
            {},
            h(
              "div",
              { class: "actions" },
              s.lag ? h("a", { href: tailHref(s), class: "button small secondary", title: "Tail what it follows from its acknowledged watermark" }, "Tail") : null,
              webhook && stuck ? h("button", { class: "primary small", "data-action": "enable", onclick: () => void enable(s) }, "Enable") : null,
              webhook ? h("button", { class: "secondary small", "data-action": "rotate", onclick: () => void rotate(s) }, "Rotate secret") : null,
            ),
          ),
        );
      }),
    );
    if (!rows.length) body.append(h("tr", {}, h("td", { colspan: 12, class: "empty" }, "No durable subscription.")));
  };

  async function drawDetail(): Promise<void> {
    const s = rows.find((r) => r.id === open);
    detail.hidden = !s;
    if (!s) return;
    const hist = histories.get(s.id);
    if (detail.dataset.id !== s.id) {
      detail.dataset.id = s.id;
      fill(detail, h("h2", {}, `${s.id}`), h("p", { class: "hint" }, `${filterText(s)} · created ${ago(s.created_at)} ago${s.url ? ` · ${s.url}` : ""}`), lagChart.el, lagSeconds.el, attempts);
    }
    if (hist) {
      lagChart.set(hist.at, { lag: hist.events });
      lagSeconds.set(hist.at, { "lag time": hist.seconds });
    }
    if (s.transport !== "webhook") {
      fill(attempts);
      return;
    }
    const list = await ctx.api.get<DeliveryAttempt[]>(`/v1/subscriptions/${encodeURIComponent(s.id)}/deliveries`);
    // Another row was opened while this answer came.
    if (open !== s.id) return;
    fill(
      attempts,
      h("h3", {}, "Last delivery attempts"),
      list.length
        ? h(
            "div",
            { class: "scroll" },
            h(
              "table",
              { "data-testid": "attempts" },
              h("thead", {}, h("tr", {}, ["When", "Took", "Outcome", "Why"].map((c) => h("th", {}, c)))),
              h(
                "tbody",
                {},
                list.map((a) =>
                  h(
                    "tr",
                    {},
                    h("td", {}, `${ago(a.at)} ago`),
                    h("td", {}, `${num(a.duration_ms)} ms`),
                    h("td", {}, h("span", { class: `badge ${a.outcome}` }, a.outcome)),
                    h("td", { class: "error-text" }, a.error ?? ""),
                  ),
                ),
              ),
            ),
          )
        : h("p", { class: "hint" }, "No attempt yet."),
    );
  }

  async function enable(s: Subscription): Promise<void> {
    const sure = await confirmDialog("Enable this webhook?", `${s.id} resumes delivering from its acknowledged watermark ${s.acked}.`, "Enable");
    if (!sure) return;
    try {
      await ctx.api.send("POST", `/v1/subscriptions/${encodeURIComponent(s.id)}/enable`);
      toast(`${s.id} enabled.`);
    } catch (e) {
      toast(`Could not enable ${s.id}: ${(e as Error).message}`, "error");
    }
  }

  async function rotate(s: Subscription): Promise<void> {
    if (!navigator.clipboard) {
      // Plain HTTP to another host is not a secure context: no clipboard, and the console
      // does not put secrets on screen.
      toast(`This page cannot use the clipboard (it needs HTTPS or localhost); rotate with POST /v1/subscriptions/${s.id}/rotate-secret.`, "error");
      return;
    }
    const sure = await confirmDialog(
      "Rotate the signing secret?",
      `${s.id} signs with a new secret from now on (and with the old one too, for a while, so the receiver can switch). The new secret is copied to your clipboard, not shown.`,
      "Rotate",
    );
    if (!sure) return;
    let secret: string;
    try {
      const r = (await ctx.api.send("POST", `/v1/subscriptions/${encodeURIComponent(s.id)}/rotate-secret`)) as Subscription;
      if (!r.secret) throw new Error("the server returned no secret");
      secret = r.secret;
    } catch (e) {
      toast(`Could not rotate the secret of ${s.id}: ${(e as Error).message}`, "error");
      return;
    }
    try {
      await navigator.clipboard.writeText(secret);
      toast(`New secret for ${s.id} copied to the clipboard.`);
    } catch {
      // The browser refused a write that no longer follows the click (the dialog and the
      // request came between): one more click copies it. The secret stays off the page.
      await copyLater(s.id, secret);
    }
  }

  // A refresh for an older search that answers late is dropped.
  let latest = 0;
  const refresh = async () => {
    const mine = ++latest;
    const q = new URLSearchParams({ limit: String(SHOWN) });
    if (search.value.trim()) q.set("search", search.value.trim());
    const page = await ctx.api.list<Subscription>(`/v1/subscriptions?${q}`);
    if (mine !== latest) return;
    rows = page.items;
    total = page.total;
    const now = Date.now() / 1000;
    for (const s of rows) record(s, now);
    draw();
    await drawDetail();
  };
  search.addEventListener("input", () => refresh().catch(report));
  const stop = every(2000, refresh);
  return () => {
    stop();
    lagChart.destroy();
    lagSeconds.destroy();
  };
}

/** Holds a rotated secret until the operator clicks to copy it (it cannot be fetched again). */
function copyLater(id: string, secret: string): Promise<void> {
  return new Promise((resolve) => {
    const status = h("p", { class: "hint" }, "It is not shown, and cannot be fetched again: copy it now.");
    const dialog = h(
      "dialog",
      { class: "confirm", "aria-label": "Copy the new secret" },
      h("h2", {}, `The secret of ${id} was rotated`),
      status,
      h(
        "form",
        { method: "dialog" },
        h(
          "button",
          {
            type: "button",
            class: "primary",
            "data-action": "copy-secret",
            onclick: async () => {
              try {
                await navigator.clipboard.writeText(secret);
                toast(`New secret for ${id} copied to the clipboard.`);
                dialog.close();
              } catch (e) {
                fill(status, `The browser refused the clipboard (${(e as Error).message}). Rotate again from a browser that allows it, or with the API.`);
              }
            },
          },
          "Copy new secret",
        ),
        h("button", { value: "close", class: "secondary" }, "Close"),
      ),
    );
    dialog.addEventListener("close", () => {
      dialog.remove();
      resolve();
    });
    document.body.append(dialog);
    dialog.showModal();
  });
}
