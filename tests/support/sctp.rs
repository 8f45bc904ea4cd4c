//! Just enough SCTP (RFC 9260, formerly RFC 4960) to probe services.
//!
//! The test kernel has no SCTP protocol module, so `socket(.., IPPROTO_SCTP)`
//! fails. Conntrack and NAT for SCTP live in netfilter, not in the SCTP
//! stack, so hand-built packets sent over raw IP sockets still exercise
//! exactly what kproxy programs. A probe sends an INIT; the responder in the
//! endpoint's namespace answers with an INIT ACK whose State Cookie carries
//! the same text line TCP and UDP responders send (or with an ABORT when
//! nothing "listens" on the port, as a real stack would).
//!
//! Packets must carry a correct CRC32c: conntrack verifies it on ingress
//! (`nf_conntrack_checksum`) and treats a bad one as invalid.

use std::hash::{BuildHasher, Hasher};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// IANA protocol number of SCTP, for raw sockets.
pub const IPPROTO_SCTP: libc::c_int = 132;

/// Chunk types used here (RFC 9260 §3.2).
pub const CHUNK_INIT: u8 = 1;
pub const CHUNK_INIT_ACK: u8 = 2;
pub const CHUNK_ABORT: u8 = 6;
/// INIT ACK parameter type of the State Cookie (RFC 9260 §3.3.3).
pub const PARAM_STATE_COOKIE: u16 = 7;

/// Size of the common header: ports, verification tag, checksum.
const COMMON_HEADER_LEN: usize = 12;
/// Fixed part of INIT / INIT ACK: tag, a_rwnd, streams, initial TSN.
const INIT_FIXED_LEN: usize = 16;

/// CRC32c (Castagnoli, reflected polynomial 0x82F63B78, initial value and
/// final XOR 0xFFFFFFFF) as SCTP uses it — RFC 9260 Appendix A.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: OnceLock<[u32; 256]> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table = [0u32; 256];
        for (i, entry) in table.iter_mut().enumerate() {
            let mut crc = i as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
            }
            *entry = crc;
        }
        table
    });
    !data.iter().fold(!0u32, |crc, &b| {
        table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8)
    })
}

/// Fills in the checksum field of a complete SCTP packet. The CRC is
/// computed with the field zeroed and stored least-significant byte first:
/// RFC 9260 Appendix A's sample code writes `crc & 0xff` into the first
/// byte, and Linux stores `cpu_to_le32(crc)` (`sctp_compute_cksum`).
pub fn set_checksum(packet: &mut [u8]) {
    packet[8..12].fill(0);
    let crc = crc32c(packet);
    packet[8..12].copy_from_slice(&crc.to_le_bytes());
}

/// Whether the checksum field of `packet` matches its contents.
pub fn checksum_ok(packet: &[u8]) -> bool {
    if packet.len() < COMMON_HEADER_LEN {
        return false;
    }
    let mut copy = packet.to_vec();
    set_checksum(&mut copy);
    copy[8..12] == packet[8..12]
}

