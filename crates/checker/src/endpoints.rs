//! The `headcount.*` endpoints: `active`, `check`, `limits.get`,
//! `limits.set`, `kick` and `stats`, and the 404 for names no service
//! serves.
//!
//! Every answer comes from the view, never from a KV read. A refusal is a
//! [`ServiceError`] (400 for a wrong request, 404, 500), carried in the
//! micro error headers.

use std::time::Instant;

use bytes::Bytes;
use headcount_protocol::policy::check_plan;
use headcount_protocol::subjects::{self, endpoint, kv as keys};
use headcount_protocol::wire::{
    self, AccountRequest, AccountUsage, ActiveReply, CheckReply, CheckRequest, EndReason,
    KickReply, KickRequest, LimitsReply, LimitsSetRequest, SessionRef, StatsReply, StatsRequest,
};
use headcount_protocol::{
    AccountId, AccountLimits, Limit, Policy, ServiceError, SessionId, UnixMillis, now_millis,
};
use headcount_runtime::service_error;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::enforcement::end_session;
use crate::shared::Shared;
use crate::view::{self, CheckOutcome, View};

/// The endpoints this service adds to the micro service.
pub(crate) const SERVED: [&str; 6] = [
    endpoint::ACTIVE,
    endpoint::CHECK,
    endpoint::LIMITS_GET,
    endpoint::LIMITS_SET,
    endpoint::KICK,
    endpoint::STATS,
];

fn parse<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ServiceError> {
    wire::parse_request(payload).map_err(ServiceError::bad_request)
}

fn json<T: Serialize>(value: &T) -> Result<Bytes, ServiceError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| ServiceError::internal(format!("encoding reply: {e}")))
}

/// How a request is counted: ok, bad_request, not_found or error.
fn outcome(result: &Result<Bytes, ServiceError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) if e.is_bad_request() => "bad_request",
        Err(e) if e.is_not_found() => "not_found",
        Err(_) => "error",
    }
}

/// Answers one request to endpoint `name`, and counts it.
pub(crate) async fn serve(shared: &Shared, name: &'static str, req: async_nats::service::Request) {
    let started = Instant::now();
    let payload = req.message.payload.clone();
    let result = match name {
        endpoint::ACTIVE => active(shared, &payload),
        endpoint::CHECK => check(shared, &payload).await,
        endpoint::LIMITS_GET => limits_get(shared, &payload),
        endpoint::LIMITS_SET => limits_set(shared, &payload).await,
        endpoint::KICK => kick(shared, &payload).await,
        endpoint::STATS => stats(shared, &payload),
        _ => Err(ServiceError::not_found(format!("unknown endpoint {name}"))),
    };
    let outcome = outcome(&result);
    let reply = result.map_err(|e| service_error(e.header_code(), e.message));
    if let Err(e) = req.respond(reply).await {
        tracing::warn!(endpoint = name, error = %e, "sending reply");
    }
    shared
        .metrics
        .requests
        .with_label_values(&[name, outcome])
        .inc();
    shared
        .metrics
        .request_seconds
        .with_label_values(&[name])
        .observe(started.elapsed().as_secs_f64());
}

fn active(shared: &Shared, payload: &[u8]) -> Result<Bytes, ServiceError> {
    let req: AccountRequest = parse(payload)?;
    let reply = active_reply(
        &shared.view(req.account.as_str()),
        req.account,
        now_millis(),
    );
    json(&reply)
}

fn active_reply(view: &View, account: AccountId, now: UnixMillis) -> ActiveReply {
    let sessions = view.active(&account, now);
    let limit = view.limit(&account);
    ActiveReply {
        account,
        active: sessions.len() as u32,
        limit: limit.limit,
        policy: limit.policy,
        sessions,
    }
}

async fn check(shared: &Shared, payload: &[u8]) -> Result<Bytes, ServiceError> {
    let req: CheckRequest = parse(payload)?;
    let outcome = decide_check(&shared.view(req.account.as_str()), &req, now_millis())?;
    let by = req.session.clone().map(|session| SessionRef {
        device: req.device.clone(),
        session,
    });
    for victim in &outcome.victims {
        end_session(shared, &req.account, victim, EndReason::Evicted, by.clone()).await;
    }
    json(&CheckReply {
        allowed: outcome.allowed,
        active: outcome.active,
        limit: outcome.limit.limit,
        policy: outcome.limit.policy,
        evicted: outcome.victims,
    })
}

/// What `check` answers, and which sessions it ends to make room.
fn decide_check(
    view: &View,
    req: &CheckRequest,
    now: UnixMillis,
) -> Result<CheckOutcome, ServiceError> {
    if let Some(c) = &req.content
        && c.len() > wire::MAX_CONTENT_LEN
    {
        return Err(ServiceError::bad_request(format!(
            "content is longer than {} bytes",
            wire::MAX_CONTENT_LEN
        )));
    }
    view.check(
        &req.account,
        &req.device,
        req.content.as_deref(),
        req.evict.as_ref(),
        now,
    )
    .map_err(ServiceError::bad_request)
}

