//! The `msgpipe` command line: flags, reading manifests, printing results.

mod apply;
mod dlq;
mod import;
mod migrate;
mod operator;
mod render;

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};

use crate::api::MessagePipeline;
use crate::api::load::parse_pipelines;

/// msgpipe: declarative RabbitMQ work queues, retries, dead-letter queues and alerts.
#[derive(Debug, Parser)]
#[command(name = "msgpipe", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a CustomResourceDefinition (YAML): MessagePipeline, or DeadLetterReplay with
    /// --kind deadletterreplay.
    Crd(CrdArgs),
    /// Print, without any cluster or broker, everything the operator would write for pipeline files.
    Render(render::RenderArgs),
    /// Reconcile pipeline files straight against a broker, no Kubernetes needed.
    Apply(apply::ApplyArgs),
    /// Read a live vhost (management API, read-only) and print one MessagePipeline per work
    /// queue it recognises, with comments saying what each field came from and what the spec
    /// cannot express.
    Import(Box<import::ImportArgs>),
    /// Migrate live queues to the type their pipeline file asks for (classic <-> quorum),
    /// moving every message with no loss while producers and consumers keep running;
    /// --dry-run prints the steps. A run stopped at any point is resumed by running it again.
    Migrate(migrate::MigrateArgs),
    /// Remove the broker objects of pipeline files whose deletionPolicy is Delete (never a
    /// queue that holds messages, ready or unacknowledged); --dry-run prints the plan.
    Delete(apply::DeleteArgs),
    /// Inspect a pipeline's dead letters (why they failed), replay them to the work queue
    /// without loss, or purge them.
    Dlq(Box<dlq::DlqArgs>),
    /// Run the Kubernetes controller: reconcile every MessagePipeline in scope until SIGTERM.
    Operator(operator::OperatorArgs),
}

#[derive(Debug, clap::Args)]
pub struct CrdArgs {
    /// Which CRD.
    #[arg(long, value_enum, default_value_t)]
    pub kind: CrdKind,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum CrdKind {
    #[default]
    Messagepipeline,
    Deadletterreplay,
    Messagebroker,
}

/// How data is printed.
#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum OutputFormat {
    #[default]
    Yaml,
    Json,
}

/// Runs one command; the caller prints the error on one line and exits non-zero.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crd(args) => {
            let yaml = match args.kind {
                CrdKind::Messagepipeline => crate::api::crd_yaml(),
                CrdKind::Deadletterreplay => crate::api::replay_crd_yaml(),
                CrdKind::Messagebroker => crate::api::broker_crd_yaml(),
            };
            print!("{}", yaml.context("cannot encode the CRD")?);
            Ok(())
        }
        Command::Render(args) => render::run(&args),
        Command::Apply(args) => runtime()?.block_on(apply::apply(&args)),
        Command::Import(args) => runtime()?.block_on(import::run(&args)),
        Command::Delete(args) => runtime()?.block_on(apply::delete(&args)),
        Command::Migrate(args) => runtime()?.block_on(migrate::run(&args)),
        Command::Operator(args) => operator::run(&args),
        Command::Dlq(args) => runtime()?.block_on(dlq::run(&args)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A pipeline and the file it came from.
pub struct SourcedPipeline {
    pub source: String,
    pub pipeline: MessagePipeline,
}

/// Reads MessagePipelines from files, directories (their *.yaml, *.yml, *.json, sorted) or `-` (stdin).
pub fn read_pipelines(paths: &[PathBuf]) -> anyhow::Result<Vec<SourcedPipeline>> {
    let mut files = Vec::new();
    for path in paths {
        if path.as_os_str() == "-" || !path.is_dir() {
            files.push(path.clone());
            continue;
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot read directory {}", path.display()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| is_manifest(p))
            .collect();
        if entries.is_empty() {
            bail!("{}: no *.yaml, *.yml or *.json files", path.display());
        }
        entries.sort();
        files.extend(entries);
    }
    let mut pipelines = Vec::new();
    for file in files {
        let source = file.display().to_string();
        let text = read_text(&file)?;
        let parsed = parse_pipelines(&text).with_context(|| source.clone())?;
        pipelines.extend(parsed.into_iter().map(|pipeline| SourcedPipeline {
            source: source.clone(),
            pipeline,
        }));
    }
    Ok(pipelines)
}

fn is_manifest(path: &Path) -> bool {
    path.is_file()
        && matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        )
}

fn read_text(path: &Path) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read standard input")?;
        return Ok(text);
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Prints documents as a YAML stream or a JSON array.
pub fn print_documents<T: serde::Serialize>(
    docs: &[T],
    format: OutputFormat,
) -> anyhow::Result<()> {
    let text = match format {
        OutputFormat::Yaml => {
            serde_saphyr::to_string_multiple(docs).context("cannot encode output as YAML")?
        }
        OutputFormat::Json => {
            serde_json::to_string_pretty(docs).context("cannot encode output as JSON")? + "\n"
        }
    };
    print!("{text}");
    Ok(())
}
