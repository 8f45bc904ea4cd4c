//! `kproxy explain NS/SERVICE`: how this node handles one Service, and why.
//!
//! Why: a Service's behaviour on a node is decided in one place — the model's
//! categorisation of its endpoints (ready, terminating fallback, topology hints, traffic
//! policies) — but that decision is invisible in the kernel, where it only shows up as
//! which endpoint chains a load-balancing chain lists. `explain` prints the decision
//! itself: per IP family and service port, the addresses and policies, the topology mode
//! and the reason for it, every endpoint with its conditions and hints and whether it
//! serves cluster traffic and local traffic (and why, in the words of
//! [`crate::model::topology`]), the health-check node port's answer, and the kernel
//! objects that implement the port. With `--live` each object is checked against the
//! kernel's table, read back into the same typed model kproxy writes from.
//!
//! Exit codes: 0 explained, 1 an error (unknown Service, unreadable manifests, no
//! privilege for `--live`), 2 a usage error, 3 with `--live`: some object of this Service
//! is missing from the kernel or differs from what kproxy intends (drift).

use crate::model::{HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL};
use crate::trace_cmd::{
    family_kw, CmdError, NodeArgs, NodeView, OutputFormat, EXIT_DRIFT, EXIT_OK,
};
use clap::Parser;
use kproxy_backend_api::{
    Endpoint, IpFamily, ServiceName, ServicePortPlan, TopologyMode, TrafficPolicy,
};
use kproxy_nftables::eval::{endpoint_of, Ruleset};
use kproxy_nftables::objects::{self, MapId, Verdict, REJECT_CHAIN};
use serde_json::{json, Value};
use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;

/// `kproxy explain`.
#[derive(Debug, Parser)]
#[command(
    name = "kproxy explain",
    about = "Explain how this node handles one Service: ports, endpoints and why each is used, topology, health check, kernel objects",
    override_usage = "kproxy explain [OPTIONS] --manifests PATH NS/SERVICE",
    after_help = "Exit codes: 0 explained, 1 error, 2 usage error, 3 with --live: an object of this Service is missing from the kernel or differs (drift).\nExample: kproxy explain --manifests examples/demo.yaml --hostname-override node-a --cluster-cidr 10.0.0.0/8 ns2/svc2"
)]
pub struct ExplainArgs {
    /// The Service, as NAMESPACE/NAME (a bare NAME means namespace `default`).
    #[arg(value_name = "NS/SERVICE")]
    pub service: String,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// Entry point of `kproxy explain …` (`args` is the whole argv).
pub fn main(args: Vec<OsString>) -> ExitCode {
    crate::trace_cmd::command_main::<ExplainArgs>(args, "explain", run)
}

/// Explains the Service and writes the report; returns the exit code.
pub fn run(args: &ExplainArgs, out: &mut dyn Write) -> Result<u8, CmdError> {
    if args.node.manifests.is_none() {
        return Err(CmdError::Usage(
            "explain needs --manifests PATH (the Service and its EndpointSlices); add --live to check the kernel's objects too".into(),
        ));
    }
    let view = NodeView::load(&args.node)?;
    let ex = explain(&args.service, &view)?;
    let text = match args.node.output {
        OutputFormat::Json => {
            let mut s = serde_json::to_string_pretty(&ex.to_json())
                .map_err(|e| CmdError::Output(std::io::Error::other(e)))?;
            s.push('\n');
            s
        }
        OutputFormat::Text => ex.text(),
    };
    out.write_all(text.as_bytes()).map_err(CmdError::Output)?;
    Ok(ex.exit_code())
}

/// Whether an endpoint carries some kind of traffic, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub used: bool,
    pub reason: String,
}

impl Usage {
    fn yes(reason: impl Into<String>) -> Usage {
        Usage {
            used: true,
            reason: reason.into(),
        }
    }

    fn no(reason: impl Into<String>) -> Usage {
        Usage {
            used: false,
            reason: reason.into(),
        }
    }

    fn words(&self) -> String {
        format!("{}: {}", if self.used { "yes" } else { "no" }, self.reason)
    }

    fn to_json(&self) -> Value {
        json!({"used": self.used, "reason": self.reason})
    }
}

/// The topology filter on cluster endpoints, and why (upstream's rules, as in
/// [`crate::model::topology::topology_mode`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyDecision {
    /// `none`, `zone`, `node` or `not applied`.
    pub kind: &'static str,
    /// The mode in words (`zone hints (zone-a)`).
    pub mode: String,
    pub reason: String,
}

