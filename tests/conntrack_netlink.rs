//! UDP conntrack cleanup against the real kernel: kproxy programs a node (in a network
//! namespace), clients send real UDP datagrams from fixed source ports so conntrack pins
//! their flows, and [`cleanup_stale_udp`] — called on a ctnetlink socket opened inside the
//! node namespace — must delete exactly the entries that pin a flow to a removed endpoint
//! or to nowhere, so that the very next datagram of the same flow is load-balanced again.
//!
//! Needs root, iproute2, nftables and conntrack-tools; skips with a notice otherwise (fails
//! under CI=true). The root namespace's conntrack table is never touched.

mod support;

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use kproxy::conntrack::{cleanup_stale_udp, CleanupReport, Conntrack, ConntrackEntry};
use kproxy::model::{ClusterObjects, ProxyConfig};
use kproxy_backend_api::{IpFamily, ServicePlans};
use serde_json::Value;
use support::server::parse_reply;
use support::*;

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 180, 2, 100);
const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x180, 2, 0, 0, 0, 0x100);

/// How long a client waits for an answer before calling the datagram dropped.
const ANSWER_TIMEOUT: Duration = Duration::from_millis(700);

macro_rules! require {
    ($name:expr) => {
        if !require_net_admin($name) {
            return;
        }
    };
}

fn v4(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}

fn v6(a: Ipv6Addr) -> IpAddr {
    IpAddr::V6(a)
}

/// The standard topology plus a local client pod that is never an endpoint.
fn topology() -> Topology {
    let mut t = Topology::new();
    t.add_local_pod("client", CLIENT_IP, CLIENT_IP6);
    t
}

/// A UDP "connection" from a fixed source address and port, like a resolver's: every
/// datagram belongs to the same conntrack flow.
struct Client {
    socket: UdpSocket,
    src: SocketAddr,
    dst: SocketAddr,
}

/// What one datagram experienced.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// Answered by this endpoint address.
    By(SocketAddr),
    /// ICMP port unreachable.
    Refused,
    /// Nothing came back.
    Dropped,
    Other(String),
}

impl Client {
    /// Binds `src` inside `ns` (the socket stays in that namespace) and connects to `dst`.
    fn new(ns: &Netns, src: SocketAddr, dst: SocketAddr) -> Client {
        let socket = ns.in_ns(move || {
            let s = UdpSocket::bind(src).unwrap_or_else(|e| panic!("bind {src}: {e}"));
            s.connect(dst)
                .unwrap_or_else(|e| panic!("connect {src} -> {dst}: {e}"));
            s.set_read_timeout(Some(ANSWER_TIMEOUT))
                .expect("read timeout");
            s
        });
        Client { socket, src, dst }
    }

    /// Sends one datagram and waits for the answer.
    fn ask(&self) -> Answer {
        // Forget late answers and queued errors of earlier datagrams.
        self.socket.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 256];
        while !matches!(self.socket.recv(&mut buf), Err(e) if e.kind() == ErrorKind::WouldBlock) {}
        self.socket.set_nonblocking(false).expect("blocking");
        if let Err(e) = self.socket.send(b"conntrack test\n") {
            return classify(e);
        }
        match self.socket.recv(&mut buf) {
            Ok(n) => match parse_reply(&String::from_utf8_lossy(&buf[..n])) {
                Some((endpoint, _seen)) => Answer::By(endpoint),
                None => Answer::Other(format!("unexpected reply {:?}", &buf[..n])),
            },
            Err(e) => classify(e),
        }
    }

    /// Asks `n` times; panics unless every answer is `want`.
    fn expect(&self, n: usize, want: &Answer, topo: &Topology, context: &str) {
        for i in 0..n {
            let got = self.ask();
            assert_eq!(
                &got,
                want,
                "{context}: datagram {i} of {} -> {} \n{}",
                self.src,
                self.dst,
                topo.node.diagnostics()
            );
        }
    }

    /// The answering endpoint's IP; panics on anything else. A first datagram may be
    /// lost while neighbours are resolved, so a drop is retried.
    fn endpoint_ip(&self, topo: &Topology) -> IpAddr {
        let mut answer = self.ask();
        for _ in 0..2 {
            if answer != Answer::Dropped {
                break;
            }
            answer = self.ask();
        }
        match answer {
            Answer::By(ep) => ep.ip(),
            other => panic!(
                "{} -> {}: expected an answer, got {other:?}\n{}",
                self.src,
                self.dst,
                topo.node.diagnostics()
            ),
        }
    }
}

