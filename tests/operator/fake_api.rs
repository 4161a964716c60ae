//! The Kubernetes API as the operator's reconcile sees it, mocked the way kube-rs documents
//! (`tower_test::mock`): every request is recorded and checked, and answered from a small
//! in-memory object map. An unexpected request fails the test.
//!
//! It answers as a real API server does where the operator can tell: server-side apply
//! merges the applied configuration into the stored object (fields of other managers stay,
//! fields this manager stopped applying go) and answers with the stored object, never an
//! echo of the request; the server sets uid, resourceVersion and creationTimestamp; a call
//! the test forbids gets the 403 `Status` a real server sends for an RBAC denial.

//!
//! It lists and watches as a real API server does, so the operator's whole controller can run
//! against it: a collection GET is a list (all namespaces or one; `labelSelector`;
//! `limit`/`continue` pages; metadata-only items when the client asks for
//! `PartialObjectMetadataList`), and `watch=true` is a streamed response of one WatchEvent per
//! line, from `resourceVersion` on, for every write the fake performs (server-side apply,
//! patch, status, delete, create, [`FakeApi::put`]). A write that changes nothing is no event
//! and keeps the resourceVersion, as on a real server. [`Latency`] charges what a real server
//! charges per call.
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body as ResponseBody;
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use msgpipe::k8s::rbac::{BrokerModes, Scope, allows, grants};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// One request the operator made.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Value,
}

impl Call {
    /// `METHOD path` — how tests compare call sequences.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    pub fn is_event(&self) -> bool {
        self.path.contains("/events")
    }
}

/// Objects the fake cluster holds, by API path.
#[derive(Default)]
pub struct State {
    pub objects: BTreeMap<String, Value>,
    pub calls: Vec<Call>,
    /// Whether monitoring.coreos.com/v1 is served (the PrometheusRule CRD is installed).
    pub prometheus_rule_crd: bool,
    /// Whether monitoring.coreos.com/v1alpha1 is served (the AlertmanagerConfig CRD).
    pub alertmanager_config_crd: bool,
    /// The last configuration each field manager applied, by (path, manager).
    applied: BTreeMap<(String, String), Value>,
    /// (method, path) pairs RBAC denies.
    forbidden: Vec<(Method, String)>,
    /// When set, every call outside the RBAC the chart grants in these modes is denied, as
    /// a real API server would: the modes and the operator's own namespace.
    rbac: Option<(BrokerModes, String)>,
    /// `METHOD path` of every call [`FakeApi::enforce_rbac`] denied.
    pub denied: Vec<String>,
    /// Shared with other fakes (a broker) to see the order of writes across systems.
    journal: Option<Arc<Mutex<Vec<String>>>>,
    resource_version: u64,
    /// Open watches, each fed the events of its collection.
    watches: Vec<WatchSink>,
    /// The last writes, for a watch that starts from an older resourceVersion.
    history: VecDeque<WatchEvent>,
    /// The resourceVersion of the newest event no longer in `history`: a watch from before it
    /// gets 410 Gone and lists again, as on a real server after compaction.
    history_floor: u64,
    /// What each call costs (default: nothing).
    pub latency: Latency,
    /// Latency jitter (xorshift).
    rng: u64,
    /// `resource_version`, for watch streams' closing bookmarks.
    current: Arc<std::sync::atomic::AtomicU64>,
}

/// Events kept for watches that resume from an older resourceVersion.
const HISTORY: usize = 1024;

/// A watch's default lifetime when it names no `timeoutSeconds` (a real server picks 30-60
/// minutes).
const WATCH_DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

/// One write, as watches see it.
#[derive(Clone)]
struct WatchEvent {
    version: u64,
    kind: &'static str,
    path: String,
    object: Value,
}

/// Which objects a list or a watch covers.
#[derive(Clone, Debug)]
struct Selection {
    /// `/api/v1/secrets`, `/api/v1/namespaces/x/configmaps`, `/apis/g/v/messagebrokers`...
    collection: String,
    /// `labelSelector`: (key, Some(value) for `=`/`==`, negated for `!=`); None value: exists.
    labels: Vec<(String, Option<String>, bool)>,
    /// The client asked for PartialObjectMetadata.
    metadata_only: bool,
}

struct WatchSink {
    selection: Selection,
    send: tokio::sync::mpsc::UnboundedSender<Value>,
}

