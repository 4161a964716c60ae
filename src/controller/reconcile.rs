//! One reconcile of one MessagePipeline: converge (apply) or clean up (deletion).

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Resource, ResourceExt};
use tracing::{Instrument, debug, info, info_span, warn};

use super::brokers::{Gate, PooledBroker};
use super::migration;
use super::status::{Observation, Verdict, next_status};
use super::{Context, Error, Phase, describe};
use crate::api::validate::InvalidSpec;
use crate::api::{DeletionPolicy, ManagementPolicy, MessagePipeline, Reason};
use crate::broker::{self, BrokerReport, Change, Failed};
use crate::k8s::{self, AlertsOutcome};
use crate::plan::{self, DesiredState};

/// Finalizer that keeps a pipeline until its broker objects are dealt with.
pub const FINALIZER: &str = "msgpipe.io/cleanup";

/// A pipeline whose broker is being probed by another reconcile (or has gone silent) is
/// looked at again after this, with nothing written.
pub const BUSY_RETRY: Duration = Duration::from_secs(2);

/// Entry point of the controller for one object. Runs in a span carrying the pipeline's
/// key, so every log line below (broker calls included) says which pipeline it is about.
pub async fn reconcile<B: PooledBroker>(
    pipeline: Arc<MessagePipeline>,
    ctx: Arc<Context<B>>,
) -> Result<Action, Error> {
    let key = format!(
        "{}/{}",
        pipeline.namespace().unwrap_or_default(),
        pipeline.name_any()
    );
    let span = info_span!("reconcile", pipeline = %key);
    reconcile_pipeline(pipeline, ctx, key)
        .instrument(span)
        .await
}

async fn reconcile_pipeline<B: PooledBroker>(
    pipeline: Arc<MessagePipeline>,
    ctx: Arc<Context<B>>,
    key: String,
) -> Result<Action, Error> {
    let started = Instant::now();
    let namespace = pipeline.namespace().unwrap_or_default();
    let api: Api<MessagePipeline> = Api::namespaced(ctx.client.clone(), &namespace);
    // A new pipeline gets its finalizer and is converged in the same pass: waiting for the
    // finalizer's watch event to come back first would cost every new pipeline a round
    // trip through the API server and the controller's queue.
    let pipeline = match add_finalizer(&api, pipeline, &ctx).await {
        Ok(pipeline) => pipeline,
        Err(error) => {
            ctx.metrics.reconciled("error", started.elapsed());
            warn!(error = %error, "reconcile failed");
            return Err(error);
        }
    };
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
        Err(error) if matches!(error.inner(), Error::InvalidSpec(_)) => "invalid_spec",
        Err(_) => "error",
    };
    ctx.metrics.reconciled(label, started.elapsed());
    match &result {
        Ok(_) => ctx.forget_failures(&key),
        Err(error) => warn!(error = %error, "reconcile failed"),
    }
    result
}

/// `pipeline` with msgpipe's finalizer: added now (a JSON patch that fails if another writer
/// changed the finalizers meanwhile) when a live pipeline lacks it. kube's finalizer helper
/// then goes straight to the apply.
async fn add_finalizer<B: PooledBroker>(
    api: &Api<MessagePipeline>,
    pipeline: Arc<MessagePipeline>,
    ctx: &Context<B>,
) -> Result<Arc<MessagePipeline>, Error> {
    if pipeline.meta().deletion_timestamp.is_some()
        || pipeline.finalizers().iter().any(|f| f == FINALIZER)
    {
        return Ok(pipeline);
    }
    let started = Instant::now();
    let finalizers = pipeline.finalizers();
    let patch: json_patch::Patch = serde_json::from_value(if finalizers.is_empty() {
        serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ])
    } else {
        serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
        ])
    })
    // Built above from constants and the object's own finalizers: always a valid patch.
    .expect("a JSON patch of two operations");
    let name = pipeline.name_any();
    let patched = api
        .patch(
            &name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Json::<()>(patch),
        )
        .await
        .map_err(|source| {
            Error::Kube(k8s::KubeError::Api {
                operation: format!(
                    "add the finalizer to MessagePipeline {}/{name}",
                    pipeline.namespace().unwrap_or_default()
                ),
                source,
            })
        })?;
    ctx.metrics.kube_write("finalizer", "added");
    ctx.metrics.phase(Phase::Finalizer, started.elapsed());
    Ok(Arc::new(patched))
}

