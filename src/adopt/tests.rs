//! The import over fixture vhosts built with the inventory's typed builders.

use serde_json::{Map, Value, json};

use super::*;
use crate::api::load::parse_pipelines;
use crate::api::{Duration, QueueType};
use crate::broker::BINDING_MARKER;
use crate::broker::diff::policy_definition;
use crate::broker::inventory::{InventoryQueue, VhostInventory};
use crate::plan::{DesiredState, plan};

/// A vhost as applications build it: `orders` with its DLX set in code and two retry queues
/// of their own naming; `payments` whose dead-letter settings come from a hand-made policy.
fn legacy_vhost() -> VhostInventory {
    let back_to = |queue: &str, ttl: u64| {
        InventoryQueue::quorum()
            .arg("x-message-ttl", ttl)
            .arg("x-dead-letter-exchange", "")
            .arg("x-dead-letter-routing-key", queue)
    };
    VhostInventory::new("legacy", "4.3.6")
        .exchange("orders", "direct")
        .exchange("orders.dlx", "fanout")
        .exchange("audit", "topic")
        .exchange("payments", "direct")
        .exchange("payments.dead", "fanout")
        .queue(
            "orders",
            InventoryQueue::quorum()
                .arg("x-dead-letter-exchange", "orders.dlx")
                .arg("x-delivery-limit", 5)
                .messages(12)
                .consumers(1),
        )
        .queue("orders.wait.5s", back_to("orders", 5_000).messages(2))
        .queue("orders.wait.30s", back_to("orders", 30_000))
        .queue("orders.dlq", InventoryQueue::quorum().messages(3))
        .queue("payments", InventoryQueue::classic())
        .queue("payments.dead", InventoryQueue::classic())
        .bind("orders", "orders", "orders")
        .bind("audit", "orders", "orders.#")
        .bind("orders.dlx", "orders.dlq", "")
        .bind("payments", "payments", "pay")
        .bind("payments.dead", "payments.dead", "")
        .policy(
            "dlq-retention",
            r"\.dlq$",
            1,
            &[("message-ttl", json!(1_209_600_000))],
        )
        .policy(
            "payments-all",
            "^payments",
            2,
            &[
                ("dead-letter-exchange", json!("payments.dead")),
                ("max-length", json!(50_000)),
            ],
        )
}

fn import_all(inventory: &VhostInventory) -> Import {
    import(inventory, &ImportOptions::default())
}

fn pipeline<'a>(import: &'a Import, queue: &str) -> &'a ImportedPipeline {
    import
        .pipelines
        .iter()
        .find(|p| p.queue == queue)
        .unwrap_or_else(|| panic!("no pipeline for {queue}: {import:#?}"))
}

fn warnings(pipeline: &ImportedPipeline) -> Vec<&str> {
    pipeline.unexpressed().map(|f| f.text.as_str()).collect()
}

fn has_warning(pipeline: &ImportedPipeline, needle: &str) -> bool {
    warnings(pipeline).iter().any(|w| w.contains(needle))
}

#[test]
fn work_queues_are_found_and_tiers_and_dlqs_are_not_pipelines_of_their_own() {
    let imported = import_all(&legacy_vhost());
    let queues: Vec<&str> = imported
        .pipelines
        .iter()
        .map(|p| p.queue.as_str())
        .collect();
    assert_eq!(queues, ["orders", "payments"]);
    assert!(imported.skipped.is_empty(), "{:?}", imported.skipped);
}

#[test]
fn retry_tiers_are_recognised_by_their_settings_whatever_their_names() {
    let imported = import_all(&legacy_vhost());
    let orders = pipeline(&imported, "orders");
    assert_eq!(orders.retry_queues, ["orders.wait.5s", "orders.wait.30s"]);
    let retry = &orders.pipeline.spec.retry;
    assert_eq!(retry.backoff.initial_delay, Duration::from_secs(5));
    assert_eq!(retry.backoff.multiplier, 6.0);
    assert_eq!(retry.backoff.max_delay, Duration::from_secs(30));
    // The delivery limit is maxAttempts: msgpipe sets delivery-limit = maxAttempts.
    assert_eq!(retry.max_attempts, 5);
    // Renamed: the tiers do not follow the orders.wait.* names, and nothing in them says so.
    let renamed = legacy_vhost().queue(
        "zz-delay-a",
        InventoryQueue::quorum()
            .arg("x-message-ttl", 60_000)
            .arg("x-dead-letter-exchange", "")
            .arg("x-dead-letter-routing-key", "orders"),
    );
    let orders = import_all(&renamed).pipelines.remove(0);
    assert_eq!(
        orders.retry_queues,
        ["orders.wait.5s", "orders.wait.30s", "zz-delay-a"]
    );
    assert_eq!(
        orders.pipeline.spec.retry.backoff.max_delay,
        Duration::from_secs(60)
    );
}

