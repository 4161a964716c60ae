//! The operator: watches MessagePipelines (and the Secrets and ConfigMaps they use) and
//! reconciles each one — broker topology, client ConfigMap, PrometheusRule, status, events.
//!
//! Every Kubernetes call made here and in [`crate::k8s`] must be granted by the chart's RBAC:
//! [`crate::k8s::rbac::PIPELINE_CALLS`] is the call list; `tests/chart.rs` fails when the
//! chart's rules differ from it and the operator tests answer 403 to any call outside it.
//! A new call means a new row there (and in the chart's `msgpipe-operator.rules`).
//!
//! Pipelines are watched untyped and decoded one by one ([`invalid`]): an object the API
//! server admitted but msgpipe cannot read is reported on its own and never stops the others.

mod batch;
mod broker_status;
mod brokers;
pub mod heap;
mod invalid;
pub mod metrics;
pub mod migration;
mod observe;
mod reconcile;
pub mod replay;
mod server;
pub mod status;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ApiResource, DynamicObject};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{debug, warn};

pub use brokers::{
    BROKER_CONCURRENCY, BrokerPool, Connector, DOWN_MEMORY, Gate, PROBE_PATIENCE, PooledBroker,
    SNAPSHOT_MAX_REUSE,
};
pub use metrics::{Metrics, Phase};
pub use reconcile::{BUSY_RETRY, FINALIZER, reconcile};

use crate::api::reason::one_line;
use crate::api::validate::InvalidSpec;
use crate::api::{MessageBroker, MessagePipeline, Reason};
use crate::broker::{BrokerError, RabbitBroker};
use crate::plan::MANAGED_BY_LABEL;

/// Why a reconcile did not finish; the controller retries with capped backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid spec: {0}")]
    InvalidSpec(#[source] InvalidSpec),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Kube(#[from] crate::k8s::KubeError),
    /// kube's finalizer helper; shown without its "failed to apply object:" wrapper.
    #[error("{}", finalizer_message(.0))]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
}

impl Error {
    /// The reconcile's own error, if the finalizer helper only wraps it.
    fn inner(&self) -> &Error {
        match self {
            Error::Finalizer(e) => match e.as_ref() {
                finalizer::Error::ApplyFailed(inner) | finalizer::Error::CleanupFailed(inner) => {
                    inner.inner()
                }
                _ => self,
            },
            other => other,
        }
    }
}

fn finalizer_message(error: &finalizer::Error<Error>) -> String {
    match error {
        finalizer::Error::ApplyFailed(inner) | finalizer::Error::CleanupFailed(inner) => {
            inner.to_string()
        }
        finalizer::Error::AddFinalizer(e) => {
            format!("cannot add the finalizer: {}", crate::k8s::plain(e))
        }
        finalizer::Error::RemoveFinalizer(e) => {
            format!("cannot remove the finalizer: {}", crate::k8s::plain(e))
        }
        other => other.to_string(),
    }
}

/// What a person reads about `error` on a condition or an event: its reason and one line
/// of at most 1 KiB (see [`one_line`]), never a `Debug` dump or a credential.
pub fn describe(error: &Error) -> (Reason, String) {
    use crate::api::broker::Refusal;
    use crate::k8s::KubeError;
    let reason = match error.inner() {
        Error::InvalidSpec(_) => Reason::InvalidSpec,
        Error::Broker(e) => e.condition_reason(),
        Error::Kube(KubeError::SecretMissing { .. }) => Reason::SecretMissing,
        Error::Kube(KubeError::SecretInvalid { .. }) => Reason::InvalidBrokerSecret,
        Error::Kube(KubeError::BrokerMissing { .. }) => Reason::BrokerNotFound,
        Error::Kube(KubeError::BrokerRefused(Refusal::VhostNotGranted { .. })) => {
            Reason::VhostNotGranted
        }
        Error::Kube(KubeError::BrokerRefused(_)) => Reason::BrokerNotAdmitted,
        Error::Kube(KubeError::BrokerModeDisabled { .. }) => Reason::BrokerModeDisabled,
        Error::Kube(KubeError::Api { .. }) | Error::Finalizer(_) => Reason::KubernetesAPIFailed,
    };
    (reason, one_line(&error.to_string()))
}

