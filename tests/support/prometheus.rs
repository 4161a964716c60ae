//! A real Prometheus scraping the test broker with a pipeline's rules, and the broker fixture
//! the live alert tests share (included by `#[path]` from alerts_live.rs and notify_live.rs).
#![allow(dead_code)] // each test binary uses a different part of this module

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use msgpipe::plan::DesiredState;
use serde_json::{Value, json};

use crate::support::{PROMETHEUS_PLUGIN_ADDR, TestVhost, http, mgmt};

const PROMETHEUS: &str = "/usr/bin/prometheus";

/// A Prometheus server scraping the test broker every second, with the pipeline's rules.
pub struct LivePrometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl LivePrometheus {
    /// Starts Prometheus scraping `metrics_path` with `params`, loaded with `rules`.
    pub fn start(rules: Value, metrics_path: &str, params: Value) -> Self {
        Self::start_with(rules, metrics_path, params, None, json!({}))
    }

    /// As [`Self::start`]; `alertmanager` (host:port) is where alerts are sent, and
    /// `target_labels` are put on every scraped series (as a ServiceMonitor would).
    pub fn start_with(
        rules: Value,
        metrics_path: &str,
        params: Value,
        alertmanager: Option<&str>,
        target_labels: Value,
    ) -> Self {
        assert!(
            PathBuf::from(PROMETHEUS).exists(),
            "prometheus not found: run `make setup`"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("rules.yaml"), rules.to_string()).expect("rules");
        let mut config = json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.yaml"],
            "scrape_configs": [{
                "job_name": "rabbitmq",
                "metrics_path": metrics_path,
                "params": params,
                "static_configs": [{"targets": [PROMETHEUS_PLUGIN_ADDR], "labels": target_labels}],
            }],
        });
        if let Some(target) = alertmanager {
            config["alerting"] =
                json!({"alertmanagers": [{"static_configs": [{"targets": [target]}]}]});
        }
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

    /// The values of an instant query (empty when it selects nothing or fails).
    pub fn query(&self, promql: &str) -> Vec<f64> {
        let url = format!(
            "{}/api/v1/query?query={}",
            self.url,
            crate::support::encode(promql)
        );
        let (_, body) = http("GET", &url, None, false);
        let parsed: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        parsed["data"]["result"]
            .as_array()
            .map(|results| {
                results
                    .iter()
                    .filter_map(|r| r["value"][1].as_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// State ("pending"/"firing") of `alert` for `queue`, if Prometheus has it.
    pub fn alert_state(&self, alert: &str, queue: &str) -> Option<(String, Value)> {
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

pub fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
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
pub fn declare_dead_letter_path(vhost: &TestVhost, state: &DesiredState) {
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
            crate::support::encode(&vhost.name),
            crate::support::encode(&binding.source),
            crate::support::encode(&binding.destination)
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

pub fn queue_messages(vhost: &TestVhost, queue: &str) -> u64 {
    let body = mgmt("GET", &vhost.path("queues", queue), None);
    serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|q| q["messages"].as_u64())
        .unwrap_or(0)
}
