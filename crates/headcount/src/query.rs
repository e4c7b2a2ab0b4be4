//! The request-reply commands: `active`, `check`, `limits`, `kick`, `token`,
//! `backend-token`, `stats`, `top`.
//!
//! Each returns a [`CliError`] when it does not succeed, whose [`Exit`]
//! status is the command's (`headcount --help`, README "Exit status"):
//! NATS is reached with one short attempt (`--connect-timeout`), never the
//! services' retry-forever connect, so a dead server is an answer (exit
//! status 3) rather than a hang.
//!
//! [`Exit`]: crate::exit::Exit

use std::time::Duration;

use clap::{Args, Subcommand};
use headcount_client::endpoint::{self as ep, Endpoint};
use headcount_client::{Client, ClientError};
use headcount_protocol::AccountId;
use headcount_protocol::subjects::{endpoint, endpoint_subject};
use headcount_protocol::wire::{
    AccountRequest, GraceRequest, LimitsReply, LimitsSetRequest, StatsReply, StatsRequest,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::config::{NatsArgs, NatsTarget, humantime_secs};
use crate::exit::{CliError, error_chain};

/// How long a request may wait for its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The most accounts the checker lists in a `stats` reply: `stats` and
/// `top` ask for this many, show what was asked for, and count the rest.
const MOST_LISTED: u32 = 1000;

/// The commands of this module, in the order `headcount --help` lists
/// them: the queries, and `callout-keys`, which asks nobody.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show an account's active sessions.
    Active(ActiveArgs),
    /// Ask whether a device may play now (applies the account's policy).
    Check(CheckArgs),
    /// Read or change an account's limit and policy.
    Limits(LimitsArgs),
    /// End one session now (the device is told, its heartbeats are ignored).
    Kick(KickArgs),
    /// Issue a device token.
    Token(TokenArgs),
    /// Issue a backend token: an application server's NATS credential.
    BackendToken(BackendTokenArgs),
    /// Print fresh auth callout keys (seeds for token-vendor, public keys for nats-server).
    CalloutKeys,
    /// Active sessions by content, device kind and region, and the peak.
    Stats(StatsArgs),
    /// A live, refreshing view of the busiest accounts.
    Top(TopArgs),
}

impl Command {
    /// Runs the command to its exit status: a query's own (see
    /// [`crate::exit`]), under `--json` with the error object on stdout;
    /// `callout-keys` ends with 1 on any error.
    pub async fn run(self) -> std::process::ExitCode {
        let json = match &self {
            Command::Active(ActiveArgs { common, .. })
            | Command::Check(CheckArgs { common, .. })
            | Command::Kick(KickArgs { common, .. })
            | Command::Token(TokenArgs { common, .. })
            | Command::Stats(StatsArgs { common, .. })
            | Command::Top(TopArgs { common, .. }) => common.answer.json,
            Command::Limits(a) => a.common().answer.json,
            Command::BackendToken(a) => a.answer.json,
            Command::CalloutKeys => false,
        };
        let result = match self {
            Command::Active(a) => active(a).await,
            Command::Check(a) => check(a).await,
            Command::Limits(a) => limits(a).await,
            Command::Kick(a) => kick(a).await,
            Command::Token(a) => token(a).await,
            Command::BackendToken(a) => backend_token(a).await,
            Command::CalloutKeys => return headcount_app::cli::finish(callout_keys()),
            Command::Stats(a) => stats(a).await,
            Command::Top(a) => top(a).await,
        };
        crate::exit::finish(result, json)
    }
}

/// How a query command waits and answers; its help ends with the exit
/// statuses every query command shares.
#[derive(Debug, Args)]
#[command(after_help = crate::exit::EXIT_STATUS_HELP)]
pub struct Answer {
    /// Give up when NATS (token-vendor, for `backend-token`) has not
    /// accepted the connection within this long (exit status 3), instead of
    /// waiting for it.
    #[arg(
        long,
        env = "HEADCOUNT_CONNECT_TIMEOUT",
        default_value = "3s",
        value_parser = humantime_secs
    )]
    connect_timeout: Duration,
    /// Print the reply as JSON. An error, too, is one JSON object on stdout:
    /// `{"error": "...", "code": <exit status>, ...}`.
    #[arg(long)]
    json: bool,
}

/// The flags of a query command that asks a service over NATS.
#[derive(Debug, Args)]
pub struct Common {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    answer: Answer,
}

