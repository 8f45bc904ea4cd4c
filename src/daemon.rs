//! The long-running process: sources, reconciler, HTTP servers and signals wired
//! together.
//!
//! ```text
//!  API server watches ─┐                      ┌─► nftables (one backend per family)
//!  or --manifests poll ├─► channel ─► reconciler ─► observer: metrics, /healthz,
//!  SIGTERM ────────────┘   (one thread owns tracker + backends)   health-check ports,
//!                                                                  conntrack cleanup
//! ```

use crate::cluster_source::{self, Connection};
use crate::manifests;
use crate::model::ProxyConfig;
use crate::reconciler::{Command, Exit, Observer, Reconciler, Timing};
use crate::tracker::{Kind, Object, SourceEvent};
use kproxy_backend_api::Backend;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::time::{Duration, SystemTime};
use tracing::{error, info, warn};

/// Where objects come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// `--manifests PATH`, polled for edits.
    Manifests(PathBuf),
    /// The API server.
    Cluster(Connection),
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Source(#[from] cluster_source::SourceError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("the object sources stopped")]
    SourcesGone,
}

/// A cheap fingerprint of the manifests path: names, sizes and modification times.
fn fingerprint(path: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut files = vec![path.to_path_buf()];
    if let Ok(rd) = std::fs::read_dir(path) {
        files.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
    }
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let md = std::fs::metadata(&f).ok();
            let size = md.as_ref().map_or(0, |m| m.len());
            let mtime = md.and_then(|m| m.modified().ok());
            (f, size, mtime)
        })
        .collect()
}

/// Loads the manifests and reports them as complete lists of every kind.
fn send_manifests(path: &Path, tx: &Sender<Command>) -> bool {
    let m = match manifests::load(path) {
        Ok(m) => m,
        Err(e) => {
            // Keep the current rules; the next edit may fix the file.
            error!("keeping the current rules: {e}");
            return true;
        }
    };
    let lists = [
        (
            Kind::Service,
            m.services
                .into_iter()
                .map(Object::Service)
                .collect::<Vec<_>>(),
        ),
        (
            Kind::EndpointSlice,
            m.endpoint_slices
                .into_iter()
                .map(Object::EndpointSlice)
                .collect(),
        ),
        (Kind::Node, m.nodes.into_iter().map(Object::Node).collect()),
        (
            Kind::ServiceCidr,
            m.service_cidrs
                .into_iter()
                .map(Object::ServiceCidr)
                .collect(),
        ),
    ];
    lists.into_iter().all(|(kind, objs)| {
        tx.send(Command::Source(SourceEvent::Replaced(kind, objs)))
            .is_ok()
    })
}

/// Polls the manifests path once a second (kube-proxy's default minSyncPeriod) and
/// sends complete lists when it changed.
fn watch_manifests(path: PathBuf, tx: Sender<Command>) {
    std::thread::spawn(move || {
        let mut seen = fingerprint(&path);
        if !send_manifests(&path, &tx) {
            return;
        }
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let now = fingerprint(&path);
            if now != seen {
                seen = now;
                info!(path = %path.display(), "manifests changed");
                if !send_manifests(&path, &tx) {
                    return;
                }
            }
        }
    });
}

/// Everything the daemon needs.
#[derive(Debug)]
pub struct Options {
    pub proxy: ProxyConfig,
    pub timing: Timing,
    pub source: Source,
    /// Exit after the first successful sync.
    pub once: bool,
}

/// Runs sources and the reconciler until SIGTERM/SIGINT (or one sync with `once`).
/// `setup` runs inside the async runtime before the first event, to start HTTP servers
/// and build the observer.
pub fn run<B, O, F>(opts: Options, backends: Vec<B>, setup: F) -> Result<(), DaemonError>
where
    B: Backend,
    O: Observer,
    F: FnOnce(&Sender<Command>) -> O,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    let (tx, rx) = mpsc::channel();

    let observer = {
        let _guard = rt.enter();
        setup(&tx)
    };
    match &opts.source {
        Source::Manifests(path) => watch_manifests(path.clone(), tx.clone()),
        Source::Cluster(conn) => {
            let client = rt.block_on(cluster_source::client(conn))?;
            let sender = tx.clone();
            let _guard = rt.enter();
            cluster_source::spawn_watchers(client, &opts.proxy.node_name, move |ev| {
                sender.send(Command::Source(ev)).is_ok()
            });
        }
    }
    let signals = tx.clone();
    rt.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            warn!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: exiting, rules stay in place"),
            _ = int.recv() => info!("SIGINT: exiting, rules stay in place"),
        }
        let _ = signals.send(Command::Shutdown);
    });
    drop(tx);

    let mut reconciler = Reconciler::new(opts.proxy, backends, opts.timing, observer);
    let exit = reconciler.run(&rx, opts.once);
    // Watch tasks hold senders; stop the runtime without waiting for them.
    rt.shutdown_timeout(Duration::from_millis(100));
    match exit {
        Exit::Shutdown | Exit::Once => Ok(()),
        Exit::Disconnected => Err(DaemonError::SourcesGone),
    }
}
