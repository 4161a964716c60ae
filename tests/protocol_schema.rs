//! `conformance/pipeline.schema.json` describes the `pipeline.json` the operator writes
//! (docs/protocol.md §1): every example pipeline and every conformance case's pipeline is
//! planned, and its `pipeline.json` is checked against the schema.
//!
//! No JSON Schema crate is in the dependency tree, and one is not worth adding for a schema of
//! this size: [`check`] walks the keywords the schema uses (`type`, `const`, `required`,
//! `properties`, `items`, `$ref`, bounds, `pattern`) and fails on any other keyword, so the
//! schema cannot quietly grow past what is checked. Strict on top of the schema: every key the
//! operator writes must be declared (the schema itself lets clients ignore unknown keys, J-3),
//! and every declared key must be required (the operator writes all of them). The conformance
//! runner's self-test validates the same files with Python's `jsonschema` when installed.

use std::path::{Path, PathBuf};

use msgpipe::api::load::parse_pipelines;
use msgpipe::plan::plan;
use serde_json::Value;

fn repo(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn schema() -> Value {
    let text = std::fs::read_to_string(repo("conformance/pipeline.schema.json")).expect("schema");
    serde_json::from_str(&text).expect("the schema is JSON")
}

/// `pipeline.json` of every pipeline in a manifest, as the operator writes it (the ConfigMap's
/// text, not a re-serialization).
fn pipeline_jsons(manifest: &str, origin: &str) -> Vec<(String, Value)> {
    let pipelines = parse_pipelines(manifest).unwrap_or_else(|e| panic!("{origin}: {e}"));
    pipelines
        .iter()
        .map(|pipeline| {
            let state =
                plan(pipeline, Some("conformance")).unwrap_or_else(|e| panic!("{origin}: {e}"));
            let data = state.config_map.data.as_ref().expect("ConfigMap data");
            let text = &data["pipeline.json"];
            let json: Value = serde_json::from_str(text).expect("pipeline.json is JSON");
            (format!("{origin} ({})", state.pipeline), json)
        })
        .collect()
}

fn resolve<'a>(root: &'a Value, reference: &str) -> &'a Value {
    let path = reference.strip_prefix("#/").expect("local $ref");
    path.split('/').fold(root, |node, key| {
        node.get(key).unwrap_or_else(|| panic!("$ref {reference}"))
    })
}

fn type_matches(name: &str, value: &Value) -> bool {
    match name {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "null" => value.is_null(),
        other => panic!("unknown type {other}"),
    }
}

/// Validates `value` against `node` of `root`; pushes one line per problem, at JSON `path`.
fn check(root: &Value, node: &Value, value: &Value, path: &str, problems: &mut Vec<String>) {
    let keywords = node.as_object().expect("schema node is an object");
    for (keyword, arg) in keywords {
        let problem = match keyword.as_str() {
            "$schema" | "$id" | "$defs" | "title" | "description" => None,
            "$ref" => {
                check(
                    root,
                    resolve(root, arg.as_str().expect("$ref")),
                    value,
                    path,
                    problems,
                );
                None
            }
            "type" => (!type_matches(arg.as_str().expect("type"), value))
                .then(|| format!("{path}: expected {arg}, found {value}")),
            "const" => (value != arg).then(|| format!("{path}: expected {arg}, found {value}")),
            "minimum" => value
                .as_f64()
                .filter(|v| *v < arg.as_f64().expect("minimum"))
                .map(|v| format!("{path}: {v} < minimum {arg}")),
            "maximum" => value
                .as_f64()
                .filter(|v| *v > arg.as_f64().expect("maximum"))
                .map(|v| format!("{path}: {v} > maximum {arg}")),
            "minLength" | "maxLength" => value.as_str().and_then(|s| {
                let len = s.chars().count() as u64;
                let bound = arg.as_u64().expect("length bound");
                let bad = if keyword == "minLength" {
                    len < bound
                } else {
                    len > bound
                };
                bad.then(|| format!("{path}: length {len} breaks {keyword} {bound}"))
            }),
            "pattern" => value.as_str().and_then(|s| {
                let re =
                    regex::Regex::new(arg.as_str().expect("pattern")).expect("pattern compiles");
                (!re.is_match(s)).then(|| format!("{path}: {s:?} does not match {arg}"))
            }),
            "required" => {
                let object = value.as_object();
                let missing: Vec<&str> = arg
                    .as_array()
                    .expect("required list")
                    .iter()
                    .filter_map(Value::as_str)
                    .filter(|key| object.is_some_and(|o| !o.contains_key(*key)))
                    .collect();
                (!missing.is_empty()).then(|| format!("{path}: missing {missing:?}"))
            }
            "properties" => {
                check_properties(root, node, arg, value, path, problems);
                None
            }
            "items" => {
                for (i, item) in value.as_array().into_iter().flatten().enumerate() {
                    check(root, arg, item, &format!("{path}[{i}]"), problems);
                }
                None
            }
            other => panic!("the schema uses {other:?}, which this test does not check: teach it"),
        };
        problems.extend(problem);
    }
}

