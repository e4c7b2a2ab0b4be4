//! Faults on real processes: a three-node NATS cluster (`deploy/cluster/`),
//! and the `headcount` binary's handler and checker as child processes that
//! are killed with SIGKILL and started again.
//!
//! Each test keeps a fleet heartbeating (core NATS publishes through the
//! service user, as a load generator would) and watches presence events and
//! control messages, so a false eviction or a lost session shows up.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use headcount_protocol::AccountId;
use headcount_protocol::subjects;
use headcount_protocol::wire::{EventType, Heartbeat, PresenceEvent};
use test_support::{NatsCluster, NatsServer, free_port};
use tokio::sync::Mutex;

const TIMEOUT: &str = "6s";

/// The headcount binary as a child process, its log in a file.
struct Service {
    args: Vec<String>,
    child: Option<Child>,
    log: PathBuf,
    metrics_port: u16,
    _dir: tempfile::TempDir,
}

impl Service {
    fn start(kind: &str, urls: &[String], password: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let metrics_port = free_port();
        let mut args: Vec<String> = vec![
            kind.into(),
            "--nats-url".into(),
            urls.join(","),
            "--nats-user".into(),
            "headcount".into(),
            "--interval".into(),
            "10s".into(),
            "--timeout".into(),
            TIMEOUT.into(),
        ];
        if kind == "up" {
            // Everything in one process, on the servers given.
            args.extend([
                "--metrics-port".into(),
                metrics_port.to_string(),
                "--http-port".into(),
                free_port().to_string(),
                "--data-dir".into(),
                dir.path().join("data").display().to_string(),
            ]);
        } else {
            args.extend(["--metrics-addr".into(), format!("127.0.0.1:{metrics_port}")]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut s = Self {
            args,
            child: None,
            log: dir.path().join(format!("{kind}.log")),
            metrics_port,
            _dir: dir,
        };
        s.spawn(password);
        s
    }

    fn spawn(&mut self, password: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_headcount"))
            .args(&self.args)
            .env("HEADCOUNT_NATS_PASSWORD", password)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("headcount binary starts");
        self.child = Some(child);
    }

    /// SIGKILL: no drain, no flush.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        Some(test_support::metric_value(&text, name))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
        // A failed test shows what the service said.
        if std::thread::panicking() {
            eprintln!("---- {} log ----\n{}", self.args[0], self.log());
        }
    }
}

/// Devices that keep heartbeating every 500 ms until told to stop; an
/// account can be silenced on its own.
struct Fleet {
    stop: Arc<AtomicBool>,
    silenced: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Fleet {
    fn start(client: async_nats::Client, accounts: &[String], devices: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let silenced = Arc::new(Mutex::new(Vec::<String>::new()));
        let subjects: Vec<(String, String)> = accounts
            .iter()
            .flat_map(|a| {
                (0..devices).map(move |d| {
                    let subject = format!("hb.{a}.tv-{d}.{a}-s{d}");
                    (a.clone(), subject)
                })
            })
            .collect();
        let task = {
            let (stop, silenced) = (stop.clone(), silenced.clone());
            tokio::spawn(async move {
                let payload: Bytes = Heartbeat {
                    content: Some("movie-1".into()),
                    ..Default::default()
                }
                .encode()
                .into();
                while !stop.load(Ordering::Relaxed) {
                    let quiet = silenced.lock().await.clone();
                    for (account, subject) in &subjects {
                        if !quiet.contains(account) {
                            // Publishing is buffered across reconnects.
                            let _ = client.publish(subject.clone(), payload.clone()).await;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            })
        };
        Self {
            stop,
            silenced,
            task,
        }
    }

    async fn silence(&self, account: &str) {
        self.silenced.lock().await.push(account.to_string());
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
    }
}

/// Collects presence events and control messages from the start.
struct Watcher {
    events: Arc<Mutex<Vec<PresenceEvent>>>,
    controls: Arc<Mutex<Vec<String>>>,
}

impl Watcher {
    async fn start(client: &async_nats::Client) -> Self {
        let events = Arc::new(Mutex::new(Vec::new()));
        let controls = Arc::new(Mutex::new(Vec::new()));
        let mut ev = client
            .subscribe(subjects::EVENTS_WILDCARD)
            .await
            .expect("events subscription");
        let mut ctl = client.subscribe("ctl.>").await.expect("ctl subscription");
        client.flush().await.expect("flush");
        {
            let events = events.clone();
            tokio::spawn(async move {
                while let Some(m) = ev.next().await {
                    if let Ok(e) = serde_json::from_slice::<PresenceEvent>(&m.payload) {
                        events.lock().await.push(e);
                    }
                }
            });
        }
        {
            let controls = controls.clone();
            tokio::spawn(async move {
                while let Some(m) = ctl.next().await {
                    controls.lock().await.push(m.subject.to_string());
                }
            });
        }
        Self { events, controls }
    }

    async fn ended(&self, kind: EventType) -> Vec<PresenceEvent> {
        self.events
            .lock()
            .await
            .iter()
            .filter(|e| e.kind == kind)
            .cloned()
            .collect()
    }

    /// No session joined twice or left: those that joined, joined before
    /// the watcher started.
    async fn assert_no_joins_or_leaves(&self) {
        let events = self.events.lock().await.clone();
        assert!(
            events
                .iter()
                .all(|e| !matches!(e.kind, EventType::Join | EventType::Leave)),
            "{events:?}"
        );
    }

    async fn assert_no_false_ends(&self) {
        let evicted = self.ended(EventType::Evicted).await;
        let rejected = self.ended(EventType::Rejected).await;
        let timeouts = self.ended(EventType::Timeout).await;
        let controls = self.controls.lock().await.clone();
        assert!(
            evicted.is_empty() && rejected.is_empty() && timeouts.is_empty() && controls.is_empty(),
            "sessions that kept heartbeating were ended: evicted {evicted:?}, rejected \
             {rejected:?}, timed out {timeouts:?}, control messages {controls:?}"
        );
    }
}

async fn active(client: &async_nats::Client, account: &str) -> Option<u32> {
    let account = AccountId::parse(account).ok()?;
    headcount_client::Client::new(client.clone())
        .with_timeout(Duration::from_secs(1))
        .active(&account)
        .await
        .ok()
        .map(|r| r.active)
}

/// Polls until every account shows `want` active sessions.
async fn until_all_active(
    client: &async_nats::Client,
    accounts: &[String],
    want: u32,
    within: Duration,
) -> HashMap<String, Option<u32>> {
    poll_until(within, async || {
        let mut seen = HashMap::new();
        for a in accounts {
            seen.insert(a.clone(), active(client, a).await);
        }
        if seen.values().all(|n| *n == Some(want)) {
            Ok(seen)
        } else {
            Err(format!(
                "accounts did not all show {want} active sessions: {seen:?}"
            ))
        }
    })
    .await
}

/// Asks `look` every 200 ms until it has what it waits for (`Ok`), for up
/// to `within`; then fails with what it last saw (`Err`).
async fn poll_until<T>(within: Duration, mut look: impl AsyncFnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + within;
    loop {
        match look().await {
            Ok(t) => return t,
            Err(seen) => assert!(Instant::now() < deadline, "{seen}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How long the waits on partitions moving between instances allow.
const SETTLE: Duration = Duration::from_secs(40);

fn accounts(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

struct Setup {
    cluster: NatsCluster,
    handler: Service,
    checker: Service,
    client: async_nats::Client,
}

async fn setup() -> Setup {
    let cluster = NatsCluster::start().await;
    let urls = cluster.urls();
    let pw = cluster.service_password.clone();
    let handler = Service::start("handler", &urls, &pw, &["--replicas", "3"]);
    let checker = Service::start(
        "checker",
        &urls,
        &pw,
        &["--replicas", "3", "--default-limit", "3"],
    );
    let client = cluster.service_client("fault-test").await;
    // Ready when the checker answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    while active(&client, "probe").await.is_none() {
        assert!(
            Instant::now() < deadline,
            "checker did not answer; handler log:\n{}\nchecker log:\n{}",
            handler.log(),
            checker.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Setup {
        cluster,
        handler,
        checker,
        client,
    }
}

/// [`setup`] under load: `n` accounts named after `prefix`, each with three
/// devices heartbeating and counted, and a [`Watcher`] started once they
/// are.
async fn loaded(prefix: &str, n: usize) -> (Setup, Vec<String>, Fleet, Watcher) {
    let s = setup().await;
    let accts = accounts(prefix, n);
    let fleet = Fleet::start(s.cluster.service_client("fleet").await, &accts, 3);
    until_all_active(&s.client, &accts, 3, Duration::from_secs(30)).await;
    let watcher = Watcher::start(&s.client).await;
    (s, accts, fleet, watcher)
}

/// A fleet of `devices` devices in `account`, started now, once all of
/// them are counted (which may take up to `within`).
async fn fleet_joining(s: &Setup, account: &str, devices: usize, within: Duration) -> Fleet {
    let accts = [account.to_string()];
    let fleet = Fleet::start(s.cluster.service_client("late").await, &accts, devices);
    until_all_active(&s.client, &accts, devices as u32, within).await;
    fleet
}

/// Kill the node leading the sessions bucket while three devices per account
/// (the limit) keep heartbeating: `active` answers through the election, a
/// session that joins afterwards is recorded, and after the node is back every
/// session is counted and none was ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_nats_node_loses_no_session() {
    let (mut s, accts, fleet, watcher) = loaded("node", 5).await;

    let leader = s
        .cluster
        .leader_of(&s.client, "KV_headcount-sessions")
        .await
        .expect("the sessions bucket has a leader");
    s.cluster.kill(&leader);
    let killed_at = Instant::now();

    // `active` keeps answering: the view is in the checker's memory; the
    // clients of the dead node reconnect to the others.
    let mut answered_after_kill = None;
    while answered_after_kill.is_none() && killed_at.elapsed() < Duration::from_secs(15) {
        if active(&s.client, &accts[0]).await == Some(3) {
            answered_after_kill = Some(killed_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let answered = answered_after_kill.expect("active answered after the node died");
    assert!(
        answered < Duration::from_secs(12),
        "active answered only after {answered:?}"
    );

    // A session that joins now is written to the bucket's new leader. The
    // checker sees it once its KV watch runs again, which after losing the
    // leader can take a few election rounds: up to a minute is allowed.
    let late_fleet = fleet_joining(&s, "node-late", 1, Duration::from_secs(60)).await;

    s.cluster.restart(&leader).await;
    until_all_active(&s.client, &accts, 3, Duration::from_secs(30)).await;
    // Twice the timeout with everything back: still all there.
    tokio::time::sleep(Duration::from_secs(12)).await;
    until_all_active(&s.client, &accts, 3, Duration::from_secs(5)).await;
    watcher.assert_no_false_ends().await;
    assert!(s.handler.is_running() && s.checker.is_running());
    fleet.stop().await;
    late_fleet.stop().await;
}

/// SIGKILL the handler and the checker under load, start them again: every
/// session is counted again, none was ended, and a new session after the
/// restart is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_handler_and_checker_loses_no_session() {
    let (mut s, accts, fleet, watcher) = loaded("svc", 5).await;
    let pw = s.cluster.service_password.clone();

    s.handler.kill();
    s.checker.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.handler.spawn(&pw);
    s.checker.spawn(&pw);

    until_all_active(&s.client, &accts, 3, Duration::from_secs(30)).await;
    let late_fleet = fleet_joining(&s, "svc-late", 2, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    until_all_active(&s.client, &accts, 3, Duration::from_secs(5)).await;
    watcher.assert_no_false_ends().await;
    fleet.stop().await;
    late_fleet.stop().await;
}

/// Partitions change hands under load: a second and a third handler join
/// (each takes its share over from the first), then one of them is killed
/// (the others take its partitions). Every session stays counted, each is
/// held by one handler at a time, and no session is ended, joined again or
/// left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_change_hands_without_losing_or_repeating_a_session() {
    let (s, accts, fleet, watcher) = loaded("part", 12).await;
    let pw = s.cluster.service_password.clone();
    let urls = s.cluster.urls();
    let total = (accts.len() * 3) as f64;
    let partitions = f64::from(headcount_protocol::partition::PARTITIONS);

    let mut handlers = vec![s.handler];
    for _ in 0..2 {
        handlers.push(Service::start("handler", &urls, &pw, &["--replicas", "3"]));
    }
    // Three handlers: every partition served once, each handler its share.
    let shares = until_divided(&handlers, 3, partitions, total).await;
    assert!(shares.iter().all(|&(p, _)| p <= 11.0), "{shares:?}");
    until_all_active(&s.client, &accts, 3, Duration::from_secs(5)).await;

    // Kill one: the two left take its partitions over.
    handlers[1].kill();
    let handlers = [handlers.remove(0), handlers.remove(1)];
    until_divided(&handlers, 2, partitions, total).await;
    // Past the timeout (6 s): nobody was missed for long enough to time out.
    tokio::time::sleep(Duration::from_secs(7)).await;
    until_all_active(&s.client, &accts, 3, Duration::from_secs(5)).await;
    watcher.assert_no_false_ends().await;
    watcher.assert_no_joins_or_leaves().await;
    fleet.stop().await;
    drop(s.checker);
}

/// `headcount up` runs a handler and a checker in one process: the
/// checker hears the partitions that handler serves from it, with no
/// subscription of its own. A second handler joining takes half of them
/// over (the checker subscribes to those itself before the handler of `up`
/// lets them go); killed, its partitions come back to `up`'s handler and
/// are fed again. Past the timeout each time, every session stays counted
/// and none is ended, joined again or left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checker_fed_by_the_handler_in_its_process_keeps_hearing_as_partitions_move() {
    let cluster = NatsCluster::start().await;
    let (urls, pw) = (cluster.urls(), cluster.service_password.clone());
    let up = Service::start("up", &urls, &pw, &["--replicas", "3"]);
    let client = cluster.service_client("fault-test").await;
    let accts = accounts("fed", 12);
    let fleet = Fleet::start(cluster.service_client("fleet").await, &accts, 3);
    until_all_active(&client, &accts, 3, Duration::from_secs(60)).await;
    let watcher = Watcher::start(&client).await;
    let total = (accts.len() * 3) as f64;
    let partitions = f64::from(headcount_protocol::partition::PARTITIONS);
    // Every partition is fed by the handler next to the checker.
    until_relayed(&up, partitions).await;
    let heard = up.metric("headcount_checker_heartbeats_total").await;

    let services = [
        up,
        Service::start("handler", &urls, &pw, &["--replicas", "3"]),
    ];
    let shares = until_divided(&services, 2, partitions, total).await;
    let [up, mut other] = services;
    // Fed now: the partitions up's handler kept.
    let kept = shares[0].0;
    assert!(
        kept < partitions,
        "up's handler kept every partition: {shares:?}"
    );
    until_relayed(&up, kept).await;
    // Past the timeout: the partitions the other handler took are heard
    // through the checker's own subscriptions.
    tokio::time::sleep(Duration::from_secs(7)).await;
    until_all_active(&client, &accts, 3, Duration::from_secs(5)).await;

    other.kill();
    until_relayed(&up, partitions).await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    until_all_active(&client, &accts, 3, Duration::from_secs(5)).await;
    let heard_since = up
        .metric("headcount_checker_heartbeats_total")
        .await
        .unwrap_or(0.0)
        - heard.unwrap_or(0.0);
    // 36 devices beating twice a second for over 14 s: each beat is heard
    // once, or twice around a change of source.
    assert!(heard_since >= 36.0 * 2.0 * 14.0, "heard {heard_since}");
    let overflow = up.metric("headcount_checker_relay_overflow_total").await;
    assert_eq!(overflow, Some(0.0), "heartbeats the relay could not queue");
    watcher.assert_no_false_ends().await;
    watcher.assert_no_joins_or_leaves().await;
    fleet.stop().await;
}

/// Waits until the checker of `up` is fed `want` partitions by the handler
/// next to it.
async fn until_relayed(up: &Service, want: f64) {
    poll_until(SETTLE, async || {
        let fed = up
            .metric("headcount_checker_partitions_relayed")
            .await
            .unwrap_or(0.0);
        if fed == want {
            Ok(())
        } else {
            Err(format!("the checker was fed {fed} partitions, not {want}"))
        }
    })
    .await
}

/// Three checkers hold each partition twice between them; one is killed
/// (SIGKILL) while requests keep coming: every account stays answered, and
/// right, by whichever checker receives the request, the two left take the
/// dead one's partitions over, and no session is ended or announced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_checker_leaves_every_account_answered() {
    let (s, accts, fleet, watcher) = loaded("chk", 12).await;
    let pw = s.cluster.service_password.clone();
    let urls = s.cluster.urls();
    let partitions = f64::from(headcount_protocol::partition::PARTITIONS);
    let mut checkers = vec![s.checker];
    for _ in 0..2 {
        checkers.push(Service::start("checker", &urls, &pw, &["--replicas", "3"]));
    }
    let held = until_checkers_hold(&checkers, 2.0 * partitions).await;
    assert!(held.iter().all(|&p| p < partitions), "{held:?}");
    until_all_active(&s.client, &accts, 3, Duration::from_secs(10)).await;

    checkers[1].kill();
    let killed = Instant::now();
    let checkers = [checkers.remove(0), checkers.remove(1)];
    // Every partition keeps a live holder: answers stay right throughout
    // (a request the dead checker had taken is asked again, as a client
    // does after a timeout).
    while killed.elapsed() < Duration::from_secs(8) {
        until_all_active(&s.client, &accts, 3, Duration::from_secs(3)).await;
    }
    // The two left hold every partition again, each of them both copies.
    until_checkers_hold(&checkers, 2.0 * partitions).await;
    until_all_active(&s.client, &accts, 3, Duration::from_secs(5)).await;
    watcher.assert_no_false_ends().await;
    watcher.assert_no_joins_or_leaves().await;
    fleet.stop().await;
    drop(s.handler);
}

/// Waits until the checkers serve `copies` partitions in all: the
/// partitions each serves.
async fn until_checkers_hold(checkers: &[Service], copies: f64) -> Vec<f64> {
    poll_until(SETTLE, async || {
        let mut held = Vec::new();
        for c in checkers {
            held.push(
                c.metric("headcount_checker_partitions")
                    .await
                    .unwrap_or(0.0),
            );
        }
        if held.iter().sum::<f64>() == copies && held.iter().all(|&p| p > 0.0) {
            Ok(held)
        } else {
            Err(format!(
                "the checkers did not hold {copies} partitions: {held:?}"
            ))
        }
    })
    .await
}

/// Waits until the `n` handlers serve every partition once between them
/// and hold every session once: (partitions, sessions) of each.
async fn until_divided(
    handlers: &[Service],
    n: usize,
    partitions: f64,
    sessions: f64,
) -> Vec<(f64, f64)> {
    let shares = poll_until(SETTLE, async || {
        let mut shares = Vec::new();
        for h in handlers {
            let p = h
                .metric("headcount_handler_partitions")
                .await
                .unwrap_or(0.0);
            let s = h.metric("headcount_handler_sessions").await.unwrap_or(0.0);
            shares.push((p, s));
        }
        let (p, s) = shares
            .iter()
            .fold((0.0, 0.0), |(a, b), (p, s)| (a + p, b + s));
        if p == partitions && s == sessions && shares.iter().all(|&(p, _)| p > 0.0) {
            Ok(shares)
        } else {
            Err(format!(
                "the partitions were not divided among {n} handlers: {shares:?}"
            ))
        }
    })
    .await;
    assert_eq!(shares.len(), n);
    shares
}

/// One account's devices all stop: each of its sessions gets a `timeout`
/// event once the timeout has passed (and not before), the others are
/// untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_devices_time_out_on_schedule() {
    let (s, accts, fleet, watcher) = loaded("quiet", 3).await;

    fleet.silence(&accts[0]).await;
    let silenced_at = Instant::now();
    let deadline = silenced_at + Duration::from_secs(20);
    loop {
        let timeouts = watcher.ended(EventType::Timeout).await;
        if timeouts.len() >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} timeouts: {timeouts:?}",
            timeouts.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = silenced_at.elapsed();
    // The last heartbeat went out at most 500 ms before the silence; the
    // timeout is 6 s.
    assert!(
        took >= Duration::from_millis(5_400),
        "timed out early: {took:?}"
    );
    let timeouts = watcher.ended(EventType::Timeout).await;
    assert!(
        timeouts.iter().all(|e| e.account.as_str() == accts[0]),
        "only the silent account times out: {timeouts:?}"
    );
    assert_eq!(active(&s.client, &accts[0]).await, Some(0));
    until_all_active(&s.client, &accts[1..], 3, Duration::from_secs(5)).await;
    fleet.stop().await;
}

/// NATS is not there when the services start: they wait, say so in their
/// log, do not exit, and serve once a server comes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_wait_for_nats_at_start_up() {
    let port = free_port();
    let url = vec![format!("nats://127.0.0.1:{port}")];
    // The password is only known once the server exists; any works for
    // waiting, so start with the one the server will get.
    let password = format!("pw-{port}");
    let mut handler = Service::start("handler", &url, &password, &[]);
    let mut checker = Service::start("checker", &url, &password, &[]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    for (name, svc) in [("handler", &mut handler), ("checker", &mut checker)] {
        assert!(svc.is_running(), "{name} exited: {}", svc.log());
        let log = svc.log();
        assert!(
            log.contains("cannot reach NATS yet; retrying with backoff"),
            "{name} says why it waits: {log}"
        );
    }
    let nats = NatsServer::start_on_with_password(port, &password);
    let client = nats.service_client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while active(&client, "probe").await.is_none() {
        assert!(
            Instant::now() < deadline,
            "checker never served; log: {}",
            checker.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while handler.metric("headcount_handler_sessions").await.is_none() {
        assert!(Instant::now() < deadline, "handler never served metrics");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(handler.is_running() && checker.is_running());
    // Every process also reports its own resident memory and CPU.
    let rss = handler.metric("process_resident_memory_bytes").await;
    assert!(rss.is_some_and(|b| b > 1e6), "process metrics: {rss:?}");
}
