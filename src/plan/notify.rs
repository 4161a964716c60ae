//! Who is told (SPEC §8, issue 15): the pipeline's `spec.alerts.notify` as a
//! prometheus-operator `AlertmanagerConfig` `<name>-notify`, and the same routes and receivers
//! as a plain `alertmanager.yml` fragment for Alertmanagers without the prometheus-operator.
//!
//! Secrets are only ever referenced: the AlertmanagerConfig names Secret keys (the
//! prometheus-operator reads them), the fragment names files (`<secrets dir>/<Secret>/<key>`,
//! the layout of an Alertmanager's mounted `spec.secrets`).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::{PipelineRef, managed_labels};
use crate::api::AlertsSpec;
use crate::api::notify::{
    AlertKind, EmailReceiver, NotifyReceiver, PagerDutyReceiver, PagerDutySeverity, SecretKeyRef,
    SlackReceiver,
};

pub const ALERTMANAGER_CONFIG_API_VERSION: &str = "monitoring.coreos.com/v1alpha1";
pub const ALERTMANAGER_CONFIG_KIND: &str = "AlertmanagerConfig";
pub use crate::api::notify::UNROUTED_RECEIVER;
/// Where an Alertmanager's `spec.secrets` are mounted, and the fragment's default.
pub const DEFAULT_SECRETS_DIR: &str = "/etc/alertmanager/secrets";
/// Labels alerts of one pipeline are grouped by.
const GROUP_BY: [&str; 3] = ["alertname", "namespace", "msgpipe_pipeline"];

/// Body of every Slack and email notification: per alert, what happened, where, the value,
/// and the commands to run. The annotations are written by [`super::alerts`].
pub const NOTIFICATION_TEXT: &str = r#"{{ range .Alerts }}{{ if eq .Status "resolved" }}RESOLVED: {{ end }}{{ .Annotations.summary }}
{{ .Annotations.description }}
Pipeline: {{ .Annotations.pipeline }} | queue: {{ .Annotations.queue }} | value: {{ .Annotations.value }} | severity: {{ .Labels.severity }}
Inspect: {{ .Annotations.dlq_list }}
Replay: {{ .Annotations.dlq_replay }}
{{ if .Annotations.runbook_url }}Runbook: {{ .Annotations.runbook_url }}
{{ end }}{{ end }}"#;
/// Slack title and email subject.
pub const NOTIFICATION_TITLE: &str = r#"[{{ .Status | toUpper }}] {{ .CommonLabels.alertname }} {{ .CommonLabels.namespace }}/{{ .CommonLabels.msgpipe_pipeline }}"#;
/// PagerDuty incident summary: one line, the first alert's summary.
const PAGERDUTY_DESCRIPTION: &str = "{{ (index .Alerts 0).Annotations.summary }}";

/// A prometheus-operator AlertmanagerConfig (monitoring.coreos.com/v1alpha1), the fields
/// msgpipe writes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertmanagerConfig {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: AlertmanagerConfigSpec,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertmanagerConfigSpec {
    pub route: Route,
    pub receivers: Vec<Receiver>,
}

/// A route of the AlertmanagerConfig.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    pub receiver: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group_by: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_wait: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_interval: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matchers: Vec<Matcher>,
    #[serde(rename = "continue")]
    pub continue_: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
}

/// A label matcher: `matchType` is `=` or `=~` (anchored RE2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Matcher {
    pub name: String,
    pub value: String,
    pub match_type: String,
}

impl Matcher {
    fn equal(name: &str, value: &str) -> Self {
        Self {
            name: name.into(),
            value: value.into(),
            match_type: "=".into(),
        }
    }

    /// `name` is one of `values`: `=` for one value, else an alternation (values are label
    /// values of `[A-Za-z0-9_-]`, with no regex metacharacters).
    fn one_of(name: &str, values: &[&str]) -> Self {
        match values {
            [one] => Self::equal(name, one),
            _ => Self {
                name: name.into(),
                value: values.join("|"),
                match_type: "=~".into(),
            },
        }
    }
}

/// A Secret key reference (`SecretKeySelector`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretKeySelector {
    pub name: String,
    pub key: String,
}

