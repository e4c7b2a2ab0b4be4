//! What happens when an account has more active sessions than its limit.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::UnixMillis;
use crate::names::MAX_NAME_LEN;
use crate::wire::{MAX_CONTENT_LEN, MAX_KIND_LEN, MAX_REGION_LEN};

/// The largest limit accepted, and the most per-content and grace seats.
///
/// It is what one interval dictionary holds with room to spare: an account
/// at this limit with as many grace seats again, and as many sessions once
/// more that joined but are not ended yet (a newcomer a checker has still to
/// evict or refuse, a session that timed out earlier in the interval), fits
/// in [`DICT_MAX_SESSIONS`]. Checked when this crate is built (below) and by
/// encoding such a dictionary in the tests.
pub const MAX_LIMIT: u32 = 500;

/// The most bytes one interval dictionary's value may take in KV: well under
/// NATS's default `max_payload` (1 MiB), so that a write is never refused
/// for its size. Every write re-encodes the whole `<account>.<interval>`
/// value, so a value past the server's limit could not be written at all.
pub const DICT_BUDGET_BYTES: usize = 768 * 1024;

/// The most sessions (devices) one account's dictionary of one interval
/// holds: the heartbeat-handler refuses a new device beyond it. A session is
/// at most [`MAX_RECORD_BYTES`], so this many fit in [`DICT_BUDGET_BYTES`].
pub const DICT_MAX_SESSIONS: usize = 3 * MAX_LIMIT as usize;

/// Bytes of a MessagePack string of `len` bytes, its header included.
const fn msgpack_str(len: usize) -> usize {
    len + if len < 32 {
        1
    } else if len < 256 {
        2
    } else if len < 65_536 {
        3
    } else {
        5
    }
}

/// Bytes of a MessagePack unsigned integer at its largest.
const MSGPACK_U64: usize = 9;

/// Bytes of the header of a MessagePack map at its largest.
const MSGPACK_MAP_HEADER: usize = 5;

/// The largest session record in an interval dictionary as MessagePack,
/// its device key included: every name at [`MAX_NAME_LEN`], every label at
/// its field limit, both times at their widest and every optional field
/// present (`wire::SessionRecord`'s fields, spelled as it writes them).
pub const MAX_RECORD_BYTES: usize = msgpack_str(MAX_NAME_LEN)
    + 1 // the record's map header: seven fields
    + msgpack_str("session".len())
    + msgpack_str(MAX_NAME_LEN)
    + msgpack_str("since".len())
    + MSGPACK_U64
    + msgpack_str("last_seen".len())
    + MSGPACK_U64
    + msgpack_str("content".len())
    + msgpack_str(MAX_CONTENT_LEN)
    + msgpack_str("kind".len())
    + msgpack_str(MAX_KIND_LEN)
    + msgpack_str("region".len())
    + msgpack_str(MAX_REGION_LEN)
    + msgpack_str("replaced".len())
    + msgpack_str(MAX_NAME_LEN);

// A full dictionary of the largest records fits the budget, and the budget
// fits the server's default payload limit with room for the message's own
// overhead.
const _: () =
    assert!(MSGPACK_MAP_HEADER + DICT_MAX_SESSIONS * MAX_RECORD_BYTES <= DICT_BUDGET_BYTES);
const _: () = assert!(DICT_BUDGET_BYTES <= 1024 * 1024 * 3 / 4);

/// The enforcement policy of an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// New sessions always get in; the oldest sessions beyond the limit are
    /// evicted (the device-limit seed's behaviour).
    #[default]
    EvictOldest,
    /// Sessions beyond the limit are refused; those already active stay.
    RejectNew,
    /// New sessions always get in; the sessions heard from least recently
    /// (a paused player, a throttled background tab) are evicted first.
    EvictLeastActive,
}

impl Policy {
    pub const ALL: [Policy; 3] = [
        Policy::EvictOldest,
        Policy::RejectNew,
        Policy::EvictLeastActive,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Policy::EvictOldest => "evict-oldest",
            Policy::RejectNew => "reject-new",
            Policy::EvictLeastActive => "evict-least-active",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown policy {0:?}: expected evict-oldest, reject-new or evict-least-active")]
pub struct UnknownPolicy(pub String);

impl FromStr for Policy {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "evict-oldest" => Ok(Policy::EvictOldest),
            "reject-new" => Ok(Policy::RejectNew),
            "evict-least-active" => Ok(Policy::EvictLeastActive),
            other => Err(UnknownPolicy(other.to_string())),
        }
    }
}

