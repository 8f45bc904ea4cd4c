//! Reads kproxy's table back from the kernel — `nft -j list table <family> kproxy` — into
//! the same typed [`Rule`]s kproxy writes, so the evaluator in [`crate::eval`] can run on
//! what the kernel actually holds and compare it with what kproxy intends.
//!
//! Only the rule shapes kproxy writes are recognised (see [`parse_rule`] for the list);
//! anything else is an [`UnrecognisedRule`] carrying the rule's JSON, so a caller reports
//! drift instead of guessing what a foreign rule does. Elements and set names come from
//! [`LiveState`]; element comments, affinity timeouts, base-chain hooks and rules are
//! read here.

use crate::eval::{canonical_rule, ForeignRule, Ruleset};
use crate::live::{parse_key, parse_port, parse_proto, LiveState};
use crate::names::ObjName;
use crate::objects::{Hook, MapId, TABLE};
use crate::rule::{family_kw, AddrSet, Match, Rule, Stmt, VmapKey};
use ipnet::{IpNet, Ipv4Subnets, Ipv6Subnets};
use kproxy_backend_api::{IpFamily, Protocol};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// A rule kproxy never writes, as `nft -j` printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnrecognisedRule(pub String);

impl fmt::Display for UnrecognisedRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a rule kproxy never writes: {}", self.0)
    }
}

impl std::error::Error for UnrecognisedRule {}

/// Why a live table could not be read into a [`Ruleset`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LiveError {
    #[error("cannot parse `nft -j list table` output: {0}")]
    Json(String),
    #[error("no `{TABLE}` table of family ip or ip6 in the listing")]
    NoTable,
    #[error("cannot read the table's sets and maps: {0}")]
    Elements(String),
    #[error("chain {chain}: {rule}")]
    UnrecognisedRule {
        chain: String,
        rule: UnrecognisedRule,
    },
    #[error("chain {chain} is hooked in a way kproxy never uses: {json}")]
    UnrecognisedChain { chain: String, json: String },
}

impl Ruleset {
    /// Reads `nft -j list table <family> kproxy` output. Fails on anything kproxy never
    /// writes, naming it: a rule of another shape, a base chain on another hook.
    pub fn live(json: &str) -> Result<Ruleset, LiveError> {
        let rs = Ruleset::live_lenient(json)?;
        if let Some((chain, rules)) = rs.foreign.iter().find(|(_, r)| !r.is_empty()) {
            let json = rules.first().map(|r| r.json.clone()).unwrap_or_default();
            return Err(LiveError::UnrecognisedRule {
                chain: chain.to_string(),
                rule: UnrecognisedRule(json),
            });
        }
        Ok(rs)
    }

    /// Like [`Ruleset::live`], but keeps unrecognised rules in [`Ruleset::foreign`] at
    /// their position, so the rest of the table can still be traced (a packet that
    /// reaches such a rule ends in drift).
    pub fn live_lenient(json: &str) -> Result<Ruleset, LiveError> {
        let doc: Value = serde_json::from_str(json).map_err(|e| LiveError::Json(e.to_string()))?;
        let items = doc
            .get("nftables")
            .and_then(Value::as_array)
            .ok_or_else(|| LiveError::Json("no `nftables` array".into()))?;
        let family = items
            .iter()
            .filter_map(|i| i.get("table"))
            .filter(|t| t.get("name").and_then(Value::as_str) == Some(TABLE))
            .find_map(|t| match t.get("family").and_then(Value::as_str) {
                Some("ip") => Some(IpFamily::V4),
                Some("ip6") => Some(IpFamily::V6),
                _ => None,
            })
            .ok_or(LiveError::NoTable)?;
        let ours = |o: &Value| {
            o.get("table")
                .and_then(Value::as_str)
                .is_none_or(|t| t == TABLE)
                && o.get("family")
                    .and_then(Value::as_str)
                    .is_none_or(|f| f == family_kw(family))
        };
        let live =
            LiveState::from_nft_json(json).map_err(|e| LiveError::Elements(e.to_string()))?;
        let mut rs = Ruleset::empty(family);
        for m in &live.maps {
            rs.elements.insert(*m, BTreeMap::new());
        }
        for (m, elems) in live.elements {
            rs.elements.insert(m, elems);
        }
        for item in items {
            if let Some(c) = item.get("chain").filter(|c| ours(c)) {
                let Some(name) = c.get("name").and_then(Value::as_str) else {
                    continue;
                };
                let name = ObjName::from_live(name);
                if let Some(hook) = parse_hook(c).map_err(|()| LiveError::UnrecognisedChain {
                    chain: name.to_string(),
                    json: c.to_string(),
                })? {
                    rs.base_chains.insert(name.clone(), hook);
                }
                rs.chains.entry(name).or_default();
            } else if let Some(r) = item.get("rule").filter(|r| ours(r)) {
                let Some(chain) = r.get("chain").and_then(Value::as_str) else {
                    continue;
                };
                let chain = ObjName::from_live(chain);
                let rules = rs.chains.entry(chain.clone()).or_default();
                match parse_rule(family, r) {
                    Ok(rule) => rules.push(rule),
                    Err(UnrecognisedRule(json)) => {
                        let position = rules.len();
                        rs.foreign
                            .entry(chain)
                            .or_default()
                            .push(ForeignRule { position, json });
                    }
                }
            } else if let Some(s) = item
                .get("set")
                .or_else(|| item.get("map"))
                .filter(|s| ours(s))
            {
                let Some(name) = s.get("name").and_then(Value::as_str) else {
                    continue;
                };
                match MapId::from_name(name) {
                    Some(m) => read_comments(&mut rs, m, s),
                    None => {
                        let timeout = s
                            .get("timeout")
                            .and_then(Value::as_u64)
                            .and_then(|t| u32::try_from(t).ok())
                            .unwrap_or(0);
                        rs.affinity_sets.insert(ObjName::from_live(name), timeout);
                    }
                }
            }
        }
        Ok(rs)
    }
}

