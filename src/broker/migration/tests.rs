//! The migration planner, driven one step at a time on the in-memory broker: after every
//! single step the next one is planned again from the broker's state alone (what a run
//! killed after that step and started again does), and every intermediate state is checked.

use std::collections::BTreeMap;

use super::*;
use crate::api::load::parse_pipelines;
use crate::broker::migrate::{MigrationEvent, StepOutcome, migrate, run_step};
use crate::broker::{BrokerApi, MemoryBroker, diff, reconcile};
use crate::plan::plan;

fn notes(queue_type: QueueType) -> DesiredState {
    let mut p = parse_pipelines(include_str!("../../../examples/notes-pipeline.yaml"))
        .expect("parses")
        .remove(0);
    p.spec.queue.queue_type = queue_type;
    plan(&p, None).expect("plans")
}

/// A broker holding the notes pipeline of type `from`, converged, with messages waiting in
/// the work queue, the DLQ and every retry tier.
async fn loaded(from: QueueType) -> (MemoryBroker, DesiredState) {
    let old = notes(from);
    let vhost = old.topology.vhost.clone();
    let broker = MemoryBroker::new("memory://m").with_vhost(&vhost, 4);
    let live = broker.snapshot(&vhost).await.expect("vhost");
    reconcile(&broker, &old, &live).await.expect("converges");
    assert!(broker.set_messages(&vhost, &old.names.queue, 100));
    assert!(broker.set_messages(&vhost, &old.names.dead_letter_queue, 7));
    for tier in &old.retry_tiers {
        assert!(broker.set_messages(&vhost, &old.names.retry_queue(tier), 3));
    }
    (broker, old)
}

fn total(live: &LiveVhost) -> u64 {
    live.queues.values().map(|q| q.messages).sum()
}

fn routes(live: &LiveVhost, source: &str, key: &str) -> Vec<String> {
    live.bindings
        .keys()
        .filter(|b| b.source == source && b.routing_key == key)
        .map(|b| b.destination.clone())
        .collect()
}

/// What must hold in every state a migration passes through.
fn check_invariants(desired: &DesiredState, live: &LiveVhost, messages: u64, step: &str) {
    let names = &desired.names;
    assert_eq!(
        total(live),
        messages,
        "a message was lost or made after {step}"
    );
    // A publisher always has a route.
    let work = routes(live, &names.work_exchange, &names.routing_key);
    assert!(!work.is_empty(), "publishers had no route after {step}");
    let dlx = routes(live, &names.dead_letter_exchange, "");
    assert!(!dlx.is_empty(), "dead letters had no route after {step}");
    // A retry reaches one tier at most (never copied twice).
    for tier in &desired.retry_tiers {
        let to = routes(live, &names.retry_exchange, &tier.routing_key());
        assert!(
            to.len() <= 1,
            "retry key {} reaches {to:?} after {step}",
            tier.index
        );
    }
    // The hazard: a queue that dead-letters by name (a retry tier) always has its target,
    // unless it is empty and unrouted (nothing more can expire into nowhere).
    for (name, queue) in &live.queues {
        if let Some(target) = &queue.dead_letters_to {
            let routed = live.bindings.keys().any(|b| &b.destination == name);
            assert!(
                live.queues.contains_key(target) || (queue.messages == 0 && !routed),
                "{name} dead-letters to {target}, which does not exist, after {step}"
            );
        }
    }
}

/// Plans a stage, runs its steps one by one (checking the broker after each), and plans
/// again, until the planner has nothing left or `stop_after` steps ran (a kill); returns the
/// phases in the order they were seen and the number of steps run.
async fn walk(
    broker: &MemoryBroker,
    desired: &DesiredState,
    messages: u64,
    stop_after: Option<usize>,
) -> (Vec<MigrationPhase>, usize) {
    let vhost = desired.topology.vhost.as_str();
    let mut phases: Vec<MigrationPhase> = Vec::new();
    let mut steps = 0;
    let mut last = "the start".to_string();
    loop {
        let live = broker.snapshot(vhost).await.expect("vhost");
        check_invariants(desired, &live, messages, &last);
        let Some(plan) = plan_migration(desired, &live).expect("plans") else {
            break;
        };
        if phases.last() != Some(&plan.phase) {
            phases.push(plan.phase);
        }
        for step in &plan.steps {
            if stop_after == Some(steps) {
                return (phases, steps);
            }
            let outcome = run_step(broker, vhost, step, &mut |_| {})
                .await
                .expect("step runs");
            assert!(
                !matches!(outcome, StepOutcome::Kept { .. }),
                "{step} was kept"
            );
            last = step.to_string();
            steps += 1;
            let live = broker.snapshot(vhost).await.expect("vhost");
            check_invariants(desired, &live, messages, &last);
        }
        assert!(steps < 200, "the migration does not end (at {last})");
    }
    (phases, steps)
}

