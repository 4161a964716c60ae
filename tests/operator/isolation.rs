//! The whole controller (watchers, store, reconcile, status, events) against a mocked API
//! server that lists and watches like a real one (every change through the API is a watch
//! event with a new resourceVersion) and authorizes every request with the
//! operator's RBAC list (`msgpipe::k8s::rbac::grants`, which tests/chart.rs holds
//! the chart to): a request outside it gets the 403 a real cluster would answer.
//!
//! - One MessagePipeline the API server admitted but msgpipe cannot decode, among 50 good
//!   ones in two namespaces: the 50 converge on a real RabbitMQ, the bad one gets
//!   `Ready=False, InvalidSpec` naming the field and a Warning event, before and after a
//!   controller restart (a fresh list).
//! - Turning alerts off deletes the PrometheusRule, under that RBAC.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use msgpipe::api::MessagePipeline;
use msgpipe::broker::BrokerApi;
use msgpipe::controller::{Context, Metrics, OperatorConfig, reconcile, run_controller};
use msgpipe::k8s::rbac::{BrokerModes, allows, grants};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::fake_api::FakeApi;
use super::support::{self, TestVhost};

const PIPELINES: &str = "/apis/msgpipe.io/v1alpha1";
const SECRET_NAME: &str = "rabbitmq-admin";
const GOOD: usize = 50;
/// How long the 50 pipelines may take to converge on a loaded machine.
const CONVERGE_WITHIN: Duration = Duration::from_secs(180);

/// (group, resource, verb) of a request, as the API server's authorizer sees it; None for
/// non-resource URLs (API discovery).
fn attributes(method: &Method, path: &str, query: &str, exists: bool) -> Option<Attributes> {
    let (group, rest) = if let Some(rest) = path.strip_prefix("/api/v1/") {
        (String::new(), rest)
    } else {
        let rest = path.strip_prefix("/apis/")?;
        let mut parts = rest.splitn(3, '/');
        let group = parts.next()?.to_string();
        let _version = parts.next()?;
        (group, parts.next()?)
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let segments = match segments.as_slice() {
        ["namespaces", _namespace, tail @ ..] if !tail.is_empty() => tail.to_vec(),
        other => other.to_vec(),
    };
    let (resource, name, subresource) = match segments.as_slice() {
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some(*name), None),
        [resource, name, sub] => (*resource, Some(*name), Some(*sub)),
        _ => return None,
    };
    let resource = match subresource {
        Some(sub) => format!("{resource}/{sub}"),
        None => resource.to_string(),
    };
    let watch = query
        .split('&')
        .any(|p| p == "watch=true" || p == "watch=1");
    let verbs: Vec<&str> = match (method.as_str(), name) {
        ("GET", Some(_)) => vec!["get"],
        ("GET", None) if watch => vec!["watch"],
        ("GET", None) => vec!["list"],
        ("POST", _) => vec!["create"],
        ("PUT", _) => vec!["update"],
        ("DELETE", _) => vec!["delete"],
        // Server-side apply of an object that does not exist yet creates it.
        ("PATCH", _) if !exists => vec!["patch", "create"],
        ("PATCH", _) => vec!["patch"],
        _ => vec!["unknown"],
    };
    Some(Attributes {
        group,
        resource,
        verbs,
    })
}

struct Attributes {
    group: String,
    resource: String,
    verbs: Vec<&'static str>,
}

/// The API server: [`FakeApi`] for objects, plus lists, watches and RBAC.
#[derive(Clone, Default)]
pub(crate) struct Cluster {
    api: FakeApi,
    /// Requests RBAC refused, as `verb group/resource`.
    denied: Arc<Mutex<Vec<String>>>,
    /// List requests per collection path.
    lists: Arc<Mutex<BTreeMap<String, usize>>>,
    changes: Arc<Mutex<Changes>>,
    /// Wakes the request loop after a user's edit, to answer the watches.
    edited: Arc<tokio::sync::Notify>,
}

/// Every change made through the API since the cluster started, for watches.
#[derive(Default)]
struct Changes {
    /// The last resourceVersion handed out.
    version: u64,
    events: Vec<Change>,
}

struct Change {
    version: u64,
    path: String,
    kind: &'static str,
    object: Value,
}

/// A watch request waiting for changes after `since`.
struct Watch {
    send: tower_test::mock::SendResponse<Response<Body>>,
    collection: String,
    selector: Option<(String, String)>,
    since: u64,
    metadata_only: bool,
}

