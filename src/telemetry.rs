//! What happens around each sync in the daemon: metrics, proxy health, the per-service
//! health-check servers and UDP conntrack cleanup, as the reconciler's [`Observer`].

use crate::healthcheck::{ProxyHealth, ServiceHealthServers, TO_BE_DELETED_TAINT};
use crate::metrics::{Metrics, ObjectKind};
use crate::model::{InvalidObject, ProxyState};
use crate::reconciler::{FamilySync, Observer};
use k8s_openapi::api::core::v1::Node;
use kproxy_backend_api::{IpFamily, ServiceName, ServicePlans, TrafficPolicy};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tracing::warn;

/// Deletes stale UDP conntrack entries for one family; returns how many were deleted.
pub type ConntrackCleaner = Box<dyn FnMut(IpFamily, &ServicePlans) -> Result<u64, String> + Send>;

/// The daemon's observer.
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    pub health: Arc<ProxyHealth>,
    pub service_health: Option<ServiceHealthServers>,
    pub conntrack: Option<ConntrackCleaner>,
    families: Vec<IpFamily>,
    totals: (u64, u64),
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("families", &self.families)
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Every family counts as healthy from start, as kube-proxy's sync loop does: a
    /// family is unhealthy only once an update has waited longer than healthTimeout.
    pub fn new(metrics: Arc<Metrics>, health: Arc<ProxyHealth>, families: Vec<IpFamily>) -> Self {
        let now = health.now();
        for f in &families {
            health.updated(*f, now);
        }
        Telemetry {
            metrics,
            health,
            service_health: None,
            conntrack: None,
            families,
            totals: (0, 0),
        }
    }
}

/// Local policies without local endpoints, per family: (internal, external).
fn no_local_endpoints(services: &ServicePlans) -> (usize, usize) {
    let mut internal = 0;
    let mut external = 0;
    for p in services.values().flatten() {
        if !p.has_endpoints() || !p.categorized.local.is_empty() {
            continue;
        }
        if p.port.internal_policy == TrafficPolicy::Local {
            internal += 1;
        }
        if p.port.external_policy_local() {
            external += 1;
        }
    }
    (internal, external)
}

impl Observer for Telemetry {
    fn queued(&mut self, now: SystemTime) {
        for f in &self.families {
            self.health.queued_update(*f, now);
            self.metrics.set_last_queued(*f, now);
        }
    }

    fn family_synced(&mut self, sync: &FamilySync) {
        self.metrics
            .observe_sync(sync.family, sync.full, sync.elapsed);
        if sync.result.is_err() {
            self.metrics.inc_sync_failure(sync.family);
        }
    }

    fn synced(
        &mut self,
        state: &ProxyState,
        trigger_times: &[(IpFamily, SystemTime)],
        now: SystemTime,
    ) {
        for (family, fam) in &state.families {
            self.health.updated(*family, now);
            self.metrics.set_last_sync(*family, now);
            let (internal, external) = no_local_endpoints(&fam.services);
            self.metrics
                .set_no_local_endpoints(*family, internal, external);
        }
        for (family, t) in trigger_times {
            let seconds = match now.duration_since(*t) {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            };
            self.metrics.observe_network_programming(*family, seconds);
        }
        if let Some(hc) = &self.service_health {
            let mut ports: BTreeMap<ServiceName, u16> = BTreeMap::new();
            let mut counts: BTreeMap<ServiceName, usize> = BTreeMap::new();
            for fam in state.families.values() {
                for (name, plans) in &fam.services {
                    for p in plans {
                        if let Some(port) = p.port.health_check_node_port {
                            ports.insert(name.clone(), port);
                            let c = counts.entry(name.clone()).or_default();
                            *c = (*c).max(p.local_ready_endpoints());
                        }
                    }
                }
            }
            match hc.sync_services(&ports) {
                Ok(failures) => {
                    for f in failures {
                        warn!(service = %f.service, port = f.port, "FailedToStartServiceHealthcheck: {}", f.error);
                    }
                }
                Err(e) => warn!("cannot sync health-check servers: {e}"),
            }
            hc.sync_endpoints(&counts);
        }
        if let Some(clean) = &mut self.conntrack {
            for (family, fam) in &state.families {
                let start = Instant::now();
                match clean(*family, &fam.services) {
                    Ok(deleted) => {
                        self.metrics
                            .observe_conntrack(*family, start.elapsed(), deleted)
                    }
                    Err(e) => warn!(%family, "conntrack cleanup failed: {e}"),
                }
            }
        }
    }

    fn changes(&mut self, pending: (usize, usize), totals: (u64, u64)) {
        self.metrics.set_pending(pending.0, pending.1);
        self.metrics
            .add_service_changes(totals.0.saturating_sub(self.totals.0));
        self.metrics
            .add_endpoint_changes(totals.1.saturating_sub(self.totals.1));
        self.totals = totals;
    }

    fn invalid(&mut self, objects: &[InvalidObject]) {
        for o in objects {
            let kind = match o.kind {
                "Service" => ObjectKind::Service,
                "EndpointSlice" => ObjectKind::EndpointSlice,
                _ => ObjectKind::Node,
            };
            self.metrics.inc_invalid(kind);
        }
    }

    fn drift(&mut self, family: IpFamily, _differences: &[String]) {
        self.metrics.inc_drift(family);
    }

    fn node(&mut self, node: Option<&Node>) {
        let deleting = node.is_some_and(|n| n.metadata.deletion_timestamp.is_some());
        let tainted = node
            .and_then(|n| n.spec.as_ref())
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
        self.health.sync_node(node.is_some(), deleting, tainted);
    }
}
