//! Per-service health-check node ports (`spec.healthCheckNodePort`), as upstream's
//! service_health.go.
//!
//! A LoadBalancer Service with `externalTrafficPolicy: Local` only works on nodes that have a
//! ready endpoint of it, because traffic is not forwarded to other nodes. The cloud load
//! balancer finds those nodes by probing the health-check node port on each one. Every such
//! service therefore gets a small HTTP server that answers 200 while this node has local ready
//! endpoints and the proxy is healthy, and 503 otherwise. It also sends
//! `X-Load-Balancing-Endpoint-Weight: <count>` for balancers that weight nodes by it.
//!
//! [`ServiceHealthServers::sync_services`] opens and closes ports so the set matches the
//! desired map. A port that cannot be bound is logged and skipped, never fatal. Skipped services
//! are not recorded, so the next sync tries them again.
//! [`ServiceHealthServers::sync_endpoints`] only updates counters that the handlers read.
//!
//! Both calls are synchronous, so the proxier's sync code can call them on a runtime thread or
//! off one: the servers run as tasks on the tokio runtime captured at construction. Closing is
//! asynchronous: the task drops its listeners when it is next polled, and Go's `Close()` is
//! synchronous. So a port closed and reopened in the same sync (one service's port handed to
//! another) is bound only once the old listener is gone, by a task that waits for it.

use super::proxy::ProxyHealth;
use super::server::json_response;
use axum::extract::State;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use kproxy_backend_api::ServiceName;
use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, error, info};

/// The header carrying the local endpoint count, for weighted load balancing.
pub const ENDPOINT_WEIGHT_HEADER: &str = "X-Load-Balancing-Endpoint-Weight";

/// Why the health-check servers could not be synced at all.
#[derive(Debug, thiserror::Error)]
pub enum ServiceHealthError {
    /// Neither the constructor nor this call ran inside a tokio runtime, so there is nowhere to
    /// run the servers. Construct [`ServiceHealthServers`] inside the runtime.
    #[error("service health checks need a tokio runtime: construct them inside one")]
    NoRuntime,
}

/// A service whose health-check port could not be opened in this sync (already logged).
/// Upstream also emits a `FailedToStartServiceHealthcheck` Warning event for it.
#[derive(Debug)]
pub struct ListenFailure {
    pub service: ServiceName,
    pub port: u16,
    pub error: io::Error,
}

/// Where health-check ports listen.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ListenOn {
    /// Every address: one dual-stack `[::]` socket, as Go's `net.Listen("tcp", "0.0.0.0:p")`
    /// does; `0.0.0.0` as well when `net.ipv6.bindv6only=1`, and alone when IPv6 is off.
    Any,
    /// These node addresses only.
    Addresses(Vec<IpAddr>),
}

impl ListenOn {
    fn new(addresses: Vec<IpAddr>) -> ListenOn {
        if addresses.is_empty() || addresses.iter().any(IpAddr::is_unspecified) {
            ListenOn::Any
        } else {
            let mut a = addresses;
            a.sort();
            a.dedup();
            ListenOn::Addresses(a)
        }
    }

    /// Binds every socket for `port`, or none.
    fn bind(&self, port: u16) -> io::Result<Vec<std::net::TcpListener>> {
        let bind = |ip: IpAddr| -> io::Result<std::net::TcpListener> {
            let l = std::net::TcpListener::bind(SocketAddr::new(ip, port))?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        match self {
            ListenOn::Addresses(ips) => ips.iter().map(|&ip| bind(ip)).collect(),
            ListenOn::Any => match bind(Ipv6Addr::UNSPECIFIED.into()) {
                Ok(v6) if v6_only() => Ok(vec![v6, bind(Ipv4Addr::UNSPECIFIED.into())?]),
                Ok(v6) => Ok(vec![v6]),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(e),
                // No IPv6 on this host.
                Err(_) => Ok(vec![bind(Ipv4Addr::UNSPECIFIED.into())?]),
            },
        }
    }
}

/// Whether `[::]` sockets exclude IPv4 on this host (`net.ipv6.bindv6only`).
fn v6_only() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|s| s.trim() == "1")
}

/// What a health-check handler reads.
#[derive(Debug)]
struct HcShared {
    name: ServiceName,
    endpoints: AtomicUsize,
    /// Set when the service's port is closed: connections that outlive the listener are
    /// answered 503 and closed.
    closed: AtomicBool,
    /// Set when a delayed open failed, so the next sync retries it.
    failed: AtomicBool,
}

