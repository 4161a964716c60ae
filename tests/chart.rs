//! The Helm chart (charts/msgpipe-operator) against the real `helm` binary, which
//! `scripts/install-helm.sh` installs: it lints, it renders in every mode, and what it renders
//! grants the operator exactly the Kubernetes API calls it makes, no more.
//!
//! Without helm these tests fail under CI (env `CI` set) and are skipped, with a printed
//! reason, elsewhere.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Once, OnceLock};

// The operator's Kubernetes API calls are listed once, in src/k8s/rbac.rs: the chart must
// grant exactly those, no more and no less.
use msgpipe::k8s::rbac::{ApiCall, BrokerModes, LEASE_CALLS, Scope, TENANT_SECRET_CALLS, grants};
use serde_json::Value;
use support::{output_text, repo_path};

const RELEASE: &str = "msgpipe-operator";
const NAMESPACE: &str = "msgpipe-system";
/// Release "msgpipe-operator" contains the chart name, so it is the fullname as is.
const FULLNAME: &str = "msgpipe-operator";
const CHART_DIR: &str = "charts/msgpipe-operator";
const DASHBOARD_FILE: &str = "charts/msgpipe-operator/dashboards/msgpipe-pipelines.json";

// ---------------------------------------------------------------------------------------
// helm

/// The helm binary: $HELM, else `helm` on PATH, else where scripts/install-helm.sh puts it.
/// None (after saying why, once) when it is missing outside CI; a panic when it is missing in CI.
fn helm() -> Option<PathBuf> {
    static HELM: OnceLock<Option<PathBuf>> = OnceLock::new();
    let found = HELM.get_or_init(find_helm).clone();
    if found.is_none() {
        let reason =
            "helm not found (set $HELM, or run scripts/install-helm.sh, which `make setup` runs)";
        let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
        assert!(!in_ci, "{reason}: the chart tests cannot run");
        static SAID: Once = Once::new();
        // Straight to the stderr handle: libtest hides eprintln! output of passing tests.
        SAID.call_once(|| {
            let _ = writeln!(std::io::stderr(), "SKIPPED chart tests: {reason}");
        });
    }
    found
}

fn find_helm() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("helm"));
    std::env::var_os("HELM")
        .map(PathBuf::from)
        .into_iter()
        .chain(on_path)
        .chain([PathBuf::from("/usr/local/bin/helm")])
        .find(|p| p.is_file())
}

fn run_helm(helm: &Path, args: &[&str]) -> Output {
    Command::new(helm)
        .args(args)
        .current_dir(repo_path(""))
        .output()
        .expect("helm runs")
}

/// `helm template` of the chart in `chart_dir` with extra arguments; the raw output.
fn template_in(helm: &Path, chart_dir: &Path, extra: &[&str]) -> Output {
    let chart = chart_dir.to_str().expect("utf-8 path");
    let mut args = vec!["template", RELEASE, chart, "--namespace", NAMESPACE];
    args.extend_from_slice(extra);
    run_helm(helm, &args)
}

/// Renders the chart with `--set`-style arguments and parses every object it prints.
fn render(helm: &Path, extra: &[&str]) -> Vec<Value> {
    let output = template_in(helm, &repo_path(CHART_DIR), extra);
    assert!(
        output.status.success(),
        "helm template {extra:?} failed:\n{}",
        output_text(&output)
    );
    let text = String::from_utf8(output.stdout).expect("utf-8 manifests");
    let objects: Vec<Value> =
        serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("not YAML: {e}\n{text}"));
    assert!(!objects.is_empty(), "helm template printed no objects");
    objects
}

// ---------------------------------------------------------------------------------------
// looking at rendered objects

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn kinds(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| {
            o["kind"]
                .as_str()
                .expect("every object has a kind")
                .to_string()
        })
        .collect()
}

/// The one object of `kind`; panics when there are none or several.
fn only<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    match of_kind(objects, kind).as_slice() {
        [one] => one,
        other => panic!("expected one {kind}, found {}", other.len()),
    }
}

