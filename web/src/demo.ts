/**
 * Demo player: gets a demo token for (account, device), runs a
 * HeadcountDevice and pretends to play a stream while the session lives.
 *
 * URL parameters prefill the form: ?account=&device=&content=&region=&autoplay=1
 */
import { HeadcountDevice, type ControlMessage, type DeviceState, type DeviceToken } from "./client";
import { $, getClientConfig, HttpError, NAME_RE, postJson, type ClientConfig } from "./api";

const CONTENTS: Record<string, { title: string; hue: number; minutes: number }> = {
  "ocean-live": { title: "Ocean Live", hue: 200, minutes: 58 },
  "city-lights": { title: "City Lights", hue: 280, minutes: 42 },
  "mountain-trail": { title: "Mountain Trail", hue: 140, minutes: 73 },
  "evening-news": { title: "Evening News", hue: 20, minutes: 30 },
};
const REGIONS = ["eu-west", "eu-central", "us-east", "us-west", "ap-south", "sa-east"];
const RESET_AFTER_MS = 4000;

const form = $("form") as HTMLFormElement;
const accountIn = $("account") as HTMLInputElement;
const deviceIn = $("device") as HTMLInputElement;
const contentIn = $("content") as HTMLSelectElement;
const regionIn = $("region") as HTMLSelectElement;
const playBtn = $("play") as HTMLButtonElement;
const stopBtn = $("stop") as HTMLButtonElement;
const hint = $("hint");
const statusEl = $("status");
const screen = $("screen");
const canvas = $("video") as HTMLCanvasElement;
const toast = $("toast");

let config: ClientConfig | undefined;
let device: HeadcountDevice | undefined;
let playingSince = 0;
let resetTimer: ReturnType<typeof setTimeout> | undefined;

function randomSuffix(n: number): string {
  const alphabet = "abcdefghijkmnpqrstuvwxyz23456789";
  const bytes = crypto.getRandomValues(new Uint8Array(n));
  return Array.from(bytes, (b) => alphabet[b % alphabet.length]).join("");
}

function fillForm(): void {
  for (const [key, c] of Object.entries(CONTENTS)) contentIn.add(new Option(c.title, key));
  for (const r of REGIONS) regionIn.add(new Option(r, r));
  const q = new URLSearchParams(location.search);
  accountIn.value = q.get("account") ?? "demo";
  deviceIn.value = q.get("device") ?? `browser-${randomSuffix(4)}`;
  const content = q.get("content");
  if (content && content in CONTENTS) contentIn.value = content;
  const region = q.get("region");
  if (region && REGIONS.includes(region)) regionIn.value = region;
}

const clock = (ms: number) => new Date(ms).toLocaleTimeString([], { hour12: false });

// --- status ---------------------------------------------------------------

const PHASE_TEXT: Record<DeviceState["phase"], string> = {
  idle: "idle",
  starting: "connecting",
  connected: "playing",
  reconnecting: "reconnecting",
  ended: "ended",
  stopped: "stopped",
};

function setPill(text: string, cls: "" | "ok" | "warn" | "bad"): void {
  const pill = $("conn-pill");
  pill.textContent = text;
  pill.className = `pill ${cls}`.trim();
}

