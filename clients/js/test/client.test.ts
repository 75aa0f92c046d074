// The TypeScript client in Node against a real `herald serve`.
import { afterEach, describe, expect, it } from "vitest";

import {
  Client,
  EVENT_FIELDS,
  EVENT_KINDS,
  HeraldError,
  type Delivered,
  type HeraldEvent,
  type Subscription,
} from "../src/index.js";
import { Herald, Proxy, freePort } from "./server.js";

const servers: Herald[] = [];
afterEach(async () => {
  for (const s of servers.splice(0)) await s.kill();
});

async function start(): Promise<Herald> {
  const h = await Herald.start();
  servers.push(h);
  return h;
}

const quick = (h: Herald) =>
  new Client({ servers: [h.base], backoff: { first: 20, max: 300 } });

/** Event number `seq` on one of eight mailboxes. */
const numbered = (seq: number): HeraldEvent => ({
  key: `mail/box${seq % 8}`,
  kind: "extended",
  extended_event: seq,
});

const seqOf = (e: Delivered): number => {
  if (e.kind !== "extended") throw new Error(`not ours: ${e.kind}`);
  return e.extended_event ?? -1;
};

async function next(s: Subscription): Promise<Delivered> {
  const timeout = new Promise<never>((_, fail) =>
    setTimeout(() => fail(new Error("no event in time")), 15_000),
  );
  const e = await Promise.race([s.next(), timeout]);
  if (e === null) throw new Error("the subscription ended");
  return e;
}

