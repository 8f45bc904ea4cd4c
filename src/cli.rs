//! Command-line flags: every kube-proxy flag by its real name, so an existing kube-proxy
//! DaemonSet only changes its image, plus kproxy's own `--manifests`, `--once` and
//! `--dry-run`.
//!
//! This module only parses: values are checked for their shape (a Go duration, a Go
//! boolean, an IP) and kept as given. Whether kproxy supports a setting, and how flags
//! combine with the `--config` file, is decided in [`crate::config`], which turns
//! [`Flags`] into the [`Settings`](crate::config::Settings) the daemon runs on. Flags are
//! `Option`s (or empty `Vec`s) when kube-proxy has no flag-level default, so "not given"
//! stays distinguishable from "given".
//!
//! Go's flag syntax is accepted: `-flag` as well as `--flag`, `--flag value` and
//! `--flag=value`, `_` for `-` in names, and booleans as `--flag`, `--flag=true|false`
//! (also `1`, `t`, `F`, `TRUE`, … as Go's `strconv.ParseBool`). As in Go, a boolean's
//! value must be attached with `=`: `--masquerade-all false` is an error, not "false".

use clap::{ArgAction, CommandFactory, Parser};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// The kernel backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyMode {
    /// One private nftables table per IP family.
    Nftables,
    /// IPVS virtual servers plus a small private nftables table.
    Ipvs,
}

impl ProxyMode {
    /// The name used by `--proxy-mode` and the config file's `mode`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Nftables => "nftables",
            ProxyMode::Ipvs => "ipvs",
        }
    }
}

impl fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a kube-proxy mode name is not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ModeError {
    /// kube-proxy's iptables mode (its default on Linux).
    #[error(
        "kproxy has no iptables mode; use nftables, which serves the same Services \
         (kube-proxy's own successor to iptables mode)"
    )]
    Iptables,
    /// kube-proxy's Windows mode.
    #[error(
        "kernelspace is kube-proxy's Windows mode; kproxy runs on Linux: use nftables or ipvs"
    )]
    Kernelspace,
    /// Removed from kube-proxy in v1.26.
    #[error("the userspace mode was removed from kube-proxy in v1.26; use nftables")]
    Userspace,
    /// Not a kube-proxy mode at all.
    #[error("unknown proxy mode: must be nftables or ipvs (empty means kube-proxy's default)")]
    Unknown,
}

impl ModeError {
    /// True for modes kube-proxy has but kproxy does not (as opposed to a typo).
    pub fn is_unsupported(self) -> bool {
        self != ModeError::Unknown
    }
}

/// Parses a kube-proxy mode name exactly as kube-proxy spells it. `Ok(None)` is the empty
/// string: kube-proxy's "default mode" (iptables on Linux), which kproxy runs as nftables.
pub fn parse_mode(s: &str) -> Result<Option<ProxyMode>, ModeError> {
    match s {
        "" => Ok(None),
        "nftables" => Ok(Some(ProxyMode::Nftables)),
        "ipvs" => Ok(Some(ProxyMode::Ipvs)),
        "iptables" => Err(ModeError::Iptables),
        "kernelspace" => Err(ModeError::Kernelspace),
        "userspace" => Err(ModeError::Userspace),
        _ => Err(ModeError::Unknown),
    }
}

impl FromStr for ProxyMode {
    type Err = ModeError;

    /// Like [`parse_mode`], with the empty string read as kproxy's default, nftables.
    fn from_str(s: &str) -> Result<Self, ModeError> {
        parse_mode(s).map(|m| m.unwrap_or(ProxyMode::Nftables))
    }
}

/// Go's `strconv.ParseBool`, which kube-proxy's boolean flags use.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (use true or false)")),
    }
}

fn proxy_mode_arg(s: &str) -> Result<ProxyMode, String> {
    s.parse().map_err(|e: ModeError| e.to_string())
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    crate::config::parse_go_duration(s).map_err(|e| e.to_string())
}

