//! Flags shared by several commands, each also read from `HEADCOUNT_*`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use headcount_protocol::{Limit, Policy};
use headcount_runtime::{BucketSettings, NatsOptions};
use serde::{Deserialize, Serialize};

use crate::exit::CliError;

pub use headcount_app::cli::NatsArgs;

/// Where a query command connects, and where that came from (for its
/// messages).
#[derive(Debug, Clone)]
pub struct NatsTarget {
    pub options: NatsOptions,
    /// Where the URLs came from: `--nats-url`, `HEADCOUNT_NATS_URL` or the
    /// absolute path of the up.json read.
    pub url_from: String,
    /// Where the user and password came from, when there are any.
    pub credentials_from: Option<String>,
}

/// What `headcount up` writes for tools and tests: how to reach everything.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpInfo {
    pub nats_url: String,
    pub http_url: String,
    pub metrics_url: String,
    pub service_user: String,
    pub service_password: String,
    pub operator_key: String,
    /// Public key the server trusts for auth callout responses; empty when
    /// `up` runs with `--insecure`.
    pub callout_issuer: String,
    /// Where browsers reach NATS (WebSocket URLs, comma-separated).
    #[serde(default)]
    pub websocket_url: String,
    /// Set by `up --insecure`: devices share the `device` user instead of
    /// connecting with tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure_device_password: Option<String>,
}

impl UpInfo {
    pub fn path(data_dir: &Path) -> PathBuf {
        headcount_app::cli::up_json(data_dir)
    }

    /// [`UpInfo::read`] for commands that report errors with anyhow.
    pub fn load(data_dir: &Path) -> anyhow::Result<Self> {
        Ok(Self::read(data_dir)?)
    }

    /// Reads <data_dir>/up.json. Missing, unreadable or not up.json is a
    /// usage error naming the absolute path looked at and what to do.
    pub fn read(data_dir: &Path) -> Result<Self, CliError> {
        let p = absolute(&Self::path(data_dir));
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut msg = format!(
                    "no up.json at {}: start `headcount up` (it writes up.json into its \
                     --data-dir), pass --data-dir (or HEADCOUNT_DATA_DIR) naming the data dir \
                     of the `headcount up` you mean, or pass --nats-url",
                    p.display()
                );
                if let Some(found) = up_json_above(data_dir) {
                    msg.push_str(&format!(
                        " (there is one at {}: --data-dir {})",
                        found.display(),
                        found.parent().unwrap_or(&found).display()
                    ));
                }
                return Err(CliError::usage(msg).with("path", p.display().to_string()));
            }
            Err(e) => {
                return Err(CliError::usage(format!("cannot read {}: {e}", p.display()))
                    .with("path", p.display().to_string()));
            }
        };
        serde_json::from_str(&text).map_err(|e| {
            CliError::usage(format!(
                "{} is not an up.json written by `headcount up`: {e}",
                p.display()
            ))
            .with("path", p.display().to_string())
        })
    }
}

/// `path` made absolute from the working directory (not resolving links).
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// An up.json under a relative `data_dir` of a directory above the working
/// one (a command run in a subdirectory of the checkout `up` runs in).
fn up_json_above(data_dir: &Path) -> Option<PathBuf> {
    if data_dir.is_absolute() {
        return None;
    }
    let cwd = std::env::current_dir().ok()?;
    cwd.ancestors()
        .skip(1)
        .map(|dir| UpInfo::path(&dir.join(data_dir)))
        .find(|p| p.is_file())
}

impl NatsTarget {
    /// Where a query command connects: flags (or their variables) win,
    /// then <data-dir>/up.json. Without a URL from either, the error names
    /// the up.json looked for.
    pub fn of(nats: &NatsArgs, name: &str) -> Result<NatsTarget, CliError> {
        let up_path = absolute(&UpInfo::path(&nats.data_dir))
            .display()
            .to_string();
        let up = if nats.nats_urls.is_empty() {
            Some(UpInfo::read(&nats.data_dir)?)
        } else if nats.nats_user.is_none() || nats.nats_password.is_none() {
            // Only the credentials are missing: up.json's, if there is one.
            UpInfo::read(&nats.data_dir).ok()
        } else {
            None
        };
        let (urls, url_from) = if nats.nats_urls.is_empty() {
            let u = up.as_ref().map(|u| u.nats_url.as_str()).unwrap_or_default();
            // up.json lists every node of a cluster, comma-separated.
            let urls: Vec<String> = u
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            if urls.is_empty() {
                return Err(
                    CliError::usage(format!("{up_path} names no NATS URL (`nats_url`)"))
                        .with("path", up_path),
                );
            }
            (urls, up_path.clone())
        } else {
            (
                nats.nats_urls.clone(),
                flag_or_env(
                    "--nats-url",
                    "HEADCOUNT_NATS_URL",
                    &nats.nats_urls.join(","),
                ),
            )
        };
        let (user, password, credentials_from) = match (&nats.nats_user, &nats.nats_password) {
            (Some(user), Some(password)) => {
                let from = flag_or_env("--nats-user", "HEADCOUNT_NATS_USER", user);
                (Some(user.clone()), Some(password.clone()), Some(from))
            }
            (user, password) => match &up {
                Some(u) => (
                    Some(user.clone().unwrap_or_else(|| u.service_user.clone())),
                    Some(
                        password
                            .clone()
                            .unwrap_or_else(|| u.service_password.clone()),
                    ),
                    Some(up_path.clone()),
                ),
                None => (user.clone(), password.clone(), None),
            },
        };
        Ok(NatsTarget {
            options: NatsOptions {
                urls,
                user,
                password,
                name: name.to_string(),
            },
            url_from,
            credentials_from,
        })
    }