/// One command's connection to NATS, and where its address came from.
struct Conn {
    client: Client,
    target: NatsTarget,
}

impl Common {
    /// Connects once, within `--connect-timeout`.
    async fn connect(&self, name: &str) -> Result<Conn, CliError> {
        let target = NatsTarget::of(&self.nats, name)?;
        match target
            .options
            .connect_once(self.answer.connect_timeout)
            .await
        {
            Ok(nats) => Ok(Conn {
                client: Client::new(nats).with_timeout(REQUEST_TIMEOUT),
                target,
            }),
            Err(e) => Err(connect_error(&target, &e, self.answer.connect_timeout)),
        }
    }
}

/// Why NATS could not be used, naming its URL and where that came from.
fn connect_error(t: &NatsTarget, e: &async_nats::ConnectError, timeout: Duration) -> CliError {
    use async_nats::ConnectErrorKind as Kind;
    let (urls, from) = (t.urls(), t.url_from.as_str());
    let hint = if from.ends_with("up.json") {
        " (is `headcount up` running? an up.json outlives an `up` that crashed)"
    } else {
        ""
    };
    let error = match e.kind() {
        Kind::ServerParse => {
            return CliError::usage(format!("bad NATS URL {urls} (from {from}): {e}"))
                .with("nats_url", urls.clone())
                .with("from", from);
        }
        Kind::AuthorizationViolation | Kind::Authentication => {
            let who = match (&t.options.user, &t.credentials_from) {
                (Some(user), Some(src)) => format!("user {user:?} from {src}"),
                _ => "no user given: pass --nats-user and --nats-password".to_string(),
            };
            CliError::unreachable(format!(
                "NATS at {urls} (from {from}) refused the connection: {e} ({who})"
            ))
        }
        Kind::TimedOut => CliError::unreachable(format!(
            "cannot reach NATS at {urls} (from {from}): no answer within {timeout:?}{hint}"
        )),
        _ => CliError::unreachable(format!(
            "cannot reach NATS at {urls} (from {from}): {}{hint}",
            error_chain(e)
        )),
    };
    error.with("nats_url", urls).with("from", from)
}

/// Which service answers an endpoint, for "nobody answered" messages.
fn server_of(name: &str) -> &'static str {
    if name == endpoint::TOKEN {
        "token-vendor"
    } else {
        "checker"
    }
}

impl Conn {
    /// Calls endpoint `E`; the reply both typed and as JSON.
    async fn call<E: Endpoint>(&self, request: &E::Request) -> Result<(E::Reply, Value), CliError> {
        self.client
            .call_with_json::<E>(request)
            .await
            .map_err(|e| self.failed(E::NAME, e))
    }

    /// Calls endpoint `E` with a body its typed request cannot hold (a
    /// name that does not parse); the reply as [`Conn::call`] gives it.
    async fn call_as_typed<E: Endpoint>(
        &self,
        body: &Value,
    ) -> Result<(E::Reply, Value), CliError> {
        let result = self
            .client
            .request_json::<_, Value>(E::NAME, body)
            .await
            .and_then(|raw| {
                let reply = serde_json::from_value(raw.clone()).map_err(|source| {
                    ClientError::Unreadable {
                        subject: endpoint_subject(E::NAME),
                        source,
                    }
                })?;
                Ok((reply, raw))
            });
        result.map_err(|e| self.failed(E::NAME, e))
    }

    /// What a failed call of endpoint `name` tells the user.
    fn failed(&self, name: &str, e: ClientError) -> CliError {
        CliError::of_call(e, &self.target.urls(), server_of(name))
    }
}

/// Connects and calls endpoint `E` with `request`, or, when a name on the
/// command line does not parse, with the fields as the user typed them
/// (`as_typed`): the service judges names, so a bad one gets its 400
/// (exit status 4), worded as for any other caller.
async fn call<E: Endpoint>(
    common: &Common,
    request: Result<E::Request, impl Sized>,
    as_typed: impl FnOnce() -> Value,
) -> Result<(E::Reply, Value), CliError> {
    let conn = common.connect("headcount-cli").await?;
    match request {
        Ok(request) => conn.call::<E>(&request).await,
        Err(_) => conn.call_as_typed::<E>(&as_typed()).await,
    }
}

