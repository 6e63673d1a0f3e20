//! Plugin metadata: the optional `msrwasm.meta` custom section (UTF-8 TOML
//! or a JSON object of strings: name, version, description, author, ...),
//! so that a team can tell what a `.wasm` it was handed is.

use std::collections::BTreeMap;

/// The custom section's name.
pub const SECTION: &str = "msrwasm.meta";

/// Metadata fields, as written (numbers and booleans as text).
pub type Meta = BTreeMap<String, String>;

/// Metadata keys `template.<MSR>` carry CPU templates (`docs/manifest.md`).
pub const TEMPLATE_PREFIX: &str = "template.";

/// The CPU templates in `meta` (`template.0x10a = "0b..."`): sorted by MSR;
/// refused with the key for a bad MSR or bitmap, or more than
/// [`crate::policy::MAX_TEMPLATES`].
pub fn templates(meta: Option<&Meta>) -> Result<Vec<crate::policy::MsrTemplate>, String> {
    let mut out = Vec::new();
    for (key, bitmap) in meta.into_iter().flatten() {
        let Some(msr) = key.strip_prefix(TEMPLATE_PREFIX) else {
            continue;
        };
        let index = crate::util::parse_number(msr)
            .and_then(|i| u32::try_from(i).ok())
            .filter(|i| !(0x800..=0x8ff).contains(i))
            .ok_or_else(|| format!("metadata `{key}`: not an MSR outside the x2APIC range"))?;
        let template =
            crate::policy::MsrTemplate::parse(index, bitmap).map_err(|e| format!("metadata `{key}`: {e}"))?;
        if out.iter().any(|t: &crate::policy::MsrTemplate| t.index == index) {
            return Err(format!("metadata `{key}`: MSR {index:#x} has two templates"));
        }
        out.push(template);
    }
    if out.len() > crate::policy::MAX_TEMPLATES {
        return Err(format!(
            "{} templates in the metadata, at most {}",
            out.len(),
            crate::policy::MAX_TEMPLATES
        ));
    }
    out.sort_by_key(|t| t.index);
    Ok(out)
}

/// Reads the metadata of a module or component given as wasm binary or
/// WAT text. A component's own (top-level) section wins over one inside its
/// core modules (where some toolchains put it).
pub fn read(bytes: &[u8]) -> Result<Option<Meta>, String> {
    let binary = wat::parse_bytes(bytes).map_err(|e| e.to_string())?;
    let mut top = None;
    let mut nested = None;
    let mut depth = 0u32;
    for payload in wasmparser::Parser::new(0).parse_all(&binary) {
        let payload = payload.map_err(|e| e.to_string())?;
        match payload {
            wasmparser::Payload::Version { .. } => depth += 1,
            wasmparser::Payload::End(_) => depth = depth.saturating_sub(1),
            wasmparser::Payload::CustomSection(section) if section.name() == SECTION => {
                let slot = if depth <= 1 { &mut top } else { &mut nested };
                if slot.is_some() {
                    return Err(format!("more than one `{SECTION}` section"));
                }
                *slot = Some(parse(section.data())?);
            }
            _ => {}
        }
    }
    Ok(top.or(nested))
}

#[cfg(any(test, feature = "tools"))]
/// Returns the wasm binary (core module or component) `binary` with its
/// top-level metadata replaced by `meta` (an empty `meta` removes it).
/// Every other section is kept byte for byte; the new section goes at the
/// end, where custom sections may be.
pub fn write(binary: &[u8], meta: &Meta) -> Result<Vec<u8>, String> {
    if !binary.starts_with(b"\0asm") || binary.len() < 8 {
        return Err("not a wasm binary (WAT files carry metadata as (@custom \"msrwasm.meta\" \"...\"))".into());
    }
    wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all())
        .validate_all(binary)
        .map_err(|e| format!("not a valid module or component: {e}"))?;
    let mut out = binary[..8].to_vec();
    let mut at = 8;
    while at < binary.len() {
        let id = binary[at];
        let (size, len) = read_leb128(&binary[at + 1..]).ok_or("malformed section header")?;
        let start = at + 1 + len;
        let end = start
            .checked_add(size as usize)
            .filter(|&e| e <= binary.len())
            .ok_or("section runs past the end")?;
        let keep = id != 0 || custom_name(&binary[start..end]) != Some(SECTION);
        if keep {
            out.extend_from_slice(&binary[at..end]);
        }
        at = end;
    }
    if !meta.is_empty() {
        let toml = toml::to_string(meta).map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        leb128(&mut body, SECTION.len() as u64);
        body.extend_from_slice(SECTION.as_bytes());
        body.extend_from_slice(toml.as_bytes());
        out.push(0);
        leb128(&mut out, body.len() as u64);
        out.extend_from_slice(&body);
    }
    Ok(out)
}

