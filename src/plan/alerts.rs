//! The PrometheusRule of a pipeline (SPEC §3): alerts on its DLQ and work queue.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::names::PipelineNames;
use super::{PipelineRef, managed_labels};
use crate::api::{AlertsSpec, Duration, MetricsFlavor};

/// Alert names, stable: users route and silence on them.
pub mod alert_name {
    pub const DLQ_DEPTH: &str = "MsgpipeDeadLetterQueueDepth";
    pub const DLQ_GROWING: &str = "MsgpipeDeadLetterQueueGrowing";
    pub const BACKLOG: &str = "MsgpipeQueueBacklog";
    pub const NO_CONSUMER: &str = "MsgpipeQueueNoConsumer";
    pub const METRICS_MISSING: &str = "MsgpipeMetricsMissing";
}

pub const PROMETHEUS_RULE_API_VERSION: &str = "monitoring.coreos.com/v1";
pub const PROMETHEUS_RULE_KIND: &str = "PrometheusRule";
/// Window over which "still growing" is judged.
const GROWTH_WINDOW: &str = "5m";

/// A prometheus-operator PrometheusRule (monitoring.coreos.com/v1), the fields msgpipe writes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusRule {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: PrometheusRuleSpec,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrometheusRuleSpec {
    pub groups: Vec<RuleGroup>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleGroup {
    pub name: String,
    pub rules: Vec<AlertingRule>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertingRule {
    pub alert: String,
    pub expr: String,
    #[serde(rename = "for")]
    pub for_: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// Metric names of one flavour of the RabbitMQ Prometheus plugin.
struct Metrics {
    messages: &'static str,
    consumers: &'static str,
}

impl Metrics {
    fn of(flavor: MetricsFlavor) -> Self {
        match flavor {
            MetricsFlavor::PerObject => Metrics {
                messages: "rabbitmq_queue_messages",
                consumers: "rabbitmq_queue_consumers",
            },
            MetricsFlavor::Detailed => Metrics {
                messages: "rabbitmq_detailed_queue_messages",
                consumers: "rabbitmq_detailed_queue_consumers",
            },
        }
    }
}

/// Builds the pipeline's PrometheusRule `<name>-alerts`; None when alerts are disabled.
pub fn prometheus_rule(
    pipeline: &PipelineRef,
    alerts: &AlertsSpec,
    vhost: &str,
    names: &PipelineNames,
) -> Option<PrometheusRule> {
    if !alerts.enabled {
        return None;
    }
    let mut labels = managed_labels(pipeline);
    labels.extend(alerts.rule_labels.clone());
    Some(PrometheusRule {
        api_version: PROMETHEUS_RULE_API_VERSION.into(),
        kind: PROMETHEUS_RULE_KIND.into(),
        metadata: ObjectMeta {
            name: Some(format!("{}-alerts", pipeline.name)),
            namespace: Some(pipeline.namespace.clone()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: PrometheusRuleSpec {
            groups: vec![RuleGroup {
                name: format!("msgpipe.{}.{}", pipeline.namespace, pipeline.name),
                rules: AlertBuilder {
                    pipeline,
                    alerts,
                    vhost,
                    names,
                }
                .rules(),
            }],
        },
    })
}

struct AlertBuilder<'a> {
    pipeline: &'a PipelineRef,
    alerts: &'a AlertsSpec,
    vhost: &'a str,
    names: &'a PipelineNames,
}

impl AlertBuilder<'_> {
    fn rules(&self) -> Vec<AlertingRule> {
        let metrics = Metrics::of(self.alerts.metrics);
        let dlq = self.selector(&self.names.dead_letter_queue);
        let work = self.selector(&self.names.queue);
        let (dlq_name, work_name) = (
            template_safe(&self.names.dead_letter_queue),
            template_safe(&self.names.queue),
        );
        let mut rules = Vec::new();

        let depth = &self.alerts.dlq_depth;
        rules.push(self.rule(
            alert_name::DLQ_DEPTH,
            format!("{}{dlq} > {}", metrics.messages, depth.threshold),
            depth.for_,
            &depth.severity,
            format!("Dead-letter queue {dlq_name} holds {{{{ $value }}}} messages"),
            format!(
                "The dead-letter queue {dlq_name} of MessagePipeline {} has held more than {} messages for {}: messages are failing every retry. Inspect them with `msgpipe dlq list`.",
                self.pipeline, depth.threshold, depth.for_
            ),
        ));
        if let Some(growth) = &self.alerts.dlq_growth {
            rules.push(self.rule(
                alert_name::DLQ_GROWING,
                format!("delta({}{dlq}[{GROWTH_WINDOW}]) > 0", metrics.messages),
                growth.for_,
                &growth.severity,
                format!("Dead-letter queue {dlq_name} is still growing"),
                format!(
                    "New dead letters keep arriving in {dlq_name} (MessagePipeline {}): it grew by {{{{ $value }}}} in the last {GROWTH_WINDOW}, in every window for {}.",
                    self.pipeline, growth.for_
                ),
            ));
        }
        if let Some(backlog) = &self.alerts.backlog {
            rules.push(self.rule(
                alert_name::BACKLOG,
                format!("{}{work} > {}", metrics.messages, backlog.threshold),
                backlog.for_,
                &backlog.severity,
                format!("Queue {work_name} has a backlog of {{{{ $value }}}} messages"),
                format!(
                    "The work queue {work_name} of MessagePipeline {} has held more than {} messages for {}: consumers are not keeping up.",
                    self.pipeline, backlog.threshold, backlog.for_
                ),
            ));
        }
        if let Some(no_consumer) = &self.alerts.no_consumer {
            let on = self.match_labels();
            rules.push(self.rule(
                alert_name::NO_CONSUMER,
                format!(
                    "({consumers}{work} == 0) and on({on}) ({messages}{work} > 0)",
                    consumers = metrics.consumers,
                    messages = metrics.messages,
                ),
                no_consumer.for_,
                &no_consumer.severity,
                format!("Queue {work_name} has messages but no consumer"),
                format!(
                    "The work queue {work_name} of MessagePipeline {} has had messages and no consumer for {}: nothing is processing them.",
                    self.pipeline, no_consumer.for_
                ),
            ));
        }
        if let Some(missing) = &self.alerts.metrics_missing {
            rules.push(self.rule(
                alert_name::METRICS_MISSING,
                format!("absent({}{dlq})", metrics.messages),
                missing.for_,
                &missing.severity,
                format!("No metrics for dead-letter queue {dlq_name}"),
                format!(
                    "Prometheus has no {} series for {dlq_name} (MessagePipeline {}) for {}: scraping of RabbitMQ is broken or per-object metrics are off, so every other alert of this pipeline is blind.",
                    metrics.messages, self.pipeline, missing.for_
                ),
            ));
        }
        rules
    }

    fn rule(
        &self,
        alert: &str,
        expr: String,
        for_: Duration,
        severity: &str,
        summary: String,
        description: String,
    ) -> AlertingRule {
        let mut labels = self.alerts.labels.clone();
        labels.insert("severity".into(), severity.into());
        labels.insert("msgpipe_namespace".into(), self.pipeline.namespace.clone());
        labels.insert("msgpipe_pipeline".into(), self.pipeline.name.clone());
        let mut annotations = BTreeMap::from([
            ("summary".to_string(), summary),
            ("description".to_string(), description),
        ]);
        if let Some(url) = &self.alerts.runbook_url {
            annotations.insert("runbook_url".into(), template_safe(url));
        }
        AlertingRule {
            alert: alert.into(),
            expr,
            for_: for_.to_string(),
            labels,
            annotations,
        }
    }

    /// `{vhost="/",queue="q",<selector>}` with values escaped for PromQL.
    fn selector(&self, queue: &str) -> String {
        let mut matchers = vec![
            format!("vhost=\"{}\"", promql_escape(self.vhost)),
            format!("queue=\"{}\"", promql_escape(queue)),
        ];
        matchers.extend(
            self.alerts
                .selector
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", promql_escape(v))),
        );
        format!("{{{}}}", matchers.join(","))
    }

    /// Labels that identify one queue's series, for vector matching.
    fn match_labels(&self) -> String {
        let mut labels = vec!["vhost", "queue"];
        labels.extend(self.alerts.selector.keys().map(String::as_str));
        labels.join(",")
    }
}

/// Escapes a PromQL double-quoted string (Go string syntax). U+FFFD is valid UTF-8 but
/// Prometheus's lexer takes it for a decoding error, so it is written as `\uFFFD`.
pub fn promql_escape(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len() + 2);
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            '\u{FFFD}' => escaped.push_str("\\uFFFD"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// Keeps user text from being read as a Go template by Prometheus.
fn template_safe(text: &str) -> String {
    text.replace("{{", "{ {").replace("}}", "} }")
}
