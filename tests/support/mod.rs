//! Shared test setup: planning manifests, and the real `promtool`.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use msgpipe::api::load::parse_pipelines;
use msgpipe::plan::{DesiredState, PrometheusRule, plan};
use serde_json::{Value, json};

pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Plans the single pipeline in a YAML manifest.
pub fn plan_yaml(yaml: &str) -> DesiredState {
    let pipeline = parse_pipelines(yaml).expect("manifest parses").remove(0);
    plan(&pipeline, None).expect("manifest plans")
}

/// The Prometheus rule file (`groups:`) for some PrometheusRules.
pub fn rule_file(rules: &[&PrometheusRule]) -> Value {
    let groups: Vec<_> = rules.iter().flat_map(|r| r.spec.groups.iter()).collect();
    json!({ "groups": groups })
}

/// Path of promtool, which `make setup` installs (Debian package `prometheus`).
pub fn promtool() -> PathBuf {
    let found = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    found.unwrap_or_else(|| {
        panic!("promtool not found: run `make setup` (apt-get install --no-install-recommends prometheus)")
    })
}

/// Runs promtool in `dir` and returns its output.
pub fn run_promtool(dir: &Path, args: &[&str]) -> Output {
    Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool runs")
}

pub fn output_text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Environment variable: AMQP port of a node of its own that the tests built on this module's
/// functions ([`TestVhost`], [`amqp_uri`], [`test_broker`], [`mgmt`]) use instead of the
/// shared test node (`msgpipe-test` on 5673). The node is named `msgpipe-test-PORT` and runs
/// `MSGPIPE_RABBITMQ`'s version, so a compatibility run leaves the shared node alone:
/// `MSGPIPE_RABBITMQ=3.10 MSGPIPE_TEST_PORT=5709 cargo nextest run --test import`. (Tests
/// that use [`MGMT_URL`] or port 5673 directly still need the shared node.)
pub const PORT_ENV: &str = "MSGPIPE_TEST_PORT";

/// AMQP port of the test broker: 5673 (the shared node) unless [`PORT_ENV`] says otherwise.
pub fn shared_port() -> u16 {
    std::env::var(PORT_ENV)
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(5673)
}

/// Management API of the test broker ([`MGMT_URL`] for the shared node).
pub fn mgmt_url() -> String {
    format!("http://127.0.0.1:{}/api", u32::from(shared_port()) + 10000)
}

/// Starts (or finds running) the test broker of `scripts/test-broker.sh`.
pub fn ensure_test_broker() {
    let port = shared_port();
    let mut script = Command::new(repo_path("scripts/test-broker.sh"));
    script.arg("ensure");
    if port != 5673 {
        script.args([format!("msgpipe-test-{port}"), port.to_string()]);
    }
    let status = script.status().expect("scripts/test-broker.sh runs");
    assert!(
        status.success(),
        "the test broker did not start (scripts/test-broker.sh ensure)"
    );
}

/// Writes a `promtool test rules` file into `dir` (next to the rule files it names) and
/// runs it; fails the test with promtool's output when a case fails.
pub fn promtool_test_rules(dir: &Path, tests: &Value) {
    std::fs::write(dir.join("tests.yaml"), tests.to_string()).expect("write tests");
    let output = run_promtool(dir, &["test", "rules", "tests.yaml"]);
    assert!(
        output.status.success(),
        "promtool test rules failed:\n{}",
        output_text(&output)
    );
}

/// Takes the head of `queue` and rejects it without requeue (the broker dead-letters it).
pub async fn reject_head(channel: &lapin::Channel, queue: &str) {
    let message = channel
        .basic_get(queue.into(), lapin::options::BasicGetOptions::default())
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("a message in {queue}"));
    message
        .delivery
        .acker
        .reject(lapin::options::BasicRejectOptions { requeue: false })
        .await
        .expect("reject");
}

/// Runs `scripts/test-broker.sh COMMAND NAME PORT EXTRA...` for a node of a test's own (fault
/// tests stop and kill their own nodes, never the shared one); `extra_conf` adds
/// rabbitmq.conf lines. True when the script succeeded.
pub fn broker_node(
    command: &str,
    name: &str,
    port: &str,
    extra: &[&str],
    extra_conf: Option<&str>,
) -> bool {
    let mut script = Command::new(repo_path("scripts/test-broker.sh"));
    script.args([command, name, port]).args(extra);
    if let Some(conf) = extra_conf {
        script.env("MSGPIPE_TEST_BROKER_EXTRA_CONF", conf);
    }
    script
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("test-broker.sh runs")
        .success()
}

/// Management API of the test broker.
pub const MGMT_URL: &str = "http://127.0.0.1:15673/api";
/// Prometheus endpoint of the test broker.
pub const PROMETHEUS_PLUGIN_ADDR: &str = "127.0.0.1:15693";

