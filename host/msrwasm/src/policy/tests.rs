//! Composing policies from loaded plugins.

use std::sync::Arc;

use super::*;
use crate::plugin::state::StateStore;
use crate::plugin::{Plugin, PluginSettings, Runtime};

fn plugin(name: &str, msrs: Option<Vec<(u32, u32)>>) -> Arc<Plugin> {
    let wat = r#"(module (func (export "msrwasm_abi_version") (result i32) i32.const 1)
        (func (export "rdmsr") (param i32) (result i32) i32.const 2))"#;
    let mut settings = PluginSettings::new(name, format!("{name}.wat"));
    settings.msrs = msrs;
    Arc::new(Plugin::from_bytes(&Runtime::shared(), settings, wat.as_bytes(), &StateStore::default()).unwrap())
}

#[test]
fn x2apic_claims_are_refused_when_composing() {
    let e = Policy::compose(
        vec![plugin("apic", Some(vec![(0x800, 0x80f)]))],
        &PolicySpec::default(),
        1,
    )
    .unwrap_err();
    assert!(
        crate::util::error_chain(&e).contains("plugin `apic` claims 0x800-0x80f"),
        "{e}"
    );
}

#[test]
fn names_are_unique_and_chains_bounded() {
    let e = Policy::compose(vec![plugin("a", None), plugin("a", None)], &PolicySpec::default(), 1).unwrap_err();
    assert!(e.to_string().contains("duplicate plugin name `a`"), "{e}");
    let many: Vec<_> = (0..=manifest::MAX_PLUGINS)
        .map(|i| plugin(&format!("p{i}"), None))
        .collect();
    let e = Policy::compose(many, &PolicySpec::default(), 1).unwrap_err();
    assert!(e.to_string().contains("at most 32"), "{e}");
}

#[test]
fn catch_alls_are_asked_everywhere_claimants_only_on_their_claims() {
    let p = Policy::compose(
        vec![
            plugin("all", None),
            plugin("one", Some(vec![(0x4d53_0000, 0x4d53_0000)])),
        ],
        &PolicySpec::default(),
        1,
    )
    .unwrap();
    assert_eq!(p.askers(0x4d53_0000), [0, 1]);
    assert_eq!(p.askers(0x4d53_0001), [0]);
    assert!(p.filter().claims(0x4d53_0000) && !p.filter().claims(0x4d53_0001));
}

#[test]
fn filter_errors_name_the_manifest_and_the_claiming_plugin() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("q.wat"),
        r#"(module (func (export "msrwasm_abi_version") (result i32) i32.const 1)
            (func (export "rdmsr") (param i32) (result i32) i32.const 2))"#,
    )
    .unwrap();
    // Seventeen claims too far apart to share one of KVM's 16 ranges.
    let msrs: Vec<String> = (0..17u32)
        .map(|i| format!("\"{:#x}\"", 0x6000_0000 + i * 0x10_0000))
        .collect();
    let manifest = dir.path().join("vm.toml");
    std::fs::write(
        &manifest,
        format!(
            "[[plugin]]\nname = \"q\"\npath = \"q.wat\"\nmsrs = [{}]\n",
            msrs.join(", ")
        ),
    )
    .unwrap();
    let spec = PolicySpec::from_manifest(&manifest).unwrap();
    let e = crate::Engine::builder()
        .filter(crate::policy::filter::RecordingFilter::default())
        .build(spec)
        .unwrap_err();
    let e = crate::util::error_chain(&e);
    assert!(e.contains(&format!("manifest {}", manifest.display())), "{e}");
    assert!(e.contains("plugin `q` claims 0x60000000"), "{e}");
}

