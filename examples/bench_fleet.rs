//! Issue 25's fleet: the operator's controller (`run_controller`, as `msgpipe operator` runs
//! it) over N pipelines spread over V vhosts, against the mocked Kubernetes API
//! (tests/operator/fake_api.rs, in a child process so its objects are not counted, charging
//! every call what a Kubernetes 1.34 API server was measured to charge) and either a real
//! RabbitMQ node (`--broker rabbit`) or the in-memory broker (`--broker memory`, for fleets
//! larger than one node on this machine holds). It measures:
//!
//! - the first sync: the operator starts against a cluster that already holds the N
//!   pipelines (none converged), until every one is Ready; RSS then;
//! - a resync of all N (the controller's own requeue, `--resync`): writes (target 0);
//!   steady-state RSS after it;
//! - one spec change among the N (a new `maxAttempts`: one policy write), from the user's
//!   apply to Ready for the new generation, and, on a real node, RabbitMQ's own cost for a
//!   policy in that vhost in the same run;
//! - a restart: the controller stopped and a new one (new context, empty caches) started,
//!   until every pipeline has been verified against the broker again (Ready recorded by its
//!   own reconcile), counting writes (target 0); beside it, in the same run, the least work a
//!   verification needs: one paged list of the pipelines and one snapshot of every vhost.
//!
//! ```text
//! cargo run --release --example bench_fleet -- --pipelines 10000 --vhosts 20 --broker memory
//! cargo run --release --example bench_fleet -- --pipelines 2000 --vhosts 20 --broker rabbit
//! ```

#[path = "../tests/operator/fake_api.rs"]
#[allow(dead_code)] // the benchmark serves the fake's cluster, not its call assertions
mod fake_api;
#[path = "support/mod.rs"]
mod support;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use fake_api::FakeApi;
use futures_util::{StreamExt, stream};
use kube::api::{Api, ListParams};
use msgpipe::api::MessagePipeline;
use msgpipe::broker::{BrokerApi, BrokerEndpoint, MemoryBroker, RabbitBroker};
use msgpipe::controller::{
    BrokerPool, Context, Metrics, OperatorConfig, PooledBroker, SNAPSHOT_MAX_REUSE, run_controller,
};
use serde_json::{Value, json};
use support::{ApiProcess, delete_vhost, fresh_vhost_named, kib_to_mib, status_kib, template};

const NAMESPACE: &str = "fleet";

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    pipelines: usize,
    #[arg(long, default_value_t = 20)]
    vhosts: usize,
    /// `memory` (the in-memory broker) or `rabbit` (a real node, `--node`/`--port`).
    #[arg(long, default_value = "memory")]
    broker: String,
    /// Queue type of the fleet (msgpipe's default is quorum).
    #[arg(long, default_value = "quorum")]
    queue_type: String,
    /// What each call to the mocked API costs: `real` (a 1.34 server's p50/p90 per call
    /// kind, log-normal jitter) or `none`.
    #[arg(long, default_value = "real")]
    api_latency: String,
    /// The controller's resync period for this run, in seconds (the operator's default is
    /// 300; shorter here so the resync is measured without waiting five minutes).
    #[arg(long, default_value_t = 60)]
    resync: u64,
    /// Reconciles at once (default: the operator's).
    #[arg(long, default_value_t = usize::from(msgpipe::controller::DEFAULT_CONCURRENCY))]
    concurrency: usize,
    #[arg(long, default_value_t = msgpipe::controller::BROKER_CONCURRENCY)]
    broker_concurrency: usize,
    #[arg(long, default_value = "msgpipe-fleet")]
    node: String,
    #[arg(long, default_value_t = 5719)]
    port: u16,
    /// Internal: serve the mocked Kubernetes API holding the fleet (port on stdout).
    #[arg(long, hide = true)]
    serve_api: bool,
}

impl Args {
    fn mgmt(&self) -> String {
        format!("http://127.0.0.1:{}", u32::from(self.port) + 10000)
    }

    fn vhost(&self, i: usize) -> String {
        format!("fleet-{:02}", i % self.vhosts.max(1))
    }

