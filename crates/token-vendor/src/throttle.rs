//! Per-address limits on what a hostile client can make token-vendor do.
//!
//! - Wrong operator keys (`/v1/tokens`, `/v1/keys/rotate`,
//!   `/v1/operator-tokens`, `/v1/backend-tokens`, `/v1/tokens/revoke`):
//!   every address has a budget of failures
//!   ([`ThrottleConfig::operator_key_failures`]). Once it is spent, every
//!   operator request from that address is answered 429 with `Retry-After`
//!   *before its key is looked at*, until one failure has refilled: a
//!   guesser learns nothing while blocked and gets one guess per refill
//!   after that. Requests with the right key never spend the budget, so a
//!   backend issuing many tokens is not limited.
//! - Device and browser endpoints (`/v1/tokens/refresh`,
//!   `/v1/sessions/leave`, `/v1/demo/tokens`): a request rate per address,
//!   429 with `Retry-After` above it.
//! - The auth callout: a budget of refused connections per client host
//!   (`client_info.host` of the authorization request). A host that spent
//!   it is shed until the budget refills: a connection from it whose token
//!   does not verify is refused at once (a signature check, no revocation
//!   read, no log line), but a valid token is never shed: it gets the usual
//!   decision. A host address is often shared (NAT, the TLS proxy in front
//!   of the WebSocket listener), and garbage sent from it must not lock out
//!   the valid devices behind it. Other hosts are not affected.
//!
//! The address is the TCP peer (`ConnectInfo<SocketAddr>`, which
//! `headcount_runtime::http::serve` provides); with
//! [`ThrottleConfig::trust_forwarded_for`] it is the last entry of the last
//! `X-Forwarded-For` header instead, which is only right behind a proxy that
//! appends the address it saw (and that clients cannot reach around). IPv6
//! addresses count per /64, the block one host usually holds.
//!
//! Memory stays bounded: every limiter forgets an address once its budget
//! is full again (`retain_recent`), at least every [`SWEEP_EVERY`] and every
//! second while it tracks more than [`MANY_ADDRESSES`]; the list of blocked
//! addresses is a bounded cache whose entries expire with their block.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use governor::clock::{Clock, MonotonicClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::Vendor;

/// How often every limiter drops the addresses it no longer needs.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Above this many tracked addresses a limiter sweeps every second.
pub const MANY_ADDRESSES: usize = 50_000;
/// At most this many addresses are blocked at once per budget; beyond it
/// the cache evicts (an evicted address is merely unblocked early).
const MAX_BLOCKED: u64 = 100_000;

/// A sustained rate and a burst: `burst` at once, refilled at `per_second`.
/// A zero (or negative, or not finite) rate, or a zero burst, turns the
/// limit off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

impl Rate {
    pub const fn new(per_second: f64, burst: u32) -> Rate {
        Rate { per_second, burst }
    }

    /// No limit.
    pub const OFF: Rate = Rate::new(0.0, 0);

    /// The governor quota, `None` when the limit is off.
    fn quota(&self) -> Option<Quota> {
        if !(self.per_second.is_finite() && self.per_second > 0.0) {
            return None;
        }
        let period = Duration::try_from_secs_f64(1.0 / self.per_second).ok()?;
        Quota::with_period(period.max(Duration::from_nanos(1)))?
            .allow_burst(NonZeroU32::new(self.burst)?)
            .into()
    }

    /// How long one unit takes to refill.
    fn period(&self) -> Duration {
        self.quota()
            .map_or(Duration::ZERO, |q| q.replenish_interval())
    }
}

/// Text that is not a [`Rate`]; it says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected RATE/s,BURST (like 20/s,100) or off, not {0:?}")]
pub struct RateError(String);

/// `RATE/s,BURST` (`20/s,100`; the `/s` may be left out), or `off` (also
/// `0`).
impl std::str::FromStr for Rate {
    type Err = RateError;

