//! The `headcount.*` endpoints: `active`, `check`, `limits.get`,
//! `limits.set`, `kick` and `stats`, and the 404 for names no service
//! serves.
//!
//! Any checker may receive any request, but only the checkers holding an
//! account's partition know its sessions: a request about an account of a
//! partition this checker does not serve is passed on, unchanged and with
//! the caller's reply subject, to `headcount.part.<partition>.<endpoint>`,
//! where the holders answer the caller directly ([`route`]). Limits are
//! known to every checker and answered where they arrive; `stats` over
//! every account gathers each partition's [`Summary`] from its holders.
//!
//! Every answer comes from the view, never from a KV read, except that
//! `limits.set` reads the record it replaces (compare-and-set) and answers
//! with what it stored. A refusal is a [`ServiceError`] (400 for a wrong
//! request, 404, 500), carried in the micro error headers.

use std::borrow::Cow;
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;
use headcount_protocol::partition::{self, PARTITIONS};
use headcount_protocol::policy::check_plan;
use headcount_protocol::subjects::{self, endpoint, kv as keys};
use headcount_protocol::wire::{
    self, AccountRequest, AccountUsage, ActiveReply, CheckReply, CheckRequest, EndReason,
    KickReply, KickRequest, LimitsReply, LimitsSetRequest, SessionRef, StatsReply, StatsRequest,
};
use headcount_protocol::{
    AccountId, AccountLimits, Limit, Plans, Policy, ServiceError, SessionId, UnixMillis, now_millis,
};
use headcount_runtime::service_error;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::enforcement::{Ended, Ending, end_session};
use crate::ledger;
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

/// How long `stats` waits for a partition's summary.
const SUMMARY_TIMEOUT: Duration = Duration::from_secs(2);

/// The partition whose holders must answer a request to `name` with this
/// body: that of the account it names, for the endpoints that read
/// sessions. None: any checker answers (limits are known to all, `stats`
/// without an account gathers), and so does a body that names no account
/// (its answer is a 400 wherever it is read).
pub(crate) fn route(name: &str, payload: &[u8]) -> Option<u32> {
    /// Only the account is read here; the endpoint reads the rest.
    #[derive(Deserialize)]
    struct Named<'a> {
        #[serde(borrow, default)]
        account: Option<Cow<'a, str>>,
    }
    match name {
        endpoint::ACTIVE | endpoint::CHECK | endpoint::KICK | endpoint::STATS => {}
        _ => return None,
    }
    let named: Named = serde_json::from_slice(payload).ok()?;
    let account = AccountId::parse(named.account?.as_ref()).ok()?;
    Some(partition::of(account.as_str()))
}

/// Answers one request to endpoint `name` that reached this checker's
/// service, or passes it on to the holders of its account's partition, and
/// counts it.
pub(crate) async fn serve(shared: &Shared, name: &'static str, req: async_nats::service::Request) {
    let started = Instant::now();
    let payload = req.message.payload.clone();
    if let Some(p) = route(name, &payload)
        && !shared.serves(p)
    {
        pass_on(shared, p, name, &req.message).await;
        count(shared, name, "passed_on", started);
        return;
    }
    let result = answer(shared, name, &payload).await;
    let outcome = outcome(&result);
    let reply = result.map_err(|e| service_error(e.header_code(), e.message));
    if let Err(e) = req.respond(reply).await {
        tracing::warn!(endpoint = name, error = %e, "sending reply");
    }
    count(shared, name, outcome, started);
}

/// Answers one request passed on to a partition this checker serves, on
/// the caller's reply subject, and counts it.
pub(crate) async fn serve_passed(shared: &Shared, partition: u32, msg: async_nats::Message) {
    let started = Instant::now();
    // The endpoints of the service, passed on, and the summary `stats`
    // gathers.
    let Some(name) = subjects::parse_partition_request(&msg.subject).and_then(|n| {
        SERVED
            .iter()
            .chain(&[endpoint::SUMMARY])
            .copied()
            .find(|&e| e == n)
    }) else {
        return;
    };
    let Some(reply) = msg.reply else {
        return;
    };
    let result = match name {
        endpoint::SUMMARY => summary(shared, partition, &msg.payload),
        _ => answer(shared, name, &msg.payload).await,
    };
    let outcome = outcome(&result);
    if let Err(e) = publish_reply(&shared.nats, reply, result).await {
        tracing::warn!(endpoint = name, error = %e, "sending reply");
    }
    count(shared, name, outcome, started);
}

