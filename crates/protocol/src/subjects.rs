//! Every subject, endpoint and KV key of the system.

use crate::names::{AccountId, DeviceId, NameError, SessionId};

/// Devices publish heartbeats here: `hb.<account>.<device>.<session>`.
pub const HEARTBEAT_WILDCARD: &str = "hb.*.*.*";
/// Where heartbeats arrive: nats-server maps each one to
/// `hbp.<partition>.<account>.<device>.<session>`
/// ([`crate::partition`]).
pub const PARTITIONED_WILDCARD: &str = "hbp.*.*.*.*";

/// The heartbeats of one partition.
pub fn partition_heartbeats(partition: u32) -> String {
    format!("hbp.{partition}.*.*.*")
}

/// Queue group of the handler instances holding one partition: while a
/// partition changes hands, both hold it and share its heartbeats.
pub fn handler_queue_group(partition: u32) -> String {
    format!("headcount-handlers-{partition}")
}

/// Prefix of every request-reply endpoint.
pub const SERVICE_PREFIX: &str = "headcount";
/// Endpoint names under [`SERVICE_PREFIX`].
pub mod endpoint {
    pub const ACTIVE: &str = "active";
    pub const CHECK: &str = "check";
    pub const LIMITS_GET: &str = "limits.get";
    pub const LIMITS_SET: &str = "limits.set";
    pub const KICK: &str = "kick";
    pub const TOKEN: &str = "token";
    pub const STATS: &str = "stats";
    /// Every endpoint served by some headcount service.
    pub const ALL: &[&str] = &[ACTIVE, CHECK, LIMITS_GET, LIMITS_SET, KICK, TOKEN, STATS];
    /// Between checkers only: one partition's part of `stats` (see
    /// [`super::partition_request`]).
    pub const SUMMARY: &str = "summary";
}

/// Prefix of the requests passed between checkers, by partition.
pub const PARTITION_REQUEST_PREFIX: &str = "headcount.part";

/// `headcount.part.<partition>.<endpoint>`: where a checker that does not
/// hold an account's partition passes a request on, to the checkers that
/// do (one of them answers, on the caller's reply subject). Only the
/// checkers may publish here; it is exported to no other account.
pub fn partition_request(partition: u32, endpoint: &str) -> String {
    format!("{PARTITION_REQUEST_PREFIX}.{partition}.{endpoint}")
}

/// Every request passed on to the checkers holding `partition`.
pub fn partition_requests(partition: u32) -> String {
    format!("{PARTITION_REQUEST_PREFIX}.{partition}.>")
}

/// Queue group of the checkers holding one partition: each request passed
/// on is answered by one of them.
pub fn checker_queue_group(partition: u32) -> String {
    format!("headcount-checkers-{partition}")
}

/// The endpoint a request passed on to a partition names; None for a
/// subject that is not one.
pub fn parse_partition_request(subject: &str) -> Option<&str> {
    let rest = subject
        .strip_prefix(PARTITION_REQUEST_PREFIX)?
        .strip_prefix('.')?;
    let (partition, endpoint) = rest.split_once('.')?;
    let p: u32 = partition.parse().ok()?;
    (p < crate::partition::PARTITIONS && !endpoint.is_empty()).then_some(endpoint)
}

/// The full subject of an endpoint, e.g. `headcount.active`.
pub fn endpoint_subject(endpoint: &str) -> String {
    format!("{SERVICE_PREFIX}.{endpoint}")
}

/// `hb.<account>.<device>.<session>`
pub fn heartbeat(account: &AccountId, device: &DeviceId, session: &SessionId) -> String {
    format!("hb.{account}.{device}.{session}")
}

/// `hbp.<partition>.<account>.<device>.<session>`: where nats-server puts a
/// heartbeat published on [`heartbeat`], and so the subject a device's
/// permission to publish must name (the server checks the subject its
/// mapping made).
pub fn partitioned_heartbeat(
    account: &AccountId,
    device: &DeviceId,
    session: &SessionId,
) -> String {
    let p = crate::partition::of(account.as_str());
    format!("hbp.{p}.{account}.{device}.{session}")
}

/// `ctl.<account>.<device>`
pub fn control(account: &AccountId, device: &DeviceId) -> String {
    format!("ctl.{account}.{device}")
}

/// `headcount.events.<account>`
pub fn events(account: &AccountId) -> String {
    format!("{SERVICE_PREFIX}.events.{account}")
}

/// Every account's presence events.
pub const EVENTS_WILDCARD: &str = "headcount.events.*";

