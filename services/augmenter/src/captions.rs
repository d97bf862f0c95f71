//! Caption rewriting without a model: seeded paraphrases (synonyms, clause reordering) and hard
//! negatives (a caption edited so it no longer describes the image: another object, colour,
//! count or spatial relation, or two objects' places exchanged).
//!
//! Captions are split into tokens that keep every character (words, spaces, punctuation), so an
//! edit changes only the words it means to and the rest of the caption survives byte for byte.

use atelier_contracts::augment::NegativeKind;
use rand::seq::SliceRandom;
use rand::Rng;

/// Interchangeable words and phrases (same number, same sense in captions).
const SYNONYMS: &[&[&str]] = &[
    &["photo", "picture", "photograph"],
    &["photos", "pictures", "photographs"],
    &["large", "big"],
    &["small", "little"],
    &["couch", "sofa"],
    &["couches", "sofas"],
    &["street", "road"],
    &["streets", "roads"],
    &["car", "automobile"],
    &["woman", "lady"],
    &["women", "ladies"],
    &["child", "kid"],
    &["children", "kids"],
    &["man", "guy"],
    &["bicycle", "bike"],
    &["bicycles", "bikes"],
    &["airplane", "plane", "aircraft"],
    &["motorcycle", "motorbike"],
    &["television", "tv"],
    &["cell phone", "mobile phone", "cellphone"],
    &["ocean", "sea"],
    &["next to", "beside"],
    &["close to", "near"],
    &["on top of", "atop"],
    &["sitting", "seated"],
    &["shows", "depicts"],
    &["beautiful", "lovely"],
    &["bright", "vivid"],
    &["plate", "dish"],
    &["grassy", "grass-covered"],
    &["sleeping", "napping"],
];

/// Words ending in -ing that are not participles.
const NOT_PARTICIPLES: &[&str] = &[
    "something",
    "nothing",
    "anything",
    "everything",
    "building",
    "ceiling",
    "clothing",
    "morning",
    "evening",
    "painting",
    "ring",
    "king",
    "thing",
    "wing",
    "string",
    "spring",
    "swing",
    "bring",
    "sing",
    "sling",
    "ping",
    "ding",
    "icing",
    "railing",
    "awning",
    "during",
    "ceiling",
    "siding",
    "frosting",
    "wedding",
    "pudding",
    "stuffing",
    "topping",
    "dressing",
];

/// Plural determiners: "two dogs running" → "two dogs that are running".
const PLURAL: &[&str] = &[
    "two", "three", "four", "five", "several", "many", "some", "these",
];

/// Objects by kind, singular and plural: a swapped object stays within its kind.
const OBJECTS: &[&[(&str, &str)]] = &[
    &[
        ("dog", "dogs"),
        ("cat", "cats"),
        ("horse", "horses"),
        ("cow", "cows"),
        ("bird", "birds"),
        ("elephant", "elephants"),
        ("bear", "bears"),
        ("zebra", "zebras"),
        ("giraffe", "giraffes"),
    ],
    &[
        ("car", "cars"),
        ("bus", "buses"),
        ("truck", "trucks"),
        ("bicycle", "bicycles"),
        ("motorcycle", "motorcycles"),
        ("train", "trains"),
        ("boat", "boats"),
        ("airplane", "airplanes"),
    ],
    &[
        ("man", "men"),
        ("woman", "women"),
        ("boy", "boys"),
        ("girl", "girls"),
        ("child", "children"),
    ],
    &[
        ("apple", "apples"),
        ("banana", "bananas"),
        ("pizza", "pizzas"),
        ("sandwich", "sandwiches"),
        ("cake", "cakes"),
        ("donut", "donuts"),
    ],
    &[
        ("chair", "chairs"),
        ("table", "tables"),
        ("couch", "couches"),
        ("bed", "beds"),
        ("bench", "benches"),
    ],
    &[
        ("cup", "cups"),
        ("bottle", "bottles"),
        ("laptop", "laptops"),
        ("phone", "phones"),
        ("book", "books"),
        ("clock", "clocks"),
        ("umbrella", "umbrellas"),
        ("ball", "balls"),
    ],
    &[
        ("circle", "circles"),
        ("square", "squares"),
        ("triangle", "triangles"),
        ("rectangle", "rectangles"),
        ("star", "stars"),
    ],
];

const COLOURS: &[&str] = &[
    "red", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "grey",
];

const NUMBERS: &[&str] = &[
    "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
];

