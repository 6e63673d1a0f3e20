//! `msrwasm test`: MSR accesses from a small script, run through a plugin
//! on the host alone (no KVM), with `msr.now_ns` under the script's
//! control. A team tests its plugin on a laptop with this.
//!
//! ```text
//! # comments and blank lines are ignored
//! config tdp_watts 95          # msr.config value (before the first access)
//! vcpu 1                       # the vCPU asking (default 0)
//! reason filter                # unknown (default), inval or filter
//! advance 1s                   # move the clock: ns, us, ms, s (plain = ns)
//! rdmsr 0x611 -> 0x5c0000      # expect a value ...
//! rdmsr 0x612 -> pass          # ... or fault, pass, error, any
//! wrmsr 0x610 0x1 -> fault     # writes: handled, fault, pass, error
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::msr::ExitReason;
use crate::plugin::clock::ManualClock;
use crate::plugin::state::StateStore;
use crate::plugin::{Answer, LoadError, Plugin, PluginInstance, PluginSettings, Runtime, RuntimeOptions};
use crate::util::parse_number;

/// A script that cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// The script cannot be read.
    #[error("{}", path.display())]
    Read {
        /// The script.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: crate::files::ReadError,
    },
    /// A line cannot be understood.
    #[error("{}:{line}: {message}", path.display())]
    Syntax {
        /// The script.
        path: PathBuf,
        /// The line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The plugin is refused.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The runtime with the script's clock did not start.
    #[error(transparent)]
    Runtime(#[from] crate::plugin::RuntimeError),
}

/// What a step expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Value(u64),
    Handled,
    Fault,
    Pass,
    Error,
    Any,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    Config(String, i64),
    Vcpu(u32),
    Reason(ExitReason),
    Advance(u64),
    Rdmsr(u32, Expect),
    Wrmsr(u32, u64, Expect),
}

/// The result of running a script.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ScriptReport {
    /// Steps that matched.
    pub passed: usize,
    /// `file:line: what was expected, what happened`.
    pub failures: Vec<String>,
}

fn parse_u64(word: &str) -> Option<u64> {
    parse_number(word)
}

fn parse_duration(word: &str) -> Option<u64> {
    let split = word.find(|c: char| !c.is_ascii_digit()).unwrap_or(word.len());
    let (n, unit) = word.split_at(split);
    let n: u64 = n.parse().ok()?;
    let scale = match unit {
        "" | "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(scale)
}

fn parse_expect(word: &str) -> Option<Expect> {
    Some(match word {
        "handled" => Expect::Handled,
        "fault" => Expect::Fault,
        "pass" => Expect::Pass,
        "error" => Expect::Error,
        "any" => Expect::Any,
        value => Expect::Value(parse_u64(value)?),
    })
}

fn parse(path: &Path, text: &str) -> Result<Vec<(usize, Step)>, ScriptError> {
    let mut steps = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = n + 1;
        let code = raw.split('#').next().unwrap_or_default().trim();
        if code.is_empty() {
            continue;
        }
        let bad = |message: String| ScriptError::Syntax {
            path: path.to_owned(),
            line,
            message,
        };
        let (access, expect) = match code.split_once("->") {
            Some((a, e)) => (a.trim(), Some(e.trim())),
            None => (code, None),
        };
        let words: Vec<&str> = access.split_whitespace().collect();
        let index = |w: &str| {
            parse_u64(w)
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| bad(format!("`{w}` is not an MSR index")))
        };
        let expectation = || {
            let e = expect.ok_or_else(|| bad("an access needs `-> EXPECTED`".into()))?;
            parse_expect(e).ok_or_else(|| bad(format!("`{e}` is not a value, handled, fault, pass, error or any")))
        };
        let step = match words.as_slice() {
            ["config", name, value] => {
                let v = value.parse::<i64>().ok().or_else(|| parse_u64(value).map(|v| v as i64));
                Step::Config(
                    name.to_string(),
                    v.ok_or_else(|| bad(format!("`{value}` is not an integer")))?,
                )
            }
            ["vcpu", v] => Step::Vcpu(v.parse().map_err(|_| bad(format!("`{v}` is not a vCPU index")))?),
            ["reason", r] => Step::Reason(match *r {
                "unknown" => ExitReason::Unknown,
                "inval" => ExitReason::Inval,
                "filter" => ExitReason::Filter,
                _ => return Err(bad(format!("reason `{r}` is not unknown, inval or filter"))),
            }),
            ["advance", d] => Step::Advance(
                parse_duration(d).ok_or_else(|| bad(format!("`{d}` is not a duration like 1s, 5ms, 10us, 7ns")))?,
            ),
            ["rdmsr", i] => Step::Rdmsr(index(i)?, expectation()?),
            ["wrmsr", i, v] => Step::Wrmsr(
                index(i)?,
                parse_u64(v).ok_or_else(|| bad(format!("`{v}` is not a value")))?,
                expectation()?,
            ),
            _ => return Err(bad(format!("cannot read `{code}`"))),
        };
        if matches!(step, Step::Config(..))
            && steps
                .iter()
                .any(|(_, s)| matches!(s, Step::Rdmsr(..) | Step::Wrmsr(..)))
        {
            return Err(ScriptError::Syntax {
                path: path.to_owned(),
                line,
                message: "config must come before the first access".into(),
            });
        }
        steps.push((line, step));
    }
    Ok(steps)
}