fn classify(e: std::io::Error) -> Answer {
    match e.kind() {
        ErrorKind::ConnectionRefused => Answer::Refused,
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Answer::Dropped,
        _ => Answer::Other(e.to_string()),
    }
}

/// A ctnetlink handle of `ns`'s conntrack table: opened on a thread inside `ns`, used
/// from the test thread.
fn conntrack_of(ns: &Netns) -> Conntrack {
    ns.in_ns(|| Conntrack::open().expect("open ctnetlink socket"))
}

/// The plans kproxy builds for `objects` (plus the Node and ServiceCIDR objects
/// `sync_once` adds), for one family: exactly what the reconciler will hand the cleanup.
fn plans_for(objects: &[Value], family: IpFamily) -> ServicePlans {
    let mut all = vec![node_object(), service_cidr_object()];
    all.extend_from_slice(objects);
    let m = kproxy::manifests::load(&write_manifest(&all)).expect("load manifests");
    let objects = ClusterObjects {
        services: m.services,
        endpoint_slices: m.endpoint_slices,
        nodes: m.nodes,
        service_cidrs: m.service_cidrs,
    };
    let mut cfg = ProxyConfig::new(NODE_NAME);
    cfg.cluster_cidrs = vec![
        CLUSTER_CIDR.parse().expect("cidr"),
        CLUSTER_CIDR6.parse().expect("cidr"),
    ];
    let state = kproxy::model::build(&objects, &cfg, &[v4(NODE_IP), v6(NODE_IP6)]);
    assert!(
        state.invalid.is_empty(),
        "invalid objects: {:?}",
        state.invalid
    );
    state
        .families
        .get(&family)
        .map(|f| f.services.clone())
        .unwrap_or_default()
}

/// The entry of the flow from `src`, if conntrack has one.
fn entry_from(ct: &mut Conntrack, src: SocketAddr) -> Option<ConntrackEntry> {
    let family = IpFamily::of(&src.ip());
    let entries = ct.list(family).expect("list conntrack");
    let mut matching = entries.into_iter().filter(|e| e.orig_src == src);
    let first = matching.next();
    assert!(matching.next().is_none(), "several entries from {src}");
    first
}

fn cleanup(ct: &mut Conntrack, family: IpFamily, plans: &ServicePlans) -> CleanupReport {
    let report = cleanup_stale_udp(ct, family, plans).expect("cleanup");
    eprintln!("cleanup {family}: {report:?}");
    report
}

/// A pinned UDP flow keeps going to an endpoint removed from its service until the
/// cleanup deletes its entry; then the same flow (same source port) reaches the endpoint
/// that is left.
fn stale_endpoint_case(ipv6: bool) {
    let topo = topology();
    let family = if ipv6 { IpFamily::V6 } else { IpFamily::V4 };
    let (vip, client_ip) = if ipv6 {
        (ip("fd00:10:96::71"), v6(CLIENT_IP6))
    } else {
        (ip("172.30.0.71"), v4(CLIENT_IP))
    };
    let endpoints = [topo.pod("rpod1").ip(ipv6), topo.pod("rpod2").ip(ipv6)];
    let objects = |eps: &[IpAddr]| {
        vec![
            service("dns", &[&vip.to_string()])
                .port("dns", "UDP", 53, 0)
                .build(),
            slice(
                "dns",
                ipv6,
                &[("dns", "UDP", 53)],
                eps.iter().map(|&e| ep(e, NODE2_NAME)).collect(),
            ),
        ]
    };
    sync_once(&topo.node, &objects(&endpoints), &base_args());

    let client = Client::new(
        topo.pod("client").ns(),
        SocketAddr::new(client_ip, 42001),
        SocketAddr::new(vip, 53),
    );
    let pinned = client.endpoint_ip(&topo);
    client.expect(
        3,
        &Answer::By(SocketAddr::new(pinned, 53)),
        &topo,
        "pinned flow",
    );
    let kept = *endpoints
        .iter()
        .find(|&&e| e != pinned)
        .expect("two endpoints");

    let mut ct = conntrack_of(&topo.node);
    let entry = entry_from(&mut ct, client.src).expect("the flow has a conntrack entry");
    assert_eq!(entry.orig_dst, client.dst, "{entry:?}");
    assert_eq!(entry.reply_src, SocketAddr::new(pinned, 53), "{entry:?}");

    // Remove the endpoint the flow is pinned to.
    let after = objects(&[kept]);
    sync_once(&topo.node, &after, &base_args());
    let plans = plans_for(&after, family);

    if entry_from(&mut ct, client.src).is_some() {
        // Without cleanup the flow still goes to the removed endpoint.
        client.expect(
            3,
            &Answer::By(SocketAddr::new(pinned, 53)),
            &topo,
            "stale entry before cleanup",
        );
        let report = cleanup(&mut ct, family, &plans);
        assert_eq!((report.stale, report.deleted), (1, 1), "{report:?}");
        assert!(report.listed >= 1, "{report:?}");
        assert!(entry_from(&mut ct, client.src).is_none(), "entry survived");
    } else {
        // kproxy --once already ran the cleanup itself (the reconciler calls it after a
        // sync): the stale state cannot be shown, only its absence.
        eprintln!("kproxy --once already deleted the stale entry");
    }
    client.expect(
        3,
        &Answer::By(SocketAddr::new(kept, 53)),
        &topo,
        "after cleanup",
    );
    // The new entry points at a serving endpoint: a second cleanup leaves it alone.
    let again = cleanup(&mut ct, family, &plans);
    assert_eq!(again.deleted, 0, "{again:?}");
    let entry = entry_from(&mut ct, client.src).expect("new entry");
    assert_eq!(entry.reply_src, SocketAddr::new(kept, 53), "{entry:?}");
    client.expect(
        1,
        &Answer::By(SocketAddr::new(kept, 53)),
        &topo,
        "second cleanup",
    );
}

