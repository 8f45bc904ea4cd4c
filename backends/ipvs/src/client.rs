//! [`IpvsClient`]: a thin, synchronous request/response client for the IPVS family.
//!
//! The client resolves the family id once, then sends [`IpvsRequest`]s:
//!
//! * [`IpvsClient::batch`] writes many requests back to back into one buffer and sends
//!   it with one `sendmsg` (in chunks the socket's receive buffer can acknowledge); the
//!   kernel processes them in order and acknowledges each, and the client matches the
//!   acknowledgements to the requests by sequence number. **IPVS has no transactions**:
//!   a failed request does not undo the ones before it, nor stop the ones after it. The
//!   [`BatchReport`] names every failed request by its index, so the caller can react per
//!   request (an `EEXIST` on `NEW_DEST` is harmless, an `ESRCH` means the service
//!   vanished, …).
//! * dumps ([`IpvsClient::list_services`], [`IpvsClient::list_destinations`]) and gets
//!   ([`IpvsClient::get_info`], [`IpvsClient::get_timeouts`], [`IpvsClient::get_service`])
//!   are one request each.
//!
//! The API is blocking: kproxy's reconciler runs on its own thread. A client acts on the
//! IPVS table of the network namespace it was opened in, whichever thread uses it later.

use std::fmt;
use std::io;

use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};

use crate::error::IpvsError;
use crate::messages::{
    Command, Destination, Info, IpvsReply, IpvsRequest, ParseError, ServiceKey, Timeouts,
    VirtualService, IPVS_GENL_NAME,
};
use crate::netlink::{encode_message, resolve_family, AckTracker, Connection, Frame};

/// Most requests per `sendmsg`: keeps a chunk's buffer (under 200 bytes per request)
/// well below the default 208 KiB send buffer. All the acknowledgements of a chunk are
/// queued on the socket before `sendmsg` returns, so a chunk must also fit the receive
/// buffer: the client asks for 2 MiB (`SO_RCVBUFFORCE`, falling back to `SO_RCVBUF`) and
/// sizes chunks by what it got, 1 KiB per acknowledgement (about 200 requests with the
/// kernel's default 208 KiB). See [`IpvsClient::batch_limit`].
pub const MAX_BATCH: usize = 512;

/// Outcome of a [`IpvsClient::batch`]: every request was sent and acknowledged; those in
/// `failures` were refused by the kernel, all others were applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Requests in the batch.
    pub total: usize,
    /// Refused requests, in request order.
    pub failures: Vec<RequestFailure>,
}

impl BatchReport {
    /// Requests the kernel applied.
    pub fn succeeded(&self) -> usize {
        self.total - self.failures.len()
    }

    /// Whether every request was applied.
    pub fn is_ok(&self) -> bool {
        self.failures.is_empty()
    }

    /// `Ok` if every request was applied, else [`IpvsError::Batch`].
    pub fn into_result(self) -> Result<(), IpvsError> {
        if self.is_ok() {
            Ok(())
        } else {
            Err(IpvsError::Batch(self))
        }
    }
}

impl fmt::Display for BatchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.failures.first() {
            None => write!(f, "all {} IPVS requests applied", self.total),
            Some(first) => write!(
                f,
                "{} of {} IPVS requests failed; first: {first}",
                self.failures.len(),
                self.total
            ),
        }
    }
}

/// One request of a batch that the kernel refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestFailure {
    /// Position of the request in the batch.
    pub index: usize,
    pub command: Command,
    /// Positive errno (`EEXIST`, `ESRCH`, `ENOENT`, `EINVAL`, `EPERM`, …).
    pub errno: i32,
}

impl RequestFailure {
    /// The errno as an `io::Error`.
    pub fn error(&self) -> io::Error {
        io::Error::from_raw_os_error(self.errno)
    }

    /// `EEXIST`: the service or destination to create is already there.
    pub fn is_already_exists(&self) -> bool {
        self.errno == libc::EEXIST
    }

