//! What kproxy's table holds in the kernel: chain names, sets and map elements.
//!
//! Read back at start-up and after a failure (from `nft -j list table`), then kept up to
//! date by every successful transaction. Rules are not read: a chain kproxy wrote in this
//! process has a known content hash; an endpoint chain's rules follow from its name; any
//! other chain is rewritten by the next full sync.

use crate::names::ObjName;
use crate::objects::{ElemKey, MapId, Verdict};
use kproxy_backend_api::Protocol;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// The live content of kproxy's table for one family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveState {
    pub table_exists: bool,
    /// Every chain, with the hash of the rules kproxy wrote into it (None: unknown).
    pub chains: BTreeMap<ObjName, Option<u64>>,
    /// Affinity sets (per-service sets), by name.
    pub affinity_sets: BTreeSet<ObjName>,
    /// Fixed maps and sets present in the kernel.
    pub maps: BTreeSet<MapId>,
    /// Elements of the fixed maps and sets.
    pub elements: BTreeMap<MapId, BTreeMap<ElemKey, Option<Verdict>>>,
}

/// A live table that could not be understood.
#[derive(Debug, thiserror::Error)]
#[error("cannot parse `nft -j list table` output: {0}")]
pub struct ParseError(String);

impl LiveState {
    /// Parses `nft -j list table <family> kproxy`.
    pub fn from_nft_json(text: &str) -> Result<LiveState, ParseError> {
        let doc: Value = serde_json::from_str(text).map_err(|e| ParseError(e.to_string()))?;
        let items = doc
            .get("nftables")
            .and_then(Value::as_array)
            .ok_or_else(|| ParseError("no `nftables` array".into()))?;
        let mut live = LiveState::default();
        for item in items {
            if item.get("table").is_some() {
                live.table_exists = true;
            } else if let Some(c) = item.get("chain") {
                if let Some(name) = c.get("name").and_then(Value::as_str) {
                    live.chains.insert(ObjName::from_live(name), None);
                }
            } else if let Some(s) = item.get("set").or_else(|| item.get("map")) {
                let Some(name) = s.get("name").and_then(Value::as_str) else {
                    continue;
                };
                match MapId::from_name(name) {
                    Some(map) => {
                        live.maps.insert(map);
                        let elems = live.elements.entry(map).or_default();
                        if let Some(list) = s.get("elem").and_then(Value::as_array) {
                            for e in list {
                                let (k, v) = parse_elem(e).ok_or_else(|| {
                                    ParseError(format!("unexpected element in {name}: {e}"))
                                })?;
                                elems.insert(k, v);
                            }
                        }
                    }
                    None => {
                        live.affinity_sets.insert(ObjName::from_live(name));
                    }
                }
            }
        }
        Ok(live)
    }

    /// Number of elements across all maps (for tests and logs).
    pub fn element_count(&self) -> usize {
        self.elements.values().map(BTreeMap::len).sum()
    }
}

/// An element is either a bare key, or `[key, verdict]` for maps; a key with a comment is
/// wrapped as `{"elem": {"val": key, "comment": …}}`.
fn parse_elem(e: &Value) -> Option<(ElemKey, Option<Verdict>)> {
    match e {
        Value::Array(pair) if pair.len() == 2 => {
            let key = parse_key(unwrap_elem(&pair[0]))?;
            let verdict = parse_verdict(&pair[1])?;
            Some((key, Some(verdict)))
        }
        other => Some((parse_key(unwrap_elem(other))?, None)),
    }
}

fn unwrap_elem(v: &Value) -> &Value {
    v.get("elem").and_then(|e| e.get("val")).unwrap_or(v)
}

