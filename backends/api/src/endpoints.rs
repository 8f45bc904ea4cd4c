//! Endpoints as the model hands them to backends: already merged, deduplicated, sorted and
//! categorised for this node.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// One endpoint of a service port (one address and target port from an EndpointSlice).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    /// `endpoints[].nodeName`, if set.
    pub node_name: Option<String>,
    /// `endpoints[].zone`, if set.
    pub zone: Option<String>,
    /// `nodeName` equals this node's name.
    pub is_local: bool,
    /// `conditions.ready` (nil counts as true).
    pub ready: bool,
    /// `conditions.serving` (nil counts as true).
    pub serving: bool,
    /// `conditions.terminating` (nil counts as false).
    pub terminating: bool,
    /// `hints.forZones[*].name`, sorted.
    pub zone_hints: Vec<String>,
    /// `hints.forNodes[*].name`, sorted.
    pub node_hints: Vec<String>,
}

impl Endpoint {
    /// The address traffic is DNATed to.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }

    /// Serving while terminating: usable only when nothing Ready is left.
    pub fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.socket_addr())
    }
}

/// Which topology filter applied to cluster endpoints, and why (for `explain`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TopologyMode {
    /// No topology filtering.
    #[default]
    None,
    /// Only endpoints hinted for this node's zone are used for cluster traffic.
    PreferSameZone { zone: String },
    /// Only endpoints hinted for this node are used for cluster traffic.
    PreferSameNode { node: String },
}

/// The result of categorising a service port's endpoints for this node (upstream's
/// `CategorizeEndpoints`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CategorizedEndpoints {
    /// Endpoints for traffic that may go anywhere in the cluster (already topology
    /// filtered, or the serving+terminating fallback). Empty if the port does not use
    /// cluster endpoints.
    pub cluster: Vec<Endpoint>,
    /// Endpoints on this node for Local policies (Ready, or local serving+terminating
    /// fallback). Never topology filtered.
    pub local: Vec<Endpoint>,
    /// Every endpoint some traffic can reach: the union of `cluster` and `local`.
    pub all_reachable: Vec<Endpoint>,
    /// Any usable endpoint exists anywhere (decides REJECT vs DROP).
    pub has_any_endpoints: bool,
    /// The topology mode used for `cluster`.
    pub topology: TopologyMode,
    /// `cluster` holds serving+terminating endpoints because nothing was Ready.
    pub cluster_uses_terminating: bool,
    /// `local` holds serving+terminating endpoints because no local endpoint was Ready.
    pub local_uses_terminating: bool,
}
