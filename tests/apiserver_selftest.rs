//! Proves `tests/support/apiserver.rs` (the fake Kubernetes API server)
//! against the real kube-rs client, watcher and reflector, independently of
//! kproxy: if these pass, a failing cluster-mode test points at kproxy.
//!
//! Needs no privileges: `cargo test --test apiserver_selftest`.

mod support;

use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{future, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{
    Api, DeleteParams, ListParams, PartialObjectMeta, PostParams, VersionMatch, WatchEvent,
    WatchParams,
};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use support::apiserver::{FakeApiServer, Mode, RequestRecord};

/// kube-proxy's EndpointSlice/Service label selector.
const PROXY_SELECTOR: &str =
    "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name";

fn service(ns: &str, name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"clusterIP": ip, "ports": [{"port": 80, "protocol": "TCP"}]},
    })
}

fn labelled_service(ns: &str, name: &str, labels: Value) -> Value {
    let mut svc = service(ns, name, "10.96.0.99");
    svc["metadata"]["labels"] = labels;
    svc
}

fn endpoint_slice(ns: &str, name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": true}}],
        "ports": [{"port": 8080, "protocol": "TCP"}],
    })
}

fn node(name: &str, zone: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "spec": {"podCIDR": "10.244.1.0/24"},
    })
}

/// A reflector running in the background; aborted on drop.
struct Reflector<K: kube::Resource<DynamicType = ()> + 'static> {
    store: Store<K>,
    errors: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl<K: kube::Resource<DynamicType = ()> + 'static> Drop for Reflector<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<K> Reflector<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    /// `watcher(api, config).default_backoff().reflect(writer)`, as kproxy does.
    fn start(api: Api<K>, config: watcher::Config) -> Self {
        let (store, writer) = reflector::store();
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&errors);
        let task = tokio::spawn(
            watcher(api, config)
                .default_backoff()
                .reflect(writer)
                .for_each(move |event| {
                    if let Err(e) = event {
                        sink.lock().expect("error log").push(e.to_string());
                    }
                    future::ready(())
                }),
        );
        Reflector {
            store,
            errors,
            task,
        }
    }

    async fn ready(&self) {
        tokio::time::timeout(Duration::from_secs(5), self.store.wait_until_ready())
            .await
            .expect("reflector not ready within 5 s")
            .expect("reflector writer dropped");
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .store
            .state()
            .iter()
            .map(|o| match o.namespace() {
                Some(ns) => format!("{ns}/{}", o.name_any()),
                None => o.name_any(),
            })
            .collect();
        names.sort();
        names
    }

    fn errors(&self) -> Vec<String> {
        self.errors.lock().expect("error log").clone()
    }
}