/// The longest grace period accepted.
pub const MAX_GRACE_SECS: u32 = 24 * 3600;

/// An allowed overage: up to `seats` sessions beyond the limit for at most
/// `secs` seconds from when the account went over, then the limit holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Grace {
    pub seats: u32,
    pub secs: u32,
}

impl Grace {
    /// How long the overage is tolerated.
    pub fn window_ms(&self) -> u64 {
        u64::from(self.secs) * 1000
    }

    /// Whether the grace still holds at `now` for an account over its limit
    /// since `over_since`. An account not over yet (`None`) would start a
    /// fresh grace, so it holds.
    pub fn open(&self, over_since: Option<UnixMillis>, now: UnixMillis) -> bool {
        over_since.is_none_or(|since| now.saturating_sub(since) < self.window_ms())
    }

    /// The seats beyond the limit allowed at `now`: all of them while the
    /// grace holds, none after.
    pub fn extra_seats(&self, over_since: Option<UnixMillis>, now: UnixMillis) -> u32 {
        if self.open(over_since, now) {
            self.seats
        } else {
            0
        }
    }
}

/// Reads a grace written as `SEATS/SECS` (`1/60`, or `1/60s`), unchecked:
/// [`Limit::with_grace`] bounds the numbers.
pub fn parse_grace(spec: &str) -> Option<(i64, i64)> {
    let (seats, secs) = spec.split_once('/')?;
    let num = |x: &str| x.trim().trim_end_matches('s').parse::<i64>().ok();
    Some((num(seats)?, num(secs)?))
}

/// An account's limit: how many sessions may be active at once, and what
/// happens beyond that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit {
    pub limit: u32,
    #[serde(default)]
    pub policy: Policy,
    /// At most this many sessions on one `content` (a title, a class room).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_content: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace: Option<Grace>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("limit must be between 1 and {MAX_LIMIT}, got {0}")]
    OutOfRange(i64),
    #[error("per-content limit must be between 1 and {MAX_LIMIT}, got {0}")]
    PerContentOutOfRange(i64),
    #[error(
        "grace must allow 1 to {MAX_LIMIT} extra seats for 1 to {MAX_GRACE_SECS} seconds, got {seats} seats for {secs} s"
    )]
    GraceOutOfRange { seats: i64, secs: i64 },
}

impl Limit {
    /// Validates a requested limit (given as a signed number so that a
    /// negative request is reported as such rather than as a parse error).
    pub fn new(limit: i64, policy: Policy) -> Result<Self, LimitError> {
        if !(1..=MAX_LIMIT as i64).contains(&limit) {
            return Err(LimitError::OutOfRange(limit));
        }
        Ok(Self {
            limit: limit as u32,
            policy,
            per_content: None,
            grace: None,
        })
    }

    /// With a per-content limit (validated).
    pub fn with_per_content(mut self, n: Option<i64>) -> Result<Self, LimitError> {
        self.per_content = match n {
            None => None,
            Some(n) if (1..=MAX_LIMIT as i64).contains(&n) => Some(n as u32),
            Some(n) => return Err(LimitError::PerContentOutOfRange(n)),
        };
        Ok(self)
    }

    /// With a grace period (validated).
    pub fn with_grace(mut self, grace: Option<(i64, i64)>) -> Result<Self, LimitError> {
        self.grace = match grace {
            None => None,
            Some((seats, secs))
                if (1..=MAX_LIMIT as i64).contains(&seats)
                    && (1..=MAX_GRACE_SECS as i64).contains(&secs) =>
            {
                Some(Grace {
                    seats: seats as u32,
                    secs: secs as u32,
                })
            }
            Some((seats, secs)) => return Err(LimitError::GraceOutOfRange { seats, secs }),
        };
        Ok(self)
    }
}

/// Named plans, as products sell them: `basic: 1`, `standard: 2`, ...
pub type Plans = std::collections::BTreeMap<String, Limit>;