/// Runs the script at `script` through the plugin `settings` describe
/// (its limits and `[plugin.config]`; the script's `config` lines add to
/// that config).
pub fn run(settings: PluginSettings, script: &Path) -> Result<ScriptReport, ScriptError> {
    run_cached(settings, script, None)
}

/// As [`run`], compiling through a disk cache in `cache_dir`.
pub fn run_cached(
    mut settings: PluginSettings,
    script: &Path,
    cache_dir: Option<&Path>,
) -> Result<ScriptReport, ScriptError> {
    let bytes = crate::files::read_regular(script, 1 << 20).map_err(|source| ScriptError::Read {
        path: script.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let steps = parse(script, &text)?;
    for (_, step) in &steps {
        if let Step::Config(name, value) = step {
            settings.config.insert(name.clone(), *value);
        }
    }
    let clock = Arc::new(ManualClock::new(0));
    let runtime = Runtime::new(RuntimeOptions {
        clock: clock.clone(),
        ..RuntimeOptions::default()
    })?;
    let cache = match cache_dir {
        Some(dir) => crate::plugin::ModuleCache::with_disk(dir, &runtime),
        None => crate::plugin::ModuleCache::new(),
    };
    let bytes = crate::plugin::read_plugin_file(&settings.path)?;
    let plugin = Arc::new(Plugin::build(
        &runtime,
        settings,
        &bytes,
        crate::plugin::content_hash(&bytes),
        &StateStore::default(),
        None,
        Some(&cache),
    )?);
    let mut instances: HashMap<u32, PluginInstance> = HashMap::new();
    let (mut vcpu, mut reason) = (0, ExitReason::Unknown);
    let mut report = ScriptReport::default();
    for (line, step) in steps {
        let (what, expect, result) = match step {
            Step::Config(..) => continue,
            Step::Vcpu(v) => {
                vcpu = v;
                continue;
            }
            Step::Reason(r) => {
                reason = r;
                continue;
            }
            Step::Advance(ns) => {
                clock.advance(ns);
                continue;
            }
            Step::Rdmsr(index, expect) => {
                let instance = instance(&mut instances, &plugin, vcpu)?;
                (
                    format!("rdmsr {index:#x}"),
                    expect,
                    instance.rdmsr(index, reason.bits()),
                )
            }
            Step::Wrmsr(index, value, expect) => {
                let instance = instance(&mut instances, &plugin, vcpu)?;
                (
                    format!("wrmsr {index:#x} {value:#x}"),
                    expect,
                    instance.wrmsr(index, value, reason.bits()),
                )
            }
        };
        let got = match &result {
            Ok(Answer::Handled(v)) if what.starts_with("rdmsr") => format!("{v:#x}"),
            Ok(Answer::Handled(_)) => "handled".into(),
            Ok(Answer::Fault) => "fault".into(),
            Ok(Answer::Pass) => "pass".into(),
            Err(e) => format!("error ({e})"),
        };
        let ok = match (expect, &result) {
            (Expect::Any, _) => true,
            (Expect::Value(v), Ok(Answer::Handled(got))) => v == *got,
            (Expect::Handled, Ok(Answer::Handled(_))) => true,
            (Expect::Fault, Ok(Answer::Fault)) => true,
            (Expect::Pass, Ok(Answer::Pass)) => true,
            (Expect::Error, Err(_)) => true,
            _ => false,
        };
        if result.is_err() {
            // As on a VM: a failed instance is replaced by a fresh one.
            instances.remove(&vcpu);
        }
        if ok {
            report.passed += 1;
        } else {
            let expected = match expect {
                Expect::Value(v) => format!("{v:#x}"),
                other => format!("{other:?}").to_lowercase(),
            };
            report.failures.push(format!(
                "{}:{line}: {what} on vCPU {vcpu}: expected {expected}, got {got}",
                script.display()
            ));
        }
    }
    Ok(report)
}

fn instance<'a>(
    instances: &'a mut HashMap<u32, PluginInstance>,
    plugin: &Arc<Plugin>,
    vcpu: u32,
) -> Result<&'a mut PluginInstance, LoadError> {
    Ok(match instances.entry(vcpu) {
        std::collections::hash_map::Entry::Occupied(slot) => slot.into_mut(),
        std::collections::hash_map::Entry::Vacant(slot) => slot.insert(plugin.instantiate(vcpu)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_drive_the_clock_and_compare_answers() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("p.wat");
        std::fs::write(
            &plugin,
            r#"(module (import "msr" "reply" (func $r (param i64))) (import "msr" "now_ns" (func $now (result i64)))
                (import "msr" "vcpu" (func $vcpu (result i32)))
                (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
                (func (export "rdmsr") (param $i i32) (result i32)
                  (if (i32.eq (local.get $i) (i32.const 1)) (then (call $r (call $now)) (return (i32.const 0))))
                  (if (i32.eq (local.get $i) (i32.const 2)) (then (call $r (i64.extend_i32_u (call $vcpu))) (return (i32.const 0))))
                  (if (i32.eq (local.get $i) (i32.const 3)) (then unreachable))
                  (i32.const 2))
                (func (export "wrmsr") (param i32 i64) (result i32) (i32.const 1)))"#,
        )
        .unwrap();
        let script = dir.path().join("p.case");
        std::fs::write(
            &script,
            "rdmsr 1 -> 0\nadvance 1500ms\nrdmsr 0x1 -> 1500000000\nvcpu 3\nrdmsr 2 -> 3\nrdmsr 3 -> error\nrdmsr 4 -> pass\nwrmsr 4 7 -> fault\nrdmsr 2 -> 4  # wrong on purpose\n",
        )
        .unwrap();
        let r = run(PluginSettings::new("p", &plugin), &script).unwrap();
        assert_eq!(r.passed, 6);
        assert_eq!(r.failures.len(), 1);
        assert!(
            r.failures[0].ends_with("p.case:9: rdmsr 0x2 on vCPU 3: expected 0x4, got 0x3"),
            "{:?}",
            r.failures
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("bad.case");
        for (text, needle) in [
            ("rdmsr 0x10\n", "bad.case:1: an access needs `-> EXPECTED`"),
            ("\nadvance 3 weeks\n", "bad.case:2: cannot read"),
            ("advance 3w\n", "not a duration"),
            ("rdmsr 0x10 -> maybe\n", "`maybe` is not a value"),
            (
                "rdmsr 0x10 -> 1\nconfig a 1\n",
                "bad.case:2: config must come before the first access",
            ),
            ("reason weird\n", "reason `weird`"),
        ] {
            std::fs::write(&script, text).unwrap();
            let e = parse(&script, text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }
}
