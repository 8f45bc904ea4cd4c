//! The deployment in `manifests/` (`kubectl apply -f manifests/`): every document is a
//! Kubernetes object with no unknown or misspelled field, the objects reference each other
//! correctly, the DaemonSet's command line and the ConfigMap's configuration are accepted
//! by kproxy without warnings, and the ClusterRole grants exactly what kproxy uses.
//!
//! k8s-openapi ignores unknown fields when deserializing, so each document is
//! deserialized into its typed object, serialized back, and compared with the original:
//! a key that did not survive the round trip is a field the API server would not know
//! (it would be dropped or rejected under `kubectl apply --validate=strict`).
//!
//! [`rbac_rules`] is the ClusterRole flattened into `(apiGroup, resource, verb)` triples,
//! for a test that checks the requests kproxy makes against a fake API server are all
//! granted: include this file with `#[path = "deploy_manifests.rs"] mod deploy_manifests;`
//! (or move the helper to `tests/support/`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use kproxy::cli::ProxyMode;
use kproxy::config::{settings_from_args, KubeProxyConfiguration, HEALTHZ_PORT};

const NAMESPACE: &str = "kube-system";
const NAME: &str = "kproxy";
const CONFIG_KEY: &str = "config.conf";

/// The directory `kubectl apply -f` is pointed at.
pub fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests")
}

/// One YAML document of a manifest file.
#[derive(Debug)]
struct Document {
    /// `file#index`, for messages.
    at: String,
    value: Value,
}

/// Every non-empty document of every `.yaml`/`.yml`/`.json` file, in `kubectl`'s order.
fn documents() -> Vec<Document> {
    let dir = manifests_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable manifest");
        let values: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let name = file
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        for (i, value) in values.into_iter().enumerate().filter(|(_, v)| !v.is_null()) {
            docs.push(Document {
                at: format!("{name}#{i}"),
                value,
            });
        }
    }
    docs
}

/// Paths of keys (and values) of `original` that did not survive the typed round trip.
/// Only `null` may disappear: k8s-openapi drops unset optional fields.
fn lost_fields(original: &Value, round_trip: &Value, path: &str) -> Vec<String> {
    let child = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    match (original, round_trip) {
        (Value::Object(o), Value::Object(r)) => o
            .iter()
            .filter(|(_, v)| !v.is_null())
            .flat_map(|(k, v)| match r.get(k) {
                Some(rv) => lost_fields(v, rv, &child(k)),
                None => vec![format!("{} (unknown field)", child(k))],
            })
            .collect(),
        (Value::Array(o), Value::Array(r)) if o.len() == r.len() => o
            .iter()
            .zip(r)
            .enumerate()
            .flat_map(|(i, (v, rv))| lost_fields(v, rv, &format!("{path}[{i}]")))
            .collect(),
        (o, r) if o == r => Vec::new(),
        (o, r) => vec![format!("{path} (was {o}, reads back as {r})")],
    }
}

/// Deserializes a document into its k8s-openapi type, failing on unknown fields.
fn typed<T: DeserializeOwned + Serialize>(doc: &Document) -> T {
    let object: T = serde_json::from_value(doc.value.clone())
        .unwrap_or_else(|e| panic!("{}: not a valid object: {e}", doc.at));
    let back = serde_json::to_value(&object).expect("serializable");
    let lost = lost_fields(&doc.value, &back, "");
    assert!(lost.is_empty(), "{}: {lost:#?}", doc.at);
    object
}

/// Every object of the deployment, typed.
#[derive(Debug, Default)]
struct Deployment {
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
}

fn deployment() -> Deployment {
    let mut d = Deployment::default();
    for doc in documents() {
        let api_version = doc.value["apiVersion"].as_str().unwrap_or_default();
        let kind = doc.value["kind"].as_str().unwrap_or_default();
        match (api_version, kind) {
            ("v1", "ServiceAccount") => d.service_accounts.push(typed(&doc)),
            ("v1", "ConfigMap") => d.config_maps.push(typed(&doc)),
            ("apps/v1", "DaemonSet") => d.daemon_sets.push(typed(&doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => d.cluster_roles.push(typed(&doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                d.cluster_role_bindings.push(typed(&doc))
            }
            other => panic!("{}: unexpected object {other:?}", doc.at),
        }
    }
    d
}

fn only<'a, T>(items: &'a [T], what: &str) -> &'a T {
    match items {
        [one] => one,
        _ => panic!("expected exactly one {what}, found {}", items.len()),
    }
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .template
        .spec
        .as_ref()
        .expect("DaemonSet has a pod template spec")
}

fn container(ds: &DaemonSet) -> &Container {
    only(&pod_spec(ds).containers, "container")
}

/// The container's command line: `command` followed by `args`.
fn command_line(c: &Container) -> Vec<String> {
    c.command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .cloned()
        .collect()
}

fn config_text(d: &Deployment) -> String {
    let cm = only(&d.config_maps, "ConfigMap");
    cm.data
        .as_ref()
        .and_then(|data| data.get(CONFIG_KEY))
        .cloned()
        .unwrap_or_else(|| panic!("ConfigMap has no {CONFIG_KEY}"))
}

/// The kproxy ClusterRole as `(apiGroup, resource, verb)` triples; the core group is `""`.
/// Every triple is one permission; a request is allowed iff its triple is in the set.
pub fn rbac_rules() -> BTreeSet<(String, String, String)> {
    let d = deployment();
    let role = d
        .cluster_roles
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some(NAME))
        .expect("ClusterRole kproxy");
    let mut out = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "rules are by group/resource/verb only: {rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    out.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    out
}

