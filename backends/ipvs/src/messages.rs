//! The IPVS generic netlink family (`include/uapi/linux/ip_vs.h`) as plain data.
//!
//! Every message is a Rust value with an explicit `encode` (append bytes to a buffer)
//! and `parse` (read them back). The byte layouts follow the kernel's
//! `net/netfilter/ipvs/ip_vs_ctl.c` netlink policy:
//!
//! * attributes are `struct nlattr` (u16 length, u16 type) followed by the value and zero
//!   padding to 4 bytes; nested attributes carry `NLA_F_NESTED` when kproxy writes them
//!   (the kernel's own replies leave it out, and the parser accepts both);
//! * integers are host-endian (`AF`, `PROTOCOL`: u16; `FWMARK`, `TIMEOUT`, `WEIGHT`,
//!   thresholds, connection counters: u32), except ports, which are network order
//!   (`__be16`);
//! * addresses are the raw bytes of `union nf_inet_addr`: always 16 bytes when kproxy
//!   writes them, an IPv4 address in the first 4 (the kernel writes 16 too);
//! * the scheduler name is a NUL-terminated string of at most 15 characters;
//! * service flags are `struct ip_vs_flags { u32 flags; u32 mask; }`, written with mask
//!   `0xffff_ffff` so a `SET_SERVICE` replaces every flag;
//! * the persistence netmask is the raw `__be32` of `struct ip_vs_service_user_kern`: for
//!   IPv4 a mask in network order, for IPv6 a prefix length that the kernel reads as a
//!   host-order integer (see [`VirtualService::netmask`]).
//!
//! A request's `encode` writes the generic netlink payload: the 4-byte `genlmsghdr`
//! (command, version 1, reserved) followed by the attributes. The netlink header around it
//! is the client's job ([`crate::client`]), so messages can be checked byte for byte here
//! without a kernel.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use netlink_packet_core::{NlasIterator, NLA_ALIGNTO, NLA_F_NESTED, NLA_HEADER_SIZE};
use netlink_packet_generic::constants::GENL_HDRLEN;

/// Name of the generic netlink family (`IPVS_GENL_NAME`).
pub const IPVS_GENL_NAME: &str = "IPVS";
/// Version written in every request's `genlmsghdr` (`IPVS_GENL_VERSION`).
pub const IPVS_GENL_VERSION: u8 = 1;
/// Longest scheduler name the kernel accepts, without the NUL (`IP_VS_SCHEDNAME_MAXLEN - 1`).
pub const SCHEDULER_NAME_MAX: usize = 15;

// Top-level attributes (IPVS_CMD_ATTR_*).
/// Nested service attributes.
pub const IPVS_CMD_ATTR_SERVICE: u16 = 1;
/// Nested destination attributes.
pub const IPVS_CMD_ATTR_DEST: u16 = 2;
/// Nested sync daemon attributes (not used by kproxy).
pub const IPVS_CMD_ATTR_DAEMON: u16 = 3;
/// TCP established timeout, seconds (u32).
pub const IPVS_CMD_ATTR_TIMEOUT_TCP: u16 = 4;
/// TCP FIN_WAIT timeout, seconds (u32).
pub const IPVS_CMD_ATTR_TIMEOUT_TCP_FIN: u16 = 5;
/// UDP timeout, seconds (u32).
pub const IPVS_CMD_ATTR_TIMEOUT_UDP: u16 = 6;

// Service attributes (IPVS_SVC_ATTR_*), inside IPVS_CMD_ATTR_SERVICE.
pub const IPVS_SVC_ATTR_AF: u16 = 1;
pub const IPVS_SVC_ATTR_PROTOCOL: u16 = 2;
pub const IPVS_SVC_ATTR_ADDR: u16 = 3;
pub const IPVS_SVC_ATTR_PORT: u16 = 4;
pub const IPVS_SVC_ATTR_FWMARK: u16 = 5;
pub const IPVS_SVC_ATTR_SCHED_NAME: u16 = 6;
pub const IPVS_SVC_ATTR_FLAGS: u16 = 7;
pub const IPVS_SVC_ATTR_TIMEOUT: u16 = 8;
pub const IPVS_SVC_ATTR_NETMASK: u16 = 9;
pub const IPVS_SVC_ATTR_STATS: u16 = 10;
pub const IPVS_SVC_ATTR_PE_NAME: u16 = 11;
pub const IPVS_SVC_ATTR_STATS64: u16 = 12;

// Destination attributes (IPVS_DEST_ATTR_*), inside IPVS_CMD_ATTR_DEST.
pub const IPVS_DEST_ATTR_ADDR: u16 = 1;
pub const IPVS_DEST_ATTR_PORT: u16 = 2;
pub const IPVS_DEST_ATTR_FWD_METHOD: u16 = 3;
pub const IPVS_DEST_ATTR_WEIGHT: u16 = 4;
pub const IPVS_DEST_ATTR_U_THRESH: u16 = 5;
pub const IPVS_DEST_ATTR_L_THRESH: u16 = 6;
pub const IPVS_DEST_ATTR_ACTIVE_CONNS: u16 = 7;
pub const IPVS_DEST_ATTR_INACT_CONNS: u16 = 8;
pub const IPVS_DEST_ATTR_PERSIST_CONNS: u16 = 9;
pub const IPVS_DEST_ATTR_STATS: u16 = 10;
pub const IPVS_DEST_ATTR_ADDR_FAMILY: u16 = 11;
pub const IPVS_DEST_ATTR_STATS64: u16 = 12;
pub const IPVS_DEST_ATTR_TUN_TYPE: u16 = 13;
pub const IPVS_DEST_ATTR_TUN_PORT: u16 = 14;
pub const IPVS_DEST_ATTR_TUN_FLAGS: u16 = 15;

// Statistics attributes (IPVS_STATS_ATTR_*), inside the STATS / STATS64 nests.
pub const IPVS_STATS_ATTR_CONNS: u16 = 1;
pub const IPVS_STATS_ATTR_INPKTS: u16 = 2;
pub const IPVS_STATS_ATTR_OUTPKTS: u16 = 3;
pub const IPVS_STATS_ATTR_INBYTES: u16 = 4;
pub const IPVS_STATS_ATTR_OUTBYTES: u16 = 5;
pub const IPVS_STATS_ATTR_CPS: u16 = 6;
pub const IPVS_STATS_ATTR_INPPS: u16 = 7;
pub const IPVS_STATS_ATTR_OUTPPS: u16 = 8;
pub const IPVS_STATS_ATTR_INBPS: u16 = 9;
pub const IPVS_STATS_ATTR_OUTBPS: u16 = 10;
/// Alignment padding the kernel may insert before 64-bit values; skipped.
pub const IPVS_STATS_ATTR_PAD: u16 = 11;

// GET_INFO reply attributes (IPVS_INFO_ATTR_*), at the top level.
pub const IPVS_INFO_ATTR_VERSION: u16 = 1;
pub const IPVS_INFO_ATTR_CONN_TAB_SIZE: u16 = 2;

/// `AF_INET`.
const AF_INET: u16 = 2;
/// `AF_INET6`.
const AF_INET6: u16 = 10;
/// Size of `union nf_inet_addr`.
const ADDR_LEN: usize = 16;

/// Why bytes did not parse as an IPVS message. Parsing never panics; malformed input of
/// any shape ends here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Fewer bytes than a fixed-size header needs.
    #[error("{what}: {have} bytes, at least {need} needed")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
    /// An attribute header is inconsistent with the bytes around it.
    #[error("malformed attribute in {context}: {reason}")]
    Attribute {
        context: &'static str,
        reason: String,
    },
    /// A required attribute is absent.
    #[error("{context}: missing attribute {attribute}")]
    Missing {
        context: &'static str,
        attribute: &'static str,
    },
    /// An attribute's value has the wrong size.
    #[error("attribute {attribute}: value of {len} bytes, expected {expected}")]
    Length {
        attribute: &'static str,
        len: usize,
        expected: &'static str,
    },
    /// An address family other than `AF_INET` / `AF_INET6`.
    #[error("unknown address family {0}")]
    Family(u16),
    /// A forwarding method outside 0..=4.
    #[error("unknown forwarding method {0}")]
    Forward(u32),
    /// The scheduler name is not UTF-8.
    #[error("attribute {0}: not a UTF-8 string")]
    String(&'static str),
    /// The generic netlink command is not one this message type carries.
    #[error("unexpected IPVS command {0} for this message")]
    Command(u8),
}

type Result<T, E = ParseError> = std::result::Result<T, E>;

/// A request the kernel would refuse for its shape alone; found before anything is sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    /// Scheduler names are 1 to 15 bytes, without NUL (`IP_VS_SCHEDNAME_MAXLEN`).
    #[error("scheduler name {0:?} must be 1 to 15 bytes without NUL")]
    SchedulerName(String),
}

// ---------------------------------------------------------------------------------------
// Plain data types
// ---------------------------------------------------------------------------------------

/// IPVS generic netlink commands (`IPVS_CMD_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Command {
    NewService = 1,
    SetService = 2,
    DelService = 3,
    GetService = 4,
    NewDest = 5,
    SetDest = 6,
    DelDest = 7,
    GetDest = 8,
    NewDaemon = 9,
    DelDaemon = 10,
    GetDaemon = 11,
    SetConfig = 12,
    GetConfig = 13,
    /// Only used as the command of `GET_INFO` replies.
    SetInfo = 14,
    GetInfo = 15,
    Zero = 16,
    Flush = 17,
}

impl Command {
    /// The command with this number, if there is one.
    pub fn from_u8(value: u8) -> Option<Command> {
        use Command::*;
        Some(match value {
            1 => NewService,
            2 => SetService,
            3 => DelService,
            4 => GetService,
            5 => NewDest,
            6 => SetDest,
            7 => DelDest,
            8 => GetDest,
            9 => NewDaemon,
            10 => DelDaemon,
            11 => GetDaemon,
            12 => SetConfig,
            13 => GetConfig,
            14 => SetInfo,
            15 => GetInfo,
            16 => Zero,
            17 => Flush,
            _ => return None,
        })
    }