/// Spatial relations and their opposites.
const RELATIONS: &[(&str, &str)] = &[
    ("left", "right"),
    ("above", "below"),
    ("in front of", "behind"),
    ("on top of", "underneath"),
    ("inside", "outside"),
    ("over", "under"),
    ("top", "bottom"),
];

/// Prepositions a trailing phrase may start with to be moved to the front.
const FRONTABLE: &[&str] = &[
    "in", "at", "on", "near", "inside", "under", "beside", "behind",
];

/// Words a sentence may start with for its first word to be lower-cased when it moves inward.
const DETERMINERS: &[&str] = &[
    "a", "an", "the", "two", "three", "four", "some", "several", "many", "this", "these",
];

/// A caption as tokens: runs of letters/digits (words) and single other characters.
#[derive(Debug, Clone)]
struct Tokens {
    toks: Vec<String>,
}

impl Tokens {
    fn new(text: &str) -> Self {
        let mut toks = Vec::new();
        let mut word = String::new();
        for c in text.chars() {
            if c.is_alphanumeric() || c == '\'' && !word.is_empty() {
                word.push(c);
            } else {
                if !word.is_empty() {
                    toks.push(std::mem::take(&mut word));
                }
                toks.push(c.to_string());
            }
        }
        if !word.is_empty() {
            toks.push(word);
        }
        Self { toks }
    }

    fn text(&self) -> String {
        self.toks.concat()
    }

    fn is_word(&self, i: usize) -> bool {
        self.toks[i]
            .chars()
            .next()
            .is_some_and(char::is_alphanumeric)
    }

    /// Token indices of `phrase` (space-separated lower-case words) wherever it occurs.
    fn find(&self, phrase: &str) -> Vec<(usize, usize)> {
        let words: Vec<&str> = phrase.split(' ').collect();
        let mut out = Vec::new();
        for start in 0..self.toks.len() {
            let mut i = start;
            let mut ok = true;
            for (n, w) in words.iter().enumerate() {
                if n > 0 {
                    if self.toks.get(i).map(String::as_str) != Some(" ") {
                        ok = false;
                        break;
                    }
                    i += 1;
                }
                if self.toks.get(i).is_none_or(|t| !t.eq_ignore_ascii_case(w)) {
                    ok = false;
                    break;
                }
                i += 1;
            }
            // Whole words only: the tokens around are not words (guaranteed by tokenising).
            if ok {
                out.push((start, i));
            }
        }
        out
    }

    /// Replaces tokens `a..b` with `with`, keeping a capital first letter.
    fn replace(&mut self, (a, b): (usize, usize), with: &str) {
        let cap = self.toks[a].chars().next().is_some_and(char::is_uppercase);
        let new = if cap {
            capitalise(with)
        } else {
            with.to_owned()
        };
        self.toks.splice(a..b, [new]);
    }

    /// The word token before token `i`, skipping one space.
    fn prev_word(&self, i: usize) -> Option<usize> {
        let j = i.checked_sub(2)?;
        (self.toks[i - 1] == " " && self.is_word(j)).then_some(j)
    }

    /// The word token after token `i`, skipping one space.
    fn next_word(&self, i: usize) -> Option<usize> {
        (self.toks.get(i + 1).map(String::as_str) == Some(" ")
            && self.toks.len() > i + 2
            && self.is_word(i + 2))
        .then_some(i + 2)
    }

