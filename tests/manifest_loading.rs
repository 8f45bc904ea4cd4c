//! Loading `--manifests` files and directories into k8s-openapi objects.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kproxy::manifests::{self, ManifestError, Manifests, SkipReason};

/// kind, namespace, name, line
type RejectedRow<'a> = (&'a str, Option<&'a str>, Option<&'a str>, Option<u64>);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/manifests")
        .join(name)
}

fn load_fixture(name: &str) -> Manifests {
    let path = fixture(name);
    manifests::load(&path).unwrap_or_else(|err| panic!("loading {}: {err}", path.display()))
}

fn parse(name: &str, text: &str) -> Result<Manifests, ManifestError> {
    let mut out = Manifests::default();
    manifests::parse_str(Path::new(name), text, &mut out)?;
    Ok(out)
}

fn service_names(m: &Manifests) -> Vec<&str> {
    m.services
        .iter()
        .map(|s| s.metadata.name.as_deref().unwrap_or("<none>"))
        .collect()
}

#[test]
fn multi_document_file_with_all_four_kinds() {
    let m = load_fixture("all-kinds.yaml");
    assert_eq!(service_names(&m), ["web"]);
    assert_eq!(m.endpoint_slices.len(), 1);
    assert_eq!(m.nodes.len(), 1);
    assert_eq!(m.service_cidrs.len(), 1);
    assert_eq!(m.object_count(), 4);
    assert!(m.rejected.is_empty(), "{:?}", m.rejected);

    let svc = &m.services[0];
    assert_eq!(svc.metadata.namespace.as_deref(), Some("demo"));
    let spec = svc.spec.as_ref().expect("service spec");
    let ports = spec.ports.as_ref().expect("ports");
    assert_eq!(ports[0].port, 80);
    assert_eq!(ports[0].target_port, Some(IntOrString::Int(8080)));
    assert_eq!(
        ports[1].target_port,
        Some(IntOrString::String("metrics".into()))
    );

    let slice = &m.endpoint_slices[0];
    assert_eq!(slice.address_type, "IPv6");
    let endpoints = slice.endpoints.as_deref().expect("endpoints");
    let slice_ports = slice.ports.as_ref().expect("slice ports");
    assert_eq!(slice_ports[0].port, Some(8080));
    assert_eq!(
        endpoints[0].conditions.as_ref().and_then(|c| c.ready),
        Some(true)
    );
    assert_eq!(
        endpoints[1].conditions.as_ref().and_then(|c| c.ready),
        Some(false)
    );

    let node = &m.nodes[0];
    let capacity = node
        .status
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .expect("capacity");
    // An unquoted `cpu: 4` is a number in YAML; Quantity accepts it as "4".
    assert_eq!(capacity["cpu"].0, "4");
    assert_eq!(capacity["memory"].0, "16Gi");

    let cidr = &m.service_cidrs[0];
    assert_eq!(
        cidr.spec.as_ref().and_then(|s| s.cidrs.clone()),
        Some(vec![
            "10.96.0.0/16".to_owned(),
            "fd00:10:96::/112".to_owned()
        ])
    );
}

