//! `kproxy trace SRC DST:PORT[/PROTO]`: what happens to one packet, in plain words.
//!
//! Why a separate command and not a log line: the question "why does my connection to
//! this Service fail?" is about one packet, and the answer depends on dozens of rules,
//! two traffic policies, topology hints and endpoint conditions. `trace` answers it by
//! running kproxy's own packet evaluator ([`kproxy_nftables::eval`], the oracle the tests
//! compare real packets with) over kproxy's own typed ruleset — never over parsed `nft`
//! text — and then tells the story: which service port matched, the source-range verdict,
//! the traffic-policy and topology decision, the candidate endpoints with their
//! probabilities, masquerading, or why the packet is rejected or dropped.
//!
//! Where the ruleset comes from:
//! - `--manifests PATH`: what kproxy *intends* for these objects on this node (offline,
//!   no privilege needed);
//! - `--live`: what the kernel *holds* (`nft -j list table ip|ip6 kproxy`, root needed);
//! - both: the packet is traced through each, and any difference is drift — the kernel
//!   no longer does what kproxy intends (a chain flushed by hand, another tool's rule).
//!
//! Exit codes: 0 the trace ran (whatever the verdict), 1 an error (unreadable manifests,
//! unknown pod, no privilege for `--live`), 2 a usage error, 3 drift: the kernel's fate
//! for this packet differs from kproxy's intent, or the live table holds something
//! kproxy never writes on the packet's path. Differences elsewhere in the table are
//! reported as a note but do not change the exit code: they do not affect this packet.
//!
//! The shared node options ([`NodeArgs`]) and their loading ([`NodeView`]) are reused by
//! `kproxy explain`.

use crate::explain;
use crate::manifests::{self, ManifestError, Manifests};
use crate::model::{self, ClusterObjects, ProxyConfig, ProxyState};
use clap::{ArgAction, Args, Parser, ValueEnum};
use kproxy_backend_api::{IpFamily, ServicePortPlan, TrafficPolicy};
use kproxy_nftables::eval::{self, Origin, Packet, PacketVerdict, Ruleset, Summary, Trace};
use kproxy_nftables::objects::{ElemKey, MapId};
use kproxy_nftables::writer::{NftCli, NftWriter};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit code: the command ran; no drift.
pub const EXIT_OK: u8 = 0;
/// Exit code: an error (manifests, live table, unknown pod or service).
pub const EXIT_ERROR: u8 = 1;
/// Exit code: the command line is wrong.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the kernel does not do what kproxy intends (drift).
pub const EXIT_DRIFT: u8 = 3;

/// Why `trace` or `explain` could not answer.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// A wrong or incomplete command line (exit code 2).
    #[error("{0}")]
    Usage(String),
    #[error("cannot load --manifests: {0}")]
    Manifests(#[from] ManifestError),
    #[error("cannot read the live {family} table (`nft -j list table {kw} kproxy`; needs root): {message}")]
    Live {
        family: IpFamily,
        kw: &'static str,
        message: String,
    },
    #[error("cannot list this node's addresses: {0}")]
    LocalAddrs(std::io::Error),
    #[error("pod {0}: no EndpointSlice endpoint has a targetRef to this Pod in the manifests")]
    UnknownPod(String),
    #[error(
        "pod {pod} has no {family} address in any EndpointSlice (the destination is {family})"
    )]
    PodFamily { pod: String, family: IpFamily },
    #[error("service {0} is not in the manifests")]
    UnknownService(String),
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
}

impl CmdError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CmdError::Usage(_) => EXIT_USAGE,
            _ => EXIT_ERROR,
        }
    }
}

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Plain words for people.
    Text,
    /// One JSON document for scripts.
    Json,
}

/// The flags that shape kproxy's rules on a node, plus where to read them from; shared
/// by `kproxy trace` and `kproxy explain`. Names and meanings are the daemon's.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// Kubernetes objects (a file or directory of YAML/JSON): evaluate what kproxy
    /// intends for them on this node. Works offline, without privilege.
    #[arg(long, value_name = "PATH")]
    pub manifests: Option<PathBuf>,
    /// Read the live kernel table back (`nft -j list table ip|ip6 kproxy`; needs root).
    /// With --manifests too, both are evaluated and any difference is reported as drift.
    #[arg(long)]
    pub live: bool,
    /// This node's name, as the daemon's flag (default: the host name).
    #[arg(long, value_name = "NAME")]
    pub hostname_override: Option<String>,
    /// Pod CIDRs, comma-separated, as the daemon's flag (sources inside are in-cluster).
    #[arg(long, value_name = "CIDRS", value_delimiter = ',')]
    pub cluster_cidr: Vec<String>,
    /// NodePort addresses, comma-separated CIDRs or `primary`, as the daemon's flag.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,
    /// As the daemon's flag: masquerade all ClusterIP traffic.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value_t = false, default_missing_value = "true", value_name = "BOOL")]
    pub masquerade_all: bool,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

impl NodeArgs {
    /// The model's settings from these flags.
    pub fn proxy_config(&self) -> Result<ProxyConfig, CmdError> {
        crate::run::build_proxy_config(
            self.hostname_override.as_deref(),
            &self.cluster_cidr,
            &self.nodeport_addresses,
            self.masquerade_all,
        )
        .map_err(CmdError::Usage)
    }
}

/// `nft`'s family keyword.
pub use kproxy_nftables::rule::family_kw;

