//! The desired nftables objects: the static skeleton of kproxy's table, and the chains,
//! sets and map elements of each service. Pure functions of the model's plan.
//!
//! The shape follows upstream kube-proxy's nftables mode (verdict-map dispatch on
//! `daddr . l4proto . dport`, per-service and per-endpoint chains, `numgen` load
//! balancing), with these differences, each for a reason:
//! - the table is `kproxy`, so kproxy and kube-proxy never write each other's tables;
//! - endpoint chain and affinity set names hash their session-affinity flavour, so a
//!   chain's rules are a function of its name and a restart can keep live endpoint chains
//!   without reading rules back (upstream keeps them too, but would keep a stale rule
//!   set when only affinity changed);
//! - the `nodeport-ips` set always exists (empty when every address accepts NodePorts),
//!   so toggling `--nodeport-addresses` never has to delete a set in use;
//! - stale chains are deleted in the same transaction that unreferences them: kernels
//!   from 6.2 on release the references at once, so nothing lingers.

use crate::names::{self, ObjName, ServiceChainKind};
use crate::rule::{AddrSet, Match, Rule, Stmt, VmapKey};
use ipnet::IpNet;
use kproxy_backend_api::{
    IpFamily, NodeContext, NodePortAddresses, Protocol, ServicePortPlan, TrafficPolicy,
    MASQUERADE_MARK,
};
use std::fmt;
use std::net::IpAddr;

/// kproxy's table name (one per family: `ip kproxy` and `ip6 kproxy`).
pub const TABLE: &str = "kproxy";

pub const SERVICES: &str = "services";
pub const SERVICE_ENDPOINTS_CHECK: &str = "service-endpoints-check";
pub const NODEPORT_ENDPOINTS_CHECK: &str = "nodeport-endpoints-check";
pub const FIREWALL_CHECK: &str = "firewall-check";
pub const CLUSTER_IPS_CHECK: &str = "cluster-ips-check";
pub const REJECT_CHAIN: &str = "reject-chain";
pub const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";
pub const MASQUERADING: &str = "masquerading";

/// The named sets and maps of the table (affinity sets aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapId {
    ClusterIps,
    NodeportIps,
    ServiceIps,
    ServiceNodeports,
    NoEndpointServices,
    NoEndpointNodeports,
    FirewallIps,
}

impl MapId {
    pub const ALL: [MapId; 7] = [
        MapId::ClusterIps,
        MapId::NodeportIps,
        MapId::ServiceIps,
        MapId::ServiceNodeports,
        MapId::NoEndpointServices,
        MapId::NoEndpointNodeports,
        MapId::FirewallIps,
    ];

    pub fn name(self) -> &'static str {
        match self {
            MapId::ClusterIps => "cluster-ips",
            MapId::NodeportIps => "nodeport-ips",
            MapId::ServiceIps => "service-ips",
            MapId::ServiceNodeports => "service-nodeports",
            MapId::NoEndpointServices => "no-endpoint-services",
            MapId::NoEndpointNodeports => "no-endpoint-nodeports",
            MapId::FirewallIps => "firewall-ips",
        }
    }

    pub fn from_name(name: &str) -> Option<MapId> {
        MapId::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Is this a verdict map (rather than a plain set)?
    pub fn is_map(self) -> bool {
        !matches!(self, MapId::ClusterIps | MapId::NodeportIps)
    }

    /// The declaration body (`type …; comment …;`).
    pub fn declaration(self, family: IpFamily) -> String {
        let addr = match family {
            IpFamily::V4 => "ipv4_addr",
            IpFamily::V6 => "ipv6_addr",
        };
        let (ty, comment) = match self {
            MapId::ClusterIps => (addr.to_string(), "Active ClusterIPs"),
            MapId::NodeportIps => (addr.to_string(), "IPs that accept NodePort traffic"),
            MapId::ServiceIps => (
                format!("{addr} . inet_proto . inet_service : verdict"),
                "ClusterIP, ExternalIP and LoadBalancer IP traffic",
            ),
            MapId::ServiceNodeports => (
                "inet_proto . inet_service : verdict".to_string(),
                "NodePort traffic",
            ),
            MapId::NoEndpointServices => (
                format!("{addr} . inet_proto . inet_service : verdict"),
                "vmap to drop or reject packets to services with no endpoints",
            ),
            MapId::NoEndpointNodeports => (
                "inet_proto . inet_service : verdict".to_string(),
                "vmap to drop or reject packets to service nodeports with no endpoints",
            ),
            MapId::FirewallIps => (
                format!("{addr} . inet_proto . inet_service : verdict"),
                "destinations that are subject to LoadBalancerSourceRanges",
            ),
        };
        format!("type {ty} ; comment \"{comment}\" ;")
    }
}

