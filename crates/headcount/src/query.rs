//! The request-reply commands: `active`, `check`, `limits`, `kick`, `token`.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use headcount_protocol::subjects::{endpoint, endpoint_subject};
use headcount_protocol::wire::{ActiveReply, CheckReply, KickReply, LimitsReply, TokenReply};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::config::NatsArgs;

#[derive(Debug, Args)]
pub struct Common {
    #[command(flatten)]
    nats: NatsArgs,
    /// Print the raw JSON reply.
    #[arg(long)]
    json: bool,
}

/// Sends one request; a service error becomes a readable error.
async fn call<Rep: DeserializeOwned + Serialize>(
    common: &Common,
    ep: &str,
    body: serde_json::Value,
) -> anyhow::Result<Rep> {
    let client = common.nats.options("headcount-cli")?.connect().await?;
    let msg = tokio::time::timeout(
        Duration::from_secs(5),
        client.request(endpoint_subject(ep), serde_json::to_vec(&body)?.into()),
    )
    .await
    .context("no answer within 5 s")?
    .with_context(|| format!("calling {}", endpoint_subject(ep)))?;
    if let Some(h) = &msg.headers
        && let Some(code) = h.get(async_nats::service::NATS_SERVICE_ERROR_CODE)
    {
        let text = h
            .get(async_nats::service::NATS_SERVICE_ERROR)
            .map(|v| v.to_string())
            .unwrap_or_default();
        bail!("{} ({})", text, code);
    }
    let reply: Rep = serde_json::from_slice(&msg.payload).context("unreadable reply")?;
    if common.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    }
    Ok(reply)
}

fn span(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn ago(ms: u64) -> String {
    let now = headcount_protocol::now_millis();
    format!("{} ago", span(now.saturating_sub(ms) / 1000))
}

#[derive(Debug, Args)]
pub struct ActiveArgs {
    account: String,
    #[command(flatten)]
    common: Common,
}

pub async fn active(a: ActiveArgs) -> anyhow::Result<()> {
    let r: ActiveReply = call(&a.common, endpoint::ACTIVE, json!({"account": a.account})).await?;
    if a.common.json {
        return Ok(());
    }
    println!(
        "account {}: {} of {} active ({})",
        r.account, r.active, r.limit, r.policy
    );
    if r.sessions.is_empty() {
        return Ok(());
    }
    println!(
        "{:<20} {:<24} {:<12} {:<10} {:<10} {:<14} CONTENT",
        "DEVICE", "SESSION", "SINCE", "KIND", "REGION", "LAST SEEN"
    );
    for s in r.sessions {
        println!(
            "{:<20} {:<24} {:<12} {:<10} {:<10} {:<14} {}",
            s.device.as_str(),
            s.session.as_str(),
            ago(s.since),
            s.kind.as_deref().unwrap_or("-"),
            s.region.as_deref().unwrap_or("-"),
            ago(s.last_seen),
            s.content.as_deref().unwrap_or("-"),
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    account: String,
    device: String,
    /// The session about to play (named as `by` in eviction notices).
    #[arg(long)]
    session: Option<String>,
    #[arg(long)]
    content: Option<String>,
    #[command(flatten)]
    common: Common,
}

pub async fn check(a: CheckArgs) -> anyhow::Result<()> {
    let r: CheckReply = call(
        &a.common,
        endpoint::CHECK,
        json!({"account": a.account, "device": a.device, "session": a.session, "content": a.content}),
    )
    .await?;
    if !a.common.json {
        let verdict = if r.allowed {
            "may play"
        } else {
            "is refused: the account is at its limit"
        };
        println!(
            "{} {verdict} ({} of {} seats taken, {})",
            a.device, r.active, r.limit, r.policy
        );
        for e in r.evicted {
            println!(
                "  evicted {} (session {}) to make room",
                e.device.as_str(),
                e.session.as_str()
            );
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct LimitsArgs {
    #[command(subcommand)]
    command: LimitsCommand,
}

#[derive(Debug, Subcommand)]
enum LimitsCommand {
    /// Show an account's limit and policy.
    Get {
        account: String,
        #[command(flatten)]
        common: Common,
    },
    /// Set an account's limit (and optionally its policy).
    Set {
        account: String,
        #[arg(allow_negative_numbers = true)]
        limit: i64,
        /// evict-oldest or reject-new.
        #[arg(long)]
        policy: Option<String>,
        #[command(flatten)]
        common: Common,
    },
}

pub async fn limits(a: LimitsArgs) -> anyhow::Result<()> {
    let (r, common): (LimitsReply, Common) = match a.command {
        LimitsCommand::Get { account, common } => (
            call(&common, endpoint::LIMITS_GET, json!({"account": account})).await?,
            common,
        ),
        LimitsCommand::Set {
            account,
            limit,
            policy,
            common,
        } => (
            call(
                &common,
                endpoint::LIMITS_SET,
                json!({"account": account, "limit": limit, "policy": policy}),
            )
            .await?,
            common,
        ),
    };
    if !common.json {
        println!("account {}: limit {} ({})", r.account, r.limit, r.policy);
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct KickArgs {
    account: String,
    session: String,
    #[command(flatten)]
    common: Common,
}

pub async fn kick(a: KickArgs) -> anyhow::Result<()> {
    let r: KickReply = call(
        &a.common,
        endpoint::KICK,
        json!({"account": a.account, "session": a.session}),
    )
    .await?;
    if !a.common.json {
        println!(
            "{}",
            if r.kicked {
                "kicked"
            } else {
                "no such active session"
            }
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    account: String,
    device: String,
    #[command(flatten)]
    common: Common,
}

pub async fn token(a: TokenArgs) -> anyhow::Result<()> {
    let r: TokenReply = call(
        &a.common,
        endpoint::TOKEN,
        json!({"account": a.account, "device": a.device}),
    )
    .await?;
    if !a.common.json {
        let left = r
            .expires_at
            .saturating_sub(headcount_protocol::now_millis())
            / 1000;
        println!("session {}, expires in {}", r.session.as_str(), span(left));
        println!("{}", r.token);
    }
    Ok(())
}