#[test]
fn legacy_tier_names_are_reported_as_left_behind_by_adoption() {
    let imported = import_all(&legacy_vhost());
    let orders = pipeline(&imported, "orders");
    assert!(
        has_warning(
            orders,
            "retry queues orders.wait.5s, orders.wait.30s are not msgpipe's names"
        ),
        "{:#?}",
        warnings(orders)
    );
    assert!(has_warning(orders, "orders.retry.1.5s, orders.retry.2.30s"));
    assert!(has_warning(orders, "the legacy ones stay as they are"));
    // What apply would do: msgpipe's own tiers, and no delete of anything.
    let adoption: Vec<&str> = orders
        .findings
        .iter()
        .filter(|f| f.kind == FindingKind::Adoption)
        .map(|f| f.text.as_str())
        .collect();
    assert!(
        adoption.contains(&"msgpipe apply would create queue orders.retry.1.5s (quorum)"),
        "{adoption:#?}"
    );
    assert!(
        !adoption
            .iter()
            .any(|a| a.contains("delete") || a.contains("unbind")),
        "{adoption:#?}"
    );
}

#[test]
fn a_queue_bound_to_several_exchanges_is_reported_and_the_direct_route_taken() {
    let imported = import_all(&legacy_vhost());
    let orders = pipeline(&imported, "orders");
    assert_eq!(
        orders.pipeline.spec.queue.exchange.as_deref(),
        Some("orders")
    );
    assert_eq!(
        orders.pipeline.spec.queue.routing_key.as_deref(),
        Some("orders")
    );
    assert!(
        has_warning(
            orders,
            "orders is bound to several exchanges (audit, orders)"
        ),
        "{:#?}",
        warnings(orders)
    );
    assert!(has_warning(
        orders,
        "binding audit (topic) -> orders with key \"orders.#\" is not in the spec"
    ));
}

#[test]
fn a_queue_reached_only_through_a_headers_exchange_keeps_the_default_work_exchange() {
    let inventory = VhostInventory::new("/", "4.0.5")
        .exchange("by-header", "headers")
        .queue("invoices", InventoryQueue::quorum())
        .bind_with(
            "by-header",
            "invoices",
            "",
            Map::from_iter([
                ("x-match".to_string(), json!("all")),
                ("kind".into(), json!("invoice")),
            ]),
        );
    let imported = import_all(&inventory);
    let invoices = pipeline(&imported, "invoices");
    assert_eq!(invoices.pipeline.spec.queue.exchange, None);
    assert!(
        has_warning(invoices, "this one is headers"),
        "{:#?}",
        warnings(invoices)
    );
    assert!(has_warning(
        invoices,
        "the spec keeps the default work exchange invoices.work"
    ));
}

#[test]
fn dead_letter_settings_come_from_arguments_and_the_effective_policy() {
    let imported = import_all(&legacy_vhost());
    let orders = &pipeline(&imported, "orders").pipeline.spec.dead_letter;
    assert_eq!(orders.exchange.as_deref(), Some("orders.dlx"));
    assert_eq!(orders.queue.as_deref(), Some("orders.dlq"));
    assert_eq!(orders.retention, Some(Duration::from_millis(1_209_600_000)));
    let payments = pipeline(&imported, "payments");
    let spec = &payments.pipeline.spec;
    assert_eq!(spec.dead_letter.exchange.as_deref(), Some("payments.dead"));
    assert_eq!(spec.dead_letter.queue.as_deref(), Some("payments.dead"));
    assert_eq!(spec.queue.max_length, Some(50_000));
    assert_eq!(spec.queue.queue_type, QueueType::Classic);
    assert!(
        payments
            .findings
            .iter()
            .any(|f| f.text == "deadLetter.exchange payments.dead: dead-letter exchange of payments (policy payments-all)"),
        "{:#?}",
        payments.findings
    );
}

