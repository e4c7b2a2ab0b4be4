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

use anyhow::Context;
use bytes::Bytes;
use headcount_protocol::subjects;
use headcount_protocol::wire::{ActiveReply, Heartbeat};
use headcount_protocol::{AccountId, DeviceId, Limit, Policy, SessionId};
use headcount_runtime::shutdown::Trigger;
use headcount_runtime::{BucketSettings, Buckets, Health, NatsOptions, Shutdown};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use headcount_protocol;

/// The repository's server configuration.
pub fn nats_conf() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../nats.conf")
}

pub const SERVICE_USER: &str = "headcount";

/// The users of the services' account (nats.conf): the console and each
/// service with only what it uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
            Login::Console => SERVICE_USER,
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

    /// Its password on a server whose console password is `console`.
    pub fn password(self, console: &str) -> String {
        match self {
            Login::Console => console.to_string(),
            other => format!("{console}-{}", other.user()),
        }
    }
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
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(nats_conf())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-sd")
            .arg(self.store.path().join("js"))
            .arg("-l")
            .arg(&log)
            .envs(Login::ALL.map(|l| (l.env(), l.password(&self.service_password))))
            .env("HEADCOUNT_CALLOUT_ISSUER", self.issuer().public_key())
            .env("HEADCOUNT_CALLOUT_XKEY", self.issuer().xkey_public())
            .env("HEADCOUNT_BIND", "127.0.0.1")
            .env("HEADCOUNT_WS_PORT", self.ws_port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
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
            Some(login.password(&self.service_password)),
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

/// A running service task and its own stop switch.
#[derive(Debug)]
pub struct Running {
    trigger: Trigger,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub registry: prometheus::Registry,
    /// The service's readiness, as its `/readyz` would report it.
    pub health: Health,
}

impl Running {
    /// Stops the service gracefully and returns its result.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.trigger.fire();
        self.task.await.context("service task panicked")?
    }

    /// Kills the service without a graceful stop.
    pub fn abort(self) {
        self.task.abort();
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
        init_logging();
        let nats = NatsServer::start();
        let client = nats.service_client().await;
        let mut app = Self {
            nats,
            client,
            timings: Timings::default(),
            default_limit,
            plans: headcount_protocol::policy::default_plans(),
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
            revoked_ttl: Duration::from_secs(600),
            timeouts_ttl: Duration::from_secs(30),
            storage: async_nats::jetstream::stream::StorageType::File,
        }
    }

    async fn connect(&self, login: Login, name: &str) -> (async_nats::Client, Buckets) {
        let client = self
            .nats
            .login_options(login, name)
            .connect()
            .await
            .expect("service connects");
        let buckets = Buckets::open(&client, &self.bucket_settings())
            .await
            .expect("buckets open");
        (client, buckets)
    }

    /// Starts one more heartbeat-handler and waits until it is subscribed.
    pub async fn start_handler(&self) -> Running {
        let (client, buckets) = self.connect(Login::Handler, "test-handler").await;
        let registry = prometheus::Registry::new();
        let metrics = heartbeat_handler::Metrics::new(&registry).expect("metrics");
        let (trigger, shutdown) = Shutdown::new();
        let config = heartbeat_handler::Config {
            interval: self.timings.interval,
            revoked_ttl: Duration::from_secs(600),
            max_concurrent_writes: 64,
            max_rate: self.timings.max_rate,
            burst: self.timings.burst,
            carry_delay: self.timings.interval / 10,
        };
        // The console probes: the handler's own user may not publish heartbeats.
        let probe = self.client.clone();
        let health = Health::new();
        let task = tokio::spawn(heartbeat_handler::run(
            config,
            client.clone(),
            buckets,
            metrics,
            health.service("heartbeat-handler", &client),
            shutdown,
        ));
        // An invalid name: counted as invalid, never recorded as a session.
        wait_for_interest(&probe, "hb.!.!.!").await;
        Running {
            trigger,
            task,
            registry,
            health,
        }
    }

    /// Starts one more checker and waits until it answers.
    pub async fn start_checker(&self) -> Running {
        let (client, buckets) = self.connect(Login::Checker, "test-checker").await;
        let registry = prometheus::Registry::new();
        let metrics = checker::Metrics::new(&registry).expect("metrics");
        let (trigger, shutdown) = Shutdown::new();
        let config = checker::Config {
            interval: self.timings.interval,
            timeout: self.timings.timeout,
            sweep_every: self.timings.sweep_every,
            gauges_every: self.timings.sweep_every * 5,
            default_limit: self.default_limit,
            plans: self.plans.clone(),
        };
        let health = Health::new();
        let task = tokio::spawn(checker::run(
            config,
            client.clone(),
            buckets,
            metrics,
            health.service("checker", &client),
            shutdown,
        ));
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = self
                .client
                .request(
                    subjects::endpoint_subject(subjects::endpoint::LIMITS_GET),
                    Bytes::from_static(br#"{"account":"probe"}"#),
                )
                .await;
            if r.is_ok_and(|m| m.headers.is_none()) {
                break;
            }
            assert!(Instant::now() < deadline, "checker did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Running {
            trigger,
            task,
            registry,
            health,
        }
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
        let (client, buckets) = self.connect(Login::Vendor, "test-token-vendor").await;
        let access = token_vendor::Access::new(client.clone(), buckets.connections.clone());
        let registry = prometheus::Registry::new();
        let vendor = token_vendor::Vendor::new(config, &registry).expect("vendor starts");
        vendor.set_plan_store(buckets.limits.clone());
        let (trigger, shutdown) = Shutdown::new();
        // Demo tokens on, so that browser-side endpoints can be tried
        // without an operator key.
        let browser = token_vendor::BrowserConfig {
            websocket_urls: vec![format!("ws://127.0.0.1:{}", self.nats.ws_port)],
            heartbeat_every: Duration::from_secs(5),
            demo_tokens: true,
            web_dir: None,
        };
        let health = Health::new();
        let scope = health.service("token-vendor", &client);
        let (http_addr, _http) = headcount_runtime::http::serve(
            "127.0.0.1:0".parse().expect("addr"),
            token_vendor::router(vendor.clone())
                .merge(headcount_runtime::http::health_router(health.clone()))
                .merge(token_vendor::browser_router(
                    vendor.clone(),
                    client.clone(),
                    buckets.revoked.clone(),
                    browser,
                ))
                .merge(token_vendor::access_router(vendor.clone(), access.clone())),
            shutdown.clone(),
        )
        .await
        .expect("http listens");
        let tokens = token_vendor::serve_nats(
            vendor.clone(),
            client.clone(),
            scope.scope("token-endpoint"),
            shutdown.clone(),
        );
        let callout = token_vendor::serve_callout(
            vendor.clone(),
            issuer,
            client,
            token_vendor::CalloutStores {
                revoked: buckets.revoked,
                access,
            },
            scope.scope("callout"),
            shutdown,
        );
        let serving = scope.serving();
        let task = tokio::spawn(async move {
            let _serving = serving;
            tokio::try_join!(tokens, callout)?;
            Ok(())
        });
        wait_for_interest(
            &self.client,
            &subjects::endpoint_subject(subjects::endpoint::TOKEN),
        )
        .await;
        TokenVendor {
            running: Running {
                trigger,
                task,
                registry,
                health,
            },
            vendor,
            http: format!("http://{http_addr}"),
            dir,
            _tmp: None,
        }
    }

    /// Publishes one heartbeat without waiting for the server (floods).
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
        device_client
            .publish(
                format!("hb.{account}.{device}.{session}"),
                hb.encode().into(),
            )
            .await
            .expect("publish heartbeat");
        device_client.flush().await.expect("flush");
    }

    /// Sends a JSON request to `headcount.<endpoint>`; Err holds the service
    /// error code and message.
    pub async fn request<Req: Serialize, Rep: DeserializeOwned>(
        &self,
        endpoint: &str,
        body: &Req,
    ) -> Result<Rep, (u16, String)> {
        let raw = serde_json::to_vec(body).expect("json");
        self.request_raw(endpoint, raw.into()).await.and_then(|b| {
            serde_json::from_slice(&b).map_err(|e| (0, format!("unreadable reply: {e}")))
        })
    }

    /// Sends raw bytes to `headcount.<endpoint>`.
    pub async fn request_raw(&self, endpoint: &str, body: Bytes) -> Result<Bytes, (u16, String)> {
        let msg = tokio::time::timeout(
            Duration::from_secs(5),
            self.client
                .request(subjects::endpoint_subject(endpoint), body),
        )
        .await
        .map_err(|_| (0, "timed out".to_string()))?
        .map_err(|e| (0, e.to_string()))?;
        if let Some(error) = headcount_runtime::service_error_of(&msg) {
            return Err(error);
        }
        Ok(msg.payload)
    }

    /// `headcount.kick`: whether an active session was ended.
    pub async fn kick(&self, account: &str, session: &str) -> bool {
        let r: headcount_protocol::wire::KickReply = self
            .request(
                subjects::endpoint::KICK,
                &serde_json::json!({ "account": account, "session": session }),
            )
            .await
            .expect("kick answers");
        r.kicked
    }

    pub async fn active(&self, account: &str) -> ActiveReply {
        self.request(
            subjects::endpoint::ACTIVE,
            &serde_json::json!({ "account": account }),
        )
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

/// Waits until somebody subscribes to `subject` (a request gets a reply or
/// "no responders" otherwise).
async fn wait_for_interest(client: &async_nats::Client, subject: &str) {
    // Heartbeat subscribers never reply: a request on a subject with a
    // subscriber times out instead of failing with "no responders".
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = tokio::time::timeout(
            Duration::from_millis(200),
            client.request(subject.to_string(), Bytes::new()),
        )
        .await;
        match r {
            Err(_) => return, // timed out: someone is subscribed
            Ok(Err(e)) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => {}
            Ok(_) => return,
        }
        assert!(Instant::now() < deadline, "no subscriber on {subject}");
        tokio::time::sleep(Duration::from_millis(50)).await;
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
        for i in 0..c.nodes.len() {
            c.spawn(i);
        }
        for i in 0..c.nodes.len() {
            c.wait_healthy(i).await;
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let routes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                format!(
                    "nats://route:{}@127.0.0.1:{}",
                    self.route_password, n.cluster
                )
            })
            .collect();
        let issuer =
            token_vendor::Issuer::from_seeds(&self.issuer_seed, &self.xkey_seed).expect("issuer");
        let node = &self.nodes[i];
        let log = self.store.path().join(format!("{}.log", node.name));
        let mut cmd = Command::new("nats-server");
        cmd.arg("-c")
            .arg(cluster_node_conf())
            .args(["-a", "127.0.0.1"])
            .arg("--cluster")
            .arg(format!("nats://127.0.0.1:{}", node.cluster))
            .arg("-sd")
            .arg(self.store.path().join(&node.name))
            .arg("-l")
            .arg(&log)
            .env("HEADCOUNT_NODE", &node.name)
            .env("HEADCOUNT_CLIENT_PORT", node.client.to_string())
            .env("HEADCOUNT_MONITOR_PORT", node.monitor.to_string())
            .env("HEADCOUNT_CLUSTER_PORT", node.cluster.to_string())
            .env("HEADCOUNT_WS_PORT", node.ws.to_string())
            .env("HEADCOUNT_ROUTE_PASSWORD", &self.route_password)
            .envs(Login::ALL.map(|l| (l.env(), l.password(&self.service_password))))
            .env("HEADCOUNT_CALLOUT_ISSUER", issuer.public_key())
            .env("HEADCOUNT_CALLOUT_XKEY", issuer.xkey_public())
            .env("HEADCOUNT_BIND", "127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, route) in routes.iter().enumerate() {
            cmd.env(format!("HEADCOUNT_ROUTE_{}", k + 1), route);
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start nats-server ({e}); run `deploy/dev test` to install it")
        });
        self.nodes[i].child = Some(child);
    }

    /// Waits until node `i` reports JetStream healthy (it has caught up).
    pub async fn wait_healthy(&self, i: usize) {
        // Plain /healthz also needs JetStream caught up with the meta leader.
        let url = format!("http://127.0.0.1:{}/healthz", self.nodes[i].monitor);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = reqwest::get(&url).await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster node {} did not become healthy",
                self.nodes[i].name
            );
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
