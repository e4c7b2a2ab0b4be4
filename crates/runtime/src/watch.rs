//! Following a KV bucket: replay what it holds, then every change.

use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::kv;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::oneshot;

use crate::Shutdown;

/// How often a watch compares its position with the bucket's.
const STALL_CHECK: Duration = Duration::from_secs(3);

/// The most entries one pull of a watch asks for. A watch pulls (an
/// ordered pull consumer), so what it has not applied yet waits in the
/// stream, not in this process: a burst of writes (every account's
/// dictionary at an interval boundary) costs at most about two pulls'
/// worth of memory per watch while it is worked through, where a pushed
/// watch takes in the server's whole flow-control window.
const WATCH_BATCH: i64 = 64;

/// How long one pull waits for entries before the next replaces it. The
/// server's idle heartbeat on a waiting pull is half of it, and the client
/// starts a consumer again after two missed ones: a watch whose consumer
/// went (its server restarted, a leader moved) notices within about this.
const WATCH_PULL_EXPIRES: Duration = Duration::from_secs(10);

/// Spawns a task that feeds every entry of `store` (the latest value of each
/// key, then each later change, deletes included) to `apply`, in order.
///
/// The returned receiver fires once the replay of what the bucket held at
/// start is done, so a service can wait for a complete view before it answers
/// anything. If the watch breaks (a server restart, a lost consumer), it is
/// resumed after the last revision applied, so nothing is skipped.
pub async fn follow<F>(
    store: kv::Store,
    what: &'static str,
    apply: F,
    shutdown: Shutdown,
) -> anyhow::Result<(tokio::task::JoinHandle<()>, oneshot::Receiver<()>)>
where
    F: FnMut(kv::Entry) + Send + 'static,
{
    follow_keys(store, what, ALL_KEYS, apply, shutdown).await
}

const ALL_KEYS: &str = ">";

/// [`follow`] for the keys matching `keys` alone (a KV key pattern such as
/// `7.>`): the replay is done once the last of those keys the bucket held
/// at start has been applied.
pub async fn follow_keys<F>(
    store: kv::Store,
    what: &'static str,
    keys: &str,
    mut apply: F,
    shutdown: Shutdown,
) -> anyhow::Result<(tokio::task::JoinHandle<()>, oneshot::Receiver<()>)>
where
    F: FnMut(kv::Entry) + Send + 'static,
{
    let keys = keys.to_owned();
    let (ready_tx, ready_rx) = oneshot::channel();
    // Where the replay ends: the revision of the newest matching entry.
    let mut replay_end = held_up_to(&store, &keys).await?;
    let mut ready_tx = Some(ready_tx);
    if replay_end == 0
        && let Some(tx) = ready_tx.take()
    {
        let _ = tx.send(());
    }
    let mut watch = open(&store, &keys, DeliverPolicy::LastPerSubject).await?;
    let task = tokio::spawn(async move {
        let mut last_revision = 0u64;
        let mut stop = std::pin::pin!(shutdown.wait());
        // A watch can stall without an error when the stream's leader moves
        // (a node lost): every few seconds, compare with what the bucket
        // holds, and resume when it is ahead and nothing arrived meanwhile.
        let mut check = tokio::time::interval(STALL_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut delivered = false;
        let mut suspect: Option<u64> = None;
        loop {
            let next = tokio::select! {
                _ = &mut stop => return,
                next = watch.next() => next,
                _ = check.tick() => {
                    let last = held_up_to(&store, &keys).await.unwrap_or(0);
                    let quiet = !std::mem::replace(&mut delivered, false);
                    if last <= last_revision || !quiet {
                        suspect = None;
                        continue;
                    }
                    if suspect == Some(last) {
                        // Resumed once already and still nothing: what lies
                        // between has expired (TTL). Nothing to wait for.
                        last_revision = last;
                        suspect = None;
                        continue;
                    }
                    suspect = Some(last);
                    tracing::warn!(bucket = what, last_revision, "kv watch stalled, resuming");
                    None
                }
                // The bucket may have emptied (TTL) between the count above
                // and the watch: nothing would ever arrive to mark the end of
                // the replay, so look again now and then while waiting.
                _ = tokio::time::sleep(Duration::from_secs(1)), if ready_tx.is_some() => {
                    if let Ok(end) = held_up_to(&store, &keys).await {
                        replay_end = replay_end.min(end);
                    }
                    if (replay_end == 0 || last_revision >= replay_end)
                        && let Some(tx) = ready_tx.take()
                    {
                        let _ = tx.send(());
                    }
                    continue;
                }
            };
            match next {
                Some(Ok(entry)) => {
                    delivered = true;
                    let caught_up =
                        entry.delta == 0 || entry.seen_current || entry.revision >= replay_end;
                    last_revision = last_revision.max(entry.revision);
                    apply(entry);
                    if caught_up && let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
                other => {
                    if let Some(Err(e)) = other {
                        tracing::warn!(bucket = what, error = %e, "kv watch failed, resuming");
                    } else {
                        tracing::warn!(bucket = what, "kv watch ended, resuming");
                    }
                    let mut delay = Duration::from_millis(100);
                    watch = loop {
                        let from = DeliverPolicy::ByStartSequence {
                            start_sequence: last_revision + 1,
                        };
                        match open(&store, &keys, from).await {
                            Ok(w) => break w,
                            Err(e) => {
                                tracing::warn!(bucket = what, error = %e, "resuming kv watch");
                                tokio::select! {
                                    _ = &mut stop => return,
                                    _ = tokio::time::sleep(delay) => {}
                                }
                                delay = (delay * 2).min(Duration::from_secs(5));
                            }
                        }
                    };
                }
            }
        }
    });
    Ok((task, ready_rx))
}

/// The entries of `store` matching `keys` from `start` on (the latest value
/// of each key, or everything after a revision), pulled [`WATCH_BATCH`] at
/// a time by an ordered consumer, which the client starts again by itself
/// after a gap or a lost consumer.
async fn open(
    store: &kv::Store,
    keys: &str,
    start: DeliverPolicy,
) -> anyhow::Result<BoxStream<'static, anyhow::Result<kv::Entry>>> {
    let consumer = store
        .stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: format!("{}{keys}", store.prefix),
            deliver_policy: start,
            max_batch: WATCH_BATCH,
            max_expires: WATCH_PULL_EXPIRES,
            ..Default::default()
        })
        .await?;
    let messages = consumer.messages().await?;
    let (prefix, bucket) = (store.prefix.clone(), store.name.clone());
    let mut seen_current = false;
    Ok(messages
        .map_err(anyhow::Error::from)
        .and_then(move |m| {
            let entry = entry_of(&m, &prefix, &bucket, &mut seen_current);
            std::future::ready(entry)
        })
        .boxed())
}

