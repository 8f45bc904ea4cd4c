//! UDP conntrack cleanup: delete conntrack entries that pin UDP flows to the wrong place.
//!
//! # Why
//!
//! nftables NAT only sees the *first* packet of a flow; every later packet follows the
//! conntrack entry that packet created. TCP flows end, and a removed endpoint resets them,
//! so clients reconnect and get a fresh load-balancing decision. UDP has neither: a client
//! that keeps sending from one source port (resolvers, syslog, statsd, game and VoIP
//! clients) refreshes its entry with every datagram — it only expires after 30 s of silence
//! (120 s once traffic has gone both ways for a while) — and keeps going to
//!
//! * an endpoint that has been removed from the service (a *stale* entry), or
//! * nowhere at all, when its first packet arrived while the service had no usable rules —
//!   before kproxy programmed it, say — and was routed on un-NATed. That *black-hole* entry
//!   has no DNAT: its reply source is the service address itself.
//!
//! # What
//!
//! Like kube-proxy ≥ 1.33's reconciler (`pkg/proxy/conntrack/cleanup.go`), after every
//! successful sync of an IP family [`cleanup_stale_udp`] lists that family's conntrack
//! table over ctnetlink and deletes every UDP entry whose original destination is a UDP
//! service frontend — a ClusterIP, external IP or LoadBalancer IP with the service port, or
//! any address with a UDP NodePort — while its reply source is not a *serving* endpoint IP
//! of that service port. Readiness, termination, topology and traffic policies are ignored
//! on purpose: a flow already established to a serving endpoint keeps going, exactly as a
//! TCP connection would. As upstream does, a service port with no serving endpoint at all is
//! left alone: deleting its entries now would only recreate them with the next packet, and
//! the first sync that gives it an endpoint deletes them.
//!
//! The decision ([`UdpServiceIndex::is_stale`]) is pure and unit tested; [`Conntrack`] is the
//! thin I/O part: one dump per call, client-side filtering, and deletes sent back to back in
//! batches with their acknowledgements read afterwards. Messages are
//! `netlink-packet-netfilter`'s typed ctnetlink attributes; the two attributes it lacks
//! (`CTA_ID`, `CTA_ZONE`) are carried as plain attributes.
//!
//! A handle acts on the conntrack table of the network namespace it was opened in,
//! whichever thread uses it later.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use kproxy_backend_api::{IpFamily, Protocol, ServicePlans};
use netlink_packet_core::{
    DefaultNla, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla, NLA_TYPE_MASK, NLMSG_DONE,
    NLMSG_ERROR, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol as CtProtocol, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr as NetlinkAddr};

// IANA numbers of the protocols conntrack tracks by port (the ones a delete can name).
/// TCP.
pub const IPPROTO_TCP: u8 = 6;
/// UDP: the only protocol the cleanup deletes.
pub const IPPROTO_UDP: u8 = 17;
/// DCCP.
pub const IPPROTO_DCCP: u8 = 33;
/// SCTP.
pub const IPPROTO_SCTP: u8 = 132;
/// UDP-Lite.
pub const IPPROTO_UDPLITE: u8 = 136;

/// nfnetlink subsystem id of ctnetlink (`NFNL_SUBSYS_CTNETLINK`).
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
/// `IPCTNL_MSG_CT_NEW`: the message type of every entry in a dump.
const IPCTNL_MSG_CT_NEW: u16 = 0;
/// `CTA_ID` (u32, network order): the entry's id; a delete carrying it only removes that
/// very entry, not a newer one that reused the tuple.
const CTA_ID: u16 = 12;
/// `CTA_ZONE` (u16, network order); absent for the default zone 0.
const CTA_ZONE: u16 = 18;
/// `CTA_TUPLE_ZONE` inside a tuple: the zone of a directional (per-direction) zone.
const CTA_TUPLE_ZONE: u16 = 3;

/// Netlink message header length.
const NLMSG_HDRLEN: usize = 16;
/// Deletes per `send`: each one is acknowledged separately and the kernel queues the acks
/// while it processes the batch, so the batch must fit the receive buffer (an ack costs
/// about 1 KiB of it); 64 stays far below the default 208 KiB.
const DELETE_BATCH: usize = 64;
/// Receive buffer: dump messages are at most 32 KiB.
const RECV_BUFFER: usize = 64 * 1024;
/// How long one `recv` may block before the operation fails. The kernel answers at once;
/// this only keeps a sync from hanging forever if it does not.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// A ctnetlink failure. Every error leaves the kernel consistent (deletes are per entry);
/// the next cleanup recomputes everything, so callers log it and carry on.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    /// The netlink socket could not be created or configured.
    #[error("cannot open a ctnetlink socket: {0}")]
    Open(#[source] io::Error),
    /// Sending or receiving failed, including the 5 s receive timeout expiring.
    #[error("ctnetlink {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The kernel refused the request (`EPERM` without CAP_NET_ADMIN, for instance).
    #[error("kernel refused ctnetlink {op}: {source}")]
    Kernel {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// Some deletes failed for a reason other than the entry being gone already.
    #[error("{failed} conntrack deletes failed ({deleted} succeeded); first error: {first}")]
    Delete {
        deleted: usize,
        failed: usize,
        #[source]
        first: io::Error,
    },
    /// The kernel's reply did not frame as netlink messages.
    #[error("malformed ctnetlink reply: {0}")]
    Malformed(String),
    /// An entry cannot be deleted by tuple (its protocol has no ports).
    #[error("cannot delete conntrack entry of protocol {protocol}: only port-based protocols are supported")]
    UnsupportedProtocol { protocol: u8 },
}

/// One conntrack entry, reduced to what cleanup needs.
///
/// Protocols without ports (ICMP, GRE…) list with port 0.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConntrackEntry {
    pub family: IpFamily,
    /// IANA protocol number (17 = UDP).
    pub protocol: u8,
    pub orig_src: SocketAddr,
    pub orig_dst: SocketAddr,
    /// The source of replies: the endpoint after DNAT, or `orig_dst` if not DNATed.
    pub reply_src: SocketAddr,
    pub reply_dst: SocketAddr,
    /// The conntrack zone (`CTA_ZONE`, 0 by default).
    pub zone: u16,
    /// The zone carried inside the original tuple (`CTA_TUPLE_ZONE`), used only by
    /// directional zones; echoed back on delete.
    pub orig_tuple_zone: Option<u16>,
    /// The kernel's id of the entry (`CTA_ID`), if it reported one.
    pub id: Option<u32>,
    /// `CTA_STATUS` bits (`IPS_*`).
    pub status: u32,
}