    /// `ESRCH` (no such service) or `ENOENT` (no such destination, or unknown scheduler
    /// on `NEW_SERVICE`).
    pub fn is_not_found(&self) -> bool {
        self.errno == libc::ESRCH || self.errno == libc::ENOENT
    }
}

impl fmt::Display for RequestFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "request {} ({}): {}",
            self.index,
            self.command,
            self.error()
        )
    }
}

/// Encodes `requests` as netlink messages back to back, with sequence numbers
/// `first_seq, first_seq + 1, …` (wrapping), each `NLM_F_REQUEST | NLM_F_ACK`.
pub fn encode_batch(family_id: u16, first_seq: u32, requests: &[IpvsRequest]) -> Vec<u8> {
    let mut out = Vec::with_capacity(requests.len() * 160);
    for (i, request) in requests.iter().enumerate() {
        let seq = first_seq.wrapping_add(i as u32);
        encode_message(&mut out, family_id, NLM_F_REQUEST | NLM_F_ACK, seq, |buf| {
            request.encode(buf)
        });
    }
    out
}

/// Appends the failures among `codes` (0 = applied, `-errno`, `None` = never
/// acknowledged) of `chunk`, whose first request has index `offset` in the batch.
fn collect_failures(
    report: &mut BatchReport,
    offset: usize,
    chunk: &[IpvsRequest],
    codes: &[Option<i32>],
) {
    for (i, (request, code)) in chunk.iter().zip(codes).enumerate() {
        if let Some(code) = code.filter(|&c| c != 0) {
            report.failures.push(RequestFailure {
                index: offset + i,
                command: request.command(),
                errno: i32::try_from(code.unsigned_abs()).unwrap_or(i32::MAX),
            });
        }
    }
}

/// A generic netlink socket bound to the IPVS family.
#[derive(Debug)]
pub struct IpvsClient {
    conn: Connection,
    family_id: u16,
}

impl IpvsClient {
    /// Opens a `NETLINK_GENERIC` socket in the calling thread's network namespace and
    /// resolves the "IPVS" family. [`IpvsError::NotAvailable`] if the kernel has no IPVS
    /// (not built in, or the `ip_vs` module not loaded — this crate does not load it).
    pub fn open() -> Result<IpvsClient, IpvsError> {
        let mut conn = Connection::open()?;
        match resolve_family(&mut conn, IPVS_GENL_NAME)? {
            Some(family_id) => {
                tracing::debug!(family_id, "resolved the IPVS generic netlink family");
                Ok(IpvsClient { conn, family_id })
            }
            None => Err(IpvsError::NotAvailable),
        }
    }

    /// The family id the kernel assigned to "IPVS".
    pub fn family_id(&self) -> u16 {
        self.family_id
    }

    /// Requests per `sendmsg` in [`Self::batch`], from the socket's receive buffer.
    pub fn batch_limit(&self) -> usize {
        self.conn.batch_limit()
    }

    /// Sends `requests` in order, [`Self::batch_limit`] per `sendmsg`, and reports which
    /// ones the kernel refused. Only requests answered by a bare acknowledgement are
    /// accepted (create, change, delete, `SET_CONFIG`, `ZERO`, `FLUSH`); every request is
    /// checked before anything is sent.
    ///
    /// There is no atomicity: see the [module documentation](self). On an I/O error part
    /// way, [`IpvsError::Interrupted`] says how many requests have a known outcome.
    pub fn batch(&mut self, requests: &[IpvsRequest]) -> Result<BatchReport, IpvsError> {
        check_batch(requests)?;
        let mut report = BatchReport {
            total: requests.len(),
            failures: Vec::new(),
        };
        let limit = self.conn.batch_limit();
        for (n, chunk) in requests.chunks(limit).enumerate() {
            let offset = n * limit;
            let first_seq = self.conn.reserve_seqs(chunk.len());
            let messages = encode_batch(self.family_id, first_seq, chunk);
            let mut tracker = AckTracker::new(first_seq, chunk.len());
            let result = self
                .conn
                .exchange(&messages, &mut tracker, "batch", &mut |_, _| Ok(()));
            collect_failures(&mut report, offset, chunk, tracker.codes());
            if let Err(source) = result {
                return Err(IpvsError::Interrupted {
                    acknowledged: offset + tracker.acknowledged(),
                    total: requests.len(),
                    report,
                    source: Box::new(source),
                });
            }
        }
        tracing::debug!(
            requests = report.total,
            failed = report.failures.len(),
            "IPVS batch"
        );
        Ok(report)
    }

