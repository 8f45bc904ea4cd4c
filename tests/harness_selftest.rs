//! Proves the test harness in `tests/support` against hand-written nftables
//! rules, independently of kproxy: if these pass, a failing kproxy test
//! points at kproxy, not at the namespaces, responders or probes.
//!
//! Run with `sudo -E cargo test --test harness_selftest`.

mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use support::*;

/// DNAT'ed to `rpod1`, port [`TARGET_PORT`]; external clients masqueraded.
const VIP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);
/// Rejected in the forward hook.
const REJECT_VIP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 11);
const REJECT_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x11);
/// Dropped in the forward hook.
const DROP_VIP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 12);
const DROP_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x12);
/// Rejected with "host unreachable" instead of "port unreachable".
const UNREACHABLE_VIP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 14);
const UNREACHABLE_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x14);
/// No rule at all: routed to `ext`, which does not forward.
const UNHANDLED_VIP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 13);
const UNHANDLED_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x13);
/// DNAT'ed to `lpod1` itself, masqueraded when `lpod1` is the client.
const HAIRPIN_VIP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 20);
const HAIRPIN_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x20);
/// Load-balanced over `rpod1` and `rpod2`.
const LB_VIP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 30);
const LB_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x30);

const SVC_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;

/// A miniature kube-proxy: DNAT in prerouting and output, masquerade of
/// external and hairpin traffic, reject and drop in the forward hook.
const SERVICES_RULESET: &str = r#"
table inet selftest {
    chain services {
        ip daddr 172.30.0.10 meta l4proto { tcp, udp, sctp } th dport 80 dnat ip to 10.180.0.1:8080
        ip6 daddr fd00:10:96::10 meta l4proto { tcp, udp, sctp } th dport 80 dnat ip6 to [fd00:10:180::1]:8080
        ip daddr 172.30.0.20 meta l4proto { tcp, udp, sctp } th dport 80 dnat ip to 10.180.2.1:80
        ip6 daddr fd00:10:96::20 meta l4proto { tcp, udp, sctp } th dport 80 dnat ip6 to [fd00:10:180:2::1]:80
    }
    chain nat-prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        jump services
    }
    chain nat-output {
        type nat hook output priority -100; policy accept;
        jump services
    }
    chain nat-postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        ct status dnat ip saddr 203.0.113.0/24 masquerade
        ct status dnat ip6 saddr 2001:db8:ff::/64 masquerade
        ct status dnat ip saddr 10.180.2.1 ip daddr 10.180.2.1 masquerade
        ct status dnat ip6 saddr fd00:10:180:2::1 ip6 daddr fd00:10:180:2::1 masquerade
    }
    chain filter-forward {
        type filter hook forward priority filter; policy accept;
        ip daddr 172.30.0.11 reject
        ip6 daddr fd00:10:96::11 reject
        ip daddr 172.30.0.12 drop
        ip6 daddr fd00:10:96::12 drop
        ip daddr 172.30.0.14 reject with icmpx type host-unreachable
        ip6 daddr fd00:10:96::14 reject with icmpx type host-unreachable
    }
}
"#;

/// Random two-way load balancing, like kproxy's endpoint selection.
const LB_RULESET: &str = r#"
table inet selftest-lb {
    chain nat-prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr 172.30.0.30 meta l4proto { tcp, udp, sctp } th dport 80 dnat ip to numgen random mod 2 map { 0 : 10.180.0.1, 1 : 10.180.0.2 }
        ip6 daddr fd00:10:96::30 meta l4proto { tcp, udp, sctp } th dport 80 dnat ip6 to numgen random mod 2 map { 0 : fd00:10:180::1, 1 : fd00:10:180::2 }
    }
    chain nat-postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        ct status dnat ip saddr 203.0.113.0/24 masquerade
        ct status dnat ip6 saddr 2001:db8:ff::/64 masquerade
    }
}
"#;

/// One expected probe result.
struct Case<'a> {
    what: String,
    ns: &'a Netns,
    proto: Proto,
    src: Option<IpAddr>,
    dst: SocketAddr,
    /// Expected outcome; for `Unreachable` the text is a substring of the
    /// actual description.
    want: Outcome,
}

