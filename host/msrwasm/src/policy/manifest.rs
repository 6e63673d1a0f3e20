//! The VM manifest (`manifest.md`): TOML that composes plugins into a VM's
//! MSR policy. Every refusal names the file, the line and the key.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::plugin::{OnError, PluginSettings};

pub use crate::msr::Unhandled;

/// The default action of the VM's MSR filter (`filter_default`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FilterDefault {
    /// KVM handles every MSR nobody claims (the default).
    #[default]
    Allow,
    /// A default-deny MSR firewall: only `allow` stays in KVM; every other
    /// access leaves KVM with reason FILTER and goes to the plugins, then
    /// the `unhandled` policy.
    Deny,
}

/// A VM's MSR policy as written: the plugins in order, `unhandled`, and
/// the firewall.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySpec {
    /// What happens to accesses no plugin answers.
    pub unhandled: Unhandled,
    /// The MSR filter's default action.
    pub filter_default: FilterDefault,
    /// With `filter_default = deny`: the MSRs KVM keeps handling itself.
    pub allow: Vec<(u32, u32)>,
    /// The plugins, in chain order.
    pub plugins: Vec<PluginSettings>,
    /// CPU templates: MSRs whose bits the guest reads forced (`[[template]]`).
    pub templates: Vec<MsrTemplate>,
    /// The manifest file this came from: only [`PolicySpec::from_manifest`]
    /// sets it, and the engine follows that file (see
    /// [`crate::Engine::update`]).
    pub(crate) manifest: Option<PathBuf>,
}

/// A manifest refused: where, which key, and why.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ManifestError {
    /// The manifest file.
    pub file: PathBuf,
    /// The line of the offending key, when known.
    pub line: Option<usize>,
    /// What is wrong, naming the key.
    pub message: String,
    /// Plugin files the manifest names (also when one of them is missing),
    /// so that a watcher retries the manifest when they appear.
    pub names: Vec<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    #[serde(default)]
    unhandled: Unhandled,
    #[serde(default)]
    filter_default: FilterDefault,
    allow: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    plugin: Vec<RawPlugin>,
    #[serde(default)]
    template: Vec<RawTemplate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    msr: Spanned<String>,
    bitmap: Spanned<String>,
}

/// One MSR of a CPU template (Firecracker's `msr_modifiers`): the guest
/// reads the host's value (KVM's, or a plugin's answer) with the bits of
/// `mask` forced to those of `value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MsrTemplate {
    /// The MSR.
    pub index: u32,
    /// The bits the template sets (`0` or `1` in the bitmap).
    pub mask: u64,
    /// Their values (bits outside `mask` are 0).
    pub value: u64,
}

impl MsrTemplate {
    /// Parses a bitmap as Firecracker's templates write it: `0b` and up to
    /// 64 characters `0`, `1` or `x` (keep the host's bit), most
    /// significant first; a shorter bitmap covers the low bits (the rest
    /// are `x`). `_` separators are ignored.
    pub fn parse(index: u32, bitmap: &str) -> Result<Self, String> {
        let bits = bitmap
            .strip_prefix("0b")
            .ok_or_else(|| format!("bitmap {bitmap:?} must start with 0b"))?;
        let bits: Vec<u8> = bits.bytes().filter(|&b| b != b'_').collect();
        if bits.is_empty() || bits.len() > 64 {
            return Err(format!("bitmap has {} bits, give 1 to 64", bits.len()));
        }
        let (mut mask, mut value) = (0u64, 0u64);
        for (i, b) in bits.iter().rev().enumerate() {
            match b {
                b'0' => mask |= 1 << i,
                b'1' => {
                    mask |= 1 << i;
                    value |= 1 << i;
                }
                b'x' | b'X' => {}
                other => return Err(format!("bitmap character {:?}: only 0, 1 and x", *other as char)),
            }
        }
        Ok(Self { index, mask, value })
    }

    /// The value the guest reads, from the host's `base`.
    pub fn apply(&self, base: u64) -> u64 {
        (base & !self.mask) | self.value
    }

