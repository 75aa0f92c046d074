// The TypeScript client in a real browser: Debian's Chromium, driven by playwright-core, runs
// the browser inbox example (examples/browser-inbox). It shows new mail live; the server is
// killed and restarted in the middle (the laptop slept); the page sees every mail once, in
// order.
import { readFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import { resolve } from "node:path";

import { chromium, type Browser } from "playwright-core";
import { afterAll, beforeAll, expect, it } from "vitest";

import { Client, type HeraldEvent } from "../src/index.js";
import { Herald } from "./server.js";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";

const page = readFileSync(resolve(import.meta.dirname, "../../../examples/browser-inbox/index.html"));

let site: Server;
let sitePort = 0;
let browser: Browser;
let herald: Herald;

beforeAll(async () => {
  const bundle = readFileSync(resolve(import.meta.dirname, "../dist/index.js"));
  site = createServer((req, res) => {
    if (req.url?.startsWith("/herald-client.js")) {
      res.writeHead(200, { "content-type": "text/javascript" });
      res.end(bundle);
    } else {
      res.writeHead(200, { "content-type": "text/html" });
      res.end(page);
    }
  });
  await new Promise<void>((ok) => site.listen(0, "127.0.0.1", ok));
  const a = site.address();
  sitePort = typeof a === "object" && a ? a.port : 0;
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  herald = await Herald.start();
});

afterAll(async () => {
  await browser?.close();
  site?.close();
  await herald?.kill();
});

const mail = (seq: number): HeraldEvent => ({
  key: `alice@example.test/inbox/m${seq}`,
  kind: "new_mail",
});

it("a browser page subscribes, loses the server, and catches up without a gap or a duplicate", async () => {
  const tab = await browser.newPage();
  await tab.goto(
    `http://127.0.0.1:${sitePort}/?mailbox=alice@example.test&herald=${encodeURIComponent(herald.base)}`,
  );
  await tab.waitForFunction(() => (window as unknown as { ready?: boolean }).ready === true);
  const producer = new Client({ servers: [herald.base], backoff: { first: 20, max: 300 } });
  const publisher = producer.publisher();
  for (let i = 0; i < 50; i++) {
    await publisher.send([mail(i)]);
    // Mail of someone else, and not new mail: the page does not show it.
    await publisher.send([{ key: `bob@example.test/inbox/m${i}`, kind: "new_mail" }]);
    await publisher.send([{ key: `alice@example.test/inbox/m${i}`, kind: "object_modified" }]);
  }
  await tab.waitForFunction(() => (window as unknown as { seen: number[] }).seen.length >= 50);
  // The laptop sleeps; the server restarts meanwhile; more mail arrives.
  await herald.kill();
  await herald.spawn();
  for (let i = 50; i < 100; i++) await publisher.send([mail(i)]);
  await publisher.close();
  await tab.waitForFunction(() => (window as unknown as { seen: number[] }).seen.length >= 100, null, {
    timeout: 30_000,
  });
  await new Promise((r) => setTimeout(r, 200));
  const seen = await tab.evaluate(() => (window as unknown as { seen: string[] }).seen);
  expect(seen).toEqual(Array.from({ length: 100 }, (_, i) => `alice@example.test/inbox/m${i}`));
  expect(await tab.locator("#mail li").count()).toBe(100);
  await tab.screenshot({ path: resolve(import.meta.dirname, "../test-results/browser-inbox.png") });
  await tab.close();
});
