//! The whole pipeline on a real nats-server: devices heartbeat, the handler
//! records sessions in KV, the checker counts them and enforces limits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use headcount_protocol::subjects::kv as keys;
use headcount_protocol::wire::{
    self, ActiveReply, ControlType, EndReason, EventType, Heartbeat, LimitsReply, SessionRef,
    StatsReply,
};
use headcount_protocol::{AccountId, DeviceId, Limit, Policy, SessionId, now_millis};
use headcount_tests::{check, control, events, next_control, next_event};
use serde_json::json;
use test_support::{Device, TestApp};

const BEAT: Duration = Duration::from_millis(300);
/// Generous bound for "eventually": these tests check outcomes; the
/// latency itself is measured by `headcount-bench` (docs/BENCHMARKS.md).
const SOON: Duration = Duration::from_secs(5);

fn plain() -> Heartbeat {
    Heartbeat::default()
}

fn limit(n: i64, policy: Policy) -> Limit {
    Limit::new(n, policy).expect("limit")
}

/// Services with `limit` as every account's default, the fleet connection
/// devices beat on, and from the start what acme's `device` is told and
/// acme's presence events, in that order.
async fn watched(
    limit: Limit,
    device: &str,
) -> (
    TestApp,
    async_nats::Client,
    async_nats::Subscriber,
    async_nats::Subscriber,
) {
    let app = TestApp::spawn_with(limit).await;
    let dev = app.nats.fleet_client().await;
    let ctl = control(&dev, "acme", device).await;
    let ev = events(&app, "acme").await;
    (app, dev, ctl, ev)
}

/// acme's `device` beating plain heartbeats as `session` on `dev`, once
/// acme counts `active` sessions with it.
async fn joined(
    app: &TestApp,
    dev: &async_nats::Client,
    device: &str,
    session: &str,
    active: u32,
) -> Device {
    let d = Device::start(dev.clone(), "acme", device, session, BEAT, plain());
    app.wait_count("acme", active).await;
    d
}

