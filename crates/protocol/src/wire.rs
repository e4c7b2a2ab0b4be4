//! Messages on the wire.
//!
//! Device-facing messages (heartbeats, control messages) and the KV session
//! records are MessagePack maps with named keys; everything a backend or an
//! operator reads (requests, replies, presence events) is JSON.

use std::borrow::Cow;
use std::collections::HashMap;

use internment::ArcIntern;

use serde::{Deserialize, Serialize};

use crate::UnixMillis;
use crate::by_device::ByDevice;
use crate::names::{AccountId, DeviceId, SessionId};
use crate::policy::DICT_MAX_SESSIONS;
use crate::policy::Policy;

/// The largest heartbeat payload accepted, in bytes.
pub const MAX_HEARTBEAT_BYTES: usize = 1024;
pub const MAX_CONTENT_LEN: usize = 128;
pub const MAX_KIND_LEN: usize = 32;
pub const MAX_REGION_LEN: usize = 32;

/// A device's heartbeat. Every field is optional; unknown keys are ignored;
/// an empty payload is a plain heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Heartbeat {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub leave: bool,
}

/// Why a heartbeat payload was refused. `Malformed` payloads could not be
/// read at all; `Invalid` ones were read but break a documented bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeartbeatError {
    #[error("heartbeat is {0} bytes, over the {MAX_HEARTBEAT_BYTES} byte limit")]
    TooLarge(usize),
    #[error("heartbeat is not a MessagePack map of the documented fields: {0}")]
    Malformed(String),
    #[error("heartbeat field {field} is longer than {max} bytes")]
    FieldTooLong { field: &'static str, max: usize },
}

/// A heartbeat read in place: its strings borrow from the payload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct HeartbeatRef<'a> {
    pub seq: Option<u64>,
    #[serde(borrow)]
    pub content: Option<&'a str>,
    #[serde(borrow)]
    pub kind: Option<&'a str>,
    #[serde(borrow)]
    pub region: Option<&'a str>,
    pub leave: bool,
}

impl HeartbeatRef<'_> {
    pub fn to_owned(&self) -> Heartbeat {
        Heartbeat {
            seq: self.seq,
            content: self.content.map(str::to_owned),
            kind: self.kind.map(str::to_owned),
            region: self.region.map(str::to_owned),
            leave: self.leave,
        }
    }
}

impl<'a> HeartbeatRef<'a> {
    /// Decodes and validates a heartbeat payload without copying it.
    pub fn decode(payload: &'a [u8]) -> Result<Self, HeartbeatError> {
        if payload.len() > MAX_HEARTBEAT_BYTES {
            return Err(HeartbeatError::TooLarge(payload.len()));
        }
        if payload.is_empty() {
            return Ok(Self::default());
        }
        // A map (fixmap, map16, map32): rmp-serde would also read a struct
        // from an array of its fields, which the protocol does not allow.
        if !matches!(payload[0], 0x80..=0x8f | 0xde | 0xdf) {
            return Err(HeartbeatError::Malformed("not a map".into()));
        }
        // One whole value and nothing after it (a skim that keeps nothing),
        // then the fields, borrowed from the payload.
        let mut rest = payload;
        serde::de::IgnoredAny::deserialize(&mut rmp_serde::Deserializer::new(&mut rest))
            .map_err(|e| HeartbeatError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(HeartbeatError::Malformed(format!(
                "{} bytes after the map",
                rest.len()
            )));
        }
        let hb: HeartbeatRef<'a> =
            rmp_serde::from_slice(payload).map_err(|e| HeartbeatError::Malformed(e.to_string()))?;
        for (field, value, max) in [
            ("content", hb.content, MAX_CONTENT_LEN),
            ("kind", hb.kind, MAX_KIND_LEN),
            ("region", hb.region, MAX_REGION_LEN),
        ] {
            if value.is_some_and(|v| v.len() > max) {
                return Err(HeartbeatError::FieldTooLong { field, max });
            }
        }
        Ok(hb)
    }
}

