//! The PrometheusRule of a pipeline (SPEC §3): alerts on its DLQ and work queue.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::names::PipelineNames;
use super::{PipelineRef, managed_labels};
use crate::api::notify::RetryStormAlert;
use crate::api::{AlertsSpec, Duration, MetricsFlavor};

/// Alert names, stable: users route and silence on them. The names are the API's
/// [`AlertKind`](crate::api::notify::AlertKind)s, which `alerts.notify` routes on.
pub mod alert_name {
    use crate::api::notify::AlertKind;

    pub const DLQ_DEPTH: &str = AlertKind::MsgpipeDeadLetterQueueDepth.alert_name();
    pub const DLQ_GROWING: &str = AlertKind::MsgpipeDeadLetterQueueGrowing.alert_name();
    pub const BACKLOG: &str = AlertKind::MsgpipeQueueBacklog.alert_name();
    pub const NO_CONSUMER: &str = AlertKind::MsgpipeQueueNoConsumer.alert_name();
    pub const METRICS_MISSING: &str = AlertKind::MsgpipeMetricsMissing.alert_name();
    pub const RETRY_STORM: &str = AlertKind::MsgpipeRetryStorm.alert_name();
}

pub const PROMETHEUS_RULE_API_VERSION: &str = "monitoring.coreos.com/v1";
pub const PROMETHEUS_RULE_KIND: &str = "PrometheusRule";
/// Window over which "still growing" is judged.
const GROWTH_WINDOW: &str = "5m";
/// Window over which retry-tier and delivery rates are compared.
const STORM_WINDOW: &str = "5m";
/// The alert's value as Prometheus renders it into annotations.
const VALUE: &str = "{{ $value }}";
const PERCENT_VALUE: &str = "{{ $value | humanizePercentage }}";

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
    /// Counter of messages routed into a queue, labels vhost, exchange, queue (RabbitMQ 4.x).
    queue_published: &'static str,
    /// Counter of messages delivered from a queue to consumers that ack manually.
    delivered: &'static str,
}

