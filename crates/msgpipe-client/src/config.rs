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
    pub version: u32,
    /// `<namespace>/<name>` of the MessagePipeline.
    pub pipeline: String,
    pub vhost: String,
    /// Work exchange publishers send to.
    pub exchange: String,
    pub routing_key: String,
    /// Work queue consumers read from.
    pub queue: String,
    /// Deliveries before a message is dead-lettered (1 = no retry).
    pub max_attempts: u32,
    pub retry: RetryTopology,
    pub dead_letter: DeadLetterTopology,
    pub features: Features,
}

/// Where failed messages wait before their next attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryTopology {
    /// Direct exchange; tier k is bound with routing key `k`.
    pub exchange: String,
    pub tiers: Vec<RetryTierConfig>,
}

/// One retry queue and the attempts that use it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryTierConfig {
    pub index: u32,
    pub routing_key: String,
    pub queue: String,
    pub delay_ms: u64,
    /// A failure at attempt k goes to this tier when `first_attempt <= k <= last_attempt`.
    pub first_attempt: u32,
    pub last_attempt: u32,
}

/// The dead-letter exchange and queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterTopology {
    pub exchange: String,
    pub queue: String,
}

/// Client feature flags (the seed article's `features` block).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Features {
    /// Resend messages saved in the local outbox.
    pub retry_pending: bool,
    /// Seconds between resend rounds.
    pub retry_interval_seconds: u32,
}

/// Why `pipeline.json` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid pipeline.json: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{path} has contract version {found}; this client understands version {CONFIG_VERSION}"
    )]
    UnsupportedVersion { path: PathBuf, found: u32 },
    #[error("{CONFIG_PATH_ENV} is not set")]
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
