//! How fast msgpipe provisions N notes-like pipelines (4 retry tiers, quorum queues), with
//! the baselines it is judged against measured in the same run, each in a fresh vhost of the
//! benchmark's own RabbitMQ node (`scripts/test-broker.sh ensure msgpipe-bench 5675`):
//!
//! - (a) msgpipe: `broker::reconcile_many`, what `msgpipe apply` does (one snapshot, every
//!   pipeline's policies first, then the rest, at the CLI's default concurrency);
//! - (b) the raw limit: every policy PUT over one keep-alive HTTP session, then every
//!   declare and bind pipelined over one AMQP channel;
//! - (c) the per-object management-API way (as the messaging-topology-operator works): one
//!   sequential HTTP call per object, pipeline after pipeline; (c2) the same with every
//!   policy first, to tell the cost of the transport from the cost of the order.
//!
//! Then a no-op re-apply of the converged pipelines, with broker round trips per pipeline.
//!
//! ```text
//! cargo run --release --example bench_provision -- --pipelines 200
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use futures_util::TryFutureExt;
use futures_util::future::try_join_all;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use msgpipe::api::load::parse_pipelines;
use msgpipe::broker::{self, BrokerEndpoint, RabbitBroker};
use msgpipe::plan::topology::{DesiredTopology, ExchangeKind};
use msgpipe::plan::{DesiredState, plan};
use rabbitmq_http_client::api::{Client, ClientBuilder};
use rabbitmq_http_client::commons::{ExchangeType, PolicyTarget};
use rabbitmq_http_client::requests::{ExchangeParams, PolicyParams, QueueParams};

type HttpApi = Client<String, String, String>;

const CALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Parser)]
#[command(about = "Provisioning speed of msgpipe against the raw and per-object baselines")]
struct Args {
    /// Pipelines to provision, named pipe-0000, pipe-0001, ...
    #[arg(long, default_value_t = 200)]
    pipelines: usize,
    /// Pipelines reconciled at once in (a): `msgpipe apply --concurrency` default.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Node of scripts/test-broker.sh to start and use.
    #[arg(long, default_value = "msgpipe-bench")]
    node: String,
    /// AMQP port of that node; its management API listens on port + 10000.
    #[arg(long, default_value_t = 5675)]
    port: u16,
}

impl Args {
    fn amqp_uri(&self, vhost: &str) -> String {
        let vhost: String =
            percent_encoding::utf8_percent_encode(vhost, percent_encoding::NON_ALPHANUMERIC)
                .collect();
        format!("amqp://guest:guest@127.0.0.1:{}/{vhost}", self.port)
    }

    fn management(&self) -> String {
        format!("http://127.0.0.1:{}", u32::from(self.port) + 10_000)
    }

    fn endpoint(&self, vhost: &str) -> anyhow::Result<BrokerEndpoint> {
        Ok(BrokerEndpoint::new(
            &self.amqp_uri(vhost),
            Some(&self.management()),
            None,
        )?)
    }

    /// A management client over one keep-alive HTTP connection (sequential calls reuse it).
    fn http(&self, timeout: Duration) -> anyhow::Result<HttpApi> {
        let session = reqwest::Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(1)
            .build()?;
        Ok(ClientBuilder::new()
            .with_endpoint(format!("{}/api", self.management()))
            .with_basic_auth_credentials("guest".to_string(), "guest".to_string())
            .with_client(session)
            .build()?)
    }
}

/// One measurement's result.
struct Timing {
    elapsed: Duration,
    /// Broker round trips counted by msgpipe's client (None for the baselines).
    round_trips: Option<u64>,
}

impl Timing {
    fn secs(&self) -> f64 {
        self.elapsed.as_secs_f64()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.pipelines > 0, "--pipelines must be at least 1");
    start_node(&args)?;
    msgpipe::broker::install_crypto_provider();
    let bench = Bench::new(args).await?;
    let n = bench.args.pipelines;

    let (vhost, states) = bench.fresh("bench-msgpipe").await?;
    let a = bench.show(
        "(a)  msgpipe apply path",
        msgpipe_apply(&bench.args, &states).await?,
    );
    bench.expect_every_object(&vhost).await?;
    let noop = noop_reapply(&bench.args, &states).await?;
    vhost.delete(&bench.admin).await;

    let (vhost, states) = bench.fresh("bench-raw").await?;
    let b = bench.show(
        "(b)  raw: 1 pipelined AMQP channel + 1 HTTP session",
        raw_limit(&bench.args, &states).await?,
    );
    bench.expect_every_object(&vhost).await?;
    vhost.delete(&bench.admin).await;

