//! A deterministic, seeded simulation of the checkers' decisions.
//!
//! Several checker replicas, each its own [`View`], decide which sessions
//! end, through the account's ledger and create-only revocations, under a
//! random schedule against one model of the sessions and revoked buckets;
//! the promises of ARCHITECTURE.md ("Concurrency", the invariants "one
//! decision per seat" and "a session is ended only through a create-only
//! write") are checked as they go and whenever the system has settled. The
//! schedule comes from one seed (`fastrand::Rng::with_seed`), so a failure
//! replays from the seed it prints.
//!
//! # What is modelled
//!
//! The decisions are the real code: each replica's [`View`] (`set_dict`,
//! `heard`, `revoke`, `over_limit`, `check`, `find_session`), the plans
//! of enforcement ([`enforcement::endings`]), `kick` ([`plan_kick`]) and
//! `check` ([`plan_check`]), [`Deciding`] stepped as [`ledger::decide`]
//! steps it (a read, `read`, a compare-and-set write, `landed`, a read again
//! after a conflict or an unknown outcome, `unrecorded` after
//! [`TRIES`]), [`Decided`] and [`effects::holder`] as `enforcement::end`
//! and `effects::settle` use them (a create, a read back on any failure,
//! three tries with a backoff), and the enforcer's [`Schedule`] and retry
//! waits ([`retry_wait`]), `end_session`'s patience
//! ([`REQUEST_PATIENCE`]). Only the I/O is modelled; every network leg
//! (a request reaching the store, its answer reaching the replica) is its
//! own step.
//!
//! - One to three accounts, each with a limit of 1 to 4, a random policy
//!   and, in some seeds, a per-content limit.
//! - The sessions bucket: one dictionary per account in one long interval
//!   (interval boundaries are the handlers' simulation's business), written
//!   by a model handler: a device joins (its record's `since` is the
//!   handler's clock), leaves (its record goes), or its session is removed
//!   once its revocation reaches the handler. One revision sequence.
//! - The revoked bucket, its own revision sequence: create-only session
//!   keys whose value carries the deciding decision's id
//!   (`effects::revocation_value`; a create finds an existing key refused),
//!   and each account's ledger, written by compare-and-set on its revision
//!   (another revision: refused). A write may land and be acknowledged,
//!   land with its acknowledgement lost, be lost before the server, or be
//!   given up on by its writer (its deadline) and still land later, within
//!   5 s, or never; the writer sees an unknown outcome in all three. A read
//!   may fail. Leader elections: stretches (up to 45 s) where every write
//!   to the bucket fails, not landed, outcome unknown.
//! - Devices heartbeat every 5 s; each replica hears each heartbeat after
//!   its own delay, or misses it, so evict-least-active orders differ
//!   between replicas.
//! - Two or three replicas, each with its clock skew (up to 2 s either
//!   way), its sessions watch and its revoked watch (each delivering its
//!   bucket's writes in order, after any delay, independently of the other:
//!   the two buckets' news arrive in either order), its enforcer (one run
//!   per account at a time, unsettled endings retried as the same decision)
//!   and restarts (the view rebuilt from what the buckets hold, as the
//!   watches' replay does; what was under way is dropped, though writes
//!   already sent may still land).
//! - `kick` and `check` requests arrive at random replicas; a kick names a
//!   live session mostly, now and then one that left or ended; `check`
//!   asks for a device holding no live session, with a content or none,
//!   sometimes naming a session to take over.
//!
//! Not modelled: grace periods, limits changing during a run, revocations
//! expiring (`View::unrevoke`), the sessions bucket's own failures (its
//! watches' lag stands for them), and `check` for a device already playing.
//!
//! # Invariants
//!
//! 1. Endings announced once: at every step, no ending is announced twice,
//!    and only by the decision whose value its revocation key holds; once
//!    settled, every revocation key was announced exactly once.
//! 2. Limits kept: once settled, no account has more live sessions (in its
//!    dictionary and not revoked) than its limit, nor more on one content
//!    than its per-content limit.
//! 3. One decision per seat, at every ledger write that lands: every
//!    ending it adds is needed by the store's true state at that moment.
//!    The sessions in the account's dictionary that no revocation key and
//!    no ledger entry names (before the write) are live; an ending is
//!    needed when putting it back among the live ones, with the write's
//!    other endings gone, breaks a limit: the account's limit (for
//!    `check`, with the requesting device as one more) or the per-content
//!    limit of the ending's content (for `check`: the requested content).
//!    Reject-new ends the newest and the evict policies the oldest or the
//!    quietest, but each ends only as many as the counts need, which is
//!    what is checked; a kick is the operator's and needs no seat. And at
//!    every revocation that lands: its session is one a ledger write
//!    recorded (nothing is ended that no decision recorded).
//! 4. Kicks: a kick answered `kicked: true` holds its session's revocation
//!    key when it answers, and once settled was announced by its own
//!    decision.
//! 5. The ledger never loses an entry decided within the horizon: at every
//!    write, every entry ever stored is still there while it is younger
//!    than `HORIZON_MS` (give or take the clock skew; runs are shorter than
//!    the horizon, so no entry may go).
//!
//! The run settles now and then and at its end: no new input; every
//! message, watch and heartbeat delivered and everything under way carried
//! out on a reliable network; time moved on until every live session has
//! been heard again by every replica, and everything it set off carried
//! out too. Then nothing may be left under way.
//!
//! Tolerated, counted and printed (`SIM_STRICT=1` fails on them):
//!
//! - [`Race::StaleView`]: a ledger write's endings are needed only on the
//!   dictionary the writing replica's view held when it chose: its sessions
//!   watch had not brought a leave yet (a session it held is gone from the
//!   store's dictionary).
//! - [`Race::StoppedUnsettled`]: a revocation landed for a decision whose
//!   replica restarted before it knew, and nobody announces it.
//!
//! # Running it
//!
//! `cargo test -p checker --lib simulation` runs 200 seeds of 1000 steps.
//! `SIM_SEED=<seed>` runs one (what a failure prints), `SIM_SEEDS`,
//! `SIM_FIRST` and `SIM_STEPS` size a run, `SIM_TRACE=1` prints every step,
//! `SIM_STRICT=1` fails on the tolerated races. `SIM_NO_LEDGER=1` is the
//! negative control, run by hand: every replica decides alone and revokes
//! at once, without the ledger, and invariant 3 is checked when each
//! revocation lands; it fails (e.g. `SIM_SEED=14 SIM_STEPS=40`: under
//! evict-least-active with a limit of one, two replicas each evict the
//! session they heard least recently, two endings for one seat).
//! `deploy/dev simulate` runs a long one in a release build.
//!
//! A replay is exact but for the decision ids (random, as in production),
//! which only ever compare equal to themselves.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use headcount_protocol::wire::{
    CheckRequest, KickRequest, Labels, Ledger, LedgerEntry, SessionDict, SessionRecord,
};
use headcount_protocol::{
    AccountId, AccountLimits, DeviceId, IntervalClock, Limit, Policy, ServiceError, SessionId,
    UnixMillis,
};
use headcount_runtime::effects::{self, Holder, holder};

use crate::endpoints::{plan_check, plan_kick};
use crate::enforcement::{
    self, ACCOUNTS_AT_ONCE, Backlog, Decided, Ended, Ending, REQUEST_PATIENCE, Schedule, retry_wait,
};
use crate::ledger::{Deciding, HORIZON_MS, Outcome, Step, TRIES};
use crate::view::{CheckOutcome, Rules, View};

/// One long interval: boundaries are out of scope here.
const INTERVAL_MS: u64 = 6 * 3_600_000;
const TIMEOUT_MS: u64 = 15_000;
const HEARTBEAT_MS: u64 = 5_000;
const MAX_SKEW_MS: i64 = 2_000;
/// `effects::settle`'s patience: three tries, 250 ms before the second,
/// doubling.
const CREATE_TRIES: u32 = 3;
const CREATE_BACKOFF_MS: u64 = 250;
/// The longest a write its writer gave up on may still take to land.
const GHOST_MS: u64 = 5_000;
const ACCOUNTS: [&str; 3] = ["acme", "globex", "initech"];
const DEVICES_PER_ACCOUNT: usize = 7;
const CONTENTS: [Option<&str>; 3] = [None, Some("film"), Some("news")];
const DEFAULT_SEEDS: u64 = 200;
const DEFAULT_STEPS: usize = 1_000;

/// Races the checkers cannot tell from what they see; counted, printed,
/// failures under `SIM_STRICT=1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Race {
    /// A ledger write's endings are more than the store's state needs, but
    /// exactly what the dictionary the writer's view held needs: its
    /// sessions watch had not brought a leave yet. ARCHITECTURE.md,
    /// "Concurrency": not kept.
    StaleView,
    /// A revocation landed for a decision whose replica restarted before it
    /// knew that, and nobody announces it. ARCHITECTURE.md: an ending still
    /// unsettled when its checker stops is not kept.
    StoppedUnsettled,
}

