//! Flags: where NATS is (as the `headcount` commands take it, `HEADCOUNT_*`
//! variables included) and durations.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use headcount_runtime::NatsOptions;
use serde::Deserialize;

/// Where to find NATS.
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS server URL; repeat, or comma-separate, for a cluster. Default:
    /// `nats_url` of <data-dir>/up.json, written by `headcount up`.
    #[arg(long = "nats-url", env = "HEADCOUNT_NATS_URL", value_delimiter = ',')]
    pub nats_urls: Vec<String>,
    /// NATS user. Default: `service_user` of <data-dir>/up.json.
    #[arg(long, env = "HEADCOUNT_NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password. Default: `service_password` of <data-dir>/up.json.
    #[arg(long, env = "HEADCOUNT_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// The data directory of `headcount up`, whose up.json gives what is
    /// not given as flags.
    #[arg(long, env = "HEADCOUNT_DATA_DIR", default_value = ".headcount")]
    pub data_dir: PathBuf,
}

/// The part of `headcount up`'s up.json a connection needs.
#[derive(Deserialize)]
struct UpJson {
    nats_url: String,
    service_user: String,
    service_password: String,
}

impl NatsArgs {
    /// Connection options: explicit flags win, then up.json.
    pub fn options(&self, name: &str) -> anyhow::Result<NatsOptions> {
        let up = if self.nats_urls.is_empty() || self.nats_user.is_none() {
            std::fs::read(self.data_dir.join("up.json"))
                .ok()
                .and_then(|text| serde_json::from_slice::<UpJson>(&text).ok())
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
        Ok(NatsOptions {
            urls,
            user: self
                .nats_user
                .clone()
                .or_else(|| up.as_ref().map(|u| u.service_user.clone())),
            password: self
                .nats_password
                .clone()
                .or_else(|| up.as_ref().map(|u| u.service_password.clone())),
            name: name.to_string(),
        })
    }
}

/// `90`, `90s`, `10m` or `1h`: whole seconds, minutes or hours.
pub fn duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("not a duration: {s:?} (e.g. 30s, 10m, 1h)"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("unknown unit in {s:?}: use s, m or h")),
    };
    n.checked_mul(scale)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("too long: {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(duration("5 parsecs").is_err());
        assert!(duration("-1s").is_err());
        assert!(duration("").is_err());
    }
}
