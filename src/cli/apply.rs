//! `msgpipe apply` / `msgpipe delete`: reconcile pipeline files straight against a broker.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use k8s_openapi::api::core::v1::Secret;

use super::{migrate, read_pipelines};
use crate::api::{DeletionPolicy, ManagementPolicy, MessagePipeline};
use crate::broker::{self, BrokerEndpoint, BrokerReport, Failed, RabbitBroker};
use crate::plan::{self, DesiredState};

/// Where the broker is: a URI, or a Kubernetes Secret manifest with the operator's keys.
#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// AMQP URI with credentials, amqp[s]://user:pass@host:port/vhost (prefer the env var:
    /// command lines are visible to other users).
    #[arg(
        long = "broker",
        env = "MSGPIPE_BROKER_URI",
        hide_env_values = true,
        conflicts_with = "secret_file"
    )]
    pub uri: Option<String>,
    /// A Secret manifest (YAML) with keys uri, managementUri (optional) and ca.crt (optional).
    #[arg(long = "broker-secret-file", value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// Management API URL (default: the broker host, port 15672; https on 15671 for amqps).
    /// `msgpipe import` also accepts it alone, with credentials (http://user:pass@host:15672).
    #[arg(long, env = "MSGPIPE_MANAGEMENT_URI", hide_env_values = true)]
    pub management_uri: Option<String>,
    /// PEM file of the CA that signed the broker's certificates.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Timeout of each broker call, in seconds.
    #[arg(long, default_value_t = 15)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Pipeline manifest: a file (several YAML documents allowed), a directory, or - for stdin.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Print what would change, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Pipelines reconciled at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Also write the plain alertmanager.yml routes and receivers of the pipelines'
    /// spec.alerts.notify to FILE (for an Alertmanager without the prometheus-operator).
    #[arg(long, value_name = "FILE")]
    pub alertmanager_fragment: Option<PathBuf>,
    /// With --alertmanager-fragment: directory where that Alertmanager finds the Secrets as
    /// files (<dir>/<secret>/<key>).
    #[arg(long, value_name = "DIR", default_value = crate::plan::notify::DEFAULT_SECRETS_DIR, requires = "alertmanager_fragment")]
    pub secrets_dir: String,
    /// A queue whose type changed is migrated first (docs/migration.md).
    #[command(flatten)]
    pub migration: super::migrate::MigrationArgs,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Pipeline manifest: a file, a directory, or - for stdin.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Print the teardown plan, change nothing. Each queue delete runs only if the queue
    /// then holds no message (ready or unacknowledged) and has no consumer; a later step
    /// runs only once the queues before it are gone.
    #[arg(long)]
    pub dry_run: bool,
    /// Before deleting a classic queue that looks empty, wait this long and look again
    /// (default 6s): the broker's figures of unacknowledged messages lag by its statistics
    /// interval, so a client that took the last messages just before would go unseen.
    /// Raise it if the broker's collect_statistics_interval is longer than 5s.
    #[arg(long, value_name = "DURATION")]
    pub settle: Option<String>,
}

impl BrokerArgs {
    /// The PEM text of `--ca-file`, if given.
    pub fn ca_from_file(&self) -> anyhow::Result<Option<String>> {
        self.ca_file
            .as_ref()
            .map(|path| {
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --ca-file {}", path.display()))
            })
            .transpose()
    }

    pub fn endpoint(&self) -> anyhow::Result<BrokerEndpoint> {
        let ca_from_file = self.ca_from_file()?;
        match (&self.uri, &self.secret_file) {
            (Some(uri), _) => Ok(BrokerEndpoint::new(
                uri,
                self.management_uri.as_deref(),
                ca_from_file,
            )?),
            (None, Some(path)) => {
                let secret = read_secret(path)?;
                BrokerEndpoint::from_secret_data(
                    &secret,
                    self.management_uri.as_deref(),
                    ca_from_file,
                )
                .with_context(|| path.display().to_string())
            }
            (None, None) => bail!(
                "no broker given: use --broker URI (or MSGPIPE_BROKER_URI) or --broker-secret-file FILE"
            ),
        }
    }

    pub fn connect(&self) -> anyhow::Result<RabbitBroker> {
        let endpoint = self.endpoint()?;
        Ok(RabbitBroker::new(
            endpoint,
            Duration::from_secs(self.timeout.max(1)),
        )?)
    }
}

