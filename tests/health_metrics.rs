//! The metrics and health endpoints over real HTTP on 127.0.0.1, checked against what
//! kube-proxy's dashboards, load balancers and probes expect. No root needed; time is injected.

use kproxy::healthcheck::{
    rfc3339_nano, serve_health_on, serve_metrics_on, ManualClock, ProxyHealth, ServiceHealthError,
    ServiceHealthServers,
};
use kproxy::metrics::Metrics;
use kproxy_backend_api::{IpFamily, ServiceName};
use prometheus_parse::{Scrape, Value};
use serde_json::Value as Json;
use std::collections::{BTreeMap, BTreeSet};
use std::error::Error;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type TestResult = Result<(), Box<dyn Error>>;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// One HTTP/1.1 answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Result<Json, serde_json::Error> {
        serde_json::from_str(&self.body)
    }
}

/// `GET path` with `Connection: close`, raw over TCP.
async fn get(addr: SocketAddr, path: &str) -> io::Result<Answer> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))??;
    let raw = String::from_utf8(raw).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {raw:?}"));
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let a = Answer {
        status,
        headers,
        body: body.to_owned(),
    };
    if a.header("transfer-encoding").is_some() {
        return Err(bad("chunked answer"));
    }
    Ok(a)
}

async fn listener() -> io::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind((LOCALHOST, 0)).await?;
    let addr = l.local_addr()?;
    Ok((l, addr))
}

fn scrape(text: &str) -> io::Result<Scrape> {
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
}

/// Samples of `name` whose value is of the kind `is_kind` accepts, by label set.
fn series<'a>(
    s: &'a Scrape,
    name: &str,
    is_kind: fn(&Value) -> bool,
) -> Vec<&'a prometheus_parse::Sample> {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .inspect(|x| {
            assert!(
                is_kind(&x.value),
                "{name} has the wrong type: {:?}",
                x.value
            )
        })
        .collect()
}

fn label_names(sample: &prometheus_parse::Sample) -> BTreeSet<String> {
    sample.labels.keys().cloned().collect()
}

fn value_of(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| {
            x.metric == name
                && x.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v))
        })
        .and_then(|x| match x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => None,
        })
}

fn is_hist(v: &Value) -> bool {
    matches!(v, Value::Histogram(_))
}
fn is_gauge(v: &Value) -> bool {
    matches!(v, Value::Gauge(_))
}
fn is_counter(v: &Value) -> bool {
    matches!(v, Value::Counter(_))
}

fn exp_buckets() -> Vec<f64> {
    (0..15).map(|i| 0.001 * f64::powi(2.0, i)).collect()
}

