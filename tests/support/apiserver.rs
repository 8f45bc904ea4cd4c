//! A fake Kubernetes API server, in process, for testing kproxy's cluster mode.
//!
//! No real kube-apiserver can run on the test machines, yet kproxy's cluster
//! source must be tested against the real list/watch protocol — resource
//! versions, resumed watches, bookmarks, `410 Gone`, dropped connections,
//! slow or unreachable servers — because that is where informer bugs live.
//! [`FakeApiServer`] implements the subset of the API that kube-runtime's
//! watchers and reflectors use, for any resource, over JSON:
//!
//! * **Storage**: untyped JSON objects per resource, keyed by namespace and
//!   name, with one global, monotonically increasing resourceVersion (set in
//!   every object and list), `uid` and `creationTimestamp` filled in, and a
//!   per-resource **event log** (`ADDED`/`MODIFIED`/`DELETED`, with the object
//!   before and after). Tests change objects with the synchronous
//!   [`FakeApiServer::apply`] / [`FakeApiServer::delete`] (and typed
//!   variants); applying an unchanged object is a no-op, as on a real server.
//! * **GET** of one object (`404 NotFound` Status when absent), **LIST** with
//!   `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`,
//!   `k notin (a,b)`, comma = AND), `fieldSelector` (`metadata.name`,
//!   `metadata.namespace` with `=`, `==`, `!=`), `limit` + `continue`
//!   (pages are a consistent snapshot at the first page's resourceVersion,
//!   rebuilt from the event log; an expired token gets `410 Expired`), and
//!   `resourceVersion` + `resourceVersionMatch` (`NotOlderThan`, `Exact` —
//!   an `Exact` list older than the compacted history gets HTTP 410).
//!   Items carry no `apiVersion`/`kind`, like the real server's lists.
//! * **WATCH** (`watch=true`): newline-delimited JSON events. A watch from
//!   resourceVersion N first **replays every logged event newer than N** —
//!   kube's watcher opens its watch only after its list returned, so
//!   changes in between are otherwise lost — then streams live events.
//!   Selectors are applied per event the way the apiserver's watch cache
//!   does: an object modified into the selector arrives as `ADDED`, one
//!   modified out of it as `DELETED`. `resourceVersion` unset or `"0"` sends
//!   the current objects as `ADDED` first; `sendInitialEvents=true` (streaming
//!   lists, with `resourceVersionMatch=NotOlderThan`) does too and then sends
//!   the `BOOKMARK` annotated `k8s.io/initial-events-end: "true"`. With
//!   `allowWatchBookmarks=true` a `BOOKMARK` carrying the current
//!   resourceVersion is sent every [`FakeApiServer::set_bookmark_interval`]
//!   (default 1 s). The stream ends cleanly after `timeoutSeconds` (capped by
//!   [`FakeApiServer::set_watch_timeout_cap`]). A watch from a
//!   resourceVersion older than the last [`FakeApiServer::compact`] gets
//!   HTTP 200 and one `ERROR` event carrying a `410 Expired` Status, as the
//!   real server's watch cache answers. Query validation follows the
//!   apiserver's `ValidateListOptions` (422 Invalid).
//! * **Writes over HTTP** (POST create incl. `generateName`, PUT update with
//!   resourceVersion conflict check, DELETE) for completeness — kproxy may
//!   post Events. PATCH and subresources are not implemented (405 / 404).
//! * `Accept: application/json;as=PartialObjectMetadata…` (kube's
//!   `metadata_watcher`) returns `PartialObjectMetadata(List)` shapes.
//! * `/version`, `/healthz`, `/livez`, `/readyz`.
//! * Every request is **logged** ([`FakeApiServer::requests`]) with its
//!   Kubernetes verb, resource and answer, so tests can compare the verbs a
//!   client uses with an RBAC ClusterRole.
//!
//! **Faults**, all switchable from any thread at any time:
//! [`FakeApiServer::drop_watches`] aborts every open watch stream (the client
//! sees its connection end mid-stream); [`FakeApiServer::set_mode`] makes
//! every request answer `503` ([`Mode::Error503`]), hang until the mode
//! changes back like a black-holed network ([`Mode::Hang`]), or fail at
//! the connection level ([`Mode::Reset`]); [`FakeApiServer::set_latency`]
//! delays every answer; [`FakeApiServer::compact`] drops the event history so
//! resumed watches get `410`; [`FakeApiServer::expire_next_watch`] makes the
//! next watch request fail with `410`. Over TCP, [`ServerHandle::stop`] closes
//! the listening socket (connections are refused) and
//! [`ServerHandle::restart`] opens it again on the same address, in the same
//! network namespace.
//!
//! **Serving**: [`FakeApiServer::client`] gives a `kube::Client` that calls
//! the server in process (no socket); [`FakeApiServer::serve_on`] serves
//! plain HTTP on a listener the test created — typically inside the network
//! namespace the kproxy binary will run in — on a thread with its own tokio
//! runtime, and [`FakeApiServer::write_kubeconfig`] writes a kubeconfig for
//! it:
//!
//! ```ignore
//! let api = FakeApiServer::new();
//! api.apply(json!({"apiVersion": "v1", "kind": "Service", ...}));
//! let listener = ns.in_ns(|| std::net::TcpListener::bind("127.0.0.1:0")).unwrap();
//! let server = api.serve_on(listener);
//! api.write_kubeconfig(server.addr(), &dir.join("kubeconfig")).unwrap();
//! // start kproxy --kubeconfig … in `ns`, then change objects:
//! api.delete("v1", "Service", "default", "web");
//! ```
//!
//! Not implemented: authentication/authorization (every request is
//! allowed), PATCH, subresources, protobuf, gzip, HTTP/2, `Table` output,
//! field selectors other than `metadata.name`/`metadata.namespace`, and the
//! 3-second wait for a `NotOlderThan` resourceVersion newer than the
//! server's (answered at once with `504`).

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::future::IntoFuture;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use axum::Router;
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

/// Default period between `BOOKMARK` events on watches that allow them.
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// Watch duration when the request has no `timeoutSeconds` (the real server
/// picks a random 30–60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// One kind of object the server stores and serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceType {
    /// API group; empty for the core group (`/api/v1`).
    pub group: String,
    /// API version within the group, e.g. `v1`.
    pub version: String,
    /// Lower-case plural used in paths, e.g. `services`.
    pub plural: String,
    /// `kind` of one object, e.g. `Service`.
    pub kind: String,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
}

impl ResourceType {
    /// Describes a resource; `group` is empty for the core group.
    pub fn new(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        ResourceType {
            group: group.to_string(),
            version: version.to_string(),
            plural: plural.to_string(),
            kind: kind.to_string(),
            namespaced,
        }
    }

    /// `apiVersion` of its objects: `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `kind` of its lists, e.g. `ServiceList`.
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// The resources served by default: the four kproxy watches (Services,
    /// EndpointSlices, Nodes, ServiceCIDRs) plus Namespaces and both Event
    /// APIs (kproxy may post Events).
    pub fn defaults() -> Vec<ResourceType> {
        vec![
            ResourceType::new("", "v1", "services", "Service", true),
            ResourceType::new(
                "discovery.k8s.io",
                "v1",
                "endpointslices",
                "EndpointSlice",
                true,
            ),
            ResourceType::new("", "v1", "nodes", "Node", false),
            ResourceType::new(
                "networking.k8s.io",
                "v1",
                "servicecidrs",
                "ServiceCIDR",
                false,
            ),
            ResourceType::new("", "v1", "namespaces", "Namespace", false),
            ResourceType::new("", "v1", "events", "Event", true),
            ResourceType::new("events.k8s.io", "v1", "events", "Event", true),
        ]
    }
}

