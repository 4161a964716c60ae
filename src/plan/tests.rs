//! Properties of the planner over generated specs.

use std::collections::HashSet;
use std::path::Path;

use proptest::prelude::*;
use regex::Regex;

use super::topology::{ExchangeKind, PolicyDefinition, QueueRole};
use super::*;
use crate::api::load::parse_pipelines;
use crate::api::{Duration, MessagePipelineSpec, QueueType};

fn notes() -> MessagePipeline {
    parse_pipelines(include_str!("../../examples/notes-pipeline.yaml"))
        .expect("example parses")
        .remove(0)
}

fn name() -> impl Strategy<Value = Option<String>> {
    prop::option::weighted(0.3, "[a-z][a-z0-9_.-]{0,20}")
}

prop_compose! {
    fn any_pipeline()(
        queue in name(),
        exchange in name(),
        dlx in name(),
        dlq in name(),
        classic in any::<bool>(),
        attempts in 1u32..=100,
        initial in 1u64..=600_000,
        multiplier in 1.0f64..=10.0,
        extra in 0u64..=3_600_000,
        max_length in prop::option::of(1u64..=10_000_000),
        alerts in any::<bool>(),
    ) -> MessagePipeline {
        let mut p = notes();
        let spec: &mut MessagePipelineSpec = &mut p.spec;
        spec.queue.name = queue;
        spec.queue.exchange = exchange;
        spec.dead_letter.exchange = dlx;
        spec.dead_letter.queue = dlq;
        spec.queue.queue_type = if classic { QueueType::Classic } else { QueueType::Quorum };
        spec.retry.max_attempts = attempts;
        spec.retry.backoff.initial_delay = Duration::from_millis(initial);
        spec.retry.backoff.multiplier = multiplier;
        spec.retry.backoff.max_delay = Duration::from_millis(initial + extra);
        spec.queue.max_length = max_length;
        spec.alerts.enabled = alerts;
        p
    }
}

fn assert_distinct<'a>(
    names: impl Iterator<Item = &'a String>,
    kind: &str,
) -> Result<(), TestCaseError> {
    let mut seen = HashSet::new();
    for name in names {
        prop_assert!(seen.insert(name), "two {} named {:?}", kind, name);
        prop_assert!(
            name.len() <= 255 && !name.starts_with("amq."),
            "bad {} name {:?}",
            kind,
            name
        );
    }
    Ok(())
}

/// Every queue's settings: the policies' definitions and the retry tiers' declare arguments.
fn settings(state: &DesiredState) -> impl Iterator<Item = &PolicyDefinition> {
    let topology = &state.topology;
    topology.policies.iter().map(|p| &p.definition).chain(
        topology
            .queues
            .iter()
            .map(|q| &q.arguments)
            .filter(|a| !a.is_empty()),
    )
}

