//! `headcount up`: nats-server (unless `--nats-url` names a running one),
//! then every service in this process, then `<data-dir>/up.json` and a line
//! containing `ready`. SIGTERM or Ctrl-C stops all of it, nats-server too;
//! so does SIGKILL, through the parent-death signal (see
//! [`headcount_app::server::NatsProcess`]). The services are wired by
//! [`headcount_app::App::build`], as in every other process.
//!
//! Before it starts anything, `up` locks its data dir (a second `up` on it
//! leaves at once, see [`crate::lock`]), refuses a store whose nats-server
//! is still running, and checks that every port it will listen on is free.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use headcount_app::secrets::{Secrets, load_secrets};
use headcount_app::server::{CalloutKeys, Launch, Login, NatsProcess, Node, reach, url};
use headcount_app::{App, CheckerSettings, HandlerSettings, Settings, VendorSettings};
use headcount_runtime::secret::{create_private_dir, write_private};
use headcount_runtime::{NatsOptions, Shutdown, shutdown};

use crate::config::{EngineArgs, UpInfo};
use crate::lock::{self, DataDirLock};
use crate::services::VendorArgs;
use crate::simulate::{FleetAccess, FleetSpec, FleetStats, fleet};

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
    vendor: VendorArgs,
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
        .vendor
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
    let passwords = secrets.passwords();
    let launch = Launch {
        passwords: &passwords,
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

/// The settings of every service `up` runs, from its flags: each service
/// logs in as its own user on a server started here, or all as the user
/// given with --nats-url.
fn settings(
    a: &UpArgs,
    (nats_urls, ws_urls, user, password): (&[String], &[String], &str, &str),
    secrets: &Secrets,
    operator_key: String,
    issuer: Option<token_vendor::Issuer>,
) -> anyhow::Result<Settings> {
    let opts = |name: &str| NatsOptions {
        urls: nats_urls.to_vec(),
        user: Some(user.to_string()),
        password: Some(password.to_string()),
        name: name.to_string(),
    };
    let own = a.nats_urls.is_empty();
    let service = |name: &str, login: Login| {
        let mut o = opts(name);
        if own {
            o.user = Some(login.user().to_string());
            o.password = Some(secrets.passwords().of(login).to_string());
        }
        o
    };
    let mut buckets = a.engine.buckets();
    if a.cluster.is_some() && a.engine.replicas.is_none() {
        buckets.replicas = 3;
    }
    let mut browser_args = a.vendor.browser.clone();
    if browser_args.web_dir.is_none() {
        browser_args.web_dir = built_pages();
    }
    Ok(Settings {
        console: Some(opts("headcount-up")),
        buckets: Some(buckets),
        handler: Some(HandlerSettings {
            nats: service("headcount-handler", Login::Handler),
            config: a.engine.handler(),
        }),
        checker: Some(CheckerSettings {
            nats: service("headcount-checker", Login::Checker),
            config: a.engine.checker(&a.vendor.plans)?,
        }),
        vendor: Some(VendorSettings {
            nats: service("headcount-token-vendor", Login::Vendor),
            config: a.vendor.config(a.data_dir.clone(), operator_key),
            issuer,
            browser: browser_args.config(ws_urls.to_vec(), a.demo),
            http_addr: SocketAddr::new(a.bind, a.http_port),
        }),
        metrics_addr: Some(SocketAddr::new(a.bind, a.metrics_port)),
    })
}

async fn run_services(
    a: &UpArgs,
    nats: (&[String], &[String], &str, &str),
    secrets: &Secrets,
    operator_key: String,
    issuer: Option<token_vendor::Issuer>,
    (trigger, stop): (Arc<headcount_runtime::shutdown::Trigger>, Shutdown),
) -> anyhow::Result<()> {
    let (nats_urls, _, user, password) = nats;
    let callout_issuer = issuer.as_ref().map(|i| i.public_key()).unwrap_or_default();
    let settings = settings(a, nats, secrets, operator_key.clone(), issuer)?;
    let pages = settings
        .vendor
        .as_ref()
        .is_some_and(|v| v.browser.web_dir.is_some());
    let websocket_url = settings
        .vendor
        .as_ref()
        .map(|v| v.browser.websocket_urls.join(","))
        .unwrap_or_default();
    let mut app = App::build(settings, stop.clone()).await?;
    // Ready means every service says so: connected, buckets open, watches
    // caught up, endpoints serving.
    tokio::select! {
        r = app.ready_within(Duration::from_secs(30)) => {
            if let Err(e) = r {
                trigger.fire();
                let ended = tokio::time::timeout(crate::services::SHUTDOWN_GRACE, app.join()).await;
                bail!("services did not start: {e:#} (then: {ended:?})");
            }
        }
        _ = stop.clone().wait() => {
            // Interrupted during start-up: let the services wind down.
            let _ = tokio::time::timeout(crate::services::SHUTDOWN_GRACE, app.join()).await;
            return Ok(());
        }
    }
    let console = app
        .console()
        .cloned()
        .context("up runs with the console connection")?;
    let (Some(http_addr), Some(metrics_addr)) = (app.http_addr, app.metrics_addr) else {
        bail!("up serves the HTTP API and /metrics");
    };
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
                tokens: console.clone(),
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
                    let r = probe_active(&console, "acct-0003").await;
                    println!(
                        "demo: {} heartbeats sent, {} devices told to stop, acct-0003 has {} active",
                        stats.sent.load(Ordering::Relaxed), stats.told_off.load(Ordering::Relaxed), r
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
        let r = app.join().await;
        tracing::info!("services, http api and metrics endpoint stopped");
        r
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

/// How many sessions `account` has active, for the demo's status line
/// (0 when the checker does not answer).
async fn probe_active(console: &async_nats::Client, account: &str) -> u64 {
    let Ok(account) = headcount_protocol::AccountId::parse(account) else {
        return 0;
    };
    headcount_client::Client::new(console.clone())
        .active(&account)
        .await
        .map_or(0, |r| r.active as u64)
}
