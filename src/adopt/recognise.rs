//! Which queue of a vhost is what: work queues, their retry tiers, their dead-letter queues.
//! Roles come from arguments and policies (where each queue dead-letters to, after how
//! long), never from names.

use std::collections::{BTreeMap, BTreeSet};

use super::pipeline::PipelineBuilder;
use super::{Finding, Import, ImportOptions};
use crate::broker::inventory::{QueueSettings, VhostInventory};
use crate::broker::live::LiveVhost;

/// A TTL queue that dead-letters back to one work queue: a retry tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct LegacyTier {
    pub queue: String,
    /// Its message TTL, in milliseconds.
    pub delay: u64,
    /// The exchange it dead-letters through (`""`: the default exchange, by queue name).
    pub via: String,
}

/// The roles of every queue of one vhost.
pub(super) struct Recognition<'a> {
    pub inventory: &'a VhostInventory,
    pub settings: BTreeMap<&'a str, QueueSettings>,
    /// Work queue -> its retry tiers, shortest delay first.
    pub tiers: BTreeMap<String, Vec<LegacyTier>>,
    /// Every queue taken as a retry tier.
    tier_queues: BTreeSet<String>,
    /// Dead-letter queue -> the queues that dead-letter into it.
    pub dead_letter_of: BTreeMap<String, Vec<String>>,
    /// Why each queue that cannot be a work queue is left out.
    pub skipped: BTreeMap<String, String>,
    /// The reconciler's view of the same read, to diff each pipeline against.
    pub live: LiveVhost,
}

impl<'a> Recognition<'a> {
    pub fn new(inventory: &'a VhostInventory) -> Self {
        let settings = inventory
            .queues
            .keys()
            .filter_map(|name| Some((name.as_str(), inventory.settings(name)?)))
            .collect();
        let mut recognition = Self {
            inventory,
            settings,
            tiers: BTreeMap::new(),
            tier_queues: BTreeSet::new(),
            dead_letter_of: BTreeMap::new(),
            skipped: BTreeMap::new(),
            live: inventory.to_live(),
        };
        recognition.skip_unmanageable();
        recognition.find_tiers();
        recognition.find_dead_letter_queues();
        recognition
    }

    /// Queues msgpipe could never declare as a work queue: owned by a connection,
    /// auto-deleted, transient, streams, or in the reserved `amq.` namespace.
    fn skip_unmanageable(&mut self) {
        for (name, queue) in &self.inventory.queues {
            let reason = if name.starts_with("amq.") {
                "its name is in RabbitMQ's reserved amq. namespace"
            } else if queue.exclusive {
                "exclusive: it belongs to the connection that declared it"
            } else if queue.auto_delete {
                "auto-delete: it goes away with its last consumer"
            } else if !queue.durable {
                "transient (not durable); msgpipe declares durable queues only"
            } else if !matches!(queue.queue_type.as_str(), "quorum" | "classic") {
                "a stream (or another type msgpipe does not manage)"
            } else {
                continue;
            };
            self.skipped.insert(name.clone(), reason.to_string());
        }
    }

    fn eligible(&self, queue: &str) -> bool {
        self.inventory.queues.contains_key(queue) && !self.skipped.contains_key(queue)
    }

    /// The queue (exactly one, not `queue` itself) that `queue`'s dead letters reach.
    fn single_dead_letter_target(&self, queue: &str) -> Option<(String, String)> {
        let settings = self.settings.get(queue)?;
        let exchange = settings.str("dead-letter-exchange")?;
        let key = settings.str("dead-letter-routing-key");
        let targets = self.inventory.route(exchange, key)?;
        match targets.as_slice() {
            [one] if one != queue => Some((one.clone(), exchange.to_string())),
            _ => None,
        }
    }

    /// TTL queues without consumers (nobody consumes a delay queue) that dead-letter back to
    /// one work queue: through the default exchange by its name (what msgpipe's own tiers
    /// do), or through an exchange routing to it alone when that queue dead-letters elsewhere
    /// itself (so it is a work queue, not a DLQ).
    fn find_tiers(&mut self) {
        let mut found: Vec<(String, LegacyTier)> = Vec::new();
        for (name, queue) in &self.inventory.queues {
            if !self.eligible(name) || queue.consumers > 0 {
                continue;
            }
            let Some(delay) = self
                .settings
                .get(name.as_str())
                .and_then(|s| s.int("message-ttl"))
            else {
                continue;
            };
            let Some((target, via)) = self.single_dead_letter_target(name) else {
                continue;
            };
            let target_dead_letters = self
                .settings
                .get(target.as_str())
                .is_some_and(|s| s.str("dead-letter-exchange").is_some());
            if !self.eligible(&target) || (!via.is_empty() && !target_dead_letters) {
                continue;
            }
            let tier = LegacyTier {
                queue: name.clone(),
                delay: u64::try_from(delay).unwrap_or(0),
                via,
            };
            found.push((target, tier));
        }
        let tier_names: BTreeSet<String> = found.iter().map(|(_, t)| t.queue.clone()).collect();
        for (target, tier) in found {
            if tier_names.contains(&target) {
                self.skipped.insert(
                    tier.queue.clone(),
                    format!("a TTL queue that dead-letters into another TTL queue ({target}); msgpipe's tiers return to the work queue directly"),
                );
                continue;
            }
            self.tier_queues.insert(tier.queue.clone());
            self.tiers.entry(target).or_default().push(tier);
        }
        for tiers in self.tiers.values_mut() {
            tiers.sort_by(|a, b| (a.delay, &a.queue).cmp(&(b.delay, &b.queue)));
        }
    }