#[test]
fn a_policy_matching_many_queues_is_reported() {
    let imported = import_all(&legacy_vhost());
    let payments = pipeline(&imported, "payments");
    assert!(
        has_warning(
            payments,
            "policy payments-all (pattern \"^payments\", priority 2) applies to 2 queues (payments, payments.dead)"
        ),
        "{:#?}",
        warnings(payments)
    );
    // Its max-length also applies to the DLQ, where the spec takes it as deadLetter.maxLength.
    assert_eq!(payments.pipeline.spec.dead_letter.max_length, Some(50_000));
}

#[test]
fn delays_off_a_geometric_series_are_listed_exactly_in_a_warning() {
    let mut inventory = VhostInventory::new("/", "4.3.6").queue("jobs", InventoryQueue::classic());
    for (name, ttl) in [
        ("jobs.r1", 1_000),
        ("jobs.r2", 3_000),
        ("jobs.r3", 10_000),
        ("jobs.r4", 30_000),
    ] {
        inventory = inventory.queue(
            name,
            InventoryQueue::classic()
                .arg("x-message-ttl", ttl)
                .arg("x-dead-letter-exchange", "")
                .arg("x-dead-letter-routing-key", "jobs"),
        );
    }
    let imported = import_all(&inventory);
    let jobs = pipeline(&imported, "jobs");
    assert_eq!(
        jobs.pipeline.spec.retry.max_attempts, 5,
        "4 tiers + the first delivery"
    );
    assert!(
        has_warning(
            jobs,
            "the live retry delays 1s, 3s, 10s, 30s are not a geometric series"
        ),
        "{:#?}",
        warnings(jobs)
    );
}

#[test]
fn a_quorum_queue_without_limit_or_tiers_keeps_rabbitmq4s_cap_and_says_so() {
    let inventory = VhostInventory::new("/", "4.3.6").queue("plain", InventoryQueue::quorum());
    let imported = import_all(&inventory);
    let plain = pipeline(&imported, "plain");
    assert_eq!(plain.pipeline.spec.retry.max_attempts, 20);
    assert!(
        has_warning(plain, "RabbitMQ 4's default delivery limit of 20"),
        "{:#?}",
        warnings(plain)
    );
    let classic = VhostInventory::new("/", "3.10.8").queue("plain", InventoryQueue::classic());
    assert_eq!(
        import_all(&classic).pipelines[0]
            .pipeline
            .spec
            .retry
            .max_attempts,
        1
    );
}

#[test]
fn arguments_msgpipe_does_not_model_are_reported_per_queue() {
    let inventory = VhostInventory::new("/", "4.3.6")
        .queue(
            "reports",
            InventoryQueue::classic()
                .arg("x-max-priority", 10)
                .arg("x-message-ttl", 60_000),
        )
        .policy("ha", "^reports$", 0, &[("expires", json!(3_600_000))]);
    let imported = import_all(&inventory);
    let reports = pipeline(&imported, "reports");
    for needle in [
        "work queue reports: max-priority = 10 is not modelled by msgpipe (a declare argument",
        "work queue reports: message-ttl = 60000 is not modelled",
        "work queue reports: expires = 3600000 is not modelled by msgpipe (from policy ha",
    ] {
        assert!(
            has_warning(reports, needle),
            "{needle}: {:#?}",
            warnings(reports)
        );
    }
}

#[test]
fn queues_msgpipe_cannot_manage_are_skipped_with_a_reason() {
    let mut stream = InventoryQueue::new("stream");
    stream.durable = true;
    let mut transient = InventoryQueue::classic();
    transient.durable = false;
    let inventory = VhostInventory::new("/", "4.3.6")
        .queue("amq.gen-abc", InventoryQueue::classic().exclusive())
        .queue("events", stream)
        .queue("scratch", transient)
        .queue("mine", InventoryQueue::classic().exclusive());
    let imported = import_all(&inventory);
    assert!(imported.pipelines.is_empty());
    let reasons: Vec<&str> = imported.skipped.iter().map(|f| f.text.as_str()).collect();
    assert_eq!(reasons.len(), 4, "{reasons:#?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("queue events skipped: a stream"))
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("queue mine skipped: exclusive"))
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("queue scratch skipped: transient"))
    );
}