    fn endpoint(&self, vhost: &str) -> anyhow::Result<BrokerEndpoint> {
        Ok(BrokerEndpoint::new(
            &format!("amqp://guest:guest@127.0.0.1:{}/{vhost}", self.port),
            Some(&self.mgmt()),
            None,
        )?)
    }
}

fn name(i: usize) -> String {
    format!("pipe-{i:05}")
}

fn path(i: usize) -> String {
    format!(
        "/apis/msgpipe.io/v1alpha1/namespaces/{NAMESPACE}/messagepipelines/{}",
        name(i)
    )
}

/// Pipeline `i`: the seed article's pipeline (four retry tiers, a dead-letter queue, alerts,
/// client flags) under its own names, in its vhost, through the vhost's Secret.
fn pipeline(args: &Args, template: &Value, i: usize) -> Value {
    let mut object = template.clone();
    let name = name(i);
    let vhost = args.vhost(i);
    object["metadata"] = json!({
        "name": name, "namespace": NAMESPACE, "uid": format!("00000000-0000-4000-8000-{i:012}"),
        "generation": 1, "creationTimestamp": "2026-12-06T09:00:00Z"
    });
    object["spec"]["queue"]["name"] = json!(name);
    object["spec"]["queue"]["type"] = json!(args.queue_type);
    for key in ["exchange", "routingKey"] {
        object["spec"]["queue"]
            .as_object_mut()
            .map(|q| q.remove(key));
    }
    object["spec"]["deadLetter"] = json!({"retention": "14d"});
    object["spec"]["broker"] =
        json!({"secretRef": {"name": format!("rabbitmq-{vhost}")}, "vhost": vhost});
    // What a real server keeps beside an object applied with `kubectl apply`: its copy of the
    // applied object and every manager's field set.
    let applied = json!({"apiVersion": object["apiVersion"], "kind": object["kind"],
                         "metadata": {"name": name, "namespace": NAMESPACE}, "spec": object["spec"]});
    object["metadata"]["annotations"] =
        json!({"kubectl.kubernetes.io/last-applied-configuration": format!("{applied}\n")});
    object["metadata"]["managedFields"] = json!([
        {"manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "msgpipe.io/v1alpha1",
         "time": "2026-12-06T09:00:00Z", "fieldsType": "FieldsV1",
         "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}}},
                      "f:spec": fields_of(&object["spec"])}},
    ]);
    object
}

/// A managedFields field set (`f:` keys) covering every field of `value`.
fn fields_of(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut fields = serde_json::Map::new();
            fields.insert(".".into(), json!({}));
            for (key, value) in map {
                fields.insert(format!("f:{key}"), fields_of(value));
            }
            Value::Object(fields)
        }
        _ => json!({}),
    }
}

/// The child: the fleet's pipelines (already in the cluster, as a list returns them) and one
/// Secret per vhost.
async fn serve_api(args: &Args) -> anyhow::Result<()> {
    let api = FakeApi::default();
    api.set_crd(true);
    let template = template()?;
    let mut objects = Vec::with_capacity(args.pipelines + args.vhosts);
    for v in 0..args.vhosts {
        let vhost = args.vhost(v);
        objects.push((
            format!("/api/v1/namespaces/{NAMESPACE}/secrets/rabbitmq-{vhost}"),
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": format!("rabbitmq-{vhost}"), "namespace": NAMESPACE},
                   "stringData": {"uri": format!("amqp://guest:guest@127.0.0.1:{}/{vhost}", args.port),
                                  "managementUri": args.mgmt()}}),
        ));
    }
    for i in 0..args.pipelines {
        objects.push((path(i), pipeline(args, &template, i)));
    }
    api.preload(objects);
    if args.api_latency == "real" {
        api.set_latency(fake_api::Latency::real_server());
    }
    support::serve(api).await
}

// The operator's allocator, as `msgpipe operator` has it.
msgpipe::use_jemalloc!();

