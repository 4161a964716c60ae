//! The operator at fleet scale, with the Kubernetes API mocked (tests/operator/fake_api.rs:
//! no cluster exists here) and a real RabbitMQ node (`scripts/test-broker.sh ensure
//! msgpipe-opbench 5679`). The mocked API runs in a child process (this example again, with
//! `--serve-api`, on a loopback port), so this process holds what an operator holds and
//! nothing else, and its RSS is the operator's:
//!
//! - RSS of the process holding N pipelines in a reflector store (the controller's cache)
//!   plus the operator context, beside the objects' own JSON size; after the first sync of
//!   all N (broker sessions, vhost snapshot, kube client); after a resync (steady state);
//! - a GitOps burst: N new pipelines (no finalizer yet) reconciled at the operator's default
//!   concurrency until every one is Ready, counting every Kubernetes write (finalizer,
//!   ConfigMap, PrometheusRule, status, events);
//! - the baseline, in the same run: `msgpipe apply` of the same N pipelines
//!   (`broker::reconcile_many`) into a fresh vhost of the same node;
//! - writes per resync of the converged fleet (Kubernetes + broker; target 0);
//! - time from a spec change to a converged broker, for one pipeline among the N: a new
//!   backoff (new tier queues, no policy) and a new `maxAttempts` (one policy write).
//!
//! ```text
//! cargo run --release --example bench_operator -- --pipelines 1000
//! ```

#[path = "../tests/operator/fake_api.rs"]
#[allow(dead_code)] // the benchmark uses the fake's cluster, not its call assertions
mod fake_api;
#[path = "support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use clap::Parser;
use fake_api::FakeApi;
use futures_util::{StreamExt, stream};
use kube::runtime::controller::Action;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use msgpipe::api::MessagePipeline;
use msgpipe::broker::{self, BrokerApi, BrokerEndpoint, RabbitBroker};
use msgpipe::controller::{
    BUSY_RETRY, Context, Metrics, OperatorConfig, SNAPSHOT_MAX_REUSE, reconcile,
};
use msgpipe::plan::{DesiredState, plan};
use serde_json::{Value, json};
use support::{ApiProcess, delete_vhost, fresh_vhost, mgmt_get, status_kib, template, vhosts};

#[derive(Debug, Parser)]
struct Args {
    /// Pipelines in the controller's cache.
    #[arg(long, default_value_t = 1000)]
    pipelines: usize,
    /// How many of them are synced to the broker and resynced (default: all).
    #[arg(long)]
    synced: Option<usize>,
    /// Reconciles at once (default: the operator's, `--concurrency`).
    #[arg(long, default_value_t = usize::from(msgpipe::controller::DEFAULT_CONCURRENCY))]
    concurrency: usize,
    /// Pipelines at once in `msgpipe apply`'s baseline (its default) and in the operator's
    /// broker batches (`--broker-concurrency`).
    #[arg(long, default_value_t = msgpipe::controller::BROKER_CONCURRENCY)]
    broker_concurrency: usize,
    /// What each call to the mocked API costs: `real` charges what a Kubernetes 1.34 API
    /// server on loopback was measured to charge (p50/p90 per call kind, log-normal jitter);
    /// `none` answers at once.
    #[arg(long, default_value = "real")]
    api_latency: String,
    #[arg(long, default_value = "msgpipe-opbench")]
    node: String,
    #[arg(long, default_value_t = 5679)]
    port: u16,
    /// Queue type of the fleet (msgpipe's default is quorum; both contenders use the same).
    #[arg(long, default_value = "quorum")]
    queue_type: String,
    /// Memory and resync only: no `msgpipe apply` baseline, no spec changes.
    #[arg(long)]
    memory_only: bool,
    /// Internal: serve the mocked Kubernetes API holding the fleet of this vhost on a
    /// loopback port (printed on stdout) until killed.
    #[arg(long, hide = true)]
    serve_api: Option<String>,
}

fn rss_kib() -> u64 {
    status_kib("VmRSS")
}

/// Where the RSS is: (anonymous KiB, file-backed KiB, threads).
fn rss_parts() -> (u64, u64, u64) {
    (
        status_kib("RssAnon"),
        status_kib("RssFile"),
        status_kib("Threads"),
    )
}