fn limits_reply(view: &View, account: AccountId) -> LimitsReply {
    let (limit, plan) = view.limit_and_plan(&account);
    LimitsReply {
        account,
        limit: limit.limit,
        policy: limit.policy,
        per_content: limit.per_content,
        grace: limit.grace,
        plan,
    }
}

fn limits_get(shared: &Shared, payload: &[u8]) -> Result<Bytes, ServiceError> {
    let req: AccountRequest = parse(payload)?;
    let reply = limits_reply(&shared.view(req.account.as_str()), req.account);
    json(&reply)
}

/// Validates a `limits.set` request against the stored record: the new
/// record, or a 400 naming what is wrong (nothing is stored then).
fn merge_limits(view: &View, req: &LimitsSetRequest) -> Result<AccountLimits, ServiceError> {
    let nothing = req.limit.is_none()
        && req.plan.is_none()
        && req.policy.is_none()
        && req.per_content.is_none()
        && req.grace.is_none();
    if nothing && !req.reset {
        return Err(ServiceError::bad_request(
            "nothing to set: give limit, plan, policy, per_content, grace or reset",
        ));
    }
    let mut o = if req.reset {
        AccountLimits::default()
    } else {
        view.overrides(&req.account).cloned().unwrap_or_default()
    };
    if let Some(plan) = &req.plan {
        check_plan(plan, view.plans().keys().map(String::as_str))
            .map_err(ServiceError::bad_request)?;
        o.plan = Some(plan.clone());
    }
    if let Some(p) = &req.policy {
        o.policy = Some(p.parse::<Policy>().map_err(ServiceError::bad_request)?);
    }
    // Validate the numbers through Limit's own checks.
    let probe = Limit::new(req.limit.unwrap_or(1), Policy::EvictOldest)
        .and_then(|l| l.with_per_content(req.per_content))
        .and_then(|l| l.with_grace(req.grace.map(|g| (g.seats, g.secs))))
        .map_err(ServiceError::bad_request)?;
    if req.limit.is_some() {
        o.limit = Some(probe.limit);
    }
    if req.per_content.is_some() {
        o.per_content = probe.per_content;
    }
    if req.grace.is_some() {
        o.grace = probe.grace;
    }
    Ok(o)
}

async fn limits_set(shared: &Shared, payload: &[u8]) -> Result<Bytes, ServiceError> {
    let req: LimitsSetRequest = parse(payload)?;
    let record = merge_limits(&shared.view(req.account.as_str()), &req)?;
    let key = keys::limits(&req.account);
    // An empty record is no record: the account is back on its plan.
    let stored = if record == AccountLimits::default() {
        shared
            .buckets
            .limits
            .delete(key)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    } else {
        let body = serde_json::to_vec(&record).map_err(ServiceError::internal)?;
        shared
            .buckets
            .limits
            .put(key, body.into())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    stored.map_err(|e| ServiceError::internal(format!("storing limits: {e}")))?;
    // Apply here at once; the watch brings the same record to every replica.
    let reply = {
        let mut v = shared.view(req.account.as_str());
        v.set_overrides(
            &req.account,
            (record != AccountLimits::default()).then_some(record),
        );
        limits_reply(&v, req.account.clone())
    };
    shared.enforce(req.account);
    json(&reply)
}

/// A `stats` request; an empty body asks about every account.
fn stats_request(payload: &[u8]) -> Result<StatsRequest, ServiceError> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(StatsRequest {
            account: None,
            top: None,
        });
    }
    parse(payload)
}

fn stats(shared: &Shared, payload: &[u8]) -> Result<Bytes, ServiceError> {
    let req = stats_request(payload)?;
    let now = now_millis();
    let (b, top) = match &req.account {
        Some(a) => (shared.view(a.as_str()).breakdown(a, now), Vec::new()),
        None => {
            let n = req.top.unwrap_or(10).min(1000) as usize;
            let mut top: Vec<(AccountId, u32, Limit)> =
                shared.each_view().flat_map(|v| v.top(n, now)).collect();
            top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            let top = top
                .into_iter()
                .take(n)
                .map(|(account, active, limit)| AccountUsage {
                    account,
                    active,
                    limit: limit.limit,
                })
                .collect();
            (shared.breakdown_all(now), top)
        }
    };
    json(&StatsReply {
        account: req.account,
        active: b.total,
        peak: b.peak,
        window_minutes: view::PEAK_WINDOW_MINUTES as u32,
        by_content: b.by_content,
        by_kind: b.by_kind,
        by_region: b.by_region,
        top,
    })
}