impl ConntrackEntry {
    pub fn is_udp(&self) -> bool {
        self.protocol == IPPROTO_UDP
    }

    /// Builds an entry from a dumped message's attributes; `None` if an address or the
    /// protocol number is missing or the families disagree.
    fn from_attributes(attributes: &[ConntrackAttribute]) -> Option<ConntrackEntry> {
        let mut orig = None;
        let mut reply = None;
        let mut zone = 0;
        let mut id = None;
        let mut status = 0;
        for attribute in attributes {
            match attribute {
                ConntrackAttribute::CtaTupleOrig(t) => orig = Some(ParsedTuple::from(t)),
                ConntrackAttribute::CtaTupleReply(t) => reply = Some(ParsedTuple::from(t)),
                ConntrackAttribute::CtaStatus(s) => status = s.bits(),
                ConntrackAttribute::Other(nla) => match nla.kind() & NLA_TYPE_MASK {
                    CTA_ZONE => zone = be_u16(&nla_value(nla)).unwrap_or(0),
                    CTA_ID => id = be_u32(&nla_value(nla)),
                    _ => {}
                },
                _ => {}
            }
        }
        let (orig, reply) = (orig?, reply?);
        let protocol = orig.protocol?;
        let (orig_src, orig_dst) = (orig.src?, orig.dst?);
        let (reply_src, reply_dst) = (reply.src?, reply.dst?);
        let family = IpFamily::of(&orig_src);
        if [orig_dst, reply_src, reply_dst]
            .iter()
            .any(|ip| IpFamily::of(ip) != family)
        {
            return None;
        }
        Some(ConntrackEntry {
            family,
            protocol,
            orig_src: SocketAddr::new(orig_src, orig.src_port),
            orig_dst: SocketAddr::new(orig_dst, orig.dst_port),
            reply_src: SocketAddr::new(reply_src, reply.src_port),
            reply_dst: SocketAddr::new(reply_dst, reply.dst_port),
            zone,
            orig_tuple_zone: orig.zone,
            id,
            status,
        })
    }

    /// The attributes of an `IPCTNL_MSG_CT_DELETE` for this entry: its original tuple,
    /// zone and id.
    fn delete_attributes(&self) -> Result<Vec<ConntrackAttribute>, ConntrackError> {
        if !has_ports(self.protocol) {
            return Err(ConntrackError::UnsupportedProtocol {
                protocol: self.protocol,
            });
        }
        let mut tuple = vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(self.orig_src.ip()),
                IPTuple::DestinationAddress(self.orig_dst.ip()),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(CtProtocol::from(self.protocol)),
                ProtoTuple::SourcePort(self.orig_src.port()),
                ProtoTuple::DestinationPort(self.orig_dst.port()),
            ]),
        ];
        if let Some(zone) = self.orig_tuple_zone {
            tuple.push(Tuple::Other(DefaultNla::new(
                CTA_TUPLE_ZONE,
                zone.to_be_bytes().to_vec(),
            )));
        }
        let mut attributes = vec![ConntrackAttribute::CtaTupleOrig(tuple)];
        if self.zone != 0 {
            attributes.push(ConntrackAttribute::Other(DefaultNla::new(
                CTA_ZONE,
                self.zone.to_be_bytes().to_vec(),
            )));
        }
        if let Some(id) = self.id {
            attributes.push(ConntrackAttribute::Other(DefaultNla::new(
                CTA_ID,
                id.to_be_bytes().to_vec(),
            )));
        }
        Ok(attributes)
    }
}

/// The fields of one `CTA_TUPLE_*`.
#[derive(Default)]
struct ParsedTuple {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    protocol: Option<u8>,
    src_port: u16,
    dst_port: u16,
    zone: Option<u16>,
}

impl From<&Vec<Tuple>> for ParsedTuple {
    fn from(tuple: &Vec<Tuple>) -> Self {
        let mut out = ParsedTuple::default();
        for part in tuple {
            match part {
                Tuple::Ip(ips) => {
                    for ip in ips {
                        match ip {
                            IPTuple::SourceAddress(a) => out.src = Some(*a),
                            IPTuple::DestinationAddress(a) => out.dst = Some(*a),
                            _ => {}
                        }
                    }
                }
                Tuple::Proto(protos) => {
                    for p in protos {
                        match p {
                            ProtoTuple::Protocol(n) => out.protocol = Some(u8::from(*n)),
                            ProtoTuple::SourcePort(port) => out.src_port = *port,
                            ProtoTuple::DestinationPort(port) => out.dst_port = *port,
                            _ => {}
                        }
                    }
                }
                Tuple::Other(nla) if nla.kind() & NLA_TYPE_MASK == CTA_TUPLE_ZONE => {
                    out.zone = be_u16(&nla_value(nla));
                }
                _ => {}
            }
        }
        out
    }
}

