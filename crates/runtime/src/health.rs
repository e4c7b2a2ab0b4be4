//! Readiness, as the services themselves know it: what `/readyz` reports.
//!
//! A [`Health`] is a set of named components, each ready or not, shared by
//! every clone (cloning is cheap). A service is ready when every component
//! is: its NATS connection is up ([`Health::track_nats`] reads the client's
//! state at each look, so a lost connection counts at once), its buckets are
//! open, its KV watches have replayed what the buckets held, and it has
//! said it is serving.
//!
//! Components are grouped into scopes: `health.scope("checker")` names its
//! components `checker/...` and holds one component of its own, `checker`,
//! that is not ready until the scope's owner calls [`Health::serving`]. So
//! a scope handed to a service before it starts keeps the whole set not
//! ready until that service has come up, whatever it registers meanwhile;
//! `headcount up` gives each of its services one scope of one set.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The name under which [`Health::track_nats`] registers a connection.
pub const NATS: &str = "nats";

/// A shared set of named readiness components. See the module docs.
#[derive(Clone, Debug, Default)]
pub struct Health {
    parts: Arc<Mutex<BTreeMap<String, Part>>>,
    /// `""` for the whole set, else the scope's name (`a` or `a/b`).
    prefix: Arc<str>,
    /// Bumped whenever a component changes, so [`Health::ready`] waits
    /// without polling.
    changed: Arc<tokio::sync::Notify>,
}

#[derive(Clone)]
enum Part {
    Flag(Arc<AtomicBool>),
    Nats(async_nats::Client),
}

impl std::fmt::Debug for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Part::Flag(ready) => write!(f, "Flag({})", ready.load(Ordering::Relaxed)),
            Part::Nats(client) => write!(f, "Nats({:?})", client.connection_state()),
        }
    }
}

impl Part {
    fn is_ready(&self) -> bool {
        match self {
            Part::Flag(ready) => ready.load(Ordering::Acquire),
            Part::Nats(client) => {
                client.connection_state() == async_nats::connection::State::Connected
            }
        }
    }
}

/// One component: set it ready or not ready; clones share the state.
#[derive(Clone, Debug)]
pub struct Component {
    ready: Arc<AtomicBool>,
    changed: Arc<tokio::sync::Notify>,
}

impl Component {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
        self.changed.notify_waiters();
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// What [`Health::status`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// The components not ready, by name (sorted); empty when ready.
    pub not_ready: Vec<String>,
}

impl Status {
    pub fn is_ready(&self) -> bool {
        self.not_ready.is_empty()
    }
}

/// Returned by [`Health::serving`]: the scope counts as serving until this
/// is dropped (a service stopping or failing is not ready any more).
#[derive(Debug)]
#[must_use = "the scope stops counting as serving when this is dropped"]
pub struct Serving(Component);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.set_ready(false);
    }
}

impl Health {
    /// An empty set. With nothing registered it is not ready (`starting`).
    pub fn new() -> Self {
        Self::default()
    }

