//! A VMM that logs with the `log` crate (and installs no `tracing`
//! subscriber) sees msrwasm's log lines as `log` records. Its own process:
//! the `log` logger is global.

use std::sync::Mutex;

use msrwasm::filter::RecordingFilter;
use msrwasm::{Access, Engine, ExitReason, NoKvm, PolicySpec, Unhandled};

struct Capture(Mutex<Vec<(log::Level, String)>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.0.lock().unwrap().push((record.level(), record.args().to_string()));
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));

#[test]
fn log_based_vmms_get_the_engines_log_lines() {
    log::set_logger(&CAPTURE).unwrap();
    log::set_max_level(log::LevelFilter::Trace);

    let mut spec = PolicySpec::default();
    spec.unhandled = Unhandled::Log;
    let engine = Engine::builder()
        .filter(RecordingFilter::default())
        .build(spec)
        .unwrap();
    let mut vcpu0 = engine.dispatcher(0);
    vcpu0.handle(Access::read(0x4d53_0042, ExitReason::Unknown), &mut NoKvm);

    let records = CAPTURE.0.lock().unwrap();
    assert!(
        records
            .iter()
            .any(|(level, text)| *level == log::Level::Warn && text.contains("rdmsr 0x4d530042 unhandled")),
        "{records:#?}"
    );
}
