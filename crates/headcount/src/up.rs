//! `headcount up`: nats-server (unless `--nats-url` names a running one),
//! then every service in this process, then `<data-dir>/up.json` and a line
//! containing `ready`. SIGTERM or Ctrl-C stops all of it, nats-server too;
//! so does SIGKILL, through the parent-death signal (see [`nats_command`]).
//!
//! Before it starts anything, `up` locks its data dir (a second `up` on it
//! leaves at once, see [`crate::lock`]), refuses a store whose nats-server
//! is still running, and checks that every port it will listen on is free.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use headcount_runtime::secret::{
    create_private_dir, is_random_secret, random_secret, write_private,
};
use headcount_runtime::{Buckets, NatsOptions, Shutdown, http, shutdown};
use serde::{Deserialize, Serialize};

use crate::config::{BrowserArgs, EngineArgs, PlanArgs, UpInfo};
use crate::lock::{self, DataDirLock};
use crate::services::TokenArgs;
use crate::simulate::{FleetAccess, FleetSpec, FleetStats, fleet};

/// The server configuration shipped with this build.
const NATS_CONF: &str = include_str!("../../../nats.conf");
/// The configuration of `--insecure`: no device authentication.
const NATS_CONF_INSECURE: &str = include_str!("../../../deploy/nats-insecure.conf");
/// One node of a cluster: the configuration above plus the cluster block.
const NATS_CLUSTER_NODE: &str = include_str!("../../../deploy/cluster/node.conf");

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Use this running NATS server instead of starting one (repeat for a cluster).
    #[arg(long = "nats-url", env = "HEADCOUNT_NATS_URL", value_delimiter = ',')]
    nats_urls: Vec<String>,
    /// User for --nats-url (default: `headcount`, the console user).
    #[arg(long, env = "HEADCOUNT_NATS_USER")]
    nats_user: Option<String>,
    /// Password for --nats-url (default: the console password generated in
    /// <data-dir>).
    #[arg(long, env = "HEADCOUNT_NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    /// Client port of the nats-server started here (with --cluster, of the
    /// first node; the others take the next ports).
    #[arg(long, env = "HEADCOUNT_NATS_PORT", default_value_t = 4222)]
    nats_port: u16,
    /// Start a JetStream cluster of this many nodes on 127.0.0.1 instead of
    /// one server (3 or 5), with the buckets replicated 3 times.
    #[arg(long, value_parser = clap::value_parser!(u16).range(3..=5))]
    cluster: Option<u16>,
    /// With --cluster: route port of the first node (the others take the
    /// next).
    #[arg(long, default_value_t = 6222)]
    cluster_port: u16,
    /// With --cluster: monitoring port (/healthz) of the first node (the
    /// others take the next).
    #[arg(long, default_value_t = 8222)]
    monitor_port: u16,
    /// WebSocket port (browser devices) of the nats-server started here
    /// [default: 4223; with --cluster, the first port after the nodes'
    /// client ports (4225 for three nodes from 4222), the others take the
    /// next ports].
    #[arg(long, env = "HEADCOUNT_WS_PORT")]
    ws_port: Option<u16>,
    /// Port of token-vendor's HTTP API: tokens, the JWKS, the browser
    /// endpoints and pages (/demo/, /live/).
    #[arg(long, env = "HEADCOUNT_HTTP_PORT", default_value_t = 8080)]
    http_port: u16,
    /// Port of /metrics (all services of this process).
    #[arg(long, env = "HEADCOUNT_METRICS_PORT", default_value_t = 9090)]
    metrics_port: u16,
    /// Address every listener started here binds to: NATS (client and
    /// WebSocket), the HTTP API and /metrics.
    #[arg(long, env = "HEADCOUNT_BIND", default_value = "127.0.0.1")]
    bind: std::net::IpAddr,
    /// Keys, secrets, the server's store and up.json live here.
    #[arg(long, env = "HEADCOUNT_DATA_DIR", default_value = ".headcount")]
    data_dir: PathBuf,
    /// Add a simulated fleet so the numbers move, and hand out demo tokens
    /// to the demo page (--demo-tokens).
    #[arg(long)]
    demo: bool,
    /// Let devices in WITHOUT tokens (one shared device password, any
    /// heartbeat subject): for local experiments only.
    #[arg(long)]
    insecure: bool,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    plans: PlanArgs,
    #[command(flatten)]
    tokens: TokenArgs,
    #[command(flatten)]
    browser: BrowserArgs,
}

/// Secrets generated on first run and kept in the data dir (mode 0600), each
/// made by [`random_secret`].
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct Secrets {
    /// The console user `headcount` (CLI, `up` itself): the whole of the
    /// services' account.
    pub(crate) service_password: String,
    /// Each service's own user, with only what it uses.
    #[serde(default = "random_secret")]
    pub(crate) handler_password: String,
    #[serde(default = "random_secret")]
    pub(crate) checker_password: String,
    #[serde(default = "random_secret")]
    pub(crate) vendor_password: String,
    /// Used only with `--insecure`.
    device_password: String,
    operator_key: String,
}

/// Never prints the values.
impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets").finish_non_exhaustive()
    }
}

