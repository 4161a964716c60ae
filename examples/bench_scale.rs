//! msgpipe with hundreds of pipelines in one vhost: what a first sync, a resync and a spec
//! change cost as the vhost grows, against what RabbitMQ itself charges for one write of the
//! same kind in the same vhost, measured in the same run (its own node:
//! `scripts/test-broker.sh ensure msgpipe-scale 5660`, a fresh vhost per size).
//!
//! For each size N:
//! - first sync: `msgpipe apply` of N new pipelines (`broker::reconcile_many`);
//! - resync: the same again on the converged vhost (must write nothing);
//! - spec change, new delays: one pipeline's backoff changes (new tier queues, no policy);
//! - spec change, new attempts: one pipeline's `maxAttempts` changes (its work-queue policy
//!   gets a new `delivery-limit`, a tier is added);
//! - the physical limit of each: a raw declare of one queue, and a raw PUT of one policy,
//!   into the same vhost (RabbitMQ re-matches every queue of the vhost against every policy
//!   on each policy write, so that write's cost grows with queues x policies).
//!
//! ```text
//! cargo run --release --example bench_scale -- --pipelines 200,500,1000
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Parser;
use msgpipe::api::load::parse_pipelines;
use msgpipe::broker::{self, BrokerApi, BrokerEndpoint, RabbitBroker};
use msgpipe::plan::{DesiredState, plan};
use serde_json::{Value, json};

const CALL_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Parser)]
#[command(about = "First sync, resync and spec-change latency at 200/500/1,000 pipelines")]
struct Args {
    /// Vhost sizes to measure, in pipelines (each in a fresh vhost).
    #[arg(long, value_delimiter = ',', default_value = "200,500,1000")]
    pipelines: Vec<usize>,
    /// Pipelines reconciled at once (`msgpipe apply --concurrency` default).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Queue type of every pipeline (quorum is msgpipe's default).
    #[arg(long, default_value = "quorum")]
    queue_type: String,
    /// Spec changes measured per size (the median is reported).
    #[arg(long, default_value_t = 3)]
    changes: usize,
    #[arg(long, default_value = "msgpipe-scale")]
    node: String,
    #[arg(long, default_value_t = 5660)]
    port: u16,
}

impl Args {
    fn management(&self) -> String {
        format!("http://127.0.0.1:{}", u32::from(self.port) + 10_000)
    }

    fn broker(&self, vhost: &str) -> anyhow::Result<RabbitBroker> {
        let encoded: String =
            percent_encoding::utf8_percent_encode(vhost, percent_encoding::NON_ALPHANUMERIC)
                .collect();
        let endpoint = BrokerEndpoint::new(
            &format!("amqp://guest:guest@127.0.0.1:{}/{encoded}", self.port),
            Some(&self.management()),
            None,
        )?;
        Ok(RabbitBroker::new(endpoint, CALL_TIMEOUT)?)
    }
}

/// The management API, for the raw writes and the vhost's lifecycle.
struct Admin {
    http: reqwest::Client,
    base: String,
}

impl Admin {
    fn encode(segment: &str) -> String {
        percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC)
            .to_string()
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}/api{path}", self.base))
            .basic_auth("guest", Some("guest"));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        ensure!(status.is_success(), "{method} {path}: {status} {text}");
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn fresh_vhost(&self, name: &str) -> anyhow::Result<()> {
        let vhost = Self::encode(name);
        let _ = self
            .call(reqwest::Method::DELETE, &format!("/vhosts/{vhost}"), None)
            .await;
        self.call(reqwest::Method::PUT, &format!("/vhosts/{vhost}"), None)
            .await?;
        self.call(
            reqwest::Method::PUT,
            &format!("/permissions/{vhost}/guest"),
            Some(json!({"configure": ".*", "write": ".*", "read": ".*"})),
        )
        .await?;
        Ok(())
    }

    /// Deletes the vhost and waits until it is gone: deleting thousands of quorum queues
    /// outlasts the management API's request timeout, which closes the connection while the
    /// node goes on deleting.
    async fn delete_vhost(&self, name: &str) {
        let path = format!("/vhosts/{}", Self::encode(name));
        let _ = self.call(reqwest::Method::DELETE, &path, None).await;
        let deadline = Instant::now() + CALL_TIMEOUT;
        while Instant::now() < deadline {
            if self.call(reqwest::Method::GET, &path, None).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        eprintln!("vhost {name} still exists after {CALL_TIMEOUT:?}; delete it by hand");
    }
}

