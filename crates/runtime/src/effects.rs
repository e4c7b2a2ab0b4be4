//! The effects the services share, so that their rules are written once:
//! publishing a presence event, the create-only writes that let exactly one
//! instance act on an ending or a timeout (each write carries the id of the
//! decision that makes it, so that a create whose acknowledgement is lost is
//! still known for its writer's own), and reading an interval dictionary as
//! a KV watch delivers it.
//!
//! Counting (metrics) and deciding what to do when a write fails stay with
//! the caller: the handler and the checker answer those differently.

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use headcount_protocol::subjects::{self, kv as keys};
use headcount_protocol::wire::{
    self, EventType, PresenceEvent, Revocation, RevocationRecord, SessionRecord,
};
use headcount_protocol::{AccountId, ByDevice, SessionId};

/// Publishes `event` (JSON) on its account's events subject.
pub async fn publish_event(
    nats: &async_nats::Client,
    event: &PresenceEvent,
) -> Result<(), async_nats::PublishError> {
    let body = serde_json::to_vec(event).unwrap_or_default();
    nats.publish(subjects::events(&event.account), body.into())
        .await
}

/// An event type as the wire spells it (`join`, `timeout`, ...), for metric
/// labels that match what observers receive.
pub fn event_label(kind: EventType) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The outcome of a create-only write that several instances may race for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Once {
    /// This decision created the key (whether or not its acknowledgement
    /// arrived): the caller is the one to act.
    Won,
    /// Another decision's value holds the key: someone else acted, or will.
    Lost,
}

/// The id of one decision to act: random, made once per decision and kept
/// by every retry of it. The value a decision writes carries it, so that a
/// read of the key tells this decision's write from every other's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision(String);

