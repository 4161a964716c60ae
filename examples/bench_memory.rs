//! Issue 23's figure: does the operator's memory grow with Secrets and ConfigMaps it does not
//! use? Peak RSS (VmHWM) of the operator's controller (`run_controller`, the in-memory
//! broker) against a mocked Kubernetes API (tests/operator/fake_api.rs, in a child process
//! so its objects are not counted) holding 10,000 Secrets and 10,000 ConfigMaps of 4 KiB each
//! in 100 other namespaces, served in pages as a real server does, against the same run with
//! none. Each case is its own operator process, so each VmHWM is clean. Both broker modes:
//! brokerRef only (Secrets watched in the operator's namespace) and secretRef + brokerRef (a
//! cluster-wide metadata-only Secret watch).
//!
//! ```text
//! cargo run --release --example bench_memory
//! ```

#[path = "../tests/operator/fake_api.rs"]
#[allow(dead_code)] // the benchmark serves the fake's cluster, not its call assertions
mod fake_api;
#[path = "support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use fake_api::FakeApi;
use msgpipe::broker::MemoryBroker;
use msgpipe::controller::{
    BROKER_CONCURRENCY, BrokerPool, Context, Metrics, OperatorConfig, run_controller,
};
use msgpipe::k8s::BrokerAccess;
use serde_json::{Value, json};
use support::{WATCHES_PATH, kib_to_mib, status_kib};

const OPERATOR_NS: &str = "msgpipe-system";
const VHOST: &str = "bench";

#[derive(Debug, Parser)]
struct Args {
    /// Secrets and ConfigMaps (each) in other namespaces.
    #[arg(long, default_value_t = 10_000)]
    objects: usize,
    #[arg(long, default_value_t = 100)]
    namespaces: usize,
    /// Bytes of data per object.
    #[arg(long, default_value_t = 4096)]
    size: usize,
    /// How long the steady state runs after the first sync, in seconds.
    #[arg(long, default_value_t = 10)]
    steady: u64,
    /// Internal: serve the mocked API with this many objects (printing its port).
    #[arg(long, hide = true)]
    serve_api: Option<usize>,
    /// Internal: run the operator against the mocked API on this port.
    #[arg(long, hide = true)]
    operator: Option<u16>,
    /// Internal: the operator accepts secretRef too (cluster-wide Secret metadata watch).
    #[arg(long, hide = true)]
    secret_refs: bool,
}

// The operator's allocator and options, as `msgpipe operator` has them.
msgpipe::use_jemalloc!();

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    if let Some(objects) = args.serve_api {
        return runtime.block_on(serve_api(&args, objects));
    }
    if let Some(port) = args.operator {
        return runtime.block_on(operator(&args, port));
    }
    compare(&args)
}

/// A field of /proc/self/status, in KiB.
fn mib(kib: u64) -> f64 {
    kib_to_mib(kib)
}

/// One case: (VmHWM after the first sync, VmHWM in steady state, VmRSS in steady state), KiB.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    synced_hwm: u64,
    steady_hwm: u64,
    steady_rss: u64,
    sync: Duration,
}

/// Runs the four cases (two modes, with and without the objects), each in fresh processes.
fn compare(args: &Args) -> anyhow::Result<()> {
    println!(
        "operator peak RSS (VmHWM) with {} Secrets and {} ConfigMaps of {} B in {} other namespaces, vs none (each case its own process)",
        args.objects, args.objects, args.size, args.namespaces
    );
    let mut worst = 0.0f64;
    for (mode, secret_refs) in [("brokerRef only", false), ("secretRef + brokerRef", true)] {
        let none = run_case(args, 0, secret_refs)?;
        let many = run_case(args, args.objects, secret_refs)?;
        for (label, baseline, measured) in [
            ("after first sync (VmHWM)", none.synced_hwm, many.synced_hwm),
            ("steady state (VmHWM)", none.steady_hwm, many.steady_hwm),
            ("steady state (VmRSS)", none.steady_rss, many.steady_rss),
        ] {
            let difference = mib(measured) - mib(baseline);
            worst = worst.max(difference);
            println!(
                "  {mode:<22} {label:<26} none {:>6.1} MiB  with objects {:>6.1} MiB  difference {difference:>+5.1} MiB",
                mib(baseline),
                mib(measured)
            );
        }
        println!(
            "  {mode:<22} first sync took {:.2} s (none) / {:.2} s (with objects)",
            none.sync.as_secs_f64(),
            many.sync.as_secs_f64()
        );
    }
    println!("largest difference: {worst:+.1} MiB (target: at most 2 MiB)");
    Ok(())
}