/// Pipelines reconciled at once by default. Most of a reconcile is waiting, on the API server
/// (whose calls are bounded on their own, [`API_CALLS_IN_FLIGHT`]) or on its vhost's batch,
/// so this is far above the broker's own concurrency ([`BROKER_CONCURRENCY`]): a burst of new
/// pipelines reaches its vhost's batch together and is policies-first across the burst, not
/// eight pipelines at a time (a burst larger than this is split, and the later part writes
/// its policies after the first part's queues exist: seconds per policy on a vhost of
/// thousands of queues). A reconcile in flight holds its plan and its share of a snapshot:
/// the first sync of 2,000 pipelines peaked at 269 MiB RSS against 30 MiB of heap after it
/// (`make bench-fleet BROKER=rabbit PIPELINES=2000`), about 120 KiB per reconcile.
pub const DEFAULT_CONCURRENCY: u16 = 2048;

/// API calls the reconciles make at once, whatever their number: a burst of hundreds of new
/// pipelines in flight must not become hundreds of concurrent requests (a real API server's
/// flow control queues or refuses them with 429).
pub const API_CALLS_IN_FLIGHT: usize = 32;

/// The client of the reconciles: at most [`API_CALLS_IN_FLIGHT`] calls at once.
pub fn reconcile_client(config: kube::Config) -> Result<Client, kube::Error> {
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&tower::limit::ConcurrencyLimitLayer::new(
            API_CALLS_IN_FLIGHT,
        ))
        .build())
}

/// Operator settings (flags and environment).
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// Namespaces to watch; empty means all.
    pub namespaces: Vec<String>,
    /// A converged pipeline is looked at again (drift repair, live counts) this often.
    pub resync: Duration,
    /// Pipelines reconciled at once (their Kubernetes calls; their broker work goes through
    /// one batch per vhost, `broker_concurrency` pipelines at a time).
    pub concurrency: u16,
    /// Pipelines of one vhost whose broker work runs at once within a batch.
    pub broker_concurrency: usize,
    /// Bound on every single broker call.
    pub broker_timeout: Duration,
    /// How long a deleted pipeline waits for an unreachable broker before it is released.
    pub cleanup_timeout: Duration,
    /// Name reported on events (reportingInstance).
    pub identity: String,
    /// Which broker references pipelines may use, and the operator's namespace.
    pub brokers: crate::k8s::BrokerAccess,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            resync: Duration::from_secs(300),
            concurrency: DEFAULT_CONCURRENCY,
            broker_concurrency: BROKER_CONCURRENCY,
            broker_timeout: crate::broker::DEFAULT_CALL_TIMEOUT,
            cleanup_timeout: Duration::from_secs(600),
            identity: "msgpipe".into(),
            brokers: crate::k8s::BrokerAccess::default(),
        }
    }
}

/// What every reconcile shares; `B` is the broker client (RabbitMQ, or in-memory in tests).
pub struct Context<B: PooledBroker = RabbitBroker> {
    /// For the reconciles' calls (in the operator: at most [`API_CALLS_IN_FLIGHT`] at once).
    pub client: Client,
    /// For the controller's watches, which stay open (by default the same client).
    pub watch_client: Client,
    /// Shared recorder: repeats of one failure become one Event with a growing series count.
    pub recorder: Recorder,
    reporter: Reporter,
    pub brokers: Arc<BrokerPool<B>>,
    pub metrics: Arc<Metrics>,
    pub config: OperatorConfig,
    failures: Mutex<HashMap<String, u32>>,
    /// When each pipeline last wrote to its broker: its next snapshot must be younger.
    last_writes: Mutex<HashMap<String, std::time::Instant>>,
    /// ConfigMaps this operator has just written, until their watch event comes back: key
    /// and data, hashed (see [`Context::is_own_echo`]).
    config_map_echoes: Mutex<HashMap<u64, u64>>,
    /// Queue migrations under way, one task per pipeline; dropped with the context.
    pub migrations: migration::Migrations,
}

