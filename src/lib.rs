//! kproxy: a drop-in replacement for kube-proxy.
//!
//! Data flows one way: sources ([`manifests`], later the API server) produce Kubernetes
//! objects; the pure [`model`] turns them into a per-family desired state; a backend
//! (`kproxy_nftables`) reconciles the kernel with it, sending only what changed.

pub mod cli;
pub mod cluster_source;
pub mod config;
pub mod conntrack;
pub mod daemon;
pub mod explain;
pub mod healthcheck;
pub mod ip;
pub mod local_addrs;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod reconciler;
pub mod run;
pub mod sync_runner;
pub mod telemetry;
pub mod trace_cmd;
pub mod tracker;
