//! Responders that play the part of service endpoints.
//!
//! A [`Server`] answers TCP connections, UDP datagrams and SCTP INITs on a
//! set of (address, port) pairs inside one namespace. Every answer is the
//! line `<local ip:port> <peer ip>`: the address the packet was finally
//! delivered to (after any DNAT) and the source address the endpoint saw
//! (after any masquerade) — exactly the two facts service tests assert on.
//!
//! Sockets are bound per address rather than to the wildcard so the local
//! address of a UDP datagram or raw SCTP packet is known without
//! IP_PKTINFO, and replies leave from the address the client targeted,
//! which conntrack needs in order to reverse the NAT.

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::netns::Netns;
use super::sctp::{self, Packet, IPPROTO_SCTP};
use super::sys;

/// How long to retry binding an address that is not usable yet (an IPv6
/// address whose link has just come up).
const BIND_PATIENCE: Duration = Duration::from_secs(3);

/// One SCTP INIT seen by a [`Server`], kept for diagnosing probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SctpArrival {
    /// Where the INIT was delivered (post-DNAT address and port).
    pub local: SocketAddr,
    /// Who sent it, as the endpoint saw it (post-SNAT address and port).
    pub peer: SocketAddr,
    /// The INIT's initiate tag: the probe's nonce.
    pub initiate_tag: u32,
    /// Whether the port is served (answered with INIT ACK, else ABORT).
    pub served: bool,
}

/// TCP/UDP/SCTP responders for a set of addresses and ports in one
/// namespace, run by one background thread until the `Server` is dropped.
#[derive(Debug)]
pub struct Server {
    addrs: Vec<IpAddr>,
    ports: Vec<u16>,
    /// Dropping our end of this pair wakes the thread's poll() with POLLHUP.
    stop: Option<UnixStream>,
    thread: Option<JoinHandle<()>>,
    sctp_log: Arc<Mutex<Vec<SctpArrival>>>,
}

impl Server {
    /// Binds every (address, port) for TCP and UDP plus one raw SCTP socket
    /// per address inside `ns`, and returns once all are bound; panics if
    /// any cannot be.
    pub fn start(ns: &Netns, addrs: &[IpAddr], ports: &[u16]) -> Server {
        let (stop, stop_rx) = UnixStream::pair().expect("cannot create server stop socketpair");
        let (ready_tx, ready_rx) = mpsc::channel();
        let sctp_log = Arc::new(Mutex::new(Vec::new()));
        let (thread_addrs, thread_ports, log) = (addrs.to_vec(), ports.to_vec(), sctp_log.clone());
        let thread = ns.spawn_thread(&format!("serve-{}", ns.name()), move || {
            match Responder::open_all(&thread_addrs, &thread_ports) {
                Ok(responders) => {
                    // The receiver only disappears if start() already gave up.
                    let _ = ready_tx.send(Ok(()));
                    serve(&stop_rx, &responders, &thread_ports, &log);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        });
        let result = ready_rx.recv_timeout(BIND_PATIENCE + Duration::from_secs(5));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("server in netns {}: {e}", ns.name()),
            Err(e) => panic!("server in netns {} did not start: {e}", ns.name()),
        }
        Server {
            addrs: addrs.to_vec(),
            ports: ports.to_vec(),
            stop: Some(stop),
            thread: Some(thread),
            sctp_log,
        }
    }

    pub fn addrs(&self) -> &[IpAddr] {
        &self.addrs
    }

    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// Every SCTP INIT received so far, oldest first.
    pub fn sctp_arrivals(&self) -> Vec<SctpArrival> {
        self.sctp_log
            .lock()
            .map(|log| log.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                eprintln!("warning: a server thread panicked");
            }
        }
    }
}

/// The reply line every responder sends.
pub fn reply_line(local: SocketAddr, peer: IpAddr) -> String {
    let local = SocketAddr::new(local.ip().to_canonical(), local.port());
    format!("{local} {}\n", peer.to_canonical())
}

/// Parses a [`reply_line`] into (endpoint, source the endpoint saw).
pub fn parse_reply(text: &str) -> Option<(SocketAddr, IpAddr)> {
    let mut words = text.split_whitespace();
    let endpoint = words.next()?.parse().ok()?;
    let seen = words.next()?.parse().ok()?;
    words.next().is_none().then_some((endpoint, seen))
}

/// One bound socket and how to answer on it.
enum Responder {
    Tcp(TcpListener),
    Udp(UdpSocket),
    /// A raw IPPROTO_SCTP socket bound to `local`.
    Sctp {
        fd: OwnedFd,
        local: IpAddr,
    },
}