/// With BENCH_SMAPS set: the largest resident anonymous mappings, to tell the heap arenas
/// from thread stacks and mapped blocks.
fn print_anon_mappings(when: &str) {
    if std::env::var_os("BENCH_SMAPS").is_none() {
        return;
    }
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let mut maps: Vec<(u64, u64, String)> = Vec::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            let size = first
                .split_once('-')
                .and_then(|(a, b)| {
                    Some(u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?)
                })
                .unwrap_or(0);
            let name = line
                .split_whitespace()
                .nth(5)
                .unwrap_or("[anon]")
                .to_string();
            maps.push((0, size / 1024, name));
        } else if first == "Rss:"
            && let Some(last) = maps.last_mut()
        {
            last.0 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    maps.retain(|(_, _, name)| !name.starts_with('/'));
    maps.sort_by_key(|m| std::cmp::Reverse(m.0));
    let total: u64 = maps.iter().map(|m| m.0).sum();
    println!(
        "  anonymous mappings {when}: {} KiB resident in {}",
        total,
        maps.len()
    );
    for (rss, size, name) in maps.iter().take(12) {
        println!("    {rss:>7} KiB resident of {size:>8} KiB {name}");
    }
}

/// The heap as jemalloc sees it: (bytes allocated, bytes of its pages resident).
fn heap() -> (usize, usize) {
    use tikv_jemalloc_ctl::{epoch, stats};
    if epoch::advance().is_err() {
        return (0, 0);
    }
    (
        stats::allocated::read().unwrap_or(0),
        stats::resident::read().unwrap_or(0),
    )
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / 1024.0 / 1024.0
}

fn path(i: usize) -> String {
    format!("/apis/msgpipe.io/v1alpha1/namespaces/bench/messagepipelines/pipe-{i:04}")
}

fn pipeline(template: &Value, i: usize, vhost: &str, queue_type: &str) -> Value {
    let mut object = template.clone();
    let name = format!("pipe-{i:04}");
    object["metadata"] = json!({
        "name": name, "namespace": "bench", "uid": format!("00000000-0000-4000-8000-{i:012}"),
        "generation": 1, "resourceVersion": "1"
    });
    object["spec"]["queue"]["name"] = json!(name);
    object["spec"]["queue"]["type"] = json!(queue_type);
    object["spec"]["broker"]["vhost"] = json!(vhost);
    for key in ["exchange", "routingKey"] {
        object["spec"]["queue"]
            .as_object_mut()
            .map(|q| q.remove(key));
    }
    object["spec"]["deadLetter"] = json!({"retention": "14d"});
    object
}

// The operator's allocator and options, as `msgpipe operator` has them.
msgpipe::use_jemalloc!();