impl fmt::Display for MapId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The key of a set or map element.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ElemKey {
    Addr(IpAddr),
    AddrProtoPort(IpAddr, Protocol, u16),
    ProtoPort(Protocol, u16),
}

impl fmt::Display for ElemKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElemKey::Addr(a) => write!(f, "{a}"),
            ElemKey::AddrProtoPort(a, p, port) => write!(f, "{a} . {p} . {port}"),
            ElemKey::ProtoPort(p, port) => write!(f, "{p} . {port}"),
        }
    }
}

/// The value of a verdict-map element.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Goto(ObjName),
    Drop,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Goto(c) => write!(f, "goto {c}"),
            Verdict::Drop => f.write_str("drop"),
        }
    }
}

/// One desired element: where it goes, its key, its verdict (maps only) and a comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub map: MapId,
    pub key: ElemKey,
    pub verdict: Option<Verdict>,
    pub comment: Option<String>,
}

/// A regular chain and its rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Chain {
    pub name: ObjName,
    pub rules: Vec<Rule>,
    /// The rules are a pure function of the name (endpoint chains): a live chain of this
    /// name never needs rewriting.
    pub content_in_name: bool,
}

/// A base chain's hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hook {
    pub kind: &'static str,
    pub hook: &'static str,
    pub priority: i32,
}

/// A session-affinity set.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AffinitySet {
    pub name: ObjName,
    pub timeout_seconds: u32,
}

/// Every object one Service contributes (all its ports).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceObjects {
    /// Endpoint chains first, then the chains that reference them.
    pub chains: Vec<Chain>,
    pub affinity_sets: Vec<AffinitySet>,
    pub elements: Vec<Element>,
}

/// The skeleton: base chains with their hooks, static chains, maps and node-level
/// elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticObjects {
    pub base_chains: Vec<(Hook, Chain)>,
    pub chains: Vec<Chain>,
    pub elements: Vec<Element>,
}

fn jump(name: &str) -> Stmt {
    Stmt::Jump(ObjName::fixed(static_name(name)))
}

/// Static names are `&'static str` constants; this keeps `ObjName::fixed` honest.
fn static_name(name: &str) -> &'static str {
    match name {
        SERVICES => SERVICES,
        SERVICE_ENDPOINTS_CHECK => SERVICE_ENDPOINTS_CHECK,
        NODEPORT_ENDPOINTS_CHECK => NODEPORT_ENDPOINTS_CHECK,
        FIREWALL_CHECK => FIREWALL_CHECK,
        CLUSTER_IPS_CHECK => CLUSTER_IPS_CHECK,
        REJECT_CHAIN => REJECT_CHAIN,
        MARK_FOR_MASQUERADE => MARK_FOR_MASQUERADE,
        MASQUERADING => MASQUERADING,
        _ => unreachable!("not a static chain: {name}"),
    }
}

fn chain(name: &'static str, rules: Vec<Rule>) -> Chain {
    Chain {
        name: ObjName::fixed(name),
        rules,
        content_in_name: false,
    }
}

fn named(map: MapId) -> AddrSet {
    AddrSet::Named(ObjName::fixed(map.name()))
}

fn vmap(key: VmapKey, map: MapId) -> Stmt {
    Stmt::Vmap {
        key,
        map: ObjName::fixed(map.name()),
    }
}

