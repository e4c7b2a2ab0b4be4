//! A deterministic, seeded simulation of the heartbeat handlers.
//!
//! Several handler instances, each its own [`Dicts`] on one
//! [`IntervalClock`], are driven by a random schedule against one model of
//! the sessions bucket, and the properties the handlers promise are checked
//! as they go and whenever the system has settled. The schedule comes from
//! one seed (`fastrand::Rng::with_seed`), so a failure replays from the seed
//! it prints.
//!
//! # What is modelled
//!
//! Each handler is stepped the way `lib.rs` steps it: a heartbeat goes
//! through the revoked-session check, the `unchanged` fast path and
//! `on_heartbeat`; a `Decision` makes its keys due at once or after the
//! carry delay; a flush takes the write (`take_for_write`), writes it with
//! compare-and-set and hands the outcome back (`on_written`; or, after a
//! conflict or a failure, a read and `on_conflict`, then a pause after a
//! failure); a trimmed copy is read whole (`on_reread`); the watches feed
//! `install` and `ended`; a one-second tick prunes; what a landed write
//! applied is announced as `announce` does, the `replaced` revocation of a
//! displaced session included (a create-only write whose winner announces
//! the leave).
//!
//! Each step does one of: a device heartbeats (a live session, sometimes
//! with new labels; a new session, on a free device or displacing the
//! device's session; a session heard again after its leave; a late
//! heartbeat of a displaced session), a session leaves, the checker ends a
//! session, a handler takes a due flush, a piece of I/O moves on by one
//! network leg, a watch message (or a lagging watch's backlog) reaches a
//! handler, or time passes (up to 300 ms, or up to 1.5 s). Every message
//! goes to exactly one handler, chosen at random (the worst case of a
//! partition held by several handlers while it changes hands), and
//! takes a millisecond of its own. What a handler does without waiting on
//! the network (a due flush, handing an answer to the dictionaries) is
//! done before time moves on; network legs take any number of steps, up to
//! the flusher's 5 s timeout. Intervals are 10 s with a 1 s carry delay
//! (the deployed proportion), so runs cross boundaries often.
//!
//! Some seeds (one in ten) add an account whose dictionary starts nearly
//! full (`DICT_MAX_SESSIONS` - 4 devices), beating every interval, that
//! new devices keep trying to join, so that the room limit is reached.
//!
//! # The model's assumptions (as NATS KV behaves)
//!
//! - One revision sequence for the whole bucket (the stream sequence).
//! - `update(key, value, expected)` lands only when the key's last
//!   revision is `expected`; 0 means no key. A key whose last write is
//!   older than the bucket's TTL (`dictionary_ttl`) is gone: it reads as
//!   revision 0 and nobody is told (max age leaves no marker).
//! - A write may be lost before it reaches the server (it did not land),
//!   or its acknowledgement may be lost after it landed, or the flusher
//!   may give up on it (its timeout) while the server still holds it, to
//!   land later or never: the handler sees a failure in all three.
//! - A read (`entry`) answers with the key's value and revision when it is
//!   served, which may be older than what the reader's watch brought by
//!   the time the answer arrives; it may fail, or time out.
//! - Each handler's watch delivers every write of the bucket, its own
//!   included, once and in revision order, after any delay. The revoked
//!   bucket's watch likewise; a revocation is a create-only write.
//! - Handlers share the model's clock (no skew), are never restarted, and
//!   never rate-limit (no flood is simulated).
//! - While a run settles, the network is reliable: no loss, no failure.
//!
//! # Invariants
//!
//! Checked at every step where they apply:
//!
//! - No write lands without the expected revision (the model refuses a
//!   stale one), and a handler only ever expects a revision its key has
//!   held, or 0.
//! - No dictionary value holds more than `DICT_MAX_SESSIONS` devices.
//! - A session's leaves (a removal, a withdrawal, a `replaced` revocation,
//!   the checker's ending) never outnumber its endings.
//!
//! Checked after settling (no new input; every write, read, watch message
//! and due flush carried out, time advanced past pauses and carry delays),
//! a few times along a run and at its end:
//!
//! - Nothing lost: every live session heard in a live interval (current or
//!   previous, by the model's clock) is what readers see for its device
//!   (the current interval's entry over the previous one's), with its
//!   latest labels; but for a session refused for want of room. A session
//!   heard again after its leave may have been removed by that leave when
//!   the two went to different handlers (neither can order them): it is
//!   checked after its next heartbeat, a heartbeat period later.
//! - Every leave honoured: a session that left (and was not heard again)
//!   or was ended is in no live dictionary.
//! - Each leave announced once; by nobody when the write that took the
//!   session out landed with its acknowledgement lost (as documented), or
//!   when nothing recorded the session in this presence (it had timed out,
//!   or was refused, or its first write never landed).
//! - Joins announced at most once per presence: in the order of the
//!   revisions whose writes carried them (announcements from two handlers
//!   may be made in the other order), no two joins of a session without a
//!   leave or an unannounced end between (an unacknowledged write that
//!   took it out, or a silence longer than the live window: a timeout).
//! - Nothing left pending: no handler holds a change with no flush due.
//!
//! Races no handler can tell from what it sees break some of these; each
//! is recognised precisely ([`Known`]), counted once per session and
//! printed, and `SIM_STRICT=1` makes them failures like any other.
//!
//! # Running it
//!
//! `cargo test -p heartbeat-handler --test simulation` runs the bounded
//! cases: 200 seeds of 2000 steps, on as many threads as there are cores.
//! Environment variables:
//!
//! - `SIM_SEED=<seed>`: that seed only (what a failure prints to replay).
//! - `SIM_SEEDS=<n>`, `SIM_FIRST=<seed>`, `SIM_STEPS=<n>`: how many seeds,
//!   from which, and steps per seed.
//! - `SIM_TRACE=1`: print every step (with `SIM_SEED`).
//! - `SIM_STRICT=1`: fail on the known races too.
//!
//! `deploy/dev simulate [seeds] [steps]` runs a long one in a release
//! build (default 5000 seeds). Every failing seed is listed, with the
//! replay line of the first.
//!
//! A replay is exact: the handler's maps whose iteration order decides
//! anything use a fixed-key hasher (`dicts::FixedMap`), not std's
//! per-process seeds, and the simulation's own maps decide nothing.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::panic::{self, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use headcount_protocol::policy::DICT_MAX_SESSIONS;
use headcount_protocol::wire::{HeartbeatRef, SessionDict, SessionRecord};
use headcount_protocol::{AccountId, DeviceId, IntervalClock, SessionId, UnixMillis};
use heartbeat_handler::dicts::{Applied, Decision, Dicts, LEAVE_REORDER_MS, Take, Write};

/// Short intervals, so that a run crosses several boundaries.
const INTERVAL_MS: u64 = 10_000;
/// The handler's carry delay, in the deployed proportion (a tenth of the
/// interval).
const CARRY_MS: u64 = 1_000;
/// The flusher's pause after a write or a read that failed (`lib.rs`).
const RETRY_MS: u64 = 200;
/// How long the flusher waits for a write's answer (`write_dict`).
const WRITE_TIMEOUT_MS: u64 = 5_000;
/// The prune tick (`lib.rs`).
const TICK_MS: u64 = 1_000;
/// A device's heartbeat period (the browser client's).
const HEARTBEAT_MS: u64 = 5_000;
const ACCOUNTS: [&str; 3] = ["acme", "globex", "initech"];
const DEVICES_PER_ACCOUNT: usize = 6;
const CONTENTS: [Option<&str>; 4] = [None, Some("film"), Some("news"), Some("sport")];
/// Devices of the nearly full account at the start.
const CROWD_START: usize = DICT_MAX_SESSIONS - 4;
const DEFAULT_SEEDS: u64 = 200;
const DEFAULT_STEPS: usize = 2_000;

type Key = (AccountId, u64);

/// A key's value as stored.
struct Stored {
    revision: u64,
    value: Rc<SessionDict>,
    written_at: UnixMillis,
}

/// The sessions bucket.
#[derive(Default)]
struct Bucket {
    /// The bucket's revision sequence.
    seq: u64,
    keys: BTreeMap<Key, Stored>,
    /// Every revision each key has held.
    held: HashMap<Key, HashSet<u64>>,
}

impl Bucket {
    fn revision(&self, key: &Key) -> u64 {
        self.keys.get(key).map_or(0, |s| s.revision)
    }

    /// The value and revision (0 and empty when there is no key).
    fn read(&self, key: &Key) -> (u64, SessionDict) {
        self.keys.get(key).map_or((0, SessionDict::new()), |s| {
            (s.revision, (*s.value).clone())
        })
    }

    fn get(&self, key: &Key) -> Option<&SessionDict> {
        self.keys.get(key).map(|s| &*s.value)
    }

