//! The broker reconciler against a real RabbitMQ, each test in its own vhost.

mod support;

use std::time::{Duration, Instant};

use lapin::options::{BasicConsumeOptions, BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use msgpipe::broker::{
    self, ActionOutcome, BrokerAction, BrokerApi, BrokerError, BrokerReport, LiveVhost, QueueDepth,
    RabbitBroker,
};
use msgpipe::plan::DesiredState;
use serde_json::Value;
use support::{TestVhost, amqp_channel, depth, mgmt, plan_yaml, publish};

/// The notes pipeline on `vhost`; `extra` adds spec fields or replaces `queue`/`deadLetter`.
fn notes(vhost: &str, extra: &str) -> DesiredState {
    let mut spec = format!("  broker: {{ secretRef: {{ name: rabbitmq }}, vhost: \"{vhost}\" }}\n");
    if !extra.contains("  queue:") {
        spec.push_str("  queue: { name: notes_queue, exchange: notes, routingKey: notes }\n");
    }
    if !extra.contains("  deadLetter:") {
        spec.push_str("  deadLetter: { exchange: notes_dlq_exchange, queue: notes_queue_dlq }\n");
    }
    plan_yaml(&format!(
        "apiVersion: msgpipe.io/v1alpha1\nkind: MessagePipeline\nmetadata: {{ name: notes, namespace: notes-app }}\nspec:\n{spec}{extra}\n"
    ))
}

async fn snapshot(broker: &RabbitBroker, state: &DesiredState) -> LiveVhost {
    broker
        .snapshot(&state.topology.vhost)
        .await
        .expect("snapshot")
}

async fn converge(broker: &RabbitBroker, state: &DesiredState) -> BrokerReport {
    let live = snapshot(broker, state).await;
    broker::reconcile(broker, state, &live)
        .await
        .expect("reconcile")
}

fn changes(report: &BrokerReport) -> Vec<String> {
    report.changes.iter().map(ToString::to_string).collect()
}

fn get_json(path: &str) -> Value {
    serde_json::from_str(&mgmt("GET", path, None)).expect("json")
}

/// Management stats lag: poll until `check` holds.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn apply_creates_every_object_with_its_arguments_and_effective_policy() {
    let vhost = TestVhost::new("broker-apply");
    let state = notes(&vhost.name, "");
    let broker = support::test_broker(&vhost.name);
    let report = converge(&broker, &state).await;
    let t = &state.topology;
    assert_eq!(
        report.changes.len(),
        t.policies.len() + t.exchanges.len() + t.queues.len() + t.bindings.len()
    );

    for exchange in &t.exchanges {
        let live = get_json(&vhost.path("exchanges", &exchange.name));
        assert_eq!(live["type"], exchange.kind.as_str(), "{}", exchange.name);
        assert_eq!(live["durable"], true);
    }
    for queue in &t.queues {
        let live = get_json(&vhost.path("queues", &queue.name));
        assert_eq!(
            live["arguments"]["x-queue-type"], "quorum",
            "{}",
            queue.name
        );
        assert_eq!(live["durable"], true);
        // A tier's settings are its own arguments (RabbitMQ's spelling, `x-` + policy key).
        let major = broker.server_major().await.expect("server version");
        for (key, value) in queue.arguments.for_server(major).declare_arguments() {
            assert_eq!(live["arguments"][&key], value, "{} {key}", queue.name);
        }
    }
    let tier = get_json(&vhost.path("queues", "notes_queue.retry.1.1s"));
    assert_eq!(tier["arguments"]["x-message-ttl"], 1000);
    assert_eq!(
        tier["arguments"]["x-dead-letter-routing-key"],
        "notes_queue"
    );
    assert!(tier["policy"].is_null(), "no policy on a tier: {tier}");
    let bindings = get_json(&format!("/bindings/{}", support::encode(&vhost.name)));
    for binding in &t.bindings {
        let found = bindings.as_array().expect("list").iter().any(|b| {
            b["source"] == binding.source.as_str()
                && b["destination"] == binding.destination.as_str()
                && b["routing_key"] == binding.routing_key.as_str()
        });
        assert!(found, "missing binding {binding:?}");
    }
    // The policy RabbitMQ applies to each queue is ours, with our definition.
    let major = broker.server_major().await.expect("server version");
    for policy in &t.policies {
        let queue = policy.name.trim_start_matches("msgpipe.");
        let expected = broker::diff::policy_definition(&policy.definition, major);
        let path = vhost.path("queues", queue);
        eventually(&format!("effective policy on {queue}"), || {
            let live = get_json(&path);
            live["policy"] == policy.name.as_str()
                && live["effective_policy_definition"] == Value::Object(expected.clone())
        })
        .await;
    }
    let work_policy = get_json(&vhost.path("policies", "msgpipe.notes_queue"));
    assert_eq!(
        work_policy["definition"]["dead-letter-exchange"],
        "notes_dlq_exchange"
    );
    assert_eq!(work_policy["definition"]["delivery-limit"], 5);
    assert_eq!(work_policy["pattern"], "^notes_queue$");
}

#[tokio::test]
async fn second_apply_of_a_converged_pipeline_writes_nothing() {
    let vhost = TestVhost::new("broker-idempotent");
    let state = notes(&vhost.name, "");
    let broker = support::test_broker(&vhost.name);
    assert!(converge(&broker, &state).await.wrote());
    let again = converge(&broker, &state).await;
    assert_eq!(changes(&again), Vec::<String>::new());
    assert!(!again.wrote());
}