/// Decides, in words, which topology mode applies to a port's cluster endpoints.
pub fn topology_decision(
    plan: &ServicePortPlan,
    node_name: &str,
    zone: Option<&str>,
) -> TopologyDecision {
    let cat = &plan.categorized;
    if !plan.port.uses_cluster_endpoints() {
        return TopologyDecision {
            kind: "not applied",
            mode: "not applied".into(),
            reason: "internalTrafficPolicy=Local and the port is not reachable from outside: only this node's endpoints are used, and hints never filter those".into(),
        };
    }
    let ready: Vec<&Endpoint> = plan.endpoints.iter().filter(|e| e.ready).collect();
    match &cat.topology {
        TopologyMode::PreferSameNode { node } => {
            let n = ready.iter().filter(|e| e.node_hints.contains(node)).count();
            TopologyDecision {
                kind: "node",
                mode: format!("node hints ({node})"),
                reason: format!(
                    "every ready endpoint has a node hint and {n} of {} name this node: cluster traffic only goes to those",
                    ready.len()
                ),
            }
        }
        TopologyMode::PreferSameZone { zone } => {
            let n = ready.iter().filter(|e| e.zone_hints.contains(zone)).count();
            TopologyDecision {
                kind: "zone",
                mode: format!("zone hints ({zone})"),
                reason: format!(
                    "every ready endpoint has a zone hint and {n} of {} are hinted for {zone}: cluster traffic only goes to those",
                    ready.len()
                ),
            }
        }
        TopologyMode::None => {
            let reason = if ready.is_empty() {
                if cat.cluster_uses_terminating {
                    "no endpoint is ready; hints are not used for the serving+terminating fallback"
                        .to_string()
                } else {
                    "no endpoint is ready".to_string()
                }
            } else if ready
                .iter()
                .all(|e| e.zone_hints.is_empty() && e.node_hints.is_empty())
            {
                "the endpoints carry no topology hints".to_string()
            } else {
                let mut why = Vec::new();
                if ready.iter().all(|e| !e.node_hints.is_empty()) {
                    why.push(format!("no endpoint is hinted for node {node_name}"));
                }
                match zone.filter(|z| !z.is_empty()) {
                    None => {
                        why.push("this node has no topology.kubernetes.io/zone label".to_string())
                    }
                    Some(z) => match ready.iter().find(|e| e.zone_hints.is_empty()) {
                        Some(e) if ready.iter().any(|e| !e.zone_hints.is_empty()) => {
                            why.push(format!("{} has no zone hint", e.socket_addr()))
                        }
                        Some(_) => {}
                        None => why.push(format!("no endpoint is hinted for zone {z}")),
                    },
                }
                format!("hints ignored: {}", why.join("; "))
            };
            TopologyDecision {
                kind: "none",
                mode: "none".into(),
                reason,
            }
        }
    }
}

fn contains(list: &[Endpoint], ep: &Endpoint) -> bool {
    list.iter().any(|e| e.socket_addr() == ep.socket_addr())
}

fn not_usable(ep: &Endpoint) -> &'static str {
    if !ep.serving {
        "not ready/serving"
    } else {
        "not ready"
    }
}

/// Whether an endpoint serves cluster traffic (cluster-wide policies), and why.
pub fn cluster_usage(plan: &ServicePortPlan, ep: &Endpoint) -> Usage {
    let cat = &plan.categorized;
    if !plan.port.uses_cluster_endpoints() {
        return Usage::no("not used: policy Local");
    }
    if contains(&cat.cluster, ep) {
        if cat.cluster_uses_terminating {
            return Usage::yes("terminating fallback (nothing ready)");
        }
        return Usage::yes(match &cat.topology {
            TopologyMode::None => "ready".to_string(),
            TopologyMode::PreferSameZone { zone } => format!("ready, hinted for {zone}"),
            TopologyMode::PreferSameNode { node } => format!("ready, hinted for node {node}"),
        });
    }
    if ep.ready {
        return Usage::no(match &cat.topology {
            TopologyMode::PreferSameZone { zone } => format!("filtered out: not hinted for {zone}"),
            TopologyMode::PreferSameNode { node } => {
                format!("filtered out: not hinted for node {node}")
            }
            TopologyMode::None => "not selected".to_string(),
        });
    }
    if ep.serving_terminating() {
        return Usage::no("terminating (ready endpoints exist)");
    }
    Usage::no(not_usable(ep))
}

