// Time-series charts, drawn with uPlot (small, fast, made for exactly this): one chart per
// measure, x in seconds since the epoch, a gap where a value is missing.
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";

import { h } from "./dom.js";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#65a30d"];

/** A chart that can be fed new data and follows its container's width. */
export class Chart {
  readonly el: HTMLElement;
  private plot: uPlot | null = null;
  private names: string[] = [];
  private readonly resize = new ResizeObserver(() => this.fit());

  constructor(
    readonly title: string,
    private readonly unit: string,
    private readonly height = 180,
  ) {
    this.el = h("figure", { class: "chart", "data-chart": title }, h("figcaption", {}, title));
    this.resize.observe(this.el);
  }

  /** The figure's content width (inside its padding). */
  private width(): number {
    const style = getComputedStyle(this.el);
    const inner = this.el.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    return Math.max(160, Math.floor(inner || 300));
  }

  private fit(): void {
    this.plot?.setSize({ width: this.width(), height: this.height });
  }

  /** Draws `series` (name → values, aligned with `xs`). */
  set(xs: number[], series: Record<string, (number | null)[]>): void {
    const names = Object.keys(series);
    const data = [xs, ...names.map((n) => series[n]!)] as uPlot.AlignedData;
    if (this.plot && names.join("\u0000") === this.names.join("\u0000")) {
      this.plot.setData(data);
      return;
    }
    this.plot?.destroy();
    this.names = names;
    const unit = this.unit;
    this.plot = new uPlot(
      {
        width: this.width(),
        height: this.height,
        legend: { show: true },
        cursor: { drag: { x: false, y: false } },
        // One sample alone would stretch the axis over years: show the minute around it.
        scales: { x: { time: true, range: (u, min, max) => xRange(u.data[0].length, min, max) }, y: { range: (_u, min, max) => [Math.min(0, min), Math.max(1, max * 1.1)] } },
        axes: [{}, { values: (_u, ticks) => ticks.map((t) => `${compact(t)}${unit}`), size: 64 }],
        series: [
          {},
          ...names.map((label, i) => ({
            label,
            stroke: COLORS[i % COLORS.length],
            width: 2,
            spanGaps: false,
            // Dots only while there are few samples: then each one is worth seeing.
            points: { show: (u: uPlot) => u.data[0].length <= 20 },
            value: (_u: uPlot, v: number | null) => (v === null ? "—" : `${compact(v)}${unit}`),
          })),
        ],
      },
      data,
      this.el,
    );
  }

  /** Stops following the container. */
  destroy(): void {
    this.resize.disconnect();
    this.plot?.destroy();
  }
}

/** 0.25, 12, 1.5k, 2.3M: short enough for an axis. */
function compact(v: number): string {
  const a = Math.abs(v);
  if (a >= 1e6) return `${+(v / 1e6).toFixed(1)}M`;
  if (a >= 1e4) return `${Math.round(v / 1e3)}k`;
  if (a >= 1e3) return `${+(v / 1e3).toFixed(1)}k`;
  return `${+v.toFixed(2)}`;
}

/** The x range: the data's, or the minute around a lone sample (uPlot would stretch it over
 * 86,400 of its time units, years when they are seconds), or the last minute without any. */
function xRange(samples: number, min: number | null, max: number | null): [number, number] {
  if (min === null || max === null || !Number.isFinite(min) || !Number.isFinite(max)) {
    const now = Date.now() / 1000;
    return [now - 60, now];
  }
  return samples <= 1 || max - min < 1 ? [min - 55, min + 5] : [min, max];
}