#[test]
fn claims_and_templates_on_hot_msrs_warn_unless_confirmed() {
    let warnings = exit_storm_warnings(
        [
            ("aperf", false, (0xe0, 0xe8)),
            ("ok", true, (0x6e0, 0x6e0)),
            ("cold", false, (0x35, 0x35)),
        ],
        &[MsrTemplate::parse(0x6e0, "0b1").unwrap()],
    );
    assert_eq!(warnings.len(), 2, "{warnings:#?}");
    assert!(
        warnings[0].contains("plugin `aperf` claims 0xe7 (IA32_MPERF/APERF)")
            && warnings[0].contains("hot_msrs = true")
    );
    assert!(warnings[1].contains("a template covers 0x6e0 (IA32_TSC_DEADLINE)"));
    // `check` says the same, and the manifest key confirms it.
    #[cfg(feature = "tools")]
    check_warns_unless_confirmed();
    let text = "[[plugin]]\nname = \"a\"\npath = \"Cargo.toml\"\nhot_msrs = true\n";
    let spec = PolicySpec::parse(std::path::Path::new("vm.toml"), text).unwrap();
    assert!(spec.plugins[0].hot_msrs);
}

#[cfg(feature = "tools")]
fn check_warns_unless_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.wat");
    std::fs::write(
        &path,
        r#"(module (func (export "msrwasm_abi_version") (result i32) i32.const 1)
            (func (export "rdmsr") (param i32) (result i32) i32.const 2))"#,
    )
    .unwrap();
    let check = |confirmed: bool| {
        let mut settings = PluginSettings::new("p", &path);
        settings.msrs = Some(vec![(0xe7, 0xe8)]);
        settings.hot_msrs = confirmed;
        crate::check::check(settings)
    };
    let report = check(false);
    assert!(
        report.ok && report.warnings.iter().any(|w| w.contains("0xe7")),
        "{report:?}"
    );
    let report = check(true);
    assert!(!report.warnings.iter().any(|w| w.contains("0xe7")), "{report:?}");
}

#[test]
fn templates_carried_by_plugins_join_the_manifests_once_per_msr() {
    let carrying = |name: &str, meta: &str| {
        let wat = format!(
            r#"(module (@custom "msrwasm.meta" "{meta}") (func (export "msrwasm_abi_version") (result i32) i32.const 1)
            (func (export "rdmsr") (param i32) (result i32) i32.const 2))"#
        );
        let mut settings = PluginSettings::new(name, format!("{name}.wat"));
        settings.msrs = Some(vec![]);
        settings.templates = name != "ungranted";
        Plugin::from_bytes(&Runtime::shared(), settings, wat.as_bytes(), &StateStore::default()).map(Arc::new)
    };
    let t = carrying("t", r#"\"template.0x10a\" = \"0b1\""#).unwrap();
    assert_eq!(t.templates(), &[MsrTemplate::parse(0x10a, "0b1").unwrap()]);
    let policy = Policy::compose(vec![t.clone()], &PolicySpec::default(), 1).unwrap();
    assert_eq!(policy.template(0x10a).map(|t| t.apply(0)), Some(1));
    assert!(policy.filter().deflect.contains(&(0x10a, 0x10a)));
    let mut spec = PolicySpec::default();
    spec.templates.push(MsrTemplate::parse(0x10a, "0b0").unwrap());
    let e = Policy::compose(vec![t], &spec, 1).unwrap_err().to_string();
    assert!(e.contains("plugin `t` carries a template for MSR 0x10a"), "{e}");
    // Without the grant, a plugin's templates are refused.
    let ungranted = carrying("ungranted", r#"\"template.0x10a\" = \"0b1\""#).unwrap();
    let e = Policy::compose(vec![ungranted], &PolicySpec::default(), 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("grants = [\"templates\"]"), "{e}");
    let e = carrying("bad", r#"\"template.0x830\" = \"0b1\""#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("template.0x830"), "{e}");
    let e = carrying("bad", r#"\"template.0x10a\" = \"0b2\""#).unwrap_err();
    assert!(crate::util::error_chain(&e).contains("bitmap character '2'"), "{e}");
}
