//! Limits checked on a module's bytes before anything is compiled, so that
//! a compile bomb (hundreds of thousands of functions, giant function
//! bodies) is refused in milliseconds instead of costing minutes of CPU and
//! gigabytes of memory, and a module that could never instantiate under its
//! memory cap is refused with the key to change.

use wasmparser::{Parser, Payload, TypeRef};

/// Functions defined by a plugin, over all its core modules.
pub const MAX_FUNCTIONS: u64 = 100_000;
/// Bytes of one function body.
pub const MAX_FUNCTION_BYTES: u64 = 1 << 20;
/// Bytes of code over all function bodies.
pub const MAX_CODE_BYTES: u64 = 48 << 20;
/// Core modules nested in a component.
pub const MAX_MODULES: u64 = 64;
/// Elements of one table (also enforced at instantiation).
pub const MAX_TABLE_ELEMENTS: usize = 65_536;

/// Checks `binary` (a core module or a component) against the compile
/// limits and its declared memories against `memory_max_kib`.
pub fn check(binary: &[u8], memory_max_kib: u64) -> Result<(), String> {
    let (mut functions, mut code, mut modules) = (0u64, 0u64, 0u64);
    for payload in Parser::new(0).parse_all(binary) {
        // A malformed module is for the compiler to describe.
        let Ok(payload) = payload else { return Ok(()) };
        match payload {
            Payload::Version { .. } => modules += 1,
            Payload::FunctionSection(s) => functions += u64::from(s.count()),
            Payload::CodeSectionEntry(body) => {
                let len = body.range().len() as u64;
                code += len;
                if len > MAX_FUNCTION_BYTES {
                    return Err(format!(
                        "a function body of {len} bytes is over the {MAX_FUNCTION_BYTES}-byte limit for plugins"
                    ));
                }
            }
            Payload::MemorySection(s) => {
                for memory in s.into_iter().flatten() {
                    memory_fits(memory.initial, memory.page_size_log2, memory_max_kib)?;
                }
            }
            Payload::ImportSection(s) => {
                for import in s.into_imports().flatten() {
                    if let TypeRef::Memory(memory) = import.ty
                        && modules <= 1
                    {
                        memory_fits(memory.initial, memory.page_size_log2, memory_max_kib)?;
                    }
                }
            }
            Payload::TableSection(s) => {
                for table in s.into_iter().flatten() {
                    if table.ty.initial > MAX_TABLE_ELEMENTS as u64 {
                        return Err(format!(
                            "a table of {} initial elements is over the {MAX_TABLE_ELEMENTS}-element limit for plugins",
                            table.ty.initial
                        ));
                    }
                }
            }
            _ => {}
        }
        if functions > MAX_FUNCTIONS {
            return Err(format!(
                "defines more than {MAX_FUNCTIONS} functions: refused before compiling (compile-time limit for plugins)"
            ));
        }
        if code > MAX_CODE_BYTES {
            return Err(format!(
                "has more than {} MiB of code: refused before compiling (compile-time limit for plugins)",
                MAX_CODE_BYTES >> 20
            ));
        }
        // Each Version payload is a core module or a component.
        if modules > MAX_MODULES {
            return Err(format!("nests more than {MAX_MODULES} modules and components"));
        }
    }
    Ok(())
}

fn memory_fits(initial: u64, page_size_log2: Option<u32>, memory_max_kib: u64) -> Result<(), String> {
    let page = 1u64 << page_size_log2.unwrap_or(16);
    let needed_kib = initial.saturating_mul(page).div_ceil(1024);
    if needed_kib > memory_max_kib {
        return Err(format!(
            "its linear memory starts at {needed_kib} KiB, more than memory_max_kib = {memory_max_kib} KiB: set memory_max_kib = {} (or more) for this plugin in the manifest (or `check --memory-max-kib`), or build it with a smaller initial memory (e.g. a smaller stack)",
            needed_kib.next_multiple_of(64).max(64)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_functions_are_refused_before_compiling() {
        let funcs = "(func)".repeat(MAX_FUNCTIONS as usize + 1);
        let wasm = wat::parse_str(format!("(module {funcs})")).unwrap();
        let started = std::time::Instant::now();
        let e = check(&wasm, 1024).unwrap_err();
        assert!(e.contains("more than 100000 functions"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn initial_memory_over_the_cap_names_the_key_and_the_size() {
        let wasm = wat::parse_str("(module (memory 17))").unwrap();
        let e = check(&wasm, 1024).unwrap_err();
        assert!(
            e.contains("starts at 1088 KiB") && e.contains("memory_max_kib = 1088"),
            "{e}"
        );
        assert!(check(&wasm, 2048).is_ok());
    }
}
