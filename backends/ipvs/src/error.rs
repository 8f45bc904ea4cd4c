//! Errors of the IPVS client.

use std::io;

use crate::client::BatchReport;
use crate::messages::{Command, InvalidRequest, ParseError};

/// An IPVS operation failed.
///
/// How to react: [`IpvsError::NotAvailable`] is permanent for this kernel (load `ip_vs` or
/// use another proxy mode). Everything else is worth a retry at the next sync, after
/// re-reading the kernel's state: IPVS has no transactions, so a failure can leave some
/// requests applied and others not.
#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    /// The kernel has no generic netlink family "IPVS": IPVS is not built, or the `ip_vs`
    /// module is not loaded.
    #[error(
        "IPVS is not available: the kernel has no \"IPVS\" generic netlink family \
         (is the ip_vs module loaded?)"
    )]
    NotAvailable,
    /// The generic netlink socket could not be created or configured.
    #[error("cannot open a generic netlink socket: {0}")]
    Open(#[source] io::Error),
    /// Sending or receiving failed, including the receive timeout expiring and lost
    /// acknowledgements (`ENOBUFS`). The outcome of the requests in flight is unknown.
    #[error("IPVS {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The kernel refused a request (`EEXIST`, `ESRCH`, `ENOENT`, `EPERM` without
    /// CAP_NET_ADMIN, `EINVAL`, …).
    #[error("kernel refused IPVS {op}: {source}")]
    Kernel {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// Some requests of a batch failed; the others were applied.
    #[error("{0}")]
    Batch(BatchReport),
    /// A batch stopped part way: the first `acknowledged` requests have their outcome
    /// (in `report`), the rest are unknown.
    #[error(
        "IPVS batch interrupted after {acknowledged} of {total} requests were acknowledged: \
         {source}"
    )]
    Interrupted {
        acknowledged: usize,
        total: usize,
        report: BatchReport,
        #[source]
        source: Box<IpvsError>,
    },
    /// A request was refused before anything was sent.
    #[error("request {index} ({command}): {reason}")]
    Invalid {
        index: usize,
        command: Command,
        #[source]
        reason: InvalidRequest,
    },
    /// A request that the kernel answers with data (a dump or a `GET_*`) was given to
    /// [`crate::IpvsClient::batch`] or [`crate::IpvsClient::execute`].
    #[error("request {index} ({command}) is answered with data and cannot be batched")]
    NotBatchable { index: usize, command: Command },
    /// A reply did not parse.
    #[error("malformed IPVS reply: {0}")]
    Malformed(#[from] ParseError),
}

impl IpvsError {
    /// The errno the kernel answered with, for [`IpvsError::Kernel`].
    pub fn errno(&self) -> Option<i32> {
        match self {
            IpvsError::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    pub(crate) fn kernel(op: &'static str, code: i32) -> IpvsError {
        IpvsError::Kernel {
            op,
            source: io::Error::from_raw_os_error(code.saturating_neg()),
        }
    }
}