/// The plans a deployment starts with unless configured otherwise.
pub fn default_plans() -> Plans {
    [("basic", 1), ("standard", 2), ("premium", 4)]
        .into_iter()
        .map(|(name, n)| {
            (
                name.to_string(),
                Limit {
                    limit: n,
                    policy: Policy::EvictOldest,
                    per_content: None,
                    grace: None,
                },
            )
        })
        .collect()
}

/// The longest plan name accepted.
pub const MAX_PLAN_NAME_LEN: usize = 64;

/// Whether `name` is spelled as a plan name: 1 to [`MAX_PLAN_NAME_LEN`]
/// letters, digits, `-` or `_`.
pub fn is_plan_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_PLAN_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A plan that is not one of those a deployment knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown plan {name:?}{hint}", hint = known_hint(known))]
pub struct UnknownPlan {
    pub name: String,
    /// The plans there are, to say so (none: not listed).
    pub known: Vec<String>,
}

fn known_hint(known: &[String]) -> String {
    if known.is_empty() {
        String::new()
    } else {
        format!(": known plans are {}", known.join(", "))
    }
}

/// Checks a plan named by a request or a token: spelled as a plan name and
/// one of `known`.
pub fn check_plan<'a>(
    name: &str,
    known: impl IntoIterator<Item = &'a str>,
) -> Result<(), UnknownPlan> {
    let known: Vec<&str> = known.into_iter().collect();
    if is_plan_name(name) && known.contains(&name) {
        return Ok(());
    }
    Err(UnknownPlan {
        name: name.to_string(),
        known: known.into_iter().map(str::to_owned).collect(),
    })
}

/// Parses a plan definition: `name=limit[,policy=P][,per-content=N][,grace=SEATS/SECS]`,
/// e.g. `premium=4,per-content=2,grace=1/60`.
pub fn parse_plan(spec: &str) -> Result<(String, Limit), String> {
    let (name, rest) = spec.split_once('=').ok_or_else(|| {
        format!(
            "plan {spec:?}: expected name=limit[,policy=..][,per-content=..][,grace=seats/secs]"
        )
    })?;
    let name = name.trim();
    if !is_plan_name(name) {
        return Err(format!(
            "plan name {name:?}: use 1-64 letters, digits, - or _"
        ));
    }
    let mut parts = rest.split(',');
    let n: i64 = parts
        .next()
        .unwrap_or_default()
        .trim()
        .parse()
        .map_err(|_| format!("plan {name}: the limit must be a number"))?;
    let mut policy = Policy::EvictOldest;
    let mut per_content = None;
    let mut grace = None;
    for part in parts {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("plan {name}: {part:?} is not key=value"))?;
        match k.trim() {
            "policy" => policy = v.trim().parse().map_err(|e: UnknownPolicy| e.to_string())?,
            "per-content" => {
                per_content = Some(
                    v.trim()
                        .parse::<i64>()
                        .map_err(|_| format!("plan {name}: per-content must be a number"))?,
                )
            }
            "grace" => {
                grace =
                    Some(parse_grace(v).ok_or_else(|| {
                        format!("plan {name}: grace is seats/seconds, e.g. 1/60")
                    })?);
            }
            other => return Err(format!("plan {name}: unknown setting {other:?}")),
        }
    }
    let limit = Limit::new(n, policy)
        .and_then(|l| l.with_per_content(per_content))
        .and_then(|l| l.with_grace(grace))
        .map_err(|e| format!("plan {name}: {e}"))?;
    Ok((name.to_string(), limit))
}

/// What an operator stored for one account (`headcount.limits.set`): a plan
/// and/or overrides of its fields. Unset fields come from the plan, then
/// from the deployment's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_content: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace: Option<Grace>,
}

