//! `msrwasm check`: validates plugins without a VM (what a plugin author's
//! CI runs): ABI version, export signatures, imports, claims, `init`.

use std::sync::Arc;

use crate::msr::ExitReason;
use crate::plugin::meta::Meta;
use crate::plugin::state::StateStore;
use crate::plugin::{
    Answer, Flavour, ModuleCache, Plugin, PluginSettings, Runtime, abi, content_hash, read_plugin_file,
};
use crate::policy::{Policy, PolicySpec, fallback};

/// The verdict on one plugin file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    /// The file.
    pub file: String,
    /// Whether `run` would load it.
    pub ok: bool,
    /// Why it is refused, when it is.
    pub error: Option<String>,
    /// Content sha256 (what a manifest's `sha256` pins).
    pub sha256: Option<String>,
    /// File size.
    pub size: Option<u64>,
    /// `core` (ABI v1) or `component` (WIT world).
    pub flavour: Option<Flavour>,
    /// The ABI version spoken.
    pub abi_version: Option<i32>,
    /// Export names.
    pub exports: Vec<String>,
    /// Import names (`module.name`).
    pub imports: Vec<String>,
    /// Claimed ranges, hex; `None` when the plugin claims nothing itself.
    pub claims: Option<Vec<String>>,
    /// `ok` or `none`.
    pub init: Option<String>,
    /// The `msrwasm.meta` fields.
    pub meta: Option<Meta>,
    /// Things that load fine but probably do not do what the author wants.
    pub warnings: Vec<String>,
}

/// Loads the plugin `settings` describe as `run` would (its limits and
/// config apply), composes it into a policy alone (so claims `run` would
/// refuse are refused here too), and reports what it found.
pub fn check(settings: PluginSettings) -> CheckReport {
    check_cached(settings, &ModuleCache::new())
}

/// As [`check`], compiling through `cache` (a disk cache makes re-checking
/// a large component fast).
pub fn check_cached(settings: PluginSettings, cache: &ModuleCache) -> CheckReport {
    check_with(settings, cache, &Runtime::shared())
}

/// As [`check_cached`], on `runtime` (its [`crate::ExecMode`]: a no-JIT
/// check fills a disk cache with the Pulley code a no-JIT engine loads).
pub fn check_with(settings: PluginSettings, cache: &ModuleCache, runtime: &Arc<Runtime>) -> CheckReport {
    let path = settings.path.clone();
    let mut report = CheckReport {
        file: path.display().to_string(),
        ok: false,
        error: None,
        sha256: None,
        size: None,
        flavour: None,
        abi_version: None,
        exports: Vec::new(),
        imports: Vec::new(),
        claims: None,
        init: None,
        meta: None,
        warnings: Vec::new(),
    };
    let bytes = match read_plugin_file(&path) {
        Ok(bytes) => bytes,
        Err(e) => {
            report.error = Some(crate::util::error_chain(&e));
            return report;
        }
    };
    report.size = Some(bytes.len() as u64);
    let sha256 = content_hash(&bytes);
    report.sha256 = Some(sha256.clone());
    let plugin = match Plugin::build(
        runtime,
        settings,
        &bytes,
        sha256,
        &StateStore::default(),
        None,
        Some(cache),
    ) {
        Ok(plugin) => Arc::new(plugin),
        Err(e) => {
            report.error = Some(crate::util::error_chain(&e));
            return report;
        }
    };
    (report.exports, report.imports) = plugin.interface();
    report.flavour = Some(plugin.flavour());
    report.abi_version = Some(abi::ABI_VERSION);
    report.claims = plugin
        .claims()
        .map(|c| c.iter().map(|&r| crate::util::format_range(r)).collect());
    report.init = Some(if plugin.shape().init { "ok" } else { "none" }.into());
    report.meta = plugin.meta().cloned();
    if let Err(e) = Policy::compose_with(vec![plugin.clone()], &PolicySpec::default(), 1, false) {
        report.error = Some(crate::util::error_chain(&e));
        return report;
    }
    if plugin.claims().is_none() {
        report.warnings.extend(catch_all_warnings(&plugin));
    }
    report.warnings.extend(crate::policy::exit_storm_warnings(
        plugin
            .claims()
            .unwrap_or_default()
            .iter()
            .map(|&r| (plugin.name(), plugin.settings().hot_msrs, r)),
        plugin.templates(),
    ));
    if !plugin.templates().is_empty() && !plugin.settings().templates {
        report.warnings.push(
            "carries CPU templates (metadata `template.*`): a VM's manifest must grant them (grants = [\"templates\"], docs/manifest.md)".into(),
        );
    }
    if crate::plugin::imports_energy(&report.imports) {
        report.warnings.push(
            "imports host energy: a VM's manifest must grant it (grants = [\"energy\"], docs/energy.md); outside a VM its calls trap".into(),
        );
    }
    report.ok = true;
    report
}

