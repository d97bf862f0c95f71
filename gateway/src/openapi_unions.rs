//! The OpenAPI document as client generators read it. utoipa writes a tagged enum's variants as
//! inline `allOf: [{$ref: Payload}, {kind: enum}]` inside the `oneOf`; generators such as
//! openapi-python-client accept only references or plain objects in a union. Each such variant is
//! made a component of its own (`<Enum><Tag>`, e.g. `JobSpecCaption`), referenced from the union,
//! and the union gets a `discriminator` on its tag property.

use serde_json::{json, Map, Value};

/// Rewrites every component union's inline `allOf` variants into referenced components.
pub fn hoist(doc: &mut Value) {
    let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    let mut added = Map::new();
    for (name, schema) in schemas.iter_mut() {
        let Some(variants) = schema.get_mut("oneOf").and_then(Value::as_array_mut) else {
            continue;
        };
        let mut mapping = Map::new();
        let mut tag_property = None;
        for variant in variants.iter_mut() {
            if variant.get("allOf").is_none() {
                continue;
            }
            let Some((property, tag)) = tag_of(variant) else {
                continue;
            };
            let component = format!("{name}{}", camel(&tag));
            let reference = format!("#/components/schemas/{component}");
            added.insert(component, variant.take());
            *variant = json!({ "$ref": reference });
            mapping.insert(tag, Value::String(reference));
            tag_property = Some(property);
        }
        if let Some(property) = tag_property {
            if mapping.len() == variants.len() {
                schema["discriminator"] = json!({ "propertyName": property, "mapping": mapping });
            }
        }
    }
    schemas.extend(added);
}

/// The tag property and value of a variant: the one property of its `allOf` parts whose schema
/// is a single-value string enum.
fn tag_of(variant: &Value) -> Option<(String, String)> {
    variant["allOf"].as_array()?.iter().find_map(|part| {
        part["properties"].as_object()?.iter().find_map(|(k, p)| {
            let values = p["enum"].as_array()?;
            match values.as_slice() {
                [Value::String(tag)] => Some((k.clone(), tag.clone())),
                _ => None,
            }
        })
    })
}

fn camel(tag: &str) -> String {
    tag.split(['_', '-'])
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_variants_become_components() {
        let mut doc = json!({"components": {"schemas": {
            "Out": {"oneOf": [
                {"allOf": [{"$ref": "#/components/schemas/A"}, {"type": "object", "properties": {"kind": {"type": "string", "enum": ["dataset_version"]}}}]},
                {"allOf": [{"$ref": "#/components/schemas/B"}, {"type": "object", "properties": {"kind": {"type": "string", "enum": ["images"]}}}]}
            ]},
            "A": {"type": "object"}, "B": {"type": "object"}
        }}});
        hoist(&mut doc);
        let s = &doc["components"]["schemas"];
        assert_eq!(
            s["Out"]["oneOf"][0]["$ref"],
            "#/components/schemas/OutDatasetVersion"
        );
        assert_eq!(s["OutImages"]["allOf"][0]["$ref"], "#/components/schemas/B");
        assert_eq!(s["Out"]["discriminator"]["propertyName"], "kind");
        assert_eq!(
            s["Out"]["discriminator"]["mapping"]["images"],
            "#/components/schemas/OutImages"
        );
    }
}
