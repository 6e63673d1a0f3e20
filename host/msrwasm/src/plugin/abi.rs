//! The plugin ABI, version 1 (`guest-sdk/ABI.md`): names, signatures and
//! status codes, and the load-time check of a module's shape against them.

use wasmtime::{ExternType, FuncType, Module};

/// The only ABI version this host speaks.
pub const ABI_VERSION: i32 = 1;
/// Import module of every host function.
pub const IMPORT_MODULE: &str = "msr";
/// At most this many ranges come from a plugin's `claim` export.
pub const MAX_CLAIM_RANGES: i32 = 64;

/// The access completes.
pub const STATUS_HANDLED: i32 = 0;
/// The guest gets #GP.
pub const STATUS_FAULT: i32 = 1;
/// The next plugin decides.
pub const STATUS_PASS: i32 = 2;

/// Required/optional exports and their signatures, written as the ABI
/// document writes them.
pub const EXPORTS: &[(&str, &str)] = &[
    ("msrwasm_abi_version", "() -> i32"),
    ("rdmsr", "(i32) -> i32"),
    ("wrmsr", "(i32, i64) -> i32"),
    ("init", "() -> i32"),
    ("claim", "(i32) -> i64"),
];

/// Every import the host offers, with its signature.
pub const IMPORTS: &[(&str, &str)] = &[
    ("reply", "(i64) -> ()"),
    ("vcpu", "() -> i32"),
    ("reason", "() -> i32"),
    ("now_ns", "() -> i64"),
    ("state_get", "(i32) -> i64"),
    ("state_set", "(i32, i64) -> ()"),
    ("state_add", "(i32, i64) -> i64"),
    ("config", "(i32, i32, i64) -> i64"),
    ("log", "(i32, i32, i32) -> ()"),
];

/// The host energy capability (module `msr_energy_v1`), for plugins the
/// manifest grants it; `who` is -1 the host, -2 the VM, n >= 0 vCPU n.
pub const ENERGY_IMPORTS: &[(&str, &str)] = &[
    ("domains", "() -> i32"),
    ("energy_uj", "(i32, i32) -> i64"),
    ("cpu_ns", "(i32) -> i64"),
    ("sampled_ns", "() -> i64"),
];

/// What a module offers, once its shape passed [`check_shape`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shape {
    /// Exports `rdmsr`.
    pub rdmsr: bool,
    /// Exports `wrmsr`.
    pub wrmsr: bool,
    /// Exports `init`.
    pub init: bool,
    /// Exports `claim`.
    pub claim: bool,
    /// Exports `_initialize` (a reactor: run once per instance first).
    pub initialize: bool,
    /// Imports `wasi_snapshot_preview1`.
    pub wasi: bool,
}

/// Renders a function type the way the ABI document does: `(i32, i64) -> i32`.
pub fn signature(ty: &FuncType) -> String {
    let list =
        |it: &mut dyn Iterator<Item = wasmtime::ValType>| it.map(|v| v.to_string()).collect::<Vec<_>>().join(", ");
    let params = list(&mut ty.params());
    let results: Vec<String> = ty.results().map(|v| v.to_string()).collect();
    let results = match results.len() {
        0 => "()".to_string(),
        1 => results[0].clone(),
        _ => format!("({})", results.join(", ")),
    };
    format!("({params}) -> {results}")
}

/// Checks exports and imports against ABI v1. The error text names the
/// offending export or import; the caller adds the file name.
pub fn check_shape(module: &Module) -> Result<Shape, String> {
    let mut shape = Shape::default();
    let mut has_version = false;
    let mut has_memory = false;
    for export in module.exports() {
        let name = export.name();
        if name == "_initialize" {
            shape.initialize = matches!(&export.ty(), ExternType::Func(ty) if signature(ty) == "() -> ()");
            if !shape.initialize {
                return Err("export `_initialize` must be a function () -> ()".into());
            }
            continue;
        }
        if name == "memory" {
            has_memory = matches!(export.ty(), ExternType::Memory(_));
            if !has_memory {
                return Err("export `memory` must be a memory".into());
            }
            continue;
        }
        let Some((_, want)) = EXPORTS.iter().find(|(n, _)| *n == name) else {
            continue;
        };
        let ExternType::Func(ty) = export.ty() else {
            return Err(format!("export `{name}` must be a function {want}"));
        };
        let got = signature(&ty);
        if got != *want {
            return Err(format!("export `{name}` has type {got}, ABI v1 requires {want}"));
        }
        match name {
            "msrwasm_abi_version" => has_version = true,
            "rdmsr" => shape.rdmsr = true,
            "wrmsr" => shape.wrmsr = true,
            "init" => shape.init = true,
            "claim" => shape.claim = true,
            _ => {}
        }
    }
    if !has_version {
        return Err("missing export `msrwasm_abi_version` () -> i32: not an msrwasm plugin".into());
    }
    if !shape.rdmsr && !shape.wrmsr {
        return Err("exports neither `rdmsr` (i32) -> i32 nor `wrmsr` (i32, i64) -> i32".into());
    }

    let mut needs_memory = None;
    let mut unsupported = Vec::new();
    for import in module.imports() {
        let (module_name, name) = (import.module(), import.name());
        if module_name == super::wasi::P1_MODULE {
            shape.wasi = true;
            if !WASI_P1.contains(&name) || !matches!(import.ty(), ExternType::Func(_)) {
                unsupported.push(format!("`{module_name}.{name}`"));
            }
            continue;
        }
        let table = match module_name {
            IMPORT_MODULE => IMPORTS,
            super::imports::ENERGY_MODULE => ENERGY_IMPORTS,
            _ => {
                unsupported.push(format!("`{module_name}.{name}`"));
                continue;
            }
        };
        let Some((_, want)) = table.iter().find(|(n, _)| *n == name) else {
            unsupported.push(format!("`{module_name}.{name}`"));
            continue;
        };
        let ExternType::Func(ty) = import.ty() else {
            return Err(format!("import `{module_name}.{name}` must be a function {want}"));
        };
        let got = signature(&ty);
        if got != *want {
            return Err(format!(
                "import `{module_name}.{name}` has type {got}, ABI v1 defines {want}"
            ));
        }
        if name == "log" || name == "config" {
            needs_memory = Some(name);
        }
    }
    if !unsupported.is_empty() {
        return Err(format!(
            "imports {}, which the host does not provide (a core plugin may import `msr.*` ({}), `msr_energy_v1.*` when granted, and `wasi_snapshot_preview1.*`; nothing else: no file system, no network)",
            unsupported.join(", "),
            import_names()
        ));
    }
    if let (Some(name), false) = (needs_memory, has_memory) {
        return Err(format!("imports `msr.{name}` but does not export its `memory`"));
    }
    Ok(shape)
}

