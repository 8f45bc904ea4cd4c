//! Kubernetes objects for tests, and running kproxy inside a topology's `node`.
//!
//! Objects are written as JSON documents (YAML's flow subset) into a manifest file that
//! the real `kproxy` binary reads with `--manifests`, exactly as a user would run it.

use super::topology::*;
use super::{Outcome, Probe, Proto, Tally};
use crate::support::Netns;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The node name kproxy runs as (`--hostname-override`).
pub const NODE_NAME: &str = "node-a";
/// The other node's name, owner of remote pods.
pub const NODE2_NAME: &str = "node-b";
/// This node's zone label.
pub const ZONE: &str = "zone-a";

/// The Node object for `node-a`, dual-stack, in zone-a.
pub fn node_object() -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE_NAME, "labels": {"topology.kubernetes.io/zone": ZONE}},
        "status": {"addresses": [
            {"type": "InternalIP", "address": NODE_IP.to_string()},
            {"type": "InternalIP", "address": NODE_IP6.to_string()}]}})
}

/// The cluster's ServiceCIDRs.
pub fn service_cidr_object() -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
        "metadata": {"name": "kubernetes"}, "spec": {"cidrs": [SERVICE_CIDR, SERVICE_CIDR6]}})
}

/// A Service under construction. Namespace `ns`, type ClusterIP, no ports.
#[derive(Debug, Clone)]
pub struct Svc {
    v: Value,
}

/// Starts a Service named `name` with the given ClusterIPs (one per family).
pub fn service(name: &str, cluster_ips: &[&str]) -> Svc {
    Svc {
        v: json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "ns", "name": name},
            "spec": {"type": "ClusterIP", "clusterIP": cluster_ips[0], "clusterIPs": cluster_ips, "ports": []}}),
    }
}

impl Svc {
    fn spec(&mut self) -> &mut serde_json::Map<String, Value> {
        self.v["spec"].as_object_mut().expect("spec is an object")
    }

    pub fn type_(mut self, t: &str) -> Self {
        self.spec().insert("type".into(), json!(t));
        self
    }

    /// Adds a port; `node_port` 0 means none.
    pub fn port(mut self, name: &str, proto: &str, port: u16, node_port: u16) -> Self {
        let mut p = json!({"name": name, "protocol": proto, "port": port});
        if node_port != 0 {
            p["nodePort"] = json!(node_port);
        }
        self.v["spec"]["ports"]
            .as_array_mut()
            .expect("ports array")
            .push(p);
        self
    }

    pub fn external_ips(mut self, ips: &[&str]) -> Self {
        self.spec().insert("externalIPs".into(), json!(ips));
        self
    }

    /// Makes it a LoadBalancer with these ingress IPs.
    pub fn load_balancer(mut self, ips: &[&str]) -> Self {
        self.spec().insert("type".into(), json!("LoadBalancer"));
        let ingress: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
        self.v["status"] = json!({"loadBalancer": {"ingress": ingress}});
        self
    }

    pub fn source_ranges(mut self, ranges: &[&str]) -> Self {
        self.spec()
            .insert("loadBalancerSourceRanges".into(), json!(ranges));
        self
    }

    pub fn external_local(mut self) -> Self {
        self.spec()
            .insert("externalTrafficPolicy".into(), json!("Local"));
        self
    }

    pub fn internal_local(mut self) -> Self {
        self.spec()
            .insert("internalTrafficPolicy".into(), json!("Local"));
        self
    }

    pub fn affinity(mut self, seconds: u32) -> Self {
        self.spec()
            .insert("sessionAffinity".into(), json!("ClientIP"));
        self.spec().insert(
            "sessionAffinityConfig".into(),
            json!({"clientIP": {"timeoutSeconds": seconds}}),
        );
        self
    }

    pub fn build(self) -> Value {
        self.v
    }
}

/// One endpoint of a slice.
#[derive(Debug, Clone)]
pub struct Ep {
    v: Value,
}

/// A Ready endpoint at `ip` on `node`.
pub fn ep(ip: IpAddr, node: &str) -> Ep {
    Ep {
        v: json!({"addresses": [ip.to_string()], "nodeName": node,
            "conditions": {"ready": true, "serving": true, "terminating": false}}),
    }
}