    let (vhost, states) = bench.fresh("bench-per-object-policies-first").await?;
    let c2 = bench.show(
        "(c2) per-object HTTP, every pipeline's policies first",
        per_object_http(&bench.args, &states, PolicyOrder::AllFirst).await?,
    );
    bench.expect_every_object(&vhost).await?;
    vhost.delete(&bench.admin).await;

    let (vhost, states) = bench.fresh("bench-per-object").await?;
    let c = bench.show(
        "(c)  per-object HTTP, pipeline after pipeline",
        per_object_http(&bench.args, &states, PolicyOrder::PerPipeline).await?,
    );
    bench.expect_every_object(&vhost).await?;
    vhost.delete(&bench.admin).await;

    println!("a/b  = {:>6.2}  (target <= 1.2)", a.secs() / b.secs());
    println!("c/a  = {:>6.2}  (target >= 5)", c.secs() / a.secs());
    println!(
        "c2/a = {:>6.2}  (per-object HTTP with the same policies-first order)",
        c2.secs() / a.secs()
    );
    let trips = noop.round_trips.unwrap_or_default();
    println!(
        "no-op re-apply of {n} converged pipelines: {:.3} s, {trips} broker round trips = {:.3} per pipeline (target <= 1)",
        noop.secs(),
        trips as f64 / n as f64
    );
    Ok(())
}

/// The node, its admin client, and what every measurement must leave in its vhost.
struct Bench {
    args: Args,
    admin: HttpApi,
    per_pipeline: Census,
}

impl Bench {
    async fn new(args: Args) -> anyhow::Result<Self> {
        // Deleting a vhost of a thousand quorum queues takes a while.
        let admin = args.http(Duration::from_secs(600))?;
        let version = admin.server_version().await?;
        let per_pipeline = census_of(&pipelines(1, "probe")?[0].topology);
        println!(
            "bench-provision: {} pipelines x {} objects ({per_pipeline}), RabbitMQ {version} at 127.0.0.1:{}",
            args.pipelines,
            per_pipeline.total(),
            args.port
        );
        Ok(Self {
            args,
            admin,
            per_pipeline,
        })
    }

    /// A new empty vhost and the pipelines planned on it.
    async fn fresh(&self, prefix: &str) -> anyhow::Result<(FreshVhost, Vec<DesiredState>)> {
        let vhost = FreshVhost::new(&self.admin, prefix).await?;
        let states = pipelines(self.args.pipelines, &vhost.name)?;
        Ok((vhost, states))
    }

    /// Fails unless the vhost holds every pipeline's objects, so each run did the same work.
    async fn expect_every_object(&self, vhost: &FreshVhost) -> anyhow::Result<()> {
        vhost
            .expect_census(&self.admin, &self.per_pipeline, self.args.pipelines)
            .await
    }

    fn show(&self, what: &str, timing: Timing) -> Timing {
        let trips = timing.round_trips.map_or(String::new(), |t| {
            format!(
                "  ({:.1} broker round trips per pipeline)",
                t as f64 / self.args.pipelines as f64
            )
        });
        println!("{what:<55} {:>8.2} s{trips}", timing.secs());
        timing
    }
}

fn start_node(args: &Args) -> anyhow::Result<()> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-broker.sh");
    let status = std::process::Command::new(script)
        .args(["ensure", &args.node, &args.port.to_string()])
        .status()
        .with_context(|| format!("cannot run {script}"))?;
    ensure!(status.success(), "{script} ensure {} failed", args.node);
    Ok(())
}

/// `n` notes-like pipelines on `vhost`: quorum, 5 attempts (4 retry tiers), DLQ retention.
fn pipelines(n: usize, vhost: &str) -> anyhow::Result<Vec<DesiredState>> {
    (0..n)
        .map(|i| {
            let manifest = format!(
                "apiVersion: msgpipe.io/v1alpha1\nkind: MessagePipeline\nmetadata: {{ name: pipe-{i:04}, namespace: bench }}\nspec:\n  broker: {{ secretRef: {{ name: rabbitmq }}, vhost: \"{vhost}\" }}\n  queue: {{ type: quorum }}\n  retry: {{ maxAttempts: 5, backoff: {{ initialDelay: 1s, multiplier: 2, maxDelay: 1m }} }}\n  deadLetter: {{ retention: 14d }}\n"
            );
            let pipeline = parse_pipelines(&manifest)?.remove(0);
            Ok(plan(&pipeline, None)?)
        })
        .collect()
}

/// (a) What `msgpipe apply` does: `broker::reconcile_many` (one snapshot per vhost, every
/// pipeline's policies first, then the rest, `concurrency` pipelines at a time).
async fn msgpipe_apply(args: &Args, states: &[DesiredState]) -> anyhow::Result<Timing> {
    timed_reconcile(args, states, states.len()).await
}

