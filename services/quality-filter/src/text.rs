//! Caption checks: length, truncation, repetition loops, refusals and boilerplate, language.

use std::collections::HashMap;

/// Phrases of captioners that did not caption: refusals, apologies, and descriptions of the
/// request instead of the image. Matched case-insensitively at the start of a sentence.
const REFUSALS: &[&str] = &[
    "i'm sorry",
    "i am sorry",
    "sorry, i",
    "i cannot",
    "i can't",
    "i can not",
    "i am unable",
    "i'm unable",
    "i apologize",
    "as an ai",
    "unfortunately, i",
    "the image does not contain",
    "the image is not available",
    "i do not see an image",
    "i don't see an image",
    "there is no image",
    "no image was provided",
    "i'm not able to",
    "i am not able to",
];

pub fn words(caption: &str) -> Vec<&str> {
    caption.split_whitespace().collect()
}

/// Why the caption looks cut off: the backend said it stopped at max tokens, or the text does
/// not end a sentence.
pub fn truncated(caption: &str, finish_reason: Option<&str>) -> Option<String> {
    if finish_reason == Some("length") {
        return Some("the captioner stopped at max_tokens".into());
    }
    let t = caption.trim_end();
    let last = t.chars().last()?;
    if matches!(last, '.' | '!' | '?' | '"' | '\'' | ')' | '”' | '’' | '。') {
        None
    } else if t.split_whitespace().count() >= 12 {
        // Short captions ("a red circle on white") are fragments by design; long text that
        // stops mid-sentence was cut.
        Some(format!("ends mid-sentence ({last:?})"))
    } else {
        None
    }
}

/// Repetition loops: the most frequent word 3-gram's share of all 3-grams above `max_fraction`
/// (with at least 3 repeats), or one sentence (of 4+ words) said twice.
pub fn repetition(caption: &str, max_fraction: f32) -> Option<String> {
    let lower = caption.to_lowercase();
    let w: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|s| !s.is_empty())
        .collect();
    if w.len() >= 5 {
        let mut grams: HashMap<(&str, &str, &str), u32> = HashMap::new();
        for t in w.windows(3) {
            *grams.entry((t[0], t[1], t[2])).or_default() += 1;
        }
        let total = (w.len() - 2) as f32;
        if let Some((g, &n)) = grams.iter().max_by_key(|(_, &n)| n) {
            if n >= 3 && n as f32 / total > max_fraction {
                return Some(format!(
                    "\"{} {} {}\" repeats {n} times ({:.0}% of 3-grams)",
                    g.0,
                    g.1,
                    g.2,
                    100.0 * n as f32 / total
                ));
            }
        }
    }
    let mut seen: HashMap<String, u32> = HashMap::new();
    for s in lower.split(['.', '!', '?', '\n']) {
        let norm: Vec<&str> = s.split_whitespace().collect();
        if norm.len() >= 4 {
            let n = seen.entry(norm.join(" ")).or_default();
            *n += 1;
            if *n == 2 {
                return Some(format!("the sentence \"{}\" repeats", norm.join(" ")));
            }
        }
    }
    None
}

/// A refusal or boilerplate in place of a caption.
pub fn refusal(caption: &str) -> Option<String> {
    let lower = caption.to_lowercase().replace('’', "'");
    for sentence in lower.split(['.', '!', '?', '\n']) {
        let s = sentence.trim_start();
        if let Some(p) = REFUSALS.iter().find(|p| s.starts_with(*p)) {
            return Some(format!("starts with \"{p}\""));
        }
    }
    None
}

/// English function words that other Latin-script languages rarely use as words.
const ENGLISH_MARKERS: &[&str] = &[
    "the", "is", "of", "and", "with", "this", "are", "there", "which", "its", "it's", "from", "an",
    "to", "that", "has", "was", "by", "at", "their", "appears",
];

/// The caption's language (ISO 639-3) when reasonably sure. A cascade: captions that are
/// plainly English (at least a fifth of the words, and three different ones, are English
/// function words) are `eng` without further work; the rest go to whatlang's trigram model, on
/// at most the first 400 bytes.
pub fn language(caption: &str) -> Option<&'static str> {
    let mut words = 0usize;
    let mut hits = 0usize;
    let mut distinct = 0u32;
    for w in caption.split_whitespace() {
        words += 1;
        let w = w.trim_matches(|c: char| !c.is_alphanumeric() && c != '\'');
        if let Some(i) = ENGLISH_MARKERS
            .iter()
            .position(|m| w.eq_ignore_ascii_case(m))
        {
            hits += 1;
            distinct |= 1 << i;
        }
    }
    if words >= 6 && hits * 5 >= words && distinct.count_ones() >= 3 {
        return Some("eng");
    }
    let mut end = caption.len().min(400);
    while !caption.is_char_boundary(end) {
        end -= 1;
    }
    let info = whatlang::detect(&caption[..end])?;
    (info.is_reliable() || info.confidence() > 0.5).then(|| info.lang().code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation() {
        assert!(truncated("A red circle.", Some("length")).is_some());
        assert!(truncated("A red circle on a white background.", Some("stop")).is_none());
        assert!(truncated("a red circle on white", None).is_none());
        let cut = "The image shows a red circle and a blue rectangle on a white background and the circle is";
        assert!(truncated(cut, Some("stop"))
            .unwrap()
            .contains("mid-sentence"));
    }

    #[test]
    fn repetition_loops() {
        let looped = "The image shows a cat. The cat is sitting on a mat. The cat is sitting on a mat. The cat is sitting on a mat.";
        assert!(repetition(looped, 0.3).is_some());
        let ngram = "a tree and a tree and a tree and a tree and a tree and a tree";
        assert!(repetition(ngram, 0.3).unwrap().contains("repeats"));
        let fine = "The image shows a red circle in the upper left and a blue rectangle near the center of a white background.";
        assert_eq!(repetition(fine, 0.3), None);
    }

    #[test]
    fn refusals_and_boilerplate() {
        assert!(refusal("I'm sorry, but I can't help with that.").is_some());
        assert!(refusal("I’m sorry, I cannot describe this image.").is_some());
        assert!(refusal("The image does not contain any recognizable objects.").is_some());
        assert!(refusal("A photo. As an AI, I cannot see.").is_some());
        assert_eq!(refusal("A sorry-looking dog sits by the door."), None);
    }

    #[test]
    fn languages() {
        // Other languages are not mistaken for English by the fast path.
        for (text, lang) in [
            ("Une photo d'un chat noir assis sur une table en bois dans une cuisine lumineuse, à côté d'une tasse.", "fra"),
            ("Una foto de un gato negro sentado en una mesa de madera en una cocina luminosa, junto a una taza.", "spa"),
            ("Een foto van een zwarte kat die op een houten tafel zit in een lichte keuken naast een kopje koffie.", "nld"),
        ] {
            assert_eq!(language(text), Some(lang), "{text}");
        }
        assert_eq!(
            language("The image shows a red circle and a blue rectangle on a white background."),
            Some("eng")
        );
        assert_eq!(
            language(
                "Das Bild zeigt einen roten Kreis und ein blaues Rechteck auf weißem Hintergrund."
            ),
            Some("deu")
        );
    }
}
