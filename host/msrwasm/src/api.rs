//! The control API of a running VM: HTTP/1.1 with JSON bodies on a Unix
//! socket created with mode 0600, in the manner of Firecracker's and
//! cloud-hypervisor's API sockets (`docs/control-api.md`).
//!
//! | method and path | what |
//! |---|---|
//! | `GET /v1/status` | generation, vCPUs, uptime, unhandled policy, every plugin with its counters |
//! | `PUT /v1/policy` | a manifest (TOML): the same path as a file change; 200 once every vCPU will use it |
//! | `POST /v1/reload` | re-reads every file now |
//! | `GET /v1/state` / `PUT /v1/state` | every plugin's `state_*` store (snapshot, restore) |
//! | `GET /v1/footprint` | the MSRs the guest touched (when the VM records a footprint) |
//! | `GET /metrics` | Prometheus text exposition |
//!
//! [`MetricsServer`] serves `GET /metrics` alone on TCP (loopback by
//! default) for a stock Prometheus server, which cannot scrape a Unix
//! socket: no other path, no authority over the VM, the same bounds.
//!
//! hyper serves HTTP/1.1 with a header read timeout; every request is also
//! bounded in body size and in time, and connections are bounded in number,
//! so a client that is slow, sends too much or never finishes gets an error
//! and never holds up another client or a vCPU (vCPUs never wait on the
//! API: it reads the engine's counters and goes through the engine's change
//! path, like a file change).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::engine::Engine;
use crate::footprint::Footprint;