impl Heartbeat {
    /// Decodes and validates a heartbeat payload.
    pub fn decode(payload: &[u8]) -> Result<Self, HeartbeatError> {
        HeartbeatRef::decode(payload).map(|h| h.to_owned())
    }

    /// Encodes as a MessagePack map with named keys.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing a struct of strings and integers cannot fail.
        rmp_serde::to_vec_named(self).unwrap_or_default()
    }
}

/// What a session plays, on what kind of device, where: a session's three
/// optional labels. Sessions with the same labels share one interned copy,
/// so a record pays one pointer for them however long they are.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Labels(Option<ArcIntern<LabelSet>>);

#[derive(Debug, PartialEq, Eq, Hash)]
struct LabelSet {
    content: Option<Box<str>>,
    kind: Option<Box<str>>,
    region: Option<Box<str>>,
}

impl Labels {
    pub fn new(content: Option<&str>, kind: Option<&str>, region: Option<&str>) -> Self {
        if content.is_none() && kind.is_none() && region.is_none() {
            return Self(None);
        }
        Self(Some(ArcIntern::new(LabelSet {
            content: content.map(Box::from),
            kind: kind.map(Box::from),
            region: region.map(Box::from),
        })))
    }

    pub fn content(&self) -> Option<&str> {
        self.0.as_ref().and_then(|l| l.content.as_deref())
    }

    pub fn kind(&self) -> Option<&str> {
        self.0.as_ref().and_then(|l| l.kind.as_deref())
    }

    pub fn region(&self) -> Option<&str> {
        self.0.as_ref().and_then(|l| l.region.as_deref())
    }

    /// Whether these are the labels `content`, `kind` and `region`.
    pub fn matches(&self, content: Option<&str>, kind: Option<&str>, region: Option<&str>) -> bool {
        self.content() == content && self.kind() == kind && self.region() == region
    }
}

#[derive(Serialize, Deserialize)]
struct LabelsWire<'a> {
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    region: Option<Cow<'a, str>>,
}

/// As `content`, `kind` and `region` fields, each left out when absent.
impl Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        LabelsWire {
            content: self.content().map(Cow::Borrowed),
            kind: self.kind().map(Cow::Borrowed),
            region: self.region().map(Cow::Borrowed),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = LabelsWire::deserialize(d)?;
        Ok(Self::new(
            w.content.as_deref(),
            w.kind.as_deref(),
            w.region.as_deref(),
        ))
    }
}

impl std::fmt::Debug for Labels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Labels")
            .field("content", &self.content())
            .field("kind", &self.kind())
            .field("region", &self.region())
            .finish()
    }
}

/// One session as recorded in an interval dictionary.
///
/// On the wire (MessagePack map): `session`, `since`, `last_seen`, and when
/// present `content`, `kind`, `region`, `replaced`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub session: SessionId,
    /// When the session's first heartbeat arrived.
    pub since: UnixMillis,
    /// When the heartbeat that caused this write arrived.
    pub last_seen: UnixMillis,
    pub labels: Labels,
    /// The device's previous session, displaced by this one: its late
    /// heartbeats are ignored rather than flipping the entry back. Boxed:
    /// few records carry one, and every record held pays for the field
    /// (8 bytes instead of 24).
    pub replaced: Option<Box<SessionId>>,
}

#[derive(Serialize)]
struct RecordOut<'a> {
    session: &'a SessionId,
    since: UnixMillis,
    last_seen: UnixMillis,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replaced: Option<&'a SessionId>,
}

#[derive(Deserialize)]
struct RecordIn<'a> {
    session: SessionId,
    since: UnixMillis,
    last_seen: UnixMillis,
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    region: Option<Cow<'a, str>>,
    #[serde(default)]
    replaced: Option<SessionId>,
}

