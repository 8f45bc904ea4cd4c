//! kproxy's nftables backend.
//!
//! A sync is a pipeline of pure stages and one impure step:
//! 1. **plan** — [`objects`] turns the model's per-node plan into desired objects (chains
//!    with typed [`rule::Rule`]s, affinity sets, map elements), per Service;
//! 2. **diff** — [`NftablesBackend`] compares them with the [`live::LiveState`] it knows is
//!    in the kernel (read back at start-up and after failures, updated after every
//!    successful commit) and emits a [`transaction::Transaction`] with only the
//!    differences: unchanged chains and elements are never re-sent, a sync with nothing
//!    to change sends nothing at all;
//! 3. **apply** — a [`writer::NftWriter`] commits the transaction atomically.
//!
//! A failed commit leaves the kernel untouched (nftables transactions are atomic) and
//! forgets the live state, so the next sync re-reads the kernel and reconciles fully.
//!
//! ```
//! use kproxy_backend_api::{Backend, IpFamily, NodeContext, ServicePlans};
//! use kproxy_nftables::NftablesBackend;
//! let backend = NftablesBackend::new(IpFamily::V4, kproxy_nftables::writer::NftCli::default());
//! let text = backend.render(&NodeContext::empty(IpFamily::V4, "node-a"), &ServicePlans::new());
//! assert!(text.contains("add table ip kproxy"));
//! ```

pub mod eval;
pub mod live;
pub mod live_rules;
pub mod names;
pub mod objects;
pub mod rule;
pub mod transaction;
pub mod writer;

use kproxy_backend_api::{
    Backend, BackendError, Changes, IpFamily, NodeContext, ServiceName, ServicePlans, SyncReport,
};
use live::LiveState;
use names::ObjName;
use objects::{Chain, ElemKey, MapId, ServiceObjects, StaticObjects, Verdict};
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use transaction::{Op, Transaction};
use writer::NftWriter;

/// Who contributed an element: the node skeleton, or a Service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Owner {
    Node,
    Service(ServiceName),
}

type ElemValue = (Option<Verdict>, Option<String>);

/// Desired elements with their owners. Two services may claim the same key (say, the
/// same external IP and port); the first owner in order wins, deterministically, and the
/// key stays programmed until its last owner goes.
#[derive(Debug, Default)]
struct ElementOwners {
    owners: BTreeMap<(MapId, ElemKey), BTreeMap<Owner, ElemValue>>,
}

impl ElementOwners {
    fn remove(
        &mut self,
        owner: &Owner,
        elements: &[objects::Element],
        touched: &mut BTreeSet<(MapId, ElemKey)>,
    ) {
        for e in elements {
            let k = (e.map, e.key.clone());
            if let Some(o) = self.owners.get_mut(&k) {
                o.remove(owner);
                if o.is_empty() {
                    self.owners.remove(&k);
                }
            }
            touched.insert(k);
        }
    }

    fn add(
        &mut self,
        owner: &Owner,
        elements: &[objects::Element],
        touched: &mut BTreeSet<(MapId, ElemKey)>,
    ) {
        for e in elements {
            let k = (e.map, e.key.clone());
            self.owners
                .entry(k.clone())
                .or_default()
                .insert(owner.clone(), (e.verdict.clone(), e.comment.clone()));
            touched.insert(k);
        }
    }

    fn effective(&self, key: &(MapId, ElemKey)) -> Option<&ElemValue> {
        self.owners.get(key).and_then(|o| o.values().next())
    }
}

fn chain_hash(c: &Chain) -> u64 {
    let mut h = DefaultHasher::new();
    c.rules.hash(&mut h);
    h.finish()
}

/// The nftables backend for one IP family.
#[derive(Debug)]
pub struct NftablesBackend<W> {
    family: IpFamily,
    writer: W,
    /// What the kernel holds; `None` forces a read-back and a full sync.
    live: Option<LiveState>,
    /// The skeleton last committed.
    skeleton: Option<StaticObjects>,
    /// Each Service's objects as last committed.
    services: HashMap<ServiceName, ServiceObjects>,
    owners: ElementOwners,
    last_transaction: Option<Transaction>,
    /// Drift was found: the next full sync rewrites every chain, even those whose
    /// content follows from their name.
    distrust_live_chains: bool,
}

