//! `kproxy trace` and `kproxy explain` as a user runs them: the real binary, on manifests.
//!
//! - Offline (no privilege): the packet-flow suite's scenarios (`tests/packet_flow.rs`)
//!   traced with `kproxy trace --output json` must give the verdicts, endpoints and
//!   masquerading the real-traffic tests observe, and the text must say why in plain
//!   words.
//! - Privileged: on a node namespace programmed by `kproxy --once`, `trace --live
//!   --manifests` finds no drift; after a service chain is flushed by hand it reports the
//!   drift (exit 3, naming the chain and the service), `explain --live` marks the chain,
//!   and real traffic does what `--live` predicts.
//! - `explain` for each traffic-policy and topology case of the categorisation table
//!   (upstream's TestCategorizeEndpoints): per endpoint, whether it is used for cluster
//!   and for local traffic and why; cross-checked against `trace`, whose evaluator is the
//!   oracle of the packet-flow tests.

mod support;

use serde_json::Value;
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_kproxy");
/// A client pod on this node that is no endpoint (as in the packet-flow suite).
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 180, 2, 100);
const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x180, 2, 0, 0, 0, 0x100);

fn v4(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}

/// A manifest with the Node and ServiceCIDR objects, as `sync_once` feeds the binary.
fn manifest(objects: &[Value]) -> PathBuf {
    let mut all = vec![node_object(), service_cidr_object()];
    all.extend_from_slice(objects);
    write_manifest(&all)
}

#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}), exit {}:\n{}\n{}",
                self.code, self.stdout, self.stderr
            )
        })
    }
}

fn finish(cmd: &mut Command) -> Run {
    let o = cmd.output().expect("run kproxy");
    Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// `kproxy <sub> --manifests PATH <base flags> <args>`, optionally in a namespace.
fn kproxy(ns: Option<&Netns>, sub: &str, path: &Path, args: &[&str]) -> Run {
    let mut cmd = match ns {
        Some(ns) => ns.command(BIN),
        None => Command::new(BIN),
    };
    cmd.arg(sub)
        .arg("--manifests")
        .arg(path)
        .args(base_args())
        .args(args);
    finish(&mut cmd)
}

/// `kproxy trace --output json`, which must exit 0.
fn trace(path: &Path, args: &[&str]) -> Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let r = kproxy(None, "trace", path, &all);
    assert_eq!(r.code, 0, "trace {args:?}: {r:?}");
    r.json()
}

/// `kproxy trace` in plain words, which must exit 0.
fn trace_text(path: &Path, args: &[&str]) -> String {
    let r = kproxy(None, "trace", path, args);
    assert_eq!(r.code, 0, "trace {args:?}: {r:?}");
    r.stdout
}

/// Text with runs of spaces collapsed, so checks do not depend on column alignment.
fn squash(s: &str) -> String {
    s.split(' ')
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `text` holds `words`, ignoring alignment.
fn says(text: &str, words: &str) -> bool {
    squash(text).contains(&squash(words))
}

fn endpoint_ips(j: &Value) -> BTreeSet<IpAddr> {
    j["endpoints"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e["endpoint"].as_str()?.parse::<SocketAddr>().ok())
        .map(|sa| sa.ip())
        .collect()
}

/// Does `trace --output json` say what the real-traffic test expects?
fn assert_agrees(what: &str, j: &Value, expect: &Expect) {
    let verdict = j["verdict"].as_str().unwrap_or("");
    match expect {
        Expect::Endpoints { ips, port, masq } => {
            assert_eq!(verdict, "accept", "{what}: {j:#}");
            let want: BTreeSet<IpAddr> = ips.iter().copied().collect();
            assert_eq!(endpoint_ips(j), want, "{what}: {j:#}");
            if let Some(p) = port {
                for e in j["endpoints"].as_array().into_iter().flatten() {
                    let sa: SocketAddr = e["endpoint"]
                        .as_str()
                        .and_then(|s| s.parse().ok())
                        .expect("endpoint");
                    assert_eq!(sa.port(), *p, "{what}: {j:#}");
                }
            }
            assert_eq!(j["masquerade"], Value::Bool(*masq), "{what}: {j:#}");
        }
        Expect::Reject => assert_eq!(verdict, "reject", "{what}: {j:#}"),
        Expect::Drop => assert_eq!(verdict, "drop", "{what}: {j:#}"),
        Expect::Host(ip) => {
            assert_eq!(verdict, "untouched", "{what}: {j:#}");
            assert_eq!(j["packet"]["dst"], ip.to_string(), "{what}: {j:#}");
        }
    }
    assert_eq!(j["exit_code"], 0, "{what}: {j:#}");
}

/// What a `trace --output json` predicts, in the real-traffic harness's terms.
fn expect_of(j: &Value) -> Expect {
    match j["verdict"].as_str() {
        Some("accept") => Expect::Endpoints {
            ips: endpoint_ips(j).into_iter().collect(),
            port: None,
            masq: j["masquerade"] == true,
        },
        Some("reject") => Expect::Reject,
        Some("drop") => Expect::Drop,
        Some("untouched") => Expect::Host(
            j["packet"]["dst"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("dst"),
        ),
        other => panic!("no single expectation for {other:?}: {j:#}"),
    }
}

/// One scenario flow: name, trace arguments, the real-traffic expectation.
type Case<'a> = (&'a str, Vec<String>, Expect);

fn case<'a>(name: &'a str, src: impl ToString, dst: &str, proto: &str, expect: Expect) -> Case<'a> {
    (
        name,
        vec![src.to_string(), format!("{dst}/{proto}")],
        expect,
    )
}