    fn parts(&self) -> MutexGuard<'_, BTreeMap<String, Part>> {
        // Every change is a single insert: a panic cannot leave it half-done.
        self.parts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.prefix)
        }
    }

    /// The scope's own name (`""` for the whole set).
    pub fn name(&self) -> &str {
        &self.prefix
    }

    /// A scope named `name` in this set (`checker`, or `token-vendor/callout`
    /// under a scope): its components are named `<name>/<component>`, and a
    /// new scope is not ready until [`Health::serving`] is called on it.
    pub fn scope(&self, name: &str) -> Health {
        let scope = Health {
            parts: self.parts.clone(),
            prefix: self.full_name(name).into(),
            changed: self.changed.clone(),
        };
        scope.own();
        scope
    }

    /// [`Health::scope`] for a service connected with `client`: its
    /// [`NATS`] component follows that connection.
    pub fn service(&self, name: &str, client: &async_nats::Client) -> Health {
        let scope = self.scope(name);
        scope.track_nats(client);
        scope
    }

    /// The component named `name` in this scope, registered not ready if it
    /// is new (a name already registered gives the same component).
    pub fn component(&self, name: &str) -> Component {
        self.flag(self.full_name(name))
    }

    fn flag(&self, full: String) -> Component {
        let mut parts = self.parts();
        let ready = match parts.get(&full) {
            Some(Part::Flag(ready)) => ready.clone(),
            _ => {
                let ready = Arc::new(AtomicBool::new(false));
                parts.insert(full, Part::Flag(ready.clone()));
                ready
            }
        };
        self.changed.notify_waiters();
        Component {
            ready,
            changed: self.changed.clone(),
        }
    }

    /// The scope's own component (see [`Health::serving`]).
    fn own(&self) -> Component {
        self.flag(self.prefix.to_string())
    }

    /// Registers `client` as this scope's [`NATS`] component: ready while
    /// it is connected, looked up at each [`Health::status`]. It replaces a
    /// component of that name (one registered before connecting, to say
    /// that the connection is not up yet).
    pub fn track_nats(&self, client: &async_nats::Client) {
        self.parts()
            .insert(self.full_name(NATS), Part::Nats(client.clone()));
        self.changed.notify_waiters();
    }

    /// Says this scope's service is serving, until the returned guard is
    /// dropped. On the whole set (no scope) it registers a component
    /// `serving`.
    pub fn serving(&self) -> Serving {
        let own = if self.prefix.is_empty() {
            self.component("serving")
        } else {
            self.own()
        };
        own.set_ready(true);
        Serving(own)
    }

    /// What is not ready in this scope (the whole set for an unscoped
    /// handle). An empty set is not ready: it names `starting`.
    pub fn status(&self) -> Status {
        let parts = self.parts();
        let scope = format!("{}/", self.prefix);
        let mine = parts.iter().filter(|(name, _)| {
            self.prefix.is_empty() || **name == *self.prefix || name.starts_with(&scope)
        });
        let mut any = false;
        let mut not_ready = Vec::new();
        for (name, part) in mine {
            any = true;
            if !part.is_ready() {
                not_ready.push(name.clone());
            }
        }
        if !any {
            not_ready.push("starting".to_string());
        }
        Status { not_ready }
    }

    pub fn is_ready(&self) -> bool {
        self.status().is_ready()
    }

    /// Resolves once this scope is ready (see [`Health::status`]). A
    /// component's change wakes it; the NATS connection's state is not a
    /// component's change, so it also looks again every 100 ms.
    pub async fn ready(&self) {
        loop {
            let changed = self.changed.notified();
            if self.is_ready() {
                return;
            }
            let _ = tokio::time::timeout(std::time::Duration::from_millis(100), changed).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_when_every_component_is_and_not_while_there_is_none() {
        let h = Health::new();
        assert_eq!(h.status().not_ready, ["starting"]);
        let a = h.component("sessions");
        let b = h.component("revoked");
        assert_eq!(h.status().not_ready, ["revoked", "sessions"]);
        a.set_ready(true);
        assert_eq!(h.status().not_ready, ["revoked"]);
        b.set_ready(true);
        assert!(h.is_ready());
        a.set_ready(false);
        assert_eq!(h.status().not_ready, ["sessions"]);
    }

    #[test]
    fn clones_and_names_share_state() {
        let h = Health::new();
        let c = h.clone();
        h.component("buckets").set_ready(true);
        assert!(c.component("buckets").is_ready());
        assert!(c.is_ready());
    }

    #[test]
    fn a_scope_is_not_ready_until_serving_and_while_its_components_are_not() {
        let h = Health::new();
        let checker = h.scope("checker");
        assert_eq!(h.status().not_ready, ["checker"]);
        let limits = checker.component("limits");
        let serving = checker.serving();
        assert_eq!(h.status().not_ready, ["checker/limits"]);
        assert_eq!(checker.status().not_ready, ["checker/limits"]);
        limits.set_ready(true);
        assert!(h.is_ready());
        drop(serving);
        assert_eq!(h.status().not_ready, ["checker"]);
    }

    #[test]
    fn the_set_is_ready_only_when_every_scope_is() {
        let h = Health::new();
        let handler = h.scope("heartbeat-handler");
        let vendor = h.scope("token-vendor");
        let callout = vendor.scope("callout");
        let _h = handler.serving();
        assert!(handler.is_ready());
        assert_eq!(
            h.status().not_ready,
            ["token-vendor", "token-vendor/callout"]
        );
        let _v = vendor.serving();
        assert_eq!(vendor.status().not_ready, ["token-vendor/callout"]);
        let _c = callout.serving();
        assert!(h.is_ready());
        // A scope's name is not a prefix of another's components.
        let _other = h.scope("token");
        assert_eq!(vendor.status().not_ready, Vec::<String>::new());
        assert_eq!(h.status().not_ready, ["token"]);
    }

    #[test]
    fn serving_on_the_whole_set_is_a_component() {
        let h = Health::new();
        let s = h.serving();
        assert!(h.is_ready());
        drop(s);
        assert_eq!(h.status().not_ready, ["serving"]);
    }

    #[tokio::test]
    async fn a_nats_client_counts_while_it_is_not_connected() {
        // Nothing listens on port 1: the client keeps trying, never connected.
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("nats://127.0.0.1:1")
            .await
            .expect("connect returns at once with retry_on_initial_connect");
        let h = Health::new();
        let nats = h.component(NATS);
        nats.set_ready(false);
        h.track_nats(&client);
        assert_eq!(h.status().not_ready, ["nats"]);
        // Tracking replaced the placeholder: setting it changes nothing.
        nats.set_ready(true);
        assert_eq!(h.status().not_ready, ["nats"]);
    }
}