/// How the server answers; see [`FakeApiServer::set_mode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Normal operation.
    Healthy,
    /// Every request gets `503 ServiceUnavailable`; entering this mode ends
    /// open watch streams, as a restarting or overloaded server would.
    Error503,
    /// Requests are accepted but not answered, and open watch streams
    /// deliver nothing (not even their timeout), until the mode changes —
    /// a network partition that later heals. A client without timeouts
    /// waits that long.
    Hang,
    /// Connection-level failure: the in-process client's requests fail as if
    /// the connection were refused; over TCP new connections are closed at
    /// once and established ones fail on their next read or write. Entering
    /// this mode ends open watch streams. (For a closed port, use
    /// [`ServerHandle::stop`].)
    Reset,
}

impl Mode {
    fn to_u8(self) -> u8 {
        match self {
            Mode::Healthy => 0,
            Mode::Error503 => 1,
            Mode::Hang => 2,
            Mode::Reset => 3,
        }
    }

    fn from_u8(v: u8) -> Mode {
        match v {
            1 => Mode::Error503,
            2 => Mode::Hang,
            3 => Mode::Reset,
            _ => Mode::Healthy,
        }
    }
}

/// One request the server received, in arrival order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// Arrival number, from 1 (not reset by `clear_requests`).
    pub seq: u64,
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Path without the query, e.g. `/api/v1/services`.
    pub path: String,
    /// Raw query string (still percent-encoded), empty if none.
    pub query: String,
    /// Decoded query parameters, in order.
    pub params: Vec<(String, String)>,
    /// Kubernetes verb: `get`, `list`, `watch`, `create`, `update`, `patch`,
    /// `delete`, `deletecollection`; empty for non-resource paths.
    pub verb: String,
    /// API group of the resource path (empty for the core group).
    pub group: String,
    /// Resource plural from the path (e.g. `endpointslices`); empty for
    /// non-resource paths such as `/version`.
    pub resource: String,
    /// Namespace from the path, if any.
    pub namespace: Option<String>,
    /// Object name from the path, if any.
    pub name: Option<String>,
    /// HTTP status answered; `None` while the request is pending, or if it
    /// never got an answer (client gave up, [`Mode::Reset`]).
    pub status: Option<u16>,
}

impl RequestRecord {
    /// The decoded value of query parameter `key`, if present.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether this was a watch request.
    pub fn is_watch(&self) -> bool {
        self.verb == "watch"
    }
}

/// The fake API server. Cheap to clone: every clone is a handle to the same
/// state. All methods are synchronous and usable from test threads and from
/// async code alike.
#[derive(Clone)]
pub struct FakeApiServer {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<StateData>,
    /// Bumped on every change a watch stream or a hung request may care
    /// about: objects, compaction, drops, mode.
    changes: watch::Sender<u64>,
    mode: AtomicU8,
    open_watches: AtomicUsize,
    requests: Mutex<Vec<RequestRecord>>,
    /// Numbers requests; never reset, so an answer cannot be recorded on a
    /// newer request after [`FakeApiServer::clear_requests`].
    request_seq: AtomicU64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One logged change.
struct LogEntry {
    rv: u64,
    kind: EventType,
    /// The object after the change; for a deletion its last state, with the
    /// deletion's resourceVersion.
    object: Value,
    /// The object before the change (`None` for ADDED).
    prev: Option<Value>,
}

type ObjKey = (String, String);

struct Store {
    resource: ResourceType,
    objects: BTreeMap<ObjKey, Value>,
    log: Vec<LogEntry>,
    /// Newest resourceVersion among events dropped by compaction; a live
    /// watch that had not yet sent those events must fail with 410.
    compacted_upto: u64,
}

struct StateData {
    rv: u64,
    /// Requests for a resourceVersion older than this are `410 Expired`.
    floor: u64,
    uid_counter: u64,
    stores: Vec<Store>,
    drop_epoch: u64,
    expire_watches: usize,
    latency: Duration,
    bookmark_interval: Duration,
    watch_timeout_cap: Option<Duration>,
}

impl fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.state();
        f.debug_struct("FakeApiServer")
            .field("resource_version", &st.rv)
            .field("compacted_at", &st.floor)
            .field(
                "objects",
                &st.stores
                    .iter()
                    .map(|s| (s.resource.plural.clone(), s.objects.len()))
                    .collect::<Vec<_>>(),
            )
            .field("mode", &self.mode())
            .field("open_watches", &self.open_watches())
            .finish()
    }
}

impl Default for FakeApiServer {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeApiServer {
    /// An empty, healthy server serving [`ResourceType::defaults`].
    pub fn new() -> Self {
        let (changes, _) = watch::channel(0);
        FakeApiServer {
            inner: Arc::new(Inner {
                state: Mutex::new(StateData {
                    rv: 1,
                    floor: 0,
                    uid_counter: 0,
                    stores: Vec::new(),
                    drop_epoch: 0,
                    expire_watches: 0,
                    latency: Duration::ZERO,
                    bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
                    watch_timeout_cap: None,
                }),
                changes,
                mode: AtomicU8::new(Mode::Healthy.to_u8()),
                open_watches: AtomicUsize::new(0),
                requests: Mutex::new(Vec::new()),
                request_seq: AtomicU64::new(0),
            }),
        }
        .with_resources(ResourceType::defaults())
    }

    fn with_resources(self, resources: Vec<ResourceType>) -> Self {
        for r in resources {
            self.register(r);
        }
        self
    }

    /// Serves one more resource (no-op if already served).
    pub fn register(&self, resource: ResourceType) {
        let mut st = self.state();
        if !st.stores.iter().any(|s| s.resource == resource) {
            st.stores.push(Store {
                resource,
                objects: BTreeMap::new(),
                log: Vec::new(),
                compacted_upto: 0,
            });
        }
    }

    fn state(&self) -> MutexGuard<'_, StateData> {
        // A panicking test thread must not take every other test down.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn notify(&self) {
        self.inner.changes.send_modify(|n| *n += 1);
    }

    // ----- objects ---------------------------------------------------------

    /// Creates or replaces an object, routed by its `apiVersion` and `kind`
    /// (namespace `default` if a namespaced object has none), and returns it
    /// as stored, with `metadata.resourceVersion`, `uid` and
    /// `creationTimestamp`. Replacing with an identical object changes
    /// nothing and logs no event. Panics on an unknown kind or a missing
    /// name — test bugs.
    pub fn apply(&self, obj: Value) -> Value {
        let mut st = self.state();
        let idx = st
            .store_by_kind(&obj)
            .unwrap_or_else(|e| panic!("FakeApiServer::apply: {e}: {obj}"));
        let stored = st
            .put(idx, obj)
            .unwrap_or_else(|e| panic!("FakeApiServer::apply: {}", e.1));
        drop(st);
        self.notify();
        stored
    }

    /// [`apply`](Self::apply) for a typed object, e.g. a k8s-openapi `Service`.
    pub fn apply_typed<K>(&self, obj: &K) -> Value
    where
        K: kube::Resource<DynamicType = ()> + Serialize,
    {
        let mut value = serde_json::to_value(obj)
            .unwrap_or_else(|e| panic!("FakeApiServer::apply_typed: cannot serialise: {e}"));
        // k8s-openapi writes apiVersion/kind; other types might not.
        if let Some(map) = value.as_object_mut() {
            map.entry("apiVersion")
                .or_insert_with(|| K::api_version(&()).into());
            map.entry("kind").or_insert_with(|| K::kind(&()).into());
        }
        self.apply(value)
    }

