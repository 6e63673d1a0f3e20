//! Guest profiles: a readable table of MSRs (`profile.toml`) compiled into
//! a plugin that answers them (WAT), the manifest that loads it, and a
//! `msrwasm test` script that checks every row. `msrwasm policy profile`
//! compiles a profile; `msrwasm policy record` writes one from a recorded
//! footprint; `msrwasm policy diff` compares two footprints.
//!
//! The format is documented in `plugins/profiles/README.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use toml::Spanned;

/// Largest profile file read.
const MAX_PROFILE_BYTES: u64 = 1 << 20;
/// Most rows in one profile: every row is a comparison on the exit path.
pub const MAX_ROWS: usize = 512;

/// Which CPU vendor a row applies to (the plugin's `vendor` config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vendor {
    /// Both.
    Any,
    /// `vendor = 1`.
    Intel,
    /// `vendor = 2`.
    Amd,
}

/// What a guest RDMSR gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    /// This value (or, with `write = "store"`, the last value written).
    Value(u64),
    /// `MSR_CORE_THREAD_COUNT` from the `cores` and `threads` config:
    /// `cores << 16 | threads`.
    Topology,
    /// #GP.
    Gp,
}

/// What a guest WRMSR does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Write {
    /// #GP: a read-only MSR.
    Gp,
    /// Accepted and dropped.
    Ignore,
    /// Accepted; later reads return it (VM-wide, kept across hot reloads).
    Store,
}

/// One row of a profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub index: u32,
    pub name: String,
    pub vendor: Vendor,
    pub read: Read,
    pub write: Write,
    /// Writes with any of these bits set fault (reserved bits).
    pub reserved: u64,
    /// Log the first access on each vCPU (a recorded read-as-zero).
    pub log: bool,
    pub why: String,
    pub source: String,
}

/// A guest profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    /// The plugin's name (a file stem: letters, digits, `_`, `-`).
    pub name: String,
    pub description: String,
    /// The manifest's `unhandled` for everything the profile does not answer.
    pub unhandled: String,
    pub rows: Vec<Row>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    name: Spanned<String>,
    description: Option<Spanned<String>>,
    unhandled: Option<Spanned<String>>,
    #[serde(default)]
    msr: Vec<RawRow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRow {
    index: Spanned<String>,
    name: Spanned<String>,
    #[serde(default = "any")]
    vendor: Vendor,
    read: Spanned<String>,
    write: Spanned<Write>,
    reserved: Option<Spanned<String>>,
    #[serde(default)]
    log: bool,
    why: Spanned<String>,
    source: Option<Spanned<String>>,
}

fn any() -> Vendor {
    Vendor::Any
}

/// Longest `name` of a row.
const MAX_NAME: usize = 64;
/// Longest `description`, `why` or `source`.
const MAX_TEXT: usize = 512;

