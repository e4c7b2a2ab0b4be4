//! Each service run alone, as deployed: `headcount handler|checker|token-vendor`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use headcount_app::{App, CheckerSettings, HandlerSettings, Settings, VendorSettings};
use headcount_runtime::{Buckets, Shutdown, shutdown};

use crate::config::{BrowserArgs, EngineArgs, NatsArgs, PlanArgs, humantime_secs};

#[derive(Debug, Args)]
pub struct HandlerArgs {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    engine: EngineArgs,
    /// Serve /metrics, /healthz and /readyz on this address.
    #[arg(long, env = "HEADCOUNT_METRICS_ADDR", default_value = "0.0.0.0:9091")]
    metrics_addr: SocketAddr,
}

#[derive(Debug, Args)]
pub struct CheckerArgs {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    plans: PlanArgs,
    /// Serve /metrics, /healthz and /readyz on this address.
    #[arg(long, env = "HEADCOUNT_METRICS_ADDR", default_value = "0.0.0.0:9092")]
    metrics_addr: SocketAddr,
}

#[derive(Debug, Args)]
pub struct TokenVendorArgs {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    vendor: VendorArgs,
    /// Serve POST /v1/tokens, the JWKS, /metrics, /healthz and /readyz on
    /// this address.
    #[arg(long, env = "HEADCOUNT_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
}

/// What a token-vendor is told on the command line, run alone or by `up`.
#[derive(Debug, Clone, Args)]
pub struct VendorArgs {
    #[command(flatten)]
    pub plans: PlanArgs,
    #[command(flatten)]
    pub tokens: TokenArgs,
    #[command(flatten)]
    pub browser: BrowserArgs,
}

/// Token settings.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// Bearer secret of token-vendor's operator endpoints: device tokens
    /// (POST /v1/tokens), backend and operator tokens (POST
    /// /v1/backend-tokens, /v1/operator-tokens), revoking them (POST
    /// /v1/tokens/revoke) and key rotation (POST /v1/keys/rotate).
    /// `token-vendor` requires it; `up` generates one when not given
    /// (`operator_key` in <data-dir>/up.json).
    #[arg(long, env = "HEADCOUNT_OPERATOR_KEY", hide_env_values = true)]
    pub operator_key: Option<String>,
    /// How long a device token lives.
    #[arg(long, env = "HEADCOUNT_TOKEN_TTL", default_value = "15m", value_parser = humantime_secs)]
    pub token_ttl: Duration,
    /// The `iss` claim of the tokens issued, and the only one accepted
    /// (every token-vendor of a deployment must agree).
    #[arg(long, env = "HEADCOUNT_TOKEN_ISSUER", default_value = "headcount")]
    pub issuer: String,
    /// The `aud` claim of the tokens issued, and the only one accepted
    /// (every token-vendor of a deployment must agree).
    #[arg(
        long,
        env = "HEADCOUNT_TOKEN_AUDIENCE",
        default_value = "headcount-devices"
    )]
    pub audience: String,
    /// How long a backend token (POST /v1/backend-tokens) lives by default,
    /// and the longest one may ask for; at most 24h.
    #[arg(long, env = "HEADCOUNT_CLIENT_TOKEN_TTL", default_value = "24h", value_parser = humantime_secs)]
    pub client_token_ttl: Duration,
    /// Wrong operator keys one client address may present (RATE/s,BURST:
    /// BURST at once, then RATE a second; `off` for no limit). Once spent,
    /// every operator request from that address gets 429 with Retry-After,
    /// its key unread, until one has refilled.
    #[arg(
        long,
        env = "HEADCOUNT_OPERATOR_KEY_FAILURE_LIMIT",
        default_value_t = token_vendor::ThrottleConfig::default().operator_key_failures
    )]
    pub operator_key_failure_limit: token_vendor::Rate,
    /// Refused device connections one client host may cause at the auth
    /// callout (RATE/s,BURST; `off` for no limit). Once spent, the host's
    /// connections whose tokens do not verify are refused at once (no
    /// revocation lookup, no log line) until it has refilled; a valid token
    /// is never shed, so garbage sent from an address that devices share
    /// (NAT, the TLS proxy in front of the WebSocket listener) does not lock
    /// them out. Other hosts are unaffected.
    #[arg(
        long,
        env = "HEADCOUNT_CALLOUT_REFUSAL_LIMIT",
        default_value_t = token_vendor::ThrottleConfig::default().callout_refusals
    )]
    pub callout_refusal_limit: token_vendor::Rate,
    /// Count HTTP clients by the last address of X-Forwarded-For instead of
    /// the connection's peer. Only behind a reverse proxy that sets that
    /// header and that clients cannot bypass: otherwise any client can
    /// claim any address and escape the per-address limits.
    #[arg(long, env = "HEADCOUNT_TRUST_FORWARDED_FOR")]
    pub trust_forwarded_for: bool,
}

