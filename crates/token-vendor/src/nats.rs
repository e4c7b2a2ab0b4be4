//! The `headcount.token` endpoint, as a NATS micro service.

use async_nats::service::ServiceExt;
use bytes::Bytes;
use futures::StreamExt;
use headcount_protocol::subjects::{self, endpoint};
use headcount_protocol::wire::{self, TokenRequest, error_code};
use headcount_runtime::{Health, Shutdown, service_error};

use crate::Vendor;
use crate::metrics::BAD_REQUEST;

/// The micro service name, as `$SRV.PING|INFO|STATS` report it.
pub const SERVICE_NAME: &str = "headcount-token-vendor";

/// Serves `headcount.token` until `shutdown`, then stops the service (its
/// endpoint unsubscribes) and returns. Every instance joins the default
/// queue group, so several vendors share the requests.
///
/// `health` is this endpoint's scope (the caller's, which tracks the NATS
/// connection): serving from the moment the endpoint is up until it stops.
pub async fn serve_nats(
    vendor: Vendor,
    nats: async_nats::Client,
    health: Health,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let service = nats
        .service_builder()
        .description("headcount: device tokens for NATS connections")
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("starting token vendor service: {e}"))?;
    let mut requests = match service
        .group(subjects::SERVICE_PREFIX)
        .endpoint(endpoint::TOKEN)
        .await
    {
        Ok(requests) => requests,
        Err(e) => {
            let _ = service.stop().await;
            anyhow::bail!("adding endpoint {}: {e}", endpoint::TOKEN);
        }
    };
    let serving = health.serving();
    tracing::info!(
        subject = %subjects::endpoint_subject(endpoint::TOKEN),
        "token endpoint ready"
    );

    let mut stop = std::pin::pin!(shutdown.wait());
    let result = loop {
        tokio::select! {
            _ = &mut stop => break Ok(()),
            request = requests.next() => match request {
                // Signing takes microseconds: answering inline keeps the
                // loop simple and shutdown prompt.
                Some(request) => answer(&vendor, request).await,
                None => break Err(anyhow::anyhow!("token endpoint closed")),
            },
        }
    };

    drop(serving);
    if let Err(e) = requests.stop().await {
        tracing::warn!(error = %e, "stopping token endpoint");
    }
    if let Err(e) = service.stop().await {
        tracing::warn!(error = %e, "stopping token vendor service");
    }
    tracing::info!("token endpoint stopped");
    result
}

async fn answer(vendor: &Vendor, request: async_nats::service::Request) {
    let reply = match handle(vendor, &request.message.payload) {
        Ok((bytes, Some((account, plan)))) => {
            vendor.record_plan(&account, &plan).await;
            Ok(bytes)
        }
        Ok((bytes, None)) => Ok(bytes),
        Err(e) => Err(e),
    };
    if let Err(e) = request.respond(reply).await {
        tracing::warn!(error = %e, "sending token reply");
    }
}

/// The reply, and the account's plan to record when the token carries one.
type Handled = (Bytes, Option<(headcount_protocol::AccountId, String)>);

fn handle(vendor: &Vendor, payload: &[u8]) -> Result<Handled, async_nats::service::error::Error> {
    let request: TokenRequest = wire::parse_request(payload).map_err(|e| {
        vendor.count_rejection(BAD_REQUEST);
        tracing::debug!(error = %e, "refusing token request");
        service_error(error_code::BAD_REQUEST, e)
    })?;
    let reply = vendor
        .issue_with_plan(
            &request.account,
            &request.device,
            request.plan.as_deref(),
            "nats",
        )
        .map_err(|e| match e {
            crate::IssueError::UnknownPlan(..) => {
                vendor.count_rejection(BAD_REQUEST);
                service_error(error_code::BAD_REQUEST, e)
            }
            crate::IssueError::Internal(e) => {
                tracing::error!(error = %format!("{e:#}"), "issuing token");
                service_error(error_code::INTERNAL, "issuing the token failed")
            }
        })?;
    let bytes = serde_json::to_vec(&reply).map(Bytes::from).map_err(|e| {
        tracing::error!(error = %e, "encoding token reply");
        service_error(error_code::INTERNAL, "encoding the token reply failed")
    })?;
    Ok((bytes, request.plan.map(|p| (request.account, p))))
}