    /// Makes an article before token `i` agree with the word now there.
    fn fix_article(&mut self, i: usize) {
        let Some(j) = self.prev_word(i) else { return };
        let art = self.toks[j].to_lowercase();
        if art != "a" && art != "an" {
            return;
        }
        let vowel = self.toks[i]
            .chars()
            .next()
            .is_some_and(|c| "aeiouAEIOU".contains(c));
        let want = if vowel { "an" } else { "a" };
        let cap = self.toks[j].starts_with('A');
        self.toks[j] = if cap {
            capitalise(want)
        } else {
            want.to_owned()
        };
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// A paraphrase of `caption` and the edits made (empty when no rule applied).
pub fn paraphrase(caption: &str, rng: &mut impl Rng) -> (String, Vec<String>) {
    let mut edits = Vec::new();
    let mut text = caption.to_owned();
    // Sentences after the first, shuffled (long, detailed captions).
    let sentences = split_sentences(&text);
    if sentences.len() >= 3 {
        let mut rest: Vec<String> = sentences[1..].to_vec();
        let before = rest.clone();
        for _ in 0..4 {
            rest.shuffle(rng);
            if rest != before {
                break;
            }
        }
        if rest != before {
            text = std::iter::once(sentences[0].clone())
                .chain(rest)
                .collect::<Vec<_>>()
                .join(" ");
            edits.push("reorder:sentences".to_owned());
        }
    }
    // Synonyms, each candidate with probability ½ (at least one when any exists).
    let mut toks = Tokens::new(&text);
    let mut candidates: Vec<((usize, usize), &[&str], &str)> = Vec::new();
    for group in SYNONYMS {
        for w in group.iter() {
            for span in toks.find(w) {
                candidates.push((span, group, w));
            }
        }
    }
    // Later spans first, so earlier indices stay valid; overlapping spans are skipped.
    candidates.sort_by_key(|c| std::cmp::Reverse(c.0 .0));
    let forced = (!candidates.is_empty()).then(|| rng.gen_range(0..candidates.len()));
    let mut last_start = usize::MAX;
    for (n, (span, group, from)) in candidates.into_iter().enumerate() {
        let take = rng.gen_bool(0.5) || Some(n) == forced;
        if !take || span.1 > last_start {
            continue;
        }
        let others: Vec<&&str> = group.iter().filter(|g| **g != from).collect();
        let Some(to) = others.choose(rng) else {
            continue;
        };
        toks.replace(span, to);
        toks.fix_article(span.0);
        last_start = span.0;
        edits.push(format!("synonym:{from}→{to}"));
    }
    text = toks.text();
    // A participle as a relative clause: "a dog running" → "a dog that is running".
    if rng.gen_bool(0.5) || edits.is_empty() {
        if let Some((with, verb)) = relative_clause(&text) {
            text = with;
            edits.push(format!("relative:{verb}"));
        }
    }
    // A trailing prepositional phrase of the first sentence moved to the front.
    if rng.gen_bool(0.5) || edits.is_empty() {
        if let Some((moved, phrase)) = front_phrase(&text) {
            text = moved;
            edits.push(format!("front:{phrase}"));
        }
    }
    (text, edits)
}

/// The first participle after a noun phrase of the first sentence, as a relative clause.
fn relative_clause(text: &str) -> Option<(String, String)> {
    let toks = Tokens::new(text);
    let words: Vec<usize> = (0..toks.toks.len()).filter(|&i| toks.is_word(i)).collect();
    let first = toks.toks[*words.first()?].to_lowercase();
    if !DETERMINERS.contains(&first.as_str()) {
        return None;
    }
    for (n, &i) in words.iter().enumerate().skip(2) {
        let w = toks.toks[i].to_lowercase();
        if toks.toks[..i]
            .iter()
            .any(|t| matches!(t.as_str(), "." | "!" | "?" | ","))
        {
            return None;
        }
        if w.len() > 4 && w.ends_with("ing") && !NOT_PARTICIPLES.contains(&w.as_str()) {
            let prev = toks.toks[words[n - 1]].to_lowercase();
            if matches!(
                prev.as_str(),
                "is" | "are" | "was" | "were" | "be" | "been" | "that" | "of" | "for" | "while"
            ) {
                return None;
            }
            let plural = PLURAL.contains(&first.as_str());
            let mut out = toks.clone();
            out.toks[i] = format!(
                "{} {}",
                if plural { "that are" } else { "that is" },
                toks.toks[i]
            );
            return Some((out.text(), w));
        }
    }
    None
}

/// Sentences (ending in . ! or ?), trimmed.
fn split_sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in text.chars() {
        cur.push(c);
        if matches!(c, '.' | '!' | '?') {
            out.push(cur.trim().to_owned());
            cur.clear();
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_owned());
    }
    out
}

/// "A dog sitting on a couch in a living room." → "In a living room, a dog sitting on a couch."
fn front_phrase(text: &str) -> Option<(String, String)> {
    let end = text.find(['.', '!', '?']).unwrap_or(text.len());
    let (first, rest) = text.split_at(end);
    if first.contains(',') || first.contains(';') {
        return None;
    }
    let words: Vec<&str> = first.split(' ').collect();
    if words.len() < 5 || !DETERMINERS.contains(&words[0].to_lowercase().as_str()) {
        return None;
    }
    // The last frontable preposition with at least two words of head before it and a noun
    // phrase of at least two words after it.
    let lower: Vec<String> = words.iter().map(|w| w.to_lowercase()).collect();
    let side = |i: usize| {
        lower[i] == "to"
            && lower.get(i + 1).is_some_and(|w| w == "the")
            && lower
                .get(i + 2)
                .is_some_and(|w| w == "left" || w == "right")
            && lower.get(i + 3).is_some_and(|w| w == "of")
    };
    let at = (2..words.len().saturating_sub(2))
        .rev()
        .find(|&i| FRONTABLE.contains(&lower[i].as_str()) || side(i))?;
    let phrase = words[at..].join(" ");
    let head = words[..at].join(" ");
    let head = if words[0] == "I" {
        head
    } else {
        let mut c = head.chars();
        c.next()
            .map(|f| f.to_lowercase().chain(c).collect())
            .unwrap_or_default()
    };
    Some((format!("{}, {head}{rest}", capitalise(&phrase)), phrase))
}

/// The caption of a mirrored image: left and right exchanged (a horizontal flip), or top and
/// bottom, above and below, upper and lower (a vertical one). `None` when nothing changes.
pub fn mirror(caption: &str, horizontal: bool) -> Option<String> {
    let pairs: &[(&str, &str)] = if horizontal {
        &[("left", "right"), ("leftmost", "rightmost")]
    } else {
        &[
            ("top", "bottom"),
            ("above", "below"),
            ("upper", "lower"),
            ("topmost", "bottommost"),
        ]
    };
    let mut toks = Tokens::new(caption);
    let mut changed = false;
    for t in toks.toks.iter_mut() {
        let lower = t.to_lowercase();
        let to = pairs.iter().find_map(|(a, b)| {
            if lower == *a {
                Some(*b)
            } else if lower == *b {
                Some(*a)
            } else {
                None
            }
        });
        if let Some(to) = to {
            let cap = t.chars().next().is_some_and(char::is_uppercase);
            *t = if cap { capitalise(to) } else { to.to_owned() };
            changed = true;
        }
    }
    changed.then(|| toks.text())
}

/// One hard negative of `kind` for `caption`, if the caption has something to edit.
pub fn negative(caption: &str, kind: NegativeKind, rng: &mut impl Rng) -> Option<String> {
    let mut toks = Tokens::new(caption);
    let done = match kind {
        NegativeKind::SwapObject => swap_object(&mut toks, rng),
        NegativeKind::SwapColour => swap_colour(&mut toks, rng),
        NegativeKind::SwapCount => swap_count(&mut toks, rng),
        NegativeKind::SwapRelation => swap_relation(&mut toks, rng),
        NegativeKind::SwapOrder => swap_order(&mut toks),
        NegativeKind::Neighbour => false,
    };
    let out = toks.text();
    (done && !out.eq_ignore_ascii_case(caption)).then_some(out)
}

/// Occurrences of lexicon objects: (token index, kind, entry, plural).
fn objects(toks: &Tokens) -> Vec<(usize, usize, usize, bool)> {
    let mut out = Vec::new();
    for (i, t) in toks.toks.iter().enumerate() {
        let lower = t.to_lowercase();
        for (k, kind) in OBJECTS.iter().enumerate() {
            for (e, (s, p)) in kind.iter().enumerate() {
                if lower == *s || lower == *p {
                    out.push((i, k, e, lower == *p));
                }
            }
        }
    }
    out.sort_unstable();
    out.dedup_by_key(|o| o.0);
    out
}

fn swap_object(toks: &mut Tokens, rng: &mut impl Rng) -> bool {
    let found = objects(toks);
    let Some(&(i, k, e, plural)) = found.choose(rng) else {
        return false;
    };
    let others: Vec<&(&str, &str)> = OBJECTS[k]
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != e)
        .map(|(_, o)| o)
        .collect();
    let Some((s, p)) = others.choose(rng) else {
        return false;
    };
    toks.replace((i, i + 1), if plural { p } else { s });
    toks.fix_article(i);
    true
}

