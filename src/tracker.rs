//! Change tracking: the objects every source feeds, and which Services changed since the
//! last sync.
//!
//! Both sources (the API server's watches and `--manifests`) produce the same
//! [`SourceEvent`]s. The tracker keeps the current objects, records which Services a
//! change touches (a Service itself, or an EndpointSlice labelled with its name), and
//! asks for a full sync when something node-wide changes (this Node's topology labels
//! or addresses, the ServiceCIDRs). It knows when both Services and EndpointSlices have
//! been listed once: nothing is programmed before that.

use crate::model::ClusterObjects;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kproxy_backend_api::{Changes, IpFamily, ServiceName};
use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

/// The kinds of object kproxy watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    ServiceCidr,
}

/// One object of a watched kind.
// Each object crosses the channel once, by move; boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Node(Node),
    ServiceCidr(ServiceCIDR),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Node(_) => Kind::Node,
            Object::ServiceCidr(_) => Kind::ServiceCidr,
        }
    }

    fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
            Object::ServiceCidr(o) => &o.metadata,
        }
    }

    fn key(&self) -> Key {
        let m = self.meta();
        (
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default(),
        )
    }
}

/// What a source reports.
#[derive(Debug, Clone)]
pub enum SourceEvent {
    /// An object was created or updated.
    Applied(Object),
    /// An object was deleted.
    Deleted(Object),
    /// The complete current set of one kind (an initial list or a relist).
    Replaced(Kind, Vec<Object>),
    /// The source lost contact with the API server for this kind: what kproxy programs
    /// may be going stale (health reports it once that lasts longer than healthTimeout).
    Disconnected(Kind),
}

type Key = (String, String);

/// The annotation the EndpointSlice controller sets to when the change that produced the
/// slice happened: the start of network programming latency.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The tracker's view of the cluster and its pending changes.
#[derive(Debug)]
pub struct Tracker {
    node_name: String,
    started: SystemTime,
    services: BTreeMap<Key, Service>,
    slices: BTreeMap<Key, EndpointSlice>,
    nodes: BTreeMap<Key, Node>,
    service_cidrs: BTreeMap<Key, ServiceCIDR>,
    synced: BTreeSet<Kind>,
    changed_by_services: BTreeSet<ServiceName>,
    changed_by_slices: BTreeSet<ServiceName>,
    full: bool,
    /// Trigger times of EndpointSlice changes not yet programmed, by slice family.
    trigger_times: Vec<(IpFamily, SystemTime)>,
    service_changes: u64,
    endpoint_changes: u64,
}

/// What a sync should do, taken from the tracker.
#[derive(Debug, Clone)]
pub struct PendingSync {
    pub changes: Changes,
    /// When the EndpointSlice changes being programmed happened (per slice family).
    pub trigger_times: Vec<(IpFamily, SystemTime)>,
}

fn service_of_slice(s: &EndpointSlice) -> Option<ServiceName> {
    let svc = s
        .metadata
        .labels
        .as_ref()?
        .get(crate::model::endpoints::SERVICE_NAME_LABEL)?;
    Some(ServiceName::new(
        s.metadata.namespace.clone().unwrap_or_default(),
        svc.clone(),
    ))
}

fn service_name(s: &Service) -> ServiceName {
    ServiceName::new(
        s.metadata.namespace.clone().unwrap_or_default(),
        s.metadata.name.clone().unwrap_or_default(),
    )
}

