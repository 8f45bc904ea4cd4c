//! `--config` files and flags resolved into `Settings`: kubeadm's real ConfigMap, flag
//! precedence, refusals and warnings that name the setting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kproxy::cli::ProxyMode;
use kproxy::config::{
    parse_go_duration, settings_from_args, ConfigError, DurationError, KubeProxyConfiguration,
    Origin, Settings,
};

/// `config.conf` from the `kube-proxy` ConfigMap of a kubeadm v1.34 cluster
/// (`kubectl -n kube-system get cm kube-proxy -o yaml`): kubeadm writes every field,
/// mostly zero values, with `mode: ""` and `nodePortAddresses: null`.
const KUBEADM_CONFIG: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 172.17.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

/// The container command of kubeadm's kube-proxy DaemonSet (after the kubelet expanded
/// `$(NODE_NAME)`).
const KUBEADM_COMMAND: [&str; 3] = [
    "/usr/local/bin/kube-proxy",
    "--config=/var/lib/kube-proxy/config.conf",
    "--hostname-override=Node-A",
];

/// A scratch directory per test, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kproxy-config-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write config");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn settings(args: &[&str]) -> Result<Settings, ConfigError> {
    settings_from_args(
        std::iter::once("kproxy")
            .chain(args.iter().copied())
            .map(String::from),
    )
}

/// Settings from a config file (written to a scratch dir) plus flags.
fn with_config(text: &str, args: &[&str]) -> Result<Settings, ConfigError> {
    let scratch = Scratch::new();
    let path = scratch.file("config.conf", text);
    let config = format!("--config={}", path.display());
    let mut all = vec![config.as_str()];
    all.extend_from_slice(args);
    settings(&all)
}

/// A minimal config with extra lines.
fn config(extra: &str) -> String {
    format!("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n{extra}")
}

