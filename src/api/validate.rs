//! Field-level validation of a MessagePipeline, with errors that name the field.
//!
//! The CRD schema enforces most of these in the API server; this module enforces all of
//! them (plus what the schema cannot say) so `msgpipe render`/`apply` and the operator's
//! `InvalidSpec` condition agree with it.

use std::collections::BTreeMap;
use std::fmt;

use super::spec::*;

/// Longest message TTL RabbitMQ accepts (2^32 - 1 ms, about 49.7 days).
pub const MAX_TTL_MILLIS: u64 = u32::MAX as u64;
/// Longest metadata.name that leaves room for the `-alerts`/`-client` suffixes.
pub const NAME_MAX_LEN: usize = 253 - "-alerts".len();
/// Alert labels the operator sets itself and users may not override.
pub const RESERVED_ALERT_LABELS: [&str; 6] = [
    "alertname",
    "severity",
    "vhost",
    "queue",
    "msgpipe_pipeline",
    "msgpipe_namespace",
];

/// One invalid field: `spec.retry.maxAttempts: must be between 1 and 100`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FieldError {
    /// JSON path of the field, e.g. `spec.retry.backoff.maxDelay`.
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Every problem found in one spec, reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidSpec {
    pub errors: Vec<FieldError>,
}

impl fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl From<FieldError> for InvalidSpec {
    fn from(error: FieldError) -> Self {
        Self {
            errors: vec![error],
        }
    }
}

/// Collects field errors; `finish` turns them into a result.
#[derive(Default)]
pub(crate) struct Findings(Vec<FieldError>);

impl Findings {
    pub(crate) fn fail(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(path, message));
    }

    pub(crate) fn finish(self) -> Result<(), InvalidSpec> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(InvalidSpec { errors: self.0 })
        }
    }

    /// RabbitMQ object name: 1..=255 bytes, no `amq.` prefix, no control characters.
    pub(crate) fn rabbit_name(&mut self, path: &str, name: &str) {
        if let Some(problem) = rabbit_name_problem(name) {
            self.fail(path, problem);
        }
    }

    fn at_least_one(&mut self, path: &str, value: Option<u64>) {
        if value == Some(0) {
            self.fail(path, "must be at least 1");
        }
    }

    fn ttl(&mut self, path: &str, value: super::Duration) {
        if value.as_millis() == 0 {
            self.fail(path, "must be at least 1ms");
        } else if value.as_millis() > MAX_TTL_MILLIS {
            self.fail(
                path,
                format!("{value} exceeds RabbitMQ's longest message TTL (4294967295ms, about 49d)"),
            );
        }
    }
}

/// Why `name` cannot name a RabbitMQ queue or exchange, if it cannot.
pub fn rabbit_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("must not be empty".into())
    } else if name.len() > RABBIT_NAME_MAX_BYTES {
        Some(format!(
            "is {} bytes; RabbitMQ names are at most {RABBIT_NAME_MAX_BYTES}",
            name.len()
        ))
    } else if name.starts_with("amq.") {
        Some(format!(
            "{name:?} starts with \"amq.\", which RabbitMQ reserves"
        ))
    } else if name.chars().any(char::is_control) {
        Some("must not contain control characters".into())
    } else {
        None
    }
}

/// Checks every field of a pipeline; derived names are checked by the planner.
pub fn validate(pipeline: &MessagePipeline) -> Result<(), InvalidSpec> {
    let mut findings = Findings::default();
    validate_metadata(&mut findings, pipeline);
    let spec = &pipeline.spec;
    validate_broker(&mut findings, &spec.broker);
    validate_queue(&mut findings, &spec.queue);
    validate_retry(&mut findings, &spec.retry);
    validate_dead_letter(&mut findings, &spec.dead_letter);
    validate_alerts(&mut findings, &spec.alerts);
    super::notify::validate(&mut findings, spec);
    if !(1..=RETRY_INTERVAL_MAX_SECONDS).contains(&spec.client_flags.retry_interval_seconds) {
        findings.fail(
            "spec.clientFlags.retryIntervalSeconds",
            format!("must be between 1 and {RETRY_INTERVAL_MAX_SECONDS}"),
        );
    }
    findings.finish()
}