fn check_cases(path: &Path, cases: &[Case<'_>]) {
    for (name, args, expect) in cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_agrees(name, &trace(path, &a), expect);
    }
}

// ---------------------------------------------------------------------------------------
// Offline: the packet-flow scenarios through `kproxy trace --manifests`.

#[test]
fn cluster_ip_two_endpoints_hairpin_and_invalid_ports() {
    let path = manifest(&[
        service("two", &["172.30.0.43"])
            .port("p80", "TCP", 80, 0)
            .build(),
        slice(
            "two",
            false,
            &[("p80", "TCP", 80)],
            vec![ep(v4(RPOD1_IP), NODE2_NAME), ep(v4(RPOD2_IP), NODE2_NAME)],
        ),
        service("hairpin", &["172.30.0.42"])
            .port("p80", "TCP", 80, 0)
            .build(),
        slice(
            "hairpin",
            false,
            &[("p80", "TCP", 80)],
            vec![ep(v4(LPOD1_IP), NODE_NAME)],
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
    ]);
    check_cases(
        &path,
        &[
            case(
                "two endpoints",
                CLIENT_IP,
                "172.30.0.43:80",
                "tcp",
                reach(&[v4(RPOD1_IP), v4(RPOD2_IP)], false),
            ),
            case(
                "hairpin",
                LPOD1_IP,
                "172.30.0.42:80",
                "tcp",
                reach(&[v4(LPOD1_IP)], true),
            ),
            case(
                "target port",
                CLIENT_IP,
                "172.30.0.44:443",
                "tcp",
                Expect::Endpoints {
                    ips: vec![v4(RPOD1_IP), v4(LPOD2_IP)],
                    port: Some(8443),
                    masq: false,
                },
            ),
            case(
                "UDP to a TCP-only port",
                CLIENT_IP,
                "172.30.0.43:80",
                "udp",
                Expect::Reject,
            ),
            case(
                "unallocated ClusterIP",
                CLIENT_IP,
                "172.30.0.50:80",
                "tcp",
                Expect::Drop,
            ),
        ],
    );
    // 50/50, in JSON and in words.
    let j = trace(&path, &["10.180.2.100", "172.30.0.43:80/tcp"]);
    for e in j["endpoints"].as_array().expect("endpoints") {
        assert_eq!(e["probability"], 0.5, "{j:#}");
    }
    assert_eq!(j["service"], "ns/two:p80");
    assert_eq!(j["evaluated"], "manifests");
    let text = trace_text(&path, &["10.180.2.100", "172.30.0.43:80/tcp"]);
    let first = text.lines().next().unwrap_or("");
    assert_eq!(
        first,
        "10.180.2.100 -> 172.30.0.43:80/tcp: ACCEPT → 10.180.0.1:80 (50%), 10.180.0.2:80 (50%), not masqueraded",
        "{text}"
    );
    for line in [
        "service port:     ns/two:p80, addressed by its ClusterIP 172.30.0.43:80/tcp",
        "internalTrafficPolicy=Cluster: ClusterIP traffic may go to any endpoint in the cluster",
        "topology:         none: the endpoints carry no topology hints",
        "endpoints:        10.180.0.1:80 (50%), 10.180.0.2:80 (50%)",
        "masquerade:       no (source 10.180.2.100 is inside the cluster CIDR)",
    ] {
        assert!(says(&text, line), "missing {line:?} in:\n{text}");
    }
    let hairpin = trace_text(&path, &["10.180.2.1", "172.30.0.42:80"]);
    assert!(
        says(
            &hairpin,
            "masquerade: yes (hairpin: the client is the endpoint it was sent to)"
        ),
        "{hairpin}"
    );
    let unalloc = trace_text(&path, &["10.180.2.100", "172.30.0.50:80"]);
    assert!(
        unalloc.starts_with("10.180.2.100 -> 172.30.0.50:80/tcp: DROP: 172.30.0.50 is inside a service CIDR but is not an allocated ClusterIP"),
        "{unalloc}"
    );
}

#[test]
fn no_endpoints_reject_with_the_service_named() {
    let path = manifest(&[service("svc1", &["172.30.0.41", "fd00:10:96::41"])
        .port("p80", "TCP", 80, 3001)
        .external_ips(&["192.168.99.11"])
        .load_balancer(&["1.2.3.4"])
        .build()]);
    let ext = EXT_CLIENT.to_string();
    let node = format!("{NODE_IP}:3001");
    check_cases(
        &path,
        &[
            case(
                "pod to ClusterIP",
                CLIENT_IP,
                "172.30.0.41:80",
                "tcp",
                Expect::Reject,
            ),
            case(
                "ext to externalIP",
                &ext,
                "192.168.99.11:80",
                "tcp",
                Expect::Reject,
            ),
            case("ext to NodePort", &ext, &node, "tcp", Expect::Reject),
            case("ext to LB", &ext, "1.2.3.4:80", "tcp", Expect::Reject),
            case(
                "pod to v6 ClusterIP",
                "fd00:10:180:2::100",
                "[fd00:10:96::41]:80",
                "tcp",
                Expect::Reject,
            ),
        ],
    );
    let text = trace_text(&path, &[&ext, &format!("{node}/tcp")]);
    assert!(
        text.starts_with(
            "203.0.113.2 -> 192.168.0.2:3001/tcp: REJECT: no endpoints for ns/svc1:p80 (no-endpoint-nodeports)"
        ),
        "{text}"
    );
    let j = trace(&path, &[&ext, &format!("{node}/tcp")]);
    assert_eq!(
        j["reasons"][0],
        "no endpoints for ns/svc1:p80 (no-endpoint-nodeports)"
    );
}

#[test]
fn load_balancer_source_ranges_allow_and_block() {
    let path = manifest(&[
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
    ]);
    let rpod1 = &[v4(RPOD1_IP)];
    let (ext, blocked) = (EXT_CLIENT.to_string(), EXT_CLIENT_BLOCKED.to_string());
    check_cases(
        &path,
        &[
            case(
                "allowed ext to LB1",
                &ext,
                "1.2.3.4:80",
                "tcp",
                reach(rpod1, true),
            ),
            case(
                "allowed ext to LB2",
                &ext,
                "5.6.7.8:80",
                "tcp",
                reach(rpod1, true),
            ),
            case(
                "blocked ext to LB1",
                &blocked,
                "1.2.3.4:80",
                "tcp",
                Expect::Drop,
            ),
            case(
                "blocked client to NodePort bypasses ranges",
                &blocked,
                &format!("{NODE_IP}:3001"),
                "tcp",
                reach(rpod1, true),
            ),
            case(
                "pod to LB (pod CIDR not allowed)",
                CLIENT_IP,
                "1.2.3.4:80",
                "tcp",
                Expect::Drop,
            ),
        ],
    );
    // The node (inside a range) to the LB.
    let j = trace(&path, &["--from-node", "1.2.3.4:80/tcp"]);
    assert_agrees("node to LB1", &j, &reach(rpod1, true));
    let text = trace_text(&path, &[&blocked, "1.2.3.4:80/tcp"]);
    assert!(
        text.starts_with(
            "203.0.113.130 -> 1.2.3.4:80/tcp: DROP: source 203.0.113.130 not in loadBalancerSourceRanges of ns/svc1:p80"
        ),
        "{text}"
    );
    assert!(
        says(&text, "source ranges: blocked: 203.0.113.130 is not in loadBalancerSourceRanges (192.168.0.0/24, 203.0.113.0/25)"),
        "{text}"
    );
    let ok = trace_text(&path, &[&ext, "1.2.3.4:80/tcp"]);
    assert!(
        ok.starts_with("203.0.113.2 -> 1.2.3.4:80/tcp: ACCEPT → 10.180.0.1:80 (100%), masqueraded"),
        "{ok}"
    );
    assert!(
        ok.contains("allowed: 203.0.113.2 is in loadBalancerSourceRanges"),
        "{ok}"
    );
    assert!(
        says(
            &ok,
            "masquerade: yes (external traffic with externalTrafficPolicy=Cluster)"
        ),
        "{ok}"
    );
}

#[test]
fn external_traffic_policy_local_external_versus_pod() {
    let path = manifest(&[
        service("svc1", &["172.30.0.41"])
            .port("p80", "TCP", 80, 3001)
            .external_ips(&["192.168.99.22"])
            .load_balancer(&["1.2.3.4"])
            .external_local()
            .build(),
        slice(
            "svc1",
            false,
            &[("p80", "TCP", 80)],
            vec![ep(v4(RPOD1_IP), NODE2_NAME), ep(v4(LPOD1_IP), NODE_NAME)],
        ),
    ]);
    let both = &[v4(RPOD1_IP), v4(LPOD1_IP)];
    let local = &[v4(LPOD1_IP)];
    let ext = EXT_CLIENT.to_string();
    let np = format!("{NODE_IP}:3001");
    check_cases(
        &path,
        &[
            case("ext to LB", &ext, "1.2.3.4:80", "tcp", reach(local, false)),
            case(
                "ext to externalIP",
                &ext,
                "192.168.99.22:80",
                "tcp",
                reach(local, false),
            ),
            case("ext to NodePort", &ext, &np, "tcp", reach(local, false)),
            case(
                "pod to LB",
                CLIENT_IP,
                "1.2.3.4:80",
                "tcp",
                reach(both, false),
            ),
            case("pod to NodePort", CLIENT_IP, &np, "tcp", reach(both, false)),
            case(
                "pod to ClusterIP",
                CLIENT_IP,
                "172.30.0.41:80",
                "tcp",
                reach(both, false),
            ),
        ],
    );
    let text = trace_text(&path, &[&ext, "1.2.3.4:80/tcp"]);
    for line in [
        "203.0.113.2 -> 1.2.3.4:80/tcp: ACCEPT → 10.180.2.1:80 (100%), not masqueraded",
        "traffic policy:   externalTrafficPolicy=Local: external traffic only goes to endpoints on this node (node-a) and keeps the client's source address",
        "masquerade:       no (externalTrafficPolicy=Local keeps the client's source address)",
        "topology:         not applied: the Local policy uses this node's endpoints",
    ] {
        assert!(says(&text, line), "missing {line:?} in:\n{text}");
    }
    let pod = trace_text(&path, &["10.180.2.100", "1.2.3.4:80/tcp"]);
    assert!(
        pod.contains("externalTrafficPolicy=Local, but traffic from pods and from the node itself is short-circuited to every cluster endpoint"),
        "{pod}"
    );
}

#[test]
fn internal_traffic_policy_local_without_a_local_endpoint_drops() {
    let path = manifest(&[
        service("svc1", &["172.30.0.41"])
            .port("p80", "TCP", 80, 0)
            .internal_local()
            .build(),
        slice(
            "svc1",
            false,
            &[("p80", "TCP", 80)],
            vec![ep(v4(RPOD1_IP), NODE2_NAME)],
        ),
    ]);
    check_cases(
        &path,
        &[case(
            "iTP=Local, no local endpoint",
            CLIENT_IP,
            "172.30.0.41:80",
            "tcp",
            Expect::Drop,
        )],
    );
    let text = trace_text(&path, &["10.180.2.100", "172.30.0.41:80"]);
    assert!(
        text.starts_with("10.180.2.100 -> 172.30.0.41:80/tcp: DROP: ns/svc1:p80: internalTrafficPolicy is Local and no endpoint runs on this node (no-endpoint-services)"),
        "{text}"
    );
    assert!(
        text.contains("internalTrafficPolicy=Local: ClusterIP traffic only goes to endpoints on this node (node-a), and there is none"),
        "{text}"
    );
}

#[test]
fn from_pod_and_from_node() {
    let mut hairpin = slice(
        "hairpin",
        false,
        &[("p80", "TCP", 80)],
        vec![ep(v4(LPOD1_IP), NODE_NAME)],
    );
    hairpin["endpoints"][0]["targetRef"] =
        serde_json::json!({"kind": "Pod", "namespace": "ns", "name": "lpod1"});
    let mut remote = slice(
        "remote",
        false,
        &[("p80", "TCP", 80)],
        vec![ep(v4(RPOD1_IP), NODE2_NAME)],
    );
    remote["endpoints"][0]["targetRef"] = serde_json::json!({"kind": "Pod", "name": "rpod1"});
    let path = manifest(&[
        service("hairpin", &["172.30.0.42"])
            .port("p80", "TCP", 80, 0)
            .build(),
        hairpin,
        service("remote", &["172.30.0.43"])
            .port("p80", "TCP", 80, 0)
            .build(),
        remote,
    ]);
    // The pod is found by its targetRef: a hairpin, masqueraded.
    let j = trace(&path, &["--from-pod", "ns/lpod1", "172.30.0.42:80/tcp"]);
    assert_agrees("hairpin from pod", &j, &reach(&[v4(LPOD1_IP)], true));
    assert_eq!(j["packet"]["src"], LPOD1_IP.to_string());
    assert!(
        j["decisions"]["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("pod ns/lpod1 (10.180.2.1) on node-a")),
        "{j:#}"
    );
    // The targetRef's namespace defaults to the slice's; a remote pod is said to be so.
    let text = trace_text(&path, &["--from-pod", "ns/rpod1", "172.30.0.42:80"]);
    assert!(
        text.contains("source:")
            && text.contains("pod ns/rpod1 (10.180.0.1) on node-b; this traces what node-a does"),
        "{text}"
    );
    // Unknown pods, or no address of the destination's family, are clear errors.
    let r = kproxy(
        None,
        "trace",
        &path,
        &["--from-pod", "ns/nope", "172.30.0.42:80"],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains("pod ns/nope: no EndpointSlice endpoint has a targetRef to this Pod"),
        "{r:?}"
    );
    let r = kproxy(
        None,
        "trace",
        &path,
        &["--from-pod", "ns/lpod1", "[fd00:10:96::42]:80"],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("has no IPv6 address"), "{r:?}");
    // The node itself: the output path, masqueraded to a ClusterIP (outside the CIDR).
    let j = trace(&path, &["--from-node", "172.30.0.43:80"]);
    assert_agrees("node to ClusterIP", &j, &reach(&[v4(RPOD1_IP)], true));
    assert_eq!(j["packet"]["src"], NODE_IP.to_string());
    assert_eq!(j["packet"]["origin"], "local");
}

#[test]
fn usage_errors_exit_2() {
    let path = manifest(&[]);
    for (args, words) in [
        (
            vec!["trace", "1.2.3.4", "5.6.7.8:80"],
            "nothing to evaluate",
        ),
        (vec!["explain", "ns/x"], "explain needs --manifests"),
    ] {
        let r = finish(Command::new(BIN).args(&args));
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
        assert!(r.stderr.contains(words), "{args:?}: {r:?}");
    }
    for args in [
        vec!["5.6.7.8:80"],
        vec!["1.2.3.4", "5.6.7.8:80/icmp"],
        vec!["1.2.3.4", "[fd00::1]:80"],
        vec!["--from-pod", "ns/a", "1.2.3.4", "5.6.7.8:80"],
    ] {
        let r = kproxy(None, "trace", &path, &args);
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
    }
    let r = kproxy(None, "explain", &path, &["ns/missing"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains("service ns/missing is not in the manifests"),
        "{r:?}"
    );
    // Anything else still runs the daemon's flag parser.
    let r = finish(Command::new(BIN).arg("--version"));
    assert_eq!(r.code, 0, "{r:?}");
}

// ---------------------------------------------------------------------------------------
// `explain`: the categorisation table, per endpoint.

/// `kproxy explain ns/<svc> --output json` for these objects; must exit 0.
fn explain(objects: &[Value], svc: &str) -> (PathBuf, Value) {
    let path = manifest(objects);
    let r = kproxy(
        None,
        "explain",
        &path,
        &["--output", "json", &format!("ns/{svc}")],
    );
    assert_eq!(r.code, 0, "{r:?}");
    (path, r.json())
}

/// The IPv4 port's explanation.
fn port(j: &Value) -> &Value {
    j["ports"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["family"] == "IPv4"))
        .unwrap_or_else(|| panic!("no IPv4 port: {j:#}"))
}

/// `(used, reason)` of an endpoint for `cluster` or `local` traffic.
fn usage(j: &Value, ip: Ipv4Addr, kind: &str) -> (bool, String) {
    let row = port(j)["endpoints"]
        .as_array()
        .and_then(|eps| {
            eps.iter().find(|e| {
                e["endpoint"]
                    .as_str()
                    .and_then(|s| s.parse::<SocketAddr>().ok())
                    .is_some_and(|sa| sa.ip() == v4(ip))
            })
        })
        .unwrap_or_else(|| panic!("no endpoint {ip}: {j:#}"));
    (
        row[kind]["used"].as_bool().unwrap_or(false),
        row[kind]["reason"].as_str().unwrap_or("").to_string(),
    )
}

fn yes(reason: &str) -> (bool, String) {
    (true, reason.to_string())
}

fn no(reason: &str) -> (bool, String) {
    (false, reason.to_string())
}

/// The ClusterIP traffic of a pod goes exactly where `explain` says: the endpoints
/// used for cluster traffic (iTP=Cluster) or for local traffic (iTP=Local).
fn cross_check(path: &Path, j: &Value) {
    let p = port(j);
    let kind = if p["internal_traffic_policy"] == "Local" {
        "local"
    } else {
        "cluster"
    };
    let want: BTreeSet<IpAddr> = p["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e[kind]["used"] == true)
        .filter_map(|e| e["endpoint"].as_str()?.parse::<SocketAddr>().ok())
        .map(|sa| sa.ip())
        .collect();
    let dst = format!("{}:{}", p["cluster_ip"].as_str().unwrap_or(""), p["port"]);
    let t = trace(path, &["10.180.2.100", &dst]);
    if want.is_empty() {
        assert!(
            matches!(t["verdict"].as_str(), Some("drop" | "reject")),
            "{t:#}"
        );
    } else {
        assert_eq!(endpoint_ips(&t), want, "explain {j:#}\ntrace {t:#}");
    }
}

fn svc(name: &str) -> Svc {
    service(name, &["172.30.0.41"]).port("p80", "TCP", 80, 0)
}

fn eps(name: &str, list: Vec<Ep>) -> Value {
    slice(name, false, &[("p80", "TCP", 80)], list)
}

fn l1() -> Ep {
    ep(v4(LPOD1_IP), NODE_NAME)
}
fn l2() -> Ep {
    ep(v4(LPOD2_IP), NODE_NAME)
}
fn r1() -> Ep {
    ep(v4(RPOD1_IP), NODE2_NAME)
}
fn r2() -> Ep {
    ep(v4(RPOD2_IP), NODE2_NAME)
}

#[test]
fn explain_internal_traffic_policy_cluster_and_local() {
    // iTP=Cluster: every ready endpoint; local endpoints unused.
    let (path, j) = explain(&[svc("c").build(), eps("c", vec![l1(), r1()])], "c");
    assert_eq!(usage(&j, LPOD1_IP, "cluster"), yes("ready"));
    assert_eq!(usage(&j, RPOD1_IP, "cluster"), yes("ready"));
    assert_eq!(usage(&j, LPOD1_IP, "local"), no("not used: policy Cluster"));
    assert_eq!(
        port(&j)["cluster_ip_traffic"],
        "2 endpoints anywhere in the cluster"
    );
    cross_check(&path, &j);

    // iTP=Local with a local endpoint: only it; cluster endpoints unused.
    let (path, j) = explain(
        &[
            svc("l").internal_local().build(),
            eps("l", vec![l1(), r1()]),
        ],
        "l",
    );
    assert_eq!(usage(&j, LPOD1_IP, "local"), yes("local ready"));
    assert_eq!(usage(&j, RPOD1_IP, "local"), no("not on this node"));
    assert_eq!(usage(&j, RPOD1_IP, "cluster"), no("not used: policy Local"));
    assert_eq!(port(&j)["topology"]["mode"], "not applied");
    assert_eq!(
        port(&j)["cluster_ip_traffic"],
        "1 endpoint on this node (internalTrafficPolicy=Local)"
    );
    cross_check(&path, &j);

    // iTP=Local without a local endpoint: dropped.
    let (path, j) = explain(
        &[
            svc("n").internal_local().build(),
            eps("n", vec![r1(), r2()]),
        ],
        "n",
    );
    assert_eq!(usage(&j, RPOD1_IP, "local"), no("not on this node"));
    assert_eq!(
        port(&j)["cluster_ip_traffic"],
        "DROP: internalTrafficPolicy=Local and no endpoint on this node"
    );
    cross_check(&path, &j);
}

#[test]
fn explain_external_traffic_policy_local_and_the_health_check() {
    let lb = |name: &str| {
        let mut s = svc(name)
            .load_balancer(&["1.2.3.4"])
            .external_local()
            .build();
        s["spec"]["ports"][0]["nodePort"] = 3001.into();
        s["spec"]["healthCheckNodePort"] = 30000.into();
        s
    };
    // Remote-only endpoints: cluster traffic (pods, the node) uses them, external
    // traffic is dropped, the health check says 503.
    let (path, j) = explain(&[lb("remote"), eps("remote", vec![r1(), r2()])], "remote");
    assert_eq!(usage(&j, RPOD1_IP, "cluster"), yes("ready"));
    assert_eq!(usage(&j, RPOD1_IP, "local"), no("not on this node"));
    let p = port(&j);
    assert!(
        p["external_traffic"]
            .as_str()
            .is_some_and(|s| s.starts_with(
                "DROP from outside: externalTrafficPolicy=Local and no endpoint on this node"
            )),
        "{p:#}"
    );
    assert_eq!(p["health_check"]["node_port"], 30000);
    assert_eq!(p["health_check"]["local_ready_endpoints"], 0);
    assert_eq!(p["health_check"]["status"], 503);
    cross_check(&path, &j);
    let ext = trace(&path, &[&EXT_CLIENT.to_string(), "1.2.3.4:80"]);
    assert_eq!(ext["verdict"], "drop", "{ext:#}");

    // With a local endpoint: 200, and external traffic goes only there.
    let (path, j) = explain(&[lb("mixed"), eps("mixed", vec![l1(), r1()])], "mixed");
    assert_eq!(usage(&j, LPOD1_IP, "local"), yes("local ready"));
    assert_eq!(usage(&j, RPOD1_IP, "local"), no("not on this node"));
    assert_eq!(usage(&j, RPOD1_IP, "cluster"), yes("ready"));
    assert_eq!(port(&j)["health_check"]["status"], 200);
    assert_eq!(port(&j)["health_check"]["local_ready_endpoints"], 1);
    let ext = trace(&path, &[&EXT_CLIENT.to_string(), "1.2.3.4:80"]);
    assert_eq!(endpoint_ips(&ext), [v4(LPOD1_IP)].into(), "{ext:#}");
}

#[test]
fn explain_terminating_fallbacks_for_cluster_and_local_independently() {
    // Nothing ready: cluster traffic falls back to serving+terminating endpoints; an
    // endpoint that no longer serves is never used.
    let (path, j) = explain(
        &[
            svc("t").build(),
            eps(
                "t",
                vec![r1().terminating(), l1().terminating(), r2().gone()],
            ),
        ],
        "t",
    );
    let fallback = yes("terminating fallback (nothing ready)");
    assert_eq!(usage(&j, RPOD1_IP, "cluster"), fallback);
    assert_eq!(usage(&j, LPOD1_IP, "cluster"), fallback);
    assert_eq!(usage(&j, RPOD2_IP, "cluster"), no("not ready/serving"));
    assert_eq!(port(&j)["cluster_uses_terminating"], true);
    assert_eq!(port(&j)["local_uses_terminating"], false);
    cross_check(&path, &j);

    // eTP=Local: a remote endpoint is ready, the only local one is terminating. Cluster
    // traffic uses the ready one only; local traffic falls back on its own.
    let mut s = svc("e")
        .load_balancer(&["1.2.3.4"])
        .external_local()
        .build();
    s["spec"]["ports"][0]["nodePort"] = 3001.into();
    let (path, j) = explain(&[s, eps("e", vec![r1(), l1().terminating()])], "e");
    assert_eq!(usage(&j, RPOD1_IP, "cluster"), yes("ready"));
    assert_eq!(
        usage(&j, LPOD1_IP, "cluster"),
        no("terminating (ready endpoints exist)")
    );
    assert_eq!(
        usage(&j, LPOD1_IP, "local"),
        yes("local terminating fallback")
    );
    assert_eq!(usage(&j, RPOD1_IP, "local"), no("not on this node"));
    assert_eq!(port(&j)["cluster_uses_terminating"], false);
    assert_eq!(port(&j)["local_uses_terminating"], true);
    cross_check(&path, &j);
    let ext = trace(&path, &[&EXT_CLIENT.to_string(), "1.2.3.4:80"]);
    assert_eq!(endpoint_ips(&ext), [v4(LPOD1_IP)].into(), "{ext:#}");
}

#[test]
fn explain_topology_hints() {
    // Zone hints used: every endpoint hinted, one for this node's zone.
    let (path, j) = explain(
        &[
            svc("zonal").build(),
            eps(
                "zonal",
                vec![
                    r1().zone_hints(&["zone-a"]),
                    r2().zone_hints(&["zone-b"]),
                    l2().zone_hints(&["zone-b"]),
                ],
            ),
        ],
        "zonal",
    );
    assert_eq!(
        usage(&j, RPOD1_IP, "cluster"),
        yes("ready, hinted for zone-a")
    );
    let out = no("filtered out: not hinted for zone-a");
    assert_eq!(usage(&j, RPOD2_IP, "cluster"), out);
    assert_eq!(usage(&j, LPOD2_IP, "cluster"), out);
    assert_eq!(port(&j)["topology"]["mode"], "zone");
    cross_check(&path, &j);

    // Ignored because one endpoint lacks a hint.
    let (path, j) = explain(
        &[
            svc("partial").build(),
            eps("partial", vec![r1().zone_hints(&["zone-a"]), r2()]),
        ],
        "partial",
    );
    assert_eq!(usage(&j, RPOD1_IP, "cluster"), yes("ready"));
    assert_eq!(usage(&j, RPOD2_IP, "cluster"), yes("ready"));
    assert_eq!(port(&j)["topology"]["mode"], "none");
    assert_eq!(
        port(&j)["topology"]["reason"],
        "hints ignored: 10.180.0.2:80 has no zone hint"
    );
    cross_check(&path, &j);

    // Hinted, but none for this zone.
    let (_, j) = explain(
        &[
            svc("elsewhere").build(),
            eps(
                "elsewhere",
                vec![r1().zone_hints(&["zone-b"]), r2().zone_hints(&["zone-c"])],
            ),
        ],
        "elsewhere",
    );
    assert_eq!(usage(&j, RPOD1_IP, "cluster"), yes("ready"));
    assert_eq!(
        port(&j)["topology"]["reason"],
        "hints ignored: no endpoint is hinted for zone zone-a"
    );

    // Ignored for a Local policy.
    let (path, j) = explain(
        &[
            svc("local").internal_local().build(),
            eps(
                "local",
                vec![l2().zone_hints(&["zone-b"]), r1().zone_hints(&["zone-a"])],
            ),
        ],
        "local",
    );
    assert_eq!(usage(&j, LPOD2_IP, "local"), yes("local ready"));
    assert_eq!(usage(&j, RPOD1_IP, "local"), no("not on this node"));
    assert_eq!(usage(&j, RPOD1_IP, "cluster"), no("not used: policy Local"));
    assert_eq!(port(&j)["topology"]["mode"], "not applied");
    cross_check(&path, &j);

    // Node hints.
    let (path, j) = explain(
        &[
            svc("nodal").build(),
            eps(
                "nodal",
                vec![
                    r1().node_hints(&[NODE2_NAME]),
                    l2().node_hints(&[NODE_NAME]),
                    l1().node_hints(&[NODE_NAME]),
                ],
            ),
        ],
        "nodal",
    );
    let hinted = yes("ready, hinted for node node-a");
    assert_eq!(usage(&j, LPOD1_IP, "cluster"), hinted);
    assert_eq!(usage(&j, LPOD2_IP, "cluster"), hinted);
    assert_eq!(
        usage(&j, RPOD1_IP, "cluster"),
        no("filtered out: not hinted for node node-a")
    );
    assert_eq!(port(&j)["topology"]["mode"], "node");
    cross_check(&path, &j);

    // The same in words: the table's row for a filtered endpoint.
    let r = kproxy(None, "explain", &path, &["ns/nodal"]);
    assert_eq!(r.code, 0, "{r:?}");
    for line in [
        "Service ns/nodal (ClusterIP) on node node-a, zone zone-a",
        "topology:          node hints (node-a): every ready endpoint has a node hint and 2 of 3 name this node",
        "ENDPOINT       NODE           ZONE  READY  SERVING  TERMINATING  HINTS         CLUSTER TRAFFIC",
    ] {
        assert!(says(&r.stdout, line), "missing {line:?} in:\n{}", r.stdout);
    }
    let row = r
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("10.180.0.1:80"))
        .unwrap_or("");
    assert!(
        row.contains("node-b")
            && row.contains("nodes=node-b")
            && row.contains("no: filtered out: not hinted for node node-a")
            && row.contains("no: not used: policy Cluster"),
        "{}",
        r.stdout
    );
}

#[test]
fn explain_lists_the_kernel_objects() {
    let mut s = svc("web")
        .load_balancer(&["1.2.3.4"])
        .source_ranges(&["203.0.113.0/25"])
        .affinity(600)
        .build();
    s["spec"]["ports"][0]["nodePort"] = 3001.into();
    let (_, j) = explain(&[s, eps("web", vec![r1()])], "web");
    let objs: Vec<(String, String)> = port(&j)["kernel_objects"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|o| {
            (
                o["kind"].as_str().unwrap_or("").to_string(),
                o["name"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    for (kind, prefix, tail) in [
        ("chain", "service-", "-ns/web/tcp/p80"),
        ("chain", "external-", "-ns/web/tcp/p80"),
        ("chain", "firewall-", "-ns/web/tcp/p80"),
        ("chain", "endpoint-", "-ns/web/tcp/p80__10.180.0.1/80"),
        ("set", "affinity-", "-ns/web/tcp/p80__10.180.0.1/80"),
    ] {
        assert!(
            objs.iter()
                .any(|(k, n)| k == kind && n.starts_with(prefix) && n.ends_with(tail)),
            "no {kind} {prefix}…{tail} in {objs:#?}"
        );
    }
    for element in [
        "cluster-ips 172.30.0.41",
        "service-ips 1.2.3.4 . tcp . 80 → goto external-",
        "firewall-ips 1.2.3.4 . tcp . 80 → goto firewall-",
        "service-nodeports tcp . 3001 → goto external-",
    ] {
        assert!(
            objs.iter()
                .any(|(k, n)| k == "element" && n.starts_with(element)),
            "no element {element} in {objs:#?}"
        );
    }
    // Offline: no live status.
    assert!(port(&j)["kernel_objects"][0]["live"].is_null());
}

// ---------------------------------------------------------------------------------------
// Privileged: `--live` against a programmed node namespace.

#[test]
fn live_trace_reports_a_flushed_chain_and_real_traffic_agrees() {
    if !require_net_admin("live_trace_reports_a_flushed_chain_and_real_traffic_agrees") {
        return;
    }
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
    let path = manifest(&objects);
    let node = &topo.node;
    let client = topo.pod("client").ns();
    let web = sa(ip("172.30.0.41"), 80);
    let other = sa(ip("172.30.0.42"), 80);
    let live = |args: &[&str]| {
        let mut all = vec!["--live"];
        all.extend_from_slice(args);
        kproxy(Some(node), "trace", &path, &all)
    };

    // In sync: no drift, exit 0; real packets agree with the live evaluation.
    let r = live(&["--output", "json", "10.180.2.100", "172.30.0.41:80/tcp"]);
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(j["evaluated"], "live+manifests");
    assert!(j["drift"].is_null(), "{j:#}");
    assert_eq!(j["other_differences"], 0, "{j:#}");
    let both = reach(&[v4(RPOD1_IP), v4(RPOD2_IP)], false);
    assert_agrees("web, in sync", &j, &both);
    check_flows(
        &topo,
        &[flow(
            "web, in sync",
            Proto::Tcp,
            client,
            CLIENT_IP,
            web,
            expect_of(&j),
        )],
    );

    // The chain to flush, named by `explain`.
    let r = kproxy(
        Some(node),
        "explain",
        &path,
        &["--live", "--output", "json", "ns/web"],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let ex = r.json();
    let chain = port(&ex)["kernel_objects"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| o["kind"] == "chain")
        .filter_map(|o| o["name"].as_str())
        .find(|n| n.starts_with("service-"))
        .expect("web's service chain")
        .to_string();
    assert!(
        port(&ex)["kernel_objects"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|o| o["live"] == "present"),
        "{ex:#}"
    );
    node.exec(&["nft", "flush", "chain", "ip", "kproxy", &chain]);

    // `trace --live --manifests` reports the drift, naming the chain and the service.
    let r = live(&["10.180.2.100", "172.30.0.41:80/tcp"]);
    assert_eq!(r.code, 3, "{r:?}");
    let text = &r.stdout;
    for words in [
        "10.180.2.100 -> 172.30.0.41:80/tcp: REJECT: 172.30.0.41 is a ClusterIP, but no service port tcp/80 is defined on it",
        "DRIFT for 10.180.2.100 → 172.30.0.41:80/tcp (ns/web:p80): the kernel does not do what kproxy intends",
        "intended: ACCEPT → 10.180.0.1:80, masquerade no (50%); ACCEPT → 10.180.0.2:80, masquerade no (50%)",
        "kernel:   REJECT (100%)",
        &format!("chain {chain}: rules differ"),
    ] {
        assert!(text.contains(words), "missing {words:?} in:\n{text}");
    }
    let r = live(&["--output", "json", "10.180.2.100", "172.30.0.41:80/tcp"]);
    assert_eq!(r.code, 3, "{r:?}");
    let web_flushed = r.json();
    let j = &web_flushed;
    assert_eq!(j["verdict"], "reject", "{j:#}");
    assert_eq!(j["exit_code"], 3);
    assert_eq!(j["intended"]["summary"]["kind"], "endpoints", "{j:#}");
    assert!(
        j["drift"]["path_differences"][0]
            .as_str()
            .is_some_and(|d| d.starts_with(&format!("chain {chain}: rules differ"))),
        "{j:#}"
    );
    // The other service is unaffected: exit 0, with the table difference as a note.
    let r = live(&["--output", "json", "10.180.2.100", "172.30.0.42:80/tcp"]);
    assert_eq!(r.code, 0, "{r:?}");
    let other_live = r.json();
    let j = &other_live;
    assert!(j["drift"].is_null(), "{j:#}");
    assert_eq!(j["other_differences"], 1, "{j:#}");
    assert_agrees("other, untouched", j, &reach(&[v4(RPOD1_IP)], false));
    // `explain --live` marks the chain.
    let r = kproxy(Some(node), "explain", &path, &["--live", "ns/web"]);
    assert_eq!(r.code, 3, "{r:?}");
    let row = r.stdout.lines().find(|l| l.contains(&chain)).unwrap_or("");
    assert!(
        row.contains("[DIFFERS]") && row.contains("the kernel holds 0 rule(s), kproxy intends 2"),
        "{}",
        r.stdout
    );
    // Live alone cannot know the intent: it shows what the kernel does.
    let mut cmd = node.command(BIN);
    cmd.args([
        "trace",
        "--live",
        "--output",
        "json",
        "10.180.2.100",
        "172.30.0.41:80/tcp",
    ]);
    let r = finish(&mut cmd);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["verdict"], "reject");

    // Real traffic does what `--live` predicts: web is rejected, other still answers.
    check_flows(
        &topo,
        &[
            flow(
                "web, flushed",
                Proto::Tcp,
                client,
                CLIENT_IP,
                web,
                expect_of(&web_flushed),
            ),
            flow(
                "other, untouched",
                Proto::Tcp,
                client,
                CLIENT_IP,
                other,
                expect_of(&other_live),
            ),
        ],
    );

    // A resync repairs it.
    sync_once(node, &objects, &base_args());
    let r = live(&["10.180.2.100", "172.30.0.41:80/tcp"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!r.stdout.contains("DRIFT"), "{}", r.stdout);
}
