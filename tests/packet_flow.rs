//! Packet-flow tests: kproxy programs a node (in a network namespace) from manifests, and
//! real TCP, UDP and SCTP packets from pods, the node itself and an external client show
//! who answers, whether the source was masqueraded, and REJECT (fails fast) vs DROP
//! (times out). The cases follow upstream kube-proxy's nftables packet-flow tests.
//!
//! Needs root, iproute2 and nftables; skips with a notice otherwise (fails under CI=true).

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use support::*;
use Proto::{Sctp, Tcp, Udp};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 180, 2, 100);
const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x180, 2, 0, 0, 0, 0x100);

/// The standard topology plus a local client pod that is never an endpoint, so
/// pod-sourced flows are not hairpins.
fn topology() -> Topology {
    let mut t = Topology::new();
    t.add_local_pod("client", CLIENT_IP, CLIENT_IP6);
    t
}

fn v4(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}

fn v6(a: Ipv6Addr) -> IpAddr {
    IpAddr::V6(a)
}

macro_rules! require {
    ($name:expr) => {
        if !require_net_admin($name) {
            return;
        }
    };
}

/// reference §5.2 case 2: a Service with no endpoints rejects on every address.
#[test]
fn no_endpoints_reject() {
    require!("no_endpoints_reject");
    let topo = topology();
    let svc = service("svc1", &["172.30.0.41", "fd00:10:96::41"])
        .port("p80", "TCP", 80, 3001)
        .port("u80", "UDP", 80, 3001)
        .external_ips(&["192.168.99.11"])
        .load_balancer(&["1.2.3.4"])
        .build();
    sync_once(&topo.node, &[svc], &base_args());
    // The node's own listeners on the NodePort: without kproxy's REJECT they would
    // answer, so "rejected" below really is kproxy's verdict, not a closed port.
    let _host = topo.node.serve_on(&[v4(NODE_IP), v6(NODE_IP6)], &[3001]);
    let pod = topo.pod("client").ns();
    let ext = &topo.ext;
    let mut flows = Vec::new();
    for proto in [Tcp, Udp] {
        let p = proto.as_str();
        flows.extend([
            flow(
                format!("pod to ClusterIP {p}"),
                proto,
                pod,
                CLIENT_IP,
                sa(ip("172.30.0.41"), 80),
                Expect::Reject,
            ),
            flow(
                format!("ext to externalIP {p}"),
                proto,
                ext,
                EXT_CLIENT,
                sa(ip("192.168.99.11"), 80),
                Expect::Reject,
            ),
            flow(
                format!("pod to NodePort {p}"),
                proto,
                pod,
                CLIENT_IP,
                sa(NODE_IP, 3001),
                Expect::Reject,
            ),
            flow(
                format!("ext to NodePort {p}"),
                proto,
                ext,
                EXT_CLIENT,
                sa(NODE_IP, 3001),
                Expect::Reject,
            ),
            flow(
                format!("pod to LB {p}"),
                proto,
                pod,
                CLIENT_IP,
                sa(ip("1.2.3.4"), 80),
                Expect::Reject,
            ),
            flow(
                format!("ext to LB {p}"),
                proto,
                ext,
                EXT_CLIENT,
                sa(ip("1.2.3.4"), 80),
                Expect::Reject,
            ),
            flow(
                format!("pod to v6 ClusterIP {p}"),
                proto,
                pod,
                CLIENT_IP6,
                sa(ip("fd00:10:96::41"), 80),
                Expect::Reject,
            ),
            flow(
                format!("ext to v6 NodePort {p}"),
                proto,
                ext,
                EXT_CLIENT6,
                sa(NODE_IP6, 3001),
                Expect::Reject,
            ),
        ]);
    }
    check_flows(&topo, &flows);
}

