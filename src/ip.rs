//! Lenient IP parsing, as Kubernetes accepts it.
//!
//! Older API servers stored IPv4 addresses with leading zeros (`172.30.0.041`), which
//! Go's `ParseIPSloppy` reads as decimal. Rust's parser rejects them, so kproxy reads
//! them the same way Kubernetes does and always writes the canonical form.

use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr};

/// Parses an IP address, accepting IPv4 octets with leading zeros (read as decimal).
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    parse_v4_sloppy(s).map(IpAddr::V4)
}

fn parse_v4_sloppy(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for o in &mut octets {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *o = p.parse().ok()?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

/// Parses a CIDR (`10.0.0.0/8`, `203.0.113.000/025`), trimming whitespace. The host bits
/// are cleared, so `10.1.2.3/8` becomes `10.0.0.0/8`.
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    let s = s.trim();
    let (addr, len) = s.split_once('/')?;
    let ip = parse_ip(addr)?;
    let len: u8 = len.trim().parse().ok()?;
    IpNet::new(ip, len).ok().map(|n| n.trunc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_leading_zeros() {
        assert_eq!(
            parse_ip("172.30.0.041").map(|i| i.to_string()).as_deref(),
            Some("172.30.0.41")
        );
        assert_eq!(
            parse_ip("192.168.099.022")
                .map(|i| i.to_string())
                .as_deref(),
            Some("192.168.99.22")
        );
        assert_eq!(
            parse_ip("10.180.00.001").map(|i| i.to_string()).as_deref(),
            Some("10.180.0.1")
        );
        assert_eq!(
            parse_ip("fd00:0::0001").map(|i| i.to_string()).as_deref(),
            Some("fd00::1")
        );
        assert_eq!(
            parse_cidr(" 203.0.113.000/025")
                .map(|i| i.to_string())
                .as_deref(),
            Some("203.0.113.0/25")
        );
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "1.2.3",
            "1.2.3.4.5",
            "256.1.1.1",
            "1.2.3.x",
            "1.2.3.0004",
            "fd00::g",
        ] {
            assert_eq!(parse_ip(bad), None, "{bad}");
        }
        for bad in ["10.0.0.0", "10.0.0.0/33", "10.0.0.0/x", "::/129"] {
            assert_eq!(parse_cidr(bad), None, "{bad}");
        }
    }
}