impl Race {
    const ALL: [Race; 2] = [Race::StaleView, Race::StoppedUnsettled];
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    joins: u64,
    leaves: u64,
    kicks: u64,
    kicked: u64,
    checks: u64,
    ledger_writes: u64,
    conflicts: u64,
    unknown_writes: u64,
    revocations: u64,
    announced: u64,
    restarts: u64,
    elections: u64,
    settles: u64,
    races: [u64; 3],
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Self) {
        self.joins += o.joins;
        self.leaves += o.leaves;
        self.kicks += o.kicks;
        self.kicked += o.kicked;
        self.checks += o.checks;
        self.ledger_writes += o.ledger_writes;
        self.conflicts += o.conflicts;
        self.unknown_writes += o.unknown_writes;
        self.revocations += o.revocations;
        self.announced += o.announced;
        self.restarts += o.restarts;
        self.elections += o.elections;
        self.settles += o.settles;
        for (a, b) in self.races.iter_mut().zip(o.races) {
            *a += b;
        }
    }
}

// ---- the world -----------------------------------------------------------

struct Account {
    id: AccountId,
    limit: u32,
    policy: Policy,
    per_content: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    /// In its dictionary (unless ended meanwhile), heartbeating.
    Live,
    Left,
    /// Its revocation key landed.
    Ended,
}

struct Session {
    id: SessionId,
    account: usize,
    device: usize,
    content: Option<&'static str>,
    life: Life,
    next_beat: UnixMillis,
}

struct Device {
    id: DeviceId,
    account: usize,
    session: Option<usize>,
}

/// A revocation key as stored.
struct RevKey {
    value: Bytes,
    decision: String,
}

/// One write of the revoked bucket, as its watch delivers it.
#[derive(Clone)]
enum RevokedEntry {
    Session(usize, SessionId),
    Ledger,
}

/// How the network treats this seed's I/O, in percent.
struct Net {
    lost_request: u32,
    lost_ack: u32,
    failed_read: u32,
    /// Writes the writer stops waiting for (its deadline) that the store
    /// still takes later, or never.
    late: u32,
    elections: bool,
}

// ---- the replicas and what they do ----------------------------------------

struct Replica {
    view: View,
    skew: i64,
    epoch: u32,
    /// Percent of heartbeats missed, and the longest delay of one heard.
    miss: u32,
    jitter: u64,
    sessions_watch: VecDeque<(usize, SessionDict)>,
    revoked_watch: VecDeque<RevokedEntry>,
    /// Per account, the dictionary the sessions watch delivered last.
    delivered: Vec<SessionDict>,
    /// Heartbeats on their way: when heard, which session.
    heartbeats: Vec<(UnixMillis, usize)>,
    schedule: Schedule,
    unsettled: Backlog,
    wakes: Vec<(UnixMillis, AccountId)>,
}

/// What a plan is for, for invariant 3.
#[derive(Debug, Clone)]
enum PlanMeta {
    Enforce,
    Kick,
    Check {
        device: usize,
        content: Option<String>,
    },
}

/// What a decision's endings were chosen on: its plan, and the sessions the
/// writer's view held in the account's dictionary.
#[derive(Debug, Clone)]
struct WriteMeta {
    plan: PlanMeta,
    seen: Vec<usize>,
    replica: usize,
}

#[derive(Clone)]
enum Req {
    ReadLedger(usize),
    Cas {
        account: usize,
        ledger: Ledger,
        revision: u64,
        meta: WriteMeta,
    },
    Create {
        account: usize,
        session: SessionId,
        value: Bytes,
        decision: String,
        /// Without the ledger (`SIM_NO_LEDGER`): the plan this ending came
        /// from, checked when it lands.
        direct: Option<WriteMeta>,
    },
    ReadBack(SessionId),
}

#[derive(Debug)]
enum Reply {
    Ledger(Result<(Ledger, u64), String>),
    Cas(Written),
    Create(Written),
    ReadBack(Result<Option<Bytes>, String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    Ok,
    /// Compare-and-set: another revision; create: the key exists.
    Refused,
    Unknown,
}

/// A write its writer stopped waiting for, still on its way to the store.
struct Ghost {
    sent: UnixMillis,
    replica: usize,
    req: Req,
}

struct Op {
    task: usize,
    replica: usize,
    epoch: u32,
    req: Req,
    reply: Option<Reply>,
}

#[derive(Debug)]
enum Input {
    Start,
    Wake,
    Reply(Reply),
}

enum Act<T> {
    Op(Req),
    Sleep(u64),
    Done(T),
}

enum Next {
    Op(Req),
    Sleep(u64),
    Done,
}

#[derive(Debug, Clone)]
enum Plan {
    Enforce,
    Kick(KickRequest),
    Check(CheckRequest),
}

#[derive(Debug)]
enum Out {
    Nothing,
    Check(#[allow(dead_code)] Result<CheckOutcome, ServiceError>),
}

impl Plan {
    /// The plan as the real caller passes it to `ledger::decide`.
    fn plan(&self, view: &mut View, account: &AccountId, now: UnixMillis) -> (Vec<Ending>, Out) {
        match self {
            Plan::Enforce => (enforcement::endings(view, account, now), Out::Nothing),
            Plan::Kick(req) => (plan_kick(view, req, now).0, Out::Nothing),
            Plan::Check(req) => {
                let (endings, out) = plan_check(view, req, now);
                (endings, Out::Check(out))
            }
        }
    }
}

/// `ledger::decide` in the making.
struct DecideM {
    account: usize,
    now: UnixMillis,
    plan: Plan,
    meta: PlanMeta,
    deciding: Option<Deciding<Out>>,
    attempt: usize,
    last: String,
    /// Without the ledger: what the endings were chosen on.
    direct: Option<WriteMeta>,
}

/// One `enforcement::end` (its `effects::settle` included).
struct EndM {
    d: Decided,
    value: Bytes,
    n: u32,
    backoff: u64,
    direct: Option<WriteMeta>,
}

impl EndM {
    fn new(d: Decided, direct: Option<WriteMeta>) -> Self {
        Self {
            value: effects::revocation_value(&d.revocation, &d.decision),
            d,
            n: 0,
            backoff: CREATE_BACKOFF_MS,
            direct,
        }
    }
}

/// `enforcement::end_session`: `end` retried for its patience.
struct SessionEndM {
    end: EndM,
    until: UnixMillis,
    wait: Option<Duration>,
    pausing: bool,
}

/// What an enforcement run leaves ([`enforcement::Left`] less its
/// account).
struct Left {
    endings: Vec<Decided>,
    undecided: bool,
}

enum RunPhase {
    Start(Vec<Decided>),
    Retry {
        cur: EndM,
        rest: VecDeque<Decided>,
    },
    Decide(DecideM),
    End {
        cur: EndM,
        rest: VecDeque<(Decided, Option<WriteMeta>)>,
        undecided: bool,
    },
    Over,
}

/// `enforcement::run_account`.
struct RunTask {
    account: usize,
    phase: RunPhase,
    left: Option<Left>,
}

enum ReqPhase {
    Decide(DecideM),
    Ending { cur: SessionEndM, own: bool },
    Over,
}

/// `endpoints::kick` or `endpoints::check`.
struct RequestTask {
    account: usize,
    kick: bool,
    phase: ReqPhase,
    queue: VecDeque<(Ending, Option<WriteMeta>)>,
    own: Option<(Ending, Option<WriteMeta>)>,
    unrecorded: bool,
}

enum Task {
    Run(RunTask),
    Request(RequestTask),
}

struct Slot {
    replica: usize,
    wake_at: Option<UnixMillis>,
    task: Task,
}

thread_local! {
    /// Where the current run is, for the failure message of any panic.
    static AT: Cell<(usize, bool)> = const { Cell::new((0, false)) };
}

fn fail(msg: String) -> ! {
    panic!("{msg}")
}

struct Sim {
    rng: fastrand::Rng,
    now: UnixMillis,
    clock: IntervalClock,
    rules: Rules,
    trace: bool,
    strict: bool,
    no_ledger: bool,
    net: Net,
    settling: bool,
    accounts: Vec<Account>,
    devices: Vec<Device>,
    sessions: Vec<Session>,
    by_id: HashMap<SessionId, usize>,
    // The sessions bucket.
    sessions_seq: u64,
    dicts: Vec<SessionDict>,
    // The revoked bucket.
    revoked_seq: u64,
    keys: BTreeMap<SessionId, RevKey>,
    ledgers: Vec<(Ledger, u64)>,
    /// Every ledger entry ever stored, per account.
    history: Vec<Vec<LedgerEntry>>,
    election_until: Option<UnixMillis>,
    /// Revocations on their way to the handler.
    handler_queue: VecDeque<usize>,
    replicas: Vec<Replica>,
    ops: Vec<Op>,
    ghosts: Vec<Ghost>,
    tasks: BTreeMap<usize, Slot>,
    next_task: usize,
    /// Per session: how often it was announced, by which decision.
    announced: HashMap<SessionId, (u32, String)>,
    /// Per decision id: the replica and its epoch that made it.
    deciders: HashMap<String, (usize, u32)>,
    /// Kicks answered `kicked: true`: the session and the kick's decision.
    kicked: Vec<(SessionId, String)>,
    next_session: u64,
    stats: Stats,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let clock = IntervalClock::new(Duration::from_millis(INTERVAL_MS));
        // Well inside an interval, so that no run (nor skew) reaches a
        // boundary.
        let now = clock.start_of(1_700_000_000_000 / INTERVAL_MS) + 3_600_000 + rng.u64(0..1_000);
        let rules = Rules {
            clock,
            timeout_ms: TIMEOUT_MS,
            default_limit: Limit::new(3, Policy::EvictOldest).expect("limit"),
        };
        let per_content = rng.u32(0..3) == 0;
        let accounts: Vec<Account> = (0..rng.usize(1..=3))
            .map(|i| Account {
                id: AccountId::parse(ACCOUNTS[i]).expect("account"),
                limit: rng.u32(1..=4),
                policy: Policy::ALL[rng.usize(0..Policy::ALL.len())],
                per_content: (per_content && rng.bool()).then(|| rng.u32(1..=2)),
            })
            .collect();
        let net = if rng.u32(0..4) == 0 {
            Net {
                lost_request: 0,
                lost_ack: 0,
                failed_read: 0,
                late: 0,
                elections: false,
            }
        } else {
            Net {
                lost_request: rng.u32(0..8),
                lost_ack: rng.u32(0..10),
                failed_read: rng.u32(0..10),
                late: rng.u32(0..30),
                elections: rng.bool(),
            }
        };
        let n = accounts.len();
        let mut sim = Sim {
            rng,
            now,
            clock,
            rules,
            trace: std::env::var_os("SIM_TRACE").is_some(),
            strict: std::env::var_os("SIM_STRICT").is_some(),
            no_ledger: std::env::var_os("SIM_NO_LEDGER").is_some(),
            net,
            settling: false,
            accounts,
            devices: Vec::new(),
            sessions: Vec::new(),
            by_id: HashMap::new(),
            sessions_seq: 0,
            dicts: vec![SessionDict::new(); n],
            revoked_seq: 0,
            keys: BTreeMap::new(),
            ledgers: vec![(Ledger::default(), 0); n],
            history: vec![Vec::new(); n],
            election_until: None,
            handler_queue: VecDeque::new(),
            replicas: Vec::new(),
            ops: Vec::new(),
            ghosts: Vec::new(),
            tasks: BTreeMap::new(),
            next_task: 0,
            announced: HashMap::new(),
            deciders: HashMap::new(),
            kicked: Vec::new(),
            next_session: 0,
            stats: Stats::default(),
        };
        for a in 0..n {
            for d in 0..DEVICES_PER_ACCOUNT {
                sim.devices.push(Device {
                    id: DeviceId::parse(&format!("d{d}")).expect("device"),
                    account: a,
                    session: None,
                });
            }
        }
        for _ in 0..sim.rng.usize(2..=3) {
            let skew = sim.rng.i64(-MAX_SKEW_MS..=MAX_SKEW_MS);
            let replica = Replica {
                view: View::new(sim.rules, 0),
                skew,
                epoch: 0,
                miss: sim.rng.u32(0..25),
                jitter: sim.rng.u64(0..400),
                sessions_watch: VecDeque::new(),
                revoked_watch: VecDeque::new(),
                delivered: vec![SessionDict::new(); n],
                heartbeats: Vec::new(),
                schedule: Schedule::new(ACCOUNTS_AT_ONCE),
                unsettled: Backlog::default(),
                wakes: Vec::new(),
            };
            sim.replicas.push(replica);
            let r = sim.replicas.len() - 1;
            sim.replicas[r].view = sim.fresh_view(r);
        }
        sim
    }