impl Context<RabbitBroker> {
    pub fn new(client: Client, metrics: Arc<Metrics>, config: OperatorConfig) -> Self {
        let brokers = BrokerPool::new(config.broker_timeout, config.broker_concurrency);
        Context::with_brokers(client, metrics, config, brokers)
    }
}

impl<B: PooledBroker> Context<B> {
    /// A context over `brokers` (e.g. a pool of [`crate::broker::MemoryBroker`]s).
    pub fn with_brokers(
        client: Client,
        metrics: Arc<Metrics>,
        config: OperatorConfig,
        brokers: BrokerPool<B>,
    ) -> Self {
        let reporter = Reporter {
            controller: "msgpipe".into(),
            instance: Some(config.identity.clone()),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter.clone()),
            reporter,
            brokers: Arc::new(brokers),
            watch_client: client.clone(),
            client,
            metrics,
            config,
            failures: Mutex::new(HashMap::new()),
            last_writes: Mutex::new(HashMap::new()),
            config_map_echoes: Mutex::new(HashMap::new()),
            migrations: migration::Migrations::default(),
        }
    }

    /// Publishes an event on the pipeline; a failure to publish is logged, never fatal.
    /// Repeats (same reason) within minutes are folded into one Event's series.
    pub async fn event(
        &self,
        pipeline: &MessagePipeline,
        kind: EventType,
        reason: Reason,
        note: &str,
    ) {
        publish(&self.recorder, pipeline, kind, reason, note).await;
    }

    /// Publishes a failure as a Warning (reason and message from [`describe`]); returns
    /// them, for the status.
    pub async fn failure_event(
        &self,
        pipeline: &MessagePipeline,
        error: &Error,
    ) -> (Reason, String) {
        let (reason, message) = describe(error);
        self.event(pipeline, EventType::Warning, reason, &message)
            .await;
        (reason, message)
    }

    /// Publishes one Event per broker change. A fresh recorder, because folding would keep
    /// only the first change's note ("created queue a") under a count of all of them.
    pub async fn change_event(
        &self,
        pipeline: &MessagePipeline,
        kind: EventType,
        reason: Reason,
        note: &str,
    ) {
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        publish(&recorder, pipeline, kind, reason, note).await;
    }

    pub(crate) fn last_write(&self, key: &str) -> Option<std::time::Instant> {
        self.last_writes.lock().ok()?.get(key).copied()
    }

    pub(crate) fn wrote_now(&self, key: &str) {
        if let Ok(mut writes) = self.last_writes.lock() {
            // A write older than any usable snapshot constrains nothing: forget it, so
            // deleted pipelines do not accumulate here.
            writes.retain(|_, at| at.elapsed() < SNAPSHOT_MAX_REUSE);
            writes.insert(key.to_string(), std::time::Instant::now());
        }
    }

    /// Remembers the data of a ConfigMap this operator is about to write.
    pub(crate) fn writing_config_map(&self, config_map: &ConfigMap) {
        if let Ok(mut echoes) = self.config_map_echoes.lock() {
            echoes.insert(object_key(config_map), hash_of(&config_map.data));
        }
    }

    /// Whether a watch event of an owned ConfigMap is the echo of this operator's own write
    /// (the data it wrote): no reason to reconcile its pipeline again. Each write lets one
    /// echo through; anything else (someone else's edit, a deletion) triggers.
    fn is_own_echo(&self, config_map: &ConfigMap) -> bool {
        let Ok(mut echoes) = self.config_map_echoes.lock() else {
            return false;
        };
        let key = object_key(config_map);
        if echoes.get(&key) == Some(&hash_of(&config_map.data)) {
            echoes.remove(&key);
            return true;
        }
        false
    }

    fn forget_failures(&self, key: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(key);
        }
    }

    /// Next delay after one more failure of `key`: 5 s doubling, capped at 5 minutes.
    fn backoff(&self, key: &str) -> Duration {
        let attempts = self.failures.lock().map_or(0, |mut failures| {
            let n = failures.entry(key.to_string()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        });
        backoff_delay(attempts)
    }
}