/// Reads `data` (base64) and `stringData` of a Secret manifest.
fn read_secret(path: &PathBuf) -> anyhow::Result<BTreeMap<String, String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let secret: Secret = serde_saphyr::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a Secret manifest: {}",
            path.display(),
            e.to_string().lines().next().unwrap_or_default()
        )
    })?;
    crate::k8s::secret_text(secret)
        .map_err(|reason| anyhow::anyhow!("{}: {reason}", path.display()))
}

/// Plans every pipeline of the files against the broker's vhost (with the pipeline).
fn plan_all(
    files: &[PathBuf],
    endpoint: &BrokerEndpoint,
) -> anyhow::Result<Vec<(MessagePipeline, DesiredState)>> {
    let uri_vhost = endpoint.uri_vhost();
    let mut states = Vec::new();
    for sourced in read_pipelines(files)? {
        let state = plan::plan(&sourced.pipeline, Some(&uri_vhost))
            .with_context(|| sourced.source.clone())?;
        states.push((sourced.source, sourced.pipeline, state));
    }
    // Two pipelines must not claim one queue: each would keep rewriting the other's policy.
    let mut owners: BTreeMap<(String, String), String> = BTreeMap::new();
    for (source, _, state) in &states {
        for queue in &state.topology.queues {
            let key = (state.topology.vhost.clone(), queue.name.clone());
            if let Some(other) = owners.insert(key, state.pipeline.to_string()) {
                bail!(
                    "{source}: pipeline {} uses queue {:?}, which pipeline {other} also uses",
                    state.pipeline,
                    queue.name
                );
            }
        }
    }
    Ok(states
        .into_iter()
        .map(|(_, pipeline, state)| (pipeline, state))
        .collect())
}

pub async fn apply(args: &ApplyArgs) -> anyhow::Result<()> {
    let broker = args.migration.configure(args.broker.connect()?)?;
    let result = apply_with(&broker, args).await;
    broker.close().await;
    result
}

async fn apply_with(broker: &RabbitBroker, args: &ApplyArgs) -> anyhow::Result<()> {
    let planned = plan_all(&args.files, broker.endpoint())?;
    let states: Vec<DesiredState> = planned.iter().map(|(_, s)| s.clone()).collect();
    if let Some(path) = &args.alertmanager_fragment {
        super::render::write_alertmanager_fragment(path, &states, &args.secrets_dir)?;
        println!("wrote the alertmanager.yml fragment to {}", path.display());
    }
    let mut live = broker::snapshot_vhosts(broker, &states).await?;
    // Observe pipelines are compared and reported; nothing of theirs is written.
    let (observed, planned): (Vec<_>, Vec<_>) = planned
        .into_iter()
        .partition(|(p, _)| p.spec.management_policy == ManagementPolicy::Observe);
    for (_, state) in &observed {
        print_observed(state, &broker::observe(state, &live[&state.topology.vhost]));
    }
    let states: Vec<DesiredState> = planned.iter().map(|(_, s)| s.clone()).collect();
    let uri_vhost = broker.endpoint().uri_vhost();
    if args.dry_run {
        for (pipeline, state) in &planned {
            let vhost_live = live[&state.topology.vhost].clone();
            // A migration is played through in memory; the rest of the plan is what would
            // follow it.
            let after = if migrate::needs_migration(state, &vhost_live)? {
                migrate::dry_run(pipeline, state, &uri_vhost, vhost_live.clone()).await?
            } else {
                None
            };
            let plan = broker::diff::converge(state, after.as_ref().unwrap_or(&vhost_live));
            print_lines(
                state,
                plan.actions.iter().map(|a| format!("would {a}")),
                "no changes",
            );
            for conflict in &plan.conflicts {
                println!("{}: refused: {conflict}", state.pipeline);
            }
        }
        return Ok(());
    }
    // A queue whose type changed is migrated before anything else of its pipeline is
    // written; the rest of every plan then starts from what the migrations left.
    let mut migrated = false;
    for (pipeline, state) in &planned {
        if migrate::needs_migration(state, &live[&state.topology.vhost])? {
            migrated |= migrate::migrate_pipeline(broker, pipeline, state, &uri_vhost, "").await?;
        }
    }
    if migrated {
        live = broker::snapshot_vhosts(broker, &states).await?;
    }
    let results = broker::reconcile_many(broker, &states, &live, args.concurrency.max(1)).await;
    report(results)
}