fn main() -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    support::init_tracing();
    if let Some(vhost) = &args.serve_api {
        return serve_api(&args, vhost).await;
    }
    msgpipe::broker::install_crypto_provider();
    let status = std::process::Command::new("scripts/test-broker.sh")
        .args(["ensure", &args.node, &args.port.to_string()])
        .status()
        .context("scripts/test-broker.sh")?;
    ensure!(status.success(), "broker node did not start");
    let mgmt = format!("http://127.0.0.1:{}", u32::from(args.port) + 10000);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    // A run that failed or was interrupted leaves its vhosts (thousands of quorum queues
    // that would slow this run down): gone first.
    for name in vhosts(&http, &mgmt).await? {
        if name.starts_with("bench-operator-") {
            println!("deleting vhost {name}, left by an earlier run");
            delete_vhost(&http, &mgmt, &name).await;
        }
    }
    let vhost = fresh_vhost(&http, &mgmt, "bench-operator").await?;
    let version = mgmt_get(&http, &format!("{mgmt}/api/overview")).await?["rabbitmq_version"]
        .as_str()
        .unwrap_or("?")
        .to_string();

    println!(
        "bench-operator: RabbitMQ {version} at 127.0.0.1:{}, mocked Kubernetes API (latency: {}), {} queues, {} reconciles at a time, broker batches {} pipelines at a time",
        args.port, args.api_latency, args.queue_type, args.concurrency, args.broker_concurrency
    );
    let template = template()?;
    let baseline = rss_kib();
    // The API server's objects live in the child; this process keeps only the controller's
    // cache and the operator's context.
    let api = ApiProcess::spawn(
        &std::env::args()
            .skip(1)
            .chain(["--serve-api".to_string(), vhost.clone()])
            .collect::<Vec<_>>(),
    )?;
    let mut writer: Writer<MessagePipeline> = Writer::default();
    let store = writer.as_reader();
    writer.apply_watcher_event(&watcher::Event::Init);
    let mut json_bytes = 0;
    for i in 0..args.pipelines {
        let object = pipeline(&template, i, &vhost, &args.queue_type);
        json_bytes += object.to_string().len();
        let typed: MessagePipeline = serde_json::from_value(object)?;
        writer.apply_watcher_event(&watcher::Event::InitApply(typed));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    let cached = rss_kib();
    let mut config = kube::Config::new(api.url.parse().context("fake API URL")?);
    config.default_namespace = "default".into();
    // The operator's own client: its API calls bounded as in `msgpipe operator`.
    let client = msgpipe::controller::reconcile_client(config).context("kube client")?;
    let ctx = Arc::new(Context::new(
        client,
        Arc::new(Metrics::default()),
        OperatorConfig {
            concurrency: u16::try_from(args.concurrency).unwrap_or(u16::MAX),
            broker_concurrency: args.broker_concurrency,
            ..OperatorConfig::default()
        },
    ));

    let synced = args.synced.unwrap_or(args.pipelines).min(args.pipelines);
    // Reconciles every pipeline of the first `synced` that is not Ready yet, `concurrency` at
    // a time as the controller does after the watch's events (all objects are there when the
    // burst starts); returns how many failed and how many were told to come back (the broker
    // was being probed), and when each reconcile started, from `t0`.
    let run_pass = |ctx: Arc<Context>, t0: Instant| {
        let store = store.clone();
        async move {
            let mut pipelines = store.state();
            pipelines.sort_by_key(|p| p.metadata.name.clone());
            pipelines.truncate(synced);
            pipelines.retain(|p| !is_ready(p));
            let results: Vec<_> = stream::iter(pipelines)
                .map(|p| {
                    let ctx = ctx.clone();
                    async move {
                        let started = t0.elapsed();
                        (started, reconcile(p, ctx).await)
                    }
                })
                .buffer_unordered(args.concurrency)
                .collect()
                .await;
            let failed = results.iter().filter(|(_, r)| r.is_err()).count();
            let waiting = results
                .iter()
                .filter(|(_, r)| matches!(r, Ok(a) if *a == Action::requeue(BUSY_RETRY)))
                .count();
            let queued: Vec<Duration> = results.iter().map(|(at, _)| *at).collect();
            (failed, waiting, queued)
        }
    };
    // The burst: new objects (no finalizer) until every one is Ready, like the controller
    // (a pipeline told the broker is busy comes back after BUSY_RETRY; failures are retried).
    let kube_writes_before = ctx.metrics.kube_writes_total();
    api.take_calls(&http).await?;
    let started = Instant::now();
    let mut passes = 0;
    let (mut failed, mut waiting);
    let mut pass_times = Vec::new();
    let mut first_reconcile = Vec::new();
    loop {
        let pass_started = Instant::now();
        let queued;
        (failed, waiting, queued) = run_pass(ctx.clone(), started).await;
        if passes == 0 {
            first_reconcile = queued;
        }
        pass_times.push(format!("{:.1} s", pass_started.elapsed().as_secs_f64()));
        // The watch: every stored object (with its finalizer, status) back into the cache.
        let objects: Vec<_> = stream::iter(0..synced)
            .map(|i| {
                let (api, http) = (&api, &http);
                async move { api.get::<MessagePipeline>(http, &path(i)).await }
            })
            .buffered(32)
            .collect()
            .await;
        for object in objects {
            writer.apply_watcher_event(&watcher::Event::Apply(object?));
        }
        passes += 1;
        let ready = store.state().iter().filter(|p| is_ready(p)).count();
        if ready >= synced || passes >= 60 {
            break;
        }
        if waiting > 0 || failed > 0 {
            tokio::time::sleep(BUSY_RETRY).await;
        }
    }
    let burst = started.elapsed();
    let ready = store.state().iter().filter(|p| is_ready(p)).count();
    ensure!(
        ready >= synced,
        "{ready} of {synced} pipelines Ready after {passes} passes ({failed} failed, {waiting} waiting)"
    );
    let phases = phase_table(&ctx.metrics, &mut first_reconcile);
    let after_sync = rss_kib();
    let heap_after_sync = heap();
    let parts_after_sync = rss_parts();
    print_anon_mappings("after the first sync");
    let (_, api_writes) = api.take_calls(&http).await?;
    let kube_writes = ctx.metrics.kube_writes_total() - kube_writes_before;
    println!(
        "burst of {synced} new pipelines -> all Ready: {:.1} s ({passes} passes: {}), {kube_writes} Kubernetes writes ({:.1} per pipeline; {api_writes} write calls reached the API, events included)",
        burst.as_secs_f64(),
        pass_times.join(", "),
        kube_writes as f64 / synced.max(1) as f64
    );
    println!("{phases}");

    let writes_before = ctx.metrics.kube_writes_total() + ctx.metrics.broker_writes_total();
    api.take_calls(&http).await?;
    let started = Instant::now();
    let mut pipelines = store.state();
    pipelines.truncate(synced);
    let results: Vec<_> = stream::iter(pipelines)
        .map(|p| reconcile(p, ctx.clone()))
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let resync = started.elapsed();
    let failed = results.iter().filter(|r| r.is_err()).count();
    ensure!(failed == 0, "{failed} pipelines failed the resync");
    let resync_writes =
        ctx.metrics.kube_writes_total() + ctx.metrics.broker_writes_total() - writes_before;
    let after_resync = rss_kib();
    // Steady state: converged, no reconcile running, the last snapshot forgotten.
    tokio::time::sleep(SNAPSHOT_MAX_REUSE + Duration::from_secs(2)).await;
    let idle = rss_kib();
    let heap_idle = heap();
    let parts_idle = rss_parts();
    print_anon_mappings("in steady state");
    // What one snapshot of the fleet's vhost weighs while a reconcile holds it.
    let snapshot_bytes = {
        let reader = RabbitBroker::new(endpoint(&args, &mgmt, &vhost)?, Duration::from_secs(60))?;
        let before = heap().0;
        let live = reader.snapshot(&vhost).await?;
        let held = heap().0.saturating_sub(before);
        let counts = format!(
            "{} exchanges, {} queues, {} bindings ({} msgpipe's), {} policies",
            live.exchanges.len(),
            live.queues.len(),
            live.bindings.len(),
            live.bindings.values().filter(|owned| **owned).count(),
            live.policies.len()
        );
        ensure!(
            live.queues.len() >= synced,
            "the snapshot lacks queues: {counts}"
        );
        drop(live);
        reader.close().await;
        (held, counts)
    };
    let (resync_calls, _) = api.take_calls(&http).await?;

    let changes = if args.memory_only {
        None
    } else {
        // The baseline, same run, same node: `msgpipe apply` of the same pipelines.
        let apply_vhost = fresh_vhost(&http, &mgmt, "bench-operator-apply").await?;
        let states: Vec<DesiredState> = (0..synced)
            .map(|i| {
                let object = pipeline(&template, i, &apply_vhost, &args.queue_type);
                let pipeline: MessagePipeline = serde_json::from_value(object)?;
                anyhow::Ok(plan(&pipeline, None)?)
            })
            .collect::<anyhow::Result<_>>()?;
        let apply_broker = RabbitBroker::new(
            endpoint(&args, &mgmt, &apply_vhost)?,
            Duration::from_secs(600),
        )?;
        let started = Instant::now();
        let live = broker::snapshot_vhosts(&apply_broker, &states).await?;
        let reports =
            broker::reconcile_many(&apply_broker, &states, &live, args.broker_concurrency).await;
        let apply_time = started.elapsed();
        for (_, report) in reports {
            report.map_err(|failed| anyhow::anyhow!("msgpipe apply: {failed}"))?;
        }
        apply_broker.close().await;
        println!(
            "msgpipe apply of the same {synced} (same run, same node, {} at a time): {:.1} s; burst/apply = {:.2} (target <= 1.3)",
            args.broker_concurrency,
            apply_time.as_secs_f64(),
            burst.as_secs_f64() / apply_time.as_secs_f64().max(1e-9)
        );

        // Spec changes of one pipeline among the fleet.
        let broker = RabbitBroker::new(endpoint(&args, &mgmt, &vhost)?, Duration::from_secs(30))?;
        let change = async |i: usize,
                            edit: &dyn Fn(&mut MessagePipeline)|
               -> anyhow::Result<(Duration, String)> {
            let mut changed: MessagePipeline = api.get(&http, &path(i)).await?;
            edit(&mut changed);
            changed.metadata.generation = Some(2);
            let name = changed.metadata.name.clone().unwrap_or_default();
            let started = Instant::now();
            reconcile(Arc::new(changed), ctx.clone())
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok((started.elapsed(), name))
        };
        let (delay_change, name) = change(0, &|p| {
            if let Ok(delay) = "3s".parse() {
                p.spec.retry.backoff.initial_delay = delay;
            }
        })
        .await?;
        let live = broker.snapshot(&vhost).await?;
        let tier = format!("{name}.retry.1.3s");
        ensure!(
            live.queues.get(&tier).is_some_and(|q| q.returns_to(&name)),
            "tier 1 of {name} did not converge"
        );
        let declared = mgmt_get(&http, &format!("{mgmt}/api/queues/{vhost}/{tier}")).await?;
        let ttl = &declared["arguments"]["x-message-ttl"];
        ensure!(*ttl == json!(3000), "{tier} holds messages for {ttl}");
        let (attempts_change, name) =
            change(synced.saturating_sub(1), &|p| p.spec.retry.max_attempts = 6).await?;
        let live = broker.snapshot(&vhost).await?;
        let limit = live
            .policies
            .get(&format!("msgpipe.{name}"))
            .and_then(|p| p.definition.get("delivery-limit").cloned());
        ensure!(
            limit == Some(json!(6)),
            "{name}'s delivery-limit did not converge: {limit:?}"
        );
        broker.close().await;
        Some((delay_change, attempts_change, apply_vhost))
    };
    ctx.brokers.close().await;

    println!(
        "pipelines cached: {}, synced to the broker: {synced}",
        args.pipelines
    );
    println!(
        "RSS baseline (runtime, no pipelines): {:.1} MiB",
        baseline as f64 / 1024.0
    );
    println!(
        "RSS with {} pipelines cached: {:.1} MiB (+{:.1} MiB; the objects' own JSON: {:.1} MiB)",
        args.pipelines,
        cached as f64 / 1024.0,
        (cached.saturating_sub(baseline)) as f64 / 1024.0,
        json_bytes as f64 / 1024.0 / 1024.0
    );
    println!(
        "RSS after the first sync of {synced} / right after a resync / steady state ({} s later, snapshot forgotten): {:.1} / {:.1} / {:.1} MiB (target <= 30; the mocked API server is a child process, not counted)",
        (SNAPSHOT_MAX_REUSE + Duration::from_secs(2)).as_secs(),
        after_sync as f64 / 1024.0,
        after_resync as f64 / 1024.0,
        idle as f64 / 1024.0
    );
    println!(
        "  heap (jemalloc) after the first sync / steady state: {:.1} MiB allocated, {:.1} MiB resident / {:.1} MiB allocated, {:.1} MiB resident",
        mib(heap_after_sync.0),
        mib(heap_after_sync.1),
        mib(heap_idle.0),
        mib(heap_idle.1)
    );
    println!(
        "  one snapshot of the vhost ({}) holds {:.1} MiB",
        snapshot_bytes.1,
        mib(snapshot_bytes.0)
    );
    println!(
        "  RSS anonymous + file-backed, threads, after the first sync / steady state: {:.1} + {:.1} MiB, {} / {:.1} + {:.1} MiB, {}",
        parts_after_sync.0 as f64 / 1024.0,
        parts_after_sync.1 as f64 / 1024.0,
        parts_after_sync.2,
        parts_idle.0 as f64 / 1024.0,
        parts_idle.1 as f64 / 1024.0,
        parts_idle.2
    );
    println!(
        "resync of the converged fleet: {:.2} s, {resync_writes} writes, {resync_calls} Kubernetes calls",
        resync.as_secs_f64()
    );
    if let Some((delay_change, attempts_change, apply_vhost)) = changes {
        println!(
            "spec change -> converged broker, one reconcile among {synced} (watch latency excluded): new backoff {:.0} ms, new maxAttempts {:.0} ms (target <= 5000)",
            delay_change.as_secs_f64() * 1000.0,
            attempts_change.as_secs_f64() * 1000.0
        );
        // Deleting thousands of quorum queues takes minutes: after every measurement.
        delete_vhost(&http, &mgmt, &apply_vhost).await;
    }
    delete_vhost(&http, &mgmt, &vhost).await;
    Ok(())
}