    /// Compare-and-set: the new revision and the value replaced, or None
    /// when the key is not at `expected`.
    fn update(
        &mut self,
        key: &Key,
        expected: u64,
        value: SessionDict,
        now: UnixMillis,
    ) -> Option<(u64, Rc<SessionDict>, Option<Rc<SessionDict>>)> {
        if self.revision(key) != expected {
            return None;
        }
        self.seq += 1;
        let value = Rc::new(value);
        let old = self.keys.insert(
            key.clone(),
            Stored {
                revision: self.seq,
                value: value.clone(),
                written_at: now,
            },
        );
        self.held.entry(key.clone()).or_default().insert(self.seq);
        Some((self.seq, value, old.map(|s| s.value)))
    }

    /// Drops the keys whose last write is older than `ttl`.
    fn expire(&mut self, now: UnixMillis, ttl: u64) {
        self.keys
            .retain(|_, s| now.saturating_sub(s.written_at) <= ttl);
    }
}

/// How a write's answer reached the handler (`lib.rs`'s `Outcome`).
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Written(u64),
    Conflict,
    Failed,
}

/// One handler's I/O under way, one step at a time.
enum Phase {
    /// The write is on its way to the server, sent at that time.
    Sent(Write, UnixMillis),
    /// The server's answer is on its way back; what the write replaced
    /// and what it stored when it landed.
    Answer(Write, UnixMillis, Outcome, Option<Landed>),
    /// The key is being read after a conflict or a failure, since then.
    Read(Write, Outcome, UnixMillis),
    /// The read answered; `on_conflict` next.
    Reapply(Write, Outcome, Option<(u64, SessionDict)>),
    /// A trimmed copy is being read whole, since then.
    Reread(UnixMillis),
    /// That read answered; `on_reread` next.
    Reinstall(Option<(u64, SessionDict)>),
}

struct Op {
    handler: usize,
    key: Key,
    /// Not before (a retry pause).
    ready_at: UnixMillis,
    phase: Phase,
}

/// A landed write: the value it replaced (None: no key) and the one it
/// stored.
type Landed = (u64, Option<Rc<SessionDict>>, Rc<SessionDict>);

/// A write whose client gave up while the server still held it.
struct Ghost {
    key: Key,
    expected: u64,
    value: SessionDict,
}

struct Handler {
    dicts: Dicts,
    /// The flusher's queue: keys and when they are due.
    due: Vec<(UnixMillis, Key)>,
    /// The sessions watch: key, revision, value.
    watch: VecDeque<(Key, u64, Rc<SessionDict>)>,
    /// The revoked watch: account, device, session, when.
    revoked_watch: VecDeque<(AccountId, DeviceId, SessionId, UnixMillis)>,
    /// The sessions this handler knows are ended.
    revoked: HashSet<SessionId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Live,
    Left,
    /// Ended by the checker.
    Ended,
    /// The device started a newer session.
    Superseded,
}

struct Device {
    id: DeviceId,
    account: usize,
    /// The device's newest session.
    current: Option<usize>,
}

/// What the announcements say of a session, in the order of the
/// revisions whose writes they came with: announcements from different
/// handlers may be made in another order than their writes landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    /// Its join, written into this interval.
    Join(u64),
    Leave,
    /// Out of sight without an announcement: an unacknowledged write took
    /// it out, or it was silent for longer than the live window (readers
    /// timed it out).
    Gone,
    /// A write that landed put an older session of its device in its
    /// entry (OlderSessionLast): that write's writer announces its end,
    /// unless another ending took the revocation first or the
    /// acknowledgement was lost, and a later write of it joins it again.
    Overtaken,
}

/// What the devices did, and what was announced about each session.
struct Session {
    id: SessionId,
    account: usize,
    device: usize,
    content: Option<&'static str>,
    state: State,
    /// The last heartbeat (not a leave) sent while live.
    last_heard: Option<UnixMillis>,
    /// Its last heartbeat was refused for want of room.
    refused: bool,
    /// Heard again after a leave; within `LEAVE_REORDER_MS` of it.
    returned: bool,
    returned_quickly: bool,
    /// Its revocation key exists.
    revoked: bool,
    /// The labels of its last heartbeat before this one.
    last_sent: Option<Option<&'static str>>,
    /// The handlers (a bit each) where a late heartbeat of an older
    /// session of its device queued a change since its own last queued
    /// one there (OlderSessionLast): that handler holds a write taking its
    /// entry.
    interfered: u8,
    /// An older session of its device took its entry (OlderSessionLast):
    /// its heartbeats, its leave included, are taken as a displaced one's.
    overtaken: bool,
    /// A heartbeat that changed its labels was taken for no change (its
    /// handler did not see the one before yet), and none since queued a
    /// write.
    swallowed: bool,
    /// Leaves sent, displacements and endings while live: how many leaves
    /// may be announced.
    endings: u32,
    joins: u32,
    leaves: u32,
    /// The known gaps counted for it, a bit per [`Known`].
    known: u8,
    /// Its announcements, by revision; how many were checked.
    timeline: Vec<(u64, Mark)>,
    checked: usize,
    /// Leaves announced as removals or withdrawals, and as `replaced`;
    /// leaves a known gap accounts for.
    removed: u32,
    replaced: u32,
    gap_leaves: u32,
    /// It had left when its device started a newer session.
    left_then_displaced: bool,
    /// When it left or was ended.
    ended_at: Option<UnixMillis>,
    /// An unacknowledged write took it out of a dictionary since its last
    /// join: nobody announced that.
    unacked_gone: bool,
    /// In its current presence, some landed value held it (first at that
    /// time), and its join was announced.
    ever_stored: bool,
    first_stored: Option<UnixMillis>,
    presence_joined: bool,
    /// When it left, no live interval held it any more (it had timed out)
    /// or it had been refused.
    left_unrecorded: bool,
    /// When it left, heard within the live window, no live dictionary
    /// in the store held it (no write carrying it there had landed).
    left_unseen: bool,
    /// A live dictionary in the store held it after it left.
    seen_after_leave: bool,
    /// The dictionary before the live ones when it left, and whether the
    /// store held it there then.
    older_at_leave: Option<(Key, bool)>,
    /// A write of that dictionary landed after the leave.
    older_written: bool,
}

/// Loss rates, in percent.
#[derive(Debug, Clone, Copy)]
struct Net {
    lost_request: u32,
    lost_ack: u32,
    ghost: u32,
    failed_read: u32,
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    heartbeats: u64,
    writes: u64,
    conflicts: u64,
    failed: u64,
    unacked: u64,
    ghosts_landed: u64,
    joins: u64,
    leaves: u64,
    refused: u64,
    settles: u64,
    /// The most devices one landed value held.
    fullest: usize,
    /// Sessions a known gap showed up for, by [`Known`].
    known: [u64; 8],
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Self) {
        self.heartbeats += o.heartbeats;
        self.writes += o.writes;
        self.conflicts += o.conflicts;
        self.failed += o.failed;
        self.unacked += o.unacked;
        self.ghosts_landed += o.ghosts_landed;
        self.joins += o.joins;
        self.leaves += o.leaves;
        self.refused += o.refused;
        self.settles += o.settles;
        self.fullest = self.fullest.max(o.fullest);
        for (a, b) in self.known.iter_mut().zip(o.known) {
            *a += b;
        }
    }
}

/// Known gaps: ways the handlers break an invariant that they cannot tell
/// from what they see, races between them mostly (ARCHITECTURE.md, "The
/// simulation"). Each is recognised precisely, counted once per session
/// and printed; `SIM_STRICT=1` fails on them like on any other violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// A session's join is announced twice, by writes into two intervals:
    /// the handler writing the later one did not see it in the earlier one
    /// yet (its watch lagged, or that write was still under way), and the
    /// earlier one's writer had taken its write before the later one
    /// landed.
    JoinInTwoIntervals,
    /// A session that left is also announced as `replaced`: its device's
    /// next session was written by a handler whose copy still held it.
    LeaveAndReplaced,
    /// A write of a device's older session lands after its newer one's
    /// and displaces it (and revokes it as `replaced`): the handler
    /// queued it before the newer session existed, and nothing orders two
    /// sessions of one device.
    OlderSessionLast,
    /// A heartbeat whose labels went back to what a handler's lagging copy
    /// still shows is no change there: the write of the change between
    /// lands, and stays until the session's next heartbeat.
    LaggingCopy,
    /// A write of a session's heartbeat, taken before the session's leave
    /// (or ending) landed, is retried after that removal landed: the
    /// session is recorded again and its join announced again, and the
    /// handler of the leave removes it again, quietly.
    WriteAfterLeave,
    /// A session heard again within `LEAVE_REORDER_MS` of its leave, on
    /// another handler, is taken there for a heartbeat sent before the
    /// leave: the leave removes it again, quietly (it was announced), and
    /// its next heartbeat records it again, with a second join.
    QuickReturn,
    /// The store took no write of a leave's interval until that interval
    /// was no longer read: the removal is given up with the dictionary,
    /// and nobody announces the leave (readers time the session out).
    LeaveOutlived,
    /// The store took none of the writes carrying a session into the live
    /// intervals: when it left, no live dictionary in the store held it
    /// (readers no longer saw it), and none did afterwards; and the
    /// dictionary before the live ones either did not hold it either (its
    /// last record is older still) or expired (its TTL ran out) before the
    /// store took a write of it after the leave. No dictionary any handler
    /// can write holds the session, so nobody announces the leave.
    LeaveUnseen,
}

