//! Netlink framing and a synchronous `NETLINK_GENERIC` connection.
//!
//! Nothing here knows IPVS: messages are built with [`encode_message`] around any generic
//! netlink payload, and [`Connection`] sends buffers of back-to-back messages and reads
//! the replies by sequence number. That is what lets the batching machinery be tested on
//! a kernel without IPVS, with the always-present `nlctrl` family.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use netlink_packet_core::{
    Emitable, ErrorBuffer, NetlinkBuffer, NetlinkHeader, NlasIterator, NLMSG_DONE, NLMSG_ERROR,
    NLM_F_ACK, NLM_F_REQUEST,
};
use netlink_packet_generic::constants::{
    CTRL_ATTR_FAMILY_ID, CTRL_CMD_GETFAMILY, CTRL_CMD_NEWFAMILY, GENL_HDRLEN, GENL_ID_CTRL,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::GenlHeader;
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr as NetlinkAddr};

use crate::client::MAX_BATCH;
use crate::error::IpvsError;
use crate::messages::ParseError;

/// Netlink message header length (`NLMSG_HDRLEN`).
pub(crate) const NLMSG_HDRLEN: usize = 16;
/// Receive buffer: the kernel caps dump messages at 32 KiB.
const RECV_BUFFER: usize = 64 * 1024;
/// How long one `recv` may block. The kernel answers at once; this only keeps a sync from
/// hanging forever if it does not.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// Socket receive buffer asked for (the kernel doubles it, to 2 MiB). Acknowledgements of
/// one batch are all queued before `sendmsg` returns, so they must fit.
const SOCKET_RCVBUF: usize = 1024 * 1024;
/// Receive buffer space one acknowledgement takes (its skb's truesize), with a margin:
/// measured 768 bytes on x86_64 Linux 6.18, where 256 acks fit the default 208 KiB buffer
/// and 288 overflow it.
const ACK_TRUESIZE_BUDGET: usize = 1024;

/// Appends one netlink message: a header with `msg_type`, `flags` and `seq`, the payload
/// written by `payload`, then zero padding to 4 bytes so messages can follow each other
/// in one buffer.
pub(crate) fn encode_message(
    out: &mut Vec<u8>,
    msg_type: u16,
    flags: u16,
    seq: u32,
    payload: impl FnOnce(&mut Vec<u8>),
) {
    let start = out.len();
    out.resize(start + NLMSG_HDRLEN, 0);
    payload(out);
    let mut header = NetlinkHeader::default();
    header.length = u32::try_from(out.len() - start).unwrap_or(u32::MAX);
    header.message_type = msg_type;
    header.flags = flags;
    header.sequence_number = seq;
    header.emit(&mut out[start..start + NLMSG_HDRLEN]);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// One netlink message inside a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame<'a> {
    pub msg_type: u16,
    pub flags: u16,
    pub seq: u32,
    /// What follows the netlink header, up to the message's length.
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// For `NLMSG_ERROR`: 0 for an acknowledgement, else `-errno`. For `NLMSG_DONE`: the
    /// dump's status (0 when absent). `None` for other messages.
    pub fn status(&self) -> Result<Option<i32>, ParseError> {
        match self.msg_type {
            NLMSG_ERROR => {
                let error =
                    ErrorBuffer::new_checked(self.payload).map_err(|e| ParseError::Attribute {
                        context: "NLMSG_ERROR",
                        reason: e.to_string(),
                    })?;
                Ok(Some(error.code().map_or(0, |c| c.get())))
            }
            NLMSG_DONE => Ok(Some(
                self.payload
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .map_or(0, i32::from_ne_bytes),
            )),
            _ => Ok(None),
        }
    }
}

