//! Offline object source: Kubernetes objects read from YAML/JSON files (`--manifests PATH`).
//!
//! kproxy can run without an API server, e.g. `kproxy --manifests examples/demo.yaml --once
//! --dry-run`. This module turns such a path into the same k8s-openapi types the cluster
//! (watch) source produces, so both feed the same trackers.
//!
//! * `PATH` is a file, or a directory whose `*.yaml`, `*.yml` and `*.json` files (not
//!   recursive, hidden files ignored) are read in sorted file-name order.
//! * YAML files may hold several documents (`---`); empty documents are ignored. A document
//!   may also be a `kind: List` (as printed by `kubectl get -o yaml`) or a typed list such as
//!   `ServiceList`, whose items need not repeat `apiVersion`/`kind`.
//! * `*.json` files are read with a JSON parser (one value or a stream of values).
//! * Supported kinds: `v1` Service, `discovery.k8s.io/v1` EndpointSlice, `v1` Node and
//!   `networking.k8s.io/v1` ServiceCIDR. Anything else is skipped with a warning
//!   ([`Manifests::skipped`]).
//! * A supported object that does not decode into its type (e.g. `port: "eighty"`) is
//!   recorded in [`Manifests::rejected`] and logged; the rest of the file still loads.
//! * Only a file that cannot be read or parsed at all is an error ([`ManifestError`]), whose
//!   message reads `file:line:column: message`.
//!
//! Semantic checks (IP syntax, port ranges, protocols) belong to the model, not here.
//!
//! # Example
//!
//! ```
//! use std::path::Path;
//! use kproxy::manifests::{self, Manifests};
//!
//! let yaml = r#"
//! apiVersion: v1
//! kind: Service
//! metadata: {name: web, namespace: default}
//! spec:
//!   clusterIP: fd00::10
//!   ports: [{port: 80, protocol: TCP}]
//! ---
//! apiVersion: apps/v1
//! kind: Deployment
//! metadata: {name: web}
//! "#;
//! let mut objects = Manifests::default();
//! manifests::parse_str(Path::new("demo.yaml"), yaml, &mut objects)?;
//! assert_eq!(objects.services.len(), 1);
//! assert_eq!(objects.skipped.len(), 1); // the Deployment
//! # Ok::<(), manifests::ManifestError>(())
//! ```
//!
//! # YAML typing
//!
//! Documents are first read into an untyped tree (`serde_json::Value`) so that one bad object
//! cannot spoil its neighbours, and only then decoded into their k8s-openapi type. The untyped
//! step has to guess scalar types without knowing the target field, like `kubectl` does:
//! unquoted `yes`/`on`/`y`/`true` are booleans (YAML 1.1, as in Kubernetes' own YAML
//! library) and `1.10` is a number, so such a label value must be quoted or the object is
//! rejected (as `kubectl apply` would). Two deliberate deviations keep text intact: numbers
//! with leading zeros (`007`) and the special floats (`.inf`, `.nan`) stay strings.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use k8s_openapi::Resource;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use serde_saphyr::{MessageFormatter as _, Spanned};

/// File extensions read from a manifest directory (case-sensitive, like `kubectl -f DIR`).
const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// Every supported object found under a `--manifests` path, plus what was left out and why.
///
/// Objects appear in file order (files in sorted name order), so a load is deterministic.
/// Objects are kept exactly as written: nothing is defaulted (e.g. a missing
/// `metadata.namespace` stays `None`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Manifests {
    /// `v1` Services.
    pub services: Vec<Service>,
    /// `discovery.k8s.io/v1` EndpointSlices.
    pub endpoint_slices: Vec<EndpointSlice>,
    /// `v1` Nodes.
    pub nodes: Vec<Node>,
    /// `networking.k8s.io/v1` ServiceCIDRs.
    pub service_cidrs: Vec<ServiceCIDR>,
    /// Objects of a supported kind (or with no usable `kind`/`apiVersion`) that could not be
    /// decoded. They are logged and skipped, never fatal: one typo must not stop the proxy
    /// from programming every other service.
    pub rejected: Vec<RejectedObject>,
    /// Objects of a kind or apiVersion kproxy does not consume (Deployments, ConfigMaps,
    /// `discovery.k8s.io/v1beta1` slices, …). Kept so callers can report them; not an error,
    /// since manifest bundles routinely mix kinds.
    pub skipped: Vec<SkippedObject>,
}

