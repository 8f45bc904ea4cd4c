//! The model: Kubernetes objects in, per-family desired state out. Pure: no I/O, no
//! clock; the caller passes in the few node facts that need I/O (local addresses).
//!
//! ```
//! use kproxy::model::{build, ClusterObjects, ProxyConfig};
//! let state = build(&ClusterObjects::default(), &ProxyConfig::new("node-a"), &[]);
//! assert!(state.invalid.is_empty());
//! assert_eq!(state.families.len(), 2);
//! ```

pub mod endpoints;
pub mod service;
pub mod topology;

use crate::ip::parse_cidr;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kproxy_backend_api::{
    Endpoint, IpFamily, NodeContext, NodePortAddresses, Protocol, ServiceName, ServicePlans,
    ServicePortPlan,
};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use topology::NodeTopology;

/// Services carrying this label belong to another proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// EndpointSlices of headless services carry this label.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The Node label naming its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// An object that was skipped because a field is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidObject {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

impl InvalidObject {
    pub fn new(kind: &'static str, meta: &ObjectMeta, reason: String) -> Self {
        InvalidObject {
            kind,
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            reason,
        }
    }
}

impl fmt::Display for InvalidObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}: {}", self.kind, self.namespace, self.name, self.reason)
    }
}

/// The Kubernetes objects kproxy reads, from whichever source.
#[derive(Debug, Clone, Default)]
pub struct ClusterObjects {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
    pub service_cidrs: Vec<ServiceCIDR>,
}

/// The proxy settings the model needs (from flags and the config file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    pub node_name: String,
    /// `--cluster-cidr`: pod CIDRs, for telling in-cluster sources apart.
    pub cluster_cidrs: Vec<IpNet>,
    /// `--nodeport-addresses`: CIDRs, or `primary` (the default, also when empty).
    pub nodeport_addresses: Vec<String>,
    pub masquerade_all: bool,
}

impl ProxyConfig {
    pub fn new(node_name: impl Into<String>) -> Self {
        ProxyConfig {
            node_name: node_name.into(),
            cluster_cidrs: Vec::new(),
            nodeport_addresses: Vec::new(),
            masquerade_all: false,
        }
    }
}

/// The desired state of one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyState {
    pub node: NodeContext,
    pub services: ServicePlans,
}

/// The desired state of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyState {
    pub families: BTreeMap<IpFamily, FamilyState>,
    /// Objects skipped because of an invalid field.
    pub invalid: Vec<InvalidObject>,
    /// The node's zone label, if any.
    pub zone: Option<String>,
}

/// Builds the desired state. `local_addrs` are the node's interface addresses, used
/// only when `--nodeport-addresses` lists CIDRs.
pub fn build(objects: &ClusterObjects, cfg: &ProxyConfig, local_addrs: &[IpAddr]) -> ProxyState {
    let mut invalid = Vec::new();
    let node = objects
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(cfg.node_name.as_str()));
    let zone = node
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get(ZONE_LABEL))
        .cloned();
    let node_ips = node.map(node_ips).unwrap_or_default();
    let topo = NodeTopology {
        node_name: &cfg.node_name,
        zone: zone.as_deref(),
    };

    // Endpoints per (service, family, port name, protocol), merged across slices.
    type PortKey = (ServiceName, IpFamily, String, Protocol);
    let mut slice_eps: BTreeMap<PortKey, Vec<Vec<Endpoint>>> = BTreeMap::new();
    for slice in &objects.endpoint_slices {
        let labels = slice.metadata.labels.as_ref();
        if labels.is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL) || l.contains_key(HEADLESS_LABEL)) {
            continue;
        }
        match endpoints::slice_endpoints(slice, &cfg.node_name) {
            Ok(info) => {
                let (Some(svc), Some(family)) = (info.service, info.family) else { continue };
                for ((port_name, proto), eps) in info.ports {
                    slice_eps
                        .entry((svc.clone(), family, port_name, proto))
                        .or_default()
                        .push(eps);
                }
            }
            Err(e) => invalid.push(e),
        }
    }

    let mut families: BTreeMap<IpFamily, FamilyState> = IpFamily::ALL
        .into_iter()
        .map(|family| {
            let ctx = node_context(family, cfg, &node_ips, &objects.service_cidrs, local_addrs);
            (family, FamilyState { node: ctx, services: ServicePlans::new() })
        })
        .collect();

    let mut seen = BTreeSet::new();
    for svc in &objects.services {
        if svc
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL))
        {
            continue;
        }
        let info = match service::service_ports(svc) {
            Ok(info) => info,
            Err(e) => {
                invalid.push(e);
                continue;
            }
        };
        for port in info.ports {
            let svc_name = port.name.service.clone();
            if !seen.insert((svc_name.clone(), port.family, port.name.port.clone(), port.name.protocol)) {
                // The same Service listed twice: the first copy wins.
                continue;
            }
            let key = (svc_name.clone(), port.family, port.name.port.clone(), port.name.protocol);
            let eps = endpoints::merge(
                slice_eps
                    .get(&key)
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(Vec::as_slice),
            );
            let categorized = topology::categorize(&port, &eps, topo);
            let Some(fam) = families.get_mut(&port.family) else { continue };
            fam.services.entry(svc_name).or_default().push(ServicePortPlan {
                port,
                endpoints: eps,
                categorized,
            });
        }
    }
    ProxyState { families, invalid, zone }
}