/// Splits a datagram into its netlink messages; a length that does not fit is an error.
pub(crate) fn frames(datagram: &[u8]) -> Result<Vec<Frame<'_>>, ParseError> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < datagram.len() {
        let rest = &datagram[offset..];
        let buffer = NetlinkBuffer::new_checked(rest).map_err(|e| ParseError::Attribute {
            context: "netlink message",
            reason: e.to_string(),
        })?;
        let len = buffer.length() as usize;
        // new_checked guarantees NLMSG_HDRLEN <= len <= rest.len().
        let payload = rest.get(NLMSG_HDRLEN..len).ok_or(ParseError::Truncated {
            what: "netlink message",
            need: len,
            have: rest.len(),
        })?;
        out.push(Frame {
            msg_type: buffer.message_type(),
            flags: buffer.flags(),
            seq: buffer.sequence_number(),
            payload,
        });
        offset += len.next_multiple_of(4);
    }
    Ok(out)
}

/// What a frame means for a series of requests sent back to back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Observed {
    /// The acknowledgement of request `index`: 0, or `-errno`.
    Ack { index: usize, code: i32 },
    /// A data message answering request `index` (it comes before its ack).
    Data { index: usize },
    /// Not about these requests (left over from an earlier, abandoned operation).
    Unrelated,
}

/// Matches acknowledgements to requests `first_seq, first_seq + 1, …` (wrapping).
#[derive(Debug, Clone)]
pub(crate) struct AckTracker {
    first_seq: u32,
    codes: Vec<Option<i32>>,
    pending: usize,
}

impl AckTracker {
    pub fn new(first_seq: u32, count: usize) -> AckTracker {
        AckTracker {
            first_seq,
            codes: vec![None; count],
            pending: count,
        }
    }

    fn index_of(&self, seq: u32) -> Option<usize> {
        let index = seq.wrapping_sub(self.first_seq) as usize;
        (index < self.codes.len()).then_some(index)
    }

    pub fn observe(&mut self, frame: &Frame<'_>) -> Result<Observed, ParseError> {
        let Some(index) = self.index_of(frame.seq) else {
            return Ok(Observed::Unrelated);
        };
        if self.codes[index].is_some() {
            return Ok(Observed::Unrelated);
        }
        match frame.msg_type {
            NLMSG_ERROR => {
                let code = frame.status()?.unwrap_or(0);
                self.codes[index] = Some(code);
                self.pending -= 1;
                Ok(Observed::Ack { index, code })
            }
            NLMSG_DONE => Ok(Observed::Unrelated),
            _ => Ok(Observed::Data { index }),
        }
    }

    /// Requests still waiting for their acknowledgement.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// How many requests have their acknowledgement.
    pub fn acknowledged(&self) -> usize {
        self.codes.len() - self.pending
    }

    /// Codes per request (0 = success, `-errno`); `None` for those never acknowledged.
    pub fn codes(&self) -> &[Option<i32>] {
        &self.codes
    }
}

/// A `NETLINK_GENERIC` socket of the network namespace it was opened in.
///
/// After an error the connection stays usable: the next operation first discards
/// whatever the failed one left queued.
pub(crate) struct Connection {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
    /// An operation did not finish: replies to it may still be queued (or a dump still
    /// running), so drain the socket before the next request.
    dirty: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("fd", &self.socket.as_raw_fd())
            .field("seq", &self.seq)
            .field("dirty", &self.dirty)
            .finish_non_exhaustive()
    }
}

impl Connection {
    pub fn open() -> Result<Connection, IpvsError> {
        let mut socket = Socket::new(NETLINK_GENERIC).map_err(IpvsError::Open)?;
        socket.bind_auto().map_err(IpvsError::Open)?;
        socket
            .connect(&NetlinkAddr::new(0, 0))
            .map_err(IpvsError::Open)?;
        // Error acks without a copy of the request: smaller acks, more per batch. Older
        // kernels lack the option; harmless.
        let _ = socket.set_cap_ack(true);
        set_rcvbuf(&socket, SOCKET_RCVBUF);
        set_recv_timeout(&socket, RECV_TIMEOUT).map_err(IpvsError::Open)?;
        Ok(Connection {
            socket,
            seq: 0,
            buf: vec![0; RECV_BUFFER],
            dirty: false,
        })
    }