fn assert_migrated(desired: &DesiredState, live: &LiveVhost, messages: u64) {
    for queue in &desired.topology.queues {
        let found = live.queues.get(&queue.name).expect("queue exists");
        assert_eq!(
            found.queue_type,
            queue.queue_type.as_str(),
            "{}",
            queue.name
        );
    }
    let holding: Vec<&String> = live
        .queues
        .keys()
        .filter(|n| n.ends_with(HOLDING_SUFFIX))
        .collect();
    assert!(holding.is_empty(), "left behind: {holding:?}");
    assert_eq!(total(live), messages);
    let plan = diff::converge(desired, live);
    assert!(plan.conflicts.is_empty(), "{:?}", plan.conflicts);
    // Every route is back where the spec wants it, and no other.
    let bound: Vec<_> = live.bindings.keys().cloned().collect();
    for binding in &desired.topology.bindings {
        assert!(
            live.has_binding(&binding.source, &binding.destination, &binding.routing_key),
            "missing {binding:?} in {bound:?}"
        );
    }
    assert_eq!(bound.len(), desired.topology.bindings.len(), "{bound:?}");
}

#[tokio::test]
async fn classic_to_quorum_passes_every_stage_resumed_after_each_step_and_loses_nothing() {
    let (broker, _) = loaded(QueueType::Classic).await;
    let desired = notes(QueueType::Quorum);
    let vhost = desired.topology.vhost.clone();
    let before = total(&broker.snapshot(&vhost).await.expect("vhost"));
    let (phases, steps) = walk(&broker, &desired, before, None).await;
    assert_eq!(
        phases,
        [
            MigrationPhase::Holding,
            MigrationPhase::Draining,
            MigrationPhase::Replacing,
            MigrationPhase::Returning
        ]
    );
    let live = broker.snapshot(&vhost).await.expect("vhost");
    assert_migrated(&desired, &live, before);
    // The work queue got its own messages and every retry back; the DLQ its dead letters.
    assert_eq!(live.queues[&desired.names.queue].messages, 100 + 3 * 4);
    assert_eq!(live.queues[&desired.names.dead_letter_queue].messages, 7);
    assert!(steps > 20, "{steps} steps");
    // The planner is done: converging the rest writes policies only (the new type's keys
    // were written before each queue was declared, so not even those).
    assert_eq!(diff::converge(&desired, &live).actions, vec![]);
}

#[tokio::test]
async fn quorum_to_classic_the_same_way_back() {
    let (broker, _) = loaded(QueueType::Quorum).await;
    let desired = notes(QueueType::Classic);
    let vhost = desired.topology.vhost.clone();
    let before = total(&broker.snapshot(&vhost).await.expect("vhost"));
    let (phases, _) = walk(&broker, &desired, before, None).await;
    assert_eq!(phases.len(), 4, "{phases:?}");
    let live = broker.snapshot(&vhost).await.expect("vhost");
    assert_migrated(&desired, &live, before);
    assert_eq!(diff::converge(&desired, &live).actions, vec![]);
}

