//! The Argo CD health check printed in docs/operator.md, run with Lua 5.1 (the dialect of
//! Argo CD's gopher-lua) on the statuses the operator writes.

mod support;

use std::process::Command;

/// The Lua body of `resource.customizations.health.msgpipe.io_MessagePipeline` in the docs.
fn health_script() -> String {
    let docs = std::fs::read_to_string(support::repo_path("docs/operator.md")).expect("docs");
    let start = docs
        .find("resource.customizations.health.msgpipe.io_MessagePipeline: |\n")
        .expect("the health check is in docs/operator.md");
    docs[start..]
        .lines()
        .skip(1)
        .take_while(|line| !line.starts_with("```"))
        .map(|line| line.strip_prefix("    ").unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n")
}

/// (status, message) that the check gives for `obj`, a Lua table constructor.
fn health(obj: &str) -> (String, String) {
    let program = format!(
        "obj = {obj}\nlocal function check()\n{}\nend\nlocal hs = check()\nio.write(hs.status, '\\t', hs.message)\n",
        health_script()
    );
    let out = Command::new("lua5.1")
        .arg("-e")
        .arg(&program)
        .output()
        .expect("lua5.1 (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let (status, message) = text.split_once('\t').expect("status and message");
    (status.to_string(), message.to_string())
}

fn ready(status: &str, reason: &str) -> String {
    format!(
        r#"{{metadata = {{generation = 3}}, status = {{observedGeneration = 3, conditions = {{
            {{type = "BrokerReady", status = "True", reason = "Converged", message = "b"}},
            {{type = "Ready", status = "{status}", reason = "{reason}", message = "why"}}}}}}}}"#
    )
}

#[test]
fn argo_health_follows_the_ready_condition_of_the_current_generation() {
    assert_eq!(health("{metadata = {generation = 1}}").0, "Progressing");
    let stale = r#"{metadata = {generation = 2}, status = {observedGeneration = 1,
        conditions = {{type = "Ready", status = "True", reason = "Converged"}}}}"#;
    assert_eq!(
        health(stale),
        (
            "Progressing".into(),
            "Waiting for the msgpipe operator to reconcile generation 2".into()
        )
    );
    assert_eq!(
        health(&ready("True", "Converged")),
        ("Healthy".into(), "Converged: why".into())
    );
    assert_eq!(
        health(&ready("False", "BrokerUnreachable")),
        ("Degraded".into(), "BrokerUnreachable: why".into())
    );
    assert_eq!(health(&ready("False", "InvalidSpec")).0, "Degraded");
    assert_eq!(health(&ready("Unknown", "")).0, "Progressing");
}

#[test]
fn a_pipeline_waiting_for_a_burst_of_policies_is_progressing_not_degraded() {
    assert_eq!(
        health(&ready("False", "WaitingForPolicies")),
        ("Progressing".into(), "WaitingForPolicies: why".into())
    );
}

/// The Lua body of the MessageBroker health check in the docs.
fn broker_health(obj: &str) -> String {
    let docs = std::fs::read_to_string(support::repo_path("docs/operator.md")).expect("docs");
    let start = docs
        .find("resource.customizations.health.msgpipe.io_MessageBroker: |\n")
        .expect("the MessageBroker health check is in docs/operator.md");
    let script = docs[start..]
        .lines()
        .skip(1)
        .take_while(|line| !line.starts_with("```"))
        .map(|line| line.strip_prefix("    ").unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n");
    let program = format!(
        "obj = {obj}\nlocal function check()\n{script}\nend\nlocal hs = check()\nio.write(hs.status)\n"
    );
    let out = Command::new("lua5.1")
        .arg("-e")
        .arg(&program)
        .output()
        .expect("lua5.1 (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn argo_health_of_a_message_broker_follows_its_ready_condition() {
    assert_eq!(broker_health("{metadata = {}}"), "Progressing");
    let with = |status: &str| {
        format!(
            r#"{{metadata = {{}}, status = {{conditions = {{{{type = "Ready", status = "{status}", reason = "R", message = "m"}}}}}}}}"#
        )
    };
    assert_eq!(broker_health(&with("True")), "Healthy");
    assert_eq!(broker_health(&with("False")), "Degraded");
}

#[test]
fn a_pipeline_whose_queues_are_being_migrated_is_progressing_not_degraded() {
    assert_eq!(health(&ready("False", "Migrating")).0, "Progressing");
    assert_eq!(
        health(&ready("False", "ImmutableFieldChanged")).0,
        "Degraded"
    );
}