impl Ep {
    /// Sets the conditions (ready, serving, terminating).
    pub fn conditions(mut self, ready: bool, serving: bool, terminating: bool) -> Self {
        self.v["conditions"] =
            json!({"ready": ready, "serving": serving, "terminating": terminating});
        self
    }

    /// Terminating but still serving.
    pub fn terminating(self) -> Self {
        self.conditions(false, true, true)
    }

    /// Terminating and no longer serving.
    pub fn gone(self) -> Self {
        self.conditions(false, false, true)
    }

    pub fn zone_hints(mut self, zones: &[&str]) -> Self {
        let z: Vec<Value> = zones.iter().map(|z| json!({"name": z})).collect();
        self.v["hints"]["forZones"] = json!(z);
        self
    }

    pub fn node_hints(mut self, nodes: &[&str]) -> Self {
        let n: Vec<Value> = nodes.iter().map(|z| json!({"name": z})).collect();
        self.v["hints"]["forNodes"] = json!(n);
        self
    }
}

/// An EndpointSlice for Service `svc` with `ports` = (name, protocol, port).
pub fn slice(svc: &str, v6: bool, ports: &[(&str, &str, u16)], eps: Vec<Ep>) -> Value {
    static N: AtomicUsize = AtomicUsize::new(0);
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, port)| json!({"name": n, "protocol": p, "port": port}))
        .collect();
    let eps: Vec<Value> = eps.into_iter().map(|e| e.v).collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "ns", "name": format!("{svc}-{}", N.fetch_add(1, Ordering::Relaxed)),
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": if v6 { "IPv6" } else { "IPv4" },
        "endpoints": eps, "ports": ports})
}

/// Writes objects as a multi-document manifest in a fresh temporary file.
pub fn write_manifest(objects: &[Value]) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("kproxy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(format!("m{}.yaml", N.fetch_add(1, Ordering::Relaxed)));
    let docs: Vec<String> = objects.iter().map(Value::to_string).collect();
    std::fs::write(&path, docs.join("\n---\n")).expect("write manifest");
    path
}

/// Flags every test passes: this node's name and the pod CIDRs.
pub fn base_args() -> Vec<String> {
    vec![
        "--hostname-override".into(),
        NODE_NAME.into(),
        "--cluster-cidr".into(),
        format!("{CLUSTER_CIDR},{CLUSTER_CIDR6}"),
    ]
}

/// Runs `kproxy --manifests … --once` in `node` with the Node and ServiceCIDR objects
/// added; panics with kproxy's output if it fails. Returns its stderr.
pub fn sync_once(node: &Netns, objects: &[Value], args: &[String]) -> String {
    let mut all = vec![node_object(), service_cidr_object()];
    all.extend_from_slice(objects);
    let path = write_manifest(&all);
    let mut cmd = node.command(env!("CARGO_BIN_EXE_kproxy"));
    cmd.arg("--manifests").arg(&path).arg("--once").args(args);
    let out = cmd.output().expect("run kproxy");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "kproxy --once failed ({}):\n{stderr}",
        out.status
    );
    stderr
}

/// What a flow is expected to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Answered by exactly these endpoint IPs (every one of them over repeated tries),
    /// with or without the source masqueraded.
    Endpoints {
        ips: Vec<IpAddr>,
        port: Option<u16>,
        masq: bool,
    },
    Reject,
    Drop,
    /// Not touched by kproxy: answered by the node's own listener at this address.
    Host(IpAddr),
}

/// Shorthand for [`Expect::Endpoints`].
pub fn reach(ips: &[IpAddr], masq: bool) -> Expect {
    Expect::Endpoints {
        ips: ips.to_vec(),
        port: None,
        masq,
    }
}

/// One flow: from a namespace, with an explicit source address, to a destination.
#[derive(Debug)]
pub struct Flow<'a> {
    pub name: String,
    pub proto: Proto,
    pub from: &'a Netns,
    pub src: IpAddr,
    pub dst: SocketAddr,
    pub expect: Expect,
}

/// Builds a flow.
pub fn flow<'a>(
    name: impl Into<String>,
    proto: Proto,
    from: &'a Netns,
    src: impl Into<IpAddr>,
    dst: SocketAddr,
    expect: Expect,
) -> Flow<'a> {
    Flow {
        name: name.into(),
        proto,
        from,
        src: src.into(),
        dst,
        expect,
    }
}