/// reference §5.2 case 3: ClusterIP basics, hairpin, target ports, per-protocol
/// endpoints, wrong protocol or port (REJECT) and unallocated addresses (DROP).
#[test]
fn cluster_ip_general() {
    require!("cluster_ip_general");
    let topo = topology();
    let objects = vec![
        service("svc1", &["172.30.0.41"])
            .port("p80", "TCP", 80, 0)
            .build(),
        slice(
            "svc1",
            false,
            &[("p80", "TCP", 80)],
            vec![ep(v4(RPOD1_IP), NODE2_NAME)],
        ),
        // Hairpin: lpod1 is the only endpoint and talks to its own service.
        service("hairpin", &["172.30.0.42", "fd00:10:96::42"])
            .port("p80", "TCP", 80, 0)
            .build(),
        slice(
            "hairpin",
            false,
            &[("p80", "TCP", 80)],
            vec![ep(v4(LPOD1_IP), NODE_NAME)],
        ),
        slice(
            "hairpin",
            true,
            &[("p80", "TCP", 80)],
            vec![ep(v6(LPOD1_IP6), NODE_NAME)],
        ),
        service("two", &["172.30.0.43"])
            .port("p80", "TCP", 80, 0)
            .build(),
        slice(
            "two",
            false,
            &[("p80", "TCP", 80)],
            vec![ep(v4(RPOD1_IP), NODE2_NAME), ep(v4(RPOD2_IP), NODE2_NAME)],
        ),
        // Target port differs from the service port.
        service("svc4", &["172.30.0.44"])
            .port("https", "TCP", 443, 0)
            .build(),
        slice(
            "svc4",
            false,
            &[("https", "TCP", 8443)],
            vec![ep(v4(RPOD1_IP), NODE2_NAME), ep(v4(LPOD2_IP), NODE_NAME)],
        ),
        // One port number, three protocols, each with its own endpoint.
        service("dns", &["172.30.0.45"])
            .port("dns-tcp", "TCP", 53, 0)
            .port("dns-udp", "UDP", 53, 0)
            .port("dns-sctp", "SCTP", 53, 0)
            .build(),
        slice(
            "dns",
            false,
            &[("dns-tcp", "TCP", 5353)],
            vec![ep(v4(RPOD1_IP), NODE2_NAME)],
        ),
        slice(
            "dns",
            false,
            &[("dns-udp", "UDP", 53)],
            vec![ep(v4(RPOD2_IP), NODE2_NAME)],
        ),
        slice(
            "dns",
            false,
            &[("dns-sctp", "SCTP", 53)],
            vec![ep(v4(LPOD2_IP), NODE_NAME)],
        ),
    ];
    sync_once(&topo.node, &objects, &base_args());
    let client = topo.pod("client").ns();
    let lpod1 = topo.pod("lpod1").ns();
    let flows = vec![
        flow(
            "simple ClusterIP",
            Tcp,
            client,
            CLIENT_IP,
            sa(ip("172.30.0.41"), 80),
            reach(&[v4(RPOD1_IP)], false),
        ),
        flow(
            "hairpin",
            Tcp,
            lpod1,
            LPOD1_IP,
            sa(ip("172.30.0.42"), 80),
            reach(&[v4(LPOD1_IP)], true),
        ),
        flow(
            "hairpin v6",
            Tcp,
            lpod1,
            LPOD1_IP6,
            sa(ip("fd00:10:96::42"), 80),
            reach(&[v6(LPOD1_IP6)], true),
        ),
        flow(
            "two endpoints",
            Tcp,
            client,
            CLIENT_IP,
            sa(ip("172.30.0.43"), 80),
            reach(&[v4(RPOD1_IP), v4(RPOD2_IP)], false),
        ),
        flow(
            "target port",
            Tcp,
            client,
            CLIENT_IP,
            sa(ip("172.30.0.44"), 443),
            Expect::Endpoints {
                ips: vec![v4(RPOD1_IP), v4(LPOD2_IP)],
                port: Some(8443),
                masq: false,
            },
        ),
        flow(
            "tcp 53",
            Tcp,
            client,
            CLIENT_IP,
            sa(ip("172.30.0.45"), 53),
            Expect::Endpoints {
                ips: vec![v4(RPOD1_IP)],
                port: Some(5353),
                masq: false,
            },
        ),
        flow(
            "udp 53",
            Udp,
            client,
            CLIENT_IP,
            sa(ip("172.30.0.45"), 53),
            Expect::Endpoints {
                ips: vec![v4(RPOD2_IP)],
                port: Some(53),
                masq: false,
            },
        ),
        flow(
            "sctp 53",
            Sctp,
            client,
            CLIENT_IP,
            sa(ip("172.30.0.45"), 53),
            Expect::Endpoints {
                ips: vec![v4(LPOD2_IP)],
                port: Some(53),
                masq: false,
            },
        ),
        flow(
            "UDP to a TCP-only port",
            Udp,
            client,
            CLIENT_IP,
            sa(ip("172.30.0.41"), 80),
            Expect::Reject,
        ),
        flow(
            "SCTP to a TCP-only port",
            Sctp,
            client,
            CLIENT_IP,
            sa(ip("172.30.0.41"), 80),
            Expect::Reject,
        ),
        flow(
            "svc1's IP on svc4's port",
            Tcp,
            client,
            CLIENT_IP,
            sa(ip("172.30.0.41"), 443),
            Expect::Reject,
        ),
        flow(
            "unallocated ClusterIP",
            Tcp,
            client,
            CLIENT_IP,
            sa(ip("172.30.0.50"), 80),
            Expect::Drop,
        ),
        flow(
            "unallocated ClusterIP udp",
            Udp,
            client,
            CLIENT_IP,
            sa(ip("172.30.0.50"), 80),
            Expect::Drop,
        ),
        flow(
            "node to ClusterIP is masqueraded",
            Tcp,
            &topo.node,
            NODE_IP,
            sa(ip("172.30.0.41"), 80),
            reach(&[v4(RPOD1_IP)], true),
        ),
    ];
    check_flows(&topo, &flows);
}