    /// Deletes an object; `namespace` is ignored for cluster-scoped kinds.
    /// Returns whether it existed. Panics on an unknown kind.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        let mut st = self.state();
        let idx = st
            .store_index(api_version, kind)
            .unwrap_or_else(|| panic!("FakeApiServer::delete: unknown kind {api_version} {kind}"));
        let ns = if st.stores[idx].resource.namespaced {
            namespace
        } else {
            ""
        };
        let existed = st.remove(idx, ns, name).is_some();
        drop(st);
        if existed {
            self.notify();
        }
        existed
    }

    /// [`delete`](Self::delete) for a typed kind, e.g. `delete_typed::<Service>("default", "web")`.
    pub fn delete_typed<K>(&self, namespace: &str, name: &str) -> bool
    where
        K: kube::Resource<DynamicType = ()>,
    {
        self.delete(&K::api_version(&()), &K::kind(&()), namespace, name)
    }

    /// The stored object, if any; `namespace` is ignored for cluster-scoped kinds.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let st = self.state();
        let idx = st.store_index(api_version, kind)?;
        let store = &st.stores[idx];
        let ns = if store.resource.namespaced {
            namespace
        } else {
            ""
        };
        store
            .objects
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    /// [`get`](Self::get), deserialised into `K`.
    pub fn get_typed<K>(&self, namespace: &str, name: &str) -> Option<K>
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned,
    {
        let value = self.get(&K::api_version(&()), &K::kind(&()), namespace, name)?;
        Some(
            serde_json::from_value(value)
                .unwrap_or_else(|e| panic!("FakeApiServer::get_typed: stored object: {e}")),
        )
    }

    /// Every stored object of a kind, ordered by namespace and name.
    pub fn objects(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let st = self.state();
        st.store_index(api_version, kind)
            .map(|idx| st.stores[idx].objects.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The current (newest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.state().rv
    }

    // ----- faults and tuning -----------------------------------------------

    /// Drops the event history of every resource and moves the
    /// resourceVersion on, so that any request for an older resourceVersion
    /// (a resumed watch, an `Exact` list, a `continue` token) gets
    /// `410 Expired`. Open watch streams that had already sent everything
    /// keep going; one that had not gets an `ERROR` 410 event.
    pub fn compact(&self) {
        let mut st = self.state();
        st.rv += 1;
        st.floor = st.rv;
        for store in &mut st.stores {
            if let Some(last) = store.log.last() {
                store.compacted_upto = store.compacted_upto.max(last.rv);
            }
            store.log.clear();
        }
        drop(st);
        self.notify();
    }

    /// Aborts every open watch stream mid-way; the client sees its
    /// connection end. New watches are unaffected.
    pub fn drop_watches(&self) {
        self.state().drop_epoch += 1;
        self.notify();
    }

    /// The next watch request (of any resource) gets one `ERROR` event with
    /// a `410 Expired` Status, whatever its resourceVersion.
    pub fn expire_next_watch(&self) {
        self.state().expire_watches += 1;
    }

    /// Switches how requests are answered; see [`Mode`].
    pub fn set_mode(&self, mode: Mode) {
        let old = Mode::from_u8(self.inner.mode.swap(mode.to_u8(), Ordering::SeqCst));
        if old != mode && matches!(mode, Mode::Error503 | Mode::Reset) {
            self.state().drop_epoch += 1;
        }
        self.notify();
    }

    /// `set_mode(Error503)` when `true`, `set_mode(Healthy)` when `false`.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.set_mode(if unavailable {
            Mode::Error503
        } else {
            Mode::Healthy
        });
    }

    /// The current [`Mode`].
    pub fn mode(&self) -> Mode {
        Mode::from_u8(self.inner.mode.load(Ordering::SeqCst))
    }

    /// Delays the start of every answer (list, get, watch headers) by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        self.state().latency = latency;
    }

    /// Period of `BOOKMARK` events on watches with `allowWatchBookmarks=true`
    /// (default [`DEFAULT_BOOKMARK_INTERVAL`]); applies to new watches.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        self.state().bookmark_interval = interval.max(Duration::from_millis(10));
    }

    /// Ends every new watch after at most `cap`, whatever its
    /// `timeoutSeconds`, so tests can see clean watch expiry quickly.
    pub fn set_watch_timeout_cap(&self, cap: Option<Duration>) {
        self.state().watch_timeout_cap = cap;
    }

    /// Number of watch streams currently open (a stream the client abandoned
    /// over TCP is only noticed at its next write, e.g. a bookmark).
    pub fn open_watches(&self) -> usize {
        self.inner.open_watches.load(Ordering::SeqCst)
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.requests_lock().clone()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        self.requests_lock().clear();
    }

    fn requests_lock(&self) -> MutexGuard<'_, Vec<RequestRecord>> {
        self.inner
            .requests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    // ----- serving ---------------------------------------------------------

    /// The HTTP API as an axum `Router` (a tower `Service`).
    pub fn router(&self) -> Router {
        Router::new().fallback(handle).with_state(self.clone())
    }

    /// A `kube::Client` that calls this server in process, without sockets
    /// (no timeouts, no retries — unlike a client built from a kubeconfig).
    /// Must be called inside a tokio runtime.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(
            InProcess {
                server: self.clone(),
                router: self.router(),
            },
            "default",
        )
    }

    /// Serves plain HTTP on `listener` from a dedicated thread with its own
    /// tokio runtime, until the returned handle is stopped or dropped.
    /// Create the listener in the network namespace the client runs in
    /// (e.g. with `Netns::in_ns`); [`ServerHandle::restart`] binds the same
    /// address in that namespace again. Panics if the thread cannot start.
    pub fn serve_on(&self, listener: std::net::TcpListener) -> ServerHandle {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("FakeApiServer::serve_on: listener address: {e}"));
        let netns = socket_netns(&listener);
        let running = spawn_server(self.clone(), listener)
            .unwrap_or_else(|e| panic!("FakeApiServer::serve_on {addr}: {e}"));
        ServerHandle {
            server: self.clone(),
            addr,
            netns,
            running: Some(running),
        }
    }

    /// Writes a kubeconfig for `http://ADDR` (no TLS, no credentials,
    /// namespace `default`) that kube's `Kubeconfig::read_from` +
    /// `Config::from_custom_kubeconfig` accept.
    pub fn write_kubeconfig(&self, addr: SocketAddr, path: &Path) -> io::Result<()> {
        std::fs::write(path, kubeconfig_yaml(addr)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("writing kubeconfig {}: {e}", path.display()),
            )
        })
    }

    // ----- request handling ------------------------------------------------

    fn record(&self, method: &Method, uri: &Uri, params: &[(String, String)]) -> u64 {
        let path = uri.path().to_string();
        let target = parse_path(&path);
        let is_watch = params
            .iter()
            .any(|(k, v)| k == "watch" && parse_bool(v) == Some(true));
        let (verb, group, resource, namespace, name) = match &target {
            Target::Resource(r) => {
                let verb = match (method.as_str(), r.name.is_some()) {
                    ("GET", true) => "get",
                    ("GET", false) if is_watch => "watch",
                    ("GET", false) => "list",
                    ("POST", _) => "create",
                    ("PUT", _) => "update",
                    ("PATCH", _) => "patch",
                    ("DELETE", true) => "delete",
                    ("DELETE", false) => "deletecollection",
                    _ => "",
                };
                (
                    verb.to_string(),
                    r.group.clone(),
                    r.plural.clone(),
                    r.namespace.clone(),
                    r.name.clone(),
                )
            }
            _ => Default::default(),
        };
        let seq = self.inner.request_seq.fetch_add(1, Ordering::SeqCst) + 1;
        self.requests_lock().push(RequestRecord {
            seq,
            method: method.to_string(),
            path,
            query: uri.query().unwrap_or_default().to_string(),
            params: params.to_vec(),
            verb,
            group,
            resource,
            namespace,
            name,
            status: None,
        });
        seq
    }

    fn set_status(&self, seq: u64, status: u16) {
        if let Some(r) = self.requests_lock().iter_mut().rev().find(|r| r.seq == seq) {
            r.status = Some(status);
        }
    }

    async fn wait_while_hung(&self) {
        let mut rx = self.inner.changes.subscribe();
        while self.mode() == Mode::Hang {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    async fn serve(
        &self,
        method: Method,
        uri: Uri,
        params: Vec<(String, String)>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response<Body> {
        let latency = self.state().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        self.wait_while_hung().await;
        match self.mode() {
            Mode::Error503 => {
                return status_response(
                    503,
                    "ServiceUnavailable",
                    "the server is currently unable to handle the request (FakeApiServer Mode::Error503)",
                )
            }
            Mode::Reset => return aborted_response(),
            Mode::Healthy | Mode::Hang => {}
        }
        let path = uri.path();
        let r = match parse_path(path) {
            Target::Version => return json_response(200, &version_info()),
            Target::Health => {
                return Response::builder()
                    .status(200)
                    .body(Body::from("ok"))
                    .unwrap_or_default()
            }
            Target::Unknown => return not_found_path(),
            Target::Resource(r) => r,
        };
        let Some(idx) = self
            .state()
            .store_index_by_path(&r.group, &r.version, &r.plural)
        else {
            return not_found_path();
        };
        let namespaced = self.state().stores[idx].resource.namespaced;
        let misaddressed = if namespaced {
            // One object needs its namespace; a list may span all of them.
            r.namespace.is_none() && r.name.is_some()
        } else {
            r.namespace.is_some()
        };
        if misaddressed {
            return not_found_path();
        }
        let q = match QueryParams::parse(&params) {
            Ok(q) => q,
            Err(resp) => return resp,
        };
        let shape = Shape::from_headers(&headers);
        match (method, r.name) {
            (Method::GET, Some(name)) => self.get_one(idx, &r.namespace, &name, shape),
            (Method::GET, None) if q.watch => self.watch(idx, r.namespace, q, shape),
            (Method::GET, None) => self.list(idx, &r.namespace, &q, shape),
            (Method::POST, None) => self.create(idx, &r.namespace, &body),
            (Method::PUT, Some(name)) => self.update(idx, &r.namespace, &name, &body),
            (Method::DELETE, Some(name)) => self.delete_http(idx, &r.namespace, &name),
            (m, _) => status_response(
                405,
                "MethodNotAllowed",
                &format!("FakeApiServer does not implement {m} on {path}"),
            ),
        }
    }

    fn get_one(&self, idx: usize, ns: &Option<String>, name: &str, shape: Shape) -> Response<Body> {
        let st = self.state();
        let store = &st.stores[idx];
        let key = (ns.clone().unwrap_or_default(), name.to_string());
        match store.objects.get(&key) {
            Some(obj) => json_response(200, &shape.object(obj)),
            None => not_found_object(&store.resource, name),
        }
    }

    fn list(
        &self,
        idx: usize,
        ns: &Option<String>,
        q: &QueryParams,
        shape: Shape,
    ) -> Response<Body> {
        let st = self.state();
        let store = &st.stores[idx];
        let current = st.rv;

        // Which snapshot, and where in it, this page starts.
        let (snapshot_rv, start_after) = if let Some(token) = &q.continue_token {
            let Some((rv, key)) = parse_continue(token) else {
                return status_response(400, "BadRequest", "continue key is not valid");
            };
            if rv < st.floor {
                return status_response(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter.",
                );
            }
            (rv, Some(key))
        } else {
            match (q.resource_version, q.version_match.as_deref()) {
                (None | Some(0), _) => (current, None),
                (Some(n), Some("Exact")) => {
                    if n < st.floor {
                        return expired_response(n, st.floor);
                    }
                    if n > current {
                        return too_large_response(n, current);
                    }
                    (n, None)
                }
                (Some(n), _) => {
                    if n > current {
                        return too_large_response(n, current);
                    }
                    (current, None)
                }
            }
        };

        let objects = store.snapshot_at(snapshot_rv, current);
        let mut matching = objects
            .iter()
            .filter(|((ons, _), obj)| ns.as_ref().is_none_or(|n| n == ons) && q.filter.matches(obj))
            .filter(|(key, _)| start_after.as_ref().is_none_or(|after| *key > after));
        let limit = q
            .limit
            .filter(|&l| l > 0)
            .map_or(usize::MAX, |l| l as usize);
        let mut items = Vec::new();
        let mut last_key = None;
        for (key, obj) in matching.by_ref().take(limit) {
            items.push(shape.list_item(obj));
            last_key = Some(key.clone());
        }
        let remaining = matching.count();
        let mut metadata = json!({ "resourceVersion": snapshot_rv.to_string() });
        if remaining > 0 {
            if let Some((kns, kname)) = last_key {
                metadata["continue"] = format!("{snapshot_rv}:{kns}/{kname}").into();
                if q.filter.is_empty() {
                    metadata["remainingItemCount"] = remaining.into();
                }
            }
        }
        let (api_version, kind) = shape.list_type(&store.resource);
        json_response(
            200,
            &json!({
                "apiVersion": api_version,
                "kind": kind,
                "metadata": metadata,
                "items": items,
            }),
        )
    }

    fn watch(
        &self,
        idx: usize,
        ns: Option<String>,
        q: QueryParams,
        shape: Shape,
    ) -> Response<Body> {
        let mut st = self.state();
        let current = st.rv;
        let resource = st.stores[idx].resource.clone();
        let mut queue = VecDeque::new();
        let mut done = false;
        let filter = WatchFilter {
            namespace: ns,
            selectors: q.filter,
        };
        let last_rv = if st.expire_watches > 0 {
            st.expire_watches -= 1;
            let rv = q.resource_version.unwrap_or(current);
            queue.push_back(event_line(
                "ERROR",
                &expired_status(rv, st.floor.max(current)),
            ));
            done = true;
            current
        } else if q.send_initial_events == Some(true) {
            // Streaming list: the current state, then the end marker.
            // (NotOlderThan N with N > current would wait on a real server.)
            for obj in st.stores[idx].objects.values() {
                if filter.matches(obj) {
                    queue.push_back(event_line("ADDED", &shape.object(obj)));
                }
            }
            queue.push_back(event_line(
                "BOOKMARK",
                &shape.bookmark(&resource, current, true),
            ));
            current
        } else {
            match q.resource_version {
                None | Some(0) => {
                    // "Start at most recent/any": synthetic ADDED for the
                    // current state, unless sendInitialEvents=false.
                    if q.send_initial_events.is_none() {
                        for obj in st.stores[idx].objects.values() {
                            if filter.matches(obj) {
                                queue.push_back(event_line("ADDED", &shape.object(obj)));
                            }
                        }
                    }
                    current
                }
                Some(n) if n < st.floor => {
                    queue.push_back(event_line("ERROR", &expired_status(n, st.floor)));
                    done = true;
                    n
                }
                // Events newer than n are replayed from the log.
                Some(n) => n,
            }
        };
        let bookmark_interval = st.bookmark_interval;
        let mut timeout = q
            .timeout_seconds
            .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
        if let Some(cap) = st.watch_timeout_cap {
            timeout = timeout.min(cap);
        }
        let drop_epoch = st.drop_epoch;
        drop(st);

        self.inner.open_watches.fetch_add(1, Ordering::SeqCst);
        let now = Instant::now();
        let stream = WatchStream {
            server: self.clone(),
            idx,
            resource,
            filter,
            shape,
            last_rv,
            queue,
            done,
            changes: self.inner.changes.subscribe(),
            bookmarks: q.allow_watch_bookmarks,
            bookmark_interval,
            next_bookmark: now + bookmark_interval,
            deadline: now + timeout,
            drop_epoch,
        };
        let body = Body::from_stream(futures::stream::unfold(stream, WatchStream::next_chunk));
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(body)
            .unwrap_or_default()
    }

    fn create(&self, idx: usize, ns: &Option<String>, body: &Bytes) -> Response<Body> {
        let mut obj = match parse_body(body) {
            Ok(obj) => obj,
            Err(resp) => return resp,
        };
        let mut st = self.state();
        let resource = st.stores[idx].resource.clone();
        if let Err(resp) = check_body_identity(&mut obj, &resource, ns.as_deref(), None) {
            return resp;
        }
        if meta_str(&obj, "name").is_none() {
            match meta_str(&obj, "generateName") {
                Some(prefix) => {
                    st.uid_counter += 1;
                    let name = format!("{prefix}{:05x}", st.uid_counter);
                    set_meta(&mut obj, "name", name.into());
                }
                None => {
                    return status_response(
                        422,
                        "Invalid",
                        "metadata.name: Required value: name or generateName is required",
                    )
                }
            }
        }
        let key = (
            ns.clone().unwrap_or_default(),
            meta_str(&obj, "name").unwrap_or_default(),
        );
        if st.stores[idx].objects.contains_key(&key) {
            return status_response(
                409,
                "AlreadyExists",
                &format!("{} \"{}\" already exists", resource.plural, key.1),
            );
        }
        match st.put(idx, obj) {
            Ok(stored) => {
                drop(st);
                self.notify();
                json_response(201, &stored)
            }
            Err((code, msg)) => status_response(code, "Invalid", &msg),
        }
    }

    fn update(&self, idx: usize, ns: &Option<String>, name: &str, body: &Bytes) -> Response<Body> {
        let mut obj = match parse_body(body) {
            Ok(obj) => obj,
            Err(resp) => return resp,
        };
        let mut st = self.state();
        let resource = st.stores[idx].resource.clone();
        if let Err(resp) = check_body_identity(&mut obj, &resource, ns.as_deref(), Some(name)) {
            return resp;
        }
        let key = (ns.clone().unwrap_or_default(), name.to_string());
        let Some(existing) = st.stores[idx].objects.get(&key) else {
            return not_found_object(&resource, name);
        };
        let existing_rv = meta_str(existing, "resourceVersion").unwrap_or_default();
        let expected = meta_str(&obj, "resourceVersion").filter(|rv| !rv.is_empty());
        if let Some(expected) = &expected {
            if *expected != existing_rv {
                return status_response(
                    409,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on {} \"{name}\": the object has been \
                         modified; please apply your changes to the latest version and try again",
                        resource.plural
                    ),
                );
            }
        }
        match st.put(idx, obj) {
            Ok(stored) => {
                drop(st);
                self.notify();
                json_response(200, &stored)
            }
            Err((code, msg)) => status_response(code, "Invalid", &msg),
        }
    }

    fn delete_http(&self, idx: usize, ns: &Option<String>, name: &str) -> Response<Body> {
        let mut st = self.state();
        let resource = st.stores[idx].resource.clone();
        match st.remove(idx, ns.as_deref().unwrap_or_default(), name) {
            Some(obj) => {
                drop(st);
                self.notify();
                json_response(200, &obj)
            }
            None => not_found_object(&resource, name),
        }
    }
}

impl StateData {
    fn store_index(&self, api_version: &str, kind: &str) -> Option<usize> {
        self.stores
            .iter()
            .position(|s| s.resource.api_version() == api_version && s.resource.kind == kind)
    }

    fn store_by_kind(&self, obj: &Value) -> Result<usize, String> {
        let api_version = obj["apiVersion"]
            .as_str()
            .ok_or("object has no apiVersion")?;
        let kind = obj["kind"].as_str().ok_or("object has no kind")?;
        self.store_index(api_version, kind).ok_or_else(|| {
            format!("unknown kind {api_version} {kind} (see FakeApiServer::register)")
        })
    }

    fn store_index_by_path(&self, group: &str, version: &str, plural: &str) -> Option<usize> {
        self.stores.iter().position(|s| {
            s.resource.group == group
                && s.resource.version == version
                && s.resource.plural == plural
        })
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Creates or replaces `obj` in store `idx` and logs the event; `Err`
    /// carries an HTTP code and message. An unchanged object is not
    /// rewritten.
    fn put(&mut self, idx: usize, mut obj: Value) -> Result<Value, (u16, String)> {
        let resource = self.stores[idx].resource.clone();
        if !obj.is_object() {
            return Err((400, "object is not a JSON object".into()));
        }
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        let name = meta_str(&obj, "name")
            .filter(|n| !n.is_empty())
            .ok_or((422, "metadata.name: Required value".to_string()))?;
        let ns = if resource.namespaced {
            let ns = meta_str(&obj, "namespace")
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "default".into());
            set_meta(&mut obj, "namespace", ns.clone().into());
            ns
        } else {
            if let Some(meta) = obj["metadata"].as_object_mut() {
                meta.remove("namespace");
            }
            String::new()
        };
        obj["apiVersion"] = resource.api_version().into();
        obj["kind"] = resource.kind.clone().into();
        let key = (ns, name);
        let existing = self.stores[idx].objects.get(&key).cloned();
        match &existing {
            Some(old) => {
                for field in ["uid", "creationTimestamp"] {
                    if meta_str(&obj, field).is_none() {
                        if let Some(v) = old["metadata"].get(field) {
                            set_meta(&mut obj, field, v.clone());
                        }
                    }
                }
                set_meta(
                    &mut obj,
                    "resourceVersion",
                    old["metadata"]["resourceVersion"].clone(),
                );
                if obj == *old {
                    return Ok(obj);
                }
            }
            None => {
                if meta_str(&obj, "uid").is_none() {
                    self.uid_counter += 1;
                    let uid = format!("00000000-0000-4000-8000-{:012x}", self.uid_counter);
                    set_meta(&mut obj, "uid", uid.into());
                }
                if meta_str(&obj, "creationTimestamp").is_none() {
                    set_meta(&mut obj, "creationTimestamp", now_timestamp());
                }
            }
        }
        let rv = self.next_rv();
        set_meta(&mut obj, "resourceVersion", rv.to_string().into());
        let store = &mut self.stores[idx];
        store.objects.insert(key, obj.clone());
        store.log.push(LogEntry {
            rv,
            kind: if existing.is_some() {
                EventType::Modified
            } else {
                EventType::Added
            },
            object: obj.clone(),
            prev: existing,
        });
        Ok(obj)
    }

    fn remove(&mut self, idx: usize, ns: &str, name: &str) -> Option<Value> {
        let key = (ns.to_string(), name.to_string());
        let old = self.stores[idx].objects.remove(&key)?;
        let rv = self.next_rv();
        let mut last = old.clone();
        set_meta(&mut last, "resourceVersion", rv.to_string().into());
        self.stores[idx].log.push(LogEntry {
            rv,
            kind: EventType::Deleted,
            object: last.clone(),
            prev: Some(old),
        });
        Some(last)
    }
}

impl Store {
    /// The objects as they were at resourceVersion `rv` (≥ the compaction
    /// floor, ≤ `current`), rebuilt by undoing newer logged events.
    fn snapshot_at(&self, rv: u64, current: u64) -> BTreeMap<ObjKey, Value> {
        let mut objects = self.objects.clone();
        if rv >= current {
            return objects;
        }
        for entry in self.log.iter().rev().take_while(|e| e.rv > rv) {
            let key = object_key(&entry.object);
            match (&entry.kind, &entry.prev) {
                (EventType::Added, _) | (_, None) => {
                    objects.remove(&key);
                }
                (EventType::Modified | EventType::Deleted, Some(prev)) => {
                    objects.insert(key, prev.clone());
                }
            }
        }
        objects
    }
}

// ----- watch streams -------------------------------------------------------

/// The state of one open watch; its body is `unfold(WatchStream, next_chunk)`.
struct WatchStream {
    server: FakeApiServer,
    idx: usize,
    resource: ResourceType,
    filter: WatchFilter,
    shape: Shape,
    /// Every event of this resource up to here has been queued.
    last_rv: u64,
    queue: VecDeque<Bytes>,
    done: bool,
    changes: watch::Receiver<u64>,
    bookmarks: bool,
    bookmark_interval: Duration,
    next_bookmark: Instant,
    deadline: Instant,
    drop_epoch: u64,
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.server
            .inner
            .open_watches
            .fetch_sub(1, Ordering::SeqCst);
    }
}

