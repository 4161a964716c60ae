//! `spec.alerts.notify`: who is told when a pipeline's alerts fire (Slack, PagerDuty, email),
//! and the retry-storm alert. The operator turns `notify` into a prometheus-operator
//! `AlertmanagerConfig` `<name>-notify`; secrets are named here, never copied.
//!
//! Doc comments become the CRD's descriptions (`kubectl explain
//! messagepipeline.spec.alerts.notify`); [`validate`] checks in Rust what the schema says and
//! what it cannot (unique receiver names, exactly one channel per receiver).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration::Duration;
use super::spec::{AlertsSpec, MessagePipelineSpec};
use super::validate::{Findings, is_dns_label, is_severity};

/// Most receivers one pipeline may declare.
pub const MAX_RECEIVERS: usize = 16;
/// Receiver of alerts no user receiver takes (it notifies nobody); its route has
/// `continue: true`, so the Alertmanager's own routes still see every alert. Reserved.
pub const UNROUTED_RECEIVER: &str = "msgpipe-unrouted";
/// PagerDuty Events API v2 endpoint used when `pagerduty.url` is not set.
pub const PAGERDUTY_EVENTS_URL: &str = "https://events.pagerduty.com/v2/enqueue";

const ONE_CHANNEL_RULE: &str =
    "(has(self.slack) ? 1 : 0) + (has(self.pagerduty) ? 1 : 0) + (has(self.email) ? 1 : 0) == 1";

/// One receiver of the pipeline's alerts: exactly one of `slack`, `pagerduty` or `email`,
/// which alerts it gets, and how often it is reminded.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{"rule": ONE_CHANNEL_RULE, "message": "set exactly one of slack, pagerduty, email"}]))]
pub struct NotifyReceiver {
    /// Name of the receiver, unique in the list (lowercase letters, digits and '-'). The
    /// AlertmanagerConfig's receiver has this name; Alertmanager shows it as
    /// `<namespace>/<pipeline>-notify/<name>`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Post to a Slack incoming webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack: Option<SlackReceiver>,
    /// Open PagerDuty incidents (Events API v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pagerduty: Option<PagerDutyReceiver>,
    /// Send email.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<EmailReceiver>,
    /// Only these alerts. Default: every alert of the pipeline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<AlertKind>,
    /// Only alerts whose severity label is one of these (e.g. critical). Default: any severity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(regex(pattern = r"^[A-Za-z0-9_-]{1,63}$")))]
    pub severities: Vec<String>,
    /// How long Alertmanager waits to batch the first notification of a new alert group.
    #[serde(default = "default_group_wait")]
    pub group_wait: Duration,
    /// How long it waits before telling about alerts added to a group already notified.
    #[serde(default = "default_group_interval")]
    pub group_interval: Duration,
    /// How long it waits before repeating a notification for an alert still firing.
    #[serde(default = "default_repeat_interval")]
    pub repeat_interval: Duration,
    /// Also notify when the alert resolves.
    #[serde(default = "default_true")]
    pub send_resolved: bool,
}

fn default_group_wait() -> Duration {
    Duration::from_secs(30)
}

fn default_group_interval() -> Duration {
    Duration::from_secs(300)
}

fn default_repeat_interval() -> Duration {
    Duration::from_secs(4 * 3600)
}

fn default_true() -> bool {
    true
}

/// The alerts msgpipe writes, by their stable names.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
pub enum AlertKind {
    MsgpipeDeadLetterQueueDepth,
    MsgpipeDeadLetterQueueGrowing,
    MsgpipeQueueBacklog,
    MsgpipeQueueNoConsumer,
    MsgpipeMetricsMissing,
    MsgpipeRetryStorm,
}

impl AlertKind {
    /// Every alert, in the order the PrometheusRule lists them.
    pub const ALL: [AlertKind; 6] = [
        AlertKind::MsgpipeDeadLetterQueueDepth,
        AlertKind::MsgpipeDeadLetterQueueGrowing,
        AlertKind::MsgpipeQueueBacklog,
        AlertKind::MsgpipeQueueNoConsumer,
        AlertKind::MsgpipeMetricsMissing,
        AlertKind::MsgpipeRetryStorm,
    ];

