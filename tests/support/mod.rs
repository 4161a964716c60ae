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

/// Starts (or finds running) the test broker of `scripts/test-broker.sh`.
pub fn ensure_test_broker() {
    let status = Command::new(repo_path("scripts/test-broker.sh"))
        .arg("ensure")
        .status()
        .expect("scripts/test-broker.sh runs");
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
    let (status, text) = http(method, &format!("{MGMT_URL}{path}"), body.as_ref(), true);
    assert!(
        (200..300).contains(&status),
        "{method} {path} -> {status}: {text}"
    );
    text
}

/// A vhost of the test broker that exists for one test and is deleted afterwards.
pub struct TestVhost {
    pub name: String,
}

impl TestVhost {
    pub fn new(prefix: &str) -> Self {
        ensure_test_broker();
        let name = format!("{prefix}-{}", std::process::id());
        let path = format!("/vhosts/{}", encode(&name));
        let _ = http("DELETE", &format!("{MGMT_URL}{path}"), None, true);
        mgmt("PUT", &path, None);
        mgmt(
            "PUT",
            &format!("/permissions/{}/guest", encode(&name)),
            Some(serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"})),
        );
        Self { name }
    }

    pub fn path(&self, kind: &str, object: &str) -> String {
        format!("/{kind}/{}/{}", encode(&self.name), encode(object))
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        let _ = http(
            "DELETE",
            &format!("{MGMT_URL}/vhosts/{}", encode(&self.name)),
            None,
            true,
        );
    }
}

/// AMQP URI of the test broker for `vhost`.
pub fn amqp_uri(vhost: &str) -> String {
    format!("amqp://guest:guest@127.0.0.1:5673/{}", encode(vhost))
}

/// The library's broker client, pointed at the test broker.
pub fn test_broker(vhost: &str) -> msgpipe::broker::RabbitBroker {
    let endpoint = msgpipe::broker::BrokerEndpoint::new(
        &amqp_uri(vhost),
        Some("http://127.0.0.1:15673"),
        None,
    )
    .expect("test endpoint");
    msgpipe::broker::RabbitBroker::new(endpoint, std::time::Duration::from_secs(15))
        .expect("broker client")
}

/// A plain lapin channel on the test broker's `vhost`, with publisher confirms on.
pub async fn amqp_channel(vhost: &str) -> (lapin::Connection, lapin::Channel) {
    msgpipe::broker::install_crypto_provider();
    let connection =
        lapin::Connection::connect(&amqp_uri(vhost), lapin::ConnectionProperties::default())
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

// ---- msgpipe-client tests (tests/client_*.rs) -----------------------------------------------

/// The notes pipeline on `vhost` of the broker at `port` (5673: the shared test node), with the
/// seed article's names and `retry` YAML (flow style, e.g. `{ maxAttempts: 5, ... }`).
pub fn client_notes_state(vhost: &str, retry: &str) -> DesiredState {
    plan_yaml(&format!(
        "apiVersion: msgpipe.io/v1alpha1\nkind: MessagePipeline\nmetadata: {{ name: notes, namespace: notes-app }}\nspec:\n  broker: {{ secretRef: {{ name: rabbitmq }}, vhost: \"{vhost}\" }}\n  queue: {{ name: notes_queue, exchange: notes, routingKey: notes }}\n  deadLetter: {{ exchange: notes_dlq_exchange, queue: notes_queue_dlq }}\n  retry: {retry}\n  clientFlags: {{ retryPending: true, retryIntervalSeconds: 1 }}\n"
    ))
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

/// Writes `pipeline.json` for `state` into `dir` and returns its path.
pub fn client_write_config(dir: &Path, config: &msgpipe_client::PipelineConfig) -> PathBuf {
    let path = dir.join("pipeline.json");
    let text = serde_json::to_string_pretty(config).expect("json");
    std::fs::write(&path, text).expect("write pipeline.json");
    path
}

/// Publishes `ids` (message id = body) to `exchange`/`routing_key`, pipelined in batches, every
/// confirm checked.
pub async fn client_publish_ids(
    channel: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    ids: &[String],
) {
    for chunk in ids.chunks(500) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for id in chunk {
            let properties = lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(id.as_str().into());
            let options = lapin::options::BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            };
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    options,
                    id.as_bytes(),
                    properties,
                )
                .await
                .expect("publish");
            confirms.push(confirm);
        }
        for confirm in confirms {
            let confirmation = confirm.await.expect("confirm");
            assert!(confirmation.is_ack() && confirmation.take_message().is_none());
        }
    }
}

