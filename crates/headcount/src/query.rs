//! The request-reply commands: `active`, `check`, `limits`, `kick`, `token`.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use headcount_protocol::subjects::{endpoint, endpoint_subject};
use headcount_protocol::wire::{
    ActiveReply, CheckReply, KickReply, LimitsReply, StatsReply, TokenReply,
};
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
    if let Some((code, text)) = headcount_runtime::service_error_of(&msg) {
        bail!("{text} ({code})");
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
            s.labels.kind().unwrap_or("-"),
            s.labels.region().unwrap_or("-"),
            ago(s.last_seen),
            s.labels.content().unwrap_or("-"),
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
    /// What it is about to play (for per-content limits).
    #[arg(long)]
    content: Option<String>,
    /// Takeover: the session to sign out if a seat is needed.
    #[arg(long)]
    evict: Option<String>,
    #[command(flatten)]
    common: Common,
}

pub async fn check(a: CheckArgs) -> anyhow::Result<()> {
    let r: CheckReply = call(
        &a.common,
        endpoint::CHECK,
        json!({"account": a.account, "device": a.device, "session": a.session,
               "content": a.content, "evict": a.evict}),
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
    /// Change an account's plan, limit, policy, per-content limit or grace
    /// (what is not given stays as it was).
    Set {
        account: String,
        /// The number of sessions allowed at once.
        #[arg(allow_negative_numbers = true)]
        limit: Option<i64>,
        /// A plan by name (see `--plan` of the checker).
        #[arg(long)]
        plan: Option<String>,
        /// evict-oldest, reject-new or evict-least-active.
        #[arg(long)]
        policy: Option<String>,
        /// At most this many sessions on one content.
        #[arg(long, allow_negative_numbers = true)]
        per_content: Option<i64>,
        /// Allow SEATS extra sessions for SECS seconds, e.g. `1/60`.
        #[arg(long, value_parser = parse_grace)]
        grace: Option<(i64, i64)>,
        /// Forget everything set before (back to the token's plan or the default).
        #[arg(long)]
        reset: bool,
        #[command(flatten)]
        common: Common,
    },
}

fn parse_grace(s: &str) -> Result<(i64, i64), String> {
    let (a, b) = s
        .split_once('/')
        .ok_or_else(|| "grace is SEATS/SECS, e.g. 1/60".to_string())?;
    let n = |x: &str| {
        x.trim()
            .trim_end_matches('s')
            .parse::<i64>()
            .map_err(|_| "grace is SEATS/SECS, e.g. 1/60".to_string())
    };
    Ok((n(a)?, n(b)?))
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
            plan,
            policy,
            per_content,
            grace,
            reset,
            common,
        } => {
            let mut body = json!({"account": account, "reset": reset});
            for (k, v) in [
                ("limit", json!(limit)),
                ("plan", json!(plan)),
                ("policy", json!(policy)),
                ("per_content", json!(per_content)),
                (
                    "grace",
                    json!(grace.map(|(seats, secs)| json!({"seats": seats, "secs": secs}))),
                ),
            ] {
                if !v.is_null() {
                    body[k] = v;
                }
            }
            (call(&common, endpoint::LIMITS_SET, body).await?, common)
        }
    };
    if !common.json {
        let mut line = format!("account {}: limit {} ({})", r.account, r.limit, r.policy);
        if let Some(p) = &r.plan {
            line.push_str(&format!(", plan {p}"));
        }
        if let Some(n) = r.per_content {
            line.push_str(&format!(", at most {n} per content"));
        }
        if let Some(g) = r.grace {
            line.push_str(&format!(", grace {} extra for {}s", g.seats, g.secs));
        }
        println!("{line}");
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// One account (default: all accounts, with the busiest listed).
    account: Option<String>,
    /// How many of the busiest accounts to list.
    #[arg(long, default_value_t = 10)]
    top: u32,
    #[command(flatten)]
    common: Common,
}

fn print_counts(title: &str, counts: &std::collections::BTreeMap<String, u32>) {
    let mut v: Vec<(&String, &u32)> = counts.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    let parts: Vec<String> = v.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!(
        "  {title:<9} {}",
        if parts.is_empty() {
            "-".into()
        } else {
            parts.join(", ")
        }
    );
}