fn has_ports(protocol: u8) -> bool {
    matches!(
        protocol,
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_DCCP | IPPROTO_SCTP | IPPROTO_UDPLITE
    )
}

/// The value bytes of an attribute the crate keeps opaque.
fn nla_value(nla: &DefaultNla) -> Vec<u8> {
    let mut value = vec![0; nla.value_len()];
    nla.emit_value(&mut value);
    value
}

fn be_u16(bytes: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(bytes.get(..2)?.try_into().ok()?))
}

fn be_u32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?))
}

/// The UDP service frontends of one IP family and who may answer for them: the pure half
/// of the cleanup. The default index is empty and finds nothing stale.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UdpServiceIndex {
    family: Option<IpFamily>,
    /// Service IP and port → serving endpoint IPs.
    frontends: HashMap<SocketAddr, HashSet<IpAddr>>,
    /// NodePort → serving endpoint IPs.
    node_ports: HashMap<u16, HashSet<IpAddr>>,
}

impl UdpServiceIndex {
    /// Indexes the UDP ports of `plans` that belong to `family` and have at least one
    /// serving endpoint. Should two ports claim one frontend, replies from either's
    /// endpoints are allowed: deleting too little is safer than breaking a live flow.
    pub fn from_plans(family: IpFamily, plans: &ServicePlans) -> UdpServiceIndex {
        let mut index = UdpServiceIndex {
            family: Some(family),
            ..UdpServiceIndex::default()
        };
        for plan in plans.values().flatten() {
            let port = &plan.port;
            if port.name.protocol != Protocol::Udp || port.family != family {
                continue;
            }
            let serving: HashSet<IpAddr> = plan
                .endpoints
                .iter()
                .filter(|e| e.serving && IpFamily::of(&e.ip) == family)
                .map(|e| e.ip)
                .collect();
            if serving.is_empty() {
                continue;
            }
            let ips = std::iter::once(&port.cluster_ip)
                .filter(|ip| !ip.is_unspecified())
                .chain(&port.external_ips)
                .chain(&port.load_balancer_ips)
                .filter(|ip| IpFamily::of(ip) == family);
            for ip in ips {
                index
                    .frontends
                    .entry(SocketAddr::new(*ip, port.port))
                    .or_default()
                    .extend(&serving);
            }
            if let Some(node_port) = port.node_port {
                index
                    .node_ports
                    .entry(node_port)
                    .or_default()
                    .extend(&serving);
            }
        }
        index
    }

    /// No UDP frontend has a serving endpoint: nothing can be stale.
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty() && self.node_ports.is_empty()
    }

    /// Whether `entry` is a UDP flow to a service frontend answered by something other than
    /// a serving endpoint of that service.
    ///
    /// NodePorts match on the destination port alone, whatever the address, as upstream
    /// does: this also catches NodePort traffic to addresses kproxy does not know are local.
    pub fn is_stale(&self, entry: &ConntrackEntry) -> bool {
        if !entry.is_udp() || Some(entry.family) != self.family {
            return false;
        }
        let reply_src = entry.reply_src.ip();
        let foreign = |allowed: Option<&HashSet<IpAddr>>| {
            allowed.is_some_and(|allowed| !allowed.contains(&reply_src))
        };
        foreign(self.frontends.get(&entry.orig_dst))
            || foreign(self.node_ports.get(&entry.orig_dst.port()))
    }
}

/// What one [`cleanup_stale_udp`] did, for logs and metrics
/// (`kubeproxy_conntrack_reconciler_sync_duration_seconds`,
/// `kubeproxy_conntrack_reconciler_deleted_entries_total`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Entries of the family the kernel listed (0 when the dump was skipped because no
    /// UDP service has a serving endpoint).
    pub listed: usize,
    /// Entries found stale.
    pub stale: usize,
    /// Entries actually deleted (stale ones that vanished meanwhile are not counted).
    pub deleted: usize,
    /// Dumped messages that could not be decoded and were skipped.
    pub undecodable: usize,
    /// Wall time of the whole cleanup.
    pub duration: Duration,
}

/// Lists `family`'s conntrack table and deletes the stale UDP entries for `plans` (one
/// family's desired state, as handed to the backend). See the module documentation.
///
/// The socket must belong to the node's network namespace. When no UDP service port has
/// a serving endpoint nothing can be stale and the table is not even listed (a dump costs
/// about 10 ms however few entries there are: see [`Conntrack::list`]). If some deletes
/// fail, [`ConntrackError::Delete`] still says how many succeeded.
pub fn cleanup_stale_udp(
    ct: &mut Conntrack,
    family: IpFamily,
    plans: &ServicePlans,
) -> Result<CleanupReport, ConntrackError> {
    let start = Instant::now();
    let index = UdpServiceIndex::from_plans(family, plans);
    let mut report = CleanupReport::default();
    if !index.is_empty() {
        let mut stale = Vec::new();
        let dump = ct.dump(family, |entry| {
            if index.is_stale(&entry) {
                stale.push(entry);
            }
        })?;
        report.listed = dump.listed;
        report.undecodable = dump.undecodable;
        report.stale = stale.len();
        for entry in &stale {
            tracing::trace!(
                orig_src = %entry.orig_src, orig_dst = %entry.orig_dst,
                reply_src = %entry.reply_src, zone = entry.zone,
                "deleting stale UDP conntrack entry"
            );
        }
        report.deleted = ct.delete(&stale)?;
    }
    report.duration = start.elapsed();
    tracing::debug!(
        family = %family, listed = report.listed, stale = report.stale,
        deleted = report.deleted, took = ?report.duration,
        "reconciled UDP conntrack entries"
    );
    Ok(report)
}

