//! Host energy for the plugins a manifest grants it (`grants = ["energy"]`).
//!
//! One sampler per engine (VM), started when the first granted plugin loads
//! and stopped when the last one is gone (a restart continues the totals),
//! reads on its own schedule (never per exit; at most every [`MIN_PERIOD`]):
//!
//! - every RAPL zone of the Linux powercap tree (`intel-rapl:N` and their
//!   subzones, which Linux also uses for AMD): `energy_uj` summed per domain
//!   (package, core/PP0, uncore/PP1, DRAM) over the sockets, made
//!   monotonic across counter wraps with `max_energy_range_uj`;
//! - the host's busy CPU time (`/proc/stat`, first line);
//! - the CPU time of every vCPU thread (the thread that ran its last exit).
//!
//! Each period it attributes each domain's new energy to the vCPUs by their
//! share of the host's busy CPU time in that period (the shares never sum
//! over 1), and publishes one [`Snapshot`] that plugin calls read.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::files::ReadError;
use crate::plugin::clock::Clock;

/// The energy domains, in the order of the `domain` argument of the
/// `msr_energy_v1` imports (and of the WIT `domain` enum).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Domain {
    /// The whole socket (`package-N`).
    Package = 0,
    /// The cores (`core`: Intel PP0; on AMD hosts, what Linux's `core` zone
    /// reads, the core energy counter of the package's first CPU).
    Core = 1,
    /// The uncore/graphics plane (`uncore`, Intel PP1).
    Uncore = 2,
    /// Memory (`dram`).
    Dram = 3,
}

/// How many [`Domain`]s there are.
pub const DOMAINS: usize = 4;
/// Shortest sampling period: what a guest can resolve in time, at best.
pub const MIN_PERIOD: Duration = Duration::from_millis(10);
/// Longest sampling period.
pub const MAX_PERIOD: Duration = Duration::from_secs(10);
/// Default sampling period.
pub const DEFAULT_PERIOD: Duration = Duration::from_millis(100);
/// Most vCPUs whose threads are followed.
pub const MAX_VCPUS: u32 = 4096;
/// Most powercap entries looked at, and most RAPL zones.
const MAX_ENTRIES: usize = 65_536;
const MAX_ZONES: usize = 256;
/// No zone draws more: a counter that claims more energy than this in a
/// period was reset (or is not a RAPL counter), and counts from there.
const MAX_ZONE_WATTS: u64 = 5_000;
/// `/proc/stat` counts in USER_HZ ticks, 100 per second on every Linux ABI.
const NS_PER_TICK: u64 = 10_000_000;

/// Where the host's energy comes from, and how often it is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnergyOptions {
    /// The powercap class directory (`/sys/class/powercap`).
    pub powercap: PathBuf,
    /// The kernel's CPU statistics (`/proc/stat`).
    pub proc_stat: PathBuf,
    /// How often the sampler reads them (10 ms ..= 10 s).
    pub period: Duration,
}

impl Default for EnergyOptions {
    fn default() -> Self {
        Self {
            powercap: "/sys/class/powercap".into(),
            proc_stat: "/proc/stat".into(),
            period: DEFAULT_PERIOD,
        }
    }
}

/// Why the host cannot give energy to a plugin granted it.
#[derive(Debug, thiserror::Error)]
pub enum EnergyError {
    /// The powercap tree holds no RAPL zone.
    #[error(
        "powercap {}: no RAPL zone (no intel-rapl:N entry with a package, core, uncore or dram name); is the intel_rapl_msr module loaded?",
        .0.display()
    )]
    NoZones(PathBuf),
    /// A file or directory could not be read.
    #[error("{}: cannot read{}", path.display(), permission_hint(source))]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: ReadError,
    },
    /// A file does not hold what the kernel writes there.
    #[error("{}: unexpected content {text:?}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Its first bytes.
        text: String,
    },
    /// The sampling period is out of bounds.
    #[error("energy sampling period {0:?} is outside {MIN_PERIOD:?}..={MAX_PERIOD:?}")]
    Period(Duration),
    /// The sampler thread did not start.
    #[error("cannot start the energy sampler thread")]
    Thread(#[source] std::io::Error),
}

fn permission_hint(e: &ReadError) -> &'static str {
    match e {
        ReadError::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
            " (energy_uj is readable by root only since the Platypus fix: grant this process read access, see docs/energy.md)"
        }
        _ => "",
    }
}

