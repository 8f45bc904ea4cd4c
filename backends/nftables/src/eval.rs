//! A packet evaluator for kproxy's own typed ruleset: what `kproxy trace` prints, and the
//! oracle the tests compare real packets with.
//!
//! A [`Ruleset`] is one family's table as data — every chain by name (base chains with
//! their [`Hook`]), the fixed sets and verdict maps with their elements, the affinity
//! sets. It is built either from the desired state ([`Ruleset::desired`], the same
//! [`objects`] functions the backend renders from) or from the kernel
//! ([`Ruleset::live`](crate::live_rules), by parsing `nft -j list table` back into typed
//! [`Rule`]s), so comparing the two traces reveals drift.
//!
//! [`Ruleset::trace`] walks a NEW connection's first packet through the hooks the way
//! the kernel does:
//! - [`Origin::Forwarded`] (from a pod or an external client): prerouting (filter −110,
//!   then nat −100), then the routing decision on the destination *after* DNAT — input
//!   if it is one of the node's addresses, else forward (filter 0) and postrouting (nat
//!   100);
//! - [`Origin::Local`] (sent by the node): output (−110, −100, 0), postrouting, and if
//!   the destination is local, the loopback pass through prerouting and input (filter
//!   chains only: the connection's NAT is already set up).
//!
//! Semantics follow the kernel for the statements kproxy writes: `jump`/`goto`/`return`,
//! verdict-map lookups on concatenations (a missing key ends the rule), `numgen random
//! mod N vmap` (every branch is explored, each with probability 1/N, like upstream's
//! tracer), `dnat`/`masquerade` (terminal for their base chain), `drop`/`reject`, packet
//! mark arithmetic, `fib … type local` (= one of the caller's `local_addrs`) and `ct
//! state new` (always true). Affinity sets are empty for a fresh client: the trace says
//! that session affinity is in effect instead of guessing at remembered clients.
//!
//! Evaluation is pure and total: a jump to a missing chain, a lookup in a missing map, a
//! rule kproxy never writes (live tables only) or a loop ends that branch with a
//! [`PacketVerdict::Drift`] outcome instead of a panic.
//!
//! ```
//! use kproxy_backend_api::{IpFamily, NodeContext, Protocol, ServicePlans};
//! use kproxy_nftables::eval::{Origin, Packet, Ruleset, Summary};
//! let rs = Ruleset::desired(&NodeContext::empty(IpFamily::V4, "node-a"), &ServicePlans::new());
//! let p = Packet::new(
//!     "10.0.0.1".parse().unwrap(),
//!     "172.30.0.1:80".parse().unwrap(),
//!     Protocol::Tcp,
//!     Origin::Forwarded,
//! );
//! let t = rs.trace(&p, &Default::default());
//! assert_eq!(t.summary(), Summary::Untouched);
//! ```

use crate::names::ObjName;
use crate::objects::{
    self, Chain, ElemKey, Element, Hook, MapId, Verdict, CLUSTER_IPS_CHECK, MARK_FOR_MASQUERADE,
    REJECT_CHAIN,
};
use crate::rule::{family_kw, AddrSet, Match, Rule, Stmt, VmapKey};
use ipnet::IpNet;
use kproxy_backend_api::{IpFamily, NodeContext, Protocol, ServicePlans, MASQUERADE_MARK};
use serde_json::{json, Value};
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Nested chain calls after which a branch is reported as a loop.
const MAX_DEPTH: usize = 64;
/// Rule evaluations after which the whole trace gives up (only a pathological live table
/// gets near it: kproxy's own rulesets need a few dozen).
const BUDGET: usize = 1_000_000;

/// A rule of a live chain that kproxy never writes, kept where it sits so evaluation can
/// stop there and report drift instead of guessing what it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignRule {
    /// The index in the chain's typed rules that this rule precedes.
    pub position: usize,
    /// The rule as `nft -j` printed it.
    pub json: String,
}

/// One family's kproxy table as data.
///
/// Address sets in rules are canonical (prefixes sorted and merged, a single host prefix
/// written as an address, the loopback exclusion as [`Match::DaddrNotLoopback`]) in both
/// constructors, since that is how the kernel reports them back; everything else is
/// exactly what [`objects`] produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub family: IpFamily,
    /// Every chain, base chains included, with its rules.
    pub chains: BTreeMap<ObjName, Vec<Rule>>,
    /// The base chains and their hooks.
    pub base_chains: BTreeMap<ObjName, Hook>,
    /// The fixed sets and maps that exist, with their elements.
    pub elements: BTreeMap<MapId, BTreeMap<ElemKey, Option<Verdict>>>,
    /// Element comments (`ns/svc:port` on the no-endpoint maps).
    pub comments: BTreeMap<(MapId, ElemKey), String>,
    /// Session-affinity sets and their timeouts in seconds.
    pub affinity_sets: BTreeMap<ObjName, u32>,
    /// Live rules kproxy never writes, per chain (always empty for desired state).
    pub foreign: BTreeMap<ObjName, Vec<ForeignRule>>,
}

impl Ruleset {
    /// A family with no kproxy table at all: every packet passes untouched.
    pub fn empty(family: IpFamily) -> Ruleset {
        Ruleset {
            family,
            chains: BTreeMap::new(),
            base_chains: BTreeMap::new(),
            elements: BTreeMap::new(),
            comments: BTreeMap::new(),
            affinity_sets: BTreeMap::new(),
            foreign: BTreeMap::new(),
        }
    }

    /// What kproxy programs for this node and these services: the skeleton of
    /// [`objects::static_objects`] plus every service's [`objects::service_objects`].
    /// When two services claim one map key, the node's element, then the first service
    /// in name order wins, as in the backend.
    pub fn desired(node: &NodeContext, services: &ServicePlans) -> Ruleset {
        let mut rs = Ruleset::empty(node.family);
        for m in MapId::ALL {
            rs.elements.insert(m, BTreeMap::new());
        }
        let skeleton = objects::static_objects(node);
        for (hook, chain) in &skeleton.base_chains {
            rs.base_chains.insert(chain.name.clone(), *hook);
            rs.add_chain(chain);
        }
        for chain in &skeleton.chains {
            rs.add_chain(chain);
        }
        rs.add_elements(&skeleton.elements);
        for ports in services.values() {
            let o = objects::service_objects(node, ports);
            for chain in &o.chains {
                rs.add_chain(chain);
            }
            for set in &o.affinity_sets {
                rs.affinity_sets
                    .insert(set.name.clone(), set.timeout_seconds);
            }
            rs.add_elements(&o.elements);
        }
        rs
    }

    fn add_chain(&mut self, chain: &Chain) {
        let rules = chain
            .rules
            .iter()
            .map(|r| canonical_rule(self.family, r.clone()))
            .collect();
        self.chains.insert(chain.name.clone(), rules);
    }

    fn add_elements(&mut self, elements: &[Element]) {
        for e in elements {
            let map = self.elements.entry(e.map).or_default();
            if map.contains_key(&e.key) {
                continue;
            }
            map.insert(e.key.clone(), e.verdict.clone());
            if let Some(c) = &e.comment {
                self.comments.insert((e.map, e.key.clone()), c.clone());
            }
        }
    }

    /// Every map element that leads to a service port, by `ns/svc:port`: the
    /// destinations (`service-ips`, `service-nodeports`, the no-endpoint maps) and the
    /// firewall entries. What `kproxy explain` traces for one service.
    pub fn service_entries(&self) -> BTreeMap<String, Vec<(MapId, ElemKey)>> {
        let mut out: BTreeMap<String, Vec<(MapId, ElemKey)>> = BTreeMap::new();
        for (m, elems) in &self.elements {
            for (k, v) in elems {
                let from_chain = match v {
                    Some(Verdict::Goto(c)) => service_of(c.as_str()),
                    _ => None,
                };
                let svc = from_chain.or_else(|| self.comments.get(&(*m, k.clone())).cloned());
                if let Some(svc) = svc {
                    out.entry(svc).or_default().push((*m, k.clone()));
                }
            }
        }
        out
    }