/// reference §5.2 case 4: LoadBalancerSourceRanges.
#[test]
fn load_balancer_source_ranges() {
    require!("load_balancer_source_ranges");
    let topo = topology();
    let objects = vec![
        service("svc1", &["172.30.0.41"])
            .port("p80", "TCP", 80, 3001)
            .load_balancer(&["1.2.3.4", "5.6.7.8"])
            .source_ranges(&["192.168.0.0/24", " 203.0.113.0/25"])
            .build(),
        slice(
            "svc1",
            false,
            &[("p80", "TCP", 80)],
            vec![ep(v4(RPOD1_IP), NODE2_NAME)],
        ),
    ];
    sync_once(&topo.node, &objects, &base_args());
    let client = topo.pod("client").ns();
    let (ext, node) = (&topo.ext, &topo.node);
    let rpod1 = &[v4(RPOD1_IP)];
    let lb1 = sa(ip("1.2.3.4"), 80);
    let lb2 = sa(ip("5.6.7.8"), 80);
    let flows = vec![
        flow(
            "pod to ClusterIP",
            Tcp,
            client,
            CLIENT_IP,
            sa(ip("172.30.0.41"), 80),
            reach(rpod1, false),
        ),
        flow(
            "ext to NodePort",
            Tcp,
            ext,
            EXT_CLIENT,
            sa(NODE_IP, 3001),
            reach(rpod1, true),
        ),
        flow(
            "blocked client to NodePort bypasses ranges",
            Tcp,
            ext,
            EXT_CLIENT_BLOCKED,
            sa(NODE_IP, 3001),
            reach(rpod1, true),
        ),
        flow(
            "allowed ext to LB1",
            Tcp,
            ext,
            EXT_CLIENT,
            lb1,
            reach(rpod1, true),
        ),
        flow(
            "allowed ext to LB2",
            Tcp,
            ext,
            EXT_CLIENT,
            lb2,
            reach(rpod1, true),
        ),
        flow(
            "blocked ext to LB1",
            Tcp,
            ext,
            EXT_CLIENT_BLOCKED,
            lb1,
            Expect::Drop,
        ),
        flow(
            "blocked ext to LB2",
            Tcp,
            ext,
            EXT_CLIENT_BLOCKED,
            lb2,
            Expect::Drop,
        ),
        flow(
            "pod to LB1 (pod CIDR not allowed)",
            Tcp,
            client,
            CLIENT_IP,
            lb1,
            Expect::Drop,
        ),
        flow(
            "node (inside a range) to LB1",
            Tcp,
            node,
            NODE_IP,
            lb1,
            reach(rpod1, true),
        ),
        flow("node to LB2", Tcp, node, NODE_IP, lb2, reach(rpod1, true)),
    ];
    check_flows(&topo, &flows);

    // A VIP-style LB loops node traffic back with the VIP as source: allowed because a
    // range contains the node IP.
    topo.node.ip(&["addr", "add", "1.2.3.4/32", "dev", "lo"]);
    check_flows(
        &topo,
        &[flow(
            "source = LB IP to the LB",
            Tcp,
            node,
            ip("1.2.3.4"),
            lb1,
            reach(rpod1, true),
        )],
    );
}

/// reference §5.2 case 5: NodePorts on --nodeport-addresses, both families.
#[test]
fn node_ports_and_nodeport_addresses() {
    require!("node_ports_and_nodeport_addresses");
    let topo = topology();
    // The node's own listeners on the secondary addresses prove "not touched".
    let _host = topo
        .node
        .serve_on(&[v4(NODE_IP_SECONDARY), v6(NODE_IP6_SECONDARY)], &[3001]);
    let objects = vec![
        service("svc1", &["172.30.0.41", "fd00:10:96::41"])
            .type_("NodePort")
            .port("p80", "TCP", 80, 3001)
            .build(),
        slice(
            "svc1",
            false,
            &[("p80", "TCP", 80)],
            vec![ep(v4(RPOD1_IP), NODE2_NAME), ep(v4(RPOD2_IP), NODE2_NAME)],
        ),
        slice(
            "svc1",
            true,
            &[("p80", "TCP", 80)],
            vec![ep(v6(RPOD1_IP6), NODE2_NAME), ep(v6(RPOD2_IP6), NODE2_NAME)],
        ),
    ];
    let client = topo.pod("client").ns();
    let (ext, node) = (&topo.ext, &topo.node);
    let both4 = &[v4(RPOD1_IP), v4(RPOD2_IP)];
    let both6 = &[v6(RPOD1_IP6), v6(RPOD2_IP6)];
    let common = |secondary4: Expect, secondary6: Expect| {
        vec![
            flow(
                "pod to ClusterIP",
                Tcp,
                client,
                CLIENT_IP,
                sa(ip("172.30.0.41"), 80),
                reach(both4, false),
            ),
            flow(
                "ext to NodePort",
                Tcp,
                ext,
                EXT_CLIENT,
                sa(NODE_IP, 3001),
                reach(both4, true),
            ),
            flow(
                "node to NodePort",
                Tcp,
                node,
                NODE_IP,
                sa(NODE_IP, 3001),
                reach(both4, true),
            ),
            flow(
                "ext to secondary node IP",
                Tcp,
                ext,
                EXT_CLIENT,
                sa(NODE_IP_SECONDARY, 3001),
                secondary4,
            ),
            flow(
                "pod to v6 ClusterIP",
                Tcp,
                client,
                CLIENT_IP6,
                sa(ip("fd00:10:96::41"), 80),
                reach(both6, false),
            ),
            flow(
                "ext to v6 NodePort",
                Tcp,
                ext,
                EXT_CLIENT6,
                sa(NODE_IP6, 3001),
                reach(both6, true),
            ),
            flow(
                "node to v6 NodePort",
                Tcp,
                node,
                NODE_IP6,
                sa(NODE_IP6, 3001),
                reach(both6, true),
            ),
            flow(
                "ext to v6 secondary node IP",
                Tcp,
                ext,
                EXT_CLIENT6,
                sa(NODE_IP6_SECONDARY, 3001),
                secondary6,
            ),
        ]
    };
    // Default: the primary IPs only.
    sync_once(node, &objects, &base_args());
    check_flows(
        &topo,
        &common(
            Expect::Host(v4(NODE_IP_SECONDARY)),
            Expect::Host(v6(NODE_IP6_SECONDARY)),
        ),
    );
    // CIDRs covering both node addresses of each family.
    let mut args = base_args();
    args.extend([
        "--nodeport-addresses".into(),
        "192.168.0.0/16,2001:db8::/32".into(),
    ]);
    sync_once(node, &objects, &args);
    check_flows(&topo, &common(reach(both4, true), reach(both6, true)));
    // Only the primary IPv4 address; IPv6 NodePorts everywhere.
    let mut args = base_args();
    args.extend(["--nodeport-addresses".into(), "192.168.0.2/32,::/0".into()]);
    sync_once(node, &objects, &args);
    check_flows(
        &topo,
        &common(Expect::Host(v4(NODE_IP_SECONDARY)), reach(both6, true)),
    );
}

