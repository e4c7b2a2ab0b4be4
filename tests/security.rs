//! Devices get in only with a valid token, and only to their own subjects:
//! enforced by a real nats-server running the repository's `nats.conf`, with
//! token-vendor answering its auth callout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use async_nats::{ConnectErrorKind, Event};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use futures::StreamExt;
use headcount_protocol::wire::{ControlType, Heartbeat, TokenReply};
use headcount_protocol::{AccountId, DeviceId, Limit, Policy, now_millis};
use headcount_tests::{app_with_vendor, control, next_control};
use serde_json::json;
use test_support::{TestApp, TokenVendor, ok_json};
use tokio::sync::mpsc;

const KEY: &str = "operator-key-for-tests";
const SOON: Duration = Duration::from_secs(5);

/// Services whose accounts have `limit` devices by default (evict-oldest),
/// and a token vendor.
async fn app(limit: i64) -> (TestApp, TokenVendor) {
    app_with_vendor(limit, Policy::EvictOldest, KEY).await
}

/// A device connection that reports the server's errors (permission
/// violations) and disconnects on `events`.
async fn device(
    app: &TestApp,
    token: &str,
) -> (async_nats::Client, mpsc::UnboundedReceiver<Event>) {
    app.nats.watched_connect(token, None).await
}

/// Services (limit 3) and a token vendor, and acme's tv connected with a
/// token of its own.
struct Connected {
    app: TestApp,
    tv: TokenVendor,
    /// The device's token.
    t: TokenReply,
    dev: async_nats::Client,
    /// What happens to the device's connection.
    events: mpsc::UnboundedReceiver<Event>,
}

impl Connected {
    /// One heartbeat of the device's session.
    async fn beat(&self) {
        let session = self.t.session.as_str();
        self.app
            .heartbeat(&self.dev, "acme", "tv", session, &hb())
            .await;
    }
}

/// A fresh [`Connected`].
async fn tv_connected() -> Connected {
    let (app, tv) = app(3).await;
    let t = tv.token("acme", "tv");
    let (dev, events) = device(&app, &t.token).await;
    Connected {
        app,
        tv,
        t,
        dev,
        events,
    }
}