/// Whether an endpoint serves node-local traffic (Local policies), and why.
pub fn local_usage(plan: &ServicePortPlan, ep: &Endpoint) -> Usage {
    let cat = &plan.categorized;
    if !plan.port.uses_local_endpoints() {
        return Usage::no("not used: policy Cluster");
    }
    if contains(&cat.local, ep) {
        if cat.local_uses_terminating {
            return Usage::yes("local terminating fallback");
        }
        return Usage::yes("local ready");
    }
    if !ep.is_local {
        return Usage::no("not on this node");
    }
    if ep.serving_terminating() {
        return Usage::no("terminating (a local endpoint is ready)");
    }
    Usage::no(not_usable(ep))
}

/// One endpoint's row.
#[derive(Debug, Clone)]
pub struct EndpointRow {
    pub endpoint: Endpoint,
    pub cluster: Usage,
    pub local: Usage,
}

/// The state of a kernel object in the live table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveStatus {
    Present,
    Missing,
    Differs(String),
}

impl LiveStatus {
    fn word(&self) -> &'static str {
        match self {
            LiveStatus::Present => "ok",
            LiveStatus::Missing => "MISSING",
            LiveStatus::Differs(_) => "DIFFERS",
        }
    }
}

/// One kernel object that implements a service port.
#[derive(Debug, Clone)]
pub struct KernelObject {
    /// `chain`, `set` (affinity) or `element`.
    pub kind: &'static str,
    /// The chain or set name; for elements `map key → verdict`.
    pub name: String,
    /// What it does, in words.
    pub role: String,
    /// With `--live`: whether the kernel holds it as intended.
    pub live: Option<LiveStatus>,
}

/// The health-check node port (eTP=Local LoadBalancers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub node_port: u16,
    pub local_ready: usize,
    pub status: u16,
}

/// Everything about one service port in one family.
#[derive(Debug, Clone)]
pub struct PortExplanation {
    pub family: IpFamily,
    pub plan: ServicePortPlan,
    pub topology: TopologyDecision,
    /// Where ClusterIP traffic goes, in words.
    pub cluster_ip_traffic: String,
    /// Where external traffic goes (None when the port is not reachable from outside).
    pub external_traffic: Option<String>,
    pub endpoints: Vec<EndpointRow>,
    pub health_check: Option<HealthCheck>,
    pub objects: Vec<KernelObject>,
    /// With `--live` and no table of this family at all.
    pub table_missing: bool,
}

/// The explanation of one Service on this node.
#[derive(Debug, Clone)]
pub struct Explanation {
    pub service: ServiceName,
    pub service_type: String,
    pub node: String,
    pub zone: Option<String>,
    /// Why kproxy programs nothing for the Service, when it does not.
    pub not_programmed: Option<String>,
    pub ports: Vec<PortExplanation>,
    pub live: bool,
    pub warnings: Vec<String>,
}

/// Parses `NS/NAME` (a bare `NAME` is in `default`).
pub fn parse_service(s: &str) -> Result<ServiceName, CmdError> {
    let (ns, name) = s.split_once('/').unwrap_or(("default", s));
    if ns.is_empty() || name.is_empty() || name.contains('/') {
        return Err(CmdError::Usage(format!("{s:?} is not NAMESPACE/SERVICE")));
    }
    Ok(ServiceName::new(ns, name))
}