/// `text` with control characters (newlines included) replaced: what goes
/// into generated comments, metadata and manifests stays on its line.
pub fn one_line(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl Profile {
    /// Reads and validates `profile.toml`; every refusal names the file,
    /// the line and the key.
    pub fn load(file: &Path) -> Result<Self> {
        let bytes = msrwasm::tools::read_regular(file, MAX_PROFILE_BYTES)
            .with_context(|| format!("{}: cannot read the profile", file.display()))?;
        let text = String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{}: not UTF-8 text", file.display()))?;
        Self::parse(file, &text)
    }

    /// Parses a profile's text; `file` names it in errors.
    pub fn parse(file: &Path, text: &str) -> Result<Self> {
        let at = |span: std::ops::Range<usize>, message: String| {
            anyhow::anyhow!("{}:{}: {message}", file.display(), line_of(text, span.start))
        };
        let raw: RawProfile = toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => at(span, e.message().to_owned()),
            None => anyhow::anyhow!("{}: {}", file.display(), e.message()),
        })?;
        let name = raw.name.get_ref().clone();
        if name.is_empty()
            || name.len() > 64
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(at(
                raw.name.span(),
                format!("`name` {name:?}: 1 to 64 letters, digits, `_` or `-`"),
            ));
        }
        let check_text = |value: &Spanned<String>, key: &str, max: usize| {
            let v = value.get_ref();
            if v.len() > max || v.chars().any(char::is_control) {
                return Err(at(
                    value.span(),
                    format!("`{key}`: at most {max} bytes on one line, without control characters"),
                ));
            }
            Ok(())
        };
        if let Some(d) = &raw.description {
            check_text(d, "description", MAX_TEXT)?;
        }
        let unhandled = match &raw.unhandled {
            None => "log".to_owned(),
            Some(u) if ["gp", "ignore", "log"].contains(&u.get_ref().as_str()) => u.get_ref().clone(),
            Some(u) => {
                return Err(at(
                    u.span(),
                    format!("`unhandled` {:?}: gp, ignore or log", u.get_ref()),
                ));
            }
        };
        if raw.msr.len() > MAX_ROWS {
            bail!("{}: {} [[msr]] rows, at most {MAX_ROWS}", file.display(), raw.msr.len());
        }
        let mut rows = Vec::with_capacity(raw.msr.len());
        let mut seen = BTreeMap::new();
        for r in raw.msr {
            let number = |s: &Spanned<String>, key: &str| {
                msrwasm::tools::parse_number(s.get_ref()).ok_or_else(|| {
                    at(
                        s.span(),
                        format!("`{key}` {:?}: not a number (0x... or decimal)", s.get_ref()),
                    )
                })
            };
            let index = number(&r.index, "index")?;
            let index = u32::try_from(index)
                .map_err(|_| at(r.index.span(), format!("`index` {index:#x} is wider than 32 bits")))?;
            if (0x800..=0x8ff).contains(&index) {
                return Err(at(
                    r.index.span(),
                    format!(
                        "`index` {index:#x}: the x2APIC range 0x800-0x8ff stays in KVM; a profile cannot answer it"
                    ),
                ));
            }
            let read = match r.read.get_ref().as_str() {
                "topology" => Read::Topology,
                "gp" => Read::Gp,
                _ => Read::Value(number(&r.read, "read")?),
            };
            let write = *r.write.get_ref();
            if write == Write::Store && !matches!(read, Read::Value(_)) {
                return Err(at(
                    r.write.span(),
                    "`write = \"store\"` needs a numeric `read` (the value before any write)".into(),
                ));
            }
            let reserved = match &r.reserved {
                Some(s) => number(s, "reserved")?,
                None => 0,
            };
            if reserved != 0 && write == Write::Gp {
                return Err(at(
                    r.reserved.as_ref().unwrap().span(),
                    "`reserved` with `write = \"gp\"`: every write faults already".into(),
                ));
            }
            if let (Read::Value(v), Write::Store) = (read, write)
                && v & reserved != 0
            {
                return Err(at(
                    r.read.span(),
                    format!("`read` {v:#x} sets reserved bits {:#x}", v & reserved),
                ));
            }
            check_text(&r.name, "name", MAX_NAME)?;
            check_text(&r.why, "why", MAX_TEXT)?;
            if let Some(source) = &r.source {
                check_text(source, "source", MAX_TEXT)?;
            }
            if r.why.get_ref().trim().is_empty() {
                return Err(at(
                    r.why.span(),
                    "`why` is empty: say why the guest needs this answer".into(),
                ));
            }
            for vendor in match r.vendor {
                Vendor::Any => &[Vendor::Intel, Vendor::Amd][..],
                Vendor::Intel => &[Vendor::Intel],
                Vendor::Amd => &[Vendor::Amd],
            } {
                if let Some(line) = seen.insert((index, *vendor as u8), line_of(text, r.index.span().start)) {
                    return Err(at(
                        r.index.span(),
                        format!("`index` {index:#x} for {vendor:?} already has a row (line {line})"),
                    ));
                }
            }
            rows.push(Row {
                index,
                name: r.name.into_inner(),
                vendor: r.vendor,
                read,
                write,
                reserved,
                log: r.log,
                why: r.why.into_inner(),
                source: r.source.map(Spanned::into_inner).unwrap_or_default(),
            });
        }
        Ok(Self {
            name,
            description: raw.description.map(Spanned::into_inner).unwrap_or_default(),
            unhandled,
            rows,
        })
    }

    fn uses_topology(&self) -> bool {
        self.rows.iter().any(|r| r.read == Read::Topology)
    }

    /// The claimed ranges: every row's index, adjacent ones merged.
    pub fn claims(&self) -> Vec<(u32, u32)> {
        let indexes: BTreeSet<u32> = self.rows.iter().map(|r| r.index).collect();
        let mut out: Vec<(u32, u32)> = Vec::new();
        for i in indexes {
            match out.last_mut() {
                Some((_, last)) if last.checked_add(1) == Some(i) => *last = i,
                _ => out.push((i, i)),
            }
        }
        out
    }

    /// The plugin, as WAT.
    pub fn to_wat(&self) -> String {
        let mut w = String::new();
        let name = &self.name;
        let _ = writeln!(
            w,
            ";; {name}.wat: guest profile \"{name}\", generated by `msrwasm policy profile`\n\
             ;; from profile.toml. Edit the profile, not this file, and regenerate.\n\
             ;;\n\
             ;; Config: vendor (0: answer both vendors' rows, 1: Intel, 2: AMD){}.",
            if self.uses_topology() {
                "; cores (1) and threads (= cores) per package"
            } else {
                ""
            }
        );
        let meta = format!(
            "name = \"{name}\"\nversion = \"1.0.0\"\ndescription = \"{}\"\nauthor = \"msrwasm policy profile\"\n",
            toml_escape(&self.description)
        );
        let _ = writeln!(w, "(module\n  (@custom \"msrwasm.meta\" \"{}\")", wat_escape(&meta));
        w += "  (import \"msr\" \"reply\" (func $reply (param i64)))\n";
        w += "  (import \"msr\" \"config\" (func $config (param i32 i32 i64) (result i64)))\n";
        if self.rows.iter().any(|r| r.write == Write::Store) {
            w += "  (import \"msr\" \"state_get\" (func $state_get (param i32) (result i64)))\n";
            w += "  (import \"msr\" \"state_set\" (func $state_set (param i32 i64)))\n";
        }
        let logged: Vec<&Row> = self.rows.iter().filter(|r| r.log).collect();
        if !logged.is_empty() {
            w += "  (import \"msr\" \"log\" (func $log (param i32 i32 i32)))\n";
        }
        // Config names at 0, 8, 16; log messages from 64, one per logged row.
        let mut data = String::from(
            "  (data (i32.const 0) \"vendor\")\n  (data (i32.const 8) \"cores\")\n  (data (i32.const 16) \"threads\")\n",
        );
        let mut messages = Vec::new();
        let mut offset = 64usize;
        for r in &logged {
            let text = format!("profile {name}: {:#x} {} answered as recorded", r.index, r.name);
            let _ = writeln!(data, "  (data (i32.const {offset}) \"{}\")", wat_escape(&text));
            messages.push((offset, text.len()));
            offset += text.len().next_multiple_of(8);
        }
        let _ = writeln!(w, "  (memory (export \"memory\") {})", offset.div_ceil(65536).max(1));
        w += &data;
        w += "  (global $vendor (mut i64) (i64.const 0))\n  (global $topology (mut i64) (i64.const 0))\n";
        for k in 0..logged.len() {
            let _ = writeln!(w, "  (global $logged{k} (mut i32) (i32.const 0))");
        }
        w += "\n  (func (export \"msrwasm_abi_version\") (result i32) (i32.const 1))\n\n";
        w += "  (func (export \"init\") (result i32)\n";
        w += "    (local $cores i64)\n    (local $threads i64)\n";
        w += "    (global.set $vendor (call $config (i32.const 0) (i32.const 6) (i64.const 0)))\n";
        w += "    (if (i64.gt_u (global.get $vendor) (i64.const 2)) (then (return (i32.const 1))))\n";
        if self.uses_topology() {
            w += "    (local.set $cores (call $config (i32.const 8) (i32.const 5) (i64.const 1)))\n";
            w += "    (local.set $threads (call $config (i32.const 16) (i32.const 7) (local.get $cores)))\n";
            w += "    ;; each field is 16 bits wide; at least one thread per core\n";
            w += "    (if (i32.or\n          (i32.or (i64.lt_s (local.get $cores) (i64.const 1)) (i64.gt_s (local.get $cores) (i64.const 0xffff)))\n          (i32.or (i64.lt_s (local.get $threads) (local.get $cores)) (i64.gt_s (local.get $threads) (i64.const 0xffff))))\n      (then (return (i32.const 2))))\n";
            w += "    (global.set $topology (i64.or (i64.shl (local.get $cores) (i64.const 16)) (local.get $threads)))\n";
        }
        w += "    (i32.const 0))\n\n";
        w += "  (func (export \"claim\") (param $n i32) (result i64)\n";
        for (k, (first, last)) in self.claims().iter().enumerate() {
            let _ = writeln!(
                w,
                "    (if (i32.eq (local.get $n) (i32.const {k})) (then (return (i64.const {:#018x}))))",
                (u64::from(*first) << 32) | u64::from(*last)
            );
        }
        w += "    (i64.const -1))\n\n";
        w += "  ;; 1: this row's vendor is the configured one (or vendor = 0)\n";
        w += "  (func $vendor_ok (param $want i64) (result i32)\n";
        w += "    (i32.or (i64.eqz (global.get $vendor)) (i64.eq (global.get $vendor) (local.get $want))))\n\n";
        // A row's comment and test: its index, and its vendor when it has one.
        let row_if = |r: &Row| {
            let index = format!("(i32.eq (local.get $i) (i32.const {:#x}))", r.index);
            let cond = match r.vendor {
                Vendor::Any => index,
                v => format!("(i32.and {index} (call $vendor_ok (i64.const {})))", v as u8),
            };
            format!("    ;; {:#x} {}\n    (if {cond} (then\n", r.index, r.name)
        };
        w += "  (func (export \"rdmsr\") (param $i i32) (result i32)\n";
        let mut k = 0;
        for r in &self.rows {
            w += &row_if(r);
            if r.log {
                let (off, len) = messages[k];
                let _ = writeln!(
                    w,
                    "      (if (i32.eqz (global.get $logged{k})) (then (global.set $logged{k} (i32.const 1)) (call $log (i32.const 1) (i32.const {off}) (i32.const {len}))))"
                );
                k += 1;
            }
            match (r.read, r.write) {
                (Read::Gp, _) => w += "      (return (i32.const 1))))\n",
                (Read::Topology, _) => {
                    w += "      (call $reply (global.get $topology))\n      (return (i32.const 0))))\n"
                }
                (Read::Value(v), Write::Store) => {
                    let _ = writeln!(
                        w,
                        "      (call $reply (i64.xor (call $state_get (i32.const {:#x})) (i64.const {v:#x})))\n      (return (i32.const 0))))",
                        r.index
                    );
                }
                (Read::Value(v), _) => {
                    let _ = writeln!(
                        w,
                        "      (call $reply (i64.const {v:#x}))\n      (return (i32.const 0))))"
                    );
                }
            }
        }
        w += "    (i32.const 2))\n\n";
        w += "  (func (export \"wrmsr\") (param $i i32) (param $v i64) (result i32)\n";
        for r in &self.rows {
            w += &row_if(r);
            if r.reserved != 0 {
                let _ = writeln!(
                    w,
                    "      (if (i64.ne (i64.and (local.get $v) (i64.const {:#x})) (i64.const 0)) (then (return (i32.const 1))))",
                    r.reserved
                );
            }
            match (r.write, r.read) {
                (Write::Gp, _) => w += "      (return (i32.const 1))))\n",
                (Write::Ignore, _) => w += "      (return (i32.const 0))))\n",
                (Write::Store, Read::Value(v)) => {
                    let _ = writeln!(
                        w,
                        "      (call $state_set (i32.const {:#x}) (i64.xor (local.get $v) (i64.const {v:#x})))\n      (return (i32.const 0))))",
                        r.index
                    );
                }
                (Write::Store, _) => unreachable!("refused by parse"),
            }
        }
        w += "    (i32.const 2))\n)\n";
        w
    }

    /// The manifest that loads the plugin (usable as `--manifest`).
    pub fn to_manifest(&self) -> String {
        let mut m = format!(
            "# Guest profile \"{}\": {}\n\
             # Generated by `msrwasm policy profile` from profile.toml (plugins/profiles/README.md).\n\
             # MSRs the profile does not answer go to `unhandled`: `log` answers them\n\
             # like kvm.ignore_msrs and logs each distinct MSR once per VM.\n\
             unhandled = \"{}\"\n\n[[plugin]]\nname = \"{}\"\npath = \"{}.wat\"\n\n[plugin.config]\n\
             vendor = 0   # 0: answer both vendors' rows, 1: Intel, 2: AMD (set it to the CPU the VMM exposes)\n",
            self.name, self.description, self.unhandled, self.name, self.name
        );
        if self.uses_topology() {
            m += "cores = 1    # cores per package, as in the VMM's CPUID topology\nthreads = 1  # threads per package\n";
        }
        m
    }

    /// A `msrwasm test` script that checks every row under `vendor = 0`
    /// (where both vendors' rows answer): for an index with a row per
    /// vendor, the first row answers and the second is only listed.
    pub fn to_script(&self) -> String {
        let mut s = format!(
            "# Every row of profile \"{}\", through the plugin (msrwasm test --manifest manifest.toml --case {}.test {}.wat).\n",
            self.name, self.name, self.name
        );
        let topology = self.uses_topology();
        if topology {
            s += "config cores 4\nconfig threads 8\n";
        }
        let mut seen = BTreeSet::new();
        for r in &self.rows {
            if !seen.insert(r.index) {
                let _ = writeln!(
                    s,
                    "# {:#x} {} ({:?} row): under vendor = 0 the row above answers; set vendor to check it",
                    r.index, r.name, r.vendor
                );
                continue;
            }
            let read = match r.read {
                Read::Value(v) => format!("{v:#x}"),
                Read::Topology => format!("{:#x}", (4u64 << 16) | 8),
                Read::Gp => "fault".into(),
            };
            let _ = writeln!(s, "# {:#x} {}\nrdmsr {:#x} -> {read}", r.index, r.name, r.index);
            match r.write {
                Write::Gp => {
                    let _ = writeln!(s, "wrmsr {:#x} 0 -> fault", r.index);
                }
                Write::Ignore => {
                    let _ = writeln!(s, "wrmsr {:#x} {:#x} -> handled", r.index, first_bit(!r.reserved));
                    if let Read::Value(v) = r.read {
                        let _ = writeln!(s, "rdmsr {:#x} -> {v:#x}", r.index);
                    }
                }
                Write::Store => {
                    let value = first_bit(!r.reserved);
                    let _ = writeln!(
                        s,
                        "wrmsr {:#x} {value:#x} -> handled\nrdmsr {:#x} -> {value:#x}",
                        r.index, r.index
                    );
                    if let Read::Value(v) = r.read {
                        let _ = writeln!(s, "wrmsr {:#x} {v:#x} -> handled", r.index);
                    }
                }
            }
            if r.reserved != 0 {
                let _ = writeln!(s, "wrmsr {:#x} {:#x} -> fault", r.index, first_bit(r.reserved));
            }
        }
        s
    }

    /// The profile as `profile.toml` text (what `policy record` writes).
    pub fn to_toml(&self) -> String {
        let mut t = format!(
            "# Guest profile: compile it with `msrwasm policy profile {}/profile.toml`.\n\
             # Rows: index, name, vendor (any|intel|amd), read (a value, \"topology\" or \"gp\"),\n\
             # write (gp|ignore|store), reserved (bits whose write faults), log, why, source.\n\
             name = \"{}\"\ndescription = \"{}\"\nunhandled = \"{}\"\n",
            self.name,
            self.name,
            toml_escape(&self.description),
            self.unhandled
        );
        for r in &self.rows {
            let read = match r.read {
                Read::Value(v) => format!("{v:#x}"),
                Read::Topology => "topology".into(),
                Read::Gp => "gp".into(),
            };
            let write = match r.write {
                Write::Gp => "gp",
                Write::Ignore => "ignore",
                Write::Store => "store",
            };
            let vendor = match r.vendor {
                Vendor::Any => "any",
                Vendor::Intel => "intel",
                Vendor::Amd => "amd",
            };
            let _ = write!(
                t,
                "\n[[msr]]\nindex = \"{:#x}\"\nname = \"{}\"\nvendor = \"{vendor}\"\nread = \"{read}\"\nwrite = \"{write}\"\n",
                r.index,
                toml_escape(&r.name)
            );
            if r.reserved != 0 {
                let _ = writeln!(t, "reserved = \"{:#x}\"", r.reserved);
            }
            if r.log {
                t += "log = true\n";
            }
            let _ = writeln!(
                t,
                "why = \"{}\"\nsource = \"{}\"",
                toml_escape(&r.why),
                toml_escape(&r.source)
            );
        }
        t
    }

    /// Writes `NAME.wat`, `manifest.toml` and `NAME.test` into `dir`
    /// (atomically, each); returns their paths.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let files = [
            (format!("{}.wat", self.name), self.to_wat()),
            ("manifest.toml".to_owned(), self.to_manifest()),
            (format!("{}.test", self.name), self.to_script()),
        ];
        let mut written = Vec::new();
        for (name, text) in files {
            let path = dir.join(name);
            msrwasm::tools::write_atomic_mode(&path, text.as_bytes(), 0o644)
                .with_context(|| format!("writing {}", path.display()))?;
            written.push(path);
        }
        Ok(written)
    }
}