    /// Sends one request answered by a bare acknowledgement; a refusal is
    /// [`IpvsError::Kernel`].
    pub fn execute(&mut self, request: &IpvsRequest) -> Result<(), IpvsError> {
        let report = match self.batch(std::slice::from_ref(request)) {
            Ok(report) => report,
            Err(IpvsError::Interrupted { source, .. }) => return Err(*source),
            Err(e) => return Err(e),
        };
        match report.failures.first() {
            None => Ok(()),
            Some(failure) => Err(IpvsError::Kernel {
                op: failure.command.name(),
                source: failure.error(),
            }),
        }
    }

    /// Every virtual service of the namespace (one dump), with stats.
    pub fn list_services(&mut self) -> Result<Vec<VirtualService>, IpvsError> {
        self.dump(&IpvsRequest::DumpServices)?
            .into_iter()
            .map(|reply| match reply {
                IpvsReply::Service(service) => Ok(service),
                other => Err(unexpected(&other)),
            })
            .collect()
    }

    /// One service, or `None` if the kernel has no such service.
    pub fn get_service(
        &mut self,
        service: impl Into<ServiceKey>,
    ) -> Result<Option<VirtualService>, IpvsError> {
        match self.request(&IpvsRequest::GetService(service.into())) {
            Ok(replies) => match replies.into_iter().next() {
                Some(IpvsReply::Service(service)) => Ok(Some(service)),
                Some(other) => Err(unexpected(&other)),
                None => Ok(None),
            },
            // ip_vs_genl_get_cmd: ESRCH is "no such service"; anything else is a failure.
            Err(e) if e.errno() == Some(libc::ESRCH) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The destinations of a service (one dump), with connection counters and stats.
    /// Empty if the service does not exist.
    pub fn list_destinations(
        &mut self,
        service: impl Into<ServiceKey>,
    ) -> Result<Vec<Destination>, IpvsError> {
        self.dump(&IpvsRequest::DumpDests(service.into()))?
            .into_iter()
            .map(|reply| match reply {
                IpvsReply::Destination(dest) => Ok(dest),
                other => Err(unexpected(&other)),
            })
            .collect()
    }

    /// IPVS version and connection table size.
    pub fn get_info(&mut self) -> Result<Info, IpvsError> {
        match self.request(&IpvsRequest::GetInfo)?.into_iter().next() {
            Some(IpvsReply::Info(info)) => Ok(info),
            Some(other) => Err(unexpected(&other)),
            None => Err(missing_reply(Command::GetInfo)),
        }
    }

    /// The global TCP, TCP FIN and UDP timeouts.
    pub fn get_timeouts(&mut self) -> Result<Timeouts, IpvsError> {
        match self.request(&IpvsRequest::GetConfig)?.into_iter().next() {
            Some(IpvsReply::Config(timeouts)) => Ok(timeouts),
            Some(other) => Err(unexpected(&other)),
            None => Err(missing_reply(Command::GetConfig)),
        }
    }

    /// Sets the global timeouts; a 0 leaves that timeout unchanged.
    pub fn set_timeouts(&mut self, timeouts: &Timeouts) -> Result<(), IpvsError> {
        self.execute(&IpvsRequest::SetConfig(*timeouts))
    }

    /// Deletes every service and destination of the namespace.
    pub fn flush(&mut self) -> Result<(), IpvsError> {
        self.execute(&IpvsRequest::Flush)
    }

    /// One `GET_*` request with `NLM_F_ACK`: its replies, or the kernel's refusal.
    fn request(&mut self, request: &IpvsRequest) -> Result<Vec<IpvsReply>, IpvsError> {
        let op = request.command().name();
        let seq = self.conn.reserve_seqs(1);
        let mut message = Vec::new();
        encode_message(
            &mut message,
            self.family_id,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            |buf| request.encode(buf),
        );
        let mut tracker = AckTracker::new(seq, 1);
        let mut replies = Vec::new();
        let family_id = self.family_id;
        self.conn
            .exchange(&message, &mut tracker, op, &mut |_, frame| {
                replies.push(parse_reply(family_id, frame)?);
                Ok(())
            })?;
        match tracker.codes().first().copied().flatten() {
            Some(0) => Ok(replies),
            Some(code) => Err(IpvsError::kernel(op, code)),
            None => Err(missing_reply(request.command())),
        }
    }

    /// One dump request: every entry until `NLMSG_DONE`.
    fn dump(&mut self, request: &IpvsRequest) -> Result<Vec<IpvsReply>, IpvsError> {
        let op = request.command().name();
        let seq = self.conn.reserve_seqs(1);
        let mut message = Vec::new();
        encode_message(
            &mut message,
            self.family_id,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            |buf| request.encode(buf),
        );
        let mut replies = Vec::new();
        let family_id = self.family_id;
        self.conn.dump(&message, seq, op, &mut |frame| {
            replies.push(parse_reply(family_id, frame)?);
            Ok(())
        })?;
        Ok(replies)
    }
}

/// Refuses a batch with a request answered by data, or one the kernel would refuse for
/// its shape, before anything is sent.
fn check_batch(requests: &[IpvsRequest]) -> Result<(), IpvsError> {
    for (index, request) in requests.iter().enumerate() {
        if !request.is_ack_only() {
            return Err(IpvsError::NotBatchable {
                index,
                command: request.command(),
            });
        }
        request.validate().map_err(|reason| IpvsError::Invalid {
            index,
            command: request.command(),
            reason,
        })?;
    }
    Ok(())
}

fn parse_reply(family_id: u16, frame: &Frame<'_>) -> Result<IpvsReply, IpvsError> {
    if frame.msg_type != family_id {
        return Err(IpvsError::Malformed(ParseError::Attribute {
            context: "reply",
            reason: format!(
                "message type {} is not the IPVS family ({family_id})",
                frame.msg_type
            ),
        }));
    }
    Ok(IpvsReply::parse(frame.payload)?)
}

fn unexpected(reply: &IpvsReply) -> IpvsError {
    IpvsError::Malformed(ParseError::Command(reply.command() as u8))
}

fn missing_reply(command: Command) -> IpvsError {
    IpvsError::Io {
        op: command.name(),
        source: io::Error::other("the kernel acknowledged without a reply"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{Protocol, ServiceFlags, ServiceKey};
    use crate::netlink::frames;
    use netlink_packet_core::NLMSG_ERROR;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn sample_batch() -> (VirtualService, Vec<IpvsRequest>) {
        let svc = VirtualService::new(Protocol::Tcp, ip("10.96.0.10"), 80, "rr");
        let requests = vec![
            IpvsRequest::NewService(svc.clone()),
            IpvsRequest::NewDest {
                service: svc.key(),
                dest: Destination::new(ip("10.244.1.5"), 8080, 1),
            },
            IpvsRequest::SetDest {
                service: svc.key(),
                dest: Destination::new(ip("10.244.2.7"), 8080, 0),
            },
            IpvsRequest::DelDest {
                service: svc.key(),
                dest: "10.244.3.9:8080".parse().expect("socket address"),
            },
            IpvsRequest::SetConfig(Timeouts {
                tcp: 900,
                tcp_fin: 120,
                udp: 300,
            }),
        ];
        (svc, requests)
    }

    #[test]
    fn batch_buffer_is_back_to_back_messages_with_increasing_sequence_numbers() {
        let (_, requests) = sample_batch();
        // Start just below the wrap to check it.
        let first = u32::MAX - 2;
        let buf = encode_batch(0x1c, first, &requests);
        let parsed = frames(&buf).expect("frames");
        assert_eq!(parsed.len(), requests.len());
        let mut offset = 0;
        for (i, (frame, request)) in parsed.iter().zip(&requests).enumerate() {
            assert_eq!(frame.msg_type, 0x1c, "family id as message type");
            assert_eq!(frame.flags, NLM_F_REQUEST | NLM_F_ACK);
            assert_eq!(frame.seq, first.wrapping_add(i as u32));
            assert_eq!(&IpvsRequest::parse(frame.payload).expect("parses"), request);
            // Each message starts 4-byte aligned, right after the previous one.
            let len = u32::from_ne_bytes(buf[offset..offset + 4].try_into().expect("4 bytes"));
            assert_eq!(len as usize, 16 + frame.payload.len());
            assert_eq!(offset % 4, 0);
            offset += (len as usize).next_multiple_of(4);
        }
        assert_eq!(offset, buf.len());
        assert_eq!(
            parsed.iter().map(|f| f.seq).collect::<Vec<_>>(),
            [u32::MAX - 2, u32::MAX - 1, u32::MAX, 0, 1]
        );
    }

    /// The kernel's acknowledgements of a batch, in a datagram, turned into a report:
    /// negative errnos become failures carrying the request's index in the whole batch.
    #[test]
    fn error_acks_become_failures_with_their_request_index() {
        let (_, requests) = sample_batch();
        let first = 40;
        let mut datagram = Vec::new();
        for (i, code) in [0, -libc::EEXIST, 0, -libc::ENOENT, 0].iter().enumerate() {
            encode_message(&mut datagram, NLMSG_ERROR, 0, first + i as u32, |b| {
                b.extend_from_slice(&code.to_ne_bytes());
                b.extend_from_slice(&[0; 16]);
            });
        }
        let mut tracker = AckTracker::new(first, requests.len());
        for frame in frames(&datagram).expect("frames") {
            tracker.observe(&frame).expect("observe");
        }
        assert_eq!(tracker.pending(), 0);
        // As if this were the second chunk of a batch, starting at index 100.
        let mut report = BatchReport {
            total: 105,
            failures: Vec::new(),
        };
        collect_failures(&mut report, 100, &requests, tracker.codes());
        assert_eq!(
            report.failures,
            [
                RequestFailure {
                    index: 101,
                    command: Command::NewDest,
                    errno: libc::EEXIST
                },
                RequestFailure {
                    index: 103,
                    command: Command::DelDest,
                    errno: libc::ENOENT
                },
            ]
        );
        assert!(report.failures[0].is_already_exists());
        assert!(report.failures[1].is_not_found());
        assert_eq!(report.succeeded(), 103);
        assert!(!report.is_ok());
        let text = report.to_string();
        assert!(
            text.starts_with("2 of 105 IPVS requests failed; first: request 101 (NEW_DEST)"),
            "{text}"
        );
        let err = report.clone().into_result().expect_err("failures");
        assert!(matches!(err, IpvsError::Batch(r) if r == report));
        assert!(BatchReport {
            total: 3,
            failures: Vec::new()
        }
        .into_result()
        .is_ok());
    }

    #[test]
    fn batches_refuse_data_requests_and_invalid_ones_before_sending() {
        let (svc, mut requests) = sample_batch();
        assert!(check_batch(&requests).is_ok());
        requests.push(IpvsRequest::DumpDests(svc.key()));
        assert!(matches!(
            check_batch(&requests),
            Err(IpvsError::NotBatchable {
                index: 5,
                command: Command::GetDest
            })
        ));
        for request in [
            IpvsRequest::GetService(svc.key()),
            IpvsRequest::DumpServices,
            IpvsRequest::GetInfo,
            IpvsRequest::GetConfig,
        ] {
            assert!(matches!(
                check_batch(&[request]),
                Err(IpvsError::NotBatchable { index: 0, .. })
            ));
        }
        let bad = VirtualService::new(Protocol::Udp, ip("10.0.0.1"), 53, "no-such-scheduler");
        assert!(matches!(
            check_batch(&[IpvsRequest::Flush, IpvsRequest::SetService(bad)]),
            Err(IpvsError::Invalid {
                index: 1,
                command: Command::SetService,
                ..
            })
        ));
    }

    /// The largest request kproxy can send, times [`MAX_BATCH`], stays below the default
    /// socket send buffer (`sendmsg` fails with `EMSGSIZE` above `sk_sndbuf - 32`).
    #[test]
    fn a_full_batch_fits_the_default_send_buffer() {
        let mut svc = VirtualService::new(Protocol::Sctp, ip("fd00::1"), 1, "123456789012345")
            .with_persistence(1);
        svc.flags = ServiceFlags::ONEPACKET;
        let mut dest = Destination::new(ip("fd00::2"), 2, 1);
        dest.forward = crate::messages::Forward::Tunnel;
        dest.tunnel = Some(crate::messages::Tunnel::default());
        let largest = [
            IpvsRequest::NewService(svc.clone()),
            IpvsRequest::SetDest {
                service: svc.key(),
                dest,
            },
        ];
        for request in &largest {
            let bytes = encode_batch(1, 1, std::slice::from_ref(request)).len();
            assert!(bytes < 200, "{request:?} takes {bytes} bytes");
        }
        const { assert!(MAX_BATCH * 200 < 212_992 - 32) };
    }

    #[test]
    fn replies_of_another_family_are_refused() {
        let mut payload = Vec::new();
        IpvsReply::Config(Timeouts::default()).encode(&mut payload);
        let frame = Frame {
            msg_type: 0x17,
            flags: 0,
            seq: 1,
            payload: &payload,
        };
        assert!(parse_reply(0x17, &frame).is_ok());
        assert!(matches!(
            parse_reply(0x18, &frame),
            Err(IpvsError::Malformed(_))
        ));
    }

    #[test]
    fn the_client_can_move_to_the_reconciler_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<IpvsClient>();
        assert_send::<IpvsError>();
    }

    #[test]
    fn service_keys_from_services() {
        let svc = VirtualService::new(Protocol::Udp, ip("10.96.0.10"), 53, "rr");
        let key: ServiceKey = (&svc).into();
        assert_eq!(key, svc.key());
        assert_eq!(key.to_string(), "UDP 10.96.0.10:53");
        let v6 = VirtualService::new(Protocol::Sctp, ip("fd00::a"), 80, "rr");
        assert_eq!(v6.key().to_string(), "SCTP [fd00::a]:80");
    }

    /// This development machine's kernel has no IPVS: opening fails cleanly with
    /// `NotAvailable`. (In the IPVS VM the same test checks that opening works.)
    #[test]
    fn open_reports_whether_the_kernel_has_ipvs() {
        let kernel_has_ipvs = std::path::Path::new("/proc/net/ip_vs").exists();
        match IpvsClient::open() {
            Err(IpvsError::NotAvailable) => assert!(!kernel_has_ipvs),
            Ok(client) => {
                assert!(kernel_has_ipvs);
                assert!(client.family_id() >= 0x10);
            }
            // Without CAP_NET_ADMIN the lookup still works (nlctrl is unprivileged), so
            // anything else is a bug.
            Err(other) => panic!("unexpected error: {other:?}"),
        }
        let message = IpvsError::NotAvailable.to_string();
        assert!(message.contains("ip_vs"), "{message}");
    }
}