impl Known {
    const ALL: [Known; 8] = [
        Known::JoinInTwoIntervals,
        Known::LeaveAndReplaced,
        Known::OlderSessionLast,
        Known::LaggingCopy,
        Known::WriteAfterLeave,
        Known::QuickReturn,
        Known::LeaveOutlived,
        Known::LeaveUnseen,
    ];
}

thread_local! {
    /// Where the current run is, for the failure message of any panic.
    static AT: Cell<(usize, bool)> = const { Cell::new((0, false)) };
}

struct Sim {
    rng: fastrand::Rng,
    now: UnixMillis,
    clock: IntervalClock,
    trace: bool,
    /// Known gaps fail too.
    strict: bool,
    net: Net,
    settling: bool,
    kv: Bucket,
    /// The revoked bucket's keys (create-only).
    revocations: HashSet<SessionId>,
    handlers: Vec<Handler>,
    ops: Vec<Op>,
    ghosts: Vec<Ghost>,
    accounts: Vec<AccountId>,
    account_ix: HashMap<AccountId, usize>,
    crowd: Option<usize>,
    crowd_beat_at: Option<UnixMillis>,
    devices: Vec<Device>,
    sessions: Vec<Session>,
    by_id: HashMap<SessionId, usize>,
    /// Per account, the sessions in each state (for picking).
    live: Vec<Vec<usize>>,
    left: Vec<Vec<usize>>,
    superseded: Vec<Vec<usize>>,
    /// Per account, new sessions refused when a write was taken (the write
    /// tells how many, not which).
    take_refusals: Vec<u64>,
    /// Sessions that left, by the dictionary before the live ones then,
    /// until a write of it lands.
    left_by_older: HashMap<Key, Vec<usize>>,
    next_session: u64,
    stats: Stats,
}