impl Serialize for SessionRecord {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        RecordOut {
            session: &self.session,
            since: self.since,
            last_seen: self.last_seen,
            content: self.labels.content(),
            kind: self.labels.kind(),
            region: self.labels.region(),
            replaced: self.replaced.as_deref(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for SessionRecord {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let r = RecordIn::deserialize(d)?;
        Ok(Self {
            session: r.session,
            since: r.since,
            last_seen: r.last_seen,
            labels: Labels::new(r.content.as_deref(), r.kind.as_deref(), r.region.as_deref()),
            replaced: r.replaced.map(Box::new),
        })
    }
}

/// An interval dictionary: device -> its session in that interval.
pub type SessionDict = HashMap<DeviceId, SessionRecord>;

pub fn encode_dict(dict: &SessionDict) -> Vec<u8> {
    rmp_serde::to_vec_named(dict).unwrap_or_default()
}

pub fn decode_dict(bytes: &[u8]) -> Result<SessionDict, rmp_serde::decode::Error> {
    if bytes.is_empty() {
        return Ok(SessionDict::new());
    }
    rmp_serde::from_slice(bytes)
}

/// [`decode_dict`] straight into the compact form the services hold: the
/// entries are read into one vector of their number, sorted in place and
/// kept as they are, with no map built and dropped on the way (a service
/// loading a bucket reads a hundred thousand of them at once).
pub fn decode_entries(bytes: &[u8]) -> Result<ByDevice<SessionRecord>, rmp_serde::decode::Error> {
    if bytes.is_empty() {
        return Ok(ByDevice::default());
    }
    let Entries(v) = rmp_serde::from_slice(bytes)?;
    Ok(ByDevice::from_entries(v))
}

/// A dictionary's entries in the order they were read.
struct Entries(Vec<(DeviceId, SessionRecord)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Entries;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of device to session record")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Entries, A::Error> {
                // The length a value claims is trusted only up to what a
                // dictionary may hold.
                let room = map.size_hint().unwrap_or(0).min(DICT_MAX_SESSIONS);
                let mut v = Vec::with_capacity(room);
                while let Some(entry) = map.next_entry()? {
                    v.push(entry);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// A reference to one session of one device.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SessionRef {
    pub device: DeviceId,
    pub session: SessionId,
}

/// Why a session was ended by the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndReason {
    /// Displaced by a newer session under evict-oldest.
    Evicted,
    /// Refused under reject-new.
    Rejected,
    /// Kicked by an operator.
    Revoked,
    /// Replaced by a newer session of the same device.
    Replaced,
}

impl EndReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            EndReason::Evicted => "evicted",
            EndReason::Rejected => "rejected",
            EndReason::Revoked => "revoked",
            EndReason::Replaced => "replaced",
        }
    }
}

/// Why and when a session ended, as the revocation bucket records it (see
/// [`RevocationRecord`] for the stored value as a whole).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub reason: EndReason,
    pub device: DeviceId,
    pub at: UnixMillis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<SessionRef>,
}

/// The value stored in the revocation bucket for an ended session: the
/// [`Revocation`]'s fields, and the id of the decision that wrote it.
///
/// The decision id is what lets a writer whose create went unacknowledged
/// read the key back and tell its own write from another instance's. It
/// is optional on the wire: values written before it existed decode with
/// none, and a reader that knows only [`Revocation`] ignores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationRecord {
    #[serde(flatten)]
    pub revocation: Revocation,
    /// Random, made once per decision to end the session and kept by every
    /// retry of that decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
}

/// One ending a checker decided: the session, why, when, and the session it
/// made room for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub device: DeviceId,
    pub session: SessionId,
    pub reason: EndReason,
    pub at: UnixMillis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<SessionRef>,
    /// The id of the decision that recorded it (random, one per decision),
    /// so that a checker whose write went unacknowledged tells its own
    /// entries from another checker's when it reads the ledger again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
}

/// The endings the checkers decided for one account lately, oldest first:
/// the revoked bucket's key `<account>.=ledger` (JSON), written only by
/// compare-and-set on its revision. A checker reads it, ends what it names
/// and chooses further victims only among the sessions it does not name,
/// so replicas never choose two victims for one seat.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    pub ended: Vec<LedgerEntry>,
}

