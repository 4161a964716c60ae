//! The `<name>-client` ConfigMap holding `pipeline.json` (SPEC §3, the client contract).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use msgpipe_client::config::{
    CONFIG_FILE_NAME, CONFIG_VERSION, DeadLetterTopology, Features, PipelineConfig,
    RetryTierConfig, RetryTopology,
};

use super::names::PipelineNames;
use super::tiers::RetryTier;
use super::{PipelineRef, managed_labels};
use crate::api::MessagePipelineSpec;

/// The `pipeline.json` a client of this pipeline reads.
pub fn pipeline_config(
    pipeline: &PipelineRef,
    spec: &MessagePipelineSpec,
    vhost: &str,
    names: &PipelineNames,
    tiers: &[RetryTier],
) -> PipelineConfig {
    PipelineConfig {
        version: CONFIG_VERSION,
        pipeline: pipeline.to_string(),
        vhost: vhost.into(),
        exchange: names.work_exchange.clone(),
        routing_key: names.routing_key.clone(),
        queue: names.queue.clone(),
        max_attempts: spec.retry.max_attempts,
        retry: RetryTopology {
            exchange: names.retry_exchange.clone(),
            tiers: tiers
                .iter()
                .map(|tier| RetryTierConfig {
                    index: tier.index,
                    routing_key: tier.routing_key(),
                    queue: names.retry_queue(tier),
                    delay_ms: tier.delay.as_millis(),
                    first_attempt: tier.first_attempt,
                    last_attempt: tier.last_attempt,
                })
                .collect(),
        },
        dead_letter: DeadLetterTopology {
            exchange: names.dead_letter_exchange.clone(),
            queue: names.dead_letter_queue.clone(),
        },
        features: Features {
            retry_pending: spec.client_flags.retry_pending,
            retry_interval_seconds: spec.client_flags.retry_interval_seconds,
        },
    }
}

/// The ConfigMap `<name>-client` with key `pipeline.json`.
pub fn client_config_map(
    pipeline: &PipelineRef,
    config: &PipelineConfig,
) -> Result<ConfigMap, serde_json::Error> {
    let json = serde_json::to_string_pretty(config)?;
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(format!("{}-client", pipeline.name)),
            namespace: Some(pipeline.namespace.clone()),
            labels: Some(managed_labels(pipeline)),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            CONFIG_FILE_NAME.to_string(),
            json + "\n",
        )])),
        ..ConfigMap::default()
    })
}