/// Largest request body (a manifest or a state snapshot).
pub const MAX_BODY: usize = 1 << 20;
/// Time a client has to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to send its request body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 32;

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket path is taken by something that is not a stale socket.
    #[error("API socket {}: {reason}", path.display())]
    Path {
        /// The socket path.
        path: PathBuf,
        /// What is there.
        reason: String,
    },
    /// Binding, chmod or the runtime failed.
    #[error("API socket {}", path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The metrics endpoint could not bind or start.
    #[error("metrics endpoint {addr}")]
    Tcp {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// What the API serves.
#[derive(Clone)]
pub struct ApiState {
    /// The VM's engine.
    pub engine: Engine,
    /// The footprint recorder, if the VM records one.
    pub footprint: Option<Arc<Footprint>>,
}

/// The API on its own thread; stops (and removes the socket) when dropped.
pub struct ApiServer {
    path: PathBuf,
    server: Server,
}

/// A server thread and the way to stop it.
struct Server {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Stops serving: tells the server to stop and waits a little for its
    /// thread (a request compiling a policy may still run).
    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            crate::util::join_within(thread, Duration::from_millis(500));
        }
    }

    /// Serves `routes` of `state` on `listener` (made non-blocking here)
    /// on a thread called `name`, with a runtime of its own.
    fn start<L: Listen>(name: &str, listener: L::Std, state: ApiState, routes: Routes) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads(2)
            .thread_name(format!("{name}-blocking"))
            .build()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let state = Arc::new(state);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || runtime.block_on(serve::<L>(listener, state, routes, rx)))?;
        Ok(Self {
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Routes {
    /// Everything in the table above.
    Control,
    /// `GET /metrics` only.
    MetricsOnly,
}

/// A listener the servers accept connections from.
trait Listen: Sized + 'static {
    /// The standard library's listener, bound before the runtime starts.
    type Std: Send + 'static;
    /// An accepted connection.
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn from_std(std: Self::Std) -> std::io::Result<Self>;
    async fn next(&self) -> std::io::Result<Self::Io>;
}

impl Listen for tokio::net::UnixListener {
    type Std = std::os::unix::net::UnixListener;
    type Io = tokio::net::UnixStream;
    fn from_std(std: Self::Std) -> std::io::Result<Self> {
        std.set_nonblocking(true)?;
        tokio::net::UnixListener::from_std(std)
    }
    async fn next(&self) -> std::io::Result<Self::Io> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Listen for tokio::net::TcpListener {
    type Std = std::net::TcpListener;
    type Io = tokio::net::TcpStream;
    fn from_std(std: Self::Std) -> std::io::Result<Self> {
        std.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(std)
    }
    async fn next(&self) -> std::io::Result<Self::Io> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// The read-only metrics endpoint on TCP (`msrwasm run --metrics-addr`):
/// `GET /metrics` and nothing else, bounded like the control API (header
/// and idle timeouts, [`MAX_CONNECTIONS`], a 64 KiB header buffer). It
/// can change nothing, so it needs no authority; it binds where it is told
/// (loopback unless the operator says otherwise). Stops when dropped.
pub struct MetricsServer {
    addr: std::net::SocketAddr,
    _server: Server,
}

impl MetricsServer {
    /// Binds `addr` (port 0: any free port, see [`MetricsServer::local_addr`])
    /// and serves `engine`'s metrics on a thread of its own.
    pub fn start(addr: std::net::SocketAddr, engine: Engine) -> Result<Self, ApiError> {
        let io = |source| ApiError::Tcp { addr, source };
        let listener = std::net::TcpListener::bind(addr).map_err(io)?;
        let bound = listener.local_addr().map_err(io)?;
        let state = ApiState {
            engine,
            footprint: None,
        };
        let server = Server::start::<tokio::net::TcpListener>("msrwasm-metrics", listener, state, Routes::MetricsOnly)
            .map_err(io)?;
        Ok(Self {
            addr: bound,
            _server: server,
        })
    }

    /// The address it serves on.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.addr
    }
}

impl ApiServer {
    /// Binds `path` (mode 0600) and serves `state` on a thread of its own.
    pub fn start(path: &Path, state: ApiState) -> Result<Self, ApiError> {
        let io = |source| ApiError::Io {
            path: path.to_owned(),
            source,
        };
        clear_stale(path)?;
        // Bind under a temporary name, make it private, then rename: the
        // socket is never reachable with wider permissions.
        let temp = path.with_file_name(format!(
            ".{}.{}.tmp",
            path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&temp);
        let listener = std::os::unix::net::UnixListener::bind(&temp).map_err(io)?;
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        std::fs::rename(&temp, path).map_err(io)?;
        let server =
            Server::start::<tokio::net::UnixListener>("msrwasm-api", listener, state, Routes::Control).map_err(io)?;
        Ok(Self {
            path: path.to_owned(),
            server,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // Stop serving first, then remove the socket.
        self.server.stop();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes a socket nobody listens on at `path`; refuses anything else.
fn clear_stale(path: &Path) -> Result<(), ApiError> {
    let refuse = |reason: &str| ApiError::Path {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(m) if !m.file_type().is_socket() => Err(refuse("exists and is not a socket (not removed)")),
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => Err(refuse("another process is serving on it")),
            Err(_) => std::fs::remove_file(path).map_err(|source| ApiError::Io {
                path: path.to_owned(),
                source,
            }),
        },
    }
}

async fn serve<L: Listen>(
    listener: L::Std,
    state: Arc<ApiState>,
    routes: Routes,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match L::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("the {routes:?} listener could not be registered with its runtime: {e}");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.next() => match accepted {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!("API socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let permit = slots.clone().try_acquire_owned();
        tokio::spawn(async move {
            let io = TokioIo::new(stream);
            let Ok(_permit) = permit else {
                // Over the limit: a fixed answer without reading the request,
                // within a second whatever the client does, then closed.
                let mut stream = io.into_inner();
                let answer = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 32\r\nconnection: close\r\n\r\n{\"error\":\"too many connections\"}";
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    use tokio::io::AsyncWriteExt;
                    let _ = stream.write_all(answer).await;
                    let _ = stream.shutdown().await;
                })
                .await;
                return;
            };
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move {
                    Ok::<_, Infallible>(match routes {
                        Routes::Control => route(req, &state).await,
                        Routes::MetricsOnly => metrics_only(&req, &state.engine),
                    })
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(64 * 1024)
                .serve_connection(io, service);
            // A connection kept idle (or slow) for too long is closed.
            let _ = tokio::time::timeout(Duration::from_secs(300), conn).await;
        });
    }
}

type Reply = Response<Full<Bytes>>;

fn json(status: StatusCode, value: &serde_json::Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: &str, errors: Vec<String>) -> Reply {
    let errors = if errors.is_empty() {
        vec![message.to_owned()]
    } else {
        errors
    };
    json(status, &serde_json::json!({ "error": message, "errors": errors }))
}

/// The request body, bounded in size and time.
async fn body(req: Request<Incoming>) -> Result<Bytes, Reply> {
    let limited = Limited::new(req.into_body(), MAX_BODY);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "the request body did not arrive in time",
            Vec::new(),
        )),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the request body is over {MAX_BODY} bytes"),
            Vec::new(),
        )),
        Ok(Err(e)) => Err(error(
            StatusCode::BAD_REQUEST,
            &format!("cannot read the request body: {e}"),
            Vec::new(),
        )),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

async fn route(req: Request<Incoming>, state: &Arc<ApiState>) -> Reply {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let known = [
        "/v1/status",
        "/v1/policy",
        "/v1/reload",
        "/v1/state",
        "/v1/footprint",
        "/metrics",
    ];
    match (method.clone(), path.as_str()) {
        (Method::GET, "/v1/status") => json(StatusCode::OK, &status(&state.engine)),
        (Method::GET, "/metrics") => metrics(&state.engine),
        (Method::GET, "/v1/state") => json(StatusCode::OK, &state_json(&state.engine.state_snapshot())),
        (Method::GET, "/v1/footprint") => match &state.footprint {
            Some(f) => json(StatusCode::OK, &serde_json::to_value(f.entries()).unwrap_or_default()),
            None => error(
                StatusCode::NOT_FOUND,
                "this VM records no footprint (run it with --footprint or --api-sock)",
                Vec::new(),
            ),
        },
        (Method::PUT, "/v1/policy") => {
            let bytes = match body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let Ok(text) = String::from_utf8(bytes.to_vec()) else {
                return error(StatusCode::BAD_REQUEST, "the manifest is not UTF-8", Vec::new());
            };
            let engine = state.engine.clone();
            // Compiling is slow work: off the API's event loop.
            let result = tokio::task::spawn_blocking(move || engine.update_manifest(&text)).await;
            match result {
                Ok(Ok(generation)) => json(StatusCode::OK, &serde_json::json!({ "generation": generation })),
                Ok(Err(errors)) => error(
                    StatusCode::BAD_REQUEST,
                    "policy refused; the running policy stays",
                    errors.errors().iter().map(crate::util::error_chain).collect(),
                ),
                Err(e) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("policy change failed: {e}"),
                    Vec::new(),
                ),
            }
        }
        (Method::POST, "/v1/reload") => {
            let engine = state.engine.clone();
            match tokio::task::spawn_blocking(move || engine.reload_all()).await {
                Ok(reloads) => {
                    let errors: Vec<String> = reloads
                        .iter()
                        .filter_map(|r| match r {
                            crate::events::Reload::Refused { errors, .. } => Some(errors.clone()),
                            crate::events::Reload::Applied { .. } => None,
                        })
                        .flatten()
                        .collect();
                    match errors.is_empty() {
                        true => json(
                            StatusCode::OK,
                            &serde_json::json!({ "generation": state.engine.generation() }),
                        ),
                        false => error(
                            StatusCode::BAD_REQUEST,
                            "reload refused; the running policy stays",
                            errors,
                        ),
                    }
                }
                Err(e) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("reload failed: {e}"),
                    Vec::new(),
                ),
            }
        }
        (Method::PUT, "/v1/state") => {
            let bytes = match body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            match parse_state(&bytes) {
                Ok(snapshot) => match state.engine.restore_state(&snapshot) {
                    Ok(()) => json(StatusCode::OK, &serde_json::json!({})),
                    Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string(), Vec::new()),
                },
                Err(e) => error(StatusCode::BAD_REQUEST, &e, Vec::new()),
            }
        }
        (_, p) if known.contains(&p) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{method} is not allowed on {p}"),
            Vec::new(),
        ),
        (_, p) => error(StatusCode::NOT_FOUND, &format!("no such endpoint: {p}"), Vec::new()),
    }
}

