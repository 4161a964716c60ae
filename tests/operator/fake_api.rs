//! The Kubernetes API as the operator's reconcile sees it, mocked the way kube-rs documents
//! (`tower_test::mock`): every request is recorded and checked, and answered from a small
//! in-memory object map. An unexpected request fails the test.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
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
        state.calls.push(call);
        let (status, reply) = route(&mut state, &method, &path, body);
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&reply).expect("reply")))
            .expect("response")
    }
}

fn not_found(path: &str) -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "message": format!("{path} not found"), "reason": "NotFound", "code": 404}),
    )
}

fn route(state: &mut State, method: &Method, path: &str, body: Value) -> (StatusCode, Value) {
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
    if let Some(object_path) = path.strip_suffix("/status") {
        assert_eq!(method, Method::PATCH, "status is only ever patched");
        let Some(object) = state.objects.get_mut(object_path) else {
            return not_found(path);
        };
        object["status"] = body["status"].clone();
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
            // Server-side apply: the fake stores what was applied.
            state.objects.insert(path.to_string(), body.clone());
            (StatusCode::OK, body)
        }
        _ => panic!("unexpected request {method} {path}"),
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