    fn chance(&mut self, percent: u32) -> bool {
        !self.settling && self.rng.u32(0..100) < percent
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            println!("[{}] {}", self.now, what());
        }
    }

    /// Replica `r`'s clock.
    fn clock_of(&self, r: usize) -> UnixMillis {
        (self.now as i64 + self.replicas[r].skew) as UnixMillis
    }

    fn interval(&self) -> u64 {
        self.clock.interval_of(self.now)
    }

    fn race(&mut self, race: Race, what: impl FnOnce() -> String) {
        self.stats.races[race as usize] += 1;
        let what = what();
        self.log(|| format!("tolerated {race:?}: {what}"));
        if self.strict {
            fail(format!("{race:?} (SIM_STRICT): {what}"));
        }
    }

    /// A view as a replica starting now builds it: the limits, then what
    /// the buckets hold (the watches' replay).
    fn fresh_view(&self, r: usize) -> View {
        let mut view = View::new(self.rules, self.clock_of(r));
        for a in &self.accounts {
            let limits = AccountLimits {
                limit: Some(a.limit),
                policy: Some(a.policy),
                per_content: a.per_content,
                ..Default::default()
            };
            view.set_overrides_at(&a.id, Some(limits), 1);
        }
        for (a, dict) in self.dicts.iter().enumerate() {
            if !dict.is_empty() {
                view.set_dict(&self.accounts[a].id, self.interval(), dict.clone());
            }
        }
        for session in self.keys.keys() {
            let a = self.sessions[self.by_id[session]].account;
            view.revoke(&self.accounts[a].id, session);
        }
        view
    }

    // ---- the sessions bucket and its handler ----------------------------

    fn write_dict(&mut self, a: usize) {
        self.sessions_seq += 1;
        let dict = self.dicts[a].clone();
        for rep in &mut self.replicas {
            rep.sessions_watch.push_back((a, dict.clone()));
        }
    }

    fn act_join(&mut self) {
        let a = self.rng.usize(0..self.accounts.len());
        let free: Vec<usize> = (0..self.devices.len())
            .filter(|&d| self.devices[d].account == a && self.devices[d].session.is_none())
            .collect();
        if free.is_empty() {
            return;
        }
        let d = free[self.rng.usize(0..free.len())];
        self.join(d);
    }

    fn join(&mut self, d: usize) {
        let a = self.devices[d].account;
        self.next_session += 1;
        let id = SessionId::parse(&format!("s{}", self.next_session)).expect("session");
        let content = CONTENTS[self.rng.usize(0..CONTENTS.len())];
        let s = self.sessions.len();
        self.sessions.push(Session {
            id: id.clone(),
            account: a,
            device: d,
            content,
            life: Life::Live,
            next_beat: self.now + HEARTBEAT_MS,
        });
        self.by_id.insert(id.clone(), s);
        self.devices[d].session = Some(s);
        self.dicts[a].insert(
            self.devices[d].id.clone(),
            SessionRecord {
                session: id.clone(),
                since: self.now,
                last_seen: self.now,
                labels: Labels::new(content, None, None),
                replaced: None,
            },
        );
        self.stats.joins += 1;
        self.log(|| format!("{} joins as {id} ({content:?})", self.devices[d].id));
        self.write_dict(a);
        self.beat(s);
    }

    fn act_leave(&mut self) {
        let live: Vec<usize> = (0..self.sessions.len())
            .filter(|&s| self.sessions[s].life == Life::Live)
            .collect();
        if live.is_empty() {
            return;
        }
        let s = live[self.rng.usize(0..live.len())];
        self.sessions[s].life = Life::Left;
        let d = self.sessions[s].device;
        self.devices[d].session = None;
        self.stats.leaves += 1;
        self.log(|| format!("{} leaves", self.sessions[s].id));
        self.remove_record(s);
    }

    /// The handler removes `s`'s record, if its device's entry is `s`.
    fn remove_record(&mut self, s: usize) {
        let (a, d) = (self.sessions[s].account, self.sessions[s].device);
        let dev = self.devices[d].id.clone();
        if self.dicts[a]
            .get(&dev)
            .is_some_and(|r| r.session == self.sessions[s].id)
        {
            self.dicts[a].remove(&dev);
            self.write_dict(a);
        }
    }

    /// A revocation reaches the handler: the ended session leaves the
    /// dictionary.
    fn act_handler(&mut self) {
        if let Some(s) = self.handler_queue.pop_front() {
            self.log(|| format!("handler drops ended {}", self.sessions[s].id));
            self.remove_record(s);
        }
    }

    /// A heartbeat of `s`: each replica hears it after its own delay, or
    /// misses it.
    fn beat(&mut self, s: usize) {
        for r in 0..self.replicas.len() {
            let (miss, jitter) = (self.replicas[r].miss, self.replicas[r].jitter);
            if self.chance(miss) {
                continue;
            }
            let at = self.now + self.rng.u64(0..=jitter);
            self.replicas[r].heartbeats.push((at, s));
        }
    }

    // ---- time ------------------------------------------------------------

    /// Moves time on by `by`, firing heartbeats, their arrival at each
    /// replica and the enforcers' retry wakes in time order.
    fn advance_time(&mut self, by: u64) {
        let target = self.now + by;
        loop {
            let beats = self
                .sessions
                .iter()
                .filter(|s| s.life == Life::Live)
                .map(|s| s.next_beat);
            let heard = self
                .replicas
                .iter()
                .flat_map(|r| r.heartbeats.iter().map(|h| h.0));
            let wakes = self
                .replicas
                .iter()
                .flat_map(|r| r.wakes.iter().map(|w| w.0));
            let Some(next) = beats.chain(heard).chain(wakes).min() else {
                break;
            };
            if next > target {
                break;
            }
            self.now = self.now.max(next);
            self.fire_due();
        }
        self.now = target;
    }

