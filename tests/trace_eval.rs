//! One source of truth, two views: the scenarios of `tests/packet_flow.rs`, evaluated by
//! `kproxy_nftables::eval` on kproxy's own typed ruleset instead of with real packets,
//! must give the same verdicts, endpoint sets and masquerading the real-traffic tests
//! assert. These run without privileges, in milliseconds.
//!
//! The privileged tests then close the loop with the kernel: the table read back from a
//! node programmed by the `kproxy` binary equals the desired ruleset (demo manifests and
//! more shapes, both families); after a service chain is flushed by hand the live
//! evaluation differs from the desired one, `eval::diff` says how, and real traffic does
//! what the live evaluation predicts.

mod support;

use kproxy::model::{self, ClusterObjects, ProxyConfig, ProxyState};
use kproxy_backend_api::{IpFamily, Protocol};
use kproxy_nftables::eval::{self, Origin, Packet, Ruleset, Summary, Trace};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use support::*;
use Protocol::{Sctp, Tcp, Udp};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 180, 2, 100);
const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x180, 2, 0, 0, 0, 0x100);

fn v4(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}

fn v6(a: Ipv6Addr) -> IpAddr {
    IpAddr::V6(a)
}

/// Where a packet comes from: pods and the external client arrive on an interface, the
/// node sends its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    Pod,
    Node,
    Ext,
}

impl Src {
    fn origin(self) -> Origin {
        match self {
            Src::Node => Origin::Local,
            Src::Pod | Src::Ext => Origin::Forwarded,
        }
    }
}

/// The `node` namespace's addresses in the test topology (lo included).
fn node_addrs() -> BTreeSet<IpAddr> {
    [
        v4(NODE_IP),
        v4(NODE_IP_SECONDARY),
        v4(NODE_ETH1_IP),
        v4(NODE_CBR0_IP),
        v4(Ipv4Addr::LOCALHOST),
        v6(NODE_IP6),
        v6(NODE_IP6_SECONDARY),
        v6(NODE_ETH1_IP6),
        v6(NODE_CBR0_IP6),
        v6(Ipv6Addr::LOCALHOST),
    ]
    .into_iter()
    .collect()
}

/// kproxy's flags as a model config: `detector` is `--cluster-cidr` (both families).
fn config(detector: bool, masquerade_all: bool, nodeport_addresses: &[&str]) -> ProxyConfig {
    let mut cfg = ProxyConfig::new(NODE_NAME);
    if detector {
        cfg.cluster_cidrs = vec![
            CLUSTER_CIDR.parse().expect("cidr"),
            CLUSTER_CIDR6.parse().expect("cidr"),
        ];
    }
    cfg.masquerade_all = masquerade_all;
    cfg.nodeport_addresses = nodeport_addresses.iter().map(|s| s.to_string()).collect();
    cfg
}

fn base() -> ProxyConfig {
    config(true, false, &[])
}

/// The model's state for objects plus the Node and ServiceCIDRs, as `sync_once` feeds
/// the binary.
fn state(objects: &[Value], cfg: &ProxyConfig) -> ProxyState {
    let mut all = vec![node_object(), service_cidr_object()];
    all.extend_from_slice(objects);
    let local: Vec<IpAddr> = node_addrs().into_iter().collect();
    model::build(&cluster_objects(all), cfg, &local)
}

/// The evaluator over both families' rulesets.
struct Oracle {
    rulesets: BTreeMap<IpFamily, Ruleset>,
    local: BTreeSet<IpAddr>,
}

impl Oracle {
    fn desired(st: &ProxyState) -> Oracle {
        Oracle {
            rulesets: st
                .families
                .iter()
                .map(|(f, fam)| (*f, Ruleset::desired(&fam.node, &fam.services)))
                .collect(),
            local: node_addrs(),
        }
    }

    fn of(objects: &[Value], cfg: &ProxyConfig) -> Oracle {
        Oracle::desired(&state(objects, cfg))
    }

    fn trace(&self, from: Src, src: IpAddr, dst: SocketAddr, proto: Protocol) -> Trace {
        let family = IpFamily::of(&dst.ip());
        let p = Packet::new(src, dst, proto, from.origin());
        self.rulesets
            .get(&family)
            .map(|rs| rs.trace(&p, &self.local))
            .unwrap_or_else(|| Ruleset::empty(family).trace(&p, &self.local))
    }
}

/// One flow of a packet-flow scenario, with the real-traffic test's expectation.
struct Case {
    name: String,
    proto: Protocol,
    from: Src,
    src: IpAddr,
    dst: SocketAddr,
    expect: Expect,
}

fn case(
    name: impl Into<String>,
    proto: Protocol,
    from: Src,
    src: impl Into<IpAddr>,
    dst: SocketAddr,
    expect: Expect,
) -> Case {
    Case {
        name: name.into(),
        proto,
        from,
        src: src.into(),
        dst,
        expect,
    }
}