/// The secrets of `<dir>/secrets.json`, made (and saved) when there is none.
/// A file another user could have planted or changed (not this user's or
/// root's, or writable by others, see
/// [`headcount_runtime::secret::read_private`]) stops the start.
pub(crate) fn load_secrets(dir: &Path) -> anyhow::Result<Secrets> {
    let path = dir.join("secrets.json");
    if let Some(text) = headcount_runtime::secret::read_private(&path)? {
        let parsed: serde_json::Value =
            serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
        let mut s: Secrets = serde_json::from_value(parsed.clone())
            .with_context(|| format!("parsing {}", path.display()))?;
        // Secrets this generator did not make are replaced: NUID-made ones
        // (guessable from a session id or two) and ones nats-server may
        // misread. `up` hands the server its passwords at every start, so
        // only a copy taken from an older up.json goes stale.
        let mut replaced = Vec::new();
        for (name, secret) in [
            ("service_password", &mut s.service_password),
            ("handler_password", &mut s.handler_password),
            ("checker_password", &mut s.checker_password),
            ("vendor_password", &mut s.vendor_password),
            ("device_password", &mut s.device_password),
            ("operator_key", &mut s.operator_key),
        ] {
            if !is_random_secret(secret) {
                *secret = random_secret();
                replaced.push(name);
            }
        }
        // One the file lacked was just made (serde default): keep it.
        let added = ["handler_password", "checker_password", "vendor_password"]
            .into_iter()
            .any(|name| parsed.get(name).is_none());
        if !replaced.is_empty() || added {
            write_private(&path, &serde_json::to_vec_pretty(&s)?)?;
        }
        if !replaced.is_empty() {
            tracing::warn!(
                file = %path.display(),
                replaced = %replaced.join(","),
                "replaced secrets of an older, guessable kind; clients holding the old ones must read up.json again"
            );
        }
        return Ok(s);
    }
    let s = Secrets {
        service_password: random_secret(),
        handler_password: random_secret(),
        checker_password: random_secret(),
        vendor_password: random_secret(),
        device_password: random_secret(),
        operator_key: random_secret(),
    };
    write_private(&path, &serde_json::to_vec_pretty(&s)?)?;
    Ok(s)
}

/// Asks a child process to stop (SIGTERM, so it can shut down cleanly) and
/// kills it if it has not exited within `grace`.
pub(crate) async fn terminate(child: &mut tokio::process::Child, grace: Duration) {
    #[cfg(unix)]
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.kill().await;
}

/// A nats-server child process, killed when dropped, and stopped by the
/// kernel when `up` dies (see [`nats_command`]).
pub(crate) struct NatsProcess {
    child: tokio::process::Child,
    pid: u32,
    port: u16,
}

/// Where one node of a local cluster listens.
#[derive(Debug, Clone, Copy)]
struct Node {
    index: u16,
    client: u16,
    cluster: u16,
    monitor: u16,
    ws: u16,
}

/// What every nats-server started here is given.
#[derive(Clone, Copy)]
pub(crate) struct Launch<'a> {
    pub(crate) secrets: &'a Secrets,
    /// The callout's public keys; `None` runs the insecure configuration.
    pub(crate) keys: Option<&'a CalloutKeys>,
    /// Where the client and WebSocket listeners bind.
    pub(crate) bind: std::net::IpAddr,
}

/// The public keys nats.conf's auth_callout block names.
#[derive(Debug, Clone)]
pub(crate) struct CalloutKeys {
    /// The account key that signs callout responses (`A...`).
    pub(crate) issuer: String,
    /// The curve key requests are encrypted to (`X...`).
    pub(crate) xkey: String,
}

impl CalloutKeys {
    pub(crate) fn of(issuer: &token_vendor::Issuer) -> Self {
        Self {
            issuer: issuer.public_key(),
            xkey: issuer.xkey_public(),
        }
    }
}

/// The address to reach a listener bound to `bind` from this machine.
pub(crate) fn reach(bind: std::net::IpAddr) -> std::net::IpAddr {
    if bind.is_unspecified() {
        std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
    } else {
        bind
    }
}

/// A URL with `ip` as its host (IPv6 in brackets).
pub(crate) fn url(scheme: &str, ip: std::net::IpAddr, port: u16) -> String {
    format!("{scheme}://{}", SocketAddr::new(ip, port))
}

const INSTALL_HINT: &str = "starting nats-server: is it installed? `pip install -r deploy/requirements.txt` \
     installs the pinned version (deploy/dev up does it for you)";

/// `name` as the shell would find it on `PATH`.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            let Ok(meta) = std::fs::metadata(candidate) else {
                return false;
            };
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                meta.is_file() && meta.permissions().mode() & 0o111 != 0
            }
            #[cfg(not(unix))]
            meta.is_file()
        })
}

