//! End-to-end tests live in the test targets beside this file. What several
//! of them do alike lives here: services with a token vendor in front, and
//! presence events and control messages read as they come.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use headcount_client::ServiceError;
use headcount_protocol::wire::{CheckReply, ControlMessage, EventType, PresenceEvent};
use headcount_protocol::{Limit, Policy};
use test_support::{TestApp, TokenVendor};

/// How long a message that should come at once may take.
const SOON: Duration = Duration::from_secs(5);

/// Services whose accounts have `limit` devices under `policy` by default,
/// and a token vendor whose operator key is `key`.
pub async fn app_with_vendor(limit: i64, policy: Policy, key: &str) -> (TestApp, TokenVendor) {
    let app = TestApp::spawn_with(Limit::new(limit, policy).expect("limit")).await;
    let tv = app.start_token_vendor(key).await;
    (app, tv)
}

/// `headcount.check` with `body`, which must be answered.
pub async fn check(app: &TestApp, body: serde_json::Value) -> CheckReply {
    app.request("check", &body).await.expect("check answers")
}

/// The message of the 400 that `endpoint` answers `body` with; panics on
/// any other answer. The body goes as it is, so that it need not be JSON.
pub async fn bad_request(app: &TestApp, endpoint: &str, body: impl Into<Bytes>) -> String {
    let body = body.into();
    let error = match app.request_raw(endpoint, body.clone()).await {
        Ok(reply) => panic!("{endpoint} took {body:?}: {reply:?}"),
        Err(e) => e,
    };
    let Some(ServiceError { code, message }) = error.service_error() else {
        panic!("{endpoint} {body:?}: {error:?}");
    };
    assert_eq!(*code, 400, "{endpoint} {body:?}: {message}");
    message.clone()
}

/// A subscription on `client` to `subject`, in place on the server when
/// this returns, so that nothing published afterwards is missed.
async fn subscribed(client: &async_nats::Client, subject: String) -> async_nats::Subscriber {
    let sub = client.subscribe(subject).await.expect("subscribe");
    client.flush().await.expect("flush");
    sub
}

/// `account`'s presence events, from now on.
pub async fn events(app: &TestApp, account: &str) -> async_nats::Subscriber {
    subscribed(&app.client, format!("headcount.events.{account}")).await
}

/// The next presence event of `kind` on `sub`, skipping the others; panics
/// when none comes within 5 s.
pub async fn next_event(sub: &mut async_nats::Subscriber, kind: EventType) -> PresenceEvent {
    tokio::time::timeout(SOON, async {
        loop {
            let msg = sub.next().await.expect("event stream open");
            let ev: PresenceEvent = serde_json::from_slice(&msg.payload).expect("event is json");
            if ev.kind == kind {
                return ev;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {kind:?} event"))
}

/// The control messages of `account`'s `device`, from now on, read on
/// `client` (the device's own connection, or the fleet's).
pub async fn control(
    client: &async_nats::Client,
    account: &str,
    device: &str,
) -> async_nats::Subscriber {
    subscribed(client, format!("ctl.{account}.{device}")).await
}

/// The next control message on `sub`; panics when none comes within 5 s.
pub async fn next_control(sub: &mut async_nats::Subscriber) -> ControlMessage {
    let msg = tokio::time::timeout(SOON, sub.next())
        .await
        .expect("control message within 5 s")
        .expect("control stream open");
    ControlMessage::decode(&msg.payload).expect("control message is msgpack")
}
