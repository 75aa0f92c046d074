// A client for Herald, for browsers and Node (20.10+ with --experimental-websocket, or 22+).
// No runtime dependency beyond the platform's WebSocket and fetch.
//
// - Publisher: ordered pipelined publishing over one WebSocket. Batches are appended in the
//   order they were sent and answered in that order; each carries an idempotency key, so the
//   unanswered ones are sent again after a lost connection and appended once.
// - Subscriber: any number of subscriptions over one WebSocket. Each resumes after the last
//   watermark it handed to the application when the connection is lost, the server restarts
//   or another node takes over: every event once, in order. Durable subscriptions take acks.
//
// The semantics are those of the Rust crate `herald-client` (docs/design/client.md).

/** Every event kind; `connection_state` events come from the server only. */
export const EVENT_KINDS = [
  "new_mail",
  "object_created",
  "object_deleted",
  "object_modified",
  "object_moved",
  "object_copied",
  "search_complete",
  "table_modified",
  "status_object_modified",
  "extended",
  "critical_error",
  "connection_state",
] as const;

/** An event kind. */
export type EventKind = (typeof EVENT_KINDS)[number];

/** Every field an event may carry (the server's `EventJson` schema). */
export const EVENT_FIELDS = [
  "key",
  "kind",
  "watermark",
  "timestamp",
  "object_type",
  "parent",
  "old_key",
  "old_parent",
  "changed_props",
  "total_count",
  "unread_count",
  "message_class",
  "message_flags",
  "table",
  "props",
  "error",
  "extended_event",
  "data",
  "connection_state",
] as const;

/** A property value: MAPI tag and a value whose JSON type follows the tag's type. */
export interface PropJson {
  tag: number;
  value: unknown;
}

/** A table event's details. */
export interface TableJson {
  event:
    | "changed"
    | "error"
    | "row_added"
    | "row_deleted"
    | "row_modified"
    | "sort_done"
    | "restrict_done"
    | "setcol_done"
    | "reload";
  hresult?: number;
  index?: PropJson;
  prior?: PropJson;
  row?: PropJson[];
}

/** A critical error's details. */
export interface ErrorJson {
  scode?: number;
  message?: string;
  component?: string;
  low_level_error?: number;
  context?: number;
}

/** A connection-state change (server-made). */
export interface ConnectionStateJson {
  phase: "start" | "change" | "done";
  client_token: number;
  changed_mask: number;
  old_state: number;
  new_state: number;
}

/** What every event has. */
interface Base {
  /** The object's key in path form, e.g. `alice@example.test/inbox/msg-1`. */
  key: string;
  /** The log position; set by the server on delivery. */
  watermark?: number;
  /** Microseconds since the Unix epoch. */
  timestamp?: number;
}

/** Fields of object events. */
interface ObjectFields {
  object_type?: string;
  parent?: string;
  changed_props?: number[];
  total_count?: number;
  unread_count?: number;
}

export interface NewMailEvent extends Base {
  kind: "new_mail";
  parent?: string;
  message_class?: string;
  message_flags?: number;
  object_type?: "message";
}
export interface ObjectEvent extends Base, ObjectFields {
  kind: "object_created" | "object_deleted" | "object_modified" | "search_complete";
}
export interface RelocationEvent extends Base, ObjectFields {
  kind: "object_moved" | "object_copied";
  old_key: string;
  old_parent?: string;
}
export interface TableEvent extends Base {
  kind: "table_modified";
  table: TableJson;
}
export interface StatusObjectEvent extends Base {
  kind: "status_object_modified";
  props: PropJson[];
}
export interface CriticalErrorEvent extends Base {
  kind: "critical_error";
  error: ErrorJson;
}
export interface ExtendedEvent extends Base {
  kind: "extended";
  extended_event?: number;
  /** Base64. */
  data?: string;
}
export interface ConnectionStateEvent extends Base {
  kind: "connection_state";
  connection_state: ConnectionStateJson;
}

/** An event, typed by its kind. */
export type HeraldEvent =
  | NewMailEvent
  | ObjectEvent
  | RelocationEvent
  | TableEvent
  | StatusObjectEvent
  | CriticalErrorEvent
  | ExtendedEvent
  | ConnectionStateEvent;