/// Takes (and acks) every message of `queue` with basic.get; returns them in queue order.
pub async fn client_drain(
    channel: &lapin::Channel,
    queue: &str,
) -> Vec<lapin::message::BasicGetMessage> {
    let mut out = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), lapin::options::BasicGetOptions::default())
        .await
        .expect("basic.get")
    {
        message
            .delivery
            .acker
            .ack(lapin::options::BasicAckOptions::default())
            .await
            .expect("ack");
        out.push(message);
    }
    out
}

/// The message id of a delivery ("" when none).
pub fn client_message_id(properties: &lapin::BasicProperties) -> String {
    properties
        .message_id()
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default()
}

/// Re-runs this test binary as a child process running only the (ignored) test `name`; the
/// child tells it is the child by `envs`.
pub fn client_spawn_child(name: &str, envs: &[(&str, String)]) -> std::process::Child {
    let exe = std::env::current_exe().expect("test binary path");
    let mut command = Command::new(exe);
    command.args([
        "--exact",
        name,
        "--nocapture",
        "--ignored",
        "--test-threads",
        "1",
    ]);
    for (key, value) in envs {
        command.env(key, value);
    }
    command.spawn().expect("child test process starts")
}

/// An append-only file of ids, each line on disk (fsync) before `record` returns. Concurrent
/// records share one write and one fsync (group commit).
#[derive(Clone)]
pub struct ClientIdLog {
    sender: tokio::sync::mpsc::UnboundedSender<(String, tokio::sync::oneshot::Sender<()>)>,
}

impl ClientIdLog {
    pub fn open(path: &Path) -> Self {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open id log");
        let (sender, mut receiver) =
            tokio::sync::mpsc::unbounded_channel::<(String, tokio::sync::oneshot::Sender<()>)>();
        std::thread::spawn(move || {
            while let Some(first) = receiver.blocking_recv() {
                let mut batch = vec![first];
                while let Ok(more) = receiver.try_recv() {
                    batch.push(more);
                }
                let text: String = batch.iter().map(|(id, _)| format!("{id}\n")).collect();
                file.write_all(text.as_bytes()).expect("append id log");
                file.sync_data().expect("fsync id log");
                for (_, done) in batch {
                    let _ = done.send(());
                }
            }
        });
        Self { sender }
    }

    pub async fn record(&self, id: String) {
        let (done, written) = tokio::sync::oneshot::channel();
        self.sender.send((id, done)).expect("id log writer alive");
        written.await.expect("id log written");
    }

    /// Every id in the file (one per line; a torn last line is ignored).
    pub fn read(path: &Path) -> Vec<String> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        complete.lines().map(str::to_string).collect()
    }
}

/// A TCP proxy to a broker that can refuse new connections and cut open ones: a broker outage
/// without stopping the shared node. Starts down.
pub struct ClientProxy {
    pub port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl ClientProxy {
    pub fn start(target: &'static str) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>> =
            std::sync::Arc::default();
        let (up2, open2) = (up.clone(), open.clone());
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { continue };
                if !up2.load(std::sync::atomic::Ordering::SeqCst) {
                    let _ = inbound.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(outbound) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                let mut streams = open2.lock().expect("lock");
                for stream in [&inbound, &outbound] {
                    streams.push(stream.try_clone().expect("clone"));
                }
                client_pipe(&inbound, &outbound);
                client_pipe(&outbound, &inbound);
            }
        });
        Self { port, up, open }
    }

    /// Up: new connections are forwarded. Down: refused, and the open ones are cut.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            for stream in self.open.lock().expect("lock").drain(..) {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

fn client_pipe(from: &std::net::TcpStream, to: &std::net::TcpStream) {
    let (mut from, mut to) = (
        from.try_clone().expect("clone"),
        to.try_clone().expect("clone"),
    );
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = from.shutdown(std::net::Shutdown::Both);
    });
}