#[tokio::test]
async fn holding_queues_record_the_target_and_holding_tiers_return_to_the_holding_queue() {
    let (broker, old) = loaded(QueueType::Classic).await;
    let desired = notes(QueueType::Quorum);
    let live = broker.snapshot(&old.topology.vhost).await.expect("vhost");
    let plan = plan_migration(&desired, &live)
        .expect("plans")
        .expect("needed");
    assert_eq!(plan.phase, MigrationPhase::Holding);
    assert_eq!(plan.target, QueueType::Quorum);
    let declared: BTreeMap<String, Queue> = plan
        .steps
        .iter()
        .filter_map(|s| match s {
            MigrationStep::Broker(BrokerAction::DeclareQueue(q)) => {
                Some((q.name.clone(), q.clone()))
            }
            _ => None,
        })
        .collect();
    let work_holding = holding_name(&desired.names.queue);
    assert_eq!(declared.len(), desired.topology.queues.len());
    for queue in declared.values() {
        assert_eq!(
            queue.migrating_to,
            Some(QueueType::Quorum),
            "{}",
            queue.name
        );
        assert_eq!(queue.queue_type, QueueType::Quorum);
    }
    for tier in &desired.retry_tiers {
        let holding = &declared[&holding_name(&desired.names.retry_queue(tier))];
        assert_eq!(
            holding.arguments.dead_letter_routing_key.as_ref(),
            Some(&work_holding)
        );
        assert_eq!(holding.arguments.message_ttl, Some(tier.delay.as_millis()));
    }
    // The work queue's holding queue is declared first (the holding tiers return to it), and
    // the steps print as the CLI shows them.
    let first = plan.steps[0].to_string();
    assert_eq!(
        first,
        format!("create holding queue {work_holding} (quorum)")
    );
    // A publisher's route is doubled before the old one goes; a retry's never is.
    let text: Vec<String> = plan.steps.iter().map(ToString::to_string).collect();
    let bind_hold = text
        .iter()
        .position(|s| s.starts_with("bind notes -> notes_queue.migrating"))
        .expect("bind");
    let unbind_work = text
        .iter()
        .position(|s| s.starts_with("unbind notes -> notes_queue "))
        .expect("unbind");
    assert!(bind_hold < unbind_work, "{text:#?}");
    let unbind_tier = text
        .iter()
        .position(|s| s.starts_with("unbind notes_queue.retry -> notes_queue.retry.1.1s "))
        .expect("unbind tier");
    let bind_tier = text
        .iter()
        .position(|s| s.starts_with("bind notes_queue.retry -> notes_queue.retry.1.1s.migrating"))
        .expect("bind tier");
    assert!(unbind_tier < bind_tier, "{text:#?}");
}

#[tokio::test]
async fn the_work_queue_is_deleted_only_after_the_tiers_that_return_to_it() {
    let (broker, old) = loaded(QueueType::Classic).await;
    let desired = notes(QueueType::Quorum);
    let vhost = old.topology.vhost.clone();
    // Run the holding stage.
    let live = broker.snapshot(&vhost).await.expect("vhost");
    let plan = plan_migration(&desired, &live)
        .expect("plans")
        .expect("needed");
    for step in &plan.steps {
        run_step(&broker, &vhost, step, &mut |_| {})
            .await
            .expect("runs");
    }
    let live = broker.snapshot(&vhost).await.expect("vhost");
    let plan = plan_migration(&desired, &live)
        .expect("plans")
        .expect("needed");
    assert_eq!(plan.phase, MigrationPhase::Draining);
    let text: Vec<String> = plan.steps.iter().map(ToString::to_string).collect();
    let tiers: Vec<String> = old
        .retry_tiers
        .iter()
        .map(|t| old.names.retry_queue(t))
        .collect();
    assert_eq!(
        text[0],
        format!(
            "move every message of notes_queue into notes_queue.migrating until {} are empty",
            tiers.join(", ")
        )
    );
    let delete_tiers = text
        .iter()
        .position(|s| {
            *s == format!(
                "delete queues {} once they hold no message",
                tiers.join(", ")
            )
        })
        .expect("tiers deleted");
    let delete_work = text
        .iter()
        .position(|s| s == "delete queues notes_queue, notes_queue_dlq once they hold no message")
        .expect("work queue and DLQ deleted");
    assert!(delete_tiers < delete_work, "{text:#?}");
    // A drained queue that still holds a message is kept, and the stage is planned again.
    broker.set_messages(&vhost, &tiers[0], 0);
    assert!(broker.set_messages(&vhost, &old.names.queue, 1));
    let outcome = run_step(
        &broker,
        &vhost,
        &MigrationStep::DeleteDrained {
            queues: vec![old.names.queue.clone()],
        },
        &mut |_| {},
    )
    .await
    .expect("runs");
    assert_eq!(
        outcome,
        StepOutcome::Kept {
            queue: old.names.queue.clone(),
            messages: 1
        }
    );
}