#[tokio::test]
async fn msgpipes_declare_connection_asks_for_small_frames() {
    let vhost = TestVhost::new("broker-frames");
    let state = notes(&vhost.name, "");
    let broker = support::test_broker(&vhost.name);
    assert!(converge(&broker, &state).await.wrote());
    // The pooled connection to the vhost stays open; the broker lists what it negotiated.
    let path = format!("/vhosts/{}/connections", support::encode(&vhost.name));
    let mut frames = Vec::new();
    eventually("msgpipe's connection in the management API", || {
        frames = get_json(&path)
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["client_properties"]["connection_name"] == "msgpipe")
            .map(|c| c["frame_max"].clone())
            .collect();
        !frames.is_empty()
    })
    .await;
    // lapin keeps 32 frames of buffer each way: 1 MiB at 16 KiB, 8 MiB at the default 128 KiB.
    assert_eq!(frames, vec![serde_json::json!(16384)]);
    // It still does its work: a second pass finds everything in place.
    assert!(!converge(&broker, &state).await.wrote());
}

/// The real broker, with a log of what was asked of it.
struct Recording<'a> {
    broker: &'a RabbitBroker,
    log: std::sync::Mutex<Vec<String>>,
}

impl Recording<'_> {
    fn note(&self, entry: String) {
        self.log.lock().expect("log").push(entry);
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().expect("log"))
    }
}

impl BrokerApi for Recording<'_> {
    async fn snapshot(&self, vhost: &str) -> Result<LiveVhost, BrokerError> {
        self.note("snapshot".into());
        self.broker.snapshot(vhost).await
    }

    async fn execute(
        &self,
        vhost: &str,
        action: &BrokerAction,
    ) -> Result<ActionOutcome, BrokerError> {
        self.note(action.to_string());
        self.broker.execute(vhost, action).await
    }

    async fn queue_depth(
        &self,
        vhost: &str,
        queue: &str,
    ) -> Result<Option<QueueDepth>, BrokerError> {
        self.broker.queue_depth(vhost, queue).await
    }

    async fn delete_exchange(&self, vhost: &str, exchange: &str) -> Result<(), BrokerError> {
        self.broker.delete_exchange(vhost, exchange).await
    }
}

/// What `msgpipe apply` does with several pipelines, 2 at a time.
async fn apply_all<'a>(
    broker: &Recording<'_>,
    states: &'a [DesiredState],
) -> Vec<(&'a DesiredState, Result<BrokerReport, broker::Failed>)> {
    let live = broker::snapshot_vhosts(broker, states)
        .await
        .expect("snapshot");
    broker::reconcile_many(broker, states, &live, 2).await
}

#[tokio::test]
async fn applying_many_pipelines_puts_every_policy_before_any_exchange_or_queue() {
    let vhost = TestVhost::new("broker-many");
    let states: Vec<DesiredState> = ["orders", "invoices", "emails"]
        .iter()
        .map(|q| {
            notes(
                &vhost.name,
                &format!("  queue: {{ name: {q} }}\n  deadLetter: {{}}"),
            )
        })
        .collect();
    let broker = support::test_broker(&vhost.name);
    let recording = Recording {
        broker: &broker,
        log: Default::default(),
    };
    let reports = apply_all(&recording, &states).await;
    let log = recording.take();
    let is_policy = |e: &String| e.starts_with("create policy");
    let last_policy = log.iter().rposition(is_policy).expect("policies put");
    let first_other = log
        .iter()
        .position(|e| e != "snapshot" && !is_policy(e))
        .expect("objects declared");
    assert!(
        last_policy < first_other,
        "every pipeline's policies come first: {log:#?}"
    );
    // Two per pipeline (work queue and DLQ): tiers have none.
    assert_eq!(log.iter().filter(|e| is_policy(e)).count(), 6, "{log:#?}");
    assert_eq!(
        log.iter().filter(|e| *e == "snapshot").count(),
        1,
        "both phases run from one snapshot: {log:#?}"
    );
    for (state, report) in reports {
        let report = report.expect("converged");
        assert!(
            changes(&report).contains(&format!("created queue {}", state.names.queue)),
            "{:?}",
            changes(&report)
        );
        assert_eq!(report.deferred, 0);
    }

    // Converged: one snapshot, nothing written.
    let reports = apply_all(&recording, &states).await;
    assert!(
        reports
            .iter()
            .all(|(_, r)| r.as_ref().is_ok_and(|r| !r.wrote()))
    );
    assert_eq!(recording.take(), ["snapshot"]);
}

#[tokio::test]
async fn drift_behind_the_operators_back_is_repaired() {
    let vhost = TestVhost::new("broker-drift");
    let state = notes(&vhost.name, "");
    let broker = support::test_broker(&vhost.name);
    converge(&broker, &state).await;

    // A DLX without its binding drops dead letters silently; a retry queue deleted; a policy edited.
    let v = support::encode(&vhost.name);
    let dlx_bindings = get_json(&format!(
        "/bindings/{v}/e/notes_dlq_exchange/q/notes_queue_dlq"
    ));
    let props = dlx_bindings[0]["properties_key"]
        .as_str()
        .expect("one binding");
    assert_eq!(
        dlx_bindings[0]["arguments"][broker::BINDING_MARKER],
        true,
        "msgpipe marks the routes it makes"
    );
    mgmt(
        "DELETE",
        &format!(
            "/bindings/{v}/e/notes_dlq_exchange/q/notes_queue_dlq/{}",
            support::encode(props)
        ),
        None,
    );
    mgmt(
        "DELETE",
        &vhost.path("queues", "notes_queue.retry.2.2s"),
        None,
    );
    let mut edited = get_json(&vhost.path("policies", "msgpipe.notes_queue_dlq"));
    edited["definition"]["max-length"] = Value::from(1);
    mgmt(
        "PUT",
        &vhost.path("policies", "msgpipe.notes_queue_dlq"),
        Some(edited),
    );

    let repaired = changes(&converge(&broker, &state).await);
    assert_eq!(
        repaired,
        [
            "updated policy msgpipe.notes_queue_dlq",
            "created queue notes_queue.retry.2.2s",
            "bound notes_dlq_exchange -> notes_queue_dlq (key \"\")",
            "bound notes_queue.retry -> notes_queue.retry.2.2s (key \"2\")",
        ]
    );
    assert!(!converge(&broker, &state).await.wrote());
}

