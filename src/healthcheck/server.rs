//! The two long-lived HTTP servers kube-proxy runs, with upstream's paths and answers:
//!
//! - the health server (`--healthz-bind-address`, default `0.0.0.0:10256`): `/healthz` for
//!   load balancers (fails while the node is being drained) and `/livez` for the kubelet's
//!   liveness probe (fails only when the proxier is stuck);
//! - the metrics server (`--metrics-bind-address`, default `127.0.0.1:10249`): `/metrics`,
//!   plus upstream's plain `/healthz` ("ok") and `/proxyMode`.
//!
//! Both are axum routers so the lead can mount them anywhere; `serve_*` bind an address and
//! `serve_*_on` take a bound listener (tests use port 0).

use super::proxy::ProxyHealth;
use crate::metrics::{Metrics, TEXT_CONTENT_TYPE};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Why an HTTP server stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound (in use, not local, no permission). Upstream retries
    /// every 5 s; the caller decides whether to retry or give up.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The server failed while running.
    #[error("{server} server failed: {source}")]
    Serve {
        server: &'static str,
        #[source]
        source: io::Error,
    },
}

/// `X-Content-Type-Options: nosniff`, sent with every answer as upstream.
fn nosniff() -> HeaderValue {
    HeaderValue::from_static("nosniff")
}

/// A JSON answer with upstream's headers.
pub(crate) fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::X_CONTENT_TYPE_OPTIONS, nosniff()),
        ],
        body,
    )
        .into_response()
}

fn text_response(body: String) -> Response {
    (
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            ),
            (header::X_CONTENT_TYPE_OPTIONS, nosniff()),
        ],
        body,
    )
        .into_response()
}

#[derive(Debug, Clone)]
struct HealthState {
    health: Arc<ProxyHealth>,
    metrics: Arc<Metrics>,
}

/// `/healthz`: 200 iff the proxiers are healthy and the node is eligible, else 503; the body
/// adds `nodeEligible`. On 200 `lastUpdated` is "now", as upstream keeps for old clients.
async fn healthz(State(s): State<HealthState>) -> Response {
    let mut status = s.health.health(s.health.now());
    let eligible = s.health.node_eligible();
    let ok = status.healthy && eligible;
    s.metrics.count_healthz(ok);
    if ok {
        status.last_updated = Some(status.current_time);
    }
    json_response(code(ok), status.to_json(Some(eligible)))
}

/// `/livez`: 200 iff the proxiers are healthy, whatever the node's state.
async fn livez(State(s): State<HealthState>) -> Response {
    let mut status = s.health.health(s.health.now());
    let ok = status.healthy;
    s.metrics.count_livez(ok);
    if ok {
        status.last_updated = Some(status.current_time);
    }
    json_response(code(ok), status.to_json(None))
}

fn code(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// The health server's routes: `/healthz` and `/livez`, any method (as Go's mux).
pub fn health_router(health: Arc<ProxyHealth>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", any(healthz))
        .route("/livez", any(livez))
        .with_state(HealthState { health, metrics })
}

#[derive(Debug, Clone)]
struct MetricsState {
    metrics: Arc<Metrics>,
    proxy_mode: Arc<str>,
}

async fn metrics_text(State(s): State<MetricsState>) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(TEXT_CONTENT_TYPE),
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn plain_ok() -> Response {
    text_response("ok".to_owned())
}

async fn proxy_mode_text(State(s): State<MetricsState>) -> Response {
    text_response(s.proxy_mode.to_string())
}

/// The metrics server's routes: `/metrics`, `/healthz` ("ok": the process answers) and
/// `/proxyMode` (`nftables` / `ipvs`, read by tooling that detects the proxy mode).
pub fn metrics_router(metrics: Arc<Metrics>, proxy_mode: impl Into<Arc<str>>) -> Router {
    Router::new()
        .route("/metrics", any(metrics_text))
        .route("/healthz", any(plain_ok))
        .route("/proxyMode", any(proxy_mode_text))
        .with_state(MetricsState {
            metrics,
            proxy_mode: proxy_mode.into(),
        })
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

async fn run(
    server: &'static str,
    listener: TcpListener,
    router: Router,
) -> Result<(), ServeError> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "starting {server} HTTP server");
    }
    axum::serve(listener, router)
        .await
        .map_err(|source| ServeError::Serve { server, source })
}

/// Serves `/healthz` and `/livez` on `addr` until the task is dropped.
pub async fn serve_health(
    addr: SocketAddr,
    health: Arc<ProxyHealth>,
    metrics: Arc<Metrics>,
) -> Result<(), ServeError> {
    serve_health_on(bind(addr).await?, health, metrics).await
}

/// [`serve_health`] on a listener already bound.
pub async fn serve_health_on(
    listener: TcpListener,
    health: Arc<ProxyHealth>,
    metrics: Arc<Metrics>,
) -> Result<(), ServeError> {
    run("healthz", listener, health_router(health, metrics)).await
}

/// Serves `/metrics`, `/healthz` and `/proxyMode` on `addr` until the task is dropped.
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    proxy_mode: impl Into<Arc<str>>,
) -> Result<(), ServeError> {
    let proxy_mode = proxy_mode.into();
    serve_metrics_on(bind(addr).await?, metrics, proxy_mode).await
}

/// [`serve_metrics`] on a listener already bound.
pub async fn serve_metrics_on(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    proxy_mode: impl Into<Arc<str>>,
) -> Result<(), ServeError> {
    run("metrics", listener, metrics_router(metrics, proxy_mode)).await
}