    /// Everything that differs between this (intended) ruleset and `live`, in plain
    /// words; empty when the kernel holds exactly what kproxy intends.
    pub fn differences(&self, live: &Ruleset) -> Vec<String> {
        let mut out = Vec::new();
        if self.family != live.family {
            out.push(format!(
                "family: intended {}, the kernel table is {}",
                self.family, live.family
            ));
        }
        for (name, rules) in &self.chains {
            match live.chains.get(name) {
                None => out.push(format!("chain {name}: missing from the kernel")),
                Some(l) if l != rules => out.push(format!(
                    "chain {name}: rules differ (intended {} rule(s): [{}]; the kernel holds {}: [{}])",
                    rules.len(),
                    render_rules(self.family, rules),
                    l.len(),
                    render_rules(self.family, l)
                )),
                Some(_) => {}
            }
        }
        for name in live.chains.keys() {
            if !self.chains.contains_key(name) {
                out.push(format!("chain {name}: in the kernel but not intended"));
            }
        }
        for (name, hook) in &self.base_chains {
            match live.base_chains.get(name) {
                Some(h) if h == hook => {}
                Some(h) => out.push(format!(
                    "base chain {name}: intended {} {} priority {}, the kernel has {} {} priority {}",
                    hook.kind, hook.hook, hook.priority, h.kind, h.hook, h.priority
                )),
                None => out.push(format!(
                    "base chain {name}: not hooked in the kernel ({} {} priority {})",
                    hook.kind, hook.hook, hook.priority
                )),
            }
        }
        for name in live.base_chains.keys() {
            if !self.base_chains.contains_key(name) {
                out.push(format!(
                    "base chain {name}: hooked in the kernel but not intended"
                ));
            }
        }
        let maps: BTreeSet<MapId> = self
            .elements
            .keys()
            .chain(live.elements.keys())
            .copied()
            .collect();
        let empty = BTreeMap::new();
        for m in maps {
            let (want, have) = match (self.elements.get(&m), live.elements.get(&m)) {
                (Some(w), Some(h)) => (w, h),
                (Some(w), None) => {
                    out.push(format!("{m}: missing from the kernel"));
                    (w, &empty)
                }
                (None, Some(h)) => {
                    out.push(format!("{m}: in the kernel but not intended"));
                    (&empty, h)
                }
                (None, None) => continue,
            };
            for (k, v) in want {
                match have.get(k) {
                    None => out.push(format!("{m}: element {k} missing from the kernel")),
                    Some(h) if h != v => out.push(format!(
                        "{m}: element {k} is {} in the kernel, intended {}",
                        verdict_words(h),
                        verdict_words(v)
                    )),
                    Some(_) => {}
                }
            }
            for k in have.keys() {
                if !want.contains_key(k) {
                    out.push(format!("{m}: element {k} in the kernel but not intended"));
                }
            }
        }
        for (k, c) in &self.comments {
            if live.comments.get(k) != Some(c) {
                out.push(format!("{}: element {} comment differs", k.0, k.1));
            }
        }
        for k in live.comments.keys() {
            if !self.comments.contains_key(k) {
                out.push(format!(
                    "{}: element {} has a comment kproxy did not write",
                    k.0, k.1
                ));
            }
        }
        for (name, t) in &self.affinity_sets {
            match live.affinity_sets.get(name) {
                None => out.push(format!("affinity set {name}: missing from the kernel")),
                Some(l) if l != t => out.push(format!(
                    "affinity set {name}: timeout {l}s in the kernel, intended {t}s"
                )),
                Some(_) => {}
            }
        }
        for name in live.affinity_sets.keys() {
            if !self.affinity_sets.contains_key(name) {
                out.push(format!(
                    "affinity set {name}: in the kernel but not intended"
                ));
            }
        }
        for (chain, rules) in &live.foreign {
            for r in rules {
                out.push(format!(
                    "chain {chain}: rule {} is not one kproxy writes: {}",
                    r.position, r.json
                ));
            }
        }
        out
    }

    /// Evaluates a NEW connection's first packet. `local_addrs` are the node's own
    /// addresses (`fib … type local`, and the input/forward routing decision).
    pub fn trace(&self, packet: &Packet, local_addrs: &BTreeSet<IpAddr>) -> Trace {
        let mut st = St::new(packet);
        let fam_ok =
            IpFamily::of(&packet.src) == self.family && IpFamily::of(&packet.dst) == self.family;
        if !fam_ok {
            st.no_masq_hint = Some("not this family's table".into());
            let why = format!(
                "the {} kproxy table never sees a packet from {} to {}",
                family_kw(self.family),
                packet.src,
                packet.dst
            );
            return Trace::assemble(self.family, packet.clone(), vec![(st, End::Untouched(why))]);
        }
        let ev = Eval {
            rs: self,
            pkt: packet,
            local: local_addrs,
            budget: Cell::new(BUDGET),
        };
        let mut ends = Vec::new();
        match packet.origin {
            Origin::Forwarded => {
                let live = ev.hook(vec![st], "prerouting", false, &mut ends);
                for mut s in live {
                    if local_addrs.contains(&s.daddr) {
                        s.delivered = Some("input");
                        for s in ev.hook(vec![s], "input", false, &mut ends) {
                            ends.push(ev.accept(s));
                        }
                    } else {
                        s.delivered = Some("forward");
                        let fwd = ev.hook(vec![s], "forward", false, &mut ends);
                        for s in ev.hook(fwd, "postrouting", false, &mut ends) {
                            ends.push(ev.accept(s));
                        }
                    }
                }
            }
            Origin::Local => {
                let out = ev.hook(vec![st], "output", false, &mut ends);
                let post = ev.hook(out, "postrouting", false, &mut ends);
                for mut s in post {
                    if local_addrs.contains(&s.daddr) {
                        // Looped back through `lo`: filter chains see it again, NAT is
                        // already decided for the connection.
                        s.delivered = Some("input");
                        let pre = ev.hook(vec![s], "prerouting", true, &mut ends);
                        for s in ev.hook(pre, "input", true, &mut ends) {
                            ends.push(ev.accept(s));
                        }
                    } else {
                        s.delivered = Some("output");
                        ends.push(ev.accept(s));
                    }
                }
            }
        }
        Trace::assemble(self.family, packet.clone(), ends)
    }
}

fn render_rules(family: IpFamily, rules: &[Rule]) -> String {
    rules
        .iter()
        .map(|r| r.render(family))
        .collect::<Vec<_>>()
        .join("; ")
}

fn verdict_words(v: &Option<Verdict>) -> String {
    match v {
        Some(v) => v.to_string(),
        None => "a plain set element".into(),
    }
}

/// The canonical form of a rule (see [`Ruleset`]): what the kernel reports back.
pub(crate) fn canonical_rule(family: IpFamily, mut rule: Rule) -> Rule {
    rule.matches = rule
        .matches
        .into_iter()
        .map(|m| match m {
            Match::Saddr { negate, set } => Match::Saddr {
                negate,
                set: canonical_set(set),
            },
            Match::Daddr { negate, set } => {
                let set = canonical_set(set);
                if negate && is_loopback(family, &set) {
                    Match::DaddrNotLoopback
                } else {
                    Match::Daddr { negate, set }
                }
            }
            other => other,
        })
        .collect();
    rule
}

fn canonical_set(set: AddrSet) -> AddrSet {
    match set {
        AddrSet::Prefixes(p) => {
            let merged = IpNet::aggregate(&p);
            match merged.as_slice() {
                [one] if one.prefix_len() == one.max_prefix_len() => AddrSet::Addr(one.addr()),
                _ => AddrSet::Prefixes(merged),
            }
        }
        other => other,
    }
}

fn is_loopback(family: IpFamily, set: &AddrSet) -> bool {
    match (family, set) {
        (IpFamily::V4, AddrSet::Prefixes(p)) => matches!(
            p.as_slice(),
            [n] if n.addr() == IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)) && n.prefix_len() == 8
        ),
        (IpFamily::V6, AddrSet::Addr(a)) => *a == IpAddr::V6(Ipv6Addr::LOCALHOST),
        _ => false,
    }
}

/// Which hook path a packet takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Origin {
    /// Arrives on an interface, from a pod or an external client: prerouting, then input
    /// or forward.
    Forwarded,
    /// Sent by the node itself: output.
    Local,
}

impl Origin {
    fn words(self) -> &'static str {
        match self {
            Origin::Forwarded => "arriving from a pod or an external client",
            Origin::Local => "sent by the node itself",
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Origin::Forwarded => "forwarded",
            Origin::Local => "local",
        }
    }
}

/// The first packet of a new connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Protocol,
    pub dport: u16,
    pub origin: Origin,
}

impl Packet {
    pub fn new(src: IpAddr, dst: SocketAddr, proto: Protocol, origin: Origin) -> Packet {
        Packet {
            src,
            dst: dst.ip(),
            proto,
            dport: dst.port(),
            origin,
        }
    }

    /// Parses a `DST:PORT[/PROTO]` target (`172.30.0.41:80/tcp`, `[fd00::1]:53/udp`;
    /// the protocol defaults to TCP).
    pub fn parse_target(s: &str) -> Result<(SocketAddr, Protocol), String> {
        let (addr, proto) = match s.rsplit_once('/') {
            Some((a, p)) => {
                let proto = match p.to_ascii_lowercase().as_str() {
                    "tcp" => Protocol::Tcp,
                    "udp" => Protocol::Udp,
                    "sctp" => Protocol::Sctp,
                    _ => return Err(format!("unknown protocol {p:?} (tcp, udp or sctp)")),
                };
                (a, proto)
            }
            None => (s, Protocol::Tcp),
        };
        let addr: SocketAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not ADDRESS:PORT (IPv6 as [ADDRESS]:PORT)"))?;
        Ok((addr, proto))
    }

    fn dst_words(&self) -> String {
        format!(
            "{}/{}",
            SocketAddr::new(self.dst, self.dport),
            self.proto.as_str()
        )
    }
}

impl fmt::Display for Packet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} → {}", self.src, self.dst_words())
    }
}

/// One rule evaluated on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The hook the packet is in (`prerouting`, `input`, `forward`, `output`,
    /// `postrouting`).
    pub hook: String,
    pub chain: String,
    /// The rule in `nft` syntax.
    pub rule: String,
    /// Whether the rule fired (its conditions held and its lookup, if any, hit).
    pub matched: bool,
    /// What happened, in plain words.
    pub action: String,
}