impl<W: NftWriter> NftablesBackend<W> {
    pub fn new(family: IpFamily, writer: W) -> Self {
        NftablesBackend {
            family,
            writer,
            live: None,
            skeleton: None,
            services: HashMap::new(),
            owners: ElementOwners::default(),
            last_transaction: None,
            distrust_live_chains: false,
        }
    }

    /// The last transaction sent to the kernel (None if the last sync sent nothing).
    pub fn last_transaction(&self) -> Option<&Transaction> {
        self.last_transaction.as_ref()
    }

    /// What this backend believes the kernel holds.
    pub fn live(&self) -> Option<&LiveState> {
        self.live.as_ref()
    }

    pub fn writer_mut(&mut self) -> &mut W {
        &mut self.writer
    }

    fn read_live(&mut self) -> Result<LiveState, BackendError> {
        let text = self
            .writer
            .list_table(self.family)
            .map_err(|e| BackendError::ReadBack(e.to_string()))?;
        match text {
            None => Ok(LiveState::default()),
            Some(t) => {
                LiveState::from_nft_json(&t).map_err(|e| BackendError::ReadBack(e.to_string()))
            }
        }
    }
}

/// Builds one transaction from the live state and the desired changes, in an order the
/// kernel accepts: everything that is referenced is added before what references it, and
/// removed after it.
struct Planner<'a> {
    live: &'a LiveState,
    family: IpFamily,
    /// Table, maps and the skeleton's chains (full syncs only).
    setup: Vec<Op>,
    new_sets: Vec<Op>,
    endpoint_chains: Vec<Op>,
    other_chains: Vec<Op>,
    element_deletes: Vec<Op>,
    element_adds: Vec<Op>,
    stale_chains: BTreeSet<ObjName>,
    stale_sets: BTreeSet<ObjName>,
    /// Chains written by this transaction, with their content hash.
    written: Vec<(ObjName, u64)>,
    /// Rewrite every chain whatever the live state says (after drift).
    distrust: bool,
}

impl<'a> Planner<'a> {
    fn new(family: IpFamily, live: &'a LiveState) -> Self {
        Planner {
            distrust: false,
            live,
            family,
            setup: Vec::new(),
            new_sets: Vec::new(),
            endpoint_chains: Vec::new(),
            other_chains: Vec::new(),
            element_deletes: Vec::new(),
            element_adds: Vec::new(),
            stale_chains: BTreeSet::new(),
            stale_sets: BTreeSet::new(),
            written: Vec::new(),
        }
    }

    /// The skeleton: table, maps, static and base chains, rewritten on every full sync
    /// (a handful of operations) so a changed hook, CIDR or NodePort mode takes effect.
    fn skeleton(&mut self, s: &StaticObjects) {
        self.setup.push(Op::AddTable);
        for m in MapId::ALL {
            self.setup.push(Op::AddMap(m));
        }
        // Regular chains before the base chains that jump to them.
        let regular = s.chains.iter().map(|c| (c, None));
        let base = s.base_chains.iter().map(|(h, c)| (c, Some(*h)));
        for (c, hook) in regular.chain(base) {
            let exists = self.live.chains.contains_key(&c.name);
            self.setup.push(Op::AddChain {
                name: c.name.clone(),
                hook,
            });
            if exists {
                self.setup.push(Op::FlushChain(c.name.clone()));
            }
            for r in &c.rules {
                self.setup.push(Op::AddRule {
                    chain: c.name.clone(),
                    rule: r.clone(),
                });
            }
            self.written.push((c.name.clone(), chain_hash(c)));
        }
    }