/// What one kind of call costs on the server, as (p50, p90); zero by default. Each call
/// waits a log-normal delay with these quantiles before it is answered (the write itself is
/// visible at once); `watch_event` delays each event's delivery on a watch.
#[derive(Clone, Copy, Debug, Default)]
pub struct Latency {
    pub get: (Duration, Duration),
    pub list: (Duration, Duration),
    /// Server-side apply of an object (ConfigMap, PrometheusRule).
    pub apply: (Duration, Duration),
    /// JSON patch (finalizers) and delete.
    pub patch: (Duration, Duration),
    /// Server-side apply of a status subresource.
    pub status: (Duration, Duration),
    /// Create or patch of an Event.
    pub event: (Duration, Duration),
    /// Create (POST) of an object.
    pub create: (Duration, Duration),
    pub watch_event: (Duration, Duration),
}

impl Latency {
    /// Measured on a real Kubernetes 1.34 API server (etcd, one node) on loopback, p50/p90:
    /// GET Secret 2.2/3.6 ms, SSA ConfigMap 4.3/6.5, JSON patch finalizer 5.2/8.1, SSA
    /// status 5.3/8.3, create Event 3.3/4.8, create pipeline 4.4/7.0; watch events a few ms.
    /// A list page is not measured there: charged as a GET of a few objects (assumed).
    pub fn real_server() -> Self {
        let ms = |p50: f64, p90: f64| {
            (
                Duration::from_secs_f64(p50 / 1000.0),
                Duration::from_secs_f64(p90 / 1000.0),
            )
        };
        Latency {
            get: ms(2.2, 3.6),
            list: ms(4.0, 8.0),
            apply: ms(4.3, 6.5),
            patch: ms(5.2, 8.1),
            status: ms(5.3, 8.3),
            event: ms(3.3, 4.8),
            create: ms(4.4, 7.0),
            watch_event: ms(2.0, 4.0),
        }
    }
}

#[derive(Clone, Default)]
pub struct FakeApi(pub Arc<Mutex<State>>);