/// util-linux `setpriv`, if there is one that can set the parent-death
/// signal (`--pdeathsig`, util-linux 2.33 and later). Looked up once; its
/// absence is said once.
fn pdeathsig_wrapper() -> Option<&'static Path> {
    static WRAPPER: OnceLock<Option<PathBuf>> = OnceLock::new();
    WRAPPER
        .get_or_init(|| {
            #[cfg(target_os = "linux")]
            let found = find_program("setpriv").filter(|setpriv| {
                std::process::Command::new(setpriv)
                    .arg("--help")
                    .stdin(Stdio::null())
                    .stderr(Stdio::null())
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--pdeathsig"))
            });
            #[cfg(not(target_os = "linux"))]
            let found = None;
            if found.is_none() {
                tracing::warn!(
                    "no `setpriv --pdeathsig` (util-linux) here: nats-server stops when `up` \
                     stops, but outlives an `up` that is killed (SIGKILL); the next `up` on \
                     this data dir then refuses to start until that server is stopped"
                );
            }
            found
        })
        .as_deref()
}

/// The command that starts nats-server so that it dies with `up`, however
/// `up` ends, SIGKILL included: on Linux, through `setpriv --pdeathsig TERM
/// -- nats-server ...`, which asks the kernel (PR_SET_PDEATHSIG) to send the
/// server SIGTERM when its parent goes, then execs the server in its place
/// (same pid). SIGTERM lets the server flush its store on the way out.
/// Without `setpriv`, a plain spawn (and a warning).
///
/// The parent the kernel watches is the *thread* that spawned the child,
/// not the process: the signal fires when that thread exits, even if `up`
/// lives on. `tokio::process::Command::spawn` spawns synchronously on the
/// calling thread (it is std's `Command::spawn` underneath, with no hop to
/// the blocking pool), so the thread is whichever polls the future that
/// calls [`NatsProcess::start`]. In `up` that is the main thread: `run` is
/// the future `main` hands to `Runtime::block_on`, which polls it on the
/// calling thread, and the main thread lives exactly as long as the process.
/// (A tokio worker thread would do too: workers live as long as the
/// runtime. A `spawn_blocking` thread would not: the blocking pool ends
/// idle threads after 10 s, and the server would go with it. Never start
/// nats-server from there.)
fn nats_command() -> anyhow::Result<tokio::process::Command> {
    // Found here rather than by exec, so that a missing server is told as
    // such and not as a failing `setpriv`.
    let server = find_program("nats-server").context(INSTALL_HINT)?;
    if let Some(setpriv) = pdeathsig_wrapper() {
        let mut cmd = tokio::process::Command::new(setpriv);
        cmd.args(["--pdeathsig", "TERM", "--"]).arg(server);
        return Ok(cmd);
    }
    Ok(tokio::process::Command::new(server))
}

/// Whether the log of nats-server `pid` says it is ready, in what was
/// written to `log` after `offset`.
fn log_says_ready(log: &Path, offset: u64, pid: u32) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(log) else {
        return false;
    };
    // A log that shrank was replaced: read it whole.
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let from = if len < offset { 0 } else { offset };
    let mut text = Vec::new();
    if file.seek(SeekFrom::Start(from)).is_err() || file.read_to_end(&mut text).is_err() {
        return false;
    }
    let prefix = format!("[{pid}]");
    String::from_utf8_lossy(&text).lines().any(|line| {
        line.contains("Server is ready") && (line.starts_with(&prefix) || !line.starts_with('['))
    })
}

impl NatsProcess {
    pub(crate) async fn start(
        dir: &Path,
        (port, ws_port): (u16, u16),
        launch: Launch<'_>,
    ) -> anyhow::Result<Self> {
        let conf = dir.join("nats.conf");
        let text = if launch.keys.is_some() {
            NATS_CONF
        } else {
            NATS_CONF_INSECURE
        };
        std::fs::write(&conf, text).with_context(|| format!("writing {}", conf.display()))?;
        let mut cmd = nats_command()?;
        cmd.arg("-c")
            .arg(&conf)
            .arg("-sd")
            .arg(dir.join("jetstream"))
            .env("HEADCOUNT_WS_PORT", ws_port.to_string());
        Self::spawn(cmd, dir, dir.join("nats.log"), port, launch).await
    }

    /// Starts every node of a cluster on 127.0.0.1 and waits until each one
    /// accepts clients; JetStream elects its leaders in the background.
    async fn start_cluster(
        dir: &Path,
        nodes: &[Node],
        launch: Launch<'_>,
    ) -> anyhow::Result<Vec<Self>> {
        let secrets = launch.secrets;
        let base = if launch.keys.is_some() {
            NATS_CONF
        } else {
            NATS_CONF_INSECURE
        };
        std::fs::write(dir.join("nats.conf"), base)?;
        let node_conf = dir.join("nats-node.conf");
        std::fs::write(
            &node_conf,
            NATS_CLUSTER_NODE.replace("\"../../nats.conf\"", "\"nats.conf\""),
        )?;
        let route_password = &secrets.service_password;
        let routes: Vec<String> = nodes
            .iter()
            .map(|n| format!("nats://route:{route_password}@127.0.0.1:{}", n.cluster))
            .collect();
        let mut started = Vec::new();
        for n in nodes {
            let name = format!("n{}", n.index);
            let mut cmd = nats_command()?;
            cmd.arg("-c")
                .arg(&node_conf)
                .arg("-sd")
                .arg(dir.join(format!("jetstream-{name}")))
                .arg("--cluster")
                .arg(format!("nats://127.0.0.1:{}", n.cluster))
                .env("HEADCOUNT_NODE", &name)
                .env("HEADCOUNT_CLIENT_PORT", n.client.to_string())
                .env("HEADCOUNT_MONITOR_PORT", n.monitor.to_string())
                .env("HEADCOUNT_CLUSTER_PORT", n.cluster.to_string())
                .env("HEADCOUNT_WS_PORT", n.ws.to_string())
                .env("HEADCOUNT_ROUTE_PASSWORD", route_password);
            // node.conf names three routes; a five-node cluster lists the
            // first three as seeds and the others find the rest through them.
            for (i, route) in routes.iter().cycle().take(3).enumerate() {
                cmd.env(format!("HEADCOUNT_ROUTE_{}", i + 1), route);
            }
            let log = dir.join(format!("nats-{name}.log"));
            started.push(Self::spawn(cmd, dir, log, n.client, launch).await?);
        }
        Ok(started)
    }