/// An LB service with one remote (rpod1) and one local (lpod1) endpoint.
fn etp_objects(local: bool) -> Vec<serde_json::Value> {
    let mut svc = service("svc1", &["172.30.0.41"])
        .port("p80", "TCP", 80, 3001)
        .port("u80", "UDP", 80, 3001)
        .external_ips(&["192.168.99.22"])
        .load_balancer(&["1.2.3.4"]);
    if local {
        svc = svc.external_local();
    }
    vec![
        svc.build(),
        slice(
            "svc1",
            false,
            &[("p80", "TCP", 80), ("u80", "UDP", 80)],
            vec![ep(v4(RPOD1_IP), NODE2_NAME), ep(v4(LPOD1_IP), NODE_NAME)],
        ),
    ]
}

/// reference §5.2 case 6: eTP=Local preserves the client source and uses only local
/// endpoints for external traffic; pods are short-circuited to every endpoint.
#[test]
fn external_traffic_policy_local() {
    require!("external_traffic_policy_local");
    let topo = topology();
    sync_once(&topo.node, &etp_objects(true), &base_args());
    let client = topo.pod("client").ns();
    let ext = &topo.ext;
    let both = &[v4(RPOD1_IP), v4(LPOD1_IP)];
    let local = &[v4(LPOD1_IP)];
    let mut flows = Vec::new();
    for proto in [Tcp, Udp] {
        let p = proto.as_str();
        flows.extend([
            flow(
                format!("pod to ClusterIP {p}"),
                proto,
                client,
                CLIENT_IP,
                sa(ip("172.30.0.41"), 80),
                reach(both, false),
            ),
            flow(
                format!("pod to externalIP {p}"),
                proto,
                client,
                CLIENT_IP,
                sa(ip("192.168.99.22"), 80),
                reach(both, false),
            ),
            flow(
                format!("pod to LB {p}"),
                proto,
                client,
                CLIENT_IP,
                sa(ip("1.2.3.4"), 80),
                reach(both, false),
            ),
            flow(
                format!("pod to NodePort {p}"),
                proto,
                client,
                CLIENT_IP,
                sa(NODE_IP, 3001),
                reach(both, false),
            ),
            flow(
                format!("ext to externalIP {p}"),
                proto,
                ext,
                EXT_CLIENT,
                sa(ip("192.168.99.22"), 80),
                reach(local, false),
            ),
            flow(
                format!("ext to LB {p}"),
                proto,
                ext,
                EXT_CLIENT,
                sa(ip("1.2.3.4"), 80),
                reach(local, false),
            ),
            flow(
                format!("ext to NodePort {p}"),
                proto,
                ext,
                EXT_CLIENT,
                sa(NODE_IP, 3001),
                reach(local, false),
            ),
        ]);
    }
    check_flows(&topo, &flows);
}

/// reference §5.2 case 7: eTP=Cluster masquerades external traffic to every endpoint.
#[test]
fn external_traffic_policy_cluster() {
    require!("external_traffic_policy_cluster");
    let topo = topology();
    sync_once(&topo.node, &etp_objects(false), &base_args());
    let client = topo.pod("client").ns();
    let ext = &topo.ext;
    let both = &[v4(RPOD1_IP), v4(LPOD1_IP)];
    let flows = vec![
        flow(
            "pod to ClusterIP",
            Tcp,
            client,
            CLIENT_IP,
            sa(ip("172.30.0.41"), 80),
            reach(both, false),
        ),
        flow(
            "pod to externalIP",
            Tcp,
            client,
            CLIENT_IP,
            sa(ip("192.168.99.22"), 80),
            reach(both, true),
        ),
        flow(
            "pod to LB",
            Tcp,
            client,
            CLIENT_IP,
            sa(ip("1.2.3.4"), 80),
            reach(both, true),
        ),
        flow(
            "pod to NodePort",
            Tcp,
            client,
            CLIENT_IP,
            sa(NODE_IP, 3001),
            reach(both, true),
        ),
        flow(
            "ext to externalIP",
            Tcp,
            ext,
            EXT_CLIENT,
            sa(ip("192.168.99.22"), 80),
            reach(both, true),
        ),
        flow(
            "ext to LB",
            Tcp,
            ext,
            EXT_CLIENT,
            sa(ip("1.2.3.4"), 80),
            reach(both, true),
        ),
        flow(
            "ext to NodePort udp",
            Udp,
            ext,
            EXT_CLIENT,
            sa(NODE_IP, 3001),
            reach(both, true),
        ),
    ];
    check_flows(&topo, &flows);
}