fn first_bit(mask: u64) -> u64 {
    if mask == 0 { 0 } else { 1 << mask.trailing_zeros() }
}

fn toml_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| match c {
            '"' => vec!['\\', '"'],
            '\\' => vec!['\\', '\\'],
            c if c.is_control() => vec![' '],
            c => vec![c],
        })
        .collect()
}

fn wat_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'"' | b'\\' => {
                out.push('\\');
                out.push(b as char);
            }
            0x20..=0x7e => out.push(b as char),
            _ => {
                let _ = write!(out, "\\{b:02x}");
            }
        }
    }
    out
}

/// How `policy record` answers an MSR that went unhandled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Reads 0 (logged once per vCPU), writes dropped.
    Zero,
    /// Reads return this value, writes dropped.
    Value(u64),
    /// Reads return the last value the footprint saw (0 if none), writes
    /// dropped.
    Recorded,
    /// #GP on both.
    Gp,
}

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "zero" => Ok(Self::Zero),
            "recorded" => Ok(Self::Recorded),
            "gp" => Ok(Self::Gp),
            _ => match s.strip_prefix("value=").and_then(msrwasm::tools::parse_number) {
                Some(v) => Ok(Self::Value(v)),
                None => Err(format!("{s:?}: zero, recorded, gp or value=N")),
            },
        }
    }
}