/// kube-proxy's `IPVar`: an IP address; empty leaves the default.
fn ip_arg(s: &str) -> Result<String, String> {
    if s.is_empty() || crate::ip::parse_ip(s).is_some() {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not a valid IP address"))
    }
}

/// kube-proxy's `IPPortVar`: `IP` or `IP:port`; empty leaves the default.
fn ip_port_arg(s: &str) -> Result<String, String> {
    if s.is_empty() || crate::ip::parse_ip(s).is_some() {
        return Ok(s.to_owned());
    }
    crate::config::parse_ip_port(s)
        .map(|_| s.to_owned())
        .map_err(|e| format!("{s:?} is not in a valid format (ip or ip:port): {e}"))
}

/// kproxy: a drop-in replacement for kube-proxy.
///
/// Flags and the `--config` file use kube-proxy's names and semantics; see the README (section "Flags and configuration") for
/// which kube-proxy settings kproxy supports, warns about, or refuses.
#[derive(Debug, Clone, Parser)]
#[command(name = "kproxy", version, about, max_term_width = 100)]
pub struct Flags {
    // --- Where the configuration comes from -------------------------------------------
    /// The path to the configuration file (KubeProxyConfiguration v1alpha1, as in kube-proxy's
    /// ConfigMap). Flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// kube-proxy: write the default configuration to this file and exit. Refused by kproxy.
    #[arg(long = "write-config-to", value_name = "FILE")]
    pub write_config_to: Option<PathBuf>,

    /// Path to a kubeconfig file with authorization information (in-cluster config if unset).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// The address of the Kubernetes API server (overrides any value in kubeconfig).
    #[arg(long, value_name = "URL")]
    pub master: Option<String>,

    /// kube-proxy: content type of requests sent to the API server (kproxy uses JSON).
    #[arg(long = "kube-api-content-type", value_name = "TYPE")]
    pub kube_api_content_type: Option<String>,