impl Cluster {
    /// A cluster serving the objects `api` holds.
    pub(crate) fn over(api: FakeApi) -> Self {
        Cluster {
            api,
            ..Cluster::default()
        }
    }

    pub(crate) fn client(&self) -> (Client, tokio::task::JoinHandle<()>) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let cluster = self.clone();
        let task = tokio::spawn(async move {
            // Watches wait here until something they cover changes.
            let mut watches: Vec<Watch> = Vec::new();
            loop {
                let next = tokio::select! {
                    next = handle.next_request() => next,
                    // A user's edit (see `edit`): only the watches have something to do.
                    () = cluster.edited.notified() => {
                        cluster.flush(&mut watches);
                        continue;
                    }
                };
                let Some((request, send)) = next else { break };
                let method = request.method().clone();
                let path = request.uri().path().to_string();
                let query = request.uri().query().unwrap_or_default().to_string();
                let object_path = path.strip_suffix("/status").unwrap_or(&path).to_string();
                let existed = cluster.api.get(&object_path);
                let exists =
                    existed.is_some() || path.ends_with("/status") || method != Method::PATCH;
                if let Some(denied) = cluster.authorize(&method, &path, &query, exists) {
                    send.send_response(denied);
                    continue;
                }
                let metadata_only = request
                    .headers()
                    .get(http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("as=PartialObjectMetadata"));
                let is_collection_get = method == Method::GET && is_collection(&path);
                if is_collection_get
                    && query
                        .split('&')
                        .any(|p| p == "watch=true" || p == "watch=1")
                {
                    let since = query
                        .split('&')
                        .find_map(|p| p.strip_prefix("resourceVersion="))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    watches.push(Watch {
                        send,
                        collection: path,
                        selector: label_selector(&query),
                        since,
                        metadata_only,
                    });
                } else if is_collection_get {
                    send.send_response(cluster.list(&path, &query, metadata_only));
                } else {
                    let response = cluster.api.answer(request).await;
                    let mutating = method != Method::GET && !path.contains("/events");
                    if mutating && response.status().is_success() {
                        cluster.record(&method, &object_path, existed);
                    }
                    send.send_response(response);
                }
                cluster.flush(&mut watches);
            }
        });
        (Client::new(service, "default"), task)
    }

    /// A user's `kubectl apply` of `object` (with its new generation): stored, and reported to
    /// the open watches.
    fn edit(&self, path: &str, object: Value) {
        let before = self.api.get(path);
        self.api.put(path, object);
        self.record(&Method::PUT, path, before);
        self.edited.notify_one();
    }

    /// A change to the object at `path`: a new resourceVersion and a watch event.
    fn record(&self, method: &Method, path: &str, before: Option<Value>) {
        let mut changes = self.changes.lock().expect("changes");
        changes.version += 1;
        let version = changes.version;
        let mut state = self.api.0.lock().expect("state");
        let (kind, object) = match state.objects.get_mut(path) {
            Some(object) if *method != Method::DELETE => {
                object["metadata"]["resourceVersion"] = json!(version.to_string());
                let kind = if before.is_some() {
                    "MODIFIED"
                } else {
                    "ADDED"
                };
                (kind, object.clone())
            }
            _ => match before {
                Some(mut object) => {
                    object["metadata"]["resourceVersion"] = json!(version.to_string());
                    ("DELETED", object)
                }
                None => return,
            },
        };
        changes.events.push(Change {
            version,
            path: path.to_string(),
            kind,
            object,
        });
    }

    /// Answers every waiting watch that has changes to report, as a real watch streams them
    /// (one JSON event per line); the watcher then watches again from the last version.
    fn flush(&self, watches: &mut Vec<Watch>) {
        let changes = self.changes.lock().expect("changes");
        let mut waiting = Vec::new();
        for watch in watches.drain(..) {
            let lines: Vec<String> = changes
                .events
                .iter()
                .filter(|c| c.version > watch.since && in_collection(&watch.collection, &c.path))
                .filter(|c| {
                    watch.selector.as_ref().is_none_or(|(key, value)| {
                        c.object["metadata"]["labels"][key.as_str()] == value.as_str()
                    })
                })
                .map(|c| {
                    let object = if watch.metadata_only {
                        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                               "metadata": c.object["metadata"]})
                    } else {
                        c.object.clone()
                    };
                    json!({"type": c.kind, "object": object}).to_string()
                })
                .collect();
            if lines.is_empty() {
                waiting.push(watch);
                continue;
            }
            let body = lines.join("\n") + "\n";
            watch.send.send_response(
                Response::builder()
                    .status(StatusCode::OK)
                    .body(Body::from(body.into_bytes()))
                    .expect("response"),
            );
        }
        *watches = waiting;
    }

    /// A 403 like the API server's, or None when the operator's RBAC allows the request.
    fn authorize(
        &self,
        method: &Method,
        path: &str,
        query: &str,
        exists: bool,
    ) -> Option<Response<Body>> {
        let attributes = attributes(method, path, query, exists)?;
        let refused: Vec<&str> = attributes
            .verbs
            .iter()
            .copied()
            .filter(|verb| {
                // The chart's default install: tenant Secrets and MessageBrokers both on.
                !grants(BrokerModes {
                    secret_refs: true,
                    message_brokers: true,
                })
                .iter()
                .any(|(_, calls)| allows(calls, &attributes.group, &attributes.resource, verb))
            })
            .collect();
        let verb = refused.first()?;
        let line = format!("{verb} {}/{}", attributes.group, attributes.resource);
        self.denied.lock().expect("denied").push(line.clone());
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
            "message": format!("{path} is forbidden: User \"system:serviceaccount:msgpipe-system:msgpipe-operator\" cannot {line}"),
        });
        Some(
            Response::builder()
                .status(StatusCode::FORBIDDEN)
                .body(Body::from(serde_json::to_vec(&status).expect("json")))
                .expect("response"),
        )
    }

    /// Every stored object under a collection path (all namespaces or one), as a real list.
    fn list(&self, path: &str, query: &str, metadata_only: bool) -> Response<Body> {
        *self
            .lists
            .lock()
            .expect("lists")
            .entry(path.to_string())
            .or_default() += 1;
        let selector = label_selector(query);
        let version = self.changes.lock().expect("changes").version;
        let state = self.api.0.lock().expect("state");
        let items: Vec<Value> = state
            .objects
            .iter()
            .filter(|(object_path, _)| in_collection(path, object_path))
            .map(|(_, object)| object)
            .filter(|object| {
                selector.as_ref().is_none_or(|(key, value)| {
                    object["metadata"]["labels"][key.as_str()] == value.as_str()
                })
            })
            .map(|object| {
                if metadata_only {
                    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                           "metadata": object["metadata"]})
                } else {
                    object.clone()
                }
            })
            .collect();
        let list = json!({
            "apiVersion": if metadata_only { "meta.k8s.io/v1" } else { "v1" },
            "kind": if metadata_only { "PartialObjectMetadataList" } else { "List" },
            "metadata": {"resourceVersion": version.to_string()},
            "items": items,
        });
        Response::builder()
            .status(StatusCode::OK)
            .body(Body::from(serde_json::to_vec(&list).expect("json")))
            .expect("response")
    }

    fn list_calls(&self, path: &str) -> usize {
        self.lists
            .lock()
            .expect("lists")
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    pub(crate) fn denied(&self) -> Vec<String> {
        self.denied.lock().expect("denied").clone()
    }
}