    /// Writes a chain unless the kernel already holds exactly it.
    fn chain(&mut self, c: &Chain) {
        let hash = chain_hash(c);
        let live = self.live.chains.get(&c.name);
        let up_to_date = match live {
            _ if self.distrust => false,
            Some(_) if c.content_in_name => true,
            Some(Some(h)) => *h == hash,
            _ => false,
        };
        if up_to_date {
            return;
        }
        let out = if c.content_in_name {
            &mut self.endpoint_chains
        } else {
            &mut self.other_chains
        };
        match live {
            None => out.push(Op::AddChain {
                name: c.name.clone(),
                hook: None,
            }),
            Some(_) => out.push(Op::FlushChain(c.name.clone())),
        }
        for r in &c.rules {
            out.push(Op::AddRule {
                chain: c.name.clone(),
                rule: r.clone(),
            });
        }
        self.written.push((c.name.clone(), hash));
    }

    /// A Service's desired chains and sets; what `old` had and `new` lacks becomes stale.
    fn service(&mut self, new: &ServiceObjects, old: Option<&ServiceObjects>) {
        for s in &new.affinity_sets {
            if !self.live.affinity_sets.contains(&s.name) {
                self.new_sets.push(Op::AddAffinitySet {
                    name: s.name.clone(),
                    timeout_seconds: s.timeout_seconds,
                });
            }
        }
        for c in &new.chains {
            self.chain(c);
        }
        let Some(old) = old else { return };
        let keep: BTreeSet<&ObjName> = new.chains.iter().map(|c| &c.name).collect();
        for c in &old.chains {
            if !keep.contains(&c.name) && self.live.chains.contains_key(&c.name) {
                self.stale_chains.insert(c.name.clone());
            }
        }
        let keep: BTreeSet<&ObjName> = new.affinity_sets.iter().map(|s| &s.name).collect();
        for s in &old.affinity_sets {
            if !keep.contains(&s.name) && self.live.affinity_sets.contains(&s.name) {
                self.stale_sets.insert(s.name.clone());
            }
        }
    }

    /// Element differences for the touched keys: deletes, then adds (a changed verdict
    /// is a delete plus an add in the same transaction).
    fn elements(&mut self, owners: &ElementOwners, touched: &BTreeSet<(MapId, ElemKey)>) {
        for k in touched {
            let live = self.live.elements.get(&k.0).and_then(|m| m.get(&k.1));
            let want = owners.effective(k);
            let (delete, add) = match (live, want) {
                (None, None) => (false, None),
                (Some(_), None) => (true, None),
                (None, Some(w)) => (false, Some(w)),
                (Some(l), Some(w)) if *l != w.0 => (true, Some(w)),
                (Some(_), Some(_)) => (false, None),
            };
            if delete {
                self.element_deletes.push(Op::DeleteElement {
                    map: k.0,
                    key: k.1.clone(),
                });
            }
            if let Some((verdict, comment)) = add {
                self.element_adds.push(Op::AddElement {
                    map: k.0,
                    key: k.1.clone(),
                    verdict: verdict.clone(),
                    comment: comment.clone(),
                });
            }
        }
    }

    fn finish(self) -> (Transaction, Vec<(ObjName, u64)>) {
        let mut tx = Transaction::new(self.family);
        tx.ops.extend(self.setup);
        tx.ops.extend(self.new_sets);
        tx.ops.extend(self.endpoint_chains);
        tx.ops.extend(self.other_chains);
        tx.ops.extend(self.element_deletes);
        tx.ops.extend(self.element_adds);
        // Flush every stale chain first, so no stale chain still jumps to another when it
        // is deleted; the map elements pointing at them are gone by now.
        for c in &self.stale_chains {
            tx.ops.push(Op::FlushChain(c.clone()));
        }
        for c in &self.stale_chains {
            tx.ops.push(Op::DeleteChain(c.clone()));
        }
        for s in &self.stale_sets {
            tx.ops.push(Op::DeleteSet(s.clone()));
        }
        (tx, self.written)
    }
}

