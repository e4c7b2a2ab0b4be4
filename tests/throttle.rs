//! What a hostile client meets: per-address limits on token-vendor's HTTP
//! API (wrong operator keys, refresh, leave and demo-token floods) and the
//! auth callout shedding a host that floods it with bad tokens, against a
//! real nats-server running the repository's `nats.conf`.
//!
//! Two client addresses on one machine: 127.0.0.1 and 127.0.0.2 (Linux
//! routes all of 127.0.0.0/8 to the loopback interface).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use headcount_protocol::wire::TokenReply;
use serde_json::json;
use test_support::{TestApp, TokenVendor};
use token_vendor::{Rate, ThrottleConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const KEY: &str = "operator-key-for-throttle-tests";
/// The second client address.
const OTHER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Enough requests to spend any budget these tests configure.
const FLOOD: usize = 200;

/// A vendor with `throttle` as its limits.
async fn vendor_with(app: &TestApp, throttle: ThrottleConfig) -> (TokenVendor, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = token_vendor::Config::new(tmp.path(), KEY);
    config.throttle = throttle;
    (app.start_token_vendor_with(config).await, tmp)
}

fn client_from(addr: Ipv4Addr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::V4(addr))
        .build()
        .unwrap()
}

/// The seconds of a 429's `Retry-After`, which it must carry.
fn retry_after(r: &reqwest::Response) -> u64 {
    let secs: u64 = r
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .expect("a 429 carries Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!(secs >= 1);
    secs
}

async fn issue(client: &reqwest::Client, tv: &TokenVendor, key: &str) -> reqwest::Response {
    client
        .post(format!("{}/v1/tokens", tv.http))
        .bearer_auth(key)
        .json(&json!({"account": "acme", "device": "tv"}))
        .send()
        .await
        .expect("token-vendor answers")
}

fn throttled(tv: &TokenVendor, endpoint: &str) -> f64 {
    tv.running.metric(&format!(
        "headcount_http_throttled_total{{endpoint=\"{endpoint}\"}}"
    ))
}

fn unauthorized(tv: &TokenVendor) -> f64 {
    tv.running
        .metric(r#"headcount_token_requests_rejected_total{reason="unauthorized"}"#)
}

#[tokio::test]
async fn wrong_operator_keys_block_the_address_until_retry_after() {
    let app = TestApp::spawn().await;
    // Five wrong keys, then one every four seconds: a block outlasts the
    // requests below by far.
    let (tv, _dir) = vendor_with(
        &app,
        ThrottleConfig {
            operator_key_failures: Rate::new(0.25, 5),
            ..ThrottleConfig::default()
        },
    )
    .await;
    let attacker = client_from(Ipv4Addr::LOCALHOST);

    // Wrong keys are 401 until the budget is spent, then 429.
    let mut wrong = 0;
    let blocked = loop {
        let r = issue(&attacker, &tv, "guess").await;
        match r.status().as_u16() {
            401 => wrong += 1,
            429 => break r,
            other => panic!("a wrong key got {other}"),
        }
        assert!(wrong < FLOOD, "{FLOOD} wrong keys and never a 429");
    };
    assert!(wrong >= 4, "only {wrong} wrong keys before the first 429");
    let wait = retry_after(&blocked);
    let body: serde_json::Value = blocked.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("too many"));

    // While blocked, keys are not even looked at: the right one is refused
    // as well, and more wrong ones are not counted as wrong.
    let checked = unauthorized(&tv);
    let right = issue(&attacker, &tv, KEY).await;
    assert_eq!(right.status(), 429, "the right key got in while blocked");
    retry_after(&right);
    for _ in 0..5 {
        assert_eq!(issue(&attacker, &tv, "guess").await.status(), 429);
    }
    assert_eq!(
        unauthorized(&tv),
        checked,
        "a key was checked while blocked"
    );
    // Every operator endpoint shares the block.
    for path in [
        "/v1/keys/rotate",
        "/v1/operator-tokens",
        "/v1/backend-tokens",
        "/v1/tokens/revoke",
    ] {
        let r = attacker
            .post(format!("{}{path}", tv.http))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 429, "{path}");
    }
    assert!(throttled(&tv, "tokens") >= 7.0);
    assert!(throttled(&tv, "keys_rotate") >= 1.0);
    assert!(throttled(&tv, "operator_tokens") >= 1.0);
    assert!(throttled(&tv, "backend_tokens") >= 1.0);
    assert!(throttled(&tv, "tokens_revoke") >= 1.0);

    // Another address is not blocked.
    let backend = client_from(OTHER);
    let r = issue(&backend, &tv, KEY).await;
    assert_eq!(r.status(), 200, "another address was blocked too");

    // Once Retry-After has passed, the right key works again.
    tokio::time::sleep(Duration::from_secs(wait) + Duration::from_millis(200)).await;
    let r = issue(&attacker, &tv, KEY).await;
    assert_eq!(r.status(), 200);
    let reply: TokenReply = r.json().await.unwrap();
    tv.vendor.verify(&reply.token).expect("a valid token");
    // Right keys never spend the budget: a backend may issue many tokens.
    for _ in 0..30 {
        assert_eq!(issue(&backend, &tv, KEY).await.status(), 200);
    }
}