/// The table's skeleton for a node.
pub fn static_objects(node: &NodeContext) -> StaticObjects {
    let new = || Match::CtStateNew;
    let base = |kind, hook, priority, name, rules| {
        (
            Hook {
                kind,
                hook,
                priority,
            },
            chain(name, rules),
        )
    };
    let base_chains = vec![
        base(
            "filter",
            "prerouting",
            -110,
            "filter-prerouting-pre-dnat",
            vec![Rule::new(vec![new()], vec![jump(FIREWALL_CHECK)])],
        ),
        base(
            "filter",
            "output",
            -110,
            "filter-output-pre-dnat",
            vec![Rule::new(vec![new()], vec![jump(FIREWALL_CHECK)])],
        ),
        base(
            "nat",
            "prerouting",
            -100,
            "nat-prerouting",
            vec![Rule::new(vec![], vec![jump(SERVICES)])],
        ),
        base(
            "nat",
            "output",
            -100,
            "nat-output",
            vec![Rule::new(vec![], vec![jump(SERVICES)])],
        ),
        base(
            "filter",
            "input",
            0,
            "filter-input",
            vec![
                Rule::new(vec![new()], vec![jump(NODEPORT_ENDPOINTS_CHECK)]),
                Rule::new(vec![new()], vec![jump(SERVICE_ENDPOINTS_CHECK)]),
            ],
        ),
        base(
            "filter",
            "forward",
            0,
            "filter-forward",
            vec![
                Rule::new(vec![new()], vec![jump(SERVICE_ENDPOINTS_CHECK)]),
                Rule::new(vec![new()], vec![jump(CLUSTER_IPS_CHECK)]),
            ],
        ),
        base(
            "filter",
            "output",
            0,
            "filter-output",
            vec![
                Rule::new(vec![new()], vec![jump(SERVICE_ENDPOINTS_CHECK)]),
                Rule::new(vec![new()], vec![jump(CLUSTER_IPS_CHECK)]),
            ],
        ),
        base(
            "nat",
            "postrouting",
            100,
            "nat-postrouting",
            vec![Rule::new(vec![], vec![jump(MASQUERADING)])],
        ),
    ];

    // NodePorts: either every local address but loopback, or the listed node IPs.
    let nodeport_match = |all: Vec<Match>| match &node.nodeport_addresses {
        NodePortAddresses::All => all,
        NodePortAddresses::Ips(_) => vec![Match::Daddr {
            negate: false,
            set: named(MapId::NodeportIps),
        }],
    };
    let mut cluster_ips_check = vec![Rule::new(
        vec![Match::Daddr {
            negate: false,
            set: named(MapId::ClusterIps),
        }],
        vec![Stmt::Reject],
    )
    .with_comment("Reject traffic to invalid ports of ClusterIPs")];
    if !node.service_cidrs.is_empty() {
        cluster_ips_check.push(
            Rule::new(
                vec![Match::Daddr {
                    negate: false,
                    set: AddrSet::Prefixes(node.service_cidrs.clone()),
                }],
                vec![Stmt::Drop],
            )
            .with_comment("Drop traffic to unallocated ClusterIPs"),
        );
    }
    let chains = vec![
        chain(
            SERVICES,
            vec![
                Rule::new(
                    vec![],
                    vec![vmap(VmapKey::DaddrProtoPort, MapId::ServiceIps)],
                ),
                Rule::new(
                    nodeport_match(vec![Match::FibDaddrLocal, Match::DaddrNotLoopback]),
                    vec![vmap(VmapKey::ProtoPort, MapId::ServiceNodeports)],
                ),
            ],
        ),
        chain(
            SERVICE_ENDPOINTS_CHECK,
            vec![Rule::new(
                vec![],
                vec![vmap(VmapKey::DaddrProtoPort, MapId::NoEndpointServices)],
            )],
        ),
        chain(
            NODEPORT_ENDPOINTS_CHECK,
            vec![Rule::new(
                // Only reached from the input hook, so no fib test is needed.
                nodeport_match(vec![Match::DaddrNotLoopback]),
                vec![vmap(VmapKey::ProtoPort, MapId::NoEndpointNodeports)],
            )],
        ),
        chain(
            FIREWALL_CHECK,
            vec![Rule::new(
                vec![],
                vec![vmap(VmapKey::DaddrProtoPort, MapId::FirewallIps)],
            )],
        ),
        chain(CLUSTER_IPS_CHECK, cluster_ips_check),
        // `reject` cannot be a map verdict, so maps `goto` this chain.
        chain(REJECT_CHAIN, vec![Rule::new(vec![], vec![Stmt::Reject])]),
        chain(
            MARK_FOR_MASQUERADE,
            vec![Rule::new(vec![], vec![Stmt::MarkOr(MASQUERADE_MARK)])],
        ),
        chain(
            MASQUERADING,
            vec![
                Rule::new(vec![Match::MarkUnset(MASQUERADE_MARK)], vec![Stmt::Return]),
                Rule::new(vec![], vec![Stmt::MarkXor(MASQUERADE_MARK)]),
                Rule::new(vec![], vec![Stmt::Masquerade]),
            ],
        ),
    ];

    let elements = match &node.nodeport_addresses {
        NodePortAddresses::All => vec![],
        NodePortAddresses::Ips(ips) => ips
            .iter()
            .filter(|ip| IpFamily::of(ip) == node.family && !ip.is_loopback())
            .map(|ip| Element {
                map: MapId::NodeportIps,
                key: ElemKey::Addr(*ip),
                verdict: None,
                comment: None,
            })
            .collect(),
    };
    StaticObjects {
        base_chains,
        chains,
        elements,
    }
}

