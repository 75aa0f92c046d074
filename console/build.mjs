// Builds the console into the assets `herald serve` embeds (crates/herald-server/assets/
// console): app.js and app.css bundled by esbuild, and index.html copied. The output depends
// only on the sources and the pinned versions in package-lock.json, so `scripts/test` can
// rebuild it and fail when the checked-in copy differs.
import { copyFileSync, mkdirSync, readFileSync } from "node:fs";
import { resolve } from "node:path";

import { build } from "esbuild";

const uplot = JSON.parse(readFileSync(resolve(import.meta.dirname, "node_modules/uplot/package.json"), "utf8"));
const out = resolve(import.meta.dirname, "../crates/herald-server/assets/console");
mkdirSync(out, { recursive: true });
await build({
  entryPoints: { app: resolve(import.meta.dirname, "src/main.ts") },
  bundle: true,
  format: "esm",
  target: ["es2022", "chrome111", "firefox115", "safari16"],
  minify: true,
  legalComments: "eof",
  banner: {
    js: `/*! Herald console. Includes uPlot ${uplot.version} (MIT License, Copyright (c) Leon Sorokin). */`,
  },
  charset: "utf8",
  outdir: out,
  logLevel: "warning",
});
copyFileSync(resolve(import.meta.dirname, "index.html"), resolve(out, "index.html"));