/// How a dropped watch looks to an in-process client; mirrors what kube's
/// hyper client reports when the TCP connection under a chunked body closes.
fn dropped_watch_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "FakeApiServer: watch connection dropped",
    )
}

impl WatchStream {
    async fn next_chunk(mut self) -> Option<(Result<Bytes, io::Error>, Self)> {
        loop {
            if let Some(line) = self.queue.pop_front() {
                return Some((Ok(line), self));
            }
            if self.done {
                return None;
            }
            self.changes.borrow_and_update();
            if self.server.state().drop_epoch != self.drop_epoch {
                self.done = true;
                return Some((Err(dropped_watch_error()), self));
            }
            if self.server.mode() == Mode::Hang {
                // A partitioned network delivers nothing, not even the end.
                let _ = self.changes.changed().await;
                continue;
            }
            let now = Instant::now();
            if now >= self.deadline {
                return None;
            }
            self.poll_log();
            if !self.queue.is_empty() || self.done {
                continue;
            }
            if self.bookmarks && now >= self.next_bookmark {
                self.next_bookmark = now + self.bookmark_interval;
                let bookmark = self.shape.bookmark(&self.resource, self.last_rv, false);
                self.queue.push_back(event_line("BOOKMARK", &bookmark));
                continue;
            }
            let bookmark_at = if self.bookmarks {
                self.next_bookmark
            } else {
                self.deadline
            };
            tokio::select! {
                _ = self.changes.changed() => {}
                _ = tokio::time::sleep_until(bookmark_at) => {}
                _ = tokio::time::sleep_until(self.deadline) => {}
            }
        }
    }

