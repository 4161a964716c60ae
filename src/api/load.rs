//! Strict reading of MessagePipeline manifests (YAML or JSON, one or many documents).
//!
//! Unlike the API server, which prunes unknown fields, a file is read strictly: an unknown
//! or misspelt field is an error naming its path, so a typo never silently becomes a default.

use serde_json::Value;

use super::spec::MessagePipeline;
use super::validate::FieldError;

pub const API_VERSION: &str = "msgpipe.io/v1alpha1";
pub const KIND: &str = "MessagePipeline";

/// Why a manifest could not be read as MessagePipelines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("not valid YAML: {0}")]
    Syntax(String),
    #[error("no MessagePipeline found (the input has no documents)")]
    Empty,
    #[error("{}{error}", doc_prefix(*.document))]
    Field {
        document: Option<usize>,
        error: FieldError,
    },
}

fn doc_prefix(document: Option<usize>) -> String {
    document
        .map(|n| format!("document {n}: "))
        .unwrap_or_default()
}

/// Reads every document of a YAML (or JSON) stream as a MessagePipeline.
///
/// ```
/// let yaml = "apiVersion: msgpipe.io/v1alpha1\nkind: MessagePipeline\nmetadata: {name: notes}\nspec:\n  broker: {secretRef: {name: rabbitmq}}\n";
/// let pipelines = msgpipe::api::load::parse_pipelines(yaml).unwrap();
/// assert_eq!(pipelines[0].spec.retry.max_attempts, 5);
/// ```
pub fn parse_pipelines(text: &str) -> Result<Vec<MessagePipeline>, LoadError> {
    let options = serde_saphyr::options! { with_snippet: false };
    let documents: Vec<Value> = serde_saphyr::from_multiple_with_options(text, options)
        .map_err(|e| LoadError::Syntax(syntax_message(&e.to_string())))?;
    if documents.is_empty() {
        return Err(LoadError::Empty);
    }
    let numbered = documents.len() > 1;
    documents
        .into_iter()
        .enumerate()
        .map(|(i, document)| {
            pipeline_from_value(document).map_err(|error| LoadError::Field {
                document: numbered.then_some(i + 1),
                error,
            })
        })
        .collect()
}

/// Converts one parsed document, refusing other kinds, unknown fields and wrong types.
pub fn pipeline_from_value(document: Value) -> Result<MessagePipeline, FieldError> {
    check_type_meta(&document)?;
    let mut unknown = Vec::new();
    let mut record = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
    let deserializer = serde_ignored::Deserializer::new(document, &mut record);
    let parsed: Result<MessagePipeline, _> = serde_path_to_error::deserialize(deserializer);
    let pipeline = parsed.map_err(|e| {
        let path = e.path().to_string();
        field_error_from_serde(&path, &e.into_inner().to_string())
    })?;
    // The generated root type checks apiVersion and kind itself (as we did above) and
    // reports them as ignored.
    if let Some(path) = unknown
        .into_iter()
        .find(|path| path != "apiVersion" && path != "kind")
    {
        return Err(FieldError::new(path, "unknown field"));
    }
    Ok(pipeline)
}

/// Decodes a MessagePipeline as the API server stores it (the operator's view).
///
/// Unlike [`pipeline_from_value`] it ignores fields it does not know (the API server
/// prunes them; a newer CRD may add some), but a field it cannot read (wrong type, an
/// unparsable or overflowing duration) is an error naming the field's JSON path, so one
/// such object can be reported on its own instead of failing a whole list.
pub fn decode_stored(object: Value) -> Result<MessagePipeline, FieldError> {
    serde_path_to_error::deserialize(object).map_err(|e| {
        let path = e.path().to_string();
        field_error_from_serde(&path, &e.into_inner().to_string())
    })
}

fn check_type_meta(document: &Value) -> Result<(), FieldError> {
    let Value::Object(map) = document else {
        return Err(FieldError::new(
            "(document)",
            "is not a mapping; expected a MessagePipeline object",
        ));
    };
    let text = |key: &str| map.get(key).and_then(Value::as_str);
    match text("kind") {
        Some(KIND) => {}
        Some(other) => {
            return Err(FieldError::new(
                "kind",
                format!("is {other:?}, expected {KIND:?}"),
            ));
        }
        None => return Err(FieldError::new("kind", format!("is required ({KIND:?})"))),
    }
    match text("apiVersion") {
        Some(API_VERSION) => Ok(()),
        Some(other) => Err(FieldError::new(
            "apiVersion",
            format!("is {other:?}, expected {API_VERSION:?}"),
        )),
        None => Err(FieldError::new(
            "apiVersion",
            format!("is required ({API_VERSION:?})"),
        )),
    }
}