pub async fn delete(args: &DeleteArgs) -> anyhow::Result<()> {
    let mut broker = args.broker.connect()?;
    if let Some(text) = &args.settle {
        let settle = text
            .parse::<crate::api::duration::Duration>()
            .map_err(|e| anyhow::anyhow!("--settle {text:?}: {e}"))?;
        broker = broker.with_delete_settle(settle.as_std());
    }
    let result = delete_with(&broker, args).await;
    broker.close().await;
    result
}

async fn delete_with(broker: &RabbitBroker, args: &DeleteArgs) -> anyhow::Result<()> {
    let planned = plan_all(&args.files, broker.endpoint())?;
    let states: Vec<DesiredState> = planned.iter().map(|(_, s)| s.clone()).collect();
    let live = broker::snapshot_vhosts(broker, &states).await?;
    let mut results = Vec::new();
    for ((pipeline, _), state) in planned.iter().zip(&states) {
        if pipeline.spec.management_policy == ManagementPolicy::Observe {
            println!(
                "{}: managementPolicy is Observe: broker objects left in place",
                state.pipeline
            );
            continue;
        }
        if pipeline.spec.deletion_policy == DeletionPolicy::Retain {
            println!(
                "{}: deletionPolicy is Retain: broker objects left in place",
                state.pipeline
            );
            continue;
        }
        if args.dry_run {
            let plan = broker::diff::teardown(state, &live[&state.topology.vhost]);
            print_lines(
                state,
                plan.actions().map(|a| format!("would {a}")),
                "nothing to delete",
            );
            continue;
        }
        results.push((
            state,
            broker::teardown(broker, state, &live[&state.topology.vhost]).await,
        ));
    }
    report(results)
}

/// Prints each pipeline's changes; fails if any pipeline failed or was refused.
fn report(results: Vec<(&DesiredState, Result<BrokerReport, Failed>)>) -> anyhow::Result<()> {
    let mut failures = Vec::new();
    let mut ordered = results;
    ordered.sort_by(|a, b| a.0.pipeline.cmp(&b.0.pipeline));
    for (state, result) in ordered {
        match result {
            Ok(report) => {
                print_lines(
                    state,
                    report.changes.iter().map(ToString::to_string),
                    "no changes",
                );
                for warning in &report.warnings {
                    eprintln!("warning: {}: {warning}", state.pipeline);
                }
                for conflict in &report.conflicts {
                    failures.push(format!(
                        "{}: ImmutableFieldChanged: {conflict}",
                        state.pipeline
                    ));
                }
            }
            Err(failed) => {
                print_lines(state, failed.applied.iter().map(ToString::to_string), "");
                failures.push(format!("{}: {}", state.pipeline, failed.error));
            }
        }
    }
    match failures.len() {
        0 => Ok(()),
        1 => bail!("{}", failures[0]),
        n => {
            for failure in &failures[1..] {
                eprintln!("error: {failure}");
            }
            bail!("{} (and {} more pipelines failed)", failures[0], n - 1)
        }
    }
}

/// `ns/name: observe: queue orders arguments.x-dead-letter-exchange: live "a", desired "b": needs a migration`.
fn print_observed(state: &DesiredState, observed: &broker::Observed) {
    let shown = |value: &Option<String>| value.as_deref().unwrap_or("absent").to_string();
    print_lines(
        state,
        observed.differences.iter().map(|d| {
            format!(
                "observe: {} {}: live {}, desired {}: {}",
                d.object,
                d.field,
                shown(&d.live),
                shown(&d.desired),
                d.action
            )
        }),
        "observe: the broker matches the spec",
    );
    if observed.total > observed.differences.len() {
        println!(
            "{}: observe: and {} more differences",
            state.pipeline,
            observed.total - observed.differences.len()
        );
    }
    for warning in &observed.warnings {
        eprintln!("warning: {}: {warning}", state.pipeline);
    }
}

fn print_lines(state: &DesiredState, lines: impl Iterator<Item = String>, empty: &str) {
    let mut any = false;
    for line in lines {
        println!("{}: {line}", state.pipeline);
        any = true;
    }
    if !any && !empty.is_empty() {
        println!("{}: {empty}", state.pipeline);
    }
}