/// `/api/v1/configmaps`, `/apis/g/v/messagepipelines`, `/apis/g/v/namespaces/ns/secrets`...
fn is_collection(path: &str) -> bool {
    let rest = path
        .strip_prefix("/api/v1/")
        .or_else(|| {
            path.strip_prefix("/apis/")
                .and_then(|r| r.splitn(3, '/').nth(2))
        })
        .unwrap_or_default();
    let segments: Vec<&str> = rest.split('/').collect();
    matches!(segments.as_slice(), [_] | ["namespaces", _, _]) && !rest.is_empty()
}

/// Whether the object at `object_path` is an item of the collection at `collection`.
fn in_collection(collection: &str, object_path: &str) -> bool {
    let (prefix, resource) = collection.rsplit_once('/').expect("collection path");
    let Some(rest) = object_path.strip_prefix(prefix) else {
        return false;
    };
    let segments: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    if prefix.contains("/namespaces/") {
        matches!(segments.as_slice(), [r, _] if *r == resource)
    } else {
        matches!(segments.as_slice(), ["namespaces", _, r, _] if *r == resource)
    }
}

/// `labelSelector=key=value` (URL-encoded) from a query string.
fn label_selector(query: &str) -> Option<(String, String)> {
    let raw = query
        .split('&')
        .find_map(|p| p.strip_prefix("labelSelector="))?;
    let decoded = url::form_urlencoded::parse(format!("s={raw}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())?;
    let (key, value) = decoded.split_once('=')?;
    Some((key.to_string(), value.to_string()))
}

fn pipeline_path(namespace: &str, name: &str) -> String {
    format!("{PIPELINES}/namespaces/{namespace}/messagepipelines/{name}")
}

fn secret(namespace: &str, vhost: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": SECRET_NAME, "namespace": namespace, "uid": format!("secret-{namespace}")},
        "stringData": {"uri": support::amqp_uri(vhost), "managementUri": "http://127.0.0.1:15673"}
    })
}