describe("herald-client (TypeScript) against a real server", () => {
  it("rides through a server kill: every event once, in order, publisher and subscriber", async () => {
    const BATCHES = 200;
    const PER = 5;
    const TOTAL = BATCHES * PER;
    const server = await start();
    const client = quick(server);
    const subscriber = client.subscriber();
    const all = await subscriber.subscribe({ subtree: "mail", after: 0 });
    const publisher = client.publisher();
    const producing = (async () => {
      const answers: Promise<{ watermarks: number[] }>[] = [];
      for (let b = 0; b < BATCHES; b++) {
        const events = Array.from({ length: PER }, (_, i) => numbered(b * PER + i));
        answers.push((await publisher.send(events)).answer);
        await new Promise((r) => setTimeout(r, 2));
      }
      return (await Promise.all(answers)).flatMap((a) => a.watermarks);
    })();
    const seen: number[] = [];
    let last = 0;
    while (seen.length < TOTAL) {
      const e = await next(all);
      expect(e.watermark).toBeGreaterThan(last);
      last = e.watermark;
      seen.push(seqOf(e));
      if (seen.length === 300) {
        await server.kill();
        await server.spawn();
      }
    }
    expect(seen).toEqual(Array.from({ length: TOTAL }, (_, i) => i));
    const watermarks = await producing;
    expect(watermarks.length).toBe(TOTAL);
    expect(watermarks.every((w, i) => i === 0 || w > watermarks[i - 1]!)).toBe(true);
    subscriber.close();
    await publisher.close();
  });

  it("aborts the batches behind a refused one and starts again with the next", async () => {
    const server = await start();
    const client = quick(server);
    const publisher = client.publisher();
    const first = await publisher.send([numbered(1)]);
    const bad = await publisher.send([{ key: "mail/box1", kind: "no_such_kind" } as unknown as HeraldEvent]);
    const behind = await publisher.send([numbered(3)]);
    expect((await first.answer).watermarks).toEqual([1]);
    await expect(bad.answer).rejects.toMatchObject({ kind: "refused", code: "invalid_field" });
    await expect(behind.answer).rejects.toMatchObject({ kind: "aborted" });
    expect((await publisher.publish([numbered(4)])).watermarks).toEqual([2]);
    const subscriber = client.subscriber();
    const s = await subscriber.subscribe({ subtree: "mail", after: 0 });
    expect(seqOf(await next(s))).toBe(1);
    expect(seqOf(await next(s))).toBe(4);
    subscriber.close();
    await publisher.close();
  });

  it("resumes a durable subscription after its acknowledgement in a new client", async () => {
    const server = await start();
    const created = (await (
      await fetch(`${server.base}/v1/subscriptions`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ subtree: "mail", transport: "poll", after: 0 }),
      })
    ).json()) as { id: string };
    const client = quick(server);
    for (let seq = 1; seq <= 10; seq++) await client.publish([numbered(seq)]);
    const first = client.subscriber();
    const s = await first.subscribe({ subscription: created.id });
    for (let seq = 1; seq <= 10; seq++) {
      const e = await next(s);
      expect(seqOf(e)).toBe(seq);
      if (seq === 6) s.ack(e.watermark);
    }
    for (let i = 0; ; i++) {
      const view = (await (await fetch(`${server.base}/v1/subscriptions/${created.id}`)).json()) as {
        acked: number;
      };
      if (view.acked === 6) break;
      if (i > 500) throw new Error("the ack was not stored");
      await new Promise((r) => setTimeout(r, 20));
    }
    first.close();
    const again = quick(server).subscriber();
    const t = await again.subscribe({ subscription: created.id });
    expect(t.startedAfter).toBe(6);
    expect(seqOf(await next(t))).toBe(7);
    again.close();
  });

  it("ends positions the log cannot serve with typed errors", async () => {
    const server = await start();
    const client = quick(server);
    await client.publish([numbered(1)]);
    const subscriber = client.subscriber();
    await expect(subscriber.subscribe({ key: "mail/box1", after: 1000 })).rejects.toMatchObject({
      kind: "reset",
    });
    await expect(subscriber.subscribe({ subscription: "no-such" })).rejects.toMatchObject({
      kind: "refused",
      code: "subscription_not_found",
    });
    const gone = new Client({
      servers: [`http://127.0.0.1:${await freePort()}`],
      backoff: { first: 10, max: 50 },
      giveUpAfter: 300,
    });
    const e = await gone
      .subscriber()
      .subscribe({ key: "a" })
      .catch((x: unknown) => x);
    expect(e).toBeInstanceOf(HeraldError);
    expect((e as HeraldError).kind).toBe("unreachable");
    subscriber.close();
  });

  it("keeps its event types in step with the server's /openapi.json", async () => {
    const server = await start();
    const doc = (await (await fetch(`${server.base}/openapi.json`)).json()) as {
      components: { schemas: Record<string, { properties: Record<string, unknown> }> };
    };
    const fields = Object.keys(doc.components.schemas.EventJson!.properties).sort();
    expect([...EVENT_FIELDS].sort()).toEqual(fields);
    // The kinds a producer may send are the ones the server lists when refusing another.
    const r = await fetch(`${server.base}/v1/events`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ events: [{ key: "a/b", kind: "nope" }] }),
    });
    const body = (await r.json()) as { error: { message: string } };
    const listed = /one of (.*)$/.exec(body.error.message)![1]!.split(", ").sort();
    expect(EVENT_KINDS.filter((k) => k !== "connection_state").sort()).toEqual(listed);
  });

  it("sends again the batches whose answers were lost, and they are appended once", async () => {
    const server = await start();
    const proxy = await Proxy.start(server.port);
    const viaProxy = new Client({
      servers: [`http://127.0.0.1:${proxy.port}`],
      backoff: { first: 20, max: 200 },
    });
    const watcher = quick(server).subscriber();
    const log = await watcher.subscribe({ subtree: "mail", after: 0 });
    const publisher = viaProxy.publisher();
    expect((await publisher.publish([numbered(0)])).watermarks).toEqual([1]);
    expect(seqOf(await next(log))).toBe(0);
    // The server appends ten more, but its answers never reach the publisher.
    proxy.dropReplies();
    const pending = [];
    for (let seq = 1; seq <= 10; seq++) pending.push(await publisher.send([numbered(seq)]));
    for (let seq = 1; seq <= 10; seq++) expect(seqOf(await next(log))).toBe(seq);
    proxy.cut();
    for (const [i, p] of pending.entries()) {
      const a = await p.answer;
      expect(a.watermarks).toEqual([i + 2]);
      expect(a.replayed).toBe(true);
    }
    expect((await publisher.publish([numbered(11)])).watermarks).toEqual([12]);
    expect(seqOf(await next(log))).toBe(11);
    await publisher.close();
    watcher.close();
    proxy.close();
  });
});
