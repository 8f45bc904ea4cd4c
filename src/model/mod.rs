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
        write!(
            f,
            "{} {}/{}: {}",
            self.kind, self.namespace, self.name, self.reason
        )
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
        if labels.is_some_and(|l| {
            l.contains_key(SERVICE_PROXY_NAME_LABEL) || l.contains_key(HEADLESS_LABEL)
        }) {
            continue;
        }
        match endpoints::slice_endpoints(slice, &cfg.node_name) {
            Ok(info) => {
                let (Some(svc), Some(family)) = (info.service, info.family) else {
                    continue;
                };
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
            (
                family,
                FamilyState {
                    node: ctx,
                    services: ServicePlans::new(),
                },
            )
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
            if !seen.insert((
                svc_name.clone(),
                port.family,
                port.name.port.clone(),
                port.name.protocol,
            )) {
                // The same Service listed twice: the first copy wins.
                continue;
            }
            let key = (
                svc_name.clone(),
                port.family,
                port.name.port.clone(),
                port.name.protocol,
            );
            let eps = endpoints::merge(
                slice_eps
                    .get(&key)
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(Vec::as_slice),
            );
            let categorized = topology::categorize(&port, &eps, topo);
            let Some(fam) = families.get_mut(&port.family) else {
                continue;
            };
            fam.services
                .entry(svc_name)
                .or_default()
                .push(ServicePortPlan {
                    port,
                    endpoints: eps,
                    categorized,
                });
        }
    }
    ProxyState {
        families,
        invalid,
        zone,
    }
}

