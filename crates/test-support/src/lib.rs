//! Test support: a real `nats-server` per test, and a [`TestApp`] running
//! headcount's services against it with short timings.
//!
//! The server runs with the repository's own `nats.conf` (users and
//! permissions included) on a free loopback port with its own store
//! directory, and is killed when dropped. Nothing here fakes NATS.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use headcount_app::settings::DEFAULT_REVOKED_TTL;
use headcount_app::{App, CheckerSettings, HandlerSettings, Settings, VendorSettings};
use headcount_client::ClientError;
use headcount_protocol::subjects;
use headcount_protocol::wire::{ActiveReply, Heartbeat, KickRequest};
use headcount_protocol::{AccountId, DeviceId, Limit, Policy, SessionId};
use headcount_runtime::shutdown::Trigger;
use headcount_runtime::{BucketSettings, Health, NatsOptions, Shutdown};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use headcount_client;
pub use headcount_protocol;

/// The repository's server configuration.
pub fn nats_conf() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../nats.conf")
}

pub const SERVICE_USER: &str = "headcount";

pub use headcount_app::server::Login;

/// The password of `login` on a test server whose console password is
/// `console`.
pub fn password_of(login: Login, console: &str) -> String {
    match login {
        Login::Console => console.to_string(),
        other => format!("{console}-{}", other.user()),
    }
}

