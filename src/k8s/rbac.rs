//! Every Kubernetes API call the operator makes, as RBAC sees it: (API group, resource,
//! verb). This list is the one source of truth:
//!
//! - `tests/chart.rs` renders the Helm chart (cluster-wide and namespaced) and requires its
//!   rules to grant exactly these, no more and no less;
//! - the operator tests' mocked API server answers `403 Forbidden`, as a real one would,
//!   to any request these do not allow, so a new call that is not listed here fails a test;
//! - `docs/operator.md`'s RBAC table is [`markdown_table`]'s output.
//!
//! API discovery (`/apis/monitoring.coreos.com/v1` and `/v1alpha1`, to see whether the
//! PrometheusRule and AlertmanagerConfig CRDs are installed) is a non-resource URL every
//! authenticated client may read: not listed.

/// One (group, resource) and the verbs the operator uses on it, with the call sites.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiCall {
    /// API group; "" is the core group.
    pub group: &'static str,
    /// Resource, or `resource/subresource`.
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    /// What makes the calls (for the docs and for whoever edits this list).
    pub why: &'static str,
}

/// Calls made where pipelines are managed: a ClusterRole in cluster-wide mode, one Role
/// per watched namespace otherwise.
pub const PIPELINE_CALLS: &[ApiCall] = &[
    ApiCall {
        group: "msgpipe.io",
        resource: "messagepipelines",
        verbs: &["get", "list", "watch", "patch"],
        why: "watch every pipeline; re-read one that cannot be decoded; add and remove the finalizer (JSON patch)",
    },
    ApiCall {
        group: "msgpipe.io",
        resource: "messagepipelines/status",
        verbs: &["patch"],
        why: "write the status (server-side apply)",
    },
    ApiCall {
        group: "msgpipe.io",
        resource: "messagepipelines/finalizers",
        verbs: &["update"],
        why: "owner references with blockOwnerDeletion on the ConfigMap and PrometheusRule",
    },
    ApiCall {
        group: "msgpipe.io",
        resource: "deadletterreplays",
        verbs: &["get", "list", "watch"],
        why: "watch every DeadLetterReplay; a running replay re-reads its object (suspend, deletion)",
    },
    ApiCall {
        group: "msgpipe.io",
        resource: "deadletterreplays/status",
        verbs: &["patch"],
        why: "write a replay's phase and counts (server-side apply)",
    },
    ApiCall {
        group: "",
        resource: "configmaps",
        verbs: &["get", "list", "watch", "create", "patch"],
        why: "the `<name>-client` ConfigMap: read, watch, server-side apply (create when new)",
    },
    ApiCall {
        group: "monitoring.coreos.com",
        resource: "prometheusrules",
        verbs: &["get", "create", "patch", "delete"],
        why: "the `<name>-alerts` PrometheusRule: read, server-side apply, delete when alerts are disabled",
    },
    ApiCall {
        group: "monitoring.coreos.com",
        resource: "alertmanagerconfigs",
        verbs: &["get", "create", "patch", "delete"],
        why: "the `<name>-notify` AlertmanagerConfig of `spec.alerts.notify`: read, server-side apply, delete when `notify` is removed",
    },
    ApiCall {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
        why: "Normal and Warning events on pipelines and replays (repeats patch the series)",
    },
];

/// Tenant Secrets, where pipelines are managed, only while pipelines may name one
/// (`spec.broker.secretRef`; chart value `brokers.secretRefs`, on by default). Platform teams
/// that hand out brokers only as MessageBrokers switch it off: the operator then reads no
/// Secret outside its own namespace.
pub const TENANT_SECRET_CALLS: &[ApiCall] = &[ApiCall {
    group: "",
    resource: "secrets",
    verbs: &["get", "list", "watch"],
    why: "read the Secret a pipeline names (spec.broker.secretRef); watch Secrets' metadata to reconcile on rotation",
}];

/// MessageBrokers (cluster-scoped), cluster-wide, while pipelines may name one (chart value
/// `brokers.messageBrokers`, on by default). A ClusterRole even when pipelines are watched in
/// a few namespaces only: the objects are cluster-scoped.
pub const BROKER_CALLS: &[ApiCall] = &[
    ApiCall {
        group: "msgpipe.io",
        resource: "messagebrokers",
        verbs: &["get", "list", "watch"],
        why: "watch them (the controller's cache, which each reconcile reads for a pipeline's spec.broker.brokerRef; a change reconciles their pipelines); get: the CLI, and a reconcile before the first list",
    },
    ApiCall {
        group: "msgpipe.io",
        resource: "messagebrokers/status",
        verbs: &["patch"],
        why: "write a broker's reachability, version and features (server-side apply)",
    },
    ApiCall {
        group: "",
        resource: "namespaces",
        verbs: &["get"],
        why: "read a pipeline's namespace labels to admit it (spec.tenants.namespaceSelector); never listed or cached",
    },
];

