//! The Kubernetes API as the operator's reconcile sees it, mocked the way kube-rs documents
//! (`tower_test::mock`): every request is recorded and checked, and answered from a small
//! in-memory object map. An unexpected request fails the test.
//!
//! It answers as a real API server does where the operator can tell: server-side apply
//! merges the applied configuration into the stored object (fields of other managers stay,
//! fields this manager stopped applying go) and answers with the stored object, never an
//! echo of the request; the server sets uid, resourceVersion and creationTimestamp; a call
//! the test forbids gets the 403 `Status` a real server sends for an RBAC denial.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

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
}

#[derive(Clone, Default)]
pub struct FakeApi(pub Arc<Mutex<State>>);

impl FakeApi {
    /// A kube Client whose every request goes to this fake, served by a background task.
    pub fn client(&self) -> (Client, JoinHandle<()>) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let state = self.clone();
        let task = tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let response = state.answer(request).await;
                send.send_response(response);
            }
        });
        (Client::new(service, "default"), task)
    }

    pub fn put(&self, path: &str, object: Value) {
        self.lock().objects.insert(path.to_string(), object);
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

    pub async fn answer(&self, request: Request<Body>) -> Response<Body> {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or_default().to_string();
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
            query,
            body: body.clone(),
        };
        let mut state = self.lock();
        let manager = field_manager(&call.query);
        state.calls.push(call);
        if let Some(denied) = forbidden(&state, &method, &path) {
            return respond(StatusCode::FORBIDDEN, &denied);
        }
        if let Some((modes, own)) = &state.rbac
            && let Some(denied) = outside_rbac(*modes, own, &method, &path, &call_query(&state))
        {
            state.denied.push(format!("{method} {path}"));
            return respond(StatusCode::FORBIDDEN, &denied);
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
        let (status, reply) = route(&mut state, &method, &path, body, &manager);
        drop(state);
        respond(status, &reply)
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

fn respond(status: StatusCode, reply: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Body::from(serde_json::to_vec(reply).expect("reply")))
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
        if !state.objects.contains_key(object_path) {
            return not_found(path);
        }
        // The status subresource applies only .status.
        let applied = json!({"status": body["status"].clone()});
        let key = (path.to_string(), manager.to_string());
        let previous = state.applied.insert(key, applied.clone());
        let version = state.next_version();
        let object = state.objects.get_mut(object_path).expect("checked above");
        server_side_apply(object, &applied, previous.as_ref());
        object["metadata"]["resourceVersion"] = json!(version);
        return (StatusCode::OK, object.clone());
    }
    match *method {
        Method::GET => match state.objects.get(path) {
            Some(object) => (StatusCode::OK, object.clone()),
            None => not_found(path),
        },
        Method::DELETE => match state.objects.remove(path) {
            Some(object) => (StatusCode::OK, object),
            None => not_found(path),
        },
        Method::PATCH if body.is_array() => {
            let Some(object) = state.objects.get_mut(path) else {
                return not_found(path);
            };
            json_patch_finalizers(object, &body);
            (StatusCode::OK, object.clone())
        }
        Method::PATCH => {
            let key = (path.to_string(), manager.to_string());
            let previous = state.applied.insert(key, body.clone());
            let version = state.next_version();
            let object = state.objects.entry(path.to_string()).or_insert_with(|| {
                json!({"metadata": {
                    "uid": format!("00000000-0000-4000-8000-{version:012}"),
                    "creationTimestamp": "2026-12-01T00:00:00Z",
                }})
            });
            server_side_apply(object, &body, previous.as_ref());
            object["metadata"]["resourceVersion"] = json!(version);
            (StatusCode::OK, object.clone())
        }
        _ => panic!("unexpected request {method} {path}"),
    }
}

impl State {
    fn next_version(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }
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