/// Makes the broker, the ConfigMap, the PrometheusRule and the status match the spec.
///
/// Order: clients never learn of a retry tier before it exists. A ConfigMap that announces
/// new tiers is written after the broker pass declared them; one that announces no new tier
/// (tiers removed, or other changes) is written first, and the broker retires removed tiers
/// afterwards, each only once it is empty.
async fn converge<B: PooledBroker>(
    pipeline: &MessagePipeline,
    api: &Api<MessagePipeline>,
    ctx: &Context<B>,
) -> Result<Action, Error> {
    let key = format!(
        "{}/{}",
        pipeline.namespace().unwrap_or_default(),
        pipeline.name_any()
    );
    let generation = pipeline.metadata.generation;
    // Validation first: an invalid spec never reaches the broker or the Secret.
    let named = match plan::plan(pipeline, None) {
        Ok(named) => named,
        Err(invalid) => return report_invalid_spec(pipeline, api, invalid, ctx).await,
    };
    // A refused brokerRef (namespace not admitted, vhost not granted) ends here: the broker
    // is never called, and BrokerReady says which rule refused it. The ConfigMap's name does
    // not depend on the vhost: both are read at once.
    let read = Instant::now();
    let observe = pipeline.spec.management_policy == ManagementPolicy::Observe;
    let (resolved, config_map) = futures_util::future::join(
        k8s::resolve_broker(&ctx.client, &ctx.config.brokers, pipeline),
        async {
            // Observe neither reads nor writes the objects msgpipe would own.
            if observe {
                Ok(None)
            } else {
                k8s::read_client_config(&ctx.client, &named).await
            }
        },
    )
    .await;
    let config_map = config_map?;
    ctx.metrics.phase(Phase::Read, read.elapsed());
    let uri_vhost = resolved.as_ref().ok().map(|r| r.vhost.clone());
    let create_vhost = resolved.as_ref().is_ok_and(|r| r.create_vhost);
    let endpoint = resolved.map(|r| r.endpoint);
    let desired = plan::plan(pipeline, uri_vhost.as_deref()).map_err(Error::InvalidSpec)?;
    if observe {
        let endpoint = endpoint.map_err(Error::Kube);
        return super::observe::observe(pipeline, api, &desired, endpoint, ctx).await;
    }
    let new_tiers = announces_new_tiers(&desired, config_map.as_ref());
    if !new_tiers {
        write_client_config(pipeline, &desired, config_map.as_ref(), ctx).await?;
    }
    // The broker pass and the alerts (which do not depend on each other) at the same time.
    let broker_pass = async {
        // Right before the broker pass, so a reconcile that is let through as the probe
        // always reports what the broker did.
        let gate = match &endpoint {
            Ok(endpoint) => ctx.brokers.gate(endpoint).await,
            Err(_) => Gate::Open,
        };
        match (endpoint, gate) {
            (Ok(_), Gate::Busy) => None,
            (Ok(_), Gate::Down(error)) => Some((
                broker_failed(pipeline, Error::Broker(error), ctx).await,
                None,
            )),
            // A queue migration (spec.queue.type changed) runs in a task of its own; while
            // it does, the broker pass waits and the status reports its progress
            // (controller/migration.rs).
            (Ok(endpoint), _) => match migration::drive(pipeline, &desired, &endpoint, ctx).await {
                Some(migrating) => Some((BrokerOutcome::migrating(&migrating), Some(migrating))),
                None => {
                    let started = Instant::now();
                    let outcome =
                        converge_broker(pipeline, &desired, &endpoint, create_vhost, ctx).await;
                    ctx.metrics.phase(Phase::Broker, started.elapsed());
                    Some((outcome, None))
                }
            },
            (Err(error), _) => Some((broker_failed(pipeline, Error::Kube(error), ctx).await, None)),
        }
    };
    let alerts = async {
        let started = Instant::now();
        let verdict = converge_alerts(pipeline, &desired, ctx).await;
        ctx.metrics.phase(Phase::Alerts, started.elapsed());
        verdict
    };
    let (outcome, (alerts, alertmanager_config)) =
        futures_util::future::join(broker_pass, alerts).await;
    let Some((outcome, migration)) = outcome else {
        debug!("another reconcile is probing this broker; looking again shortly");
        return Ok(Action::requeue(BUSY_RETRY));
    };
    if new_tiers && outcome.tiers_in_place {
        write_client_config(pipeline, &desired, config_map.as_ref(), ctx).await?;
    }
    let crd_missing = matches!(
        alerts.reason,
        Reason::PrometheusRuleCRDMissing | Reason::AlertmanagerConfigCRDMissing
    );
    let observation = Observation {
        generation,
        broker: outcome.verdict,
        alerts,
        counts: outcome.counts,
        alertmanager_config,
        migration: migration.as_ref().map(|m| m.status.clone()),
    };
    let ready = observation.broker.ok && observation.alerts.ok;
    let started = Instant::now();
    write_status(api, pipeline, &observation, Some(&desired), ctx).await?;
    ctx.metrics.phase(Phase::Status, started.elapsed());
    ctx.metrics.set_ready(&key, Some(ready));
    // Events say what changed; nothing waits for them, so they come after the status.
    let started = Instant::now();
    for (kind, reason, note) in &outcome.events {
        ctx.change_event(pipeline, *kind, *reason, note).await;
    }
    ctx.metrics.phase(Phase::Events, started.elapsed());
    if let Some(error) = outcome.error {
        return Err(error);
    }
    if let Some(migrating) = migration {
        return Ok(Action::requeue(migrating.requeue));
    }
    let next = if crd_missing {
        // Looked for again soon, so alerts appear once the CRD is installed.
        ctx.config.resync.min(Duration::from_secs(60))
    } else {
        ctx.config.resync
    };
    Ok(Action::requeue(next))
}