async fn publish(
    recorder: &Recorder,
    pipeline: &MessagePipeline,
    kind: EventType,
    reason: Reason,
    note: &str,
) {
    let event = Event {
        type_: kind,
        reason: reason.into(),
        // The events API limits notes to 1 KiB.
        note: Some(one_line(note)),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, &pipeline.object_ref(&())).await {
        warn!(pipeline = %pipeline.name_any(), %error, "cannot publish event");
    }
}

/// 5 s, 10 s, 20 s, ... capped at 300 s.
pub fn backoff_delay(attempts: u32) -> Duration {
    let exponent = attempts.saturating_sub(1).min(6);
    Duration::from_secs((5u64 << exponent).min(300))
}

/// Retry policy: an invalid spec waits for a change; anything else backs off per object.
pub fn error_policy<B: PooledBroker>(
    pipeline: Arc<MessagePipeline>,
    error: &Error,
    ctx: Arc<Context<B>>,
) -> Action {
    if matches!(error.inner(), Error::InvalidSpec(_)) {
        return Action::await_change();
    }
    let key = format!(
        "{}/{}",
        pipeline.namespace().unwrap_or_default(),
        pipeline.name_any()
    );
    Action::requeue(ctx.backoff(&key))
}

/// What makes a pipeline worth reconciling again: its spec (generation) and deletion.
/// Status writes and finalizers (our own writes) do not, so neither the status patch nor
/// the finalizer a new pipeline gets in its first pass brings it back (a finalizer removed
/// by someone else is put back by the next resync).
fn pipeline_trigger(pipeline: &MessagePipeline) -> Option<u64> {
    let meta = pipeline.meta();
    Some(hash_of((
        meta.generation,
        meta.deletion_timestamp.is_some(),
    )))
}

fn hash_of(value: impl Hash) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

fn object_key(object: &impl Resource) -> u64 {
    hash_of((
        object.meta().namespace.as_deref(),
        object.meta().name.as_deref(),
    ))
}

