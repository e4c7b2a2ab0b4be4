//! Starting nats-server: the one place that knows how. `headcount up`, the
//! benchmark and the test harness all start their servers through
//! [`Launch`] (what a server is given: the users' passwords, the callout's
//! keys, where it binds), and the first two through [`NatsProcess`] (a
//! child that dies with its parent, waited on until it says it is ready).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The users of the services' account in nats.conf: the console and each
/// service with only what it uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Login {
    Console,
    Handler,
    Checker,
    Vendor,
}

impl Login {
    pub const ALL: [Login; 4] = [
        Login::Console,
        Login::Handler,
        Login::Checker,
        Login::Vendor,
    ];

    /// The user name in nats.conf.
    pub fn user(self) -> &'static str {
        match self {
            Login::Console => "headcount",
            Login::Handler => "handler",
            Login::Checker => "checker",
            Login::Vendor => "vendor",
        }
    }

    /// The environment variable nats.conf reads its password from.
    pub fn env(self) -> &'static str {
        match self {
            Login::Console => "HEADCOUNT_SERVICE_PASSWORD",
            Login::Handler => "HEADCOUNT_HANDLER_PASSWORD",
            Login::Checker => "HEADCOUNT_CHECKER_PASSWORD",
            Login::Vendor => "HEADCOUNT_VENDOR_PASSWORD",
        }
    }
}

/// The passwords a server started here is given, one per user of
/// nats.conf (the device password serves `--insecure` alone). No `Debug`:
/// nothing should print them.
#[derive(Clone, Default)]
pub struct Passwords {
    pub console: String,
    pub handler: String,
    pub checker: String,
    pub vendor: String,
    pub device: String,
}

impl Passwords {
    /// The password of `login`.
    pub fn of(&self, login: Login) -> &str {
        match login {
            Login::Console => &self.console,
            Login::Handler => &self.handler,
            Login::Checker => &self.checker,
            Login::Vendor => &self.vendor,
        }
    }
}

/// The pids of the nats-servers an `up` started, one a line.
pub const PID_FILE: &str = "nats.pid";

/// Notes that `pid`, a nats-server on `dir`'s store, was started.
pub fn record_server(dir: &Path, pid: u32) -> anyhow::Result<()> {
    use std::io::Write;
    let path = dir.join(PID_FILE);
    let mut options = std::fs::OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
        .open(&path)
        .and_then(|mut f| writeln!(f, "{pid}"))
        .with_context(|| format!("writing {}", path.display()))
}

/// Forgets the servers recorded on `dir` (they are stopped, or were found
/// gone).
pub fn forget_servers(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(PID_FILE));
}

/// The server configuration shipped with this build.
pub const NATS_CONF: &str = include_str!("../../../nats.conf");
/// The configuration of `--insecure`: no device authentication.
pub const NATS_CONF_INSECURE: &str = include_str!("../../../deploy/nats-insecure.conf");
/// One node of a cluster: the configuration above plus the cluster block.
pub const NATS_CLUSTER_NODE: &str = include_str!("../../../deploy/cluster/node.conf");

/// Asks a child process to stop (SIGTERM, so it can shut down cleanly) and
/// kills it if it has not exited within `grace`.
pub async fn terminate(child: &mut tokio::process::Child, grace: Duration) {
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
pub struct NatsProcess {
    child: tokio::process::Child,
    pid: u32,
    port: u16,
}

/// Where one node of a local cluster listens.
#[derive(Debug, Clone, Copy)]
pub struct Node {
    pub index: u16,
    pub client: u16,
    pub cluster: u16,
    pub monitor: u16,
    pub ws: u16,
}

impl Node {
    /// The name of the node (`n1`, ...), as the cluster knows it.
    pub fn name(&self) -> String {
        format!("n{}", self.index)
    }

    /// The environment `deploy/cluster/node.conf` reads for this node:
    /// its name and ports, the route password and the seed routes (the
    /// first three of `routes`; a larger cluster finds the rest through
    /// them).
    pub fn env(&self, route_password: &str, routes: &[String]) -> Vec<(String, String)> {
        let mut env = vec![
            ("HEADCOUNT_NODE".to_string(), self.name()),
            ("HEADCOUNT_CLIENT_PORT".to_string(), self.client.to_string()),
            (
                "HEADCOUNT_MONITOR_PORT".to_string(),
                self.monitor.to_string(),
            ),
            (
                "HEADCOUNT_CLUSTER_PORT".to_string(),
                self.cluster.to_string(),
            ),
            ("HEADCOUNT_WS_PORT".to_string(), self.ws.to_string()),
            (
                "HEADCOUNT_ROUTE_PASSWORD".to_string(),
                route_password.to_string(),
            ),
        ];
        for (i, route) in routes.iter().cycle().take(3).enumerate() {
            env.push((format!("HEADCOUNT_ROUTE_{}", i + 1), route.clone()));
        }
        env
    }

    /// The route URL other nodes reach this one at.
    pub fn route(&self, route_password: &str) -> String {
        format!("nats://route:{route_password}@127.0.0.1:{}", self.cluster)
    }
}

/// What every nats-server started here is given.
#[derive(Clone, Copy)]
pub struct Launch<'a> {
    pub passwords: &'a Passwords,
    /// The callout's public keys; `None` runs the insecure configuration.
    pub keys: Option<&'a CalloutKeys>,
    /// Where the client and WebSocket listeners bind.
    pub bind: std::net::IpAddr,
}