/// Builds the explanation of `service` from the loaded view (which must hold manifests).
pub fn explain(service: &str, view: &NodeView) -> Result<Explanation, CmdError> {
    let name = parse_service(service)?;
    let (Some(m), Some(state)) = (&view.manifests, &view.state) else {
        return Err(CmdError::Usage("explain needs --manifests".into()));
    };
    let svc = m
        .services
        .iter()
        .find(|s| {
            s.metadata.namespace.as_deref().unwrap_or("default") == name.namespace
                && s.metadata.name.as_deref() == Some(name.name.as_str())
        })
        .ok_or_else(|| CmdError::UnknownService(name.to_string()))?;
    let spec = svc.spec.as_ref();
    let service_type = spec
        .and_then(|s| s.type_.clone())
        .unwrap_or_else(|| "ClusterIP".into());
    let mut ex = Explanation {
        service: name.clone(),
        service_type,
        node: view.node_name.clone(),
        zone: state.zone.clone(),
        not_programmed: None,
        ports: Vec::new(),
        live: view.live,
        warnings: view.warnings.clone(),
    };
    for (family, fam) in &state.families {
        let Some(plans) = fam.services.get(&name) else {
            continue;
        };
        let desired = Ruleset::desired(&fam.node, &fam.services);
        let live = view.live_ruleset(*family)?;
        for plan in plans {
            ex.ports.push(explain_port(
                view,
                *family,
                fam,
                plan,
                &desired,
                live.as_ref(),
            ));
        }
    }
    if ex.ports.is_empty() {
        let labels = svc.metadata.labels.as_ref();
        let invalid = state
            .invalid
            .iter()
            .find(|i| i.kind == "Service" && i.namespace == name.namespace && i.name == name.name);
        ex.not_programmed = Some(if let Some(i) = invalid {
            format!("the Service is invalid and skipped: {}", i.reason)
        } else if labels.is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)) {
            format!("it belongs to another proxy (label {SERVICE_PROXY_NAME_LABEL})")
        } else if ex.service_type == "ExternalName" {
            "type ExternalName: DNS only, nothing to proxy".into()
        } else if spec.is_some_and(|s| {
            s.cluster_ip.as_deref() == Some("None")
                || s.cluster_ips.iter().flatten().any(|c| c == "None")
        }) || labels.is_some_and(|l| l.contains_key(HEADLESS_LABEL))
        {
            "headless (clusterIP None): DNS only, nothing to proxy".into()
        } else {
            "it has no ClusterIP or no ports".into()
        });
    }
    Ok(ex)
}

fn policy(p: TrafficPolicy) -> &'static str {
    match p {
        TrafficPolicy::Cluster => "Cluster",
        TrafficPolicy::Local => "Local",
    }
}

fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn explain_port(
    view: &NodeView,
    family: IpFamily,
    fam: &crate::model::FamilyState,
    plan: &ServicePortPlan,
    desired: &Ruleset,
    live: Option<&Ruleset>,
) -> PortExplanation {
    let sp = &plan.port;
    let cat = &plan.categorized;
    let topology = topology_decision(plan, &view.node_name, view.zone());
    let cluster_ip_traffic = if plan.has_internal_endpoints() {
        match sp.internal_policy {
            TrafficPolicy::Cluster => format!(
                "{} anywhere in the cluster",
                count(cat.cluster.len(), "endpoint")
            ),
            TrafficPolicy::Local => format!(
                "{} on this node (internalTrafficPolicy=Local)",
                count(cat.local.len(), "endpoint")
            ),
        }
    } else if plan.has_endpoints() {
        "DROP: internalTrafficPolicy=Local and no endpoint on this node".into()
    } else {
        "REJECT: no endpoints".into()
    };
    let external_traffic = sp.externally_accessible().then(|| {
        if plan.has_external_endpoints() {
            if sp.external_policy_local() {
                format!(
                    "{} on this node, the client's source address kept (externalTrafficPolicy=Local); pods and the node itself go to every cluster endpoint",
                    count(cat.local.len(), "endpoint")
                )
            } else {
                format!(
                    "{} anywhere in the cluster, masqueraded (externalTrafficPolicy=Cluster)",
                    count(cat.cluster.len(), "endpoint")
                )
            }
        } else if plan.has_endpoints() {
            "DROP from outside: externalTrafficPolicy=Local and no endpoint on this node (pods and the node itself still reach the cluster endpoints)".into()
        } else {
            "REJECT: no endpoints".into()
        }
    });
    let endpoints = plan
        .endpoints
        .iter()
        .map(|e| EndpointRow {
            endpoint: e.clone(),
            cluster: cluster_usage(plan, e),
            local: local_usage(plan, e),
        })
        .collect();
    let health_check = sp.health_check_node_port.map(|node_port| {
        let local_ready = plan.local_ready_endpoints();
        HealthCheck {
            node_port,
            local_ready,
            status: if local_ready > 0 { 200 } else { 503 },
        }
    });
    let objects = kernel_objects(fam, plan, desired, live);
    PortExplanation {
        family,
        plan: plan.clone(),
        topology,
        cluster_ip_traffic,
        external_traffic,
        endpoints,
        health_check,
        objects,
        table_missing: live.is_some_and(|l| l.chains.is_empty() && l.elements.is_empty()),
    }
}