/// What the node options resolve to: the model's state from the manifests (if any), the
/// node's addresses, and access to the live tables.
#[derive(Debug)]
pub struct NodeView {
    pub node_name: String,
    /// The loaded objects (for pod and Service lookups).
    pub manifests: Option<Manifests>,
    /// The model's desired state for the manifests.
    pub state: Option<ProxyState>,
    /// The node's own addresses: what `fib … type local` matches and what decides input
    /// versus forward. The Node object's IPs and loopback; in live mode also every
    /// address of the current network namespace.
    pub local: BTreeSet<IpAddr>,
    pub live: bool,
    /// Things the user should know (no Node object, skipped objects).
    pub warnings: Vec<String>,
}

impl NodeView {
    /// Loads the manifests and builds the model, or prepares for live-only use. Without
    /// `--manifests` and `--live` there is nothing to evaluate: a usage error.
    pub fn load(args: &NodeArgs) -> Result<NodeView, CmdError> {
        if args.manifests.is_none() && !args.live {
            return Err(CmdError::Usage(
                "nothing to evaluate: give --manifests PATH (kproxy's intended rules, offline), --live (the kernel's table, needs root), or both (drift)".into(),
            ));
        }
        let cfg = args.proxy_config()?;
        let mut local: BTreeSet<IpAddr> = [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]
        .into();
        let ns_addrs = if args.live {
            crate::local_addrs::local_addresses().map_err(CmdError::LocalAddrs)?
        } else {
            Vec::new()
        };
        local.extend(ns_addrs.iter().copied());
        let mut warnings = Vec::new();
        let (manifests, state) = match &args.manifests {
            Some(path) => {
                let m = manifests::load(path)?;
                for r in &m.rejected {
                    warnings.push(format!("skipped object: {r}"));
                }
                let node_ips = node_ips(&m, &cfg.node_name);
                if node_ips.is_empty() {
                    warnings.push(format!(
                        "no Node {:?} with addresses in the manifests: the node's IPs are unknown, so NodePorts on them are not evaluated (set --hostname-override?)",
                        cfg.node_name
                    ));
                }
                local.extend(node_ips.iter().copied());
                // Offline, the manifests' node IPs stand for the node's interfaces
                // (only --nodeport-addresses CIDRs use them).
                let model_addrs = if args.live { ns_addrs } else { node_ips };
                let objects = ClusterObjects {
                    services: m.services.clone(),
                    endpoint_slices: m.endpoint_slices.clone(),
                    nodes: m.nodes.clone(),
                    service_cidrs: m.service_cidrs.clone(),
                };
                let state = model::build(&objects, &cfg, &model_addrs);
                for inv in &state.invalid {
                    warnings.push(format!("skipped invalid object: {inv}"));
                }
                (Some(m), Some(state))
            }
            None => (None, None),
        };
        Ok(NodeView {
            node_name: cfg.node_name,
            manifests,
            state,
            local,
            live: args.live,
            warnings,
        })
    }

    /// kproxy's intended ruleset for a family, if manifests were given.
    pub fn desired(&self, family: IpFamily) -> Option<Ruleset> {
        let st = self.state.as_ref()?;
        Some(match st.families.get(&family) {
            Some(fam) => Ruleset::desired(&fam.node, &fam.services),
            None => Ruleset::empty(family),
        })
    }

    /// The kernel's table of a family read back; an absent table is an empty ruleset.
    /// Rules kproxy never writes are kept in place, so a packet reaching one ends in
    /// drift instead of the whole read failing.
    pub fn live_ruleset(&self, family: IpFamily) -> Result<Option<Ruleset>, CmdError> {
        if !self.live {
            return Ok(None);
        }
        let kw = family_kw(family);
        let err = |message: String| CmdError::Live {
            family,
            kw,
            message,
        };
        let json = NftCli::default()
            .list_table(family)
            .map_err(|e| err(e.to_string()))?;
        match json {
            None => Ok(Some(Ruleset::empty(family))),
            Some(j) => Ruleset::live_lenient(&j)
                .map(Some)
                .map_err(|e| err(e.to_string())),
        }
    }

    /// The node's zone label, if the manifests hold the Node.
    pub fn zone(&self) -> Option<&str> {
        self.state.as_ref().and_then(|s| s.zone.as_deref())
    }

    /// The service port plan named `ns/svc:port` in a family.
    pub fn plan(&self, family: IpFamily, service_port: &str) -> Option<&ServicePortPlan> {
        self.state
            .as_ref()?
            .families
            .get(&family)?
            .services
            .values()
            .flatten()
            .find(|p| p.port.name.to_string() == service_port)
    }

    /// The node's own IPs of a family (from the Node object), primary first.
    pub fn node_ips(&self, family: IpFamily) -> Vec<IpAddr> {
        self.state
            .as_ref()
            .and_then(|s| s.families.get(&family))
            .map(|f| f.node.node_ips.clone())
            .unwrap_or_default()
    }
}

/// The IPs of the Node named `name`, InternalIP first, as the model reads them.
fn node_ips(m: &Manifests, name: &str) -> Vec<IpAddr> {
    m.nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(name))
        .map(crate::model::node_ips)
        .unwrap_or_default()
}

/// A pod found in the EndpointSlices' `targetRef`s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub node: Option<String>,
}