#[test]
fn every_document_is_a_known_object_without_unknown_fields() {
    let d = deployment();
    assert_eq!(d.service_accounts.len(), 1);
    assert_eq!(d.cluster_roles.len(), 1);
    assert_eq!(d.cluster_role_bindings.len(), 1);
    assert_eq!(d.config_maps.len(), 1);
    assert_eq!(d.daemon_sets.len(), 1);
    let namespaced = d
        .service_accounts
        .iter()
        .map(|o| &o.metadata)
        .chain(d.config_maps.iter().map(|o| &o.metadata))
        .chain(d.daemon_sets.iter().map(|o| &o.metadata));
    for meta in namespaced {
        assert_eq!(meta.name.as_deref(), Some(NAME));
        assert_eq!(
            meta.namespace.as_deref(),
            Some(NAMESPACE),
            "{:?}",
            meta.name
        );
    }
    let cluster_scoped = d
        .cluster_roles
        .iter()
        .map(|o| &o.metadata)
        .chain(d.cluster_role_bindings.iter().map(|o| &o.metadata));
    for meta in cluster_scoped {
        assert_eq!(meta.name.as_deref(), Some(NAME));
        assert_eq!(meta.namespace, None, "cluster-scoped");
    }
}

#[test]
fn the_round_trip_check_catches_unknown_fields() {
    let doc = Document {
        at: "inline".into(),
        value: serde_json::json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "x", "namespace": "y", "lables": {"a": "b"}},
            "automountServiceAccountToken": null,
        }),
    };
    let result = std::panic::catch_unwind(|| typed::<ServiceAccount>(&doc));
    let message = result
        .expect_err("the misspelled field is caught")
        .downcast::<String>()
        .map(|s| *s)
        .unwrap_or_default();
    assert!(
        message.contains("metadata.lables (unknown field)"),
        "{message}"
    );
}

#[test]
fn daemonset_runs_like_kube_proxy() {
    let d = deployment();
    let ds = only(&d.daemon_sets, "DaemonSet");
    let spec = &ds.spec;
    let template_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    for (k, v) in spec.selector.match_labels.iter().flatten() {
        assert_eq!(
            template_labels.get(k),
            Some(v),
            "selector {k}={v} matches the template"
        );
    }
    assert!(spec
        .selector
        .match_labels
        .as_ref()
        .is_some_and(|l| !l.is_empty()));

    let pod = pod_spec(ds);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let sa = only(&d.service_accounts, "ServiceAccount");
    assert_eq!(pod.service_account_name, sa.metadata.name);
    let tolerations = pod.tolerations.as_deref().unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint: {tolerations:?}"
    );

    let c = container(ds);
    let image = c.image.as_deref().unwrap_or_default();
    assert!(!image.is_empty(), "container has an image");
    assert_eq!(image, "ghcr.io/kproxy/kproxy:latest");
    let node_name = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(node_name, Some("spec.nodeName"));
    let argv = command_line(c);
    assert_eq!(
        argv.first().map(String::as_str),
        Some("/usr/local/bin/kproxy")
    );
    assert!(
        argv.iter().any(|a| a == "--hostname-override=$(NODE_NAME)"),
        "{argv:?}"
    );

    // Not privileged; only NET_ADMIN.
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_ne!(sc.privileged, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.add.as_deref(), Some(&["NET_ADMIN".to_owned()][..]));
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));

    // Probes on kube-proxy's health port.
    let port_of = |port: &IntOrString| match port {
        IntOrString::Int(p) => *p,
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map_or(-1, |p| p.container_port),
    };
    let probe = |p: Option<&k8s_openapi::api::core::v1::Probe>| {
        let get = p.and_then(|p| p.http_get.as_ref()).expect("HTTP probe");
        (get.path.clone().unwrap_or_default(), port_of(&get.port))
    };
    let healthz = i32::from(HEALTHZ_PORT);
    assert_eq!(probe(c.liveness_probe.as_ref()), ("/livez".into(), healthz));
    assert_eq!(
        probe(c.readiness_probe.as_ref()),
        ("/healthz".into(), healthz)
    );

    // Mounts refer to volumes; /lib/modules is read-only; no xtables lock.
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    for m in c.volume_mounts.iter().flatten() {
        assert!(
            volumes.iter().any(|v| v.name == m.name),
            "volume {} exists",
            m.name
        );
    }
    let modules = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/lib/modules")
        .expect("/lib/modules mounted");
    assert_eq!(modules.read_only, Some(true));
    assert!(!volumes.iter().any(|v| v
        .host_path
        .as_ref()
        .is_some_and(|h| h.path.contains("xtables"))));
}