    fn fire_due(&mut self) {
        for s in 0..self.sessions.len() {
            if self.sessions[s].life == Life::Live && self.sessions[s].next_beat <= self.now {
                let next = self.now + HEARTBEAT_MS + self.rng.u64(0..200) - 100;
                self.sessions[s].next_beat = next;
                self.beat(s);
            }
        }
        for r in 0..self.replicas.len() {
            let mut due: Vec<(UnixMillis, usize)> = Vec::new();
            self.replicas[r].heartbeats.retain(|h| {
                let now = h.0 <= self.now;
                if now {
                    due.push(*h);
                }
                !now
            });
            due.sort();
            for (_, s) in due {
                self.hear(r, s);
            }
            let mut woken: Vec<(UnixMillis, AccountId)> = Vec::new();
            self.replicas[r].wakes.retain(|w| {
                let now = w.0 <= self.now;
                if now {
                    woken.push(w.clone());
                }
                !now
            });
            for (_, account) in woken {
                self.replicas[r].schedule.wake(account);
                self.pump(r);
            }
        }
    }

    /// `watches::on_heartbeat`.
    fn hear(&mut self, r: usize, s: usize) {
        let sess = &self.sessions[s];
        let (a, account) = (sess.account, &self.accounts[sess.account].id);
        let device = &self.devices[sess.device].id;
        let now = self.clock_of(r);
        let revived =
            self.replicas[r]
                .view
                .heard(account.as_str(), device.as_str(), sess.id.as_str(), now);
        if revived {
            self.enforce(r, a);
        }
    }

    // ---- the watches -----------------------------------------------------

    /// `watches::on_dict_entry`.
    fn deliver_sessions(&mut self, r: usize) {
        let Some((a, dict)) = self.replicas[r].sessions_watch.pop_front() else {
            return;
        };
        let interval = self.interval();
        let rep = &mut self.replicas[r];
        rep.view
            .set_dict(&self.accounts[a].id, interval, dict.clone());
        rep.delivered[a] = dict;
        self.log(|| format!("replica {r}: sessions watch, {}", self.accounts[a].id));
        self.enforce(r, a);
    }

    /// `watches::on_revoked_entry` (the ledger's key names no session).
    fn deliver_revoked(&mut self, r: usize) {
        if let Some(RevokedEntry::Session(a, s)) = self.replicas[r].revoked_watch.pop_front() {
            self.replicas[r].view.revoke(&self.accounts[a].id, &s);
        }
    }

    fn act_watch(&mut self, revoked: bool) {
        let with: Vec<usize> = (0..self.replicas.len())
            .filter(|&r| {
                let rep = &self.replicas[r];
                if revoked {
                    !rep.revoked_watch.is_empty()
                } else {
                    !rep.sessions_watch.is_empty()
                }
            })
            .collect();
        if with.is_empty() {
            return;
        }
        let r = with[self.rng.usize(0..with.len())];
        // A lagging watch brings its backlog at once, now and then.
        let n = if self.rng.u32(0..5) == 0 { 100 } else { 1 };
        for _ in 0..n {
            if revoked {
                self.deliver_revoked(r);
            } else {
                self.deliver_sessions(r);
            }
        }
    }

    // ---- the enforcer (`enforcement::enforcer`) --------------------------

    fn enforce(&mut self, r: usize, a: usize) {
        let account = self.accounts[a].id.clone();
        self.replicas[r].schedule.request(account);
        self.pump(r);
    }

    fn pump(&mut self, r: usize) {
        while let Some(account) = self.replicas[r].schedule.start() {
            let a = self.account_ix(&account);
            let retry = self.replicas[r].unsettled.take(&account);
            self.spawn(
                r,
                Task::Run(RunTask {
                    account: a,
                    phase: RunPhase::Start(retry),
                    left: None,
                }),
            );
        }
    }

    fn account_ix(&self, account: &AccountId) -> usize {
        self.accounts
            .iter()
            .position(|a| &a.id == account)
            .expect("a known account")
    }

    fn run_done(&mut self, r: usize, t: RunTask) {
        let left = t.left.expect("a finished run leaves something");
        let account = self.accounts[t.account].id.clone();
        let rep = &mut self.replicas[r];
        let left = enforcement::Left {
            account: account.clone(),
            endings: left.endings,
            undecided: left.undecided,
        };
        match rep.unsettled.finished(left) {
            None => rep.schedule.finished(&account, false),
            Some(wait) => {
                rep.schedule.finished(&account, true);
                rep.wakes
                    .push((self.now + wait.as_millis() as u64, account));
            }
        }
        self.pump(r);
    }

    // ---- tasks -----------------------------------------------------------

    fn spawn(&mut self, r: usize, task: Task) {
        let id = self.next_task;
        self.next_task += 1;
        self.tasks.insert(
            id,
            Slot {
                replica: r,
                wake_at: None,
                task,
            },
        );
        self.drive(id, Input::Start);
    }

    fn drive(&mut self, id: usize, input: Input) {
        let Some(mut slot) = self.tasks.remove(&id) else {
            return;
        };
        let r = slot.replica;
        let next = match &mut slot.task {
            Task::Run(t) => self.advance_run(r, t, input),
            Task::Request(t) => self.advance_request(r, t, input),
        };
        match next {
            Next::Op(req) => {
                let epoch = self.replicas[r].epoch;
                self.ops.push(Op {
                    task: id,
                    replica: r,
                    epoch,
                    req,
                    reply: None,
                });
                slot.wake_at = None;
                self.tasks.insert(id, slot);
            }
            Next::Sleep(ms) => {
                slot.wake_at = Some(self.now + ms);
                self.tasks.insert(id, slot);
            }
            Next::Done => {
                if let Task::Run(t) = slot.task {
                    self.run_done(r, t);
                }
            }
        }
    }

    /// `enforcement::run_account`.
    fn advance_run(&mut self, r: usize, t: &mut RunTask, mut input: Input) -> Next {
        let a = t.account;
        loop {
            match std::mem::replace(&mut t.phase, RunPhase::Over) {
                RunPhase::Start(retry) => {
                    let mut rest: VecDeque<Decided> = retry.into();
                    match rest.pop_front() {
                        Some(d) => {
                            t.phase = RunPhase::Retry {
                                cur: EndM::new(d, None),
                                rest,
                            };
                        }
                        None => t.phase = RunPhase::Decide(self.decide_new(r, a, Plan::Enforce)),
                    }
                    input = Input::Start;
                }
                RunPhase::Retry { mut cur, mut rest } => match self.end_step(r, &mut cur, input) {
                    Act::Op(q) => {
                        t.phase = RunPhase::Retry { cur, rest };
                        return Next::Op(q);
                    }
                    Act::Sleep(ms) => {
                        t.phase = RunPhase::Retry { cur, rest };
                        return Next::Sleep(ms);
                    }
                    Act::Done(Ended::Unsettled) => {
                        let endings = std::iter::once(cur.d).chain(rest).collect();
                        t.left = Some(Left {
                            endings,
                            undecided: false,
                        });
                        return Next::Done;
                    }
                    Act::Done(_) => {
                        match rest.pop_front() {
                            Some(d) => {
                                t.phase = RunPhase::Retry {
                                    cur: EndM::new(d, None),
                                    rest,
                                }
                            }
                            None => {
                                t.phase = RunPhase::Decide(self.decide_new(r, a, Plan::Enforce))
                            }
                        }
                        input = Input::Start;
                    }
                },
                RunPhase::Decide(mut m) => match self.decide_step(r, &mut m, input) {
                    Act::Op(q) => {
                        t.phase = RunPhase::Decide(m);
                        return Next::Op(q);
                    }
                    Act::Sleep(ms) => {
                        t.phase = RunPhase::Decide(m);
                        return Next::Sleep(ms);
                    }
                    Act::Done(outcome) => {
                        let account = self.accounts[a].id.clone();
                        let undecided = outcome.unrecorded.is_some();
                        let direct = m.direct.take();
                        let mut todo: VecDeque<(Decided, Option<WriteMeta>)> =
                            outcome
                                .follow
                                .into_iter()
                                .map(|e| (Decided::new(account.clone(), e, m.now), None))
                                .chain(outcome.new.into_iter().map(|e| {
                                    (Decided::new(account.clone(), e, m.now), direct.clone())
                                }))
                                .collect();
                        match todo.pop_front() {
                            None => {
                                t.left = Some(Left {
                                    endings: Vec::new(),
                                    undecided,
                                });
                                return Next::Done;
                            }
                            Some((d, direct)) => {
                                t.phase = RunPhase::End {
                                    cur: EndM::new(d, direct),
                                    rest: todo,
                                    undecided,
                                };
                                input = Input::Start;
                            }
                        }
                    }
                },
                RunPhase::End {
                    mut cur,
                    mut rest,
                    undecided,
                } => match self.end_step(r, &mut cur, input) {
                    Act::Op(q) => {
                        t.phase = RunPhase::End {
                            cur,
                            rest,
                            undecided,
                        };
                        return Next::Op(q);
                    }
                    Act::Sleep(ms) => {
                        t.phase = RunPhase::End {
                            cur,
                            rest,
                            undecided,
                        };
                        return Next::Sleep(ms);
                    }
                    Act::Done(Ended::Unsettled) => {
                        let endings = std::iter::once(cur.d)
                            .chain(rest.into_iter().map(|(d, _)| d))
                            .collect();
                        t.left = Some(Left { endings, undecided });
                        return Next::Done;
                    }
                    Act::Done(_) => match rest.pop_front() {
                        Some((d, direct)) => {
                            t.phase = RunPhase::End {
                                cur: EndM::new(d, direct),
                                rest,
                                undecided,
                            };
                            input = Input::Start;
                        }
                        None => {
                            t.left = Some(Left {
                                endings: Vec::new(),
                                undecided,
                            });
                            return Next::Done;
                        }
                    },
                },
                RunPhase::Over => fail("a run stepped after it was over".into()),
            }
        }
    }

