//! A1111's infotexts, read back: the `parameters` text a PNG carries and the fields A1111 parses
//! out of it (`/sdapi/v1/png-info`). The parse follows A1111's `parse_generation_parameters`: prompt
//! lines, then lines after `Negative prompt:`, then a last line of at least three `Key: value`
//! pairs (values may be JSON-quoted to hold commas); `WxH` values split into `Key-1`/`Key-2`; the
//! fields A1111 fills in when an infotext leaves them out.

use serde_json::{json, Map, Value};

/// Decompressed text chunks larger than this are refused (a zTXt bomb inflates no further).
const MAX_TEXT: usize = 1 << 20;

/// The PNG's text chunks (tEXt, zTXt, iTXt) as (keyword, text), in file order by kind; not a PNG:
/// no chunks.
pub fn png_texts(bytes: &[u8]) -> Result<Vec<(String, String)>, String> {
    if !bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Ok(Vec::new());
    }
    let limits = png::Limits { bytes: 16 << 20 };
    let mut decoder = png::Decoder::new_with_limits(std::io::Cursor::new(bytes), limits);
    decoder.set_ignore_iccp_chunk(true);
    let reader = decoder
        .read_info()
        .map_err(|e| format!("the PNG does not decode: {e}"))?;
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect();
    for c in &info.compressed_latin1_text {
        let mut c = c.clone();
        c.decompress_text_with_limit(MAX_TEXT)
            .and_then(|()| c.get_text())
            .map(|t| out.push((c.keyword.clone(), t)))
            .map_err(|e| format!("text chunk {:?}: {e}", c.keyword))?;
    }
    for c in &info.utf8_text {
        let mut c = c.clone();
        c.decompress_text_with_limit(MAX_TEXT)
            .and_then(|()| c.get_text())
            .map(|t| out.push((c.keyword.clone(), t)))
            .map_err(|e| format!("text chunk {:?}: {e}", c.keyword))?;
    }
    Ok(out)
}

/// The `Key: value` pairs of an infotext's last line, as A1111's pattern finds them.
pub fn pairs(line: &str) -> Vec<(String, String)> {
    let chars: Vec<char> = line.chars().collect();
    let mut out = Vec::new();
    let mut p = 0;
    while p < chars.len() {
        match pair_at(&chars, p) {
            Some((k, v, end)) => {
                out.push((k, v));
                p = end.max(p + 1);
            }
            None => p += 1,
        }
    }
    out
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// One `\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)` match starting at `p`.
fn pair_at(s: &[char], mut p: usize) -> Option<(String, String, usize)> {
    while p < s.len() && s[p].is_whitespace() {
        p += 1;
    }
    let key_start = p;
    if !s.get(p).copied().is_some_and(is_word) {
        return None;
    }
    p += 1;
    while p < s.len() && (is_word(s[p]) || matches!(s[p], ' ' | '-' | '/')) {
        p += 1;
    }
    if p - key_start < 2 || s.get(p) != Some(&':') {
        return None;
    }
    let key: String = s[key_start..p].iter().collect();
    p += 1;
    while p < s.len() && s[p].is_whitespace() {
        p += 1;
    }
    if let Some(end) = quoted_end(s, p) {
        if end == s.len() || s[end] == ',' {
            let v: String = s[p..end].iter().collect();
            return Some((key, v, (end + 1).min(s.len())));
        }
    }
    let end = s[p..]
        .iter()
        .position(|&c| c == ',')
        .map_or(s.len(), |i| p + i);
    let v: String = s[p..end].iter().collect();
    Some((key, v, (end + 1).min(s.len())))
}

/// Where a `"…"` value starting at `p` ends (one past its closing quote).
fn quoted_end(s: &[char], p: usize) -> Option<usize> {
    if s.get(p) != Some(&'"') {
        return None;
    }
    let mut i = p + 1;
    while i < s.len() {
        match s[i] {
            '\\' if i + 1 < s.len() => i += 2,
            '\\' => return None,
            '"' if i > p + 1 => return Some(i + 1),
            '"' => return None,
            _ => i += 1,
        }
    }
    None
}

fn unquote(v: &str) -> String {
    if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
        if let Ok(s) = serde_json::from_str::<String>(v) {
            return s;
        }
    }
    v.to_owned()
}

fn image_size(v: &str) -> Option<(&str, &str)> {
    let (w, h) = v.split_once('x')?;
    let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    (digits(w) && digits(h)).then_some((w, h))
}

/// A1111's fields of an infotext.
pub fn parse(text: &str) -> Map<String, Value> {
    let mut res = Map::new();
    let mut lines: Vec<&str> = text.trim().split('\n').collect();
    let last = lines.pop().unwrap_or_default();
    let last = if pairs(last).len() < 3 {
        lines.push(last);
        ""
    } else {
        last
    };
    let (mut prompt, mut negative) = (String::new(), String::new());
    let mut in_negative = false;
    for line in lines {
        let mut line = line.trim();
        if let Some(rest) = line.strip_prefix("Negative prompt:") {
            in_negative = true;
            line = rest.trim();
        }
        let target = if in_negative {
            &mut negative
        } else {
            &mut prompt
        };
        if !target.is_empty() {
            target.push('\n');
        }
        target.push_str(line);
    }
    res.insert("Prompt".into(), json!(prompt));
    res.insert("Negative prompt".into(), json!(negative));
    for (k, v) in pairs(last) {
        let v = unquote(&v);
        match image_size(&v) {
            Some((w, h)) => {
                res.insert(format!("{k}-1"), json!(w));
                res.insert(format!("{k}-2"), json!(h));
            }
            None => {
                res.insert(k, json!(v));
            }
        }
    }
    fill_defaults(&mut res);
    res
}