    /// The URLs, comma-separated.
    pub fn urls(&self) -> String {
        self.options.urls.join(",")
    }
}

/// `env` when the value came from that variable (it is set to `value`;
/// several values comma-separated), else `flag`. clap prefers the flag when
/// both are given, so a variable holding something else means the flag.
pub fn flag_or_env(flag: &str, env: &str, value: &str) -> String {
    let from_env = std::env::var(env).is_ok_and(|v| v == value);
    if from_env { env } else { flag }.to_string()
}

/// The plans accounts can be put on.
#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    /// A plan: `name=limit[,policy=P][,per-content=N][,grace=SEATS/SECS]`;
    /// repeat for more (in the environment, separate them with `;`).
    /// Default: basic=1, standard=2, premium=4.
    #[arg(long = "plan", env = "HEADCOUNT_PLANS", value_delimiter = ';', value_parser = parse_plan_arg)]
    pub plans: Vec<(String, Limit)>,
}

fn parse_plan_arg(s: &str) -> Result<(String, Limit), String> {
    headcount_protocol::policy::parse_plan(s)
}

impl PlanArgs {
    pub fn plans(&self) -> headcount_protocol::Plans {
        if self.plans.is_empty() {
            headcount_protocol::policy::default_plans()
        } else {
            self.plans.iter().cloned().collect()
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.plans().into_keys().collect()
    }
}

/// Timings and limits shared by the handler and the checker.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Length of one interval dictionary (handler and checker must agree).
    #[arg(long, env = "HEADCOUNT_INTERVAL", default_value = "120s", value_parser = humantime_secs)]
    pub interval: Duration,
    /// A session not heard from for this long drops out (3 missed beats of 5 s).
    #[arg(long, env = "HEADCOUNT_TIMEOUT", default_value = "15s", value_parser = humantime_secs)]
    pub timeout: Duration,
    /// Limit of accounts with no limit of their own.
    #[arg(long, env = "HEADCOUNT_DEFAULT_LIMIT", default_value_t = 3)]
    pub default_limit: u32,
    /// Policy of accounts with no policy of their own.
    #[arg(long, env = "HEADCOUNT_DEFAULT_POLICY", default_value = "evict-oldest")]
    pub default_policy: Policy,
    /// KV replicas per bucket: 1 on one server, 3 on a cluster (default: 1,
    /// or 3 with `up --cluster`). Existing buckets are updated to it.
    #[arg(long, env = "HEADCOUNT_REPLICAS")]
    pub replicas: Option<usize>,
    /// How long a revocation is kept: at least the token lifetime, so an
    /// ended session's token cannot connect again before it expires
    /// (`up` refuses a --token-ttl longer than this).
    #[arg(long, env = "HEADCOUNT_REVOKED_TTL", default_value = "16m", value_parser = humantime_secs)]
    pub revoked_ttl: Duration,
    /// Heartbeats per second one session may send (per handler); the excess
    /// is dropped and counted.
    #[arg(long, env = "HEADCOUNT_MAX_HEARTBEAT_RATE", default_value_t = 2.0)]
    pub max_heartbeat_rate: f64,
    /// How many checkers hold each partition's sessions: with more
    /// checkers running than this, each holds only its share.
    #[arg(long, env = "HEADCOUNT_CHECKER_COPIES", default_value_t = checker::DEFAULT_COPIES as u8,
          value_parser = clap::value_parser!(u8).range(1..=32))]
    pub checker_copies: u8,
    /// How many KV buckets (streams) the partitions' dictionaries are
    /// spread over: on a cluster each has a leader of its own, so their
    /// writes spread over the servers. The same everywhere; existing
    /// buckets are never re-spread (docs/OPERATIONS.md, "Scaling").
    #[arg(long, env = "HEADCOUNT_SESSIONS_BUCKETS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(headcount_protocol::subjects::kv::MAX_SESSIONS_BUCKETS)))]
    pub sessions_buckets: u32,
}