impl AccountLimits {
    /// The account's effective limit: `base` (its plan's, or the default)
    /// with this record's overrides on top.
    pub fn apply(&self, base: Limit) -> Limit {
        Limit {
            limit: self.limit.unwrap_or(base.limit),
            policy: self.policy.unwrap_or(base.policy),
            per_content: self.per_content.or(base.per_content),
            grace: self.grace.or(base.grace),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Labels, SessionDict, SessionRecord, encode_dict};
    use crate::{DeviceId, SessionId};

    #[test]
    fn policy_names() {
        assert_eq!("evict-oldest".parse(), Ok(Policy::EvictOldest));
        assert_eq!("reject-new".parse(), Ok(Policy::RejectNew));
        assert!("evict".parse::<Policy>().is_err());
        assert_eq!(
            serde_json::to_string(&Policy::RejectNew).unwrap(),
            "\"reject-new\""
        );
    }

    #[test]
    fn plans_parse_with_their_options() {
        let (name, l) =
            parse_plan("premium=4,policy=evict-least-active,per-content=2,grace=1/60").unwrap();
        assert_eq!(name, "premium");
        assert_eq!(l.limit, 4);
        assert_eq!(l.policy, Policy::EvictLeastActive);
        assert_eq!(l.per_content, Some(2));
        assert_eq!(l.grace, Some(Grace { seats: 1, secs: 60 }));
        assert_eq!(parse_plan("basic=1").unwrap().1.limit, 1);
        for bad in [
            "basic",
            "=1",
            "basic=0",
            "basic=x",
            "basic=1,policy=nope",
            "basic=1,grace=1",
            "basic=1,per-content=-1",
            "basic=1,color=red",
            "b c=1",
        ] {
            assert!(parse_plan(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn overrides_sit_on_top_of_the_plan() {
        let base = default_plans()["standard"];
        let o = AccountLimits {
            plan: Some("standard".into()),
            policy: Some(Policy::RejectNew),
            ..Default::default()
        };
        let l = o.apply(base);
        assert_eq!((l.limit, l.policy), (2, Policy::RejectNew));
    }

    #[test]
    fn a_grace_holds_for_its_seconds_from_going_over() {
        let g = Grace { seats: 2, secs: 10 };
        assert_eq!(g.window_ms(), 10_000);
        assert!(g.open(None, 5_000), "not over yet: a grace would start now");
        assert!(g.open(Some(1_000), 10_999));
        assert!(!g.open(Some(1_000), 11_000), "over at exactly secs");
        assert!(
            g.open(Some(9_000), 1_000),
            "a clock step back keeps it open"
        );
        assert_eq!(g.extra_seats(Some(1_000), 10_999), 2);
        assert_eq!(g.extra_seats(Some(1_000), 11_000), 0);
        assert_eq!(g.extra_seats(None, 50_000), 2);
    }

    #[test]
    fn graces_are_read_as_seats_over_seconds() {
        assert_eq!(parse_grace("1/60"), Some((1, 60)));
        assert_eq!(parse_grace(" 2 / 30s "), Some((2, 30)));
        assert_eq!(parse_grace("-1/0"), Some((-1, 0)), "bounds are Limit's job");
        for bad in ["1", "1/", "/60", "a/60", "1/60/2"] {
            assert_eq!(parse_grace(bad), None, "{bad}");
        }
    }

    #[test]
    fn plan_names_are_checked_in_one_place() {
        for good in ["basic", "Gold-2", "a_b", &"p".repeat(MAX_PLAN_NAME_LEN)] {
            assert!(is_plan_name(good), "{good}");
        }
        for bad in [
            "",
            "b c",
            "plan.x",
            "pl\u{e4}n",
            &"p".repeat(MAX_PLAN_NAME_LEN + 1),
        ] {
            assert!(!is_plan_name(bad), "{bad}");
        }
        let plans = default_plans();
        let known = || plans.keys().map(String::as_str);
        assert_eq!(check_plan("premium", known()), Ok(()));
        let e = check_plan("gold", known()).unwrap_err();
        assert_eq!(e.name, "gold");
        assert_eq!(
            e.to_string(),
            "unknown plan \"gold\": known plans are basic, premium, standard"
        );
        assert!(
            check_plan("b c", ["b c"]).is_err(),
            "a known but misspelt name"
        );
        assert_eq!(
            check_plan("gold", []).unwrap_err().to_string(),
            "unknown plan \"gold\""
        );
    }

    #[test]
    fn limits_are_bounded() {
        assert!(Limit::new(0, Policy::EvictOldest).is_err());
        assert!(Limit::new(-3, Policy::EvictOldest).is_err());
        assert!(Limit::new(MAX_LIMIT as i64 + 1, Policy::EvictOldest).is_err());
        assert_eq!(Limit::new(2, Policy::RejectNew).unwrap().limit, 2);
        assert_eq!(
            Limit::new(MAX_LIMIT as i64, Policy::RejectNew)
                .unwrap()
                .limit,
            MAX_LIMIT
        );
        assert_eq!(
            Limit::new(501, Policy::EvictOldest)
                .unwrap_err()
                .to_string(),
            "limit must be between 1 and 500, got 501"
        );
    }

    /// The record of a session with every field at its longest: device
    /// `i`, its own session and the session it replaced.
    fn largest_record(i: usize) -> (DeviceId, SessionRecord) {
        let name = |tag: char| format!("{tag}{i:0>width$}", width = MAX_NAME_LEN - 1);
        let device = DeviceId::parse(&name('d')).unwrap();
        let record = SessionRecord {
            session: SessionId::parse(&name('s')).unwrap(),
            since: u64::MAX,
            last_seen: u64::MAX,
            labels: Labels::new(
                Some(&"c".repeat(MAX_CONTENT_LEN)),
                Some(&"k".repeat(MAX_KIND_LEN)),
                Some(&"r".repeat(MAX_REGION_LEN)),
            ),
            replaced: Some(Box::new(SessionId::parse(&name('o')).unwrap())),
        };
        (device, record)
    }

    #[test]
    fn the_largest_record_is_as_large_as_computed() {
        let one: SessionDict = [largest_record(0)].into_iter().collect();
        // One entry: a one-byte map header, then the device and its record.
        assert_eq!(encode_dict(&one).len(), 1 + MAX_RECORD_BYTES);
    }

    #[test]
    fn a_full_dictionary_of_the_largest_records_fits_the_budget() {
        let full: SessionDict = (0..DICT_MAX_SESSIONS).map(largest_record).collect();
        assert_eq!(full.len(), DICT_MAX_SESSIONS);
        let bytes = encode_dict(&full).len();
        assert!(
            bytes <= DICT_BUDGET_BYTES,
            "{bytes} bytes over the {DICT_BUDGET_BYTES} byte budget"
        );
        // Every seat a limit and its grace allow, and as many again for
        // sessions not ended yet.
        let seats = [MAX_LIMIT; 3].map(|n| n as usize);
        assert!(DICT_MAX_SESSIONS >= seats.iter().sum());
        // NATS's default max_payload, with room for the message around it.
        assert!(bytes < 1024 * 1024 - 64 * 1024);
    }

    // Tests that pin each rule (mutation testing).

    #[test]
    fn msgpack_string_sizes_are_what_messagepack_writes() {
        for len in [0, 1, 31, 32, 255, 256, 65_535, 65_536] {
            let written = rmp_serde::to_vec(&"x".repeat(len)).unwrap().len();
            assert_eq!(msgpack_str(len), written, "a string of {len} bytes");
        }
    }

    #[test]
    fn policies_are_shown_as_they_are_read() {
        let names = ["evict-oldest", "reject-new", "evict-least-active"];
        for (policy, name) in Policy::ALL.into_iter().zip(names) {
            assert_eq!(policy.as_str(), name);
            assert_eq!(policy.to_string(), name);
            assert_eq!(name.parse(), Ok(policy));
        }
    }

    #[test]
    fn a_grace_is_bounded_in_seats_and_seconds() {
        let limit = Limit::new(2, Policy::EvictOldest).unwrap();
        assert_eq!(MAX_GRACE_SECS, 86_400, "a day");
        for (seats, secs) in [(1, 1), (MAX_LIMIT as i64, MAX_GRACE_SECS as i64)] {
            assert_eq!(
                limit.with_grace(Some((seats, secs))).unwrap().grace,
                Some(Grace {
                    seats: seats as u32,
                    secs: secs as u32
                })
            );
        }
        for (seats, secs) in [
            (0, 60),
            (MAX_LIMIT as i64 + 1, 60),
            (1, 0),
            (1, MAX_GRACE_SECS as i64 + 1),
            (0, 0),
        ] {
            assert_eq!(
                limit.with_grace(Some((seats, secs))),
                Err(LimitError::GraceOutOfRange { seats, secs }),
                "{seats}/{secs}"
            );
        }
        assert_eq!(limit.with_grace(None).unwrap().grace, None);
    }
}
