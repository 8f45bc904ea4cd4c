//! The process: flags in, kernel programmed, exit code out.

use crate::cli::{normalise_go_flags, Flags, ProxyMode};
use crate::daemon;
use crate::manifests::{self, ManifestError, Manifests};
use crate::model::{self, ClusterObjects, ProxyConfig, ProxyState};
use crate::reconciler::{NoObserver, Timing};
use clap::Parser;
use kproxy_backend_api::{Backend, BackendError, Changes, IpFamily};
use kproxy_nftables::writer::NftCli;
use kproxy_nftables::NftablesBackend;
use std::path::Path;
use std::process::ExitCode;
use tracing::{info, warn};

/// Why kproxy stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Manifests(#[from] ManifestError),
    #[error("{family} sync failed: {source}")]
    Sync {
        family: IpFamily,
        source: BackendError,
    },
    #[error("cleanup of the {family} table failed: {source}")]
    Cleanup {
        family: IpFamily,
        source: BackendError,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Daemon(#[from] crate::daemon::DaemonError),
}

/// Entry point of the `kproxy` binary.
pub fn main_entry() -> ExitCode {
    let flags = Flags::parse_from(normalise_go_flags(std::env::args()));
    init_logging(flags.verbosity);
    match run(&flags) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kproxy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbosity: u8) {
    let level = match verbosity {
        0..=1 => "info",
        2..=4 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KPROXY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// The node's name: `--hostname-override`, else the host name, lower-cased as
/// kube-proxy does.
fn node_name(flags: &Flags) -> String {
    flags
        .hostname_override
        .clone()
        .filter(|s| !s.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .unwrap_or_default()
        .trim()
        .to_lowercase()
}

/// Settings the model needs, from flags.
pub fn proxy_config(flags: &Flags) -> Result<ProxyConfig, RunError> {
    let mut cfg = ProxyConfig::new(node_name(flags));
    for c in flags
        .cluster_cidr
        .iter()
        .map(|c| c.trim())
        .filter(|c| !c.is_empty())
    {
        let net = crate::ip::parse_cidr(c)
            .ok_or_else(|| RunError::Config(format!("--cluster-cidr: invalid CIDR {c:?}")))?;
        cfg.cluster_cidrs.push(net);
    }
    for a in flags
        .nodeport_addresses
        .iter()
        .map(|a| a.trim())
        .filter(|a| !a.is_empty())
    {
        if a != "primary" && crate::ip::parse_cidr(a).is_none() {
            return Err(RunError::Config(format!(
                "--nodeport-addresses: {a:?} is neither `primary` nor a CIDR"
            )));
        }
        cfg.nodeport_addresses.push(a.to_string());
    }
    cfg.masquerade_all = flags.masquerade_all;
    Ok(cfg)
}

fn backends() -> Vec<NftablesBackend<NftCli>> {
    IpFamily::ALL
        .into_iter()
        .map(|f| NftablesBackend::new(f, NftCli::default()))
        .collect()
}

/// Runs kproxy with parsed flags.
pub fn run(flags: &Flags) -> Result<(), RunError> {
    if flags.proxy_mode == ProxyMode::Ipvs {
        return Err(RunError::Config(
            "--proxy-mode=ipvs is not available in this build; use nftables".into(),
        ));
    }
    if flags.cleanup {
        for mut b in backends() {
            let family = b.family();
            b.cleanup()
                .map_err(|source| RunError::Cleanup { family, source })?;
            info!(%family, "removed kproxy's nftables table");
        }
        return Ok(());
    }
    let cfg = proxy_config(flags)?;
    let Some(path) = flags.manifests.clone() else {
        return Err(RunError::Config(
            "no object source: pass --manifests PATH (the API-server source is not available in this build)".into(),
        ));
    };
    let state = load_state(&path, &cfg)?;
    if flags.dry_run {
        for b in backends() {
            if let Some(fam) = state.families.get(&b.family()) {
                print!("{}", b.render(&fam.node, &fam.services));
            }
        }
        return Ok(());
    }
    if flags.once {
        return sync_all(&mut backends(), &state);
    }
    let opts = daemon::Options {
        proxy: cfg,
        timing: Timing::default(),
        source: daemon::Source::Manifests(path),
        once: false,
    };
    daemon::run(opts, backends(), |_| NoObserver).map_err(RunError::Daemon)
}

fn to_objects(m: Manifests) -> ClusterObjects {
    ClusterObjects {
        services: m.services,
        endpoint_slices: m.endpoint_slices,
        nodes: m.nodes,
        service_cidrs: m.service_cidrs,
    }
}

/// Loads the manifests and builds the desired state, logging every skipped object by
/// namespace/name.
fn load_state(path: &Path, cfg: &ProxyConfig) -> Result<ProxyState, RunError> {
    // The loader logs each object it could not decode, with file and line.
    let m = manifests::load(path)?;
    let local = crate::local_addrs::local_addresses().unwrap_or_else(|e| {
        warn!("cannot list local addresses for --nodeport-addresses: {e}");
        Vec::new()
    });
    let state = model::build(&to_objects(m), cfg, &local);
    for inv in &state.invalid {
        warn!("skipping invalid object: {inv}");
    }
    Ok(state)
}

/// Syncs every family once, fully (`--once`): reads the live table back and sends only
/// what differs.
fn sync_all(backends: &mut [NftablesBackend<NftCli>], state: &ProxyState) -> Result<(), RunError> {
    for b in backends.iter_mut() {
        let family = b.family();
        let Some(fam) = state.families.get(&family) else {
            continue;
        };
        let changes = Changes::Full;
        let started = std::time::Instant::now();
        let report = b
            .sync(&fam.node, &fam.services, &changes)
            .map_err(|source| RunError::Sync { family, source })?;
        info!(
            %family,
            full = report.full,
            services = fam.services.len(),
            changed = report.services_examined,
            operations = report.operations,
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "synced"
        );
    }
    Ok(())
}
