//! The `msgpipe` binary as users run it: `crd`, `render`, and its errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use msgpipe_client::PipelineConfig;
use serde_json::Value;

fn msgpipe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_msgpipe"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("msgpipe runs")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("utf-8")
}

fn render_json(file: &str) -> Vec<Value> {
    let text = stdout(&msgpipe(&["render", "-f", file, "-o", "json"]));
    serde_json::from_str(&text).expect("render -o json prints a JSON array")
}

#[test]
fn committed_crd_matches_the_types() {
    let committed = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/messagepipelines.msgpipe.io.yaml"),
    )
    .expect("crds/messagepipelines.msgpipe.io.yaml is committed");
    let generated = stdout(&msgpipe(&["crd"]));
    assert!(
        committed == generated,
        "crds/messagepipelines.msgpipe.io.yaml is stale: run `make crds` and commit the result"
    );
}

#[test]
fn committed_replay_crd_matches_the_types() {
    let committed = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/deadletterreplays.msgpipe.io.yaml"),
    )
    .expect("crds/deadletterreplays.msgpipe.io.yaml is committed");
    let generated = stdout(&msgpipe(&["crd", "--kind", "deadletterreplay"]));
    assert!(
        committed == generated,
        "crds/deadletterreplays.msgpipe.io.yaml is stale: run `make crds` and commit the result"
    );
    assert!(generated.contains("- dlr"), "short name dlr");
}

#[test]
fn committed_broker_crd_matches_the_types() {
    let committed = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/messagebrokers.msgpipe.io.yaml"),
    )
    .expect("crds/messagebrokers.msgpipe.io.yaml is committed");
    let generated = stdout(&msgpipe(&["crd", "--kind", "messagebroker"]));
    assert!(
        committed == generated,
        "crds/messagebrokers.msgpipe.io.yaml is stale: run `make crds` and commit the result"
    );
    assert!(generated.contains("scope: Cluster"), "cluster-scoped");
    assert!(generated.contains("- mbroker"), "short name mbroker");
}

#[test]
fn replay_as_resource_prints_the_dead_letter_replay_the_operator_runs() {
    let yaml = stdout(&msgpipe(&[
        "dlq",
        "replay",
        "-f",
        "examples/notes-pipeline.yaml",
        "--reason",
        "max-attempts",
        "--error-matches",
        "timeout",
        "--id",
        "m-1",
        "--id",
        "m-2",
        "--limit",
        "10",
        "--rate",
        "50/s",
        "--stop-when",
        "10%/5m",
        "--stop-min-sample",
        "30",
        "--older-than",
        "1h",
        "--as-resource",
        "--resource-name",
        "notes-incident-42",
    ]));
    let replay: msgpipe::api::DeadLetterReplay =
        serde_saphyr::from_str(&yaml).expect("a DeadLetterReplay");
    assert_eq!(replay.metadata.name.as_deref(), Some("notes-incident-42"));
    assert_eq!(replay.metadata.namespace.as_deref(), Some("notes-app"));
    let spec = &replay.spec;
    assert_eq!(spec.pipeline_ref.name, "notes");
    assert_eq!(spec.selection.reason.as_deref(), Some("max-attempts"));
    assert_eq!(spec.selection.error_matches.as_deref(), Some("timeout"));
    assert_eq!(spec.selection.message_ids, ["m-1", "m-2"]);
    assert_eq!(spec.selection.limit, Some(10));
    assert_eq!(spec.rate, Some(50));
    let stop = spec.stop_when.as_ref().expect("stopWhen");
    assert_eq!(
        (
            stop.failed_again_percent,
            stop.window.as_millis(),
            stop.min_sample
        ),
        (10.0, 300_000, Some(30))
    );
    // --older-than 1h became an absolute instant about an hour ago.
    let before = spec
        .selection
        .failed_before
        .as_ref()
        .expect("failedBefore")
        .0;
    let ago = k8s_openapi::jiff::Timestamp::now().duration_since(before);
    assert!((3590..=3660).contains(&ago.as_secs()), "{ago:?}");
    assert!(!yaml.contains("status"), "{yaml}");
}