/// The answer of endpoint `name` to this body, from this checker's view.
async fn answer(shared: &Shared, name: &str, payload: &[u8]) -> Result<Bytes, ServiceError> {
    match name {
        endpoint::ACTIVE => active(shared, payload),
        endpoint::CHECK => check(shared, payload).await,
        endpoint::LIMITS_GET => limits_get(shared, payload),
        endpoint::LIMITS_SET => limits_set(shared, payload).await,
        endpoint::KICK => kick(shared, payload).await,
        endpoint::STATS => stats(shared, payload).await,
        _ => Err(ServiceError::not_found(format!("unknown endpoint {name}"))),
    }
}

/// Passes a request on to the checkers holding partition `p`, unchanged
/// and with the caller's reply subject: one of them answers the caller. If
/// none holds it (no checker serves it yet), the server tells the caller
/// there are no responders.
async fn pass_on(shared: &Shared, p: u32, name: &str, msg: &async_nats::Message) {
    let Some(reply) = msg.reply.clone() else {
        return;
    };
    let subject = subjects::partition_request(p, name);
    let sent = match msg.headers.clone() {
        Some(h) => {
            shared
                .nats
                .publish_with_reply_and_headers(subject, reply, h, msg.payload.clone())
                .await
        }
        None => {
            shared
                .nats
                .publish_with_reply(subject, reply, msg.payload.clone())
                .await
        }
    };
    if let Err(e) = sent {
        tracing::warn!(endpoint = name, partition = p, error = %e, "passing a request on");
    }
}

/// Counts one request and the time it took.
fn count(shared: &Shared, name: &str, outcome: &str, started: Instant) {
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

/// Sends an answer on `reply` as the micro service would: the body, or the
/// error in the service error headers.
async fn publish_reply(
    nats: &async_nats::Client,
    reply: async_nats::Subject,
    result: Result<Bytes, ServiceError>,
) -> Result<(), async_nats::PublishError> {
    match result {
        Ok(body) => nats.publish(reply, body).await,
        Err(error) => {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                async_nats::service::NATS_SERVICE_ERROR,
                error.message.as_str(),
            );
            headers.insert(
                async_nats::service::NATS_SERVICE_ERROR_CODE,
                error.header_code().to_string().as_str(),
            );
            nats.publish_with_headers(reply, headers, error.message.into())
                .await
        }
    }
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
    let now = now_millis();
    // The victims are decided through the account's ledger, so that no
    // other checker (nor enforcement) makes room for the same seat twice.
    let decided = ledger::decide(shared, &req.account, now, |view| {
        plan_check(view, &req, now)
    })
    .await;
    for ending in decided.follow.into_iter().chain(decided.new) {
        end_session(shared, &req.account, ending).await;
    }
    if let Some(e) = decided.unrecorded {
        return Err(ServiceError::internal(e));
    }
    let outcome = decided.out?;
    json(&CheckReply {
        allowed: outcome.allowed,
        active: outcome.active,
        limit: outcome.limit.limit,
        policy: outcome.limit.policy,
        evicted: outcome.victims,
    })
}

/// The plan `check` decides with (see [`ledger::decide`]): the victims
/// [`decide_check`] names, each evicted for the requesting session, and
/// the answer.
pub(crate) fn plan_check(
    view: &mut View,
    req: &CheckRequest,
    now: UnixMillis,
) -> (Vec<Ending>, Result<CheckOutcome, ServiceError>) {
    match decide_check(view, req, now) {
        Ok(outcome) => {
            let by = req.session.clone().map(|session| SessionRef {
                device: req.device.clone(),
                session,
            });
            let ending = |victim: &SessionRef| Ending {
                victim: victim.clone(),
                reason: EndReason::Evicted,
                by: by.clone(),
            };
            (outcome.victims.iter().map(ending).collect(), Ok(outcome))
        }
        Err(e) => (Vec::new(), Err(e)),
    }
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
    limits_reply_of(account, limit, plan)
}