/// Finds pod `ns/name` as the `targetRef` {kind Pod} of an EndpointSlice endpoint.
pub fn find_pod(m: &Manifests, pod: &str) -> Result<PodInfo, CmdError> {
    let (ns, name) = pod
        .split_once('/')
        .ok_or_else(|| CmdError::Usage(format!("--from-pod {pod:?}: expected NAMESPACE/NAME")))?;
    let mut info = PodInfo {
        name: pod.to_string(),
        ips: Vec::new(),
        node: None,
    };
    let mut found = false;
    for slice in &m.endpoint_slices {
        let slice_ns = slice.metadata.namespace.as_deref().unwrap_or("default");
        for ep in slice.endpoints.iter().flatten() {
            let Some(r) = &ep.target_ref else { continue };
            let kind_ok = r.kind.as_deref().is_none_or(|k| k == "Pod");
            let ns_ok = r.namespace.as_deref().unwrap_or(slice_ns) == ns;
            if !(kind_ok && ns_ok && r.name.as_deref() == Some(name)) {
                continue;
            }
            found = true;
            if info.node.is_none() {
                info.node.clone_from(&ep.node_name);
            }
            for a in ep.addresses.iter().filter_map(|a| crate::ip::parse_ip(a)) {
                if !info.ips.contains(&a) {
                    info.ips.push(a);
                }
            }
        }
    }
    if found {
        Ok(info)
    } else {
        Err(CmdError::UnknownPod(pod.to_string()))
    }
}