    /// `endpoints::kick` and `endpoints::check`: the decision, then each
    /// ending through `end_session`, then the answer.
    fn advance_request(&mut self, r: usize, t: &mut RequestTask, mut input: Input) -> Next {
        loop {
            match std::mem::replace(&mut t.phase, ReqPhase::Over) {
                ReqPhase::Decide(mut m) => match self.decide_step(r, &mut m, input) {
                    Act::Op(q) => {
                        t.phase = ReqPhase::Decide(m);
                        return Next::Op(q);
                    }
                    Act::Sleep(ms) => {
                        t.phase = ReqPhase::Decide(m);
                        return Next::Sleep(ms);
                    }
                    Act::Done(outcome) => {
                        t.unrecorded = outcome.unrecorded.is_some();
                        let direct = m.direct.take();
                        t.queue = outcome.follow.into_iter().map(|e| (e, None)).collect();
                        let mut new = outcome.new.into_iter().map(|e| (e, direct.clone()));
                        if t.kick {
                            t.own = new.next();
                        } else {
                            t.queue.extend(new);
                        }
                    }
                },
                ReqPhase::Ending { mut cur, own } => {
                    match self.session_end_step(r, &mut cur, input) {
                        Act::Op(q) => {
                            t.phase = ReqPhase::Ending { cur, own };
                            return Next::Op(q);
                        }
                        Act::Sleep(ms) => {
                            t.phase = ReqPhase::Ending { cur, own };
                            return Next::Sleep(ms);
                        }
                        Act::Done(ended) => {
                            if own {
                                self.kick_answered(r, &cur.end, ended);
                                return Next::Done;
                            }
                        }
                    }
                }
                ReqPhase::Over => fail("a request stepped after it was answered".into()),
            }
            // The next ending, or the answer.
            let own = if let Some(next) = t.queue.pop_front() {
                Some((next, false))
            } else if t.kick && !t.unrecorded {
                t.own.take().map(|e| (e, true))
            } else {
                None
            };
            let Some(((ending, direct), own)) = own else {
                self.log(|| {
                    format!(
                        "replica {r}: {} answered (unrecorded: {})",
                        if t.kick { "kick" } else { "check" },
                        t.unrecorded
                    )
                });
                return Next::Done;
            };
            let account = self.accounts[t.account].id.clone();
            let d = Decided::new(account, ending, self.clock_of(r));
            t.phase = ReqPhase::Ending {
                cur: SessionEndM {
                    end: EndM::new(d, direct),
                    until: self.now + REQUEST_PATIENCE.as_millis() as u64,
                    wait: None,
                    pausing: false,
                },
                own,
            };
            input = Input::Start;
        }
    }

    fn kick_answered(&mut self, r: usize, end: &EndM, ended: Ended) {
        let session = end.d.victim.session.clone();
        self.log(|| format!("replica {r}: kick of {session}: {ended:?}"));
        if ended != Ended::Won {
            return;
        }
        self.stats.kicked += 1;
        // Invariant 4: kicked means this kick's decision holds the key.
        match self.keys.get(&session) {
            Some(k) if k.value == end.value => {}
            _ => fail(format!(
                "kick of {session} answered kicked: true without holding its revocation"
            )),
        }
        self.kicked
            .push((session, end.d.decision.as_str().to_owned()));
    }

    // ---- `ledger::decide` ------------------------------------------------

    fn decide_new(&self, r: usize, a: usize, plan: Plan) -> DecideM {
        let meta = match &plan {
            Plan::Enforce => PlanMeta::Enforce,
            Plan::Kick(_) => PlanMeta::Kick,
            Plan::Check(req) => PlanMeta::Check {
                device: (0..self.devices.len())
                    .find(|&d| self.devices[d].account == a && self.devices[d].id == req.device)
                    .expect("a known device"),
                content: req.content.clone(),
            },
        };
        DecideM {
            account: a,
            now: self.clock_of(r),
            plan,
            meta,
            deciding: None,
            attempt: 0,
            last: String::new(),
            direct: None,
        }
    }

    fn write_meta(&self, r: usize, a: usize, plan: &PlanMeta) -> WriteMeta {
        WriteMeta {
            plan: plan.clone(),
            seen: self.replicas[r].delivered[a]
                .values()
                .map(|rec| self.by_id[&rec.session])
                .collect(),
            replica: r,
        }
    }

    fn decide_step(&mut self, r: usize, m: &mut DecideM, input: Input) -> Act<Outcome<Out>> {
        let account = self.accounts[m.account].id.clone();
        let now = m.now;
        match input {
            Input::Start => {
                let (first, out) = m.plan.plan(&mut self.replicas[r].view, &account, now);
                if first.is_empty() || self.no_ledger {
                    if !first.is_empty() {
                        m.direct = Some(self.write_meta(r, m.account, &m.meta));
                    }
                    return Act::Done(Outcome {
                        follow: Vec::new(),
                        new: first,
                        out,
                        unrecorded: None,
                    });
                }
                m.deciding = Some(Deciding::new(now));
                Act::Op(Req::ReadLedger(m.account))
            }
            Input::Wake => Act::Op(Req::ReadLedger(m.account)),
            Input::Reply(Reply::Ledger(Ok((ledger, revision)))) => {
                let plan = &m.plan;
                let deciding = m.deciding.as_mut().expect("deciding");
                let step = deciding.read(
                    &mut self.replicas[r].view,
                    &account,
                    ledger,
                    revision,
                    &mut |v: &mut View| plan.plan(v, &account, now),
                );
                match step {
                    Step::Done(outcome) => Act::Done(outcome),
                    Step::Write { ledger, revision } => Act::Op(Req::Cas {
                        account: m.account,
                        ledger,
                        revision,
                        meta: self.write_meta(r, m.account, &m.meta),
                    }),
                }
            }
            Input::Reply(Reply::Ledger(Err(e))) => self.decide_again(r, m, e),
            Input::Reply(Reply::Cas(Written::Ok)) => {
                match m.deciding.as_mut().expect("deciding").landed() {
                    Some(outcome) => Act::Done(outcome),
                    None => self.decide_unrecorded(r, m),
                }
            }
            Input::Reply(Reply::Cas(Written::Refused)) => {
                self.decide_again(r, m, "wrong last sequence".into())
            }
            Input::Reply(Reply::Cas(Written::Unknown)) => {
                self.decide_again(r, m, "no acknowledgement".into())
            }
            other => fail(format!("deciding got {other:?}")),
        }
    }

    fn decide_again(&mut self, r: usize, m: &mut DecideM, why: String) -> Act<Outcome<Out>> {
        m.last = why;
        m.attempt += 1;
        if m.attempt >= TRIES {
            return self.decide_unrecorded(r, m);
        }
        Act::Sleep(20 * m.attempt as u64)
    }

    fn decide_unrecorded(&mut self, r: usize, m: &mut DecideM) -> Act<Outcome<Out>> {
        let account = self.accounts[m.account].id.clone();
        let out = m.plan.plan(&mut self.replicas[r].view, &account, m.now).1;
        let deciding = m.deciding.take().expect("deciding");
        let why = format!("recording the decision: {TRIES} tries: {}", m.last);
        Act::Done(deciding.unrecorded(out, why))
    }

    // ---- `enforcement::end`, `effects::settle`, `end_session` ------------

    fn create(&mut self, r: usize, m: &EndM) -> Act<Ended> {
        let decision = m.d.decision.as_str().to_owned();
        self.deciders
            .entry(decision.clone())
            .or_insert((r, self.replicas[r].epoch));
        Act::Op(Req::Create {
            account: self.account_ix(&m.d.account),
            session: m.d.victim.session.clone(),
            value: m.value.clone(),
            decision,
            direct: m.direct.clone(),
        })
    }

    fn end_step(&mut self, r: usize, m: &mut EndM, input: Input) -> Act<Ended> {
        match input {
            Input::Start | Input::Wake => self.create(r, m),
            Input::Reply(Reply::Create(Written::Ok)) => self.end_settled(r, m, true),
            Input::Reply(Reply::Create(_)) => Act::Op(Req::ReadBack(m.d.victim.session.clone())),
            Input::Reply(Reply::ReadBack(Ok(stored))) => {
                match holder(&m.value, stored.as_deref()) {
                    Holder::Us => self.end_settled(r, m, true),
                    Holder::Another => self.end_settled(r, m, false),
                    Holder::Nobody => self.end_again(m),
                }
            }
            Input::Reply(Reply::ReadBack(Err(_))) => self.end_again(m),
            other => fail(format!("ending got {other:?}")),
        }
    }

    fn end_again(&mut self, m: &mut EndM) -> Act<Ended> {
        m.n += 1;
        if m.n >= CREATE_TRIES {
            return Act::Done(Ended::Unsettled);
        }
        let wait = m.backoff;
        m.backoff *= 2;
        Act::Sleep(wait)
    }