fn limits_reply_of(account: AccountId, limit: Limit, plan: Option<String>) -> LimitsReply {
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

/// A valid `limits.set` request: the fields it sets, on top of the stored
/// record or (`reset`) of none.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LimitsEdit {
    reset: bool,
    fields: AccountLimits,
}

impl LimitsEdit {
    /// The record this edit makes of `stored` (None: there is none); None
    /// when that is empty, as an empty record is no record (the account is
    /// back on its plan). Applying it to its own result changes nothing, so
    /// a write retried after an unknown outcome is not applied twice.
    fn apply(&self, stored: Option<&AccountLimits>) -> Option<AccountLimits> {
        let base = match stored {
            Some(s) if !self.reset => s.clone(),
            _ => AccountLimits::default(),
        };
        let f = &self.fields;
        let record = AccountLimits {
            plan: f.plan.clone().or(base.plan),
            limit: f.limit.or(base.limit),
            policy: f.policy.or(base.policy),
            per_content: f.per_content.or(base.per_content),
            grace: f.grace.or(base.grace),
        };
        (record != AccountLimits::default()).then_some(record)
    }
}

/// Validates a `limits.set` request: the edit, or a 400 naming what is
/// wrong (nothing is stored then).
fn limits_edit(plans: &Plans, req: &LimitsSetRequest) -> Result<LimitsEdit, ServiceError> {
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
    let mut fields = AccountLimits::default();
    if let Some(plan) = &req.plan {
        check_plan(plan, plans.keys().map(String::as_str)).map_err(ServiceError::bad_request)?;
        fields.plan = Some(plan.clone());
    }
    if let Some(p) = &req.policy {
        fields.policy = Some(p.parse::<Policy>().map_err(ServiceError::bad_request)?);
    }
    // Validate the numbers through Limit's own checks.
    let probe = Limit::new(req.limit.unwrap_or(1), Policy::EvictOldest)
        .and_then(|l| l.with_per_content(req.per_content))
        .and_then(|l| l.with_grace(req.grace.map(|g| (g.seats, g.secs))))
        .map_err(ServiceError::bad_request)?;
    if req.limit.is_some() {
        fields.limit = Some(probe.limit);
    }
    if req.per_content.is_some() {
        fields.per_content = probe.per_content;
    }
    if req.grace.is_some() {
        fields.grace = probe.grace;
    }
    Ok(LimitsEdit {
        reset: req.reset,
        fields,
    })
}

/// How many times `limits.set` reads the stored record and tries to replace
/// it: a try fails only when another write to the account's limits landed
/// between its read and its write (or its write timed out).
const STORE_TRIES: u32 = 10;

/// The pause before try `attempt` (from 1): a few milliseconds more each
/// time, jittered, so that requests that collided do not collide again in
/// step.
fn retry_pause(attempt: u32) -> Duration {
    let jitter = RandomState::new().hash_one(attempt) % 10;
    Duration::from_millis(5 * u64::from(attempt) + jitter)
}

/// An account's record as the limits bucket holds it: None when there is
/// none (never written, or removed), Err when its value cannot be read.
fn stored_record(entry: Option<(kv::Operation, &[u8])>) -> Result<Option<AccountLimits>, String> {
    match entry {
        None | Some((kv::Operation::Delete | kv::Operation::Purge, _)) => Ok(None),
        Some((kv::Operation::Put, value)) => serde_json::from_slice(value)
            .map(Some)
            .map_err(|e| e.to_string()),
    }
}

/// What one try of `limits.set` does with the record the key holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// The key already holds what the edit makes of it: nothing to write.
    Done(Option<AccountLimits>),
    /// Replace the stored record by this one (None: remove it).
    Write(Option<AccountLimits>),
}