impl Manifests {
    /// Number of objects successfully decoded, over all kinds.
    #[must_use]
    pub fn object_count(&self) -> usize {
        self.services.len()
            + self.endpoint_slices.len()
            + self.nodes.len()
            + self.service_cidrs.len()
    }
}

/// An object that looked like something kproxy consumes but could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedObject {
    /// File the object came from.
    pub file: PathBuf,
    /// 1-based line where the object starts, when known (YAML sources; for JSON, the line
    /// of the top-level value holding it).
    pub line: Option<u64>,
    /// The object's `kind` as written (empty if it had none).
    pub kind: String,
    /// `metadata.namespace` from the raw document, if present.
    pub namespace: Option<String>,
    /// `metadata.name` from the raw document, if present.
    pub name: Option<String>,
    /// Why it was rejected (the decoder's message, or what was missing).
    pub reason: String,
}

impl fmt::Display for RejectedObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", Position::new(&self.file, self.line, None))?;
        let kind = if self.kind.is_empty() {
            "object"
        } else {
            self.kind.as_str()
        };
        write!(
            f,
            "{kind} {}: {}",
            ObjectRef::new(self.namespace.as_deref(), self.name.as_deref()),
            self.reason
        )
    }
}

/// An object of a kind or apiVersion that kproxy does not consume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedObject {
    /// File the object came from.
    pub file: PathBuf,
    /// 1-based line where the object starts, when known.
    pub line: Option<u64>,
    /// The object's `apiVersion` as written.
    pub api_version: String,
    /// The object's `kind` as written.
    pub kind: String,
    /// `metadata.namespace`, if present.
    pub namespace: Option<String>,
    /// `metadata.name`, if present.
    pub name: Option<String>,
    /// Whether the kind itself or only its apiVersion is unsupported.
    pub reason: SkipReason,
}

/// Why an object was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// kproxy does not consume this kind at all.
    UnknownKind,
    /// The kind is consumed, but only in another apiVersion (e.g. EndpointSlice
    /// `discovery.k8s.io/v1beta1`, removed from Kubernetes in 1.25).
    UnsupportedApiVersion,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SkipReason::UnknownKind => "kind not used by kproxy",
            SkipReason::UnsupportedApiVersion => "unsupported apiVersion",
        })
    }
}

/// A manifest path that cannot be loaded at all. Each variant names the offending path so
/// `--once` can print the error and exit without further context.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The path (or a file in the directory) does not exist or cannot be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The path that could not be read.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// The directory exists but cannot be listed.
    #[error("{}: cannot list directory: {source}", path.display())]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// The file is not UTF-8 text.
    #[error("{}: not valid UTF-8 (invalid byte at offset {valid_up_to})", path.display())]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// Byte offset of the first invalid byte.
        valid_up_to: usize,
    },
    /// The file is not valid YAML/JSON (syntax error, duplicate key, resource limit…).
    /// Displays as `file:line:column: message`.
    #[error("{}: {message}", Position::new(path, *line, *column))]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error, when the parser knows it.
        line: Option<u64>,
        /// 1-based column of the error, when the parser knows it.
        column: Option<u64>,
        /// The parser's message, without location.
        message: String,
    },
}

impl ManifestError {
    /// The file or directory the error is about.
    #[must_use]
    pub fn path(&self) -> &Path {
        match self {
            ManifestError::Read { path, .. }
            | ManifestError::ReadDir { path, .. }
            | ManifestError::NotUtf8 { path, .. }
            | ManifestError::Parse { path, .. } => path,
        }
    }
}

/// Loads every supported object under `path` (a file or a directory, see the module docs).
///
/// # Errors
///
/// Only when `path` (or a file in it) cannot be read, is not UTF-8, or is not valid
/// YAML/JSON; the error names the file (and line/column for parse errors). Per-object
/// problems are not errors: they end up in [`Manifests::rejected`] / [`Manifests::skipped`].
pub fn load(path: &Path) -> Result<Manifests, ManifestError> {
    let mut manifests = Manifests::default();
    load_into(path, &mut manifests)?;
    Ok(manifests)
}

