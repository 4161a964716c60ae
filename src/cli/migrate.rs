//! `msgpipe migrate`: move live queues to the type their pipeline file asks for, with no
//! message lost (docs/migration.md); `msgpipe apply` runs the same migration before it
//! converges the rest.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;

use super::apply::BrokerArgs;
use super::read_pipelines;
use crate::api::MessagePipeline;
use crate::broker::migration::{plan_migration, recorded_target};
use crate::broker::{
    self, BrokerApi, LiveVhost, MemoryBroker, MigrationBroker, MigrationEvent, MigrationPhase,
    Mover, RabbitBroker,
};
use crate::plan::{self, DesiredState};

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Pipeline manifest: a file (several YAML documents allowed), a directory, or - for stdin.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Print every step the migration would take from the broker's current state, change
    /// nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub how: MigrationArgs,
}

/// How a migration runs (shared by `migrate` and `apply`).
#[derive(Debug, Args)]
pub struct MigrationArgs {
    /// How messages are moved: auto (a dynamic shovel when the broker has the rabbitmq_shovel
    /// plugin, else msgpipe's own confirm-then-ack mover), shovel, or confirm.
    #[arg(long, default_value_t = Mover::Auto)]
    pub mover: Mover,
    /// Before deleting a drained queue, wait this long and read its figures again (default
    /// 6s): they lag by the broker's statistics interval, so messages a consumer took just
    /// before would go unseen. Raise it if collect_statistics_interval is longer than 5s.
    #[arg(long, value_name = "DURATION")]
    pub settle: Option<String>,
}

impl MigrationArgs {
    /// The broker client, set up to migrate as asked.
    pub fn configure(&self, broker: RabbitBroker) -> anyhow::Result<RabbitBroker> {
        let mut broker = broker.with_mover(self.mover);
        if let Some(text) = &self.settle {
            let settle = text
                .parse::<crate::api::duration::Duration>()
                .map_err(|e| anyhow::anyhow!("--settle {text:?}: {e}"))?;
            broker = broker.with_delete_settle(settle.as_std());
        }
        Ok(broker)
    }
}

pub async fn run(args: &MigrateArgs) -> anyhow::Result<()> {
    let broker = args.how.configure(args.broker.connect()?)?;
    let result = run_with(&broker, args).await;
    broker.close().await;
    result
}

async fn run_with(broker: &RabbitBroker, args: &MigrateArgs) -> anyhow::Result<()> {
    let uri_vhost = broker.endpoint().uri_vhost();
    for sourced in read_pipelines(&args.files)? {
        let desired = plan::plan(&sourced.pipeline, Some(&uri_vhost))
            .with_context(|| sourced.source.clone())?;
        let migrated = if args.dry_run {
            let live = broker.snapshot(&desired.topology.vhost).await?;
            dry_run(&sourced.pipeline, &desired, &uri_vhost, live)
                .await?
                .is_some()
        } else {
            migrate_pipeline(broker, &sourced.pipeline, &desired, &uri_vhost, "").await?
        };
        if !migrated {
            println!(
                "{}: nothing to migrate (every queue has type {})",
                desired.pipeline,
                sourced.pipeline.spec.queue.queue_type.as_str()
            );
        }
    }
    Ok(())
}

/// Whether the broker shows work for a migration of this pipeline (one to do, or one under way).
pub fn needs_migration(desired: &DesiredState, live: &LiveVhost) -> anyhow::Result<bool> {
    Ok(recorded_target(desired, live)?.is_some() || plan_migration(desired, live)?.is_some())
}

/// Plays the migration through on a copy of `live` held in memory, printing each step as
/// `would ...`; returns the vhost as the migration leaves it (None: nothing to migrate).
pub async fn dry_run(
    pipeline: &MessagePipeline,
    desired: &DesiredState,
    uri_vhost: &str,
    live: LiveVhost,
) -> anyhow::Result<Option<LiveVhost>> {
    let vhost = desired.topology.vhost.clone();
    let memory = MemoryBroker::from_live("dry run", &vhost, live);
    if !migrate_pipeline(&memory, pipeline, desired, uri_vhost, "would ").await? {
        return Ok(None);
    }
    Ok(Some(memory.snapshot(&vhost).await?))
}

/// Migrates the pipeline's queues to its spec's type, first finishing a migration under way
/// to another type (the broker's holding queues record it). Prints each step (prefixed with
/// `verb`) and the movers' progress. Returns whether there was anything to migrate.
pub async fn migrate_pipeline<B: MigrationBroker>(
    broker: &B,
    pipeline: &MessagePipeline,
    desired: &DesiredState,
    uri_vhost: &str,
    verb: &str,
) -> anyhow::Result<bool> {
    let name = desired.pipeline.to_string();
    let live = broker.snapshot(&desired.topology.vhost).await?;
    let asked = pipeline.spec.queue.queue_type;
    let mut targets = Vec::new();
    if let Some(recorded) = recorded_target(desired, &live)?
        && recorded != asked
    {
        println!(
            "{name}: a migration to {} is under way on the broker: finishing it first, then migrating to {}",
            recorded.as_str(),
            asked.as_str()
        );
        let mut other = pipeline.clone();
        other.spec.queue.queue_type = recorded;
        targets.push(plan::plan(&other, Some(uri_vhost))?);
    }
    drop(live);
    targets.push(desired.clone());
    let mut any = false;
    for target in &targets {
        let started = Instant::now();
        let mut phase = MigrationPhase::Holding;
        let mut print = |event: MigrationEvent| match event {
            MigrationEvent::Step { phase: now, step } if verb.is_empty() => {
                phase = now;
                let at = started.elapsed().as_secs_f64();
                println!("{name}: [{now}] {step} (at {at:.1}s)");
            }
            MigrationEvent::Step { phase: now, step } => {
                phase = now;
                println!("{name}: [{now}] {verb}{step}");
            }
            MigrationEvent::Progress(p) if verb.is_empty() => println!(
                "{name}: [{phase}] moved {} messages from {} into {}; {} ready in {} (at {:.1}s)",
                p.moved,
                p.from,
                p.into,
                p.remaining,
                p.from,
                started.elapsed().as_secs_f64()
            ),
            MigrationEvent::Progress(_) => {}
            MigrationEvent::Kept { queue, messages } => println!(
                "{name}: [{phase}] {queue} still holds {messages} messages: moving them first"
            ),
        };
        let report = broker::migrate(broker, target, &mut print).await?;
        if let Some(to) = report.target {
            any = true;
            if verb.is_empty() {
                println!(
                    "{name}: migrated to {}: {} steps, {} messages moved, {:.1}s",
                    to.as_str(),
                    report.steps,
                    report.moved,
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }
    Ok(any)
}
