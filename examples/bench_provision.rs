//! How fast msgpipe provisions N notes-like pipelines (4 retry tiers, quorum queues), with
//! the baselines it is judged against measured in the same run, each run in a fresh vhost of
//! the benchmark's own RabbitMQ node (`scripts/test-broker.sh ensure msgpipe-bench 5675`):
//!
//! - (a) msgpipe: `broker::reconcile_many`, what `msgpipe apply` does (one snapshot, every
//!   pipeline's policies first, then the rest, at the CLI's default concurrency of 8);
//! - (b) the raw limit, in msgpipe's order and as parallel: every policy PUT over K
//!   keep-alive HTTP sessions, then every declare and bind pipelined over K AMQP
//!   connections, with the same declare arguments; K = 1, 8, 16 and 32, and the fastest
//!   of a round is that round's "raw best";
//! - (c) the per-object management-API way (as the messaging-topology-operator works): one
//!   sequential HTTP call per object, pipeline after pipeline; (c2) the same with every
//!   policy first, to tell the cost of the transport from the cost of the order.
//!
//! The contenders take turns over `--rounds` rounds, in an order rotated each round (so none
//! always runs first on a quiet node or last on a busy one); the table gives medians. After
//! each (a), a no-op re-apply of the converged pipelines counts broker round trips.
//!
//! ```text
//! cargo run --release --example bench_provision -- --pipelines 200
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use clap::Parser;
use futures_util::TryFutureExt;
use futures_util::future::try_join_all;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use msgpipe::api::load::parse_pipelines;
use msgpipe::broker::{self, BINDING_MARKER, BrokerEndpoint, RabbitBroker};
use msgpipe::plan::topology::{DesiredTopology, ExchangeKind, Queue};
use msgpipe::plan::{DesiredState, plan};
use rabbitmq_http_client::api::{Client, ClientBuilder};
use rabbitmq_http_client::commons::{ExchangeType, PolicyTarget};
use rabbitmq_http_client::requests::{ExchangeParams, PolicyParams, QueueParams};
use serde_json::{Map, Value};

type HttpApi = Client<String, String, String>;

const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Connections (b) is run with; the fastest of a round is the raw figure of that round.
const RAW_CONNECTIONS: [usize; 4] = [1, 8, 16, 32];

#[derive(Debug, Parser)]
#[command(about = "Provisioning speed of msgpipe against the raw and per-object baselines")]
struct Args {
    /// Pipelines to provision, named pipe-0000, pipe-0001, ...
    #[arg(long, default_value_t = 200)]
    pipelines: usize,
    /// Pipelines reconciled at once in (a): `msgpipe apply --concurrency` default.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Rounds; each runs every contender once, and the table shows medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Node of scripts/test-broker.sh to start and use.
    #[arg(long, default_value = "msgpipe-bench")]
    node: String,
    /// AMQP port of that node; its management API listens on port + 10000.
    #[arg(long, default_value_t = 5675)]
    port: u16,
    /// Leave out (c) and (c2), the slowest contenders (minutes per round at 200 pipelines),
    /// to compare (a) with (b) quickly.
    #[arg(long)]
    skip_per_object: bool,
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

/// One way of provisioning the pipelines.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Contender {
    /// (a) `msgpipe apply`.
    Msgpipe,
    /// (b) raw AMQP + HTTP over this many connections.
    Raw(usize),
    /// (c) and (c2): one management API call per object.
    PerObject(PolicyOrder),
}

impl Contender {
    fn every() -> Vec<Contender> {
        let mut every = vec![Contender::Msgpipe];
        every.extend(RAW_CONNECTIONS.map(Contender::Raw));
        every.push(Contender::PerObject(PolicyOrder::PerPipeline));
        every.push(Contender::PerObject(PolicyOrder::AllFirst));
        every
    }

    fn label(self, concurrency: usize) -> String {
        match self {
            Contender::Msgpipe => format!("(a)  msgpipe apply, {concurrency} pipelines at a time"),
            Contender::Raw(1) => "(b)  raw AMQP + HTTP, 1 connection".to_string(),
            Contender::Raw(k) => format!("(b)  raw AMQP + HTTP, {k} connections"),
            Contender::PerObject(PolicyOrder::PerPipeline) => {
                "(c)  per-object HTTP, pipeline after pipeline".to_string()
            }
            Contender::PerObject(PolicyOrder::AllFirst) => {
                "(c2) per-object HTTP, every policy first".to_string()
            }
        }
    }

