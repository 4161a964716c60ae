//! Policies of other owners that apply to one queue type only, reported before a migration
//! starts (pure): after it, a policy with `apply-to: classic_queues` no longer applies to a
//! queue that became quorum, and keys one type ignores stop (or start) doing nothing.

use regex::Regex;

use crate::api::QueueType;
use crate::broker::live::LiveVhost;
use crate::plan::DesiredState;
use crate::plan::topology::{POLICY_PREFIX, POLICY_PRIORITY};

/// Policy keys quorum queues ignore (classic mirroring, lazy mode, classic queue versions).
const CLASSIC_ONLY_KEYS: &[&str] = &[
    "ha-mode",
    "ha-params",
    "ha-sync-mode",
    "ha-sync-batch-size",
    "ha-promote-on-shutdown",
    "ha-promote-on-failure",
    "queue-mode",
    "queue-master-locator",
    "queue-version",
];

/// Policy keys classic queues ignore.
const QUORUM_ONLY_KEYS: &[&str] = &[
    "delivery-limit",
    "dead-letter-strategy",
    "max-in-memory-length",
    "max-in-memory-bytes",
    "target-group-size",
];

/// One line per (policy, queue) where a policy someone else wrote applies to a queue of the
/// pipeline as it is now and will not apply as it would after migrating to `target`: its
/// `apply-to` names the other type, or it sets keys `target` ignores. A policy that does not
/// apply to the queue at all (msgpipe's own outranks it) is not reported.
pub fn type_specific_policies(
    desired: &DesiredState,
    live: &LiveVhost,
    target: QueueType,
) -> Vec<String> {
    let (other_apply_to, ignored_keys) = match target {
        QueueType::Quorum => ("classic_queues", CLASSIC_ONLY_KEYS),
        QueueType::Classic => ("quorum_queues", QUORUM_ONLY_KEYS),
    };
    let mut found = Vec::new();
    for (name, policy) in &live.policies {
        if name.starts_with(POLICY_PREFIX) {
            continue;
        }
        let Ok(pattern) = Regex::new(&policy.pattern) else {
            continue;
        };
        let outranks_ours = policy.priority > i64::from(POLICY_PRIORITY);
        for queue in desired
            .topology
            .queues
            .iter()
            .filter(|q| pattern.is_match(&q.name))
        {
            // The work queue and the DLQ carry msgpipe's policy (only one policy applies to
            // a queue: the highest priority); retry queues carry arguments and no policy.
            let has_our_policy = queue.arguments.is_empty();
            if has_our_policy && !outranks_ours {
                continue;
            }
            if policy.apply_to == other_apply_to {
                found.push(format!(
                    "policy {name} (apply-to: {}) matches queue {} and stops applying to it once it is {}",
                    policy.apply_to,
                    queue.name,
                    target.as_str()
                ));
                continue;
            }
            if !matches!(policy.apply_to.as_str(), "queues" | "all") {
                continue;
            }
            let ignored: Vec<&str> = policy
                .definition
                .keys()
                .map(String::as_str)
                .filter(|key| ignored_keys.contains(key))
                .collect();
            if !ignored.is_empty() {
                found.push(format!(
                    "policy {name} matches queue {} and sets {}, which {} queues ignore",
                    queue.name,
                    ignored.join(", "),
                    target.as_str()
                ));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, Value, json};

    use super::*;
    use crate::broker::live::LivePolicy;

    fn desired(queue_type: &str) -> DesiredState {
        let yaml = format!(
            "apiVersion: msgpipe.io/v1alpha1\nkind: MessagePipeline\nmetadata: {{ name: notes, namespace: notes-app }}\nspec:\n  broker: {{ secretRef: {{ name: s }} }}\n  queue: {{ name: notes_queue, type: {queue_type} }}\n  retry: {{ maxAttempts: 3, backoff: {{ initialDelay: 1s, multiplier: 2, maxDelay: 2s }} }}\n"
        );
        let pipeline = crate::api::load::parse_pipelines(&yaml)
            .expect("parses")
            .remove(0);
        crate::plan::plan(&pipeline, None).expect("plans")
    }

    fn policy(pattern: &str, apply_to: &str, priority: i64, definition: Value) -> LivePolicy {
        LivePolicy {
            pattern: pattern.into(),
            apply_to: apply_to.into(),
            priority,
            definition: definition.as_object().cloned().unwrap_or_else(Map::new),
        }
    }

    fn live(policies: Vec<(&str, LivePolicy)>) -> LiveVhost {
        LiveVhost {
            policies: policies
                .into_iter()
                .map(|(n, p)| (n.to_string(), p))
                .collect(),
            ..LiveVhost::default()
        }
    }

    #[test]
    fn a_classic_only_policy_that_applies_is_reported_before_migrating_to_quorum() {
        let desired = desired("quorum");
        let high = i64::from(POLICY_PRIORITY) + 10;
        let live = live(vec![
            (
                "lazy",
                policy(
                    "^notes_queue$",
                    "classic_queues",
                    high,
                    json!({"max-length": 5}),
                ),
            ),
            (
                "ha",
                policy("^notes", "queues", high, json!({"ha-mode": "all"})),
            ),
            // Outranked by msgpipe's own policy on the work queue and the DLQ: applies only
            // to the retry queues (which carry arguments, no policy).
            ("low", policy(".*", "all", 0, json!({"queue-mode": "lazy"}))),
            (
                "exchanges",
                policy(".*", "exchanges", high, json!({"ha-mode": "all"})),
            ),
            (
                "msgpipe.notes_queue",
                policy("^notes_queue$", "classic_queues", high, json!({})),
            ),
        ]);
        let found = type_specific_policies(&desired, &live, QueueType::Quorum);
        assert!(
            found.contains(
                &"policy lazy (apply-to: classic_queues) matches queue notes_queue and stops applying to it once it is quorum"
                    .to_string()
            ),
            "{found:#?}"
        );
        assert!(
            found
                .iter()
                .any(|f| f.starts_with("policy ha matches queue notes_queue.dlq and sets ha-mode")),
            "{found:#?}"
        );
        let low: Vec<&String> = found
            .iter()
            .filter(|f| f.starts_with("policy low "))
            .collect();
        assert!(
            !low.is_empty() && low.iter().all(|f| f.contains(".retry.")),
            "{low:#?}"
        );
        assert!(
            !found
                .iter()
                .any(|f| f.contains("exchanges") || f.contains("msgpipe."))
        );
    }

    #[test]
    fn nothing_is_reported_for_policies_that_keep_applying() {
        let desired = desired("classic");
        let high = i64::from(POLICY_PRIORITY) + 10;
        let live = live(vec![
            (
                "lazy",
                policy(".*", "classic_queues", high, json!({"max-length": 5})),
            ),
            (
                "ha",
                policy(".*", "queues", high, json!({"ha-mode": "all"})),
            ),
        ]);
        assert_eq!(
            type_specific_policies(&desired, &live, QueueType::Classic),
            Vec::<String>::new()
        );
        let quorum_only = live_with_quorum_only(high);
        let found = type_specific_policies(&desired, &quorum_only, QueueType::Classic);
        assert!(
            found.iter().any(|f| f.contains("apply-to: quorum_queues"))
                && found.iter().any(|f| f.contains("sets delivery-limit")),
            "{found:#?}"
        );
    }

    fn live_with_quorum_only(priority: i64) -> LiveVhost {
        live(vec![
            (
                "qq",
                policy("^notes_queue$", "quorum_queues", priority, json!({})),
            ),
            (
                "limit",
                policy(
                    "^notes_queue$",
                    "queues",
                    priority,
                    json!({"delivery-limit": 3}),
                ),
            ),
        ])
    }
}