proptest! {
    #[test]
    fn names_never_collide_and_fit_rabbitmq(p in any_pipeline()) {
        if let Ok(state) = plan(&p, None) {
            assert_distinct(state.topology.queues.iter().map(|q| &q.name), "queues")?;
            assert_distinct(state.topology.exchanges.iter().map(|e| &e.name), "exchanges")?;
        }
    }

    #[test]
    fn each_policy_matches_exactly_its_own_queue(p in any_pipeline()) {
        if let Ok(state) = plan(&p, None) {
            let queues = &state.topology.queues;
            // The work queue and the DLQ have a policy; a retry tier has its settings as
            // declare arguments and no policy.
            for queue in queues {
                let tier = matches!(queue.role, QueueRole::Retry(_));
                prop_assert_eq!(queue.arguments.is_empty(), !tier, "{}", queue.name);
            }
            prop_assert_eq!(state.topology.policies.len(), 2);
            for policy in &state.topology.policies {
                let re = Regex::new(&policy.pattern).expect("pattern compiles");
                let matched: Vec<_> = queues.iter().filter(|q| re.is_match(&q.name)).collect();
                // Never a retry tier, whose own arguments must be all its settings.
                prop_assert_eq!(matched.len(), 1, "{} matches {:?}", policy.pattern, matched);
                prop_assert_eq!(format!("{}{}", topology::POLICY_PREFIX, matched[0].name), policy.name.clone());
            }
        }
    }

    #[test]
    fn every_dead_letter_target_is_bound_to_a_queue(p in any_pipeline()) {
        if let Ok(state) = plan(&p, None) {
            let topo = &state.topology;
            for definition in settings(&state) {
                let Some(dlx) = &definition.dead_letter_exchange else { continue };
                if dlx.is_empty() {
                    // Default exchange: the routing key must name the work queue.
                    let key = definition.dead_letter_routing_key.as_ref().expect("routing key");
                    prop_assert_eq!(key, &state.names.queue);
                } else {
                    let exchange = topo.exchanges.iter().find(|e| &e.name == dlx).expect("DLX declared");
                    prop_assert_eq!(exchange.kind, ExchangeKind::Fanout);
                    let bound: Vec<_> = topo.bindings.iter().filter(|b| &b.source == dlx).collect();
                    prop_assert_eq!(bound.len(), 1);
                    prop_assert_eq!(&bound[0].destination, &state.names.dead_letter_queue);
                }
            }
        }
    }

    #[test]
    fn retry_tier_k_is_reached_by_routing_key_k(p in any_pipeline()) {
        if let Ok(state) = plan(&p, None) {
            let topo = &state.topology;
            for queue in &topo.queues {
                if let QueueRole::Retry(k) = queue.role {
                    let binding = topo.bindings.iter()
                        .find(|b| b.destination == queue.name)
                        .expect("retry queue bound");
                    prop_assert_eq!(&binding.source, &state.names.retry_exchange);
                    prop_assert_eq!(binding.routing_key.clone(), k.to_string());
                    let tier = &state.retry_tiers[(k - 1) as usize];
                    prop_assert_eq!(queue.arguments.message_ttl, Some(tier.delay.as_millis()));
                    prop_assert_eq!(&queue.name, &state.names.retry_queue(tier));
                }
            }
            let retry_exchange_declared = topo.exchanges.iter().any(|e| e.name == state.names.retry_exchange);
            prop_assert_eq!(retry_exchange_declared, !state.retry_tiers.is_empty());
        }
    }

    #[test]
    fn client_contract_round_trips_and_agrees_on_tiers(p in any_pipeline()) {
        if let Ok(state) = plan(&p, None) {
            let data = state.config_map.data.as_ref().expect("data");
            let json = &data[msgpipe_client::config::CONFIG_FILE_NAME];
            let parsed = PipelineConfig::from_json(json, Path::new("pipeline.json")).expect("client parses");
            prop_assert_eq!(&parsed, &state.client_config);
            for attempt in 1..=p.spec.retry.max_attempts {
                let planner = tiers::tier_for_attempt(&state.retry_tiers, attempt).map(|t| t.index);
                let client = parsed.tier_for_attempt(attempt).map(|t| t.index);
                prop_assert_eq!(planner, client, "attempt {}", attempt);
            }
        }
    }

    #[test]
    fn quorum_queues_dead_letter_at_least_once(p in any_pipeline()) {
        if let Ok(state) = plan(&p, None) {
            let quorum = p.spec.queue.queue_type == QueueType::Quorum;
            for def in settings(&state) {
                if def.dead_letter_exchange.is_some() {
                    prop_assert_eq!(def.dead_letter_strategy.is_some(), quorum);
                }
                // at-least-once requires reject-publish; it also keeps full queues from dropping.
                prop_assert_eq!(def.overflow.as_deref(), Some("reject-publish"));
            }
        }
    }
}

