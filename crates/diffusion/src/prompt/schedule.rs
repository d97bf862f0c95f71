//! Prompt editing `[from:to:when]` and alternation `[a|b|c]`: which text the model sees at each step.
//!
//! A1111 parses with a lark grammar; this is a recursive-descent reading of the same grammar:
//!
//! ```text
//! start:       (prompt | /[][():]/+)*          stray brackets and colons only at the top
//! prompt:      (emphasized | scheduled | alternate | plain | WHITESPACE)*
//! emphasized:  "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
//! scheduled:   "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
//! alternate:   "[" prompt ("|" [prompt])+ "]"
//! plain:       /([^\\\[\]():|]|\\.)+/
//! ```
//!
//! A prompt the grammar rejects (a `|` outside brackets, a trailing backslash) is used verbatim at
//! every step, as A1111 does. Emphasis is kept as written; it is parsed per step afterwards.

use std::sync::LazyLock;

use regex::Regex;

/// The text to use up to and including `until_step` (below 1 only when the step count is: A1111
/// computes schedules for any integer step count).
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleEntry {
    pub until_step: i64,
    pub text: String,
}

#[derive(Debug, Clone)]
enum Node {
    Text(String),
    Scheduled {
        before: Vec<Node>,
        after: Vec<Node>,
        when: String,
    },
    Alternate(Vec<Vec<Node>>),
}

/// `[WHITESPACE] SIGNED_NUMBER [WHITESPACE] "]"` right after a scheduled prompt's last colon.
static WHEN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^\s*([+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))\s*\]")
        .expect("static regex")
});

struct Parser<'a> {
    s: &'a str,
}

impl<'a> Parser<'a> {
    fn peek(&self, pos: usize) -> Option<char> {
        self.s[pos..].chars().next()
    }

    /// `prompt`: stops before `:`, `|`, `)`, `]` or at the end; `None` where an inner construct
    /// is malformed (a bracket that is neither emphasis, editing nor alternation).
    fn prompt(&self, mut pos: usize, out: &mut Vec<Node>) -> Option<usize> {
        loop {
            match self.peek(pos) {
                None | Some(':') | Some('|') | Some(')') | Some(']') => return Some(pos),
                Some('(') | Some('[') => pos = self.construct(pos, out)?,
                Some(_) => pos = self.plain(pos, out)?,
            }
        }
    }

    /// A run of plain text (escapes kept as written). `None` on a trailing backslash.
    fn plain(&self, start: usize, out: &mut Vec<Node>) -> Option<usize> {
        let mut pos = start;
        let mut chars = self.s[start..].char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((j, e)) if e != '\n' => pos = start + j + e.len_utf8(),
                    _ => return None,
                },
                '[' | ']' | '(' | ')' | ':' | '|' => break,
                _ => pos = start + i + c.len_utf8(),
            }
        }
        if pos == start {
            return None;
        }
        out.push(Node::Text(self.s[start..pos].to_string()));
        Some(pos)
    }

    /// A bracketed construct at `pos` (which holds `(` or `[`).
    fn construct(&self, pos: usize, out: &mut Vec<Node>) -> Option<usize> {
        if self.peek(pos) == Some('(') {
            let mut inner = vec![Node::Text("(".into())];
            let mut p = self.prompt(pos + 1, &mut inner)?;
            if self.peek(p) == Some(':') {
                inner.push(Node::Text(":".into()));
                p = self.prompt(p + 1, &mut inner)?;
            }
            if self.peek(p) != Some(')') {
                return None;
            }
            inner.push(Node::Text(")".into()));
            out.extend(inner);
            return Some(p + 1);
        }
        // "[": editing, alternation or de-emphasis.
        let mut first = Vec::new();
        let p = self.prompt(pos + 1, &mut first)?;
        match self.peek(p) {
            Some(']') => {
                out.push(Node::Text("[".into()));
                out.extend(first);
                out.push(Node::Text("]".into()));
                Some(p + 1)
            }
            Some(':') => {
                if let Some((when, end)) = self.when(p + 1) {
                    out.push(Node::Scheduled {
                        before: Vec::new(),
                        after: first,
                        when,
                    });
                    return Some(end);
                }
                let mut second = Vec::new();
                let q = self.prompt(p + 1, &mut second)?;
                if self.peek(q) != Some(':') {
                    return None;
                }
                let (when, end) = self.when(q + 1)?;
                out.push(Node::Scheduled {
                    before: first,
                    after: second,
                    when,
                });
                Some(end)
            }
            Some('|') => {
                let mut options = vec![first];
                let mut p = p;
                while self.peek(p) == Some('|') {
                    let mut next = Vec::new();
                    p = self.prompt(p + 1, &mut next)?;
                    options.push(next);
                }
                if self.peek(p) != Some(']') {
                    return None;
                }
                out.push(Node::Alternate(options));
                Some(p + 1)
            }
            _ => None,
        }
    }

    fn when(&self, pos: usize) -> Option<(String, usize)> {
        let caps = WHEN.captures(&self.s[pos..])?;
        let number = caps.get(1)?.as_str().to_string();
        Some((number, pos + caps.get(0)?.end()))
    }

    /// `start`: prompts and stray `[ ] ( ) :` at the top level.
    fn start(&self) -> Option<Vec<Node>> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < self.s.len() {
            match self.peek(pos) {
                Some(c @ ('(' | '[')) => {
                    let mut inner = Vec::new();
                    match self.construct(pos, &mut inner) {
                        Some(p) => {
                            out.extend(inner);
                            pos = p;
                        }
                        None => {
                            out.push(Node::Text(c.to_string()));
                            pos += 1;
                        }
                    }
                }
                Some(c @ (')' | ']' | ':')) => {
                    out.push(Node::Text(c.to_string()));
                    pos += 1;
                }
                Some('|') => return None,
                Some(_) => pos = self.plain(pos, &mut out)?,
                None => break,
            }
        }
        Some(out)
    }
}