pub(crate) fn parse_key(v: &Value) -> Option<ElemKey> {
    if let Some(parts) = v.get("concat").and_then(Value::as_array) {
        return match parts.as_slice() {
            [a, p, port] => Some(ElemKey::AddrProtoPort(
                parse_ip(a)?,
                parse_proto(p)?,
                parse_port(port)?,
            )),
            [p, port] => Some(ElemKey::ProtoPort(parse_proto(p)?, parse_port(port)?)),
            _ => None,
        };
    }
    Some(ElemKey::Addr(parse_ip(v)?))
}

fn parse_ip(v: &Value) -> Option<IpAddr> {
    v.as_str()?.parse().ok()
}

pub(crate) fn parse_proto(v: &Value) -> Option<Protocol> {
    match v {
        Value::String(s) => match s.as_str() {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "sctp" => Some(Protocol::Sctp),
            _ => None,
        },
        Value::Number(n) => match n.as_u64()? {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            132 => Some(Protocol::Sctp),
            _ => None,
        },
        _ => None,
    }
}

pub(crate) fn parse_port(v: &Value) -> Option<u16> {
    match v {
        Value::Number(n) => u16::try_from(n.as_u64()?).ok(),
        // nft prints well-known ports by name only with `-S`; accept digits in strings.
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn parse_verdict(v: &Value) -> Option<Verdict> {
    if v.get("drop").is_some() {
        return Some(Verdict::Drop);
    }
    let target = v.get("goto")?.get("target")?.as_str()?;
    Some(Verdict::Goto(ObjName::from_live(target)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chains_sets_and_elements() {
        let text = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"table": {"family": "ip6", "name": "kproxy", "handle": 1}},
          {"map": {"family": "ip6", "name": "service-ips", "table": "kproxy", "type": ["ipv6_addr", "inet_proto", "inet_service"], "map": "verdict",
             "elem": [[{"concat": ["fd00::2", "udp", 53]}, {"drop": null}],
                      [{"elem": {"val": {"concat": ["fd00::1", "tcp", 80]}, "comment": "ns/svc:p"}}, {"goto": {"target": "c1"}}]]}},
          {"map": {"family": "ip6", "name": "service-nodeports", "table": "kproxy", "type": ["inet_proto", "inet_service"], "map": "verdict",
             "elem": [[{"concat": ["sctp", 3001]}, {"goto": {"target": "c1"}}]]}},
          {"set": {"family": "ip6", "name": "cluster-ips", "table": "kproxy", "type": "ipv6_addr", "elem": ["fd00::1", "fd00::3"]}},
          {"set": {"family": "ip6", "name": "affinity-ABC-ns/s/tcp/p__fd00..1/80", "table": "kproxy", "type": "ipv6_addr", "flags": ["timeout"], "timeout": 10800}},
          {"chain": {"family": "ip6", "table": "kproxy", "name": "c1", "handle": 4}}]}"#;
        let live = LiveState::from_nft_json(text).expect("parses");
        assert!(live.table_exists);
        assert_eq!(live.chains.len(), 1);
        assert_eq!(live.affinity_sets.len(), 1);
        let svc = &live.elements[&MapId::ServiceIps];
        assert_eq!(
            svc.get(&ElemKey::AddrProtoPort(
                "fd00::1".parse().expect("ip"),
                Protocol::Tcp,
                80
            )),
            Some(&Some(Verdict::Goto(ObjName::from_live("c1"))))
        );
        assert_eq!(svc.len(), 2);
        assert_eq!(live.elements[&MapId::ClusterIps].len(), 2);
        assert_eq!(
            live.elements[&MapId::ServiceNodeports]
                .keys()
                .next()
                .cloned(),
            Some(ElemKey::ProtoPort(Protocol::Sctp, 3001))
        );
    }

    #[test]
    fn unknown_element_shapes_are_errors_not_silently_dropped() {
        let text = r#"{"nftables": [{"table": {"name": "kproxy"}},
          {"map": {"name": "service-ips", "elem": [[{"concat": ["x", "tcp", 80]}, {"drop": null}]]}}]}"#;
        assert!(LiveState::from_nft_json(text).is_err());
    }
}