async fn kick(shared: &Shared, payload: &[u8]) -> Result<Bytes, ServiceError> {
    let req: KickRequest = parse(payload)?;
    let target = kick_target(
        &shared.view(req.account.as_str()),
        &req.account,
        &req.session,
        now_millis(),
    );
    let kicked = match target {
        Some(victim) => end_session(shared, &req.account, &victim, EndReason::Revoked, None).await,
        None => false,
    };
    json(&KickReply { kicked })
}

/// The session a kick ends: one a live dictionary holds and that has not
/// ended already.
fn kick_target(
    view: &View,
    account: &AccountId,
    session: &SessionId,
    now: UnixMillis,
) -> Option<SessionRef> {
    if view.is_revoked(account, session) {
        return None;
    }
    let device = view.find_session(account, session, now)?;
    Some(SessionRef {
        device,
        session: session.clone(),
    })
}

/// Requests to a `headcount.*` subject no service serves get a 404 instead
/// of a silent time-out.
pub(crate) async fn answer_unknown(nats: &async_nats::Client, msg: async_nats::Message) {
    let Some(reply) = msg.reply else {
        return; // events and other publications are not requests
    };
    let Some(error) = unknown_endpoint(msg.subject.as_str(), reply.as_str()) else {
        return;
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        async_nats::service::NATS_SERVICE_ERROR,
        error.message.as_str(),
    );
    headers.insert(
        async_nats::service::NATS_SERVICE_ERROR_CODE,
        error.header_code().to_string().as_str(),
    );
    if let Err(e) = nats
        .publish_with_headers(reply, headers, error.message.into())
        .await
    {
        tracing::warn!(error = %e, "answering unknown endpoint");
    }
}