/// A nats-server on loopback as headcount starts every server
/// ([`headcount_app::server::Launch`]: the command line and the
/// environment nats.conf reads), for a test server whose console password
/// is `console` and whose callout issuer is `issuer`. Its output is
/// dropped; the log goes to `log`.
fn server_command(
    console: &str,
    issuer: &token_vendor::Issuer,
    conf: &std::path::Path,
    store: &std::path::Path,
    port: u16,
    log: &std::path::Path,
) -> Command {
    let passwords = headcount_app::server::Passwords {
        console: console.to_string(),
        handler: password_of(Login::Handler, console),
        checker: password_of(Login::Checker, console),
        vendor: password_of(Login::Vendor, console),
        device: String::new(),
    };
    let keys = headcount_app::server::CalloutKeys::of(issuer);
    let launch = headcount_app::server::Launch {
        passwords: &passwords,
        keys: Some(&keys),
        bind: std::net::Ipv4Addr::LOCALHOST.into(),
    };
    let mut cmd = Command::new("nats-server");
    cmd.args(launch.args(conf, store, port, log))
        .envs(launch.env())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// A nats-server process on a free loopback port.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    /// The WebSocket listener's port (browser devices).
    pub ws_port: u16,
    store: tempfile::TempDir,
    pub service_password: String,
    /// Seed of the auth callout issuer the server trusts.
    pub issuer_seed: String,
    /// Seed of the callout's curve key (requests are encrypted to it).
    pub xkey_seed: String,
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections.
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    /// Starts a server on `port`.
    pub fn start_on(port: u16) -> Self {
        Self::start_on_with_password(port, &format!("svc-{}", nuid_like()))
    }

    /// Starts a server on `port` whose service user has `service_password`.
    pub fn start_on_with_password(port: u16, service_password: &str) -> Self {
        let mut s = Self {
            child: None,
            port,
            ws_port: free_port(),
            store: tempfile::tempdir().expect("temporary store dir"),
            service_password: service_password.to_string(),
            issuer_seed: String::new(),
            xkey_seed: String::new(),
        };
        (s.issuer_seed, s.xkey_seed) = issuer_seeds();
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = self.store.path().join("nats.log");
        let child = server_command(
            &self.service_password,
            &self.issuer(),
            &nats_conf(),
            &self.store.path().join("js"),
            self.port,
            &log,
        )
        .env("HEADCOUNT_WS_PORT", self.ws_port.to_string())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start nats-server ({e}); install it with \
                     `pip install -r deploy/requirements.txt` or run `deploy/dev test`"
            )
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not start; log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Options for the backend user.
    pub fn service_options(&self, name: &str) -> NatsOptions {
        NatsOptions::new(self.url(), name).with_credentials(
            Some(SERVICE_USER.into()),
            Some(self.service_password.clone()),
        )
    }

    /// Options for one of the services' users.
    pub fn login_options(&self, login: Login, name: &str) -> NatsOptions {
        NatsOptions::new(self.url(), name).with_credentials(
            Some(login.user().into()),
            Some(password_of(login, &self.service_password)),
        )
    }

    pub async fn service_client(&self) -> async_nats::Client {
        self.service_options("test")
            .connect()
            .await
            .expect("service client connects")
    }

    /// The callout issuer this server trusts.
    pub fn issuer(&self) -> token_vendor::Issuer {
        token_vendor::Issuer::from_seeds(&self.issuer_seed, &self.xkey_seed).expect("issuer")
    }

    /// A client that publishes heartbeats for many simulated devices at
    /// once: the service user, as a load generator would. Real devices
    /// connect one by one with their token ([`NatsServer::device_connect`]).
    pub async fn fleet_client(&self) -> async_nats::Client {
        self.service_options("test-fleet")
            .connect()
            .await
            .expect("fleet client connects")
    }

    /// Connects with `opts`, reporting the connection's events (server
    /// errors such as permission violations, disconnects) on the returned
    /// channel.
    pub async fn connect_watched(
        &self,
        opts: async_nats::ConnectOptions,
    ) -> Result<
        (
            async_nats::Client,
            tokio::sync::mpsc::UnboundedReceiver<async_nats::Event>,
        ),
        async_nats::ConnectError,
    > {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let client = opts
            .event_callback(move |e| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(e);
                }
            })
            .connect(self.url())
            .await?;
        Ok((client, rx))
    }

    /// [`NatsServer::connect_watched`] with `token` (and `inbox_prefix`, for
    /// an operator or backend token), which must connect.
    pub async fn watched_connect(
        &self,
        token: &str,
        inbox_prefix: Option<&str>,
    ) -> (
        async_nats::Client,
        tokio::sync::mpsc::UnboundedReceiver<async_nats::Event>,
    ) {
        let mut opts = async_nats::ConnectOptions::with_token(token.to_string());
        if let Some(p) = inbox_prefix {
            opts = opts.custom_inbox_prefix(p.to_string());
        }
        self.connect_watched(opts)
            .await
            .expect("a valid token connects")
    }

    /// Connects with an operator or backend token, using its inbox prefix
    /// (the only one its permissions allow), without retrying.
    pub async fn client_connect(
        &self,
        token: &token_vendor::OperatorToken,
    ) -> Result<async_nats::Client, async_nats::ConnectError> {
        async_nats::ConnectOptions::with_token(token.token.clone())
            .custom_inbox_prefix(token.inbox_prefix.clone())
            .max_reconnects(Some(1))
            .connection_timeout(Duration::from_secs(5))
            .connect(self.url())
            .await
    }

    /// Connects as a device presenting `token`, without retrying: the
    /// error is what the server (through the auth callout) answered.
    pub async fn device_connect(
        &self,
        token: &str,
    ) -> Result<async_nats::Client, async_nats::ConnectError> {
        async_nats::ConnectOptions::with_token(token.to_string())
            .max_reconnects(Some(1))
            .connection_timeout(Duration::from_secs(5))
            .connect(self.url())
            .await
    }

    /// Kills the server (its store survives for [`NatsServer::restart`]).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The seeds of a fresh callout issuer: its account key and its curve key.
fn issuer_seeds() -> (String, String) {
    let issuer = token_vendor::Issuer::generate();
    (
        issuer.seed().expect("issuer seed"),
        issuer.xkey_seed().expect("xkey seed"),
    )
}

fn nuid_like() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{:016x}", h.finish())
}

/// Short timings so tests run in seconds.
#[derive(Debug, Clone)]
pub struct Timings {
    pub interval: Duration,
    pub timeout: Duration,
    pub sweep_every: Duration,
    /// Heartbeat rate limit per session of handlers started from now on
    /// (generous: tests beat fast and send bursts).
    pub max_rate: f64,
    pub burst: u32,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(3),
            timeout: Duration::from_millis(1500),
            sweep_every: Duration::from_millis(100),
            max_rate: 100.0,
            burst: 100,
        }
    }
}