#[tokio::test]
async fn a_migration_under_way_is_finished_to_its_recorded_type_before_another() {
    let (broker, old) = loaded(QueueType::Classic).await;
    let vhost = old.topology.vhost.clone();
    let to_quorum = notes(QueueType::Quorum);
    let live = broker.snapshot(&vhost).await.expect("vhost");
    let plan = plan_migration(&to_quorum, &live)
        .expect("plans")
        .expect("needed");
    for step in &plan.steps {
        run_step(&broker, &vhost, step, &mut |_| {})
            .await
            .expect("runs");
    }
    let live = broker.snapshot(&vhost).await.expect("vhost");
    // The spec goes back to classic mid-migration: the broker still says quorum.
    let back = notes(QueueType::Classic);
    assert_eq!(recorded_target(&back, &live), Ok(Some(QueueType::Quorum)));
    let refused = migrate(&broker, &back, &mut |_| {})
        .await
        .expect_err("refused");
    assert!(
        refused.to_string().contains("to quorum is under way"),
        "{refused}"
    );
    // Converging the spec meanwhile writes nothing about the queues being migrated.
    let converge = diff::converge(&back, &live);
    assert_eq!(converge.conflicts.len(), back.topology.queues.len());
    assert!(
        converge.actions.iter().all(|a| !matches!(
            a,
            BrokerAction::DeclareQueue(_) | BrokerAction::PutPolicy { .. }
        )),
        "{:?}",
        converge.actions
    );
    // Finishing it, then migrating back, ends classic with every message.
    let messages = total(&live);
    let mut events = Vec::new();
    let report = migrate(&broker, &to_quorum, &mut |e| events.push(e))
        .await
        .expect("finishes");
    assert_eq!(report.target, Some(QueueType::Quorum));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, MigrationEvent::Progress(_)))
    );
    migrate(&broker, &back, &mut |_| {})
        .await
        .expect("migrates back");
    let live = broker.snapshot(&vhost).await.expect("vhost");
    assert_migrated(&back, &live, messages);
}

#[tokio::test]
async fn bindings_and_holding_queues_msgpipe_did_not_make_refuse_the_migration() {
    let (broker, old) = loaded(QueueType::Classic).await;
    let desired = notes(QueueType::Quorum);
    let vhost = old.topology.vhost.clone();
    let mut live = broker.snapshot(&vhost).await.expect("vhost");
    let mut foreign = live.clone();
    foreign.bindings.insert(
        crate::broker::live::LiveBinding {
            source: "audit".into(),
            destination: desired.names.queue.clone(),
            routing_key: "all".into(),
        },
        false,
    );
    let refused = plan_migration(&desired, &foreign).expect_err("refused");
    assert!(
        matches!(&refused, MigrationRefused::ForeignBinding { exchange, .. } if exchange == "audit"),
        "{refused}"
    );
    let mut stranger = live.queues[&desired.names.queue].clone();
    stranger.migrating_to = None;
    live.queues
        .insert(holding_name(&desired.names.queue), stranger);
    let refused = plan_migration(&desired, &live).expect_err("refused");
    assert!(
        refused
            .to_string()
            .contains("lacks the argument x-msgpipe-migrating-to"),
        "{refused}"
    );
    // A pipeline whose queues already have the type needs nothing.
    let converged = broker.snapshot(&vhost).await.expect("vhost");
    assert_eq!(plan_migration(&old, &converged), Ok(None));
}

