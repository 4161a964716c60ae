//! amqps:// with the client-side CA file: a publisher that is given the CA which signed the
//! broker's certificate connects and gets its publishes confirmed; without it the certificate
//! is refused and the publisher stays offline (its messages go to the outbox).
//!
//! Runs on a node of its own (scripts/test-broker.sh `msgpipe-client-tls`, AMQP 5686,
//! management 15686) with a TLS listener on 5687, using a CA and a server certificate for
//! 127.0.0.1/localhost made here with `openssl`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use msgpipe_client::{BasicProperties, LiveConfig, Outcome, Publisher, PublisherOptions};
use support::{Retry, encode, http, notes_pipeline, provision};

const NODE: &str = "msgpipe-client-tls";
const PORT: u16 = 5686;
const TLS_PORT: u16 = 5687;

/// Inside the node's data directory, which test-broker.sh hands to the rabbitmq user on a
/// fresh start, so the node (which drops root) can read the key.
fn certs_dir() -> PathBuf {
    let base = std::env::var("MSGPIPE_TEST_BROKER_DIR").unwrap_or_else(|_| "/tmp".into());
    Path::new(&base).join(NODE).join("certs")
}

fn node(command: &str) -> bool {
    let certs = certs_dir();
    let file = |name: &str| certs.join(name).display().to_string();
    let conf = format!(
        "listeners.ssl.default = 127.0.0.1:{TLS_PORT}\nssl_options.cacertfile = {}\n\
         ssl_options.certfile = {}\nssl_options.keyfile = {}\nssl_options.verify = verify_none\n\
         ssl_options.fail_if_no_peer_cert = false",
        file("ca.crt"),
        file("server.crt"),
        file("server.key")
    );
    support::broker_node(command, NODE, &PORT.to_string(), &[], Some(&conf))
}

fn tls_listener_up() -> bool {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], TLS_PORT));
    std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2)).is_ok()
}

fn openssl(dir: &Path, command: &str) {
    let output = Command::new("openssl")
        .args(command.split_whitespace())
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
         -subj /CN=msgpipe-client-test-CA -addext basicConstraints=critical,CA:TRUE \
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

/// Starts the TLS node (certificates are made on first use and kept with the node).
fn tls_node() {
    let certs = certs_dir();
    if !certs.join("server.crt").exists() {
        node("stop");
        make_certificates(&certs);
    }
    assert!(node("ensure"), "the TLS node starts");
    if !tls_listener_up() {
        node("stop");
        assert!(node("ensure"), "the TLS node restarts");
        assert!(tls_listener_up(), "no TLS listener on {TLS_PORT}");
    }
}

async fn publish_one(
    options: PublisherOptions,
    config: &msgpipe_client::PipelineConfig,
) -> Outcome {
    let publisher = Publisher::start(options, LiveConfig::fixed(config.clone()))
        .await
        .expect("start");
    let outcome = publisher
        .publish(b"over tls", BasicProperties::default())
        .await
        .expect("publish");
    publisher.close().await;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_is_confirmed_with_the_ca_file_and_refused_without_it() {
    tls_node();
    let vhost = format!("client-tls-{}", std::process::id());
    let mgmt = format!("http://127.0.0.1:{}/api", PORT + 10000);
    let (status, body) = http(
        "PUT",
        &format!("{mgmt}/vhosts/{}", encode(&vhost)),
        None,
        true,
    );
    assert!(
        (200..300).contains(&status),
        "create vhost: {status} {body}"
    );
    let permissions = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
    let url = format!("{mgmt}/permissions/{}/guest", encode(&vhost));
    assert!((200..300).contains(&http("PUT", &url, Some(&permissions), true).0));
    let pipeline = notes_pipeline(&vhost, Retry::attempts(3));
    provision(&pipeline, PORT).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let uri = format!(
        "amqps://guest:guest@127.0.0.1:{TLS_PORT}/{}",
        encode(&vhost)
    );
    let mut untrusted = PublisherOptions::new(&uri, dir.path().join("untrusted.redb"));
    untrusted.ca_file = None;
    untrusted.connect_timeout = Duration::from_secs(3);
    let outcome = publish_one(untrusted, &pipeline).await;
    assert!(
        matches!(outcome, Outcome::Queued { .. }),
        "an unknown CA must not be trusted: {outcome:?}"
    );

    let mut trusted = PublisherOptions::new(&uri, dir.path().join("trusted.redb"));
    trusted.ca_file = Some(certs_dir().join("ca.crt"));
    let outcome = publish_one(trusted, &pipeline).await;
    assert!(
        matches!(outcome, Outcome::Confirmed { .. }),
        "with the CA file the broker is trusted: {outcome:?}"
    );

    let mut missing = PublisherOptions::new(&uri, dir.path().join("missing.redb"));
    missing.ca_file = Some(dir.path().join("no-such-ca.crt"));
    let outcome = publish_one(missing, &pipeline).await;
    assert!(matches!(outcome, Outcome::Queued { .. }), "{outcome:?}");

    http(
        "DELETE",
        &format!("{mgmt}/vhosts/{}", encode(&vhost)),
        None,
        true,
    );
    node("stop");
}