    /// The start of its vhosts' names.
    fn vhost_prefix(self) -> String {
        match self {
            Contender::Msgpipe => "bench-msgpipe".to_string(),
            Contender::Raw(k) => format!("bench-raw-{k}"),
            Contender::PerObject(PolicyOrder::PerPipeline) => "bench-per-object".to_string(),
            Contender::PerObject(PolicyOrder::AllFirst) => {
                "bench-per-object-policies-first".to_string()
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.pipelines > 0, "--pipelines must be at least 1");
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    start_node(&args)?;
    msgpipe::broker::install_crypto_provider();
    let bench = Bench::new(args).await?;

    let mut contenders = Contender::every();
    if bench.args.skip_per_object {
        contenders.retain(|c| !matches!(c, Contender::PerObject(_)));
    }
    // Seconds of each contender (in the order of `contenders`), one per round.
    let mut seconds: Vec<Vec<f64>> = vec![Vec::new(); contenders.len()];
    let mut noops = Vec::new();
    for round in 0..bench.args.rounds {
        println!("round {} of {}:", round + 1, bench.args.rounds);
        for turn in 0..contenders.len() {
            let index = (turn + round) % contenders.len();
            let contender = contenders[index];
            let (timing, noop) = bench.measure(contender, round).await?;
            bench.show(&contender.label(bench.args.concurrency), &timing);
            seconds[index].push(timing.secs());
            noops.extend(noop);
        }
    }
    bench.summarize(&contenders, &seconds, &noops);
    Ok(())
}

/// The node, its admin client, and what every measurement must leave in its vhost.
struct Bench {
    args: Args,
    admin: HttpApi,
    server_major: u32,
    per_pipeline: Census,
}

impl Bench {
    async fn new(args: Args) -> anyhow::Result<Self> {
        // Deleting a vhost of a thousand quorum queues takes a while.
        let admin = args.http(Duration::from_secs(600))?;
        let version = admin
            .server_version()
            .await
            .context("read the RabbitMQ version (GET /api/overview)")?;
        let server_major = version
            .split('.')
            .next()
            .and_then(|major| major.parse().ok())
            .with_context(|| format!("RabbitMQ version {version:?} has no major number"))?;
        let per_pipeline = census_of(&pipelines(1, "probe")?[0].topology);
        println!(
            "RabbitMQ {version} (node {}, 127.0.0.1:{})",
            args.node, args.port
        );
        println!(
            "{} new pipelines x {} objects ({per_pipeline}); {} rounds, every run in a fresh vhost",
            args.pipelines,
            per_pipeline.total(),
            args.rounds
        );
        Ok(Self {
            args,
            admin,
            server_major,
            per_pipeline,
        })
    }

    /// Runs `contender` in a fresh vhost, then deletes it (also on failure or Ctrl-C). For
    /// (a), also the no-op re-apply of the converged vhost.
    async fn measure(
        &self,
        contender: Contender,
        round: usize,
    ) -> anyhow::Result<(Timing, Option<Timing>)> {
        let prefix = format!("{}-r{}", contender.vhost_prefix(), round + 1);
        let vhost = FreshVhost::new(&self.admin, &prefix).await?;
        let outcome = tokio::select! {
            outcome = self.run(contender, &vhost) => outcome,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        };
        let deleted = vhost.delete(&self.admin).await;
        let outcome = outcome.with_context(|| contender.label(self.args.concurrency))?;
        deleted?;
        Ok(outcome)
    }

    async fn run(
        &self,
        contender: Contender,
        vhost: &FreshVhost,
    ) -> anyhow::Result<(Timing, Option<Timing>)> {
        let states = pipelines(self.args.pipelines, &vhost.name)?;
        let timing = match contender {
            Contender::Msgpipe => msgpipe_apply(&self.args, &states).await?,
            Contender::Raw(connections) => {
                raw_limit(&self.args, &states, connections, self.server_major).await?
            }
            Contender::PerObject(order) => {
                per_object_http(&self.args, &states, order, self.server_major).await?
            }
        };
        self.expect_every_object(vhost, &states).await?;
        let noop = match contender {
            Contender::Msgpipe => Some(noop_reapply(&self.args, &states).await?),
            _ => None,
        };
        Ok((timing, noop))
    }

    /// Fails unless the vhost holds every pipeline's objects, and every queue the declare
    /// arguments msgpipe gives it, so each run did the same work.
    async fn expect_every_object(
        &self,
        vhost: &FreshVhost,
        states: &[DesiredState],
    ) -> anyhow::Result<()> {
        vhost
            .expect_census(&self.admin, &self.per_pipeline, self.args.pipelines)
            .await?;
        let mut expected = BTreeMap::new();
        for state in states {
            for queue in &state.topology.queues {
                expected.insert(
                    queue.name.clone(),
                    declare_arguments(queue, self.server_major),
                );
            }
        }
        vhost.expect_queue_arguments(&self.admin, &expected).await
    }

    fn show(&self, what: &str, timing: &Timing) {
        let trips = timing.round_trips.map_or(String::new(), |t| {
            format!(
                "  ({:.1} broker round trips per pipeline)",
                t as f64 / self.args.pipelines as f64
            )
        });
        println!("  {what:<48} {:>8.2} s{trips}", timing.secs());
    }

    /// The table: medians over the rounds, then the ratios (medians of per-round ratios).
    fn summarize(&self, contenders: &[Contender], seconds: &[Vec<f64>], noops: &[Timing]) {
        let n = self.args.pipelines;
        let of = |wanted: Contender| {
            let index = contenders.iter().position(|c| *c == wanted);
            index.map_or(&[][..], |i| &seconds[i][..])
        };
        let raw_best: Vec<f64> = (0..self.args.rounds)
            .map(|round| {
                RAW_CONNECTIONS
                    .iter()
                    .filter_map(|k| of(Contender::Raw(*k)).get(round).copied())
                    .fold(f64::INFINITY, f64::min)
            })
            .collect();
        println!();
        print_header(&format!(
            "{n} new pipelines: seconds, {} rounds",
            self.args.rounds
        ));
        for (contender, values) in contenders.iter().zip(seconds) {
            print_spread(&contender.label(self.args.concurrency), values);
        }
        print_spread("(b)  raw best (the fastest (b) of each round)", &raw_best);
        let a = of(Contender::Msgpipe);
        let c = of(Contender::PerObject(PolicyOrder::PerPipeline));
        let c2 = of(Contender::PerObject(PolicyOrder::AllFirst));
        println!();
        print_header("ratios (of the same round's figures)");
        print_spread("a / raw best   (target <= 1.2)", &ratios(a, &raw_best));
        print_spread("c / a          (target >= 5)", &ratios(c, a));
        print_spread("c2 / a         (c with every policy first)", &ratios(c2, a));
        let noop_secs: Vec<f64> = noops.iter().map(Timing::secs).collect();
        let most_trips = noops.iter().filter_map(|t| t.round_trips).max();
        let most_trips = most_trips.unwrap_or_default();
        println!();
        print_spread(&format!("no-op re-apply of the {n}, seconds"), &noop_secs);
        println!(
            "  broker round trips: at most {most_trips} = {:.3} per pipeline (target <= 1)",
            most_trips as f64 / n as f64
        );
    }
}

/// The column titles of [`print_spread`]'s lines.
fn print_header(what: &str) {
    println!("{what:<45} {:>8} {:>8} {:>8}", "median", "min", "max");
}

/// `what`, then the median, min and max of `values`.
fn print_spread(what: &str, values: &[f64]) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let (Some(min), Some(max)) = (sorted.first(), sorted.last()) else {
        println!("{what:<45} (no figures)");
        return;
    };
    let middle = sorted.len() / 2;
    let median = if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    };
    println!("{what:<45} {median:>8.3} {min:>8.3} {max:>8.3}");
}

