//! The reconciler: the single owner of the tracker and the backends.
//!
//! Sources send [`Command`]s over a channel; the reconciler applies them to the tracker
//! and, when the bounded-frequency runner says so, builds the desired state and syncs
//! each family. It runs on its own thread because kernel writes block. What happens
//! around a sync (metrics, health, health-check servers, conntrack cleanup) is an
//! [`Observer`], so the loop itself stays small and testable.

use crate::model::{self, InvalidObject, ProxyConfig, ProxyState};
use crate::sync_runner::{Reason, Runner};
use crate::tracker::{SourceEvent, Tracker};
use kproxy_backend_api::{Backend, BackendError, Changes, IpFamily, SyncReport};
use std::collections::BTreeSet;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};
use tracing::{info, info_span, warn};

/// What the reconciler is told.
// Each object crosses the channel once, by move; boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Command {
    Source(SourceEvent),
    /// Stop after the current sync (SIGTERM). Kernel state is left in place.
    Shutdown,
}

/// Timing of the sync loop.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// kube-proxy's `minSyncPeriod` (default 1 s).
    pub min_sync_period: Duration,
    /// kube-proxy's `syncPeriod` (default 30 s): the retry interval after a failure.
    pub sync_period: Duration,
    /// A full sync at least this often, re-reading the kernel (default 1 h).
    pub full_sync_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            min_sync_period: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
            full_sync_period: Duration::from_secs(3600),
        }
    }
}

/// One family's sync result.
#[derive(Debug)]
pub struct FamilySync {
    pub family: IpFamily,
    pub full: bool,
    pub elapsed: Duration,
    pub result: Result<SyncReport, BackendError>,
}

/// Hooks around syncs. Every method has a no-op default.
pub trait Observer {
    /// A change was queued (the health check's "pending since").
    fn queued(&mut self, _now: SystemTime) {}
    /// One family was synced (successfully or not).
    fn family_synced(&mut self, _sync: &FamilySync) {}
    /// Every family synced successfully: the state is in the kernel.
    fn synced(
        &mut self,
        _state: &ProxyState,
        _trigger_times: &[(IpFamily, SystemTime)],
        _now: SystemTime,
    ) {
    }
    /// The tracker's pending and total change counts, after each event batch and sync.
    fn changes(&mut self, _pending: (usize, usize), _totals: (u64, u64)) {}
    /// Objects newly found invalid (each reported once while it stays invalid).
    fn invalid(&mut self, _objects: &[InvalidObject]) {}
    /// This node's object changed (health eligibility).
    fn node(&mut self, _node: Option<&k8s_openapi::api::core::v1::Node>) {}
    /// The kernel differed from the desired state; a full sync repairs it.
    fn drift(&mut self, _family: IpFamily, _differences: &[String]) {}
}

/// An observer that does nothing.
#[derive(Debug, Default)]
pub struct NoObserver;
impl Observer for NoObserver {}

/// The reconciler's state.
pub struct Reconciler<B, O> {
    cfg: ProxyConfig,
    backends: Vec<B>,
    tracker: Tracker,
    runner: Runner,
    observer: O,
    reported_invalid: BTreeSet<String>,
    local_addrs: fn() -> Vec<std::net::IpAddr>,
    /// A source reported a lost connection and has not delivered anything since.
    source_down: bool,
    /// How often the live kernel state is compared with the desired one.
    verify_period: Duration,
    next_verify: Instant,
}

impl<B, O> std::fmt::Debug for Reconciler<B, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("tracker", &self.tracker)
            .finish_non_exhaustive()
    }
}

/// Why the loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    Shutdown,
    /// `--once`: one successful sync done.
    Once,
    /// The sources went away.
    Disconnected,
}

fn local_addrs() -> Vec<std::net::IpAddr> {
    crate::local_addrs::local_addresses().unwrap_or_else(|e| {
        warn!("cannot list local addresses: {e}");
        Vec::new()
    })
}