#[cfg(any(test, feature = "tools"))]
/// The name of a custom section from its contents.
fn custom_name(contents: &[u8]) -> Option<&str> {
    let (len, n) = read_leb128(contents)?;
    std::str::from_utf8(contents.get(n..n.checked_add(len as usize)?)?).ok()
}

#[cfg(any(test, feature = "tools"))]
/// An unsigned LEB128 value and the bytes it took.
fn read_leb128(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().take(10).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(any(test, feature = "tools"))]
fn leb128(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn parse(data: &[u8]) -> Result<Meta, String> {
    let text = std::str::from_utf8(data).map_err(|_| format!("`{SECTION}` is not UTF-8"))?;
    let value: serde_json::Value = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| format!("`{SECTION}` is not valid JSON: {e}"))?
    } else {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| format!("`{SECTION}` is not valid TOML: {}", e.message()))?;
        serde_json::to_value(table).map_err(|e| e.to_string())?
    };
    let serde_json::Value::Object(fields) = value else {
        return Err(format!("`{SECTION}` must be a table of strings"));
    };
    fields
        .into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k, s)),
            serde_json::Value::Number(_) | serde_json::Value::Bool(_) => Ok((k, v.to_string())),
            _ => Err(format!("`{SECTION}`: field `{k}` must be a string")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_toml_and_json_sections() {
        let toml =
            r#"(module (@custom "msrwasm.meta" "name = \"rapl\"\nversion = \"1.2.0\"\nauthor = \"platform team\""))"#;
        let meta = read(toml.as_bytes()).unwrap().unwrap();
        assert_eq!(meta["name"], "rapl");
        assert_eq!(meta["version"], "1.2.0");
        let json = r#"(module (@custom "msrwasm.meta" "{\"name\": \"x\", \"build\": 7}"))"#;
        assert_eq!(read(json.as_bytes()).unwrap().unwrap()["build"], "7");
        assert_eq!(read(b"(module)").unwrap(), None);
    }

    #[test]
    fn write_replaces_the_section_and_keeps_the_module() {
        let wasm = wat::parse_str(
            r#"(module (@custom "msrwasm.meta" "name = \"old\"") (func (export "f") (result i32) (i32.const 7)))"#,
        )
        .unwrap();
        let meta = Meta::from([("name".into(), "new".into()), ("version".into(), "2.0.0".into())]);
        let out = write(&wasm, &meta).unwrap();
        assert_eq!(read(&out).unwrap(), Some(meta));
        wasmparser::Validator::new().validate_all(&out).unwrap();
        assert_eq!(read(&write(&out, &Meta::new()).unwrap()).unwrap(), None);
        assert!(
            write(b"(module)", &Meta::new())
                .unwrap_err()
                .contains("not a wasm binary")
        );
    }

    #[test]
    fn components_get_a_top_level_section_and_stay_valid() {
        let component = wat::parse_str(
            r#"(component (core module $m (@custom "msrwasm.meta" "name = \"inner\"")) (core instance (instantiate $m)))"#,
        )
        .unwrap();
        assert_eq!(read(&component).unwrap().unwrap()["name"], "inner");
        let meta = Meta::from([("name".into(), "outer".into())]);
        let out = write(&component, &meta).unwrap();
        wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all())
            .validate_all(&out)
            .unwrap();
        assert_eq!(read(&out).unwrap(), Some(meta), "the top-level section wins");
        assert!(out.len() < component.len() + 64, "nothing copied twice");
    }

    #[test]
    fn bad_metadata_is_an_error() {
        let e = read(br#"(module (@custom "msrwasm.meta" "name = "))"#).unwrap_err();
        assert!(e.contains("not valid TOML"), "{e}");
        let e = read(br#"(module (@custom "msrwasm.meta" "[1, 2]"))"#).unwrap_err();
        assert!(e.contains("not valid TOML") || e.contains("table"), "{e}");
    }
}
