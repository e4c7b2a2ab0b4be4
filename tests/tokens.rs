//! Device tokens from a running token vendor, over NATS and over HTTP, on a
//! real nats-server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use headcount_client::ServiceError;
use headcount_protocol::now_millis;
use headcount_protocol::subjects::endpoint;
use headcount_protocol::wire::TokenReply;
use serde_json::json;
use test_support::TestApp;

const OPERATOR_KEY: &str = "operator-key-for-tests";

#[tokio::test]
async fn tokens_over_nats_name_account_device_and_a_fresh_session() {
    let app = TestApp::spawn().await;
    let tv = app.start_token_vendor(OPERATOR_KEY).await;

    let before = now_millis();
    let a: TokenReply = app
        .request(
            endpoint::TOKEN,
            &json!({"account": "acme", "device": "tv-1"}),
        )
        .await
        .expect("token issued");
    let b: TokenReply = app
        .request(
            endpoint::TOKEN,
            &json!({"account": "acme", "device": "tv-1"}),
        )
        .await
        .expect("token issued");
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

    assert_eq!(
        tv.running
            .metric(r#"headcount_tokens_issued_total{via="nats"}"#),
        2.0
    );
    tv.running.stop().await.unwrap();
}

#[tokio::test]
async fn bad_token_requests_over_nats_get_400_and_no_token() {
    let app = TestApp::spawn().await;
    let tv = app.start_token_vendor(OPERATOR_KEY).await;

    let cases: [(&[u8], &str); 4] = [
        (b"not json", "json"),
        (br#"{"account":"acme"}"#, "device"),
        (br#"{"account":"ac me","device":"tv-1"}"#, "account"),
        (br#"{"account":"acme","device":"tv.1"}"#, "device"),
    ];
    for (body, mentions) in cases {
        let error = app
            .request_raw(endpoint::TOKEN, Bytes::from_static(body))
            .await
            .expect_err("refused");
        let Some(ServiceError { code, message }) = error.service_error() else {
            panic!("{}: {error:?}", String::from_utf8_lossy(body));
        };
        assert_eq!(*code, 400, "{}", String::from_utf8_lossy(body));
        assert!(
            message.to_lowercase().contains(mentions),
            "{message:?} should mention {mentions}"
        );
    }
    assert_eq!(
        tv.running
            .metric(r#"headcount_tokens_issued_total{via="nats"}"#),
        0.0
    );
    tv.running.stop().await.unwrap();
}

#[tokio::test]
async fn http_tokens_need_the_operator_key_and_verify_against_the_jwks() {
    let app = TestApp::spawn().await;
    let tv = app.start_token_vendor(OPERATOR_KEY).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/tokens", tv.http);
    let body = json!({"account": "acme", "device": "laptop"});

    let anonymous = http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let wrong = http
        .post(&url)
        .bearer_auth("guess")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);

    let ok = http
        .post(&url)
        .bearer_auth(OPERATOR_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let reply: TokenReply = ok.json().await.unwrap();
    let claims = tv.vendor.verify(&reply.token).unwrap();
    assert_eq!(claims.device.as_str(), "laptop");

    // The token's kid is published in the JWKS.
    let header = jsonwebtoken::decode_header(&reply.token).unwrap();
    let kid = header.kid.expect("tokens carry a kid");
    let kids = tv.jwks_kids().await;
    assert!(kids.contains(&kid), "{kid} in {kids:?}");

    assert_eq!(
        tv.running
            .metric(r#"headcount_tokens_issued_total{via="http"}"#),
        1.0
    );
    tv.running.stop().await.unwrap();
}