impl Launch<'_> {
    /// The command line of a server reading `conf`, keeping its store in
    /// `store`, taking clients on `port` and logging to `log`.
    pub fn args(
        &self,
        conf: &Path,
        store: &Path,
        port: u16,
        log: &Path,
    ) -> Vec<std::ffi::OsString> {
        vec![
            "-c".into(),
            conf.into(),
            "-a".into(),
            self.bind.to_string().into(),
            "-p".into(),
            port.to_string().into(),
            "-sd".into(),
            store.into(),
            "-l".into(),
            log.into(),
        ]
    }

    /// The environment nats.conf reads: every user's password, the
    /// callout's keys (empty for the insecure configuration) and the
    /// address the listeners bind to.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env: Vec<(&'static str, String)> = Login::ALL
            .iter()
            .map(|&l| (l.env(), self.passwords.of(l).to_string()))
            .collect();
        env.push(("HEADCOUNT_DEVICE_PASSWORD", self.passwords.device.clone()));
        env.push((
            "HEADCOUNT_CALLOUT_ISSUER",
            self.keys.map(|k| k.issuer.clone()).unwrap_or_default(),
        ));
        env.push((
            "HEADCOUNT_CALLOUT_XKEY",
            self.keys.map(|k| k.xkey.clone()).unwrap_or_default(),
        ));
        env.push(("HEADCOUNT_BIND", self.bind.to_string()));
        env
    }
}

/// The public keys nats.conf's auth_callout block names.
#[derive(Debug, Clone)]
pub struct CalloutKeys {
    /// The account key that signs callout responses (`A...`).
    pub issuer: String,
    /// The curve key requests are encrypted to (`X...`).
    pub xkey: String,
}

impl CalloutKeys {
    pub fn of(issuer: &token_vendor::Issuer) -> Self {
        Self {
            issuer: issuer.public_key(),
            xkey: issuer.xkey_public(),
        }
    }
}

/// The address to reach a listener bound to `bind` from this machine.
pub fn reach(bind: std::net::IpAddr) -> std::net::IpAddr {
    if bind.is_unspecified() {
        std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
    } else {
        bind
    }
}

/// A URL with `ip` as its host (IPv6 in brackets).
pub fn url(scheme: &str, ip: std::net::IpAddr, port: u16) -> String {
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
    pub async fn start(
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
        let log = dir.join("nats.log");
        let mut cmd = nats_command()?;
        cmd.args(launch.args(&conf, &dir.join("jetstream"), port, &log))
            .env("HEADCOUNT_WS_PORT", ws_port.to_string());
        Self::spawn(cmd, dir, log, port, launch).await
    }

    /// Starts every node of a cluster on 127.0.0.1 and waits until each one
    /// accepts clients; JetStream elects its leaders in the background.
    pub async fn start_cluster(
        dir: &Path,
        nodes: &[Node],
        launch: Launch<'_>,
    ) -> anyhow::Result<Vec<Self>> {
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
        let route_password = &launch.passwords.console;
        let routes: Vec<String> = nodes.iter().map(|n| n.route(route_password)).collect();
        let mut started = Vec::new();
        for n in nodes {
            let name = n.name();
            let log = dir.join(format!("nats-{name}.log"));
            let store = dir.join(format!("jetstream-{name}"));
            let mut cmd = nats_command()?;
            cmd.args(launch.args(&node_conf, &store, n.client, &log))
                .arg("--cluster")
                .arg(format!("nats://127.0.0.1:{}", n.cluster))
                .envs(n.env(route_password, &routes));
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
        // Its own process group: Ctrl-C reaches `up` alone, which drains the
        // services first and then stops the server.
        #[cfg(unix)]
        cmd.process_group(0);
        // Only what this server writes counts: the log is appended to.
        let offset = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let child = cmd
            .envs(launch.env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context(INSTALL_HINT)?;
        let pid = child.id().context("nats-server exited at once")?;
        let mut p = Self { child, pid, port };
        record_server(dir, pid)?;
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

    pub async fn stop(mut self) {
        // SIGTERM lets the server flush JetStream.
        terminate(&mut self.child, Duration::from_secs(10)).await;
        tracing::info!(pid = self.pid, port = self.port, "nats-server stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use headcount_protocol::partition::MAPPING;

    /// The partition a server puts a heartbeat on and the one headcount
    /// computes agree only if every configuration maps heartbeats with the
    /// count headcount was built with.
    #[test]
    fn every_configuration_maps_heartbeats_to_headcounts_partitions() {
        let spelled = format!("\"{}\": \"{}\"", MAPPING.0, MAPPING.1);
        // The devices' account and the services' own.
        assert_eq!(NATS_CONF.matches(&spelled).count(), 2, "nats.conf");
        assert_eq!(NATS_CONF_INSECURE.matches(&spelled).count(), 1);
        let k8s = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../deploy/k8s/nats-values.yaml"),
        )
        .unwrap();
        assert_eq!(
            k8s.matches(&spelled).count(),
            2,
            "deploy/k8s/nats-values.yaml"
        );
        // Nothing still names the subjects from before the partitions.
        for conf in [NATS_CONF, NATS_CONF_INSECURE, k8s.as_str()] {
            assert!(!conf.contains("\"hb.>\""));
            assert!(!conf.contains("\"hb.*.*.*\"]"));
        }
    }
}