/// The metrics endpoint's one route.
fn metrics_only(req: &Request<Incoming>, engine: &Engine) -> Reply {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => metrics(engine),
        (method, "/metrics") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{method} is not allowed on /metrics"),
            Vec::new(),
        ),
        (_, p) => error(
            StatusCode::NOT_FOUND,
            &format!("no such endpoint: {p} (this endpoint serves GET /metrics only)"),
            Vec::new(),
        ),
    }
}

/// `GET /v1/status`.
pub(crate) fn status(engine: &Engine) -> serde_json::Value {
    let s = engine.status();
    let plugins: Vec<serde_json::Value> = s
        .plugins
        .iter()
        .map(|p| {
            serde_json::json!({
                "name": p.name,
                "version": p.version,
                "flavour": p.flavour,
                "claims": p.claims,
                "handled": p.stats.handled,
                "fault": p.stats.fault,
                "pass": p.stats.pass,
                "errors": p.stats.errors,
                "quarantined": p.quarantined,
                "quarantines": p.stats.quarantines,
                "skipped": p.stats.skipped,
                "timed_calls": p.stats.timed_calls,
                "timed_ns": p.stats.timed_ns,
            })
        })
        .collect();
    serde_json::json!({
        "reloads": { "applied": s.reloads_applied, "refused": s.reloads_refused },
        "generation": s.generation,
        "vcpus": s.vcpus,
        "uptime_s": s.uptime_s,
        "unhandled": s.unhandled,
        "manifest": s.manifest,
        "plugins": plugins,
    })
}

