//! msgpipe: a Kubernetes operator that turns one `MessagePipeline` into a RabbitMQ work
//! queue, backoff retry tiers, a dead-letter exchange and queue, Prometheus alerts and a
//! client ConfigMap, and keeps them true to the spec.
//!
//! Data flows one way: [`api`] (what the user wrote) → [`plan`] (pure: what should exist)
//! → the IO edges (broker, kube) → the controller and the CLI.

pub mod adopt;
pub mod api;
pub mod broker;
pub mod cli;
pub mod controller;
pub mod dlq;
pub mod k8s;
pub mod plan;
