//! Ruleset tests: what the nftables backend programs for fixed inputs, checked through
//! the binary's `--dry-run` (no privilege needed).

use std::path::PathBuf;
use std::process::Command;

fn kproxy(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .args(args)
        .output()
        .expect("run kproxy");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes a manifest to a fresh temporary file.
fn manifest(name: &str, yaml: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kproxy-ruleset-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, yaml).expect("write manifest");
    path
}

fn dry_run(path: &std::path::Path, extra: &[&str]) -> String {
    let p = path.to_str().expect("utf-8 path");
    let mut args = vec![
        "--manifests",
        p,
        "--hostname-override",
        "node-a",
        "--once",
        "--dry-run",
    ];
    args.extend_from_slice(extra);
    let (ok, out, err) = kproxy(&args);
    assert!(ok, "kproxy failed: {err}");
    out
}

#[test]
fn demo_ruleset_matches_golden() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = dry_run(
        &root.join("examples/demo.yaml"),
        &["--cluster-cidr", "10.0.0.0/8,fd00:10::/64"],
    );
    let golden = root.join("tests/golden/demo.nft");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &out).expect("write golden");
    }
    let want = std::fs::read_to_string(&golden).expect("golden file (UPDATE_GOLDEN=1 writes it)");
    if out != want {
        let diff: Vec<String> = want
            .lines()
            .zip(out.lines())
            .filter(|(a, b)| a != b)
            .take(10)
            .map(|(a, b)| format!("- {a}\n+ {b}"))
            .collect();
        panic!(
            "ruleset differs from tests/golden/demo.nft ({} vs {} lines); first differences:\n{}\n(UPDATE_GOLDEN=1 to accept)",
            want.lines().count(),
            out.lines().count(),
            diff.join("\n")
        );
    }
}

#[test]
fn upstream_chain_hashes_are_kept() {
    // Same names as upstream kube-proxy for the same service ports, so operators
    // recognise chains (affinity-flavoured endpoint chains aside).
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = dry_run(
        &root.join("examples/demo.yaml"),
        &["--cluster-cidr", "10.0.0.0/8"],
    );
    for name in [
        "service-ULMVA6XW-ns1/svc1/tcp/p80",
        "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80",
        "external-42NFTM6N-ns2/svc2/tcp/p80",
        "service-4AT6LBPK-ns3/svc3/tcp/p80",
        "firewall-HVFWP5L3-ns5/svc5/tcp/p80",
    ] {
        assert!(out.contains(name), "missing {name}");
    }
}

#[test]
fn non_canonical_ips_are_written_canonically() {
    let path = manifest(
        "badips.yaml",
        r#"
apiVersion: v1
kind: Service
metadata: {namespace: ns1, name: svc1}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.041
  externalIPs: [192.168.099.022]
  loadBalancerSourceRanges: ["203.0.113.000/025"]
  ports: [{name: p80, port: 80, nodePort: 3001}]
status:
  loadBalancer:
    ingress: [{ip: 1.2.3.004}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: ns1, name: svc1-x, labels: {kubernetes.io/service-name: svc1}}
addressType: IPv4
endpoints: [{addresses: [10.180.00.001]}]
ports: [{name: p80, port: 80}]
"#,
    );
    let out = dry_run(&path, &[]);
    for canonical in [
        "172.30.0.41",
        "192.168.99.22",
        "203.0.113.0/25",
        "1.2.3.4 . tcp . 80",
        "dnat to 10.180.0.1:80",
    ] {
        assert!(out.contains(canonical), "missing {canonical}:\n{out}");
    }
    for raw in [
        "172.30.0.041",
        "099",
        "000/025",
        "1.2.3.004",
        "10.180.00.001",
    ] {
        assert!(!out.contains(raw), "non-canonical {raw} leaked");
    }
}

