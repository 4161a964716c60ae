//! MessagePipelines the API server admitted but msgpipe cannot decode (a field of the wrong
//! type, a duration that overflows, anything an older CRD let through).
//!
//! The controller watches pipelines untyped and decodes each object on its own
//! ([`split`]): one such object can then never fail the watcher's list, which would stop
//! every pipeline in every namespace after a restart or relist. It stays out of the typed
//! store (so nothing reconciles it from an older, decodable version either) and [`run`]
//! reports it: `Ready=False` with reason `InvalidSpec` and a one-line message naming the
//! field, written to the status without decoding the spec, and a Warning event.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::reconcile::FINALIZER;
use super::status::{Observation, next_status};
use super::{Context, PooledBroker};
use crate::api::load::{API_VERSION, KIND, decode_stored};
use crate::api::reason::one_line;
use crate::api::validate::FieldError;
use crate::api::{
    AlertsSpec, BrokerSpec, ClientFlags, DeadLetterSpec, DeletionPolicy, MessagePipeline,
    MessagePipelineSpec, MessagePipelineStatus, QueueSpec, Reason, RetrySpec,
};
use crate::k8s::{FIELD_MANAGER, KubeError};

/// How long a failed report waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// Which object to report (namespace, name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Key {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Key {
    fn of(object: &DynamicObject) -> Self {
        Self {
            namespace: object.namespace().unwrap_or_default(),
            name: object.name_any(),
        }
    }
}

/// Decodes one stored object as a MessagePipeline, or says which field it cannot read.
pub(crate) fn decode(object: &DynamicObject) -> Result<MessagePipeline, FieldError> {
    let value = serde_json::to_value(object)
        .map_err(|e| FieldError::new("(object)", format!("cannot be read: {e}")))?;
    decode_stored(value)
}

/// Turns one untyped watch event into the typed event the reflector and controller see.
/// An object that cannot be decoded is sent to `bad` for [`run`] to report; if it was
/// applied, the typed side sees a deletion, so an older decodable version of it leaves the
/// store instead of being reconciled from a spec the user has since replaced.
pub(crate) fn split(
    event: watcher::Event<DynamicObject>,
    bad: &mpsc::UnboundedSender<Key>,
) -> Option<watcher::Event<MessagePipeline>> {
    let report = |object: &DynamicObject, error: &FieldError| {
        let key = Key::of(object);
        warn!(pipeline = %key, field = %error.path, "cannot decode MessagePipeline; reported as InvalidSpec, the others go on");
        // The receiver lives as long as the controller; a send after shutdown is moot.
        let _ = bad.send(key);
    };
    match event {
        watcher::Event::Init => Some(watcher::Event::Init),
        watcher::Event::InitDone => Some(watcher::Event::InitDone),
        watcher::Event::InitApply(object) => match decode(&object) {
            Ok(pipeline) => Some(watcher::Event::InitApply(pipeline)),
            Err(error) => {
                report(&object, &error);
                None
            }
        },
        watcher::Event::Apply(object) => match decode(&object) {
            Ok(pipeline) => Some(watcher::Event::Apply(pipeline)),
            Err(error) => {
                report(&object, &error);
                Some(watcher::Event::Delete(placeholder(&object)))
            }
        },
        watcher::Event::Delete(object) => match decode(&object) {
            Ok(pipeline) => Some(watcher::Event::Delete(pipeline)),
            Err(_) => {
                let _ = bad.send(Key::of(&object));
                Some(watcher::Event::Delete(placeholder(&object)))
            }
        },
    }
}

/// A pipeline carrying only the object's metadata: enough for the store to drop it by key.
fn placeholder(object: &DynamicObject) -> MessagePipeline {
    let spec = MessagePipelineSpec {
        broker: BrokerSpec {
            secret_ref: None,
            broker_ref: None,
            vhost: None,
        },
        queue: QueueSpec::default(),
        retry: RetrySpec::default(),
        dead_letter: DeadLetterSpec::default(),
        alerts: AlertsSpec::default(),
        client_flags: ClientFlags::default(),
        deletion_policy: DeletionPolicy::default(),
        management_policy: Default::default(),
    };
    let mut pipeline = MessagePipeline::new(&object.name_any(), spec);
    pipeline.metadata = object.metadata.clone();
    pipeline
}

/// Reports every key sent by [`split`] until the controller (and with it every sender but
/// `retry`, which is weak) is gone. A report that fails is tried again after a pause.
pub(crate) async fn run<B: PooledBroker>(
    ctx: Arc<Context<B>>,
    resource: ApiResource,
    mut bad: mpsc::UnboundedReceiver<Key>,
    retry: mpsc::WeakUnboundedSender<Key>,
) {
    while let Some(key) = bad.recv().await {
        if let Err(error) = report(&ctx, &resource, &key).await {
            warn!(pipeline = %key, %error, "cannot report an undecodable MessagePipeline; trying again");
            let retry = retry.clone();
            tokio::spawn(async move {
                tokio::time::sleep(RETRY_AFTER).await;
                if let Some(sender) = retry.upgrade() {
                    let _ = sender.send(key);
                }
            });
        }
    }
}

