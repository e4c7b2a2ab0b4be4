//! The Prometheus `/metrics` endpoint every process serves, and next to it
//! `/healthz` and `/readyz` for orchestrators.

use std::net::SocketAddr;

use anyhow::Context;
use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus::{Encoder, Registry, TextEncoder};

use crate::Shutdown;
use crate::health::Health;

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

/// A router serving `GET /healthz` (the process is up: always 200 `ok`)
/// and `GET /readyz` (200 `ok` when every component of `health` is ready,
/// else 503 with a line naming those that are not, e.g.
/// `not ready: checker/nats`). Merge it next to [`metrics_router`].
pub fn health_router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health)
}

async fn healthz() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-store")], "ok\n")
}

async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    let status = health.status();
    let (code, body) = if status.is_ready() {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", status.not_ready.join(", ")),
        )
    };
    (code, [(header::CACHE_CONTROL, "no-store")], body)
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The status line and body of `GET path` on `addr`.
    async fn get(addr: SocketAddr, path: &str) -> (String, String) {
        let mut conn = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connects");
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        conn.write_all(req.as_bytes()).await.expect("writes");
        let mut text = String::new();
        conn.read_to_string(&mut text).await.expect("reads");
        let status = text.lines().next().unwrap_or_default().to_string();
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or_default();
        (status, body.to_string())
    }

    #[tokio::test]
    async fn healthz_is_ok_and_readyz_follows_the_health() {
        let health = Health::new();
        let scope = health.scope("checker");
        let limits = scope.component("limits");
        let (trigger, stop) = Shutdown::new();
        let router = metrics_router(registry()).merge(health_router(health));
        let (addr, task) = serve("127.0.0.1:0".parse().expect("addr"), router, stop)
            .await
            .expect("serves");

        assert_eq!(
            get(addr, "/healthz").await,
            ("HTTP/1.1 200 OK".into(), "ok\n".into())
        );
        let (status, body) = get(addr, "/readyz").await;
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
        assert_eq!(body, "not ready: checker, checker/limits\n");

        let serving = scope.serving();
        limits.set_ready(true);
        assert_eq!(
            get(addr, "/readyz").await,
            ("HTTP/1.1 200 OK".into(), "ok\n".into())
        );
        drop(serving);
        assert_eq!(get(addr, "/readyz").await.1, "not ready: checker\n");
        assert!(get(addr, "/metrics").await.0.ends_with("200 OK"));

        trigger.fire();
        let _ = task.await;
    }
}