/// A pipeline as the API server stores it: one queue, no retry tier (few broker writes).
fn pipeline(namespace: &str, name: &str, vhost: &str, spec_extra: Value) -> Value {
    let mut spec = json!({
        "broker": {"secretRef": {"name": SECRET_NAME}, "vhost": vhost},
        "queue": {"name": format!("{namespace}.{name}"), "type": "quorum"},
        "retry": {"maxAttempts": 1},
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), spec_extra.as_object()) {
        for (key, value) in extra {
            spec.insert(key.clone(), value.clone());
        }
    }
    json!({
        "apiVersion": "msgpipe.io/v1alpha1", "kind": "MessagePipeline",
        "metadata": {"name": name, "namespace": namespace, "generation": 1, "resourceVersion": "1",
                     "uid": format!("uid-{namespace}-{name}")},
        "spec": spec,
    })
}

/// (status, reason, message) of a condition of the object at `path`.
fn condition(api: &FakeApi, path: &str, kind: &str) -> Option<(String, String, String)> {
    let object = api.get(path)?;
    let conditions = object["status"]["conditions"].as_array()?.clone();
    let c = conditions.iter().find(|c| c["type"] == kind)?;
    Some((
        c["status"].as_str()?.to_string(),
        c["reason"].as_str()?.to_string(),
        c["message"].as_str()?.to_string(),
    ))
}

/// How many pipelines have which Ready (status, reason), and one message of each.
fn ready_summary(api: &FakeApi) -> BTreeMap<String, (usize, String)> {
    let paths: Vec<String> = api
        .0
        .lock()
        .expect("state")
        .objects
        .keys()
        .filter(|p| p.contains("/messagepipelines/"))
        .cloned()
        .collect();
    let mut summary: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for path in paths {
        let key = condition(api, &path, "Ready")
            .map(|(status, reason, message)| (format!("{status} {reason}"), message))
            .unwrap_or_else(|| ("no status".into(), path.clone()));
        let entry = summary.entry(key.0).or_insert((0, key.1));
        entry.0 += 1;
    }
    summary
}

fn ready(api: &FakeApi, path: &str) -> bool {
    condition(api, path, "Ready").is_some_and(|(status, _, _)| status == "True")
}

/// Runs the controller over every namespace until the returned sender fires.
fn start_controller(cluster: &Cluster) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (client, _server) = cluster.client();
    let config = OperatorConfig {
        broker_timeout: Duration::from_secs(10),
        ..OperatorConfig::default()
    };
    let ctx = Arc::new(Context::new(client, Arc::new(Metrics::default()), config));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(run_controller(ctx, None, async move {
        let _ = stopped.await;
    }));
    (stop, task)
}

async fn wait_until(api: &FakeApi, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < CONVERGE_WITHIN,
            "timed out after {CONVERGE_WITHIN:?} waiting for {what}; Ready conditions: {:?}",
            ready_summary(api)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    started.elapsed()
}

/// Warning events about `name` with `reason`, and their notes.
fn warnings_about(api: &FakeApi, name: &str, reason: &str) -> Vec<String> {
    api.take_calls()
        .iter()
        .filter(|c| c.is_event() && c.method == Method::POST)
        .filter(|c| c.body["reason"] == reason && c.body["regarding"]["name"] == name)
        .map(|c| {
            assert_eq!(c.body["type"], "Warning");
            c.body["note"].as_str().unwrap_or_default().to_string()
        })
        .collect()
}

