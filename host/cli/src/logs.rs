//! The host's log lines, for a person (`--log-format text`, the default)
//! or for a collector (`--log-format json`: journald, Vector, Loki...).
//!
//! A JSON line is one object:
//!
//! ```json
//! {"time":"2026-12-07T09:00:00.123456Z","level":"WARN","vm":"web-1","event":"plugin_log",
//!  "plugin":"rapl","version":"5c1f0a2b3c4d5e6f","message":"plugin says: hello","vcpu":0}
//! ```
//!
//! `time` (RFC 3339, UTC), `level`, `vm` (the VM's `--name`), `event` (a
//! stable name: `plugin_log`, `plugin_error`, `plugin_quarantined`,
//! `plugin_version`, `reload`, `unhandled_msr`, ...; otherwise the module
//! that logged, such as `msrwasm.oci`), `message`, and `plugin` and
//! `version` whenever a plugin is involved; any other field of the event
//! follows under its own name. One line per event; a closed or full
//! standard error never stops the VM (the line is dropped). No thread of
//! the VM ever writes to standard error itself: every line goes through a
//! queue of [`QUEUE_LINES`] lines to one writer thread; when standard error
//! is not read (a full pipe) further lines are dropped and counted, and
//! the run says how many at its end. The command's
//! own messages (start-up notes, the closing summary) become objects too,
//! with `event` `msrwasm`, so that standard error is JSON lines throughout.

use std::fmt::Write as _;
use std::io::Write as _;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_appender::non_blocking::NonBlocking;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::layer::{Context, Layer};

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line (see `docs/control-api.md`).
    Json,
}

/// The VM name of JSON lines, once `--log-format json` is in force.
static JSON_VM: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Lines waiting for standard error at most; further ones are dropped and
/// counted.
pub const QUEUE_LINES: usize = 16_384;

/// The queue to the writer thread, once [`init`] ran.
static WRITER: std::sync::OnceLock<NonBlocking> = std::sync::OnceLock::new();

/// Where a line goes: the queue once [`init`] ran (never blocks), else
/// standard error itself.
fn writer() -> Box<dyn std::io::Write> {
    match WRITER.get() {
        Some(w) => Box::new(w.clone()),
        None => Box::new(std::io::stderr()),
    }
}

/// Keeps the writer thread; when dropped, waits a bounded time (about a
/// second) for queued lines to reach standard error, then gives up.
pub struct LogGuard {
    _worker: tracing_appender::non_blocking::WorkerGuard,
    writer: NonBlocking,
}

impl LogGuard {
    /// Lines dropped so far because the queue was full.
    pub fn dropped(&self) -> usize {
        self.writer.error_counter().dropped_lines()
    }
}

/// Writes one of the command's own messages (possibly several lines) to
/// standard error, as text or, in JSON mode, one object per line; after
/// [`init`], through the same queue as the log lines, in order with them.
pub fn message(text: &str) {
    let mut stderr = writer();
    match JSON_VM.get() {
        None => {
            // One write: one queued message, never split by another line.
            let _ = stderr.write_all(format!("{text}\n").as_bytes());
        }
        Some(vm) => {
            for line in text.lines() {
                let level = if line.starts_with("msrwasm: error") {
                    "ERROR"
                } else {
                    "INFO"
                };
                let object = serde_json::json!({
                    "time": now(), "level": level, "vm": vm, "event": "msrwasm", "message": line,
                });
                let _ = stderr.write_all(format!("{object}\n").as_bytes());
            }
        }
    }
}

fn now() -> String {
    let mut time = String::new();
    let _ = SystemTime.format_time(&mut Writer::new(&mut time));
    time
}

/// Installs the process's log subscriber: `filter` directives, to standard
/// error through the bounded queue, in `format`, naming the VM `vm` in JSON
/// lines. Keep the guard until the command ends.
pub fn init(filter: tracing_subscriber::EnvFilter, format: LogFormat, vm: &str) -> LogGuard {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let (writer, worker) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name("msrwasm-log")
        .finish(std::io::stderr());
    let _ = WRITER.set(writer.clone());
    if format == LogFormat::Json {
        let _ = JSON_VM.set(vm.to_owned());
    }
    match format {
        LogFormat::Text => drop(
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(writer.clone())
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(false)
                // A closed standard error must not become a panic.
                .log_internal_errors(false)
                .try_init(),
        ),
        LogFormat::Json => drop(
            tracing_subscriber::registry()
                .with(filter)
                .with(JsonLines { vm: vm.to_owned() })
                .try_init(),
        ),
    }
    LogGuard {
        _worker: worker,
        writer,
    }
}

/// The JSON-lines layer.
pub struct JsonLines {
    /// The VM's name, on every line.
    pub vm: String,
}

impl JsonLines {
    /// The line for `event` (without the newline).
    pub fn line(&self, event: &Event<'_>) -> String {
        let meta = event.metadata();
        let mut fields = Fields(Map::new());
        event.record(&mut fields);
        let mut fields = fields.0;
        let mut out = Map::new();
        out.insert("time".into(), Value::String(now()));
        out.insert("level".into(), Value::String(meta.level().to_string()));
        out.insert("vm".into(), Value::String(self.vm.clone()));
        let event_name = fields
            .remove("event")
            .unwrap_or_else(|| Value::String(meta.target().replace("::", ".")));
        out.insert("event".into(), event_name);
        for key in ["plugin", "version"] {
            if let Some(v) = fields.remove(key) {
                out.insert(key.into(), v);
            }
        }
        let message = fields.remove("message").unwrap_or(Value::String(String::new()));
        out.insert("message".into(), message);
        out.extend(fields);
        Value::Object(out).to_string()
    }
}

impl<S: Subscriber> Layer<S> for JsonLines {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut line = self.line(event);
        line.push('\n');
        // One write per line (one queued message), so lines from several
        // threads never mix.
        let _ = writer().write_all(line.as_bytes());
    }
}

/// An event's fields as JSON values.
struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut text = String::new();
        let _ = write!(text, "{value:?}");
        self.0.insert(field.name().into(), Value::String(text));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::String(value.into()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects the lines instead of writing them.
    struct Collect(JsonLines, Arc<Mutex<Vec<String>>>);

    impl<S: Subscriber> Layer<S> for Collect {
        fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
            self.1.lock().unwrap().push(self.0.line(event));
        }
    }

    #[test]
    fn each_event_is_one_parseable_object_naming_the_vm_and_the_plugin() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(Collect(JsonLines { vm: "web-1".into() }, lines.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                event = "plugin_log",
                plugin = "rapl",
                version = "5c1f",
                vcpu = 1u32,
                "plugin says: a \"quoted\"\nline"
            );
            tracing::info!(generation = 3u64, "no event field");
        });
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len(), 2);
        let first: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(first["vm"], "web-1");
        assert_eq!(first["level"], "WARN");
        assert_eq!(first["event"], "plugin_log");
        assert_eq!(
            (first["plugin"].as_str(), first["version"].as_str()),
            (Some("rapl"), Some("5c1f"))
        );
        assert_eq!(first["message"], "plugin says: a \"quoted\"\nline");
        assert_eq!(first["vcpu"], 1);
        assert!(
            first["time"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z') && t.contains('T'))
        );
        assert!(!lines[0].contains('\n'), "one line per event");
        let second: Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(second["event"], "msrwasm_cli.logs.tests");
        assert_eq!(second["generation"], 3);
    }
}
