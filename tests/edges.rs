//! The edges of the handler's bookkeeping on a real nats-server: a leave
//! published right behind its join (and taken by another handler than the
//! join), a session ended by the checker, an account at the largest limit
//! with the longest names and labels there are.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use headcount_protocol::names::MAX_NAME_LEN;
use headcount_protocol::policy::MAX_LIMIT;
use headcount_protocol::subjects::kv as keys;
use headcount_protocol::wire::{
    self, EventType, Heartbeat, MAX_CONTENT_LEN, MAX_KIND_LEN, MAX_REGION_LEN, PresenceEvent,
};
use headcount_protocol::{AccountId, IntervalClock, Limit, Policy, now_millis};
use headcount_tests::{events, next_event};
use test_support::{Device, TestApp, Timings};

/// Generous bound for "eventually".
const SOON: Duration = Duration::from_secs(5);

fn limit(n: u32, policy: Policy) -> Limit {
    Limit::new(n.into(), policy).expect("limit")
}

fn leave() -> Heartbeat {
    Heartbeat {
        leave: true,
        ..Default::default()
    }
}

/// Reads one presence event and files it under its session.
fn file(seen: &mut HashMap<String, Vec<EventType>>, payload: &[u8]) {
    let ev: PresenceEvent = serde_json::from_slice(payload).expect("event is json");
    seen.entry(ev.session.to_string())
        .or_default()
        .push(ev.kind);
}