/// Does a trace predict what the real-traffic test expects?
fn agrees(t: &Trace, expect: &Expect) -> Result<(), String> {
    let got = t.summary();
    match (expect, &got) {
        (
            Expect::Endpoints { ips, port, masq },
            Summary::Endpoints {
                endpoints,
                masquerade,
            },
        ) => {
            let want: BTreeSet<IpAddr> = ips.iter().copied().collect();
            let have: BTreeSet<IpAddr> = endpoints.iter().map(SocketAddr::ip).collect();
            if want != have {
                return Err(format!("endpoints {have:?}, expected {want:?}"));
            }
            if let Some(p) = port {
                if endpoints.iter().any(|e| e.port() != *p) {
                    return Err(format!("target ports {endpoints:?}, expected {p}"));
                }
            }
            if *masquerade != Some(*masq) {
                return Err(format!("masquerade {masquerade:?}, expected {masq}"));
            }
            Ok(())
        }
        (Expect::Reject, Summary::Reject) | (Expect::Drop, Summary::Drop) => Ok(()),
        (Expect::Host(ip), Summary::Untouched) if *ip == t.packet.dst => Ok(()),
        _ => Err(format!("got {got:?}, expected {expect:?}")),
    }
}

/// Evaluates every case and panics listing each disagreement with its full trace.
fn check(oracle: &Oracle, cases: &[Case]) {
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| {
            let t = oracle.trace(c.from, c.src, c.dst, c.proto);
            agrees(&t, &c.expect).err().map(|why| {
                format!(
                    "{} ({} {} -> {}): {why}\n{t}",
                    c.name,
                    c.proto.as_str(),
                    c.src,
                    c.dst
                )
            })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases disagree with the real-traffic expectations:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

/// The expectation a trace predicts, in the real-traffic harness's terms.
fn expect_of(t: &Trace) -> Expect {
    match t.summary() {
        Summary::Endpoints {
            endpoints,
            masquerade,
        } => Expect::Endpoints {
            ips: endpoints.iter().map(SocketAddr::ip).collect(),
            port: None,
            masq: masquerade.unwrap_or(false),
        },
        Summary::Reject => Expect::Reject,
        Summary::Drop => Expect::Drop,
        Summary::Untouched => Expect::Host(t.packet.dst),
        other => panic!("no single expectation for {other:?}:\n{t}"),
    }
}

// ---------------------------------------------------------------------------------------
// The scenarios of tests/packet_flow.rs, evaluated.

#[test]
fn no_endpoints_reject() {
    let svc = service("svc1", &["172.30.0.41", "fd00:10:96::41"])
        .port("p80", "TCP", 80, 3001)
        .port("u80", "UDP", 80, 3001)
        .external_ips(&["192.168.99.11"])
        .load_balancer(&["1.2.3.4"])
        .build();
    let o = Oracle::of(&[svc], &base());
    let mut cases = Vec::new();
    for proto in [Tcp, Udp] {
        let p = proto.as_str();
        for (name, from, src, dst) in [
            (
                "pod to ClusterIP",
                Src::Pod,
                v4(CLIENT_IP),
                sa(ip("172.30.0.41"), 80),
            ),
            (
                "ext to externalIP",
                Src::Ext,
                v4(EXT_CLIENT),
                sa(ip("192.168.99.11"), 80),
            ),
            (
                "pod to NodePort",
                Src::Pod,
                v4(CLIENT_IP),
                sa(NODE_IP, 3001),
            ),
            (
                "ext to NodePort",
                Src::Ext,
                v4(EXT_CLIENT),
                sa(NODE_IP, 3001),
            ),
            ("pod to LB", Src::Pod, v4(CLIENT_IP), sa(ip("1.2.3.4"), 80)),
            ("ext to LB", Src::Ext, v4(EXT_CLIENT), sa(ip("1.2.3.4"), 80)),
            (
                "pod to v6 ClusterIP",
                Src::Pod,
                v6(CLIENT_IP6),
                sa(ip("fd00:10:96::41"), 80),
            ),
            (
                "ext to v6 NodePort",
                Src::Ext,
                v6(EXT_CLIENT6),
                sa(NODE_IP6, 3001),
            ),
        ] {
            cases.push(case(
                format!("{name} {p}"),
                proto,
                from,
                src,
                dst,
                Expect::Reject,
            ));
        }
    }
    check(&o, &cases);
    // The words name the service and the map.
    let t = o.trace(Src::Ext, v4(EXT_CLIENT), sa(NODE_IP, 3001), Tcp);
    assert!(
        t.to_string()
            .contains("REJECT: no endpoints for ns/svc1:p80 (no-endpoint-nodeports)"),
        "{t}"
    );
}

#[test]
fn cluster_ip_general() {
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
        service("svc4", &["172.30.0.44"])
            .port("https", "TCP", 443, 0)
            .build(),
        slice(
            "svc4",
            false,
            &[("https", "TCP", 8443)],
            vec![ep(v4(RPOD1_IP), NODE2_NAME), ep(v4(LPOD2_IP), NODE_NAME)],
        ),
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
    let o = Oracle::of(&objects, &base());
    let eps = |ips: &[IpAddr], port: u16| Expect::Endpoints {
        ips: ips.to_vec(),
        port: Some(port),
        masq: false,
    };
    let c = |name: &str, proto, from, src: IpAddr, dst, e| case(name, proto, from, src, dst, e);
    let client = v4(CLIENT_IP);
    check(
        &o,
        &[
            c(
                "simple ClusterIP",
                Tcp,
                Src::Pod,
                client,
                sa(ip("172.30.0.41"), 80),
                reach(&[v4(RPOD1_IP)], false),
            ),
            c(
                "hairpin",
                Tcp,
                Src::Pod,
                v4(LPOD1_IP),
                sa(ip("172.30.0.42"), 80),
                reach(&[v4(LPOD1_IP)], true),
            ),
            c(
                "hairpin v6",
                Tcp,
                Src::Pod,
                v6(LPOD1_IP6),
                sa(ip("fd00:10:96::42"), 80),
                reach(&[v6(LPOD1_IP6)], true),
            ),
            c(
                "two endpoints",
                Tcp,
                Src::Pod,
                client,
                sa(ip("172.30.0.43"), 80),
                reach(&[v4(RPOD1_IP), v4(RPOD2_IP)], false),
            ),
            c(
                "target port",
                Tcp,
                Src::Pod,
                client,
                sa(ip("172.30.0.44"), 443),
                eps(&[v4(RPOD1_IP), v4(LPOD2_IP)], 8443),
            ),
            c(
                "tcp 53",
                Tcp,
                Src::Pod,
                client,
                sa(ip("172.30.0.45"), 53),
                eps(&[v4(RPOD1_IP)], 5353),
            ),
            c(
                "udp 53",
                Udp,
                Src::Pod,
                client,
                sa(ip("172.30.0.45"), 53),
                eps(&[v4(RPOD2_IP)], 53),
            ),
            c(
                "sctp 53",
                Sctp,
                Src::Pod,
                client,
                sa(ip("172.30.0.45"), 53),
                eps(&[v4(LPOD2_IP)], 53),
            ),
            c(
                "UDP to a TCP-only port",
                Udp,
                Src::Pod,
                client,
                sa(ip("172.30.0.41"), 80),
                Expect::Reject,
            ),
            c(
                "SCTP to a TCP-only port",
                Sctp,
                Src::Pod,
                client,
                sa(ip("172.30.0.41"), 80),
                Expect::Reject,
            ),
            c(
                "svc1's IP on svc4's port",
                Tcp,
                Src::Pod,
                client,
                sa(ip("172.30.0.41"), 443),
                Expect::Reject,
            ),
            c(
                "unallocated ClusterIP",
                Tcp,
                Src::Pod,
                client,
                sa(ip("172.30.0.50"), 80),
                Expect::Drop,
            ),
            c(
                "unallocated ClusterIP udp",
                Udp,
                Src::Pod,
                client,
                sa(ip("172.30.0.50"), 80),
                Expect::Drop,
            ),
            c(
                "node to ClusterIP is masqueraded",
                Tcp,
                Src::Node,
                v4(NODE_IP),
                sa(ip("172.30.0.41"), 80),
                reach(&[v4(RPOD1_IP)], true),
            ),
        ],
    );
    // The plain words of the trace.
    let two = o.trace(Src::Pod, client, sa(ip("172.30.0.43"), 80), Tcp);
    let text = two.to_string();
    assert!(
        text.contains(&format!(
            "2 endpoints, 50% each: {}:80, {}:80",
            RPOD1_IP, RPOD2_IP
        )),
        "{text}"
    );
    assert!(
        text.contains("masquerade: no (source 10.180.2.100 is inside the cluster CIDR)"),
        "{text}"
    );
    assert!(
        text.contains("matched service-ips: 172.30.0.43 . tcp . 80 → goto service-"),
        "{text}"
    );
    assert!(text.contains("(ns/two:p80)"), "{text}");
    let hairpin = o.trace(Src::Pod, v4(LPOD1_IP), sa(ip("172.30.0.42"), 80), Tcp);
    assert!(
        hairpin.to_string().contains("masquerade: yes (hairpin"),
        "{hairpin}"
    );
    let wrong = o.trace(Src::Pod, client, sa(ip("172.30.0.41"), 443), Tcp);
    assert!(
        wrong.to_string().contains(
            "REJECT: 172.30.0.41 is a ClusterIP, but no service port tcp/443 is defined on it (cluster-ips-check)"
        ),
        "{wrong}"
    );
    let unallocated = o.trace(Src::Pod, client, sa(ip("172.30.0.50"), 80), Tcp);
    assert!(
        unallocated.to_string().contains(
            "DROP: 172.30.0.50 is inside a service CIDR but is not an allocated ClusterIP"
        ),
        "{unallocated}"
    );
    let j = two.to_json();
    assert_eq!(j["summary"]["kind"], "endpoints");
    assert_eq!(j["outcomes"][1]["probability"], 0.5);
}

#[test]
fn load_balancer_source_ranges() {
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
    let mut o = Oracle::of(&objects, &base());
    let rpod1 = &[v4(RPOD1_IP)];
    let (lb1, lb2) = (sa(ip("1.2.3.4"), 80), sa(ip("5.6.7.8"), 80));
    let (client, ext, blocked, node) = (
        v4(CLIENT_IP),
        v4(EXT_CLIENT),
        v4(EXT_CLIENT_BLOCKED),
        v4(NODE_IP),
    );
    check(
        &o,
        &[
            case(
                "pod to ClusterIP",
                Tcp,
                Src::Pod,
                client,
                sa(ip("172.30.0.41"), 80),
                reach(rpod1, false),
            ),
            case(
                "ext to NodePort",
                Tcp,
                Src::Ext,
                ext,
                sa(NODE_IP, 3001),
                reach(rpod1, true),
            ),
            case(
                "blocked client to NodePort bypasses ranges",
                Tcp,
                Src::Ext,
                blocked,
                sa(NODE_IP, 3001),
                reach(rpod1, true),
            ),
            case(
                "allowed ext to LB1",
                Tcp,
                Src::Ext,
                ext,
                lb1,
                reach(rpod1, true),
            ),
            case(
                "allowed ext to LB2",
                Tcp,
                Src::Ext,
                ext,
                lb2,
                reach(rpod1, true),
            ),
            case(
                "blocked ext to LB1",
                Tcp,
                Src::Ext,
                blocked,
                lb1,
                Expect::Drop,
            ),
            case(
                "blocked ext to LB2",
                Tcp,
                Src::Ext,
                blocked,
                lb2,
                Expect::Drop,
            ),
            case(
                "pod to LB1 (pod CIDR not allowed)",
                Tcp,
                Src::Pod,
                client,
                lb1,
                Expect::Drop,
            ),
            case(
                "node (inside a range) to LB1",
                Tcp,
                Src::Node,
                node,
                lb1,
                reach(rpod1, true),
            ),
            case("node to LB2", Tcp, Src::Node, node, lb2, reach(rpod1, true)),
        ],
    );
    let t = o.trace(Src::Ext, blocked, lb1, Tcp);
    assert!(
        t.to_string()
            .contains("DROP: source 203.0.113.130 not in loadBalancerSourceRanges of ns/svc1:p80"),
        "{t}"
    );
    // A VIP-style LB loops node traffic back with the VIP as source.
    o.local.insert(ip("1.2.3.4"));
    check(
        &o,
        &[case(
            "source = LB IP to the LB",
            Tcp,
            Src::Node,
            ip("1.2.3.4"),
            lb1,
            reach(rpod1, true),
        )],
    );
}

#[test]
fn node_ports_and_nodeport_addresses() {
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
    let both4 = &[v4(RPOD1_IP), v4(RPOD2_IP)];
    let both6 = &[v6(RPOD1_IP6), v6(RPOD2_IP6)];
    let common = |secondary4: Expect, secondary6: Expect| {
        vec![
            case(
                "pod to ClusterIP",
                Tcp,
                Src::Pod,
                CLIENT_IP,
                sa(ip("172.30.0.41"), 80),
                reach(both4, false),
            ),
            case(
                "ext to NodePort",
                Tcp,
                Src::Ext,
                EXT_CLIENT,
                sa(NODE_IP, 3001),
                reach(both4, true),
            ),
            case(
                "node to NodePort",
                Tcp,
                Src::Node,
                NODE_IP,
                sa(NODE_IP, 3001),
                reach(both4, true),
            ),
            case(
                "ext to secondary node IP",
                Tcp,
                Src::Ext,
                EXT_CLIENT,
                sa(NODE_IP_SECONDARY, 3001),
                secondary4,
            ),
            case(
                "pod to v6 ClusterIP",
                Tcp,
                Src::Pod,
                CLIENT_IP6,
                sa(ip("fd00:10:96::41"), 80),
                reach(both6, false),
            ),
            case(
                "ext to v6 NodePort",
                Tcp,
                Src::Ext,
                EXT_CLIENT6,
                sa(NODE_IP6, 3001),
                reach(both6, true),
            ),
            case(
                "node to v6 NodePort",
                Tcp,
                Src::Node,
                NODE_IP6,
                sa(NODE_IP6, 3001),
                reach(both6, true),
            ),
            case(
                "ext to v6 secondary node IP",
                Tcp,
                Src::Ext,
                EXT_CLIENT6,
                sa(NODE_IP6_SECONDARY, 3001),
                secondary6,
            ),
        ]
    };
    // Default: the primary IPs only; the secondary addresses are left alone.
    check(
        &Oracle::of(&objects, &base()),
        &common(
            Expect::Host(v4(NODE_IP_SECONDARY)),
            Expect::Host(v6(NODE_IP6_SECONDARY)),
        ),
    );
    check(
        &Oracle::of(
            &objects,
            &config(true, false, &["192.168.0.0/16", "2001:db8::/32"]),
        ),
        &common(reach(both4, true), reach(both6, true)),
    );
    check(
        &Oracle::of(&objects, &config(true, false, &["192.168.0.2/32", "::/0"])),
        &common(Expect::Host(v4(NODE_IP_SECONDARY)), reach(both6, true)),
    );
    let t = Oracle::of(&objects, &base()).trace(
        Src::Ext,
        v4(EXT_CLIENT),
        sa(NODE_IP_SECONDARY, 3001),
        Tcp,
    );
    assert!(
        t.to_string().contains(
            "ACCEPT, untouched: 192.168.1.2:3001/tcp is not a service address kproxy handles; delivered to this node"
        ),
        "{t}"
    );
}

/// An LB service with one remote (rpod1) and one local (lpod1) endpoint.
fn etp_objects(local: bool) -> Vec<Value> {
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

#[test]
fn external_traffic_policy_local() {
    let o = Oracle::of(&etp_objects(true), &base());
    let both = &[v4(RPOD1_IP), v4(LPOD1_IP)];
    let local = &[v4(LPOD1_IP)];
    let mut cases = Vec::new();
    for proto in [Tcp, Udp] {
        let p = proto.as_str();
        for (name, from, src, dst, e) in [
            (
                "pod to ClusterIP",
                Src::Pod,
                CLIENT_IP,
                sa(ip("172.30.0.41"), 80),
                reach(both, false),
            ),
            (
                "pod to externalIP",
                Src::Pod,
                CLIENT_IP,
                sa(ip("192.168.99.22"), 80),
                reach(both, false),
            ),
            (
                "pod to LB",
                Src::Pod,
                CLIENT_IP,
                sa(ip("1.2.3.4"), 80),
                reach(both, false),
            ),
            (
                "pod to NodePort",
                Src::Pod,
                CLIENT_IP,
                sa(NODE_IP, 3001),
                reach(both, false),
            ),
            (
                "ext to externalIP",
                Src::Ext,
                EXT_CLIENT,
                sa(ip("192.168.99.22"), 80),
                reach(local, false),
            ),
            (
                "ext to LB",
                Src::Ext,
                EXT_CLIENT,
                sa(ip("1.2.3.4"), 80),
                reach(local, false),
            ),
            (
                "ext to NodePort",
                Src::Ext,
                EXT_CLIENT,
                sa(NODE_IP, 3001),
                reach(local, false),
            ),
        ] {
            cases.push(case(format!("{name} {p}"), proto, from, src, dst, e));
        }
    }
    check(&o, &cases);
    let ext = o.trace(Src::Ext, v4(EXT_CLIENT), sa(ip("1.2.3.4"), 80), Tcp);
    let text = ext.to_string();
    assert!(
        text.contains("node-local endpoints only (traffic policy Local)"),
        "{text}"
    );
    assert!(
        text.contains(
            "masquerade: no (externalTrafficPolicy=Local keeps the client's source address)"
        ),
        "{text}"
    );
    let pod = o.trace(Src::Pod, v4(CLIENT_IP), sa(NODE_IP, 3001), Tcp);
    assert!(
        pod.to_string().contains("short-circuit pod traffic"),
        "{pod}"
    );
}

#[test]
fn external_traffic_policy_cluster() {
    let o = Oracle::of(&etp_objects(false), &base());
    let both = &[v4(RPOD1_IP), v4(LPOD1_IP)];
    check(
        &o,
        &[
            case(
                "pod to ClusterIP",
                Tcp,
                Src::Pod,
                CLIENT_IP,
                sa(ip("172.30.0.41"), 80),
                reach(both, false),
            ),
            case(
                "pod to externalIP",
                Tcp,
                Src::Pod,
                CLIENT_IP,
                sa(ip("192.168.99.22"), 80),
                reach(both, true),
            ),
            case(
                "pod to LB",
                Tcp,
                Src::Pod,
                CLIENT_IP,
                sa(ip("1.2.3.4"), 80),
                reach(both, true),
            ),
            case(
                "pod to NodePort",
                Tcp,
                Src::Pod,
                CLIENT_IP,
                sa(NODE_IP, 3001),
                reach(both, true),
            ),
            case(
                "ext to externalIP",
                Tcp,
                Src::Ext,
                EXT_CLIENT,
                sa(ip("192.168.99.22"), 80),
                reach(both, true),
            ),
            case(
                "ext to LB",
                Tcp,
                Src::Ext,
                EXT_CLIENT,
                sa(ip("1.2.3.4"), 80),
                reach(both, true),
            ),
            case(
                "ext to NodePort udp",
                Udp,
                Src::Ext,
                EXT_CLIENT,
                sa(NODE_IP, 3001),
                reach(both, true),
            ),
        ],
    );
    let t = o.trace(Src::Ext, v4(EXT_CLIENT), sa(ip("1.2.3.4"), 80), Tcp);
    assert!(
        t.to_string()
            .contains("masquerade: yes (external traffic with externalTrafficPolicy=Cluster)"),
        "{t}"
    );
}

#[test]
fn internal_traffic_policy_local() {
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
    let cases: Vec<(&str, Vec<Value>, Expect)> = vec![
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
        check(
            &Oracle::of(&objs, &base()),
            &[case(name, Tcp, Src::Pod, CLIENT_IP, cip, expect)],
        );
    }
    check(
        &Oracle::of(&objects(true, vec![l1(), r1()]), &base()),
        &[case(
            "node to iTP=Local ClusterIP",
            Tcp,
            Src::Node,
            NODE_IP,
            cip,
            reach(&[v4(LPOD1_IP)], true),
        )],
    );
    let t =
        Oracle::of(&objects(true, vec![r1()]), &base()).trace(Src::Pod, v4(CLIENT_IP), cip, Tcp);
    assert!(
        t.to_string().contains(
            "DROP: ns/svc1:p80: internalTrafficPolicy is Local and no endpoint runs on this node (no-endpoint-services)"
        ),
        "{t}"
    );
}

#[test]
fn terminating_endpoints() {
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
    let (a, b, c) = (v4(LPOD1_IP), v4(LPOD2_IP), v4(RPOD1_IP));
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
        check(
            &Oracle::of(&objects(local, eps), &base()),
            &[
                case(
                    format!("{name}: pod to ClusterIP"),
                    Tcp,
                    Src::Pod,
                    CLIENT_IP,
                    cip,
                    to_cip,
                ),
                case(
                    format!("{name}: ext to LB"),
                    Tcp,
                    Src::Ext,
                    EXT_CLIENT,
                    lb,
                    to_lb,
                ),
            ],
        );
    }
}

#[test]
fn masquerade_matrix() {
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
    // Expected (endpoints, masq) for the base configuration, as packet_flow.rs has it.
    let base_expect = |src: Src, svc: &str, kind: &str| -> (Vec<IpAddr>, bool) {
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
    let sources = [
        (Src::Pod, v4(CLIENT_IP)),
        (Src::Node, v4(NODE_IP)),
        (Src::Ext, v4(EXT_CLIENT)),
    ];
    for (cfg_name, detector, masquerade_all) in [
        ("base", true, false),
        ("no local-traffic detector", false, false),
        ("masquerade-all", true, true),
        ("masquerade-all, no detector", false, true),
    ] {
        let o = Oracle::of(&objects, &config(detector, masquerade_all, &[]));
        let mut cases = Vec::new();
        for (src, src_ip) in sources {
            for (svc, kind, dst) in targets {
                let (mut eps, mut masq) = base_expect(src, svc, kind);
                let cluster_ip = kind == "ClusterIP";
                if !detector {
                    if cluster_ip && src != Src::Pod {
                        masq = false;
                    }
                    if src == Src::Pod && svc == "etp" && !cluster_ip {
                        eps = local.to_vec();
                        masq = false;
                    }
                }
                if masquerade_all && cluster_ip {
                    masq = true;
                }
                cases.push(case(
                    format!("[{cfg_name}] {src:?}->{svc}/{kind}"),
                    Tcp,
                    src,
                    src_ip,
                    dst,
                    reach(&eps, masq),
                ));
            }
        }
        check(&o, &cases);
    }
}

#[test]
fn session_affinity_is_reported() {
    let objects = vec![
        service("sticky", &["172.30.0.41"])
            .type_("NodePort")
            .port("p80", "TCP", 80, 3001)
            .affinity(600)
            .build(),
        slice(
            "sticky",
            false,
            &[("p80", "TCP", 80)],
            vec![
                ep(v4(RPOD1_IP), NODE2_NAME),
                ep(v4(RPOD2_IP), NODE2_NAME),
                ep(v4(LPOD2_IP), NODE_NAME),
            ],
        ),
    ];
    let o = Oracle::of(&objects, &base());
    let t = o.trace(Src::Pod, v4(CLIENT_IP), sa(ip("172.30.0.41"), 80), Tcp);
    // A new client may land on any endpoint; the trace says affinity then holds it.
    assert_eq!(t.endpoints().len(), 3, "{t}");
    let text = t.to_string();
    assert!(text.contains("3 endpoints, 33.3% each"), "{text}");
    assert!(
        text.contains("note: session affinity (ClientIP) is in effect"),
        "{text}"
    );
    assert!(
        text.contains("session affinity (ClientIP, 600s): the client 10.180.2.100 is remembered"),
        "{text}"
    );
}

#[test]
fn topology_hints() {
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
    let o = Oracle::of(&objects, &base());
    let c = |name: &str, ip4: &str, e| case(name, Tcp, Src::Pod, CLIENT_IP, sa(ip(ip4), 80), e);
    check(
        &o,
        &[
            c("zone hints", "172.30.0.41", reach(&[v4(RPOD1_IP)], false)),
            c(
                "node hints",
                "172.30.0.42",
                reach(&[v4(LPOD2_IP), v4(LPOD1_IP)], false),
            ),
            c(
                "missing hint",
                "172.30.0.43",
                reach(&[v4(RPOD1_IP), v4(RPOD2_IP)], false),
            ),
            c(
                "iTP=Local ignores hints",
                "172.30.0.44",
                reach(&[v4(LPOD2_IP)], false),
            ),
        ],
    );
}

#[test]
fn ipv6_own_table() {
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
    let o = Oracle::of(&objects, &base());
    assert!(
        o.rulesets[&IpFamily::V4]
            .differences(&Ruleset::desired(
                &state(&[], &base()).families[&IpFamily::V4].node,
                &Default::default()
            ))
            .is_empty(),
        "IPv6 objects leaked into the ip table"
    );
    let both = &[v6(RPOD1_IP6), v6(LPOD2_IP6)];
    let c6 = CLIENT_IP6;
    check(
        &o,
        &[
            case(
                "v6 ClusterIP tcp",
                Tcp,
                Src::Pod,
                c6,
                sa(ip("fd00:10:96::41"), 80),
                reach(both, false),
            ),
            case(
                "v6 ClusterIP udp",
                Udp,
                Src::Pod,
                c6,
                sa(ip("fd00:10:96::41"), 53),
                reach(both, false),
            ),
            case(
                "v6 ClusterIP sctp",
                Sctp,
                Src::Pod,
                c6,
                sa(ip("fd00:10:96::41"), 53),
                reach(both, false),
            ),
            case(
                "v6 NodePort from ext",
                Tcp,
                Src::Ext,
                EXT_CLIENT6,
                sa(NODE_IP6, 3001),
                reach(both, true),
            ),
            case(
                "v6 LB from ext",
                Tcp,
                Src::Ext,
                EXT_CLIENT6,
                sa(ip("2001:db8:aa::4"), 80),
                reach(both, true),
            ),
            case(
                "v6 no endpoints",
                Tcp,
                Src::Pod,
                c6,
                sa(ip("fd00:10:96::46"), 80),
                Expect::Reject,
            ),
            case(
                "v6 no endpoints NodePort",
                Tcp,
                Src::Ext,
                EXT_CLIENT6,
                sa(NODE_IP6, 3006),
                Expect::Reject,
            ),
            case(
                "v6 unallocated",
                Tcp,
                Src::Pod,
                c6,
                sa(ip("fd00:10:96::99"), 80),
                Expect::Drop,
            ),
        ],
    );
}

// ---------------------------------------------------------------------------------------
// The kernel's view: live tables read back, drift, and real traffic.

macro_rules! require {
    ($name:expr) => {
        if !require_net_admin($name) {
            return;
        }
    };
}

/// Reads `nft -j list table <family> kproxy` in `ns` into a ruleset.
fn live(ns: &Netns, family: IpFamily) -> Ruleset {
    let kw = match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    };
    let json = ns.exec(&["nft", "-j", "list", "table", kw, "kproxy"]);
    Ruleset::live(&json).unwrap_or_else(|e| panic!("{family} table: {e}\n{json}"))
}

/// Every family's live table equals the desired ruleset.
fn assert_live_equals_desired(ns: &Netns, st: &ProxyState, what: &str) {
    for (family, fam) in &st.families {
        let desired = Ruleset::desired(&fam.node, &fam.services);
        let live = live(ns, *family);
        let d = desired.differences(&live);
        assert!(d.is_empty(), "{what}, {family}: {d:#?}");
        assert_eq!(live, desired, "{what}, {family}");
    }
}

#[test]
fn live_tables_read_back_to_the_desired_ruleset_demo() {
    require!("live_tables_read_back_to_the_desired_ruleset_demo");
    let node = Netns::new("evaldemo");
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo.yaml");
    let out = node
        .command(env!("CARGO_BIN_EXE_kproxy"))
        .args([
            "--manifests",
            demo,
            "--once",
            "--hostname-override",
            "node-a",
        ])
        .args(["--cluster-cidr", "10.0.0.0/8,fd00:10::/64"])
        .output()
        .expect("run kproxy");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = kproxy::manifests::load(std::path::Path::new(demo)).expect("demo manifests");
    let objs = ClusterObjects {
        services: m.services,
        endpoint_slices: m.endpoint_slices,
        nodes: m.nodes,
        service_cidrs: m.service_cidrs,
    };
    let mut cfg = ProxyConfig::new("node-a");
    cfg.cluster_cidrs = vec![
        "10.0.0.0/8".parse().expect("cidr"),
        "fd00:10::/64".parse().expect("cidr"),
    ];
    let st = model::build(&objs, &cfg, &node.addresses());
    assert_live_equals_desired(&node, &st, "demo");
}

#[test]
fn live_tables_read_back_to_the_desired_ruleset_more_shapes() {
    require!("live_tables_read_back_to_the_desired_ruleset_more_shapes");
    let node = Netns::new("evalshape");
    let objects = vec![
        // Affinity, firewall with a range holding the node (VIPs allowed too), NodePort.
        service("sticky", &["172.30.0.41", "fd00:10:96::41"])
            .port("p80", "TCP", 80, 3001)
            .load_balancer(&["1.2.3.4", "2001:db8:aa::4"])
            .source_ranges(&["192.168.0.0/24", "203.0.113.0/25", "2001:db8:ff::/121"])
            .affinity(600)
            .build(),
        slice(
            "sticky",
            false,
            &[("p80", "TCP", 80)],
            vec![ep(v4(RPOD1_IP), NODE2_NAME), ep(v4(LPOD1_IP), NODE_NAME)],
        ),
        slice(
            "sticky",
            true,
            &[("p80", "TCP", 80)],
            vec![ep(v6(RPOD1_IP6), NODE2_NAME)],
        ),
        // eTP=Local with and without a local endpoint; UDP and SCTP.
        service("etp", &["172.30.0.42", "fd00:10:96::42"])
            .port("u53", "UDP", 53, 3002)
            .port("s53", "SCTP", 53, 0)
            .external_ips(&["192.168.99.22"])
            .external_local()
            .build(),
        slice(
            "etp",
            false,
            &[("u53", "UDP", 5353), ("s53", "SCTP", 53)],
            vec![ep(v4(LPOD2_IP), NODE_NAME), ep(v4(RPOD2_IP), NODE2_NAME)],
        ),
        slice(
            "etp",
            true,
            &[("u53", "UDP", 5353), ("s53", "SCTP", 53)],
            vec![ep(v6(RPOD2_IP6), NODE2_NAME)],
        ),
        // iTP=Local without a local endpoint, and a service without endpoints.
        service("itp", &["172.30.0.43"])
            .port("p80", "TCP", 80, 0)
            .internal_local()
            .build(),
        slice(
            "itp",
            false,
            &[("p80", "TCP", 80)],
            vec![ep(v4(RPOD1_IP), NODE2_NAME)],
        ),
        service("empty", &["172.30.0.44", "fd00:10:96::44"])
            .port("p80", "TCP", 80, 3004)
            .build(),
    ];
    let mut args = base_args();
    sync_once(&node, &objects, &args);
    let local: Vec<IpAddr> = node.addresses();
    let mut all = vec![node_object(), service_cidr_object()];
    all.extend_from_slice(&objects);
    let st = model::build(&cluster_objects(all.clone()), &base(), &local);
    assert_live_equals_desired(&node, &st, "base flags");
    // Every local address takes NodePorts (fib daddr type local, not loopback) and every
    // ClusterIP connection is masqueraded; the resync rewrites the same node.
    args.extend([
        "--nodeport-addresses".into(),
        "0.0.0.0/0,::/0".into(),
        "--masquerade-all".into(),
    ]);
    sync_once(&node, &objects, &args);
    let st = model::build(
        &cluster_objects(all),
        &config(true, true, &["0.0.0.0/0", "::/0"]),
        &local,
    );
    assert_live_equals_desired(&node, &st, "nodeport-addresses all, masquerade-all");
}

#[test]
fn flushed_service_chain_is_drift_and_real_traffic_follows_the_live_evaluation() {
    require!("flushed_service_chain_is_drift_and_real_traffic_follows_the_live_evaluation");
    let mut topo = Topology::new();
    topo.add_local_pod("client", CLIENT_IP, CLIENT_IP6);
    let objects = vec![
        service("web", &["172.30.0.41"])
            .port("p80", "TCP", 80, 0)
            .build(),
        slice(
            "web",
            false,
            &[("p80", "TCP", 80)],
            vec![ep(v4(RPOD1_IP), NODE2_NAME), ep(v4(RPOD2_IP), NODE2_NAME)],
        ),
        service("other", &["172.30.0.42"])
            .port("p80", "TCP", 80, 0)
            .build(),
        slice(
            "other",
            false,
            &[("p80", "TCP", 80)],
            vec![ep(v4(RPOD1_IP), NODE2_NAME)],
        ),
    ];
    sync_once(&topo.node, &objects, &base_args());
    let st = state(&objects, &base());
    let fam = &st.families[&IpFamily::V4];
    let desired = Ruleset::desired(&fam.node, &fam.services);
    let local: BTreeSet<IpAddr> = node_addrs();
    let client = topo.pod("client").ns();
    let web = sa(ip("172.30.0.41"), 80);
    let other = sa(ip("172.30.0.42"), 80);
    let packet = |dst| Packet::new(v4(CLIENT_IP), dst, Tcp, Origin::Forwarded);

    // In sync: the live evaluation is the desired one, and real packets agree with it.
    let before = live(&topo.node, IpFamily::V4);
    assert!(desired.differences(&before).is_empty());
    let want_web = desired.trace(&packet(web), &local);
    let live_web = before.trace(&packet(web), &local);
    assert_eq!(eval::diff(&want_web, &live_web), None);
    check_flows(
        &topo,
        &[flow(
            "web, in sync",
            Proto::Tcp,
            client,
            CLIENT_IP,
            web,
            expect_of(&live_web),
        )],
    );

    // Flush web's service chain behind kproxy's back.
    let chain = desired
        .chains
        .keys()
        .find(|c| c.as_str().starts_with("service-") && c.as_str().ends_with("-ns/web/tcp/p80"))
        .expect("web's service chain")
        .to_string();
    topo.node
        .exec(&["nft", "flush", "chain", "ip", "kproxy", &chain]);
    let after = live(&topo.node, IpFamily::V4);
    let d = desired.differences(&after);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert!(
        d[0].starts_with(&format!("chain {chain}: rules differ")),
        "{d:#?}"
    );

    let drifted = after.trace(&packet(web), &local);
    assert_eq!(drifted.summary(), Summary::Reject, "{drifted:#}");
    let report = eval::diff(&want_web, &drifted).expect("the flush changes web's fate");
    let text = report.to_string();
    assert!(
        text.contains("drift for 10.180.2.100 → 172.30.0.41:80/tcp (ns/web:p80)"),
        "{text}"
    );
    assert!(
        text.contains("intended: ACCEPT → 10.180.0.1:80, masquerade no (50%)"),
        "{text}"
    );
    assert!(text.contains("kernel:   REJECT (100%)"), "{text}");
    assert!(
        text.contains(
            "because:  172.30.0.41 is a ClusterIP, but no service port tcp/80 is defined on it"
        ),
        "{text}"
    );
    // The other service is untouched, in the evaluation and on the wire; web really is
    // rejected now, as the live evaluation predicts.
    let want_other = desired.trace(&packet(other), &local);
    let live_other = after.trace(&packet(other), &local);
    assert_eq!(eval::diff(&want_other, &live_other), None);
    check_flows(
        &topo,
        &[
            flow(
                "web, flushed",
                Proto::Tcp,
                client,
                CLIENT_IP,
                web,
                expect_of(&drifted),
            ),
            flow(
                "other, untouched",
                Proto::Tcp,
                client,
                CLIENT_IP,
                other,
                expect_of(&live_other),
            ),
        ],
    );

    // A resync repairs it.
    sync_once(&topo.node, &objects, &base_args());
    assert!(desired
        .differences(&live(&topo.node, IpFamily::V4))
        .is_empty());
}
