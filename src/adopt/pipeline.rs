//! The spec of one recognised work queue, field by field, with what each came from and what
//! it cannot say.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::backoff::fit;
use super::recognise::{ClaimedDeadLetters, LegacyTier, Recognition};
use super::{Finding, ImportOptions, ImportedPipeline};
use crate::api::{
    AlertsSpec, BackoffSpec, BrokerRef, BrokerSpec, DeadLetterSpec, Duration, MAX_ATTEMPTS_LIMIT,
    ManagementPolicy, MessagePipeline, MessagePipelineSpec, QueueSpec, QueueType, RetrySpec,
    SecretRef,
};
use crate::broker::diff::{BrokerAction, converge, policy_definition};
use crate::broker::inventory::{InventoryBinding, QueueSettings, Setting, SettingSource};
use crate::broker::live::LivePolicy;
use crate::plan::ownership::{ADOPTED_ANNOTATION, Adopted};
use crate::plan::topology::{POLICY_PREFIX, POLICY_PRIORITY, QueueRole};
use crate::plan::{self, DesiredState};

/// Settings each role of queue has a spec field (or a fixed msgpipe value) for.
const WORK_KEYS: [&str; 7] = [
    "queue-type",
    "dead-letter-exchange",
    "dead-letter-routing-key",
    "max-length",
    "overflow",
    "delivery-limit",
    "dead-letter-strategy",
];
const TIER_KEYS: [&str; 7] = [
    "queue-type",
    "message-ttl",
    "dead-letter-exchange",
    "dead-letter-routing-key",
    "overflow",
    "delivery-limit",
    "dead-letter-strategy",
];
const DLQ_KEYS: [&str; 6] = [
    "queue-type",
    "message-ttl",
    "max-length",
    "overflow",
    "delivery-limit",
    "dead-letter-strategy",
];

/// RabbitMQ 4's delivery limit for a quorum queue that sets none.
const RABBITMQ4_DEFAULT_DELIVERY_LIMIT: u32 = 20;

/// Builds one pipeline and its findings.
pub(super) struct PipelineBuilder<'r, 'a> {
    rec: &'r Recognition<'a>,
    queue: &'a str,
    metadata_name: String,
    options: &'r ImportOptions,
    findings: Vec<Finding>,
}

/// A queue once msgpipe's policy for it is applied.
struct AfterAdoption {
    /// msgpipe's policy for the queue, and its definition as sent to this server.
    policy: String,
    definition: Map<String, Value>,
    /// The settings then in effect.
    settings: QueueSettings,
}

/// The dead-letter side as recognised.
struct DeadLetters {
    spec: DeadLetterSpec,
    /// The live queue taken as the DLQ.
    queue: Option<String>,
}

impl<'r, 'a> PipelineBuilder<'r, 'a> {
    pub fn new(
        rec: &'r Recognition<'a>,
        queue: &'a str,
        metadata_name: String,
        options: &'r ImportOptions,
    ) -> Self {
        Self {
            rec,
            queue,
            metadata_name,
            options,
            findings: Vec::new(),
        }
    }

    fn settings(&self, queue: &str) -> QueueSettings {
        self.rec.settings.get(queue).cloned().unwrap_or_default()
    }

    fn note(&mut self, text: String) {
        self.findings.push(Finding::recognised(text));
    }

    fn warn(&mut self, text: String) {
        self.findings.push(Finding::unexpressed(text));
    }

