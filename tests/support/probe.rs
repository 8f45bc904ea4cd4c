//! Real-traffic probes: what a client in some namespace experiences when it
//! talks to an address.
//!
//! A probe opens a fresh socket inside the client namespace (so each probe
//! is a new conntrack entry and a new load-balancing decision), optionally
//! bound to a chosen source address, and classifies the result:
//!
//! | what happened                                   | [`Outcome`]        |
//! |-------------------------------------------------|--------------------|
//! | a responder ([`super::Server`]) answered        | `Answered`         |
//! | ICMP port unreachable, TCP RST, SCTP ABORT      | `Rejected`         |
//! | nothing came back within the timeout            | `Dropped`          |
//! | any other error (no route, host unreachable...) | `Unreachable(why)` |
//!
//! nftables `reject` sends ICMP port unreachable (or a TCP reset); both
//! surface as ECONNREFUSED, which is why that errno alone means `Rejected`.

use std::collections::BTreeSet;
use std::fmt;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use super::netns::Netns;
use super::sctp::{self, Packet, IPPROTO_SCTP};
use super::server::parse_reply;
use super::sys;

/// How long a probe waits for an answer before calling it `Dropped`.
/// Everything is local veth traffic, so an answer takes well under a
/// millisecond; the margin only absorbs a loaded CI machine.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(1500);

/// Transport protocol of a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    /// All protocols Kubernetes services support.
    pub const ALL: [Proto; 3] = [Proto::Tcp, Proto::Udp, Proto::Sctp];

    /// The spelling Kubernetes and nftables use (`TCP` / `tcp`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a client experienced; see the module documentation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A responder answered. `endpoint` is the address and port the request
    /// was finally delivered to; `seen_source` the client address as the
    /// endpoint saw it (differs from the client's own when masqueraded).
    Answered {
        endpoint: SocketAddr,
        seen_source: IpAddr,
    },
    /// Actively refused: ICMP port unreachable, TCP RST or SCTP ABORT.
    Rejected,
    /// No answer within the timeout.
    Dropped,
    /// Any other failure, described.
    Unreachable(String),
}

impl Outcome {
    pub fn is_answered(&self) -> bool {
        matches!(self, Outcome::Answered { .. })
    }

    /// The answering endpoint, if any.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        match self {
            Outcome::Answered { endpoint, .. } => Some(*endpoint),
            _ => None,
        }
    }

    /// The source address the endpoint saw, if it answered.
    pub fn seen_source(&self) -> Option<IpAddr> {
        match self {
            Outcome::Answered { seen_source, .. } => Some(*seen_source),
            _ => None,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Answered {
                endpoint,
                seen_source,
            } => write!(f, "answered by {endpoint} (saw source {seen_source})"),
            Outcome::Rejected => f.write_str("rejected"),
            Outcome::Dropped => f.write_str("dropped"),
            Outcome::Unreachable(why) => write!(f, "unreachable: {why}"),
        }
    }
}

/// A configurable probe; the `probe_*` functions are shorthands for it.
///
/// ```ignore
/// let out = Probe::udp(&topo.ext, "192.168.0.2:30053".parse()?)
///     .from(EXT_CLIENT.into())
///     .timeout(Duration::from_millis(500))
///     .run();
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Probe<'a> {
    ns: &'a Netns,
    proto: Proto,
    src: Option<IpAddr>,
    dst: SocketAddr,
    timeout: Duration,
}