impl VendorArgs {
    /// The token-vendor's configuration, keeping its keys in `data_dir`.
    pub fn config(&self, data_dir: PathBuf, operator_key: String) -> token_vendor::Config {
        let (tokens, browser) = (&self.tokens, &self.browser);
        token_vendor::Config {
            data_dir,
            issuer: tokens.issuer.clone(),
            audience: tokens.audience.clone(),
            token_ttl: tokens.token_ttl,
            operator_key,
            plans: self.plans.names(),
            client_token_ttl: tokens.client_token_ttl,
            throttle: token_vendor::ThrottleConfig {
                operator_key_failures: tokens.operator_key_failure_limit,
                callout_refusals: tokens.callout_refusal_limit,
                trust_forwarded_for: tokens.trust_forwarded_for,
                refresh: browser.refresh_limit,
                leave: browser.leave_limit,
                demo_tokens: browser.demo_token_limit,
            },
        }
    }
}

/// How long a service may take to drain after SIGTERM before it exits anyway.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// Fires `trigger` on SIGINT or SIGTERM. The drain that follows gets
/// [`SHUTDOWN_GRACE`]; a second signal, or a drain that outlasts it (NATS
/// gone, say), ends the process at once instead of hanging.
pub async fn until_signal(trigger: shutdown::Trigger) {
    shutdown::signal().await;
    tracing::info!("shutting down");
    trigger.fire();
    tokio::select! {
        _ = shutdown::signal() => tracing::warn!("second signal: exiting without draining"),
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::error!(grace = ?SHUTDOWN_GRACE, "shutdown did not finish in time: exiting");
        }
    }
    std::process::exit(1);
}

/// Runs the services `settings` names until SIGINT or SIGTERM, then
/// drains them. The listeners come up first, so `/healthz` answers and
/// `/readyz` says what is being waited for while NATS is reached.
async fn run(settings: Settings) -> anyhow::Result<()> {
    let (trigger, stop) = Shutdown::new();
    let app = App::build(settings, stop).await?;
    tokio::spawn(until_signal(trigger));
    app.join().await
}

pub async fn handler(a: HandlerArgs) -> anyhow::Result<()> {
    run(Settings {
        buckets: Some(a.engine.buckets()),
        handler: Some(HandlerSettings {
            nats: a.nats.options("headcount-handler")?,
            config: a.engine.handler(),
        }),
        metrics_addr: Some(a.metrics_addr),
        ..Settings::default()
    })
    .await
}

pub async fn checker(a: CheckerArgs) -> anyhow::Result<()> {
    run(Settings {
        buckets: Some(a.engine.buckets()),
        checker: Some(CheckerSettings {
            nats: a.nats.options("headcount-checker")?,
            config: a.engine.checker(&a.plans)?,
        }),
        metrics_addr: Some(a.metrics_addr),
        ..Settings::default()
    })
    .await
}

pub async fn token_vendor(a: TokenVendorArgs) -> anyhow::Result<()> {
    let operator_key = a
        .vendor
        .tokens
        .operator_key
        .clone()
        .context("--operator-key (or HEADCOUNT_OPERATOR_KEY) is required")?;
    let browser = a.vendor.browser.config(Vec::new(), false);
    if browser.websocket_urls.is_empty() {
        tracing::warn!("no --websocket-url: browser devices are not told where NATS is");
    }
    // A token-vendor alone knows no interval: it waits for the buckets the
    // handler and the checker make, and serves /metrics, /healthz and
    // /readyz on its HTTP listener.
    run(Settings {
        vendor: Some(VendorSettings {
            nats: a.nats.options("headcount-token-vendor")?,
            config: a.vendor.config(a.nats.data_dir.clone(), operator_key),
            issuer: Some(token_vendor::Issuer::open(&a.nats.data_dir)?),
            browser,
            http_addr: a.http_addr,
        }),
        ..Settings::default()
    })
    .await
}

/// Resolves on SIGINT or SIGTERM, without logging.
pub async fn until_signal_quiet() {
    shutdown::signal().await;
}

#[derive(Debug, Args)]
pub struct BucketsArgs {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    engine: EngineArgs,
}

/// `headcount buckets`: creates the KV buckets or brings their settings
/// (TTLs, replicas) up to date, as the console user. The services create a
/// missing bucket themselves but change none: their NATS users may not
/// update a stream.
pub async fn buckets(a: BucketsArgs) -> anyhow::Result<()> {
    let client = a.nats.options("headcount-buckets")?.connect().await?;
    let settings = a.engine.buckets();
    Buckets::ensure(&client, &settings).await?;
    println!(
        "buckets up to date: {} replica(s), sessions TTL {:?}, revocations TTL {:?}",
        settings.replicas, settings.sessions_ttl, settings.revoked_ttl
    );
    client.drain().await.context("draining nats connection")?;
    Ok(())
}