/// The child: the fleet's objects and the Secret, served over loopback HTTP.
async fn serve_api(args: &Args, vhost: &str) -> anyhow::Result<()> {
    let api = FakeApi::default();
    api.set_crd(true);
    let mgmt = format!("http://127.0.0.1:{}", u32::from(args.port) + 10000);
    api.put(
        "/api/v1/namespaces/bench/secrets/rabbitmq-admin",
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "rabbitmq-admin", "namespace": "bench"},
               "stringData": {"uri": format!("amqp://guest:guest@127.0.0.1:{}/{vhost}", args.port), "managementUri": mgmt}}),
    );
    let template = template()?;
    for i in 0..args.pipelines {
        api.put(&path(i), pipeline(&template, i, vhost, &args.queue_type));
    }
    if args.api_latency == "real" {
        api.set_latency(fake_api::Latency::real_server());
    }
    support::serve(api).await
}

/// Whether the stored object says Ready=True for its current generation.
fn is_ready(p: &MessagePipeline) -> bool {
    let generation = p.metadata.generation;
    p.status.as_ref().is_some_and(|s| {
        s.conditions.iter().any(|c| {
            c.type_ == "Ready" && c.status == "True" && c.observed_generation == generation
        })
    })
}

fn endpoint(args: &Args, mgmt: &str, vhost: &str) -> anyhow::Result<BrokerEndpoint> {
    Ok(BrokerEndpoint::new(
        &format!("amqp://guest:guest@127.0.0.1:{}/{vhost}", args.port),
        Some(mgmt),
        None,
    )?)
}

