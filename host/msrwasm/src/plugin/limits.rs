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
        // Bound, not benchmark: compiling it took 135 s and 4.9 GB.
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
    }

    /// A module of `bodies` functions of type `() -> ()`, each `nops` nops
    /// long, built byte by byte (text for 48 MiB of code would be huge).
    fn module_of_nops(bodies: u32, nops: u32) -> Vec<u8> {
        fn leb(mut v: u32, out: &mut Vec<u8>) {
            loop {
                let byte = (v & 0x7f) as u8;
                v >>= 7;
                out.push(if v == 0 { byte } else { byte | 0x80 });
                if v == 0 {
                    break;
                }
            }
        }
        fn section(id: u8, content: &[u8], out: &mut Vec<u8>) {
            out.push(id);
            leb(content.len() as u32, out);
            out.extend_from_slice(content);
        }
        let mut wasm = b"\0asm\x01\0\0\0".to_vec();
        section(1, &[1, 0x60, 0, 0], &mut wasm);
        let mut functions = Vec::new();
        leb(bodies, &mut functions);
        functions.extend(std::iter::repeat_n(0u8, bodies as usize));
        section(3, &functions, &mut wasm);
        let mut body = vec![0u8]; // no locals
        body.extend(std::iter::repeat_n(0x01u8, nops as usize));
        body.push(0x0b);
        let mut code = Vec::new();
        leb(bodies, &mut code);
        for _ in 0..bodies {
            leb(body.len() as u32, &mut code);
            code.extend_from_slice(&body);
        }
        section(10, &code, &mut wasm);
        wasm
    }

    #[test]
    fn a_giant_function_body_is_refused_before_compiling() {
        let wasm = module_of_nops(1, MAX_FUNCTION_BYTES as u32);
        let e = check(&wasm, 1024).unwrap_err();
        assert!(e.contains("over the 1048576-byte limit"), "{e}");
        assert!(check(&module_of_nops(1, MAX_FUNCTION_BYTES as u32 - 16), 1024).is_ok());
    }

    #[test]
    fn too_much_code_is_refused_before_compiling() {
        // 49 bodies just under the per-function limit: 49 MiB of code.
        let wasm = module_of_nops(49, MAX_FUNCTION_BYTES as u32 - 16);
        let e = check(&wasm, 1024).unwrap_err();
        assert!(e.contains("more than 48 MiB of code"), "{e}");
        assert!(check(&module_of_nops(47, MAX_FUNCTION_BYTES as u32 - 16), 1024).is_ok());
    }

    #[test]
    fn too_many_nested_modules_are_refused() {
        let component = |n: usize| wat::parse_str(format!("(component {})", "(core module)".repeat(n))).unwrap();
        // The component itself counts as one.
        let e = check(&component(MAX_MODULES as usize), 1024).unwrap_err();
        assert!(e.contains("nests more than 64 modules"), "{e}");
        assert!(check(&component(MAX_MODULES as usize - 1), 1024).is_ok());
    }

    #[test]
    fn a_giant_table_is_refused() {
        let wasm = wat::parse_str(format!("(module (table {} funcref))", MAX_TABLE_ELEMENTS + 1)).unwrap();
        let e = check(&wasm, 1024).unwrap_err();
        assert!(e.contains("65537 initial elements"), "{e}");
        let wasm = wat::parse_str(format!("(module (table {} funcref))", MAX_TABLE_ELEMENTS)).unwrap();
        assert!(check(&wasm, 1024).is_ok());
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
