//! Configuration: kube-proxy's flags and `KubeProxyConfiguration` file, resolved into the
//! [`Settings`] the daemon runs on.
//!
//! # Sources and precedence
//!
//! 1. Flags given on the command line ([`crate::cli::Flags`]; only flags actually given
//!    count, found with clap's `ArgMatches::value_source`).
//! 2. The `--config` file: `KubeProxyConfiguration`, `kubeproxy.config.k8s.io/v1alpha1`,
//!    as kubeadm writes it into the `kube-proxy` ConfigMap.
//! 3. kube-proxy's defaults (`pkg/proxy/apis/config/v1alpha1/defaults.go`): a zero or
//!    `null` value in the file means "the default", as in kube-proxy.
//!
//! kube-proxy itself ignores most flags when `--config` is given (all but
//! `--hostname-override`, `--master`, `--cleanup`, `--init-only` and the logging flags);
//! kproxy lets every flag override the file, and says so in a warning for the flags
//! kube-proxy would have ignored.
//!
//! # Mode and the per-mode blocks
//!
//! `mode: nftables` and `mode: ipvs` run those backends. `mode: iptables` is refused (kproxy
//! has no iptables mode; the message suggests nftables), as are `kernelspace` (Windows) and
//! `userspace` (removed in kube-proxy v1.26). An unset or empty `mode` in a config file is
//! kube-proxy's default, iptables: kproxy runs it as nftables with a warning and keeps
//! kube-proxy's reading of such a file, so a pure image swap behaves as closely as it can:
//!
//! | effective mode   | syncPeriod, minSyncPeriod  | masqueradeAll, masqueradeBit | nodePortAddresses default |
//! |------------------|----------------------------|------------------------------|---------------------------|
//! | `nftables`       | `nftables.*` (30s, 1s)     | `nftables.*`                 | `primary`                 |
//! | `ipvs`           | `ipvs.*` (30s, 0s)         | `iptables.*`                 | all node IPs              |
//! | unset/`""`       | `iptables.*` (30s, 1s)     | `iptables.*`                 | all node IPs              |
//!
//! This is kube-proxy's own v1alpha1 conversion (`conversion.go`). The flags follow
//! kube-proxy too: `--iptables-sync-period`/`--iptables-min-sync-period` apply in every
//! mode but ipvs (there is no `--nftables-*` flag), `--ipvs-sync-period`/
//! `--ipvs-min-sync-period` only in ipvs mode. Without any config file and without
//! `--proxy-mode`, kproxy's default mode is nftables, with nftables defaults.
//!
//! # Unsupported settings are never silently ignored
//!
//! Every kube-proxy flag and field is either supported, accepted with a warning in
//! [`Settings::warnings`] (harmless: kproxy behaves correctly without it, e.g.
//! `oomScoreAdj`, conntrack sysctls, logging options), or refused with a
//! [`ConfigError`] naming it (kproxy would behave differently, e.g.
//! `detectLocalMode: InterfaceNamePrefix`). A field is warned about only when set to
//! something other than zero/empty/`null` — kubeadm writes every field, mostly zero.
//! Unknown and misspelled fields are errors naming the field and its line. The full
//! table is the README (section "Flags and configuration").

use crate::cli::{parse_mode, Flags, ModeError, ProxyMode};
use crate::ip::{parse_cidr, parse_ip};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use ipnet::IpNet;
use serde::de::{self, Deserializer, IgnoredAny, Visitor};
use serde::Deserialize;
use serde_saphyr::{MessageFormatter as _, Spanned};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The only config API version kproxy reads (what kubeadm writes).
pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
/// The config file's `kind`.
pub const KIND: &str = "KubeProxyConfiguration";
/// kube-proxy's health server port (`ports.ProxyHealthzPort`).
pub const HEALTHZ_PORT: u16 = 10256;
/// kube-proxy's metrics port (`ports.ProxyStatusPort`).
pub const METRICS_PORT: u16 = 10249;
/// The fwmark bit kproxy marks packets to masquerade with (`0x4000`), kube-proxy's default.
pub const MASQUERADE_BIT: i32 = 14;
/// kube-proxy's default `syncPeriod`.
pub const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);
/// kube-proxy's default `minSyncPeriod` in iptables and nftables mode (ipvs: 0).
pub const DEFAULT_MIN_SYNC_PERIOD: Duration = Duration::from_secs(1);
/// kube-proxy's default `configSyncPeriod`.
pub const DEFAULT_CONFIG_SYNC_PERIOD: Duration = Duration::from_secs(15 * 60);
/// The IPVS schedulers kube-proxy accepts; empty means `rr`.
pub const IPVS_SCHEDULERS: [&str; 10] = [
    "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "sh", "dh", "sed", "nq",
];

/// Everything the daemon runs on, resolved from flags, the config file and defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The backend.
    pub mode: ProxyMode,
    /// `--config`, so the daemon can watch it (kube-proxy exits when it changes).
    pub config_file: Option<PathBuf>,
    /// `--kubeconfig` / `clientConnection.kubeconfig`; `None`: in-cluster config.
    pub kubeconfig: Option<PathBuf>,
    /// `--master`: API server URL overriding the kubeconfig's.
    pub master: Option<String>,
    /// `--hostname-override` / `hostnameOverride`, trimmed and lower-cased as kube-proxy
    /// does; `None`: the host name.
    pub hostname_override: Option<String>,
    /// Pod CIDRs (at most one per family), validated, as written.
    pub cluster_cidrs: Vec<String>,
    /// Never empty: `["primary"]`, or CIDRs (keywords expanded: `all` is
    /// `0.0.0.0/0` + `::/0`, `localhost` is `127.0.0.0/8` + `::1/128`).
    pub nodeport_addresses: Vec<String>,
    /// Masquerade all traffic to ClusterIPs.
    pub masquerade_all: bool,
    /// The /metrics server.
    pub metrics_bind_address: SocketAddr,
    /// The /healthz and /livez server.
    pub healthz_bind_address: SocketAddr,
    /// Retry interval after a failed sync, and kube-proxy's periodic resync (30s).
    pub sync_period: Duration,
    /// Minimum time between two syncs (1s; ipvs 0s).
    pub min_sync_period: Duration,
    /// Informer resync period (15m).
    pub config_sync_period: Duration,
    /// IPVS settings (used in ipvs mode; validated only in ipvs mode, as kube-proxy).
    pub ipvs: IpvsSettings,
    /// `--manifests`: offline object source.
    pub manifests: Option<PathBuf>,
    /// `--once`: sync once and exit.
    pub once: bool,
    /// `--dry-run`: print, change nothing.
    pub dry_run: bool,
    /// `--cleanup`: remove kproxy's kernel objects and exit.
    pub cleanup: bool,
    /// `--init-only`: kproxy needs no privileged initialisation; with this set the daemon
    /// should exit 0 once the configuration has been checked.
    pub init_only: bool,
    /// `-v` / `logging.verbosity`.
    pub verbosity: u8,
    /// One line per setting kube-proxy has and kproxy accepts without applying, naming it
    /// (`--oom-score-adj: …`, `config.conf:12:3: conntrack.maxPerCore: …`).
    pub warnings: Vec<String>,
}

/// IPVS settings (kube-proxy's `ipvs` block and `--ipvs-*` flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsSettings {
    /// Scheduler, `rr` when unset.
    pub scheduler: String,
    /// Set arp_ignore=1 / arp_announce=2.
    pub strict_arp: bool,
    /// Idle TCP timeout; zero leaves the kernel's.
    pub tcp_timeout: Duration,
    /// TCP timeout after FIN; zero leaves the kernel's.
    pub tcpfin_timeout: Duration,
    /// UDP timeout; zero leaves the kernel's.
    pub udp_timeout: Duration,
    /// `ipvs.syncPeriod` (30s).
    pub sync_period: Duration,
    /// `ipvs.minSyncPeriod` (0s: kube-proxy has no default for it).
    pub min_sync_period: Duration,
    /// CIDRs whose virtual servers kproxy must leave alone.
    pub exclude_cidrs: Vec<String>,
}

impl Default for IpvsSettings {
    fn default() -> Self {
        IpvsSettings {
            scheduler: "rr".into(),
            strict_arp: false,
            tcp_timeout: Duration::ZERO,
            tcpfin_timeout: Duration::ZERO,
            udp_timeout: Duration::ZERO,
            sync_period: DEFAULT_SYNC_PERIOD,
            min_sync_period: Duration::ZERO,
            exclude_cidrs: Vec::new(),
        }
    }
}

/// Where a setting came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A command-line flag, with its dashes: `--iptables-sync-period`.
    Flag(String),
    /// A field of the config file, by its path: `nftables.syncPeriod`.
    File {
        path: PathBuf,
        field: String,
        line: Option<u64>,
        column: Option<u64>,
    },
}

impl Origin {
    /// The flag (`--x`) or field path (`a.b`).
    pub fn name(&self) -> &str {
        match self {
            Origin::Flag(f) => f,
            Origin::File { field, .. } => field,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(flag) => f.write_str(flag),
            Origin::File {
                path,
                field,
                line,
                column,
            } => write!(f, "{}{}: {field}", path.display(), position(*line, *column)),
        }
    }
}