#[test]
fn ipv6_addresses_and_quoted_label_values_survive_intact() {
    let m = load_fixture("all-kinds.yaml");
    let svc = &m.services[0];
    let spec = svc.spec.as_ref().expect("service spec");
    assert_eq!(spec.cluster_ip.as_deref(), Some("fd00:10:96::1"));
    assert_eq!(
        spec.cluster_ips.as_deref(),
        Some(&["fd00:10:96::1".to_owned(), "10.96.0.10".to_owned()][..])
    );

    let labels = svc.metadata.labels.as_ref().expect("labels");
    let expected: BTreeMap<String, String> = [
        ("app", "web"),
        ("canary", "true"),
        ("version", "1.10"),
        ("legacy", "yes"),
        ("switch", "on"),
        ("zip", "0123"),
        // Unquoted, but leading-zero numbers are kept as text (not octal, not 123).
        ("build", "0123"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(labels, &expected);
    let annotations = svc.metadata.annotations.as_ref().expect("annotations");
    assert_eq!(annotations["note"], "single-quoted: fd00::1");

    let endpoints = m.endpoint_slices[0]
        .endpoints
        .as_deref()
        .expect("endpoints");
    assert_eq!(endpoints[0].addresses, ["fd00::1"]);
    assert_eq!(endpoints[1].addresses, ["fd00::2"]);

    let node = &m.nodes[0];
    let addresses: Vec<&str> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .expect("node addresses")
        .iter()
        .map(|a| a.address.as_str())
        .collect();
    assert_eq!(addresses, ["192.168.1.10", "2001:db8::10"]);
    assert_eq!(
        node.spec.as_ref().and_then(|s| s.pod_cidrs.clone()),
        Some(vec![
            "10.244.0.0/24".to_owned(),
            "fd00:10:244::/64".to_owned()
        ])
    );
}

#[test]
fn unknown_kind_and_unsupported_api_version_are_skipped() {
    let m = load_fixture("all-kinds.yaml");
    let skipped: Vec<(&str, &str, Option<&str>, SkipReason)> = m
        .skipped
        .iter()
        .map(|s| {
            (
                s.api_version.as_str(),
                s.kind.as_str(),
                s.name.as_deref(),
                s.reason,
            )
        })
        .collect();
    assert_eq!(
        skipped,
        [
            (
                "apps/v1",
                "Deployment",
                Some("web"),
                SkipReason::UnknownKind
            ),
            (
                "discovery.k8s.io/v1beta1",
                "EndpointSlice",
                Some("web-old"),
                SkipReason::UnsupportedApiVersion
            ),
        ]
    );
    assert_eq!(m.skipped[0].namespace.as_deref(), Some("demo"));
    assert_eq!(m.skipped[0].file, fixture("all-kinds.yaml"));
    assert_eq!(m.skipped[0].line, Some(88));
}

#[test]
fn directory_is_loaded_in_sorted_file_name_order() {
    let m = load_fixture("dir");
    // zeta comes from 10-services.yaml, alpha from 20-services.yml: file order, not name order.
    // .hidden.yaml, README.md and nested/ are not read.
    assert_eq!(service_names(&m), ["zeta", "alpha"]);
    assert_eq!(m.endpoint_slices.len(), 1);
    assert_eq!(m.nodes.len(), 1);
    assert_eq!(m.nodes[0].metadata.name.as_deref(), Some("node-json"));
    assert!(m.rejected.is_empty() && m.skipped.is_empty());
}

#[test]
fn empty_directory_loads_nothing() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("manifests-empty-dir");
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let m = manifests::load(&dir).expect("empty dir is not an error");
    assert_eq!(m, Manifests::default());
}

#[test]
fn list_and_typed_lists() {
    let m = load_fixture("list.yaml");
    // `kind: List` items name their own kind; ServiceList items inherit it.
    assert_eq!(service_names(&m), ["a", "b", "c"]);
    assert_eq!(m.endpoint_slices.len(), 1);

    // The Pod in the List, and the PodList as a whole, are skipped.
    let skipped: Vec<&str> = m.skipped.iter().map(|s| s.kind.as_str()).collect();
    assert_eq!(skipped, ["Pod", "PodList"]);
    assert_eq!(m.skipped[0].line, Some(13), "line of the Pod item");

    // The broken item is rejected with its own line; its siblings still load.
    assert_eq!(m.rejected.len(), 1, "{:?}", m.rejected);
    let rejected = &m.rejected[0];
    assert_eq!(rejected.kind, "Service");
    assert_eq!(rejected.namespace.as_deref(), Some("default"));
    assert_eq!(rejected.name.as_deref(), Some("broken"));
    assert_eq!(rejected.line, Some(25));
}

#[test]
fn undecodable_objects_are_rejected_and_the_rest_still_loads() {
    let m = load_fixture("bad-port.yaml");
    assert_eq!(service_names(&m), ["good", "after"]);
    assert_eq!(m.endpoint_slices.len(), 1);

    let rejected: Vec<RejectedRow<'_>> = m
        .rejected
        .iter()
        .map(|r| {
            (
                r.kind.as_str(),
                r.namespace.as_deref(),
                r.name.as_deref(),
                r.line,
            )
        })
        .collect();
    assert_eq!(
        rejected,
        [
            ("Service", Some("demo"), Some("eighty"), Some(10)),
            ("Service", Some("other"), Some("scalar-ports"), Some(29)),
        ]
    );
    assert!(
        m.rejected[0].reason.contains("eighty"),
        "{}",
        m.rejected[0].reason
    );
    assert_eq!(m.rejected[0].file, fixture("bad-port.yaml"));
    let shown = m.rejected[0].to_string();
    assert!(
        shown.starts_with(&format!(
            "{}:10: Service demo/eighty: ",
            fixture("bad-port.yaml").display()
        )),
        "{shown}"
    );
}

#[test]
fn yaml_syntax_error_reports_file_line_and_column() {
    let path = fixture("syntax-error.yaml");
    let err = manifests::load(&path).expect_err("invalid YAML must fail");
    match &err {
        ManifestError::Parse {
            path: p,
            line,
            column,
            message,
        } => {
            assert_eq!(p, &path);
            assert_eq!(*line, Some(10), "the mis-indented `name:` line");
            assert_eq!(*column, Some(4));
            assert!(
                !message.contains("line 10"),
                "location is not repeated: {message}"
            );
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!("{}:10:4: ", path.display())),
        "{shown}"
    );
    assert_eq!(err.path(), path);
}

#[test]
fn duplicate_keys_are_a_parse_error() {
    let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n  name: b\n";
    let err = parse("dup.yaml", text).expect_err("duplicate key");
    assert!(err.to_string().starts_with("dup.yaml:5:3: "), "{err}");
}

#[test]
fn parse_error_leaves_the_target_unchanged() {
    let mut m = Manifests::default();
    let text = "apiVersion: v1\nkind: Node\nmetadata: {name: n}\n---\nkey: [unclosed\n";
    assert!(manifests::parse_str(Path::new("x.yaml"), text, &mut m).is_err());
    assert_eq!(m, Manifests::default());
}

#[test]
fn json_files_are_accepted() {
    let m = load_fixture("service-list.json");
    assert_eq!(service_names(&m), ["json-svc"]);
    let svc = &m.services[0];
    let spec = svc.spec.as_ref().expect("spec");
    assert_eq!(spec.cluster_ip.as_deref(), Some("fd00::a"));
    let ports = spec.ports.as_ref().expect("ports");
    assert_eq!(ports[0].port, 53);
    assert_eq!(ports[0].protocol.as_deref(), Some("UDP"));
    assert_eq!(ports[0].target_port, Some(IntOrString::Int(5353)));
    assert_eq!(
        svc.metadata.labels.as_ref().map(|l| l["on"].as_str()),
        Some("yes")
    );
    // A second JSON value in the same file (a stream, as kubectl accepts).
    assert_eq!(m.nodes.len(), 1);
}

#[test]
fn json_syntax_error_reports_file_line_and_column() {
    let err = parse(
        "bad.json",
        "{\n  \"kind\": \"Node\",\n  \"apiVersion\": \n}\n",
    )
    .expect_err("invalid JSON must fail");
    assert!(err.to_string().starts_with("bad.json:4:1: "), "{err}");
    assert!(!err.to_string().contains("at line"), "{err}");
}

#[test]
fn missing_path_is_an_error_naming_it() {
    let path = fixture("does-not-exist.yaml");
    let err = manifests::load(&path).expect_err("missing file");
    assert!(matches!(err, ManifestError::Read { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn documents_without_kind_or_api_version_are_rejected() {
    let text = "\
metadata: {name: no-kind, namespace: ns}
---
kind: Service
metadata: {name: no-version}
---
- just
- a list
---
plain scalar
---
apiVersion: v1
kind: List
items: {not: a-list}
---
apiVersion: v1
kind: Service
metadata: {name: ok}
";
    let m = parse("mixed.yaml", text).expect("per-object problems are not fatal");
    assert_eq!(service_names(&m), ["ok"]);
    let rejected: Vec<(&str, Option<&str>, Option<u64>)> = m
        .rejected
        .iter()
        .map(|r| (r.kind.as_str(), r.name.as_deref(), r.line))
        .collect();
    assert_eq!(
        rejected,
        [
            ("", Some("no-kind"), Some(1)),
            ("Service", Some("no-version"), Some(3)),
            ("", None, Some(6)),
            ("", None, Some(9)),
            ("List", None, Some(11)),
        ]
    );
    assert!(m.rejected[0].reason.contains("kind"));
    assert!(m.rejected[1].reason.contains("apiVersion"));
}

#[test]
fn unquoted_yaml11_booleans_and_numbers_in_string_fields_are_rejected() {
    // Like kubectl: `on` and `1.10` are not strings unless quoted.
    let text = "\
apiVersion: v1
kind: Service
metadata:
  name: unquoted
  labels: {enabled: on}
---
apiVersion: v1
kind: Service
metadata:
  name: float
  labels: {version: 1.10}
";
    let m = parse("unquoted.yaml", text).expect("not fatal");
    assert!(m.services.is_empty());
    let names: Vec<_> = m.rejected.iter().map(|r| r.name.as_deref()).collect();
    assert_eq!(names, [Some("unquoted"), Some("float")]);
}

#[test]
fn special_scalars_do_not_break_the_file() {
    // `.inf` would be a non-finite float; it must not make the whole file unreadable.
    let text = "\
apiVersion: v1
kind: Service
metadata:
  name: s
  annotations: {a: .inf, b: .nan, c: '2024-01-01', d: 12:30}
";
    let m = parse("special.yaml", text).expect("loads");
    let annotations = m.services[0]
        .metadata
        .annotations
        .as_ref()
        .expect("annotations");
    assert_eq!(annotations["a"], ".inf");
    assert_eq!(annotations["b"], ".nan");
    assert_eq!(annotations["c"], "2024-01-01");
    assert_eq!(annotations["d"], "12:30");
}
