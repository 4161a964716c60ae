//! A dead broker does not hold the others up: 20 pipelines on a broker that accepts
//! connections and never answers (every call runs into its timeout) and 5 on the live test
//! broker, reconciled by a pool of workers as the controller runs them (dead ones first,
//! the worst order). The live ones must converge about as fast as they do alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{StreamExt, stream};
use kube::runtime::controller::Action;
use msgpipe::api::MessagePipeline;
use msgpipe::controller::{Context, Metrics, OperatorConfig, reconcile};
use serde_json::{Value, json};

use super::fake_api::FakeApi;
use super::notes_object;
use super::support::{self, TestVhost};

const NS: &str = "fleet";
const LIVE_PIPELINES: usize = 5;
const DEAD_PIPELINES: usize = 20;
/// The operator's default reconcile concurrency.
const WORKERS: usize = 8;
const BROKER_TIMEOUT: Duration = Duration::from_secs(3);

fn pipeline_path(name: &str) -> String {
    format!("/apis/msgpipe.io/v1alpha1/namespaces/{NS}/messagepipelines/{name}")
}

fn secret_path(name: &str) -> String {
    format!("/api/v1/namespaces/{NS}/secrets/{name}")
}

fn pipeline(name: &str, secret: &str, vhost: &str, n: usize) -> Value {
    let mut object = notes_object(vhost, "Retain");
    object["metadata"]["name"] = json!(name);
    object["metadata"]["namespace"] = json!(NS);
    object["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{n:012}"));
    object["spec"]["broker"]["secretRef"]["name"] = json!(secret);
    object
}

fn secret(name: &str, uri: &str, management: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "stringData": {"uri": uri, "managementUri": management}
    })
}

/// A TCP listener that accepts every connection and never says a word.
async fn blackhole() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (port, task)
}

async fn reconcile_once(api: &FakeApi, ctx: &Arc<Context>, path: &str) -> Result<Action, String> {
    let object = api.get(path).expect("pipeline stored");
    let pipeline: Arc<MessagePipeline> =
        Arc::new(serde_json::from_value(object).expect("pipeline"));
    reconcile(pipeline, ctx.clone())
        .await
        .map_err(|e| e.to_string())
}

fn is_ready(api: &FakeApi, path: &str) -> bool {
    api.get(path).is_some_and(|p| {
        p["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
    })
}

/// Reconciles the live pipelines (on `vhosts`) and `dead` pipelines on the blackhole with
/// `WORKERS` workers, dead ones first; returns when the last live one was Ready.
async fn live_converged_after(vhosts: &[TestVhost], dead: usize, dead_port: u16) -> Duration {
    let api = FakeApi::default();
    api.set_crd(true);
    api.put(
        &secret_path("live-broker"),
        secret(
            "live-broker",
            &support::amqp_uri("/"),
            "http://127.0.0.1:15673",
        ),
    );
    api.put(
        &secret_path("dead-broker"),
        secret(
            "dead-broker",
            &format!("amqp://guest:guest@127.0.0.1:{dead_port}/%2f"),
            &format!("http://127.0.0.1:{dead_port}"),
        ),
    );
    let mut order = Vec::new();
    for n in 0..dead {
        let name = format!("dead-{n}");
        api.put(
            &pipeline_path(&name),
            pipeline(&name, "dead-broker", "/", n),
        );
        order.push((pipeline_path(&name), false));
    }
    for (n, vhost) in vhosts.iter().enumerate() {
        let name = format!("live-{n}");
        let object = pipeline(&name, "live-broker", &vhost.name, 100 + n);
        api.put(&pipeline_path(&name), object);
        order.push((pipeline_path(&name), true));
    }
    let (client, _server) = api.client();
    let config = OperatorConfig {
        broker_timeout: BROKER_TIMEOUT,
        ..OperatorConfig::default()
    };
    let ctx = Arc::new(Context::new(client, Arc::new(Metrics::default()), config));
    let started = Instant::now();
    let live_done: Vec<Option<Duration>> = stream::iter(order)
        .map(|(path, live)| {
            let (api, ctx) = (api.clone(), ctx.clone());
            async move {
                // The first pass adds the finalizer.
                let _ = reconcile_once(&api, &ctx, &path).await;
                let result = reconcile_once(&api, &ctx, &path).await;
                if !live {
                    return None;
                }
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut result = result;
                while !is_ready(&api, &path) {
                    assert!(Instant::now() < deadline, "{path} never Ready: {result:?}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    result = reconcile_once(&api, &ctx, &path).await;
                }
                Some(started.elapsed())
            }
        })
        .buffer_unordered(WORKERS)
        .collect()
        .await;
    ctx.brokers.close().await;
    live_done
        .into_iter()
        .flatten()
        .max()
        .expect("live pipelines")
}

/// Rounds of (alone, beside the dead ones), interleaved; the best of each is compared, so a
/// burst of load on a shared machine does not decide the result.
const ROUNDS: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_pipelines_converge_as_fast_beside_twenty_on_a_dead_broker() {
    let (dead_port, _blackhole) = blackhole().await;
    let mut alone = Vec::new();
    let mut mixed = Vec::new();
    for round in 0..ROUNDS {
        let vhosts = |kind: &str| -> Vec<TestVhost> {
            (0..LIVE_PIPELINES)
                .map(|n| TestVhost::new(&format!("dead-{kind}{round}-{n}")))
                .collect()
        };
        let (alone_vhosts, mixed_vhosts) = (vhosts("alone"), vhosts("mixed"));
        alone.push(live_converged_after(&alone_vhosts, 0, dead_port).await);
        mixed.push(live_converged_after(&mixed_vhosts, DEAD_PIPELINES, dead_port).await);
    }
    let ms = |runs: &[Duration]| {
        runs.iter()
            .map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let best_alone = alone.iter().min().copied().expect("rounds");
    let best_mixed = mixed.iter().min().copied().expect("rounds");
    let ratio = best_mixed.as_secs_f64() / best_alone.as_secs_f64();
    println!(
        "{LIVE_PIPELINES} live pipelines Ready after [{}] ms alone, [{}] ms beside {DEAD_PIPELINES} on a dead broker \
         (broker timeout {}s, {WORKERS} workers): best-of-{ROUNDS} ratio {ratio:.2}",
        ms(&alone),
        ms(&mixed),
        BROKER_TIMEOUT.as_secs()
    );
    // Without the broker gate the dead pipelines time out one after another behind the
    // snapshot lock before any live one gets a worker: measured 42.8 s vs 0.73 s alone.
    // The margin absorbs a loaded shared machine (2 cores, several test binaries at once);
    // the gate's own cost is the 300 ms probe patience.
    assert!(
        ratio < 2.0 || best_mixed < best_alone + Duration::from_secs(1),
        "live pipelines held up by the dead broker: {best_mixed:?} vs {best_alone:?} alone"
    );
}
