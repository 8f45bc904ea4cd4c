//! Which endpoints this node uses for a service port: upstream's `CategorizeEndpoints`.
//!
//! - Cluster traffic uses Ready endpoints, filtered by topology hints when the hints
//!   allow it; with nothing Ready, every serving+terminating endpoint (topology ignored).
//! - Local traffic (iTP=Local, or eTP=Local on an externally reachable port) uses this
//!   node's Ready endpoints, else its serving+terminating ones; never topology filtered.
//! - The two fallbacks are decided independently.

use kproxy_backend_api::{CategorizedEndpoints, Endpoint, ServicePort, TopologyMode};

/// The node facts topology needs.
#[derive(Debug, Clone, Copy)]
pub struct NodeTopology<'a> {
    pub node_name: &'a str,
    /// The node's `topology.kubernetes.io/zone` label, if any.
    pub zone: Option<&'a str>,
}

/// Chooses the topology mode from the hints of the Ready endpoints: node hints win when
/// every Ready endpoint has one and one names this node; zone hints likewise; otherwise
/// no filtering (any missing hint disables it).
pub fn topology_mode(endpoints: &[Endpoint], node: NodeTopology<'_>) -> TopologyMode {
    let ready: Vec<&Endpoint> = endpoints.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return TopologyMode::None;
    }
    if !node.node_name.is_empty()
        && ready.iter().all(|e| !e.node_hints.is_empty())
        && ready
            .iter()
            .any(|e| e.node_hints.iter().any(|n| n == node.node_name))
    {
        return TopologyMode::PreferSameNode {
            node: node.node_name.to_string(),
        };
    }
    if let Some(zone) = node.zone.filter(|z| !z.is_empty()) {
        if ready.iter().all(|e| !e.zone_hints.is_empty())
            && ready.iter().any(|e| e.zone_hints.iter().any(|z| z == zone))
        {
            return TopologyMode::PreferSameZone {
                zone: zone.to_string(),
            };
        }
    }
    TopologyMode::None
}

fn available(ep: &Endpoint, mode: &TopologyMode) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::PreferSameNode { node } => ep.node_hints.iter().any(|n| n == node),
        TopologyMode::PreferSameZone { zone } => ep.zone_hints.iter().any(|z| z == zone),
    }
}

/// Categorises `endpoints` (merged and sorted) of `port` for this node.
pub fn categorize(
    port: &ServicePort,
    endpoints: &[Endpoint],
    node: NodeTopology<'_>,
) -> CategorizedEndpoints {
    let mut out = CategorizedEndpoints::default();
    if port.uses_cluster_endpoints() {
        out.topology = topology_mode(endpoints, node);
        out.cluster = endpoints
            .iter()
            .filter(|e| e.ready && available(e, &out.topology))
            .cloned()
            .collect();
        if out.cluster.is_empty() {
            out.cluster = endpoints
                .iter()
                .filter(|e| e.serving_terminating())
                .cloned()
                .collect();
            out.cluster_uses_terminating = !out.cluster.is_empty();
        }
        out.has_any_endpoints = !out.cluster.is_empty();
    }
    if !port.uses_local_endpoints() {
        out.all_reachable = out.cluster.clone();
        return out;
    }
    let mut has_local_ready = false;
    let mut has_local_serving_terminating = false;
    for e in endpoints {
        if e.ready {
            out.has_any_endpoints = true;
            has_local_ready |= e.is_local;
        } else if e.serving_terminating() {
            out.has_any_endpoints = true;
            has_local_serving_terminating |= e.is_local;
        }
    }
    if has_local_ready {
        out.local = endpoints
            .iter()
            .filter(|e| e.is_local && e.ready)
            .cloned()
            .collect();
    } else if has_local_serving_terminating {
        out.local = endpoints
            .iter()
            .filter(|e| e.is_local && e.serving_terminating())
            .cloned()
            .collect();
        out.local_uses_terminating = true;
    }
    out.all_reachable = if !port.uses_cluster_endpoints() {
        out.local.clone()
    } else if out.topology == TopologyMode::None && !out.local_uses_terminating {
        // Every Ready endpoint is in `cluster`, so it already contains `local`.
        out.cluster.clone()
    } else {
        super::endpoints::merge([out.cluster.as_slice(), out.local.as_slice()])
    };
    out
}