impl<'a> Probe<'a> {
    pub fn new(proto: Proto, ns: &'a Netns, dst: SocketAddr) -> Probe<'a> {
        Probe {
            ns,
            proto,
            src: None,
            dst,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn tcp(ns: &'a Netns, dst: SocketAddr) -> Probe<'a> {
        Probe::new(Proto::Tcp, ns, dst)
    }

    pub fn udp(ns: &'a Netns, dst: SocketAddr) -> Probe<'a> {
        Probe::new(Proto::Udp, ns, dst)
    }

    pub fn sctp(ns: &'a Netns, dst: SocketAddr) -> Probe<'a> {
        Probe::new(Proto::Sctp, ns, dst)
    }

    /// Sends from `src`, which must be an address of the client namespace.
    pub fn from(self, src: IpAddr) -> Probe<'a> {
        self.src(Some(src))
    }

    /// Sends from `src`, or from whatever the kernel picks when `None`.
    pub fn src(mut self, src: Option<IpAddr>) -> Probe<'a> {
        self.src = src;
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Probe<'a> {
        self.timeout = timeout;
        self
    }

    /// Sends one probe and reports what happened.
    pub fn run(&self) -> Outcome {
        let probe = *self;
        self.ns.in_ns(move || probe.attempt().outcome)
    }

    /// Sends `n` probes one after the other, each from a new socket, and
    /// summarises them (see [`Tally`]).
    pub fn run_many(&self, n: usize) -> Tally {
        let probe = *self;
        self.ns.in_ns(move || {
            let mut tally = Tally::default();
            for _ in 0..n {
                tally.record(probe.attempt());
            }
            tally
        })
    }

    /// One attempt; must run on a thread inside the client namespace.
    fn attempt(&self) -> Attempt {
        match self.proto {
            Proto::Tcp => tcp_attempt(self.src, self.dst, self.timeout),
            Proto::Udp => udp_attempt(self.src, self.dst, self.timeout),
            Proto::Sctp => sctp_attempt(self.src, self.dst, self.timeout),
        }
    }
}

/// Probes `dst` over TCP from `ns`; see [`Probe`].
pub fn probe_tcp(ns: &Netns, src: Option<IpAddr>, dst: SocketAddr) -> Outcome {
    Probe::tcp(ns, dst).src(src).run()
}

/// Probes `dst` over UDP from `ns`; see [`Probe`].
pub fn probe_udp(ns: &Netns, src: Option<IpAddr>, dst: SocketAddr) -> Outcome {
    Probe::udp(ns, dst).src(src).run()
}

/// Probes `dst` with an SCTP INIT from `ns`; see [`Probe`] and
/// [`super::sctp`]. Answered means an INIT ACK came back through the reverse
/// NAT path, carrying what the endpoint saw.
pub fn probe_sctp(ns: &Netns, src: Option<IpAddr>, dst: SocketAddr) -> Outcome {
    Probe::sctp(ns, dst).src(src).run()
}

/// Probes `dst` with `proto` from `ns`; see [`Probe`].
pub fn probe(proto: Proto, ns: &Netns, src: Option<IpAddr>, dst: SocketAddr) -> Outcome {
    Probe::new(proto, ns, dst).src(src).run()
}

/// Sends `n` probes and summarises them, for load-balanced services where a
/// single probe only shows one random endpoint.
pub fn probe_many(
    n: usize,
    proto: Proto,
    ns: &Netns,
    src: Option<IpAddr>,
    dst: SocketAddr,
) -> Tally {
    Probe::new(proto, ns, dst).src(src).run_many(n)
}

/// Summary of repeated probes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub attempts: usize,
    pub answered: usize,
    /// Every distinct endpoint that answered.
    pub endpoints: BTreeSet<SocketAddr>,
    /// Every distinct source address the endpoints saw.
    pub seen_sources: BTreeSet<IpAddr>,
    /// Whether any answer saw a source other than the address the client
    /// actually sent from, i.e. the request was source-NATed on the way.
    pub masqueraded: bool,
    /// The outcomes of attempts that were not answered.
    pub failures: Vec<Outcome>,
}

impl Tally {
    pub fn all_answered(&self) -> bool {
        self.attempts > 0 && self.answered == self.attempts
    }

    fn record(&mut self, attempt: Attempt) {
        self.attempts += 1;
        match attempt.outcome {
            Outcome::Answered {
                endpoint,
                seen_source,
            } => {
                self.answered += 1;
                self.endpoints.insert(endpoint);
                self.seen_sources.insert(seen_source);
                if attempt.client != Some(seen_source) {
                    self.masqueraded = true;
                }
            }
            other => self.failures.push(other),
        }
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} answered by {:?}, sources seen {:?}{}",
            self.answered,
            self.attempts,
            self.endpoints,
            self.seen_sources,
            if self.masqueraded {
                " (masqueraded)"
            } else {
                ""
            }
        )?;
        if !self.failures.is_empty() {
            write!(f, "; failures: {:?}", self.failures)?;
        }
        Ok(())
    }
}

/// One probe's outcome plus the source address the client really used, so
/// a [`Tally`] can tell masqueraded answers apart.
struct Attempt {
    outcome: Outcome,
    client: Option<IpAddr>,
}

impl Attempt {
    fn of(outcome: Outcome) -> Attempt {
        Attempt {
            outcome,
            client: None,
        }
    }

