//! MessageBroker status: whether the broker answers with its Secret's credentials, its version,
//! and the features msgpipe relies on. Checked at every resync and whenever the object changes;
//! written only when something in it changed, like a pipeline's.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::json;
use tracing::{debug, info};

use super::status::{Verdict, build_condition};
use super::{Context, Error, describe};
use crate::api::broker::BrokerFeatures;
use crate::api::condition::READY;
use crate::api::{MessageBroker, MessageBrokerStatus, Reason};
use crate::broker::RabbitBroker;
use crate::k8s::{FIELD_MANAGER, KubeError, message_broker_endpoint};

/// What checking a broker found: its version and plugins, or why it could not be checked.
pub type Probe = Result<(String, Vec<String>), (Reason, String)>;

/// The status a broker should have after `probe`, or None when `stored` already says it.
pub fn next_broker_status(
    stored: Option<&MessageBrokerStatus>,
    generation: Option<i64>,
    probe: &Probe,
    now: &Time,
) -> Option<MessageBrokerStatus> {
    let (verdict, version, features) = match probe {
        Ok((version, plugins)) => (
            Verdict::ok(
                Reason::Converged,
                format!("RabbitMQ {version} answers with the Secret's credentials"),
            ),
            Some(version.clone()),
            Some(BrokerFeatures::of(version, plugins)),
        ),
        // What was known of a broker that stopped answering stays: it is still that broker.
        Err((reason, message)) => (
            Verdict::failed(*reason, message),
            stored.and_then(|s| s.version.clone()),
            stored.and_then(|s| s.features.clone()),
        ),
    };
    let conditions = stored.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let next = MessageBrokerStatus {
        observed_generation: generation,
        conditions: vec![build_condition(
            READY, &verdict, generation, conditions, now,
        )],
        version,
        features,
    };
    (stored != Some(&next)).then_some(next)
}

/// Runs the MessageBroker status controller until `shutdown` resolves.
pub async fn run_broker_status(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api = Api::<MessageBroker>::all(ctx.client.clone());
    Controller::new(api, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(
            check_broker,
            |_, _, ctx| Action::requeue(ctx.config.resync),
            ctx,
        )
        .for_each(|result| async move {
            if let Err(error) = result {
                debug!(%error, "MessageBroker status");
            }
        })
        .await;
}

async fn check_broker(broker: Arc<MessageBroker>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = broker.name_any();
    let probe = probe(&broker, &ctx).await;
    let now = Time(Timestamp::now());
    let next = next_broker_status(
        broker.status.as_ref(),
        broker.metadata.generation,
        &probe,
        &now,
    );
    if let Some(status) = next {
        info!(broker = %name, ready = probe.is_ok(), "MessageBroker status changed");
        let patch = json!({
            "apiVersion": "msgpipe.io/v1alpha1", "kind": "MessageBroker", "status": status,
        });
        Api::<MessageBroker>::all(ctx.client.clone())
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(KubeError::api(format!(
                "write the status of MessageBroker {name}"
            )))?;
    }
    Ok(Action::requeue(ctx.config.resync))
}

/// Reads the broker's Secret and asks the broker for its version and plugins, on a client of
/// its own (closed right after: a check every resync is not worth a pooled connection).
async fn probe(broker: &MessageBroker, ctx: &Context) -> Probe {
    let described = |error: Error| describe(&error);
    let endpoint = message_broker_endpoint(
        &ctx.client,
        &ctx.config.brokers.operator_namespace,
        &broker.spec,
        "/",
    )
    .await
    .map_err(|e| described(Error::Kube(e)))?;
    let timeout = ctx.config.broker_timeout.min(Duration::from_secs(15));
    let client = RabbitBroker::new(endpoint, timeout).map_err(|e| described(Error::Broker(e)))?;
    let info = client.server_info().await;
    client.close().await;
    info.map_err(|e| described(Error::Broker(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).expect("timestamp"))
    }

    #[test]
    fn a_broker_status_is_written_on_change_only_and_keeps_its_transition_time() {
        let up: Probe = Ok(("4.3.6".into(), vec!["rabbitmq_shovel".into()]));
        let first = next_broker_status(None, Some(1), &up, &at(0)).expect("new status");
        assert_eq!(first.version.as_deref(), Some("4.3.6"));
        let features = first.features.clone().expect("features");
        assert!(features.shovel && !features.nack_counts_toward_delivery_limit);
        assert_eq!(first.conditions[0].status, "True");
        assert_eq!(
            next_broker_status(Some(&first), Some(1), &up, &at(60)),
            None,
            "nothing changed: no write"
        );

        let down: Probe = Err((
            Reason::BrokerAuthenticationFailed,
            "broker amqp://msgpipe@rabbit:5672 refused the credentials of user \"msgpipe\"".into(),
        ));
        let failed = next_broker_status(Some(&first), Some(1), &down, &at(120)).expect("flip");
        assert_eq!(failed.conditions[0].status, "False");
        assert_eq!(failed.conditions[0].reason, "BrokerAuthenticationFailed");
        assert_eq!(failed.conditions[0].last_transition_time, at(120));
        assert_eq!(
            failed.version.as_deref(),
            Some("4.3.6"),
            "still that broker"
        );
        let again = next_broker_status(Some(&failed), Some(1), &down, &at(180));
        assert_eq!(again, None);
    }
}