fn line_of(text: &str, needle: &str) -> u64 {
    let index = text
        .lines()
        .position(|l| l.starts_with(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in the fixture"));
    index as u64 + 1
}

fn origin_line(origin: &Origin) -> Option<u64> {
    match origin {
        Origin::File { line, .. } => *line,
        Origin::Flag(_) => None,
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

#[track_caller]
fn assert_warns(s: &Settings, needles: &[&str]) {
    let found = s
        .warnings
        .iter()
        .any(|w| needles.iter().all(|n| w.contains(n)));
    assert!(found, "no warning with {needles:?} in {:#?}", s.warnings);
}

#[test]
fn kubeadm_default_config_map_and_command() {
    let scratch = Scratch::new();
    let path = scratch.file("config.conf", KUBEADM_CONFIG);
    let mut argv: Vec<String> = KUBEADM_COMMAND.iter().map(|s| s.to_string()).collect();
    argv[1] = format!("--config={}", path.display());
    let s = settings_from_args(argv).expect("kubeadm's config is accepted");

    assert_eq!(s.mode, ProxyMode::Nftables);
    assert_eq!(s.config_file.as_deref(), Some(path.as_path()));
    assert_eq!(
        s.kubeconfig.as_deref(),
        Some(Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
    );
    assert_eq!(s.master, None);
    assert_eq!(s.hostname_override.as_deref(), Some("node-a"));
    assert_eq!(s.cluster_cidrs, ["172.17.0.0/16"]);
    // mode "" is kube-proxy's iptables mode: NodePorts stay on every node IP.
    assert_eq!(s.nodeport_addresses, ["0.0.0.0/0", "::/0"]);
    assert!(!s.masquerade_all);
    assert_eq!(s.healthz_bind_address, addr("0.0.0.0:10256"));
    assert_eq!(s.metrics_bind_address, addr("127.0.0.1:10249"));
    assert_eq!(s.sync_period, Duration::from_secs(30));
    assert_eq!(s.min_sync_period, Duration::from_secs(1));
    assert_eq!(s.config_sync_period, Duration::from_secs(900));
    assert_eq!(s.ipvs.scheduler, "rr");
    assert_eq!(s.ipvs.sync_period, Duration::from_secs(30));
    assert_eq!(s.ipvs.min_sync_period, Duration::ZERO);
    assert_eq!(s.verbosity, 0);
    assert!(!s.cleanup && !s.init_only && !s.once && !s.dry_run);

    // Exactly one warning: the unset mode, with its file and line.
    let mode_line = line_of(KUBEADM_CONFIG, "mode:");
    assert_eq!(s.warnings.len(), 1, "{:#?}", s.warnings);
    let expected = format!("{}:{mode_line}:", path.display());
    assert!(s.warnings[0].starts_with(&expected), "{}", s.warnings[0]);
    assert_warns(&s, &["mode", "nftables", "127.0.0.1"]);
}

#[test]
fn kubeadm_config_with_mode_nftables_is_silent() {
    let text = KUBEADM_CONFIG.replace("mode: \"\"", "mode: nftables");
    let s = with_config(&text, &[]).expect("accepted");
    assert_eq!(s.mode, ProxyMode::Nftables);
    assert_eq!(s.nodeport_addresses, ["primary"]);
    assert!(s.warnings.is_empty(), "{:#?}", s.warnings);
}

#[test]
fn kubeadm_config_parses_as_typed_struct() {
    let cfg = KubeProxyConfiguration::from_yaml(KUBEADM_CONFIG, Path::new("config.conf"))
        .expect("parses");
    let kubeconfig = cfg
        .client_connection
        .and_then(|c| c.kubeconfig)
        .map(|k| k.value);
    assert_eq!(
        kubeconfig.as_deref(),
        Some("/var/lib/kube-proxy/kubeconfig.conf")
    );
    assert!(cfg.node_port_addresses.is_none(), "null is unset");
    let mode = cfg.mode.expect("mode is present");
    assert_eq!(mode.value, "");
    assert_eq!(mode.referenced.line(), line_of(KUBEADM_CONFIG, "mode:"));
}

#[test]
fn flags_given_override_the_file_and_defaults_do_not() {
    let text = config(
        "mode: nftables\nclusterCIDR: 10.0.0.0/8\nnftables:\n  syncPeriod: 10s\n  minSyncPeriod: 2s\n  masqueradeAll: true\nhostnameOverride: from-file\n",
    );
    // No flags: the file wins over the flags' defaults (--masquerade-all=false, -v=0).
    let s = with_config(&text, &[]).expect("accepted");
    assert!(s.masquerade_all);
    assert_eq!(s.sync_period, Duration::from_secs(10));
    assert_eq!(s.min_sync_period, Duration::from_secs(2));
    assert_eq!(s.cluster_cidrs, ["10.0.0.0/8"]);
    assert_eq!(s.hostname_override.as_deref(), Some("from-file"));
    assert!(s.warnings.is_empty(), "{:#?}", s.warnings);

    // Flags given on the command line win.
    let s = with_config(
        &text,
        &[
            "--masquerade-all=false",
            "--iptables-sync-period=20s",
            "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56",
            "--hostname-override=From-Flag",
            "-v=3",
        ],
    )
    .expect("accepted");
    assert!(!s.masquerade_all);
    assert_eq!(s.sync_period, Duration::from_secs(20));
    assert_eq!(
        s.min_sync_period,
        Duration::from_secs(2),
        "not given: from the file"
    );
    assert_eq!(s.cluster_cidrs, ["10.244.0.0/16", "fd00:10:244::/56"]);
    assert_eq!(s.hostname_override.as_deref(), Some("from-flag"));
    assert_eq!(s.verbosity, 3);
    // kube-proxy would ignore these flags with --config; kproxy says it applies them.
    assert_warns(&s, &["--masquerade-all", "kube-proxy ignores"]);
    assert_warns(&s, &["--cluster-cidr", "kube-proxy ignores"]);
    assert!(
        !s.warnings
            .iter()
            .any(|w| w.starts_with("--hostname-override")),
        "kube-proxy honours --hostname-override with --config: {:#?}",
        s.warnings
    );

    // The mode flag overrides the file's mode too.
    let s = with_config(&config("mode: iptables\n"), &["--proxy-mode=nftables"]).expect("ok");
    assert_eq!(s.mode, ProxyMode::Nftables);
}

#[test]
fn sync_periods_follow_kube_proxys_per_mode_blocks() {
    let blocks = "iptables:\n  syncPeriod: 40s\n  minSyncPeriod: 4s\nipvs:\n  syncPeriod: 50s\n  minSyncPeriod: 5s\nnftables:\n  syncPeriod: 60s\n  minSyncPeriod: 6s\n";
    let periods = |mode: &str, args: &[&str]| {
        let s = with_config(&config(&format!("mode: {mode}\n{blocks}")), args).expect("accepted");
        (
            s.sync_period.as_secs(),
            s.min_sync_period.as_secs(),
            s.warnings,
        )
    };
    let (sync, min, warnings) = periods("nftables", &[]);
    assert_eq!((sync, min), (60, 6));
    assert!(
        warnings.iter().any(|w| w.contains("iptables.syncPeriod")),
        "{warnings:#?}"
    );
    assert!(
        warnings.iter().any(|w| w.contains("ipvs.minSyncPeriod")),
        "{warnings:#?}"
    );
    let (sync, min, _) = periods("ipvs", &[]);
    assert_eq!((sync, min), (50, 5));
    // Unset mode: kube-proxy reads the iptables block.
    let (sync, min, warnings) = periods("\"\"", &[]);
    assert_eq!((sync, min), (40, 4));
    assert!(
        warnings.iter().any(|w| w.contains("nftables.syncPeriod")),
        "{warnings:#?}"
    );
    // The flags: --iptables-* outside ipvs mode, --ipvs-* in ipvs mode.
    let (sync, min, warnings) = periods(
        "nftables",
        &["--iptables-min-sync-period=0s", "--ipvs-sync-period=9s"],
    );
    assert_eq!((sync, min), (60, 0));
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with("--ipvs-sync-period: has no effect")),
        "{warnings:#?}"
    );
    let (sync, min, _) = periods(
        "ipvs",
        &["--ipvs-sync-period=9s", "--iptables-sync-period=1s"],
    );
    assert_eq!((sync, min), (9, 5));

    // Zero means "default": 30s and 1s (ipvs: 0s).
    let s = with_config(&config("mode: ipvs\nipvs:\n  syncPeriod: 0s\n"), &[]).expect("ok");
    assert_eq!(
        (s.sync_period, s.min_sync_period),
        (Duration::from_secs(30), Duration::ZERO)
    );

    // minSyncPeriod may not exceed syncPeriod.
    let err = with_config(
        &config("mode: nftables\nnftables:\n  syncPeriod: 1s\n  minSyncPeriod: 2s\n"),
        &[],
    )
    .expect_err("refused");
    assert_eq!(
        err.origin().map(Origin::name),
        Some("nftables.minSyncPeriod"),
        "{err}"
    );
    let err =
        settings(&["--iptables-sync-period=500ms"]).expect_err("below the default 1s minimum");
    assert_eq!(
        err.origin().map(Origin::name),
        Some("--iptables-sync-period"),
        "{err}"
    );
    let err = settings(&["--iptables-sync-period=0s"]).expect_err("must be > 0");
    assert!(err.to_string().contains("greater than 0"), "{err}");
}

#[test]
fn masquerade_settings_follow_the_mode() {
    let text = config("mode: nftables\niptables:\n  masqueradeAll: true\n");
    let s = with_config(&text, &[]).expect("ok");
    assert!(
        !s.masquerade_all,
        "nftables mode reads nftables.masqueradeAll"
    );
    assert_warns(&s, &["iptables.masqueradeAll", "not used"]);
    let s = with_config(&config("iptables:\n  masqueradeAll: true\n"), &[]).expect("ok");
    assert!(s.masquerade_all, "unset mode reads iptables.masqueradeAll");

    let err = with_config(
        &config("mode: nftables\nnftables:\n  masqueradeBit: 13\n"),
        &[],
    )
    .expect_err("only bit 14");
    assert!(matches!(err, ConfigError::Unsupported { .. }), "{err}");
    assert_eq!(
        err.origin().map(Origin::name),
        Some("nftables.masqueradeBit")
    );
    let err = with_config(&config("iptables:\n  masqueradeBit: 40\n"), &[]).expect_err("range");
    assert!(matches!(err, ConfigError::Invalid { .. }), "{err}");
    let s = with_config(
        &config("mode: nftables\niptables:\n  masqueradeBit: 13\n"),
        &[],
    )
    .expect("unused");
    assert_warns(&s, &["iptables.masqueradeBit", "13"]);
}

#[test]
fn invalid_values_are_refused_naming_the_field_and_line() {
    let cases: [(&str, &str); 9] = [
        ("nftables:\n  syncPeriod: 5x\n", "nftables.syncPeriod"),
        (
            "nftables:\n  minSyncPeriod: \"30\"\n",
            "nftables.minSyncPeriod",
        ),
        ("configSyncPeriod: -1m\n", "configSyncPeriod"),
        ("clusterCIDR: 10.0.0.0/33\n", "clusterCIDR"),
        ("clusterCIDR: 10.0.0.0/8,10.1.0.0/16\n", "clusterCIDR"),
        ("nodePortAddresses: [primary-ish]\n", "nodePortAddresses"),
        ("oomScoreAdj: 5000\n", "oomScoreAdj"),
        (
            "healthzBindAddress: localhost:10256\n",
            "healthzBindAddress",
        ),
        ("mode: fast\n", "mode"),
    ];
    for (extra, field) in cases {
        let text = config(extra);
        let err = with_config(&text, &[]).expect_err(extra);
        assert!(matches!(err, ConfigError::Invalid { .. }), "{extra}: {err}");
        let origin = err.origin().expect("names the field");
        assert_eq!(origin.name(), field, "{err}");
        let first_key = field.split('.').next_back().unwrap_or(field);
        let line = text
            .lines()
            .position(|l| l.trim_start().starts_with(&format!("{first_key}:")))
            .map(|i| i as u64 + 1);
        assert_eq!(origin_line(origin), line, "{err}");
        assert!(err.to_string().contains(field), "{err}");
    }
}

#[test]
fn kube_proxy_settings_kproxy_would_get_wrong_are_refused() {
    let cases = [
        ("mode: iptables\n", "mode", "nftables"),
        ("mode: kernelspace\n", "mode", "Linux"),
        ("mode: userspace\n", "mode", "removed"),
        (
            "detectLocalMode: InterfaceNamePrefix\n",
            "detectLocalMode",
            "ClusterCIDR",
        ),
        (
            "detectLocalMode: NodeCIDR\n",
            "detectLocalMode",
            "ClusterCIDR",
        ),
        (
            "nodePortAddresses: [primary, 10.0.0.0/8]\n",
            "nodePortAddresses",
            "primary",
        ),
        (
            "iptables:\n  snatNodeInternalIP: true\n",
            "iptables.snatNodeInternalIP",
            "masquerade",
        ),
    ];
    for (extra, field, hint) in cases {
        let err = with_config(&config(extra), &[]).expect_err(extra);
        assert!(
            matches!(err, ConfigError::Unsupported { .. }),
            "{extra}: {err}"
        );
        assert_eq!(err.origin().map(Origin::name), Some(field), "{err}");
        assert!(err.to_string().contains(hint), "{err}");
    }
    let refused_flags = [
        ("--write-config-to=/tmp/x", "--write-config-to"),
        ("--detect-local-mode=BridgeInterface", "--detect-local-mode"),
        ("--healthz-port=0", "--healthz-port"),
        ("--metrics-port=0", "--metrics-port"),
    ];
    for (arg, name) in refused_flags {
        let err = settings(&[arg]).expect_err(arg);
        assert!(
            matches!(err, ConfigError::Unsupported { .. }),
            "{arg}: {err}"
        );
        assert_eq!(err.origin().map(Origin::name), Some(name), "{err}");
    }
    let err = settings(&["--proxy-mode=iptables"]).expect_err("no iptables mode");
    assert!(matches!(err, ConfigError::Flags(_)), "{err}");
    assert!(err.to_string().contains("--proxy-mode"), "{err}");
    assert!(err.to_string().contains("nftables"), "{err}");
}

#[test]
fn unknown_and_misspelled_fields_are_refused_with_their_name_and_line() {
    let cases = [
        ("nftables:\n  syncPeriodd: 1s\n", "nftables.syncPeriodd", 4),
        ("clusterCidr: 10.0.0.0/8\n", "clusterCidr", 3),
        ("conntrack:\n  maxPerCPU: 1\n", "conntrack.maxPerCPU", 4),
        (
            "logging:\n  options:\n    yaml: {}\n",
            "logging.options.yaml",
            5,
        ),
    ];
    for (extra, path, line) in cases {
        let err = with_config(&config(extra), &[]).expect_err(extra);
        let ConfigError::Parse {
            line: l,
            field,
            message,
            ..
        } = &err
        else {
            panic!("{extra}: not a parse error: {err}");
        };
        let key = path.rsplit('.').next().unwrap_or(path);
        assert!(message.contains(&format!("unknown field `{key}`")), "{err}");
        assert_eq!(field.as_deref(), Some(path), "{err}");
        assert_eq!(*l, Some(line), "{err}");
        assert!(err.to_string().contains(&format!(":{line}:")), "{err}");
    }
    // Values of the wrong type are parse errors naming the field too.
    let cases = [
        (
            "iptables:\n  masqueradeAll: maybe\n",
            "iptables.masqueradeAll",
        ),
        ("oomScoreAdj: lots\n", "oomScoreAdj"),
        ("nodePortAddresses: primary\n", "nodePortAddresses"),
        ("conntrack:\n  min: 99999999999\n", "conntrack.min"),
    ];
    for (extra, path) in cases {
        let err = with_config(&config(extra), &[]).expect_err(extra);
        let ConfigError::Parse { field, line, .. } = &err else {
            panic!("{extra}: not a parse error: {err}");
        };
        assert_eq!(field.as_deref(), Some(path), "{err}");
        assert!(line.is_some(), "{err}");
    }
    // The file must be a v1alpha1 KubeProxyConfiguration.
    let err = with_config(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha2\nkind: KubeProxyConfiguration\n",
        &[],
    )
    .expect_err("v1alpha2");
    assert!(matches!(err, ConfigError::Unsupported { .. }), "{err}");
    let err = with_config(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration\n",
        &[],
    )
    .expect_err("kind");
    assert_eq!(err.origin().map(Origin::name), Some("kind"), "{err}");
    let err = with_config("kind: KubeProxyConfiguration\n", &[]).expect_err("no apiVersion");
    assert_eq!(err.origin().map(Origin::name), Some("apiVersion"), "{err}");
    let err = with_config("# nothing\n", &[]).expect_err("empty");
    assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    let err = settings(&["--config=/nonexistent/kproxy/config.conf"]).expect_err("missing file");
    assert!(matches!(err, ConfigError::Read { .. }), "{err}");
}

#[test]
fn harmless_settings_are_accepted_with_a_warning_naming_them() {
    let text = config(
        "mode: nftables\noomScoreAdj: -999\nconntrack:\n  maxPerCore: 32768\n  tcpEstablishedTimeout: 24h0m0s\n  tcpBeLiberal: true\nfeatureGates:\n  SomeGate: true\nenableProfiling: true\nlogging:\n  format: json\n  flushFrequency: 5s\n  vmodule:\n  - filePattern: proxier\n    verbosity: 4\nclientConnection:\n  qps: 50\n  contentType: application/vnd.kubernetes.protobuf\nbindAddress: 10.0.0.1\nportRange: 30000-32767\nudpIdleTimeout: 250ms\nwinkernel:\n  networkName: l2bridge\ndetectLocal:\n  bridgeInterface: cbr0\nnodePortAddresses: [localhost, 192.168.0.0/16]\n",
    );
    let s = with_config(&text, &[]).expect("accepted");
    for field in [
        "oomScoreAdj",
        "conntrack.maxPerCore",
        "conntrack.tcpEstablishedTimeout",
        "conntrack.tcpBeLiberal",
        "featureGates",
        "enableProfiling",
        "logging.format",
        "logging.flushFrequency",
        "logging.vmodule",
        "clientConnection.qps",
        "clientConnection.contentType",
        "bindAddress",
        "portRange",
        "udpIdleTimeout",
        "winkernel.networkName",
        "detectLocal.bridgeInterface",
        "nodePortAddresses",
    ] {
        assert_warns(&s, &[&format!(": {field}: ")]);
    }
    assert_eq!(
        s.nodeport_addresses,
        ["127.0.0.0/8", "::1/128", "192.168.0.0/16"]
    );

    let s = settings(&[
        "--oom-score-adj=-999",
        "--conntrack-max-per-core=0",
        "--conntrack-min=131072",
        "--feature-gates=A=true,B=false",
        "--profiling=false",
        "--kube-api-burst=20",
        "--vmodule=proxier=4",
        "--boot-id-file=/proc/sys/kernel/random/boot_id",
    ])
    .expect("accepted");
    for flag in [
        "--oom-score-adj",
        "--conntrack-min",
        "--kube-api-burst",
        "--vmodule",
        "--boot-id-file",
    ] {
        assert_warns(&s, &[&format!("{flag}: ")]);
    }
    assert_warns(&s, &["--feature-gates", "A=true"]);
    assert_warns(&s, &["--feature-gates", "B=false"]);
    assert!(
        !s.warnings.iter().any(|w| w.contains("--profiling")),
        "false is harmless"
    );
    assert!(
        !s.warnings.iter().any(|w| w.contains("max-per-core")),
        "0 leaves it as-is"
    );
    let err = settings(&["--oom-score-adj=-1001"]).expect_err("range");
    assert_eq!(err.origin().map(Origin::name), Some("--oom-score-adj"));
    let err = settings(&["--feature-gates=A"]).expect_err("no value");
    assert_eq!(err.origin().map(Origin::name), Some("--feature-gates"));
}

#[test]
fn flags_only_defaults() {
    let s = settings(&[]).expect("defaults");
    assert_eq!(s.mode, ProxyMode::Nftables);
    assert_eq!(s.nodeport_addresses, ["primary"]);
    assert_eq!(s.healthz_bind_address, addr("0.0.0.0:10256"));
    assert_eq!(s.metrics_bind_address, addr("127.0.0.1:10249"));
    assert_eq!(s.sync_period, Duration::from_secs(30));
    assert_eq!(s.min_sync_period, Duration::from_secs(1));
    assert_eq!(s.config_sync_period, Duration::from_secs(900));
    assert_eq!(s.kubeconfig, None);
    assert_eq!(s.hostname_override, None);
    assert!(s.warnings.is_empty(), "{:#?}", s.warnings);

    let s = settings(&[
        "-proxy-mode=ipvs",
        "--ipvs-scheduler=wlc",
        "--ipvs-strict-arp",
        "--ipvs-tcp-timeout=15m",
        "--ipvs-exclude-cidrs=10.0.0.0/8,fd00::/8",
        "--nodeport-addresses=all",
        "--manifests=/srv/objects",
        "--once",
        "--dry-run",
        "--master=https://10.0.0.1:6443",
        "--kubeconfig=/etc/kproxy/kubeconfig",
    ])
    .expect("ipvs flags");
    assert_eq!(s.mode, ProxyMode::Ipvs);
    assert_eq!(s.ipvs.scheduler, "wlc");
    assert!(s.ipvs.strict_arp);
    assert_eq!(s.ipvs.tcp_timeout, Duration::from_secs(900));
    assert_eq!(s.ipvs.exclude_cidrs, ["10.0.0.0/8", "fd00::/8"]);
    assert_eq!(s.min_sync_period, Duration::ZERO);
    assert_eq!(s.nodeport_addresses, ["0.0.0.0/0", "::/0"]);
    assert_eq!(s.manifests.as_deref(), Some(Path::new("/srv/objects")));
    assert!(s.once && s.dry_run);
    assert_eq!(s.master.as_deref(), Some("https://10.0.0.1:6443"));
    assert!(s.warnings.is_empty(), "{:#?}", s.warnings);

    let err = settings(&["--proxy-mode=ipvs", "--ipvs-scheduler=fastest"]).expect_err("scheduler");
    assert_eq!(err.origin().map(Origin::name), Some("--ipvs-scheduler"));
    let s = settings(&["--ipvs-scheduler=wlc"]).expect("ignored in nftables mode");
    assert_warns(&s, &["--ipvs-scheduler", "no effect in nftables mode"]);
    let err = settings(&["--hostname-override=  "]).expect_err("empty");
    assert_eq!(err.origin().map(Origin::name), Some("--hostname-override"));
}

#[test]
fn server_addresses_mirror_kube_proxy_parsing() {
    let s = settings(&[
        "--healthz-bind-address=10.0.0.1",
        "--metrics-bind-address=0.0.0.0:9999",
    ])
    .expect("ok");
    assert_eq!(s.healthz_bind_address, addr("10.0.0.1:10256"));
    assert_eq!(s.metrics_bind_address, addr("0.0.0.0:9999"));
    let s = settings(&["--healthz-bind-address=10.0.0.1", "--healthz-port=12345"]).expect("ok");
    assert_eq!(s.healthz_bind_address, addr("10.0.0.1:12345"));
    // kube-proxy only appends the deprecated port to an address without one.
    let s = settings(&["--metrics-port=12345"]).expect("ok");
    assert_eq!(s.metrics_bind_address, addr("127.0.0.1:10249"));
    assert_warns(&s, &["--metrics-port", "no effect"]);
    // An empty flag keeps the default, as kube-proxy's IPPortVar.
    let s = settings(&["--metrics-bind-address="]).expect("ok");
    assert_eq!(s.metrics_bind_address, addr("127.0.0.1:10249"));

    let s = with_config(
        &config("healthzBindAddress: \"::\"\nmetricsBindAddress: 0.0.0.0\n"),
        &[],
    )
    .expect("ok");
    assert_eq!(s.healthz_bind_address, addr("[::]:10256"));
    assert_eq!(s.metrics_bind_address, addr("0.0.0.0:10249"));
    // An IPv6 bindAddress moves the defaults to IPv6.
    let s = with_config(&config("bindAddress: \"::\"\n"), &[]).expect("ok");
    assert_eq!(s.healthz_bind_address, addr("[::]:10256"));
    assert_eq!(s.metrics_bind_address, addr("[::1]:10249"));
    let err = settings(&["--healthz-bind-address=10.0.0.1:0"]).expect_err("port 0");
    assert!(matches!(err, ConfigError::Flags(_)), "{err}");
}

#[test]
fn help_and_version_are_flag_errors_to_print() {
    let err = settings(&["--help"]).expect_err("help");
    let ConfigError::Flags(e) = err else {
        panic!("not a flag error");
    };
    assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
    assert!(e.to_string().contains("--hostname-override"));
}

#[test]
fn go_durations_parse() {
    let cases = [
        ("30s", 30_000),
        ("1m0s", 60_000),
        ("1h0m0s", 3_600_000),
        ("300ms", 300),
        ("1.5h", 5_400_000),
        ("0", 0),
    ];
    for (text, ms) in cases {
        assert_eq!(
            parse_go_duration(text),
            Ok(Duration::from_millis(ms)),
            "{text}"
        );
    }
    assert!(matches!(
        parse_go_duration("30"),
        Err(DurationError::MissingUnit(_))
    ));
    assert!(matches!(
        parse_go_duration("-5s"),
        Err(DurationError::Negative(_))
    ));
    assert!(matches!(
        parse_go_duration("1y"),
        Err(DurationError::UnknownUnit { .. })
    ));
}

#[test]
fn docs_flags_table_lists_every_flag() {
    use clap::CommandFactory;
    let docs = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let start = docs.find("| Flag | Status").expect("flag table");
    let table = &docs[start..];
    let table = &table[..table.find("\n\n").unwrap_or(table.len())];
    let documented: Vec<&str> = table
        .lines()
        .filter_map(|row| row.split('|').nth(1))
        .flat_map(|cell| cell.split('`').skip(1).step_by(2))
        .collect();
    let own = ["manifests", "once", "dry-run"];
    for arg in kproxy::cli::Flags::command().get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if own.contains(&long) {
            assert!(
                docs.contains(&format!("`--{long}")),
                "--{long} is documented"
            );
            continue;
        }
        assert!(
            documented.contains(&format!("--{long}").as_str()),
            "--{long} is missing from the flag table in README.md"
        );
    }
    for long in documented.iter().filter_map(|n| n.strip_prefix("--")) {
        let known = kproxy::cli::Flags::command().get_arguments().any(|a| {
            a.get_long() == Some(long)
                || a.get_all_aliases()
                    .is_some_and(|aliases| aliases.contains(&long))
        });
        assert!(
            known || ["help", "version"].contains(&long),
            "--{long} in docs is not a flag"
        );
    }
}
