//! The Grafana dashboard the chart ships, and the alert reference in docs/alerts.md:
//! the dashboard is well-formed, every query in it is PromQL that the real promtool accepts
//! and that means what its panel says (promtool `test rules` on synthetic series), its alert
//! panels show every alert the planner can generate, and the docs name every one of them.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use msgpipe::api::notify::AlertKind;
use msgpipe::plan::DesiredState;
use msgpipe::plan::alerts::alert_name;
use regex::Regex;
use serde_json::{Value, json};
use support::{output_text, plan_yaml, promtool_test_rules, repo_path, rule_file, run_promtool};

const DASHBOARD: &str = "charts/msgpipe-operator/dashboards/msgpipe-pipelines.json";
const ALERT_DOCS: &str = "docs/alerts.md";

/// The two values of `alerts.metrics`, as the dashboard's `flavour` variable offers them.
const FLAVOURS: [&str; 2] = ["rabbitmq_queue", "rabbitmq_detailed_queue"];

/// Variables Grafana defines itself.
const GRAFANA_BUILTINS: [&str; 5] = [
    "__rate_interval",
    "__interval",
    "__range",
    "__interval_ms",
    "__range_s",
];

/// The seed article's pipeline with every alert block enabled (the same spec docs/alerts.md shows).
const ALL_ALERTS: &str = r#"
apiVersion: msgpipe.io/v1alpha1
kind: MessagePipeline
metadata: { name: notes, namespace: notes-app }
spec:
  broker: { secretRef: { name: rabbitmq-admin }, vhost: "/" }
  queue: { name: notes_queue }
  deadLetter: { queue: notes_queue_dlq }
  alerts:
    ruleLabels: { release: kube-prometheus-stack }
    labels: { team: notes }
    runbookUrl: https://wiki.example/runbooks/notes
    dlqDepth: { threshold: 100, for: 5m, severity: critical }
    dlqGrowth: { for: 10m, severity: warning }
    backlog: { threshold: 10000, for: 10m, severity: warning }
    noConsumer: { for: 5m, severity: warning }
    metricsMissing: { for: 10m, severity: warning }
    retryStorm: { percent: 25, for: 10m, severity: warning }
"#;

/// A second pipeline, elsewhere, that only watches for missing metrics.
const METRICS_MISSING_ONLY: &str = r#"
apiVersion: msgpipe.io/v1alpha1
kind: MessagePipeline
metadata: { name: audit, namespace: compliance }
spec:
  broker: { secretRef: { name: rabbitmq }, vhost: "/" }
  queue: { name: audit_events }
  alerts:
    metricsMissing: { for: 10m }
"#;

fn dashboard() -> Value {
    let text = std::fs::read_to_string(repo_path(DASHBOARD)).expect("dashboard file exists");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not valid JSON: {e}"))
}

/// Every panel, including those nested in collapsed rows.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels array") {
        all.push(panel);
        if let Some(children) = panel["panels"].as_array() {
            all.extend(children);
        }
    }
    all
}

fn variables(dashboard: &Value) -> &[Value] {
    dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list array")
}

/// One PromQL query of the dashboard, with where it comes from.
struct Query {
    origin: String,
    expr: String,
}

/// Every panel target's expression.
fn panel_queries(dashboard: &Value) -> Vec<Query> {
    let mut queries = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            queries.push(Query {
                origin: format!("panel {} target {}", panel["id"], target["refId"]),
                expr: expr.to_string(),
            });
        }
    }
    queries
}

/// The series selector of every `label_values(<selector>, <label>)` variable query.
fn variable_selectors(dashboard: &Value) -> Vec<Query> {
    let label_values = Regex::new(r"^label_values\((.+),\s*\w+\)$").expect("regex");
    variables(dashboard)
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let query = v["query"]
                .as_str()
                .expect("query variables have a string query");
            let selector = label_values.captures(query).unwrap_or_else(|| {
                panic!(
                    "variable {}: not label_values(selector, label): {query}",
                    v["name"]
                )
            })[1]
                .to_string();
            Query {
                origin: format!("variable {}", v["name"]),
                expr: selector,
            }
        })
        .collect()
}