fn swap_colour(toks: &mut Tokens, rng: &mut impl Rng) -> bool {
    let found: Vec<usize> = (0..toks.toks.len())
        .filter(|&i| COLOURS.contains(&toks.toks[i].to_lowercase().as_str()))
        .collect();
    let Some(&i) = found.choose(rng) else {
        return false;
    };
    let was = toks.toks[i].to_lowercase();
    let grey = |c: &str| c == "gray" || c == "grey";
    let others: Vec<&&str> = COLOURS
        .iter()
        .filter(|c| **c != was && !(grey(c) && grey(&was)) && **c != "grey")
        .collect();
    let Some(to) = others.choose(rng) else {
        return false;
    };
    toks.replace((i, i + 1), to);
    toks.fix_article(i);
    true
}

fn swap_count(toks: &mut Tokens, rng: &mut impl Rng) -> bool {
    let mut options: Vec<usize> = Vec::new();
    for i in 0..toks.toks.len() {
        let lower = toks.toks[i].to_lowercase();
        let number = NUMBERS.contains(&lower.as_str())
            || lower.parse::<u32>().is_ok_and(|n| (2..=99).contains(&n));
        let article =
            matches!(lower.as_str(), "a" | "an" | "one") && singular_after(toks, i).is_some();
        if number || article {
            options.push(i);
        }
    }
    let Some(&i) = options.choose(rng) else {
        return false;
    };
    let lower = toks.toks[i].to_lowercase();
    if let Some(n) = NUMBERS.iter().position(|w| *w == lower) {
        let others: Vec<&&str> = NUMBERS
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != n)
            .map(|(_, w)| w)
            .collect();
        let Some(to) = others.choose(rng) else {
            return false;
        };
        toks.replace((i, i + 1), to);
        return true;
    }
    if let Ok(n) = lower.parse::<u32>() {
        let to = if n > 2 && rng.gen_bool(0.5) {
            n - 1
        } else {
            n + 1
        };
        toks.toks[i] = to.to_string();
        return true;
    }
    // "a dog" / "a red circle" → "three dogs" / "three red circles".
    let Some(noun) = singular_after(toks, i) else {
        return false;
    };
    let Some(to) = NUMBERS.choose(rng) else {
        return false;
    };
    let lower = toks.toks[noun].to_lowercase();
    let plural = OBJECTS
        .iter()
        .flat_map(|k| k.iter())
        .find(|(s, _)| *s == lower)
        .map(|(_, p)| *p);
    let Some(plural) = plural else { return false };
    toks.replace((noun, noun + 1), plural);
    toks.replace((i, i + 1), to);
    true
}