    /// The bitmap, 64 characters after `0b`.
    pub fn bitmap(&self) -> String {
        let mut s = String::from("0b");
        for i in (0..64).rev() {
            s.push(match (self.mask >> i & 1, self.value >> i & 1) {
                (0, _) => 'x',
                (_, 1) => '1',
                _ => '0',
            });
        }
        s
    }
}

/// Most `[[template]]` entries in one manifest.
pub const MAX_TEMPLATES: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    name: Spanned<String>,
    path: Spanned<String>,
    msrs: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    on_error: OnError,
    timeout_us: Option<Spanned<i64>>,
    init_timeout_us: Option<Spanned<i64>>,
    memory_max_kib: Option<Spanned<i64>>,
    sha256: Option<Spanned<String>>,
    pull_policy: Option<Spanned<crate::oci::PullPolicy>>,
    poll_s: Option<Spanned<i64>>,
    grants: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    hot_msrs: bool,
    #[serde(default)]
    config: BTreeMap<String, i64>,
}

/// Longest per-call budget a manifest may set (one second).
pub const MAX_TIMEOUT_US: i64 = 1_000_000;
/// Longest `_initialize`/`init` budget a manifest may set (ten seconds).
pub const MAX_INIT_TIMEOUT_US: i64 = 10_000_000;
/// Largest linear-memory cap (4 GiB, all a wasm32 memory can address).
pub const MAX_MEMORY_KIB: i64 = 4 * 1024 * 1024;
/// Most plugins one policy may chain: every plugin is instantiated on every
/// vCPU, so this bounds instances (and address space) per vCPU.
pub const MAX_PLUGINS: usize = 32;
/// Most entries in one plugin's `msrs` list.
pub const MAX_MSRS_ENTRIES: usize = 256;
/// Largest manifest file read.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

impl PolicySpec {
    /// Reads and validates a manifest file. Relative plugin paths are
    /// resolved against the manifest's directory.
    pub fn from_manifest(file: &Path) -> Result<Self, ManifestError> {
        let refused = |message: String| ManifestError {
            file: file.to_owned(),
            line: None,
            message,
            names: Vec::new(),
        };
        let bytes = crate::files::read_regular(file, MAX_MANIFEST_BYTES)
            .map_err(|e| refused(format!("cannot read manifest: {}", crate::util::error_chain(&e))))?;
        let text = String::from_utf8(bytes).map_err(|_| refused("the manifest is not UTF-8 text".into()))?;
        Self::parse(file, &text)
    }

