//! Per-node, per-family context: everything that is not a service but shapes the rules.

use crate::IpFamily;
use ipnet::IpNet;
use std::net::IpAddr;

/// The packet mark bit used to request masquerading (kube-proxy's default bit 14).
/// Not public API of the ruleset: other components must not rely on it.
pub const MASQUERADE_MARK: u32 = 1 << 14;

/// Which local addresses accept NodePort traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every local address except loopback (`--nodeport-addresses 0.0.0.0/0`).
    All,
    /// Exactly these node addresses (the primary node IP by default).
    Ips(Vec<IpAddr>),
}

/// Node-wide settings for one IP family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeContext {
    pub family: IpFamily,
    /// This node's name (`--hostname-override` or the host name).
    pub node_name: String,
    /// This node's IPs of this family (primary first). Used for the source-range special
    /// case (a range containing a node IP also allows the LB VIPs as sources).
    pub node_ips: Vec<IpAddr>,
    pub nodeport_addresses: NodePortAddresses,
    /// Pod CIDRs of this family (`--cluster-cidr`): sources inside are "local" (in-cluster)
    /// traffic. Empty means no local-traffic detector.
    pub cluster_cidrs: Vec<IpNet>,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// ServiceCIDRs of this family: unallocated addresses inside are dropped.
    pub service_cidrs: Vec<IpNet>,
}

impl NodeContext {
    /// A context with no addresses and no detector, for tests and dry runs.
    pub fn empty(family: IpFamily, node_name: impl Into<String>) -> Self {
        NodeContext {
            family,
            node_name: node_name.into(),
            node_ips: Vec::new(),
            nodeport_addresses: NodePortAddresses::Ips(Vec::new()),
            cluster_cidrs: Vec::new(),
            masquerade_all: false,
            service_cidrs: Vec::new(),
        }
    }
}
