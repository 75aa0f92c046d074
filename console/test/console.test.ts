// The console in a real browser: Debian's Chromium, driven by playwright-core, against a real
// `herald serve` that asks for an API key. Each test does what an operator does — log in,
// watch a connection come and go and kick one, watch a webhook's lag grow while its receiver
// is down and fall to zero when it is back, take the server offline and online, publish from
// the form and see the event in the tail — and the last one saves screenshots of every view
// at a laptop's and a phone's width (test-results/).
import { mkdirSync } from "node:fs";
import { createServer, type Server } from "node:http";
import { resolve } from "node:path";

import { chromium, type Browser, type BrowserContext, type Page } from "playwright-core";
import { afterAll, afterEach, beforeAll, expect, it } from "vitest";

import { Client } from "../../clients/js/src/index.js";
import { Herald } from "../../clients/js/test/server.js";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const KEY = "console-operator-key-0123456789";
const SHOTS = resolve(import.meta.dirname, "../test-results");

let herald: Herald;
let browser: Browser;
let context: BrowserContext;
/** Errors the pages raised (a script error, a CSP refusal): none is expected. */
const pageErrors: string[] = [];

beforeAll(async () => {
  mkdirSync(SHOTS, { recursive: true });
  herald = await Herald.start({
    HERALD_AUTH__KEYS: JSON.stringify([KEY]),
    HERALD_AUTH__TOKEN_SECRET: "console-test-secret-0123456789abcdef",
    HERALD_STATS__SAMPLE_EVERY: "1s",
    HERALD_WEBHOOKS__RETRY_BASE: "100ms",
    HERALD_WEBHOOKS__RETRY_CAP: "400ms",
    HERALD_WEBHOOKS__REQUEST_TIMEOUT: "1s",
    HERALD_WEBHOOKS__FAIL_AFTER: "5m",
  });
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  context = await newContext(1280, 800);
});

// Every test: no script error, no CSP refusal in any page it opened.
afterEach(() => {
  const seen = pageErrors.splice(0);
  expect(seen).toEqual([]);
});

afterAll(async () => {
  await browser?.close();
  await herald?.kill();
});

async function newContext(width: number, height: number): Promise<BrowserContext> {
  const c = await browser.newContext({ viewport: { width, height } });
  await c.grantPermissions(["clipboard-read", "clipboard-write"], { origin: herald.base });
  c.on("page", (p) => watchErrors(p));
  return c;
}

function watchErrors(p: Page): void {
  p.on("pageerror", (e) => pageErrors.push(`pageerror: ${e.message}`));
  p.on("console", (m) => {
    // A refused fetch while the server is down is logged by the browser; everything else
    // at error level is a defect.
    if (m.type() === "error" && !m.text().includes("Failed to load resource")) pageErrors.push(`console: ${m.text()}`);
  });
}

/** A page logged in with the operator's key, on `view`. */
async function loggedIn(view = "overview", c: BrowserContext = context): Promise<Page> {
  const page = await c.newPage();
  await page.goto(`${herald.base}/console#${view}`);
  await page.getByLabel("API key").fill(KEY);
  await page.getByRole("button", { name: "Log in" }).click();
  await page.locator("nav").waitFor();
  return page;
}