/// The parts of this Node that shape the rules: topology labels and addresses.
fn node_shape(n: Option<&Node>) -> String {
    let Some(n) = n else { return String::new() };
    let zone = n
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(crate::model::ZONE_LABEL))
        .cloned()
        .unwrap_or_default();
    let addrs = n
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(|a| {
            a.iter()
                .map(|x| format!("{}={}", x.type_, x.address))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    format!("{zone}|{addrs}")
}

impl Tracker {
    pub fn new(node_name: impl Into<String>, started: SystemTime) -> Self {
        Tracker {
            node_name: node_name.into(),
            started,
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            nodes: BTreeMap::new(),
            service_cidrs: BTreeMap::new(),
            synced: BTreeSet::new(),
            changed_by_services: BTreeSet::new(),
            changed_by_slices: BTreeSet::new(),
            full: true,
            trigger_times: Vec::new(),
            service_changes: 0,
            endpoint_changes: 0,
        }
    }

    /// Both Services and EndpointSlices have been listed once.
    pub fn is_ready(&self) -> bool {
        self.synced.contains(&Kind::Service) && self.synced.contains(&Kind::EndpointSlice)
    }

    /// Something waits to be programmed.
    pub fn has_changes(&self) -> bool {
        self.full || !self.changed_by_services.is_empty() || !self.changed_by_slices.is_empty()
    }

    /// Forces the next sync to be a full one (after a failure, periodically).
    pub fn force_full(&mut self) {
        self.full = true;
    }

    /// Services waiting because their Service changed, and because their endpoints did.
    pub fn pending_counts(&self) -> (usize, usize) {
        (self.changed_by_services.len(), self.changed_by_slices.len())
    }

    /// Service and endpoint changes seen since start (for the `_changes_total` counters).
    pub fn change_totals(&self) -> (u64, u64) {
        (self.service_changes, self.endpoint_changes)
    }

    fn this_node(&self) -> Option<&Node> {
        self.nodes
            .values()
            .find(|n| n.metadata.name.as_deref() == Some(self.node_name.as_str()))
    }

    /// This node's object, if known (for health eligibility).
    pub fn node(&self) -> Option<&Node> {
        self.this_node()
    }

    /// Applies one event; returns whether it may change the rules.
    pub fn apply(&mut self, ev: SourceEvent) -> bool {
        match ev {
            SourceEvent::Applied(o) => self.upsert(o),
            SourceEvent::Deleted(o) => self.remove(o.kind(), &o.key()),
            SourceEvent::Disconnected(_) => false,
            SourceEvent::Replaced(kind, objs) => {
                self.synced.insert(kind);
                let keep: BTreeSet<Key> = objs.iter().map(Object::key).collect();
                let stale: Vec<Key> = match kind {
                    Kind::Service => self.services.keys().cloned().collect(),
                    Kind::EndpointSlice => self.slices.keys().cloned().collect(),
                    Kind::Node => self.nodes.keys().cloned().collect(),
                    Kind::ServiceCidr => self.service_cidrs.keys().cloned().collect(),
                };
                let mut changed = false;
                for k in stale.into_iter().filter(|k| !keep.contains(k)) {
                    changed |= self.remove(kind, &k);
                }
                for o in objs {
                    changed |= self.upsert(o);
                }
                changed
            }
        }
    }

    fn upsert(&mut self, o: Object) -> bool {
        let key = o.key();
        match o {
            Object::Service(s) => {
                if self.services.get(&key) == Some(&s) {
                    return false;
                }
                self.changed_by_services.insert(service_name(&s));
                self.service_changes += 1;
                self.services.insert(key, s);
            }
            Object::EndpointSlice(s) => {
                let old = self.slices.get(&key);
                if old == Some(&s) {
                    return false;
                }
                // A slice relabelled to another service changes both.
                if let Some(prev) = old.and_then(service_of_slice) {
                    self.changed_by_slices.insert(prev);
                }
                if let Some(svc) = service_of_slice(&s) {
                    self.changed_by_slices.insert(svc);
                }
                self.record_trigger_time(&s);
                self.endpoint_changes += 1;
                self.slices.insert(key, s);
            }
            Object::Node(n) => {
                let before = node_shape(self.this_node());
                self.nodes.insert(key, n);
                if node_shape(self.this_node()) != before {
                    self.full = true;
                    return true;
                }
                return false;
            }
            Object::ServiceCidr(c) => {
                if self.service_cidrs.get(&key) == Some(&c) {
                    return false;
                }
                self.service_cidrs.insert(key, c);
                self.full = true;
            }
        }
        true
    }

    fn remove(&mut self, kind: Kind, key: &Key) -> bool {
        match kind {
            Kind::Service => match self.services.remove(key) {
                Some(s) => {
                    self.changed_by_services.insert(service_name(&s));
                    self.service_changes += 1;
                    true
                }
                None => false,
            },
            Kind::EndpointSlice => match self.slices.remove(key) {
                Some(s) => {
                    if let Some(svc) = service_of_slice(&s) {
                        self.changed_by_slices.insert(svc);
                    }
                    self.endpoint_changes += 1;
                    true
                }
                None => false,
            },
            Kind::Node => {
                let before = node_shape(self.this_node());
                self.nodes.remove(key);
                let changed = node_shape(self.this_node()) != before;
                self.full |= changed;
                changed
            }
            Kind::ServiceCidr => {
                let changed = self.service_cidrs.remove(key).is_some();
                self.full |= changed;
                changed
            }
        }
    }

    fn record_trigger_time(&mut self, s: &EndpointSlice) {
        let Some(text) = s
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
        else {
            return;
        };
        let family = match s.address_type.as_str() {
            "IPv6" => IpFamily::V6,
            _ => IpFamily::V4,
        };
        if let Some(t) = parse_rfc3339(text) {
            // Changes from before kproxy started were programmed by somebody else.
            if t >= self.started {
                self.trigger_times.push((family, t));
            }
        }
    }

    /// The current objects, for the model.
    pub fn objects(&self) -> ClusterObjects {
        ClusterObjects {
            services: self.services.values().cloned().collect(),
            endpoint_slices: self.slices.values().cloned().collect(),
            nodes: self.nodes.values().cloned().collect(),
            service_cidrs: self.service_cidrs.values().cloned().collect(),
        }
    }

    /// Takes what the next sync must do and clears it. If that sync fails, call
    /// [`Tracker::force_full`]: the changes were taken and only a full sync covers them.
    pub fn take(&mut self) -> PendingSync {
        let changes = if std::mem::take(&mut self.full) {
            self.changed_by_services.clear();
            self.changed_by_slices.clear();
            Changes::Full
        } else {
            let mut all = std::mem::take(&mut self.changed_by_services);
            all.append(&mut self.changed_by_slices);
            Changes::Services(all)
        };
        PendingSync {
            changes,
            trigger_times: std::mem::take(&mut self.trigger_times),
        }
    }
}

/// Parses the RFC 3339 timestamps Kubernetes writes (`2026-11-23T18:41:00Z`, optionally
/// with fractional seconds or an offset).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let t: k8s_openapi::jiff::Timestamp = s.trim().parse().ok()?;
    Some(SystemTime::from(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn svc(name: &str, ip: &str) -> Object {
        Object::Service(
            serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": name},
                "spec": {"clusterIP": ip, "ports": [{"port": 80}]}}))
            .expect("svc"),
        )
    }

    fn slice(name: &str, svc: &str, ip: &str, trigger: Option<&str>) -> Object {
        let mut v = json!({"metadata": {"namespace": "ns", "name": name, "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "endpoints": [{"addresses": [ip]}], "ports": [{"port": 80}]});
        if let Some(t) = trigger {
            v["metadata"]["annotations"] = json!({TRIGGER_TIME_ANNOTATION: t});
        }
        Object::EndpointSlice(serde_json::from_value(v).expect("slice"))
    }

    fn node(zone: &str) -> Object {
        Object::Node(
            serde_json::from_value(json!({"metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": zone}}}))
                .expect("node"),
        )
    }

    fn names(c: &Changes) -> Vec<String> {
        match c {
            Changes::Full => vec!["FULL".into()],
            Changes::Services(s) => s.iter().map(|n| n.to_string()).collect(),
        }
    }

    #[test]
    fn not_ready_until_services_and_slices_are_listed() {
        let mut t = Tracker::new("node-a", SystemTime::UNIX_EPOCH);
        assert!(!t.is_ready());
        t.apply(SourceEvent::Replaced(
            Kind::Service,
            vec![svc("a", "172.30.0.1")],
        ));
        assert!(!t.is_ready());
        t.apply(SourceEvent::Replaced(Kind::EndpointSlice, vec![]));
        assert!(t.is_ready());
        assert_eq!(names(&t.take().changes), ["FULL"], "the first sync is full");
        assert!(!t.has_changes());
    }

    #[test]
    fn changes_are_tracked_per_service() {
        let mut t = Tracker::new("node-a", SystemTime::UNIX_EPOCH);
        t.apply(SourceEvent::Replaced(
            Kind::Service,
            vec![svc("a", "172.30.0.1"), svc("b", "172.30.0.2")],
        ));
        t.apply(SourceEvent::Replaced(
            Kind::EndpointSlice,
            vec![slice("a-1", "a", "10.0.0.1", None)],
        ));
        t.take();
        // Re-applying an identical object is not a change.
        assert!(!t.apply(SourceEvent::Applied(svc("a", "172.30.0.1"))));
        assert!(t.apply(SourceEvent::Applied(slice("a-1", "a", "10.0.0.2", None))));
        assert!(t.apply(SourceEvent::Applied(slice("b-1", "b", "10.0.0.3", None))));
        assert_eq!(t.pending_counts(), (0, 2));
        assert_eq!(names(&t.take().changes), ["ns/a", "ns/b"]);
        // A slice moved to another service changes both.
        t.apply(SourceEvent::Applied(slice("b-1", "a", "10.0.0.3", None)));
        assert_eq!(names(&t.take().changes), ["ns/a", "ns/b"]);
        // A relist that lacks an object deletes it.
        t.apply(SourceEvent::Replaced(
            Kind::Service,
            vec![svc("a", "172.30.0.1")],
        ));
        assert_eq!(names(&t.take().changes), ["ns/b"]);
        assert_eq!(t.objects().services.len(), 1);
    }

    #[test]
    fn node_topology_change_forces_a_full_sync() {
        let mut t = Tracker::new("node-a", SystemTime::UNIX_EPOCH);
        t.apply(SourceEvent::Replaced(Kind::Node, vec![node("zone-a")]));
        t.take();
        assert!(!t.apply(SourceEvent::Applied(node("zone-a"))));
        assert!(t.apply(SourceEvent::Applied(node("zone-b"))));
        assert_eq!(names(&t.take().changes), ["FULL"]);
    }

    #[test]
    fn trigger_times_after_start_are_collected() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut t = Tracker::new("node-a", start);
        t.apply(SourceEvent::Applied(slice(
            "a-1",
            "a",
            "10.0.0.1",
            Some("2020-01-01T00:00:00Z"),
        )));
        t.apply(SourceEvent::Applied(slice(
            "a-2",
            "a",
            "10.0.0.2",
            Some("2027-06-01T00:00:00.5Z"),
        )));
        let p = t.take();
        assert_eq!(
            p.trigger_times.len(),
            1,
            "changes from before start are not ours"
        );
        assert_eq!(p.trigger_times[0].0, IpFamily::V4);
        assert_eq!(
            parse_rfc3339("2027-06-01T00:00:00.5Z"),
            Some(p.trigger_times[0].1)
        );
    }
}