/// Percent-encodes one path segment (vhost or object name).
pub fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One HTTP call with curl; returns (status, body).
pub fn http(method: &str, url: &str, body: Option<&Value>, basic_auth: bool) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-X", method, "-w", "\n%{http_code}", url]);
    if basic_auth {
        cmd.args(["-u", "guest:guest"]);
    }
    if let Some(body) = body {
        cmd.args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            &body.to_string(),
        ]);
    }
    let output = cmd.output().expect("curl runs");
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A management API call that must succeed.
pub fn mgmt(method: &str, path: &str, body: Option<Value>) -> String {
    let (status, text) = http(
        method,
        &format!("{}{path}", mgmt_url()),
        body.as_ref(),
        true,
    );
    assert!(
        (200..300).contains(&status),
        "{method} {path} -> {status}: {text}"
    );
    text
}

/// A vhost of the test broker that exists for one test and is deleted afterwards.
pub struct TestVhost {
    pub name: String,
    /// The management API of the node it lives on.
    pub api: String,
}

impl TestVhost {
    pub fn new(prefix: &str) -> Self {
        ensure_test_broker();
        Self::on(&mgmt_url(), prefix)
    }

    /// A vhost on the node whose management API is `api` (a node of the test's own, see
    /// [`broker_node`]).
    pub fn on(api: &str, prefix: &str) -> Self {
        let name = format!("{prefix}-{}", std::process::id());
        let path = format!("{api}/vhosts/{}", encode(&name));
        let ok = |(status, text): (u16, String)| {
            assert!((200..300).contains(&status), "{path} -> {status}: {text}");
        };
        let _ = http("DELETE", &path, None, true);
        ok(http("PUT", &path, None, true));
        ok(http(
            "PUT",
            &format!("{api}/permissions/{}/guest", encode(&name)),
            Some(&serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"})),
            true,
        ));
        Self {
            name,
            api: api.to_string(),
        }
    }

    pub fn path(&self, kind: &str, object: &str) -> String {
        format!("/{kind}/{}/{}", encode(&self.name), encode(object))
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        let _ = http(
            "DELETE",
            &format!("{}/vhosts/{}", self.api, encode(&self.name)),
            None,
            true,
        );
    }
}

/// AMQP URI of the test broker for `vhost`.
pub fn amqp_uri(vhost: &str) -> String {
    format!(
        "amqp://guest:guest@127.0.0.1:{}/{}",
        shared_port(),
        encode(vhost)
    )
}

/// The library's broker client, pointed at the test broker.
pub fn test_broker(vhost: &str) -> msgpipe::broker::RabbitBroker {
    let endpoint = msgpipe::broker::BrokerEndpoint::new(
        &amqp_uri(vhost),
        Some(&format!(
            "http://127.0.0.1:{}",
            u32::from(shared_port()) + 10000
        )),
        None,
    )
    .expect("test endpoint");
    msgpipe::broker::RabbitBroker::new(endpoint, std::time::Duration::from_secs(15))
        .expect("broker client")
}

/// A plain lapin channel on the test broker's `vhost`, with publisher confirms on.
pub async fn amqp_channel(vhost: &str) -> (lapin::Connection, lapin::Channel) {
    confirm_channel(&amqp_uri(vhost)).await
}

/// A plain lapin channel on the broker at `uri`, with publisher confirms on.
pub async fn confirm_channel(uri: &str) -> (lapin::Connection, lapin::Channel) {
    msgpipe::broker::install_crypto_provider();
    let connection = lapin::Connection::connect(uri, lapin::ConnectionProperties::default())
        .await
        .expect("AMQP connects");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    (connection, channel)
}

/// Publishes one persistent message and waits for the broker's confirm (mandatory: an
/// unroutable message fails the test).
pub async fn publish(channel: &lapin::Channel, exchange: &str, routing_key: &str, body: &[u8]) {
    let properties = lapin::BasicProperties::default().with_delivery_mode(2);
    publish_with(channel, exchange, routing_key, body, properties).await;
}

/// [`publish`] with the caller's properties (message id, headers, ...).
pub async fn publish_with(
    channel: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
) {
    let options = lapin::options::BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            options,
            body,
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(
        confirm.is_ack(),
        "broker nacked the publish to {exchange}/{routing_key}"
    );
    assert!(
        confirm.take_message().is_none(),
        "message to {exchange}/{routing_key} was unroutable"
    );
}

/// Exact ready-message count (passive declare).
pub async fn depth(channel: &lapin::Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("queue exists")
        .message_count()
}

/// Provisions a planned pipeline with the reconciler on the node whose AMQP port is `port`.
pub async fn client_provision(state: &DesiredState, port: u16) {
    use msgpipe::broker::BrokerApi;
    let endpoint = msgpipe::broker::BrokerEndpoint::new(
        &format!(
            "amqp://guest:guest@127.0.0.1:{port}/{}",
            encode(&state.topology.vhost)
        ),
        Some(&format!("http://127.0.0.1:{}", port + 10000)),
        None,
    )
    .expect("endpoint");
    let broker = msgpipe::broker::RabbitBroker::new(endpoint, std::time::Duration::from_secs(15))
        .expect("broker client");
    let live = broker
        .snapshot(&state.topology.vhost)
        .await
        .expect("snapshot");
    msgpipe::broker::reconcile(&broker, state, &live)
        .await
        .expect("reconcile");
    broker.close().await;
}
