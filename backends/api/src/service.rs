//! Service ports and their per-node plan.

use crate::{CategorizedEndpoints, Endpoint, IpFamily, ServicePortName};
use ipnet::IpNet;
use std::net::IpAddr;

/// `externalTrafficPolicy` / `internalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// One port of a Service in one IP family, with everything a backend needs to route it.
/// Addresses are already filtered to the family and canonical.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: ServicePortName,
    pub family: IpFamily,
    /// The ClusterIP of this family.
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    /// LoadBalancer ingress IPs of this family whose `ipMode` is `VIP` or unset.
    pub load_balancer_ips: Vec<IpAddr>,
    /// `loadBalancerSourceRanges` of this family (whitespace trimmed, canonical).
    pub source_ranges: Vec<IpNet>,
    /// `sessionAffinity: ClientIP` timeout in seconds, if enabled.
    pub session_affinity_seconds: Option<u32>,
    pub external_policy: TrafficPolicy,
    pub internal_policy: TrafficPolicy,
    /// Set only for LoadBalancer services with eTP=Local.
    pub health_check_node_port: Option<u16>,
}

impl ServicePort {
    /// Reachable from outside the cluster network: a NodePort, an external IP or an LB IP.
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }

    /// Cluster-wide endpoints are needed (also for the eTP=Local short-circuit).
    pub fn uses_cluster_endpoints(&self) -> bool {
        self.internal_policy == TrafficPolicy::Cluster || self.externally_accessible()
    }

    /// Node-local endpoints are needed.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy == TrafficPolicy::Local
            || (self.external_policy == TrafficPolicy::Local && self.externally_accessible())
    }

    /// eTP=Local that actually matters (eTP is ignored when not externally accessible).
    pub fn external_policy_local(&self) -> bool {
        self.external_policy == TrafficPolicy::Local && self.externally_accessible()
    }
}

/// A service port plus its endpoints categorised for this node: the unit a backend
/// renders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortPlan {
    pub port: ServicePort,
    /// Every endpoint of the port, merged across slices, deduplicated, sorted by `ip:port`.
    pub endpoints: Vec<Endpoint>,
    pub categorized: CategorizedEndpoints,
}

impl ServicePortPlan {
    /// Endpoints for traffic to the ClusterIP (iTP decides which set).
    pub fn internal_endpoints(&self) -> &[Endpoint] {
        match self.port.internal_policy {
            TrafficPolicy::Local => &self.categorized.local,
            TrafficPolicy::Cluster => &self.categorized.cluster,
        }
    }

    /// Endpoints for external traffic (eTP decides which set).
    pub fn external_endpoints(&self) -> &[Endpoint] {
        if self.port.external_policy_local() {
            &self.categorized.local
        } else {
            &self.categorized.cluster
        }
    }

    /// Some endpoint is usable anywhere; otherwise every address REJECTs.
    pub fn has_endpoints(&self) -> bool {
        self.categorized.has_any_endpoints
    }

    /// ClusterIP traffic has somewhere to go; otherwise it is rejected (no endpoints) or
    /// dropped (iTP=Local with no local endpoint).
    pub fn has_internal_endpoints(&self) -> bool {
        self.has_endpoints() && !self.internal_endpoints().is_empty()
    }

    /// External traffic has somewhere to go; otherwise rejected or dropped (eTP=Local).
    pub fn has_external_endpoints(&self) -> bool {
        self.has_endpoints() && !self.external_endpoints().is_empty()
    }

    /// Distinct local Ready endpoint IPs: what the health-check node port reports.
    pub fn local_ready_endpoints(&self) -> usize {
        let mut ips: Vec<_> = self
            .endpoints
            .iter()
            .filter(|e| e.is_local && e.ready)
            .map(|e| e.ip)
            .collect();
        ips.sort();
        ips.dedup();
        ips.len()
    }
}
