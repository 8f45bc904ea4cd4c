//! The process: flags in, kernel programmed, exit code out.

use crate::cli::ProxyMode;
use crate::cluster_source::Connection;
use crate::config::Settings;
use crate::daemon;
use crate::healthcheck::{serve_health, serve_metrics, ProxyHealth, ServiceHealthServers};
use crate::manifests::{self, ManifestError, Manifests};
use crate::metrics::Metrics;
use crate::model::{self, ClusterObjects, ProxyConfig, ProxyState};
use crate::reconciler::Timing;
use crate::telemetry::Telemetry;
use kproxy_backend_api::{Backend, BackendError, Changes, IpFamily};
use kproxy_nftables::writer::NftCli;
use kproxy_nftables::NftablesBackend;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use tracing::{error, info, warn};

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
    let settings = match crate::config::settings_from_args(std::env::args()) {
        Ok(s) => s,
        // --help, --version and flag errors print themselves with clap's exit codes.
        Err(crate::config::ConfigError::Flags(e)) => e.exit(),
        Err(e) => {
            eprintln!("kproxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(settings.verbosity);
    for w in &settings.warnings {
        warn!("{w}");
    }
    if settings.init_only {
        return ExitCode::SUCCESS;
    }
    match run(&settings) {
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
pub fn node_name(hostname_override: Option<&str>) -> String {
    hostname_override
        .map(str::to_string)
        .filter(|s| !s.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .unwrap_or_default()
        .trim()
        .to_lowercase()
}

/// The model's settings from kube-proxy's flags (shared by the daemon and by
/// `trace`/`explain`). The error names the flag and the bad value.
pub fn build_proxy_config(
    hostname_override: Option<&str>,
    cluster_cidrs: &[String],
    nodeport_addresses: &[String],
    masquerade_all: bool,
) -> Result<ProxyConfig, String> {
    let mut cfg = ProxyConfig::new(node_name(hostname_override));
    for c in cluster_cidrs
        .iter()
        .map(|c| c.trim())
        .filter(|c| !c.is_empty())
    {
        let net = crate::ip::parse_cidr(c)
            .ok_or_else(|| format!("--cluster-cidr: invalid CIDR {c:?}"))?;
        cfg.cluster_cidrs.push(net);
    }
    for a in nodeport_addresses
        .iter()
        .map(|a| a.trim())
        .filter(|a| !a.is_empty())
    {
        if a != "primary" && crate::ip::parse_cidr(a).is_none() {
            return Err(format!(
                "--nodeport-addresses: {a:?} is neither `primary` nor a CIDR"
            ));
        }
        cfg.nodeport_addresses.push(a.to_string());
    }
    cfg.masquerade_all = masquerade_all;
    Ok(cfg)
}

/// Settings the model needs.
pub fn proxy_config(settings: &Settings) -> Result<ProxyConfig, RunError> {
    build_proxy_config(
        settings.hostname_override.as_deref(),
        &settings.cluster_cidrs,
        &settings.nodeport_addresses,
        settings.masquerade_all,
    )
    .map_err(RunError::Config)
}

fn backends() -> Vec<NftablesBackend<NftCli>> {
    IpFamily::ALL
        .into_iter()
        .map(|f| NftablesBackend::new(f, NftCli::default()))
        .collect()
}

/// Runs kproxy with resolved settings.
pub fn run(settings: &Settings) -> Result<(), RunError> {
    if settings.mode == ProxyMode::Ipvs {
        return Err(RunError::Config(
            "--proxy-mode=ipvs is not available in this build; use nftables".into(),
        ));
    }
    if settings.cleanup {
        for mut b in backends() {
            let family = b.family();
            b.cleanup()
                .map_err(|source| RunError::Cleanup { family, source })?;
            info!(%family, "removed kproxy's nftables table");
        }
        return Ok(());
    }
    let cfg = proxy_config(settings)?;
    if let (Some(path), true) = (&settings.manifests, settings.once || settings.dry_run) {
        let state = load_state(path, &cfg)?;
        if settings.dry_run {
            for b in backends() {
                if let Some(fam) = state.families.get(&b.family()) {
                    print!("{}", b.render(&fam.node, &fam.services));
                }
            }
            return Ok(());
        }
        return sync_all(&mut backends(), &state);
    }
    if settings.dry_run {
        return Err(RunError::Config("--dry-run needs --manifests".into()));
    }
    let source = match &settings.manifests {
        Some(path) => daemon::Source::Manifests(path.clone()),
        None => daemon::Source::Cluster(Connection {
            kubeconfig: settings.kubeconfig.clone(),
            master: settings.master.clone(),
        }),
    };
    let opts = daemon::Options {
        proxy: cfg,
        timing: Timing {
            min_sync_period: settings.min_sync_period,
            sync_period: settings.sync_period,
            ..Timing::default()
        },
        source,
        once: settings.once,
    };
    let metrics = Arc::new(Metrics::new().map_err(|e| RunError::Config(e.to_string()))?);
    let health = Arc::new(ProxyHealth::new(settings.sync_period));
    let (healthz, metrics_addr) = (settings.healthz_bind_address, settings.metrics_bind_address);
    daemon::run(opts, backends(), move |_| {
        let (h, m) = (health.clone(), metrics.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_health(healthz, h, m).await {
                error!("health server: {e}");
            }
        });
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_metrics(metrics_addr, m, "nftables").await {
                error!("metrics server: {e}");
            }
        });
        let mut telemetry = Telemetry::new(metrics, health.clone(), IpFamily::ALL.to_vec());
        // Health-check node ports listen on every address, as kube-proxy does when
        // NodePorts are not restricted.
        telemetry.service_health = Some(ServiceHealthServers::new(Vec::new(), health));
        telemetry.conntrack = conntrack_cleaner();
        telemetry
    })
    .map_err(RunError::Daemon)
}

/// UDP conntrack cleanup after each successful sync, over one netlink socket opened in
/// kproxy's own network namespace. Without the socket (no privilege) kproxy still runs.
fn conntrack_cleaner() -> Option<crate::telemetry::ConntrackCleaner> {
    match crate::conntrack::Conntrack::open() {
        Ok(mut ct) => Some(Box::new(move |family, plans| {
            crate::conntrack::cleanup_stale_udp(&mut ct, family, plans)
                .map(|r| r.deleted as u64)
                .map_err(|e| e.to_string())
        })),
        Err(e) => {
            warn!("UDP conntrack cleanup disabled: {e}");
            None
        }
    }
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
