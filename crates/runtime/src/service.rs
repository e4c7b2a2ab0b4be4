//! A service started on a task of its own: [`Running`] says when it is
//! ready (from its own [`Health`], never by probing it over the network)
//! and hands back how it ended.

use anyhow::Context;
use tokio::task::JoinHandle;

use crate::{Buckets, Health, Shutdown};

/// What a service is started with: its own connection (its NATS user's
/// permissions), the buckets opened through it, the readiness scope it
/// reports to, the switch that stops it, and the process's heartbeat
/// relay when a handler and a checker run in one process.
#[derive(Debug, Clone)]
pub struct Wiring {
    pub nats: async_nats::Client,
    pub buckets: Buckets,
    pub health: Health,
    pub shutdown: Shutdown,
    pub relay: Option<crate::relay::Relay>,
}

/// One started service. Dropping it leaves the task running; stop it
/// through the [`crate::Shutdown`] it was started with, then [`Running::join`].
#[derive(Debug)]
pub struct Running {
    name: &'static str,
    health: Health,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    /// How the task ended, once [`Running::ready`] saw it end.
    ended: Option<anyhow::Result<()>>,
}

impl Running {
    /// Runs `service` on its own task. It is ready when `health` (the scope
    /// it reports to) is.
    pub fn spawn<F>(name: &'static str, health: Health, service: F) -> Self
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        Self {
            name,
            health,
            task: Some(tokio::spawn(service)),
            ended: None,
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The readiness the service reports.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Waits until the service says it is ready: connected, buckets open,
    /// watches caught up, serving. Fails if it ends first, with its error.
    pub async fn ready(&mut self) -> anyhow::Result<()> {
        if let Some(ended) = &self.ended {
            return Err(match ended {
                Ok(()) => anyhow::anyhow!("{} stopped before it was ready", self.name),
                Err(e) => anyhow::anyhow!("{} failed: {e:#}", self.name),
            });
        }
        let Some(task) = self.task.as_mut() else {
            anyhow::bail!("{} is not running", self.name);
        };
        tokio::select! {
            () = self.health.ready() => Ok(()),
            ended = task => {
                self.task = None;
                let ended = ended
                    .with_context(|| format!("{} panicked", self.name))
                    .and_then(|r| r);
                let error = match &ended {
                    Ok(()) => anyhow::anyhow!("{} stopped before it was ready", self.name),
                    Err(e) => anyhow::anyhow!("{} failed: {e:#}", self.name),
                };
                self.ended = Some(ended);
                Err(error)
            }
        }
    }

    /// Whether the task has ended.
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the task to end and returns how it did.
    pub async fn join(mut self) -> anyhow::Result<()> {
        if let Some(ended) = self.ended.take() {
            return ended;
        }
        match self.task.take() {
            Some(task) => task
                .await
                .with_context(|| format!("{} panicked", self.name))?,
            None => Ok(()),
        }
    }

    /// Ends the task at once, without a drain.
    pub fn abort(self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_when_the_health_says_so_and_join_returns_the_result() {
        let health = Health::new();
        let scope = health.scope("svc");
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let s = scope.clone();
        let mut running = Running::spawn("svc", scope, async move {
            let _serving = s.serving();
            let _ = go_rx.await;
            Ok(())
        });
        running.ready().await.expect("ready");
        assert!(!running.is_finished());
        go_tx.send(()).expect("still waiting");
        running.join().await.expect("ended well");
    }

    #[tokio::test]
    async fn a_service_that_fails_before_it_is_ready_says_why() {
        let health = Health::new().scope("svc");
        let mut running = Running::spawn("svc", health, async { anyhow::bail!("no buckets") });
        let e = running.ready().await.expect_err("never ready");
        assert!(e.to_string().contains("no buckets"), "{e}");
        let again = running.ready().await.expect_err("still not ready");
        assert!(again.to_string().contains("no buckets"), "{again}");
        let ended = running.join().await.expect_err("the error comes back");
        assert!(ended.to_string().contains("no buckets"));
    }
}