fn variable_reference() -> Regex {
    Regex::new(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)(?::[^\]]*)?\]\]").expect("regex")
}

/// Names of the template variables `text` refers to.
fn referenced_variables(text: &str) -> BTreeSet<String> {
    variable_reference()
        .captures_iter(text)
        .filter_map(|c| c.get(1).or(c.get(2)).or(c.get(3)))
        .map(|m| m.as_str().to_string())
        .collect()
}

/// What a user of the notes pipeline picks; "All" (`.*`) for the alert filters.
fn picks(flavour: &str) -> BTreeMap<&'static str, String> {
    BTreeMap::from([
        ("flavour", flavour.to_string()),
        ("vhost", "/".to_string()),
        ("queue", "notes_queue".to_string()),
        ("dlq", "notes_queue_dlq".to_string()),
        ("namespace", ".*".to_string()),
        ("pipeline", ".*".to_string()),
        ("__rate_interval", "5m".to_string()),
        ("__interval", "1m".to_string()),
        ("__range", "1h".to_string()),
    ])
}

/// `text` with its template variables replaced as Grafana would; an unknown variable fails.
fn substitute(text: &str, values: &BTreeMap<&str, String>) -> String {
    let rendered = variable_reference().replace_all(text, |c: &regex::Captures| {
        let name = c.get(1).or(c.get(2)).or(c.get(3)).expect("a name").as_str();
        values
            .get(name)
            .unwrap_or_else(|| panic!("no test value for variable ${name} in {text}"))
            .clone()
    });
    assert!(
        !rendered.contains('$'),
        "unsubstituted variable in {rendered}"
    );
    rendered.into_owned()
}

/// The one panel query that lists firing msgpipe alerts (the table), and the one that counts them.
fn alert_queries(dashboard: &Value) -> (String, String) {
    let queries: Vec<String> = panel_queries(dashboard)
        .into_iter()
        .map(|q| q.expr)
        .filter(|e| e.contains("ALERTS{"))
        .collect();
    let list = queries.iter().find(|e| e.starts_with("ALERTS{"));
    let count = queries.iter().find(|e| e.starts_with("count("));
    match (list, count) {
        (Some(list), Some(count)) => (list.clone(), count.clone()),
        _ => panic!(
            "expected an ALERTS table query and a count(ALERTS...) stat query, got {queries:?}"
        ),
    }
}

/// Alert names in a planned pipeline's PrometheusRule.
fn alert_names(state: &DesiredState) -> BTreeSet<String> {
    let rule = state.prometheus_rule.as_ref().expect("alerts enabled");
    rule.spec.groups[0]
        .rules
        .iter()
        .map(|r| r.alert.clone())
        .collect()
}

/// Every alert name the API declares (`AlertKind::ALL`), so that a new alert cannot be added
/// without this file (and so the dashboard and docs) noticing.
fn declared_alert_names() -> BTreeSet<String> {
    AlertKind::ALL
        .iter()
        .map(|kind| kind.alert_name().to_string())
        .collect()
}

/// Writes `queries` (origin, PromQL) as recording rules and runs `promtool check rules` on them.
fn promtool_check(name: &str, queries: &[(String, String)]) -> String {
    let rules: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(|(i, (_, expr))| json!({ "record": format!("msgpipe_dashboard:query_{i}"), "expr": expr }))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = json!({ "groups": [{ "name": name, "rules": rules }] });
    std::fs::write(dir.path().join("dashboard.yaml"), file.to_string()).expect("write rules");
    let output = run_promtool(dir.path(), &["check", "rules", "dashboard.yaml"]);
    let text = output_text(&output);
    let origins: Vec<&str> = queries.iter().map(|(o, _)| o.as_str()).collect();
    assert!(
        output.status.success(),
        "promtool rejects a dashboard query ({name}):\n{text}\nqueries: {origins:?}"
    );
    text
}