fn spawn_self(extra: &[String]) -> anyhow::Result<Child> {
    Command::new(std::env::current_exe()?)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawn a child of the benchmark")
}

fn run_case(args: &Args, objects: usize, secret_refs: bool) -> anyhow::Result<Sample> {
    let common = [
        "--namespaces".to_string(),
        args.namespaces.to_string(),
        "--size".into(),
        args.size.to_string(),
        "--steady".into(),
        args.steady.to_string(),
    ];
    let mut server =
        spawn_self(&[&["--serve-api".into(), objects.to_string()], &common[..]].concat())?;
    let result = (|| {
        let mut lines = BufReader::new(server.stdout.take().context("server stdout")?).lines();
        let port = lines.next().context("server port")??;
        let mut operator_args = vec!["--operator".to_string(), port];
        if secret_refs {
            operator_args.push("--secret-refs".into());
        }
        let operator = spawn_self(&[&operator_args[..], &common[..]].concat())?;
        let output = operator.wait_with_output()?;
        if !output.status.success() {
            bail!("the operator process failed");
        }
        let text = String::from_utf8(output.stdout)?;
        let sample: Value = serde_json::from_str(text.lines().last().unwrap_or_default())
            .context("the operator process's figures")?;
        let kib = |key: &str| sample[key].as_u64().unwrap_or(0);
        Ok(Sample {
            synced_hwm: kib("synced_hwm"),
            steady_hwm: kib("steady_hwm"),
            steady_rss: kib("steady_rss"),
            sync: Duration::from_secs_f64(sample["sync_s"].as_f64().unwrap_or(0.0)),
        })
    })();
    let _ = server.kill();
    let _ = server.wait();
    result
}

/// `kubectl apply`'s metadata, as a real server returns it for an object made by kubectl.
fn managed_fields(kind_fields: Value) -> Value {
    json!([{
        "manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "v1",
        "time": "2026-11-30T09:12:44Z", "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}},
                                    "f:labels": {".": {}, "f:app.kubernetes.io/name": {}, "f:app.kubernetes.io/part-of": {}}},
                     "f:data": kind_fields}
    }])
}

/// An object of `kind` in a tenant namespace, with `size` bytes of data.
fn tenant_object(kind: &str, namespace: &str, name: &str, size: usize, uid: usize) -> Value {
    let value = "x".repeat(size);
    let (data, fields) = if kind == "Secret" {
        // base64 of `size` bytes.
        let encoded = "eA".repeat(size * 4 / 3 / 2);
        (
            json!({"tls.key": encoded}),
            json!({".": {}, "f:tls.key": {}}),
        )
    } else {
        (
            json!({"config.yaml": value}),
            json!({".": {}, "f:config.yaml": {}}),
        )
    };
    let mut object = json!({
        "apiVersion": "v1", "kind": kind,
        "metadata": {
            "name": name, "namespace": namespace,
            "uid": format!("6a1f0c2e-0000-4000-8000-{uid:012}"),
            "creationTimestamp": "2026-11-30T09:12:44Z",
            "labels": {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "tenant-app"},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": format!("{{\"apiVersion\":\"v1\",\"kind\":\"{kind}\",\"metadata\":{{\"name\":\"{name}\",\"namespace\":\"{namespace}\"}}}}\n")},
            "managedFields": managed_fields(fields),
        },
        "data": data,
    });
    if kind == "Secret" {
        object["type"] = json!("Opaque");
    }
    object
}

/// The fake cluster: the operator's MessageBroker and its Secret, one tenant namespace with
/// one pipeline per broker mode, and `objects` Secrets and ConfigMaps elsewhere.
fn cluster(args: &Args, objects: usize) -> FakeApi {
    let api = FakeApi::default();
    api.set_crd(true);
    api.put(
        "/apis/msgpipe.io/v1alpha1/messagebrokers/shared",
        json!({"apiVersion": "msgpipe.io/v1alpha1", "kind": "MessageBroker",
               "metadata": {"name": "shared", "generation": 1},
               "spec": {"uri": "amqp://rabbit.invalid:5672", "secretRef": {"name": "rabbitmq-admin"},
                        "tenants": {"namespaceSelector": {"matchLabels": {"msgpipe.io/tenant": "true"}},
                                    "vhost": "{{namespace}}", "sharedVhosts": [VHOST]}}}),
    );
    api.put(
        &format!("/api/v1/namespaces/{OPERATOR_NS}/secrets/rabbitmq-admin"),
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "rabbitmq-admin", "namespace": OPERATOR_NS},
               "stringData": {"username": "msgpipe", "password": "bench-only"}}),
    );
    api.put(
        "/api/v1/namespaces/bench",
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "bench", "labels": {"msgpipe.io/tenant": "true"}}}),
    );
    api.put(
        "/api/v1/namespaces/bench/secrets/rabbitmq",
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "rabbitmq", "namespace": "bench"},
               "stringData": {"uri": format!("amqp://app:pw@rabbit.invalid:5672/{VHOST}")}}),
    );
    let mut bulk = Vec::with_capacity(objects * 2);
    for i in 0..objects {
        let namespace = format!("team-{:03}", i % args.namespaces.max(1));
        for (kind, resource) in [("Secret", "secrets"), ("ConfigMap", "configmaps")] {
            let name = format!("app-{i:05}");
            bulk.push((
                format!("/api/v1/namespaces/{namespace}/{resource}/{name}"),
                tenant_object(kind, &namespace, &name, args.size, bulk.len()),
            ));
        }
    }
    api.preload(bulk);
    api
}

