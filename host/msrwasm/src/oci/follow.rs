//! Following tags: re-resolve every `pull_policy = "always"` reference of
//! the policy in force every `poll_s` seconds and roll a moved tag out
//! through the engine's reload path (validated off the vCPU threads; a
//! refused version never answers; a failing registry changes nothing).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Fetch, OciRef, OciSource};
use crate::{Engine, Reload};

/// Longest the spawned thread sleeps before looking at the policy again
/// (a manifest change may add or drop followed tags).
const IDLE: Duration = Duration::from_secs(1);

/// Follows the tags of an engine's policy. A state machine driven by
/// [`Follower::process`]; [`Follower::spawn`] runs one on its own thread.
pub struct Follower {
    engine: Engine,
    fetch: Arc<dyn Fetch>,
    /// When each followed reference is next polled.
    next: HashMap<OciRef, Instant>,
    /// References whose last poll failed (warned once per failure streak).
    failing: HashSet<OciRef>,
}

impl Follower {
    /// A follower of `engine`'s policy, fetching through `fetch`.
    pub fn new(engine: &Engine, fetch: Arc<dyn Fetch>) -> Self {
        Self {
            engine: engine.clone(),
            fetch,
            next: HashMap::new(),
            failing: HashSet::new(),
        }
    }

    fn followed(&self) -> Vec<OciSource> {
        let mut sources: Vec<OciSource> = self
            .engine
            .spec()
            .plugins
            .into_iter()
            .filter_map(|p| p.source)
            .filter(OciSource::follows)
            .collect();
        // One poll per reference, at the shortest period asked for.
        sources.sort_by_key(|s| (s.reference.to_string(), s.poll_s));
        sources.dedup_by(|a, b| a.reference == b.reference);
        sources
    }

    /// Polls the references that are due; when one moved, applies the
    /// change through [`Engine::refresh`] and returns what it did.
    pub fn process(&mut self) -> Vec<Reload> {
        let now = Instant::now();
        let sources = self.followed();
        self.next.retain(|r, _| sources.iter().any(|s| &s.reference == r));
        self.failing.retain(|r| sources.iter().any(|s| &s.reference == r));
        let mut moved = false;
        for source in &sources {
            let period = Duration::from_secs(source.poll_s.max(1));
            // Just fetched by the engine when it loaded the plugin.
            let due = *self.next.entry(source.reference.clone()).or_insert(now + period);
            if due > now {
                continue;
            }
            self.next.insert(source.reference.clone(), now + period);
            match self.fetch.poll(source) {
                Ok(changed) => {
                    if self.failing.remove(&source.reference) {
                        tracing::info!(reference = %source.reference, "registry answers again");
                    }
                    if changed {
                        tracing::info!(reference = %source.reference, "tag moved: validating the new version");
                        moved = true;
                    }
                }
                Err(e) => {
                    let e = crate::util::error_chain(&e);
                    if self.failing.insert(source.reference.clone()) {
                        tracing::warn!("following {}: {e}; the running version keeps serving", source.reference);
                    } else {
                        tracing::debug!("following {}: {e}", source.reference);
                    }
                }
            }
        }
        match moved {
            true => self.engine.refresh(&HashSet::new()),
            false => Vec::new(),
        }
    }

    /// When [`Follower::process`] next has work (`None`: nothing followed
    /// as of the last call).
    pub fn next_due(&self) -> Option<Instant> {
        self.next.values().min().copied()
    }