    /// kube-proxy: client-side burst limit towards the API server (not applied by kproxy).
    #[arg(
        long = "kube-api-burst",
        value_name = "N",
        allow_negative_numbers = true
    )]
    pub kube_api_burst: Option<i32>,

    /// kube-proxy: client-side QPS limit towards the API server (not applied by kproxy).
    #[arg(
        long = "kube-api-qps",
        value_name = "QPS",
        allow_negative_numbers = true
    )]
    pub kube_api_qps: Option<f32>,

    // --- Identity and addresses -------------------------------------------------------
    /// The name of this node, if not the host name.
    #[arg(long = "hostname-override", value_name = "NAME")]
    pub hostname_override: Option<String>,

    /// kube-proxy: overrides the node's primary IP. kproxy takes it from the Node object.
    #[arg(long = "bind-address", value_name = "IP", value_parser = ip_arg)]
    pub bind_address: Option<String>,

    /// The IP address (and port) of the /healthz and /livez server [default: 0.0.0.0:10256].
    #[arg(long = "healthz-bind-address", value_name = "IP[:PORT]", value_parser = ip_port_arg)]
    pub healthz_bind_address: Option<String>,

    /// The IP address (and port) of the /metrics server [default: 127.0.0.1:10249].
    #[arg(long = "metrics-bind-address", value_name = "IP[:PORT]", value_parser = ip_port_arg)]
    pub metrics_bind_address: Option<String>,

    /// Deprecated kube-proxy flag: the health server's port when --healthz-bind-address has none.
    #[arg(
        long = "healthz-port",
        value_name = "PORT",
        hide = true,
        allow_negative_numbers = true
    )]
    pub healthz_port: Option<i32>,

    /// Deprecated kube-proxy flag: the metrics server's port when --metrics-bind-address has none.
    #[arg(
        long = "metrics-port",
        value_name = "PORT",
        hide = true,
        allow_negative_numbers = true
    )]
    pub metrics_port: Option<i32>,

    /// kube-proxy: exit when a port cannot be bound (not configurable in kproxy).
    #[arg(long = "bind-address-hard-fail", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub bind_address_hard_fail: Option<bool>,

    // --- Proxy mode and rules ---------------------------------------------------------
    /// Which proxy mode to use: nftables or ipvs. kube-proxy's iptables mode is refused.
    #[arg(long = "proxy-mode", visible_alias = "mode", value_name = "MODE",
          default_value = "nftables", value_parser = proxy_mode_arg)]
    pub proxy_mode: ProxyMode,

    /// Pod CIDRs (comma-separated, one per family): traffic from outside them is
    /// masqueraded when it goes to a ClusterIP.
    #[arg(long = "cluster-cidr", value_name = "CIDRS", value_delimiter = ',')]
    pub cluster_cidr: Vec<String>,

    /// Addresses that accept NodePort traffic: `primary` (the node's primary IPs, the
    /// nftables default), `all`, or CIDRs (comma-separated).
    #[arg(
        long = "nodeport-addresses",
        value_name = "LIST",
        value_delimiter = ','
    )]
    pub nodeport_addresses: Vec<String>,

    /// Masquerade all traffic sent to ClusterIPs.
    #[arg(long = "masquerade-all", value_name = "BOOL", action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", default_value = "false",
          value_parser = parse_go_bool)]
    pub masquerade_all: bool,

    /// How to tell pod traffic apart: ClusterCIDR (the only mode kproxy supports).
    #[arg(long = "detect-local-mode", value_name = "MODE")]
    pub detect_local_mode: Option<String>,

    /// kube-proxy: the pod bridge for --detect-local-mode=BridgeInterface (refused mode).
    #[arg(long = "pod-bridge-interface", value_name = "NAME")]
    pub pod_bridge_interface: Option<String>,

    /// kube-proxy: the pod interface prefix for --detect-local-mode=InterfaceNamePrefix
    /// (refused mode).
    #[arg(long = "pod-interface-name-prefix", value_name = "PREFIX")]
    pub pod_interface_name_prefix: Option<String>,

    /// The fwmark bit for packets to masquerade, 0-31. kproxy always uses 14.
    #[arg(
        long = "iptables-masquerade-bit",
        value_name = "BIT",
        allow_negative_numbers = true
    )]
    pub iptables_masquerade_bit: Option<i32>,

    /// kube-proxy: localhost NodePorts in iptables mode (kproxy never serves them).
    #[arg(long = "iptables-localhost-nodeports", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub iptables_localhost_nodeports: Option<bool>,

    /// Resync/retry period in nftables mode (kube-proxy's name for it) [default: 30s].
    #[arg(long = "iptables-sync-period", value_name = "DURATION", value_parser = duration_arg)]
    pub iptables_sync_period: Option<Duration>,

    /// Minimum period between syncs in nftables mode [default: 1s].
    #[arg(long = "iptables-min-sync-period", value_name = "DURATION", value_parser = duration_arg)]
    pub iptables_min_sync_period: Option<Duration>,

    /// Resync/retry period in ipvs mode [default: 30s].
    #[arg(long = "ipvs-sync-period", value_name = "DURATION", value_parser = duration_arg)]
    pub ipvs_sync_period: Option<Duration>,

    /// Minimum period between syncs in ipvs mode [default: 0s].
    #[arg(long = "ipvs-min-sync-period", value_name = "DURATION", value_parser = duration_arg)]
    pub ipvs_min_sync_period: Option<Duration>,

    /// The IPVS scheduler [default: rr].
    #[arg(long = "ipvs-scheduler", value_name = "NAME")]
    pub ipvs_scheduler: Option<String>,

    /// CIDRs (comma-separated) whose IPVS virtual servers kproxy must not remove.
    #[arg(
        long = "ipvs-exclude-cidrs",
        value_name = "CIDRS",
        value_delimiter = ','
    )]
    pub ipvs_exclude_cidrs: Vec<String>,

    /// Set arp_ignore=1 and arp_announce=2 (IPVS).
    #[arg(long = "ipvs-strict-arp", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub ipvs_strict_arp: Option<bool>,

    /// Idle timeout of IPVS TCP connections, 0 to leave as-is.
    #[arg(long = "ipvs-tcp-timeout", value_name = "DURATION", value_parser = duration_arg)]
    pub ipvs_tcp_timeout: Option<Duration>,

    /// Timeout of IPVS TCP connections after a FIN, 0 to leave as-is.
    #[arg(long = "ipvs-tcpfin-timeout", value_name = "DURATION", value_parser = duration_arg)]
    pub ipvs_tcpfin_timeout: Option<Duration>,

    /// Timeout of IPVS UDP packets, 0 to leave as-is.
    #[arg(long = "ipvs-udp-timeout", value_name = "DURATION", value_parser = duration_arg)]
    pub ipvs_udp_timeout: Option<Duration>,

    /// How often the informers resync from the API server [default: 15m].
    #[arg(long = "config-sync-period", value_name = "DURATION", value_parser = duration_arg)]
    pub config_sync_period: Option<Duration>,

    // --- Host settings kube-proxy applies and kproxy does not --------------------------
    /// kube-proxy: nf_conntrack_max per CPU core (kproxy does not set conntrack sysctls).
    #[arg(
        long = "conntrack-max-per-core",
        value_name = "N",
        allow_negative_numbers = true
    )]
    pub conntrack_max_per_core: Option<i32>,

    /// kube-proxy: minimum nf_conntrack_max (kproxy does not set conntrack sysctls).
    #[arg(
        long = "conntrack-min",
        value_name = "N",
        allow_negative_numbers = true
    )]
    pub conntrack_min: Option<i32>,

    /// kube-proxy: nf_conntrack_tcp_timeout_established (not set by kproxy).
    #[arg(long = "conntrack-tcp-timeout-established", value_name = "DURATION",
          value_parser = duration_arg)]
    pub conntrack_tcp_timeout_established: Option<Duration>,

    /// kube-proxy: nf_conntrack_tcp_timeout_close_wait (not set by kproxy).
    #[arg(long = "conntrack-tcp-timeout-close-wait", value_name = "DURATION",
          value_parser = duration_arg)]
    pub conntrack_tcp_timeout_close_wait: Option<Duration>,

    /// kube-proxy: nf_conntrack_tcp_be_liberal (not set by kproxy).
    #[arg(long = "conntrack-tcp-be-liberal", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub conntrack_tcp_be_liberal: Option<bool>,

    /// kube-proxy: nf_conntrack_udp_timeout (not set by kproxy).
    #[arg(long = "conntrack-udp-timeout", value_name = "DURATION", value_parser = duration_arg)]
    pub conntrack_udp_timeout: Option<Duration>,

    /// kube-proxy: nf_conntrack_udp_timeout_stream (not set by kproxy).
    #[arg(long = "conntrack-udp-timeout-stream", value_name = "DURATION",
          value_parser = duration_arg)]
    pub conntrack_udp_timeout_stream: Option<Duration>,

    /// kube-proxy: the process's oom_score_adj, -1000..1000 (not set by kproxy).
    #[arg(
        long = "oom-score-adj",
        value_name = "N",
        allow_negative_numbers = true
    )]
    pub oom_score_adj: Option<i32>,

    /// kube-proxy: feature gates, key=bool pairs (kproxy has none; each is warned about).
    #[arg(long = "feature-gates", value_name = "K=V,...", value_delimiter = ',')]
    pub feature_gates: Vec<String>,

    /// kube-proxy: pprof handlers on the metrics server (kproxy has none).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub profiling: Option<bool>,

    /// kube-proxy: show metrics hidden in this older version (kproxy hides none).
    #[arg(long = "show-hidden-metrics-for-version", value_name = "VERSION")]
    pub show_hidden_metrics_for_version: Option<String>,

    /// kube-proxy/cAdvisor: boot ID files (not used by kproxy).
    #[arg(long = "boot-id-file", value_name = "FILES", hide = true)]
    pub boot_id_file: Option<String>,

    /// kube-proxy/cAdvisor: machine ID files (not used by kproxy).
    #[arg(long = "machine-id-file", value_name = "FILES", hide = true)]
    pub machine_id_file: Option<String>,

    // --- Logging ----------------------------------------------------------------------
    /// Log verbosity (kube-proxy's -v): 0-1 info, 2-4 debug, 5+ trace.
    #[arg(short = 'v', long = "v", value_name = "LEVEL", default_value_t = 0)]
    pub verbosity: u8,

    /// kube-proxy: log format, text or json (kproxy writes text).
    #[arg(long = "logging-format", value_name = "FORMAT")]
    pub logging_format: Option<String>,

    /// kube-proxy: maximum seconds between log flushes (kproxy does not buffer logs).
    #[arg(long = "log-flush-frequency", value_name = "DURATION", value_parser = duration_arg)]
    pub log_flush_frequency: Option<Duration>,

    /// kube-proxy: per-file verbosity, pattern=N (not supported by kproxy).
    #[arg(long, value_name = "PATTERN=N,...", value_delimiter = ',')]
    pub vmodule: Vec<String>,

    /// kube-proxy (alpha): split JSON logs into stdout and stderr (not supported).
    #[arg(long = "log-json-split-stream", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = parse_go_bool,
          hide = true)]
    pub log_json_split_stream: Option<bool>,

    /// kube-proxy (alpha): info buffer size for split JSON logs (not supported).
    #[arg(
        long = "log-json-info-buffer-size",
        value_name = "QUANTITY",
        hide = true
    )]
    pub log_json_info_buffer_size: Option<String>,

    /// kube-proxy (alpha): split text logs into stdout and stderr (not supported).
    #[arg(long = "log-text-split-stream", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = parse_go_bool,
          hide = true)]
    pub log_text_split_stream: Option<bool>,

    /// kube-proxy (alpha): info buffer size for split text logs (not supported).
    #[arg(
        long = "log-text-info-buffer-size",
        value_name = "QUANTITY",
        hide = true
    )]
    pub log_text_info_buffer_size: Option<String>,

    // --- One-shot modes and kproxy's own flags ----------------------------------------
    /// Remove kproxy's kernel objects and exit.
    #[arg(long, value_name = "BOOL", action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", default_value = "false",
          value_parser = parse_go_bool)]
    pub cleanup: bool,

    /// Perform privileged initialisation and exit. kproxy needs none, so it only checks
    /// the configuration.
    #[arg(long = "init-only", value_name = "BOOL", action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", default_value = "false",
          value_parser = parse_go_bool)]
    pub init_only: bool,

    /// Read Services, EndpointSlices, Nodes and ServiceCIDRs from this YAML/JSON file or
    /// directory instead of an API server. Without --once the path is watched.
    #[arg(long, value_name = "PATH")]
    pub manifests: Option<PathBuf>,

    /// Sync once and exit: 0 on success, non-zero with a message on failure.
    #[arg(long, value_name = "BOOL", action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", default_value = "false",
          value_parser = parse_go_bool)]
    pub once: bool,

    /// Print what would be sent to the kernel and change nothing (needs no privilege).
    #[arg(long = "dry-run", value_name = "BOOL", action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", default_value = "false",
          value_parser = parse_go_bool)]
    pub dry_run: bool,
}