/// `ns/name=clusterIP` of every Service in the store, sorted.
fn cluster_ips(store: &Store<Service>) -> Vec<String> {
    let mut v: Vec<String> = store
        .state()
        .iter()
        .map(|s| {
            let ip = s
                .spec
                .as_ref()
                .and_then(|spec| spec.cluster_ip.clone())
                .unwrap_or_default();
            format!(
                "{}/{}={ip}",
                s.namespace().unwrap_or_default(),
                s.name_any()
            )
        })
        .collect();
    v.sort();
    v
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn requests_of(api: &FakeApiServer, verb: &str, resource: &str) -> Vec<RequestRecord> {
    api.requests()
        .into_iter()
        .filter(|r| r.verb == verb && r.resource == resource)
        .collect()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// (a) The reflector lists existing objects, then follows apply/modify/
/// delete — including a change made between its list and its watch, which
/// only the replay of the event log delivers.
#[tokio::test]
async fn reflector_lists_then_follows_changes() {
    let api = FakeApiServer::new();
    api.apply(service("default", "a", "10.96.0.10"));
    api.apply(service("other", "b", "10.96.0.11"));
    let list_rv = api.resource_version();

    // Every answer starts 300 ms late, so the watch that follows the list is
    // still on its way when the store becomes ready.
    api.set_latency(Duration::from_millis(300));
    let r = Reflector::start(
        Api::<Service>::all(api.client()),
        watcher::Config::default(),
    );
    r.ready().await;
    assert_eq!(
        cluster_ips(&r.store),
        strings(&["default/a=10.96.0.10", "other/b=10.96.0.11"])
    );
    let c = api.apply(service("default", "c", "10.96.0.12"));
    api.set_latency(Duration::ZERO);
    wait_for("c via replay", Duration::from_secs(3), || {
        r.store.state().len() == 3
    })
    .await;

    // The protocol kube's watcher spoke: a paged list, then a watch from the
    // list's resourceVersion — older than c, so c came from the replay.
    let reqs = api.requests();
    assert_eq!(reqs[0].verb, "list", "{reqs:#?}");
    assert_eq!(reqs[0].path, "/api/v1/services");
    assert_eq!(reqs[0].param("limit"), Some("500"));
    assert_eq!(reqs[0].param("resourceVersion"), None, "{reqs:#?}");
    assert_eq!(reqs[1].verb, "watch", "{reqs:#?}");
    assert_eq!(reqs[1].param("allowWatchBookmarks"), Some("true"));
    assert_eq!(reqs[1].param("timeoutSeconds"), Some("290"));
    let watch_rv: u64 = reqs[1]
        .param("resourceVersion")
        .unwrap_or("")
        .parse()
        .expect("watch rv");
    assert_eq!(watch_rv, list_rv);
    let c_rv: u64 = c["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("")
        .parse()
        .expect("rv");
    assert!(c_rv > watch_rv);

    api.apply(service("default", "a", "10.96.0.20"));
    wait_for("a modified", Duration::from_secs(3), || {
        cluster_ips(&r.store).contains(&"default/a=10.96.0.20".to_string())
    })
    .await;
    assert!(api.delete("v1", "Service", "other", "b"));
    wait_for("b deleted", Duration::from_secs(3), || {
        r.names() == strings(&["default/a", "default/c"])
    })
    .await;
    // Applying an unchanged object is a no-op, as on a real server.
    let rv = api.resource_version();
    api.apply(service("default", "a", "10.96.0.20"));
    assert_eq!(api.resource_version(), rv);
    assert!(r.errors().is_empty(), "{:?}", r.errors());
}

/// (b) After its connection drops, the watcher resumes from its
/// resourceVersion without relisting, and sees later (and in-between) changes.
#[tokio::test]
async fn watcher_resumes_after_dropped_connection() {
    let api = FakeApiServer::new();
    api.apply(service("default", "a", "10.96.0.10"));
    let r = Reflector::start(
        Api::<Service>::all(api.client()),
        watcher::Config::default(),
    );
    r.ready().await;
    wait_for("watch open", Duration::from_secs(3), || {
        api.open_watches() == 1
    })
    .await;

    api.drop_watches();
    api.apply(service("default", "b", "10.96.0.11"));
    wait_for("b after the drop", Duration::from_secs(3), || {
        r.store.state().len() == 2
    })
    .await;
    wait_for("second watch", Duration::from_secs(3), || {
        requests_of(&api, "watch", "services").len() == 2
    })
    .await;
    api.apply(service("default", "c", "10.96.0.12"));
    wait_for("c", Duration::from_secs(3), || r.store.state().len() == 3).await;

    assert_eq!(
        requests_of(&api, "list", "services").len(),
        1,
        "resumed, not relisted"
    );
    let watches = requests_of(&api, "watch", "services");
    assert_ne!(watches[1].param("resourceVersion"), Some("0"));
}

/// (c) After compaction the resumed watch gets `410 Expired`; the watcher
/// relists and converges, including a deletion made while it was away.
#[tokio::test]
async fn watcher_relists_after_410() {
    let api = FakeApiServer::new();
    for (name, ip) in [
        ("a", "10.96.0.10"),
        ("b", "10.96.0.11"),
        ("c", "10.96.0.12"),
    ] {
        api.apply(service("default", name, ip));
    }
    let r = Reflector::start(
        Api::<Service>::all(api.client()),
        watcher::Config::default(),
    );
    r.ready().await;
    wait_for("watch open", Duration::from_secs(3), || {
        api.open_watches() == 1
    })
    .await;

    // Disconnected: the reconnecting watch hangs while history is lost.
    api.set_mode(Mode::Hang);
    api.drop_watches();
    wait_for("reconnect attempt", Duration::from_secs(3), || {
        requests_of(&api, "watch", "services").len() == 2
    })
    .await;
    assert!(api.delete("v1", "Service", "default", "b"));
    api.apply(service("default", "c", "10.96.0.22"));
    api.apply(service("default", "d", "10.96.0.13"));
    api.compact();
    api.set_mode(Mode::Healthy);

    wait_for("relist converges", Duration::from_secs(5), || {
        cluster_ips(&r.store)
            == strings(&[
                "default/a=10.96.0.10",
                "default/c=10.96.0.22",
                "default/d=10.96.0.13",
            ])
    })
    .await;
    let errors = r.errors();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("410") || e.contains("too old")),
        "{errors:?}"
    );
    assert_eq!(requests_of(&api, "list", "services").len(), 2);
}

/// (d) Label selectors (kube-proxy's) and field selectors filter lists and
/// watches; objects modified into or out of a selection appear and vanish.
#[tokio::test]
async fn selectors_filter_lists_and_watches() {
    let api = FakeApiServer::new();
    api.apply(endpoint_slice(
        "default",
        "web-1",
        json!({"kubernetes.io/service-name": "web"}),
    ));
    api.apply(endpoint_slice(
        "default",
        "headless-1",
        json!({"kubernetes.io/service-name": "headless", "service.kubernetes.io/headless": ""}),
    ));
    api.apply(endpoint_slice(
        "default",
        "other-proxy-1",
        json!({"service.kubernetes.io/service-proxy-name": "cilium"}),
    ));
    api.apply(endpoint_slice(
        "kube-system",
        "dns-1",
        json!({"kubernetes.io/service-name": "dns"}),
    ));
    api.apply(node("node-a", "z1"));
    api.apply(node("node-b", "z2"));

    let client = api.client();
    let slices = Reflector::start(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(PROXY_SELECTOR),
    );
    let nodes = Reflector::start(
        Api::<Node>::all(client.clone()),
        watcher::Config::default().fields("metadata.name=node-a"),
    );
    slices.ready().await;
    nodes.ready().await;
    assert_eq!(
        slices.names(),
        strings(&["default/web-1", "kube-system/dns-1"])
    );
    assert_eq!(nodes.names(), strings(&["node-a"]));

    // Into and out of the selection.
    api.apply(endpoint_slice(
        "default",
        "web-1",
        json!({"kubernetes.io/service-name": "web", "service.kubernetes.io/headless": ""}),
    ));
    api.apply(endpoint_slice(
        "default",
        "headless-1",
        json!({"kubernetes.io/service-name": "headless"}),
    ));
    api.apply(node("node-b", "z3"));
    api.apply(node("node-a", "z9"));
    wait_for("selection changes", Duration::from_secs(3), || {
        slices.names() == strings(&["default/headless-1", "kube-system/dns-1"])
    })
    .await;
    wait_for("node-a relabelled", Duration::from_secs(3), || {
        nodes.store.state().iter().any(|n| {
            n.labels()
                .get("topology.kubernetes.io/zone")
                .map(String::as_str)
                == Some("z9")
        })
    })
    .await;
    assert_eq!(nodes.names(), strings(&["node-a"]));
    let watch = &requests_of(&api, "watch", "endpointslices")[0];
    assert_eq!(watch.path, "/apis/discovery.k8s.io/v1/endpointslices");
    assert_eq!(watch.param("labelSelector"), Some(PROXY_SELECTOR));
    assert_eq!(
        requests_of(&api, "list", "nodes")[0].param("fieldSelector"),
        Some("metadata.name=node-a")
    );

    // Every selector form, on plain lists.
    api.apply(labelled_service(
        "default",
        "web",
        json!({"app": "web", "tier": "front"}),
    ));
    api.apply(labelled_service("default", "db", json!({"app": "db"})));
    api.apply(labelled_service("other", "bare", json!({})));
    let services = Api::<Service>::all(client.clone());
    let names = |lp: ListParams| {
        let services = services.clone();
        async move {
            let mut v: Vec<String> = services
                .list(&lp)
                .await
                .expect("list")
                .items
                .iter()
                .map(ResourceExt::name_any)
                .collect();
            v.sort();
            v
        }
    };
    let cases = [
        ("app=web", vec!["web"]),
        ("app==web", vec!["web"]),
        ("app!=web", vec!["bare", "db"]),
        ("app in (web,db)", vec!["db", "web"]),
        ("app notin (web)", vec!["bare", "db"]),
        ("app", vec!["db", "web"]),
        ("!app", vec!["bare"]),
        ("app,tier=front", vec!["web"]),
        ("app=web,!tier", vec![]),
    ];
    for (selector, expected) in cases {
        assert_eq!(
            names(ListParams::default().labels(selector)).await,
            expected,
            "{selector}"
        );
    }
    assert_eq!(
        names(ListParams::default().fields("metadata.namespace=other")).await,
        ["bare"]
    );
    assert_eq!(
        names(ListParams::default().fields("metadata.name!=web,metadata.namespace=default")).await,
        ["db"]
    );
    let bad = services
        .list(&ListParams::default().fields("spec.clusterIP=1.2.3.4"))
        .await;
    assert!(
        matches!(bad, Err(kube::Error::Api(ref s)) if s.code == 400),
        "{bad:?}"
    );
    let bad = services.list(&ListParams::default().labels("a b=c")).await;
    assert!(
        matches!(bad, Err(kube::Error::Api(ref s)) if s.code == 400),
        "{bad:?}"
    );
}

/// Pagination: pages come from one consistent snapshot even while objects
/// change; expired tokens and too-old `Exact` lists get 410; a watcher with
/// a small page size pages through everything.
#[tokio::test]
async fn pagination_uses_consistent_snapshots() {
    let api = FakeApiServer::new();
    for i in 0..5 {
        api.apply(service(
            "default",
            &format!("s{i}"),
            &format!("10.96.0.{i}"),
        ));
    }
    let services = Api::<Service>::namespaced(api.client(), "default");
    let first = services
        .list(&ListParams::default().limit(2))
        .await
        .expect("page 1");
    assert_eq!(first.items.len(), 2);
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    let token = first.metadata.continue_.clone().expect("continue token");
    let rv = first.metadata.resource_version.clone();

    // Changes after page 1 do not show on later pages.
    api.delete("v1", "Service", "default", "s3");
    api.apply(service("default", "s9", "10.96.0.9"));
    let second = services
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .expect("page 2");
    assert_eq!(second.metadata.resource_version, rv);
    let names: Vec<String> = second.items.iter().map(ResourceExt::name_any).collect();
    assert_eq!(names, ["s2", "s3"]);
    let third = services
        .list(
            &ListParams::default()
                .limit(2)
                .continue_token(second.metadata.continue_.as_deref().expect("token")),
        )
        .await
        .expect("page 3");
    assert_eq!(
        third
            .items
            .iter()
            .map(ResourceExt::name_any)
            .collect::<Vec<_>>(),
        ["s4"]
    );
    assert_eq!(third.metadata.continue_, None);

    // An Exact list at the old version is rebuilt from history.
    let exact = ListParams::default()
        .at(rv.as_deref().expect("rv"))
        .matching(VersionMatch::Exact);
    assert_eq!(services.list(&exact).await.expect("exact").items.len(), 5);

    api.compact();
    let expired = services
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await;
    assert!(
        matches!(expired, Err(kube::Error::Api(ref s)) if s.code == 410),
        "{expired:?}"
    );
    let expired = services.list(&exact).await;
    assert!(
        matches!(expired, Err(kube::Error::Api(ref s)) if s.code == 410),
        "{expired:?}"
    );

    api.clear_requests();
    let r = Reflector::start(services.clone(), watcher::Config::default().page_size(2));
    r.ready().await;
    assert_eq!(r.names().len(), 5);
    let pages = requests_of(&api, "list", "services");
    assert_eq!(pages.len(), 3, "{pages:#?}");
    assert!(pages[1].param("continue").is_some() && pages[2].param("continue").is_some());
}

/// (e) Bookmarks arrive on raw watches and move the watcher's resume point
/// past events of other resources.
#[tokio::test]
async fn bookmarks_carry_the_current_resource_version() {
    let api = FakeApiServer::new();
    api.set_bookmark_interval(Duration::from_millis(100));
    api.apply(service("default", "a", "10.96.0.10"));
    let start = api.resource_version();
    api.apply(node("node-a", "z1"));
    let now = api.resource_version().to_string();

    let services = Api::<Service>::all(api.client());
    let mut stream = services
        .watch(&WatchParams::default().timeout(2), &start.to_string())
        .await
        .expect("watch")
        .boxed();
    // Nothing changed for Services since `start`: the first event is a bookmark.
    let first = tokio::time::timeout(Duration::from_secs(2), stream.next())
        .await
        .expect("an event within 2 s")
        .expect("watch ended early")
        .expect("watch event");
    let WatchEvent::Bookmark(bookmark) = first else {
        panic!("expected a bookmark, got {first:?}");
    };
    assert_eq!(bookmark.metadata.resource_version, now);
    assert_eq!(bookmark.types.kind, "Service");

    // The watcher resumes from the bookmark, not from its list.
    let r = Reflector::start(services, watcher::Config::default());
    r.ready().await;
    let list_rv = api.resource_version();
    api.apply(node("node-b", "z1"));
    api.apply(node("node-c", "z1"));
    let after = api.resource_version();
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.drop_watches();
    wait_for("resumed watch", Duration::from_secs(3), || {
        requests_of(&api, "watch", "services").len() == 3
    })
    .await;
    let resumed = requests_of(&api, "watch", "services")[2].clone();
    assert_eq!(
        resumed.param("resourceVersion"),
        Some(after.to_string().as_str())
    );
    assert!(after > list_rv);

    // No bookmarks unless asked for.
    let mut quiet = Api::<Service>::all(api.client())
        .watch(
            &WatchParams::default().disable_bookmarks().timeout(1),
            &after.to_string(),
        )
        .await
        .expect("watch")
        .boxed();
    assert!(
        tokio::time::timeout(Duration::from_millis(400), quiet.next())
            .await
            .is_err()
    );
}

/// (f) The binary-facing path: HTTP on a real socket, a kubeconfig kube
/// accepts, and stop/restart on the same port; also `Mode::Reset` over TCP.
#[tokio::test]
async fn serves_kubeconfig_clients_over_tcp() {
    let api = FakeApiServer::new();
    api.apply(service("default", "a", "10.96.0.10"));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let mut server = api.serve_on(listener);
    let path =
        std::env::temp_dir().join(format!("fake-apiserver-{}.kubeconfig", std::process::id()));
    api.write_kubeconfig(server.addr(), &path)
        .expect("kubeconfig");
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("read kubeconfig");
    let _ = std::fs::remove_file(&path);
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("config from kubeconfig");
    assert_eq!(config.cluster_url.to_string(), format!("{}/", server.url()));
    let client = kube::Client::try_from(config).expect("client");
    let services = Api::<Service>::all(client.clone());
    assert_eq!(
        services
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        1
    );

    let r = Reflector::start(services.clone(), watcher::Config::default());
    r.ready().await;
    api.apply(service("default", "b", "10.96.0.11"));
    wait_for("b over TCP", Duration::from_secs(3), || {
        r.store.state().len() == 2
    })
    .await;
    api.drop_watches();
    api.apply(service("default", "c", "10.96.0.12"));
    wait_for("c after drop over TCP", Duration::from_secs(3), || {
        r.store.state().len() == 3
    })
    .await;

    // Down: connections refused. Back: the watcher catches up.
    server.stop();
    assert!(services.list(&ListParams::default()).await.is_err());
    api.apply(service("default", "d", "10.96.0.13"));
    server.restart().expect("restart");
    wait_for("d after restart", Duration::from_secs(5), || {
        r.store.state().len() == 4
    })
    .await;

    api.set_mode(Mode::Reset);
    assert!(services.list(&ListParams::default()).await.is_err());
    api.set_mode(Mode::Healthy);
    assert_eq!(
        services
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        4
    );
}

/// (g) While the server answers 503 the watcher backs off (no hot loop),
/// and it catches up once the server is healthy.
#[tokio::test]
async fn watcher_backs_off_on_503_and_recovers() {
    let api = FakeApiServer::new();
    api.apply(service("default", "a", "10.96.0.10"));
    let r = Reflector::start(
        Api::<Service>::all(api.client()),
        watcher::Config::default(),
    );
    r.ready().await;

    api.set_mode(Mode::Error503);
    api.apply(service("default", "b", "10.96.0.11"));
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let failures = api
        .requests()
        .iter()
        .filter(|q| q.status == Some(503))
        .count();
    assert!(
        (1..=3).contains(&failures),
        "{failures} failed requests in 2 s: {:#?}",
        api.requests()
    );
    assert_eq!(r.store.state().len(), 1);
    assert!(
        r.errors().iter().any(|e| e.contains("503")),
        "{:?}",
        r.errors()
    );

    api.set_mode(Mode::Healthy);
    wait_for("b after recovery", Duration::from_secs(8), || {
        r.store.state().len() == 2
    })
    .await;
}

/// (h) Streaming lists: `sendInitialEvents=true` fills the store without a
/// list; a resumed watch does not ask for initial events again.
#[tokio::test]
async fn streaming_list_fills_the_store() {
    let api = FakeApiServer::new();
    api.apply(service("default", "a", "10.96.0.10"));
    api.apply(service("default", "b", "10.96.0.11"));
    let r = Reflector::start(
        Api::<Service>::all(api.client()),
        watcher::Config::default().streaming_lists(),
    );
    r.ready().await;
    assert_eq!(r.names(), strings(&["default/a", "default/b"]));
    assert!(requests_of(&api, "list", "services").is_empty());
    let first = requests_of(&api, "watch", "services")[0].clone();
    assert_eq!(first.param("sendInitialEvents"), Some("true"));
    assert_eq!(first.param("resourceVersionMatch"), Some("NotOlderThan"));
    assert_eq!(first.param("resourceVersion"), Some("0"));

    api.apply(service("default", "c", "10.96.0.12"));
    wait_for("c", Duration::from_secs(3), || r.store.state().len() == 3).await;
    api.drop_watches();
    api.delete("v1", "Service", "default", "a");
    wait_for("a deleted", Duration::from_secs(3), || {
        r.store.state().len() == 2
    })
    .await;
    let resumed = requests_of(&api, "watch", "services")[1].clone();
    assert_eq!(resumed.param("sendInitialEvents"), None);
    assert_ne!(resumed.param("resourceVersion"), Some("0"));
}

/// GET of single objects, HTTP writes, and the verbs in the request log.
#[tokio::test]
async fn get_create_delete_and_request_log() {
    let api = FakeApiServer::new();
    api.apply(service("default", "a", "10.96.0.10"));
    api.apply(node("node-a", "z1"));
    let client = api.client();
    let services = Api::<Service>::namespaced(client.clone(), "default");
    let a = services.get("a").await.expect("get a");
    assert_eq!(
        a.spec.and_then(|s| s.cluster_ip).as_deref(),
        Some("10.96.0.10")
    );
    assert!(a.metadata.uid.is_some() && a.metadata.creation_timestamp.is_some());
    let missing = services.get("nope").await;
    assert!(
        matches!(missing, Err(kube::Error::Api(ref s)) if s.code == 404),
        "{missing:?}"
    );
    let node_a = Api::<Node>::all(client.clone())
        .get("node-a")
        .await
        .expect("get node");
    assert_eq!(node_a.metadata.namespace, None);

    let created: Service =
        serde_json::from_value(service("default", "b", "10.96.0.11")).expect("svc");
    services
        .create(&PostParams::default(), &created)
        .await
        .expect("create");
    assert!(api.get_typed::<Service>("default", "b").is_some());
    services
        .delete("b", &DeleteParams::default())
        .await
        .expect("delete");
    assert!(api.get("v1", "Service", "default", "b").is_none());

    let verbs: Vec<(String, String)> = api
        .requests()
        .into_iter()
        .map(|r| (r.verb, r.resource))
        .collect();
    let expected = [
        ("get", "services"),
        ("get", "services"),
        ("get", "nodes"),
        ("create", "services"),
        ("delete", "services"),
    ];
    assert_eq!(verbs, expected.map(|(v, r)| (v.to_string(), r.to_string())));
}

/// `expire_next_watch` makes the watcher relist; latency delays answers;
/// the watch timeout cap ends watches.
#[tokio::test]
async fn expired_watch_forces_relist_and_latency_delays() {
    let api = FakeApiServer::new();
    api.apply(service("default", "a", "10.96.0.10"));
    let services = Api::<Service>::all(api.client());
    let r = Reflector::start(services.clone(), watcher::Config::default());
    r.ready().await;
    wait_for("watch open", Duration::from_secs(3), || {
        api.open_watches() == 1
    })
    .await;
    api.expire_next_watch();
    api.drop_watches();
    wait_for("relist", Duration::from_secs(4), || {
        requests_of(&api, "list", "services").len() == 2
    })
    .await;

    api.set_latency(Duration::from_millis(300));
    let started = Instant::now();
    services.list(&ListParams::default()).await.expect("list");
    assert!(started.elapsed() >= Duration::from_millis(300));

    // The server-side cap ends a watch early, cleanly.
    api.set_latency(Duration::ZERO);
    api.set_watch_timeout_cap(Some(Duration::from_millis(300)));
    let rv = api.resource_version().to_string();
    let mut short = services
        .watch(&WatchParams::default().disable_bookmarks(), &rv)
        .await
        .expect("watch")
        .boxed();
    let ended = tokio::time::timeout(Duration::from_secs(2), short.next()).await;
    assert!(matches!(ended, Ok(None)), "watch did not end cleanly");
}

/// Metadata-only watches get `PartialObjectMetadata` objects.
#[tokio::test]
async fn metadata_watcher_gets_partial_objects() {
    let api = FakeApiServer::new();
    api.apply(node("node-a", "z1"));
    // kube 5: an `Api<PartialObjectMeta<K>>` makes metadata-only requests.
    let nodes = Api::<PartialObjectMeta<Node>>::all(api.client());
    let mut events = watcher(nodes, watcher::Config::default()).boxed();
    let mut names = Vec::new();
    let collected = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(event) = events.next().await {
            match event.expect("metadata watch event") {
                watcher::Event::InitApply(meta) => names.push((
                    meta.name_any(),
                    meta.labels().get("topology.kubernetes.io/zone").cloned(),
                )),
                watcher::Event::InitDone => return,
                _ => {}
            }
        }
    })
    .await;
    assert!(collected.is_ok(), "no InitDone within 3 s");
    assert_eq!(names, [("node-a".to_string(), Some("z1".to_string()))]);
}