fn position(line: Option<u64>, column: Option<u64>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The command line does not parse. Also `--help` and `--version`: call
    /// [`clap::Error::exit`] to print them (or the error) with the right exit code.
    #[error(transparent)]
    Flags(#[from] clap::Error),
    /// The config file cannot be read.
    #[error("cannot read config file {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid YAML, has an unknown or misspelled field, or a value
    /// of the wrong type. `field` is the dotted path of the key on the error's line
    /// (`nftables.syncPeriodd`), when the file is block-style YAML.
    #[error("{}{}: {}{message}", .path.display(), position(*.line, *.column), .field.as_ref().map(|f| format!("{f}: ")).unwrap_or_default())]
    Parse {
        path: PathBuf,
        line: Option<u64>,
        column: Option<u64>,
        field: Option<String>,
        message: String,
    },
    /// A value kube-proxy would reject too.
    #[error("{at}: invalid value {value:?}: {reason}")]
    Invalid {
        at: Box<Origin>,
        value: String,
        reason: String,
    },
    /// A valid kube-proxy setting that kproxy refuses because it would behave differently.
    #[error("{at}: {value:?} is not supported by kproxy: {reason}")]
    Unsupported {
        at: Box<Origin>,
        value: String,
        reason: String,
    },
}

impl ConfigError {
    /// The flag or field at fault, for `Invalid` and `Unsupported`.
    pub fn origin(&self) -> Option<&Origin> {
        match self {
            ConfigError::Invalid { at, .. } | ConfigError::Unsupported { at, .. } => Some(at),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The config file
// ---------------------------------------------------------------------------------------

/// A config value with the place it was read from.
pub type Field<T> = Option<Spanned<T>>;

/// kube-proxy's `KubeProxyConfiguration` (`k8s.io/kube-proxy/config/v1alpha1`), every
/// field optional (absent and `null` are the default). Unknown fields are errors.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubeProxyConfiguration {
    pub api_version: Field<String>,
    pub kind: Field<String>,
    pub feature_gates: Option<BTreeMap<String, bool>>,
    pub client_connection: Option<ClientConnectionConfiguration>,
    pub logging: Option<LoggingConfiguration>,
    pub hostname_override: Field<String>,
    pub bind_address: Field<String>,
    pub healthz_bind_address: Field<String>,
    pub metrics_bind_address: Field<String>,
    pub bind_address_hard_fail: Field<bool>,
    pub enable_profiling: Field<bool>,
    pub show_hidden_metrics_for_version: Field<String>,
    pub mode: Field<String>,
    pub iptables: Option<IptablesConfiguration>,
    pub ipvs: Option<IpvsConfiguration>,
    pub nftables: Option<NftablesConfiguration>,
    pub winkernel: Option<WinkernelConfiguration>,
    pub detect_local_mode: Field<String>,
    pub detect_local: Option<DetectLocalConfiguration>,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Field<String>,
    pub node_port_addresses: Field<Vec<String>>,
    pub oom_score_adj: Field<i32>,
    pub conntrack: Option<ConntrackConfiguration>,
    pub config_sync_period: Field<String>,
    pub port_range: Field<String>,
    pub windows_run_as_service: Field<bool>,
    /// Removed from kube-proxy (userspace mode); warned about.
    pub udp_idle_timeout: Field<IgnoredAny>,
    /// Removed from kube-proxy; warned about.
    pub resource_container: Field<IgnoredAny>,
}

/// `clientConnection` (component-base `ClientConnectionConfiguration`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientConnectionConfiguration {
    pub kubeconfig: Field<String>,
    pub accept_content_types: Field<String>,
    pub content_type: Field<String>,
    pub qps: Field<f32>,
    pub burst: Field<i32>,
}

/// `logging` (component-base `LoggingConfiguration`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoggingConfiguration {
    pub format: Field<String>,
    /// A Go duration string or a number of nanoseconds.
    pub flush_frequency: Field<Scalar>,
    pub verbosity: Field<u32>,
    pub vmodule: Field<Vec<VModuleItem>>,
    pub options: Option<FormatOptions>,
}

/// One `logging.vmodule` entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VModuleItem {
    pub file_pattern: Option<String>,
    pub verbosity: Option<u32>,
}

/// `logging.options`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FormatOptions {
    pub text: Option<OutputRoutingOptions>,
    pub json: Option<OutputRoutingOptions>,
}

/// `logging.options.text` / `logging.options.json`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutputRoutingOptions {
    pub split_stream: Field<bool>,
    /// A Kubernetes quantity (`"0"`, `4Ki`).
    pub info_buffer_size: Field<Scalar>,
}

/// `iptables`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IptablesConfiguration {
    pub masquerade_bit: Field<i32>,
    pub masquerade_all: Field<bool>,
    pub localhost_node_ports: Field<bool>,
    #[serde(rename = "snatNodeInternalIP")]
    pub snat_node_internal_ip: Field<bool>,
    pub sync_period: Field<String>,
    pub min_sync_period: Field<String>,
}

/// `ipvs`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IpvsConfiguration {
    pub sync_period: Field<String>,
    pub min_sync_period: Field<String>,
    pub scheduler: Field<String>,
    #[serde(rename = "excludeCIDRs")]
    pub exclude_cidrs: Field<Vec<String>>,
    #[serde(rename = "strictARP")]
    pub strict_arp: Field<bool>,
    pub tcp_timeout: Field<String>,
    pub tcp_fin_timeout: Field<String>,
    pub udp_timeout: Field<String>,
}

/// `nftables`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NftablesConfiguration {
    pub masquerade_bit: Field<i32>,
    pub masquerade_all: Field<bool>,
    pub sync_period: Field<String>,
    pub min_sync_period: Field<String>,
}

/// `conntrack`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConntrackConfiguration {
    pub max_per_core: Field<i32>,
    pub min: Field<i32>,
    pub tcp_established_timeout: Field<String>,
    pub tcp_close_wait_timeout: Field<String>,
    pub tcp_be_liberal: Field<bool>,
    pub udp_timeout: Field<String>,
    pub udp_stream_timeout: Field<String>,
    /// Removed from kube-proxy; warned about.
    pub max: Field<IgnoredAny>,
}

/// `winkernel` (Windows only).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WinkernelConfiguration {
    pub network_name: Field<String>,
    pub source_vip: Field<String>,
    #[serde(rename = "enableDSR")]
    pub enable_dsr: Field<bool>,
    pub root_hns_endpoint_name: Field<String>,
    pub forward_health_check_vip: Field<bool>,
}

/// `detectLocal`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DetectLocalConfiguration {
    pub bridge_interface: Field<String>,
    pub interface_name_prefix: Field<String>,
}

/// A YAML scalar kept as text, whether it was written as a string or a number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl Visitor<'_> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

impl KubeProxyConfiguration {
    /// Parses a config file's text; `path` is only used in messages. Checks `apiVersion`
    /// and `kind`; the values themselves are checked when resolving [`Settings`].
    ///
    /// ```
    /// use kproxy::config::KubeProxyConfiguration;
    /// let text = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\n";
    /// let cfg = KubeProxyConfiguration::from_yaml(text, "config.conf".as_ref()).unwrap();
    /// assert_eq!(cfg.mode.unwrap().value, "nftables");
    /// ```
    pub fn from_yaml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let options = serde_saphyr::options! { with_snippet: false };
        let parsed: Option<Self> =
            serde_saphyr::from_str_with_options(text, options).map_err(|err| {
                let location = err.location();
                let line = location.and_then(|l| known(l.line()));
                ConfigError::Parse {
                    path: path.to_owned(),
                    line,
                    column: location.and_then(|l| known(l.column())),
                    field: line.and_then(|l| key_path_at(text, l)),
                    message: serde_saphyr::DefaultMessageFormatter
                        .format_message(err.without_snippet())
                        .into_owned(),
                }
            })?;
        let cfg = parsed.ok_or_else(|| ConfigError::Parse {
            path: path.to_owned(),
            line: None,
            column: None,
            field: None,
            message: format!("the file is empty; expected a {KIND}"),
        })?;
        cfg.check_type(path)?;
        Ok(cfg)
    }

    fn check_type(&self, path: &Path) -> Result<(), ConfigError> {
        let at = |field: &str, v: Option<&Spanned<String>>| file_origin(path, field, v);
        let text = |v: Option<&Spanned<String>>| v.map(|v| v.value.clone()).unwrap_or_default();
        match self.api_version.as_ref() {
            Some(v) if v.value == API_VERSION => {}
            Some(v) if v.value.starts_with("kubeproxy.config.k8s.io/") => {
                return Err(unsupported(
                    at("apiVersion", Some(v)),
                    &v.value,
                    format!("kproxy reads {API_VERSION}, the version kubeadm writes"),
                ))
            }
            other => {
                return Err(invalid(
                    at("apiVersion", other),
                    text(other),
                    format!("must be {API_VERSION}"),
                ))
            }
        }
        match self.kind.as_ref() {
            Some(k) if k.value == KIND => Ok(()),
            other => Err(invalid(
                at("kind", other),
                text(other),
                format!("must be {KIND}"),
            )),
        }
    }
}

/// Reads and parses a config file (see [`KubeProxyConfiguration::from_yaml`]).
pub fn load_config_file(path: &Path) -> Result<KubeProxyConfiguration, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    KubeProxyConfiguration::from_yaml(&text, path)
}

/// The dotted path of the key on `line` (1-based) of block-style YAML, found by
/// indentation: `iptables.masqueradeAll`. serde's messages name only the key itself.
fn key_path_at(text: &str, line: u64) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let index = usize::try_from(line).ok()?.checked_sub(1)?;
    let (mut indent, key) = key_of(lines.get(index)?)?;
    let mut path = vec![key];
    for above in lines.get(..index)?.iter().rev() {
        if indent == 0 {
            break;
        }
        if let Some((i, k)) = key_of(above).filter(|(i, _)| *i < indent) {
            path.push(k);
            indent = i;
        }
    }
    path.reverse();
    Some(path.join("."))
}

/// The indentation and key of a `key: value` line (list items' keys indented past `- `).
fn key_of(line: &str) -> Option<(usize, &str)> {
    let mut rest = line.trim_start_matches(' ');
    let mut indent = line.len() - rest.len();
    while let Some(item) = rest.strip_prefix("- ") {
        let trimmed = item.trim_start_matches(' ');
        indent += rest.len() - trimmed.len();
        rest = trimmed;
    }
    let key = match rest.find(": ") {
        Some(i) => &rest[..i],
        None => rest.trim_end().strip_suffix(':')?,
    };
    let key = key.trim_matches(|c| c == '"' || c == '\'');
    let plain = !key.is_empty() && !key.starts_with('#') && !key.contains([' ', '{', '[', ':']);
    plain.then_some((indent, key))
}