fn fail(msg: String) -> ! {
    panic!("{msg}")
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let clock = IntervalClock::new(Duration::from_millis(INTERVAL_MS));
        // Somewhere inside an interval, so that boundaries fall anywhere.
        let now = 1_700_000_000_000 + rng.u64(0..INTERVAL_MS);
        let handlers = (0..rng.usize(2..=4))
            .map(|_| Handler {
                dicts: Dicts::new(clock),
                due: Vec::new(),
                watch: VecDeque::new(),
                revoked_watch: VecDeque::new(),
                revoked: HashSet::new(),
            })
            .collect();
        // Some seeds lose nothing, the others each their own rates.
        let net = if rng.u32(0..4) == 0 {
            Net {
                lost_request: 0,
                lost_ack: 0,
                ghost: 0,
                failed_read: 0,
            }
        } else {
            Net {
                lost_request: rng.u32(0..6),
                lost_ack: rng.u32(0..8),
                ghost: rng.u32(0..6),
                failed_read: rng.u32(0..10),
            }
        };
        let crowded = seed % 10 == 3;
        let mut names: Vec<&str> = ACCOUNTS.to_vec();
        if crowded {
            names.push("crowd");
        }
        let accounts: Vec<AccountId> = names
            .iter()
            .map(|a| AccountId::parse(a).expect("account name"))
            .collect();
        let n = accounts.len();
        let mut sim = Sim {
            rng,
            now,
            clock,
            trace: std::env::var_os("SIM_TRACE").is_some(),
            strict: std::env::var_os("SIM_STRICT").is_some(),
            net,
            settling: false,
            kv: Bucket::default(),
            revocations: HashSet::new(),
            handlers,
            ops: Vec::new(),
            ghosts: Vec::new(),
            account_ix: accounts
                .iter()
                .enumerate()
                .map(|(i, a)| (a.clone(), i))
                .collect(),
            accounts,
            crowd: crowded.then_some(n - 1),
            crowd_beat_at: None,
            devices: Vec::new(),
            sessions: Vec::new(),
            by_id: HashMap::new(),
            live: vec![Vec::new(); n],
            left: vec![Vec::new(); n],
            superseded: vec![Vec::new(); n],
            take_refusals: vec![0; n],
            left_by_older: HashMap::new(),
            next_session: 0,
            stats: Stats::default(),
        };
        for a in 0..ACCOUNTS.len() {
            for d in 0..DEVICES_PER_ACCOUNT {
                sim.add_device(a, &format!("d{d}"));
            }
        }
        if let Some(c) = sim.crowd {
            sim.fill_crowd(c);
        }
        sim
    }

    fn add_device(&mut self, account: usize, name: &str) -> usize {
        self.devices.push(Device {
            id: DeviceId::parse(name).expect("device name"),
            account,
            current: None,
        });
        self.devices.len() - 1
    }

    fn new_session(&mut self, device: usize, content: Option<&'static str>) -> usize {
        self.next_session += 1;
        let id = SessionId::parse(&format!("s{}", self.next_session)).expect("session id");
        let account = self.devices[device].account;
        self.sessions.push(Session {
            id: id.clone(),
            account,
            device,
            content,
            state: State::Live,
            last_heard: None,
            refused: false,
            returned: false,
            returned_quickly: false,
            revoked: false,
            last_sent: None,
            interfered: 0,
            overtaken: false,
            swallowed: false,
            endings: 0,
            joins: 0,
            leaves: 0,
            known: 0,
            timeline: Vec::new(),
            checked: 0,
            removed: 0,
            replaced: 0,
            gap_leaves: 0,
            left_then_displaced: false,
            ended_at: None,
            unacked_gone: false,
            ever_stored: false,
            first_stored: None,
            presence_joined: false,
            left_unrecorded: false,
            left_unseen: false,
            seen_after_leave: false,
            older_at_leave: None,
            older_written: false,
        });
        let s = self.sessions.len() - 1;
        self.by_id.insert(id, s);
        self.devices[device].current = Some(s);
        self.live[account].push(s);
        s
    }

    /// The nearly full account: its dictionary as an earlier handler wrote
    /// it, replayed by every handler's watch before it takes heartbeats.
    fn fill_crowd(&mut self, account: usize) {
        let interval = self.clock.interval_of(self.now);
        let mut dict = SessionDict::new();
        for i in 0..CROWD_START {
            let d = self.add_device(account, &format!("c{i}"));
            let s = self.new_session(d, None);
            let sess = &mut self.sessions[s];
            sess.last_heard = Some(self.now);
            // Its join was announced before the run.
            sess.timeline.push((0, Mark::Join(interval)));
            sess.joins = 1;
            dict.insert(
                self.devices[d].id.clone(),
                SessionRecord {
                    session: sess.id.clone(),
                    since: self.now,
                    last_seen: self.now,
                    labels: Default::default(),
                    replaced: None,
                },
            );
        }
        let key = (self.accounts[account].clone(), interval);
        self.commit(&key, 0, dict, true);
        for h in 0..self.handlers.len() {
            while !self.handlers[h].watch.is_empty() {
                self.deliver_watch(h);
            }
        }
        self.crowd_beat_at = Some(self.now + self.rng.u64(0..3_000));
    }

    fn chance(&mut self, percent: u32) -> bool {
        !self.settling && percent > 0 && self.rng.u32(0..100) < percent
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            let (step, settling) = AT.with(Cell::get);
            let phase = if settling { " settle" } else { "" };
            eprintln!("[{step}{phase} t={}] {}", self.now % 1_000_000, what());
        }
    }

    // ---- the devices -------------------------------------------------

    fn pick(&mut self, list: &[usize]) -> Option<usize> {
        (!list.is_empty()).then(|| list[self.rng.usize(..list.len())])
    }

    fn random_account(&mut self) -> usize {
        self.rng.usize(..self.accounts.len())
    }

    fn set_state(&mut self, s: usize, state: State) {
        let a = self.sessions[s].account;
        let old = self.sessions[s].state;
        for (st, list) in [
            (State::Live, &mut self.live[a]),
            (State::Left, &mut self.left[a]),
            (State::Superseded, &mut self.superseded[a]),
        ] {
            if st == old
                && let Some(p) = list.iter().position(|x| *x == s)
            {
                list.swap_remove(p);
            }
            if st == state {
                list.push(s);
            }
        }
        self.sessions[s].state = state;
    }

    /// A live session heartbeats, on one handler.
    fn beat(&mut self, s: usize) {
        self.advance_time(1);
        let interval = self.clock.interval_of(self.now);
        let sess = &mut self.sessions[s];
        // Silent for longer than the live window: no dictionary holds it
        // any more and readers timed it out, so this is a new presence.
        if sess
            .last_heard
            .is_some_and(|t| self.clock.interval_of(t) + 1 < interval)
        {
            sess.timeline.push((self.kv.seq, Mark::Gone));
            sess.ever_stored = false;
            sess.first_stored = None;
            sess.presence_joined = false;
        }
        sess.last_heard = Some(self.now);
        self.route(s, false);
    }

    /// A leave, or a heartbeat of a displaced session.
    fn send(&mut self, s: usize, leave: bool) {
        self.advance_time(1);
        self.route(s, leave);
    }

    /// A message reaches one handler of the queue group. Each takes a
    /// millisecond of its own: two messages of one device do not arrive
    /// at the same time, and the handlers order a session's heartbeats by
    /// when they heard them.
    fn route(&mut self, s: usize, leave: bool) {
        let h = self.rng.usize(..self.handlers.len());
        self.handle(h, s, leave);
    }

    /// `lib.rs`'s `on_message` for a valid heartbeat.
    fn handle(&mut self, h: usize, s: usize, leave: bool) {
        self.stats.heartbeats += 1;
        let now = self.now;
        let sess = &self.sessions[s];
        let (account, device) = (&self.accounts[sess.account], &self.devices[sess.device].id);
        let hd = &mut self.handlers[h];
        if hd.revoked.contains(&sess.id) {
            self.log(|| format!("h{h} drops {} (revoked)", self.sessions[s].id));
            return;
        }
        let hb = HeartbeatRef {
            content: sess.content,
            leave,
            ..Default::default()
        };
        let decision = if hd.dicts.unchanged(
            account.as_str(),
            device.as_str(),
            sess.id.as_str(),
            &hb,
            now,
        ) {
            Decision::Unchanged
        } else {
            hd.dicts
                .on_heartbeat(account, device, &sess.id, &hb.to_owned(), now)
        };
        let sess = &mut self.sessions[s];
        if !leave && sess.state == State::Live {
            // Until a heartbeat's write is queued (which lands after what
            // the lagging view had not seen, and wins).
            let changed = sess.last_sent.is_some_and(|c| c != sess.content);
            // Only a queued change ends the interference: a heartbeat
            // taken for a displaced one's (`Superseded`) queues nothing.
            if matches!(decision, Decision::Queued(_) | Decision::Deferred(_)) {
                sess.interfered &= !(1 << h);
            }
            if decision != Decision::Unchanged {
                sess.swallowed = false;
            } else if changed {
                sess.swallowed = true;
            }
            sess.last_sent = Some(sess.content);
        }
        self.log(|| {
            let sess = &self.sessions[s];
            format!(
                "h{h} {} {account}/{device}/{} {:?}: {decision:?}",
                if leave { "leave" } else { "beat" },
                sess.id,
                sess.content
            )
        });
        if decision == Decision::Unchanged {
            return;
        }
        if self.sessions[s].state == State::Superseded
            && matches!(decision, Decision::Queued(_) | Decision::Deferred(_))
            && let Some(newer) = self.devices[self.sessions[s].device].current
        {
            self.sessions[newer].interfered |= 1 << h;
        }
        if !leave && self.sessions[s].state == State::Live {
            self.sessions[s].refused = decision == Decision::Full;
            if decision == Decision::Full {
                self.stats.refused += 1;
            }
        }
        self.schedule(h, decision);
    }

    /// `lib.rs`'s `schedule`.
    fn schedule(&mut self, h: usize, decision: Decision) {
        let (keys, at) = match decision {
            Decision::Queued(keys) => (keys, self.now),
            Decision::Deferred(keys) => (keys, self.now + CARRY_MS),
            Decision::Unchanged | Decision::Superseded | Decision::Full => return,
        };
        for key in keys {
            self.handlers[h].due.push((at, key));
        }
    }

    fn act_beat(&mut self, relabel: bool) {
        let a = self.random_account();
        let Some(s) = self.pick(&self.live[a].clone()) else {
            return;
        };
        if relabel {
            let old = self.sessions[s].content;
            let new = loop {
                let c = CONTENTS[self.rng.usize(..CONTENTS.len())];
                if c != old {
                    break c;
                }
            };
            self.sessions[s].content = new;
        }
        self.beat(s);
    }

    /// A new session on a device with none live (or a new device of the
    /// crowded account), or one displacing the device's live session.
    fn act_join(&mut self, displace: bool) {
        let a = self.random_account();
        let device = if displace {
            self.pick(&self.live[a].clone())
                .map(|s| self.sessions[s].device)
        } else if Some(a) == self.crowd {
            let n = self.devices.len();
            Some(self.add_device(a, &format!("n{n}")))
        } else {
            let free: Vec<usize> = (0..self.devices.len())
                .filter(|d| {
                    self.devices[*d].account == a
                        && self.devices[*d]
                            .current
                            .is_none_or(|s| self.sessions[s].state != State::Live)
                })
                .collect();
            self.pick(&free)
        };
        let Some(d) = device else {
            return;
        };
        if let Some(old) = self.devices[d].current {
            match self.sessions[old].state {
                State::Live => {
                    self.sessions[old].endings += 1;
                    self.set_state(old, State::Superseded);
                }
                State::Left => self.sessions[old].left_then_displaced = true,
                State::Ended | State::Superseded => {}
            }
        }
        let content = CONTENTS[self.rng.usize(..CONTENTS.len())];
        let s = self.new_session(d, content);
        self.beat(s);
    }

    fn act_leave(&mut self) {
        let a = self.random_account();
        let Some(s) = self.pick(&self.live[a].clone()) else {
            return;
        };
        let [prev, cur] = self.clock.live_intervals(self.now);
        let now = self.now + 1;
        let held = |i: u64, sess: &Session| {
            self.kv
                .get(&(self.accounts[a].clone(), i))
                .and_then(|d| d.get(&self.devices[sess.device].id))
                .is_some_and(|r| r.session == sess.id)
        };
        let unseen = !held(prev, &self.sessions[s]) && !held(cur, &self.sessions[s]);
        let older = prev.wrapping_sub(1);
        let older_held = held(older, &self.sessions[s]);
        let sess = &mut self.sessions[s];
        sess.endings += 1;
        // The leave's arrival (`send` takes its millisecond).
        sess.ended_at = Some(now);
        sess.left_unrecorded = sess.refused
            || sess
                .last_heard
                .is_none_or(|t| self.clock.interval_of(t) < prev);
        sess.left_unseen = unseen && !sess.left_unrecorded;
        sess.seen_after_leave = false;
        let older = (self.accounts[a].clone(), older);
        sess.older_at_leave = Some((older.clone(), older_held));
        sess.older_written = false;
        self.left_by_older.entry(older).or_default().push(s);
        self.set_state(s, State::Left);
        self.send(s, true);
    }

    /// A session heard again after its leave (a page restored from the
    /// browser's cache).
    fn act_return(&mut self) {
        let a = self.random_account();
        let candidates: Vec<usize> = self.left[a]
            .iter()
            .copied()
            .filter(|s| {
                let sess = &self.sessions[*s];
                !sess.revoked && self.devices[sess.device].current == Some(*s)
            })
            .collect();
        let Some(s) = self.pick(&candidates) else {
            return;
        };
        let sess = &mut self.sessions[s];
        sess.returned = true;
        // `beat` takes its millisecond.
        sess.returned_quickly |= sess
            .ended_at
            .is_some_and(|t| self.now < t + LEAVE_REORDER_MS);
        self.set_state(s, State::Live);
        self.beat(s);
    }

    /// A heartbeat of a displaced session, still in flight.
    fn act_late(&mut self) {
        let a = self.random_account();
        let Some(s) = self.pick(&self.superseded[a].clone()) else {
            return;
        };
        self.send(s, false);
    }

    /// The checker ends a live session: a create-only revocation whose
    /// winner announces it.
    fn act_evict(&mut self) {
        let a = self.random_account();
        let Some(s) = self.pick(&self.live[a].clone()) else {
            return;
        };
        let (id, device) = (
            self.sessions[s].id.clone(),
            self.devices[self.sessions[s].device].id.clone(),
        );
        self.sessions[s].endings += 1;
        self.sessions[s].ended_at = Some(self.now);
        self.set_state(s, State::Ended);
        if self.revoke_once(&self.accounts[a].clone(), &device, &id) {
            self.leave_event(&id, "evicted", self.kv.seq);
        }
    }

    /// Creates the revocation key of `session`: whether this create won.
    fn revoke_once(&mut self, account: &AccountId, device: &DeviceId, session: &SessionId) -> bool {
        if !self.revocations.insert(session.clone()) {
            return false;
        }
        for h in &mut self.handlers {
            h.revoked_watch
                .push_back((account.clone(), device.clone(), session.clone(), self.now));
        }
        if let Some(&s) = self.by_id.get(session) {
            self.sessions[s].revoked = true;
        }
        true
    }

    /// The crowded account's devices all beat once (each interval).
    fn crowd_beat(&mut self) {
        let Some(c) = self.crowd else {
            return;
        };
        self.log(|| "the crowd beats".into());
        for s in self.live[c].clone() {
            self.beat(s);
        }
    }

    // ---- the handlers' I/O --------------------------------------------

    /// `lib.rs`'s `flush`, up to the write leaving.
    fn act_flush(&mut self) {
        let due: Vec<(usize, usize)> = self
            .handlers
            .iter()
            .enumerate()
            .flat_map(|(h, hd)| {
                hd.due
                    .iter()
                    .enumerate()
                    .filter(|(_, (at, _))| *at <= self.now)
                    .map(move |(i, _)| (h, i))
            })
            .collect();
        let Some(&(h, i)) = due.get(self.rng.usize(..due.len().max(1))) else {
            return;
        };
        let (_, key) = self.handlers[h].due.remove(i);
        self.flush(h, key);
    }

    fn flush(&mut self, h: usize, key: Key) {
        let take = self.handlers[h]
            .dicts
            .take_for_write(&key.0, key.1, self.now);
        self.log(|| match &take {
            Take::Write(w) => format!(
                "h{h} takes {}.{} at rev {}: {}",
                key.0,
                key.1,
                w.revision(),
                if w.value().len() > 8 {
                    format!("{} entries", w.value().len())
                } else {
                    let mut v: Vec<String> = w
                        .value()
                        .iter()
                        .map(|(d, r)| format!("{d}={}", r.session))
                        .collect();
                    v.sort();
                    v.join(" ")
                }
            ),
            other => format!("h{h} takes {}.{}: {other:?}", key.0, key.1),
        });
        let account = self.account_ix[&key.0];
        match take {
            Take::Idle => {}
            Take::Unchanged {
                applied,
                refused,
                more,
            } => {
                self.take_refusals[account] += refused as u64;
                if more {
                    self.handlers[h].due.push((self.now, key.clone()));
                }
                // Announced with no write: in the order of what landed so far.
                self.announce(h, &key, applied, self.kv.seq);
            }
            Take::Reread => self.ops.push(Op {
                handler: h,
                key,
                ready_at: self.now,
                phase: Phase::Reread(self.now),
            }),
            Take::Write(w) => {
                let expected = w.revision();
                if expected != 0
                    && !self
                        .kv
                        .held
                        .get(&key)
                        .is_some_and(|r| r.contains(&expected))
                {
                    fail(format!(
                        "h{h} expects revision {expected} of {}.{}, which it never held",
                        key.0, key.1
                    ));
                }
                if w.value().len() > DICT_MAX_SESSIONS {
                    fail(format!(
                        "h{h} takes a write of {} devices for {}.{}",
                        w.value().len(),
                        key.0,
                        key.1
                    ));
                }
                self.take_refusals[account] += w.refused() as u64;
                self.stats.refused += w.refused() as u64;
                self.ops.push(Op {
                    handler: h,
                    key,
                    ready_at: self.now,
                    phase: Phase::Sent(w, self.now),
                });
            }
        }
    }

    /// A write lands: checks and watch messages.
    fn commit(
        &mut self,
        key: &Key,
        expected: u64,
        value: SessionDict,
        acknowledged: bool,
    ) -> Option<(u64, Landed)> {
        let Some((revision, value, old)) = self.kv.update(key, expected, value, self.now) else {
            self.stats.conflicts += 1;
            return None;
        };
        self.stats.writes += 1;
        self.stats.fullest = self.stats.fullest.max(value.len());
        if value.len() > DICT_MAX_SESSIONS {
            fail(format!(
                "{}.{} holds {} devices, over {DICT_MAX_SESSIONS}",
                key.0,
                key.1,
                value.len()
            ));
        }
        let same = |d: Option<&SessionDict>, dev: &DeviceId, r: &SessionRecord| {
            d.and_then(|d| d.get(dev))
                .is_some_and(|o| o.session == r.session)
        };
        for (dev, r) in value.iter() {
            if !same(old.as_deref(), dev, r)
                && let Some(&s) = self.by_id.get(&r.session)
            {
                let sess = &mut self.sessions[s];
                sess.ever_stored = true;
                sess.first_stored.get_or_insert(self.now);
                // An older session of the device taking a newer one's entry
                // (here, or the previous interval's: `replaced`).
                let displaced = old
                    .as_deref()
                    .and_then(|o| o.get(dev))
                    .map(|o| &o.session)
                    .into_iter()
                    .chain(r.replaced.as_deref())
                    .filter_map(|id| self.by_id.get(id).copied())
                    .filter(|&n| n > s)
                    .collect::<Vec<_>>();
                for n in displaced {
                    self.sessions[n].overtaken = true;
                    self.mark(n, revision, Mark::Overtaken);
                }
            }
        }
        // Sessions that left: a live dictionary holding them after the
        // leave, a write of the dictionary before the live ones then.
        let [prev, _] = self.clock.live_intervals(self.now);
        for (dev, r) in value.iter() {
            if let Some(&s) = self.by_id.get(&r.session)
                && self.sessions[s].state == State::Left
                && key.1 >= prev
                && self.devices[self.sessions[s].device].id == *dev
            {
                self.sessions[s].seen_after_leave = true;
            }
        }
        for s in self.left_by_older.remove(key).unwrap_or_default() {
            let sess = &mut self.sessions[s];
            if sess.state == State::Left
                && sess.older_at_leave.as_ref().is_some_and(|(k, _)| k == key)
            {
                sess.older_written = true;
            }
        }
        if !acknowledged {
            self.unacknowledged(revision, old.as_deref(), &value);
        }
        for h in &mut self.handlers {
            h.watch.push_back((key.clone(), revision, value.clone()));
        }
        Some((revision, (revision, old, value)))
    }

    /// A write landed and its writer never learns it: the sessions it took
    /// out of the dictionary are announced by nobody.
    /// So are the sessions its new records displace (in the previous
    /// interval: the `replaced` revocation is its writer's to make).
    fn unacknowledged(&mut self, revision: u64, old: Option<&SessionDict>, new: &SessionDict) {
        self.stats.unacked += 1;
        let removed = old.iter().flat_map(|o| o.iter()).filter_map(|(dev, r)| {
            new.get(dev)
                .is_none_or(|n| n.session != r.session)
                .then_some(&r.session)
        });
        let displaced = new.iter().filter_map(|(dev, r)| {
            let added = old
                .and_then(|o| o.get(dev))
                .is_none_or(|o| o.session != r.session);
            r.replaced.as_deref().filter(|_| added)
        });
        let gone: Vec<usize> = removed
            .chain(displaced)
            .filter_map(|id| self.by_id.get(id).copied())
            .collect();
        for s in gone {
            self.sessions[s].unacked_gone = true;
            self.mark(s, revision, Mark::Gone);
        }
    }

    /// Places a mark on `s`'s timeline; its position.
    fn mark(&mut self, s: usize, revision: u64, mark: Mark) -> usize {
        let timeline = &mut self.sessions[s].timeline;
        let at = timeline.partition_point(|(r, _)| *r <= revision);
        timeline.insert(at, (revision, mark));
        at
    }

    fn act_io(&mut self) {
        let ready: Vec<usize> = (0..self.ops.len())
            .filter(|i| self.ops[*i].ready_at <= self.now)
            .collect();
        if let Some(i) = self.pick(&ready) {
            self.advance(i);
        }
    }

    /// Moves one piece of I/O on by one step.
    fn advance(&mut self, i: usize) {
        let Op {
            handler: h,
            key,
            phase,
            ..
        } = self.ops.swap_remove(i);
        let now = self.now;
        let next = |phase, ready_at| Op {
            handler: h,
            key: key.clone(),
            ready_at,
            phase,
        };
        let op = match phase {
            Phase::Sent(w, sent) => {
                let timed_out = now > sent + WRITE_TIMEOUT_MS;
                let (outcome, landed) = if self.chance(self.net.lost_request) {
                    self.log(|| format!("h{h}'s write of {}.{} is lost", key.0, key.1));
                    (Outcome::Failed, None)
                } else if timed_out || self.chance(self.net.ghost) {
                    // The server has it, the client no longer waits.
                    self.log(|| format!("h{h}'s write of {}.{} times out", key.0, key.1));
                    self.ghosts.push(Ghost {
                        key: key.clone(),
                        expected: w.revision(),
                        value: w.value().clone(),
                    });
                    (Outcome::Failed, None)
                } else {
                    let acked = !self.chance(self.net.lost_ack);
                    match self.commit(&key, w.revision(), w.value().clone(), acked) {
                        Some((rev, landed)) if acked => (Outcome::Written(rev), Some(landed)),
                        Some((rev, _)) => {
                            self.log(|| format!("h{h}'s write {rev} lands, its ack is lost"));
                            (Outcome::Failed, None)
                        }
                        None => (Outcome::Conflict, None),
                    }
                };
                Some(next(Phase::Answer(w, sent, outcome, landed), now))
            }
            // The answer comes after the flusher gave up: a failure, also
            // when the write landed.
            Phase::Answer(w, sent, outcome, landed) if now > sent + WRITE_TIMEOUT_MS => {
                self.answer_too_late(h, &key, &outcome, landed);
                Some(next(Phase::Read(w, Outcome::Failed, now), now))
            }
            Phase::Answer(w, _, Outcome::Written(rev), _) => {
                let written = self.handlers[h]
                    .dicts
                    .on_written(&key.0, key.1, w, rev, now);
                self.log(|| {
                    format!(
                        "h{h} wrote {}.{} rev {rev}: {:?} more={}",
                        key.0, key.1, written.applied, written.more
                    )
                });
                if written.more {
                    self.handlers[h].due.push((now, key.clone()));
                }
                self.announce(h, &key, written.applied, rev);
                None
            }
            Phase::Answer(w, _, outcome, _) => {
                if let Outcome::Failed = outcome {
                    self.stats.failed += 1;
                }
                Some(next(Phase::Read(w, outcome, now), now))
            }
            Phase::Read(w, outcome, _) => {
                let current = (!self.chance(self.net.failed_read)).then(|| self.kv.read(&key));
                Some(next(Phase::Reapply(w, outcome, current), now))
            }
            Phase::Reapply(w, outcome, current) => {
                self.log(|| {
                    format!(
                        "h{h} {outcome:?} on {}.{}, read {:?}",
                        key.0,
                        key.1,
                        current.as_ref().map(|c| c.0)
                    )
                });
                self.handlers[h]
                    .dicts
                    .on_conflict(&key.0, key.1, w, current);
                let pause = if let Outcome::Failed = outcome {
                    RETRY_MS
                } else {
                    0
                };
                self.handlers[h].due.push((now + pause, key.clone()));
                None
            }
            Phase::Reread(_) => {
                let current = (!self.chance(self.net.failed_read)).then(|| self.kv.read(&key));
                let pause = if current.is_none() { RETRY_MS } else { 0 };
                Some(next(Phase::Reinstall(current), now + pause))
            }
            Phase::Reinstall(current) => {
                self.log(|| {
                    format!(
                        "h{h} rereads {}.{}: {:?}",
                        key.0,
                        key.1,
                        current.as_ref().map(|c| c.0)
                    )
                });
                self.handlers[h].dicts.on_reread(&key.0, key.1, current);
                self.handlers[h].due.push((now, key.clone()));
                None
            }
        };
        if let Some(op) = op {
            self.ops.push(op);
        }
    }

    /// What a handler does without waiting on the network is done before
    /// time moves on: a due flush is taken, an answer that came back is
    /// handed to the dictionaries (`lib.rs` does both at once). Only
    /// requests, answers and watch messages take time.
    fn catch_up(&mut self) {
        loop {
            let local = self.ops.iter().position(|o| {
                o.ready_at <= self.now
                    && matches!(o.phase, Phase::Reapply(..) | Phase::Reinstall(_))
            });
            if let Some(i) = local {
                self.advance(i);
                continue;
            }
            let due = self.handlers.iter().enumerate().find_map(|(h, hd)| {
                hd.due
                    .iter()
                    .position(|(at, _)| *at <= self.now)
                    .map(|i| (h, i))
            });
            match due {
                Some((h, i)) => {
                    let (_, key) = self.handlers[h].due.remove(i);
                    self.flush(h, key);
                }
                None => return,
            }
        }
    }

    /// A write's answer that comes after the flusher gave up: to the
    /// handler a failure, also when the write landed (then unacknowledged).
    fn answer_too_late(&mut self, h: usize, key: &Key, outcome: &Outcome, landed: Option<Landed>) {
        self.log(|| {
            format!(
                "h{h}'s write of {}.{} times out ({outcome:?})",
                key.0, key.1
            )
        });
        if let Some((rev, old, new)) = landed {
            self.unacknowledged(rev, old.as_deref(), &new);
        }
        self.stats.failed += 1;
    }

    /// The flusher's timers: a request unanswered after the timeout has
    /// failed (a write may still land: the server holds it).
    fn fire_timeouts(&mut self) {
        let now = self.now;
        let late = |since: UnixMillis| now > since + WRITE_TIMEOUT_MS;
        for i in 0..self.ops.len() {
            let phase = std::mem::replace(&mut self.ops[i].phase, Phase::Reinstall(None));
            let (h, key) = (self.ops[i].handler, self.ops[i].key.clone());
            self.ops[i].phase = match phase {
                Phase::Sent(w, sent) if late(sent) => {
                    self.log(|| format!("h{h}'s write of {}.{} times out unsent", key.0, key.1));
                    self.ghosts.push(Ghost {
                        key: key.clone(),
                        expected: w.revision(),
                        value: w.value().clone(),
                    });
                    self.stats.failed += 1;
                    Phase::Read(w, Outcome::Failed, now)
                }
                Phase::Answer(w, sent, outcome, landed) if late(sent) => {
                    self.answer_too_late(h, &key, &outcome, landed);
                    Phase::Read(w, Outcome::Failed, now)
                }
                Phase::Read(w, outcome, since) if late(since) => Phase::Reapply(w, outcome, None),
                Phase::Reread(since) if late(since) => {
                    self.ops[i].ready_at = now + RETRY_MS;
                    Phase::Reinstall(None)
                }
                other => other,
            };
        }
    }

    /// A write the client gave up on lands now, or never.
    fn act_ghost(&mut self) {
        if self.ghosts.is_empty() {
            return;
        }
        let g = self.ghosts.swap_remove(self.rng.usize(..self.ghosts.len()));
        if self.rng.bool() {
            let landed = self
                .commit(&g.key, g.expected, g.value, false)
                .map(|(rev, _)| rev);
            self.log(|| {
                format!(
                    "a timed-out write of {}.{} lands: {landed:?}",
                    g.key.0, g.key.1
                )
            });
            if landed.is_some() {
                self.stats.ghosts_landed += 1;
            }
        }
    }

    /// `lib.rs`'s `on_dict_entry`.
    fn deliver_watch(&mut self, h: usize) {
        let Some((key, revision, value)) = self.handlers[h].watch.pop_front() else {
            return;
        };
        let decision =
            self.handlers[h]
                .dicts
                .install(&key.0, key.1, revision, (*value).clone(), self.now);
        self.log(|| format!("h{h} sees {}.{} rev {revision}: {decision:?}", key.0, key.1));
        self.schedule(h, decision);
    }

    /// The revoked watch (`lib.rs`'s `on_ended`).
    fn deliver_revoked(&mut self, h: usize) {
        let Some((account, device, session, at)) = self.handlers[h].revoked_watch.pop_front()
        else {
            return;
        };
        self.handlers[h].revoked.insert(session.clone());
        let decision = self.handlers[h]
            .dicts
            .ended(&account, &device, &session, at, self.now);
        self.log(|| format!("h{h} sees {session} ended: {decision:?}"));
        self.schedule(h, decision);
    }

    fn act_watch(&mut self, revoked: bool) {
        let waiting: Vec<usize> = (0..self.handlers.len())
            .filter(|h| {
                if revoked {
                    !self.handlers[*h].revoked_watch.is_empty()
                } else {
                    !self.handlers[*h].watch.is_empty()
                }
            })
            .collect();
        let Some(h) = self.pick(&waiting) else {
            return;
        };
        // Mostly one message, sometimes a lagging watch catching up.
        let n = if self.rng.u32(0..10) == 0 {
            usize::MAX
        } else {
            1
        };
        for _ in 0..n {
            let more = if revoked {
                self.deliver_revoked(h);
                !self.handlers[h].revoked_watch.is_empty()
            } else {
                self.deliver_watch(h);
                !self.handlers[h].watch.is_empty()
            };
            if !more {
                break;
            }
        }
    }

    /// `lib.rs`'s `announce`: what a landed write (or a take with nothing
    /// to write) tells, checked as it is told.
    fn announce(
        &mut self,
        h: usize,
        key: &Key,
        mut applied: Vec<(DeviceId, Applied, bool)>,
        revision: u64,
    ) {
        let (account, interval) = (&key.0, key.1);
        // One entry per device; sorted so that a replay is exact.
        applied.sort_by(|a, b| a.0.cmp(&b.0));
        for (device, what, elsewhere) in applied {
            match what {
                Applied::Added { record, replaced } => {
                    if let Some(old) = replaced {
                        self.handlers[h].revoked.insert(old.clone());
                        if self.revoke_once(account, &device, &old) {
                            let older = self.session(&record.session) < self.session(&old);
                            let why = if older {
                                "replaced by an older session"
                            } else {
                                "replaced"
                            };
                            self.leave_event(&old, why, revision);
                        }
                    }
                    if !elsewhere {
                        self.join_event(&record, interval, revision);
                    }
                }
                Applied::Removed(r) | Applied::Withdrawn(r) => {
                    self.leave_event(&r.session, "leave", revision)
                }
                Applied::Updated | Applied::Nothing => {}
            }
        }
    }

    /// A known gap shows up for session `s`: counted once per session,
    /// or a failure when strict.
    fn known(&mut self, kind: Known, s: usize, what: impl FnOnce() -> String) {
        if self.strict {
            fail(format!("{kind:?}: {}", what()));
        }
        self.log(|| format!("KNOWN {kind:?}: {}", what()));
        let bit = 1 << kind as u8;
        if self.sessions[s].known & bit == 0 {
            self.sessions[s].known |= bit;
            self.stats.known[kind as usize] += 1;
        }
    }

    fn session(&self, id: &SessionId) -> usize {
        *self
            .by_id
            .get(id)
            .unwrap_or_else(|| fail(format!("an event names {id}, which no device started")))
    }

    /// A join announced for a write of `record` into `interval`, landed
    /// at `revision`.
    fn join_event(&mut self, record: &SessionRecord, interval: u64, revision: u64) {
        let id = &record.session;
        let s = self.session(id);
        self.log(|| format!("JOIN {id} in {interval}"));
        self.stats.joins += 1;
        let sess = &self.sessions[s];
        // From a heartbeat before the session last ended: that presence is
        // over, and only a session that had joined before is told twice.
        if sess.ended_at.is_some_and(|t| record.last_seen < t) {
            if sess.joins > 0 {
                self.known(Known::WriteAfterLeave, s, || {
                    format!("{id} joins again in {interval}, from a heartbeat before it ended")
                });
            }
            self.sessions[s].joins += 1;
            return;
        }
        // A displaced session's late write taking its device back.
        if sess.state == State::Superseded {
            self.known(Known::OlderSessionLast, s, || {
                format!("{id}, displaced by a newer session of its device, joins in {interval}")
            });
            self.sessions[s].joins += 1;
            return;
        }
        self.sessions[s].joins += 1;
        self.sessions[s].presence_joined = true;
        self.sessions[s].unacked_gone = false;
        // Checked once every announcement is made (`check_joins`).
        self.mark(s, revision, Mark::Join(interval));
    }

    /// No two joins of a session without a leave (or an unannounced end)
    /// between, in the order of the revisions they came with; the part of
    /// each timeline that is complete (everything under way has landed).
    fn check_joins(&mut self) {
        let mut found = Vec::new();
        for (s, sess) in self.sessions.iter_mut().enumerate() {
            let timeline = &sess.timeline;
            for k in sess.checked.max(1)..timeline.len() {
                // An older session's displacement (`Mark::Overtaken`) is no
                // leave; between the two joins, or before them since the
                // session's last leave (it revoked the session, and
                // handlers that have not learned of that yet write it
                // again, those that have remove it quietly), it explains
                // them.
                let (r2, Mark::Join(i2)) = timeline[k] else {
                    continue;
                };
                let before = timeline[..k]
                    .iter()
                    .rev()
                    .position(|(_, m)| *m != Mark::Overtaken);
                let Some(back) = before else {
                    continue;
                };
                let (r1, Mark::Join(i1)) = timeline[k - 1 - back] else {
                    continue;
                };
                let what = format!(
                    "{} joins in {i1} (revision {r1}) and in {i2} (revision {r2}), with no leave between",
                    sess.id
                );
                // Since the last leave or disappearance (but for the
                // overtaking's own announcement, at its revision).
                let overtaken = timeline[..k]
                    .iter()
                    .rev()
                    .find(|(r, m)| match m {
                        Mark::Overtaken => true,
                        Mark::Leave | Mark::Gone => !timeline.contains(&(*r, Mark::Overtaken)),
                        Mark::Join(_) => false,
                    })
                    .is_some_and(|(_, m)| *m == Mark::Overtaken);
                let kind = if overtaken {
                    Some(Known::OlderSessionLast)
                } else if i1 != i2 {
                    Some(Known::JoinInTwoIntervals)
                } else if sess.returned_quickly {
                    Some(Known::QuickReturn)
                } else {
                    None
                };
                found.push((s, kind, what));
            }
            sess.checked = timeline.len();
        }
        for (s, kind, what) in found {
            match kind {
                Some(kind) => self.known(kind, s, || what),
                None => fail(what),
            }
        }
    }

    fn leave_event(&mut self, id: &SessionId, why: &str, revision: u64) {
        let s = self.session(id);
        self.log(|| format!("LEAVE {id} ({why})"));
        self.stats.leaves += 1;
        self.mark(s, revision, Mark::Leave);
        let sess = &mut self.sessions[s];
        sess.leaves += 1;
        match why {
            "leave" => sess.removed += 1,
            "replaced" => sess.replaced += 1,
            _ => {}
        }
        let what = format!(
            "{id}'s leave is announced {} times ({why} last) for {} ending(s); state {:?}",
            sess.leaves, sess.endings, sess.state
        );
        if why == "replaced by an older session" {
            // The gap ends it (or ends it again).
            sess.overtaken = true;
            sess.endings += 1;
            sess.gap_leaves += 1;
            self.known(Known::OlderSessionLast, s, || what);
        } else if sess.leaves > sess.endings {
            if sess.left_then_displaced && sess.removed == sess.endings && sess.replaced == 1 {
                // Counted once; a further one is not explained.
                sess.endings += 1;
                sess.gap_leaves += 1;
                self.known(Known::LeaveAndReplaced, s, || what);
            } else {
                fail(what);
            }
        }
    }

    // ---- time -----------------------------------------------------------

    fn advance_time(&mut self, by: u64) {
        let before = self.now;
        self.now += by;
        if self.now / TICK_MS != before / TICK_MS {
            for h in &mut self.handlers {
                h.dicts.prune(self.now);
            }
        }
        let ttl = self.clock.dictionary_ttl().as_millis() as u64;
        self.kv.expire(self.now, ttl);
        self.fire_timeouts();
        if self.crowd.is_some()
            && self.clock.interval_of(self.now) != self.clock.interval_of(before)
        {
            let start = self.clock.start_of(self.clock.interval_of(self.now));
            self.crowd_beat_at = Some(start + self.rng.u64(0..3_000));
        }
    }

    // ---- the run --------------------------------------------------------

    fn step(&mut self) {
        if let Some(at) = self.crowd_beat_at
            && at <= self.now
        {
            self.crowd_beat_at = None;
            self.crowd_beat();
        }
        match self.rng.u32(0..100) {
            0..24 => self.act_beat(false),
            24..27 => self.act_beat(true),
            27..32 => self.act_join(false),
            32..34 => self.act_join(true),
            34..38 => self.act_leave(),
            38 => self.act_return(),
            39 => self.act_late(),
            40 => self.act_evict(),
            41..55 => self.act_flush(),
            55..73 => self.act_io(),
            73..75 => self.act_ghost(),
            75..86 => self.act_watch(false),
            86..89 => self.act_watch(true),
            89..99 => {
                let by = self.rng.u64(1..300);
                self.catch_up();
                self.advance_time(by);
            }
            _ => {
                let by = self.rng.u64(300..1_500);
                self.catch_up();
                self.advance_time(by);
            }
        }
    }

    /// No new input until every write has landed, every message has been
    /// seen and nothing is pending; then the invariants that need a quiet
    /// system.
    fn settle(&mut self) {
        self.stats.settles += 1;
        self.drain();
        // A session heard again after its leave may have been removed by
        // that leave all the same, when the two went to different handlers
        // (neither can order them): its next heartbeat brings it back, and
        // then it must stay.
        let back: Vec<usize> = (0..self.sessions.len())
            .filter(|&s| {
                let sess = &self.sessions[s];
                sess.returned && self.required(s) && !self.shown(s)
            })
            .collect();
        if !back.is_empty() {
            let next = back
                .iter()
                .filter_map(|&s| self.sessions[s].last_heard)
                .max()
                .map_or(self.now, |t| t + HEARTBEAT_MS);
            if next > self.now {
                self.advance_time(next - self.now);
            }
            for s in back {
                self.beat(s);
            }
            self.drain();
        }
        self.check_settled();
    }

    /// Carries out everything under way, with a reliable network, until
    /// nothing is left to do.
    fn drain(&mut self) {
        self.settling = true;
        // A write the client gave up on lands now or never.
        while !self.ghosts.is_empty() {
            self.act_ghost();
        }
        let mut rounds = 0;
        loop {
            rounds += 1;
            if rounds > 1_000_000 {
                fail("the handlers do not settle".into());
            }
            let ready_op = self.ops.iter().any(|o| o.ready_at <= self.now);
            let watching = self.handlers.iter().any(|h| !h.watch.is_empty());
            let revoking = self.handlers.iter().any(|h| !h.revoked_watch.is_empty());
            let due_now = self
                .handlers
                .iter()
                .any(|h| h.due.iter().any(|(at, _)| *at <= self.now));
            let choices: Vec<usize> = [ready_op, watching, revoking, due_now]
                .iter()
                .enumerate()
                .filter(|(_, on)| **on)
                .map(|(i, _)| i)
                .collect();
            match self.pick(&choices) {
                Some(0) => self.act_io(),
                Some(1) => self.act_watch(false),
                Some(2) => self.act_watch(true),
                Some(_) => self.act_flush(),
                None => {
                    // Wait for the next pause or carry delay to end.
                    let next = self
                        .handlers
                        .iter()
                        .flat_map(|h| h.due.iter().map(|(at, _)| *at))
                        .chain(self.ops.iter().map(|o| o.ready_at))
                        .min();
                    match next {
                        Some(at) => self.advance_time(at - self.now),
                        None => break,
                    }
                }
            }
        }
        self.settling = false;
        for (h, hd) in self.handlers.iter().enumerate() {
            if hd.dicts.has_pending() {
                fail(format!(
                    "h{h} holds changes with no flush due: {:?}",
                    hd.dicts.pending_keys()
                ));
            }
        }
    }

    /// The entries readers see for `s`'s device: previous and current
    /// interval.
    fn seen(&self, s: usize) -> [Option<&SessionRecord>; 2] {
        let sess = &self.sessions[s];
        let account = &self.accounts[sess.account];
        let device = &self.devices[sess.device].id;
        self.clock.live_intervals(self.now).map(|i| {
            self.kv
                .get(&(account.clone(), i))
                .and_then(|d| d.get(device))
        })
    }

    /// Whether readers must see `s`: live, its device's newest session,
    /// heard in a live interval and not refused for want of room.
    fn required(&self, s: usize) -> bool {
        let sess = &self.sessions[s];
        let [prev, _] = self.clock.live_intervals(self.now);
        sess.state == State::Live
            && !sess.refused
            && self.devices[sess.device].current == Some(s)
            && sess
                .last_heard
                .is_some_and(|t| self.clock.interval_of(t) >= prev)
    }

    /// Whether readers see `s` for its device, with its latest labels (the
    /// current interval's entry over the previous one's).
    fn shown(&self, s: usize) -> bool {
        let [prev, cur] = self.seen(s);
        let sess = &self.sessions[s];
        cur.or(prev)
            .is_some_and(|r| r.session == sess.id && r.labels.content() == sess.content)
    }

    fn check_settled(&mut self) {
        self.check_joins();
        let [prev, _] = self.clock.live_intervals(self.now);
        let mut overtaken = Vec::new();
        let mut missing: Vec<Vec<String>> = vec![Vec::new(); self.accounts.len()];
        let mut gaps = Vec::new();
        for (s, sess) in self.sessions.iter().enumerate() {
            let account = &self.accounts[sess.account];
            let device = &self.devices[sess.device];
            let [in_prev, in_cur] = self.seen(s);
            let holds = |r: Option<&SessionRecord>| r.is_some_and(|r| r.session == sess.id);
            match sess.state {
                State::Live => {
                    if !self.required(s) || self.shown(s) {
                        continue;
                    }
                    let older = in_cur
                        .or(in_prev)
                        .and_then(|r| self.by_id.get(&r.session))
                        .is_some_and(|&o| o < s);
                    let stale = in_cur.or(in_prev).is_some_and(|r| r.session == sess.id);
                    if stale && sess.swallowed {
                        gaps.push((
                            Known::LaggingCopy,
                            s,
                            format!(
                                "{account}/{}/{}: labels of a heartbeat taken for no change",
                                device.id, sess.id
                            ),
                        ));
                        continue;
                    }
                    if older || sess.revoked || sess.interfered != 0 || sess.overtaken {
                        overtaken.push(s);
                        // Counted when it was announced, if it was.
                        gaps.push((
                            Known::OlderSessionLast,
                            s,
                            format!(
                                "{account}/{}/{}: an older session of the device holds its entry",
                                device.id, sess.id
                            ),
                        ));
                        continue;
                    }
                    missing[sess.account].push(format!(
                        "{}/{}/{} with {:?} (last heard {}{}): previous interval {:?}, current {:?}",
                        account,
                        device.id,
                        sess.id,
                        sess.content,
                        sess.last_heard.unwrap_or_default() % 1_000_000,
                        if sess.returned {
                            ", heard again after a leave"
                        } else {
                            ""
                        },
                        in_prev.map(|r| (r.session.as_str(), r.labels.content())),
                        in_cur.map(|r| (r.session.as_str(), r.labels.content())),
                    ));
                }
                State::Left | State::Ended => {
                    // An older session's late heartbeat displaced it in the
                    // view of the handler of its leave, which ignored it.
                    if (sess.interfered != 0 || sess.overtaken)
                        && (holds(in_prev) || holds(in_cur) || sess.leaves == 0)
                    {
                        gaps.push((
                            Known::OlderSessionLast,
                            s,
                            format!("{account}/{}/{}: its leave went to a view where an older session displaced it", device.id, sess.id),
                        ));
                        continue;
                    }
                    if holds(in_prev) || holds(in_cur) {
                        fail(format!(
                            "{account}/{}/{} is {:?} but still in a live dictionary (prev {}, cur {})",
                            device.id,
                            sess.id,
                            sess.state,
                            holds(in_prev),
                            holds(in_cur)
                        ));
                    }
                    // Its first record landed after it left: the handler of
                    // the leave announces it if its watch shows that record
                    // while its interval is live (WriteAfterLeave).
                    let late = sess.leaves == 0
                        && sess
                            .first_stored
                            .is_some_and(|t| sess.ended_at.is_some_and(|e| t >= e));
                    if late && sess.state == State::Left && !sess.returned {
                        gaps.push((
                            Known::WriteAfterLeave,
                            s,
                            format!(
                                "{}'s leave is not announced: its record landed after it",
                                sess.id
                            ),
                        ));
                    }
                    // Left in an interval no longer read, and in no live
                    // dictionary: its removal was given up with it.
                    let outlived = sess.leaves == 0
                        && !holds(in_prev)
                        && !holds(in_cur)
                        && sess
                            .ended_at
                            .is_some_and(|t| self.clock.interval_of(t) < prev);
                    // Unseen in the live intervals from its leave on, and
                    // the dictionary before them no help: nothing left to
                    // remove it from.
                    let unseen = sess.leaves == 0
                        && sess.left_unseen
                        && !sess.seen_after_leave
                        && sess.older_at_leave.as_ref().is_some_and(|(key, held)| {
                            !held || (!sess.older_written && self.kv.get(key).is_none())
                        });
                    // Once; more only as known gaps account for.
                    let excused = late
                        || sess.unacked_gone
                        || sess.left_unrecorded
                        || !sess.ever_stored && !sess.presence_joined;
                    let told = if sess.leaves == 0 {
                        excused || outlived || unseen
                    } else {
                        sess.leaves - 1 <= sess.gap_leaves
                    };
                    if sess.state == State::Left && !sess.returned && outlived && !excused {
                        gaps.push((
                            Known::LeaveOutlived,
                            s,
                            format!(
                                "{}'s leave is not announced: its interval ended first",
                                sess.id
                            ),
                        ));
                    }
                    if sess.state == State::Left
                        && !sess.returned
                        && unseen
                        && !outlived
                        && !excused
                    {
                        gaps.push((
                            Known::LeaveUnseen,
                            s,
                            format!(
                                "{}'s leave is not announced: no dictionary left held it",
                                sess.id
                            ),
                        ));
                    }
                    if sess.state == State::Left && !sess.returned && !told {
                        fail(format!(
                            "{account}/{}/{} left and its leave was announced {} times{}",
                            device.id,
                            sess.id,
                            sess.leaves,
                            if sess.left_then_displaced {
                                " (its device started a newer session after the leave)"
                            } else {
                                ""
                            }
                        ));
                    }
                }
                State::Superseded => {}
            }
        }
        for s in overtaken {
            self.sessions[s].overtaken = true;
        }
        for (kind, s, what) in gaps {
            self.known(kind, s, || what);
        }
        for (a, missing) in missing.iter().enumerate() {
            // Refused when a write was taken: the write says how many, not
            // which, so that many may be missing.
            if missing.len() as u64 > self.take_refusals[a] {
                fail(format!(
                    "{} live session(s) lost ({} refused at a write): {}",
                    missing.len(),
                    self.take_refusals[a],
                    missing.join("; ")
                ));
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
        // Settle now and then along the way, not only at the end.
        if sim.rng.u32(0..500) == 0 {
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

/// [`run`], its panic (a broken invariant, or the handler's own) caught.
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
fn handlers_keep_their_promises_under_a_random_schedule() {
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
    // Each failure is reported below, with its seed: the default report of
    // every caught panic would only repeat them, out of order.
    let quiet = count > 1;
    let hook = quiet.then(|| {
        let hook = panic::take_hook();
        panic::set_hook(Box::new(|_| {}));
        hook
    });
    // Seeds are handed out one at a time: their costs differ widely.
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
    let known: Vec<String> = Known::ALL
        .iter()
        .filter(|k| total.known[**k as usize] > 0)
        .map(|k| format!("{k:?} {}", total.known[*k as usize]))
        .collect();
    println!(
        "{count} seeds x {steps} steps, {threads} threads, {:.1?}: {} failed\n\
         {} heartbeats, {} writes landed ({} unacknowledged, {} late), {} conflicts, \
         {} failed, {} joins, {} leaves, {} refused for room, fullest dictionary {} \
         of {DICT_MAX_SESSIONS}, {} settles\n\
         known gaps (sessions): {}",
        started.elapsed(),
        failures.len(),
        total.heartbeats,
        total.writes,
        total.unacked,
        total.ghosts_landed,
        total.conflicts,
        total.failed,
        total.joins,
        total.leaves,
        total.refused,
        total.fullest,
        total.settles,
        if known.is_empty() {
            "none".into()
        } else {
            known.join(", ")
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
             replay: SIM_SEED={} SIM_STEPS={steps} cargo test -p heartbeat-handler --test simulation",
            failures.len(),
            f.seed,
            f.step,
            if f.settling { " (settling)" } else { "" },
            f.what,
            f.seed,
        );
    }
}