    /// Runs a follower on a thread of its own ("msrwasm-follow").
    pub fn spawn(engine: &Engine, fetch: Arc<dyn Fetch>) -> std::io::Result<FollowerThread> {
        let mut follower = Follower::new(engine, fetch);
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("msrwasm-follow".into())
            .spawn(move || {
                loop {
                    follower.process();
                    let now = Instant::now();
                    let wake = follower.next_due().map_or(now + IDLE, |t| t.min(now + IDLE));
                    match stopped.recv_timeout(wake.saturating_duration_since(now)) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                }
            })?;
        Ok(FollowerThread {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

/// A follower on its own thread; stops when dropped.
pub struct FollowerThread {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FollowerThread {
    /// Stops the thread, waiting at most `grace` for a poll in progress
    /// (then it ends by itself; call [`Engine::close`] first so that a
    /// change it would make is discarded).
    pub fn stop(mut self, grace: Duration) {
        self.stop_within(grace);
    }

    fn stop_within(&mut self, grace: Duration) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            crate::util::join_within(thread, grace);
        }
    }
}

impl Drop for FollowerThread {
    fn drop(&mut self) {
        self.stop_within(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Mutex;

    use super::*;
    use crate::oci::{Fetched, OciError, PullPolicy};
    use crate::plugin::PluginSettings;
    use crate::{PolicySpec, Unhandled};

    /// A registry in memory: `poll` copies the tag's current bytes to the
    /// followed file.
    struct FakeRegistry {
        file: PathBuf,
        tag: Mutex<Result<Vec<u8>, String>>,
        polls: Mutex<u32>,
    }

    impl Fetch for FakeRegistry {
        fn fetch(&self, _: &OciSource) -> Result<Fetched, OciError> {
            self.poll_inner()?;
            Ok(Fetched {
                path: self.file.clone(),
                sha256: None,
            })
        }
        fn poll(&self, _: &OciSource) -> Result<bool, OciError> {
            *self.polls.lock().unwrap() += 1;
            self.poll_inner()
        }
    }

    impl FakeRegistry {
        fn poll_inner(&self) -> Result<bool, OciError> {
            let bytes = self.tag.lock().unwrap().clone().map_err(OciError::Config)?;
            let changed = std::fs::read(&self.file).ok().as_ref() != Some(&bytes);
            if changed {
                std::fs::write(&self.file, &bytes).unwrap();
            }
            Ok(changed)
        }
    }

    fn answering(v: u64) -> Vec<u8> {
        format!(
            r#"(module
                 (import "msr" "reply" (func $reply (param i64)))
                 (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
                 (func (export "rdmsr") (param i32) (result i32) (call $reply (i64.const {v})) (i32.const 0)))"#
        )
        .into_bytes()
    }

    #[test]
    fn a_moved_tag_is_applied_a_failing_registry_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(FakeRegistry {
            file: dir.path().join("followed.wat"),
            tag: Mutex::new(Ok(answering(1))),
            polls: Mutex::new(0),
        });
        let mut settings = PluginSettings::new("p", "oci://127.0.0.1:1/p:v");
        settings.source = Some(OciSource {
            pull_policy: PullPolicy::Always,
            poll_s: 1,
            ..OciSource::new(OciRef::parse("oci://127.0.0.1:1/p:v").unwrap())
        });
        let spec = PolicySpec {
            unhandled: Unhandled::Gp,
            plugins: vec![settings],
            ..PolicySpec::default()
        };
        let engine = Engine::builder().oci(registry.clone()).build(spec).unwrap();
        assert_eq!(engine.generation(), 1);
        let mut follower = Follower::new(&engine, registry.clone());
        // Not due yet: the engine fetched it a moment ago.
        assert!(follower.process().is_empty());
        assert_eq!(*registry.polls.lock().unwrap(), 0);
        let due = follower.next_due().unwrap();
        assert!(due > Instant::now() && due <= Instant::now() + Duration::from_secs(1));
        // The tag moves.
        *registry.tag.lock().unwrap() = Ok(answering(2));
        follower.next.values_mut().for_each(|t| *t = Instant::now());
        let reloads = follower.process();
        assert!(
            matches!(reloads[..], [Reload::Applied { generation: 2, .. }]),
            "{reloads:?}"
        );
        // The registry fails: nothing changes.
        *registry.tag.lock().unwrap() = Err("connection refused".into());
        follower.next.values_mut().for_each(|t| *t = Instant::now());
        assert!(follower.process().is_empty());
        assert_eq!(engine.generation(), 2);
        assert!(
            follower
                .failing
                .contains(&OciRef::parse("oci://127.0.0.1:1/p:v").unwrap())
        );
        // A version that does not load is refused; generation 2 stays.
        *registry.tag.lock().unwrap() = Ok(b"(module)".to_vec());
        follower.next.values_mut().for_each(|t| *t = Instant::now());
        let reloads = follower.process();
        assert!(matches!(reloads[..], [Reload::Refused { .. }]), "{reloads:?}");
        assert_eq!(engine.generation(), 2);
        assert!(follower.failing.is_empty());
    }
}