impl FakeApi {
    /// A kube Client whose every request goes to this fake, served by a background task.
    /// Requests are handled in the order they arrive; their latency (if any) elapses
    /// concurrently, as on a real server.
    pub fn client(&self) -> (Client, JoinHandle<()>) {
        let (service, mut handle) =
            tower_test::mock::pair::<Request<Body>, Response<ResponseBody>>();
        let state = self.clone();
        let task = tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (response, delay) = state.handle(request).await;
                if delay.is_zero() {
                    send.send_response(response);
                } else {
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        send.send_response(response);
                    });
                }
            }
        });
        (Client::new(service, "default"), task)
    }

    /// Serves this fake over HTTP on `listener` (watches stream) until the task is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        axum::serve(listener, self.router()).await
    }

    /// This fake as an HTTP router answering every path (watches stream); more routes may be
    /// added in front of it.
    pub fn router(self) -> axum::Router {
        let answer = move |request: axum::extract::Request| {
            let api = self.clone();
            async move {
                let (parts, body) = request.into_parts();
                let bytes = axum::body::to_bytes(body, usize::MAX)
                    .await
                    .unwrap_or_default();
                api.respond(Request::from_parts(parts, Body::from(bytes)))
                    .await
            }
        };
        axum::Router::new().fallback(answer)
    }

    /// Stores `object` at `path` as a user's `kubectl apply` would: watches see it (ADDED or
    /// MODIFIED). Its resourceVersion is kept when it has one, else the server's next.
    pub fn put(&self, path: &str, mut object: Value) {
        let mut state = self.lock();
        let version = state.bump();
        if object["metadata"]["resourceVersion"].is_null() && object["metadata"].is_object() {
            object["metadata"]["resourceVersion"] = json!(version.to_string());
        }
        let kind = match state.objects.insert(path.to_string(), object.clone()) {
            Some(_) => "MODIFIED",
            None => "ADDED",
        };
        state.emit(version, kind, path, object);
    }

    /// Stores many objects at once, before any watch exists: no events, no history (a
    /// cluster's existing objects, which a list returns).
    pub fn preload(&self, objects: impl IntoIterator<Item = (String, Value)>) {
        let mut state = self.lock();
        let version = state.bump();
        for (path, mut object) in objects {
            object["metadata"]["resourceVersion"] = json!(version.to_string());
            state.objects.insert(path, object);
        }
        state.history_floor = version;
    }

    /// `kubectl delete`: an object with finalizers gets a deletionTimestamp and stays until
    /// they are removed; one without is gone. Watches see either.
    pub fn delete(&self, path: &str) {
        delete_object(&mut self.lock(), path);
    }

    /// Watches whose client is still reading.
    pub fn open_watches(&self) -> usize {
        let mut state = self.lock();
        state.watches.retain(|w| !w.send.is_closed());
        state.watches.len()
    }

    /// From now on each call costs what `latency` says.
    pub fn set_latency(&self, latency: Latency) {
        self.lock().latency = latency;
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.lock().objects.get(path).cloned()
    }

    pub fn set_crd(&self, installed: bool) {
        self.lock().prometheus_rule_crd = installed;
    }

    /// From now on `method path` is denied as RBAC would deny it (403 Forbidden).
    pub fn forbid(&self, method: Method, path: &str) {
        self.lock().forbidden.push((method, path.to_string()));
    }

    /// From now on, deny (403) every call the chart's RBAC for `modes` does not grant
    /// (src/k8s/rbac.rs), with `own_namespace` as the release namespace.
    pub fn enforce_rbac(&self, modes: BrokerModes, own_namespace: &str) {
        self.lock().rbac = Some((modes, own_namespace.to_string()));
    }

    /// Appends `METHOD path` of every write (not events) to `journal`.
    pub fn journal_to(&self, journal: Arc<Mutex<Vec<String>>>) {
        self.lock().journal = Some(journal);
    }

    /// Calls the enforced RBAC denied so far.
    pub fn denied(&self) -> Vec<String> {
        self.lock().denied.clone()
    }

    /// Calls since the last `take_calls`.
    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.lock().calls)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().expect("fake API state")
    }

    /// The answer to `request`, the whole body at once (a watch ends after its
    /// `timeoutSeconds`); [`FakeApi::respond`] streams.
    pub async fn answer(&self, request: Request<Body>) -> Response<Body> {
        let (parts, body) = self.respond(request).await.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        Response::from_parts(parts, Body::from(bytes))
    }

    /// The answer to `request` after its latency; a watch's body streams its events.
    pub async fn respond(&self, request: Request<Body>) -> Response<ResponseBody> {
        let (response, delay) = self.handle(request).await;
        tokio::time::sleep(delay).await;
        response
    }

    /// Records and performs `request` now; returns the answer and how long the server takes
    /// to send it.
    async fn handle(&self, request: Request<Body>) -> (Response<ResponseBody>, Duration) {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or_default().to_string();
        let metadata_only = request
            .headers()
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("as=PartialObjectMetadata"));
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .expect("request body");
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("request bodies are JSON")
        };
        let call = Call {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            body: body.clone(),
        };
        let mut state = self.lock();
        let manager = field_manager(&call.query);
        state.calls.push(call);
        if let Some(denied) = forbidden(&state, &method, &path) {
            return (respond(StatusCode::FORBIDDEN, &denied), Duration::ZERO);
        }
        if let Some((modes, own)) = &state.rbac
            && let Some(denied) = outside_rbac(*modes, own, &method, &path, &call_query(&state))
        {
            state.denied.push(format!("{method} {path}"));
            return (respond(StatusCode::FORBIDDEN, &denied), Duration::ZERO);
        }
        if method != Method::GET
            && !path.contains("/events")
            && let Some(journal) = &state.journal
        {
            journal
                .lock()
                .expect("journal")
                .push(format!("kube: {method} {path}"));
        }
        let delay = state.delay(&method, &path, &query, &body);
        if method == Method::GET && is_collection(&path) {
            let params = Params::parse(&query);
            let selection = Selection {
                collection: path.clone(),
                labels: params.labels(),
                metadata_only,
            };
            if params.watch {
                return (watch(&mut state, selection, &params), delay);
            }
            let (status, reply) = list(&state, &selection, &params);
            return (respond(status, &reply), delay);
        }
        let (status, reply) = route(&mut state, &method, &path, body, &manager);
        drop(state);
        (respond(status, &reply), delay)
    }
}

fn call_query(state: &State) -> String {
    state
        .calls
        .last()
        .map(|c| c.query.clone())
        .unwrap_or_default()
}

/// The 403 a real API server gives a call that the chart's RBAC in `modes` does not grant
/// (API discovery, a non-resource URL, is always allowed).
fn outside_rbac(
    modes: BrokerModes,
    own_namespace: &str,
    method: &Method,
    path: &str,
    query: &str,
) -> Option<Value> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(*ns), rest),
        other => (None, other),
    };
    let (resource, name, sub) = match rest {
        [] => return None,
        [resource] => (resource.to_string(), None, None),
        [resource, name] => (resource.to_string(), Some(*name), None),
        [resource, name, sub, ..] => (resource.to_string(), Some(*name), Some(*sub)),
    };
    let resource = match sub {
        Some(sub) => format!("{resource}/{sub}"),
        None => resource,
    };
    let verb = match *method {
        Method::GET if name.is_some() => "get",
        Method::GET if query.contains("watch=true") || query.contains("watch=1") => "watch",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::DELETE => "delete",
        _ => "patch",
    };
    let granted = grants(modes).into_iter().any(|(scope, calls)| {
        allows(calls, group, &resource, verb)
            && match scope {
                Scope::Pipelines | Scope::Cluster => true,
                Scope::Own => namespace == Some(own_namespace),
            }
    });
    if granted {
        return None;
    }
    Some(json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!(
            "{resource} is forbidden: User \"system:serviceaccount:{own_namespace}:msgpipe\" cannot {verb} resource \"{resource}\" in API group \"{group}\" in the namespace \"{}\"",
            namespace.unwrap_or_default()
        ),
        "reason": "Forbidden",
        "code": 403
    }))
}