    fn from_str(s: &str) -> Result<Rate, RateError> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") || s == "0" {
            return Ok(Rate::OFF);
        }
        let expected = || RateError(s.to_string());
        let (rate, burst) = s.split_once(',').ok_or_else(expected)?;
        let rate = rate.trim();
        let rate = rate.strip_suffix("/s").unwrap_or(rate).trim();
        let per_second: f64 = rate.parse().map_err(|_| expected())?;
        if !(per_second.is_finite() && per_second >= 0.0) {
            return Err(expected());
        }
        let burst: u32 = burst.trim().parse().map_err(|_| expected())?;
        Ok(Rate::new(per_second, burst))
    }
}

/// As [`Rate::from_str`](std::str::FromStr) reads it.
impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.quota().is_none() {
            f.write_str("off")
        } else {
            write!(f, "{}/s,{}", self.per_second, self.burst)
        }
    }
}

/// The per-address limits; [`ThrottleConfig::default`] holds the defaults
/// the command-line flags start from.
#[derive(Debug, Clone, PartialEq)]
pub struct ThrottleConfig {
    /// Wrong operator keys per address: 10 at once, then 1 per second.
    pub operator_key_failures: Rate,
    /// `POST /v1/tokens/refresh` per address: 20/s, bursts of 100 (a
    /// browser refreshes once per token lifetime; 100 tabs behind one NAT
    /// address that all refresh at once still pass).
    pub refresh: Rate,
    /// `POST /v1/sessions/leave` per address: 20/s, bursts of 100.
    pub leave: Rate,
    /// `POST /v1/demo/tokens` per address: 5/s, bursts of 20.
    pub demo_tokens: Rate,
    /// Refused auth-callout connections per client host: 200 at once, then
    /// 20 per second; above it the host's tokens that do not verify are
    /// refused at once (valid tokens never are).
    pub callout_refusals: Rate,
    /// Take the client address from `X-Forwarded-For` (the last entry of
    /// the last header) instead of the TCP peer. Only behind a trusted proxy
    /// that sets it: otherwise every client picks its own address.
    pub trust_forwarded_for: bool,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            operator_key_failures: Rate::new(1.0, 10),
            refresh: Rate::new(20.0, 100),
            leave: Rate::new(20.0, 100),
            demo_tokens: Rate::new(5.0, 20),
            callout_refusals: Rate::new(20.0, 200),
            trust_forwarded_for: false,
        }
    }
}

/// The HTTP endpoints with a per-address limit; the `endpoint` label of
/// `headcount_http_throttled_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Tokens,
    KeysRotate,
    OperatorTokens,
    BackendTokens,
    Revoke,
    Refresh,
    Leave,
    DemoTokens,
}

impl Endpoint {
    /// Its metric label, and the path it is served at (each one a `POST`).
    fn names(self) -> (&'static str, &'static str) {
        match self {
            Endpoint::Tokens => ("tokens", "/v1/tokens"),
            Endpoint::KeysRotate => ("keys_rotate", "/v1/keys/rotate"),
            Endpoint::OperatorTokens => ("operator_tokens", "/v1/operator-tokens"),
            Endpoint::BackendTokens => ("backend_tokens", "/v1/backend-tokens"),
            Endpoint::Revoke => ("tokens_revoke", "/v1/tokens/revoke"),
            Endpoint::Refresh => ("refresh", "/v1/tokens/refresh"),
            Endpoint::Leave => ("leave", "/v1/sessions/leave"),
            Endpoint::DemoTokens => ("demo_tokens", "/v1/demo/tokens"),
        }
    }

    pub(crate) fn label(self) -> &'static str {
        self.names().0
    }

    pub(crate) fn path(self) -> &'static str {
        self.names().1
    }
}

/// The key of an address: IPv4 as is (IPv4-mapped IPv6 too), IPv6 by /64.
pub(crate) fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Where requests without a known address are counted (all together).
const UNKNOWN: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