#[tokio::test]
async fn demo_token_refresh_and_leave_floods_get_429() {
    let app = TestApp::spawn().await;
    let slow = Rate::new(0.5, 5);
    let (tv, _dir) = vendor_with(
        &app,
        ThrottleConfig {
            demo_tokens: slow,
            refresh: slow,
            leave: slow,
            ..ThrottleConfig::default()
        },
    )
    .await;
    let flooder = client_from(Ipv4Addr::LOCALHOST);
    let device = tv.token("acme", "tv");

    let demo = || {
        flooder
            .post(format!("{}/v1/demo/tokens", tv.http))
            .json(&json!({"account": "acme", "device": "web-1"}))
    };
    let refresh = || {
        flooder
            .post(format!("{}/v1/tokens/refresh", tv.http))
            .bearer_auth(&device.token)
    };
    let leave = || {
        flooder
            .post(format!("{}/v1/sessions/leave", tv.http))
            .body(r#"{"token": "not a token"}"#)
    };
    for (endpoint, request, answer) in [
        (
            "demo_tokens",
            &demo as &dyn Fn() -> reqwest::RequestBuilder,
            200,
        ),
        ("refresh", &refresh, 200),
        ("leave", &leave, 401),
    ] {
        let mut passed = 0;
        let limited = loop {
            let r = request().send().await.unwrap();
            if r.status() == 429 {
                break r;
            }
            assert_eq!(r.status(), answer, "{endpoint}");
            passed += 1;
            assert!(
                passed < FLOOD,
                "{endpoint}: {FLOOD} requests and never a 429"
            );
        };
        assert!(
            passed >= 4,
            "{endpoint}: only {passed} before the first 429"
        );
        retry_after(&limited);
        assert!(throttled(&tv, endpoint) >= 1.0, "{endpoint} not counted");
    }

    // Another address still gets its demo token and its refresh.
    let neighbour = client_from(OTHER);
    let r = neighbour
        .post(format!("{}/v1/demo/tokens", tv.http))
        .json(&json!({"account": "acme", "device": "web-2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = neighbour
        .post(format!("{}/v1/tokens/refresh", tv.http))
        .bearer_auth(&device.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// One raw NATS connection from `source` presenting `token`: whether the
/// server let it in (PONG) rather than refusing it (-ERR).
async fn raw_connect(server: SocketAddr, source: Ipv4Addr, token: &str) -> bool {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).unwrap();
    let stream = socket.connect(server).await.expect("nats-server accepts");
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    stream.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("INFO"), "{line}");
    let connect = json!({
        "verbose": false, "pedantic": false, "auth_token": token,
        "lang": "raw", "version": "0", "protocol": 1,
    });
    stream
        .get_mut()
        .write_all(format!("CONNECT {connect}\r\nPING\r\n").as_bytes())
        .await
        .unwrap();
    line.clear();
    tokio::time::timeout(Duration::from_secs(10), stream.read_line(&mut line))
        .await
        .expect("the server answers the CONNECT")
        .unwrap();
    match line.trim_end() {
        "PONG" => true,
        l if l.starts_with("-ERR") => false,
        other => panic!("unexpected answer to CONNECT: {other:?}"),
    }
}

/// A token vendor that sheds a host after five refusals (one more every ten
/// seconds: a flood keeps it shed), and the server's address.
async fn shedding_vendor(app: &TestApp) -> (TokenVendor, tempfile::TempDir, SocketAddr) {
    let (tv, dir) = vendor_with(
        app,
        ThrottleConfig {
            callout_refusals: Rate::new(0.1, 5),
            ..ThrottleConfig::default()
        },
    )
    .await;
    let server: SocketAddr = app
        .nats
        .url()
        .trim_start_matches("nats://")
        .parse()
        .unwrap();
    (tv, dir, server)
}

#[tokio::test]
async fn the_callout_sheds_a_host_flooding_it_with_bad_tokens() {
    let app = TestApp::spawn().await;
    let (tv, _dir, server) = shedding_vendor(&app).await;
    let good = tv.token("acme", "tv");
    // A real header and claims with a wrong signature: verified, refused.
    let forged = format!(
        "{}.{}",
        good.token.rsplit_once('.').unwrap().0,
        "A".repeat(86)
    );
    let metric = |result: &str| {
        tv.running
            .metric(&format!("headcount_callout_total{{result=\"{result}\"}}"))
    };

    // The flooding host (127.0.0.2).
    for i in 0..30 {
        let token = if i % 2 == 0 { "garbage" } else { &forged };
        assert!(
            !raw_connect(server, OTHER, token).await,
            "a bad token got in"
        );
    }
    let verified = metric("malformed") + metric("bad_signature");
    assert!(
        (5.0..=7.0).contains(&verified),
        "{verified} bad tokens were verified; the budget is 5"
    );
    assert!(metric("throttled") >= 23.0, "the flood was not shed");
    // While shed, a good token from that host still gets in: only tokens
    // that do not verify are shed.
    let shed = metric("throttled");
    assert!(raw_connect(server, OTHER, &good.token).await);
    assert_eq!(metric("throttled"), shed);
    assert_eq!(metric("allowed"), 1.0);

    // A device on another host (127.0.0.1) connects with its good token.
    let device = app
        .nats
        .device_connect(&good.token)
        .await
        .expect("a good device from another host connects");
    device.flush().await.unwrap();
    assert_eq!(metric("allowed"), 2.0);
    // And a bad token from this host is still verified, not shed.
    assert!(!raw_connect(server, Ipv4Addr::LOCALHOST, "garbage").await);
    assert_eq!(metric("throttled"), shed);
}

#[tokio::test]
async fn a_flood_of_bad_tokens_does_not_lock_out_valid_devices_sharing_its_address() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    const DEVICES: usize = 10;
    let app = TestApp::spawn().await;
    let (tv, _dir, server) = shedding_vendor(&app).await;
    let running = &tv.running;
    let metric = |sample: &str| running.metric(sample);
    let callout = |result: &str| metric(&format!("headcount_callout_total{{result=\"{result}\"}}"));
    let verified_ok = || metric(r#"headcount_token_verifications_total{result="ok"}"#);

    // Someone behind the shared address (127.0.0.2: a NAT, or the TLS proxy
    // in front of the WebSocket listener) floods the callout with garbage
    // until the address is shed...
    let mut sent = 0;
    while callout("throttled") < 1.0 {
        assert!(
            !raw_connect(server, OTHER, "garbage").await,
            "garbage got in"
        );
        sent += 1;
        assert!(
            sent < FLOOD,
            "{FLOOD} bad tokens and the address never shed"
        );
    }
    // ...and keeps at it.
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut sent = 0usize;
            while !stop.load(Ordering::Relaxed) {
                assert!(
                    !raw_connect(server, OTHER, "garbage").await,
                    "garbage got in"
                );
                sent += 1;
            }
            sent
        })
    };
    let (shed_before, verified_before) = (callout("throttled"), verified_ok());

    // Meanwhile, valid devices behind the same address connect, every one.
    let mut refused = Vec::new();
    for i in 0..DEVICES {
        let t = tv.token("acme", &format!("tv-{i}"));
        if !raw_connect(server, OTHER, &t.token).await {
            refused.push(i);
        }
        // Let the flood in between.
        tokio::task::yield_now().await;
    }
    stop.store(true, Ordering::Relaxed);
    let flooded = flood.await.unwrap();
    assert!(
        refused.is_empty(),
        "{} of {DEVICES} valid devices behind the flooded address were refused: {refused:?}",
        refused.len()
    );
    assert_eq!(callout("allowed"), DEVICES as f64);
    // Each valid token was verified and counted once.
    assert_eq!(verified_ok() - verified_before, DEVICES as f64);
    // The flood went on all along, and was still shed.
    assert!(flooded > 0, "the flood did not run beside the devices");
    assert!(
        callout("throttled") > shed_before,
        "the flood was no longer shed"
    );
    // A bad token from there is still refused without further ado.
    let shed = callout("throttled");
    assert!(!raw_connect(server, OTHER, "garbage").await);
    assert_eq!(callout("throttled"), shed + 1.0);
}
