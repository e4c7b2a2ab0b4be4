// Makes the README screenshots docs/img/demo.png and docs/img/live.png
// (1280x800) against a fresh `headcount up`: `node tests/screenshots.mjs`
// (with nats-server on PATH and HEADCOUNT_BIN or ../target/debug/headcount).
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { launchBrowser, openDemo, play, repoDir, sleep, startHeadcount } from "./harness.mjs";

const outDir = process.env.SCREENSHOT_DIR || join(repoDir, "docs", "img");
const viewport = { width: 1280, height: 800 };

const fleet = [
  { account: "acme", device: "living-room", content: "ocean-live", region: "eu-west" },
  { account: "northwind", device: "laptop-anna", content: "evening-news", region: "us-east" },
  { account: "acme", device: "kitchen-tablet", content: "city-lights", region: "eu-west" },
  { account: "globex", device: "office-1", content: "mountain-trail", region: "ap-south" },
  { account: "northwind", device: "phone-ben", content: "city-lights", region: "us-west" },
  { account: "acme", device: "bedroom-tv", content: "mountain-trail", region: "eu-central" },
  { account: "globex", device: "office-2", content: "evening-news", region: "ap-south" },
  // acme is at its limit of 3 now: this one takes over the oldest seat.
  { account: "acme", device: "phone-carla", content: "evening-news", region: "eu-west" },
];

const hc = await startHeadcount({ tokenTtl: "15m" });
const browser = await launchBrowser();
const contexts = [];
try {
  await mkdir(outDir, { recursive: true });
  await hc.cli("limits", "set", "acme", "3");
  await hc.cli("limits", "set", "northwind", "2", "--policy", "reject-new");
  await hc.cli("limits", "set", "globex", "5", "--policy", "evict-least-active");

  const liveCtx = await browser.newContext({ viewport });
  contexts.push(liveCtx);
  const live = await liveCtx.newPage();
  await live.goto(`${hc.httpUrl}/live/#key=${hc.up.operator_key}&account=acme`);
  await live.waitForSelector("[data-testid=connection]:text('live')", { timeout: 15_000 });
  await sleep(4000);

  let demoPage;
  for (const d of fleet) {
    const { context, page } = await openDemo(browser, hc.httpUrl, d);
    contexts.push(context);
    await play(page);
    if (d.device === "bedroom-tv") demoPage = page;
    await sleep(3000);
  }
  await sleep(6000);
  await live.mouse.move(0, 0);
  await live.screenshot({ path: join(outDir, "live.png") });

  await demoPage.setViewportSize(viewport);
  await sleep(2500);
  await demoPage.screenshot({ path: join(outDir, "demo.png") });
  console.log(`wrote ${join(outDir, "live.png")} and ${join(outDir, "demo.png")}`);
} finally {
  for (const c of contexts) await c.close().catch(() => {});
  await browser.close().catch(() => {});
  await hc.stop();
}
