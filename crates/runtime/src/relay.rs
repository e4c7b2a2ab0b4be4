//! One subscription per partition in a process that runs two services
//! wanting the same messages (`headcount up`: a heartbeat handler and a
//! checker): while the first ([`Relay::feed`]) takes a partition's messages,
//! it hands each subject to the second ([`Relay::listen`]), which then
//! needs no subscription of its own for that partition. Without it every
//! message would cross the network and be parsed twice in one process.
//!
//! Nothing is missed when a feed ends: [`Feed::hand_over`] first waits (a
//! bounded time) for the listener to say that a subscription of its own is
//! in place at the server ([`Relay::taken_over`]); the feeding service then
//! lets its subscription go, still passing on what it had already taken,
//! and only dropping the [`Feed`] detaches the listener. A message may be
//! heard twice around a change of source; listeners take that as harmless.
//! One feed runs per partition at a time (one service of a process feeds).

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};

/// What a listener does with each subject fed to it. It runs on the
/// feeding service's task, so it should only hand the subject on (a
/// subject is a shared buffer: cloning it copies nothing).
pub type Listener = Arc<dyn Fn(&async_nats::Subject) + Send + Sync>;

/// How long [`Feed::hand_over`] waits for the listener to take over.
pub const TAKE_OVER_WAIT: Duration = Duration::from_secs(2);

/// The relay of one process: one slot per partition.
#[derive(Clone)]
pub struct Relay {
    slots: Arc<[Slot]>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("partitions", &self.slots.len())
            .finish()
    }
}

struct Slot {
    state: RwLock<State>,
    /// Whether a feed runs and passes messages on (changes wake the
    /// listener's task).
    fed: watch::Sender<bool>,
    /// Notified when the listener has taken over or let go.
    released: Notify,
}

#[derive(Default)]
struct State {
    listener: Option<Listener>,
    /// The listener has its own subscription again.
    taken_over: bool,
}

impl Slot {
    fn state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a feed runs and has not started handing over.
    fn fed(&self) -> bool {
        *self.fed.borrow()
    }

    /// Changed only with the state locked (the witness `_locked`), so that
    /// [`Relay::listen`] sees the feed and the listener together.
    fn set_fed(&self, _locked: &mut State, fed: bool) {
        let _ = self.fed.send_replace(fed);
    }
}

impl Relay {
    pub fn new(partitions: u32) -> Self {
        let slots = (0..partitions.max(1))
            .map(|_| Slot {
                state: RwLock::default(),
                fed: watch::Sender::new(false),
                released: Notify::new(),
            })
            .collect();
        Self { slots }
    }

    fn slot(&self, p: u32) -> &Slot {
        &self.slots[p as usize % self.slots.len()]
    }

    /// The feeding service takes partition `p`'s messages from now on
    /// (its subscription is in place): a listener may stop subscribing.
    pub fn feed(&self, p: u32) -> Feed {
        let slot = self.slot(p);
        let mut state = slot.state();
        state.taken_over = false;
        slot.set_fed(&mut state, true);
        Feed {
            relay: self.clone(),
            p,
        }
    }

    /// Whether partition `p` is fed, and its changes.
    pub fn watch(&self, p: u32) -> watch::Receiver<bool> {
        self.slot(p).fed.subscribe()
    }

    /// Hears partition `p`'s messages through `listener` from now on, if
    /// a feed runs (true): the caller may let its own subscription go.
    /// Otherwise nothing changes (false).
    pub fn listen(&self, p: u32, listener: Listener) -> bool {
        let slot = self.slot(p);
        let mut state = slot.state();
        if !slot.fed() {
            return false;
        }
        state.listener = Some(listener);
        state.taken_over = false;
        true
    }

    /// The listener of partition `p` has its own subscription in place at
    /// the server again: a feed handing over may let its own go. The
    /// listener stays attached until the feed ends, so what the feed took
    /// before is still passed on.
    pub fn taken_over(&self, p: u32) {
        let slot = self.slot(p);
        slot.state().taken_over = true;
        slot.released.notify_waiters();
    }

    /// Stops listening on partition `p` (the listener lets the partition
    /// go).
    pub fn unlisten(&self, p: u32) {
        let slot = self.slot(p);
        slot.state().listener = None;
        slot.released.notify_waiters();
    }

    /// Whether someone listens on partition `p`.
    #[cfg(test)]
    fn listened(&self, p: u32) -> bool {
        self.slot(p).read().listener.is_some()
    }

    /// Whether partition `p`'s feed may let its subscription go: nobody
    /// listens, or the listener has taken over.
    fn released(&self, p: u32) -> bool {
        let state = self.slot(p).read();
        state.listener.is_none() || state.taken_over
    }
}