    /// The alert's `alertname` label.
    pub const fn alert_name(self) -> &'static str {
        match self {
            AlertKind::MsgpipeDeadLetterQueueDepth => "MsgpipeDeadLetterQueueDepth",
            AlertKind::MsgpipeDeadLetterQueueGrowing => "MsgpipeDeadLetterQueueGrowing",
            AlertKind::MsgpipeQueueBacklog => "MsgpipeQueueBacklog",
            AlertKind::MsgpipeQueueNoConsumer => "MsgpipeQueueNoConsumer",
            AlertKind::MsgpipeMetricsMissing => "MsgpipeMetricsMissing",
            AlertKind::MsgpipeRetryStorm => "MsgpipeRetryStorm",
        }
    }
}

/// A key of a Secret in the pipeline's namespace. Only the reference is written anywhere;
/// Alertmanager (or the prometheus-operator) reads the value.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the Secret's data.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// Slack incoming webhook.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SlackReceiver {
    /// Secret key holding the webhook URL (https://hooks.slack.com/services/...).
    pub webhook_url: SecretKeyRef,
    /// Channel (#name) or user (@name) to post to. Default: the webhook's own channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 80))]
    pub channel: Option<String>,
}

/// PagerDuty Events API v2 integration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PagerDutyReceiver {
    /// Secret key holding the integration's routing key (Events API v2).
    pub routing_key: SecretKeyRef,
    /// PagerDuty severity for each alert severity label. Labels not listed map by name
    /// (critical, error, warning, info), anything else to error.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub severity: BTreeMap<String, PagerDutySeverity>,
    /// Events API endpoint. Default: https://events.pagerduty.com/v2/enqueue (use
    /// https://events.eu.pagerduty.com/v2/enqueue for the EU service region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://"))]
    pub url: Option<String>,
}

/// Severity of a PagerDuty event.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PagerDutySeverity {
    Critical,
    Error,
    Warning,
    Info,
}

impl PagerDutySeverity {
    pub fn as_str(self) -> &'static str {
        match self {
            PagerDutySeverity::Critical => "critical",
            PagerDutySeverity::Error => "error",
            PagerDutySeverity::Warning => "warning",
            PagerDutySeverity::Info => "info",
        }
    }
}

/// Email through an SMTP server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EmailReceiver {
    /// Recipient addresses.
    #[schemars(length(min = 1, max = 32), inner(length(min = 3, max = 254)))]
    pub to: Vec<String>,
    /// SMTP server and sender. Default: the Alertmanager's global smtp_* settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp: Option<SmtpSettings>,
}

/// SMTP settings of one email receiver; the password comes from a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SmtpSettings {
    /// SMTP server as host:port (e.g. smtp.example.com:587).
    #[schemars(length(min = 3, max = 261), regex(pattern = r"^[^\s:]+:[0-9]{1,5}$"))]
    pub smarthost: String,
    /// Sender address.
    #[schemars(length(min = 3, max = 254))]
    pub from: String,
    /// SMTP login; with `password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 254))]
    pub username: Option<String>,
    /// Secret key holding the SMTP password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<SecretKeyRef>,
    /// Refuse to send unless the server offers STARTTLS.
    #[serde(default = "default_true")]
    pub require_tls: bool,
}

/// Fires when the share of the work queue's deliveries sent on to retry tiers stays above
/// `percent` for `for`: many messages are failing (a broken downstream, a bad deploy), long
/// before they reach the dead-letter queue.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct RetryStormAlert {
    /// Messages published to the retry tiers, as a percentage of the messages delivered from
    /// the work queue (both over 5 minutes), above which the alert fires; 25 = one delivery
    /// in four fails and is retried.
    #[serde(default = "default_storm_percent")]
    #[schemars(range(min = 1, max = 100))]
    pub percent: u32,
    /// How long the condition must hold before the alert fires.
    #[serde(default = "default_storm_for", rename = "for")]
    pub for_: Duration,
    /// Value of the alert's severity label.
    #[serde(default = "default_warning")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-]{1,63}$"))]
    pub severity: String,
}

impl Default for RetryStormAlert {
    fn default() -> Self {
        Self {
            percent: default_storm_percent(),
            for_: default_storm_for(),
            severity: default_warning(),
        }
    }
}