#[test]
fn daemonset_command_and_config_map_are_accepted_without_warnings() {
    let d = deployment();
    let ds = only(&d.daemon_sets, "DaemonSet");
    let c = container(ds);
    let argv = command_line(c);

    // The --config file is the ConfigMap's key, mounted where the flag says.
    let config_path = argv
        .iter()
        .find_map(|a| a.strip_prefix("--config="))
        .map(PathBuf::from)
        .expect("--config= flag");
    assert_eq!(
        config_path.file_name().and_then(|n| n.to_str()),
        Some(CONFIG_KEY)
    );
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| Some(Path::new(&m.mount_path)) == config_path.parent())
        .expect("the config directory is mounted");
    let volume = pod_spec(ds)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("mounted volume");
    let cm = only(&d.config_maps, "ConfigMap");
    assert_eq!(
        volume.config_map.as_ref().map(|s| s.name.as_str()),
        cm.metadata.name.as_deref(),
        "the config volume is the kproxy ConfigMap"
    );

    // The embedded configuration parses on its own...
    let text = config_text(&d);
    let cfg = KubeProxyConfiguration::from_yaml(&text, Path::new(CONFIG_KEY))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.mode.map(|m| m.value).as_deref(), Some("nftables"));

    // ...and the command line, as the kubelet runs it, resolves with no warning.
    let dir = std::env::temp_dir().join(format!("kproxy-deploy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let file = dir.join(CONFIG_KEY);
    std::fs::write(&file, &text).expect("write config");
    let expanded: Vec<String> = argv
        .iter()
        .map(|a| {
            if a.starts_with("--config=") {
                format!("--config={}", file.display())
            } else {
                a.replace("$(NODE_NAME)", "node-a")
            }
        })
        .collect();
    let result = settings_from_args(expanded);
    let _ = std::fs::remove_dir_all(&dir);
    let s = result.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.mode, ProxyMode::Nftables);
    assert_eq!(s.hostname_override.as_deref(), Some("node-a"));
    assert_eq!(
        s.healthz_bind_address.port(),
        HEALTHZ_PORT,
        "the port the probes use"
    );
    assert!(
        s.kubeconfig.is_none(),
        "in-cluster ServiceAccount credentials"
    );
    assert!(s.warnings.is_empty(), "{:#?}", s.warnings);
}

#[test]
fn cluster_role_grants_exactly_what_kproxy_uses() {
    let triple = |g: &str, r: &str, v: &str| (g.to_owned(), r.to_owned(), v.to_owned());
    let mut expected = BTreeSet::new();
    // The objects kproxy watches (list + watch each).
    for (group, resource) in [
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("", "nodes"),
        ("networking.k8s.io", "servicecidrs"),
    ] {
        for verb in ["list", "watch"] {
            expected.insert(triple(group, resource, verb));
        }
    }
    // Exactly what the watchers use; tests/cluster_mode.rs checks the live requests.
    assert_eq!(rbac_rules(), expected);

    let d = deployment();
    let binding = only(&d.cluster_role_bindings, "ClusterRoleBinding");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, NAME);
    assert_eq!(
        binding.role_ref.api_group.as_deref(),
        Some("rbac.authorization.k8s.io")
    );
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    let subject = only(subjects, "subject");
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(subject.name, NAME);
    assert_eq!(subject.namespace.as_deref(), Some(NAMESPACE));
}

#[test]
fn the_image_provides_both_binary_names() {
    // The Containerfile cannot be built here (no container engine); check that it installs
    // the DaemonSet's binary and kube-proxy's path for a pure image swap.
    let containerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Containerfile"))
            .expect("Containerfile");
    let d = deployment();
    let argv = command_line(container(only(&d.daemon_sets, "DaemonSet")));
    let binary = argv.first().expect("a command");
    assert!(
        containerfile.contains(&format!(
            "COPY --from=builder /src/target/release/kproxy {binary}"
        )),
        "{binary}"
    );
    assert!(
        containerfile.contains("/usr/local/bin/kube-proxy"),
        "kube-proxy path for image swaps"
    );
}
