//! kproxy's IPVS client: the kernel's IPVS generic netlink family, spoken directly.
//!
//! # Why it looks like this
//!
//! * **Messages are plain data with explicit `encode` / `parse`** ([`messages`]): a
//!   [`VirtualService`], a [`Destination`], [`Timeouts`], an [`IpvsRequest`] or an
//!   [`IpvsReply`] is an ordinary value, and its bytes are written and read by hand
//!   following the kernel's `ip_vs_ctl.c` netlink policy (host-endian integers, ports in
//!   network order, 16-byte addresses, the 8-byte `ip_vs_flags`, 4-byte attribute
//!   alignment). Nothing is generic over attribute lists, so the encodings can be
//!   checked byte for byte against hand-computed layouts, and all of it is tested on
//!   machines without IPVS. The one IPVS crate in the rust-netlink style is stale and
//!   the others are LGPL or incomplete.
//! * **Framing is rust-netlink's** ([`netlink_packet_core`] headers, checked attribute
//!   iteration and error messages, [`netlink_packet_generic`] for the `genlmsghdr` and the
//!   `nlctrl` family lookup, [`netlink_sys`] for the socket), the same MIT-licensed stack
//!   kproxy uses for conntrack.
//! * **The client is thin and synchronous** ([`IpvsClient`]): it resolves the family once,
//!   sends many requests per `sendmsg` ([`IpvsClient::batch`]) and reports each refusal
//!   with the request's index. IPVS has no transactions — every request stands alone —
//!   so the reconciler above it must re-read the kernel after failures; the batch only
//!   saves system calls and round trips.
//! * **Parsing never panics.** Truncated or garbage bytes are a [`ParseError`].
//!
//! ```
//! use kproxy_ipvs::{IpvsRequest, Protocol, VirtualService};
//! let svc = VirtualService::new(Protocol::Tcp, "10.96.0.10".parse().unwrap(), 80, "rr");
//! let mut payload = Vec::new();
//! IpvsRequest::NewService(svc.clone()).encode(&mut payload);
//! assert_eq!(IpvsRequest::parse(&payload).unwrap(), IpvsRequest::NewService(svc));
//! ```
//!
//! Opening a client needs IPVS in the kernel and CAP_NET_ADMIN:
//!
//! ```no_run
//! use kproxy_ipvs::{Destination, IpvsClient, IpvsRequest, Protocol, VirtualService};
//! let mut ipvs = IpvsClient::open()?;
//! let svc = VirtualService::new(Protocol::Tcp, "10.96.0.10".parse()?, 80, "rr");
//! let report = ipvs.batch(&[
//!     IpvsRequest::NewService(svc.clone()),
//!     IpvsRequest::NewDest {
//!         service: svc.key(),
//!         dest: Destination::new("10.244.1.5".parse()?, 8080, 1),
//!     },
//! ])?;
//! for failure in &report.failures {
//!     eprintln!("{failure}");
//! }
//! let dests = ipvs.list_destinations(&svc)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod client;
pub mod error;
pub mod messages;
mod netlink;

pub use client::{encode_batch, BatchReport, IpvsClient, RequestFailure, MAX_BATCH};
pub use error::IpvsError;
pub use messages::{
    AddressFamily, Command, Destination, Forward, Info, InvalidRequest, IpvsReply, IpvsRequest,
    ParseError, Protocol, ServiceFlags, ServiceKey, Stats, Timeouts, Tunnel, VirtualService,
};
