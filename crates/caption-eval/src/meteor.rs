//! METEOR 1.5 through the reference implementation: the `meteor-1.5.jar` that pycocoevalcap ships
//! (PyPI `pycocoevalcap`, with its English paraphrase table), run with Java exactly as
//! pycocoevalcap runs it (`java -jar -Xmx2G meteor-1.5.jar - - -stdio -l en -norm`, in the jar's
//! folder) and spoken to over its stdio protocol: one `SCORE ||| ref … ||| hyp` line per image,
//! answered with its statistics, then one `EVAL ||| stats …` line answered with a score per image
//! and the corpus score. METEOR is not reimplemented: the jar is the reference.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum MeteorError {
    #[error("starting java for METEOR ({0}); is Java installed?")]
    Start(std::io::Error),
    #[error("talking to the METEOR jar: {0}")]
    Io(#[from] std::io::Error),
    #[error("the METEOR jar answered {0:?} where a number was expected")]
    Protocol(String),
    #[error("the METEOR jar closed its output (out of memory? see its stderr)")]
    Closed,
}

/// Where the jar is: `ATELIER_METEOR_JAR`, else pycocoevalcap's copy in the project's `.tools/`
/// venv (`scripts/bootstrap` installs it; found as `atelier_embed::tools` says).
pub fn find_jar() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ATELIER_METEOR_JAR") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    atelier_embed::tools::site_package("pycocoevalcap/meteor/meteor-1.5.jar")
        .filter(|p| p.is_file())
}

/// A running METEOR jar.
pub struct Meteor {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Meteor {
    pub fn start(jar: &Path) -> Result<Self, MeteorError> {
        let dir = jar.parent().unwrap_or(Path::new("."));
        let mut child = Command::new("java")
            .args(["-jar", "-Xmx2G"])
            .arg(jar.file_name().unwrap_or(jar.as_os_str()))
            .args(["-", "-", "-stdio", "-l", "en", "-norm"])
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(MeteorError::Start)?;
        let stdin = child.stdin.take().ok_or(MeteorError::Closed)?;
        let stdout = BufReader::new(child.stdout.take().ok_or(MeteorError::Closed)?);
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    fn line(&mut self) -> Result<String, MeteorError> {
        let mut s = String::new();
        if self.stdout.read_line(&mut s)? == 0 {
            return Err(MeteorError::Closed);
        }
        Ok(s.trim().to_owned())
    }

    fn number(&mut self) -> Result<f64, MeteorError> {
        let l = self.line()?;
        l.parse().map_err(|_| MeteorError::Protocol(l))
    }

    /// Corpus and per-image METEOR of tokenized captions (as pycocoevalcap feeds it: after the
    /// PTB tokenizer), in the given order.
    pub fn score(
        &mut self,
        refs: &[Vec<String>],
        cands: &[String],
    ) -> Result<(f64, Vec<f64>), MeteorError> {
        let mut eval = String::from("EVAL");
        for (r, c) in refs.iter().zip(cands) {
            let hyp = c.replace("|||", "").replace("  ", " ");
            writeln!(self.stdin, "SCORE ||| {} ||| {hyp}", r.join(" ||| "))?;
            self.stdin.flush()?;
            let stats = self.line()?;
            eval.push_str(" ||| ");
            eval.push_str(&stats);
        }
        writeln!(self.stdin, "{eval}")?;
        self.stdin.flush()?;
        let each = (0..cands.len())
            .map(|_| self.number())
            .collect::<Result<Vec<_>, _>>()?;
        Ok((self.number()?, each))
    }
}

impl Drop for Meteor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