    /// How many acknowledged requests one `sendmsg` may carry without overflowing the
    /// socket's receive buffer (at most [`MAX_BATCH`]).
    pub fn batch_limit(&self) -> usize {
        let rcvbuf = self.socket.get_rx_buf_sz().unwrap_or(0);
        (rcvbuf / ACK_TRUESIZE_BUDGET).clamp(1, MAX_BATCH)
    }

    /// Reserves `count` consecutive sequence numbers; returns the first.
    pub fn reserve_seqs(&mut self, count: usize) -> u32 {
        let first = self.seq.wrapping_add(1);
        self.seq = self
            .seq
            .wrapping_add(u32::try_from(count).unwrap_or(u32::MAX));
        first
    }

    /// Sends `messages` — `count` requests with sequence numbers `first_seq..`, each with
    /// `NLM_F_ACK` — in one `sendmsg`, then reads until every one is acknowledged. Data
    /// messages go to `on_data` with their request's index. The tracker holds the
    /// outcome, also when an error stops the exchange part way.
    pub fn exchange(
        &mut self,
        messages: &[u8],
        tracker: &mut AckTracker,
        op: &'static str,
        on_data: &mut dyn FnMut(usize, &Frame<'_>) -> Result<(), IpvsError>,
    ) -> Result<(), IpvsError> {
        self.begin()?;
        self.send(messages, op)?;
        while tracker.pending() > 0 {
            let n = self.recv(op)?;
            let datagram = &self.buf[..n];
            for frame in frames(datagram)? {
                if let Observed::Data { index } = tracker.observe(&frame)? {
                    on_data(index, &frame)?;
                }
            }
        }
        self.dirty = false;
        Ok(())
    }

    /// Sends one dump request (`seq`) and hands every data message to `on_data` until
    /// `NLMSG_DONE`.
    pub fn dump(
        &mut self,
        message: &[u8],
        seq: u32,
        op: &'static str,
        on_data: &mut dyn FnMut(&Frame<'_>) -> Result<(), IpvsError>,
    ) -> Result<(), IpvsError> {
        self.begin()?;
        self.send(message, op)?;
        loop {
            let n = self.recv(op)?;
            for frame in frames(&self.buf[..n])? {
                if frame.seq != seq {
                    continue;
                }
                match frame.status()? {
                    Some(code) if frame.msg_type == NLMSG_DONE || code < 0 => {
                        // A dump ends with NLMSG_DONE, or with an error instead of it.
                        self.dirty = false;
                        return if code < 0 {
                            Err(IpvsError::kernel(op, code))
                        } else {
                            Ok(())
                        };
                    }
                    Some(_) => {}
                    None => on_data(&frame)?,
                }
            }
        }
    }

    /// Starts an operation: discards what an unfinished earlier one left queued.
    /// Receiving also runs a dump still in progress to its end, which frees the socket.
    fn begin(&mut self) -> Result<(), IpvsError> {
        if self.dirty {
            loop {
                let mut buf = &mut self.buf[..];
                match self.socket.recv(&mut buf, libc::MSG_DONTWAIT) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // ENOBUFS is reported once; the queue keeps draining.
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                    Err(source) => {
                        return Err(IpvsError::Io {
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

    fn send(&self, messages: &[u8], op: &'static str) -> Result<(), IpvsError> {
        let sent = self
            .socket
            .send(messages, 0)
            .map_err(|source| IpvsError::Io { op, source })?;
        if sent != messages.len() {
            return Err(IpvsError::Io {
                op,
                source: io::Error::other(format!("sent {sent} of {} bytes", messages.len())),
            });
        }
        Ok(())
    }

    /// Receives one datagram into `self.buf`; returns its length.
    fn recv(&mut self, op: &'static str) -> Result<usize, IpvsError> {
        loop {
            let mut buf = &mut self.buf[..];
            match self.socket.recv(&mut buf, libc::MSG_TRUNC) {
                Ok(n) if n > self.buf.len() => {
                    return Err(IpvsError::Io {
                        op,
                        source: io::Error::other(format!(
                            "reply of {n} bytes exceeds the {RECV_BUFFER}-byte buffer"
                        )),
                    })
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(IpvsError::Io { op, source }),
            }
        }
    }
}

/// Appends a `CTRL_CMD_GETFAMILY` request for `name` to `out`.
pub(crate) fn encode_get_family(out: &mut Vec<u8>, name: &str, seq: u32) {
    encode_message(out, GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK, seq, |buf| {
        let header = GenlHeader {
            cmd: CTRL_CMD_GETFAMILY,
            version: 2,
        };
        let attrs = [GenlCtrlAttrs::FamilyName(name.to_owned())];
        let start = buf.len();
        buf.resize(
            start + header.buffer_len() + attrs.as_slice().buffer_len(),
            0,
        );
        header.emit(&mut buf[start..]);
        attrs
            .as_slice()
            .emit(&mut buf[start + header.buffer_len()..]);
    });
}

/// The family id in a `CTRL_CMD_NEWFAMILY` reply payload, if it is one.
pub(crate) fn parse_family_id(payload: &[u8]) -> Result<Option<u16>, ParseError> {
    let header = GenlHeader::parse(payload).map_err(|e| ParseError::Attribute {
        context: "nlctrl reply",
        reason: e.to_string(),
    })?;
    if header.cmd != CTRL_CMD_NEWFAMILY {
        return Ok(None);
    }
    let attrs = payload.get(GENL_HDRLEN..).unwrap_or_default();
    for nla in NlasIterator::new(attrs) {
        let nla = nla.map_err(|e| ParseError::Attribute {
            context: "nlctrl reply",
            reason: e.to_string(),
        })?;
        if nla.kind() == CTRL_ATTR_FAMILY_ID {
            let id = nla
                .value()
                .get(..2)
                .and_then(|b| b.try_into().ok())
                .map(u16::from_ne_bytes)
                .ok_or(ParseError::Length {
                    attribute: "CTRL_ATTR_FAMILY_ID",
                    len: nla.value().len(),
                    expected: "2",
                })?;
            return Ok(Some(id));
        }
    }
    Ok(None)
}

/// Resolves a generic netlink family name to its id; `None` if the kernel has no such
/// family (`ENOENT`).
pub(crate) fn resolve_family(conn: &mut Connection, name: &str) -> Result<Option<u16>, IpvsError> {
    let seq = conn.reserve_seqs(1);
    let mut request = Vec::new();
    encode_get_family(&mut request, name, seq);
    let mut tracker = AckTracker::new(seq, 1);
    let mut id = None;
    conn.exchange(&request, &mut tracker, "resolve family", &mut |_, frame| {
        if id.is_none() {
            id = parse_family_id(frame.payload)?;
        }
        Ok(())
    })?;
    match tracker.codes().first().copied().flatten() {
        Some(0) => match id {
            Some(id) => Ok(Some(id)),
            None => Err(IpvsError::Malformed(ParseError::Missing {
                context: "nlctrl reply",
                attribute: "CTRL_ATTR_FAMILY_ID",
            })),
        },
        Some(code) if -code == libc::ENOENT => Ok(None),
        Some(code) => Err(IpvsError::kernel("resolve family", code)),
        None => Err(IpvsError::Io {
            op: "resolve family",
            source: io::Error::other("no acknowledgement"),
        }),
    }
}

/// A bigger receive buffer: `SO_RCVBUFFORCE` (needs CAP_NET_ADMIN, which an IPVS client
/// has anyway), else `SO_RCVBUF` (capped by `net.core.rmem_max`). Failure keeps the default,
/// and batches stay small enough for it.
fn set_rcvbuf(socket: &Socket, size: usize) {
    let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: the fd is a live socket owned by `socket`; `size` is a valid c_int whose
        // size is passed alongside it.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                std::ptr::from_ref(&size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
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

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::NLM_F_DUMP;

    /// `CTRL_CMD_GETFAMILY` requests for `names`, back to back from `first_seq`.
    fn get_families(names: &[&str], first_seq: u32) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, name) in names.iter().enumerate() {
            encode_get_family(&mut out, name, first_seq.wrapping_add(i as u32));
        }
        out
    }

    fn shrink_rcvbuf(conn: &Connection, bytes: usize) {
        // The kernel doubles the value.
        let half = libc::c_int::try_from(bytes / 2).unwrap_or(libc::c_int::MAX);
        // SAFETY: a live socket fd and a valid c_int with its size.
        let rc = unsafe {
            libc::setsockopt(
                conn.socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                std::ptr::from_ref(&half).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "setsockopt SO_RCVBUF");
    }

    #[test]
    fn message_framing_and_padding() {
        let mut out = Vec::new();
        encode_message(&mut out, 0x1234, NLM_F_REQUEST | NLM_F_ACK, 7, |b| {
            b.extend_from_slice(&[1, 2, 3, 4, 5]);
        });
        encode_message(&mut out, 0x1234, NLM_F_REQUEST | NLM_F_DUMP, 8, |_| {});
        #[cfg(target_endian = "little")]
        assert_eq!(
            &out[..16],
            &[21, 0, 0, 0, 0x34, 0x12, 5, 0, 7, 0, 0, 0, 0, 0, 0, 0]
        );
        // 21 bytes padded to 24, then a bare 16-byte header.
        assert_eq!(out.len(), 24 + 16);
        let parsed = frames(&out).expect("frames");
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].payload, &[1, 2, 3, 4, 5]);
        assert_eq!((parsed[0].seq, parsed[1].seq), (7, 8));
        assert_eq!(parsed[1].flags, NLM_F_REQUEST | NLM_F_DUMP);
        assert!(parsed[1].payload.is_empty());
    }

    #[test]
    fn truncated_datagrams_are_errors_not_panics() {
        let mut out = Vec::new();
        encode_message(&mut out, 2, 0, 1, |b| {
            b.extend_from_slice(&(-17i32).to_ne_bytes())
        });
        for len in 1..out.len() {
            assert!(frames(&out[..len]).is_err(), "length {len}");
        }
        // An error message too short for its code.
        let mut short = Vec::new();
        encode_message(&mut short, NLMSG_ERROR, 0, 1, |b| b.push(1));
        let frame = frames(&short).expect("frames")[0];
        assert!(frame.status().is_err());
        // A header claiming less than itself.
        let mut bad = out.clone();
        bad[..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(frames(&bad).is_err());
    }

    #[test]
    fn ack_tracker_matches_by_sequence_number() {
        let first = u32::MAX - 1; // wraps to 0 and 1
        let mut datagram = Vec::new();
        let ack = |out: &mut Vec<u8>, seq: u32, code: i32| {
            encode_message(out, NLMSG_ERROR, 0, seq, |b| {
                b.extend_from_slice(&code.to_ne_bytes());
                b.extend_from_slice(&[0; NLMSG_HDRLEN]); // the capped request header
            });
        };
        ack(&mut datagram, 99, -1); // left over from an earlier operation
        ack(&mut datagram, first, 0);
        encode_message(&mut datagram, 0x20, 0, first.wrapping_add(1), |b| b.push(0)); // data
        ack(&mut datagram, first.wrapping_add(1), -libc::EEXIST);
        ack(&mut datagram, first.wrapping_add(1), 0); // duplicate: ignored
        ack(&mut datagram, first.wrapping_add(3), -libc::ESRCH);
        let mut tracker = AckTracker::new(first, 4);
        let observed: Vec<Observed> = frames(&datagram)
            .expect("frames")
            .iter()
            .map(|f| tracker.observe(f).expect("observe"))
            .collect();
        assert_eq!(
            observed,
            [
                Observed::Unrelated,
                Observed::Ack { index: 0, code: 0 },
                Observed::Data { index: 1 },
                Observed::Ack {
                    index: 1,
                    code: -libc::EEXIST
                },
                Observed::Unrelated,
                Observed::Ack {
                    index: 3,
                    code: -libc::ESRCH
                },
            ]
        );
        assert_eq!(tracker.pending(), 1);
        assert_eq!(tracker.acknowledged(), 3);
        assert_eq!(
            tracker.codes(),
            &[Some(0), Some(-libc::EEXIST), None, Some(-libc::ESRCH)]
        );
    }

    // ---- against this machine's kernel, with the always-present nlctrl family ----------

    #[test]
    fn resolves_nlctrl_and_reports_missing_families() {
        let mut conn = Connection::open().expect("open a generic netlink socket");
        assert_eq!(
            resolve_family(&mut conn, "nlctrl").expect("resolve"),
            Some(GENL_ID_CTRL)
        );
        assert_eq!(
            resolve_family(&mut conn, "kproxy-nofamily").expect("resolve"),
            None
        );
    }

    /// One `sendmsg` with three requests; the middle one fails. The kernel goes on after
    /// the failure and acknowledges each request on its own — what `IpvsClient::batch`
    /// relies on.
    #[test]
    fn a_failed_request_in_a_batch_does_not_stop_the_others() {
        let mut conn = Connection::open().expect("open");
        let first = conn.reserve_seqs(3);
        let messages = get_families(&["nlctrl", "kproxy-nofamily", "nlctrl"], first);
        let mut tracker = AckTracker::new(first, 3);
        let mut data = Vec::new();
        conn.exchange(&messages, &mut tracker, "test", &mut |index, frame| {
            data.push((index, parse_family_id(frame.payload)?));
            Ok(())
        })
        .expect("exchange");
        assert_eq!(tracker.codes(), &[Some(0), Some(-libc::ENOENT), Some(0)]);
        assert_eq!(data, [(0, Some(GENL_ID_CTRL)), (2, Some(GENL_ID_CTRL))]);
    }

    /// A full chunk of failing requests (error acks are the largest acks) fits the receive
    /// buffer, both the enlarged one and the kernel's default.
    #[test]
    fn a_full_chunk_of_acks_fits_the_receive_buffer() {
        for default_buffer in [false, true] {
            let mut conn = Connection::open().expect("open");
            if default_buffer {
                shrink_rcvbuf(&conn, 212_992);
            }
            let n = conn.batch_limit();
            assert!(n >= 100, "batch limit {n}");
            let names = vec!["kproxy-nofamily"; n];
            let first = conn.reserve_seqs(n);
            let mut tracker = AckTracker::new(first, n);
            conn.exchange(
                &get_families(&names, first),
                &mut tracker,
                "test",
                &mut |_, _| Ok(()),
            )
            .expect("every ack fits");
            assert!(tracker.codes().iter().all(|c| *c == Some(-libc::ENOENT)));
        }
    }

    /// Overflowing the receive buffer is reported (ENOBUFS), and the connection is usable
    /// again afterwards.
    #[test]
    fn lost_acks_are_an_error_and_the_connection_recovers() {
        let mut conn = Connection::open().expect("open");
        shrink_rcvbuf(&conn, 16 * 1024);
        let n = 200;
        let names = vec!["kproxy-nofamily"; n];
        let first = conn.reserve_seqs(n);
        let mut tracker = AckTracker::new(first, n);
        let err = conn
            .exchange(
                &get_families(&names, first),
                &mut tracker,
                "test",
                &mut |_, _| Ok(()),
            )
            .expect_err("acks overflow a 16 KiB buffer");
        let enobufs = Some(libc::ENOBUFS);
        assert!(
            matches!(&err, IpvsError::Io { source, .. } if source.raw_os_error() == enobufs),
            "{err:?}"
        );
        assert_eq!(
            resolve_family(&mut conn, "nlctrl").expect("usable again"),
            Some(GENL_ID_CTRL)
        );
    }

    #[test]
    fn dumps_end_at_done() {
        let mut conn = Connection::open().expect("open");
        let seq = conn.reserve_seqs(1);
        let mut message = Vec::new();
        encode_message(
            &mut message,
            GENL_ID_CTRL,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            |buf| {
                buf.extend_from_slice(&[CTRL_CMD_GETFAMILY, 2, 0, 0]);
            },
        );
        let mut families = Vec::new();
        conn.dump(&message, seq, "test", &mut |frame| {
            families.extend(parse_family_id(frame.payload)?);
            Ok(())
        })
        .expect("dump");
        assert!(families.contains(&GENL_ID_CTRL), "{families:?}");
    }
}
