/**
 * Browser device client for headcount.
 *
 * A `HeadcountDevice` is one playing device of one account. It connects to
 * NATS over WebSocket with a device token, publishes a MessagePack heartbeat
 * on `hb.<account>.<device>.<session>` every interval, listens on
 * `ctl.<account>.<device>` for `device-limit-exceeded` / `revoked`, refreshes
 * its token before it expires and leaves (frees its seat) when the page goes
 * away or `stop()` is called.
 *
 * ```ts
 * const device = new HeadcountDevice({
 *   servers: ["wss://nats.example.com"],
 *   account: "acme",
 *   device: "living-room-tv",
 *   labels: { content: "movie-42", region: "eu-west" },
 *   getToken: () => myBackend.headcountToken(),   // {token, session, expires_at}
 *   onControl: (msg) => player.stop(msg),
 *   onState: (state) => render(state),
 * });
 * await device.start();
 * ```
 */
import {
  tokenAuthenticator,
  wsconnect,
  type NatsConnection,
} from "@nats-io/nats-core";
import { decode, encode } from "@msgpack/msgpack";

/** A device token as issued by token-vendor. */
export interface DeviceToken {
  /** The JWT presented to NATS as the connection token. */
  token: string;
  /** The session the token names (22 characters). */
  session: string;
  /** Expiry, Unix milliseconds. */
  expires_at: number;
}

/** Labels carried by every heartbeat. */
export interface DeviceLabels {
  /** What the session plays or uses (<= 128 bytes). */
  content?: string;
  /** Device kind (<= 32 bytes); `web` unless given. */
  kind?: string;
  /** Where the device is (<= 32 bytes). */
  region?: string;
}

/** A control message from headcount, sent on `ctl.<account>.<device>`. */
export interface ControlMessage {
  type: "device-limit-exceeded" | "revoked" | string;
  account: string;
  device: string;
  /** The session that is ended. */
  session: string;
  /** When, Unix milliseconds (server clock). */
  at: number;
  /** For an eviction: the session that displaced this one, when known. */
  by?: { device: string; session: string };
}

/**
 * - `idle`: not started.
 * - `starting`: getting a token, first connection in progress.
 * - `connected`: heartbeating.
 * - `reconnecting`: the connection dropped; retrying with backoff.
 * - `ended`: headcount ended the session (control message, or the token
 *   could not be refreshed any more).
 * - `stopped`: this device left (`stop()`, page hidden).
 */
export type DevicePhase =
  | "idle"
  | "starting"
  | "connected"
  | "reconnecting"
  | "ended"
  | "stopped";

/** A snapshot of the client, passed to `onState` on every change. */
export interface DeviceState {
  phase: DevicePhase;
  account: string;
  device: string;
  session?: string;
  /** Heartbeats published in this session. */
  heartbeats: number;
  /** When the last heartbeat was published, Unix ms. */
  lastHeartbeatAt?: number;
  /** Expiry of the current token, Unix ms. */
  tokenExpiresAt?: number;
  /** Successful token refreshes in this session. */
  refreshes: number;
  /** The NATS server of the current connection. */
  server?: string;
  /** Why the session ended or the last error, in words. */
  reason?: string;
  /** The control message that ended the session, if one did. */
  control?: ControlMessage;
}

export interface HeadcountDeviceOptions {
  /** NATS WebSocket URLs (`ws://` or `wss://`). */
  servers: string[];
  account: string;
  device: string;
  labels?: DeviceLabels;
  /** Heartbeat interval in ms (default 5000). */
  heartbeatEveryMs?: number;
  /** Returns a fresh token (and with it a new session). Called once per `start()`. */
  getToken: () => Promise<DeviceToken>;
  /**
   * Exchanges the current token for a new one of the SAME session. Throw
   * `SessionEndedError` when the session is over. Default: `POST
   * /v1/tokens/refresh` with the current token as Bearer (see
   * `refreshDeviceToken`).
   */
  refreshToken?: (current: DeviceToken) => Promise<DeviceToken>;
  /** Refresh when this fraction of the token's remaining lifetime has passed (default 0.75). */
  refreshAt?: number;
  /** Where `sendBeacon` posts `{token}` on leave (default `/v1/sessions/leave`). */
  leaveUrl?: string | null;
  /** Leave automatically on `pagehide` (default true). */
  leaveOnPageHide?: boolean;
  /** Called when headcount ends this session (`device-limit-exceeded`, `revoked`). */
  onControl?: (msg: ControlMessage) => void;
  /** Called with a new snapshot on every state change. */
  onState?: (state: DeviceState) => void;
}

