//! Property test over generated plugins (a bounded fuzz pass): whatever the
//! bytes, loading never panics and refuses with a message naming the file;
//! whatever a loadable plugin does, a call ends in an answer or a plugin
//! error, never a panic or a hang.
//!
//! CI runs `MSRWASM_FUZZ_CASES` cases per generator (default 300). A longer
//! run: `MSRWASM_FUZZ_CASES=100000 cargo test --release -p msrwasm-tests --test fuzz_plugins`.
//! A failing case prints its seed; `MSRWASM_FUZZ_SEED=n` starts there.

use std::sync::Arc;

use arbitrary::Unstructured;
use msrwasm::CallError;
use msrwasm::ExitReason;
use msrwasm::PluginSettings;
use msrwasm::tools::Answer;
use msrwasm::tools::Plugin;
use msrwasm::tools::StateStore;

fn cases() -> u64 {
    std::env::var("MSRWASM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

fn first_seed() -> u64 {
    std::env::var("MSRWASM_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// xorshift64*: reproducible bytes from a seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Loads `bytes` as a plugin; if it loads, calls it on two vCPUs with a mix
/// of indices and checks every outcome is an answer or a plugin error.
fn exercise(seed: u64, bytes: &[u8], rng: &mut Rng) -> bool {
    let state = StateStore::default();
    let settings = PluginSettings::new("fuzz", format!("case-{seed}.wasm"));
    let plugin = match Plugin::from_bytes(&msrwasm::tools::Runtime::shared(), settings, bytes, &state) {
        Ok(plugin) => Arc::new(plugin),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("case-{seed}.wasm")),
                "seed {seed}: refusal without the file name: {msg}"
            );
            if std::env::var("MSRWASM_FUZZ_VERBOSE").is_ok() {
                eprintln!("seed {seed}: {msg}");
            }
            return false;
        }
    };
    for vcpu in 0..2 {
        let Ok(mut instance) = plugin.instantiate(vcpu) else {
            continue;
        };
        for _ in 0..16 {
            let index = [0, 0x10, 0x4d53_4800, 0xc000_0080, u32::MAX][rng.below(5) as usize];
            let result = match rng.below(2) {
                0 => instance.rdmsr(index, ExitReason::Unknown.bits()),
                _ => instance.wrmsr(index, rng.next(), ExitReason::Unknown.bits()),
            };
            match result {
                Ok(Answer::Handled(_) | Answer::Fault | Answer::Pass) => {}
                Err(
                    CallError::Trap(_)
                    | CallError::Timeout
                    | CallError::BadStatus(_)
                    | CallError::NoReply
                    | CallError::Instantiate(_),
                ) => {
                    // the host throws a failed instance away; so does this test
                    match plugin.instantiate(vcpu) {
                        Ok(fresh) => instance = fresh,
                        Err(_) => break,
                    }
                }
            }
        }
    }
    true
}

const IMPORTS_WAT: &str = r#"(module
  (import "msr" "reply" (func (param i64)))
  (import "msr" "vcpu" (func (result i32)))
  (import "msr" "reason" (func (result i32)))
  (import "msr" "now_ns" (func (result i64)))
  (import "msr" "state_get" (func (param i32) (result i64)))
  (import "msr" "state_set" (func (param i32 i64)))
  (import "msr" "state_add" (func (param i32 i64) (result i64)))
  (import "msr" "config" (func (param i32 i32 i64) (result i64)))
  (import "msr" "log" (func (param i32 i32 i32))))"#;

const EXPORTS_WAT: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "msrwasm_abi_version") (result i32) unreachable)
  (func (export "rdmsr") (param i32) (result i32) unreachable)
  (func (export "wrmsr") (param i32 i64) (result i32) unreachable)
  (func (export "init") (result i32) unreachable)
  (func (export "claim") (param i32) (result i64) unreachable))"#;

#[test]
fn wasm_smith_modules_and_raw_bytes_never_panic_the_loader() {
    let imports = wat::parse_str(IMPORTS_WAT).unwrap();
    let exports = wat::parse_str(EXPORTS_WAT).unwrap();
    let (mut modules, mut loaded) = (0, 0);
    for seed in first_seed()..first_seed() + cases() {
        let mut rng = Rng::new(seed);
        let bytes = match seed % 3 {
            // Arbitrary bytes, with or without the wasm header.
            0 => {
                let len = rng.below(200) as usize;
                let mut b = rng.bytes(len);
                if rng.below(2) == 0 {
                    b.splice(0..0, *b"\0asm\x01\0\0\0");
                }
                b
            }
            // wasm-smith modules offered the ABI's imports and shaped like a plugin.
            _ => {
                let data = rng.bytes(4096);
                let mut u = Unstructured::new(&data);
                let config = wasm_smith::Config {
                    available_imports: Some(imports.clone()),
                    exports: (seed % 3 == 1).then(|| exports.clone()),
                    max_memories: 1,
                    max_memory32_bytes: 1 << 20,
                    max_tables: 2,
                    max_table_elements: 1000,
                    max_instructions: 200,
                    ..wasm_smith::Config::default()
                };
                match wasm_smith::Module::new(config, &mut u) {
                    Ok(m) => {
                        modules += 1;
                        let mut b = m.to_bytes();
                        // Now and then, a truncated or flipped copy.
                        if rng.below(4) == 0 && !b.is_empty() {
                            let at = rng.below(b.len() as u64) as usize;
                            match rng.below(2) {
                                0 => b.truncate(at),
                                _ => b[at] ^= 1 << rng.below(8),
                            }
                        }
                        b
                    }
                    Err(_) => continue,
                }
            }
        };
        loaded += u32::from(exercise(seed, &bytes, &mut rng));
    }
    eprintln!("{modules} wasm-smith modules; {loaded} cases loaded as plugins");
    // Two seeds in three ask wasm-smith for a module; most must come out,
    // or this test exercises nothing.
    assert!(
        modules >= cases() / 3,
        "only {modules} wasm-smith modules in {} cases",
        cases()
    );
}