fn named<'a>(objects: &'a [Value], kind: &str, namespace: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"] == name
                && o["metadata"]["namespace"] == namespace
        })
        .unwrap_or_else(|| panic!("no {kind} {namespace}/{name} in {:?}", kinds(objects)))
}

/// The cluster-scoped object `kind/name`.
fn cluster_named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in {:?}", kinds(objects)))
}

/// Every (Cluster)Role the chart rendered, by (kind, namespace, name), with its grants.
fn rendered_roles(objects: &[Value]) -> BTreeMap<(String, String, String), BTreeSet<Grant>> {
    objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
        .map(|o| {
            let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
            (
                (
                    text(&o["kind"]),
                    text(&o["metadata"]["namespace"]),
                    text(&o["metadata"]["name"]),
                ),
                granted(o),
            )
        })
        .collect()
}

/// The (Cluster)Roles an installation in `modes` must have, from src/k8s/rbac.rs: pipeline
/// calls in a ClusterRole (or a Role per watched namespace), MessageBroker calls in their own
/// ClusterRole, the brokers' Secrets in a Role of the release namespace. Leases aside.
fn expected_roles(
    modes: BrokerModes,
    watch: &[&str],
) -> BTreeMap<(String, String, String), BTreeSet<Grant>> {
    let mut roles: BTreeMap<(String, String, String), BTreeSet<Grant>> = BTreeMap::new();
    for (scope, calls) in grants(modes) {
        let homes: Vec<(&str, &str, String)> = match scope {
            Scope::Pipelines if watch.is_empty() => vec![("ClusterRole", "", FULLNAME.into())],
            Scope::Pipelines => watch
                .iter()
                .map(|ns| ("Role", *ns, FULLNAME.into()))
                .collect(),
            Scope::Cluster => vec![("ClusterRole", "", format!("{FULLNAME}-brokers"))],
            Scope::Own => vec![("Role", NAMESPACE, format!("{FULLNAME}-broker-secrets"))],
        };
        for (kind, namespace, name) in homes {
            roles
                .entry((kind.into(), namespace.into(), name))
                .or_default()
                .extend(expected(calls, None));
        }
    }
    roles
}

fn operator_container(objects: &[Value]) -> &Value {
    let containers = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

/// The container's plain `value:` environment variables.
fn env(objects: &[Value]) -> BTreeMap<String, String> {
    operator_container(objects)["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|var| {
            let value = var.get("value")?.as_str().expect("env values are strings");
            Some((var["name"].as_str()?.to_string(), value.to_string()))
        })
        .collect()
}

/// (group, resource, verb, resourceName) for every permission a Role's rules grant.
type Grant = (String, String, String, Option<String>);

fn granted(role: &Value) -> BTreeSet<Grant> {
    let mut grants = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        assert!(
            rule.get("nonResourceURLs").is_none(),
            "no non-resource URLs: {rule}"
        );
        let list = |key: &str| -> Vec<String> {
            rule.get(key)
                .and_then(Value::as_array)
                .map(|items| {
                    items
                        .iter()
                        .map(|i| i.as_str().expect("string").to_string())
                        .collect()
                })
                .unwrap_or_default()
        };
        let names: Vec<Option<String>> = match list("resourceNames") {
            names if names.is_empty() => vec![None],
            names => names.into_iter().map(Some).collect(),
        };
        for group in list("apiGroups") {
            for resource in list("resources") {
                for verb in list("verbs") {
                    for name in &names {
                        for part in [&group, &resource, &verb] {
                            assert_ne!(part, "*", "wildcard in {rule}");
                        }
                        grants.insert((
                            group.clone(),
                            resource.clone(),
                            verb.clone(),
                            name.clone(),
                        ));
                    }
                }
            }
        }
    }
    grants
}

fn expected(calls: &[ApiCall], name: Option<&str>) -> BTreeSet<Grant> {
    calls
        .iter()
        .flat_map(|call| {
            call.verbs.iter().map(move |verb| {
                (
                    call.group.to_string(),
                    call.resource.to_string(),
                    verb.to_string(),
                    name.map(str::to_string),
                )
            })
        })
        .collect()
}

fn lease_grants(lease_name: &str) -> BTreeSet<Grant> {
    let mut grants = expected(&LEASE_CALLS[..1], None);
    grants.extend(expected(&LEASE_CALLS[1..], Some(lease_name)));
    grants
}

