//! An import as text: YAML with the findings as `#` comments above each pipeline (ready to
//! review and commit), or JSON.

use std::fmt::Write;

use super::{FindingKind, Import, ImportedPipeline};

/// The pipelines as a YAML stream, each preceded by comment lines saying what every field
/// came from (`-`), what the spec cannot express (`!`) and what `msgpipe apply` of it
/// would do (`>`).
pub fn import_yaml(import: &Import) -> Result<String, serde_saphyr::ser::Error> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Imported by `msgpipe import` from vhost {} (RabbitMQ {}): {} pipeline(s).",
        comment_text(&format!("{:?}", import.vhost)),
        comment_text(&import.server_version),
        import.pipelines.len()
    );
    out.push_str(
        "# Review the comments before committing: \"-\" says where a field came from, \"!\" what the\n\
         # spec cannot express or what adopting changes, \">\" what `msgpipe apply` of it would do.\n",
    );
    for finding in &import.skipped {
        let _ = writeln!(out, "# ! {}", comment_text(&finding.text));
    }
    for pipeline in &import.pipelines {
        out.push_str("---\n");
        out.push_str(&pipeline_comments(pipeline));
        out.push_str(&serde_saphyr::to_string(&pipeline.pipeline)?);
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}

/// The pipelines as a JSON array (the findings are not in it: print them separately).
pub fn import_json(import: &Import) -> Result<String, serde_json::Error> {
    let pipelines: Vec<_> = import.pipelines.iter().map(|p| &p.pipeline).collect();
    Ok(serde_json::to_string_pretty(&pipelines)? + "\n")
}

fn pipeline_comments(pipeline: &ImportedPipeline) -> String {
    let mut out = String::new();
    let mut summary = format!(
        "work queue {} ({}, {} messages, {} consumers)",
        pipeline.queue, pipeline.queue_type, pipeline.messages, pipeline.consumers
    );
    if !pipeline.retry_queues.is_empty() {
        let _ = write!(
            summary,
            "; retry queues {}",
            pipeline.retry_queues.join(", ")
        );
    }
    if let Some(dlq) = &pipeline.dead_letter_queue {
        let _ = write!(summary, "; dead-letter queue {dlq}");
    }
    let name = pipeline
        .pipeline
        .metadata
        .name
        .as_deref()
        .unwrap_or_default();
    let _ = writeln!(out, "# {name}: {}", comment_text(&summary));
    for (kind, mark) in [
        (FindingKind::Recognised, '-'),
        (FindingKind::Unexpressed, '!'),
        (FindingKind::Adoption, '>'),
    ] {
        for finding in pipeline.findings.iter().filter(|f| f.kind == kind) {
            let _ = writeln!(out, "#   {mark} {}", comment_text(&finding.text));
        }
    }
    out
}

/// `text` on one comment line: control characters (a newline in a queue name) escaped.
fn comment_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}