#[cfg(test)]
mod tests {
    //! The cases of upstream's TestCategorizeEndpoints, restated.
    use super::*;
    use kproxy_backend_api::{IpFamily, Protocol, ServiceName, ServicePortName, TrafficPolicy};

    const NODE: NodeTopology<'static> = NodeTopology {
        node_name: "node-a",
        zone: Some("zone-a"),
    };

    fn port(itp: TrafficPolicy, etp: TrafficPolicy, external: bool) -> ServicePort {
        ServicePort {
            name: ServicePortName::new(ServiceName::new("ns", "svc"), "p", Protocol::Tcp),
            family: IpFamily::V4,
            cluster_ip: "172.30.0.1".parse().expect("ip"),
            port: 80,
            node_port: external.then_some(30080),
            external_ips: vec![],
            load_balancer_ips: vec![],
            source_ranges: vec![],
            session_affinity_seconds: None,
            external_policy: etp,
            internal_policy: itp,
            health_check_node_port: None,
        }
    }

    use TrafficPolicy::{Cluster, Local};

    /// `ep("10.0.0.1", local, ready, serving, terminating, zones)`.
    fn ep(
        ip: &str,
        local: bool,
        ready: bool,
        serving: bool,
        terminating: bool,
        zones: &[&str],
    ) -> Endpoint {
        Endpoint {
            ip: ip.parse().expect("ip"),
            port: 80,
            node_name: Some(if local { "node-a" } else { "node-b" }.into()),
            zone: None,
            is_local: local,
            ready,
            serving,
            terminating,
            zone_hints: zones.iter().map(|z| z.to_string()).collect(),
            node_hints: vec![],
        }
    }

    fn ips(v: &[Endpoint]) -> Vec<String> {
        v.iter().map(|e| e.ip.to_string()).collect()
    }

    #[test]
    fn hints_used_when_all_hinted_and_one_for_our_zone() {
        let eps = vec![
            ep("10.1.2.3", false, true, true, false, &["zone-a"]),
            ep("10.1.2.4", false, true, true, false, &["zone-b"]),
            ep("10.1.2.5", false, true, true, false, &["zone-c"]),
            ep("10.1.2.6", false, true, true, false, &["zone-a"]),
        ];
        let c = categorize(&port(Cluster, Cluster, false), &eps, NODE);
        assert_eq!(ips(&c.cluster), ["10.1.2.3", "10.1.2.6"]);
        assert_eq!(
            c.topology,
            TopologyMode::PreferSameZone {
                zone: "zone-a".into()
            }
        );
        assert!(c.local.is_empty());
        assert_eq!(ips(&c.all_reachable), ips(&c.cluster));
    }

    #[test]
    fn multiple_zones_per_hint() {
        let eps = vec![
            ep("10.1.2.3", false, true, true, false, &["zone-a", "zone-b"]),
            ep("10.1.2.4", false, true, true, false, &["zone-c"]),
        ];
        let c = categorize(&port(Cluster, Cluster, false), &eps, NODE);
        assert_eq!(ips(&c.cluster), ["10.1.2.3"]);
    }

    #[test]
    fn no_filtering_without_zone_label_missing_hint_or_no_hint_for_zone() {
        let hinted = vec![
            ep("10.1.2.3", false, true, true, false, &["zone-a"]),
            ep("10.1.2.4", false, true, true, false, &["zone-b"]),
        ];
        let no_zone = NodeTopology {
            node_name: "node-a",
            zone: None,
        };
        let c = categorize(&port(Cluster, Cluster, false), &hinted, no_zone);
        assert_eq!(c.cluster.len(), 2);
        let empty_zone = NodeTopology {
            node_name: "node-a",
            zone: Some(""),
        };
        assert_eq!(
            categorize(&port(Cluster, Cluster, false), &hinted, empty_zone)
                .cluster
                .len(),
            2
        );

        let one_missing = vec![
            ep("10.1.2.3", false, true, true, false, &["zone-a"]),
            ep("10.1.2.4", false, true, true, false, &[]),
        ];
        let c = categorize(&port(Cluster, Cluster, false), &one_missing, NODE);
        assert_eq!(c.cluster.len(), 2);
        assert_eq!(c.topology, TopologyMode::None);

        let other_zones = vec![
            ep("10.1.2.3", false, true, true, false, &["zone-b"]),
            ep("10.1.2.4", false, true, true, false, &["zone-c"]),
        ];
        assert_eq!(
            categorize(&port(Cluster, Cluster, false), &other_zones, NODE)
                .cluster
                .len(),
            2
        );
    }

    #[test]
    fn unready_endpoints_are_excluded_and_ignored_for_hints() {
        let eps = vec![
            ep("10.1.2.3", false, true, true, false, &["zone-a"]),
            ep("10.1.2.4", false, false, false, false, &[]),
        ];
        let c = categorize(&port(Cluster, Cluster, false), &eps, NODE);
        assert_eq!(ips(&c.cluster), ["10.1.2.3"]);
        assert_eq!(
            c.topology,
            TopologyMode::PreferSameZone {
                zone: "zone-a".into()
            }
        );

        // Only unready endpoints in our zone: the mode needs a Ready one hinted for us.
        let eps = vec![
            ep("10.1.2.3", false, false, false, false, &["zone-a"]),
            ep("10.1.2.4", false, true, true, false, &["zone-b"]),
        ];
        let c = categorize(&port(Cluster, Cluster, false), &eps, NODE);
        assert_eq!(ips(&c.cluster), ["10.1.2.4"]);
        assert_eq!(c.topology, TopologyMode::None);
    }

    #[test]
    fn node_hints_prefer_same_node() {
        let mut a = ep("10.1.2.3", true, true, true, false, &["zone-a"]);
        a.node_hints = vec!["node-a".into()];
        let mut b = ep("10.1.2.4", false, true, true, false, &["zone-a"]);
        b.node_hints = vec!["node-b".into()];
        let c = categorize(&port(Cluster, Cluster, false), &[a, b], NODE);
        assert_eq!(ips(&c.cluster), ["10.1.2.3"]);
        assert_eq!(
            c.topology,
            TopologyMode::PreferSameNode {
                node: "node-a".into()
            }
        );
    }

    #[test]
    fn local_policies_are_never_topology_filtered() {
        let eps = vec![
            ep("10.1.2.3", true, true, true, false, &["zone-b"]),
            ep("10.1.2.4", false, true, true, false, &["zone-a"]),
        ];
        let c = categorize(&port(Cluster, Local, true), &eps, NODE);
        assert_eq!(ips(&c.cluster), ["10.1.2.4"]);
        assert_eq!(ips(&c.local), ["10.1.2.3"]);
        // Topology and locality disagree: both sets are reachable.
        assert_eq!(ips(&c.all_reachable), ["10.1.2.3", "10.1.2.4"]);

        let c = categorize(&port(Local, Cluster, false), &eps, NODE);
        assert!(
            c.cluster.is_empty(),
            "iTP=Local without external access uses no cluster endpoints"
        );
        assert_eq!(ips(&c.local), ["10.1.2.3"]);
        assert_eq!(ips(&c.all_reachable), ["10.1.2.3"]);
    }

    #[test]
    fn internal_local_variants() {
        let p = port(Local, Cluster, false);
        let c = categorize(&p, &[], NODE);
        assert!(!c.has_any_endpoints && c.all_reachable.is_empty());

        let remote_only = vec![
            ep("10.0.0.1", false, true, true, false, &[]),
            ep("10.0.0.2", false, true, true, false, &[]),
        ];
        let c = categorize(&p, &remote_only, NODE);
        assert!(
            c.has_any_endpoints,
            "remote endpoints exist: DROP, not REJECT"
        );
        assert!(c.local.is_empty() && c.all_reachable.is_empty());

        let all_local = vec![
            ep("10.0.0.1", true, true, true, false, &[]),
            ep("10.0.0.2", true, true, true, false, &[]),
        ];
        assert_eq!(categorize(&p, &all_local, NODE).local.len(), 2);

        let some_local = vec![
            ep("10.0.0.1", true, true, true, false, &[]),
            ep("10.0.0.2", false, true, true, false, &[]),
        ];
        let c = categorize(&p, &some_local, NODE);
        assert_eq!(ips(&c.local), ["10.0.0.1"]);
        assert_eq!(ips(&c.all_reachable), ["10.0.0.1"]);
    }

    #[test]
    fn cluster_policy_none_ready_and_terminating_fallback() {
        let p = port(Cluster, Cluster, false);
        let not_serving = vec![ep("10.0.0.1", false, false, false, true, &[])];
        let c = categorize(&p, &not_serving, NODE);
        assert!(c.cluster.is_empty() && !c.has_any_endpoints);

        let terminating = vec![
            ep("10.0.0.1", false, false, true, true, &[]),
            ep("10.0.0.2", true, false, true, true, &[]),
            ep("10.0.0.3", false, false, false, true, &[]),
        ];
        let c = categorize(&p, &terminating, NODE);
        assert_eq!(ips(&c.cluster), ["10.0.0.1", "10.0.0.2"]);
        assert!(c.cluster_uses_terminating && c.has_any_endpoints);

        // Ready endpoints win over terminating ones.
        let mixed = vec![
            ep("10.0.0.1", false, true, true, false, &[]),
            ep("10.0.0.2", false, false, true, true, &[]),
        ];
        assert_eq!(ips(&categorize(&p, &mixed, NODE).cluster), ["10.0.0.1"]);
    }

    #[test]
    fn fallbacks_are_decided_independently() {
        // iTP: Cluster, eTP: Local, with a ready remote and a terminating local endpoint.
        let eps = vec![
            ep("10.0.0.1", false, true, true, false, &[]),
            ep("10.0.0.2", true, false, true, true, &[]),
        ];
        let c = categorize(&port(Cluster, Local, true), &eps, NODE);
        assert_eq!(ips(&c.cluster), ["10.0.0.1"]);
        assert_eq!(ips(&c.local), ["10.0.0.2"]);
        assert!(c.local_uses_terminating && !c.cluster_uses_terminating);
        assert_eq!(ips(&c.all_reachable), ["10.0.0.1", "10.0.0.2"]);
    }

    #[test]
    fn both_local_all_remote_and_terminating() {
        let eps = vec![
            ep("10.0.0.1", false, false, true, true, &[]),
            ep("10.0.0.2", false, false, true, true, &[]),
        ];
        let c = categorize(&port(Local, Local, true), &eps, NODE);
        assert_eq!(
            ips(&c.cluster),
            ["10.0.0.1", "10.0.0.2"],
            "externally accessible: short-circuit needs cluster"
        );
        assert!(c.local.is_empty());
        assert!(c.has_any_endpoints);
    }

    #[test]
    fn external_policy_ignored_if_not_externally_accessible() {
        let eps = vec![
            ep("10.0.0.1", true, true, true, false, &[]),
            ep("10.0.0.2", false, true, true, false, &[]),
        ];
        let c = categorize(&port(Cluster, Local, false), &eps, NODE);
        assert!(c.local.is_empty());
        assert_eq!(c.all_reachable.len(), 2);
    }
}
