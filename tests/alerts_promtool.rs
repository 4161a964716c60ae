//! The generated PrometheusRules against the real promtool: they parse (`check rules`)
//! and they fire exactly when they should on synthetic series (`test rules`).

mod support;

use std::collections::BTreeMap;

use msgpipe::plan::alerts::{AlertingRule, alert_name};
use msgpipe::plan::{DesiredState, PrometheusRule};
use proptest::prelude::*;
use serde_json::{Value, json};
use support::{output_text, plan_yaml, promtool_test_rules, repo_path, rule_file, run_promtool};

/// Writes a rule file and runs `promtool check rules` on it; returns promtool's output.
fn check_rules(rules: &[&PrometheusRule]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rules.yaml");
    std::fs::write(&path, rule_file(rules).to_string()).expect("write rules");
    let output = run_promtool(dir.path(), &["check", "rules", "rules.yaml"]);
    let text = output_text(&output);
    assert!(
        output.status.success(),
        "promtool check rules failed:\n{text}"
    );
    text
}

#[test]
fn rules_of_every_example_pass_promtool_check() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo_path("examples")).expect("examples/") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue; // examples/secrets/ and the benchmark programs
        }
        let text = std::fs::read_to_string(&path).expect("readable");
        if !text.contains("kind: MessagePipeline") {
            continue;
        }
        let state = plan_yaml(&text);
        if let Some(rule) = &state.prometheus_rule {
            let count = rule.spec.groups[0].rules.len();
            let output = check_rules(&[rule]);
            assert!(
                output.contains(&format!("SUCCESS: {count} rules found")),
                "{}: {output}",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 3, "only {checked} examples have alerts");
}

/// Queue names RabbitMQ accepts but PromQL and Go templates need escaping for.
fn awkward_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9_.-]{0,30}",
        Just("quo\"te".to_string()),
        Just("back\\slash".to_string()),
        Just("tmpl{{ $value }}".to_string()),
        Just("ünïcødé.队列".to_string()),
        "[^\\p{C}]{1,40}".prop_filter("not reserved", |s| !s.starts_with("amq.")),
    ]
}

prop_compose! {
    fn alerting_manifest(index: usize)(
        queue in awkward_name(),
        vhost in awkward_name(),
        detailed in any::<bool>(),
        selector in prop::option::of("c[a-z_]{0,9}"),
        threshold in 0u64..1_000_000,
    ) -> String {
        let queue = serde_json::to_string(&queue).expect("json string");
        let vhost = serde_json::to_string(&vhost).expect("json string");
        let metrics = if detailed { "detailed" } else { "perObject" };
        let selector = selector.map(|k| format!("selector: {{ {k}: \"v\\\"x\" }},")).unwrap_or_default();
        format!(r#"
apiVersion: msgpipe.io/v1alpha1
kind: MessagePipeline
metadata: {{ name: p{index}, namespace: ns }}
spec:
  broker: {{ secretRef: {{ name: s }}, vhost: {vhost} }}
  queue: {{ name: {queue} }}
  alerts: {{
    {selector}
    metrics: {metrics},
    runbookUrl: "https://wiki.example/{{{{x}}}}",
    dlqDepth: {{ threshold: {threshold}, for: 90s }},
    dlqGrowth: {{ for: 10m }}, backlog: {{ threshold: {threshold} }},
    noConsumer: {{ for: 1h30m }}, metricsMissing: {{ for: 1d }},
    retryStorm: {{ percent: 40 }} }}
"#)
    }
}

fn manifests() -> impl Strategy<Value = Vec<String>> {
    (0..12usize).map(alerting_manifest).collect::<Vec<_>>()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, failure_persistence: None, ..ProptestConfig::default() })]
    /// Awkward names, selectors, both metric flavours, every alert: promtool accepts them all.
    #[test]
    fn rules_of_generated_specs_pass_promtool_check(manifests in manifests()) {
        let states: Vec<DesiredState> = manifests.iter().map(|m| plan_yaml(m)).collect();
        let rules: Vec<&PrometheusRule> = states.iter().filter_map(|s| s.prometheus_rule.as_ref()).collect();
        let output = check_rules(&rules);
        prop_assert!(output.contains(&format!("SUCCESS: {} rules found", rules.len() * 6)), "{}", output);
    }
}