/// Records a committed transaction in the live state.
fn commit(live: &mut LiveState, tx: &Transaction, written: &[(ObjName, u64)]) {
    for op in &tx.ops {
        match op {
            Op::AddTable => live.table_exists = true,
            Op::AddChain { name, .. } => {
                live.chains.entry(name.clone()).or_insert(None);
            }
            Op::DeleteChain(name) => {
                live.chains.remove(name);
            }
            Op::AddMap(m) => {
                live.maps.insert(*m);
                live.elements.entry(*m).or_default();
            }
            Op::AddAffinitySet { name, .. } => {
                live.affinity_sets.insert(name.clone());
            }
            Op::DeleteSet(name) => {
                live.affinity_sets.remove(name);
            }
            Op::AddElement {
                map, key, verdict, ..
            } => {
                live.elements
                    .entry(*map)
                    .or_default()
                    .insert(key.clone(), verdict.clone());
            }
            Op::DeleteElement { map, key } => {
                if let Some(m) = live.elements.get_mut(map) {
                    m.remove(key);
                }
            }
            Op::FlushChain(_) | Op::AddRule { .. } => {}
        }
    }
    for (name, hash) in written {
        live.chains.insert(name.clone(), Some(*hash));
    }
}

/// A planned full reconciliation and the bookkeeping to keep if it commits.
struct FullPlan {
    tx: Transaction,
    written: Vec<(ObjName, u64)>,
    objects: HashMap<ServiceName, ServiceObjects>,
    owners: ElementOwners,
}

impl<W: NftWriter> NftablesBackend<W> {
    /// Plans a full reconciliation of `services` against `live`.
    fn plan_full(&self, live: &LiveState, node: &NodeContext, services: &ServicePlans) -> FullPlan {
        let skeleton = objects::static_objects(node);
        let mut planner = Planner::new(self.family, live);
        planner.distrust = self.distrust_live_chains;
        planner.skeleton(&skeleton);
        let mut owners = ElementOwners::default();
        let mut touched = BTreeSet::new();
        owners.add(&Owner::Node, &skeleton.elements, &mut touched);
        let mut objs = HashMap::with_capacity(services.len());
        let mut wanted_chains: BTreeSet<ObjName> = skeleton
            .chains
            .iter()
            .chain(skeleton.base_chains.iter().map(|(_, c)| c))
            .map(|c| c.name.clone())
            .collect();
        let mut wanted_sets = BTreeSet::new();
        for (name, ports) in services {
            let o = objects::service_objects(node, ports);
            planner.service(&o, None);
            owners.add(&Owner::Service(name.clone()), &o.elements, &mut touched);
            wanted_chains.extend(o.chains.iter().map(|c| c.name.clone()));
            wanted_sets.extend(o.affinity_sets.iter().map(|s| s.name.clone()));
            objs.insert(name.clone(), o);
        }
        // Everything live that nobody wants goes, whoever left it there (an older kproxy,
        // a crash mid-way, a hand edit).
        for name in live.chains.keys() {
            if !wanted_chains.contains(name) {
                planner.stale_chains.insert(name.clone());
            }
        }
        for name in &live.affinity_sets {
            if !wanted_sets.contains(name) {
                planner.stale_sets.insert(name.clone());
            }
        }
        for (map, elems) in &live.elements {
            touched.extend(elems.keys().map(|k| (*map, k.clone())));
        }
        planner.elements(&owners, &touched);
        let (tx, written) = planner.finish();
        FullPlan {
            tx,
            written,
            objects: objs,
            owners,
        }
    }
}

impl<W: NftWriter> Backend for NftablesBackend<W> {
    fn family(&self) -> IpFamily {
        self.family
    }