/// A token vendor started by [`TestApp::start_token_vendor`].
pub struct TokenVendor {
    pub running: Running,
    /// The same vendor, to verify what it issued.
    pub vendor: token_vendor::Vendor,
    /// Base URL of its HTTP API.
    pub http: String,
    /// Its data directory (keys).
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl TokenVendor {
    /// The key ids its JWKS endpoint publishes, in order.
    pub async fn jwks_kids(&self) -> Vec<String> {
        let jwks: serde_json::Value = reqwest::get(format!("{}/.well-known/jwks.json", self.http))
            .await
            .expect("jwks answers")
            .json()
            .await
            .expect("jwks is json");
        jwks["keys"]
            .as_array()
            .expect("a key list")
            .iter()
            .map(|k| k["kid"].as_str().expect("each key has a kid").to_string())
            .collect()
    }

    /// A backend token named `name`, issued by this vendor.
    pub fn backend_token(&self, name: &str) -> token_vendor::OperatorToken {
        self.vendor
            .issue_backend(&DeviceId::parse(name).expect("backend name"), None)
            .expect("backend token issued")
    }

    /// An operator token, issued by this vendor.
    pub fn operator_token(&self) -> token_vendor::OperatorToken {
        self.vendor.issue_operator().expect("operator token issued")
    }

    /// A token for `account`/`device`, issued by this vendor.
    pub fn token(&self, account: &str, device: &str) -> headcount_protocol::wire::TokenReply {
        self.vendor
            .issue(
                &AccountId::parse(account).expect("account"),
                &DeviceId::parse(device).expect("device"),
                "nats",
            )
            .expect("token issued")
    }
}

/// Services started through [`headcount_app::App`], with their own stop
/// switch.
#[derive(Debug)]
pub struct Running {
    trigger: Trigger,
    app: App,
    pub registry: prometheus::Registry,
    /// The services' readiness, as their `/readyz` would report it.
    pub health: Health,
}

impl Running {
    /// Starts what `settings` names and waits until it says it is ready.
    pub async fn start(settings: Settings) -> Self {
        let (trigger, shutdown) = Shutdown::new();
        let mut app = App::build(settings, shutdown)
            .await
            .expect("services start");
        app.ready_within(Duration::from_secs(15))
            .await
            .expect("services ready");
        Running {
            trigger,
            registry: app.registry.clone(),
            health: app.health.clone(),
            app,
        }
    }

    /// Stops the services gracefully and returns their result.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.trigger.fire();
        self.app.join().await
    }

    /// Kills the services without a graceful stop.
    pub fn abort(self) {
        self.app.abort();
    }

    /// The service's metrics in Prometheus text format.
    pub fn metrics_text(&self) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// One sample's value from the metrics (0 when absent), e.g.
    /// `metric("headcount_heartbeats_total{result=\"accepted\"}")`.
    pub fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.metrics_text(), sample)
    }
}

/// Reads one sample from Prometheus text.
pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// headcount's services on a real server.
#[derive(Debug)]
pub struct TestApp {
    pub nats: NatsServer,
    pub client: async_nats::Client,
    pub timings: Timings,
    pub default_limit: Limit,
    /// Plans the checkers know (the product defaults unless changed before
    /// a checker starts).
    pub plans: headcount_protocol::Plans,
    /// How many sessions buckets the services spread the partitions over.
    pub sessions_buckets: u32,
    pub handlers: Vec<Running>,
    pub checkers: Vec<Running>,
}

impl TestApp {
    /// A server, one handler and one checker with default limit 2
    /// (evict-oldest).
    pub async fn spawn() -> Self {
        Self::spawn_with(Limit::new(2, Policy::EvictOldest).expect("limit")).await
    }

    pub async fn spawn_with(default_limit: Limit) -> Self {
        Self::spawn_timed(default_limit, Timings::default()).await
    }

    /// [`TestApp::spawn_with`] with timings of one's own (the buckets are
    /// made for them, so every service started later must share them).
    pub async fn spawn_timed(default_limit: Limit, timings: Timings) -> Self {
        Self::spawn_spread(default_limit, timings, 1).await
    }

    /// [`TestApp::spawn_timed`] with the partitions' dictionaries spread
    /// over `sessions_buckets` buckets (every service started later uses
    /// the same).
    pub async fn spawn_spread(
        default_limit: Limit,
        timings: Timings,
        sessions_buckets: u32,
    ) -> Self {
        init_logging();
        let nats = NatsServer::start();
        let client = nats.service_client().await;
        let mut app = Self {
            nats,
            client,
            timings,
            default_limit,
            plans: headcount_protocol::policy::default_plans(),
            sessions_buckets,
            handlers: Vec::new(),
            checkers: Vec::new(),
        };
        app.handlers.push(app.start_handler().await);
        app.checkers.push(app.start_checker().await);
        app
    }