impl Ledger {
    /// The most entries a ledger keeps (the oldest go first): four times
    /// the largest limit, about 400 KiB at the longest names.
    pub const MAX_ENTRIES: usize = 4 * crate::policy::MAX_LIMIT as usize;

    /// Whether the ledger names `session`.
    pub fn names(&self, session: &SessionId) -> bool {
        self.ended.iter().any(|e| &e.session == session)
    }

    /// Adds `entries` it does not name yet, after dropping the entries
    /// decided before `keep_from` and, past [`Ledger::MAX_ENTRIES`], the
    /// oldest. Returns how many it added.
    pub fn record(
        &mut self,
        entries: impl IntoIterator<Item = LedgerEntry>,
        keep_from: UnixMillis,
    ) -> usize {
        self.ended.retain(|e| e.at >= keep_from);
        let mut added = 0;
        for e in entries {
            if !self.names(&e.session) {
                self.ended.push(e);
                added += 1;
            }
        }
        let over = self.ended.len().saturating_sub(Self::MAX_ENTRIES);
        self.ended.drain(..over);
        added
    }
}

/// Control message types sent to a device on `ctl.<account>.<device>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ControlType {
    /// Evicted, or refused under reject-new.
    DeviceLimitExceeded,
    /// Kicked by an operator.
    Revoked,
}

/// A control message to one device (MessagePack).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlMessage {
    #[serde(rename = "type")]
    pub kind: ControlType,
    pub account: AccountId,
    pub device: DeviceId,
    pub session: SessionId,
    pub at: UnixMillis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<SessionRef>,
}

impl ControlMessage {
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, rmp_serde::decode::Error> {
        rmp_serde::from_slice(bytes)
    }
}

/// Presence event types on `headcount.events.<account>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventType {
    Join,
    Leave,
    Timeout,
    Evicted,
    Rejected,
    Revoked,
}

/// A presence event (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEvent {
    #[serde(rename = "type")]
    pub kind: EventType,
    pub account: AccountId,
    pub device: DeviceId,
    pub session: SessionId,
    pub at: UnixMillis,
    /// The session that displaced this one (evictions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<SessionRef>,
    /// Extra detail, e.g. `replaced` on a leave caused by a newer session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

// ---- request/reply bodies (JSON) ----

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRequest {
    pub account: AccountId,
}