    /// The uapi name without its `IPVS_CMD_` prefix, for messages and logs.
    pub fn name(self) -> &'static str {
        use Command::*;
        match self {
            NewService => "NEW_SERVICE",
            SetService => "SET_SERVICE",
            DelService => "DEL_SERVICE",
            GetService => "GET_SERVICE",
            NewDest => "NEW_DEST",
            SetDest => "SET_DEST",
            DelDest => "DEL_DEST",
            GetDest => "GET_DEST",
            NewDaemon => "NEW_DAEMON",
            DelDaemon => "DEL_DAEMON",
            GetDaemon => "GET_DAEMON",
            SetConfig => "SET_CONFIG",
            GetConfig => "GET_CONFIG",
            SetInfo => "SET_INFO",
            GetInfo => "GET_INFO",
            Zero => "ZERO",
            Flush => "FLUSH",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Address family of a service or destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddressFamily {
    Ipv4,
    Ipv6,
}

impl AddressFamily {
    /// The family of `addr`.
    pub fn of(addr: &IpAddr) -> AddressFamily {
        match addr {
            IpAddr::V4(_) => AddressFamily::Ipv4,
            IpAddr::V6(_) => AddressFamily::Ipv6,
        }
    }

    /// `AF_INET` (2) or `AF_INET6` (10).
    pub fn number(self) -> u16 {
        match self {
            AddressFamily::Ipv4 => AF_INET,
            AddressFamily::Ipv6 => AF_INET6,
        }
    }

    /// The family with this `AF_*` number.
    pub fn from_number(value: u16) -> Result<AddressFamily> {
        match value {
            AF_INET => Ok(AddressFamily::Ipv4),
            AF_INET6 => Ok(AddressFamily::Ipv6),
            other => Err(ParseError::Family(other)),
        }
    }

    /// `0.0.0.0` or `::`.
    pub fn unspecified(self) -> IpAddr {
        match self {
            AddressFamily::Ipv4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            AddressFamily::Ipv6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }

    /// The netmask that makes persistence per client address: `/32` (`0xffff_ffff`) for
    /// IPv4, `/128` (`128`) for IPv6. See [`VirtualService::netmask`].
    pub fn full_netmask(self) -> u32 {
        match self {
            AddressFamily::Ipv4 => u32::MAX,
            AddressFamily::Ipv6 => 128,
        }
    }
}

/// Transport protocol of a virtual service (an IANA protocol number on the wire, u16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// 6
    Tcp,
    /// 17
    Udp,
    /// 132
    Sctp,
    /// Any other number: parsed so a dump of services kproxy did not create never fails.
    Other(u16),
}

impl Protocol {
    /// The IANA protocol number.
    pub fn number(self) -> u16 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
            Protocol::Other(n) => n,
        }
    }

    /// The protocol with this number.
    pub fn from_number(value: u16) -> Protocol {
        match value {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            132 => Protocol::Sctp,
            n => Protocol::Other(n),
        }
    }
}

/// Virtual service flags (`IP_VS_SVC_F_*`).
///
/// [`VirtualService::flags`] never holds [`ServiceFlags::PERSISTENT`] (that is
/// [`VirtualService::persistent_timeout`]) nor [`ServiceFlags::HASHED`] (set by the
/// kernel on every service, dropped when parsing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ServiceFlags(pub u32);

impl ServiceFlags {
    /// Persistent service (client affinity for `timeout` seconds).
    pub const PERSISTENT: ServiceFlags = ServiceFlags(0x0001);
    /// Set by the kernel on every service in its table.
    pub const HASHED: ServiceFlags = ServiceFlags(0x0002);
    /// One-packet scheduling (UDP).
    pub const ONEPACKET: ServiceFlags = ServiceFlags(0x0004);
    /// Scheduler flag 1: `sh`/`mh` fallback to another destination when the chosen one is
    /// unavailable.
    pub const SCHED1: ServiceFlags = ServiceFlags(0x0008);
    /// Scheduler flag 2: `sh`/`mh` hash the source port too (kube-proxy sets it for `mh`).
    pub const SCHED2: ServiceFlags = ServiceFlags(0x0010);
    /// Scheduler flag 3.
    pub const SCHED3: ServiceFlags = ServiceFlags(0x0020);

    /// No flags.
    pub const fn empty() -> ServiceFlags {
        ServiceFlags(0)
    }

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: ServiceFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Bits of `self` or `other`.
    #[must_use]
    pub const fn union(self, other: ServiceFlags) -> ServiceFlags {
        ServiceFlags(self.0 | other.0)
    }

    /// Bits of `self` without those of `other`.
    #[must_use]
    pub const fn difference(self, other: ServiceFlags) -> ServiceFlags {
        ServiceFlags(self.0 & !other.0)
    }
}

/// Traffic counters and rates of a service or destination (read-only; from the kernel's
/// `STATS64` nest when present, else from the older `STATS` nest, whose packet and
/// connection counters are 32-bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Stats {
    pub conns: u64,
    pub in_packets: u64,
    pub out_packets: u64,
    pub in_bytes: u64,
    pub out_bytes: u64,
    /// Connections per second (estimator).
    pub cps: u64,
    pub in_pps: u64,
    pub out_pps: u64,
    pub in_bps: u64,
    pub out_bps: u64,
}

/// What identifies a virtual service in the kernel: protocol, address and port, or a
/// firewall mark (with its family).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceKey {
    /// Every service kproxy creates.
    Addr {
        protocol: Protocol,
        addr: IpAddr,
        port: u16,
    },
    /// A firewall-mark service (created by other tools; kproxy only lists them).
    Fwmark { family: AddressFamily, mark: u32 },
}

impl ServiceKey {
    /// The service's address family.
    pub fn family(&self) -> AddressFamily {
        match self {
            ServiceKey::Addr { addr, .. } => AddressFamily::of(addr),
            ServiceKey::Fwmark { family, .. } => *family,
        }
    }

    /// Appends the identifying attributes (the content of an `IPVS_CMD_ATTR_SERVICE` nest
    /// of a command that does not need a full service): `AF`, then `FWMARK` or
    /// `PROTOCOL`, `ADDR`, `PORT`.
    pub fn encode(&self, buf: &mut Vec<u8>) {
        put_u16(buf, IPVS_SVC_ATTR_AF, self.family().number());
        match *self {
            ServiceKey::Addr {
                protocol,
                addr,
                port,
            } => {
                put_u16(buf, IPVS_SVC_ATTR_PROTOCOL, protocol.number());
                put(buf, IPVS_SVC_ATTR_ADDR, &addr_bytes(&addr));
                put(buf, IPVS_SVC_ATTR_PORT, &port.to_be_bytes());
            }
            ServiceKey::Fwmark { mark, .. } => put_u32(buf, IPVS_SVC_ATTR_FWMARK, mark),
        }
    }

    /// Parses the content of an `IPVS_CMD_ATTR_SERVICE` nest; other attributes are
    /// ignored. Like the kernel, a `FWMARK` makes it a firewall-mark key.
    pub fn parse(nest: &[u8]) -> Result<ServiceKey> {
        let attrs = Attrs::parse(nest, "service")?;
        ServiceKey::from_attrs(&attrs)
    }

    fn from_attrs(attrs: &Attrs<'_>) -> Result<ServiceKey> {
        let family = AddressFamily::from_number(attrs.u16(IPVS_SVC_ATTR_AF, "IPVS_SVC_ATTR_AF")?)?;
        if let Some(mark) = attrs.opt_u32(IPVS_SVC_ATTR_FWMARK, "IPVS_SVC_ATTR_FWMARK")? {
            return Ok(ServiceKey::Fwmark { family, mark });
        }
        Ok(ServiceKey::Addr {
            protocol: Protocol::from_number(
                attrs.u16(IPVS_SVC_ATTR_PROTOCOL, "IPVS_SVC_ATTR_PROTOCOL")?,
            ),
            addr: parse_addr(
                family,
                attrs.required(IPVS_SVC_ATTR_ADDR, "IPVS_SVC_ATTR_ADDR")?,
                "IPVS_SVC_ATTR_ADDR",
            )?,
            port: attrs.be16(IPVS_SVC_ATTR_PORT, "IPVS_SVC_ATTR_PORT")?,
        })
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceKey::Addr {
                protocol,
                addr,
                port,
            } => {
                let proto = match protocol {
                    Protocol::Tcp => "TCP".to_string(),
                    Protocol::Udp => "UDP".to_string(),
                    Protocol::Sctp => "SCTP".to_string(),
                    Protocol::Other(n) => format!("proto-{n}"),
                };
                write!(f, "{proto} {}", SocketAddr::new(*addr, *port))
            }
            ServiceKey::Fwmark { family, mark } => write!(f, "FWM {mark} ({family:?})"),
        }
    }
}

impl From<&VirtualService> for ServiceKey {
    fn from(service: &VirtualService) -> ServiceKey {
        service.key()
    }
}

impl From<&ServiceKey> for ServiceKey {
    fn from(key: &ServiceKey) -> ServiceKey {
        *key
    }
}

/// An IPVS virtual service (`struct ip_vs_service_user_kern`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VirtualService {
    /// Virtual address. For a firewall-mark service, the unspecified address of its family.
    pub addr: IpAddr,
    /// For a firewall-mark service, TCP (the kernel's value).
    pub protocol: Protocol,
    /// For a firewall-mark service, 0.
    pub port: u16,
    /// `Some` for a firewall-mark service, which is then keyed by the mark alone.
    pub fwmark: Option<u32>,
    /// Scheduler name (`rr`, `wrr`, `lc`, `sh`, `mh`, …); at most 15 bytes.
    pub scheduler: String,
    /// `Some(seconds)`: a persistent service (`IP_VS_SVC_F_PERSISTENT` and `TIMEOUT`), how
    /// kube-proxy implements `sessionAffinity: ClientIP`.
    pub persistent_timeout: Option<u32>,
    /// Other flags; see [`ServiceFlags`].
    pub flags: ServiceFlags,
    /// Persistence granularity, exactly as the kernel stores it: for IPv4 a mask as a
    /// number (`0xffff_ffff` = /32, `0xffff_ff00` = /24), written in network order; for
    /// IPv6 a prefix length (`128`), written host-endian (the kernel compares it with 1..=128
    /// and rejects other values).
    pub netmask: u32,
    /// Read-only counters; `None` in requests (never encoded in them).
    pub stats: Option<Stats>,
}

impl VirtualService {
    /// A non-persistent service keyed by protocol, address and port, per-client netmask.
    pub fn new(
        protocol: Protocol,
        addr: IpAddr,
        port: u16,
        scheduler: impl Into<String>,
    ) -> VirtualService {
        VirtualService {
            addr,
            protocol,
            port,
            fwmark: None,
            scheduler: scheduler.into(),
            persistent_timeout: None,
            flags: ServiceFlags::empty(),
            netmask: AddressFamily::of(&addr).full_netmask(),
            stats: None,
        }
    }

    /// The same service, persistent for `seconds`.
    #[must_use]
    pub fn with_persistence(mut self, seconds: u32) -> VirtualService {
        self.persistent_timeout = Some(seconds);
        self
    }

    /// The service's address family.
    pub fn family(&self) -> AddressFamily {
        AddressFamily::of(&self.addr)
    }

    /// What identifies the service in requests about it.
    pub fn key(&self) -> ServiceKey {
        match self.fwmark {
            Some(mark) => ServiceKey::Fwmark {
                family: self.family(),
                mark,
            },
            None => ServiceKey::Addr {
                protocol: self.protocol,
                addr: self.addr,
                port: self.port,
            },
        }
    }

    /// Whether the configuration kproxy sets (scheduler, persistence, flags, netmask) is
    /// the same in both; keys and stats are not compared.
    pub fn same_config(&self, other: &VirtualService) -> bool {
        self.scheduler == other.scheduler
            && self.persistent_timeout == other.persistent_timeout
            && self.flags == other.flags
            && self.netmask == other.netmask
    }

    /// The `ip_vs_flags.flags` value written: [`Self::flags`] without the bits the kernel
    /// owns, plus `PERSISTENT` when [`Self::persistent_timeout`] is set. `HASHED` must not
    /// be sent: the kernel sets it when it hashes a new service and refuses to hash one
    /// that already carries it.
    pub fn wire_flags(&self) -> u32 {
        let flags = self
            .flags
            .difference(ServiceFlags::PERSISTENT.union(ServiceFlags::HASHED));
        match self.persistent_timeout {
            Some(_) => flags.union(ServiceFlags::PERSISTENT).0,
            None => flags.0,
        }
    }