/// What a plugin call reads: one consistent sample.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// The plugin clock (`msr.now_ns`) when it was taken.
    pub at_ns: u64,
    /// Host energy per domain since the sampler started, µJ (`None`: the
    /// host has no such domain).
    pub host_uj: [Option<u64>; DOMAINS],
    /// Host busy CPU time since the sampler started, ns.
    pub host_cpu_ns: u64,
    /// Per vCPU index: CPU time of its thread since it was first seen, ns,
    /// and the energy attributed to it per domain, µJ.
    pub vcpus: Vec<Option<VcpuEnergy>>,
}

/// One vCPU's part of a [`Snapshot`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct VcpuEnergy {
    /// CPU time of its thread since first seen, ns.
    pub cpu_ns: u64,
    /// Energy attributed to it per domain, µJ.
    pub uj: [u64; DOMAINS],
}

impl Snapshot {
    /// Energy of `domain` for `who` (`-1` the host, `-2` the VM, `n >= 0`
    /// vCPU `n`); `None` for a domain the host lacks or an unknown vCPU.
    pub fn energy_uj(&self, domain: i32, who: i32) -> Option<u64> {
        let d = usize::try_from(domain).ok().filter(|&d| d < DOMAINS)?;
        self.host_uj[d]?;
        match who {
            -1 => self.host_uj[d],
            -2 => Some(saturating_sum(self.vcpus.iter().flatten().map(|v| v.uj[d]))),
            n => Some(self.vcpus.get(usize::try_from(n).ok()?)?.as_ref()?.uj[d]),
        }
    }

    /// CPU time of `who` (as for [`Snapshot::energy_uj`]).
    pub fn cpu_ns(&self, who: i32) -> Option<u64> {
        match who {
            -1 => Some(self.host_cpu_ns),
            -2 => Some(saturating_sum(self.vcpus.iter().flatten().map(|v| v.cpu_ns))),
            n => Some(self.vcpus.get(usize::try_from(n).ok()?)?.as_ref()?.cpu_ns),
        }
    }

    /// Bit `d` set for each domain the host has.
    pub fn domains(&self) -> i32 {
        (0..DOMAINS)
            .filter(|&d| self.host_uj[d].is_some())
            .fold(0, |m, d| m | 1 << d)
    }
}

fn saturating_sum(values: impl Iterator<Item = u64>) -> u64 {
    values.fold(0, u64::saturating_add)
}

