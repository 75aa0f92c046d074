// Building the page from data without innerHTML: every string from the server (keys, owners,
// error messages) goes in as text, so nothing it holds can run as markup.

type Child = Node | string | number | null | undefined | false;
type Attrs = Record<string, string | number | boolean | EventListener | undefined>;

/** An element with attributes (`on…` ones are listeners) and children. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Attrs = {},
  ...children: (Child | Child[])[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [name, v] of Object.entries(attrs)) {
    if (v === undefined || v === false) continue;
    if (typeof v === "function") el.addEventListener(name.slice(2), v);
    else if (v === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(typeof c === "object" ? c : String(c));
  }
  return el;
}

/** Replaces `el`'s children. */
export function fill(el: Element, ...children: (Child | Child[])[]): void {
  el.replaceChildren();
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(typeof c === "object" ? c : String(c));
  }
}

/** "3 s", "4 min", "2 h" — how long `micros` (microseconds since the epoch) is ago. */
export function ago(micros: number | null | undefined): string {
  if (!micros) return "—";
  return span(Date.now() - micros / 1000);
}

/** "in 3 s" for a time in the future (microseconds since the epoch). */
export function until(micros: number | null | undefined): string {
  if (!micros) return "—";
  const ms = micros / 1000 - Date.now();
  return ms <= 0 ? "now" : `in ${span(ms)}`;
}

/** A duration in milliseconds, short. */
export function span(ms: number): string {
  const s = Math.max(0, ms) / 1000;
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 90) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
  return `${Math.round(s / 86400)} d`;
}

/** 512 B, 3.4 KiB, 12 MiB, 1.2 GiB. */
export function bytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i === 0 ? n : n.toFixed(n < 10 ? 1 : 0)} ${units[i]}`;
}

/** A count with thousands separators. */
export function num(n: number, digits = 0): string {
  return n.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

/** Asks the operator to confirm `what`; resolves true on "confirm". */
export function confirmDialog(title: string, what: string, action: string): Promise<boolean> {
  return new Promise((resolve) => {
    const dialog = h(
      "dialog",
      { class: "confirm", "aria-label": title },
      h("h2", {}, title),
      h("p", {}, what),
      h(
        "form",
        { method: "dialog" },
        h("button", { value: "cancel", class: "secondary" }, "Cancel"),
        h("button", { value: "confirm", class: "danger", "data-confirm": true }, action),
      ),
    );
    dialog.addEventListener("close", () => {
      resolve(dialog.returnValue === "confirm");
      dialog.remove();
    });
    document.body.append(dialog);
    dialog.showModal();
  });
}

/** A short message at the bottom of the screen. */
export function toast(text: string, kind: "ok" | "error" = "ok"): void {
  const t = h("div", { class: `toast ${kind}`, role: "status" }, text);
  document.body.append(t);
  setTimeout(() => t.remove(), kind === "error" ? 8000 : 4000);
}

let onError: (e: unknown) => void = (e) => console.warn(e);
let onSuccess: () => void = () => {};

/** What `every` does when a tick fails, and when one succeeds again. */
export function onTicks(error: (e: unknown) => void, success: () => void): void {
  onError = error;
  onSuccess = success;
}

/** Reports an error of a request made outside `every` (a search typed, a row opened) the way
 * a failed tick is: a banner, or back to the login on a 401. */
export function report(e: unknown): void {
  onError(e);
}

/** Calls `f` now and every `ms` until the returned function is called; skips while hidden. */
export function every(ms: number, f: () => Promise<void> | void): () => void {
  let stopped = false;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const tick = async () => {
    if (stopped) return;
    if (document.visibilityState !== "hidden") {
      try {
        await f();
        onSuccess();
      } catch (e) {
        if (!stopped) onError(e);
      }
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  void tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

/** A long id shown short (its first 8 characters), whole on hover. */
export function shortId(id: string): HTMLElement {
  return h("span", { title: id, class: "mono" }, id.length > 12 ? `${id.slice(0, 8)}…` : id);
}