#[tokio::test]
async fn a_run_killed_after_any_step_is_finished_by_the_next_run_from_the_broker_state() {
    let desired = notes(QueueType::Quorum);
    let vhost = desired.topology.vhost.clone();
    let (broker, _) = loaded(QueueType::Classic).await;
    let messages = total(&broker.snapshot(&vhost).await.expect("vhost"));
    let (_, all) = walk(&broker, &desired, messages, None).await;
    for kill_after in 1..all {
        let (broker, _) = loaded(QueueType::Classic).await;
        let (_, ran) = walk(&broker, &desired, messages, Some(kill_after)).await;
        assert_eq!(ran, kill_after);
        // A new process knows nothing but what the broker holds.
        migrate(&broker, &desired, &mut |_| {})
            .await
            .unwrap_or_else(|e| panic!("resumed after step {kill_after}: {e}"));
        let live = broker.snapshot(&vhost).await.expect("vhost");
        assert_migrated(&desired, &live, messages);
    }
}

#[tokio::test]
async fn a_migration_never_starts_without_room_for_a_second_copy_but_one_under_way_finishes() {
    let (broker, old) = loaded(QueueType::Classic).await;
    let vhost = old.topology.vhost.clone();
    let desired = notes(QueueType::Quorum);
    let before = broker.snapshot(&vhost).await.expect("vhost");
    let node = |memory_alarm, disk_free| NodeRoom {
        node: "rabbit@a".into(),
        memory_alarm,
        disk_alarm: false,
        disk_free,
        disk_free_limit: 50_000_000,
    };
    // 100 + 7 + 4 x 3 messages of 1,000 bytes in the memory broker: 119 kB, a copy 238 kB.
    broker.set_nodes(vec![node(false, 50_000_000 + 237_000)]);
    let refused = migrate(&broker, &desired, &mut |_| {})
        .await
        .expect_err("no room");
    assert!(refused.to_string().contains("a copy needs"), "{refused}");
    broker.set_nodes(vec![node(true, u64::MAX)]);
    let refused = migrate(&broker, &desired, &mut |_| {})
        .await
        .expect_err("alarm");
    assert!(
        refused
            .to_string()
            .contains("rabbit@a is in a memory alarm"),
        "{refused}"
    );
    assert_eq!(
        broker.snapshot(&vhost).await.expect("vhost"),
        before,
        "nothing written"
    );
    // Room enough: it starts; an alarm raised mid-way does not strand it.
    broker.set_nodes(vec![node(false, 50_000_000 + 238_000)]);
    let live = broker.snapshot(&vhost).await.expect("vhost");
    let plan = plan_migration(&desired, &live)
        .expect("plans")
        .expect("needed");
    run_step(&broker, &vhost, &plan.steps[0], &mut |_| {})
        .await
        .expect("runs");
    broker.set_nodes(vec![node(true, 0)]);
    migrate(&broker, &desired, &mut |_| {})
        .await
        .expect("finishes");
    let live = broker.snapshot(&vhost).await.expect("vhost");
    assert_migrated(&desired, &live, total(&before));
}

#[tokio::test]
async fn a_pipeline_without_retry_tiers_migrates_too() {
    let pipeline = |queue_type| {
        let mut p = parse_pipelines(include_str!("../../../examples/notes-pipeline.yaml"))
            .expect("parses")
            .remove(0);
        p.spec.queue.queue_type = queue_type;
        p.spec.retry.max_attempts = 1;
        plan(&p, None).expect("plans")
    };
    let old = pipeline(QueueType::Quorum);
    assert!(old.retry_tiers.is_empty());
    let vhost = old.topology.vhost.clone();
    let broker = MemoryBroker::new("memory://m").with_vhost(&vhost, 3);
    let live = broker.snapshot(&vhost).await.expect("vhost");
    reconcile(&broker, &old, &live).await.expect("converges");
    assert!(broker.set_messages(&vhost, &old.names.queue, 40));
    let desired = pipeline(QueueType::Classic);
    let (phases, steps) = walk(&broker, &desired, 40, None).await;
    assert_eq!(phases.len(), 4, "{phases:?}");
    assert!(steps >= 12, "{steps} steps");
    let live = broker.snapshot(&vhost).await.expect("vhost");
    assert_migrated(&desired, &live, 40);
    assert_eq!(live.queues[&desired.names.queue].messages, 40);
}