#[tokio::test]
async fn spec_changes_converge_on_the_live_queues() {
    let vhost = TestVhost::new("broker-changes");
    let broker = support::test_broker(&vhost.name);
    converge(&broker, &notes(&vhost.name, "")).await;

    // New delays and a DLQ retention: one policy write (the DLQ's); every tier's delay
    // changed, so four new tiers, the old ones unbound and (empty) deleted.
    let slower = notes(
        &vhost.name,
        "  retry: { backoff: { initialDelay: 2s, multiplier: 3, maxDelay: 1m } }\n  deadLetter: { exchange: notes_dlq_exchange, queue: notes_queue_dlq, retention: 7d, maxLength: 500 }",
    );
    let updated = changes(&converge(&broker, &slower).await);
    let count = |prefix: &str| updated.iter().filter(|c| c.starts_with(prefix)).count();
    assert_eq!(
        updated
            .iter()
            .filter(|c| c.contains("policy"))
            .collect::<Vec<_>>(),
        ["updated policy msgpipe.notes_queue_dlq"],
        "{updated:?}"
    );
    for new in [
        "notes_queue.retry.1.2s",
        "notes_queue.retry.2.6s",
        "notes_queue.retry.3.18s",
        "notes_queue.retry.4.54s",
    ] {
        assert!(
            updated.contains(&format!("created queue {new}")),
            "{new}: {updated:?}"
        );
    }
    assert_eq!(count("deleted queue notes_queue.retry."), 4, "{updated:?}");
    assert_eq!(count("unbound notes_queue.retry -> "), 4, "{updated:?}");
    assert!(!converge(&broker, &slower).await.wrote());
    let dlq_policy = get_json(&vhost.path("policies", "msgpipe.notes_queue_dlq"));
    assert_eq!(dlq_policy["definition"]["message-ttl"], 604_800_000u64);
    assert_eq!(dlq_policy["definition"]["max-length"], 500);

    // Fewer attempts: tiers 3 and 4 are unbound and, being empty, deleted.
    let fewer = notes(&vhost.name, "  retry: { maxAttempts: 3 }");
    converge(&broker, &notes(&vhost.name, "")).await;
    let shrunk = changes(&converge(&broker, &fewer).await);
    assert!(
        shrunk.contains(&"deleted queue notes_queue.retry.4.8s".to_string()),
        "{shrunk:?}"
    );
    assert!(
        shrunk.contains(
            &"unbound notes_queue.retry -> notes_queue.retry.3.4s (key \"3\")".to_string()
        ),
        "{shrunk:?}"
    );
    let (_conn, channel) = amqp_channel(&vhost.name).await;
    let gone = channel
        .queue_declare(
            "notes_queue.retry.3.4s".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(gone.is_err(), "retry.3 should be deleted");

    // More attempts: new tiers are declared and bound.
    let more = notes(&vhost.name, "  retry: { maxAttempts: 6 }");
    let grown = changes(&converge(&broker, &more).await);
    assert!(
        grown.contains(&"created queue notes_queue.retry.5.16s".to_string()),
        "{grown:?}"
    );
    assert!(!converge(&broker, &more).await.wrote());
}

#[tokio::test]
async fn a_removed_tier_holding_messages_is_kept_until_it_drains() {
    let vhost = TestVhost::new("broker-drain");
    let broker = support::test_broker(&vhost.name);
    // Long delays so messages wait in the tiers.
    let long =
        "  retry: { maxAttempts: 4, backoff: { initialDelay: 10m, multiplier: 2, maxDelay: 1h } }";
    converge(&broker, &notes(&vhost.name, long)).await;
    let (_conn, channel) = amqp_channel(&vhost.name).await;
    publish(&channel, "notes_queue.retry", "3", b"waiting").await;

    let shorter =
        "  retry: { maxAttempts: 2, backoff: { initialDelay: 10m, multiplier: 2, maxDelay: 1h } }";
    let report = changes(&converge(&broker, &notes(&vhost.name, shorter)).await);
    assert!(
        report.contains(
            &"kept queue notes_queue.retry.3.40m: holds 1 messages (ready or unacknowledged)"
                .to_string()
        ),
        "{report:?}"
    );
    assert!(
        report.contains(&"deleted queue notes_queue.retry.2.20m".to_string()),
        "{report:?}"
    );
    assert_eq!(
        depth(&channel, "notes_queue.retry.3.40m").await,
        1,
        "the waiting message is untouched"
    );
    // Its settings stay with it, so the message still returns to the work queue when it
    // expires.
    let kept = get_json(&vhost.path("queues", "notes_queue.retry.3.40m"));
    assert_eq!(kept["arguments"]["x-message-ttl"], 2_400_000);
    assert_eq!(
        kept["arguments"]["x-dead-letter-routing-key"],
        "notes_queue"
    );

    mgmt(
        "DELETE",
        &format!(
            "{}/contents",
            vhost.path("queues", "notes_queue.retry.3.40m")
        ),
        None,
    );
    // The management figures (which count unacknowledged messages) lag the purge by up to
    // the stats interval; until they agree the queue is kept, never deleted early.
    let start = Instant::now();
    loop {
        let drained = changes(&converge(&broker, &notes(&vhost.name, shorter)).await);
        if drained == ["deleted queue notes_queue.retry.3.40m"] {
            break;
        }
        assert_eq!(
            drained,
            ["kept queue notes_queue.retry.3.40m: holds 1 messages (ready or unacknowledged)"],
            "only kept until the figures catch up"
        );
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never deleted after draining"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn a_changed_queue_type_is_refused_and_nothing_is_deleted() {
    let vhost = TestVhost::new("broker-immutable");
    let broker = support::test_broker(&vhost.name);
    converge(&broker, &notes(&vhost.name, "")).await;
    let (_conn, channel) = amqp_channel(&vhost.name).await;
    publish(&channel, "notes", "notes", b"precious").await;
    let policy_before = get_json(&vhost.path("policies", "msgpipe.notes_queue"));
    assert_eq!(
        policy_before["definition"]["dead-letter-strategy"],
        "at-least-once"
    );

    let classic = notes(
        &vhost.name,
        "  queue: { name: notes_queue, exchange: notes, routingKey: notes, type: classic }",
    );
    let report = converge(&broker, &classic).await;
    assert!(!report.conflicts.is_empty());
    assert!(
        report
            .conflicts
            .iter()
            .all(|c| c.field == "spec.queue.type")
    );
    assert!(
        report.changes.iter().all(|c| c.verb != "deleted"),
        "{:?}",
        changes(&report)
    );
    assert_eq!(
        get_json(&vhost.path("queues", "notes_queue"))["type"],
        "quorum"
    );
    assert_eq!(
        depth(&channel, "notes_queue").await,
        1,
        "the message survives"
    );
    // Nothing about the refused queue is written: its policy (and so the live queue's
    // dead-letter strategy and delivery limit) is the quorum one it had.
    assert!(
        report
            .changes
            .iter()
            .all(|c| !c.name.contains("notes_queue ")
                && c.name != "msgpipe.notes_queue"
                && c.name != "notes_queue"),
        "{:?}",
        changes(&report)
    );
    assert_eq!(
        get_json(&vhost.path("policies", "msgpipe.notes_queue")),
        policy_before
    );
    // The queue's effective policy shows in the management figures (they lag).
    let path = vhost.path("queues", "notes_queue");
    eventually("the effective policy of notes_queue", || {
        let effective = &get_json(&path)["effective_policy_definition"];
        effective["dead-letter-strategy"] == "at-least-once" && effective["delivery-limit"] == 5
    })
    .await;
    // And a second pass is just as careful.
    let again = converge(&broker, &classic).await;
    assert!(again.changes.is_empty(), "{:?}", changes(&again));
}

#[tokio::test]
async fn a_changed_routing_key_no_longer_routes_by_the_old_key() {
    let vhost = TestVhost::new("broker-stale-route");
    let broker = support::test_broker(&vhost.name);
    converge(&broker, &notes(&vhost.name, "")).await;
    let moved = notes(
        &vhost.name,
        "  queue: { name: notes_queue, exchange: notes, routingKey: notes.v2 }",
    );
    let report = converge(&broker, &moved).await;
    let lines = changes(&report);
    assert!(
        lines.contains(&"unbound notes -> notes_queue (key \"notes\")".to_string()),
        "{lines:?}"
    );
    let (_conn, channel) = amqp_channel(&vhost.name).await;
    assert!(
        publish_returned(&channel, "notes", "notes").await,
        "the old key still routes"
    );
    publish(&channel, "notes", "notes.v2", b"new route").await;
    assert_eq!(depth(&channel, "notes_queue").await, 1);

    // A moved work exchange: the route from the old one goes too.
    let elsewhere = notes(
        &vhost.name,
        "  queue: { name: notes_queue, exchange: notes.elsewhere, routingKey: notes.v2 }",
    );
    let lines = changes(&converge(&broker, &elsewhere).await);
    assert!(
        lines.contains(&"unbound notes -> notes_queue (key \"notes.v2\")".to_string()),
        "{lines:?}"
    );
    assert!(publish_returned(&channel, "notes", "notes.v2").await);
    // Converged: the next pass changes nothing.
    assert!(converge(&broker, &elsewhere).await.changes.is_empty());
}

/// Publishes with mandatory set; true when the broker returned the message as unroutable.
async fn publish_returned(channel: &lapin::Channel, exchange: &str, key: &str) -> bool {
    let options = lapin::options::BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    let confirm = channel
        .basic_publish(
            exchange.into(),
            key.into(),
            options,
            b"probe",
            lapin::BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    confirm.take_message().is_some()
}

/// The test's own broker node, of the version `MSGPIPE_RABBITMQ` names (so the
/// compatibility pass runs this test on 3.10, 4.0 and 4.3 without touching the shared node).
const TEARDOWN_NODE: (&str, &str) = ("msgpipe-teardown", "5691");

#[tokio::test]
async fn teardown_keeps_a_dlq_whose_messages_are_held_unacked() {
    let (name, port) = TEARDOWN_NODE;
    assert!(
        support::broker_node("ensure", name, port, &[], None),
        "broker node {name} did not start"
    );
    let mgmt_url = format!("http://127.0.0.1:1{port}");
    let uri = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    for queue_type in ["quorum", "classic"] {
        let state = plan_yaml(&format!(
            "apiVersion: msgpipe.io/v1alpha1\nkind: MessagePipeline\nmetadata: {{ name: held-{queue_type}, namespace: t }}\nspec:\n  broker: {{ secretRef: {{ name: rabbitmq }} }}\n  queue: {{ type: {queue_type} }}\n  deletionPolicy: Delete\n"
        ));
        let endpoint = broker::BrokerEndpoint::new(&uri, Some(&mgmt_url), None).expect("endpoint");
        let broker = RabbitBroker::new(endpoint, Duration::from_secs(15)).expect("client");
        let live = broker.snapshot("/").await.expect("snapshot");
        broker::reconcile(&broker, &state, &live)
            .await
            .expect("apply");
        let dlq = state.names.dead_letter_queue.clone();

        msgpipe::broker::install_crypto_provider();
        let browser = lapin::Connection::connect(&uri, lapin::ConnectionProperties::default())
            .await
            .expect("connect");
        let channel = browser.create_channel().await.expect("channel");
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        for body in [b"first".as_slice(), b"second"] {
            publish(&channel, &state.names.dead_letter_exchange, "", body).await;
        }
        // A browse, as `msgpipe dlq list` does: get without ack, hold, give back on close.
        for _ in 0..2 {
            let got = channel
                .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .expect("get");
            assert!(got.is_some(), "a dead letter to browse");
        }
        assert_eq!(depth(&channel, &dlq).await, 0, "nothing ready: all held");
        // The broker's figures count what the browse holds once they catch up (the stats
        // interval; docs/broker.md says what this leaves).
        let stats_url = format!("{mgmt_url}/api/queues/%2f/{dlq}");
        eventually("the held dead letters in the management figures", || {
            let (_, body) = support::http("GET", &stats_url, None, true);
            serde_json::from_str::<Value>(&body).is_ok_and(|v| v["messages_unacknowledged"] == 2)
        })
        .await;

        let live = broker.snapshot("/").await.expect("snapshot");
        let report = broker::teardown(&broker, &state, &live)
            .await
            .expect("teardown");
        let lines = changes(&report);
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("kept queue {dlq}"))),
            "{queue_type}: {lines:?}"
        );
        assert!(
            lines.contains(&format!("deleted queue {}", state.names.queue)),
            "{queue_type}: {lines:?}"
        );
        browser.close(200, "done".into()).await.expect("close");
        let (_conn, check) = {
            let c = lapin::Connection::connect(&uri, lapin::ConnectionProperties::default())
                .await
                .expect("connect");
            let ch = c.create_channel().await.expect("channel");
            (c, ch)
        };
        let mut back = 0;
        for _ in 0..40 {
            back = depth(&check, &dlq).await;
            if back == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            back, 2,
            "{queue_type}: both dead letters survive the teardown"
        );
        let _ = support::http(
            "DELETE",
            &format!("{mgmt_url}/api/queues/%2f/{dlq}"),
            None,
            true,
        );
        broker.close().await;
    }
}