/** Thrown by a token refresh when the session is over (HTTP 401/403). */
export class SessionEndedError extends Error {
  constructor(
    message: string,
    readonly status?: number,
  ) {
    super(message);
    this.name = "SessionEndedError";
  }
}

/** Reads `{"error": ...}` from a failed response, falling back to the status text. */
export async function errorMessage(res: Response): Promise<string> {
  try {
    const body = await res.json();
    if (body && typeof body.error === "string") return body.error;
  } catch {
    /* not JSON */
  }
  return `${res.status} ${res.statusText}`.trim();
}

/**
 * `POST <url>` with `Authorization: Bearer <token>`; answers a new token of
 * the same session. 401/403 throw `SessionEndedError`; other failures throw
 * a plain `Error` (worth retrying).
 */
export async function refreshDeviceToken(
  current: DeviceToken,
  url = "/v1/tokens/refresh",
): Promise<DeviceToken> {
  const res = await fetch(url, {
    method: "POST",
    headers: { Authorization: `Bearer ${current.token}` },
  });
  if (res.status === 401 || res.status === 403) {
    throw new SessionEndedError(await errorMessage(res), res.status);
  }
  if (!res.ok) throw new Error(`token refresh failed: ${await errorMessage(res)}`);
  return (await res.json()) as DeviceToken;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Exponential backoff with jitter: 250 ms, 500 ms, 1 s, ... up to 10 s. */
function backoffMs(failures: number): number {
  const base = Math.min(10_000, 250 * 2 ** Math.min(failures, 6));
  return Math.round(base * (0.8 + Math.random() * 0.4));
}

export class HeadcountDevice {
  private readonly opts: HeadcountDeviceOptions;
  private readonly labels: DeviceLabels;
  private st: DeviceState;
  private token?: DeviceToken;
  private nc?: NatsConnection;
  private alive = false;
  private seq = 0;
  private hbTimer?: ReturnType<typeof setInterval>;
  private refreshTimer?: ReturnType<typeof setTimeout>;
  private dialFailures = 0;
  private readonly onPageHide = () => this.leaveNow("page hidden");

  constructor(opts: HeadcountDeviceOptions) {
    if (!opts.servers?.length) throw new Error("no NATS WebSocket servers given");
    this.opts = opts;
    this.labels = { kind: "web", ...opts.labels };
    this.st = {
      phase: "idle",
      account: opts.account,
      device: opts.device,
      heartbeats: 0,
      refreshes: 0,
    };
  }

  /** The latest snapshot. */
  get state(): DeviceState {
    return { ...this.st };
  }

  /** The current session, once a token was obtained. */
  get session(): string | undefined {
    return this.token?.session;
  }

  /** Changes labels; the next heartbeat carries them. */
  setLabels(labels: DeviceLabels): void {
    Object.assign(this.labels, labels);
  }

  /**
   * Gets a token and connects. Resolves once the first connection is up and
   * the first heartbeat is sent; rejects when no token can be had or the
   * session ends before that. Reconnects on its own afterwards.
   */
  async start(): Promise<void> {
    if (this.alive) throw new Error("already started");
    this.alive = true;
    this.seq = 0;
    this.dialFailures = 0;
    this.token = undefined;
    this.set({
      phase: "starting",
      session: undefined,
      heartbeats: 0,
      refreshes: 0,
      lastHeartbeatAt: undefined,
      tokenExpiresAt: undefined,
      reason: undefined,
      control: undefined,
      server: undefined,
    });
    if (this.opts.leaveOnPageHide !== false && typeof window !== "undefined") {
      window.addEventListener("pagehide", this.onPageHide);
    }
    let token: DeviceToken;
    try {
      token = await this.opts.getToken();
    } catch (err) {
      this.finish("ended", `no token: ${(err as Error).message}`);
      throw err;
    }
    if (!this.alive) throw new Error("stopped before connecting");
    this.useToken(token);
    let firstUp!: () => void;
    let firstFail!: (e: Error) => void;
    const first = new Promise<void>((res, rej) => {
      firstUp = res;
      firstFail = rej;
    });
    void this.connectLoop(firstUp, firstFail);
    return first;
  }

  /**
   * Leaves: publishes `{leave: true}` and flushes it, posts the leave beacon,
   * closes the connection. Safe to call at any time, and more than once.
   */
  async stop(reason = "stopped"): Promise<void> {
    if (!this.alive) return;
    const nc = this.nc;
    const token = this.token;
    this.alive = false;
    this.clearTimers();
    this.sendLeaveBeacon(token);
    if (nc && !nc.isClosed()) {
      try {
        this.publishLeave(nc);
        await Promise.race([nc.flush(), sleep(1000)]);
      } catch {
        /* the beacon covers it */
      }
    }
    this.finish("stopped", reason);
  }

  /** Synchronous leave for `pagehide`: publish, beacon, close, no waiting. */
  leaveNow(reason = "left"): void {
    if (!this.alive) return;
    const nc = this.nc;
    const token = this.token;
    this.alive = false;
    this.clearTimers();
    if (nc && !nc.isClosed()) {
      try {
        this.publishLeave(nc);
        void nc.flush().catch(() => {});
      } catch {
        /* the beacon covers it */
      }
    }
    this.sendLeaveBeacon(token);
    this.finish("stopped", reason);
  }

  // --- internals -----------------------------------------------------------

  private set(patch: Partial<DeviceState>): void {
    this.st = { ...this.st, ...patch };
    try {
      this.opts.onState?.({ ...this.st });
    } catch (err) {
      console.error("headcount: onState threw", err);
    }
  }

  private useToken(token: DeviceToken): void {
    this.token = token;
    this.set({ session: token.session, tokenExpiresAt: token.expires_at });
    this.scheduleRefresh();
  }

  private async connectLoop(firstUp: () => void, firstFail: (e: Error) => void): Promise<void> {
    let everUp = false;
    let failures = 0;
    while (this.alive) {
      let nc: NatsConnection | undefined;
      try {
        nc = await wsconnect({
          servers: this.opts.servers,
          authenticator: tokenAuthenticator(() => this.token?.token ?? ""),
          name: `headcount-web ${this.opts.account}/${this.opts.device}`,
          maxReconnectAttempts: -1,
          reconnectDelayHandler: () => backoffMs(Math.max(0, this.dialFailures - 1)),
          timeout: 10_000,
          pingInterval: 15_000,
          maxPingOut: 2,
        });
      } catch (err) {
        this.set({ reason: `connect failed: ${(err as Error).message}` });
      }
      if (nc) {
        if (!this.alive) {
          await nc.close().catch(() => {});
          break;
        }
        failures = 0;
        this.nc = nc;
        this.watchStatus(nc);
        this.subscribeControl(nc);
        this.set({ phase: "connected", server: nc.getServer(), reason: undefined });
        this.startHeartbeats();
        if (!everUp) {
          everUp = true;
          firstUp();
        }
        const err = await nc.closed();
        if (this.nc === nc) this.nc = undefined;
        this.stopHeartbeats();
        if (!this.alive) break;
        // The client gave up reconnecting (e.g. the server refused the token twice).
        this.set({
          phase: "reconnecting",
          reason: err ? `connection closed: ${err.message}` : "connection closed",
        });
      } else if (this.alive) {
        this.set({ phase: everUp ? "reconnecting" : "starting" });
      }
      if (!this.alive) break;
      // Is the session still alive? A refresh answers that and gives a fresh token.
      // Another failure is network trouble: keep trying with the current token.
      if ((await this.refreshOrEnd()) === "ended") break;
      await sleep(backoffMs(failures++));
    }
    if (!everUp) firstFail(new Error(this.st.reason ?? "stopped before connecting"));
  }

  private async watchStatus(nc: NatsConnection): Promise<void> {
    for await (const s of nc.status()) {
      if (this.nc !== nc || !this.alive) continue;
      switch (s.type) {
        case "disconnect":
          this.set({ phase: "reconnecting" });
          break;
        case "reconnecting":
          this.dialFailures++;
          break;
        case "reconnect":
          this.dialFailures = 0;
          this.set({ phase: "connected", server: s.server, reason: undefined });
          this.beat(); // catch up at once after a gap
          break;
        case "error":
          this.set({ reason: s.error.message });
          break;
        default:
          break;
      }
    }
  }

  private subscribeControl(nc: NatsConnection): void {
    const subject = `ctl.${this.opts.account}.${this.opts.device}`;
    nc.subscribe(subject, {
      callback: (err, msg) => {
        if (err || !this.alive) return;
        let ctl: ControlMessage;
        try {
          ctl = decode(msg.data) as ControlMessage;
        } catch {
          return;
        }
        if (!ctl || typeof ctl !== "object" || ctl.session !== this.token?.session) return;
        this.onControlMessage(ctl);
      },
    });
  }

  private onControlMessage(ctl: ControlMessage): void {
    const reason =
      ctl.type === "device-limit-exceeded"
        ? ctl.by
          ? `device limit exceeded: ${ctl.by.device} took over`
          : "device limit exceeded"
        : ctl.type === "revoked"
          ? "revoked by an operator"
          : `ended: ${ctl.type}`;
    this.finish("ended", reason, ctl);
    try {
      this.opts.onControl?.(ctl);
    } catch (err) {
      console.error("headcount: onControl threw", err);
    }
  }

  private startHeartbeats(): void {
    this.stopHeartbeats();
    this.beat();
    this.hbTimer = setInterval(() => this.beat(), this.opts.heartbeatEveryMs ?? 5000);
  }

  private stopHeartbeats(): void {
    if (this.hbTimer !== undefined) clearInterval(this.hbTimer);
    this.hbTimer = undefined;
  }

  private subject(): string {
    return `hb.${this.opts.account}.${this.opts.device}.${this.token!.session}`;
  }

  private beat(): void {
    const nc = this.nc;
    if (!this.alive || !nc || nc.isClosed() || this.st.phase !== "connected" || !this.token) return;
    this.seq += 1;
    const hb = {
      seq: this.seq,
      content: this.labels.content || undefined,
      kind: this.labels.kind || undefined,
      region: this.labels.region || undefined,
    };
    try {
      nc.publish(this.subject(), encode(hb, { ignoreUndefined: true }));
      this.set({ heartbeats: this.st.heartbeats + 1, lastHeartbeatAt: Date.now() });
    } catch (err) {
      this.set({ reason: `heartbeat failed: ${(err as Error).message}` });
    }
  }

  private publishLeave(nc: NatsConnection): void {
    if (!this.token) return;
    this.seq += 1;
    nc.publish(this.subject(), encode({ leave: true, seq: this.seq }));
  }

  private sendLeaveBeacon(token?: DeviceToken): void {
    const url = this.opts.leaveUrl === undefined ? "/v1/sessions/leave" : this.opts.leaveUrl;
    if (!token || !url) return;
    const body = JSON.stringify({ token: token.token });
    try {
      if (typeof navigator !== "undefined" && navigator.sendBeacon?.(url, body)) return;
    } catch {
      /* fall through */
    }
    void fetch(url, { method: "POST", body, keepalive: true }).catch(() => {});
  }

  private scheduleRefresh(): void {
    if (this.refreshTimer !== undefined) clearTimeout(this.refreshTimer);
    if (!this.token || !this.alive) return;
    const left = this.token.expires_at - Date.now();
    const delay = Math.max(1000, left * (this.opts.refreshAt ?? 0.75));
    this.refreshTimer = setTimeout(() => void this.refreshAndReconnect(), delay);
  }

  /**
   * Refreshes the token; when the server says the session is over, ends it
   * here and resolves to "ended". Any other failure resolves to its error.
   */
  private async refreshOrEnd(): Promise<"refreshed" | "ended" | Error> {
    try {
      await this.refreshNow();
      return "refreshed";
    } catch (err) {
      if (!(err instanceof SessionEndedError)) return err as Error;
      this.finish("ended", `session over: ${err.message}`);
      return "ended";
    }
  }

  private async refreshNow(): Promise<void> {
    if (!this.token) return;
    const refresh =
      this.opts.refreshToken ?? ((t: DeviceToken) => refreshDeviceToken(t, "/v1/tokens/refresh"));
    const next = await refresh(this.token);
    if (!this.alive) return;
    if (next.session !== this.token.session) {
      console.warn(`headcount: refresh changed the session ${this.token.session} -> ${next.session}`);
    }
    this.st.refreshes += 1;
    this.useToken(next);
  }

  /** Refreshes the token, then reconnects so the server holds the new one. */
  private async refreshAndReconnect(): Promise<void> {
    this.refreshTimer = undefined;
    if (!this.alive) return;
    const outcome = await this.refreshOrEnd();
    if (outcome === "ended") return;
    if (outcome !== "refreshed") {
      this.set({ reason: `token refresh failed: ${outcome.message}` });
      // Retry soon, well before expiry if possible.
      const left = (this.token?.expires_at ?? 0) - Date.now();
      this.refreshTimer = setTimeout(
        () => void this.refreshAndReconnect(),
        Math.max(1000, Math.min(5000, left / 4)),
      );
      return;
    }
    const nc = this.nc;
    if (nc && !nc.isClosed() && this.st.phase === "connected") {
      await nc.reconnect().catch(() => {});
    }
  }

  private clearTimers(): void {
    this.stopHeartbeats();
    if (this.refreshTimer !== undefined) clearTimeout(this.refreshTimer);
    this.refreshTimer = undefined;
  }

  private finish(phase: "ended" | "stopped", reason: string, control?: ControlMessage): void {
    this.alive = false;
    this.clearTimers();
    if (typeof window !== "undefined") window.removeEventListener("pagehide", this.onPageHide);
    const nc = this.nc;
    this.nc = undefined;
    if (nc && !nc.isClosed()) void nc.close().catch(() => {});
    this.set({ phase, reason, control });
  }
}