#[test]
fn stale_endpoint_entry_is_deleted_and_the_flow_moves() {
    require!("stale_endpoint_entry_is_deleted_and_the_flow_moves");
    stale_endpoint_case(false);
}

#[test]
fn stale_endpoint_entry_is_deleted_and_the_flow_moves_ipv6() {
    require!("stale_endpoint_entry_is_deleted_and_the_flow_moves_ipv6");
    stale_endpoint_case(true);
}

/// Black holes on this kernel and ruleset.
///
/// * Traffic to a service with no endpoints is rejected (or, for iTP=Local without a
///   local endpoint, dropped) in a filter hook, *before* conntrack confirms the entry:
///   nothing is left behind, so there is nothing to clean.
/// * Traffic that arrives before a service exists is not: a NodePort datagram is
///   delivered to the node itself (ICMP port unreachable) and an external-IP datagram is
///   routed on un-NATed; both leave a confirmed entry whose reply source is the original
///   destination. Once the service is programmed, new flows are DNATed but these keep
///   bypassing NAT until the cleanup deletes them.
#[test]
fn black_hole_entries_are_deleted_once_the_service_has_endpoints() {
    require!("black_hole_entries_are_deleted_once_the_service_has_endpoints");
    let topo = topology();
    let pod = topo.pod("client").ns();
    let rpod1 = topo.pod("rpod1").ipv4;
    let no_endpoints = service("empty", &["172.30.0.82"])
        .type_("NodePort")
        .port("dns", "UDP", 53, 30082)
        .build();
    let local_only = service("local", &["172.30.0.83"])
        .port("dns", "UDP", 53, 0)
        .internal_local()
        .build();
    let local_only_slice = slice(
        "local",
        false,
        &[("dns", "UDP", 53)],
        vec![ep(v4(rpod1), NODE2_NAME)],
    );
    sync_once(
        &topo.node,
        &[no_endpoints, local_only.clone(), local_only_slice.clone()],
        &base_args(),
    );

    let to =
        |port: u16, dst: SocketAddr| Client::new(pod, SocketAddr::from((CLIENT_IP, port)), dst);
    let cluster_ip_no_eps = to(42201, sa(ip("172.30.0.82"), 53));
    let node_port_no_eps = to(42202, sa(NODE_IP, 30082));
    let local_no_local_ep = to(42203, sa(ip("172.30.0.83"), 53));
    let early_node_port = to(42204, sa(NODE_IP, 30081));
    let early_external_ip = to(42205, sa(ip("192.168.99.21"), 53));
    cluster_ip_no_eps.expect(1, &Answer::Refused, &topo, "ClusterIP, no endpoints");
    node_port_no_eps.expect(1, &Answer::Refused, &topo, "NodePort, no endpoints");
    local_no_local_ep.expect(1, &Answer::Dropped, &topo, "iTP=Local, no local endpoint");
    early_node_port.expect(1, &Answer::Refused, &topo, "NodePort before its service");
    early_external_ip.expect(1, &Answer::Dropped, &topo, "external IP before its service");

    let mut ct = conntrack_of(&topo.node);
    for c in [&cluster_ip_no_eps, &node_port_no_eps, &local_no_local_ep] {
        assert_eq!(
            entry_from(&mut ct, c.src),
            None,
            "rejected/dropped before confirmation: no entry expected for {} -> {}",
            c.src,
            c.dst
        );
    }
    for c in [&early_node_port, &early_external_ip] {
        let e = entry_from(&mut ct, c.src).expect("un-NATed flow has an entry");
        assert_eq!(
            e.reply_src, c.dst,
            "black hole: reply from the destination itself"
        );
    }

    // Now every service gets an endpoint.
    let objects = vec![
        service("empty", &["172.30.0.82"])
            .type_("NodePort")
            .port("dns", "UDP", 53, 30082)
            .build(),
        slice(
            "empty",
            false,
            &[("dns", "UDP", 53)],
            vec![ep(v4(rpod1), NODE2_NAME)],
        ),
        service("late", &["172.30.0.81"])
            .type_("NodePort")
            .port("dns", "UDP", 53, 30081)
            .external_ips(&["192.168.99.21"])
            .build(),
        slice(
            "late",
            false,
            &[("dns", "UDP", 53)],
            vec![ep(v4(rpod1), NODE2_NAME)],
        ),
        local_only,
        local_only_slice,
    ];
    sync_once(&topo.node, &objects, &base_args());
    let plans = plans_for(&objects, IpFamily::V4);
    let answered = Answer::By(sa(rpod1, 53));

    // Flows without an entry are load-balanced at once.
    cluster_ip_no_eps.expect(1, &answered, &topo, "ClusterIP got an endpoint");
    node_port_no_eps.expect(1, &answered, &topo, "NodePort got an endpoint");

    let survived = [&early_node_port, &early_external_ip]
        .iter()
        .filter(|c| entry_from(&mut ct, c.src).is_some())
        .count();
    if survived == 2 {
        early_node_port.expect(2, &Answer::Refused, &topo, "NodePort black hole");
        early_external_ip.expect(1, &Answer::Dropped, &topo, "external IP black hole");
        let report = cleanup(&mut ct, IpFamily::V4, &plans);
        assert_eq!((report.stale, report.deleted), (2, 2), "{report:?}");
    } else {
        assert_eq!(survived, 0, "kproxy --once cleaned only some black holes");
        eprintln!("kproxy --once already deleted the black-hole entries");
    }
    early_node_port.expect(2, &answered, &topo, "NodePort after cleanup");
    early_external_ip.expect(2, &answered, &topo, "external IP after cleanup");
    // iTP=Local still has no local endpoint: still dropped, and never stale (its only
    // endpoint is remote but serving; nothing was confirmed).
    local_no_local_ep.expect(1, &Answer::Dropped, &topo, "iTP=Local still dropped");
    assert_eq!(cleanup(&mut ct, IpFamily::V4, &plans).deleted, 0);
}