/// One active session as reported by `headcount.active`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveSession {
    pub device: DeviceId,
    pub session: SessionId,
    pub since: UnixMillis,
    pub last_seen: UnixMillis,
    /// `content`, `kind` and `region`, each left out when absent.
    #[serde(flatten)]
    pub labels: Labels,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveReply {
    pub account: AccountId,
    pub active: u32,
    pub limit: u32,
    pub policy: Policy,
    pub sessions: Vec<ActiveSession>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRequest {
    pub account: AccountId,
    pub device: DeviceId,
    #[serde(default)]
    pub session: Option<SessionId>,
    #[serde(default)]
    pub content: Option<String>,
    /// Takeover: the session to sign out if a seat is needed.
    #[serde(default)]
    pub evict: Option<SessionId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReply {
    pub allowed: bool,
    pub active: u32,
    pub limit: u32,
    pub policy: Policy,
    pub evicted: Vec<SessionRef>,
}

/// `headcount.limits.set`. `limit` is signed so that a negative request is
/// reported as out of range rather than as unreadable JSON.
/// Fields left out keep their stored value; `reset` clears every stored
/// field first (back to the token's plan or the default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSetRequest {
    pub account: AccountId,
    #[serde(default)]
    pub limit: Option<i64>,
    #[serde(default)]
    pub policy: Option<String>,
    #[serde(default)]
    pub plan: Option<String>,
    #[serde(default)]
    pub per_content: Option<i64>,
    #[serde(default)]
    pub grace: Option<GraceRequest>,
    #[serde(default)]
    pub reset: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraceRequest {
    pub seats: i64,
    pub secs: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsReply {
    pub account: AccountId,
    pub limit: u32,
    pub policy: Policy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_content: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace: Option<crate::Grace>,
    /// The plan the limit comes from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
}

/// `headcount.stats`: one account, or (without `account`) all of them with
/// the `top` busiest listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsRequest {
    #[serde(default)]
    pub account: Option<AccountId>,
    #[serde(default)]
    pub top: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountUsage {
    pub account: AccountId,
    pub active: u32,
    pub limit: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<AccountId>,
    pub active: u32,
    /// Highest active count over the last `window_minutes`.
    pub peak: u32,
    pub window_minutes: u32,
    pub by_content: std::collections::BTreeMap<String, u32>,
    pub by_kind: std::collections::BTreeMap<String, u32>,
    pub by_region: std::collections::BTreeMap<String, u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<AccountUsage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KickRequest {
    pub account: AccountId,
    pub session: SessionId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KickReply {
    pub kicked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRequest {
    pub account: AccountId,
    pub device: DeviceId,
    /// The account's plan, carried in the token and applied by checkers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenReply {
    pub token: String,
    pub session: SessionId,
    pub expires_at: UnixMillis,
}

/// Reads a JSON request body, with an error message fit to send back: it
/// says whether the body was not JSON at all or JSON of the wrong shape, and
/// carries serde's account of where and what.
pub fn parse_request<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    serde_json::from_slice(payload).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io if payload.is_empty() => {
                "empty request: expected a JSON object".to_string()
            }
            Category::Syntax | Category::Eof | Category::Io => {
                format!("request is not valid JSON: {e}")
            }
            Category::Data => format!("invalid request: {e}"),
        }
    })
}

/// Error codes carried in `Nats-Service-Error-Code`.
pub mod error_code {
    pub const BAD_REQUEST: usize = 400;
    pub const UNAUTHORIZED: usize = 401;
    pub const NOT_FOUND: usize = 404;
    pub const INTERNAL: usize = 500;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_records_keep_their_wire_form_and_share_labels() {
        // The record as an older writer spelled it: plain string fields.
        #[derive(Serialize)]
        struct Plain {
            session: &'static str,
            since: u64,
            last_seen: u64,
            content: &'static str,
            region: &'static str,
        }
        let plain = rmp_serde::to_vec_named(&Plain {
            session: "s1",
            since: 1,
            last_seen: 2,
            content: "movie-42",
            region: "eu",
        })
        .unwrap();
        let rec: SessionRecord = rmp_serde::from_slice(&plain).unwrap();
        assert_eq!(rec.labels.content(), Some("movie-42"));
        assert_eq!(rec.labels.kind(), None);
        assert_eq!(rec.labels.region(), Some("eu"));
        assert_eq!(rmp_serde::to_vec_named(&rec).unwrap(), plain);
        let other: SessionRecord = rmp_serde::from_slice(&plain).unwrap();
        assert_eq!(rec.labels, other.labels);
        assert!(rec.labels.matches(Some("movie-42"), None, Some("eu")));
        assert!(!rec.labels.matches(Some("movie-42"), Some("tv"), Some("eu")));
        // In JSON replies the labels are plain fields, left out when absent.
        let active = ActiveSession {
            device: DeviceId::parse("tv").unwrap(),
            session: SessionId::parse("s1").unwrap(),
            since: 1,
            last_seen: 2,
            labels: rec.labels.clone(),
        };
        let json = serde_json::to_value(&active).unwrap();
        assert_eq!(json["content"], "movie-42");
        assert!(json.get("kind").is_none());
        let back: ActiveSession = serde_json::from_value(json).unwrap();
        assert_eq!(back, active);
    }

    #[test]
    fn request_errors_say_what_was_wrong() {
        let e = parse_request::<TokenRequest>(b"").unwrap_err();
        assert!(e.starts_with("empty request"), "{e}");
        let e = parse_request::<TokenRequest>(b"{\"account\":").unwrap_err();
        assert!(e.starts_with("request is not valid JSON"), "{e}");
        let e = parse_request::<TokenRequest>(b"{\"account\":\"a\"}").unwrap_err();
        assert!(
            e.starts_with("invalid request") && e.contains("device"),
            "{e}"
        );
        let e =
            parse_request::<TokenRequest>(b"{\"account\":\"a b\",\"device\":\"d\"}").unwrap_err();
        assert!(e.starts_with("invalid request"), "{e}");
        let ok: TokenRequest = parse_request(b"{\"account\":\"a\",\"device\":\"d\"}").unwrap();
        assert_eq!(ok.device.as_str(), "d");
    }

    #[test]
    fn only_a_whole_map_is_a_heartbeat() {
        let hb = Heartbeat {
            seq: Some(5),
            content: Some("movie".into()),
            ..Default::default()
        };
        let good = hb.encode();
        assert_eq!(Heartbeat::decode(&good).unwrap(), hb);
        // The same fields as an array.
        let array = rmp_serde::to_vec(&(5u64, "movie")).unwrap();
        assert!(matches!(
            Heartbeat::decode(&array),
            Err(HeartbeatError::Malformed(_))
        ));
        // Trailing bytes after a valid map.
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"junk");
        assert!(matches!(
            Heartbeat::decode(&trailing),
            Err(HeartbeatError::Malformed(_))
        ));
        // A bare string.
        let s = rmp_serde::to_vec("hello").unwrap();
        assert!(matches!(
            Heartbeat::decode(&s),
            Err(HeartbeatError::Malformed(_))
        ));
    }

    #[test]
    fn empty_payload_is_a_plain_heartbeat() {
        assert_eq!(Heartbeat::decode(&[]).unwrap(), Heartbeat::default());
    }

    #[test]
    fn heartbeat_round_trips_and_ignores_unknown_keys() {
        let hb = Heartbeat {
            seq: Some(7),
            content: Some("movie".into()),
            kind: Some("tv".into()),
            region: Some("eu".into()),
            leave: true,
        };
        assert_eq!(Heartbeat::decode(&hb.encode()).unwrap(), hb);

        #[derive(Serialize)]
        struct Extra {
            seq: u64,
            future_field: &'static str,
        }
        let bytes = rmp_serde::to_vec_named(&Extra {
            seq: 3,
            future_field: "x",
        })
        .unwrap();
        assert_eq!(Heartbeat::decode(&bytes).unwrap().seq, Some(3));
    }

    #[test]
    fn bad_heartbeats_are_refused() {
        assert_eq!(
            Heartbeat::decode(&[0u8; 1025]),
            Err(HeartbeatError::TooLarge(1025))
        );
        assert!(matches!(
            Heartbeat::decode(&[0xc1]),
            Err(HeartbeatError::Malformed(_))
        ));
        assert!(matches!(
            Heartbeat::decode(b"\x92\x01"),
            Err(HeartbeatError::Malformed(_))
        ));
        let long = Heartbeat {
            kind: Some("k".repeat(33)),
            ..Default::default()
        };
        assert_eq!(
            Heartbeat::decode(&long.encode()),
            Err(HeartbeatError::FieldTooLong {
                field: "kind",
                max: 32
            })
        );
    }

    #[test]
    fn control_message_uses_named_keys() {
        let msg = ControlMessage {
            kind: ControlType::DeviceLimitExceeded,
            account: AccountId::parse("a").unwrap(),
            device: DeviceId::parse("d").unwrap(),
            session: SessionId::parse("s").unwrap(),
            at: 1,
            by: None,
        };
        let bytes = msg.encode();
        let as_value: HashMap<String, rmpv_like::Value> = rmp_serde::from_slice(&bytes).unwrap();
        assert!(as_value.contains_key("type"));
        assert_eq!(ControlMessage::decode(&bytes).unwrap(), msg);
    }

    #[test]
    fn a_revocation_record_carries_its_decision_and_reads_both_ways() {
        let revocation = Revocation {
            reason: EndReason::Evicted,
            device: DeviceId::parse("tv").unwrap(),
            at: 7,
            by: Some(SessionRef {
                device: DeviceId::parse("phone").unwrap(),
                session: SessionId::parse("s2").unwrap(),
            }),
        };
        let record = RevocationRecord {
            revocation: revocation.clone(),
            decision: Some("d1".into()),
        };
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "reason": "evicted", "device": "tv", "at": 7,
                "by": {"device": "phone", "session": "s2"}, "decision": "d1"
            }),
            "one flat object: the revocation's fields and the decision"
        );
        let back: RevocationRecord = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, record);
        // A reader that knows only the revocation ignores the decision.
        let old_reader: Revocation = serde_json::from_value(json).unwrap();
        assert_eq!(old_reader, revocation);
        // A value written before decisions existed has none.
        let old_value = serde_json::to_vec(&revocation).unwrap();
        let read: RevocationRecord = serde_json::from_slice(&old_value).unwrap();
        assert_eq!((read.revocation, read.decision), (revocation, None));
        let without = RevocationRecord {
            revocation: Revocation {
                reason: EndReason::Revoked,
                device: DeviceId::parse("tv").unwrap(),
                at: 1,
                by: None,
            },
            decision: None,
        };
        assert!(
            serde_json::to_value(&without)
                .unwrap()
                .get("decision")
                .is_none(),
            "no decision, no key"
        );
    }

    #[test]
    fn a_dictionary_reads_the_same_into_a_map_or_the_compact_entries() {
        let rec = |session: &str, since: u64| SessionRecord {
            session: SessionId::parse(session).unwrap(),
            since,
            last_seen: since + 5,
            labels: Labels::new(Some("movie"), Some("tv"), None),
            replaced: (since == 2).then(|| Box::new(SessionId::parse("old").unwrap())),
        };
        let dict: SessionDict = [("tv", "s1", 1), ("phone", "s2", 2), ("a", "s3", 3)]
            .into_iter()
            .map(|(d, s, t)| (DeviceId::parse(d).unwrap(), rec(s, t)))
            .collect();
        let bytes = encode_dict(&dict);
        let entries = decode_entries(&bytes).unwrap();
        assert_eq!(entries.to_map(), decode_dict(&bytes).unwrap());
        assert_eq!(entries.to_map(), dict);
        assert!(decode_entries(&[]).unwrap().is_empty());
        assert!(decode_entries(b"\xc1 not msgpack").is_err());
        // A list is not a dictionary, nor is a map of the wrong values.
        assert!(decode_entries(&rmp_serde::to_vec(&[1, 2]).unwrap()).is_err());
        let mut wrong = HashMap::new();
        wrong.insert("tv", 7);
        assert!(decode_entries(&rmp_serde::to_vec(&wrong).unwrap()).is_err());
    }

    /// A tiny stand-in for a dynamic MessagePack value, enough to list keys.
    mod rmpv_like {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        pub enum Value {
            #[allow(dead_code)]
            S(String),
            #[allow(dead_code)]
            N(u64),
        }
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1100)) {
            let _ = Heartbeat::decode(&bytes);
            let _ = decode_dict(&bytes);
            let _ = decode_entries(&bytes);
            let _ = ControlMessage::decode(&bytes);
        }

        #[test]
        fn every_request_parser_answers_garbage_with_an_error(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse_request::<AccountRequest>(&bytes);
            let _ = parse_request::<CheckRequest>(&bytes);
            let _ = parse_request::<LimitsSetRequest>(&bytes);
            let _ = parse_request::<KickRequest>(&bytes);
            let _ = parse_request::<TokenRequest>(&bytes);
        }

        #[test]
        fn json_shaped_requests_never_panic(account in "[ -~]{0,80}", device in "[ -~]{0,80}", limit in proptest::prelude::any::<i64>()) {
            let body = serde_json::json!({"account": account, "device": device, "session": device, "limit": limit, "policy": account});
            let bytes = serde_json::to_vec(&body).unwrap();
            let valid = |s: &str| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            // A request is accepted exactly when its names are valid.
            proptest::prop_assert_eq!(parse_request::<TokenRequest>(&bytes).is_ok(), valid(&account) && valid(&device));
            let _ = parse_request::<LimitsSetRequest>(&bytes);
            let _ = parse_request::<CheckRequest>(&bytes);
        }
    }
}
