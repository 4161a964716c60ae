//! Every reason msgpipe puts on a condition or an event, as one type: users match on these
//! strings (`kubectl wait`, alert rules, GitOps health checks), so they are stable.

use std::fmt;

/// The `reason` of a condition or an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    // -- conditions (Ready, BrokerReady, AlertsReady) --
    /// Everything the condition covers matches the spec.
    Converged,
    /// The spec cannot be planned (a field is wrong); nothing was touched.
    InvalidSpec,
    /// The spec asks for a change the broker cannot make in place (e.g. `queue.type`).
    ImmutableFieldChanged,
    /// A migration of the pipeline's queues is under way on the broker (run by the operator,
    /// or by `msgpipe migrate`): nothing else is written to the queues being migrated until
    /// it has finished. Also the Normal event of each migration step.
    Migrating,
    /// A migration cannot start (no room on the broker for a second copy, a binding msgpipe
    /// did not make, a foreign holding queue, ...); nothing was written.
    MigrationRefused,
    /// A migration step failed; it is started again, resuming from the broker's state.
    MigrationFailed,
    /// `managementPolicy: Observe`: the broker was read and compared, nothing was written
    /// (True with no difference, False with `status.differences` listing them).
    Observing,
    /// The broker Secret the pipeline names does not exist.
    SecretMissing,
    /// The broker Secret exists but its `uri`, `managementUri` or `ca.crt` is unusable.
    InvalidBrokerSecret,
    /// `spec.broker.brokerRef` names a MessageBroker that does not exist.
    BrokerNotFound,
    /// The MessageBroker does not admit the pipeline's namespace (its namespace selector).
    BrokerNotAdmitted,
    /// The MessageBroker does not grant the pipeline's namespace the vhost it asks for.
    VhostNotGranted,
    /// `spec.broker.secretRef` while the operator is installed without tenant Secret access
    /// (`brokers.secretRefs: false`), or `brokerRef` while MessageBrokers are switched off.
    BrokerModeDisabled,
    /// The broker cannot be reached, or did not answer in time.
    BrokerUnreachable,
    /// The broker refused the Secret's credentials.
    BrokerAuthenticationFailed,
    /// The vhost does not exist (or the user may not use it).
    VhostNotFound,
    /// The user lacks a permission or tag for a call msgpipe makes.
    BrokerAccessRefused,
    /// The management API does not answer as RabbitMQ's does.
    ManagementAPIUnavailable,
    /// The broker refused a declare, bind or policy write.
    BrokerRejected,
    /// Policies are written; queues wait while other pipelines of the vhost write theirs.
    WaitingForPolicies,
    /// The Kubernetes API refused or failed a read or write of an owned object or the status.
    KubernetesAPIFailed,
    /// monitoring.coreos.com/v1 PrometheusRule is not served by this cluster.
    PrometheusRuleCRDMissing,
    /// `spec.alerts.notify` is set but monitoring.coreos.com/v1alpha1 AlertmanagerConfig is
    /// not served by this cluster.
    AlertmanagerConfigCRDMissing,
    /// `spec.alerts.enabled: false`: no PrometheusRule, by request.
    AlertsDisabled,
    /// The PrometheusRule could not be read, written or deleted.
    AlertsApplyFailed,
    // -- events only --
    /// A broker object was created.
    Created,
    /// A broker object was updated.
    Updated,
    /// A binding was added.
    Bound,
    /// A binding was removed.
    Unbound,
    /// A broker object was deleted.
    Deleted,
    /// A queue was not deleted because it holds messages or has consumers.
    Kept,
    /// A foreign policy outranks msgpipe's on one of the pipeline's queues.
    PolicyOverridden,
    /// A migration finished: every queue has the type the spec asks for.
    Migrated,
    /// Before a migration: a policy that applies to one queue type only matches a queue
    /// being migrated (it stops applying, or sets keys the new type ignores).
    TypeSpecificPolicy,
    /// Deletion with `deletionPolicy: Retain`: the broker was left alone.
    Retained,
    /// Deletion without touching the broker (no Secret, or an invalid spec).
    CleanupSkipped,
    /// Deletion gave up waiting for an unreachable broker.
    CleanupAbandoned,
    // -- DeadLetterReplay (conditions and events) --
    /// The replay started copying dead letters back (or a resumed run went on).
    ReplayStarted,
    /// `spec.suspend: true`: no more copies until it is set back to false.
    ReplaySuspended,
    /// Every selected dead letter was replayed.
    ReplayCompleted,
    /// The kill switch (`spec.stopWhen`) stopped the replay; the rest stay in the DLQ.
    ReplayStopped,
    /// The replay cannot run (pipeline missing, invalid selection, broker refused).
    ReplayFailed,
}

impl Reason {
    /// Every reason, for documentation and tests.
    pub const ALL: [Reason; 42] = [
        Reason::Converged,
        Reason::InvalidSpec,
        Reason::ImmutableFieldChanged,
        Reason::Migrating,
        Reason::MigrationRefused,
        Reason::MigrationFailed,
        Reason::Observing,
        Reason::SecretMissing,
        Reason::InvalidBrokerSecret,
        Reason::BrokerNotFound,
        Reason::BrokerNotAdmitted,
        Reason::VhostNotGranted,
        Reason::BrokerModeDisabled,
        Reason::BrokerUnreachable,
        Reason::BrokerAuthenticationFailed,
        Reason::VhostNotFound,
        Reason::BrokerAccessRefused,
        Reason::ManagementAPIUnavailable,
        Reason::BrokerRejected,
        Reason::WaitingForPolicies,
        Reason::KubernetesAPIFailed,
        Reason::PrometheusRuleCRDMissing,
        Reason::AlertmanagerConfigCRDMissing,
        Reason::AlertsDisabled,
        Reason::AlertsApplyFailed,
        Reason::Created,
        Reason::Updated,
        Reason::Bound,
        Reason::Unbound,
        Reason::Deleted,
        Reason::Kept,
        Reason::PolicyOverridden,
        Reason::Migrated,
        Reason::TypeSpecificPolicy,
        Reason::Retained,
        Reason::CleanupSkipped,
        Reason::CleanupAbandoned,
        Reason::ReplayStarted,
        Reason::ReplaySuspended,
        Reason::ReplayCompleted,
        Reason::ReplayStopped,
        Reason::ReplayFailed,
    ];

