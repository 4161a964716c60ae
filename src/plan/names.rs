//! The RabbitMQ names of one pipeline, with defaults applied and collisions refused.

use serde::Serialize;

use super::tiers::RetryTier;
use crate::api::validate::{FieldError, InvalidSpec, rabbit_name_problem};
use crate::api::{MessagePipeline, RABBIT_NAME_MAX_BYTES};

/// Every broker name a pipeline uses (retry queue names come from [`Self::retry_queue`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineNames {
    pub queue: String,
    pub work_exchange: String,
    pub routing_key: String,
    pub retry_exchange: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
}

impl PipelineNames {
    /// Applies the defaults of SPEC §1 and refuses names that are too long, reserved or shared
    /// by two objects of the same kind. `tiers` are the pipeline's retry tiers.
    pub fn resolve(pipeline: &MessagePipeline, tiers: &[RetryTier]) -> Result<Self, InvalidSpec> {
        let spec = &pipeline.spec;
        let (queue, queue_path) = match &spec.queue.name {
            Some(name) => (name.clone(), "spec.queue.name"),
            None => (
                pipeline.metadata.name.clone().unwrap_or_default(),
                "metadata.name",
            ),
        };
        let names = Self {
            work_exchange: spec
                .queue
                .exchange
                .clone()
                .unwrap_or_else(|| format!("{queue}.work")),
            routing_key: spec
                .queue
                .routing_key
                .clone()
                .unwrap_or_else(|| queue.clone()),
            retry_exchange: format!("{queue}.retry"),
            dead_letter_exchange: spec
                .dead_letter
                .exchange
                .clone()
                .unwrap_or_else(|| format!("{queue}.dlx")),
            dead_letter_queue: spec
                .dead_letter
                .queue
                .clone()
                .unwrap_or_else(|| format!("{queue}.dlq")),
            queue,
        };
        names.check(pipeline, queue_path, tiers)?;
        Ok(names)
    }

    /// `<queue>.retry.<index>.<delay>`, e.g. `notes_queue.retry.1.1s`: the delay is part of
    /// the name because a tier's settings are fixed when it is declared (see
    /// [`crate::plan::topology::Queue`]).
    pub fn retry_queue(&self, tier: &RetryTier) -> String {
        format!("{}.retry.{}.{}", self.queue, tier.index, tier.delay)
    }

    fn check(
        &self,
        pipeline: &MessagePipeline,
        queue_path: &str,
        tiers: &[RetryTier],
    ) -> Result<(), InvalidSpec> {
        let spec = &pipeline.spec;
        // Where each name came from: the user's field if set, else the field it derives from.
        let origin = |set: bool, own: &'static str| if set { own } else { queue_path };
        let exchanges = [
            (
                &self.work_exchange,
                origin(spec.queue.exchange.is_some(), "spec.queue.exchange"),
            ),
            (&self.retry_exchange, queue_path),
            (
                &self.dead_letter_exchange,
                origin(
                    spec.dead_letter.exchange.is_some(),
                    "spec.deadLetter.exchange",
                ),
            ),
        ];
        let mut queues = vec![
            (&self.queue, queue_path),
            (
                &self.dead_letter_queue,
                origin(spec.dead_letter.queue.is_some(), "spec.deadLetter.queue"),
            ),
        ];
        let retry_queues: Vec<String> = tiers.iter().map(|t| self.retry_queue(t)).collect();
        queues.extend(retry_queues.iter().map(|name| (name, queue_path)));

        let mut errors = Vec::new();
        if let Some(problem) = rabbit_name_problem(&self.queue) {
            errors.push(FieldError::new(queue_path, problem));
        }
        for (name, path) in exchanges.iter().chain(queues.iter()) {
            if name.len() > RABBIT_NAME_MAX_BYTES && !errors.iter().any(|e| e.path == *path) {
                errors.push(FieldError::new(
                    *path,
                    format!(
                        "derived name {:?} is {} bytes; RabbitMQ names are at most {RABBIT_NAME_MAX_BYTES} (shorten the name)",
                        abbreviate(name),
                        name.len()
                    ),
                ));
            }
        }
        duplicates(&exchanges, "exchange", &mut errors);
        duplicates(&queues, "queue", &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(InvalidSpec { errors })
        }
    }
}

/// Reports the second of two objects of one kind that share a name.
fn duplicates(named: &[(&String, &str)], kind: &str, errors: &mut Vec<FieldError>) {
    for (i, (name, path)) in named.iter().enumerate() {
        if let Some((_, first_path)) = named[..i].iter().find(|(other, _)| other == name) {
            errors.push(FieldError::new(
                *path,
                format!("{kind} name {name:?} is already used by {first_path}; each {kind} of a pipeline needs its own name"),
            ));
        }
    }
}

/// First and last characters of a long name, enough to tell which derived name it is.
fn abbreviate(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    if chars.len() <= 40 {
        return name.to_string();
    }
    let head: String = chars[..16].iter().collect();
    let tail: String = chars[chars.len() - 16..].iter().collect();
    format!("{head}...{tail}")
}
