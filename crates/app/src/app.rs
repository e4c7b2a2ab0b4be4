//! [`App`]: the services of one process, started from [`Settings`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::kv;
use headcount_protocol::subjects::kv as keys;
use headcount_runtime::{
    BucketSettings, Buckets, Health, NatsOptions, Running, Shutdown, Wiring, http, relay::Relay,
};

use crate::settings::{Settings, SettingsError, check_sessions_ttl};

/// The services of one process, started by [`App::build`].
pub struct App {
    /// The readiness of every service here (what `/readyz` reports).
    pub health: Health,
    /// Every service's collectors (what `/metrics` serves).
    pub registry: prometheus::Registry,
    /// Where the token-vendor's HTTP API listens, if one runs here.
    pub http_addr: Option<SocketAddr>,
    /// Where `/metrics`, `/healthz` and `/readyz` listen, if on their own.
    pub metrics_addr: Option<SocketAddr>,
    services: Vec<Running>,
    listeners: Vec<tokio::task::JoinHandle<()>>,
    /// Every connection opened here, drained at the end.
    clients: Vec<async_nats::Client>,
    console: Option<async_nats::Client>,
    vendor: Option<token_vendor::Vendor>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("services", &self.services)
            .field("http_addr", &self.http_addr)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

/// Connects `opts` for the service of `health`: its `nats` component is
/// not ready until the connection first is, then follows it.
async fn connect(opts: &NatsOptions, health: &Health) -> anyhow::Result<async_nats::Client> {
    health.component(headcount_runtime::health::NATS);
    let client = opts.connect().await?;
    health.track_nats(&client);
    Ok(client)
}

/// Opens the buckets for the service of `health`, whose `buckets`
/// component is ready once they are.
async fn open_buckets(
    client: &async_nats::Client,
    settings: &BucketSettings,
    health: &Health,
) -> anyhow::Result<Buckets> {
    let open = health.component("buckets");
    let buckets = Buckets::open(client, settings).await?;
    open.set_ready(true);
    Ok(buckets)
}

/// Fails unless the sessions bucket was made for dictionaries of
/// `interval`: a handler or checker of another interval would read and
/// write other dictionaries than the rest of the deployment.
async fn check_interval(sessions: &kv::Store, interval: Duration) -> anyhow::Result<()> {
    let status = sessions
        .status()
        .await
        .context("reading the sessions bucket's settings")?;
    check_sessions_ttl(interval, status.info.config.max_age).map_err(|e| match e {
        SettingsError::SessionsTtl { .. } => anyhow::anyhow!(
            "{e}; the deployment runs with another --interval: use the same one everywhere, \
             or change it for all with `headcount buckets --interval {}s`",
            interval.as_secs()
        ),
        other => other.into(),
    })
}

/// The buckets a token-vendor uses.
struct VendorStores {
    revoked: kv::Store,
    limits: kv::Store,
    connections: kv::Store,
}

impl VendorStores {
    /// The buckets of `settings`, or (a vendor alone) the ones the other
    /// services made, waited for.
    async fn open(
        client: &async_nats::Client,
        settings: Option<&BucketSettings>,
        health: &Health,
        stop: &Shutdown,
    ) -> anyhow::Result<Self> {
        if let Some(settings) = settings {
            let b = open_buckets(client, settings, health).await?;
            return Ok(Self {
                revoked: b.revoked,
                limits: b.limits,
                connections: b.connections,
            });
        }
        let open = health.component("buckets");
        let existing = |bucket| headcount_runtime::buckets::open_existing(client, bucket, stop);
        let stores = Self {
            revoked: existing(keys::REVOKED_BUCKET).await?,
            limits: existing(keys::LIMITS_BUCKET).await?,
            connections: existing(keys::CONNECTIONS_BUCKET).await?,
        };
        open.set_ready(true);
        Ok(stores)
    }
}

impl App {
    /// Starts what `settings` names, each service on its own connection
    /// (and so with its own user's permissions), and returns once all are
    /// started; [`App::ready`] waits until they say they are ready.
    ///
    /// Order: the metrics listener first (so `/readyz` tells what is being
    /// waited for), the console's bucket update, then each service. The
    /// token-vendor's HTTP API listens once its buckets are open.
    pub async fn build(settings: Settings, stop: Shutdown) -> anyhow::Result<App> {
        settings.validate()?;
        let buckets = settings.buckets.clone();
        let Settings {
            console,
            handler,
            checker,
            vendor,
            metrics_addr,
            ..
        } = settings;
        let registry = http::registry();
        let health = Health::new();
        let mut app = App {
            health: health.clone(),
            registry: registry.clone(),
            http_addr: None,
            metrics_addr: None,
            services: Vec::new(),
            listeners: Vec::new(),
            clients: Vec::new(),
            console: None,
            vendor: None,
        };
        // Every scope exists from the start, so /readyz names what is
        // still missing rather than reporting a partial set as ready.
        let handler_health = handler.as_ref().map(|_| health.scope("heartbeat-handler"));
        let checker_health = checker.as_ref().map(|_| health.scope("checker"));
        let vendor_health = vendor.as_ref().map(|_| health.scope("token-vendor"));
        if let Some(addr) = metrics_addr {
            let router =
                http::metrics_router(registry.clone()).merge(http::health_router(health.clone()));
            let (addr, task) = http::serve(addr, router, stop.clone()).await?;
            tracing::info!(%addr, "metrics listening");
            app.metrics_addr = Some(addr);
            app.listeners.push(task);
        }
        if let Some(opts) = &console {
            let console = opts.connect().await?;
            // The console creates the buckets or brings their settings up to
            // date; the services' users may create a missing bucket but
            // change none.
            if let Some(settings) = &buckets {
                Buckets::ensure(&console, settings).await?;
            }
            app.clients.push(console.clone());
            app.console = Some(console);
        }
        // A handler and a checker in one process take each heartbeat once:
        // the checker hears those of the partitions the handler serves
        // from it.
        let relay = (handler.is_some() && checker.is_some())
            .then(|| Relay::new(headcount_protocol::partition::PARTITIONS));
        if let (Some(h), Some(scope)) = (handler, handler_health) {
            let mut wiring = app
                .wire(&h.nats, buckets.as_ref(), h.config.interval, scope, &stop)
                .await?;
            wiring.relay = relay.clone();
            let metrics = heartbeat_handler::Metrics::new(&registry)?;
            app.services
                .push(heartbeat_handler::start(h.config, metrics, wiring));
        }
        if let (Some(c), Some(scope)) = (checker, checker_health) {
            let mut wiring = app
                .wire(&c.nats, buckets.as_ref(), c.config.interval, scope, &stop)
                .await?;
            wiring.relay = relay;
            let metrics = checker::Metrics::new(&registry)?;
            app.services.push(checker::start(c.config, metrics, wiring));
        }
        if let (Some(v), Some(scope)) = (vendor, vendor_health) {
            let client = connect(&v.nats, &scope).await?;
            app.clients.push(client.clone());
            let stores = VendorStores::open(&client, buckets.as_ref(), &scope, &stop).await?;
            let vendor =
                token_vendor::Vendor::recording_plans(v.config, stores.limits.clone(), &registry)?;
            let access = token_vendor::Access::new(client.clone(), stores.connections.clone());
            let mut router = token_vendor::router(vendor.clone())
                .merge(token_vendor::browser_router(
                    vendor.clone(),
                    client.clone(),
                    stores.revoked.clone(),
                    v.browser,
                ))
                .merge(token_vendor::access_router(vendor.clone(), access.clone()));
            if metrics_addr.is_none() {
                router = router
                    .merge(http::metrics_router(registry.clone()))
                    .merge(http::health_router(health.clone()));
            }
            let (addr, task) = http::serve(v.http_addr, router, stop.clone()).await?;
            tracing::info!(%addr, "token-vendor http listening");
            app.http_addr = Some(addr);
            app.listeners.push(task);
            app.services.push(token_vendor::start(
                vendor.clone(),
                v.issuer,
                client,
                token_vendor::CalloutStores {
                    revoked: stores.revoked,
                    access,
                },
                scope,
                stop.clone(),
            ));
            app.vendor = Some(vendor);
        }
        Ok(app)
    }