#[tokio::test]
async fn a_settled_delete_sees_a_browse_that_began_just_before() {
    let vhost = TestVhost::new("broker-settle");
    // Classic: a quorum queue counts a basic.get holder as a consumer, exactly and at once;
    // for a classic queue only the lagging figures show it.
    let state = notes(
        &vhost.name,
        "  queue: { name: notes_queue, exchange: notes, routingKey: notes, type: classic }\n  deletionPolicy: Delete",
    );
    // The default settle. Without it (`with_delete_settle(Duration::ZERO)`) this queue is
    // deleted, held messages and all: checked by hand on 4.3.
    let broker = support::test_broker(&vhost.name);
    converge(&broker, &state).await;
    // The DLQ has had figures for a while (all zero) when the browse begins.
    let path = vhost.path("queues", "notes_queue_dlq");
    eventually("figures for the DLQ", || {
        get_json(&path)["messages"].is_u64()
    })
    .await;
    let (_conn, channel) = amqp_channel(&vhost.name).await;
    for body in [b"one".as_slice(), b"two"] {
        publish(&channel, "notes_dlq_exchange", "", body).await;
    }
    for _ in 0..2 {
        let got = channel
            .basic_get("notes_queue_dlq".into(), BasicGetOptions { no_ack: false })
            .await
            .expect("get");
        assert!(got.is_some(), "a dead letter to browse");
    }
    // Right away: the figures do not have the held messages yet; the settle waits for them.
    let delete = BrokerAction::DeleteQueueIfEmpty {
        queue: "notes_queue_dlq".into(),
        policy: Some("msgpipe.notes_queue_dlq".into()),
    };
    let outcome = broker.execute(&vhost.name, &delete).await.expect("delete");
    assert!(
        matches!(outcome, ActionOutcome::Kept(QueueDepth { messages: 2, .. })),
        "{outcome:?}"
    );
    get_json(&path);
}