/// A pipeline with every alert, scoped by a selector, and short windows.
const ALL_ALERTS: &str = r#"
apiVersion: msgpipe.io/v1alpha1
kind: MessagePipeline
metadata: { name: notes, namespace: notes-app }
spec:
  broker: { secretRef: { name: rabbitmq }, vhost: "/" }
  queue: { name: notes_queue }
  deadLetter: { queue: notes_queue_dlq }
  alerts:
    labels: { team: notes }
    selector: { rabbitmq_cluster: prod }
    runbookUrl: https://wiki.example/runbooks/notes
    dlqDepth: { threshold: 100, for: 5m, severity: critical }
    dlqGrowth: { for: 10m, severity: warning }
    backlog: { threshold: 1000, for: 10m, severity: warning }
    noConsumer: { for: 5m, severity: warning }
    metricsMissing: { for: 10m, severity: warning }
    retryStorm: { percent: 25, for: 10m, severity: warning }
"#;

fn rule<'a>(state: &'a DesiredState, alert: &str) -> &'a AlertingRule {
    let rule = state.prometheus_rule.as_ref().expect("alerts enabled");
    rule.spec.groups[0]
        .rules
        .iter()
        .find(|r| r.alert == alert)
        .expect("alert generated")
}

/// The alert promtool must see: series labels plus rule labels, annotations with `$value` filled in.
fn expected_alert(rule: &AlertingRule, series_labels: &[(&str, &str)], value: &str) -> Value {
    let mut labels: BTreeMap<String, String> = rule.labels.clone();
    labels.extend(
        series_labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let annotations: BTreeMap<String, String> = rule
        .annotations
        .iter()
        .map(|(k, v)| (k.clone(), v.replace("{{ $value }}", value)))
        .collect();
    json!({ "exp_labels": labels, "exp_annotations": annotations })
}

/// Runs `promtool test rules` with the pipeline's rules, `series` (PromQL selector, values in
/// promtool's expanding notation, one sample a minute) and `(minute, alert, expected firing alerts)`.
fn assert_promtool_cases(
    state: &DesiredState,
    series: &[(String, &str)],
    cases: &[(u32, &str, Vec<Value>)],
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = state.prometheus_rule.as_ref().expect("alerts enabled");
    std::fs::write(
        dir.path().join("rules.yaml"),
        rule_file(&[rules]).to_string(),
    )
    .expect("write rules");
    let tests = json!({
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": series.iter().map(|(s, v)| json!({"series": s, "values": v})).collect::<Vec<_>>(),
            "alert_rule_test": cases.iter().map(|(minute, alert, exp)| json!({
                "eval_time": format!("{minute}m"), "alertname": alert, "exp_alerts": exp
            })).collect::<Vec<_>>(),
        }],
    });
    promtool_test_rules(dir.path(), &tests);
}