impl<B: Backend, O: Observer> Reconciler<B, O> {
    pub fn new(cfg: ProxyConfig, backends: Vec<B>, timing: Timing, observer: O) -> Self {
        let tracker = Tracker::new(cfg.node_name.clone(), SystemTime::now());
        Reconciler {
            cfg,
            backends,
            tracker,
            runner: Runner::new(
                timing.min_sync_period,
                timing.sync_period,
                timing.full_sync_period,
            ),
            observer,
            reported_invalid: BTreeSet::new(),
            local_addrs,
            source_down: false,
            verify_period: timing.sync_period,
            next_verify: Instant::now() + timing.sync_period,
        }
    }

    pub fn observer(&self) -> &O {
        &self.observer
    }

    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    /// Applies one source event.
    pub fn handle(&mut self, ev: SourceEvent) {
        if let SourceEvent::Disconnected(kind) = &ev {
            // Like a queued update that cannot be programmed: health turns unhealthy if
            // this lasts longer than healthTimeout. The rules stay as they are.
            warn!(
                ?kind,
                "lost contact with the API server; keeping the current rules"
            );
            self.source_down = true;
            self.observer.queued(SystemTime::now());
            return;
        }
        if std::mem::take(&mut self.source_down) {
            // Back in contact: sync (even if nothing changed) so health recovers.
            self.runner.request();
        }
        let node_event = matches!(&ev, SourceEvent::Applied(o) | SourceEvent::Deleted(o) if o.kind() == crate::tracker::Kind::Node)
            || matches!(&ev, SourceEvent::Replaced(crate::tracker::Kind::Node, _));
        if self.tracker.apply(ev) {
            self.runner.request();
            self.observer.queued(SystemTime::now());
        }
        if node_event {
            self.observer.node(self.tracker.node());
        }
    }

    /// Runs the loop until shutdown (or, with `once`, until one successful sync).
    pub fn run(&mut self, rx: &Receiver<Command>, once: bool) -> Exit {
        loop {
            let now = Instant::now();
            // Until both kinds are listed nothing may be programmed, so just wait.
            let timeout = if self.tracker.is_ready() {
                self.runner
                    .next_deadline(now)
                    .min(self.next_verify)
                    .saturating_duration_since(now)
            } else {
                Duration::from_secs(3600)
            };
            match rx.recv_timeout(timeout) {
                Ok(Command::Source(ev)) => {
                    self.handle(ev);
                    // Coalesce whatever else is already queued.
                    while let Ok(cmd) = rx.try_recv() {
                        match cmd {
                            Command::Source(ev) => self.handle(ev),
                            Command::Shutdown => return Exit::Shutdown,
                        }
                    }
                    self.observer
                        .changes(self.tracker.pending_counts(), self.tracker.change_totals());
                }
                Ok(Command::Shutdown) => return Exit::Shutdown,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Exit::Disconnected,
            }
            let now = Instant::now();
            if !self.tracker.is_ready() {
                continue;
            }
            if now >= self.next_verify {
                self.next_verify = now + self.verify_period;
                // Only a settled state can be compared: with changes queued the kernel
                // is legitimately behind.
                if !self.tracker.has_changes() && !self.runner.pending() {
                    self.verify();
                }
            }
            let Some(reason) = self.runner.due_reason(now) else {
                continue;
            };
            if reason == Reason::Periodic {
                self.tracker.force_full();
            }
            let ok = self.sync();
            self.runner.finished(Instant::now(), ok);
            if ok && once {
                return Exit::Once;
            }
        }
    }