/// serde-saphyr uses line/column 0 for "unknown".
fn known(n: u64) -> Option<u64> {
    (n > 0).then_some(n)
}

fn file_origin<T>(path: &Path, field: &str, v: Option<&Spanned<T>>) -> Origin {
    let loc = v.map(|v| v.referenced);
    Origin::File {
        path: path.to_owned(),
        field: field.to_owned(),
        line: loc.and_then(|l| known(l.line())),
        column: loc.and_then(|l| known(l.column())),
    }
}

// ---------------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------------

/// Parses the command line (`args[0]` is the program name, as in [`std::env::args`]),
/// reads `--config` if given, and resolves the [`Settings`].
///
/// ```
/// let s = kproxy::config::settings_from_args(
///     ["kproxy", "--proxy-mode=nftables", "--cluster-cidr=10.244.0.0/16"].map(String::from),
/// )
/// .unwrap();
/// assert_eq!(s.cluster_cidrs, ["10.244.0.0/16"]);
/// assert_eq!(s.nodeport_addresses, ["primary"]);
/// assert_eq!(s.sync_period, std::time::Duration::from_secs(30));
/// ```
pub fn settings_from_args<I: IntoIterator<Item = String>>(
    args: I,
) -> Result<Settings, ConfigError> {
    let argv = crate::cli::normalise_go_flags(args);
    let matches = Flags::command().try_get_matches_from(argv)?;
    let flags = Flags::from_arg_matches(&matches)?;
    settings_from_matches(&flags, &matches)
}

/// Resolves [`Settings`] from already parsed flags (reading `--config` if given).
pub fn settings_from_matches(flags: &Flags, matches: &ArgMatches) -> Result<Settings, ConfigError> {
    let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    // The parsed flag reads "" as nftables; kube-proxy reads it as "unset".
    let proxy_mode_empty = given("proxy_mode")
        && matches
            .get_raw("proxy_mode")
            .and_then(|mut raw| raw.next_back())
            .is_some_and(|v| v.is_empty());
    let file = match &flags.config {
        Some(path) => Some((path.as_path(), load_config_file(path)?)),
        None => None,
    };
    Resolver {
        flags,
        given: &given,
        proxy_mode_empty,
        file: file.as_ref().map(|(p, c)| (*p, c)),
        warnings: Vec::new(),
    }
    .resolve()
}

// ---------------------------------------------------------------------------------------
// Resolution
// ---------------------------------------------------------------------------------------

/// The config block the mode reads its sync periods and masquerade settings from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Iptables,
    Ipvs,
    Nftables,
}

impl Block {
    const ALL: [Block; 3] = [Block::Iptables, Block::Ipvs, Block::Nftables];

    fn name(self) -> &'static str {
        match self {
            Block::Iptables => "iptables",
            Block::Ipvs => "ipvs",
            Block::Nftables => "nftables",
        }
    }

    fn default_min_sync(self) -> Duration {
        match self {
            Block::Ipvs => Duration::ZERO,
            Block::Iptables | Block::Nftables => DEFAULT_MIN_SYNC_PERIOD,
        }
    }
}

/// A duration read from the file, with its origin; `None` when absent.
type Period = Option<(Duration, Origin)>;

/// The resolved mode and how kube-proxy would read the file for it.
#[derive(Debug, Clone, Copy)]
struct ModeChoice {
    mode: ProxyMode,
    block: Block,
    /// kube-proxy's default (iptables) semantics: mode unset in a config file or
    /// `--proxy-mode=""`.
    unset: bool,
}

/// Flags that kube-proxy honours even with `--config` (everything else it ignores then).
const HONOURED_WITH_CONFIG: [&str; 19] = [
    "config",
    "write-config-to",
    "cleanup",
    "init-only",
    "hostname-override",
    "master",
    "v",
    "vmodule",
    "logging-format",
    "log-flush-frequency",
    "log-json-split-stream",
    "log-json-info-buffer-size",
    "log-text-split-stream",
    "log-text-info-buffer-size",
    "boot-id-file",
    "machine-id-file",
    "manifests",
    "once",
    "dry-run",
];

struct Resolver<'a> {
    flags: &'a Flags,
    given: &'a dyn Fn(&str) -> bool,
    /// `--proxy-mode=""` was given.
    proxy_mode_empty: bool,
    file: Option<(&'a Path, &'a KubeProxyConfiguration)>,
    warnings: Vec<String>,
}

fn flag(name: &str) -> Origin {
    Origin::Flag(format!("--{name}"))
}