/// The node's IPs from its status: InternalIP addresses first, then ExternalIP.
fn node_ips(node: &Node) -> Vec<IpAddr> {
    let addrs = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut out = Vec::new();
    for kind in ["InternalIP", "ExternalIP"] {
        for a in addrs.iter().filter(|a| a.type_ == kind) {
            if let Some(ip) = crate::ip::parse_ip(&a.address) {
                if !out.contains(&ip) {
                    out.push(ip);
                }
            }
        }
    }
    out
}

fn node_context(
    family: IpFamily,
    cfg: &ProxyConfig,
    node_ips: &[IpAddr],
    service_cidrs: &[ServiceCIDR],
    local_addrs: &[IpAddr],
) -> NodeContext {
    let family_ips: Vec<IpAddr> = node_ips.iter().copied().filter(|ip| IpFamily::of(ip) == family).collect();
    let specs: Vec<&str> = cfg.nodeport_addresses.iter().map(|s| s.trim()).filter(|s| !s.is_empty()).collect();
    let nodeport_addresses = if specs.is_empty() || specs == ["primary"] {
        NodePortAddresses::Ips(family_ips.first().copied().into_iter().collect())
    } else {
        let cidrs: Vec<IpNet> = specs
            .iter()
            .filter_map(|s| parse_cidr(s))
            .filter(|n| IpFamily::of(&n.addr()) == family)
            .collect();
        if cidrs.iter().any(|n| n.prefix_len() == 0) {
            NodePortAddresses::All
        } else {
            let mut ips: Vec<IpAddr> = local_addrs
                .iter()
                .copied()
                .filter(|ip| !ip.is_loopback() && cidrs.iter().any(|n| n.contains(ip)))
                .collect();
            ips.sort();
            ips.dedup();
            NodePortAddresses::Ips(ips)
        }
    };
    let mut cidrs: Vec<IpNet> = service_cidrs
        .iter()
        .filter_map(|c| c.spec.as_ref())
        .flat_map(|s| s.cidrs.iter().flatten())
        .filter_map(|c| parse_cidr(c))
        .filter(|n| IpFamily::of(&n.addr()) == family)
        .collect();
    cidrs.sort();
    cidrs.dedup();
    NodeContext {
        family,
        node_name: cfg.node_name.clone(),
        node_ips: family_ips,
        nodeport_addresses,
        cluster_cidrs: cfg
            .cluster_cidrs
            .iter()
            .copied()
            .filter(|n| IpFamily::of(&n.addr()) == family)
            .collect(),
        masquerade_all: cfg.masquerade_all,
        service_cidrs: cidrs,
    }
}

/// Services whose plans differ between two states of one family: what a partial sync
/// must touch.
pub fn changed_services(old: &ServicePlans, new: &ServicePlans) -> BTreeSet<ServiceName> {
    let mut changed = BTreeSet::new();
    for (name, plans) in new {
        if old.get(name) != Some(plans) {
            changed.insert(name.clone());
        }
    }
    for name in old.keys() {
        if !new.contains_key(name) {
            changed.insert(name.clone());
        }
    }
    changed
}