impl EngineArgs {
    pub fn buckets(&self) -> BucketSettings {
        BucketSettings {
            replicas: self.replicas.unwrap_or(1),
            sessions_ttl: headcount_protocol::IntervalClock::new(self.interval).dictionary_ttl(),
            revoked_ttl: self.revoked_ttl,
            timeouts_ttl: headcount_runtime::buckets::timeouts_ttl(self.interval, self.timeout),
            storage: async_nats::jetstream::stream::StorageType::File,
            sessions_buckets: self.sessions_buckets,
        }
    }

    pub fn handler(&self) -> heartbeat_handler::Config {
        heartbeat_handler::Config {
            interval: self.interval,
            revoked_ttl: self.revoked_ttl,
            max_rate: self.max_heartbeat_rate,
            carry_delay: (self.interval / 10).min(Duration::from_secs(5)),
            ..Default::default()
        }
    }

    pub fn checker(&self, plans: &PlanArgs) -> anyhow::Result<checker::Config> {
        let default_limit = Limit::new(self.default_limit as i64, self.default_policy)?;
        Ok(checker::Config {
            interval: self.interval,
            timeout: self.timeout,
            default_limit,
            plans: plans.plans(),
            copies: usize::from(self.checker_copies),
            ..Default::default()
        })
    }
}

/// Parses `250ms`, `5s`, `2m`, `1h` or a bare number of seconds.
pub fn humantime_secs(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("not a duration: {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit in {s:?}: use ms, s, m or h")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("not a duration: {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_revoked_ttl_flag_defaults_to_the_one_default() {
        assert_eq!(
            humantime_secs("16m"),
            Ok(headcount_app::settings::DEFAULT_REVOKED_TTL)
        );
    }

    #[test]
    fn durations() {
        assert_eq!(humantime_secs("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(humantime_secs("5"), Ok(Duration::from_secs(5)));
        assert_eq!(humantime_secs("2m"), Ok(Duration::from_secs(120)));
        assert!(humantime_secs("5 parsecs").is_err());
        assert!(humantime_secs("-1s").is_err());
    }
}

/// Browser devices and the pages.
#[derive(Debug, Clone, Args)]
pub struct BrowserArgs {
    /// NATS WebSocket URL as browsers reach it (repeat, or comma-separate,
    /// for several). `headcount up` defaults to the listener it starts.
    #[arg(
        long = "websocket-url",
        env = "HEADCOUNT_WEBSOCKET_URL",
        value_delimiter = ','
    )]
    pub websocket_urls: Vec<String>,
    /// How often browser devices heartbeat (keep it well inside --timeout).
    #[arg(long, env = "HEADCOUNT_BROWSER_HEARTBEAT", default_value = "5s", value_parser = humantime_secs)]
    pub browser_heartbeat: Duration,
    /// Hand a device token to anyone at POST /v1/demo/tokens, no key needed:
    /// for local demos only (`up --demo` turns it on).
    #[arg(long)]
    pub demo_tokens: bool,
    /// Serve the browser pages (/demo/, /live/) from this directory, the
    /// output of `npm --prefix web run build` (`up` looks for web/dist).
    #[arg(long, env = "HEADCOUNT_WEB_DIR")]
    pub web_dir: Option<PathBuf>,
    /// POST /v1/tokens/refresh requests per client address (RATE/s,BURST:
    /// BURST at once, then RATE a second; `off` for no limit); above it, 429
    /// with Retry-After. Browsers behind one NAT address share it.
    #[arg(
        long,
        env = "HEADCOUNT_REFRESH_LIMIT",
        default_value_t = token_vendor::ThrottleConfig::default().refresh
    )]
    pub refresh_limit: token_vendor::Rate,
    /// POST /v1/sessions/leave requests per client address (RATE/s,BURST;
    /// `off` for no limit).
    #[arg(
        long,
        env = "HEADCOUNT_LEAVE_LIMIT",
        default_value_t = token_vendor::ThrottleConfig::default().leave
    )]
    pub leave_limit: token_vendor::Rate,
    /// POST /v1/demo/tokens requests per client address (RATE/s,BURST;
    /// `off` for no limit).
    #[arg(
        long,
        env = "HEADCOUNT_DEMO_TOKEN_LIMIT",
        default_value_t = token_vendor::ThrottleConfig::default().demo_tokens
    )]
    pub demo_token_limit: token_vendor::Rate,
}

impl BrowserArgs {
    /// The token-vendor's browser configuration; `default_ws` when no
    /// WebSocket URL was given.
    pub fn config(&self, default_ws: Vec<String>, demo: bool) -> token_vendor::BrowserConfig {
        let web_dir = self.web_dir.clone().filter(|d| {
            let ok = d.join("demo").join("index.html").is_file();
            if !ok {
                tracing::warn!(dir = %d.display(), "no built pages there (npm --prefix web run build): /demo/ and /live/ are not served");
            }
            ok
        });
        token_vendor::BrowserConfig {
            websocket_urls: if self.websocket_urls.is_empty() {
                default_ws
            } else {
                self.websocket_urls.clone()
            },
            heartbeat_every: self.browser_heartbeat,
            demo_tokens: self.demo_tokens || demo,
            web_dir,
        }
    }
}