fn validate_metadata(findings: &mut Findings, pipeline: &MessagePipeline) {
    match pipeline.metadata.name.as_deref() {
        None | Some("") => findings.fail("metadata.name", "is required"),
        Some(name) => {
            if let Some(problem) = dns_subdomain_problem(name, NAME_MAX_LEN) {
                findings.fail("metadata.name", problem);
            }
        }
    }
    if let Some(namespace) = pipeline.metadata.namespace.as_deref()
        && let Some(problem) = dns_label_problem(namespace)
    {
        findings.fail("metadata.namespace", problem);
    }
}

fn validate_broker(findings: &mut Findings, broker: &BrokerSpec) {
    match (&broker.secret_ref, &broker.broker_ref) {
        (Some(secret), None) => {
            if let Some(problem) = dns_subdomain_problem(&secret.name, 253) {
                findings.fail("spec.broker.secretRef.name", problem);
            }
        }
        (None, Some(broker_ref)) => {
            if let Some(problem) = dns_subdomain_problem(&broker_ref.name, 253) {
                findings.fail("spec.broker.brokerRef.name", problem);
            }
        }
        _ => findings.fail(
            "spec.broker",
            "set exactly one of secretRef (a Secret of this namespace) and brokerRef (a MessageBroker)".to_string(),
        ),
    }
    if let Some(vhost) = &broker.vhost
        && (vhost.is_empty() || vhost.len() > RABBIT_NAME_MAX_BYTES)
    {
        findings.fail(
            "spec.broker.vhost",
            format!("must be 1 to {RABBIT_NAME_MAX_BYTES} bytes"),
        );
    }
}

fn validate_queue(findings: &mut Findings, queue: &QueueSpec) {
    if let Some(name) = &queue.name {
        findings.rabbit_name("spec.queue.name", name);
    }
    if let Some(exchange) = &queue.exchange {
        findings.rabbit_name("spec.queue.exchange", exchange);
    }
    if let Some(key) = &queue.routing_key
        && key.len() > RABBIT_NAME_MAX_BYTES
    {
        findings.fail(
            "spec.queue.routingKey",
            format!(
                "is {} bytes; routing keys are at most {RABBIT_NAME_MAX_BYTES}",
                key.len()
            ),
        );
    }
    findings.at_least_one("spec.queue.maxLength", queue.max_length);
}

fn validate_retry(findings: &mut Findings, retry: &RetrySpec) {
    if !(1..=MAX_ATTEMPTS_LIMIT).contains(&retry.max_attempts) {
        findings.fail(
            "spec.retry.maxAttempts",
            format!(
                "must be between 1 and {MAX_ATTEMPTS_LIMIT}, got {}",
                retry.max_attempts
            ),
        );
    }
    let backoff = &retry.backoff;
    findings.ttl("spec.retry.backoff.initialDelay", backoff.initial_delay);
    findings.ttl("spec.retry.backoff.maxDelay", backoff.max_delay);
    if !(MULTIPLIER_MIN..=MULTIPLIER_MAX).contains(&backoff.multiplier) {
        findings.fail(
            "spec.retry.backoff.multiplier",
            format!(
                "must be between {MULTIPLIER_MIN} and {MULTIPLIER_MAX}, got {}",
                backoff.multiplier
            ),
        );
    }
    if backoff.max_delay < backoff.initial_delay {
        findings.fail(
            "spec.retry.backoff.maxDelay",
            format!("must be >= initialDelay ({})", backoff.initial_delay),
        );
    }
}

