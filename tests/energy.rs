//! Host energy on real KVM: the reference virtual RAPL (`plugins/rapl/`)
//! over a fake powercap tree the test drives, read by real guests.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use msrwasm::{Access, EnergyOptions, Engine, ExitReason, NoKvm, PolicySpec, Reply, kvm};
use msrwasm_tests::{build_rust_plugin, guest, kvm_available, manifest, start_with};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// What the fake host does every [`STEP`]: this many 10 ms ticks of busy
/// CPU time (4 CPUs busy), and this much energy per domain, µJ.
const TICKS_PER_STEP: u64 = 4;
const PKG_UJ_PER_STEP: u64 = 500_000; // 50 W
const CORE_UJ_PER_STEP: u64 = 300_000; // 30 W
const DRAM_UJ_PER_STEP: u64 = 50_000; // 5 W
const STEP: Duration = Duration::from_millis(10);
/// The fake package counter wraps every 1.2 s of this run.
const PKG_RANGE_UJ: u64 = 60_000_000;

/// A powercap tree (package, core, dram; no uncore) and `/proc/stat`,
/// advanced by a thread of the test every [`STEP`], with writes that are
/// atomic (rename) as sysfs reads are.
struct FakeHost {
    dir: tempfile::TempDir,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeHost {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let zones = [
            ("intel-rapl:0", "package-0", PKG_RANGE_UJ),
            ("intel-rapl:0:0", "core", 262_143_328_850),
            ("intel-rapl:0:1", "dram", 262_143_328_850),
        ];
        for (entry, name, range) in zones {
            let z = dir.path().join("powercap").join(entry);
            std::fs::create_dir_all(&z).unwrap();
            std::fs::write(z.join("name"), format!("{name}\n")).unwrap();
            std::fs::write(z.join("max_energy_range_uj"), format!("{range}\n")).unwrap();
        }
        let root = dir.path().to_owned();
        let write = move |step: u64| {
            let put = |path: PathBuf, text: String| {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, text).unwrap();
                std::fs::rename(&tmp, &path).unwrap();
            };
            let ticks = 1_000 + step * TICKS_PER_STEP;
            put(root.join("stat"), format!("cpu  {ticks} 0 0 5000 0 0 0 0 0 0\n"));
            let zone = |e: &str| root.join("powercap").join(e).join("energy_uj");
            put(
                zone("intel-rapl:0"),
                format!("{}\n", (7_000_000 + step * PKG_UJ_PER_STEP) % PKG_RANGE_UJ),
            );
            put(zone("intel-rapl:0:0"), format!("{}\n", step * CORE_UJ_PER_STEP));
            put(zone("intel-rapl:0:1"), format!("{}\n", step * DRAM_UJ_PER_STEP));
        };
        write(0);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut step = 0;
            while !stop2.load(Ordering::Relaxed) {
                std::thread::sleep(STEP);
                step += 1;
                write(step);
            }
        });
        Self {
            dir,
            stop,
            thread: Some(thread),
        }
    }

    fn options(&self) -> EnergyOptions {
        EnergyOptions {
            powercap: self.dir.path().join("powercap"),
            proc_stat: self.dir.path().join("stat"),
            ..EnergyOptions::default()
        }
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn rapl_manifest(grant: bool) -> (tempfile::TempDir, PolicySpec) {
    let wasm = build_rust_plugin("plugins/rapl", "virtual_rapl");
    let grants = if grant { "grants = [\"energy\"]\n" } else { "" };
    manifest(&format!(
        "[[plugin]]\nname = \"rapl\"\npath = \"{}\"\n{grants}[plugin.config]\ntdp_watts = 95\n",
        wasm.display()
    ))
}

#[test]
fn a_plugin_without_the_grant_is_refused_naming_it() {
    let (_dir, spec) = rapl_manifest(false);
    let e = Engine::builder().build(spec).unwrap_err();
    let text = msrwasm::tools::error_chain(&e);
    assert!(
        text.contains(
            "imports host energy (`msr_energy_v1`), which the manifest does not grant plugin `rapl` (add grants = [\"energy\"]"
        ),
        "{text}"
    );
}

#[test]
fn a_granted_plugin_on_a_host_without_powercap_is_a_start_up_error() {
    let (_dir, spec) = rapl_manifest(true);
    let missing = tempfile::tempdir().unwrap();
    let e = Engine::builder()
        .energy(EnergyOptions {
            powercap: missing.path().to_owned(),
            ..EnergyOptions::default()
        })
        .build(spec.clone())
        .unwrap_err();
    let text = msrwasm::tools::error_chain(&e);
    assert!(
        text.contains("granted host energy, which this host cannot give"),
        "{text}"
    );
    assert!(text.contains("no RAPL zone"), "{text}");
    let e = Engine::builder()
        .energy(EnergyOptions {
            powercap: missing.path().join("absent"),
            ..EnergyOptions::default()
        })
        .build(spec)
        .unwrap_err();
    assert!(msrwasm::tools::error_chain(&e).contains("absent: cannot read"));
}

#[test]
fn an_unknown_grant_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.toml");
    std::fs::write(dir.path().join("p.wat"), "(module)").unwrap();
    std::fs::write(
        &path,
        "[[plugin]]\nname = \"p\"\npath = \"p.wat\"\ngrants = [\"energy\", \"files\"]\n",
    )
    .unwrap();
    let e = PolicySpec::from_manifest(&path).unwrap_err().to_string();
    assert!(e.contains("vm.toml:4"), "{e}");
    assert!(
        e.contains("key `plugin.grants` of plugin `p`: unknown grant `files`"),
        "{e}"
    );
}