function render(state: DeviceState | undefined): void {
  const phase = state?.phase ?? "idle";
  statusEl.dataset.phase = phase;
  $("st-phase").textContent = PHASE_TEXT[phase];
  $("st-device").textContent = state ? `${state.account} / ${state.device}` : "–";
  $("st-session").textContent = state?.session ?? "–";
  $("st-heartbeats").textContent = String(state?.heartbeats ?? 0);
  $("st-token").textContent = state?.tokenExpiresAt
    ? `${clock(state.tokenExpiresAt)} · renewed ${state.refreshes}×`
    : "–";
  $("st-server").textContent = state?.server ?? "–";
  const line = $("status-line");
  switch (phase) {
    case "idle":
      line.textContent = "Not playing.";
      break;
    case "starting":
      line.textContent = "Getting a token and connecting…";
      break;
    case "connected":
      line.textContent = state?.lastHeartbeatAt
        ? `Heartbeat #${state.heartbeats} sent at ${clock(state.lastHeartbeatAt)}.`
        : "Connected.";
      break;
    case "reconnecting":
      line.textContent = `Connection lost, reconnecting…${state?.reason ? ` (${state.reason})` : ""}`;
      break;
    case "ended":
    case "stopped":
      line.textContent = state?.reason ? `Session ${phase}: ${state.reason}.` : `Session ${phase}.`;
      break;
  }
  const pill: Record<DeviceState["phase"], ["" | "ok" | "warn" | "bad", string]> = {
    idle: ["", "idle"],
    starting: ["warn", "connecting"],
    connected: ["ok", "connected"],
    reconnecting: ["warn", "reconnecting"],
    ended: ["bad", "ended"],
    stopped: ["", "stopped"],
  };
  setPill(pill[phase][1], pill[phase][0]);

  const active = phase === "starting" || phase === "connected" || phase === "reconnecting";
  playBtn.disabled = active || phase === "ended" || !config?.demo_tokens;
  stopBtn.disabled = !active;
  for (const el of [accountIn, deviceIn, contentIn, regionIn]) el.disabled = active;
  screen.classList.toggle("playing", phase === "connected" || phase === "reconnecting");
  screen.classList.toggle("ended", phase === "ended");
  $("overlay-icon").textContent = phase === "ended" ? "■" : "▶";
  $("overlay-text").textContent =
    phase === "ended"
      ? "Playback stopped"
      : phase === "starting"
        ? "Connecting…"
        : "Press Play to start a session";
}

function showToast(title: string, body: string, error = true): void {
  $("toast-title").textContent = title;
  $("toast-body").textContent = body;
  toast.classList.toggle("error", error);
  toast.classList.add("show");
}

function hideToast(): void {
  toast.classList.remove("show");
}

// --- playing --------------------------------------------------------------

function onControl(msg: ControlMessage): void {
  if (msg.type === "revoked") {
    showToast("Signed out by an operator", "This session was ended from the operator console.");
  } else if (msg.type === "device-limit-exceeded") {
    showToast(
      msg.by ? `Device Limit Exceeded — ${msg.by.device} took over` : "Device Limit Exceeded",
      `Account ${msg.account} has reached its device limit.`,
    );
  } else {
    showToast("Session ended", msg.type);
  }
}

function scheduleReset(): void {
  if (resetTimer !== undefined) clearTimeout(resetTimer);
  resetTimer = setTimeout(() => {
    resetTimer = undefined;
    hideToast();
    device = undefined;
    playingSince = 0;
    render(undefined);
  }, RESET_AFTER_MS);
}

async function play(): Promise<void> {
  if (!config) return;
  hint.textContent = "";
  hideToast();
  if (resetTimer !== undefined) clearTimeout(resetTimer);
  const account = accountIn.value.trim();
  const name = deviceIn.value.trim();
  if (!NAME_RE.test(account) || !NAME_RE.test(name)) {
    hint.textContent = "Account and device: 1 to 64 letters, digits, _ or -.";
    return;
  }
  const d = new HeadcountDevice({
    servers: config.websocket,
    account,
    device: name,
    labels: { content: contentIn.value, kind: "web", region: regionIn.value },
    heartbeatEveryMs: config.heartbeat_every_ms,
    getToken: () => postJson<DeviceToken>("/v1/demo/tokens", { account, device: name }),
    onControl,
    onState: (s) => {
      if (device !== d) return;
      if (s.phase === "connected" && !playingSince) playingSince = performance.now();
      if (s.phase === "ended") {
        if (!s.control) showToast("Session ended", s.reason ?? "The session is over.");
        scheduleReset();
      }
      if (s.phase === "stopped") playingSince = 0;
      render(s);
    },
  });
  device = d;
  playingSince = 0;
  try {
    await d.start();
  } catch (err) {
    if (device !== d) return;
    const msg = err instanceof HttpError ? `${err.message} (${err.status})` : (err as Error).message;
    hint.textContent = `Could not start: ${msg}`;
    device = undefined;
    render(undefined);
  }
}

form.addEventListener("submit", (e) => {
  e.preventDefault();
  void play();
});

stopBtn.addEventListener("click", () => {
  void device?.stop("stopped by the viewer");
});