#[tokio::test]
async fn a_user_without_the_policymaker_tag_is_refused_naming_the_tag() {
    let vhost = TestVhost::new("broker-tags");
    let state = notes(&vhost.name, "");
    for (tags, missing) in [("management", "policymaker"), ("", "management")] {
        let user = format!(
            "msgpipe-{}-{}",
            if tags.is_empty() { "notag" } else { tags },
            std::process::id()
        );
        mgmt(
            "PUT",
            &format!("/users/{user}"),
            Some(serde_json::json!({"password": "pw-for-tags", "tags": tags})),
        );
        mgmt(
            "PUT",
            &format!("/permissions/{}/{user}", support::encode(&vhost.name)),
            Some(serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"})),
        );
        let endpoint = broker::BrokerEndpoint::new(
            &format!("amqp://{user}:pw-for-tags@127.0.0.1:5673/"),
            Some("http://127.0.0.1:15673"),
            None,
        )
        .expect("endpoint");
        let broker = RabbitBroker::new(endpoint, Duration::from_secs(10)).expect("client");
        let error = match broker.snapshot(&vhost.name).await {
            Err(error) => error,
            Ok(live) => {
                broker::reconcile(&broker, &state, &live)
                    .await
                    .expect_err("a policy write must be refused")
                    .error
            }
        };
        assert!(
            matches!(&error, BrokerError::MissingUserTag { tag, .. } if *tag == missing),
            "{tags:?}: {error:?}"
        );
        assert_eq!(error.condition_reason().as_str(), "BrokerAccessRefused");
        assert!(error.to_string().contains(missing), "{error}");
        assert!(!error.to_string().contains("pw-for-tags"), "{error}");
        broker.close().await;
        mgmt("DELETE", &format!("/users/{user}"), None);
    }
}

#[tokio::test]
async fn delete_policy_removes_empty_objects_and_keeps_a_dlq_holding_messages() {
    let vhost = TestVhost::new("broker-teardown");
    let broker = support::test_broker(&vhost.name);
    let state = notes(&vhost.name, "  deletionPolicy: Delete");
    converge(&broker, &state).await;
    let (_conn, channel) = amqp_channel(&vhost.name).await;
    publish(&channel, "notes_dlq_exchange", "anything", b"dead letter").await;

    let live = snapshot(&broker, &state).await;
    let report = broker::teardown(&broker, &state, &live)
        .await
        .expect("teardown");
    let lines = changes(&report);
    assert!(
        lines.contains(
            &"kept queue notes_queue_dlq: holds 1 messages (ready or unacknowledged)".to_string()
        ),
        "{lines:?}"
    );
    for deleted in [
        "deleted queue notes_queue",
        "deleted queue notes_queue.retry.1.1s",
        "deleted exchange notes",
        "deleted exchange notes_queue.retry",
    ] {
        assert!(
            lines.contains(&deleted.to_string()),
            "{deleted} missing from {lines:?}"
        );
    }
    assert_eq!(
        depth(&channel, "notes_queue_dlq").await,
        1,
        "the dead letter is still there"
    );
    // The DLX stays with the DLQ: it is how dead letters still arrive.
    get_json(&vhost.path("exchanges", "notes_dlq_exchange"));
    get_json(&vhost.path("policies", "msgpipe.notes_queue_dlq"));
}

#[tokio::test]
async fn delete_dry_run_prints_the_teardown_plan_and_changes_nothing() {
    let vhost = TestVhost::new("broker-delete-dry");
    let broker = support::test_broker(&vhost.name);
    let state = notes(
        &vhost.name,
        "  deletionPolicy: Delete\n  retry: { maxAttempts: 2, backoff: { initialDelay: 1s, multiplier: 2, maxDelay: 1m } }",
    );
    converge(&broker, &state).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = dir.path().join("notes.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: msgpipe.io/v1alpha1\nkind: MessagePipeline\nmetadata: {{ name: notes, namespace: notes-app }}\nspec:\n  broker: {{ secretRef: {{ name: rabbitmq }}, vhost: \"{}\" }}\n  queue: {{ name: notes_queue, exchange: notes, routingKey: notes }}\n  deadLetter: {{ exchange: notes_dlq_exchange, queue: notes_queue_dlq }}\n  deletionPolicy: Delete\n  retry: {{ maxAttempts: 2, backoff: {{ initialDelay: 1s, multiplier: 2, maxDelay: 1m }} }}\n",
            vhost.name
        ),
    )
    .expect("write");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_msgpipe"))
        .args(["delete", "--dry-run", "-f"])
        .arg(&manifest)
        .env("MSGPIPE_BROKER_URI", support::amqp_uri(&vhost.name))
        .env("MSGPIPE_MANAGEMENT_URI", "http://127.0.0.1:15673")
        .output()
        .expect("msgpipe runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "notes-app/notes: would unbind notes_queue.retry -> notes_queue.retry.1.1s (key \"1\")",
            "notes-app/notes: would delete queue notes_queue.retry.1.1s if empty and unused",
            "notes-app/notes: would delete exchange notes_queue.retry",
            "notes-app/notes: would unbind notes -> notes_queue (key \"notes\")",
            "notes-app/notes: would delete queue notes_queue if empty and unused",
            "notes-app/notes: would delete exchange notes",
            "notes-app/notes: would delete queue notes_queue_dlq if empty and unused",
            "notes-app/notes: would delete exchange notes_dlq_exchange",
        ]
    );
    // Nothing changed: the next converge has nothing to do.
    assert!(converge(&broker, &state).await.changes.is_empty());
}