/// The WIT flavour: a component importing `msrwasm:plugin/energy` needs
/// the grant, then reads the same samples, here through synthetic exits.
#[test]
fn components_read_energy_through_the_wit_interface_when_granted() {
    let wasm = msrwasm_tests::build_rust_component("tests/plugins/energy_component", "energy_component");
    let text = |grant: &str| format!("[[plugin]]\nname = \"e\"\npath = \"{}\"\n{grant}", wasm.display());
    let (_d, spec) = manifest(&text(""));
    let e = msrwasm::tools::error_chain(&Engine::builder().build(spec).unwrap_err());
    assert!(
        e.contains("imports host energy (`msrwasm:plugin/energy@1.0.0`), which the manifest does not grant plugin `e`"),
        "{e}"
    );

    let host = FakeHost::start();
    let (_d, spec) = manifest(&text("grants = [\"energy\"]\n"));
    let engine = Engine::builder()
        .filter(msrwasm::filter::RecordingFilter::default())
        .energy(host.options())
        .build(spec)
        .unwrap();
    let mut vcpu = engine.dispatcher(0);
    let mut read = |index| match vcpu.handle(Access::read(index, ExitReason::Filter), &mut NoKvm).reply {
        Reply::Read(v) => v,
        other => panic!("{index:#x}: {other:?}"),
    };
    // package, core and dram
    assert_eq!(read(0x4d53_0002), 0b1011);
    let deadline = Instant::now() + Duration::from_secs(10);
    while read(0x4d53_0000) < 2 * PKG_UJ_PER_STEP {
        assert!(Instant::now() < deadline, "the host's package energy never advanced");
        std::thread::sleep(STEP);
    }
    // This thread is vCPU 0's: once sampled, the VM has CPU time.
    while !matches!(
        vcpu.handle(Access::read(0x4d53_0001, ExitReason::Filter), &mut NoKvm)
            .reply,
        Reply::Read(_)
    ) {
        assert!(Instant::now() < deadline, "vCPU 0 was never sampled");
        std::thread::sleep(STEP);
    }
}

