/**
 * Live operator console: active sessions per account in real time, limits,
 * kicks, presence events and a 5-minute concurrency chart.
 *
 * The operator key comes from the form or the URL fragment (#key=...;
 * #account=... opens an account) and is kept in sessionStorage. It buys a
 * short-lived operator token (POST /v1/operator-tokens) that connects to NATS
 * over WebSocket; replies must come under the token's inbox prefix.
 */
import {
  tokenAuthenticator,
  wsconnect,
  type Msg,
  type NatsConnection,
} from "@nats-io/nats-core";
import { $, getClientConfig, HttpError, NAME_RE, postJson, type ClientConfig } from "./api";

interface OperatorToken {
  token: string;
  expires_at: number;
  inbox_prefix: string;
}

interface SessionInfo {
  device: string;
  session: string;
  since: number;
  last_seen: number;
  content?: string | null;
  kind?: string | null;
  region?: string | null;
}

interface ActiveReply {
  account: string;
  active: number;
  limit: number;
  policy: string;
  sessions: SessionInfo[];
}

interface StatsReply {
  active: number;
  peak?: number;
  top?: { account: string; active: number; limit: number }[];
}

interface LimitsReply {
  account: string;
  limit: number;
  policy: string;
}

interface PresenceEvent {
  type: string;
  account: string;
  device: string;
  session: string;
  at: number;
  by?: { device: string; session: string } | null;
  reason?: string | null;
  content?: string | null;
}

/** A NATS micro error reply (`Nats-Service-Error-Code` / `Nats-Service-Error`). */
class ServiceError extends Error {
  constructor(
    readonly code: number,
    message: string,
  ) {
    super(message);
    this.name = "ServiceError";
  }
}

const KEY_STORAGE = "headcount.operatorKey";
const WINDOW_MS = 5 * 60_000;
const SAMPLE_EVERY_MS = 2000;
const MAX_FEED = 200;

let config: ClientConfig | undefined;
let operatorKey = "";
let opToken: OperatorToken | undefined;
let nc: NatsConnection | undefined;
let running = false;
let refreshTimer: ReturnType<typeof setTimeout> | undefined;
let sampleTimer: ReturnType<typeof setInterval> | undefined;
/** Set while a connection is closed on purpose to switch to a new inbox prefix. */
let swapping = false;

const accounts = new Map<string, { active: number; limit: number }>();
let selected: string | undefined;
let detail: ActiveReply | undefined;
let limitDirty = false;
const samples: { t: number; v: number }[] = [];
let eventCount = 0;
const knownSessions = new Set<string>();

// --- small helpers ----------------------------------------------------------

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  props: Partial<HTMLElementTagNameMap[K]> & { dataset?: Record<string, string> } = {},
  ...children: (Node | string)[]
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  const { dataset, ...rest } = props;
  Object.assign(node, rest);
  if (dataset) Object.assign(node.dataset, dataset);
  node.append(...children);
  return node;
}

function ago(ms: number): string {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s}s ago`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${s % 60}s ago`;
  return `${Math.floor(m / 60)}h ${m % 60}m ago`;
}