/// `properties`, plus this test's strictness: no undeclared key, every declared key required.
fn check_properties(
    root: &Value,
    node: &Value,
    properties: &Value,
    value: &Value,
    path: &str,
    problems: &mut Vec<String>,
) {
    let declared = properties.as_object().expect("properties");
    let required: Vec<&str> = node
        .get("required")
        .and_then(Value::as_array)
        .map(|list| list.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for key in declared.keys() {
        assert!(
            required.contains(&key.as_str()),
            "schema: {path}.{key} is declared but not required (the operator writes every field)"
        );
    }
    let Some(object) = value.as_object() else {
        return;
    };
    for (key, field) in object {
        match declared.get(key) {
            Some(schema) => check(root, schema, field, &format!("{path}.{key}"), problems),
            None => problems.push(format!(
                "{path}.{key}: written by the operator but not in the schema"
            )),
        }
    }
}

fn assert_valid(origin: &str, json: &Value) {
    let schema = schema();
    let mut problems = Vec::new();
    check(&schema, &schema, json, "$", &mut problems);
    assert!(
        problems.is_empty(),
        "{origin}: pipeline.json breaks the schema:\n{}",
        problems.join("\n")
    );
}

#[test]
fn every_example_pipeline_json_matches_the_schema() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo("examples")).expect("examples/") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read example");
        for (origin, json) in pipeline_jsons(&text, &path.display().to_string()) {
            assert_valid(&origin, &json);
            checked += 1;
        }
    }
    assert!(checked >= 5, "only {checked} example pipelines found");
}

#[test]
fn every_conformance_case_pipeline_json_matches_the_schema() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo("conformance/cases")).expect("conformance/cases/") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let case: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read case"))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut pipeline = case["pipeline"].clone();
        // What the runner fills in (conformance/runner/case.py, CaseRun::manifest).
        pipeline["apiVersion"] = "msgpipe.io/v1alpha1".into();
        pipeline["kind"] = "MessagePipeline".into();
        pipeline["metadata"]["namespace"] = "conformance".into();
        pipeline["spec"]["broker"] = serde_json::json!({"secretRef": {"name": "conformance"}});
        if pipeline["spec"].get("alerts").is_none() {
            pipeline["spec"]["alerts"] = serde_json::json!({"enabled": false});
        }
        for (origin, json) in pipeline_jsons(&pipeline.to_string(), &path.display().to_string()) {
            assert_valid(&origin, &json);
            checked += 1;
        }
    }
    assert!(checked >= 25, "only {checked} case pipelines found");
}

#[test]
fn one_attempt_pipelines_have_no_tiers_and_capped_delays_share_the_last_tier() {
    let manifest = |max_attempts: u32| {
        format!(
            "apiVersion: msgpipe.io/v1alpha1\nkind: MessagePipeline\nmetadata: {{name: p, namespace: ns}}\n\
             spec:\n  broker: {{secretRef: {{name: s}}}}\n  retry:\n    maxAttempts: {max_attempts}\n\
             \x20   backoff: {{initialDelay: 200ms, multiplier: 2, maxDelay: 400ms}}\n"
        )
    };
    let (_, one) = pipeline_jsons(&manifest(1), "maxAttempts 1").remove(0);
    assert_valid("maxAttempts 1", &one);
    assert_eq!(one["retry"]["tiers"], serde_json::json!([]));
    let (_, six) = pipeline_jsons(&manifest(6), "maxAttempts 6").remove(0);
    assert_valid("maxAttempts 6", &six);
    let last = &six["retry"]["tiers"][1];
    assert_eq!(
        (
            last["first_attempt"].as_u64(),
            last["last_attempt"].as_u64()
        ),
        (Some(2), Some(5))
    );
}

#[test]
fn the_schema_catches_a_broken_pipeline_json() {
    let (_, mut json) = pipeline_jsons(
        &std::fs::read_to_string(repo("examples/notes-pipeline.yaml")).expect("notes"),
        "notes",
    )
    .remove(0);
    json["version"] = 2.into();
    json["features"]["retry_pending"] = "yes".into();
    json["retry"]["tiers"][0]
        .as_object_mut()
        .expect("tier")
        .remove("delay_ms");
    json["surprise"] = true.into();
    let schema = schema();
    let mut problems = Vec::new();
    check(&schema, &schema, &json, "$", &mut problems);
    let text = problems.join("\n");
    for expected in [
        "$.version",
        "$.features.retry_pending",
        "$.retry.tiers[0]: missing",
        "$.surprise",
    ] {
        assert!(
            text.contains(expected),
            "{expected} not reported in:\n{text}"
        );
    }
}