impl Case<'_> {
    fn matches(&self, got: &Outcome) -> bool {
        match (&self.want, got) {
            (Outcome::Unreachable(want), Outcome::Unreachable(got)) => got.contains(want.as_str()),
            (want, got) => want == got,
        }
    }
}

fn answered(endpoint: SocketAddr, seen_source: impl Into<IpAddr>) -> Outcome {
    Outcome::Answered {
        endpoint,
        seen_source: seen_source.into(),
    }
}

/// Runs all cases concurrently (so the `Dropped` ones cost one timeout in
/// total, not one each) and reports every mismatch at once.
fn check(topo: &Topology, cases: Vec<Case<'_>>) {
    let total = cases.len();
    let results: Vec<(Case<'_>, Outcome)> = std::thread::scope(|scope| {
        let handles: Vec<_> = cases
            .into_iter()
            .map(|case| {
                scope.spawn(move || {
                    let got = probe(case.proto, case.ns, case.src, case.dst);
                    (case, got)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("probe thread panicked"))
            .collect()
    });
    let failures: Vec<String> = results
        .iter()
        .filter(|(case, got)| !case.matches(got))
        .map(|(case, got)| {
            format!(
                "{} [{} {} -> {}]: want {}, got {got}",
                case.what,
                case.proto,
                case.src.map_or("auto".to_string(), |s| s.to_string()),
                case.dst,
                case.want
            )
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {total} probes failed:\n{}\n{}",
        failures.len(),
        failures.join("\n"),
        topo.diagnostics()
    );
}

/// The SCTP checksum must match the kernel's or conntrack marks our packets
/// invalid. Vectors: the CRC-32C check value, and RFC 3720 (iSCSI uses the
/// same CRC and byte order) B.4: 32 zero bytes are sent as `aa 36 91 8a`.
#[test]
fn sctp_crc32c_matches_reference_vectors() {
    assert_eq!(sctp::crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(
        sctp::crc32c(&[0u8; 32]).to_le_bytes(),
        [0xaa, 0x36, 0x91, 0x8a]
    );
    assert_eq!(
        sctp::crc32c(&[0xffu8; 32]).to_le_bytes(),
        [0x43, 0xab, 0xa8, 0x62]
    );
    let ascending: Vec<u8> = (0u8..32).collect();
    assert_eq!(
        sctp::crc32c(&ascending).to_le_bytes(),
        [0x4e, 0x79, 0xdd, 0x46]
    );

    let init = sctp::init(40000, 80, 0xdead_beef);
    let parsed = sctp::Packet::parse(&init).expect("INIT parses");
    assert!(parsed.checksum_ok);
    assert_eq!(
        (
            parsed.src_port,
            parsed.dst_port,
            parsed.vtag,
            parsed.chunk_type
        ),
        (40000, 80, 0, sctp::CHUNK_INIT)
    );
    assert_eq!(parsed.initiate_tag(), Some(0xdead_beef));

    let mut corrupted = init.clone();
    corrupted[20] ^= 1;
    assert!(!sctp::checksum_ok(&corrupted));

    let ack = sctp::init_ack(80, 40000, 0xdead_beef, 7, b"10.0.0.1:80 10.0.0.2\n");
    let parsed = sctp::Packet::parse(&ack).expect("INIT ACK parses");
    assert!(parsed.checksum_ok);
    assert_eq!(parsed.vtag, 0xdead_beef);
    assert_eq!(
        parsed.param(sctp::PARAM_STATE_COOKIE),
        Some(&b"10.0.0.1:80 10.0.0.2\n"[..])
    );
}

/// (a) Without any rules, traffic between pods and from outside reaches the
/// addressed pod and shows the true client address, over every protocol
/// and both families — and no address is left tentative.
#[test]
fn direct_traffic_reaches_pods_with_true_source() {
    if !require_net_admin("direct_traffic_reaches_pods_with_true_source") {
        return;
    }
    let topo = Topology::new();
    for ns in topo.namespaces() {
        let tentative = ns.ip(&["-6", "addr", "show", "tentative"]);
        assert!(tentative.trim().is_empty(), "{}: {tentative}", ns.name());
    }
    let (lpod1, lpod2, rpod1, rpod2) = (
        topo.pod("lpod1"),
        topo.pod("lpod2"),
        topo.pod("rpod1"),
        topo.pod("rpod2"),
    );
    let mut cases = Vec::new();
    for proto in Proto::ALL {
        for v6 in [false, true] {
            let family = if v6 { "v6" } else { "v4" };
            let port = if v6 { 8443 } else { 443 };
            let sa = |pod: &Pod| SocketAddr::new(pod.ip(v6), port);
            let (ext_client, ext_blocked): (IpAddr, IpAddr) = if v6 {
                (EXT_CLIENT6.into(), EXT_CLIENT6_BLOCKED.into())
            } else {
                (EXT_CLIENT.into(), EXT_CLIENT_BLOCKED.into())
            };
            let mut add = |what: &str, ns, src, dst, want| {
                cases.push(Case {
                    what: format!("{what} ({family})"),
                    ns,
                    proto,
                    src,
                    dst,
                    want,
                })
            };
            add(
                "local pod to remote pod",
                lpod1.ns(),
                None,
                sa(rpod1),
                answered(sa(rpod1), lpod1.ip(v6)),
            );
            add(
                "local pod to local pod",
                lpod1.ns(),
                None,
                sa(lpod2),
                answered(sa(lpod2), lpod1.ip(v6)),
            );
            add(
                "remote pod to local pod",
                rpod2.ns(),
                None,
                sa(lpod1),
                answered(sa(lpod1), rpod2.ip(v6)),
            );
            add(
                "remote pod to remote pod",
                rpod2.ns(),
                None,
                sa(rpod1),
                answered(sa(rpod1), rpod2.ip(v6)),
            );
            add(
                "external to remote pod",
                &topo.ext,
                Some(ext_client),
                sa(rpod1),
                answered(sa(rpod1), ext_client),
            );
            add(
                "external to local pod",
                &topo.ext,
                Some(ext_blocked),
                sa(lpod2),
                answered(sa(lpod2), ext_blocked),
            );
            // A port nobody serves is refused by the pod itself.
            let closed = SocketAddr::new(rpod1.ip(v6), 9);
            add("unserved port", lpod1.ns(), None, closed, Outcome::Rejected);
        }
    }
    check(&topo, cases);
}

/// (b) DNAT to a remote pod with a changed port, masquerade of external
/// clients, reject and drop, for TCP, UDP and SCTP over both families.
#[test]
fn dnat_masquerade_reject_and_drop() {
    if !require_net_admin("dnat_masquerade_reject_and_drop") {
        return;
    }
    let topo = Topology::new();
    topo.node.nft(SERVICES_RULESET);
    let (lpod1, rpod1) = (topo.pod("lpod1"), topo.pod("rpod1"));
    let mut cases = Vec::new();
    for proto in Proto::ALL {
        for v6 in [false, true] {
            let family = if v6 { "v6" } else { "v4" };
            let vip = |v4: Ipv4Addr, v6addr: Ipv6Addr| -> SocketAddr {
                if v6 {
                    SocketAddr::from((v6addr, SVC_PORT))
                } else {
                    SocketAddr::from((v4, SVC_PORT))
                }
            };
            let pick = |v4: Ipv4Addr, v6addr: Ipv6Addr| -> IpAddr {
                if v6 {
                    v6addr.into()
                } else {
                    v4.into()
                }
            };
            let endpoint = SocketAddr::new(rpod1.ip(v6), TARGET_PORT);
            let ext_client = pick(EXT_CLIENT, EXT_CLIENT6);
            let node_ip = pick(NODE_IP, NODE_IP6);
            let mut add = |what: &str, ns, src, dst, want| {
                cases.push(Case {
                    what: format!("{what} ({family})"),
                    ns,
                    proto,
                    src,
                    dst,
                    want,
                })
            };
            add(
                "pod to VIP is DNATed, keeps its source",
                lpod1.ns(),
                None,
                vip(VIP, VIP6),
                answered(endpoint, lpod1.ip(v6)),
            );
            add(
                "external to VIP is DNATed and masqueraded",
                &topo.ext,
                Some(ext_client),
                vip(VIP, VIP6),
                answered(endpoint, pick(NODE_ETH1_IP, NODE_ETH1_IP6)),
            );
            add(
                "node itself to VIP (output hook)",
                &topo.node,
                Some(node_ip),
                vip(VIP, VIP6),
                answered(endpoint, node_ip),
            );
            add(
                "pod to rejecting VIP",
                lpod1.ns(),
                None,
                vip(REJECT_VIP, REJECT_VIP6),
                Outcome::Rejected,
            );
            add(
                "external to rejecting VIP",
                &topo.ext,
                Some(ext_client),
                vip(REJECT_VIP, REJECT_VIP6),
                Outcome::Rejected,
            );
            add(
                "pod to dropping VIP",
                lpod1.ns(),
                None,
                vip(DROP_VIP, DROP_VIP6),
                Outcome::Dropped,
            );
            add(
                "pod to host-unreachable VIP",
                lpod1.ns(),
                None,
                vip(UNREACHABLE_VIP, UNREACHABLE_VIP6),
                Outcome::Unreachable("No route to host".into()),
            );
            add(
                "pod to VIP without rules dies at ext",
                lpod1.ns(),
                None,
                vip(UNHANDLED_VIP, UNHANDLED_VIP6),
                Outcome::Dropped,
            );
        }
    }
    check(&topo, cases);

    // Refusals must stay refusals when repeated quickly: no ICMP rate limit
    // may turn them into drops, and TCP must not miss an ICMP error that
    // arrives while connect() still holds the socket (see probe.rs).
    for proto in Proto::ALL {
        for vip in [IpAddr::from(REJECT_VIP), REJECT_VIP6.into()] {
            let tally = probe_many(60, proto, lpod1.ns(), None, (vip, SVC_PORT).into());
            assert!(
                tally.failures.len() == 60
                    && tally.failures.iter().all(|o| *o == Outcome::Rejected),
                "{proto} to {vip}: {tally}"
            );
        }
    }

    // The SCTP answers above prove conntrack accepted our INITs (a bad
    // checksum makes them invalid, and invalid packets are not NATed) and
    // the INIT ACKs (a replied entry): check that from the kernel's side.
    let sctp_entries = topo.node.exec(&["conntrack", "-L", "-p", "sctp"]);
    let dnated = format!("dst={VIP} sport=");
    let reply = format!("src={RPOD1_IP} dst={NODE_ETH1_IP} sport={TARGET_PORT}");
    assert!(
        sctp_entries
            .lines()
            .any(|l| l.contains(&dnated) && l.contains(&reply) && !l.contains("UNREPLIED")),
        "no replied, DNATed and masqueraded SCTP conntrack entry in node:\n{sctp_entries}"
    );
}

/// A pod reaching itself through a VIP: the reply must come back through
/// the node (hairpin mode on the bridge port + br_netfilter), masqueraded
/// to the bridge address; another local pod reaching it through the same
/// VIP keeps its source (bridged traffic is reverse-NATed by br_netfilter).
#[test]
fn hairpin_through_vip() {
    if !require_net_admin("hairpin_through_vip") {
        return;
    }
    let topo = Topology::new();
    topo.node.nft(SERVICES_RULESET);
    let (lpod1, lpod2) = (topo.pod("lpod1"), topo.pod("lpod2"));
    let mut cases = Vec::new();
    for proto in Proto::ALL {
        for v6 in [false, true] {
            let family = if v6 { "v6" } else { "v4" };
            let vip: SocketAddr = if v6 {
                (HAIRPIN_VIP6, SVC_PORT).into()
            } else {
                (HAIRPIN_VIP, SVC_PORT).into()
            };
            let bridge: IpAddr = if v6 {
                NODE_CBR0_IP6.into()
            } else {
                NODE_CBR0_IP.into()
            };
            let endpoint = SocketAddr::new(lpod1.ip(v6), SVC_PORT);
            cases.push(Case {
                what: format!("pod to itself via VIP ({family})"),
                ns: lpod1.ns(),
                proto,
                src: None,
                dst: vip,
                want: answered(endpoint, bridge),
            });
            cases.push(Case {
                what: format!("neighbour pod via VIP ({family})"),
                ns: lpod2.ns(),
                proto,
                src: None,
                dst: vip,
                want: answered(endpoint, lpod2.ip(v6)),
            });
        }
    }
    check(&topo, cases);
}

/// `probe_many` sees every endpoint of a randomly balanced VIP, and tells
/// masqueraded answers from direct ones.
#[test]
fn probe_many_sees_every_endpoint() {
    if !require_net_admin("probe_many_sees_every_endpoint") {
        return;
    }
    let topo = Topology::new();
    topo.node.nft(LB_RULESET);
    let (lpod1, rpod1, rpod2) = (topo.pod("lpod1"), topo.pod("rpod1"), topo.pod("rpod2"));
    // 2^-29 chance per run that 30 random picks all land on one endpoint.
    const N: usize = 30;
    std::thread::scope(|scope| {
        for proto in Proto::ALL {
            for v6 in [false, true] {
                let topo = &topo;
                scope.spawn(move || {
                    let vip: SocketAddr = if v6 {
                        (LB_VIP6, SVC_PORT).into()
                    } else {
                        (LB_VIP, SVC_PORT).into()
                    };
                    let endpoints: BTreeSet<SocketAddr> = [rpod1, rpod2]
                        .iter()
                        .map(|pod| SocketAddr::new(pod.ip(v6), SVC_PORT))
                        .collect();

                    let from_pod = probe_many(N, proto, lpod1.ns(), None, vip);
                    assert!(from_pod.all_answered(), "{proto} from pod: {from_pod}");
                    assert_eq!(
                        from_pod.endpoints, endpoints,
                        "{proto} from pod: {from_pod}"
                    );
                    assert!(!from_pod.masqueraded, "{proto} from pod: {from_pod}");
                    assert_eq!(
                        from_pod.seen_sources,
                        [lpod1.ip(v6)].into(),
                        "{proto}: {from_pod}"
                    );

                    let client: IpAddr = if v6 {
                        EXT_CLIENT6.into()
                    } else {
                        EXT_CLIENT.into()
                    };
                    let from_ext = probe_many(N, proto, &topo.ext, Some(client), vip);
                    assert!(from_ext.all_answered(), "{proto} from ext: {from_ext}");
                    assert_eq!(
                        from_ext.endpoints, endpoints,
                        "{proto} from ext: {from_ext}"
                    );
                    assert!(from_ext.masqueraded, "{proto} from ext: {from_ext}");
                    let node: IpAddr = if v6 {
                        NODE_ETH1_IP6.into()
                    } else {
                        NODE_ETH1_IP.into()
                    };
                    assert_eq!(from_ext.seen_sources, [node].into(), "{proto}: {from_ext}");
                });
            }
        }
    });
}

/// Host-network responders (`Netns::serve` discovers the node's addresses)
/// and background processes run inside the namespace and stop on request.
#[test]
fn host_network_server_and_background_process() {
    if !require_net_admin("host_network_server_and_background_process") {
        return;
    }
    let topo = Topology::without_pods(&[]);
    let server = topo.node.serve(&[10250]);
    assert!(
        server.addrs().contains(&IpAddr::from(NODE_IP_SECONDARY)),
        "node addresses: {:?}",
        server.addrs()
    );
    let mut cases = Vec::new();
    for proto in Proto::ALL {
        for (dst, client) in [
            (IpAddr::from(NODE_IP), IpAddr::from(EXT_IP)),
            (NODE_IP_SECONDARY.into(), EXT_CLIENT.into()),
            (NODE_IP6.into(), EXT_IP6.into()),
        ] {
            cases.push(Case {
                what: "external to host-network server".to_string(),
                ns: &topo.ext,
                proto,
                src: Some(client),
                dst: SocketAddr::new(dst, 10250),
                want: answered(SocketAddr::new(dst, 10250), client),
            });
        }
    }
    check(&topo, cases);
    let sctp_seen = server.sctp_arrivals();
    assert_eq!(sctp_seen.len(), 3, "{sctp_seen:?}");
    assert!(sctp_seen.iter().all(|a| a.served), "{sctp_seen:?}");

    let mut sleeper =
        topo.ext
            .start_process(&["sh", "-c", "ip -br addr show dev lo; exec sleep 60"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !sleeper.log().contains(&EXT_CLIENT.to_string()) {
        assert!(
            std::time::Instant::now() < deadline,
            "process did not run inside ext: {}",
            sleeper.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(sleeper.is_running());
    let status = sleeper.terminate(std::time::Duration::from_secs(5));
    assert!(!status.success(), "sleep ended by SIGTERM: {status}");
}