    pub fn is_tier(&self, queue: &str) -> bool {
        self.tier_queues.contains(queue)
    }

    /// Every queue the dead letters of `queue` can reach (for an exchange whose routing
    /// cannot be resolved here, every queue bound to it).
    pub fn dead_letter_targets(&self, queue: &str) -> Vec<String> {
        let Some(settings) = self.settings.get(queue) else {
            return Vec::new();
        };
        let Some(exchange) = settings.str("dead-letter-exchange") else {
            return Vec::new();
        };
        let key = settings.str("dead-letter-routing-key");
        let mut targets = self.inventory.route(exchange, key).unwrap_or_else(|| {
            self.inventory
                .bindings
                .iter()
                .filter(|b| b.source == exchange)
                .map(|b| b.destination.clone())
                .collect()
        });
        targets.retain(|t| t != queue && self.inventory.queues.contains_key(t));
        targets.sort();
        targets.dedup();
        targets
    }

    fn find_dead_letter_queues(&mut self) {
        let mut found: Vec<(String, String)> = Vec::new();
        for name in self.inventory.queues.keys() {
            if !self.eligible(name) || self.is_tier(name) {
                continue;
            }
            for target in self.dead_letter_targets(name) {
                found.push((target, name.clone()));
            }
        }
        for (target, source) in found {
            self.dead_letter_of.entry(target).or_default().push(source);
        }
    }

    /// Work queues: manageable queues that are neither a retry tier nor a dead-letter queue.
    pub fn work_queues(&self) -> Vec<&'a str> {
        self.inventory
            .queues
            .keys()
            .map(String::as_str)
            .filter(|name| {
                self.eligible(name)
                    && !self.is_tier(name)
                    && !self.dead_letter_of.contains_key(*name)
            })
            .collect()
    }

    /// The whole import: one pipeline per selected work queue.
    pub fn import(&self, options: &ImportOptions) -> Import {
        let mut names = MetadataNames::default();
        let mut claimed = ClaimedDeadLetters::default();
        let mut pipelines = Vec::new();
        let mut skipped: Vec<Finding> = self
            .skipped
            .iter()
            .map(|(queue, why)| Finding::unexpressed(format!("queue {queue} skipped: {why}")))
            .collect();
        for queue in self.work_queues() {
            if options
                .queue_filter
                .as_ref()
                .is_some_and(|filter| !filter.is_match(queue))
            {
                continue;
            }
            let metadata_name = names.take(queue);
            let builder = PipelineBuilder::new(self, queue, metadata_name, options);
            match builder.build(&mut claimed) {
                Ok(pipeline) => pipelines.push(pipeline),
                Err(why) => skipped.push(Finding::unexpressed(format!(
                    "queue {queue} skipped: {why}"
                ))),
            }
        }
        Import {
            vhost: self.inventory.vhost.clone(),
            server_version: self.inventory.server_version.clone(),
            pipelines,
            skipped,
        }
    }
}

/// Dead-letter exchanges and queues already given to a pipeline of this import: two
/// pipelines may not share them (msgpipe refuses two pipelines claiming one queue, and two
/// pipelines binding their DLQs to one fanout exchange would each get the other's dead letters).
#[derive(Default)]
pub(super) struct ClaimedDeadLetters {
    pub by_name: BTreeMap<String, String>,
}

impl ClaimedDeadLetters {
    /// Claims `name` for `queue`'s pipeline; the work queue that had it first otherwise.
    pub fn claim(&mut self, name: &str, queue: &str) -> Result<(), String> {
        match self.by_name.get(name) {
            Some(owner) if owner != queue => Err(owner.clone()),
            _ => {
                self.by_name.insert(name.into(), queue.into());
                Ok(())
            }
        }
    }
}

/// `metadata.name`s handed out so far, so two queues never get the same one.
#[derive(Default)]
struct MetadataNames {
    used: BTreeSet<String>,
}

impl MetadataNames {
    /// A Kubernetes name (lowercase alphanumerics and `-`, at most 63 characters: it is a
    /// label value too) for `queue`, unique in this import.
    fn take(&mut self, queue: &str) -> String {
        let base = kubernetes_name(queue);
        let mut name = base.clone();
        let mut n = 2;
        while self.used.contains(&name) {
            let suffix = format!("-{n}");
            let stem: String = base.chars().take(63 - suffix.len()).collect();
            name = format!("{}{suffix}", stem.trim_end_matches('-'));
            n += 1;
        }
        self.used.insert(name.clone());
        name
    }
}

/// `queue` as a DNS-1123 label: lowercase, runs of other characters as one `-`, trimmed.
pub(super) fn kubernetes_name(queue: &str) -> String {
    let mut name = String::new();
    for c in queue.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            name.push(c);
        } else if !name.ends_with('-') {
            name.push('-');
        }
    }
    let name: String = name.trim_matches('-').chars().take(63).collect();
    let name = name.trim_end_matches('-').to_string();
    if name.is_empty() {
        "queue".into()
    } else {
        name
    }
}