/// Runs `promtool test rules` on `rules` with `series` (selector, values, one sample a minute)
/// and `(minute, expr, expected samples)` cases.
fn promtool_eval(
    rules: &[&msgpipe::plan::PrometheusRule],
    series: &[(&str, &str)],
    cases: &[(u32, String, Value)],
) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("rules.yaml"), rule_file(rules).to_string())
        .expect("write rules");
    let tests = json!({
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": series.iter().map(|(s, v)| json!({"series": s, "values": v})).collect::<Vec<_>>(),
            "promql_expr_test": cases.iter().map(|(minute, expr, samples)| json!({
                "expr": expr, "eval_time": format!("{minute}m"), "exp_samples": samples
            })).collect::<Vec<_>>(),
        }],
    });
    promtool_test_rules(dir.path(), &tests);
}

fn samples(labelled: &[(&str, f64)]) -> Value {
    labelled
        .iter()
        .map(|(labels, value)| json!({ "labels": labels, "value": value }))
        .collect()
}

#[test]
fn dashboard_panels_have_unique_ids_targets_and_the_datasource_variable() {
    let dashboard = dashboard();
    assert_eq!(
        dashboard["uid"], "msgpipe-pipelines",
        "the uid is the import/upgrade key"
    );
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let mut ids = BTreeSet::new();
    let mut checked = 0;
    for panel in panels(&dashboard) {
        let id = panel["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel without numeric id: {}", panel["title"]));
        assert!(ids.insert(id), "panel id {id} is used twice");
        let grid = &panel["gridPos"];
        let (x, w) = (
            grid["x"].as_u64().expect("gridPos.x"),
            grid["w"].as_u64().expect("gridPos.w"),
        );
        assert!(x + w <= 24, "panel {id} is wider than the 24-column grid");
        if panel["type"] == "row" {
            continue;
        }
        assert!(
            panel["title"].as_str().is_some_and(|t| !t.is_empty()),
            "panel {id} has no title"
        );
        // A hard-coded datasource uid breaks the dashboard in every other Grafana.
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {id} datasource"
        );
        let targets = panel["targets"].as_array().filter(|t| !t.is_empty());
        let targets = targets.unwrap_or_else(|| panic!("panel {id} has no targets"));
        let mut ref_ids = BTreeSet::new();
        for target in targets {
            assert!(
                ref_ids.insert(target["refId"].as_str().expect("refId")),
                "panel {id}: refId twice"
            );
            assert_eq!(
                target["datasource"]["uid"], "${datasource}",
                "panel {id} target datasource"
            );
            assert!(
                target["expr"]
                    .as_str()
                    .is_some_and(|e| !e.trim().is_empty()),
                "panel {id}: empty expr"
            );
        }
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} panels");
    let datasource = variables(&dashboard)
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");
    for variable in variables(&dashboard)
        .iter()
        .filter(|v| v["type"] == "query")
    {
        let name = &variable["name"];
        assert_eq!(
            variable["datasource"]["uid"], "${datasource}",
            "variable {name} datasource"
        );
    }
}

#[test]
fn every_variable_a_query_uses_is_defined() {
    let dashboard = dashboard();
    let defined: BTreeSet<String> = variables(&dashboard)
        .iter()
        .map(|v| v["name"].as_str().expect("variable name").to_string())
        .chain(GRAFANA_BUILTINS.iter().map(|b| b.to_string()))
        .collect();
    let queries = panel_queries(&dashboard)
        .into_iter()
        .chain(variable_selectors(&dashboard));
    let mut used = BTreeSet::new();
    for query in queries {
        for name in referenced_variables(&query.expr) {
            assert!(
                defined.contains(&name),
                "{} uses undefined variable ${name}",
                query.origin
            );
            used.insert(name);
        }
    }
    for wanted in ["flavour", "vhost", "queue", "dlq", "namespace", "pipeline"] {
        assert!(used.contains(wanted), "no query uses ${wanted}");
    }
}