/// Rewrites Go-style arguments into the form clap parses, so a DaemonSet written for
/// kube-proxy works unchanged:
///
/// - `-proxy-mode=ipvs` (Go's single-dash long flags) becomes `--proxy-mode=ipvs`;
/// - `--hostname_override` becomes `--hostname-override` (kube-proxy normalises `_`);
/// - `-v`, `-v4`, `-v=4` and `-h` stay short flags;
/// - the value of a flag given as a separate argument (`--oom-score-adj -999`,
///   `--hostname-override -x`) and everything after `--` are left alone.
///
/// The first argument is the program name and is kept as is.
///
/// ```
/// use kproxy::cli::normalise_go_flags;
/// let argv = ["kube-proxy", "-proxy-mode=nftables", "-v", "2", "--oom-score-adj", "-999"];
/// assert_eq!(
///     normalise_go_flags(argv.map(String::from)),
///     ["kube-proxy", "--proxy-mode=nftables", "-v", "2", "--oom-score-adj", "-999"],
/// );
/// ```
pub fn normalise_go_flags<I: IntoIterator<Item = String>>(args: I) -> Vec<String> {
    let mut cmd = Flags::command();
    cmd.build();
    let mut out = Vec::new();
    let mut next_is_value = false;
    let mut rest_are_values = false;
    for (i, a) in args.into_iter().enumerate() {
        if i == 0 || rest_are_values || next_is_value {
            next_is_value = false;
            out.push(a);
            continue;
        }
        if a == "--" {
            rest_are_values = true;
            out.push(a);
            continue;
        }
        let a = normalise_one(a);
        next_is_value = takes_separate_value(&cmd, &a);
        out.push(a);
    }
    out
}