/// The node's IPs from its status: InternalIP addresses first, then ExternalIP.
pub fn node_ips(node: &Node) -> Vec<IpAddr> {
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
    let family_ips: Vec<IpAddr> = node_ips
        .iter()
        .copied()
        .filter(|ip| IpFamily::of(ip) == family)
        .collect();
    let specs: Vec<&str> = cfg
        .nodeport_addresses
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect();
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

#[cfg(test)]
mod tests {
    use super::*;
    use kproxy_backend_api::TrafficPolicy;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).expect("valid Service json")
    }

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).expect("valid EndpointSlice json")
    }

    fn ports_of(state: &ProxyState, family: IpFamily) -> usize {
        state.families[&family]
            .services
            .values()
            .map(Vec::len)
            .sum()
    }

    /// Health-check node ports, one per Service (every port of it carries the same).
    fn hc_ports(state: &ProxyState) -> Vec<u16> {
        let set: BTreeSet<(ServiceName, u16)> = state.families[&IpFamily::V4]
            .services
            .values()
            .flatten()
            .filter_map(|p| {
                p.port
                    .health_check_node_port
                    .map(|hc| (p.port.name.service.clone(), hc))
            })
            .collect();
        set.into_iter().map(|(_, hc)| hc).collect()
    }

    fn four_services() -> Vec<Service> {
        vec![
            svc(
                json!({"metadata": {"namespace": "ns", "name": "cluster"}, "spec": {"clusterIP": "172.30.55.4",
                "ports": [{"name": "a", "port": 1234, "protocol": "UDP"}, {"name": "b", "port": 1235, "protocol": "UDP"}, {"name": "c", "port": 1236, "protocol": "SCTP"}]}}),
            ),
            svc(
                json!({"metadata": {"namespace": "ns", "name": "nodeport"}, "spec": {"type": "NodePort", "clusterIP": "172.30.55.10",
                "ports": [{"name": "a", "port": 345, "nodePort": 30345}, {"name": "b", "port": 344, "nodePort": 30344}, {"name": "c", "port": 343, "nodePort": 30343, "protocol": "SCTP"}]}}),
            ),
            svc(
                json!({"metadata": {"namespace": "ns", "name": "lb"}, "spec": {"type": "LoadBalancer", "clusterIP": "172.30.55.11", "loadBalancerIP": "1.2.3.4",
                "ports": [{"name": "a", "port": 8675, "nodePort": 30061}, {"name": "b", "port": 8676, "nodePort": 30062}]},
                "status": {"loadBalancer": {"ingress": [{"ip": "10.1.2.4"}]}}}),
            ),
            svc(
                json!({"metadata": {"namespace": "ns", "name": "lb-local"}, "spec": {"type": "LoadBalancer", "clusterIP": "172.30.55.12",
                "externalTrafficPolicy": "Local", "healthCheckNodePort": 345,
                "ports": [{"name": "a", "port": 8677, "nodePort": 30063}, {"name": "b", "port": 8678, "nodePort": 30064}]},
                "status": {"loadBalancer": {"ingress": [{"ip": "10.1.2.3"}]}}}),
            ),
        ]
    }

    #[test]
    fn build_service_map_add_remove() {
        let mut objs = ClusterObjects {
            services: four_services(),
            ..Default::default()
        };
        let state = build(&objs, &ProxyConfig::new("node-a"), &[]);
        assert_eq!(ports_of(&state, IpFamily::V4), 10);
        assert_eq!(ports_of(&state, IpFamily::V6), 0);
        assert_eq!(
            hc_ports(&state),
            [345],
            "only eTP=Local LoadBalancers get a health check"
        );

        objs.services.truncate(1);
        objs.services[0] = svc(json!({"metadata": {"namespace": "ns", "name": "cluster"},
            "spec": {"clusterIP": "172.30.55.4", "ports": [{"name": "a", "port": 1234, "protocol": "UDP"}]}}));
        let state = build(&objs, &ProxyConfig::new("node-a"), &[]);
        assert_eq!(ports_of(&state, IpFamily::V4), 1);
        assert!(hc_ports(&state).is_empty());
    }

    #[test]
    fn headless_external_name_and_unallocated_are_ignored() {
        let objs = ClusterObjects {
            services: vec![
                svc(
                    json!({"metadata": {"namespace": "ns", "name": "h"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
                ),
                svc(
                    json!({"metadata": {"namespace": "ns", "name": "h2"}, "spec": {"clusterIP": "None"}}),
                ),
                svc(
                    json!({"metadata": {"namespace": "ns", "name": "e"}, "spec": {"type": "ExternalName", "externalName": "x.example", "clusterIP": "172.30.0.9", "ports": [{"port": 80}]}}),
                ),
                svc(
                    json!({"metadata": {"namespace": "ns", "name": "pending"}, "spec": {"ports": [{"port": 80}]}}),
                ),
            ],
            ..Default::default()
        };
        let state = build(&objs, &ProxyConfig::new("node-a"), &[]);
        assert_eq!(ports_of(&state, IpFamily::V4), 0);
        assert!(state.invalid.is_empty());
    }

    #[test]
    fn dual_stack_ports_get_their_own_family_addresses() {
        let objs = ClusterObjects {
            services: vec![svc(
                json!({"metadata": {"namespace": "ns", "name": "d"}, "spec": {
                "type": "LoadBalancer", "clusterIPs": ["172.30.0.5", "fd00:10:96::5"],
                "externalIPs": ["192.168.99.1", "2001:db8:99::1"],
                "loadBalancerSourceRanges": ["203.0.113.0/25", "2001:db8:ff::/64"],
                "ports": [{"port": 80, "nodePort": 30080}]},
                "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}, {"ip": "2001:db8:aa::4"}]}}}),
            )],
            ..Default::default()
        };
        let state = build(&objs, &ProxyConfig::new("node-a"), &[]);
        for family in IpFamily::ALL {
            let ports: Vec<_> = state.families[&family]
                .services
                .values()
                .flatten()
                .collect();
            assert_eq!(ports.len(), 1, "{family}");
            let p = &ports[0].port;
            let all = std::iter::once(p.cluster_ip)
                .chain(p.external_ips.iter().copied())
                .chain(p.load_balancer_ips.iter().copied());
            for ip in all {
                assert_eq!(IpFamily::of(&ip), family, "{ip} in {family}");
            }
            assert_eq!(p.source_ranges.len(), 1);
            assert_eq!(p.external_ips.len(), 1);
            assert_eq!(p.load_balancer_ips.len(), 1);
        }
    }

    #[test]
    fn endpoints_merged_across_slices_deduplicated_and_sorted() {
        let objs = ClusterObjects {
            services: vec![svc(
                json!({"metadata": {"namespace": "ns", "name": "s"}, "spec": {
                "clusterIP": "172.30.0.5", "internalTrafficPolicy": "Local", "ports": [{"name": "p", "port": 80}]}}),
            )],
            endpoint_slices: vec![
                slice(
                    json!({"metadata": {"namespace": "ns", "name": "s-1", "labels": {"kubernetes.io/service-name": "s"}},
                    "addressType": "IPv4", "ports": [{"name": "p", "port": 8080}],
                    "endpoints": [{"addresses": ["10.0.0.9"], "nodeName": "node-a"},
                                  {"addresses": ["10.0.0.10"], "nodeName": "node-b", "conditions": {"ready": false, "serving": true, "terminating": true}}]}),
                ),
                slice(
                    json!({"metadata": {"namespace": "ns", "name": "s-2", "labels": {"kubernetes.io/service-name": "s"}},
                    "addressType": "IPv4", "ports": [{"name": "p", "port": 8080}],
                    "endpoints": [{"addresses": ["10.0.0.10"], "nodeName": "node-b"},
                                  {"addresses": ["10.0.0.1"], "nodeName": "node-b"}]}),
                ),
                // Another port name: not this service port's endpoints.
                slice(
                    json!({"metadata": {"namespace": "ns", "name": "s-3", "labels": {"kubernetes.io/service-name": "s"}},
                    "addressType": "IPv4", "ports": [{"name": "other", "port": 9090}],
                    "endpoints": [{"addresses": ["10.0.0.99"]}]}),
                ),
            ],
            ..Default::default()
        };
        let state = build(&objs, &ProxyConfig::new("node-a"), &[]);
        let plan = &state.families[&IpFamily::V4].services[&ServiceName::new("ns", "s")][0];
        let eps: Vec<String> = plan.endpoints.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            eps,
            ["10.0.0.10:8080", "10.0.0.1:8080", "10.0.0.9:8080"],
            "sorted as text, like upstream"
        );
        assert!(
            !plan.endpoints[0].terminating,
            "the non-terminating duplicate wins"
        );
        assert_eq!(plan.port.internal_policy, TrafficPolicy::Local);
        assert_eq!(plan.categorized.local.len(), 1);
        assert!(plan
            .endpoints
            .iter()
            .find(|e| e.ip.to_string() == "10.0.0.9")
            .is_some_and(|e| e.is_local));
    }

    #[test]
    fn nodeport_addresses_resolution() {
        let node: Node = serde_json::from_value(json!({"metadata": {"name": "node-a"},
            "status": {"addresses": [{"type": "Hostname", "address": "node-a"}, {"type": "ExternalIP", "address": "1.1.1.1"},
                                     {"type": "InternalIP", "address": "192.168.0.2"}, {"type": "InternalIP", "address": "2001:db8::1"}]}}))
        .expect("node");
        let objs = ClusterObjects {
            nodes: vec![node],
            ..Default::default()
        };
        let local: Vec<IpAddr> = [
            "127.0.0.1",
            "192.168.0.2",
            "192.168.1.2",
            "10.9.9.9",
            "2001:db8::1",
        ]
        .iter()
        .map(|s| s.parse().expect("ip"))
        .collect();
        let mut cfg = ProxyConfig::new("node-a");
        let ctx = |cfg: &ProxyConfig, f| {
            build(&objs, cfg, &local).families[&f]
                .node
                .nodeport_addresses
                .clone()
        };
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        assert_eq!(
            ctx(&cfg, IpFamily::V4),
            NodePortAddresses::Ips(vec![ip("192.168.0.2")]),
            "primary by default"
        );
        assert_eq!(
            ctx(&cfg, IpFamily::V6),
            NodePortAddresses::Ips(vec![ip("2001:db8::1")])
        );
        cfg.nodeport_addresses = vec!["192.168.0.0/16".into(), "127.0.0.0/8".into()];
        assert_eq!(
            ctx(&cfg, IpFamily::V4),
            NodePortAddresses::Ips(vec![ip("192.168.0.2"), ip("192.168.1.2")]),
            "CIDRs select local addresses, never loopback"
        );
        assert_eq!(
            ctx(&cfg, IpFamily::V6),
            NodePortAddresses::Ips(vec![]),
            "no CIDR of this family"
        );
        cfg.nodeport_addresses = vec!["0.0.0.0/0".into()];
        assert_eq!(ctx(&cfg, IpFamily::V4), NodePortAddresses::All);
    }
}

#[cfg(test)]
mod health_count_tests {
    //! Upstream's TestHealthCheckNodePortWhenTerminating: the health-check node port
    //! counts local Ready endpoints only, so a node with only terminating endpoints
    //! reports unhealthy.
    use super::*;
    use serde_json::json;

    fn local_ready(conditions: [(bool, bool, bool); 4]) -> usize {
        let eps: Vec<_> = conditions
            .iter()
            .enumerate()
            .map(|(i, (r, s, t))| {
                json!({"addresses": [format!("10.0.1.{}", i + 1)], "nodeName": "node-a",
                "conditions": {"ready": r, "serving": s, "terminating": t}})
            })
            .collect();
        let objs = ClusterObjects {
            services: vec![serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "lb"},
                "spec": {"type": "LoadBalancer", "clusterIP": "172.30.1.1", "externalTrafficPolicy": "Local",
                         "healthCheckNodePort": 30000, "ports": [{"name": "p", "port": 80, "nodePort": 30080}]}}))
            .expect("svc")],
            endpoint_slices: vec![serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "lb-1",
                "labels": {"kubernetes.io/service-name": "lb"}}, "addressType": "IPv4",
                "ports": [{"name": "p", "port": 80}], "endpoints": eps}))
            .expect("slice")],
            ..Default::default()
        };
        let state = build(&objs, &ProxyConfig::new("node-a"), &[]);
        state.families[&IpFamily::V4].services[&ServiceName::new("ns", "lb")][0]
            .local_ready_endpoints()
    }

    #[test]
    fn terminating_endpoints_do_not_count_as_healthy() {
        let ready = (true, true, false);
        let not_ready = (false, false, false);
        assert_eq!(local_ready([ready, ready, ready, not_ready]), 3);
        let serving_terminating = (false, true, true);
        let terminating = (false, false, true);
        assert_eq!(
            local_ready([
                serving_terminating,
                serving_terminating,
                terminating,
                not_ready
            ]),
            0
        );
    }
}
