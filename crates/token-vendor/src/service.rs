//! One token-vendor's NATS side, started as a service of its own.

use headcount_runtime::{Health, Running, Shutdown};

use crate::{CalloutStores, Issuer, Vendor, serve_callout, serve_nats};

/// Starts the `headcount.token` endpoint and (with an issuer) the auth
/// callout on their own task: ready once both serve. `None` runs no callout
/// (devices log in with a shared password: `up --insecure`).
pub fn start(
    vendor: Vendor,
    issuer: Option<Issuer>,
    client: async_nats::Client,
    stores: CalloutStores,
    health: Health,
    stop: Shutdown,
) -> Running {
    Running::spawn("token-vendor", health.clone(), async move {
        let tokens = serve_nats(
            vendor.clone(),
            client.clone(),
            health.scope("token-endpoint"),
            stop.clone(),
        );
        let _serving = health.serving();
        let Some(issuer) = issuer else {
            return tokens.await;
        };
        tracing::info!(
            issuer = %issuer.public_key(),
            xkey = %issuer.xkey_public(),
            "auth callout keys (the `issuer` and `xkey` of nats.conf's auth_callout)"
        );
        let callout = serve_callout(
            vendor,
            issuer,
            client,
            stores,
            health.scope("callout"),
            stop,
        );
        tokio::try_join!(tokens, callout).map(|_| ())
    })
}