impl Step {
    fn to_json(&self) -> Value {
        json!({"hook": self.hook, "chain": self.chain, "rule": self.rule,
               "matched": self.matched, "action": self.action})
    }
}

/// What finally happens to the packet on one branch.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PacketVerdict {
    /// Accepted; `dnat` is the endpoint it was rewritten to, if any.
    Accept {
        dnat: Option<SocketAddr>,
    },
    Reject,
    Drop,
    /// The ruleset is not what kproxy writes (a missing chain or map, a foreign rule, a
    /// loop): the kernel's behaviour cannot be predicted from kproxy's model.
    Drift(String),
}

impl PacketVerdict {
    fn as_str(&self) -> &'static str {
        match self {
            PacketVerdict::Accept { .. } => "accept",
            PacketVerdict::Reject => "reject",
            PacketVerdict::Drop => "drop",
            PacketVerdict::Drift(_) => "drift",
        }
    }
}

/// One possible fate of the packet, with its probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub verdict: PacketVerdict,
    pub probability: f64,
    /// Source NAT at postrouting.
    pub masquerade: bool,
    /// Why it is, or is not, masqueraded.
    pub masquerade_reason: String,
    /// The verdict in plain words (why rejected or dropped, where it was DNATed to).
    pub reason: String,
    /// The service port that matched (`ns/svc:port`), if any.
    pub service: Option<String>,
    /// Where the packet goes after the rules: `input` (this node), `forward` (routed
    /// onward) or `output` (sent by the node); None when rejected or dropped earlier.
    pub delivered: Option<String>,
    /// Every chain entered, in order.
    pub via: Vec<String>,
    /// Side notes (session affinity).
    pub notes: Vec<String>,
    /// The steps of this branch after the steps all branches share ([`Trace::steps`]).
    pub steps: Vec<Step>,
}

impl Outcome {
    /// One line: the verdict, the endpoint and masquerading.
    pub fn describe(&self) -> String {
        match &self.verdict {
            PacketVerdict::Accept { dnat: Some(to) } => format!(
                "ACCEPT → {to}, masquerade {}",
                if self.masquerade { "yes" } else { "no" }
            ),
            PacketVerdict::Accept { dnat: None } => format!(
                "ACCEPT untouched, masquerade {}",
                if self.masquerade { "yes" } else { "no" }
            ),
            PacketVerdict::Reject => format!("REJECT: {}", self.reason),
            PacketVerdict::Drop => format!("DROP: {}", self.reason),
            PacketVerdict::Drift(why) => format!("DRIFT: {why}"),
        }
    }

    /// What is compared between traces: the verdict and masquerading.
    fn fate(&self) -> String {
        match &self.verdict {
            PacketVerdict::Accept { .. } => self.describe(),
            PacketVerdict::Reject => "REJECT".into(),
            PacketVerdict::Drop => "DROP".into(),
            PacketVerdict::Drift(why) => format!("DRIFT: {why}"),
        }
    }

    pub fn to_json(&self) -> Value {
        let dnat = match &self.verdict {
            PacketVerdict::Accept { dnat: Some(to) } => json!(to.to_string()),
            _ => Value::Null,
        };
        let drift = match &self.verdict {
            PacketVerdict::Drift(why) => json!(why),
            _ => Value::Null,
        };
        json!({
            "verdict": self.verdict.as_str(),
            "dnat": dnat,
            "drift": drift,
            "probability": self.probability,
            "masquerade": self.masquerade,
            "masquerade_reason": self.masquerade_reason,
            "reason": self.reason,
            "service": self.service,
            "delivered": self.delivered,
            "via": self.via,
            "notes": self.notes,
            "steps": self.steps.iter().map(Step::to_json).collect::<Vec<_>>(),
        })
    }
}

/// The short answer of a trace, for assertions and comparisons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Summary {
    /// Every branch is DNATed to an endpoint; `masquerade` is None when branches differ
    /// (a hairpin on one endpoint of several).
    Endpoints {
        endpoints: BTreeSet<SocketAddr>,
        masquerade: Option<bool>,
    },
    /// Accepted without DNAT: kproxy leaves it alone.
    Untouched,
    Reject,
    Drop,
    /// Some branch hit drift.
    Drift(Vec<String>),
    /// Branches end differently (neither drift nor one kind of verdict).
    Mixed,
}

/// The result of [`Ruleset::trace`].
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub family: IpFamily,
    pub packet: Packet,
    /// The steps every branch shares (up to the first `numgen` fork).
    pub steps: Vec<Step>,
    /// Every possible fate; probabilities add up to 1.
    pub outcomes: Vec<Outcome>,
}

impl Trace {
    /// Every endpoint some branch is DNATed to.
    pub fn endpoints(&self) -> BTreeSet<SocketAddr> {
        self.outcomes
            .iter()
            .filter_map(|o| match o.verdict {
                PacketVerdict::Accept { dnat: Some(to) } => Some(to),
                _ => None,
            })
            .collect()
    }

    /// The probability of each endpoint.
    pub fn probabilities(&self) -> BTreeMap<SocketAddr, f64> {
        let mut out = BTreeMap::new();
        for o in &self.outcomes {
            if let PacketVerdict::Accept { dnat: Some(to) } = o.verdict {
                *out.entry(to).or_insert(0.0) += o.probability;
            }
        }
        out
    }

    /// Whether accepted traffic is masqueraded: `Some` when every accepted branch
    /// agrees, None when they differ or nothing is accepted.
    pub fn masqueraded(&self) -> Option<bool> {
        let set: BTreeSet<bool> = self
            .outcomes
            .iter()
            .filter(|o| matches!(o.verdict, PacketVerdict::Accept { .. }))
            .map(|o| o.masquerade)
            .collect();
        match set.len() {
            1 => set.into_iter().next(),
            _ => None,
        }
    }

    /// The service port that matched, if any.
    pub fn service(&self) -> Option<&str> {
        self.outcomes.iter().find_map(|o| o.service.as_deref())
    }

    /// Notes of every branch, deduplicated.
    pub fn notes(&self) -> BTreeSet<&str> {
        self.outcomes
            .iter()
            .flat_map(|o| o.notes.iter().map(String::as_str))
            .collect()
    }

    pub fn summary(&self) -> Summary {
        let drift: Vec<String> = self
            .outcomes
            .iter()
            .filter_map(|o| match &o.verdict {
                PacketVerdict::Drift(why) => Some(why.clone()),
                _ => None,
            })
            .collect();
        if !drift.is_empty() {
            return Summary::Drift(drift);
        }
        let all = |f: fn(&PacketVerdict) -> bool| self.outcomes.iter().all(|o| f(&o.verdict));
        if self.outcomes.is_empty() {
            Summary::Mixed
        } else if all(|v| matches!(v, PacketVerdict::Accept { dnat: Some(_) })) {
            Summary::Endpoints {
                endpoints: self.endpoints(),
                masquerade: self.masqueraded(),
            }
        } else if all(|v| matches!(v, PacketVerdict::Accept { dnat: None })) {
            Summary::Untouched
        } else if all(|v| *v == PacketVerdict::Reject) {
            Summary::Reject
        } else if all(|v| *v == PacketVerdict::Drop) {
            Summary::Drop
        } else {
            Summary::Mixed
        }
    }

    /// The trace as JSON (`kproxy trace --output json`).
    pub fn to_json(&self) -> Value {
        let summary = match self.summary() {
            Summary::Endpoints {
                endpoints,
                masquerade,
            } => json!({"kind": "endpoints",
                "endpoints": endpoints.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "masquerade": masquerade}),
            Summary::Untouched => json!({"kind": "untouched"}),
            Summary::Reject => json!({"kind": "reject"}),
            Summary::Drop => json!({"kind": "drop"}),
            Summary::Drift(why) => json!({"kind": "drift", "reasons": why}),
            Summary::Mixed => json!({"kind": "mixed"}),
        };
        json!({
            "family": self.family.label(),
            "packet": {
                "src": self.packet.src.to_string(),
                "dst": self.packet.dst.to_string(),
                "dport": self.packet.dport,
                "protocol": self.packet.proto.as_str(),
                "origin": self.packet.origin.as_str(),
            },
            "service": self.service(),
            "summary": summary,
            "steps": self.steps.iter().map(Step::to_json).collect::<Vec<_>>(),
            "outcomes": self.outcomes.iter().map(Outcome::to_json).collect::<Vec<_>>(),
        })
    }

    fn assemble(family: IpFamily, packet: Packet, ends: Vec<(St, End)>) -> Trace {
        let mut outcomes: Vec<Outcome> = ends.into_iter().map(|(s, e)| outcome(s, e)).collect();
        let common = match outcomes.split_first() {
            Some((first, rest)) => rest.iter().fold(first.steps.len(), |n, o| {
                first.steps[..n]
                    .iter()
                    .zip(&o.steps)
                    .take_while(|(a, b)| a == b)
                    .count()
            }),
            None => 0,
        };
        let steps = outcomes
            .first()
            .map(|o| o.steps[..common].to_vec())
            .unwrap_or_default();
        for o in &mut outcomes {
            o.steps.drain(..common);
        }
        Trace {
            family,
            packet,
            steps,
            outcomes,
        }
    }

