//! The processes of a run: a nats-server ([`Env`]) and, next to it, each
//! service as its own `headcount` process and each baseline as this
//! binary's `sink` or `echo` ([`Proc`]); their metrics and memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::AsyncBufReadExt;

/// The `headcount` binary whose services a run starts: `given`, or the one
/// next to this executable, where `cargo build -p headcount` puts it in the
/// same target directory.
pub fn headcount_bin(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(path) => path,
        None => std::env::current_exe()
            .context("finding this executable")?
            .with_file_name(format!("headcount{}", std::env::consts::EXE_SUFFIX)),
    };
    anyhow::ensure!(
        path.is_file(),
        "no headcount binary at {}: build it next to this one (`cargo build --release -p headcount`, \
         or without --release for a debug build) or name one with --headcount-bin",
        path.display()
    );
    Ok(path)
}

/// A child process of a run, with its `/metrics` URL (services) or its
/// stdout lines (baselines).
pub struct Proc {
    pub child: tokio::process::Child,
    pub metrics: Option<String>,
    pub stdout: Option<tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>>,
    /// Where its stderr goes (services), for the reason it stopped.
    pub log: Option<PathBuf>,
}

impl Proc {
    fn spawn(
        exe: &Path,
        args: &[String],
        env: &[(&str, &str)],
        metrics: Option<String>,
        log: Option<PathBuf>,
    ) -> anyhow::Result<Proc> {
        let stderr = match &log {
            Some(path) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?
                .into(),
            None => Stdio::null(),
        };
        let mut cmd = tokio::process::Command::new(exe);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let stdout = child
            .stdout
            .take()
            .map(|s| tokio::io::BufReader::new(s).lines());
        Ok(Proc {
            child,
            metrics,
            stdout,
            log,
        })
    }

    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().context("process gone")
    }

    pub async fn line(&mut self) -> anyhow::Result<String> {
        let lines = self.stdout.as_mut().context("no stdout")?;
        tokio::time::timeout(Duration::from_secs(120), lines.next_line())
            .await
            .context("child said nothing for 120 s")??
            .context("child exited")
    }

    pub async fn metrics(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        let url = self.metrics.as_deref().context("no metrics")?;
        let text = reqwest::get(url).await?.text().await?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect())
    }

    pub async fn wait_metrics(
        &self,
        what: &str,
        pred: impl Fn(&BTreeMap<String, f64>) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Ok(m) = self.metrics().await
                && pred(&m)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{what}: not reached in 600 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until a handler or checker is ready: its `/readyz` (next to
    /// its `/metrics`, which it serves from the start) answers 200 once it
    /// is connected, has replayed the buckets and is serving. One that
    /// exits instead (a flag or a bucket it refuses) fails the run at once,
    /// with the end of its log.
    pub async fn wait_up(&mut self, which: &str) -> anyhow::Result<()> {
        let metrics = self.metrics.clone().context("no metrics")?;
        let url = format!("{}/readyz", metrics.trim_end_matches("/metrics"));
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Ok(r) = reqwest::get(&url).await
                && r.status().is_success()
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                let tail = self
                    .log
                    .as_deref()
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .filter(|text| !text.trim().is_empty())
                    .map(|text| {
                        let lines: Vec<&str> = text.lines().collect();
                        format!(":\n{}", lines[lines.len().saturating_sub(5)..].join("\n"))
                    })
                    .unwrap_or_default();
                bail!("{which} exited ({status}){tail}");
            }
            if Instant::now() > deadline {
                bail!("{which} up: not ready in 600 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until a handler serves metrics and hears heartbeats: its
    /// metrics appear before its subscription does, and heartbeats published
    /// in between would be lost. It publishes a heartbeat with an invalid
    /// account name (counted `invalid`, recorded nowhere) until the handler
    /// has counted one.
    pub async fn wait_handler(&mut self, nats: &async_nats::Client) -> anyhow::Result<()> {
        self.wait_up("handler").await?;
        let probe = format!(
            "hb.{}.bench.probe",
            "x".repeat(headcount_protocol::names::MAX_NAME_LEN + 1)
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            nats.publish(probe.clone(), bytes::Bytes::new()).await?;
            nats.flush().await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let m = self.metrics().await?;
            if m.get(r#"headcount_heartbeats_total{result="invalid"}"#)
                .copied()
                .unwrap_or(0.0)
                >= 1.0
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the handler did not hear heartbeats within 60 s");
            }
        }
    }

    pub async fn stop(mut self) {
        headcount_app::server::terminate(&mut self.child, Duration::from_secs(15)).await;
    }
}

/// The sum of every series whose name (labels included) starts with `prefix`.
pub fn sum_prefix(m: &BTreeMap<String, f64>, prefix: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

/// A nats-server and the credentials to reach it.
pub struct Env {
    pub nats: headcount_app::server::NatsProcess,
    pub url: String,
    password: String,
    dir: PathBuf,
    /// The `headcount` binary the services run from.
    pub headcount: PathBuf,
}

impl Env {
    pub async fn start(dir: &Path, headcount: &Path) -> anyhow::Result<Env> {
        std::fs::create_dir_all(dir)?;
        let secrets = headcount_app::secrets::load_secrets(dir)?;
        let passwords = secrets.passwords();
        let issuer = token_vendor::Issuer::open(dir)?;
        let port = free_port()?;
        let keys = headcount_app::server::CalloutKeys::of(&issuer);
        let launch = headcount_app::server::Launch {
            passwords: &passwords,
            keys: Some(&keys),
            bind: std::net::Ipv4Addr::LOCALHOST.into(),
        };
        let nats =
            headcount_app::server::NatsProcess::start(dir, (port, free_port()?), launch).await?;
        Ok(Env {
            nats,
            url: format!("nats://127.0.0.1:{port}"),
            password: secrets.service_password.clone(),
            dir: dir.to_path_buf(),
            headcount: headcount.to_path_buf(),
        })
    }

    pub fn nats_args(&self) -> Vec<String> {
        vec![
            "--nats-url".into(),
            self.url.clone(),
            "--nats-user".into(),
            "headcount".into(),
            "--data-dir".into(),
            self.dir.display().to_string(),
        ]
    }

    pub fn env(&self) -> Vec<(&'static str, &str)> {
        vec![("HEADCOUNT_NATS_PASSWORD", self.password.as_str())]
    }

    pub async fn client(&self, name: &str) -> anyhow::Result<async_nats::Client> {
        headcount_runtime::NatsOptions {
            urls: vec![self.url.clone()],
            user: Some("headcount".into()),
            password: Some(self.password.clone()),
            name: name.into(),
        }
        .connect()
        .await
    }

    /// A connection for one ingest publisher: the console user like
    /// [`Env::client`], but the client does not check each subject it is
    /// given (the publishers' subjects are built and checked once, see
    /// `measure::Beats`), and its queue to the connection holds as many
    /// messages as a service's.
    pub async fn publisher(&self, name: &str) -> anyhow::Result<async_nats::Client> {
        async_nats::ConnectOptions::with_user_and_password(
            "headcount".into(),
            self.password.clone(),
        )
        .name(name)
        .skip_subject_validation(true)
        .client_capacity(1 << 14)
        .connect(self.url.as_str())
        .await
        .with_context(|| format!("connecting {name} to {}", self.url))
    }

    pub fn service(&self, which: &str, extra: &[&str]) -> anyhow::Result<Proc> {
        let port = free_port()?;
        let listen = ["--metrics-addr".into(), format!("127.0.0.1:{port}")];
        self.command(which, &listen, extra, port)
    }

    /// `headcount up` on this server instead of one of its own: the
    /// handler, checker and token-vendor in one process, as a single-machine
    /// deployment runs them, its listeners on free ports.
    pub fn up(&self, extra: &[&str]) -> anyhow::Result<Proc> {
        let (http, metrics) = (free_port()?, free_port()?);
        let listen = [
            "--http-port".into(),
            http.to_string(),
            "--metrics-port".into(),
            metrics.to_string(),
        ];
        self.command("up", &listen, extra, metrics)
    }

    /// `headcount <command>` on this server, with its listeners and `extra`
    /// flags, its /metrics on `metrics_port`, its log in `<command>.log`.
    fn command(
        &self,
        command: &str,
        listen: &[String],
        extra: &[&str],
        metrics_port: u16,
    ) -> anyhow::Result<Proc> {
        let mut args = vec![command.to_string()];
        args.extend(self.nats_args());
        args.extend(listen.iter().cloned());
        args.extend(extra.iter().map(|s| s.to_string()));
        Proc::spawn(
            &self.headcount,
            &args,
            &self.env(),
            Some(format!("http://127.0.0.1:{metrics_port}/metrics")),
            Some(self.dir.join(format!("{command}.log"))),
        )
    }

    pub async fn baseline(&self, kind: &str, extra: &[String]) -> anyhow::Result<Proc> {
        let mut args = vec![kind.to_string()];
        args.extend(self.nats_args());
        args.extend(extra.iter().cloned());
        let mut p = Proc::spawn(&std::env::current_exe()?, &args, &self.env(), None, None)?;
        let ready = p.line().await?;
        anyhow::ensure!(ready == "ready", "{kind} said {ready:?}");
        Ok(p)
    }
}

/// Where a run keeps its servers' and services' files: the directory given
/// (`--dir`), else a new temporary one, removed when the returned guard is
/// dropped (hold it for the whole run).
pub fn scratch_dir(given: Option<&Path>) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    match given {
        Some(dir) => Ok((dir.to_path_buf(), None)),
        None => {
            let tmp = tempfile::tempdir()?;
            Ok((tmp.path().to_path_buf(), Some(tmp)))
        }
    }
}

/// A TCP port free on 127.0.0.1 just now.
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Resident memory of process `pid` (Linux).
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("reading /proc (memory figures need Linux)")?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/<pid>/status")?;
    Ok(kb * 1024)
}

/// What `nats-server --version` says, for the report's first line.
pub fn nats_version() -> String {
    std::process::Command::new("nats-server")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "?".into())
}