/// `numerators[r] / denominators[r]` for each round r.
fn ratios(numerators: &[f64], denominators: &[f64]) -> Vec<f64> {
    numerators
        .iter()
        .zip(denominators)
        .map(|(n, d)| n / d)
        .collect()
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
        let report = report.map_err(|failed| anyhow!("{failed}"))?;
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

/// (b) The raw limit over `connections` connections, in msgpipe's order: every policy PUT,
/// each HTTP session putting its share back to back; then each AMQP connection with its
/// share's declares in flight at once on one channel (exchanges and queues, then the
/// bindings that need them). Policies go first because RabbitMQ re-matches the vhost's
/// queues against its policies on each policy PUT: on 3.x, side by side with the declares
/// the same work took 3.4 times as long (17.8 s against 5.3 s for 50 pipelines).
async fn raw_limit(
    args: &Args,
    states: &[DesiredState],
    connections: usize,
    server_major: u32,
) -> anyhow::Result<Timing> {
    let vhost = &states[0].topology.vhost;
    let shares = deal(states, connections);
    let sessions = shares
        .iter()
        .map(|_| args.http(CALL_TIMEOUT))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let start = Instant::now();
    let puts = sessions.iter().zip(&shares);
    try_join_all(puts.map(|(http, share)| put_share_policies(http, share, server_major))).await?;
    let open = try_join_all(
        shares
            .iter()
            .map(|share| declare_share(args, vhost, share, server_major)),
    )
    .await?;
    let elapsed = start.elapsed();
    for (connection, _channel) in open {
        connection
            .close(200, "bench done".into())
            .await
            .context("close an AMQP connection")?;
    }
    Ok(Timing {
        elapsed,
        round_trips: None,
    })
}

/// One HTTP session's part of (b): its share's policies, back to back.
async fn put_share_policies(
    http: &HttpApi,
    share: &[&DesiredTopology],
    server_major: u32,
) -> anyhow::Result<()> {
    for topology in share {
        put_policies(http, topology, server_major).await?;
    }
    Ok(())
}

/// The topologies of `states` dealt round-robin into `hands` shares (fewer if there are
/// fewer pipelines), one per connection.
fn deal(states: &[DesiredState], hands: usize) -> Vec<Vec<&DesiredTopology>> {
    let hands = hands.clamp(1, states.len().max(1));
    (0..hands)
        .map(|hand| {
            let dealt = states.iter().skip(hand).step_by(hands);
            dealt.map(|state| &state.topology).collect()
        })
        .collect()
}

/// One connection's part of (b): its share's declares in flight at once on one channel,
/// then its binds. Returns the connection and its channel (dropping the channel would start
/// closing it), to be closed once the clock has stopped.
async fn declare_share(
    args: &Args,
    vhost: &str,
    share: &[&DesiredTopology],
    server_major: u32,
) -> anyhow::Result<(lapin::Connection, lapin::Channel)> {
    let connection = lapin::Connection::connect(
        &args.amqp_uri(vhost),
        lapin::ConnectionProperties::default(),
    )
    .await
    .with_context(|| format!("connect to vhost {vhost} over AMQP"))?;
    let channel = connection
        .create_channel()
        .await
        .context("open an AMQP channel")?;
    let mut declares = Vec::new();
    for topology in share {
        declares.extend(declare_all(&channel, topology, server_major)?);
    }
    try_join_all(declares)
        .await
        .context("declare exchanges and queues")?;
    let binds = share.iter().flat_map(|t| bind_all(&channel, t));
    try_join_all(binds).await.context("bind queues")?;
    Ok((connection, channel))
}

type Pending<'a> = std::pin::Pin<Box<dyn Future<Output = Result<(), lapin::Error>> + Send + 'a>>;

/// The exchange and queue declares of one topology, not yet sent.
fn declare_all<'a>(
    channel: &'a lapin::Channel,
    topology: &'a DesiredTopology,
    server_major: u32,
) -> anyhow::Result<Vec<Pending<'a>>> {
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
        let arguments = field_table(declare_arguments(queue, server_major))
            .with_context(|| format!("arguments of queue {}", queue.name))?;
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let declare = channel.queue_declare(queue.name.as_str().into(), options, arguments);
        pending.push(Box::pin(declare.map_ok(|_| ())));
    }
    Ok(pending)
}

