//! TLS to the broker: `msgpipe apply` over amqps:// and https:// with a CA given as a file or
//! in the broker Secret, a clear certificate error without it, plain amqp:// beside it, and
//! proof that amqps:// really negotiates TLS (never a silent fall-back to plain text).
//!
//! Runs on a node of its own (scripts/test-broker.sh `msgpipe-tls`, AMQP 5674, management
//! 15674) with TLS listeners on 5684 (AMQP) and 15684 (management), using a CA and server
//! certificate for 127.0.0.1/localhost made here with `openssl`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use msgpipe::broker::{BrokerApi, BrokerEndpoint, RabbitBroker};
use serde_json::Value;
use support::{encode, http};

const NODE: &str = "msgpipe-tls";
const PORT: &str = "5674";
const MGMT: &str = "http://127.0.0.1:15674";
const TLS_PORT: u16 = 5684;
const TLS_MGMT: &str = "https://127.0.0.1:15684";
const USER: &str = "tls-operator";
const SECRET: &str = "Tls-Secret-5c07";

/// The node's certificate directory: the CA (`ca.crt`) clients must trust.
struct TlsNode {
    certs: PathBuf,
}

impl TlsNode {
    fn ca_file(&self) -> PathBuf {
        self.certs.join("ca.crt")
    }

    fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.ca_file()).expect("ca.crt")
    }
}

fn script(args: &[&str]) -> bool {
    let conf = tls_conf(&certs_dir());
    support::broker_node(args[0], NODE, PORT, &args[1..], Some(&conf))
}

/// Inside the node's data directory, which test-broker.sh hands to the rabbitmq user on a
/// fresh start, so the node (which drops root) can read the key.
fn certs_dir() -> PathBuf {
    let base = std::env::var("MSGPIPE_TEST_BROKER_DIR").unwrap_or_else(|_| "/tmp".into());
    Path::new(&base).join(NODE).join("certs")
}

fn tls_conf(certs: &Path) -> String {
    let file = |name: &str| certs.join(name).display().to_string();
    let (ca, cert, key) = (file("ca.crt"), file("server.crt"), file("server.key"));
    format!(
        "listeners.ssl.default = 127.0.0.1:{TLS_PORT}
ssl_options.cacertfile = {ca}
ssl_options.certfile = {cert}
ssl_options.keyfile = {key}
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
management.ssl.ip = 127.0.0.1
management.ssl.port = 15684
management.ssl.cacertfile = {ca}
management.ssl.certfile = {cert}
management.ssl.keyfile = {key}"
    )
}

/// Starts the TLS node once per test run (certificates are made on first use and kept with
/// the node, so a node left running from an earlier run still matches them).
fn tls_node() -> &'static TlsNode {
    static NODE_READY: OnceLock<TlsNode> = OnceLock::new();
    NODE_READY.get_or_init(|| {
        let certs = certs_dir();
        if !certs.join("server.crt").exists() {
            script(&["stop"]);
            make_certificates(&certs);
        }
        assert!(script(&["ensure"]), "the TLS node starts");
        // A node left running without the TLS listeners (started with other settings) is
        // restarted with them.
        if !tls_listener_up() {
            script(&["stop"]);
            assert!(script(&["ensure"]), "the TLS node restarts");
            assert!(
                tls_listener_up(),
                "the TLS node has no TLS listener on {TLS_PORT}"
            );
        }
        script(&["ctl", "add_user", USER, SECRET]);
        script(&["ctl", "set_user_tags", USER, "administrator"]);
        TlsNode { certs }
    })
}

fn tls_listener_up() -> bool {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], TLS_PORT));
    std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2)).is_ok()
}

