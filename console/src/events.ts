// Events: a live tail with key/subtree/children and kind filters that can resume from any
// watermark (the TypeScript client's subscriber: it resumes by itself across reconnects), an
// event's JSON on click, and a form that publishes a test event.
import { EVENT_KINDS, type Delivered, type HeraldEvent, HeraldError, type SubscribeSpec, type Subscriber } from "../../clients/js/src/index.js";

import type { Ctx } from "./main.js";
import { fill, h, num, toast } from "./dom.js";

/** Rows the tail keeps on screen; older ones are dropped (the log still has them). */
const ROWS = 500;

export function events(ctx: Ctx, root: HTMLElement, params: URLSearchParams): () => void {
  const scope = h(
    "select",
    { "aria-label": "Scope", name: "scope" },
    ["subtree", "key", "children"].map((s) => h("option", { value: s }, s)),
  );
  const target = h("input", { name: "target", required: true, placeholder: "a key, e.g. alice@example.test", "aria-label": "Key" });
  const kinds = h("input", { name: "kinds", placeholder: "kinds, e.g. new_mail,object_created", "aria-label": "Kinds" });
  const after = h("input", { name: "after", type: "number", min: 0, placeholder: "after watermark (empty: from now)", "aria-label": "After watermark" });
  const startButton = h("button", { class: "primary", type: "submit", "data-action": "tail" }, "Tail");
  const stopButton = h("button", { class: "secondary", type: "button", "data-action": "stop", disabled: true }, "Stop");
  const status = h("p", { class: "hint", "data-testid": "tail-status" }, "Not tailing.");
  const list = h("tbody");
  const json = h("pre", { class: "json", "data-testid": "event-json" }, "Select an event to see its JSON.");

  for (const s of ["key", "subtree", "children"]) {
    const v = params.get(s);
    if (v !== null) {
      scope.value = s;
      target.value = v;
    }
  }
  kinds.value = params.get("kinds") ?? "";
  after.value = params.get("after") ?? "";

  const tailForm = h(
    "form",
    { class: "filters", "data-testid": "tail-form" },
    scope,
    target,
    kinds,
    after,
    startButton,
    stopButton,
  );

  // Publishing a test event.
  const pubKey = h("input", { name: "key", required: true, placeholder: "key, e.g. alice@example.test/inbox/m1", "aria-label": "Event key" });
  const pubKind = h("select", { name: "kind", "aria-label": "Event kind" }, EVENT_KINDS.map((k) => h("option", { value: k }, k)));
  const pubFields = h("textarea", { name: "fields", rows: 2, placeholder: '{"message_class": "IPM.Note"}', "aria-label": "Other fields (JSON)" });
  const pubResult = h("p", { class: "hint", "data-testid": "publish-result" });
  const pubForm = h(
    "form",
    { class: "publish", "data-testid": "publish-form" },
    h("h2", {}, "Publish a test event"),
    h("div", { class: "filters" }, pubKey, pubKind),
    pubFields,
    h("button", { class: "primary", type: "submit", "data-action": "publish" }, "Publish"),
    pubResult,
  );
  pubKind.value = "new_mail";

  fill(
    root,
    h("h1", {}, "Events"),
    tailForm,
    status,
    h(
      "div",
      { class: "split" },
      h("div", { class: "scroll" }, h("table", { "data-testid": "tail" }, h("thead", {}, h("tr", {}, ["Watermark", "Time", "Kind", "Key"].map((c) => h("th", {}, c)))), list)),
      json,
    ),
    pubForm,
  );

  let subscriber: Subscriber | null = null;
  let generation = 0;

  const stopTail = () => {
    generation += 1;
    subscriber?.close();
    subscriber = null;
    stopButton.disabled = true;
  };

  tailForm.addEventListener("submit", (e) => {
    e.preventDefault();
    void startTail();
  });
  stopButton.addEventListener("click", () => {
    stopTail();
    fill(status, "Stopped.");
  });

  async function startTail(): Promise<void> {
    stopTail();
    const mine = generation;
    fill(list);
    const spec: SubscribeSpec = {};
    const t = target.value.trim();
    spec[scope.value as "key" | "subtree" | "children"] = t;
    if (kinds.value.trim()) spec.kinds = kinds.value.trim();
    if (after.value !== "") spec.after = Number(after.value);
    const q = new URLSearchParams();
    if (t) q.set(scope.value, t);
    if (spec.kinds) q.set("kinds", spec.kinds);
    if (spec.after !== undefined) q.set("after", String(spec.after));
    history.replaceState(null, "", `#events${q.size ? `?${q}` : ""}`);
    subscriber = ctx.client().subscriber();
    stopButton.disabled = false;
    fill(status, "Connecting…");
    let n = 0;
    try {
      const sub = await subscriber.subscribe(spec);
      if (mine !== generation) return;
      fill(status, `Live, after watermark ${num(sub.startedAfter)}.`);
      for await (const ev of sub) {
        if (mine !== generation) return;
        n += 1;
        list.prepend(row(ev));
        while (list.rows.length > ROWS) list.lastElementChild?.remove();
        fill(status, `Live: ${num(n)} events, last watermark ${num(ev.watermark)}.`);
      }
      if (mine === generation) fill(status, `The tail ended after ${num(n)} events.`);
    } catch (e) {
      if (mine !== generation) return;
      const why = e instanceof HeraldError ? `${e.kind}: ${e.message}` : (e as Error).message;
      fill(status, `The tail ended (${why}).`);
    }
  }

  function row(ev: Delivered): HTMLTableRowElement {
    const tr = h(
      "tr",
      { "data-watermark": ev.watermark, tabindex: 0 },
      h("td", {}, num(ev.watermark)),
      h("td", {}, ev.timestamp ? new Date(ev.timestamp / 1000).toLocaleTimeString() : "—"),
      h("td", {}, ev.kind),
      h("td", { class: "mono" }, ev.key),
    );
    const show = () => {
      for (const r of list.querySelectorAll("tr.selected")) r.classList.remove("selected");
      tr.classList.add("selected");
      fill(json, JSON.stringify(ev, null, 2));
    };
    tr.addEventListener("click", show);
    tr.addEventListener("keydown", (e) => {
      if (e.key === "Enter") show();
    });
    return tr;
  }

  pubForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    let extra: Record<string, unknown> = {};
    if (pubFields.value.trim()) {
      try {
        extra = JSON.parse(pubFields.value);
        if (typeof extra !== "object" || extra === null || Array.isArray(extra)) throw new Error("not an object");
      } catch (err) {
        fill(pubResult, `The other fields must be a JSON object (${(err as Error).message}).`);
        return;
      }
    }
    const event = { ...extra, key: pubKey.value.trim(), kind: pubKind.value } as HeraldEvent;
    try {
      const r = await ctx.client().publish([event]);
      fill(pubResult, `Appended at watermark ${num(r.watermarks[0] ?? 0)}.`);
    } catch (err) {
      const why = err instanceof HeraldError ? err.message : (err as Error).message;
      fill(pubResult, `Refused: ${why}`);
      toast(`Not published: ${why}`, "error");
    }
  });

  void (params.size ? startTail() : Promise.resolve());
  return stopTail;
}