/// A base chain's hook (`Ok(None)` for a regular chain); `Err` for a type, hook or
/// policy kproxy never uses.
fn parse_hook(c: &Value) -> Result<Option<Hook>, ()> {
    let Some(hook) = c.get("hook").and_then(Value::as_str) else {
        return Ok(None);
    };
    let kind = match c.get("type").and_then(Value::as_str) {
        Some("filter") => "filter",
        Some("nat") => "nat",
        _ => return Err(()),
    };
    let hook = match hook {
        "prerouting" => "prerouting",
        "input" => "input",
        "forward" => "forward",
        "output" => "output",
        "postrouting" => "postrouting",
        _ => return Err(()),
    };
    let priority = c
        .get("prio")
        .and_then(Value::as_i64)
        .and_then(|p| i32::try_from(p).ok())
        .ok_or(())?;
    if c.get("policy")
        .and_then(Value::as_str)
        .is_some_and(|p| p != "accept")
    {
        return Err(());
    }
    Ok(Some(Hook {
        kind,
        hook,
        priority,
    }))
}

/// Element comments: `{"elem": {"val": KEY, "comment": "…"}}`, bare or as a map key.
fn read_comments(rs: &mut Ruleset, map: MapId, set: &Value) {
    let Some(list) = set.get("elem").and_then(Value::as_array) else {
        return;
    };
    for e in list {
        let keyed = match e {
            Value::Array(pair) => pair.first().unwrap_or(e),
            other => other,
        };
        let Some(inner) = keyed.get("elem") else {
            continue;
        };
        let (Some(val), Some(comment)) = (
            inner.get("val"),
            inner.get("comment").and_then(Value::as_str),
        ) else {
            continue;
        };
        if let Some(key) = parse_key(val) {
            rs.comments.insert((map, key), comment.to_string());
        }
    }
}

/// Parses one rule object of `nft -j` output (the value under `"rule"`, with `expr` and
/// an optional `comment`) into a typed rule, in canonical form.
///
/// Recognised, and nothing else (each exactly as kproxy writes it):
/// - matches: `ip|ip6 saddr|daddr [!=] ADDR | PREFIX | { anonymous set } | @set`,
///   `fib saddr|daddr type local`, `ct state new`, `mark and M == 0`, and `ip daddr !=
///   127.0.0.0/8` / `ip6 daddr != ::1`;
/// - statements: `jump`, `goto`, `return`, `drop`, `reject` (ICMP port unreachable),
///   `mark set mark or|xor M`, `masquerade fully-random`, `meta l4proto P dnat to
///   ADDR:PORT` (both families), `numgen random mod N vmap { 0 : goto …, … }`, `ip daddr
///   . meta l4proto . th dport vmap @map`, `meta l4proto . th dport vmap @map`,
///   `update @set { ip saddr }`;
/// - the rule's comment.
pub fn parse_rule(family: IpFamily, rule: &Value) -> Result<Rule, UnrecognisedRule> {
    let bad = || UnrecognisedRule(rule.to_string());
    let exprs = rule.get("expr").and_then(Value::as_array).ok_or_else(bad)?;
    let mut out = Rule {
        comment: rule
            .get("comment")
            .and_then(Value::as_str)
            .map(str::to_string),
        ..Rule::default()
    };
    // `meta l4proto P` waiting for the `dnat` it belongs to.
    let mut l4proto: Option<Protocol> = None;
    for e in exprs {
        if let Some(proto) = l4proto.take() {
            let d = e.get("dnat").ok_or_else(bad)?;
            out.stmts
                .push(parse_dnat(family, proto, d).ok_or_else(bad)?);
            continue;
        }
        if let Some(m) = e.get("match") {
            // kproxy puts every condition before every statement.
            if !out.stmts.is_empty() {
                return Err(bad());
            }
            match parse_match(family, m).ok_or_else(bad)? {
                Cond::Match(m) => out.matches.push(m),
                Cond::L4proto(p) => l4proto = Some(p),
            }
            continue;
        }
        out.stmts.push(parse_stmt(family, e).ok_or_else(bad)?);
    }
    if l4proto.is_some() || out.stmts.is_empty() {
        return Err(bad());
    }
    Ok(canonical_rule(family, out))
}