fn step(
    edit: &LimitsEdit,
    stored: Result<Option<AccountLimits>, String>,
) -> Result<Step, ServiceError> {
    let stored = match stored {
        Ok(record) => Some(record),
        // A reset needs nothing of the old record, so it replaces one that
        // cannot be read; any other edit would lose what it held.
        Err(_) if edit.reset => None,
        Err(e) => {
            return Err(ServiceError::internal(format!(
                "storing limits: the stored record cannot be read: {e}"
            )));
        }
    };
    let record = edit.apply(stored.as_ref().and_then(Option::as_ref));
    Ok(if stored.as_ref() == Some(&record) {
        Step::Done(record)
    } else {
        Step::Write(record)
    })
}

/// What an account's limits key holds after `limits.set`: the record (None:
/// none) and its revision (for a removal, a revision below or at the
/// removal's own, which is not reported back, and above every earlier one).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stored {
    record: Option<AccountLimits>,
    revision: u64,
}

/// Applies `edit` to the record stored under `key` with compare-and-set:
/// reads the record and its revision, writes the edited record only if the
/// key still holds that revision, and starts again from a fresh read when
/// another write landed first. So concurrent requests, on one checker or
/// several, each land on top of the others.
async fn store_limits(
    store: &kv::Store,
    key: &str,
    edit: &LimitsEdit,
) -> Result<Stored, ServiceError> {
    let storing =
        |e: &dyn std::fmt::Display| ServiceError::internal(format!("storing limits: {e}"));
    for attempt in 0..STORE_TRIES {
        if attempt > 0 {
            tokio::time::sleep(retry_pause(attempt)).await;
        }
        let entry = match store.entry(key).await {
            Ok(entry) => entry,
            Err(e) if e.kind() == kv::EntryErrorKind::TimedOut => continue,
            Err(e) => return Err(storing(&e)),
        };
        let revision = entry.as_ref().map_or(0, |e| e.revision);
        let stored = stored_record(entry.as_ref().map(|e| (e.operation, e.value.as_ref())));
        let record = match step(edit, stored)? {
            Step::Done(record) => return Ok(Stored { record, revision }),
            Step::Write(record) => record,
        };
        let written = match &record {
            Some(r) => {
                let body = serde_json::to_vec(r).map_err(ServiceError::internal)?;
                store.update(key, body.into(), revision).await
            }
            None => store
                .delete_expect_revision(key, Some(revision))
                .await
                .map(|()| revision + 1),
        };
        match written {
            Ok(revision) => return Ok(Stored { record, revision }),
            // Another write landed first, or this one timed out and may
            // have landed: read again (an edit that did land is found
            // applied, and not written twice).
            Err(e)
                if matches!(
                    e.kind(),
                    kv::UpdateErrorKind::WrongLastRevision | kv::UpdateErrorKind::TimedOut
                ) =>
            {
                tracing::debug!(key, attempt, error = %e, "limits changed meanwhile; trying again");
            }
            Err(e) => return Err(storing(&e)),
        }
    }
    Err(storing(&format!(
        "the record kept changing under {STORE_TRIES} tries; try again"
    )))
}