fn main() -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    support::init_tracing();
    if args.serve_api {
        return serve_api(&args).await;
    }
    msgpipe::broker::install_crypto_provider();
    match args.broker.as_str() {
        "memory" => {
            let mut broker = MemoryBroker::new("amqp://msgpipe@rabbit.invalid:5672");
            for v in 0..args.vhosts {
                broker = broker.with_vhost(&args.vhost(v), 4);
            }
            let broker = Arc::new(broker);
            println!(
                "bench-fleet: {} pipelines over {} vhosts, in-memory broker, mocked Kubernetes API (latency: {})",
                args.pipelines, args.vhosts, args.api_latency
            );
            let connect = broker.clone();
            let figures = measure(
                &args,
                move |config: &OperatorConfig| {
                    let broker = connect.clone();
                    BrokerPool::with_connector(
                        config.broker_timeout,
                        config.broker_concurrency,
                        Box::new(move |_, _| Ok(broker.clone())),
                    )
                },
                |vhost| {
                    let broker = broker.clone();
                    async move { Ok(broker.snapshot(&vhost).await?) }
                },
            )
            .await?;
            figures.print(&args, None);
            // The in-memory broker lives in this process: what its state weighs, to take
            // from the RSS figures above (a real broker is another process).
            let held = heap_allocated();
            let others = Arc::strong_count(&broker) - 1;
            drop(broker);
            println!(
                "  of which the in-memory broker's own state (freed when dropped; {others} other holders left): {:.1} MiB",
                held.saturating_sub(heap_allocated()) as f64 / 1024.0 / 1024.0
            );
        }
        "rabbit" => {
            let status = std::process::Command::new("scripts/test-broker.sh")
                .args(["ensure", &args.node, &args.port.to_string()])
                .status()
                .context("scripts/test-broker.sh")?;
            ensure!(status.success(), "broker node did not start");
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(900))
                .build()?;
            let mgmt = args.mgmt();
            let version = support::mgmt_get(&http, &format!("{mgmt}/api/overview")).await?
                ["rabbitmq_version"]
                .as_str()
                .unwrap_or("?")
                .to_string();
            // An earlier run's vhosts (thousands of queues) go first.
            for name in support::vhosts(&http, &mgmt).await? {
                if name.starts_with("fleet-") {
                    println!("deleting vhost {name}, left by an earlier run");
                    delete_vhost(&http, &mgmt, &name).await;
                }
            }
            for v in 0..args.vhosts {
                fresh_vhost_named(&http, &mgmt, &args.vhost(v)).await?;
            }
            println!(
                "bench-fleet: {} pipelines over {} vhosts, RabbitMQ {version} at 127.0.0.1:{} ({} queues), mocked Kubernetes API (latency: {})",
                args.pipelines, args.vhosts, args.port, args.queue_type, args.api_latency
            );
            let readers: Arc<Vec<RabbitBroker>> = Arc::new(
                (0..args.vhosts)
                    .map(|v| {
                        Ok(RabbitBroker::new(
                            args.endpoint(&args.vhost(v))?,
                            Duration::from_secs(600),
                        )?)
                    })
                    .collect::<anyhow::Result<_>>()?,
            );
            let vhosts = args.vhosts;
            let figures = measure(
                &args,
                |config: &OperatorConfig| {
                    BrokerPool::new(config.broker_timeout, config.broker_concurrency)
                },
                |vhost| {
                    let readers = readers.clone();
                    async move {
                        let v: usize = vhost.trim_start_matches("fleet-").parse()?;
                        Ok(readers[v % vhosts].snapshot(&vhost).await?)
                    }
                },
            )
            .await?;
            // RabbitMQ's own cost for one policy in a vhost of the fleet, same run: a policy
            // that matches nothing, written and removed (the node checks it against every
            // queue of the vhost either way).
            let vhost = args.vhost(args.pipelines.saturating_sub(1));
            let url = format!("{mgmt}/api/policies/{vhost}/bench-fleet-raw");
            let started = Instant::now();
            http.put(&url)
                .basic_auth("guest", Some("guest"))
                .json(
                    &json!({"pattern": "^bench-fleet-raw$", "apply-to": "queues", "priority": 0,
                              "definition": {"delivery-limit": 6}}),
                )
                .send()
                .await?
                .error_for_status()?;
            let raw_policy = started.elapsed();
            let _ = http
                .delete(&url)
                .basic_auth("guest", Some("guest"))
                .send()
                .await;
            figures.print(&args, Some(raw_policy));
            for reader in readers.iter() {
                reader.close().await;
            }
            for v in 0..args.vhosts {
                delete_vhost(&http, &mgmt, &args.vhost(v)).await;
            }
        }
        other => bail!("--broker {other}: memory or rabbit"),
    }
    Ok(())
}

