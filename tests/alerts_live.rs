//! The generated DLQ alert on a real RabbitMQ scraped by a real Prometheus: it fires
//! when rejected messages fill the DLQ and resolves when the DLQ is purged.

mod support;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use msgpipe::plan::DesiredState;
use msgpipe::plan::alerts::alert_name;
use serde_json::{Value, json};
use support::{PROMETHEUS_PLUGIN_ADDR, TestVhost, http, mgmt, plan_yaml, rule_file};

const PROMETHEUS: &str = "/usr/bin/prometheus";

/// A Prometheus server scraping the test broker every second, with the pipeline's rules.
struct LivePrometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl LivePrometheus {
    fn start(rules: Value, metrics_path: &str, params: Value) -> Self {
        assert!(
            PathBuf::from(PROMETHEUS).exists(),
            "prometheus not found: run `make setup`"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("rules.yaml"), rules.to_string()).expect("rules");
        let config = json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.yaml"],
            "scrape_configs": [{
                "job_name": "rabbitmq",
                "metrics_path": metrics_path,
                "params": params,
                "static_configs": [{"targets": [PROMETHEUS_PLUGIN_ADDR]}],
            }],
        });
        std::fs::write(dir.path().join("prometheus.yml"), config.to_string()).expect("config");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(PROMETHEUS)
            .current_dir(dir.path())
            .args([
                "--config.file=prometheus.yml",
                "--storage.tsdb.path=data",
                &format!("--web.listen-address=127.0.0.1:{port}"),
                "--log.level=warn",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts");
        let prometheus = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        wait_for("Prometheus ready", Duration::from_secs(30), || {
            http("GET", &format!("{}/-/ready", prometheus.url), None, false).0 == 200
        });
        prometheus
    }

    /// State ("pending"/"firing") of `alert` for `queue`, if Prometheus has it.
    fn alert_state(&self, alert: &str, queue: &str) -> Option<(String, Value)> {
        let (_, body) = http("GET", &format!("{}/api/v1/alerts", self.url), None, false);
        let parsed: Value = serde_json::from_str(&body).ok()?;
        parsed["data"]["alerts"].as_array()?.iter().find_map(|a| {
            (a["labels"]["alertname"] == alert && a["labels"]["queue"] == queue).then(|| {
                (
                    a["state"].as_str().unwrap_or_default().to_string(),
                    a.clone(),
                )
            })
        })
    }
}

impl Drop for LivePrometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Test fixture: declares the planned work queue, DLX and DLQ with their policies over the
/// management API (the broker reconciler is not used, so this test depends on alerts only).
fn declare_dead_letter_path(vhost: &TestVhost, state: &DesiredState) {
    let topo = &state.topology;
    for exchange in &topo.exchanges {
        mgmt(
            "PUT",
            &vhost.path("exchanges", &exchange.name),
            Some(json!({"type": exchange.kind.as_str(), "durable": true})),
        );
    }
    for queue in &topo.queues {
        let args = json!({"x-queue-type": queue.queue_type.as_str()});
        mgmt(
            "PUT",
            &vhost.path("queues", &queue.name),
            Some(json!({"durable": true, "arguments": args})),
        );
    }
    for binding in &topo.bindings {
        let path = format!(
            "/bindings/{}/e/{}/q/{}",
            support::encode(&vhost.name),
            support::encode(&binding.source),
            support::encode(&binding.destination)
        );
        mgmt(
            "POST",
            &path,
            Some(json!({"routing_key": binding.routing_key})),
        );
    }
    for policy in &topo.policies {
        let mut definition = serde_json::to_value(&policy.definition).expect("definition");
        // RabbitMQ 3.x has no -1 ("unlimited") delivery limit; absent means unlimited there.
        if definition["delivery-limit"].as_i64().is_some_and(|l| l < 0) {
            definition
                .as_object_mut()
                .map(|d| d.remove("delivery-limit"));
        }
        mgmt(
            "PUT",
            &vhost.path("policies", &policy.name),
            Some(
                json!({"pattern": policy.pattern, "apply-to": policy.apply_to, "priority": policy.priority, "definition": definition}),
            ),
        );
    }
}

fn queue_messages(vhost: &TestVhost, queue: &str) -> u64 {
    let body = mgmt("GET", &vhost.path("queues", queue), None);
    serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|q| q["messages"].as_u64())
        .unwrap_or(0)
}

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