    /// One sync of every family; returns whether all succeeded.
    pub fn sync(&mut self) -> bool {
        let pending = self.tracker.take();
        let local = (self.local_addrs)();
        let state = model::build(&self.tracker.objects(), &self.cfg, &local);
        self.report_invalid(&state.invalid);
        let changed = match &pending.changes {
            Changes::Full => state
                .families
                .values()
                .map(|f| f.services.len())
                .max()
                .unwrap_or(0),
            Changes::Services(s) => s.len(),
        };
        let span = info_span!(
            "sync",
            full = pending.changes.is_full(),
            changed_services = changed
        );
        let _enter = span.enter();
        let mut ok = true;
        for b in &mut self.backends {
            let family = b.family();
            let Some(fam) = state.families.get(&family) else {
                continue;
            };
            let start = Instant::now();
            let result = b.sync(&fam.node, &fam.services, &pending.changes);
            let sync = FamilySync {
                family,
                full: result
                    .as_ref()
                    .map_or(pending.changes.is_full(), |r| r.full),
                elapsed: start.elapsed(),
                result,
            };
            match &sync.result {
                Ok(r) => info!(
                    %family,
                    full = r.full,
                    services = fam.services.len(),
                    operations = r.operations,
                    elapsed_ms = sync.elapsed.as_secs_f64() * 1e3,
                    "synced"
                ),
                Err(e) => {
                    warn!(%family, "sync failed, the next sync will be a full one: {e}");
                    ok = false;
                }
            }
            self.observer.family_synced(&sync);
        }
        if ok {
            self.observer
                .synced(&state, &pending.trigger_times, SystemTime::now());
        } else {
            // The tracker's changes were taken; only a full sync covers them now.
            self.tracker.force_full();
        }
        self.observer
            .changes(self.tracker.pending_counts(), self.tracker.change_totals());
        ok
    }

    /// Compares the kernel with the desired state (someone flushed a chain, deleted the
    /// table, edited an element). Drift is logged, reported, and repaired by a full sync
    /// as soon as the runner allows.
    pub fn verify(&mut self) -> bool {
        let local = (self.local_addrs)();
        let state = model::build(&self.tracker.objects(), &self.cfg, &local);
        let mut drift = false;
        for b in &mut self.backends {
            let family = b.family();
            let Some(fam) = state.families.get(&family) else {
                continue;
            };
            match b.verify(&fam.node, &fam.services) {
                Ok(d) if d.is_empty() => {}
                Ok(d) => {
                    warn!(%family, differences = d.len(), first = %d[0], "kernel state drifted; repairing with a full sync");
                    self.observer.drift(family, &d);
                    drift = true;
                }
                Err(e) => warn!(%family, "cannot verify the kernel state: {e}"),
            }
        }
        if drift {
            self.tracker.force_full();
            self.runner.request();
        }
        drift
    }

    fn report_invalid(&mut self, invalid: &[InvalidObject]) {
        let now: BTreeSet<String> = invalid.iter().map(|i| i.to_string()).collect();
        let fresh: Vec<InvalidObject> = invalid
            .iter()
            .filter(|i| !self.reported_invalid.contains(&i.to_string()))
            .cloned()
            .collect();
        for i in &fresh {
            warn!("skipping invalid object: {i}");
        }
        if !fresh.is_empty() {
            self.observer.invalid(&fresh);
        }
        self.reported_invalid = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::{Kind, Object};
    use kproxy_backend_api::{NodeContext, ServicePlans};
    use serde_json::json;
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};

    /// Records each sync's kind of change; can be told to fail.
    #[derive(Clone, Default)]
    struct FakeBackend {
        log: Arc<Mutex<Vec<String>>>,
        fail: Arc<Mutex<bool>>,
    }

    impl Backend for FakeBackend {
        fn family(&self) -> IpFamily {
            IpFamily::V4
        }
        fn sync(
            &mut self,
            _: &NodeContext,
            services: &ServicePlans,
            changes: &Changes,
        ) -> Result<SyncReport, BackendError> {
            let entry = match changes {
                Changes::Full => format!("full:{}", services.len()),
                Changes::Services(s) => format!(
                    "partial:{}",
                    s.iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            };
            self.log.lock().expect("lock").push(entry);
            if *self.fail.lock().expect("lock") {
                return Err(BackendError::Apply("injected".into()));
            }
            Ok(SyncReport {
                full: changes.is_full(),
                operations: 1,
                services_examined: 0,
            })
        }
        fn render(&self, _: &NodeContext, _: &ServicePlans) -> String {
            String::new()
        }
        fn cleanup(&mut self) -> Result<(), BackendError> {
            Ok(())
        }
    }