pub async fn stats(a: StatsArgs) -> anyhow::Result<()> {
    let r: StatsReply = call(
        &a.common,
        endpoint::STATS,
        json!({"account": a.account, "top": a.top}),
    )
    .await?;
    if !a.common.json {
        match &r.account {
            Some(acct) => println!(
                "account {acct}: {} active, peak {} over the last {} min",
                r.active, r.peak, r.window_minutes
            ),
            None => println!(
                "all accounts: {} active, peak {} over the last {} min",
                r.active, r.peak, r.window_minutes
            ),
        }
        print_counts("content", &r.by_content);
        print_counts("kind", &r.by_kind);
        print_counts("region", &r.by_region);
        if !r.top.is_empty() {
            println!("  busiest:");
            for u in &r.top {
                println!(
                    "    {:<24} {:>5} / {}",
                    u.account.as_str(),
                    u.active,
                    u.limit
                );
            }
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Refresh period.
    #[arg(long, default_value = "1s", value_parser = crate::config::humantime_secs)]
    every: Duration,
    /// Accounts shown.
    #[arg(long, default_value_t = 20)]
    rows: u32,
    #[command(flatten)]
    common: Common,
}

/// A live view of the busiest accounts, redrawn in place like `top`.
pub async fn top(a: TopArgs) -> anyhow::Result<()> {
    let client = a.common.nats.options("headcount-top")?.connect().await?;
    let mut tick = tokio::time::interval(a.every.max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = crate::services::until_signal_quiet() => break,
            _ = tick.tick() => {}
        }
        let body = serde_json::to_vec(&json!({"top": a.rows}))?;
        let r: StatsReply = match client
            .request(endpoint_subject(endpoint::STATS), body.into())
            .await
        {
            Ok(msg) => match serde_json::from_slice(&msg.payload) {
                Ok(r) => r,
                Err(e) => bail!("unreadable stats reply: {e}"),
            },
            Err(e) => {
                eprintln!("stats request failed: {e}");
                continue;
            }
        };
        // Clear the screen and draw from the top-left corner.
        let mut out = String::from("\x1b[2J\x1b[H");
        out.push_str(&format!(
            "headcount top - {} active, peak {} (last {} min)\n\n",
            r.active, r.peak, r.window_minutes
        ));
        out.push_str(&format!(
            "{:<28} {:>7} {:>7}  {}\n",
            "ACCOUNT", "ACTIVE", "LIMIT", "USE"
        ));
        for u in &r.top {
            let width = 20usize;
            let filled = (u.active as usize * width / u.limit.max(1) as usize).min(width);
            let over = if u.active > u.limit { " OVER" } else { "" };
            out.push_str(&format!(
                "{:<28} {:>7} {:>7}  [{}{}]{over}\n",
                u.account.as_str(),
                u.active,
                u.limit,
                "#".repeat(filled),
                " ".repeat(width - filled)
            ));
        }
        let kinds: Vec<String> = r.by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let regions: Vec<String> = r
            .by_region
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        out.push_str(&format!(
            "\nkinds:   {}\nregions: {}\n",
            kinds.join(", "),
            regions.join(", ")
        ));
        print!("{out}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
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
    /// The account's plan, carried in the token.
    #[arg(long)]
    plan: Option<String>,
    #[command(flatten)]
    common: Common,
}

pub async fn token(a: TokenArgs) -> anyhow::Result<()> {
    let mut body = json!({"account": a.account, "device": a.device});
    if let Some(p) = &a.plan {
        body["plan"] = json!(p);
    }
    let r: TokenReply = call(&a.common, endpoint::TOKEN, body).await?;
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

#[derive(Debug, Args)]
pub struct BackendTokenArgs {
    /// The backend's name (shows in the server's logs), e.g. `web-1`.
    name: String,
    /// Lifetime, at most the token-vendor's --client-token-ttl (24h).
    #[arg(long, value_parser = crate::config::humantime_secs)]
    ttl: Option<Duration>,
    /// token-vendor's HTTP API. Default: the one in <data-dir>/up.json.
    #[arg(long, env = "HEADCOUNT_HTTP_URL")]
    http_url: Option<String>,
    /// The operator key. Default: the one in <data-dir>/up.json.
    #[arg(long, env = "HEADCOUNT_OPERATOR_KEY", hide_env_values = true)]
    operator_key: Option<String>,
    /// Directory holding up.json.
    #[arg(long, env = "HEADCOUNT_DATA_DIR", default_value = ".headcount")]
    data_dir: std::path::PathBuf,
    /// Print the raw JSON reply.
    #[arg(long)]
    json: bool,
}

/// `headcount backend-token NAME`: a backend token from token-vendor's HTTP
/// API (`POST /v1/backend-tokens`, operator key).
pub async fn backend_token(a: BackendTokenArgs) -> anyhow::Result<()> {
    let up = if a.http_url.is_none() || a.operator_key.is_none() {
        Some(crate::config::UpInfo::load(&a.data_dir)?)
    } else {
        None
    };
    let http = a
        .http_url
        .or_else(|| up.as_ref().map(|u| u.http_url.clone()))
        .context("--http-url is required without up.json")?;
    let key = a
        .operator_key
        .or_else(|| up.as_ref().map(|u| u.operator_key.clone()))
        .context("--operator-key is required without up.json")?;
    let mut body = json!({ "name": a.name });
    if let Some(ttl) = a.ttl {
        body["ttl_secs"] = json!(ttl.as_secs());
    }
    let response = reqwest::Client::new()
        .post(format!("{}/v1/backend-tokens", http.trim_end_matches('/')))
        .bearer_auth(key)
        .json(&body)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .with_context(|| format!("calling {http}"))?;
    let status = response.status();
    let reply: serde_json::Value = response.json().await.context("unreadable reply")?;
    if !status.is_success() {
        bail!(
            "{} ({})",
            reply["error"].as_str().unwrap_or("refused"),
            status.as_u16()
        );
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    let left = reply["expires_at"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(headcount_protocol::now_millis())
        / 1000;
    println!(
        "backend token, expires in {}; connect with inbox prefix {}",
        span(left),
        reply["inbox_prefix"].as_str().unwrap_or("")
    );
    println!("{}", reply["token"].as_str().unwrap_or(""));
    Ok(())
}

/// `headcount callout-keys`: fresh keys for the auth callout, as the
/// environment lines token-vendor (the seeds) and nats-server (the public
/// keys) read.
pub fn callout_keys() -> anyhow::Result<()> {
    let issuer = token_vendor::Issuer::generate();
    println!("HEADCOUNT_CALLOUT_SEED={}", issuer.seed()?);
    println!("HEADCOUNT_CALLOUT_ISSUER={}", issuer.public_key());
    println!("HEADCOUNT_CALLOUT_XKEY_SEED={}", issuer.xkey_seed()?);
    println!("HEADCOUNT_CALLOUT_XKEY={}", issuer.xkey_public());
    Ok(())
}
