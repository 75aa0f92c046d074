// The public HTTP API, as the console reads it: the same endpoints `/openapi.json` documents,
// with the operator's API key in `Authorization` (kept in sessionStorage, never shown).

/** `GET /v1/stats`'s sample of one interval. */
export interface Sample {
  at: number;
  events_in_per_second: number;
  deliveries_per_second: number;
  latency_p50_ms?: number;
  latency_p99_ms?: number;
  connections: Record<string, number>;
  log_last: number;
}

/** `GET /v1/stats`. */
export interface Stats {
  version: string;
  uptime_seconds: number;
  state: string;
  node?: string | null;
  log_first: number;
  log_last: number;
  log_bytes?: number;
  durable_subscriptions: number;
  connections: Record<string, number>;
  samples: Sample[];
}

/** `GET /v1/connections`'s rows. */
export interface Connection {
  id: string;
  owner: string;
  transport: string;
  target: string;
  state: string;
  presence_key: string;
  opened_at: number;
  state_since: number;
  idle_ms: number;
  lease: string;
  lease_left_ms?: number;
}

/** A webhook's delivery state. */
export interface DeliveryState {
  status: string;
  last_success_at?: number | null;
  last_error?: string | null;
  attempts: number;
  next_attempt_at?: number | null;
  failing_since?: number | null;
}

/** `GET /v1/subscriptions`'s rows. */
export interface Subscription {
  id: string;
  filter: { key?: string; subtree?: string; children?: string; kinds?: string };
  transport: string;
  created_at: number;
  acked: number;
  latest: number;
  head: number;
  pending: boolean;
  lag: number;
  lag_seconds: number;
  owner?: string;
  url?: string;
  state?: string;
  reason?: string;
  delivery?: DeliveryState;
  secret?: string;
}

/** `GET /v1/subscriptions/{id}/deliveries`'s rows. */
export interface DeliveryAttempt {
  at: number;
  duration_ms: number;
  outcome: string;
  error?: string | null;
}

/** `GET /v1/state`. */
export interface ServerState {
  state: string;
  transitioning: boolean;
  capabilities: number;
  advised: number;
}

/** An answer other than 2xx, with the server's error code and message. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

/** One Server-Sent Event. */
export interface SseEvent {
  event: string;
  data: string;
}

const KEY = "herald.console.key";

/** How long a request may take before the page counts the server as not answering. */
const TIMEOUT_MS = 10_000;

/** The API of the server that served the page. */
export class Api {
  readonly base = location.origin;
  token: string | null = sessionStorage.getItem(KEY);

  /** Keeps `token` for this tab (not across tabs or restarts of the browser). */
  remember(token: string | null): void {
    this.token = token;
    if (token) sessionStorage.setItem(KEY, token);
    else sessionStorage.removeItem(KEY);
  }

  private headers(json: boolean): Record<string, string> {
    const h: Record<string, string> = {};
    if (this.token) h.authorization = `Bearer ${this.token}`;
    if (json) h["content-type"] = "application/json";
    return h;
  }

  /** `GET path` as JSON. */
  async get<T>(path: string, signal?: AbortSignal): Promise<T> {
    return (await this.send("GET", path, undefined, signal)) as T;
  }

  /** A listing (`GET /v1/connections`, `/v1/subscriptions`): the items and how many matched
   * (`x-total-count`; the server cuts the list at `limit`). */
  async list<T>(path: string): Promise<{ items: T[]; total: number }> {
    const { json, headers } = await this.request("GET", path);
    const items = json as T[];
    return { items, total: Number(headers.get("x-total-count") ?? items.length) };
  }

  /** `method path` with an optional JSON body; the answer's JSON, or null when empty. */
  async send(method: string, path: string, body?: unknown, signal?: AbortSignal): Promise<unknown> {
    return (await this.request(method, path, body, signal)).json;
  }

  /** One request, timed out after TIMEOUT_MS unless `signal` says otherwise; an answer other
   * than 2xx is thrown as an ApiError. */
  private async request(
    method: string,
    path: string,
    body?: unknown,
    signal?: AbortSignal,
  ): Promise<{ json: unknown; headers: Headers }> {
    const r = await fetch(this.base + path, {
      method,
      headers: this.headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: signal ?? AbortSignal.timeout(TIMEOUT_MS),
    });
    const text = await r.text();
    if (!r.ok) throw errorOf(r.status, text);
    return { json: text ? JSON.parse(text) : null, headers: r.headers };
  }

  /** A Server-Sent Events stream read with fetch (so the key goes in a header). */
  async *sse(path: string, signal: AbortSignal): AsyncGenerator<SseEvent> {
    const r = await fetch(this.base + path, { headers: this.headers(false), signal });
    if (!r.ok || !r.body) throw errorOf(r.status, await r.text());
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value;
      let end: number;
      while ((end = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, end);
        buf = buf.slice(end + 2);
        let event = "message";
        const data: string[] = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
        }
        if (data.length) yield { event, data: data.join("\n") };
      }
    }
  }
}

function errorOf(status: number, text: string): ApiError {
  try {
    const e = JSON.parse(text).error;
    if (e?.message) return new ApiError(status, e.code ?? "", e.field ? `${e.field}: ${e.message}` : e.message);
  } catch {
    // not JSON
  }
  return new ApiError(status, "", text || `HTTP ${status}`);
}