/// A partition fed by the service holding this: each message taken goes
/// to [`Feed::hear`]. Dropping it detaches the listener.
pub struct Feed {
    relay: Relay,
    p: u32,
}

impl Feed {
    /// Passes one subject on to the listener, if any.
    pub fn hear(&self, subject: &async_nats::Subject) {
        if let Some(l) = self.relay.slot(self.p).read().listener.as_ref() {
            l(subject);
        }
    }

    /// Before the feeding service lets its subscription go: tells the
    /// listener to subscribe on its own and waits up to [`TAKE_OVER_WAIT`]
    /// until it has. Returns whether it did (or nobody listened).
    pub async fn hand_over(&self) -> bool {
        let slot = self.relay.slot(self.p);
        let released = slot.released.notified();
        {
            let mut state = slot.state();
            slot.set_fed(&mut state, false);
        }
        let wait = async {
            let mut released = std::pin::pin!(released);
            while !self.relay.released(self.p) {
                released.as_mut().await;
                released.set(slot.released.notified());
            }
        };
        tokio::time::timeout(TAKE_OVER_WAIT, wait).await.is_ok()
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        let slot = self.relay.slot(self.p);
        let mut state = slot.state();
        state.listener = None;
        state.taken_over = false;
        slot.set_fed(&mut state, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn recorder() -> (Listener, Arc<Mutex<Vec<String>>>) {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let h = heard.clone();
        let listener: Listener =
            Arc::new(move |s: &async_nats::Subject| h.lock().unwrap().push(s.to_string()));
        (listener, heard)
    }

    #[tokio::test]
    async fn a_listener_hears_only_while_a_feed_runs_and_only_its_partition() {
        let relay = Relay::new(4);
        let (listener, heard) = recorder();
        assert!(!relay.listen(1, listener.clone()), "no feed yet");
        let feed = relay.feed(1);
        let other = relay.feed(2);
        assert!(*relay.watch(1).borrow());
        assert!(relay.listen(1, listener));
        feed.hear(&"a".into());
        other.hear(&"not for it".into());
        assert_eq!(*heard.lock().unwrap(), ["a"]);
        relay.unlisten(1);
        feed.hear(&"b".into());
        assert_eq!(*heard.lock().unwrap(), ["a"]);
        assert!(
            feed.hand_over().await,
            "nobody listened: nothing to wait for"
        );
        assert!(!*relay.watch(1).borrow());
        drop(other);
        assert!(!*relay.watch(2).borrow(), "a feed dropped ends too");
    }

    #[tokio::test]
    async fn a_hand_over_waits_for_the_listener_and_passes_on_what_came_before_it_ends() {
        let relay = Relay::new(1);
        let feed = relay.feed(0);
        let (listener, heard) = recorder();
        assert!(relay.listen(0, listener));
        let mut fed = relay.watch(0);
        let r = relay.clone();
        // The listener's side: told the feed ends, it subscribes on its
        // own (here: takes a while), then says so.
        let taking_over = tokio::spawn(async move {
            fed.wait_for(|f| !*f).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            r.taken_over(0);
        });
        let handing_over = async {
            let started = tokio::time::Instant::now();
            let took_over = feed.hand_over().await;
            (took_over, started.elapsed())
        };
        let (took_over, waited) = handing_over.await;
        assert!(took_over, "the listener took over in time");
        assert!(waited >= Duration::from_millis(50), "waited {waited:?}");
        taking_over.await.unwrap();
        // The feed drains what it had taken: still passed on.
        feed.hear(&"taken before".into());
        assert_eq!(*heard.lock().unwrap(), ["taken before"]);
        drop(feed);
        assert!(
            !relay.listened(0),
            "the feed ended: the listener is detached"
        );
        assert!(
            !relay.listen(0, recorder().0),
            "no feed: a listener is refused"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_listener_that_never_takes_over_holds_the_hand_over_for_a_bounded_time() {
        let relay = Relay::new(1);
        let feed = relay.feed(0);
        let (listener, _) = recorder();
        assert!(relay.listen(0, listener));
        let started = tokio::time::Instant::now();
        assert!(!feed.hand_over().await);
        assert_eq!(started.elapsed(), TAKE_OVER_WAIT);
    }

    #[tokio::test]
    async fn a_listener_letting_go_releases_a_hand_over() {
        let relay = Relay::new(1);
        let feed = relay.feed(0);
        assert!(relay.listen(0, recorder().0));
        let r = relay.clone();
        let letting_go = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            r.unlisten(0);
        });
        assert!(feed.hand_over().await);
        letting_go.await.unwrap();
    }
}
