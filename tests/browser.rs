//! What browser devices and the operator's live view get from token-vendor
//! (token refresh, the leave beacon, operator and demo tokens) and from
//! nats-server's WebSocket listener, on a real server. The pages themselves
//! are tested in a real browser by `web/tests`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use async_nats::Event;
use async_nats::connection::State;
use futures::StreamExt;
use headcount_protocol::AccountId;
use headcount_protocol::Policy;
use headcount_protocol::wire::{
    EventType, Heartbeat, KickRequest, PresenceEvent, StatsRequest, TokenReply,
};
use headcount_tests::{app_with_vendor, events, next_event};
use serde_json::json;
use test_support::{TestApp, TokenVendor, ok_json};
use tokio::sync::mpsc;

const KEY: &str = "operator-key-for-tests";
const SOON: Duration = Duration::from_secs(5);

/// Services whose accounts have three devices by default, and a token
/// vendor.
async fn app() -> (TestApp, TokenVendor) {
    app_with_vendor(3, Policy::EvictOldest, KEY).await
}

/// Sends `request` and returns the status of the answer and its error
/// message.
async fn error_of(request: reqwest::RequestBuilder) -> (u16, String) {
    let r = request.send().await.expect("the server answers");
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.expect("errors are json");
    (
        status,
        body["error"].as_str().unwrap_or_default().to_string(),
    )
}

