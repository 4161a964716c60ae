//! `managementPolicy: Observe` through the operator, on the mocked API and the in-memory
//! broker: Observe writes no broker object, no ConfigMap and no PrometheusRule (the exact
//! call list), and the status lists the differences; switched to Full, the operator takes
//! over; observed again once converged, there is no difference and Ready is True.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use kube::runtime::controller::Action;
use msgpipe::api::MessagePipeline;
use msgpipe::broker::MemoryBroker;
use msgpipe::controller::{
    BROKER_CONCURRENCY, BrokerPool, Context, Metrics, OperatorConfig, error_policy, reconcile,
};
use serde_json::{Value, json};

use super::fake_api::{Call, FakeApi};
use super::{PIPELINE, SECRET, notes_object};

const VHOST: &str = "observed";

struct Observed {
    api: FakeApi,
    ctx: Arc<Context<MemoryBroker>>,
    broker_writes: Arc<Mutex<Vec<String>>>,
    _server: tokio::task::JoinHandle<()>,
}

impl Observed {
    fn new(policy: &str) -> Self {
        let api = FakeApi::default();
        api.set_crd(true);
        let mut pipeline = notes_object(VHOST, "Delete");
        pipeline["spec"]["managementPolicy"] = json!(policy);
        api.put(PIPELINE, pipeline);
        api.put(
            SECRET,
            json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "rabbitmq-admin", "namespace": super::NS},
                "stringData": {"uri": "amqp://app:Sup3r-Secret-Pw@rabbit.invalid:5672/%2f"}
            }),
        );
        let broker =
            Arc::new(MemoryBroker::new("amqp://app@rabbit.invalid:5672").with_vhost(VHOST, 4));
        let broker_writes = Arc::new(Mutex::new(Vec::new()));
        let to_writes = broker_writes.clone();
        broker.on_write(move |_, action| {
            to_writes.lock().expect("writes").push(action.to_string());
        });
        let brokers = BrokerPool::with_connector(
            Duration::from_secs(5),
            BROKER_CONCURRENCY,
            Box::new(move |_, _| Ok(broker.clone())),
        );
        let (client, server) = api.client();
        let ctx = Arc::new(Context::with_brokers(
            client,
            Arc::new(Metrics::default()),
            OperatorConfig::default(),
            brokers,
        ));
        Self {
            api,
            ctx,
            broker_writes,
            _server: server,
        }
    }

    async fn reconcile(&self) -> (Result<Action, String>, Vec<Call>) {
        let object = self.api.get(PIPELINE).expect("pipeline stored");
        let pipeline: Arc<MessagePipeline> =
            Arc::new(serde_json::from_value(object).expect("pipeline"));
        let result = reconcile(pipeline.clone(), self.ctx.clone())
            .await
            .map_err(|error| {
                let action = error_policy(pipeline, &error, self.ctx.clone());
                format!("{error} -> {action:?}")
            });
        (result, self.api.take_calls())
    }

    fn set_policy(&self, policy: &str) {
        let mut object = self.api.get(PIPELINE).expect("pipeline");
        object["spec"]["managementPolicy"] = json!(policy);
        let generation = object["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
        object["metadata"]["generation"] = json!(generation);
        self.api.put(PIPELINE, object);
    }

    fn status(&self) -> Value {
        self.api.get(PIPELINE).expect("pipeline")["status"].clone()
    }

    fn condition(&self, kind: &str) -> (String, String) {
        let status = self.status();
        let found = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == kind)
            .cloned()
            .unwrap_or_default();
        (
            found["status"].as_str().unwrap_or_default().into(),
            found["reason"].as_str().unwrap_or_default().into(),
        )
    }

    fn take_broker_writes(&self) -> Vec<String> {
        std::mem::take(&mut *self.broker_writes.lock().expect("writes"))
    }
}

/// Writes other than events (which an operator may always record).
fn writes(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| c.method != Method::GET && !c.is_event())
        .map(Call::line)
        .collect()
}

#[tokio::test]
async fn observe_writes_nothing_but_its_status_lists_the_differences_and_full_takes_over() {
    let world = Observed::new("Observe");
    // The first pass adds the finalizer (so a later Full can clean up) and observes.
    let (result, calls) = world.reconcile().await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(world.take_broker_writes(), Vec::<String>::new());
    assert_eq!(
        writes(&calls),
        [
            format!("PATCH {PIPELINE}"),
            format!("PATCH {PIPELINE}/status")
        ]
    );
    assert!(
        !calls
            .iter()
            .any(|c| c.path.contains("configmaps") || c.path.contains("prometheusrules")),
        "Observe neither reads nor writes owned objects: {:?}",
        calls.iter().map(Call::line).collect::<Vec<_>>()
    );
    let status = world.status();
    let differences = status["differences"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        differences.contains(&json!({
            "object": "exchange notes", "field": "exists",
            "desired": "direct exchange", "action": "would create exchange notes (direct)"
        })),
        "{differences:#?}"
    );
    assert!(differences.iter().all(|d| {
        d["action"]
            .as_str()
            .is_some_and(|a| a.starts_with("would "))
    }));
    assert_eq!(
        world.condition("Ready"),
        ("False".into(), "Observing".into())
    );
    assert_eq!(
        world.condition("BrokerReady"),
        ("False".into(), "Observing".into())
    );
    // Observed again, nothing changed: no write at all.
    let (_, calls) = world.reconcile().await;
    assert_eq!(writes(&calls), Vec::<String>::new());

    world.set_policy("Full");
    let (result, calls) = world.reconcile().await;
    assert!(result.is_ok(), "{result:?}");
    let broker = world.take_broker_writes();
    assert!(
        broker.contains(&"create exchange notes (direct)".to_string()),
        "{broker:?}"
    );
    assert!(
        writes(&calls).iter().any(|w| w.contains("configmaps")),
        "{calls:?}"
    );
    assert_eq!(
        world.condition("BrokerReady"),
        ("True".into(), "Converged".into())
    );
    assert_eq!(
        world.status()["differences"],
        Value::Null,
        "cleared under Full"
    );

    world.set_policy("Observe");
    let (_, _) = world.reconcile().await;
    assert_eq!(world.take_broker_writes(), Vec::<String>::new());
    assert_eq!(world.status()["differences"], Value::Null);
    assert_eq!(
        world.condition("Ready"),
        ("True".into(), "Observing".into())
    );
}