fn respond(status: StatusCode, reply: &Value) -> Response<ResponseBody> {
    Response::builder()
        .status(status)
        .body(ResponseBody::from(
            serde_json::to_vec(reply).expect("reply"),
        ))
        .expect("response")
}

fn field_manager(query: &str) -> String {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("fieldManager="))
        .unwrap_or("unknown")
        .to_string()
}

/// The Status a real API server sends when RBAC denies a call, e.g.
/// `prometheusrules.monitoring.coreos.com "notes-alerts" is forbidden: User ... cannot delete
/// resource "prometheusrules" in API group "monitoring.coreos.com" in the namespace "x"`.
fn forbidden(state: &State, method: &Method, path: &str) -> Option<Value> {
    let denied = state
        .forbidden
        .iter()
        .any(|(m, p)| m == method && p == path);
    if !denied {
        return None;
    }
    // /api/v1/namespaces/NS/RESOURCE/NAME or /apis/GROUP/VERSION/namespaces/NS/RESOURCE/NAME
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let group = if parts[0] == "apis" { parts[1] } else { "" };
    let at = parts.iter().position(|p| *p == "namespaces");
    let namespace = at.map(|i| parts[i + 1]).unwrap_or_default();
    let resource = at
        .and_then(|i| parts.get(i + 2))
        .copied()
        .unwrap_or_default();
    let name = at
        .and_then(|i| parts.get(i + 3))
        .copied()
        .unwrap_or_default();
    let verb = match *method {
        Method::GET => "get",
        Method::DELETE => "delete",
        Method::POST => "create",
        _ => "patch",
    };
    let qualified = if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    };
    Some(json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!(
            "{qualified} \"{name}\" is forbidden: User \"system:serviceaccount:msgpipe-system:msgpipe\" cannot {verb} resource \"{resource}\" in API group \"{group}\" in the namespace \"{namespace}\""
        ),
        "reason": "Forbidden",
        "details": {"name": name, "group": group, "kind": resource},
        "code": 403
    }))
}

fn not_found(path: &str) -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "message": format!("{path} not found"), "reason": "NotFound", "code": 404}),
    )
}