async fn limits_set(shared: &Shared, payload: &[u8]) -> Result<Bytes, ServiceError> {
    let req: LimitsSetRequest = parse(payload)?;
    let edit = limits_edit(shared.view(req.account.as_str()).plans(), &req)?;
    let key = keys::limits(&req.account);
    let stored = store_limits(&shared.buckets.limits, &key, &edit).await?;
    // The watch brings the record to every replica; this one applies it at
    // once unless its watch already brought a newer one. The reply is what
    // was stored either way.
    let reply = {
        let mut v = shared.view(req.account.as_str());
        v.set_overrides_at(&req.account, stored.record.clone(), stored.revision);
        let (limit, plan) = v.limit_and_plan_with(&req.account, stored.record.as_ref());
        limits_reply_of(req.account.clone(), limit, plan)
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

async fn stats(shared: &Shared, payload: &[u8]) -> Result<Bytes, ServiceError> {
    let req = stats_request(payload)?;
    let now = now_millis();
    let reply = match &req.account {
        Some(a) => {
            let b = shared.view(a.as_str()).breakdown(a, now);
            stats_reply(Some(a.clone()), b, Vec::new())
        }
        None => {
            let n = req.top.unwrap_or(10).min(1000);
            let mine = shared.served();
            let (mut b, mut peaks) = shared.breakdown_of(&mine, now);
            let mut top = top_of(shared, &mine, n as usize, now);
            let others = (0..PARTITIONS).filter(|p| !mine.contains(p));
            let asked = futures::future::join_all(others.map(|p| ask_summary(shared, p, n))).await;
            for s in asked {
                let s = s?;
                b.merge(view::Breakdown {
                    total: s.stats.active,
                    peak: 0,
                    by_content: s.stats.by_content,
                    by_kind: s.stats.by_kind,
                    by_region: s.stats.by_region,
                });
                peaks.add(&view::Peaks::from_wire(s.minute, &s.peaks));
                top.extend(s.stats.top);
            }
            b.peak = peaks.max().max(b.total);
            top.sort_by(|a, b| {
                b.active
                    .cmp(&a.active)
                    .then_with(|| a.account.cmp(&b.account))
            });
            top.truncate(n as usize);
            stats_reply(None, b, top)
        }
    };
    json(&reply)
}

fn stats_reply(
    account: Option<AccountId>,
    b: view::Breakdown,
    top: Vec<AccountUsage>,
) -> StatsReply {
    StatsReply {
        account,
        active: b.total,
        peak: b.peak,
        window_minutes: view::PEAK_WINDOW_MINUTES as u32,
        by_content: b.by_content,
        by_kind: b.by_kind,
        by_region: b.by_region,
        top,
    }
}

/// The `n` busiest accounts of `partitions`, busiest first.
fn top_of(shared: &Shared, partitions: &[u32], n: usize, now: UnixMillis) -> Vec<AccountUsage> {
    let mut top: Vec<(AccountId, u32, Limit)> = partitions
        .iter()
        .flat_map(|&p| shared.view_of(p).top(n, now))
        .collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top.into_iter()
        .take(n)
        .map(|(account, active, limit)| AccountUsage {
            account,
            active,
            limit: limit.limit,
        })
        .collect()
}

/// One partition's part of `stats` over every account, as its holders
/// answer it on `headcount.part.<partition>.summary` (body: a `stats`
/// request, of which only `top` is read): the partition's usage and
/// busiest accounts, and its peaks minute by minute, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Summary {
    #[serde(flatten)]
    stats: StatsReply,
    /// The newest minute of `peaks` (minutes since the Unix epoch).
    minute: u64,
    peaks: Vec<u32>,
}

fn summary(shared: &Shared, p: u32, payload: &[u8]) -> Result<Bytes, ServiceError> {
    let req = stats_request(payload)?;
    let n = req.top.unwrap_or(10).min(1000) as usize;
    let now = now_millis();
    let (b, peaks) = shared.breakdown_of(&[p], now);
    let (minute, peaks) = peaks.to_wire();
    json(&Summary {
        stats: stats_reply(None, b, top_of(shared, &[p], n, now)),
        minute,
        peaks,
    })
}

/// Asks the holders of partition `p` for its summary; an error names the
/// partition, so that `stats` is never answered from part of the accounts.
async fn ask_summary(shared: &Shared, p: u32, top: u32) -> Result<Summary, ServiceError> {
    let failed = |e: &dyn std::fmt::Display| {
        ServiceError::internal(format!(
            "stats: partition {p} did not answer ({e}); try again"
        ))
    };
    let body = serde_json::to_vec(&StatsRequest {
        account: None,
        top: Some(top),
    })
    .map_err(|e| failed(&e))?;
    let ask = shared.nats.request(
        subjects::partition_request(p, endpoint::SUMMARY),
        body.into(),
    );
    let msg = tokio::time::timeout(SUMMARY_TIMEOUT, ask)
        .await
        .map_err(|e| failed(&e))?
        .map_err(|e| failed(&e))?;
    if let Some(code) = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::service::NATS_SERVICE_ERROR))
    {
        return Err(failed(&code.as_str()));
    }
    serde_json::from_slice(&msg.payload).map_err(|e| failed(&e))
}