    fn sync(
        &mut self,
        node: &NodeContext,
        services: &ServicePlans,
        changes: &Changes,
    ) -> Result<SyncReport, BackendError> {
        let skeleton_changed = self.skeleton.as_ref() != Some(&objects::static_objects(node));
        let full = changes.is_full() || self.live.is_none() || skeleton_changed;
        if full {
            let live = self.read_live()?;
            let plan = self.plan_full(&live, node, services);
            let report = SyncReport {
                full: true,
                operations: plan.tx.len(),
                services_examined: services.len(),
            };
            self.apply(live, plan.tx, plan.written)?;
            self.services = plan.objects;
            self.owners = plan.owners;
            self.distrust_live_chains = false;
            self.skeleton = Some(objects::static_objects(node));
            return Ok(report);
        }

        let Changes::Services(changed) = changes else {
            unreachable!("full syncs handled above")
        };
        let live = self.live.take().unwrap_or_default();
        let mut planner = Planner::new(self.family, &live);
        let mut touched = BTreeSet::new();
        let mut new_objs = Vec::with_capacity(changed.len());
        let mut owners = std::mem::take(&mut self.owners);
        for name in changed {
            let new = services
                .get(name)
                .map(|ports| objects::service_objects(node, ports))
                .unwrap_or_default();
            let old = self.services.get(name);
            planner.service(&new, old);
            let owner = Owner::Service(name.clone());
            if let Some(old) = old {
                owners.remove(&owner, &old.elements, &mut touched);
            }
            owners.add(&owner, &new.elements, &mut touched);
            new_objs.push((name.clone(), new));
        }
        planner.elements(&owners, &touched);
        let (tx, written) = planner.finish();
        let report = SyncReport {
            full: false,
            operations: tx.len(),
            services_examined: changed.len(),
        };
        match self.apply(live, tx, written) {
            Ok(()) => {
                self.owners = owners;
                for (name, o) in new_objs {
                    if o == ServiceObjects::default() {
                        self.services.remove(&name);
                    } else {
                        self.services.insert(name, o);
                    }
                }
                Ok(report)
            }
            Err(e) => {
                // Owners were updated speculatively; the next (full) sync rebuilds them.
                self.owners = ElementOwners::default();
                Err(e)
            }
        }
    }

    fn render(&self, node: &NodeContext, services: &ServicePlans) -> String {
        self.plan_full(&LiveState::default(), node, services)
            .tx
            .render()
    }

    fn verify(
        &mut self,
        node: &NodeContext,
        services: &ServicePlans,
    ) -> Result<Vec<String>, BackendError> {
        let json = self
            .writer
            .list_table(self.family)
            .map_err(|e| BackendError::ReadBack(e.to_string()))?;
        let diffs = match json {
            None => vec![format!(
                "table {} {} is missing",
                rule::family_kw(self.family),
                objects::TABLE
            )],
            Some(json) => {
                let live = eval::Ruleset::live_lenient(&json)
                    .map_err(|e| BackendError::ReadBack(e.to_string()))?;
                eval::Ruleset::desired(node, services).differences(&live)
            }
        };
        if !diffs.is_empty() {
            self.live = None;
            self.distrust_live_chains = true;
        }
        Ok(diffs)
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        self.live = None;
        self.services.clear();
        self.owners = ElementOwners::default();
        self.skeleton = None;
        self.writer
            .delete_table(self.family)
            .map_err(|e| BackendError::Apply(e.to_string()))
    }
}