fn route(
    state: &mut State,
    method: &Method,
    path: &str,
    body: Value,
    manager: &str,
) -> (StatusCode, Value) {
    if path.ends_with("/events") && method == Method::POST {
        return (StatusCode::CREATED, body);
    }
    if path.contains("/events/") && method == Method::PATCH {
        let name = path.rsplit('/').next().unwrap_or_default();
        return (
            StatusCode::OK,
            json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": name}}),
        );
    }
    if path == "/apis/monitoring.coreos.com/v1" {
        return if state.prometheus_rule_crd {
            (
                StatusCode::OK,
                json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "monitoring.coreos.com/v1",
                       "resources": [{"name": "prometheusrules", "singularName": "prometheusrule", "namespaced": true,
                                      "kind": "PrometheusRule", "verbs": ["get", "list", "watch", "create", "patch", "delete"]}]}),
            )
        } else {
            not_found(path)
        };
    }
    if path == "/apis/monitoring.coreos.com/v1alpha1" {
        return if state.alertmanager_config_crd {
            (
                StatusCode::OK,
                json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "monitoring.coreos.com/v1alpha1",
                       "resources": [{"name": "alertmanagerconfigs", "singularName": "alertmanagerconfig", "namespaced": true,
                                      "kind": "AlertmanagerConfig", "verbs": ["get", "list", "watch", "create", "patch", "delete"]}]}),
            )
        } else {
            not_found(path)
        };
    }
    if let Some(object_path) = path.strip_suffix("/status") {
        assert_eq!(method, Method::PATCH, "status is only ever patched");
        let Some(before) = state.objects.get(object_path).cloned() else {
            return not_found(path);
        };
        // The status subresource applies only .status.
        let applied = json!({"status": body["status"].clone()});
        let key = (path.to_string(), manager.to_string());
        let previous = state.applied.insert(key, applied.clone());
        let mut object = before.clone();
        server_side_apply(&mut object, &applied, previous.as_ref());
        return (
            StatusCode::OK,
            state.store(object_path, Some(before), object),
        );
    }
    match *method {
        Method::GET => match state.objects.get(path) {
            Some(object) => (StatusCode::OK, object.clone()),
            None => not_found(path),
        },
        Method::DELETE => match delete_object(state, path) {
            Some(object) => (StatusCode::OK, object),
            None => not_found(path),
        },
        Method::POST if is_collection(path) => {
            let name = body["metadata"]["name"].as_str().unwrap_or_default();
            let object_path = format!("{path}/{name}");
            if name.is_empty() || state.objects.contains_key(&object_path) {
                return (
                    StatusCode::CONFLICT,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "message": format!("{object_path} already exists"), "reason": "AlreadyExists", "code": 409}),
                );
            }
            let mut object = body;
            let version = state.resource_version + 1;
            object["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{version:012}"));
            object["metadata"]["creationTimestamp"] = json!("2026-12-01T00:00:00Z");
            object["metadata"]["generation"] = json!(1);
            (StatusCode::CREATED, state.store(&object_path, None, object))
        }
        Method::PATCH if body.is_array() => {
            let Some(before) = state.objects.get(path).cloned() else {
                return not_found(path);
            };
            let mut object = before.clone();
            json_patch_finalizers(&mut object, &body);
            let released = !object["metadata"]["deletionTimestamp"].is_null()
                && object["metadata"]["finalizers"]
                    .as_array()
                    .is_none_or(|f| f.is_empty());
            let object = state.store(path, Some(before), object);
            if released {
                delete_object(state, path);
            }
            (StatusCode::OK, object)
        }
        Method::PATCH => {
            let key = (path.to_string(), manager.to_string());
            let previous = state.applied.insert(key, body.clone());
            let before = state.objects.get(path).cloned();
            let version = state.resource_version + 1;
            let mut object = before.clone().unwrap_or_else(|| {
                json!({"metadata": {
                    "uid": format!("00000000-0000-4000-8000-{version:012}"),
                    "creationTimestamp": "2026-12-01T00:00:00Z",
                }})
            });
            server_side_apply(&mut object, &body, previous.as_ref());
            (StatusCode::OK, state.store(path, before, object))
        }
        _ => panic!("unexpected request {method} {path}"),
    }
}

impl State {
    /// The next resourceVersion.
    fn bump(&mut self) -> u64 {
        self.resource_version += 1;
        self.current
            .store(self.resource_version, std::sync::atomic::Ordering::Relaxed);
        self.resource_version
    }

    /// Stores `object` at `path` (it was `before`), with a new resourceVersion and a watch
    /// event if it changed; answers the stored object.
    fn store(&mut self, path: &str, before: Option<Value>, mut object: Value) -> Value {
        if before.as_ref() == Some(&object) {
            return object;
        }
        let version = self.bump();
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        self.objects.insert(path.to_string(), object.clone());
        let kind = if before.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.emit(version, kind, path, object.clone());
        object
    }

    /// Hands a write to the watches that cover it, and keeps it for later ones.
    fn emit(&mut self, version: u64, kind: &'static str, path: &str, object: Value) {
        let event = WatchEvent {
            version,
            kind,
            path: path.to_string(),
            object,
        };
        self.watches.retain(|watch| {
            !watch.selection.covers(&event.path, &event.object)
                || watch
                    .send
                    .send(watch_line(&watch.selection, &event))
                    .is_ok()
        });
        self.history.push_back(event);
        if self.history.len() > HISTORY
            && let Some(dropped) = self.history.pop_front()
        {
            self.history_floor = dropped.version;
        }
    }

    /// How long the server takes to answer this call ([`Latency`]).
    fn delay(&mut self, method: &Method, path: &str, query: &str, body: &Value) -> Duration {
        let latency = self.latency;
        let quantiles = match *method {
            _ if path.contains("/events") => latency.event,
            Method::GET if is_collection(path) && Params::parse(query).watch => {
                return Duration::ZERO;
            }
            Method::GET if is_collection(path) => latency.list,
            Method::GET => latency.get,
            Method::POST => latency.create,
            Method::PATCH if path.ends_with("/status") => latency.status,
            Method::PATCH if body.is_array() => latency.patch,
            Method::PATCH => latency.apply,
            _ => latency.patch,
        };
        sample(&mut self.rng, quantiles)
    }
}