impl From<&SecretKeyRef> for SecretKeySelector {
    fn from(reference: &SecretKeyRef) -> Self {
        Self {
            name: reference.name.clone(),
            key: reference.key.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Receiver {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slack_configs: Vec<SlackConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pagerduty_configs: Vec<PagerDutyConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub email_configs: Vec<EmailConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlackConfig {
    #[serde(rename = "apiURL")]
    pub api_url: SecretKeySelector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    pub send_resolved: bool,
    pub title: String,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PagerDutyConfig {
    pub routing_key: SecretKeySelector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub send_resolved: bool,
    pub severity: String,
    pub description: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<KeyValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pager_duty_link_configs: Vec<PagerDutyLink>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagerDutyLink {
    pub href: String,
    pub alt: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EmailConfig {
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smarthost: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_password: Option<SecretKeySelector>,
    #[serde(
        default,
        rename = "requireTLS",
        skip_serializing_if = "Option::is_none"
    )]
    pub require_tls: Option<bool>,
    pub send_resolved: bool,
    pub headers: Vec<KeyValue>,
    pub text: String,
}

/// Builds the pipeline's AlertmanagerConfig `<name>-notify`; None when `notify` is empty or
/// alerts are disabled (the operator then deletes any it wrote before).
pub fn alertmanager_config(
    pipeline: &PipelineRef,
    alerts: &AlertsSpec,
) -> Option<AlertmanagerConfig> {
    if !alerts.enabled || alerts.notify.is_empty() {
        return None;
    }
    let mut labels = managed_labels(pipeline);
    labels.extend(alerts.rule_labels.clone());
    let routes = alerts.notify.iter().map(receiver_route).collect();
    let mut receivers = vec![Receiver {
        name: UNROUTED_RECEIVER.into(),
        slack_configs: vec![],
        pagerduty_configs: vec![],
        email_configs: vec![],
    }];
    receivers.extend(
        alerts
            .notify
            .iter()
            .map(|r| receiver(r, alerts.runbook_url.as_deref())),
    );
    Some(AlertmanagerConfig {
        api_version: ALERTMANAGER_CONFIG_API_VERSION.into(),
        kind: ALERTMANAGER_CONFIG_KIND.into(),
        metadata: ObjectMeta {
            name: Some(format!("{}-notify", pipeline.name)),
            namespace: Some(pipeline.namespace.clone()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: AlertmanagerConfigSpec {
            route: Route {
                receiver: UNROUTED_RECEIVER.into(),
                group_by: GROUP_BY.iter().map(|l| l.to_string()).collect(),
                group_wait: None,
                group_interval: None,
                repeat_interval: None,
                // The prometheus-operator adds namespace="<namespace>" itself with its default
                // OnNamespace strategy; stating it keeps the route scoped under strategy None.
                matchers: vec![
                    Matcher::equal("namespace", &pipeline.namespace),
                    Matcher::equal("msgpipe_pipeline", &pipeline.name),
                ],
                continue_: true,
                routes,
            },
            receivers,
        },
    })
}

/// The child route of one receiver: its alert and severity matchers and its intervals;
/// `continue` so that one alert can reach several receivers (page and post).
fn receiver_route(receiver: &NotifyReceiver) -> Route {
    let mut matchers = Vec::new();
    if !receiver.alerts.is_empty() {
        let names: Vec<&str> = receiver.alerts.iter().map(|a| a.alert_name()).collect();
        matchers.push(Matcher::one_of("alertname", &names));
    }
    if !receiver.severities.is_empty() {
        let severities: Vec<&str> = receiver.severities.iter().map(String::as_str).collect();
        matchers.push(Matcher::one_of("severity", &severities));
    }
    Route {
        receiver: receiver.name.clone(),
        group_by: vec![],
        group_wait: Some(receiver.group_wait.to_string()),
        group_interval: Some(receiver.group_interval.to_string()),
        repeat_interval: Some(receiver.repeat_interval.to_string()),
        matchers,
        continue_: true,
        routes: vec![],
    }
}

fn receiver(receiver: &NotifyReceiver, runbook_url: Option<&str>) -> Receiver {
    let resolved = receiver.send_resolved;
    Receiver {
        name: receiver.name.clone(),
        slack_configs: receiver.slack.iter().map(|s| slack(s, resolved)).collect(),
        pagerduty_configs: receiver
            .pagerduty
            .iter()
            .map(|p| pagerduty(p, resolved, runbook_url))
            .collect(),
        email_configs: receiver.email.iter().map(|e| email(e, resolved)).collect(),
    }
}

fn slack(slack: &SlackReceiver, send_resolved: bool) -> SlackConfig {
    SlackConfig {
        api_url: (&slack.webhook_url).into(),
        channel: slack.channel.clone(),
        send_resolved,
        title: NOTIFICATION_TITLE.into(),
        text: NOTIFICATION_TEXT.into(),
    }
}

fn pagerduty(
    pagerduty: &PagerDutyReceiver,
    send_resolved: bool,
    runbook_url: Option<&str>,
) -> PagerDutyConfig {
    let first = |annotation: &str| format!("{{{{ (index .Alerts 0).Annotations.{annotation} }}}}");
    let details = ["pipeline", "queue", "value", "dlq_list", "dlq_replay"]
        .iter()
        .map(|key| KeyValue {
            key: key.to_string(),
            value: first(key),
        })
        .collect();
    PagerDutyConfig {
        routing_key: (&pagerduty.routing_key).into(),
        url: pagerduty.url.clone(),
        send_resolved,
        severity: pagerduty_severity_template(&pagerduty.severity),
        description: PAGERDUTY_DESCRIPTION.into(),
        details,
        pager_duty_link_configs: runbook_url
            .map(|url| PagerDutyLink {
                // Alertmanager expands `href` as a template, like the annotation.
                href: super::alerts::template_safe(url),
                alt: "runbook".into(),
            })
            .into_iter()
            .collect(),
    }
}

/// Go template mapping the alerts' severity label to a PagerDuty severity: the spec's
/// mapping first, then critical/error/warning/info by name, anything else error.
pub fn pagerduty_severity_template(mapping: &BTreeMap<String, PagerDutySeverity>) -> String {
    let mut table: BTreeMap<&str, &str> = ["critical", "error", "warning", "info"]
        .into_iter()
        .map(|s| (s, s))
        .collect();
    for (label, severity) in mapping {
        table.insert(label.as_str(), severity.as_str());
    }
    let mut template = String::new();
    for (i, (label, severity)) in table.iter().enumerate() {
        let keyword = if i == 0 { "if" } else { "else if" };
        // Labels are [A-Za-z0-9_-] (validated), safe inside a Go string literal.
        template.push_str(&format!(
            "{{{{ {keyword} eq .CommonLabels.severity \"{label}\" }}}}{severity}"
        ));
    }
    template.push_str("{{ else }}error{{ end }}");
    template
}

fn email(email: &EmailReceiver, send_resolved: bool) -> EmailConfig {
    let smtp = email.smtp.as_ref();
    EmailConfig {
        to: email.to.join(", "),
        from: smtp.map(|s| s.from.clone()),
        smarthost: smtp.map(|s| s.smarthost.clone()),
        auth_username: smtp.and_then(|s| s.username.clone()),
        auth_password: smtp.and_then(|s| s.password.as_ref()).map(Into::into),
        require_tls: smtp.map(|s| s.require_tls),
        send_resolved,
        headers: vec![KeyValue {
            key: "Subject".into(),
            value: NOTIFICATION_TITLE.into(),
        }],
        text: NOTIFICATION_TEXT.into(),
    }
}

/// The plain `alertmanager.yml` form of AlertmanagerConfigs: append `routes` to your
/// `route.routes` and `receivers` to your `receivers`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertmanagerFragment {
    pub routes: Vec<AmRoute>,
    pub receivers: Vec<AmReceiver>,
}

/// A route in `alertmanager.yml` syntax.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AmRoute {
    pub receiver: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group_by: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_wait: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_interval: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matchers: Vec<String>,
    #[serde(rename = "continue")]
    pub continue_: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<AmRoute>,
}

/// A receiver in `alertmanager.yml` syntax; secrets as `*_file` paths.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AmReceiver {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slack_configs: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pagerduty_configs: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub email_configs: Vec<serde_json::Value>,
}

/// Converts AlertmanagerConfigs the way the prometheus-operator does (receivers named
/// `<namespace>/<config>/<receiver>`, a `namespace` matcher and `continue: true` on each
/// config's top route), except that secrets become `*_file` paths under `secrets_dir`
/// instead of being copied in.
pub fn alertmanager_fragment(
    configs: &[&AlertmanagerConfig],
    secrets_dir: &str,
) -> AlertmanagerFragment {
    let mut fragment = AlertmanagerFragment::default();
    for config in configs {
        let namespace = config.metadata.namespace.clone().unwrap_or_default();
        let prefix = format!(
            "{namespace}/{}/",
            config.metadata.name.as_deref().unwrap_or_default()
        );
        let mut route = am_route(&config.spec.route, &prefix);
        let scope = matcher_text(&Matcher::equal("namespace", &namespace));
        if !route.matchers.contains(&scope) {
            route.matchers.insert(0, scope);
        }
        route.continue_ = true;
        fragment.routes.push(route);
        let files = SecretFiles { dir: secrets_dir };
        fragment.receivers.extend(
            config
                .spec
                .receivers
                .iter()
                .map(|r| files.receiver(r, &prefix)),
        );
    }
    fragment
}

fn am_route(route: &Route, prefix: &str) -> AmRoute {
    AmRoute {
        receiver: format!("{prefix}{}", route.receiver),
        group_by: route.group_by.clone(),
        group_wait: route.group_wait.clone(),
        group_interval: route.group_interval.clone(),
        repeat_interval: route.repeat_interval.clone(),
        matchers: route.matchers.iter().map(matcher_text).collect(),
        continue_: route.continue_,
        routes: route.routes.iter().map(|r| am_route(r, prefix)).collect(),
    }
}

/// `name="value"` / `name=~"value"` with the value quoted as Alertmanager parses it.
fn matcher_text(matcher: &Matcher) -> String {
    let value = matcher.value.replace('\\', "\\\\").replace('"', "\\\"");
    format!("{}{}\"{value}\"", matcher.name, matcher.match_type)
}

struct SecretFiles<'a> {
    dir: &'a str,
}

impl SecretFiles<'_> {
    fn path(&self, secret: &SecretKeySelector) -> String {
        format!(
            "{}/{}/{}",
            self.dir.trim_end_matches('/'),
            secret.name,
            secret.key
        )
    }

    fn receiver(&self, receiver: &Receiver, prefix: &str) -> AmReceiver {
        AmReceiver {
            name: format!("{prefix}{}", receiver.name),
            slack_configs: receiver
                .slack_configs
                .iter()
                .map(|s| {
                    let mut config = serde_json::json!({
                        "api_url_file": self.path(&s.api_url),
                        "send_resolved": s.send_resolved,
                        "title": s.title,
                        "text": s.text,
                    });
                    if let Some(channel) = &s.channel {
                        config["channel"] = channel.clone().into();
                    }
                    config
                })
                .collect(),
            pagerduty_configs: receiver
                .pagerduty_configs
                .iter()
                .map(|p| self.pagerduty(p))
                .collect(),
            email_configs: receiver
                .email_configs
                .iter()
                .map(|e| self.email(e))
                .collect(),
        }
    }

    fn pagerduty(&self, p: &PagerDutyConfig) -> serde_json::Value {
        let details: serde_json::Map<String, serde_json::Value> = p
            .details
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone().into()))
            .collect();
        let mut config = serde_json::json!({
            "routing_key_file": self.path(&p.routing_key),
            "send_resolved": p.send_resolved,
            "severity": p.severity,
            "description": p.description,
            "details": details,
        });
        if let Some(url) = &p.url {
            config["url"] = url.clone().into();
        }
        if !p.pager_duty_link_configs.is_empty() {
            config["links"] = p
                .pager_duty_link_configs
                .iter()
                .map(|l| serde_json::json!({"href": l.href, "text": l.alt}))
                .collect();
        }
        config
    }

    fn email(&self, e: &EmailConfig) -> serde_json::Value {
        let headers: serde_json::Map<String, serde_json::Value> = e
            .headers
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone().into()))
            .collect();
        let mut config = serde_json::json!({
            "to": e.to,
            "send_resolved": e.send_resolved,
            "headers": headers,
            "text": e.text,
        });
        let optional = [
            ("from", e.from.clone()),
            ("smarthost", e.smarthost.clone()),
            ("auth_username", e.auth_username.clone()),
            (
                "auth_password_file",
                e.auth_password.as_ref().map(|s| self.path(s)),
            ),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                config[key] = value.into();
            }
        }
        if let Some(require_tls) = e.require_tls {
            config["require_tls"] = require_tls.into();
        }
        config
    }
}

/// Every alert name a receiver may select, as the PrometheusRule names them.
pub fn alert_names() -> impl Iterator<Item = &'static str> {
    AlertKind::ALL.into_iter().map(AlertKind::alert_name)
}