    pub fn bucket_settings(&self) -> BucketSettings {
        BucketSettings {
            replicas: 1,
            sessions_ttl: headcount_protocol::IntervalClock::new(self.timings.interval)
                .dictionary_ttl(),
            revoked_ttl: DEFAULT_REVOKED_TTL,
            timeouts_ttl: headcount_runtime::buckets::timeouts_ttl(
                self.timings.interval,
                self.timings.timeout,
            ),
            storage: async_nats::jetstream::stream::StorageType::File,
            sessions_buckets: self.sessions_buckets,
        }
    }

    /// Settings with this app's buckets and nothing to run yet.
    fn settings(&self) -> Settings {
        Settings {
            buckets: Some(self.bucket_settings()),
            ..Settings::default()
        }
    }

    /// Starts one more heartbeat-handler and waits until it is ready.
    pub async fn start_handler(&self) -> Running {
        let config = heartbeat_handler::Config {
            interval: self.timings.interval,
            revoked_ttl: DEFAULT_REVOKED_TTL,
            max_concurrent_writes: 64,
            max_rate: self.timings.max_rate,
            burst: self.timings.burst,
            carry_delay: self.timings.interval / 10,
        };
        Running::start(Settings {
            handler: Some(HandlerSettings {
                nats: self.nats.login_options(Login::Handler, "test-handler"),
                config,
            }),
            ..self.settings()
        })
        .await
    }

    /// Starts one more checker and waits until it is ready.
    pub async fn start_checker(&self) -> Running {
        self.start_checker_via(self.nats.login_options(Login::Checker, "test-checker"))
            .await
    }

    /// [`TestApp::start_checker`] connecting as `nats` says (another
    /// address in front of the server, say).
    pub async fn start_checker_via(&self, nats: NatsOptions) -> Running {
        let config = checker::Config {
            interval: self.timings.interval,
            timeout: self.timings.timeout,
            sweep_every: self.timings.sweep_every,
            gauges_every: self.timings.sweep_every * 5,
            default_limit: self.default_limit,
            plans: self.plans.clone(),
            copies: checker::DEFAULT_COPIES,
        };
        Running::start(Settings {
            checker: Some(CheckerSettings { nats, config }),
            ..self.settings()
        })
        .await
    }

    /// Starts a token vendor serving `headcount.token` on this server and
    /// its HTTP API on a free loopback port; its keys live in a temporary
    /// directory that lives as long as the returned handle.
    pub async fn start_token_vendor(&self, operator_key: &str) -> TokenVendor {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut config = token_vendor::Config::new(tmp.path(), operator_key);
        config.plans = self.plans.keys().cloned().collect();
        let mut tv = self.start_token_vendor_with(config).await;
        tv._tmp = Some(tmp);
        tv
    }

    /// [`TestApp::start_token_vendor`] with a configuration of one's own
    /// (its `data_dir` is used as given); the auth callout runs too, signing
    /// with the issuer the server trusts.
    pub async fn start_token_vendor_with(&self, config: token_vendor::Config) -> TokenVendor {
        self.start_token_vendor_as(config, self.nats.issuer()).await
    }

    /// [`TestApp::start_token_vendor_with`] answering the callout with
    /// `issuer`, which need not be the one the server trusts.
    pub async fn start_token_vendor_as(
        &self,
        config: token_vendor::Config,
        issuer: token_vendor::Issuer,
    ) -> TokenVendor {
        let dir = config.data_dir.clone();
        // Demo tokens on, so that browser-side endpoints can be tried
        // without an operator key.
        let browser = token_vendor::BrowserConfig {
            websocket_urls: vec![format!("ws://127.0.0.1:{}", self.nats.ws_port)],
            heartbeat_every: Duration::from_secs(5),
            demo_tokens: true,
            web_dir: None,
        };
        let running = Running::start(Settings {
            vendor: Some(VendorSettings {
                nats: self.nats.login_options(Login::Vendor, "test-token-vendor"),
                config,
                issuer: Some(issuer),
                browser,
                http_addr: "127.0.0.1:0".parse().expect("addr"),
            }),
            ..self.settings()
        })
        .await;
        let vendor = running.app.vendor().cloned().expect("a vendor runs");
        let http_addr = running.app.http_addr.expect("the vendor listens");
        TokenVendor {
            running,
            vendor,
            http: format!("http://{http_addr}"),
            dir,
            _tmp: None,
        }
    }