/// A log-normal delay with median `p50` and 90th percentile `p90` (xorshift64* on `rng`).
fn sample(rng: &mut u64, (p50, p90): (Duration, Duration)) -> Duration {
    if p50.is_zero() {
        return Duration::ZERO;
    }
    let mut uniform = || {
        if *rng == 0 {
            *rng = 0x9E37_79B9_7F4A_7C15;
        }
        *rng ^= *rng >> 12;
        *rng ^= *rng << 25;
        *rng ^= *rng >> 27;
        let bits = rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        (bits as f64 + 0.5) / (1u64 << 53) as f64
    };
    let (u1, u2) = (uniform(), uniform());
    let z = ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()).clamp(-3.0, 3.0);
    let spread = (p90.as_secs_f64() / p50.as_secs_f64()).max(1.0).ln() / 1.2816;
    Duration::from_secs_f64(p50.as_secs_f64() * (z * spread).exp())
}

/// `kubectl delete` of the object at `path`: with finalizers it is marked (deletionTimestamp)
/// and stays; without, it is removed. Watches see either; answers the object.
fn delete_object(state: &mut State, path: &str) -> Option<Value> {
    let before = state.objects.get(path)?.clone();
    let finalizers = before["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty());
    if finalizers {
        let mut object = before.clone();
        if object["metadata"]["deletionTimestamp"].is_null() {
            object["metadata"]["deletionTimestamp"] = json!("2026-12-01T12:00:00Z");
        }
        return Some(state.store(path, Some(before), object));
    }
    let mut object = state.objects.remove(path)?;
    let version = state.bump();
    object["metadata"]["resourceVersion"] = json!(version.to_string());
    state.emit(version, "DELETED", path, object.clone());
    Some(object)
}

/// `/api/v1/configmaps`, `/api/v1/namespaces/x/secrets`, `/apis/g/v/messagebrokers`,
/// `/apis/g/v/namespaces/x/messagepipelines`: a collection, which GET lists.
fn is_collection(path: &str) -> bool {
    let rest = match path.strip_prefix("/api/v1/") {
        Some(rest) => rest,
        None => match path.strip_prefix("/apis/") {
            Some(rest) => rest.splitn(3, '/').nth(2).unwrap_or_default(),
            None => return false,
        },
    };
    let segments: Vec<&str> = rest.split('/').collect();
    !rest.is_empty() && matches!(segments.as_slice(), [_] | ["namespaces", _, _])
}

/// The query of a list or a watch.
#[derive(Default)]
struct Params {
    watch: bool,
    label_selector: String,
    limit: Option<usize>,
    continue_token: Option<String>,
    resource_version: Option<String>,
    timeout: Option<Duration>,
    bookmarks: bool,
}

impl Params {
    fn parse(query: &str) -> Self {
        let mut params = Params::default();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match key.as_ref() {
                "watch" => params.watch = value == "true" || value == "1",
                "labelSelector" => params.label_selector = value.into_owned(),
                "limit" => params.limit = value.parse().ok().filter(|l| *l > 0),
                "continue" => params.continue_token = Some(value.into_owned()),
                "resourceVersion" => params.resource_version = Some(value.into_owned()),
                "timeoutSeconds" => params.timeout = value.parse().ok().map(Duration::from_secs),
                "allowWatchBookmarks" => params.bookmarks = value == "true",
                _ => {}
            }
        }
        params
    }

    /// `a=b,c!=d,e`: equality, inequality and existence requirements.
    fn labels(&self) -> Vec<(String, Option<String>, bool)> {
        self.label_selector
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(|requirement| {
                if let Some((key, value)) = requirement.split_once("!=") {
                    (key.trim().to_string(), Some(value.trim().to_string()), true)
                } else if let Some((key, value)) = requirement
                    .split_once("==")
                    .or_else(|| requirement.split_once('='))
                {
                    (
                        key.trim().to_string(),
                        Some(value.trim().to_string()),
                        false,
                    )
                } else {
                    (requirement.to_string(), None, false)
                }
            })
            .collect()
    }
}

impl Selection {
    /// Whether the object stored at `path` is an item of this list or watch.
    fn covers(&self, path: &str, object: &Value) -> bool {
        in_collection(&self.collection, path)
            && self.labels.iter().all(|(key, value, negated)| {
                let label = object["metadata"]["labels"][key.as_str()].as_str();
                match (value, negated) {
                    (Some(value), false) => label == Some(value.as_str()),
                    (Some(value), true) => label != Some(value.as_str()),
                    (None, _) => label.is_some(),
                }
            })
    }

