//! Dead letters grouped by what went wrong, biggest group first: the view that answers "is
//! this one bug or many?".

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::jiff::Timestamp;
use serde::Serialize;

use super::letter::DeadLetter;

/// What `msgpipe dlq list` groups its summary by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum GroupBy {
    /// The last handler error (whitespace collapsed; exact text otherwise).
    #[default]
    Error,
    /// The reason: permanent / max-attempts (consumer) or rejected / expired / maxlen /
    /// delivery_limit (broker).
    Reason,
    /// The original routing key.
    RoutingKey,
}

/// Key of the dead letters that have no value for the grouped attribute.
pub const NO_VALUE: &str = "(none)";

/// Dead letters that share one value of the grouped attribute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FailureGroup {
    pub key: String,
    pub count: usize,
    /// Distinct reasons within the group, sorted.
    pub reasons: Vec<String>,
    /// Earliest failure time of any member.
    pub first_failure: Option<String>,
    /// Latest failure time of any member.
    pub last_failure: Option<String>,
    /// Index of the first member, for `msgpipe dlq show '#N'`.
    pub example: usize,
}

/// Groups dead letters, largest group first (ties by key).
pub fn group(letters: &[DeadLetter], by: GroupBy) -> Vec<FailureGroup> {
    let mut groups: BTreeMap<String, FailureGroup> = BTreeMap::new();
    let mut reasons: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for letter in letters {
        let key = group_key(letter, by);
        let group = groups.entry(key.clone()).or_insert_with(|| FailureGroup {
            key: key.clone(),
            count: 0,
            reasons: Vec::new(),
            first_failure: None,
            last_failure: None,
            example: letter.index,
        });
        group.count += 1;
        let first = letter
            .first_failure
            .as_ref()
            .or(letter.last_failure.as_ref());
        group.first_failure = earliest(group.first_failure.take(), first);
        group.last_failure = latest(group.last_failure.take(), letter.last_failure.as_ref());
        if let Some(reason) = &letter.reason {
            reasons.entry(key).or_default().insert(reason.clone());
        }
    }
    let mut list: Vec<FailureGroup> = groups
        .into_values()
        .map(|mut g| {
            g.reasons = reasons
                .remove(&g.key)
                .unwrap_or_default()
                .into_iter()
                .collect();
            g
        })
        .collect();
    list.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
    list
}

fn group_key(letter: &DeadLetter, by: GroupBy) -> String {
    let value = match by {
        GroupBy::Error => letter.error.as_deref(),
        GroupBy::Reason => letter.reason.as_deref(),
        GroupBy::RoutingKey => letter.original_routing_key.as_deref(),
    };
    // Stack traces and multi-line errors group by their text, not their line breaks.
    let collapsed = value.map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "));
    match collapsed {
        Some(text) if !text.is_empty() => text,
        _ => NO_VALUE.to_string(),
    }
}

/// Orders RFC 3339 times by instant (offsets and precisions may differ); text that is not a
/// time sorts by itself.
fn instant_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<Timestamp>(), b.parse::<Timestamp>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.cmp(b),
    }
}

fn earliest(current: Option<String>, candidate: Option<&String>) -> Option<String> {
    match (current, candidate) {
        (Some(c), Some(n)) if instant_order(n, &c).is_lt() => Some(n.clone()),
        (Some(c), _) => Some(c),
        (None, n) => n.cloned(),
    }
}

fn latest(current: Option<String>, candidate: Option<&String>) -> Option<String> {
    match (current, candidate) {
        (Some(c), Some(n)) if instant_order(n, &c).is_gt() => Some(n.clone()),
        (Some(c), _) => Some(c),
        (None, n) => n.cloned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(index: usize, error: Option<&str>, reason: &str, last: &str) -> DeadLetter {
        DeadLetter {
            index,
            message_id: Some(format!("m-{index}")),
            reason: Some(reason.into()),
            reason_source: None,
            attempts: None,
            error: error.map(str::to_string),
            first_failure: None,
            last_failure: Some(last.into()),
            original_exchange: None,
            original_routing_key: None,
            dead_lettered_from: None,
            replay_count: 0,
            delivery_count: None,
            size: 0,
        }
    }

    #[test]
    fn groups_by_error_text_biggest_first_with_reasons_and_time_span() {
        let letters = [
            letter(
                1,
                Some("db timeout"),
                "max-attempts",
                "2024-05-01T10:00:05Z",
            ),
            letter(2, Some("bad json"), "permanent", "2024-05-01T09:00:00Z"),
            letter(
                3,
                Some("db  timeout\n"),
                "max-attempts",
                "2024-05-01T11:00:00+02:00",
            ),
            letter(4, None, "rejected", "2024-05-01T08:00:00Z"),
            letter(
                5,
                Some("db timeout"),
                "delivery_limit",
                "2024-05-01T10:30:00Z",
            ),
        ];
        let groups = group(&letters, GroupBy::Error);
        let summary: Vec<(&str, usize, usize)> = groups
            .iter()
            .map(|g| (g.key.as_str(), g.count, g.example))
            .collect();
        assert_eq!(
            summary,
            [("db timeout", 3, 1), ("(none)", 1, 4), ("bad json", 1, 2)]
        );
        let db = &groups[0];
        assert_eq!(db.reasons, ["delivery_limit", "max-attempts"]);
        // 11:00+02:00 is 09:00Z: the earliest, although it sorts last as text.
        assert_eq!(
            db.first_failure.as_deref(),
            Some("2024-05-01T11:00:00+02:00")
        );
        assert_eq!(db.last_failure.as_deref(), Some("2024-05-01T10:30:00Z"));
    }

    #[test]
    fn groups_by_reason_and_routing_key() {
        let mut a = letter(1, None, "rejected", "t");
        a.original_routing_key = Some("notes".into());
        let b = letter(2, None, "rejected", "t");
        let by_reason = group(&[a.clone(), b.clone()], GroupBy::Reason);
        assert_eq!(by_reason.len(), 1);
        assert_eq!(by_reason[0].count, 2);
        let by_key: Vec<String> = group(&[a, b], GroupBy::RoutingKey)
            .into_iter()
            .map(|g| g.key)
            .collect();
        assert_eq!(by_key, ["(none)", "notes"]);
    }
}
