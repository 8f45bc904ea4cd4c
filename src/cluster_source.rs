//! The API-server source: kube-rs watchers for Services, EndpointSlices, this Node and
//! ServiceCIDRs, turned into the same [`SourceEvent`]s as `--manifests`.
//!
//! Each watcher lists, then watches from the list's resourceVersion; kube-runtime
//! resumes after a dropped stream, relists after `410 Gone`, and backs off on API errors.
//! A complete (re)list becomes one [`SourceEvent::Replaced`], so objects deleted while
//! the stream was down are noticed. While the API server is unreachable nothing is sent
//! and the kernel rules stay as they are.

use crate::tracker::{Kind, Object, SourceEvent};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::path::PathBuf;
use tracing::{debug, warn};

/// kube-proxy's selector: skip objects owned by another proxy and headless services.
pub const PROXY_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// How to reach the API server.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// `--kubeconfig`; in-cluster configuration when absent.
    pub kubeconfig: Option<PathBuf>,
    /// `--master`: overrides the server URL.
    pub master: Option<String>,
}

/// Why no client could be built.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("no API server configuration: {0} (pass --kubeconfig or --master, or run in a pod)")]
    NoConfig(String),
    #[error("invalid --master URL {0:?}")]
    Master(String),
    #[error("cannot build the API client: {0}")]
    Client(String),
}

/// Builds a client from `--kubeconfig` / `--master`, or the in-cluster configuration.
pub async fn client(conn: &Connection) -> Result<Client, SourceError> {
    let mut config = match &conn.kubeconfig {
        Some(path) => {
            let err = |e: &dyn std::fmt::Display| SourceError::Kubeconfig {
                path: path.clone(),
                message: e.to_string(),
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| err(&e))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| err(&e))?
        }
        None => match &conn.master {
            Some(_) => kube::Config::new(
                "http://localhost"
                    .parse()
                    .map_err(|_| SourceError::Master(String::new()))?,
            ),
            None => kube::Config::incluster().map_err(|e| SourceError::NoConfig(e.to_string()))?,
        },
    };
    if let Some(master) = &conn.master {
        config.cluster_url = master
            .parse()
            .map_err(|_| SourceError::Master(master.clone()))?;
    }
    Client::try_from(config).map_err(|e| SourceError::Client(e.to_string()))
}

/// Watches one kind until the receiver goes away.
async fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    wrap: fn(K) -> Object,
    send: impl Fn(SourceEvent) -> bool,
) where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let mut buffer = Vec::new();
    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(Event::Init) => {
                buffer.clear();
                continue;
            }
            Ok(Event::InitApply(o)) => {
                buffer.push(wrap(o));
                continue;
            }
            Ok(Event::InitDone) => {
                debug!(?kind, objects = buffer.len(), "listed");
                SourceEvent::Replaced(kind, std::mem::take(&mut buffer))
            }
            Ok(Event::Apply(o)) => SourceEvent::Applied(wrap(o)),
            Ok(Event::Delete(o)) => SourceEvent::Deleted(wrap(o)),
            Err(e) => {
                warn!(?kind, "watch failed, retrying with backoff: {e}");
                SourceEvent::Disconnected(kind)
            }
        };
        if !send(event) {
            return;
        }
    }
}

/// Starts the four watchers on the current tokio runtime. `send` returns false once the
/// consumer is gone, which stops the watchers.
pub fn spawn_watchers<F>(
    client: Client,
    node_name: &str,
    send: F,
) -> Vec<tokio::task::JoinHandle<()>>
where
    F: Fn(SourceEvent) -> bool + Clone + Send + Sync + 'static,
{
    let selector = watcher::Config::default().labels(PROXY_LABEL_SELECTOR);
    vec![
        tokio::spawn(watch(
            Api::<Service>::all(client.clone()),
            selector.clone(),
            Kind::Service,
            Object::Service,
            send.clone(),
        )),
        tokio::spawn(watch(
            Api::<EndpointSlice>::all(client.clone()),
            selector,
            Kind::EndpointSlice,
            Object::EndpointSlice,
            send.clone(),
        )),
        tokio::spawn(watch(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            Kind::Node,
            Object::Node,
            send.clone(),
        )),
        tokio::spawn(watch(
            Api::<ServiceCIDR>::all(client),
            watcher::Config::default(),
            Kind::ServiceCidr,
            Object::ServiceCidr,
            send,
        )),
    ]
}