/// Asserts a (Cluster)RoleBinding binds `role_kind/role_name` to the operator's ServiceAccount.
fn assert_binds_operator(binding: &Value, role_kind: &str, role_name: &str) {
    assert_eq!(binding["roleRef"]["kind"], role_kind);
    assert_eq!(binding["roleRef"]["name"], role_name);
    assert_eq!(
        binding["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}])
    );
}

// ---------------------------------------------------------------------------------------
// tests

#[test]
fn chart_passes_helm_lint_and_strict_lint_in_every_mode() {
    let Some(helm) = helm() else { return };
    let modes: [&[&str]; 3] = [
        &[],
        &["--set", "watchNamespaces={a,b}"],
        &[
            "--set",
            "replicas=3",
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "grafanaDashboard.enabled=true",
        ],
    ];
    for strict in [false, true] {
        for mode in modes {
            let mut args = vec!["lint", CHART_DIR, "--namespace", NAMESPACE];
            if strict {
                args.push("--strict");
            }
            args.extend_from_slice(mode);
            let output = run_helm(&helm, &args);
            let text = output_text(&output);
            assert!(output.status.success(), "helm {args:?} failed:\n{text}");
            assert!(
                text.contains("1 chart(s) linted, 0 chart(s) failed"),
                "helm {args:?}:\n{text}"
            );
        }
    }
}

#[test]
fn default_install_is_cluster_wide_single_replica_without_leader_election() {
    let Some(helm) = helm() else { return };
    let objects = render(&helm, &[]);
    assert_eq!(
        kinds(&objects),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount"
        ]
        .map(String::from)
        .into(),
        "default install renders exactly these kinds"
    );
    let deployment = only(&objects, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 1);
    // One pod without a Lease: a rolling update would run two reconcilers side by side.
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");

    let container = operator_container(&objects);
    assert_eq!(
        container["image"],
        format!("ghcr.io/msgpipe/msgpipe:{}", env!("CARGO_PKG_VERSION")),
        "the image tag defaults to appVersion, which tracks the crate version"
    );
    assert_eq!(container["args"], serde_json::json!(["operator"]));

    let expected_env: BTreeMap<String, String> = [
        ("MSGPIPE_NAMESPACES", ""),
        ("MSGPIPE_RESYNC", "5m"),
        ("MSGPIPE_CONCURRENCY", "2048"),
        ("MSGPIPE_BROKER_CONCURRENCY", "8"),
        ("MSGPIPE_LISTEN", "0.0.0.0:8080"),
        ("MSGPIPE_LEADER_ELECTION", "false"),
        ("MSGPIPE_LEASE_NAME", FULLNAME),
        ("MSGPIPE_LEASE_NAMESPACE", NAMESPACE),
        ("MSGPIPE_LOG_FORMAT", "json"),
        ("MSGPIPE_SECRET_REFS", "true"),
        ("MSGPIPE_MESSAGE_BROKERS", "true"),
        ("MSGPIPE_OPERATOR_NAMESPACE", NAMESPACE),
        ("RUST_LOG", "info"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(env(&objects), expected_env);

    let downward: BTreeMap<&str, &str> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|var| {
            let field = var["valueFrom"]["fieldRef"]["fieldPath"].as_str()?;
            Some((var["name"].as_str()?, field))
        })
        .collect();
    assert_eq!(
        downward,
        BTreeMap::from([
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace")
        ])
    );

    assert_eq!(
        only(&objects, "ServiceAccount")["metadata"]["name"],
        FULLNAME
    );
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
        FULLNAME
    );
    assert_binds_operator(
        cluster_named(&objects, "ClusterRoleBinding", FULLNAME),
        "ClusterRole",
        FULLNAME,
    );
}

