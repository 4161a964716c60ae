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