    fn svc(name: &str) -> Object {
        Object::Service(
            serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": name},
                "spec": {"clusterIP": "172.30.0.1", "ports": [{"port": 80}]}}))
            .expect("svc"),
        )
    }

    /// Waits (bounded) until the log satisfies `pred`; the loop runs on its own thread.
    fn wait_for(log: &Arc<Mutex<Vec<String>>>, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = log.lock().expect("lock").clone();
            if pred(&now) || Instant::now() > deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn fast() -> Timing {
        Timing {
            min_sync_period: Duration::from_millis(50),
            sync_period: Duration::from_millis(100),
            full_sync_period: Duration::from_secs(3600),
        }
    }

    #[test]
    fn nothing_is_programmed_before_both_lists_then_changes_are_partial() {
        let backend = FakeBackend::default();
        let log = backend.log.clone();
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::spawn(move || {
            let mut r = Reconciler::new(
                ProxyConfig::new("node-a"),
                vec![backend],
                fast(),
                NoObserver,
            );
            r.run(&rx, false)
        });
        let send = |ev| tx.send(Command::Source(ev)).expect("send");
        send(SourceEvent::Replaced(Kind::Service, vec![svc("a")]));
        std::thread::sleep(Duration::from_millis(150));
        assert!(
            log.lock().expect("lock").is_empty(),
            "synced before EndpointSlices were listed"
        );
        send(SourceEvent::Replaced(Kind::EndpointSlice, vec![]));
        assert_eq!(wait_for(&log, |l| !l.is_empty()), ["full:1"]);
        // Later changes are partial syncs of exactly the touched services (how a burst
        // is split depends on timing; the runner's tests pin the coalescing rule).
        send(SourceEvent::Applied(svc("b")));
        send(SourceEvent::Applied(svc("c")));
        send(SourceEvent::Deleted(svc("a")));
        let seen = |l: &[String]| -> BTreeSet<String> {
            l[1..]
                .iter()
                .flat_map(|e| {
                    e.trim_start_matches("partial:")
                        .split(',')
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let log_now = wait_for(&log, |l| seen(l).len() == 3);
        tx.send(Command::Shutdown).expect("send");
        assert_eq!(handle.join().expect("join"), Exit::Shutdown);
        assert!(
            log_now[1..].iter().all(|e| e.starts_with("partial:")),
            "{log_now:?}"
        );
        assert_eq!(
            seen(&log_now),
            ["ns/a", "ns/b", "ns/c"]
                .map(String::from)
                .into_iter()
                .collect()
        );
    }

    #[test]
    fn a_failed_sync_is_retried_as_a_full_sync() {
        let backend = FakeBackend::default();
        let (log, fail) = (backend.log.clone(), backend.fail.clone());
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::spawn(move || {
            let mut r = Reconciler::new(
                ProxyConfig::new("node-a"),
                vec![backend],
                fast(),
                NoObserver,
            );
            r.run(&rx, false)
        });
        let send = |ev| tx.send(Command::Source(ev)).expect("send");
        send(SourceEvent::Replaced(Kind::Service, vec![svc("a")]));
        send(SourceEvent::Replaced(Kind::EndpointSlice, vec![]));
        wait_for(&log, |l| l.len() == 1);
        *fail.lock().expect("lock") = true;
        send(SourceEvent::Applied(svc("b")));
        wait_for(&log, |l| l.len() == 2);
        *fail.lock().expect("lock") = false;
        // No new event: the retry comes from the runner within sync_period.
        let log = wait_for(&log, |l| l.len() >= 3);
        tx.send(Command::Shutdown).expect("send");
        handle.join().expect("join");
        assert_eq!(log[..3], ["full:1", "partial:ns/b", "full:2"], "{log:?}");
    }

    #[test]
    fn once_exits_after_the_first_successful_sync() {
        let backend = FakeBackend::default();
        let (tx, rx) = mpsc::channel();
        tx.send(Command::Source(SourceEvent::Replaced(
            Kind::Service,
            vec![svc("a")],
        )))
        .expect("send");
        tx.send(Command::Source(SourceEvent::Replaced(
            Kind::EndpointSlice,
            vec![],
        )))
        .expect("send");
        let mut r = Reconciler::new(
            ProxyConfig::new("node-a"),
            vec![backend],
            fast(),
            NoObserver,
        );
        assert_eq!(r.run(&rx, true), Exit::Once);
    }
}