    fn write_result(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(s) = self.service() {
            writeln!(f, "service: {s}")?;
        }
        match self.summary() {
            Summary::Endpoints { endpoints, .. } => {
                let probs = self.probabilities();
                let n = endpoints.len();
                let uniform = probs.values().all(|p| (p - 1.0 / n as f64).abs() < 1e-9);
                let list = |with_p: bool| {
                    probs
                        .iter()
                        .map(|(e, p)| {
                            if with_p {
                                format!("{e} ({})", pct(*p))
                            } else {
                                e.to_string()
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                if n == 1 {
                    writeln!(f, "1 endpoint: {}", list(false))?;
                } else if uniform {
                    writeln!(
                        f,
                        "{n} endpoints, {} each: {}",
                        pct(1.0 / n as f64),
                        list(false)
                    )?;
                } else {
                    writeln!(f, "{n} endpoints: {}", list(true))?;
                }
                self.write_masquerade(f)?;
            }
            Summary::Untouched => {
                let reason = self.outcomes.first().map(|o| o.reason.as_str());
                writeln!(f, "ACCEPT, untouched: {}", reason.unwrap_or(""))?;
                self.write_masquerade(f)?;
            }
            Summary::Reject | Summary::Drop => {
                let reasons: BTreeSet<&str> =
                    self.outcomes.iter().map(|o| o.reason.as_str()).collect();
                let word = if self.summary() == Summary::Reject {
                    "REJECT"
                } else {
                    "DROP"
                };
                for r in reasons {
                    writeln!(f, "{word}: {r}")?;
                }
            }
            Summary::Drift(_) | Summary::Mixed => {
                for o in &self.outcomes {
                    writeln!(f, "{}: {}", pct(o.probability), o.describe())?;
                }
            }
        }
        for n in self.notes() {
            writeln!(f, "note: {n}")?;
        }
        Ok(())
    }

    fn write_masquerade(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let accepted: Vec<&Outcome> = self
            .outcomes
            .iter()
            .filter(|o| matches!(o.verdict, PacketVerdict::Accept { .. }))
            .collect();
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        let reasons: BTreeSet<(bool, &str)> = accepted
            .iter()
            .map(|o| (o.masquerade, o.masquerade_reason.as_str()))
            .collect();
        if reasons.len() == 1 {
            if let Some((m, r)) = reasons.into_iter().next() {
                return writeln!(f, "masquerade: {} ({r})", yes_no(m));
            }
        }
        for o in accepted {
            let to = match o.verdict {
                PacketVerdict::Accept { dnat: Some(to) } => to.to_string(),
                _ => "untouched".into(),
            };
            writeln!(
                f,
                "masquerade to {to}: {} ({})",
                yes_no(o.masquerade),
                o.masquerade_reason
            )?;
        }
        Ok(())
    }
}

fn pct(p: f64) -> String {
    let v = p * 100.0;
    if (v - v.round()).abs() < 1e-6 {
        format!("{v:.0}%")
    } else {
        format!("{v:.1}%")
    }
}

fn write_steps(f: &mut fmt::Formatter<'_>, steps: &[Step], all: bool) -> fmt::Result {
    for s in steps.iter().filter(|s| all || s.matched) {
        writeln!(f, "  [{}] {}: {}", s.hook, s.chain, s.rule)?;
        writeln!(f, "      → {}", s.action)?;
    }
    Ok(())
}

impl fmt::Display for Trace {
    /// Plain words: the packet, the path (matching rules only; `{:#}` shows every rule
    /// evaluated), the branches, then the result.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all = f.alternate();
        writeln!(
            f,
            "packet {} ({}, {}, new connection)",
            self.packet,
            self.family,
            self.packet.origin.words()
        )?;
        writeln!(f, "path:")?;
        write_steps(f, &self.steps, all)?;
        const SHOWN: usize = 4;
        if self.outcomes.len() > 1 {
            let n = self.outcomes.len();
            for (i, o) in self.outcomes.iter().enumerate().take(SHOWN) {
                writeln!(f, "branch {} of {n} ({}):", i + 1, pct(o.probability))?;
                write_steps(f, &o.steps, all)?;
                writeln!(f, "  = {}", o.describe())?;
            }
            if n > SHOWN {
                writeln!(f, "… and {} more branches like these", n - SHOWN)?;
            }
        }
        self.write_result(f)
    }
}

/// How a desired and a live trace of one packet differ.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceDiff {
    pub packet: Packet,
    /// Fates (verdict, endpoint, masquerade) with their probabilities, intended.
    pub desired: Vec<(String, f64)>,
    /// The same, as the kernel holds it.
    pub live: Vec<(String, f64)>,
    /// The live trace's reasons for what differs (why rejected, dropped, drifted).
    pub live_reasons: Vec<String>,
    pub service: Option<String>,
}

impl fmt::Display for TraceDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "drift for {}", self.packet)?;
        if let Some(s) = &self.service {
            write!(f, " ({s})")?;
        }
        writeln!(f, ": the kernel does not do what kproxy intends")?;
        let list = |v: &[(String, f64)]| {
            v.iter()
                .map(|(fate, p)| format!("{fate} ({})", pct(*p)))
                .collect::<Vec<_>>()
                .join("; ")
        };
        writeln!(f, "  intended: {}", list(&self.desired))?;
        writeln!(f, "  kernel:   {}", list(&self.live))?;
        for r in &self.live_reasons {
            writeln!(f, "  because:  {r}")?;
        }
        Ok(())
    }
}

fn fates(t: &Trace) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for o in &t.outcomes {
        *out.entry(o.fate()).or_insert(0.0) += o.probability;
    }
    out
}

/// Compares the fates (verdict, endpoint, masquerading, probability) of two traces of
/// the same packet; None when they agree.
pub fn diff(desired: &Trace, live: &Trace) -> Option<TraceDiff> {
    let (d, l) = (fates(desired), fates(live));
    let same = d.len() == l.len()
        && d.iter()
            .zip(&l)
            .all(|((a, p), (b, q))| a == b && (p - q).abs() < 1e-9);
    if same {
        return None;
    }
    let live_reasons: BTreeSet<String> = live
        .outcomes
        .iter()
        .filter(|o| !d.contains_key(&o.fate()))
        .map(|o| o.reason.clone())
        .collect();
    Some(TraceDiff {
        packet: desired.packet.clone(),
        desired: d.into_iter().collect(),
        live: l.into_iter().collect(),
        live_reasons: live_reasons.into_iter().collect(),
        service: desired
            .service()
            .or_else(|| live.service())
            .map(str::to_string),
    })
}

/// `ns/svc:port` for a per-service object name (chain or affinity set), read from its
/// readable tail; the raw tail when the name was truncated.
pub fn service_of(name: &str) -> Option<String> {
    let (kind, rest) = name.split_once('-')?;
    if !matches!(
        kind,
        "service" | "local" | "external" | "firewall" | "endpoint" | "affinity"
    ) {
        return None;
    }
    let (_hash, tail) = rest.split_once('-')?;
    let base = tail.split("__").next().unwrap_or(tail);
    match base.splitn(4, '/').collect::<Vec<_>>().as_slice() {
        [ns, svc, _proto, port] if !tail.ends_with("...") => Some(format!("{ns}/{svc}:{port}")),
        _ => Some(tail.to_string()),
    }
}

/// The endpoint an endpoint chain or affinity set stands for, from its readable tail.
pub fn endpoint_of(name: &str) -> Option<SocketAddr> {
    let (_, ep) = name.rsplit_once("__")?;
    let (ip, port) = ep.rsplit_once('/')?;
    let port: u16 = port.parse().ok()?;
    let ip: IpAddr = ip
        .parse()
        .ok()
        .or_else(|| ip.replace('.', ":").parse().ok())?;
    Some(SocketAddr::new(ip, port))
}