fn default_storm_percent() -> u32 {
    25
}

fn default_storm_for() -> Duration {
    Duration::from_secs(600)
}

fn default_warning() -> String {
    "warning".into()
}

/// Checks `spec.alerts.notify`, `spec.alerts.retryStorm`, and that `alerts.labels` leaves the
/// `namespace` label to msgpipe (the AlertmanagerConfig routes on it).
pub(crate) fn validate(findings: &mut Findings, spec: &MessagePipelineSpec) {
    let alerts: &AlertsSpec = &spec.alerts;
    if alerts.labels.contains_key("namespace") {
        findings.fail(
            "spec.alerts.labels.namespace",
            "is set by msgpipe itself and cannot be overridden",
        );
    }
    if let Some(storm) = &alerts.retry_storm {
        let path = "spec.alerts.retryStorm";
        if !(1..=100).contains(&storm.percent) {
            findings.fail(
                format!("{path}.percent"),
                format!("must be between 1 and 100, got {}", storm.percent),
            );
        }
        if !is_severity(&storm.severity) {
            findings.fail(format!("{path}.severity"), SEVERITY_RULE);
        }
        if spec.retry.max_attempts <= 1 {
            findings.fail(
                path,
                "needs retry tiers: spec.retry.maxAttempts is 1, so nothing is ever retried",
            );
        }
        duration_at_least_1s(findings, &format!("{path}.for"), storm.for_);
    }
    if alerts.notify.len() > MAX_RECEIVERS {
        findings.fail(
            "spec.alerts.notify",
            format!(
                "has {} receivers; at most {MAX_RECEIVERS}",
                alerts.notify.len()
            ),
        );
    }
    if !alerts.notify.is_empty() && !alerts.enabled {
        findings.fail(
            "spec.alerts.notify",
            "alerts.enabled is false: there are no alerts to notify about",
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, receiver) in alerts.notify.iter().enumerate() {
        let path = format!("spec.alerts.notify[{i}]");
        if receiver.name == UNROUTED_RECEIVER {
            findings.fail(
                format!("{path}.name"),
                format!("{UNROUTED_RECEIVER:?} is reserved by msgpipe"),
            );
        } else if !seen.insert(receiver.name.as_str()) {
            findings.fail(
                format!("{path}.name"),
                format!("{:?} is used by an earlier receiver", receiver.name),
            );
        }
        validate_receiver(findings, &path, receiver);
    }
}

const SEVERITY_RULE: &str = "must be 1-63 letters, digits, '-' or '_' (e.g. critical, warning)";

fn validate_receiver(findings: &mut Findings, path: &str, receiver: &NotifyReceiver) {
    if !is_dns_label(&receiver.name) {
        findings.fail(
            format!("{path}.name"),
            format!(
                "{:?} must be 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit",
                receiver.name
            ),
        );
    }
    let channels = [
        receiver.slack.is_some(),
        receiver.pagerduty.is_some(),
        receiver.email.is_some(),
    ];
    if channels.iter().filter(|set| **set).count() != 1 {
        findings.fail(path, "set exactly one of slack, pagerduty, email");
    }
    for (j, severity) in receiver.severities.iter().enumerate() {
        if !is_severity(severity) {
            findings.fail(format!("{path}.severities[{j}]"), SEVERITY_RULE);
        }
    }
    duration_at_least_1s(findings, &format!("{path}.groupWait"), receiver.group_wait);
    duration_at_least_1s(
        findings,
        &format!("{path}.groupInterval"),
        receiver.group_interval,
    );
    duration_at_least_1s(
        findings,
        &format!("{path}.repeatInterval"),
        receiver.repeat_interval,
    );
    if let Some(slack) = &receiver.slack {
        secret_key_ref(
            findings,
            &format!("{path}.slack.webhookUrl"),
            &slack.webhook_url,
        );
        if let Some(channel) = &slack.channel {
            let at = format!("{path}.slack.channel");
            if channel.trim().is_empty() {
                findings.fail(&at, "must not be empty");
            }
            no_template(findings, &at, channel);
        }
    }
    if let Some(pagerduty) = &receiver.pagerduty {
        let at = format!("{path}.pagerduty");
        secret_key_ref(
            findings,
            &format!("{at}.routingKey"),
            &pagerduty.routing_key,
        );
        for label in pagerduty.severity.keys() {
            if !is_severity(label) {
                findings.fail(format!("{at}.severity.{label}"), SEVERITY_RULE);
            }
        }
        if let Some(url) = &pagerduty.url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                findings.fail(format!("{at}.url"), "must be an http:// or https:// URL");
            }
            no_template(findings, &format!("{at}.url"), url);
        }
    }
    if let Some(email) = &receiver.email {
        validate_email(findings, &format!("{path}.email"), email);
    }
}