/// reference §5.2 case 14: internalTrafficPolicy=Local.
#[test]
fn internal_traffic_policy_local() {
    require!("internal_traffic_policy_local");
    let topo = topology();
    let client = topo.pod("client").ns();
    let cip = sa(ip("172.30.0.41"), 80);
    let objects = |local: bool, eps: Vec<Ep>| {
        let mut svc = service("svc1", &["172.30.0.41"]).port("p80", "TCP", 80, 0);
        if local {
            svc = svc.internal_local();
        }
        let mut v = vec![svc.build()];
        if !eps.is_empty() {
            v.push(slice("svc1", false, &[("p80", "TCP", 80)], eps));
        }
        v
    };
    let l1 = || ep(v4(LPOD1_IP), NODE_NAME);
    let l2 = || ep(v4(LPOD2_IP), NODE_NAME);
    let r1 = || ep(v4(RPOD1_IP), NODE2_NAME);
    let cases: Vec<(&str, Vec<serde_json::Value>, Expect)> = vec![
        (
            "iTP=Cluster uses every endpoint",
            objects(false, vec![l1(), l2(), r1()]),
            reach(&[v4(LPOD1_IP), v4(LPOD2_IP), v4(RPOD1_IP)], false),
        ),
        (
            "iTP=Local with one local endpoint",
            objects(true, vec![l1(), r1()]),
            reach(&[v4(LPOD1_IP)], false),
        ),
        (
            "iTP=Local with two local endpoints",
            objects(true, vec![l1(), l2(), r1()]),
            reach(&[v4(LPOD1_IP), v4(LPOD2_IP)], false),
        ),
        (
            "iTP=Local with no local endpoint drops",
            objects(true, vec![r1()]),
            Expect::Drop,
        ),
        (
            "iTP=Local, slice deleted: reject",
            objects(true, vec![]),
            Expect::Reject,
        ),
    ];
    for (name, objs, expect) in cases {
        sync_once(&topo.node, &objs, &base_args());
        check_flows(&topo, &[flow(name, Tcp, client, CLIENT_IP, cip, expect)]);
    }
    // Node traffic to a ClusterIP is still masqueraded under iTP=Local.
    sync_once(&topo.node, &objects(true, vec![l1(), r1()]), &base_args());
    check_flows(
        &topo,
        &[flow(
            "node to iTP=Local ClusterIP",
            Tcp,
            &topo.node,
            NODE_IP,
            cip,
            reach(&[v4(LPOD1_IP)], true),
        )],
    );
}

/// reference §5.2 cases 15 and 16: terminating endpoints under eTP=Local and Cluster.
#[test]
fn terminating_endpoints() {
    require!("terminating_endpoints");
    let topo = topology();
    let client = topo.pod("client").ns();
    let ext = &topo.ext;
    let cip = sa(ip("172.30.0.41"), 80);
    let lb = sa(ip("1.2.3.4"), 80);
    let l1 = || ep(v4(LPOD1_IP), NODE_NAME);
    let l2 = || ep(v4(LPOD2_IP), NODE_NAME);
    let r1 = || ep(v4(RPOD1_IP), NODE2_NAME);
    let r2 = || ep(v4(RPOD2_IP), NODE2_NAME);
    let objects = |local: bool, eps: Vec<Ep>| {
        let mut svc = service("svc1", &["172.30.0.41"])
            .port("p80", "TCP", 80, 3001)
            .load_balancer(&["1.2.3.4"]);
        if local {
            svc = svc.external_local();
        }
        let mut v = vec![svc.build()];
        if !eps.is_empty() {
            v.push(slice("svc1", false, &[("p80", "TCP", 80)], eps));
        }
        v
    };
    let (a, b, c, d) = (v4(LPOD1_IP), v4(LPOD2_IP), v4(RPOD1_IP), v4(RPOD2_IP));
    let _ = d;
    // (policy Local?, endpoints, pod->ClusterIP, ext->LB)
    let cases: Vec<(&str, bool, Vec<Ep>, Expect, Expect)> = vec![
        (
            "eTP=Local, ready endpoints exist",
            true,
            vec![l1(), l2().terminating(), r1(), r2().gone()],
            reach(&[a, c], false),
            reach(&[a], false),
        ),
        (
            "eTP=Local, only terminating local endpoints",
            true,
            vec![l1().terminating(), l2().terminating(), r1(), r2().gone()],
            reach(&[c], false),
            reach(&[a, b], false),
        ),
        (
            "eTP=Local, terminating only on a remote node",
            true,
            vec![l1().gone(), r1().terminating()],
            reach(&[c], false),
            Expect::Drop,
        ),
        (
            "eTP=Local, nothing serving",
            true,
            vec![l1().gone(), l2().gone(), r1().gone()],
            Expect::Reject,
            Expect::Reject,
        ),
        (
            "eTP=Local, slice deleted",
            true,
            vec![],
            Expect::Reject,
            Expect::Reject,
        ),
        (
            "eTP=Cluster, ready endpoints exist",
            false,
            vec![l1(), l2().terminating(), r1(), r2().gone()],
            reach(&[a, c], false),
            reach(&[a, c], true),
        ),
        (
            "eTP=Cluster, only terminating endpoints",
            false,
            vec![
                l1().terminating(),
                l2().terminating(),
                r1().terminating(),
                r2().gone(),
            ],
            reach(&[a, b, c], false),
            reach(&[a, b, c], true),
        ),
        (
            "eTP=Cluster, terminating only on a remote node",
            false,
            vec![l1().gone(), r1().terminating()],
            reach(&[c], false),
            reach(&[c], true),
        ),
        (
            "eTP=Cluster, nothing serving",
            false,
            vec![l1().gone(), r1().gone()],
            Expect::Reject,
            Expect::Reject,
        ),
        (
            "eTP=Cluster, slice deleted",
            false,
            vec![],
            Expect::Reject,
            Expect::Reject,
        ),
    ];
    for (name, local, eps, to_cip, to_lb) in cases {
        sync_once(&topo.node, &objects(local, eps), &base_args());
        check_flows(
            &topo,
            &[
                flow(
                    format!("{name}: pod to ClusterIP"),
                    Tcp,
                    client,
                    CLIENT_IP,
                    cip,
                    to_cip,
                ),
                flow(
                    format!("{name}: ext to LB"),
                    Tcp,
                    ext,
                    EXT_CLIENT,
                    lb,
                    to_lb,
                ),
            ],
        );
    }
}

