//! kube-proxy's own health: is the proxier keeping up, and should load balancers use this node?
//!
//! This is upstream's `ProxyHealthServer` state (pkg/proxy/healthcheck/proxy_health.go),
//! kept apart from HTTP so it can be driven and checked with injected time:
//!
//! - [`ProxyHealth::queued_update`] when a change arrives that needs a sync; only the oldest
//!   pending one is remembered.
//! - [`ProxyHealth::updated`] after a successful sync; it clears the pending mark.
//! - A family is unhealthy iff it has a pending update at least `healthTimeout`
//!   (2 × `--iptables-sync-period`/`syncPeriod`, 60 s by default) old. A family that is busy but
//!   not late, idle, or starting up is healthy, so a quiet cluster never looks broken.
//! - Only families that have been [`ProxyHealth::updated`] at least once are judged, exactly as
//!   upstream (its sync loop calls `Updated` for each family when it starts, and so should
//!   kproxy's).
//! - [`ProxyHealth::sync_node`] records whether the node may receive load-balancer traffic
//!   (present, not being deleted, not tainted by the cluster autoscaler); only `/healthz` looks
//!   at it, so a node being drained fails `/healthz` while `/livez` stays up and the kubelet
//!   does not restart kproxy.

use super::clock::{rfc3339_nano, Clock, SystemClock};
use kproxy_backend_api::IpFamily;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

/// The taint the cluster autoscaler puts on a node before deleting it.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Shared health state of the proxiers (one per IP family) and of the node.
///
/// Share it with `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct ProxyHealth {
    health_timeout: Duration,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    last_updated: BTreeMap<IpFamily, SystemTime>,
    oldest_pending: BTreeMap<IpFamily, SystemTime>,
    node_eligible: bool,
}

/// One family's health, as reported under `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FamilyHealth {
    /// When this family last synced successfully.
    pub last_updated: SystemTime,
    pub healthy: bool,
}

/// The proxy's health at one instant (upstream's `ProxyHealth`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthStatus {
    /// The newest `last_updated` over all families; `None` before the first sync.
    pub last_updated: Option<SystemTime>,
    pub current_time: SystemTime,
    /// True iff every judged family is healthy.
    pub healthy: bool,
    /// Per family, only for families that have synced at least once.
    pub families: BTreeMap<IpFamily, FamilyHealth>,
}

#[derive(Serialize)]
struct Body {
    #[serde(rename = "lastUpdated")]
    last_updated: String,
    #[serde(rename = "currentTime")]
    current_time: String,
    #[serde(rename = "nodeEligible", skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
    healthy: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    status: BTreeMap<&'static str, FamilyBody>,
}

#[derive(Serialize)]
struct FamilyBody {
    #[serde(rename = "lastUpdated")]
    last_updated: String,
    healthy: bool,
}

impl HealthStatus {
    /// The JSON body of `/livez` (`node_eligible: None`) or `/healthz` (`Some`), byte for byte
    /// as Go's `json.Marshal` writes upstream's struct: compact, fields in upstream's order,
    /// `status` keyed `IPv4`/`IPv6` and left out when empty.
    pub fn to_json(&self, node_eligible: Option<bool>) -> String {
        let body = Body {
            last_updated: rfc3339_nano(self.last_updated),
            current_time: rfc3339_nano(Some(self.current_time)),
            node_eligible,
            healthy: self.healthy,
            status: self
                .families
                .iter()
                .map(|(f, h)| {
                    (
                        f.label(),
                        FamilyBody {
                            last_updated: rfc3339_nano(Some(h.last_updated)),
                            healthy: h.healthy,
                        },
                    )
                })
                .collect(),
        };
        // Serialising strings, bools and a string-keyed map cannot fail.
        serde_json::to_string(&body).unwrap_or_default()
    }
}

impl ProxyHealth {
    /// Health state judged against `healthTimeout = 2 × sync_period`, on the wall clock.
    /// The node counts as eligible until [`ProxyHealth::sync_node`] says otherwise, so a
    /// proxy that runs without a Node object (offline mode) is not drained.
    pub fn new(sync_period: Duration) -> ProxyHealth {
        ProxyHealth::with_clock(sync_period, Arc::new(SystemClock))
    }