/// The singular lexicon noun right after token `i`, allowing one colour between.
fn singular_after(toks: &Tokens, i: usize) -> Option<usize> {
    let mut j = toks.next_word(i)?;
    if COLOURS.contains(&toks.toks[j].to_lowercase().as_str()) {
        j = toks.next_word(j)?;
    }
    let lower = toks.toks[j].to_lowercase();
    OBJECTS
        .iter()
        .flat_map(|k| k.iter())
        .any(|(s, _)| *s == lower)
        .then_some(j)
}

fn swap_relation(toks: &mut Tokens, rng: &mut impl Rng) -> bool {
    let mut found: Vec<((usize, usize), &str)> = Vec::new();
    for (a, b) in RELATIONS {
        for span in toks.find(a) {
            found.push((span, b));
        }
        for span in toks.find(b) {
            found.push((span, a));
        }
    }
    found.sort_by_key(|f| f.0);
    // A shorter relation inside a longer one ("top" in "on top of") is not its own.
    let spans: Vec<(usize, usize)> = found.iter().map(|f| f.0).collect();
    found.retain(|(s, _)| !spans.iter().any(|o| o != s && o.0 <= s.0 && s.1 <= o.1));
    let Some(&(span, to)) = found.choose(rng) else {
        return false;
    };
    toks.replace(span, to);
    true
}

