//! What the command-line programs (`headcount`, `headcount-bench`) share:
//! the flags that say where NATS is, and how a command's `main` gets its
//! runtime and ends.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
    /// NATS user. Default: `service_user` of <data-dir>/up.json (the
    /// console user `headcount`).
    #[arg(long, env = "HEADCOUNT_NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password. Default: `service_password` of <data-dir>/up.json.
    #[arg(long, env = "HEADCOUNT_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// The data directory of `headcount up`: its up.json gives the NATS URL,
    /// user and password not given as flags (token-vendor also keeps its
    /// keys there). A relative path is taken from the working directory.
    #[arg(long, env = "HEADCOUNT_DATA_DIR", default_value = ".headcount")]
    pub data_dir: PathBuf,
}

/// Where `headcount up` writes what it started (up.json) in its data dir.
pub fn up_json(data_dir: &Path) -> PathBuf {
    data_dir.join("up.json")
}

/// The part of up.json a connection needs.
#[derive(Deserialize)]
struct UpConnection {
    nats_url: String,
    service_user: String,
    service_password: String,
}

impl NatsArgs {
    /// Connection options: explicit flags win, then up.json.
    pub fn options(&self, name: &str) -> anyhow::Result<NatsOptions> {
        let up = if self.nats_urls.is_empty() || self.nats_user.is_none() {
            std::fs::read(up_json(&self.data_dir))
                .ok()
                .and_then(|text| serde_json::from_slice::<UpConnection>(&text).ok())
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

/// The multi-threaded runtime a command runs on, or the exit status of a
/// command that could not have one (the reason is on stderr).
pub fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: starting runtime: {e}");
            ExitCode::FAILURE
        })
}

/// The exit status of a command whose errors all mean the same: 1, with
/// the error and its causes on stderr.
pub fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