/// Every plugin's store, keys and values as decimal strings.
pub(crate) fn state_json(snapshot: &crate::plugin::state::StateSnapshot) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = snapshot
        .iter()
        .map(|(plugin, keys)| {
            let keys: serde_json::Map<String, serde_json::Value> = keys
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
                .collect();
            (plugin.clone(), serde_json::Value::Object(keys))
        })
        .collect();
    serde_json::Value::Object(map)
}

/// Parses the `GET /v1/state` shape back.
pub(crate) fn parse_state(bytes: &[u8]) -> Result<crate::plugin::state::StateSnapshot, String> {
    let value: BTreeMap<String, BTreeMap<String, serde_json::Value>> =
        serde_json::from_slice(bytes).map_err(|e| format!("expected {{\"PLUGIN\": {{\"KEY\": \"VALUE\"}}}}: {e}"))?;
    let number = |v: &serde_json::Value| -> Option<i64> {
        match v {
            serde_json::Value::String(s) => s.trim().parse().ok(),
            serde_json::Value::Number(n) => n.as_i64(),
            _ => None,
        }
    };
    value
        .into_iter()
        .map(|(plugin, keys)| {
            let keys = keys
                .into_iter()
                .map(|(k, v)| {
                    let key: i32 = k
                        .trim()
                        .parse()
                        .map_err(|_| format!("plugin `{plugin}`: key `{k}` is not an i32"))?;
                    let value =
                        number(&v).ok_or_else(|| format!("plugin `{plugin}`: value of key {key} is not an i64"))?;
                    Ok((key, value))
                })
                .collect::<Result<_, String>>()?;
            Ok((plugin, keys))
        })
        .collect()
}

/// The `Content-Type` of [`metrics_text`]'s output.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The engine's metrics as OpenMetrics text (what `GET /metrics` serves),
/// for a VMM that exposes them through an HTTP endpoint of its own: serve
/// this string with [`METRICS_CONTENT_TYPE`]. Reading it costs the vCPUs
/// nothing (it adds up counters each vCPU writes without locks).
pub fn metrics_text(engine: &Engine) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(EngineCollector(engine.clone())));
    let mut text = String::new();
    // Writing to a String cannot fail, and the collector's own encoding
    // errors are formatting errors of that String.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

/// `GET /metrics`: the Prometheus text exposition.
fn metrics(engine: &Engine) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(metrics_text(engine))));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(METRICS_CONTENT_TYPE),
    );
    r
}

/// The engine's counters as Prometheus metrics, read at each scrape.
#[derive(Debug)]
struct EngineCollector(Engine);