    /// Publishes one heartbeat without waiting for the server (floods).
    /// Names are not checked: tests send bad ones on purpose.
    pub async fn heartbeat_nowait(
        &self,
        client: &async_nats::Client,
        account: &str,
        device: &str,
        session: &str,
        hb: &Heartbeat,
    ) {
        client
            .publish(
                format!("hb.{account}.{device}.{session}"),
                hb.encode().into(),
            )
            .await
            .expect("publish heartbeat");
    }

    /// Publishes one heartbeat as a device would and flushes.
    pub async fn heartbeat(
        &self,
        device_client: &async_nats::Client,
        account: &str,
        device: &str,
        session: &str,
        hb: &Heartbeat,
    ) {
        self.heartbeat_nowait(device_client, account, device, session, hb)
            .await;
        device_client.flush().await.expect("flush");
    }

    /// The endpoints, over the console's connection ([`TestApp::client`]).
    pub fn api(&self) -> headcount_client::Client {
        headcount_client::Client::new(self.client.clone())
    }

    /// Sends a JSON request to `headcount.<endpoint>`: any body, so that
    /// tests may send what no typed request would.
    pub async fn request<Req: Serialize, Rep: DeserializeOwned>(
        &self,
        endpoint: &str,
        body: &Req,
    ) -> Result<Rep, ClientError> {
        self.api().request_json(endpoint, body).await
    }

    /// Sends raw bytes to `headcount.<endpoint>`.
    pub async fn request_raw(&self, endpoint: &str, body: Bytes) -> Result<Bytes, ClientError> {
        self.api().request_raw(endpoint, body).await
    }

    /// `headcount.kick`: whether an active session was ended.
    pub async fn kick(&self, account: &str, session: &str) -> bool {
        let request = KickRequest {
            account: AccountId::parse(account).expect("account"),
            session: SessionId::parse(session).expect("session"),
        };
        self.api()
            .kick(&request)
            .await
            .expect("kick answers")
            .kicked
    }

    pub async fn active(&self, account: &str) -> ActiveReply {
        self.api()
            .active(&AccountId::parse(account).expect("account"))
            .await
            .expect("active answers")
    }

    /// Active session ids of an account, sorted.
    pub async fn active_sessions(&self, account: &str) -> Vec<String> {
        let mut s: Vec<String> = self
            .active(account)
            .await
            .sessions
            .into_iter()
            .map(|s| s.session.to_string())
            .collect();
        s.sort();
        s
    }

    /// Polls `active` until `pred` holds or `within` passes; returns the
    /// last reply and how long it took.
    pub async fn wait_active(
        &self,
        account: &str,
        within: Duration,
        pred: impl Fn(&ActiveReply) -> bool,
    ) -> (ActiveReply, Option<Duration>) {
        let start = Instant::now();
        loop {
            let r = self.active(account).await;
            if pred(&r) {
                return (r, Some(start.elapsed()));
            }
            if start.elapsed() > within {
                return (r, None);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A simulated device: heartbeats on a timer from its own task.
#[derive(Debug)]
pub struct Device {
    stop: Trigger,
    task: tokio::task::JoinHandle<()>,
}

impl Device {
    /// Starts heartbeating every `period` with `hb` until stopped.
    pub fn start(
        client: async_nats::Client,
        account: &str,
        device: &str,
        session: &str,
        period: Duration,
        hb: Heartbeat,
    ) -> Self {
        let subject = subjects::heartbeat(
            &AccountId::parse(account).expect("account"),
            &DeviceId::parse(device).expect("device"),
            &SessionId::parse(session).expect("session"),
        );
        let (stop, shutdown) = Shutdown::new();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            let mut done = std::pin::pin!(shutdown.wait());
            loop {
                tokio::select! {
                    _ = &mut done => return,
                    _ = tick.tick() => {
                        let _ = client.publish(subject.clone(), hb.encode().into()).await;
                    }
                }
            }
        });
        Self { stop, task }
    }

    /// Stops heartbeating (goes silent; no leave).
    pub async fn silence(self) {
        self.stop.fire();
        let _ = self.task.await;
    }
}

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// The repository's cluster node configuration.
pub fn cluster_node_conf() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/cluster/node.conf")
}

/// One node of a [`NatsCluster`].
#[derive(Debug)]
struct ClusterNode {
    name: String,
    client: u16,
    cluster: u16,
    monitor: u16,
    ws: u16,
    child: Option<Child>,
}

/// A three-node JetStream cluster on loopback, each node a real
/// nats-server with `deploy/cluster/node.conf`. Nodes can be killed and
/// brought back with their store.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<ClusterNode>,
    store: tempfile::TempDir,
    pub service_password: String,
    route_password: String,
    pub issuer_seed: String,
    pub xkey_seed: String,
}