fn openssl(dir: &Path, command: &str) {
    let args: Vec<&str> = command.split_whitespace().collect();
    let output = Command::new("openssl")
        .args(&args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (Debian package openssl)");
    assert!(
        output.status.success(),
        "openssl {command}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A self-signed CA, and a server certificate it signs for 127.0.0.1 and localhost.
fn make_certificates(certs: &Path) {
    std::fs::create_dir_all(certs).expect("certs dir");
    openssl(
        certs,
        "req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout ca.key -out ca.crt \
         -subj /CN=msgpipe-test-CA -addext basicConstraints=critical,CA:TRUE \
         -addext keyUsage=critical,keyCertSign,cRLSign",
    );
    openssl(
        certs,
        "req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost",
    );
    let extensions = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n";
    std::fs::write(certs.join("server.ext"), extensions).expect("write server.ext");
    openssl(
        certs,
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
         -extfile server.ext -out server.crt",
    );
}

/// A fresh vhost on the TLS node that USER may use; made over the plain management port.
fn fresh_vhost(name: &str) -> String {
    tls_node();
    let vhost = format!("{name}-{}", std::process::id());
    let path = format!("{MGMT}/api/vhosts/{}", encode(&vhost));
    http("DELETE", &path, None, true);
    let (status, body) = http("PUT", &path, None, true);
    assert!(
        (200..300).contains(&status),
        "create vhost: {status} {body}"
    );
    let everything = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
    let permissions = format!("{MGMT}/api/permissions/{}/{USER}", encode(&vhost));
    let (status, body) = http("PUT", &permissions, Some(&everything), true);
    assert!((200..300).contains(&status), "permissions: {status} {body}");
    vhost
}

/// A directory holding one notes-like pipeline manifest.
fn pipeline_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = "apiVersion: msgpipe.io/v1alpha1\nkind: MessagePipeline\nmetadata: { name: notes, namespace: tls }\nspec:\n  broker: { secretRef: { name: rabbitmq } }\n  queue: { name: notes_queue, exchange: notes, routingKey: notes }\n  retry: { maxAttempts: 3 }\n";
    std::fs::write(dir.path().join("notes.yaml"), manifest).expect("write manifest");
    dir
}

fn amqps_uri(vhost: &str) -> String {
    format!(
        "amqps://{USER}:{SECRET}@127.0.0.1:{TLS_PORT}/{}",
        encode(vhost)
    )
}

fn msgpipe_apply(dir: &Path, broker_args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_msgpipe"))
        .args([
            "apply",
            "-f",
            dir.to_str().expect("utf-8"),
            "--timeout",
            "10",
        ])
        .args(broker_args)
        .output()
        .expect("msgpipe runs")
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn assert_no_password(output: &Output) {
    let (out, err) = text(output);
    assert!(
        !out.contains(SECRET) && !err.contains(SECRET),
        "password leaked:\n{out}\n{err}"
    );
}

fn queue_names(vhost: &str) -> Vec<String> {
    let url = format!("{MGMT}/api/queues/{}", encode(vhost));
    let (status, body) = http("GET", &url, None, true);
    assert_eq!(status, 200, "{body}");
    let queues: Vec<Value> = serde_json::from_str(&body).expect("json");
    let mut names: Vec<String> = queues
        .iter()
        .filter_map(|q| q["name"].as_str().map(str::to_string))
        .collect();
    names.sort();
    names
}

fn assert_notes_created(vhost: &str, output: &Output) {
    let (out, err) = text(output);
    assert!(output.status.success(), "apply failed:\n{out}\n{err}");
    assert!(out.contains("created queue notes_queue"), "{out}");
    assert_eq!(
        queue_names(vhost),
        [
            "notes_queue",
            "notes_queue.dlq",
            "notes_queue.retry.1.1s",
            "notes_queue.retry.2.2s"
        ]
    );
    assert_no_password(output);
}

#[test]
fn apply_over_amqps_and_https_with_a_ca_file_creates_every_object() {
    let node = tls_node();
    let vhost = fresh_vhost("tls-ca-file");
    let dir = pipeline_dir();
    let ca = node.ca_file();
    let output = msgpipe_apply(
        dir.path(),
        &[
            "--broker",
            &amqps_uri(&vhost),
            "--management-uri",
            TLS_MGMT,
            "--ca-file",
            ca.to_str().expect("utf-8"),
        ],
    );
    assert_notes_created(&vhost, &output);
}

#[test]
fn apply_with_a_broker_secret_holding_ca_crt_creates_every_object() {
    let node = tls_node();
    let vhost = fresh_vhost("tls-secret");
    let dir = pipeline_dir();
    let ca_indented: String = node
        .ca_pem()
        .lines()
        .map(|line| format!("    {line}\n"))
        .collect();
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{ name: rabbitmq-admin }}\ntype: Opaque\nstringData:\n  uri: \"{}\"\n  managementUri: \"{TLS_MGMT}\"\n  ca.crt: |\n{ca_indented}",
        amqps_uri(&vhost)
    );
    let secret_dir = tempfile::tempdir().expect("tempdir");
    let secret_file = secret_dir.path().join("rabbitmq-admin.yaml");
    std::fs::write(&secret_file, secret).expect("write secret");
    let output = msgpipe_apply(
        dir.path(),
        &["--broker-secret-file", secret_file.to_str().expect("utf-8")],
    );
    assert_notes_created(&vhost, &output);
}

#[test]
fn without_the_ca_apply_fails_with_a_certificate_error_and_no_password() {
    tls_node();
    let vhost = fresh_vhost("tls-untrusted");
    let dir = pipeline_dir();
    // Both over TLS: the management API is read first, so reqwest meets the certificate.
    // amqps with plain-HTTP management: the snapshot works, and lapin meets the certificate.
    for management in [TLS_MGMT, MGMT] {
        let output = msgpipe_apply(
            dir.path(),
            &[
                "--broker",
                &amqps_uri(&vhost),
                "--management-uri",
                management,
            ],
        );
        let (out, err) = text(&output);
        assert!(
            !output.status.success(),
            "an untrusted certificate was accepted ({management}):\n{out}"
        );
        assert!(
            err.to_lowercase().contains("certificate"),
            "not a clear certificate error ({management}): {err}"
        );
        assert_eq!(err.lines().count(), 1, "one-line error: {err}");
        assert_no_password(&output);
    }
    assert_eq!(queue_names(&vhost), Vec::<String>::new());
}

#[test]
fn plain_amqp_still_works_beside_tls() {
    tls_node();
    let vhost = fresh_vhost("tls-plain");
    let dir = pipeline_dir();
    let uri = format!("amqp://{USER}:{SECRET}@127.0.0.1:{PORT}/{}", encode(&vhost));
    let output = msgpipe_apply(dir.path(), &["--broker", &uri, "--management-uri", MGMT]);
    assert_notes_created(&vhost, &output);
}

/// The broker's own view of msgpipe's AMQP connections on `vhost`: (ssl, port) of each.
fn broker_side_connections(vhost: &str) -> Vec<(bool, u64)> {
    let url = format!("{MGMT}/api/vhosts/{}/connections", encode(vhost));
    let (status, body) = http("GET", &url, None, true);
    assert_eq!(status, 200, "{body}");
    let connections: Vec<Value> = serde_json::from_str(&body).expect("json");
    connections
        .iter()
        .filter(|c| c["client_properties"]["connection_name"] == "msgpipe")
        .map(|c| (c["ssl"] == true, c["port"].as_u64().unwrap_or(0)))
        .collect()
}

/// Opens msgpipe's AMQP connection to `uri` (a passive declare needs one).
async fn connect_amqp(uri: &str, ca: Option<String>) -> Result<(), String> {
    let endpoint = BrokerEndpoint::new(uri, Some(MGMT), ca).expect("endpoint");
    let vhost = endpoint.uri_vhost();
    let broker = RabbitBroker::new(endpoint, Duration::from_secs(10)).expect("client");
    let result = broker.queue_depth(&vhost, "absent").await;
    broker.close().await;
    result.map(|_| ()).map_err(|e| e.to_string())
}

#[tokio::test]
async fn amqps_really_negotiates_tls_and_never_falls_back_to_plain_text() {
    let node = tls_node();
    let vhost = fresh_vhost("tls-proof");
    let plain_port = format!("amqp://{USER}:{SECRET}@127.0.0.1:{PORT}/{}", encode(&vhost));
    let tls_port_plain = format!(
        "amqp://{USER}:{SECRET}@127.0.0.1:{TLS_PORT}/{}",
        encode(&vhost)
    );
    let amqps_to_plain_port = format!(
        "amqps://{USER}:{SECRET}@127.0.0.1:{PORT}/{}",
        encode(&vhost)
    );

    // The TLS port speaks only TLS, and amqps:// only TLS: a client that silently spoke plain
    // AMQP over amqps:// would get through to the plain port.
    // (The TLS listener answers plain AMQP with a TLS alert or a reset, so no hint is certain.)
    connect_amqp(&tls_port_plain, None)
        .await
        .expect_err("the TLS port accepted plain AMQP");
    let refused = connect_amqp(&amqps_to_plain_port, Some(node.ca_pem()))
        .await
        .expect_err("amqps:// connected to a plain-text port");
    assert!(refused.contains("plain-text listener"), "{refused}");
    connect_amqp(&plain_port, None)
        .await
        .expect("plain AMQP works");

    // And the broker sees the amqps:// connection as TLS, on the TLS port.
    let endpoint =
        BrokerEndpoint::new(&amqps_uri(&vhost), Some(MGMT), Some(node.ca_pem())).expect("endpoint");
    let broker = RabbitBroker::new(endpoint, Duration::from_secs(10)).expect("client");
    broker
        .queue_depth(&vhost, "absent")
        .await
        .expect("amqps with the CA works");
    let start = Instant::now();
    let mut seen = broker_side_connections(&vhost);
    while seen.is_empty() && start.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        seen = broker_side_connections(&vhost);
    }
    broker.close().await;
    assert_eq!(seen, [(true, u64::from(TLS_PORT))]);
}
