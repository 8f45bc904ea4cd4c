//! kproxy as a DaemonSet would run it: the real binary inside the node's network
//! namespace, watching an API server (the in-process fake, served over TCP inside that
//! namespace) and programming real nftables, checked with real traffic, `/healthz`,
//! `/livez`, `/metrics` and a health-check node port.

mod support;

use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use support::apiserver::FakeApiServer;
use support::*;

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 180, 2, 100);

fn v4(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}

/// A running kproxy with its API server.
struct Cluster {
    topo: Topology,
    api: FakeApiServer,
    server: support::apiserver::ServerHandle,
    kproxy: Background,
}

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kproxy-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

/// Starts the fake API server inside the node namespace with `objects`, then kproxy
/// with a KubeProxyConfiguration using a short syncPeriod (health timeout = 2 × 2 s).
fn start(objects: &[Value]) -> Cluster {
    let mut topo = Topology::new();
    topo.add_local_pod(
        "client",
        CLIENT_IP,
        "fd00:10:180:2::100".parse().expect("ip"),
    );
    let api = FakeApiServer::new();
    api.apply(node_object());
    api.apply(service_cidr_object());
    for o in objects {
        api.apply(o.clone());
    }
    let listener = topo
        .node
        .in_ns(|| TcpListener::bind("127.0.0.1:0").expect("bind API server"));
    let addr = listener.local_addr().expect("addr");
    let server = api.serve_on(listener);
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let kubeconfig = temp_path(&format!("kubeconfig-{n}"));
    api.write_kubeconfig(addr, &kubeconfig).expect("kubeconfig");
    let config = temp_path(&format!("config-{n}.yaml"));
    std::fs::write(
        &config,
        format!(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\n\
             clusterCIDR: {CLUSTER_CIDR},{CLUSTER_CIDR6}\nnftables:\n  syncPeriod: 2s\n  minSyncPeriod: 100ms\n"
        ),
    )
    .expect("config");
    let kproxy = topo.node.start_process(&[
        env!("CARGO_BIN_EXE_kproxy"),
        "--config",
        config.to_str().expect("utf-8"),
        "--kubeconfig",
        kubeconfig.to_str().expect("utf-8"),
        "--hostname-override",
        NODE_NAME,
        "--v=2",
    ]);
    Cluster {
        topo,
        api,
        server,
        kproxy,
    }
}