async fn kick(shared: &Shared, payload: &[u8]) -> Result<Bytes, ServiceError> {
    let req: KickRequest = parse(payload)?;
    let now = now_millis();
    let decided =
        ledger::decide(shared, &req.account, now, |view| plan_kick(view, &req, now)).await;
    for ending in decided.follow {
        end_session(shared, &req.account, ending).await;
    }
    if let Some(e) = decided.unrecorded {
        return Err(ServiceError::internal(e));
    }
    let kicked = match decided.new.into_iter().next() {
        // Won also when the revocation landed but its acknowledgement was
        // lost: the read-back finds this kick's own decision in the key.
        Some(ending) => match end_session(shared, &req.account, ending).await {
            Ended::Won => true,
            Ended::Lost => false,
            // Whether it landed is unknown: neither answer would be true.
            Ended::Unsettled => {
                return Err(ServiceError::internal(
                    "recording the revocation: the revoked bucket does not answer; \
                     the checker keeps trying and tells the device once it lands",
                ));
            }
        },
        None => false,
    };
    json(&KickReply { kicked })
}

/// The plan `kick` decides with (see [`ledger::decide`]): its target, if
/// it is still to end, revoked by the operator.
pub(crate) fn plan_kick(view: &mut View, req: &KickRequest, now: UnixMillis) -> (Vec<Ending>, ()) {
    let target = kick_target(view, &req.account, &req.session, now);
    let ending = |victim: &SessionRef| Ending {
        victim: victim.clone(),
        reason: EndReason::Revoked,
        by: None,
    };
    (target.iter().map(ending).collect(), ())
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
    if let Err(e) = publish_reply(nats, reply, Err(error)).await {
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
    // Requests passed on between checkers are the partitions' holders' to
    // answer (or the server's: no responders).
    if subject
        .strip_prefix(subjects::PARTITION_REQUEST_PREFIX)
        .is_some_and(|rest| rest.starts_with('.'))
    {
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

    fn edit(json: serde_json::Value) -> Result<LimitsEdit, ServiceError> {
        limits_edit(&headcount_protocol::policy::default_plans(), &set_req(json))
    }

    #[test]
    fn requests_that_read_sessions_go_to_their_accounts_partition() {
        let p = partition::of("acme");
        for name in [
            endpoint::ACTIVE,
            endpoint::CHECK,
            endpoint::KICK,
            endpoint::STATS,
        ] {
            assert_eq!(
                route(name, br#"{"account":"acme","device":"tv"}"#),
                Some(p),
                "{name}"
            );
        }
        // Limits are known to every checker.
        assert_eq!(route(endpoint::LIMITS_GET, br#"{"account":"acme"}"#), None);
        assert_eq!(route(endpoint::LIMITS_SET, br#"{"account":"acme"}"#), None);
        // Stats over every account gathers; bad bodies get their 400 here.
        assert_eq!(route(endpoint::STATS, br#"{"top":3}"#), None);
        assert_eq!(route(endpoint::STATS, b""), None);
        assert_eq!(route(endpoint::ACTIVE, b"{not json"), None);
        assert_eq!(route(endpoint::ACTIVE, br#"{"account":"bad name!"}"#), None);
        assert_eq!(route(endpoint::ACTIVE, br#"{"account":7}"#), None);
        // An escaped name is read like any other.
        assert_eq!(
            route(endpoint::ACTIVE, br#"{"account":"ac\u006de"}"#),
            Some(p)
        );
    }

    #[test]
    fn a_summary_crosses_the_wire_unchanged() {
        let s = Summary {
            stats: stats_reply(
                None,
                view::Breakdown {
                    total: 3,
                    peak: 4,
                    by_content: [("film".to_string(), 3)].into(),
                    ..Default::default()
                },
                vec![AccountUsage {
                    account: acct(),
                    active: 3,
                    limit: 5,
                }],
            ),
            minute: 29_000_000,
            peaks: vec![3, 4],
        };
        let back: Summary = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn limits_set_merges_onto_the_stored_record() {
        let stored = AccountLimits {
            plan: Some("standard".into()),
            limit: Some(5),
            ..Default::default()
        };
        let e = edit(serde_json::json!({
            "account": "acme", "policy": "reject-new", "grace": {"seats": 1, "secs": 30}
        }))
        .unwrap();
        let merged = AccountLimits {
            plan: Some("standard".into()),
            limit: Some(5),
            policy: Some(Policy::RejectNew),
            per_content: None,
            grace: Some(Grace { seats: 1, secs: 30 }),
        };
        assert_eq!(
            e.apply(Some(&stored)),
            Some(merged.clone()),
            "what was stored stays, what was given is added"
        );
        assert_eq!(e.apply(Some(&merged)), Some(merged), "idempotent");
        let e =
            edit(serde_json::json!({"account": "acme", "reset": true, "plan": "premium"})).unwrap();
        assert_eq!(
            e.apply(Some(&stored)),
            Some(AccountLimits {
                plan: Some("premium".into()),
                ..Default::default()
            }),
            "reset starts from nothing"
        );
        let e = edit(serde_json::json!({"account": "acme", "reset": true})).unwrap();
        assert_eq!(e.apply(Some(&stored)), None, "an empty record is none");
    }

    #[test]
    fn limits_set_refuses_what_is_wrong_with_a_400() {
        let refused = |json: serde_json::Value| edit(json).unwrap_err();
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
    }

    #[test]
    fn limits_set_writes_only_what_changes_the_stored_record() {
        let limit = |n: u32| AccountLimits {
            limit: Some(n),
            ..Default::default()
        };
        let policy = AccountLimits {
            policy: Some(Policy::RejectNew),
            ..Default::default()
        };
        let set_limit = edit(serde_json::json!({"account": "acme", "limit": 4})).unwrap();
        // Never written, removed, or holding the other request's field: the
        // edit lands on what is there.
        assert_eq!(stored_record(None), Ok(None));
        let removed = stored_record(Some((kv::Operation::Delete, b"".as_slice())));
        assert_eq!(removed, Ok(None));
        assert_eq!(step(&set_limit, Ok(None)), Ok(Step::Write(Some(limit(4)))));
        let held = stored_record(Some((kv::Operation::Put, br#"{"policy":"reject-new"}"#)));
        assert_eq!(held, Ok(Some(policy.clone())));
        assert_eq!(
            step(&set_limit, held),
            Ok(Step::Write(Some(AccountLimits {
                limit: Some(4),
                ..policy
            })))
        );
        // Already there (a write that timed out but landed): nothing to write.
        assert_eq!(
            step(&set_limit, Ok(Some(limit(4)))),
            Ok(Step::Done(Some(limit(4))))
        );
        let reset = edit(serde_json::json!({"account": "acme", "reset": true})).unwrap();
        assert_eq!(step(&reset, Ok(Some(limit(4)))), Ok(Step::Write(None)));
        assert_eq!(step(&reset, Ok(None)), Ok(Step::Done(None)));
        // A record that cannot be read is replaced only by a reset.
        let garbage = stored_record(Some((kv::Operation::Put, b"{not json".as_slice())));
        assert!(garbage.is_err());
        let e = step(&set_limit, garbage.clone()).unwrap_err();
        assert_eq!(e.code, 500);
        assert!(
            e.message
                .starts_with("storing limits: the stored record cannot be read")
        );
        assert_eq!(step(&reset, garbage), Ok(Step::Write(None)));
    }

    #[test]
    fn retries_pause_a_little_longer_each_time() {
        for attempt in 1..STORE_TRIES {
            let pause = retry_pause(attempt);
            let base = Duration::from_millis(5 * u64::from(attempt));
            assert!(pause >= base && pause < base + Duration::from_millis(10));
        }
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
            unknown_endpoint("headcount.part.3.nope", "_INBOX.x"),
            None,
            "a partition's holders answer, or the server does"
        );
        assert!(unknown_endpoint("headcount.partx", "_INBOX.x").is_some());
        assert_eq!(
            unknown_endpoint("headcount.nope", "ctl.acme.tv"),
            None,
            "not a reply subject"
        );
    }
}