/// Bytes the allocator has handed out and not taken back.
fn heap_allocated() -> usize {
    use tikv_jemalloc_ctl::{epoch, stats};
    if epoch::advance().is_err() {
        return 0;
    }
    stats::allocated::read().unwrap_or(0)
}

struct Figures {
    rss_start: u64,
    first_sync: Duration,
    sync_writes: u64,
    sync_api_writes: usize,
    rss_synced: u64,
    resync_reconciles: u64,
    resync_writes: u64,
    resync_api_writes: usize,
    resync_api_calls: usize,
    rss_steady: u64,
    heap_synced: usize,
    heap_steady: usize,
    store_bytes: usize,
    cached_bytes: usize,
    hwm: u64,
    change: Duration,
    restart: Duration,
    restart_hwm: u64,
    restart_writes: u64,
    restart_api_writes: usize,
    restart_api_calls: usize,
    verify_floor: Duration,
}

impl Figures {
    fn print(&self, args: &Args, raw_policy: Option<Duration>) {
        let n = args.pipelines;
        println!(
            "first sync of {n} pipelines (operator started against a cluster holding them): all Ready after {:.1} s; {} broker and Kubernetes writes ({:.1} per pipeline), {} write calls reached the API (events included)",
            self.first_sync.as_secs_f64(),
            self.sync_writes,
            self.sync_writes as f64 / n.max(1) as f64,
            self.sync_api_writes
        );
        println!(
            "RSS: at start {:.1} MiB, after the first sync {:.1} MiB, steady state after the resync {:.1} MiB, peak {:.1} MiB (target <= 64; the mocked API is a child process, not counted)",
            kib_to_mib(self.rss_start),
            kib_to_mib(self.rss_synced),
            kib_to_mib(self.rss_steady),
            kib_to_mib(self.hwm)
        );
        let mib = |bytes: usize| bytes as f64 / 1024.0 / 1024.0;
        println!(
            "  heap allocated (jemalloc) after the first sync / steady state: {:.1} / {:.1} MiB; the {n} pipelines as a list returns them weigh {:.1} MiB ({:.1} KiB each), as the controller's cache keeps them {:.1} MiB ({:.1} KiB each)",
            mib(self.heap_synced),
            mib(self.heap_steady),
            mib(self.store_bytes),
            self.store_bytes as f64 / 1024.0 / n.max(1) as f64,
            mib(self.cached_bytes),
            self.cached_bytes as f64 / 1024.0 / n.max(1) as f64
        );
        println!(
            "resync of all {n} (each requeued {} s after its reconcile): {} reconciles, {} operator writes, {} write calls reached the API ({} calls in all; target 0 writes)",
            args.resync,
            self.resync_reconciles,
            self.resync_writes,
            self.resync_api_writes,
            self.resync_api_calls
        );
        let raw = raw_policy.map_or(String::new(), |raw| {
            format!(
                "; RabbitMQ's own cost for one policy in that vhost, same run: {:.0} ms",
                raw.as_secs_f64() * 1000.0
            )
        });
        println!(
            "spec change among {n} (maxAttempts 5 -> 6: one policy), apply -> Ready for the new generation: {:.0} ms (target <= 5000){raw}",
            self.change.as_secs_f64() * 1000.0
        );
        println!(
            "restart: a new controller verified all {n} against the broker in {:.1} s (peak RSS meanwhile {:.1} MiB), {} operator writes, {} write calls reached the API ({} calls; target <= 300 s, 0 writes); the least such a check needs, same run (one paged list + one snapshot per vhost): {:.1} s",
            self.restart.as_secs_f64(),
            kib_to_mib(self.restart_hwm),
            self.restart_writes,
            self.restart_api_writes,
            self.restart_api_calls,
            self.verify_floor.as_secs_f64()
        );
    }
}