#[test]
fn replay_flags_for_the_kill_switch_fail_on_one_line_naming_the_flag() {
    for (args, flag) in [
        (&["--stop-when", "10/5m"][..], "--stop-when"),
        (&["--stop-when", "10%/soon"][..], "--stop-when"),
        (&["--stop-when", "0%/5m"][..], "--stop-when"),
        (&["--rate", "2.5/s"][..], "--rate"),
    ] {
        let mut all = vec![
            "dlq",
            "replay",
            "--all",
            "-f",
            "examples/notes-pipeline.yaml",
            "--as-resource",
        ];
        all.extend_from_slice(args);
        let output = msgpipe(&all);
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        assert!(!output.status.success(), "{args:?} accepted");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}

#[test]
fn the_replay_example_is_a_dead_letter_replay_of_the_notes_pipeline() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/replays/notes-after-incident.yaml"),
    )
    .expect("example");
    let replay: msgpipe::api::DeadLetterReplay = serde_saphyr::from_str(&text).expect("parses");
    assert_eq!(replay.spec.pipeline_ref.name, "notes");
    assert_eq!(replay.metadata.namespace.as_deref(), Some("notes-app"));
    let selection = msgpipe::controller::replay::selection_of(&replay.spec.selection)
        .expect("the selection compiles");
    assert!(
        selection
            .error_matches
            .is_some_and(|re| re.is_match("db timeout"))
    );
    assert!(msgpipe::controller::replay::stop_rule(&replay).is_some_and(|r| r.min_sample == 50));
}