fn invalid(at: Origin, value: impl fmt::Display, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        at: Box::new(at),
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn unsupported(at: Origin, value: impl fmt::Display, reason: impl Into<String>) -> ConfigError {
    ConfigError::Unsupported {
        at: Box::new(at),
        value: value.to_string(),
        reason: reason.into(),
    }
}

impl<'a> Resolver<'a> {
    fn cfg(&self) -> Option<&'a KubeProxyConfiguration> {
        self.file.map(|(_, c)| c)
    }

    fn at<T>(&self, field: &str, v: &Spanned<T>) -> Origin {
        match self.file {
            Some((path, _)) => file_origin(path, field, Some(v)),
            None => Origin::Flag(field.to_owned()),
        }
    }

    fn warn(&mut self, at: &Origin, message: impl fmt::Display) {
        self.warnings.push(format!("{at}: {message}"));
    }

    /// A file field by accessor, with its origin.
    fn field<T: 'a>(
        &self,
        name: &str,
        get: impl FnOnce(&'a KubeProxyConfiguration) -> Option<&'a Spanned<T>>,
    ) -> Option<(&'a T, Origin)> {
        let v = self.cfg().and_then(get)?;
        Some((&v.value, self.at(name, v)))
    }

    /// The flag's value if it was given, else the file field's, with where it came from.
    fn pick<T: Clone + 'a>(
        &self,
        flag_value: Option<&T>,
        flag_name: &str,
        field_name: &str,
        get: impl FnOnce(&'a KubeProxyConfiguration) -> Option<&'a Spanned<T>>,
    ) -> Option<(T, Origin)> {
        match flag_value {
            Some(v) => Some((v.clone(), flag(flag_name))),
            None => self.field(field_name, get).map(|(v, at)| (v.clone(), at)),
        }
    }

    /// A duration field: parsed, `None` when absent.
    fn duration_field(
        &self,
        name: &str,
        get: impl FnOnce(&'a KubeProxyConfiguration) -> Option<&'a Spanned<String>>,
    ) -> Result<Option<(Duration, Origin)>, ConfigError> {
        let Some((text, at)) = self.field(name, get) else {
            return Ok(None);
        };
        parse_go_duration(text)
            .map(|d| Some((d, at.clone())))
            .map_err(|e| invalid(at, text, e.to_string()))
    }

    fn resolve(mut self) -> Result<Settings, ConfigError> {
        let f = self.flags;
        if let Some(path) = &f.write_config_to {
            return Err(unsupported(
                flag("write-config-to"),
                path.display(),
                "kproxy does not write kube-proxy configuration files; \
                 kube-proxy's documentation lists the defaults",
            ));
        }
        let mode = self.mode()?;
        let (sync_period, min_sync_period) = self.sync_periods(mode)?;
        let masquerade_all = self.masquerade(mode)?;
        let bind_ip = self.bind_address()?;
        let healthz_bind_address = self.server_address(Server::Healthz, bind_ip)?;
        let metrics_bind_address = self.server_address(Server::Metrics, bind_ip)?;
        let settings = Settings {
            mode: mode.mode,
            config_file: f.config.clone(),
            kubeconfig: self.kubeconfig(),
            master: f.master.clone().filter(|m| !m.is_empty()),
            hostname_override: self.hostname_override()?,
            cluster_cidrs: self.cluster_cidrs()?,
            nodeport_addresses: self.nodeport_addresses(mode)?,
            masquerade_all,
            metrics_bind_address,
            healthz_bind_address,
            sync_period,
            min_sync_period,
            config_sync_period: self.config_sync_period()?,
            ipvs: self.ipvs(mode)?,
            manifests: f.manifests.clone(),
            once: f.once,
            dry_run: f.dry_run,
            cleanup: f.cleanup,
            init_only: f.init_only,
            verbosity: self.verbosity(),
            warnings: Vec::new(),
        };
        self.detect_local()?;
        self.host_settings()?;
        self.client_connection()?;
        self.logging()?;
        self.ignored_fields()?;
        self.flags_kube_proxy_would_ignore();
        Ok(Settings {
            warnings: self.warnings,
            ..settings
        })
    }

    // --- mode and per-mode blocks ------------------------------------------------------

    fn mode(&mut self) -> Result<ModeChoice, ConfigError> {
        let (text, at) = if (self.given)("proxy_mode") {
            // The flag parser already refused unsupported modes; only "" needs its text.
            let text = if self.proxy_mode_empty {
                String::new()
            } else {
                self.flags.proxy_mode.as_str().into()
            };
            (Some(text), flag("proxy-mode"))
        } else if let Some((path, cfg)) = self.file {
            match &cfg.mode {
                Some(m) => (Some(m.value.clone()), file_origin(path, "mode", Some(m))),
                None => (None, file_origin::<()>(path, "mode", None)),
            }
        } else {
            return Ok(ModeChoice {
                mode: ProxyMode::Nftables,
                block: Block::Nftables,
                unset: false,
            });
        };
        let text = text.unwrap_or_default();
        match parse_mode(&text) {
            Ok(Some(mode)) => Ok(ModeChoice {
                mode,
                block: match mode {
                    ProxyMode::Nftables => Block::Nftables,
                    ProxyMode::Ipvs => Block::Ipvs,
                },
                unset: false,
            }),
            Ok(None) => {
                self.warn(
                    &at,
                    "unset, which is kube-proxy's iptables mode; kproxy runs it as nftables, \
                     reading iptables.* as kube-proxy would and keeping NodePorts on all node \
                     IPs, but NodePorts are no longer reachable via 127.0.0.1; \
                     set mode: nftables to silence this",
                );
                Ok(ModeChoice {
                    mode: ProxyMode::Nftables,
                    block: Block::Iptables,
                    unset: true,
                })
            }
            Err(e @ ModeError::Unknown) => Err(invalid(at, text, e.to_string())),
            Err(e) => Err(unsupported(at, text, e.to_string())),
        }
    }

    /// `syncPeriod` and `minSyncPeriod` of a block, as written.
    fn block_periods(&self, b: Block) -> Result<(Period, Period), ConfigError> {
        let n = b.name();
        let sync = self.duration_field(&format!("{n}.syncPeriod"), |c| match b {
            Block::Iptables => c.iptables.as_ref()?.sync_period.as_ref(),
            Block::Ipvs => c.ipvs.as_ref()?.sync_period.as_ref(),
            Block::Nftables => c.nftables.as_ref()?.sync_period.as_ref(),
        })?;
        let min = self.duration_field(&format!("{n}.minSyncPeriod"), |c| match b {
            Block::Iptables => c.iptables.as_ref()?.min_sync_period.as_ref(),
            Block::Ipvs => c.ipvs.as_ref()?.min_sync_period.as_ref(),
            Block::Nftables => c.nftables.as_ref()?.min_sync_period.as_ref(),
        })?;
        Ok((sync, min))
    }

    /// `syncPeriod` and `minSyncPeriod` from the mode's block (zero: default), overridden
    /// by the mode's flags. Also reports the other blocks' settings as unused.
    fn sync_periods(&mut self, m: ModeChoice) -> Result<(Duration, Duration), ConfigError> {
        let (file_sync, file_min) = self.block_periods(m.block)?;
        let nonzero = |v: Option<(Duration, Origin)>| v.filter(|(d, _)| !d.is_zero());
        // `None` origin: kube-proxy's default.
        let mut sync =
            nonzero(file_sync).map_or((DEFAULT_SYNC_PERIOD, None), |(d, at)| (d, Some(at)));
        let mut min =
            nonzero(file_min).map_or((m.block.default_min_sync(), None), |(d, at)| (d, Some(at)));
        let f = self.flags;
        let (names, values, others) = if m.mode == ProxyMode::Ipvs {
            (
                ["ipvs-sync-period", "ipvs-min-sync-period"],
                [f.ipvs_sync_period, f.ipvs_min_sync_period],
                ["iptables-sync-period", "iptables-min-sync-period"],
            )
        } else {
            (
                ["iptables-sync-period", "iptables-min-sync-period"],
                [f.iptables_sync_period, f.iptables_min_sync_period],
                ["ipvs-sync-period", "ipvs-min-sync-period"],
            )
        };
        if let Some(d) = values[0] {
            sync = (d, Some(flag(names[0])));
        }
        if let Some(d) = values[1] {
            min = (d, Some(flag(names[1])));
        }
        for name in others {
            if (self.given)(&name.replace('-', "_")) {
                let msg = format!("has no effect in {} mode (as in kube-proxy)", m.mode);
                self.warn(&flag(name), msg);
            }
        }
        let default_at = || flag(names[0]);
        if sync.0.is_zero() {
            let at = sync.1.unwrap_or_else(default_at);
            return Err(invalid(
                at,
                format_go_duration(sync.0),
                "must be greater than 0",
            ));
        }
        if min.0 > sync.0 {
            let (min_text, sync_text) = (format_go_duration(min.0), format_go_duration(sync.0));
            return Err(match min.1 {
                Some(at) => invalid(
                    at,
                    min_text,
                    format!("must not be greater than the sync period, {sync_text}"),
                ),
                None => invalid(
                    sync.1.unwrap_or_else(default_at),
                    sync_text,
                    format!("must not be less than the minimum sync period, {min_text}"),
                ),
            });
        }
        for b in Block::ALL.into_iter().filter(|b| *b != m.block) {
            let (s, mn) = self.block_periods(b)?;
            let defaults = [DEFAULT_SYNC_PERIOD, b.default_min_sync()];
            for (v, default) in [s, mn].into_iter().zip(defaults) {
                if let Some((d, at)) = v.filter(|(d, _)| !d.is_zero() && *d != default) {
                    let msg = format!(
                        "{} is not used: the {} mode reads {}.*, as kube-proxy does",
                        format_go_duration(d),
                        mode_label(m),
                        m.block.name()
                    );
                    self.warn(&at, msg);
                }
            }
        }
        Ok((sync.0, min.0))
    }

    /// `masqueradeAll` (returned) and `masqueradeBit` (checked) from the mode's block.
    fn masquerade(&mut self, m: ModeChoice) -> Result<bool, ConfigError> {
        let nft = m.block == Block::Nftables;
        let all_ipt = self.field("iptables.masqueradeAll", |c| {
            c.iptables.as_ref()?.masquerade_all.as_ref()
        });
        let all_nft = self.field("nftables.masqueradeAll", |c| {
            c.nftables.as_ref()?.masquerade_all.as_ref()
        });
        let (used, unused) = if nft {
            (all_nft, all_ipt)
        } else {
            (all_ipt, all_nft)
        };
        if let Some((true, at)) = unused {
            let msg = format!(
                "not used: the {} mode reads {}.masqueradeAll, as kube-proxy does",
                mode_label(m),
                if nft { "nftables" } else { "iptables" }
            );
            self.warn(&at, msg);
        }
        let masquerade_all = if (self.given)("masquerade_all") {
            self.flags.masquerade_all
        } else {
            used.is_some_and(|(v, _)| *v)
        };

        let bit_ipt = self
            .field("iptables.masqueradeBit", |c| {
                c.iptables.as_ref()?.masquerade_bit.as_ref()
            })
            .map(|(v, at)| (*v, at));
        let bit_ipt = match self.flags.iptables_masquerade_bit {
            Some(v) => Some((v, flag("iptables-masquerade-bit"))),
            None => bit_ipt,
        };
        let bit_nft = self
            .field("nftables.masqueradeBit", |c| {
                c.nftables.as_ref()?.masquerade_bit.as_ref()
            })
            .map(|(v, at)| (*v, at));
        for (bit, at) in bit_ipt.iter().chain(bit_nft.iter()) {
            if !(0..=31).contains(bit) {
                return Err(invalid(at.clone(), bit, "must be within the range [0, 31]"));
            }
        }
        let (used, unused) = if nft {
            (bit_nft, bit_ipt)
        } else {
            (bit_ipt, bit_nft)
        };
        if let Some((bit, at)) = used.filter(|(b, _)| *b != MASQUERADE_BIT) {
            return Err(unsupported(
                at,
                bit,
                format!(
                    "kproxy always marks packets to masquerade with bit {MASQUERADE_BIT} \
                     (0x4000), kube-proxy's default"
                ),
            ));
        }
        if let Some((bit, at)) = unused.filter(|(b, _)| *b != MASQUERADE_BIT) {
            self.warn(
                &at,
                format!(
                    "{bit} is not used in {} mode (kproxy uses bit {MASQUERADE_BIT})",
                    mode_label(m)
                ),
            );
        }
        Ok(masquerade_all)
    }

    // --- identity and addresses --------------------------------------------------------

    fn hostname_override(&self) -> Result<Option<String>, ConfigError> {
        if let Some(name) = &self.flags.hostname_override {
            let trimmed = name.trim();
            if trimmed.is_empty() {
                return Err(invalid(
                    flag("hostname-override"),
                    name,
                    "empty hostname-override is invalid",
                ));
            }
            return Ok(Some(trimmed.to_lowercase()));
        }
        Ok(self
            .field("hostnameOverride", |c| c.hostname_override.as_ref())
            .map(|(v, _)| v.trim().to_lowercase())
            .filter(|v| !v.is_empty()))
    }

    fn kubeconfig(&self) -> Option<PathBuf> {
        self.flags
            .kubeconfig
            .clone()
            .filter(|p| !p.as_os_str().is_empty())
            .or_else(|| {
                self.field("clientConnection.kubeconfig", |c| {
                    c.client_connection.as_ref()?.kubeconfig.as_ref()
                })
                .map(|(v, _)| PathBuf::from(v))
                .filter(|p| !p.as_os_str().is_empty())
            })
    }

    /// `bindAddress`: validated; kproxy takes the node's IPs from the Node object.
    fn bind_address(&mut self) -> Result<IpAddr, ConfigError> {
        let chosen = match self.flags.bind_address.as_deref().filter(|s| !s.is_empty()) {
            Some(v) => Some((v.to_owned(), flag("bind-address"))),
            None => self
                .field("bindAddress", |c| c.bind_address.as_ref())
                .filter(|(v, _)| !v.is_empty())
                .map(|(v, at)| (v.clone(), at)),
        };
        let Some((text, at)) = chosen else {
            return Ok(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        };
        let ip = parse_ip(&text).ok_or_else(|| {
            invalid(
                at.clone(),
                &text,
                "not a valid textual representation of an IP address",
            )
        })?;
        if !ip.is_unspecified() {
            self.warn(
                &at,
                format!(
                    "{ip} is not used as the node's primary IP: kproxy takes the node's IPs \
                     from its Node object (they agree unless the Node says otherwise); \
                     only its IP family is used, for the default server addresses"
                ),
            );
        }
        Ok(ip)
    }

    fn server_address(
        &mut self,
        which: Server,
        bind_ip: IpAddr,
    ) -> Result<SocketAddr, ConfigError> {
        let (flag_name, port_flag, field_name, default_port) = which.names();
        let (flag_value, port_value) = match which {
            Server::Healthz => (&self.flags.healthz_bind_address, self.flags.healthz_port),
            Server::Metrics => (&self.flags.metrics_bind_address, self.flags.metrics_port),
        };
        let default_host = match (which, bind_ip.is_ipv6()) {
            (Server::Healthz, false) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            (Server::Healthz, true) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            (Server::Metrics, false) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            (Server::Metrics, true) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        // The deprecated port flag: 0 would disable the server; otherwise, as kube-proxy's
        // AppendPortIfNeeded, it only completes an address given without a port.
        let mut port_flag_value = None;
        if let Some(p) = port_value {
            let at = flag(port_flag);
            if p == 0 {
                return Err(unsupported(at, p, "kproxy always serves this endpoint"));
            }
            let port = u16::try_from(p)
                .map_err(|_| invalid(at.clone(), p, "must be a port number, 1-65535"))?;
            port_flag_value = Some((port, at));
        }
        let chosen = match flag_value.as_deref().filter(|s| !s.is_empty()) {
            Some(v) => Some((v.to_owned(), flag(flag_name))),
            None => self
                .field(field_name, |c| match which {
                    Server::Healthz => c.healthz_bind_address.as_ref(),
                    Server::Metrics => c.metrics_bind_address.as_ref(),
                })
                .filter(|(v, _)| !v.is_empty())
                .map(|(v, at)| (v.clone(), at)),
        };
        let bare_ip = chosen.as_ref().and_then(|(text, _)| parse_ip(text));
        if bare_ip.is_none() {
            if let Some((port, at)) = port_flag_value.take() {
                self.warn(
                    &at,
                    format!(
                        "{port} has no effect: as in kube-proxy, it only applies to a \
                         --{flag_name} given as a bare IP"
                    ),
                );
            }
        }
        let port = port_flag_value.map_or(default_port, |(p, _)| p);
        let Some((text, at)) = chosen else {
            return Ok(SocketAddr::new(default_host, default_port));
        };
        if let Some(ip) = bare_ip {
            return Ok(SocketAddr::new(ip, port));
        }
        parse_ip_port(&text).map_err(|reason| invalid(at, &text, reason))
    }

    fn cluster_cidrs(&self) -> Result<Vec<String>, ConfigError> {
        let (items, at): (Vec<String>, Origin) = if (self.given)("cluster_cidr") {
            (self.flags.cluster_cidr.clone(), flag("cluster-cidr"))
        } else if let Some((v, at)) = self.field("clusterCIDR", |c| c.cluster_cidr.as_ref()) {
            (v.split(',').map(str::to_owned).collect(), at)
        } else {
            return Ok(Vec::new());
        };
        let items: Vec<String> = items
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        let mut nets: Vec<IpNet> = Vec::new();
        for item in &items {
            let net = parse_cidr(item).ok_or_else(|| {
                invalid(
                    at.clone(),
                    item,
                    "must be a valid CIDR block (e.g. 10.100.0.0/16 or fde4:8dba:82e1::/48)",
                )
            })?;
            nets.push(net);
        }
        let joined = items.join(",");
        match nets.as_slice() {
            [] | [_] => {}
            [a, b] if a.addr().is_ipv4() != b.addr().is_ipv4() => {}
            [_, _] => {
                return Err(invalid(
                    at,
                    joined,
                    "two CIDRs must be one IPv4 and one IPv6",
                ))
            }
            _ => {
                return Err(invalid(
                    at,
                    joined,
                    "only one CIDR, or one per IP family, is allowed \
                     (e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)",
                ))
            }
        }
        Ok(items)
    }

    fn nodeport_addresses(&mut self, m: ModeChoice) -> Result<Vec<String>, ConfigError> {
        let (items, at): (Vec<String>, Origin) = if (self.given)("nodeport_addresses") {
            (
                self.flags.nodeport_addresses.clone(),
                flag("nodeport-addresses"),
            )
        } else if let Some((v, at)) =
            self.field("nodePortAddresses", |c| c.node_port_addresses.as_ref())
        {
            (v.clone(), at)
        } else {
            (Vec::new(), flag("nodeport-addresses"))
        };
        let items: Vec<&str> = items
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .collect();
        if items.is_empty() {
            // kube-proxy's defaults: primary in nftables mode, all node IPs otherwise.
            return Ok(if m.mode == ProxyMode::Nftables && !m.unset {
                vec!["primary".into()]
            } else {
                vec!["0.0.0.0/0".into(), "::/0".into()]
            });
        }
        if items.contains(&"primary") {
            if items.len() > 1 {
                return Err(unsupported(
                    at,
                    items.join(","),
                    "kproxy accepts `primary` only on its own, not combined with CIDRs",
                ));
            }
            return Ok(vec!["primary".into()]);
        }
        let mut out = Vec::new();
        let mut loopback = Vec::new();
        for item in items {
            match item {
                "all" => out.extend(["0.0.0.0/0".to_owned(), "::/0".to_owned()]),
                "localhost" => {
                    out.extend(["127.0.0.0/8".to_owned(), "::1/128".to_owned()]);
                    loopback.push(item);
                }
                cidr => {
                    let net = parse_cidr(cidr).ok_or_else(|| {
                        invalid(
                            at.clone(),
                            cidr,
                            "must be a CIDR, or one of the keywords primary, all, localhost",
                        )
                    })?;
                    if net.addr().is_loopback() {
                        loopback.push(item);
                    }
                    out.push(cidr.to_owned());
                }
            }
        }
        if !loopback.is_empty() {
            self.warn(
                &at,
                format!(
                    "{}: kproxy never serves NodePorts on loopback addresses \
                     (as kube-proxy's nftables mode by default)",
                    loopback.join(",")
                ),
            );
        }
        Ok(out)
    }

    fn detect_local(&mut self) -> Result<(), ConfigError> {
        let chosen = self.pick(
            self.flags.detect_local_mode.as_ref(),
            "detect-local-mode",
            "detectLocalMode",
            |c| c.detect_local_mode.as_ref(),
        );
        if let Some((mode, at)) = chosen {
            match mode.as_str() {
                "" | "ClusterCIDR" => {}
                "NodeCIDR" | "BridgeInterface" | "InterfaceNamePrefix" => {
                    return Err(unsupported(
                        at,
                        mode,
                        "kproxy tells pod traffic apart by clusterCIDR only \
                         (detectLocalMode: ClusterCIDR)",
                    ))
                }
                _ => {
                    return Err(invalid(
                        at,
                        mode,
                        "must be ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix",
                    ))
                }
            }
        }
        let bridge = self.pick(
            self.flags.pod_bridge_interface.as_ref(),
            "pod-bridge-interface",
            "detectLocal.bridgeInterface",
            |c| c.detect_local.as_ref()?.bridge_interface.as_ref(),
        );
        let prefix = self.pick(
            self.flags.pod_interface_name_prefix.as_ref(),
            "pod-interface-name-prefix",
            "detectLocal.interfaceNamePrefix",
            |c| c.detect_local.as_ref()?.interface_name_prefix.as_ref(),
        );
        for (value, at) in bridge
            .into_iter()
            .chain(prefix)
            .filter(|(v, _)| !v.is_empty())
        {
            self.warn(
                &at,
                format!("{value:?} is ignored: it only applies to a detectLocalMode kproxy does not support"),
            );
        }
        Ok(())
    }

    fn ipvs(&mut self, m: ModeChoice) -> Result<IpvsSettings, ConfigError> {
        let f = self.flags;
        let is_ipvs = m.mode == ProxyMode::Ipvs;
        let mut notes: Vec<Origin> = Vec::new();
        let mut out = IpvsSettings::default();

        let scheduler = self.pick(
            f.ipvs_scheduler.as_ref(),
            "ipvs-scheduler",
            "ipvs.scheduler",
            |c| c.ipvs.as_ref()?.scheduler.as_ref(),
        );
        if let Some((s, at)) = scheduler.filter(|(s, _)| !s.is_empty()) {
            if is_ipvs && !IPVS_SCHEDULERS.contains(&s.as_str()) {
                return Err(invalid(
                    at,
                    s,
                    format!(
                        "must be one of {} (empty means rr)",
                        IPVS_SCHEDULERS.join(", ")
                    ),
                ));
            }
            notes.push(at);
            out.scheduler = s;
        }

        let strict_arp = self.pick(
            f.ipvs_strict_arp.as_ref(),
            "ipvs-strict-arp",
            "ipvs.strictARP",
            |c| c.ipvs.as_ref()?.strict_arp.as_ref(),
        );
        if let Some((v, at)) = strict_arp {
            if v {
                notes.push(at);
            }
            out.strict_arp = v;
        }

        let timeouts = [
            ("ipvs-tcp-timeout", f.ipvs_tcp_timeout, "ipvs.tcpTimeout"),
            (
                "ipvs-tcpfin-timeout",
                f.ipvs_tcpfin_timeout,
                "ipvs.tcpFinTimeout",
            ),
            ("ipvs-udp-timeout", f.ipvs_udp_timeout, "ipvs.udpTimeout"),
        ];
        let mut resolved = [Duration::ZERO; 3];
        for (i, (flag_name, flag_value, field_name)) in timeouts.into_iter().enumerate() {
            let from_file = self.duration_field(field_name, |c| {
                let b = c.ipvs.as_ref()?;
                match i {
                    0 => b.tcp_timeout.as_ref(),
                    1 => b.tcp_fin_timeout.as_ref(),
                    _ => b.udp_timeout.as_ref(),
                }
            })?;
            let chosen = flag_value.map(|d| (d, flag(flag_name))).or(from_file);
            if let Some((d, at)) = chosen {
                if !d.is_zero() {
                    notes.push(at);
                }
                resolved[i] = d;
            }
        }
        [out.tcp_timeout, out.tcpfin_timeout, out.udp_timeout] = resolved;

        let (sync, min) = self.block_periods(Block::Ipvs)?;
        out.sync_period = f
            .ipvs_sync_period
            .or(sync.map(|(d, _)| d).filter(|d| !d.is_zero()))
            .unwrap_or(DEFAULT_SYNC_PERIOD);
        out.min_sync_period = f
            .ipvs_min_sync_period
            .or(min.map(|(d, _)| d))
            .unwrap_or(Duration::ZERO);

        let excludes = if (self.given)("ipvs_exclude_cidrs") {
            Some((f.ipvs_exclude_cidrs.clone(), flag("ipvs-exclude-cidrs")))
        } else {
            self.field("ipvs.excludeCIDRs", |c| {
                c.ipvs.as_ref()?.exclude_cidrs.as_ref()
            })
            .map(|(v, at)| (v.clone(), at))
        };
        if let Some((cidrs, at)) = excludes {
            let cidrs: Vec<String> = cidrs
                .iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
            if is_ipvs {
                if let Some(bad) = cidrs.iter().find(|c| parse_cidr(c).is_none()) {
                    return Err(invalid(at, bad, "must be a valid IP block"));
                }
            }
            if !cidrs.is_empty() {
                notes.push(at);
            }
            out.exclude_cidrs = cidrs;
        }

        if !is_ipvs {
            for at in notes {
                self.warn(&at, format!("has no effect in {} mode", mode_label(m)));
            }
        }
        Ok(out)
    }

    fn config_sync_period(&self) -> Result<Duration, ConfigError> {
        if let Some(d) = self.flags.config_sync_period {
            if d.is_zero() {
                return Err(invalid(
                    flag("config-sync-period"),
                    "0s",
                    "must be greater than 0",
                ));
            }
            return Ok(d);
        }
        Ok(self
            .duration_field("configSyncPeriod", |c| c.config_sync_period.as_ref())?
            .map(|(d, _)| d)
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_CONFIG_SYNC_PERIOD))
    }

    fn verbosity(&self) -> u8 {
        if (self.given)("verbosity") {
            return self.flags.verbosity;
        }
        self.field("logging.verbosity", |c| {
            c.logging.as_ref()?.verbosity.as_ref()
        })
        .map_or(0, |(v, _)| u8::try_from(*v).unwrap_or(u8::MAX))
    }

    // --- accepted, not applied ---------------------------------------------------------

    /// Settings kube-proxy applies to the host (sysctls, OOM score, feature gates) that
    /// kproxy does not: checked as kube-proxy checks them, then warned about.
    fn host_settings(&mut self) -> Result<(), ConfigError> {
        let f = self.flags;
        let mut gates: Vec<(String, bool, Origin)> = Vec::new();
        if let Some((path, cfg)) = self.file {
            for (k, v) in cfg.feature_gates.iter().flatten() {
                gates.push((k.clone(), *v, file_origin::<()>(path, "featureGates", None)));
            }
        }
        for item in f
            .feature_gates
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
        {
            let at = flag("feature-gates");
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| invalid(at.clone(), item, "missing bool value (key=true|false)"))?;
            let v =
                crate::cli::parse_go_bool(v.trim()).map_err(|e| invalid(at.clone(), item, e))?;
            gates.retain(|(name, _, _)| name != k.trim());
            gates.push((k.trim().to_owned(), v, at));
        }
        for (name, value, at) in gates {
            self.warn(
                &at,
                format!(
                    "feature gate {name}={value} is not interpreted: kproxy has no feature gates"
                ),
            );
        }

        let oom = self.pick(
            f.oom_score_adj.as_ref(),
            "oom-score-adj",
            "oomScoreAdj",
            |c| c.oom_score_adj.as_ref(),
        );
        if let Some((v, at)) = oom {
            if !(-1000..=1000).contains(&v) {
                return Err(invalid(at, v, "must be within the range [-1000, 1000]"));
            }
            self.warn(
                &at,
                format!("{v} is not applied: kproxy does not change its OOM score (the kubelet sets it from the pod's priority)"),
            );
        }

        let counts = [
            (
                "conntrack-max-per-core",
                f.conntrack_max_per_core,
                "conntrack.maxPerCore",
            ),
            ("conntrack-min", f.conntrack_min, "conntrack.min"),
        ];
        for (i, (flag_name, flag_value, field_name)) in counts.into_iter().enumerate() {
            let chosen = match flag_value {
                Some(v) => Some((v, flag(flag_name))),
                None => self
                    .field(field_name, |c| {
                        let b = c.conntrack.as_ref()?;
                        if i == 0 {
                            b.max_per_core.as_ref()
                        } else {
                            b.min.as_ref()
                        }
                    })
                    .map(|(v, at)| (*v, at)),
            };
            if let Some((v, at)) = chosen {
                if v < 0 {
                    return Err(invalid(at, v, "must be greater than or equal to 0"));
                }
                if v > 0 {
                    self.warn(&at, format!("{v} is not applied: {CONNTRACK_SYSCTLS}"));
                }
            }
        }
        let durations = [
            (
                "conntrack-tcp-timeout-established",
                f.conntrack_tcp_timeout_established,
                "conntrack.tcpEstablishedTimeout",
            ),
            (
                "conntrack-tcp-timeout-close-wait",
                f.conntrack_tcp_timeout_close_wait,
                "conntrack.tcpCloseWaitTimeout",
            ),
            (
                "conntrack-udp-timeout",
                f.conntrack_udp_timeout,
                "conntrack.udpTimeout",
            ),
            (
                "conntrack-udp-timeout-stream",
                f.conntrack_udp_timeout_stream,
                "conntrack.udpStreamTimeout",
            ),
        ];
        for (i, (flag_name, flag_value, field_name)) in durations.into_iter().enumerate() {
            let from_file = self.duration_field(field_name, |c| {
                let b = c.conntrack.as_ref()?;
                match i {
                    0 => b.tcp_established_timeout.as_ref(),
                    1 => b.tcp_close_wait_timeout.as_ref(),
                    2 => b.udp_timeout.as_ref(),
                    _ => b.udp_stream_timeout.as_ref(),
                }
            })?;
            let chosen = flag_value.map(|d| (d, flag(flag_name))).or(from_file);
            if let Some((d, at)) = chosen.filter(|(d, _)| !d.is_zero()) {
                self.warn(
                    &at,
                    format!(
                        "{} is not applied: {CONNTRACK_SYSCTLS}",
                        format_go_duration(d)
                    ),
                );
            }
        }
        let liberal = self.pick(
            f.conntrack_tcp_be_liberal.as_ref(),
            "conntrack-tcp-be-liberal",
            "conntrack.tcpBeLiberal",
            |c| c.conntrack.as_ref()?.tcp_be_liberal.as_ref(),
        );
        if let Some((true, at)) = liberal {
            self.warn(&at, format!("not applied: {CONNTRACK_SYSCTLS}"));
        }
        Ok(())
    }

    fn client_connection(&mut self) -> Result<(), ConfigError> {
        let f = self.flags;
        let content_type = self.pick(
            f.kube_api_content_type.as_ref(),
            "kube-api-content-type",
            "clientConnection.contentType",
            |c| c.client_connection.as_ref()?.content_type.as_ref(),
        );
        if let Some((v, at)) =
            content_type.filter(|(v, _)| !v.is_empty() && v != "application/json")
        {
            self.warn(
                &at,
                format!("{v:?} is not used: kproxy talks JSON to the API server"),
            );
        }
        if let Some((v, at)) = self
            .field("clientConnection.acceptContentTypes", |c| {
                c.client_connection.as_ref()?.accept_content_types.as_ref()
            })
            .filter(|(v, _)| !v.is_empty())
        {
            let msg = format!("{v:?} is not used: kproxy talks JSON to the API server");
            self.warn(&at, msg);
        }
        let qps = self.pick(
            f.kube_api_qps.as_ref(),
            "kube-api-qps",
            "clientConnection.qps",
            |c| c.client_connection.as_ref()?.qps.as_ref(),
        );
        if let Some((v, at)) = qps.filter(|(v, _)| *v != 0.0) {
            self.warn(
                &at,
                format!("{v} is not applied: kproxy does not rate-limit its watches"),
            );
        }
        let burst = self.pick(
            f.kube_api_burst.as_ref(),
            "kube-api-burst",
            "clientConnection.burst",
            |c| c.client_connection.as_ref()?.burst.as_ref(),
        );
        if let Some((v, at)) = burst {
            if v < 0 {
                return Err(invalid(at, v, "must be greater than or equal to 0"));
            }
            if v > 0 {
                self.warn(
                    &at,
                    format!("{v} is not applied: kproxy does not rate-limit its watches"),
                );
            }
        }
        Ok(())
    }

    fn logging(&mut self) -> Result<(), ConfigError> {
        let f = self.flags;
        let format = self.pick(
            f.logging_format.as_ref(),
            "logging-format",
            "logging.format",
            |c| c.logging.as_ref()?.format.as_ref(),
        );
        if let Some((v, at)) = format {
            match v.as_str() {
                "" | "text" => {}
                "json" => self.warn(&at, "json is not supported: kproxy logs text"),
                _ => {
                    return Err(invalid(
                        at,
                        v,
                        "unsupported log format: must be text or json",
                    ))
                }
            }
        }
        let flush = match f.log_flush_frequency {
            Some(d) => Some((d, flag("log-flush-frequency"))),
            None => match self.field("logging.flushFrequency", |c| {
                c.logging.as_ref()?.flush_frequency.as_ref()
            }) {
                Some((Scalar(text), at)) => Some((
                    parse_flush_frequency(text).map_err(|e| invalid(at.clone(), text, e))?,
                    at,
                )),
                None => None,
            },
        };
        if let Some((d, at)) = flush.filter(|(d, _)| !d.is_zero()) {
            self.warn(
                &at,
                format!(
                    "{} is not used: kproxy writes logs unbuffered",
                    format_go_duration(d)
                ),
            );
        }
        let vmodule_flag: Vec<&str> = f
            .vmodule
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .collect();
        for item in &vmodule_flag {
            let ok = item
                .split_once('=')
                .is_some_and(|(p, n)| !p.is_empty() && n.parse::<u32>().is_ok());
            if !ok {
                return Err(invalid(flag("vmodule"), item, "must be pattern=N"));
            }
        }
        if !vmodule_flag.is_empty() {
            self.warn(
                &flag("vmodule"),
                "per-file verbosity is not supported: use -v",
            );
        } else if let Some((items, at)) =
            self.field("logging.vmodule", |c| c.logging.as_ref()?.vmodule.as_ref())
        {
            if !items.is_empty() {
                self.warn(
                    &at,
                    "per-file verbosity is not supported: use logging.verbosity",
                );
            }
        }
        let streams = [
            (
                "log-text-split-stream",
                f.log_text_split_stream,
                "log-text-info-buffer-size",
                &f.log_text_info_buffer_size,
                "text",
            ),
            (
                "log-json-split-stream",
                f.log_json_split_stream,
                "log-json-info-buffer-size",
                &f.log_json_info_buffer_size,
                "json",
            ),
        ];
        for (split_flag, split_value, buffer_flag, buffer_value, format) in streams {
            let block = |c: &'a KubeProxyConfiguration| {
                let o = c.logging.as_ref()?.options.as_ref()?;
                if format == "text" {
                    o.text.as_ref()
                } else {
                    o.json.as_ref()
                }
            };
            let split = match split_value {
                Some(v) => Some((v, flag(split_flag))),
                None => self
                    .field(&format!("logging.options.{format}.splitStream"), |c| {
                        block(c)?.split_stream.as_ref()
                    })
                    .map(|(v, at)| (*v, at)),
            };
            if let Some((true, at)) = split {
                self.warn(
                    &at,
                    "split log streams are not supported: kproxy logs to stderr",
                );
            }
            let buffer = match buffer_value {
                Some(v) => Some((v.clone(), flag(buffer_flag))),
                None => self
                    .field(&format!("logging.options.{format}.infoBufferSize"), |c| {
                        block(c)?.info_buffer_size.as_ref()
                    })
                    .map(|(v, at)| (v.0.clone(), at)),
            };
            if let Some((v, at)) = buffer.filter(|(v, _)| !is_zero_quantity(v)) {
                self.warn(
                    &at,
                    format!("{v:?} is not used: kproxy writes logs unbuffered"),
                );
            }
        }
        Ok(())
    }

    /// Fields and flags with no effect on Linux or on kproxy: warned about when set.
    fn ignored_fields(&mut self) -> Result<(), ConfigError> {
        let f = self.flags;
        let bools: [(&str, Option<bool>, &str, &str); 3] = [
            (
                "bind-address-hard-fail",
                f.bind_address_hard_fail,
                "bindAddressHardFail",
                "not configurable: kproxy logs a failed bind and keeps running",
            ),
            (
                "profiling",
                f.profiling,
                "enableProfiling",
                "kproxy serves no /debug/pprof handlers",
            ),
            (
                "iptables-localhost-nodeports",
                f.iptables_localhost_nodeports,
                "iptables.localhostNodePorts",
                "applies to iptables mode only; kproxy never serves NodePorts on 127.0.0.1",
            ),
        ];
        for (i, (flag_name, flag_value, field_name, reason)) in bools.into_iter().enumerate() {
            let chosen = match flag_value {
                Some(v) => Some((v, flag(flag_name))),
                None => self
                    .field(field_name, |c| match i {
                        0 => c.bind_address_hard_fail.as_ref(),
                        1 => c.enable_profiling.as_ref(),
                        _ => c.iptables.as_ref()?.localhost_node_ports.as_ref(),
                    })
                    .map(|(v, at)| (*v, at)),
            };
            // localhostNodePorts is harmless either way; the others only when enabled.
            if let Some((v, at)) = chosen.filter(|(v, _)| *v || i == 2) {
                self.warn(&at, format!("{v} is not applied: {reason}"));
            }
        }
        if let Some((true, at)) = self.field("iptables.snatNodeInternalIP", |c| {
            c.iptables.as_ref()?.snat_node_internal_ip.as_ref()
        }) {
            return Err(unsupported(
                at,
                true,
                "kproxy masquerades to the outgoing interface's address",
            ));
        }
        let hidden = self.pick(
            f.show_hidden_metrics_for_version.as_ref(),
            "show-hidden-metrics-for-version",
            "showHiddenMetricsForVersion",
            |c| c.show_hidden_metrics_for_version.as_ref(),
        );
        if let Some((v, at)) = hidden.filter(|(v, _)| !v.is_empty()) {
            self.warn(&at, format!("{v:?} is not used: kproxy hides no metrics"));
        }
        for (name, value) in [
            ("boot-id-file", &f.boot_id_file),
            ("machine-id-file", &f.machine_id_file),
        ] {
            if value.is_some() {
                self.warn(&flag(name), "not used by kproxy");
            }
        }
        let Some(cfg) = self.cfg() else {
            return Ok(());
        };
        let mut notes: Vec<(Origin, &str)> = Vec::new();
        if let Some(v) = cfg.port_range.as_ref().filter(|v| !v.value.is_empty()) {
            notes.push((
                self.at("portRange", v),
                "unused since kube-proxy's userspace mode was removed",
            ));
        }
        if let Some(v) = cfg.windows_run_as_service.as_ref().filter(|v| v.value) {
            notes.push((self.at("windowsRunAsService", v), "Windows only"));
        }
        if let Some(w) = &cfg.winkernel {
            let strings = [
                ("winkernel.networkName", &w.network_name),
                ("winkernel.sourceVip", &w.source_vip),
                ("winkernel.rootHnsEndpointName", &w.root_hns_endpoint_name),
            ];
            for (name, v) in strings {
                if let Some(v) = v.as_ref().filter(|v| !v.value.is_empty()) {
                    notes.push((self.at(name, v), "Windows only"));
                }
            }
            for (name, v) in [
                ("winkernel.enableDSR", &w.enable_dsr),
                (
                    "winkernel.forwardHealthCheckVip",
                    &w.forward_health_check_vip,
                ),
            ] {
                if let Some(v) = v.as_ref().filter(|v| v.value) {
                    notes.push((self.at(name, v), "Windows only"));
                }
            }
        }
        for (name, v) in [
            ("udpIdleTimeout", &cfg.udp_idle_timeout),
            ("resourceContainer", &cfg.resource_container),
        ] {
            if let Some(v) = v {
                notes.push((self.at(name, v), "removed from kube-proxy; ignored"));
            }
        }
        if let Some(v) = cfg.conntrack.as_ref().and_then(|c| c.max.as_ref()) {
            notes.push((
                self.at("conntrack.max", v),
                "removed from kube-proxy; ignored",
            ));
        }
        for (at, reason) in notes {
            self.warn(&at, format!("not used: {reason}"));
        }
        Ok(())
    }

    /// kube-proxy ignores most flags when `--config` is given; kproxy applies them.
    fn flags_kube_proxy_would_ignore(&mut self) {
        if self.file.is_none() {
            return;
        }
        let cmd = Flags::command();
        let overriding: Vec<String> = cmd
            .get_arguments()
            .filter(|a| (self.given)(a.get_id().as_str()))
            .filter_map(|a| a.get_long())
            .filter(|long| !HONOURED_WITH_CONFIG.contains(long))
            .map(str::to_owned)
            .collect();
        for long in overriding {
            self.warn(
                &flag(&long),
                "overrides the config file; note that kube-proxy ignores this flag when --config is given",
            );
        }
    }
}