impl Decision {
    /// A new decision id (130 random bits, as letters and digits).
    pub fn new() -> Self {
        Self(crate::secret::random_id(22))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Decision {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a create-only write could not be settled.
#[derive(Debug, thiserror::Error)]
pub enum OnceError {
    /// The store refused the key itself; no retry can help.
    #[error("the store refused the key: {0}")]
    Refused(String),
    /// No try was answered in a way that settles who holds the key: the
    /// write may or may not have landed. Retry with the same decision.
    #[error("the store did not settle the write in {tries} tries: {last}")]
    Unreachable { tries: u32, last: String },
}

/// Whose value a key holds, as a read after a failed create sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// This decision's value: its create landed, acknowledged or not.
    Us,
    /// Another decision's value, or one from before values carried one.
    Another,
    /// No value (no key, or a deletion marker): the create did not land.
    Nobody,
}

/// Who holds a key whose current value is `stored`, for the decision that
/// writes `ours`. Since `ours` carries the decision's id, no other decision
/// writes the same bytes: equal bytes are our own write.
pub fn holder(ours: &[u8], stored: Option<&[u8]>) -> Holder {
    match stored {
        None => Holder::Nobody,
        Some(v) if v == ours => Holder::Us,
        Some(_) => Holder::Another,
    }
}

/// How long a create-only write keeps trying before it reports the store
/// unreachable.
#[derive(Debug, Clone, Copy)]
struct Patience {
    tries: u32,
    /// Before the second try; doubled before each further one.
    first_backoff: Duration,
    /// The longest one create or one read is waited for. A create that
    /// takes longer is read back rather than waited for: it may have
    /// landed, and the read says so sooner than the store's own timeout.
    op_deadline: Duration,
}

const PATIENCE: Patience = Patience {
    tries: 3,
    first_backoff: Duration::from_millis(250),
    op_deadline: Duration::from_secs(2),
};

/// How a create failed, as far as [`settle`] cares.
#[derive(Debug)]
enum CreateFailed {
    /// The key holds a value (whose is for a read to say).
    Exists,
    /// The key itself is refused.
    Refused(String),
    /// No acknowledgement, or another error: the write may have landed.
    Unknown(String),
}

/// What [`settle`] needs of a store: a create and a read of one key. The
/// KV store is the one; tests put a store that loses acknowledgements in
/// its place.
trait CreateOnly: Sync {
    fn try_create(
        &self,
        key: &str,
        value: Bytes,
    ) -> impl Future<Output = Result<(), CreateFailed>> + Send;

    /// The key's current value; None when there is none, or a deletion
    /// marker.
    fn read_back(&self, key: &str) -> impl Future<Output = Result<Option<Bytes>, String>> + Send;
}

impl CreateOnly for kv::Store {
    async fn try_create(&self, key: &str, value: Bytes) -> Result<(), CreateFailed> {
        match kv::Store::create(self, key, value).await {
            Ok(_) => Ok(()),
            Err(e) => Err(match e.kind() {
                kv::CreateErrorKind::AlreadyExists => CreateFailed::Exists,
                kv::CreateErrorKind::InvalidKey => CreateFailed::Refused(e.to_string()),
                _ => CreateFailed::Unknown(e.to_string()),
            }),
        }
    }

    async fn read_back(&self, key: &str) -> Result<Option<Bytes>, String> {
        match self.entry(key).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => Ok(Some(e.value)),
            Ok(_) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Creates `key` holding `value` unless it exists, and says whether this
/// decision holds it. `value` must carry the decision's id ([`Decision`])
/// and be the same bytes on every retry of the decision.
///
/// A create that fails for any reason but a refused key is read back: an
/// acknowledgement that was lost, or an earlier try of this decision that
/// landed after all, shows up as our own value and is [`Once::Won`];
/// another decision's value is [`Once::Lost`]; no value means the create
/// did not land, and it is tried again (a few times, with a backoff). An
/// error only when the store never settles it.
async fn settle<S: CreateOnly>(
    store: &S,
    key: &str,
    value: Bytes,
    patience: Patience,
) -> Result<Once, OnceError> {
    let mut backoff = patience.first_backoff;
    let mut last = String::new();
    for n in 0..patience.tries {
        if n > 0 {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
        match tokio::time::timeout(patience.op_deadline, store.try_create(key, value.clone())).await
        {
            Ok(Ok(())) => return Ok(Once::Won),
            Ok(Err(CreateFailed::Refused(e))) => return Err(OnceError::Refused(e)),
            Ok(Err(CreateFailed::Exists)) => last = "the key exists".into(),
            Ok(Err(CreateFailed::Unknown(e))) => last = e,
            Err(_) => last = format!("no acknowledgement within {:?}", patience.op_deadline),
        }
        match tokio::time::timeout(patience.op_deadline, store.read_back(key)).await {
            Ok(Ok(stored)) => match holder(&value, stored.as_deref()) {
                Holder::Us => return Ok(Once::Won),
                Holder::Another => return Ok(Once::Lost),
                // Not there: this try did not land (or the key just
                // expired). Create again.
                Holder::Nobody => last = format!("{last}; reading it back: no value"),
            },
            Ok(Err(e)) => last = format!("{last}; reading it back: {e}"),
            Err(_) => {
                last = format!(
                    "{last}; reading it back: no answer within {:?}",
                    patience.op_deadline
                )
            }
        }
    }
    Err(OnceError::Unreachable {
        tries: patience.tries,
        last,
    })
}

/// Creates `key` in `store` unless it exists; see [`settle`] for how a
/// create whose outcome is unknown is told apart. `value` must carry a
/// fresh [`Decision`] id.
pub async fn create_once(store: &kv::Store, key: &str, value: Bytes) -> Result<Once, OnceError> {
    settle(store, key, value, PATIENCE).await
}

/// The revoked bucket's value for `revocation`, decided by `decision`.
pub fn revocation_value(revocation: &Revocation, decision: &Decision) -> Bytes {
    let record = RevocationRecord {
        revocation: revocation.clone(),
        decision: Some(decision.as_str().to_owned()),
    };
    serde_json::to_vec(&record).unwrap_or_default().into()
}

/// Records that `session` ended, in the revoked bucket, as a new decision.
/// Only the winner tells the device and publishes the event, so every
/// ending is announced once however many instances decided it.
pub async fn revoke_once(
    revoked: &kv::Store,
    account: &AccountId,
    session: &SessionId,
    revocation: &Revocation,
) -> Result<Once, OnceError> {
    revoke_as(revoked, account, session, revocation, &Decision::new()).await
}

/// [`revoke_once`] as `decision`: a caller that retries an ending whose
/// earlier try was not settled passes the same decision and revocation
/// again, so that an earlier try that landed is still its own.
pub async fn revoke_as(
    revoked: &kv::Store,
    account: &AccountId,
    session: &SessionId,
    revocation: &Revocation,
    decision: &Decision,
) -> Result<Once, OnceError> {
    let value = revocation_value(revocation, decision);
    create_once(revoked, &keys::revoked(account, session), value).await
}

/// Marks the timeout of `session` as announced, in the timeouts bucket. Only
/// the winner publishes the timeout event.
pub async fn announce_timeout_once(
    timeouts: &kv::Store,
    account: &AccountId,
    session: &SessionId,
) -> Result<Once, OnceError> {
    // Keyed as the session's revocation is (`<account>.<session>`); the
    // marker's existence is the message, and it holds only the decision id
    // that tells this checker's marker from another's.
    let value = Bytes::copy_from_slice(Decision::new().as_str().as_bytes());
    create_once(timeouts, &keys::revoked(account, session), value).await
}

/// One interval dictionary as a watch of the sessions bucket delivered it.
#[derive(Debug, Clone, PartialEq)]
pub struct DictEntry {
    pub account: AccountId,
    pub interval: u64,
    /// The KV revision, for compare-and-set writes on top of it.
    pub revision: u64,
    /// Device to session record; empty once the dictionary was deleted or
    /// purged.
    pub entries: ByDevice<SessionRecord>,
}

/// Decodes an entry of the sessions bucket. A key that names no interval
/// dictionary, or a value that is not one, is logged and skipped (`None`):
/// one bad entry must not stop a watch.
pub fn dict_entry(entry: &kv::Entry) -> Option<DictEntry> {
    decode_dict_entry(&entry.key, entry.operation, entry.revision, &entry.value)
        .map_err(|e| tracing::warn!(key = %entry.key, error = %e, "unreadable interval dictionary"))
        .ok()
}

/// Why a sessions bucket entry could not be read.
#[derive(Debug, thiserror::Error)]
enum Unreadable {
    #[error("the key is not <account>.<interval>")]
    Key,
    #[error("{0}")]
    Value(String),
}

fn decode_dict_entry(
    key: &str,
    operation: kv::Operation,
    revision: u64,
    value: &[u8],
) -> Result<DictEntry, Unreadable> {
    let (account, interval) = keys::parse_session_dict(key).ok_or(Unreadable::Key)?;
    let entries = match operation {
        kv::Operation::Put => {
            wire::decode_entries(value).map_err(|e| Unreadable::Value(e.to_string()))?
        }
        kv::Operation::Delete | kv::Operation::Purge => ByDevice::default(),
    };
    Ok(DictEntry {
        account,
        interval,
        revision,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use headcount_protocol::DeviceId;
    use headcount_protocol::wire::{Labels, SessionDict};
    use std::collections::VecDeque;
    use std::sync::Mutex;

    fn one_session() -> SessionDict {
        let mut d = SessionDict::new();
        d.insert(
            DeviceId::parse("tv").unwrap(),
            SessionRecord {
                session: SessionId::parse("s1").unwrap(),
                since: 1_000,
                last_seen: 2_000,
                labels: Labels::new(Some("film"), None, None),
                replaced: None,
            },
        );
        d
    }

    #[test]
    fn a_put_decodes_to_its_account_interval_revision_and_sessions() {
        let d = one_session();
        let e =
            decode_dict_entry("15.acme.42", kv::Operation::Put, 7, &wire::encode_dict(&d)).unwrap();
        assert_eq!(e.account.as_str(), "acme");
        assert_eq!(e.interval, 42);
        assert_eq!(e.revision, 7);
        assert_eq!(e.entries.to_map(), d);
    }

    #[test]
    fn a_delete_or_purge_is_an_empty_dictionary() {
        let value = wire::encode_dict(&one_session());
        for op in [kv::Operation::Delete, kv::Operation::Purge] {
            let e = decode_dict_entry("15.acme.42", op, 9, &value).unwrap();
            assert!(e.entries.is_empty(), "{op:?}");
            assert_eq!(
                (e.account.as_str(), e.interval, e.revision),
                ("acme", 42, 9)
            );
        }
    }

    #[test]
    fn bad_keys_and_values_are_unreadable() {
        let value = wire::encode_dict(&one_session());
        for key in [
            "acme",
            "15.acme.x",
            "acme.1",
            "14.acme.1",
            "bad account.1",
            ".1",
        ] {
            assert!(
                matches!(
                    decode_dict_entry(key, kv::Operation::Put, 1, &value),
                    Err(Unreadable::Key)
                ),
                "{key}"
            );
        }
        assert!(matches!(
            decode_dict_entry("15.acme.1", kv::Operation::Put, 1, b"\xc1 not msgpack"),
            Err(Unreadable::Value(_))
        ));
    }

    /// A create as the fake store answers it.
    #[derive(Debug, Clone, Copy)]
    enum Create {
        /// As a store does: the value lands unless the key holds one.
        Normal,
        /// The value lands; the acknowledgement is lost (an error).
        LandsUnacknowledged,
        /// The value lands; no answer ever comes.
        LandsSilently,
        /// Nothing lands; an error.
        Fails,
        /// The key is refused.
        Refuses,
    }

    /// A store of one key whose creates and reads follow a script, then
    /// behave; it counts the creates it was asked for.
    #[derive(Default)]
    struct Fake {
        held: Mutex<Option<Bytes>>,
        creates: Mutex<VecDeque<Create>>,
        /// Reads that fail before reads answer.
        failing_reads: Mutex<u32>,
        created: Mutex<u32>,
    }

    impl Fake {
        fn scripted(creates: &[Create], failing_reads: u32) -> Self {
            Self {
                creates: Mutex::new(creates.iter().copied().collect()),
                failing_reads: Mutex::new(failing_reads),
                ..Self::default()
            }
        }

        fn holding(value: &[u8]) -> Self {
            let f = Self::default();
            *f.held.lock().unwrap() = Some(Bytes::copy_from_slice(value));
            f
        }

        fn held(&self) -> Option<Bytes> {
            self.held.lock().unwrap().clone()
        }

        fn created(&self) -> u32 {
            *self.created.lock().unwrap()
        }

        /// What the store does with one create, before it answers.
        fn apply(&self, value: Bytes) -> (Create, Result<(), CreateFailed>) {
            *self.created.lock().unwrap() += 1;
            let step = self.creates.lock().unwrap().pop_front();
            let step = step.unwrap_or(Create::Normal);
            let mut held = self.held.lock().unwrap();
            let landed = match step {
                Create::Fails => Err(CreateFailed::Unknown("no responders".into())),
                Create::Refuses => Err(CreateFailed::Refused("bad key".into())),
                _ if held.is_some() => Err(CreateFailed::Exists),
                _ => {
                    *held = Some(value);
                    Ok(())
                }
            };
            let answer = match (step, landed) {
                (Create::LandsUnacknowledged, Ok(())) => {
                    Err(CreateFailed::Unknown("timed out".into()))
                }
                (_, answer) => answer,
            };
            (step, answer)
        }
    }

    impl CreateOnly for Fake {
        async fn try_create(&self, _key: &str, value: Bytes) -> Result<(), CreateFailed> {
            let (step, answer) = self.apply(value);
            if let Create::LandsSilently = step {
                std::future::pending::<()>().await;
            }
            answer
        }

        async fn read_back(&self, _key: &str) -> Result<Option<Bytes>, String> {
            {
                let mut failing = self.failing_reads.lock().unwrap();
                if *failing > 0 {
                    *failing -= 1;
                    return Err("timed out".into());
                }
            }
            Ok(self.held())
        }
    }

    /// Quick tries, for tests.
    const QUICK: Patience = Patience {
        tries: 3,
        first_backoff: Duration::from_millis(1),
        op_deadline: Duration::from_millis(50),
    };

    fn value_of(decision: &Decision) -> Bytes {
        let revocation = Revocation {
            reason: wire::EndReason::Evicted,
            device: DeviceId::parse("tv").unwrap(),
            at: 1_000,
            by: None,
        };
        revocation_value(&revocation, decision)
    }

    #[test]
    fn a_key_is_ours_only_when_it_holds_our_decisions_value() {
        let (ours, theirs) = (Decision::new(), Decision::new());
        assert_ne!(ours, theirs);
        let v = value_of(&ours);
        assert_eq!(holder(&v, Some(&v)), Holder::Us);
        assert_eq!(
            holder(&v, Some(&value_of(&theirs))),
            Holder::Another,
            "the same revocation decided by another"
        );
        let older = serde_json::to_vec(&Revocation {
            reason: wire::EndReason::Evicted,
            device: DeviceId::parse("tv").unwrap(),
            at: 1_000,
            by: None,
        })
        .unwrap();
        assert_eq!(
            holder(&v, Some(&older)),
            Holder::Another,
            "a value from before decisions is someone else's"
        );
        assert_eq!(holder(&v, Some(b"")), Holder::Another, "an older marker");
        assert_eq!(holder(&v, None), Holder::Nobody);
        // The same decision writes the same bytes on every retry.
        assert_eq!(value_of(&ours), v);
    }

    #[tokio::test]
    async fn a_create_whose_acknowledgement_is_lost_is_won() {
        for lost in [Create::LandsUnacknowledged, Create::LandsSilently] {
            let store = Fake::scripted(&[lost], 0);
            let v = value_of(&Decision::new());
            assert_eq!(
                settle(&store, "k", v.clone(), QUICK).await.unwrap(),
                Once::Won,
                "{lost:?}"
            );
            assert_eq!(store.held(), Some(v));
            assert_eq!(store.created(), 1, "read back, not created again");
        }
    }

    #[tokio::test]
    async fn an_earlier_try_that_landed_is_found_by_a_later_one() {
        // The first create lands unacknowledged and its read-back fails;
        // the second finds the key, reads it and sees its own value.
        let store = Fake::scripted(&[Create::LandsUnacknowledged], 1);
        let v = value_of(&Decision::new());
        assert_eq!(settle(&store, "k", v, QUICK).await.unwrap(), Once::Won);
        assert_eq!(store.created(), 2);
    }

    #[tokio::test]
    async fn another_decisions_value_is_lost_however_the_create_failed() {
        let theirs = value_of(&Decision::new());
        for first in [Create::Normal, Create::LandsUnacknowledged] {
            let store = Fake::holding(&theirs);
            store.creates.lock().unwrap().push_back(first);
            let ours = value_of(&Decision::new());
            assert_eq!(
                settle(&store, "k", ours, QUICK).await.unwrap(),
                Once::Lost,
                "{first:?}"
            );
            assert_eq!(store.held(), Some(theirs.clone()), "left as it was");
        }
    }

    #[tokio::test]
    async fn two_decisions_on_one_key_settle_on_one_winner() {
        let store = Fake::scripted(
            &[Create::LandsUnacknowledged, Create::LandsUnacknowledged],
            0,
        );
        let (a, b) = (value_of(&Decision::new()), value_of(&Decision::new()));
        assert_eq!(settle(&store, "k", a, QUICK).await.unwrap(), Once::Won);
        assert_eq!(settle(&store, "k", b, QUICK).await.unwrap(), Once::Lost);
    }

    #[tokio::test]
    async fn a_create_that_did_not_land_is_tried_again() {
        let store = Fake::scripted(&[Create::Fails, Create::Fails], 0);
        let v = value_of(&Decision::new());
        assert_eq!(
            settle(&store, "k", v.clone(), QUICK).await.unwrap(),
            Once::Won
        );
        assert_eq!((store.created(), store.held()), (3, Some(v)));
    }

    #[tokio::test]
    async fn a_store_that_never_settles_it_is_an_error_and_a_refused_key_at_once() {
        let store = Fake::scripted(&[Create::Fails; 3], 3);
        let e = settle(&store, "k", value_of(&Decision::new()), QUICK)
            .await
            .unwrap_err();
        assert!(matches!(e, OnceError::Unreachable { tries: 3, .. }), "{e}");
        assert_eq!(store.created(), 3, "bounded");
        // The write of a try that landed unseen is still this decision's:
        // retried as the same decision once the store answers, it is won.
        let store = Fake::scripted(&[Create::LandsUnacknowledged], 3);
        let v = value_of(&Decision::new());
        assert!(settle(&store, "k", v.clone(), QUICK).await.is_err());
        assert_eq!(settle(&store, "k", v, QUICK).await.unwrap(), Once::Won);

        let store = Fake::scripted(&[Create::Refuses], 0);
        let e = settle(&store, "k", value_of(&Decision::new()), QUICK)
            .await
            .unwrap_err();
        assert!(matches!(e, OnceError::Refused(_)), "{e}");
        assert_eq!(store.created(), 1, "not retried");
    }

    #[test]
    fn event_labels_are_the_wire_names() {
        assert_eq!(event_label(EventType::Timeout), "timeout");
        assert_eq!(event_label(EventType::Join), "join");
    }
}