/// Serde says "missing field `broker`" at `spec`; users want `spec.broker: is required`.
fn field_error_from_serde(path: &str, message: &str) -> FieldError {
    let message = one_line(message);
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        let full = if path == "." || path.is_empty() {
            field.to_string()
        } else {
            format!("{path}.{field}")
        };
        return FieldError::new(full, "is required");
    }
    FieldError::new(if path == "." { "(document)" } else { path }, message)
}

/// The parser's message without advice aimed at its API's callers.
fn syntax_message(text: &str) -> String {
    one_line(text).replace(", set DuplicateKeyPolicy in Options if acceptable", "")
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str =
        "apiVersion: msgpipe.io/v1alpha1\nkind: MessagePipeline\nmetadata: {name: p}\n";

    fn error_of(spec: &str) -> String {
        parse_pipelines(&format!("{HEAD}spec:\n{spec}"))
            .expect_err("must fail")
            .to_string()
    }

    #[test]
    fn defaults_fill_an_almost_empty_spec() {
        let p = &parse_pipelines(&format!(
            "{HEAD}spec: {{broker: {{secretRef: {{name: s}}}}}}"
        ))
        .expect("parses")[0];
        assert_eq!(p.spec.retry.max_attempts, 5);
        assert_eq!(p.spec.retry.backoff.max_delay.as_millis(), 60_000);
        assert!(p.spec.alerts.enabled);
        assert_eq!(p.spec.alerts.dlq_depth.threshold, 100);
    }

    #[test]
    fn misspelt_field_is_named() {
        assert_eq!(
            error_of("  broker: {secretRef: {name: s}}\n  queue: {nmae: x}\n"),
            "spec.queue.nmae: unknown field"
        );
    }

    #[test]
    fn wrong_type_names_path_and_expectation() {
        assert_eq!(
            error_of("  broker: {secretRef: {name: s}}\n  retry: {maxAttempts: five}\n"),
            "spec.retry.maxAttempts: invalid type: string \"five\", expected u32"
        );
    }

    #[test]
    fn missing_required_field_is_named() {
        assert_eq!(error_of("  queue: {name: x}\n"), "spec.broker: is required");
    }

    #[test]
    fn other_kinds_are_refused() {
        let err = parse_pipelines("apiVersion: apps/v1\nkind: Deployment\n").expect_err("fails");
        assert_eq!(
            err.to_string(),
            "kind: is \"Deployment\", expected \"MessagePipeline\""
        );
    }

    #[test]
    fn multi_document_errors_say_which_document() {
        let ok = format!("{HEAD}spec: {{broker: {{secretRef: {{name: s}}}}}}\n");
        let bad = format!(
            "{HEAD}spec: {{broker: {{secretRef: {{name: s}}}}, retry: {{maxAttempts: -1}}}}\n"
        );
        let err = parse_pipelines(&format!("{ok}---\n{bad}")).expect_err("fails");
        assert!(
            err.to_string()
                .starts_with("document 2: spec.retry.maxAttempts: invalid value"),
            "{err}"
        );
    }

    #[test]
    fn a_stored_object_with_an_overflowing_duration_names_the_field() {
        let object = serde_json::json!({
            "apiVersion": API_VERSION, "kind": KIND,
            "metadata": {"name": "p", "namespace": "a"},
            "spec": {"broker": {"secretRef": {"name": "s"}},
                     "deadLetter": {"retention": "99999999999999999999d"},
                     "futureField": 1}
        });
        let error = decode_stored(object).expect_err("overflows");
        assert_eq!(error.path, "spec.deadLetter.retention");
        assert!(error.message.contains("invalid duration"), "{error}");
        assert!(!error.to_string().contains('\n'));
    }

    #[test]
    fn a_stored_object_ignores_fields_it_does_not_know() {
        let object = serde_json::json!({
            "apiVersion": API_VERSION, "kind": KIND,
            "metadata": {"name": "p", "namespace": "a"},
            "spec": {"broker": {"secretRef": {"name": "s"}}, "futureField": 1},
            "status": {"observedGeneration": 1}
        });
        let pipeline = decode_stored(object).expect("decodes");
        assert_eq!(
            pipeline
                .spec
                .broker
                .secret_ref
                .as_ref()
                .map(|s| s.name.as_str()),
            Some("s")
        );
    }

    #[test]
    fn syntax_errors_are_one_line() {
        let err = parse_pipelines("spec: [unclosed\n  a: b")
            .expect_err("fails")
            .to_string();
        assert!(err.starts_with("not valid YAML"), "{err}");
        assert!(!err.contains('\n'));
    }
}