fn netprog_buckets() -> Vec<f64> {
    let mut b = vec![0.0, 0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b
}

fn bounds(sample: &prometheus_parse::Sample) -> Vec<f64> {
    match &sample.value {
        Value::Histogram(h) => h
            .iter()
            .map(|c| c.less_than)
            .filter(|b| b.is_finite())
            .collect(),
        _ => Vec::new(),
    }
}

fn bucket_count(sample: &prometheus_parse::Sample, le: f64) -> Option<f64> {
    match &sample.value {
        Value::Histogram(h) => h
            .iter()
            .find(|c| (c.less_than - le).abs() < 1e-12)
            .map(|c| c.count),
        _ => None,
    }
}

#[tokio::test]
async fn metrics_scrape_has_kube_proxy_names_labels_and_buckets() -> TestResult {
    let metrics = Arc::new(Metrics::new()?);
    let (l, addr) = listener().await?;
    let server = tokio::spawn(serve_metrics_on(l, metrics.clone(), "nftables"));

    let a = get(addr, "/metrics").await?;
    assert_eq!(a.status, 200);
    assert!(
        a.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        a.headers
    );
    let s = scrape(&a.body)?;

    let families = [IpFamily::V4.label(), IpFamily::V6.label()];
    let fam_label: BTreeSet<String> = ["ip_family".to_owned()].into();

    // Histograms with ip_family, present for both families before any sync.
    for (name, buckets) in [
        ("kubeproxy_sync_proxy_rules_duration_seconds", exp_buckets()),
        (
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            exp_buckets(),
        ),
        (
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            exp_buckets(),
        ),
        (
            "kubeproxy_network_programming_duration_seconds",
            netprog_buckets(),
        ),
        (
            "kubeproxy_conntrack_reconciler_sync_duration_seconds",
            exp_buckets(),
        ),
    ] {
        let ss = series(&s, name, is_hist);
        assert_eq!(ss.len(), 2, "{name}: one series per family");
        for x in &ss {
            assert_eq!(label_names(x), fam_label, "{name}");
            assert!(families.contains(&x.labels.get("ip_family").unwrap_or("")));
            let got = bounds(x);
            assert_eq!(got.len(), buckets.len(), "{name}: {got:?}");
            for (g, w) in got.iter().zip(&buckets) {
                assert!((g - w).abs() < 1e-9, "{name}: bucket {g} != {w}");
            }
        }
    }
    assert_eq!(netprog_buckets().len(), 81);

    // Gauges with ip_family.
    for name in [
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
    ] {
        let ss = series(&s, name, is_gauge);
        assert_eq!(ss.len(), 2, "{name}");
        assert!(ss.iter().all(|x| label_names(x) == fam_label), "{name}");
    }

    // The `_total` that is a gauge, as upstream.
    let nle = series(
        &s,
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        is_gauge,
    );
    assert_eq!(nle.len(), 4);
    let want: BTreeSet<String> = ["ip_family".to_owned(), "traffic_policy".to_owned()].into();
    assert!(nle.iter().all(|x| label_names(x) == want));
    let policies: BTreeSet<&str> = nle
        .iter()
        .filter_map(|x| x.labels.get("traffic_policy"))
        .collect();
    assert_eq!(policies, ["external", "internal"].into());

    // Counters with ip_family.
    for name in [
        "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
        "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total",
        "kubeproxy_conntrack_reconciler_deleted_entries_total",
    ] {
        let ss = series(&s, name, is_counter);
        assert_eq!(ss.len(), 2, "{name}");
        assert!(ss.iter().all(|x| label_names(x) == fam_label), "{name}");
    }

    // Unlabelled ones.
    for (name, is_kind) in [
        (
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            is_gauge as fn(&Value) -> bool,
        ),
        (
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            is_gauge,
        ),
        (
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            is_counter,
        ),
        (
            "kubeproxy_sync_proxy_rules_service_changes_total",
            is_counter,
        ),
    ] {
        let ss = series(&s, name, is_kind);
        assert_eq!(ss.len(), 1, "{name}");
        assert!(ss[0].labels.is_empty(), "{name}");
    }

    // code-labelled counters and kproxy's own.
    for name in [
        "kubeproxy_proxy_healthz_total",
        "kubeproxy_proxy_livez_total",
    ] {
        let ss = series(&s, name, is_counter);
        let codes: BTreeSet<&str> = ss.iter().filter_map(|x| x.labels.get("code")).collect();
        assert_eq!(codes, ["200", "503"].into(), "{name}");
    }
    let inv = series(&s, "kproxy_invalid_objects_total", is_counter);
    assert!(inv
        .iter()
        .all(|x| label_names(x) == ["kind".to_owned()].into()));
    assert!(!inv.is_empty());

    // Upstream's help text, with component-base's stability prefix.
    assert_eq!(
        s.docs
            .get("kubeproxy_sync_proxy_rules_duration_seconds")
            .map(String::as_str),
        Some("[ALPHA] SyncProxyRules latency in seconds")
    );
    assert_eq!(
        s.docs
            .get("kubeproxy_sync_proxy_rules_no_local_endpoints_total")
            .map(String::as_str),
        Some("[ALPHA] Number of services with a Local traffic policy and no endpoints")
    );
    assert!(
        s.docs.contains_key("process_start_time_seconds"),
        "process collector"
    );

    // observe_sync moves the overall and the full histogram, only for its family.
    let v4 = [("ip_family", "IPv4")];
    let v6 = [("ip_family", "IPv6")];
    let count = "kubeproxy_sync_proxy_rules_duration_seconds_count";
    assert_eq!(value_of(&s, count, &v4), Some(0.0));
    metrics.observe_sync(IpFamily::V4, true, Duration::from_millis(5));
    metrics.observe_sync(IpFamily::V4, false, Duration::from_millis(5));
    metrics.set_no_local_endpoints(IpFamily::V6, 1, 2);
    let s = scrape(&get(addr, "/metrics").await?.body)?;
    assert_eq!(value_of(&s, count, &v4), Some(2.0));
    assert_eq!(value_of(&s, count, &v6), Some(0.0));
    assert_eq!(
        value_of(
            &s,
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
            &v4
        ),
        Some(1.0)
    );
    assert_eq!(
        value_of(
            &s,
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
            &v4
        ),
        Some(1.0)
    );
    let hist = s
        .samples
        .iter()
        .find(|x| {
            x.metric == "kubeproxy_sync_proxy_rules_duration_seconds"
                && x.labels.get("ip_family") == Some("IPv4")
        })
        .ok_or("no IPv4 sync histogram")?;
    assert_eq!(bucket_count(hist, 0.004), Some(0.0));
    assert_eq!(
        bucket_count(hist, 0.008),
        Some(2.0),
        "5 ms lands in le=0.008"
    );
    assert_eq!(
        value_of(
            &s,
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            &[("ip_family", "IPv6"), ("traffic_policy", "external")]
        ),
        Some(2.0)
    );

    // The rest of upstream's metrics server.
    let a = get(addr, "/proxyMode").await?;
    assert_eq!((a.status, a.body.as_str()), (200, "nftables"));
    let a = get(addr, "/healthz").await?;
    assert_eq!((a.status, a.body.as_str()), (200, "ok"));

    server.abort();
    Ok(())
}

fn at(secs: u64, millis: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
}

fn assert_health_headers(a: &Answer) {
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert_eq!(a.header("x-content-type-options"), Some("nosniff"));
}

#[tokio::test]
async fn healthz_and_livez_follow_queued_updates_and_node_state() -> TestResult {
    let t0 = at(1_700_000_000, 250);
    let clock = Arc::new(ManualClock::new(t0));
    let health = Arc::new(ProxyHealth::with_clock(
        Duration::from_secs(30),
        clock.clone(),
    ));
    let metrics = Arc::new(Metrics::new()?);
    let (l, addr) = listener().await?;
    let server = tokio::spawn(serve_health_on(l, health.clone(), metrics.clone()));
    for f in IpFamily::ALL {
        health.updated(f, t0);
    }

    // Healthy: 200, lastUpdated is "now", and the exact layout.
    clock.advance(Duration::from_secs(5));
    let now = rfc3339_nano(Some(clock_now(&clock)));
    let a = get(addr, "/healthz").await?;
    assert_eq!(a.status, 200);
    assert_health_headers(&a);
    assert_eq!(
        a.body,
        format!(
            concat!(
                r#"{{"lastUpdated":"{now}","currentTime":"{now}","nodeEligible":true,"healthy":true,"#,
                r#""status":{{"IPv4":{{"lastUpdated":"{t0}","healthy":true}},"#,
                r#""IPv6":{{"lastUpdated":"{t0}","healthy":true}}}}}}"#
            ),
            now = now,
            t0 = "2023-11-14T22:13:20.25Z"
        )
    );
    let a = get(addr, "/livez").await?;
    assert_eq!(a.status, 200);
    assert_health_headers(&a);
    let j = a.json()?;
    assert!(
        j.get("nodeEligible").is_none(),
        "/livez has no nodeEligible"
    );
    assert_eq!(j["healthy"], true);

    // A change is queued; not late until 2 × syncPeriod.
    health.queued_update(IpFamily::V4, clock_now(&clock));
    clock.advance(Duration::from_secs(59));
    assert_eq!(get(addr, "/healthz").await?.status, 200);
    clock.advance(Duration::from_secs(1));
    let a = get(addr, "/healthz").await?;
    assert_eq!(a.status, 503);
    assert_health_headers(&a);
    let j = a.json()?;
    assert_eq!(j["healthy"], false);
    assert_eq!(j["nodeEligible"], true);
    assert_eq!(
        j["lastUpdated"], "2023-11-14T22:13:20.25Z",
        "not replaced on 503"
    );
    assert_eq!(j["status"]["IPv4"]["healthy"], false);
    assert_eq!(j["status"]["IPv6"]["healthy"], true);
    let a = get(addr, "/livez").await?;
    assert_eq!(a.status, 503);
    assert_eq!(a.json()?["healthy"], false);

    // Synced: healthy again.
    health.updated(IpFamily::V4, clock_now(&clock));
    assert_eq!(get(addr, "/healthz").await?.status, 200);
    assert_eq!(get(addr, "/livez").await?.status, 200);

    // The node is going away: /healthz drains it, /livez keeps kproxy alive.
    for (present, deleting, taint) in [
        (false, false, false),
        (true, true, false),
        (true, false, true),
    ] {
        health.sync_node(present, deleting, taint);
        let a = get(addr, "/healthz").await?;
        assert_eq!(a.status, 503, "node {present} {deleting} {taint}");
        let j = a.json()?;
        assert_eq!(j["nodeEligible"], false);
        assert_eq!(j["healthy"], true, "the proxier itself is fine");
        assert_eq!(get(addr, "/livez").await?.status, 200);
    }
    health.sync_node(true, false, false);
    assert_eq!(get(addr, "/healthz").await?.status, 200);
    assert_eq!(get(addr, "/nothing").await?.status, 404);

    // Every answer was counted by code.
    let s = scrape(&metrics.render())?;
    let n = |name: &str, code: &str| value_of(&s, name, &[("code", code)]);
    assert_eq!(n("kubeproxy_proxy_healthz_total", "200"), Some(4.0));
    assert_eq!(n("kubeproxy_proxy_healthz_total", "503"), Some(4.0));
    assert_eq!(n("kubeproxy_proxy_livez_total", "200"), Some(5.0));
    assert_eq!(n("kubeproxy_proxy_livez_total", "503"), Some(1.0));

    server.abort();
    Ok(())
}

fn clock_now(c: &ManualClock) -> SystemTime {
    kproxy::healthcheck::Clock::now(c)
}

/// A port nobody listens on right now (bound, then released).
fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind((LOCALHOST, 0))?
        .local_addr()?
        .port())
}