/// What a per-service chain does, from its name.
fn chain_role(name: &str, plan: &ServicePortPlan) -> String {
    let cat = &plan.categorized;
    match name.split_once('-').map(|(k, _)| k) {
        Some("service") => format!(
            "load-balances over the cluster endpoints ({})",
            cat.cluster.len()
        ),
        Some("local") => format!(
            "load-balances over this node's endpoints ({})",
            cat.local.len()
        ),
        Some("external") => "entry for NodePort, externalIP and LoadBalancer traffic".into(),
        Some("firewall") => "drops sources outside loadBalancerSourceRanges".into(),
        Some("endpoint") => match endpoint_of(name) {
            Some(ep) => format!("DNAT to {ep} (masquerades a hairpin)"),
            None => "DNAT to an endpoint".into(),
        },
        _ => String::new(),
    }
}

fn element_role(map: MapId, verdict: Option<&Verdict>) -> String {
    let reject = matches!(verdict, Some(Verdict::Goto(c)) if c.as_str() == REJECT_CHAIN);
    match map {
        MapId::ClusterIps => "an allocated ClusterIP (other ports on it are rejected)".into(),
        MapId::NodeportIps => "an address that accepts NodePorts".into(),
        MapId::ServiceIps => "dispatches this address and port".into(),
        MapId::ServiceNodeports => "dispatches this NodePort".into(),
        MapId::NoEndpointServices | MapId::NoEndpointNodeports if reject => {
            "rejects: no endpoints".into()
        }
        MapId::NoEndpointServices | MapId::NoEndpointNodeports => {
            "drops: policy Local and no endpoint on this node".into()
        }
        MapId::FirewallIps => "sends LoadBalancer traffic through the source-range check".into(),
    }
}

/// The objects `objects::service_objects` produces for this port, checked against the
/// live table when given.
fn kernel_objects(
    fam: &crate::model::FamilyState,
    plan: &ServicePortPlan,
    desired: &Ruleset,
    live: Option<&Ruleset>,
) -> Vec<KernelObject> {
    let o = objects::service_objects(&fam.node, std::slice::from_ref(plan));
    let mut out = Vec::new();
    // Referencing chains first, endpoint chains after: the order a packet meets them.
    let mut chains: Vec<_> = o.chains.iter().collect();
    chains.sort_by_key(|c| c.name.as_str().starts_with("endpoint-"));
    for c in chains {
        let status = live.map(
            |l| match (l.chains.get(&c.name), desired.chains.get(&c.name)) {
                (None, _) => LiveStatus::Missing,
                (Some(have), Some(want)) if have != want => LiveStatus::Differs(format!(
                    "the kernel holds {} rule(s), kproxy intends {}",
                    have.len(),
                    want.len()
                )),
                _ => LiveStatus::Present,
            },
        );
        out.push(KernelObject {
            kind: "chain",
            name: c.name.to_string(),
            role: chain_role(c.name.as_str(), plan),
            live: status,
        });
    }
    for s in &o.affinity_sets {
        let status = live.map(|l| match l.affinity_sets.get(&s.name) {
            None => LiveStatus::Missing,
            Some(t) if *t != s.timeout_seconds => LiveStatus::Differs(format!(
                "timeout {t}s in the kernel, intended {}s",
                s.timeout_seconds
            )),
            Some(_) => LiveStatus::Present,
        });
        let ep = endpoint_of(s.name.as_str())
            .map(|e| e.to_string())
            .unwrap_or_else(|| "an endpoint".into());
        out.push(KernelObject {
            kind: "set",
            name: s.name.to_string(),
            role: format!("remembers clients of {ep} for {}s", s.timeout_seconds),
            live: status,
        });
    }
    for e in &o.elements {
        let verdict_words = |v: &Option<Verdict>| match v {
            Some(v) => format!(" → {v}"),
            None => String::new(),
        };
        let name = format!("{} {}{}", e.map, e.key, verdict_words(&e.verdict));
        let winner = desired.elements.get(&e.map).and_then(|m| m.get(&e.key));
        let mut role = element_role(e.map, e.verdict.as_ref());
        if let Some(w) = winner.filter(|w| **w != e.verdict) {
            role.push_str(&format!(
                " (but another object claims this key: kproxy programs{})",
                verdict_words(w)
            ));
        }
        let status = live.map(|l| {
            let have = l.elements.get(&e.map).and_then(|m| m.get(&e.key));
            let want = winner.unwrap_or(&e.verdict);
            match have {
                None => LiveStatus::Missing,
                Some(h) if h != want => LiveStatus::Differs(format!(
                    "the kernel has{}",
                    match h {
                        Some(v) => format!(" → {v}"),
                        None => " no verdict".into(),
                    }
                )),
                Some(_) => LiveStatus::Present,
            }
        });
        out.push(KernelObject {
            kind: "element",
            name,
            role,
            live: status,
        });
    }
    out
}