/// A profile answering every MSR a footprint shows unhandled, with
/// `default`, or the action `overrides` gives for that MSR. `Recorded`
/// reads return the value a guest read where the MSR *was* answered (in
/// `values`: a footprint of the same guest on a host whose KVM, or whose
/// policy, knows the MSR), else the last value the guest wrote, else 0.
pub fn record(
    entries: &[msrwasm::FootprintEntry],
    values: Option<&[msrwasm::FootprintEntry]>,
    name: &str,
    source: &str,
    default: Action,
    overrides: &BTreeMap<u32, Action>,
) -> Result<Profile> {
    let source = one_line(source);
    let source = source.chars().take(MAX_TEXT - 64).collect::<String>();
    let index_of =
        |e: &msrwasm::FootprintEntry| msrwasm::tools::parse_number(&e.index).and_then(|i| u32::try_from(i).ok());
    let value_of = |e: &msrwasm::FootprintEntry| e.last_value.as_deref().and_then(msrwasm::tools::parse_number);
    let answered: BTreeMap<u32, u64> = values
        .unwrap_or_default()
        .iter()
        .filter(|e| e.op == "rdmsr" && !e.answered_by.contains_key("unhandled") && e.gp == 0)
        .filter_map(|e| Some((index_of(e)?, value_of(e)?)))
        .collect();
    let mut seen: BTreeMap<u32, Option<u64>> = BTreeMap::new();
    for e in entries {
        if !e.answered_by.contains_key("unhandled") {
            continue;
        }
        let Some(index) = index_of(e) else {
            continue;
        };
        let written = if e.op == "wrmsr" { value_of(e) } else { None };
        let slot = seen.entry(index).or_default();
        if let Some(v) = answered.get(&index).copied().or(written) {
            *slot = Some(v);
        }
    }
    for index in overrides.keys() {
        if !seen.contains_key(index) {
            bail!("--msr {index:#x}: the footprint has no unhandled access to it");
        }
    }
    let rows = seen
        .into_iter()
        .filter(|(index, _)| !(0x800..=0x8ff).contains(index))
        .map(|(index, recorded)| {
            let action = overrides.get(&index).copied().unwrap_or(default);
            let (read, write, log) = match action {
                Action::Zero => (Read::Value(0), Write::Ignore, true),
                Action::Value(v) => (Read::Value(v), Write::Ignore, false),
                Action::Recorded => (Read::Value(recorded.unwrap_or(0)), Write::Ignore, false),
                Action::Gp => (Read::Gp, Write::Gp, false),
            };
            Row {
                index,
                name: format!("MSR_{index:X}"),
                vendor: Vendor::Any,
                read,
                write,
                reserved: 0,
                log,
                why: format!("unhandled in the recorded footprint {source}"),
                source: source.clone(),
            }
        })
        .collect();
    let profile = Profile {
        name: name.to_owned(),
        description: format!("recorded from {source}"),
        unhandled: "log".into(),
        rows,
    };
    // What record writes must load back as it is.
    Profile::parse(Path::new("profile.toml"), &profile.to_toml())
        .context("the recorded profile does not parse back")?;
    Ok(profile)
}

