//! What a process needs to run some or all of the services, in one value,
//! checked once by [`Settings::validate`] before anything starts.

use std::net::SocketAddr;
use std::time::Duration;

use headcount_protocol::IntervalClock;
use headcount_runtime::{BucketSettings, NatsOptions};

pub use headcount_runtime::buckets::DEFAULT_REVOKED_TTL;

/// One heartbeat-handler instance.
#[derive(Debug, Clone)]
pub struct HandlerSettings {
    /// How it logs in (its own user, `handler`, on a server of ours).
    pub nats: NatsOptions,
    pub config: heartbeat_handler::Config,
}

/// One checker instance.
#[derive(Debug, Clone)]
pub struct CheckerSettings {
    pub nats: NatsOptions,
    pub config: checker::Config,
}

/// One token-vendor: its endpoint, the auth callout and its HTTP API.
pub struct VendorSettings {
    pub nats: NatsOptions,
    pub config: token_vendor::Config,
    /// Answers the auth callout with this issuer; `None` runs no callout
    /// (devices log in with a shared password: `up --insecure`).
    pub issuer: Option<token_vendor::Issuer>,
    pub browser: token_vendor::BrowserConfig,
    /// The HTTP API (tokens, JWKS, browser endpoints and pages).
    pub http_addr: SocketAddr,
}

impl std::fmt::Debug for VendorSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VendorSettings")
            .field("nats", &self.nats)
            .field("config", &self.config)
            .field("callout", &self.issuer.is_some())
            .field("http_addr", &self.http_addr)
            .finish_non_exhaustive()
    }
}

/// Everything [`crate::App::build`] starts. A process runs any subset:
/// `up` all three (and the console), `headcount handler` a handler alone.
#[derive(Debug, Default)]
pub struct Settings {
    /// The console user: creates the buckets or brings their settings up to
    /// date before the services open them. Without it the services create
    /// only what is missing and change nothing.
    pub console: Option<NatsOptions>,
    /// The buckets' settings. `None` (a token-vendor alone, which knows no
    /// interval) waits for buckets made by the other services.
    pub buckets: Option<BucketSettings>,
    pub handler: Option<HandlerSettings>,
    pub checker: Option<CheckerSettings>,
    pub vendor: Option<VendorSettings>,
    /// `/metrics`, `/healthz` and `/readyz` of every service here. `None`
    /// serves them on the vendor's HTTP listener, or nowhere.
    pub metrics_addr: Option<SocketAddr>,
}

/// Settings that cannot work together, said in the words of the flags.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error(
        "handler and checker disagree on the interval ({handler:?} and {checker:?}): \
         both read the same dictionaries, give them the same --interval"
    )]
    IntervalMismatch {
        handler: Duration,
        checker: Duration,
    },
    #[error(
        "the sessions bucket's TTL ({ttl:?}) is not the one an interval of {interval:?} needs \
         ({wanted:?}): dictionaries would expire while still read"
    )]
    SessionsTtl {
        interval: Duration,
        ttl: Duration,
        wanted: Duration,
    },
    #[error(
        "revocations are kept {revoked_ttl:?} but the handler forgets them after {handler:?}: \
         give both the same --revoked-ttl"
    )]
    RevokedTtlMismatch {
        revoked_ttl: Duration,
        handler: Duration,
    },
    #[error(
        "revocations are kept {revoked_ttl:?}, less than a device token lives ({token_ttl:?}): \
         an ended session's token could connect again; raise --revoked-ttl or lower --token-ttl"
    )]
    RevocationOutlivedByToken {
        revoked_ttl: Duration,
        token_ttl: Duration,
    },
    #[error("the interval must be at least one second (got {0:?})")]
    IntervalTooShort(Duration),
    #[error("nothing to run: no handler, checker or token-vendor")]
    Empty,
}

impl Settings {
    /// The interval the handler or checker here uses.
    pub fn interval(&self) -> Option<Duration> {
        self.handler
            .as_ref()
            .map(|h| h.config.interval)
            .or(self.checker.as_ref().map(|c| c.config.interval))
    }

