//! Emphasis: `(text)` ×1.1, `[text]` ÷1.1, `(text:w)` ×w, `\(` escapes, `BREAK` chunk separators.

use std::sync::LazyLock;

use regex::Regex;

/// The weight A1111 gives a BREAK marker (multiplied by any enclosing emphasis).
pub const BREAK_WEIGHT: f64 = -1.0;

/// A run of prompt text with one weight; a BREAK marker is `text == "BREAK"` with a negative weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub text: String,
    pub weight: f64,
    /// Whether this chunk is a BREAK marker (not text that happens to read "BREAK").
    pub is_break: bool,
}

static TOKEN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:")
        .expect("static regex")
});

static BREAK: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\s*\bBREAK\b\s*").expect("static regex"));

const ROUND: f64 = 1.1;
const SQUARE: f64 = 1.0 / 1.1;

/// Parse emphasis as A1111's `parse_prompt_attention`: unbalanced openers apply to the rest of the
/// prompt, unmatched closers are text, and adjacent runs of equal weight merge.
pub fn parse_attention(text: &str) -> Vec<Chunk> {
    let mut res: Vec<Chunk> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<Chunk>, from: usize, by: f64| {
        for c in res.iter_mut().skip(from) {
            c.weight *= by;
        }
    };
    let push_text = |res: &mut Vec<Chunk>, s: &str| {
        for (i, part) in BREAK.split(s).enumerate() {
            if i > 0 {
                res.push(Chunk {
                    text: "BREAK".into(),
                    weight: BREAK_WEIGHT,
                    is_break: true,
                });
            }
            res.push(Chunk {
                text: part.into(),
                weight: 1.0,
                is_break: false,
            });
        }
    };
    for m in TOKEN.captures_iter(text) {
        let Some(whole) = m.get(0) else { continue };
        let tok = whole.as_str();
        // A weight that is not a number ("1.2.3") is text, where A1111 itself raises.
        let weight = m.get(1).and_then(|w| w.as_str().parse::<f64>().ok());
        if let Some(rest) = tok.strip_prefix('\\') {
            res.push(Chunk {
                text: rest.into(),
                weight: 1.0,
                is_break: false,
            });
        } else if tok == "(" {
            round.push(res.len());
        } else if tok == "[" {
            square.push(res.len());
        } else if m.get(1).is_some() && !round.is_empty() {
            match weight {
                Some(w) => {
                    if let Some(pos) = round.pop() {
                        multiply(&mut res, pos, w);
                    }
                }
                None => {
                    // Keep ":1.2.3" as text, then close the bracket as a plain ")".
                    push_text(
                        &mut res,
                        tok.trim_end_matches(|c: char| c == ')' || c.is_whitespace()),
                    );
                    if let Some(pos) = round.pop() {
                        multiply(&mut res, pos, ROUND);
                    }
                }
            }
        } else if tok == ")" && !round.is_empty() {
            if let Some(pos) = round.pop() {
                multiply(&mut res, pos, ROUND);
            }
        } else if tok == "]" && !square.is_empty() {
            if let Some(pos) = square.pop() {
                multiply(&mut res, pos, SQUARE);
            }
        } else {
            push_text(&mut res, tok);
        }
    }
    for pos in round {
        multiply(&mut res, pos, ROUND);
    }
    for pos in square {
        multiply(&mut res, pos, SQUARE);
    }
    if res.is_empty() {
        res.push(Chunk {
            text: String::new(),
            weight: 1.0,
            is_break: false,
        });
    }
    let mut i = 0;
    while i + 1 < res.len() {
        // A1111 merges by weight alone (text of weight -1 next to a BREAK merges with it).
        if res[i].weight == res[i + 1].weight {
            let next = res.remove(i + 1);
            res[i].text.push_str(&next.text);
            res[i].is_break &= next.is_break;
        } else {
            i += 1;
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(s: &str) -> Vec<(String, f64)> {
        parse_attention(s)
            .into_iter()
            .map(|c| (c.text, c.weight))
            .collect()
    }

    #[test]
    fn emphasis_basics() {
        assert_eq!(
            pairs("a (b) c"),
            vec![("a ".into(), 1.0), ("b".into(), 1.1), (" c".into(), 1.0)]
        );
        assert_eq!(pairs("(b:1.5)"), vec![("b".into(), 1.5)]);
        assert_eq!(pairs("(b:1.2.3)"), vec![("b:1.2.3".into(), 1.1)]);
        let c = parse_attention("a BREAK b");
        assert!(c[1].is_break && !c[0].is_break);
    }
}