/// A plugin that claims nothing is asked only about MSRs KVM sends to user
/// space by itself: reads of MSRs KVM handles never reach it. Asks it about
/// those MSRs and warns for each one it answers.
fn catch_all_warnings(plugin: &Arc<Plugin>) -> Vec<String> {
    let Ok(mut instance) = plugin.instantiate(0) else {
        return Vec::new();
    };
    let known = fallback::READ_SAME
        .iter()
        .map(|&(f, l, n)| (f, l, n))
        .chain(fallback::REFUSED.iter().map(|&(f, l, n, _)| (f, l, n)))
        .chain(fallback::EMULATED.iter().map(|&(i, n, ..)| (i, i, n)));
    let mut answered = Vec::new();
    for (first, last, name) in known {
        for index in first..=last.min(first.saturating_add(255)) {
            if matches!(
                instance.rdmsr(index, ExitReason::Unknown.bits()),
                Ok(Answer::Handled(_) | Answer::Fault)
            ) {
                answered.push(format!("{index:#x} ({name})"));
            }
            if answered.len() >= 8 {
                break;
            }
        }
    }
    if answered.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "claims nothing, but answers rdmsr of {}: KVM handles reads of these MSRs itself, so they never reach a plugin that does not claim them (only accesses KVM finds invalid arrive, with reason `inval`); claim them (a `claim` export or manifest `msrs`) to answer them",
        answered.join(", ")
    )]
}

impl CheckReport {
    /// A few lines for people (plugin-provided text escaped).
    pub fn text(&self) -> String {
        let mut s = format!("{}: {}\n", self.file, if self.ok { "ok" } else { "REFUSED" });
        if let Some(e) = &self.error {
            s += &format!("  error:    {}\n", crate::plugin::sanitize(e));
        }
        if let (Some(sha), Some(size)) = (&self.sha256, self.size) {
            s += &format!("  sha256:   {sha} ({size} bytes)\n");
        }
        if let Some(flavour) = self.flavour {
            s += &format!("  flavour:  {flavour}\n");
        }
        if self.ok {
            s += &format!("  abi:      version {}\n", abi::ABI_VERSION);
            s += &format!("  exports:  {}\n", self.exports.join(", "));
            s += &format!(
                "  imports:  {}\n",
                if self.imports.is_empty() {
                    "none".into()
                } else {
                    self.imports.join(", ")
                }
            );
            s += &format!(
                "  claims:   {}\n",
                self.claims
                    .as_ref()
                    .map_or("none (asked about every deflected access)".into(), |c| c.join(", "))
            );
            s += &format!("  init:     {}\n", self.init.as_deref().unwrap_or("none"));
        }
        match &self.meta {
            Some(meta) => {
                for (k, v) in meta {
                    // Metadata is the plugin's text: escaped so it cannot
                    // fake other lines or drive the terminal.
                    s += &format!(
                        "  meta:     {} = {}\n",
                        crate::plugin::sanitize(k),
                        crate::plugin::sanitize(v)
                    );
                }
            }
            None if self.ok => s += "  meta:     none (no msrwasm.meta section)\n",
            None => {}
        }
        for w in &self.warnings {
            s += &format!("  warning:  {w}\n");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_a_good_plugin_and_a_refused_one() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.wat");
        std::fs::write(
            &good,
            r#"(module (@custom "msrwasm.meta" "name = \"good\"\nversion = \"0.1.0\"")
                (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
                (func (export "claim") (param i32) (result i64) (select (i64.const 0x0000003500000035) (i64.const -1) (i32.eqz (local.get 0))))
                (func (export "rdmsr") (param i32) (result i32) (i32.const 2)))"#,
        )
        .unwrap();
        let r = check(PluginSettings::new("good", &good));
        assert!(r.ok, "{r:?}");
        assert_eq!(r.claims, Some(vec!["0x35".to_string()]));
        assert_eq!(r.meta.as_ref().unwrap()["version"], "0.1.0");
        assert!(r.text().contains("claims:   0x35"));

        let bad = dir.path().join("bad.wat");
        std::fs::write(&bad, "(module)").unwrap();
        let r = check(PluginSettings::new("bad", &bad));
        assert!(
            !r.ok
                && r.error
                    .as_deref()
                    .unwrap()
                    .contains("missing export `msrwasm_abi_version`")
        );
        assert!(r.text().contains("REFUSED"));
    }

    #[test]
    fn an_energy_plugin_checks_with_a_warning_outside_a_vm() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.wat");
        std::fs::write(
            &path,
            r#"(module (import "msr_energy_v1" "energy_uj" (func $e (param i32 i32) (result i64)))
                (import "msr" "reply" (func $reply (param i64)))
                (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
                (func (export "claim") (param i32) (result i64) (select (i64.const 0x0000061100000611) (i64.const -1) (i32.eqz (local.get 0))))
                (func (export "rdmsr") (param i32) (result i32) (call $reply (call $e (i32.const 0) (i32.const -2))) (i32.const 0)))"#,
        )
        .unwrap();
        let r = check(PluginSettings::new("e", &path));
        assert!(r.ok, "{r:?}");
        assert!(r.warnings.iter().any(|w| w.contains("imports host energy")), "{r:?}");
    }
}