impl Explanation {
    /// Whether `--live` found an object of this Service missing or different.
    pub fn has_drift(&self) -> bool {
        self.ports.iter().any(|p| {
            p.objects
                .iter()
                .any(|o| matches!(o.live, Some(LiveStatus::Missing | LiveStatus::Differs(_))))
        })
    }

    pub fn exit_code(&self) -> u8 {
        if self.has_drift() {
            EXIT_DRIFT
        } else {
            EXIT_OK
        }
    }

    /// The explanation in plain words, with an endpoint table per port.
    pub fn text(&self) -> String {
        let mut s = format!(
            "Service {} ({}) on node {}{}\n",
            self.service,
            self.service_type,
            self.node,
            match &self.zone {
                Some(z) => format!(", zone {z}"),
                None => ", no zone label".into(),
            }
        );
        if let Some(why) = &self.not_programmed {
            s.push_str(&format!("kproxy programs nothing for it: {why}\n"));
        }
        for p in &self.ports {
            s.push('\n');
            s.push_str(&p.text(self.live));
        }
        for w in &self.warnings {
            s.push_str(&format!("warning: {w}\n"));
        }
        s
    }

    pub fn to_json(&self) -> Value {
        json!({
            "service": self.service.to_string(),
            "type": self.service_type,
            "node": self.node,
            "zone": self.zone,
            "programmed": self.not_programmed.is_none(),
            "not_programmed_reason": self.not_programmed,
            "ports": self.ports.iter().map(PortExplanation::to_json).collect::<Vec<_>>(),
            "drift": self.has_drift(),
            "exit_code": self.exit_code(),
            "warnings": self.warnings,
        })
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn hints_words(e: &Endpoint) -> String {
    let mut parts = Vec::new();
    if !e.zone_hints.is_empty() {
        parts.push(format!("zones={}", e.zone_hints.join(",")));
    }
    if !e.node_hints.is_empty() {
        parts.push(format!("nodes={}", e.node_hints.join(",")));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

/// Left-aligned columns, two spaces apart.
fn table(rows: &[Vec<String>], indent: &str) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|v| v.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut s = String::new();
    for r in rows {
        let mut line = String::from(indent);
        for (i, v) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(v);
            } else {
                let pad = widths[i].saturating_sub(v.chars().count()) + 2;
                line.push_str(v);
                line.push_str(&" ".repeat(pad));
            }
        }
        s.push_str(line.trim_end());
        s.push('\n');
    }
    s
}

impl PortExplanation {
    fn text(&self, live: bool) -> String {
        let sp = &self.plan.port;
        let cat = &self.plan.categorized;
        let mut s = format!(
            "{} port {}/{}\n",
            self.family,
            if sp.name.port.is_empty() {
                "(unnamed)"
            } else {
                sp.name.port.as_str()
            },
            sp.name.protocol
        );
        let mut addrs = vec![format!("ClusterIP {}", sa(sp.cluster_ip, sp.port))];
        addrs.extend(
            sp.external_ips
                .iter()
                .map(|ip| format!("externalIP {}", sa(*ip, sp.port))),
        );
        addrs.extend(
            sp.load_balancer_ips
                .iter()
                .map(|ip| format!("LoadBalancer {}", sa(*ip, sp.port))),
        );
        if let Some(np) = sp.node_port {
            addrs.push(format!("NodePort {np}"));
        }
        let mut lines: Vec<(&str, String)> = vec![
            ("addresses", addrs.join(", ")),
            (
                "policies",
                format!(
                    "internalTrafficPolicy={}, externalTrafficPolicy={}{}",
                    policy(sp.internal_policy),
                    policy(sp.external_policy),
                    if sp.externally_accessible() {
                        ""
                    } else {
                        " (not reachable from outside: eTP does not apply)"
                    }
                ),
            ),
            (
                "session affinity",
                match sp.session_affinity_seconds {
                    Some(t) => format!("ClientIP, {t}s"),
                    None => "none".into(),
                },
            ),
        ];
        if !sp.source_ranges.is_empty() {
            lines.push((
                "source ranges",
                sp.source_ranges
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            ));
        }
        lines.push((
            "topology",
            format!("{}: {}", self.topology.mode, self.topology.reason),
        ));
        if sp.uses_local_endpoints() && sp.uses_cluster_endpoints() && self.topology.kind != "none"
        {
            lines.push((
                "",
                "(Local policies use this node's endpoints, never filtered by hints)".into(),
            ));
        }
        if cat.cluster_uses_terminating {
            lines.push((
                "fallback",
                "cluster: no endpoint is ready, serving+terminating endpoints are used".into(),
            ));
        }
        if cat.local_uses_terminating {
            lines.push((
                "fallback",
                "local: no local endpoint is ready, local serving+terminating endpoints are used"
                    .into(),
            ));
        }
        lines.push(("ClusterIP traffic", self.cluster_ip_traffic.clone()));
        if let Some(e) = &self.external_traffic {
            lines.push(("external traffic", e.clone()));
        }
        if let Some(h) = &self.health_check {
            lines.push((
                "health check",
                format!(
                    "node port {} answers {} ({} local ready endpoint{}){}",
                    h.node_port,
                    h.status,
                    h.local_ready,
                    if h.local_ready == 1 { "" } else { "s" },
                    if h.status == 200 {
                        " while kproxy is healthy"
                    } else {
                        ": load balancers send this node no traffic"
                    }
                ),
            ));
        }
        let width = lines.iter().map(|(l, _)| l.len()).max().unwrap_or(0) + 1;
        for (label, words) in &lines {
            let label = if label.is_empty() {
                String::new()
            } else {
                format!("{label}:")
            };
            s.push_str(&format!("  {label:<width$} {words}\n"));
        }
        if self.endpoints.is_empty() {
            s.push_str("  endpoints: none\n");
        } else {
            s.push_str(&format!("  endpoints ({}):\n", self.endpoints.len()));
            let mut rows = vec![[
                "ENDPOINT",
                "NODE",
                "ZONE",
                "READY",
                "SERVING",
                "TERMINATING",
                "HINTS",
                "CLUSTER TRAFFIC",
                "LOCAL TRAFFIC",
            ]
            .map(String::from)
            .to_vec()];
            for r in &self.endpoints {
                let e = &r.endpoint;
                let node = match (&e.node_name, e.is_local) {
                    (Some(n), true) => format!("{n} (this)"),
                    (Some(n), false) => n.clone(),
                    (None, _) => "-".into(),
                };
                rows.push(vec![
                    e.socket_addr().to_string(),
                    node,
                    e.zone.clone().unwrap_or_else(|| "-".into()),
                    yes_no(e.ready).into(),
                    yes_no(e.serving).into(),
                    yes_no(e.terminating).into(),
                    hints_words(e),
                    r.cluster.words(),
                    r.local.words(),
                ]);
            }
            s.push_str(&table(&rows, "    "));
        }
        if self.objects.is_empty() {
            s.push_str("  kernel objects: none\n");
        } else {
            s.push_str(&format!(
                "  kernel objects (table {} kproxy){}:\n",
                family_kw(self.family),
                if live {
                    if self.table_missing {
                        ", checked against the kernel: the table does not exist"
                    } else {
                        ", checked against the kernel"
                    }
                } else {
                    ""
                }
            ));
            let rows: Vec<Vec<String>> = self
                .objects
                .iter()
                .map(|o| {
                    let mut r = Vec::new();
                    if let Some(l) = &o.live {
                        r.push(format!("[{}]", l.word()));
                    }
                    let role = match &o.live {
                        Some(LiveStatus::Differs(w)) => format!("{} — {w}", o.role),
                        _ => o.role.clone(),
                    };
                    r.extend([o.kind.to_string(), o.name.clone(), role]);
                    r
                })
                .collect();
            s.push_str(&table(&rows, "    "));
        }
        s
    }