/// Not ready for every condition, one Warning when that is news; the error waits for a
/// spec change.
async fn report_invalid_spec<B: PooledBroker>(
    pipeline: &MessagePipeline,
    api: &Api<MessagePipeline>,
    invalid: InvalidSpec,
    ctx: &Context<B>,
) -> Result<Action, Error> {
    let error = Error::InvalidSpec(invalid);
    let (reason, message) = describe(&error);
    let observation = Observation::invalid_spec(pipeline.metadata.generation, &message);
    if write_status(api, pipeline, &observation, None, ctx).await? {
        ctx.event(pipeline, EventType::Warning, reason, &message)
            .await;
    }
    let key = format!(
        "{}/{}",
        pipeline.namespace().unwrap_or_default(),
        pipeline.name_any()
    );
    ctx.metrics.set_ready(&key, Some(false));
    Err(error)
}

/// Whether the planned `pipeline.json` names a retry queue the current one does not.
fn announces_new_tiers(desired: &DesiredState, current: Option<&ConfigMap>) -> bool {
    let announced = k8s::announced_retry_queues(current);
    desired
        .client_config
        .retry
        .tiers
        .iter()
        .any(|tier| !announced.contains(&tier.queue))
}

async fn write_client_config<B: PooledBroker>(
    pipeline: &MessagePipeline,
    desired: &DesiredState,
    current: Option<&ConfigMap>,
    ctx: &Context<B>,
) -> Result<(), Error> {
    let started = Instant::now();
    if current.is_none_or(|current| current.data != desired.config_map.data) {
        // Before the write: its watch event may come back before the answer does.
        ctx.writing_config_map(&desired.config_map);
    }
    if k8s::apply_client_config(&ctx.client, pipeline, desired, current).await? {
        ctx.metrics.kube_write("configmap", "applied");
    }
    ctx.metrics.phase(Phase::ConfigMap, started.elapsed());
    Ok(())
}

/// AlertsReady: the PrometheusRule, then the AlertmanagerConfig of `spec.alerts.notify`;
/// also the name of the AlertmanagerConfig msgpipe now keeps.
async fn converge_alerts<B: PooledBroker>(
    pipeline: &MessagePipeline,
    desired: &DesiredState,
    ctx: &Context<B>,
) -> (Verdict, Option<String>) {
    let rules = converge_rule(pipeline, desired, ctx).await;
    let (notify, kept) = converge_notify(pipeline, desired, ctx).await;
    match notify {
        Some(notify) if rules.ok => (notify, kept),
        _ => (rules, kept),
    }
}