/// (a) again on the converged vhost, as a new `msgpipe apply` run: nothing may be written.
async fn noop_reapply(args: &Args, states: &[DesiredState]) -> anyhow::Result<Timing> {
    timed_reconcile(args, states, 0).await
}

/// Runs (a) with a new client, as a new CLI run would, and checks how many pipelines wrote.
async fn timed_reconcile(
    args: &Args,
    states: &[DesiredState],
    expected_writers: usize,
) -> anyhow::Result<Timing> {
    let vhost = &states[0].topology.vhost;
    let broker = RabbitBroker::new(args.endpoint(vhost)?, CALL_TIMEOUT)?;
    let start = Instant::now();
    let outcome = async {
        let live = broker::snapshot_vhosts(&broker, states).await?;
        anyhow::Ok(broker::reconcile_many(&broker, states, &live, args.concurrency.max(1)).await)
    }
    .await;
    let elapsed = start.elapsed();
    broker.close().await;
    let mut writers = 0;
    for (_, report) in outcome? {
        let report = report.map_err(|failed| anyhow::anyhow!("{failed}"))?;
        ensure!(report.conflicts.is_empty(), "{:?}", report.conflicts);
        writers += usize::from(report.wrote());
    }
    ensure!(
        writers == expected_writers,
        "{writers} pipelines wrote, expected {expected_writers}"
    );
    Ok(Timing {
        elapsed,
        round_trips: Some(broker.round_trips()),
    })
}

/// (b) The raw limit: every policy PUT back to back over one keep-alive HTTP session, then
/// one AMQP channel with every declare in flight at once (exchanges and queues, then the
/// bindings that need them). Policies go first because RabbitMQ 3.x matches every policy
/// against every object of the vhost on each policy PUT: side by side with the declares the
/// same work took 3.4 times as long (17.8 s against 5.3 s for 50 pipelines).
async fn raw_limit(args: &Args, states: &[DesiredState]) -> anyhow::Result<Timing> {
    let vhost = &states[0].topology.vhost;
    let http = args.http(CALL_TIMEOUT)?;
    let start = Instant::now();
    for state in states {
        put_policies(&http, &state.topology).await?;
    }
    let connection = lapin::Connection::connect(
        &args.amqp_uri(vhost),
        lapin::ConnectionProperties::default(),
    )
    .await?;
    let channel = connection.create_channel().await?;
    let topologies: Vec<&DesiredTopology> = states.iter().map(|s| &s.topology).collect();
    try_join_all(topologies.iter().flat_map(|t| declare_all(&channel, t))).await?;
    try_join_all(topologies.iter().flat_map(|t| bind_all(&channel, t))).await?;
    let elapsed = start.elapsed();
    connection.close(200, "bench done".into()).await?;
    Ok(Timing {
        elapsed,
        round_trips: None,
    })
}

type Pending<'a> = std::pin::Pin<Box<dyn Future<Output = Result<(), lapin::Error>> + Send + 'a>>;

/// The exchange and queue declares of one topology, not yet sent.
fn declare_all<'a>(channel: &'a lapin::Channel, topology: &'a DesiredTopology) -> Vec<Pending<'a>> {
    let mut pending: Vec<Pending<'a>> = Vec::new();
    for exchange in &topology.exchanges {
        let kind = match exchange.kind {
            ExchangeKind::Direct => lapin::ExchangeKind::Direct,
            ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
        };
        let options = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let name = exchange.name.as_str().into();
        pending.push(Box::pin(channel.exchange_declare(
            name,
            kind,
            options,
            FieldTable::default(),
        )));
    }
    for queue in &topology.queues {
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(queue.queue_type.as_str().into()),
        );
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let declare = channel.queue_declare(queue.name.as_str().into(), options, arguments);
        pending.push(Box::pin(declare.map_ok(|_| ())));
    }
    pending
}

/// The queue bindings of one topology, not yet sent.
fn bind_all<'a>(channel: &'a lapin::Channel, topology: &'a DesiredTopology) -> Vec<Pending<'a>> {
    let bind = |b: &'a msgpipe::plan::topology::Binding| -> Pending<'a> {
        Box::pin(channel.queue_bind(
            b.destination.as_str().into(),
            b.source.as_str().into(),
            b.routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ))
    };
    topology.bindings.iter().map(bind).collect()
}

/// PUTs a topology's policies one after the other, with msgpipe's definitions.
async fn put_policies(http: &HttpApi, topology: &DesiredTopology) -> anyhow::Result<()> {
    for policy in &topology.policies {
        let params = PolicyParams {
            vhost: &topology.vhost,
            name: &policy.name,
            pattern: &policy.pattern,
            apply_to: PolicyTarget::Queues,
            priority: policy.priority,
            definition: broker::diff::policy_definition(&policy.definition, 3),
        };
        http.declare_policy(&params).await?;
    }
    Ok(())
}