/// reference §5.2 case 17: who is masqueraded, for {pod, node, external} × {ClusterIP,
/// NodePort, LB} × {plain, eTP=Local, iTP=Local}, under four configurations.
#[test]
fn masquerade_matrix() {
    require!("masquerade_matrix");
    let topo = topology();
    let objects = vec![
        service("plain", &["172.30.0.41"])
            .port("p80", "TCP", 80, 3001)
            .load_balancer(&["1.2.3.4"])
            .build(),
        slice(
            "plain",
            false,
            &[("p80", "TCP", 80)],
            vec![ep(v4(LPOD1_IP), NODE_NAME), ep(v4(RPOD1_IP), NODE2_NAME)],
        ),
        service("etp", &["172.30.0.42"])
            .port("p80", "TCP", 80, 3002)
            .load_balancer(&["5.6.7.8"])
            .external_local()
            .build(),
        slice(
            "etp",
            false,
            &[("p80", "TCP", 80)],
            vec![ep(v4(LPOD1_IP), NODE_NAME), ep(v4(RPOD1_IP), NODE2_NAME)],
        ),
        service("itp", &["172.30.0.43"])
            .port("p80", "TCP", 80, 3003)
            .load_balancer(&["9.10.11.12"])
            .internal_local()
            .build(),
        slice(
            "itp",
            false,
            &[("p80", "TCP", 80)],
            vec![ep(v4(LPOD1_IP), NODE_NAME), ep(v4(RPOD1_IP), NODE2_NAME)],
        ),
    ];
    let all = [v4(LPOD1_IP), v4(RPOD1_IP)];
    let local = [v4(LPOD1_IP)];
    #[derive(Clone, Copy, PartialEq)]
    enum Src {
        Pod,
        Node,
        Ext,
    }
    // Expected (endpoints, masq) for the base configuration, per flow.
    let base = |src: Src, svc: &str, kind: &str| -> (Vec<IpAddr>, bool) {
        let external_kind = kind != "ClusterIP";
        match (src, svc, external_kind) {
            (Src::Pod, "itp", false) => (local.to_vec(), false),
            (Src::Pod, _, false) => (all.to_vec(), false),
            (Src::Pod, "etp", true) => (all.to_vec(), false),
            (Src::Pod, _, true) => (all.to_vec(), true),
            (Src::Node, "itp", false) => (local.to_vec(), true),
            (Src::Node, _, _) => (all.to_vec(), true),
            (Src::Ext, "itp", false) => (local.to_vec(), true),
            (Src::Ext, "etp", true) => (local.to_vec(), false),
            (Src::Ext, _, _) => (all.to_vec(), true),
        }
    };
    let targets = [
        ("plain", "ClusterIP", sa(ip("172.30.0.41"), 80)),
        ("plain", "NodePort", sa(NODE_IP, 3001)),
        ("plain", "LB", sa(ip("1.2.3.4"), 80)),
        ("etp", "ClusterIP", sa(ip("172.30.0.42"), 80)),
        ("etp", "NodePort", sa(NODE_IP, 3002)),
        ("etp", "LB", sa(ip("5.6.7.8"), 80)),
        ("itp", "ClusterIP", sa(ip("172.30.0.43"), 80)),
        ("itp", "NodePort", sa(NODE_IP, 3003)),
        ("itp", "LB", sa(ip("9.10.11.12"), 80)),
    ];
    let sources: [(Src, &Netns, IpAddr); 3] = [
        (Src::Pod, topo.pod("client").ns(), v4(CLIENT_IP)),
        (Src::Node, &topo.node, v4(NODE_IP)),
        (Src::Ext, &topo.ext, v4(EXT_CLIENT)),
    ];
    for (config, detector, masquerade_all) in [
        ("base", true, false),
        ("no local-traffic detector", false, false),
        ("masquerade-all", true, true),
        ("masquerade-all, no detector", false, true),
    ] {
        let mut args = vec!["--hostname-override".to_string(), NODE_NAME.to_string()];
        if detector {
            args.extend([
                "--cluster-cidr".into(),
                format!("{CLUSTER_CIDR},{CLUSTER_CIDR6}"),
            ]);
        }
        if masquerade_all {
            args.push("--masquerade-all".into());
        }
        sync_once(&topo.node, &objects, &args);
        let mut flows = Vec::new();
        for (src, ns, src_ip) in &sources {
            for (svc, kind, dst) in &targets {
                let (mut eps, mut masq) = base(*src, svc, kind);
                let cluster_ip = *kind == "ClusterIP";
                if !detector {
                    // Without a detector nothing tells pods from outsiders: ClusterIP
                    // traffic is not masqueraded, and pods get no eTP short-circuit.
                    if cluster_ip && *src != Src::Pod {
                        masq = false;
                    }
                    if *src == Src::Pod && *svc == "etp" && !cluster_ip {
                        eps = local.to_vec();
                        masq = false;
                    }
                }
                if masquerade_all && cluster_ip {
                    masq = true;
                }
                let name = format!(
                    "[{config}] {:?}->{svc}/{kind}",
                    match src {
                        Src::Pod => "pod",
                        Src::Node => "node",
                        Src::Ext => "ext",
                    }
                );
                flows.push(flow(name, Tcp, ns, *src_ip, *dst, reach(&eps, masq)));
            }
        }
        check_flows(&topo, &flows);
    }
}