fn series(metric: &str, vhost: &str, queue: &str, cluster: &str) -> String {
    format!(r#"{metric}{{vhost="{vhost}",queue="{queue}",rabbitmq_cluster="{cluster}"}}"#)
}

const DLQ_LABELS: [(&str, &str); 3] = [
    ("vhost", "/"),
    ("queue", "notes_queue_dlq"),
    ("rabbitmq_cluster", "prod"),
];
const WORK_LABELS: [(&str, &str); 3] = [
    ("vhost", "/"),
    ("queue", "notes_queue"),
    ("rabbitmq_cluster", "prod"),
];

#[test]
fn dlq_depth_alert_is_pending_then_fires_and_ignores_other_series() {
    let state = plan_yaml(ALL_ALERTS);
    let m = "rabbitmq_queue_messages";
    let input = [
        // The DLQ crosses 100 at minute 2; `for: 5m` means firing from minute 7.
        (series(m, "/", "notes_queue_dlq", "prod"), "0 0 150x20"),
        // Same depth, but another vhost, another queue, another cluster: never fire.
        (series(m, "other", "notes_queue_dlq", "prod"), "500x22"),
        (series(m, "/", "someone_elses_dlq", "prod"), "500x22"),
        (series(m, "/", "notes_queue_dlq", "staging"), "500x22"),
        // The messages metric of the work queue keeps metricsMissing quiet elsewhere.
        (series(m, "/", "notes_queue", "prod"), "0x22"),
    ];
    let fired = expected_alert(rule(&state, alert_name::DLQ_DEPTH), &DLQ_LABELS, "150");
    assert_promtool_cases(
        &state,
        &input,
        &[
            (1, alert_name::DLQ_DEPTH, vec![]),
            (5, alert_name::DLQ_DEPTH, vec![]), // pending: for has not elapsed
            (8, alert_name::DLQ_DEPTH, vec![fired.clone()]),
            (20, alert_name::DLQ_DEPTH, vec![fired]),
        ],
    );
}

#[test]
fn dlq_depth_alert_stays_silent_at_or_below_threshold() {
    let state = plan_yaml(ALL_ALERTS);
    let input = [(
        series("rabbitmq_queue_messages", "/", "notes_queue_dlq", "prod"),
        "100x30",
    )];
    assert_promtool_cases(
        &state,
        &input,
        &[
            (10, alert_name::DLQ_DEPTH, vec![]),
            (30, alert_name::DLQ_DEPTH, vec![]),
        ],
    );
}

#[test]
fn detailed_flavour_alerts_on_detailed_metric_names_only() {
    let state = plan_yaml(&ALL_ALERTS.replace(
        "labels: { team: notes }",
        "labels: { team: notes }\n    metrics: detailed",
    ));
    let input = [
        (
            series(
                "rabbitmq_detailed_queue_messages",
                "/",
                "notes_queue_dlq",
                "prod",
            ),
            "150x20",
        ),
        // A per-object series must not satisfy the detailed rules.
        (
            series("rabbitmq_queue_messages", "/", "notes_queue_dlq", "prod"),
            "900x20",
        ),
    ];
    let fired = expected_alert(rule(&state, alert_name::DLQ_DEPTH), &DLQ_LABELS, "150");
    assert_promtool_cases(&state, &input, &[(10, alert_name::DLQ_DEPTH, vec![fired])]);
}

#[test]
fn dlq_growth_alert_fires_while_dead_letters_keep_arriving_and_resolves_when_they_stop() {
    let state = plan_yaml(ALL_ALERTS);
    // +10 a minute for 30 minutes, then flat.
    let input = [(
        series("rabbitmq_queue_messages", "/", "notes_queue_dlq", "prod"),
        "0+10x30 300x30",
    )];
    let fired = expected_alert(rule(&state, alert_name::DLQ_GROWING), &DLQ_LABELS, "50");
    assert_promtool_cases(
        &state,
        &input,
        &[
            (8, alert_name::DLQ_GROWING, vec![]), // growing, but not yet for 10m
            (20, alert_name::DLQ_GROWING, vec![fired]),
            (50, alert_name::DLQ_GROWING, vec![]), // flat for 20m: resolved
        ],
    );
}

#[test]
fn backlog_alert_fires_on_the_work_queue_only() {
    let state = plan_yaml(ALL_ALERTS);
    let m = "rabbitmq_queue_messages";
    let input = [
        (series(m, "/", "notes_queue", "prod"), "5000x30"),
        (series(m, "/", "notes_queue_dlq", "prod"), "5000x30"),
        (series(m, "/", "notes_queue.retry.1", "prod"), "5000x30"),
    ];
    let fired = expected_alert(rule(&state, alert_name::BACKLOG), &WORK_LABELS, "5000");
    assert_promtool_cases(
        &state,
        &input,
        &[
            (5, alert_name::BACKLOG, vec![]),
            (15, alert_name::BACKLOG, vec![fired]),
        ],
    );
}

#[test]
fn no_consumer_alert_fires_on_the_work_queue_never_on_dlq_or_retry_queues() {
    let state = plan_yaml(ALL_ALERTS);
    let (m, c) = ("rabbitmq_queue_messages", "rabbitmq_queue_consumers");
    let input = [
        // Work queue: messages and no consumer from the start; a consumer appears at minute 20.
        (series(m, "/", "notes_queue", "prod"), "7x40"),
        (series(c, "/", "notes_queue", "prod"), "0x19 1x20"),
        // DLQ and retry queue: messages and never a consumer, by design.
        (series(m, "/", "notes_queue_dlq", "prod"), "7x40"),
        (series(c, "/", "notes_queue_dlq", "prod"), "0x40"),
        (series(m, "/", "notes_queue.retry.1", "prod"), "7x40"),
        (series(c, "/", "notes_queue.retry.1", "prod"), "0x40"),
    ];
    let fired = expected_alert(rule(&state, alert_name::NO_CONSUMER), &WORK_LABELS, "0");
    assert_promtool_cases(
        &state,
        &input,
        &[
            (3, alert_name::NO_CONSUMER, vec![]),
            (10, alert_name::NO_CONSUMER, vec![fired]),
            (30, alert_name::NO_CONSUMER, vec![]),
        ],
    );
}

#[test]
fn no_consumer_alert_stays_silent_on_an_empty_work_queue() {
    let state = plan_yaml(ALL_ALERTS);
    let input = [
        (
            series("rabbitmq_queue_messages", "/", "notes_queue", "prod"),
            "0x30",
        ),
        (
            series("rabbitmq_queue_consumers", "/", "notes_queue", "prod"),
            "0x30",
        ),
    ];
    assert_promtool_cases(&state, &input, &[(20, alert_name::NO_CONSUMER, vec![])]);
}

#[test]
fn metrics_missing_alert_fires_when_the_dlq_series_is_absent_and_not_when_present() {
    let state = plan_yaml(ALL_ALERTS);
    let m = "rabbitmq_queue_messages";
    // Only the work queue is scraped for 30 minutes; then the DLQ series appears too.
    let input = [
        (series(m, "/", "notes_queue", "prod"), "0x60"),
        (series(m, "/", "notes_queue_dlq", "prod"), "_x30 0x30"),
        // The DLQ of another cluster does not count as present.
        (series(m, "/", "notes_queue_dlq", "staging"), "0x60"),
    ];
    let fired = expected_alert(rule(&state, alert_name::METRICS_MISSING), &DLQ_LABELS, "1");
    assert_promtool_cases(
        &state,
        &input,
        &[
            (5, alert_name::METRICS_MISSING, vec![]),
            (15, alert_name::METRICS_MISSING, vec![fired]),
            (45, alert_name::METRICS_MISSING, vec![]),
        ],
    );
}

fn counter(metric: &str, labels: &str) -> String {
    format!("{metric}{{{labels}}}")
}

const RETRY_PUBLISHED: &str = "rabbitmq_queue_exchange_messages_published_total";
const DELIVERED: &str = "rabbitmq_queue_messages_delivered_ack_total";

#[test]
fn retry_storm_fires_above_the_share_and_resolves_when_retries_stop() {
    let state = plan_yaml(ALL_ALERTS);
    let tier = |n: u32| {
        format!(
            r#"vhost="/",exchange="notes_queue.retry",queue="notes_queue.retry.{n}",rabbitmq_cluster="prod""#
        )
    };
    let input = [
        // 10 deliveries/s from the work queue; 3/s + 2/s into the two retry tiers (50 %) for
        // 30 minutes, then no more retries.
        (
            counter(
                DELIVERED,
                r#"vhost="/",queue="notes_queue",rabbitmq_cluster="prod""#,
            ),
            "0+600x60",
        ),
        (counter(RETRY_PUBLISHED, &tier(1)), "0+180x30 5400x30"),
        (counter(RETRY_PUBLISHED, &tier(2)), "0+120x30 3600x30"),
    ];
    let rule = rule(&state, alert_name::RETRY_STORM);
    let mut fired = expected_alert(rule, &[("vhost", "/"), ("rabbitmq_cluster", "prod")], "");
    for (key, value) in fired["exp_annotations"].as_object_mut().expect("map") {
        if key == "value" || key == "summary" {
            *value = Value::from(
                value
                    .as_str()
                    .expect("text")
                    .replace("{{ $value | humanizePercentage }}", "50%"),
            );
        }
    }
    assert_eq!(fired["exp_labels"]["queue"], "notes_queue");
    assert_promtool_cases(
        &state,
        &input,
        &[
            (8, alert_name::RETRY_STORM, vec![]), // above the share, but not yet for 10m
            (20, alert_name::RETRY_STORM, vec![fired]),
            (45, alert_name::RETRY_STORM, vec![]), // no retries for 15m: resolved
        ],
    );
}

#[test]
fn retry_storm_stays_silent_below_the_share_and_ignores_other_pipelines() {
    let state = plan_yaml(ALL_ALERTS);
    let input = [
        // 10 deliveries/s, 1/s retried (10 %, below 25 %).
        (
            counter(
                DELIVERED,
                r#"vhost="/",queue="notes_queue",rabbitmq_cluster="prod""#,
            ),
            "0+600x40",
        ),
        (
            counter(
                RETRY_PUBLISHED,
                r#"vhost="/",exchange="notes_queue.retry",queue="notes_queue.retry.1",rabbitmq_cluster="prod""#,
            ),
            "0+60x40",
        ),
        // Storms elsewhere: another pipeline's retry exchange, another vhost, another cluster.
        (
            counter(
                RETRY_PUBLISHED,
                r#"vhost="/",exchange="orders.retry",queue="orders.retry.1",rabbitmq_cluster="prod""#,
            ),
            "0+6000x40",
        ),
        (
            counter(
                RETRY_PUBLISHED,
                r#"vhost="other",exchange="notes_queue.retry",queue="notes_queue.retry.1",rabbitmq_cluster="prod""#,
            ),
            "0+6000x40",
        ),
        (
            counter(
                RETRY_PUBLISHED,
                r#"vhost="/",exchange="notes_queue.retry",queue="notes_queue.retry.1",rabbitmq_cluster="staging""#,
            ),
            "0+6000x40",
        ),
    ];
    assert_promtool_cases(
        &state,
        &input,
        &[
            (20, alert_name::RETRY_STORM, vec![]),
            (40, alert_name::RETRY_STORM, vec![]),
        ],
    );
}

#[test]
fn alerts_carry_the_pipeline_namespace_over_the_series_namespace() {
    let state = plan_yaml(ALL_ALERTS);
    // The scrape labels the series with the RabbitMQ pod's namespace; the alert must carry the
    // pipeline's, which the AlertmanagerConfig's OnNamespace matcher selects.
    let input = [(
        r#"rabbitmq_queue_messages{vhost="/",queue="notes_queue_dlq",rabbitmq_cluster="prod",namespace="rabbitmq-system"}"#.to_string(),
        "150x20",
    )];
    let rule = rule(&state, alert_name::DLQ_DEPTH);
    let fired = expected_alert(rule, &DLQ_LABELS, "150");
    assert_eq!(fired["exp_labels"]["namespace"], "notes-app");
    assert_promtool_cases(&state, &input, &[(10, alert_name::DLQ_DEPTH, vec![fired])]);
}
