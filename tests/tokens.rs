//! Device tokens from a running token vendor, over NATS and over HTTP, on a
//! real nats-server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use headcount_protocol::Policy;
use headcount_protocol::now_millis;
use headcount_protocol::subjects::endpoint;
use headcount_protocol::wire::TokenReply;
use headcount_tests::{app_with_vendor, bad_request};
use serde_json::json;
use test_support::{TestApp, TokenVendor, ok_json};

const OPERATOR_KEY: &str = "operator-key-for-tests";

/// Services with their default limit and a token vendor.
async fn app() -> (TestApp, TokenVendor) {
    app_with_vendor(2, Policy::EvictOldest, OPERATOR_KEY).await
}

/// How each test here ends: `tv` issued `n` tokens `via` one way in all,
/// and it stops cleanly.
async fn issued_then_stops(tv: TokenVendor, via: &str, n: f64) {
    assert_eq!(tv.issued(via), n, "tokens issued via {via}");
    tv.running.stop().await.unwrap();
}

/// A token for acme's tv-1, asked for over NATS.
async fn token_over_nats(app: &TestApp) -> TokenReply {
    app.request(
        endpoint::TOKEN,
        &json!({"account": "acme", "device": "tv-1"}),
    )
    .await
    .expect("token issued")
}

#[tokio::test]
async fn tokens_over_nats_name_account_device_and_a_fresh_session() {
    let (app, tv) = app().await;

    let before = now_millis();
    let a = token_over_nats(&app).await;
    let b = token_over_nats(&app).await;
    assert_ne!(a.session, b.session, "every token starts its own session");

    let claims = tv
        .vendor
        .verify(&a.token)
        .expect("the vendor's own token verifies");
    assert_eq!(claims.account.as_str(), "acme");
    assert_eq!(claims.device.as_str(), "tv-1");
    assert_eq!(claims.session, a.session);
    // Default lifetime 15 minutes.
    let ttl = a.expires_at - before;
    assert!(
        (14 * 60_000..=15 * 60_000 + 2_000).contains(&ttl),
        "ttl {ttl} ms"
    );

    issued_then_stops(tv, "nats", 2.0).await;
}

#[tokio::test]
async fn bad_token_requests_over_nats_get_400_and_no_token() {
    let (app, tv) = app().await;

    let cases: [(&[u8], &str); 4] = [
        (b"not json", "json"),
        (br#"{"account":"acme"}"#, "device"),
        (br#"{"account":"ac me","device":"tv-1"}"#, "account"),
        (br#"{"account":"acme","device":"tv.1"}"#, "device"),
    ];
    for (body, mentions) in cases {
        let message = bad_request(&app, endpoint::TOKEN, body).await;
        assert!(
            message.to_lowercase().contains(mentions),
            "{message:?} should mention {mentions}"
        );
    }
    issued_then_stops(tv, "nats", 0.0).await;
}

#[tokio::test]
async fn http_tokens_need_the_operator_key_and_verify_against_the_jwks() {
    let (_app, tv) = app().await;
    let body = json!({"account": "acme", "device": "laptop"});
    let asked_with = |key| tv.post_bearing("/v1/tokens", key).json(&body);

    // No key, and a wrong one.
    for key in [None, Some("guess")] {
        let refused = asked_with(key).send().await.unwrap();
        assert_eq!(refused.status(), 401, "{key:?}");
    }

    let reply: TokenReply = ok_json(asked_with(Some(OPERATOR_KEY))).await;
    let claims = tv.vendor.verify(&reply.token).unwrap();
    assert_eq!(claims.device.as_str(), "laptop");

    // The token's kid is published in the JWKS.
    let header = jsonwebtoken::decode_header(&reply.token).unwrap();
    let kid = header.kid.expect("tokens carry a kid");
    let kids = tv.jwks_kids().await;
    assert!(kids.contains(&kid), "{kid} in {kids:?}");

    issued_then_stops(tv, "http", 1.0).await;
}
