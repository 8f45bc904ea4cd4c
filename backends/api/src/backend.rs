//! The `Backend` trait: desired state in, kernel state out.

use crate::{IpFamily, NodeContext, ServiceName, ServicePortPlan};
use std::collections::{BTreeMap, BTreeSet};

/// What changed since the last successful sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// Re-read the kernel and reconcile everything (start-up, after a failure, node
    /// changes).
    Full,
    /// Only these services changed (a service, or one of its EndpointSlices).
    Services(BTreeSet<ServiceName>),
}

impl Changes {
    pub fn is_full(&self) -> bool {
        matches!(self, Changes::Full)
    }
}

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub full: bool,
    /// Kernel operations sent (0 for a no-op sync: nothing was sent at all).
    pub operations: usize,
    /// Services whose kernel objects were recomputed.
    pub services_examined: usize,
}

/// A backend failure. A failed sync leaves the kernel as it was (transactions are
/// atomic) and makes the next sync a full one.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("kernel refused the update: {0}")]
    Apply(String),
    #[error("cannot read live kernel state: {0}")]
    ReadBack(String),
    #[error("{0}")]
    Other(String),
}

/// The desired state of one IP family: the node context and every service's ports.
pub type ServicePlans = BTreeMap<ServiceName, Vec<ServicePortPlan>>;

/// A kernel backend for one IP family.
pub trait Backend {
    fn family(&self) -> IpFamily;

    /// Brings the kernel to the desired state, sending only what differs from what is
    /// live. `changes` lists the services that may differ; a full sync re-reads the kernel.
    fn sync(
        &mut self,
        node: &NodeContext,
        services: &ServicePlans,
        changes: &Changes,
    ) -> Result<SyncReport, BackendError>;

    /// Everything this backend would program for the state, in the kernel tool's syntax
    /// (`nft` for nftables), without touching the kernel.
    fn render(&self, node: &NodeContext, services: &ServicePlans) -> String;

    /// Removes every kernel object this backend owns, and nothing else.
    fn cleanup(&mut self) -> Result<(), BackendError>;

    /// Compares what the kernel holds with the desired state and returns the
    /// differences in words (empty: no drift). After drift the next sync must be a full
    /// one that trusts nothing it did not just read back; backends arrange that
    /// themselves. The default finds nothing.
    fn verify(
        &mut self,
        _node: &NodeContext,
        _services: &ServicePlans,
    ) -> Result<Vec<String>, BackendError> {
        Ok(Vec::new())
    }
}