    /// Queues the logged events newer than `last_rv`, converted for this
    /// watch's selectors.
    fn poll_log(&mut self) {
        let st = self.server.state();
        let store = &st.stores[self.idx];
        if self.last_rv < store.compacted_upto {
            self.queue
                .push_back(event_line("ERROR", &expired_status(self.last_rv, st.floor)));
            self.done = true;
            return;
        }
        let start = store.log.partition_point(|e| e.rv <= self.last_rv);
        for entry in &store.log[start..] {
            if let Some((kind, obj)) = self.filter.convert(entry) {
                self.queue
                    .push_back(event_line(kind, &self.shape.object(&obj)));
            }
        }
        self.last_rv = self.last_rv.max(st.rv);
    }
}

struct WatchFilter {
    namespace: Option<String>,
    selectors: Selectors,
}

impl WatchFilter {
    fn matches(&self, obj: &Value) -> bool {
        self.namespace
            .as_ref()
            .is_none_or(|ns| meta_str(obj, "namespace").as_ref() == Some(ns))
            && self.selectors.matches(obj)
    }

    /// The event this watch sees for `entry`, as the watch cache does it:
    /// modified into the selection = ADDED, out of it = DELETED (the old
    /// object at the new resourceVersion).
    fn convert(&self, entry: &LogEntry) -> Option<(&'static str, Value)> {
        let was = entry.prev.as_ref().is_some_and(|p| self.matches(p));
        match entry.kind {
            EventType::Added => self
                .matches(&entry.object)
                .then(|| ("ADDED", entry.object.clone())),
            EventType::Deleted => was.then(|| ("DELETED", entry.object.clone())),
            EventType::Modified => match (was, self.matches(&entry.object)) {
                (true, true) => Some(("MODIFIED", entry.object.clone())),
                (false, true) => Some(("ADDED", entry.object.clone())),
                (true, false) => {
                    let mut old = entry.prev.clone().unwrap_or_default();
                    set_meta(&mut old, "resourceVersion", entry.rv.to_string().into());
                    Some(("DELETED", old))
                }
                (false, false) => None,
            },
        }
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": kind, "object": object }))
        .unwrap_or_else(|e| panic!("FakeApiServer: cannot serialise a watch event: {e}"));
    line.push(b'\n');
    Bytes::from(line)
}

// ----- object shapes (full objects or PartialObjectMetadata) ---------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Full,
    Metadata,
}

