//! The `pipeline.json` contract between the operator and its clients.
//!
//! Unknown fields are ignored so that a client keeps working when a newer operator adds some.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Key of the file in the `<pipeline>-client` ConfigMap.
pub const CONFIG_FILE_NAME: &str = "pipeline.json";
/// Environment variable holding the path of `pipeline.json`.
pub const CONFIG_PATH_ENV: &str = "MSGPIPE_PIPELINE_CONFIG";
/// Version of this contract; bumped only on incompatible changes.
pub const CONFIG_VERSION: u32 = 1;

/// Everything a client needs to publish to, consume from and retry on a pipeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineConfig {
    /// Contract version ([`CONFIG_VERSION`]).
    pub version: u32,
    /// `<namespace>/<name>` of the MessagePipeline.
    pub pipeline: String,
    /// RabbitMQ virtual host of every object below.
    pub vhost: String,
    /// Work exchange publishers send to.
    pub exchange: String,
    /// Routing key publishers use on [`PipelineConfig::exchange`].
    pub routing_key: String,
    /// Work queue consumers read from.
    pub queue: String,
    /// Deliveries before a message is dead-lettered (1 = no retry).
    pub max_attempts: u32,
    /// The retry exchange and its tiers.
    pub retry: RetryTopology,
    /// Where messages go once they will not be retried.
    pub dead_letter: DeadLetterTopology,
    /// Client feature flags.
    pub features: Features,
}

/// Where failed messages wait before their next attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryTopology {
    /// Direct exchange; tier k is bound with routing key `k`.
    pub exchange: String,
    /// One entry per retry queue, in tier order.
    pub tiers: Vec<RetryTierConfig>,
}

/// One retry queue and the attempts that use it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryTierConfig {
    /// 1-based tier number (the `k` of `<queue>.retry.k`).
    pub index: u32,
    /// Routing key binding the tier queue to the retry exchange.
    pub routing_key: String,
    /// The tier's queue.
    pub queue: String,
    /// How long a message waits in this tier (the queue's message TTL), in milliseconds.
    pub delay_ms: u64,
    /// A failure at attempt k goes to this tier when `first_attempt <= k <= last_attempt`.
    pub first_attempt: u32,
    /// Last failed attempt that uses this tier (see `first_attempt`).
    pub last_attempt: u32,
}

/// The dead-letter exchange and queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterTopology {
    /// Exchange dead letters are published to (it routes everything to the DLQ).
    pub exchange: String,
    /// The dead-letter queue.
    pub queue: String,
}

/// Client feature flags (the seed article's `features` block).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Features {
    /// Resend messages saved in the local outbox. Off parks the outbox: its messages stay on
    /// disk unsent, and fresh publishes go straight to the broker (see [`crate::publisher`]).
    pub retry_pending: bool,
    /// Seconds between resend rounds while messages remain in the outbox (the first round
    /// runs as soon as the broker is reachable).
    pub retry_interval_seconds: u32,
}

/// Why `pipeline.json` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    /// The file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    #[error("{path} is not a valid pipeline.json: {source}")]
    /// The file is not valid JSON for this contract.
    Parse {
        /// The file.
        path: PathBuf,
        /// What the JSON parser said.
        source: serde_json::Error,
    },
    #[error(
        "{path} has contract version {found}; this client understands version {CONFIG_VERSION}"
    )]
    /// The file is for another contract version.
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    #[error("{CONFIG_PATH_ENV} is not set")]
    /// [`CONFIG_PATH_ENV`] is not set.
    EnvMissing,
}

impl PipelineConfig {
    /// Reads and checks a `pipeline.json` file.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Reads the file named by `MSGPIPE_PIPELINE_CONFIG`.
    pub fn from_env() -> Result<Self, ConfigError> {
        let path = std::env::var_os(CONFIG_PATH_ENV).ok_or(ConfigError::EnvMissing)?;
        Self::from_path(PathBuf::from(path))
    }

    /// Parses `pipeline.json` text; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_str(text).map_err(|source| ConfigError::Parse {
            path: origin.to_owned(),
            source,
        })?;
        if config.version != CONFIG_VERSION {
            return Err(ConfigError::UnsupportedVersion {
                path: origin.to_owned(),
                found: config.version,
            });
        }
        Ok(config)
    }

    /// The retry tier for a failure at `attempt` (1-based), or None when the message has
    /// used all its attempts and must be dead-lettered.
    pub fn tier_for_attempt(&self, attempt: u32) -> Option<&RetryTierConfig> {
        if attempt >= self.max_attempts {
            return None;
        }
        self.retry
            .tiers
            .iter()
            .find(|tier| (tier.first_attempt..=tier.last_attempt).contains(&attempt))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The notes pipeline of the seed article: 5 attempts, tiers 1 s/2 s/4 s/8 s.
    pub(crate) fn notes() -> PipelineConfig {
        let tiers = (1..=4)
            .map(|index: u32| RetryTierConfig {
                index,
                routing_key: index.to_string(),
                queue: format!("notes_queue.retry.{index}"),
                delay_ms: 1_000 << (index - 1),
                first_attempt: index,
                last_attempt: index,
            })
            .collect();
        PipelineConfig {
            version: CONFIG_VERSION,
            pipeline: "notes-app/notes".into(),
            vhost: "/".into(),
            exchange: "notes".into(),
            routing_key: "notes".into(),
            queue: "notes_queue".into(),
            max_attempts: 5,
            retry: RetryTopology {
                exchange: "notes_queue.retry".into(),
                tiers,
            },
            dead_letter: DeadLetterTopology {
                exchange: "notes_dlq_exchange".into(),
                queue: "notes_queue_dlq".into(),
            },
            features: Features {
                retry_pending: true,
                retry_interval_seconds: 120,
            },
        }
    }

    #[test]
    fn a_failure_before_the_last_attempt_names_its_tier() {
        let config = notes();
        assert_eq!(config.tier_for_attempt(1).map(|t| t.index), Some(1));
        assert_eq!(config.tier_for_attempt(4).map(|t| t.index), Some(4));
        assert_eq!(config.tier_for_attempt(5), None);
    }
}