/// What changed between two footprints (two guest versions, or two hosts):
/// accesses only in one, and, for the ones in both, who answered, #GPs
/// and the last value. Returns the text and the number of differences.
pub fn diff<'a>(
    a: &'a [msrwasm::FootprintEntry],
    b: &'a [msrwasm::FootprintEntry],
    a_name: &str,
    b_name: &str,
) -> Result<(String, usize)> {
    // A footprint msrwasm wrote has one entry per (op, index) and hex
    // indexes: anything else is refused rather than merged.
    let keyed = |entries: &'a [msrwasm::FootprintEntry],
                 name: &str|
     -> Result<BTreeMap<(u64, String), &'a msrwasm::FootprintEntry>> {
        let mut out = BTreeMap::new();
        for e in entries {
            let index = msrwasm::tools::parse_number(&e.index)
                .ok_or_else(|| anyhow::anyhow!("{name}: index {:?} is not a number", one_line(&e.index)))?;
            if out.insert((index, one_line(&e.op)), e).is_some() {
                bail!(
                    "{name}: {} {index:#x} appears twice: not a footprint msrwasm wrote",
                    one_line(&e.op)
                );
            }
        }
        Ok(out)
    };
    let (a, b) = (keyed(a, a_name)?, keyed(b, b_name)?);
    let keys: BTreeSet<_> = a.keys().chain(b.keys()).cloned().collect();
    let mut out = format!("--- {a_name}\n+++ {b_name}\n");
    let mut changes = 0;
    let who = |e: &msrwasm::FootprintEntry| one_line(&e.answered_by.keys().cloned().collect::<Vec<_>>().join(","));
    for k in keys {
        let label = format!("{} {:#x}", k.1, k.0);
        match (a.get(&k), b.get(&k)) {
            (Some(x), None) => {
                changes += 1;
                let _ = writeln!(
                    out,
                    "- {label}: {} accesses, answered by {}, {} #GP",
                    x.count,
                    who(x),
                    x.gp
                );
            }
            (None, Some(y)) => {
                changes += 1;
                let _ = writeln!(
                    out,
                    "+ {label}: {} accesses, answered by {}, {} #GP",
                    y.count,
                    who(y),
                    y.gp
                );
            }
            (Some(x), Some(y)) => {
                let mut what = Vec::new();
                if who(x) != who(y) {
                    what.push(format!("answered by {} -> {}", who(x), who(y)));
                }
                if (x.gp == 0) != (y.gp == 0) {
                    what.push(format!("#GP {} -> {}", x.gp, y.gp));
                }
                if x.last_value != y.last_value {
                    what.push(format!(
                        "last value {} -> {}",
                        one_line(x.last_value.as_deref().unwrap_or("-")),
                        one_line(y.last_value.as_deref().unwrap_or("-"))
                    ));
                }
                if !what.is_empty() {
                    changes += 1;
                    let _ = writeln!(out, "~ {label}: {}", what.join("; "));
                }
            }
            (None, None) => {}
        }
    }
    let _ = writeln!(out, "{changes} difference(s)");
    Ok((out, changes))
}