// --- the fake stream ------------------------------------------------------

const ctx = canvas.getContext("2d")!;

function fmt(secs: number): string {
  const s = Math.max(0, Math.floor(secs));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
}

function draw(now: number): void {
  const { width: w, height: h } = canvas;
  const c = CONTENTS[contentIn.value] ?? CONTENTS["ocean-live"];
  const playing = playingSince > 0 && screen.classList.contains("playing");
  const t = playing ? (now - playingSince) / 1000 : 0;

  const g = ctx.createLinearGradient(0, 0, w, h);
  g.addColorStop(0, `hsl(${c.hue}, 45%, 14%)`);
  g.addColorStop(1, `hsl(${(c.hue + 50) % 360}, 50%, 7%)`);
  ctx.fillStyle = g;
  ctx.fillRect(0, 0, w, h);

  // Drifting soft lights.
  for (let i = 0; i < 5; i++) {
    const phase = t * (0.12 + i * 0.035) + i * 1.7;
    const x = w * (0.5 + 0.38 * Math.sin(phase * 1.3 + i));
    const y = h * (0.5 + 0.32 * Math.cos(phase + i * 2.1));
    const r = h * (0.28 + 0.08 * Math.sin(phase * 2 + i));
    const rg = ctx.createRadialGradient(x, y, 0, x, y, r);
    rg.addColorStop(0, `hsla(${(c.hue + i * 28) % 360}, 80%, 60%, 0.32)`);
    rg.addColorStop(1, `hsla(${(c.hue + i * 28) % 360}, 80%, 60%, 0)`);
    ctx.fillStyle = rg;
    ctx.fillRect(0, 0, w, h);
  }

  // A horizon of moving bars, like an equaliser.
  const bars = 48;
  const bw = w / bars;
  for (let i = 0; i < bars; i++) {
    const v = 0.5 + 0.5 * Math.sin(t * 2.2 + i * 0.45) * Math.cos(t * 0.9 + i * 0.21);
    const bh = h * 0.06 + v * h * 0.16;
    ctx.fillStyle = `hsla(${(c.hue + i * 3) % 360}, 70%, 65%, 0.18)`;
    ctx.fillRect(i * bw + 2, h - bh, bw - 4, bh);
  }

  ctx.fillStyle = "rgba(255,255,255,0.92)";
  ctx.font = "600 54px system-ui, -apple-system, Segoe UI, Roboto, sans-serif";
  ctx.fillText(c.title, 56, 100);
  ctx.fillStyle = "rgba(255,255,255,0.55)";
  ctx.font = "400 26px system-ui, -apple-system, Segoe UI, Roboto, sans-serif";
  ctx.fillText(`${regionIn.value} · ${deviceIn.value}`, 58, 142);

  if (playing) {
    ctx.fillStyle = "#e5484d";
    ctx.beginPath();
    ctx.roundRect(w - 150, 56, 94, 38, 8);
    ctx.fill();
    ctx.fillStyle = "#fff";
    ctx.font = "700 20px system-ui, -apple-system, Segoe UI, Roboto, sans-serif";
    ctx.fillText("● LIVE", w - 138, 82);
  }

  const total = c.minutes * 60;
  $("elapsed").textContent = fmt(t);
  $("duration").textContent = fmt(total);
  ($("progress") as HTMLElement).style.width = `${Math.min(100, (t / total) * 100)}%`;
  requestAnimationFrame(draw);
}

// --- start ----------------------------------------------------------------

async function init(): Promise<void> {
  fillForm();
  render(undefined);
  requestAnimationFrame(draw);
  try {
    config = await getClientConfig();
  } catch (err) {
    hint.textContent = `Cannot read /v1/client-config: ${(err as Error).message}`;
    render(undefined);
    return;
  }
  if (!config.demo_tokens) {
    hint.textContent = "Demo tokens are off on this server (start it with --demo-tokens).";
  } else if (!config.websocket.length) {
    hint.textContent = "The server lists no NATS WebSocket URL.";
    config.demo_tokens = false;
  }
  render(undefined);
  if (config.demo_tokens && new URLSearchParams(location.search).get("autoplay") === "1") {
    void play();
  }
}

void init();
