//! Limits as products sell them, on a real nats-server: plans, per-content
//! limits, every policy, grace, takeover, concurrent changes of limits,
//! exactly-once enforcement with replicas, enforcement across clocks that
//! disagree, heartbeat flood protection and usage statistics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use headcount_client::ClientError;
use headcount_protocol::subjects::kv as keys;
use headcount_protocol::wire::{
    self, ControlType, EventType, Heartbeat, LimitsReply, PresenceEvent, SessionDict,
    SessionRecord, StatsReply, TokenReply,
};
use headcount_protocol::{
    AccountId, DeviceId, IntervalClock, Limit, Policy, SessionId, UnixMillis, now_millis,
};
use headcount_tests::{bad_request, check, control, events, next_control, next_event};
use serde_json::json;
use test_support::{Device, Login, TestApp};

const BEAT: Duration = Duration::from_millis(300);
const SOON: Duration = Duration::from_secs(5);

fn on(content: &str) -> Heartbeat {
    Heartbeat {
        content: Some(content.into()),
        ..Default::default()
    }
}

fn plain() -> Heartbeat {
    Heartbeat::default()
}

async fn limits_set(app: &TestApp, body: serde_json::Value) -> Result<LimitsReply, ClientError> {
    app.request("limits.set", &body).await
}

async fn limits_get(app: &TestApp, account: &str) -> LimitsReply {
    app.request("limits.get", &json!({ "account": account }))
        .await
        .unwrap()
}

async fn sessions_of(app: &TestApp, account: &str) -> Vec<String> {
    let mut s = app.active_sessions(account).await;
    s.sort();
    s
}

/// Collects every message on `subject` for `window` after the first one
/// (which must come within SOON).
async fn collect(sub: &mut async_nats::Subscriber, window: Duration) -> Vec<async_nats::Message> {
    let first = tokio::time::timeout(SOON, sub.next())
        .await
        .expect("a first message")
        .expect("subscription open");
    let mut all = vec![first];
    let until = Instant::now() + window;
    while let Ok(Some(m)) = tokio::time::timeout_at(until.into(), sub.next()).await {
        all.push(m);
    }
    all
}

