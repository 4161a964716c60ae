//! `pipeline.json` kept live: a flipped feature flag (or a changed topology) takes effect
//! without a restart.
//!
//! A ConfigMap volume is updated by the kubelet with a symlink swap (`..data` points to a new
//! directory), so the watcher re-reads the *path* on every poll and compares contents; it never
//! keeps a file handle or an inode. A file that stops parsing is reported once and the last good
//! configuration stays in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{CONFIG_PATH_ENV, ConfigError, Features, PipelineConfig};

/// How often [`LiveConfig::watch`] re-reads the file by default. The kubelet itself refreshes
/// ConfigMap volumes only every minute or so, so polling faster buys little.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// The current `pipeline.json`, updated in the background. Cheap to clone; the watcher task
/// stops once every clone and every receiver taken from it is dropped.
#[derive(Clone, Debug)]
pub struct LiveConfig {
    config: watch::Receiver<Arc<PipelineConfig>>,
    features: watch::Receiver<Features>,
}

impl LiveConfig {
    /// A configuration that never changes (tests, or a client configured in code). Its
    /// receivers never wake: `changed()` on them returns an error at once.
    pub fn fixed(config: PipelineConfig) -> Self {
        let (features_tx, features) = watch::channel(config.features.clone());
        let (config_tx, config) = watch::channel(Arc::new(config));
        // Receivers keep the last value after the senders are gone.
        drop((features_tx, config_tx));
        Self { config, features }
    }

    /// Reads `path` now (failing if it is missing or invalid) and re-reads it every `poll`.
    /// Must be called inside a Tokio runtime.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), msgpipe_client::ConfigError> {
    /// use std::time::Duration;
    /// let live = msgpipe_client::LiveConfig::watch("/etc/msgpipe/pipeline.json", Duration::from_secs(5)).await?;
    /// let mut flags = live.subscribe_features();
    /// while flags.changed().await.is_ok() {
    ///     println!("retry_pending is now {}", flags.borrow().retry_pending);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn watch(path: impl AsRef<Path>, poll: Duration) -> Result<Self, ConfigError> {
        let path = path.as_ref().to_path_buf();
        let text = read(&path).await?;
        let initial = PipelineConfig::from_json(&text, &path)?;
        let (features_tx, features) = watch::channel(initial.features.clone());
        let (config_tx, config) = watch::channel(Arc::new(initial));
        let watcher = FileWatcher {
            path,
            last_text: text,
            config_tx,
            features_tx,
        };
        tokio::spawn(watcher.run(poll));
        Ok(Self { config, features })
    }

    /// [`LiveConfig::watch`] on the file named by `MSGPIPE_PIPELINE_CONFIG`.
    pub async fn watch_env(poll: Duration) -> Result<Self, ConfigError> {
        let path = std::env::var_os(CONFIG_PATH_ENV).ok_or(ConfigError::EnvMissing)?;
        Self::watch(PathBuf::from(path), poll).await
    }

    /// The configuration in force now.
    pub fn current(&self) -> Arc<PipelineConfig> {
        self.config.borrow().clone()
    }

    /// The feature flags in force now.
    pub fn features(&self) -> Features {
        self.features.borrow().clone()
    }

    /// A receiver that wakes when the flags change (and only then: topology edits do not wake it).
    pub fn subscribe_features(&self) -> watch::Receiver<Features> {
        self.features.clone()
    }

    /// A receiver that wakes on any change of the file's meaning.
    pub fn subscribe(&self) -> watch::Receiver<Arc<PipelineConfig>> {
        self.config.clone()
    }
}

struct FileWatcher {
    path: PathBuf,
    last_text: String,
    config_tx: watch::Sender<Arc<PipelineConfig>>,
    features_tx: watch::Sender<Features>,
}