/// How many sessions the checker has evicted.
fn evictions(app: &TestApp) -> f64 {
    app.checkers[0].metric(r#"headcount_enforcements_total{action="evicted"}"#)
}

#[tokio::test]
async fn a_new_session_is_counted_with_its_details() {
    let app = TestApp::spawn().await;
    let dev = app.nats.fleet_client().await;
    let mut ev = events(&app, "acme").await;
    let hb = Heartbeat {
        content: Some("movie-42".into()),
        kind: Some("web".into()),
        region: Some("eu-west".into()),
        ..Default::default()
    };
    app.heartbeat(&dev, "acme", "laptop", "s1", &hb).await;
    let reply = app.wait_count("acme", 1).await;
    let s = &reply.sessions[0];
    assert_eq!((s.device.as_str(), s.session.as_str()), ("laptop", "s1"));
    assert_eq!(s.labels.content(), Some("movie-42"));
    assert_eq!(s.labels.kind(), Some("web"));
    assert_eq!(s.labels.region(), Some("eu-west"));
    assert_eq!((reply.limit, reply.policy), (2, Policy::EvictOldest));
    let join = next_event(&mut ev, EventType::Join).await;
    assert_eq!(join.session.as_str(), "s1");
    // Other accounts are untouched.
    assert_eq!(app.active("other").await.active, 0);
}

#[tokio::test]
async fn heartbeats_are_coalesced_into_one_write_per_interval() {
    let app = TestApp::spawn().await;
    let dev = app.nats.fleet_client().await;
    let handler = &app.handlers[0];
    for seq in 0..50u64 {
        let hb = Heartbeat {
            seq: Some(seq),
            ..Default::default()
        };
        app.heartbeat(&dev, "acme", "tv", "s1", &hb).await;
    }
    app.wait_count("acme", 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        handler.metric(r#"headcount_heartbeats_total{result="accepted"}"#),
        50.0
    );
    let writes = handler.metric(r#"headcount_kv_writes_total{result="ok"}"#);
    // 50 heartbeats, one session: one write, two if an interval boundary fell inside.
    assert!((1.0..=2.0).contains(&writes), "kv writes: {writes}");
}

#[tokio::test]
async fn leave_frees_the_seat_at_once() {
    let app = TestApp::spawn().await;
    let dev = app.nats.fleet_client().await;
    let mut ev = events(&app, "acme").await;
    app.heartbeat(&dev, "acme", "tv", "s1", &plain()).await;
    app.wait_count("acme", 1).await;
    let leave = Heartbeat {
        leave: true,
        ..Default::default()
    };
    app.heartbeat(&dev, "acme", "tv", "s1", &leave).await;
    app.wait_count("acme", 0).await;
    let e = next_event(&mut ev, EventType::Leave).await;
    assert_eq!(e.session.as_str(), "s1");
}

#[tokio::test]
async fn a_silent_device_times_out() {
    let app = TestApp::spawn().await;
    let dev = app.nats.fleet_client().await;
    let mut ev = events(&app, "acme").await;
    let quiet = Device::start(dev.clone(), "acme", "tv", "s1", BEAT, plain());
    let stays = joined(&app, &dev, "phone", "s2", 2).await;
    // Longer than the timeout while both beat: nobody drops out.
    tokio::time::sleep(app.timings.timeout * 2).await;
    assert_eq!(app.active("acme").await.active, 2);
    quiet.silence().await;
    let e = next_event(&mut ev, EventType::Timeout).await;
    assert_eq!(e.session.as_str(), "s1");
    assert_eq!(app.active_sessions("acme").await, ["s2"]);
    stays.silence().await;
}

#[tokio::test]
async fn a_restarted_checker_does_not_announce_a_timeout_again() {
    // Long intervals, as in production (there 120 s against a 15 s
    // timeout): a silent session stays in a live dictionary long after it
    // timed out, and a checker started meanwhile loads it again.
    let timings = test_support::Timings {
        interval: Duration::from_secs(60),
        timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let mut app = TestApp::spawn_timed(limit(2, Policy::EvictOldest), timings).await;
    let dev = app.nats.fleet_client().await;
    let mut ev = events(&app, "acme").await;
    let quiet = joined(&app, &dev, "tv", "s1", 1).await;
    quiet.silence().await;
    let e = next_event(&mut ev, EventType::Timeout).await;
    assert_eq!(e.session.as_str(), "s1");
    // Past what four timeouts (or half a minute) of marker would cover.
    tokio::time::sleep(Duration::from_secs(32)).await;
    for checker in app.checkers.drain(..) {
        checker.stop().await.expect("checker stops");
    }
    app.checkers.push(app.start_checker().await);
    // The new checker holds the session again (still in the live
    // dictionary) and times it out: its marker says it was announced.
    let (r, _) = app
        .wait_active("acme", Duration::from_secs(5), |r| r.active == 0)
        .await;
    assert_eq!(r.active, 0);
    let again = tokio::time::timeout(app.timings.timeout * 4, async {
        loop {
            let msg = ev.next().await.expect("event stream open");
            let ev: headcount_protocol::wire::PresenceEvent =
                serde_json::from_slice(&msg.payload).expect("event is json");
            if ev.kind == EventType::Timeout {
                return ev;
            }
        }
    })
    .await;
    assert!(again.is_err(), "announced twice: {again:?}");
}

#[tokio::test]
async fn evict_oldest_tells_the_evicted_device_and_ignores_it_afterwards() {
    let (app, dev, mut ctl, mut ev) = watched(limit(2, Policy::EvictOldest), "first").await;
    let first = joined(&app, &dev, "first", "s1", 1).await;
    let second = joined(&app, &dev, "second", "s2", 2).await;
    let third = Device::start(dev.clone(), "acme", "third", "s3", BEAT, plain());

    let msg = next_control(&mut ctl).await;
    assert_eq!(msg.kind, ControlType::DeviceLimitExceeded);
    assert_eq!((msg.device.as_str(), msg.session.as_str()), ("first", "s1"));
    assert_eq!(msg.by.as_ref().map(|b| b.session.as_str()), Some("s3"));
    let e = next_event(&mut ev, EventType::Evicted).await;
    assert_eq!(e.session.as_str(), "s1");

    // The evicted device keeps beating; it stays out.
    tokio::time::sleep(app.timings.timeout * 2).await;
    assert_eq!(app.active_sessions("acme").await, ["s2", "s3"]);
    assert!(app.handlers[0].metric(r#"headcount_heartbeats_total{result="revoked"}"#) >= 1.0);
    assert_eq!(evictions(&app), 1.0);
    Device::silence_all([first, second, third]).await;
}

#[tokio::test]
async fn a_checker_ends_the_victim_another_replica_recorded_and_no_other() {
    // Another replica decided that s3 takes s2's seat (its view ordered the
    // sessions differently) and recorded that in acme's ledger, but its
    // revocation never came. This checker, left to enforce, must end s2
    // and nobody else: by its own order it would have chosen s1.
    let (app, dev, mut ctl, mut ev) = watched(limit(2, Policy::EvictOldest), "second").await;
    let first = joined(&app, &dev, "first", "s1", 1).await;
    let second = joined(&app, &dev, "second", "s2", 2).await;
    let ledger = wire::Ledger {
        ended: vec![wire::LedgerEntry {
            device: DeviceId::parse("second").unwrap(),
            session: SessionId::parse("s2").unwrap(),
            reason: EndReason::Evicted,
            at: now_millis(),
            by: Some(SessionRef {
                device: DeviceId::parse("third").unwrap(),
                session: SessionId::parse("s3").unwrap(),
            }),
            decision: Some("another-replica".into()),
        }],
    };
    let revoked = async_nats::jetstream::new(app.client.clone())
        .get_key_value(keys::REVOKED_BUCKET)
        .await
        .unwrap();
    let acme = AccountId::parse("acme").unwrap();
    revoked
        .put(
            keys::ledger(&acme),
            serde_json::to_vec(&ledger).unwrap().into(),
        )
        .await
        .unwrap();
    let third = Device::start(dev.clone(), "acme", "third", "s3", BEAT, plain());

    let msg = next_control(&mut ctl).await;
    assert_eq!(msg.kind, ControlType::DeviceLimitExceeded);
    assert_eq!(
        (msg.device.as_str(), msg.session.as_str()),
        ("second", "s2")
    );
    let e = next_event(&mut ev, EventType::Evicted).await;
    assert_eq!(e.session.as_str(), "s2");
    assert_eq!(e.by.as_ref().map(|b| b.session.as_str()), Some("s3"));
    tokio::time::sleep(app.timings.timeout).await;
    assert_eq!(app.active_sessions("acme").await, ["s1", "s3"]);
    assert_eq!(evictions(&app), 1.0, "one seat, one eviction");
    Device::silence_all([first, second, third]).await;
}

#[tokio::test]
async fn reject_new_refuses_the_session_beyond_the_limit() {
    let (app, dev, mut ctl, mut ev) = watched(limit(1, Policy::RejectNew), "late").await;
    let early = joined(&app, &dev, "early", "s1", 1).await;
    let late = Device::start(dev.clone(), "acme", "late", "s2", BEAT, plain());
    let msg = next_control(&mut ctl).await;
    assert_eq!(msg.kind, ControlType::DeviceLimitExceeded);
    assert_eq!(msg.session.as_str(), "s2");
    let e = next_event(&mut ev, EventType::Rejected).await;
    assert_eq!(e.session.as_str(), "s2");
    tokio::time::sleep(app.timings.timeout).await;
    assert_eq!(app.active_sessions("acme").await, ["s1"]);

    // check agrees: a new device may not play, the active one may.
    let r = check(&app, json!({"account": "acme", "device": "other"})).await;
    assert!(!r.allowed);
    assert_eq!((r.active, r.limit, r.policy), (1, 1, Policy::RejectNew));
    let r = check(&app, json!({"account": "acme", "device": "early"})).await;
    assert!(r.allowed && r.evicted.is_empty());
    Device::silence_all([early, late]).await;
}

#[tokio::test]
async fn check_under_evict_oldest_makes_room_for_the_newcomer() {
    let (app, dev, mut ctl, _) = watched(limit(2, Policy::EvictOldest), "a").await;
    let a = joined(&app, &dev, "a", "s1", 1).await;
    let b = joined(&app, &dev, "b", "s2", 2).await;
    let r = check(
        &app,
        json!({"account": "acme", "device": "c", "session": "s3"}),
    )
    .await;
    assert!(r.allowed);
    assert_eq!(r.evicted.len(), 1);
    assert_eq!(r.evicted[0].session.as_str(), "s1");
    assert_eq!(r.active, 1);
    let msg = next_control(&mut ctl).await;
    assert_eq!(
        msg.by
            .map(|b| (b.device.to_string(), b.session.to_string())),
        Some(("c".into(), "s3".into()))
    );
    // An active device is allowed without evicting anyone.
    let r = check(&app, json!({"account": "acme", "device": "b"})).await;
    assert!(r.allowed && r.evicted.is_empty());
    Device::silence_all([a, b]).await;
}

#[tokio::test]
async fn a_new_session_of_the_same_device_replaces_the_old_one() {
    let (app, dev, mut ctl, mut ev) = watched(limit(2, Policy::EvictOldest), "tv").await;
    let old = Device::start(dev.clone(), "acme", "tv", "old", BEAT, plain());
    let other = joined(&app, &dev, "phone", "p1", 2).await;
    // A reload: new session, same device; the old tab still beats a while.
    let new = Device::start(dev.clone(), "acme", "tv", "new", BEAT, plain());
    let (r, took) = app
        .wait_active("acme", SOON, |r| {
            r.sessions.iter().any(|s| s.session.as_str() == "new")
        })
        .await;
    assert!(took.is_some(), "{r:?}");
    // The old session ends as `replaced`, recorded once in the revocations
    // (by the handler that saw the new one), so its beats are ignored.
    let left = next_event(&mut ev, EventType::Leave).await;
    assert_eq!(left.session.as_str(), "old");
    assert_eq!(left.reason.as_deref(), Some("replaced"));
    let js = async_nats::jetstream::new(app.client.clone());
    let revoked = js.get_key_value("headcount-revoked").await.unwrap();
    assert!(revoked.get("acme.old").await.unwrap().is_some());
    tokio::time::sleep(app.timings.timeout * 2).await;
    assert_eq!(app.active_sessions("acme").await, ["new", "p1"]);
    // No seat was taken, so nobody was evicted.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), ctl.next())
            .await
            .is_err(),
        "replacement must not evict"
    );
    assert_eq!(evictions(&app), 0.0);
    Device::silence_all([old, other, new]).await;
}

#[tokio::test]
async fn limits_can_be_read_and_set_and_bad_values_change_nothing() {
    let app = TestApp::spawn().await;
    let r: LimitsReply = app
        .request("limits.get", &json!({"account": "acme"}))
        .await
        .unwrap();
    assert_eq!((r.limit, r.policy), (2, Policy::EvictOldest));
    let r: LimitsReply = app
        .request(
            "limits.set",
            &json!({"account": "acme", "limit": 5, "policy": "reject-new"}),
        )
        .await
        .unwrap();
    assert_eq!((r.limit, r.policy), (5, Policy::RejectNew));
    for bad in [
        json!({"account": "acme", "limit": -1}),
        json!({"account": "acme", "limit": 0}),
        json!({"account": "acme", "limit": 1_000_000}),
        json!({"account": "acme", "limit": 3, "policy": "evict-everyone"}),
        json!({"account": "ac.me", "limit": 3}),
        json!({"account": "acme"}),
    ] {
        let e = app
            .request::<_, LimitsReply>("limits.set", &bad)
            .await
            .unwrap_err();
        assert!(e.is_bad_request(), "{bad}: {e:?}");
    }
    let r: LimitsReply = app
        .request("limits.get", &json!({"account": "acme"}))
        .await
        .unwrap();
    assert_eq!((r.limit, r.policy), (5, Policy::RejectNew));
    // Another checker replica sees the limit from KV.
    let second = app.start_checker().await;
    let a: ActiveReply = app
        .request("active", &json!({"account": "acme"}))
        .await
        .unwrap();
    assert_eq!((a.limit, a.policy), (5, Policy::RejectNew));
    second.stop().await.unwrap();
}

#[tokio::test]
async fn lowering_a_limit_enforces_it_at_once() {
    let (app, dev, mut ctl, _) = watched(limit(3, Policy::EvictOldest), "d1").await;
    let mut devices = Vec::new();
    for i in 1..=3 {
        devices.push(joined(&app, &dev, &format!("d{i}"), &format!("s{i}"), i).await);
    }
    let _: LimitsReply = app
        .request("limits.set", &json!({"account": "acme", "limit": 2}))
        .await
        .unwrap();
    assert_eq!(next_control(&mut ctl).await.session.as_str(), "s1");
    app.wait_count("acme", 2).await;
    Device::silence_all(devices).await;
}

#[tokio::test]
async fn kick_revokes_a_session_once() {
    let (app, dev, mut ctl, _) = watched(limit(2, Policy::EvictOldest), "tv").await;
    let tv = joined(&app, &dev, "tv", "s1", 1).await;
    assert!(app.kick("acme", "s1").await);
    let msg = next_control(&mut ctl).await;
    assert_eq!(msg.kind, ControlType::Revoked);
    app.wait_count("acme", 0).await;
    assert!(
        !app.kick("acme", "s1").await,
        "a second kick finds nothing to do"
    );
    assert!(!app.kick("acme", "nope").await);
    tokio::time::sleep(app.timings.timeout).await;
    assert_eq!(
        app.active("acme").await.active,
        0,
        "kicked device stays out"
    );
    tv.silence().await;
}

#[tokio::test]
async fn restarting_handler_and_checker_loses_no_session() {
    let mut app = TestApp::spawn_with(limit(50, Policy::EvictOldest)).await;
    let dev = app.nats.fleet_client().await;
    let devices: Vec<Device> = (0..10)
        .map(|i| {
            Device::start(
                dev.clone(),
                "acme",
                &format!("d{i}"),
                &format!("s{i}"),
                BEAT,
                plain(),
            )
        })
        .collect();
    app.wait_count("acme", 10).await;

    let handler = app.handlers.remove(0);
    handler.stop().await.unwrap();
    app.handlers.push(app.start_handler().await);
    let checker = app.checkers.remove(0);
    checker.stop().await.unwrap();
    app.checkers.push(app.start_checker().await);

    // Straight after the restart, and still after a full timeout.
    assert_eq!(app.active("acme").await.active, 10);
    tokio::time::sleep(app.timings.timeout * 2).await;
    assert_eq!(app.active("acme").await.active, 10);

    // A killed (not drained) checker too.
    let checker = app.checkers.remove(0);
    checker.abort();
    app.checkers.push(app.start_checker().await);
    assert_eq!(app.active("acme").await.active, 10);
    Device::silence_all(devices).await;
}

#[tokio::test]
async fn two_handlers_divide_the_accounts_without_losing_sessions() {
    let mut app = TestApp::spawn_with(limit(100, Policy::EvictOldest)).await;
    let dev = app.nats.fleet_client().await;
    // 20 accounts, two devices each, beating while a second handler joins
    // and takes half the partitions over.
    let devices: Vec<Device> = (0..40)
        .map(|i| {
            let account = format!("acct{}", i % 20);
            Device::start(
                dev.clone(),
                &account,
                &format!("d{i}"),
                &format!("s{i}"),
                Duration::from_millis(100),
                plain(),
            )
        })
        .collect();
    for a in 0..20 {
        app.wait_count(&format!("acct{a}"), 2).await;
    }
    app.handlers.push(app.start_handler().await);
    let half = f64::from(headcount_protocol::partition::PARTITIONS / 2);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !app
        .handlers
        .iter()
        .all(|h| h.metric("headcount_handler_partitions") == half)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the partitions were not divided: {:?}",
            app.handlers
                .iter()
                .map(|h| h.metric("headcount_handler_partitions"))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let an interval boundary pass under load, then count again.
    tokio::time::sleep(app.timings.interval + Duration::from_millis(500)).await;
    for a in 0..20 {
        assert_eq!(app.active(&format!("acct{a}")).await.active, 2, "acct{a}");
    }
    // Each session is held by one handler: the two divide them.
    let held: Vec<f64> = app
        .handlers
        .iter()
        .map(|h| h.metric("headcount_handler_sessions"))
        .collect();
    assert_eq!(held.iter().sum::<f64>(), 40.0, "sessions held: {held:?}");
    assert!(held.iter().all(|&n| n > 0.0 && n < 40.0), "{held:?}");
    let accepted: f64 = app
        .handlers
        .iter()
        .map(|h| h.metric(r#"headcount_heartbeats_total{result="accepted"}"#))
        .sum();
    let writes: f64 = app
        .handlers
        .iter()
        .map(|h| h.metric(r#"headcount_kv_writes_total{result="ok"}"#))
        .sum();
    assert!(
        writes < accepted / 5.0,
        "writes {writes} must grow with sessions, not heartbeats ({accepted})"
    );

    // One handler stops: it hands its partitions to the other before it
    // lets them go. No session leaves, joins again or times out.
    let mut ev = app
        .nats
        .service_client()
        .await
        .subscribe("headcount.events.>")
        .await
        .unwrap();
    let leaving = app.handlers.remove(0);
    let stopped = tokio::time::Instant::now();
    leaving.stop().await.expect("a graceful stop");
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "it waited out the hand-over: {:?}",
        stopped.elapsed()
    );
    let left = &app.handlers[0];
    assert_eq!(left.metric("headcount_handler_partitions"), 2.0 * half);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while left.metric("headcount_handler_sessions") != 40.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            left.metric("headcount_handler_sessions")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(app.timings.timeout + Duration::from_millis(500)).await;
    for a in 0..20 {
        assert_eq!(app.active(&format!("acct{a}")).await.active, 2, "acct{a}");
    }
    if let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(100), ev.next()).await {
        panic!(
            "an event during the hand-over: {}",
            String::from_utf8_lossy(&msg.payload)
        );
    }
    Device::silence_all(devices).await;
}

/// Which partitions each checker's record in the members bucket says it
/// serves.
async fn checker_records(app: &TestApp) -> Vec<std::collections::BTreeSet<u32>> {
    let js = async_nats::jetstream::new(app.client.clone());
    let store = js.get_key_value("headcount-members").await.unwrap();
    let mut keys = store.keys().await.unwrap();
    let mut records = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.unwrap();
        if key.starts_with("checker.")
            && let Some(value) = store.get(&key).await.unwrap()
        {
            let r: headcount_runtime::members::Record = serde_json::from_slice(&value).unwrap();
            records.push(r.serving);
        }
    }
    records
}

#[tokio::test]
async fn three_checkers_hold_each_partition_twice_and_answer_for_every_account() {
    let mut app = TestApp::spawn_with(limit(100, Policy::EvictOldest)).await;
    let dev = app.nats.fleet_client().await;
    let devices: Vec<Device> = (0..40)
        .map(|i| {
            Device::start(
                dev.clone(),
                &format!("acct{}", i % 20),
                &format!("d{i}"),
                &format!("s{i}"),
                Duration::from_millis(100),
                plain(),
            )
        })
        .collect();
    for a in 0..20 {
        app.wait_count(&format!("acct{a}"), 2).await;
    }
    // Two more checkers: each partition ends up with two holders, no
    // checker with all of them.
    app.checkers.push(app.start_checker().await);
    app.checkers.push(app.start_checker().await);
    let partitions = headcount_protocol::partition::PARTITIONS;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let held: Vec<f64> = app
            .checkers
            .iter()
            .map(|c| c.metric("headcount_checker_partitions"))
            .collect();
        let records = checker_records(&app).await;
        let twice = records.len() == 3
            && (0..partitions).all(|p| records.iter().filter(|r| r.contains(&p)).count() == 2);
        if twice && held.iter().all(|&n| n < f64::from(partitions)) {
            assert_eq!(held.iter().sum::<f64>(), f64::from(2 * partitions));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "partitions not held twice: {held:?} {records:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each checker holds only its partitions' sessions: 80 in all, as each
    // session is held twice.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let active: Vec<f64> = app
            .checkers
            .iter()
            .map(|c| c.metric("headcount_active_sessions"))
            .collect();
        if active.iter().sum::<f64>() == 80.0 {
            assert!(active.iter().all(|&n| n > 0.0 && n < 40.0), "{active:?}");
            // Each partition counted once: the highest of its holders.
            let total: f64 = (0..partitions)
                .map(|p| {
                    let sample =
                        format!(r#"headcount_partition_active_sessions{{partition="{p}"}}"#);
                    app.checkers
                        .iter()
                        .map(|c| c.metric(&sample))
                        .fold(0.0, f64::max)
                })
                .sum();
            assert_eq!(total, 40.0);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sessions held: {active:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Whoever receives a request answers it right: asked often enough,
    // every checker receives some about accounts it does not hold.
    for round in 0..3 {
        for a in 0..20 {
            assert_eq!(
                app.active(&format!("acct{a}")).await.active,
                2,
                "acct{a}, round {round}"
            );
        }
    }
    let passed: f64 = app
        .checkers
        .iter()
        .map(|c| c.metric(r#"headcount_requests_total{endpoint="active",result="passed_on"}"#))
        .sum();
    assert!(passed > 0.0, "no request was passed on");
    let stats: StatsReply = app
        .request("stats", &json!({ "top": 3 }))
        .await
        .expect("stats answers");
    assert_eq!(stats.active, 40, "every partition counted once");
    assert_eq!(stats.top.len(), 3);
    assert!(stats.top.iter().all(|u| u.active == 2));
    let one: StatsReply = app
        .request("stats", &json!({ "account": "acct7" }))
        .await
        .expect("stats answers");
    assert_eq!(one.active, 2);
    // A check and a kick decide on the account's own view.
    let c = check(&app, json!({ "account": "acct3", "device": "d3" })).await;
    assert!(c.allowed);
    assert_eq!(c.active, 2);
    assert!(app.kick("acct5", "s5").await, "the session is ended");
    assert_eq!(app.active_sessions("acct5").await, ["s25"]);

    // A checker stops: the others take its partitions before it lets them
    // go, and nothing times out or leaves meanwhile.
    let mut ev = app
        .nats
        .service_client()
        .await
        .subscribe("headcount.events.>")
        .await
        .unwrap();
    let leaving = app.checkers.remove(0);
    leaving.stop().await.expect("a graceful stop");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while checker_records(&app)
        .await
        .iter()
        .any(|r| r.len() != partitions as usize)
    {
        assert!(tokio::time::Instant::now() < deadline, "not taken over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(app.timings.timeout + Duration::from_millis(500)).await;
    for a in 0..20 {
        let want = if a == 5 { 1 } else { 2 };
        assert_eq!(
            app.active(&format!("acct{a}")).await.active,
            want,
            "acct{a}"
        );
    }
    if let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(100), ev.next()).await {
        panic!(
            "an event during the hand-over: {}",
            String::from_utf8_lossy(&msg.payload)
        );
    }
    Device::silence_all(devices).await;
}

#[tokio::test]
async fn bad_heartbeats_are_counted_and_never_disturb_valid_sessions() {
    let app = TestApp::spawn().await;
    let dev = app.nats.fleet_client().await;
    let good = joined(&app, &dev, "tv", "s1", 1).await;
    let h = &app.handlers[0];
    let invalid0 = h.metric(r#"headcount_heartbeats_total{result="invalid"}"#);
    let malformed0 = h.metric(r#"headcount_heartbeats_total{result="malformed"}"#);

    let send = |subject: &str, payload: Vec<u8>| {
        let dev = dev.clone();
        let subject = subject.to_string();
        async move {
            dev.publish(subject, Bytes::from(payload)).await.unwrap();
        }
    };
    // Malformed MessagePack, a bare array, and an oversized payload.
    send("hb.acme.tv.s1", vec![0xc1, 0xff, 0x00]).await;
    send("hb.acme.tv.s1", vec![0x92, 0x01]).await;
    send("hb.acme.tv.s1", vec![0x80; 1025]).await;
    // Names outside the allowed set, and an over-long field.
    send("hb.ac$me.tv.s1", vec![]).await;
    send(&format!("hb.{}.tv.s1", "a".repeat(65)), vec![]).await;
    let long = Heartbeat {
        content: Some("c".repeat(129)),
        ..Default::default()
    };
    send("hb.acme.tv.s1", long.encode()).await;
    dev.flush().await.unwrap();

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        h.metric(r#"headcount_heartbeats_total{result="malformed"}"#) - malformed0,
        3.0
    );
    assert_eq!(
        h.metric(r#"headcount_heartbeats_total{result="invalid"}"#) - invalid0,
        3.0
    );
    let r = app.active("acme").await;
    assert_eq!(r.active, 1);
    assert_eq!(r.sessions[0].session.as_str(), "s1");
    assert!(app.active("ac").await.sessions.is_empty());
    good.silence().await;
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let app = TestApp::spawn().await;
    for (endpoint, body) in [
        ("active", Bytes::from_static(b"not json")),
        ("active", Bytes::from_static(br#"{"account": "a b"}"#)),
        ("active", Bytes::from_static(br#"{}"#)),
        ("check", Bytes::from_static(br#"{"account": "acme"}"#)),
        (
            "check",
            Bytes::from_static(br#"{"account": "acme", "device": "d.1"}"#),
        ),
        (
            "kick",
            Bytes::from_static(br#"{"account": "acme", "session": ""}"#),
        ),
        ("limits.get", Bytes::from_static(b"\xff\xfe")),
    ] {
        let err = app.request_raw(endpoint, body.clone()).await.unwrap_err();
        assert!(err.is_bad_request(), "{endpoint} {body:?}: {err:?}");
        assert!(err.service_error().is_some_and(|e| !e.message.is_empty()));
    }
    let err = app
        .request_raw("no-such-thing", Bytes::new())
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    // The service still answers afterwards.
    assert_eq!(app.active("acme").await.active, 0);
    assert!(
        app.checkers[0]
            .metric(r#"headcount_requests_total{endpoint="active",result="bad_request"}"#)
            >= 3.0
    );
}

#[tokio::test]
async fn metrics_track_heartbeats_sessions_and_checks() {
    let app = TestApp::spawn().await;
    let dev = app.nats.fleet_client().await;
    let d = joined(&app, &dev, "tv", "s1", 1).await;
    check(&app, json!({"account": "acme", "device": "tv"})).await;
    // The gauges refresh on their own timers (the handler's every second).
    let h = &app.handlers[0];
    let c = &app.checkers[0];
    let deadline = std::time::Instant::now() + SOON;
    while h.metric("headcount_handler_sessions") != 1.0
        || c.metric("headcount_active_sessions") != 1.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "gauges never showed the session"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.metric("headcount_active_sessions"), 1.0);
    assert_eq!(
        c.metric(r#"headcount_request_duration_seconds_count{endpoint="check"}"#),
        1.0
    );
    assert_eq!(
        c.metric(r#"headcount_requests_total{endpoint="check",result="ok"}"#),
        1.0
    );
    assert!(h.metric(r#"headcount_heartbeats_total{result="accepted"}"#) >= 1.0);
    assert!(h.metric(r#"headcount_kv_writes_total{result="ok"}"#) >= 1.0);
    assert_eq!(h.metric("headcount_handler_sessions"), 1.0);
    assert!(
        h.metrics_text()
            .contains("headcount_kv_write_duration_seconds_bucket")
    );
    d.silence().await;
}

/// Endings whose revocation landed in KV but whose acknowledgement never
/// reached the checker: a relay between that checker and nats-server loses
/// the acknowledgement, as a broken connection or a leader change does.
mod lost_acknowledgements {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use headcount_protocol::wire::PresenceEvent;
    use headcount_runtime::NatsOptions;
    use test_support::{Login, password_of};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// Which acknowledgement of an ending the relay drops: the ledger's
    /// write, or the revocation's create after it.
    const LEDGER: usize = 0;
    const REVOCATION: usize = 1;

    /// The start of a JetStream publish acknowledgement from the revoked
    /// bucket's stream.
    const REVOKED_ACK: &[u8] = br#"{"stream":"KV_headcount-revoked","seq":"#;

    /// Not armed.
    const DISARMED: usize = usize::MAX;

    /// A TCP relay in front of nats-server. Once armed, it lets a given
    /// number of acknowledgements of writes to the revoked bucket through
    /// and drops the next on its way to the client; everything else passes
    /// as it is. A checker's ending writes the account's ledger first, then
    /// the session's revocation: [`LEDGER`] and [`REVOCATION`] say which
    /// acknowledgement is lost.
    struct Relay {
        port: u16,
        /// How many more revoked-bucket acknowledgements pass before one is
        /// dropped ([`DISARMED`]: none is).
        armed: Arc<AtomicUsize>,
        lost: Arc<AtomicUsize>,
    }

    impl Relay {
        /// A relay to the server at `url` (`nats://host:port`).
        async fn start(url: &str) -> Self {
            let upstream = url.trim_start_matches("nats://").to_string();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let armed = Arc::new(AtomicUsize::new(DISARMED));
            let lost = Arc::new(AtomicUsize::new(0));
            let (a, l) = (armed.clone(), lost.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let server = TcpStream::connect(&upstream).await.unwrap();
                    let (mut client_rx, client_tx) = client.into_split();
                    let (server_rx, mut server_tx) = server.into_split();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
                    });
                    tokio::spawn(lose_one_ack(server_rx, client_tx, a.clone(), l.clone()));
                }
            });
            Self { port, armed, lost }
        }

        /// Drops the acknowledgement `which` of the next ending.
        fn arm(&self, which: usize) {
            self.armed.store(which, Ordering::SeqCst);
        }

        fn lost(&self) -> usize {
            self.lost.load(Ordering::SeqCst)
        }
    }

    /// Relays what nats-server sends, one protocol line (and a message's
    /// payload) at a time, dropping one revoked-bucket acknowledgement when
    /// armed.
    async fn lose_one_ack(
        from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        armed: Arc<AtomicUsize>,
        lost: Arc<AtomicUsize>,
    ) {
        let mut from = BufReader::new(from);
        loop {
            let mut line = Vec::new();
            if from.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let mut payload = Vec::new();
            if line.starts_with(b"MSG ") || line.starts_with(b"HMSG ") {
                // `MSG <subject> <sid> [reply] <bytes>`, `HMSG ... <header
                // bytes> <total bytes>`: the last field is what follows,
                // then CRLF.
                let text = String::from_utf8_lossy(&line);
                let len: usize = text
                    .split_whitespace()
                    .last()
                    .and_then(|n| n.parse().ok())
                    .expect("message size");
                payload.resize(len + 2, 0);
                if from.read_exact(&mut payload).await.is_err() {
                    return;
                }
                if payload.starts_with(REVOKED_ACK) {
                    let before = armed
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                            DISARMED => None,
                            0 => Some(DISARMED),
                            n => Some(n - 1),
                        })
                        .unwrap_or(DISARMED);
                    if before == 0 {
                        lost.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                }
            }
            if to.write_all(&line).await.is_err() || to.write_all(&payload).await.is_err() {
                return;
            }
        }
    }

    /// `app` with its checker replaced by one that reaches nats-server
    /// through `relay`, so that it alone answers requests and enforces.
    async fn checker_behind(app: &mut TestApp, relay: &Relay) {
        for c in app.checkers.drain(..) {
            c.stop().await.expect("checker stops");
        }
        let nats = NatsOptions::new(format!("nats://127.0.0.1:{}", relay.port), "lossy-checker")
            .with_credentials(
                Some(Login::Checker.user().into()),
                Some(password_of(Login::Checker, &app.nats.service_password)),
            );
        let running = app.start_checker_via(nats).await;
        app.checkers.push(running);
    }

    /// Every message `sub` gets within `window`.
    async fn within(
        sub: &mut async_nats::Subscriber,
        window: Duration,
    ) -> Vec<async_nats::Message> {
        let mut all = Vec::new();
        let until = tokio::time::Instant::now() + window;
        while let Ok(Some(m)) = tokio::time::timeout_at(until, sub.next()).await {
            all.push(m);
        }
        all
    }

    fn of_kind(messages: &[async_nats::Message], kind: EventType) -> Vec<PresenceEvent> {
        messages
            .iter()
            .map(|m| serde_json::from_slice::<PresenceEvent>(&m.payload).unwrap())
            .filter(|e| e.kind == kind)
            .collect()
    }

    #[tokio::test]
    async fn a_kick_whose_revocation_acknowledgement_is_lost_is_told_once_and_answered_kicked() {
        kick_with_a_lost_acknowledgement(REVOCATION).await;
    }

    #[tokio::test]
    async fn a_kick_whose_ledger_acknowledgement_is_lost_is_told_once_and_answered_kicked() {
        kick_with_a_lost_acknowledgement(LEDGER).await;
    }

    #[tokio::test]
    async fn an_eviction_whose_revocation_acknowledgement_is_lost_is_told_once() {
        eviction_with_a_lost_acknowledgement(REVOCATION).await;
    }

    #[tokio::test]
    async fn an_eviction_whose_ledger_acknowledgement_is_lost_is_told_once() {
        eviction_with_a_lost_acknowledgement(LEDGER).await;
    }

    /// A kick whose ledger write or revocation (`which`) lands but is not
    /// acknowledged: still answered `kicked`, told to the device once.
    async fn kick_with_a_lost_acknowledgement(which: usize) {
        let (mut app, dev, mut ctl, mut ev) = watched(limit(2, Policy::EvictOldest), "tv").await;
        let relay = Relay::start(&app.nats.url()).await;
        checker_behind(&mut app, &relay).await;
        let tv = joined(&app, &dev, "tv", "s1", 1).await;

        relay.arm(which);
        assert!(
            app.kick("acme", "s1").await,
            "the revocation landed: this kick ended the session"
        );
        assert_eq!(relay.lost(), 1, "its acknowledgement never came");
        let msg = next_control(&mut ctl).await;
        assert_eq!(
            (msg.kind, msg.session.as_str()),
            (ControlType::Revoked, "s1")
        );
        let events = within(&mut ev, Duration::from_millis(1500)).await;
        let revoked = of_kind(&events, EventType::Revoked);
        assert_eq!(revoked.len(), 1, "{events:?}");
        assert_eq!(revoked[0].session.as_str(), "s1");
        assert!(
            within(&mut ctl, Duration::from_millis(500))
                .await
                .is_empty(),
            "told once"
        );
        app.wait_count("acme", 0).await;
        assert!(!app.kick("acme", "s1").await, "nothing left to kick");
        tv.silence().await;
    }

    /// An eviction whose ledger write or revocation (`which`) lands but is
    /// not acknowledged: the device and observers are told once.
    async fn eviction_with_a_lost_acknowledgement(which: usize) {
        let (mut app, dev, mut ctl, mut ev) = watched(limit(1, Policy::EvictOldest), "first").await;
        let relay = Relay::start(&app.nats.url()).await;
        checker_behind(&mut app, &relay).await;
        let first = joined(&app, &dev, "first", "s1", 1).await;

        relay.arm(which);
        let second = Device::start(dev.clone(), "acme", "second", "s2", BEAT, plain());
        let msg = next_control(&mut ctl).await;
        assert_eq!(
            (msg.kind, msg.session.as_str()),
            (ControlType::DeviceLimitExceeded, "s1")
        );
        assert_eq!(relay.lost(), 1, "its acknowledgement never came");
        let events = within(&mut ev, Duration::from_millis(1500)).await;
        let evicted = of_kind(&events, EventType::Evicted);
        assert_eq!(evicted.len(), 1, "{events:?}");
        assert_eq!(
            (
                evicted[0].session.as_str(),
                evicted[0].by.as_ref().map(|b| b.session.as_str())
            ),
            ("s1", Some("s2"))
        );
        assert!(
            within(&mut ctl, Duration::from_millis(500))
                .await
                .is_empty(),
            "told once"
        );
        assert_eq!(app.active_sessions("acme").await, ["s2"]);
        assert_eq!(evictions(&app), 1.0);
        Device::silence_all(vec![first, second]).await;
    }
}
