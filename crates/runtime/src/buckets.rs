//! The KV buckets, created or updated with the configured settings.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, kv};
use headcount_protocol::subjects::kv as keys;

/// How the buckets are laid out on the JetStream cluster.
#[derive(Debug, Clone)]
pub struct BucketSettings {
    /// Replicas per bucket (1 for one server, 3 on a cluster).
    pub replicas: usize,
    /// How long an interval dictionary outlives its last write.
    pub sessions_ttl: Duration,
    /// How long a revocation is kept (as long as the longest token lives).
    pub revoked_ttl: Duration,
    /// How long a `timeout` announcement blocks another for the session.
    pub timeouts_ttl: Duration,
    /// File storage survives a server restart; memory is for throwaway runs.
    pub storage: jetstream::stream::StorageType,
    /// How many sessions buckets the partitions are spread over (1 to
    /// [`keys::MAX_SESSIONS_BUCKETS`]): each is a stream with a leader of
    /// its own, so on a cluster their writes spread over the servers. The
    /// same everywhere.
    pub sessions_buckets: u32,
}

/// How long a revocation is kept unless told otherwise: a minute longer
/// than a device token lives by default (15 minutes), so an ended
/// session's token cannot connect again before it expires.
pub const DEFAULT_REVOKED_TTL: Duration = Duration::from_secs(16 * 60);

/// How long a `timeout` announcement must block another for the session:
/// until no checker can find the session any more. A silent session stays
/// in the live dictionaries until the interval after the one it was last
/// written in ends, and the dictionaries themselves outlive their last
/// write by [`IntervalClock::dictionary_ttl`]; a checker that starts in
/// that window gives every session it loads a fresh timeout. So the marker
/// lives the dictionaries' TTL plus one timeout (and at least four
/// timeouts, for short intervals).
///
/// [`IntervalClock::dictionary_ttl`]: headcount_protocol::IntervalClock::dictionary_ttl
pub fn timeouts_ttl(interval: Duration, timeout: Duration) -> Duration {
    let lingering = headcount_protocol::IntervalClock::new(interval).dictionary_ttl() + timeout;
    lingering.max(timeout * 4)
}

impl Default for BucketSettings {
    /// One server, the default interval's dictionaries (120 s), file storage.
    fn default() -> Self {
        Self {
            replicas: 1,
            sessions_ttl: headcount_protocol::IntervalClock::new(Duration::from_secs(120))
                .dictionary_ttl(),
            revoked_ttl: DEFAULT_REVOKED_TTL,
            timeouts_ttl: timeouts_ttl(Duration::from_secs(120), Duration::from_secs(15)),
            storage: jetstream::stream::StorageType::File,
            sessions_buckets: 1,
        }
    }
}

/// The sessions buckets, the partitions spread over them
/// ([`keys::sessions_bucket_of`]).
#[derive(Clone)]
pub struct SessionsBuckets(std::sync::Arc<[kv::Store]>);

impl SessionsBuckets {
    /// The bucket holding `partition`'s dictionaries.
    pub fn of(&self, partition: u32) -> &kv::Store {
        &self.0[keys::sessions_bucket_of(partition, self.0.len() as u32) as usize]
    }

    /// Every sessions bucket, the first first.
    pub fn all(&self) -> &[kv::Store] {
        &self.0
    }
}

/// Handles to the buckets.
#[derive(Clone)]
pub struct Buckets {
    pub sessions: SessionsBuckets,
    pub revoked: kv::Store,
    pub limits: kv::Store,
    pub timeouts: kv::Store,
    pub connections: kv::Store,
    pub members: kv::Store,
}

impl std::fmt::Debug for Buckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Buckets")
    }
}

/// What opening a bucket may do to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Create it when missing; never change an existing one (a service: its
    /// NATS user may create the buckets but not update any stream, so that
    /// a leaked service password cannot reconfigure one).
    CreateMissing,
    /// Create it, or bring its settings up to date (the console user).
    CreateOrUpdate,
}

impl Buckets {
    /// Opens the buckets, creating the missing ones with `s`; an existing
    /// bucket keeps its settings (a difference is logged: apply it with
    /// [`Buckets::ensure`], `headcount buckets`). Safe to call from every
    /// service at start-up, concurrently.
    pub async fn open(client: &async_nats::Client, s: &BucketSettings) -> anyhow::Result<Self> {
        Self::open_with(client, s, Mode::CreateMissing).await
    }