    fn failed(why: String) -> Attempt {
        Attempt::of(Outcome::Unreachable(why))
    }
}

/// Maps a socket error to an outcome: refusals are `Rejected`, timeouts
/// `Dropped`, everything else is described.
fn classify(context: &str, e: io::Error) -> Outcome {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => Outcome::Rejected,
        Some(libc::ETIMEDOUT) => Outcome::Dropped,
        _ if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) =>
        {
            Outcome::Dropped
        }
        _ => Outcome::Unreachable(format!("{context}: {e}")),
    }
}

/// Interprets the reply text of a responder.
fn answered(dst: SocketAddr, bytes: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(bytes);
    match parse_reply(&text) {
        Some((endpoint, seen_source)) => Outcome::Answered {
            endpoint,
            seen_source,
        },
        None => Outcome::Unreachable(format!("unexpected reply via {dst}: {text:?}")),
    }
}

/// Connects over TCP and reads the reply line.
///
/// IP_RECVERR is on because of a veth subtlety: the SYN can be forwarded,
/// rejected and its ICMP error delivered back within the connect() call
/// itself, while the socket is still locked by it. TCP then only records
/// a "soft" error and waits for the SYN retransmission a second later. The
/// error queue receives the ICMP error regardless, so refusals are seen at
/// once and not misread as drops.
fn tcp_attempt(src: Option<IpAddr>, dst: SocketAddr, timeout: Duration) -> Attempt {
    let deadline = Instant::now() + timeout;
    let fd = match sys::socket(
        sys::family(dst.ip()),
        libc::SOCK_STREAM | libc::SOCK_NONBLOCK,
        0,
    ) {
        Ok(fd) => fd,
        Err(e) => return Attempt::failed(format!("tcp socket: {e}")),
    };
    if let Err(e) = sys::enable_recverr(&fd, dst.is_ipv6()) {
        return Attempt::failed(format!("enable RECVERR: {e}"));
    }
    if let Some(src) = src {
        if let Err(e) = sys::bind(&fd, SocketAddr::new(src, 0)) {
            return Attempt::failed(format!("bind tcp to {src}: {e}"));
        }
    }
    match sys::connect(&fd, dst) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => loop {
            let events = match sys::wait_until(&fd, libc::POLLOUT, deadline) {
                Ok(0) => return Attempt::of(Outcome::Dropped),
                Ok(events) => events,
                Err(e) => return Attempt::failed(format!("poll tcp connect: {e}")),
            };
            match sys::take_error(&fd) {
                Ok(None) => {}
                Ok(Some(e)) => return Attempt::of(classify("tcp connect", e)),
                Err(e) => return Attempt::failed(format!("SO_ERROR: {e}")),
            }
            match sys::take_queued_error(&fd) {
                Ok(None) => {}
                Ok(Some(e)) => return Attempt::of(classify("tcp connect (ICMP)", e)),
                Err(e) => return Attempt::failed(format!("MSG_ERRQUEUE: {e}")),
            }
            if events & libc::POLLOUT != 0 {
                break;
            }
        },
        Err(e) => return Attempt::of(classify("tcp connect", e)),
    }
    let client = sys::local_addr(&fd).ok().map(|a| a.ip());
    let stream = TcpStream::from(fd);
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    if let Err(e) = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(left)))
    {
        return Attempt::failed(format!("tcp socket options: {e}"));
    }
    let mut reply = Vec::new();
    let outcome = match stream.take(512).read_to_end(&mut reply) {
        Ok(_) => answered(dst, &reply),
        Err(e) => Outcome::Unreachable(format!(
            "connected to {dst} but got no reply line ({e}); partial reply {:?}",
            String::from_utf8_lossy(&reply)
        )),
    };
    Attempt { outcome, client }
}