/// What a chain is for, in words.
fn chain_words(name: &str) -> String {
    let svc = service_of(name);
    let of = |what: &str| match &svc {
        Some(s) => format!("{what} of {s}"),
        None => what.to_string(),
    };
    if name == REJECT_CHAIN {
        return "reject".into();
    }
    if !name.contains('/') {
        return name.to_string();
    }
    match name.split_once('-').map(|(k, _)| k) {
        Some("service") => of("cluster-wide endpoints"),
        Some("local") => of("node-local endpoints only (traffic policy Local)"),
        Some("external") => of("the external-traffic entry"),
        Some("firewall") => of("the loadBalancerSourceRanges check"),
        Some("endpoint") => match endpoint_of(name) {
            Some(ep) => format!("endpoint {ep}"),
            None => "an endpoint".into(),
        },
        _ => name.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// The interpreter.

/// One branch's state.
#[derive(Debug, Clone)]
struct St {
    daddr: IpAddr,
    dport: u16,
    dnat: Option<SocketAddr>,
    mark: u32,
    prob: f64,
    hook: &'static str,
    steps: Vec<Step>,
    via: Vec<String>,
    notes: Vec<String>,
    service: Option<String>,
    masq_reason: Option<String>,
    no_masq_hint: Option<String>,
    masqueraded: bool,
    /// The last verdict-map element that fired.
    element: Option<(MapId, ElemKey)>,
    delivered: Option<&'static str>,
}

impl St {
    fn new(p: &Packet) -> St {
        St {
            daddr: p.dst,
            dport: p.dport,
            dnat: None,
            mark: 0,
            prob: 1.0,
            hook: "",
            steps: Vec::new(),
            via: Vec::new(),
            notes: Vec::new(),
            service: None,
            masq_reason: None,
            no_masq_hint: None,
            masqueraded: false,
            element: None,
            delivered: None,
        }
    }

    fn step(&mut self, chain: &ObjName, rule: String, matched: bool, action: String) {
        self.steps.push(Step {
            hook: self.hook.to_string(),
            chain: chain.to_string(),
            rule,
            matched,
            action,
        });
    }

    fn note(&mut self, n: String) {
        if !self.notes.contains(&n) {
            self.notes.push(n);
        }
    }

    fn set_service(&mut self, chain: &ObjName) {
        if self.service.is_none() && chain.is_per_service() {
            self.service = service_of(chain.as_str());
        }
    }
}

/// How a chain (or the rest of one) ended.
#[derive(Debug)]
enum Flow {
    /// Fell off the end or returned: the caller continues.
    Continue,
    /// `dnat`/`masquerade`: this base chain accepts; the next one runs.
    Accept,
    /// The packet's fate is sealed.
    Final(End),
}

/// A final fate, with the reason in words.
#[derive(Debug)]
enum End {
    Accepted(String),
    Untouched(String),
    Reject(String),
    Drop(String),
    Drift(String),
}

enum Cond {
    Yes,
    No(String),
    Drift(String),
}

struct Eval<'a> {
    rs: &'a Ruleset,
    pkt: &'a Packet,
    local: &'a BTreeSet<IpAddr>,
    budget: Cell<usize>,
}

impl Eval<'_> {
    /// Runs the base chains of `hook` in priority order over every branch; sealed fates
    /// go to `ends`, the rest is returned.
    fn hook(
        &self,
        states: Vec<St>,
        hook: &'static str,
        skip_nat: bool,
        ends: &mut Vec<(St, End)>,
    ) -> Vec<St> {
        let mut chains: Vec<(&ObjName, &Hook)> = self
            .rs
            .base_chains
            .iter()
            .filter(|(_, h)| h.hook == hook && !(skip_nat && h.kind == "nat"))
            .collect();
        chains.sort_by_key(|(name, h)| (h.priority, *name));
        let mut live = states;
        for (name, _) in chains {
            let mut next = Vec::new();
            for mut st in live {
                st.hook = hook;
                for (s, flow) in self.chain(st, name, 0) {
                    match flow {
                        Flow::Continue | Flow::Accept => next.push(s),
                        Flow::Final(end) => ends.push((s, end)),
                    }
                }
            }
            live = next;
        }
        live
    }

    /// The fate of a branch that got through every hook.
    fn accept(&self, st: St) -> (St, End) {
        let where_ = match st.delivered {
            Some("input") => "delivered to this node",
            Some("output") => "sent out by the node",
            _ => "routed onward",
        };
        let end = match (st.dnat, &st.service) {
            (Some(to), _) => End::Accepted(format!("DNAT to {to}, {where_}")),
            (None, Some(svc)) => End::Untouched(format!(
                "matched {svc}, but no rule rewrote the destination; {where_}"
            )),
            (None, None) => End::Untouched(format!(
                "{} is not a service address kproxy handles; {where_}",
                self.pkt.dst_words()
            )),
        };
        (st, end)
    }

    fn drift(&self, st: St, why: String) -> Vec<(St, Flow)> {
        vec![(st, Flow::Final(End::Drift(why)))]
    }

    fn chain(&self, mut st: St, name: &ObjName, depth: usize) -> Vec<(St, Flow)> {
        if depth > MAX_DEPTH {
            return self.drift(
                st,
                format!("chain calls nest deeper than {MAX_DEPTH} at {name} (a loop?)"),
            );
        }
        let Some(rules) = self.rs.chains.get(name) else {
            return self.drift(st, format!("jump to missing chain {name}"));
        };
        st.via.push(name.to_string());
        self.rules(st, name, rules, 0, 0, depth)
    }

    fn cond(&self, st: &St, m: &Match) -> Cond {
        let fam = family_kw(self.rs.family);
        let src = self.pkt.src;
        match m {
            Match::CtStateNew => Cond::Yes,
            Match::Saddr { negate, set } | Match::Daddr { negate, set } => {
                let (what, ip) = match m {
                    Match::Saddr { .. } => ("saddr", src),
                    _ => ("daddr", st.daddr),
                };
                let inside = match self.in_set(ip, set) {
                    Ok(b) => b,
                    Err(why) => return Cond::Drift(why),
                };
                if inside != *negate {
                    return Cond::Yes;
                }
                let set_words = match set {
                    AddrSet::Addr(a) => a.to_string(),
                    AddrSet::Prefixes(p) => p
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    AddrSet::Named(n) => format!("@{n}"),
                };
                if let AddrSet::Named(n) = set {
                    if self.rs.affinity_sets.contains_key(n) {
                        return Cond::No(format!(
                            "{fam} {what} {ip}: affinity set @{n} is empty for a new client"
                        ));
                    }
                }
                let relation = match (negate, set) {
                    (true, AddrSet::Addr(_)) => "is",
                    (true, _) => "is in",
                    (false, AddrSet::Addr(_)) => "is not",
                    (false, _) => "is not in",
                };
                Cond::No(format!("{fam} {what} {ip} {relation} {set_words}"))
            }
            Match::FibSaddrLocal => {
                if self.local.contains(&src) {
                    Cond::Yes
                } else {
                    Cond::No(format!("source {src} is not an address of this node"))
                }
            }
            Match::FibDaddrLocal => {
                if self.local.contains(&st.daddr) {
                    Cond::Yes
                } else {
                    Cond::No(format!(
                        "destination {} is not an address of this node",
                        st.daddr
                    ))
                }
            }
            Match::DaddrNotLoopback => {
                if st.daddr.is_loopback() {
                    Cond::No(format!("destination {} is loopback", st.daddr))
                } else {
                    Cond::Yes
                }
            }
            Match::MarkUnset(bits) => {
                if st.mark & bits == 0 {
                    Cond::Yes
                } else {
                    Cond::No(format!("mark {:#x} has {bits:#x} set", st.mark))
                }
            }
        }
    }

    fn in_set(&self, ip: IpAddr, set: &AddrSet) -> Result<bool, String> {
        match set {
            AddrSet::Addr(a) => Ok(ip == *a),
            AddrSet::Prefixes(p) => Ok(p.iter().any(|n| n.contains(&ip))),
            AddrSet::Named(n) => match MapId::from_name(n.as_str()) {
                Some(m) if m.is_map() => Err(format!("address match against the map @{n}")),
                Some(m) => match self.rs.elements.get(&m) {
                    Some(e) => Ok(e.contains_key(&ElemKey::Addr(ip))),
                    None => Err(format!("set @{n} is missing")),
                },
                // A fresh client is in no affinity set.
                None if self.rs.affinity_sets.contains_key(n) => Ok(false),
                None => Err(format!("set @{n} is missing")),
            },
        }
    }

    /// Runs `rules` of `chain` from rule `ri`, statement `si`.
    fn rules(
        &self,
        mut st: St,
        chain: &ObjName,
        rules: &[Rule],
        mut ri: usize,
        mut si: usize,
        depth: usize,
    ) -> Vec<(St, Flow)> {
        let fam = self.rs.family;
        loop {
            if si == 0 {
                if let Some(f) = self
                    .rs
                    .foreign
                    .get(chain)
                    .and_then(|f| f.iter().find(|f| f.position == ri))
                {
                    return self.drift(
                        st,
                        format!("chain {chain} holds a rule kproxy never writes: {}", f.json),
                    );
                }
                let Some(rule) = rules.get(ri) else {
                    return vec![(st, Flow::Continue)];
                };
                let left = self.budget.get();
                if left == 0 {
                    return self.drift(st, "evaluation budget exhausted".into());
                }
                self.budget.set(left - 1);
                let mut failed = None;
                for m in &rule.matches {
                    match self.cond(&st, m) {
                        Cond::Yes => {}
                        Cond::No(why) => {
                            failed = Some((m, why));
                            break;
                        }
                        Cond::Drift(why) => return self.drift(st, why),
                    }
                }
                if let Some((m, why)) = failed {
                    self.explain_miss(&mut st, rule, m);
                    st.step(chain, rule.render(fam), false, format!("no match: {why}"));
                    ri += 1;
                    continue;
                }
            }
            let Some(rule) = rules.get(ri) else {
                return vec![(st, Flow::Continue)];
            };
            let Some(stmt) = rule.stmts.get(si) else {
                ri += 1;
                si = 0;
                continue;
            };
            let text = rule.render(fam);
            match stmt {
                Stmt::Jump(target) => {
                    if target.as_str() == MARK_FOR_MASQUERADE && st.masq_reason.is_none() {
                        st.masq_reason = Some(self.masq_reason(chain, rule));
                    }
                    st.step(chain, text, true, format!("jump {}", target_words(target)));
                    let mut out = Vec::new();
                    for (s, flow) in self.chain(st, target, depth + 1) {
                        match flow {
                            Flow::Continue => {
                                out.extend(self.rules(s, chain, rules, ri, si + 1, depth))
                            }
                            other => out.push((s, other)),
                        }
                    }
                    return out;
                }
                Stmt::Goto(target) => {
                    if rule.comment.as_deref() == Some("short-circuit pod traffic") {
                        st.no_masq_hint = Some(
                            "pod traffic to an externalTrafficPolicy=Local service keeps its source"
                                .into(),
                        );
                    }
                    if target.as_str().starts_with("local-")
                        && chain.as_str().starts_with("external-")
                    {
                        st.no_masq_hint = Some(
                            "externalTrafficPolicy=Local keeps the client's source address".into(),
                        );
                    }
                    st.set_service(target);
                    st.step(chain, text, true, format!("goto {}", target_words(target)));
                    return self.chain(st, target, depth + 1);
                }
                Stmt::Drop => {
                    let why = self.drop_reason(&st, chain, &text);
                    st.step(chain, text, true, "drop".into());
                    return vec![(st, Flow::Final(End::Drop(why)))];
                }
                Stmt::Reject => {
                    let why = self.reject_reason(&st, chain, &text);
                    st.step(chain, text, true, "reject".into());
                    return vec![(st, Flow::Final(End::Reject(why)))];
                }
                Stmt::Return => {
                    st.step(chain, text, true, "return".into());
                    return vec![(st, Flow::Continue)];
                }
                Stmt::MarkOr(bits) => {
                    st.mark |= bits;
                    let words = if *bits == MASQUERADE_MARK {
                        " (request masquerading)"
                    } else {
                        ""
                    };
                    st.step(
                        chain,
                        text,
                        true,
                        format!("mark is now {:#x}{words}", st.mark),
                    );
                }
                Stmt::MarkXor(bits) => {
                    st.mark ^= bits;
                    st.step(chain, text, true, format!("mark is now {:#x}", st.mark));
                }
                Stmt::Masquerade => {
                    if st.hook != "postrouting" {
                        return self
                            .drift(st, format!("masquerade outside postrouting in {chain}"));
                    }
                    st.masqueraded = true;
                    st.step(
                        chain,
                        text,
                        true,
                        "masquerade: the source becomes the outgoing interface's address".into(),
                    );
                    return vec![(st, Flow::Accept)];
                }
                Stmt::Dnat { protocol, to } => {
                    if *protocol != self.pkt.proto {
                        st.step(
                            chain,
                            text,
                            false,
                            format!(
                                "no match: meta l4proto is {}, not {protocol}",
                                self.pkt.proto
                            ),
                        );
                        ri += 1;
                        si = 0;
                        continue;
                    }
                    if !matches!(st.hook, "prerouting" | "output") || st.dnat.is_some() {
                        return self.drift(st, format!("dnat in an unexpected place: {chain}"));
                    }
                    if IpFamily::of(&to.ip()) != fam {
                        return self.drift(st, format!("dnat to {to} in the {fam} table"));
                    }
                    st.daddr = to.ip();
                    st.dport = to.port();
                    st.dnat = Some(*to);
                    st.step(chain, text, true, format!("DNAT to {to}"));
                    return vec![(st, Flow::Accept)];
                }
                Stmt::NumgenVmap(targets) => {
                    let n = targets.len();
                    if n == 0 {
                        return self.drift(st, format!("numgen over no chains in {chain}"));
                    }
                    let mut out = Vec::new();
                    for (i, target) in targets.iter().enumerate() {
                        let mut s = st.clone();
                        s.prob /= n as f64;
                        s.step(
                            chain,
                            text.clone(),
                            true,
                            format!(
                                "numgen picks {i} of {n} ({}) → goto {}",
                                pct(1.0 / n as f64),
                                target_words(target)
                            ),
                        );
                        out.extend(self.chain(s, target, depth + 1));
                    }
                    return out;
                }
                Stmt::Vmap { key, map } => {
                    let k = match key {
                        VmapKey::DaddrProtoPort => {
                            ElemKey::AddrProtoPort(st.daddr, self.pkt.proto, st.dport)
                        }
                        VmapKey::ProtoPort => ElemKey::ProtoPort(self.pkt.proto, st.dport),
                    };
                    let Some(m) = MapId::from_name(map.as_str()).filter(|m| m.is_map()) else {
                        return self.drift(st, format!("lookup in unknown map @{map}"));
                    };
                    let Some(elems) = self.rs.elements.get(&m) else {
                        return self.drift(st, format!("map @{map} is missing"));
                    };
                    match elems.get(&k) {
                        None => {
                            st.step(chain, text, false, format!("no element {k} in {m}"));
                            ri += 1;
                            si = 0;
                            continue;
                        }
                        Some(None) => {
                            return self.drift(st, format!("element {k} of {m} has no verdict"))
                        }
                        Some(Some(Verdict::Drop)) => {
                            st.element = Some((m, k.clone()));
                            let why = self.drop_reason(&st, chain, &text);
                            st.step(chain, text, true, format!("matched {m}: {k} → drop"));
                            return vec![(st, Flow::Final(End::Drop(why)))];
                        }
                        Some(Some(Verdict::Goto(target))) => {
                            st.element = Some((m, k.clone()));
                            st.set_service(target);
                            let svc = service_of(target.as_str())
                                .or_else(|| self.rs.comments.get(&(m, k.clone())).cloned());
                            let svc = svc.map(|s| format!(" ({s})")).unwrap_or_default();
                            st.step(
                                chain,
                                text,
                                true,
                                format!("matched {m}: {k} → goto {target}{svc}"),
                            );
                            return self.chain(st, target, depth + 1);
                        }
                    }
                }
                Stmt::UpdateSaddr(set) => {
                    let Some(timeout) = self.rs.affinity_sets.get(set) else {
                        return self.drift(st, format!("update of missing set @{set}"));
                    };
                    let ep = endpoint_of(set.as_str())
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "this endpoint".into());
                    st.note(format!(
                        "session affinity (ClientIP, {timeout}s): the client {} is remembered and sticks to {ep}",
                        self.pkt.src
                    ));
                    st.step(
                        chain,
                        text,
                        true,
                        format!("remember {} in @{set}", self.pkt.src),
                    );
                }
            }
            si += 1;
        }
    }

    /// Why a mark-for-masquerade jump fired.
    fn masq_reason(&self, chain: &ObjName, rule: &Rule) -> String {
        let c = chain.as_str();
        let has = |f: fn(&Match) -> bool| rule.matches.iter().any(f);
        if c.starts_with("endpoint-") {
            "hairpin: the client is the endpoint it was sent to".into()
        } else if has(|m| matches!(m, Match::FibSaddrLocal)) {
            "node-originated traffic to an externalTrafficPolicy=Local service".into()
        } else if has(|m| matches!(m, Match::Saddr { negate: true, .. })) {
            format!("source {} is outside the cluster CIDR", self.pkt.src)
        } else if c.starts_with("service-") || c.starts_with("local-") {
            "--masquerade-all".into()
        } else if c.starts_with("external-") {
            "external traffic with externalTrafficPolicy=Cluster".into()
        } else {
            format!("`{}` in {chain}", rule.render(self.rs.family))
        }
    }

    /// Remembers why a masquerade rule did not fire, when that explains the result.
    fn explain_miss(&self, st: &mut St, rule: &Rule, failed: &Match) {
        let marks = rule
            .stmts
            .iter()
            .any(|s| matches!(s, Stmt::Jump(t) if t.as_str() == MARK_FOR_MASQUERADE));
        if let Match::Saddr {
            set: AddrSet::Named(n),
            ..
        } = failed
        {
            if self.rs.affinity_sets.contains_key(n) {
                st.note(
                    "session affinity (ClientIP) is in effect: this is a new client; a returning one goes back to the endpoint it used before"
                        .into(),
                );
            }
        }
        if marks && matches!(failed, Match::Saddr { negate: true, .. }) {
            st.no_masq_hint = Some(format!(
                "source {} is inside the cluster CIDR",
                self.pkt.src
            ));
        }
    }

    fn element_service(&self, st: &St) -> String {
        st.element
            .as_ref()
            .and_then(|k| self.rs.comments.get(k).cloned())
            .or_else(|| st.service.clone())
            .unwrap_or_else(|| "the service".into())
    }

    fn drop_reason(&self, st: &St, chain: &ObjName, rule: &str) -> String {
        let c = chain.as_str();
        if let Some((m @ (MapId::NoEndpointServices | MapId::NoEndpointNodeports), _)) = &st.element
        {
            let svc = self.element_service(st);
            let is_cluster_ip = self
                .rs
                .elements
                .get(&MapId::ClusterIps)
                .is_some_and(|e| e.contains_key(&ElemKey::Addr(st.daddr)));
            let policy = if *m == MapId::NoEndpointServices && is_cluster_ip {
                "internalTrafficPolicy"
            } else {
                "externalTrafficPolicy"
            };
            return format!("{svc}: {policy} is Local and no endpoint runs on this node ({m})");
        }
        if c.starts_with("firewall-") {
            let svc = service_of(c).unwrap_or_else(|| c.to_string());
            return format!(
                "source {} not in loadBalancerSourceRanges of {svc}",
                self.pkt.src
            );
        }
        if c == CLUSTER_IPS_CHECK {
            return format!(
                "{} is inside a service CIDR but is not an allocated ClusterIP ({c})",
                st.daddr
            );
        }
        format!("`{rule}` in {chain}")
    }

    fn reject_reason(&self, st: &St, chain: &ObjName, rule: &str) -> String {
        let c = chain.as_str();
        if let Some((m @ (MapId::NoEndpointServices | MapId::NoEndpointNodeports), _)) = &st.element
        {
            return format!("no endpoints for {} ({m})", self.element_service(st));
        }
        if c == CLUSTER_IPS_CHECK {
            return format!(
                "{} is a ClusterIP, but no service port {}/{} is defined on it ({c})",
                st.daddr, self.pkt.proto, st.dport
            );
        }
        format!("`{rule}` in {chain}")
    }
}