/// sessionAffinity: ClientIP keeps a client on one endpoint; other clients still spread.
#[test]
fn session_affinity_client_ip() {
    require!("session_affinity_client_ip");
    let topo = topology();
    let objects = vec![
        service("sticky", &["172.30.0.41"])
            .type_("NodePort")
            .port("p80", "TCP", 80, 3001)
            .port("u53", "UDP", 53, 0)
            .affinity(600)
            .build(),
        slice(
            "sticky",
            false,
            &[("p80", "TCP", 80), ("u53", "UDP", 53)],
            vec![
                ep(v4(RPOD1_IP), NODE2_NAME),
                ep(v4(RPOD2_IP), NODE2_NAME),
                ep(v4(LPOD2_IP), NODE_NAME),
            ],
        ),
    ];
    sync_once(&topo.node, &objects, &base_args());
    for (proto, dst) in [
        (Tcp, sa(ip("172.30.0.41"), 80)),
        (Udp, sa(ip("172.30.0.41"), 53)),
    ] {
        let tally = Probe::new(proto, topo.pod("client").ns(), dst)
            .from(v4(CLIENT_IP))
            .run_many(30);
        assert!(tally.all_answered(), "{tally}");
        assert_eq!(
            tally.endpoints.len(),
            1,
            "one client must stick to one endpoint: {tally}"
        );
    }
    let tally = Probe::tcp(&topo.ext, sa(NODE_IP, 3001))
        .from(v4(EXT_CLIENT))
        .run_many(20);
    assert!(
        tally.all_answered() && tally.endpoints.len() == 1,
        "NodePort affinity: {tally}"
    );
    // A different client may land elsewhere, but also sticks.
    let t2 = Probe::tcp(topo.pod("lpod1").ns(), sa(ip("172.30.0.41"), 80))
        .from(v4(LPOD1_IP))
        .run_many(20);
    assert!(t2.all_answered() && t2.endpoints.len() == 1, "{t2}");
}

/// Topology-aware routing: zone hints and node hints restrict cluster traffic; Local
/// policies ignore them.
#[test]
fn topology_hints() {
    require!("topology_hints");
    let topo = topology();
    let objects = vec![
        service("zonal", &["172.30.0.41"])
            .port("p80", "TCP", 80, 0)
            .build(),
        slice(
            "zonal",
            false,
            &[("p80", "TCP", 80)],
            vec![
                ep(v4(RPOD1_IP), NODE2_NAME).zone_hints(&["zone-a"]),
                ep(v4(RPOD2_IP), NODE2_NAME).zone_hints(&["zone-b"]),
                ep(v4(LPOD2_IP), NODE_NAME).zone_hints(&["zone-b"]),
            ],
        ),
        service("nodal", &["172.30.0.42"])
            .port("p80", "TCP", 80, 0)
            .build(),
        slice(
            "nodal",
            false,
            &[("p80", "TCP", 80)],
            vec![
                ep(v4(RPOD1_IP), NODE2_NAME).node_hints(&[NODE2_NAME]),
                ep(v4(LPOD2_IP), NODE_NAME).node_hints(&[NODE_NAME]),
                ep(v4(LPOD1_IP), NODE_NAME).node_hints(&[NODE_NAME]),
            ],
        ),
        // A missing hint disables topology: every endpoint is used.
        service("partial", &["172.30.0.43"])
            .port("p80", "TCP", 80, 0)
            .build(),
        slice(
            "partial",
            false,
            &[("p80", "TCP", 80)],
            vec![
                ep(v4(RPOD1_IP), NODE2_NAME).zone_hints(&["zone-a"]),
                ep(v4(RPOD2_IP), NODE2_NAME),
            ],
        ),
        // iTP=Local ignores hints: the local endpoint hinted for another zone is used.
        service("local", &["172.30.0.44"])
            .port("p80", "TCP", 80, 0)
            .internal_local()
            .build(),
        slice(
            "local",
            false,
            &[("p80", "TCP", 80)],
            vec![
                ep(v4(LPOD2_IP), NODE_NAME).zone_hints(&["zone-b"]),
                ep(v4(RPOD1_IP), NODE2_NAME).zone_hints(&["zone-a"]),
            ],
        ),
    ];
    sync_once(&topo.node, &objects, &base_args());
    let client = topo.pod("client").ns();
    let flows = vec![
        flow(
            "zone hints",
            Tcp,
            client,
            CLIENT_IP,
            sa(ip("172.30.0.41"), 80),
            reach(&[v4(RPOD1_IP)], false),
        ),
        flow(
            "node hints",
            Tcp,
            client,
            CLIENT_IP,
            sa(ip("172.30.0.42"), 80),
            reach(&[v4(LPOD2_IP), v4(LPOD1_IP)], false),
        ),
        flow(
            "missing hint",
            Tcp,
            client,
            CLIENT_IP,
            sa(ip("172.30.0.43"), 80),
            reach(&[v4(RPOD1_IP), v4(RPOD2_IP)], false),
        ),
        flow(
            "iTP=Local ignores hints",
            Tcp,
            client,
            CLIENT_IP,
            sa(ip("172.30.0.44"), 80),
            reach(&[v4(LPOD2_IP)], false),
        ),
    ];
    check_flows(&topo, &flows);
}

