//! Fault test: the broker is killed (-9) while `msgpipe apply` provisions 50 pipelines.
//! After a restart, applying again converges every pipeline exactly once, and no output
//! ever shows the password. Runs on a node of its own so other tests keep their broker.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::http;

const NODE: &str = "msgpipe-fault";
const PORT: &str = "5676";
const MGMT: &str = "http://127.0.0.1:15676";
const USER: &str = "fault-operator";
const SECRET: &str = "Fault-Secret-8d41";
const VHOST: &str = "faults";
const PIPELINES: usize = 50;

fn node(args: &[&str]) -> bool {
    support::broker_node(args[0], NODE, PORT, &args[1..], None)
}

fn msgpipe_apply(dir: &std::path::Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_msgpipe"))
        .args([
            "apply",
            "-f",
            dir.to_str().expect("utf-8"),
            "--timeout",
            "5",
            // Fewer than the default 8 at once, so the declares take long enough (seconds)
            // that the kill always lands in the middle of them.
            "--concurrency",
            "4",
        ])
        .env(
            "MSGPIPE_BROKER_URI",
            format!("amqp://{USER}:{SECRET}@127.0.0.1:{PORT}/{VHOST}"),
        )
        .env("MSGPIPE_MANAGEMENT_URI", MGMT)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("msgpipe starts")
}

fn finish(child: std::process::Child) -> (bool, String, String) {
    let output = child.wait_with_output().expect("msgpipe exits");
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    (
        output.status.success(),
        text(&output.stdout),
        text(&output.stderr),
    )
}

fn list(kind: &str) -> Vec<Value> {
    let (status, body) = http("GET", &format!("{MGMT}/api/{kind}/{VHOST}"), None, true);
    assert_eq!(status, 200, "{kind}: {body}");
    serde_json::from_str::<Value>(&body)
        .expect("json")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn broker_killed_mid_apply_then_restarted_converges_every_pipeline_once() {
    assert!(node(&["ensure"]), "fault node starts");
    node(&["ctl", "add_user", USER, SECRET]);
    node(&["ctl", "set_user_tags", USER, "administrator"]);
    http("DELETE", &format!("{MGMT}/api/vhosts/{VHOST}"), None, true);
    http("PUT", &format!("{MGMT}/api/vhosts/{VHOST}"), None, true);
    let everything = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
    http(
        "PUT",
        &format!("{MGMT}/api/permissions/{VHOST}/{USER}"),
        Some(&everything),
        true,
    );

    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..PIPELINES {
        let manifest = format!(
            "apiVersion: msgpipe.io/v1alpha1\nkind: MessagePipeline\nmetadata: {{ name: p{i:02}, namespace: faults }}\nspec:\n  broker: {{ secretRef: {{ name: rabbitmq }} }}\n  retry: {{ maxAttempts: 5 }}\n"
        );
        std::fs::write(dir.path().join(format!("p{i:02}.yaml")), manifest).expect("write");
    }

    // Kill the node once provisioning is under way.
    let child = msgpipe_apply(dir.path());
    let start = Instant::now();
    // As soon as the first queue exists. Every pipeline's policies go in first and take about
    // a second in the empty vhost; the declares that follow take several.
    while list("queues").is_empty() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(node(&["kill"]), "kill -9");
    let (ok, out, err) = finish(child);
    assert!(
        !ok,
        "apply cannot succeed with its broker killed; stdout:\n{out}"
    );
    assert!(
        !out.contains(SECRET) && !err.contains(SECRET),
        "password leaked:\n{out}\n{err}"
    );
    let stray: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("error: ") && !l.starts_with("warning: "))
        .collect();
    assert!(
        stray.is_empty(),
        "stderr lines that are not one-line errors: {stray:?}"
    );

    assert!(node(&["ensure"]), "fault node restarts");
    let survived = list("queues").len();
    eprintln!(
        "{survived} of {} queues existed when the node was killed",
        6 * PIPELINES
    );
    let (ok, out, err) = finish(msgpipe_apply(dir.path()));
    assert!(ok, "apply after restart failed:\n{err}");
    assert!(
        !out.contains(SECRET) && !err.contains(SECRET),
        "password leaked"
    );

    let (ok, out, _) = finish(msgpipe_apply(dir.path()));
    assert!(ok);
    assert_eq!(
        out.lines().filter(|l| l.ends_with(": no changes")).count(),
        PIPELINES,
        "not converged:\n{out}"
    );

    // Exactly the planned objects: 6 queues, 2 policies (tiers have none), 3 exchanges, 6 bindings per pipeline.
    let ours = |v: &Value| v["name"].as_str().is_some_and(|n| n.starts_with('p'));
    assert_eq!(list("queues").len(), PIPELINES * 6);
    assert_eq!(list("policies").len(), PIPELINES * 2);
    assert_eq!(
        list("exchanges").iter().filter(|e| ours(e)).count(),
        PIPELINES * 3
    );
    let bindings = list("bindings");
    assert_eq!(
        bindings.iter().filter(|b| b["source"] != "").count(),
        PIPELINES * 6
    );
    node(&["stop"]);
}