    /// Spawns the server `cmd` names (see [`nats_command`]: the thread that
    /// polls this must outlive the server), records its pid in the data
    /// dir, and waits until it says it is ready and accepts connections.
    async fn spawn(
        mut cmd: tokio::process::Command,
        dir: &Path,
        log: PathBuf,
        port: u16,
        launch: Launch<'_>,
    ) -> anyhow::Result<Self> {
        let secrets = launch.secrets;
        let bind = launch.bind.to_string();
        // Its own process group: Ctrl-C reaches `up` alone, which drains the
        // services first and then stops the server.
        #[cfg(unix)]
        cmd.process_group(0);
        // Only what this server writes counts: the log is appended to.
        let offset = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let child = cmd
            .args(["-a", &bind, "-p", &port.to_string()])
            .arg("-l")
            .arg(&log)
            .env("HEADCOUNT_BIND", &bind)
            .env("HEADCOUNT_SERVICE_PASSWORD", &secrets.service_password)
            .env("HEADCOUNT_HANDLER_PASSWORD", &secrets.handler_password)
            .env("HEADCOUNT_CHECKER_PASSWORD", &secrets.checker_password)
            .env("HEADCOUNT_VENDOR_PASSWORD", &secrets.vendor_password)
            .env(
                "HEADCOUNT_CALLOUT_ISSUER",
                launch.keys.map(|k| k.issuer.as_str()).unwrap_or_default(),
            )
            .env(
                "HEADCOUNT_CALLOUT_XKEY",
                launch.keys.map(|k| k.xkey.as_str()).unwrap_or_default(),
            )
            .env("HEADCOUNT_DEVICE_PASSWORD", &secrets.device_password)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context(INSTALL_HINT)?;
        let pid = child.id().context("nats-server exited at once")?;
        let mut p = Self { child, pid, port };
        lock::record_server(dir, pid)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = p.child.try_wait()? {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                bail!(
                    "nats-server exited ({status}); last lines of {}:\n{}",
                    log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            // Ready is this server saying so in its own log, not just
            // something answering on the port.
            if log_says_ready(&log, offset, pid)
                && tokio::net::TcpStream::connect((reach(launch.bind), port))
                    .await
                    .is_ok()
            {
                return Ok(p);
            }
            if Instant::now() > deadline {
                bail!("nats-server did not accept connections on port {port} within 15 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) async fn stop(mut self) {
        // SIGTERM lets the server flush JetStream.
        terminate(&mut self.child, Duration::from_secs(10)).await;
        tracing::info!(pid = self.pid, port = self.port, "nats-server stopped");
    }
}

/// The built pages when `--web-dir` is not given: `web/dist` under the
/// working directory or under a directory the binary sits in (a checkout's
/// `target/debug/headcount` finds the checkout's pages).
fn built_pages() -> Option<PathBuf> {
    let built = |root: &Path| {
        let dir = root.join("web").join("dist");
        dir.join("demo").join("index.html").is_file().then_some(dir)
    };
    if let Some(dir) = std::env::current_dir().ok().as_deref().and_then(built) {
        return Some(dir);
    }
    let exe = std::env::current_exe().ok()?;
    let found = exe.ancestors().skip(1).take(4).find_map(built);
    if found.is_none() {
        tracing::warn!(
            "no built pages found (web/dist): /demo/ and /live/ are not served; \
             `npm --prefix web ci && npm --prefix web run build` builds them (deploy/dev up does)"
        );
    }
    found
}

impl UpArgs {
    /// The WebSocket port of the (first) server: `--ws-port`, else 4223 for
    /// one server and, for a cluster, the port after the nodes' client
    /// ports, so the two ranges never overlap.
    fn ws_base(&self) -> u16 {
        match (self.ws_port, self.cluster) {
            (Some(p), _) => p,
            (None, Some(size)) => self.nats_port.saturating_add(size),
            (None, None) => 4223,
        }
    }
}

/// The nodes of `--cluster`: consecutive ports from each flag's.
fn cluster_nodes(a: &UpArgs, size: u16) -> anyhow::Result<Vec<Node>> {
    let port = |base: u16, i: u16, flag: &str| {
        base.checked_add(i)
            .with_context(|| format!("--cluster {size} needs {size} ports from {flag} {base}"))
    };
    (0..size)
        .map(|i| {
            Ok(Node {
                index: i + 1,
                client: port(a.nats_port, i, "--nats-port")?,
                cluster: port(a.cluster_port, i, "--cluster-port")?,
                monitor: port(a.monitor_port, i, "--monitor-port")?,
                ws: port(a.ws_base(), i, "--ws-port")?,
            })
        })
        .collect()
}

/// A port `up` is about to listen on: where, and the flag that chose it.
#[derive(Debug)]
struct Listener {
    ip: IpAddr,
    port: u16,
    flag: String,
}

/// Every port `up` will listen on: nats-server's (unless `--nats-url`),
/// the HTTP API and /metrics.
fn planned_listeners(a: &UpArgs, nodes: &[Node]) -> Vec<Listener> {
    let at = |ip: IpAddr, port: u16, flag: String| Listener { ip, port, flag };
    let mut out = Vec::new();
    if a.nats_urls.is_empty() {
        if nodes.is_empty() {
            out.push(at(a.bind, a.nats_port, "--nats-port".into()));
            out.push(at(a.bind, a.ws_base(), "--ws-port".into()));
        }
        for n in nodes {
            let i = n.index - 1;
            let flag = |name: &str| match i {
                0 => format!("{name} for node n1"),
                _ => format!("{name} + {i} for node n{}", n.index),
            };
            out.push(at(a.bind, n.client, flag("--nats-port")));
            out.push(at(a.bind, n.ws, flag("--ws-port")));
            // Routes are always on loopback (`--cluster nats://127.0.0.1:..`);
            // the monitor binds where the client listener does.
            out.push(at(
                Ipv4Addr::LOCALHOST.into(),
                n.cluster,
                flag("--cluster-port"),
            ));
            out.push(at(a.bind, n.monitor, flag("--monitor-port")));
        }
    }
    out.push(at(a.bind, a.http_port, "--http-port".into()));
    out.push(at(a.bind, a.metrics_port, "--metrics-port".into()));
    out
}

/// Fails, naming the port and its flag, if two listeners were given the
/// same port or a port is taken already. Port 0 (any free one) is left out.
fn check_ports(listeners: &[Listener], cluster: Option<u16>) -> anyhow::Result<()> {
    let overlap = |x: IpAddr, y: IpAddr| x == y || x.is_unspecified() || y.is_unspecified();
    for (i, l) in listeners.iter().enumerate().filter(|(_, l)| l.port != 0) {
        if let Some(other) = listeners[..i]
            .iter()
            .find(|o| o.port == l.port && overlap(o.ip, l.ip))
        {
            let hint = cluster.map_or(String::new(), |size| {
                format!(
                    "; with --cluster {size}, --nats-port, --ws-port, --cluster-port and \
                     --monitor-port each take {size} consecutive ports"
                )
            });
            bail!(
                "port {} is both {} and {}: give each listener its own port{hint}",
                l.port,
                other.flag,
                l.flag
            );
        }
    }
    for l in listeners.iter().filter(|l| l.port != 0) {
        // Bound and let go at once; std sets SO_REUSEADDR, so only a
        // listening socket (not a connection closing) makes this fail.
        if let Err(e) = std::net::TcpListener::bind((l.ip, l.port)) {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                bail!(
                    "port {} ({}) is in use on {}: stop what listens there or choose another port",
                    l.port,
                    l.flag,
                    l.ip
                );
            }
            bail!(
                "cannot listen on port {} ({}) on {}: {e}",
                l.port,
                l.flag,
                l.ip
            );
        }
    }
    Ok(())
}

pub async fn run(a: UpArgs) -> anyhow::Result<()> {
    let here = reach(a.bind);
    let nodes = match a.cluster {
        Some(size) if a.nats_urls.is_empty() => cluster_nodes(&a, size)?,
        _ => Vec::new(),
    };
    let own_server = a.nats_urls.is_empty();
    let planned_url = if !own_server {
        a.nats_urls.join(",")
    } else if nodes.is_empty() {
        url("nats", here, a.nats_port)
    } else {
        let urls: Vec<String> = nodes.iter().map(|n| url("nats", here, n.client)).collect();
        urls.join(",")
    };
    // Before anything else: the data dir is this `up`'s alone until it
    // ends. A second `up` on it leaves here, having touched nothing.
    let lock = DataDirLock::acquire(&a.data_dir, &planned_url)?;
    // Keys, secrets, up.json and the server's store: the owner's alone.
    create_private_dir(&a.data_dir)?;
    if own_server {
        // A server an `up` left running must not get a twin on its store.
        lock::refuse_running_servers(&a.data_dir)?;
        lock::forget_servers(&a.data_dir);
    }
    check_ports(&planned_listeners(&a, &nodes), a.cluster)?;
    let secrets = load_secrets(&a.data_dir)?;
    let operator_key = a
        .tokens
        .operator_key
        .clone()
        .unwrap_or(secrets.operator_key.clone());

    if a.insecure {
        for line in [
            "INSECURE MODE: devices connect WITHOUT tokens, with one shared password,",
            "and may publish any heartbeat subject and read every control message.",
            "Use it for local experiments only; drop --insecure for the real thing.",
        ] {
            tracing::warn!("{line}");
            eprintln!("!! {line}");
        }
    }
    let issuer = if a.insecure {
        None
    } else {
        Some(token_vendor::Issuer::open(&a.data_dir)?)
    };
    let callout_keys = issuer.as_ref().map(CalloutKeys::of);
    let launch = Launch {
        secrets: &secrets,
        keys: callout_keys.as_ref(),
        bind: a.bind,
    };
    // Signals are caught from here on: a Ctrl-C during start-up still stops
    // the server started below.
    let (trigger, stop) = Shutdown::new();
    let trigger = Arc::new(trigger);
    {
        let trigger = trigger.clone();
        tokio::spawn(async move {
            shutdown::signal().await;
            tracing::info!("shutting down");
            trigger.fire();
        });
    }
    // Started here, on the main thread `block_on` runs this future on: the
    // thread the servers' parent-death signal watches (see nats_command).
    let (nats_processes, nats_urls, ws_urls, user, password) = if own_server && !nodes.is_empty() {
        let started = NatsProcess::start_cluster(&a.data_dir, &nodes, launch)
            .await
            .inspect_err(|_| lock::forget_servers(&a.data_dir))?;
        (
            started,
            nodes.iter().map(|n| url("nats", here, n.client)).collect(),
            nodes.iter().map(|n| url("ws", here, n.ws)).collect(),
            "headcount".to_string(),
            secrets.service_password.clone(),
        )
    } else if own_server {
        let p = NatsProcess::start(&a.data_dir, (a.nats_port, a.ws_base()), launch)
            .await
            .inspect_err(|_| lock::forget_servers(&a.data_dir))?;
        (
            vec![p],
            vec![url("nats", here, a.nats_port)],
            vec![url("ws", here, a.ws_base())],
            "headcount".to_string(),
            secrets.service_password.clone(),
        )
    } else {
        (
            Vec::new(),
            a.nats_urls.clone(),
            Vec::new(),
            a.nats_user.clone().unwrap_or_else(|| "headcount".into()),
            a.nats_password
                .clone()
                .unwrap_or_else(|| secrets.service_password.clone()),
        )
    };
    let result = if stop.is_requested() {
        Ok(())
    } else {
        run_services(
            &a,
            (&nats_urls, &ws_urls, &user, &password),
            &secrets,
            operator_key,
            issuer,
            (trigger, stop),
        )
        .await
    };
    futures::future::join_all(nats_processes.into_iter().map(NatsProcess::stop)).await;
    if own_server {
        lock::forget_servers(&a.data_dir);
    }
    let _ = std::fs::remove_file(UpInfo::path(&a.data_dir));
    drop(lock);
    if result.is_ok() {
        // Last: every service and server has said it stopped (above), and
        // nothing of `up` runs any more that could print after this.
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "headcount stopped");
        let _ = out.flush();
    }
    result
}

async fn run_services(
    a: &UpArgs,
    (nats_urls, ws_urls, user, password): (&[String], &[String], &str, &str),
    secrets: &Secrets,
    operator_key: String,
    issuer: Option<token_vendor::Issuer>,
    (trigger, stop): (Arc<headcount_runtime::shutdown::Trigger>, Shutdown),
) -> anyhow::Result<()> {
    let opts = |name: &str| NatsOptions {
        urls: nats_urls.to_vec(),
        user: Some(user.to_string()),
        password: Some(password.to_string()),
        name: name.to_string(),
    };
    // On a server started here each service logs in as its own user, with
    // only what it uses; on a server named with --nats-url they share the
    // user given.
    let own = a.nats_urls.is_empty();
    let service = |name: &str, own_user: &str, own_password: &str| {
        let mut o = opts(name);
        if own {
            o.user = Some(own_user.to_string());
            o.password = Some(own_password.to_string());
        }
        o
    };
    let registry = headcount_runtime::http::registry();

    let handler_client = service("headcount-handler", "handler", &secrets.handler_password)
        .connect()
        .await?;
    let checker_client = service("headcount-checker", "checker", &secrets.checker_password)
        .connect()
        .await?;
    let vendor_client = service("headcount-token-vendor", "vendor", &secrets.vendor_password)
        .connect()
        .await?;
    let mut settings = a.engine.buckets();
    if a.cluster.is_some() && a.engine.replicas.is_none() {
        settings.replicas = 3;
    }
    // The console creates the buckets or brings their settings up to date
    // (the services' users may create a missing bucket but change none);
    // each service then reaches them through its own connection, and so
    // with its own permissions.
    let probe = opts("headcount-up").connect().await?;
    Buckets::ensure(&probe, &settings).await?;
    let buckets = Buckets::open(&handler_client, &settings).await?;
    let checker_buckets = Buckets::open(&checker_client, &settings).await?;
    let vendor_buckets = Buckets::open(&vendor_client, &settings).await?;

    // One readiness for all services, on the metrics listener (/readyz).
    let health = headcount_runtime::Health::new();
    let handler = tokio::spawn(heartbeat_handler::run(
        a.engine.handler(),
        handler_client.clone(),
        buckets.clone(),
        heartbeat_handler::Metrics::new(&registry)?,
        health.service("heartbeat-handler", &handler_client),
        stop.clone(),
    ));
    let checker = tokio::spawn(checker::run(
        a.engine.checker(&a.plans)?,
        checker_client.clone(),
        checker_buckets,
        checker::Metrics::new(&registry)?,
        health.service("checker", &checker_client),
        stop.clone(),
    ));
    let vendor = token_vendor::Vendor::new(
        a.tokens.config(
            a.data_dir.clone(),
            operator_key.clone(),
            a.plans.names(),
            &a.browser,
        ),
        &registry,
    )?;
    vendor.set_plan_store(vendor_buckets.limits.clone());
    let callout_issuer = issuer.as_ref().map(|i| i.public_key()).unwrap_or_default();
    let access =
        token_vendor::Access::new(vendor_client.clone(), vendor_buckets.connections.clone());
    let vendor_health = health.service("token-vendor", &vendor_client);
    let vendor_task = {
        let tokens = token_vendor::serve_nats(
            vendor.clone(),
            vendor_client.clone(),
            vendor_health.scope("token-endpoint"),
            stop.clone(),
        );
        let callout = issuer.map(|issuer| {
            token_vendor::serve_callout(
                vendor.clone(),
                issuer,
                vendor_client.clone(),
                token_vendor::CalloutStores {
                    revoked: vendor_buckets.revoked.clone(),
                    access: access.clone(),
                },
                vendor_health.scope("callout"),
                stop.clone(),
            )
        });
        tokio::spawn(async move {
            match callout {
                Some(callout) => tokio::try_join!(tokens, callout).map(|_| ()),
                None => tokens.await,
            }
        })
    };
    let mut browser_args = a.browser.clone();
    if browser_args.web_dir.is_none() {
        browser_args.web_dir = built_pages();
    }
    let browser = browser_args.config(ws_urls.to_vec(), a.demo);
    let pages = browser.web_dir.is_some();
    let websocket_url = browser.websocket_urls.join(",");
    let (http_addr, http_task) = http::serve(
        SocketAddr::new(a.bind, a.http_port),
        token_vendor::router(vendor.clone())
            .merge(token_vendor::browser_router(
                vendor.clone(),
                vendor_client.clone(),
                vendor_buckets.revoked.clone(),
                browser,
            ))
            .merge(token_vendor::access_router(vendor, access)),
        stop.clone(),
    )
    .await?;
    let _vendor_serving = vendor_health.serving();
    let (metrics_addr, metrics_task) = http::serve(
        SocketAddr::new(a.bind, a.metrics_port),
        http::metrics_router(registry).merge(http::health_router(health)),
        stop.clone(),
    )
    .await?;

    // Ready means answering: wait for the checker to reply.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = probe
            .request(
                headcount_protocol::subjects::endpoint_subject(
                    headcount_protocol::subjects::endpoint::LIMITS_GET,
                ),
                bytes::Bytes::from_static(br#"{"account":"ready-probe"}"#),
            )
            .await;
        if r.is_ok() {
            break;
        }
        if stop.is_requested() {
            // Interrupted during start-up: let the services wind down.
            let _ = tokio::time::timeout(
                crate::services::SHUTDOWN_GRACE,
                futures::future::join(handler, checker),
            )
            .await;
            return Ok(());
        }
        if handler.is_finished() || checker.is_finished() || Instant::now() > deadline {
            trigger.fire();
            let h = handler.await;
            let c = checker.await;
            bail!("services did not start: handler {h:?}, checker {c:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let info = UpInfo {
        nats_url: nats_urls.join(","),
        http_url: format!("http://{http_addr}"),
        metrics_url: format!("http://{metrics_addr}/metrics"),
        service_user: user.to_string(),
        service_password: password.to_string(),
        operator_key,
        insecure_device_password: a.insecure.then(|| secrets.device_password.clone()),
        callout_issuer,
        websocket_url,
    };
    write_private(
        &UpInfo::path(&a.data_dir),
        &serde_json::to_vec_pretty(&info)?,
    )?;

    let demo = if a.demo {
        let access = if a.insecure {
            FleetAccess::Shared(
                NatsOptions {
                    urls: nats_urls.to_vec(),
                    user: Some("device".into()),
                    password: Some(secrets.device_password.clone()),
                    name: "headcount-demo".into(),
                }
                .connect()
                .await?,
            )
        } else {
            // Each demo device asks for a token and connects with it.
            FleetAccess::Tokens {
                tokens: probe.clone(),
                urls: nats_urls.to_vec(),
            }
        };
        let stats = Arc::new(FleetStats::default());
        let spec = FleetSpec {
            accounts: 25,
            // Most accounts within the default limit, some over it.
            devices: |i, base| 1 + (i * 7 + base) % 5,
            base_devices: 3,
            period: Duration::from_secs(5),
            churn: true,
        };
        let task = tokio::spawn(fleet(access, spec, stats.clone(), stop.clone()));
        Some((task, stats))
    } else {
        None
    };

    println!(
        "headcount ready: nats {} | http {} | metrics {} | {}",
        info.nats_url,
        info.http_url,
        info.metrics_url,
        UpInfo::path(&a.data_dir).display()
    );
    if pages {
        // The operator key is never printed: the live view asks for it.
        println!(
            "pages: demo player {}/demo/ | live view {}/live/ (operator key: `operator_key` in {})",
            info.http_url,
            info.http_url,
            UpInfo::path(&a.data_dir).display()
        );
    }
    if a.demo {
        println!(
            "demo fleet started: try `headcount active acct-0003` or `curl -s {}`",
            info.metrics_url
        );
    }

    let mut status = tokio::time::interval(Duration::from_secs(10));
    status.tick().await;
    let mut signal = std::pin::pin!(stop.clone().wait());
    loop {
        tokio::select! {
            _ = &mut signal => break,
            _ = status.tick(), if demo.is_some() => {
                if let Some((_, stats)) = &demo {
                    let r = probe.request(headcount_protocol::subjects::endpoint_subject(headcount_protocol::subjects::endpoint::ACTIVE), bytes::Bytes::from_static(br#"{"account":"acct-0003"}"#)).await;
                    let active = r.ok().and_then(|m| serde_json::from_slice::<serde_json::Value>(&m.payload).ok())
                        .and_then(|v| v["active"].as_u64()).unwrap_or(0);
                    println!(
                        "demo: {} heartbeats sent, {} devices told to stop, acct-0003 has {} active",
                        stats.sent.load(Ordering::Relaxed), stats.told_off.load(Ordering::Relaxed), active
                    );
                }
            }
        }
    }

    // Drain within a bounded time: if NATS is already gone there is nothing
    // left to flush, and `up` must still stop the server it started.
    let drain = async {
        if let Some((task, _)) = demo {
            let _ = task.await;
        }
        let (h, c, v) = (handler.await, checker.await, vendor_task.await);
        // The listeners stop on the same signal; wait for them to finish.
        let _ = futures::future::join(http_task, metrics_task).await;
        tracing::info!("http api and metrics endpoint stopped");
        let clients = [handler_client, checker_client, vendor_client, probe];
        for client in &clients {
            let _ = client.drain().await;
        }
        // Drained connections close on their own time and log it: let them
        // finish before `up` says it stopped.
        futures::future::join_all(clients.iter().map(closed)).await;
        h.context("handler panicked")??;
        c.context("checker panicked")??;
        v.context("token-vendor panicked")??;
        anyhow::Ok(())
    };
    tokio::select! {
        r = tokio::time::timeout(crate::services::SHUTDOWN_GRACE, drain) => match r {
            Ok(r) => r?,
            Err(_) => tracing::error!(grace = ?crate::services::SHUTDOWN_GRACE, "services did not drain in time"),
        },
        _ = shutdown::signal() => tracing::warn!("second signal: stopping without draining"),
    }
    Ok(())
}

/// Waits until a drained client's connection has closed (its handler is
/// gone, so it refuses commands), for at most a few seconds, and then a
/// moment for the last events it queued to be logged.
async fn closed(client: &async_nats::Client) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), client.flush()).await {
            Ok(Err(_)) => break,
            // Still open (draining), or waiting on a server that is gone.
            Ok(Ok(())) | Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_of_an_older_kind_are_all_replaced_and_saved_privately() {
        let dir = tempfile::tempdir().unwrap();
        // What `up` wrote before: NUID-made (guessable), or unsafe for
        // nats-server; the operator key included.
        let old = serde_json::json!({
            "service_password": "3e5Old",
            "handler_password": format!("hc{}{}", "A".repeat(22), "B".repeat(22)),
            "device_password": "9device",
            "operator_key": "hcOLDOPERATORKEYmadebyNUIDxxxxxxxxxxxxxxxxxxxx",
        });
        std::fs::write(dir.path().join("secrets.json"), old.to_string()).unwrap();
        let s = load_secrets(dir.path()).unwrap();
        for (name, new) in [
            ("service_password", &s.service_password),
            ("handler_password", &s.handler_password),
            ("device_password", &s.device_password),
            ("operator_key", &s.operator_key),
        ] {
            assert!(is_random_secret(new), "{name} not replaced");
            assert_ne!(old[name].as_str(), Some(new.as_str()));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("secrets.json"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Written back, so the next start reads the same secrets.
        let again = load_secrets(dir.path()).unwrap();
        assert_eq!(again.service_password, s.service_password);
        assert_eq!(again.operator_key, s.operator_key);
        // A fresh data dir gets new-kind secrets, all different.
        let fresh = tempfile::tempdir().unwrap();
        let f = load_secrets(fresh.path()).unwrap();
        let all = [
            &f.service_password,
            &f.handler_password,
            &f.checker_password,
            &f.vendor_password,
            &f.device_password,
            &f.operator_key,
        ];
        assert!(all.iter().all(|v| is_random_secret(v)));
        // A secret the file lacks is made once and kept.
        let partial = tempfile::tempdir().unwrap();
        let mut without = serde_json::to_value(&f).unwrap();
        without.as_object_mut().unwrap().remove("vendor_password");
        std::fs::write(partial.path().join("secrets.json"), without.to_string()).unwrap();
        let first = load_secrets(partial.path()).unwrap();
        let second = load_secrets(partial.path()).unwrap();
        assert_eq!(first.vendor_password, second.vendor_password);
        assert_eq!(first.operator_key, f.operator_key);
        assert_eq!(
            all.iter().collect::<std::collections::HashSet<_>>().len(),
            all.len()
        );
        // Debug output never shows them.
        assert!(!format!("{f:?}").contains(&f.operator_key));
    }
}