/// The 404 for a request on `subject` with reply subject `reply`, if it
/// deserves one.
fn unknown_endpoint(subject: &str, reply: &str) -> Option<ServiceError> {
    // Answer only what looks like a reply subject: an inbox, or the
    // server's rewritten reply of a request from another account. A
    // request naming, say, a control subject as its reply gets no answer:
    // this service publishes there for real.
    if !(reply.starts_with("_INBOX") || reply.starts_with("_R_.")) {
        return None;
    }
    let name = subject
        .strip_prefix(subjects::SERVICE_PREFIX)
        .and_then(|s| s.strip_prefix('.'))
        .unwrap_or_default();
    if endpoint::ALL.contains(&name) {
        return None; // some service serves it
    }
    Some(ServiceError::not_found(format!(
        "unknown endpoint {subject}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::testing::{acct, dict, rules, view_of};
    use headcount_protocol::{DeviceId, Grace};

    fn plans_view() -> View {
        let plans = headcount_protocol::policy::default_plans();
        View::with_plans(rules(3, Policy::EvictOldest), plans, 0)
    }

    fn set_req(json: serde_json::Value) -> LimitsSetRequest {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn limits_set_merges_onto_the_stored_record() {
        let mut v = plans_view();
        v.set_overrides(
            &acct(),
            Some(AccountLimits {
                plan: Some("standard".into()),
                limit: Some(5),
                ..Default::default()
            }),
        );
        let merged = merge_limits(
            &v,
            &set_req(serde_json::json!({
                "account": "acme", "policy": "reject-new", "grace": {"seats": 1, "secs": 30}
            })),
        )
        .unwrap();
        assert_eq!(
            merged,
            AccountLimits {
                plan: Some("standard".into()),
                limit: Some(5),
                policy: Some(Policy::RejectNew),
                per_content: None,
                grace: Some(Grace { seats: 1, secs: 30 }),
            },
            "what was stored stays, what was given is added"
        );
        let merged = merge_limits(
            &v,
            &set_req(serde_json::json!({"account": "acme", "reset": true, "plan": "premium"})),
        )
        .unwrap();
        assert_eq!(
            merged,
            AccountLimits {
                plan: Some("premium".into()),
                ..Default::default()
            },
            "reset starts from nothing"
        );
        let cleared = merge_limits(
            &v,
            &set_req(serde_json::json!({"account": "acme", "reset": true})),
        )
        .unwrap();
        assert_eq!(cleared, AccountLimits::default());
    }

    #[test]
    fn limits_set_refuses_what_is_wrong_with_a_400() {
        let v = plans_view();
        let refused = |json: serde_json::Value| merge_limits(&v, &set_req(json)).unwrap_err();
        let e = refused(serde_json::json!({"account": "acme"}));
        assert!(e.is_bad_request());
        assert_eq!(
            e.message,
            "nothing to set: give limit, plan, policy, per_content, grace or reset"
        );
        let e = refused(serde_json::json!({"account": "acme", "plan": "gold"}));
        assert!(e.is_bad_request());
        assert_eq!(
            e.message,
            "unknown plan \"gold\": known plans are basic, premium, standard"
        );
        let e = refused(serde_json::json!({"account": "acme", "policy": "evict"}));
        assert!(e.is_bad_request() && e.message.starts_with("unknown policy \"evict\""));
        for bad in [
            serde_json::json!({"account": "acme", "limit": 0}),
            serde_json::json!({"account": "acme", "per_content": -1}),
            serde_json::json!({"account": "acme", "grace": {"seats": 1, "secs": 0}}),
        ] {
            assert!(refused(bad.clone()).is_bad_request(), "{bad}");
        }
        // Merging stores nothing: the view is unchanged.
        assert_eq!(v.overrides(&acct()), None);
    }

    #[test]
    fn check_refuses_long_content_and_strangers_with_a_400() {
        let v = view_of(2, Policy::EvictOldest, &[("a", "s1", 1_000)]);
        let req = |content: Option<String>, evict: Option<&str>| CheckRequest {
            account: acct(),
            device: DeviceId::parse("b").unwrap(),
            session: None,
            content,
            evict: evict.map(|s| SessionId::parse(s).unwrap()),
        };
        let long = "x".repeat(wire::MAX_CONTENT_LEN + 1);
        let e = decide_check(&v, &req(Some(long), None), 2_000).unwrap_err();
        assert!(e.is_bad_request());
        assert_eq!(
            e.message,
            format!("content is longer than {} bytes", wire::MAX_CONTENT_LEN)
        );
        let e = decide_check(&v, &req(None, Some("nope")), 2_000).unwrap_err();
        assert!(e.is_bad_request());
        assert_eq!(
            e.message,
            "session nope is not an active session of this account"
        );
        let ok = decide_check(&v, &req(None, None), 2_000).unwrap();
        assert!(ok.allowed && ok.victims.is_empty());
    }

    #[test]
    fn a_kick_ends_only_a_live_session_not_ended_yet() {
        let mut v = view_of(2, Policy::EvictOldest, &[("a", "s1", 1_000)]);
        let s1 = SessionId::parse("s1").unwrap();
        assert_eq!(
            kick_target(&v, &acct(), &s1, 2_000),
            Some(SessionRef {
                device: DeviceId::parse("a").unwrap(),
                session: s1.clone()
            })
        );
        let unknown = SessionId::parse("s9").unwrap();
        assert_eq!(kick_target(&v, &acct(), &unknown, 2_000), None);
        v.revoke(&acct(), &s1);
        assert_eq!(kick_target(&v, &acct(), &s1, 2_000), None);
    }

    #[test]
    fn replies_come_from_the_view() {
        let mut v = plans_view();
        v.set_dict(&acct(), 0, dict(&[("a", "s1", 1_000), ("b", "s2", 2_000)]));
        v.set_token_plan(&acct(), Some("standard".into()));
        let r = active_reply(&v, acct(), 3_000);
        assert_eq!((r.active, r.limit, r.policy), (2, 2, Policy::EvictOldest));
        assert_eq!(r.sessions.len(), 2);
        let r = limits_reply(&v, acct());
        assert_eq!((r.limit, r.plan.as_deref()), (2, Some("standard")));
    }

    #[test]
    fn requests_are_counted_by_outcome() {
        assert_eq!(outcome(&Ok(Bytes::new())), "ok");
        assert_eq!(outcome(&Err(ServiceError::bad_request("x"))), "bad_request");
        assert_eq!(outcome(&Err(ServiceError::not_found("x"))), "not_found");
        assert_eq!(outcome(&Err(ServiceError::internal("x"))), "error");
        let e = parse::<AccountRequest>(b"").unwrap_err();
        assert!(e.is_bad_request());
        assert_eq!(e.message, "empty request: expected a JSON object");
    }

    #[test]
    fn an_empty_stats_request_asks_about_everyone() {
        assert_eq!(stats_request(b" \n").unwrap().account, None);
        assert_eq!(
            stats_request(br#"{"account":"acme","top":3}"#).unwrap(),
            StatsRequest {
                account: Some(acct()),
                top: Some(3)
            }
        );
        assert!(stats_request(b"{").unwrap_err().is_bad_request());
    }

    #[test]
    fn only_requests_to_unserved_names_get_a_404() {
        let e = unknown_endpoint("headcount.nope", "_INBOX.x").unwrap();
        assert!(e.is_not_found());
        assert_eq!(e.message, "unknown endpoint headcount.nope");
        assert!(unknown_endpoint("headcount.nope", "_R_.abc.x").is_some());
        assert_eq!(unknown_endpoint("headcount.active", "_INBOX.x"), None);
        assert_eq!(unknown_endpoint("headcount.token", "_INBOX.x"), None);
        assert_eq!(
            unknown_endpoint("headcount.nope", "ctl.acme.tv"),
            None,
            "not a reply subject"
        );
    }
}