fn validate_dead_letter(findings: &mut Findings, dead_letter: &DeadLetterSpec) {
    if let Some(exchange) = &dead_letter.exchange {
        findings.rabbit_name("spec.deadLetter.exchange", exchange);
    }
    if let Some(queue) = &dead_letter.queue {
        findings.rabbit_name("spec.deadLetter.queue", queue);
    }
    if let Some(retention) = dead_letter.retention {
        findings.ttl("spec.deadLetter.retention", retention);
    }
    findings.at_least_one("spec.deadLetter.maxLength", dead_letter.max_length);
}

fn validate_alerts(findings: &mut Findings, alerts: &AlertsSpec) {
    for (key, value) in &alerts.rule_labels {
        let path = format!("spec.alerts.ruleLabels.{key}");
        if let Some(problem) = label_key_problem(key) {
            findings.fail(&path, problem);
        }
        if let Some(problem) = label_value_problem(value) {
            findings.fail(&path, problem);
        }
    }
    prometheus_labels(findings, "spec.alerts.labels", &alerts.labels);
    prometheus_labels(findings, "spec.alerts.selector", &alerts.selector);
    reserved_keys(
        findings,
        "spec.alerts.labels",
        &alerts.labels,
        &RESERVED_ALERT_LABELS,
    );
    reserved_keys(
        findings,
        "spec.alerts.selector",
        &alerts.selector,
        &["vhost", "queue"],
    );
    let severities = [
        ("dlqDepth", Some(&alerts.dlq_depth.severity)),
        ("dlqGrowth", alerts.dlq_growth.as_ref().map(|a| &a.severity)),
        ("backlog", alerts.backlog.as_ref().map(|a| &a.severity)),
        (
            "noConsumer",
            alerts.no_consumer.as_ref().map(|a| &a.severity),
        ),
        (
            "metricsMissing",
            alerts.metrics_missing.as_ref().map(|a| &a.severity),
        ),
    ];
    for (block, severity) in severities {
        if let Some(severity) = severity
            && !is_severity(severity)
        {
            findings.fail(
                format!("spec.alerts.{block}.severity"),
                "must be 1-63 letters, digits, '-' or '_' (e.g. critical, warning)",
            );
        }
    }
    if let Some(url) = &alerts.runbook_url
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        findings.fail(
            "spec.alerts.runbookUrl",
            "must be an http:// or https:// URL",
        );
    }
}

fn prometheus_labels(findings: &mut Findings, path: &str, labels: &BTreeMap<String, String>) {
    for name in labels.keys() {
        let valid_start = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_');
        let valid_rest = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_start || !valid_rest || name.starts_with("__") {
            findings.fail(
                format!("{path}.{name}"),
                "is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*, not starting with __)",
            );
        }
    }
}

fn reserved_keys(
    findings: &mut Findings,
    path: &str,
    labels: &BTreeMap<String, String>,
    reserved: &[&str],
) {
    for name in labels
        .keys()
        .filter(|name| reserved.contains(&name.as_str()))
    {
        findings.fail(
            format!("{path}.{name}"),
            "is set by msgpipe itself and cannot be overridden",
        );
    }
}

pub(super) fn is_severity(value: &str) -> bool {
    (1..=63).contains(&value.len())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// RFC 1123 label: lowercase letters, digits and '-', 1 to 63 of them, no '-' at either end.
pub(super) fn is_dns_label(value: &str) -> bool {
    (1..=63).contains(&value.len())
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !value.starts_with('-')
        && !value.ends_with('-')
}

/// RFC 1123 label: what namespace names must be.
fn dns_label_problem(value: &str) -> Option<String> {
    let valid = is_dns_label(value);
    (!valid).then(|| format!("{value:?} is not a valid namespace name (lowercase RFC 1123 label)"))
}

/// RFC 1123 subdomain: what object names (Secrets, ConfigMaps, pipelines) must be.
fn dns_subdomain_problem(value: &str, max_len: usize) -> Option<String> {
    let valid = (1..=max_len).contains(&value.len())
        && value.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        });
    (!valid).then(|| {
        format!(
            "{value:?} is not a valid Kubernetes name (lowercase letters, digits, '-' and '.', at most {max_len} characters)"
        )
    })
}