/// A client built from a kubeconfig (unlike `FakeApiServer::client`) has
/// kube's retry layer: it retries 503 answers itself, so a short outage
/// never reaches the watcher as an error — it only delays the answer.
#[tokio::test]
async fn kubeconfig_clients_retry_503_themselves() {
    let api = FakeApiServer::new();
    api.apply(service("default", "a", "10.96.0.10"));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let server = api.serve_on(listener);
    let config = kube::Config::new(server.url().parse().expect("url"));
    let services = Api::<Service>::all(kube::Client::try_from(config).expect("client"));

    api.set_mode(Mode::Error503);
    let healer = api.clone();
    let heal = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        healer.set_mode(Mode::Healthy);
    });
    let list = services.list(&ListParams::default()).await;
    heal.await.expect("healer");
    assert_eq!(
        list.expect("list retried through the outage").items.len(),
        1
    );
    let statuses: Vec<Option<u16>> = api.requests().iter().map(|r| r.status).collect();
    assert!(statuses.len() >= 3, "{statuses:?}");
    assert_eq!(statuses.last(), Some(&Some(200)), "{statuses:?}");
}

/// `serve_on` a listener made inside a network namespace serves only there,
/// and `restart` binds the same address in that namespace again. Needs root.
#[test]
fn restart_rebinds_in_the_listeners_network_namespace() {
    if !support::require_net_admin("restart_rebinds_in_the_listeners_network_namespace") {
        return;
    }
    let ns = support::Netns::new("apisrv");
    let api = FakeApiServer::new();
    api.apply(service("default", "a", "10.96.0.10"));
    let listener = ns
        .in_ns(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind 127.0.0.1:0 in the namespace");
    let mut server = api.serve_on(listener);
    let url = server.url();
    let list_in_ns = || {
        ns.in_ns(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            runtime.block_on(async {
                let config = kube::Config::new(url.parse().expect("url"));
                let client = kube::Client::try_from(config).expect("client");
                let list = Api::<Service>::all(client)
                    .list(&ListParams::default())
                    .await;
                list.map(|l| l.items.len())
            })
        })
    };
    assert_eq!(list_in_ns().expect("list in the namespace"), 1);
    assert!(
        std::net::TcpStream::connect(server.addr()).is_err(),
        "the server must not be reachable from the root namespace"
    );
    server.stop();
    assert!(list_in_ns().is_err(), "stopped server still answers");
    server.restart().expect("restart in the namespace");
    assert_eq!(list_in_ns().expect("list after restart"), 1);
}