#[test]
fn notes_example_plans_the_seed_topology() {
    let state = plan(&notes(), None).expect("plans");
    let queues: Vec<_> = state
        .topology
        .queues
        .iter()
        .map(|q| q.name.as_str())
        .collect();
    assert_eq!(
        queues,
        [
            "notes_queue",
            "notes_queue_dlq",
            "notes_queue.retry.1.1s",
            "notes_queue.retry.2.2s",
            "notes_queue.retry.3.4s",
            "notes_queue.retry.4.8s"
        ]
    );
    let delays: Vec<_> = state
        .retry_tiers
        .iter()
        .map(|t| t.delay.to_string())
        .collect();
    assert_eq!(delays, ["1s", "2s", "4s", "8s"]);
    let rule = state.prometheus_rule.expect("alerts enabled");
    let dlq_alert = &rule.spec.groups[0].rules[0];
    assert_eq!(
        dlq_alert.expr,
        r#"rabbitmq_queue_messages{vhost="/",queue="notes_queue_dlq"} > 100"#
    );
    assert_eq!(
        (
            dlq_alert.for_.as_str(),
            dlq_alert.labels["severity"].as_str()
        ),
        ("5m", "critical")
    );
}

#[test]
fn defaults_derive_every_name_from_the_queue() {
    let mut p = notes();
    p.spec.queue = Default::default();
    p.spec.dead_letter = Default::default();
    let names = plan(&p, None).expect("plans").names;
    assert_eq!(
        [
            names.queue.as_str(),
            &names.work_exchange,
            &names.routing_key,
            &names.retry_exchange,
            &names.dead_letter_exchange,
            &names.dead_letter_queue
        ],
        [
            "notes",
            "notes.work",
            "notes",
            "notes.retry",
            "notes.dlx",
            "notes.dlq"
        ]
    );
}

#[test]
fn vhost_comes_from_spec_then_uri_then_slash() {
    let mut p = notes();
    p.spec.broker.vhost = None;
    assert_eq!(
        plan(&p, Some("from-uri")).expect("plans").topology.vhost,
        "from-uri"
    );
    assert_eq!(plan(&p, None).expect("plans").topology.vhost, "/");
    p.spec.broker.vhost = Some("spec".into());
    assert_eq!(
        plan(&p, Some("from-uri")).expect("plans").topology.vhost,
        "spec"
    );
}

#[test]
fn disabled_alerts_write_no_rule() {
    let mut p = notes();
    p.spec.alerts.enabled = false;
    assert!(plan(&p, None).expect("plans").prometheus_rule.is_none());
}

#[test]
fn classic_queues_get_no_quorum_only_settings() {
    let mut p = notes();
    p.spec.queue.queue_type = QueueType::Classic;
    let state = plan(&p, None).expect("plans");
    for policy in &state.topology.policies {
        assert_eq!(policy.definition.delivery_limit, None, "{}", policy.name);
        assert_eq!(
            policy.definition.dead_letter_strategy, None,
            "{}",
            policy.name
        );
    }
}

#[test]
fn metadata_name_starting_with_amq_is_refused_as_queue_name() {
    let mut p = notes();
    p.spec.queue.name = None;
    p.metadata.name = Some("amq.notes".into());
    let err = plan(&p, None).expect_err("refused");
    assert!(
        err.to_string()
            .starts_with("metadata.name: \"amq.notes\" starts with"),
        "{err}"
    );
}

/// Random edits of a valid manifest: the loader and planner return errors, never panic.
mod no_panic {
    use super::*;
    use crate::api::load::pipeline_from_value;
    use serde_json::Value;

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "\\PC{0,300}".prop_map(Value::String),
            Just(serde_json::json!({})),
            Just(serde_json::json!([1, "a"])),
        ]
    }

    /// Replaces the value at a random path (chosen by `picks`) with `value`.
    fn mutate(node: &mut Value, picks: &[usize], value: Value) {
        if let (Some((pick, rest)), Value::Object(map)) = (picks.split_first(), &mut *node)
            && !map.is_empty()
        {
            let key = map
                .keys()
                .nth(pick % map.len())
                .cloned()
                .unwrap_or_default();
            if let Some(child) = map.get_mut(&key) {
                return mutate(child, rest, value);
            }
        }
        *node = value;
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn mutated_manifests_never_panic(
            edits in prop::collection::vec((prop::collection::vec(0usize..16, 1..5), leaf()), 1..4)
        ) {
            let mut doc = serde_json::to_value(notes()).expect("serialises");
            for (picks, value) in edits {
                mutate(&mut doc, &picks, value);
            }
            if let Ok(pipeline) = pipeline_from_value(doc) {
                let _ = plan(&pipeline, None);
            }
        }

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
            let _ = parse_pipelines(&text);
        }
    }
}

