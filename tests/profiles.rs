//! Guest profiles (plugins/profiles/): the committed plugin, manifest and
//! test script are what `msrwasm policy profile` makes of each profile;
//! every row passes its script; each profile's replay guest runs on real
//! KVM with no #GP and no unhandled access under the profile, and without
//! it faults once per access the profile answers for an MSR KVM does not
//! know. `policy record` turns a footprint into a profile that makes the
//! same guest pass.

use std::collections::BTreeMap;
use std::path::PathBuf;

use msrwasm::PolicySpec;
use msrwasm_cli::profile::{Action, Profile, Read, record};
use msrwasm_tests::{guest, kvm_available, manifest, repo, run};

const PROFILES: [&str; 3] = ["windows", "macos", "linux"];

fn dir(os: &str) -> PathBuf {
    repo().join("plugins/profiles").join(os)
}

fn load(os: &str) -> Profile {
    Profile::load(&dir(os).join("profile.toml")).unwrap_or_else(|e| panic!("{os}: {e:#}"))
}

#[test]
fn committed_files_are_what_the_profiles_compile_to() {
    for os in PROFILES {
        let profile = load(os);
        for (file, text) in [
            (format!("{os}.wat"), profile.to_wat()),
            ("manifest.toml".into(), profile.to_manifest()),
            (format!("{os}.test"), profile.to_script()),
        ] {
            let committed = std::fs::read_to_string(dir(os).join(&file)).unwrap();
            assert!(
                committed == text,
                "plugins/profiles/{os}/{file} differs from its profile: run `msrwasm policy profile plugins/profiles/{os}/profile.toml`"
            );
        }
        let readme = std::fs::read_to_string(repo().join("plugins/profiles/README.md")).unwrap();
        for row in &profile.rows {
            assert!(
                readme.contains(&format!("`{:#x}`", row.index)),
                "plugins/profiles/README.md does not document {os} {:#x}",
                row.index
            );
        }
    }
}

#[test]
fn every_row_passes_its_script_and_check() {
    for os in PROFILES {
        let spec = PolicySpec::from_manifest(&dir(os).join("manifest.toml")).unwrap();
        let settings = spec.plugins[0].clone();
        let report = msrwasm::tools::run_script(settings.clone(), &dir(os).join(format!("{os}.test"))).unwrap();
        assert!(report.failures.is_empty(), "{os}: {:#?}", report.failures);
        assert!(report.passed >= load(os).rows.len() * 2, "{os}: {}", report.passed);
        let check = msrwasm::tools::check(settings);
        assert!(check.ok, "{os}: {check:?}");
    }
}