    /// The object as this client asked for it.
    fn item(&self, object: &Value) -> Value {
        if self.metadata_only {
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                   "metadata": object["metadata"]})
        } else {
            object.clone()
        }
    }
}

/// Whether `object_path` names an object of `collection` (`.../secrets` in all namespaces,
/// `.../namespaces/x/secrets` in x, or cluster-scoped `.../messagebrokers`).
fn in_collection(collection: &str, object_path: &str) -> bool {
    let Some((prefix, resource)) = collection.rsplit_once('/') else {
        return false;
    };
    let Some(rest) = object_path.strip_prefix(prefix) else {
        return false;
    };
    let segments: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        [r, _] => *r == resource,
        ["namespaces", _, r, _] => *r == resource && !prefix.contains("/namespaces/"),
        _ => false,
    }
}

/// A list as a real server answers it: `limit` items per page from the `continue` point, in
/// name order, with the list's resourceVersion and a `continue` token while more remain.
fn list(state: &State, selection: &Selection, params: &Params) -> (StatusCode, Value) {
    let (version, after) = match params
        .continue_token
        .as_deref()
        .and_then(|t| t.split_once(':'))
    {
        Some((version, after)) => (version.to_string(), Some(after.to_string())),
        None => (state.resource_version.to_string(), None),
    };
    let limit = params.limit.unwrap_or(usize::MAX);
    let mut matching = state
        .objects
        .range::<String, _>((
            after
                .clone()
                .map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded),
            std::ops::Bound::Unbounded,
        ))
        .filter(|(path, object)| selection.covers(path, object));
    let page: Vec<(&String, &Value)> = matching.by_ref().take(limit).collect();
    let remaining = matching.count();
    let mut metadata = json!({"resourceVersion": version});
    if remaining > 0
        && let Some((last, _)) = page.last()
    {
        metadata["continue"] = json!(format!("{version}:{last}"));
        metadata["remainingItemCount"] = json!(remaining);
    }
    let items: Vec<Value> = page.iter().map(|(_, o)| selection.item(o)).collect();
    let (api_version, kind) = if selection.metadata_only {
        (
            "meta.k8s.io/v1".to_string(),
            "PartialObjectMetadataList".to_string(),
        )
    } else {
        let first = items.first();
        (
            first
                .and_then(|o| o["apiVersion"].as_str())
                .unwrap_or("v1")
                .to_string(),
            first
                .and_then(|o| o["kind"].as_str())
                .map_or("List".to_string(), |k| format!("{k}List")),
        )
    };
    (
        StatusCode::OK,
        json!({"apiVersion": api_version, "kind": kind, "metadata": metadata, "items": items}),
    )
}

fn watch_line(selection: &Selection, event: &WatchEvent) -> Value {
    json!({"type": event.kind, "object": selection.item(&event.object)})
}

/// A watch: the writes after `resourceVersion` (every object as ADDED when it is absent or
/// 0), then each new one as it happens, one JSON event per line, until `timeoutSeconds`
/// (then a BOOKMARK when asked for). From a version older than the history kept: one ERROR
/// event, 410 Gone, and the client lists again.
fn watch(state: &mut State, selection: Selection, params: &Params) -> Response<ResponseBody> {
    let since = params.resource_version.as_deref().unwrap_or("0");
    let metadata_only = selection.metadata_only;
    let (send, receive) = tokio::sync::mpsc::unbounded_channel();
    match since.parse::<u64>() {
        Ok(0) => {
            for (path, object) in &state.objects {
                if selection.covers(path, object) {
                    let line = json!({"type": "ADDED", "object": selection.item(object)});
                    let _ = send.send(line);
                }
            }
        }
        Ok(since) if since >= state.history_floor => {
            for event in state.history.iter().filter(|e| e.version > since) {
                if selection.covers(&event.path, &event.object) {
                    let _ = send.send(watch_line(&selection, event));
                }
            }
        }
        _ => {
            let _ = send.send(json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                "reason": "Expired", "message": format!("too old resource version: {since} ({})", state.history_floor + 1)}}));
            drop(send);
            let ended = WatchStream {
                bookmark: None,
                metadata_only,
                timeout: Duration::ZERO,
                delay: (Duration::ZERO, Duration::ZERO),
                rng: 0,
            };
            return stream_response(receive, ended);
        }
    }
    state.watches.push(WatchSink { selection, send });
    let stream = WatchStream {
        bookmark: params.bookmarks.then(|| state.current.clone()),
        metadata_only,
        timeout: params.timeout.unwrap_or(WATCH_DEFAULT_TIMEOUT),
        delay: state.latency.watch_event,
        rng: state.rng ^ state.resource_version,
    };
    stream_response(receive, stream)
}