    /// Checks that what is to run here agrees with itself. Agreement with
    /// services of other processes is checked against the buckets when
    /// they are opened ([`crate::App::build`]).
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.handler.is_none() && self.checker.is_none() && self.vendor.is_none() {
            return Err(SettingsError::Empty);
        }
        if let (Some(h), Some(c)) = (&self.handler, &self.checker)
            && h.config.interval != c.config.interval
        {
            return Err(SettingsError::IntervalMismatch {
                handler: h.config.interval,
                checker: c.config.interval,
            });
        }
        if let Some(interval) = self.interval()
            && interval < Duration::from_secs(1)
        {
            return Err(SettingsError::IntervalTooShort(interval));
        }
        if let Some(b) = &self.buckets {
            if let Some(interval) = self.interval() {
                check_sessions_ttl(interval, b.sessions_ttl)?;
            }
            if let Some(h) = &self.handler
                && h.config.revoked_ttl != b.revoked_ttl
            {
                return Err(SettingsError::RevokedTtlMismatch {
                    revoked_ttl: b.revoked_ttl,
                    handler: h.config.revoked_ttl,
                });
            }
            if let Some(v) = &self.vendor
                && v.config.token_ttl > b.revoked_ttl
            {
                return Err(SettingsError::RevocationOutlivedByToken {
                    revoked_ttl: b.revoked_ttl,
                    token_ttl: v.config.token_ttl,
                });
            }
        }
        Ok(())
    }
}

/// Whether a sessions bucket whose entries live `ttl` serves an interval
/// of `interval` (see [`IntervalClock::dictionary_ttl`]).
pub fn check_sessions_ttl(interval: Duration, ttl: Duration) -> Result<(), SettingsError> {
    let wanted = IntervalClock::new(interval).dictionary_ttl();
    if ttl == wanted {
        Ok(())
    } else {
        Err(SettingsError::SessionsTtl {
            interval,
            ttl,
            wanted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nats() -> NatsOptions {
        NatsOptions::new("nats://127.0.0.1:4222".to_string(), "t")
    }

    fn engine(interval: Duration) -> Settings {
        Settings {
            buckets: Some(BucketSettings {
                sessions_ttl: IntervalClock::new(interval).dictionary_ttl(),
                revoked_ttl: DEFAULT_REVOKED_TTL,
                ..BucketSettings::default()
            }),
            handler: Some(HandlerSettings {
                nats: nats(),
                config: heartbeat_handler::Config {
                    interval,
                    revoked_ttl: DEFAULT_REVOKED_TTL,
                    ..Default::default()
                },
            }),
            checker: Some(CheckerSettings {
                nats: nats(),
                config: checker::Config {
                    interval,
                    ..Default::default()
                },
            }),
            ..Settings::default()
        }
    }

    #[test]
    fn a_consistent_engine_passes() {
        assert_eq!(engine(Duration::from_secs(120)).validate(), Ok(()));
    }

    /// A deployment whose vendor issues tokens living `token_ttl`.
    fn with_vendor(mut s: Settings, token_ttl: Duration) -> Settings {
        let mut config = token_vendor::Config::new("/nonexistent", "key");
        config.token_ttl = token_ttl;
        s.vendor = Some(VendorSettings {
            nats: nats(),
            config,
            issuer: None,
            browser: token_vendor::BrowserConfig {
                websocket_urls: Vec::new(),
                heartbeat_every: Duration::from_secs(5),
                demo_tokens: false,
                web_dir: None,
            },
            http_addr: "127.0.0.1:0".parse().expect("addr"),
        });
        s
    }

    #[test]
    fn each_disagreement_is_refused_by_name() {
        type Change = fn(&mut Settings);
        type Expected = fn(&SettingsError) -> bool;
        let cases: [(&str, Change, Expected); 4] = [
            (
                "checker of another interval",
                |s| {
                    if let Some(c) = s.checker.as_mut() {
                        c.config.interval = Duration::from_secs(60);
                    }
                },
                |e| matches!(e, SettingsError::IntervalMismatch { .. }),
            ),
            (
                "sessions TTL of another interval",
                |s| {
                    if let Some(b) = s.buckets.as_mut() {
                        b.sessions_ttl =
                            IntervalClock::new(Duration::from_secs(10)).dictionary_ttl();
                    }
                },
                |e| matches!(e, SettingsError::SessionsTtl { .. }),
            ),
            (
                "handler forgetting revocations early",
                |s| {
                    if let Some(h) = s.handler.as_mut() {
                        h.config.revoked_ttl = Duration::from_secs(60);
                    }
                },
                |e| matches!(e, SettingsError::RevokedTtlMismatch { .. }),
            ),
            (
                "tokens outliving their revocation",
                |s| *s = with_vendor(std::mem::take(s), DEFAULT_REVOKED_TTL * 2),
                |e| matches!(e, SettingsError::RevocationOutlivedByToken { .. }),
            ),
        ];
        for (what, change, expected) in cases {
            let mut s = engine(Duration::from_secs(120));
            change(&mut s);
            let e = s.validate().expect_err(what);
            assert!(expected(&e), "{what}: {e}");
        }
        // A vendor whose tokens end before their revocation does is fine.
        let s = with_vendor(engine(Duration::from_secs(120)), DEFAULT_REVOKED_TTL);
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn nothing_to_run_is_an_error() {
        assert_eq!(Settings::default().validate(), Err(SettingsError::Empty));
    }
}