/// Why a heartbeat subject was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("subject is not hb.<account>.<device>.<session>")]
    Shape,
    #[error(transparent)]
    Name(#[from] NameError),
}

/// The three identifiers carried by a heartbeat subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatSubject {
    pub account: AccountId,
    pub device: DeviceId,
    pub session: SessionId,
}

/// The three identifiers of a heartbeat subject, validated but borrowed
/// (the ingest hot path allocates nothing for a known session).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatSubjectRef<'a> {
    pub account: &'a str,
    pub device: &'a str,
    pub session: &'a str,
}

impl HeartbeatSubjectRef<'_> {
    pub fn to_owned(&self) -> HeartbeatSubject {
        // Validated by parse_heartbeat_ref, so these cannot fail; keep the
        // checks rather than trust it.
        HeartbeatSubject {
            account: AccountId::parse(self.account).unwrap_or_else(|_| unreachable!()),
            device: DeviceId::parse(self.device).unwrap_or_else(|_| unreachable!()),
            session: SessionId::parse(self.session).unwrap_or_else(|_| unreachable!()),
        }
    }
}

/// Parses and validates `hb.<account>.<device>.<session>` without
/// allocating.
pub fn parse_heartbeat_ref(subject: &str) -> Result<HeartbeatSubjectRef<'_>, SubjectError> {
    let rest = subject.strip_prefix("hb.").ok_or(SubjectError::Shape)?;
    parse_ids(rest)
}

/// Parses and validates a heartbeat as it arrives,
/// `hbp.<partition>.<account>.<device>.<session>`, without allocating: the
/// partition the server put it on, and its identifiers.
pub fn parse_partitioned_ref(
    subject: &str,
) -> Result<(u32, HeartbeatSubjectRef<'_>), SubjectError> {
    let rest = subject.strip_prefix("hbp.").ok_or(SubjectError::Shape)?;
    let (p, rest) = rest.split_once('.').ok_or(SubjectError::Shape)?;
    // Digits only: `+1` or ` 1` is not a partition the server writes.
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SubjectError::Shape);
    }
    let p: u32 = p.parse().map_err(|_| SubjectError::Shape)?;
    Ok((p, parse_ids(rest)?))
}

/// `<account>.<device>.<session>`, validated.
fn parse_ids(rest: &str) -> Result<HeartbeatSubjectRef<'_>, SubjectError> {
    let mut parts = rest.split('.');
    let (Some(a), Some(d), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SubjectError::Shape);
    };
    crate::names::check_account(a)?;
    crate::names::check_device(d)?;
    crate::names::check_session(s)?;
    Ok(HeartbeatSubjectRef {
        account: a,
        device: d,
        session: s,
    })
}

/// Parses `hb.<account>.<device>.<session>`.
pub fn parse_heartbeat(subject: &str) -> Result<HeartbeatSubject, SubjectError> {
    parse_heartbeat_ref(subject).map(|ids| ids.to_owned())
}

/// The nats-server system service that closes one client connection
/// (request `{"cid": <client id>}`), on the server `server_id` (`N...`).
/// The services' account imports it from the system account.
pub fn server_kick(server_id: &str) -> String {
    format!("$SYS.REQ.SERVER.{server_id}.KICK")
}

/// KV bucket names and key layouts.
pub mod kv {
    use super::*;

    /// Interval dictionaries: key `<partition>.<account>.<interval>`, value
    /// a MessagePack map device -> session record. Written only by
    /// heartbeat-handler.
    pub const SESSIONS_BUCKET: &str = "headcount-sessions";
    /// The most sessions buckets the partitions may be spread over (the
    /// server's permissions name each of them).
    pub const MAX_SESSIONS_BUCKETS: u32 = 8;

    /// The name of sessions bucket `i` of a deployment that spreads its
    /// partitions over several: the first is [`SESSIONS_BUCKET`], the others
    /// `headcount-sessions-<i>`, each a stream of its own, with a leader of
    /// its own.
    pub fn sessions_bucket(i: u32) -> String {
        match i {
            0 => SESSIONS_BUCKET.to_string(),
            i => format!("{SESSIONS_BUCKET}-{i}"),
        }
    }