/// A running controller and its context.
struct Running<B: PooledBroker> {
    ctx: Arc<Context<B>>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl<B: PooledBroker> Running<B> {
    fn start(
        api: &ApiProcess,
        pool: BrokerPool<B>,
        config: OperatorConfig,
    ) -> anyhow::Result<Self> {
        let mut kube_config = kube::Config::new(api.url.parse().context("fake API URL")?);
        kube_config.default_namespace = "default".into();
        let client = msgpipe::controller::reconcile_client(kube_config.clone())?;
        let mut ctx = Context::with_brokers(client, Arc::new(Metrics::default()), config, pool);
        ctx.watch_client = kube::Client::try_from(kube_config)?;
        let ctx = Arc::new(ctx);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run_controller(ctx.clone(), None, async move {
            let _ = stopped.await;
        }));
        Ok(Running { ctx, stop, task })
    }

    fn writes(&self) -> u64 {
        self.ctx.metrics.kube_writes_total() + self.ctx.metrics.broker_writes_total()
    }

    /// Waits until `n` pipelines are Ready (recorded by their own reconciles).
    async fn all_ready(&self, n: usize, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let (ready, not_ready) = self.ctx.metrics.ready_pipelines();
            if ready >= n {
                return Ok(());
            }
            if started.elapsed() > limit {
                bail!(
                    "{ready} of {n} pipelines Ready ({not_ready} not) after {} s",
                    limit.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
        self.ctx.brokers.close().await;
    }
}

async fn measure<B, Snap, Fut>(
    args: &Args,
    pool: impl Fn(&OperatorConfig) -> BrokerPool<B>,
    snapshot: Snap,
) -> anyhow::Result<Figures>
where
    B: PooledBroker,
    Snap: Fn(String) -> Fut,
    Fut: Future<Output = anyhow::Result<msgpipe::broker::LiveVhost>>,
{
    let n = args.pipelines;
    let api = ApiProcess::spawn(
        &std::env::args()
            .skip(1)
            .chain(["--serve-api".to_string()])
            .collect::<Vec<_>>(),
    )?;
    let http = reqwest::Client::new();
    let config = OperatorConfig {
        resync: Duration::from_secs(args.resync),
        concurrency: u16::try_from(args.concurrency).unwrap_or(u16::MAX),
        broker_concurrency: args.broker_concurrency,
        ..OperatorConfig::default()
    };
    let rss_start = status_kib("VmRSS");

    // First sync.
    let started = Instant::now();
    let running = Running::start(&api, pool(&config), config.clone())?;
    running.all_ready(n, Duration::from_secs(3600)).await?;
    let first_sync = started.elapsed();
    let (_, mut sync_api_writes) = api.take_calls(&http).await?;
    let sync_writes = running.writes();
    let rss_synced = status_kib("VmRSS");
    let heap_synced = heap_allocated();
    // Events are published after the status that made a pipeline Ready: until they are all
    // out, they belong to the first sync.
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (_, writes) = api.take_calls(&http).await?;
        sync_api_writes += writes;
        if writes == 0 {
            break;
        }
    }
    println!(
        "  first sync: {n} Ready after {:.1} s",
        first_sync.as_secs_f64()
    );

    // Resync: every pipeline's own requeue, `resync` after its reconcile.
    let reconciles_before = running.ctx.metrics.reconciles_total();
    let writes_before = running.writes();
    // Every requeue is due `resync` after its pipeline's reconcile ended, all of them by then.
    let all_due = started + first_sync + Duration::from_secs(args.resync + 2);
    let resync_limit = all_due + Duration::from_secs(600);
    loop {
        let done = running.ctx.metrics.reconciles_total() - reconciles_before;
        if done >= n as u64 && Instant::now() >= all_due {
            break;
        }
        ensure!(
            Instant::now() < resync_limit,
            "resync: {done} of {n} reconciled"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let resync_reconciles = running.ctx.metrics.reconciles_total() - reconciles_before;
    let resync_writes = running.writes() - writes_before;
    let (resync_api_calls, resync_api_writes) = api.take_calls(&http).await?;
    println!("  resync: {resync_reconciles} reconciles, {resync_writes} writes");
    tokio::time::sleep(SNAPSHOT_MAX_REUSE + Duration::from_secs(2)).await;
    let rss_steady = status_kib("VmRSS");
    let heap_steady = heap_allocated();

    // One spec change among the fleet, as a user's apply.
    let last = n - 1;
    let mut changed: Value = api.get(&http, &path(last)).await?;
    changed["spec"]["retry"]["maxAttempts"] = json!(6);
    changed["metadata"]["generation"] = json!(2);
    let started = Instant::now();
    api.put(&http, &path(last), &changed).await?;
    loop {
        let object: MessagePipeline = api.get(&http, &path(last)).await?;
        let ready = object.status.as_ref().is_some_and(|s| {
            s.conditions.iter().any(|c| {
                c.type_ == "Ready" && c.status == "True" && c.observed_generation == Some(2)
            })
        });
        if ready {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(120),
            "{} not Ready for generation 2 after 120 s",
            name(last)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let change = started.elapsed();
    let live = snapshot(args.vhost(last)).await?;
    let limit = live
        .policies
        .get(&format!("msgpipe.{}", name(last)))
        .and_then(|p| p.definition.get("delivery-limit").cloned());
    ensure!(
        limit == Some(json!(6)),
        "{}'s delivery-limit did not converge: {limit:?}",
        name(last)
    );
    println!("  spec change: {:.0} ms", change.as_secs_f64() * 1000.0);
    let hwm = status_kib("VmHWM");

    // Restart: a new controller with a new context; its own peak (VmHWM reset first).
    running.stop().await;
    api.take_calls(&http).await?;
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let started = Instant::now();
    let running = Running::start(&api, pool(&config), config.clone())?;
    running.all_ready(n, Duration::from_secs(3600)).await?;
    let restart = started.elapsed();
    let restart_hwm = status_kib("VmHWM");
    let restart_writes = running.writes();
    let (restart_api_calls, restart_api_writes) = api.take_calls(&http).await?;
    running.stop().await;

    // The floor of a verification: list every pipeline (pages of 500, as the controller's
    // watcher does) and read every vhost once, on the same API and broker.
    let mut kube_config = kube::Config::new(api.url.parse()?);
    kube_config.default_namespace = "default".into();
    let client = kube::Client::try_from(kube_config)?;
    let pipelines: Api<MessagePipeline> = Api::all(client);
    let started = Instant::now();
    let mut listed = Vec::new();
    let before_list = heap_allocated();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = pipelines.list(&params).await?;
        listed.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    let snapshots: Vec<_> = stream::iter(0..args.vhosts)
        .map(|v| snapshot(args.vhost(v)))
        .buffer_unordered(args.vhosts)
        .collect()
        .await;
    let verify_floor = started.elapsed();
    // What the controller's cache of these objects weighs: the same objects, as a list
    // returns them (with their status), held in memory.
    let store_bytes = heap_allocated().saturating_sub(before_list);
    // What the controller keeps of them (msgpipe::controller::slim: no managedFields, no
    // copy of the applied object).
    let before_slim = heap_allocated();
    let slimmed: Vec<MessagePipeline> = listed
        .iter()
        .map(|p| {
            let mut p = p.clone();
            msgpipe::controller::slim(&mut p);
            p
        })
        .collect();
    let cached_bytes = heap_allocated().saturating_sub(before_slim);
    drop(slimmed);
    let listed = listed.len();
    ensure!(listed == n, "the list returned {listed} of {n} pipelines");
    let queues: usize = snapshots
        .into_iter()
        .map(|s| s.map(|s| s.queues.len()))
        .sum::<anyhow::Result<usize>>()?;
    println!(
        "  {queues} queues on the broker over {} vhosts",
        args.vhosts
    );
    Ok(Figures {
        rss_start,
        first_sync,
        sync_writes,
        sync_api_writes,
        rss_synced,
        resync_reconciles,
        resync_writes,
        resync_api_writes,
        resync_api_calls,
        rss_steady,
        heap_synced,
        heap_steady,
        store_bytes,
        cached_bytes,
        hwm,
        change,
        restart,
        restart_hwm,
        restart_writes,
        restart_api_writes,
        restart_api_calls,
        verify_floor,
    })
}
