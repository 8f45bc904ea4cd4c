//! Prometheus metrics with kube-proxy's names, types, labels, help texts and buckets.
//!
//! Why it is shaped this way: kproxy replaces kube-proxy in place, so the dashboards, alerts and
//! SLO recording rules people already run against `:10249/metrics` must keep working unchanged.
//! Every `kubeproxy_*` family here therefore copies upstream's `pkg/proxy/metrics` exactly:
//!
//! - the `kubeproxy_` subsystem prefix, and upstream's help strings with component-base's
//!   `[ALPHA] ` stability prefix;
//! - the v1.33+ label sets (`ip_family` = `IPv4`/`IPv6` on the per-proxier families);
//! - the buckets, including the leading `0` bucket that component-base's `MergeBuckets` puts
//!   in front of `network_programming_duration_seconds`;
//! - `sync_proxy_rules_no_local_endpoints_total` is a **gauge** despite its `_total` name,
//!   as upstream (it counts services, it does not accumulate).
//!
//! kproxy adds two of its own, `kproxy_invalid_objects_total{kind}` and
//! `kproxy_drift_detected_total{ip_family}`, and the standard
//! `process_*` collector (upstream's legacy registry exports those too).
//!
//! The registry is owned by [`Metrics`] rather than being the process-global default, so tests
//! (and several proxiers in one process) never see each other's values. Callers use typed
//! methods and never spell a metric or label name; per-family series start at zero so they are
//! scraped before the first sync.

use kproxy_backend_api::IpFamily;
use prometheus::core::Collector;
use prometheus::{
    Counter, CounterVec, Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, Opts, Registry,
    TextEncoder,
};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The metric namespace kube-proxy uses (`Subsystem: "kubeproxy"`).
pub const SUBSYSTEM: &str = "kubeproxy";

/// `Content-Type` of [`Metrics::render`]'s output: the Prometheus text format 0.0.4.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upstream's stability annotation, prepended to every help string by component-base.
const ALPHA: &str = "[ALPHA] ";

/// Why the metrics could not be set up or rendered. Either is a programming error (a bad name,
/// a duplicate registration), never a runtime condition, so callers may treat it as fatal.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A metric could not be created or registered.
    #[error("cannot register metric {name}: {source}")]
    Register {
        name: String,
        #[source]
        source: prometheus::Error,
    },
    /// The registry could not be encoded in the text format.
    #[error("cannot encode metrics: {0}")]
    Encode(#[source] prometheus::Error),
}

/// Kinds of objects kproxy may skip because a field is invalid
/// (`kproxy_invalid_objects_total{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    Service,
    EndpointSlice,
    Node,
}

impl ObjectKind {
    /// Every kind, in label order.
    pub const ALL: [ObjectKind; 3] = [
        ObjectKind::Service,
        ObjectKind::EndpointSlice,
        ObjectKind::Node,
    ];

    /// The `kind` label value: the Kubernetes kind name.
    pub fn label(self) -> &'static str {
        match self {
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Node => "Node",
        }
    }
}

/// Label values of `sync_proxy_rules_no_local_endpoints_total{traffic_policy}`.
const TRAFFIC_POLICY_INTERNAL: &str = "internal";
const TRAFFIC_POLICY_EXTERNAL: &str = "external";

/// HTTP codes the proxy health endpoints answer with (label `code`).
const CODE_OK: &str = "200";
const CODE_UNAVAILABLE: &str = "503";

/// `ExponentialBuckets(0.001, 2, 15)`: 1 ms … 16.384 s.
pub fn sync_buckets() -> Vec<f64> {
    let mut b = Vec::with_capacity(15);
    let mut v = 0.001_f64;
    for _ in 0..15 {
        b.push(v);
        v *= 2.0;
    }
    b
}

/// `MergeBuckets(LinearBuckets(0.25,0.25,2), LinearBuckets(1,1,59), LinearBuckets(60,5,12),
/// LinearBuckets(120,30,7))`, with the leading `0` that `MergeBuckets` adds: 81 bounds,
/// 0 … 300 s.
pub fn network_programming_buckets() -> Vec<f64> {
    fn linear(out: &mut Vec<f64>, start: f64, width: f64, count: usize) {
        let mut v = start;
        for _ in 0..count {
            out.push(v);
            v += width;
        }
    }
    let mut b = vec![0.0];
    linear(&mut b, 0.25, 0.25, 2);
    linear(&mut b, 1.0, 1.0, 59);
    linear(&mut b, 60.0, 5.0, 12);
    linear(&mut b, 120.0, 30.0, 7);
    b
}