enum Cond {
    Match(Match),
    L4proto(Protocol),
}

fn is_payload(v: &Value, family: IpFamily, field: &str) -> bool {
    v.get("payload").is_some_and(|p| {
        p.get("protocol").and_then(Value::as_str) == Some(family_kw(family))
            && p.get("field").and_then(Value::as_str) == Some(field)
    })
}

fn is_th_dport(v: &Value) -> bool {
    v.get("payload").is_some_and(|p| {
        p.get("protocol").and_then(Value::as_str) == Some("th")
            && p.get("field").and_then(Value::as_str) == Some("dport")
    })
}

fn is_meta(v: &Value, key: &str) -> bool {
    v.get("meta")
        .and_then(|m| m.get("key"))
        .and_then(Value::as_str)
        == Some(key)
}

/// `"x"` or `["x"]`.
fn is_word(v: &Value, word: &str) -> bool {
    match v {
        Value::String(s) => s == word,
        Value::Array(a) => matches!(a.as_slice(), [Value::String(s)] if s == word),
        _ => false,
    }
}

fn parse_match(family: IpFamily, m: &Value) -> Option<Cond> {
    let op = m.get("op")?.as_str()?;
    let left = m.get("left")?;
    let right = m.get("right")?;
    let positive = matches!(op, "==" | "in");
    if left
        .get("ct")
        .and_then(|c| c.get("key"))
        .and_then(Value::as_str)
        == Some("state")
    {
        return (positive && is_word(right, "new")).then_some(Cond::Match(Match::CtStateNew));
    }
    for (field, saddr) in [("saddr", true), ("daddr", false)] {
        if is_payload(left, family, field) {
            let negate = match op {
                "!=" => true,
                _ if positive => false,
                _ => return None,
            };
            let set = parse_addr_set(family, right)?;
            return Some(Cond::Match(if saddr {
                Match::Saddr { negate, set }
            } else {
                Match::Daddr { negate, set }
            }));
        }
    }
    if let Some(fib) = left.get("fib") {
        if !positive
            || !is_word(right, "local")
            || fib.get("result").and_then(Value::as_str) != Some("type")
        {
            return None;
        }
        let flags = fib.get("flags")?;
        return if is_word(flags, "saddr") {
            Some(Cond::Match(Match::FibSaddrLocal))
        } else if is_word(flags, "daddr") {
            Some(Cond::Match(Match::FibDaddrLocal))
        } else {
            None
        };
    }
    if let Some(and) = left.get("&").and_then(Value::as_array) {
        return match and.as_slice() {
            [mark, bits] if is_meta(mark, "mark") && op == "==" && right.as_u64() == Some(0) => {
                let bits = u32::try_from(bits.as_u64()?).ok()?;
                Some(Cond::Match(Match::MarkUnset(bits)))
            }
            _ => None,
        };
    }
    if is_meta(left, "l4proto") && op == "==" {
        return parse_proto(right).map(Cond::L4proto);
    }
    None
}

fn parse_ip(family: IpFamily, v: &Value) -> Option<IpAddr> {
    let ip: IpAddr = v.as_str()?.parse().ok()?;
    (IpFamily::of(&ip) == family).then_some(ip)
}

fn parse_prefix(family: IpFamily, v: &Value) -> Option<IpNet> {
    let p = v.get("prefix")?;
    let addr = parse_ip(family, p.get("addr")?)?;
    let len = u8::try_from(p.get("len")?.as_u64()?).ok()?;
    IpNet::new(addr, len).ok()
}

/// A range `[a, b]` of an interval set, as the prefixes covering exactly it.
fn parse_range(family: IpFamily, v: &Value) -> Option<Vec<IpNet>> {
    match v.get("range")?.as_array()?.as_slice() {
        [a, b] => match (parse_ip(family, a)?, parse_ip(family, b)?) {
            (IpAddr::V4(a), IpAddr::V4(b)) if a <= b => {
                Some(Ipv4Subnets::new(a, b, 0).map(IpNet::V4).collect())
            }
            (IpAddr::V6(a), IpAddr::V6(b)) if a <= b => {
                Some(Ipv6Subnets::new(a, b, 0).map(IpNet::V6).collect())
            }
            _ => None,
        },
        _ => None,
    }
}