/// The address a trusted proxy appended to `X-Forwarded-For`: the last
/// entry of the last header, with or without a port.
pub(crate) fn forwarded_for(headers: &HeaderMap) -> Option<IpAddr> {
    let last = headers.get_all("x-forwarded-for").iter().next_back()?;
    let entry = last.to_str().ok()?.rsplit(',').next()?.trim();
    entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()
}

type Keyed = RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, MonotonicClock>;

/// One keyed limiter, or none when its limit is off.
struct PerAddress {
    limiter: Option<Keyed>,
    started: Instant,
    /// Milliseconds after `started` of the last sweep.
    swept: AtomicU64,
}

impl PerAddress {
    fn new(rate: Rate) -> Self {
        Self {
            limiter: rate
                .quota()
                .map(|q| RateLimiter::dashmap_with_clock(q, MonotonicClock)),
            started: Instant::now(),
            swept: AtomicU64::new(0),
        }
    }

    /// Takes one unit of `addr`'s budget; `Err` with the time until one is
    /// back when it is empty.
    fn take(&self, addr: IpAddr) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        self.sweep_if_due(limiter);
        limiter
            .check_key(&addr)
            .map_err(|not_until| not_until.wait_time_from(MonotonicClock.now()))
    }

    fn sweep_if_due(&self, limiter: &Keyed) {
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.swept.load(Ordering::Relaxed);
        let since = now.saturating_sub(last);
        if since < 1000 {
            return;
        }
        let due = since >= SWEEP_EVERY.as_millis() as u64 || limiter.len() > MANY_ADDRESSES;
        if due
            && self
                .swept
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Addresses tracked (for tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }
}

/// A budget of failures per address: while an address's budget is spent it
/// is blocked, and [`FailureBudget::blocked`] says so without spending.
struct FailureBudget {
    budget: PerAddress,
    blocked: moka::sync::Cache<IpAddr, Instant>,
}

impl FailureBudget {
    fn new(rate: Rate) -> Self {
        Self {
            budget: PerAddress::new(rate),
            // A block lasts until one failure has refilled: at most one
            // period.
            blocked: moka::sync::Cache::builder()
                .max_capacity(MAX_BLOCKED)
                .time_to_live(rate.period() + Duration::from_secs(1))
                .build(),
        }
    }

