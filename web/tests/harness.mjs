// Starts a real `headcount up` (with nats-server) and a headless Chromium for
// the browser tests and the screenshot script.
import { execFile, spawn, spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { chromium } from "playwright-core";

const execFileP = promisify(execFile);

export const webDir = resolve(dirname(fileURLToPath(import.meta.url)), "..");
export const repoDir = resolve(webDir, "..");
export const distDir = join(webDir, "dist");
export const artifactsDir = join(webDir, "test-artifacts");

export const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A port the OS says is free right now. */
export function freePort() {
  return new Promise((res, rej) => {
    const srv = createServer();
    srv.unref();
    srv.on("error", rej);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => res(port));
    });
  });
}

async function distinctFreePorts(n) {
  const ports = new Set();
  while (ports.size < n) ports.add(await freePort());
  return [...ports];
}

export function headcountBin() {
  return resolve(webDir, process.env.HEADCOUNT_BIN || "../target/debug/headcount");
}

function preflight() {
  const probe = spawnSync("nats-server", ["--version"], { encoding: "utf8" });
  if (probe.error) {
    throw new Error(
      "nats-server was not found on PATH; put the directory holding nats-server on PATH " +
        "(e.g. PATH=$PWD/../.tools/venv/bin:$PATH npm test)",
    );
  }
  const bin = headcountBin();
  if (!existsSync(bin)) {
    throw new Error(`headcount binary not found at ${bin}: build it or set HEADCOUNT_BIN`);
  }
  if (!existsSync(join(distDir, "demo", "index.html"))) {
    const built = spawnSync(process.execPath, [join(webDir, "build.mjs")], { stdio: "inherit" });
    if (built.status !== 0) throw new Error("building web/dist failed (npm run build)");
  }
  return bin;
}

const stripAnsi = (s) => s.replace(/\x1b\[[0-9;]*m/g, "");

/**
 * Starts `headcount up` on free ports in a fresh data dir and waits for it.
 * Returns { up, dataDir, httpUrl, cli, active, stop, log }.
 */
export async function startHeadcount({ tokenTtl = "12s", extraArgs = [] } = {}) {
  const bin = preflight();
  const dataDir = await mkdtemp(join(tmpdir(), "headcount-web-"));
  const [natsPort, httpPort, metricsPort, wsPort] = await distinctFreePorts(4);
  const args = [
    "up",
    "--data-dir", dataDir,
    "--nats-port", String(natsPort),
    "--http-port", String(httpPort),
    "--metrics-port", String(metricsPort),
    "--ws-port", String(wsPort),
    "--demo-tokens",
    "--token-ttl", tokenTtl,
    "--web-dir", distDir,
    ...extraArgs,
  ];
  const proc = spawn(bin, args, { cwd: repoDir, stdio: ["ignore", "pipe", "pipe"] });
  const log = [];
  let exited = null;
  proc.on("exit", (code, signal) => (exited = { code, signal }));
  const lines = (stream, name) => {
    let buf = "";
    stream.setEncoding("utf8");
    stream.on("data", (chunk) => {
      buf += chunk;
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = stripAnsi(buf.slice(0, i));
        buf = buf.slice(i + 1);
        log.push(`[${name}] ${line}`);
        if (log.length > 2000) log.shift();
        proc.emit("line", name, line);
      }
    });
  };
  lines(proc.stdout, "out");
  lines(proc.stderr, "err");

  const stop = async () => {
    if (exited === null) {
      proc.kill("SIGTERM");
      const t0 = Date.now();
      while (exited === null && Date.now() - t0 < 15_000) await sleep(50);
      if (exited === null) proc.kill("SIGKILL");
    }
    await rm(dataDir, { recursive: true, force: true });
  };

  try {
    await new Promise((res, rej) => {
      const timer = setTimeout(() => rej(new Error("headcount up: no `ready` line within 60 s")), 60_000);
      proc.on("line", async (name, line) => {
        if (name !== "out" || !/\bready\b/.test(line)) return;
        // Only the final line counts: up.json is written just before it.
        if (!existsSync(join(dataDir, "up.json"))) return;
        clearTimeout(timer);
        res();
      });
      proc.on("exit", (code, signal) => {
        clearTimeout(timer);
        rej(new Error(`headcount up exited early (code ${code}, signal ${signal})`));
      });
    });
  } catch (err) {
    await stop();
    err.message += `\n--- headcount output ---\n${log.slice(-40).join("\n")}`;
    throw err;
  }
  const up = JSON.parse(await readFile(join(dataDir, "up.json"), "utf8"));

  /** Runs a headcount CLI command against this instance; returns stdout. */
  const cli = async (...cmd) => {
    const { stdout } = await execFileP(bin, [...cmd, "--data-dir", dataDir], {
      cwd: repoDir,
      timeout: 15_000,
    });
    return stdout;
  };
  /** `headcount active <account> --json`, parsed. */
  const active = async (account) => JSON.parse(await cli("active", account, "--json"));

  return { up, dataDir, httpUrl: up.http_url, proc, cli, active, stop, log };
}

export async function launchBrowser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: CHROMIUM_ARGS,
  });
}

export async function ensureArtifacts() {
  await mkdir(artifactsDir, { recursive: true });
  return artifactsDir;
}

/** Polls `fn` every `everyMs` until it returns a truthy value or `timeoutMs` passes. */
export async function until(fn, { timeoutMs = 10_000, everyMs = 100, what = "condition" } = {}) {
  const t0 = Date.now();
  let last;
  for (;;) {
    last = await fn();
    if (last) return last;
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(everyMs);
  }
}

/** Opens the demo page for (account, device) in its own browser context. */
export async function openDemo(browser, httpUrl, { account, device, content, region } = {}) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  const q = new URLSearchParams();
  if (account) q.set("account", account);
  if (device) q.set("device", device);
  if (content) q.set("content", content);
  if (region) q.set("region", region);
  await page.goto(`${httpUrl}/demo/?${q}`);
  await page.waitForFunction(() => !document.querySelector("[data-testid=play]").disabled, null, {
    timeout: 10_000,
  });
  return { context, page };
}

/** Clicks Play and waits until the page heartbeats; returns the session id. */
export async function play(page) {
  await page.click("[data-testid=play]");
  await page.waitForSelector("[data-testid=status][data-phase=connected]", { timeout: 15_000 });
  return (await page.textContent("[data-testid=status-session]")).trim();
}