#[test]
fn the_queue_filter_selects_work_queues_and_their_tiers_come_along() {
    let options = ImportOptions {
        queue_filter: Some(regex::Regex::new("^ord").expect("regex")),
        namespace: "shop".into(),
        secret_ref: "rabbit".into(),
        broker_ref: None,
        alerts: true,
    };
    let imported = import(&legacy_vhost(), &options);
    assert_eq!(imported.pipelines.len(), 1);
    let orders = &imported.pipelines[0];
    assert_eq!(orders.retry_queues.len(), 2);
    let p = &orders.pipeline;
    assert_eq!(p.metadata.namespace.as_deref(), Some("shop"));
    assert_eq!(
        p.spec.broker.secret_ref.as_ref().map(|s| s.name.as_str()),
        Some("rabbit")
    );
    let brokered = import(
        &legacy_vhost(),
        &ImportOptions {
            broker_ref: Some("shared".into()),
            ..options
        },
    );
    let spec = &brokered.pipelines[0].pipeline.spec.broker;
    assert_eq!(
        spec.broker_ref.as_ref().map(|b| b.name.as_str()),
        Some("shared")
    );
    assert!(spec.secret_ref.is_none());
    assert_eq!(p.spec.broker.vhost.as_deref(), Some("legacy"));
    assert!(p.spec.alerts.enabled);
    assert!(
        !import_all(&legacy_vhost()).pipelines[0]
            .pipeline
            .spec
            .alerts
            .enabled
    );
}

#[test]
fn a_dlq_shared_by_two_queues_is_claimed_by_one_pipeline_only() {
    let inventory = VhostInventory::new("/", "4.3.6")
        .exchange("dead", "fanout")
        .queue(
            "a",
            InventoryQueue::quorum().arg("x-dead-letter-exchange", "dead"),
        )
        .queue(
            "b",
            InventoryQueue::quorum().arg("x-dead-letter-exchange", "dead"),
        )
        .queue("graveyard", InventoryQueue::quorum())
        .bind("dead", "graveyard", "");
    let imported = import_all(&inventory);
    let a = pipeline(&imported, "a");
    let b = pipeline(&imported, "b");
    assert_eq!(
        a.pipeline.spec.dead_letter.queue.as_deref(),
        Some("graveyard")
    );
    assert_eq!(b.pipeline.spec.dead_letter.queue, None);
    assert_eq!(b.pipeline.spec.dead_letter.exchange, None);
    assert!(
        has_warning(b, "dead-letter exchange dead is shared with a"),
        "{:#?}",
        warnings(b)
    );
}

/// What `msgpipe apply` leaves on a vhost for `state`: its exchanges, queues (tier
/// arguments included), marked bindings and policies.
fn provisioned(state: &DesiredState, server_version: &str) -> VhostInventory {
    let mut inventory = VhostInventory::new(&state.topology.vhost, server_version);
    let major = inventory.server_major();
    for exchange in &state.topology.exchanges {
        inventory = inventory.exchange(&exchange.name, exchange.kind.as_str());
    }
    for queue in &state.topology.queues {
        let mut live = InventoryQueue::new(queue.queue_type.as_str());
        for (key, value) in queue.arguments.for_server(major).declare_arguments() {
            live = live.arg(&key, value);
        }
        inventory = inventory.queue(&queue.name, live);
    }
    for binding in &state.topology.bindings {
        let marker = Map::from_iter([(BINDING_MARKER.to_string(), Value::Bool(true))]);
        inventory = inventory.bind_with(
            &binding.source,
            &binding.destination,
            &binding.routing_key,
            marker,
        );
    }
    for policy in &state.topology.policies {
        let definition = policy_definition(&policy.definition, major);
        let keys: Vec<(&str, Value)> = definition
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        inventory = inventory.policy(
            &policy.name,
            &policy.pattern,
            i64::from(policy.priority),
            &keys,
        );
    }
    inventory
}

fn notes(extra: &str) -> DesiredState {
    let queue = if extra.contains("  queue:") {
        ""
    } else {
        "  queue: {name: notes_queue, exchange: notes, routingKey: notes, maxLength: 1000}\n"
    };
    let yaml = format!(
        "apiVersion: msgpipe.io/v1alpha1\nkind: MessagePipeline\nmetadata: {{name: notes, namespace: notes-app}}\nspec:\n  broker: {{secretRef: {{name: rabbitmq-admin}}, vhost: v}}\n{queue}  deadLetter: {{exchange: notes_dlq_exchange, queue: notes_queue_dlq, retention: 14d, maxLength: 500}}\n{extra}"
    );
    let pipeline = parse_pipelines(&yaml).expect("parses").remove(0);
    plan(&pipeline, None).expect("plans")
}