    /// Which of `buckets` sessions buckets holds `partition`'s keys.
    pub fn sessions_bucket_of(partition: u32, buckets: u32) -> u32 {
        partition % buckets.max(1)
    }
    /// Ended sessions whose heartbeats must be ignored: key
    /// `<account>.<session>`. Written with create-only semantics so that each
    /// eviction, rejection or kick happens once.
    pub const REVOKED_BUCKET: &str = "headcount-revoked";
    /// Per-account limits: key `<account>` holds what an operator set (JSON
    /// `AccountLimits`), key `<account>.plan` the plan named by the
    /// account's latest token (a JSON string).
    pub const LIMITS_BUCKET: &str = "headcount-limits";
    /// Timeouts already announced: key `<account>.<session>`, create-only,
    /// so that one of several checkers publishes each `timeout` event.
    pub const TIMEOUTS_BUCKET: &str = "headcount-timeouts";
    /// Who is connected with which token, and which operator and backend
    /// tokens were revoked: key `d.<account>.<session>` holds the one live
    /// connection of a device session, `c.<token id>` the connections of an
    /// operator or backend token, `r.<token id>` the revocation of such a
    /// token. Written only by token-vendor (the auth callout and its HTTP
    /// API). Its first key token keeps it apart from account names.
    pub const CONNECTIONS_BUCKET: &str = "headcount-connections";
    /// How long the connections bucket keeps a record: the longest an
    /// operator or backend token may live, so a revocation outlives the
    /// token it ends.
    pub const CONNECTIONS_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

    /// `<partition>.<account>.<interval>`: the partition first, so that the
    /// holder of a partition watches its keys alone.
    /// Live instances of the services: key `<role>.<instance>`, value the
    /// partitions the instance serves (JSON), rewritten every second.
    pub const MEMBERS_BUCKET: &str = "headcount-members";
    /// How long the members bucket keeps a record not rewritten: long
    /// past the moment its readers count its instance gone.
    pub const MEMBERS_TTL: std::time::Duration = std::time::Duration::from_secs(60);

    pub fn session_dict(account: &AccountId, interval: u64) -> String {
        let p = crate::partition::of(account.as_str());
        format!("{p}.{account}.{interval}")
    }

    /// Every dictionary of one partition, for a watch.
    pub fn session_dicts_of(partition: u32) -> String {
        format!("{partition}.>")
    }

    /// Parses `<partition>.<account>.<interval>`; None for any other key,
    /// and for a partition that is not the account's.
    pub fn parse_session_dict(key: &str) -> Option<(AccountId, u64)> {
        let (p, rest) = key.split_once('.')?;
        let (a, i) = rest.split_once('.')?;
        let account = AccountId::parse(a).ok()?;
        if p.parse::<u32>().ok()? != crate::partition::of(a) || p.starts_with('+') {
            return None;
        }
        Some((account, i.parse().ok()?))
    }

    pub fn revoked(account: &AccountId, session: &SessionId) -> String {
        format!("{account}.{session}")
    }

    pub fn parse_revoked(key: &str) -> Option<(AccountId, SessionId)> {
        let (a, s) = key.split_once('.')?;
        Some((AccountId::parse(a).ok()?, SessionId::parse(s).ok()?))
    }

    /// The account's ledger of decided endings, in the revoked bucket. Its
    /// second token starts with `=`, which no session id holds, so readers
    /// of revocations ([`parse_revoked`]) pass it by.
    pub fn ledger(account: &AccountId) -> String {
        format!("{account}.=ledger")
    }

    pub fn limits(account: &AccountId) -> String {
        account.to_string()
    }

    /// The live connection of a device session.
    pub fn device_connection(account: &AccountId, session: &SessionId) -> String {
        format!("d.{account}.{session}")
    }

    /// The live connections of an operator or backend token.
    pub fn client_connections(token_id: &SessionId) -> String {
        format!("c.{token_id}")
    }

    /// Every key of [`client_connections`], for a watch.
    pub const CLIENT_CONNECTIONS_WILDCARD: &str = "c.*";

    /// The revocation of an operator or backend token.
    pub fn client_revoked(token_id: &SessionId) -> String {
        format!("r.{token_id}")
    }

    pub fn token_plan(account: &AccountId) -> String {
        format!("{account}.plan")
    }