const CONNTRACK_SYSCTLS: &str =
    "kproxy does not set conntrack sysctls (set them on the node, e.g. with a sysctl DaemonSet)";

fn mode_label(m: ModeChoice) -> &'static str {
    if m.unset {
        "unset (iptables)"
    } else {
        m.mode.as_str()
    }
}

#[derive(Debug, Clone, Copy)]
enum Server {
    Healthz,
    Metrics,
}

impl Server {
    /// (address flag, deprecated port flag, config field, default port)
    fn names(self) -> (&'static str, &'static str, &'static str, u16) {
        match self {
            Server::Healthz => (
                "healthz-bind-address",
                "healthz-port",
                "healthzBindAddress",
                HEALTHZ_PORT,
            ),
            Server::Metrics => (
                "metrics-bind-address",
                "metrics-port",
                "metricsBindAddress",
                METRICS_PORT,
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Value parsers
// ---------------------------------------------------------------------------------------

/// Parses `IP:port` (`10.0.0.1:10256`, `[::1]:10249`) as Go's `net.SplitHostPort` and
/// kube-proxy's validation do: the host must be an IP, the port 1-65535.
pub fn parse_ip_port(s: &str) -> Result<SocketAddr, String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, rest) = rest.split_once(']').ok_or("missing ']' in address")?;
        let port = rest.strip_prefix(':').ok_or("missing port in address")?;
        (host, port)
    } else {
        let (host, port) = s.rsplit_once(':').ok_or("missing port in address")?;
        if host.contains(':') {
            return Err("too many colons in address (write IPv6 as [addr]:port)".into());
        }
        (host, port)
    };
    let ip = parse_ip(host).ok_or_else(|| format!("{host:?} must be a valid IP"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{port:?} must be a valid port"))?;
    Ok(SocketAddr::new(ip, port))
}

/// `logging.flushFrequency`: a Go duration, or a number of nanoseconds.
fn parse_flush_frequency(s: &str) -> Result<Duration, String> {
    if let Ok(ns) = s.parse::<u64>() {
        return Ok(Duration::from_nanos(ns));
    }
    parse_go_duration(s).map_err(|e| e.to_string())
}

/// Whether a Kubernetes quantity is zero (`0`, `"0"`, `0Ki`, `0.0`).
fn is_zero_quantity(s: &str) -> bool {
    let digits = s.trim().trim_end_matches(|c: char| c.is_ascii_alphabetic());
    digits.is_empty() || digits.parse::<f64>().is_ok_and(|v| v == 0.0)
}

/// Why a Go duration does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not a duration at all.
    #[error("invalid duration {0:?} (examples: 30s, 1m0s, 1h30m, 300ms, 1.5h)")]
    Invalid(String),
    /// A number without a unit (only `0` may omit it).
    #[error("missing unit in duration {0:?} (use ns, us, ms, s, m or h, e.g. \"30s\")")]
    MissingUnit(String),
    /// An unknown unit.
    #[error("unknown unit {unit:?} in duration {input:?} (use ns, us, ms, s, m or h)")]
    UnknownUnit { unit: String, input: String },
    /// Longer than Go's limit (about 292 years).
    #[error("duration {0:?} is out of range")]
    Overflow(String),
    /// Negative durations are never valid for kube-proxy settings.
    #[error("duration {0:?} is negative; it must be greater than or equal to 0")]
    Negative(String),
}

/// Parses a Go duration (`time.ParseDuration`): `30s`, `1m0s`, `1h0m0s`, `300ms`, `1.5h`,
/// `2h45m`, `1µs`, `0`. Negative values are refused (no kube-proxy setting allows them).
///
/// ```
/// use kproxy::config::parse_go_duration;
/// use std::time::Duration;
/// assert_eq!(parse_go_duration("1m30s"), Ok(Duration::from_secs(90)));
/// assert_eq!(parse_go_duration("1.5h"), Ok(Duration::from_secs(5400)));
/// assert!(parse_go_duration("30").is_err());
/// ```
pub fn parse_go_duration(s: &str) -> Result<Duration, DurationError> {
    let invalid = || DurationError::Invalid(s.to_owned());
    let overflow = || DurationError::Overflow(s.to_owned());
    let (negative, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(invalid());
    }
    let digits = |t: &str| t.bytes().take_while(u8::is_ascii_digit).count();
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = digits(rest);
        let (int_part, after_int) = rest.split_at(int_len);
        let (frac_part, after_num) = match after_int.strip_prefix('.') {
            Some(after_dot) => after_dot.split_at(digits(after_dot)),
            None => ("", after_int),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(invalid());
        }
        let unit_len = after_num
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(after_num.len());
        let (unit, after_unit) = after_num.split_at(unit_len);
        let unit_ns: u128 = match unit {
            "" => return Err(DurationError::MissingUnit(s.to_owned())),
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => {
                return Err(DurationError::UnknownUnit {
                    unit: unit.to_owned(),
                    input: s.to_owned(),
                })
            }
        };
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| overflow())?
        };
        let mut value = int.checked_mul(unit_ns).ok_or_else(overflow)?;
        // Go keeps the fraction's leading digits and truncates the rest.
        let (mut frac, mut scale) = (0u128, 1u128);
        for d in frac_part.bytes().take(18) {
            frac = frac * 10 + u128::from(d - b'0');
            scale *= 10;
        }
        value += frac * unit_ns / scale;
        total = total.checked_add(value).ok_or_else(overflow)?;
        rest = after_unit;
    }
    if total > i64::MAX as u128 {
        return Err(overflow());
    }
    if negative && total != 0 {
        return Err(DurationError::Negative(s.to_owned()));
    }
    u64::try_from(total)
        .map(Duration::from_nanos)
        .map_err(|_| overflow())
}