#[test]
fn operator_pod_runs_non_root_read_only_with_health_probes() {
    let Some(helm) = helm() else { return };
    let objects = render(&helm, &[]);
    let pod = &only(&objects, "Deployment")["spec"]["template"]["spec"];
    assert_eq!(pod["terminationGracePeriodSeconds"], 30);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );

    let container = operator_container(&objects);
    let security = &container["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["runAsUser"], 65532);
    assert_eq!(security["runAsGroup"], 65532);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(security["capabilities"].get("add").is_none());
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");

    assert_eq!(
        container["ports"],
        serde_json::json!([{"name": "http", "containerPort": 8080, "protocol": "TCP"}])
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], "http", "{probe}");
    }

    let resources = &container["resources"];
    assert_eq!(resources["requests"]["cpu"], "50m");
    assert_eq!(resources["requests"]["memory"], "64Mi");
    assert_eq!(resources["limits"]["memory"], "512Mi");

    let service = only(&objects, "Service");
    assert_eq!(
        service["spec"]["ports"],
        serde_json::json!([{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}])
    );
    assert_eq!(
        service["spec"]["selector"],
        only(&objects, "Deployment")["spec"]["selector"]["matchLabels"]
    );
}

#[test]
fn rbac_grants_exactly_the_operators_api_calls() {
    let Some(helm) = helm() else { return };
    let both = BrokerModes {
        secret_refs: true,
        message_brokers: true,
    };
    let cluster_wide = render(&helm, &[]);
    assert_eq!(rendered_roles(&cluster_wide), expected_roles(both, &[]));
    assert!(
        of_kind(&cluster_wide, "Role")
            .iter()
            .all(|r| r["metadata"]["name"] != format!("{FULLNAME}-leader-election")),
        "no Lease Role without leader election"
    );
    assert_binds_operator(
        cluster_named(
            &cluster_wide,
            "ClusterRoleBinding",
            &format!("{FULLNAME}-brokers"),
        ),
        "ClusterRole",
        &format!("{FULLNAME}-brokers"),
    );

    // Namespaced mode: MessageBrokers are off by default (no cluster-scoped RBAC).
    let namespaced = render(&helm, &["--set", "watchNamespaces={a,b}"]);
    let tenant_secrets_only = BrokerModes {
        secret_refs: true,
        message_brokers: false,
    };
    assert_eq!(
        rendered_roles(&namespaced),
        expected_roles(tenant_secrets_only, &["a", "b"])
    );
    let namespaced_brokers = render(
        &helm,
        &[
            "--set",
            "watchNamespaces={a,b}",
            "--set",
            "brokers.messageBrokers=true",
        ],
    );
    assert_eq!(
        rendered_roles(&namespaced_brokers),
        expected_roles(both, &["a", "b"])
    );

    let leader = render(&helm, &["--set", "replicas=3"]);
    let lease_role = named(
        &leader,
        "Role",
        NAMESPACE,
        &format!("{FULLNAME}-leader-election"),
    );
    assert_eq!(granted(lease_role), lease_grants(FULLNAME));
    assert_eq!(
        granted(cluster_named(&leader, "ClusterRole", FULLNAME)),
        granted(cluster_named(&cluster_wide, "ClusterRole", FULLNAME)),
        "leader election adds no cluster-wide rule"
    );
}

#[test]
fn message_brokers_only_mode_grants_no_secret_outside_the_release_namespace() {
    let Some(helm) = helm() else { return };
    let modes = BrokerModes {
        secret_refs: false,
        message_brokers: true,
    };
    for extra in [&[][..], &["--set", "watchNamespaces={a,b}"][..]] {
        let mut args = vec!["--set", "brokers.secretRefs=false"];
        args.extend_from_slice(extra);
        if !extra.is_empty() {
            args.extend(["--set", "brokers.messageBrokers=true"]);
        }
        let objects = render(&helm, &args);
        let roles = rendered_roles(&objects);
        let watch: &[&str] = if extra.is_empty() { &[] } else { &["a", "b"] };
        assert_eq!(roles, expected_roles(modes, watch), "{args:?}");
        for ((kind, namespace, name), grants) in &roles {
            let reads_secrets = grants
                .iter()
                .any(|(group, resource, _, _)| group.is_empty() && resource == "secrets");
            assert!(
                !reads_secrets || (kind == "Role" && namespace == NAMESPACE),
                "{kind} {namespace}/{name} grants Secrets outside {NAMESPACE}: {grants:?}"
            );
        }
        let env = env(&objects);
        assert_eq!(env["MSGPIPE_SECRET_REFS"], "false");
        assert_eq!(env["MSGPIPE_MESSAGE_BROKERS"], "true");
        assert_eq!(env["MSGPIPE_OPERATOR_NAMESPACE"], NAMESPACE);
    }
    // The tenant-Secret grant is exactly TENANT_SECRET_CALLS, which this mode drops.
    assert!(
        TENANT_SECRET_CALLS
            .iter()
            .all(|c| c.resource == "secrets" && c.group.is_empty())
    );
    let none = run_helm(
        &helm,
        &[
            "template",
            RELEASE,
            CHART_DIR,
            "--namespace",
            NAMESPACE,
            "--set",
            "brokers.secretRefs=false",
            "--set",
            "brokers.messageBrokers=false",
        ],
    );
    assert!(!none.status.success(), "both modes off must be refused");
}