#[test]
fn render_prints_the_seed_topology_rule_and_config_map() {
    let docs = render_json("examples/notes-pipeline.yaml");
    let kinds: Vec<_> = docs
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(kinds, ["BrokerTopology", "PrometheusRule", "ConfigMap"]);

    let topology = &docs[0];
    let names = |key: &str| -> Vec<String> {
        topology[key]
            .as_array()
            .expect("list")
            .iter()
            .map(|o| o["name"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(
        names("queues"),
        [
            "notes_queue",
            "notes_queue_dlq",
            "notes_queue.retry.1.1s",
            "notes_queue.retry.2.2s",
            "notes_queue.retry.3.4s",
            "notes_queue.retry.4.8s"
        ]
    );
    // A tier's settings are its declare arguments, shown with the queue.
    let tier = &topology["queues"][2];
    assert_eq!(tier["arguments"]["message-ttl"], 1000);
    assert_eq!(tier["arguments"]["dead-letter-routing-key"], "notes_queue");
    assert_eq!(
        names("policies"),
        ["msgpipe.notes_queue", "msgpipe.notes_queue_dlq"]
    );
    assert_eq!(
        names("exchanges"),
        ["notes", "notes_dlq_exchange", "notes_queue.retry"]
    );
    let delays: Vec<_> = topology["retryTiers"]
        .as_array()
        .expect("tiers")
        .iter()
        .map(|t| t["delay"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(delays, ["1s", "2s", "4s", "8s"]);
    let work_policy = &topology["policies"][0];
    assert_eq!(work_policy["pattern"], "^notes_queue$");
    assert_eq!(
        work_policy["definition"]["dead-letter-exchange"],
        "notes_dlq_exchange"
    );

    let rule = &docs[1];
    assert_eq!(rule["metadata"]["name"], "notes-alerts");
    assert_eq!(
        rule["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    let dlq_alert = &rule["spec"]["groups"][0]["rules"][0];
    assert_eq!(
        dlq_alert["expr"],
        r#"rabbitmq_queue_messages{vhost="/",queue="notes_queue_dlq"} > 100"#
    );
    assert_eq!(dlq_alert["for"], "5m");
    assert_eq!(dlq_alert["labels"]["severity"], "critical");
    assert_eq!(dlq_alert["labels"]["team"], "notes");

    let config_map = &docs[2];
    assert_eq!(config_map["metadata"]["name"], "notes-client");
    let json = config_map["data"]["pipeline.json"]
        .as_str()
        .expect("pipeline.json");
    let config =
        PipelineConfig::from_json(json, Path::new("pipeline.json")).expect("client reads it");
    assert_eq!(config.dead_letter.queue, "notes_queue_dlq");
    assert!(config.features.retry_pending);
    assert_eq!(config.features.retry_interval_seconds, 120);
}

#[test]
fn yaml_and_json_outputs_carry_the_same_documents() {
    let yaml = stdout(&msgpipe(&["render", "-f", "examples/notes-pipeline.yaml"]));
    let from_yaml: Vec<Value> = serde_saphyr::from_multiple(&yaml).expect("YAML stream parses");
    assert_eq!(from_yaml, render_json("examples/notes-pipeline.yaml"));
}

#[test]
fn every_example_renders_and_a_directory_renders_them_all() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut pipelines = 0;
    for entry in std::fs::read_dir(&examples).expect("examples/") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            continue; // examples/secrets: not pipelines
        }
        let text = std::fs::read_to_string(&path).expect("readable");
        if path.extension().is_some_and(|e| e == "yaml") && text.contains("kind: MessagePipeline") {
            let docs = render_json(path.to_str().expect("utf-8 path"));
            assert_eq!(docs[0]["kind"], "BrokerTopology", "{}", path.display());
            pipelines += 1;
        }
    }
    assert!(
        pipelines >= 4,
        "expected the notes example and three more, found {pipelines}"
    );
}

#[test]
fn pipelines_come_from_stdin_with_dash() {
    let output = Command::new(env!("CARGO_BIN_EXE_msgpipe"))
        .args(["render", "-f", "-", "-o", "json"])
        .stdin(
            std::fs::File::open(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/orders-classic.yaml"),
            )
            .expect("example"),
        )
        .output()
        .expect("runs");
    let docs: Vec<Value> = serde_json::from_str(&stdout(&output)).expect("json");
    assert_eq!(docs[0]["queues"][0]["type"], "classic");
}

/// Each file in tests/fixtures/invalid starts with `# expect: <text>`: rendering it must
/// fail with exit code 1 and exactly one stderr line naming the file and containing <text>.
#[test]
fn invalid_manifests_fail_with_one_line_naming_the_field() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("fixtures")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 20, "only {} invalid fixtures", files.len());
    for file in files {
        let text = std::fs::read_to_string(&file).expect("fixture");
        let expected = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks '# expect:'", file.display()));
        let relative = format!(
            "tests/fixtures/invalid/{}",
            file.file_name().and_then(|n| n.to_str()).expect("name")
        );
        let output = msgpipe(&["render", "-f", &relative]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{relative}: {stderr}");
        assert!(output.stdout.is_empty(), "{relative} printed output");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{relative}: not one line: {stderr}"
        );
        assert!(
            stderr.starts_with(&format!("error: {relative}: ")),
            "{relative}: {stderr}"
        );
        assert!(
            stderr.contains(expected),
            "{relative}: expected {expected:?} in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{relative}: {stderr}");
    }
}

#[test]
fn missing_file_is_one_line_error() {
    let output = msgpipe(&["render", "-f", "no/such/file.yaml"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.trim(),
        "error: cannot read no/such/file.yaml: No such file or directory (os error 2)"
    );
}

#[test]
fn import_without_a_broker_or_with_a_bad_queue_regex_fails_on_one_line() {
    let output = Command::new(env!("CARGO_BIN_EXE_msgpipe"))
        .args(["import"])
        .env_remove("MSGPIPE_BROKER_URI")
        .env_remove("MSGPIPE_MANAGEMENT_URI")
        .output()
        .expect("msgpipe runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no broker given"), "{stderr}");
    let output = msgpipe(&[
        "import",
        "--management-uri",
        "http://reader:hunter2-secret@127.0.0.1:1",
        "--queue",
        "orders(",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("--queue \"orders(\" is not a regular expression"),
        "{stderr}"
    );
    // A management URI without credentials is refused before any request, naming the field.
    let output = msgpipe(&["import", "--management-uri", "http://127.0.0.1:1"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("managementUri") && stderr.contains("needs credentials"),
        "{stderr}"
    );
    // An unreachable one fails on one line without the password.
    let output = msgpipe(&[
        "import",
        "--management-uri",
        "http://reader:hunter2-secret@127.0.0.1:1",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(!stderr.contains("hunter2-secret"), "{stderr}");
}