/** A delivered event: its watermark is always set. */
export type Delivered = HeraldEvent & { watermark: number };

/** Why something failed, typed so the application can tell what to do next. */
export type ErrorKind =
  | "refused"
  | "aborted"
  | "expired"
  | "reset"
  | "ended"
  | "unreachable"
  | "closed"
  | "protocol";

/** An error of the client. */
export class HeraldError extends Error {
  readonly kind: ErrorKind;
  /** The server's code, when it gave one (`invalid_field`, `subscription_not_found`, …). */
  readonly code?: string;
  /** For `expired`: the oldest watermark the log holds. */
  readonly oldestAvailable?: number;

  constructor(kind: ErrorKind, message: string, code?: string, oldestAvailable?: number) {
    super(message);
    this.name = "HeraldError";
    this.kind = kind;
    this.code = code;
    this.oldestAvailable = oldestAvailable;
  }
}

/** A batch's answer once durable. */
export interface Published {
  watermarks: number[];
  /** A retry of a batch the server had already appended. */
  replayed: boolean;
}

/** A sent batch: its answer, to await when convenient. */
export interface Pending {
  readonly answer: Promise<Published>;
}

/** Reconnect schedule: `first` ms, doubling up to `max` ms. */
export interface Backoff {
  first: number;
  max: number;
}

/** How to reach the servers. */
export interface ClientOptions {
  /** Base URLs (`http://…` or `https://…`), tried in turn: the nodes of a cluster. */
  servers: string[];
  /** API key or subscriber token. */
  token?: string;
  backoff?: Backoff;
  /** Give up after this many ms without reaching a server (default 300000); null: never. */
  giveUpAfter?: number | null;
  /** Publish batches in flight at most (default 64). */
  window?: number;
  /** Events buffered per subscription (default 10000). Beyond it the subscription stops
   * taking events and, once the application has read half of them, subscribes again after
   * the last one it took: the server's log holds the rest, nothing is dropped. */
  maxBuffered?: number;
  /** The WebSocket constructor (default: the platform's). */
  WebSocket?: typeof WebSocket;
}

interface Settings {
  servers: string[];
  token?: string;
  backoff: Backoff;
  giveUpAfter: number | null;
  window: number;
  maxBuffered: number;
  WebSocket: typeof WebSocket;
}

/** The wait before retry `n` (0: the first). */
export function backoffDelay(b: Backoff, n: number): number {
  return Math.min(b.max, b.first * 2 ** Math.min(n, 30));
}

/** The WebSocket URL of a base URL, with the token as `access_token` (browsers cannot set
 * headers on a WebSocket). */
export function wsUrl(server: string, token?: string): string {
  const m = /^(https?):\/\/(.*)$/.exec(server);
  if (!m) throw new HeraldError("protocol", `${server} is not an http(s) URL`);
  const base = `${m[1] === "https" ? "wss" : "ws"}://${m[2]}/v1/ws`;
  return token ? `${base}?access_token=${encodeURIComponent(token)}` : base;
}

