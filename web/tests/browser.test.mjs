// Browser tests against a real `headcount up`: demo pages as devices, the
// live operator page, the CLI for setup and checks.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { join } from "node:path";
import {
  ensureArtifacts,
  launchBrowser,
  openDemo,
  play,
  sleep,
  startHeadcount,
  until,
} from "./harness.mjs";

let hc;
let browser;
let shots;

const shot = (page, name) => page.screenshot({ path: join(shots, `${name}.png`) });
const sessionsOf = async (account) => (await hc.active(account)).sessions.map((s) => s.session);

describe("headcount in the browser", { timeout: 240_000 }, () => {
  before(async () => {
    shots = await ensureArtifacts();
    hc = await startHeadcount({ tokenTtl: "12s" });
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close().catch(() => {});
    await hc?.stop();
  });

  test("a: with limit 1 the newer device takes over and the older one is told", async () => {
    await hc.cli("limits", "set", "acct-a", "1");
    const a = await openDemo(browser, hc.httpUrl, { account: "acct-a", device: "tab-a" });
    const b = await openDemo(browser, hc.httpUrl, { account: "acct-a", device: "tab-b", content: "city-lights" });
    try {
      const sa = await play(a.page);
      await until(async () => (await sessionsOf("acct-a")).includes(sa), { what: "A in active" });
      await shot(a.page, "a-1-playing");

      const sb = await play(b.page);
      const toast = a.page.getByTestId("toast");
      await toast.waitFor({ state: "visible", timeout: 5000 });
      const toastAt = Date.now();
      assert.match(await toast.textContent(), /Device Limit Exceeded — tab-b took over/);
      assert.equal(await a.page.getAttribute("[data-testid=status]", "data-phase"), "ended");
      await shot(a.page, "a-2-toast");
      await shot(b.page, "a-3-newcomer-playing");

      // A goes back to its start state after a few seconds.
      await a.page.waitForSelector("[data-testid=status][data-phase=idle]", { timeout: 10_000 });
      const back = Date.now() - toastAt;
      assert.ok(back >= 3000 && back <= 8000, `returned to start after ${back} ms`);
      assert.equal(await a.page.isEnabled("[data-testid=play]"), true);
      await toast.waitFor({ state: "hidden", timeout: 1000 }); // after its fade-out
      await shot(a.page, "a-4-back-to-start");

      const act = await hc.active("acct-a");
      assert.deepEqual(act.sessions.map((s) => s.session), [sb]);
      assert.equal(act.sessions[0].device, "tab-b");
      assert.equal(act.sessions[0].kind, "web");
      assert.equal(act.sessions[0].content, "city-lights");
      assert.equal(act.limit, 1);
      // B keeps playing.
      assert.equal(await b.page.getAttribute("[data-testid=status]", "data-phase"), "connected");
    } finally {
      await a.context.close();
      await b.context.close();
    }
  });

  test("b: closing the tab frees its seat within 1 s", async () => {
    const d = await openDemo(browser, hc.httpUrl, { account: "acct-b", device: "closing-tab" });
    try {
      const sid = await play(d.page);
      await until(async () => (await sessionsOf("acct-b")).includes(sid), { what: "session in active" });
      await shot(d.page, "b-1-before-close");
      const t0 = Date.now();
      await d.page.close();
      await until(async () => !(await sessionsOf("acct-b")).includes(sid), {
        timeoutMs: 5000,
        everyMs: 25,
        what: "the closed tab's session to leave",
      });
      const freed = Date.now() - t0;
      console.log(`# seat freed ${freed} ms after page.close()`);
      assert.ok(freed < 1000, `seat freed after ${freed} ms`);
    } finally {
      await d.context.close();
    }
  });

  test("c: the live page follows sessions, kicks and sets limits", async () => {
    const account = "acct-c";
    const liveCtx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const live = await liveCtx.newPage();
    const errors = [];
    live.on("pageerror", (e) => errors.push(e.message));
    await live.goto(`${hc.httpUrl}/live/#key=${hc.up.operator_key}&account=${account}`);
    await live.waitForSelector("[data-testid=connection]:text('live')", { timeout: 10_000 });
    assert.equal(await live.getByTestId("detail-account").textContent(), account);
    // The key leaves the address bar.
    assert.ok(!live.url().includes("key="), live.url());

    const d = await openDemo(browser, hc.httpUrl, { account, device: "living-room", region: "us-east" });
    try {
      // Appears without a reload.
      const s1 = await play(d.page);
      const row1 = live.locator(`[data-testid=session-row][data-session="${s1}"]`);
      const t1 = Date.now();
      await row1.waitFor({ timeout: 5000 });
      console.log(`# live page showed the session ${Date.now() - t1} ms after Play connected`);
      assert.match(await row1.textContent(), /living-room/);
      assert.match(await row1.textContent(), /us-east/);
      await live.locator(`[data-testid=event][data-type=join][data-session="${s1}"]`).waitFor({ timeout: 5000 });
      await shot(live, "c-1-live-session");

      // Disappears when it stops.
      await d.page.click("[data-testid=stop]");
      await row1.waitFor({ state: "detached", timeout: 5000 });
      await live.locator(`[data-testid=event][data-type=leave][data-session="${s1}"]`).waitFor({ timeout: 5000 });
      assert.equal(await live.getByTestId("detail-active").textContent(), "0");

      // Kick from the live page: the player is told it was signed out.
      const s2 = await play(d.page);
      const row2 = live.locator(`[data-testid=session-row][data-session="${s2}"]`);
      await row2.waitFor({ timeout: 5000 });
      await row2.getByTestId("kick").click();
      const toast = d.page.getByTestId("toast");
      await toast.waitFor({ state: "visible", timeout: 5000 });
      assert.match(await toast.textContent(), /Signed out by an operator/);
      await shot(d.page, "c-2-demo-kicked");
      await row2.waitFor({ state: "detached", timeout: 5000 });
      await live.locator(`[data-testid=event][data-type=revoked][data-session="${s2}"]`).waitFor({ timeout: 5000 });
      assert.ok(!(await sessionsOf(account)).includes(s2));

      // Set a limit and policy from the live page.
      await live.getByTestId("limit-input").fill("2");
      await live.getByTestId("policy-select").selectOption("reject-new");
      await live.getByTestId("limit-apply").click();
      await until(
        async () => {
          const l = JSON.parse(await hc.cli("limits", "get", account, "--json"));
          return l.limit === 2 && l.policy === "reject-new";
        },
        { timeoutMs: 5000, what: "limits get to show 2 / reject-new" },
      );
      const act = await hc.active(account);
      assert.equal(act.limit, 2);
      assert.equal(act.policy, "reject-new");
      await live.waitForSelector("[data-testid=detail-policy]:text('reject-new')", { timeout: 5000 });
      assert.equal(await live.getByTestId("detail-limit").textContent(), "2");
      await shot(live, "c-3-live-limit-set");
      assert.deepEqual(errors, []);
    } finally {
      await d.context.close();
      await liveCtx.close();
    }
  });

  test("d: the token is refreshed and the session lives on past its first expiry", async () => {
    const d = await openDemo(browser, hc.httpUrl, { account: "acct-d", device: "long-player" });
    try {
      const sid = await play(d.page);
      // The first token was issued before Play connected: it expires by then + 12 s.
      const ttlEnd = Date.now() + 12_000;
      const t0 = Date.now();
      let checks = 0;
      while (Date.now() - t0 < 20_000) {
        await sleep(2000);
        const act = await hc.active("acct-d");
        assert.deepEqual(act.sessions.map((s) => s.session), [sid], `at ${Date.now() - t0} ms`);
        checks++;
      }
      assert.ok(Date.now() > ttlEnd + 5000);
      const act = await hc.active("acct-d");
      const s = act.sessions[0];
      assert.equal(s.session, sid);
      // Still heartbeating well after the first token would have run out.
      assert.ok(s.last_seen > ttlEnd, `last_seen ${s.last_seen} after first expiry ${ttlEnd}`);
      assert.equal(await d.page.getAttribute("[data-testid=status]", "data-phase"), "connected");
      assert.equal((await d.page.textContent("[data-testid=status-session]")).trim(), sid);
      const beats = Number(await d.page.textContent("[data-testid=status-heartbeats]"));
      assert.ok(beats >= 4, `${beats} heartbeats`);
      const token = await d.page.textContent("#st-token");
      const renewed = Number(/renewed (\d+)/.exec(token)?.[1] ?? 0);
      assert.ok(renewed >= 1, `token line: ${token}`);
      console.log(`# one session for ${Date.now() - t0} ms, ${checks} checks, ${beats} heartbeats, ${renewed} refreshes`);
      await shot(d.page, "d-1-after-refresh");
    } finally {
      await d.context.close();
    }
  });
});