    /// How long `addr` stays blocked, if it is.
    fn blocked(&self, addr: IpAddr) -> Option<Duration> {
        self.budget.limiter.as_ref()?;
        let until = self.blocked.get(&addr)?;
        let left = until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Counts a failure of `addr`; `Err` with the block's length when that
    /// spent its budget (the address is blocked from now on).
    fn failed(&self, addr: IpAddr) -> Result<(), Duration> {
        self.budget.take(addr).inspect_err(|wait| {
            let wait = (*wait).max(Duration::from_millis(1));
            self.blocked.insert(addr, Instant::now() + wait);
        })
    }
}

/// At most `per_second` log lines a second; the rest are counted and the
/// count goes with the next line that is let through.
pub(crate) struct LogSampler {
    per_second: u64,
    second: AtomicU64,
    used: AtomicU64,
    suppressed: AtomicU64,
}

impl LogSampler {
    pub(crate) const fn new(per_second: u64) -> Self {
        Self {
            per_second,
            second: AtomicU64::new(0),
            used: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed since the last one let through)` when this
    /// line may be logged, `None` when it is only counted.
    pub(crate) fn admit(&self) -> Option<u64> {
        let second = headcount_protocol::now_millis() / 1000;
        let seen = self.second.load(Ordering::Relaxed);
        if seen != second
            && self
                .second
                .compare_exchange(seen, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < self.per_second {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Every per-address limit of one vendor.
pub(crate) struct Throttle {
    trust_forwarded_for: bool,
    operator: FailureBudget,
    refresh: PerAddress,
    leave: PerAddress,
    demo_tokens: PerAddress,
    callout: FailureBudget,
    /// Refused callout connections worth a log line.
    pub(crate) refusal_log: LogSampler,
    /// Shed callout connections and blocked addresses worth a log line.
    pub(crate) shed_log: LogSampler,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("trust_forwarded_for", &self.trust_forwarded_for)
            .finish_non_exhaustive()
    }
}

impl Throttle {
    pub(crate) fn new(config: &ThrottleConfig) -> Self {
        Self {
            trust_forwarded_for: config.trust_forwarded_for,
            operator: FailureBudget::new(config.operator_key_failures),
            refresh: PerAddress::new(config.refresh),
            leave: PerAddress::new(config.leave),
            demo_tokens: PerAddress::new(config.demo_tokens),
            callout: FailureBudget::new(config.callout_refusals),
            refusal_log: LogSampler::new(5),
            shed_log: LogSampler::new(1),
        }
    }

    /// The address `request` is counted under.
    pub(crate) fn client(&self, request: &Request) -> IpAddr {
        if self.trust_forwarded_for
            && let Some(ip) = forwarded_for(request.headers())
        {
            return address_key(ip);
        }
        request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(UNKNOWN, |c| address_key(c.0.ip()))
    }

    /// The request rate of a device or browser endpoint; `None` for the
    /// operator-key endpoints, whose limit is a budget of wrong keys.
    fn rate(&self, endpoint: Endpoint) -> Option<&PerAddress> {
        match endpoint {
            Endpoint::Refresh => Some(&self.refresh),
            Endpoint::Leave => Some(&self.leave),
            Endpoint::DemoTokens => Some(&self.demo_tokens),
            Endpoint::Tokens
            | Endpoint::KeysRotate
            | Endpoint::OperatorTokens
            | Endpoint::BackendTokens
            | Endpoint::Revoke => None,
        }
    }

    /// The key of a callout request's `client_info.host`.
    fn host_key(host: &str) -> IpAddr {
        host.trim().parse().map_or(UNKNOWN, address_key)
    }

    /// How long the auth callout keeps shedding `host` (refusing its tokens
    /// that do not verify at once), if it does.
    pub(crate) fn callout_blocked(&self, host: &str) -> Option<Duration> {
        self.callout.blocked(Self::host_key(host))
    }

    /// Counts a refused connection from `host`; `Some(block)` when that
    /// spent the host's budget.
    pub(crate) fn callout_refused(&self, host: &str) -> Option<Duration> {
        self.callout.failed(Self::host_key(host)).err()
    }
}

/// The 429 answer, counted: retry after `wait`, in whole seconds (at least
/// one).
fn too_many(vendor: &Vendor, endpoint: Endpoint, wait: Duration) -> Response {
    vendor.count_throttled(endpoint.label());
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    let mut response = crate::http::error(
        StatusCode::TOO_MANY_REQUESTS,
        format!("too many requests from this address; retry after {secs} s"),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    response
}

/// Marks the answer to a request whose operator key was missing or wrong:
/// the response extension [`per_address`] counts against the address.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WrongOperatorKey;

/// Middleware of every limited endpoint, by `endpoint`: on a device or
/// browser endpoint, a request rate per address; on an operator-key
/// endpoint, it refuses a blocked address before the handler (and so the
/// key check) runs, and counts the handler's [`WrongOperatorKey`] answers
/// against the address.
pub(crate) async fn per_address(
    State((vendor, endpoint)): State<(Vendor, Endpoint)>,
    request: Request,
    next: Next,
) -> Response {
    let throttle = vendor.throttle();
    let addr = throttle.client(&request);
    if let Some(rate) = throttle.rate(endpoint) {
        return match rate.take(addr) {
            Ok(()) => next.run(request).await,
            Err(wait) => too_many(&vendor, endpoint, wait),
        };
    }
    if let Some(wait) = throttle.operator.blocked(addr) {
        return too_many(&vendor, endpoint, wait);
    }
    let response = next.run(request).await;
    if response.extensions().get::<WrongOperatorKey>().is_some()
        && let Err(wait) = throttle.operator.failed(addr)
    {
        if let Some(suppressed) = throttle.shed_log.admit() {
            tracing::warn!(
                %addr,
                endpoint = endpoint.label(),
                blocked_ms = wait.as_millis() as u64,
                suppressed,
                "too many wrong operator keys: refusing the address's operator requests unread"
            );
        }
        return too_many(&vendor, endpoint, wait);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn zero_rates_turn_a_limit_off() {
        assert!(Rate::OFF.quota().is_none());
        assert!(Rate::new(5.0, 0).quota().is_none());
        assert!(Rate::new(0.0, 5).quota().is_none());
        assert!(Rate::new(f64::NAN, 5).quota().is_none());
        assert!(Rate::new(-1.0, 5).quota().is_none());
        assert!(Rate::new(1e-300, 5).quota().is_none());
        let q = Rate::new(4.0, 3).quota().unwrap();
        assert_eq!(q.replenish_interval(), Duration::from_millis(250));
        assert_eq!(q.burst_size().get(), 3);
        let off = PerAddress::new(Rate::OFF);
        for _ in 0..1000 {
            assert!(off.take(ip("10.0.0.1")).is_ok());
        }
    }

    #[test]
    fn rates_read_and_print_alike() {
        assert_eq!("20/s,100".parse::<Rate>(), Ok(Rate::new(20.0, 100)));
        assert_eq!(" 0.5 , 3 ".parse::<Rate>(), Ok(Rate::new(0.5, 3)));
        assert_eq!("off".parse::<Rate>(), Ok(Rate::OFF));
        assert_eq!("0".parse::<Rate>(), Ok(Rate::OFF));
        for bad in ["", "20", "x/s,1", "-1/s,5", "1/s,-5", "inf/s,1", "1/m,5"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?}");
        }
        assert_eq!(
            " 20 ".parse::<Rate>().unwrap_err().to_string(),
            "expected RATE/s,BURST (like 20/s,100) or off, not \"20\""
        );
        let defaults = ThrottleConfig::default();
        for rate in [
            defaults.operator_key_failures,
            defaults.refresh,
            defaults.leave,
            defaults.demo_tokens,
            defaults.callout_refusals,
            Rate::new(0.25, 7),
        ] {
            assert_eq!(rate.to_string().parse::<Rate>(), Ok(rate));
        }
        assert_eq!(Rate::new(20.0, 100).to_string(), "20/s,100");
        assert_eq!(Rate::new(5.0, 0).to_string(), "off");
    }

    #[test]
    fn addresses_are_keyed_per_host_and_ipv6_per_64() {
        assert_eq!(address_key(ip("10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(address_key(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(
            address_key(ip("2001:db8:1:2:aaaa::1")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            address_key(ip("2001:db8:1:2:ffff::9")),
            address_key(ip("2001:db8:1:2::1"))
        );
        assert_ne!(
            address_key(ip("2001:db8:1:3::1")),
            address_key(ip("2001:db8:1:2::1"))
        );
        assert_eq!(Throttle::host_key("192.0.2.7"), ip("192.0.2.7"));
        assert_eq!(Throttle::host_key(""), UNKNOWN);
        assert_eq!(Throttle::host_key("not an address"), UNKNOWN);
    }

    #[test]
    fn forwarded_for_takes_the_entry_the_proxy_appended() {
        let mut h = HeaderMap::new();
        assert_eq!(forwarded_for(&h), None);
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("1.1.1.1, 2.2.2.2"),
        );
        assert_eq!(forwarded_for(&h), Some(ip("2.2.2.2")));
        h.append("x-forwarded-for", HeaderValue::from_static("3.3.3.3:8080"));
        assert_eq!(forwarded_for(&h), Some(ip("3.3.3.3")));
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("[2001:db8::1]:1"),
        );
        assert_eq!(forwarded_for(&h), Some(ip("2001:db8::1")));
        h.append("x-forwarded-for", HeaderValue::from_static("garbage"));
        assert_eq!(forwarded_for(&h), None);
    }

    #[test]
    fn the_client_is_the_peer_unless_a_proxy_is_trusted() {
        let request = || {
            let mut r = Request::new(axum::body::Body::empty());
            r.headers_mut()
                .insert("x-forwarded-for", HeaderValue::from_static("9.9.9.9"));
            r.extensions_mut()
                .insert(ConnectInfo(SocketAddr::from(([10, 0, 0, 1], 5000))));
            r
        };
        let plain = Throttle::new(&ThrottleConfig::default());
        assert_eq!(plain.client(&request()), ip("10.0.0.1"));
        let behind_proxy = Throttle::new(&ThrottleConfig {
            trust_forwarded_for: true,
            ..ThrottleConfig::default()
        });
        assert_eq!(behind_proxy.client(&request()), ip("9.9.9.9"));
        // No peer address (a router not served by `http::serve`).
        let bare = Request::new(axum::body::Body::empty());
        assert_eq!(plain.client(&bare), UNKNOWN);
    }

    #[test]
    fn a_spent_failure_budget_blocks_that_address_until_it_refills() {
        // 3 failures, then one every 500 ms.
        let budget = FailureBudget::new(Rate::new(2.0, 3));
        let (bad, other) = (ip("192.0.2.1"), ip("192.0.2.2"));
        for _ in 0..3 {
            assert_eq!(budget.blocked(bad), None);
            assert!(budget.failed(bad).is_ok());
        }
        let wait = budget
            .failed(bad)
            .expect_err("the fourth failure spends it");
        assert!(wait <= Duration::from_millis(500), "{wait:?}");
        assert!(budget.blocked(bad).is_some());
        // Another address is untouched.
        assert_eq!(budget.blocked(other), None);
        assert!(budget.failed(other).is_ok());
        std::thread::sleep(wait + Duration::from_millis(20));
        assert_eq!(budget.blocked(bad), None);
        // One failure has refilled, and only one.
        assert!(budget.failed(bad).is_ok());
        assert!(budget.failed(bad).is_err());
    }

    #[test]
    fn a_request_rate_refuses_the_excess_with_the_wait() {
        let limit = PerAddress::new(Rate::new(1.0, 5));
        let addr = ip("198.51.100.1");
        for _ in 0..5 {
            assert!(limit.take(addr).is_ok());
        }
        let wait = limit.take(addr).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert!(limit.take(ip("198.51.100.2")).is_ok());
    }

    #[test]
    fn sweeping_forgets_addresses_whose_budget_is_full_again() {
        // One unit, refilled every millisecond.
        let mut limit = PerAddress::new(Rate::new(1000.0, 1));
        for i in 0..1000u32 {
            let _ = limit.take(IpAddr::V4(i.into()));
        }
        assert!(limit.tracked() >= 999);
        std::thread::sleep(Duration::from_millis(20));
        // Every budget is full again, but no sweep is due yet.
        let _ = limit.take(ip("203.0.113.1"));
        assert!(limit.tracked() >= 999);
        // As if the last sweep were a sweep interval ago.
        limit.started = Instant::now()
            .checked_sub(SWEEP_EVERY + Duration::from_secs(1))
            .unwrap();
        let _ = limit.take(ip("203.0.113.1"));
        assert!(limit.tracked() <= 2, "{} tracked", limit.tracked());
    }

    #[test]
    fn the_log_sampler_lets_a_few_lines_through_and_counts_the_rest() {
        let sampler = LogSampler::new(3);
        // Start at the beginning of a second, so that all of this runs in one.
        while headcount_protocol::now_millis() % 1000 > 500 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let admitted: Vec<Option<u64>> = (0..10).map(|_| sampler.admit()).collect();
        assert_eq!(admitted[..3], [Some(0), Some(0), Some(0)]);
        assert!(admitted[3..].iter().all(Option::is_none));
        std::thread::sleep(Duration::from_millis(1000));
        assert_eq!(sampler.admit(), Some(7));
        assert_eq!(sampler.admit(), Some(0));
    }
}