/// kube-proxy's metrics in a registry of their own.
///
/// Cheap to share: wrap it in an `Arc` and hand clones to the proxier and the HTTP servers.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sync_duration: HistogramVec,
    sync_full_duration: HistogramVec,
    sync_partial_duration: HistogramVec,
    last_sync: GaugeVec,
    last_queued: GaugeVec,
    network_programming: HistogramVec,
    endpoint_changes_pending: Gauge,
    endpoint_changes_total: Counter,
    service_changes_pending: Gauge,
    service_changes_total: Counter,
    no_local_endpoints: GaugeVec,
    nftables_sync_failures: CounterVec,
    nftables_cleanup_failures: CounterVec,
    healthz_total: CounterVec,
    livez_total: CounterVec,
    conntrack_duration: HistogramVec,
    conntrack_deleted: CounterVec,
    invalid_objects: CounterVec,
    drift: CounterVec,
}

/// Registers `c` in `registry`, naming the metric in the error.
fn register<C: Collector + Clone + 'static>(
    registry: &Registry,
    name: &str,
    c: Result<C, prometheus::Error>,
) -> Result<C, MetricsError> {
    let wrap = |source| MetricsError::Register {
        name: name.to_owned(),
        source,
    };
    let c = c.map_err(wrap)?;
    registry.register(Box::new(c.clone())).map_err(wrap)?;
    Ok(c)
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, format!("{ALPHA}{help}")).namespace(SUBSYSTEM)
}

fn hist_opts(name: &str, help: &str, buckets: Vec<f64>) -> HistogramOpts {
    HistogramOpts::new(name, format!("{ALPHA}{help}"))
        .namespace(SUBSYSTEM)
        .buckets(buckets)
}