async fn converge_rule<B: PooledBroker>(
    pipeline: &MessagePipeline,
    desired: &DesiredState,
    ctx: &Context<B>,
) -> Verdict {
    let rule_api = match k8s::prometheus_rule_api(&ctx.client).await {
        Ok(api) => api,
        Err(error) => return Verdict::failed(Reason::AlertsApplyFailed, error.to_string()),
    };
    match k8s::apply_prometheus_rule(&ctx.client, rule_api.as_ref(), pipeline, desired).await {
        Ok(AlertsOutcome::Applied { wrote }) => {
            if wrote {
                ctx.metrics.kube_write("prometheusrule", "applied");
            }
            Verdict::ok(
                Reason::Converged,
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
                Reason::AlertsDisabled,
                "spec.alerts.enabled is false: no PrometheusRule",
            )
        }
        Ok(AlertsOutcome::CrdMissing) => Verdict::failed(
            Reason::PrometheusRuleCRDMissing,
            "the PrometheusRule CRD (monitoring.coreos.com/v1) is not installed; install prometheus-operator or set spec.alerts.enabled: false",
        ),
        Err(error) => {
            warn!(error = %error, "alerts not applied");
            Verdict::failed(Reason::AlertsApplyFailed, error.to_string())
        }
    }
}

/// The AlertmanagerConfig `<name>-notify`: written while `spec.alerts.notify` is set, deleted
/// once it is not. A pipeline that never had one costs no call (the status remembers it).
/// Returns the verdict when there was something to do, and the name kept afterwards.
async fn converge_notify<B: PooledBroker>(
    pipeline: &MessagePipeline,
    desired: &DesiredState,
    ctx: &Context<B>,
) -> (Option<Verdict>, Option<String>) {
    let kept_before = pipeline
        .status
        .as_ref()
        .and_then(|s| s.alertmanager_config.clone());
    let Some(name) = desired
        .alertmanager_config
        .as_ref()
        .and_then(|c| c.metadata.name.clone())
        .or(kept_before.clone())
    else {
        return (None, None);
    };
    let api = match k8s::alertmanager_config_api(&ctx.client).await {
        Ok(api) => api,
        Err(error) => {
            let verdict = Verdict::failed(Reason::AlertsApplyFailed, error.to_string());
            return (Some(verdict), kept_before);
        }
    };
    match k8s::apply_alertmanager_config(&ctx.client, api.as_ref(), pipeline, desired).await {
        Ok(AlertsOutcome::Applied { wrote }) => {
            if wrote {
                ctx.metrics.kube_write("alertmanagerconfig", "applied");
            }
            let message = format!(
                "PrometheusRule {}-alerts and AlertmanagerConfig {name} are up to date",
                desired.pipeline.name
            );
            (Some(Verdict::ok(Reason::Converged, message)), Some(name))
        }
        Ok(AlertsOutcome::Disabled { deleted }) => {
            if deleted {
                ctx.metrics.kube_write("alertmanagerconfig", "deleted");
            }
            (None, None)
        }
        Ok(AlertsOutcome::CrdMissing) => {
            let verdict = Verdict::failed(
                Reason::AlertmanagerConfigCRDMissing,
                "spec.alerts.notify is set but the AlertmanagerConfig CRD (monitoring.coreos.com/v1alpha1) is not installed; install prometheus-operator's CRDs, or route the alerts in Alertmanager yourself (msgpipe render --alertmanager-fragment)",
            );
            // Whatever was kept before stays on record, so it is still removed later.
            (Some(verdict), kept_before)
        }
        Err(error) => {
            warn!(error = %error, "notification config not applied");
            let verdict = Verdict::failed(Reason::AlertsApplyFailed, error.to_string());
            (Some(verdict), kept_before)
        }
    }
}

/// What the broker pass tells the status and the controller.
struct BrokerOutcome {
    /// BrokerReady.
    verdict: Verdict,
    counts: Option<broker::LiveCounts>,
    /// The failure, for the error policy's backoff.
    error: Option<Error>,
    /// Every planned retry queue exists: the ConfigMap may announce them.
    tiers_in_place: bool,
    /// Events to publish once the status is written.
    events: Vec<(EventType, Reason, String)>,
}