async function api(method: string, path: string, body?: unknown): Promise<Response> {
  return await fetch(herald.base + path, {
    method,
    headers: { authorization: `Bearer ${KEY}`, ...(body ? { "content-type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
}

async function publish(key: string, n: number): Promise<void> {
  const events = Array.from({ length: n }, (_, i) => ({ key: `${key}/m${i}`, kind: "new_mail" }));
  const r = await api("POST", "/v1/events", { events });
  expect(r.status).toBe(200);
}

/** `secret` is nowhere a page shows or keeps for longer than the tab: not in its text or
 * markup, not in its address, not in localStorage. (sessionStorage holds the API key.) */
async function expectNowhere(page: Page, secret: string): Promise<void> {
  expect(await page.content()).not.toContain(secret);
  expect(page.url()).not.toContain(secret);
  const local = await page.evaluate(() => JSON.stringify({ ...localStorage }));
  expect(local).not.toContain(secret);
}

async function confirm(page: Page): Promise<void> {
  await page.locator("dialog.confirm [data-confirm]").click();
}

it("asks for the API key, refuses a wrong one, and opens the overview with the right one", async () => {
  const page = await context.newPage();
  await page.goto(`${herald.base}/console`);
  await page.getByTestId("login").waitFor();
  await page.getByLabel("API key").fill("not-the-key");
  await page.getByRole("button", { name: "Log in" }).click();
  await page.getByText("That key was refused.").waitFor();

  await page.getByLabel("API key").fill(KEY);
  await page.getByRole("button", { name: "Log in" }).click();
  await page.locator('[data-card="Log"]').waitFor();
  await expect(page.getByTestId("state").textContent()).resolves.toBe("online");
  // The log's card says how many events and bytes it holds, from the API's figures.
  await api("POST", "/v1/events", { events: [{ key: "alice@example.test/inbox/first", kind: "new_mail" }] });
  await expect.poll(() => page.locator('[data-card="Log"]').innerText(), { timeout: 10_000 }).toMatch(/1 event[\s\S]*\d+ B · watermarks 1 … 1/);
  await expect(page.getByTestId("header-state").textContent()).resolves.toBe("online");
  // The key is never on the page, in its address, or where another tab could read it.
  await expectNowhere(page, KEY);
  // Reloading keeps the tab logged in; logging out forgets the key.
  await page.reload();
  await page.locator('[data-card="Log"]').waitFor();
  await page.locator('[data-action="logout"]').click();
  await page.getByTestId("login").waitFor();
  await page.close();
});

it("shows a connection appear and disappear without a reload, and kicks one after confirmation", async () => {
  const page = await loggedIn("connections");
  // (A WebSocket carries many subscriptions: its row names no target; its id says `ws-`.)
  await page.getByLabel("Search").fill("ws-");

  // A WebSocket subscriber comes: its row appears; it goes: the row goes.
  const client = new Client({ servers: [herald.base], token: KEY });
  const subscriber = client.subscriber();
  await subscriber.subscribe({ subtree: "appears@example.test" });
  const row = page.locator('[data-testid="connections"] tbody tr[data-id]');
  await row.first().waitFor({ timeout: 10_000 });
  expect(await row.first().innerText()).toContain("ws");
  subscriber.close();
  await row.first().waitFor({ state: "detached", timeout: 10_000 });

  // An SSE stream comes; the operator kicks it (confirming first); the stream ends.
  const stream = await fetch(`${herald.base}/v1/stream?subtree=kickme@example.test`, {
    headers: { authorization: `Bearer ${KEY}` },
  });
  const ended = (async () => {
    const reader = stream.body!.getReader();
    while (!(await reader.read()).done) {
      // keep-alives
    }
    return true;
  })();
  await page.getByLabel("Search").fill("kickme@example.test");
  const kickRow = page.locator('[data-testid="connections"] tbody tr[data-id]');
  await kickRow.first().waitFor({ timeout: 10_000 });
  await page.getByLabel("Transport").selectOption("sse");
  await expect.poll(() => page.getByTestId("count").innerText()).toMatch(/ 1 match/);
  expect(await kickRow.count()).toBe(1);
  await kickRow.first().locator('[data-action="kick"]').click();
  // Cancelling leaves it be.
  await page.locator("dialog.confirm").getByRole("button", { name: "Cancel" }).click();
  await page.waitForTimeout(2500);
  expect(await kickRow.count()).toBe(1);
  await kickRow.first().locator('[data-action="kick"]').click();
  await confirm(page);
  await expect(Promise.race([ended, new Promise((r) => setTimeout(() => r(false), 10_000))])).resolves.toBe(true);
  await kickRow.first().waitFor({ state: "detached", timeout: 10_000 });
  const left = (await (await api("GET", "/v1/connections")).json()) as { target: string }[];
  expect(left.filter((c) => c.target.includes("kickme"))).toEqual([]);
  await page.close();
});

it("shows a webhook's lag grow while its receiver is down and fall to zero when it returns", async () => {
  let up = true;
  let gone = false;
  const got: string[] = [];
  const receiver: Server = createServer((req, res) => {
    let body = "";
    req.on("data", (c) => (body += c));
    req.on("end", () => {
      const v = JSON.parse(body || "{}");
      if (gone) {
        res.writeHead(410).end("no such hook");
        return;
      }
      if (!up) {
        res.writeHead(503).end("down for maintenance");
        return;
      }
      if (v.type === "verification") {
        res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify({ challenge: v.challenge }));
        return;
      }
      got.push(body);
      res.writeHead(204).end();
    });
  });
  await new Promise<void>((ok) => receiver.listen(0, "127.0.0.1", ok));
  const port = (receiver.address() as { port: number }).port;
  try {
    const created = await api("POST", "/v1/subscriptions", {
      transport: "webhook",
      url: `http://127.0.0.1:${port}/hook`,
      subtree: "lag@example.test",
    });
    expect(created.status).toBe(201);
    const { id } = (await created.json()) as { id: string };

    const page = await loggedIn("subscriptions");
    const row = page.locator(`[data-testid="subscriptions"] tr[data-id="${id}"]`);
    await row.waitFor();
    const lag = async () => Number((await row.locator('[data-field="lag"]').innerText()).replace(/,/g, ""));
    // The server searches: a search that matches nothing empties the table, clearing it
    // brings the row back.
    await page.getByLabel("Search").fill("no-such-subscription");
    await row.waitFor({ state: "detached" });
    await expect.poll(() => page.getByTestId("count").innerText()).toMatch(/^0 match/);
    await page.getByLabel("Search").fill("lag@example");
    await row.waitFor();

    up = false;
    await publish("lag@example.test/inbox", 5);
    // Events it does not follow do not count in its lag.
    await publish("someone-else@example.test/inbox", 3);
    await expect.poll(lag, { timeout: 15_000 }).toBe(5);
    await expect.poll(() => row.locator('[data-field="status"]').innerText(), { timeout: 10_000 }).toBe("retrying");
    await publish("lag@example.test/inbox", 5);
    await expect.poll(lag, { timeout: 15_000 }).toBe(10);

    // Its detail: the lag chart, and the failed attempts with why.
    await row.click();
    await page.getByTestId("detail").locator('[data-chart="Lag (events)"] canvas').waitFor();
    await page.getByTestId("attempts").getByText("503").first().waitFor({ timeout: 10_000 });
    await page.screenshot({ path: `${SHOTS}/console-subscriptions-lagging-1280.png`, fullPage: true });

    up = true;
    await expect.poll(lag, { timeout: 20_000 }).toBe(0);
    await expect.poll(() => row.locator('[data-field="status"]').innerText(), { timeout: 10_000 }).toBe("active");
    expect(got.length).toBeGreaterThan(0);

    // Rotating the secret: confirmed, copied to the clipboard, never on the page.
    await row.locator('[data-action="rotate"]').click();
    await confirm(page);
    await page.getByText(`New secret for ${id} copied to the clipboard.`).waitFor();
    const secret = await page.evaluate(() => navigator.clipboard.readText());
    expect(secret).toMatch(/^whsec_/);
    await expectNowhere(page, secret);

    // A receiver that answers 410 disables it; the operator enables it again (confirming)
    // and it delivers what waited.
    gone = true;
    await publish("lag@example.test/inbox", 1);
    await expect.poll(() => row.locator('[data-field="status"]').innerText(), { timeout: 10_000 }).toBe("disabled");
    gone = false;
    await row.locator('[data-action="enable"]').click();
    await confirm(page);
    await expect.poll(lag, { timeout: 20_000 }).toBe(0);
    await expect.poll(() => row.locator('[data-field="status"]').innerText(), { timeout: 10_000 }).toBe("active");
    await page.close();
  } finally {
    receiver.close();
  }
});

it("takes the server offline and back online, showing the transition's progress", async () => {
  const page = await loggedIn("overview");
  await page.locator('[data-action="go-offline"]').click();
  await confirm(page);
  await page.getByTestId("progress").getByText("done: online → offline").waitFor({ timeout: 15_000 });
  expect(await page.getByTestId("progress").innerText()).toContain("start: online → offline");
  const state = async () => ((await (await api("GET", "/v1/state")).json()) as { state: string }).state;
  expect(await state()).toBe("offline");
  await expect.poll(() => page.getByTestId("state").textContent(), { timeout: 10_000 }).toBe("offline");
  await page.screenshot({ path: `${SHOTS}/console-overview-offline-1280.png`, fullPage: true });

  await page.locator('[data-action="go-online"]').click();
  await confirm(page);
  await page.getByTestId("progress").getByText("done: offline → online").waitFor({ timeout: 15_000 });
  expect(await state()).toBe("online");
  await expect.poll(() => page.getByTestId("state").textContent(), { timeout: 10_000 }).toBe("online");
  await page.close();
});

it("publishes from the form and shows the event in the live tail, and resumes from a watermark", async () => {
  const page = await loggedIn("events");
  await page.getByLabel("Scope").selectOption("subtree");
  await page.getByLabel("Key", { exact: true }).fill("alice@example.test");
  await page.locator('[data-action="tail"]').click();
  await expect.poll(() => page.getByTestId("tail-status").innerText(), { timeout: 10_000 }).toMatch(/^Live/);

  await page.getByLabel("Event key").fill("alice@example.test/inbox/from-the-console");
  await page.getByLabel("Event kind").selectOption("new_mail");
  await page.getByLabel("Other fields (JSON)").fill('{"message_class": "IPM.Note.Console"}');
  await page.locator('[data-action="publish"]').click();
  await expect.poll(() => page.getByTestId("publish-result").innerText(), { timeout: 10_000 }).toMatch(/^Appended at watermark/);
  const watermark = Number((await page.getByTestId("publish-result").innerText()).replace(/\D/g, ""));

  const row = page.locator(`[data-testid="tail"] tr[data-watermark="${watermark}"]`);
  await row.waitFor({ timeout: 10_000 });
  await row.click();
  const json = JSON.parse(await page.getByTestId("event-json").innerText());
  expect(json).toMatchObject({ key: "alice@example.test/inbox/from-the-console", kind: "new_mail", message_class: "IPM.Note.Console", watermark });

  // A bad field is refused with the server's reason, and nothing is appended.
  const head = async () => ((await (await api("GET", "/v1/status")).json()) as { log_last: number }).log_last;
  const before = await head();
  await page.getByLabel("Event kind").selectOption("object_moved");
  await page.getByLabel("Other fields (JSON)").fill("{}");
  await page.locator('[data-action="publish"]').click();
  await expect.poll(() => page.getByTestId("publish-result").innerText(), { timeout: 10_000 }).toMatch(/^Refused/);
  expect(await head()).toBe(before);

  // Resume from just before it: the tail replays it from the log.
  await page.getByLabel("After watermark").fill(String(watermark - 1));
  await page.locator('[data-action="tail"]').click();
  await row.waitFor({ timeout: 10_000 });
  expect(page.url()).toContain(`after=${watermark - 1}`);
  await page.close();
});

it("draws every view at a laptop's and a phone's width (screenshots in test-results/)", async () => {
  await publish("alice@example.test/inbox", 20);
  const sizes: [number, number][] = [
    [1280, 800],
    [390, 844],
  ];
  for (const [width, height] of sizes) {
    const c = width === 1280 ? context : await newContext(width, height);
    const page = await loggedIn("overview", c);
    // A live connection to show, and a sample or two to chart.
    const subscriber = new Client({ servers: [herald.base], token: KEY }).subscriber();
    await subscriber.subscribe({ subtree: "alice@example.test" });
    for (const view of ["overview", "connections", "subscriptions", "events", "charts"]) {
      await page.goto(`${herald.base}/console#${view}${view === "events" ? "?subtree=alice@example.test&after=0" : ""}`);
      await page.locator("main h1").waitFor();
      if (view === "overview" || view === "charts") await page.locator(".chart canvas").first().waitFor();
      if (view === "events") await page.locator('[data-testid="tail"] tr[data-watermark]').first().waitFor();
      if (view === "connections") await page.locator('[data-testid="connections"] tr[data-id]').first().waitFor();
      await page.waitForTimeout(300);
      // Nothing is wider than the screen but the tables, which scroll inside their box.
      const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      expect(overflow, `${view} at ${width}px`).toBeLessThanOrEqual(0);
      await page.screenshot({ path: `${SHOTS}/console-${view}-${width}.png`, fullPage: true });
    }
    subscriber.close();
    await page.close();
    if (c !== context) await c.close();
  }
});