impl<W: NftWriter> NftablesBackend<W> {
    /// Sends a transaction (nothing at all if it is empty) and records the result. On
    /// failure the live state is forgotten, so the next sync is a full one.
    fn apply(
        &mut self,
        mut live: LiveState,
        tx: Transaction,
        written: Vec<(ObjName, u64)>,
    ) -> Result<(), BackendError> {
        if tx.is_empty() {
            self.last_transaction = None;
            self.live = Some(live);
            return Ok(());
        }
        let result = self.writer.apply(&tx);
        self.last_transaction = Some(tx);
        match result {
            Ok(()) => {
                if let Some(tx) = &self.last_transaction {
                    commit(&mut live, tx, &written);
                }
                self.live = Some(live);
                Ok(())
            }
            Err(e) => {
                self.live = None;
                self.skeleton = None;
                Err(BackendError::Apply(e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Diff behaviour with a writer that records transactions instead of applying them.
    use super::*;
    use kproxy_backend_api::{
        CategorizedEndpoints, Endpoint, Protocol, ServicePort, ServicePortName, ServicePortPlan,
        TrafficPolicy,
    };
    use writer::WriterError;

    #[derive(Debug, Default)]
    struct Recorder {
        applied: Vec<Transaction>,
        fail_next: bool,
    }

    impl NftWriter for Recorder {
        fn apply(&mut self, tx: &Transaction) -> Result<(), WriterError> {
            if std::mem::take(&mut self.fail_next) {
                return Err(WriterError::Refused("injected failure".into()));
            }
            self.applied.push(tx.clone());
            Ok(())
        }
        fn list_table(&mut self, _: IpFamily) -> Result<Option<String>, WriterError> {
            Ok(None)
        }
        fn delete_table(&mut self, _: IpFamily) -> Result<(), WriterError> {
            Ok(())
        }
    }

    fn ep(ip: &str) -> Endpoint {
        Endpoint {
            ip: ip.parse().expect("ip"),
            port: 80,
            node_name: None,
            zone: None,
            is_local: false,
            ready: true,
            serving: true,
            terminating: false,
            zone_hints: vec![],
            node_hints: vec![],
        }
    }

    fn service(name: &str, cip: &str, eps: &[&str]) -> (ServiceName, Vec<ServicePortPlan>) {
        let svc = ServiceName::new("ns", name);
        let endpoints: Vec<Endpoint> = eps.iter().map(|i| ep(i)).collect();
        let plan = ServicePortPlan {
            port: ServicePort {
                name: ServicePortName::new(svc.clone(), "p80", Protocol::Tcp),
                family: IpFamily::V4,
                cluster_ip: cip.parse().expect("ip"),
                port: 80,
                node_port: None,
                external_ips: vec![],
                load_balancer_ips: vec![],
                source_ranges: vec![],
                session_affinity_seconds: None,
                external_policy: TrafficPolicy::Cluster,
                internal_policy: TrafficPolicy::Cluster,
                health_check_node_port: None,
            },
            categorized: CategorizedEndpoints {
                cluster: endpoints.clone(),
                all_reachable: endpoints.clone(),
                has_any_endpoints: !endpoints.is_empty(),
                ..Default::default()
            },
            endpoints,
        };
        (svc, vec![plan])
    }

    fn node() -> NodeContext {
        let mut n = NodeContext::empty(IpFamily::V4, "node-a");
        n.cluster_cidrs = vec!["10.0.0.0/8".parse().expect("net")];
        n
    }

    fn changed(names: &[&str]) -> Changes {
        Changes::Services(names.iter().map(|n| ServiceName::new("ns", *n)).collect())
    }

    fn backend_with(services: &ServicePlans) -> NftablesBackend<Recorder> {
        let mut b = NftablesBackend::new(IpFamily::V4, Recorder::default());
        let r = b
            .sync(&node(), services, &Changes::Full)
            .expect("full sync");
        assert!(r.full);
        b
    }

    fn touches_only(tx: &Transaction, svc: &str) {
        let text = tx.render();
        for line in text.lines() {
            assert!(
                line.contains(&format!("ns/{svc}/")) || line.contains("element"),
                "{line}"
            );
        }
    }

    #[test]
    fn no_op_sync_sends_nothing() {
        let services: ServicePlans = [service("a", "172.30.0.1", &["10.0.0.1"])]
            .into_iter()
            .collect();
        let mut b = backend_with(&services);
        let r = b.sync(&node(), &services, &changed(&["a"])).expect("sync");
        assert_eq!(r.operations, 0);
        assert!(b.last_transaction().is_none());
        assert_eq!(
            b.writer_mut().applied.len(),
            1,
            "only the initial full sync was sent"
        );
    }

    #[test]
    fn adding_an_endpoint_touches_only_that_service() {
        let mut services: ServicePlans = [
            service("a", "172.30.0.1", &["10.0.0.1"]),
            service("b", "172.30.0.2", &["10.0.0.2"]),
        ]
        .into_iter()
        .collect();
        let mut b = backend_with(&services);
        let (k, v) = service("a", "172.30.0.1", &["10.0.0.1", "10.0.0.3"]);
        services.insert(k, v);
        let r = b.sync(&node(), &services, &changed(&["a"])).expect("sync");
        let tx = b.last_transaction().expect("sent");
        // New endpoint chain (add + 2 rules), service chain rewritten (flush + 2 rules).
        assert_eq!(r.operations, 6, "{}", tx.render());
        touches_only(tx, "a");
    }

    #[test]
    fn service_lifecycle_op_counts() {
        let mut services = ServicePlans::new();
        let mut b = backend_with(&services);
        // Add a service with one endpoint: endpoint chain (1+2), service chain (1+2),
        // cluster-ips and service-ips elements.
        let (k, v) = service("a", "172.30.0.1", &["10.0.0.1"]);
        services.insert(k.clone(), v);
        assert_eq!(
            b.sync(&node(), &services, &changed(&["a"]))
                .expect("add")
                .operations,
            8
        );
        // Change the endpoint's IP: new chain (3), service chain rewrite (3), old chain
        // flushed and deleted (2).
        services.insert(k.clone(), service("a", "172.30.0.1", &["10.0.0.9"]).1);
        assert_eq!(
            b.sync(&node(), &services, &changed(&["a"]))
                .expect("move")
                .operations,
            8
        );
        // Empty the endpoints: service-ips element replaced by a reject element, both
        // chains removed (flush+delete each).
        services.insert(k.clone(), service("a", "172.30.0.1", &[]).1);
        let r = b.sync(&node(), &services, &changed(&["a"])).expect("empty");
        let text = b.last_transaction().expect("sent").render();
        assert_eq!(r.operations, 6, "{text}");
        assert!(text.contains("no-endpoint-services { 172.30.0.1 . tcp . 80 comment \"ns/a:p80\" : goto reject-chain }"));
        // Delete the service: two element deletes, nothing else.
        services.remove(&k);
        let r = b
            .sync(&node(), &services, &changed(&["a"]))
            .expect("delete");
        assert_eq!(
            r.operations,
            2,
            "{}",
            b.last_transaction().expect("sent").render()
        );
        assert_eq!(b.live().expect("live").element_count(), 0);
        assert!(b
            .live()
            .expect("live")
            .chains
            .keys()
            .all(|c| !c.is_per_service()));
    }

    #[test]
    fn failed_apply_makes_the_next_sync_full() {
        let mut services: ServicePlans = [service("a", "172.30.0.1", &["10.0.0.1"])]
            .into_iter()
            .collect();
        let mut b = backend_with(&services);
        services.insert(
            ServiceName::new("ns", "a"),
            service("a", "172.30.0.1", &["10.0.0.2"]).1,
        );
        b.writer_mut().fail_next = true;
        assert!(b.sync(&node(), &services, &changed(&["a"])).is_err());
        let r = b.sync(&node(), &services, &changed(&["a"])).expect("retry");
        assert!(r.full, "a failure forces a full sync");
    }

    #[test]
    fn shared_keys_stay_until_their_last_owner_goes() {
        // Two services claim the same ClusterIP (a misconfiguration): the element must
        // survive the removal of either one.
        let mut services: ServicePlans = [
            service("a", "172.30.0.1", &["10.0.0.1"]),
            service("b", "172.30.0.1", &["10.0.0.2"]),
        ]
        .into_iter()
        .collect();
        let mut b = backend_with(&services);
        services.remove(&ServiceName::new("ns", "a"));
        b.sync(&node(), &services, &changed(&["a"])).expect("sync");
        let live = b.live().expect("live");
        let key = (
            MapId::ServiceIps,
            ElemKey::AddrProtoPort("172.30.0.1".parse().expect("ip"), Protocol::Tcp, 80),
        );
        let v = live.elements[&key.0].get(&key.1).cloned().flatten();
        assert!(
            matches!(&v, Some(Verdict::Goto(c)) if c.as_str().ends_with("ns/b/tcp/p80")),
            "{v:?}"
        );
        assert!(live.elements[&MapId::ClusterIps]
            .contains_key(&ElemKey::Addr("172.30.0.1".parse().expect("ip"))));
    }
}
