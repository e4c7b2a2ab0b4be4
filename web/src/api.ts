/** Same-origin HTTP helpers for the token-vendor API used by the pages. */
import { errorMessage } from "./client";

/** `GET /v1/client-config`. */
export interface ClientConfig {
  /** NATS WebSocket URLs. */
  websocket: string[];
  /** Whether `POST /v1/demo/tokens` is enabled. */
  demo_tokens: boolean;
  /** How often a device should heartbeat. */
  heartbeat_every_ms: number;
}

/** An HTTP error carrying the status and the server's `{"error"}` text. */
export class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
    this.name = "HttpError";
  }
}

export async function getClientConfig(): Promise<ClientConfig> {
  const res = await fetch("/v1/client-config", { cache: "no-store" });
  if (!res.ok) throw new HttpError(res.status, await errorMessage(res));
  const cfg = (await res.json()) as ClientConfig;
  return {
    websocket: Array.isArray(cfg.websocket) ? cfg.websocket : [],
    demo_tokens: cfg.demo_tokens === true,
    heartbeat_every_ms: cfg.heartbeat_every_ms > 0 ? cfg.heartbeat_every_ms : 5000,
  };
}

/** POSTs JSON (or nothing) and returns the JSON answer; throws `HttpError` otherwise. */
export async function postJson<T>(url: string, body?: unknown, bearer?: string): Promise<T> {
  const headers: Record<string, string> = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  const res = await fetch(url, {
    method: "POST",
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!res.ok) throw new HttpError(res.status, await errorMessage(res));
  return (await res.json()) as T;
}

/** Names of accounts and devices: 1 to 64 of A-Z a-z 0-9 _ -. */
export const NAME_RE = /^[A-Za-z0-9_-]{1,64}$/;

export function $(id: string): HTMLElement {
  const el = document.getElementById(id);
  if (!el) throw new Error(`#${id} missing`);
  return el;
}