/// MessageBrokers' Secrets, in the release namespace only (a Role).
pub const OWN_SECRET_CALLS: &[ApiCall] = &[ApiCall {
    group: "",
    resource: "secrets",
    verbs: &["get", "list", "watch"],
    why: "read a MessageBroker's credentials; watch Secrets' metadata to reconnect on rotation (list starts the watch)",
}];

/// Which broker references an installation accepts: the RBAC it needs follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BrokerModes {
    pub secret_refs: bool,
    pub message_brokers: bool,
}

/// Where a set of calls is granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Where pipelines are managed: cluster-wide, or each watched namespace.
    Pipelines,
    /// Cluster-wide, whatever namespaces pipelines are watched in.
    Cluster,
    /// The release (operator's) namespace only.
    Own,
}

/// Every grant an installation in `modes` needs, with its scope (leases aside).
pub fn grants(modes: BrokerModes) -> Vec<(Scope, &'static [ApiCall])> {
    let mut grants = vec![(Scope::Pipelines, PIPELINE_CALLS)];
    if modes.secret_refs {
        grants.push((Scope::Pipelines, TENANT_SECRET_CALLS));
    }
    if modes.message_brokers {
        grants.push((Scope::Cluster, BROKER_CALLS));
        grants.push((Scope::Own, OWN_SECRET_CALLS));
    }
    grants
}

/// Leader election (kube-lease-manager), in the release namespace only. RBAC cannot
/// restrict `create` by name: create covers any Lease there, the rest only the operator's.
pub const LEASE_CALLS: &[ApiCall] = &[
    ApiCall {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["create"],
        why: "create the Lease the first time",
    },
    ApiCall {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "update", "patch"],
        why: "hold and renew the operator's own Lease (resourceNames: the lease name)",
    },
];

/// Whether `calls` grant `verb` on `group`/`resource`.
pub fn allows(calls: &[ApiCall], group: &str, resource: &str, verb: &str) -> bool {
    calls
        .iter()
        .any(|c| c.group == group && c.resource == resource && c.verbs.contains(&verb))
}

/// The RBAC table of docs/operator.md.
pub fn markdown_table() -> String {
    let mut table = String::from("| API group | resource | verbs | why |\n|---|---|---|---|\n");
    for (scope, calls) in [
        ("", PIPELINE_CALLS),
        (" (with `brokers.secretRefs`)", TENANT_SECRET_CALLS),
        (
            " (with `brokers.messageBrokers`, cluster-wide)",
            BROKER_CALLS,
        ),
        (
            " (with `brokers.messageBrokers`, release namespace)",
            OWN_SECRET_CALLS,
        ),
        (" (release namespace)", LEASE_CALLS),
    ] {
        for call in calls {
            let group = if call.group.is_empty() {
                "\"\" (core)"
            } else {
                call.group
            };
            table.push_str(&format!(
                "| {group} | {}{scope} | {} | {} |\n",
                call.resource,
                call.verbs.join(", "),
                call.why
            ));
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabling_alerts_may_delete_the_prometheus_rule() {
        assert!(allows(
            PIPELINE_CALLS,
            "monitoring.coreos.com",
            "prometheusrules",
            "delete"
        ));
        assert!(!allows(PIPELINE_CALLS, "", "secrets", "patch"));
    }

    #[test]
    fn message_brokers_only_mode_reads_secrets_in_its_own_namespace_only() {
        let only_brokers = grants(BrokerModes {
            secret_refs: false,
            message_brokers: true,
        });
        for (scope, calls) in &only_brokers {
            if allows(calls, "", "secrets", "get") {
                assert_eq!(*scope, Scope::Own, "{calls:?}");
            }
        }
        let both = grants(BrokerModes {
            secret_refs: true,
            message_brokers: true,
        });
        assert!(
            both.iter().any(|(scope, calls)| *scope == Scope::Pipelines
                && allows(calls, "", "secrets", "watch"))
        );
    }

    #[test]
    fn the_docs_rbac_table_is_this_list() {
        let docs = include_str!("../../docs/operator.md");
        assert!(
            docs.contains(&markdown_table()),
            "docs/operator.md must hold markdown_table()'s output verbatim:\n{}",
            markdown_table()
        );
    }

    #[test]
    fn no_resource_is_listed_twice_and_no_wildcards() {
        let mut seen = std::collections::BTreeSet::new();
        for call in PIPELINE_CALLS {
            assert!(seen.insert((call.group, call.resource)), "{call:?}");
            assert!(!call.verbs.contains(&"*") && call.resource != "*");
        }
    }
}