#[tokio::test]
async fn plans_and_overrides_are_set_validated_and_applied_by_every_replica() {
    let mut app = TestApp::spawn().await;
    let second = app.start_checker().await;
    app.checkers.push(second);

    let r = limits_set(&app, json!({"account": "acme", "plan": "premium"}))
        .await
        .unwrap();
    assert_eq!((r.limit, r.plan.as_deref()), (4, Some("premium")));
    // Both replicas answer with the new limit (requests spread over them).
    let deadline = Instant::now() + SOON;
    loop {
        let mut all = true;
        for _ in 0..10 {
            all &= limits_get(&app, "acme").await.limit == 4;
        }
        if all {
            break;
        }
        assert!(Instant::now() < deadline, "a replica kept the old limit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // An override on top of the plan; the rest stays.
    let r = limits_set(
        &app,
        json!({"account": "acme", "policy": "evict-least-active", "per_content": 2, "grace": {"seats": 1, "secs": 30}}),
    )
    .await
    .unwrap();
    assert_eq!(r.limit, 4);
    assert_eq!(r.plan.as_deref(), Some("premium"));
    assert_eq!(r.policy, Policy::EvictLeastActive);
    assert_eq!(r.per_content, Some(2));
    assert_eq!(r.grace.map(|g| (g.seats, g.secs)), Some((1, 30)));

    // Bad input: a clear 400, nothing changed.
    for (body, mentions) in [
        (
            json!({"account": "acme", "plan": "platinum"}),
            "unknown plan",
        ),
        (json!({"account": "acme", "limit": -1}), "limit"),
        (json!({"account": "acme", "limit": 1_000_000}), "limit"),
        (
            json!({"account": "acme", "policy": "evict-newest"}),
            "policy",
        ),
        (json!({"account": "acme", "per_content": 0}), "per-content"),
        (
            json!({"account": "acme", "grace": {"seats": 1, "secs": 0}}),
            "grace",
        ),
        (
            json!({"account": "acme", "limit": 2, "colour": "red"}),
            "colour",
        ),
    ] {
        let msg = bad_request(&app, "limits.set", body.to_string()).await;
        assert!(msg.contains(mentions), "{msg:?} should mention {mentions}");
    }
    let after = limits_get(&app, "acme").await;
    assert_eq!(after, r, "nothing changed");

    // Reset: back to the default.
    let r = limits_set(&app, json!({"account": "acme", "reset": true}))
        .await
        .unwrap();
    assert_eq!((r.limit, r.plan), (2, None));
}

#[tokio::test]
async fn concurrent_changes_to_one_account_on_two_checkers_are_all_kept() {
    let mut app = TestApp::spawn().await;
    let second = app.start_checker().await;
    app.checkers.push(second);
    let default = (app.default_limit.limit, app.default_limit.policy);

    // For each account, a limit and a policy at once: the requests spread
    // over both checkers, and each pair races on one record.
    let accounts: Vec<(String, u32)> = (0..20).map(|i| (format!("acct{i}"), 3 + i % 5)).collect();
    let replies = futures::future::join_all(accounts.iter().map(|(account, limit)| {
        let app = &app;
        async move {
            let (l, p) = tokio::join!(
                limits_set(app, json!({"account": account, "limit": limit})),
                limits_set(app, json!({"account": account, "policy": "reject-new"})),
            );
            (l.unwrap(), p.unwrap())
        }
    }))
    .await;

    for ((account, limit), (l, p)) in accounts.iter().zip(replies) {
        // Each reply is a record that was stored: its own field, and the
        // other request's only if that one landed first. The one that
        // landed second was written on top of the first.
        assert_eq!(l.limit, *limit, "{account}: {l:?}");
        assert!(
            [default.1, Policy::RejectNew].contains(&l.policy),
            "{account}: {l:?}"
        );
        assert_eq!(p.policy, Policy::RejectNew, "{account}: {p:?}");
        assert!([default.0, *limit].contains(&p.limit), "{account}: {p:?}");
        assert!(
            l.policy == Policy::RejectNew || p.limit == *limit,
            "{account}: neither was written on top of the other: {l:?} {p:?}"
        );
        // And every replica ends up with both fields.
        let deadline = Instant::now() + SOON;
        loop {
            let mut both = true;
            for _ in 0..4 {
                let r = limits_get(&app, account).await;
                both &= (r.limit, r.policy) == (*limit, Policy::RejectNew);
            }
            if both {
                break;
            }
            let r = limits_get(&app, account).await;
            assert!(Instant::now() < deadline, "{account} lost a field: {r:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn a_plan_carried_in_a_token_sets_the_limit() {
    let app = TestApp::spawn().await;
    let _tv = app.start_token_vendor("key").await;
    let token_on = |plan: &str| json!({"account": "acme", "device": "tv", "plan": plan});
    let _t: TokenReply = app.request("token", &token_on("basic")).await.unwrap();
    let deadline = Instant::now() + SOON;
    while limits_get(&app, "acme").await.plan.as_deref() != Some("basic") {
        assert!(Instant::now() < deadline, "token plan not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(limits_get(&app, "acme").await.limit, 1);
    // The operator's choice wins over the token's.
    limits_set(&app, json!({"account": "acme", "plan": "premium"}))
        .await
        .unwrap();
    assert_eq!(limits_get(&app, "acme").await.limit, 4);
    // An unknown plan in a token request is refused.
    let msg = bad_request(&app, "token", token_on("gold").to_string()).await;
    assert!(msg.contains("unknown plan"), "{msg}");
}

#[tokio::test]
async fn per_content_limits_evict_within_one_content_only() {
    let app = TestApp::spawn().await;
    limits_set(
        &app,
        json!({"account": "acme", "limit": 5, "per_content": 1}),
    )
    .await
    .unwrap();
    let dev = app.nats.fleet_client().await;
    let a = Device::start(dev.clone(), "acme", "a", "s1", BEAT, on("class-1"));
    app.wait_active("acme", SOON, |r| r.active == 1).await;
    let c = Device::start(dev.clone(), "acme", "c", "s3", BEAT, on("class-2"));
    app.wait_active("acme", SOON, |r| r.active == 2).await;
    let b = Device::start(dev.clone(), "acme", "b", "s2", BEAT, on("class-1"));
    let (r, took) = app
        .wait_active("acme", SOON, |r| {
            let s: Vec<&str> = r.sessions.iter().map(|s| s.session.as_str()).collect();
            s.len() == 2 && s.contains(&"s2") && s.contains(&"s3")
        })
        .await;
    assert!(
        took.is_some(),
        "s1 evicted for s2 on class-1, s3 untouched: {r:?}"
    );
    Device::silence_all([a, b, c]).await;
}

#[tokio::test]
async fn evict_least_active_ends_the_quietest_session_not_the_oldest() {
    let app = TestApp::spawn_with(Limit::new(2, Policy::EvictLeastActive).unwrap()).await;
    let dev = app.nats.fleet_client().await;
    let oldest = Device::start(dev.clone(), "acme", "oldest", "s1", BEAT, plain());
    app.wait_active("acme", SOON, |r| r.active == 1).await;
    // "quiet" beats once and then pauses (its player is paused) ...
    app.heartbeat(&dev, "acme", "quiet", "s2", &plain()).await;
    app.wait_active("acme", SOON, |r| r.active == 2).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    // ... when a third device starts.
    let new = Device::start(dev.clone(), "acme", "new", "s3", BEAT, plain());
    let (r, took) = app
        .wait_active("acme", SOON, |r| {
            let s: Vec<&str> = r.sessions.iter().map(|s| s.session.as_str()).collect();
            s == ["s1", "s3"]
        })
        .await;
    assert!(
        took.is_some(),
        "the quiet session goes, the oldest stays: {r:?}"
    );
    oldest.silence().await;
    new.silence().await;
}

#[tokio::test]
async fn grace_allows_an_overage_for_a_while_then_enforces() {
    let app = TestApp::spawn_with(Limit::new(1, Policy::EvictOldest).unwrap()).await;
    limits_set(
        &app,
        json!({"account": "acme", "grace": {"seats": 1, "secs": 2}}),
    )
    .await
    .unwrap();
    let mut events = events(&app, "acme").await;
    let dev = app.nats.fleet_client().await;
    let first = Device::start(dev.clone(), "acme", "first", "s1", BEAT, plain());
    app.wait_active("acme", SOON, |r| r.active == 1).await;
    let second = Device::start(dev.clone(), "acme", "second", "s2", BEAT, plain());
    // Both play during the grace.
    let (r, took) = app.wait_active("acme", SOON, |r| r.active == 2).await;
    assert!(
        took.is_some(),
        "the second device got its grace seat: {r:?}"
    );
    // Then the limit holds again: the oldest goes.
    let (r, took) = app
        .wait_active("acme", SOON, |r| {
            r.sessions.len() == 1 && r.sessions[0].session.as_str() == "s2"
        })
        .await;
    assert!(took.is_some(), "enforced after the grace: {r:?}");
    let ev = next_event(&mut events, EventType::Evicted).await;
    assert_eq!(ev.session.as_str(), "s1");
    first.silence().await;
    second.silence().await;
}

#[tokio::test]
async fn takeover_signs_out_the_chosen_device_and_says_who_took_over() {
    let app = TestApp::spawn_with(Limit::new(2, Policy::RejectNew).unwrap()).await;
    let dev = app.nats.fleet_client().await;
    let mut ctl = control(&dev, "acme", "kitchen").await;
    let a = Device::start(dev.clone(), "acme", "kitchen", "s1", BEAT, plain());
    let b = Device::start(dev.clone(), "acme", "bedroom", "s2", BEAT, plain());
    app.wait_active("acme", SOON, |r| r.active == 2).await;

    // Without a choice, reject-new refuses the third device.
    let r = check(&app, json!({"account": "acme", "device": "phone"})).await;
    assert!(!r.allowed && r.evicted.is_empty());
    // Naming a session of another account (or none at all) is an error,
    // and nothing changes.
    let elsewhere = json!({"account": "other", "device": "phone", "evict": "s1"});
    let msg = bad_request(&app, "check", elsewhere.to_string()).await;
    assert!(msg.contains("not an active session"), "{msg}");
    assert_eq!(app.active("acme").await.active, 2);

    // The user picks the kitchen TV to sign out.
    let r = check(
        &app,
        json!({"account": "acme", "device": "phone", "session": "p1", "evict": "s1"}),
    )
    .await;
    assert!(r.allowed);
    assert_eq!(r.evicted.len(), 1);
    assert_eq!(r.evicted[0].session.as_str(), "s1");
    let c = next_control(&mut ctl).await;
    assert_eq!(c.kind, ControlType::DeviceLimitExceeded);
    let by = c.by.expect("the notice says who took over");
    assert_eq!((by.device.as_str(), by.session.as_str()), ("phone", "p1"));
    a.silence().await;
    b.silence().await;
}

#[tokio::test]
async fn with_three_checkers_and_two_handlers_each_ending_happens_once() {
    let mut app = TestApp::spawn_with(Limit::new(1, Policy::EvictOldest).unwrap()).await;
    for _ in 0..2 {
        let c = app.start_checker().await;
        app.checkers.push(c);
    }
    let h = app.start_handler().await;
    app.handlers.push(h);
    assert_eq!((app.checkers.len(), app.handlers.len()), (3, 2));

    let dev = app.nats.fleet_client().await;
    let mut ctl = control(&dev, "acme", "first").await;
    let mut evicted = events(&app, "acme").await;

    let first = Device::start(dev.clone(), "acme", "first", "s1", BEAT, plain());
    app.wait_active("acme", SOON, |r| r.active == 1).await;
    let second = Device::start(dev.clone(), "acme", "second", "s2", BEAT, plain());

    let notices = collect(&mut ctl, Duration::from_millis(1500)).await;
    assert_eq!(notices.len(), 1, "one control message, not one per checker");
    // Events: exactly one eviction, and the active set settles on s2 and
    // stays there (no flapping).
    let events: Vec<PresenceEvent> = collect(&mut evicted, Duration::from_millis(1500))
        .await
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    let evictions: Vec<&PresenceEvent> = events
        .iter()
        .filter(|e| e.kind == EventType::Evicted)
        .collect();
    assert_eq!(evictions.len(), 1, "{events:?}");
    assert_eq!(evictions[0].session.as_str(), "s1");
    for _ in 0..10 {
        let s: Vec<String> = sessions_of(&app, "acme").await;
        assert_eq!(s, ["s2"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.silence().await;

    // A timeout is announced once too.
    second.silence().await;
    let timeouts = tokio::time::timeout(SOON, async {
        let mut n = Vec::new();
        let until = Instant::now() + Duration::from_secs(4);
        while let Ok(Some(m)) = tokio::time::timeout_at(until.into(), evicted.next()).await {
            let e: PresenceEvent = serde_json::from_slice(&m.payload).unwrap();
            if e.kind == EventType::Timeout {
                n.push(e);
            }
        }
        n
    })
    .await
    .unwrap();
    assert_eq!(timeouts.len(), 1, "{timeouts:?}");
    assert_eq!(timeouts[0].session.as_str(), "s2");
}

/// An interval dictionary of `(device, session, since, last_seen)`.
fn dict(entries: &[(&str, &str, UnixMillis, UnixMillis)]) -> bytes::Bytes {
    let dict: SessionDict = entries
        .iter()
        .map(|(device, session, since, last_seen)| {
            let record = SessionRecord {
                session: SessionId::parse(session).unwrap(),
                since: *since,
                last_seen: *last_seen,
                labels: Default::default(),
                replaced: None,
            };
            (DeviceId::parse(device).unwrap(), record)
        })
        .collect();
    wire::encode_dict(&dict).into()
}

#[tokio::test]
async fn a_handler_whose_clock_is_ahead_is_counted_and_enforced_at_once() {
    let mut app = TestApp::spawn_with(Limit::new(1, Policy::EvictOldest).unwrap()).await;
    // The test plays a handler whose clock is almost an interval ahead of
    // the checker's: with the handler's login, it writes the dictionaries
    // as a handler does (compare-and-set). The app's own handler is
    // stopped, so that nothing else records the sessions.
    app.handlers.remove(0).stop().await.unwrap();
    let handler = app
        .nats
        .login_options(Login::Handler, "test-handler-ahead")
        .connect()
        .await
        .unwrap();
    let sessions = async_nats::jetstream::new(handler)
        .get_key_value(keys::SESSIONS_BUCKET)
        .await
        .unwrap();
    let clock = IntervalClock::new(app.timings.interval);
    let skew = app.timings.interval.as_millis() as u64 - 10;
    let dev = app.nats.fleet_client().await;

    // Each try starts as an interval begins and proves something only if
    // the checker's clock is still in that interval when it ends.
    for attempt in 0..3 {
        let account = format!("acme{attempt}");
        let id = AccountId::parse(&account).unwrap();
        let n = clock.interval_of(now_millis()) + 1;
        let wait = clock.start_of(n) + 20 - now_millis();
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let mut ev = events(&app, &account).await;

        // s1 plays; a handler recorded it in interval n.
        let old = Device::start(dev.clone(), &account, "old", "s1", BEAT, plain());
        let since = now_millis();
        let at_n = dict(&[("old", "s1", since, since)]);
        sessions
            .create(keys::session_dict(&id, n), at_n)
            .await
            .unwrap();
        app.wait_active(&account, SOON, |r| r.active == 1).await;

        // The handler ahead, in interval n + 1 by its clock, carries s1 on:
        // still counted, once.
        let carried = dict(&[("old", "s1", since, now_millis() + skew)]);
        let revision = sessions
            .create(keys::session_dict(&id, n + 1), carried)
            .await
            .unwrap();
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            assert_eq!(sessions_of(&app, &account).await, ["s1"], "{account}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // s2 joins there: the account is over its limit of one now, and
        // the oldest goes for the newcomer.
        let new = Device::start(dev.clone(), &account, "new", "s2", BEAT, plain());
        let joined = now_millis() + skew;
        let both = dict(&[("old", "s1", since, joined), ("new", "s2", joined, joined)]);
        sessions
            .update(keys::session_dict(&id, n + 1), both, revision)
            .await
            .unwrap();
        let evicted = next_event(&mut ev, EventType::Evicted).await;
        assert_eq!(evicted.session.as_str(), "s1");
        let by = evicted.by.expect("evicted for the newcomer");
        assert_eq!(by.session.as_str(), "s2");
        let (r, took) = app
            .wait_active(&account, SOON, |r| {
                r.sessions.len() == 1 && r.sessions[0].session.as_str() == "s2"
            })
            .await;
        assert!(took.is_some(), "{r:?}");
        let in_time = now_millis() < clock.start_of(n + 1);
        Device::silence_all([old, new]).await;
        if in_time {
            return;
        }
    }
    panic!("no try ended within its interval: the checker's clock always caught up");
}

#[tokio::test]
async fn a_flooding_device_is_rate_limited_without_hurting_others() {
    let mut app = TestApp::spawn().await;
    // Replace the default handler by one with a strict limit.
    app.handlers.remove(0).stop().await.unwrap();
    app.timings.max_rate = 5.0;
    app.timings.burst = 5;
    let h = app.start_handler().await;
    app.handlers.push(h);

    let dev = app.nats.fleet_client().await;
    let calm = Device::start(dev.clone(), "acme", "calm", "c1", BEAT, plain());
    for _ in 0..300 {
        app.heartbeat_nowait(&dev, "acme", "flood", "f1", &plain())
            .await;
    }
    dev.flush().await.unwrap();
    let h = &app.handlers[0];
    let deadline = Instant::now() + SOON;
    while h.metric(r#"headcount_heartbeats_total{result="rate_limited"}"#) < 250.0 {
        assert!(Instant::now() < deadline, "flood not limited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The flooding session is still recorded (its first beats got in) and
    // the calm device keeps playing.
    let (r, took) = app.wait_active("acme", SOON, |r| r.active == 2).await;
    assert!(took.is_some(), "{r:?}");
    let accepted_before = h.metric(r#"headcount_heartbeats_total{result="accepted"}"#);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        h.metric(r#"headcount_heartbeats_total{result="accepted"}"#) > accepted_before,
        "the calm device's heartbeats still count"
    );
    calm.silence().await;
}

#[tokio::test]
async fn stats_break_usage_down_and_metrics_carry_bounded_gauges() {
    let app = TestApp::spawn_with(Limit::new(10, Policy::EvictOldest).unwrap()).await;
    let dev = app.nats.fleet_client().await;
    let hb = |content: &str, kind: &str, region: &str| Heartbeat {
        content: Some(content.into()),
        kind: Some(kind.into()),
        region: Some(region.into()),
        ..Default::default()
    };
    let devices = vec![
        Device::start(dev.clone(), "acme", "a", "s1", BEAT, hb("m1", "tv", "eu")),
        Device::start(dev.clone(), "acme", "b", "s2", BEAT, hb("m1", "web", "eu")),
        Device::start(dev.clone(), "acme", "c", "s3", BEAT, hb("m2", "web", "us")),
        Device::start(dev.clone(), "small", "d", "s4", BEAT, hb("m9", "ios", "us")),
    ];
    app.wait_active("acme", SOON, |r| r.active == 3).await;
    app.wait_active("small", SOON, |r| r.active == 1).await;

    let r: StatsReply = app
        .request("stats", &json!({"account": "acme"}))
        .await
        .unwrap();
    assert_eq!(r.active, 3);
    assert!(r.peak >= 3);
    assert_eq!(r.by_content.get("m1"), Some(&2));
    assert_eq!(r.by_kind.get("web"), Some(&2));
    assert_eq!(r.by_region.get("us"), Some(&1));

    let all: StatsReply = app.request("stats", &json!({"top": 1})).await.unwrap();
    assert_eq!(all.active, 4);
    assert_eq!(all.top.len(), 1);
    assert_eq!(all.top[0].account.as_str(), "acme");
    assert_eq!(all.top[0].active, 3);

    // The gauges (refreshed every fifth sweep in tests).
    let checker = &app.checkers[0];
    let deadline = Instant::now() + SOON;
    while checker.metric(r#"headcount_active_sessions_by_kind{kind="web"}"#) != 2.0 {
        assert!(Instant::now() < deadline, "{}", checker.metrics_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        checker.metric(r#"headcount_active_sessions_by_region{region="us"}"#),
        2.0
    );
    Device::silence_all(devices).await;
}