/// A conntrack entry to insert with the `conntrack` tool, and whether the cleanup must
/// delete it. Its reply goes back to the client on the same ports.
#[derive(Debug, Clone, Copy)]
struct Injected {
    proto: &'static str,
    client: (&'static str, u16),
    dst: (&'static str, u16),
    reply_src: &'static str,
    /// More `conntrack -I` flags, e.g. a zone.
    extra: &'static [&'static str],
    stale: bool,
}

const CLIENT: &str = "10.180.2.100";
const VIP: &str = "172.30.0.90";

fn case(
    proto: &'static str,
    sport: u16,
    dst: (&'static str, u16),
    reply_src: &'static str,
) -> Injected {
    Injected {
        proto,
        client: (CLIENT, sport),
        dst,
        reply_src,
        extra: &[],
        stale: false,
    }
}

impl Injected {
    fn stale(self) -> Injected {
        Injected {
            stale: true,
            ..self
        }
    }

    fn with(self, extra: &'static [&'static str]) -> Injected {
        Injected { extra, ..self }
    }

    fn insert(&self, ns: &Netns) {
        let (sport, dport) = (self.client.1.to_string(), self.dst.1.to_string());
        let mut args = vec![
            "conntrack",
            "-I",
            "-p",
            self.proto,
            "-s",
            self.client.0,
            "-d",
            self.dst.0,
            "--sport",
            &sport,
            "--dport",
            &dport,
            "-r",
            self.reply_src,
            "-q",
            self.client.0,
            "--reply-port-src",
            &dport,
            "--reply-port-dst",
            &sport,
            "-t",
            "120",
        ];
        if self.proto == "tcp" {
            args.extend(["--state", "ESTABLISHED"]);
        }
        args.extend(self.extra);
        ns.exec(&args);
    }
}

/// Exactly the stale UDP entries of the namespace and family are deleted: TCP, other
/// ports, serving endpoints, the other family and other namespaces are left alone; zones
/// (also directional ones) are honoured.
#[test]
fn only_stale_udp_entries_of_this_namespace_and_family_are_deleted() {
    require!("only_stale_udp_entries_of_this_namespace_and_family_are_deleted");
    let node = Netns::new("ctnode");
    let other = Netns::new("ctother");
    let objects = vec![
        service("scope", &[VIP, "fd00:10:96::90"])
            .type_("NodePort")
            .port("dns", "UDP", 53, 30090)
            .port("dns-tcp", "TCP", 53, 30091)
            .build(),
        slice(
            "scope",
            false,
            &[("dns", "UDP", 53), ("dns-tcp", "TCP", 53)],
            vec![
                ep(ip("10.180.0.1"), NODE2_NAME),
                ep(ip("10.180.0.2"), NODE2_NAME).terminating(),
                ep(ip("10.180.0.3"), NODE2_NAME).gone(),
            ],
        ),
        slice(
            "scope",
            true,
            &[("dns", "UDP", 53)],
            vec![ep(ip("fd00:10:180::1"), NODE2_NAME)],
        ),
    ];
    let (gone, node_ip) = ("10.180.0.9", "192.168.0.2");
    let cases = [
        case("udp", 50001, (VIP, 53), gone).stale(),
        case("udp", 50002, (VIP, 53), gone)
            .with(&["-w", "7"])
            .stale(),
        case("udp", 50003, (VIP, 53), gone)
            .with(&["--orig-zone", "9"])
            .stale(),
        case("udp", 50004, (VIP, 53), "10.180.0.3").stale(), // not serving
        case("udp", 50005, (VIP, 53), VIP).stale(),          // black hole
        case("udp", 50006, (node_ip, 30090), gone).stale(),  // NodePort
        case("udp", 50007, (VIP, 53), "10.180.0.1"),         // serving
        case("udp", 50008, (VIP, 53), "10.180.0.2"),         // terminating, serving
        case("udp", 50009, (VIP, 54), gone),                 // not a service port
        case("tcp", 50010, (VIP, 53), gone),                 // TCP service port
        case("tcp", 50011, (node_ip, 30091), gone),          // TCP NodePort
        case("udp", 50012, (node_ip, 30091), gone),          // UDP to a TCP NodePort
    ];
    for c in &cases {
        c.insert(&node);
    }
    // The other family, and another namespace with an entry that would be stale here.
    Injected {
        client: ("fd00:10:180:2::100", 50020),
        ..case("udp", 0, ("fd00::2", 30090), "fd00:10:180::9")
    }
    .insert(&node);
    cases[0].insert(&other);

    let mut ct = conntrack_of(&node);
    let before = ct.list(IpFamily::V4).expect("list");
    assert_eq!(before.len(), cases.len(), "{before:#?}");
    let zoned = before
        .iter()
        .find(|e| e.orig_src.port() == 50002)
        .expect("zone 7");
    assert_eq!((zoned.zone, zoned.orig_tuple_zone), (7, None), "{zoned:?}");
    let directional = before
        .iter()
        .find(|e| e.orig_src.port() == 50003)
        .expect("zone 9");
    assert_eq!(directional.orig_tuple_zone, Some(9), "{directional:?}");

    let report = cleanup(&mut ct, IpFamily::V4, &plans_for(&objects, IpFamily::V4));
    let want_deleted: BTreeSet<u16> = cases
        .iter()
        .filter(|c| c.stale)
        .map(|c| c.client.1)
        .collect();
    assert_eq!(report.listed, cases.len(), "{report:?}");
    assert_eq!(report.deleted, want_deleted.len(), "{report:?}");
    let left: BTreeSet<u16> = ct
        .list(IpFamily::V4)
        .expect("list")
        .iter()
        .map(|e| e.orig_src.port())
        .collect();
    let want_left: BTreeSet<u16> = cases
        .iter()
        .filter(|c| !c.stale)
        .map(|c| c.client.1)
        .collect();
    assert_eq!(left, want_left, "\n{}", node.diagnostics());

    let v6 = ct.list(IpFamily::V6).expect("list v6");
    assert_eq!(
        v6.len(),
        1,
        "IPv6 entry untouched by the IPv4 cleanup: {v6:?}"
    );
    let others = other.in_ns(|| Conntrack::open().and_then(|mut o| o.list(IpFamily::V4)));
    assert_eq!(
        others.expect("list other").len(),
        1,
        "other namespace untouched"
    );

    // The IPv6 pass deletes the IPv6 NodePort entry (its reply is not a v6 endpoint).
    let report6 = cleanup(&mut ct, IpFamily::V6, &plans_for(&objects, IpFamily::V6));
    assert_eq!((report6.listed, report6.deleted), (1, 1), "{report6:?}");
    // The conntrack tool agrees.
    let listed = node.exec(&["conntrack", "-L"]);
    assert_eq!(listed.lines().count(), want_left.len(), "{listed}");
}

/// Thousands of real flows, half of them pinned to an endpoint that goes away: one dump,
/// batched deletes. Prints the timings.
#[test]
fn thousands_of_stale_flows_are_deleted_in_batches() {
    require!("thousands_of_stale_flows_are_deleted_in_batches");
    const FLOWS: usize = 4000;
    let topo = topology();
    let endpoints = [topo.pod("rpod1").ipv4, topo.pod("rpod2").ipv4];
    let objects = |eps: &[Ipv4Addr]| {
        vec![
            service("bulk", &["172.30.0.95"])
                .port("dns", "UDP", 53, 0)
                .build(),
            slice(
                "bulk",
                false,
                &[("dns", "UDP", 53)],
                eps.iter().map(|&e| ep(v4(e), NODE2_NAME)).collect(),
            ),
        ]
    };
    sync_once(&topo.node, &objects(&endpoints), &base_args());
    let dst = sa(ip("172.30.0.95"), 53);
    let started = Instant::now();
    topo.pod("client").ns().in_ns(move || {
        // Fixed ports below the ephemeral range: a port reused by a later socket would
        // merge two flows into one entry.
        for port in (20000..).take(FLOWS) {
            let s = UdpSocket::bind(SocketAddr::from((CLIENT_IP, port))).expect("bind");
            s.send_to(b"bulk\n", dst).expect("send");
        }
    });
    let sent = started.elapsed();

    let mut ct = conntrack_of(&topo.node);
    let started = Instant::now();
    let entries = ct.list(IpFamily::V4).expect("list");
    let listed = started.elapsed();
    let flows: Vec<&ConntrackEntry> = entries.iter().filter(|e| e.orig_dst == dst).collect();
    // One entry per flow, give or take a datagram lost to a full veth backlog.
    assert!(flows.len() > FLOWS * 9 / 10, "{} entries", flows.len());
    let removed = v4(endpoints[0]);
    let pinned_to_removed = flows.iter().filter(|e| e.reply_src.ip() == removed).count();
    assert!(
        pinned_to_removed > flows.len() / 4,
        "random balancing: {pinned_to_removed}"
    );

    // Cleanup only needs the plans; no need to resync for the measurement.
    let plans = plans_for(&objects(&endpoints[1..]), IpFamily::V4);
    let report = cleanup(&mut ct, IpFamily::V4, &plans);
    assert_eq!(report.deleted, pinned_to_removed, "{report:?}");
    assert_eq!(report.listed, entries.len(), "{report:?}");
    let left = ct.list(IpFamily::V4).expect("list");
    assert!(left.iter().all(|e| e.reply_src.ip() != removed));
    assert_eq!(
        left.iter().filter(|e| e.orig_dst == dst).count(),
        flows.len() - pinned_to_removed
    );
    eprintln!(
        "{} flows sent in {sent:?}; list of {} entries took {listed:?}; cleanup \
         (list + delete {}) took {:?}",
        flows.len(),
        entries.len(),
        report.deleted,
        report.duration
    );
}