/// A device on `url` (nats:// or ws://) heartbeating once with `token`.
async fn heartbeat_once(url: &str, token: &TokenReply, account: &str, device: &str) {
    let client = async_nats::ConnectOptions::with_token(token.token.clone())
        .connect(url)
        .await
        .expect("device connects");
    client
        .publish(
            format!("hb.{account}.{device}.{}", token.session.as_str()),
            Heartbeat::default().encode().into(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
}

#[tokio::test]
async fn a_browser_device_connects_over_websocket_with_its_token() {
    let (app, tv) = app().await;
    let config: serde_json::Value = reqwest::get(format!("{}/v1/client-config", tv.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ws = config["websocket"][0].as_str().expect("a websocket url");
    assert_eq!(ws, format!("ws://127.0.0.1:{}", app.nats.ws_port));
    assert_eq!(config["heartbeat_every_ms"], 5000);
    assert_eq!(config["demo_tokens"], true);

    let t = tv.token("acme", "browser");
    heartbeat_once(ws, &t, "acme", "browser").await;
    let (r, took) = app
        .wait_active("acme", SOON, |r| r.sessions.len() == 1)
        .await;
    assert!(took.is_some(), "the websocket device is counted: {r:?}");
    assert_eq!(r.sessions[0].session, t.session);

    // Over WebSocket as over TCP: no token, no entry.
    let anonymous = async_nats::ConnectOptions::new()
        .max_reconnects(Some(1))
        .connect(ws)
        .await;
    assert!(anonymous.is_err(), "a websocket client without a token");
}

#[tokio::test]
async fn refresh_renews_the_same_session_until_it_is_ended() {
    let (app, tv) = app().await;
    let t = tv.token("acme", "tv");
    let r: TokenReply = ok_json(tv.post("/v1/tokens/refresh").bearer_auth(&t.token)).await;
    assert_eq!(r.session, t.session, "a refresh keeps the session");
    assert!(r.expires_at >= t.expires_at);
    let claims = tv.vendor.verify(&r.token).unwrap();
    assert_eq!(
        (claims.account.as_str(), claims.device.as_str()),
        ("acme", "tv")
    );
    assert_eq!(tv.issued("refresh"), 1.0);

    // A player on another origin may refresh (CORS, no credentials); the
    // operator endpoints stay same-origin.
    let preflight = |path: &str| {
        reqwest::Client::new()
            .request(reqwest::Method::OPTIONS, format!("{}{path}", tv.http))
            .header("origin", "https://player.example")
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization")
            .send()
    };
    let device_side = preflight("/v1/tokens/refresh").await.unwrap();
    assert_eq!(
        device_side.headers()["access-control-allow-origin"],
        "*",
        "{:?}",
        device_side.headers()
    );
    let operator_side = preflight("/v1/operator-tokens").await.unwrap();
    assert!(
        !operator_side
            .headers()
            .contains_key("access-control-allow-origin")
    );

    // No token, a forged one, an operator key: 401.
    for bearer in [None, Some("not-a-token"), Some(KEY)] {
        let (status, message) = error_of(tv.post_bearing("/v1/tokens/refresh", bearer)).await;
        assert_eq!(status, 401, "{bearer:?}: {message}");
        assert!(!message.is_empty());
    }

    // Once the session is kicked, neither token renews it.
    heartbeat_once(&app.nats.url(), &r, "acme", "tv").await;
    app.wait_active("acme", SOON, |r| r.sessions.len() == 1)
        .await;
    assert!(app.kick("acme", t.session.as_str()).await);
    for token in [&t.token, &r.token] {
        let (status, message) = error_of(tv.post("/v1/tokens/refresh").bearer_auth(token)).await;
        assert_eq!(status, 403, "{message}");
        assert!(message.contains("ended"), "{message}");
    }
}

#[tokio::test]
async fn the_leave_beacon_ends_the_session_at_once() {
    let (app, tv) = app().await;
    let mut events = events(&app, "acme").await;
    let t = tv.token("acme", "laptop");
    heartbeat_once(&app.nats.url(), &t, "acme", "laptop").await;
    app.wait_active("acme", SOON, |r| r.sessions.len() == 1)
        .await;

    // sendBeacon posts the JSON as text/plain.
    let gone = tv
        .post("/v1/sessions/leave")
        .header("content-type", "text/plain;charset=UTF-8")
        .body(json!({"token": t.token}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 204);
    let (r, took) = app
        .wait_active("acme", SOON, |r| r.sessions.is_empty())
        .await;
    assert!(took.is_some(), "the seat is freed: {r:?}");
    let leave = next_event(&mut events, EventType::Leave).await;
    assert_eq!(leave.session, t.session);

    // Bad bodies and tokens get a clear 400 or 401, and nothing is published.
    let (status, message) = error_of(tv.post("/v1/sessions/leave").body("{not json")).await;
    assert_eq!(status, 400, "{message}");
    let (status, _) = error_of(
        tv.post("/v1/sessions/leave")
            .body(json!({"token": "forged"}).to_string()),
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn demo_tokens_are_device_tokens_with_checked_names() {
    let (app, tv) = app().await;
    let t: TokenReply = ok_json(
        tv.post("/v1/demo/tokens")
            .json(&json!({"account": "demo", "device": "browser-1"})),
    )
    .await;
    let claims = tv.vendor.verify(&t.token).unwrap();
    assert!(!claims.is_operator());
    assert!(app.nats.device_connect(&t.token).await.is_ok());
    assert_eq!(tv.issued("demo"), 1.0);

    let (status, message) = error_of(
        tv.post("/v1/demo/tokens")
            .json(&json!({"account": "no spaces", "device": "d"})),
    )
    .await;
    assert_eq!(status, 400);
    assert!(message.contains("account"), "{message}");
}

#[tokio::test]
async fn demo_tokens_are_off_unless_turned_on() {
    let (app, tv) = app().await;
    let (client, revoked) = {
        let client = app.nats.service_client().await;
        let js = async_nats::jetstream::new(client.clone());
        let revoked = js
            .get_key_value(headcount_protocol::subjects::kv::REVOKED_BUCKET)
            .await
            .unwrap();
        (client, revoked)
    };
    let router = token_vendor::browser_router(
        tv.vendor.clone(),
        client,
        revoked,
        token_vendor::BrowserConfig {
            websocket_urls: Vec::new(),
            heartbeat_every: Duration::from_secs(5),
            demo_tokens: false,
            web_dir: None,
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum_serve(listener, router).await });
    let http = reqwest::Client::new();
    let (status, message) = error_of(
        http.post(format!("http://{addr}/v1/demo/tokens"))
            .json(&json!({"account": "demo", "device": "d"})),
    )
    .await;
    assert_eq!(status, 404);
    assert!(message.contains("demo tokens are off"), "{message}");
    // And no pages without a web directory: a JSON 404, not a crash.
    let (status, _) = error_of(http.get(format!("http://{addr}/demo/"))).await;
    assert_eq!(status, 404);
}

async fn axum_serve(listener: tokio::net::TcpListener, router: axum::Router) {
    axum::serve(listener, router).await.unwrap();
}

/// Connects with an operator token, reporting the server's errors.
async fn operator(
    app: &TestApp,
    tv: &TokenVendor,
) -> (async_nats::Client, mpsc::UnboundedReceiver<Event>) {
    let op: token_vendor::OperatorToken =
        ok_json(tv.post("/v1/operator-tokens").bearer_auth(KEY)).await;
    let (tx, rx) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_token(op.token)
        .custom_inbox_prefix(op.inbox_prefix)
        .event_callback(move |e| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(e);
            }
        })
        .connect(format!("ws://127.0.0.1:{}", app.nats.ws_port))
        .await
        .expect("an operator token connects");
    (client, rx)
}

#[tokio::test]
async fn operator_tokens_query_watch_and_kick_but_publish_no_heartbeat() {
    let (app, tv) = app().await;
    // Without the operator key: 401.
    let (status, _) = error_of(tv.post("/v1/operator-tokens").bearer_auth("guess")).await;
    assert_eq!(status, 401);

    let (op, mut op_events) = operator(&app, &tv).await;
    let mut presence = op.subscribe("headcount.events.>").await.unwrap();
    op.flush().await.unwrap();

    let t = tv.token("acme", "tv");
    heartbeat_once(&app.nats.url(), &t, "acme", "tv").await;
    let join = tokio::time::timeout(SOON, presence.next())
        .await
        .expect("the operator sees the join")
        .unwrap();
    let join: PresenceEvent = serde_json::from_slice(&join.payload).unwrap();
    assert_eq!(join.session, t.session);

    let api = headcount_client::Client::new(op.clone());
    let stats = api
        .stats(&StatsRequest {
            account: None,
            top: Some(10),
        })
        .await
        .expect("stats answers the operator");
    assert_eq!(stats.active, 1);
    assert_eq!(stats.top[0].account.as_str(), "acme");

    let kicked = api
        .kick(&KickRequest {
            account: AccountId::parse("acme").unwrap(),
            session: t.session.clone(),
        })
        .await
        .expect("the operator may kick");
    assert!(kicked.kicked);

    // No heartbeats, no tokens, no other inbox.
    op.publish("hb.acme.tv.forged", Heartbeat::default().encode().into())
        .await
        .unwrap();
    op.flush().await.unwrap();
    let mut denied = false;
    let deadline = tokio::time::Instant::now() + SOON;
    while let Ok(Some(e)) = tokio::time::timeout_at(deadline, op_events.recv()).await {
        if let Event::ServerError(e) = e
            && e.to_string()
                .to_lowercase()
                .contains("permissions violation")
        {
            denied = true;
            break;
        }
    }
    assert!(denied, "publishing a heartbeat is a permissions violation");
    let token = tokio::time::timeout(
        Duration::from_secs(2),
        op.request(
            "headcount.token",
            json!({"account": "a", "device": "d"}).to_string().into(),
        ),
    )
    .await;
    assert!(
        !matches!(token, Ok(Ok(_))),
        "operators get no device tokens over NATS"
    );
    assert_eq!(op.connection_state(), State::Connected);
}