    fn to_json(&self) -> Value {
        let sp = &self.plan.port;
        let cat = &self.plan.categorized;
        let strs = |v: &[std::net::IpAddr]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        json!({
            "family": self.family.label(),
            "name": sp.name.port,
            "service_port": sp.name.to_string(),
            "protocol": sp.name.protocol.as_str(),
            "cluster_ip": sp.cluster_ip.to_string(),
            "port": sp.port,
            "node_port": sp.node_port,
            "external_ips": strs(&sp.external_ips),
            "load_balancer_ips": strs(&sp.load_balancer_ips),
            "source_ranges": sp.source_ranges.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "internal_traffic_policy": policy(sp.internal_policy),
            "external_traffic_policy": policy(sp.external_policy),
            "externally_accessible": sp.externally_accessible(),
            "session_affinity_seconds": sp.session_affinity_seconds,
            "topology": {"mode": self.topology.kind, "words": self.topology.mode, "reason": self.topology.reason},
            "cluster_uses_terminating": cat.cluster_uses_terminating,
            "local_uses_terminating": cat.local_uses_terminating,
            "cluster_ip_traffic": self.cluster_ip_traffic,
            "external_traffic": self.external_traffic,
            "endpoints": self.endpoints.iter().map(|r| {
                let e = &r.endpoint;
                json!({
                    "endpoint": e.socket_addr().to_string(),
                    "node": e.node_name,
                    "is_local": e.is_local,
                    "zone": e.zone,
                    "ready": e.ready,
                    "serving": e.serving,
                    "terminating": e.terminating,
                    "zone_hints": e.zone_hints,
                    "node_hints": e.node_hints,
                    "cluster": r.cluster.to_json(),
                    "local": r.local.to_json(),
                })
            }).collect::<Vec<_>>(),
            "health_check": self.health_check.as_ref().map(|h| json!({
                "node_port": h.node_port, "local_ready_endpoints": h.local_ready, "status": h.status,
            })),
            "kernel_objects": self.objects.iter().map(|o| json!({
                "kind": o.kind,
                "name": o.name,
                "role": o.role,
                "live": o.live.as_ref().map(|l| match l {
                    LiveStatus::Present => json!("present"),
                    LiveStatus::Missing => json!("missing"),
                    LiveStatus::Differs(w) => json!({"differs": w}),
                }),
            })).collect::<Vec<_>>(),
        })
    }
}

fn sa(ip: std::net::IpAddr, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(ip, port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kproxy_backend_api::{CategorizedEndpoints, Protocol, ServicePort, ServicePortName};

    fn ep(ip: &str, local: bool, ready: bool, serving: bool, terminating: bool) -> Endpoint {
        Endpoint {
            ip: ip.parse().expect("ip"),
            port: 80,
            node_name: Some(if local { "node-a" } else { "node-b" }.into()),
            zone: None,
            is_local: local,
            ready,
            serving,
            terminating,
            zone_hints: vec![],
            node_hints: vec![],
        }
    }

    fn plan(
        itp: TrafficPolicy,
        etp: TrafficPolicy,
        external: bool,
        eps: Vec<Endpoint>,
    ) -> ServicePortPlan {
        let port = ServicePort {
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
        };
        let categorized: CategorizedEndpoints = crate::model::topology::categorize(
            &port,
            &eps,
            crate::model::topology::NodeTopology {
                node_name: "node-a",
                zone: Some("zone-a"),
            },
        );
        ServicePortPlan {
            port,
            endpoints: eps,
            categorized,
        }
    }

    use TrafficPolicy::{Cluster, Local};

    #[test]
    fn local_terminating_fallback_is_independent_of_cluster() {
        let remote = ep("10.0.0.1", false, true, true, false);
        let term = ep("10.0.0.2", true, false, true, true);
        let p = plan(Cluster, Local, true, vec![remote.clone(), term.clone()]);
        assert_eq!(cluster_usage(&p, &remote), Usage::yes("ready"));
        assert_eq!(
            cluster_usage(&p, &term),
            Usage::no("terminating (ready endpoints exist)")
        );
        assert_eq!(local_usage(&p, &remote), Usage::no("not on this node"));
        assert_eq!(
            local_usage(&p, &term),
            Usage::yes("local terminating fallback")
        );
    }

    #[test]
    fn policy_cluster_and_local_reasons() {
        let l = ep("10.0.0.1", true, true, true, false);
        let gone = ep("10.0.0.3", true, false, false, true);
        let p = plan(Cluster, Cluster, false, vec![l.clone(), gone.clone()]);
        assert_eq!(local_usage(&p, &l), Usage::no("not used: policy Cluster"));
        assert_eq!(cluster_usage(&p, &gone), Usage::no("not ready/serving"));
        let p = plan(Local, Cluster, false, vec![l.clone(), gone.clone()]);
        assert_eq!(cluster_usage(&p, &l), Usage::no("not used: policy Local"));
        assert_eq!(local_usage(&p, &l), Usage::yes("local ready"));
        assert_eq!(
            topology_decision(&p, "node-a", Some("zone-a")).kind,
            "not applied"
        );
    }

    #[test]
    fn service_names() {
        assert_eq!(
            parse_service("ns/web").expect("ok"),
            ServiceName::new("ns", "web")
        );
        assert_eq!(
            parse_service("web").expect("ok"),
            ServiceName::new("default", "web")
        );
        assert!(parse_service("a/b/c").is_err());
        assert!(parse_service("/b").is_err());
    }
}
