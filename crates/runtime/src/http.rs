//! The Prometheus `/metrics` endpoint every process serves.

use std::net::SocketAddr;

use anyhow::Context;
use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus::{Encoder, Registry, TextEncoder};

use crate::Shutdown;

/// A registry for one process's metrics, with the standard process metrics
/// (`process_resident_memory_bytes`, CPU seconds, open file descriptors)
/// already in it.
pub fn registry() -> Registry {
    let registry = Registry::new();
    #[cfg(target_os = "linux")]
    if let Err(e) = registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    )) {
        tracing::warn!(error = %e, "process metrics unavailable");
    }
    registry
}

/// A router serving `GET /metrics` from `registry`; merge it into another
/// router or serve it alone with [`serve`].
pub fn metrics_router(registry: Registry) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .with_state(registry)
}

async fn render(State(registry): State<Registry>) -> impl IntoResponse {
    let mut buf = Vec::new();
    let encoder = TextEncoder::new();
    if let Err(e) = encoder.encode(&registry.gather(), &mut buf) {
        tracing::error!(error = %e, "encoding metrics");
    }
    (
        [(header::CONTENT_TYPE, encoder.format_type().to_string())],
        buf,
    )
}

/// Binds `addr` and serves `router` until shutdown. Returns the bound
/// address (useful with port 0) and the server task.
///
/// Every request carries its peer's address as
/// `axum::extract::ConnectInfo<SocketAddr>` (token-vendor throttles by it).
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: Shutdown,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding http listener on {addr}"))?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown.wait())
        .await
        {
            tracing::error!(error = %e, "http server failed");
        }
    });
    Ok((local, task))
}