/// Firecracker's custom CPU template (its documented JSON): only
/// `msr_modifiers` is imported; the other sections are reported as ignored.
#[derive(Deserialize)]
struct FirecrackerTemplate {
    #[serde(default)]
    msr_modifiers: Vec<FirecrackerMsr>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FirecrackerMsr {
    addr: serde_json::Value,
    bitmap: String,
}

/// Imports a Firecracker custom CPU template: its MSR templates, and what
/// was ignored (sections other than `msr_modifiers`).
pub fn import_firecracker(file: &Path) -> Result<(Vec<msrwasm::MsrTemplate>, Vec<String>)> {
    let bytes = msrwasm::tools::read_regular(file, MAX_PROFILE_BYTES)
        .with_context(|| format!("{}: cannot read the template", file.display()))?;
    let template: FirecrackerTemplate = serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: not a Firecracker CPU template", file.display()))?;
    if template.msr_modifiers.len() > msrwasm::MAX_TEMPLATES {
        bail!(
            "{}: {} msr_modifiers, at most {}",
            file.display(),
            template.msr_modifiers.len(),
            msrwasm::MAX_TEMPLATES
        );
    }
    let ignored: Vec<String> = template
        .other
        .iter()
        .filter(|(_, value)| value.as_array().is_none_or(|list| !list.is_empty()))
        .map(|(key, value)| match value.as_array() {
            Some(list) => format!("{key} ({} entries): out of scope, not imported", list.len()),
            None => format!("{key}: out of scope, not imported"),
        })
        .collect();
    let mut templates: Vec<msrwasm::MsrTemplate> = Vec::new();
    for (n, m) in template.msr_modifiers.iter().enumerate() {
        let index = match &m.addr {
            serde_json::Value::String(s) => msrwasm::tools::parse_number(s),
            serde_json::Value::Number(v) => v.as_u64(),
            _ => None,
        }
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{}: msr_modifiers[{n}].addr {}: not a 32-bit MSR",
                file.display(),
                m.addr
            )
        })?;
        let parsed = msrwasm::MsrTemplate::parse(index, &m.bitmap)
            .map_err(|e| anyhow::anyhow!("{}: msr_modifiers[{n}] (MSR {index:#x}): {e}", file.display()))?;
        if templates.iter().any(|t| t.index == index) {
            bail!("{}: msr_modifiers[{n}]: MSR {index:#x} appears twice", file.display());
        }
        templates.push(parsed);
    }
    Ok((templates, ignored))
}