/// Formats a duration as Go's `Duration.String` does: `0s`, `300ms`, `1.5s`, `1m30s`,
/// `1h0m0s`.
pub fn format_go_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".into();
    }
    let with_fraction = |whole: u128, frac: u128, frac_digits: usize, unit: &str| {
        let mut s = whole.to_string();
        if frac > 0 {
            let f = format!("{frac:0frac_digits$}");
            s.push('.');
            s.push_str(f.trim_end_matches('0'));
        }
        s.push_str(unit);
        s
    };
    if ns < 1_000 {
        return format!("{ns}ns");
    }
    if ns < 1_000_000 {
        return with_fraction(ns / 1_000, ns % 1_000, 3, "\u{b5}s");
    }
    if ns < 1_000_000_000 {
        return with_fraction(ns / 1_000_000, ns % 1_000_000, 6, "ms");
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let sec = with_fraction(u128::from(s), u128::from(d.subsec_nanos()), 9, "s");
    match (h, m) {
        (0, 0) => sec,
        (0, m) => format!("{m}m{sec}"),
        (h, m) => format!("{h}h{m}m{sec}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let ok = [
            ("0", 0),
            ("0s", 0),
            ("+5s", 5_000_000_000),
            ("30s", 30_000_000_000),
            ("1m0s", 60_000_000_000),
            ("1h0m0s", 3_600_000_000_000),
            ("15m0s", 900_000_000_000),
            ("24h0m0s", 86_400_000_000_000),
            ("300ms", 300_000_000),
            ("1.5h", 5_400_000_000_000),
            ("2h45m", 9_900_000_000_000),
            (".5s", 500_000_000),
            ("5.s", 5_000_000_000),
            ("1.0000000001s", 1_000_000_000),
            ("1µs", 1_000),
            ("1μs", 1_000),
            ("3us", 3_000),
            ("7ns", 7),
            ("1h1m1s1ms1us1ns", 3_661_001_001_001),
            ("-0", 0),
            ("-0s", 0),
        ];
        for (text, ns) in ok {
            assert_eq!(
                parse_go_duration(text),
                Ok(Duration::from_nanos(ns)),
                "{text}"
            );
        }
        let err = |t: &str| parse_go_duration(t).expect_err(t);
        assert_eq!(err("30"), DurationError::MissingUnit("30".into()));
        assert!(matches!(err("5x"), DurationError::UnknownUnit { .. }));
        assert!(matches!(err("1d"), DurationError::UnknownUnit { .. }));
        assert_eq!(err(""), DurationError::Invalid(String::new()));
        assert_eq!(err("s"), DurationError::Invalid("s".into()));
        assert_eq!(err("."), DurationError::Invalid(".".into()));
        assert_eq!(err("-"), DurationError::Invalid("-".into()));
        assert_eq!(
            err("1s "),
            DurationError::UnknownUnit {
                unit: "s ".into(),
                input: "1s ".into()
            }
        );
        assert_eq!(err("-1s"), DurationError::Negative("-1s".into()));
        assert_eq!(
            err("9999999999999h"),
            DurationError::Overflow("9999999999999h".into())
        );
        assert_eq!(
            err("99999999999999999999999999999999999999999s"),
            DurationError::Overflow("99999999999999999999999999999999999999999s".into())
        );
    }

    #[test]
    fn go_duration_strings() {
        let cases = [
            (0, "0s"),
            (7, "7ns"),
            (1_500, "1.5\u{b5}s"),
            (300_000_000, "300ms"),
            (1_500_000_000, "1.5s"),
            (30_000_000_000, "30s"),
            (90_000_000_000, "1m30s"),
            (3_600_000_000_000, "1h0m0s"),
            (86_400_000_000_000, "24h0m0s"),
        ];
        for (ns, text) in cases {
            let d = Duration::from_nanos(ns);
            assert_eq!(format_go_duration(d), text);
            assert_eq!(parse_go_duration(text), Ok(d), "{text} round-trips");
        }
    }

    #[test]
    fn ip_ports() {
        assert_eq!(
            parse_ip_port("0.0.0.0:10256"),
            Ok("0.0.0.0:10256".parse().expect("addr"))
        );
        assert_eq!(
            parse_ip_port("[::]:10256"),
            Ok("[::]:10256".parse().expect("addr"))
        );
        assert_eq!(
            parse_ip_port("127.000.0.1:1"),
            Ok("127.0.0.1:1".parse().expect("addr"))
        );
        for bad in [
            "",
            ":10256",
            "0.0.0.0",
            "::1:80",
            "[::1]",
            "[::1]80",
            "a:1",
            "1.2.3.4:0",
            "1.2.3.4:70000",
        ] {
            assert!(parse_ip_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_paths() {
        let text = "a: 1\nb:\n  c: 2\n  d:\n  - e: 3\n    f: 4\n  # g: 5\n  h: [1]\nurl: http://x\n- fd00::/8\n";
        let at = |line| key_path_at(text, line);
        assert_eq!(at(1).as_deref(), Some("a"));
        assert_eq!(at(3).as_deref(), Some("b.c"));
        assert_eq!(at(5).as_deref(), Some("b.d.e"));
        assert_eq!(at(6).as_deref(), Some("b.d.f"));
        assert_eq!(at(7), None);
        assert_eq!(at(8).as_deref(), Some("b.h"));
        assert_eq!(at(9).as_deref(), Some("url"));
        assert_eq!(at(10), None);
        assert_eq!(at(11), None);
        assert_eq!(at(0), None);
    }

    #[test]
    fn zero_quantities() {
        for z in ["", "0", "0Ki", "0.0", " 0 "] {
            assert!(is_zero_quantity(z), "{z}");
        }
        for nz in ["1", "4Ki", "x1"] {
            assert!(!is_zero_quantity(nz), "{nz}");
        }
        assert_eq!(
            parse_flush_frequency("5000000000"),
            Ok(Duration::from_secs(5))
        );
        assert_eq!(parse_flush_frequency("5s"), Ok(Duration::from_secs(5)));
    }
}
