//! The effects the services share, so that their rules are written once:
//! publishing a presence event, the create-only writes that let exactly one
//! instance act on an ending or a timeout, and reading an interval
//! dictionary as a KV watch delivers it.
//!
//! Counting (metrics) and deciding what to do when a write fails stay with
//! the caller: the handler and the checker answer those differently.

use async_nats::jetstream::kv;
use bytes::Bytes;
use headcount_protocol::subjects::{self, kv as keys};
use headcount_protocol::wire::{self, EventType, PresenceEvent, Revocation, SessionDict};
use headcount_protocol::{AccountId, SessionId};

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
    /// This call created the key: the caller is the one to act.
    Won,
    /// The key was already there: someone else acted, or will.
    Lost,
}

/// Creates `key` in `store` unless it exists. A key already there is
/// [`Once::Lost`], not an error; any other failure is returned as is.
pub async fn create_once(
    store: &kv::Store,
    key: &str,
    value: Bytes,
) -> Result<Once, kv::CreateError> {
    match store.create(key, value).await {
        Ok(_) => Ok(Once::Won),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(Once::Lost),
        Err(e) => Err(e),
    }
}

/// Records that `session` ended, in the revoked bucket. Only the winner
/// tells the device and publishes the event, so every ending is announced
/// once however many instances decided it.
pub async fn revoke_once(
    revoked: &kv::Store,
    account: &AccountId,
    session: &SessionId,
    revocation: &Revocation,
) -> Result<Once, kv::CreateError> {
    let body = serde_json::to_vec(revocation).unwrap_or_default();
    create_once(revoked, &keys::revoked(account, session), body.into()).await
}

/// Marks the timeout of `session` as announced, in the timeouts bucket. Only
/// the winner publishes the timeout event.
pub async fn announce_timeout_once(
    timeouts: &kv::Store,
    account: &AccountId,
    session: &SessionId,
) -> Result<Once, kv::CreateError> {
    // Keyed as the session's revocation is (`<account>.<session>`); the
    // marker carries nothing: its existence is the whole message.
    create_once(timeouts, &keys::revoked(account, session), Bytes::new()).await
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
    pub entries: SessionDict,
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
            wire::decode_dict(value).map_err(|e| Unreadable::Value(e.to_string()))?
        }
        kv::Operation::Delete | kv::Operation::Purge => SessionDict::new(),
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
    use headcount_protocol::wire::{Labels, SessionRecord};

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
            decode_dict_entry("acme.42", kv::Operation::Put, 7, &wire::encode_dict(&d)).unwrap();
        assert_eq!(e.account.as_str(), "acme");
        assert_eq!(e.interval, 42);
        assert_eq!(e.revision, 7);
        assert_eq!(e.entries, d);
    }

    #[test]
    fn a_delete_or_purge_is_an_empty_dictionary() {
        let value = wire::encode_dict(&one_session());
        for op in [kv::Operation::Delete, kv::Operation::Purge] {
            let e = decode_dict_entry("acme.42", op, 9, &value).unwrap();
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
        for key in ["acme", "acme.x", "bad account.1", ".1"] {
            assert!(
                matches!(
                    decode_dict_entry(key, kv::Operation::Put, 1, &value),
                    Err(Unreadable::Key)
                ),
                "{key}"
            );
        }
        assert!(matches!(
            decode_dict_entry("acme.1", kv::Operation::Put, 1, b"\xc1 not msgpack"),
            Err(Unreadable::Value(_))
        ));
    }

    #[test]
    fn event_labels_are_the_wire_names() {
        assert_eq!(event_label(EventType::Timeout), "timeout");
        assert_eq!(event_label(EventType::Join), "join");
    }
}