/// `kproxy trace`.
#[derive(Debug, Parser)]
#[command(
    name = "kproxy trace",
    about = "Evaluate one packet against what kproxy programs and say, in plain words, what happens to it",
    override_usage = "kproxy trace [OPTIONS] SRC DST:PORT[/PROTO]\n       kproxy trace [OPTIONS] --from-pod NS/NAME DST:PORT[/PROTO]\n       kproxy trace [OPTIONS] --from-node [SRC] DST:PORT[/PROTO]",
    after_help = "Exit codes: 0 traced, 1 error, 2 usage error, 3 drift (the kernel does not do what kproxy intends for this packet).\nExample: kproxy trace --manifests examples/demo.yaml --hostname-override node-a --cluster-cidr 10.0.0.0/8 203.0.113.2 5.6.7.8:80/tcp"
)]
pub struct TraceArgs {
    /// `[SRC] DST:PORT[/PROTO]`: the source address (omitted with --from-pod, optional
    /// with --from-node) and the destination (IPv6 as [ADDR]:PORT; protocol tcp, udp or
    /// sctp, default tcp).
    #[arg(value_name = "ADDR", num_args = 1..=2, required = true)]
    pub addrs: Vec<String>,
    /// The source is this pod (NAMESPACE/NAME), found by its EndpointSlice targetRef.
    #[arg(long, value_name = "NS/NAME", conflicts_with = "from_node")]
    pub from_pod: Option<String>,
    /// The packet is sent by the node itself (output path); SRC defaults to the node IP.
    #[arg(long)]
    pub from_node: bool,
    /// Show every rule evaluated, not only those that matched.
    #[arg(long, short = 'v')]
    pub verbose: bool,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// Entry point of `kproxy trace …` (`args` is the whole argv).
pub fn main(args: Vec<OsString>) -> ExitCode {
    command_main::<TraceArgs>(args, "trace", run)
}

/// Shared by `trace` and `explain`: parse (clap prints usage errors and help itself),
/// run, and turn the result into the documented exit code.
pub(crate) fn command_main<A: clap::Parser>(
    args: Vec<OsString>,
    name: &str,
    run: impl FnOnce(&A, &mut dyn Write) -> Result<u8, CmdError>,
) -> ExitCode {
    let parsed = match A::try_parse_from(args.into_iter().skip(1)) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    let mut out = std::io::stdout().lock();
    match run(&parsed, &mut out) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("kproxy {name}: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Runs the trace and writes the report; returns the exit code.
pub fn run(args: &TraceArgs, out: &mut dyn Write) -> Result<u8, CmdError> {
    let view = NodeView::load(&args.node)?;
    let report = trace(args, &view)?;
    let text = match args.node.output {
        OutputFormat::Json => {
            let mut s = serde_json::to_string_pretty(&report.to_json(&view))
                .map_err(|e| CmdError::Output(std::io::Error::other(e)))?;
            s.push('\n');
            s
        }
        OutputFormat::Text => report.text(&view, args.verbose),
    };
    out.write_all(text.as_bytes()).map_err(CmdError::Output)?;
    Ok(report.exit_code())
}

/// Where the packet comes from, in words.
#[derive(Debug, Clone)]
enum SourceDesc {
    Address,
    Pod(PodInfo),
    Node,
}

/// Everything `trace` found out about one packet.
#[derive(Debug)]
pub struct TraceReport {
    pub packet: Packet,
    source: SourceDesc,
    /// The trace through kproxy's intended ruleset (with --manifests).
    pub intended: Option<Trace>,
    /// The trace through the kernel's table (with --live).
    pub live: Option<Trace>,
    /// How the two differ for this packet.
    pub drift: Option<eval::TraceDiff>,
    /// Table differences on this packet's path (chains it entered, its map keys).
    pub path_differences: Vec<String>,
    /// How many other table differences there are.
    pub other_differences: usize,
    /// The service port a map element for this packet belongs to, when the trace
    /// itself entered no service chain (a no-endpoint drop or reject).
    pub service_hint: Option<String>,
    /// Things worth knowing about the tables themselves.
    pub notes: Vec<String>,
}

fn parse_src(s: &str) -> Result<IpAddr, CmdError> {
    let t = s.trim().trim_start_matches('[').trim_end_matches(']');
    crate::ip::parse_ip(t).ok_or_else(|| CmdError::Usage(format!("SRC {s:?} is not an IP address")))
}

/// Builds the packet from the command line and traces it.
pub fn trace(args: &TraceArgs, view: &NodeView) -> Result<TraceReport, CmdError> {
    let (src_arg, target) = match args.addrs.as_slice() {
        [t] => (None, t),
        [s, t] => (Some(s.as_str()), t),
        _ => return Err(CmdError::Usage("expected [SRC] DST:PORT[/PROTO]".into())),
    };
    let (dst, proto) = Packet::parse_target(target)
        .map_err(|e| CmdError::Usage(format!("DST:PORT[/PROTO]: {e}")))?;
    let family = IpFamily::of(&dst.ip());
    let (src, origin, source) = match (&args.from_pod, args.from_node, src_arg) {
        (Some(_), _, Some(_)) => {
            return Err(CmdError::Usage(
                "give either SRC or --from-pod, not both".into(),
            ))
        }
        (Some(pod), _, None) => {
            let m = view.manifests.as_ref().ok_or_else(|| {
                CmdError::Usage(
                    "--from-pod needs --manifests (pods are found in EndpointSlices)".into(),
                )
            })?;
            let info = find_pod(m, pod)?;
            let ip = info
                .ips
                .iter()
                .copied()
                .find(|ip| IpFamily::of(ip) == family)
                .ok_or_else(|| CmdError::PodFamily {
                    pod: pod.clone(),
                    family,
                })?;
            (ip, Origin::Forwarded, SourceDesc::Pod(info))
        }
        (None, true, Some(s)) => (parse_src(s)?, Origin::Local, SourceDesc::Node),
        (None, true, None) => {
            let ip = view
                .node_ips(family)
                .into_iter()
                .chain(view.local.iter().copied().filter(|ip| {
                    IpFamily::of(ip) == family && !ip.is_loopback() && !is_link_local(ip)
                }))
                .next()
                .ok_or_else(|| {
                    CmdError::Usage(format!(
                        "--from-node: no {family} node IP known; give SRC explicitly"
                    ))
                })?;
            (ip, Origin::Local, SourceDesc::Node)
        }
        (None, false, Some(s)) => (parse_src(s)?, Origin::Forwarded, SourceDesc::Address),
        (None, false, None) => {
            return Err(CmdError::Usage(
                "missing SRC: give SRC DST:PORT[/PROTO], --from-pod NS/NAME or --from-node".into(),
            ))
        }
    };
    if IpFamily::of(&src) != family {
        return Err(CmdError::Usage(format!(
            "source {src} and destination {dst} are of different IP families"
        )));
    }
    let packet = Packet::new(src, dst, proto, origin);
    let desired = view.desired(family);
    let live = view.live_ruleset(family)?;
    let intended = desired.as_ref().map(|rs| rs.trace(&packet, &view.local));
    let live_trace = live.as_ref().map(|rs| rs.trace(&packet, &view.local));
    let mut report = TraceReport {
        packet,
        source,
        intended,
        live: live_trace,
        drift: None,
        path_differences: Vec::new(),
        other_differences: 0,
        service_hint: None,
        notes: Vec::new(),
    };
    if live
        .as_ref()
        .is_some_and(|l| l.chains.is_empty() && l.elements.is_empty())
    {
        report.notes.push(format!(
            "the kernel has no `{} kproxy` table: kproxy has not programmed this node (or was cleaned up)",
            family_kw(family)
        ));
    }
    if let Some(rs) = live.as_ref().or(desired.as_ref()) {
        report.service_hint = service_of_packet(rs, &report.packet, &view.local);
    }
    if let (Some(d), Some(l), Some(dt), Some(lt)) =
        (&desired, &live, &report.intended, &report.live)
    {
        report.drift = eval::diff(dt, lt);
        let on_path = path_names(&[dt, lt]);
        let keys = packet_keys(&report.packet);
        for line in d.differences(l) {
            if on_path_line(&line, &on_path, &keys) {
                report.path_differences.push(line);
            } else {
                report.other_differences += 1;
            }
        }
    }
    Ok(report)
}

/// The service port whose map element a packet's destination hits.
fn service_of_packet(rs: &Ruleset, p: &Packet, local: &BTreeSet<IpAddr>) -> Option<String> {
    let addr_key = ElemKey::AddrProtoPort(p.dst, p.proto, p.dport);
    let port_key = ElemKey::ProtoPort(p.proto, p.dport);
    let hits = |m: MapId, k: &ElemKey| match m {
        MapId::ServiceIps | MapId::NoEndpointServices | MapId::FirewallIps => *k == addr_key,
        MapId::ServiceNodeports | MapId::NoEndpointNodeports => {
            *k == port_key && local.contains(&p.dst)
        }
        MapId::ClusterIps | MapId::NodeportIps => false,
    };
    rs.service_entries()
        .into_iter()
        .find(|(_, entries)| entries.iter().any(|(m, k)| hits(*m, k)))
        .map(|(svc, _)| svc)
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// Every chain a trace entered or evaluated.
fn path_names(traces: &[&Trace]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for t in traces {
        out.extend(t.steps.iter().map(|s| s.chain.clone()));
        for o in &t.outcomes {
            out.extend(o.via.iter().cloned());
            out.extend(o.steps.iter().map(|s| s.chain.clone()));
        }
    }
    out
}

/// The map keys a packet can be looked up by.
fn packet_keys(p: &Packet) -> Vec<String> {
    [
        ElemKey::AddrProtoPort(p.dst, p.proto, p.dport),
        ElemKey::ProtoPort(p.proto, p.dport),
        ElemKey::Addr(p.dst),
    ]
    .iter()
    .map(ToString::to_string)
    .collect()
}

/// Whether a line of `Ruleset::differences` concerns this packet's path.
fn on_path_line(line: &str, chains: &BTreeSet<String>, keys: &[String]) -> bool {
    if let Some(rest) = line
        .strip_prefix("chain ")
        .or_else(|| line.strip_prefix("base chain "))
    {
        return chains.iter().any(|c| rest.starts_with(&format!("{c}:")));
    }
    if line.contains(": element ") {
        return keys
            .iter()
            .any(|k| line.contains(&format!(": element {k} ")));
    }
    // A whole map or set missing, or the family: every packet is affected.
    !line.starts_with("affinity set ")
}

fn pct(p: f64) -> String {
    let v = p * 100.0;
    if (v - v.round()).abs() < 1e-6 {
        format!("{v:.0}%")
    } else {
        format!("{v:.1}%")
    }
}

fn dst_words(p: &Packet) -> String {
    format!("{}/{}", SocketAddr::new(p.dst, p.dport), p.proto.as_str())
}

fn summary_kind(s: &Summary) -> &'static str {
    match s {
        Summary::Endpoints { .. } => "accept",
        Summary::Untouched => "untouched",
        Summary::Reject => "reject",
        Summary::Drop => "drop",
        Summary::Drift(_) => "drift",
        Summary::Mixed => "mixed",
    }
}

/// Each endpoint's probability and whether it is masqueraded.
fn endpoint_fates(t: &Trace) -> BTreeMap<SocketAddr, (f64, bool)> {
    let mut out: BTreeMap<SocketAddr, (f64, bool)> = BTreeMap::new();
    for o in &t.outcomes {
        if let PacketVerdict::Accept { dnat: Some(to) } = o.verdict {
            let e = out.entry(to).or_insert((0.0, o.masquerade));
            e.0 += o.probability;
            e.1 |= o.masquerade;
        }
    }
    out
}

/// The reasons of rejected or dropped branches, deduplicated.
fn reasons(t: &Trace) -> Vec<String> {
    let set: BTreeSet<&str> = t
        .outcomes
        .iter()
        .filter(|o| !matches!(o.verdict, PacketVerdict::Accept { .. }))
        .map(|o| o.reason.as_str())
        .collect();
    set.into_iter().map(str::to_string).collect()
}

/// The verdict in one line, after `SRC -> DST: `.
pub fn fate_words(t: &Trace) -> String {
    match t.summary() {
        Summary::Endpoints { masquerade, .. } => {
            let fates = endpoint_fates(t);
            let list = fates
                .iter()
                .map(|(ep, (p, m))| match masquerade {
                    Some(_) => format!("{ep} ({})", pct(*p)),
                    None => format!(
                        "{ep} ({}, {})",
                        pct(*p),
                        if *m { "masqueraded" } else { "not masqueraded" }
                    ),
                })
                .collect::<Vec<_>>()
                .join(", ");
            let masq = match masquerade {
                Some(true) => ", masqueraded",
                Some(false) => ", not masqueraded",
                None => "",
            };
            format!("ACCEPT → {list}{masq}")
        }
        Summary::Untouched => {
            let why = t.outcomes.first().map(|o| o.reason.as_str()).unwrap_or("");
            format!("ACCEPT, untouched by kproxy: {why}")
        }
        Summary::Reject => format!("REJECT: {}", reasons(t).join("; ")),
        Summary::Drop => format!("DROP: {}", reasons(t).join("; ")),
        Summary::Drift(w) => {
            let set: BTreeSet<&str> = w.iter().map(String::as_str).collect();
            format!("DRIFT: {}", set.into_iter().collect::<Vec<_>>().join("; "))
        }
        Summary::Mixed => format!(
            "MIXED: {}",
            t.outcomes
                .iter()
                .map(|o| format!("{} {}", pct(o.probability), o.describe()))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    }
}

/// `SRC -> DST:PORT/PROTO: <fate>`.
pub fn headline(t: &Trace) -> String {
    format!(
        "{} -> {}: {}",
        t.packet.src,
        dst_words(&t.packet),
        fate_words(t)
    )
}

/// How the packet addressed the service port.
fn addressed_as(plan: &ServicePortPlan, p: &Packet) -> (&'static str, bool) {
    let sp = &plan.port;
    if p.dst == sp.cluster_ip && p.dport == sp.port {
        ("ClusterIP", true)
    } else if sp.load_balancer_ips.contains(&p.dst) && p.dport == sp.port {
        ("LoadBalancer IP", false)
    } else if sp.external_ips.contains(&p.dst) && p.dport == sp.port {
        ("externalIP", false)
    } else if sp.node_port == Some(p.dport) {
        ("NodePort", false)
    } else {
        ("address", false)
    }
}

fn policy_name(p: TrafficPolicy) -> &'static str {
    match p {
        TrafficPolicy::Cluster => "Cluster",
        TrafficPolicy::Local => "Local",
    }
}

/// One decision in words: a label and the sentence.
type Decision = (&'static str, String);

impl TraceReport {
    /// The trace that says what happens: the kernel's when read, else the intended one.
    pub fn primary(&self) -> Option<&Trace> {
        self.live.as_ref().or(self.intended.as_ref())
    }

    /// Whether this packet shows drift: intended and live fates differ, or the live
    /// table holds something kproxy never writes on the packet's path.
    pub fn has_drift(&self) -> bool {
        self.drift.is_some()
            || self
                .live
                .as_ref()
                .is_some_and(|t| matches!(t.summary(), Summary::Drift(_)))
    }

    pub fn exit_code(&self) -> u8 {
        if self.has_drift() {
            EXIT_DRIFT
        } else {
            EXIT_OK
        }
    }

    /// The decisions along the way in plain words: the service port, source ranges,
    /// traffic policy, topology, endpoints, masquerading, affinity. The verdicts come
    /// from the evaluated trace; the reasons behind policy and topology from the model.
    fn decisions(&self, view: &NodeView) -> Vec<Decision> {
        let mut out: Vec<Decision> = Vec::new();
        let Some(t) = self.primary() else {
            return out;
        };
        let p = &self.packet;
        match &self.source {
            SourceDesc::Pod(info) => {
                let node = info.node.as_deref().unwrap_or("an unknown node");
                let mut s = format!("pod {} ({}) on {node}", info.name, p.src);
                if info.node.as_deref() != Some(view.node_name.as_str()) {
                    s.push_str(&format!(
                        "; this traces what {} does with its packet (ClusterIP traffic is normally handled on the pod's own node)",
                        view.node_name
                    ));
                }
                out.push(("source", s));
            }
            SourceDesc::Node => out.push((
                "source",
                format!("node {} itself ({})", view.node_name, p.src),
            )),
            SourceDesc::Address => {}
        }
        let service = t
            .service()
            .map(str::to_string)
            .or_else(|| self.service_hint.clone());
        let plan = service.as_deref().and_then(|s| view.plan(t.family, s));
        // Per-service chains only (they carry a `/`): `service-endpoints-check` is not
        // a load-balancing chain.
        let via: BTreeSet<&str> = t
            .outcomes
            .iter()
            .flat_map(|o| o.via.iter().map(String::as_str))
            .filter(|c| c.contains('/'))
            .collect();
        let uses_local = via.iter().any(|c| c.starts_with("local-"));
        let uses_cluster = via.iter().any(|c| c.starts_with("service-"));
        match (&service, plan) {
            (Some(s), Some(plan)) => {
                let (how, _) = addressed_as(plan, p);
                out.push((
                    "service port",
                    format!("{s}, addressed by its {how} {}", dst_words(p)),
                ));
            }
            (Some(s), None) => out.push(("service port", s.clone())),
            (None, _) => out.push(("service port", format!("none matches {}", dst_words(p)))),
        }
        let mut blocked = false;
        if let Some(fw) = firewall_words(t, plan) {
            blocked = fw.starts_with("blocked");
            out.push(("source ranges", fw));
        }
        // A packet the firewall dropped never met the traffic policy.
        if let Some(plan) = plan.filter(|_| !blocked) {
            let sp = &plan.port;
            let (_, internal) = addressed_as(plan, p);
            let node = &view.node_name;
            let policy = if internal {
                match sp.internal_policy {
                    TrafficPolicy::Cluster => "internalTrafficPolicy=Cluster: ClusterIP traffic may go to any endpoint in the cluster".to_string(),
                    TrafficPolicy::Local => {
                        let mut s = format!("internalTrafficPolicy=Local: ClusterIP traffic only goes to endpoints on this node ({node})");
                        if plan.categorized.local.is_empty() {
                            s.push_str(", and there is none");
                        }
                        s
                    }
                }
            } else if sp.external_policy_local() {
                if uses_cluster && !uses_local {
                    "externalTrafficPolicy=Local, but traffic from pods and from the node itself is short-circuited to every cluster endpoint".to_string()
                } else {
                    let mut s = format!("externalTrafficPolicy=Local: external traffic only goes to endpoints on this node ({node}) and keeps the client's source address");
                    if plan.categorized.local.is_empty() {
                        s.push_str(", and there is none");
                    }
                    s
                }
            } else {
                "externalTrafficPolicy=Cluster: external traffic may go to any endpoint in the cluster, masqueraded so replies come back through this node".to_string()
            };
            out.push(("traffic policy", policy));
            let cat = &plan.categorized;
            if uses_cluster {
                let topo = explain::topology_decision(plan, node, view.zone());
                out.push(("topology", format!("{}: {}", topo.mode, topo.reason)));
                if cat.cluster_uses_terminating {
                    out.push((
                        "fallback",
                        "no endpoint is ready, so serving+terminating endpoints are used".into(),
                    ));
                }
            } else if uses_local {
                out.push((
                    "topology",
                    format!(
                        "not applied: the Local policy uses this node's endpoints, never filtered by hints (policy {})",
                        policy_name(if internal { sp.internal_policy } else { sp.external_policy })
                    ),
                ));
                if cat.local_uses_terminating {
                    out.push((
                        "fallback",
                        "no local endpoint is ready, so local serving+terminating endpoints are used".into(),
                    ));
                }
            }
            if let Some(secs) = sp.session_affinity_seconds {
                out.push((
                    "session affinity",
                    format!("ClientIP for {secs}s: a returning client goes back to the endpoint it used before"),
                ));
            }
        }
        if let Summary::Endpoints { .. } = t.summary() {
            let fates = endpoint_fates(t);
            out.push((
                "endpoints",
                fates
                    .iter()
                    .map(|(ep, (p, _))| format!("{ep} ({})", pct(*p)))
                    .collect::<Vec<_>>()
                    .join(", "),
            ));
        }
        let masq: BTreeSet<(bool, &str)> = t
            .outcomes
            .iter()
            .filter(|o| matches!(o.verdict, PacketVerdict::Accept { .. }))
            .map(|o| (o.masquerade, o.masquerade_reason.as_str()))
            .collect();
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        match masq.len() {
            0 => {}
            1 => {
                if let Some((m, r)) = masq.iter().next() {
                    out.push(("masquerade", format!("{} ({r})", yes_no(*m))));
                }
            }
            _ => {
                for o in t
                    .outcomes
                    .iter()
                    .filter(|o| matches!(o.verdict, PacketVerdict::Accept { .. }))
                {
                    let to = match o.verdict {
                        PacketVerdict::Accept { dnat: Some(to) } => to.to_string(),
                        _ => "untouched".into(),
                    };
                    out.push((
                        "masquerade",
                        format!(
                            "to {to}: {} ({})",
                            yes_no(o.masquerade),
                            o.masquerade_reason
                        ),
                    ));
                }
            }
        }
        match t.summary() {
            Summary::Reject | Summary::Drop => {
                let word = if t.summary() == Summary::Reject {
                    "rejected"
                } else {
                    "dropped"
                };
                for r in reasons(t) {
                    out.push((word, r));
                }
            }
            _ => {}
        }
        out
    }

    /// The report in plain words: the answer first, then drift, decisions and the path.
    pub fn text(&self, view: &NodeView, verbose: bool) -> String {
        let mut s = String::new();
        let Some(t) = self.primary() else {
            return s;
        };
        s.push_str(&headline(t));
        s.push('\n');
        if let Some(d) = &self.drift {
            s.push('\n');
            s.push_str(&d.to_string().replacen("drift for", "DRIFT for", 1));
        } else if let (Some(_), Some(l)) = (&self.intended, &self.live) {
            if let Summary::Drift(_) = l.summary() {
                s.push_str("\nDRIFT: the kernel's table holds something kproxy never writes on this packet's path\n");
            }
        } else if let (None, Some(l)) = (&self.intended, &self.live) {
            if let Summary::Drift(_) = l.summary() {
                s.push_str("\nDRIFT: the kernel's table is not one kproxy writes on this packet's path (give --manifests to compare with kproxy's intent)\n");
            }
        }
        if !self.path_differences.is_empty() {
            s.push_str("  the kernel's table differs on this packet's path:\n");
            for d in &self.path_differences {
                s.push_str(&format!("    {d}\n"));
            }
        }
        let decisions = self.decisions(view);
        if !decisions.is_empty() {
            let width = decisions.iter().map(|(l, _)| l.len()).max().unwrap_or(0) + 1;
            s.push('\n');
            for (label, words) in &decisions {
                s.push_str(&format!("  {:<width$} {words}\n", format!("{label}:")));
            }
        }
        let which = match (&self.intended, &self.live) {
            (Some(_), Some(_)) => "the kernel's table (--live), compared with the manifests",
            (None, Some(_)) => "the kernel's table (--live)",
            _ => "kproxy's intended rules for the manifests",
        };
        s.push_str(&format!("\nevaluated on {which}:\n"));
        let detail = if verbose {
            format!("{t:#}")
        } else {
            t.to_string()
        };
        for line in detail.lines() {
            s.push_str(&format!("  {line}\n"));
        }
        if self.other_differences > 0 {
            s.push_str(&format!(
                "\nnote: {} other difference(s) between kproxy's intent and the kernel's table do not affect this packet (`kproxy explain NS/SERVICE --live --manifests …` shows them per service)\n",
                self.other_differences
            ));
        }
        for n in &self.notes {
            s.push_str(&format!("note: {n}\n"));
        }
        for w in &view.warnings {
            s.push_str(&format!("warning: {w}\n"));
        }
        s
    }

    /// The report as one JSON document.
    pub fn to_json(&self, view: &NodeView) -> Value {
        let Some(t) = self.primary() else {
            return Value::Null;
        };
        let summary = t.summary();
        let fates = endpoint_fates(t);
        let endpoints: Vec<Value> = fates
            .iter()
            .map(|(ep, (p, m))| json!({"endpoint": ep.to_string(), "probability": p, "masquerade": m}))
            .collect();
        let decisions: serde_json::Map<String, Value> = {
            let mut m = serde_json::Map::new();
            for (label, words) in self.decisions(view) {
                let key = label.replace(' ', "_");
                match m.get_mut(&key) {
                    Some(Value::Array(a)) => a.push(json!(words)),
                    Some(v) => *v = json!([v.clone(), words]),
                    None => {
                        m.insert(key, json!(words));
                    }
                }
            }
            m
        };
        let drift = if self.has_drift() {
            json!({
                "intended": self.drift.as_ref().map(|d| d.desired.iter().map(|(f, p)| json!({"fate": f, "probability": p})).collect::<Vec<_>>()),
                "kernel": self.drift.as_ref().map(|d| d.live.iter().map(|(f, p)| json!({"fate": f, "probability": p})).collect::<Vec<_>>()),
                "because": self.drift.as_ref().map(|d| d.live_reasons.clone()).unwrap_or_default(),
                "text": self.drift.as_ref().map(ToString::to_string),
                "path_differences": self.path_differences,
            })
        } else {
            Value::Null
        };
        json!({
            "headline": headline(t),
            "evaluated": match (&self.intended, &self.live) {
                (Some(_), Some(_)) => "live+manifests",
                (None, Some(_)) => "live",
                _ => "manifests",
            },
            "family": t.family.label(),
            "packet": t.to_json()["packet"].clone(),
            "verdict": summary_kind(&summary),
            "service": t.service().map(str::to_string).or_else(|| self.service_hint.clone()),
            "endpoints": endpoints,
            "masquerade": t.masqueraded(),
            "reasons": reasons(t),
            "decisions": decisions,
            "drift": drift,
            "other_differences": self.other_differences,
            "exit_code": self.exit_code(),
            "warnings": view.warnings,
            "notes": self.notes,
            "trace": t.to_json(),
            "intended": self.intended.as_ref().map(Trace::to_json),
        })
    }
}

/// The source-range verdict, from the evaluated firewall chain, with the ranges from
/// the model when known.
fn firewall_words(t: &Trace, plan: Option<&ServicePortPlan>) -> Option<String> {
    let steps = t
        .steps
        .iter()
        .chain(t.outcomes.iter().flat_map(|o| o.steps.iter()));
    // Per-service firewall chains carry a `/`; `firewall-check` is the dispatcher.
    let fw: Vec<_> = steps
        .filter(|s| s.chain.starts_with("firewall-") && s.chain.contains('/'))
        .collect();
    let ranges = plan
        .map(|p| {
            p.port
                .source_ranges
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .filter(|r| !r.is_empty());
    let src = t.packet.src;
    if fw.is_empty() {
        let p = plan?;
        if p.port.source_ranges.is_empty() {
            return None;
        }
        return Some(format!(
            "not checked: loadBalancerSourceRanges ({}) apply only to the LoadBalancer IPs",
            ranges.unwrap_or_default()
        ));
    }
    let blocked = fw.iter().any(|s| s.matched && s.action == "drop");
    let r = ranges.map(|r| format!(" ({r})")).unwrap_or_default();
    Some(if blocked {
        format!("blocked: {src} is not in loadBalancerSourceRanges{r}")
    } else {
        let vip = plan.is_some_and(|p| {
            p.port.load_balancer_ips.contains(&src)
                && !p.port.source_ranges.iter().any(|n| n.contains(&src))
        });
        if vip {
            format!("allowed: {src} is a LoadBalancer IP, admitted because the ranges{r} admit this node")
        } else {
            format!("allowed: {src} is in loadBalancerSourceRanges{r}")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kproxy_backend_api::Protocol;

    #[test]
    fn parses_positional_forms_and_flags() {
        let a = TraceArgs::try_parse_from([
            "kproxy trace",
            "--manifests",
            "m.yaml",
            "--cluster-cidr",
            "10.0.0.0/8,fd00::/64",
            "--masquerade-all",
            "203.0.113.2",
            "5.6.7.8:80/tcp",
        ])
        .expect("parses");
        assert_eq!(a.addrs, ["203.0.113.2", "5.6.7.8:80/tcp"]);
        assert_eq!(a.node.cluster_cidr.len(), 2);
        assert!(a.node.masquerade_all);
        let b = TraceArgs::try_parse_from([
            "kproxy trace",
            "--from-pod",
            "ns/web-0",
            "-o",
            "json",
            "--masquerade-all=false",
            "172.30.0.1:53/udp",
        ])
        .expect("parses");
        assert_eq!(b.from_pod.as_deref(), Some("ns/web-0"));
        assert_eq!(b.node.output, OutputFormat::Json);
        assert!(!b.node.masquerade_all);
        assert!(TraceArgs::try_parse_from([
            "kproxy trace",
            "--from-pod",
            "a/b",
            "--from-node",
            "1.2.3.4:80"
        ])
        .is_err());
        assert!(TraceArgs::try_parse_from(["kproxy trace"]).is_err());
    }

    #[test]
    fn nothing_to_evaluate_is_a_usage_error() {
        let a =
            TraceArgs::try_parse_from(["kproxy trace", "1.2.3.4", "5.6.7.8:80"]).expect("parses");
        let e = NodeView::load(&a.node).expect_err("needs a source of rules");
        assert_eq!(e.exit_code(), EXIT_USAGE);
        assert!(e.to_string().contains("--manifests"), "{e}");
    }

    #[test]
    fn path_filter_keeps_lines_about_the_packet() {
        let chains: BTreeSet<String> = ["service-AB-ns/web/tcp/p80".to_string()].into();
        let p = Packet::new(
            "10.0.0.1".parse().expect("ip"),
            "172.30.0.41:80".parse().expect("sa"),
            Protocol::Tcp,
            Origin::Forwarded,
        );
        let keys = packet_keys(&p);
        assert!(on_path_line(
            "chain service-AB-ns/web/tcp/p80: rules differ (…)",
            &chains,
            &keys
        ));
        assert!(!on_path_line(
            "chain service-CD-ns/other/tcp/p80: rules differ (…)",
            &chains,
            &keys
        ));
        assert!(on_path_line(
            "service-ips: element 172.30.0.41 . tcp . 80 missing from the kernel",
            &chains,
            &keys
        ));
        assert!(!on_path_line(
            "service-ips: element 172.30.0.42 . tcp . 80 missing from the kernel",
            &chains,
            &keys
        ));
    }

    #[test]
    fn percentages() {
        assert_eq!(pct(0.5), "50%");
        assert_eq!(pct(1.0 / 3.0), "33.3%");
    }
}
