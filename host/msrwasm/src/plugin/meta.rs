//! Plugin metadata: the optional `msrwasm.meta` custom section (UTF-8 TOML
//! or a JSON object of strings: name, version, description, author, ...),
//! so that a team can tell what a `.wasm` it was handed is.

use std::collections::BTreeMap;

/// The custom section's name.
pub const SECTION: &str = "msrwasm.meta";

/// Metadata fields, as written (numbers and booleans as text).
pub type Meta = BTreeMap<String, String>;

/// Reads the metadata of a module given as wasm binary or WAT text.
pub fn read(bytes: &[u8]) -> Result<Option<Meta>, String> {
    let binary = wat::parse_bytes(bytes).map_err(|e| e.to_string())?;
    let mut found = None;
    for payload in wasmparser::Parser::new(0).parse_all(&binary) {
        let payload = payload.map_err(|e| e.to_string())?;
        if let wasmparser::Payload::CustomSection(section) = payload
            && section.name() == SECTION
        {
            if found.is_some() {
                return Err(format!("more than one `{SECTION}` section"));
            }
            found = Some(parse(section.data())?);
        }
    }
    Ok(found)
}

/// Returns the wasm binary `binary` with its metadata replaced by `meta`
/// (an empty `meta` removes the section). Every other section is kept byte
/// for byte; the new section goes at the end, where custom sections may be.
pub fn write(binary: &[u8], meta: &Meta) -> Result<Vec<u8>, String> {
    if !binary.starts_with(b"\0asm") {
        return Err("not a wasm binary (WAT files carry metadata as (@custom \"msrwasm.meta\" \"...\"))".into());
    }
    let mut out = binary[..8].to_vec();
    for payload in wasmparser::Parser::new(0).parse_all(binary) {
        let payload = payload.map_err(|e| e.to_string())?;
        if let wasmparser::Payload::CustomSection(section) = &payload
            && section.name() == SECTION
        {
            continue;
        }
        if let Some((id, range)) = payload.as_section() {
            out.push(id);
            leb128(&mut out, range.len() as u64);
            out.extend_from_slice(&binary[range]);
        }
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
    fn bad_metadata_is_an_error() {
        let e = read(br#"(module (@custom "msrwasm.meta" "name = "))"#).unwrap_err();
        assert!(e.contains("not valid TOML"), "{e}");
        let e = read(br#"(module (@custom "msrwasm.meta" "[1, 2]"))"#).unwrap_err();
        assert!(e.contains("not valid TOML") || e.contains("table"), "{e}");
    }
}
