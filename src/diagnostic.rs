//! Problems found in an input file, each pinned to path:line:column and the field it concerns,
//! so an operator can jump straight to the mistake. Config and zone loaders collect every
//! problem they find rather than stopping at the first; [`Checker`] is that collection for the
//! tables each part of the config checks itself (sources, registrations, health checks).

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use crate::duration;

/// One problem in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub path: PathBuf,
    /// 1-based; 0 when the problem is about the file as a whole (unreadable, missing).
    pub line: usize,
    pub column: usize,
    /// The dotted field the problem is in, e.g. `services.web.backends[1]`; empty when unknown.
    pub field: String,
    pub message: String,
}

impl Diagnostic {
    /// A problem located by a byte span of `source`.
    pub fn at(
        path: &Path,
        source: &str,
        span: Option<Range<usize>>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        let (line, column) = span.map_or((0, 0), |s| line_column(source, s.start));
        Self {
            path: path.to_path_buf(),
            line,
            column,
            field: field.into(),
            message: message.into(),
        }
    }

    /// A problem with the file as a whole.
    pub fn file(path: &Path, message: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            line: 0,
            column: 0,
            field: String::new(),
            message: message.into(),
        }
    }

    /// A TOML syntax or shape error, located by the parser's span.
    pub fn from_toml(path: &Path, source: &str, error: &toml::de::Error) -> Self {
        Self::at(path, source, error.span(), "", error.message().trim_end())
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        f.write_str(": ")?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found, displayed one per line.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Checks the values of one file, each located by its span, and collects every problem:
/// a check that fails reports and the caller goes on, so the file's problems come out together.
#[derive(Debug)]
pub struct Checker<'a> {
    path: &'a Path,
    source: &'a str,
    problems: Vec<Diagnostic>,
}

impl<'a> Checker<'a> {
    /// `source` is the text of the file at `path`, which the spans point into.
    pub fn new(path: &'a Path, source: &'a str) -> Self {
        Self {
            path,
            source,
            problems: Vec::new(),
        }
    }

    /// The file being checked.
    pub fn path(&self) -> &'a Path {
        self.path
    }

    /// A problem with the value at `at`.
    pub fn problem<T>(&mut self, at: &Spanned<T>, field: &str, message: impl Into<String>) {
        self.problems.push(Diagnostic::at(
            self.path,
            self.source,
            Some(at.span()),
            field,
            message,
        ));
    }

    /// A problem with the file as a whole.
    pub fn problem_in_file(&mut self, message: impl Into<String>) {
        self.problems.push(Diagnostic::file(self.path, message));
    }

    /// `f` of the value, or `None` with its error reported at the value.
    pub fn check<T, U, E: fmt::Display>(
        &mut self,
        v: &Spanned<T>,
        field: &str,
        f: impl FnOnce(&T) -> Result<U, E>,
    ) -> Option<U> {
        match f(v.get_ref()) {
            Ok(u) => Some(u),
            Err(e) => {
                self.problem(v, field, e.to_string());
                None
            }
        }
    }

    /// A duration as written (`"30s"`), `default` when absent or wrong (and then reported).
    pub fn duration(
        &mut self,
        v: &Option<Spanned<String>>,
        field: &str,
        default: Duration,
    ) -> Duration {
        match v {
            Some(s) => self
                .check(s, field, |s| duration::parse(s))
                .unwrap_or(default),
            None => default,
        }
    }

    /// `value` when nothing was reported, else every problem.
    ///
    /// # Errors
    /// Every problem reported, in order; none when `value` is `None` without a report.
    pub fn finish<T>(self, value: Option<T>) -> Result<T, Vec<Diagnostic>> {
        match value {
            Some(v) if self.problems.is_empty() => Ok(v),
            _ => Err(self.problems),
        }
    }
}

/// 1-based line and column (in characters) of byte `offset` in `source`.
pub fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = source.get(..offset).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        let src = "a = 1\nbb = \"x\"\n";
        assert_eq!(line_column(src, 0), (1, 1));
        assert_eq!(line_column(src, 6), (2, 1));
        assert_eq!(line_column(src, 11), (2, 6));
        assert_eq!(line_column(src, 999), (3, 1));
    }

    #[test]
    fn display_names_path_line_column_and_field() {
        let d = Diagnostic::at(
            Path::new("zones/web.toml"),
            "x\n  y",
            Some(4..5),
            "services.web.lb",
            "unknown lb",
        );
        assert_eq!(
            d.to_string(),
            "zones/web.toml:2:3: services.web.lb: unknown lb"
        );
        assert_eq!(
            Diagnostic::file(Path::new("a.toml"), "missing").to_string(),
            "a.toml: missing"
        );
    }
}