/// The queue bindings of one topology, not yet sent.
fn bind_all<'a>(channel: &'a lapin::Channel, topology: &'a DesiredTopology) -> Vec<Pending<'a>> {
    let bind = |b: &'a msgpipe::plan::topology::Binding| -> Pending<'a> {
        let mut marked = FieldTable::default();
        marked.insert(BINDING_MARKER.into(), AMQPValue::Boolean(true));
        Box::pin(channel.queue_bind(
            b.destination.as_str().into(),
            b.source.as_str().into(),
            b.routing_key.as_str().into(),
            QueueBindOptions::default(),
            marked,
        ))
    };
    topology.bindings.iter().map(bind).collect()
}

/// What msgpipe declares `queue` with on a server of major version `server_major`: its type
/// and, for a retry tier, its settings (TTL, dead-lettering, overflow, delivery limit).
fn declare_arguments(queue: &Queue, server_major: u32) -> Map<String, Value> {
    let mut arguments = queue.arguments.for_server(server_major).declare_arguments();
    arguments.insert("x-queue-type".into(), queue.queue_type.as_str().into());
    arguments
}

/// Declare arguments as AMQP field values, typed as msgpipe sends them (integers 64-bit).
fn field_table(arguments: Map<String, Value>) -> anyhow::Result<FieldTable> {
    let mut table = FieldTable::default();
    for (key, value) in arguments {
        let value = match value {
            Value::String(text) => AMQPValue::LongString(text.as_str().into()),
            Value::Bool(flag) => AMQPValue::Boolean(flag),
            Value::Number(number) => AMQPValue::LongLongInt(
                number
                    .as_i64()
                    .with_context(|| format!("{key} = {number} is not a 64-bit integer"))?,
            ),
            other => bail!("{key} = {other} is not a declare argument msgpipe sends"),
        };
        table.insert(key.into(), value);
    }
    Ok(table)
}