/// How a watch's body streams.
struct WatchStream {
    /// Where to read the resourceVersion of the closing BOOKMARK (when asked for).
    bookmark: Option<Arc<std::sync::atomic::AtomicU64>>,
    metadata_only: bool,
    timeout: Duration,
    /// Before each event ([`Latency::watch_event`]).
    delay: (Duration, Duration),
    rng: u64,
}

/// The streamed body of a watch: each event after its delay, until the timeout; then the
/// closing bookmark (when asked for) at the server's current resourceVersion.
fn stream_response(
    receive: tokio::sync::mpsc::UnboundedReceiver<Value>,
    mut watch: WatchStream,
) -> Response<ResponseBody> {
    let deadline = tokio::time::Instant::now() + watch.timeout;
    let lines = futures_util::stream::unfold(Some(receive), move |receive| {
        let delay = sample(&mut watch.rng, watch.delay);
        let bookmark = watch.bookmark.clone();
        let metadata_only = watch.metadata_only;
        async move {
            let mut receive: tokio::sync::mpsc::UnboundedReceiver<Value> = receive?;
            let next = tokio::select! {
                biased;
                next = receive.recv() => next,
                () = tokio::time::sleep_until(deadline) => None,
            };
            let (line, receive) = match next {
                Some(event) => {
                    tokio::time::sleep(delay).await;
                    (event, Some(receive))
                }
                None => {
                    let version = bookmark?.load(std::sync::atomic::Ordering::Relaxed);
                    // A real server names the watched kind; clients read only the version.
                    let (api_version, kind) = if metadata_only {
                        ("meta.k8s.io/v1", "PartialObjectMetadata")
                    } else {
                        ("v1", "Bookmark")
                    };
                    let line = json!({"type": "BOOKMARK", "object": {"apiVersion": api_version,
                        "kind": kind, "metadata": {"resourceVersion": version.to_string()}}});
                    (line, None)
                }
            };
            let mut bytes = serde_json::to_vec(&line).expect("watch event");
            bytes.push(b'\n');
            Some((
                Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(bytes)),
                receive,
            ))
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .body(ResponseBody::from_stream(lines))
        .expect("response")
}

/// Server-side apply of one manager's configuration: fields it applied before and no
/// longer applies are removed, then the applied fields are merged in (maps field by field,
/// lists and values replaced); fields nobody in this apply owns stay as they are.
fn server_side_apply(object: &mut Value, applied: &Value, previous: Option<&Value>) {
    if let Some(previous) = previous {
        remove_dropped(object, previous, applied);
    }
    merge(object, applied);
}

fn remove_dropped(object: &mut Value, previous: &Value, applied: &Value) {
    let (Some(object), Some(previous)) = (object.as_object_mut(), previous.as_object()) else {
        return;
    };
    for (field, before) in previous {
        match applied.get(field) {
            None => {
                object.remove(field);
            }
            Some(now) if before.is_object() && now.is_object() => {
                if let Some(child) = object.get_mut(field) {
                    remove_dropped(child, before, now);
                }
            }
            Some(_) => {}
        }
    }
}

fn merge(object: &mut Value, applied: &Value) {
    match (object.as_object_mut(), applied.as_object()) {
        (Some(object), Some(applied)) => {
            for (field, value) in applied {
                match object.get_mut(field) {
                    Some(existing) if existing.is_object() && value.is_object() => {
                        merge(existing, value)
                    }
                    _ => {
                        object.insert(field.clone(), value.clone());
                    }
                }
            }
        }
        _ => *object = applied.clone(),
    }
}

/// Applies the finalizer JSON patches kube-runtime's `finalizer()` sends.
fn json_patch_finalizers(object: &mut Value, patch: &Value) {
    for op in patch.as_array().into_iter().flatten() {
        let path = op["path"].as_str().unwrap_or_default();
        match op["op"].as_str() {
            Some("test") => {}
            Some("add") if path == "/metadata/finalizers" => {
                object["metadata"]["finalizers"] = op["value"].clone();
            }
            Some("add") if path == "/metadata/finalizers/-" => {
                let list = object["metadata"]["finalizers"]
                    .as_array_mut()
                    .expect("finalizers list");
                list.push(op["value"].clone());
            }
            Some("remove") => {
                let index: usize = path
                    .rsplit('/')
                    .next()
                    .and_then(|i| i.parse().ok())
                    .expect("finalizer index");
                object["metadata"]["finalizers"]
                    .as_array_mut()
                    .expect("finalizers list")
                    .remove(index);
            }
            other => panic!("unexpected JSON patch op {other:?} at {path}"),
        }
    }
}