fn target_words(target: &ObjName) -> String {
    let words = chain_words(target.as_str());
    if words == target.as_str() {
        words
    } else {
        format!("{target} ({words})")
    }
}

fn outcome(st: St, end: End) -> Outcome {
    let (verdict, reason) = match end {
        End::Accepted(r) => (PacketVerdict::Accept { dnat: st.dnat }, r),
        End::Untouched(r) => (PacketVerdict::Accept { dnat: None }, r),
        End::Reject(r) => (PacketVerdict::Reject, r),
        End::Drop(r) => (PacketVerdict::Drop, r),
        End::Drift(r) => (PacketVerdict::Drift(r.clone()), format!("drift: {r}")),
    };
    let accepted = matches!(verdict, PacketVerdict::Accept { .. });
    let masquerade_reason = if st.masqueraded {
        st.masq_reason
            .clone()
            .unwrap_or_else(|| "the masquerade mark was set".into())
    } else if !accepted {
        "not accepted".into()
    } else if st.mark & MASQUERADE_MARK != 0 && st.delivered == Some("input") {
        format!(
            "requested ({}), but the packet is delivered to this node, where no source NAT happens",
            st.masq_reason.as_deref().unwrap_or("mark set")
        )
    } else {
        st.no_masq_hint
            .clone()
            .unwrap_or_else(|| "no rule requested it".into())
    };
    Outcome {
        verdict,
        probability: st.prob,
        masquerade: st.masqueraded,
        masquerade_reason,
        reason,
        service: st.service,
        delivered: if accepted {
            st.delivered.map(str::to_string)
        } else {
            None
        },
        via: st.via,
        notes: st.notes,
        steps: st.steps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live_rules::fixture;

    fn local() -> BTreeSet<IpAddr> {
        fixture::local_addrs()
    }

    fn pkt(src: &str, dst: &str, proto: Protocol, origin: Origin) -> Packet {
        Packet::new(
            src.parse().expect("src"),
            dst.parse().expect("dst"),
            proto,
            origin,
        )
    }

    fn v4() -> Ruleset {
        let (node, plans) = fixture::v4();
        Ruleset::desired(&node, &plans)
    }

    fn v6() -> Ruleset {
        let (node, plans) = fixture::v6();
        Ruleset::desired(&node, &plans)
    }

    fn eps(list: &[&str]) -> BTreeSet<SocketAddr> {
        list.iter().map(|s| s.parse().expect("ep")).collect()
    }

    #[test]
    fn cluster_ip_two_endpoints_half_each_without_masquerade() {
        let t = v4().trace(
            &pkt(
                "10.180.2.100",
                "172.30.0.41:80",
                Protocol::Tcp,
                Origin::Forwarded,
            ),
            &local(),
        );
        assert_eq!(
            t.summary(),
            Summary::Endpoints {
                endpoints: eps(&["10.180.0.1:80", "10.180.0.2:80"]),
                masquerade: Some(false)
            },
            "{t:#}"
        );
        assert!(t.probabilities().values().all(|p| (p - 0.5).abs() < 1e-12));
        assert_eq!(t.service(), Some("ns1/svc1:p80"));
        let text = t.to_string();
        assert!(
            text.contains("2 endpoints, 50% each: 10.180.0.1:80, 10.180.0.2:80"),
            "{text}"
        );
        assert!(
            text.contains("masquerade: no (source 10.180.2.100 is inside the cluster CIDR)"),
            "{text}"
        );
        assert!(
            text.contains("matched service-ips: 172.30.0.41 . tcp . 80 → goto service-"),
            "{text}"
        );
        // The shared path ends at the numgen fork; each branch holds the rest.
        assert!(t.steps.iter().all(|s| !s.action.starts_with("numgen")));
        assert!(t
            .outcomes
            .iter()
            .all(|o| o.steps[0].action.starts_with("numgen")));
    }

    #[test]
    fn node_to_cluster_ip_is_masqueraded() {
        let t = v4().trace(
            &pkt(
                "192.168.0.2",
                "172.30.0.41:80",
                Protocol::Tcp,
                Origin::Local,
            ),
            &local(),
        );
        assert_eq!(t.masqueraded(), Some(true), "{t}");
        assert!(t.outcomes[0]
            .masquerade_reason
            .contains("outside the cluster CIDR"));
    }

    #[test]
    fn no_endpoints_reject_with_the_service_named() {
        let rs = v4();
        for dst in ["172.30.0.46:80", "192.168.0.2:3006"] {
            let t = rs.trace(
                &pkt("203.0.113.2", dst, Protocol::Tcp, Origin::Forwarded),
                &local(),
            );
            assert_eq!(t.summary(), Summary::Reject, "{t:#}");
            assert!(
                t.to_string()
                    .contains("REJECT: no endpoints for ns6/svc6:p80 (no-endpoint-"),
                "{t}"
            );
        }
    }

    #[test]
    fn firewall_drops_sources_outside_the_ranges() {
        let rs = v4();
        let blocked = rs.trace(
            &pkt(
                "203.0.113.130",
                "5.6.7.8:80",
                Protocol::Tcp,
                Origin::Forwarded,
            ),
            &local(),
        );
        assert_eq!(blocked.summary(), Summary::Drop, "{blocked:#}");
        assert!(blocked.to_string().contains(
            "DROP: source 203.0.113.130 not in loadBalancerSourceRanges of ns5/svc5:p80"
        ));
        let allowed = rs.trace(
            &pkt(
                "203.0.113.2",
                "5.6.7.8:80",
                Protocol::Tcp,
                Origin::Forwarded,
            ),
            &local(),
        );
        assert_eq!(
            allowed.summary(),
            Summary::Endpoints {
                endpoints: eps(&["10.180.0.3:80"]),
                masquerade: Some(true)
            },
            "{allowed:#}"
        );
        assert!(allowed
            .notes()
            .iter()
            .any(|n| n.contains("session affinity")));
        // The node is inside a range, so the VIP itself is an allowed source too.
        let vip = rs.trace(
            &pkt("5.6.7.8", "5.6.7.8:80", Protocol::Tcp, Origin::Local),
            &local(),
        );
        assert!(
            matches!(vip.summary(), Summary::Endpoints { .. }),
            "{vip:#}"
        );
    }

    #[test]
    fn etp_local_external_uses_local_endpoints_and_keeps_the_source() {
        let rs = v4();
        let ext = rs.trace(
            &pkt(
                "203.0.113.2",
                "1.2.3.4:80",
                Protocol::Tcp,
                Origin::Forwarded,
            ),
            &local(),
        );
        assert_eq!(
            ext.summary(),
            Summary::Endpoints {
                endpoints: eps(&["10.180.2.1:80"]),
                masquerade: Some(false)
            },
            "{ext:#}"
        );
        assert!(
            ext.to_string()
                .contains("externalTrafficPolicy=Local keeps"),
            "{ext}"
        );
        let pod = rs.trace(
            &pkt(
                "10.180.2.100",
                "192.168.0.2:3001",
                Protocol::Tcp,
                Origin::Forwarded,
            ),
            &local(),
        );
        assert_eq!(
            pod.summary(),
            Summary::Endpoints {
                endpoints: eps(&["10.180.0.2:80", "10.180.2.1:80"]),
                masquerade: Some(false)
            },
            "{pod:#}"
        );
        let node = rs.trace(
            &pkt(
                "192.168.0.2",
                "192.168.0.2:3001",
                Protocol::Tcp,
                Origin::Local,
            ),
            &local(),
        );
        assert_eq!(node.masqueraded(), Some(true), "{node:#}");
    }

    #[test]
    fn itp_local_without_local_endpoint_drops() {
        let t = v4().trace(
            &pkt(
                "10.180.2.100",
                "172.30.0.47:80",
                Protocol::Tcp,
                Origin::Forwarded,
            ),
            &local(),
        );
        assert_eq!(t.summary(), Summary::Drop, "{t:#}");
        assert!(t.to_string().contains(
            "DROP: ns7/svc7:p80: internalTrafficPolicy is Local and no endpoint runs on this node"
        ));
    }

    #[test]
    fn invalid_ports_reject_unallocated_drop_others_untouched() {
        let rs = v4();
        let t = |dst: &str, proto| {
            rs.trace(
                &pkt("10.180.2.100", dst, proto, Origin::Forwarded),
                &local(),
            )
            .summary()
        };
        assert_eq!(t("172.30.0.41:443", Protocol::Tcp), Summary::Reject);
        assert_eq!(t("172.30.0.41:80", Protocol::Udp), Summary::Reject);
        assert_eq!(t("172.30.0.99:80", Protocol::Tcp), Summary::Drop);
        assert_eq!(t("192.168.1.2:3001", Protocol::Tcp), Summary::Untouched);
        assert_eq!(t("8.8.8.8:53", Protocol::Udp), Summary::Untouched);
        // The other family's table never sees the packet.
        assert_eq!(t("[fd00::1]:53", Protocol::Udp), Summary::Untouched);
    }

    #[test]
    fn hairpin_is_masqueraded_only_on_its_own_branch() {
        let t = v4().trace(
            &pkt(
                "10.180.0.1",
                "172.30.0.41:80",
                Protocol::Tcp,
                Origin::Forwarded,
            ),
            &local(),
        );
        assert_eq!(t.masqueraded(), None, "{t}");
        for o in &t.outcomes {
            let own = o.verdict
                == PacketVerdict::Accept {
                    dnat: Some("10.180.0.1:80".parse().expect("ep")),
                };
            assert_eq!(o.masquerade, own, "{t}");
        }
        assert!(t
            .to_string()
            .contains("masquerade to 10.180.0.1:80: yes (hairpin"));
    }

    #[test]
    fn ipv6_nodeports_on_every_local_address_but_loopback() {
        let rs = v6();
        let ext = rs.trace(
            &pkt(
                "2001:db8:ff::2",
                "[2001:db8:1::2]:3001",
                Protocol::Tcp,
                Origin::Forwarded,
            ),
            &local(),
        );
        assert_eq!(
            ext.summary(),
            Summary::Endpoints {
                endpoints: eps(&["[fd00:10:180::1]:80"]),
                masquerade: Some(true)
            },
            "{ext:#}"
        );
        let lo = rs.trace(
            &pkt("::1", "[::1]:3001", Protocol::Tcp, Origin::Local),
            &local(),
        );
        assert_eq!(lo.summary(), Summary::Untouched, "{lo:#}");
        // --masquerade-all: even pods are masqueraded to the ClusterIP.
        let pod = rs.trace(
            &pkt(
                "fd00:10::5",
                "[fd00:10:96::41]:80",
                Protocol::Tcp,
                Origin::Forwarded,
            ),
            &local(),
        );
        assert_eq!(pod.masqueraded(), Some(true), "{pod:#}");
        assert!(pod.to_string().contains("--masquerade-all"), "{pod}");
        let blocked = rs.trace(
            &pkt(
                "2001:db8:ff::82",
                "[2001:db8:aa::4]:80",
                Protocol::Tcp,
                Origin::Forwarded,
            ),
            &local(),
        );
        assert_eq!(blocked.summary(), Summary::Drop, "{blocked:#}");
    }

    #[test]
    fn missing_chains_and_loops_are_drift_not_panics() {
        let mut rs = v4();
        let svc = rs
            .chains
            .keys()
            .find(|c| c.as_str().starts_with("service-") && c.as_str().contains("ns1/svc1"))
            .cloned()
            .expect("svc1 chain");
        rs.chains.remove(&svc);
        let p = pkt(
            "10.180.2.100",
            "172.30.0.41:80",
            Protocol::Tcp,
            Origin::Forwarded,
        );
        let t = rs.trace(&p, &local());
        assert!(
            matches!(&t.summary(), Summary::Drift(w) if w[0] == format!("jump to missing chain {svc}")),
            "{t}"
        );
        // A chain that jumps to itself.
        let looping = ObjName::fixed("services");
        rs.chains.insert(
            looping.clone(),
            vec![Rule::new(vec![], vec![Stmt::Jump(looping)])],
        );
        let t = rs.trace(&p, &local());
        assert!(matches!(t.summary(), Summary::Drift(_)), "{t}");
        let d = diff(&v4().trace(&p, &local()), &t).expect("differs");
        assert!(
            d.to_string().contains("intended: ACCEPT → 10.180.0.1:80"),
            "{d}"
        );
    }

    #[test]
    fn every_packet_evaluates_totally_with_probabilities_adding_up() {
        // A small exhaustive property check over the fixture's addresses.
        let addrs4 = [
            "10.180.2.100",
            "10.180.0.1",
            "192.168.0.2",
            "192.168.1.2",
            "203.0.113.2",
            "203.0.113.130",
            "172.30.0.41",
            "172.30.0.42",
            "172.30.0.46",
            "172.30.0.47",
            "172.30.0.99",
            "1.2.3.4",
            "5.6.7.8",
            "192.168.99.22",
            "127.0.0.1",
        ];
        let addrs6 = [
            "fd00:10::5",
            "2001:db8::1",
            "2001:db8:1::2",
            "2001:db8:ff::2",
            "2001:db8:ff::82",
            "fd00:10:96::41",
            "fd00:10:96::46",
            "fd00:10:96::99",
            "2001:db8:aa::4",
            "::1",
        ];
        let ports = [80, 53, 443, 3001, 3005, 3006, 0, 65535];
        let mut n = 0;
        for (rs, addrs) in [(v4(), &addrs4[..]), (v6(), &addrs6[..])] {
            for src in addrs {
                for dst in addrs {
                    for port in ports {
                        for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
                            for origin in [Origin::Forwarded, Origin::Local] {
                                let p = Packet {
                                    src: src.parse().expect("ip"),
                                    dst: dst.parse().expect("ip"),
                                    proto,
                                    dport: port,
                                    origin,
                                };
                                let t = rs.trace(&p, &local());
                                let total: f64 = t.outcomes.iter().map(|o| o.probability).sum();
                                assert!((total - 1.0).abs() < 1e-9, "{t}");
                                assert!(!matches!(t.summary(), Summary::Drift(_)), "{t}");
                                let _ = (t.to_string(), t.to_json());
                                n += 1;
                            }
                        }
                    }
                }
            }
        }
        assert!(n > 10_000);
    }

    #[test]
    fn json_output_has_the_summary_and_every_outcome() {
        let t = v4().trace(
            &pkt(
                "10.180.2.100",
                "172.30.0.41:80",
                Protocol::Tcp,
                Origin::Forwarded,
            ),
            &local(),
        );
        let j = t.to_json();
        assert_eq!(j["summary"]["kind"], "endpoints");
        assert_eq!(j["service"], "ns1/svc1:p80");
        assert_eq!(j["outcomes"].as_array().map(Vec::len), Some(2));
        assert_eq!(j["outcomes"][0]["probability"], 0.5);
        assert_eq!(j["packet"]["protocol"], "tcp");
    }

    #[test]
    fn names_read_back_into_services_and_endpoints() {
        assert_eq!(
            service_of("endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80").as_deref(),
            Some("ns1/svc1:p80")
        );
        assert_eq!(
            endpoint_of("endpoint-X-ns/s/tcp/p__fd80.abcd.12..a1b2.c3d4.e5f6/80"),
            "[fd80:abcd:12::a1b2:c3d4:e5f6]:80".parse().ok()
        );
        assert_eq!(service_of("services"), None);
        assert_eq!(
            Packet::parse_target("[fd00::1]:53/udp"),
            Ok(("[fd00::1]:53".parse().expect("sa"), Protocol::Udp))
        );
        assert!(Packet::parse_target("1.2.3.4:80/icmp").is_err());
    }

    #[test]
    fn service_entries_list_every_way_into_a_service() {
        let entries = v4().service_entries();
        let svc2: BTreeSet<String> = entries["ns2/svc2:p80"]
            .iter()
            .map(|(m, k)| format!("{m} {k}"))
            .collect();
        let want: BTreeSet<String> = [
            "service-ips 172.30.0.42 . tcp . 80",
            "service-ips 192.168.99.22 . tcp . 80",
            "service-ips 1.2.3.4 . tcp . 80",
            "service-nodeports tcp . 3001",
        ]
        .into_iter()
        .map(str::to_string)
        .collect();
        assert_eq!(svc2, want);
        assert_eq!(entries["ns6/svc6:p80"].len(), 2, "{entries:?}");
        assert!(entries["ns5/svc5:p80"]
            .iter()
            .any(|(m, _)| *m == MapId::FirewallIps));
    }

    #[test]
    fn desired_differences_are_empty_against_itself_and_name_a_flushed_chain() {
        let a = v4();
        assert!(a.differences(&a).is_empty());
        let mut b = a.clone();
        let name = b
            .chains
            .keys()
            .find(|c| c.as_str().starts_with("service-"))
            .cloned()
            .expect("chain");
        b.chains.insert(name.clone(), vec![]);
        let d = a.differences(&b);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(
            d[0].starts_with(&format!("chain {name}: rules differ")),
            "{d:?}"
        );
    }
}