function randomId(): string {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Successive connection attempts: which server, how long to wait, when to give up. */
class Attempts {
  private failures = 0;
  private readonly since = Date.now();
  constructor(
    private readonly s: Settings,
    public server: number,
  ) {}

  async failed(why: string): Promise<void> {
    const waited = Date.now() - this.since;
    if (this.s.giveUpAfter !== null && waited >= this.s.giveUpAfter) {
      throw new HeraldError("unreachable", `no server reached in ${waited} ms; last: ${why}`);
    }
    await sleep(backoffDelay(this.s.backoff, this.failures));
    this.failures += 1;
    this.server = (this.server + 1) % this.s.servers.length;
  }

  /** Opens a WebSocket to the first server that answers. */
  async connect(): Promise<{ index: number; ws: WebSocket }> {
    for (;;) {
      const index = this.server;
      const url = wsUrl(this.s.servers[index]!, this.s.token);
      try {
        const ws = await open(this.s.WebSocket, url);
        return { index, ws };
      } catch (e) {
        await this.failed(String(e));
      }
    }
  }
}

function open(Ws: typeof WebSocket, url: string): Promise<WebSocket> {
  return new Promise((resolve, reject) => {
    const ws = new Ws(url);
    const timer = setTimeout(() => {
      ws.close();
      reject(new Error("connect timed out"));
    }, 10_000);
    ws.onopen = () => {
      clearTimeout(timer);
      resolve(ws);
    };
    ws.onerror = () => {
      clearTimeout(timer);
      reject(new Error(`cannot connect to ${url.replace(/access_token=[^&]*/, "access_token=…")}`));
    };
  });
}

/** A server frame (`type`-tagged). */
type ServerFrame =
  | { type: "subscribed"; id: string; after: number }
  | { type: "event"; id: string; event: Delivered }
  | { type: "published"; id: string; watermarks: number[]; replayed: boolean }
  | { type: "unsubscribed"; id: string }
  | { type: "acked"; id: string; watermark: number }
  | { type: "expired"; id: string; oldest_available: number }
  | { type: "error"; id?: string; code: string; message: string }
  | { type: "shutdown" };

/** Where the servers are; makes publishers and subscribers. */
export class Client {
  private readonly s: Settings;

  constructor(options: ClientOptions | string) {
    const o: ClientOptions = typeof options === "string" ? { servers: [options] } : options;
    if (o.servers.length === 0) throw new HeraldError("protocol", "no server given");
    const Ws = o.WebSocket ?? globalThis.WebSocket;
    if (!Ws) {
      throw new HeraldError(
        "protocol",
        "no WebSocket: run Node with --experimental-websocket (20.10+) or pass options.WebSocket",
      );
    }
    this.s = {
      servers: o.servers.map((s) => s.replace(/\/+$/, "")),
      token: o.token,
      backoff: o.backoff ?? { first: 100, max: 5000 },
      giveUpAfter: o.giveUpAfter === undefined ? 300_000 : o.giveUpAfter,
      window: Math.max(1, o.window ?? 64),
      maxBuffered: Math.max(2, o.maxBuffered ?? 10_000),
      WebSocket: Ws,
    };
    for (const s of this.s.servers) wsUrl(s);
  }

  /** An ordered pipelined publisher. */
  publisher(): Publisher {
    return new Publisher(this.s);
  }

  /** A subscriber: one WebSocket carrying any number of subscriptions. */
  subscriber(): Subscriber {
    return new Subscriber(this.s);
  }

  /** Publishes one batch with `POST /v1/events`, retried with one idempotency key while no
   * server answers (or one answers 503), so it is appended once. */
  async publish(events: HeraldEvent[]): Promise<Published> {
    const key = randomId();
    const attempts = new Attempts(this.s, 0);
    for (;;) {
      const server = this.s.servers[attempts.server]!;
      let why: string;
      try {
        const headers: Record<string, string> = {
          "content-type": "application/json",
          "idempotency-key": key,
        };
        if (this.s.token) headers.authorization = `Bearer ${this.s.token}`;
        const r = await fetch(`${server}/v1/events`, {
          method: "POST",
          headers,
          body: JSON.stringify({ events }),
        });
        if (r.ok) return (await r.json()) as Published;
        if (r.status !== 503) {
          const body = (await r.json().catch(() => ({}))) as {
            error?: { code?: string; message?: string };
          };
          throw new HeraldError(
            "refused",
            body.error?.message ?? `HTTP ${r.status}`,
            body.error?.code ?? `http_${r.status}`,
          );
        }
        why = `${server} answered 503`;
      } catch (e) {
        if (e instanceof HeraldError) throw e;
        why = String(e);
      }
      await attempts.failed(why);
    }
  }
}

interface InFlight {
  id: number;
  key: string;
  events: HeraldEvent[];
  resolve: (p: Published) => void;
  reject: (e: HeraldError) => void;
  /** Sent behind a failed batch, before the restart: the server aborts it. */
  doomed: boolean;
}

/** Ordered pipelined publishing; see the top of this file. */
export class Publisher {
  private readonly prefix = randomId();
  private next = 0;
  private readonly queue: InFlight[] = [];
  private readonly waiting: (() => void)[] = [];
  private ws: WebSocket | null = null;
  private connecting = false;
  private restartNext = false;
  private server = 0;
  private closed = false;

  constructor(private readonly s: Settings) {}

  /** Sends a batch after every batch sent before it; waits only while the window is full.
   * Resolves, once sent, to the batch's pending answer. */
  async send(events: HeraldEvent[], idempotencyKey?: string): Promise<Pending> {
    if (this.closed) throw new HeraldError("closed", "the publisher is closed");
    while (this.queue.length >= this.s.window) {
      await new Promise<void>((r) => this.waiting.push(r));
    }
    this.next += 1;
    const id = this.next;
    let entry!: InFlight;
    const answer = new Promise<Published>((resolve, reject) => {
      entry = {
        id,
        key: idempotencyKey ?? `${this.prefix}-${id}`,
        events,
        resolve,
        reject,
        doomed: false,
      };
    });
    // A failure nobody awaits must not crash the process as an unhandled rejection.
    answer.catch(() => undefined);
    this.queue.push(entry);
    if (this.ws) this.sendFrame(this.ws, entry);
    else void this.connect();
    return { answer };
  }

  /** Sends a batch and waits for its answer. */
  async publish(events: HeraldEvent[], idempotencyKey?: string): Promise<Published> {
    return await (await this.send(events, idempotencyKey)).answer;
  }

  /** Waits for every answer, then closes the connection. */
  async close(): Promise<void> {
    this.closed = true;
    while (this.queue.length > 0) await new Promise<void>((r) => this.waiting.push(r));
    this.ws?.close();
    this.ws = null;
  }

  private sendFrame(ws: WebSocket, b: InFlight): void {
    const restart = this.restartNext;
    this.restartNext = false;
    ws.send(
      JSON.stringify({
        op: "publish",
        id: String(b.id),
        events: b.events,
        idempotency_key: b.key,
        restart,
      }),
    );
  }

  private settle(b: InFlight, answer: Published | HeraldError): void {
    if (answer instanceof HeraldError) b.reject(answer);
    else b.resolve(answer);
    this.waiting.splice(0).forEach((w) => w());
  }

  private async connect(): Promise<void> {
    if (this.connecting || this.ws) return;
    this.connecting = true;
    try {
      const { index, ws } = await new Attempts(this.s, this.server).connect();
      this.server = index;
      this.restartNext = false;
      // A new connection is a new sequence: what was doomed is answered now, the rest is
      // sent again, in order, with its idempotency key.
      for (const b of this.queue.splice(0)) {
        if (b.doomed) {
          this.settle(b, new HeraldError("aborted", "an earlier batch failed before the connection was lost", "aborted"));
        } else {
          this.queue.push(b);
        }
      }
      ws.onmessage = (m) => this.onFrame(JSON.parse(String(m.data)) as ServerFrame);
      ws.onclose = () => {
        if (this.ws !== ws) return;
        this.ws = null;
        if (this.queue.length > 0) void this.connect();
      };
      this.ws = ws;
      for (const b of this.queue) this.sendFrame(ws, b);
    } catch (e) {
      const err = e instanceof HeraldError ? e : new HeraldError("unreachable", String(e));
      for (const b of this.queue.splice(0)) this.settle(b, err);
    } finally {
      this.connecting = false;
    }
  }

  private onFrame(f: ServerFrame): void {
    let answer: Published | HeraldError;
    let id: string;
    if (f.type === "published") {
      id = f.id;
      answer = { watermarks: f.watermarks, replayed: f.replayed };
    } else if (f.type === "error" && f.id !== undefined) {
      id = f.id;
      if (f.code === "aborted") {
        answer = new HeraldError("aborted", f.message, f.code);
      } else {
        for (const b of this.queue) b.doomed = true;
        this.restartNext = true;
        answer = new HeraldError("refused", f.message, f.code);
      }
    } else {
      if (f.type === "shutdown") this.ws?.close();
      return;
    }
    const i = this.queue.findIndex((b) => String(b.id) === id);
    if (i < 0) return;
    for (const skipped of this.queue.splice(0, i)) {
      this.settle(skipped, new HeraldError("protocol", `batch ${id} answered before ${skipped.id}`));
    }
    this.settle(this.queue.shift()!, answer);
  }
}

/** What to subscribe to, and from where. */
export interface SubscribeSpec {
  key?: string;
  subtree?: string;
  children?: string;
  /** A durable subscription's id. */
  subscription?: string;
  /** Comma-separated kinds. */
  kinds?: string;
  /** Start after this watermark. */
  after?: number;
}

interface SubState {
  spec: SubscribeSpec;
  last?: number;
  acked?: number;
  ackConfirmed?: number;
  confirm?: { resolve: (after: number) => void; reject: (e: HeraldError) => void };
  sub: Subscription;
  /** The buffer filled: events are not taken until the application catches up. */
  behind: boolean;
}

/** Subscriptions over one WebSocket; see the top of this file. */
export class Subscriber {
  private readonly subs = new Map<string, SubState>();
  private ws: WebSocket | null = null;
  private connecting = false;
  private server = 0;
  private nextId = 0;

  constructor(private readonly s: Settings) {}

  /** Subscribes; resolves once the server confirmed it. */
  async subscribe(spec: SubscribeSpec): Promise<Subscription> {
    this.nextId += 1;
    const id = `s${this.nextId}`;
    const sub = new Subscription(id, this);
    const confirmed = new Promise<number>((resolve, reject) => {
      this.subs.set(id, { spec, sub, confirm: { resolve, reject }, behind: false });
    });
    if (this.ws) this.sendSubscribe(this.ws, id);
    else void this.connect();
    sub.startedAfter = await confirmed;
    return sub;
  }

  /** Closes every subscription and the connection. */
  close(): void {
    for (const [, st] of this.subs) st.sub.end(new HeraldError("closed", "the subscriber is closed"));
    this.subs.clear();
    const ws = this.ws;
    this.ws = null;
    ws?.close();
  }

  /** @internal */
  unsubscribe(id: string): void {
    if (this.subs.delete(id)) this.send({ op: "unsubscribe", id });
    if (this.subs.size === 0) {
      const ws = this.ws;
      this.ws = null;
      ws?.close();
    }
  }

  /** @internal The application read enough of a subscription that fell behind: subscribe
   * again (under a new id, so that what the old one still sends is ignored) after the last
   * event it took. */
  catchUp(id: string): void {
    const st = this.subs.get(id);
    if (!st || !st.behind) return;
    this.subs.delete(id);
    this.send({ op: "unsubscribe", id });
    this.nextId += 1;
    const fresh = `s${this.nextId}`;
    st.behind = false;
    st.sub.id = fresh;
    this.subs.set(fresh, st);
    if (this.ws && this.ws.readyState === 1) this.sendSubscribe(this.ws, fresh);
  }

  /** @internal */
  ack(id: string, watermark: number): void {
    const st = this.subs.get(id);
    if (!st) return;
    st.acked = Math.max(st.acked ?? 0, watermark);
    this.send({ op: "ack", id, watermark });
  }

  private send(frame: object): void {
    if (this.ws && this.ws.readyState === 1) this.ws.send(JSON.stringify(frame));
  }

  private sendSubscribe(ws: WebSocket, id: string): void {
    const st = this.subs.get(id)!;
    const after = st.last ?? st.spec.after;
    ws.send(JSON.stringify({ op: "subscribe", id, ...st.spec, after }));
    if (st.acked !== undefined && st.acked > (st.ackConfirmed ?? 0)) {
      ws.send(JSON.stringify({ op: "ack", id, watermark: st.acked }));
    }
  }

  private async connect(): Promise<void> {
    if (this.connecting || this.ws || this.subs.size === 0) return;
    this.connecting = true;
    try {
      const { index, ws } = await new Attempts(this.s, this.server).connect();
      this.server = index;
      if (this.subs.size === 0) {
        ws.close();
        return;
      }
      ws.onmessage = (m) => this.onFrame(JSON.parse(String(m.data)) as ServerFrame);
      ws.onclose = () => {
        if (this.ws !== ws) return;
        this.ws = null;
        void this.connect();
      };
      this.ws = ws;
      for (const id of this.subs.keys()) this.sendSubscribe(ws, id);
    } catch (e) {
      const err = e instanceof HeraldError ? e : new HeraldError("unreachable", String(e));
      for (const [id] of this.subs) this.end(id, err);
    } finally {
      this.connecting = false;
    }
  }

  private end(id: string, e: HeraldError): void {
    const st = this.subs.get(id);
    if (!st) return;
    this.subs.delete(id);
    if (st.confirm) st.confirm.reject(e);
    else st.sub.end(e);
  }

  private onFrame(f: ServerFrame): void {
    switch (f.type) {
      case "subscribed": {
        const st = this.subs.get(f.id);
        st?.confirm?.resolve(f.after);
        if (st) st.confirm = undefined;
        break;
      }
      case "event": {
        const st = this.subs.get(f.id);
        if (!st || st.behind) break;
        const w = f.event.watermark;
        if (st.last !== undefined && w <= st.last) break; // sent again after a resume
        if (st.sub.buffered() >= this.s.maxBuffered) {
          st.behind = true;
          st.sub.onDrained(this.s.maxBuffered / 2, () => this.catchUp(st.sub.id));
          break;
        }
        st.last = w;
        st.sub.push(f.event);
        break;
      }
      case "expired":
        this.end(f.id, new HeraldError("expired", `older than the log holds (oldest available: ${f.oldest_available})`, "watermark_expired", f.oldest_available));
        break;
      case "acked": {
        const st = this.subs.get(f.id);
        if (st) st.ackConfirmed = Math.max(st.ackConfirmed ?? 0, f.watermark);
        break;
      }
      case "error": {
        if (f.id === undefined || f.code === "ack_failed" || f.code === "unknown_id") break;
        const st = this.subs.get(f.id);
        const kind: ErrorKind =
          f.code === "invalid_position" ? "reset" : st?.confirm ? "refused" : "ended";
        this.end(f.id, new HeraldError(kind, f.message, f.code));
        break;
      }
      case "unsubscribed":
        this.end(f.id, new HeraldError("ended", "the server removed the subscription", "unsubscribed"));
        break;
      case "shutdown":
        this.ws?.close();
        break;
      default:
        break;
    }
  }
}

/** A live subscription: its events in order, as an async iterator. */
export class Subscription implements AsyncIterable<Delivered> {
  /** The watermark it started after, as the server confirmed it. */
  startedAfter = 0;
  private readonly buffer: Delivered[] = [];
  private failure: HeraldError | null = null;
  private done = false;
  private wake: (() => void) | null = null;
  private drained: { below: number; then: () => void } | null = null;

  /** @internal */
  constructor(
    public id: string,
    private readonly owner: Subscriber,
  ) {}

  /** @internal */
  push(e: Delivered): void {
    this.buffer.push(e);
    this.wake?.();
  }

  /** @internal */
  buffered(): number {
    return this.buffer.length;
  }

  /** @internal Calls `then` once fewer than `below` events are buffered. */
  onDrained(below: number, then: () => void): void {
    this.drained = { below, then };
  }

  /** @internal */
  end(e: HeraldError): void {
    this.failure = e;
    this.wake?.();
  }

  /** The next event; throws the error that ended the subscription; `null` once closed. */
  async next(): Promise<Delivered | null> {
    for (;;) {
      const e = this.buffer.shift();
      if (this.drained && this.buffer.length < this.drained.below) {
        const d = this.drained;
        this.drained = null;
        d.then();
      }
      if (e) return e;
      if (this.failure) {
        const f = this.failure;
        this.failure = null;
        this.done = true;
        throw f;
      }
      if (this.done) return null;
      await new Promise<void>((r) => (this.wake = r));
      this.wake = null;
    }
  }

  /** Acknowledges everything up to `watermark` (stored for a durable subscription). */
  ack(watermark: number): void {
    this.owner.ack(this.id, watermark);
  }

  /** Unsubscribes. */
  close(): void {
    this.done = true;
    this.owner.unsubscribe(this.id);
    this.wake?.();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<Delivered> {
    for (;;) {
      const e = await this.next();
      if (e === null) return;
      yield e;
    }
  }
}
