//! Client library for msgpipe pipelines.
//!
//! The operator publishes each pipeline's topology and client feature flags as
//! `pipeline.json` in the ConfigMap `<pipeline>-client`; this crate reads that contract
//! ([`config::PipelineConfig`]). It has no Kubernetes dependency.

pub mod config;
pub mod headers;

pub use config::{ConfigError, PipelineConfig};