impl Shape {
    fn from_headers(headers: &HeaderMap) -> Shape {
        let metadata = headers
            .get_all("accept")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("as=PartialObjectMetadata"));
        if metadata {
            Shape::Metadata
        } else {
            Shape::Full
        }
    }

    fn object(self, obj: &Value) -> Value {
        match self {
            Shape::Full => obj.clone(),
            Shape::Metadata => json!({
                "apiVersion": "meta.k8s.io/v1",
                "kind": "PartialObjectMetadata",
                "metadata": obj["metadata"],
            }),
        }
    }

    /// A list item: like the real server, without apiVersion/kind.
    fn list_item(self, obj: &Value) -> Value {
        let mut item = self.object(obj);
        if let Some(map) = item.as_object_mut() {
            map.remove("apiVersion");
            map.remove("kind");
        }
        item
    }

    fn list_type(self, resource: &ResourceType) -> (String, String) {
        match self {
            Shape::Full => (resource.api_version(), resource.list_kind()),
            Shape::Metadata => ("meta.k8s.io/v1".into(), "PartialObjectMetadataList".into()),
        }
    }

    fn bookmark(self, resource: &ResourceType, rv: u64, initial_events_end: bool) -> Value {
        let (api_version, kind) = match self {
            Shape::Full => (resource.api_version(), resource.kind.clone()),
            Shape::Metadata => ("meta.k8s.io/v1".into(), "PartialObjectMetadata".into()),
        };
        let mut metadata = json!({ "resourceVersion": rv.to_string() });
        if initial_events_end {
            metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
        }
        json!({ "apiVersion": api_version, "kind": kind, "metadata": metadata })
    }
}

// ----- query parameters and selectors --------------------------------------

struct QueryParams {
    watch: bool,
    resource_version: Option<u64>,
    version_match: Option<String>,
    send_initial_events: Option<bool>,
    allow_watch_bookmarks: bool,
    timeout_seconds: Option<u64>,
    limit: Option<u64>,
    continue_token: Option<String>,
    filter: Selectors,
}

