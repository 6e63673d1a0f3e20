//! Hot reload driven by file changes: a [`Watcher`] the VMM can drive from
//! its own event loop (a pollable fd plus [`Watcher::process`], no msrwasm
//! thread), or [`Watcher::spawn`] for a thread that does it.
//!
//! What it notices, and how:
//!
//! - inotify events (through `notify`) on the directories of every file the
//!   policy reads, on the directories their symlinks resolve to (so a
//!   Kubernetes ConfigMap's `..data` swap or an edited symlink target is
//!   seen), and on the nearest existing ancestor of a missing directory (so
//!   a directory deleted and re-created is seen);
//! - any event in those directories makes the engine re-check its files by
//!   content ([`crate::Engine::refresh`]): a file whose stamp (device,
//!   inode, size, mtime, ctime) did not change is not read again;
//! - a file written in place is not read while its writer still has it
//!   open for writing (modified, not yet closed), so a pause mid-write never
//!   puts half a file in force; a writer that keeps it open longer than
//!   5 s is taken at its word;
//! - every second, the engine re-checks its files anyway: events lost to
//!   a full inotify queue, a watch limit or a file system without inotify
//!   are caught up within that time (such a scan leaves a file modified in
//!   the last 2 s for a later one: the events of a write in progress may
//!   not have arrived yet).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::timerfd::TimerFd;

use crate::engine::Engine;
use crate::events::Reload;

/// Quiet time after the last event before files are re-checked: long
/// enough to coalesce the steps of one save, short enough to feel instant.
pub(crate) const DEBOUNCE: Duration = Duration::from_millis(20);
/// How long a file modified in place may stay open for writing before it
/// is read anyway.
pub(crate) const WRITE_WAIT: Duration = Duration::from_secs(5);
/// How often files are re-checked without any event.
pub(crate) const RESCAN: Duration = Duration::from_secs(1);

/// How recent a change a scan that no event asked for leaves alone.
pub(crate) const SETTLE: Duration = Duration::from_secs(2);

/// Whether `file` was modified less than [`SETTLE`] ago.
fn recently_modified(file: &Path) -> bool {
    std::fs::metadata(file)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < SETTLE))
}