/// When the per-object baseline PUTs policies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PolicyOrder {
    /// Each pipeline's policies, then its exchanges, queues and bindings, pipeline after pipeline.
    PerPipeline,
    /// Every pipeline's policies, then every other object.
    AllFirst,
}

/// (c) One management API call per object, each waiting for the previous one.
async fn per_object_http(
    args: &Args,
    states: &[DesiredState],
    order: PolicyOrder,
) -> anyhow::Result<Timing> {
    let http = args.http(CALL_TIMEOUT)?;
    let start = Instant::now();
    if order == PolicyOrder::AllFirst {
        for state in states {
            put_policies(&http, &state.topology).await?;
        }
    }
    for state in states {
        if order == PolicyOrder::PerPipeline {
            put_policies(&http, &state.topology).await?;
        }
        declare_over_http(&http, &state.topology).await?;
    }
    Ok(Timing {
        elapsed: start.elapsed(),
        round_trips: None,
    })
}

/// A topology's exchanges, queues and bindings, one management API call each.
async fn declare_over_http(http: &HttpApi, topology: &DesiredTopology) -> anyhow::Result<()> {
    let vhost = &topology.vhost;
    for exchange in &topology.exchanges {
        let kind = match exchange.kind {
            ExchangeKind::Direct => ExchangeType::Direct,
            ExchangeKind::Fanout => ExchangeType::Fanout,
        };
        let params = ExchangeParams::durable(&exchange.name, kind, None);
        http.declare_exchange(vhost, &params).await?;
    }
    for queue in &topology.queues {
        let params = QueueParams::new_quorum_queue(&queue.name, None);
        http.declare_queue(vhost, &params).await?;
    }
    for b in &topology.bindings {
        let key = Some(b.routing_key.as_str());
        http.bind_queue(vhost, &b.destination, &b.source, key, None)
            .await?;
    }
    Ok(())
}

/// Objects of one kind and another in a vhost (or a topology).
#[derive(Debug, PartialEq, Eq)]
struct Census {
    exchanges: usize,
    queues: usize,
    bindings: usize,
    policies: usize,
}

impl Census {
    fn total(&self) -> usize {
        self.exchanges + self.queues + self.bindings + self.policies
    }

    fn times(&self, n: usize) -> Census {
        Census {
            exchanges: self.exchanges * n,
            queues: self.queues * n,
            bindings: self.bindings * n,
            policies: self.policies * n,
        }
    }
}

impl std::fmt::Display for Census {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} exchanges, {} quorum queues, {} bindings, {} policies",
            self.exchanges, self.queues, self.bindings, self.policies
        )
    }
}

fn census_of(topology: &DesiredTopology) -> Census {
    Census {
        exchanges: topology.exchanges.len(),
        queues: topology.queues.len(),
        bindings: topology.bindings.len(),
        policies: topology.policies.len(),
    }
}

/// A vhost made for one measurement, with guest allowed everything.
struct FreshVhost {
    name: String,
}

impl FreshVhost {
    async fn new(admin: &HttpApi, prefix: &str) -> anyhow::Result<Self> {
        let name = format!("{prefix}-{}", std::process::id());
        let fresh = Self { name };
        fresh.delete(admin).await;
        let params = rabbitmq_http_client::requests::VirtualHostParams::named(&fresh.name);
        admin.create_vhost(&params).await?;
        let everything = rabbitmq_http_client::requests::Permissions {
            user: "guest",
            vhost: &fresh.name,
            configure: ".*",
            read: ".*",
            write: ".*",
        };
        admin.declare_permissions(&everything).await?;
        Ok(fresh)
    }

    /// Fails unless the vhost holds exactly `n` times `each` (so every run did the same work).
    async fn expect_census(&self, admin: &HttpApi, each: &Census, n: usize) -> anyhow::Result<()> {
        let exchanges = admin.list_exchanges_in(&self.name).await?;
        let found = Census {
            exchanges: exchanges
                .iter()
                .filter(|e| !e.name.is_empty() && !e.name.starts_with("amq."))
                .count(),
            queues: admin.list_queues_in(&self.name).await?.len(),
            bindings: admin
                .list_bindings_in(&self.name)
                .await?
                .iter()
                .filter(|b| !b.source.is_empty())
                .count(),
            policies: admin.list_policies_in(&self.name).await?.len(),
        };
        let expected = each.times(n);
        if found != expected {
            bail!("vhost {} holds {found}, expected {expected}", self.name);
        }
        Ok(())
    }

    async fn delete(&self, admin: &HttpApi) {
        let _ = admin.delete_vhost(&self.name, true).await;
    }
}
