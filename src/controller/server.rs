//! Process plumbing: the metrics/health HTTP server, signals, and leader election.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::{Metrics, RunOptions};

/// Whether the operator keeps running, and why it stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Stopping,
    LostLeadership,
}

/// Readiness flag served on `/readyz`.
#[derive(Clone, Default)]
pub struct Health(Arc<AtomicBool>);

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }
}

#[derive(Clone)]
struct ServerState {
    metrics: Arc<Metrics>,
    health: Health,
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the process ends.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, health: Health) {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(ServerState { metrics, health });
    if let Err(e) = axum::serve(listener, app).await {
        error!(error = %e, "metrics server stopped");
    }
}

async fn metrics_text(State(state): State<ServerState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

async fn readyz(State(state): State<ServerState>) -> impl IntoResponse {
    if state.health.0.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

/// Turns SIGTERM or Ctrl-C into a graceful stop: in-flight reconciles finish first.
pub async fn stop_on_signal(stop: watch::Sender<RunState>) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    info!("stopping: finishing in-flight reconciles");
    let _ = stop.send(RunState::Stopping);
}

/// The leader lease, held while this replica reconciles.
pub struct Leadership {
    changes: watch::Receiver<bool>,
    task: JoinHandle<kube_lease_manager::Result<LeaseManager>>,
}

impl Leadership {
    /// Campaigns for the lease; returns None if asked to stop first.
    pub async fn acquire(
        client: &Client,
        options: &RunOptions,
        identity: &str,
        mut stop: watch::Receiver<RunState>,
    ) -> anyhow::Result<Option<Self>> {
        let manager = LeaseManagerBuilder::new(client.clone(), &options.lease_name)
            .with_namespace(&options.lease_namespace)
            .with_identity(identity)
            .with_duration(15)
            .with_grace(5)
            .with_field_manager("msgpipe")
            .build()
            .await
            .with_context(|| {
                format!(
                    "cannot set up the leader lease {}/{}",
                    options.lease_namespace, options.lease_name
                )
            })?;
        let (mut changes, task) = manager.watch().await;
        info!(lease = %options.lease_name, "waiting to become the leader");
        loop {
            if *changes.borrow_and_update() {
                info!(identity, "became the leader");
                return Ok(Some(Self { changes, task }));
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        anyhow::bail!("the leader election task ended unexpectedly");
                    }
                }
                _ = stop.wait_for(|s| *s != RunState::Running) => return Ok(None),
            }
        }
    }

    /// Stops the operator when the lease is lost (another replica may already be reconciling).
    pub fn stop_when_lost(&self, stop: watch::Sender<RunState>) {
        let mut changes = self.changes.clone();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                if !*changes.borrow_and_update() {
                    error!("lost the leader lease");
                    let _ = stop.send(RunState::LostLeadership);
                    return;
                }
            }
        });
    }

    /// Gives the lease up so a standby replica takes over at once.
    pub async fn release(self) {
        drop(self.changes);
        match self.task.await {
            Ok(Ok(_)) => info!("released the leader lease"),
            Ok(Err(e)) => warn!(error = %e, "could not release the leader lease"),
            Err(e) => warn!(error = %e, "leader election task failed"),
        }
    }
}
