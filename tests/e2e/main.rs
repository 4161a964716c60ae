//! End-to-end suite against a real Kubernetes cluster (kind, k3d, or any other).
//!
//! Skipped, with a message, unless `MSGPIPE_E2E_KUBECONFIG` names a kubeconfig. Needs a
//! RabbitMQ that both the cluster and this test can reach:
//!   MSGPIPE_E2E_BROKER_URI         amqp://user:pass@host:5672/ as the operator should use it
//!   MSGPIPE_E2E_MANAGEMENT_URI     http://host:15672 (optional)
//! The operator runs inside this test process (the same code as `msgpipe operator`), so no
//! image has to be built. See docs/operator.md, "End-to-end tests", for kind/k3d recipes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, CustomResourceExt};
use msgpipe::api::MessagePipeline;
use msgpipe::api::load::parse_pipelines;
use msgpipe::broker::{BrokerApi, BrokerEndpoint, RabbitBroker};
use msgpipe::controller::{Context, Metrics, OperatorConfig, run_controller};

struct Cluster {
    client: Client,
    broker_uri: String,
    management_uri: Option<String>,
}

async fn cluster() -> Option<Cluster> {
    let Ok(path) = std::env::var("MSGPIPE_E2E_KUBECONFIG") else {
        println!(
            "skipped: no cluster (set MSGPIPE_E2E_KUBECONFIG and MSGPIPE_E2E_BROKER_URI to run the end-to-end suite)"
        );
        return None;
    };
    let Ok(broker_uri) = std::env::var("MSGPIPE_E2E_BROKER_URI") else {
        panic!(
            "MSGPIPE_E2E_KUBECONFIG is set but MSGPIPE_E2E_BROKER_URI is not: the suite needs a broker"
        );
    };
    msgpipe::broker::install_crypto_provider();
    let kubeconfig = Kubeconfig::read_from(&path).expect("kubeconfig readable");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig valid");
    Some(Cluster {
        client: Client::try_from(config).expect("client"),
        broker_uri,
        management_uri: std::env::var("MSGPIPE_E2E_MANAGEMENT_URI").ok(),
    })
}

async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn condition(pipeline: &MessagePipeline, kind: &str) -> Option<(String, String)> {
    let c = pipeline
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == kind)?;
    Some((c.status.clone(), c.reason.clone()))
}

#[tokio::test]
async fn the_notes_example_converges_in_a_real_cluster_and_is_cleaned_up() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let client = cluster.client.clone();
    let apply = PatchParams::apply("msgpipe-e2e").force();

    // CRD, namespace, broker Secret.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "messagepipelines.msgpipe.io",
        &apply,
        &Patch::Apply(MessagePipeline::crd()),
    )
    .await
    .expect("CRD applied");
    // The operator watches DeadLetterReplays too.
    crds.patch(
        "deadletterreplays.msgpipe.io",
        &apply,
        &Patch::Apply(msgpipe::api::DeadLetterReplay::crd()),
    )
    .await
    .expect("replay CRD applied");
    tokio::time::sleep(Duration::from_secs(3)).await; // let the API server serve the new type
    let namespace = format!("msgpipe-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut ns = Namespace::default();
    ns.metadata.name = Some(namespace.clone());
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
    let mut data = BTreeMap::from([("uri".to_string(), cluster.broker_uri.clone())]);
    if let Some(m) = &cluster.management_uri {
        data.insert("managementUri".into(), m.clone());
    }
    let mut secret = Secret::default();
    secret.metadata.name = Some("rabbitmq-admin".into());
    secret.string_data = Some(data);
    Api::<Secret>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &secret)
        .await
        .expect("Secret");

    // The operator, in-process, watching only this namespace.
    let ctx = Arc::new(Context::new(
        client.clone(),
        Arc::new(Metrics::default()),
        OperatorConfig {
            resync: Duration::from_secs(30),
            ..OperatorConfig::default()
        },
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(run_controller(
        ctx.clone(),
        Some(namespace.clone()),
        async move {
            let _ = stopped.await;
        },
    ));

    // The notes example, on a vhost of its own name space, deletionPolicy Delete.
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/notes-pipeline.yaml"
    ))
    .expect("example");
    let mut pipeline = parse_pipelines(&text).expect("parses").remove(0);
    pipeline.metadata.namespace = Some(namespace.clone());
    pipeline.spec.broker.vhost = None;
    pipeline.spec.deletion_policy = msgpipe::api::DeletionPolicy::Delete;
    let pipelines: Api<MessagePipeline> = Api::namespaced(client.clone(), &namespace);
    pipelines
        .patch("notes", &apply, &Patch::Apply(&pipeline))
        .await
        .expect("pipeline applied");

    let ready = wait_for("Ready=True", Duration::from_secs(120), async || {
        let p = pipelines.get("notes").await.ok()?;
        (condition(&p, "BrokerReady")?.0 == "True").then_some(p)
    })
    .await;
    let status = ready.status.clone().expect("status");
    assert_eq!(status.retry_tiers, Some(4));
    assert_eq!(status.observed_generation, ready.metadata.generation);
    let alerts = condition(&ready, "AlertsReady").expect("AlertsReady");
    println!(
        "AlertsReady: {alerts:?} (PrometheusRuleCRDMissing is expected on a cluster without prometheus-operator)"
    );

    let config_map = Api::<ConfigMap>::namespaced(client.clone(), &namespace)
        .get("notes-client")
        .await
        .expect("client ConfigMap");
    assert!(config_map.data.expect("data")["pipeline.json"].contains("notes_queue_dlq"));

    let endpoint =
        BrokerEndpoint::new(&cluster.broker_uri, cluster.management_uri.as_deref(), None)
            .expect("endpoint");
    let vhost = endpoint.uri_vhost();
    let broker = RabbitBroker::new(endpoint, Duration::from_secs(15)).expect("broker");
    let live = broker.snapshot(&vhost).await.expect("snapshot");
    for queue in [
        "notes_queue",
        "notes_queue_dlq",
        "notes_queue.retry.1.1s",
        "notes_queue.retry.4.8s",
    ] {
        assert!(live.queues.contains_key(queue), "{queue} on the broker");
    }

    // Deletion: the finalizer runs the safe teardown and lets go.
    pipelines
        .delete("notes", &DeleteParams::default())
        .await
        .expect("delete");
    wait_for(
        "the pipeline to be gone",
        Duration::from_secs(120),
        async || {
            pipelines
                .get_opt("notes")
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await;
    let live = broker.snapshot(&vhost).await.expect("snapshot");
    assert!(
        !live.queues.contains_key("notes_queue"),
        "empty work queue deleted"
    );
    broker.close().await;

    let _ = stop.send(());
    let _ = operator.await;
    let _ = namespaces
        .delete(&namespace, &DeleteParams::default())
        .await;
}