fn billing() -> MessagePipeline {
    parse_pipelines(include_str!("../../examples/billing-notify.yaml"))
        .expect("example parses")
        .remove(0)
}

#[test]
fn no_alertmanager_config_without_notify_or_with_alerts_disabled() {
    assert_eq!(
        plan(&notes(), None).expect("plans").alertmanager_config,
        None
    );
    let mut p = billing();
    p.spec.alerts.notify.clear();
    assert_eq!(plan(&p, None).expect("plans").alertmanager_config, None);
}

#[test]
fn every_alert_carries_the_namespace_label_and_says_what_to_run() {
    let state = plan(&billing(), None).expect("plans");
    let rules = &state.prometheus_rule.expect("alerts").spec.groups[0].rules;
    let names: Vec<_> = rules.iter().map(|r| r.alert.as_str()).collect();
    assert_eq!(
        names,
        [
            "MsgpipeDeadLetterQueueDepth",
            "MsgpipeDeadLetterQueueGrowing",
            "MsgpipeMetricsMissing",
            "MsgpipeRetryStorm"
        ]
    );
    for rule in rules {
        assert_eq!(rule.labels["namespace"], "billing", "{}", rule.alert);
        assert_eq!(rule.labels["msgpipe_namespace"], "billing");
        assert_eq!(rule.annotations["pipeline"], "billing/billing");
        assert_eq!(
            rule.annotations["dlq_list"],
            "msgpipe dlq list -n billing --name billing"
        );
        assert_eq!(
            rule.annotations["dlq_replay"],
            "msgpipe dlq replay -n billing --name billing --all"
        );
        assert!(rule.annotations["value"].contains("$value"));
        assert!(!rule.annotations["queue"].is_empty());
    }
    // Every name a receiver can select is a name the PrometheusRule uses.
    let selectable: Vec<_> = notify::alert_names().collect();
    assert!(names.iter().all(|n| selectable.contains(n)));
}

#[test]
fn retry_storm_compares_retry_tier_publishes_with_work_queue_deliveries() {
    let state = plan(&billing(), None).expect("plans");
    let rule = state.prometheus_rule.expect("alerts").spec.groups[0]
        .rules
        .iter()
        .find(|r| r.alert == alerts::alert_name::RETRY_STORM)
        .cloned()
        .expect("retry storm");
    assert_eq!(
        rule.expr,
        r#"(sum by (vhost) (rate(rabbitmq_queue_exchange_messages_published_total{vhost="/",exchange="billing.invoices.retry"}[5m])) / sum by (vhost) (rate(rabbitmq_queue_messages_delivered_ack_total{vhost="/",queue="billing.invoices"}[5m]))) > 0.25"#
    );
    assert_eq!(rule.labels["queue"], "billing.invoices");
}

