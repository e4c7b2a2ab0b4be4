//! Attacks by the holder of each credential, against a real nats-server
//! running the repository's `nats.conf` and the services behind it. Each
//! test names what the holder tries and asserts that it did no harm.
//!
//! - backend token: reply-subject injection into heartbeats and into the
//!   JetStream API, reading another backend's replies, touching KV;
//! - operator token: the same injections; revocation and key rotation end it;
//! - device token: large publishes, many subscriptions, a second connection
//!   with the same token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use async_nats::Event;
use bytes::Bytes;
use futures::StreamExt;
use headcount_protocol::wire::{Heartbeat, TokenRequest};
use headcount_protocol::{AccountId, DeviceId, Limit, Policy};
use headcount_tests::app_with_vendor;
use serde_json::json;
use test_support::{TestApp, TokenVendor};
use tokio::sync::mpsc;

const KEY: &str = "operator-key-for-attacks";
const SOON: Duration = Duration::from_secs(5);

/// A connection with `token` (and `inbox_prefix`, for operator and backend
/// tokens) that reports its events.
async fn watched(
    app: &TestApp,
    token: &str,
    inbox_prefix: Option<&str>,
) -> (async_nats::Client, mpsc::UnboundedReceiver<Event>) {
    app.nats.watched_connect(token, inbox_prefix).await
}

/// Waits for an event that `pick` accepts; its text, or None after `wait`.
async fn event_where(
    events: &mut mpsc::UnboundedReceiver<Event>,
    wait: Duration,
    pick: impl Fn(&Event) -> bool,
) -> Option<String> {
    tokio::time::timeout(wait, async {
        loop {
            match events.recv().await {
                Some(e) if pick(&e) => return e.to_string(),
                Some(_) => continue,
                None => std::future::pending::<()>().await,
            }
        }
    })
    .await
    .ok()
}

fn is_disconnect(e: &Event) -> bool {
    matches!(e, Event::Disconnected)
}

/// Waits until the connection reporting on `events` is closed, which must
/// come soon; `open` says what it means if it stays open.
async fn assert_closed(events: &mut mpsc::UnboundedReceiver<Event>, open: &str) {
    assert!(
        event_where(events, SOON, is_disconnect).await.is_some(),
        "{open}"
    );
}

fn server_error_containing(what: &'static str) -> impl Fn(&Event) -> bool {
    move |e| matches!(e, Event::ServerError(err) if err.to_string().to_lowercase().contains(what))
}

/// Bytes that no endpoint accepts: each answers with an error.
const GARBAGE: &[u8] = b"\xff not json";

/// The subjects a service reply was once steered onto to do harm.
fn injection_targets() -> Vec<String> {
    vec![
        "hb.acme.phantom.s-phantom".into(),
        "hbp.15.acme.phantom.s-phantom".into(),
        "$JS.API.STREAM.PURGE.KV_headcount-revoked".into(),
        "$JS.API.STREAM.DELETE.KV_headcount-revoked".into(),
        "$JS.API.STREAM.DELETE.KV_headcount-sessions".into(),
        "ctl.acme.tv".into(),
    ]
}

/// Sends every endpoint the holder may call a malformed request whose reply
/// subject is each injection target, then waits long enough for any harm.
async fn inject(client: &async_nats::Client, endpoints: &[&str]) {
    for endpoint in endpoints {
        for target in injection_targets() {
            client
                .publish_with_reply(
                    format!("headcount.{endpoint}"),
                    target,
                    Bytes::from_static(GARBAGE),
                )
                .await
                .expect("publish");
        }
    }
    client.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// The harm an injected reply could do, checked from the services' side:
/// no phantom session, the real session still counted and not ended, the
/// revocations intact and enforced, both streams still there, and a new
/// device still connects.
async fn assert_no_harm(
    app: &TestApp,
    tv: &TokenVendor,
    spy: &mut async_nats::Subscriber,
    real_session: &str,
    revoked_token: &str,
) {
    // Nothing reached a heartbeat subject but the real device's beats.
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(200), spy.next()).await {
        assert!(
            !msg.subject.contains("phantom"),
            "a reply reached {}",
            msg.subject
        );
    }
    let active = app.active_sessions("acme").await;
    assert_eq!(active, vec![real_session.to_string()], "acme's sessions");
    // The revoked token stays refused: the revocations were not purged.
    assert!(
        app.nats.device_connect(revoked_token).await.is_err(),
        "a revoked token connected again"
    );
    // Both streams are there and a new device gets in and is counted.
    let js = async_nats::jetstream::new(app.client.clone());
    for stream in ["KV_headcount-revoked", "KV_headcount-sessions"] {
        js.get_stream(stream)
            .await
            .unwrap_or_else(|e| panic!("{stream} is gone: {e}"));
    }
    let _fresh = beating_device(app, tv, "globex", "phone").await;
    app.wait_count("globex", 1).await;
}

