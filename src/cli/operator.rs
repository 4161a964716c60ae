//! `msgpipe operator`: flags and logging of the controller process.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};

use crate::api::duration::Duration as SpecDuration;
use crate::controller::{self, OperatorConfig, RunOptions};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct OperatorArgs {
    /// Namespaces to watch, comma-separated; empty watches all namespaces.
    #[arg(
        long,
        env = "MSGPIPE_NAMESPACES",
        value_delimiter = ',',
        default_value = ""
    )]
    pub namespaces: Vec<String>,
    /// How often a converged pipeline is checked again (drift repair, live counts).
    #[arg(long, env = "MSGPIPE_RESYNC", default_value = "5m", value_parser = parse_duration)]
    pub resync: Duration,
    /// Pipelines reconciled at the same time (their Kubernetes calls; see --broker-concurrency
    /// for the broker's share).
    #[arg(long, env = "MSGPIPE_CONCURRENCY", default_value_t = crate::controller::DEFAULT_CONCURRENCY, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// Pipelines of one vhost whose broker work runs at the same time: pipelines reconciled
    /// together form one batch per vhost (one snapshot, policies first), run this many at once.
    #[arg(long, env = "MSGPIPE_BROKER_CONCURRENCY", default_value_t = crate::controller::BROKER_CONCURRENCY as u16, value_parser = clap::value_parser!(u16).range(1..))]
    pub broker_concurrency: u16,
    /// Address of the /metrics, /healthz and /readyz server.
    #[arg(long, env = "MSGPIPE_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Campaign for a coordination.k8s.io Lease and reconcile only while holding it (replicas > 1).
    #[arg(long, env = "MSGPIPE_LEADER_ELECTION", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub leader_election: bool,
    /// Name of the leader Lease.
    #[arg(long, env = "MSGPIPE_LEASE_NAME", default_value = "msgpipe-operator")]
    pub lease_name: String,
    /// Namespace of the leader Lease (default: $POD_NAMESPACE, else "default").
    #[arg(long, env = "MSGPIPE_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Bound on every single broker call.
    #[arg(long, env = "MSGPIPE_BROKER_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub broker_timeout: Duration,
    /// How long a deleted pipeline waits for an unreachable broker before it is released
    /// (with a Warning event listing what was left on the broker).
    #[arg(long, env = "MSGPIPE_CLEANUP_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub cleanup_timeout: Duration,
    /// Log format.
    #[arg(long, env = "MSGPIPE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Accept `spec.broker.secretRef` (a Secret of the pipeline's namespace): the operator
    /// then reads Secrets in every watched namespace. Platform teams that hand out brokers
    /// only as MessageBrokers set false (chart value brokers.secretRefs).
    #[arg(long, env = "MSGPIPE_SECRET_REFS", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub secret_refs: bool,
    /// Accept `spec.broker.brokerRef` (a cluster-scoped MessageBroker; chart value
    /// brokers.messageBrokers).
    #[arg(long, env = "MSGPIPE_MESSAGE_BROKERS", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub message_brokers: bool,
    /// The operator's own namespace, where MessageBrokers' Secrets live (default:
    /// $POD_NAMESPACE, else "default").
    #[arg(long, env = "MSGPIPE_OPERATOR_NAMESPACE")]
    pub operator_namespace: Option<String>,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    text.parse::<SpecDuration>()
        .map(SpecDuration::as_std)
        .map_err(|e| e.to_string())
}

/// `flag`, else $POD_NAMESPACE (the chart sets it from the downward API), else "default".
fn own_namespace(flag: Option<&String>) -> String {
    flag.cloned()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into())
}

pub fn run(args: &OperatorArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let identity = std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "msgpipe".into());
    let config = OperatorConfig {
        namespaces: args
            .namespaces
            .iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect(),
        resync: args.resync,
        concurrency: args.concurrency,
        broker_concurrency: usize::from(args.broker_concurrency),
        broker_timeout: args.broker_timeout,
        cleanup_timeout: args.cleanup_timeout,
        identity,
        brokers: crate::k8s::BrokerAccess {
            secret_refs: args.secret_refs,
            message_brokers: args.message_brokers,
            operator_namespace: own_namespace(args.operator_namespace.as_ref()),
            cache: Default::default(),
        },
    };
    let options = RunOptions {
        listen: args.listen,
        leader_election: args.leader_election,
        lease_name: args.lease_name.clone(),
        lease_namespace: own_namespace(args.lease_namespace.as_ref()),
    };
    if !config.brokers.secret_refs && !config.brokers.message_brokers {
        anyhow::bail!(
            "--secret-refs=false and --message-brokers=false leave pipelines no way to name a broker; enable one"
        );
    }
    tracing::info!(
        namespaces = ?config.namespaces,
        resync_seconds = config.resync.as_secs(),
        concurrency = config.concurrency,
        broker_concurrency = config.broker_concurrency,
        leader_election = options.leader_election,
        secret_refs = config.brokers.secret_refs,
        message_brokers = config.brokers.message_brokers,
        operator_namespace = %config.brokers.operator_namespace,
        "starting msgpipe operator"
    );
    super::runtime()?
        .block_on(controller::run(config, options))
        .context("operator stopped")
}

/// Logs to stderr; RUST_LOG picks levels (default info). Credentials never reach a log
/// line: endpoints print redacted and errors are built without them.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal, not in a container's log.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