/// Like [`load`], but appends to `into`, so several paths can be combined.
///
/// Each file is parsed completely before any of its objects is added, so on error `into`
/// holds exactly the objects of the files before the failing one.
///
/// # Errors
///
/// As for [`load`].
pub fn load_into(path: &Path, into: &mut Manifests) -> Result<(), ManifestError> {
    let metadata = fs::metadata(path).map_err(|source| ManifestError::Read {
        path: path.to_owned(),
        source,
    })?;
    if !metadata.is_dir() {
        // Regular files, but also FIFOs such as `--manifests <(kubectl get svc -o yaml)`.
        return load_file(path, into);
    }
    let files = manifest_files(path)?;
    if files.is_empty() {
        tracing::warn!(
            dir = %path.display(),
            "no *.yaml, *.yml or *.json files in manifest directory"
        );
    }
    for file in files {
        load_file(&file, into)?;
    }
    Ok(())
}

/// Parses one file's text (YAML, or JSON when `source_name` ends in `.json`) and appends its
/// objects to `into`. `source_name` is only used for format detection and messages.
///
/// # Errors
///
/// [`ManifestError::Parse`] when `text` is not valid YAML (or JSON); `into` is then left
/// unchanged.
pub fn parse_str(
    source_name: &Path,
    text: &str,
    into: &mut Manifests,
) -> Result<(), ManifestError> {
    let is_json = source_name.extension().is_some_and(|ext| ext == "json");
    let documents = if is_json {
        parse_json(source_name, text)?
    } else {
        parse_yaml(source_name, text)?
    };
    let before = (into.object_count(), into.rejected.len(), into.skipped.len());
    for document in documents {
        ingest_document(source_name, document, into);
    }
    tracing::debug!(
        file = %source_name.display(),
        objects = into.object_count() - before.0,
        rejected = into.rejected.len() - before.1,
        skipped = into.skipped.len() - before.2,
        "loaded manifest file"
    );
    Ok(())
}

/// Lists the manifest files directly in `dir`, sorted by file name for determinism.
///
/// Hidden entries are ignored: besides editor droppings, this skips the `..data` /
/// `..2024_…` entries of a mounted ConfigMap, whose visible `*.yaml` names are symlinks
/// (followed here) into them.
fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let read_dir_error = |source| ManifestError::ReadDir {
        path: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_dir_error)? {
        let entry = entry.map_err(read_dir_error)?;
        let file_name = entry.file_name();
        if file_name.as_encoded_bytes().first() == Some(&b'.') {
            continue;
        }
        let path = entry.path();
        let wanted = path
            .extension()
            .is_some_and(|ext| EXTENSIONS.iter().any(|wanted| ext == *wanted));
        if !wanted {
            continue;
        }
        // Follows symlinks: a dangling one is reported rather than silently ignored.
        let metadata = fs::metadata(&path).map_err(|source| ManifestError::Read {
            path: path.clone(),
            source,
        })?;
        if !metadata.is_dir() {
            files.push((file_name, path));
        }
    }
    files.sort();
    Ok(files.into_iter().map(|(_, path)| path).collect())
}

fn load_file(path: &Path, into: &mut Manifests) -> Result<(), ManifestError> {
    let bytes = fs::read(path).map_err(|source| ManifestError::Read {
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|err| ManifestError::NotUtf8 {
        path: path.to_owned(),
        valid_up_to: err.utf8_error().valid_up_to(),
    })?;
    parse_str(path, &text, into)
}

// ---------------------------------------------------------------------------------------
// Parsing: text -> untyped documents
// ---------------------------------------------------------------------------------------

/// One top-level document before typing.
#[derive(Debug)]
struct RawDocument {
    /// 1-based line where the document's content starts.
    line: Option<u64>,
    body: RawBody,
}

/// A document's content: a mapping (an object or a list), or anything else, which cannot be
/// a Kubernetes object.
#[derive(Debug)]
enum RawBody {
    Mapping {
        fields: Map<String, Value>,
        /// Start line of each element of `items`, when it is a sequence (YAML only).
        item_lines: Vec<Option<u64>>,
    },
    NotMapping(&'static str),
}

/// Reader limits. serde-saphyr's defaults are tuned for configuration files (at most 1,024
/// documents, 250k nodes), which a `kubectl get endpointslices -A -o yaml` dump of a large
/// cluster easily exceeds. Manifest files are chosen by the operator, so the size limits are
/// raised; alias-expansion and nesting protection keep their defaults.
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: 1 << 24,
            max_events: 1 << 30,
            max_nodes: 1 << 30,
            max_total_scalar_bytes: 1 << 30,
        },
        // Keep `.inf`/`.nan` as text instead of failing the whole file.
        non_finite_float_policy: serde_saphyr::NonFiniteFloatPolicy::AsString,
        // `007` would otherwise become the float 7.0; keep the text.
        leading_zero_numbers_as_strings: true,
        // Errors are reported as `file:line:col: message`; no rustc-style snippet.
        with_snippet: false,
    }
}

