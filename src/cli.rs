//! Command-line flags: kube-proxy's names, so an existing DaemonSet only changes its
//! image, plus kproxy's own `--manifests`, `--once` and `--dry-run`.

use clap::{ArgAction, Parser, ValueEnum};
use std::path::PathBuf;

/// The kernel backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProxyMode {
    Nftables,
    Ipvs,
}

/// kproxy: a drop-in replacement for kube-proxy.
#[derive(Debug, Clone, Parser)]
#[command(name = "kproxy", version, about)]
pub struct Flags {
    /// Which proxy mode to use: nftables or ipvs.
    #[arg(
        long = "proxy-mode",
        visible_alias = "mode",
        value_enum,
        default_value = "nftables"
    )]
    pub proxy_mode: ProxyMode,

    /// The name of this node, if not the host name.
    #[arg(long = "hostname-override")]
    pub hostname_override: Option<String>,

    /// Pod CIDRs (comma-separated, one per family): traffic from outside them is
    /// masqueraded when it goes to a ClusterIP.
    #[arg(long = "cluster-cidr", value_delimiter = ',')]
    pub cluster_cidr: Vec<String>,

    /// Addresses that accept NodePort traffic: `primary` (the node's primary IPs, the
    /// default) or CIDRs (comma-separated); `0.0.0.0/0` / `::/0` mean every address.
    #[arg(long = "nodeport-addresses", value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,

    /// Masquerade all traffic sent to ClusterIPs.
    #[arg(long = "masquerade-all", action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", default_value = "false")]
    pub masquerade_all: bool,

    /// Read Services, EndpointSlices, Nodes and ServiceCIDRs from this YAML/JSON file or
    /// directory instead of an API server. Without --once the path is watched.
    #[arg(long)]
    pub manifests: Option<PathBuf>,

    /// Sync once and exit: 0 on success, non-zero with a message on failure.
    #[arg(long)]
    pub once: bool,

    /// Print what would be sent to the kernel and change nothing (needs no privilege).
    #[arg(long = "dry-run")]
    pub dry_run: bool,

    /// Remove kproxy's kernel objects and exit.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", default_value = "false")]
    pub cleanup: bool,

    /// Log verbosity (kube-proxy's -v): 0-1 info, 2-4 debug, 5+ trace.
    #[arg(short = 'v', long = "v", default_value_t = 0)]
    pub verbosity: u8,
}

/// Go's flag package also accepts long flags with a single dash (`-proxy-mode=ipvs`);
/// DaemonSets written for kube-proxy may use them, so rewrite them to clap's `--` form.
pub fn normalise_go_flags<I: IntoIterator<Item = String>>(args: I) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest_are_values = false;
    for (i, a) in args.into_iter().enumerate() {
        if i == 0 || rest_are_values {
            out.push(a);
            continue;
        }
        if a == "--" {
            rest_are_values = true;
            out.push(a);
            continue;
        }
        let name_len = a[1..].split('=').next().map_or(0, str::len);
        if a.starts_with('-') && !a.starts_with("--") && name_len > 1 && !a[1..].starts_with('v') {
            out.push(format!("-{a}"));
        } else {
            out.push(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Flags {
        let argv = normalise_go_flags(
            std::iter::once("kproxy")
                .chain(args.iter().copied())
                .map(String::from),
        );
        Flags::try_parse_from(argv).expect("parses")
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
}