impl QueryParams {
    /// Parses and validates like the apiserver's `ValidateListOptions`.
    #[allow(clippy::result_large_err)]
    fn parse(params: &[(String, String)]) -> Result<QueryParams, Response<Body>> {
        let get = |key: &str| {
            params
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let bad = |msg: String| status_response(400, "BadRequest", &msg);
        let invalid = |msg: &str| {
            status_response(
                422,
                "Invalid",
                &format!("ListOptions.meta.k8s.io \"\" is invalid: {msg}"),
            )
        };
        let boolean = |key: &str| match get(key) {
            None => Ok(None),
            Some(v) => parse_bool(v)
                .map(Some)
                .ok_or_else(|| bad(format!("invalid value {v:?} for {key}"))),
        };
        let number = |key: &str| match get(key) {
            None | Some("") => Ok(None),
            Some(v) => v
                .parse::<u64>()
                .map(Some)
                .map_err(|_| bad(format!("invalid value {v:?} for {key}"))),
        };
        let watch = boolean("watch")?.unwrap_or(false);
        let rv_text = get("resourceVersion").unwrap_or_default();
        let resource_version = match rv_text {
            "" => None,
            v => Some(
                v.parse::<u64>()
                    .map_err(|_| bad(format!("invalid resource version {v:?}")))?,
            ),
        };
        let version_match = get("resourceVersionMatch")
            .filter(|v| !v.is_empty())
            .map(str::to_string);
        let send_initial_events = boolean("sendInitialEvents")?;
        let allow_watch_bookmarks = boolean("allowWatchBookmarks")?.unwrap_or(false);
        let continue_token = get("continue")
            .filter(|v| !v.is_empty())
            .map(str::to_string);

        if let Some(m) = &version_match {
            if m != "NotOlderThan" && m != "Exact" {
                return Err(invalid(&format!(
                    "resourceVersionMatch: Unsupported value: {m:?}"
                )));
            }
            if rv_text.is_empty() {
                return Err(invalid(
                    "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
                ));
            }
            if m == "Exact" && rv_text == "0" {
                return Err(invalid(
                    "resourceVersionMatch: Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
                ));
            }
            if continue_token.is_some() {
                return Err(invalid(
                    "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden when continue is provided",
                ));
            }
            if watch && send_initial_events.is_none() {
                return Err(invalid(
                    "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
                ));
            }
        }
        if let Some(sie) = send_initial_events {
            if !watch {
                return Err(invalid(
                    "sendInitialEvents: Forbidden: sendInitialEvents is forbidden for list",
                ));
            }
            if version_match.as_deref() != Some("NotOlderThan") {
                return Err(invalid(
                    "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                ));
            }
            if sie && !allow_watch_bookmarks {
                return Err(invalid(
                    "allowWatchBookmarks: Forbidden: allowWatchBookmarks must be set to true when sendInitialEvents is true",
                ));
            }
        }
        let mut filter = Selectors::default();
        if let Some(labels) = get("labelSelector") {
            filter.labels = parse_label_selector(labels)
                .map_err(|e| bad(format!("unable to parse requirement: {e}")))?;
        }
        if let Some(fields) = get("fieldSelector") {
            filter.fields = parse_field_selector(fields).map_err(bad)?;
        }
        Ok(QueryParams {
            watch,
            resource_version,
            version_match,
            send_initial_events,
            allow_watch_bookmarks,
            timeout_seconds: number("timeoutSeconds")?,
            limit: number("limit")?,
            continue_token,
            filter,
        })
    }
}

/// Go's `strconv.ParseBool`, which the apiserver uses for query booleans.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum FieldReq {
    Eq(String, String),
    NotEq(String, String),
}

#[derive(Clone, Debug, Default)]
struct Selectors {
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

impl Selectors {
    fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = obj["metadata"]["labels"].as_object();
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|req| match req {
            LabelReq::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => label(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
        });
        let field = |f: &str| match f {
            "metadata.name" => meta_str(obj, "name").unwrap_or_default(),
            // Only metadata.name/namespace are accepted by the parser.
            _ => meta_str(obj, "namespace").unwrap_or_default(),
        };
        labels_ok
            && self.fields.iter().all(|req| match req {
                FieldReq::Eq(f, v) => field(f) == *v,
                FieldReq::NotEq(f, v) => field(f) != *v,
            })
    }
}

/// Splits at commas outside parentheses.
fn split_terms(s: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    terms
}

fn valid_label_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 316
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_label_value(v: &str) -> bool {
    v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn parse_label_selector(s: &str) -> Result<Vec<LabelReq>, String> {
    let mut reqs = Vec::new();
    for term in split_terms(s) {
        let term = term.trim();
        if term.is_empty() {
            continue;
        }
        let key_ok = |k: &str| {
            if valid_label_key(k) {
                Ok(k.to_string())
            } else {
                Err(format!("invalid label key {k:?}"))
            }
        };
        let value_ok = |v: &str| {
            let v = v.trim();
            if valid_label_value(v) {
                Ok(v.to_string())
            } else {
                Err(format!("invalid label value {v:?}"))
            }
        };
        let set = |rest: &str| -> Result<Vec<String>, String> {
            let inner = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| format!("{term:?}: expected a set in parentheses"))?;
            inner.split(',').map(value_ok).collect()
        };
        let req = if let Some(k) = term.strip_prefix('!') {
            LabelReq::NotExists(key_ok(k.trim())?)
        } else if let Some((k, rest)) = term.split_once(" notin ") {
            LabelReq::NotIn(key_ok(k.trim())?, set(rest)?)
        } else if let Some((k, rest)) = term.split_once(" in ") {
            LabelReq::In(key_ok(k.trim())?, set(rest)?)
        } else if let Some((k, v)) = term.split_once("!=") {
            LabelReq::NotEq(key_ok(k.trim())?, value_ok(v)?)
        } else if let Some((k, v)) = term.split_once("==") {
            LabelReq::Eq(key_ok(k.trim())?, value_ok(v)?)
        } else if let Some((k, v)) = term.split_once('=') {
            LabelReq::Eq(key_ok(k.trim())?, value_ok(v)?)
        } else {
            LabelReq::Exists(key_ok(term)?)
        };
        reqs.push(req);
    }
    Ok(reqs)
}

fn parse_field_selector(s: &str) -> Result<Vec<FieldReq>, String> {
    let mut reqs = Vec::new();
    for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (field, value, negated) = if let Some((f, v)) = term.split_once("!=") {
            (f, v, true)
        } else if let Some((f, v)) = term.split_once("==") {
            (f, v, false)
        } else if let Some((f, v)) = term.split_once('=') {
            (f, v, false)
        } else {
            return Err(format!(
                "invalid selector: '{term}'; can't understand '{term}'"
            ));
        };
        let field = field.trim();
        if field != "metadata.name" && field != "metadata.namespace" {
            return Err(format!(
                "field label not supported: {field} (FakeApiServer knows metadata.name and metadata.namespace)"
            ));
        }
        let (field, value) = (field.to_string(), value.trim().to_string());
        reqs.push(if negated {
            FieldReq::NotEq(field, value)
        } else {
            FieldReq::Eq(field, value)
        });
    }
    Ok(reqs)
}

fn parse_continue(token: &str) -> Option<(u64, ObjKey)> {
    let (rv, key) = token.split_once(':')?;
    let (ns, name) = key.split_once('/')?;
    Some((rv.parse().ok()?, (ns.to_string(), name.to_string())))
}

// ----- paths -----------------------------------------------------------------

struct ResourcePath {
    group: String,
    version: String,
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
}

enum Target {
    Version,
    Health,
    Resource(ResourcePath),
    Unknown,
}

fn parse_path(path: &str) -> Target {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => return Target::Version,
        ["healthz" | "livez" | "readyz"] => return Target::Health,
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Target::Unknown,
    };
    let (plural, namespace, name) = match rest {
        [plural] => (*plural, None, None),
        ["namespaces", ns, plural] => (*plural, Some(*ns), None),
        ["namespaces", ns, plural, name] => (*plural, Some(*ns), Some(*name)),
        [plural, name] => (*plural, None, Some(*name)),
        _ => return Target::Unknown,
    };
    if rest.iter().any(|s| s.is_empty()) {
        return Target::Unknown;
    }
    Target::Resource(ResourcePath {
        group: group.to_string(),
        version: version.to_string(),
        plural: plural.to_string(),
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
    })
}

// ----- helpers ---------------------------------------------------------------

fn meta_str(obj: &Value, field: &str) -> Option<String> {
    obj["metadata"][field].as_str().map(str::to_string)
}

fn set_meta(obj: &mut Value, field: &str, value: Value) {
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    obj["metadata"][field] = value;
}

fn object_key(obj: &Value) -> ObjKey {
    (
        meta_str(obj, "namespace").unwrap_or_default(),
        meta_str(obj, "name").unwrap_or_default(),
    )
}

fn now_timestamp() -> Value {
    let now = k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now());
    serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now))
        .unwrap_or(Value::Null)
}

#[allow(clippy::result_large_err)]
fn parse_body(body: &Bytes) -> Result<Value, Response<Body>> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| status_response(400, "BadRequest", "the request body is not a JSON object"))
}

/// Fills apiVersion/kind/namespace from the path and rejects mismatches.
#[allow(clippy::result_large_err)]
fn check_body_identity(
    obj: &mut Value,
    resource: &ResourceType,
    ns: Option<&str>,
    name: Option<&str>,
) -> Result<(), Response<Body>> {
    let mismatch = |what: &str| {
        status_response(
            400,
            "BadRequest",
            &format!("the {what} of the object does not match the request"),
        )
    };
    for (field, expected) in [
        ("apiVersion", resource.api_version()),
        ("kind", resource.kind.clone()),
    ] {
        match obj[field].as_str() {
            None => obj[field] = expected.into(),
            Some(v) if v == expected => {}
            Some(_) => return Err(mismatch(field)),
        }
    }
    if let Some(ns) = ns {
        match meta_str(obj, "namespace").filter(|n| !n.is_empty()) {
            None => set_meta(obj, "namespace", ns.into()),
            Some(n) if n == ns => {}
            Some(_) => return Err(mismatch("namespace")),
        }
    }
    if let Some(name) = name {
        match meta_str(obj, "name") {
            None => set_meta(obj, "name", name.into()),
            Some(n) if n == name => {}
            Some(_) => return Err(mismatch("name")),
        }
    }
    Ok(())
}

fn status_value(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn expired_status(rv: u64, oldest: u64) -> Value {
    status_value(
        410,
        "Expired",
        &format!("too old resource version: {rv} ({oldest})"),
    )
}

fn expired_response(rv: u64, oldest: u64) -> Response<Body> {
    json_response(410, &expired_status(rv, oldest))
}

fn too_large_response(rv: u64, current: u64) -> Response<Body> {
    let mut status = status_value(
        504,
        "Timeout",
        &format!("Too large resource version: {rv}, current: {current}"),
    );
    status["details"] = json!({
        "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
        "retryAfterSeconds": 1,
    });
    json_response(504, &status)
}

fn status_response(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status_value(code, reason, message))
}