fn parse_yaml(path: &Path, text: &str) -> Result<Vec<RawDocument>, ManifestError> {
    let documents: Vec<Spanned<RawBody>> =
        serde_saphyr::from_multiple_with_options(text, yaml_options()).map_err(|err| {
            let location = err.location();
            let message =
                serde_saphyr::DefaultMessageFormatter.format_message(err.without_snippet());
            ManifestError::Parse {
                path: path.to_owned(),
                line: location.and_then(|l| known(l.line())),
                column: location.and_then(|l| known(l.column())),
                message: escape_control(&message),
            }
        })?;
    Ok(documents
        .into_iter()
        .map(|doc| RawDocument {
            line: line_of(doc.referenced),
            body: doc.value,
        })
        .collect())
}

/// JSON goes through serde_json rather than the YAML parser: the YAML parser would accept
/// invalid JSON (`{"a": }`) and reject JSON streams (`{…}{…}`), which kubectl accepts.
fn parse_json(path: &Path, text: &str) -> Result<Vec<RawDocument>, ManifestError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let mut documents = Vec::new();
    let mut lines = LineCounter::default();
    loop {
        let end_of_previous = stream.byte_offset();
        let Some(result) = stream.next() else { break };
        let value = result.map_err(|err| {
            let full = err.to_string();
            let suffix = format!(" at line {} column {}", err.line(), err.column());
            ManifestError::Parse {
                path: path.to_owned(),
                line: known(err.line() as u64),
                column: known(err.column() as u64),
                message: full.strip_suffix(&suffix).unwrap_or(&full).to_owned(),
            }
        })?;
        let rest = text.get(end_of_previous..).unwrap_or("");
        let start = end_of_previous + (rest.len() - rest.trim_start().len());
        let line = Some(lines.line_at(text, start));
        let body = match value {
            Value::Null => continue,
            Value::Object(fields) => RawBody::Mapping {
                fields,
                item_lines: Vec::new(),
            },
            Value::Array(_) => RawBody::NotMapping("an array"),
            Value::Bool(_) | Value::Number(_) | Value::String(_) => RawBody::NotMapping("a scalar"),
        };
        documents.push(RawDocument { line, body });
    }
    Ok(documents)
}

/// Incremental byte-offset -> line conversion over increasing offsets.
#[derive(Debug, Default)]
struct LineCounter {
    offset: usize,
    newlines: u64,
}

impl LineCounter {
    fn line_at(&mut self, text: &str, offset: usize) -> u64 {
        if let Some(chunk) = text.get(self.offset..offset) {
            self.newlines += chunk.bytes().filter(|&b| b == b'\n').count() as u64;
            self.offset = offset;
        }
        self.newlines + 1
    }
}

/// Escapes control characters (the message may quote input text) so the error stays on one
/// terminal line, leaving quotes and non-ASCII text readable.
fn escape_control(message: &str) -> String {
    let mut escaped = String::with_capacity(message.len());
    for c in message.chars() {
        if c.is_control() {
            escaped.extend(c.escape_debug());
        } else {
            escaped.push(c);
        }
    }
    escaped
}

/// serde-saphyr uses line/column 0 for "unknown".
fn known(n: u64) -> Option<u64> {
    (n > 0).then_some(n)
}

fn line_of(location: serde_saphyr::Location) -> Option<u64> {
    known(location.line())
}