/// The `wasi_snapshot_preview1` functions the host links (deny-by-default:
/// see `plugin::wasi`).
pub const WASI_P1: &[&str] = &[
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "fd_advise",
    "fd_allocate",
    "fd_close",
    "fd_datasync",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_fdstat_set_rights",
    "fd_filestat_get",
    "fd_filestat_set_size",
    "fd_filestat_set_times",
    "fd_pread",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_pwrite",
    "fd_read",
    "fd_readdir",
    "fd_renumber",
    "fd_seek",
    "fd_sync",
    "fd_tell",
    "fd_write",
    "path_create_directory",
    "path_filestat_get",
    "path_filestat_set_times",
    "path_link",
    "path_open",
    "path_readlink",
    "path_remove_directory",
    "path_rename",
    "path_symlink",
    "path_unlink_file",
    "poll_oneoff",
    "proc_exit",
    "proc_raise",
    "sched_yield",
    "random_get",
    "sock_accept",
    "sock_recv",
    "sock_send",
    "sock_shutdown",
];

fn import_names() -> String {
    IMPORTS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// Unpacks one `claim` result: `(first << 32) | last`, inclusive.
pub fn unpack_claim(packed: i64) -> Result<(u32, u32), String> {
    let first = (packed as u64 >> 32) as u32;
    let last = packed as u64 as u32;
    if first > last {
        return Err(format!("claim {packed:#x} is reversed ({first:#x} > {last:#x})"));
    }
    Ok((first, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape_of(wat: &str) -> Result<Shape, String> {
        check_shape(&Module::new(crate::plugin::Runtime::shared().engine(), wat).unwrap())
    }

    #[test]
    fn accepts_a_minimal_plugin() {
        let s = shape_of(
            r#"(module (func (export "msrwasm_abi_version") (result i32) i32.const 1)
              (func (export "rdmsr") (param i32) (result i32) i32.const 2))"#,
        )
        .unwrap();
        assert!(s.rdmsr && !s.wrmsr && !s.init && !s.claim);
    }

    #[test]
    fn names_the_wrong_signature() {
        let e = shape_of(
            r#"(module (func (export "msrwasm_abi_version") (result i32) i32.const 1)
              (func (export "rdmsr") (param i64) (result i32) i32.const 2))"#,
        )
        .unwrap_err();
        assert_eq!(e, "export `rdmsr` has type (i64) -> i32, ABI v1 requires (i32) -> i32");
    }

    #[test]
    fn names_every_foreign_import_and_missing_memory() {
        let e = shape_of(
            r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
              (import "env" "abort" (func)) (import "wasi_snapshot_preview1" "sock_open" (func))
              (import "msr" "sleep" (func))
              (func (export "msrwasm_abi_version") (result i32) i32.const 1)
              (func (export "rdmsr") (param i32) (result i32) i32.const 2))"#,
        )
        .unwrap_err();
        assert!(
            e.contains(
                "imports `env.abort`, `wasi_snapshot_preview1.sock_open`, `msr.sleep`, which the host does not provide"
            ),
            "{e}"
        );
        let e = shape_of(
            r#"(module (import "msr" "log" (func (param i32 i32 i32)))
              (func (export "msrwasm_abi_version") (result i32) i32.const 1)
              (func (export "rdmsr") (param i32) (result i32) i32.const 2))"#,
        )
        .unwrap_err();
        assert!(e.contains("does not export its `memory`"), "{e}");
    }

    #[test]
    fn claims_unpack_inclusive_ranges() {
        assert_eq!(unpack_claim((0x606 << 32) | 0x611), Ok((0x606, 0x611)));
        assert_eq!(
            unpack_claim(((0xc000_0080u64 << 32) | 0xc000_0080) as i64),
            Ok((0xc000_0080, 0xc000_0080))
        );
        assert!(unpack_claim((5 << 32) | 4).is_err());
    }
}