fn not_found_path() -> Response<Body> {
    status_response(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

fn not_found_object(resource: &ResourceType, name: &str) -> Response<Body> {
    let mut status = status_value(
        404,
        "NotFound",
        &format!("{} \"{name}\" not found", resource.plural),
    );
    status["details"] = json!({
        "name": name,
        "group": resource.group,
        "kind": resource.plural,
    });
    json_response(404, &status)
}

fn json_response(code: u16, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value)
        .unwrap_or_else(|e| panic!("FakeApiServer: cannot serialise a response: {e}"));
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap_or_default()
}

/// A response whose body fails at once: over TCP hyper then closes the
/// connection instead of finishing the answer.
fn aborted_response() -> Response<Body> {
    let failing = futures::stream::once(async {
        Err::<Bytes, io::Error>(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "FakeApiServer: Mode::Reset",
        ))
    });
    Response::builder()
        .status(500)
        .body(Body::from_stream(failing))
        .unwrap_or_default()
}

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "37",
        "emulationMajor": "1",
        "emulationMinor": "37",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "36",
        "gitVersion": "v1.37.0-fakeapiserver",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.25.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn kubeconfig_yaml(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: http://{addr}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
    namespace: default
current-context: fake
users:
- name: fake
  user: {{}}
"
    )
}

/// The axum handler for every path.
async fn handle(
    State(server): State<FakeApiServer>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    let params = Query::<Vec<(String, String)>>::try_from_uri(&uri)
        .map(|q| q.0)
        .unwrap_or_default();
    let seq = server.record(&method, &uri, &params);
    let response = server.serve(method, uri, params, headers, body).await;
    server.set_status(seq, response.status().as_u16());
    response
}

// ----- in-process client -----------------------------------------------------

/// The tower service behind [`FakeApiServer::client`]: the router, plus
/// connection-level failure for [`Mode::Reset`].
#[derive(Clone)]
struct InProcess {
    server: FakeApiServer,
    router: Router,
}

impl tower_service::Service<Request<kube::client::Body>> for InProcess {
    type Response = Response<Body>;
    type Error = io::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, io::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<kube::client::Body>) -> Self::Future {
        if self.server.mode() == Mode::Reset {
            let params = Query::<Vec<(String, String)>>::try_from_uri(req.uri())
                .map(|q| q.0)
                .unwrap_or_default();
            self.server.record(req.method(), req.uri(), &params);
            return Box::pin(async {
                Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "FakeApiServer: connection refused (Mode::Reset)",
                ))
            });
        }
        let mut router = self.router.clone();
        Box::pin(async move {
            let response: Result<Response<Body>, Infallible> =
                tower_service::Service::call(&mut router, req).await;
            response.map_err(|never| match never {})
        })
    }
}

// ----- TCP serving -----------------------------------------------------------

/// A TCP server started by [`FakeApiServer::serve_on`]; stops when dropped.
pub struct ServerHandle {
    server: FakeApiServer,
    addr: SocketAddr,
    /// The listener's network namespace when it differs from ours.
    netns: Option<OwnedFd>,
    running: Option<Running>,
}

struct Running {
    shutdown: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle")
            .field("addr", &self.addr)
            .field("other_netns", &self.netns.is_some())
            .field("running", &self.running.is_some())
            .finish()
    }
}

impl ServerHandle {
    /// The address served (and re-bound by [`restart`](Self::restart)).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server whose API this serves.
    pub fn server(&self) -> &FakeApiServer {
        &self.server
    }

    /// Whether the server is serving (not stopped).
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Closes the listening socket and every connection: new connections
    /// are refused, open watches end. Objects and the event log are kept.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.shutdown.send(());
            if running.thread.join().is_err() {
                eprintln!(
                    "FakeApiServer: the server thread for {} panicked",
                    self.addr
                );
            }
        }
    }

    /// Serves again on the same address, in the listener's original network
    /// namespace (no-op if running). Fails if the port was taken meanwhile.
    pub fn restart(&mut self) -> io::Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let listener = bind_in_netns(self.netns.as_ref(), self.addr)?;
        self.running = Some(spawn_server(self.server.clone(), listener)?);
        Ok(())
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_server(server: FakeApiServer, listener: std::net::TcpListener) -> io::Result<Running> {
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
    let thread = std::thread::Builder::new()
        .name(format!("fake-apiserver-{}", addr.port()))
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let router = server.router();
                let serve = axum::serve(
                    FaultyListener {
                        inner: listener,
                        server,
                    },
                    router,
                );
                tokio::select! {
                    result = serve.into_future() => {
                        if let Err(e) = result {
                            eprintln!("FakeApiServer on {addr}: {e}");
                        }
                    }
                    _ = shutdown_rx => {}
                }
            });
            // Dropping the runtime cancels every connection task, closing
            // their sockets; the listener was dropped with the serve future.
            drop(runtime);
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(Running { shutdown, thread }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(io::Error::other(
                "the FakeApiServer thread died while starting",
            ))
        }
    }
}

/// The network namespace `listener` was created in, if it is not ours.
/// `None` also when it cannot be told (SIOCGSKNS needs CAP_NET_ADMIN): then
/// `restart` binds in the current namespace, which is right for
/// unprivileged tests.
fn socket_netns(listener: &std::net::TcpListener) -> Option<OwnedFd> {
    // SAFETY: SIOCGSKNS takes no argument and returns a new file descriptor
    // (or -1) that we take ownership of.
    let fd = unsafe { libc::ioctl(listener.as_raw_fd(), libc::SIOCGSKNS as _) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a freshly opened descriptor owned by nobody else.
    let ns = unsafe { OwnedFd::from_raw_fd(fd) };
    let same = match (
        std::fs::metadata(format!("/proc/self/fd/{}", ns.as_raw_fd())),
        std::fs::metadata("/proc/thread-self/ns/net"),
    ) {
        (Ok(a), Ok(b)) => {
            use std::os::unix::fs::MetadataExt;
            a.ino() == b.ino() && a.dev() == b.dev()
        }
        _ => false,
    };
    (!same).then_some(ns)
}

/// Binds `addr` from a short-lived thread that entered `netns` first.
fn bind_in_netns(netns: Option<&OwnedFd>, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    std::thread::scope(|scope| {
        let handle = scope.spawn(move || {
            if let Some(ns) = netns {
                // SAFETY: setns on a namespace descriptor we own; it only
                // affects this short-lived thread.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let e = io::Error::last_os_error();
                    return Err(io::Error::new(e.kind(), format!("setns for restart: {e}")));
                }
            }
            std::net::TcpListener::bind(addr)
                .map_err(|e| io::Error::new(e.kind(), format!("re-binding {addr}: {e}")))
        });
        handle
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the bind thread panicked")))
    })
}

/// Accepts connections, but closes them at once in [`Mode::Reset`].
struct FaultyListener {
    inner: tokio::net::TcpListener,
    server: FakeApiServer,
}

impl axum::serve::Listener for FaultyListener {
    type Io = FaultyStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (FaultyStream, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    if self.server.mode() == Mode::Reset {
                        drop(stream);
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let server = self.server.clone();
                    return (
                        FaultyStream {
                            inner: stream,
                            server,
                        },
                        addr,
                    );
                }
                // EMFILE and friends: back off a little, as axum does.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connection that fails its next read or write in [`Mode::Reset`].
struct FaultyStream {
    inner: tokio::net::TcpStream,
    server: FakeApiServer,
}

impl FaultyStream {
    fn check(&self) -> io::Result<()> {
        if self.server.mode() == Mode::Reset {
            Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "FakeApiServer: Mode::Reset",
            ))
        } else {
            Ok(())
        }
    }
}

impl AsyncRead for FaultyStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for FaultyStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