    /// Parses manifest `text` as if read from `file`.
    pub fn parse(file: &Path, text: &str) -> Result<Self, ManifestError> {
        let err = |span: Option<Range<usize>>, message: String| ManifestError {
            file: file.to_owned(),
            line: span.map(|s| line_of(text, s.start)),
            message,
            names: Vec::new(),
        };
        let raw: RawManifest = toml::from_str(text).map_err(|e| {
            let message = e.message().trim();
            let message = match e.span().and_then(|span| key_at(text, span.start)) {
                Some(key) if !message.contains(&format!("`{key}`")) => format!("key `{key}`: {message}"),
                _ => message.to_owned(),
            };
            err(e.span(), message)
        })?;
        let base = file.parent().unwrap_or(Path::new("."));
        let named: Vec<PathBuf> = raw
            .plugin
            .iter()
            .filter(|p| !crate::oci::is_reference(p.path.get_ref()))
            .map(|p| base.join(p.path.get_ref()))
            .collect();
        let err = |span: Option<Range<usize>>, message: String| ManifestError {
            names: named.clone(),
            ..err(span, message)
        };
        if raw.plugin.len() > MAX_PLUGINS {
            return Err(err(
                Some(raw.plugin[MAX_PLUGINS].name.span()),
                format!(
                    "key `plugin`: {} plugins, at most {MAX_PLUGINS} may be chained in one VM",
                    raw.plugin.len()
                ),
            ));
        }
        let allow = match &raw.allow {
            Some(list) => {
                if raw.filter_default != FilterDefault::Deny {
                    return Err(err(
                        Some(list.span()),
                        "key `allow`: only meaningful with filter_default = \"deny\" (with the default, KVM handles every MSR nobody claims)".into(),
                    ));
                }
                list.get_ref()
                    .iter()
                    .map(|r| parse_msr_range(r.get_ref()).map_err(|m| err(Some(r.span()), format!("key `allow`: {m}"))))
                    .collect::<Result<Vec<_>, _>>()?
            }
            None => Vec::new(),
        };
        let mut names = HashSet::new();
        let mut plugins = Vec::new();
        for p in raw.plugin {
            let name = p.name.get_ref().trim();
            if name.is_empty() {
                return Err(err(Some(p.name.span()), "key `plugin.name`: must not be empty".into()));
            }
            if !names.insert(name.to_owned()) {
                return Err(err(
                    Some(p.name.span()),
                    format!("key `plugin.name`: duplicate plugin name `{name}`"),
                ));
            }
            let source = match crate::oci::is_reference(p.path.get_ref()) {
                true => Some(crate::oci::OciRef::parse(p.path.get_ref()).map_err(|e| {
                    err(
                        Some(p.path.span()),
                        format!("key `plugin.path` of plugin `{name}`: {e}"),
                    )
                })?),
                false => None,
            };
            let path = match source {
                Some(_) => PathBuf::from(p.path.get_ref()),
                None => base.join(p.path.get_ref()),
            };
            if source.is_none() && std::fs::symlink_metadata(&path).is_err() {
                return Err(err(
                    Some(p.path.span()),
                    format!("key `plugin.path` of plugin `{name}`: no such file {}", path.display()),
                ));
            }
            for (key, span) in [
                ("pull_policy", p.pull_policy.as_ref().map(Spanned::span)),
                ("poll_s", p.poll_s.as_ref().map(Spanned::span)),
            ] {
                if source.is_none() && span.is_some() {
                    return Err(err(
                        span,
                        format!("key `plugin.{key}` of plugin `{name}`: only for `oci://` paths"),
                    ));
                }
            }
            let pull_policy = p.pull_policy.as_ref().map(|s| *s.get_ref()).unwrap_or_default();
            if let Some(poll) = &p.poll_s
                && pull_policy != crate::oci::PullPolicy::Always
            {
                return Err(err(
                    Some(poll.span()),
                    format!("key `plugin.poll_s` of plugin `{name}`: only with pull_policy = \"always\""),
                ));
            }
            if let Some(list) = &p.msrs
                && list.len() > MAX_MSRS_ENTRIES
            {
                return Err(err(
                    Some(list[MAX_MSRS_ENTRIES].span()),
                    format!(
                        "key `plugin.msrs` of plugin `{name}`: {} entries, at most {MAX_MSRS_ENTRIES} (use ranges, `0x610-0x61f`)",
                        list.len()
                    ),
                ));
            }
            let msrs = p
                .msrs
                .map(|list| {
                    list.iter()
                        .map(|r| {
                            parse_msr_range(r.get_ref())
                                .map_err(|m| err(Some(r.span()), format!("key `plugin.msrs` of plugin `{name}`: {m}")))
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?;
            let bounded = |v: &Option<Spanned<i64>>, key: &str, min: i64, max: i64, default: u64| match v {
                None => Ok(default),
                Some(s) if (min..=max).contains(s.get_ref()) => Ok(*s.get_ref() as u64),
                Some(s) => Err(err(
                    Some(s.span()),
                    format!(
                        "key `plugin.{key}` of plugin `{name}`: {} is outside {min}..={max}",
                        s.get_ref()
                    ),
                )),
            };
            let timeout_us = bounded(
                &p.timeout_us,
                "timeout_us",
                1,
                MAX_TIMEOUT_US,
                PluginSettings::DEFAULT_TIMEOUT_US,
            )?;
            let init_timeout_us = p
                .init_timeout_us
                .as_ref()
                .map(|_| bounded(&p.init_timeout_us, "init_timeout_us", 1, MAX_INIT_TIMEOUT_US, 0))
                .transpose()?;
            let memory_max_kib = bounded(
                &p.memory_max_kib,
                "memory_max_kib",
                64,
                MAX_MEMORY_KIB,
                PluginSettings::DEFAULT_MEMORY_MAX_KIB,
            )?;
            let sha256 = match p.sha256 {
                Some(s) if s.get_ref().len() == 64 && s.get_ref().bytes().all(|b| b.is_ascii_hexdigit()) => {
                    Some(s.get_ref().to_ascii_lowercase())
                }
                Some(s) => {
                    return Err(err(
                        Some(s.span()),
                        format!("key `plugin.sha256` of plugin `{name}`: expected 64 hex digits"),
                    ));
                }
                None => None,
            };
            let poll_s = bounded(
                &p.poll_s,
                "poll_s",
                1,
                crate::oci::MAX_POLL_S as i64,
                crate::oci::DEFAULT_POLL_S,
            )?;
            let (mut energy, mut templates) = (false, false);
            for g in p.grants.iter().flat_map(|g| g.get_ref()) {
                match g.get_ref().as_str() {
                    "energy" => energy = true,
                    "templates" => templates = true,
                    other => {
                        return Err(err(
                            Some(g.span()),
                            format!(
                                "key `plugin.grants` of plugin `{name}`: unknown grant `{other}` (known: `energy`, `templates`)"
                            ),
                        ));
                    }
                }
            }
            let source = source.map(|reference| crate::oci::OciSource {
                reference,
                pull_policy,
                poll_s,
            });
            plugins.push(PluginSettings {
                name: name.to_owned(),
                path,
                msrs,
                on_error: p.on_error,
                timeout_us,
                init_timeout_us,
                memory_max_kib,
                sha256,
                config: p.config,
                source,
                energy,
                templates,
                hot_msrs: p.hot_msrs,
            });
        }
        if raw.template.len() > MAX_TEMPLATES {
            return Err(err(
                Some(raw.template[MAX_TEMPLATES].msr.span()),
                format!(
                    "key `template`: {} entries, at most {MAX_TEMPLATES}",
                    raw.template.len()
                ),
            ));
        }
        let mut templates: Vec<MsrTemplate> = Vec::new();
        for t in &raw.template {
            let (index, last) = parse_msr_range(t.msr.get_ref())
                .map_err(|m| err(Some(t.msr.span()), format!("key `template.msr`: {m}")))?;
            if index != last {
                return Err(err(
                    Some(t.msr.span()),
                    "key `template.msr`: one MSR, not a range".into(),
                ));
            }
            if (0x800..=0x8ff).contains(&index) {
                return Err(err(
                    Some(t.msr.span()),
                    format!(
                        "key `template.msr`: MSR {index:#x} cannot be modelled: KVM cannot filter the x2APIC range 0x800-0x8ff"
                    ),
                ));
            }
            if templates.iter().any(|o| o.index == index) {
                return Err(err(
                    Some(t.msr.span()),
                    format!("key `template.msr`: MSR {index:#x} has two templates"),
                ));
            }
            let template = MsrTemplate::parse(index, t.bitmap.get_ref()).map_err(|m| {
                err(
                    Some(t.bitmap.span()),
                    format!("key `template.bitmap` of MSR {index:#x}: {m}"),
                )
            })?;
            templates.push(template);
        }
        Ok(Self {
            unhandled: raw.unhandled,
            filter_default: raw.filter_default,
            allow,
            plugins,
            templates,
            manifest: Some(file.to_owned()),
        })
    }

    /// The quick form: `--plugin PATH`... in order, named after their file
    /// stems (`name`, `name-2`, ... when two stems collide).
    pub fn from_paths(paths: &[PathBuf], unhandled: Unhandled) -> Self {
        let mut names = HashSet::new();
        let plugins = paths
            .iter()
            .map(|path| {
                // `oci://...` names a registry artifact, named after its repository.
                let text = path.to_str().filter(|t| crate::oci::is_reference(t));
                let stem = match text.and_then(|t| crate::oci::OciRef::parse(t).ok()) {
                    Some(r) => r.name().to_owned(),
                    None => path
                        .file_stem()
                        .map_or("plugin".into(), |s| s.to_string_lossy().into_owned()),
                };
                let mut name = stem.clone();
                let mut n = 1;
                while !names.insert(name.clone()) {
                    n += 1;
                    name = format!("{stem}-{n}");
                }
                let mut settings = PluginSettings::new(name, path.clone());
                settings.source = text
                    .and_then(|t| crate::oci::OciRef::parse(t).ok())
                    .map(crate::oci::OciSource::new);
                settings
            })
            .collect();
        Self {
            unhandled,
            plugins,
            ..Self::default()
        }
    }

    /// The manifest file this came from, which the engine follows for hot
    /// reload; `None` for a spec built in code or given as text.
    pub fn manifest(&self) -> Option<&Path> {
        self.manifest.as_deref()
    }

    /// Every file this policy reads: the manifest and each plugin.
    pub fn files(&self) -> Vec<PathBuf> {
        self.plugins
            .iter()
            .filter(|p| !p.is_unfetched())
            .map(|p| p.path.clone())
            .chain(self.manifest.clone())
            .collect()
    }
}

/// The dotted key written on the line at `offset` (`plugin.timeout_us`),
/// qualified by the nearest table header above it, if the line has one.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next().unwrap_or_default();
    let key = line.split_once('=')?.0.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('[') || key.contains(char::is_whitespace) {
        return None;
    }
    let table = text[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|h| h.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    Some(match table {
        Some(table) => format!("{table}.{key}"),
        None => key.to_owned(),
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

/// Parses `"0x606"`, `"0x610-0x61f"` or decimal forms into an inclusive range.
pub fn parse_msr_range(s: &str) -> Result<(u32, u32), String> {
    let one = |t: &str| -> Result<u32, String> {
        let t = t.trim();
        let v =
            crate::util::parse_number(t).ok_or_else(|| format!("`{t}` is not an MSR index (write 0x606 or 1542)"))?;
        u32::try_from(v).map_err(|_| format!("`{t}` is out of the 32-bit MSR index space"))
    };
    let (first, last) = match s.split_once('-') {
        Some((a, b)) => (one(a)?, one(b)?),
        None => {
            let v = one(s)?;
            (v, v)
        }
    };
    if first > last {
        return Err(format!("range `{s}` is reversed ({first:#x} > {last:#x})"));
    }
    Ok((first, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PolicySpec, ManifestError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.wat"), "(module)").unwrap();
        PolicySpec::parse(&dir.path().join("vm.toml"), text)
    }

    #[test]
    fn reads_a_full_manifest() {
        let spec = parse(
            "unhandled = \"log\"\n[[plugin]]\nname = \"rapl\"\npath = \"a.wat\"\nmsrs = [\"0x606\", \"0x610-0x61f\"]\non_error = \"pass\"\ntimeout_us = 500\nmemory_max_kib = 2048\n[plugin.config]\ntdp_watts = 95\n",
        )
        .unwrap();
        assert_eq!(spec.unhandled, Unhandled::Log);
        let p = &spec.plugins[0];
        assert_eq!(p.msrs, Some(vec![(0x606, 0x606), (0x610, 0x61f)]));
        assert_eq!((p.on_error, p.timeout_us, p.memory_max_kib), (OnError::Pass, 500, 2048));
        assert_eq!(p.config.get("tdp_watts"), Some(&95));
    }

    #[test]
    fn oci_paths_take_a_pull_policy_and_files_do_not() {
        let spec = parse(
            "[[plugin]]\nname = \"r\"\npath = \"oci://127.0.0.1:5000/team/rapl:v2\"\npull_policy = \"always\"\npoll_s = 5\n",
        )
        .unwrap();
        let p = &spec.plugins[0];
        let source = p.source.as_ref().unwrap();
        assert_eq!((source.pull_policy, source.poll_s), (crate::oci::PullPolicy::Always, 5));
        assert!(p.is_unfetched());
        assert!(
            spec.files().iter().all(|f| f.ends_with("vm.toml")),
            "nothing local to watch yet"
        );
        for (text, line, says) in [
            (
                "path = \"a.wat\"\npull_policy = \"always\"\n",
                4,
                "key `plugin.pull_policy` of plugin `r`: only for `oci://` paths",
            ),
            (
                "path = \"oci://h/r\"\npoll_s = 5\n",
                4,
                "key `plugin.poll_s` of plugin `r`: only with pull_policy = \"always\"",
            ),
            (
                "path = \"oci://h/r\"\npull_policy = \"always\"\npoll_s = 0\n",
                5,
                "0 is outside 1..=86400",
            ),
            (
                "path = \"oci://h/R\"\n",
                3,
                "key `plugin.path` of plugin `r`: invalid OCI reference",
            ),
            (
                "path = \"oci://h/r\"\npull_policy = \"never\"\n",
                4,
                "unknown variant `never`",
            ),
        ] {
            let e = parse(&format!("[[plugin]]\nname = \"r\"\n{text}")).unwrap_err();
            assert!(e.to_string().contains(says) && e.line == Some(line), "{says}: {e}");
        }
    }

    #[test]
    fn a_manifest_chains_at_most_max_plugins() {
        let text: String = (0..=MAX_PLUGINS)
            .map(|i| format!("[[plugin]]\nname = \"p{i}\"\npath = \"a.wat\"\n"))
            .collect();
        let e = parse(&text).unwrap_err();
        assert!(e.to_string().contains("33 plugins, at most 32"), "{e}");
        assert_eq!(e.line, Some(3 * MAX_PLUGINS + 2), "the first plugin too many");
    }

    #[test]
    fn errors_name_line_and_key() {
        let e = parse("[[plugin]]\nname = \"a\"\npath = \"a.wat\"\nmsrs = [\"0x20-0x10\"]\n").unwrap_err();
        assert_eq!(e.line, Some(4));
        assert!(
            e.to_string()
                .contains("key `plugin.msrs` of plugin `a`: range `0x20-0x10` is reversed"),
            "{e}"
        );
        let e = parse("[[plugin]]\nname = \"a\"\npath = \"a.wat\"\n[[plugin]]\nname = \"a\"\npath = \"a.wat\"\n")
            .unwrap_err();
        assert_eq!(e.line, Some(5));
        assert!(e.to_string().contains("duplicate plugin name `a`"));
        let e = parse("[[plugin]]\nname = \"a\"\npath = \"a.wat\"\ncolour = 1\n").unwrap_err();
        assert_eq!(e.line, Some(4));
        assert!(e.to_string().contains("unknown field `colour`"), "{e}");
        let e = parse("[[plugin]]\nname = \"a\"\npath = \"a.wat\"\ntimeout_us = \"soon\"\n").unwrap_err();
        assert_eq!(e.line, Some(4));
        assert!(e.to_string().contains("key `plugin.timeout_us`: invalid type"), "{e}");
        let e = parse("[[plugin]]\nname = \"a\"\npath = \"a.wat\"\n[plugin.config]\nwatts = \"many\"\n").unwrap_err();
        assert!(e.to_string().contains("key `plugin.config.watts`"), "{e}");
        let e = parse("unhandled = \"explode\"\n").unwrap_err();
        assert!(e.to_string().contains("unknown variant `explode`"), "{e}");
        let e = parse("[[plugin]]\nname = \"a\"\npath = \"nope.wasm\"\n").unwrap_err();
        assert!(
            e.to_string().contains("key `plugin.path` of plugin `a`: no such file"),
            "{e}"
        );
        let e = parse("[[plugin]]\nname = \"a\"\npath = \"a.wat\"\nmsrs = [\"0x1_0000_0000\"]\n").unwrap_err();
        assert!(e.to_string().contains("not an MSR index"), "{e}");
        let e = parse("[[plugin]]\nname = \"a\"\npath = \"a.wat\"\nmsrs = [\"0x100000000\"]\n").unwrap_err();
        assert!(e.to_string().contains("out of the 32-bit"), "{e}");
        let e = parse("[[plugin]]\nname = \"a\"\npath = \"a.wat\"\nsha256 = \"abc\"\n").unwrap_err();
        assert!(e.to_string().contains("key `plugin.sha256`"), "{e}");
        let e = parse("[[plugin]]\nname = \"a\"\npath = \"a.wat\"\ntimeout_us = 0\n").unwrap_err();
        assert!(e.to_string().contains("key `plugin.timeout_us`"), "{e}");
    }

    #[test]
    fn quick_form_names_plugins_by_stem() {
        let spec = PolicySpec::from_paths(&["x/rapl.wasm".into(), "y/rapl.wat".into()], Unhandled::Ignore);
        let names: Vec<_> = spec.plugins.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["rapl", "rapl-2"]);
    }
}