/// Kubernetes label key: optional DNS-subdomain prefix and a name of at most 63 characters.
fn label_key_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix
        && dns_subdomain_problem(prefix, 253).is_some()
    {
        return Some(format!(
            "label key prefix {prefix:?} is not a DNS subdomain"
        ));
    }
    if name.is_empty() || label_value_problem(name).is_some() {
        return Some(format!("{key:?} is not a valid label key"));
    }
    None
}

/// Kubernetes label value: at most 63 alphanumerics, '-', '_' or '.', alphanumeric at both ends.
fn label_value_problem(value: &str) -> Option<String> {
    let edges_ok = value.is_empty()
        || (value.starts_with(|c: char| c.is_ascii_alphanumeric())
            && value.ends_with(|c: char| c.is_ascii_alphanumeric()));
    let valid = value.len() <= 63
        && edges_ok
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    (!valid).then(|| {
        format!("label value {value:?} is not valid (at most 63 alphanumerics, '-', '_', '.')")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notes() -> MessagePipeline {
        crate::api::load::parse_pipelines(include_str!("../../examples/notes-pipeline.yaml"))
            .expect("example parses")
            .remove(0)
    }

    fn first_error(pipeline: &MessagePipeline) -> String {
        validate(pipeline).expect_err("must be invalid").errors[0].to_string()
    }

    #[test]
    fn notes_example_is_valid() {
        assert_eq!(validate(&notes()), Ok(()));
    }

    #[test]
    fn max_delay_below_initial_delay_names_both() {
        let mut p = notes();
        p.spec.retry.backoff.max_delay = "500ms".parse().expect("duration");
        assert_eq!(
            first_error(&p),
            "spec.retry.backoff.maxDelay: must be >= initialDelay (1s)"
        );
    }

    #[test]
    fn reserved_and_overlong_names_are_refused() {
        let mut p = notes();
        p.spec.queue.name = Some("amq.notes".into());
        assert!(first_error(&p).starts_with("spec.queue.name: \"amq.notes\" starts with"));
        p.spec.queue.name = Some("é".repeat(128));
        assert_eq!(
            first_error(&p),
            "spec.queue.name: is 256 bytes; RabbitMQ names are at most 255"
        );
    }

    #[test]
    fn ttl_beyond_rabbitmq_limit_is_refused() {
        let mut p = notes();
        p.spec.dead_letter.retention = Some("50d".parse().expect("duration"));
        assert!(first_error(&p).starts_with("spec.deadLetter.retention: 50d exceeds"));
    }

    #[test]
    fn alert_labels_cannot_override_severity_or_be_malformed() {
        let mut p = notes();
        p.spec.alerts.labels.insert("severity".into(), "low".into());
        p.spec.alerts.labels.insert("9team".into(), "x".into());
        let errors = validate(&p).expect_err("invalid").errors;
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["spec.alerts.labels.9team", "spec.alerts.labels.severity"]
        );
    }

    #[test]
    fn rule_labels_must_be_kubernetes_labels() {
        let mut p = notes();
        p.spec
            .alerts
            .rule_labels
            .insert("release".into(), "kube prometheus".into());
        assert!(first_error(&p).starts_with("spec.alerts.ruleLabels.release: label value"));
        p.spec.alerts.rule_labels.clear();
        p.spec
            .alerts
            .rule_labels
            .insert("example.com/tier".into(), "gold".into());
        assert_eq!(validate(&p), Ok(()));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut p = notes();
        p.spec.retry.max_attempts = 0;
        p.spec.retry.backoff.multiplier = 0.5;
        p.spec.client_flags.retry_interval_seconds = 0;
        assert_eq!(validate(&p).expect_err("invalid").errors.len(), 3);
    }
}