#[tokio::test]
async fn a_retried_message_returns_after_its_tier_delay_and_only_to_its_own_queue() {
    let vhost = TestVhost::new("broker-flow-retry");
    let broker = support::test_broker(&vhost.name);
    converge(&broker, &notes(&vhost.name, "  retry: { maxAttempts: 3, backoff: { initialDelay: 1s, multiplier: 2, maxDelay: 1m } }")).await;
    let (_conn, channel) = amqp_channel(&vhost.name).await;
    // Another queue bound to the work exchange with the same key must not get retries.
    channel
        .queue_declare(
            "bystander".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
    channel
        .queue_bind(
            "bystander".into(),
            "notes".into(),
            "notes".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");

    let mut consumer = channel
        .basic_consume(
            "notes_queue".into(),
            "test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let sent = Instant::now();
    publish(&channel, "notes_queue.retry", "2", b"retry me").await;
    use futures_util::StreamExt;
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("the message comes back")
        .expect("stream open")
        .expect("delivery");
    let waited = sent.elapsed();
    assert_eq!(delivery.data, b"retry me");
    assert!(
        waited >= Duration::from_millis(1600) && waited <= Duration::from_millis(2400),
        "tier 2 waits 2s ±20%, waited {waited:?}"
    );
    assert_eq!(depth(&channel, "bystander").await, 0);
}

#[tokio::test]
async fn a_message_rejected_without_requeue_lands_in_the_dlq() {
    let vhost = TestVhost::new("broker-flow-reject");
    let broker = support::test_broker(&vhost.name);
    converge(&broker, &notes(&vhost.name, "")).await;
    let (_conn, channel) = amqp_channel(&vhost.name).await;
    publish(&channel, "notes", "notes", b"bad note").await;
    support::reject_head(&channel, "notes_queue").await;
    let start = Instant::now();
    while depth(&channel, "notes_queue_dlq").await < 1 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "dead letter never arrived"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(depth(&channel, "notes_queue").await, 0);
}

#[tokio::test]
async fn a_quorum_work_queue_dead_letters_after_its_delivery_limit() {
    let vhost = TestVhost::new("broker-flow-limit");
    let broker = support::test_broker(&vhost.name);
    converge(&broker, &notes(&vhost.name, "  retry: { maxAttempts: 3 }")).await;
    let (_conn, channel) = amqp_channel(&vhost.name).await;
    publish(&channel, "notes", "notes", b"poison").await;
    // A consumer that crashes on this message: every delivery is returned to the queue.
    let mut deliveries = 0;
    let start = Instant::now();
    while depth(&channel, "notes_queue_dlq").await == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never dead-lettered after {deliveries} deliveries"
        );
        if let Some(message) = channel
            .basic_get("notes_queue".into(), BasicGetOptions::default())
            .await
            .expect("get")
        {
            deliveries += 1;
            // reject, not nack: RabbitMQ 4.3 does not count a requeueing nack toward the
            // delivery limit (4.0 and 3.x count both).
            message
                .delivery
                .acker
                .reject(lapin::options::BasicRejectOptions { requeue: true })
                .await
                .expect("reject");
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(
        (3..=4).contains(&deliveries),
        "delivery limit 3, dead-lettered after {deliveries} deliveries"
    );
}

#[tokio::test]
async fn broker_errors_are_typed_and_never_show_the_password() {
    let vhost = TestVhost::new("broker-errors");
    let state = notes(&vhost.name, "");
    let secret = "s3cret-Pa55";
    type IsExpected = fn(&BrokerError) -> bool;
    let cases: Vec<(String, Option<&str>, IsExpected)> = vec![
        (
            format!("amqp://guest:{secret}@127.0.0.1:5673/"),
            Some("http://127.0.0.1:15673"),
            |e| matches!(e, BrokerError::AuthenticationFailed { .. }),
        ),
        (
            format!("amqp://guest:{secret}@127.0.0.1:1/"),
            Some("http://127.0.0.1:2"),
            |e| matches!(e, BrokerError::Unreachable { .. }),
        ),
        (
            format!("amqp://guest:{secret}@127.0.0.1:5673/"),
            Some("http://127.0.0.1:2"),
            |e| matches!(e, BrokerError::ManagementUnavailable { .. }),
        ),
    ];
    for (uri, management, expected) in cases {
        let endpoint =
            msgpipe::broker::BrokerEndpoint::new(&uri, management, None).expect("endpoint");
        let broker = RabbitBroker::new(endpoint, Duration::from_secs(5)).expect("client");
        let error = broker
            .snapshot(&state.topology.vhost)
            .await
            .expect_err("must fail");
        assert!(expected(&error), "{uri}: unexpected {error:?}");
        assert!(
            !error.to_string().contains(secret) && !format!("{error:?}").contains(secret),
            "{error}"
        );
    }
    // Short passwords and credentials in managementUri never show either.
    for (uri, management) in [
        ("amqp://guest:Q7@127.0.0.1:5673/", "http://127.0.0.1:15673"),
        ("amqp://guest:Q7@127.0.0.1:1/", "http://127.0.0.1:2"),
        (
            "amqp://guest:guest@127.0.0.1:5673/",
            "http://admin:Mg-Secret@127.0.0.1:2",
        ),
        (
            "amqp://guest:Q7@127.0.0.1:5673/",
            "http://guest:Q7@127.0.0.1:2",
        ),
    ] {
        let endpoint =
            msgpipe::broker::BrokerEndpoint::new(uri, Some(management), None).expect("endpoint");
        let shown = format!("{endpoint:?} {endpoint}");
        let broker = RabbitBroker::new(endpoint, Duration::from_secs(5)).expect("client");
        let error = broker
            .snapshot(&state.topology.vhost)
            .await
            .expect_err("must fail");
        let printed = format!("{error} {error:?} {shown}");
        for secret in ["Q7", "Mg-Secret"] {
            assert!(!printed.contains(secret), "{uri} {management}: {printed}");
        }
    }
    let broker = support::test_broker(&vhost.name);
    let error = broker
        .snapshot("no-such-vhost")
        .await
        .expect_err("missing vhost");
    assert!(
        matches!(error, BrokerError::VhostNotFound { .. }),
        "{error:?}"
    );
}

/// Rebuilds `state`'s retry tiers the way msgpipe made them before a tier's settings became
/// its declare arguments: `<queue>.retry.<n>`, declared with its type only, and a policy
/// each. Returns the old tiers' names.
fn tiers_made_with_policies(vhost: &TestVhost, state: &DesiredState, major: u32) -> Vec<String> {
    let names = &state.names;
    let mut old_tiers = Vec::new();
    for (tier, queue) in state.retry_tiers.iter().zip(
        state
            .topology
            .queues
            .iter()
            .filter(|q| !q.arguments.is_empty()),
    ) {
        mgmt("DELETE", &vhost.path("queues", &queue.name), None);
        let old = format!("{}.retry.{}", names.queue, tier.index);
        mgmt(
            "PUT",
            &vhost.path("policies", &format!("msgpipe.{old}")),
            Some(serde_json::json!({
                "pattern": format!("^{}$", msgpipe::plan::topology::regex_escape(&old)),
                "apply-to": "queues",
                "priority": 10,
                "definition": queue.arguments.for_server(major).to_map(),
            })),
        );
        mgmt(
            "PUT",
            &vhost.path("queues", &old),
            Some(serde_json::json!({"durable": true, "arguments": {"x-queue-type": "quorum"}})),
        );
        mgmt(
            "POST",
            &format!(
                "/bindings/{}/e/{}/q/{}",
                support::encode(&vhost.name),
                support::encode(&names.retry_exchange),
                support::encode(&old)
            ),
            Some(serde_json::json!({"routing_key": tier.routing_key()})),
        );
        old_tiers.push(old);
    }
    old_tiers
}

/// Upgrading a vhost whose tiers were made with policies, under load: a consumer keeps
/// failing every message twice (so each passes through tiers 1 and 2) while msgpipe swaps
/// the tiers. Messages already waiting in an old tier come back after their delay (its
/// policy stays until it is empty), new retries go to the new tiers, every message is
/// handled exactly once at its third attempt, none is dead-lettered, and the old tiers and
/// their policies go once empty.
#[tokio::test]
async fn a_running_consumer_loses_nothing_while_tiers_made_with_policies_drain() {
    use msgpipe_client::{Consumer, ConsumerOptions, HandlerError, LiveConfig};
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    let vhost = TestVhost::new("broker-migrate");
    let broker = support::test_broker(&vhost.name);
    let state = notes(
        &vhost.name,
        "  retry: { maxAttempts: 4, backoff: { initialDelay: 1s, multiplier: 2, maxDelay: 1m } }",
    );
    converge(&broker, &state).await;
    let major = broker.server_major().await.expect("server version");
    let old_tiers = tiers_made_with_policies(&vhost, &state, major);
    assert_eq!(old_tiers.len(), 3);

    let mut options = ConsumerOptions::new(support::amqp_uri(&vhost.name));
    options.prefetch = 50;
    options.concurrency = 16;
    let consumer =
        Consumer::new(options, LiveConfig::fixed(state.client_config.clone())).expect("consumer");
    let stop = consumer.shutdown_handle();
    // (message id, attempt) of every successful handling; every tier a message came back from.
    let handled: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let tiers_left: Arc<Mutex<Vec<String>>> = Arc::default();
    let (seen, waited_in) = (handled.clone(), tiers_left.clone());
    let running = tokio::spawn(consumer.run(move |message| {
        let (seen, waits) = (seen.clone(), waited_in.clone());
        async move {
            let waited = expired_from(message.properties());
            let id = message.message_id().unwrap_or_default().to_string();
            waits.lock().expect("waits").extend(waited);
            if message.attempt() < 3 {
                return Err(HandlerError::retryable("not yet"));
            }
            seen.lock().expect("handled").push((id, message.attempt()));
            Ok(())
        }
    }));

    let (_conn, channel) = amqp_channel(&vhost.name).await;
    let send = async |ids: std::ops::Range<u32>| {
        for i in ids {
            let properties = lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(format!("m-{i:03}").into());
            support::publish_with(&channel, "notes", "notes", b"note", properties).await;
        }
    };
    send(0..60).await;
    // Some messages wait in the old tiers when the tiers are swapped (exact depths: the
    // management figures lag behind a 1 s tier).
    let start = Instant::now();
    loop {
        let mut waiting = 0;
        for queue in &old_tiers {
            waiting += depth(&channel, queue).await;
        }
        if waiting > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no message reached an old tier"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let swapped = changes(&converge(&broker, &state).await);
    for tier in &state.retry_tiers {
        let new = state.names.retry_queue(tier);
        assert!(
            swapped.contains(&format!("created queue {new}")),
            "{new}: {swapped:?}"
        );
    }
    assert!(
        !swapped.iter().any(|c| c.contains("policy")),
        "no policy is written: {swapped:?}"
    );
    send(60..90).await;

    let start = Instant::now();
    while handled.lock().expect("handled").len() < 90 {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "only {} of 90 handled",
            handled.lock().expect("handled").len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Duplicates would show up now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(30), running).await;

    let handled = handled.lock().expect("handled").clone();
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    for (id, attempt) in &handled {
        *per_id.entry(id.as_str()).or_default() += 1;
        assert_eq!(*attempt, 3, "{id} handled at attempt {attempt}");
    }
    assert_eq!(per_id.len(), 90, "every message handled");
    assert!(
        per_id.values().all(|n| *n == 1),
        "a message handled twice: {per_id:?}"
    );
    assert_eq!(
        depth(&channel, "notes_queue_dlq").await,
        0,
        "nothing dead-lettered"
    );
    let tiers_left = tiers_left.lock().expect("waits").clone();
    let via_old = tiers_left.iter().filter(|q| old_tiers.contains(q)).count();
    let via_new = tiers_left.len() - via_old;
    println!("{via_old} returns from an old tier, {via_new} from a new one");
    assert!(via_old > 0, "some waited in an old tier: {tiers_left:?}");
    assert!(via_new > 0, "some waited in a new tier: {tiers_left:?}");

    // The old tiers and their policies go once the figures show them empty.
    let start = Instant::now();
    loop {
        converge(&broker, &state).await;
        let left: Vec<&String> = old_tiers
            .iter()
            .filter(|q| {
                let url = format!("{}{}", support::MGMT_URL, vhost.path("queues", q));
                support::http("GET", &url, None, true).0 != 404
            })
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "old tiers never deleted: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for old in &old_tiers {
        let url = format!(
            "{}{}",
            support::MGMT_URL,
            vhost.path("policies", &format!("msgpipe.{old}"))
        );
        assert_eq!(
            support::http("GET", &url, None, true).0,
            404,
            "{old}'s policy"
        );
    }
    assert!(!converge(&broker, &state).await.wrote());
}

/// The queues a message expired from (its `x-death` entries with reason `expired`).
fn expired_from(properties: &lapin::BasicProperties) -> Vec<String> {
    use lapin::types::AMQPValue;
    let Some(headers) = properties.headers() else {
        return Vec::new();
    };
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        return Vec::new();
    };
    deaths
        .as_slice()
        .iter()
        .filter_map(|death| match death {
            AMQPValue::FieldTable(table) => {
                let text = |key: &str| match table.inner().get(key) {
                    Some(AMQPValue::LongString(s)) => Some(s.to_string()),
                    _ => None,
                };
                (text("reason").as_deref() == Some("expired")).then(|| text("queue"))?
            }
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn an_idle_amqp_connection_is_closed_at_the_next_snapshot_and_reopened_when_needed() {
    let vhost = TestVhost::new("broker-amqp-idle");
    let state = notes(&vhost.name, "");
    let endpoint = msgpipe::broker::BrokerEndpoint::new(
        &support::amqp_uri(&vhost.name),
        Some(&format!(
            "http://127.0.0.1:{}",
            u32::from(support::shared_port()) + 10000
        )),
        None,
    )
    .expect("test endpoint");
    // Calls of at most 3 s: a connection unused for 6 s (twice that) may go.
    let broker = RabbitBroker::new(endpoint, Duration::from_secs(3))
        .expect("client")
        .with_amqp_idle(Duration::from_millis(500));
    converge(&broker, &state).await;
    assert_eq!(
        broker.amqp_connections().await,
        1,
        "the declares' connection"
    );
    // Still in use: kept.
    snapshot(&broker, &state).await;
    assert_eq!(broker.amqp_connections().await, 1);
    tokio::time::sleep(Duration::from_millis(6300)).await;
    let live = snapshot(&broker, &state).await;
    assert_eq!(broker.amqp_connections().await, 0, "closed once idle");
    assert!(live.queues.contains_key("notes_queue"));
    // The next declare opens a new one and works.
    let queue = &state.topology.queues[0];
    let outcome = broker
        .execute(
            &state.topology.vhost,
            &BrokerAction::DeclareQueue(queue.clone()),
        )
        .await
        .expect("declare after the close");
    assert_eq!(broker.amqp_connections().await, 1);
    assert!(matches!(outcome, ActionOutcome::Done), "{outcome:?}");
}