/// Waits for a server error mentioning `what` among the connection events.
async fn violation(events: &mut mpsc::UnboundedReceiver<Event>, what: &str) -> String {
    tokio::time::timeout(SOON, async {
        loop {
            match events.recv().await.expect("events open") {
                Event::ServerError(e) => {
                    let text = e.to_string();
                    if text.to_lowercase().contains("permissions violation") && text.contains(what)
                    {
                        return text;
                    }
                }
                _ => continue,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no permissions violation for {what}"))
}

fn refused(result: Result<async_nats::Client, async_nats::ConnectError>) -> bool {
    match result {
        Ok(_) => false,
        Err(e) => e.kind() == ConnectErrorKind::AuthorizationViolation,
    }
}

fn hb() -> Heartbeat {
    Heartbeat::default()
}

#[tokio::test]
async fn a_device_with_a_valid_token_heartbeats_and_is_counted() {
    let c = tv_connected().await;
    c.beat().await;
    let (r, took) = c
        .app
        .wait_active("acme", SOON, |r| {
            r.sessions.iter().any(|s| s.session == c.t.session)
        })
        .await;
    assert!(took.is_some(), "session counted: {r:?}");
    assert_eq!(c.tv.callouts("allowed"), 1.0);
}

#[tokio::test]
async fn a_device_may_not_publish_as_another_device_or_account() {
    let mut c = tv_connected().await;
    let sid = c.t.session.as_str();
    // Its own ids on another partition than its account's.
    let elsewhere =
        (headcount_protocol::partition::of("acme") + 1) % headcount_protocol::partition::PARTITIONS;
    for subject in [
        format!("hb.acme.phone.{sid}"),           // another device
        format!("hb.other.tv.{sid}"),             // another account
        "hb.acme.tv.another-session".to_string(), // another session
        format!("hbp.{elsewhere}.acme.tv.{sid}"), // another partition
        "headcount.events.acme".to_string(),
    ] {
        c.dev
            .publish(subject.clone(), hb().encode().into())
            .await
            .unwrap();
        // The server names the subject its mapping made of a heartbeat's,
        // `hbp.<partition>.` and the ids.
        let named = subject.strip_prefix("hb").unwrap_or(&subject);
        violation(&mut c.events, named).await;
    }
    // Nothing of it reached the handler: no session for either account.
    let app = &c.app;
    app.wait_active("acme", Duration::from_millis(500), |_| false)
        .await;
    assert!(app.active("acme").await.sessions.is_empty());
    assert!(app.active("other").await.sessions.is_empty());
    let h = &app.handlers[0];
    assert_eq!(
        h.metric(r#"headcount_heartbeats_total{result="accepted"}"#),
        0.0
    );
}

#[tokio::test]
async fn a_device_may_only_read_its_own_control_subject() {
    let mut c = tv_connected().await;
    let dev = &c.dev;

    let mut own = dev.subscribe("ctl.acme.tv").await.unwrap();
    let mut other = dev.subscribe("ctl.acme.phone").await.unwrap();
    violation(&mut c.events, "ctl.acme.phone").await;
    let mut everything = dev.subscribe("headcount.>").await.unwrap();
    violation(&mut c.events, "headcount.>").await;
    dev.flush().await.unwrap();

    let app = &c.app;
    for subject in ["ctl.acme.tv", "ctl.acme.phone", "headcount.events.acme"] {
        app.client
            .publish(subject, Bytes::from_static(b"x"))
            .await
            .unwrap();
    }
    app.client.flush().await.unwrap();
    let got = tokio::time::timeout(SOON, own.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.subject.as_str(), "ctl.acme.tv");
    for sub in [&mut other, &mut everything] {
        let r = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
        assert!(
            !matches!(r, Ok(Some(_))),
            "a denied subscription received {r:?}"
        );
    }
}

#[tokio::test]
async fn a_device_cannot_call_endpoints_or_read_kv() {
    let mut c = tv_connected().await;
    for subject in [
        "headcount.active",
        "$JS.API.STREAM.INFO.KV_headcount-sessions",
        "$KV.headcount-sessions.15.acme.1",
    ] {
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            c.dev
                .request(subject, Bytes::from_static(br#"{"account":"acme"}"#)),
        )
        .await;
        assert!(
            !matches!(r, Ok(Ok(_))),
            "{subject}: a device must get no answer, got {r:?}"
        );
    }
    violation(&mut c.events, "_INBOX").await;
}

#[tokio::test]
async fn bad_tokens_and_anonymous_connections_are_refused() {
    let (app, tv) = app(3).await;
    let good = tv.token("acme", "tv").token;
    let now = now_millis() / 1000;
    let (acme, tv_dev) = (
        AccountId::parse("acme").unwrap(),
        DeviceId::parse("tv").unwrap(),
    );

    // Signed by another vendor's key: unknown kid.
    let stranger_dir = tempfile::tempdir().unwrap();
    let stranger = token_vendor::Vendor::new(
        token_vendor::Config::new(stranger_dir.path(), KEY),
        &prometheus::Registry::new(),
    )
    .unwrap();
    let foreign = stranger.issue(&acme, &tv_dev, "nats").unwrap().token;

    // Same keys, wrong audience / issuer.
    let twin = |audience: &str, issuer: &str| {
        let mut c = token_vendor::Config::new(&tv.dir, KEY);
        c.audience = audience.into();
        c.issuer = issuer.into();
        token_vendor::Vendor::new(c, &prometheus::Registry::new())
            .unwrap()
            .issue(&acme, &tv_dev, "nats")
            .unwrap()
            .token
    };
    let wrong_audience = twin("somebody-else", token_vendor::DEFAULT_ISSUER);
    let wrong_issuer = twin(token_vendor::DEFAULT_AUDIENCE, "somebody-else");

    // A signature that does not match the claims.
    let mut parts: Vec<String> = good.split('.').map(String::from).collect();
    let claims = String::from_utf8(URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
    parts[1] = URL_SAFE_NO_PAD.encode(claims.replace("\"acct\":\"acme\"", "\"acct\":\"evil\""));
    let forged = parts.join(".");

    // alg: none, claims intact, no signature.
    let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let unsigned = format!("{none_header}.{}.", good.split('.').nth(1).unwrap());

    let expired = tv
        .vendor
        .issue_at(&acme, &tv_dev, "nats", now - 3 * 3600)
        .unwrap()
        .token;
    let future = tv
        .vendor
        .issue_at(&acme, &tv_dev, "nats", now + 3600)
        .unwrap()
        .token;
    let oversized = format!("{good}{}", "A".repeat(5000));

    let cases = [
        ("unknown_kid", foreign),
        ("wrong_audience", wrong_audience),
        ("wrong_issuer", wrong_issuer),
        ("bad_signature", forged),
        ("bad_signature", unsigned),
        ("expired", expired),
        ("not_yet_valid", future),
        ("malformed", "garbage".to_string()),
    ];
    for (reason, token) in &cases {
        assert!(
            refused(app.nats.device_connect(token).await),
            "{reason} token was let in"
        );
    }
    for (reason, _) in &cases {
        let n = tv.callouts(reason);
        assert!(n >= 1.0, "{reason} refusals counted: {n}");
    }

    // A token too long for a CONNECT line is cut off by the server itself
    // (max_control_line), before the callout sees it.
    assert!(app.nats.device_connect(&oversized).await.is_err());

    // No credentials at all, and a wrong password.
    let anonymous = async_nats::ConnectOptions::new()
        .connect(app.nats.url())
        .await;
    assert!(refused(anonymous), "anonymous connection let in");
    let guess =
        async_nats::ConnectOptions::with_user_and_password("headcount".into(), "guess".into())
            .connect(app.nats.url())
            .await;
    assert!(refused(guess), "wrong password let in");
    assert!(tv.callouts("no_token") >= 1.0);

    // And the good token still works.
    assert!(app.nats.device_connect(&good).await.is_ok());
}

#[tokio::test]
async fn the_connection_closes_when_the_token_expires() {
    let (app, tv) = app(3).await;
    let now = now_millis() / 1000;
    let ttl = token_vendor::DEFAULT_TOKEN_TTL.as_secs();
    // Issued so that it expires two seconds from now.
    let t = tv
        .vendor
        .issue_at(
            &AccountId::parse("acme").unwrap(),
            &DeviceId::parse("tv").unwrap(),
            "nats",
            now + 2 - ttl,
        )
        .unwrap();
    let (dev, mut events) = device(&app, &t.token).await;
    assert_eq!(
        dev.connection_state(),
        async_nats::connection::State::Connected
    );
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(Event::Disconnected) = events.recv().await {
                return;
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "connection still open after the token expired"
    );
    // And the same token cannot come back.
    assert!(refused(app.nats.device_connect(&t.token).await));
    assert!(tv.callouts("expired") >= 1.0);
}

#[tokio::test]
async fn an_evicted_session_cannot_reconnect_but_a_new_token_can() {
    let (app, tv) = app(1).await;
    let first = tv.token("acme", "tv");
    let (tv_dev, _e1) = device(&app, &first.token).await;
    let mut ctl = control(&tv_dev, "acme", "tv").await;
    app.heartbeat(&tv_dev, "acme", "tv", first.session.as_str(), &hb())
        .await;
    app.wait_active("acme", SOON, |r| r.sessions.len() == 1)
        .await;

    let second = tv.token("acme", "phone");
    let (phone, _e2) = device(&app, &second.token).await;
    app.heartbeat(&phone, "acme", "phone", second.session.as_str(), &hb())
        .await;
    let msg = next_control(&mut ctl).await;
    assert_eq!(msg.kind, ControlType::DeviceLimitExceeded);

    // The evicted session's token no longer opens a connection...
    assert!(refused(app.nats.device_connect(&first.token).await));
    assert!(tv.callouts("revoked") >= 1.0);
    // ...while a fresh token for the same device does.
    let again = tv.token("acme", "tv");
    assert!(app.nats.device_connect(&again.token).await.is_ok());
}

#[tokio::test]
async fn a_kicked_session_cannot_reconnect() {
    let c = tv_connected().await;
    c.beat().await;
    c.app
        .wait_active("acme", SOON, |r| r.sessions.len() == 1)
        .await;
    assert!(c.app.kick("acme", c.t.session.as_str()).await);
    assert!(refused(c.app.nats.device_connect(&c.t.token).await));
}

#[tokio::test]
async fn backends_may_query_but_not_administer() {
    let (app, tv) = app(3).await;
    let backend = app
        .nats
        .client_connect(&tv.backend_token("web"))
        .await
        .expect("a backend connects with its token");
    headcount_client::Client::new(backend.clone())
        .active(&AccountId::parse("acme").unwrap())
        .await
        .expect("backend may query, and is answered without error");
    // Nor through the subjects checkers pass requests on by.
    let passed_on = headcount_protocol::subjects::partition_request(
        headcount_protocol::partition::of("acme"),
        "limits.set",
    );
    for subject in ["headcount.limits.set", "headcount.kick", passed_on.as_str()] {
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            backend.request(
                subject.to_string(),
                Bytes::from_static(br#"{"account":"acme","limit":9,"session":"x"}"#),
            ),
        )
        .await;
        assert!(!matches!(r, Ok(Ok(_))), "{subject}: backend got {r:?}");
    }
    // The limit is untouched.
    let limits: serde_json::Value = app
        .request("limits.get", &json!({"account": "acme"}))
        .await
        .unwrap();
    assert_eq!(limits["limit"], 3);
}

#[tokio::test]
async fn rotated_keys_keep_old_tokens_valid_and_both_are_published() {
    let (app, tv) = app(3).await;
    let before = tv.token("acme", "tv");
    let refused = tv.post("/v1/keys/rotate").send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let rotated: serde_json::Value = ok_json(tv.post("/v1/keys/rotate").bearer_auth(KEY)).await;
    let new_kid = rotated["kid"].as_str().unwrap().to_string();
    let after = tv.token("acme", "phone");
    let kid_of = |t: &str| jsonwebtoken::decode_header(t).unwrap().kid.unwrap();
    assert_eq!(kid_of(&after.token), new_kid);
    assert_ne!(kid_of(&before.token), new_kid);

    // Both tokens open a connection.
    assert!(app.nats.device_connect(&before.token).await.is_ok());
    assert!(app.nats.device_connect(&after.token).await.is_ok());
    // The JWKS lists both keys, the new one first.
    assert_eq!(tv.jwks_kids().await, vec![new_kid, kid_of(&before.token)]);
}

#[tokio::test]
async fn without_a_callout_responder_devices_are_refused() {
    let (app, tv) = app(3).await;
    let t = tv.token("acme", "tv");
    tv.running.stop().await.unwrap();
    assert!(
        app.nats.device_connect(&t.token).await.is_err(),
        "a device got in with nobody to vouch for it"
    );
}

#[tokio::test]
async fn authorization_requests_travel_encrypted_to_the_vendors_xkey() {
    let (app, tv) = app(3).await;
    // Anyone in the services' account may listen on the callout subject:
    // what they see must be sealed, not the device's token in a JWT.
    let mut spy = app
        .client
        .subscribe(token_vendor::callout::CALLOUT_SUBJECT)
        .await
        .unwrap();
    app.client.flush().await.unwrap();
    let t = tv.token("acme", "tv");
    app.nats
        .device_connect(&t.token)
        .await
        .expect("a device gets in through the encrypted callout");
    let req = tokio::time::timeout(SOON, spy.next())
        .await
        .expect("a request was seen")
        .unwrap();
    let header = req
        .headers
        .as_ref()
        .and_then(|h| h.get(token_vendor::callout::SERVER_XKEY_HEADER))
        .map(|v| v.as_str().to_string())
        .expect("the request names the server's xkey");
    assert!(header.starts_with('X'), "{header}");
    assert!(
        !req.payload.starts_with(b"eyJ"),
        "the request is a plain JWT"
    );
    let token_part = t.token.split('.').nth(1).unwrap();
    assert!(
        !String::from_utf8_lossy(&req.payload).contains(token_part),
        "the device's token is readable in the request"
    );
}

#[tokio::test]
async fn a_vendor_with_another_xkey_reads_no_request_and_lets_no_one_in() {
    let app = TestApp::spawn_with(Limit::new(3, Policy::EvictOldest).expect("limit")).await;
    // The right issuer (its answers would be trusted), the wrong curve key.
    let trusted = app.nats.issuer();
    let wrong = token_vendor::Issuer::from_seeds(
        &trusted.seed().unwrap(),
        &token_vendor::Issuer::generate().xkey_seed().unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tv = app
        .start_token_vendor_as(token_vendor::Config::new(dir.path(), KEY), wrong)
        .await;
    let t = tv.token("acme", "tv");
    assert!(app.nats.device_connect(&t.token).await.is_err());
    assert!(tv.callouts("bad_request") >= 1.0);
    assert_eq!(tv.callouts("allowed"), 0.0);
}
