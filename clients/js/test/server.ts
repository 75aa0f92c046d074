// A real `herald serve` on a free loopback port, for the tests.
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { connect, createServer, type Server as NetServer, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";

/** The herald binary: $HERALD_BIN, else the workspace's debug build. */
export const heraldBin =
  process.env.HERALD_BIN ?? resolve(import.meta.dirname, "../../../target/debug/herald");

export async function freePort(): Promise<number> {
  return await new Promise((ok, fail) => {
    const s = createServer();
    s.once("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const a = s.address();
      s.close(() => ok(typeof a === "object" && a ? a.port : 0));
    });
  });
}

export class Herald {
  child: ChildProcess | null = null;
  readonly dataDir = join(mkdtempSync(join(tmpdir(), "herald-js-")), "data");
  constructor(
    readonly port: number,
    /** More environment for the server (configuration overrides, `HERALD_…`). */
    readonly env: Record<string, string> = {},
  ) {}

  get base(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  static async start(env: Record<string, string> = {}): Promise<Herald> {
    const h = new Herald(await freePort(), env);
    await h.spawn();
    return h;
  }

  async spawn(): Promise<void> {
    this.child = spawn(
      heraldBin,
      ["serve", "--listen", `127.0.0.1:${this.port}`, "--data-dir", this.dataDir],
      {
        env: { ...process.env, HERALD_LOG: "warn", HERALD_CONNECTIONS__PRESENCE: "false", ...this.env },
        stdio: "ignore",
      },
    );
    this.child.once("error", (e) => {
      throw new Error(`cannot run ${heraldBin}: ${e.message} (build it: cargo build -p herald-server)`);
    });
    const deadline = Date.now() + 30_000;
    for (;;) {
      try {
        const r = await fetch(`${this.base}/readyz`);
        if (r.ok) return;
      } catch {
        // not up yet
      }
      if (Date.now() > deadline) throw new Error("herald did not become ready");
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  /** SIGKILL: no goodbye, no flush. */
  async kill(): Promise<void> {
    const c = this.child;
    this.child = null;
    if (!c || c.exitCode !== null) return;
    const exited = new Promise((r) => c.once("exit", r));
    c.kill("SIGKILL");
    await exited;
  }
}

/** A TCP proxy a test controls: it can drop the target's replies, and cut every connection. */
export class Proxy {
  private readonly sockets = new Set<Socket>();
  private dropping = false;
  private constructor(
    private readonly server: NetServer,
    readonly port: number,
  ) {}

  static async start(targetPort: number): Promise<Proxy> {
    let proxy!: Proxy;
    const server = createServer((client) => {
      const upstream = connect(targetPort, "127.0.0.1");
      for (const s of [client, upstream]) {
        proxy.sockets.add(s);
        s.on("close", () => proxy.sockets.delete(s));
        s.on("error", () => s.destroy());
      }
      client.on("close", () => upstream.destroy());
      upstream.on("close", () => client.destroy());
      client.pipe(upstream);
      upstream.on("data", (chunk) => {
        if (!proxy.dropping) client.write(chunk);
      });
    });
    await new Promise<void>((ok) => server.listen(0, "127.0.0.1", ok));
    const a = server.address();
    proxy = new Proxy(server, typeof a === "object" && a ? a.port : 0);
    return proxy;
  }

  /** From now on the target's replies are dropped (requests still go through). */
  dropReplies(): void {
    this.dropping = true;
  }

  /** Closes every connection; new ones are accepted, and replies forwarded again. */
  cut(): void {
    for (const s of this.sockets) s.destroy();
    this.sockets.clear();
    this.dropping = false;
  }

  close(): void {
    this.cut();
    this.server.close();
  }
}
