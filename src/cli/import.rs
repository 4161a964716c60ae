//! `msgpipe import`: one read of a live vhost (management API only, never a write), printed
//! as MessagePipelines ready to review and commit.

use std::time::Instant;

use anyhow::Context;
use clap::Args;
use regex::Regex;

use super::OutputFormat;
use super::apply::BrokerArgs;
use crate::adopt::{self, FindingKind, Import, ImportOptions};
use crate::broker::{BrokerEndpoint, RabbitBroker};

#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Vhost to read. Default: the broker URI's vhost, else "/".
    #[arg(long)]
    pub vhost: Option<String>,
    /// metadata.namespace of the pipelines.
    #[arg(short = 'n', long, default_value = crate::plan::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// spec.broker.secretRef.name of the pipelines: the Secret the operator will read the
    /// broker's uri (and managementUri) from.
    #[arg(long, value_name = "NAME", default_value = adopt::DEFAULT_SECRET_REF)]
    pub secret_ref: String,
    /// spec.broker.brokerRef.name of the pipelines instead of a Secret: a MessageBroker the
    /// platform team shares (the vhost must be one it grants the namespace).
    #[arg(long, value_name = "NAME")]
    pub broker_ref: Option<String>,
    /// Only work queues whose name matches this regular expression (unanchored: use ^...$
    /// for an exact name).
    #[arg(long = "queue", value_name = "REGEX")]
    pub queue: Option<String>,
    /// Enable the pipelines' alerts (default: alerts.enabled false, so nothing pages before
    /// thresholds are chosen).
    #[arg(long)]
    pub alerts: bool,
    /// Output format: YAML with the findings as comments, or a JSON array of the pipelines
    /// (findings then go to stderr).
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: OutputFormat,
}

impl ImportArgs {
    /// The broker: `--broker`/`--broker-secret-file` as for apply, or only `--management-uri`
    /// with credentials (an import reads over HTTP only).
    fn connect(&self) -> anyhow::Result<RabbitBroker> {
        let management_only = self.broker.uri.is_none() && self.broker.secret_file.is_none();
        let Some(management) = self
            .broker
            .management_uri
            .as_deref()
            .filter(|_| management_only)
        else {
            return self.broker.connect();
        };
        let endpoint =
            BrokerEndpoint::from_management_uri(management, self.broker.ca_from_file()?)?;
        let timeout = std::time::Duration::from_secs(self.broker.timeout.max(1));
        Ok(RabbitBroker::new(endpoint, timeout)?)
    }

    fn options(&self) -> anyhow::Result<ImportOptions> {
        let queue_filter = self
            .queue
            .as_deref()
            .map(|pattern| {
                Regex::new(pattern).map_err(|e| {
                    let first = e.to_string().lines().last().unwrap_or_default().to_string();
                    anyhow::anyhow!("--queue {pattern:?} is not a regular expression: {first}")
                })
            })
            .transpose()?;
        Ok(ImportOptions {
            namespace: self.namespace.clone(),
            secret_ref: self.secret_ref.clone(),
            broker_ref: self.broker_ref.clone(),
            queue_filter,
            alerts: self.alerts,
        })
    }
}

pub async fn run(args: &ImportArgs) -> anyhow::Result<()> {
    let options = args.options()?;
    let broker = args.connect()?;
    let vhost = args
        .vhost
        .clone()
        .unwrap_or_else(|| broker.endpoint().uri_vhost());
    let started = Instant::now();
    let inventory = broker.inventory(&vhost).await;
    broker.close().await;
    let inventory = inventory?;
    let read = started.elapsed();
    let import = adopt::import(&inventory, &options);
    let text = match args.output {
        OutputFormat::Yaml => {
            adopt::import_yaml(&import).context("cannot encode the pipelines as YAML")?
        }
        OutputFormat::Json => {
            adopt::import_json(&import).context("cannot encode the pipelines as JSON")?
        }
    };
    print!("{text}");
    report(&import, args.output);
    eprintln!(
        "imported {} pipeline(s) from vhost {:?} ({} queues, {} bindings, {} policies) in {:.2} s (read {:.2} s)",
        import.pipelines.len(),
        import.vhost,
        inventory.queues.len(),
        inventory.bindings.len(),
        inventory.policies.len(),
        started.elapsed().as_secs_f64(),
        read.as_secs_f64()
    );
    Ok(())
}

/// What the spec cannot express goes to stderr as warnings; with `-o json`, where there are
/// no comments, the other findings too.
fn report(import: &Import, output: OutputFormat) {
    for finding in &import.skipped {
        eprintln!("warning: {}", finding.text);
    }
    for pipeline in &import.pipelines {
        for finding in &pipeline.findings {
            let label = match (finding.kind, output) {
                (FindingKind::Unexpressed, _) => "warning",
                (_, OutputFormat::Json) => "note",
                (_, OutputFormat::Yaml) => continue,
            };
            eprintln!("{label}: {}: {}", pipeline.queue, finding.text);
        }
    }
}