/// The per-phase table of the burst, from the operator's own
/// `msgpipe_reconcile_phase_seconds` histograms (p50 and p90 are bucket upper bounds: 1 ms
/// doubling), and when each reconcile of the first pass started.
fn phase_table(metrics: &Metrics, first_reconcile: &mut [Duration]) -> String {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &metrics.registry).is_err() {
        return "(metrics could not be encoded)".into();
    }
    let label = |line: &str, name: &str| -> Option<String> {
        let start = line.find(&format!("{name}=\""))? + name.len() + 2;
        let end = line[start..].find('"')? + start;
        Some(line[start..end].to_string())
    };
    let value = |line: &str| -> f64 {
        line.rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let mut out = String::from(
        "per-phase time of the burst's reconciles (p50 / p90 as histogram bucket bounds, mean, count):",
    );
    first_reconcile.sort();
    let at = |q: f64| {
        first_reconcile
            .get(((first_reconcile.len() as f64 - 1.0) * q).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    out.push_str(&format!(
        "\n  {:<10} p50 {:>7.0} ms  p90 {:>7.0} ms  max {:>7.0} ms  ({} reconciles; from the burst's start to the reconcile's start)",
        "queued",
        at(0.5),
        at(0.9),
        at(1.0),
        first_reconcile.len()
    ));
    for phase in msgpipe::controller::Phase::ALL {
        let name = phase.name();
        let mine = |line: &&str| label(line, "phase").as_deref() == Some(name);
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("msgpipe_reconcile_phase_seconds"))
            .filter(mine)
            .collect();
        let count = lines
            .iter()
            .find(|l| l.starts_with("msgpipe_reconcile_phase_seconds_count"))
            .map_or(0.0, |l| value(l));
        let sum = lines
            .iter()
            .find(|l| l.starts_with("msgpipe_reconcile_phase_seconds_sum"))
            .map_or(0.0, |l| value(l));
        if count == 0.0 {
            out.push_str(&format!("\n  {name:<10} (not run)"));
            continue;
        }
        let quantile = |q: f64| -> String {
            lines
                .iter()
                .filter(|l| l.starts_with("msgpipe_reconcile_phase_seconds_bucket"))
                .find(|l| value(l) >= q * count)
                .and_then(|l| label(l, "le"))
                .map_or("?".into(), |le| match le.parse::<f64>() {
                    Ok(le) => format!("<= {:.0} ms", le * 1000.0),
                    Err(_) => format!("<= {le}"),
                })
        };
        out.push_str(&format!(
            "\n  {name:<10} p50 {:>10}  p90 {:>10}  mean {:>6.1} ms  ({count} times)",
            quantile(0.5),
            quantile(0.9),
            sum / count * 1000.0
        ));
    }
    out
}