/// Two VMs on one shared runtime: each sees its own vCPUs only (a busy
/// vCPU 0 of one is not the other's vCPU 0).
#[test]
fn vms_sharing_a_runtime_keep_their_vcpus_apart() {
    let wasm = msrwasm_tests::build_rust_component("tests/plugins/energy_component", "energy_component");
    let host = FakeHost::start();
    let runtime = msrwasm::tools::Runtime::shared();
    let (_d, spec) = manifest(&format!(
        "[[plugin]]\nname = \"e\"\npath = \"{}\"\ngrants = [\"energy\"]\n",
        wasm.display()
    ));
    let vm = || {
        Engine::builder()
            .runtime(runtime.clone())
            .filter(msrwasm::filter::RecordingFilter::default())
            .energy(host.options())
            .build(spec.clone())
            .unwrap()
    };
    let (busy, idle) = (vm(), vm());
    // The VM's CPU time (ns) as its plugin reads it, once sampled.
    let vm_cpu = |d: &mut msrwasm::Dispatcher| match d
        .handle(Access::read(0x4d53_0001, ExitReason::Filter), &mut NoKvm)
        .reply
    {
        Reply::Read(v) => Some(v),
        _ => None,
    };
    let mut idle_vcpu = idle.dispatcher(0);
    let busy_thread = std::thread::spawn(move || {
        let mut d = busy.dispatcher(0);
        vm_cpu(&mut d); // binds this thread as the busy VM's vCPU 0
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(400) {
            std::hint::black_box(0);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match vm_cpu(&mut d) {
                Some(ns) if ns >= 300_000_000 => return ns,
                _ => assert!(Instant::now() < deadline, "the busy VM's CPU time never showed"),
            }
            std::thread::sleep(STEP);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while vm_cpu(&mut idle_vcpu).is_none() {
        assert!(Instant::now() < deadline, "the idle VM's vCPU was never sampled");
        std::thread::sleep(STEP);
    }
    let busy_ns = busy_thread.join().unwrap();
    let idle_ns = vm_cpu(&mut idle_vcpu).unwrap();
    assert!(
        idle_ns < 100_000_000,
        "the idle VM counts {idle_ns} ns of CPU (the busy one {busy_ns})"
    );
}

/// The sequence Linux's RAPL drivers and turbostat perform, on the Intel
/// and the AMD interface (tests/guests/rapl_probe.S).
#[test]
fn guests_probe_and_sample_rapl_as_on_hardware() {
    let (_dir, spec) = rapl_manifest(true);
    if !kvm_available() {
        return;
    }
    let host = FakeHost::start();
    let run = start_with(&guest("rapl_probe.elf"), 1, spec, |c| c.energy = host.options())
        .unwrap_or_else(|e| panic!("{e}"))
        .join(Duration::from_secs(60));
    run.expect_status(0);
    assert!(run.serial.contains("rapl: probe as hardware\n"), "{}", run.serial);
    assert!(run.serial.contains("rapl: package energy advances\n"), "{}", run.serial);
}

/// Real-mode guest at 0x1000, the same on every vCPU: read
/// CORE_ENERGY_STAT (this vCPU's core) and PKG_ENERGY_STAT (the VM), each
/// followed by an OUT that hands the value to the test's VMM, forever.
const GUEST: [u8; 22] = [
    0x66, 0xb9, 0x9a, 0x02, 0x01, 0xc0, // mov ecx, 0xc001029a
    0x0f, 0x32, // rdmsr
    0xe6, 0x80, // out 0x80, al
    0x66, 0xb9, 0x9b, 0x02, 0x01, 0xc0, // mov ecx, 0xc001029b
    0x0f, 0x32, // rdmsr
    0xe6, 0x81, // out 0x81, al
    0xeb, 0xea, // jmp 0x1000
];

/// What one vCPU thread saw.
#[derive(Debug, Default)]
struct Seen {
    core: u64,
    package: u64,
    /// The largest step between two package readings, µJ.
    max_step_uj: u64,
    cpu_ns: u64,
}

/// AMD energy units (2^-16 J) to µJ.
fn amd_uj(units: u64) -> u64 {
    (units * 1_000_000) >> 16
}

/// CPU time of the calling thread, ns (guest time included).
fn thread_cpu_ns() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    text.split_whitespace().next().unwrap().parse().unwrap()
}

/// CPU time of this process's thread named `name`, ns.
fn named_thread_cpu_ns(name: &str) -> Option<u64> {
    std::fs::read_dir("/proc/self/task").ok()?.flatten().find_map(|t| {
        let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
        (comm.trim() == name).then(|| {
            let text = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            text.split_whitespace().next()?.parse().ok()
        })?
    })
}

/// Two vCPUs, one busy and one idle most of the time (its VMM thread
/// sleeps between exits, as a halted vCPU's does), for 10 s: each one's
/// core energy, and the VM's package energy, are the fake host's energy
/// times their share of its busy CPU time, within 5%.
#[test]
fn energy_is_attributed_to_vcpus_by_their_cpu_time() -> anyhow::Result<()> {
    let (_dir, spec) = rapl_manifest(true);
    if !kvm_available() {
        return Ok(());
    }
    let host = FakeHost::start();
    let kvm = Kvm::new()?;
    let vm = kvm.create_vm()?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
    register_memory(&vm, &mem)?;
    mem.write_slice(&GUEST, GuestAddress(0x1000))?;
    kvm::check_support(&kvm)?;
    kvm::enable_user_space_msrs(&vm)?;
    let engine = Engine::builder()
        .filter(kvm::KvmFilter::new(&kvm, &vm, Vec::new())?)
        .energy(host.options())
        .build(spec)?;
    let sampler_cpu_before = named_thread_cpu_ns("msrwasm-energy").unwrap_or(0);
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for index in 0..2u32 {
        let mut fd = vm.create_vcpu(u64::from(index))?;
        fd.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?)?;
        let mut sregs = fd.get_sregs()?;
        (sregs.cs.base, sregs.cs.selector) = (0, 0);
        fd.set_sregs(&sregs)?;
        let mut regs = fd.get_regs()?;
        (regs.rip, regs.rflags) = (0x1000, 2);
        fd.set_regs(&regs)?;
        let mut msrs = engine.dispatcher(index);
        let stop = stop.clone();
        let idle = index == 1;
        threads.push(std::thread::spawn(move || -> anyhow::Result<Seen> {
            let mut seen = Seen::default();
            let cpu_start = thread_cpu_ns();
            while !stop.load(Ordering::Relaxed) {
                let port = match fd.run()? {
                    exit @ (VcpuExit::X86Rdmsr(_) | VcpuExit::X86Wrmsr(_)) => {
                        let access = kvm::msr_access(&exit).expect("an MSR exit");
                        msrs.handle_exit(&mut fd, access)?;
                        continue;
                    }
                    VcpuExit::IoOut(port, _) => port,
                    other => anyhow::bail!("unexpected exit {other:?}"),
                };
                let value = fd.get_regs()?.rax & 0xffff_ffff;
                if port == 0x80 {
                    seen.core = value;
                    continue;
                }
                anyhow::ensure!(
                    value >= seen.package,
                    "package energy went back: {} -> {value}",
                    seen.package
                );
                seen.max_step_uj = seen.max_step_uj.max(amd_uj(value - seen.package));
                seen.package = value;
                if idle {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            seen.cpu_ns = thread_cpu_ns() - cpu_start;
            Ok(seen)
        }));
    }
    std::thread::sleep(Duration::from_secs(10));
    stop.store(true, Ordering::Relaxed);
    let seen: Vec<Seen> = threads
        .into_iter()
        .map(|t| t.join().expect("vCPU thread"))
        .collect::<anyhow::Result<_>>()?;
    let elapsed = started.elapsed();
    let sampler_cpu = named_thread_cpu_ns("msrwasm-energy").unwrap_or(0) - sampler_cpu_before;
    drop(engine);

    // Energy per ns of host busy CPU time, as the fake host produces it.
    let per_ns = |uj_per_step: u64| uj_per_step as f64 / (TICKS_PER_STEP * 10_000_000) as f64;
    let error = |got: u64, want: f64| (got as f64 - want) / want;
    let core0 = error(amd_uj(seen[0].core), seen[0].cpu_ns as f64 * per_ns(CORE_UJ_PER_STEP));
    let vm_cpu = (seen[0].cpu_ns + seen[1].cpu_ns) as f64;
    let package = error(
        amd_uj(seen[0].package.max(seen[1].package)),
        vm_cpu * per_ns(PKG_UJ_PER_STEP),
    );
    let idle_want = seen[1].cpu_ns as f64 * per_ns(CORE_UJ_PER_STEP);
    println!(
        "attribution over {elapsed:.1?}: busy vCPU {:.0} ms CPU, core energy error {:+.2}%; idle vCPU {:.1} ms CPU, core {} µJ (expected {idle_want:.0}); VM package error {:+.2}%; largest package step {} µJ; sampler {:.1} µs CPU per period",
        seen[0].cpu_ns as f64 / 1e6,
        core0 * 100.0,
        seen[1].cpu_ns as f64 / 1e6,
        amd_uj(seen[1].core),
        package * 100.0,
        seen[0].max_step_uj.max(seen[1].max_step_uj),
        sampler_cpu as f64 / 1e3 / (elapsed.as_secs_f64() / 0.1),
    );
    assert!(
        core0.abs() < 0.05,
        "busy vCPU's core energy off by {:.1}%: {seen:?}",
        core0 * 100.0
    );
    assert!(
        package.abs() < 0.05,
        "VM package energy off by {:.1}%: {seen:?}",
        package * 100.0
    );
    // The idle vCPU's core barely moves: within 1% of the busy one's energy
    // of what its CPU time earns.
    let busy_uj = amd_uj(seen[0].core) as f64;
    assert!(
        (amd_uj(seen[1].core) as f64 - idle_want).abs() < busy_uj * 0.01,
        "idle vCPU: {seen:?}"
    );
    assert!(amd_uj(seen[1].core) as f64 <= busy_uj * 0.05, "idle vCPU: {seen:?}");
    // Seven host wraps, and no step larger than a few periods' share.
    let per_period = vm_cpu / elapsed.as_secs_f64() * 0.1 * per_ns(PKG_UJ_PER_STEP);
    assert!(
        (seen[0].max_step_uj.max(seen[1].max_step_uj) as f64) < per_period * 5.0 + 1_000.0,
        "a jump: {seen:?}, {per_period} µJ per period"
    );
    Ok(())
}

/// Registers guest memory with KVM (the test's VMM, not msrwasm).
#[allow(unsafe_code)]
fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> anyhow::Result<()> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: mem.get_host_address(region.start_addr())? as u64,
        };
        // SAFETY: the mapping belongs to `mem`, which outlives the vCPU
        // threads (they are joined before it drops), and slots do not overlap.
        unsafe { vm.set_user_memory_region(region_desc)? };
    }
    Ok(())
}