impl FileWatcher {
    async fn run(mut self, poll: Duration) {
        let mut ticks = tokio::time::interval(poll.max(Duration::from_millis(10)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await; // the first tick is immediate; the file was just read
        loop {
            tokio::select! {
                _ = ticks.tick() => self.poll_once().await,
                () = all_closed(&self.config_tx, &self.features_tx) => return,
            }
        }
    }

    async fn poll_once(&mut self) {
        let text = match read(&self.path).await {
            Ok(text) => text,
            Err(error) => {
                // Mid-swap the path can be briefly missing; the next poll sees the new file.
                tracing::debug!(%error, "pipeline.json not readable this time");
                return;
            }
        };
        if text == self.last_text {
            return;
        }
        match PipelineConfig::from_json(&text, &self.path) {
            Ok(config) => {
                let features = config.features.clone();
                self.features_tx.send_if_modified(|current| {
                    let changed = *current != features;
                    if changed {
                        tracing::info!(
                            retry_pending = features.retry_pending,
                            retry_interval_seconds = features.retry_interval_seconds,
                            "pipeline.json features changed"
                        );
                        *current = features;
                    }
                    changed
                });
                self.config_tx.send_if_modified(|current| {
                    let changed = **current != config;
                    if changed {
                        *current = Arc::new(config);
                    }
                    changed
                });
            }
            Err(error) => {
                tracing::warn!(%error, "ignoring the new pipeline.json; keeping the last good one");
            }
        }
        self.last_text = text;
    }
}

async fn read(path: &Path) -> Result<String, ConfigError> {
    tokio::fs::read_to_string(path)
        .await
        .map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })
}

async fn all_closed<A, B>(a: &watch::Sender<A>, b: &watch::Sender<B>) {
    tokio::join!(a.closed(), b.closed());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(retry_pending: bool) -> String {
        serde_json::json!({
            "version": 1, "pipeline": "notes-app/notes", "vhost": "/",
            "exchange": "notes", "routing_key": "notes", "queue": "notes_queue",
            "max_attempts": 5,
            "retry": {"exchange": "notes_queue.retry", "tiers": []},
            "dead_letter": {"exchange": "notes_dlq_exchange", "queue": "notes_queue_dlq"},
            "features": {"retry_pending": retry_pending, "retry_interval_seconds": 7},
        })
        .to_string()
    }

    /// Writes the file the way the kubelet does: a new directory, then `..data` swapped to it.
    fn kubelet_write(dir: &Path, generation: u32, text: &str) {
        let target = dir.join(format!("..gen_{generation}"));
        std::fs::create_dir(&target).expect("mkdir");
        std::fs::write(target.join("pipeline.json"), text).expect("write");
        let tmp = dir.join("..data_tmp");
        std::os::unix::fs::symlink(&target, &tmp).expect("symlink");
        std::fs::rename(&tmp, dir.join("..data")).expect("swap");
    }

    #[tokio::test]
    async fn a_flag_flipped_by_a_symlink_swap_is_seen_and_bad_files_are_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        kubelet_write(dir.path(), 1, &json(true));
        let path = dir.path().join("pipeline.json");
        std::os::unix::fs::symlink("..data/pipeline.json", &path).expect("symlink");

        let live = LiveConfig::watch(&path, Duration::from_millis(20))
            .await
            .expect("watch");
        assert!(live.features().retry_pending);
        let mut flags = live.subscribe_features();

        kubelet_write(dir.path(), 2, &json(false));
        tokio::time::timeout(Duration::from_secs(5), flags.changed())
            .await
            .expect("change seen in time")
            .expect("watcher alive");
        assert!(!live.features().retry_pending);
        assert_eq!(live.current().features.retry_interval_seconds, 7);

        kubelet_write(dir.path(), 3, "{ not json");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!live.features().retry_pending, "last good config kept");
    }

    #[tokio::test]
    async fn a_missing_or_invalid_file_fails_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = LiveConfig::watch(dir.path().join("nope.json"), DEFAULT_POLL_INTERVAL).await;
        assert!(matches!(missing, Err(ConfigError::Read { .. })));
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{}").expect("write");
        let invalid = LiveConfig::watch(&bad, DEFAULT_POLL_INTERVAL).await;
        assert!(matches!(invalid, Err(ConfigError::Parse { .. })));
    }
}
