// Overview: what flows in and out, who is connected, the log, and the server's state with the
// online/offline switch (confirmed, then its start/change/done progress shown as it happens).
import type { Ctx } from "./main.js";
import type { ServerState, Stats } from "./api.js";
import { Chart } from "./chart.js";
import { bytes, confirmDialog, every, fill, h, num, span, toast } from "./dom.js";

export function overview(ctx: Ctx, root: HTMLElement): () => void {
  const cards = h("div", { class: "cards" });
  const stateBox = h("section", { class: "panel state", "data-testid": "server-state" });
  const chart = new Chart("Events in and deliveries out (last 10 minutes)", "/s", 160);
  const quiet = h(
    "p",
    { class: "panel hint", hidden: true, "data-testid": "quiet" },
    "Nothing has flowed yet. Publish a test event from ",
    h("a", { href: "#events?subtree=alice@example.test&after=0" }, "Events"),
    ", or from a terminal: ",
    h("code", {}, "herald publish alice@example.test/inbox/m1 new_mail"),
    ".",
  );
  fill(root, h("h1", {}, "Overview"), stateBox, quiet, cards, chart.el);

  let flipping = false;
  /** The progress stream of a switch in progress, closed when the view is left. */
  let progress: AbortController | null = null;
  const stop = every(2000, async () => {
    const [stats, state] = await Promise.all([
      ctx.api.get<Stats>("/v1/stats?seconds=600"),
      ctx.api.get<ServerState>("/v1/state"),
    ]);
    ctx.setState(stats.state, stats.node ?? null);
    drawCards(cards, stats);
    quiet.hidden = stats.log_last > 0;
    if (!flipping) drawState(state, stats);
    chart.set(
      stats.samples.map((s) => s.at),
      {
        "events in": stats.samples.map((s) => s.events_in_per_second),
        "deliveries out": stats.samples.map((s) => s.deliveries_per_second),
      },
    );
  });

  function drawState(state: ServerState, stats: Stats): void {
    const online = state.state === "online";
    const target = online ? "offline" : "online";
    fill(
      stateBox,
      h("h2", {}, stats.node ? `Node ${stats.node}` : "Server"),
      h(
        "p",
        {},
        h("span", { class: `badge ${state.state}`, "data-testid": "state" }, state.state),
        state.transitioning ? " (changing…)" : "",
        ` · ${state.advised} watching its state · up ${span(stats.uptime_seconds * 1000)} · Herald ${stats.version}`,
      ),
      h(
        "button",
        {
          class: online ? "danger" : "primary",
          "data-action": `go-${target}`,
          onclick: () => void flip(target),
        },
        online ? "Take offline…" : "Bring online…",
      ),
      h(
        "p",
        { class: "hint" },
        online
          ? "Offline, deliveries pause on every transport; events are still accepted and logged."
          : "Deliveries are paused; bringing the server online delivers what waited.",
      ),
    );
  }

  async function flip(target: "online" | "offline"): Promise<void> {
    const sure = await confirmDialog(
      target === "offline" ? "Take the server offline?" : "Bring the server online?",
      target === "offline"
        ? "Every subscriber stops receiving until it is brought back online. Publishing goes on."
        : "Deliveries resume from where each subscriber was.",
      target === "offline" ? "Take offline" : "Bring online",
    );
    if (!sure) return;
    flipping = true;
    const steps = h("ol", { class: "progress", "data-testid": "progress" });
    fill(stateBox, h("h2", {}, `Going ${target}`), steps);
    const step = (text: string) => steps.append(h("li", {}, `${new Date().toLocaleTimeString()} ${text}`));
    const abort = new AbortController();
    progress = abort;
    const timeout = setTimeout(() => abort.abort(), 30_000);
    try {
      const stream = ctx.api.sse("/v1/state/advise?token=1", abort.signal);
      let requested = false;
      let done = false;
      for await (const ev of stream) {
        if (ev.event === "advised") {
          step("watching the transition");
          await ctx.api.send("PUT", "/v1/state", { state: target });
          requested = true;
          step(`asked to go ${target}`);
          continue;
        }
        if (!requested) continue;
        // The stream is ending (the server stops, or this page read too slowly).
        if (ev.event === "overflow" || ev.event === "shutdown") break;
        const n = JSON.parse(ev.data) as { old: string; new: string };
        step(`${ev.event}: ${n.old} → ${n.new}`);
        if (ev.event === "done") {
          done = true;
          break;
        }
      }
      if (done) toast(`The server is ${target}.`);
      else toast("The progress stream ended before the transition was done; the state shown next is the server's.", "error");
    } catch (e) {
      // Aborted after 30 s without `done` (it was already there, or the transition hangs):
      // say where the server is rather than why the wait ended.
      const now = await ctx.api.get<ServerState>("/v1/state").catch(() => null);
      if (now?.state === target && !now.transitioning) toast(`The server is ${target}.`);
      else toast(`Could not go ${target}: ${(e as Error).message}`, "error");
    } finally {
      clearTimeout(timeout);
      abort.abort();
      // Leave the steps on screen a moment, then show the state again.
      setTimeout(() => {
        flipping = false;
      }, 1500);
    }
  }

  return () => {
    stop();
    progress?.abort();
    chart.destroy();
  };
}

function drawCards(cards: HTMLElement, s: Stats): void {
  const last = s.samples.at(-1);
  const total = Object.values(s.connections).reduce((a, b) => a + b, 0);
  const held = s.log_last >= s.log_first && s.log_last > 0 ? s.log_last - s.log_first + 1 : 0;
  const card = (name: string, value: string, detail: (Node | string)[] | string) =>
    h("div", { class: "card", "data-card": name }, h("h3", {}, name), h("p", { class: "value" }, value), h("div", { class: "detail" }, detail));
  fill(
    cards,
    card("Events in", last ? `${num(last.events_in_per_second, 1)}/s` : "—", last ? "over the last sample" : "first sample within 10 s"),
    card("Deliveries out", last ? `${num(last.deliveries_per_second, 1)}/s` : "—", last?.latency_p99_ms !== undefined ? `p50 ${num(last.latency_p50_ms ?? 0, 1)} ms · p99 ${num(last.latency_p99_ms, 1)} ms` : "every transport"),
    card(
      "Connections",
      num(total),
      Object.keys(s.connections).length
        ? [h("ul", { class: "by" }, Object.entries(s.connections).map(([t, n]) => h("li", {}, `${t} ${num(n)}`)))]
        : "none open",
    ),
    card(
      "Log",
      `${num(held)} event${held === 1 ? "" : "s"}`,
      held ? `${s.log_bytes !== undefined ? `${bytes(s.log_bytes)} · ` : ""}watermarks ${num(s.log_first)} … ${num(s.log_last)}` : "empty",
    ),
    card("Durable subscriptions", num(s.durable_subscriptions), "poll, webhook and udp"),
  );
}