fn pipeline(name: &str, broker: Value) -> Value {
    json!({
        "apiVersion": "msgpipe.io/v1alpha1", "kind": "MessagePipeline",
        "metadata": {"name": name, "namespace": "bench", "generation": 1},
        "spec": {"broker": broker, "queue": {"name": name}, "deadLetter": {"retention": "14d"}}
    })
}

fn pipeline_path(name: &str) -> String {
    format!("/apis/msgpipe.io/v1alpha1/namespaces/bench/messagepipelines/{name}")
}

async fn serve_api(args: &Args, objects: usize) -> anyhow::Result<()> {
    let api = cluster(args, objects);
    api.put(
        &pipeline_path("by-broker"),
        pipeline(
            "by-broker",
            json!({"brokerRef": {"name": "shared"}, "vhost": VHOST}),
        ),
    );
    api.put(
        &pipeline_path("by-secret"),
        pipeline(
            "by-secret",
            json!({"secretRef": {"name": "rabbitmq"}, "vhost": VHOST}),
        ),
    );
    support::serve(api).await
}

/// Ready=True on the pipeline `name`.
async fn ready(client: &kube::Client, name: &str) -> bool {
    let request = http::Request::get(pipeline_path(name))
        .body(Vec::new())
        .expect("request");
    let Ok(object) = client.request::<Value>(request).await else {
        return false;
    };
    object["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

async fn open_watches(port: u16) -> usize {
    let url = format!("http://127.0.0.1:{port}{WATCHES_PATH}");
    match reqwest::get(&url).await {
        Ok(response) => response
            .text()
            .await
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// The operator process: the controller until its pipelines are Ready and every watch is
/// open (every list done), then the steady state; prints its figures as one JSON line.
async fn operator(args: &Args, port: u16) -> anyhow::Result<()> {
    msgpipe::broker::install_crypto_provider();
    let started = Instant::now();
    let mut config = kube::Config::new(format!("http://127.0.0.1:{port}").parse()?);
    config.default_namespace = "default".into();
    let client = kube::Client::try_from(config).context("kube client")?;
    let broker =
        Arc::new(MemoryBroker::new("amqp://msgpipe@rabbit.invalid:5672").with_vhost(VHOST, 4));
    let pool = BrokerPool::with_connector(
        Duration::from_secs(5),
        BROKER_CONCURRENCY,
        Box::new(move |_, _| Ok(broker.clone())),
    );
    let brokers = BrokerAccess {
        secret_refs: args.secret_refs,
        message_brokers: true,
        operator_namespace: OPERATOR_NS.into(),
        cache: Default::default(),
    };
    let ctx = Arc::new(Context::with_brokers(
        client.clone(),
        Arc::new(Metrics::default()),
        OperatorConfig {
            brokers,
            ..OperatorConfig::default()
        },
        pool,
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(run_controller(ctx, None, async move {
        let _ = stopped.await;
    }));
    let mut pipelines = vec!["by-broker"];
    if args.secret_refs {
        pipelines.push("by-secret");
    }
    // pipelines, owned ConfigMaps, Secrets (cluster-wide or the operator's namespace),
    // MessageBrokers.
    const WATCHES: usize = 4;
    loop {
        let mut done = open_watches(port).await >= WATCHES;
        for name in &pipelines {
            done = done && ready(&client, name).await;
        }
        if done {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("not synced after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sync = started.elapsed();
    let synced_hwm = status_kib("VmHWM");
    tokio::time::sleep(Duration::from_secs(args.steady)).await;
    let figures = json!({
        "synced_hwm": synced_hwm,
        "steady_hwm": status_kib("VmHWM"),
        "steady_rss": status_kib("VmRSS"),
        "sync_s": sync.as_secs_f64(),
    });
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), controller).await;
    println!("{figures}");
    Ok(())
}
