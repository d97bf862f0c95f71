//! Extra-network tags: `<lora:name:weight>` (also `<lyco:...>`, `<hypernet:...>`), taken out of
//! the prompt before parsing, as A1111 does.

use std::sync::LazyLock;

use regex::Regex;

/// One `<kind:name[:weight]>` tag.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtraNetwork {
    /// `lora`, `lyco`, `hypernet`, ...
    pub kind: String,
    pub name: String,
    /// The tag's first number (1.0 when absent).
    pub weight: f64,
    /// Every `:`-separated argument after the name, as written.
    pub args: Vec<String>,
}

static TAG: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"<(\w+):([^>]+)>").expect("static regex"));

/// The prompt without its extra-network tags, and the tags in order. A tag whose weight is not a
/// number is an error naming it.
pub fn extract_extra_networks(prompt: &str) -> Result<(String, Vec<ExtraNetwork>), String> {
    let mut tags = Vec::new();
    for caps in TAG.captures_iter(prompt) {
        let (Some(kind), Some(body)) = (caps.get(1), caps.get(2)) else {
            continue;
        };
        let mut parts = body.as_str().split(':');
        let name = parts.next().unwrap_or_default().trim().to_string();
        let args: Vec<String> = parts.map(|p| p.trim().to_string()).collect();
        let weight = match args.first() {
            None => 1.0,
            Some(w) => w.parse::<f64>().map_err(|_| {
                format!(
                    "<{}:{}>: the weight {w:?} is not a number (write <{}:{name}:0.8>)",
                    kind.as_str(),
                    body.as_str(),
                    kind.as_str()
                )
            })?,
        };
        if name.is_empty() {
            return Err(format!(
                "<{}:{}>: the tag names no network",
                kind.as_str(),
                body.as_str()
            ));
        }
        tags.push(ExtraNetwork {
            kind: kind.as_str().to_string(),
            name,
            weight,
            args,
        });
    }
    let cleaned = TAG.replace_all(prompt, "").into_owned();
    Ok((cleaned, tags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_tags_come_out() {
        let (p, tags) =
            extract_extra_networks("photo of <lora:myStyle:0.8> a castle <lora:b>").unwrap();
        assert_eq!(p, "photo of  a castle ");
        assert_eq!(tags.len(), 2);
        assert_eq!(
            (tags[0].kind.as_str(), tags[0].name.as_str(), tags[0].weight),
            ("lora", "myStyle", 0.8)
        );
        assert_eq!(tags[1].weight, 1.0);
        assert!(extract_extra_networks("<lora:x:heavy>")
            .unwrap_err()
            .contains("not a number"));
    }
}