#[test]
fn alertmanager_config_routes_each_receiver_and_names_secrets_only() {
    let state = plan(&billing(), None).expect("plans");
    let config = state.alertmanager_config.expect("notify set");
    assert_eq!(config.metadata.name.as_deref(), Some("billing-notify"));
    assert_eq!(config.metadata.namespace.as_deref(), Some("billing"));
    let route = &config.spec.route;
    assert_eq!(route.receiver, notify::UNROUTED_RECEIVER);
    let scope: Vec<_> = route
        .matchers
        .iter()
        .map(|m| format!("{}{}{}", m.name, m.match_type, m.value))
        .collect();
    assert_eq!(scope, ["namespace=billing", "msgpipe_pipeline=billing"]);
    let children: Vec<_> = route
        .routes
        .iter()
        .map(|r| {
            let matchers: Vec<_> = r
                .matchers
                .iter()
                .map(|m| format!("{}{}{}", m.name, m.match_type, m.value))
                .collect();
            (r.receiver.as_str(), matchers, r.continue_)
        })
        .collect();
    assert_eq!(
        children,
        [
            (
                "oncall",
                vec!["alertname=MsgpipeDeadLetterQueueDepth".to_string()],
                true
            ),
            (
                "team-slack",
                vec!["alertname=~MsgpipeDeadLetterQueueGrowing|MsgpipeRetryStorm".to_string()],
                true
            ),
            ("team-email", vec![], true),
        ]
    );
    assert_eq!(route.routes[0].repeat_interval.as_deref(), Some("1h"));
    let receivers = &config.spec.receivers;
    let pagerduty = &receivers[1].pagerduty_configs[0];
    assert_eq!(
        (
            pagerduty.routing_key.name.as_str(),
            pagerduty.routing_key.key.as_str()
        ),
        ("billing-alerting", "pagerduty-routing-key")
    );
    let slack = &receivers[2].slack_configs[0];
    assert_eq!(slack.api_url.key, "slack-webhook-url");
    assert!(slack.text.contains("{{ .Annotations.dlq_replay }}"));
    let email = &receivers[3].email_configs[0];
    assert_eq!(email.to, "billing-team@example.com");
    assert_eq!(email.smarthost, None, "global SMTP settings apply");
    // Serialized, the object has the prometheus-operator's field names.
    let json = serde_json::to_value(&config).expect("json");
    assert_eq!(
        json["spec"]["receivers"][2]["slackConfigs"][0]["apiURL"]["name"],
        "billing-alerting"
    );
}

#[test]
fn pagerduty_severity_follows_the_mapping_then_the_label_name() {
    let mapping = [(
        "page".to_string(),
        crate::api::notify::PagerDutySeverity::Critical,
    )]
    .into_iter()
    .collect();
    let template = notify::pagerduty_severity_template(&mapping);
    assert!(template.contains(r#"eq .CommonLabels.severity "page" }}critical"#));
    assert!(template.contains(r#"eq .CommonLabels.severity "warning" }}warning"#));
    assert!(template.ends_with("{{ else }}error{{ end }}"));
}

#[test]
fn fragment_is_what_the_prometheus_operator_would_generate_with_secret_files() {
    let state = plan(&billing(), None).expect("plans");
    let config = state.alertmanager_config.expect("notify set");
    let fragment = notify::alertmanager_fragment(&[&config], "/run/secrets/");
    let route = &fragment.routes[0];
    assert_eq!(
        route.matchers,
        [r#"namespace="billing""#, r#"msgpipe_pipeline="billing""#]
    );
    assert!(route.continue_);
    assert_eq!(route.routes[0].receiver, "billing/billing-notify/oncall");
    let names: Vec<_> = fragment.receivers.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "billing/billing-notify/msgpipe-unrouted",
            "billing/billing-notify/oncall",
            "billing/billing-notify/team-slack",
            "billing/billing-notify/team-email"
        ]
    );
    assert_eq!(
        fragment.receivers[1].pagerduty_configs[0]["routing_key_file"],
        "/run/secrets/billing-alerting/pagerduty-routing-key"
    );
    assert_eq!(
        fragment.receivers[2].slack_configs[0]["api_url_file"],
        "/run/secrets/billing-alerting/slack-webhook-url"
    );
}

#[test]
fn email_smtp_settings_use_the_alertmanager_config_field_names() {
    let mut p = billing();
    let email = p.spec.alerts.notify[2].email.as_mut().expect("email");
    email.smtp = Some(crate::api::notify::SmtpSettings {
        smarthost: "smtp.example.com:587".into(),
        from: "am@example.com".into(),
        username: Some("am".into()),
        password: Some(crate::api::notify::SecretKeyRef {
            name: "smtp".into(),
            key: "password".into(),
        }),
        require_tls: false,
    });
    let config = plan(&p, None).expect("plans").alertmanager_config;
    let json = serde_json::to_value(config.expect("notify")).expect("json");
    let email = &json["spec"]["receivers"][3]["emailConfigs"][0];
    assert_eq!(email["requireTLS"], false);
    assert_eq!(email["authUsername"], "am");
    assert_eq!(
        email["authPassword"],
        serde_json::json!({"name": "smtp", "key": "password"})
    );
    assert_eq!(email["smarthost"], "smtp.example.com:587");
}