#[test]
fn disabling_alerts_is_allowed_to_delete_the_prometheus_rule_in_every_mode() {
    let Some(helm) = helm() else { return };
    let delete_rule = (
        "monitoring.coreos.com".to_string(),
        "prometheusrules".to_string(),
        "delete".to_string(),
        None,
    );
    let cluster_wide = render(&helm, &[]);
    assert!(granted(cluster_named(&cluster_wide, "ClusterRole", FULLNAME)).contains(&delete_rule));
    let namespaced = render(&helm, &["--set", "watchNamespaces={a}"]);
    assert!(granted(named(&namespaced, "Role", "a", FULLNAME)).contains(&delete_rule));
}

#[test]
fn namespaced_mode_has_one_role_per_namespace_and_no_cluster_scoped_rbac() {
    let Some(helm) = helm() else { return };
    let objects = render(&helm, &["--set", "watchNamespaces={a,b}"]);
    for kind in ["ClusterRole", "ClusterRoleBinding"] {
        assert!(
            of_kind(&objects, kind).is_empty(),
            "{kind} in namespaced mode"
        );
    }
    for object in &objects {
        assert!(
            object["metadata"]["namespace"].is_string(),
            "cluster-scoped object in namespaced mode: {} {}",
            object["kind"],
            object["metadata"]["name"]
        );
    }

    let role_namespaces: Vec<&str> = of_kind(&objects, "Role")
        .iter()
        .map(|r| r["metadata"]["namespace"].as_str().expect("namespace"))
        .collect();
    assert_eq!(
        role_namespaces,
        ["a", "b"],
        "one Role per watched namespace"
    );
    for namespace in ["a", "b"] {
        let binding = named(&objects, "RoleBinding", namespace, FULLNAME);
        assert_binds_operator(binding, "Role", FULLNAME);
    }
    assert_eq!(env(&objects)["MSGPIPE_NAMESPACES"], "a,b");
}