/// One open (or opening) health-check port.
#[derive(Debug)]
struct Instance {
    port: u16,
    shared: Arc<HcShared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Instance {
    /// Stops serving. The returned task ends once every listener is dropped.
    fn close(&mut self) -> Option<JoinHandle<()>> {
        self.shared.closed.store(true, Ordering::SeqCst);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take()
    }

    fn needs_reopen(&self) -> bool {
        self.shared.failed.load(Ordering::SeqCst)
            || self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.close();
    }
}

#[derive(Debug, Default)]
struct Servers {
    services: BTreeMap<ServiceName, Instance>,
    /// Tasks of closed ports that may still hold their listeners, by port.
    closing: BTreeMap<u16, Vec<JoinHandle<()>>>,
}

/// The set of per-service health-check servers of this node.
#[derive(Debug)]
pub struct ServiceHealthServers {
    listen: ListenOn,
    proxy: Arc<ProxyHealth>,
    runtime: Option<Handle>,
    state: Mutex<Servers>,
}

impl ServiceHealthServers {
    /// Health checks that listen on `addresses`: the node addresses selected by
    /// `--nodeport-addresses`, or an unspecified address (`0.0.0.0`/`::`) or an empty list for
    /// all addresses. They report `proxy`'s health. Call this inside the tokio runtime whose
    /// tasks will serve the ports.
    pub fn new(addresses: Vec<IpAddr>, proxy: Arc<ProxyHealth>) -> ServiceHealthServers {
        ServiceHealthServers {
            listen: ListenOn::new(addresses),
            proxy,
            runtime: Handle::try_current().ok(),
            state: Mutex::new(Servers::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, Servers> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn runtime(&self) -> Result<Handle, ServiceHealthError> {
        self.runtime
            .clone()
            .or_else(|| Handle::try_current().ok())
            .ok_or(ServiceHealthError::NoRuntime)
    }

    /// Makes the open health-check ports exactly `services` (service → `healthCheckNodePort`).
    /// Ports of services no longer listed, or whose port changed, are closed; new ones are
    /// opened; unchanged ones are left alone (their endpoint counts too). Ports that could not
    /// be opened are logged and returned; the others are unaffected.
    pub fn sync_services(
        &self,
        services: &BTreeMap<ServiceName, u16>,
    ) -> Result<Vec<ListenFailure>, ServiceHealthError> {
        let runtime = self.runtime()?;
        let _entered = runtime.enter();
        let mut st = self.state();
        st.closing.retain(|_, tasks| {
            tasks.retain(|t| !t.is_finished());
            !tasks.is_empty()
        });

        let stale: Vec<ServiceName> = st
            .services
            .iter()
            .filter(|(name, inst)| services.get(*name) != Some(&inst.port) || inst.needs_reopen())
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(mut inst) = st.services.remove(&name) {
                info!(service = %name, port = inst.port, "closing healthcheck");
                if let Some(task) = inst.close().filter(|t| !t.is_finished()) {
                    st.closing.entry(inst.port).or_default().push(task);
                }
            }
        }

        let mut failures = Vec::new();
        for (name, &port) in services {
            if st.services.contains_key(name) {
                continue;
            }
            match self.open(&runtime, &mut st.closing, name, port) {
                Ok(inst) => {
                    st.services.insert(name.clone(), inst);
                }
                Err(error) => {
                    error!(service = %name, port, %error, "failed to start healthcheck");
                    failures.push(ListenFailure {
                        service: name.clone(),
                        port,
                        error,
                    });
                }
            }
        }
        Ok(failures)
    }

    /// Opens `name`'s health check on `port`. If the port is still held by a listener this
    /// object is closing, the open is left to a task that waits for that listener to go.
    fn open(
        &self,
        runtime: &Handle,
        closing: &mut BTreeMap<u16, Vec<JoinHandle<()>>>,
        name: &ServiceName,
        port: u16,
    ) -> io::Result<Instance> {
        let shared = Arc::new(HcShared {
            name: name.clone(),
            endpoints: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        });
        let router = service_router(shared.clone(), self.proxy.clone());
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = match self.listen.bind(port) {
            Ok(listeners) => {
                let listeners = to_tokio(listeners)?;
                info!(service = %name, port, "opening healthcheck");
                runtime.spawn(serve(shared.clone(), listeners, router, stop_rx))
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && closing.contains_key(&port) => {
                debug!(service = %name, port, "healthcheck port still closing, opening it once released");
                let previous = closing.remove(&port).unwrap_or_default();
                let listen = self.listen.clone();
                let shared = shared.clone();
                runtime.spawn(async move {
                    for task in previous {
                        let _ = task.await;
                    }
                    match listen.bind(port).and_then(to_tokio) {
                        Ok(l) => {
                            info!(service = %shared.name, port, "opening healthcheck");
                            serve(shared, l, router, stop_rx).await;
                        }
                        Err(error) => {
                            error!(service = %shared.name, port, %error, "failed to start healthcheck");
                            shared.failed.store(true, Ordering::SeqCst);
                        }
                    }
                })
            }
            Err(e) => return Err(e),
        };
        Ok(Instance {
            port,
            shared,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// Sets each open health check's count of local ready endpoints; services not in
    /// `endpoints` get 0. Entries for services without a health check are ignored.
    pub fn sync_endpoints(&self, endpoints: &BTreeMap<ServiceName, usize>) {
        let st = self.state();
        for (name, inst) in &st.services {
            let n = endpoints.get(name).copied().unwrap_or(0);
            inst.shared.endpoints.store(n, Ordering::SeqCst);
        }
    }

    /// The health checks currently open or being opened, with their ports.
    pub fn ports(&self) -> BTreeMap<ServiceName, u16> {
        self.state()
            .services
            .iter()
            .map(|(name, inst)| (name.clone(), inst.port))
            .collect()
    }

    /// Waits until every port closed by earlier syncs is released.
    pub async fn closed(&self) {
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut self.state().closing)
            .into_values()
            .flatten()
            .collect();
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Closes every health check and waits until their ports are released.
    pub async fn shutdown(&self) {
        {
            let mut st = self.state();
            let services = std::mem::take(&mut st.services);
            for (_, mut inst) in services {
                if let Some(task) = inst.close() {
                    st.closing.entry(inst.port).or_default().push(task);
                }
            }
        }
        self.closed().await;
    }
}

fn to_tokio(listeners: Vec<std::net::TcpListener>) -> io::Result<Vec<tokio::net::TcpListener>> {
    listeners
        .into_iter()
        .map(tokio::net::TcpListener::from_std)
        .collect()
}

/// Serves `router` on `listeners` until `stop` fires (or its sender is dropped). The listeners
/// are dropped, and the ports released, before this returns.
async fn serve(
    shared: Arc<HcShared>,
    listeners: Vec<tokio::net::TcpListener>,
    router: Router,
    stop: oneshot::Receiver<()>,
) {
    let servers = futures::future::join_all(
        listeners
            .into_iter()
            .map(|l| axum::serve(l, router.clone()).into_future()),
    );
    tokio::select! {
        results = servers => {
            for error in results.into_iter().filter_map(Result::err) {
                error!(service = %shared.name, %error, "healthcheck closed");
            }
        }
        _ = stop => debug!(service = %shared.name, "healthcheck closed"),
    }
}

#[derive(Debug, Clone)]
struct HcState {
    shared: Arc<HcShared>,
    proxy: Arc<ProxyHealth>,
}

fn service_router(shared: Arc<HcShared>, proxy: Arc<ProxyHealth>) -> Router {
    Router::new()
        .fallback(health_check)
        .with_state(HcState { shared, proxy })
}

/// Every path and method, as upstream's handler.
async fn health_check(State(s): State<HcState>) -> Response {
    if s.shared.closed.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONNECTION, HeaderValue::from_static("close"))],
        )
            .into_response();
    }
    let count = s.shared.endpoints.load(Ordering::SeqCst);
    let proxy_healthy = s.proxy.is_healthy(s.proxy.now());
    let status = if count != 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut resp = json_response(status, body(&s.shared.name, count, proxy_healthy));
    resp.headers_mut().insert(
        HeaderName::from_static("x-load-balancing-endpoint-weight"),
        HeaderValue::from(count),
    );
    resp
}

/// Upstream's body: a dedented, tab-indented JSON document without a trailing newline.
fn body(name: &ServiceName, count: usize, proxy_healthy: bool) -> String {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}",
        quote(&name.namespace),
        quote(&name.name),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_upstreams_layout_and_valid_json() {
        let b = body(&ServiceName::new("ns", "web"), 2, true);
        assert_eq!(
            b,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"ns\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let v: serde_json::Value = serde_json::from_str(&b).unwrap_or_default();
        assert_eq!(v["service"]["name"], "web");
        assert_eq!(v["localEndpoints"], 2);
    }

    #[test]
    fn any_unspecified_address_means_listen_everywhere() {
        let v4: IpAddr = Ipv4Addr::new(10, 0, 0, 1).into();
        assert_eq!(ListenOn::new(vec![]), ListenOn::Any);
        assert_eq!(
            ListenOn::new(vec![v4, Ipv6Addr::UNSPECIFIED.into()]),
            ListenOn::Any
        );
        assert_eq!(ListenOn::new(vec![v4, v4]), ListenOn::Addresses(vec![v4]));
    }

    #[test]
    fn header_name_matches_constant() {
        assert!(ENDPOINT_WEIGHT_HEADER.eq_ignore_ascii_case("x-load-balancing-endpoint-weight"));
    }
}