    /// Appends a full service (the content of the `IPVS_CMD_ATTR_SERVICE` nest of
    /// `NEW_SERVICE` / `SET_SERVICE`): the key, then `SCHED_NAME`, `FLAGS`, `TIMEOUT`,
    /// `NETMASK` — the four the kernel requires of a full entry. Stats are not written.
    pub fn encode(&self, buf: &mut Vec<u8>) {
        self.key().encode(buf);
        put_str(buf, IPVS_SVC_ATTR_SCHED_NAME, &self.scheduler);
        let mut flags = [0u8; 8];
        flags[..4].copy_from_slice(&self.wire_flags().to_ne_bytes());
        flags[4..].copy_from_slice(&u32::MAX.to_ne_bytes());
        put(buf, IPVS_SVC_ATTR_FLAGS, &flags);
        put_u32(
            buf,
            IPVS_SVC_ATTR_TIMEOUT,
            self.persistent_timeout.unwrap_or(0),
        );
        put(
            buf,
            IPVS_SVC_ATTR_NETMASK,
            &netmask_bytes(self.family(), self.netmask),
        );
    }

    /// Parses the content of an `IPVS_CMD_ATTR_SERVICE` nest holding a full service (a
    /// `NEW_SERVICE` / `SET_SERVICE` request, or a kernel reply with stats).
    pub fn parse(nest: &[u8]) -> Result<VirtualService> {
        let attrs = Attrs::parse(nest, "service")?;
        let key = ServiceKey::from_attrs(&attrs)?;
        let family = key.family();
        let scheduler = attrs.string(IPVS_SVC_ATTR_SCHED_NAME, "IPVS_SVC_ATTR_SCHED_NAME")?;
        let flags = attrs.required(IPVS_SVC_ATTR_FLAGS, "IPVS_SVC_ATTR_FLAGS")?;
        let flags = ServiceFlags(read_u32(
            flags,
            "IPVS_SVC_ATTR_FLAGS",
            "8 (struct ip_vs_flags)",
        )?);
        let timeout = attrs.u32(IPVS_SVC_ATTR_TIMEOUT, "IPVS_SVC_ATTR_TIMEOUT")?;
        let netmask = attrs.required(IPVS_SVC_ATTR_NETMASK, "IPVS_SVC_ATTR_NETMASK")?;
        let netmask = parse_netmask(family, netmask)?;
        let stats = Stats::from_attrs(&attrs, IPVS_SVC_ATTR_STATS, IPVS_SVC_ATTR_STATS64)?;
        let (addr, protocol, port, fwmark) = match key {
            ServiceKey::Addr {
                protocol,
                addr,
                port,
            } => (addr, protocol, port, None),
            ServiceKey::Fwmark { family, mark } => {
                (family.unspecified(), Protocol::Tcp, 0, Some(mark))
            }
        };
        Ok(VirtualService {
            addr,
            protocol,
            port,
            fwmark,
            scheduler,
            persistent_timeout: flags.contains(ServiceFlags::PERSISTENT).then_some(timeout),
            flags: flags.difference(ServiceFlags::PERSISTENT.union(ServiceFlags::HASHED)),
            netmask,
            stats,
        })
    }

    /// Appends what the kernel writes for this service in a reply: the full service, plus
    /// `STATS64` when [`Self::stats`] is set. For fixtures and fakes of the kernel side.
    fn encode_reply(&self, buf: &mut Vec<u8>) {
        self.encode(buf);
        if let Some(stats) = &self.stats {
            stats.encode64(buf, IPVS_SVC_ATTR_STATS64);
        }
    }
}

/// How a destination receives packets (`IP_VS_CONN_F_FWD_MASK` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Forward {
    /// NAT (0): what kube-proxy and kproxy use.
    #[default]
    Masquerade,
    /// Local node (1).
    Local,
    /// IP-in-IP / GUE / GRE tunnel (2).
    Tunnel,
    /// Direct routing (3).
    DirectRoute,
    /// Cache bypass (4).
    Bypass,
}

impl Forward {
    /// The `IPVS_DEST_ATTR_FWD_METHOD` value.
    pub fn number(self) -> u32 {
        match self {
            Forward::Masquerade => 0,
            Forward::Local => 1,
            Forward::Tunnel => 2,
            Forward::DirectRoute => 3,
            Forward::Bypass => 4,
        }
    }

    /// The method with this value (after masking with `IP_VS_CONN_F_FWD_MASK`, as the
    /// kernel does).
    pub fn from_number(value: u32) -> Result<Forward> {
        match value & 0x7 {
            0 => Ok(Forward::Masquerade),
            1 => Ok(Forward::Local),
            2 => Ok(Forward::Tunnel),
            3 => Ok(Forward::DirectRoute),
            4 => Ok(Forward::Bypass),
            _ => Err(ParseError::Forward(value)),
        }
    }
}

/// Tunnel parameters of a [`Forward::Tunnel`] destination (kernel ≥ 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Tunnel {
    /// `IP_VS_CONN_F_TUNNEL_TYPE_*`: 0 IPIP, 1 GUE, 2 GRE.
    pub kind: u8,
    /// GUE destination port.
    pub port: u16,
    /// `IP_VS_TUNNEL_ENCAP_FLAG_*`: 1 checksum, 2 remote checksum offload.
    pub flags: u16,
}

/// A real server of a virtual service (`struct ip_vs_dest_user_kern` plus the kernel's
/// read-only counters).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    pub addr: IpAddr,
    pub port: u16,
    /// 0 stops new connections (graceful termination); the kernel rejects negative values.
    pub weight: i32,
    pub forward: Forward,
    /// Upper connection threshold (0 = none).
    pub upper_threshold: u32,
    /// Lower connection threshold (0 = none).
    pub lower_threshold: u32,
    /// Only written and parsed for [`Forward::Tunnel`].
    pub tunnel: Option<Tunnel>,
    /// Read-only (kernel replies): established connections.
    pub active_conns: u32,
    /// Read-only: connections in other states (TIME_WAIT, FIN_WAIT, UDP, …).
    pub inactive_conns: u32,
    /// Read-only: persistence templates pointing here.
    pub persist_conns: u32,
    /// Read-only counters; `None` in requests.
    pub stats: Option<Stats>,
}

impl Destination {
    /// A masquerading destination with `weight` and no thresholds.
    pub fn new(addr: IpAddr, port: u16, weight: i32) -> Destination {
        Destination {
            addr,
            port,
            weight,
            forward: Forward::Masquerade,
            upper_threshold: 0,
            lower_threshold: 0,
            tunnel: None,
            active_conns: 0,
            inactive_conns: 0,
            persist_conns: 0,
            stats: None,
        }
    }

    /// Address and port: what identifies a destination within its service.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.port)
    }

    /// Whether the configuration kproxy sets (weight, forwarding, thresholds, tunnel) is
    /// the same in both; addresses, counters and stats are not compared.
    pub fn same_config(&self, other: &Destination) -> bool {
        self.weight == other.weight
            && self.forward == other.forward
            && self.upper_threshold == other.upper_threshold
            && self.lower_threshold == other.lower_threshold
            && self.tunnel == other.tunnel
    }

    /// Appends a full destination (the content of the `IPVS_CMD_ATTR_DEST` nest of
    /// `NEW_DEST` / `SET_DEST`): `ADDR`, `PORT`, `ADDR_FAMILY`, `FWD_METHOD`, `WEIGHT`,
    /// `U_THRESH`, `L_THRESH`, and the tunnel attributes for a tunnel destination.
    /// Counters and stats are not written.
    pub fn encode(&self, buf: &mut Vec<u8>) {
        encode_dest_key(buf, &self.socket_addr());
        put_u32(buf, IPVS_DEST_ATTR_FWD_METHOD, self.forward.number());
        put(buf, IPVS_DEST_ATTR_WEIGHT, &self.weight.to_ne_bytes());
        put_u32(buf, IPVS_DEST_ATTR_U_THRESH, self.upper_threshold);
        put_u32(buf, IPVS_DEST_ATTR_L_THRESH, self.lower_threshold);
        if let (Forward::Tunnel, Some(tunnel)) = (self.forward, &self.tunnel) {
            put(buf, IPVS_DEST_ATTR_TUN_TYPE, &[tunnel.kind]);
            put(buf, IPVS_DEST_ATTR_TUN_PORT, &tunnel.port.to_be_bytes());
            put_u16(buf, IPVS_DEST_ATTR_TUN_FLAGS, tunnel.flags);
        }
    }

    /// Parses the content of an `IPVS_CMD_ATTR_DEST` nest holding a full destination.
    /// `ADDR_FAMILY` is required (every kernel since 3.18 sends it).
    pub fn parse(nest: &[u8]) -> Result<Destination> {
        let attrs = Attrs::parse(nest, "destination")?;
        let key = dest_key_from_attrs(&attrs)?;
        let forward = Forward::from_number(
            attrs.u32(IPVS_DEST_ATTR_FWD_METHOD, "IPVS_DEST_ATTR_FWD_METHOD")?,
        )?;
        let tunnel = match forward {
            Forward::Tunnel => Some(Tunnel {
                kind: match attrs.get(IPVS_DEST_ATTR_TUN_TYPE) {
                    Some(v) => *v.first().ok_or(ParseError::Length {
                        attribute: "IPVS_DEST_ATTR_TUN_TYPE",
                        len: 0,
                        expected: "1",
                    })?,
                    None => 0,
                },
                port: match attrs.get(IPVS_DEST_ATTR_TUN_PORT) {
                    Some(v) => u16::from_be_bytes(array(v, "IPVS_DEST_ATTR_TUN_PORT", "2")?),
                    None => 0,
                },
                flags: attrs
                    .opt_u16(IPVS_DEST_ATTR_TUN_FLAGS, "IPVS_DEST_ATTR_TUN_FLAGS")?
                    .unwrap_or(0),
            }),
            _ => None,
        };
        Ok(Destination {
            addr: key.ip(),
            port: key.port(),
            weight: attrs.u32(IPVS_DEST_ATTR_WEIGHT, "IPVS_DEST_ATTR_WEIGHT")? as i32,
            forward,
            upper_threshold: attrs.u32(IPVS_DEST_ATTR_U_THRESH, "IPVS_DEST_ATTR_U_THRESH")?,
            lower_threshold: attrs.u32(IPVS_DEST_ATTR_L_THRESH, "IPVS_DEST_ATTR_L_THRESH")?,
            tunnel,
            active_conns: attrs
                .opt_u32(IPVS_DEST_ATTR_ACTIVE_CONNS, "IPVS_DEST_ATTR_ACTIVE_CONNS")?
                .unwrap_or(0),
            inactive_conns: attrs
                .opt_u32(IPVS_DEST_ATTR_INACT_CONNS, "IPVS_DEST_ATTR_INACT_CONNS")?
                .unwrap_or(0),
            persist_conns: attrs
                .opt_u32(IPVS_DEST_ATTR_PERSIST_CONNS, "IPVS_DEST_ATTR_PERSIST_CONNS")?
                .unwrap_or(0),
            stats: Stats::from_attrs(&attrs, IPVS_DEST_ATTR_STATS, IPVS_DEST_ATTR_STATS64)?,
        })
    }

    /// Appends what the kernel writes for this destination in a dump: the full
    /// destination, the connection counters and `STATS64` when [`Self::stats`] is set.
    fn encode_reply(&self, buf: &mut Vec<u8>) {
        self.encode(buf);
        put_u32(buf, IPVS_DEST_ATTR_ACTIVE_CONNS, self.active_conns);
        put_u32(buf, IPVS_DEST_ATTR_INACT_CONNS, self.inactive_conns);
        put_u32(buf, IPVS_DEST_ATTR_PERSIST_CONNS, self.persist_conns);
        if let Some(stats) = &self.stats {
            stats.encode64(buf, IPVS_DEST_ATTR_STATS64);
        }
    }
}