    /// A key of the limits bucket: the operator's record, or the token plan.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum LimitsKey {
        Overrides(AccountId),
        TokenPlan(AccountId),
    }

    pub fn parse_limits(key: &str) -> Option<LimitsKey> {
        match key.split_once('.') {
            None => Some(LimitsKey::Overrides(AccountId::parse(key).ok()?)),
            Some((a, "plan")) => Some(LimitsKey::TokenPlan(AccountId::parse(a).ok()?)),
            Some(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_subject_round_trips() {
        let a = AccountId::parse("acme").unwrap();
        let d = DeviceId::parse("tv-1").unwrap();
        let s = SessionId::parse("S_1").unwrap();
        let subject = heartbeat(&a, &d, &s);
        assert_eq!(subject, "hb.acme.tv-1.S_1");
        let parsed = parse_heartbeat(&subject).unwrap();
        assert_eq!((parsed.account, parsed.device, parsed.session), (a, d, s));
    }

    #[test]
    fn partitions_spread_evenly_over_the_sessions_buckets() {
        assert_eq!(kv::sessions_bucket(0), "headcount-sessions");
        assert_eq!(kv::sessions_bucket(3), "headcount-sessions-3");
        for n in 1..=kv::MAX_SESSIONS_BUCKETS {
            let mut per = vec![0; n as usize];
            for p in 0..crate::partition::PARTITIONS {
                per[kv::sessions_bucket_of(p, n) as usize] += 1;
            }
            let (lo, hi) = (per.iter().min().unwrap(), per.iter().max().unwrap());
            assert!(hi - lo <= 1, "{n} buckets: {per:?}");
        }
        assert_eq!(kv::sessions_bucket_of(5, 0), 0, "no spread: one bucket");
    }

    #[test]
    fn a_request_passed_on_names_its_endpoint_and_a_real_partition() {
        let subject = partition_request(7, endpoint::LIMITS_GET);
        assert_eq!(subject, "headcount.part.7.limits.get");
        assert_eq!(parse_partition_request(&subject), Some("limits.get"));
        assert_eq!(
            parse_partition_request("headcount.part.31.check"),
            Some("check")
        );
        for bad in [
            "headcount.part.32.check",
            "headcount.part.x.check",
            "headcount.part.7",
            "headcount.part.7.",
            "headcount.check",
            "headcount.partx.7.check",
        ] {
            assert_eq!(parse_partition_request(bad), None, "{bad}");
        }
        assert_eq!(partition_requests(7), "headcount.part.7.>");
    }

    #[test]
    fn a_partitioned_heartbeat_parses_to_its_partition_and_ids() {
        let (p, ids) = parse_partitioned_ref("hbp.15.acme.tv-1.S_1").unwrap();
        assert_eq!(p, 15);
        assert_eq!(
            (ids.account, ids.device, ids.session),
            ("acme", "tv-1", "S_1")
        );
        for bad in [
            "hbp.x.acme.tv-1.S_1",
            "hbp.+1.acme.tv-1.S_1",
            "hbp..acme.tv-1.S_1",
            "hbp.1.acme.tv-1",
            "hbp.1.acme.tv-1.S_1.x",
            "hb.acme.tv-1.S_1",
            "hbp.99999999999.acme.tv-1.S_1",
        ] {
            assert_eq!(
                parse_partitioned_ref(bad),
                Err(SubjectError::Shape),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_partitioned_ref("hbp.1.acme.tv-1."),
            Err(SubjectError::Name(_))
        ));
    }

    #[test]
    fn heartbeat_subject_shape_is_checked() {
        for bad in ["hb.a.b", "hb.a.b.c.d", "xx.a.b.c", "", "hb"] {
            assert_eq!(parse_heartbeat(bad), Err(SubjectError::Shape), "{bad}");
        }
        assert!(matches!(
            parse_heartbeat("hb.a.b."),
            Err(SubjectError::Name(_))
        ));
    }

    #[test]
    fn kv_keys_round_trip() {
        let a = AccountId::parse("acme").unwrap();
        assert_eq!(
            kv::parse_session_dict(&kv::session_dict(&a, 42)),
            Some((a.clone(), 42))
        );
        let s = SessionId::parse("abc").unwrap();
        assert_eq!(kv::session_dict(&a, 42), "15.acme.42");
        assert_eq!(kv::parse_revoked(&kv::revoked(&a, &s)), Some((a, s)));
        assert_eq!(kv::parse_session_dict("15.acme.x"), None);
        assert_eq!(kv::parse_session_dict("acme.42"), None);
        assert_eq!(kv::parse_session_dict("+15.acme.42"), None);
        // Another partition than the account's.
        assert_eq!(kv::parse_session_dict("14.acme.42"), None);
    }

    #[test]
    fn the_ledger_key_is_no_revocation() {
        let a = AccountId::parse("acme").unwrap();
        assert_eq!(kv::ledger(&a), "acme.=ledger");
        assert_eq!(kv::parse_revoked(&kv::ledger(&a)), None);
    }
}