fn unix_seconds(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

impl Metrics {
    /// Creates and registers every metric, with the per-family series at zero.
    pub fn new() -> Result<Metrics, MetricsError> {
        let r = Registry::new();
        let fam = &["ip_family"];

        let sync_duration = register(
            &r,
            "sync_proxy_rules_duration_seconds",
            HistogramVec::new(
                hist_opts(
                    "sync_proxy_rules_duration_seconds",
                    "SyncProxyRules latency in seconds",
                    sync_buckets(),
                ),
                fam,
            ),
        )?;
        let sync_full_duration = register(
            &r,
            "sync_full_proxy_rules_duration_seconds",
            HistogramVec::new(
                hist_opts(
                    "sync_full_proxy_rules_duration_seconds",
                    "SyncProxyRules latency in seconds for full resyncs",
                    sync_buckets(),
                ),
                fam,
            ),
        )?;
        let sync_partial_duration = register(
            &r,
            "sync_partial_proxy_rules_duration_seconds",
            HistogramVec::new(
                hist_opts(
                    "sync_partial_proxy_rules_duration_seconds",
                    "SyncProxyRules latency in seconds for partial resyncs",
                    sync_buckets(),
                ),
                fam,
            ),
        )?;
        let last_sync = register(
            &r,
            "sync_proxy_rules_last_timestamp_seconds",
            GaugeVec::new(
                opts(
                    "sync_proxy_rules_last_timestamp_seconds",
                    "The last time proxy rules were successfully synced",
                ),
                fam,
            ),
        )?;
        let last_queued = register(
            &r,
            "sync_proxy_rules_last_queued_timestamp_seconds",
            GaugeVec::new(
                opts(
                    "sync_proxy_rules_last_queued_timestamp_seconds",
                    "The last time a sync of proxy rules was queued",
                ),
                fam,
            ),
        )?;
        let network_programming = register(
            &r,
            "network_programming_duration_seconds",
            HistogramVec::new(
                hist_opts(
                    "network_programming_duration_seconds",
                    "In Cluster Network Programming Latency in seconds",
                    network_programming_buckets(),
                ),
                fam,
            ),
        )?;
        let endpoint_changes_pending = register(
            &r,
            "sync_proxy_rules_endpoint_changes_pending",
            Gauge::with_opts(opts(
                "sync_proxy_rules_endpoint_changes_pending",
                "Pending proxy rules Endpoint changes",
            )),
        )?;
        let endpoint_changes_total = register(
            &r,
            "sync_proxy_rules_endpoint_changes_total",
            Counter::with_opts(opts(
                "sync_proxy_rules_endpoint_changes_total",
                "Cumulative proxy rules Endpoint changes",
            )),
        )?;
        let service_changes_pending = register(
            &r,
            "sync_proxy_rules_service_changes_pending",
            Gauge::with_opts(opts(
                "sync_proxy_rules_service_changes_pending",
                "Pending proxy rules Service changes",
            )),
        )?;
        let service_changes_total = register(
            &r,
            "sync_proxy_rules_service_changes_total",
            Counter::with_opts(opts(
                "sync_proxy_rules_service_changes_total",
                "Cumulative proxy rules Service changes",
            )),
        )?;
        let no_local_endpoints = register(
            &r,
            "sync_proxy_rules_no_local_endpoints_total",
            GaugeVec::new(
                opts(
                    "sync_proxy_rules_no_local_endpoints_total",
                    "Number of services with a Local traffic policy and no endpoints",
                ),
                &["traffic_policy", "ip_family"],
            ),
        )?;
        let nftables_sync_failures = register(
            &r,
            "sync_proxy_rules_nftables_sync_failures_total",
            CounterVec::new(
                opts(
                    "sync_proxy_rules_nftables_sync_failures_total",
                    "Cumulative proxy nftables sync failures",
                ),
                fam,
            ),
        )?;
        let nftables_cleanup_failures = register(
            &r,
            "sync_proxy_rules_nftables_cleanup_failures_total",
            CounterVec::new(
                opts(
                    "sync_proxy_rules_nftables_cleanup_failures_total",
                    "Cumulative proxy nftables cleanup failures",
                ),
                fam,
            ),
        )?;
        let healthz_total = register(
            &r,
            "proxy_healthz_total",
            CounterVec::new(
                opts(
                    "proxy_healthz_total",
                    "Cumulative proxy healthz HTTP status",
                ),
                &["code"],
            ),
        )?;
        let livez_total = register(
            &r,
            "proxy_livez_total",
            CounterVec::new(
                opts("proxy_livez_total", "Cumulative proxy livez HTTP status"),
                &["code"],
            ),
        )?;
        let conntrack_duration = register(
            &r,
            "conntrack_reconciler_sync_duration_seconds",
            HistogramVec::new(
                hist_opts(
                    "conntrack_reconciler_sync_duration_seconds",
                    "ReconcileConntrackFlowsLatency latency in seconds",
                    sync_buckets(),
                ),
                fam,
            ),
        )?;
        let conntrack_deleted = register(
            &r,
            "conntrack_reconciler_deleted_entries_total",
            CounterVec::new(
                opts(
                    "conntrack_reconciler_deleted_entries_total",
                    "Cumulative conntrack flows deleted by conntrack reconciler",
                ),
                fam,
            ),
        )?;
        let invalid_objects = register(
            &r,
            "kproxy_invalid_objects_total",
            CounterVec::new(
                Opts::new(
                    "kproxy_invalid_objects_total",
                    "Objects kproxy skipped because a field was invalid, by kind",
                ),
                &["kind"],
            ),
        )?;

        let drift = register(
            &r,
            "kproxy_drift_detected_total",
            CounterVec::new(
                Opts::new(
                    "kproxy_drift_detected_total",
                    "Times the kernel was found to differ from what kproxy programmed (then repaired by a full sync)",
                ),
                &["ip_family"],
            ),
        )?;

        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .map_err(|source| MetricsError::Register {
            name: "process_*".to_owned(),
            source,
        })?;

        let m = Metrics {
            registry: r,
            sync_duration,
            sync_full_duration,
            sync_partial_duration,
            last_sync,
            last_queued,
            network_programming,
            endpoint_changes_pending,
            endpoint_changes_total,
            service_changes_pending,
            service_changes_total,
            no_local_endpoints,
            nftables_sync_failures,
            nftables_cleanup_failures,
            healthz_total,
            livez_total,
            conntrack_duration,
            conntrack_deleted,
            invalid_objects,
            drift,
        };
        m.init_series();
        Ok(m)
    }

    /// Creates every labelled series at zero, so it is scraped before its first event
    /// (a `rate()` over a series that appears at 1 misses that first increment).
    fn init_series(&self) {
        for f in IpFamily::ALL {
            let l = &[f.label()];
            self.sync_duration.with_label_values(l);
            self.sync_full_duration.with_label_values(l);
            self.sync_partial_duration.with_label_values(l);
            self.last_sync.with_label_values(l);
            self.last_queued.with_label_values(l);
            self.network_programming.with_label_values(l);
            self.nftables_sync_failures.with_label_values(l);
            self.nftables_cleanup_failures.with_label_values(l);
            self.conntrack_duration.with_label_values(l);
            self.conntrack_deleted.with_label_values(l);
            self.drift.with_label_values(l);
            for p in [TRAFFIC_POLICY_INTERNAL, TRAFFIC_POLICY_EXTERNAL] {
                self.no_local_endpoints.with_label_values(&[p, f.label()]);
            }
        }
        for code in [CODE_OK, CODE_UNAVAILABLE] {
            self.healthz_total.with_label_values(&[code]);
            self.livez_total.with_label_values(&[code]);
        }
        for k in ObjectKind::ALL {
            self.invalid_objects.with_label_values(&[k.label()]);
        }
    }

    /// The registry, for callers that want to add collectors of their own.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// One sync attempt of `family` took `elapsed` (observed on every attempt, failed or not,
    /// as upstream). Feeds `sync_proxy_rules_duration_seconds` and the full or partial one.
    pub fn observe_sync(&self, family: IpFamily, full: bool, elapsed: Duration) {
        let l = &[family.label()];
        let s = elapsed.as_secs_f64();
        self.sync_duration.with_label_values(l).observe(s);
        if full {
            self.sync_full_duration.with_label_values(l).observe(s);
        } else {
            self.sync_partial_duration.with_label_values(l).observe(s);
        }
    }

    /// `family`'s rules were last synced successfully at `at`.
    pub fn set_last_sync(&self, family: IpFamily, at: SystemTime) {
        self.last_sync
            .with_label_values(&[family.label()])
            .set(unix_seconds(at));
    }

    /// A sync of `family` was last requested at `at`.
    pub fn set_last_queued(&self, family: IpFamily, at: SystemTime) {
        self.last_queued
            .with_label_values(&[family.label()])
            .set(unix_seconds(at));
    }

    /// One EndpointSlice change reached the kernel `seconds` after its
    /// `endpoints.kubernetes.io/last-change-trigger-time`. Clock skew between the node and
    /// the control plane can make it negative; it is recorded as is, as upstream does.
    pub fn observe_network_programming(&self, family: IpFamily, seconds: f64) {
        self.network_programming
            .with_label_values(&[family.label()])
            .observe(seconds);
    }

    /// `n` more Service changes were received.
    pub fn add_service_changes(&self, n: u64) {
        self.service_changes_total.inc_by(n as f64);
    }

    /// `n` more EndpointSlice changes were received.
    pub fn add_endpoint_changes(&self, n: u64) {
        self.endpoint_changes_total.inc_by(n as f64);
    }

    /// Service and endpoint changes received but not yet synced.
    pub fn set_pending(&self, services: usize, endpoints: usize) {
        self.service_changes_pending.set(services as f64);
        self.endpoint_changes_pending.set(endpoints as f64);
    }

    /// Services of `family` with a Local internal / external traffic policy that have
    /// endpoints, none of them on this node.
    pub fn set_no_local_endpoints(&self, family: IpFamily, internal: usize, external: usize) {
        self.no_local_endpoints
            .with_label_values(&[TRAFFIC_POLICY_INTERNAL, family.label()])
            .set(internal as f64);
        self.no_local_endpoints
            .with_label_values(&[TRAFFIC_POLICY_EXTERNAL, family.label()])
            .set(external as f64);
    }

    /// The main nftables transaction of `family` failed.
    pub fn inc_sync_failure(&self, family: IpFamily) {
        self.nftables_sync_failures
            .with_label_values(&[family.label()])
            .inc();
    }

    /// Deleting `family`'s stale chains failed.
    pub fn inc_cleanup_failure(&self, family: IpFamily) {
        self.nftables_cleanup_failures
            .with_label_values(&[family.label()])
            .inc();
    }

    /// One conntrack reconciliation of `family` took `elapsed` and deleted `deleted` flows.
    pub fn observe_conntrack(&self, family: IpFamily, elapsed: Duration, deleted: u64) {
        let l = &[family.label()];
        self.conntrack_duration
            .with_label_values(l)
            .observe(elapsed.as_secs_f64());
        self.conntrack_deleted
            .with_label_values(l)
            .inc_by(deleted as f64);
    }

    /// An object of `kind` was skipped because a field was invalid.
    /// The kernel held something else than kproxy programmed (`kproxy_drift_detected_total`).
    pub fn inc_drift(&self, family: IpFamily) {
        self.drift.with_label_values(&[family.label()]).inc();
    }

    pub fn inc_invalid(&self, kind: ObjectKind) {
        self.invalid_objects
            .with_label_values(&[kind.label()])
            .inc();
    }

    /// A `/healthz` answer was sent: 200 if `ok`, else 503.
    pub fn count_healthz(&self, ok: bool) {
        let code = if ok { CODE_OK } else { CODE_UNAVAILABLE };
        self.healthz_total.with_label_values(&[code]).inc();
    }

    /// A `/livez` answer was sent: 200 if `ok`, else 503.
    pub fn count_livez(&self, ok: bool) {
        let code = if ok { CODE_OK } else { CODE_UNAVAILABLE };
        self.livez_total.with_label_values(&[code]).inc();
    }

    /// Every metric in the Prometheus text format 0.0.4 ([`TEXT_CONTENT_TYPE`]).
    pub fn try_render(&self) -> Result<String, MetricsError> {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .map_err(MetricsError::Encode)?;
        // The encoder writes only UTF-8 (names and label values are Rust strings).
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// Like [`Metrics::try_render`], but an encoding failure (impossible with the fixed set of
    /// metrics registered here) is logged and yields what could be rendered: empty text.
    pub fn render(&self) -> String {
        self.try_render().unwrap_or_else(|e| {
            tracing::error!(error = %e, "rendering metrics failed");
            String::new()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_buckets_are_upstreams_exponential_ones() {
        let b = sync_buckets();
        assert_eq!(b.len(), 15);
        assert_eq!(b[0], 0.001);
        assert_eq!(b[14], 16.384);
        let text: Vec<String> = b.iter().map(|v| v.to_string()).collect();
        assert_eq!(text[10], "1.024", "printed as Go prints it");
    }

    #[test]
    fn network_programming_buckets_start_with_merge_buckets_zero() {
        let b = network_programming_buckets();
        assert_eq!(b.len(), 1 + 2 + 59 + 12 + 7);
        assert_eq!(&b[..4], &[0.0, 0.25, 0.5, 1.0]);
        assert_eq!(b[61], 59.0);
        assert_eq!(b[62], 60.0);
        assert_eq!(b[73], 115.0);
        assert_eq!(b[74], 120.0);
        assert_eq!(*b.last().unwrap_or(&0.0), 300.0);
        assert!(b.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn series_exist_before_any_event() -> Result<(), MetricsError> {
        let m = Metrics::new()?;
        let text = m.try_render()?;
        for needle in [
            "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"} 0",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"} 0",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"} 0",
            "kubeproxy_proxy_healthz_total{code=\"503\"} 0",
            "kproxy_invalid_objects_total{kind=\"EndpointSlice\"} 0",
            "# HELP kubeproxy_sync_proxy_rules_duration_seconds [ALPHA] SyncProxyRules latency in seconds",
            "# TYPE kubeproxy_sync_proxy_rules_no_local_endpoints_total gauge",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        Ok(())
    }

    #[test]
    fn typed_methods_reach_the_right_series() -> Result<(), MetricsError> {
        let m = Metrics::new()?;
        m.observe_sync(IpFamily::V6, true, Duration::from_millis(3));
        m.observe_sync(IpFamily::V6, false, Duration::from_millis(3));
        m.set_last_sync(
            IpFamily::V4,
            UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        );
        m.inc_sync_failure(IpFamily::V4);
        m.set_no_local_endpoints(IpFamily::V6, 2, 3);
        m.observe_conntrack(IpFamily::V4, Duration::from_millis(1), 7);
        m.inc_invalid(ObjectKind::Service);
        let text = m.try_render()?;
        for needle in [
            "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"} 2",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"} 1",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"} 1",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"} 1700000000",
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv4\"} 1",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv6\",traffic_policy=\"internal\"} 2",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv6\",traffic_policy=\"external\"} 3",
            "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\"} 7",
            "kproxy_invalid_objects_total{kind=\"Service\"} 1",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        Ok(())
    }
}
