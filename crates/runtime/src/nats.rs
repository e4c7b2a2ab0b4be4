//! Connecting to NATS the same way from every service.

use std::time::Duration;

use anyhow::Context;

/// How a service reaches NATS.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// One or more server URLs; the client fails over between them.
    pub urls: Vec<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// Shown in the server's connection list (`nats server report connections`).
    pub name: String,
}

impl NatsOptions {
    pub fn new(url: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            urls: vec![url.into()],
            name: name.into(),
            ..Default::default()
        }
    }

    pub fn with_credentials(mut self, user: Option<String>, password: Option<String>) -> Self {
        self.user = user;
        self.password = password;
        self
    }

    /// The inbox prefix of a connection as `user`: `_INBOX_<user>`, the only
    /// inbox nats.conf lets each service user subscribe to (so that one
    /// service cannot read another's replies). A user name that is not one
    /// subject token keeps the default prefix.
    pub fn inbox_prefix(&self) -> Option<String> {
        let user = self.user.as_deref()?;
        let token = !user.is_empty()
            && user
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        token.then(|| format!("_INBOX_{user}"))
    }

    /// Connects, retrying with backoff until a server answers: services start
    /// in any order, and a NATS restart must not turn into a crash loop.
    pub async fn connect(&self) -> anyhow::Result<async_nats::Client> {
        let mut opts = async_nats::ConnectOptions::new()
            .name(&self.name)
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            // Fail over to another node quickly: the first retry at once,
            // then doubling from 50 ms up to 2 s.
            .reconnect_delay_callback(|attempts| {
                let step = attempts.saturating_sub(1).min(6) as u32;
                Duration::from_millis((25u64 << step).min(2_000) * u64::from(attempts > 0))
            })
            // Heartbeat bursts must queue, not be dropped as a slow consumer.
            .subscription_capacity(1 << 16)
            .client_capacity(1 << 14)
            .custom_inbox_prefix(self.inbox_prefix().unwrap_or_else(|| "_INBOX".into()))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("connected to nats"),
                    async_nats::Event::Disconnected => {
                        tracing::warn!("disconnected from nats, reconnecting")
                    }
                    async_nats::Event::SlowConsumer(sid) => {
                        tracing::warn!(subscription = sid, "slow consumer: messages dropped")
                    }
                    other => tracing::info!(event = %other, "nats event"),
                }
            });
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            opts = opts.user_and_password(user.clone(), password.clone());
        }
        let urls: Vec<async_nats::ServerAddr> = self
            .urls
            .iter()
            .map(|u| {
                u.parse::<async_nats::ServerAddr>()
                    .with_context(|| format!("bad nats url {u:?}"))
            })
            .collect::<anyhow::Result<_>>()?;
        anyhow::ensure!(!urls.is_empty(), "no nats url given");
        let client = opts
            .connect(urls.as_slice())
            .await
            .with_context(|| format!("connecting to nats at {}", self.urls.join(",")))?;
        self.wait_connected(&client).await;
        Ok(client)
    }

    /// Connects once, for a command someone is waiting on: every server is
    /// tried once, all within `timeout`, and the first failure to reach any
    /// of them is the answer (a wrong password at once, an unreachable
    /// server after `timeout` at most) instead of [`NatsOptions::connect`]'s
    /// retrying until a server answers. Once connected, the client still
    /// reconnects by itself if the connection drops.
    ///
    /// A bad URL is a [`async_nats::ConnectErrorKind::ServerParse`] error,
    /// running out of time a [`async_nats::ConnectErrorKind::TimedOut`] one.
    pub async fn connect_once(
        &self,
        timeout: Duration,
    ) -> Result<async_nats::Client, async_nats::ConnectError> {
        use async_nats::{ConnectError, ConnectErrorKind};
        let timeout = timeout.max(Duration::from_millis(1));
        let urls: Vec<async_nats::ServerAddr> = self
            .urls
            .iter()
            .map(|u| {
                u.parse::<async_nats::ServerAddr>().map_err(|e| {
                    ConnectError::with_source(
                        ConnectErrorKind::ServerParse,
                        format!("bad nats url {u:?}: {e}"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        if urls.is_empty() {
            return Err(ConnectError::with_source(
                ConnectErrorKind::ServerParse,
                "no nats url given",
            ));
        }
        let mut opts = async_nats::ConnectOptions::new()
            .name(&self.name)
            .custom_inbox_prefix(self.inbox_prefix().unwrap_or_else(|| "_INBOX".into()))
            .connection_timeout(timeout)
            // The first attempt of each server at once; later reconnects
            // (after a drop) back off up to 2 s.
            .reconnect_delay_callback(|attempts| {
                let step = attempts.saturating_sub(1).min(6) as u32;
                Duration::from_millis((25u64 << step).min(2_000) * u64::from(attempts > 1))
            })
            .event_callback(|event| async move {
                tracing::debug!(event = %event, "nats event");
            });
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            opts = opts.user_and_password(user.clone(), password.clone());
        }
        match tokio::time::timeout(timeout, opts.connect(urls.as_slice())).await {
            Ok(result) => result,
            Err(_) => Err(ConnectError::new(ConnectErrorKind::TimedOut)),
        }
    }

    /// Waits until the client has reached a server. The client keeps trying
    /// on its own (with a growing delay between attempts); this only says so
    /// in the log now and then, so that an operator sees why a service is
    /// not ready instead of a crash loop.
    async fn wait_connected(&self, client: &async_nats::Client) {
        use async_nats::connection::State;
        let started = std::time::Instant::now();
        let mut next_log = Duration::from_secs(2);
        while client.connection_state() != State::Connected {
            if started.elapsed() >= next_log {
                tracing::warn!(
                    urls = %self.urls.join(","),
                    waited_secs = started.elapsed().as_secs(),
                    "cannot reach NATS yet; retrying with backoff"
                );
                next_log = started.elapsed() + Duration::from_secs(10);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if started.elapsed() >= Duration::from_secs(2) {
            tracing::info!(waited_secs = started.elapsed().as_secs(), "reached NATS");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(port: u16) -> NatsOptions {
        NatsOptions::new(format!("nats://127.0.0.1:{port}"), "test")
    }

    #[tokio::test]
    async fn connect_once_gives_up_on_a_closed_port() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let started = std::time::Instant::now();
        let err = options(port)
            .connect_once(Duration::from_secs(5))
            .await
            .expect_err("nothing listens there");
        assert_eq!(err.kind(), async_nats::ConnectErrorKind::Io, "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn connect_once_times_out_on_a_silent_server() {
        // Accepts TCP connections (the kernel's backlog) but never says INFO.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = silent.local_addr().expect("addr").port();
        let err = options(port)
            .connect_once(Duration::from_millis(300))
            .await
            .expect_err("the server never answers");
        assert_eq!(err.kind(), async_nats::ConnectErrorKind::TimedOut, "{err}");
        drop(silent);
    }

    #[tokio::test]
    async fn connect_once_rejects_a_bad_url() {
        let opts = NatsOptions::new("nats://[::1", "test");
        let err = opts
            .connect_once(Duration::from_secs(1))
            .await
            .expect_err("not a url");
        assert_eq!(err.kind(), async_nats::ConnectErrorKind::ServerParse);
        let none = NatsOptions::default()
            .connect_once(Duration::from_secs(1))
            .await;
        assert!(none.is_err());
    }
}