/// Reads the object afresh and, if it still cannot be decoded, writes its InvalidSpec status
/// (when it says something new) and a Warning event; a deleted one is released.
async fn report<B: PooledBroker>(
    ctx: &Context<B>,
    resource: &ApiResource,
    key: &Key,
) -> Result<(), KubeError> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &key.namespace, resource);
    let object = api
        .get_opt(&key.name)
        .await
        .map_err(KubeError::api(format!("read MessagePipeline {key}")))?;
    let Some(object) = object else {
        ctx.metrics.set_ready(&key.to_string(), None);
        return Ok(());
    };
    let error = match decode(&object) {
        // Fixed meanwhile: the typed watch has it.
        Ok(_) => return Ok(()),
        Err(error) => error,
    };
    let message = one_line(&error.to_string());
    if object.metadata.deletion_timestamp.is_some() {
        ctx.metrics.set_ready(&key.to_string(), None);
        return release(ctx, resource, &api, &object, key, &message).await;
    }
    ctx.metrics.set_ready(&key.to_string(), Some(false));
    let stored: Option<MessagePipelineStatus> = object
        .data
        .get("status")
        .and_then(|status| serde_json::from_value(status.clone()).ok());
    let observation = Observation::invalid_spec(object.metadata.generation, &message);
    let now = Time(Timestamp::now());
    let Some(status) = next_status(stored.as_ref(), &observation, None, &now) else {
        return Ok(());
    };
    let patch = json!({"apiVersion": API_VERSION, "kind": KIND, "status": status});
    api.patch_status(
        &key.name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(KubeError::api(format!(
        "write the status of MessagePipeline {key}"
    )))?;
    ctx.metrics.kube_write("status", "applied");
    publish(ctx, resource, &object, Reason::InvalidSpec, &message).await;
    Ok(())
}

/// Deletion of an object whose spec cannot be read: msgpipe cannot tell which broker
/// objects are its own, so it deletes nothing and lets the object go.
async fn release<B: PooledBroker>(
    ctx: &Context<B>,
    resource: &ApiResource,
    api: &Api<DynamicObject>,
    object: &DynamicObject,
    key: &Key,
    message: &str,
) -> Result<(), KubeError> {
    let Some(index) = object.finalizers().iter().position(|f| f == FINALIZER) else {
        return Ok(());
    };
    let note = one_line(&format!(
        "the spec cannot be read ({message}), so msgpipe cannot tell which broker objects are its own; nothing deleted on the broker, finalizer released"
    ));
    publish(ctx, resource, object, Reason::CleanupSkipped, &note).await;
    // The same guarded removal kube-runtime's finalizer helper sends.
    let path = format!("/metadata/finalizers/{index}");
    let operations = json!([
        {"op": "test", "path": path, "value": FINALIZER},
        {"op": "remove", "path": path},
    ]);
    let operations = serde_json::from_value(operations).map_err(|e| KubeError::Api {
        operation: format!("release MessagePipeline {key}"),
        source: kube::Error::SerdeError(e),
    })?;
    api.patch(
        &key.name,
        &PatchParams::default(),
        &Patch::<()>::Json(operations),
    )
    .await
    .map_err(KubeError::api(format!("release MessagePipeline {key}")))?;
    info!(pipeline = %key, "released an undecodable MessagePipeline without touching the broker");
    Ok(())
}

async fn publish<B: PooledBroker>(
    ctx: &Context<B>,
    resource: &ApiResource,
    object: &DynamicObject,
    reason: Reason,
    note: &str,
) {
    let event = Event {
        type_: EventType::Warning,
        reason: reason.as_str().into(),
        note: Some(note.to_string()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(error) = ctx
        .recorder
        .publish(&event, &object.object_ref(resource))
        .await
    {
        warn!(pipeline = %Key::of(object), %error, "cannot publish event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::reason::MAX_MESSAGE_BYTES;

    fn object(spec: serde_json::Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": API_VERSION, "kind": KIND,
            "metadata": {"name": "bad", "namespace": "a", "generation": 2},
            "spec": spec,
        }))
        .expect("dynamic object")
    }

    #[test]
    fn an_overflowing_duration_is_split_off_and_named() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let bad = object(json!({"broker": {"secretRef": {"name": "s"}},
                                "deadLetter": {"retention": "99999999999999999999d"}}));
        assert!(split(watcher::Event::InitApply(bad.clone()), &tx).is_none());
        let Some(watcher::Event::Delete(gone)) = split(watcher::Event::Apply(bad.clone()), &tx)
        else {
            panic!("an applied undecodable object leaves the typed store");
        };
        assert_eq!(gone.name_any(), "bad");
        let key = rx.try_recv().expect("reported");
        assert_eq!(key.to_string(), "a/bad");
        let error = decode(&bad).expect_err("undecodable");
        assert_eq!(error.path, "spec.deadLetter.retention");
    }

    #[test]
    fn a_good_object_passes_through_typed() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let good = object(json!({"broker": {"secretRef": {"name": "s"}}}));
        let Some(watcher::Event::InitApply(pipeline)) = split(watcher::Event::InitApply(good), &tx)
        else {
            panic!("a good object stays");
        };
        assert_eq!(
            pipeline
                .spec
                .broker
                .secret_ref
                .as_ref()
                .map(|s| s.name.as_str()),
            Some("s")
        );
        assert!(rx.try_recv().is_err(), "nothing reported");
    }

    #[test]
    fn messages_are_one_line_and_at_most_a_kibibyte() {
        let long = format!("spec.x:\n{}", "é".repeat(2000));
        let line = one_line(&long);
        assert!(line.len() <= MAX_MESSAGE_BYTES);
        assert!(!line.contains('\n'));
        assert!(line.starts_with("spec.x: é"));
    }
}