    /// The string written to the API (UpperCamelCase, as Kubernetes asks of reasons).
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Converged => "Converged",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::ImmutableFieldChanged => "ImmutableFieldChanged",
            Reason::Migrating => "Migrating",
            Reason::MigrationRefused => "MigrationRefused",
            Reason::MigrationFailed => "MigrationFailed",
            Reason::Observing => "Observing",
            Reason::SecretMissing => "SecretMissing",
            Reason::InvalidBrokerSecret => "InvalidBrokerSecret",
            Reason::BrokerNotFound => "BrokerNotFound",
            Reason::BrokerNotAdmitted => "BrokerNotAdmitted",
            Reason::VhostNotGranted => "VhostNotGranted",
            Reason::BrokerModeDisabled => "BrokerModeDisabled",
            Reason::BrokerUnreachable => "BrokerUnreachable",
            Reason::BrokerAuthenticationFailed => "BrokerAuthenticationFailed",
            Reason::VhostNotFound => "VhostNotFound",
            Reason::BrokerAccessRefused => "BrokerAccessRefused",
            Reason::ManagementAPIUnavailable => "ManagementAPIUnavailable",
            Reason::BrokerRejected => "BrokerRejected",
            Reason::WaitingForPolicies => "WaitingForPolicies",
            Reason::KubernetesAPIFailed => "KubernetesAPIFailed",
            Reason::PrometheusRuleCRDMissing => "PrometheusRuleCRDMissing",
            Reason::AlertmanagerConfigCRDMissing => "AlertmanagerConfigCRDMissing",
            Reason::AlertsDisabled => "AlertsDisabled",
            Reason::AlertsApplyFailed => "AlertsApplyFailed",
            Reason::Created => "Created",
            Reason::Updated => "Updated",
            Reason::Bound => "Bound",
            Reason::Unbound => "Unbound",
            Reason::Deleted => "Deleted",
            Reason::Kept => "Kept",
            Reason::PolicyOverridden => "PolicyOverridden",
            Reason::Migrated => "Migrated",
            Reason::TypeSpecificPolicy => "TypeSpecificPolicy",
            Reason::Retained => "Retained",
            Reason::CleanupSkipped => "CleanupSkipped",
            Reason::CleanupAbandoned => "CleanupAbandoned",
            Reason::ReplayStarted => "ReplayStarted",
            Reason::ReplaySuspended => "ReplaySuspended",
            Reason::ReplayCompleted => "ReplayCompleted",
            Reason::ReplayStopped => "ReplayStopped",
            Reason::ReplayFailed => "ReplayFailed",
        }
    }

    /// The event reason for a broker change verb (`created`, `bound`, `kept`, ...).
    pub fn of_change(verb: &str) -> Option<Reason> {
        Some(match verb {
            "created" => Reason::Created,
            "updated" => Reason::Updated,
            "bound" => Reason::Bound,
            "unbound" => Reason::Unbound,
            "deleted" => Reason::Deleted,
            "kept" => Reason::Kept,
            _ => return None,
        })
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Reason> for String {
    fn from(reason: Reason) -> String {
        reason.as_str().to_string()
    }
}

impl PartialEq<Reason> for String {
    fn eq(&self, other: &Reason) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<Reason> for str {
    fn eq(&self, other: &Reason) -> bool {
        self == other.as_str()
    }
}

/// The longest message msgpipe writes to a condition or an event, in bytes (events accept
/// 1 kB notes; conditions are read in `kubectl describe`).
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// `text` as one line of at most [`MAX_MESSAGE_BYTES`] bytes: line breaks and runs of
/// whitespace become one space, and a longer text is cut at a char boundary, ending in `…`.
pub fn one_line(text: &str) -> String {
    let mut line = String::with_capacity(text.len().min(MAX_MESSAGE_BYTES));
    for word in text.split_whitespace() {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
        if line.len() > MAX_MESSAGE_BYTES {
            break;
        }
    }
    if line.len() <= MAX_MESSAGE_BYTES {
        return line;
    }
    const ELLIPSIS: &str = "…";
    let mut cut = MAX_MESSAGE_BYTES - ELLIPSIS.len();
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    line.truncate(cut);
    line.push_str(ELLIPSIS);
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_distinct_upper_camel_case() {
        let names: std::collections::BTreeSet<&str> =
            Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Reason::ALL.len());
        for name in names {
            assert!(
                name.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                    && name.chars().all(|c| c.is_ascii_alphanumeric()),
                "{name}"
            );
        }
    }

    #[test]
    fn one_line_joins_lines_and_cuts_long_text_at_a_char_boundary() {
        assert_eq!(one_line("a\n  b\r\n\tc "), "a b c");
        let long = "é".repeat(2000);
        let cut = one_line(&long);
        assert!(cut.len() <= MAX_MESSAGE_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert!(cut.len() > MAX_MESSAGE_BYTES - 8, "cut near the limit");
        let exact = "x".repeat(MAX_MESSAGE_BYTES);
        assert_eq!(one_line(&exact), exact, "a text at the limit is kept whole");
    }
}