#[test]
fn three_replicas_turn_on_leader_election_and_a_disruption_budget() {
    let Some(helm) = helm() else { return };
    let objects = render(&helm, &["--set", "replicas=3"]);
    let env = env(&objects);
    assert_eq!(env["MSGPIPE_LEADER_ELECTION"], "true");
    assert_eq!(env["MSGPIPE_LEASE_NAME"], FULLNAME);
    assert_eq!(env["MSGPIPE_LEASE_NAMESPACE"], NAMESPACE);

    let deployment = only(&objects, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert_eq!(deployment["spec"]["strategy"]["type"], "RollingUpdate");

    let lease_binding = named(
        &objects,
        "RoleBinding",
        NAMESPACE,
        &format!("{FULLNAME}-leader-election"),
    );
    assert_binds_operator(
        lease_binding,
        "Role",
        &format!("{FULLNAME}-leader-election"),
    );

    let pdb = only(&objects, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
}

#[test]
fn leader_election_can_be_forced_for_a_single_replica_with_its_own_lease_name() {
    let Some(helm) = helm() else { return };
    let objects = render(
        &helm,
        &[
            "--set",
            "leaderElection.enabled=true",
            "--set",
            "leaderElection.leaseName=msgpipe-leader",
        ],
    );
    let env = env(&objects);
    assert_eq!(env["MSGPIPE_LEADER_ELECTION"], "true");
    assert_eq!(env["MSGPIPE_LEASE_NAME"], "msgpipe-leader");
    let lease_role = named(
        &objects,
        "Role",
        NAMESPACE,
        &format!("{FULLNAME}-leader-election"),
    );
    assert_eq!(granted(lease_role), lease_grants("msgpipe-leader"));
    assert!(
        of_kind(&objects, "PodDisruptionBudget").is_empty(),
        "a PDB with one replica would block node drains"
    );
}

#[test]
fn values_schema_rejects_bad_values() {
    let Some(helm) = helm() else { return };
    let bad = [
        ("replicas=two", "replicas"),
        ("logFormat=xml", "logFormat"),
        ("resync=5 minutes", "resync"),
        ("concurrency=0", "concurrency"),
        ("watchNamespaces={Not_A_Namespace}", "watchNamespaces"),
        ("replicaCount=2", "replicaCount"),
        ("serviceMonitor.enable=true", "enable"),
    ];
    for (setting, field) in bad {
        let output = template_in(&helm, &repo_path(CHART_DIR), &["--set", setting]);
        let text = output_text(&output);
        assert!(!output.status.success(), "helm accepted --set {setting}");
        assert!(
            text.contains("schema") && text.contains(field),
            "--set {setting}: the error should name the schema and {field}:\n{text}"
        );
    }
    // The same keys with good values render.
    render(
        &helm,
        &[
            "--set",
            "replicas=2",
            "--set",
            "logFormat=text",
            "--set",
            "resync=1h30m",
            "--set",
            "concurrency=16",
        ],
    );
}

#[test]
fn chart_crds_are_the_committed_crds_byte_for_byte() {
    const CRDS: [&str; 3] = [
        "messagepipelines.msgpipe.io",
        "deadletterreplays.msgpipe.io",
        "messagebrokers.msgpipe.io",
    ];
    for crd in CRDS {
        let committed =
            std::fs::read(repo_path(&format!("crds/{crd}.yaml"))).expect("committed CRD");
        let in_chart = std::fs::read(repo_path(&format!("{CHART_DIR}/crds/{crd}.yaml")))
            .expect("the chart's copy");
        assert!(
            committed == in_chart,
            "the chart's CRD differs from crds/: cp crds/{crd}.yaml {CHART_DIR}/crds/"
        );
    }

    let Some(helm) = helm() else { return };
    let objects = render(&helm, &["--include-crds"]);
    let names: BTreeSet<&str> = of_kind(&objects, "CustomResourceDefinition")
        .iter()
        .filter_map(|crd| crd["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, BTreeSet::from(CRDS));
}

#[test]
fn the_optional_oncall_role_may_only_run_replays_and_matches_the_example() {
    let Some(helm) = helm() else { return };
    assert!(
        of_kind(&render(&helm, &[]), "Role")
            .iter()
            .all(|r| r["metadata"]["name"] == format!("{FULLNAME}-broker-secrets")),
        "off by default (the one Role is the MessageBrokers' Secrets)"
    );
    let objects = render(
        &helm,
        &[
            "--set",
            "replayOncallRole.enabled=true",
            "--set",
            "replayOncallRole.namespaces={notes-app,billing}",
            "--set",
            "replayOncallRole.groups={notes-oncall}",
        ],
    );
    let name = format!("{FULLNAME}-replay-oncall");
    let verbs = ["create", "delete", "get", "list", "watch"];
    let expected: BTreeSet<(String, String, String, Option<String>)> = verbs
        .iter()
        .map(|verb| {
            (
                "msgpipe.io".to_string(),
                "deadletterreplays".to_string(),
                verb.to_string(),
                None,
            )
        })
        .collect();
    for namespace in ["notes-app", "billing"] {
        let role = named(&objects, "Role", namespace, &name);
        assert_eq!(granted(role), expected, "Role in {namespace}");
        let binding = named(&objects, "RoleBinding", namespace, &name);
        assert_eq!(binding["subjects"][0]["kind"], "Group");
        assert_eq!(binding["subjects"][0]["name"], "notes-oncall");
    }
    let example =
        std::fs::read_to_string(repo_path("examples/replays/oncall-role.yaml")).expect("example");
    let documents: Vec<Value> = serde_saphyr::from_multiple(&example).expect("YAML");
    assert_eq!(
        granted(&documents[0]),
        expected,
        "the example grants the same"
    );
}

#[test]
fn grafana_dashboard_configmap_renders_only_when_enabled_and_carries_the_sidecar_label() {
    let Some(helm) = helm() else { return };
    assert!(
        of_kind(&render(&helm, &[]), "ConfigMap").is_empty(),
        "no dashboard unless enabled"
    );

    let dashboard = std::fs::read_to_string(repo_path(DASHBOARD_FILE))
        .unwrap_or_else(|e| panic!("{DASHBOARD_FILE}: {e}"));
    let objects = render(&helm, &["--set", "grafanaDashboard.enabled=true"]);
    let config_map = only(&objects, "ConfigMap");
    assert_eq!(config_map["metadata"]["namespace"], NAMESPACE);
    assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped = config_map["data"]["msgpipe-pipelines.json"]
        .as_str()
        .expect("the dashboard is in the ConfigMap");
    assert_eq!(shipped.trim_end(), dashboard.trim_end());
    let json: Value = serde_json::from_str(shipped).expect("the dashboard is JSON");
    assert!(json["panels"].is_array(), "a Grafana dashboard has panels");

    let relabelled = render(
        &helm,
        &[
            "--set",
            "grafanaDashboard.enabled=true",
            "--set",
            "grafanaDashboard.label=dashboards",
            "--set",
            "grafanaDashboard.labelValue=msgpipe",
            "--set",
            "grafanaDashboard.namespace=monitoring",
        ],
    );
    let config_map = only(&relabelled, "ConfigMap");
    assert_eq!(config_map["metadata"]["labels"]["dashboards"], "msgpipe");
    assert!(
        config_map["metadata"]["labels"]
            .get("grafana_dashboard")
            .is_none()
    );
    assert_eq!(config_map["metadata"]["namespace"], "monitoring");
}

#[test]
fn enabling_the_dashboard_without_its_file_fails_instead_of_shipping_an_empty_one() {
    let Some(helm) = helm() else { return };
    let copy = tempfile::tempdir().expect("tempdir");
    let chart = copy.path().join("msgpipe-operator");
    copy_dir(&repo_path(CHART_DIR), &chart, &|p| {
        p.ends_with("dashboards")
    });
    let output = template_in(&helm, &chart, &["--set", "grafanaDashboard.enabled=true"]);
    let text = output_text(&output);
    assert!(
        !output.status.success(),
        "rendered without the dashboard:\n{text}"
    );
    assert!(text.contains("dashboards/msgpipe-pipelines.json"), "{text}");
}

#[test]
fn service_monitor_renders_only_when_enabled_and_scrapes_the_metrics_port() {
    let Some(helm) = helm() else { return };
    assert!(of_kind(&render(&helm, &[]), "ServiceMonitor").is_empty());
    let objects = render(
        &helm,
        &[
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "serviceMonitor.labels.release=kube-prometheus-stack",
        ],
    );
    let monitor = only(&objects, "ServiceMonitor");
    assert_eq!(
        monitor["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "http");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"],
        only(&objects, "Service")["metadata"]["labels"]
            .as_object()
            .map(|labels| {
                let mut selected = serde_json::Map::new();
                for key in ["app.kubernetes.io/name", "app.kubernetes.io/instance"] {
                    selected.insert(key.to_string(), labels[key].clone());
                }
                Value::Object(selected)
            })
            .expect("service labels")
    );
}

/// Copies a directory tree, leaving out paths for which `skip` is true.
fn copy_dir(from: &Path, to: &Path, skip: &dyn Fn(&Path) -> bool) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let path = entry.expect("entry").path();
        if skip(&path) {
            continue;
        }
        let target = to.join(path.file_name().expect("file name"));
        if path.is_dir() {
            copy_dir(&path, &target, skip);
        } else {
            std::fs::copy(&path, &target).expect("copy file");
        }
    }
}
