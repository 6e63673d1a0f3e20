//! `msrwasm check`: validates plugins without a VM (what a plugin author's
//! CI runs): ABI version, export signatures, imports, claims, `init`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::plugin::meta::Meta;
use crate::plugin::state::StateStore;
use crate::plugin::{Plugin, PluginSettings, abi, read_plugin_file};

/// The verdict on one plugin file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    pub file: String,
    pub ok: bool,
    /// Why it is refused, when it is.
    pub error: Option<String>,
    pub sha256: Option<String>,
    pub size: Option<u64>,
    pub abi_version: Option<i32>,
    pub exports: Vec<String>,
    pub imports: Vec<String>,
    /// Claimed ranges, hex; `None` when the plugin claims nothing itself.
    pub claims: Option<Vec<String>>,
    pub init: Option<String>,
    pub meta: Option<Meta>,
}

/// Loads `path` as the host would (with `config` for `msr.config`) and
/// reports what it found.
pub fn check(path: &Path, config: &BTreeMap<String, i64>) -> CheckReport {
    let mut report = CheckReport {
        file: path.display().to_string(),
        ok: false,
        error: None,
        sha256: None,
        size: None,
        abi_version: None,
        exports: Vec::new(),
        imports: Vec::new(),
        claims: None,
        init: None,
        meta: None,
    };
    let bytes = match read_plugin_file(path) {
        Ok(bytes) => bytes,
        Err(e) => {
            report.error = Some(e.to_string());
            return report;
        }
    };
    report.size = Some(bytes.len() as u64);
    report.sha256 = Some(crate::plugin::content_hash(&bytes));
    let name = path
        .file_stem()
        .map_or("plugin".into(), |s| s.to_string_lossy().into_owned());
    let mut settings = PluginSettings::new(name, path);
    settings.config = config.clone();
    match Plugin::from_bytes(settings, &bytes, &StateStore::default()) {
        Ok(plugin) => {
            let plugin = Arc::new(plugin);
            (report.exports, report.imports) = plugin.interface();
            report.abi_version = Some(abi::ABI_VERSION);
            report.claims = plugin.claims().map(|c| {
                c.iter()
                    .map(|&(f, l)| {
                        if f == l {
                            format!("{f:#x}")
                        } else {
                            format!("{f:#x}-{l:#x}")
                        }
                    })
                    .collect()
            });
            report.init = Some(if plugin.shape().init { "ok" } else { "none" }.into());
            report.meta = plugin.meta().cloned();
            report.ok = true;
        }
        Err(e) => report.error = Some(e.to_string()),
    }
    report
}

impl CheckReport {
    /// A few lines for people.
    pub fn text(&self) -> String {
        let mut s = format!("{}: {}\n", self.file, if self.ok { "ok" } else { "REFUSED" });
        if let Some(e) = &self.error {
            s += &format!("  error:    {e}\n");
        }
        if let (Some(sha), Some(size)) = (&self.sha256, self.size) {
            s += &format!("  sha256:   {sha} ({size} bytes)\n");
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
                    s += &format!("  meta:     {k} = {v}\n");
                }
            }
            None if self.ok => s += "  meta:     none (no msrwasm.meta section)\n",
            None => {}
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
        let r = check(&good, &BTreeMap::new());
        assert!(r.ok, "{r:?}");
        assert_eq!(r.claims, Some(vec!["0x35".to_string()]));
        assert_eq!(r.meta.as_ref().unwrap()["version"], "0.1.0");
        assert!(r.text().contains("claims:   0x35"));

        let bad = dir.path().join("bad.wat");
        std::fs::write(&bad, "(module)").unwrap();
        let r = check(&bad, &BTreeMap::new());
        assert!(
            !r.ok
                && r.error
                    .as_deref()
                    .unwrap()
                    .contains("missing export `msrwasm_abi_version`")
        );
        assert!(r.text().contains("REFUSED"));
    }
}
