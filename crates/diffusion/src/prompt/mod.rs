//! AUTOMATIC1111's prompt language.
//!
//! - [`parse_attention`]: `(x)`, `(x:1.5)`, `[x]`, escapes and `BREAK` → text runs with weights;
//! - [`schedule`]: prompt editing `[a:b:when]` and alternation `[a|b]` → the prompt text per step;
//! - [`extract_extra_networks`]: `<lora:name:weight>` tags taken out of the text.
//!
//! Both parsers follow A1111's `modules/prompt_parser.py` case for case (replayed against its own
//! outputs by `conformance::prompts`), including what it does with unbalanced brackets.

mod attention;
mod extra;
mod schedule;

pub use attention::{parse_attention, Chunk, BREAK_WEIGHT};
pub use extra::{extract_extra_networks, ExtraNetwork};
pub use schedule::{schedule, text_at, ScheduleEntry};

/// Both views of a prompt, as `atelier prompt parse` prints them.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Parsed {
    /// `[text, weight]` runs; `["BREAK", -1]` marks a BREAK.
    pub attention: Vec<(String, f64)>,
    /// `[until_step, text]`: the text to use up to and including each step.
    pub schedule: Vec<(i64, String)>,
}

/// Parse a prompt as A1111 does for `steps` sampling steps (any integer, as A1111's parser takes).
pub fn parse(prompt: &str, steps: i64) -> Parsed {
    Parsed {
        attention: parse_attention(prompt)
            .into_iter()
            .map(|c| (c.text, c.weight))
            .collect(),
        schedule: schedule(prompt, steps)
            .into_iter()
            .map(|e| (e.until_step, e.text))
            .collect(),
    }
}