fn assert_invalid_spec(api: &FakeApi, path: &str, field: &str, generation: i64) {
    let (status, reason, message) = condition(api, path, "Ready").expect("a Ready condition");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "InvalidSpec"));
    assert!(message.contains(field), "{message}");
    assert!(
        !message.contains('\n') && message.len() <= 1024,
        "{message}"
    );
    assert!(!message.contains("Status {"), "{message}");
    let object = api.get(path).expect("bad pipeline");
    assert_eq!(object["status"]["observedGeneration"], generation);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_undecodable_pipeline_among_fifty_gets_invalid_spec_and_the_fifty_converge_before_and_after_a_restart()
 {
    let vhost = TestVhost::new("op-isolation");
    let cluster = Cluster::default();
    let api = cluster.api.clone();
    api.set_crd(true);
    let namespaces = ["alpha", "beta"];
    for namespace in namespaces {
        api.put(
            &format!("/api/v1/namespaces/{namespace}/secrets/{SECRET_NAME}"),
            secret(namespace, &vhost.name),
        );
    }
    let mut good = Vec::new();
    for i in 0..GOOD {
        let namespace = namespaces[i % 2];
        let name = format!("p{i:02}");
        let path = pipeline_path(namespace, &name);
        api.put(&path, pipeline(namespace, &name, &vhost.name, json!({})));
        good.push(path);
    }
    // Admitted by the CRD's pattern and length, but 20 digits of days overflow the parser.
    let bad = pipeline_path("alpha", "bad");
    api.put(
        &bad,
        pipeline(
            "alpha",
            "bad",
            &vhost.name,
            json!({"deadLetter": {"retention": "99999999999999999999d"}}),
        ),
    );
    let all_pipelines = format!("{PIPELINES}/messagepipelines");

    // First run.
    let (stop, task) = start_controller(&cluster);
    let took = wait_until(&api, "50 Ready pipelines and an InvalidSpec one", || {
        good.iter().all(|p| ready(&api, p)) && condition(&api, &bad, "Ready").is_some()
    })
    .await;
    println!("first run: {GOOD} pipelines Ready in {took:?}");
    assert_invalid_spec(&api, &bad, "spec.deadLetter.retention", 1);
    let notes = warnings_about(&api, "bad", "InvalidSpec");
    assert_eq!(notes.len(), 1, "one Warning event: {notes:?}");
    assert!(notes[0].contains("spec.deadLetter.retention"), "{notes:?}");
    assert_eq!(
        cluster.list_calls(&all_pipelines),
        1,
        "one list: the bad object did not fail it into a retry loop"
    );
    let live = support::test_broker(&vhost.name)
        .snapshot(&vhost.name)
        .await
        .expect("snapshot");
    for i in 0..GOOD {
        let queue = format!("{}.p{i:02}", namespaces[i % 2]);
        assert!(live.queues.contains_key(&queue), "{queue} missing");
    }
    assert!(
        !live.queues.keys().any(|q| q.starts_with("alpha.bad")),
        "nothing of the bad pipeline reaches the broker"
    );

    // A converged pipeline edited into an undecodable spec (a watch event, not a relist):
    // reported, and no longer reconciled from its old spec; fixed, it converges again.
    let edited = &good[0];
    let mut object = api.get(edited).expect("p00");
    object["spec"]["deadLetter"] = json!({"retention": "forever"});
    object["metadata"]["generation"] = json!(2);
    cluster.edit(edited, object.clone());
    wait_until(&api, "the edited pipeline reported", || {
        condition(&api, edited, "Ready").is_some_and(|(_, reason, _)| reason == "InvalidSpec")
    })
    .await;
    assert_invalid_spec(&api, edited, "spec.deadLetter.retention", 2);
    object = api.get(edited).expect("p00");
    object["spec"]["deadLetter"] = json!({"retention": "14d"});
    object["metadata"]["generation"] = json!(3);
    cluster.edit(edited, object);
    wait_until(&api, "the fixed pipeline Ready again", || {
        ready(&api, edited) && api.get(edited).expect("p00")["status"]["observedGeneration"] == 3
    })
    .await;
    api.take_calls();
    stop.send(()).expect("controller running");
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("controller stops")
        .expect("controller task");

    // While it was down: the bad object was edited into another undecodable spec, and a
    // new pipeline was created. A restart lists everything afresh.
    let mut edited = pipeline(
        "alpha",
        "bad",
        &vhost.name,
        json!({"retry": {"maxAttempts": "five"}}),
    );
    edited["metadata"]["generation"] = json!(2);
    edited["status"] = api.get(&bad).expect("bad")["status"].clone();
    api.put(&bad, edited);
    let late = pipeline_path("beta", "late");
    api.put(&late, pipeline("beta", "late", &vhost.name, json!({})));

    let (stop, task) = start_controller(&cluster);
    let took = wait_until(
        &api,
        "the new pipeline Ready and the edited bad one reported",
        || {
            ready(&api, &late)
                && condition(&api, &bad, "Ready").is_some_and(|(_, _, m)| m.contains("maxAttempts"))
        },
    )
    .await;
    println!("after the restart: the new pipeline Ready in {took:?}");
    assert_invalid_spec(&api, &bad, "spec.retry.maxAttempts", 2);
    assert!(good.iter().all(|p| ready(&api, p)), "the 50 stay Ready");
    assert_eq!(warnings_about(&api, "bad", "InvalidSpec").len(), 1);
    assert_eq!(cluster.list_calls(&all_pipelines), 2, "one list per start");
    assert_eq!(
        cluster.denied(),
        Vec::<String>::new(),
        "every call within RBAC"
    );
    stop.send(()).expect("controller running");
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("controller stops")
        .expect("controller task");
}