#[tokio::test]
async fn a_leave_right_behind_its_join_frees_the_seat() {
    // A timeout longer than the time the leaves are given, so that only
    // the leaves can empty the account in time.
    let timings = Timings {
        timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let mut app = TestApp::spawn_timed(limit(100, Policy::EvictOldest), timings).await;
    app.handlers.push(app.start_handler().await);
    let dev = app.nats.fleet_client().await;
    let mut ev = events(&app, "acme").await;

    // Each session's join and leave go out back to back, to whichever of
    // the two handlers holds the account's partition (both, for a moment,
    // while it changes hands: the handlers' simulation plays that case
    // out).
    const N: usize = 30;
    for i in 0..N {
        let (device, session) = (format!("d{i}"), format!("s{i}"));
        let plain = Heartbeat::default();
        app.heartbeat_nowait(&dev, "acme", &device, &session, &plain)
            .await;
        app.heartbeat_nowait(&dev, "acme", &device, &session, &leave())
            .await;
    }
    dev.flush().await.unwrap();
    let sent = Instant::now();

    // Every session's leave comes, and the account is empty, within 2 s.
    let deadline = sent + Duration::from_secs(2);
    let mut seen = HashMap::new();
    let left = |seen: &HashMap<String, Vec<EventType>>| {
        seen.values()
            .filter(|e| e.contains(&EventType::Leave))
            .count()
    };
    while left(&seen) < N {
        let msg = tokio::time::timeout_at(deadline.into(), ev.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {N} leaves within 2 s: {seen:?}", left(&seen)))
            .expect("event stream open");
        file(&mut seen, &msg.payload);
    }
    let within = deadline.saturating_duration_since(Instant::now());
    let (reply, took) = app.wait_active("acme", within, |r| r.active == 0).await;
    assert!(took.is_some(), "still active: {reply:?}");

    // Past the time any session left behind would have timed out: each
    // session joined once at most and left once, and none timed out.
    let horizon = sent + app.timings.timeout + Duration::from_millis(500);
    while let Ok(msg) = tokio::time::timeout_at(horizon.into(), ev.next()).await {
        file(&mut seen, &msg.expect("event stream open").payload);
    }
    assert_eq!(seen.len(), N, "{seen:?}");
    for (session, kinds) in &seen {
        let count = |kind| kinds.iter().filter(|k| **k == kind).count();
        assert!(count(EventType::Join) <= 1, "{session}: {kinds:?}");
        assert_eq!(count(EventType::Leave), 1, "{session}: {kinds:?}");
        assert_eq!(
            count(EventType::Join) + count(EventType::Leave),
            kinds.len(),
            "{session}: {kinds:?}"
        );
    }
    assert_eq!(app.active("acme").await.active, 0);
    let accepted: f64 = app
        .handlers
        .iter()
        .map(|h| h.metric(r#"headcount_heartbeats_total{result="accepted"}"#))
        .sum();
    assert_eq!(accepted, 2.0 * N as f64, "every join and leave was taken");
}

/// The sessions `account`'s live dictionaries hold in KV, sorted.
async fn recorded(app: &TestApp, account: &str) -> Vec<String> {
    let bucket = async_nats::jetstream::new(app.client.clone())
        .get_key_value(keys::SESSIONS_BUCKET)
        .await
        .unwrap();
    let id = AccountId::parse(account).unwrap();
    let mut sessions = Vec::new();
    let clock = IntervalClock::new(app.timings.interval);
    for interval in clock.live_intervals(now_millis()) {
        if let Some(value) = bucket.get(keys::session_dict(&id, interval)).await.unwrap() {
            let dict = wire::decode_dict(&value).unwrap();
            sessions.extend(dict.values().map(|r| r.session.to_string()));
        }
    }
    sessions.sort();
    sessions.dedup();
    sessions
}

#[tokio::test]
async fn an_evicted_session_leaves_the_dictionaries() {
    let app = TestApp::spawn_with(limit(1, Policy::EvictOldest)).await;
    let dev = app.nats.fleet_client().await;
    let mut ev = events(&app, "acme").await;
    let beat = Duration::from_millis(300);
    let first = Device::start(dev.clone(), "acme", "tv", "s1", beat, Heartbeat::default());
    app.wait_count("acme", 1).await;
    let second = Device::start(
        dev.clone(),
        "acme",
        "phone",
        "s2",
        beat,
        Heartbeat::default(),
    );
    let evicted = next_event(&mut ev, EventType::Evicted).await;
    assert_eq!(evicted.session.as_str(), "s1");
    // Only the live session stays recorded.
    let start = Instant::now();
    loop {
        let held = recorded(&app, "acme").await;
        if held == ["s2"] {
            break;
        }
        assert!(start.elapsed() < SOON, "recorded: {held:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.active_sessions("acme").await, ["s2"]);
    Device::silence_all([first, second]).await;
}

#[tokio::test]
async fn an_account_at_the_largest_limit_with_the_longest_names_is_counted_whole() {
    // Long intervals and timeout: the sessions beat once and must stay
    // counted for the whole test.
    let timings = Timings {
        interval: Duration::from_secs(60),
        timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let app = TestApp::spawn_timed(limit(MAX_LIMIT, Policy::EvictOldest), timings).await;
    let dev = app.nats.fleet_client().await;
    let account = "a".repeat(MAX_NAME_LEN);
    let name = |tag: char, i: u32| format!("{tag}{i:0>width$}", width = MAX_NAME_LEN - 1);
    let hb = Heartbeat {
        content: Some("c".repeat(MAX_CONTENT_LEN)),
        kind: Some("k".repeat(MAX_KIND_LEN)),
        region: Some("r".repeat(MAX_REGION_LEN)),
        ..Default::default()
    };
    for i in 0..MAX_LIMIT {
        app.heartbeat_nowait(&dev, &account, &name('d', i), &name('s', i), &hb)
            .await;
    }
    dev.flush().await.unwrap();

    let reply = app.wait_count(&account, MAX_LIMIT).await;
    assert!(
        reply
            .sessions
            .iter()
            .all(|s| s.labels.content() == hb.content.as_deref())
    );
    // A leave is honoured at the limit as anywhere.
    app.heartbeat(&dev, &account, &name('d', 7), &name('s', 7), &leave())
        .await;
    let reply = app.wait_count(&account, MAX_LIMIT - 1).await;
    assert!(
        !reply
            .sessions
            .iter()
            .any(|s| s.session.as_str() == name('s', 7))
    );

    let handler = &app.handlers[0];
    for sample in [
        r#"headcount_heartbeats_total{result="dictionary_full"}"#,
        r#"headcount_kv_writes_total{result="error"}"#,
    ] {
        assert_eq!(handler.metric(sample), 0.0, "{sample}");
    }
}

/// A watch pulls its entries a few dozen at a time: a bucket holding many
/// times that, and a burst of changes many times that while it follows,
/// still reach it whole and in order, deletes and purges as such, and its
/// replay is reported done only once every key held at start is applied.
#[tokio::test]
async fn a_watch_follows_bursts_far_larger_than_one_pull_in_order() {
    use async_nats::jetstream::kv;
    use headcount_runtime::{Shutdown, watch};

    let server = test_support::NatsServer::start();
    let js = async_nats::jetstream::new(server.service_client().await);
    let store = js
        .create_key_value(kv::Config {
            bucket: "watched".into(),
            history: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    // Held before the watch starts, and a key outside the followed ones.
    for i in 0..500 {
        store
            .put(format!("k.{i}"), i.to_string().into())
            .await
            .unwrap();
    }
    store.put("other.0", "x".into()).await.unwrap();

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop, shutdown) = Shutdown::new();
    let (task, ready) = watch::follow_keys(
        store.clone(),
        "test",
        "k.>",
        move |e: kv::Entry| {
            let _ = tx.send((e.key, e.revision, e.operation, e.value));
        },
        shutdown,
    )
    .await
    .unwrap();
    tokio::time::timeout(SOON, ready).await.unwrap().unwrap();
    let mut state = HashMap::new();
    let mut last = 0;
    let mut take = |rx: &mut tokio::sync::mpsc::UnboundedReceiver<_>| {
        let mut n = 0;
        while let Ok((key, revision, op, value)) = rx.try_recv() {
            let (key, value): (String, bytes::Bytes) = (key, value);
            assert!(revision > last, "out of order: {revision} after {last}");
            last = revision;
            match op {
                kv::Operation::Put => state.insert(key, String::from_utf8(value.to_vec()).unwrap()),
                kv::Operation::Delete | kv::Operation::Purge => state.remove(&key),
            };
            n += 1;
        }
        n
    };
    assert_eq!(
        take(&mut rx),
        500,
        "the replay was reported before it was applied"
    );

    // A burst while it follows: new values, new keys, a delete, a purge.
    for i in 0..1000 {
        store
            .put(format!("k.{}", i % 700), format!("v{i}").into())
            .await
            .unwrap();
    }
    store.delete("k.3").await.unwrap();
    store.purge("k.4").await.unwrap();
    let mut expected: HashMap<String, String> = (0..700)
        .map(|k| {
            let i = if k < 300 { k + 700 } else { k };
            (format!("k.{k}"), format!("v{i}"))
        })
        .collect();
    expected.remove("k.3");
    expected.remove("k.4");
    let deadline = Instant::now() + SOON;
    let mut seen = 0;
    while seen < 1002 {
        assert!(Instant::now() < deadline, "{seen} of 1002 changes arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
        seen += take(&mut rx);
    }
    assert_eq!(seen, 1002, "every change once");
    assert_eq!(state, expected);
    stop.fire();
    task.await.unwrap();
}