/// The KV entry a message of the bucket's stream carries.
fn entry_of(
    m: &async_nats::jetstream::Message,
    prefix: &str,
    bucket: &str,
    seen_current: &mut bool,
) -> anyhow::Result<kv::Entry> {
    let info = m
        .info()
        .map_err(|e| anyhow::anyhow!("a watched message without its metadata: {e}"))?;
    let key = m
        .subject
        .strip_prefix(prefix)
        .ok_or_else(|| anyhow::anyhow!("a watched message outside the bucket: {}", m.subject))?;
    *seen_current |= info.pending == 0;
    Ok(kv::Entry {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        value: m.payload.clone(),
        revision: info.stream_sequence,
        delta: info.pending,
        created: info.published,
        operation: operation_of(m.headers.as_ref()),
        seen_current: *seen_current,
    })
}

/// What a stream message did to its key: its `KV-Operation` header, or for
/// a marker the server left (a key's TTL ran out, or it was removed) the
/// marker's reason; a plain message is a put.
fn operation_of(headers: Option<&async_nats::HeaderMap>) -> kv::Operation {
    let Some(h) = headers else {
        return kv::Operation::Put;
    };
    if let Some(op) = h.get("KV-Operation") {
        return op.as_str().parse().unwrap_or(kv::Operation::Put);
    }
    match h.get("Nats-Marker-Reason").map(|r| r.as_str()) {
        Some("MaxAge" | "Purge") => kv::Operation::Purge,
        Some("Remove") => kv::Operation::Delete,
        _ => kv::Operation::Put,
    }
}

/// The revision of the newest entry of `store` matching `keys`, 0 when it
/// holds none (every key deleted and purged, or expired).
async fn held_up_to(store: &kv::Store, keys: &str) -> anyhow::Result<u64> {
    if keys == ALL_KEYS {
        let status = store.status().await?;
        return Ok(if status.values() == 0 {
            0
        } else {
            status.info.state.last_sequence
        });
    }
    let subject = format!("{}{keys}", store.prefix);
    match store.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(m) => Ok(m.sequence),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(0),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> async_nats::HeaderMap {
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, *v);
        }
        h
    }

    #[test]
    fn a_message_says_what_it_did_to_its_key() {
        use kv::Operation::{Delete, Purge, Put};
        assert_eq!(operation_of(None), Put);
        assert_eq!(operation_of(Some(&headers(&[]))), Put);
        for (op, expected) in [("DEL", Delete), ("PURGE", Purge), ("PUT", Put)] {
            let h = headers(&[("KV-Operation", op)]);
            assert_eq!(operation_of(Some(&h)), expected, "{op}");
        }
        // Markers the server leaves where a key's TTL ran out or it went.
        for (reason, expected) in [("MaxAge", Purge), ("Purge", Purge), ("Remove", Delete)] {
            let h = headers(&[("Nats-Marker-Reason", reason)]);
            assert_eq!(operation_of(Some(&h)), expected, "{reason}");
        }
    }
}