impl BrokerOutcome {
    /// A migration runs (or cannot): the broker pass waits for it.
    fn migrating(migrating: &migration::Migrating) -> Self {
        BrokerOutcome {
            verdict: migrating.verdict.clone(),
            counts: None,
            error: None,
            tiers_in_place: false,
            events: Vec::new(),
        }
    }
}

/// Reports a failure that kept the broker pass from running (or stopped it).
async fn broker_failed<B: PooledBroker>(
    pipeline: &MessagePipeline,
    error: Error,
    ctx: &Context<B>,
) -> BrokerOutcome {
    let (reason, message) = ctx.failure_event(pipeline, &error).await;
    BrokerOutcome {
        verdict: Verdict::failed(reason, message),
        counts: None,
        error: Some(error),
        tiers_in_place: false,
        events: Vec::new(),
    }
}

/// Runs the broker reconciler in its vhost's batch (see [`super::batch`]): one snapshot for
/// the pipelines reconciled together, all their policies first, then the rest.
async fn converge_broker<B: PooledBroker>(
    pipeline: &MessagePipeline,
    desired: &DesiredState,
    endpoint: &broker::BrokerEndpoint,
    create_vhost: bool,
    ctx: &Context<B>,
) -> BrokerOutcome {
    let vhost = &desired.topology.vhost;
    let key = desired.pipeline.to_string();
    let result = async {
        let broker = ctx.brokers.broker(endpoint).await.map_err(|error| {
            // The pool reports its own reads; a client that could not even be made is
            // reported here.
            ctx.brokers.failed(endpoint, &error);
            Failed {
                error,
                applied: vec![],
            }
        })?;
        let in_batch = |broker: Arc<B>| {
            ctx.brokers
                .converge_in_batch(endpoint, broker, desired.clone(), ctx.last_write(&key))
        };
        match in_batch(broker.clone()).await {
            // A MessageBroker that creates its tenants' vhosts: made on first use only.
            Err(Failed {
                error: broker::BrokerError::VhostNotFound { .. },
                ..
            }) if create_vhost => {
                if broker.create_vhost(vhost).await.map_err(|error| Failed {
                    error,
                    applied: vec![],
                })? {
                    info!(%vhost, "created the namespace's vhost (MessageBroker createVhosts)");
                }
                in_batch(broker).await
            }
            done => done,
        }
    }
    .await;
    let wrote = match &result {
        Ok(report) => report.wrote(),
        Err(failed) => {
            ctx.brokers.failed(endpoint, &failed.error);
            !failed.applied.is_empty()
        }
    };
    if wrote {
        ctx.wrote_now(&key);
    }
    let drift = is_converged(pipeline);
    match result {
        Ok(report) => {
            let mut events = record_changes(&report.changes, drift, ctx);
            events.extend(report.warnings.iter().map(|warning| {
                (
                    EventType::Warning,
                    Reason::PolicyOverridden,
                    warning.clone(),
                )
            }));
            let mut outcome = broker_verdict(pipeline, &report, ctx).await;
            events.append(&mut outcome.events);
            outcome.events = events;
            outcome
        }
        Err(Failed { error, applied }) => {
            publish_changes(pipeline, &applied, drift, ctx).await;
            broker_failed(pipeline, Error::Broker(error), ctx).await
        }
    }
}

/// The pipeline's broker client and a snapshot of its vhost (the pool learns from it whether
/// the broker answers).
pub(super) async fn open_vhost<B: PooledBroker>(
    desired: &DesiredState,
    endpoint: &broker::BrokerEndpoint,
    ctx: &Context<B>,
) -> Result<(Arc<B>, Arc<broker::LiveVhost>), Failed> {
    let opened = async {
        let broker = ctx.brokers.broker(endpoint).await?;
        let not_before = ctx.last_write(&desired.pipeline.to_string());
        let live = ctx
            .brokers
            .snapshot(endpoint, &broker, &desired.topology.vhost, not_before)
            .await?;
        Ok((broker, live))
    }
    .await;
    // The pool reports its own reads; a client that could not even be made is reported here.
    if let Err(error) = &opened {
        ctx.brokers.failed(endpoint, error);
    }
    opened.map_err(|error| Failed {
        error,
        applied: vec![],
    })
}