/// What the controller's cache keeps of a pipeline: not its managedFields (a real server
/// sends every manager's field set: often larger than the spec) nor `kubectl apply`'s copy
/// of the whole object in an annotation; nothing reads them, and at 10,000 pipelines they
/// were most of the cache.
pub fn slim(object: &mut impl Resource) {
    let metadata = object.meta_mut();
    metadata.managed_fields = None;
    if let Some(annotations) = metadata.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The objects a related watch (owned ConfigMaps, Secrets, MessageBrokers) reports changed
/// or deleted after its list. The list itself (at start, and again when a watch lost its
/// place) would bring back every pipeline those objects name, which the pipelines' own list
/// has just brought already: at start that was a second reconcile of every pipeline (and a
/// second status write, the first one's echo not in the cache yet). A change missed while a
/// watch was relisting is picked up by the pipeline's resync.
fn changes_only<K>(
    events: impl futures_util::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
) -> impl futures_util::Stream<Item = Result<K, watcher::Error>> {
    events.filter_map(|event| {
        futures_util::future::ready(match event {
            Ok(watcher::Event::Apply(object) | watcher::Event::Delete(object)) => Some(Ok(object)),
            Ok(watcher::Event::Init | watcher::Event::InitApply(_) | watcher::Event::InitDone) => {
                None
            }
            Err(error) => Some(Err(error)),
        })
    })
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Secrets listed per page. A page is held and parsed whole, and a cluster may hold tens of
/// thousands of Secrets the operator does not use: at kube's default of 500 the first list
/// of 10,000 raised the peak RSS by 4 MiB (`make bench-memory`, issue 23).
const SECRET_PAGE: u32 = 50;

/// Runs one controller over `namespace` (None: all namespaces) until `shutdown` resolves.
/// `B` is the broker client: RabbitMQ, or in-memory in tests.
pub async fn run_controller<B: PooledBroker>(
    ctx: Arc<Context<B>>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.watch_client.clone();
    let ns = namespace.as_deref();
    // Untyped, so that one object msgpipe cannot decode fails neither the list nor the watch.
    let resource = ApiResource::erase::<MessagePipeline>(&());
    let pipelines: Api<DynamicObject> = match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let (bad_tx, bad_rx) = tokio::sync::mpsc::unbounded_channel();
    let retry = bad_tx.downgrade();
    let report_invalid = invalid::run(ctx.clone(), resource, bad_rx, retry);
    let typed = watcher(pipelines, watcher::Config::default().any_semantic())
        .modify(slim)
        .filter_map(move |event| {
            futures_util::future::ready(match event {
                Ok(event) => invalid::split(event, &bad_tx).map(Ok),
                Err(error) => Some(Err(error)),
            })
        });
    let (reader, writer) = reflector::store();
    let trigger = reflector(writer, typed)
        .default_backoff()
        .touched_objects()
        .predicate_filter(pipeline_trigger, Default::default());
    let config_maps = scoped::<ConfigMap>(&client, ns);
    let managed = format!("{}={}", MANAGED_BY_LABEL.0, MANAGED_BY_LABEL.1);
    let config = controller::Config::default()
        .concurrency(ctx.config.concurrency)
        .debounce(Duration::from_millis(200));
    let echoes = ctx.clone();
    let owned = changes_only(
        watcher(config_maps, watcher::Config::default().labels(&managed))
            .default_backoff()
            .filter(move |event| {
                let echo = matches!(event, Ok(watcher::Event::Apply(config_map)) if echoes.is_own_echo(config_map));
                futures_util::future::ready(!echo)
            }),
    );
    let mut controller = Controller::for_stream(trigger, reader.clone()).owns_stream(owned);
    let access = &ctx.config.brokers;
    let brokers = access
        .message_brokers
        .then(reflector::store::<MessageBroker>);
    if let Some((store, _)) = &brokers {
        access.cache.set(store.clone());
    }
    // Secrets: metadata only (never their data in memory). Tenant Secrets are watched only
    // when pipelines may name them; the operator's own namespace (MessageBrokers' Secrets)
    // on its own watch unless the tenant watch already covers every namespace.
    let mut secret_scopes = Vec::new();
    if access.secret_refs {
        secret_scopes.push(scoped::<PartialObjectMeta<Secret>>(&client, ns));
    }
    if access.message_brokers && !(access.secret_refs && ns.is_none()) {
        secret_scopes.push(Api::namespaced(client.clone(), &access.operator_namespace));
    }
    for scope in secret_scopes {
        let secrets = changes_only(
            watcher(scope, watcher::Config::default().page_size(SECRET_PAGE)).default_backoff(),
        );
        let (pipelines, brokers) = (reader.clone(), brokers.as_ref().map(|(r, _)| r.clone()));
        let own_namespace = access.operator_namespace.clone();
        controller = controller.watches_stream(secrets, move |secret| {
            pipelines_using_secret(&pipelines, brokers.as_ref(), &own_namespace, &secret)
        });
    }
    if let Some((_, writer)) = brokers {
        // A MessageBroker changed (endpoint, Secret, tenants): its pipelines look again.
        let changes = changes_only(
            reflector(
                writer,
                watcher(
                    Api::<MessageBroker>::all(client.clone()),
                    watcher::Config::default(),
                ),
            )
            .default_backoff(),
        );
        let pipelines = reader.clone();
        controller = controller.watches_stream(changes, move |broker| {
            let name = broker.name_any();
            pipelines_where(&pipelines, |p| {
                p.spec
                    .broker
                    .broker_ref
                    .as_ref()
                    .is_some_and(|r| r.name == name)
            })
        });
    }
    let controller = controller
        .with_config(config)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => debug!(pipeline = %object, "reconciled"),
                Err(error) => debug!(%error, "controller event"),
            }
        });
    // The controller owns the last strong sender: when it stops, the reporter stops too.
    futures_util::future::join(controller, report_invalid).await;
}