impl NatsCluster {
    /// Starts three nodes and waits until JetStream answers on each.
    pub async fn start() -> Self {
        let nodes = (1..=3)
            .map(|i| ClusterNode {
                name: format!("n{i}"),
                client: free_port(),
                cluster: free_port(),
                monitor: free_port(),
                ws: free_port(),
                child: None,
            })
            .collect();
        let mut c = Self {
            nodes,
            store: tempfile::tempdir().expect("temporary store dir"),
            service_password: format!("svc-{}", nuid_like()),
            route_password: format!("rt-{}", nuid_like()),
            issuer_seed: String::new(),
            xkey_seed: String::new(),
        };
        (c.issuer_seed, c.xkey_seed) = issuer_seeds();
        // A port found free may be taken by another test's server before
        // this one binds it; the node then exits at once. Start again on
        // fresh ports rather than wait for a node that is gone.
        for attempt in 1.. {
            for i in 0..c.nodes.len() {
                c.spawn(i);
            }
            let mut exited = None;
            for i in 0..c.nodes.len() {
                if let Err(e) = c.healthy_within(i, Duration::from_secs(30)).await {
                    exited = Some(e);
                    break;
                }
            }
            match exited {
                None => break,
                Some(e) if attempt < 3 => {
                    eprintln!("cluster start, attempt {attempt}: {e}; again on fresh ports");
                    for n in &mut c.nodes {
                        if let Some(mut child) = n.child.take() {
                            let _ = child.kill();
                            let _ = child.wait();
                        }
                        (n.client, n.cluster, n.monitor, n.ws) =
                            (free_port(), free_port(), free_port(), free_port());
                    }
                }
                Some(e) => panic!("{e}"),
            }
        }
        c
    }

    /// Node `i` as `headcount up --cluster` describes its nodes.
    fn node(&self, i: usize) -> headcount_app::server::Node {
        let n = &self.nodes[i];
        headcount_app::server::Node {
            index: u16::try_from(i + 1).expect("a few nodes"),
            client: n.client,
            cluster: n.cluster,
            monitor: n.monitor,
            ws: n.ws,
        }
    }