#[test]
fn what_msgpipe_provisioned_imports_back_to_the_same_topology_with_nothing_to_change() {
    for (extra, server) in [
        ("", "4.3.6"),
        ("", "3.10.8"),
        (
            "  retry: {maxAttempts: 8, backoff: {initialDelay: 500ms, multiplier: 3, maxDelay: 20s}}\n",
            "4.0.5",
        ),
        (
            "  queue: {name: notes_queue, type: classic, exchange: notes, routingKey: notes}\n  retry: {maxAttempts: 4}\n",
            "4.3.6",
        ),
        ("  retry: {maxAttempts: 1}\n", "4.3.6"),
    ] {
        let original = notes(extra);
        let vhost = provisioned(&original, server);
        let imported = import_all(&vhost);
        assert_eq!(imported.pipelines.len(), 1, "{extra}: {imported:#?}");
        let back = &imported.pipelines[0];
        assert!(
            warnings(back).is_empty(),
            "{extra} on {server}: {:#?}",
            warnings(back)
        );
        let replanned = plan(&back.pipeline, None).expect("imported spec plans");
        assert_eq!(replanned.topology, original.topology, "{extra} on {server}");
        assert!(
            back.findings
                .iter()
                .any(|f| f.text.contains("would change nothing")),
            "{extra} on {server}: {:#?}",
            back.findings
        );
        assert!(
            back.findings
                .iter()
                .any(|f| f.text.contains("already have msgpipe's names"))
                || original.retry_tiers.is_empty()
        );
    }
}

#[test]
fn yaml_output_reads_back_as_the_same_pipelines_and_marks_what_cannot_be_expressed() {
    let vhost = legacy_vhost().queue("odd\nname", InventoryQueue::classic());
    let imported = import_all(&vhost);
    let text = import_yaml(&imported).expect("yaml");
    let parsed = parse_pipelines(&text).expect("the output is valid pipeline YAML");
    assert_eq!(parsed.len(), imported.pipelines.len());
    for (read, written) in parsed.iter().zip(&imported.pipelines) {
        assert_eq!(read.spec, written.pipeline.spec);
        assert_eq!(read.metadata.name, written.pipeline.metadata.name);
        assert_eq!(read.metadata.namespace, written.pipeline.metadata.namespace);
    }
    assert!(
        text.contains("#   ! orders is bound to several exchanges"),
        "{text}"
    );
    assert!(
        text.contains("#   - retry.backoff initialDelay 5s, multiplier 6, maxDelay 30s"),
        "{text}"
    );
    assert!(
        text.contains("#   > msgpipe apply would create exchange orders.retry (direct)"),
        "{text}"
    );
    assert!(
        text.contains("odd\\nname"),
        "the newline is escaped in comments: {text}"
    );
    let json: Vec<Value> =
        serde_json::from_str(&import_json(&imported).expect("json")).expect("array");
    assert_eq!(json.len(), imported.pipelines.len());
    // A name with a control character cannot be a pipeline's: skipped, with the reason.
    assert_eq!(json[0]["spec"]["queue"]["name"], "orders");
    assert!(
        imported
            .skipped
            .iter()
            .any(|f| f.text.contains("control characters")),
        "{:#?}",
        imported.skipped
    );
}

#[test]
fn a_consumed_queue_with_a_ttl_is_a_work_queue_not_a_retry_tier() {
    // `orders` expires unprocessed messages into `orders.expired` through the default
    // exchange: the shape of a tier, but it has a consumer, so it is a work queue.
    let inventory = VhostInventory::new("/", "4.3.6")
        .queue(
            "orders",
            InventoryQueue::classic()
                .arg("x-message-ttl", 3_600_000)
                .arg("x-dead-letter-exchange", "")
                .arg("x-dead-letter-routing-key", "orders.expired")
                .consumers(2),
        )
        .queue("orders.expired", InventoryQueue::classic());
    let imported = import_all(&inventory);
    let queues: Vec<&str> = imported
        .pipelines
        .iter()
        .map(|p| p.queue.as_str())
        .collect();
    assert_eq!(queues, ["orders"]);
    let orders = &imported.pipelines[0];
    assert!(orders.retry_queues.is_empty());
    assert_eq!(orders.dead_letter_queue.as_deref(), Some("orders.expired"));
    assert!(
        has_warning(
            orders,
            "work queue orders: message-ttl = 3600000 is not modelled"
        ),
        "{:#?}",
        warnings(orders)
    );
    assert!(
        has_warning(orders, "orders dead-letters through the default exchange"),
        "{:#?}",
        warnings(orders)
    );
}

