// Charts of the last hour, from the samples Herald keeps in memory (`GET /v1/stats`): rates,
// delivery latency percentiles and connections by transport. No external Prometheus needed.
import type { Ctx } from "./main.js";
import type { Stats } from "./api.js";
import { Chart } from "./chart.js";
import { every, fill, h } from "./dom.js";

export function charts(ctx: Ctx, root: HTMLElement): () => void {
  const rates = new Chart("Events in and deliveries out", "/s");
  const latency = new Chart("Delivery latency (event timestamp to delivery)", " ms");
  const conns = new Chart("Connections by transport", "");
  const note = h("p", { class: "hint" });
  fill(root, h("h1", {}, "Charts (last hour)"), note, h("div", { class: "charts" }, rates.el, latency.el, conns.el));

  const stop = every(10_000, async () => {
    const s = await ctx.api.get<Stats>("/v1/stats?seconds=3600");
    const xs = s.samples.map((p) => p.at);
    fill(note, s.samples.length ? `${s.samples.length} samples, one every ${interval(xs)} s, kept in the server's memory.` : "The first sample comes within ten seconds of the server's start.");
    rates.set(xs, {
      "events in": s.samples.map((p) => p.events_in_per_second),
      "deliveries out": s.samples.map((p) => p.deliveries_per_second),
    });
    latency.set(xs, {
      p50: s.samples.map((p) => p.latency_p50_ms ?? null),
      p99: s.samples.map((p) => p.latency_p99_ms ?? null),
    });
    const transports = [...new Set(s.samples.flatMap((p) => Object.keys(p.connections)))].sort();
    const series: Record<string, number[]> = {
      total: s.samples.map((p) => Object.values(p.connections).reduce((a, b) => a + b, 0)),
    };
    for (const t of transports) series[t] = s.samples.map((p) => p.connections[t] ?? 0);
    conns.set(xs, series);
  });
  return () => {
    stop();
    for (const c of [rates, latency, conns]) c.destroy();
  };
}

function interval(xs: number[]): number {
  return xs.length > 1 ? Math.round((xs.at(-1)! - xs[0]!) / (xs.length - 1)) : 10;
}
