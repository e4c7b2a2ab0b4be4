//! Following a KV bucket: replay what it holds, then every change.

use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use tokio::sync::oneshot;

use crate::Shutdown;

/// How often a watch compares its position with the bucket's.
const STALL_CHECK: Duration = Duration::from_secs(3);

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
    mut apply: F,
    shutdown: Shutdown,
) -> anyhow::Result<(tokio::task::JoinHandle<()>, oneshot::Receiver<()>)>
where
    F: FnMut(kv::Entry) + Send + 'static,
{
    let (ready_tx, ready_rx) = oneshot::channel();
    let initial = store.status().await?.values();
    let mut ready_tx = Some(ready_tx);
    if initial == 0
        && let Some(tx) = ready_tx.take()
    {
        let _ = tx.send(());
    }
    let mut watch = store.watch_with_history(">").await?;
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
                    let last = store.status().await.map_or(0, |s| s.info.state.last_sequence);
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
                    if store.status().await.is_ok_and(|s| s.values() == 0)
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
                    let caught_up = entry.delta == 0 || entry.seen_current;
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
                        match store.watch_all_from_revision(last_revision + 1).await {
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
