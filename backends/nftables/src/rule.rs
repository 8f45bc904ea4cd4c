//! Rules as typed data, with one renderer (`nft` syntax).
//!
//! Business logic builds [`Rule`]s from matches and statements; nothing outside this
//! module assembles rule text. The same data is what a packet evaluator reads.

use crate::names::ObjName;
use ipnet::IpNet;
use kproxy_backend_api::{IpFamily, Protocol};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

/// What an address is compared against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AddrSet {
    /// One address.
    Addr(IpAddr),
    /// One or more prefixes (rendered as an anonymous interval set when more than one).
    Prefixes(Vec<IpNet>),
    /// A named set of kproxy's table.
    Named(ObjName),
}

/// A condition of a rule. All conditions of a rule must hold.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Match {
    /// `ct state new`.
    CtStateNew,
    /// `ip saddr [!=] …`.
    Saddr { negate: bool, set: AddrSet },
    /// `ip daddr [!=] …`.
    Daddr { negate: bool, set: AddrSet },
    /// `fib saddr type local`: the packet comes from this node.
    FibSaddrLocal,
    /// `fib daddr type local`: the packet is addressed to this node.
    FibDaddrLocal,
    /// `ip daddr != 127.0.0.0/8` (`ip6 daddr != ::1`): localhost NodePorts are not served.
    DaddrNotLoopback,
    /// `mark and M == 0`: the masquerade bit is not set.
    MarkUnset(u32),
}

/// The key a verdict map is looked up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmapKey {
    /// `ip daddr . meta l4proto . th dport`.
    DaddrProtoPort,
    /// `meta l4proto . th dport`.
    ProtoPort,
}

/// What a rule does once it matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Stmt {
    Jump(ObjName),
    Goto(ObjName),
    Drop,
    Reject,
    Return,
    /// `mark set mark or M`.
    MarkOr(u32),
    /// `mark set mark xor M`.
    MarkXor(u32),
    /// `masquerade fully-random`.
    Masquerade,
    /// `meta l4proto P dnat to ADDR`.
    Dnat {
        protocol: Protocol,
        to: SocketAddr,
    },
    /// `numgen random mod N vmap { 0 : goto c0, … }`: random load balancing.
    NumgenVmap(Vec<ObjName>),
    /// `<key> vmap @map`.
    Vmap {
        key: VmapKey,
        map: ObjName,
    },
    /// `update @set { ip saddr }`: remember the client for session affinity.
    UpdateSaddr(ObjName),
}

/// A rule: conditions, statements and an optional comment.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub stmts: Vec<Stmt>,
    pub comment: Option<String>,
}

impl Rule {
    pub fn new(matches: Vec<Match>, stmts: Vec<Stmt>) -> Rule {
        Rule {
            matches,
            stmts,
            comment: None,
        }
    }

    pub fn with_comment(mut self, comment: &str) -> Rule {
        self.comment = Some(comment.to_string());
        self
    }

