//! `managementPolicy: Observe` in the operator: read the broker, compare, report in the
//! status; write nothing else (no broker object, ConfigMap, PrometheusRule or
//! AlertmanagerConfig). The comparison is the broker edge's ([`broker::observe`]).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::brokers::{Gate, PooledBroker};
use super::reconcile::{BUSY_RETRY, open_vhost};
use super::status::{Observation, Verdict, next_status};
use super::{Context, Error};
use crate::api::{Difference, MessagePipeline, Reason};
use crate::broker::{self, BrokerEndpoint, Failed, LiveCounts};
use crate::k8s;
use crate::plan::DesiredState;

/// Observes one pipeline and stores what differs in its status.
pub(super) async fn observe<B: PooledBroker>(
    pipeline: &MessagePipeline,
    api: &Api<MessagePipeline>,
    desired: &DesiredState,
    endpoint: Result<BrokerEndpoint, Error>,
    ctx: &Context<B>,
) -> Result<Action, Error> {
    let gate = match &endpoint {
        Ok(endpoint) => ctx.brokers.gate(endpoint).await,
        Err(_) => Gate::Open,
    };
    let read = match (endpoint, gate) {
        (_, Gate::Busy) => return Ok(Action::requeue(BUSY_RETRY)),
        (Ok(_), Gate::Down(error)) => Err(Error::Broker(error)),
        (Ok(endpoint), Gate::Open) => open_vhost(desired, &endpoint, ctx)
            .await
            .map(|(_, live)| broker::observe(desired, &live))
            .map_err(|Failed { error, .. }| Error::Broker(error)),
        (Err(error), _) => Err(error),
    };
    let (verdict, counts, differences, error) = match read {
        Ok(observed) => (
            observed_verdict(observed.total),
            Some(observed.counts),
            observed.differences,
            None,
        ),
        Err(error) => {
            let (reason, message) = ctx.failure_event(pipeline, &error).await;
            (
                Verdict::failed(reason, message),
                None,
                Vec::new(),
                Some(error),
            )
        }
    };
    write_observed_status(api, pipeline, desired, verdict, counts, differences, ctx).await?;
    match error {
        Some(error) => Err(error),
        None => Ok(Action::requeue(ctx.config.resync)),
    }
}

/// BrokerReady (and Ready): True with no difference, False with some; reason `Observing`.
fn observed_verdict(total: usize) -> Verdict {
    if total == 0 {
        Verdict::ok(
            Reason::Observing,
            "managementPolicy is Observe: the broker matches the spec; nothing was written",
        )
    } else {
        Verdict::failed(
            Reason::Observing,
            format!(
                "managementPolicy is Observe: {total} differences from the spec (status.differences lists the first {}); nothing was written",
                broker::observe::MAX_DIFFERENCES.min(total)
            ),
        )
    }
}

/// Writes the status when it changed (`lastSyncTime` moves only with something else).
async fn write_observed_status<B: PooledBroker>(
    api: &Api<MessagePipeline>,
    pipeline: &MessagePipeline,
    desired: &DesiredState,
    broker: Verdict,
    counts: Option<LiveCounts>,
    differences: Vec<Difference>,
    ctx: &Context<B>,
) -> Result<(), Error> {
    let stored = pipeline.status.as_ref();
    let observation = Observation {
        generation: pipeline.metadata.generation,
        broker,
        alerts: Verdict::ok(
            Reason::Observing,
            "managementPolicy is Observe: no PrometheusRule, AlertmanagerConfig or ConfigMap is written",
        ),
        counts,
        alertmanager_config: stored.and_then(|s| s.alertmanager_config.clone()),
        migration: None,
    };
    let now = Time(Timestamp::now());
    let mut next = next_status(stored, &observation, Some(desired), &now)
        .unwrap_or_else(|| stored.cloned().unwrap_or_default());
    next.differences = differences;
    next.last_sync_time = stored.and_then(|s| s.last_sync_time.clone());
    if stored == Some(&next) {
        return Ok(());
    }
    let news = stored.is_none_or(|s| s.differences != next.differences);
    next.last_sync_time = Some(now);
    k8s::write_status(api, pipeline, &next).await?;
    ctx.metrics.kube_write("status", "applied");
    if news && !next.differences.is_empty() {
        let message = format!(
            "managementPolicy is Observe: {} differences from the spec (kubectl get messagepipeline -o yaml shows status.differences)",
            next.differences.len()
        );
        ctx.event(pipeline, EventType::Normal, Reason::Observing, &message)
            .await;
    }
    Ok(())
}
