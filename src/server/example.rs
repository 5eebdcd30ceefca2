//! JSON examples of request types, for the registry: what a caller who knows only the endpoint's
//! name needs to send (`micromesh describe` shows them).
//!
//! The shape comes from tracing the type's `Deserialize` implementation (serde-reflection), so
//! handlers need no extra derive. Types whose shape cannot be traced (anything that deserializes
//! "any" value, internally tagged or untagged enums, flattened fields) get no example.

use serde::de::DeserializeOwned;
use serde_reflection::{
    ContainerFormat, Format, Named, Registry, Tracer, TracerConfig, VariantFormat,
};

/// The longest example kept, in bytes: the registry's limit on a metadata value.
const MAX_LEN: usize = 1024;
/// How deep a recursive type is unfolded.
const MAX_DEPTH: usize = 8;

/// A JSON example of `T`, such as `{"name":"string"}`, fields in declaration order; `None` when
/// `T` cannot be traced or its example is longer than the registry allows.
pub(crate) fn request_example<T: DeserializeOwned>() -> Option<String> {
    let mut tracer = Tracer::new(TracerConfig::default());
    let (format, _) = tracer.trace_simple_type::<T>().ok()?;
    // Enums nested in `T` are known by the variants met so far (the first one at least), which
    // is all an example needs.
    let registry = tracer.registry_unchecked();
    let mut out = String::new();
    Example {
        registry: &registry,
        out: &mut out,
    }
    .format(&format, 0);
    (out.len() <= MAX_LEN).then_some(out)
}

/// Writes JSON examples of traced formats, as serde's JSON form of them: structs as objects,
/// enums externally tagged with their first variant, placeholders for primitives.
struct Example<'a> {
    registry: &'a Registry,
    out: &'a mut String,
}

impl Example<'_> {
    fn format(&mut self, format: &Format, depth: usize) {
        if depth > MAX_DEPTH {
            return self.out.push_str("null");
        }
        match format {
            Format::TypeName(name) => match self.registry.get(name) {
                Some(container) => self.container(container, depth + 1),
                None => self.out.push_str("null"),
            },
            Format::Unit | Format::Variable(_) => self.out.push_str("null"),
            Format::Bool => self.out.push_str("false"),
            Format::I8
            | Format::I16
            | Format::I32
            | Format::I64
            | Format::I128
            | Format::U8
            | Format::U16
            | Format::U32
            | Format::U64
            | Format::U128 => self.out.push('0'),
            Format::F32 | Format::F64 => self.out.push_str("0.0"),
            Format::Char => self.string("a"),
            Format::Str => self.string("string"),
            Format::Bytes => self.out.push_str("[0]"),
            Format::Option(inner) => self.format(inner, depth + 1),
            Format::Seq(inner) => {
                self.out.push('[');
                self.format(inner, depth + 1);
                self.out.push(']');
            }
            Format::Map { key, value } => {
                self.out.push('{');
                // JSON keys are strings: a key of another type is written as one.
                let mut key_text = String::new();
                Example {
                    registry: self.registry,
                    out: &mut key_text,
                }
                .format(key, depth + 1);
                if key_text.starts_with('"') {
                    self.out.push_str(&key_text);
                } else {
                    self.string(&key_text);
                }
                self.out.push(':');
                self.format(value, depth + 1);
                self.out.push('}');
            }
            Format::Tuple(items) => self.tuple(items, depth),
            Format::TupleArray { content, size } => {
                self.out.push('[');
                for i in 0..*size {
                    if i > 0 {
                        self.out.push(',');
                    }
                    self.format(content, depth + 1);
                }
                self.out.push(']');
            }
        }
    }

    fn string(&mut self, text: &str) {
        self.out
            .push_str(&serde_json::to_string(text).expect("a string always serializes"));
    }

    fn tuple(&mut self, items: &[Format], depth: usize) {
        self.out.push('[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.format(item, depth + 1);
        }
        self.out.push(']');
    }

    fn object(&mut self, fields: &[Named<Format>], depth: usize) {
        self.out.push('{');
        for (i, field) in fields.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.string(&field.name);
            self.out.push(':');
            self.format(&field.value, depth + 1);
        }
        self.out.push('}');
    }

    fn container(&mut self, container: &ContainerFormat, depth: usize) {
        match container {
            ContainerFormat::UnitStruct => self.out.push_str("null"),
            ContainerFormat::NewTypeStruct(inner) => self.format(inner, depth),
            ContainerFormat::TupleStruct(items) => self.tuple(items, depth),
            ContainerFormat::Struct(fields) => self.object(fields, depth),
            ContainerFormat::Enum(variants) => {
                let Some(variant) = variants.values().next() else {
                    return self.out.push_str("null");
                };
                if matches!(variant.value, VariantFormat::Unit) {
                    return self.string(&variant.name);
                }
                self.out.push('{');
                self.string(&variant.name);
                self.out.push(':');
                match &variant.value {
                    VariantFormat::NewType(inner) => self.format(inner, depth),
                    VariantFormat::Tuple(items) => self.tuple(items, depth),
                    VariantFormat::Struct(fields) => self.object(fields, depth),
                    VariantFormat::Unit | VariantFormat::Variable(_) => self.out.push_str("null"),
                }
                self.out.push('}');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::request_example;

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct HelloRequest {
        name: String,
        times: Option<u32>,
        tags: Vec<String>,
        mode: Mode,
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    #[serde(rename_all = "snake_case")]
    enum Mode {
        Loud,
        Quiet,
    }

    #[test]
    fn structs_enums_and_primitives_become_json_examples() {
        assert_eq!(
            request_example::<HelloRequest>().as_deref(),
            Some(r#"{"name":"string","times":0,"tags":["string"],"mode":"loud"}"#)
        );
        assert_eq!(request_example::<String>().as_deref(), Some(r#""string""#));
        assert_eq!(request_example::<u32>().as_deref(), Some("0"));
        assert_eq!(request_example::<()>().as_deref(), Some("null"));
        assert_eq!(
            request_example::<std::collections::HashMap<u32, (bool, f64)>>().as_deref(),
            Some(r#"{"0":[false,0.0]}"#)
        );
        for example in [
            request_example::<HelloRequest>(),
            request_example::<std::collections::HashMap<u32, (bool, f64)>>(),
        ] {
            let text = example.unwrap();
            serde_json::from_str::<serde_json::Value>(&text).expect("valid JSON");
        }
    }

    #[test]
    fn untraceable_types_have_no_example() {
        assert_eq!(request_example::<serde_json::Value>(), None);
    }
}