impl Cluster {
    /// Waits until repeated TCP probes from the client pod to `dst` give exactly `want`
    /// (endpoint IPs; empty = every attempt fails with `failure`).
    fn converge(&mut self, dst: SocketAddr, want: &[IpAddr], failure: Option<Outcome>) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = self.topo.pod("client").ns();
        loop {
            let t = Probe::tcp(client, dst)
                .from(v4(CLIENT_IP))
                .timeout(Duration::from_millis(500))
                .run_many(if want.len() > 1 { 12 * want.len() } else { 3 });
            let got: BTreeSet<IpAddr> = t.endpoints.iter().map(|e| e.ip()).collect();
            let ok = match &failure {
                None => t.all_answered() && got == want.iter().copied().collect(),
                Some(f) => t.answered == 0 && t.failures.iter().all(|x| x == f),
            };
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline && self.kproxy.is_running(),
                "did not converge to {want:?}/{failure:?}: {t}\nkproxy log:\n{}",
                self.kproxy.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// GET over plain HTTP from inside `ns`: (status, headers, body).
    fn http(ns: &Netns, addr: SocketAddr, path: &str) -> Option<(u16, String, String)> {
        let path = path.to_string();
        ns.in_ns(move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: kproxy\r\nConnection: close\r\n\r\n"
            )
            .ok()?;
            let mut raw = String::new();
            s.read_to_string(&mut raw).ok()?;
            let (head, body) = raw.split_once("\r\n\r\n")?;
            let status = head.split_whitespace().nth(1)?.parse().ok()?;
            Some((status, head.to_string(), body.to_string()))
        })
    }

    fn healthz(&self, path: &str) -> Option<u16> {
        Cluster::http(
            &self.topo.node,
            "127.0.0.1:10256".parse().expect("addr"),
            path,
        )
        .map(|r| r.0)
    }

    fn wait_for_status(&self, path: &str, code: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.healthz(path) != Some(code) {
            assert!(
                Instant::now() < deadline,
                "{path} did not become {code} (now {:?})\n{}",
                self.healthz(path),
                self.kproxy.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn svc(name: &str, ip: &str) -> Value {
    service(name, &[ip]).port("p80", "TCP", 80, 0).build()
}

fn eps(name: &str, ips: &[Ipv4Addr]) -> Value {
    let mut s = slice(
        name,
        false,
        &[("p80", "TCP", 80)],
        ips.iter().map(|i| ep(v4(*i), NODE2_NAME)).collect(),
    );
    // One stable slice name per service, so updates replace it.
    s["metadata"]["name"] = Value::from(format!("{name}-slice"));
    s
}

#[test]
fn watches_drive_the_kernel_through_reconnects_and_relists() {
    if !require_net_admin("watches_drive_the_kernel_through_reconnects_and_relists") {
        return;
    }
    let mut c = start(&[svc("a", "172.30.0.1"), eps("a", &[RPOD1_IP])]);
    let a = sa(ip("172.30.0.1"), 80);
    c.converge(a, &[v4(RPOD1_IP)], None);

    // Watch events: an endpoint moves, a service appears.
    c.api.apply(eps("a", &[RPOD2_IP]));
    c.api.apply(svc("b", "172.30.0.2"));
    c.api.apply(eps("b", &[RPOD1_IP]));
    c.converge(a, &[v4(RPOD2_IP)], None);
    c.converge(sa(ip("172.30.0.2"), 80), &[v4(RPOD1_IP)], None);

    // The watch stream is cut mid-way: changes made after it still arrive.
    c.api.drop_watches();
    c.api.apply(eps("a", &[RPOD1_IP, RPOD2_IP]));
    c.converge(a, &[v4(RPOD1_IP), v4(RPOD2_IP)], None);

    // Slow responses (every request delayed) still converge.
    c.api.set_latency(Duration::from_millis(700));
    c.api.drop_watches();
    c.api.apply(eps("a", &[RPOD2_IP]));
    c.converge(a, &[v4(RPOD2_IP)], None);
    c.api.set_latency(Duration::ZERO);
    c.api.apply(eps("a", &[RPOD1_IP, RPOD2_IP]));
    c.converge(a, &[v4(RPOD1_IP), v4(RPOD2_IP)], None);

    // History compacted while the stream is down: the resume gets 410 Gone, kproxy
    // relists and notices a deletion it never saw as an event.
    c.api.compact();
    c.api.drop_watches();
    c.api.delete("v1", "Service", "ns", "b");
    c.api.compact();
    c.converge(sa(ip("172.30.0.2"), 80), &[], Some(Outcome::Dropped));
    c.converge(a, &[v4(RPOD1_IP), v4(RPOD2_IP)], None);

    // Every request kproxy made is allowed by the ClusterRole in manifests/.
    let allowed = cluster_role_rules();
    let requests = c.api.requests();
    for verb in ["list", "watch"] {
        assert!(
            requests.iter().any(|r| r.verb == verb),
            "kproxy never sent a {verb} request"
        );
    }
    for r in requests {
        if r.path == "/version" || r.path == "/healthz" {
            continue;
        }
        let key = (r.group.clone(), r.resource.clone(), r.verb.clone());
        assert!(
            allowed.contains(&key),
            "request {} {} ({key:?}) not allowed by the ClusterRole",
            r.method,
            r.path
        );
    }
    let _ = &c.server;
}

/// (apiGroup, resource, verb) triples the ClusterRole in manifests/ grants.
fn cluster_role_rules() -> BTreeSet<(String, String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("manifests");
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("manifests dir") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read manifest");
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap_or_default();
        for d in docs {
            if d["kind"] != "ClusterRole" {
                continue;
            }
            for rule in d["rules"].as_array().into_iter().flatten() {
                for g in rule["apiGroups"].as_array().into_iter().flatten() {
                    for r in rule["resources"].as_array().into_iter().flatten() {
                        for v in rule["verbs"].as_array().into_iter().flatten() {
                            out.insert((
                                g.as_str().unwrap_or_default().to_string(),
                                r.as_str().unwrap_or_default().to_string(),
                                v.as_str().unwrap_or_default().to_string(),
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(!out.is_empty(), "no ClusterRole found in manifests/");
    out
}

#[test]
fn unreachable_api_server_keeps_rules_and_turns_health_503() {
    if !require_net_admin("unreachable_api_server_keeps_rules_and_turns_health_503") {
        return;
    }
    let mut c = start(&[svc("a", "172.30.0.1"), eps("a", &[RPOD1_IP])]);
    let a = sa(ip("172.30.0.1"), 80);
    c.converge(a, &[v4(RPOD1_IP)], None);
    c.wait_for_status("/healthz", 200);
    c.wait_for_status("/livez", 200);

    c.server.stop();
    c.api.drop_watches();
    // healthTimeout is 2 × syncPeriod = 4 s: both endpoints follow the same rule.
    c.wait_for_status("/livez", 503);
    c.wait_for_status("/healthz", 503);
    // The rules stay: traffic keeps flowing while the API server is away.
    c.converge(a, &[v4(RPOD1_IP)], None);
    assert!(c.kproxy.is_running());

    c.server.restart().expect("restart API server");
    c.api.apply(eps("a", &[RPOD2_IP]));
    c.converge(a, &[v4(RPOD2_IP)], None);
    c.wait_for_status("/healthz", 200);
    c.wait_for_status("/livez", 200);

    // SIGTERM exits cleanly and leaves the rules in place.
    let status = c.kproxy.terminate(Duration::from_secs(5));
    assert!(status.success(), "exit status {status}");
    c.converge(a, &[v4(RPOD2_IP)], None);
}

fn scrape(c: &Cluster) -> Vec<prometheus_parse::Sample> {
    let (code, _, body) = Cluster::http(
        &c.topo.node,
        "127.0.0.1:10249".parse().expect("addr"),
        "/metrics",
    )
    .expect("scrape /metrics");
    assert_eq!(code, 200);
    let lines = body.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines)
        .expect("Prometheus text format")
        .samples
}

/// Total observations of a histogram across its label sets.
fn histogram_count(samples: &[prometheus_parse::Sample], name: &str) -> f64 {
    let count = format!("{name}_count");
    samples
        .iter()
        .filter(|s| s.metric == count)
        .map(|s| match s.value {
            prometheus_parse::Value::Untyped(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v) => v,
            _ => 0.0,
        })
        .sum()
}

fn sync_count(samples: &[prometheus_parse::Sample], family: &str) -> f64 {
    samples
        .iter()
        .find(|s| {
            s.metric == "kubeproxy_sync_proxy_rules_duration_seconds_count"
                && s.labels.get("ip_family") == Some(family)
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Untyped(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v) => v,
            _ => 0.0,
        })
        .unwrap_or(-1.0)
}

#[test]
fn metrics_and_health_check_node_port() {
    if !require_net_admin("metrics_and_health_check_node_port") {
        return;
    }
    let lb = |terminating: bool| {
        let svc = service("lb", &["172.30.0.9"])
            .port("p80", "TCP", 80, 3001)
            .load_balancer(&["1.2.3.4"])
            .external_local()
            .build();
        let mut svc = svc;
        svc["spec"]["healthCheckNodePort"] = Value::from(30000);
        let mk = |ip| {
            let e = ep(v4(ip), NODE_NAME);
            if terminating {
                e.terminating()
            } else {
                e
            }
        };
        let mut s = slice(
            "lb",
            false,
            &[("p80", "TCP", 80)],
            vec![mk(LPOD1_IP), mk(LPOD2_IP)],
        );
        s["metadata"]["name"] = Value::from("lb-slice");
        vec![svc, s]
    };
    let mut c = start(&lb(false));
    c.converge(
        sa(ip("172.30.0.9"), 80),
        &[v4(LPOD1_IP), v4(LPOD2_IP)],
        None,
    );

    // The load balancer's health check, from outside the node.
    let hc = sa(NODE_IP, 30000);
    let wait_hc = |c: &Cluster, code: u16, weight: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = Cluster::http(&c.topo.ext, hc, "/");
            if let Some((got, head, body)) = &r {
                if *got == code
                    && head
                        .to_ascii_lowercase()
                        .contains(&format!("x-load-balancing-endpoint-weight: {weight}"))
                {
                    assert!(body.contains("\"localEndpoints\""), "{body}");
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "health check never gave {code}/{weight}: {r:?}\n{}",
                c.kproxy.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_hc(&c, 200, "2");

    let samples = scrape(&c);
    let names: BTreeSet<&str> = samples.iter().map(|s| s.metric.as_str()).collect();
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "kubeproxy_network_programming_duration_seconds",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kubeproxy_proxy_healthz_total",
    ] {
        assert!(names.contains(name), "missing {name}");
    }
    let before = sync_count(&samples, "IPv4");
    assert!(before >= 1.0, "the first sync was not counted: {before}");

    // Only terminating local endpoints: traffic still flows to them, but the health
    // check says 503 so the load balancer drains the node. The slice carries the
    // controller's trigger time, which feeds network programming latency.
    let programming_before = histogram_count(
        &scrape(&c),
        "kubeproxy_network_programming_duration_seconds",
    );
    for mut o in lb(true) {
        if o["kind"] == "EndpointSlice" {
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            o["metadata"]["annotations"] =
                serde_json::json!({"endpoints.kubernetes.io/last-change-trigger-time": now});
        }
        c.api.apply(o);
    }
    wait_hc(&c, 503, "0");
    let samples = scrape(&c);
    let after = sync_count(&samples, "IPv4");
    assert!(
        after > before,
        "the sync histogram did not count the new sync: {before} -> {after}"
    );
    let programming = histogram_count(&samples, "kubeproxy_network_programming_duration_seconds");
    assert!(
        programming > programming_before,
        "network programming latency not observed: {programming_before} -> {programming}"
    );
}

/// Sends one datagram from a fixed source port and returns which endpoint answered.
fn udp_from_fixed_port(ns: &Netns, src: SocketAddr, dst: SocketAddr) -> Option<IpAddr> {
    ns.in_ns(move || {
        let s = std::net::UdpSocket::bind(src).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
        s.connect(dst).ok()?;
        s.send(b"ping\n").ok()?;
        let mut buf = [0u8; 256];
        let n = s.recv(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        let endpoint: SocketAddr = text.split_whitespace().next()?.parse().ok()?;
        Some(endpoint.ip())
    })
}

#[test]
fn udp_conntrack_entries_of_removed_endpoints_are_deleted() {
    if !require_net_admin("udp_conntrack_entries_of_removed_endpoints_are_deleted") {
        return;
    }
    let dns = |ips: &[Ipv4Addr]| {
        let mut s = slice(
            "dns",
            false,
            &[("dns", "UDP", 53)],
            ips.iter().map(|i| ep(v4(*i), NODE2_NAME)).collect(),
        );
        s["metadata"]["name"] = Value::from("dns-slice");
        s
    };
    let c = start(&[
        service("dns", &["172.30.0.53"])
            .port("dns", "UDP", 53, 0)
            .build(),
        dns(&[RPOD1_IP, RPOD2_IP]),
    ]);
    let vip = sa(ip("172.30.0.53"), 53);
    let src = sa(CLIENT_IP, 40053);
    let client = c.topo.pod("client").ns();
    // The first answer pins the flow (one conntrack entry) to one endpoint.
    let deadline = Instant::now() + Duration::from_secs(20);
    let pinned = loop {
        if let Some(ep) = udp_from_fixed_port(client, src, vip) {
            break ep;
        }
        assert!(
            Instant::now() < deadline,
            "UDP service never answered\n{}",
            c.kproxy.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for _ in 0..3 {
        assert_eq!(
            udp_from_fixed_port(client, src, vip),
            Some(pinned),
            "the flow must stay pinned"
        );
    }
    let other = if pinned == v4(RPOD1_IP) {
        RPOD2_IP
    } else {
        RPOD1_IP
    };
    // Remove the pinned endpoint (the pod itself keeps running and answering, so only
    // deleting the stale conntrack entry can move the flow).
    c.api.apply(dns(&[other]));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = udp_from_fixed_port(client, src, vip);
        if got == Some(v4(other)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the client's flow still goes to {got:?}, not {other}\n{}",
            c.kproxy.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let samples = scrape(&c);
    let deleted: f64 = samples
        .iter()
        .filter(|s| s.metric == "kubeproxy_conntrack_reconciler_deleted_entries_total")
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum();
    assert!(
        deleted >= 1.0,
        "the reconciler's deletion counter did not move: {deleted}"
    );
}

#[test]
fn hand_edits_to_the_table_are_detected_and_repaired() {
    if !require_net_admin("hand_edits_to_the_table_are_detected_and_repaired") {
        return;
    }
    let mut c = start(&[svc("a", "172.30.0.1"), eps("a", &[RPOD1_IP, RPOD2_IP])]);
    let a = sa(ip("172.30.0.1"), 80);
    let both = [v4(RPOD1_IP), v4(RPOD2_IP)];
    c.converge(a, &both, None);
    let drift = |c: &Cluster| {
        scrape(c)
            .iter()
            .filter(|s| s.metric == "kproxy_drift_detected_total")
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum::<f64>()
    };
    assert_eq!(drift(&c), 0.0, "no drift before anyone touched the table");

    // Somebody flushes an endpoint chain (whose content kproxy otherwise trusts by name)
    // and the service chain: traffic breaks until kproxy notices (within one syncPeriod
    // of 2 s) and rewrites them.
    let chains = c.topo.node.exec(&["nft", "list", "chains", "ip"]);
    let names: Vec<String> = chains
        .lines()
        .filter_map(|l| l.trim().strip_prefix("chain "))
        .map(|l| l.trim_end_matches(" {").trim().to_string())
        .filter(|n| n.contains("ns/a/"))
        .collect();
    let endpoint = names
        .iter()
        .find(|n| n.starts_with("endpoint-"))
        .expect("endpoint chain");
    let service_chain = names
        .iter()
        .find(|n| n.starts_with("service-"))
        .expect("service chain");
    for name in [endpoint, service_chain] {
        c.topo
            .node
            .exec(&["nft", "flush", "chain", "ip", "kproxy", name]);
    }
    c.converge(a, &both, None);
    assert!(drift(&c) >= 1.0, "drift was repaired but not counted");

    // Somebody deletes the whole table.
    let before = drift(&c);
    c.topo
        .node
        .exec(&["nft", "delete", "table", "ip", "kproxy"]);
    c.converge(a, &both, None);
    assert!(drift(&c) > before);
    assert!(c.kproxy.is_running());
}