/// Global IPVS connection timeouts in seconds (`IPVS_CMD_ATTR_TIMEOUT_*`). In a
/// `SET_CONFIG`, 0 leaves that timeout unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Timeouts {
    /// Established TCP connections (kernel default 900).
    pub tcp: u32,
    /// TCP after a FIN (kernel default 120).
    pub tcp_fin: u32,
    /// UDP (kernel default 300).
    pub udp: u32,
}

impl Timeouts {
    /// Appends `TIMEOUT_TCP`, `TIMEOUT_TCP_FIN`, `TIMEOUT_UDP` (top-level attributes).
    pub fn encode(&self, buf: &mut Vec<u8>) {
        put_u32(buf, IPVS_CMD_ATTR_TIMEOUT_TCP, self.tcp);
        put_u32(buf, IPVS_CMD_ATTR_TIMEOUT_TCP_FIN, self.tcp_fin);
        put_u32(buf, IPVS_CMD_ATTR_TIMEOUT_UDP, self.udp);
    }

    /// Parses top-level attributes; an absent timeout (a kernel built without that
    /// protocol) reads as 0.
    pub fn parse(attrs: &[u8]) -> Result<Timeouts> {
        let attrs = Attrs::parse(attrs, "config")?;
        Ok(Timeouts {
            tcp: attrs
                .opt_u32(IPVS_CMD_ATTR_TIMEOUT_TCP, "IPVS_CMD_ATTR_TIMEOUT_TCP")?
                .unwrap_or(0),
            tcp_fin: attrs
                .opt_u32(
                    IPVS_CMD_ATTR_TIMEOUT_TCP_FIN,
                    "IPVS_CMD_ATTR_TIMEOUT_TCP_FIN",
                )?
                .unwrap_or(0),
            udp: attrs
                .opt_u32(IPVS_CMD_ATTR_TIMEOUT_UDP, "IPVS_CMD_ATTR_TIMEOUT_UDP")?
                .unwrap_or(0),
        })
    }
}

/// The `GET_INFO` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Info {
    /// `IP_VS_VERSION_CODE`, `0x010201` = 1.2.1 on every current kernel.
    pub version: u32,
    /// Size of the connection hash table.
    pub conn_tab_size: u32,
}

impl Info {
    /// `(major, minor, patch)` of [`Self::version`].
    pub fn version_triple(&self) -> (u8, u8, u8) {
        let [_, major, minor, patch] = self.version.to_be_bytes();
        (major, minor, patch)
    }

    /// Appends `IPVS_INFO_ATTR_VERSION` and `IPVS_INFO_ATTR_CONN_TAB_SIZE`.
    pub fn encode(&self, buf: &mut Vec<u8>) {
        put_u32(buf, IPVS_INFO_ATTR_VERSION, self.version);
        put_u32(buf, IPVS_INFO_ATTR_CONN_TAB_SIZE, self.conn_tab_size);
    }

    /// Parses the reply's top-level attributes.
    pub fn parse(attrs: &[u8]) -> Result<Info> {
        let attrs = Attrs::parse(attrs, "info")?;
        Ok(Info {
            version: attrs.u32(IPVS_INFO_ATTR_VERSION, "IPVS_INFO_ATTR_VERSION")?,
            conn_tab_size: attrs
                .u32(IPVS_INFO_ATTR_CONN_TAB_SIZE, "IPVS_INFO_ATTR_CONN_TAB_SIZE")?,
        })
    }
}

impl Stats {
    /// Reads the `STATS64` nest if present, else the `STATS` nest, else `None`.
    fn from_attrs(attrs: &Attrs<'_>, stats: u16, stats64: u16) -> Result<Option<Stats>> {
        match attrs.get(stats64).or_else(|| attrs.get(stats)) {
            Some(nest) => Stats::parse(nest).map(Some),
            None => Ok(None),
        }
    }

    /// Parses the content of a `STATS` or `STATS64` nest: each counter is read as a u32
    /// or a u64 by its length; padding and unknown attributes are skipped.
    pub fn parse(nest: &[u8]) -> Result<Stats> {
        let attrs = Attrs::parse(nest, "stats")?;
        let counter = |kind: u16, name: &'static str| -> Result<u64> {
            match attrs.get(kind) {
                None => Ok(0),
                Some(v) if v.len() == 4 => {
                    Ok(u64::from(u32::from_ne_bytes(array(v, name, "4 or 8")?)))
                }
                Some(v) => Ok(u64::from_ne_bytes(array(v, name, "4 or 8")?)),
            }
        };
        Ok(Stats {
            conns: counter(IPVS_STATS_ATTR_CONNS, "IPVS_STATS_ATTR_CONNS")?,
            in_packets: counter(IPVS_STATS_ATTR_INPKTS, "IPVS_STATS_ATTR_INPKTS")?,
            out_packets: counter(IPVS_STATS_ATTR_OUTPKTS, "IPVS_STATS_ATTR_OUTPKTS")?,
            in_bytes: counter(IPVS_STATS_ATTR_INBYTES, "IPVS_STATS_ATTR_INBYTES")?,
            out_bytes: counter(IPVS_STATS_ATTR_OUTBYTES, "IPVS_STATS_ATTR_OUTBYTES")?,
            cps: counter(IPVS_STATS_ATTR_CPS, "IPVS_STATS_ATTR_CPS")?,
            in_pps: counter(IPVS_STATS_ATTR_INPPS, "IPVS_STATS_ATTR_INPPS")?,
            out_pps: counter(IPVS_STATS_ATTR_OUTPPS, "IPVS_STATS_ATTR_OUTPPS")?,
            in_bps: counter(IPVS_STATS_ATTR_INBPS, "IPVS_STATS_ATTR_INBPS")?,
            out_bps: counter(IPVS_STATS_ATTR_OUTBPS, "IPVS_STATS_ATTR_OUTBPS")?,
        })
    }

    /// Appends a 64-bit stats nest of type `kind`.
    fn encode64(&self, buf: &mut Vec<u8>, kind: u16) {
        let nest = begin_nest(buf, kind);
        for (attr, value) in [
            (IPVS_STATS_ATTR_CONNS, self.conns),
            (IPVS_STATS_ATTR_INPKTS, self.in_packets),
            (IPVS_STATS_ATTR_OUTPKTS, self.out_packets),
            (IPVS_STATS_ATTR_INBYTES, self.in_bytes),
            (IPVS_STATS_ATTR_OUTBYTES, self.out_bytes),
            (IPVS_STATS_ATTR_CPS, self.cps),
            (IPVS_STATS_ATTR_INPPS, self.in_pps),
            (IPVS_STATS_ATTR_OUTPPS, self.out_pps),
            (IPVS_STATS_ATTR_INBPS, self.in_bps),
            (IPVS_STATS_ATTR_OUTBPS, self.out_bps),
        ] {
            put(buf, attr, &value.to_ne_bytes());
        }
        end_nest(buf, nest);
    }
}

// ---------------------------------------------------------------------------------------
// Requests and replies
// ---------------------------------------------------------------------------------------

/// One request to the kernel. [`IpvsRequest::encode`] writes its generic netlink payload;
/// the client frames it and picks the netlink flags ([`IpvsRequest::is_dump`]).
///
/// IPVS has no transactions: the kernel applies each request on its own, in order, and
/// answers each with its own acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IpvsRequest {
    /// Create a service (`EEXIST` if it exists; `ENOENT` for an unknown scheduler).
    NewService(VirtualService),
    /// Replace an existing service's scheduler, flags, timeout and netmask (`ESRCH` if
    /// absent). Its destinations and connections stay.
    SetService(VirtualService),
    /// Delete a service with its destinations (`ESRCH` if absent). Its connections are
    /// dropped at once.
    DelService(ServiceKey),
    /// Read one service (reply: [`IpvsReply::Service`]; `ESRCH` if absent).
    GetService(ServiceKey),
    /// List every service of the namespace (a dump; replies: [`IpvsReply::Service`]).
    DumpServices,
    /// Add a destination (`EEXIST` if present; `ESRCH` without the service).
    NewDest {
        service: ServiceKey,
        dest: Destination,
    },
    /// Change a destination's weight, thresholds or forwarding (`ENOENT` if absent).
    SetDest {
        service: ServiceKey,
        dest: Destination,
    },
    /// Delete a destination (`ENOENT` if absent).
    DelDest {
        service: ServiceKey,
        dest: SocketAddr,
    },
    /// List a service's destinations (a dump; replies: [`IpvsReply::Destination`]; empty
    /// when the service does not exist).
    DumpDests(ServiceKey),
    /// Read the version and connection table size (reply: [`IpvsReply::Info`]).
    GetInfo,
    /// Read the global timeouts (reply: [`IpvsReply::Config`]).
    GetConfig,
    /// Set the global timeouts (0 = unchanged).
    SetConfig(Timeouts),
    /// Zero the counters of one service, or of everything.
    Zero(Option<ServiceKey>),
    /// Delete every service and destination of the namespace.
    Flush,
}

impl IpvsRequest {
    /// The generic netlink command.
    pub fn command(&self) -> Command {
        match self {
            IpvsRequest::NewService(_) => Command::NewService,
            IpvsRequest::SetService(_) => Command::SetService,
            IpvsRequest::DelService(_) => Command::DelService,
            IpvsRequest::GetService(_) | IpvsRequest::DumpServices => Command::GetService,
            IpvsRequest::NewDest { .. } => Command::NewDest,
            IpvsRequest::SetDest { .. } => Command::SetDest,
            IpvsRequest::DelDest { .. } => Command::DelDest,
            IpvsRequest::DumpDests(_) => Command::GetDest,
            IpvsRequest::GetInfo => Command::GetInfo,
            IpvsRequest::GetConfig => Command::GetConfig,
            IpvsRequest::SetConfig(_) => Command::SetConfig,
            IpvsRequest::Zero(_) => Command::Zero,
            IpvsRequest::Flush => Command::Flush,
        }
    }

    /// Whether the request is a dump (sent with `NLM_F_DUMP`, answered by a series of
    /// messages and `NLMSG_DONE`).
    pub fn is_dump(&self) -> bool {
        matches!(self, IpvsRequest::DumpServices | IpvsRequest::DumpDests(_))
    }

    /// Whether the kernel answers with an acknowledgement only (no data): the requests
    /// that can go in a batch.
    pub fn is_ack_only(&self) -> bool {
        !self.is_dump()
            && !matches!(
                self,
                IpvsRequest::GetService(_) | IpvsRequest::GetInfo | IpvsRequest::GetConfig
            )
    }