/// Counts of one dump.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct DumpStats {
    listed: usize,
    undecodable: usize,
}

/// A ctnetlink socket of the network namespace it was opened in.
///
/// After an error the handle stays usable: the next operation first discards whatever
/// the failed one left queued.
pub struct Conntrack {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
    /// An operation did not finish: replies to it may still be queued (or a dump still
    /// running), so drain the socket before the next request.
    dirty: bool,
}

impl std::fmt::Debug for Conntrack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conntrack")
            .field("fd", &self.socket.as_raw_fd())
            .field("seq", &self.seq)
            .field("dirty", &self.dirty)
            .finish_non_exhaustive()
    }
}

impl Conntrack {
    /// Opens a `NETLINK_NETFILTER` socket in the calling thread's network namespace.
    pub fn open() -> Result<Conntrack, ConntrackError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(ConntrackError::Open)?;
        socket.bind_auto().map_err(ConntrackError::Open)?;
        socket
            .connect(&NetlinkAddr::new(0, 0))
            .map_err(ConntrackError::Open)?;
        // Keep error acks small (no echo of the request); older kernels lack it, harmless.
        let _ = socket.set_cap_ack(true);
        set_recv_timeout(&socket, RECV_TIMEOUT).map_err(ConntrackError::Open)?;
        Ok(Conntrack {
            socket,
            seq: 0,
            buf: vec![0; RECV_BUFFER],
            dirty: false,
        })
    }

    /// Every conntrack entry of `family` (all zones) in this namespace.
    ///
    /// The kernel walks its whole conntrack hash table, which all namespaces share, so
    /// even an empty namespace's dump costs time in proportion to `nf_conntrack_buckets`
    /// (about 10 ms for 262144 buckets on the development VM).
    pub fn list(&mut self, family: IpFamily) -> Result<Vec<ConntrackEntry>, ConntrackError> {
        let mut entries = Vec::new();
        self.dump(family, |e| entries.push(e))?;
        Ok(entries)
    }

    /// Deletes `entries` by original tuple, zone and id, sending them in batches and
    /// reading the acks after each batch. Returns how many were deleted; entries already
    /// gone (`ENOENT`) are skipped silently.
    pub fn delete(&mut self, entries: &[ConntrackEntry]) -> Result<usize, ConntrackError> {
        // Refuse before sending anything, so an error never hides deletes already done.
        if let Some(e) = entries.iter().find(|e| !has_ports(e.protocol)) {
            return Err(ConntrackError::UnsupportedProtocol {
                protocol: e.protocol,
            });
        }
        let mut deleted = 0;
        let mut failed = 0;
        let mut first_error = None;
        for batch in entries.chunks(DELETE_BATCH) {
            let mut request = Vec::new();
            let first_seq = self.seq.wrapping_add(1);
            for entry in batch {
                let seq = self.next_seq();
                let family = family_byte(entry.family);
                let message = ConntrackMessage::Delete(entry.delete_attributes()?);
                encode(
                    &mut request,
                    family,
                    message,
                    NLM_F_REQUEST | NLM_F_ACK,
                    seq,
                );
            }
            self.begin()?;
            self.send(&request, "delete")?;
            let mut pending = batch.len();
            while pending > 0 {
                let n = self.recv("delete")?;
                for frame in frames(&self.buf[..n])? {
                    let in_batch = frame.seq.wrapping_sub(first_seq) < batch.len() as u32;
                    if frame.msg_type != NLMSG_ERROR || !in_batch {
                        continue;
                    }
                    pending = pending.saturating_sub(1);
                    match frame.error_code() {
                        0 => deleted += 1,
                        code if -code == libc::ENOENT => {}
                        code => {
                            failed += 1;
                            first_error.get_or_insert(io::Error::from_raw_os_error(-code));
                        }
                    }
                }
            }
            self.dirty = false;
            if first_error.is_some() {
                break;
            }
        }
        match first_error {
            None => Ok(deleted),
            Some(first) => Err(ConntrackError::Delete {
                deleted,
                failed,
                first,
            }),
        }
    }

    /// Dumps `family`'s table, handing each decodable entry to `visit`.
    fn dump(
        &mut self,
        family: IpFamily,
        mut visit: impl FnMut(ConntrackEntry),
    ) -> Result<DumpStats, ConntrackError> {
        let seq = self.next_seq();
        let mut request = Vec::new();
        encode(
            &mut request,
            family_byte(family),
            ConntrackMessage::Get(Vec::new()),
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
        );
        self.begin()?;
        self.send(&request, "dump")?;
        let mut stats = DumpStats::default();
        loop {
            let n = self.recv("dump")?;
            for frame in frames(&self.buf[..n])? {
                if frame.seq != seq {
                    continue;
                }
                match frame.msg_type {
                    NLMSG_DONE => {
                        let code = frame.error_code();
                        self.dirty = false;
                        if code < 0 {
                            return Err(kernel_error("dump", code));
                        }
                        return Ok(stats);
                    }
                    NLMSG_ERROR => {
                        let code = frame.error_code();
                        if code < 0 {
                            self.dirty = false;
                            return Err(kernel_error("dump", code));
                        }
                    }
                    t if t == (NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW) => {
                        match decode_entry(frame.bytes) {
                            Some(entry) if entry.family == family => {
                                stats.listed += 1;
                                visit(entry);
                            }
                            Some(_) => {}
                            None => stats.undecodable += 1,
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Starts an operation: discards what an unfinished earlier one left queued. Receiving
    /// also runs a dump still in progress to its end, which frees the socket for a new one.
    fn begin(&mut self) -> Result<(), ConntrackError> {
        if self.dirty {
            loop {
                let mut buf = &mut self.buf[..];
                match self.socket.recv(&mut buf, libc::MSG_DONTWAIT) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // ENOBUFS and the like: reported once, the queue keeps draining.
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                    Err(source) => {
                        return Err(ConntrackError::Io {
                            op: "drain",
                            source,
                        })
                    }
                }
            }
        }
        self.dirty = true;
        Ok(())
    }

    fn send(&self, request: &[u8], op: &'static str) -> Result<(), ConntrackError> {
        self.socket
            .send(request, 0)
            .map_err(|source| ConntrackError::Io { op, source })?;
        Ok(())
    }

    /// Receives one datagram into `self.buf`; returns its length.
    fn recv(&mut self, op: &'static str) -> Result<usize, ConntrackError> {
        loop {
            let mut buf = &mut self.buf[..];
            match self.socket.recv(&mut buf, libc::MSG_TRUNC) {
                Ok(n) if n > self.buf.len() => {
                    return Err(ConntrackError::Malformed(format!(
                        "{op} reply of {n} bytes exceeds the {RECV_BUFFER}-byte buffer"
                    )))
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(ConntrackError::Io { op, source }),
            }
        }
    }
}

/// `SO_RCVTIMEO`, so a silent kernel cannot hang a sync.
fn set_recv_timeout(socket: &Socket, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        // Below 1_000_000: fits every suseconds_t.
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: the fd is a live socket owned by `socket`; `tv` is a valid timeval whose
    // size is passed alongside it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn kernel_error(op: &'static str, code: i32) -> ConntrackError {
    ConntrackError::Kernel {
        op,
        source: io::Error::from_raw_os_error(code.saturating_neg()),
    }
}

/// The `nfgen_family` byte: it selects the table a dump lists and the family a delete's
/// tuple is parsed as.
fn family_byte(family: IpFamily) -> NetfilterProtoFamily {
    match family {
        IpFamily::V4 => NetfilterProtoFamily::IPv4,
        IpFamily::V6 => NetfilterProtoFamily::IPv6,
    }
}

/// Appends one ctnetlink request to `out` (4-byte aligned, so requests can be sent back
/// to back in one datagram).
fn encode(
    out: &mut Vec<u8>,
    family: NetfilterProtoFamily,
    message: ConntrackMessage,
    flags: u16,
    seq: u32,
) {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut packet = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(family, 0, 0),
            message,
        )),
    );
    packet.finalize();
    let start = out.len();
    let len = packet.buffer_len();
    out.resize(start + len.next_multiple_of(4), 0);
    packet.serialize(&mut out[start..start + len]);
}

/// Decodes one dumped `IPCTNL_MSG_CT_NEW` message (header included).
fn decode_entry(message: &[u8]) -> Option<ConntrackEntry> {
    let parsed = NetlinkMessage::<NetfilterMessage>::deserialize(message).ok()?;
    match parsed.payload {
        NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attributes)),
            ..
        }) => ConntrackEntry::from_attributes(&attributes),
        _ => None,
    }
}