/// A device of `account` connected with its own token, after its first
/// heartbeat.
async fn beating_device(
    app: &TestApp,
    tv: &TokenVendor,
    account: &str,
    device: &str,
) -> (async_nats::Client, String, String) {
    let t = tv.token(account, device);
    let client = app
        .nats
        .device_connect(&t.token)
        .await
        .expect("a device with a valid token connects");
    app.heartbeat(
        &client,
        account,
        device,
        t.session.as_str(),
        &Heartbeat::default(),
    )
    .await;
    (client, t.session.to_string(), t.token)
}

/// A real device heartbeating in acme, and a revoked session of acme.
async fn victims(app: &TestApp, tv: &TokenVendor) -> (async_nats::Client, String, String) {
    let (device, session, _) = beating_device(app, tv, "acme", "tv").await;
    let (old, ended, ended_token) = beating_device(app, tv, "acme", "old-phone").await;
    app.wait_count("acme", 2).await;
    assert!(app.kick("acme", &ended).await);
    app.wait_count("acme", 1).await;
    drop(old);
    (device, session, ended_token)
}

/// Keeps `device` heartbeating as `acme/tv/session` until dropped.
fn keep_beating(device: async_nats::Client, session: String) -> AbortOnDrop {
    let task = tokio::spawn(async move {
        loop {
            let hb = Heartbeat::default();
            let _ = device
                .publish(format!("hb.acme.tv.{session}"), hb.encode().into())
                .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    AbortOnDrop(task)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A client holding `token` sends every endpoint it may call malformed
/// requests with harmful reply subjects, beside a real device and a
/// revoked session; nothing is harmed.
async fn replies_cannot_be_steered(
    token: impl FnOnce(&TokenVendor) -> token_vendor::OperatorToken,
    endpoints: &[&str],
) {
    let (app, tv) = app_with_vendor(2, Policy::EvictOldest, KEY).await;
    let mut spy = app.client.subscribe("hbp.>").await.expect("spy");
    let (device, session, revoked) = victims(&app, &tv).await;
    let _beating = keep_beating(device, session.clone());
    let attacker = app
        .nats
        .client_connect(&token(&tv))
        .await
        .expect("the attacker's token connects");
    inject(&attacker, endpoints).await;
    assert_no_harm(&app, &tv, &mut spy, &session, &revoked).await;
}

#[tokio::test]
async fn a_backend_cannot_steer_service_replies_onto_heartbeats_or_jetstream() {
    replies_cannot_be_steered(
        |tv| tv.backend_token("attacker"),
        &["active", "check", "limits.get", "token", "stats"],
    )
    .await;
}

#[tokio::test]
async fn an_operator_cannot_steer_service_replies_onto_heartbeats_or_jetstream() {
    replies_cannot_be_steered(
        TokenVendor::operator_token,
        &["active", "stats", "limits.get", "limits.set", "kick"],
    )
    .await;
}

#[tokio::test]
async fn a_backend_cannot_read_another_backends_replies_nor_any_jetstream_traffic() {
    let (app, tv) = app_with_vendor(3, Policy::EvictOldest, KEY).await;
    let victim_token = tv.backend_token("shop");
    let victim = app
        .nats
        .client_connect(&victim_token)
        .await
        .expect("victim backend");
    let victim_prefix = victim_token.inbox_prefix.clone();
    let (attacker, mut events) = {
        let t = tv.backend_token("attacker");
        watched(&app, &t.token, Some(&t.inbox_prefix)).await
    };
    // Every wide or foreign subscription is refused by the server.
    let forbidden = [
        "_INBOX.>".to_string(),
        ">".to_string(),
        "_INBOX_>".to_string(),
        format!("{victim_prefix}.>"),
        "$JS.>".to_string(),
        "$KV.>".to_string(),
        "_R_.>".to_string(),
        "hb.>".to_string(),
        "hbp.>".to_string(),
        "ctl.>".to_string(),
    ];
    let mut subs = Vec::new();
    for subject in &forbidden {
        subs.push(attacker.subscribe(subject.clone()).await.expect("sent"));
        attacker.flush().await.expect("flush");
        let err = event_where(&mut events, SOON, server_error_containing("permissions"))
            .await
            .unwrap_or_else(|| panic!("no permissions violation for {subject}"));
        assert!(err.contains("ubscription"), "{subject}: {err}");
    }
    // The victim asks for a device token; the attacker sees nothing of it.
    let reply = headcount_client::Client::new(victim.clone())
        .token(&TokenRequest {
            account: AccountId::parse("acme").unwrap(),
            device: DeviceId::parse("tv").unwrap(),
            plan: None,
        })
        .await
        .expect("the victim gets its token");
    assert!(!reply.token.is_empty());
    for sub in subs.iter_mut() {
        let got = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
        assert!(
            !matches!(got, Ok(Some(_))),
            "the attacker read {:?}",
            got.map(|m| m.map(|m| m.subject))
        );
    }
    // No JetStream API either: the account has none, and publishing there
    // is not allowed.
    let info = tokio::time::timeout(
        Duration::from_secs(2),
        attacker.request("$JS.API.INFO", Bytes::new()),
    )
    .await;
    assert!(!matches!(info, Ok(Ok(_))), "JetStream answered: {info:?}");
}

#[tokio::test]
async fn a_device_cannot_publish_a_large_message() {
    let (app, tv) = app_with_vendor(3, Policy::EvictOldest, KEY).await;
    let mut spy = app.client.subscribe("hbp.>").await.expect("spy");
    let t = tv.token("acme", "tv");
    let (device, mut events) = watched(&app, &t.token, None).await;
    let subject = format!("hb.acme.tv.{}", t.session);
    device
        .publish(subject.clone(), Bytes::from(vec![0x80u8; 64 * 1024]))
        .await
        .expect("sent");
    let _ = device.flush().await;
    let err = event_where(&mut events, SOON, |e| {
        is_disconnect(e) || server_error_containing("payload")(e)
    })
    .await;
    assert!(err.is_some(), "the server accepted a 64 KiB heartbeat");
    // Nothing of it reached the services.
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(300), spy.next()).await {
        assert!(
            msg.payload.len() <= 1024,
            "{} bytes reached {}",
            msg.payload.len(),
            msg.subject
        );
    }
}

#[tokio::test]
async fn a_device_cannot_hold_many_subscriptions() {
    let (app, tv) = app_with_vendor(3, Policy::EvictOldest, KEY).await;
    let t = tv.token("acme", "tv");
    let (device, mut events) = watched(&app, &t.token, None).await;
    let mut subs = Vec::new();
    for _ in 0..16 {
        subs.push(device.subscribe("ctl.acme.tv").await.expect("sent"));
    }
    let _ = device.flush().await;
    let err = event_where(&mut events, SOON, |e| {
        server_error_containing("subscriptions")(e) || is_disconnect(e)
    })
    .await;
    assert!(
        err.is_some(),
        "16 subscriptions of one device were accepted"
    );
}

/// A device connection with `token` that reconnects at most once.
async fn short_lived(
    app: &TestApp,
    token: &str,
) -> (async_nats::Client, mpsc::UnboundedReceiver<Event>) {
    app.nats
        .connect_watched(
            async_nats::ConnectOptions::with_token(token.to_string()).max_reconnects(Some(1)),
        )
        .await
        .expect("a valid token connects")
}

fn connected(c: &async_nats::Client) -> bool {
    c.connection_state() == async_nats::connection::State::Connected
}

#[tokio::test]
async fn a_second_connection_with_one_device_token_replaces_the_first() {
    let (app, tv) = app_with_vendor(3, Policy::EvictOldest, KEY).await;
    let t = tv.token("acme", "tv");
    let (first, mut first_events) = short_lived(&app, &t.token).await;
    first.flush().await.expect("first is up");
    let (second, _) = short_lived(&app, &t.token).await;
    assert_closed(&mut first_events, "the first connection was not closed").await;
    // Ten more at once with the same token: when the knocking-off settles
    // (each reconnects once), at most one connection of the session is open.
    let mut clients = vec![first, second];
    // Connects racing the reconnects may be refused; none may stay beside
    // another.
    for _ in 0..10 {
        if let Ok(c) = async_nats::ConnectOptions::with_token(t.token.clone())
            .max_reconnects(Some(1))
            .connect(app.nats.url())
            .await
        {
            clients.push(c);
        }
    }
    // A replaced connection is closed a moment after its successor is let
    // in, so look for a steady state: at most one open for two seconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut steady = 0;
    while steady < 10 {
        let open = clients.iter().filter(|c| connected(c)).count();
        steady = if open <= 1 { steady + 1 } else { 0 };
        assert!(
            std::time::Instant::now() < deadline,
            "{open} connections of one session stay open"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The session itself is fine: a connection with its token is counted.
    // A straggler of the ten may still knock a new connection off once, as
    // it reconnects, so the device beats (and reconnects) as a device does.
    drop(clients);
    let (device, _) = short_lived(&app, &t.token).await;
    for _ in 0..20 {
        app.heartbeat_nowait(
            &device,
            "acme",
            "tv",
            t.session.as_str(),
            &Heartbeat::default(),
        )
        .await;
        let _ = device.flush().await;
        let (_, took) = app
            .wait_active("acme", Duration::from_millis(500), |r| r.active == 1)
            .await;
        if took.is_some() {
            return;
        }
    }
    app.wait_count("acme", 1).await;
}

/// POST to token-vendor with the operator key.
async fn post(tv: &TokenVendor, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{}{path}", tv.http))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .expect("token-vendor answers");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

#[tokio::test]
async fn a_revoked_operator_or_backend_token_is_disconnected_and_refused() {
    let (app, tv) = app_with_vendor(3, Policy::EvictOldest, KEY).await;
    for token in [tv.operator_token(), tv.backend_token("shop")] {
        let (client, mut events) = watched(&app, &token.token, Some(&token.inbox_prefix)).await;
        headcount_client::Client::new(client.clone())
            .active(&AccountId::parse("acme").unwrap())
            .await
            .expect("works before the revocation");
        let (status, body) = post(&tv, "/v1/tokens/revoke", json!({"token": token.token})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["connections_closed"], 1, "{body}");
        assert_closed(&mut events, "the revoked token's connection stayed open").await;
        assert!(app.nats.client_connect(&token).await.is_err());
    }
    // A device token is not revoked this way.
    let device = tv.token("acme", "tv");
    let (status, _) = post(&tv, "/v1/tokens/revoke", json!({"token": device.token})).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn a_key_rotation_ends_operator_and_backend_tokens_but_not_device_tokens() {
    let (app, tv) = app_with_vendor(3, Policy::EvictOldest, KEY).await;
    let operator = tv.operator_token();
    let backend = tv.backend_token("shop");
    let device = tv.token("acme", "tv");
    let (_op, mut op_events) = watched(&app, &operator.token, Some(&operator.inbox_prefix)).await;
    let (_be, mut be_events) = watched(&app, &backend.token, Some(&backend.inbox_prefix)).await;
    let (status, _) = post(&tv, "/v1/keys/rotate", json!({})).await;
    assert_eq!(status, 200);
    for events in [&mut op_events, &mut be_events] {
        assert_closed(events, "a client connection outlived the rotation").await;
    }
    assert!(app.nats.client_connect(&operator).await.is_err());
    assert!(app.nats.client_connect(&backend).await.is_err());
    // Device tokens signed by the old key keep working until they expire.
    app.nats
        .device_connect(&device.token)
        .await
        .expect("a device token outlives the rotation");
    // New operator tokens work.
    app.nats
        .client_connect(&tv.operator_token())
        .await
        .expect("a new operator token connects");
}

#[tokio::test]
async fn a_leaked_service_password_cannot_do_another_services_work_or_stream_surgery() {
    use test_support::Login;
    let (app, tv) = app_with_vendor(3, Policy::EvictOldest, KEY).await;
    let t = tv.token("acme", "tv");
    let cases: [(Login, &[&str]); 3] = [
        (
            Login::Handler,
            &[
                "ctl.acme.tv",
                "$KV.headcount-limits.acme",
                "$KV.headcount-timeouts.acme.s1",
                "$JS.API.STREAM.DELETE.KV_headcount-revoked",
                "$JS.API.STREAM.PURGE.KV_headcount-revoked",
                "$SYS.REQ.SERVER.PING",
                // A stream of its own, republishing onto control subjects.
                "$JS.API.STREAM.CREATE.EVIL",
                "$JS.API.STREAM.UPDATE.KV_headcount-sessions",
                "headcount.x.y",
                // A kick passed on to a partition's checkers.
                "headcount.part.15.kick",
            ],
        ),
        (
            Login::Checker,
            &[
                // A heartbeat as the server's mapping makes it (the subject
                // its permissions are checked on).
                "hbp.15.acme.phantom.s1",
                "$KV.headcount-sessions.15.acme.1",
                "$KV.headcount-connections.d.acme.s1",
                "$JS.API.STREAM.DELETE.KV_headcount-sessions",
                "$JS.API.STREAM.MSG.DELETE.KV_headcount-revoked",
                "$JS.API.STREAM.CREATE.EVIL",
                "$JS.API.STREAM.UPDATE.KV_headcount-revoked",
            ],
        ),
        (
            Login::Vendor,
            &[
                "ctl.acme.tv",
                "$KV.headcount-revoked.acme.s1",
                "$KV.headcount-sessions.15.acme.1",
                "$JS.API.STREAM.PURGE.KV_headcount-sessions",
                "$JS.API.ACCOUNT.PURGE.HEADCOUNT",
                "$JS.API.STREAM.CREATE.EVIL",
                "$JS.API.STREAM.UPDATE.KV_headcount-connections",
                "headcount.part.15.kick",
            ],
        ),
    ];
    for (login, subjects) in cases {
        let (client, mut events) = app
            .nats
            .connect_watched(async_nats::ConnectOptions::with_user_and_password(
                login.user().into(),
                test_support::password_of(login, &app.nats.service_password),
            ))
            .await
            .expect("the service user logs in");
        for subject in subjects {
            client
                .publish(subject.to_string(), Bytes::from_static(b"{}"))
                .await
                .expect("sent");
            client.flush().await.expect("flush");
            let err = event_where(&mut events, SOON, server_error_containing("permissions"))
                .await
                .unwrap_or_else(|| panic!("{login:?} may publish {subject}"));
            assert!(err.contains(subject), "{login:?} {subject}: {err}");
        }
        // Nor read another service's (or the console's) replies.
        let other = if login == Login::Handler {
            "checker"
        } else {
            "handler"
        };
        for subject in [
            "_INBOX.>".to_string(),
            "_INBOX_headcount.>".to_string(),
            format!("_INBOX_{other}.>"),
            ">".to_string(),
        ] {
            let _sub = client.subscribe(subject.clone()).await.expect("sent");
            client.flush().await.expect("flush");
            let err = event_where(&mut events, SOON, server_error_containing("permissions"))
                .await
                .unwrap_or_else(|| panic!("{login:?} may subscribe to {subject}"));
            assert!(err.contains("ubscription"), "{login:?} {subject}: {err}");
        }
    }
    // Nothing happened: both streams are there, the device still gets in.
    let js = async_nats::jetstream::new(app.client.clone());
    for stream in ["KV_headcount-revoked", "KV_headcount-sessions"] {
        js.get_stream(stream).await.expect("stream still there");
    }
    app.nats
        .device_connect(&t.token)
        .await
        .expect("devices still connect");
}

#[tokio::test]
async fn a_vendor_restarted_with_a_new_signing_key_ends_older_operator_and_backend_tokens() {
    let (app, old_vendor) = app_with_vendor(3, Policy::EvictOldest, KEY).await;
    let operator = old_vendor.operator_token();
    let (_op, mut events) = watched(&app, &operator.token, Some(&operator.inbox_prefix)).await;
    // The way a fleet of vendors rotates: stop them, start them with a new
    // signing key.
    old_vendor.running.stop().await.expect("old vendor stops");
    let new_vendor = app.start_token_vendor(KEY).await;
    assert_closed(
        &mut events,
        "the old operator token's connection stayed open",
    )
    .await;
    assert!(app.nats.client_connect(&operator).await.is_err());
    app.nats
        .client_connect(&new_vendor.operator_token())
        .await
        .expect("a token of the new key connects");
}

/// Reconnects with `token` in a tight loop (for at most ten seconds) until
/// `stop`, keeping every connection it got in `kept`.
fn reconnecting(
    app: &TestApp,
    token: &token_vendor::OperatorToken,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    kept: &std::sync::Arc<std::sync::Mutex<Vec<async_nats::Client>>>,
) -> tokio::task::JoinHandle<usize> {
    let (url, token, stop, kept) = (app.nats.url(), token.clone(), stop.clone(), kept.clone());
    tokio::spawn(async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut refused = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed)
            && std::time::Instant::now() < deadline
        {
            match async_nats::ConnectOptions::with_token(token.token.clone())
                .custom_inbox_prefix(token.inbox_prefix.clone())
                .max_reconnects(Some(1))
                .connection_timeout(Duration::from_secs(5))
                .connect(&url)
                .await
            {
                Ok(c) => kept.lock().unwrap().push(c),
                Err(_) => refused += 1,
            }
        }
        refused
    })
}

#[tokio::test]
async fn a_backend_token_revoked_while_it_reconnects_keeps_no_connection() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    const ROUNDS: usize = 10;
    let app = TestApp::spawn_with(Limit::new(3, Policy::EvictOldest).expect("limit")).await;
    // The connects refused once the token is revoked are this test's own:
    // the callout must not shed the host for them.
    let tmp = tempfile::tempdir().unwrap();
    let mut config = token_vendor::Config::new(tmp.path(), KEY);
    config.throttle = token_vendor::ThrottleConfig {
        callout_refusals: token_vendor::Rate::OFF,
        ..token_vendor::ThrottleConfig::default()
    };
    let tv = app.start_token_vendor_with(config).await;
    let mut survived = Vec::new();
    for round in 0..ROUNDS {
        let token = tv.backend_token(&format!("shop-{round}"));
        let stop = Arc::new(AtomicBool::new(false));
        let kept = Arc::new(Mutex::new(Vec::new()));
        let tasks: Vec<_> = (0..3)
            .map(|_| reconnecting(&app, &token, &stop, &kept))
            .collect();
        // Revoke in the middle of the reconnects, which go on a little
        // after it: the connects in flight at the revocation are the race.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (status, body) = post(&tv, "/v1/tokens/revoke", json!({"token": token.token})).await;
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.store(true, Ordering::Relaxed);
        let mut refused = 0;
        for t in tasks {
            refused += t.await.unwrap();
        }
        let clients = std::mem::take(&mut *kept.lock().unwrap());
        assert!(refused > 0, "round {round}: no connect was refused");
        assert!(!clients.is_empty(), "round {round}: no connect got in");
        // Within a few seconds, every connection made with the token is
        // closed (a kick takes a moment).
        let deadline = std::time::Instant::now() + SOON;
        let open = loop {
            let open: Vec<_> = clients.iter().filter(|c| connected(c)).collect();
            if open.is_empty() || std::time::Instant::now() > deadline {
                break open;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut answered = 0;
        for c in &open {
            let reply = tokio::time::timeout(
                Duration::from_secs(2),
                c.request(
                    "headcount.active",
                    Bytes::from_static(br#"{"account":"acme"}"#),
                ),
            )
            .await;
            if matches!(reply, Ok(Ok(_))) {
                answered += 1;
            }
        }
        if !open.is_empty() {
            survived.push(format!(
                "round {round}: {} of {} connections still open ({answered} answered a request)",
                open.len(),
                clients.len()
            ));
        }
    }
    assert!(
        survived.is_empty(),
        "a revoked backend token kept connections: {survived:?}"
    );
}