fn pipeline(i: usize, vhost: &str, queue_type: &str, retry: &str) -> anyhow::Result<DesiredState> {
    let manifest = format!(
        "apiVersion: msgpipe.io/v1alpha1\nkind: MessagePipeline\nmetadata: {{ name: pipe-{i:04}, namespace: bench }}\nspec:\n  broker: {{ secretRef: {{ name: rabbitmq }}, vhost: \"{vhost}\" }}\n  queue: {{ type: {queue_type} }}\n  retry: {retry}\n  deadLetter: {{ retention: 14d }}\n"
    );
    let pipeline = parse_pipelines(&manifest)?.remove(0);
    Ok(plan(&pipeline, None)?)
}

const RETRY: &str =
    "{ maxAttempts: 5, backoff: { initialDelay: 1s, multiplier: 2, maxDelay: 1m } }";

/// Reconciles `states` from one fresh snapshot, as one `msgpipe apply` (or one operator
/// reconcile, for a single pipeline) does; returns the time and the pipelines that wrote.
async fn apply(
    broker: &RabbitBroker,
    states: &[DesiredState],
    concurrency: usize,
) -> anyhow::Result<(Duration, usize)> {
    let start = Instant::now();
    let live = broker::snapshot_vhosts(broker, states).await?;
    let reports = broker::reconcile_many(broker, states, &live, concurrency).await;
    let elapsed = start.elapsed();
    let mut writers = 0;
    for (_, report) in reports {
        let report = report.map_err(|failed| anyhow::anyhow!("{failed}"))?;
        ensure!(report.conflicts.is_empty(), "{:?}", report.conflicts);
        writers += usize::from(report.wrote());
    }
    Ok((elapsed, writers))
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values.get(values.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

struct Row {
    pipelines: usize,
    queues: usize,
    policies: usize,
    first_sync: Duration,
    resync: Duration,
    delay_change: Duration,
    attempts_change: Duration,
    raw_declare: Duration,
    raw_policy: Duration,
}

async fn measure(args: &Args, admin: &Admin, n: usize) -> anyhow::Result<Row> {
    let vhost = format!("bench-scale-{n}-{}", std::process::id());
    admin.fresh_vhost(&vhost).await?;
    let broker = args.broker(&vhost)?;
    let states: Vec<DesiredState> = (0..n)
        .map(|i| pipeline(i, &vhost, &args.queue_type, RETRY))
        .collect::<anyhow::Result<_>>()?;

    let (first_sync, writers) = apply(&broker, &states, args.concurrency).await?;
    ensure!(writers == n, "first sync: {writers} of {n} pipelines wrote");
    let (resync, writers) = apply(&broker, &states, args.concurrency).await?;
    ensure!(
        writers == 0,
        "resync of a converged vhost: {writers} pipelines wrote"
    );
    let live = broker.snapshot(&vhost).await?;
    let (queues, policies) = (live.queues.len(), live.policies.len());

    // Spec changes of one pipeline each, each on a pipeline nobody changed before.
    let mut delay_changes = Vec::new();
    let mut attempts_changes = Vec::new();
    for k in 0..args.changes.max(1) {
        let slower =
            "{ maxAttempts: 5, backoff: { initialDelay: 3s, multiplier: 2, maxDelay: 1m } }";
        let changed = pipeline(k, &vhost, &args.queue_type, slower)?;
        let (elapsed, writers) = apply(&broker, std::slice::from_ref(&changed), 1).await?;
        ensure!(writers == 1, "a delay change wrote nothing");
        delay_changes.push(elapsed);

        let more = "{ maxAttempts: 6, backoff: { initialDelay: 1s, multiplier: 2, maxDelay: 1m } }";
        let changed = pipeline(n - 1 - k, &vhost, &args.queue_type, more)?;
        let (elapsed, writers) = apply(&broker, std::slice::from_ref(&changed), 1).await?;
        ensure!(writers == 1, "an attempts change wrote nothing");
        attempts_changes.push(elapsed);
    }

    // The physical limits in the same vhost: one queue declare, one policy write.
    let v = Admin::encode(&vhost);
    let mut raw_declares = Vec::new();
    let mut raw_policies = Vec::new();
    for k in 0..args.changes.max(1) {
        let queue = format!("raw-{k}");
        let start = Instant::now();
        admin
            .call(
                reqwest::Method::PUT,
                &format!("/queues/{v}/{queue}"),
                Some(json!({"durable": true, "arguments": {"x-queue-type": args.queue_type}})),
            )
            .await?;
        raw_declares.push(start.elapsed());
        let start = Instant::now();
        admin
            .call(
                reqwest::Method::PUT,
                &format!("/policies/{v}/raw-{k}"),
                Some(
                    json!({"pattern": format!("^raw-{k}$"), "apply-to": "queues", "priority": 10,
                            "definition": {"delivery-limit": 7, "overflow": "reject-publish"}}),
                ),
            )
            .await?;
        raw_policies.push(start.elapsed());
    }
    broker.close().await;
    admin.delete_vhost(&vhost).await;
    Ok(Row {
        pipelines: n,
        queues,
        policies,
        first_sync,
        resync,
        delay_change: median(delay_changes),
        attempts_change: median(attempts_changes),
        raw_declare: median(raw_declares),
        raw_policy: median(raw_policies),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.pipelines.iter().all(|n| *n > args.changes),
        "each size needs more pipelines than --changes"
    );
    let status = std::process::Command::new("scripts/test-broker.sh")
        .args(["ensure", &args.node, &args.port.to_string()])
        .status()
        .context("scripts/test-broker.sh")?;
    ensure!(status.success(), "broker node did not start");
    msgpipe::broker::install_crypto_provider();
    let admin = Admin {
        http: reqwest::Client::builder().timeout(CALL_TIMEOUT).build()?,
        base: args.management(),
    };
    let overview = admin.call(reqwest::Method::GET, "/overview", None).await?;
    println!(
        "bench-scale: RabbitMQ {} at 127.0.0.1:{}, {} queues, {} pipelines at a time; spec changes are medians of {}",
        overview["rabbitmq_version"].as_str().unwrap_or("?"),
        args.port,
        args.queue_type,
        args.concurrency,
        args.changes.max(1)
    );
    println!(
        "{:>9} {:>7} {:>8} | {:>10} {:>9} | {:>12} {:>11} | {:>11} {:>10} | {:>14}",
        "pipelines",
        "queues",
        "policies",
        "first sync",
        "resync",
        "delay change",
        "raw declare",
        "attempts ch.",
        "raw policy",
        "attempts/raw"
    );
    for n in &args.pipelines {
        let row = measure(&args, &admin, *n).await?;
        println!(
            "{:>9} {:>7} {:>8} | {:>8.1} s {:>7.2} s | {:>12} {:>11} | {:>11} {:>10} | {:>13.2}x",
            row.pipelines,
            row.queues,
            row.policies,
            row.first_sync.as_secs_f64(),
            row.resync.as_secs_f64(),
            ms(row.delay_change),
            ms(row.raw_declare),
            ms(row.attempts_change),
            ms(row.raw_policy),
            row.attempts_change.as_secs_f64() / row.raw_policy.as_secs_f64().max(1e-9)
        );
    }
    println!(
        "delay change: new tier queues declared with their settings, no policy write. attempts change: one policy write (the work queue's delivery-limit) plus a new tier; RabbitMQ re-matches every queue against every policy of the vhost on each policy write, which the raw policy PUT beside it pays too."
    );
    Ok(())
}