    fn end_settled(&mut self, r: usize, m: &EndM, won: bool) -> Act<Ended> {
        let (account, session) = (&m.d.account, &m.d.victim.session);
        self.replicas[r].view.revoke(account, session);
        if !won {
            return Act::Done(Ended::Lost);
        }
        self.announce(r, m);
        Act::Done(Ended::Won)
    }

    /// `enforcement::announce`, as the invariants see it.
    fn announce(&mut self, r: usize, m: &EndM) {
        let session = &m.d.victim.session;
        match self.keys.get(session) {
            Some(k) if k.value == m.value => {}
            _ => fail(format!(
                "replica {r} announced the end of {session} without holding its revocation"
            )),
        }
        let n = self
            .announced
            .entry(session.clone())
            .or_insert((0, m.d.decision.as_str().to_owned()));
        n.0 += 1;
        if n.0 > 1 {
            fail(format!("the end of {session} was announced twice"));
        }
        self.stats.announced += 1;
        self.log(|| format!("replica {r} announces the end of {session}"));
    }

    fn session_end_step(&mut self, r: usize, m: &mut SessionEndM, input: Input) -> Act<Ended> {
        if m.pausing {
            // `end_session`'s pause is over: `end` again, as the same decision.
            m.pausing = false;
            m.end.n = 0;
            m.end.backoff = CREATE_BACKOFF_MS;
            return self.create(r, &m.end);
        }
        match self.end_step(r, &mut m.end, input) {
            Act::Done(ended) => {
                let next = retry_wait(m.wait);
                if ended != Ended::Unsettled || self.now + next.as_millis() as u64 > m.until {
                    if ended == Ended::Unsettled {
                        // `Shared::settle_later`: the enforcer retries it.
                        let account = self.replicas[r].unsettled.hand_over(m.end.d.clone());
                        self.replicas[r].schedule.request(account);
                        self.pump(r);
                    }
                    return Act::Done(ended);
                }
                m.wait = Some(next);
                m.pausing = true;
                Act::Sleep(next.as_millis() as u64)
            }
            other => other,
        }
    }

    // ---- the store -------------------------------------------------------

    fn act_serve(&mut self) {
        if !self.ghosts.is_empty() && self.rng.u32(0..4) == 0 {
            let g = self.rng.usize(0..self.ghosts.len());
            self.serve_ghost(g);
            return;
        }
        let sent: Vec<usize> = (0..self.ops.len())
            .filter(|&i| self.ops[i].reply.is_none())
            .collect();
        if let Some(&i) = sent.get(self.rng.usize(0..sent.len().max(1))) {
            self.serve(i);
        }
    }

    /// A write its writer gave up on reaches the store, if not too late.
    fn serve_ghost(&mut self, g: usize) {
        let ghost = self.ghosts.remove(g);
        if self.now.saturating_sub(ghost.sent) > GHOST_MS {
            return;
        }
        let landed = self.land(&ghost.req, ghost.replica);
        self.log(|| format!("replica {}: a late write, {landed:?}", ghost.replica));
    }

    /// A write reaches the store: Ok when it landed, Refused (another
    /// revision; the key exists), or Unknown (a leader election: not
    /// landed).
    fn land(&mut self, req: &Req, replica: usize) -> Written {
        let election = !self.settling && self.election_until.is_some_and(|t| t > self.now);
        match req {
            _ if election => Written::Unknown,
            Req::Cas {
                account, revision, ..
            } => {
                if self.ledgers[*account].1 != *revision {
                    self.stats.conflicts += 1;
                    Written::Refused
                } else {
                    self.commit_ledger(req);
                    Written::Ok
                }
            }
            Req::Create { session, .. } => {
                if self.keys.contains_key(session) {
                    Written::Refused
                } else {
                    self.commit_revocation(req, replica);
                    Written::Ok
                }
            }
            Req::ReadLedger(_) | Req::ReadBack(_) => unreachable!("not a write"),
        }
    }

    fn act_reply(&mut self) {
        let answered: Vec<usize> = (0..self.ops.len())
            .filter(|&i| self.ops[i].reply.is_some())
            .collect();
        if let Some(&i) = answered.get(self.rng.usize(0..answered.len().max(1))) {
            self.reply(i);
        }
    }

    /// The request of op `i` reaches the store (or is lost on its way).
    fn serve(&mut self, i: usize) {
        let lost = self.chance(self.net.lost_request);
        let ack_lost = self.chance(self.net.lost_ack);
        let failed_read = self.chance(self.net.failed_read);
        let late = !lost && self.chance(self.net.late);
        let replica = self.ops[i].replica;
        let reply = match &self.ops[i].req {
            Req::ReadLedger(a) => Reply::Ledger(if lost || failed_read {
                Err("timed out".into())
            } else {
                Ok(self.ledgers[*a].clone())
            }),
            Req::ReadBack(s) => Reply::ReadBack(if lost || failed_read {
                Err("timed out".into())
            } else {
                Ok(self.keys.get(s).map(|k| k.value.clone()))
            }),
            req @ (Req::Cas { .. } | Req::Create { .. }) => {
                let cas = matches!(req, Req::Cas { .. });
                let written = if lost {
                    Written::Unknown
                } else if late {
                    let req = req.clone();
                    self.ghosts.push(Ghost {
                        sent: self.now,
                        replica,
                        req,
                    });
                    Written::Unknown
                } else {
                    let req = req.clone();
                    match self.land(&req, replica) {
                        _ if ack_lost => Written::Unknown,
                        w => w,
                    }
                };
                if cas {
                    Reply::Cas(written)
                } else {
                    Reply::Create(written)
                }
            }
        };
        if matches!(reply, Reply::Cas(Written::Unknown)) {
            self.stats.unknown_writes += 1;
        }
        self.log(|| {
            let what = match (&self.ops[i].req, &reply) {
                (Req::ReadLedger(_), Reply::Ledger(Ok((l, rev)))) => {
                    format!("ledger read: revision {rev}, {} entries", l.ended.len())
                }
                (
                    Req::Create {
                        session, decision, ..
                    },
                    r,
                ) => {
                    format!("create {session} as {decision}: {r:?}")
                }
                (Req::ReadBack(s), r) => format!("read back {s}: {r:?}"),
                (_, r) => format!("{r:?}"),
            };
            format!("replica {}: served, {what}", self.ops[i].replica)
        });
        self.ops[i].reply = Some(reply);
    }

    /// The answer of op `i` reaches its replica, which carries on.
    fn reply(&mut self, i: usize) {
        let op = self.ops.remove(i);
        let reply = op.reply.expect("an answer");
        if self.replicas[op.replica].epoch != op.epoch {
            return; // the replica restarted: nobody waits for it
        }
        self.drive(op.task, Input::Reply(reply));
    }

    fn commit_ledger(&mut self, req: &Req) {
        let Req::Cas {
            account: a,
            ledger,
            meta,
            ..
        } = req
        else {
            unreachable!()
        };
        let (a, ledger, meta) = (*a, ledger.clone(), meta.clone());
        let old = self.ledgers[a].0.clone();
        // Invariant 5: nothing decided within the horizon is lost.
        let horizon = (self.now as i64 + MAX_SKEW_MS) as u64 - HORIZON_MS;
        for e in &self.history[a] {
            if e.at > horizon && !ledger.ended.contains(e) {
                fail(format!(
                    "a ledger write of {} dropped the entry for {} decided at {}",
                    self.accounts[a].id, e.session, e.at
                ));
            }
        }
        let new: Vec<&LedgerEntry> = ledger
            .ended
            .iter()
            .filter(|e| !old.names(&e.session))
            .collect();
        let names: BTreeSet<SessionId> = old.ended.iter().map(|e| e.session.clone()).collect();
        let ended: Vec<usize> = new.iter().map(|e| self.by_id[&e.session]).collect();
        self.log(|| {
            format!(
                "replica {}: ledger of {} records {:?}",
                meta.replica,
                self.accounts[a].id,
                new.iter().map(|e| e.session.as_str()).collect::<Vec<_>>()
            )
        });
        self.check_needed(a, &meta, &names, &ended);
        self.history[a].extend(new.into_iter().cloned());
        self.revoked_seq += 1;
        self.ledgers[a] = (ledger, self.revoked_seq);
        self.stats.ledger_writes += 1;
        for rep in &mut self.replicas {
            rep.revoked_watch.push_back(RevokedEntry::Ledger);
        }
    }

    fn commit_revocation(&mut self, req: &Req, by: usize) {
        let Req::Create {
            account: a,
            session,
            value,
            decision,
            direct,
        } = req
        else {
            unreachable!()
        };
        let (a, session, value, decision) = (*a, session.clone(), value.clone(), decision.clone());
        let s = self.by_id[&session];
        if let Some(meta) = direct.clone() {
            // Without the ledger, each revocation is a seat decision of its own.
            self.check_needed(a, &meta, &BTreeSet::new(), &[s]);
        } else if !self.history[a].iter().any(|e| e.session == session) {
            // Invariant 3: every ending is a decision the ledger recorded.
            fail(format!(
                "replica {by} revoked {session}, which no ledger write of {} recorded",
                self.accounts[a].id
            ));
        }
        self.revoked_seq += 1;
        self.keys
            .insert(session.clone(), RevKey { value, decision });
        self.stats.revocations += 1;
        if self.sessions[s].life == Life::Live {
            self.sessions[s].life = Life::Ended;
            let d = self.sessions[s].device;
            self.devices[d].session = None;
        }
        self.handler_queue.push_back(s);
        for rep in &mut self.replicas {
            rep.revoked_watch
                .push_back(RevokedEntry::Session(a, session.clone()));
        }
        let revision = self.revoked_seq;
        self.log(|| format!("replica {by}: revocation of {session} lands at revision {revision}"));
    }