    /// The rule body in `nft` syntax, for the table of `family`.
    pub fn render(&self, family: IpFamily) -> String {
        let ip = family_kw(family);
        let mut out = String::new();
        for m in &self.matches {
            if !out.is_empty() {
                out.push(' ');
            }
            match m {
                Match::CtStateNew => out.push_str("ct state new"),
                Match::Saddr { negate, set } => {
                    let _ = write!(out, "{ip} saddr {}{}", neg(*negate), render_set(set));
                }
                Match::Daddr { negate, set } => {
                    let _ = write!(out, "{ip} daddr {}{}", neg(*negate), render_set(set));
                }
                Match::FibSaddrLocal => out.push_str("fib saddr type local"),
                Match::FibDaddrLocal => out.push_str("fib daddr type local"),
                Match::DaddrNotLoopback => match family {
                    IpFamily::V4 => out.push_str("ip daddr != 127.0.0.0/8"),
                    IpFamily::V6 => out.push_str("ip6 daddr != ::1"),
                },
                Match::MarkUnset(m) => {
                    let _ = write!(out, "mark and {m:#x} == 0");
                }
            }
        }
        for s in &self.stmts {
            if !out.is_empty() {
                out.push(' ');
            }
            match s {
                Stmt::Jump(c) => {
                    let _ = write!(out, "jump {c}");
                }
                Stmt::Goto(c) => {
                    let _ = write!(out, "goto {c}");
                }
                Stmt::Drop => out.push_str("drop"),
                Stmt::Reject => out.push_str("reject"),
                Stmt::Return => out.push_str("return"),
                Stmt::MarkOr(m) => {
                    let _ = write!(out, "mark set mark or {m:#x}");
                }
                Stmt::MarkXor(m) => {
                    let _ = write!(out, "mark set mark xor {m:#x}");
                }
                Stmt::Masquerade => out.push_str("masquerade fully-random"),
                Stmt::Dnat { protocol, to } => {
                    let _ = write!(out, "meta l4proto {protocol} dnat to {to}");
                }
                Stmt::NumgenVmap(chains) => {
                    let _ = write!(out, "numgen random mod {} vmap {{ ", chains.len());
                    for (i, c) in chains.iter().enumerate() {
                        if i > 0 {
                            out.push_str(", ");
                        }
                        let _ = write!(out, "{i} : goto {c}");
                    }
                    out.push_str(" }");
                }
                Stmt::Vmap { key, map } => {
                    match key {
                        VmapKey::DaddrProtoPort => {
                            let _ = write!(out, "{ip} daddr . meta l4proto . th dport");
                        }
                        VmapKey::ProtoPort => out.push_str("meta l4proto . th dport"),
                    }
                    let _ = write!(out, " vmap @{map}");
                }
                Stmt::UpdateSaddr(set) => {
                    let _ = write!(out, "update @{set} {{ {ip} saddr }}");
                }
            }
        }
        if let Some(c) = &self.comment {
            let _ = write!(out, " comment \"{}\"", escape_comment(c));
        }
        out
    }

    /// Chains this rule can pass control to (for ordering and garbage collection).
    pub fn referenced_chains(&self) -> impl Iterator<Item = &ObjName> {
        self.stmts.iter().flat_map(|s| match s {
            Stmt::Jump(c) | Stmt::Goto(c) => std::slice::from_ref(c).iter(),
            Stmt::NumgenVmap(cs) => cs.iter(),
            _ => [].iter(),
        })
    }
}

/// `ip` or `ip6`: the nft family keyword and the payload protocol of the family.
pub fn family_kw(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

fn neg(negate: bool) -> &'static str {
    if negate {
        "!= "
    } else {
        ""
    }
}

fn render_set(set: &AddrSet) -> String {
    match set {
        AddrSet::Addr(a) => a.to_string(),
        AddrSet::Prefixes(p) if p.len() == 1 => p[0].to_string(),
        AddrSet::Prefixes(p) => {
            let items: Vec<String> = p.iter().map(|n| n.to_string()).collect();
            format!("{{ {} }}", items.join(", "))
        }
        AddrSet::Named(n) => format!("@{n}"),
    }
}

/// Comments come from validated Kubernetes names, but never let one break the syntax.
pub fn escape_comment(c: &str) -> String {
    c.chars().filter(|ch| *ch != '"' && *ch != '\n').collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_masquerade_rule_per_family() {
        let r = Rule::new(
            vec![
                Match::Daddr {
                    negate: false,
                    set: AddrSet::Addr("172.30.0.41".parse().expect("ip")),
                },
                Match::Saddr {
                    negate: true,
                    set: AddrSet::Prefixes(vec!["10.0.0.0/8".parse().expect("net")]),
                },
            ],
            vec![Stmt::Jump(ObjName::fixed("mark-for-masquerade"))],
        );
        assert_eq!(
            r.render(IpFamily::V4),
            "ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade"
        );
    }

    #[test]
    fn renders_numgen_dnat_and_comments() {
        let r = Rule::new(
            vec![],
            vec![Stmt::NumgenVmap(vec![
                ObjName::fixed("a"),
                ObjName::fixed("b"),
            ])],
        );
        assert_eq!(
            r.render(IpFamily::V4),
            "numgen random mod 2 vmap { 0 : goto a, 1 : goto b }"
        );
        let d = Rule::new(
            vec![],
            vec![Stmt::Dnat {
                protocol: Protocol::Udp,
                to: "[fd00::1]:53".parse().expect("addr"),
            }],
        )
        .with_comment("x\"y");
        assert_eq!(
            d.render(IpFamily::V6),
            "meta l4proto udp dnat to [fd00::1]:53 comment \"xy\""
        );
        let l = Rule::new(vec![Match::DaddrNotLoopback], vec![Stmt::Drop]);
        assert_eq!(l.render(IpFamily::V6), "ip6 daddr != ::1 drop");
    }
}