/// Vendor rows: with `vendor = 2` only AMD rows (and `any`) answer, and an
/// index with a row per vendor answers each vendor's way.
#[test]
fn vendor_config_selects_the_rows() {
    let text = "name = \"v\"\n\
        [[msr]]\nindex = \"0x4d530001\"\nname = \"i\"\nvendor = \"intel\"\nread = \"0x1\"\nwrite = \"gp\"\nwhy = \"w\"\n\
        [[msr]]\nindex = \"0x4d530001\"\nname = \"a\"\nvendor = \"amd\"\nread = \"0x2\"\nwrite = \"ignore\"\nwhy = \"w\"\n\
        [[msr]]\nindex = \"0x4d530002\"\nname = \"i2\"\nvendor = \"intel\"\nread = \"0x3\"\nwrite = \"gp\"\nwhy = \"w\"\n";
    let profile = Profile::parse("p.toml".as_ref(), text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    profile.write(dir.path()).unwrap();
    let settings = PolicySpec::from_manifest(&dir.path().join("manifest.toml"))
        .unwrap()
        .plugins[0]
        .clone();
    for (vendor, script) in [
        (
            0,
            "rdmsr 0x4d530001 -> 0x1\nwrmsr 0x4d530001 0 -> fault\nrdmsr 0x4d530002 -> 0x3\n",
        ),
        (1, "rdmsr 0x4d530001 -> 0x1\nrdmsr 0x4d530002 -> 0x3\n"),
        (
            2,
            "rdmsr 0x4d530001 -> 0x2\nwrmsr 0x4d530001 0 -> handled\nrdmsr 0x4d530002 -> pass\n",
        ),
    ] {
        let case = dir.path().join(format!("v{vendor}.test"));
        std::fs::write(&case, format!("config vendor {vendor}\n{script}")).unwrap();
        let report = msrwasm::tools::run_script(settings.clone(), &case).unwrap();
        assert!(report.failures.is_empty(), "vendor {vendor}: {:#?}", report.failures);
    }
    // The generated script checks vendor 0 and lists the shadowed row.
    let report = msrwasm::tools::run_script(settings, &dir.path().join("v.test")).unwrap();
    assert!(report.failures.is_empty(), "{:#?}", report.failures);
    assert!(
        profile
            .to_script()
            .contains("(Amd row): under vendor = 0 the row above answers")
    );
}

#[test]
fn profile_errors_name_the_line_and_key() {
    let bad = [
        ("name = \"a b\"\n", ":1:", "`name`"),
        (
            "name = \"x\"\n[[msr]]\nindex = \"0x835\"\nname = \"n\"\nread = \"0\"\nwrite = \"gp\"\nwhy = \"w\"\n",
            ":3:",
            "x2APIC",
        ),
        (
            "name = \"x\"\n[[msr]]\nindex = \"0x35\"\nname = \"n\"\nread = \"topology\"\nwrite = \"store\"\nwhy = \"w\"\n",
            ":6:",
            "`write = \"store\"`",
        ),
        (
            "name = \"x\"\n[[msr]]\nindex = \"0x35\"\nname = \"n\"\nread = \"zero\"\nwrite = \"gp\"\nwhy = \"w\"\n",
            ":5:",
            "`read`",
        ),
        (
            "name = \"x\"\n[[msr]]\nindex = \"0x35\"\nname = \"n\"\nread = \"0\"\nwrite = \"gp\"\nwhy = \"w\"\n[[msr]]\nindex = \"0x35\"\nname = \"n\"\nvendor = \"amd\"\nread = \"0\"\nwrite = \"gp\"\nwhy = \"w\"\n",
            ":9:",
            "line 3",
        ),
        (
            "name = \"x\"\n[[msr]]\nindex = \"0x35\"\nname = \"n\"\nread = \"0\"\nwrite = \"gp\"\nwhy = \"w\"\ncolour = 1\n",
            ":8:",
            "colour",
        ),
    ];
    for (text, line, key) in bad {
        let e = format!("{:#}", Profile::parse("p.toml".as_ref(), text).unwrap_err());
        assert!(
            e.contains(&format!("p.toml{line}")) && e.contains(key),
            "{text}\n=> {e}"
        );
    }
}

/// One replay: the guest's #GPs, and the (op, index) of the accesses the
/// profile's plugin answered, nobody answered, and that faulted.
struct Replay {
    gp: usize,
    answered: Vec<(String, String)>,
    unhandled: usize,
    faulted: Vec<(String, String)>,
}

fn replay(os: &str, spec: PolicySpec) -> Replay {
    let r = run(&guest(&format!("{os}_replay.elf")), 1, spec).unwrap();
    let gp = r.report.exit_status() as usize;
    assert!(
        r.serial.contains(&format!("replay: {gp:#018x} #GP")),
        "{os}: {}",
        r.serial
    );
    let key = |t: &msrwasm::tools::TraceRecord| (t.op.clone(), t.index.clone());
    Replay {
        gp,
        answered: r
            .trace
            .iter()
            .filter(|t| t.by == "plugin" && t.plugin.as_deref() == Some(os))
            .map(key)
            .collect(),
        unhandled: r.trace.iter().filter(|t| t.by == "unhandled").count(),
        faulted: r.trace.iter().filter(|t| t.outcome == "gp").map(key).collect(),
    }
}

#[test]
fn replays_run_clean_under_their_profile_and_fault_without_it() {
    if !kvm_available() {
        return;
    }
    for os in PROFILES {
        let with = replay(os, PolicySpec::from_manifest(&dir(os).join("manifest.toml")).unwrap());
        assert_eq!(with.gp, 0, "{os}: #GP under the profile");
        assert_eq!(with.unhandled, 0, "{os}: unhandled accesses under the profile");
        let (_d, bare) = manifest("unhandled = \"gp\"\n");
        let without = replay(os, bare);
        eprintln!(
            "{os}: {} rows; replay: {} accesses answered by the profile; #GP with the profile {}, without {}",
            load(os).rows.len(),
            with.answered.len(),
            with.gp,
            without.gp
        );
        assert!(without.gp > 0, "{os}: nothing faults without the profile");
        // Every #GP the guest took: one access the host saw fault.
        assert_eq!(without.gp, without.faulted.len(), "{os}");
        // ... and each of them is one the profile answers.
        for access in &without.faulted {
            assert!(
                with.answered.contains(access),
                "{os}: {access:?} faults without the profile, which does not answer it"
            );
        }
    }
}

/// Record to profile: a footprint of the bare Linux replay becomes a
/// profile (read-as-zero, one MSR as #GP) under which the replay runs
/// clean except for that MSR, and which `check` and the script accept.
#[test]
fn a_recorded_footprint_becomes_a_working_profile() {
    if !kvm_available() {
        return;
    }
    let (_d, bare) = manifest("unhandled = \"log\"\n");
    let entries = run(&guest("linux_replay.elf"), 1, bare).unwrap().footprint;
    assert!(!entries.is_empty());
    let overrides = BTreeMap::from([(0x1ad, Action::Gp)]);
    let profile = record(
        &entries,
        None,
        "recorded",
        "linux-replay.json",
        Action::Zero,
        &overrides,
    )
    .unwrap();
    assert!(
        profile
            .rows
            .iter()
            .any(|row| row.index == 0x4e && row.read == Read::Value(0))
    );
    let out = tempfile::tempdir().unwrap();
    let toml = out.path().join("profile.toml");
    std::fs::write(&toml, profile.to_toml()).unwrap();
    assert_eq!(Profile::load(&toml).unwrap(), profile);
    profile.write(out.path()).unwrap();
    let spec = PolicySpec::from_manifest(&out.path().join("manifest.toml")).unwrap();
    let report = msrwasm::tools::run_script(spec.plugins[0].clone(), &out.path().join("recorded.test")).unwrap();
    assert!(report.failures.is_empty(), "{:#?}", report.failures);
    assert!(msrwasm::tools::check(spec.plugins[0].clone()).ok);
    let again = run(&guest("linux_replay.elf"), 1, spec).unwrap();
    assert_eq!(again.report.exit_status(), 1, "only the MSR recorded as #GP faults");
    assert!(again.trace.iter().all(|t| t.by != "unhandled"), "{:#?}", again.trace);
    // A diff of the two footprints names what changed.
    let (text, changes) = msrwasm_cli::profile::diff(&entries, &again.footprint, "before", "after").unwrap();
    assert!(
        changes > 0 && text.contains("~ rdmsr 0x4e: answered by unhandled -> plugin:recorded"),
        "{text}"
    );
    let (_, none) = msrwasm_cli::profile::diff(&entries, &entries, "a", "a").unwrap();
    assert_eq!(none, 0);
    // A crafted footprint with a repeated entry is refused, not merged.
    let doubled: Vec<_> = entries.iter().chain(&entries[..1]).cloned().collect();
    assert!(msrwasm_cli::profile::diff(&doubled, &entries, "x", "y").is_err());
    // `recorded` takes the values another footprint shows answered.
    let mut answered = entries.clone();
    for e in &mut answered {
        e.answered_by = BTreeMap::from([("kvm".to_string(), e.count)]);
        e.gp = 0;
        e.last_value = Some("0x1234".into());
    }
    let recorded = record(&entries, Some(&answered), "r", "fp", Action::Recorded, &BTreeMap::new()).unwrap();
    assert!(
        recorded.rows.iter().all(|row| row.read == Read::Value(0x1234)),
        "{recorded:?}"
    );
}