#[test]
fn every_query_passes_promtool_for_both_metric_flavours() {
    let dashboard = dashboard();
    let queries: Vec<Query> = panel_queries(&dashboard)
        .into_iter()
        .chain(variable_selectors(&dashboard))
        .collect();
    for flavour in FLAVOURS {
        let values = picks(flavour);
        let rendered: Vec<(String, String)> = queries
            .iter()
            .map(|q| (q.origin.clone(), substitute(&q.expr, &values)))
            .collect();
        let output = promtool_check(flavour, &rendered);
        assert!(
            output.contains(&format!("SUCCESS: {} rules found", rendered.len())),
            "{flavour}: {output}"
        );
        let names = rendered.iter().map(|(_, e)| e.as_str()).collect::<String>();
        assert!(
            names.contains(&format!("{flavour}_messages{{")),
            "{flavour}: no depth query"
        );
        assert!(
            names.contains(&format!("{flavour}_consumers{{")),
            "{flavour}: no consumer query"
        );
    }
}

#[test]
fn gauges_are_never_passed_to_rate() {
    let dashboard = dashboard();
    let counter_function =
        Regex::new(r"\b(?:rate|irate|increase)\s*\(\s*([^\[\s{(]+)").expect("regex");
    let mut counters = 0;
    for query in panel_queries(&dashboard) {
        for captures in counter_function.captures_iter(&query.expr) {
            let metric = &captures[1];
            assert!(
                metric.ends_with("_total"),
                "{}: rate-like function on {metric}, which is not a counter: {}",
                query.origin,
                query.expr
            );
            counters += 1;
        }
    }
    assert!(
        counters > 0,
        "no counter query to check (the broker-wide dead-letter panel?)"
    );
    let exprs: String = panel_queries(&dashboard)
        .into_iter()
        .map(|q| q.expr)
        .collect();
    assert!(exprs.contains("deriv(${flavour}_messages{vhost=\"$vhost\", queue=\"$dlq\"}"));
    assert!(exprs.contains("delta(${flavour}_messages{vhost=\"$vhost\", queue=\"$dlq\"}[5m])"));
}