/// The pipelines in `store` for which `keep` holds, as controller triggers.
fn pipelines_where(
    store: &reflector::Store<MessagePipeline>,
    keep: impl Fn(&MessagePipeline) -> bool,
) -> Vec<ObjectRef<MessagePipeline>> {
    store
        .state()
        .into_iter()
        .filter(|p| keep(p))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// The pipelines a changed Secret concerns: those of its namespace that name it
/// (`secretRef`), and, for a Secret of the operator's namespace, those that name a
/// MessageBroker whose credentials it holds (a rotation reconnects them within seconds).
fn pipelines_using_secret(
    pipelines: &reflector::Store<MessagePipeline>,
    brokers: Option<&reflector::Store<MessageBroker>>,
    own_namespace: &str,
    secret: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<MessagePipeline>> {
    let namespace = secret.namespace();
    let name = secret.name_any();
    let using: Vec<String> = match brokers {
        Some(brokers) if namespace.as_deref() == Some(own_namespace) => brokers
            .state()
            .into_iter()
            .filter(|b| b.spec.secret_ref.name == name)
            .map(|b| b.name_any())
            .collect(),
        _ => Vec::new(),
    };
    pipelines_where(pipelines, |p| {
        let names_secret = p.namespace() == namespace
            && p.spec
                .broker
                .secret_ref
                .as_ref()
                .is_some_and(|s| s.name == name);
        let names_broker = p
            .spec
            .broker
            .broker_ref
            .as_ref()
            .is_some_and(|r| using.contains(&r.name));
        names_secret || names_broker
    })
}

/// Flags of `msgpipe operator` beyond [`OperatorConfig`].
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub listen: SocketAddr,
    pub leader_election: bool,
    pub lease_name: String,
    pub lease_namespace: String,
}

/// Runs the operator until SIGTERM/SIGINT (or until leadership is lost).
pub async fn run(config: OperatorConfig, options: RunOptions) -> anyhow::Result<()> {
    use anyhow::Context as _;
    crate::broker::install_crypto_provider();
    let metrics = Arc::new(Metrics::default());
    let health = server::Health::default();
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("cannot listen on {}", options.listen))?;
    tokio::spawn(server::serve(listener, metrics.clone(), health.clone()));
    let kube_config = kube::Config::infer().await.context(
        "cannot configure the Kubernetes client (in-cluster service account or KUBECONFIG)",
    )?;
    let watch_client =
        Client::try_from(kube_config.clone()).context("cannot make the Kubernetes client")?;
    let client = reconcile_client(kube_config).context("cannot make the Kubernetes client")?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(server::RunState::Running);
    tokio::spawn(server::stop_on_signal(stop_tx.clone()));
    let mut leadership = None;
    if options.leader_election {
        // A standby replica is healthy and ready: it is waiting, by design.
        health.set_ready(true);
        match server::Leadership::acquire(&client, &options, &config.identity, stop_rx.clone())
            .await?
        {
            Some(lease) => {
                lease.stop_when_lost(stop_tx.clone());
                leadership = Some(lease);
            }
            None => return Ok(()), // asked to stop while waiting
        }
    }
    let mut ctx = Context::new(client, metrics, config.clone());
    ctx.watch_client = watch_client;
    let ctx = Arc::new(ctx);
    health.set_ready(true);
    let scopes: Vec<Option<String>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        config.namespaces.iter().cloned().map(Some).collect()
    };
    let replays = Arc::new(replay::ReplayContext::new(
        ctx.client.clone(),
        ctx.metrics.clone(),
        replay::ReplaySettings {
            broker_timeout: config.broker_timeout,
            brokers: config.brokers.clone(),
            ..replay::ReplaySettings::default()
        },
        &config.identity,
    ));
    let stopped = |mut stop: tokio::sync::watch::Receiver<server::RunState>| async move {
        let _ = stop
            .wait_for(|state| *state != server::RunState::Running)
            .await;
    };
    let controllers = scopes.iter().cloned().map(|scope| {
        futures_util::FutureExt::boxed(run_controller(ctx.clone(), scope, stopped(stop_rx.clone())))
    });
    let replay_controllers = scopes.clone().into_iter().map(|scope| {
        futures_util::FutureExt::boxed(replay::run_replay_controller(
            replays.clone(),
            scope,
            stopped(stop_rx.clone()),
        ))
    });
    let broker_status = config.brokers.message_brokers.then(|| {
        futures_util::FutureExt::boxed(broker_status::run_broker_status(
            ctx.clone(),
            stopped(stop_rx.clone()),
        ))
    });
    futures_util::future::join_all(controllers.chain(replay_controllers).chain(broker_status))
        .await;
    ctx.brokers.close().await;
    if let Some(lease) = leadership {
        lease.release().await;
    }
    if *stop_rx.borrow() == server::RunState::LostLeadership {
        anyhow::bail!("lost the leader lease; exiting so that a fresh start campaigns again");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_keeps_no_managed_fields_nor_the_last_applied_copy_but_every_other_annotation() {
        let mut object: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "msgpipe.io/v1alpha1", "kind": "MessagePipeline",
            "metadata": {
                "name": "orders", "namespace": "shop", "generation": 3,
                "annotations": {
                    LAST_APPLIED: "{\"apiVersion\":\"msgpipe.io/v1alpha1\"}",
                    "msgpipe.io/adopted": "queues=orders",
                },
                "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update",
                                   "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}],
            },
            "spec": {"queue": {"name": "orders"}},
        }))
        .expect("object");
        slim(&mut object);
        assert_eq!(object.metadata.managed_fields, None);
        let annotations = object.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(annotations.len(), 1, "{annotations:?}");
        assert_eq!(annotations["msgpipe.io/adopted"], "queues=orders");
        assert_eq!(object.metadata.generation, Some(3));
        assert_eq!(object.data["spec"]["queue"]["name"], "orders");
    }

    fn pipeline(namespace: &str, name: &str, broker: serde_json::Value) -> MessagePipeline {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "msgpipe.io/v1alpha1", "kind": "MessagePipeline",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"broker": broker}
        }))
        .expect("pipeline")
    }

    fn secret(namespace: &str, name: &str) -> PartialObjectMeta<Secret> {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace}
        }))
        .expect("secret metadata")
    }

    /// A rotated Secret re-reconciles exactly the pipelines that use it: those naming it in
    /// their namespace, and, in the operator's namespace, those of every MessageBroker whose
    /// credentials it holds.
    #[test]
    fn a_changed_secret_wakes_the_pipelines_that_use_it_and_no_other() {
        let (pipelines, mut write_pipelines) = reflector::store::<MessagePipeline>();
        for p in [
            pipeline(
                "a",
                "own",
                serde_json::json!({"secretRef": {"name": "rabbit"}}),
            ),
            pipeline(
                "b",
                "other-ns",
                serde_json::json!({"secretRef": {"name": "rabbit"}}),
            ),
            pipeline(
                "a",
                "shared",
                serde_json::json!({"brokerRef": {"name": "shared"}}),
            ),
            pipeline(
                "c",
                "elsewhere",
                serde_json::json!({"brokerRef": {"name": "other"}}),
            ),
        ] {
            write_pipelines.apply_watcher_event(&watcher::Event::Apply(p));
        }
        let (brokers, mut write_brokers) = reflector::store::<MessageBroker>();
        for (name, secret_name) in [("shared", "platform-admin"), ("other", "other-admin")] {
            let broker: MessageBroker = serde_json::from_value(serde_json::json!({
                "apiVersion": "msgpipe.io/v1alpha1", "kind": "MessageBroker",
                "metadata": {"name": name},
                "spec": {"uri": "amqp://rabbit:5672", "secretRef": {"name": secret_name}}
            }))
            .expect("broker");
            write_brokers.apply_watcher_event(&watcher::Event::Apply(broker));
        }
        let woken = |namespace: &str, name: &str| {
            let mut names: Vec<String> = pipelines_using_secret(
                &pipelines,
                Some(&brokers),
                "msgpipe-system",
                &secret(namespace, name),
            )
            .into_iter()
            .map(|r| r.name)
            .collect();
            names.sort();
            names
        };
        assert_eq!(woken("a", "rabbit"), ["own"]);
        assert_eq!(woken("msgpipe-system", "platform-admin"), ["shared"]);
        assert_eq!(woken("msgpipe-system", "unrelated"), Vec::<String>::new());
        // A tenant Secret named like a broker's Secret wakes nothing through the broker.
        assert_eq!(woken("a", "platform-admin"), Vec::<String>::new());
    }

    fn forbidden() -> kube::Error {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403,
            "reason": "Forbidden",
            "message": "prometheusrules.monitoring.coreos.com \"notes-alerts\" is forbidden: User \"system:serviceaccount:msgpipe-system:msgpipe\" cannot delete resource \"prometheusrules\" in API group \"monitoring.coreos.com\" in the namespace \"notes-app\"",
            "details": {"name": "notes-alerts", "group": "monitoring.coreos.com", "kind": "prometheusrules"}
        }))
        .expect("status");
        kube::Error::Api(Box::new(status))
    }

    #[test]
    fn a_forbidden_call_reads_as_the_servers_words_and_the_finalizer_wrapper_is_dropped() {
        let kube_error = crate::k8s::KubeError::Api {
            operation: "delete PrometheusRule notes-app/notes-alerts".into(),
            source: forbidden(),
        };
        let error = Error::Finalizer(Box::new(finalizer::Error::ApplyFailed(Error::Kube(
            kube_error,
        ))));
        let (reason, message) = describe(&error);
        assert_eq!(reason, Reason::KubernetesAPIFailed);
        assert!(
            message.starts_with("cannot delete PrometheusRule notes-app/notes-alerts: forbidden: "),
            "{message}"
        );
        assert!(
            message.contains("cannot delete resource \"prometheusrules\""),
            "{message}"
        );
        assert!(message.contains("RBAC"), "{message}");
        for shown in [message.clone(), error.to_string()] {
            assert!(!shown.contains("Status {"), "{shown}");
            assert!(!shown.contains("failed to apply object"), "{shown}");
            assert!(shown.len() <= 1024 && !shown.contains('\n'), "{shown}");
        }
    }

    #[test]
    fn a_broker_error_keeps_its_reason_through_the_finalizer() {
        let error = Error::Finalizer(Box::new(finalizer::Error::ApplyFailed(Error::Broker(
            BrokerError::AccessRefused {
                endpoint: "amqp://app@h:5672".into(),
                user: "app".into(),
                operation: "write policy p".into(),
            },
        ))));
        assert_eq!(describe(&error).0, Reason::BrokerAccessRefused);
        assert!(matches!(error.inner(), Error::Broker(_)));
    }

    #[test]
    fn backoff_doubles_from_five_seconds_and_caps_at_five_minutes() {
        let delays: Vec<u64> = (1..=9).map(|n| backoff_delay(n).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }
}