function clock(ms: number): string {
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

let toastTimer: ReturnType<typeof setTimeout> | undefined;
function toast(title: string, body = "", error = false): void {
  $("toast-title").textContent = title;
  $("toast-body").textContent = body;
  const t = $("toast");
  t.classList.toggle("error", error);
  t.classList.add("show");
  if (toastTimer !== undefined) clearTimeout(toastTimer);
  toastTimer = setTimeout(() => t.classList.remove("show"), error ? 6000 : 3000);
}

function showError(what: string, err: unknown): void {
  if (err instanceof ServiceError) toast(`${what} failed (${err.code})`, err.message, true);
  else toast(`${what} failed`, (err as Error).message ?? String(err), true);
}

function setPill(text: string, cls: "" | "ok" | "warn" | "bad"): void {
  const pill = $("conn-pill");
  pill.textContent = text;
  pill.className = `pill ${cls}`.trim();
}

// --- NATS -------------------------------------------------------------------

/** JSON request to a headcount endpoint; micro error headers become a ServiceError. */
async function call<T>(subject: string, body: unknown): Promise<T> {
  if (!nc || nc.isClosed()) throw new Error("not connected");
  const m: Msg = await nc.request(subject, JSON.stringify(body), { timeout: 4000 });
  const code = m.headers?.get("Nats-Service-Error-Code");
  if (code) {
    throw new ServiceError(Number(code), m.headers?.get("Nats-Service-Error") || `error ${code}`);
  }
  return m.json<T>();
}

async function getOperatorToken(): Promise<OperatorToken> {
  return postJson<OperatorToken>("/v1/operator-tokens", undefined, operatorKey);
}

function scheduleRefresh(): void {
  if (refreshTimer !== undefined) clearTimeout(refreshTimer);
  if (!opToken || !running) return;
  const delay = Math.max(1000, (opToken.expires_at - Date.now()) * 0.75);
  refreshTimer = setTimeout(() => void refresh(), delay);
}

/** Gets a new operator token before the current one expires, then reconnects with it. */
async function refresh(): Promise<void> {
  refreshTimer = undefined;
  if (!running) return;
  let next: OperatorToken;
  try {
    next = await getOperatorToken();
  } catch (err) {
    if (err instanceof HttpError && (err.status === 401 || err.status === 403)) {
      signOut(`The operator key was refused: ${err.message}`);
      return;
    }
    refreshTimer = setTimeout(() => void refresh(), 3000);
    return;
  }
  const samePrefix = opToken?.inbox_prefix === next.inbox_prefix;
  opToken = next;
  scheduleRefresh();
  const cur = nc;
  if (!cur || cur.isClosed()) return;
  if (samePrefix) {
    await cur.reconnect().catch(() => {});
  } else {
    // The reply prefix is fixed per connection: close this one, the loop opens a new one.
    swapping = true;
    await cur.close().catch(() => {});
  }
}

/** Connects (and keeps reconnecting) while the page is signed in. */
async function runConnection(): Promise<void> {
  let failures = 0;
  while (running) {
    try {
      if (!opToken || opToken.expires_at - Date.now() < 5000) {
        opToken = await getOperatorToken();
        scheduleRefresh();
      }
      setPill("connecting", "warn");
      const conn = await wsconnect({
        servers: config!.websocket,
        authenticator: tokenAuthenticator(() => opToken?.token ?? ""),
        inboxPrefix: opToken.inbox_prefix,
        name: "headcount-live",
        maxReconnectAttempts: -1,
        reconnectTimeWait: 1000,
        timeout: 10_000,
      });
      if (!running) {
        await conn.close();
        return;
      }
      failures = 0;
      nc = conn;
      attach(conn);
      setPill("live", "ok");
      void sample();
      if (selected) void loadDetail(selected);
      await conn.closed();
      if (nc === conn) nc = undefined;
    } catch (err) {
      if (err instanceof HttpError && (err.status === 401 || err.status === 403)) {
        signOut(`The operator key was refused: ${err.message}`);
        return;
      }
      console.warn("headcount live: connection failed", err);
    }
    if (!running) return;
    if (swapping) {
      swapping = false;
      continue;
    }
    setPill("reconnecting", "warn");
    opToken = undefined; // a closed connection may mean the token was refused: get a new one
    await sleep(Math.min(10_000, 500 * 2 ** Math.min(failures++, 5)));
  }
}

function attach(conn: NatsConnection): void {
  conn.subscribe("headcount.events.>", {
    callback: (err, msg) => {
      if (err) {
        toast("Event subscription failed", err.message, true);
        return;
      }
      try {
        onEvent(msg.json<PresenceEvent>());
      } catch {
        /* not JSON: ignore */
      }
    },
  });
  void (async () => {
    for await (const s of conn.status()) {
      if (nc !== conn) break;
      if (s.type === "disconnect") setPill("reconnecting", "warn");
      else if (s.type === "reconnect") {
        setPill("live", "ok");
        void sample();
      } else if (s.type === "error") console.warn("headcount live:", s.error.message);
    }
  })();
}

// --- data -------------------------------------------------------------------

let statsInFlight = false;
async function sample(): Promise<void> {
  if (!nc || statsInFlight) return;
  statsInFlight = true;
  try {
    const s = await call<StatsReply>("headcount.stats", { top: 50 });
    const now = Date.now();
    samples.push({ t: now, v: s.active });
    while (samples.length && samples[0].t < now - WINDOW_MS - 10_000) samples.shift();
    $("total").textContent = String(s.active);
    $("peak").textContent = String(s.peak ?? s.active);
    const seen = new Set<string>();
    for (const a of s.top ?? []) {
      accounts.set(a.account, { active: a.active, limit: a.limit });
      seen.add(a.account);
    }
    for (const [name, a] of accounts) {
      if (!seen.has(name)) {
        if (name === selected) a.active = detail?.account === name ? detail.active : 0;
        else accounts.delete(name);
      }
    }
    $("account-count").textContent = String((s.top ?? []).filter((a) => a.active > 0).length);
    if (!selected && s.top?.length) select(s.top[0].account);
    renderAccounts();
    renderChart();
  } catch (err) {
    console.warn("headcount live: stats failed", err);
  } finally {
    statsInFlight = false;
  }
}

let detailSeq = 0;
async function loadDetail(account: string): Promise<void> {
  const mine = ++detailSeq;
  try {
    const r = await call<ActiveReply>("headcount.active", { account });
    if (mine !== detailSeq || account !== selected) return;
    detail = r;
    accounts.set(account, { active: r.active, limit: r.limit });
    renderDetail();
    renderAccounts();
  } catch (err) {
    if (mine === detailSeq) showError(`Loading ${account}`, err);
  }
}

const pending = new Map<string, ReturnType<typeof setTimeout>>();
function debounce(key: string, ms: number, fn: () => void): void {
  const t = pending.get(key);
  if (t !== undefined) clearTimeout(t);
  pending.set(
    key,
    setTimeout(() => {
      pending.delete(key);
      fn();
    }, ms),
  );
}

function onEvent(ev: PresenceEvent): void {
  addFeed(ev);
  if (ev.account === selected) debounce(`active:${ev.account}`, 120, () => void loadDetail(ev.account));
  debounce("stats", 250, () => void sample());
}

function select(account: string): void {
  if (selected !== account) {
    selected = account;
    detail = undefined;
    limitDirty = false;
    knownSessions.clear();
    if (!accounts.has(account)) accounts.set(account, { active: 0, limit: 0 });
  }
  renderAccounts();
  renderDetail();
  void loadDetail(account);
}

// --- rendering --------------------------------------------------------------

function renderAccounts(): void {
  const list = $("accounts");
  const rows = [...accounts.entries()].sort(
    (a, b) => b[1].active - a[1].active || a[0].localeCompare(b[0]),
  );
  list.replaceChildren(
    ...rows.map(([name, a]) => {
      const pct = a.limit > 0 ? Math.min(100, (a.active / a.limit) * 100) : 0;
      const bar = el("span");
      bar.style.width = `${pct}%`;
      const btn = el(
        "button",
        {
          type: "button",
          className: name === selected ? "selected" : "",
          dataset: { testid: "account", account: name },
          onclick: () => select(name),
        },
        el("span", { className: "name", textContent: name }),
        el("span", { className: "count", textContent: `${a.active} / ${a.limit || "–"}` }),
        el("span", { className: `bar${a.limit > 0 && a.active >= a.limit ? " full" : ""}` }, bar),
      );
      return el("li", {}, btn);
    }),
  );
  $("accounts-empty").hidden = rows.length > 0;
}

function renderDetail(): void {
  const body = $("detail-body");
  $("detail-empty").hidden = !!selected;
  body.hidden = !selected;
  if (!selected) return;
  $("d-account").textContent = selected;
  const d = detail;
  $("d-active").textContent = d ? String(d.active) : "…";
  $("d-limit").textContent = d ? String(d.limit) : "–";
  $("d-policy").textContent = d ? d.policy : "–";
  const limitIn = $("f-limit") as HTMLInputElement;
  const policyIn = $("f-policy") as HTMLSelectElement;
  if (d && !limitDirty && document.activeElement !== limitIn && document.activeElement !== policyIn) {
    limitIn.value = String(d.limit);
    policyIn.value = d.policy;
  }

  const seats = $("seats");
  const n = d ? Math.max(d.limit, d.active) : 0;
  seats.replaceChildren(
    ...Array.from({ length: Math.min(n, 40) }, (_, i) =>
      el("span", {
        className: `seat${d && i < d.active ? (i >= d.limit ? " over" : " taken") : ""}`,
      }),
    ),
  );

  const tbody = $("sessions");
  const sessions = d?.sessions ?? [];
  tbody.replaceChildren(
    ...sessions.map((s) => {
      const fresh = knownSessions.size > 0 && !knownSessions.has(s.session);
      const kickBtn = el("button", {
        type: "button",
        className: "danger",
        textContent: "Kick",
        dataset: { testid: "kick", session: s.session },
        onclick: () => void kick(d!.account, s),
      });
      return el(
        "tr",
        {
          className: fresh ? "fresh" : "",
          dataset: { testid: "session-row", session: s.session, device: s.device },
        },
        el(
          "td",
          { className: "who", title: s.device },
          el("span", { className: "mono", textContent: s.device }),
          el("span", {
            className: "sub",
            textContent: [s.kind, s.region].filter(Boolean).join(" · ") || "–",
          }),
        ),
        el("td", { className: "mono muted sid", textContent: s.session, title: s.session }),
        el("td", { textContent: s.content ?? "–" }),
        el("td", { className: "muted", textContent: ago(s.since), dataset: { since: String(s.since) } }),
        el("td", { className: "muted", textContent: ago(s.last_seen), dataset: { seen: String(s.last_seen) } }),
        el("td", {}, kickBtn),
      );
    }),
  );
  knownSessions.clear();
  for (const s of sessions) knownSessions.add(s.session);
  if (sessions.length === 0) knownSessions.add(""); // later joins still flash
  $("sessions-empty").hidden = sessions.length > 0;
}

/** Keeps the relative times in the sessions table current without re-rendering rows. */
function tickTimes(): void {
  for (const td of document.querySelectorAll<HTMLElement>("#sessions td[data-since]")) {
    td.textContent = ago(Number(td.dataset.since));
  }
  for (const td of document.querySelectorAll<HTMLElement>("#sessions td[data-seen]")) {
    td.textContent = ago(Number(td.dataset.seen));
  }
}

function addFeed(ev: PresenceEvent): void {
  eventCount++;
  $("event-count").textContent = String(eventCount);
  const extra: string[] = [];
  if (ev.by?.device) extra.push(`by ${ev.by.device}`);
  if (ev.reason) extra.push(ev.reason);
  if (ev.content) extra.push(ev.content);
  const item = el(
    "li",
    { dataset: { testid: "event", type: ev.type, account: ev.account, session: ev.session } },
    el("span", { className: "when", textContent: clock(ev.at || Date.now()) }),
    el("span", {}, el("span", { className: `badge ${ev.type}`, textContent: ev.type })),
    el(
      "span",
      { className: "what", title: `${ev.account} / ${ev.device} · session ${ev.session}` },
      el("span", { className: "device", textContent: ev.device }),
      el("span", { className: "account", textContent: ` ${ev.account}` }),
    ),
    extra.length ? el("span", { className: "extra", textContent: extra.join(" · ") }) : "",
  );
  const feed = $("feed");
  feed.prepend(item);
  while (feed.children.length > MAX_FEED) feed.lastElementChild?.remove();
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag: string, attrs: Record<string, string | number>, text?: string): SVGElement {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceMax(v: number): number {
  if (v <= 4) return 4;
  const mag = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * mag) return m * mag;
  return 10 * mag;
}

/** Total concurrency over the last 5 minutes as an SVG line + area. */
function renderChart(): void {
  const chart = $("chart") as unknown as SVGSVGElement;
  const w = Math.max(200, Math.round(chart.clientWidth || 800));
  const h = 150;
  chart.setAttribute("viewBox", `0 0 ${w} ${h}`);
  chart.setAttribute("preserveAspectRatio", "xMinYMin meet");
  const left = 34;
  const right = 8;
  const top = 8;
  const bottom = 20;
  const pw = w - left - right;
  const ph = h - top - bottom;
  const now = Date.now();
  const from = now - WINDOW_MS;
  const pts = samples.filter((s) => s.t >= from - SAMPLE_EVERY_MS);
  const max = niceMax(Math.max(0, ...pts.map((p) => p.v)));
  const x = (t: number) => left + ((Math.max(t, from) - from) / WINDOW_MS) * pw;
  const y = (v: number) => top + ph - (v / max) * ph;

  const nodes: SVGElement[] = [];
  const defs = svg("defs", {});
  const grad = svg("linearGradient", { id: "chart-fill", x1: 0, y1: 0, x2: 0, y2: 1 });
  grad.append(
    svg("stop", { offset: "0%", "stop-color": "#4f8cff", "stop-opacity": 0.35 }),
    svg("stop", { offset: "100%", "stop-color": "#4f8cff", "stop-opacity": 0.02 }),
  );
  defs.append(grad);
  nodes.push(defs);
  for (const frac of [0, 0.5, 1]) {
    const v = max * frac;
    nodes.push(svg("line", { class: "grid", x1: left, x2: w - right, y1: y(v), y2: y(v) }));
    nodes.push(
      svg("text", { class: "axis", x: left - 6, y: y(v) + 4, "text-anchor": "end" }, String(Math.round(v))),
    );
  }
  for (let m = 5; m >= 0; m--) {
    const t = now - m * 60_000;
    nodes.push(
      svg(
        "text",
        { class: "axis", x: x(t), y: h - 4, "text-anchor": m === 5 ? "start" : m === 0 ? "end" : "middle" },
        m === 0 ? "now" : `−${m}m`,
      ),
    );
  }
  if (pts.length) {
    // Step line: the count holds until the next sample.
    let d = `M ${x(pts[0].t).toFixed(1)} ${y(pts[0].v).toFixed(1)}`;
    for (let i = 1; i < pts.length; i++) {
      d += ` H ${x(pts[i].t).toFixed(1)} V ${y(pts[i].v).toFixed(1)}`;
    }
    d += ` H ${x(now).toFixed(1)}`;
    const area = `${d} V ${y(0)} H ${x(pts[0].t).toFixed(1)} Z`;
    nodes.push(svg("path", { class: "area", d: area }));
    nodes.push(svg("path", { class: "line", d }));
    const last = pts[pts.length - 1];
    nodes.push(svg("circle", { cx: x(now), cy: y(last.v), r: 3.5, fill: "#4f8cff" }));
  }
  chart.replaceChildren(...nodes);
  $("chart-now").textContent = pts.length ? `${pts[pts.length - 1].v} now` : "";
}

// --- actions ----------------------------------------------------------------

async function kick(account: string, s: SessionInfo): Promise<void> {
  try {
    const r = await call<{ kicked: boolean }>("headcount.kick", { account, session: s.session });
    toast(r.kicked ? `Kicked ${s.device}` : `${s.device} was not active`, `session ${s.session}`, !r.kicked);
  } catch (err) {
    showError("Kick", err);
  }
  void loadDetail(account);
}

async function applyLimit(e: Event): Promise<void> {
  e.preventDefault();
  if (!selected) return;
  const account = selected;
  const limit = Number(($("f-limit") as HTMLInputElement).value);
  const policy = ($("f-policy") as HTMLSelectElement).value;
  try {
    const r = await call<LimitsReply>("headcount.limits.set", { account, limit, policy });
    limitDirty = false;
    toast(`Limit of ${r.account} set`, `${r.limit} devices, ${r.policy}`);
  } catch (err) {
    showError("Setting the limit", err);
  }
  void loadDetail(account);
  void sample();
}

function signOut(message?: string): void {
  running = false;
  sessionStorage.removeItem(KEY_STORAGE);
  operatorKey = "";
  opToken = undefined;
  if (refreshTimer !== undefined) clearTimeout(refreshTimer);
  if (sampleTimer !== undefined) clearInterval(sampleTimer);
  const cur = nc;
  nc = undefined;
  void cur?.close().catch(() => {});
  $("dash").hidden = true;
  $("login").hidden = false;
  $("signout").hidden = true;
  $("login-error").textContent = message ?? "";
  setPill("not connected", "");
}

async function signIn(key: string): Promise<void> {
  operatorKey = key;
  $("login-error").textContent = "";
  if (!config) {
    try {
      config = await getClientConfig();
    } catch (err) {
      $("login-error").textContent = `Cannot read /v1/client-config: ${(err as Error).message}`;
      return;
    }
  }
  if (!config.websocket.length) {
    $("login-error").textContent = "The server lists no NATS WebSocket URL.";
    return;
  }
  try {
    opToken = await getOperatorToken();
  } catch (err) {
    $("login-error").textContent =
      err instanceof HttpError ? `${err.message} (${err.status})` : (err as Error).message;
    sessionStorage.removeItem(KEY_STORAGE);
    return;
  }
  sessionStorage.setItem(KEY_STORAGE, key);
  running = true;
  scheduleRefresh();
  $("login").hidden = true;
  $("dash").hidden = false;
  $("signout").hidden = false;
  renderChart();
  renderDetail();
  if (sampleTimer !== undefined) clearInterval(sampleTimer);
  sampleTimer = setInterval(() => {
    void sample();
    if (selected) void loadDetail(selected);
  }, SAMPLE_EVERY_MS);
  void runConnection();
}

function init(): void {
  const frag = new URLSearchParams(location.hash.replace(/^#/, ""));
  const fragKey = frag.get("key");
  const fragAccount = frag.get("account");
  if (fragKey) {
    sessionStorage.setItem(KEY_STORAGE, fragKey);
    // Keep the key out of the address bar and history.
    history.replaceState(null, "", location.pathname + location.search);
  }
  if (fragAccount && NAME_RE.test(fragAccount)) {
    selected = fragAccount;
    accounts.set(fragAccount, { active: 0, limit: 0 });
  }
  const key = sessionStorage.getItem(KEY_STORAGE) ?? "";
  ($("key") as HTMLInputElement).value = key;

  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const k = ($("key") as HTMLInputElement).value.trim();
    if (k) void signIn(k);
  });
  $("signout").addEventListener("click", () => signOut());
  $("limit-form").addEventListener("submit", (e) => void applyLimit(e));
  $("f-limit").addEventListener("input", () => (limitDirty = true));
  $("f-policy").addEventListener("change", () => (limitDirty = true));
  $("open-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const input = $("open-account") as HTMLInputElement;
    const name = input.value.trim();
    if (!NAME_RE.test(name)) {
      toast("Not an account name", "1 to 64 letters, digits, _ or -", true);
      return;
    }
    input.value = "";
    select(name);
  });
  window.addEventListener("resize", () => renderChart());
  setInterval(tickTimes, 1000);
  setInterval(renderChart, 1000);
  if (key) void signIn(key);
}

init();
