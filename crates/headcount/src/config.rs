//! Flags shared by several commands, each also read from `HEADCOUNT_*`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use headcount_protocol::{Limit, Policy};
use headcount_runtime::{BucketSettings, NatsOptions};
use serde::{Deserialize, Serialize};

/// Where to find NATS.
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS server URL; repeat for a cluster. Default: the one in
    /// <data-dir>/up.json, written by `headcount up`.
    #[arg(long = "nats-url", env = "HEADCOUNT_NATS_URL", value_delimiter = ',')]
    pub nats_urls: Vec<String>,
    /// NATS user (default: the service user from up.json).
    #[arg(long, env = "HEADCOUNT_NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password (default: from up.json).
    #[arg(long, env = "HEADCOUNT_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// Directory holding up.json, keys and the server's store.
    #[arg(long, env = "HEADCOUNT_DATA_DIR", default_value = ".headcount")]
    pub data_dir: PathBuf,
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
    pub fn path(data_dir: &std::path::Path) -> PathBuf {
        data_dir.join("up.json")
    }

    pub fn load(data_dir: &std::path::Path) -> anyhow::Result<Self> {
        let p = Self::path(data_dir);
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "reading {} (start `headcount up` first, or pass --nats-url)",
                p.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    }
}

impl NatsArgs {
    /// Connection options: explicit flags win, then up.json.
    pub fn options(&self, name: &str) -> anyhow::Result<NatsOptions> {
        let up = if self.nats_urls.is_empty() || self.nats_user.is_none() {
            UpInfo::load(&self.data_dir).ok()
        } else {
            None
        };
        let urls = if self.nats_urls.is_empty() {
            // up.json lists every node of a cluster, comma-separated.
            up.as_ref()
                .map(|u| u.nats_url.split(',').map(str::to_owned).collect())
                .context("no --nats-url given and no up.json found: start `headcount up` first")?
        } else {
            self.nats_urls.clone()
        };
        let user = self
            .nats_user
            .clone()
            .or_else(|| up.as_ref().map(|u| u.service_user.clone()));
        let password = self
            .nats_password
            .clone()
            .or_else(|| up.as_ref().map(|u| u.service_password.clone()));
        Ok(NatsOptions {
            urls,
            user,
            password,
            name: name.to_string(),
        })
    }
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
    /// ended session's token cannot connect again before it expires.
    #[arg(long, env = "HEADCOUNT_REVOKED_TTL", default_value = "16m", value_parser = humantime_secs)]
    pub revoked_ttl: Duration,
    /// Heartbeats per second one session may send (per handler); the excess
    /// is dropped and counted.
    #[arg(long, env = "HEADCOUNT_MAX_HEARTBEAT_RATE", default_value_t = 2.0)]
    pub max_heartbeat_rate: f64,
}

impl EngineArgs {
    pub fn buckets(&self) -> BucketSettings {
        BucketSettings {
            replicas: self.replicas.unwrap_or(1),
            sessions_ttl: headcount_protocol::IntervalClock::new(self.interval).dictionary_ttl(),
            revoked_ttl: self.revoked_ttl,
            timeouts_ttl: (self.timeout * 4).max(Duration::from_secs(30)),
            storage: async_nats::jetstream::stream::StorageType::File,
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