/// [`call`] for a command whose arguments are the request's fields, under
/// the request's names (`args` serializes them, names as typed): the typed
/// request is what they read as once every name parses.
async fn call_with_args<E>(
    common: &Common,
    args: &impl Serialize,
) -> Result<(E::Reply, Value), CliError>
where
    E: Endpoint,
    E::Request: DeserializeOwned,
{
    let as_typed = serde_json::to_value(args)
        .map_err(|e| CliError::usage(format!("the arguments as JSON: {e}")))?;
    let request = serde_json::from_value(as_typed.clone());
    call::<E>(common, request, || as_typed).await
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
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

/// The arguments are the request's fields (see [`call_with_args`]).
#[derive(Debug, Args, Serialize)]
pub struct ActiveArgs {
    /// The account, e.g. `acct-0003`.
    account: String,
    #[command(flatten)]
    #[serde(skip)]
    common: Common,
}

pub async fn active(a: ActiveArgs) -> Result<(), CliError> {
    let (r, raw) = call_with_args::<ep::Active>(&a.common, &a).await?;
    if a.common.answer.json {
        print_json(&raw);
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

/// The arguments are the request's fields (see [`call_with_args`]).
#[derive(Debug, Args, Serialize)]
pub struct CheckArgs {
    /// The account, e.g. `acct-0003`.
    account: String,
    /// The device asking to play, e.g. `phone-7`.
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
    #[serde(skip)]
    common: Common,
}

/// `check`: exit status 0 when the device may play, 1 when it is refused.
pub async fn check(a: CheckArgs) -> Result<(), CliError> {
    let (r, raw) = call_with_args::<ep::Check>(&a.common, &a).await?;
    let seats = format!("{} of {} seats taken, {}", r.active, r.limit, r.policy);
    if !r.allowed {
        let why = if r.active >= r.limit {
            format!("account {} is at its limit", a.account)
        } else {
            "its content is at the account's per-content limit".to_string()
        };
        let refused = CliError::refused(format!("{} is refused: {why} ({seats})", a.device));
        if a.common.answer.json {
            return Err(refused.with_reply(raw));
        }
        println!("{}", refused.message);
        return Err(refused.already_said());
    }
    if a.common.answer.json {
        print_json(&raw);
        return Ok(());
    }
    println!("{} may play ({seats})", a.device);
    for e in r.evicted {
        println!(
            "  evicted {} (session {}) to make room",
            e.device.as_str(),
            e.session.as_str()
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
#[command(after_help = crate::exit::EXIT_STATUS_HELP)]
pub struct LimitsArgs {
    #[command(subcommand)]
    command: LimitsCommand,
}

impl LimitsArgs {
    fn common(&self) -> &Common {
        match &self.command {
            LimitsCommand::Get { common, .. } | LimitsCommand::Set { common, .. } => common,
        }
    }
}

#[derive(Debug, Subcommand)]
enum LimitsCommand {
    /// Show an account's limit and policy.
    Get {
        /// The account, e.g. `acct-0003`.
        account: String,
        #[command(flatten)]
        common: Common,
    },
    /// Change an account's plan, limit, policy, per-content limit or grace
    /// (what is not given stays as it was).
    Set {
        /// The account, e.g. `acct-0003`.
        account: String,
        /// The number of sessions allowed at once.
        #[arg(allow_negative_numbers = true)]
        limit: Option<i64>,
        /// A plan by name (the checker's `--plan`s; default basic, standard,
        /// premium).
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
        /// Forget everything set before (back to the token's plan or the
        /// default); the other flags given then apply on top.
        #[arg(long)]
        reset: bool,
        #[command(flatten)]
        common: Common,
    },
}

fn parse_grace(s: &str) -> Result<(i64, i64), String> {
    headcount_protocol::policy::parse_grace(s)
        .ok_or_else(|| "grace is SEATS/SECS, e.g. 1/60".to_string())
}

pub async fn limits(a: LimitsArgs) -> Result<(), CliError> {
    let ((r, raw), common): ((LimitsReply, Value), Common) = match a.command {
        LimitsCommand::Get { account, common } => {
            let request = AccountId::parse(&account).map(|account| AccountRequest { account });
            let reply =
                call::<ep::LimitsGet>(&common, request, || json!({"account": account})).await?;
            (reply, common)
        }
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
            let request = AccountId::parse(&account).map(|account| LimitsSetRequest {
                account,
                limit,
                policy: policy.clone(),
                plan: plan.clone(),
                per_content,
                grace: grace.map(|(seats, secs)| GraceRequest { seats, secs }),
                reset,
            });
            let as_typed = || {
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
                body
            };
            (
                call::<ep::LimitsSet>(&common, request, as_typed).await?,
                common,
            )
        }
    };
    if common.answer.json {
        print_json(&raw);
        return Ok(());
    }
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
    Ok(())
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// One account (default: all accounts, with the busiest listed).
    account: Option<String>,
    /// How many of the busiest accounts to list (all accounts only); the
    /// rest are counted (`... and 37 more accounts`).
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

/// Accounts a `stats` reply listed beyond the first `shown`: how many, and
/// whether there may be more still (the checker lists at most
/// [`MOST_LISTED`]).
fn not_shown(r: &StatsReply, shown: usize) -> (usize, bool) {
    let rest = r.top.len().saturating_sub(shown);
    (rest, r.top.len() >= MOST_LISTED as usize)
}

/// `... and 37 more accounts` (or `1000+ more`), or nothing.
fn more_accounts_line(rest: usize, capped: bool) -> Option<String> {
    match (rest, capped) {
        (0, false) => None,
        (n, false) => Some(format!(
            "... and {n} more account{}",
            if n == 1 { "" } else { "s" }
        )),
        (n, true) => Some(format!("... and {n}+ more accounts")),
    }
}

/// Cuts the reply's `top` to the first `shown` and says how many are left
/// out (`more_accounts`, and `more_accounts_at_least` when the checker
/// listed all it lists).
fn json_with_top(mut raw: Value, r: &StatsReply, shown: usize) -> Value {
    let (rest, capped) = not_shown(r, shown);
    if let Some(top) = raw.get_mut("top").and_then(Value::as_array_mut) {
        top.truncate(shown);
    }
    if let Value::Object(obj) = &mut raw {
        obj.insert("more_accounts".into(), json!(rest));
        if capped {
            obj.insert("more_accounts_at_least".into(), json!(true));
        }
    }
    raw
}

pub async fn stats(a: StatsArgs) -> Result<(), CliError> {
    let request = a
        .account
        .as_deref()
        .map(AccountId::parse)
        .transpose()
        .map(|account| StatsRequest {
            account,
            top: Some(MOST_LISTED),
        });
    let (r, raw) = call::<ep::Stats>(
        &a.common,
        request,
        || json!({"account": a.account, "top": MOST_LISTED}),
    )
    .await?;
    let shown = a.top as usize;
    if a.common.answer.json {
        if r.account.is_some() {
            print_json(&raw);
        } else {
            print_json(&json_with_top(raw, &r, shown));
        }
        return Ok(());
    }
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
        for u in r.top.iter().take(shown) {
            println!(
                "    {:<24} {:>5} / {}",
                u.account.as_str(),
                u.active,
                u.limit
            );
        }
        let (rest, capped) = not_shown(&r, shown);
        if let Some(line) = more_accounts_line(rest, capped) {
            println!("    {line}");
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Refresh period (at least 100ms).
    #[arg(long, default_value = "1s", value_parser = humantime_secs)]
    every: Duration,
    /// How many of the busiest accounts to list; the rest are counted in a
    /// last line (`... and 37 more accounts`).
    #[arg(long, default_value_t = 20)]
    rows: u32,
    /// Print one snapshot and exit, without clearing the screen (scripts,
    /// pipes).
    #[arg(long)]
    once: bool,
    #[command(flatten)]
    common: Common,
}

/// One screen of `top`: totals, the first `rows` accounts, how many more
/// there are, kinds and regions.
fn render_top(r: &StatsReply, rows: usize) -> String {
    let mut out = format!(
        "headcount top - {} active, peak {} (last {} min)\n\n",
        r.active, r.peak, r.window_minutes
    );
    out.push_str(&format!(
        "{:<28} {:>7} {:>7}  {}\n",
        "ACCOUNT", "ACTIVE", "LIMIT", "USE"
    ));
    for u in r.top.iter().take(rows) {
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
    let (rest, capped) = not_shown(r, rows);
    if let Some(line) = more_accounts_line(rest, capped) {
        out.push_str(&format!("{line} (--rows shows more)\n"));
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
    out
}

/// A live view of the busiest accounts, redrawn in place like `top`; with
/// `--json`, one JSON line per refresh; with `--once`, one snapshot.
pub async fn top(a: TopArgs) -> Result<(), CliError> {
    use std::io::Write;
    let conn = a.common.connect("headcount-top").await?;
    let rows = a.rows as usize;
    let request = StatsRequest {
        account: None,
        top: Some(MOST_LISTED),
    };
    let mut tick = tokio::time::interval(a.every.max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = crate::services::until_signal_quiet() => break,
            _ = tick.tick() => {}
        }
        let (r, raw): (StatsReply, Value) = match conn.call::<ep::Stats>(&request).await {
            Ok(reply) => reply,
            Err(e) if a.once => return Err(e),
            Err(e) => {
                // The live view keeps trying; the next refresh may answer.
                eprintln!("error: {e}");
                continue;
            }
        };
        if a.common.answer.json {
            println!("{}", json_with_top(raw, &r, rows));
        } else if a.once {
            print!("{}", render_top(&r, rows));
        } else {
            // Clear the screen and draw from the top-left corner.
            print!("\x1b[2J\x1b[H{}", render_top(&r, rows));
        }
        let _ = std::io::stdout().flush();
        if a.once {
            break;
        }
    }
    Ok(())
}

/// The arguments are the request's fields (see [`call_with_args`]).
#[derive(Debug, Args, Serialize)]
pub struct KickArgs {
    /// The account, e.g. `acct-0003`.
    account: String,
    /// The session to end (the SESSION column of `headcount active`).
    session: String,
    #[command(flatten)]
    #[serde(skip)]
    common: Common,
}

/// `kick`: exit status 0 when the session was ended, 1 when no active
/// session of the account has that id.
pub async fn kick(a: KickArgs) -> Result<(), CliError> {
    let (r, raw) = call_with_args::<ep::Kick>(&a.common, &a).await?;
    if !r.kicked {
        return Err(CliError::refused(format!(
            "no active session {} on account {}: nothing kicked",
            a.session, a.account
        ))
        .with_reply(raw));
    }
    if a.common.answer.json {
        print_json(&raw);
    } else {
        println!("kicked session {} of account {}", a.session, a.account);
    }
    Ok(())
}

/// The arguments are the request's fields (see [`call_with_args`]).
#[derive(Debug, Args, Serialize)]
pub struct TokenArgs {
    /// The account, e.g. `acct-0003`.
    account: String,
    /// The device the token is for, e.g. `tv-livingroom`.
    device: String,
    /// The account's plan, carried in the token.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    plan: Option<String>,
    #[command(flatten)]
    #[serde(skip)]
    common: Common,
}

/// `token`: a device token from token-vendor's `headcount.token`.
pub async fn token(a: TokenArgs) -> Result<(), CliError> {
    let (r, raw) = call_with_args::<ep::Token>(&a.common, &a).await?;
    if a.common.answer.json {
        print_json(&raw);
        return Ok(());
    }
    let left = r
        .expires_at
        .saturating_sub(headcount_protocol::now_millis())
        / 1000;
    println!("session {}, expires in {}", r.session.as_str(), span(left));
    println!("{}", r.token);
    Ok(())
}

#[derive(Debug, Args)]
pub struct BackendTokenArgs {
    /// The backend's name (shows in the server's logs), e.g. `web-1`.
    name: String,
    /// Lifetime, at most the token-vendor's --client-token-ttl (24h).
    #[arg(long, value_parser = humantime_secs)]
    ttl: Option<Duration>,
    /// token-vendor's HTTP API. Default: `http_url` of <data-dir>/up.json.
    #[arg(long, env = "HEADCOUNT_HTTP_URL")]
    http_url: Option<String>,
    /// The operator key. Default: `operator_key` of <data-dir>/up.json.
    #[arg(long, env = "HEADCOUNT_OPERATOR_KEY", hide_env_values = true)]
    operator_key: Option<String>,
    /// The data directory of `headcount up`, whose up.json gives the HTTP
    /// URL and operator key not given as flags.
    #[arg(long, env = "HEADCOUNT_DATA_DIR", default_value = ".headcount")]
    data_dir: std::path::PathBuf,
    #[command(flatten)]
    answer: Answer,
}

/// `headcount backend-token NAME`: a backend token from token-vendor's HTTP
/// API (`POST /v1/backend-tokens`, operator key).
pub async fn backend_token(a: BackendTokenArgs) -> Result<(), CliError> {
    let up_path = crate::config::absolute(&crate::config::UpInfo::path(&a.data_dir))
        .display()
        .to_string();
    let up = if a.http_url.is_none() || a.operator_key.is_none() {
        Some(crate::config::UpInfo::read(&a.data_dir)?)
    } else {
        None
    };
    // up.json was read whenever a flag is missing.
    let (http, from) = match &a.http_url {
        Some(h) => (
            h.clone(),
            crate::config::flag_or_env("--http-url", "HEADCOUNT_HTTP_URL", h),
        ),
        None => (
            up.as_ref().map(|u| u.http_url.clone()).unwrap_or_default(),
            up_path,
        ),
    };
    let key = match &a.operator_key {
        Some(k) => k.clone(),
        None => up
            .as_ref()
            .map(|u| u.operator_key.clone())
            .unwrap_or_default(),
    };
    let mut body = json!({ "name": a.name });
    if let Some(ttl) = a.ttl {
        body["ttl_secs"] = json!(ttl.as_secs());
    }
    let url = format!("{}/v1/backend-tokens", http.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .connect_timeout(a.answer.connect_timeout)
        .timeout(a.answer.connect_timeout + REQUEST_TIMEOUT)
        .build()
        .map_err(|e| CliError::usage(format!("HTTP client: {}", error_chain(&e))))?;
    let response = client
        .post(&url)
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .map_err(|e| {
            if e.is_builder() {
                return CliError::usage(format!(
                    "bad token-vendor URL {http} (from {from}): {}",
                    error_chain(&e)
                ));
            }
            let why = if e.is_timeout() {
                format!(
                    "no answer within {:?}",
                    a.answer.connect_timeout + REQUEST_TIMEOUT
                )
            } else {
                error_chain(&e)
            };
            let hint = if from.ends_with("up.json") {
                " (is `headcount up` running? an up.json outlives an `up` that crashed)"
            } else {
                ""
            };
            CliError::unreachable(format!(
                "cannot reach token-vendor at {http} (from {from}): {why}{hint}"
            ))
            .with("http_url", http.clone())
            .with("from", from.clone())
        })?;
    let status = response.status();
    let reply: Value = response.json().await.map_err(|e| {
        CliError::service(
            format!("unreadable reply from {url} ({status}): {e}"),
            Some(status.as_u16()),
        )
    })?;
    if !status.is_success() {
        return Err(CliError::service(
            format!(
                "{} ({})",
                reply["error"].as_str().unwrap_or("refused"),
                status.as_u16()
            ),
            Some(status.as_u16()),
        ));
    }
    if a.answer.json {
        print_json(&reply);
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

#[cfg(test)]
mod tests {
    use super::*;
    use headcount_protocol::AccountId;
    use headcount_protocol::wire::AccountUsage;

    fn stats_with(accounts: usize) -> StatsReply {
        StatsReply {
            account: None,
            active: accounts as u32,
            peak: accounts as u32,
            window_minutes: 15,
            by_content: Default::default(),
            by_kind: Default::default(),
            by_region: Default::default(),
            top: (0..accounts)
                .map(|i| AccountUsage {
                    account: AccountId::parse(&format!("acct-{i:04}")).expect("account"),
                    active: 1,
                    limit: 3,
                })
                .collect(),
        }
    }

    #[test]
    fn top_counts_the_accounts_it_does_not_list() {
        let screen = render_top(&stats_with(57), 20);
        assert!(screen.contains("acct-0019") && !screen.contains("acct-0020"));
        assert!(screen.contains("... and 37 more accounts"), "{screen}");
        assert!(!render_top(&stats_with(20), 20).contains("more account"));
        assert!(render_top(&stats_with(21), 20).contains("... and 1 more account "));
        // The checker lists at most MOST_LISTED: there may be more.
        let capped = render_top(&stats_with(MOST_LISTED as usize), 20);
        assert!(capped.contains("... and 980+ more accounts"), "{capped}");
    }

    #[test]
    fn json_top_is_cut_to_the_rows_shown() {
        let r = stats_with(5);
        let raw = serde_json::to_value(&r).expect("json");
        let v = json_with_top(raw, &r, 2);
        assert_eq!(v["top"].as_array().map(Vec::len), Some(2));
        assert_eq!(v["more_accounts"], 3);
        assert!(v.get("more_accounts_at_least").is_none());
    }
}