    /// Checks what the kernel would otherwise reject with a bare `EINVAL`, and what
    /// [`Self::encode`] cannot represent: scheduler names must be 1..=15 bytes without NUL.
    pub fn validate(&self) -> std::result::Result<(), InvalidRequest> {
        match self {
            IpvsRequest::NewService(s) | IpvsRequest::SetService(s) => {
                let name = &s.scheduler;
                if name.is_empty() || name.len() > SCHEDULER_NAME_MAX || name.contains('\0') {
                    return Err(InvalidRequest::SchedulerName(name.clone()));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Appends the generic netlink payload: `genlmsghdr` (command, version 1, 0) and the
    /// attributes. Call [`Self::validate`] first: an over-long scheduler name is encoded
    /// as is and refused by the kernel.
    pub fn encode(&self, buf: &mut Vec<u8>) {
        put_genl_header(buf, self.command());
        match self {
            IpvsRequest::NewService(s) | IpvsRequest::SetService(s) => {
                let nest = begin_nest(buf, IPVS_CMD_ATTR_SERVICE);
                s.encode(buf);
                end_nest(buf, nest);
            }
            IpvsRequest::DelService(key)
            | IpvsRequest::GetService(key)
            | IpvsRequest::DumpDests(key)
            | IpvsRequest::Zero(Some(key)) => encode_service_key(buf, key),
            IpvsRequest::NewDest { service, dest } | IpvsRequest::SetDest { service, dest } => {
                encode_service_key(buf, service);
                let nest = begin_nest(buf, IPVS_CMD_ATTR_DEST);
                dest.encode(buf);
                end_nest(buf, nest);
            }
            IpvsRequest::DelDest { service, dest } => {
                encode_service_key(buf, service);
                let nest = begin_nest(buf, IPVS_CMD_ATTR_DEST);
                encode_dest_key(buf, dest);
                end_nest(buf, nest);
            }
            IpvsRequest::SetConfig(timeouts) => timeouts.encode(buf),
            IpvsRequest::DumpServices
            | IpvsRequest::GetInfo
            | IpvsRequest::GetConfig
            | IpvsRequest::Zero(None)
            | IpvsRequest::Flush => {}
        }
    }

    /// Parses a generic netlink payload written by [`Self::encode`] (or another IPVS
    /// client). `GET_SERVICE` without a service is read as [`IpvsRequest::DumpServices`].
    pub fn parse(payload: &[u8]) -> Result<IpvsRequest> {
        let (command, attrs) = split_genl(payload)?;
        let attrs = Attrs::parse(attrs, "request")?;
        let service = || attrs.required(IPVS_CMD_ATTR_SERVICE, "IPVS_CMD_ATTR_SERVICE");
        let dest = || attrs.required(IPVS_CMD_ATTR_DEST, "IPVS_CMD_ATTR_DEST");
        let command = Command::from_u8(command).ok_or(ParseError::Command(command))?;
        Ok(match command {
            Command::NewService => IpvsRequest::NewService(VirtualService::parse(service()?)?),
            Command::SetService => IpvsRequest::SetService(VirtualService::parse(service()?)?),
            Command::DelService => IpvsRequest::DelService(ServiceKey::parse(service()?)?),
            Command::GetService => match attrs.get(IPVS_CMD_ATTR_SERVICE) {
                Some(nest) => IpvsRequest::GetService(ServiceKey::parse(nest)?),
                None => IpvsRequest::DumpServices,
            },
            Command::NewDest => IpvsRequest::NewDest {
                service: ServiceKey::parse(service()?)?,
                dest: Destination::parse(dest()?)?,
            },
            Command::SetDest => IpvsRequest::SetDest {
                service: ServiceKey::parse(service()?)?,
                dest: Destination::parse(dest()?)?,
            },
            Command::DelDest => IpvsRequest::DelDest {
                service: ServiceKey::parse(service()?)?,
                dest: dest_key_from_attrs(&Attrs::parse(dest()?, "destination")?)?,
            },
            Command::GetDest => IpvsRequest::DumpDests(ServiceKey::parse(service()?)?),
            Command::GetInfo => IpvsRequest::GetInfo,
            Command::GetConfig => IpvsRequest::GetConfig,
            Command::SetConfig => IpvsRequest::SetConfig(Timeouts::parse(attrs.bytes)?),
            Command::Zero => IpvsRequest::Zero(
                attrs
                    .get(IPVS_CMD_ATTR_SERVICE)
                    .map(ServiceKey::parse)
                    .transpose()?,
            ),
            Command::Flush => IpvsRequest::Flush,
            Command::NewDaemon | Command::DelDaemon | Command::GetDaemon | Command::SetInfo => {
                return Err(ParseError::Command(command as u8))
            }
        })
    }
}

/// One data message from the kernel (dump entries and `GET_*` replies; acknowledgements
/// and errors are netlink-level and handled by the client).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IpvsReply {
    /// `NEW_SERVICE` with a service nest: a `GET_SERVICE` reply or dump entry.
    Service(VirtualService),
    /// `NEW_DEST` with a destination nest: a `GET_DEST` dump entry.
    Destination(Destination),
    /// `SET_INFO`: the `GET_INFO` reply.
    Info(Info),
    /// `SET_CONFIG`: the `GET_CONFIG` reply.
    Config(Timeouts),
}

impl IpvsReply {
    /// The command the kernel uses for this reply.
    pub fn command(&self) -> Command {
        match self {
            IpvsReply::Service(_) => Command::NewService,
            IpvsReply::Destination(_) => Command::NewDest,
            IpvsReply::Info(_) => Command::SetInfo,
            IpvsReply::Config(_) => Command::SetConfig,
        }
    }

    /// Appends the generic netlink payload the kernel would send (with stats and
    /// counters). For tests and fakes of the kernel side; the kernel itself writes nests
    /// without `NLA_F_NESTED` and pads 64-bit stats, both of which [`Self::parse`] accepts.
    pub fn encode(&self, buf: &mut Vec<u8>) {
        put_genl_header(buf, self.command());
        match self {
            IpvsReply::Service(s) => {
                let nest = begin_nest(buf, IPVS_CMD_ATTR_SERVICE);
                s.encode_reply(buf);
                end_nest(buf, nest);
            }
            IpvsReply::Destination(d) => {
                let nest = begin_nest(buf, IPVS_CMD_ATTR_DEST);
                d.encode_reply(buf);
                end_nest(buf, nest);
            }
            IpvsReply::Info(info) => info.encode(buf),
            IpvsReply::Config(timeouts) => timeouts.encode(buf),
        }
    }

    /// Parses the generic netlink payload of a kernel message of the IPVS family.
    pub fn parse(payload: &[u8]) -> Result<IpvsReply> {
        let (command, attrs) = split_genl(payload)?;
        match Command::from_u8(command) {
            Some(Command::NewService) => {
                let attrs = Attrs::parse(attrs, "reply")?;
                let nest = attrs.required(IPVS_CMD_ATTR_SERVICE, "IPVS_CMD_ATTR_SERVICE")?;
                Ok(IpvsReply::Service(VirtualService::parse(nest)?))
            }
            Some(Command::NewDest) => {
                let attrs = Attrs::parse(attrs, "reply")?;
                let nest = attrs.required(IPVS_CMD_ATTR_DEST, "IPVS_CMD_ATTR_DEST")?;
                Ok(IpvsReply::Destination(Destination::parse(nest)?))
            }
            Some(Command::SetInfo) => Ok(IpvsReply::Info(Info::parse(attrs)?)),
            Some(Command::SetConfig) => Ok(IpvsReply::Config(Timeouts::parse(attrs)?)),
            _ => Err(ParseError::Command(command)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Attribute encoding
// ---------------------------------------------------------------------------------------

/// Appends `genlmsghdr`: command, version, two reserved bytes.
fn put_genl_header(buf: &mut Vec<u8>, command: Command) {
    buf.extend_from_slice(&[command as u8, IPVS_GENL_VERSION, 0, 0]);
}

/// Zero bytes up to the next 4-byte boundary.
fn pad(buf: &mut Vec<u8>) {
    buf.resize(buf.len().next_multiple_of(NLA_ALIGNTO), 0);
}

/// Saturates instead of wrapping: an attribute that long cannot be valid anyway, and
/// [`IpvsRequest::validate`] keeps kproxy's own requests far below the limit.
fn nla_len(len: usize) -> [u8; 2] {
    u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes()
}

/// Appends one attribute: length, type, value, padding.
fn put(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    buf.extend_from_slice(&nla_len(NLA_HEADER_SIZE + value.len()));
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    pad(buf);
}

fn put_u16(buf: &mut Vec<u8>, kind: u16, value: u16) {
    put(buf, kind, &value.to_ne_bytes());
}

fn put_u32(buf: &mut Vec<u8>, kind: u16, value: u32) {
    put(buf, kind, &value.to_ne_bytes());
}

/// A NUL-terminated string.
fn put_str(buf: &mut Vec<u8>, kind: u16, value: &str) {
    buf.extend_from_slice(&nla_len(NLA_HEADER_SIZE + value.len() + 1));
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value.as_bytes());
    buf.push(0);
    pad(buf);
}

/// Starts a nested attribute with `NLA_F_NESTED`; returns where it starts.
fn begin_nest(buf: &mut Vec<u8>, kind: u16) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    start
}

/// Writes the length of the nest started at `start` (its header and padded content).
fn end_nest(buf: &mut [u8], start: usize) {
    let len = nla_len(buf.len() - start);
    if let Some(field) = buf.get_mut(start..start + 2) {
        field.copy_from_slice(&len);
    }
}

fn encode_service_key(buf: &mut Vec<u8>, key: &ServiceKey) {
    let nest = begin_nest(buf, IPVS_CMD_ATTR_SERVICE);
    key.encode(buf);
    end_nest(buf, nest);
}

/// `ADDR`, `PORT`, `ADDR_FAMILY`: what identifies a destination.
fn encode_dest_key(buf: &mut Vec<u8>, dest: &SocketAddr) {
    put(buf, IPVS_DEST_ATTR_ADDR, &addr_bytes(&dest.ip()));
    put(buf, IPVS_DEST_ATTR_PORT, &dest.port().to_be_bytes());
    put_u16(
        buf,
        IPVS_DEST_ATTR_ADDR_FAMILY,
        AddressFamily::of(&dest.ip()).number(),
    );
}

/// `union nf_inet_addr`: 16 bytes, IPv4 in the first 4.
fn addr_bytes(addr: &IpAddr) -> [u8; ADDR_LEN] {
    let mut out = [0u8; ADDR_LEN];
    match addr {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

fn netmask_bytes(family: AddressFamily, netmask: u32) -> [u8; 4] {
    match family {
        AddressFamily::Ipv4 => netmask.to_be_bytes(),
        AddressFamily::Ipv6 => netmask.to_ne_bytes(),
    }
}

// ---------------------------------------------------------------------------------------
// Attribute parsing
// ---------------------------------------------------------------------------------------

/// The attributes of one level, as (type without flags, value). Built with
/// `netlink-packet-core`'s checked iterator, so a length pointing past the buffer is an
/// error, never a panic. As in the kernel's `nla_parse`, the last of duplicates wins.
struct Attrs<'a> {
    bytes: &'a [u8],
    context: &'static str,
    list: Vec<(u16, &'a [u8])>,
}

impl<'a> Attrs<'a> {
    fn parse(bytes: &'a [u8], context: &'static str) -> Result<Attrs<'a>> {
        let mut list = Vec::new();
        for nla in NlasIterator::new(bytes) {
            let nla = nla.map_err(|e| ParseError::Attribute {
                context,
                reason: e.to_string(),
            })?;
            let (kind, len) = (nla.kind(), usize::from(nla.length()));
            // new_checked guarantees NLA_HEADER_SIZE <= len <= the bytes left.
            let value = nla.into_inner().get(NLA_HEADER_SIZE..len).ok_or_else(|| {
                ParseError::Attribute {
                    context,
                    reason: format!("attribute length {len}"),
                }
            })?;
            list.push((kind, value));
        }
        Ok(Attrs {
            bytes,
            context,
            list,
        })
    }

    fn get(&self, kind: u16) -> Option<&'a [u8]> {
        self.list
            .iter()
            .rev()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| *v)
    }

    fn required(&self, kind: u16, name: &'static str) -> Result<&'a [u8]> {
        self.get(kind).ok_or(ParseError::Missing {
            context: self.context,
            attribute: name,
        })
    }

    fn u16(&self, kind: u16, name: &'static str) -> Result<u16> {
        Ok(u16::from_ne_bytes(array(
            self.required(kind, name)?,
            name,
            "2",
        )?))
    }

    fn opt_u16(&self, kind: u16, name: &'static str) -> Result<Option<u16>> {
        self.get(kind)
            .map(|v| array(v, name, "2").map(u16::from_ne_bytes))
            .transpose()
    }

    fn be16(&self, kind: u16, name: &'static str) -> Result<u16> {
        Ok(u16::from_be_bytes(array(
            self.required(kind, name)?,
            name,
            "2",
        )?))
    }

    fn u32(&self, kind: u16, name: &'static str) -> Result<u32> {
        read_u32(self.required(kind, name)?, name, "4")
    }

    fn opt_u32(&self, kind: u16, name: &'static str) -> Result<Option<u32>> {
        self.get(kind).map(|v| read_u32(v, name, "4")).transpose()
    }

    /// A NUL-terminated string (everything up to the first NUL).
    fn string(&self, kind: u16, name: &'static str) -> Result<String> {
        let value = self.required(kind, name)?;
        let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
        std::str::from_utf8(&value[..end])
            .map(str::to_owned)
            .map_err(|_| ParseError::String(name))
    }
}

/// The first `N` bytes of `value` (like the kernel's `nla_get_*`, a longer value is
/// accepted; a shorter one is an error).
fn array<const N: usize>(
    value: &[u8],
    attribute: &'static str,
    expected: &'static str,
) -> Result<[u8; N]> {
    value
        .get(..N)
        .and_then(|b| b.try_into().ok())
        .ok_or(ParseError::Length {
            attribute,
            len: value.len(),
            expected,
        })
}

fn read_u32(value: &[u8], attribute: &'static str, expected: &'static str) -> Result<u32> {
    array(value, attribute, expected).map(u32::from_ne_bytes)
}

fn parse_addr(family: AddressFamily, value: &[u8], attribute: &'static str) -> Result<IpAddr> {
    Ok(match family {
        AddressFamily::Ipv4 => IpAddr::V4(Ipv4Addr::from(array::<4>(value, attribute, "4 or 16")?)),
        AddressFamily::Ipv6 => IpAddr::V6(Ipv6Addr::from(array::<16>(value, attribute, "16")?)),
    })
}

fn parse_netmask(family: AddressFamily, value: &[u8]) -> Result<u32> {
    let bytes = array::<4>(value, "IPVS_SVC_ATTR_NETMASK", "4")?;
    Ok(match family {
        AddressFamily::Ipv4 => u32::from_be_bytes(bytes),
        AddressFamily::Ipv6 => u32::from_ne_bytes(bytes),
    })
}

fn dest_key_from_attrs(attrs: &Attrs<'_>) -> Result<SocketAddr> {
    let family = AddressFamily::from_number(
        attrs.u16(IPVS_DEST_ATTR_ADDR_FAMILY, "IPVS_DEST_ATTR_ADDR_FAMILY")?,
    )?;
    let addr = parse_addr(
        family,
        attrs.required(IPVS_DEST_ATTR_ADDR, "IPVS_DEST_ATTR_ADDR")?,
        "IPVS_DEST_ATTR_ADDR",
    )?;
    Ok(SocketAddr::new(
        addr,
        attrs.be16(IPVS_DEST_ATTR_PORT, "IPVS_DEST_ATTR_PORT")?,
    ))
}

/// Splits a generic netlink payload into its command and its attributes.
fn split_genl(payload: &[u8]) -> Result<(u8, &[u8])> {
    match payload.split_first() {
        Some((&command, _)) if payload.len() >= GENL_HDRLEN => {
            Ok((command, &payload[GENL_HDRLEN..]))
        }
        _ => Err(ParseError::Truncated {
            what: "genetlink header",
            need: GENL_HDRLEN,
            have: payload.len(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test socket address")
    }

    fn round_trip(request: &IpvsRequest) -> Vec<u8> {
        let mut buf = Vec::new();
        request.encode(&mut buf);
        assert_eq!(
            buf.len() % 4,
            0,
            "payload of {request:?} is not 4-byte aligned"
        );
        let parsed = IpvsRequest::parse(&buf).expect("own encoding parses");
        assert_eq!(&parsed, request);
        buf
    }

    fn services() -> Vec<VirtualService> {
        let mut out = Vec::new();
        for addr in ["10.96.0.10", "fd00:10:96::a"] {
            for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
                let plain = VirtualService::new(protocol, ip(addr), 53, "rr");
                out.push(plain.clone().with_persistence(10800));
                out.push(plain);
            }
        }
        let mut mh = VirtualService::new(Protocol::Tcp, ip("192.168.1.10"), 30080, "mh");
        mh.flags = ServiceFlags::SCHED1.union(ServiceFlags::SCHED2);
        mh.netmask = 0xffff_ff00;
        out.push(mh);
        let mut v6 = VirtualService::new(Protocol::Udp, ip("2001:db8::1"), 443, "sh");
        v6.netmask = 64;
        out.push(v6.with_persistence(60));
        out
    }

    fn destinations() -> Vec<Destination> {
        let mut tunnel = Destination::new(ip("10.0.0.7"), 80, 3);
        tunnel.forward = Forward::Tunnel;
        tunnel.tunnel = Some(Tunnel {
            kind: 1,
            port: 6080,
            flags: 1,
        });
        let mut thresholds = Destination::new(ip("fd00:10:244::5"), 8443, 0);
        thresholds.upper_threshold = 1000;
        thresholds.lower_threshold = 10;
        vec![
            Destination::new(ip("10.244.1.5"), 8080, 1),
            Destination::new(ip("fd00:10:244::7"), 53, 1),
            tunnel,
            thresholds,
        ]
    }

    #[test]
    fn service_requests_round_trip() {
        for svc in services() {
            round_trip(&IpvsRequest::NewService(svc.clone()));
            round_trip(&IpvsRequest::SetService(svc.clone()));
            round_trip(&IpvsRequest::DelService(svc.key()));
            round_trip(&IpvsRequest::GetService(svc.key()));
            round_trip(&IpvsRequest::DumpDests(svc.key()));
            round_trip(&IpvsRequest::Zero(Some(svc.key())));
        }
    }

    #[test]
    fn destination_requests_round_trip() {
        for svc in services() {
            for dest in destinations() {
                let service = svc.key();
                round_trip(&IpvsRequest::NewDest {
                    service,
                    dest: dest.clone(),
                });
                round_trip(&IpvsRequest::SetDest {
                    service,
                    dest: dest.clone(),
                });
                round_trip(&IpvsRequest::DelDest {
                    service,
                    dest: dest.socket_addr(),
                });
            }
        }
    }

    #[test]
    fn global_requests_round_trip() {
        for request in [
            IpvsRequest::DumpServices,
            IpvsRequest::GetInfo,
            IpvsRequest::GetConfig,
            IpvsRequest::SetConfig(Timeouts {
                tcp: 900,
                tcp_fin: 120,
                udp: 300,
            }),
            IpvsRequest::SetConfig(Timeouts::default()),
            IpvsRequest::Zero(None),
            IpvsRequest::Flush,
        ] {
            let bytes = round_trip(&request);
            if !matches!(request, IpvsRequest::SetConfig(_)) {
                assert_eq!(bytes.len(), GENL_HDRLEN, "{request:?} has no attributes");
            }
        }
    }

    #[test]
    fn fwmark_services_round_trip() {
        let mut svc = VirtualService::new(Protocol::Tcp, ip("::"), 0, "wlc");
        svc.fwmark = Some(0x4000);
        round_trip(&IpvsRequest::NewService(svc.clone()));
        round_trip(&IpvsRequest::DelService(svc.key()));
        assert_eq!(
            svc.key(),
            ServiceKey::Fwmark {
                family: AddressFamily::Ipv6,
                mark: 0x4000
            }
        );
    }

    #[test]
    fn commands_and_flags_of_requests() {
        let svc = VirtualService::new(Protocol::Tcp, ip("10.0.0.1"), 80, "rr");
        assert_eq!(IpvsRequest::DumpServices.command(), Command::GetService);
        assert!(IpvsRequest::DumpServices.is_dump());
        assert!(IpvsRequest::DumpDests(svc.key()).is_dump());
        assert!(!IpvsRequest::GetService(svc.key()).is_dump());
        assert!(!IpvsRequest::GetService(svc.key()).is_ack_only());
        assert!(!IpvsRequest::GetInfo.is_ack_only());
        assert!(IpvsRequest::NewService(svc.clone()).is_ack_only());
        assert!(IpvsRequest::Flush.is_ack_only());
        for n in 0..=u8::MAX {
            if let Some(command) = Command::from_u8(n) {
                assert_eq!(command as u8, n);
                assert!(!command.name().is_empty());
            }
        }
        assert_eq!(Command::from_u8(0), None);
        assert_eq!(Command::from_u8(18), None);
    }

    /// The whole `NEW_SERVICE` payload for 10.96.0.10:80/TCP, rr, not persistent, computed
    /// by hand from `ip_vs.h` (little-endian host).
    #[cfg(target_endian = "little")]
    #[test]
    fn new_service_bytes_match_the_hand_computed_layout() {
        let svc = VirtualService::new(Protocol::Tcp, ip("10.96.0.10"), 80, "rr");
        let mut buf = Vec::new();
        IpvsRequest::NewService(svc).encode(&mut buf);
        #[rustfmt::skip]
        let expected: &[u8] = &[
            1, 1, 0, 0,                         // genlmsghdr: NEW_SERVICE, version 1
            84, 0, 0x01, 0x80,                  // IPVS_CMD_ATTR_SERVICE | NLA_F_NESTED, 84 bytes
            6, 0, 1, 0,   2, 0, 0, 0,           // AF = AF_INET (u16) + 2 padding
            6, 0, 2, 0,   6, 0, 0, 0,           // PROTOCOL = 6 (u16) + padding
            20, 0, 3, 0,  10, 96, 0, 10,        // ADDR: 16 bytes, IPv4 first
            0, 0, 0, 0,   0, 0, 0, 0,   0, 0, 0, 0,
            6, 0, 4, 0,   0, 80, 0, 0,          // PORT = 80, big-endian, + padding
            7, 0, 6, 0,   b'r', b'r', 0, 0,     // SCHED_NAME = "rr\0" + padding
            12, 0, 7, 0,  0, 0, 0, 0,           // FLAGS: flags = 0
            0xff, 0xff, 0xff, 0xff,             //        mask = ~0
            8, 0, 8, 0,   0, 0, 0, 0,           // TIMEOUT = 0
            8, 0, 9, 0,   0xff, 0xff, 0xff, 0xff, // NETMASK = /32
        ];
        assert_eq!(buf, expected);
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn persistence_sets_the_flag_and_timeout() {
        let svc =
            VirtualService::new(Protocol::Udp, ip("10.96.0.10"), 53, "rr").with_persistence(10800);
        let mut buf = Vec::new();
        svc.encode(&mut buf);
        // FLAGS at offset 56 (after AF 8, PROTOCOL 8, ADDR 20, PORT 8, SCHED 8... see above).
        let flags_at = 8 + 8 + 20 + 8 + 8;
        assert_eq!(
            &buf[flags_at..flags_at + 20],
            &[12, 0, 7, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 8, 0, 8, 0, 0x30, 0x2a, 0, 0]
        );
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn ipv6_key_and_netmask_bytes() {
        let svc = VirtualService::new(Protocol::Sctp, ip("fd00::1"), 3868, "wrr");
        let mut buf = Vec::new();
        svc.encode(&mut buf);
        #[rustfmt::skip]
        let key: &[u8] = &[
            6, 0, 1, 0,  10, 0, 0, 0,           // AF_INET6
            6, 0, 2, 0,  132, 0, 0, 0,          // SCTP
            20, 0, 3, 0, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
            6, 0, 4, 0,  0x0f, 0x1c, 0, 0,      // 3868 big-endian
            8, 0, 6, 0,  b'w', b'r', b'r', 0,   // "wrr\0", no padding needed
        ];
        assert_eq!(&buf[..key.len()], key);
        // The IPv6 netmask is a host-order prefix length.
        assert_eq!(&buf[buf.len() - 8..], &[8, 0, 9, 0, 128, 0, 0, 0]);

        let mut v4 = VirtualService::new(Protocol::Tcp, ip("10.0.0.1"), 1, "rr");
        v4.netmask = 0xffff_ff00;
        let mut buf = Vec::new();
        v4.encode(&mut buf);
        // An IPv4 netmask is a mask in network order.
        assert_eq!(&buf[buf.len() - 8..], &[8, 0, 9, 0, 0xff, 0xff, 0xff, 0]);
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn new_dest_bytes_match_the_hand_computed_layout() {
        let svc = VirtualService::new(Protocol::Tcp, ip("10.96.0.10"), 80, "rr");
        let mut buf = Vec::new();
        IpvsRequest::NewDest {
            service: svc.key(),
            dest: Destination::new(ip("10.244.1.5"), 8080, 1),
        }
        .encode(&mut buf);
        #[rustfmt::skip]
        let expected: &[u8] = &[
            5, 1, 0, 0,                         // NEW_DEST, version 1
            48, 0, 0x01, 0x80,                  // service key nest: AF, PROTOCOL, ADDR, PORT
            6, 0, 1, 0,   2, 0, 0, 0,
            6, 0, 2, 0,   6, 0, 0, 0,
            20, 0, 3, 0,  10, 96, 0, 10,  0, 0, 0, 0,  0, 0, 0, 0,  0, 0, 0, 0,
            6, 0, 4, 0,   0, 80, 0, 0,
            72, 0, 0x02, 0x80,                  // IPVS_CMD_ATTR_DEST | NLA_F_NESTED, 72 bytes
            20, 0, 1, 0,  10, 244, 1, 5,  0, 0, 0, 0,  0, 0, 0, 0,  0, 0, 0, 0,
            6, 0, 2, 0,   0x1f, 0x90, 0, 0,     // PORT 8080 big-endian
            6, 0, 11, 0,  2, 0, 0, 0,           // ADDR_FAMILY = AF_INET
            8, 0, 3, 0,   0, 0, 0, 0,           // FWD_METHOD = masquerade
            8, 0, 4, 0,   1, 0, 0, 0,           // WEIGHT = 1
            8, 0, 5, 0,   0, 0, 0, 0,           // U_THRESH
            8, 0, 6, 0,   0, 0, 0, 0,           // L_THRESH
        ];
        assert_eq!(buf, expected);

        let mut del = Vec::new();
        IpvsRequest::DelDest {
            service: svc.key(),
            dest: sa("10.244.1.5:8080"),
        }
        .encode(&mut del);
        assert_eq!(del[0], Command::DelDest as u8);
        // Same key nests, the destination nest only up to ADDR_FAMILY.
        assert_eq!(&del[4..52], &expected[4..52]);
        assert_eq!(&del[52..56], &[40, 0, 0x02, 0x80]);
        assert_eq!(&del[56..], &expected[56..92]);
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn set_config_bytes() {
        let mut buf = Vec::new();
        IpvsRequest::SetConfig(Timeouts {
            tcp: 900,
            tcp_fin: 120,
            udp: 300,
        })
        .encode(&mut buf);
        #[rustfmt::skip]
        let expected: &[u8] = &[
            12, 1, 0, 0,
            8, 0, 4, 0,  0x84, 3, 0, 0,
            8, 0, 5, 0,  120, 0, 0, 0,
            8, 0, 6, 0,  0x2c, 1, 0, 0,
        ];
        assert_eq!(buf, expected);
    }

    // ---- kernel-shaped replies -------------------------------------------------------

    /// An attribute as the kernel writes it (`nla_put`): no flags, padded.
    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out
    }

    /// A nest as the kernel writes it (`nla_nest_start_noflag`): no NLA_F_NESTED.
    fn nest(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = parts.concat();
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + body.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn u16b(v: u16) -> Vec<u8> {
        v.to_ne_bytes().to_vec()
    }
    fn u32b(v: u32) -> Vec<u8> {
        v.to_ne_bytes().to_vec()
    }
    fn u64b(v: u64) -> Vec<u8> {
        v.to_ne_bytes().to_vec()
    }

    /// `ip_vs_genl_fill_stats`: 32-bit counters and rates, 64-bit bytes (with padding).
    fn kernel_stats32() -> Vec<u8> {
        nest(
            IPVS_SVC_ATTR_STATS,
            &[
                nla(IPVS_STATS_ATTR_CONNS, &u32b(7)),
                nla(IPVS_STATS_ATTR_INPKTS, &u32b(70)),
                nla(IPVS_STATS_ATTR_OUTPKTS, &u32b(60)),
                nla(IPVS_STATS_ATTR_PAD, &[]),
                nla(IPVS_STATS_ATTR_INBYTES, &u64b(7000)),
                nla(IPVS_STATS_ATTR_OUTBYTES, &u64b(6000)),
                nla(IPVS_STATS_ATTR_CPS, &u32b(1)),
                nla(IPVS_STATS_ATTR_INPPS, &u32b(2)),
                nla(IPVS_STATS_ATTR_OUTPPS, &u32b(3)),
                nla(IPVS_STATS_ATTR_INBPS, &u32b(4)),
                nla(IPVS_STATS_ATTR_OUTBPS, &u32b(5)),
            ],
        )
    }

    /// `ip_vs_genl_fill_stats64`: everything 64-bit; conns beyond 32 bits.
    fn kernel_stats64(kind: u16) -> Vec<u8> {
        nest(
            kind,
            &[
                nla(IPVS_STATS_ATTR_PAD, &[]),
                nla(IPVS_STATS_ATTR_CONNS, &u64b(1 << 33)),
                nla(IPVS_STATS_ATTR_INPKTS, &u64b(70)),
                nla(IPVS_STATS_ATTR_OUTPKTS, &u64b(60)),
                nla(IPVS_STATS_ATTR_INBYTES, &u64b(7000)),
                nla(IPVS_STATS_ATTR_OUTBYTES, &u64b(6000)),
                nla(IPVS_STATS_ATTR_CPS, &u64b(1)),
                nla(IPVS_STATS_ATTR_INPPS, &u64b(2)),
                nla(IPVS_STATS_ATTR_OUTPPS, &u64b(3)),
                nla(IPVS_STATS_ATTR_INBPS, &u64b(4)),
                nla(IPVS_STATS_ATTR_OUTBPS, &u64b(5)),
            ],
        )
    }

    fn expected_stats(conns: u64) -> Stats {
        Stats {
            conns,
            in_packets: 70,
            out_packets: 60,
            in_bytes: 7000,
            out_bytes: 6000,
            cps: 1,
            in_pps: 2,
            out_pps: 3,
            in_bps: 4,
            out_bps: 5,
        }
    }

    /// A `GET_SERVICE` dump entry in the order `ip_vs_genl_fill_service` writes it.
    fn kernel_service_entry(with_stats64: bool) -> Vec<u8> {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[10, 96, 0, 10]);
        let mut flags = u32b(0x0001 | 0x0002 | 0x0010); // PERSISTENT | HASHED | SCHED2
        flags.extend_from_slice(&u32b(u32::MAX));
        let mut parts = vec![
            nla(IPVS_SVC_ATTR_AF, &u16b(2)),
            nla(IPVS_SVC_ATTR_PROTOCOL, &u16b(17)),
            nla(IPVS_SVC_ATTR_ADDR, &addr),
            nla(IPVS_SVC_ATTR_PORT, &53u16.to_be_bytes()),
            nla(IPVS_SVC_ATTR_SCHED_NAME, b"mh\0"),
            nla(IPVS_SVC_ATTR_PE_NAME, b"sip\0"),
            nla(IPVS_SVC_ATTR_FLAGS, &flags),
            nla(IPVS_SVC_ATTR_TIMEOUT, &u32b(10800)),
            nla(IPVS_SVC_ATTR_NETMASK, &[0xff, 0xff, 0xff, 0xff]),
            kernel_stats32(),
        ];
        if with_stats64 {
            parts.push(kernel_stats64(IPVS_SVC_ATTR_STATS64));
        }
        let mut payload = vec![Command::NewService as u8, 1, 0, 0];
        payload.extend(nest(IPVS_CMD_ATTR_SERVICE, &parts));
        payload
    }

    #[test]
    fn parses_a_kernel_service_entry_with_stats() {
        let reply = IpvsReply::parse(&kernel_service_entry(true)).expect("kernel entry parses");
        let mut expected =
            VirtualService::new(Protocol::Udp, ip("10.96.0.10"), 53, "mh").with_persistence(10800);
        expected.flags = ServiceFlags::SCHED2;
        expected.stats = Some(expected_stats(1 << 33));
        assert_eq!(reply, IpvsReply::Service(expected));

        // An older kernel without STATS64: the 32-bit nest is used.
        let IpvsReply::Service(old) =
            IpvsReply::parse(&kernel_service_entry(false)).expect("kernel entry parses")
        else {
            panic!("not a service");
        };
        assert_eq!(old.stats, Some(expected_stats(7)));
    }

    #[test]
    fn parses_kernel_fwmark_service_and_destination() {
        let mut flags = u32b(0x0002);
        flags.extend_from_slice(&u32b(u32::MAX));
        let mut payload = vec![Command::NewService as u8, 1, 0, 0];
        payload.extend(nest(
            IPVS_CMD_ATTR_SERVICE,
            &[
                nla(IPVS_SVC_ATTR_AF, &u16b(10)),
                nla(IPVS_SVC_ATTR_FWMARK, &u32b(42)),
                nla(IPVS_SVC_ATTR_SCHED_NAME, b"wlc\0"),
                nla(IPVS_SVC_ATTR_FLAGS, &flags),
                nla(IPVS_SVC_ATTR_TIMEOUT, &u32b(0)),
                nla(IPVS_SVC_ATTR_NETMASK, &u32b(128)),
            ],
        ));
        let IpvsReply::Service(svc) = IpvsReply::parse(&payload).expect("parses") else {
            panic!("not a service");
        };
        assert_eq!(svc.fwmark, Some(42));
        assert_eq!(svc.addr, ip("::"));
        assert_eq!(svc.netmask, 128);
        assert_eq!(svc.persistent_timeout, None);
        assert_eq!(svc.flags, ServiceFlags::empty());
        assert_eq!(
            svc.key(),
            ServiceKey::Fwmark {
                family: AddressFamily::Ipv6,
                mark: 42
            }
        );
    }

    /// A `GET_DEST` dump entry in the order `ip_vs_genl_fill_dest` writes it.
    fn kernel_dest_entry(addr: &str, forward: u32) -> Vec<u8> {
        let (family, raw) = match ip(addr) {
            IpAddr::V4(v4) => {
                let mut raw = [0u8; 16];
                raw[..4].copy_from_slice(&v4.octets());
                (2u16, raw)
            }
            IpAddr::V6(v6) => (10u16, v6.octets()),
        };
        let mut payload = vec![Command::NewDest as u8, 1, 0, 0];
        payload.extend(nest(
            IPVS_CMD_ATTR_DEST,
            &[
                nla(IPVS_DEST_ATTR_ADDR, &raw),
                nla(IPVS_DEST_ATTR_PORT, &8080u16.to_be_bytes()),
                nla(IPVS_DEST_ATTR_FWD_METHOD, &u32b(forward)),
                nla(IPVS_DEST_ATTR_WEIGHT, &u32b(0)),
                nla(IPVS_DEST_ATTR_TUN_TYPE, &[0]),
                nla(IPVS_DEST_ATTR_TUN_PORT, &0u16.to_be_bytes()),
                nla(IPVS_DEST_ATTR_TUN_FLAGS, &u16b(0)),
                nla(IPVS_DEST_ATTR_U_THRESH, &u32b(0)),
                nla(IPVS_DEST_ATTR_L_THRESH, &u32b(0)),
                nla(IPVS_DEST_ATTR_ACTIVE_CONNS, &u32b(3)),
                nla(IPVS_DEST_ATTR_INACT_CONNS, &u32b(12)),
                nla(IPVS_DEST_ATTR_PERSIST_CONNS, &u32b(1)),
                nla(IPVS_DEST_ATTR_ADDR_FAMILY, &u16b(family)),
                kernel_stats32(),
                kernel_stats64(IPVS_DEST_ATTR_STATS64),
            ],
        ));
        payload
    }

    #[test]
    fn parses_kernel_destination_entries() {
        for addr in ["10.244.1.5", "fd00:10:244::5"] {
            let reply = IpvsReply::parse(&kernel_dest_entry(addr, 0)).expect("parses");
            let mut expected = Destination::new(ip(addr), 8080, 0);
            expected.active_conns = 3;
            expected.inactive_conns = 12;
            expected.persist_conns = 1;
            expected.stats = Some(expected_stats(1 << 33));
            assert_eq!(reply, IpvsReply::Destination(expected));
        }
        // A tunnel destination keeps its (zero) tunnel parameters.
        let IpvsReply::Destination(tunnel) =
            IpvsReply::parse(&kernel_dest_entry("10.0.0.9", 2)).expect("parses")
        else {
            panic!("not a destination");
        };
        assert_eq!(tunnel.forward, Forward::Tunnel);
        assert_eq!(tunnel.tunnel, Some(Tunnel::default()));
    }

    #[test]
    fn parses_info_and_config_replies() {
        let mut info = vec![Command::SetInfo as u8, 1, 0, 0];
        info.extend(nla(IPVS_INFO_ATTR_VERSION, &u32b(0x010201)));
        info.extend(nla(IPVS_INFO_ATTR_CONN_TAB_SIZE, &u32b(4096)));
        let IpvsReply::Info(parsed) = IpvsReply::parse(&info).expect("parses") else {
            panic!("not info");
        };
        assert_eq!(parsed.conn_tab_size, 4096);
        assert_eq!(parsed.version_triple(), (1, 2, 1));

        // A kernel built without UDP support leaves the UDP timeout out.
        let mut config = vec![Command::SetConfig as u8, 1, 0, 0];
        config.extend(nla(IPVS_CMD_ATTR_TIMEOUT_TCP, &u32b(900)));
        config.extend(nla(IPVS_CMD_ATTR_TIMEOUT_TCP_FIN, &u32b(120)));
        assert_eq!(
            IpvsReply::parse(&config).expect("parses"),
            IpvsReply::Config(Timeouts {
                tcp: 900,
                tcp_fin: 120,
                udp: 0
            })
        );
    }

    #[test]
    fn replies_round_trip() {
        let mut replies = Vec::new();
        for mut svc in services() {
            svc.stats = Some(expected_stats(99));
            replies.push(IpvsReply::Service(svc));
        }
        for mut dest in destinations() {
            dest.active_conns = 5;
            dest.inactive_conns = 6;
            dest.persist_conns = 7;
            dest.stats = Some(expected_stats(3));
            replies.push(IpvsReply::Destination(dest));
        }
        replies.push(IpvsReply::Info(Info {
            version: 0x010201,
            conn_tab_size: 4096,
        }));
        replies.push(IpvsReply::Config(Timeouts {
            tcp: 1,
            tcp_fin: 2,
            udp: 3,
        }));
        for reply in replies {
            let mut buf = Vec::new();
            reply.encode(&mut buf);
            assert_eq!(IpvsReply::parse(&buf).expect("own encoding parses"), reply);
        }
    }

    #[test]
    fn kernel_owned_flags_are_not_round_tripped() {
        let mut svc = VirtualService::new(Protocol::Tcp, ip("10.0.0.1"), 80, "rr");
        // PERSISTENT without a timeout, and HASHED, are dropped when encoding.
        svc.flags = ServiceFlags::PERSISTENT
            .union(ServiceFlags::HASHED)
            .union(ServiceFlags::ONEPACKET);
        assert_eq!(svc.wire_flags(), ServiceFlags::ONEPACKET.0);
        let mut buf = Vec::new();
        IpvsRequest::NewService(svc.clone()).encode(&mut buf);
        let IpvsRequest::NewService(parsed) = IpvsRequest::parse(&buf).expect("parses") else {
            panic!("not NEW_SERVICE");
        };
        assert_eq!(parsed.flags, ServiceFlags::ONEPACKET);
        assert!(parsed.same_config(&VirtualService {
            flags: ServiceFlags::ONEPACKET,
            ..svc
        }));
    }

    #[test]
    fn validation_rejects_bad_scheduler_names() {
        for name in ["", "a-very-long-scheduler", "r\0r"] {
            let svc = VirtualService::new(Protocol::Tcp, ip("10.0.0.1"), 80, name);
            assert_eq!(
                IpvsRequest::NewService(svc).validate(),
                Err(InvalidRequest::SchedulerName(name.to_string()))
            );
        }
        let ok = VirtualService::new(Protocol::Tcp, ip("10.0.0.1"), 80, "123456789012345");
        assert_eq!(IpvsRequest::SetService(ok).validate(), Ok(()));
    }

    // ---- malformed input -------------------------------------------------------------

    fn all_payloads() -> Vec<Vec<u8>> {
        let mut out = vec![kernel_service_entry(true), kernel_dest_entry("fd00::1", 2)];
        for svc in services() {
            let mut buf = Vec::new();
            IpvsRequest::NewService(svc.clone()).encode(&mut buf);
            out.push(buf);
            for dest in destinations() {
                let mut buf = Vec::new();
                IpvsRequest::SetDest {
                    service: svc.key(),
                    dest,
                }
                .encode(&mut buf);
                out.push(buf);
            }
        }
        out
    }

    #[test]
    fn truncated_messages_never_panic() {
        for payload in all_payloads() {
            for len in 0..payload.len() {
                let cut = &payload[..len];
                // Either outcome is fine; only panics are not.
                let _ = IpvsRequest::parse(cut);
                let _ = IpvsReply::parse(cut);
            }
            // A cut inside the first attribute header or nest is always an error.
            for len in 0..8.min(payload.len()) {
                assert!(IpvsReply::parse(&payload[..len]).is_err(), "len {len}");
            }
        }
    }

    #[test]
    fn garbage_never_panics() {
        // A deterministic xorshift stream: random bytes, and valid payloads with random
        // bytes flipped (which keeps most of the framing plausible).
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2000 {
            let len = (next() % 200) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = IpvsRequest::parse(&bytes);
            let _ = IpvsReply::parse(&bytes);
            let _ = Stats::parse(&bytes);
            let _ = ServiceKey::parse(&bytes);
        }
        for payload in all_payloads() {
            for _ in 0..300 {
                let mut bytes = payload.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % bytes.len();
                    bytes[at] = next() as u8;
                }
                let _ = IpvsRequest::parse(&bytes);
                let _ = IpvsReply::parse(&bytes);
            }
        }
    }

    #[test]
    fn malformed_attributes_are_typed_errors() {
        // Attribute length beyond the buffer.
        let mut bad = vec![Command::NewService as u8, 1, 0, 0];
        bad.extend_from_slice(&[200, 0, 1, 0, 0, 0]);
        assert!(matches!(
            IpvsReply::parse(&bad),
            Err(ParseError::Attribute { .. })
        ));
        // Attribute length below its own header.
        let mut bad = vec![Command::NewService as u8, 1, 0, 0];
        bad.extend_from_slice(&[2, 0, 1, 0]);
        assert!(matches!(
            IpvsReply::parse(&bad),
            Err(ParseError::Attribute { .. })
        ));
        // A service without its nest.
        let bare = vec![Command::NewService as u8, 1, 0, 0];
        assert!(matches!(
            IpvsReply::parse(&bare),
            Err(ParseError::Missing {
                attribute: "IPVS_CMD_ATTR_SERVICE",
                ..
            })
        ));
        // An unknown family.
        let mut payload = vec![Command::DelService as u8, 1, 0, 0];
        payload.extend(nest(
            IPVS_CMD_ATTR_SERVICE,
            &[
                nla(IPVS_SVC_ATTR_AF, &u16b(7)),
                nla(IPVS_SVC_ATTR_FWMARK, &u32b(1)),
            ],
        ));
        assert_eq!(IpvsRequest::parse(&payload), Err(ParseError::Family(7)));
        // A short port and a short IPv6 address.
        let mut payload = vec![Command::DelService as u8, 1, 0, 0];
        payload.extend(nest(
            IPVS_CMD_ATTR_SERVICE,
            &[
                nla(IPVS_SVC_ATTR_AF, &u16b(10)),
                nla(IPVS_SVC_ATTR_PROTOCOL, &u16b(6)),
                nla(IPVS_SVC_ATTR_ADDR, &[0xfd, 0, 0, 0]),
                nla(IPVS_SVC_ATTR_PORT, &[1]),
            ],
        ));
        assert!(matches!(
            IpvsRequest::parse(&payload),
            Err(ParseError::Length {
                attribute: "IPVS_SVC_ATTR_ADDR",
                ..
            })
        ));
        // Unknown commands.
        assert_eq!(
            IpvsReply::parse(&[99, 1, 0, 0]),
            Err(ParseError::Command(99))
        );
        assert_eq!(
            IpvsRequest::parse(&[Command::SetInfo as u8, 1, 0, 0]),
            Err(ParseError::Command(Command::SetInfo as u8))
        );
        // A forwarding method outside 0..=4.
        assert_eq!(Forward::from_number(5), Err(ParseError::Forward(5)));
    }
}