fn validate_email(findings: &mut Findings, path: &str, email: &EmailReceiver) {
    if email.to.is_empty() {
        findings.fail(format!("{path}.to"), "needs at least one address");
    }
    for (i, address) in email.to.iter().enumerate() {
        no_template(findings, &format!("{path}.to[{i}]"), address);
        if !is_address(address) {
            findings.fail(
                format!("{path}.to[{i}]"),
                format!("{address:?} is not an email address"),
            );
        }
    }
    let Some(smtp) = &email.smtp else { return };
    let port_ok = smtp.smarthost.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok()
    });
    if !port_ok {
        findings.fail(
            format!("{path}.smtp.smarthost"),
            format!("{:?} must be host:port", smtp.smarthost),
        );
    }
    no_template(findings, &format!("{path}.smtp.from"), &smtp.from);
    if !is_address(&smtp.from) {
        findings.fail(
            format!("{path}.smtp.from"),
            format!("{:?} is not an email address", smtp.from),
        );
    }
    if let Some(password) = &smtp.password {
        secret_key_ref(findings, &format!("{path}.smtp.password"), password);
        if smtp.username.is_none() {
            findings.fail(format!("{path}.smtp.username"), "is required with password");
        }
    }
}

fn secret_key_ref(findings: &mut Findings, path: &str, reference: &SecretKeyRef) {
    let name_ok =
        (1..=253).contains(&reference.name.len()) && reference.name.split('.').all(is_dns_label);
    if !name_ok {
        findings.fail(
            format!("{path}.name"),
            format!("{:?} is not a valid Secret name", reference.name),
        );
    }
    let key_ok = (1..=253).contains(&reference.key.len())
        && reference
            .key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !key_ok {
        findings.fail(
            format!("{path}.key"),
            format!(
                "{:?} is not a valid Secret key (letters, digits, '-', '_', '.')",
                reference.key
            ),
        );
    }
}

/// Alertmanager expands these fields as Go templates; a stray `{{` would break the whole
/// configuration it loads (every team's), so they are refused here.
fn no_template(findings: &mut Findings, path: &str, value: &str) {
    if value.contains("{{") || value.contains("}}") {
        findings.fail(
            path,
            "must not contain {{ or }} (Alertmanager reads it as a template)",
        );
    }
}

fn duration_at_least_1s(findings: &mut Findings, path: &str, value: Duration) {
    if value.as_millis() < 1000 {
        findings.fail(path, format!("{value} is shorter than 1s"));
    }
}