/// A random but valid statement for an rdmsr/wrmsr body (stack-neutral).
fn statement(rng: &mut Rng) -> String {
    let small = |rng: &mut Rng| rng.below(8) as i64;
    let any = |rng: &mut Rng| rng.next() as i32;
    match rng.below(14) {
        0 => format!("(call $reply (i64.const {}))", rng.next() as i64),
        1 => format!(
            "(drop (call $add (i32.const {}) (i64.const {})))",
            small(rng),
            small(rng)
        ),
        2 => format!("(drop (i32.load (i32.const {})))", rng.below(70_000)),
        3 => format!("(drop (memory.grow (i32.const {})))", rng.below(40)),
        4 => format!(
            "(call $log (i32.const {}) (i32.const {}) (i32.const {}))",
            rng.below(5),
            any(rng),
            rng.below(64)
        ),
        5 => format!(
            "(drop (call $config (i32.const {}) (i32.const {}) (i64.const 1)))",
            rng.below(70_000),
            rng.below(16)
        ),
        6 => format!(
            "(if (i32.eq (local.get 0) (i32.const {})) (then (return (i32.const {}))))",
            rng.below(3),
            rng.below(4)
        ),
        7 => format!(
            "(drop (i32.div_s (i32.const {}) (i32.const {})))",
            any(rng),
            rng.below(3)
        ),
        8 => format!(
            "(local.set $n (i32.const 0)) (loop $l (br_if $l (i32.lt_u (local.tee $n (i32.add (local.get $n) (i32.const 1))) (i32.const {}))))",
            [10, 1000, 0x7fff_ffff][rng.below(3) as usize]
        ),
        9 if rng.below(4) == 0 => "unreachable".into(),
        10 if rng.below(3) == 0 => "(drop (call $rd (local.get 0)))".into(),
        11 => "(drop (call $vcpu)) (drop (call $reason)) (drop (call $now))".into(),
        12 => format!(
            "(call $set (i32.const {}) (i64.const {}))",
            small(rng),
            rng.next() as i64
        ),
        _ => format!("(drop (call $get (i32.const {})))", small(rng)),
    }
}

fn body(rng: &mut Rng) -> String {
    let statements: Vec<String> = (0..rng.below(6)).map(|_| statement(rng)).collect();
    let status = [0, 0, 1, 2, 2, 3, -1][rng.below(7) as usize];
    format!("{} (i32.const {status})", statements.join(" "))
}

#[test]
fn generated_plugins_always_answer_or_fail_cleanly() {
    let mut answered = 0;
    for seed in first_seed()..first_seed() + cases() {
        let mut rng = Rng::new(seed ^ 0xabcd);
        let wat = format!(
            r#"(module
  (import "msr" "reply" (func $reply (param i64)))
  (import "msr" "vcpu" (func $vcpu (result i32)))
  (import "msr" "reason" (func $reason (result i32)))
  (import "msr" "now_ns" (func $now (result i64)))
  (import "msr" "state_get" (func $get (param i32) (result i64)))
  (import "msr" "state_set" (func $set (param i32 i64)))
  (import "msr" "state_add" (func $add (param i32 i64) (result i64)))
  (import "msr" "config" (func $config (param i32 i32 i64) (result i64)))
  (import "msr" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 1)
  (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
  (func $rd (export "rdmsr") (param i32) (result i32) (local $n i32) {})
  (func (export "wrmsr") (param i32 i64) (result i32) (local $n i32) {}))"#,
            body(&mut rng),
            body(&mut rng)
        );
        let bytes =
            wat::parse_str(&wat).unwrap_or_else(|e| panic!("seed {seed}: generator wrote invalid WAT: {e}\n{wat}"));
        answered += u32::from(exercise(seed, &bytes, &mut rng));
    }
    assert_eq!(
        answered as u64,
        cases(),
        "every generated plugin is valid ABI v1 and loads"
    );
}