    fn spawn(&mut self, i: usize) {
        let routes: Vec<String> = (0..self.nodes.len())
            .map(|j| self.node(j).route(&self.route_password))
            .collect();
        let issuer =
            token_vendor::Issuer::from_seeds(&self.issuer_seed, &self.xkey_seed).expect("issuer");
        let node = self.node(i);
        let name = &self.nodes[i].name;
        let log = self.store.path().join(format!("{name}.log"));
        let mut cmd = server_command(
            &self.service_password,
            &issuer,
            &cluster_node_conf(),
            &self.store.path().join(name),
            node.client,
            &log,
        );
        cmd.arg("--cluster")
            .arg(format!("nats://127.0.0.1:{}", node.cluster))
            .envs(node.env(&self.route_password, &routes));
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start nats-server ({e}); run `deploy/dev test` to install it")
        });
        self.nodes[i].child = Some(child);
    }

    /// Waits until node `i` reports JetStream healthy (it has caught up).
    pub async fn wait_healthy(&mut self, i: usize) {
        if let Err(e) = self.healthy_within(i, Duration::from_secs(30)).await {
            panic!("{e}");
        }
    }

    /// Waits until node `i` reports JetStream healthy, for at most `wait`;
    /// an error says why not (its process exited, or time ran out).
    async fn healthy_within(&mut self, i: usize, wait: Duration) -> Result<(), String> {
        // Plain /healthz also needs JetStream caught up with the meta leader.
        let url = format!("http://127.0.0.1:{}/healthz", self.nodes[i].monitor);
        let deadline = Instant::now() + wait;
        let name = self.nodes[i].name.clone();
        loop {
            if let Ok(r) = reqwest::get(&url).await
                && r.status().is_success()
            {
                return Ok(());
            }
            if let Some(child) = self.nodes[i].child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("cluster node {name} exited ({status})"));
            }
            if Instant::now() >= deadline {
                return Err(format!("cluster node {name} did not become healthy"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every node's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client))
            .collect()
    }

    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// The service user on every node (the client fails over between them).
    pub fn service_options(&self, name: &str) -> NatsOptions {
        NatsOptions {
            urls: self.urls(),
            user: Some(SERVICE_USER.into()),
            password: Some(self.service_password.clone()),
            name: name.into(),
        }
    }

    pub async fn service_client(&self, name: &str) -> async_nats::Client {
        self.service_options(name)
            .connect()
            .await
            .expect("service client connects")
    }

    /// The node currently leading `stream` (e.g. `KV_headcount-sessions`).
    pub async fn leader_of(&self, client: &async_nats::Client, stream: &str) -> Option<String> {
        let js = async_nats::jetstream::new(client.clone());
        let mut s = js.get_stream(stream).await.ok()?;
        let info = s.info().await.ok()?;
        info.cluster.as_ref().and_then(|c| c.leader.clone())
    }

    /// Kills node `name` at once (SIGKILL: no goodbye to its peers).
    pub fn kill(&mut self, name: &str) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.name == name)
            .expect("a node of this cluster");
        if let Some(mut c) = node.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `name` again with its store, and waits until it is healthy.
    pub async fn restart(&mut self, name: &str) {
        let i = self
            .nodes
            .iter()
            .position(|n| n.name == name)
            .expect("a node of this cluster");
        self.kill(name);
        self.spawn(i);
        self.wait_healthy(i).await;
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl TestApp {
    /// Waits until `account` has `n` active sessions and returns that
    /// reply; panics with the last reply if it does not come within 5 s.
    pub async fn wait_count(&self, account: &str, n: u32) -> ActiveReply {
        let (reply, took) = self
            .wait_active(account, Duration::from_secs(5), |r| r.active == n)
            .await;
        assert!(
            took.is_some(),
            "{account}: {} active sessions, not {n}: {reply:?}",
            reply.active
        );
        reply
    }
}

impl Device {
    /// Silences each of `devices` ([`Device::silence`]).
    pub async fn silence_all(devices: impl IntoIterator<Item = Device>) {
        for d in devices {
            d.silence().await;
        }
    }
}

impl TokenVendor {
    /// A POST to `path` of its HTTP API, without credentials yet.
    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        reqwest::Client::new().post(format!("{}{path}", self.http))
    }

    /// A POST to `path` of its HTTP API bearing `token`, or nothing.
    pub fn post_bearing(&self, path: &str, token: Option<&str>) -> reqwest::RequestBuilder {
        match token {
            Some(token) => self.post(path).bearer_auth(token),
            None => self.post(path),
        }
    }

    /// How many tokens it issued `via` one way (`nats`, `http`, `refresh`,
    /// `demo`, ...), from its metrics.
    pub fn issued(&self, via: &str) -> f64 {
        self.running
            .metric(&format!(r#"headcount_tokens_issued_total{{via="{via}"}}"#))
    }

    /// How many auth callouts it answered with `result` (`allowed`, or why
    /// it refused), from its metrics.
    pub fn callouts(&self, result: &str) -> f64 {
        self.running
            .metric(&format!(r#"headcount_callout_total{{result="{result}"}}"#))
    }
}

/// Sends `request` and returns the JSON body of its answer, which must be a
/// 200.
pub async fn ok_json<T: DeserializeOwned>(request: reqwest::RequestBuilder) -> T {
    let response = request.send().await.expect("the server answers");
    assert_eq!(response.status(), 200, "{}", response.url());
    response.json().await.expect("the answer is JSON")
}