/// One netlink message inside a received datagram.
#[derive(Debug, Clone, Copy)]
struct Frame<'a> {
    msg_type: u16,
    seq: u32,
    /// The whole message, header included.
    bytes: &'a [u8],
}

impl Frame<'_> {
    /// The `int` after the header of `NLMSG_ERROR` (0 = ack, else `-errno`) and
    /// `NLMSG_DONE` (the dump's status); 0 if absent.
    fn error_code(&self) -> i32 {
        self.bytes
            .get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, i32::from_ne_bytes)
    }
}

/// Splits a datagram into its netlink messages.
fn frames(datagram: &[u8]) -> Result<Vec<Frame<'_>>, ConntrackError> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while rest.len() >= NLMSG_HDRLEN {
        let field = |range: std::ops::Range<usize>| &rest[range];
        let len = u32::from_ne_bytes(field(0..4).try_into().unwrap_or_default()) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(ConntrackError::Malformed(format!(
                "message length {len} with {} bytes left",
                rest.len()
            )));
        }
        out.push(Frame {
            msg_type: u16::from_ne_bytes(field(4..6).try_into().unwrap_or_default()),
            seq: u32::from_ne_bytes(field(8..12).try_into().unwrap_or_default()),
            bytes: &rest[..len],
        });
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kproxy_backend_api::{
        CategorizedEndpoints, Endpoint, ServiceName, ServicePort, ServicePortName, ServicePortPlan,
        TrafficPolicy,
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test socket address")
    }

    fn endpoint(ip_: &str, serving: bool, terminating: bool) -> Endpoint {
        Endpoint {
            ip: ip(ip_),
            port: 5353,
            node_name: None,
            zone: None,
            is_local: false,
            ready: serving && !terminating,
            serving,
            terminating,
            zone_hints: Vec::new(),
            node_hints: Vec::new(),
        }
    }

    fn plan(
        name: &str,
        protocol: Protocol,
        cluster_ip: &str,
        port: u16,
        node_port: Option<u16>,
        endpoints: Vec<Endpoint>,
    ) -> ServicePortPlan {
        let cluster_ip = ip(cluster_ip);
        ServicePortPlan {
            port: ServicePort {
                name: ServicePortName::new(ServiceName::new("ns", name), "p", protocol),
                family: IpFamily::of(&cluster_ip),
                cluster_ip,
                port,
                node_port,
                external_ips: Vec::new(),
                load_balancer_ips: Vec::new(),
                source_ranges: Vec::new(),
                session_affinity_seconds: None,
                external_policy: TrafficPolicy::Cluster,
                internal_policy: TrafficPolicy::Cluster,
                health_check_node_port: None,
            },
            endpoints,
            categorized: CategorizedEndpoints::default(),
        }
    }

    fn plans(ports: Vec<ServicePortPlan>) -> ServicePlans {
        let mut out = ServicePlans::new();
        for p in ports {
            out.entry(p.port.name.service.clone()).or_default().push(p);
        }
        out
    }

    fn entry(protocol: u8, orig_src: &str, orig_dst: &str, reply_src: &str) -> ConntrackEntry {
        let (orig_src, orig_dst, reply_src) = (sa(orig_src), sa(orig_dst), sa(reply_src));
        ConntrackEntry {
            family: IpFamily::of(&orig_src.ip()),
            protocol,
            orig_src,
            orig_dst,
            reply_src,
            reply_dst: orig_src,
            zone: 0,
            orig_tuple_zone: None,
            id: Some(7),
            status: 0,
        }
    }

    fn udp(orig_dst: &str, reply_src: &str) -> ConntrackEntry {
        entry(IPPROTO_UDP, "10.180.2.100:40000", orig_dst, reply_src)
    }

    /// svc: ClusterIP 172.30.0.10:53, NodePort 30053, external IP 192.168.99.1, LB 1.2.3.4;
    /// endpoints .1 (ready), .2 (terminating, serving), .3 (not serving).
    fn dns_index() -> UdpServiceIndex {
        let mut p = plan(
            "dns",
            Protocol::Udp,
            "172.30.0.10",
            53,
            Some(30053),
            vec![
                endpoint("10.180.0.1", true, false),
                endpoint("10.180.0.2", true, true),
                endpoint("10.180.0.3", false, true),
            ],
        );
        p.port.external_ips = vec![ip("192.168.99.1")];
        p.port.load_balancer_ips = vec![ip("1.2.3.4")];
        UdpServiceIndex::from_plans(IpFamily::V4, &plans(vec![p]))
    }

    #[test]
    fn reply_from_a_removed_endpoint_is_stale() {
        assert!(dns_index().is_stale(&udp("172.30.0.10:53", "10.180.0.9:5353")));
    }

    #[test]
    fn reply_from_a_serving_endpoint_is_kept() {
        let index = dns_index();
        assert!(!index.is_stale(&udp("172.30.0.10:53", "10.180.0.1:5353")));
        // Only the IP counts, as upstream: the target port may differ.
        assert!(!index.is_stale(&udp("172.30.0.10:53", "10.180.0.1:9999")));
    }

    #[test]
    fn terminating_but_serving_endpoint_is_kept() {
        assert!(!dns_index().is_stale(&udp("172.30.0.10:53", "10.180.0.2:5353")));
    }

    #[test]
    fn not_serving_endpoint_is_stale() {
        assert!(dns_index().is_stale(&udp("172.30.0.10:53", "10.180.0.3:5353")));
    }

    #[test]
    fn black_hole_entry_is_stale() {
        // Created while nothing DNATed: the reply comes "from" the ClusterIP itself.
        assert!(dns_index().is_stale(&udp("172.30.0.10:53", "172.30.0.10:53")));
    }

    #[test]
    fn external_and_load_balancer_ips_are_frontends() {
        let index = dns_index();
        assert!(index.is_stale(&udp("192.168.99.1:53", "10.180.0.9:5353")));
        assert!(index.is_stale(&udp("1.2.3.4:53", "1.2.3.4:53")));
        assert!(!index.is_stale(&udp("1.2.3.4:53", "10.180.0.1:5353")));
    }

    #[test]
    fn other_ports_of_a_service_ip_are_untouched() {
        assert!(!dns_index().is_stale(&udp("172.30.0.10:54", "172.30.0.10:54")));
    }

    #[test]
    fn tcp_and_other_protocols_are_never_stale() {
        let index = dns_index();
        for protocol in [IPPROTO_TCP, IPPROTO_SCTP, 1] {
            let e = entry(
                protocol,
                "10.180.2.100:40000",
                "172.30.0.10:53",
                "10.180.0.9:53",
            );
            assert!(!index.is_stale(&e), "protocol {protocol}");
        }
    }

    #[test]
    fn node_port_entries_match_any_address() {
        let index = dns_index();
        assert!(index.is_stale(&udp("192.168.0.2:30053", "10.180.0.9:5353")));
        assert!(index.is_stale(&udp("10.180.2.254:30053", "10.180.2.254:30053")));
        assert!(!index.is_stale(&udp("192.168.0.2:30053", "10.180.0.1:5353")));
        assert!(!index.is_stale(&udp("192.168.0.2:30054", "10.180.0.9:5353")));
    }

    #[test]
    fn tcp_service_ports_are_not_indexed() {
        let p = plan(
            "web",
            Protocol::Tcp,
            "172.30.0.20",
            53,
            Some(30080),
            vec![endpoint("10.180.0.1", true, false)],
        );
        let index = UdpServiceIndex::from_plans(IpFamily::V4, &plans(vec![p]));
        assert!(index.is_empty());
        assert!(!index.is_stale(&udp("172.30.0.20:53", "10.180.0.9:53")));
        assert!(!index.is_stale(&udp("192.168.0.2:30080", "10.180.0.9:53")));
    }

    #[test]
    fn other_families_are_ignored() {
        let v4 = dns_index();
        // A v6 entry to the same NodePort is not this family's business.
        let e6 = entry(
            IPPROTO_UDP,
            "[fd00::100]:40000",
            "[fd00::2]:30053",
            "[fd00:10:180::9]:5353",
        );
        assert!(!v4.is_stale(&e6));
        // And v6 plans ignore v4 entries and v4 ports.
        let p6 = plan(
            "dns6",
            Protocol::Udp,
            "fd00:10:96::10",
            53,
            Some(30053),
            vec![endpoint("fd00:10:180::1", true, false)],
        );
        let v6 = UdpServiceIndex::from_plans(IpFamily::V6, &plans(vec![p6.clone()]));
        assert!(!v6.is_stale(&udp("192.168.0.2:30053", "10.180.0.9:5353")));
        assert!(v6.is_stale(&e6));
        assert!(UdpServiceIndex::from_plans(IpFamily::V4, &plans(vec![p6])).is_empty());
    }

    #[test]
    fn service_without_serving_endpoints_is_left_alone() {
        let p = plan(
            "empty",
            Protocol::Udp,
            "172.30.0.30",
            53,
            Some(30030),
            vec![endpoint("10.180.0.3", false, true)],
        );
        let index = UdpServiceIndex::from_plans(IpFamily::V4, &plans(vec![p]));
        assert!(index.is_empty());
        assert!(!index.is_stale(&udp("172.30.0.30:53", "172.30.0.30:53")));
    }

    #[test]
    fn shared_frontend_allows_either_services_endpoints() {
        let mut a = plan(
            "a",
            Protocol::Udp,
            "172.30.0.41",
            53,
            None,
            vec![endpoint("10.180.0.1", true, false)],
        );
        let mut b = plan(
            "b",
            Protocol::Udp,
            "172.30.0.42",
            53,
            None,
            vec![endpoint("10.180.0.2", true, false)],
        );
        a.port.external_ips = vec![ip("192.168.99.5")];
        b.port.external_ips = vec![ip("192.168.99.5")];
        let index = UdpServiceIndex::from_plans(IpFamily::V4, &plans(vec![a, b]));
        assert!(!index.is_stale(&udp("192.168.99.5:53", "10.180.0.1:53")));
        assert!(!index.is_stale(&udp("192.168.99.5:53", "10.180.0.2:53")));
        assert!(index.is_stale(&udp("192.168.99.5:53", "10.180.0.3:53")));
    }

    /// A dump message as the kernel sends it (nested flags set, CTA_ZONE, CTA_ID, status,
    /// counters), decoded to an entry.
    #[test]
    fn decodes_a_kernel_style_dump_message() {
        fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
            out.extend_from_slice(&kind.to_ne_bytes());
            out.extend_from_slice(value);
            out.resize(out.len().next_multiple_of(4), 0);
            out
        }
        const NESTED: u16 = 1 << 15;
        let tuple = |src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16| {
            let ip = [nla(1, &src), nla(2, &dst)].concat();
            let proto = [
                nla(1, &[17]),
                nla(2, &sport.to_be_bytes()),
                nla(3, &dport.to_be_bytes()),
            ]
            .concat();
            [nla(1 | NESTED, &ip), nla(2 | NESTED, &proto)].concat()
        };
        let mut payload = vec![2u8, 0, 0, 0]; // nfgenmsg: AF_INET, v0, res_id 0
        payload.extend(nla(
            1 | NESTED,
            &tuple([10, 180, 2, 100], [172, 30, 0, 10], 40000, 53),
        ));
        payload.extend(nla(
            2 | NESTED,
            &tuple([10, 180, 0, 1], [10, 180, 2, 100], 5353, 40000),
        ));
        payload.extend(nla(3, &0x18eu32.to_be_bytes())); // CTA_STATUS
        payload.extend(nla(7, &29u32.to_be_bytes())); // CTA_TIMEOUT
        payload.extend(nla(12, &0xdead_beefu32.to_be_bytes())); // CTA_ID
        payload.extend(nla(18, &5u16.to_be_bytes())); // CTA_ZONE
        payload.extend(nla(9 | NESTED, &nla(1, &7u64.to_be_bytes()))); // CTA_COUNTERS_ORIG
        let mut message = Vec::new();
        message.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        message.extend_from_slice(&(NFNL_SUBSYS_CTNETLINK << 8).to_ne_bytes());
        message.extend_from_slice(&2u16.to_ne_bytes()); // NLM_F_MULTI
        message.extend_from_slice(&9u32.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes());
        message.extend(payload);

        let frames = frames(&message).expect("frames");
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].seq, 9);
        let e = decode_entry(frames[0].bytes).expect("decodes");
        assert_eq!(
            e,
            ConntrackEntry {
                family: IpFamily::V4,
                protocol: IPPROTO_UDP,
                orig_src: sa("10.180.2.100:40000"),
                orig_dst: sa("172.30.0.10:53"),
                reply_src: sa("10.180.0.1:5353"),
                reply_dst: sa("10.180.2.100:40000"),
                zone: 5,
                orig_tuple_zone: None,
                id: Some(0xdead_beef),
                status: 0x18e,
            }
        );
    }

    /// A delete request decodes back to the entry's original tuple, zone and id.
    #[test]
    fn delete_request_round_trips() {
        for (e, family) in [
            (udp("172.30.0.10:53", "10.180.0.9:5353"), 2u8),
            (
                entry(
                    IPPROTO_UDP,
                    "[fd00:10:180:2::100]:40000",
                    "[fd00:10:96::10]:53",
                    "[fd00:10:180::9]:5353",
                ),
                10,
            ),
        ] {
            let mut e = e;
            e.zone = 3;
            e.orig_tuple_zone = Some(4);
            let mut buf = Vec::new();
            let message = ConntrackMessage::Delete(e.delete_attributes().expect("attributes"));
            encode(
                &mut buf,
                family_byte(e.family),
                message,
                NLM_F_REQUEST | NLM_F_ACK,
                42,
            );
            assert_eq!(buf.len() % 4, 0);
            // nfgenmsg family byte right after the netlink header.
            assert_eq!(buf[NLMSG_HDRLEN], family);
            let parsed = NetlinkMessage::<NetfilterMessage>::deserialize(&buf).expect("parses");
            assert_eq!(parsed.header.sequence_number, 42);
            assert_eq!(parsed.header.flags, NLM_F_REQUEST | NLM_F_ACK);
            assert_eq!(parsed.header.message_type, NFNL_SUBSYS_CTNETLINK << 8 | 2);
            let NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::Conntrack(ConntrackMessage::Delete(attrs)),
                ..
            }) = parsed.payload
            else {
                panic!("not a conntrack delete");
            };
            let orig = attrs
                .iter()
                .find_map(|a| match a {
                    ConntrackAttribute::CtaTupleOrig(t) => Some(ParsedTuple::from(t)),
                    _ => None,
                })
                .expect("original tuple");
            assert_eq!(orig.src, Some(e.orig_src.ip()));
            assert_eq!(orig.dst, Some(e.orig_dst.ip()));
            assert_eq!(orig.protocol, Some(IPPROTO_UDP));
            assert_eq!((orig.src_port, orig.dst_port), (40000, e.orig_dst.port()));
            assert_eq!(orig.zone, Some(4));
            let others: Vec<(u16, Vec<u8>)> = attrs
                .iter()
                .filter_map(|a| match a {
                    ConntrackAttribute::Other(nla) => Some((nla.kind(), nla_value(nla))),
                    _ => None,
                })
                .collect();
            assert_eq!(
                others,
                vec![
                    (CTA_ZONE, vec![0, 3]),
                    (CTA_ID, 7u32.to_be_bytes().to_vec())
                ]
            );
            assert!(!attrs
                .iter()
                .any(|a| matches!(a, ConntrackAttribute::CtaTupleReply(_))));
        }
    }

    #[test]
    fn default_zone_and_missing_id_are_omitted() {
        let mut e = udp("172.30.0.10:53", "10.180.0.9:5353");
        e.id = None;
        let attrs = e.delete_attributes().expect("attributes");
        assert_eq!(attrs.len(), 1, "{attrs:?}");
    }

    #[test]
    fn portless_entries_cannot_be_deleted_by_tuple() {
        let e = entry(1, "10.0.0.1:0", "10.0.0.2:0", "10.0.0.2:0");
        assert!(matches!(
            e.delete_attributes(),
            Err(ConntrackError::UnsupportedProtocol { protocol: 1 })
        ));
    }

    #[test]
    fn frames_split_back_to_back_messages_and_read_error_codes() {
        let mut buf = Vec::new();
        for (seq, code) in [(1u32, 0i32), (2, -libc::ENOENT)] {
            buf.extend_from_slice(&36u32.to_ne_bytes());
            buf.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            buf.extend_from_slice(&0u16.to_ne_bytes());
            buf.extend_from_slice(&seq.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            buf.extend_from_slice(&code.to_ne_bytes());
            buf.extend_from_slice(&[0; 16]); // the echoed request header
        }
        let frames = frames(&buf).expect("frames");
        let got: Vec<(u16, u32, i32)> = frames
            .iter()
            .map(|f| (f.msg_type, f.seq, f.error_code()))
            .collect();
        assert_eq!(
            got,
            vec![(NLMSG_ERROR, 1, 0), (NLMSG_ERROR, 2, -libc::ENOENT)]
        );
    }

    #[test]
    fn handle_can_move_to_the_reconciler_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<Conntrack>();
    }

    #[test]
    fn truncated_datagrams_are_malformed() {
        let mut buf = 100u32.to_ne_bytes().to_vec();
        buf.extend_from_slice(&[0; 12]);
        assert!(matches!(frames(&buf), Err(ConntrackError::Malformed(_))));
    }

    #[test]
    fn incomplete_tuples_are_skipped() {
        let attrs = vec![ConntrackAttribute::CtaTupleOrig(vec![Tuple::Ip(vec![
            IPTuple::SourceAddress(ip("10.0.0.1")),
        ])])];
        assert_eq!(ConntrackEntry::from_attributes(&attrs), None);
    }
}