/// Why the watcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// inotify (through notify) failed.
    #[error("cannot start the file watcher")]
    Notify(#[source] notify::Error),
    /// An eventfd, timerfd or epoll call failed.
    #[error("cannot set up the watcher's file descriptors")]
    Fd(#[source] std::io::Error),
    /// The watcher thread could not start.
    #[error("cannot start the watcher thread")]
    Thread(#[source] std::io::Error),
}

#[derive(Default)]
struct Queue {
    events: Vec<notify::Event>,
    errors: Vec<notify::Error>,
}

/// The file watcher of one engine (see the module docs).
pub struct Watcher {
    engine: Engine,
    notify: RecommendedWatcher,
    queue: Arc<Mutex<Queue>>,
    wake: Arc<EventFd>,
    timer: TimerFd,
    epoll: Epoll,
    dirs: BTreeSet<PathBuf>,
    dirty_since: Option<Instant>,
    writing: HashMap<PathBuf, Instant>,
    next_scan: Instant,
    warned: HashSet<PathBuf>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("dirs", &self.dirs)
            .finish_non_exhaustive()
    }
}

impl AsRawFd for Watcher {
    /// Readable when [`Watcher::process`] has work: poll it with the VMM's
    /// other fds.
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl Watcher {
    /// Starts watching what `engine` reads. Changes made between the
    /// engine's load and now are caught by the first [`Watcher::process`].
    pub fn new(engine: &Engine) -> Result<Self, WatchError> {
        let queue = Arc::new(Mutex::new(Queue::default()));
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(WatchError::Fd)?);
        let (q, w) = (queue.clone(), wake.clone());
        let notify = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let mut q = q.lock().unwrap_or_else(|e| e.into_inner());
            match event {
                Ok(e) => {
                    // Bounded: past this, the rescan catches up anyway.
                    if q.events.len() < 4096 {
                        q.events.push(e);
                    }
                }
                Err(e) if q.errors.len() < 16 => q.errors.push(e),
                Err(_) => {}
            }
            let _ = w.write(1);
        })
        .map_err(WatchError::Notify)?;
        let timer = TimerFd::new().map_err(|e| WatchError::Fd(e.into()))?;
        let epoll = Epoll::new().map_err(WatchError::Fd)?;
        for fd in [wake.as_raw_fd(), timer.as_raw_fd()] {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, fd as u64))
                .map_err(WatchError::Fd)?;
        }
        let mut watcher = Self {
            engine: engine.clone(),
            notify,
            queue,
            wake,
            timer,
            epoll,
            dirs: BTreeSet::new(),
            // Check once right away.
            dirty_since: Some(Instant::now() - DEBOUNCE),
            writing: HashMap::new(),
            next_scan: Instant::now() + RESCAN,
            warned: HashSet::new(),
        };
        watcher.update_watches();
        watcher.arm();
        Ok(watcher)
    }

    /// Handles what happened since the last call: reads pending events,
    /// re-checks files when due, re-arms the fd. Never blocks on the guest;
    /// a change it applies compiles on this thread.
    pub fn process(&mut self) -> Vec<Reload> {
        let _ = self.wake.read();
        let queue = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
        let now = Instant::now();
        for e in queue.errors {
            tracing::warn!("file watcher: {e}; changes are still found by the periodic rescan");
        }
        for event in &queue.events {
            // Opens and reads (the engine's own among them) change nothing.
            if matches!(event.kind, EventKind::Access(kind) if kind != AccessKind::Close(AccessMode::Write)) {
                continue;
            }
            // From the first event on: a stream of events (a trace or log
            // written beside the plugins) must not keep postponing the check.
            self.dirty_since.get_or_insert(now);
            for path in &event.paths {
                let path = absolute(path);
                match event.kind {
                    EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => {
                        self.writing.entry(path).or_insert(now);
                    }
                    EventKind::Access(AccessKind::Close(AccessMode::Write))
                    | EventKind::Create(_)
                    | EventKind::Remove(_)
                    | EventKind::Modify(ModifyKind::Name(_)) => {
                        self.writing.remove(&path);
                    }
                    _ => {}
                }
            }
        }
        self.writing.retain(|_, since| now.duration_since(*since) < WRITE_WAIT);
        let due = self.dirty_since.is_some_and(|t| now.duration_since(t) >= DEBOUNCE) || now >= self.next_scan;
        // A scan no event asked for may run before the events of a write
        // in progress arrive (their thread starved on a busy host): it
        // leaves files modified within SETTLE to the events or a later scan.
        let periodic = self.dirty_since.is_none();
        let mut reloads = Vec::new();
        if due {
            let hold: HashSet<PathBuf> = self
                .engine
                .watched_files()
                .into_iter()
                .filter(|f| self.writing.contains_key(&absolute(f)) || (periodic && recently_modified(f)))
                .collect();
            // A bug in one reload must not end hot reload for the VM's life.
            let engine = &self.engine;
            reloads = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.refresh(&hold))) {
                Ok(reloads) => reloads,
                Err(_) => {
                    tracing::error!("internal error while reloading (a panic, reported above); hot reload goes on");
                    Vec::new()
                }
            };
            self.dirty_since = None;
            self.next_scan = now + RESCAN;
            self.update_watches();
        }
        self.arm();
        reloads
    }

    /// The directories to watch for the engine's files now.
    fn wanted_dirs(&self) -> BTreeSet<PathBuf> {
        let mut dirs = BTreeSet::new();
        for file in self.engine.watched_files() {
            let file = absolute(&file);
            if let Some(dir) = file.parent() {
                dirs.insert(existing_ancestor(dir));
            }
            // Each link of a symlink chain, so a retargeted link is seen.
            let mut link = file.clone();
            for _ in 0..8 {
                let Ok(target) = std::fs::read_link(&link) else { break };
                let base = link.parent().map(Path::to_owned).unwrap_or_default();
                link = absolute(&base.join(target));
                if let Some(dir) = link.parent() {
                    dirs.insert(existing_ancestor(dir));
                }
            }
            if let Ok(real) = std::fs::canonicalize(&file)
                && let Some(dir) = real.parent()
            {
                dirs.insert(dir.to_owned());
            }
        }
        dirs
    }

    fn update_watches(&mut self) {
        let wanted = self.wanted_dirs();
        for dir in self.dirs.difference(&wanted) {
            let _ = self.notify.unwatch(dir);
        }
        let mut watched = BTreeSet::new();
        for dir in &wanted {
            if self.dirs.contains(dir) && dir.exists() {
                watched.insert(dir.clone());
                continue;
            }
            match self.notify.watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(dir.clone());
                    self.warned.remove(dir);
                }
                Err(e) => {
                    if self.warned.insert(dir.clone()) {
                        tracing::warn!(
                            dir = %dir.display(),
                            "cannot watch: {e}; changes there are found by the periodic rescan"
                        );
                    }
                }
            }
        }
        self.dirs = watched;
    }

    /// Arms the timer for the next deadline.
    fn arm(&mut self) {
        let now = Instant::now();
        let mut next = self.next_scan;
        if let Some(t) = self.dirty_since {
            next = next.min(t + DEBOUNCE);
        }
        if let Some(t) = self.writing.values().min() {
            next = next.min(*t + WRITE_WAIT);
        }
        let wait = next.saturating_duration_since(now).max(Duration::from_millis(1));
        if let Err(e) = self.timer.reset(wait, None) {
            tracing::warn!("watcher timer: {e}");
        }
    }

    /// Runs a watcher on a thread of its own ("msrwasm-watch").
    pub fn spawn(engine: &Engine) -> Result<WatcherThread, WatchError> {
        let mut watcher = Watcher::new(engine)?;
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(WatchError::Fd)?);
        let stop_fd = stop.as_raw_fd();
        let outer = Epoll::new().map_err(WatchError::Fd)?;
        for fd in [watcher.as_raw_fd(), stop_fd] {
            outer
                .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, fd as u64))
                .map_err(WatchError::Fd)?;
        }
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("msrwasm-watch".into())
            .spawn(move || {
                let mut events = [EpollEvent::default(); 4];
                loop {
                    let n = match outer.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::error!("watcher: epoll_wait failed: {e}; hot reload stops");
                            return;
                        }
                    };
                    if events[..n].iter().any(|e| e.fd() == stop_fd) || stopping.read().is_ok_and(|v| v > 0) {
                        return;
                    }
                    watcher.process();
                }
            })
            .map_err(WatchError::Thread)?;
        Ok(WatcherThread {
            stop,
            thread: Some(thread),
        })
    }
}

/// A watcher on its own thread; stops when dropped.
pub struct WatcherThread {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl WatcherThread {
    /// Stops the thread. Waits at most `grace` for a change in progress (a
    /// compile) to finish, then leaves the thread to end by itself: call
    /// [`Engine::close`] first so that such a change is discarded.
    pub fn stop(mut self, grace: Duration) {
        self.stop_within(grace);
    }

    fn stop_within(&mut self, grace: Duration) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            crate::util::join_within(thread, grace);
        }
    }
}

impl Drop for WatcherThread {
    fn drop(&mut self) {
        self.stop_within(Duration::from_millis(200));
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// `dir`, or its nearest ancestor that exists (whose events show `dir`
/// coming back).
fn existing_ancestor(dir: &Path) -> PathBuf {
    let mut d = dir.to_owned();
    while !d.exists() {
        match d.parent() {
            Some(p) => d = p.to_owned(),
            None => break,
        }
    }
    d
}
