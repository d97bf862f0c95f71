//! The text cleanup transformers' `CLIPTokenizer` applies before BPE when ftfy is installed (as
//! it is wherever diffusers, A1111 or open_clip run): ftfy's `fix_text` with its default fixes,
//! then whitespace runs become one space (the tokenizer's normalizer does that and lowercasing).
//!
//! The fixes, in ftfy's order: HTML entities decoded unless the text contains `<` (ftfy's
//! `unescape_html="auto"`: then it looks like HTML and is left alone); terminal escape sequences
//! and control characters removed; Latin ligatures split; full-width ASCII and the ideographic
//! space made half-width; curly quotes straightened. Not done: ftfy's mojibake repair
//! (`fix_encoding`, a heuristic over how text was mis-decoded) and C1 control characters read as
//! Windows-1252 — text with those tokenizes as written.

/// The named HTML entities people's prompts carry (unknown ones stay as written, as in ftfy).
const ENTITIES: &[(&str, &str)] = &[
    ("amp", "&"),
    ("lt", "<"),
    ("gt", ">"),
    ("quot", "\""),
    ("apos", "'"),
    ("nbsp", "\u{a0}"),
    ("copy", "©"),
    ("reg", "®"),
    ("trade", "™"),
    ("hellip", "…"),
    ("mdash", "—"),
    ("ndash", "–"),
    ("lsquo", "‘"),
    ("rsquo", "’"),
    ("ldquo", "“"),
    ("rdquo", "”"),
    ("laquo", "«"),
    ("raquo", "»"),
    ("deg", "°"),
    ("times", "×"),
    ("divide", "÷"),
    ("middot", "·"),
    ("bull", "•"),
    ("euro", "€"),
    ("pound", "£"),
    ("yen", "¥"),
    ("cent", "¢"),
    ("sect", "§"),
    ("para", "¶"),
    ("eacute", "é"),
    ("egrave", "è"),
    ("aacute", "á"),
    ("agrave", "à"),
    ("ouml", "ö"),
    ("uuml", "ü"),
    ("auml", "ä"),
    ("szlig", "ß"),
    ("ntilde", "ñ"),
    ("ccedil", "ç"),
];

/// ftfy's `fix_text` (the fixes listed in the module documentation).
pub fn fix_text(text: &str) -> String {
    let text = if text.contains('<') {
        text.to_string()
    } else {
        unescape_html(text)
    };
    let text = remove_terminal_escapes(&text);
    text.chars().filter_map(fix_char).collect()
}

/// `&name;`, `&#NNN;` and `&#xHH;` decoded (up to 24 characters between `&` and `;`).
fn unescape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        match entity(tail) {
            Some((decoded, len)) => {
                out.push_str(&decoded);
                rest = &tail[len..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The entity at the start of `s` (which starts with `&`): its text and its length in bytes.
fn entity(s: &str) -> Option<(String, usize)> {
    let end = s.find(';')?;
    let body = &s[1..end];
    if body.is_empty() || body.len() > 25 {
        return None;
    }
    let decoded = if let Some(num) = body.strip_prefix('#') {
        let code = match num.strip_prefix(['x', 'X']) {
            Some(hex) => u32::from_str_radix(hex, 16).ok()?,
            None => num.parse::<u32>().ok()?,
        };
        char::from_u32(code)?.to_string()
    } else {
        if !body.chars().all(|c| c.is_ascii_alphanumeric()) {
            return None;
        }
        ENTITIES.iter().find(|(n, _)| *n == body)?.1.to_string()
    };
    Some((decoded, end + 1))
}

/// ANSI escape sequences (`ESC [ … letter`) removed.
fn remove_terminal_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            while let Some(&n) = chars.peek() {
                chars.next();
                if n.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One character after ftfy's per-character fixes (None: removed).
fn fix_char(c: char) -> Option<String> {
    let code = c as u32;
    let removed = matches!(code, 0x00..=0x08 | 0x0b | 0x0e..=0x1f | 0x7f | 0x206a..=0x206f | 0xfeff | 0xfff9..=0xfffc);
    if removed {
        return None;
    }
    Some(match c {
        'ﬀ' => "ff".into(),
        'ﬁ' => "fi".into(),
        'ﬂ' => "fl".into(),
        'ﬃ' => "ffi".into(),
        'ﬄ' => "ffl".into(),
        'ﬅ' | 'ﬆ' => "st".into(),
        'Ĳ' => "IJ".into(),
        'ĳ' => "ij".into(),
        '\u{3000}' => " ".into(),
        '\u{ff01}'..='\u{ff5e}' => char::from_u32(code - 0xff01 + 0x21)?.to_string(),
        '\u{2bc}' | '\u{2018}'..='\u{201b}' => "'".into(),
        '\u{201c}'..='\u{201f}' => "\"".into(),
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::fix_text;

    #[test]
    fn entities_decode_unless_the_text_looks_like_html() {
        assert_eq!(fix_text("&amp; html &lt;entities&gt;"), "& html <entities>");
        assert_eq!(
            fix_text("&#39;quoted&#x27; &unknown; & alone"),
            "'quoted' &unknown; & alone"
        );
        assert_eq!(fix_text("<b>&amp;</b>"), "<b>&amp;</b>");
    }

    #[test]
    fn the_character_fixes_of_ftfy() {
        assert_eq!(fix_text("“curly” ‘quotes’"), "\"curly\" 'quotes'");
        assert_eq!(fix_text("ﬁne ＡＢＣ！\u{3000}x"), "fine ABC! x");
        assert_eq!(fix_text("a\u{1b}[31mred\u{1b}[0m\u{0}b\u{feff}"), "aredb");
        assert_eq!(fix_text("naïve café 東京"), "naïve café 東京");
    }
}