async fn broker_verdict<B: PooledBroker>(
    pipeline: &MessagePipeline,
    report: &BrokerReport,
    ctx: &Context<B>,
) -> BrokerOutcome {
    let tiers_in_place = report.deferred == 0;
    if !report.conflicts.is_empty() {
        let message = report
            .conflicts
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        // A migration under way (run by `msgpipe migrate`) is progress, not a fault.
        let (reason, kind) = if report
            .conflicts
            .iter()
            .any(|c| c.reason == Reason::Migrating)
        {
            (Reason::Migrating, EventType::Normal)
        } else {
            (Reason::ImmutableFieldChanged, EventType::Warning)
        };
        ctx.event(pipeline, kind, reason, &message).await;
        return BrokerOutcome {
            verdict: Verdict::failed(reason, message),
            counts: Some(report.counts.clone()),
            error: None,
            tiers_in_place,
            events: Vec::new(),
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
            Reason::Converged,
            "exchanges, queues, bindings and policies match the spec",
        ),
        counts: Some(counts),
        error: None,
        tiers_in_place,
        events: Vec::new(),
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

/// Logs and counts every broker change, and reports them as one event per reason (`Created`,
/// `Bound`, ...) listing that reason's changes in order, `; `-separated: a new pipeline's
/// 17 changes cost the API server 3 event writes, not 17 (a burst of 1,000 new pipelines
/// made 22,000 API writes with an event per change). A list longer than an event note may be
/// is cut at a change boundary, saying how many more there were; the log has them all.
/// Returns the events, to publish once the status is written.
fn record_changes<B: PooledBroker>(
    changes: &[Change],
    drift: bool,
    ctx: &Context<B>,
) -> Vec<(EventType, Reason, String)> {
    let mut writes = 0;
    let mut by_reason: Vec<(Reason, EventType, Vec<String>)> = Vec::new();
    for change in changes {
        let kind = if change.verb == "kept" {
            EventType::Warning
        } else {
            writes += 1;
            ctx.metrics.broker_write(change.kind, change.verb);
            EventType::Normal
        };
        let Some(reason) = Reason::of_change(change.verb) else {
            continue;
        };
        let note = if drift && change.verb != "kept" {
            format!("{change} (drift repaired)")
        } else {
            change.to_string()
        };
        info!(change = %note, "broker changed");
        match by_reason.iter_mut().find(|(r, _, _)| *r == reason) {
            Some((_, _, notes)) => notes.push(note),
            None => by_reason.push((reason, kind, vec![note])),
        }
    }
    if drift && writes > 0 {
        ctx.metrics.drift_repaired(writes);
    }
    by_reason
        .into_iter()
        .map(|(reason, kind, notes)| (kind, reason, change_list(&notes)))
        .collect()
}

/// [`record_changes`], published at once.
async fn publish_changes<B: PooledBroker>(
    pipeline: &MessagePipeline,
    changes: &[Change],
    drift: bool,
    ctx: &Context<B>,
) {
    for (kind, reason, note) in record_changes(changes, drift, ctx) {
        ctx.change_event(pipeline, kind, reason, &note).await;
    }
}

/// `notes` joined with `; `, cut after the last whole note that fits in an event note, with
/// `; and N more` after it.
fn change_list(notes: &[String]) -> String {
    use crate::api::reason::{MAX_MESSAGE_BYTES, one_line};
    // Room for "; and 9999 more".
    const RESERVE: usize = 16;
    let mut list = String::new();
    for (i, note) in notes.iter().enumerate() {
        let separator = if list.is_empty() { "" } else { "; " };
        if i > 0 && list.len() + separator.len() + note.len() + RESERVE > MAX_MESSAGE_BYTES {
            list.push_str(&format!("; and {} more", notes.len() - i));
            return list;
        }
        list.push_str(separator);
        list.push_str(note);
    }
    one_line(&list)
}

/// Writes the status if it changed; returns whether it wrote.
async fn write_status<B: PooledBroker>(
    api: &Api<MessagePipeline>,
    pipeline: &MessagePipeline,
    observation: &Observation,
    desired: Option<&DesiredState>,
    ctx: &Context<B>,
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
async fn cleanup<B: PooledBroker>(
    pipeline: &MessagePipeline,
    ctx: &Context<B>,
) -> Result<Action, Error> {
    let key = format!(
        "{}/{}",
        pipeline.namespace().unwrap_or_default(),
        pipeline.name_any()
    );
    ctx.metrics.set_ready(&key, None);
    let observe = pipeline.spec.management_policy == ManagementPolicy::Observe;
    if pipeline.spec.deletion_policy == DeletionPolicy::Retain || observe {
        let note = if observe {
            "managementPolicy is Observe: broker objects left in place"
        } else {
            "deletionPolicy is Retain: broker objects left in place"
        };
        ctx.event(pipeline, EventType::Normal, Reason::Retained, note)
            .await;
        return Ok(Action::await_change());
    }
    let (endpoint, vhost) = match k8s::resolve_broker(&ctx.client, &ctx.config.brokers, pipeline)
        .await
    {
        Ok(resolved) => (resolved.endpoint, resolved.vhost),
        Err(error) => {
            let left = planned_objects(pipeline, None);
            let note = format!("{error}; released without touching the broker; left on it: {left}");
            ctx.event(pipeline, EventType::Warning, Reason::CleanupSkipped, &note)
                .await;
            return Ok(Action::await_change());
        }
    };
    let desired = match plan::plan(pipeline, Some(&vhost)) {
        Ok(desired) => desired,
        Err(invalid) => {
            let note = format!(
                "the spec is invalid ({invalid}), so msgpipe cannot tell which broker objects are its own; nothing deleted"
            );
            ctx.event(pipeline, EventType::Warning, Reason::CleanupSkipped, &note)
                .await;
            return Ok(Action::await_change());
        }
    };
    let result = match ctx.brokers.gate(&endpoint).await {
        Gate::Busy => return Ok(Action::requeue(BUSY_RETRY)),
        Gate::Down(error) => Err(Failed {
            error,
            applied: vec![],
        }),
        Gate::Open => teardown(&desired, &endpoint, ctx).await,
    };
    match result {
        Ok(report) => {
            publish_changes(pipeline, &report.changes, false, ctx).await;
            Ok(Action::await_change())
        }
        Err(Failed { error, applied }) => {
            publish_changes(pipeline, &applied, false, ctx).await;
            if deleting_for(pipeline) > ctx.config.cleanup_timeout {
                let note = format!(
                    "{error}; gave up after {}s and released the pipeline; left on the broker: {}",
                    ctx.config.cleanup_timeout.as_secs(),
                    planned_objects(pipeline, Some(&vhost))
                );
                ctx.event(
                    pipeline,
                    EventType::Warning,
                    Reason::CleanupAbandoned,
                    &note,
                )
                .await;
                return Ok(Action::await_change());
            }
            let error = Error::Broker(error);
            ctx.failure_event(pipeline, &error).await;
            Err(error)
        }
    }
}

async fn teardown<B: PooledBroker>(
    desired: &DesiredState,
    endpoint: &broker::BrokerEndpoint,
    ctx: &Context<B>,
) -> Result<BrokerReport, Failed> {
    let (broker, live) = open_vhost(desired, endpoint, ctx).await?;
    let result = broker::teardown(broker.as_ref(), desired, &live).await;
    if let Err(failed) = &result {
        ctx.brokers.failed(endpoint, &failed.error);
    }
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

#[cfg(test)]
mod change_list_tests {
    use super::change_list;
    use crate::api::reason::MAX_MESSAGE_BYTES;

    #[test]
    fn changes_are_listed_in_order_and_cut_at_a_change_saying_how_many_more() {
        let few: Vec<String> = ["created queue a", "created queue b"]
            .map(String::from)
            .into();
        assert_eq!(change_list(&few), "created queue a; created queue b");
        let many: Vec<String> = (0..100).map(|i| format!("created queue q{i:03}")).collect();
        let list = change_list(&many);
        assert!(list.len() <= MAX_MESSAGE_BYTES, "{}", list.len());
        let shown = list
            .split("; ")
            .filter(|n| n.starts_with("created"))
            .count();
        assert!(shown > 40, "{list}");
        assert!(
            list.ends_with(&format!("; and {} more", 100 - shown)),
            "{list}"
        );
        assert!(list.starts_with("created queue q000; created queue q001"));
    }
}
