//! Names of per-service objects: stable, hashed, length-checked.
//!
//! A name is `<prefix>-<HASH>-<ns>/<svc>/<proto>/<port>[__<ip>/<port>]`, where HASH is the
//! first 8 characters of base32(sha256(everything that determines the object's
//! content)). The readable tail is for humans (`nft list`); the hash keeps names unique
//! when the tail is truncated, and — unlike upstream — also covers the endpoint chain's
//! *flavour* (session affinity and its timeout). An endpoint chain's content is therefore
//! a pure function of its name, which is what lets a restarted kproxy keep live endpoint
//! chains without reading their rules back.

use kproxy_backend_api::{Endpoint, ServicePortName};
use sha2::{Digest, Sha256};
use std::fmt;

/// nftables' limit for chain and set names is 256 bytes (NFT_NAME_MAXLEN, including the
/// terminating NUL). Keep well below, as upstream does, leaving room for prefixes.
pub const MAX_NAME_LEN: usize = 240;

/// A validated nftables object name (chain or set).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjName(String);

impl ObjName {
    /// A fixed name of kproxy's own (base chains, static chains, maps).
    pub fn fixed(name: &'static str) -> ObjName {
        ObjName(name.to_string())
    }

    /// Wraps a name read back from the kernel.
    pub fn from_live(name: &str) -> ObjName {
        ObjName(name.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Per-service objects carry a `/` in their name (static ones never do): the marker
    /// that decides what stale-object collection may delete.
    pub fn is_per_service(&self) -> bool {
        self.0.contains('/')
    }

    /// Builds `<prefix>-<hash(hash_input)>-<tail>`, truncating the tail with `...` so the
    /// whole name stays within [`MAX_NAME_LEN`].
    fn hashed(prefix: &str, hash_input: &str, tail: &str) -> ObjName {
        let digest = Sha256::digest(hash_input.as_bytes());
        let hash = data_encoding::BASE32.encode(&digest);
        let mut name = format!("{prefix}-{}-{tail}", &hash[..8]);
        if name.len() > MAX_NAME_LEN {
            // All characters are ASCII (validated DNS names, IPs, digits), so byte
            // truncation cannot split a character.
            name.truncate(MAX_NAME_LEN - 3);
            name.push_str("...");
        }
        ObjName(name)
    }
}

impl fmt::Display for ObjName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The readable part for a service port: `ns/svc/proto/port`.
pub fn service_port_base(name: &ServicePortName) -> String {
    format!(
        "{}/{}/{}/{}",
        name.service.namespace, name.service.name, name.protocol, name.port
    )
}

/// The readable part for an endpoint: `ns/svc/proto/port__ip/port`, with IPv6 colons
/// turned into dots (colons are not allowed in unquoted nft identifiers).
pub fn endpoint_base(name: &ServicePortName, ep: &Endpoint) -> String {
    let ip = ep.ip.to_string().replace(':', ".");
    format!("{}__{}/{}", service_port_base(name), ip, ep.port)
}

/// The kinds of per-service-port chains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceChainKind {
    /// Load balancing over cluster endpoints.
    Service,
    /// Load balancing over local endpoints.
    Local,
    /// Entry point for NodePort / external IP / LB traffic.
    External,
    /// LoadBalancerSourceRanges allow-list.
    Firewall,
}

impl ServiceChainKind {
    fn prefix(self) -> &'static str {
        match self {
            ServiceChainKind::Service => "service",
            ServiceChainKind::Local => "local",
            ServiceChainKind::External => "external",
            ServiceChainKind::Firewall => "firewall",
        }
    }
}

/// Chain name for one of a service port's chains.
pub fn service_chain(kind: ServiceChainKind, name: &ServicePortName) -> ObjName {
    let base = service_port_base(name);
    ObjName::hashed(kind.prefix(), &base, &base)
}

/// Chain name for an endpoint; `affinity` is the session-affinity timeout, if any, and
/// is part of the hash because it changes the chain's rules.
pub fn endpoint_chain(name: &ServicePortName, ep: &Endpoint, affinity: Option<u32>) -> ObjName {
    let base = endpoint_base(name, ep);
    ObjName::hashed("endpoint", &flavoured(&base, affinity), &base)
}

/// Session-affinity set for an endpoint. The timeout is a property of the set that cannot
/// be changed in place, so it is part of the name.
pub fn affinity_set(name: &ServicePortName, ep: &Endpoint, timeout: u32) -> ObjName {
    let base = endpoint_base(name, ep);
    ObjName::hashed("affinity", &flavoured(&base, Some(timeout)), &base)
}

