//! What the operator benchmarks share: the process's memory figures, the test broker's
//! management API, the pipeline template, and the mocked Kubernetes API served from a child
//! process (so its objects do not count in the operator's RSS).
//!
//! Each benchmark includes this module with `#[path = "support/mod.rs"] mod support;` beside
//! `tests/operator/fake_api.rs` as `mod fake_api`.

#![allow(dead_code)] // each benchmark uses its part

use std::time::Duration;

use anyhow::Context as _;
use http::Method;
use msgpipe::api::load::parse_pipelines;
use serde_json::{Value, json};

use crate::fake_api::FakeApi;

/// A field of /proc/self/status (`VmRSS`, `VmHWM`, `RssAnon`, `RssFile`: KiB; `Threads`).
pub fn status_kib(name: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(':')))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

pub fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// With RUST_LOG set, the operator's own log lines (batches, broker changes) on stderr.
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
}

/// The seed article's pipeline (examples/notes-pipeline.yaml) as JSON: five attempts, four
/// retry tiers, a dead-letter queue, alerts and client flags.
pub fn template() -> anyhow::Result<Value> {
    let text = std::fs::read_to_string("examples/notes-pipeline.yaml")?;
    Ok(serde_json::to_value(parse_pipelines(&text)?.remove(0))?)
}

/// One management API answer, as guest.
pub async fn mgmt_get(http: &reqwest::Client, url: &str) -> anyhow::Result<Value> {
    let response = http
        .get(url)
        .basic_auth("guest", Some("guest"))
        .send()
        .await?;
    Ok(response.error_for_status()?.json().await?)
}

/// The names of the node's vhosts.
pub async fn vhosts(http: &reqwest::Client, mgmt: &str) -> anyhow::Result<Vec<String>> {
    let vhosts = mgmt_get(http, &format!("{mgmt}/api/vhosts?columns=name")).await?;
    Ok(vhosts
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str().map(str::to_string))
        .collect())
}

/// `vhost`, empty, with guest allowed everything.
pub async fn fresh_vhost_named(
    http: &reqwest::Client,
    mgmt: &str,
    vhost: &str,
) -> anyhow::Result<()> {
    delete_vhost(http, mgmt, vhost).await;
    http.put(format!("{mgmt}/api/vhosts/{vhost}"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await?
        .error_for_status()?;
    http.put(format!("{mgmt}/api/permissions/{vhost}/guest"))
        .basic_auth("guest", Some("guest"))
        .json(&json!({"configure": ".*", "write": ".*", "read": ".*"}))
        .send()
        .await?
        .error_for_status()?;
    Ok(())
}

/// A new empty vhost named after `prefix` and this process.
pub async fn fresh_vhost(
    http: &reqwest::Client,
    mgmt: &str,
    prefix: &str,
) -> anyhow::Result<String> {
    let vhost = format!("{prefix}-{}", std::process::id());
    fresh_vhost_named(http, mgmt, &vhost).await?;
    Ok(vhost)
}

/// Deletes the vhost and waits until it is gone (the node goes on deleting thousands of
/// quorum queues after the management API has closed the request).
pub async fn delete_vhost(http: &reqwest::Client, mgmt: &str, vhost: &str) {
    let url = format!("{mgmt}/api/vhosts/{vhost}");
    let _ = http
        .delete(&url)
        .basic_auth("guest", Some("guest"))
        .send()
        .await;
    for _ in 0..300 {
        let found = http
            .get(&url)
            .basic_auth("guest", Some("guest"))
            .send()
            .await;
        if !found.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Where the API child answers with its call counts (and forgets the calls).
pub const CALLS_PATH: &str = "/_bench/calls";
/// Where the API child stores the object in the body at `?path=`, as a user's `kubectl
/// apply` would (watches see it).
pub const PUT_PATH: &str = "/_bench/put";

/// Where the API child answers with the number of watches open on it.
pub const WATCHES_PATH: &str = "/_bench/watches";

/// The mocked API server in a child process (this benchmark again, with `args`), killed when
/// dropped.
pub struct ApiProcess {
    child: std::process::Child,
    pub url: String,
}

impl ApiProcess {
    /// Starts the child; it prints its port on its first line.
    pub fn spawn(args: &[String]) -> anyhow::Result<ApiProcess> {
        use std::io::BufRead as _;
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("the mocked API's process")?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("its stdout")?;
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let port: u16 = line
            .trim()
            .parse()
            .with_context(|| format!("the mocked API's port, got {line:?}"))?;
        Ok(ApiProcess {
            child,
            url: format!("http://127.0.0.1:{port}"),
        })
    }

    /// The object the API server stores at `path`.
    pub async fn get<T: serde::de::DeserializeOwned>(
        &self,
        http: &reqwest::Client,
        path: &str,
    ) -> anyhow::Result<T> {
        let response = http.get(format!("{}{path}", self.url)).send().await?;
        Ok(response.error_for_status()?.json().await?)
    }

    /// Stores `object` at `path` as a user's apply would.
    pub async fn put(
        &self,
        http: &reqwest::Client,
        path: &str,
        object: &impl serde::Serialize,
    ) -> anyhow::Result<()> {
        let path = percent_encoding::utf8_percent_encode(path, percent_encoding::NON_ALPHANUMERIC);
        http.post(format!("{}{PUT_PATH}?path={path}", self.url))
            .json(object)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// (calls, write calls) the API server answered since the last take.
    pub async fn take_calls(&self, http: &reqwest::Client) -> anyhow::Result<(usize, usize)> {
        let response = http.get(format!("{}{CALLS_PATH}", self.url)).send().await?;
        let counts: Value = response.error_for_status()?.json().await?;
        let count = |key: &str| counts[key].as_u64().unwrap_or(0) as usize;
        Ok((count("calls"), count("writes")))
    }
}

impl Drop for ApiProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child's side: serves `api` on a loopback port (printed on stdout) until killed, with
/// [`CALLS_PATH`], [`PUT_PATH`] and [`WATCHES_PATH`] in front of the Kubernetes paths.
pub async fn serve(api: FakeApi) -> anyhow::Result<()> {
    use axum::routing::{get, post};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?.port());
    let (calls, puts, watches) = (api.clone(), api.clone(), api.clone());
    let router = api
        .router()
        .route(
            CALLS_PATH,
            get(move || async move {
                let calls = calls.take_calls();
                if std::env::var_os("BENCH_CALLS").is_some() {
                    eprintln!("api calls taken: {}", calls.len());
                    for call in calls.iter().filter(|c| c.method != Method::GET) {
                        eprintln!("api write: {} {}", call.line(), call.body);
                    }
                }
                let writes = calls.iter().filter(|c| c.method != Method::GET).count();
                json!({"calls": calls.len(), "writes": writes}).to_string()
            }),
        )
        .route(
            PUT_PATH,
            post(
                move |axum::extract::RawQuery(query): axum::extract::RawQuery,
                      body: axum::body::Bytes| async move {
                    let path = query.as_deref().and_then(|q| q.strip_prefix("path="));
                    match (path, serde_json::from_slice::<Value>(&body)) {
                        (Some(path), Ok(object)) => {
                            let path = percent_encoding::percent_decode_str(path);
                            puts.put(&path.decode_utf8_lossy(), object);
                            http::StatusCode::OK
                        }
                        _ => http::StatusCode::BAD_REQUEST,
                    }
                },
            ),
        )
        .route(
            WATCHES_PATH,
            get(move || async move { watches.open_watches().to_string() }),
        );
    axum::serve(listener, router).await?;
    Ok(())
}