fn parse_addr_set(family: IpFamily, v: &Value) -> Option<AddrSet> {
    if let Some(s) = v.as_str() {
        if let Some(name) = s.strip_prefix('@') {
            return Some(AddrSet::Named(ObjName::from_live(name)));
        }
        return parse_ip(family, v).map(AddrSet::Addr);
    }
    if let Some(p) = parse_prefix(family, v) {
        return Some(AddrSet::Prefixes(vec![p]));
    }
    let items = v.get("set")?.as_array()?;
    let mut nets = Vec::with_capacity(items.len());
    for item in items {
        if let Some(ip) = parse_ip(family, item) {
            nets.push(IpNet::from(ip));
        } else if let Some(p) = parse_prefix(family, item) {
            nets.push(p);
        } else {
            nets.extend(parse_range(family, item)?);
        }
    }
    (!nets.is_empty()).then_some(AddrSet::Prefixes(nets))
}

fn target(v: &Value) -> Option<ObjName> {
    Some(ObjName::from_live(v.get("target")?.as_str()?))
}

fn set_name(v: &Value) -> Option<ObjName> {
    Some(ObjName::from_live(v.as_str()?.strip_prefix('@')?))
}

fn parse_dnat(family: IpFamily, protocol: Protocol, d: &Value) -> Option<Stmt> {
    let obj = d.as_object()?;
    if obj
        .keys()
        .any(|k| !matches!(k.as_str(), "addr" | "port" | "family"))
    {
        return None;
    }
    if let Some(f) = obj.get("family") {
        if f.as_str() != Some(family_kw(family)) {
            return None;
        }
    }
    let ip = parse_ip(family, obj.get("addr")?)?;
    let port = parse_port(obj.get("port")?)?;
    Some(Stmt::Dnat {
        protocol,
        to: SocketAddr::new(ip, port),
    })
}

fn parse_stmt(family: IpFamily, e: &Value) -> Option<Stmt> {
    let obj = e.as_object()?;
    let (kind, v) = match obj.iter().collect::<Vec<_>>().as_slice() {
        [(k, v)] => (k.as_str(), *v),
        _ => return None,
    };
    match kind {
        "jump" => target(v).map(Stmt::Jump),
        "goto" => target(v).map(Stmt::Goto),
        "drop" if v.is_null() => Some(Stmt::Drop),
        "return" if v.is_null() => Some(Stmt::Return),
        "reject" => {
            let plain = v.is_null()
                || v.as_object().is_some_and(|r| {
                    let ty = r.get("type").and_then(Value::as_str);
                    let expr = r.get("expr").and_then(Value::as_str);
                    r.keys().all(|k| k == "type" || k == "expr")
                        && matches!(ty, None | Some("icmp" | "icmpv6" | "icmpx"))
                        && matches!(expr, None | Some("port-unreachable"))
                });
            plain.then_some(Stmt::Reject)
        }
        "mangle" => {
            if !is_meta(v.get("key")?, "mark") {
                return None;
            }
            let value = v.get("value")?.as_object()?;
            let (op, args) = match value.iter().collect::<Vec<_>>().as_slice() {
                [(op, args)] => (op.as_str(), args.as_array()?),
                _ => return None,
            };
            let bits = match args.as_slice() {
                [mark, bits] if is_meta(mark, "mark") => u32::try_from(bits.as_u64()?).ok()?,
                _ => return None,
            };
            match op {
                "|" => Some(Stmt::MarkOr(bits)),
                "^" => Some(Stmt::MarkXor(bits)),
                _ => None,
            }
        }
        "masquerade" => {
            let r = v.as_object()?;
            (r.len() == 1 && r.get("flags").is_some_and(|f| is_word(f, "fully-random")))
                .then_some(Stmt::Masquerade)
        }
        "vmap" => parse_vmap(family, v),
        "set" => {
            let ok = v.get("op").and_then(Value::as_str) == Some("update")
                && is_payload(v.get("elem")?, family, "saddr");
            if !ok {
                return None;
            }
            set_name(v.get("set")?).map(Stmt::UpdateSaddr)
        }
        _ => None,
    }
}

fn parse_vmap(family: IpFamily, v: &Value) -> Option<Stmt> {
    let key = v.get("key")?;
    let data = v.get("data")?;
    if let Some(ng) = key.get("numgen") {
        let random = ng.get("mode").and_then(Value::as_str) == Some("random")
            && ng.get("offset").and_then(Value::as_u64).unwrap_or(0) == 0;
        let n = usize::try_from(ng.get("mod")?.as_u64()?).ok()?;
        let items = data.get("set")?.as_array()?;
        if !random || items.len() != n {
            return None;
        }
        let mut chains = Vec::with_capacity(n);
        for (i, item) in items.iter().enumerate() {
            match item.as_array()?.as_slice() {
                [idx, verdict] if idx.as_u64() == u64::try_from(i).ok() => {
                    chains.push(target(verdict.get("goto")?)?);
                }
                _ => return None,
            }
        }
        return Some(Stmt::NumgenVmap(chains));
    }
    let parts = key.get("concat")?.as_array()?;
    let key = match parts.as_slice() {
        [d, p, port]
            if is_payload(d, family, "daddr") && is_meta(p, "l4proto") && is_th_dport(port) =>
        {
            VmapKey::DaddrProtoPort
        }
        [p, port] if is_meta(p, "l4proto") && is_th_dport(port) => VmapKey::ProtoPort,
        _ => return None,
    };
    Some(Stmt::Vmap {
        key,
        map: set_name(data)?,
    })
}