#[test]
fn retry_tier_queries_select_exactly_the_retry_queues_of_the_work_queue() {
    let dashboard = dashboard();
    let values = picks("rabbitmq_queue");
    let retry_queries: Vec<String> = panel_queries(&dashboard)
        .into_iter()
        .filter(|q| q.expr.contains("retry"))
        .map(|q| substitute(&q.expr, &values))
        .collect();
    assert!(
        retry_queries.len() >= 2,
        "retry depth and consumer queries: {retry_queries:?}"
    );
    let mut series = Vec::new();
    let queues = [
        ("/", "notes_queue.retry.1"),
        ("/", "notes_queue.retry.2"),
        ("/", "notes_queue.retry.12"),
        // Tiers named with their delay (this version), beside the plain ones (earlier ones).
        ("/", "notes_queue.retry.3.4s"),
        ("/", "notes_queue.retry.4.1m30s"),
        ("/", "notes_queue.retry.5.1500ms"),
        // Not retry tiers of notes_queue in vhost "/": must not be selected.
        ("/", "notes_queue"),
        ("/", "notes_queue_dlq"),
        ("/", "notes_queue.retry"),
        ("/", "notes_queueXretryX1"),
        ("/", "notes_queue.retry.1.old"),
        ("/", "other_queue.retry.1"),
        ("other", "notes_queue.retry.1"),
    ];
    let selectors: Vec<String> = queues
        .iter()
        .flat_map(|(vhost, queue)| {
            ["rabbitmq_queue_messages", "rabbitmq_queue_consumers"]
                .map(|m| format!(r#"{m}{{vhost="{vhost}",queue="{queue}",instance="rabbit-0"}}"#))
        })
        .collect();
    series.extend(selectors.iter().map(|s| (s.as_str(), "3x10")));
    let expected = samples(&[
        (r#"{vhost="/",queue="notes_queue.retry.1"}"#, 3.0),
        (r#"{vhost="/",queue="notes_queue.retry.2"}"#, 3.0),
        (r#"{vhost="/",queue="notes_queue.retry.12"}"#, 3.0),
        (r#"{vhost="/",queue="notes_queue.retry.3.4s"}"#, 3.0),
        (r#"{vhost="/",queue="notes_queue.retry.4.1m30s"}"#, 3.0),
        (r#"{vhost="/",queue="notes_queue.retry.5.1500ms"}"#, 3.0),
    ]);
    let cases: Vec<(u32, String, Value)> = retry_queries
        .into_iter()
        .map(|expr| (5, expr, expected.clone()))
        .collect();
    promtool_eval(&[], &series, &cases);
}

#[test]
fn dead_letter_rate_queries_rise_with_dead_letters_and_fall_on_replay() {
    let dashboard = dashboard();
    let values = picks("rabbitmq_queue");
    let rate_queries: Vec<String> = panel_queries(&dashboard)
        .into_iter()
        .filter(|q| {
            q.expr.contains("$dlq") && (q.expr.contains("deriv(") || q.expr.contains("delta("))
        })
        .map(|q| substitute(&q.expr, &values))
        .collect();
    assert_eq!(
        rate_queries.len(),
        2,
        "the deriv and delta panels: {rate_queries:?}"
    );
    // The DLQ fills for 20 minutes, holds for 20, is replayed to empty at minute 41.
    let series = [
        (
            r#"rabbitmq_queue_messages{vhost="/",queue="notes_queue_dlq",instance="rabbit-0"}"#,
            "0+10x20 200x20 0x10",
        ),
        // Another vhost's DLQ of the same name must not leak in.
        (
            r#"rabbitmq_queue_messages{vhost="other",queue="notes_queue_dlq",instance="rabbit-0"}"#,
            "0+99x50",
        ),
    ];
    let dlq = r#"{vhost="/",queue="notes_queue_dlq"}"#;
    let cases: Vec<(u32, String, Value)> = rate_queries
        .iter()
        .flat_map(|expr| {
            [(15, 1.0), (35, 0.0), (42, -1.0)]
                .map(|(minute, sign)| (minute, format!("sgn({expr})"), samples(&[(dlq, sign)])))
        })
        .collect();
    promtool_eval(&[], &series, &cases);
}

#[test]
fn firing_alert_panels_select_every_alert_name_the_planner_declares() {
    let declared = declared_alert_names();
    let generated = alert_names(&plan_yaml(ALL_ALERTS));
    assert_eq!(
        generated, declared,
        "ALL_ALERTS must enable every alert of AlertKind::ALL (a new alert block?)"
    );
    assert!(
        declared.contains(alert_name::DLQ_DEPTH) && declared.len() >= 5,
        "{declared:?}"
    );
    let (list, count) = alert_queries(&dashboard());
    let matcher = Regex::new(r#"alertname=~"([^"]+)""#).expect("regex");
    for query in [&list, &count] {
        assert!(query.contains(r#"alertstate="firing""#), "{query}");
        let pattern = &matcher
            .captures(query)
            .unwrap_or_else(|| panic!("no alertname matcher: {query}"))[1];
        // PromQL regex matchers are anchored at both ends.
        let anchored = Regex::new(&format!("^(?:{pattern})$")).expect("valid regex");
        for name in &declared {
            assert!(anchored.is_match(name), "{query} does not select {name}");
        }
        assert!(
            !anchored.is_match("KubePodCrashLooping"),
            "{query} selects foreign alerts"
        );
    }
}

#[test]
fn firing_alert_panels_show_the_planners_alerts_when_they_fire_in_promtool() {
    let notes = plan_yaml(ALL_ALERTS);
    let audit = plan_yaml(METRICS_MISSING_ONLY);
    let rules = [
        notes.prometheus_rule.as_ref().expect("notes alerts"),
        audit.prometheus_rule.as_ref().expect("audit alerts"),
    ];
    // notes: a backlog nobody consumes, a DLQ that keeps growing, half of the deliveries
    // retried; audit: its DLQ never scraped.
    let series = [
        (
            r#"rabbitmq_queue_messages_delivered_ack_total{vhost="/",queue="notes_queue",instance="rabbit-0"}"#,
            "0+600x40",
        ),
        (
            r#"rabbitmq_queue_exchange_messages_published_total{vhost="/",exchange="notes_queue.retry",queue="notes_queue.retry.1",instance="rabbit-0"}"#,
            "0+300x40",
        ),
        (
            r#"rabbitmq_queue_messages{vhost="/",queue="notes_queue",instance="rabbit-0"}"#,
            "20000x40",
        ),
        (
            r#"rabbitmq_queue_consumers{vhost="/",queue="notes_queue",instance="rabbit-0"}"#,
            "0x40",
        ),
        (
            r#"rabbitmq_queue_messages{vhost="/",queue="notes_queue_dlq",instance="rabbit-0"}"#,
            "0+50x40",
        ),
        (
            r#"rabbitmq_queue_messages{vhost="/",queue="audit_events",instance="rabbit-0"}"#,
            "0x40",
        ),
    ];
    let mut firing: Vec<(String, &str, &str)> = alert_names(&notes)
        .into_iter()
        .filter(|name| name != alert_name::METRICS_MISSING)
        .map(|name| (name, "notes-app", "notes"))
        .collect();
    firing.push((
        alert_name::METRICS_MISSING.to_string(),
        "compliance",
        "audit",
    ));
    let covered: BTreeSet<&str> = firing.iter().map(|(name, _, _)| name.as_str()).collect();
    let declared = declared_alert_names();
    assert_eq!(
        covered,
        declared.iter().map(String::as_str).collect(),
        "every alert fires below"
    );

    let (list, count) = alert_queries(&dashboard());
    let all = picks("rabbitmq_queue");
    // Each filter on its own: the two pipelines differ in namespace and in name.
    let mut audit_by_namespace = all.clone();
    audit_by_namespace.insert("namespace", "compliance".to_string());
    let mut audit_by_name = all.clone();
    audit_by_name.insert("pipeline", "audit".to_string());
    let per_alert: Vec<String> = firing
        .iter()
        .map(|(name, ns, p)| {
            format!(r#"{{alertname="{name}",msgpipe_namespace="{ns}",msgpipe_pipeline="{p}"}}"#)
        })
        .collect();
    let group = "count by (alertname, msgpipe_namespace, msgpipe_pipeline)";
    let audit_only = samples(&[(per_alert.last().expect("audit alert").as_str(), 1.0)]);
    let mut cases = vec![
        (
            30,
            format!("{group} ({})", substitute(&list, &all)),
            samples(
                &per_alert
                    .iter()
                    .map(|l| (l.as_str(), 1.0))
                    .collect::<Vec<_>>(),
            ),
        ),
        (
            30,
            substitute(&count, &all),
            samples(&[("{}", firing.len() as f64)]),
        ),
        // Before any `for:` has elapsed nothing fires: the stat shows 0, not "no data".
        (2, substitute(&count, &all), samples(&[("{}", 0.0)])),
    ];
    for filtered in [&audit_by_namespace, &audit_by_name] {
        let listed = format!("{group} ({})", substitute(&list, filtered));
        cases.push((30, listed, audit_only.clone()));
        cases.push((30, substitute(&count, filtered), samples(&[("{}", 1.0)])));
    }
    promtool_eval(&rules, &series, &cases);
}

#[test]
fn alert_reference_documents_every_alert_with_its_expression() {
    let docs = std::fs::read_to_string(repo_path(ALERT_DOCS)).expect("docs/alerts.md exists");
    let headings: BTreeSet<&str> = docs
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .map(str::trim)
        .collect();
    for name in declared_alert_names() {
        assert!(
            headings.contains(name.as_str()),
            "{ALERT_DOCS} has no `### {name}` section"
        );
    }
    let notes = plan_yaml(ALL_ALERTS);
    let rule = notes.prometheus_rule.as_ref().expect("alerts");
    for alert in &rule.spec.groups[0].rules {
        let one_line = alert.expr.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            docs.contains(&one_line),
            "{ALERT_DOCS} does not show the expression the planner writes for {}: {one_line}",
            alert.alert
        );
    }
    for endpoint in [
        "/metrics/per-object",
        "prometheus.return_per_object_metrics = true",
        "family=queue_coarse_metrics",
        "family=queue_consumer_count",
    ] {
        assert!(
            docs.contains(endpoint),
            "{ALERT_DOCS} does not mention {endpoint}"
        );
    }
}

#[test]
fn yaml_examples_in_the_alert_reference_parse() {
    let docs = std::fs::read_to_string(repo_path(ALERT_DOCS)).expect("docs/alerts.md exists");
    let mut blocks = 0;
    let mut rest = docs.as_str();
    while let Some(start) = rest.find("```yaml\n") {
        let body = &rest[start + "```yaml\n".len()..];
        let end = body.find("\n```").expect("closed yaml block");
        let documents: Vec<Value> = serde_saphyr::from_multiple(&body[..end]).unwrap_or_else(|e| {
            panic!(
                "yaml block {} does not parse: {e}\n{}",
                blocks + 1,
                &body[..end]
            )
        });
        assert!(!documents.is_empty(), "empty yaml block {}", blocks + 1);
        for doc in documents.iter().filter(|d| d.get("kind").is_some()) {
            assert!(
                doc["apiVersion"].is_string(),
                "a Kubernetes object without apiVersion: {doc}"
            );
            assert!(
                doc["metadata"]["name"].is_string(),
                "a Kubernetes object without a name: {doc}"
            );
        }
        blocks += 1;
        rest = &body[end..];
    }
    assert!(blocks >= 6, "only {blocks} yaml examples in {ALERT_DOCS}");
}

#[test]
fn replay_panels_show_replayed_and_failed_again_per_second_per_replay() {
    let dashboard = dashboard();
    let values = picks("rabbitmq_queue");
    let replay_queries: Vec<String> = panel_queries(&dashboard)
        .into_iter()
        .filter(|q| q.expr.contains("msgpipe_replay_messages_total"))
        .map(|q| substitute(&q.expr, &values))
        .collect();
    assert_eq!(
        replay_queries.len(),
        2,
        "replayed and failed again: {replay_queries:?}"
    );
    let (replayed, failed) = (&replay_queries[0], &replay_queries[1]);
    assert!(replayed.contains(r#"outcome="replayed""#), "{replayed}");
    assert!(failed.contains(r#"outcome="failed_again""#), "{failed}");
    // The operator's counters, one sample a minute: 12 copies/s, 3 of them back in the DLQ.
    let series = [
        (
            r#"msgpipe_replay_messages_total{msgpipe_namespace="notes-app",msgpipe_replay="after-incident",outcome="replayed",instance="op-0"}"#,
            "0+720x20",
        ),
        (
            r#"msgpipe_replay_messages_total{msgpipe_namespace="notes-app",msgpipe_replay="after-incident",outcome="failed_again",instance="op-0"}"#,
            "0+180x20",
        ),
    ];
    let labels = r#"{msgpipe_namespace="notes-app",msgpipe_replay="after-incident"}"#;
    let cases = vec![
        (10, replayed.clone(), samples(&[(labels, 12.0)])),
        (10, failed.clone(), samples(&[(labels, 3.0)])),
    ];
    promtool_eval(&[], &series, &cases);
}