fn labels<const N: usize>(pairs: [(&'static str, String); N]) -> Vec<(&'static str, String)> {
    pairs.to_vec()
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.0.stats();
        let total = stats.total();
        {
            let mut m = encoder.encode_descriptor(
                "msrwasm_msr_accesses",
                "Deflected MSR accesses decided, by operation and by who answered",
                None,
                MetricType::Counter,
            )?;
            for (op, dir) in [("rdmsr", 0), ("wrmsr", 1)] {
                for (by, v) in [
                    ("plugin", total.by_plugin[dir]),
                    ("kvm", total.by_kvm[dir]),
                    ("unhandled", total.by_unhandled[dir]),
                ] {
                    ConstCounter::new(v)
                        .encode(m.encode_family(&labels([("op", op.into()), ("answered_by", by.into())]))?)?;
                }
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "msrwasm_plugin_calls",
                "Plugin calls, by plugin and result",
                None,
                MetricType::Counter,
            )?;
            for (name, p) in &stats.plugins {
                for (result, v) in [
                    ("handled", p.handled),
                    ("fault", p.fault),
                    ("pass", p.pass),
                    ("error", p.errors),
                    ("skipped", p.skipped),
                ] {
                    ConstCounter::new(v)
                        .encode(m.encode_family(&labels([("plugin", name.clone()), ("result", result.into())]))?)?;
                }
            }
        }
        type PerPlugin = fn(&crate::stats::PluginStats) -> u64;
        let per_plugin: [(&str, &str, PerPlugin); 2] = [
            (
                "msrwasm_plugin_errors",
                "Plugin errors (trap, timeout, bad status, no reply)",
                |p| p.errors,
            ),
            (
                "msrwasm_plugin_quarantines",
                "Times a plugin was quarantined after repeated errors",
                |p| p.quarantines,
            ),
        ];
        for (metric, help, value) in per_plugin {
            let mut m = encoder.encode_descriptor(metric, help, None, MetricType::Counter)?;
            for (name, p) in &stats.plugins {
                ConstCounter::new(value(p)).encode(m.encode_family(&labels([("plugin", name.clone())]))?)?;
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "msrwasm_plugin_call_seconds",
                "Time of plugin calls (a sample: one call in 16 is timed)",
                None,
                MetricType::Histogram,
            )?;
            for (name, p) in &stats.plugins {
                let buckets: Vec<(f64, u64)> = crate::stats::CALL_BUCKETS
                    .iter()
                    .copied()
                    .chain(std::iter::once(f64::MAX))
                    .zip(p.buckets.iter().copied().chain(std::iter::repeat(0)))
                    .collect();
                m.encode_family(&labels([("plugin", name.clone())]))?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                        p.timed_ns as f64 / 1e9,
                        p.timed_calls,
                        &buckets,
                        None,
                    )?;
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "msrwasm_reloads",
                "Policy changes, by result",
                None,
                MetricType::Counter,
            )?;
            for (result, v) in [("applied", stats.reloads_applied), ("refused", stats.reloads_refused)] {
                ConstCounter::new(v).encode(m.encode_family(&labels([("result", result.into())]))?)?;
            }
        }
        let m = encoder.encode_descriptor(
            "msrwasm_policy_generation",
            "The policy generation in force",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.0.generation() as i64).encode(m)?;
        Ok(())
    }
}

/// A client request to the API at `socket` (what `msrwasm ctl` and the
/// tests use): the status code and the body. Bounded in time.
#[cfg(feature = "tools")]
pub fn request(socket: &Path, method: &str, path: &str, body: Option<Vec<u8>>) -> std::io::Result<(u16, String)> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let work = async {
            let stream = tokio::net::UnixStream::connect(socket).await?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(conn);
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, "localhost")
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(std::io::Error::other)?;
            let response = sender.send_request(req).await.map_err(std::io::Error::other)?;
            let status = response.status().as_u16();
            let bytes = Limited::new(response.into_body(), 64 << 20)
                .collect()
                .await
                .map_err(std::io::Error::other)?
                .to_bytes();
            Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
        };
        tokio::time::timeout(Duration::from_secs(120), work)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer from the API in 120 s"))?
    })
}