    /// The pipeline, or why the queue cannot have one (the spec it would get is invalid).
    pub fn build(mut self, claimed: &mut ClaimedDeadLetters) -> Result<ImportedPipeline, String> {
        let queue = self.queue;
        let live = self
            .rec
            .inventory
            .queues
            .get(queue)
            .ok_or("it is gone from the queue list")?;
        let queue_type = if live.queue_type == "quorum" {
            QueueType::Quorum
        } else {
            QueueType::Classic
        };
        let work = self.settings(queue);
        let (exchange, routing_key) = self.work_route();
        let max_length = positive(&work, "max-length");
        if let Some(limit) = max_length {
            self.note(format!(
                "queue.maxLength {limit}: max-length of {queue} ({})",
                source(&work, "max-length")
            ));
        }
        self.report_dead_letter_routing_key(&work);
        let dead_letters = self.dead_letters(queue_type, claimed);
        let tiers = self.distinct_tiers();
        let max_attempts = self.max_attempts(&work, queue_type, tiers.len());
        let retry = RetrySpec {
            max_attempts,
            backoff: self.backoff(&tiers, max_attempts),
        };
        self.unmodelled(queue, "work queue", &WORK_KEYS);
        for tier in &tiers {
            self.unmodelled(&tier.queue, "retry queue", &TIER_KEYS);
        }
        self.policy_reach(queue);
        if let Some(dlq) = &dead_letters.queue {
            self.policy_reach(dlq);
        }
        let queue_spec = QueueSpec {
            name: Some(queue.to_string()),
            queue_type,
            exchange,
            routing_key,
            max_length,
        };
        let spec = self.spec(queue_spec, retry, dead_letters.spec.clone());
        let mut pipeline = MessagePipeline::new(&self.metadata_name, spec);
        pipeline.metadata.namespace = Some(self.options.namespace.clone());
        let mut state = plan::plan(&pipeline, Some(&self.rec.inventory.vhost))
            .map_err(|e| format!("the spec it would get is invalid: {e}"))?;
        state.adopted = self.adopted(&state, &tiers);
        if !state.adopted.is_empty() {
            pipeline.metadata.annotations =
                Some([(ADOPTED_ANNOTATION.to_string(), state.adopted.annotation())].into());
        }
        self.tier_names(&state, &tiers);
        self.adoption_changes(&state, queue);
        if let Some(dlq) = &dead_letters.queue {
            self.adoption_changes(&state, dlq);
        }
        self.adoption_plan(&state);
        Ok(ImportedPipeline {
            queue: queue.to_string(),
            pipeline,
            retry_queues: tiers.iter().map(|t| t.queue.clone()).collect(),
            dead_letter_queue: dead_letters.queue,
            queue_type: live.queue_type.clone(),
            messages: live.messages,
            consumers: live.consumers,
            findings: self.findings,
        })
    }

    /// The whole spec around the recognised fields: this import's broker Secret and vhost,
    /// alerts on only if asked, msgpipe's defaults for the rest.
    fn spec(
        &self,
        queue: QueueSpec,
        retry: RetrySpec,
        dead_letter: DeadLetterSpec,
    ) -> MessagePipelineSpec {
        MessagePipelineSpec {
            broker: BrokerSpec {
                secret_ref: match &self.options.broker_ref {
                    Some(_) => None,
                    None => Some(SecretRef {
                        name: self.options.secret_ref.clone(),
                    }),
                },
                broker_ref: self
                    .options
                    .broker_ref
                    .clone()
                    .map(|name| BrokerRef { name }),
                vhost: Some(self.rec.inventory.vhost.clone()),
            },
            queue,
            retry,
            dead_letter,
            alerts: AlertsSpec {
                enabled: self.options.alerts,
                ..AlertsSpec::default()
            },
            client_flags: Default::default(),
            deletion_policy: Default::default(),
            // Read and report first; switching to Full takes the vhost over.
            management_policy: ManagementPolicy::Observe,
        }
    }

    /// The work exchange and routing key: the queue's one binding from a durable direct
    /// exchange msgpipe may name; every other binding is reported.
    fn work_route(&mut self) -> (Option<String>, Option<String>) {
        let queue = self.queue;
        let retry_exchange = format!("{queue}.retry");
        let bindings: Vec<&'a InventoryBinding> = self
            .rec
            .inventory
            .bindings
            .iter()
            .filter(|b| b.destination == queue && b.source != retry_exchange)
            .collect();
        if bindings.is_empty() {
            self.note(format!(
                "no exchange is bound to {queue}: publishers reach it through the default exchange (by queue name), which keeps working; msgpipe adds the work exchange {queue}.work (direct)"
            ));
            return (None, None);
        }
        let chosen = self.chosen_route(&bindings);
        let sources: BTreeSet<&str> = bindings.iter().map(|b| b.source.as_str()).collect();
        if sources.len() > 1 {
            self.warn(format!(
                "{queue} is bound to several exchanges ({}): a pipeline has one work exchange{}",
                sources.into_iter().collect::<Vec<_>>().join(", "),
                chosen.map_or_else(String::new, |b| format!("; the spec takes {}", b.source))
            ));
        }
        for binding in &bindings {
            if !chosen.is_some_and(|c| std::ptr::eq(c, *binding)) {
                self.report_other_binding(binding, chosen);
            }
        }
        let Some(chosen) = chosen else {
            self.warn(format!(
                "no binding of {queue} comes from a durable direct exchange msgpipe may name: the spec keeps the default work exchange {queue}.work"
            ));
            return (None, None);
        };
        let which = if bindings.len() == 1 {
            "the only"
        } else {
            "the chosen"
        };
        self.note(format!(
            "queue.exchange {} and queue.routingKey {:?}: {which} binding of {queue}",
            chosen.source, chosen.routing_key,
        ));
        (
            Some(chosen.source.clone()),
            Some(chosen.routing_key.clone()),
        )
    }