    // ---- invariant 3: one decision per seat -------------------------------

    /// The endings among `ended` (sessions) that the limits do not need,
    /// with `dict` (sessions) the account's dictionary and `named` the
    /// sessions the ledger named before.
    fn unneeded(
        &self,
        a: usize,
        plan: &PlanMeta,
        dict: &[usize],
        named: &BTreeSet<SessionId>,
        ended: &[usize],
    ) -> Vec<usize> {
        let acct = &self.accounts[a];
        let live: Vec<usize> = dict
            .iter()
            .copied()
            .filter(|s| {
                let id = &self.sessions[*s].id;
                !self.keys.contains_key(id) && !named.contains(id)
            })
            .collect();
        let kept: Vec<usize> = live
            .iter()
            .copied()
            .filter(|s| !ended.contains(s))
            .collect();
        let content = |s: usize| self.sessions[s].content;
        let needed = |x: usize| -> bool {
            let pool: Vec<usize> = kept.iter().copied().chain([x]).collect();
            match plan {
                PlanMeta::Kick => true,
                PlanMeta::Enforce => {
                    pool.len() > acct.limit as usize
                        || acct.per_content.is_some_and(|p| {
                            content(x).is_some()
                                && pool.iter().filter(|&&s| content(s) == content(x)).count()
                                    > p as usize
                        })
                }
                PlanMeta::Check {
                    device,
                    content: asked,
                } => {
                    if self.sessions[x].device == *device {
                        return true;
                    }
                    // The requesting device takes one seat, whether its
                    // session has joined meanwhile or not (`check` is asked
                    // for devices holding no live session).
                    let others: Vec<usize> = pool
                        .iter()
                        .copied()
                        .filter(|&s| self.sessions[s].device != *device)
                        .collect();
                    let seat = others.len() + 1 > acct.limit as usize;
                    let room = match (acct.per_content, asked.as_deref()) {
                        (Some(p), Some(c)) => {
                            content(x) == Some(c)
                                && others.iter().filter(|&&s| content(s) == Some(c)).count() + 1
                                    > p as usize
                        }
                        _ => false,
                    };
                    seat || room
                }
            }
        };
        ended
            .iter()
            .copied()
            .filter(|s| live.contains(s) && !needed(*s))
            .collect()
    }

    /// Invariant 3 for the endings `ended` a write (of the ledger, or
    /// without it of a revocation) is landing now.
    fn check_needed(
        &mut self,
        a: usize,
        meta: &WriteMeta,
        named: &BTreeSet<SessionId>,
        ended: &[usize],
    ) {
        let dict: Vec<usize> = self.dicts[a]
            .values()
            .map(|rec| self.by_id[&rec.session])
            .collect();
        let extra = self.unneeded(a, &meta.plan, &dict, named, ended);
        if extra.is_empty() {
            return;
        }
        let names = |v: &[usize]| -> Vec<String> {
            v.iter().map(|&s| self.sessions[s].id.to_string()).collect()
        };
        let acct = &self.accounts[a];
        let what = format!(
            "replica {} ended {:?} of {} ({} {}{}, {:?}) when only {:?} were needed; \
             the store held {:?}, its view {:?}",
            meta.replica,
            names(ended),
            acct.id,
            acct.policy,
            acct.limit,
            acct.per_content
                .map_or(String::new(), |p| format!(", {p} per content")),
            meta.plan,
            names(
                &ended
                    .iter()
                    .copied()
                    .filter(|s| !extra.contains(s))
                    .collect::<Vec<_>>()
            ),
            names(&dict),
            names(&meta.seen),
        );
        // Explained by the writer's view alone: needed on what it held, and
        // it held sessions the store's dictionary no longer does (a leave,
        // or a revoked session's removal, its watch had not brought yet).
        let departed = meta.seen.iter().any(|s| !dict.contains(s));
        if departed
            && self
                .unneeded(a, &meta.plan, &meta.seen, named, ended)
                .is_empty()
        {
            self.race(Race::StaleView, || what);
        } else {
            fail(format!("one decision per seat broken: {what}"));
        }
    }

    // ---- requests, restarts, elections ------------------------------------

    fn act_kick(&mut self) {
        let r = self.rng.usize(0..self.replicas.len());
        let a = self.rng.usize(0..self.accounts.len());
        // Mostly a live session; now and then one that left or ended.
        let any = self.rng.u32(0..5) == 0;
        let of: Vec<usize> = (0..self.sessions.len())
            .filter(|&s| {
                self.sessions[s].account == a && (any || self.sessions[s].life == Life::Live)
            })
            .collect();
        let Some(&s) = of.get(self.rng.usize(0..of.len().max(1))) else {
            return;
        };
        let req = KickRequest {
            account: self.accounts[a].id.clone(),
            session: self.sessions[s].id.clone(),
        };
        self.stats.kicks += 1;
        self.log(|| format!("replica {r}: kick {}", req.session));
        let m = self.decide_new(r, a, Plan::Kick(req));
        self.spawn(
            r,
            Task::Request(RequestTask {
                account: a,
                kick: true,
                phase: ReqPhase::Decide(m),
                queue: VecDeque::new(),
                own: None,
                unrecorded: false,
            }),
        );
    }

    fn act_check(&mut self) {
        let r = self.rng.usize(0..self.replicas.len());
        let a = self.rng.usize(0..self.accounts.len());
        let newcomers: Vec<usize> = (0..self.devices.len())
            .filter(|&d| self.devices[d].account == a && self.devices[d].session.is_none())
            .collect();
        let Some(&d) = newcomers.get(self.rng.usize(0..newcomers.len().max(1))) else {
            return;
        };
        let live: Vec<usize> = (0..self.sessions.len())
            .filter(|&s| self.sessions[s].account == a && self.sessions[s].life == Life::Live)
            .collect();
        let evict = (self.rng.u32(0..6) == 0 && !live.is_empty()).then(|| {
            self.sessions[live[self.rng.usize(0..live.len())]]
                .id
                .clone()
        });
        let content = CONTENTS[self.rng.usize(0..CONTENTS.len())];
        let req = CheckRequest {
            account: self.accounts[a].id.clone(),
            device: self.devices[d].id.clone(),
            session: None,
            content: content.map(str::to_owned),
            evict,
        };
        self.stats.checks += 1;
        self.log(|| format!("replica {r}: check {} ({content:?})", req.device));
        let m = self.decide_new(r, a, Plan::Check(req));
        self.spawn(
            r,
            Task::Request(RequestTask {
                account: a,
                kick: false,
                phase: ReqPhase::Decide(m),
                queue: VecDeque::new(),
                own: None,
                unrecorded: false,
            }),
        );
    }

    fn act_wake(&mut self) {
        let due: Vec<usize> = self
            .tasks
            .iter()
            .filter(|(_, s)| s.wake_at.is_some_and(|t| t <= self.now))
            .map(|(id, _)| *id)
            .collect();
        if let Some(&id) = due.get(self.rng.usize(0..due.len().max(1))) {
            if let Some(slot) = self.tasks.get_mut(&id) {
                slot.wake_at = None;
            }
            self.drive(id, Input::Wake);
        }
    }

    /// Replica `r` restarts: what it had under way is dropped (writes it
    /// sent may still land), its view is rebuilt from the buckets, and
    /// every account is enforced.
    fn restart(&mut self, r: usize) {
        self.stats.restarts += 1;
        self.log(|| format!("replica {r} restarts"));
        self.tasks.retain(|_, s| s.replica != r);
        let view = self.fresh_view(r);
        let delivered = self.dicts.clone();
        let rep = &mut self.replicas[r];
        rep.epoch += 1;
        rep.view = view;
        rep.delivered = delivered;
        rep.sessions_watch.clear();
        rep.revoked_watch.clear();
        rep.heartbeats.clear();
        rep.schedule = Schedule::new(ACCOUNTS_AT_ONCE);
        rep.unsettled.clear();
        rep.wakes.clear();
        let mut loaded = rep.view.accounts();
        loaded.sort();
        for account in loaded {
            let a = self.account_ix(&account);
            self.enforce(r, a);
        }
    }

    fn act_rare(&mut self) {
        if self.rng.u32(0..4) == 0 {
            let r = self.rng.usize(0..self.replicas.len());
            self.restart(r);
        } else if self.net.elections && self.election_until.is_none_or(|t| t <= self.now) {
            let long = if self.rng.u32(0..5) == 0 {
                self.rng.u64(15_000..45_000)
            } else {
                self.rng.u64(500..8_000)
            };
            self.stats.elections += 1;
            self.log(|| format!("the revoked bucket elects a leader for {long} ms"));
            self.election_until = Some(self.now + long);
        }
    }

    // ---- the run -----------------------------------------------------------

