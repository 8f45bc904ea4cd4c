//! Health reporting, as kube-proxy does it, for load balancers and the kubelet.
//!
//! Load balancers and probes already configured for kube-proxy must see the same answers from
//! kproxy, so the paths, status codes, headers and JSON bodies here follow upstream's
//! pkg/proxy/healthcheck:
//!
//! - [`ProxyHealth`]: whether the proxiers keep up with changes (`/livez`) and whether the
//!   node should receive load-balancer traffic (`/healthz`);
//! - [`serve_health`] / [`serve_metrics`]: the `:10256` health server and the `:10249` metrics
//!   server;
//! - [`ServiceHealthServers`]: one `healthCheckNodePort` server per LoadBalancer Service with
//!   `externalTrafficPolicy: Local`, reporting this node's local ready endpoints.
//!
//! Time is read through a [`Clock`] and passed in explicitly, so every rule can be tested
//! without sleeping.

mod clock;
mod proxy;
mod server;
mod service;

pub use clock::{rfc3339_nano, Clock, ManualClock, SystemClock};
pub use proxy::{FamilyHealth, HealthStatus, ProxyHealth, TO_BE_DELETED_TAINT};
pub use server::{
    health_router, metrics_router, serve_health, serve_health_on, serve_metrics, serve_metrics_on,
    ServeError,
};
pub use service::{
    ListenFailure, ServiceHealthError, ServiceHealthServers, ENDPOINT_WEIGHT_HEADER,
};