    /// Connects a handler or checker as `opts` says, opens the buckets
    /// through that connection and checks that they were made for
    /// `interval`: what the service is then started with.
    async fn wire(
        &mut self,
        opts: &NatsOptions,
        buckets: Option<&BucketSettings>,
        interval: Duration,
        health: Health,
        stop: &Shutdown,
    ) -> anyhow::Result<Wiring> {
        let nats = connect(opts, &health).await?;
        self.clients.push(nats.clone());
        let buckets = open_buckets(&nats, bucket_settings(buckets)?, &health).await?;
        for sessions in buckets.sessions.all() {
            check_interval(sessions, interval).await?;
        }
        Ok(Wiring {
            nats,
            buckets,
            health,
            shutdown: stop.clone(),
            relay: None,
        })
    }

    /// Waits until every service here says it is ready, or fails with the
    /// first that ended instead.
    pub async fn ready(&mut self) -> anyhow::Result<()> {
        for service in &mut self.services {
            service.ready().await?;
        }
        // A service says it serves once it has subscribed, but a client's
        // flush only writes to the socket. A request the server answers
        // itself ($JS.API.INFO, which every service user may send) comes
        // back only after the server has read everything sent before it on
        // that connection, subscriptions included: after it, a request
        // from anyone finds the service.
        for client in &self.clients {
            async_nats::jetstream::new(client.clone())
                .query_account()
                .await
                .context("a round trip to the server after start")?;
        }
        Ok(())
    }

    /// [`App::ready`] within `within`.
    pub async fn ready_within(&mut self, within: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        match tokio::time::timeout(within, self.ready()).await {
            Ok(r) => r,
            Err(_) => anyhow::bail!(
                "services not ready after {:?}: waiting for {}",
                started.elapsed(),
                self.health.status().not_ready.join(", ")
            ),
        }
    }

    /// The console's connection, if the settings named one.
    pub fn console(&self) -> Option<&async_nats::Client> {
        self.console.as_ref()
    }

    /// The token-vendor running here, if one does.
    pub fn vendor(&self) -> Option<&token_vendor::Vendor> {
        self.vendor.as_ref()
    }

    /// Whether a service has ended (they end only when stopped, or on a
    /// fatal error).
    pub fn any_finished(&self) -> bool {
        self.services.iter().any(Running::is_finished)
    }

    /// After the stop was fired: waits for every service and listener to
    /// end, drains the connections and waits for them to close. Returns
    /// the first service's error.
    pub async fn join(self) -> anyhow::Result<()> {
        let results = futures::future::join_all(self.services.into_iter().map(Running::join)).await;
        let _ = futures::future::join_all(self.listeners).await;
        for client in &self.clients {
            let _ = client.drain().await;
        }
        // Drained connections close on their own time and log it: let
        // them finish before the caller says it stopped.
        futures::future::join_all(self.clients.iter().map(closed)).await;
        results.into_iter().collect()
    }

    /// Ends every service at once, without a drain.
    pub fn abort(self) {
        for service in self.services {
            service.abort();
        }
        for listener in self.listeners {
            listener.abort();
        }
    }
}

fn bucket_settings(buckets: Option<&BucketSettings>) -> anyhow::Result<&BucketSettings> {
    buckets.context("the handler and the checker need bucket settings")
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