/// IPv6 lives in its own table: ClusterIP (TCP, UDP, SCTP), NodePort, LB and no-endpoint
/// REJECT through `ip6 kproxy`.
#[test]
fn ipv6_own_table() {
    require!("ipv6_own_table");
    let topo = topology();
    let objects = vec![
        service("web", &["fd00:10:96::41"])
            .port("p80", "TCP", 80, 3001)
            .port("u53", "UDP", 53, 0)
            .port("s53", "SCTP", 53, 0)
            .load_balancer(&["2001:db8:aa::4"])
            .build(),
        slice(
            "web",
            true,
            &[("p80", "TCP", 80), ("u53", "UDP", 53), ("s53", "SCTP", 53)],
            vec![ep(v6(RPOD1_IP6), NODE2_NAME), ep(v6(LPOD2_IP6), NODE_NAME)],
        ),
        service("empty", &["fd00:10:96::46"])
            .type_("NodePort")
            .port("p80", "TCP", 80, 3006)
            .build(),
    ];
    sync_once(&topo.node, &objects, &base_args());
    // A listener on the no-endpoints NodePort proves the REJECT is kproxy's.
    let _host = topo.node.serve_on(&[v6(NODE_IP6)], &[3006]);
    let tables = topo.node.exec(&["nft", "list", "tables"]);
    assert!(tables.contains("table ip6 kproxy"), "{tables}");
    let v4_table = topo.node.exec(&["nft", "list", "table", "ip", "kproxy"]);
    assert!(
        !v4_table.contains("fd00:10:96"),
        "IPv6 objects leaked into the ip table"
    );
    let client = topo.pod("client").ns();
    let ext = &topo.ext;
    let both = &[v6(RPOD1_IP6), v6(LPOD2_IP6)];
    let flows = vec![
        flow(
            "v6 ClusterIP tcp",
            Tcp,
            client,
            CLIENT_IP6,
            sa(ip("fd00:10:96::41"), 80),
            reach(both, false),
        ),
        flow(
            "v6 ClusterIP udp",
            Udp,
            client,
            CLIENT_IP6,
            sa(ip("fd00:10:96::41"), 53),
            reach(both, false),
        ),
        flow(
            "v6 ClusterIP sctp",
            Sctp,
            client,
            CLIENT_IP6,
            sa(ip("fd00:10:96::41"), 53),
            reach(both, false),
        ),
        flow(
            "v6 NodePort from ext",
            Tcp,
            ext,
            EXT_CLIENT6,
            sa(NODE_IP6, 3001),
            reach(both, true),
        ),
        flow(
            "v6 LB from ext",
            Tcp,
            ext,
            EXT_CLIENT6,
            sa(ip("2001:db8:aa::4"), 80),
            reach(both, true),
        ),
        flow(
            "v6 no endpoints",
            Tcp,
            client,
            CLIENT_IP6,
            sa(ip("fd00:10:96::46"), 80),
            Expect::Reject,
        ),
        flow(
            "v6 no endpoints NodePort",
            Tcp,
            ext,
            EXT_CLIENT6,
            sa(NODE_IP6, 3006),
            Expect::Reject,
        ),
        flow(
            "v6 unallocated",
            Tcp,
            client,
            CLIENT_IP6,
            sa(ip("fd00:10:96::99"), 80),
            Expect::Drop,
        ),
    ];
    check_flows(&topo, &flows);
}

/// Bad input on a real node: the invalid objects are skipped by name and everything
/// else carries traffic.
#[test]
fn invalid_objects_do_not_block_the_rest() {
    require!("invalid_objects_do_not_block_the_rest");
    let topo = topology();
    let mut bad_ip = service("bad-ip", &["172.30.0.42"])
        .port("p80", "TCP", 80, 0)
        .build();
    bad_ip["spec"]["externalIPs"] = serde_json::json!(["192.168.99.300"]);
    let mut bad_proto = service("bad-proto", &["172.30.0.43"])
        .port("p80", "TCP", 80, 0)
        .build();
    bad_proto["spec"]["ports"][0]["protocol"] = serde_json::json!("ICMP");
    let mut bad_slice = slice(
        "bad-proto",
        false,
        &[("p80", "TCP", 80)],
        vec![ep(v4(RPOD2_IP), NODE2_NAME)],
    );
    bad_slice["ports"][0]["port"] = serde_json::json!(99999);
    let objects = vec![
        service("good", &["172.30.0.41"])
            .port("p80", "TCP", 80, 0)
            .build(),
        slice(
            "good",
            false,
            &[("p80", "TCP", 80)],
            vec![ep(v4(RPOD1_IP), NODE2_NAME)],
        ),
        bad_ip,
        slice(
            "bad-ip",
            false,
            &[("p80", "TCP", 80)],
            vec![ep(v4(RPOD2_IP), NODE2_NAME)],
        ),
        bad_proto,
        bad_slice,
    ];
    let log = sync_once(&topo.node, &objects, &base_args());
    assert!(
        log.contains("Service ns/bad-ip") && log.contains("192.168.99.300"),
        "{log}"
    );
    assert!(log.contains("Service ns/bad-proto"), "{log}");
    assert!(log.contains("EndpointSlice ns/bad-proto-"), "{log}");
    let client = topo.pod("client").ns();
    check_flows(
        &topo,
        &[
            flow(
                "good service works",
                Tcp,
                client,
                CLIENT_IP,
                sa(ip("172.30.0.41"), 80),
                reach(&[v4(RPOD1_IP)], false),
            ),
            // Not programmed at all: inside the ServiceCIDR and unallocated, so dropped.
            flow(
                "skipped service is not half-programmed",
                Tcp,
                client,
                CLIENT_IP,
                sa(ip("172.30.0.42"), 80),
                Expect::Drop,
            ),
        ],
    );
}
