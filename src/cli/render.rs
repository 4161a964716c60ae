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
        let fragment = alertmanager_fragment(&states, &args.secrets_dir);
        anyhow::ensure!(
            !fragment.routes.is_empty(),
            "no pipeline in the input has spec.alerts.notify: there is no fragment to print"
        );
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

/// The plain alertmanager.yml routes and receivers of the pipelines that have
/// `spec.alerts.notify` (empty lists when none has).
pub fn alertmanager_fragment(
    states: &[DesiredState],
    secrets_dir: &str,
) -> notify::AlertmanagerFragment {
    let configs: Vec<&plan::AlertmanagerConfig> = states
        .iter()
        .filter_map(|s| s.alertmanager_config.as_ref())
        .collect();
    notify::alertmanager_fragment(&configs, secrets_dir)
}

/// Writes [`alertmanager_fragment`] as YAML to `path`: what `msgpipe apply` can leave for an
/// Alertmanager without the prometheus-operator.
pub fn write_alertmanager_fragment(
    path: &std::path::Path,
    states: &[DesiredState],
    secrets_dir: &str,
) -> anyhow::Result<()> {
    let yaml = serde_saphyr::to_string(&alertmanager_fragment(states, secrets_dir))
        .context("cannot encode the alertmanager.yml fragment")?;
    std::fs::write(path, yaml).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_fragment_reads_back_with_the_pipelines_routes() {
        let pipeline =
            crate::api::load::parse_pipelines(include_str!("../../examples/billing-notify.yaml"))
                .expect("example parses")
                .remove(0);
        let state = plan::plan(&pipeline, None).expect("plans");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("msgpipe-routes.yml");
        write_alertmanager_fragment(&path, &[state], "/etc/alertmanager/secrets").expect("written");
        let text = std::fs::read_to_string(&path).expect("readable");
        let fragment: notify::AlertmanagerFragment =
            serde_saphyr::from_str(&text).expect("YAML fragment");
        assert_eq!(
            fragment.routes[0].receiver,
            "billing/billing-notify/msgpipe-unrouted"
        );
        assert_eq!(fragment.receivers.len(), 4);
        assert!(text.contains("/etc/alertmanager/secrets/billing-alerting/slack-webhook-url"));
    }
}