fn swap_order(toks: &mut Tokens) -> bool {
    let found = objects(toks);
    // The first two objects of different entries trade places, each keeping its slot's number.
    let Some(&(i, k1, e1, p1)) = found.first() else {
        return false;
    };
    let Some(&(j, k2, e2, p2)) = found.iter().find(|o| (o.1, o.2) != (k1, e1)) else {
        return false;
    };
    let form = |k: usize, e: usize, plural: bool| {
        let (s, p) = OBJECTS[k][e];
        if plural {
            p
        } else {
            s
        }
    };
    toks.replace((j, j + 1), form(k1, e1, p2));
    toks.replace((i, i + 1), form(k2, e2, p1));
    toks.fix_article(j);
    toks.fix_article(i);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng(n: u64) -> rand_chacha::ChaCha8Rng {
        rand_chacha::ChaCha8Rng::seed_from_u64(n)
    }

    #[test]
    fn tokens_keep_every_character() {
        let c = "A dog's  ball, on the \"red\" couch — 3 times!";
        assert_eq!(Tokens::new(c).text(), c);
    }

    #[test]
    fn paraphrases_change_wording_and_are_seeded() {
        let c = "A photo of a large dog sitting on a couch in a living room.";
        let (p1, e1) = paraphrase(c, &mut rng(1));
        let (p2, e2) = paraphrase(c, &mut rng(1));
        assert_eq!((p1.clone(), e1.clone()), (p2, e2));
        assert_ne!(p1, c);
        assert!(!e1.is_empty());
        let mut seen = std::collections::HashSet::new();
        for s in 0..20 {
            let (p, edits) = paraphrase(c, &mut rng(s));
            assert_ne!(p, c, "seed {s}: {edits:?}");
            // Nothing is lost: the content words survive in some form.
            let l = p.to_lowercase();
            assert!(l.contains("dog") && l.contains("living room"), "{p}");
            seen.insert(p);
        }
        assert!(seen.len() >= 4, "{seen:?}");
        assert_eq!(
            relative_clause("a brown dog running across a park")
                .unwrap()
                .0,
            "a brown dog that is running across a park"
        );
        assert_eq!(
            relative_clause("Two dogs playing with a ball").unwrap().0,
            "Two dogs that are playing with a ball"
        );
        assert!(relative_clause("a tall building at night").is_none());
        assert!(relative_clause("a man is running").is_none());
        let (moved, _) = front_phrase("A dog sitting on a couch in a living room.").unwrap();
        assert_eq!(moved, "In a living room, a dog sitting on a couch.");
        assert!(front_phrase("Lunch at noon.").is_none());
        assert_eq!(
            front_phrase("a green triangle to the left of a yellow star")
                .unwrap()
                .0,
            "To the left of a yellow star, a green triangle"
        );
        // Long captions keep their first sentence first.
        let long = "The image shows a kitchen. A red kettle is on the stove. Two cups sit nearby. Light comes from a window.";
        let (p, _) = paraphrase(long, &mut rng(3));
        assert!(
            p.starts_with("The image shows a kitchen.")
                || p.starts_with("The image depicts a kitchen."),
            "{p}"
        );
    }

    #[test]
    fn mirrored_captions_swap_sides() {
        assert_eq!(
            mirror("A red circle in the upper left, a star to the Right.", true).unwrap(),
            "A red circle in the upper right, a star to the Left."
        );
        assert_eq!(
            mirror("A lamp above a table, the upper shelf.", false).unwrap(),
            "A lamp below a table, the lower shelf."
        );
        assert!(mirror("A cat on a mat.", true).is_none());
        assert!(mirror("He left early.", false).is_none());
    }

    #[test]
    fn hard_negatives_edit_what_they_name() {
        let c = "A red circle to the left of a blue square.";
        let n = |kind, seed| negative(c, kind, &mut rng(seed));
        let colour = n(NegativeKind::SwapColour, 0).unwrap();
        assert_ne!(colour, c);
        assert!(
            colour.contains("circle to the left of a") && colour.ends_with("square."),
            "{colour}"
        );
        assert_eq!(
            n(NegativeKind::SwapRelation, 0).unwrap(),
            "A red circle to the right of a blue square."
        );
        assert_eq!(
            n(NegativeKind::SwapOrder, 0).unwrap(),
            "A red square to the left of a blue circle."
        );
        let obj = n(NegativeKind::SwapObject, 0).unwrap();
        assert!(["triangle", "rectangle", "star", "circle", "square"]
            .iter()
            .any(|s| obj.contains(s)));
        assert_ne!(obj, c);
        let count = n(NegativeKind::SwapCount, 0).unwrap();
        assert!(
            NUMBERS
                .iter()
                .any(|w| count.to_lowercase().starts_with(w) || count.contains(&format!(" {w} "))),
            "{count}"
        );
        assert!(
            count.contains("circles") || count.contains("squares"),
            "{count}"
        );
        // Articles agree after an edit.
        let apple = negative(
            "A man holding an apple.",
            NegativeKind::SwapObject,
            &mut rng(5),
        )
        .unwrap();
        assert!(
            !apple.contains(" an b") && !apple.contains(" a a"),
            "{apple}"
        );
        assert_eq!(
            negative("Two dogs on a bed.", NegativeKind::SwapCount, &mut rng(2))
                .unwrap()
                .split(' ')
                .nth(1),
            Some("dogs")
        );
        assert_eq!(
            negative(
                "A cat on top of a table.",
                NegativeKind::SwapRelation,
                &mut rng(0)
            )
            .unwrap(),
            "A cat underneath a table."
        );
        // Nothing to edit: no negative.
        assert!(negative("Sunset.", NegativeKind::SwapColour, &mut rng(0)).is_none());
        assert!(negative("A dog.", NegativeKind::SwapOrder, &mut rng(0)).is_none());
    }
}