fn udp_attempt(src: Option<IpAddr>, dst: SocketAddr, timeout: Duration) -> Attempt {
    let bind_to = SocketAddr::new(src.unwrap_or(sys::unspecified_like(dst.ip())), 0);
    let socket = match UdpSocket::bind(bind_to) {
        Ok(s) => s,
        Err(e) => return Attempt::failed(format!("bind udp to {bind_to}: {e}")),
    };
    if let Err(e) = socket.connect(dst) {
        return Attempt::of(classify("udp connect", e));
    }
    let client = socket.local_addr().ok().map(|a| a.ip());
    // Without RECVERR, UDP ignores "soft" ICMP errors such as host
    // unreachable and the probe would misreport them as drops.
    if let Err(e) = sys::enable_recverr(&socket, dst.is_ipv6()) {
        return Attempt::failed(format!("enable RECVERR: {e}"));
    }
    if let Err(e) = socket.set_read_timeout(Some(timeout)) {
        return Attempt::failed(format!("udp read timeout: {e}"));
    }
    if let Err(e) = socket.send(b"kproxy probe\n") {
        return Attempt::of(classify("udp send", e));
    }
    let mut buf = [0u8; 512];
    let outcome = match socket.recv(&mut buf) {
        Ok(n) => answered(dst, &buf[..n]),
        Err(e) => classify("udp recv", e),
    };
    Attempt { outcome, client }
}

/// Sends an SCTP INIT over a raw socket and waits for the INIT ACK (answer),
/// an ABORT or ICMP error (rejection), or the deadline (drop). The raw
/// socket is connected to `dst` so the kernel only hands it packets from
/// `dst` — a reply that was not reverse-NATed back to the service address
/// is never seen, as with a real SCTP socket — and, with IP_RECVERR, ICMP
/// errors about our packets surface as socket errors.
fn sctp_attempt(src: Option<IpAddr>, dst: SocketAddr, timeout: Duration) -> Attempt {
    let deadline = Instant::now() + timeout;
    let is_v4 = dst.is_ipv4();
    let fd = match sys::socket(
        sys::family(dst.ip()),
        libc::SOCK_RAW | libc::SOCK_NONBLOCK,
        IPPROTO_SCTP,
    ) {
        Ok(fd) => fd,
        Err(e) => return Attempt::failed(format!("raw sctp socket: {e}")),
    };
    if let Err(e) = sys::enable_recverr(&fd, !is_v4) {
        return Attempt::failed(format!("enable RECVERR: {e}"));
    }
    if let Some(src) = src {
        if let Err(e) = sys::bind(&fd, SocketAddr::new(src, 0)) {
            return Attempt::failed(format!("bind raw sctp to {src}: {e}"));
        }
    }
    // Port 0: raw sockets have no ports (and IPv6 ones read it as protocol).
    if let Err(e) = sys::connect(&fd, SocketAddr::new(dst.ip(), 0)) {
        return Attempt::of(classify("sctp connect", e));
    }
    let client = sys::local_addr(&fd).ok().map(|a| a.ip());
    let src_port = sctp::next_source_port();
    let tag = sctp::random_u32();
    if let Err(e) = sys::send(&fd, &sctp::init(src_port, dst.port(), tag)) {
        return Attempt::of(classify("sctp send", e));
    }
    let mut buf = [0u8; 4096];
    let outcome = loop {
        match sys::wait_until(&fd, libc::POLLIN, deadline) {
            Ok(0) => break Outcome::Dropped,
            Ok(_) => {}
            Err(e) => break Outcome::Unreachable(format!("poll raw sctp: {e}")),
        }
        let n = match sys::recv_from(&fd, &mut buf) {
            Ok((n, _)) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => break classify("sctp", e),
        };
        let payload = if is_v4 {
            match sctp::split_ipv4(&buf[..n]) {
                Some((_, _, payload)) => payload,
                None => continue,
            }
        } else {
            &buf[..n]
        };
        let Some(reply) = Packet::parse(payload) else {
            continue;
        };
        // Other probes' replies and our own INIT looped back to a server in
        // this namespace also reach this socket; only ours count.
        if reply.src_port != dst.port() || reply.dst_port != src_port || reply.vtag != tag {
            continue;
        }
        if !reply.checksum_ok {
            break Outcome::Unreachable(format!(
                "SCTP reply via {dst} has a bad CRC32c (a NAT step did not fix it up)"
            ));
        }
        match reply.chunk_type {
            sctp::CHUNK_INIT_ACK => match reply.param(sctp::PARAM_STATE_COOKIE) {
                Some(cookie) => break answered(dst, cookie),
                None => break Outcome::Unreachable(format!("INIT ACK via {dst} without cookie")),
            },
            sctp::CHUNK_ABORT => break Outcome::Rejected,
            _ => continue,
        }
    };
    Attempt { outcome, client }
}