/// Normalises one argument that is not known to be a value.
fn normalise_one(a: String) -> String {
    let Some(body) = a.strip_prefix('-') else {
        return a;
    };
    let (single_dash, name_value) = match body.strip_prefix('-') {
        Some(rest) => (false, rest),
        None => (true, body),
    };
    let (name, value) = match name_value.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (name_value, None),
    };
    let starts_with_digit = name.bytes().next().is_some_and(|b| b.is_ascii_digit());
    if name.is_empty() || starts_with_digit {
        // `-`, `--=x` or a negative number: not a flag name.
        return a;
    }
    if single_dash && (name.chars().count() == 1 || is_attached_verbosity(name)) {
        return a;
    }
    let name = name.replace('_', "-");
    match value {
        Some(v) => format!("--{name}={v}"),
        None => format!("--{name}"),
    }
}

/// `-v4`: the short verbosity flag with its value attached.
fn is_attached_verbosity(name: &str) -> bool {
    name.strip_prefix('v')
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `a` is a flag without an attached value whose value is the next argument.
fn takes_separate_value(cmd: &clap::Command, a: &str) -> bool {
    let arg = if let Some(long) = a.strip_prefix("--") {
        if long.contains('=') {
            return false;
        }
        cmd.get_arguments().find(|arg| {
            arg.get_long() == Some(long)
                || arg
                    .get_all_aliases()
                    .is_some_and(|aliases| aliases.contains(&long))
        })
    } else if let Some(short) = a.strip_prefix('-') {
        let mut chars = short.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) => cmd.get_arguments().find(|arg| arg.get_short() == Some(c)),
            _ => None,
        }
    } else {
        None
    };
    arg.is_some_and(|arg| {
        !arg.is_require_equals_set()
            && arg
                .get_num_args()
                .is_some_and(|n| n.min_values() > 0 && n.takes_values())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Flags {
        try_parse(args).expect("parses")
    }

    fn try_parse(args: &[&str]) -> Result<Flags, clap::Error> {
        let argv = normalise_go_flags(
            std::iter::once("kproxy")
                .chain(args.iter().copied())
                .map(String::from),
        );
        Flags::try_parse_from(argv)
    }

    #[test]
    fn kube_proxy_flag_spellings() {
        let f = parse(&[
            "--proxy-mode=nftables",
            "--masquerade-all",
            "--v=4",
            "--cluster-cidr=10.0.0.0/8,fd00::/48",
        ]);
        assert_eq!(f.proxy_mode, ProxyMode::Nftables);
        assert!(f.masquerade_all);
        assert_eq!(f.verbosity, 4);
        assert_eq!(f.cluster_cidr, ["10.0.0.0/8", "fd00::/48"]);
        let f = parse(&["--mode", "ipvs", "--masquerade-all=false", "-v", "2"]);
        assert_eq!(f.proxy_mode, ProxyMode::Ipvs);
        assert!(!f.masquerade_all);
        assert_eq!(f.verbosity, 2);
        let f = parse(&[
            "-proxy-mode=nftables",
            "-hostname-override=node-a",
            "-nodeport-addresses",
            "primary",
        ]);
        assert_eq!(f.hostname_override.as_deref(), Some("node-a"));
        assert_eq!(f.nodeport_addresses, ["primary"]);
    }

    #[test]
    fn unknown_mode_is_refused() {
        let argv = ["kproxy", "--proxy-mode=userspace"].map(String::from);
        assert!(Flags::try_parse_from(argv).is_err());
    }

    #[test]
    fn iptables_mode_is_refused_with_a_hint() {
        let err = try_parse(&["--proxy-mode=iptables"]).expect_err("refused");
        let msg = err.to_string();
        assert!(msg.contains("--proxy-mode"), "{msg}");
        assert!(msg.contains("use nftables"), "{msg}");
    }

    #[test]
    fn empty_mode_is_kube_proxys_default() {
        assert_eq!(parse(&["--proxy-mode="]).proxy_mode, ProxyMode::Nftables);
        assert_eq!(parse_mode(""), Ok(None));
        assert_eq!(parse_mode("kernelspace"), Err(ModeError::Kernelspace));
        assert!(ModeError::Iptables.is_unsupported());
        assert!(!ModeError::Unknown.is_unsupported());
    }

    #[test]
    fn go_booleans() {
        for t in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_go_bool(t), Ok(true), "{t}");
        }
        for f in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_go_bool(f), Ok(false), "{f}");
        }
        assert!(parse_go_bool("yes").is_err());
        let f = parse(&[
            "--profiling",
            "--ipvs-strict-arp=T",
            "--cleanup=0",
            "--once",
        ]);
        assert_eq!(f.profiling, Some(true));
        assert_eq!(f.ipvs_strict_arp, Some(true));
        assert!(!f.cleanup);
        assert!(f.once);
        // As in Go, a separate word is not a boolean's value.
        assert!(try_parse(&["--masquerade-all", "false"]).is_err());
    }

    #[test]
    fn durations_and_numbers() {
        let f = parse(&[
            "--iptables-sync-period=1m0s",
            "--ipvs-min-sync-period",
            "300ms",
            "--oom-score-adj",
            "-999",
            "--conntrack-tcp-timeout-established=1.5h",
        ]);
        assert_eq!(f.iptables_sync_period, Some(Duration::from_secs(60)));
        assert_eq!(f.ipvs_min_sync_period, Some(Duration::from_millis(300)));
        assert_eq!(f.oom_score_adj, Some(-999));
        assert_eq!(
            f.conntrack_tcp_timeout_established,
            Some(Duration::from_secs(5400))
        );
        let err = try_parse(&["--iptables-sync-period=30"]).expect_err("no unit");
        assert!(err.to_string().contains("--iptables-sync-period"), "{err}");
    }

    #[test]
    fn addresses_are_checked_for_shape() {
        let f = parse(&[
            "--healthz-bind-address=0.0.0.0",
            "--metrics-bind-address=[::1]:10249",
            "--bind-address=10.0.0.1",
        ]);
        assert_eq!(f.healthz_bind_address.as_deref(), Some("0.0.0.0"));
        assert_eq!(f.metrics_bind_address.as_deref(), Some("[::1]:10249"));
        assert!(try_parse(&["--healthz-bind-address=localhost:10256"]).is_err());
        assert!(try_parse(&["--bind-address=node-a"]).is_err());
    }

    #[test]
    fn go_normalisation() {
        let n = |args: &[&str]| {
            normalise_go_flags(
                std::iter::once("kproxy")
                    .chain(args.iter().copied())
                    .map(String::from),
            )[1..]
                .to_vec()
        };
        assert_eq!(n(&["-v=3", "-v4", "-h"]), ["-v=3", "-v4", "-h"]);
        assert_eq!(n(&["-vmodule=proxier=4"]), ["--vmodule=proxier=4"]);
        assert_eq!(
            n(&["--hostname_override=a", "-masquerade_all"]),
            ["--hostname-override=a", "--masquerade-all"]
        );
        assert_eq!(
            n(&["--hostname-override", "-weird", "-master", "-x"]),
            ["--hostname-override", "-weird", "--master", "-x"]
        );
        assert_eq!(n(&["--", "-proxy-mode"]), ["--", "-proxy-mode"]);
        assert_eq!(n(&["", "-", "é", "-é"]), ["", "-", "é", "-é"]);
        assert_eq!(parse(&["-v=3"]).verbosity, 3);
        assert_eq!(parse(&["-v4"]).verbosity, 4);
    }

    #[test]
    fn every_kube_proxy_flag_is_known() {
        // The Linux flag set of kube-proxy (cmd/kube-proxy/app/options.go plus the logging
        // flags from component-base): none may be an "unknown argument".
        let with_values = [
            "config=/c",
            "write-config-to=/w",
            "kubeconfig=/k",
            "master=https://a:6443",
            "kube-api-content-type=application/json",
            "kube-api-burst=10",
            "kube-api-qps=5",
            "hostname-override=n",
            "bind-address=0.0.0.0",
            "healthz-bind-address=0.0.0.0:10256",
            "metrics-bind-address=127.0.0.1:10249",
            "healthz-port=10256",
            "metrics-port=10249",
            "proxy-mode=nftables",
            "cluster-cidr=10.0.0.0/8",
            "nodeport-addresses=primary",
            "detect-local-mode=ClusterCIDR",
            "pod-bridge-interface=cbr0",
            "pod-interface-name-prefix=veth",
            "iptables-masquerade-bit=14",
            "iptables-sync-period=30s",
            "iptables-min-sync-period=1s",
            "ipvs-sync-period=30s",
            "ipvs-min-sync-period=0s",
            "ipvs-scheduler=rr",
            "ipvs-exclude-cidrs=10.0.0.0/8",
            "ipvs-tcp-timeout=0s",
            "ipvs-tcpfin-timeout=0s",
            "ipvs-udp-timeout=0s",
            "config-sync-period=15m",
            "conntrack-max-per-core=32768",
            "conntrack-min=131072",
            "conntrack-tcp-timeout-established=24h",
            "conntrack-tcp-timeout-close-wait=1h",
            "conntrack-udp-timeout=30s",
            "conntrack-udp-timeout-stream=2m",
            "oom-score-adj=-999",
            "feature-gates=A=true",
            "show-hidden-metrics-for-version=1.33",
            "boot-id-file=/proc/sys/kernel/random/boot_id",
            "machine-id-file=/etc/machine-id",
            "v=2",
            "logging-format=text",
            "log-flush-frequency=5s",
            "vmodule=proxier=4",
            "log-json-info-buffer-size=0",
            "log-text-info-buffer-size=0",
            "manifests=/m",
        ];
        let booleans = [
            "bind-address-hard-fail",
            "masquerade-all",
            "iptables-localhost-nodeports",
            "ipvs-strict-arp",
            "conntrack-tcp-be-liberal",
            "profiling",
            "log-json-split-stream",
            "log-text-split-stream",
            "cleanup",
            "init-only",
            "once",
            "dry-run",
        ];
        for flag in with_values {
            let arg = format!("--{flag}");
            if let Err(e) = try_parse(&[arg.as_str()]) {
                panic!("{arg}: {e}");
            }
        }
        for flag in booleans {
            for arg in [format!("--{flag}"), format!("--{flag}=false")] {
                if let Err(e) = try_parse(&[arg.as_str()]) {
                    panic!("{arg}: {e}");
                }
            }
        }
    }
}