    /// Like [`ProxyHealth::new`], with the clock the HTTP endpoints read.
    pub fn with_clock(sync_period: Duration, clock: Arc<dyn Clock>) -> ProxyHealth {
        ProxyHealth {
            health_timeout: sync_period.saturating_mul(2),
            clock,
            state: Mutex::new(State {
                last_updated: BTreeMap::new(),
                oldest_pending: BTreeMap::new(),
                node_eligible: true,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How long a queued update may wait before its family is unhealthy.
    pub fn health_timeout(&self) -> Duration {
        self.health_timeout
    }

    /// Now, by this health state's clock. Pass it to the other methods in production.
    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// A change that needs a sync of `family` arrived at `now`. Keeps the oldest pending time.
    pub fn queued_update(&self, family: IpFamily, now: SystemTime) {
        self.state().oldest_pending.entry(family).or_insert(now);
    }

    /// `family` synced successfully at `now`: nothing is pending any more.
    pub fn updated(&self, family: IpFamily, now: SystemTime) {
        let mut st = self.state();
        st.oldest_pending.remove(&family);
        st.last_updated.insert(family, now);
    }

    /// Records the node's eligibility for load-balancer traffic: it must exist, not be
    /// being deleted, and not carry [`TO_BE_DELETED_TAINT`].
    pub fn sync_node(&self, node_present: bool, deleting: bool, to_be_deleted_taint: bool) {
        self.state().node_eligible = node_present && !deleting && !to_be_deleted_taint;
    }

    /// Whether the node may receive load-balancer traffic (see [`ProxyHealth::sync_node`]).
    pub fn node_eligible(&self) -> bool {
        self.state().node_eligible
    }

    /// The health at `now`.
    pub fn health(&self, now: SystemTime) -> HealthStatus {
        let st = self.state();
        let mut status = HealthStatus {
            last_updated: st.last_updated.values().max().copied(),
            current_time: now,
            healthy: true,
            families: BTreeMap::new(),
        };
        for (&family, &last_updated) in &st.last_updated {
            // A clock that went backwards counts as "not late", as Go's negative Sub does.
            let late = st.oldest_pending.get(&family).is_some_and(|&queued| {
                now.duration_since(queued)
                    .is_ok_and(|waited| waited >= self.health_timeout)
            });
            if late {
                status.healthy = false;
            }
            status.families.insert(
                family,
                FamilyHealth {
                    last_updated,
                    healthy: !late,
                },
            );
        }
        status
    }

    /// Whether every proxier is healthy at `now` (ignores the node's eligibility; this is
    /// what the per-service health checks report as `serviceProxyHealthy`).
    pub fn is_healthy(&self, now: SystemTime) -> bool {
        self.health(now).healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn unhealthy_only_when_a_queued_update_is_overdue() {
        let h = ProxyHealth::new(Duration::from_secs(30));
        assert_eq!(h.health_timeout(), Duration::from_secs(60));
        assert!(h.is_healthy(t(0)), "healthy while starting up");
        h.updated(IpFamily::V4, t(100));
        h.updated(IpFamily::V6, t(100));
        h.queued_update(IpFamily::V4, t(110));
        h.queued_update(IpFamily::V4, t(150)); // not the oldest: ignored
        assert!(h.is_healthy(t(169)));
        let s = h.health(t(170));
        assert!(!s.healthy);
        assert!(!s.families[&IpFamily::V4].healthy);
        assert!(s.families[&IpFamily::V6].healthy);
        h.updated(IpFamily::V4, t(171));
        let s = h.health(t(1000));
        assert!(s.healthy, "idle for long is fine");
        assert_eq!(s.last_updated, Some(t(171)));
    }

    #[test]
    fn a_family_never_updated_is_not_judged() {
        let h = ProxyHealth::new(Duration::from_secs(30));
        h.queued_update(IpFamily::V6, t(0));
        assert!(h.is_healthy(t(1000)));
        assert!(h.health(t(1000)).families.is_empty());
    }

    #[test]
    fn json_matches_upstream_layout() {
        let h = ProxyHealth::new(Duration::from_secs(30));
        assert_eq!(
            h.health(t(5)).to_json(None),
            r#"{"lastUpdated":"0001-01-01T00:00:00Z","currentTime":"1970-01-01T00:00:05Z","healthy":true}"#
        );
        h.updated(IpFamily::V6, t(1));
        h.updated(IpFamily::V4, t(2));
        assert_eq!(
            h.health(t(5)).to_json(Some(false)),
            concat!(
                r#"{"lastUpdated":"1970-01-01T00:00:02Z","currentTime":"1970-01-01T00:00:05Z","#,
                r#""nodeEligible":false,"healthy":true,"status":{"#,
                r#""IPv4":{"lastUpdated":"1970-01-01T00:00:02Z","healthy":true},"#,
                r#""IPv6":{"lastUpdated":"1970-01-01T00:00:01Z","healthy":true}}}"#
            )
        );
    }

    #[test]
    fn node_eligibility() {
        let h = ProxyHealth::new(Duration::from_secs(30));
        assert!(h.node_eligible());
        h.sync_node(true, false, true);
        assert!(!h.node_eligible());
        h.sync_node(true, true, false);
        assert!(!h.node_eligible());
        h.sync_node(false, false, false);
        assert!(!h.node_eligible());
        h.sync_node(true, false, false);
        assert!(h.node_eligible());
    }
}
