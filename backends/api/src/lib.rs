//! The contract between kproxy's model and its kernel backends.
//!
//! The model (in the `kproxy` crate) turns Services, EndpointSlices and the Node into a
//! [`ProxyState`] per IP family: every service port with its endpoints already categorised
//! for this node (cluster traffic, local traffic, topology, terminating fallback). A
//! [`Backend`] turns that state into kernel objects. Every routing decision is made once,
//! in the model; backends only translate.
//!
//! This crate has no I/O and knows nothing about Kubernetes objects or a kernel.
//!
//! ```
//! use kproxy_backend_api::{IpFamily, Protocol, ServiceName, ServicePortName};
//! let name = ServicePortName::new(ServiceName::new("ns1", "svc1"), "p80", Protocol::Tcp);
//! assert_eq!(name.to_string(), "ns1/svc1:p80");
//! assert_eq!(IpFamily::of(&"fd00::1".parse().unwrap()), IpFamily::V6);
//! ```

mod backend;
mod endpoints;
mod node;
mod service;

pub use backend::{Backend, BackendError, Changes, ServicePlans, SyncReport};
pub use endpoints::{CategorizedEndpoints, Endpoint, TopologyMode};
pub use node::{NodeContext, NodePortAddresses, MASQUERADE_MARK};
pub use service::{ServicePort, ServicePortPlan, TrafficPolicy};

use std::fmt;
use std::net::IpAddr;

/// An IP family. kproxy programs each family independently (one table per family),
/// as upstream kube-proxy does: no nftables type holds both address kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    /// Both families, IPv4 first.
    pub const ALL: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    /// The family of an address.
    pub fn of(ip: &IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    /// kube-proxy's label value for metrics and logs (`IPv4` / `IPv6`).
    pub fn label(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A transport protocol a Service port can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Lower-case name, as nftables and chain names spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// Parses Kubernetes' spelling (`TCP`, `UDP`, `SCTP`); `None` for anything else.
    pub fn from_k8s(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Service's namespace and name: the unit of change tracking.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl ServiceName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ServiceName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One port of a Service: `ns/name:portname` plus its protocol.
///
/// The port name may be empty (single-port services). Two ports of a service may share a
/// name only if their protocols differ, so the protocol is part of the identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub service: ServiceName,
    pub port: String,
    pub protocol: Protocol,
}

impl ServicePortName {
    pub fn new(service: ServiceName, port: impl Into<String>, protocol: Protocol) -> Self {
        ServicePortName {
            service,
            port: port.into(),
            protocol,
        }
    }
}

impl fmt::Display for ServicePortName {
    /// kube-proxy's spelling, used in element comments: `ns/svc:port`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.service, self.port)
    }
}