/// `[[template]]` entries for a manifest.
pub fn templates_manifest(templates: &[msrwasm::MsrTemplate], source: &str) -> String {
    let source = one_line(source);
    let mut out = format!(
        "# CPU template imported from {source} by `msrwasm policy import-template`:\n\
         # the guest reads each MSR below with the bitmap's 0/1 bits forced over the\n\
         # host's value (x keeps the host's bit). docs/manifest.md, \"CPU templates\".\n"
    );
    for t in templates {
        let _ = write!(
            out,
            "\n[[template]]\nmsr = \"{:#x}\"\nbitmap = \"{}\"\n",
            t.index,
            t.bitmap()
        );
    }
    out
}

/// A plugin carrying `templates` in its metadata and answering nothing:
/// pushed to a registry and followed by tag, it rolls a template out.
pub fn templates_plugin(templates: &[msrwasm::MsrTemplate], name: &str, source: &str) -> String {
    let (name, source) = (one_line(name), one_line(source));
    let mut meta = format!(
        "name = \"{}\"\nversion = \"1.0.0\"\ndescription = \"CPU template imported from {}\"\nauthor = \"msrwasm policy import-template\"\n",
        toml_escape(&name),
        toml_escape(&source)
    );
    for t in templates {
        let _ = writeln!(meta, "\"template.{:#x}\" = \"{}\"", t.index, t.bitmap());
    }
    format!(
        ";; {name}.wat: CPU template imported from {source} by `msrwasm policy\n\
         ;; import-template --plugin`. It answers no MSR: the host applies the\n\
         ;; templates in its metadata (docs/manifest.md, \"CPU templates\").\n\
         (module\n  (@custom \"msrwasm.meta\" \"{}\")\n\
         \x20 (func (export \"msrwasm_abi_version\") (result i32) (i32.const 1))\n\
         \x20 ;; no claims: asked about nothing\n\
         \x20 (func (export \"claim\") (param i32) (result i64) (i64.const -1))\n\
         \x20 (func (export \"rdmsr\") (param i32) (result i32) (i32.const 2)))\n",
        wat_escape(&meta)
    )
}
