//! Test support of the msgpipe-client crate: a RabbitMQ node (scripts/test-broker.sh), a vhost
//! per test, the notes pipeline's topology declared the way the operator declares it (policies
//! over HTTP, objects over AMQP), and helpers for child processes and broker outages. It does
//! not use the operator crate: the client shares only the `pipeline.json` contract with it.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::path::{Path, PathBuf};
use std::process::Command;

use msgpipe_client::PipelineConfig;
use msgpipe_client::config::{DeadLetterTopology, Features, RetryTierConfig, RetryTopology};
use serde_json::{Value, json};

pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative)
}

/// rustls needs one process-wide crypto provider before the first connection.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Environment variable: AMQP port of the node the tests use instead of the shared test node
/// (`msgpipe-test` on 5673). The node is named `msgpipe-client-PORT` and started at
/// `MSGPIPE_RABBITMQ`'s version, e.g. to try the suite on 3.10 without touching the shared node:
/// `MSGPIPE_RABBITMQ=3.10 MSGPIPE_CLIENT_TEST_PORT=5691 cargo nextest run -p msgpipe-client`.
pub const PORT_ENV: &str = "MSGPIPE_CLIENT_TEST_PORT";

/// AMQP port of the test broker (5673, the shared node, unless [`PORT_ENV`] says otherwise).
pub fn shared_port() -> u16 {
    std::env::var(PORT_ENV)
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(5673)
}

/// Management API of the test broker.
pub fn mgmt_url() -> String {
    format!("http://127.0.0.1:{}/api", u32::from(shared_port()) + 10000)
}

/// Starts (or finds running) the test broker of `scripts/test-broker.sh`.
pub fn ensure_test_broker() {
    let port = shared_port();
    let mut script = Command::new(repo_path("scripts/test-broker.sh"));
    script.arg("ensure");
    if port != 5673 {
        script.args([format!("msgpipe-client-{port}"), port.to_string()]);
    }
    let status = script.status().expect("scripts/test-broker.sh runs");
    assert!(
        status.success(),
        "the test broker did not start (scripts/test-broker.sh ensure)"
    );
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
}

