//! Which broker objects of a pipeline msgpipe did not create: the ones it adopted.
//!
//! msgpipe deletes and retires only what it made. Bindings say so themselves (the marker
//! argument, [`crate::broker::BINDING_MARKER`]); policies by their name (`msgpipe.<queue>`:
//! msgpipe writes and deletes no other). A queue's arguments cannot change after it is
//! declared, and an exchange has nothing to mark, so the queues and exchanges that existed
//! before msgpipe took a pipeline over are listed on the pipeline itself, in the annotation
//! [`ADOPTED_ANNOTATION`], which `msgpipe import` writes: `queue/orders exchange/orders ...`.
//! Taking a name out of the list tells msgpipe it owns that object.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::api::MessagePipeline;

/// Annotation listing the queues and exchanges of a pipeline that msgpipe did not create,
/// as `queue/NAME` and `exchange/NAME`, separated by spaces, commas or new lines.
pub const ADOPTED_ANNOTATION: &str = "msgpipe.io/adopted";

/// The adopted queues and exchanges of a pipeline.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Adopted {
    pub queues: BTreeSet<String>,
    pub exchanges: BTreeSet<String>,
}

impl Adopted {
    /// What the pipeline's annotation lists (entries of another kind are ignored).
    pub fn of(pipeline: &MessagePipeline) -> Self {
        let text = pipeline
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ADOPTED_ANNOTATION))
            .map(String::as_str)
            .unwrap_or_default();
        Self::parse(text)
    }

    /// Parses the annotation's value.
    pub fn parse(text: &str) -> Self {
        let mut adopted = Self::default();
        for entry in text.split([' ', ',', '\n', '\t']).filter(|e| !e.is_empty()) {
            match entry.split_once('/') {
                Some(("queue", name)) => adopted.queues.insert(name.to_string()),
                Some(("exchange", name)) => adopted.exchanges.insert(name.to_string()),
                _ => false,
            };
        }
        adopted
    }

    /// The annotation's value for these objects (queues first, each kind sorted).
    pub fn annotation(&self) -> String {
        let queues = self.queues.iter().map(|q| format!("queue/{q}"));
        let exchanges = self.exchanges.iter().map(|e| format!("exchange/{e}"));
        queues.chain(exchanges).collect::<Vec<_>>().join(" ")
    }

    pub fn is_empty(&self) -> bool {
        self.queues.is_empty() && self.exchanges.is_empty()
    }

    pub fn queue(&self, name: &str) -> bool {
        self.queues.contains(name)
    }

    pub fn exchange(&self, name: &str) -> bool {
        self.exchanges.contains(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_annotation_reads_back_what_it_wrote_and_ignores_unknown_kinds() {
        let adopted =
            Adopted::parse("queue/orders, queue/orders.wait.5s\nexchange/orders policy/x junk");
        assert_eq!(
            adopted.queues,
            BTreeSet::from(["orders".to_string(), "orders.wait.5s".to_string()])
        );
        assert_eq!(adopted.exchanges, BTreeSet::from(["orders".to_string()]));
        assert_eq!(Adopted::parse(&adopted.annotation()), adopted);
        assert!(Adopted::parse("").is_empty());
    }
}