#[cfg(test)]
pub(crate) mod fixture {
    //! Hand-built plans covering every rule shape kproxy writes, shared by the evaluator's
    //! and the live parser's tests (the captured kernel listings in `testdata/` are these
    //! plans as programmed by the real backend).
    use kproxy_backend_api::{
        CategorizedEndpoints, Endpoint, IpFamily, NodeContext, NodePortAddresses, Protocol,
        ServiceName, ServicePlans, ServicePort, ServicePortName, ServicePortPlan, TrafficPolicy,
    };
    use std::collections::BTreeSet;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("fixture address")
    }

    fn ep(s: &str, port: u16, local: bool) -> Endpoint {
        Endpoint {
            ip: ip(s),
            port,
            node_name: Some(if local { "node-a" } else { "node-b" }.into()),
            zone: None,
            is_local: local,
            ready: true,
            serving: true,
            terminating: false,
            zone_hints: vec![],
            node_hints: vec![],
        }
    }

    fn port(ns: &str, svc: &str, name: &str, proto: Protocol, cip: &str, p: u16) -> ServicePort {
        ServicePort {
            name: ServicePortName::new(ServiceName::new(ns, svc), name, proto),
            family: IpFamily::of(&ip(cip)),
            cluster_ip: ip(cip),
            port: p,
            node_port: None,
            external_ips: vec![],
            load_balancer_ips: vec![],
            source_ranges: vec![],
            session_affinity_seconds: None,
            external_policy: TrafficPolicy::Cluster,
            internal_policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
        }
    }

    /// Categorises like the model does for Ready endpoints.
    fn plan(port: ServicePort, endpoints: Vec<Endpoint>) -> ServicePortPlan {
        let cluster = if port.uses_cluster_endpoints() {
            endpoints.clone()
        } else {
            vec![]
        };
        let local: Vec<Endpoint> = if port.uses_local_endpoints() {
            endpoints.iter().filter(|e| e.is_local).cloned().collect()
        } else {
            vec![]
        };
        let mut all_reachable = cluster.clone();
        all_reachable.extend(local.iter().filter(|e| !cluster.contains(e)).cloned());
        ServicePortPlan {
            categorized: CategorizedEndpoints {
                cluster,
                local,
                all_reachable,
                has_any_endpoints: !endpoints.is_empty(),
                ..Default::default()
            },
            endpoints,
            port,
        }
    }

    fn add(plans: &mut ServicePlans, p: ServicePortPlan) {
        plans
            .entry(p.port.name.service.clone())
            .or_default()
            .push(p);
    }

    /// IPv4: node 192.168.0.2 (the only NodePort address), pod CIDR 10.0.0.0/8.
    pub fn v4() -> (NodeContext, ServicePlans) {
        let mut node = NodeContext::empty(IpFamily::V4, "node-a");
        node.node_ips = vec![ip("192.168.0.2")];
        node.nodeport_addresses = NodePortAddresses::Ips(vec![ip("192.168.0.2")]);
        node.cluster_cidrs = vec!["10.0.0.0/8".parse().expect("cidr")];
        node.service_cidrs = vec!["172.30.0.0/16".parse().expect("cidr")];
        let mut plans = ServicePlans::new();
        let tcp = Protocol::Tcp;
        // ClusterIP, two remote endpoints.
        add(
            &mut plans,
            plan(
                port("ns1", "svc1", "p80", tcp, "172.30.0.41", 80),
                vec![ep("10.180.0.1", 80, false), ep("10.180.0.2", 80, false)],
            ),
        );
        // LB + externalIP + NodePort, eTP=Local, one local and one remote endpoint.
        let mut p = port("ns2", "svc2", "p80", tcp, "172.30.0.42", 80);
        p.external_ips = vec![ip("192.168.99.22")];
        p.load_balancer_ips = vec![ip("1.2.3.4")];
        p.node_port = Some(3001);
        p.external_policy = TrafficPolicy::Local;
        add(
            &mut plans,
            plan(
                p,
                vec![ep("10.180.0.2", 80, false), ep("10.180.2.1", 80, true)],
            ),
        );
        // eTP=Local whose only endpoint is remote.
        let mut p = port("ns3", "svc3", "p80", tcp, "172.30.0.43", 80);
        p.external_ips = vec![ip("192.168.99.33")];
        p.node_port = Some(3003);
        p.external_policy = TrafficPolicy::Local;
        add(&mut plans, plan(p, vec![ep("10.180.0.3", 80, false)]));
        // LB with source ranges (one holds the node, so the VIP is allowed too) and
        // ClientIP affinity.
        let mut p = port("ns5", "svc5", "p80", tcp, "172.30.0.45", 80);
        p.load_balancer_ips = vec![ip("5.6.7.8")];
        p.source_ranges = vec![
            "203.0.113.0/25".parse().expect("cidr"),
            "192.168.0.0/24".parse().expect("cidr"),
        ];
        p.session_affinity_seconds = Some(10800);
        p.node_port = Some(3005);
        add(&mut plans, plan(p, vec![ep("10.180.0.3", 80, false)]));
        // No endpoints at all.
        let mut p = port("ns6", "svc6", "p80", tcp, "172.30.0.46", 80);
        p.node_port = Some(3006);
        add(&mut plans, plan(p, vec![]));
        // iTP=Local without a local endpoint.
        let mut p = port("ns7", "svc7", "p80", tcp, "172.30.0.47", 80);
        p.internal_policy = TrafficPolicy::Local;
        add(&mut plans, plan(p, vec![ep("10.180.0.7", 80, false)]));
        // UDP and SCTP.
        add(
            &mut plans,
            plan(
                port("ns8", "dns", "dns", Protocol::Udp, "172.30.0.48", 53),
                vec![ep("10.180.2.8", 5353, true)],
            ),
        );
        add(
            &mut plans,
            plan(
                port("ns8", "dns", "sctp", Protocol::Sctp, "172.30.0.48", 53),
                vec![ep("10.180.0.8", 53, false)],
            ),
        );
        (node, plans)
    }

    /// IPv6: NodePorts on every local address, --masquerade-all.
    pub fn v6() -> (NodeContext, ServicePlans) {
        let mut node = NodeContext::empty(IpFamily::V6, "node-a");
        node.node_ips = vec![ip("2001:db8::1")];
        node.nodeport_addresses = NodePortAddresses::All;
        node.cluster_cidrs = vec!["fd00:10::/64".parse().expect("cidr")];
        node.service_cidrs = vec!["fd00:10:96::/112".parse().expect("cidr")];
        node.masquerade_all = true;
        let mut plans = ServicePlans::new();
        let mut p = port("ns1", "web", "p80", Protocol::Tcp, "fd00:10:96::41", 80);
        p.load_balancer_ips = vec![ip("2001:db8:aa::4")];
        p.source_ranges = vec!["2001:db8:ff::/121".parse().expect("cidr")];
        p.node_port = Some(3001);
        p.session_affinity_seconds = Some(600);
        add(&mut plans, plan(p, vec![ep("fd00:10:180::1", 80, false)]));
        let mut p = port("ns6", "empty", "p80", Protocol::Tcp, "fd00:10:96::46", 80);
        p.node_port = Some(3006);
        add(&mut plans, plan(p, vec![]));
        (node, plans)
    }

    /// The node's addresses in these fixtures.
    pub fn local_addrs() -> BTreeSet<IpAddr> {
        [
            "192.168.0.2",
            "192.168.1.2",
            "127.0.0.1",
            "2001:db8::1",
            "2001:db8:1::2",
            "::1",
        ]
        .into_iter()
        .map(ip)
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::{Origin, Packet, Summary};
    use serde_json::json;

    const LIVE_V4: &str = include_str!("../testdata/live-ip.json");
    const LIVE_V6: &str = include_str!("../testdata/live-ip6.json");
    const REGEN: &str =
        "regenerate with: sudo KPROXY_REGEN_FIXTURES=1 cargo test -p kproxy-nftables \
                         live_rules::tests::regenerate_fixtures -- --ignored";

    #[test]
    fn captured_kernel_listings_read_back_to_the_desired_ruleset() {
        for (json, (node, plans)) in [(LIVE_V4, fixture::v4()), (LIVE_V6, fixture::v6())] {
            let live = Ruleset::live(json).expect("every rule is one kproxy writes");
            let desired = Ruleset::desired(&node, &plans);
            let d = desired.differences(&live);
            assert!(d.is_empty(), "{REGEN}\n{d:#?}");
            assert_eq!(live, desired, "{REGEN}");
        }
    }

    #[test]
    fn live_and_desired_traces_agree_on_the_fixture() {
        let (node, plans) = fixture::v4();
        let desired = Ruleset::desired(&node, &plans);
        let live = Ruleset::live(LIVE_V4).expect("parses");
        let p = Packet::new(
            "203.0.113.2".parse().expect("ip"),
            "1.2.3.4:80".parse().expect("sa"),
            Protocol::Tcp,
            Origin::Forwarded,
        );
        let local = fixture::local_addrs();
        assert_eq!(desired.trace(&p, &local), live.trace(&p, &local));
    }

    fn rule(exprs: Value) -> Value {
        json!({"family": "ip", "table": "kproxy", "chain": "c", "handle": 3, "expr": exprs})
    }

    #[test]
    fn every_shape_parses() {
        let ip = |f: &str| json!({"payload": {"protocol": "ip", "field": f}});
        let cases = vec![
            (
                json!([{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}},
                       {"jump": {"target": "firewall-check"}}]),
                "ct state new jump firewall-check",
            ),
            (
                json!([{"match": {"op": "!=", "left": ip("saddr"), "right": {"set": [
                    "1.2.3.4", {"prefix": {"addr": "203.0.113.0", "len": 25}},
                    {"range": ["10.0.0.0", "10.0.0.191"]}]}}}, {"drop": null}]),
                "ip saddr != { 1.2.3.4/32, 10.0.0.0/25, 10.0.0.128/26, 203.0.113.0/25 } drop",
            ),
            (
                json!([{"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}},
                       {"match": {"op": "!=", "left": ip("daddr"), "right": {"prefix": {"addr": "127.0.0.0", "len": 8}}}},
                       {"vmap": {"key": {"concat": [{"meta": {"key": "l4proto"}}, {"payload": {"protocol": "th", "field": "dport"}}]},
                                 "data": "@service-nodeports"}}]),
                "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports",
            ),
            (
                json!([{"match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, 16384]}, "right": 0}},
                       {"return": null}]),
                "mark and 0x4000 == 0 return",
            ),
            (
                json!([{"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"^": [{"meta": {"key": "mark"}}, 16384]}}}]),
                "mark set mark xor 0x4000",
            ),
            (
                json!([{"masquerade": {"flags": ["fully-random"]}}]),
                "masquerade fully-random",
            ),
            (
                json!([{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "sctp"}},
                       {"dnat": {"addr": "10.0.0.1", "port": 80}}]),
                "meta l4proto sctp dnat to 10.0.0.1:80",
            ),
            (
                json!([{"vmap": {"key": {"numgen": {"mode": "random", "mod": 2, "offset": 0}},
                        "data": {"set": [[0, {"goto": {"target": "a"}}], [1, {"goto": {"target": "b"}}]]}}}]),
                "numgen random mod 2 vmap { 0 : goto a, 1 : goto b }",
            ),
            (
                json!([{"set": {"op": "update", "elem": ip("saddr"), "set": "@aff"}}]),
                "update @aff { ip saddr }",
            ),
            (
                json!([{"match": {"op": "==", "left": ip("saddr"), "right": "@aff"}}, {"goto": {"target": "ep"}}]),
                "ip saddr @aff goto ep",
            ),
            (
                json!([{"match": {"op": "!=", "left": ip("saddr"), "right": {"set": [{"prefix": {"addr": "10.0.0.0", "len": 8}}]}}},
                       {"jump": {"target": "mark-for-masquerade"}}]),
                "ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
            ),
            (json!([{"reject": null}]), "reject"),
        ];
        for (exprs, want) in cases {
            let r = parse_rule(IpFamily::V4, &rule(exprs.clone()))
                .unwrap_or_else(|e| panic!("{want}: {e}"));
            assert_eq!(r.render(IpFamily::V4), want, "{exprs}");
        }
        let v6 = json!({"expr": [
            {"match": {"op": "!=", "left": {"payload": {"protocol": "ip6", "field": "daddr"}}, "right": "::1"}},
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}},
            {"dnat": {"addr": "fd00::1", "port": 53}}], "comment": "x"});
        let r = parse_rule(IpFamily::V6, &v6).expect("v6");
        assert_eq!(r.matches, vec![Match::DaddrNotLoopback]);
        assert_eq!(
            r.render(IpFamily::V6),
            "ip6 daddr != ::1 meta l4proto udp dnat to [fd00::1]:53 comment \"x\""
        );
    }

    #[test]
    fn rules_kproxy_never_writes_are_unrecognised() {
        let ip = |f: &str| json!({"payload": {"protocol": "ip", "field": f}});
        let cases = vec![
            json!([{"counter": {"packets": 0, "bytes": 0}}, {"jump": {"target": "x"}}]),
            json!([{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 80}}, {"accept": null}]),
            json!([{"reject": {"type": "tcp reset"}}]),
            json!([{"masquerade": null}]),
            json!([{"match": {"op": "==", "left": ip("daddr"), "right": "fd00::1"}}, {"drop": null}]),
            json!([{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "daddr"}}, "right": "1.2.3.4"}}, {"drop": null}]),
            json!([{"vmap": {"key": {"numgen": {"mode": "inc", "mod": 1, "offset": 0}}, "data": {"set": [[0, {"goto": {"target": "a"}}]]}}}]),
            json!([{"vmap": {"key": {"numgen": {"mode": "random", "mod": 2, "offset": 0}}, "data": {"set": [[0, {"jump": {"target": "a"}}], [1, {"goto": {"target": "b"}}]]}}}]),
            json!([{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}, {"drop": null}]),
            json!([{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}, {"dnat": {"addr": "10.0.0.1", "port": 80, "flags": ["persistent"]}}]),
            json!([{"drop": null}, {"match": {"op": "==", "left": ip("saddr"), "right": "1.2.3.4"}}]),
            json!([{"match": {"op": "==", "left": ip("saddr"), "right": "1.2.3.4"}}]),
            json!([{"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"&": [{"meta": {"key": "mark"}}, 1]}}}]),
            json!([{"set": {"op": "add", "elem": ip("saddr"), "set": "@aff"}}]),
            json!("not a list"),
        ];
        for exprs in cases {
            let r = rule(exprs.clone());
            assert_eq!(
                parse_rule(IpFamily::V4, &r),
                Err(UnrecognisedRule(r.to_string())),
                "{exprs}"
            );
        }
    }

    #[test]
    fn foreign_rules_fail_strict_reads_and_end_lenient_traces_in_drift() {
        let mut doc: Value = serde_json::from_str(LIVE_V4).expect("fixture");
        let items = doc["nftables"].as_array_mut().expect("array");
        let at = items
            .iter()
            .position(|i| i["rule"]["chain"] == "services")
            .expect("a services rule");
        items.insert(
            at,
            json!({"rule": {"family": "ip", "table": "kproxy", "chain": "services", "handle": 999,
                "expr": [{"counter": {"packets": 0, "bytes": 0}}]}}),
        );
        let text = doc.to_string();
        let err = Ruleset::live(&text).expect_err("foreign rule");
        assert!(
            matches!(&err, LiveError::UnrecognisedRule { chain, rule } if chain == "services" && rule.0.contains("counter")),
            "{err}"
        );
        let rs = Ruleset::live_lenient(&text).expect("lenient");
        let p = Packet::new(
            "10.180.2.100".parse().expect("ip"),
            "172.30.0.41:80".parse().expect("sa"),
            Protocol::Tcp,
            Origin::Forwarded,
        );
        let t = rs.trace(&p, &fixture::local_addrs());
        assert!(
            matches!(&t.summary(), Summary::Drift(w) if w[0].contains("never writes")),
            "{t}"
        );
        let (node, plans) = fixture::v4();
        let d = Ruleset::desired(&node, &plans).differences(&rs);
        assert!(
            d.iter().any(|l| l.contains("not one kproxy writes")),
            "{d:?}"
        );
    }

    #[test]
    fn listings_without_our_table_or_with_odd_hooks_are_errors() {
        assert_eq!(
            Ruleset::live(r#"{"nftables": [{"metainfo": {}}]}"#),
            Err(LiveError::NoTable)
        );
        assert!(matches!(Ruleset::live("nope"), Err(LiveError::Json(_))));
        let odd = r#"{"nftables": [{"table": {"family": "ip", "name": "kproxy"}},
            {"chain": {"family": "ip", "table": "kproxy", "name": "x", "type": "route", "hook": "output", "prio": 0}}]}"#;
        assert!(matches!(
            Ruleset::live(odd),
            Err(LiveError::UnrecognisedChain { .. })
        ));
        let drop_policy = r#"{"nftables": [{"table": {"family": "ip", "name": "kproxy"}},
            {"chain": {"family": "ip", "table": "kproxy", "name": "x", "type": "filter", "hook": "input", "prio": 0, "policy": "drop"}}]}"#;
        assert!(matches!(
            Ruleset::live(drop_policy),
            Err(LiveError::UnrecognisedChain { .. })
        ));
    }

    /// Captures the fixtures from the real kernel: programs [`fixture`]'s plans through
    /// the real backend in a scratch network namespace and lists the tables.
    #[test]
    #[ignore = "writes testdata/: run as root with KPROXY_REGEN_FIXTURES=1"]
    fn regenerate_fixtures() {
        use crate::writer::{NftCli, NftWriter};
        use crate::NftablesBackend;
        use kproxy_backend_api::{Backend, Changes};
        use std::process::Command;
        if std::env::var("KPROXY_REGEN_FIXTURES").is_err() {
            return;
        }
        struct Ns(String);
        impl Drop for Ns {
            fn drop(&mut self) {
                let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
            }
        }
        let ns = Ns(format!("kp-evalfix-{}", std::process::id()));
        let ok = Command::new("ip")
            .args(["netns", "add", &ns.0])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {}", ns.0);
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
        std::fs::create_dir_all(&dir).expect("testdata dir");
        for (family, (node, plans), file) in [
            (IpFamily::V4, fixture::v4(), "live-ip.json"),
            (IpFamily::V6, fixture::v6(), "live-ip6.json"),
        ] {
            let mut b = NftablesBackend::new(family, NftCli::in_netns(&ns.0));
            b.sync(&node, &plans, &Changes::Full).expect("sync");
            let text = NftCli::in_netns(&ns.0)
                .list_table(family)
                .expect("list")
                .expect("table exists");
            let v: Value = serde_json::from_str(&text).expect("json");
            let pretty = serde_json::to_string_pretty(&v).expect("json");
            std::fs::write(dir.join(file), pretty + "\n").expect("write fixture");
        }
    }
}