impl<'de> Deserialize<'de> for RawBody {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawBodyVisitor)
    }
}

/// Reads a document as a field map, but reads `items` element by element so each list item
/// keeps its own source line (a plain `Value` loses all positions).
#[derive(Debug)]
struct RawBodyVisitor;

impl<'de> Visitor<'de> for RawBodyVisitor {
    type Value = RawBody;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a Kubernetes object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawBody, A::Error> {
        let mut fields = Map::new();
        let mut item_lines = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = if key == "items" {
                let items: ItemsWithLines = map.next_value()?;
                item_lines = items.lines;
                items.value
            } else {
                map.next_value::<Value>()?
            };
            fields.insert(key, value);
        }
        Ok(RawBody::Mapping { fields, item_lines })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawBody, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(RawBody::NotMapping("a sequence"))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<RawBody, E> {
        Ok(RawBody::NotMapping("a scalar"))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<RawBody, E> {
        Ok(RawBody::NotMapping("a scalar"))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<RawBody, E> {
        Ok(RawBody::NotMapping("a scalar"))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<RawBody, E> {
        Ok(RawBody::NotMapping("a scalar"))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<RawBody, E> {
        Ok(RawBody::NotMapping("a scalar"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<RawBody, E> {
        Ok(RawBody::NotMapping("null"))
    }

    fn visit_none<E: de::Error>(self) -> Result<RawBody, E> {
        Ok(RawBody::NotMapping("null"))
    }
}

/// The value of an `items` key, with the start line of each element if it is a sequence.
#[derive(Debug)]
struct ItemsWithLines {
    value: Value,
    lines: Vec<Option<u64>>,
}

impl<'de> Deserialize<'de> for ItemsWithLines {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ItemsVisitor)
    }
}

#[derive(Debug)]
struct ItemsVisitor;

impl ItemsVisitor {
    fn plain(value: Value) -> ItemsWithLines {
        ItemsWithLines {
            value,
            lines: Vec::new(),
        }
    }
}

impl<'de> Visitor<'de> for ItemsVisitor {
    type Value = ItemsWithLines;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ItemsWithLines, A::Error> {
        let mut values = Vec::new();
        let mut lines = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Value>>()? {
            lines.push(line_of(item.referenced));
            values.push(item.value);
        }
        Ok(ItemsWithLines {
            value: Value::Array(values),
            lines,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ItemsWithLines, A::Error> {
        Value::deserialize(de::value::MapAccessDeserializer::new(map)).map(Self::plain)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<ItemsWithLines, E> {
        Ok(Self::plain(Value::Bool(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<ItemsWithLines, E> {
        Ok(Self::plain(Value::from(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<ItemsWithLines, E> {
        Ok(Self::plain(Value::from(v)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<ItemsWithLines, E> {
        Ok(Self::plain(Value::from(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<ItemsWithLines, E> {
        Ok(Self::plain(Value::from(v)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<ItemsWithLines, E> {
        Ok(Self::plain(Value::Null))
    }

    fn visit_none<E: de::Error>(self) -> Result<ItemsWithLines, E> {
        Ok(Self::plain(Value::Null))
    }
}

// ---------------------------------------------------------------------------------------
// Dispatch: untyped documents -> typed objects
// ---------------------------------------------------------------------------------------

/// The kinds kproxy consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KnownKind {
    Service,
    EndpointSlice,
    Node,
    ServiceCidr,
}

impl KnownKind {
    const ALL: [KnownKind; 4] = [
        KnownKind::Service,
        KnownKind::EndpointSlice,
        KnownKind::Node,
        KnownKind::ServiceCidr,
    ];

    fn kind(self) -> &'static str {
        match self {
            KnownKind::Service => Service::KIND,
            KnownKind::EndpointSlice => EndpointSlice::KIND,
            KnownKind::Node => Node::KIND,
            KnownKind::ServiceCidr => ServiceCIDR::KIND,
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            KnownKind::Service => Service::API_VERSION,
            KnownKind::EndpointSlice => EndpointSlice::API_VERSION,
            KnownKind::Node => Node::API_VERSION,
            KnownKind::ServiceCidr => ServiceCIDR::API_VERSION,
        }
    }

    fn from_kind(kind: &str) -> Option<KnownKind> {
        KnownKind::ALL
            .into_iter()
            .find(|known| known.kind() == kind)
    }
}

/// Where an object sits, for messages.
#[derive(Debug, Clone, Copy)]
struct Origin<'a> {
    file: &'a Path,
    line: Option<u64>,
}

/// `apiVersion`/`kind` that items of a typed list (`ServiceList`) get when they omit them,
/// as the API server's list responses do.
#[derive(Debug, Clone, Copy)]
struct ItemDefaults<'a> {
    api_version: &'a str,
    kind: KnownKind,
}

fn ingest_document(file: &Path, document: RawDocument, out: &mut Manifests) {
    let origin = Origin {
        file,
        line: document.line,
    };
    match document.body {
        RawBody::Mapping { fields, item_lines } => {
            ingest_object(origin, fields, &item_lines, None, out);
        }
        RawBody::NotMapping(what) => reject(
            origin,
            String::new(),
            (None, None),
            format!("document is {what}, not a Kubernetes object"),
            out,
        ),
    }
}

fn ingest_object(
    origin: Origin<'_>,
    fields: Map<String, Value>,
    item_lines: &[Option<u64>],
    defaults: Option<ItemDefaults<'_>>,
    out: &mut Manifests,
) {
    let identity = object_identity(&fields);
    let kind = match fields.get("kind") {
        Some(Value::String(kind)) => kind.clone(),
        None | Some(Value::Null) => match defaults {
            Some(defaults) => defaults.kind.kind().to_owned(),
            None => {
                return reject(
                    origin,
                    String::new(),
                    identity,
                    "missing `kind`".into(),
                    out,
                )
            }
        },
        Some(other) => {
            let reason = format!("`kind` must be a string, found {other}");
            return reject(origin, other.to_string(), identity, reason, out);
        }
    };
    let api_version = match fields.get("apiVersion") {
        Some(Value::String(api_version)) => api_version.clone(),
        None | Some(Value::Null) => match defaults {
            Some(defaults) => defaults.api_version.to_owned(),
            None => return reject(origin, kind, identity, "missing `apiVersion`".into(), out),
        },
        Some(other) => {
            let reason = format!("`apiVersion` must be a string, found {other}");
            return reject(origin, kind, identity, reason, out);
        }
    };

    if kind == "List" {
        // Generic list (`kubectl get -o yaml`): every item names its own kind.
        return ingest_list(origin, &kind, fields, item_lines, None, out);
    }
    if let Some(element) = kind.strip_suffix("List").and_then(KnownKind::from_kind) {
        if api_version != element.api_version() {
            return skip(
                origin,
                api_version,
                kind,
                identity,
                SkipReason::UnsupportedApiVersion,
                out,
            );
        }
        let defaults = ItemDefaults {
            api_version: &api_version,
            kind: element,
        };
        return ingest_list(origin, &kind, fields, item_lines, Some(defaults), out);
    }

    let Some(known) = KnownKind::from_kind(&kind) else {
        return skip(
            origin,
            api_version,
            kind,
            identity,
            SkipReason::UnknownKind,
            out,
        );
    };
    if api_version != known.api_version() {
        return skip(
            origin,
            api_version,
            kind,
            identity,
            SkipReason::UnsupportedApiVersion,
            out,
        );
    }
    let value = Value::Object(fields);
    let decoded = match known {
        KnownKind::Service => serde_json::from_value(value).map(|o| out.services.push(o)),
        KnownKind::EndpointSlice => {
            serde_json::from_value(value).map(|o| out.endpoint_slices.push(o))
        }
        KnownKind::Node => serde_json::from_value(value).map(|o| out.nodes.push(o)),
        KnownKind::ServiceCidr => serde_json::from_value(value).map(|o| out.service_cidrs.push(o)),
    };
    if let Err(err) = decoded {
        reject(origin, kind, identity, err.to_string(), out);
    }
}

fn ingest_list(
    origin: Origin<'_>,
    list_kind: &str,
    mut fields: Map<String, Value>,
    item_lines: &[Option<u64>],
    defaults: Option<ItemDefaults<'_>>,
    out: &mut Manifests,
) {
    let items = match fields.remove("items") {
        // `items: []` is often printed as `items: null` or left out entirely.
        None | Some(Value::Null) => return,
        Some(Value::Array(items)) => items,
        Some(other) => {
            let identity = object_identity(&fields);
            let reason = format!("`items` must be a sequence, found {}", value_type(&other));
            return reject(origin, list_kind.to_owned(), identity, reason, out);
        }
    };
    for (index, item) in items.into_iter().enumerate() {
        let item_origin = Origin {
            file: origin.file,
            line: item_lines.get(index).copied().flatten().or(origin.line),
        };
        match item {
            Value::Object(item_fields) => {
                ingest_object(item_origin, item_fields, &[], defaults, out);
            }
            other => {
                let reason = format!(
                    "{list_kind} item #{index} is {}, not an object",
                    value_type(&other)
                );
                reject(item_origin, String::new(), (None, None), reason, out);
            }
        }
    }
}

/// `metadata.namespace` and `metadata.name` of a raw object, for messages. Non-string
/// scalars are shown as written (an unquoted `name: 8080` is a typical reason for a reject).
fn object_identity(fields: &Map<String, Value>) -> (Option<String>, Option<String>) {
    let metadata = fields.get("metadata");
    let field = |key: &str| match metadata.and_then(|m| m.get(key)) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(v @ (Value::Number(_) | Value::Bool(_))) => Some(v.to_string()),
        _ => None,
    };
    (field("namespace"), field("name"))
}

fn value_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a sequence",
        Value::Object(_) => "a mapping",
    }
}

fn reject(
    origin: Origin<'_>,
    kind: String,
    (namespace, name): (Option<String>, Option<String>),
    reason: String,
    out: &mut Manifests,
) {
    let rejected = RejectedObject {
        file: origin.file.to_owned(),
        line: origin.line,
        kind,
        namespace,
        name,
        reason,
    };
    tracing::warn!(
        file = %rejected.file.display(),
        line = rejected.line,
        kind = %rejected.kind,
        object = %ObjectRef::new(rejected.namespace.as_deref(), rejected.name.as_deref()),
        reason = %rejected.reason,
        "ignoring manifest object that cannot be decoded"
    );
    out.rejected.push(rejected);
}

fn skip(
    origin: Origin<'_>,
    api_version: String,
    kind: String,
    (namespace, name): (Option<String>, Option<String>),
    reason: SkipReason,
    out: &mut Manifests,
) {
    let skipped = SkippedObject {
        file: origin.file.to_owned(),
        line: origin.line,
        api_version,
        kind,
        namespace,
        name,
        reason,
    };
    tracing::warn!(
        file = %skipped.file.display(),
        line = skipped.line,
        api_version = %skipped.api_version,
        kind = %skipped.kind,
        object = %ObjectRef::new(skipped.namespace.as_deref(), skipped.name.as_deref()),
        reason = %skipped.reason,
        "skipping manifest object"
    );
    out.skipped.push(skipped);
}

/// `namespace/name`, `name`, or `<unnamed>`.
#[derive(Debug, Clone, Copy)]
struct ObjectRef<'a> {
    namespace: Option<&'a str>,
    name: Option<&'a str>,
}

impl<'a> ObjectRef<'a> {
    fn new(namespace: Option<&'a str>, name: Option<&'a str>) -> Self {
        ObjectRef { namespace, name }
    }
}

impl fmt::Display for ObjectRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.namespace, self.name) {
            (Some(namespace), Some(name)) => write!(f, "{namespace}/{name}"),
            (Some(namespace), None) => write!(f, "{namespace}/<unnamed>"),
            (None, Some(name)) => f.write_str(name),
            (None, None) => f.write_str("<unnamed>"),
        }
    }
}

/// `file:line:column`, with the unknown parts left out.
#[derive(Debug, Clone, Copy)]
struct Position<'a> {
    file: &'a Path,
    line: Option<u64>,
    column: Option<u64>,
}

impl<'a> Position<'a> {
    fn new(file: &'a Path, line: Option<u64>, column: Option<u64>) -> Self {
        Position { file, line, column }
    }
}

impl fmt::Display for Position<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        Ok(())
    }
}