/// All objects of one Service (every port of it).
pub fn service_objects(node: &NodeContext, ports: &[ServicePortPlan]) -> ServiceObjects {
    let mut out = ServiceObjects::default();
    for plan in ports {
        port_objects(node, plan, &mut out);
    }
    out
}

fn mark_for_masquerade() -> Stmt {
    Stmt::Jump(ObjName::fixed(MARK_FOR_MASQUERADE))
}

fn saddr_is(ip: IpAddr) -> Match {
    Match::Saddr {
        negate: false,
        set: AddrSet::Addr(ip),
    }
}

fn port_objects(node: &NodeContext, plan: &ServicePortPlan, out: &mut ServiceObjects) {
    let p = &plan.port;
    let name = &p.name;
    let cat = &plan.categorized;
    let affinity = p.session_affinity_seconds;
    let service_chain = names::service_chain(ServiceChainKind::Service, name);
    let local_chain = names::service_chain(ServiceChainKind::Local, name);
    let external_chain = names::service_chain(ServiceChainKind::External, name);
    let firewall_chain = names::service_chain(ServiceChainKind::Firewall, name);
    let comment = name.to_string();

    // Endpoint chains: hairpin masquerade, affinity bookkeeping, DNAT.
    for ep in &cat.all_reachable {
        let mut rules = vec![Rule::new(
            vec![saddr_is(ep.ip)],
            vec![mark_for_masquerade()],
        )];
        if let Some(timeout) = affinity {
            let set = names::affinity_set(name, ep, timeout);
            rules.push(Rule::new(vec![], vec![Stmt::UpdateSaddr(set.clone())]));
            out.affinity_sets.push(AffinitySet {
                name: set,
                timeout_seconds: timeout,
            });
        }
        rules.push(Rule::new(
            vec![],
            vec![Stmt::Dnat {
                protocol: name.protocol,
                to: ep.socket_addr(),
            }],
        ));
        out.chains.push(Chain {
            name: names::endpoint_chain(name, ep, affinity),
            rules,
            content_in_name: true,
        });
    }

    let has_endpoints = plan.has_endpoints();
    let has_internal = plan.has_internal_endpoints();
    let has_external = plan.has_external_endpoints();
    let internal_is_local = p.internal_policy == TrafficPolicy::Local;
    let external_is_local = p.external_policy_local();

    // Load-balancing chains. The ClusterIP masquerade rule lives in the chain ClusterIP
    // traffic uses, so it never matches externally addressed packets.
    let masquerade_rule = || {
        let daddr = Match::Daddr {
            negate: false,
            set: AddrSet::Addr(p.cluster_ip),
        };
        if node.masquerade_all {
            Some(Rule::new(vec![daddr], vec![mark_for_masquerade()]))
        } else if !node.cluster_cidrs.is_empty() {
            Some(Rule::new(
                vec![
                    daddr,
                    Match::Saddr {
                        negate: true,
                        set: AddrSet::Prefixes(node.cluster_cidrs.clone()),
                    },
                ],
                vec![mark_for_masquerade()],
            ))
        } else {
            None
        }
    };
    let lb_chain = |chain_name: &ObjName, endpoints: &[_], is_internal: bool| {
        let mut rules = Vec::new();
        if is_internal && has_internal {
            rules.extend(masquerade_rule());
        }
        let ep_chains: Vec<ObjName> = endpoints
            .iter()
            .map(|ep| names::endpoint_chain(name, ep, affinity))
            .collect();
        if let Some(timeout) = affinity {
            for (ep, chain) in endpoints.iter().zip(&ep_chains) {
                rules.push(Rule::new(
                    vec![Match::Saddr {
                        negate: false,
                        set: AddrSet::Named(names::affinity_set(name, ep, timeout)),
                    }],
                    vec![Stmt::Goto(chain.clone())],
                ));
            }
        }
        rules.push(Rule::new(vec![], vec![Stmt::NumgenVmap(ep_chains)]));
        Chain {
            name: chain_name.clone(),
            rules,
            content_in_name: false,
        }
    };
    let has_service_chain = p.uses_cluster_endpoints() && !cat.cluster.is_empty();
    let has_local_chain = p.uses_local_endpoints() && !cat.local.is_empty();
    if has_service_chain {
        out.chains
            .push(lb_chain(&service_chain, &cat.cluster, !internal_is_local));
    }
    if has_local_chain {
        out.chains
            .push(lb_chain(&local_chain, &cat.local, internal_is_local));
    }
    let internal_chain = if internal_is_local {
        &local_chain
    } else {
        &service_chain
    };

    // External entry chain.
    let external = p.externally_accessible() && has_endpoints;
    if external {
        let mut rules = Vec::new();
        if external_is_local {
            if has_service_chain {
                if !node.cluster_cidrs.is_empty() {
                    rules.push(
                        Rule::new(
                            vec![Match::Saddr {
                                negate: false,
                                set: AddrSet::Prefixes(node.cluster_cidrs.clone()),
                            }],
                            vec![Stmt::Goto(service_chain.clone())],
                        )
                        .with_comment("short-circuit pod traffic"),
                    );
                }
                rules.push(
                    Rule::new(vec![Match::FibSaddrLocal], vec![mark_for_masquerade()])
                        .with_comment("masquerade local traffic"),
                );
                rules.push(
                    Rule::new(
                        vec![Match::FibSaddrLocal],
                        vec![Stmt::Goto(service_chain.clone())],
                    )
                    .with_comment("short-circuit local traffic"),
                );
            }
            if has_external && has_local_chain {
                rules.push(Rule::new(vec![], vec![Stmt::Goto(local_chain.clone())]));
            }
        } else if has_service_chain {
            rules.push(Rule::new(vec![], vec![mark_for_masquerade()]));
            rules.push(Rule::new(vec![], vec![Stmt::Goto(service_chain.clone())]));
        }
        out.chains.push(Chain {
            name: external_chain.clone(),
            rules,
            content_in_name: false,
        });
    }

    // Firewall chain for LoadBalancerSourceRanges.
    let firewall = !p.load_balancer_ips.is_empty() && !p.source_ranges.is_empty();
    if firewall {
        let mut allowed: Vec<IpNet> = p.source_ranges.clone();
        // A VIP-style LB may loop node traffic back with the VIP as source: when the
        // ranges admit the node, admit the VIPs too.
        let node_allowed = node
            .node_ips
            .iter()
            .any(|ip| p.source_ranges.iter().any(|r| r.contains(ip)));
        if node_allowed {
            allowed.extend(p.load_balancer_ips.iter().map(|ip| IpNet::from(*ip)));
        }
        out.chains.push(Chain {
            name: firewall_chain.clone(),
            rules: vec![Rule::new(
                vec![Match::Saddr {
                    negate: true,
                    set: AddrSet::Prefixes(allowed),
                }],
                vec![Stmt::Drop],
            )],
            content_in_name: false,
        });
    }

    // Map elements.
    let reject = Verdict::Goto(ObjName::fixed(REJECT_CHAIN));
    let internal_verdict = if has_endpoints {
        Verdict::Drop
    } else {
        reject.clone()
    };
    let external_verdict = internal_verdict.clone();
    let proto = name.protocol;
    let mut push = |map, key, verdict: Option<Verdict>, comment: Option<&str>| {
        out.elements.push(Element {
            map,
            key,
            verdict,
            comment: comment.map(str::to_string),
        })
    };
    push(MapId::ClusterIps, ElemKey::Addr(p.cluster_ip), None, None);
    let cip_key = ElemKey::AddrProtoPort(p.cluster_ip, proto, p.port);
    if has_internal {
        push(
            MapId::ServiceIps,
            cip_key,
            Some(Verdict::Goto(internal_chain.clone())),
            None,
        );
    } else {
        push(
            MapId::NoEndpointServices,
            cip_key,
            Some(internal_verdict),
            Some(&comment),
        );
    }
    for ip in p.external_ips.iter().chain(&p.load_balancer_ips) {
        let key = ElemKey::AddrProtoPort(*ip, proto, p.port);
        if external {
            push(
                MapId::ServiceIps,
                key.clone(),
                Some(Verdict::Goto(external_chain.clone())),
                None,
            );
        }
        if !has_external {
            push(
                MapId::NoEndpointServices,
                key,
                Some(external_verdict.clone()),
                Some(&comment),
            );
        }
    }
    if firewall {
        for ip in &p.load_balancer_ips {
            push(
                MapId::FirewallIps,
                ElemKey::AddrProtoPort(*ip, proto, p.port),
                Some(Verdict::Goto(firewall_chain.clone())),
                None,
            );
        }
    }
    if let Some(np) = p.node_port {
        let key = ElemKey::ProtoPort(proto, np);
        if external {
            push(
                MapId::ServiceNodeports,
                key.clone(),
                Some(Verdict::Goto(external_chain.clone())),
                None,
            );
        }
        if !has_external {
            push(
                MapId::NoEndpointNodeports,
                key,
                Some(external_verdict),
                Some(&comment),
            );
        }
    }
}