/// Builds a packet with one chunk, padding it to 4 bytes, and checksums it.
fn packet(src_port: u16, dst_port: u16, vtag: u32, kind: u8, flags: u8, value: &[u8]) -> Vec<u8> {
    let chunk_len = u16::try_from(4 + value.len()).expect("SCTP chunk fits in 64 KiB");
    let mut p = Vec::with_capacity(COMMON_HEADER_LEN + 4 + value.len() + 3);
    p.extend_from_slice(&src_port.to_be_bytes());
    p.extend_from_slice(&dst_port.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(&[kind, flags]);
    p.extend_from_slice(&chunk_len.to_be_bytes());
    p.extend_from_slice(value);
    p.resize(p.len().next_multiple_of(4), 0);
    set_checksum(&mut p);
    p
}

/// The fixed INIT / INIT ACK fields: one stream each way, a 64 KiB window.
fn init_fixed(initiate_tag: u32, initial_tsn: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(INIT_FIXED_LEN);
    v.extend_from_slice(&initiate_tag.to_be_bytes());
    v.extend_from_slice(&65536u32.to_be_bytes()); // a_rwnd
    v.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
    v.extend_from_slice(&1u16.to_be_bytes()); // max inbound streams
    v.extend_from_slice(&initial_tsn.to_be_bytes());
    v
}

/// An INIT opening an association: verification tag 0 (RFC 9260 §8.5.1),
/// `initiate_tag` (non-zero) identifies this probe.
pub fn init(src_port: u16, dst_port: u16, initiate_tag: u32) -> Vec<u8> {
    packet(
        src_port,
        dst_port,
        0,
        CHUNK_INIT,
        0,
        &init_fixed(initiate_tag, initiate_tag),
    )
}

/// An INIT ACK answering an INIT whose initiate tag was `peer_tag`; the
/// State Cookie carries `cookie` back to the prober.
pub fn init_ack(
    src_port: u16,
    dst_port: u16,
    peer_tag: u32,
    own_tag: u32,
    cookie: &[u8],
) -> Vec<u8> {
    let mut value = init_fixed(own_tag, own_tag);
    let param_len = u16::try_from(4 + cookie.len()).expect("State Cookie fits in 64 KiB");
    value.extend_from_slice(&PARAM_STATE_COOKIE.to_be_bytes());
    value.extend_from_slice(&param_len.to_be_bytes());
    value.extend_from_slice(cookie);
    // The chunk's own padding covers this last parameter's padding.
    packet(src_port, dst_port, peer_tag, CHUNK_INIT_ACK, 0, &value)
}

/// An ABORT refusing an INIT whose initiate tag was `peer_tag` (T bit
/// clear, tag = the INIT's initiate tag: RFC 9260 §8.4 rule 3).
pub fn abort(src_port: u16, dst_port: u16, peer_tag: u32) -> Vec<u8> {
    packet(src_port, dst_port, peer_tag, CHUNK_ABORT, 0, &[])
}

/// The parts of a received SCTP packet the harness cares about: its common
/// header and first chunk (our packets only ever carry one).
#[derive(Clone, Copy, Debug)]
pub struct Packet<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub vtag: u32,
    pub checksum_ok: bool,
    pub chunk_type: u8,
    pub chunk_flags: u8,
    /// The chunk's value, without its 4-byte header or padding.
    pub chunk_value: &'a [u8],
}

impl<'a> Packet<'a> {
    /// Parses an SCTP packet (no IP header); `None` if it is truncated.
    pub fn parse(buf: &'a [u8]) -> Option<Packet<'a>> {
        let header = buf.get(..COMMON_HEADER_LEN + 4)?;
        let be16 = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
        let chunk_len = usize::from(be16(14));
        let chunk_value = buf.get(COMMON_HEADER_LEN + 4..COMMON_HEADER_LEN + chunk_len)?;
        Some(Packet {
            src_port: be16(0),
            dst_port: be16(2),
            vtag: u32::from_be_bytes([header[4], header[5], header[6], header[7]]),
            checksum_ok: checksum_ok(buf),
            chunk_type: header[12],
            chunk_flags: header[13],
            chunk_value,
        })
    }

    /// The Initiate Tag of an INIT or INIT ACK chunk.
    pub fn initiate_tag(&self) -> Option<u32> {
        let v = self.chunk_value.get(..4)?;
        Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
    }

    /// The value of the first parameter of type `kind` of an INIT / INIT ACK.
    pub fn param(&self, kind: u16) -> Option<&'a [u8]> {
        let mut rest = self.chunk_value.get(INIT_FIXED_LEN..)?;
        while rest.len() >= 4 {
            let ty = u16::from_be_bytes([rest[0], rest[1]]);
            let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
            let value = rest.get(4..len)?;
            if ty == kind {
                return Some(value);
            }
            rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
        }
        None
    }
}

/// Splits what an IPv4 raw socket delivers (IP header included) into source,
/// destination and payload.
pub fn split_ipv4(buf: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, &[u8])> {
    if buf.len() < 20 || buf[0] >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(buf[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
    let dst = Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]);
    let payload = buf.get(header_len..total_len.min(buf.len()))?;
    Some((src, dst, payload))
}

/// A random non-zero 32-bit value, e.g. an initiate tag. std's hasher keys
/// are seeded from the OS and differ per `RandomState`, which is all the
/// randomness a probe nonce needs.
pub fn random_u32() -> u32 {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(SEQ.fetch_add(1, Ordering::Relaxed));
        let v = h.finish() as u32;
        if v != 0 {
            return v;
        }
    }
}

/// A source port for the next probe. Raw sockets have no port allocator, so
/// the harness walks a range from a random start: consecutive probes from a
/// process never reuse a port (and so never a conntrack entry) within
/// 28,000 probes, and repeated runs do not start at the same place.
pub fn next_source_port() -> u16 {
    const FIRST: u32 = 33_000;
    const SPAN: u32 = 28_000;
    static BASE: OnceLock<u32> = OnceLock::new();
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let base = *BASE.get_or_init(|| random_u32() % SPAN);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    (FIRST + (base + n) % SPAN) as u16
}