#[test]
fn settings_adoption_changes_and_arguments_that_beat_msgpipes_policy_are_named() {
    let imported = import_all(&legacy_vhost());
    let orders = pipeline(&imported, "orders");
    assert!(
        has_warning(
            orders,
            "adopting changes settings in effect on orders.dlq (the spec cannot keep them: msgpipe's policy msgpipe.orders.dlq sets them): delivery-limit unset (20 by RabbitMQ 4's default) -> -1, overflow unset -> \"reject-publish\""
        ),
        "{:#?}",
        warnings(orders)
    );
    // An argument that contradicts what msgpipe's policy would set keeps winning.
    let inventory = VhostInventory::new("/", "3.13.7")
        .exchange("work.dlx", "fanout")
        .queue(
            "work",
            InventoryQueue::classic()
                .arg("x-dead-letter-exchange", "work.dlx")
                .arg("x-overflow", "drop-head"),
        )
        .queue("work.dlq", InventoryQueue::classic())
        .bind("work.dlx", "work.dlq", "");
    let imported = import_all(&inventory);
    let work = pipeline(&imported, "work");
    assert!(
        has_warning(
            work,
            "x-overflow = \"drop-head\" is a declare argument of work and beats msgpipe's policy (overflow = \"reject-publish\")"
        ),
        "{:#?}",
        warnings(work)
    );
}

#[test]
fn a_retry_tier_whose_settings_come_from_a_policy_is_recognised_too() {
    let inventory = VhostInventory::new("/", "4.3.6")
        .exchange("orders", "direct")
        .exchange("orders.dlx", "fanout")
        .queue(
            "orders",
            InventoryQueue::quorum().arg("x-dead-letter-exchange", "orders.dlx"),
        )
        .queue("orders.dlq", InventoryQueue::quorum())
        .queue("orders.later", InventoryQueue::quorum())
        // A tier that returns through the work exchange, not the default one.
        .queue(
            "orders.much-later",
            InventoryQueue::quorum()
                .arg("x-message-ttl", 60_000)
                .arg("x-dead-letter-exchange", "orders")
                .arg("x-dead-letter-routing-key", "orders"),
        )
        .bind("orders", "orders", "orders")
        .bind("orders.dlx", "orders.dlq", "")
        .policy(
            "later",
            r"^orders\.later$",
            1,
            &[
                ("message-ttl", json!(10_000)),
                ("dead-letter-exchange", json!("")),
                ("dead-letter-routing-key", json!("orders")),
            ],
        );
    let imported = import_all(&inventory);
    let queues: Vec<&str> = imported
        .pipelines
        .iter()
        .map(|p| p.queue.as_str())
        .collect();
    assert_eq!(queues, ["orders"], "{imported:#?}");
    let orders = &imported.pipelines[0];
    assert_eq!(orders.retry_queues, ["orders.later", "orders.much-later"]);
    let backoff = &orders.pipeline.spec.retry.backoff;
    assert_eq!(
        (backoff.initial_delay, backoff.multiplier, backoff.max_delay),
        (Duration::from_secs(10), 6.0, Duration::from_secs(60))
    );
    assert!(
        has_warning(
            orders,
            "orders.much-later returns its messages through exchange orders"
        ),
        "{:#?}",
        warnings(orders)
    );
}

#[test]
fn a_binding_to_a_queue_missing_from_the_queue_list_is_ignored_not_a_panic() {
    // The four lists are read at once, not atomically: a queue deleted between them.
    let inventory = VhostInventory::new("/", "4.3.6")
        .exchange("dead", "fanout")
        .queue(
            "work",
            InventoryQueue::quorum().arg("x-dead-letter-exchange", "dead"),
        )
        .bind("dead", "deleted-meanwhile", "")
        .bind("dead", "work.dlq", "")
        .queue("work.dlq", InventoryQueue::quorum());
    let imported = import_all(&inventory);
    let work = pipeline(&imported, "work");
    assert_eq!(work.dead_letter_queue.as_deref(), Some("work.dlq"));
    assert!(
        !has_warning(work, "deleted-meanwhile"),
        "{:#?}",
        warnings(work)
    );
}