/// PUTs a topology's policies one after the other, with msgpipe's definitions.
async fn put_policies(
    http: &HttpApi,
    topology: &DesiredTopology,
    server_major: u32,
) -> anyhow::Result<()> {
    for policy in &topology.policies {
        let params = PolicyParams {
            vhost: &topology.vhost,
            name: &policy.name,
            pattern: &policy.pattern,
            apply_to: PolicyTarget::Queues,
            priority: policy.priority,
            definition: broker::diff::policy_definition(&policy.definition, server_major),
        };
        http.declare_policy(&params)
            .await
            .with_context(|| format!("PUT policy {}", policy.name))?;
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
    server_major: u32,
) -> anyhow::Result<Timing> {
    let http = args.http(CALL_TIMEOUT)?;
    let start = Instant::now();
    if order == PolicyOrder::AllFirst {
        for state in states {
            put_policies(&http, &state.topology, server_major).await?;
        }
    }
    for state in states {
        if order == PolicyOrder::PerPipeline {
            put_policies(&http, &state.topology, server_major).await?;
        }
        declare_over_http(&http, &state.topology, server_major).await?;
    }
    Ok(Timing {
        elapsed: start.elapsed(),
        round_trips: None,
    })
}

/// A topology's exchanges, queues and bindings, one management API call each.
async fn declare_over_http(
    http: &HttpApi,
    topology: &DesiredTopology,
    server_major: u32,
) -> anyhow::Result<()> {
    let vhost = &topology.vhost;
    for exchange in &topology.exchanges {
        let kind = match exchange.kind {
            ExchangeKind::Direct => ExchangeType::Direct,
            ExchangeKind::Fanout => ExchangeType::Fanout,
        };
        let params = ExchangeParams::durable(&exchange.name, kind, None);
        http.declare_exchange(vhost, &params)
            .await
            .with_context(|| format!("declare exchange {}", exchange.name))?;
    }
    for queue in &topology.queues {
        let arguments = declare_arguments(queue, server_major);
        let params = QueueParams::new_quorum_queue(&queue.name, Some(arguments));
        http.declare_queue(vhost, &params)
            .await
            .with_context(|| format!("declare queue {}", queue.name))?;
    }
    for b in &topology.bindings {
        let key = Some(b.routing_key.as_str());
        let marked = Map::from_iter([(BINDING_MARKER.to_string(), Value::Bool(true))]);
        http.bind_queue(vhost, &b.destination, &b.source, key, Some(marked))
            .await
            .with_context(|| format!("bind {} to {}", b.destination, b.source))?;
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
        fresh.delete(admin).await?;
        let params = rabbitmq_http_client::requests::VirtualHostParams::named(&fresh.name);
        admin
            .create_vhost(&params)
            .await
            .with_context(|| format!("create vhost {}", fresh.name))?;
        let everything = rabbitmq_http_client::requests::Permissions {
            user: "guest",
            vhost: &fresh.name,
            configure: ".*",
            read: ".*",
            write: ".*",
        };
        if let Err(e) = admin.declare_permissions(&everything).await {
            let _ = fresh.delete(admin).await;
            return Err(e).with_context(|| format!("let guest into vhost {}", fresh.name));
        }
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

    /// Fails unless each queue was declared with the `expected` arguments (by queue name).
    async fn expect_queue_arguments(
        &self,
        admin: &HttpApi,
        expected: &BTreeMap<String, Map<String, Value>>,
    ) -> anyhow::Result<()> {
        for queue in admin.list_queues_in(&self.name).await? {
            let wanted = expected.get(&queue.name);
            ensure!(
                wanted == Some(&queue.arguments.0),
                "queue {} in vhost {} has arguments {:?}, expected {wanted:?}",
                queue.name,
                self.name,
                queue.arguments.0
            );
        }
        Ok(())
    }

    async fn delete(&self, admin: &HttpApi) -> anyhow::Result<()> {
        admin
            .delete_vhost(&self.name, true)
            .await
            .with_context(|| format!("delete vhost {}", self.name))
    }
}
