//! The generated DLQ alert on a real RabbitMQ scraped by a real Prometheus: it fires
//! when rejected messages fill the DLQ and resolves when the DLQ is purged.

#[path = "support/prometheus.rs"]
mod prometheus;
mod support;

use std::time::Duration;

use msgpipe::plan::alerts::alert_name;
use prometheus::{LivePrometheus, declare_dead_letter_path, queue_messages, wait_for};
use serde_json::json;
use support::{TestVhost, mgmt, plan_yaml, rule_file};

fn dlq_alert_fires_and_resolves(flavour: &str) {
    let vhost = TestVhost::new(&format!("alerts-live-{}", flavour.to_lowercase()));
    let state = plan_yaml(&format!(
        r#"
apiVersion: msgpipe.io/v1alpha1
kind: MessagePipeline
metadata: {{ name: notes, namespace: notes-app }}
spec:
  broker: {{ secretRef: {{ name: rabbitmq }}, vhost: "{vhost}" }}
  queue: {{ name: notes_queue, exchange: notes, routingKey: notes }}
  retry: {{ maxAttempts: 1 }}
  deadLetter: {{ exchange: notes_dlq_exchange, queue: notes_queue_dlq }}
  alerts:
    metrics: {flavour}
    labels: {{ team: notes }}
    dlqDepth: {{ threshold: 5, for: 2s, severity: critical }}
"#,
        vhost = vhost.name
    ));
    declare_dead_letter_path(&vhost, &state);
    let (path, params) = match flavour {
        "perObject" => ("/metrics/per-object", json!({})),
        _ => (
            "/metrics/detailed",
            json!({"family": ["queue_coarse_metrics", "queue_consumer_count"], "vhost": [vhost.name]}),
        ),
    };
    let rule = state.prometheus_rule.as_ref().expect("alerts enabled");
    let prometheus = LivePrometheus::start(rule_file(&[rule]), path, params);

    // Eight messages published to the work exchange, then rejected without requeue by a
    // consumer: the queue's dead-letter policy moves them to the DLQ.
    let publish_path = format!("{}/publish", vhost.path("exchanges", "notes"));
    for i in 0..8 {
        let body = mgmt(
            "POST",
            &publish_path,
            Some(
                json!({"properties": {"delivery_mode": 2}, "routing_key": "notes", "payload": format!("note {i}"), "payload_encoding": "string"}),
            ),
        );
        assert!(
            body.contains("\"routed\":true"),
            "publish not routed: {body}"
        );
    }
    let get_path = format!("{}/get", vhost.path("queues", "notes_queue"));
    mgmt(
        "POST",
        &get_path,
        Some(json!({"count": 8, "ackmode": "reject_requeue_false", "encoding": "auto"})),
    );
    wait_for("8 dead letters in the DLQ", Duration::from_secs(30), || {
        queue_messages(&vhost, "notes_queue_dlq") == 8
    });

    wait_for("DLQ alert firing", Duration::from_secs(90), || {
        prometheus
            .alert_state(alert_name::DLQ_DEPTH, "notes_queue_dlq")
            .is_some_and(|(s, _)| s == "firing")
    });
    let (_, alert) = prometheus
        .alert_state(alert_name::DLQ_DEPTH, "notes_queue_dlq")
        .expect("alert");
    assert_eq!(alert["labels"]["vhost"], vhost.name.as_str());
    assert_eq!(alert["labels"]["severity"], "critical");
    assert_eq!(alert["labels"]["team"], "notes");
    assert_eq!(alert["labels"]["msgpipe_pipeline"], "notes");
    assert_eq!(alert["labels"]["namespace"], "notes-app");
    assert_eq!(alert["annotations"]["value"], "8");
    assert_eq!(
        alert["annotations"]["dlq_replay"],
        "msgpipe dlq replay -n notes-app --name notes --all"
    );
    assert_eq!(
        alert["annotations"]["summary"],
        "Dead-letter queue notes_queue_dlq holds 8 messages"
    );

    mgmt(
        "DELETE",
        &format!("{}/contents", vhost.path("queues", "notes_queue_dlq")),
        None,
    );
    wait_for(
        "DLQ alert resolved after purge",
        Duration::from_secs(90),
        || {
            prometheus
                .alert_state(alert_name::DLQ_DEPTH, "notes_queue_dlq")
                .is_none()
        },
    );
}

#[test]
fn per_object_dlq_alert_fires_on_live_prometheus_and_resolves_after_purge() {
    dlq_alert_fires_and_resolves("perObject");
}

#[test]
fn detailed_dlq_alert_fires_on_live_prometheus_and_resolves_after_purge() {
    dlq_alert_fires_and_resolves("detailed");
}