/// Reads at most `limit` bytes from the start of a regular file (sysfs and
/// procfs files report sizes that are not their content's).
fn read_head(path: &Path, limit: usize) -> Result<String, EnergyError> {
    let read = |path: &Path| -> Result<Vec<u8>, ReadError> {
        let (file, _) = crate::files::open_regular(path, u64::MAX)?;
        let mut bytes = Vec::with_capacity(limit);
        file.take(limit as u64).read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    let bytes = read(path).map_err(|source| EnergyError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn read_u64(path: &Path) -> Result<u64, EnergyError> {
    let text = read_head(path, 64)?;
    text.trim().parse().map_err(|_| EnergyError::Parse {
        path: path.to_owned(),
        text: text.chars().take(64).collect(),
    })
}

/// Busy CPU time of the host, ns: user, nice, system, irq, softirq and
/// steal of the `cpu` line (guest time is part of user time).
fn host_busy_ns(proc_stat: &Path) -> Result<u64, EnergyError> {
    let text = read_head(proc_stat, 512)?;
    let bad = || EnergyError::Parse {
        path: proc_stat.to_owned(),
        text: text.lines().next().unwrap_or("").chars().take(80).collect(),
    };
    let line = text.lines().next().ok_or_else(bad)?;
    let mut fields = line.split_ascii_whitespace();
    if fields.next() != Some("cpu") {
        return Err(bad());
    }
    let v: Vec<u64> = fields
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    if v.len() < 8 {
        return Err(bad());
    }
    let ticks = [v[0], v[1], v[2], v[5], v[6], v[7]]
        .iter()
        .fold(0u64, |a, &t| a.saturating_add(t));
    Ok(ticks.saturating_mul(NS_PER_TICK))
}

/// One RAPL zone.
#[derive(Debug)]
struct Zone {
    domain: Domain,
    energy: PathBuf,
    /// Where the counter wraps to 0 (`max_energy_range_uj`; 0 if unknown).
    range: u64,
    last: u64,
}

impl Zone {
    /// New energy since the last reading, across a wrap; at most `bound`
    /// (more means the counter was reset: it counts from `now`).
    fn advance(&mut self, now: u64, bound: u64) -> u64 {
        let delta = match now >= self.last {
            true => now - self.last,
            // Wrapped: from `last` up to the range, then from 0 to `now`.
            false if self.range > self.last => (self.range - self.last).saturating_add(now),
            // No usable range: count from 0 (at worst an underestimate).
            false => now,
        };
        self.last = now;
        if delta > bound {
            tracing::warn!(
                event = "energy_counter_reset",
                "{}: {delta} µJ in one period is more than any RAPL zone draws; counting from its new value",
                self.energy.display()
            );
            return 0;
        }
        delta
    }
}

fn discover(root: &Path) -> Result<Vec<Zone>, EnergyError> {
    let read_err = |source: std::io::Error| EnergyError::Read {
        path: root.to_owned(),
        source: ReadError::Io(source),
    };
    let mut names = Vec::new();
    for (i, entry) in std::fs::read_dir(root).map_err(read_err)?.enumerate() {
        let name = entry.map_err(read_err)?.file_name();
        // `intel-rapl:0`, `intel-rapl:0:1`; not the MMIO/TPMI duplicates of
        // the package zone (`intel-rapl-mmio:0`).
        match name.into_string() {
            Ok(n) if n.starts_with("intel-rapl:") => names.push(n),
            _ => {}
        }
        if i >= MAX_ENTRIES || names.len() > MAX_ZONES {
            return Err(EnergyError::Parse {
                path: root.to_owned(),
                text: format!("more than {MAX_ENTRIES} entries or {MAX_ZONES} RAPL zones"),
            });
        }
    }
    names.sort();
    let mut zones = Vec::new();
    for name in names {
        let dir = root.join(&name);
        let domain = match read_head(&dir.join("name"), 64)?.trim() {
            n if n.starts_with("package") => Domain::Package,
            "core" => Domain::Core,
            "uncore" => Domain::Uncore,
            "dram" => Domain::Dram,
            _ => continue, // psys and what comes next
        };
        let energy = dir.join("energy_uj");
        let last = read_u64(&energy)?;
        let range = read_u64(&dir.join("max_energy_range_uj"))?;
        zones.push(Zone {
            domain,
            energy,
            range,
            last,
        });
    }
    match zones.is_empty() {
        true => Err(EnergyError::NoZones(root.to_owned())),
        false => Ok(zones),
    }
}

/// The vCPU threads whose CPU time is followed: each dispatcher records
/// the thread it runs on.
#[derive(Debug, Default)]
pub(crate) struct VcpuThreads {
    clocks: Mutex<Vec<Option<(u32, libc::clockid_t)>>>,
}

thread_local! {
    static TID: u32 = crate::sys::gettid();
}

impl VcpuThreads {
    /// Records the calling thread as vCPU `vcpu`'s, unless `*bound` says it
    /// already is (a thread-local read on the exit path).
    pub(crate) fn bind(&self, vcpu: u32, bound: &mut u32) {
        let tid = TID.with(|t| *t);
        if *bound == tid || vcpu >= MAX_VCPUS {
            return;
        }
        let Some(clock) = crate::sys::current_thread_clock() else {
            return;
        };
        *bound = tid;
        let mut clocks = self.clocks.lock().unwrap_or_else(|e| e.into_inner());
        let i = vcpu as usize;
        if clocks.len() <= i {
            clocks.resize(i + 1, None);
        }
        clocks[i] = Some((tid, clock));
    }

    /// Forgets vCPU `vcpu`'s thread if it is still `tid` (its dispatcher
    /// is gone).
    pub(crate) fn unbind(&self, vcpu: u32, tid: u32) {
        let mut clocks = self.clocks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = clocks.get_mut(vcpu as usize)
            && slot.is_some_and(|(t, _)| t == tid)
        {
            *slot = None;
        }
    }

    /// Each vCPU's `(tid, CPU time)` now.
    fn now(&self) -> Vec<Option<(u32, u64)>> {
        let clocks = self.clocks.lock().unwrap_or_else(|e| e.into_inner()).clone();
        clocks
            .into_iter()
            .map(|t| t.and_then(|(tid, clock)| Some((tid, crate::sys::clock_ns(clock)?))))
            .collect()
    }
}

/// One followed vCPU thread.
#[derive(Debug, Default)]
struct Follow {
    tid: u32,
    last_cpu: u64,
    /// CPU time not yet set against host time.
    pending_cpu: u64,
    total: VcpuEnergy,
    /// Fractions of µJ not yet handed out, so that rounding loses nothing.
    rest: [f64; DOMAINS],
}

/// The sampler's state: plain code, driven by [`Sampler::sample`].
#[derive(Debug)]
pub(crate) struct Sampler {
    options: EnergyOptions,
    zones: Vec<Zone>,
    /// When the zones were last read (bounds what a period can hold).
    read_at: Instant,
    host_uj: [Option<u64>; DOMAINS],
    /// Energy read but not yet attributed (no host CPU time passed yet).
    pending: [u64; DOMAINS],
    host_last: u64,
    host_total: u64,
    vcpus: Vec<Option<Follow>>,
}

impl Sampler {
    /// Finds the zones and takes the first readings.
    pub(crate) fn new(options: EnergyOptions) -> Result<Self, EnergyError> {
        if !(MIN_PERIOD..=MAX_PERIOD).contains(&options.period) {
            return Err(EnergyError::Period(options.period));
        }
        let zones = discover(&options.powercap)?;
        let host_last = host_busy_ns(&options.proc_stat)?;
        let mut host_uj = [None; DOMAINS];
        for z in &zones {
            host_uj[z.domain as usize] = Some(0);
        }
        Ok(Self {
            options,
            zones,
            read_at: Instant::now(),
            host_uj,
            pending: [0; DOMAINS],
            host_last,
            host_total: 0,
            vcpus: Vec::new(),
        })
    }

    /// Starts again after a pause (no granted plugin for a while): reads
    /// fresh baselines, keeps every total, so that counters go on from
    /// where they were and the pause is attributed to nobody.
    fn resume(&mut self) -> Result<(), EnergyError> {
        let fresh = Self::new(self.options.clone())?;
        for (d, t) in self.host_uj.iter_mut().enumerate() {
            *t = fresh.host_uj[d].map(|_| t.unwrap_or(0));
        }
        for f in self.vcpus.iter_mut().flatten() {
            f.tid = 0; // the next sample takes a new baseline
            f.pending_cpu = 0;
        }
        (self.zones, self.read_at, self.host_last) = (fresh.zones, fresh.read_at, fresh.host_last);
        self.pending = [0; DOMAINS];
        Ok(())
    }

    /// Reads everything once and attributes the new energy; `threads` is
    /// each vCPU's `(tid, cpu_ns)` now (`None`: not seen yet, or gone).
    pub(crate) fn sample(&mut self, at_ns: u64, threads: &[Option<(u32, u64)>]) -> Result<Snapshot, EnergyError> {
        // Everything is read before anything changes: a failed read loses
        // nothing, the next good sample counts the whole interval.
        let now: Vec<u64> = self
            .zones
            .iter()
            .map(|z| read_u64(&z.energy))
            .collect::<Result<_, _>>()?;
        let host_now = host_busy_ns(&self.options.proc_stat)?;
        let host_delta = host_now.saturating_sub(self.host_last);
        let elapsed_ms = self.read_at.elapsed().as_millis() as u64 + 1;
        self.read_at = Instant::now();
        let bound = elapsed_ms.saturating_mul(MAX_ZONE_WATTS * 1000); // W x ms = mJ
        for (z, now) in self.zones.iter_mut().zip(now) {
            let d = z.domain as usize;
            let delta = z.advance(now, bound);
            if let Some(t) = &mut self.host_uj[d] {
                *t = t.saturating_add(delta);
            }
            self.pending[d] = self.pending[d].saturating_add(delta);
        }
        if self.vcpus.len() < threads.len() {
            self.vcpus.resize_with(threads.len(), || None);
        }
        // Each vCPU's CPU time since the last period; a new thread starts
        // from now.
        for (i, t) in threads.iter().enumerate() {
            let Some((tid, cpu)) = *t else { continue };
            match &mut self.vcpus[i] {
                Some(f) if f.tid == tid => {
                    f.pending_cpu = f.pending_cpu.saturating_add(cpu.saturating_sub(f.last_cpu));
                    f.last_cpu = f.last_cpu.max(cpu);
                }
                slot => {
                    let old = slot.take().unwrap_or_default();
                    *slot = Some(Follow {
                        tid,
                        last_cpu: cpu,
                        ..old
                    });
                }
            }
        }
        if host_delta > 0 {
            // /proc/stat counts in 10 ms ticks while thread clocks are
            // exact: never hand out more than all the energy.
            let sum: u64 = self.vcpus.iter().flatten().map(|f| f.pending_cpu).sum();
            let scale = host_delta.max(sum) as f64;
            for f in self.vcpus.iter_mut().flatten() {
                let used = std::mem::take(&mut f.pending_cpu);
                f.total.cpu_ns = f.total.cpu_ns.saturating_add(used);
                let share = used as f64 / scale;
                for d in 0..DOMAINS {
                    let exact = self.pending[d] as f64 * share + f.rest[d];
                    let whole = exact.floor();
                    f.rest[d] = exact - whole;
                    f.total.uj[d] = f.total.uj[d].saturating_add(whole as u64);
                }
            }
            self.pending = [0; DOMAINS];
            self.host_last = host_now;
            self.host_total = self.host_total.saturating_add(host_delta);
        }
        Ok(Snapshot {
            at_ns,
            host_uj: self.host_uj,
            host_cpu_ns: self.host_total,
            vcpus: self.vcpus.iter().map(|f| f.as_ref().map(|f| f.total)).collect(),
        })
    }
}

/// Where a stopped sampler waits for the next granted plugin.
type Parked = Arc<Mutex<Option<Sampler>>>;

/// The running sampler of one engine, shared by its granted plugins.
#[derive(Debug)]
pub(crate) struct EnergyHub {
    latest: Arc<RwLock<Arc<Snapshot>>>,
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<Sampler>>,
    parked: Parked,
}

impl EnergyHub {
    /// Publishes `first`, then samples every period on a thread of its own.
    fn start(
        mut sampler: Sampler,
        first: Snapshot,
        threads: Arc<VcpuThreads>,
        clock: Arc<dyn Clock>,
        parked: Parked,
    ) -> Result<Self, EnergyError> {
        let period = sampler.options.period;
        let latest = Arc::new(RwLock::new(Arc::new(first)));
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (latest2, stop2) = (latest.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("msrwasm-energy".into())
            .spawn(move || {
                let mut failing = false;
                loop {
                    let (lock, cv) = &*stop2;
                    let stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                    let (stopped, _) = cv
                        .wait_timeout_while(stopped, period, |s| !*s)
                        .unwrap_or_else(|e| e.into_inner());
                    if *stopped {
                        return sampler;
                    }
                    drop(stopped);
                    match sampler.sample(clock.now_ns(), &threads.now()) {
                        Ok(s) => {
                            if std::mem::take(&mut failing) {
                                tracing::info!(event = "energy_recovered", "host energy readable again");
                            }
                            *latest2.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(s);
                        }
                        // Plugins keep reading the last good sample: a
                        // counter that stops is better than one that jumps.
                        Err(e) if !failing => {
                            failing = true;
                            tracing::warn!(
                                event = "energy_unreadable",
                                "host energy: {}; plugins read the last sample until it is readable again",
                                crate::util::error_chain(&e)
                            );
                        }
                        Err(_) => {}
                    }
                }
            })
            .map_err(EnergyError::Thread)?;
        Ok(Self {
            latest,
            stop,
            thread: Some(thread),
            parked,
        })
    }

    /// The newest sample.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.latest.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for EnergyHub {
    /// Stops the thread (it is waiting, or reading a few sysfs files) and
    /// parks its totals for the next start.
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        if let Some(sampler) = self.thread.take().and_then(|t| t.join().ok()) {
            *self.parked.lock().unwrap_or_else(|e| e.into_inner()) = Some(sampler);
        }
    }
}

/// One engine's host energy: the options, its vCPU threads, and the
/// sampler while a granted plugin holds it (parked in between).
#[derive(Debug)]
pub(crate) struct EnergyGate {
    options: EnergyOptions,
    pub(crate) threads: Arc<VcpuThreads>,
    hub: Mutex<Weak<EnergyHub>>,
    parked: Parked,
}

impl EnergyGate {
    pub(crate) fn new(options: EnergyOptions) -> Self {
        Self {
            options,
            threads: Arc::default(),
            hub: Mutex::new(Weak::new()),
            parked: Parked::default(),
        }
    }

    /// The running sampler, started (or resumed, totals kept) if no plugin
    /// holds one now.
    pub(crate) fn hub(&self, clock: &Arc<dyn Clock>) -> Result<Arc<EnergyHub>, EnergyError> {
        let mut hub = self.hub.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = hub.upgrade() {
            return Ok(h);
        }
        // Taking the first sample here makes an unreadable tree an error
        // now; a sampler that fails waits parked, its totals kept.
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        // A parked sampler takes fresh baselines; a new one has just read them.
        let (mut sampler, resumed) = match parked.take() {
            Some(mut s) => {
                let resumed = s.resume();
                (s, resumed)
            }
            None => (Sampler::new(self.options.clone())?, Ok(())),
        };
        let first = resumed.and_then(|()| sampler.sample(clock.now_ns(), &self.threads.now()));
        let first = match first {
            Ok(first) => first,
            Err(e) => {
                *parked = Some(sampler);
                return Err(e);
            }
        };
        drop(parked);
        let h = Arc::new(EnergyHub::start(
            sampler,
            first,
            self.threads.clone(),
            clock.clone(),
            self.parked.clone(),
        )?);
        *hub = Arc::downgrade(&h);
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A powercap tree and /proc/stat a test drives.
    struct Fake {
        dir: tempfile::TempDir,
    }

    impl Fake {
        fn new(zones: &[(&str, &str, u64)]) -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("powercap")).unwrap();
            for (entry, name, range) in zones {
                let z = dir.path().join("powercap").join(entry);
                std::fs::create_dir(&z).unwrap();
                std::fs::write(z.join("name"), format!("{name}\n")).unwrap();
                std::fs::write(z.join("max_energy_range_uj"), format!("{range}\n")).unwrap();
                std::fs::write(z.join("energy_uj"), "0\n").unwrap();
            }
            let f = Self { dir };
            f.stat(0);
            f
        }
        fn options(&self) -> EnergyOptions {
            EnergyOptions {
                powercap: self.dir.path().join("powercap"),
                proc_stat: self.dir.path().join("stat"),
                period: DEFAULT_PERIOD,
            }
        }
        fn energy(&self, entry: &str, uj: u64) {
            std::fs::write(
                self.dir.path().join("powercap").join(entry).join("energy_uj"),
                format!("{uj}\n"),
            )
            .unwrap();
        }
        /// Busy ticks (10 ms each) in user time.
        fn stat(&self, ticks: u64) {
            std::fs::write(
                self.dir.path().join("stat"),
                format!("cpu  {ticks} 0 0 999 0 0 0 0 0 0\ncpu0 {ticks} 0 0 999 0 0 0 0 0 0\n"),
            )
            .unwrap();
        }
    }

    fn intel() -> Fake {
        Fake::new(&[
            ("intel-rapl:0", "package-0", 1_000_000),
            ("intel-rapl:0:0", "core", 1_000_000),
            ("intel-rapl:0:1", "uncore", 1_000_000),
            ("intel-rapl:1", "package-1", 1_000_000),
            ("intel-rapl:1:0", "core", 1_000_000),
            ("intel-rapl-mmio:0", "package-0", 1_000_000),
            ("intel-rapl:0:2", "psys", 1_000_000),
        ])
    }

    #[test]
    fn sums_sockets_per_domain_and_skips_duplicates_and_unknown_zones() {
        let f = intel();
        let mut s = Sampler::new(f.options()).unwrap();
        f.energy("intel-rapl:0", 100);
        f.energy("intel-rapl:1", 50);
        f.energy("intel-rapl:0:0", 30);
        f.energy("intel-rapl-mmio:0", 7777);
        f.energy("intel-rapl:0:2", 9999);
        let snap = s.sample(1, &[]).unwrap();
        assert_eq!(snap.host_uj, [Some(150), Some(30), Some(0), None]);
        assert_eq!(snap.domains(), 0b0111);
        assert_eq!(snap.energy_uj(Domain::Dram as i32, -1), None);
        assert_eq!(snap.energy_uj(7, -1), None);
    }

    #[test]
    fn a_wrap_on_the_host_is_no_jump() {
        let f = intel();
        f.energy("intel-rapl:0", 999_000);
        let mut s = Sampler::new(f.options()).unwrap();
        f.energy("intel-rapl:0", 500); // wrapped at 1_000_000
        assert_eq!(s.sample(1, &[]).unwrap().host_uj[0], Some(1_500));
        f.energy("intel-rapl:0", 800);
        assert_eq!(s.sample(2, &[]).unwrap().host_uj[0], Some(1_800));
    }

    #[test]
    fn a_counter_that_jumps_beyond_any_zone_counts_from_its_new_value() {
        let f = intel();
        let mut s = Sampler::new(f.options()).unwrap();
        f.energy("intel-rapl:0", 1_000_000_000_000_000);
        assert_eq!(s.sample(1, &[]).unwrap().host_uj[0], Some(0));
        f.energy("intel-rapl:0", 1_000_000_000_000_500);
        assert_eq!(s.sample(2, &[]).unwrap().host_uj[0], Some(500));
    }

    #[test]
    fn a_failed_sample_loses_no_energy() {
        let f = intel();
        let mut s = Sampler::new(f.options()).unwrap();
        f.energy("intel-rapl:0", 700);
        std::fs::write(f.dir.path().join("stat"), "").unwrap();
        assert!(s.sample(1, &[]).is_err());
        f.stat(0);
        assert_eq!(s.sample(2, &[]).unwrap().host_uj[0], Some(700));
    }

    #[test]
    fn energy_goes_to_vcpus_by_their_share_of_host_cpu_time() {
        let f = intel();
        let mut s = Sampler::new(f.options()).unwrap();
        s.sample(0, &[Some((10, 0)), Some((11, 0))]).unwrap();
        // 1 s of host busy time; vCPU 0 used 0.5 s, vCPU 1 0.1 s.
        f.stat(100);
        f.energy("intel-rapl:0", 10_000);
        f.energy("intel-rapl:0:0", 1_000);
        let snap = s
            .sample(1, &[Some((10, 500_000_000)), Some((11, 100_000_000))])
            .unwrap();
        assert_eq!(snap.energy_uj(0, 0), Some(5_000));
        assert_eq!(snap.energy_uj(0, 1), Some(1_000));
        assert_eq!(snap.energy_uj(1, 1), Some(100));
        assert_eq!(snap.energy_uj(0, -2), Some(6_000));
        assert_eq!(snap.cpu_ns(-2), Some(600_000_000));
        assert_eq!(snap.cpu_ns(-1), Some(1_000_000_000));
        assert_eq!(snap.energy_uj(0, 2), None);
        // No host time passed: the energy waits for the next period.
        f.energy("intel-rapl:0", 12_000);
        let snap = s
            .sample(2, &[Some((10, 500_000_000)), Some((11, 100_000_000))])
            .unwrap();
        assert_eq!(snap.energy_uj(0, -2), Some(6_000));
        f.stat(200);
        let snap = s
            .sample(3, &[Some((10, 1_500_000_000)), Some((11, 100_000_000))])
            .unwrap();
        assert_eq!(snap.energy_uj(0, 0), Some(7_000));
        assert_eq!(snap.energy_uj(0, 1), Some(1_000));
    }

    #[test]
    fn shares_never_sum_over_all_the_energy() {
        let f = intel();
        let mut s = Sampler::new(f.options()).unwrap();
        s.sample(0, &[Some((10, 0)), Some((11, 0))]).unwrap();
        // The coarse host counter says 10 ms; the threads used 30 ms.
        f.stat(1);
        f.energy("intel-rapl:0", 3_000);
        let snap = s.sample(1, &[Some((10, 20_000_000)), Some((11, 10_000_000))]).unwrap();
        assert_eq!(snap.energy_uj(0, 0), Some(2_000));
        assert_eq!(snap.energy_uj(0, 1), Some(1_000));
    }

    #[test]
    fn a_new_thread_for_a_vcpu_keeps_its_total_and_starts_from_now() {
        let f = intel();
        let mut s = Sampler::new(f.options()).unwrap();
        s.sample(0, &[Some((10, 0))]).unwrap();
        f.stat(100);
        f.energy("intel-rapl:0", 1_000);
        s.sample(1, &[Some((10, 1_000_000_000))]).unwrap();
        // vCPU 0 moved to thread 12, which has used 5 s before.
        let snap = s.sample(2, &[Some((12, 5_000_000_000))]).unwrap();
        assert_eq!(snap.energy_uj(0, 0), Some(1_000));
        assert_eq!(snap.cpu_ns(0), Some(1_000_000_000));
    }

    #[test]
    fn missing_or_bad_trees_are_named_errors() {
        let f = Fake::new(&[("intel-rapl:0", "psys", 1)]);
        let e = Sampler::new(f.options()).unwrap_err();
        assert!(e.to_string().contains("no RAPL zone"), "{e}");
        let mut o = f.options();
        o.powercap = "/nonexistent/powercap".into();
        assert!(
            Sampler::new(o)
                .unwrap_err()
                .to_string()
                .starts_with("/nonexistent/powercap: cannot read")
        );
        let f = intel();
        f.energy("intel-rapl:0", u64::MAX);
        std::fs::write(f.dir.path().join("powercap/intel-rapl:0/energy_uj"), "lots\n").unwrap();
        let e = Sampler::new(f.options()).unwrap_err();
        assert!(
            e.to_string()
                .contains("intel-rapl:0/energy_uj: unexpected content \"lots\\n\""),
            "{e}"
        );
        let f = intel();
        std::fs::write(f.dir.path().join("stat"), "intr 1 2 3\n").unwrap();
        assert!(
            Sampler::new(f.options())
                .unwrap_err()
                .to_string()
                .contains("stat: unexpected content")
        );
        let mut o = intel().options();
        o.period = Duration::from_millis(1);
        assert!(matches!(Sampler::new(o), Err(EnergyError::Period(_))));
    }

    #[test]
    fn a_fifo_in_the_tree_is_refused_without_blocking() {
        let f = intel();
        let energy = f.dir.path().join("powercap/intel-rapl:0/energy_uj");
        std::fs::remove_file(&energy).unwrap();
        // A FIFO stands in for a hostile tree.
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&energy)
                .status()
                .unwrap()
                .success()
        );
        let e = Sampler::new(f.options()).unwrap_err();
        assert!(e.to_string().contains("energy_uj: cannot read"), "{e}");
    }

    #[test]
    fn the_hub_samples_on_its_own_thread_and_stops_when_dropped() {
        let f = intel();
        let mut o = f.options();
        o.period = MIN_PERIOD;
        let gate = EnergyGate::new(o);
        let clock: Arc<dyn Clock> = Arc::new(crate::plugin::clock::HostClock::new());
        let hub = gate.hub(&clock).unwrap();
        assert!(Arc::ptr_eq(&hub, &gate.hub(&clock).unwrap()));
        let mut bound = 0;
        gate.threads.bind(0, &mut bound);
        f.energy("intel-rapl:0", 4_000);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while hub.snapshot().host_uj[0] != Some(4_000) {
            assert!(std::time::Instant::now() < deadline, "no sample within 10 s");
            std::thread::sleep(MIN_PERIOD);
        }
        assert!(hub.snapshot().vcpus.first().is_some_and(Option::is_some));
        drop(hub);
        assert!(gate.hub.lock().unwrap().upgrade().is_none());
        // Energy used while no plugin held the sampler is nobody's; the
        // totals go on from where they were, never back.
        f.energy("intel-rapl:0", 9_000);
        let hub = gate.hub(&clock).unwrap();
        assert_eq!(hub.snapshot().host_uj[0], Some(4_000));
        f.energy("intel-rapl:0", 9_500);
        while hub.snapshot().host_uj[0] != Some(4_500) {
            assert!(std::time::Instant::now() < deadline, "no sample within 10 s");
            std::thread::sleep(MIN_PERIOD);
        }
        // A tree that became unreadable refuses a restart and keeps the totals.
        drop(hub);
        std::fs::write(f.dir.path().join("stat"), "").unwrap();
        assert!(gate.hub(&clock).is_err());
        f.stat(0);
        assert_eq!(gate.hub(&clock).unwrap().snapshot().host_uj[0], Some(4_500));
    }

    #[test]
    fn a_dispatcher_gone_unbinds_its_thread_only_if_still_bound() {
        let threads = VcpuThreads::default();
        let mut bound = 0;
        threads.bind(3, &mut bound);
        assert_ne!(bound, 0);
        assert!(threads.now()[3].is_some());
        threads.unbind(3, bound + 1); // another thread took the slot meanwhile
        assert!(threads.now()[3].is_some());
        threads.unbind(3, bound);
        assert!(threads.now()[3].is_none());
        threads.bind(MAX_VCPUS, &mut 0);
        assert_eq!(threads.now().len(), 4);
    }
}
