//! `msgpipe render`: the planner's output, with no cluster and no broker.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use super::{OutputFormat, print_documents, read_pipelines};
use crate::plan::{self, DesiredState, RetryTier, notify, topology};

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// Pipeline manifest: a file (several YAML documents allowed), a directory, or - for stdin.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Vhost to assume when spec.broker.vhost is not set (the operator takes it from the
    /// broker Secret's uri).
    #[arg(long, default_value = plan::DEFAULT_VHOST)]
    pub vhost: String,
    /// Print only the plain alertmanager.yml fragment of the pipelines' spec.alerts.notify
    /// (for an Alertmanager without the prometheus-operator): append its `routes` to your
    /// `route.routes` and its `receivers` to your `receivers`.
    #[arg(long)]
    pub alertmanager_fragment: bool,
    /// With --alertmanager-fragment: directory holding the Secrets as files,
    /// `<dir>/<Secret name>/<key>` (how an Alertmanager mounts its `spec.secrets`).
    #[arg(long, value_name = "DIR", default_value = notify::DEFAULT_SECRETS_DIR, requires = "alertmanager_fragment")]
    pub secrets_dir: String,
}

/// The broker side of a rendered pipeline, as one document.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BrokerTopologyDocument<'a> {
    kind: &'static str,
    pipeline: String,
    #[serde(flatten)]
    topology: &'a topology::DesiredTopology,
    retry_tiers: &'a [RetryTier],
}

/// One rendered document: broker topology, PrometheusRule, AlertmanagerConfig or ConfigMap.
#[derive(Serialize)]
#[serde(untagged)]
enum Document<'a> {
    Broker(BrokerTopologyDocument<'a>),
    Rule(&'a plan::PrometheusRule),
    Notify(&'a plan::AlertmanagerConfig),
    ConfigMap(&'a k8s_openapi::api::core::v1::ConfigMap),
}

pub fn run(args: &RenderArgs) -> anyhow::Result<()> {
    let pipelines = read_pipelines(&args.files)?;
    let states = pipelines
        .iter()
        .map(|sourced| {
            plan::plan(&sourced.pipeline, Some(&args.vhost)).with_context(|| sourced.source.clone())
        })
        .collect::<anyhow::Result<Vec<DesiredState>>>()?;
    if args.alertmanager_fragment {
        let configs: Vec<&plan::AlertmanagerConfig> = states
            .iter()
            .filter_map(|s| s.alertmanager_config.as_ref())
            .collect();
        anyhow::ensure!(
            !configs.is_empty(),
            "no pipeline in the input has spec.alerts.notify: there is no fragment to print"
        );
        let fragment = notify::alertmanager_fragment(&configs, &args.secrets_dir);
        return print_documents(&[fragment], args.output);
    }
    let mut docs = Vec::new();
    for state in &states {
        docs.extend(documents(state));
    }
    print_documents(&docs, args.output)
}

fn documents(state: &DesiredState) -> Vec<Document<'_>> {
    let mut docs = vec![Document::Broker(BrokerTopologyDocument {
        kind: "BrokerTopology",
        pipeline: state.pipeline.to_string(),
        topology: &state.topology,
        retry_tiers: &state.retry_tiers,
    })];
    docs.extend(state.prometheus_rule.as_ref().map(Document::Rule));
    docs.extend(state.alertmanager_config.as_ref().map(Document::Notify));
    docs.push(Document::ConfigMap(&state.config_map));
    docs
}
