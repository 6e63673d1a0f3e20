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
        crate::error_chain(&e).contains("plugin `apic` claims 0x800-0x80f"),
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