#[test]
fn proxy_mode_lb_ips_headless_and_external_name_are_not_programmed() {
    let path = manifest(
        "ignored.yaml",
        r#"
apiVersion: v1
kind: Service
metadata: {namespace: ns1, name: lb}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.10
  ports: [{port: 80, nodePort: 3010}]
status:
  loadBalancer:
    ingress: [{ip: 1.2.3.4, ipMode: Proxy}, {ip: 5.6.7.8, ipMode: VIP}, {ip: 9.10.11.12}]
---
apiVersion: v1
kind: Service
metadata: {namespace: ns1, name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {namespace: ns1, name: extname}
spec: {type: ExternalName, externalName: example.com, clusterIP: 172.30.0.11, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata:
  namespace: ns1
  name: other-proxy
  labels: {service.kubernetes.io/service-proxy-name: somebody-else}
spec: {clusterIP: 172.30.0.12, ports: [{port: 80}]}
"#,
    );
    let out = dry_run(&path, &[]);
    assert!(
        !out.contains("1.2.3.4"),
        "ipMode Proxy must not be programmed"
    );
    assert!(out.contains("5.6.7.8 . tcp . 80"));
    assert!(
        out.contains("9.10.11.12 . tcp . 80"),
        "unset ipMode means VIP"
    );
    assert!(!out.contains("headless"));
    assert!(
        !out.contains("172.30.0.11"),
        "ExternalName ignored even with a ClusterIP"
    );
    assert!(
        !out.contains("172.30.0.12"),
        "service-proxy-name label means not ours"
    );
}

#[test]
fn yaml_syntax_error_fails_with_file_and_line() {
    let path = manifest(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\n  namespace: [unclosed\nspec: {}\n",
    );
    let p = path.to_str().expect("utf-8");
    let (ok, _, err) = kproxy(&["--manifests", p, "--once", "--dry-run"]);
    assert!(!ok, "a file that does not parse must fail --once");
    let needle = format!("{p}:");
    let pos = err
        .find(&needle)
        .unwrap_or_else(|| panic!("no file name in: {err}"));
    let line: String = err[pos + needle.len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    let line: usize = line
        .parse()
        .unwrap_or_else(|_| panic!("no line number in: {err}"));
    assert!(
        (5..=7).contains(&line),
        "line {line} does not point at the error: {err}"
    );
}

#[test]
fn invalid_objects_are_skipped_by_name_and_the_rest_is_programmed() {
    let path = manifest(
        "mixed.yaml",
        r#"
apiVersion: v1
kind: Service
metadata: {namespace: ns1, name: good}
spec: {clusterIP: 172.30.0.20, ports: [{name: p, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {namespace: ns1, name: bad-ip}
spec: {clusterIP: 172.30.0.999, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {namespace: ns1, name: bad-port}
spec: {clusterIP: 172.30.0.21, ports: [{port: 70000}]}
---
apiVersion: v1
kind: Service
metadata: {namespace: ns1, name: bad-proto}
spec: {clusterIP: 172.30.0.22, ports: [{port: 80, protocol: ICMP}]}
---
apiVersion: v1
kind: Service
metadata: {namespace: ns1, name: bad-type}
spec: {clusterIP: 172.30.0.23, ports: [{port: "eighty"}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: ns1, name: bad-slice, labels: {kubernetes.io/service-name: good}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.300]}]
ports: [{name: p, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: ns1, name: good-slice, labels: {kubernetes.io/service-name: good}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.7]}]
ports: [{name: p, port: 80}]
"#,
    );
    let p = path.to_str().expect("utf-8");
    let (ok, out, err) = kproxy(&[
        "--manifests",
        p,
        "--hostname-override",
        "node-a",
        "--once",
        "--dry-run",
    ]);
    assert!(ok, "invalid objects must not fail the run: {err}");
    for name in [
        "ns1/bad-ip",
        "ns1/bad-port",
        "ns1/bad-proto",
        "ns1/bad-type",
        "ns1/bad-slice",
    ] {
        assert!(err.contains(name), "{name} not logged: {err}");
    }
    assert!(
        err.contains("172.30.0.999"),
        "reason names the bad value: {err}"
    );
    assert!(
        out.contains("172.30.0.20 . tcp . 80 : goto service-"),
        "good service programmed:\n{out}"
    );
    assert!(out.contains("dnat to 10.0.0.7:80"), "good slice programmed");
    for bad in ["172.30.0.21", "172.30.0.22", "172.30.0.23"] {
        assert!(!out.contains(bad), "{bad} half-programmed");
    }
}