fn check(f: &Flow<'_>) -> Result<(), String> {
    let tries = match &f.expect {
        Expect::Endpoints { ips, .. } if ips.len() > 1 => 12 * ips.len(),
        Expect::Endpoints { .. } | Expect::Host(_) => 3,
        Expect::Reject | Expect::Drop => 1,
    };
    let tally: Tally = Probe::new(f.proto, f.from, f.dst)
        .from(f.src)
        .run_many(tries);
    let fail = |why: String| {
        Err(format!(
            "{} ({} {} -> {}): {why}; got {tally}",
            f.name,
            f.proto.as_str(),
            f.src,
            f.dst
        ))
    };
    match &f.expect {
        Expect::Endpoints { ips, port, masq } => {
            if !tally.all_answered() {
                return fail("not every attempt was answered".into());
            }
            let got: BTreeSet<IpAddr> = tally.endpoints.iter().map(SocketAddr::ip).collect();
            let want: BTreeSet<IpAddr> = ips.iter().copied().collect();
            if got != want {
                return fail(format!("expected endpoints {want:?}"));
            }
            if let Some(p) = port {
                if tally.endpoints.iter().any(|e| e.port() != *p) {
                    return fail(format!("expected target port {p}"));
                }
            }
            let saw_client = tally.seen_sources.contains(&f.src);
            if *masq && saw_client {
                return fail("expected the source to be masqueraded".into());
            }
            if !*masq && (tally.seen_sources.len() != 1 || !saw_client) {
                return fail("expected the client's own source address".into());
            }
            Ok(())
        }
        Expect::Host(ip) => {
            if tally.all_answered() && tally.endpoints.iter().all(|e| e.ip() == *ip) {
                Ok(())
            } else {
                fail(format!("expected the node's own listener at {ip}"))
            }
        }
        Expect::Reject => match tally.failures.as_slice() {
            [Outcome::Rejected] => Ok(()),
            _ => fail("expected REJECT".into()),
        },
        Expect::Drop => match tally.failures.as_slice() {
            [Outcome::Dropped] => Ok(()),
            _ => fail("expected DROP".into()),
        },
    }
}

/// Runs flows concurrently (drops cost one timeout, not one each) and panics listing
/// every flow that misbehaved, with the topology's state for diagnosis.
pub fn check_flows(topo: &Topology, flows: &[Flow<'_>]) {
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = flows.iter().map(|f| s.spawn(move || check(f))).collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().expect("probe thread panicked").err())
            .collect()
    });
    if !errors.is_empty() {
        panic!(
            "{} of {} flows failed:\n  {}\n\n{}",
            errors.len(),
            flows.len(),
            errors.join("\n  "),
            topo.diagnostics()
        );
    }
}

/// `ip:port` for an address of either family.
pub fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Parses an address literal in tests.
pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|_| panic!("bad test address {s}"))
}

/// Decodes JSON objects into the model's input, as the manifests loader would.
pub fn cluster_objects(all: Vec<Value>) -> kproxy::model::ClusterObjects {
    let mut objs = kproxy::model::ClusterObjects::default();
    for o in all {
        match o["kind"].as_str() {
            Some("Service") => objs.services.push(serde_json::from_value(o).expect("svc")),
            Some("EndpointSlice") => objs
                .endpoint_slices
                .push(serde_json::from_value(o).expect("slice")),
            Some("Node") => objs.nodes.push(serde_json::from_value(o).expect("node")),
            Some("ServiceCIDR") => objs
                .service_cidrs
                .push(serde_json::from_value(o).expect("cidr")),
            other => panic!("unexpected kind {other:?}"),
        }
    }
    objs
}

/// A long-lived echo server on `addr:port` inside `ns`: every line sent comes back, for
/// connections that must survive syncs and restarts.
pub fn echo_server(ns: &Netns, addr: IpAddr, port: u16) {
    use std::io::{BufRead, BufReader, Write};
    let listener = ns.in_ns(move || std::net::TcpListener::bind((addr, port)).expect("bind echo"));
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = conn.try_clone().expect("clone");
                for line in BufReader::new(conn).lines().map_while(Result::ok) {
                    if writeln!(w, "{line}").is_err() {
                        break;
                    }
                }
            });
        }
    });
}