impl Metrics {
    fn of(flavor: MetricsFlavor) -> Self {
        match flavor {
            MetricsFlavor::PerObject => Metrics {
                messages: "rabbitmq_queue_messages",
                consumers: "rabbitmq_queue_consumers",
                queue_published: "rabbitmq_queue_exchange_messages_published_total",
                delivered: "rabbitmq_queue_messages_delivered_ack_total",
            },
            MetricsFlavor::Detailed => Metrics {
                messages: "rabbitmq_detailed_queue_messages",
                consumers: "rabbitmq_detailed_queue_consumers",
                queue_published: "rabbitmq_detailed_queue_exchange_messages_published_total",
                delivered: "rabbitmq_detailed_queue_messages_delivered_ack_total",
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
    has_retry_tiers: bool,
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
                    has_retry_tiers,
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
    has_retry_tiers: bool,
}

/// What one alert says and which queue it is about.
struct AlertText {
    queue: String,
    /// Go template of the current value, e.g. `{{ $value }}`.
    value: &'static str,
    summary: String,
    description: String,
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
        let list = self.dlq_list_command();
        let mut rules = Vec::new();

        let depth = &self.alerts.dlq_depth;
        rules.push(self.rule(
            alert_name::DLQ_DEPTH,
            format!("{}{dlq} > {}", metrics.messages, depth.threshold),
            depth.for_,
            &depth.severity,
            AlertText {
                queue: dlq_name.clone(),
                value: VALUE,
                summary: format!("Dead-letter queue {dlq_name} holds {VALUE} messages"),
                description: format!(
                    "The dead-letter queue {dlq_name} of MessagePipeline {} has held more than {} messages for {}: messages are failing every retry. See why with `{list}`; once the cause is fixed, replay them with `{}`.",
                    self.pipeline,
                    depth.threshold,
                    depth.for_,
                    self.dlq_replay_command()
                ),
            },
        ));
        if let Some(growth) = &self.alerts.dlq_growth {
            rules.push(self.rule(
                alert_name::DLQ_GROWING,
                format!("delta({}{dlq}[{GROWTH_WINDOW}]) > 0", metrics.messages),
                growth.for_,
                &growth.severity,
                AlertText {
                    queue: dlq_name.clone(),
                    value: VALUE,
                    summary: format!("Dead-letter queue {dlq_name} is still growing"),
                    description: format!(
                        "New dead letters keep arriving in {dlq_name} (MessagePipeline {}): it grew by {VALUE} in the last {GROWTH_WINDOW}, in every window for {}. See the newest failures with `{list}`.",
                        self.pipeline, growth.for_
                    ),
                },
            ));
        }
        if let Some(backlog) = &self.alerts.backlog {
            rules.push(self.rule(
                alert_name::BACKLOG,
                format!("{}{work} > {}", metrics.messages, backlog.threshold),
                backlog.for_,
                &backlog.severity,
                AlertText {
                    queue: work_name.clone(),
                    value: VALUE,
                    summary: format!("Queue {work_name} has a backlog of {VALUE} messages"),
                    description: format!(
                        "The work queue {work_name} of MessagePipeline {} has held more than {} messages for {}: consumers are not keeping up.",
                        self.pipeline, backlog.threshold, backlog.for_
                    ),
                },
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
                AlertText {
                    queue: work_name.clone(),
                    value: VALUE,
                    summary: format!("Queue {work_name} has messages but no consumer"),
                    description: format!(
                        "The work queue {work_name} of MessagePipeline {} has had messages and no consumer for {}: nothing is processing them.",
                        self.pipeline, no_consumer.for_
                    ),
                },
            ));
        }
        if let Some(missing) = &self.alerts.metrics_missing {
            rules.push(self.rule(
                alert_name::METRICS_MISSING,
                format!("absent({}{dlq})", metrics.messages),
                missing.for_,
                &missing.severity,
                AlertText {
                    queue: dlq_name.clone(),
                    value: VALUE,
                    summary: format!("No metrics for dead-letter queue {dlq_name}"),
                    description: format!(
                        "Prometheus has no {} series for {dlq_name} (MessagePipeline {}) for {}: scraping of RabbitMQ is broken or per-object metrics are off, so every other alert of this pipeline is blind.",
                        metrics.messages, self.pipeline, missing.for_
                    ),
                },
            ));
        }
        if let Some(storm) = &self.alerts.retry_storm
            && self.has_retry_tiers
        {
            rules.push(self.retry_storm_rule(storm, &metrics));
        }
        rules
    }

    /// Retry-tier publishes per work-queue delivery: both are per-queue counters of
    /// rabbitmq_prometheus, summed over nodes (each node reports the channels it hosts).
    fn retry_storm_rule(&self, storm: &RetryStormAlert, metrics: &Metrics) -> AlertingRule {
        let work_name = template_safe(&self.names.queue);
        let by = self.match_labels_without_queue();
        let retried = format!(
            "sum by ({by}) (rate({}{}[{STORM_WINDOW}]))",
            metrics.queue_published,
            self.exchange_selector(&self.names.retry_exchange)
        );
        let delivered = format!(
            "sum by ({by}) (rate({}{}[{STORM_WINDOW}]))",
            metrics.delivered,
            self.selector(&self.names.queue)
        );
        let mut rule = self.rule(
            alert_name::RETRY_STORM,
            format!(
                "({retried} / {delivered}) > {}",
                f64::from(storm.percent) / 100.0
            ),
            storm.for_,
            &storm.severity,
            AlertText {
                queue: work_name.clone(),
                value: PERCENT_VALUE,
                summary: format!(
                    "{PERCENT_VALUE} of deliveries from {work_name} fail into the retry tiers"
                ),
                description: format!(
                    "For {} more than {}% of the messages delivered from the work queue {work_name} of MessagePipeline {} were sent back to its retry tiers (over {STORM_WINDOW}): consumers are failing, and messages will reach the dead-letter queue once their attempts run out. Check the consumer's errors and recent deploys.",
                    storm.for_, storm.percent, self.pipeline
                ),
            },
        );
        // The ratio keeps only `by` labels; name the queue like the other alerts do (labels
        // are templates too).
        rule.labels.insert("queue".into(), work_name.clone());
        rule
    }

    fn rule(
        &self,
        alert: &str,
        expr: String,
        for_: Duration,
        severity: &str,
        text: AlertText,
    ) -> AlertingRule {
        let mut labels = self.alerts.labels.clone();
        labels.insert("severity".into(), severity.into());
        labels.insert("namespace".into(), self.pipeline.namespace.clone());
        labels.insert("msgpipe_namespace".into(), self.pipeline.namespace.clone());
        labels.insert("msgpipe_pipeline".into(), self.pipeline.name.clone());
        let mut annotations = BTreeMap::from([
            ("summary".to_string(), text.summary),
            ("description".to_string(), text.description),
            ("pipeline".to_string(), self.pipeline.to_string()),
            ("queue".to_string(), text.queue),
            ("value".to_string(), text.value.to_string()),
            ("dlq_list".to_string(), self.dlq_list_command()),
            ("dlq_replay".to_string(), self.dlq_replay_command()),
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

    /// The command that lists this pipeline's dead letters (namespace and name are DNS
    /// names, so they need no shell quoting).
    fn dlq_list_command(&self) -> String {
        format!(
            "msgpipe dlq list -n {} --name {}",
            self.pipeline.namespace, self.pipeline.name
        )
    }

    fn dlq_replay_command(&self) -> String {
        format!(
            "msgpipe dlq replay -n {} --name {} --all",
            self.pipeline.namespace, self.pipeline.name
        )
    }

    /// `{vhost="/",queue="q",<selector>}` with values escaped for PromQL.
    fn selector(&self, queue: &str) -> String {
        self.series("queue", queue)
    }

    /// `{vhost="/",exchange="e",<selector>}` with values escaped for PromQL.
    fn exchange_selector(&self, exchange: &str) -> String {
        self.series("exchange", exchange)
    }

    /// `{vhost="/",<label>="<value>",<selector>}` with values escaped for PromQL.
    fn series(&self, label: &str, value: &str) -> String {
        let mut matchers = vec![
            format!("vhost=\"{}\"", promql_escape(self.vhost)),
            format!("{label}=\"{}\"", promql_escape(value)),
        ];
        matchers.extend(
            self.alerts
                .selector
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", promql_escape(v))),
        );
        format!("{{{}}}", matchers.join(","))
    }

    /// The vhost and selector labels: what a per-pipeline sum keeps.
    fn match_labels_without_queue(&self) -> String {
        self.labels_with(&["vhost"])
    }

    /// Labels that identify one queue's series, for vector matching.
    fn match_labels(&self) -> String {
        self.labels_with(&["vhost", "queue"])
    }

    /// `first` and the selector's labels, comma-separated.
    fn labels_with(&self, first: &[&str]) -> String {
        let mut labels = first.to_vec();
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

/// Keeps user text from being read as a Go template by Prometheus: no two braces of a kind
/// stay next to each other (`{{{` becomes `{ { {`; replacing `{{` once would leave `{ {{`).
pub(crate) fn template_safe(text: &str) -> String {
    let mut safe = String::with_capacity(text.len());
    for c in text.chars() {
        if (c == '{' || c == '}') && safe.ends_with(c) {
            safe.push(' ');
        }
        safe.push(c);
    }
    safe
}

#[cfg(test)]
mod tests {
    use super::template_safe;

    #[test]
    fn no_two_braces_of_a_kind_stay_adjacent_however_many_there_are() {
        assert_eq!(template_safe("a{{b}}c"), "a{ {b} }c");
        assert_eq!(template_safe("¥{{{$\\9}}}"), "¥{ { {$\\9} } }");
        assert_eq!(template_safe("{}{}"), "{}{}");
        for text in ["{{{{", "}}}}}", "x{{{{{y}}}}z", "{{ $value }}"] {
            let safe = template_safe(text);
            assert!(
                !safe.contains("{{") && !safe.contains("}}"),
                "{text:?} -> {safe:?}"
            );
        }
    }
}