    /// Creates the buckets or brings their settings up to date: for the
    /// console user (`headcount up`, `headcount buckets`).
    pub async fn ensure(client: &async_nats::Client, s: &BucketSettings) -> anyhow::Result<Self> {
        Self::open_with(client, s, Mode::CreateOrUpdate).await
    }

    async fn open_with(
        client: &async_nats::Client,
        s: &BucketSettings,
        mode: Mode,
    ) -> anyhow::Result<Self> {
        // A short timeout for these requests: right after a cluster starts
        // (or loses its meta leader) they go unanswered for a while, and a
        // quick retry beats a long wait. The stores themselves keep the
        // client's usual timeout.
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(2))
            .build(client.clone());
        let js_default = jetstream::new(client.clone());
        let open = |(bucket, description, max_age): (String, &'static str, Duration)| {
            let (js, js_default) = (js.clone(), js_default.clone());
            let cfg = kv::Config {
                bucket: bucket.to_string(),
                description: description.to_string(),
                // Only the latest value of a key is ever read.
                history: 1,
                max_age,
                storage: s.storage,
                num_replicas: s.replicas,
                ..Default::default()
            };
            async move {
                // Several services open the buckets at once; a lost race shows
                // up as an error from the server, so try again a few times.
                let mut delay = Duration::from_millis(100);
                for attempt in 0.. {
                    let made = match mode {
                        Mode::CreateOrUpdate => js
                            .create_or_update_key_value(cfg.clone())
                            .await
                            .map(|_| ())
                            .map_err(anyhow::Error::from),
                        Mode::CreateMissing => create_missing(&js, &cfg).await.map(|_| ()),
                    };
                    // Getting the store asks the server again: on a
                    // cluster still electing leaders that can time out
                    // too, and is retried like the create.
                    let opened = match made {
                        Ok(()) => js_default
                            .get_key_value(bucket.as_str())
                            .await
                            .map_err(anyhow::Error::from),
                        Err(e) => Err(e),
                    };
                    match opened {
                        Ok(store) => return Ok(store),
                        Err(e) if attempt < 50 => {
                            tracing::warn!(bucket, error = %e, "opening kv bucket, retrying");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(2));
                        }
                        Err(e) => {
                            return Err(e).with_context(|| format!("opening kv bucket {bucket}"));
                        }
                    }
                }
                unreachable!("the retry loop returns")
            }
        };
        // Every bucket: its name, what it holds, and how long an entry
        // lives (zero: until it is deleted).
        let sessions_bucket = |i: u32| {
            (
                keys::sessions_bucket(i),
                "interval dictionaries: partition.account.interval -> device -> session",
                s.sessions_ttl,
            )
        };
        let [revoked, limits, timeouts, connections, members] = [
            (
                keys::REVOKED_BUCKET.to_string(),
                "ended sessions whose heartbeats are ignored",
                s.revoked_ttl,
            ),
            (
                keys::LIMITS_BUCKET.to_string(),
                "per-account limits, plans and token plans",
                Duration::ZERO,
            ),
            (
                keys::TIMEOUTS_BUCKET.to_string(),
                "timeouts already announced (one event per timeout)",
                s.timeouts_ttl,
            ),
            (
                keys::CONNECTIONS_BUCKET.to_string(),
                "live connections per token, revoked operator and backend tokens",
                keys::CONNECTIONS_TTL,
            ),
            (
                keys::MEMBERS_BUCKET.to_string(),
                "live service instances and the partitions they serve",
                keys::MEMBERS_TTL,
            ),
        ];
        // One at a time, each boxed: the futures are large, and a caller
        // polling this deep in its own future (a test's thread) has a
        // small stack.
        let n = s.sessions_buckets.clamp(1, keys::MAX_SESSIONS_BUCKETS);
        check_sessions_layout(&js, n, mode).await?;
        let mut spread = Vec::new();
        for i in 0..n {
            spread.push(Box::pin(open(sessions_bucket(i))).await?);
        }
        Ok(Self {
            sessions: SessionsBuckets(spread.into()),
            revoked: Box::pin(open(revoked)).await?,
            limits: Box::pin(open(limits)).await?,
            timeouts: Box::pin(open(timeouts)).await?,
            connections: Box::pin(open(connections)).await?,
            members: Box::pin(open(members)).await?,
        })
    }
}