    /// Of the queue's bindings from durable direct exchanges msgpipe may name, the one to
    /// adopt: msgpipe's own, then from `<queue>.work`, then keyed by the queue's name.
    fn chosen_route(&self, bindings: &[&'a InventoryBinding]) -> Option<&'a InventoryBinding> {
        let inventory = self.rec.inventory;
        let default_exchange = format!("{}.work", self.queue);
        let usable = |b: &&InventoryBinding| {
            inventory
                .exchanges
                .get(&b.source)
                .is_some_and(|e| e.kind == "direct" && e.durable && !e.internal)
                && !b.source.starts_with("amq.")
                && b.foreign_arguments().next().is_none()
        };
        bindings.iter().copied().filter(usable).min_by_key(|b| {
            (
                !b.is_msgpipes(),
                b.source != default_exchange,
                b.routing_key != self.queue,
                b.source.clone(),
                b.routing_key.clone(),
            )
        })
    }

    /// A binding into the work queue that the spec does not take, and why.
    fn report_other_binding(
        &mut self,
        binding: &InventoryBinding,
        chosen: Option<&InventoryBinding>,
    ) {
        let kind = self
            .rec
            .inventory
            .exchanges
            .get(&binding.source)
            .map_or("unknown", |e| e.kind.as_str())
            .to_string();
        let why = match kind.as_str() {
            "direct" if binding.source.starts_with("amq.") => {
                "msgpipe cannot name an amq. exchange".to_string()
            }
            "direct" if binding.foreign_arguments().next().is_some() => {
                "it carries binding arguments msgpipe does not model".to_string()
            }
            "direct" => "a pipeline has one route into its queue".to_string(),
            other => format!("msgpipe's work exchange is direct, this one is {other}"),
        };
        // A route from the spec's own exchange is taken for one of msgpipe's (adoption_plan
        // reports the unbind); any other stays.
        let fate = if chosen.is_some_and(|c| c.source == binding.source) {
            "msgpipe apply would remove it (it comes from the spec's work exchange)"
        } else {
            "the binding itself stays on the broker"
        };
        self.warn(format!(
            "binding {} ({kind}) -> {} with key {:?} is not in the spec: {why}; {fate}",
            binding.source, self.queue, binding.routing_key
        ));
    }

    fn report_dead_letter_routing_key(&mut self, work: &QueueSettings) {
        if let Some(key) = work.str("dead-letter-routing-key") {
            let kind = work
                .str("dead-letter-exchange")
                .and_then(|x| self.rec.inventory.exchanges.get(x))
                .map(|e| e.kind.as_str());
            if kind != Some("fanout") {
                self.warn(format!(
                    "{} dead-letters with routing key {key:?} ({}): msgpipe does not model a dead-letter routing key (its dead-letter exchange is fanout)",
                    self.queue,
                    source(work, "dead-letter-routing-key")
                ));
            }
        }
    }

    /// deadLetter.exchange and .queue from the work queue's dead-letter settings, and the
    /// DLQ's retention and length limit.
    fn dead_letters(
        &mut self,
        queue_type: QueueType,
        claimed: &mut ClaimedDeadLetters,
    ) -> DeadLetters {
        let queue = self.queue;
        let work = self.settings(queue);
        let mut spec = DeadLetterSpec::default();
        let Some(exchange) = work.str("dead-letter-exchange").map(str::to_string) else {
            let dlx = self.own_dead_letter_exchange(&mut spec);
            self.note(format!(
                "{queue} has no dead-letter exchange: rejected and expired messages are dropped today; msgpipe adds {dlx} and {queue}.dlq"
            ));
            return DeadLetters { spec, queue: None };
        };
        let from = source(&work, "dead-letter-exchange");
        if from == SettingSource::Argument.to_string() {
            self.note(format!(
                "x-dead-letter-exchange {exchange:?} is a declare argument of {queue}: it beats any policy, so it stays in force after adoption (fine while the spec names the same exchange; changing deadLetter.exchange later needs a migration)"
            ));
        }
        self.dead_letter_exchange(&exchange, &from, &mut spec, claimed);
        let dlq = self.dead_letter_queue(&exchange, &mut spec, claimed);
        if let Some(dlq) = &dlq {
            self.dead_letter_queue_settings(dlq, queue_type, &mut spec);
        }
        DeadLetters { spec, queue: dlq }
    }

    fn dead_letter_exchange(
        &mut self,
        exchange: &str,
        from: &str,
        spec: &mut DeadLetterSpec,
        claimed: &mut ClaimedDeadLetters,
    ) {
        let queue = self.queue;
        if exchange.is_empty() {
            let dlx = self.own_dead_letter_exchange(spec);
            self.warn(format!(
                "{queue} dead-letters through the default exchange, by queue name ({from}): msgpipe dead-letters through an exchange of its own, so the spec has {dlx}"
            ));
            return;
        }
        let kind = self
            .rec
            .inventory
            .exchanges
            .get(exchange)
            .map(|e| e.kind.clone());
        let refusal = match kind.as_deref() {
            _ if exchange.starts_with("amq.") => {
                Some("msgpipe cannot name an amq. exchange".to_string())
            }
            Some("fanout") => None,
            None => {
                self.warn(format!(
                    "dead-letter exchange {exchange} of {queue} does not exist: its dead letters are dropped today; msgpipe will declare it (fanout)"
                ));
                None
            }
            Some(other) => Some(format!(
                "it is a {other} exchange, and msgpipe's dead-letter exchange is fanout (every dead letter reaches the DLQ whatever its key); msgpipe cannot redeclare it"
            )),
        };
        if let Some(why) = refusal {
            let dlx = self.own_dead_letter_exchange(spec);
            self.warn(format!(
                "dead-letter exchange {exchange} ({from}) is not in the spec: {why}; the spec has {dlx}"
            ));
            return;
        }
        if let Err(owner) = claimed.claim(exchange, queue) {
            let dlx = self.own_dead_letter_exchange(spec);
            self.warn(format!(
                "dead-letter exchange {exchange} is shared with {owner}, whose pipeline takes it: a fanout dead-letter exchange shared by two pipelines would copy each one's dead letters into both DLQs; the spec has {dlx}"
            ));
            return;
        }
        self.note(format!(
            "deadLetter.exchange {exchange}: dead-letter exchange of {queue} ({from})"
        ));
        spec.exchange = Some(exchange.to_string());
    }

    /// The dead-letter exchange msgpipe will make for this pipeline when it cannot take the
    /// live one: the default `<queue>.dlx`, unless an exchange of another type has that name
    /// (msgpipe could not declare it), then `<queue>.msgpipe.dlx`, set in the spec.
    fn own_dead_letter_exchange(&mut self, spec: &mut DeadLetterSpec) -> String {
        let queue = self.queue;
        let default = format!("{queue}.dlx");
        let taken = self
            .rec
            .inventory
            .exchanges
            .get(&default)
            .filter(|e| e.kind != "fanout")
            .map(|e| e.kind.clone());
        let Some(kind) = taken else {
            return default;
        };
        let other = format!("{queue}.msgpipe.dlx");
        self.warn(format!(
            "the default dead-letter exchange name {default} is taken by a {kind} exchange, which msgpipe cannot declare as fanout: the spec names {other} instead"
        ));
        spec.exchange = Some(other.clone());
        other
    }

    fn dead_letter_queue(
        &mut self,
        exchange: &str,
        spec: &mut DeadLetterSpec,
        claimed: &mut ClaimedDeadLetters,
    ) -> Option<String> {
        let queue = self.queue;
        let targets: Vec<String> = self
            .rec
            .dead_letter_targets(queue)
            .into_iter()
            .filter(|t| !self.rec.skipped.contains_key(t))
            .collect();
        let Some(dlq) = targets.first().cloned() else {
            self.warn(format!(
                "the dead letters of {queue} reach no queue through {}: they are dropped today; msgpipe adds {queue}.dlq",
                if exchange.is_empty() { "the default exchange" } else { exchange }
            ));
            return None;
        };
        if targets.len() > 1 {
            self.warn(format!(
                "the dead letters of {queue} reach {} queues ({}): a pipeline has one dead-letter queue; the spec takes {dlq}",
                targets.len(),
                targets.join(", ")
            ));
        }
        if let Err(owner) = claimed.claim(&dlq, queue) {
            self.warn(format!(
                "dead-letter queue {dlq} is shared with {owner}, whose pipeline takes it (msgpipe refuses two pipelines claiming one queue): the spec keeps the default {queue}.dlq"
            ));
            return None;
        }
        let sharers: Vec<&String> = self
            .rec
            .dead_letter_of
            .get(&dlq)
            .into_iter()
            .flatten()
            .filter(|q| q.as_str() != queue)
            .collect();
        if !sharers.is_empty() {
            self.warn(format!(
                "{dlq} also receives the dead letters of {}: it stays shared on the broker, but only this pipeline's spec names it",
                sharers.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
        self.note(format!(
            "deadLetter.queue {dlq}: where the dead letters of {queue} are routed"
        ));
        spec.queue = Some(dlq.clone());
        Some(dlq)
    }

    fn dead_letter_queue_settings(
        &mut self,
        dlq: &str,
        queue_type: QueueType,
        spec: &mut DeadLetterSpec,
    ) {
        let settings = self.settings(dlq);
        if let Some(ttl) = positive(&settings, "message-ttl") {
            spec.retention = Some(Duration::from_millis(ttl));
            self.note(format!(
                "deadLetter.retention {}: message-ttl of {dlq} ({})",
                Duration::from_millis(ttl),
                source(&settings, "message-ttl")
            ));
        }
        if let Some(limit) = positive(&settings, "max-length") {
            spec.max_length = Some(limit);
            self.note(format!(
                "deadLetter.maxLength {limit}: max-length of {dlq} ({})",
                source(&settings, "max-length")
            ));
        }
        let live_type = self
            .rec
            .inventory
            .queues
            .get(dlq)
            .map(|q| q.queue_type.clone());
        if let Some(live_type) = live_type.filter(|t| t != queue_type.as_str()) {
            self.warn(format!(
                "{dlq} is a {live_type} queue and {} a {} one: every queue of a pipeline has the pipeline's type, so msgpipe will refuse to manage {dlq} (ImmutableFieldChanged) until it is migrated",
                self.queue,
                queue_type.as_str()
            ));
        }
        self.unmodelled(dlq, "dead-letter queue", &DLQ_KEYS);
    }

    /// The recognised tiers, one per delay (two tiers with one delay are reported).
    fn distinct_tiers(&mut self) -> Vec<LegacyTier> {
        let queue = self.queue;
        let all = self.rec.tiers.get(queue).cloned().unwrap_or_default();
        let mut distinct: Vec<LegacyTier> = Vec::new();
        for tier in all {
            match distinct.last() {
                Some(kept) if kept.delay == tier.delay => self.warn(format!(
                    "retry queues {} and {} both wait {}: msgpipe has one tier per delay, the spec takes {}",
                    kept.queue,
                    tier.queue,
                    Duration::from_millis(tier.delay),
                    kept.queue
                )),
                _ => distinct.push(tier),
            }
        }
        if distinct.is_empty() {
            return distinct;
        }
        let listed: Vec<String> = distinct
            .iter()
            .map(|t| format!("{} ({})", t.queue, Duration::from_millis(t.delay)))
            .collect();
        self.note(format!(
            "retry tiers: {}: queues with a message TTL that dead-letter back to {queue} (recognised by their settings, not their names)",
            listed.join(", ")
        ));
        for tier in distinct.iter().filter(|t| !t.via.is_empty()) {
            self.warn(format!(
                "{} returns its messages through exchange {} (to {queue} alone today): msgpipe's tiers return through the default exchange, so a retried message reaches this queue only whatever else is bound",
                tier.queue, tier.via
            ));
        }
        distinct
    }

    /// retry.maxAttempts from the work queue's delivery limit, else from the tiers.
    fn max_attempts(&mut self, work: &QueueSettings, queue_type: QueueType, tiers: usize) -> u32 {
        let queue = self.queue;
        let quorum = queue_type == QueueType::Quorum;
        if let Some(limit) = work.int("delivery-limit").filter(|l| *l > 0 && quorum) {
            return self.attempts_from_limit(work, limit, tiers);
        }
        if tiers > 0 {
            let attempts = u32::try_from(tiers + 1)
                .unwrap_or(u32::MAX)
                .min(MAX_ATTEMPTS_LIMIT);
            let broker_side = if quorum {
                format!(
                    "; msgpipe will set delivery-limit {attempts} on {queue}, which has {} today",
                    self.implicit_limit()
                )
            } else {
                " (a classic queue has no delivery limit: maxAttempts reaches clients only, in pipeline.json)".into()
            };
            self.note(format!(
                "retry.maxAttempts {attempts}: {tiers} retry tiers, one attempt each, plus the first delivery; how often legacy consumers retry is in their code, not on the broker{broker_side}"
            ));
            return attempts;
        }
        if !quorum {
            self.note(format!(
                "retry.maxAttempts 1: {queue} has no retry tiers and no delivery limit (no retry)"
            ));
            return 1;
        }
        let attempts = RABBITMQ4_DEFAULT_DELIVERY_LIMIT;
        let same = self.rec.inventory.server_major() >= 4 && work.get("delivery-limit").is_none();
        let effect = if same {
            "keeps that cap"
        } else {
            "adds a cap where there is none today"
        };
        self.warn(format!(
            "retry.maxAttempts {attempts}: {queue} has no retry tiers and {}; msgpipe sets a quorum work queue's delivery-limit to maxAttempts (maxAttempts 1 would dead-letter every requeued message at once), so {attempts} {effect}, and msgpipe adds retry tiers its clients use (legacy consumers that requeue keep working)",
            self.implicit_limit()
        ));
        attempts
    }

    /// maxAttempts = the quorum work queue's delivery limit (msgpipe's mapping reversed).
    fn attempts_from_limit(&mut self, work: &QueueSettings, limit: i64, tiers: usize) -> u32 {
        let queue = self.queue;
        let attempts = u32::try_from(limit)
            .unwrap_or(u32::MAX)
            .clamp(1, MAX_ATTEMPTS_LIMIT);
        self.note(format!(
            "retry.maxAttempts {attempts}: delivery-limit {limit} of {queue} ({}). msgpipe sets a quorum work queue's delivery-limit to maxAttempts, so the broker's cap on deliveries stays the same, and clients retry up to maxAttempts - 1 times through the tiers",
            source(work, "delivery-limit")
        ));
        if i64::from(attempts) != limit {
            self.warn(format!(
                "delivery-limit {limit} of {queue} is above msgpipe's most attempts ({MAX_ATTEMPTS_LIMIT}): maxAttempts {attempts} lowers it"
            ));
        }
        let retries = attempts - 1;
        if usize::try_from(retries).is_ok_and(|r| r < tiers) {
            self.warn(format!(
                "delivery-limit {limit} allows {retries} retries but {queue} has {tiers} retry tiers: msgpipe's schedule has at most {retries} tiers"
            ));
        }
        attempts
    }

    /// What limits a quorum queue's deliveries when nothing sets a limit, on this server.
    fn implicit_limit(&self) -> String {
        let work = self.settings(self.queue);
        match work.int("delivery-limit") {
            Some(l) if l > 0 => format!("delivery-limit {l}"),
            Some(_) => "an unlimited delivery-limit".into(),
            None if self.rec.inventory.server_major() >= 4 => {
                format!("RabbitMQ 4's default delivery limit of {RABBITMQ4_DEFAULT_DELIVERY_LIMIT}")
            }
            None => "no delivery limit (RabbitMQ 3.x)".into(),
        }
    }

    /// retry.backoff closest to the tiers' delays.
    fn backoff(&mut self, tiers: &[LegacyTier], max_attempts: u32) -> BackoffSpec {
        if tiers.is_empty() {
            return BackoffSpec::default();
        }
        let delays: Vec<u64> = tiers.iter().map(|t| t.delay).collect();
        let fitted = fit(&delays, max_attempts.max(2));
        let b = &fitted.backoff;
        let shown = |list: &[u64]| {
            list.iter()
                .map(|d| Duration::from_millis(*d).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if fitted.exact {
            self.note(format!(
                "retry.backoff initialDelay {}, multiplier {}, maxDelay {}: gives exactly the live delays {}",
                b.initial_delay,
                b.multiplier,
                b.max_delay,
                shown(&delays)
            ));
        } else {
            self.warn(format!(
                "the live retry delays {} are not a geometric series msgpipe can express (with maxAttempts {max_attempts}); the closest backoff (initialDelay {}, multiplier {}, maxDelay {}) gives {}",
                shown(&delays),
                b.initial_delay,
                b.multiplier,
                b.max_delay,
                shown(&fitted.fitted)
            ));
        }
        fitted.backoff
    }

    /// Reports each setting of `queue` that no spec field (nor msgpipe's fixed values) covers.
    fn unmodelled(&mut self, queue: &str, role: &str, modelled: &[&str]) {
        let settings = self.settings(queue);
        for (key, setting) in &settings.keys {
            if modelled.contains(&key.as_str()) {
                continue;
            }
            let stays = match &setting.source {
                SettingSource::Argument => "a declare argument: it stays on the live queue, but a queue msgpipe declares would not have it".to_string(),
                SettingSource::Policy(name) => format!("from policy {name}: it stops applying once msgpipe's own policy outranks {name}"),
            };
            self.warn(format!(
                "{role} {queue}: {key} = {} is not modelled by msgpipe ({stays})",
                setting.value
            ));
        }
        if let Some(operator) = &self
            .rec
            .inventory
            .queues
            .get(queue)
            .and_then(|q| q.operator_policy.clone())
        {
            self.note(format!(
                "operator policy {operator} applies to {queue}: operator policies cap settings whatever msgpipe sets, and stay as they are"
            ));
        }
    }

    /// A hand-made policy that matches many queues is reported: no pipeline can own it.
    fn policy_reach(&mut self, queue: &str) {
        let inventory = self.rec.inventory;
        let Some(name) = inventory.queues.get(queue).and_then(|q| q.policy.clone()) else {
            return;
        };
        if name.starts_with(POLICY_PREFIX) {
            return;
        }
        let Some(policy) = inventory.policies.get(&name) else {
            return;
        };
        let reach: Vec<&str> = inventory
            .queues
            .iter()
            .filter(|(_, q)| q.policy.as_deref() == Some(name.as_str()))
            .map(|(n, _)| n.as_str())
            .collect();
        let outranks = policy.priority > i64::from(POLICY_PRIORITY);
        let after = if outranks {
            format!(
                "its priority {} outranks msgpipe's ({POLICY_PRIORITY}), so it keeps deciding {queue}'s settings and msgpipe's policy for {queue} has no effect",
                policy.priority
            )
        } else {
            format!(
                "msgpipe's own policy {POLICY_PREFIX}{queue} (priority {POLICY_PRIORITY}) will replace it on {queue}"
            )
        };
        if reach.len() > 1 {
            let shown: Vec<&str> = reach.iter().take(5).copied().collect();
            self.warn(format!(
                "policy {name} (pattern {:?}, priority {}) applies to {} queues ({}{}): it is not {queue}'s alone, so no spec can own it; {after}, and {name} stays for the others",
                policy.pattern,
                policy.priority,
                reach.len(),
                shown.join(", "),
                if reach.len() > 5 { ", ..." } else { "" }
            ));
        } else {
            self.note(format!(
                "policy {name} applies to {queue} only; {after}; msgpipe does not delete it"
            ));
        }
    }

    /// Retry tiers whose names are not msgpipe's are left behind by adoption: say so.
    fn tier_names(&mut self, state: &DesiredState, tiers: &[LegacyTier]) {
        let ours: Vec<&str> = state
            .topology
            .queues
            .iter()
            .filter(|q| matches!(q.role, QueueRole::Retry(_)))
            .map(|q| q.name.as_str())
            .collect();
        let legacy: Vec<&str> = tiers
            .iter()
            .map(|t| t.queue.as_str())
            .filter(|name| !ours.contains(name))
            .collect();
        if legacy.is_empty() {
            if !tiers.is_empty() {
                self.note(
                    "the retry tiers already have msgpipe's names (<queue>.retry.<n>.<delay>)"
                        .into(),
                );
            }
            return;
        }
        self.warn(format!(
            "retry queues {} are not msgpipe's names (msgpipe names its tiers <queue>.retry.<n>.<delay>: {}). Adopting means msgpipe declares its own tiers and the retry exchange {}; the legacy ones stay as they are (msgpipe never deletes what it did not create), their waiting messages still return to {} after their delay, and applications that publish to them keep working. Delete them by hand once nothing publishes to them and they are empty",
            legacy.join(", "),
            if ours.is_empty() { "none with this spec".to_string() } else { ours.join(", ") },
            state.names.retry_exchange,
            self.queue
        ));
    }

    /// Settings in effect on `queue` that adopting changes (msgpipe's policy replaces the
    /// hand-made one), and declare arguments that will keep beating msgpipe's policy.
    fn adoption_changes(&mut self, state: &DesiredState, queue: &str) {
        let Some(AfterAdoption {
            policy,
            definition,
            settings: after,
        }) = self.settings_after_adoption(state, queue)
        else {
            return;
        };
        let before = self.settings(queue);
        let keys: BTreeSet<&String> = before.keys.keys().chain(after.keys.keys()).collect();
        let changes: Vec<String> = keys
            .into_iter()
            .filter(|k| {
                k.as_str() != "queue-type"
                    && before.get(k).map(|s| &s.value) != after.get(k).map(|s| &s.value)
            })
            .map(|k| {
                let (was, will) = (before.get(k), after.get(k));
                format!(
                    "{k} {} -> {}",
                    self.shown(queue, k, was),
                    self.shown(queue, k, will)
                )
            })
            .collect();
        if !changes.is_empty() {
            self.warn(format!(
                "adopting changes settings in effect on {queue} (the spec cannot keep them: msgpipe's policy {policy} sets them): {}",
                changes.join(", ")
            ));
        }
        let Some(live) = self.rec.inventory.queues.get(queue) else {
            return;
        };
        for (key, wanted) in &definition {
            let Some(argument) = live.arguments.get(&format!("x-{key}")) else {
                continue;
            };
            let effective = after.get(key).map(|s| &s.value);
            if effective != Some(wanted) && effective == Some(argument) {
                self.warn(format!(
                    "x-{key} = {argument} is a declare argument of {queue} and beats msgpipe's policy ({key} = {wanted}): the spec's value takes effect only after a migration"
                ));
            }
        }
    }

    /// msgpipe's policy for `queue` (name, definition as sent to this server) and the
    /// settings in effect once it is applied: the queue's arguments with msgpipe's policy,
    /// unless a foreign policy of higher priority keeps applying.
    fn settings_after_adoption(&self, state: &DesiredState, queue: &str) -> Option<AfterAdoption> {
        let inventory = self.rec.inventory;
        let live = inventory.queues.get(queue)?;
        let name = format!("{POLICY_PREFIX}{queue}");
        let desired = state.topology.policies.iter().find(|p| p.name == name)?;
        let definition = policy_definition(&desired.definition, inventory.server_major());
        let outranked = live
            .policy
            .as_ref()
            .and_then(|n| inventory.policies.get(n).map(|p| (n, p)))
            .is_some_and(|(n, p)| {
                !n.starts_with(POLICY_PREFIX) && p.priority > i64::from(POLICY_PRIORITY)
            });
        let after = if outranked {
            self.settings(queue)
        } else {
            let ours = LivePolicy {
                pattern: desired.pattern.clone(),
                apply_to: desired.apply_to.clone(),
                priority: i64::from(desired.priority),
                definition: definition.clone(),
            };
            QueueSettings::combine(&live.arguments, Some((&name, &ours)))
        };
        Some(AfterAdoption {
            policy: name,
            definition,
            settings: after,
        })
    }

    /// A setting's value in words; an unset delivery limit of a quorum queue on RabbitMQ 4
    /// is that version's implicit 20.
    fn shown(&self, queue: &str, key: &str, setting: Option<&Setting>) -> String {
        let inventory = self.rec.inventory;
        let implicit_limit = key == "delivery-limit"
            && inventory.server_major() >= 4
            && inventory
                .queues
                .get(queue)
                .is_some_and(|q| q.queue_type == "quorum");
        match setting {
            Some(s) => s.value.to_string(),
            None if implicit_limit => {
                format!("unset ({RABBITMQ4_DEFAULT_DELIVERY_LIMIT} by RabbitMQ 4's default)")
            }
            None => "unset".to_string(),
        }
    }

    /// What `msgpipe apply` of the pipeline would do on the vhost as read, from the
    /// reconciler's own diff; what would remove something msgpipe did not make is a warning.
    fn adoption_plan(&mut self, state: &DesiredState) {
        let plan = converge(state, &self.rec.live);
        if plan.actions.is_empty() && plan.conflicts.is_empty() {
            self.findings.push(Finding::adoption(
                "msgpipe apply of this pipeline would change nothing: the vhost already matches it",
            ));
        }
        for action in &plan.actions {
            match action {
                BrokerAction::Unbind(b) if !self.made_by_msgpipe(&b.source, &b.destination, &b.routing_key) => {
                    self.warn(format!(
                        "msgpipe apply would {action}: a binding from an exchange of the pipeline is taken for one of msgpipe's own routes; remove the binding from the spec's exchange first, or accept that it goes"
                    ));
                }
                BrokerAction::DeleteQueueIfEmpty { queue, .. } => self.warn(format!(
                    "msgpipe apply would retire {queue} (it looks like one of msgpipe's tiers of another schedule): unbind, then delete once empty"
                )),
                _ => self.findings.push(Finding::adoption(format!("msgpipe apply would {action}"))),
            }
        }
        for conflict in &plan.conflicts {
            self.warn(format!("msgpipe apply would refuse: {conflict}"));
        }
        for warning in &plan.warnings {
            self.warn(format!("msgpipe apply would warn: {warning}"));
        }
    }

    /// The pipeline's queues and exchanges that exist already, and its legacy retry queues:
    /// msgpipe did not create them, so it never deletes them.
    fn adopted(&self, state: &DesiredState, tiers: &[LegacyTier]) -> Adopted {
        let inventory = &self.rec.inventory;
        let topology = &state.topology;
        Adopted {
            queues: topology
                .queues
                .iter()
                .map(|q| q.name.clone())
                .chain(tiers.iter().map(|t| t.queue.clone()))
                .filter(|q| inventory.queues.contains_key(q))
                .collect(),
            exchanges: topology
                .exchanges
                .iter()
                .map(|e| e.name.clone())
                .filter(|e| inventory.exchanges.contains_key(e))
                .collect(),
        }
    }

    fn made_by_msgpipe(&self, source: &str, destination: &str, key: &str) -> bool {
        self.rec.inventory.bindings.iter().any(|b| {
            b.source == source
                && b.destination == destination
                && b.routing_key == key
                && b.is_msgpipes()
        })
    }
}

/// A positive integer setting.
fn positive(settings: &QueueSettings, key: &str) -> Option<u64> {
    settings
        .int(key)
        .and_then(|v| u64::try_from(v).ok())
        .filter(|v| *v > 0)
}

/// Where a setting comes from, in words.
fn source(settings: &QueueSettings, key: &str) -> String {
    settings
        .get(key)
        .map_or_else(|| "unset".into(), |s| s.source.to_string())
}