impl Responder {
    fn open_all(addrs: &[IpAddr], ports: &[u16]) -> Result<Vec<Responder>, String> {
        let mut all = Vec::new();
        for &ip in addrs {
            for &port in ports {
                let addr = SocketAddr::new(ip, port);
                let tcp = retry_bind(|| TcpListener::bind(addr))
                    .map_err(|e| format!("bind tcp {addr}: {e}"))?;
                tcp.set_nonblocking(true)
                    .map_err(|e| format!("tcp {addr}: {e}"))?;
                all.push(Responder::Tcp(tcp));
                let udp = retry_bind(|| UdpSocket::bind(addr))
                    .map_err(|e| format!("bind udp {addr}: {e}"))?;
                udp.set_nonblocking(true)
                    .map_err(|e| format!("udp {addr}: {e}"))?;
                all.push(Responder::Udp(udp));
            }
            let fd = sys::socket(
                sys::family(ip),
                libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                IPPROTO_SCTP,
            )
            .map_err(|e| format!("raw sctp socket: {e}"))?;
            retry_bind(|| sys::bind(&fd, SocketAddr::new(ip, 0)))
                .map_err(|e| format!("bind raw sctp {ip}: {e}"))?;
            all.push(Responder::Sctp { fd, local: ip });
        }
        Ok(all)
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            Responder::Tcp(s) => s.as_raw_fd(),
            Responder::Udp(s) => s.as_raw_fd(),
            Responder::Sctp { fd, .. } => fd.as_raw_fd(),
        }
    }

    /// Answers everything pending on this socket (it is non-blocking).
    fn answer(&self, ports: &[u16], log: &Mutex<Vec<SctpArrival>>) {
        match self {
            Responder::Tcp(listener) => {
                while let Ok((mut stream, peer)) = listener.accept() {
                    if let Ok(local) = stream.local_addr() {
                        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                        // A client that gave up already is not our problem.
                        let _ = stream.write_all(reply_line(local, peer.ip()).as_bytes());
                    }
                }
            }
            Responder::Udp(socket) => {
                let Ok(local) = socket.local_addr() else {
                    return;
                };
                let mut buf = [0u8; 2048];
                while let Ok((_, peer)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(reply_line(local, peer.ip()).as_bytes(), peer);
                }
            }
            Responder::Sctp { fd, local } => {
                let mut buf = [0u8; 4096];
                while let Ok((n, from)) = sys::recv_from(fd, &mut buf) {
                    if let Some(arrival) = answer_sctp(fd, *local, &buf[..n], from, ports) {
                        match log.lock() {
                            Ok(mut log) => log.push(arrival),
                            Err(poisoned) => poisoned.into_inner().push(arrival),
                        }
                    }
                }
            }
        }
    }
}

/// Handles one packet from a raw SCTP socket bound to `local`: answers a
/// valid INIT with an INIT ACK carrying the reply line (or an ABORT if the
/// port is not served) and ignores everything else, as an SCTP stack would
/// (including packets with a bad checksum).
fn answer_sctp(
    fd: &OwnedFd,
    local: IpAddr,
    buf: &[u8],
    from: Option<SocketAddr>,
    ports: &[u16],
) -> Option<SctpArrival> {
    // IPv4 raw sockets deliver the IP header; IPv6 ones deliver the payload
    // and report the source in the address.
    let (peer_ip, local_ip, payload) = match local {
        IpAddr::V4(_) => {
            let (src, dst, payload) = sctp::split_ipv4(buf)?;
            (IpAddr::V4(src), IpAddr::V4(dst), payload)
        }
        IpAddr::V6(_) => (from?.ip(), local, buf),
    };
    let init = Packet::parse(payload)?;
    if init.chunk_type != sctp::CHUNK_INIT || init.vtag != 0 || !init.checksum_ok {
        return None;
    }
    let tag = init.initiate_tag().filter(|&t| t != 0)?;
    let local_sa = SocketAddr::new(local_ip, init.dst_port);
    let served = ports.contains(&init.dst_port);
    let reply = if served {
        let line = reply_line(local_sa, peer_ip);
        sctp::init_ack(
            init.dst_port,
            init.src_port,
            tag,
            sctp::random_u32(),
            line.as_bytes(),
        )
    } else {
        sctp::abort(init.dst_port, init.src_port, tag)
    };
    // Port 0: for raw IPv6 sockets a non-zero port would mean "protocol".
    let _ = sys::send_to(fd, &reply, SocketAddr::new(peer_ip, 0));
    Some(SctpArrival {
        local: local_sa,
        peer: SocketAddr::new(peer_ip, init.src_port),
        initiate_tag: tag,
        served,
    })
}

/// Polls all responders until `stop`'s peer is dropped.
fn serve(
    stop: &UnixStream,
    responders: &[Responder],
    ports: &[u16],
    log: &Mutex<Vec<SctpArrival>>,
) {
    let mut fds: Vec<libc::pollfd> = std::iter::once(stop.as_raw_fd())
        .chain(responders.iter().map(Responder::raw_fd))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        fds.iter_mut().for_each(|p| p.revents = 0);
        match sys::poll(&mut fds, None) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("warning: server poll failed, responders stop: {e}");
                return;
            }
        }
        if fds[0].revents != 0 {
            return;
        }
        for (pfd, responder) in fds[1..].iter().zip(responders) {
            if pfd.revents != 0 {
                responder.answer(ports, log);
            }
        }
    }
}

/// Retries `bind` while the address is not (yet) available.
fn retry_bind<T>(mut bind: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let deadline = Instant::now() + BIND_PATIENCE;
    loop {
        match bind() {
            Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}
