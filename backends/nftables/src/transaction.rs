//! One atomic nftables transaction as a list of typed operations, rendered for `nft -f`.

use crate::names::ObjName;
use crate::objects::{ElemKey, Hook, MapId, Verdict, TABLE};
use crate::rule::{escape_comment, family_kw, Rule};
use kproxy_backend_api::IpFamily;
use std::fmt::Write as _;

/// One kernel operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    AddTable,
    /// Adds a chain if missing (a base chain with its hook). Existing chains are kept.
    AddChain {
        name: ObjName,
        hook: Option<Hook>,
    },
    FlushChain(ObjName),
    DeleteChain(ObjName),
    AddRule {
        chain: ObjName,
        rule: Rule,
    },
    /// Adds one of the table's fixed sets or maps if missing.
    AddMap(MapId),
    AddAffinitySet {
        name: ObjName,
        timeout_seconds: u32,
    },
    /// Deletes a set or map by name.
    DeleteSet(ObjName),
    AddElement {
        map: MapId,
        key: ElemKey,
        verdict: Option<Verdict>,
        comment: Option<String>,
    },
    DeleteElement {
        map: MapId,
        key: ElemKey,
    },
}

/// An ordered list of operations that the kernel applies all or nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub family: IpFamily,
    pub ops: Vec<Op>,
}

impl Transaction {
    pub fn new(family: IpFamily) -> Self {
        Transaction {
            family,
            ops: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// The transaction as an `nft -f` script, one command per line.
    pub fn render(&self) -> String {
        let fam = family_kw(self.family);
        let t = format!("{fam} {TABLE}");
        let mut out = String::new();
        for op in &self.ops {
            match op {
                Op::AddTable => {
                    let _ = writeln!(out, "add table {t} {{ comment \"rules for kproxy\" ; }}");
                }
                Op::AddChain { name, hook: None } => {
                    let _ = writeln!(out, "add chain {t} {name}");
                }
                Op::AddChain {
                    name,
                    hook: Some(h),
                } => {
                    let _ = writeln!(
                        out,
                        "add chain {t} {name} {{ type {} hook {} priority {} ; }}",
                        h.kind, h.hook, h.priority
                    );
                }
                Op::FlushChain(name) => {
                    let _ = writeln!(out, "flush chain {t} {name}");
                }
                Op::DeleteChain(name) => {
                    let _ = writeln!(out, "delete chain {t} {name}");
                }
                Op::AddRule { chain, rule } => {
                    let _ = writeln!(out, "add rule {t} {chain} {}", rule.render(self.family));
                }
                Op::AddMap(m) => {
                    let kind = if m.is_map() { "map" } else { "set" };
                    let _ = writeln!(
                        out,
                        "add {kind} {t} {} {{ {} }}",
                        m.name(),
                        m.declaration(self.family)
                    );
                }
                Op::AddAffinitySet {
                    name,
                    timeout_seconds,
                } => {
                    let addr = match self.family {
                        IpFamily::V4 => "ipv4_addr",
                        IpFamily::V6 => "ipv6_addr",
                    };
                    // `dynamic` is given explicitly: some kernels add it implicitly and
                    // then refuse a re-add that omits it.
                    let _ = writeln!(
                        out,
                        "add set {t} {name} {{ type {addr} ; flags dynamic,timeout ; timeout {timeout_seconds}s ; }}"
                    );
                }
                Op::DeleteSet(name) => {
                    let _ = writeln!(out, "delete set {t} {name}");
                }
                Op::AddElement {
                    map,
                    key,
                    verdict,
                    comment,
                } => {
                    let _ = write!(out, "add element {t} {map} {{ {key}");
                    if let Some(c) = comment {
                        let _ = write!(out, " comment \"{}\"", escape_comment(c));
                    }
                    if let Some(v) = verdict {
                        let _ = write!(out, " : {v}");
                    }
                    out.push_str(" }\n");
                }
                Op::DeleteElement { map, key } => {
                    let _ = writeln!(out, "delete element {t} {map} {{ {key} }}");
                }
            }
        }
        out
    }
}