impl TestVhost {
    pub fn new(prefix: &str) -> Self {
        ensure_test_broker();
        let name = format!("{prefix}-{}", std::process::id());
        let path = format!("/vhosts/{}", encode(&name));
        let _ = http("DELETE", &format!("{}{path}", mgmt_url()), None, true);
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
            &format!("{}/vhosts/{}", mgmt_url(), encode(&self.name)),
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

/// A plain lapin channel on the test broker's `vhost`, with publisher confirms on.
pub async fn amqp_channel(vhost: &str) -> (lapin::Connection, lapin::Channel) {
    install_crypto_provider();
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

/// Writes `config` as `pipeline.json` into `dir` and returns its path.
pub fn write_config(dir: &Path, config: &msgpipe_client::PipelineConfig) -> PathBuf {
    let path = dir.join("pipeline.json");
    let text = serde_json::to_string_pretty(config).expect("json");
    std::fs::write(&path, text).expect("write pipeline.json");
    path
}

/// Publishes `ids` (message id = body) to `exchange`/`routing_key`, pipelined in batches, every
/// confirm checked.
pub async fn publish_ids(
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
pub async fn drain(channel: &lapin::Channel, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
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
pub fn message_id(properties: &lapin::BasicProperties) -> String {
    properties
        .message_id()
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default()
}

/// Re-runs this test binary as a child process running only the (ignored) test `name`; the
/// child tells it is the child by `envs`.
pub fn spawn_child(name: &str, envs: &[(&str, String)]) -> std::process::Child {
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
pub struct IdLog {
    sender: tokio::sync::mpsc::UnboundedSender<(String, tokio::sync::oneshot::Sender<()>)>,
}

impl IdLog {
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
pub struct Proxy {
    pub port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    pub fn start(target: String) -> Self {
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
                let Ok(outbound) = std::net::TcpStream::connect(target.as_str()) else {
                    continue;
                };
                let mut streams = open2.lock().expect("lock");
                for stream in [&inbound, &outbound] {
                    streams.push(stream.try_clone().expect("clone"));
                }
                pipe(&inbound, &outbound);
                pipe(&outbound, &inbound);
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

fn pipe(from: &std::net::TcpStream, to: &std::net::TcpStream) {
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

// ---- the notes pipeline, provisioned as the operator would ---------------------------------

/// The `retry` block of a pipeline spec: attempt k waits `min(initial * 2^(k-1), max)`.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    pub max_attempts: u32,
    pub initial_ms: u64,
    pub max_ms: u64,
}

impl Retry {
    /// `maxAttempts: n` with the operator's default backoff (1 s doubling to 1 min).
    pub const fn attempts(max_attempts: u32) -> Self {
        Self {
            max_attempts,
            initial_ms: 1_000,
            max_ms: 60_000,
        }
    }
}

/// The notes pipeline of the seed article on `vhost` (`pipeline.json` as the operator would
/// write it): exchange `notes`, queue `notes_queue`, one retry tier per distinct delay, DLX
/// `notes_dlq_exchange`, DLQ `notes_queue_dlq`; resend interval 1 s.
pub fn notes_pipeline(vhost: &str, retry: Retry) -> PipelineConfig {
    let mut tiers: Vec<RetryTierConfig> = Vec::new();
    for attempt in 1..retry.max_attempts {
        let delay = retry
            .initial_ms
            .saturating_mul(1 << (attempt - 1).min(40))
            .min(retry.max_ms);
        match tiers.last_mut() {
            Some(last) if last.delay_ms == delay => last.last_attempt = attempt,
            _ => {
                let index = u32::try_from(tiers.len() + 1).expect("tier count");
                tiers.push(RetryTierConfig {
                    index,
                    routing_key: index.to_string(),
                    queue: format!("notes_queue.retry.{index}"),
                    delay_ms: delay,
                    first_attempt: attempt,
                    last_attempt: attempt,
                });
            }
        }
    }
    PipelineConfig {
        version: msgpipe_client::config::CONFIG_VERSION,
        pipeline: "notes-app/notes".into(),
        vhost: vhost.into(),
        exchange: "notes".into(),
        routing_key: "notes".into(),
        queue: "notes_queue".into(),
        max_attempts: retry.max_attempts,
        retry: RetryTopology {
            exchange: "notes_queue.retry".into(),
            tiers,
        },
        dead_letter: DeadLetterTopology {
            exchange: "notes_dlq_exchange".into(),
            queue: "notes_queue_dlq".into(),
        },
        features: Features {
            retry_pending: true,
            retry_interval_seconds: 1,
        },
    }
}

/// Major version of the broker whose management API is at `mgmt` (`http://host:port/api`).
pub fn server_major(mgmt: &str) -> u32 {
    let (status, body) = http("GET", &format!("{mgmt}/overview"), None, true);
    assert_eq!(status, 200, "GET /api/overview: {body}");
    let overview: Value = serde_json::from_str(&body).expect("overview JSON");
    overview["rabbitmq_version"]
        .as_str()
        .and_then(|v| v.split('.').next())
        .and_then(|major| major.parse().ok())
        .expect("rabbitmq_version")
}

/// The operator's policy for one quorum queue: dead-lettering at least once (which needs
/// `overflow: reject-publish`) plus `settings`; `delivery-limit: -1` (unlimited) only on 4.x,
/// where 3.x has no limit by default and refuses a negative one.
fn queue_policy(major: u32, settings: Value, dead_letters: bool, delivery_limit: i64) -> Value {
    let mut definition = settings;
    definition["overflow"] = json!("reject-publish");
    if dead_letters {
        definition["dead-letter-strategy"] = json!("at-least-once");
    }
    if delivery_limit >= 0 || major >= 4 {
        definition["delivery-limit"] = json!(delivery_limit);
    }
    definition
}

/// Declares `config`'s topology on the node whose AMQP port is `port` (management on
/// `port + 10000`) the way the operator does: one policy per queue first (priority 10, anchored
/// pattern), then durable exchanges, quorum queues (only the type is a declare argument) and
/// bindings. The work queue's delivery limit is `max_attempts`.
pub async fn provision(config: &PipelineConfig, port: u16) {
    let mgmt = format!("http://127.0.0.1:{}/api", port + 10000);
    let major = server_major(&mgmt);
    let mut policies = vec![(
        config.queue.clone(),
        queue_policy(
            major,
            json!({"dead-letter-exchange": config.dead_letter.exchange}),
            true,
            i64::from(config.max_attempts),
        ),
    )];
    policies.push((
        config.dead_letter.queue.clone(),
        queue_policy(major, json!({}), false, -1),
    ));
    for tier in &config.retry.tiers {
        let settings = json!({
            "dead-letter-exchange": "",
            "dead-letter-routing-key": config.queue,
            "message-ttl": tier.delay_ms,
        });
        policies.push((tier.queue.clone(), queue_policy(major, settings, true, -1)));
    }
    for (queue, definition) in policies {
        let name = format!("msgpipe.{queue}");
        let body = json!({
            "pattern": format!("^{}$", regex_escape(&queue)),
            "apply-to": "queues",
            "priority": 10,
            "definition": definition,
        });
        let url = format!(
            "{mgmt}/policies/{}/{}",
            encode(&config.vhost),
            encode(&name)
        );
        let (status, text) = http("PUT", &url, Some(&body), true);
        assert!(
            (200..300).contains(&status),
            "PUT policy {name}: {status} {text}"
        );
    }

    install_crypto_provider();
    let uri = format!(
        "amqp://guest:guest@127.0.0.1:{port}/{}",
        encode(&config.vhost)
    );
    let connection = lapin::Connection::connect(&uri, lapin::ConnectionProperties::default())
        .await
        .expect("AMQP connects");
    let channel = connection.create_channel().await.expect("channel");
    let durable = lapin::options::ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for (exchange, kind) in [
        (&config.exchange, lapin::ExchangeKind::Direct),
        (&config.dead_letter.exchange, lapin::ExchangeKind::Fanout),
        (&config.retry.exchange, lapin::ExchangeKind::Direct),
    ] {
        channel
            .exchange_declare(exchange.as_str().into(), kind, durable, Default::default())
            .await
            .expect("declare exchange");
    }
    let mut quorum = lapin::types::FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    let queues = [&config.queue, &config.dead_letter.queue]
        .into_iter()
        .chain(config.retry.tiers.iter().map(|t| &t.queue));
    for queue in queues {
        let options = lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare(queue.as_str().into(), options, quorum.clone())
            .await
            .expect("declare queue");
    }
    let mut bindings = vec![
        (&config.queue, &config.exchange, config.routing_key.clone()),
        (
            &config.dead_letter.queue,
            &config.dead_letter.exchange,
            String::new(),
        ),
    ];
    for tier in &config.retry.tiers {
        bindings.push((
            &tier.queue,
            &config.retry.exchange,
            tier.routing_key.clone(),
        ));
    }
    for (queue, exchange, key) in bindings {
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                key.as_str().into(),
                Default::default(),
                Default::default(),
            )
            .await
            .expect("bind");
    }
    let _ = connection.close(200, "provisioned".into()).await;
}

/// Escapes PCRE metacharacters so a queue name matches itself literally.
fn regex_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if "\\.^$|?*+()[]{}/-".contains(c) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// CPU time (user + system) this process has used so far, from `/proc/self/stat`.
pub fn process_cpu_time() -> std::time::Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("stat format") + 2..]
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of stat(5), i.e. 11 and 12 after the state field.
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    let hz = clock_ticks_per_second();
    std::time::Duration::from_millis(ticks * 1000 / hz)
}

fn clock_ticks_per_second() -> u64 {
    let output = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf runs");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or(100)
}