#[tokio::test]
async fn deleting_an_undecodable_pipeline_releases_it_without_touching_the_broker() {
    let cluster = Cluster::default();
    let api = cluster.api.clone();
    let path = pipeline_path("alpha", "bad");
    let mut object = pipeline(
        "alpha",
        "bad",
        "unused",
        json!({"deletionPolicy": "Delete", "deadLetter": {"retention": "1x"}}),
    );
    object["metadata"]["finalizers"] = json!(["msgpipe.io/cleanup"]);
    object["metadata"]["deletionTimestamp"] = json!("2026-11-29T12:00:00Z");
    api.put(&path, object);
    let (stop, task) = start_controller(&cluster);
    wait_until(&api, "the finalizer released", || {
        // The API server removes the object once its last finalizer is gone.
        api.get(&path)
            .is_none_or(|o| o["metadata"]["finalizers"] == json!([]))
    })
    .await;
    let notes = warnings_about(&api, "bad", "CleanupSkipped");
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains("spec.deadLetter.retention") && notes[0].contains("nothing deleted"),
        "{notes:?}"
    );
    assert_eq!(cluster.denied(), Vec::<String>::new());
    stop.send(()).expect("controller running");
    task.await.expect("controller task");
}

#[tokio::test]
async fn disabling_alerts_deletes_the_prometheus_rule_under_the_operators_rbac() {
    let vhost = TestVhost::new("op-alerts-off");
    let cluster = Cluster::default();
    let api = cluster.api.clone();
    api.set_crd(true);
    api.put(
        &format!("/api/v1/namespaces/alpha/secrets/{SECRET_NAME}"),
        secret("alpha", &vhost.name),
    );
    let path = pipeline_path("alpha", "notes");
    api.put(
        &path,
        pipeline(
            "alpha",
            "notes",
            &vhost.name,
            json!({"alerts": {"enabled": false}}),
        ),
    );
    // The rule an earlier generation (alerts on) left behind.
    let rule = "/apis/monitoring.coreos.com/v1/namespaces/alpha/prometheusrules/notes-alerts";
    api.put(
        rule,
        json!({"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
               "metadata": {"name": "notes-alerts", "namespace": "alpha",
                            "labels": {"app.kubernetes.io/managed-by": "msgpipe"},
                            "ownerReferences": [{"apiVersion": "msgpipe.io/v1alpha1",
                                "kind": "MessagePipeline", "name": "notes",
                                "uid": "uid-alpha-notes", "controller": true}]},
               "spec": {"groups": []}}),
    );
    let (client, _server) = cluster.client();
    let ctx = Arc::new(Context::new(
        client,
        Arc::new(Metrics::default()),
        OperatorConfig::default(),
    ));
    let reconcile_once = || async {
        let object = api.get(&path).expect("pipeline");
        let pipeline: MessagePipeline = serde_json::from_value(object).expect("pipeline");
        reconcile(Arc::new(pipeline), ctx.clone())
            .await
            .map_err(|e| e.to_string())
    };
    assert!(
        reconcile_once().await.is_ok(),
        "finalizer and first converge"
    );
    assert!(api.get(rule).is_none(), "the PrometheusRule is deleted");
    let (status, reason, _) = condition(&api, &path, "AlertsReady").expect("AlertsReady");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "AlertsDisabled")
    );
    assert!(
        api.take_calls()
            .iter()
            .any(|c| c.method == Method::DELETE && c.path == rule)
    );
    assert_eq!(
        cluster.denied(),
        Vec::<String>::new(),
        "DELETE is within RBAC"
    );
}