/// What A1111 assumes for fields an infotext leaves out.
fn fill_defaults(res: &mut Map<String, Value>) {
    if let Some(h) = res
        .get("Hypernet")
        .and_then(Value::as_str)
        .map(str::to_owned)
    {
        let strength = res
            .get("Hypernet strength")
            .and_then(Value::as_str)
            .unwrap_or("1.0")
            .to_owned();
        if let Some(Value::String(p)) = res.get_mut("Prompt") {
            p.push_str(&format!("<hypernet:{h}:{strength}>"));
        }
    }
    let defaults = [
        ("Clip skip", json!("1")),
        ("Hires resize-1", json!(0)),
        ("Hires resize-2", json!(0)),
        ("Hires sampler", json!("Use same sampler")),
        ("Hires checkpoint", json!("Use same checkpoint")),
        ("Hires prompt", json!("")),
        ("Hires negative prompt", json!("")),
        ("Mask mode", json!("Inpaint masked")),
        ("Masked content", json!("original")),
        ("Inpaint area", json!("Whole picture")),
        ("Masked area padding", json!(32)),
        ("RNG", json!("GPU")),
        ("Schedule type", json!("Automatic")),
        ("Schedule max sigma", json!(0)),
        ("Schedule min sigma", json!(0)),
        ("Schedule rho", json!(0)),
        ("VAE Encoder", json!("Full")),
        ("VAE Decoder", json!("Full")),
        ("FP8 weight", json!("Disable")),
    ];
    for (k, v) in defaults {
        res.entry(k).or_insert(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_infotext_parses_as_a1111_parses_it() {
        let text = "a cat, (sitting:1.2)\non a mat\nNegative prompt: blurry, low quality\n\
                    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x768, \
                    Model hash: 45dee52b, Lora hashes: \"a: 0123, b: 4567\", Clip skip: 2";
        let r = parse(text);
        assert_eq!(r["Prompt"], "a cat, (sitting:1.2)\non a mat");
        assert_eq!(r["Negative prompt"], "blurry, low quality");
        assert_eq!(r["Steps"], "20");
        assert_eq!(r["Sampler"], "Euler a");
        assert_eq!(r["Size-1"], "512");
        assert_eq!(r["Size-2"], "768");
        assert_eq!(r["Lora hashes"], "a: 0123, b: 4567");
        assert_eq!(r["Clip skip"], "2");
        assert_eq!(r["RNG"], "GPU");
        assert_eq!(r["Masked area padding"], 32);
    }

    #[test]
    fn a_last_line_with_under_three_pairs_is_prompt() {
        let r = parse("portrait: a woman, style: oil");
        assert_eq!(r["Prompt"], "portrait: a woman, style: oil");
        assert_eq!(r["Clip skip"], "1");
        assert_eq!(parse("")["Prompt"], "");
    }

    #[test]
    fn pairs_follow_the_pattern() {
        assert_eq!(
            pairs("Steps: 20,Sampler:  DPM++ 2M , x: 1"),
            vec![
                ("Steps".into(), "20".into()),
                ("Sampler".into(), "DPM++ 2M ".into()),
            ]
        );
        // A quote that does not end the value is part of a plain value.
        assert_eq!(
            pairs(r#"Ab: "x" y, Cd: "q\"r""#),
            vec![
                ("Ab".into(), "\"x\" y".into()),
                ("Cd".into(), "\"q\\\"r\"".into())
            ]
        );
    }

    #[test]
    fn text_chunks_are_read_and_bombs_refused() {
        let png = |chunks: &[(&str, &str, bool)]| {
            let mut out = Vec::new();
            let mut enc = png::Encoder::new(&mut out, 1, 1);
            enc.set_color(png::ColorType::Grayscale);
            for (k, t, z) in chunks {
                if *z {
                    enc.add_ztxt_chunk(k.to_string(), t.to_string()).unwrap();
                } else {
                    enc.add_text_chunk(k.to_string(), t.to_string()).unwrap();
                }
            }
            enc.write_header().unwrap().write_image_data(&[0]).unwrap();
            out
        };
        let ok = png(&[
            ("parameters", "a cat\nSteps: 2, Seed: 1, Size: 8x8", false),
            ("note", "hi", true),
        ]);
        let texts = png_texts(&ok).unwrap();
        assert!(texts.contains(&(
            "parameters".into(),
            "a cat\nSteps: 2, Seed: 1, Size: 8x8".into()
        )));
        assert!(texts.contains(&("note".into(), "hi".into())));
        let bomb = png(&[("x", &"a".repeat(4 << 20), true)]);
        assert!(png_texts(&bomb).unwrap_err().contains("\"x\""));
        assert!(png_texts(b"GIF89a").unwrap().is_empty());
    }
}