    fn step(&mut self) {
        match self.rng.u32(0..100) {
            0..7 => self.act_join(),
            7..11 => self.act_leave(),
            11..13 => self.act_kick(),
            13..16 => self.act_check(),
            16..34 => self.act_serve(),
            34..52 => self.act_reply(),
            52..57 => self.act_wake(),
            57..70 => self.act_watch(false),
            70..79 => self.act_watch(true),
            79..82 => self.act_handler(),
            82 => self.act_rare(),
            83..96 => {
                let by = self.rng.u64(1..300);
                self.advance_time(by);
            }
            _ => {
                let by = self.rng.u64(300..2_000);
                self.advance_time(by);
            }
        }
    }

    /// Carries out everything under way on a reliable network, with no new
    /// input, until nothing is left to do.
    fn drain(&mut self) {
        self.settling = true;
        self.election_until = None;
        for _ in 0..1_000_000 {
            let mut busy = false;
            while !self.handler_queue.is_empty() {
                self.act_handler();
                busy = true;
            }
            for r in 0..self.replicas.len() {
                while !self.replicas[r].sessions_watch.is_empty() {
                    self.deliver_sessions(r);
                    busy = true;
                }
                while !self.replicas[r].revoked_watch.is_empty() {
                    self.deliver_revoked(r);
                    busy = true;
                }
            }
            while !self.ghosts.is_empty() {
                self.serve_ghost(0);
                busy = true;
            }
            while let Some(i) = self.ops.iter().position(|o| o.reply.is_none()) {
                self.serve(i);
                busy = true;
            }
            if !self.ops.is_empty() {
                self.reply(0);
                busy = true;
            }
            let due: Vec<usize> = self
                .tasks
                .iter()
                .filter(|(_, s)| s.wake_at.is_some_and(|t| t <= self.now))
                .map(|(id, _)| *id)
                .collect();
            for id in due {
                if let Some(slot) = self.tasks.get_mut(&id) {
                    slot.wake_at = None;
                }
                self.drive(id, Input::Wake);
                busy = true;
            }
            if busy {
                continue;
            }
            let next = self
                .tasks
                .values()
                .filter_map(|s| s.wake_at)
                .chain(self.replicas.iter().flat_map(|r| {
                    r.heartbeats
                        .iter()
                        .map(|h| h.0)
                        .chain(r.wakes.iter().map(|w| w.0))
                }))
                .min();
            match next {
                Some(t) => self.advance_time(t.saturating_sub(self.now)),
                None => {
                    self.settling = false;
                    return;
                }
            }
        }
        fail("the run does not settle".into());
    }

    /// No new input until everything is carried out and every live session
    /// has been heard again by every replica; then the settled invariants.
    fn settle(&mut self) {
        self.stats.settles += 1;
        self.log(|| "settling".into());
        self.drain();
        self.settling = true;
        self.advance_time(HEARTBEAT_MS + 200);
        self.drain();
        self.check_settled();
    }

    fn check_settled(&mut self) {
        if !self.ops.is_empty() || !self.tasks.is_empty() {
            fail("settled with work under way".into());
        }
        for (r, rep) in self.replicas.iter().enumerate() {
            if !rep.unsettled.is_empty() || !rep.wakes.is_empty() {
                fail(format!("replica {r} settled with endings left to retry"));
            }
        }
        // Invariant 1: every ending announced once.
        let keys: Vec<(SessionId, String)> = self
            .keys
            .iter()
            .map(|(s, k)| (s.clone(), k.decision.clone()))
            .collect();
        for (session, decision) in keys {
            match self.announced.get(&session) {
                Some((1, by)) if *by == decision => {}
                Some((n, by)) => fail(format!(
                    "the end of {session} was announced {n} times, by {by}, not by {decision} holding it"
                )),
                None => {
                    let (r, epoch) = self.deciders[&decision];
                    if self.replicas[r].epoch != epoch {
                        self.race(Race::StoppedUnsettled, || {
                            format!(
                                "{session} ended by replica {r} before it restarted, unannounced"
                            )
                        });
                        // Counted once.
                        self.announced.insert(session, (1, decision));
                    } else {
                        fail(format!("the end of {session} was never announced"));
                    }
                }
            }
        }
        // Invariant 4: kicked means told, by the kick.
        for (session, decision) in &self.kicked {
            if self.announced.get(session).map(|(_, by)| by) != Some(decision) {
                fail(format!(
                    "kick of {session} answered kicked: true, announced by another"
                ));
            }
        }
        // Invariant 2: every account within its limits.
        for (a, acct) in self.accounts.iter().enumerate() {
            let live: Vec<&SessionRecord> = self.dicts[a]
                .values()
                .filter(|rec| !self.keys.contains_key(&rec.session))
                .collect();
            if live.len() > acct.limit as usize {
                fail(format!(
                    "{} settled with {} live sessions on a limit of {} ({}): {:?}",
                    acct.id,
                    live.len(),
                    acct.limit,
                    acct.policy,
                    live.iter().map(|r| r.session.as_str()).collect::<Vec<_>>()
                ));
            }
            if let Some(p) = acct.per_content {
                for c in CONTENTS.iter().flatten() {
                    let n = live
                        .iter()
                        .filter(|rec| rec.labels.content() == Some(c))
                        .count();
                    if n > p as usize {
                        fail(format!(
                            "{} settled with {n} live sessions on {c}, {p} allowed",
                            acct.id
                        ));
                    }
                }
            }
        }
    }
}

/// One seed's run; panics, naming the step, on a broken invariant.
fn run(seed: u64, steps: usize) -> Stats {
    AT.with(|a| a.set((0, false)));
    let mut sim = Sim::new(seed);
    for step in 0..steps {
        AT.with(|a| a.set((step, false)));
        sim.step();
        if sim.rng.u32(0..300) == 0 {
            AT.with(|a| a.set((step, true)));
            sim.settle();
        }
    }
    AT.with(|a| a.set((steps, true)));
    sim.settle();
    sim.stats
}

/// A seed whose run broke an invariant.
struct Failure {
    seed: u64,
    step: usize,
    settling: bool,
    what: String,
}

fn run_caught(seed: u64, steps: usize) -> Result<Stats, Failure> {
    panic::catch_unwind(AssertUnwindSafe(|| run(seed, steps))).map_err(|e| {
        let (step, settling) = AT.with(Cell::get);
        let what = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "(no message)".into());
        Failure {
            seed,
            step,
            settling,
            what,
        }
    })
}

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
    )
}

#[test]
fn checkers_keep_their_promises_under_a_random_schedule() {
    let steps = env("SIM_STEPS").unwrap_or(DEFAULT_STEPS);
    let (first, count) = match env::<u64>("SIM_SEED") {
        Some(seed) => (seed, 1),
        None => (
            env("SIM_FIRST").unwrap_or(0),
            env("SIM_SEEDS").unwrap_or(DEFAULT_SEEDS),
        ),
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(count as usize)
        .max(1);
    let started = Instant::now();
    let quiet = count > 1;
    let hook = quiet.then(|| {
        let hook = panic::take_hook();
        panic::set_hook(Box::new(|_| {}));
        hook
    });
    let next = AtomicU64::new(first);
    let results: Vec<(Stats, Vec<Failure>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut stats = Stats::default();
                    let mut failures = Vec::new();
                    loop {
                        let seed = next.fetch_add(1, Ordering::Relaxed);
                        if seed >= first + count {
                            return (stats, failures);
                        }
                        match run_caught(seed, steps) {
                            Ok(s) => stats += s,
                            Err(f) => failures.push(f),
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a worker panicked outside a run"))
            .collect()
    });
    if let Some(hook) = hook {
        panic::set_hook(hook);
    }
    let mut total = Stats::default();
    let mut failures = Vec::new();
    for (stats, f) in results {
        total += stats;
        failures.extend(f);
    }
    failures.sort_by_key(|f| f.seed);
    let races: Vec<String> = Race::ALL
        .iter()
        .filter(|r| total.races[**r as usize] > 0)
        .map(|r| format!("{r:?} {}", total.races[*r as usize]))
        .collect();
    println!(
        "checkers: {count} seeds x {steps} steps, {threads} threads, {:.1?}: {} failed\n\
         {} joins, {} leaves, {} ledger writes landed ({} conflicts, {} unknown), \
         {} revocations, {} announced, {} kicks ({} kicked), {} checks, {} restarts, \
         {} elections, {} settles\n\
         tolerated races: {}",
        started.elapsed(),
        failures.len(),
        total.joins,
        total.leaves,
        total.ledger_writes,
        total.conflicts,
        total.unknown_writes,
        total.revocations,
        total.announced,
        total.kicks,
        total.kicked,
        total.checks,
        total.restarts,
        total.elections,
        total.settles,
        if races.is_empty() {
            "none".into()
        } else {
            races.join(", ")
        },
    );
    for f in failures.iter().take(200) {
        println!(
            "seed {}, step {}{}: {}",
            f.seed,
            f.step,
            if f.settling { " (settling)" } else { "" },
            f.what
        );
    }
    if let Some(f) = failures.first() {
        panic!(
            "{} of {count} seeds broke an invariant; the first, seed {}, at step {}{}: {}\n\
             replay: SIM_SEED={} SIM_STEPS={steps} cargo test -p checker --lib simulation -- --nocapture",
            failures.len(),
            f.seed,
            f.step,
            if f.settling { " (settling)" } else { "" },
            f.what,
            f.seed,
        );
    }
}