/// Opens an existing bucket, waiting (with a log line now and then) until
/// the handler or the checker has created it. For services that use a bucket
/// but must not decide its settings.
pub async fn open_existing(
    client: &async_nats::Client,
    bucket: &'static str,
    shutdown: &crate::Shutdown,
) -> anyhow::Result<kv::Store> {
    let js = jetstream::new(client.clone());
    let mut delay = Duration::from_millis(100);
    let mut last_log: Option<std::time::Instant> = None;
    loop {
        match js.get_key_value(bucket).await {
            Ok(store) => return Ok(store),
            Err(e) => {
                if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    last_log = Some(std::time::Instant::now());
                    tracing::info!(bucket, error = %e, "waiting for the bucket (created by heartbeat-handler or checker)");
                }
                tokio::select! {
                    _ = shutdown.clone().wait() => anyhow::bail!("stopped while waiting for {bucket}"),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Creates `cfg`'s bucket unless it exists. An existing bucket is left as it
/// is (creating a stream that exists with other settings fails, and
/// updating one is not this user's to do), and a difference from `cfg` in
/// what matters (TTL, replicas) is logged.
/// Creates a bucket that is missing; Ok(true) when this call made it.
async fn create_missing(js: &jetstream::Context, cfg: &kv::Config) -> anyhow::Result<bool> {
    let created = match js.create_key_value(cfg.clone()).await {
        Ok(_) => return Ok(true),
        Err(e) => e,
    };
    // It exists (with other settings), or the server did not answer.
    let store = js
        .get_key_value(&cfg.bucket)
        .await
        .map_err(|_| anyhow::Error::from(created))?;
    if let Ok(info) = store.status().await {
        let c = &info.info.config;
        if c.max_age != cfg.max_age || c.num_replicas != cfg.num_replicas.max(1) {
            tracing::warn!(
                bucket = %cfg.bucket,
                ttl = ?c.max_age,
                wanted_ttl = ?cfg.max_age,
                replicas = c.num_replicas,
                wanted_replicas = cfg.num_replicas,
                "bucket settings differ from this service's; run `headcount buckets` as the console user to apply them"
            );
        }
    }
    Ok(false)
}

/// Whether a stream of that name exists (an error: the server did not
/// answer).
async fn stream_exists(js: &jetstream::Context, bucket: &str) -> anyhow::Result<bool> {
    match js.get_stream(format!("KV_{bucket}")).await {
        Ok(_) => Ok(true),
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(anyhow::Error::from(e).context(format!("looking up bucket {bucket}"))),
    }
}

/// Refuses to run with another spread of the sessions buckets than the
/// deployment's: where a partition's dictionaries live must be the same for
/// every service, or a handler's writes go where no checker reads. A
/// sessions bucket beyond `n` means others spread over more; with the first
/// bucket there, a missing one below `n` means they spread over fewer (the
/// console, `headcount buckets`, may add them).
async fn check_sessions_layout(js: &jetstream::Context, n: u32, mode: Mode) -> anyhow::Result<()> {
    let mismatch = |found: &str| {
        anyhow::anyhow!(
            "the sessions buckets are spread over {found}, and this service over {n} \
             (--sessions-buckets): use the same value everywhere, and apply a change \
             with `headcount buckets --sessions-buckets N` in a quiet hour"
        )
    };
    for i in n..keys::MAX_SESSIONS_BUCKETS {
        let bucket = keys::sessions_bucket(i);
        if stream_exists(js, &bucket).await? {
            return Err(mismatch(&format!("at least {}", i + 1)).context(format!(
                "bucket {bucket} exists (to spread over fewer, delete it and those after it \
                 first, e.g. `nats kv del {bucket}`)"
            )));
        }
    }
    if mode == Mode::CreateMissing && n > 1 && stream_exists(js, keys::SESSIONS_BUCKET).await? {
        for i in 1..n {
            if !stream_exists(js, &keys::sessions_bucket(i)).await? {
                return Err(mismatch(&i.to_string()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_marker_outlives_every_dictionary_that_can_hold_the_session() {
        for (interval, timeout) in [(120, 15), (10, 5), (3, 1), (600, 30)] {
            let (interval, timeout) = (Duration::from_secs(interval), Duration::from_secs(timeout));
            let ttl = timeouts_ttl(interval, timeout);
            // Last written just before an interval ends, it is read until the
            // next one ends and its dictionary lives on after that.
            let dict = headcount_protocol::IntervalClock::new(interval).dictionary_ttl();
            assert!(ttl >= dict + timeout, "{interval:?}/{timeout:?}: {ttl:?}");
            assert!(
                ttl >= 2 * interval + timeout,
                "{interval:?}/{timeout:?}: {ttl:?}"
            );
            assert!(ttl >= timeout * 4);
        }
    }
}
