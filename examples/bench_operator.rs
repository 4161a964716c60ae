//! The operator at fleet scale, with the Kubernetes API mocked (tests/operator/fake_api.rs:
//! no cluster exists here) and a real RabbitMQ node (`scripts/test-broker.sh ensure
//! msgpipe-opbench 5679`):
//!
//! - RSS of the process holding N pipelines in a reflector store (the controller's cache)
//!   plus the operator context, beside the objects' own JSON size;
//! - a first sync of the fleet (N reconciles at the operator's default concurrency);
//! - writes per resync of the converged fleet (Kubernetes + broker; target 0);
//! - time from a spec change (a new backoff) to a converged broker, for one pipeline.
//!
//! ```text
//! cargo run --release --example bench_operator -- --pipelines 1000
//! ```

#[path = "../tests/operator/fake_api.rs"]
#[allow(dead_code)] // the benchmark uses the fake's cluster, not its call assertions
mod fake_api;

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
use msgpipe::api::load::parse_pipelines;
use msgpipe::broker::{BrokerApi, BrokerEndpoint, RabbitBroker};
use msgpipe::controller::{BUSY_RETRY, Context, Metrics, OperatorConfig, reconcile};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
struct Args {
    /// Pipelines in the controller's cache.
    #[arg(long, default_value_t = 1000)]
    pipelines: usize,
    /// How many of them are synced to the broker and resynced (the broker, not msgpipe, is
    /// the slow part of a first sync on a 2-core machine).
    #[arg(long, default_value_t = 200)]
    synced: usize,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    #[arg(long, default_value = "msgpipe-opbench")]
    node: String,
    #[arg(long, default_value_t = 5679)]
    port: u16,
    /// Queue type of the fleet. The operator's own cost does not depend on it; 6,000 quorum
    /// queues (6 per pipeline, each a Raft group) would measure the broker, not msgpipe.
    #[arg(long, default_value = "classic")]
    queue_type: String,
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn path(i: usize) -> String {
    format!("/apis/msgpipe.io/v1alpha1/namespaces/bench/messagepipelines/pipe-{i:04}")
}

fn pipeline(template: &Value, i: usize, vhost: &str, queue_type: &str) -> Value {
    let mut object = template.clone();
    let name = format!("pipe-{i:04}");
    object["metadata"] = json!({
        "name": name, "namespace": "bench", "uid": format!("00000000-0000-4000-8000-{i:012}"),
        "generation": 1, "resourceVersion": "1", "finalizers": ["msgpipe.io/cleanup"]
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    msgpipe::broker::install_crypto_provider();
    let status = std::process::Command::new("scripts/test-broker.sh")
        .args(["ensure", &args.node, &args.port.to_string()])
        .status()
        .context("scripts/test-broker.sh")?;
    ensure!(status.success(), "broker node did not start");
    let vhost = format!("bench-operator-{}", std::process::id());
    let mgmt = format!("http://127.0.0.1:{}", u32::from(args.port) + 10000);
    let http = reqwest::Client::new();
    http.put(format!("{mgmt}/api/vhosts/{vhost}"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await?
        .error_for_status()?;
    http.put(format!("{mgmt}/api/permissions/{vhost}/guest"))
        .basic_auth("guest", Some("guest"))
        .json(&json!({"configure": ".*", "write": ".*", "read": ".*"}))
        .send()
        .await?
        .error_for_status()?;

    let text = std::fs::read_to_string("examples/notes-pipeline.yaml")?;
    let template = serde_json::to_value(parse_pipelines(&text)?.remove(0))?;
    let baseline = rss_kib();

    // The fleet as the API server would hold it, and as the controller caches it.
    let api = FakeApi::default();
    api.set_crd(true);
    api.put(
        "/api/v1/namespaces/bench/secrets/rabbitmq-admin",
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "rabbitmq-admin", "namespace": "bench"},
               "stringData": {"uri": format!("amqp://guest:guest@127.0.0.1:{}/{vhost}", args.port), "managementUri": mgmt}}),
    );
    let objects: Vec<Value> = (0..args.pipelines)
        .map(|i| pipeline(&template, i, &vhost, &args.queue_type))
        .collect();
    let json_bytes: usize = objects.iter().map(|o| o.to_string().len()).sum();
    let typed: Vec<MessagePipeline> = objects
        .iter()
        .map(|o| serde_json::from_value(o.clone()))
        .collect::<Result<_, _>>()?;
    for (i, object) in objects.into_iter().enumerate() {
        api.put(&path(i), object);
    }
    let mut writer: Writer<MessagePipeline> = Writer::default();
    let store = writer.as_reader();
    writer.apply_watcher_event(&watcher::Event::Init);
    for p in typed {
        writer.apply_watcher_event(&watcher::Event::InitApply(p));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    let (client, _server) = api.client();
    let ctx = Arc::new(Context::new(
        client,
        Arc::new(Metrics::default()),
        OperatorConfig::default(),
    ));
    let cached = rss_kib();

    // First sync: every pipeline from an empty vhost.
    let synced = args.synced.min(args.pipelines);
    let run_pass = |ctx: Arc<Context>| {
        let store = store.clone();
        async move {
            let started = Instant::now();
            let mut pipelines = store.state();
            pipelines.sort_by_key(|p| p.metadata.name.clone());
            pipelines.truncate(synced);
            let results: Vec<_> = stream::iter(pipelines)
                .map(|p| reconcile(p, ctx.clone()))
                .buffer_unordered(args.concurrency)
                .collect()
                .await;
            let failed = results.iter().filter(|r| r.is_err()).count();
            // Policies written, declares held back until the burst is over; or nothing done
            // while another reconcile probed the broker.
            let waiting = results
                .iter()
                .filter(|r| {
                    matches!(r, Ok(a) if *a == Action::requeue(ctx.config.policy_quiet)
                        || *a == Action::requeue(BUSY_RETRY))
                })
                .count();
            (started.elapsed(), failed, waiting)
        }
    };
    // Like the controller, come back to pipelines that wait for the burst of policy writes
    // to end (after the quiet period) and retry what failed (broker timeouts under load),
    // until all converge.
    let (mut first, mut failed, mut waiting) = run_pass(ctx.clone()).await;
    let mut passes = 1;
    while (failed > 0 || waiting > 0) && passes < 40 {
        println!(
            "first sync: {failed} pipelines failed, {waiting} wait for the policy burst to end"
        );
        if waiting > 0 {
            tokio::time::sleep(ctx.config.policy_quiet).await;
            first += ctx.config.policy_quiet;
        }
        let (again, still_failed, still_waiting) = run_pass(ctx.clone()).await;
        first += again;
        (failed, waiting) = (still_failed, still_waiting);
        passes += 1;
    }
    ensure!(
        failed == 0 && waiting == 0,
        "{failed} pipelines failed the first sync, {waiting} still wait"
    );
    // Reload the stored objects (now with status) into the cache, as the watch would.
    for i in 0..synced {
        let object: MessagePipeline = serde_json::from_value(api.get(&path(i)).context("stored")?)?;
        writer.apply_watcher_event(&watcher::Event::Apply(object));
    }
    let after_sync = rss_kib();
    let writes_before = ctx.metrics.kube_writes_total() + ctx.metrics.broker_writes_total();
    api.take_calls();
    let (resync, failed, waiting) = run_pass(ctx.clone()).await;
    ensure!(
        failed == 0 && waiting == 0,
        "{failed} pipelines failed the resync, {waiting} waited"
    );
    let resync_writes =
        ctx.metrics.kube_writes_total() + ctx.metrics.broker_writes_total() - writes_before;
    let resync_calls = api.take_calls().len();
    let idle = rss_kib();

    // Spec change: a new initial delay on one pipeline, until its tier-1 policy has it.
    let target = store
        .state()
        .into_iter()
        .min_by_key(|p| p.metadata.name.clone())
        .context("a pipeline")?;
    let mut changed = target.as_ref().clone();
    changed.spec.retry.backoff.initial_delay = "3s".parse()?;
    changed.metadata.generation = Some(2);
    let name = changed.metadata.name.clone().unwrap_or_default();
    let started = Instant::now();
    reconcile(Arc::new(changed), ctx.clone())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let change_to_converged = started.elapsed();
    let endpoint = BrokerEndpoint::new(
        &format!("amqp://guest:guest@127.0.0.1:{}/{vhost}", args.port),
        Some(&mgmt),
        None,
    )?;
    let broker = RabbitBroker::new(endpoint, Duration::from_secs(30))?;
    let live = broker.snapshot(&vhost).await?;
    let ttl = live
        .queues
        .get(&format!("{name}.retry.1.3s"))
        .and_then(|q| q.arguments.get("x-message-ttl").cloned());
    ensure!(
        ttl == Some(json!(3000)),
        "tier 1 of {name} did not converge: {ttl:?}"
    );
    broker.close().await;
    ctx.brokers.close().await;

    println!(
        "pipelines cached: {}, synced to the broker: {synced} ({} queues)",
        args.pipelines, args.queue_type
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
        "RSS after first sync and a resync (broker pool, snapshots): {:.1} MiB / {:.1} MiB",
        after_sync as f64 / 1024.0,
        idle as f64 / 1024.0
    );
    println!(
        "first sync of {synced} pipelines: {:.2} s ({:.1} ms per pipeline, {passes} passes)",
        first.as_secs_f64(),
        first.as_secs_f64() * 1000.0 / synced.max(1) as f64
    );
    println!(
        "resync of the converged fleet: {:.2} s, {resync_writes} writes, {resync_calls} Kubernetes reads",
        resync.as_secs_f64()
    );
    println!(
        "spec change -> converged broker (one reconcile, watch latency excluded): {:.0} ms",
        change_to_converged.as_secs_f64() * 1000.0
    );
    let _ = http
        .delete(format!("{mgmt}/api/vhosts/{vhost}"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await;
    Ok(())
}