fn flavoured(base: &str, affinity: Option<u32>) -> String {
    match affinity {
        Some(t) => format!("{base}+affinity={t}"),
        None => base.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kproxy_backend_api::{Protocol, ServiceName};

    fn spn(ns: &str, svc: &str, port: &str) -> ServicePortName {
        ServicePortName::new(ServiceName::new(ns, svc), port, Protocol::Tcp)
    }

    fn ep(ip: &str, port: u16) -> Endpoint {
        Endpoint {
            ip: ip.parse().expect("test ip"),
            port,
            node_name: None,
            zone: None,
            is_local: false,
            ready: true,
            serving: true,
            terminating: false,
            zone_hints: vec![],
            node_hints: vec![],
        }
    }

    #[test]
    fn service_chain_name_has_hash_and_readable_tail() {
        let n = service_chain(
            ServiceChainKind::Service,
            &spn("testing", "service", "http"),
        );
        let s = n.as_str();
        assert!(s.starts_with("service-"), "{s}");
        assert!(s.ends_with("-testing/service/tcp/http"), "{s}");
        let hash = &s["service-".len().."service-".len() + 8];
        assert!(hash
            .chars()
            .all(|c| c.is_ascii_uppercase() || ('2'..='7').contains(&c)));
        assert!(n.is_per_service());
    }

    #[test]
    fn names_are_stable_and_differ_per_port_and_kind() {
        let a = service_chain(ServiceChainKind::Service, &spn("ns", "svc", "p80"));
        let b = service_chain(ServiceChainKind::Service, &spn("ns", "svc", "p80"));
        let c = service_chain(ServiceChainKind::Service, &spn("ns", "svc", "p443"));
        let d = service_chain(ServiceChainKind::External, &spn("ns", "svc", "p80"));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a.as_str()[8..16], c.as_str()[8..16]);
        // Same hash for the same port, different prefix.
        assert_eq!(
            a.as_str()["service-".len()..],
            d.as_str()["external-".len()..]
        );
    }

    #[test]
    fn endpoint_chain_name_format_and_ipv6() {
        let n = endpoint_chain(
            &spn("testing", "service", "http"),
            &ep("10.180.0.1", 80),
            None,
        );
        assert!(
            n.as_str()
                .ends_with("-testing/service/tcp/http__10.180.0.1/80"),
            "{n}"
        );
        let v6 = endpoint_chain(
            &spn("testing", "service", "http"),
            &ep("fd80:abcd:12::a1b2:c3d4:e5f6", 80),
            None,
        );
        assert!(
            v6.as_str().ends_with("__fd80.abcd.12..a1b2.c3d4.e5f6/80"),
            "{v6}"
        );
        assert!(!v6.as_str().contains(':'));
    }

    #[test]
    fn affinity_changes_endpoint_chain_name() {
        let p = spn("ns", "svc", "p80");
        let e = ep("10.0.0.1", 80);
        let plain = endpoint_chain(&p, &e, None);
        let sticky = endpoint_chain(&p, &e, Some(10800));
        let sticky2 = endpoint_chain(&p, &e, Some(60));
        assert_ne!(plain, sticky);
        assert_ne!(sticky, sticky2);
        assert_ne!(affinity_set(&p, &e, 60), affinity_set(&p, &e, 10800));
    }

    #[test]
    fn long_names_are_truncated_but_unique() {
        let long_ns = "n".repeat(63);
        let long_svc = "s".repeat(63);
        let long_port = "p".repeat(15);
        let p = spn(&long_ns, &long_svc, &long_port);
        let a = endpoint_chain(
            &p,
            &ep("fd80:abcd:12:3456:789a:bcde:f012:3456", 65535),
            None,
        );
        let b = endpoint_chain(
            &p,
            &ep("fd80:abcd:12:3456:789a:bcde:f012:3457", 65535),
            None,
        );
        // Within limits even in the worst case.
        assert!(a.as_str().len() <= MAX_NAME_LEN);
        let svc = service_chain(ServiceChainKind::Firewall, &p);
        assert!(svc.as_str().len() <= MAX_NAME_LEN);
        assert!(
            !svc.as_str().ends_with("..."),
            "service names fit untruncated"
        );
        assert_ne!(a, b);
        // A truncated name ends with the marker.
        let very_long = ServicePortName::new(
            ServiceName::new("n".repeat(200), "s".repeat(200)),
            "x",
            Protocol::Udp,
        );
        let t = service_chain(ServiceChainKind::Service, &very_long);
        assert_eq!(t.as_str().len(), MAX_NAME_LEN);
        assert!(t.as_str().ends_with("..."));
    }
}