/// A plausible address: one '@' with text on both sides, no spaces, commas or angle brackets
/// (Alertmanager splits `to` on commas).
fn is_address(value: &str) -> bool {
    let forbidden = |c: char| c.is_whitespace() || c.is_control() || matches!(c, ',' | '<' | '>');
    match value.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('@')
                && value.len() <= 254
                && !value.contains(forbidden)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use crate::api::load::parse_pipelines;
    use crate::api::validate::validate;

    fn with_alerts(alerts: &str) -> crate::api::MessagePipeline {
        let yaml = format!(
            "apiVersion: msgpipe.io/v1alpha1\nkind: MessagePipeline\nmetadata: {{name: notes, namespace: notes-app}}\nspec:\n  broker: {{secretRef: {{name: rabbitmq}}}}\n  alerts:\n{alerts}"
        );
        parse_pipelines(&yaml).expect("parses").remove(0)
    }

    fn error_paths(alerts: &str) -> Vec<String> {
        match validate(&with_alerts(alerts)) {
            Ok(()) => vec![],
            Err(invalid) => invalid.errors.into_iter().map(|e| e.path).collect(),
        }
    }

    #[test]
    fn receivers_take_defaults_for_intervals_and_resolved() {
        let p = with_alerts(
            "    notify:\n      - name: oncall\n        pagerduty: {routingKey: {name: pd, key: key}}\n",
        );
        let receiver = &p.spec.alerts.notify[0];
        assert_eq!(receiver.group_wait.to_string(), "30s");
        assert_eq!(receiver.group_interval.to_string(), "5m");
        assert_eq!(receiver.repeat_interval.to_string(), "4h");
        assert!(receiver.send_resolved);
        assert_eq!(validate(&p), Ok(()));
    }

    #[test]
    fn a_receiver_needs_exactly_one_channel() {
        let both = "    notify:\n      - name: x\n        slack: {webhookUrl: {name: s, key: url}}\n        email: {to: [a@example.com]}\n";
        assert_eq!(error_paths(both), ["spec.alerts.notify[0]"]);
        let none = "    notify:\n      - name: x\n        severities: [critical]\n";
        assert_eq!(error_paths(none), ["spec.alerts.notify[0]"]);
    }

    #[test]
    fn receiver_names_are_unique_labels() {
        let yaml = "    notify:\n      - {name: team, email: {to: [a@example.com]}}\n      - {name: team, email: {to: [b@example.com]}}\n      - {name: Team_2, email: {to: [c@example.com]}}\n";
        assert_eq!(
            error_paths(yaml),
            ["spec.alerts.notify[1].name", "spec.alerts.notify[2].name"]
        );
    }

    #[test]
    fn bad_addresses_secret_refs_and_smarthosts_name_their_field() {
        let yaml = "    notify:\n      - name: mail\n        email:\n          to: [not-an-address, 'a@b, c@d']\n          smtp: {smarthost: smtp.example.com, from: me@example.com, password: {name: Smtp, key: 'pass word'}}\n";
        assert_eq!(
            error_paths(yaml),
            [
                "spec.alerts.notify[0].email.to[0]",
                "spec.alerts.notify[0].email.to[1]",
                "spec.alerts.notify[0].email.smtp.smarthost",
                "spec.alerts.notify[0].email.smtp.password.name",
                "spec.alerts.notify[0].email.smtp.password.key",
                "spec.alerts.notify[0].email.smtp.username",
            ]
        );
    }

    #[test]
    fn unknown_alert_names_are_refused_when_reading() {
        let yaml = "apiVersion: msgpipe.io/v1alpha1\nkind: MessagePipeline\nmetadata: {name: billing}\nspec:\n  broker: {secretRef: {name: r}}\n  alerts:\n    notify:\n      - {name: x, alerts: [DlqDepth], email: {to: [a@example.com]}}\n";
        let error = parse_pipelines(yaml)
            .expect_err("unknown alert")
            .to_string();
        assert!(error.contains("spec.alerts.notify[0].alerts"), "{error}");
    }

    #[test]
    fn template_braces_in_templated_fields_are_refused() {
        let yaml = "    notify:\n      - name: chat\n        slack: {webhookUrl: {name: s, key: url}, channel: '#a{{ .X }}'}\n";
        assert_eq!(error_paths(yaml), ["spec.alerts.notify[0].slack.channel"]);
    }

    #[test]
    fn namespace_label_is_reserved_for_alertmanager_routing() {
        assert_eq!(
            error_paths("    labels: {namespace: other}\n"),
            ["spec.alerts.labels.namespace"]
        );
    }

    #[test]
    fn retry_storm_needs_retry_tiers_and_a_percentage() {
        assert_eq!(
            error_paths("    retryStorm: {percent: 0, for: 500ms}\n"),
            [
                "spec.alerts.retryStorm.percent",
                "spec.alerts.retryStorm.for"
            ]
        );
        let mut p = with_alerts("    retryStorm: {}\n");
        assert_eq!(validate(&p), Ok(()));
        p.spec.retry.max_attempts = 1;
        let errors = validate(&p).expect_err("no tiers").errors;
        assert_eq!(errors[0].path, "spec.alerts.retryStorm");
    }

    #[test]
    fn notify_without_alerts_is_refused() {
        let paths = error_paths(
            "    enabled: false\n    notify:\n      - {name: x, email: {to: [a@example.com]}}\n",
        );
        assert_eq!(paths, ["spec.alerts.notify"]);
    }
}