/// A pipeline on its own vhost, provisioned by the reconciler, with the retry-storm alert.
fn storm_pipeline(vhost: &TestVhost, name: &str) -> msgpipe::plan::DesiredState {
    plan_yaml(&format!(
        r#"
apiVersion: msgpipe.io/v1alpha1
kind: MessagePipeline
metadata: {{ name: {name}, namespace: notes-app }}
spec:
  broker: {{ secretRef: {{ name: rabbitmq }}, vhost: "{vhost}" }}
  queue: {{ name: {name}_queue, exchange: {name}, routingKey: {name} }}
  retry: {{ maxAttempts: 3, backoff: {{ initialDelay: 200ms, multiplier: 1, maxDelay: 200ms }} }}
  alerts:
    dlqDepth: {{ threshold: 1000000 }}
    retryStorm: {{ percent: 25, for: 2s }}
"#,
        vhost = vhost.name
    ))
}

/// Runs the msgpipe consumer on `state`'s work queue; `fails(message)` decides which
/// deliveries fail (retryable), while a publisher adds a message every 20 ms.
fn run_traffic(
    runtime: &tokio::runtime::Runtime,
    state: &msgpipe::plan::DesiredState,
    fails: fn(&msgpipe_client::Message) -> bool,
) -> msgpipe_client::ShutdownHandle {
    use msgpipe_client::{Consumer, ConsumerOptions, HandlerError, LiveConfig};
    let vhost = state.topology.vhost.clone();
    runtime.block_on(support::client_provision(state, 5673));
    let consumer = Consumer::new(
        ConsumerOptions::new(support::amqp_uri(&vhost)),
        LiveConfig::fixed(state.client_config.clone()),
    )
    .expect("consumer");
    let stop = consumer.shutdown_handle();
    runtime.spawn(consumer.run(move |message| async move {
        if fails(&message) {
            Err(HandlerError::retryable("downstream unavailable"))
        } else {
            Ok(())
        }
    }));
    let (exchange, key) = (
        state.names.work_exchange.clone(),
        state.names.routing_key.clone(),
    );
    runtime.spawn(async move {
        let (_connection, channel) = support::amqp_channel(&vhost).await;
        for i in 0u32.. {
            support::publish(&channel, &exchange, &key, i.to_string().as_bytes()).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    stop
}

#[test]
fn retry_storm_fires_on_live_counters_when_most_deliveries_fail_and_not_for_a_few_failures() {
    let (storm_vhost, calm_vhost) = (
        TestVhost::new("alerts-live-storm"),
        TestVhost::new("alerts-live-calm"),
    );
    // Declared after the vhosts, so dropped (its tasks cancelled) before they are deleted.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let storm = storm_pipeline(&storm_vhost, "storm");
    let calm = storm_pipeline(&calm_vhost, "calm");
    let rules = [&storm, &calm].map(|s| s.prometheus_rule.as_ref().expect("alerts"));
    let prometheus = LivePrometheus::start(rule_file(&rules), "/metrics/per-object", json!({}));
    // storm: every delivery fails (2 retries per 3 deliveries, 67 %); calm: one message in
    // ten fails once (about 9 %).
    let stop_storm = run_traffic(&runtime, &storm, |_| true);
    let stop_calm = run_traffic(&runtime, &calm, |m| {
        m.attempt() == 1 && m.body().last().is_some_and(|digit| *digit == b'0')
    });

    wait_for("retry storm firing", Duration::from_secs(90), || {
        prometheus
            .alert_state(alert_name::RETRY_STORM, "storm_queue")
            .is_some_and(|(s, _)| s == "firing")
    });
    let (_, alert) = prometheus
        .alert_state(alert_name::RETRY_STORM, "storm_queue")
        .expect("alert");
    assert_eq!(alert["labels"]["vhost"], storm_vhost.name.as_str());
    assert_eq!(alert["labels"]["msgpipe_pipeline"], "storm");
    let share: f64 = alert["value"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("value");
    assert!((0.5..=0.8).contains(&share), "storm share {share}");

    // The calm pipeline has traffic and retries too, below the share: measured, and silent.
    let calm_rule = &rules[1].spec.groups[0].rules;
    let expr = &calm_rule
        .iter()
        .find(|r| r.alert == alert_name::RETRY_STORM)
        .expect("rule")
        .expr;
    let (ratio, _) = expr.rsplit_once(" > ").expect("comparison");
    let calm_share = prometheus.query(ratio);
    assert_eq!(calm_share.len(), 1, "{ratio}: {calm_share:?}");
    assert!(
        calm_share[0] > 0.0 && calm_share[0] < 0.25,
        "calm share {calm_share:?}"
    );
    assert_eq!(
        prometheus.alert_state(alert_name::RETRY_STORM, "calm_queue"),
        None
    );
    eprintln!(
        "retry-tier publishes per work-queue delivery: storm {share:.3}, calm {:.3}",
        calm_share[0]
    );
    stop_storm.shutdown();
    stop_calm.shutdown();
    runtime.shutdown_timeout(Duration::from_secs(5));
}
