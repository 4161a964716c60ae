//! One reconcile of one MessagePipeline: converge (apply) or clean up (deletion).

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Resource, ResourceExt};
use tracing::{info, warn};

use super::status::{Observation, Verdict, next_status};
use super::{Context, Error};
use crate::api::reason;
use crate::api::{DeletionPolicy, MessagePipeline};
use crate::broker::{self, BrokerReport, Change, Failed, RabbitBroker};
use crate::k8s::{self, AlertsOutcome, KubeError};
use crate::plan::{self, DesiredState};

/// Finalizer that keeps a pipeline until its broker objects are dealt with.
pub const FINALIZER: &str = "msgpipe.io/cleanup";

/// Entry point of the controller for one object.
pub async fn reconcile(pipeline: Arc<MessagePipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let namespace = pipeline.namespace().unwrap_or_default();
    let api: Api<MessagePipeline> = Api::namespaced(ctx.client.clone(), &namespace);
    let key = format!("{namespace}/{}", pipeline.name_any());
    let result = finalizer(&api, FINALIZER, pipeline, |event| async {
        match event {
            Finalizer::Apply(p) => converge(&p, &api, &ctx).await,
            Finalizer::Cleanup(p) => cleanup(&p, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    let label = match &result {
        Ok(_) => "success",
        Err(Error::Finalizer(e))
            if matches!(
                **e,
                kube::runtime::finalizer::Error::ApplyFailed(Error::InvalidSpec(_))
            ) =>
        {
            "invalid_spec"
        }
        Err(_) => "error",
    };
    ctx.metrics.reconciled(label, started.elapsed());
    match &result {
        Ok(_) => ctx.forget_failures(&key),
        Err(error) => warn!(pipeline = %key, error = %error, "reconcile failed"),
    }
    result
}

/// Makes the broker, the ConfigMap, the PrometheusRule and the status match the spec.
async fn converge(
    pipeline: &MessagePipeline,
    api: &Api<MessagePipeline>,
    ctx: &Context,
) -> Result<Action, Error> {
    let key = format!(
        "{}/{}",
        pipeline.namespace().unwrap_or_default(),
        pipeline.name_any()
    );
    let generation = pipeline.metadata.generation;
    // Validation first: an invalid spec never reaches the broker or the Secret.
    if let Err(invalid) = plan::plan(pipeline, None) {
        let message = invalid.to_string();
        let observation = Observation::invalid_spec(generation, &message);
        if write_status(api, pipeline, &observation, None, ctx).await? {
            ctx.event(pipeline, EventType::Warning, reason::INVALID_SPEC, &message)
                .await;
        }
        ctx.metrics.set_ready(&key, Some(false));
        return Err(Error::InvalidSpec(message));
    }
    let secret = &pipeline.spec.broker.secret_ref.name;
    let endpoint = k8s::broker_endpoint(
        &ctx.client,
        &pipeline.namespace().unwrap_or_default(),
        secret,
    )
    .await;
    let uri_vhost = endpoint.as_ref().ok().map(|e| e.uri_vhost());
    let desired = plan::plan(pipeline, uri_vhost.as_deref())
        .map_err(|e| Error::InvalidSpec(e.to_string()))?;

    if k8s::apply_client_config(&ctx.client, pipeline, &desired).await? {
        ctx.metrics.kube_write("configmap", "applied");
    }
    let alerts = converge_alerts(pipeline, &desired, ctx).await;
    let outcome = match endpoint {
        Ok(endpoint) => converge_broker(pipeline, &desired, &endpoint, ctx).await,
        Err(error) => {
            let reason = match &error {
                KubeError::SecretMissing { .. } => reason::SECRET_MISSING,
                _ => "InvalidBrokerSecret",
            };
            let message = error.to_string();
            ctx.event(pipeline, EventType::Warning, reason, &message)
                .await;
            BrokerOutcome::failed(reason, message)
        }
    };
    let crd_missing = alerts.reason == reason::PROMETHEUS_RULE_CRD_MISSING;
    let observation = Observation {
        generation,
        broker: outcome.verdict,
        alerts,
        counts: outcome.counts,
    };
    let ready = observation.broker.ok && observation.alerts.ok;
    write_status(api, pipeline, &observation, Some(&desired), ctx).await?;
    ctx.metrics.set_ready(&key, Some(ready));
    if let Some(message) = outcome.error {
        return Err(Error::Broker(message));
    }
    let next = if outcome.waiting {
        ctx.config.policy_quiet
    } else if crd_missing {
        // Looked for again soon, so alerts appear once the CRD is installed.
        ctx.config.resync.min(Duration::from_secs(60))
    } else {
        ctx.config.resync
    };
    Ok(Action::requeue(next))
}

async fn converge_alerts(
    pipeline: &MessagePipeline,
    desired: &DesiredState,
    ctx: &Context,
) -> Verdict {
    let rule_api = match k8s::prometheus_rule_api(&ctx.client).await {
        Ok(api) => api,
        Err(error) => return Verdict::failed("AlertsApplyFailed", error.to_string()),
    };
    match k8s::apply_prometheus_rule(&ctx.client, rule_api.as_ref(), pipeline, desired).await {
        Ok(AlertsOutcome::Applied { wrote }) => {
            if wrote {
                ctx.metrics.kube_write("prometheusrule", "applied");
            }
            Verdict::ok(
                reason::CONVERGED,
                format!(
                    "PrometheusRule {}-alerts is up to date",
                    desired.pipeline.name
                ),
            )
        }
        Ok(AlertsOutcome::Disabled { deleted }) => {
            if deleted {
                ctx.metrics.kube_write("prometheusrule", "deleted");
            }
            Verdict::ok(
                reason::ALERTS_DISABLED,
                "spec.alerts.enabled is false: no PrometheusRule",
            )
        }
        Ok(AlertsOutcome::CrdMissing) => Verdict::failed(
            reason::PROMETHEUS_RULE_CRD_MISSING,
            "the PrometheusRule CRD (monitoring.coreos.com/v1) is not installed; install prometheus-operator or set spec.alerts.enabled: false",
        ),
        Err(error) => Verdict::failed("AlertsApplyFailed", error.to_string()),
    }
}

/// What the broker pass tells the status and the controller.
struct BrokerOutcome {
    /// BrokerReady.
    verdict: Verdict,
    counts: Option<broker::LiveCounts>,
    /// The failure, for the error policy's backoff.
    error: Option<String>,
    /// Policies written, declares held back (see [`crate::controller::PolicyBurst`]).
    waiting: bool,
}

impl BrokerOutcome {
    fn failed(reason: &str, message: String) -> Self {
        Self {
            verdict: Verdict::failed(reason, message.clone()),
            counts: None,
            error: Some(message),
            waiting: false,
        }
    }
}

/// Runs the broker reconciler, policies first: while other pipelines of the vhost are
/// writing policies, this one's declares wait for a later pass.
async fn converge_broker(
    pipeline: &MessagePipeline,
    desired: &DesiredState,
    endpoint: &broker::BrokerEndpoint,
    ctx: &Context,
) -> BrokerOutcome {
    let vhost = &desired.topology.vhost;
    let result = async {
        let broker = ctx.brokers.broker(endpoint).await.map_err(|error| Failed {
            error,
            applied: vec![],
        })?;
        let key = desired.pipeline.to_string();
        let live = ctx
            .brokers
            .snapshot(&broker, vhost, ctx.last_write(&key))
            .await
            .map_err(|error| Failed {
                error,
                applied: vec![],
            })?;
        let broker = broker.as_ref();
        let result = broker::reconcile_policies_first(broker, desired, &live, |policies| {
            ctx.brokers
                .may_declare(broker, vhost, &key, !policies.is_empty())
        })
        .await;
        let wrote = match &result {
            Ok(report) => report.wrote(),
            Err(failed) => !failed.applied.is_empty(),
        };
        if wrote {
            ctx.wrote_now(&key);
        }
        result
    }
    .await;
    let drift = is_converged(pipeline);
    match result {
        Ok(report) => {
            record_changes(pipeline, &report.changes, drift, ctx).await;
            for warning in &report.warnings {
                ctx.event(pipeline, EventType::Warning, "PolicyOverridden", warning)
                    .await;
            }
            broker_verdict(pipeline, &report, ctx).await
        }
        Err(Failed { error, applied }) => {
            record_changes(pipeline, &applied, drift, ctx).await;
            let message = ctx.failure_event(pipeline, &error).await;
            BrokerOutcome::failed(error.condition_reason(), message)
        }
    }
}

async fn broker_verdict(
    pipeline: &MessagePipeline,
    report: &BrokerReport,
    ctx: &Context,
) -> BrokerOutcome {
    if !report.conflicts.is_empty() {
        let message = report
            .conflicts
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        ctx.event(
            pipeline,
            EventType::Warning,
            reason::IMMUTABLE_FIELD_CHANGED,
            &message,
        )
        .await;
        return BrokerOutcome {
            verdict: Verdict::failed(reason::IMMUTABLE_FIELD_CHANGED, message),
            counts: Some(report.counts.clone()),
            error: None,
            waiting: report.deferred > 0,
        };
    }
    if report.deferred > 0 {
        let message = format!(
            "policies are in place; {} more broker changes wait until other pipelines on this vhost have written their policies",
            report.deferred
        );
        return BrokerOutcome {
            verdict: Verdict::failed(reason::WAITING_FOR_POLICIES, message),
            counts: Some(report.counts.clone()),
            error: None,
            waiting: true,
        };
    }
    // Counts come from the snapshot taken before this reconcile's writes: a queue it
    // just declared was absent there, and is empty now.
    let mut counts = report.counts.clone();
    counts.queue_messages.get_or_insert(0);
    counts.consumers.get_or_insert(0);
    counts.dead_letter_messages.get_or_insert(0);
    BrokerOutcome {
        verdict: Verdict::ok(
            reason::CONVERGED,
            "exchanges, queues, bindings and policies match the spec",
        ),
        counts: Some(counts),
        error: None,
        waiting: false,
    }
}

/// Whether the stored status says this generation was already converged (so any broker
/// write now repairs drift rather than applying a spec change).
fn is_converged(pipeline: &MessagePipeline) -> bool {
    pipeline.status.as_ref().is_some_and(|s| {
        s.observed_generation == pipeline.metadata.generation
            && s.conditions
                .iter()
                .any(|c| c.type_ == crate::api::condition::BROKER_READY && c.status == "True")
    })
}

async fn record_changes(
    pipeline: &MessagePipeline,
    changes: &[Change],
    drift: bool,
    ctx: &Context,
) {
    let mut writes = 0;
    for change in changes {
        let (kind, reason) = match change.verb {
            "kept" => (EventType::Warning, "Kept".to_string()),
            verb => {
                writes += 1;
                ctx.metrics.broker_write(change.kind, verb);
                (EventType::Normal, capitalize(verb))
            }
        };
        let note = if drift && change.verb != "kept" {
            format!("{change} (drift repaired)")
        } else {
            change.to_string()
        };
        info!(pipeline = %pipeline.name_any(), change = %note, "broker changed");
        ctx.change_event(pipeline, kind, &reason, &note).await;
    }
    if drift && writes > 0 {
        ctx.metrics.drift_repaired(writes);
    }
}

fn capitalize(verb: &str) -> String {
    let mut chars = verb.chars();
    chars
        .next()
        .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
        .unwrap_or_default()
}

/// Writes the status if it changed; returns whether it wrote.
async fn write_status(
    api: &Api<MessagePipeline>,
    pipeline: &MessagePipeline,
    observation: &Observation,
    desired: Option<&DesiredState>,
    ctx: &Context,
) -> Result<bool, Error> {
    let now = Time(Timestamp::now());
    let Some(status) = next_status(pipeline.status.as_ref(), observation, desired, &now) else {
        return Ok(false);
    };
    k8s::write_status(api, pipeline, &status).await?;
    ctx.metrics.kube_write("status", "applied");
    Ok(true)
}

/// Deletion: `Retain` leaves the broker alone; `Delete` removes what is empty. A pipeline
/// whose Secret or broker is gone for good is released anyway, saying what was left.
async fn cleanup(pipeline: &MessagePipeline, ctx: &Context) -> Result<Action, Error> {
    let key = format!(
        "{}/{}",
        pipeline.namespace().unwrap_or_default(),
        pipeline.name_any()
    );
    ctx.metrics.set_ready(&key, None);
    if pipeline.spec.deletion_policy == DeletionPolicy::Retain {
        ctx.event(
            pipeline,
            EventType::Normal,
            "Retained",
            "deletionPolicy is Retain: broker objects left in place",
        )
        .await;
        return Ok(Action::await_change());
    }
    let secret = &pipeline.spec.broker.secret_ref.name;
    let namespace = pipeline.namespace().unwrap_or_default();
    let endpoint = match k8s::broker_endpoint(&ctx.client, &namespace, secret).await {
        Ok(endpoint) => endpoint,
        Err(error) => {
            let left = planned_objects(pipeline, None);
            let note = format!("{error}; released without touching the broker; left on it: {left}");
            ctx.event(pipeline, EventType::Warning, "CleanupSkipped", &note)
                .await;
            return Ok(Action::await_change());
        }
    };
    let desired = match plan::plan(pipeline, Some(&endpoint.uri_vhost())) {
        Ok(desired) => desired,
        Err(invalid) => {
            let note = format!(
                "the spec is invalid ({invalid}), so msgpipe cannot tell which broker objects are its own; nothing deleted"
            );
            ctx.event(pipeline, EventType::Warning, "CleanupSkipped", &note)
                .await;
            return Ok(Action::await_change());
        }
    };
    match teardown(&desired, &endpoint, ctx).await {
        Ok(report) => {
            record_changes(pipeline, &report.changes, false, ctx).await;
            Ok(Action::await_change())
        }
        Err(Failed { error, applied }) => {
            record_changes(pipeline, &applied, false, ctx).await;
            if deleting_for(pipeline) > ctx.config.cleanup_timeout {
                let note = format!(
                    "{error}; gave up after {}s and released the pipeline; left on the broker: {}",
                    ctx.config.cleanup_timeout.as_secs(),
                    planned_objects(pipeline, Some(&endpoint.uri_vhost()))
                );
                ctx.event(pipeline, EventType::Warning, "CleanupAbandoned", &note)
                    .await;
                return Ok(Action::await_change());
            }
            Err(Error::Broker(ctx.failure_event(pipeline, &error).await))
        }
    }
}

async fn teardown(
    desired: &DesiredState,
    endpoint: &broker::BrokerEndpoint,
    ctx: &Context,
) -> Result<BrokerReport, Failed> {
    let fail = |error| Failed {
        error,
        applied: vec![],
    };
    let broker: Arc<RabbitBroker> = ctx.brokers.broker(endpoint).await.map_err(fail)?;
    let vhost = &desired.topology.vhost;
    let not_before = ctx.last_write(&desired.pipeline.to_string());
    let live = ctx
        .brokers
        .snapshot(&broker, vhost, not_before)
        .await
        .map_err(fail)?;
    let result = broker::teardown(broker.as_ref(), desired, &live).await;
    ctx.wrote_now(&desired.pipeline.to_string());
    result
}

/// How long the pipeline has been waiting for deletion.
fn deleting_for(pipeline: &MessagePipeline) -> Duration {
    pipeline
        .meta()
        .deletion_timestamp
        .as_ref()
        .and_then(|t| Timestamp::now().duration_since(t.0).try_into().ok())
        .unwrap_or_default()
}

/// The broker objects a pipeline would have, for "left on the broker" messages.
fn planned_objects(pipeline: &MessagePipeline, uri_vhost: Option<&str>) -> String {
    match plan::plan(pipeline, uri_vhost) {
        Ok(desired) => {
            let t = &desired.topology;
            let queues: Vec<&str> = t.queues.iter().map(|q| q.name.as_str()).collect();
            let exchanges: Vec<&str> = t.exchanges.iter().map(|e| e.name.as_str()).collect();
            format!(
                "vhost {:?}: queues {}; exchanges {}; {} policies",
                t.vhost,
                queues.join(", "),
                exchanges.join(", "),
                t.policies.len()
            )
        }
        Err(_) => "unknown (invalid spec)".into(),
    }
}