fn svc(name: &str) -> ServiceName {
    ServiceName::new("ns", name)
}

/// Waits until `cond` holds for the answer on `port` (servers open and close asynchronously).
async fn eventually(
    port: u16,
    path: &str,
    cond: impl Fn(&io::Result<Answer>) -> bool,
) -> io::Result<Answer> {
    let addr = SocketAddr::new(LOCALHOST, port);
    for _ in 0..200 {
        let a = get(addr, path).await;
        if cond(&a) {
            return a;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("port {port} never settled"),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_health_checks_report_local_endpoints() -> TestResult {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_test_writer()
        .try_init();
    let t0 = at(1_700_000_000, 0);
    let clock = Arc::new(ManualClock::new(t0));
    let health = Arc::new(ProxyHealth::with_clock(
        Duration::from_secs(30),
        clock.clone(),
    ));
    for f in IpFamily::ALL {
        health.updated(f, t0);
    }
    let hcs = ServiceHealthServers::new(vec![LOCALHOST], health.clone());

    let (pa, pb) = (free_port()?, free_port()?);
    let busy = std::net::TcpListener::bind((LOCALHOST, 0))?;
    let pc = busy.local_addr()?.port();
    let want: BTreeMap<ServiceName, u16> = [(svc("a"), pa), (svc("b"), pb), (svc("c"), pc)].into();
    let failures = hcs.sync_services(&want)?;
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!((&failures[0].service, failures[0].port), (&svc("c"), pc));
    assert_eq!(failures[0].error.kind(), io::ErrorKind::AddrInUse);
    assert_eq!(hcs.ports(), [(svc("a"), pa), (svc("b"), pb)].into());

    hcs.sync_endpoints(&[(svc("a"), 3), (svc("other"), 9)].into());
    let a = get(SocketAddr::new(LOCALHOST, pa), "/").await?;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-load-balancing-endpoint-weight"), Some("3"));
    assert_health_headers(&a);
    assert_eq!(
        a.body,
        "{\n\t\"service\": {\n\t\t\"namespace\": \"ns\",\n\t\t\"name\": \"a\"\n\t},\n\t\"localEndpoints\": 3,\n\t\"serviceProxyHealthy\": true\n}"
    );
    let b = get(SocketAddr::new(LOCALHOST, pb), "/any/path").await?;
    assert_eq!(b.status, 503, "no local endpoints");
    assert_eq!(b.header("x-load-balancing-endpoint-weight"), Some("0"));
    assert_eq!(b.json()?["localEndpoints"], 0);

    // The proxy falls behind: every health check fails, whatever its endpoints.
    health.queued_update(IpFamily::V6, clock_now(&clock));
    clock.advance(Duration::from_secs(60));
    let a = get(SocketAddr::new(LOCALHOST, pa), "/").await?;
    assert_eq!(a.status, 503);
    assert_eq!(a.header("x-load-balancing-endpoint-weight"), Some("3"));
    assert_eq!(a.json()?["serviceProxyHealthy"], false);
    health.updated(IpFamily::V6, clock_now(&clock));
    assert_eq!(get(SocketAddr::new(LOCALHOST, pa), "/").await?.status, 200);

    // b goes away: its port closes; a keeps its port and its count.
    hcs.sync_services(&[(svc("a"), pa)].into())?;
    hcs.closed().await;
    let refused = TcpStream::connect(SocketAddr::new(LOCALHOST, pb)).await;
    assert!(refused.is_err(), "port of a removed service still open");
    assert_eq!(get(SocketAddr::new(LOCALHOST, pa), "/").await?.status, 200);

    // The busy port is free now: the next sync opens the service it skipped.
    drop(busy);
    let failures = hcs.sync_services(&[(svc("a"), pa), (svc("c"), pc)].into())?;
    assert!(failures.is_empty(), "{failures:?}");
    let c = get(SocketAddr::new(LOCALHOST, pc), "/").await?;
    assert_eq!(
        (c.status, c.json()?["service"]["name"].clone()),
        (503, "c".into())
    );

    // Endpoints absent from the map count 0.
    hcs.sync_endpoints(&BTreeMap::new());
    assert_eq!(get(SocketAddr::new(LOCALHOST, pa), "/").await?.status, 503);

    // a's port handed to d in one sync: d gets it once a has let go.
    let failures = hcs.sync_services(&[(svc("c"), pc), (svc("d"), pa)].into())?;
    assert!(failures.is_empty(), "{failures:?}");
    hcs.sync_endpoints(&[(svc("d"), 1)].into());
    let d = eventually(pa, "/", |r| {
        r.as_ref().is_ok_and(|a| a.body.contains("\"name\": \"d\""))
    })
    .await?;
    assert_eq!(d.status, 200);

    hcs.shutdown().await;
    for port in [pa, pc] {
        assert!(TcpStream::connect(SocketAddr::new(LOCALHOST, port))
            .await
            .is_err());
    }
    assert!(hcs.ports().is_empty());
    Ok(())
}

#[test]
fn service_health_checks_need_a_runtime() {
    let health = Arc::new(ProxyHealth::new(Duration::from_secs(30)));
    let hcs = ServiceHealthServers::new(vec![LOCALHOST], health);
    assert!(matches!(
        hcs.sync_services(&BTreeMap::new()),
        Err(ServiceHealthError::NoRuntime)
    ));
}