/// The step a `when` number means: a fraction of the steps if it has a decimal point, else a step.
fn resolve_when(when: &str, steps: i64) -> i64 {
    let v: f64 = when.parse().unwrap_or(0.0);
    let v = if when.contains('.') {
        v * steps as f64
    } else {
        v
    };
    let v = if v.is_finite() {
        v.trunc()
    } else if v > 0.0 {
        f64::MAX
    } else {
        f64::MIN
    };
    (v as i64).min(steps)
}

fn collect_steps(nodes: &[Node], steps: i64, out: &mut Vec<i64>) {
    for n in nodes {
        match n {
            Node::Text(_) => {}
            Node::Scheduled {
                before,
                after,
                when,
            } => {
                let w = resolve_when(when, steps);
                if w >= 1 {
                    out.push(w);
                }
                collect_steps(before, steps, out);
                collect_steps(after, steps, out);
            }
            Node::Alternate(options) => {
                out.extend(1..=steps);
                for o in options {
                    collect_steps(o, steps, out);
                }
            }
        }
    }
}

fn render(nodes: &[Node], step: i64, steps: i64, out: &mut String) {
    for n in nodes {
        match n {
            Node::Text(t) => out.push_str(t),
            Node::Scheduled {
                before,
                after,
                when,
            } => {
                if step <= resolve_when(when, steps) {
                    render(before, step, steps, out);
                } else {
                    render(after, step, steps, out);
                }
            }
            Node::Alternate(options) => {
                // Python's `(step - 1) % len`: never negative (step 0 picks the last option).
                let pick = &options[(step - 1).rem_euclid(options.len() as i64) as usize];
                render(pick, step, steps, out);
            }
        }
    }
}

/// The prompt-editing schedule of `prompt` over `steps` steps (A1111's
/// `get_learned_conditioning_prompt_schedules` for one prompt, without hires-fix offsets).
pub fn schedule(prompt: &str, steps: i64) -> Vec<ScheduleEntry> {
    let Some(tree) = (Parser { s: prompt }).start() else {
        return vec![ScheduleEntry {
            until_step: steps,
            text: prompt.to_string(),
        }];
    };
    let mut at = vec![steps];
    collect_steps(&tree, steps, &mut at);
    at.sort_unstable();
    at.dedup();
    at.into_iter()
        .map(|step| {
            let mut text = String::new();
            render(&tree, step, steps, &mut text);
            ScheduleEntry {
                until_step: step,
                text,
            }
        })
        .collect()
}

/// The entry in force at `step` (1-based).
pub fn text_at(schedule: &[ScheduleEntry], step: usize) -> Option<&str> {
    let step = i64::try_from(step).unwrap_or(i64::MAX);
    schedule
        .iter()
        .find(|e| step <= e.until_step)
        .or(schedule.last())
        .map(|e| e.text.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_counts_of_zero_and_below_follow_pythons_arithmetic() {
        // No step is ≥ 1: one entry at the step count; alternation at step 0 takes the last
        // option ((0 - 1) % 2 == 1 in Python); step 0 is "up to" a `when` of 0.
        let s = schedule("[a|b] [c:d:0]", 0);
        assert_eq!(
            s,
            vec![ScheduleEntry {
                until_step: 0,
                text: "b c".into()
            }]
        );
        let s = schedule("[a|b|c] x", -2);
        assert_eq!((s[0].until_step, s[0].text.as_str()), (-2, "a x"));
        // Whitespace around the number; a fraction's "." makes it a share of the steps.
        let s = schedule("[ a : b : 5. ]", 10);
        assert_eq!((s[0].until_step, s[0].text.as_str()), (10, " a "));
    }

    #[test]
    fn editing_and_alternation() {
        let s = schedule("a [b:c:0.5] d", 10);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].until_step, s[0].text.as_str()), (5, "a b d"));
        assert_eq!((s[1].until_step, s[1].text.as_str()), (10, "a c d"));
        assert_eq!(text_at(&s, 6), Some("a c d"));
        let s = schedule("[x|y]", 3);
        assert_eq!(
            s.iter().map(|e| e.text.as_str()).collect::<Vec<_>>(),
            ["x", "y", "x"]
        );
        // Rejected by the grammar: verbatim.
        assert_eq!(schedule("a | b [c:d:2]", 5)[0].text, "a | b [c:d:2]");
    }
}
