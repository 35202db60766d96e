//! Compiler-style diagnostics: every problem carries the file, a byte span into that file's text,
//! and (where it helps) what would be valid. Rendering uses `annotate-snippets`; the same data is
//! available as JSON (`line`/`column` are 1-based, columns count characters).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use annotate_snippets::{AnnotationKind, Group, Level, Renderer, Snippet};
use serde::Serialize;

/// A source file a diagnostic can point into.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Path as the user should see it (as given on the command line, or relative to it).
    pub path: PathBuf,
    pub text: Arc<str>,
}

impl SourceFile {
    pub fn new(path: impl Into<PathBuf>, text: impl Into<Arc<str>>) -> Self {
        SourceFile { path: path.into(), text: text.into() }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = floor_char_boundary(&self.text, offset.min(self.text.len()));
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        // A byte-order mark at the start of the file is no column an editor shows.
        let in_line = &before[line_start..];
        let in_line = if line_start == 0 { in_line.strip_prefix('\u{feff}').unwrap_or(in_line) } else { in_line };
        (line, in_line.chars().count() + 1)
    }

    /// Read a text file. `what` names it in errors ("pipeline file"); bytes that are not UTF-8
    /// are an error located at the first of them, not silently replaced.
    pub fn read(path: &Path, what: &str) -> Result<SourceFile, Diagnostic> {
        let bytes = std::fs::read(path).map_err(|e| Diagnostic::error(format!("cannot read {what} `{}`: {e}", path.display())))?;
        Self::from_bytes(path, bytes, what)
    }

    /// A text file's bytes, already read (see [`Self::read`]).
    pub fn from_bytes(path: &Path, bytes: Vec<u8>, what: &str) -> Result<SourceFile, Diagnostic> {
        match String::from_utf8(bytes) {
            Ok(text) => Ok(SourceFile::new(path, text)),
            Err(e) => {
                let at = e.utf8_error().valid_up_to();
                let byte = e.as_bytes()[at];
                // The valid prefix is unchanged in the lossy text; the bad byte became U+FFFD.
                let file = SourceFile::new(path, String::from_utf8_lossy(e.as_bytes()).into_owned());
                Err(Diagnostic::error(format!("{what} `{}` is not UTF-8 text (byte 0x{byte:02x})", path.display()))
                    .at(&file, at..at + '\u{fffd}'.len_utf8(), "not UTF-8")
                    .help("save it as UTF-8"))
            }
        }
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub message: String,
    /// Where it is; `None` when the problem is not in a file (e.g. an unreadable path).
    pub primary: Option<Label>,
    pub secondary: Vec<Label>,
    /// "valid kinds are: ...", "did you mean ...".
    pub help: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Label {
    pub file: SourceFile,
    pub span: Range<usize>,
    pub text: String,
}

impl Diagnostic {
    pub fn error(message: impl Into<String>) -> Self {
        Diagnostic { message: message.into(), primary: None, secondary: Vec::new(), help: None }
    }

    pub fn at(mut self, file: &SourceFile, span: Range<usize>, label: impl Into<String>) -> Self {
        self.primary = Some(Label { file: file.clone(), span, text: label.into() });
        self
    }

    pub fn also(mut self, file: &SourceFile, span: Range<usize>, label: impl Into<String>) -> Self {
        self.secondary.push(Label { file: file.clone(), span, text: label.into() });
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// Help for a name that is none of `valid`: the closest, when one is close, and all of them
    /// after `these` ("the samples have", "it reports") — unless a close one was found among
    /// more than a screenful.
    pub fn suggest(self, got: &str, valid: &[&str], these: &str) -> Diagnostic {
        let all = format!("{these} {}", one_of(valid));
        self.help(match did_you_mean(got, valid.iter().copied()) {
            Some(s) if valid.len() > 8 => format!("did you mean `{s}`?"),
            Some(s) => format!("did you mean `{s}`? {all}"),
            None => all,
        })
    }

    /// Plain-text rendering (no colour), used for snapshots and non-terminal output.
    pub fn render(&self, color: bool) -> String {
        let renderer = if color { Renderer::styled() } else { Renderer::plain() };
        let mut title = Group::with_title(Level::ERROR.primary_title(&self.message));
        let mut groups = Vec::new();
        if let Some(primary) = &self.primary {
            let span = clamp(&primary.file.text, &primary.span);
            let mut snippet = Snippet::source(&*primary.file.text)
                .path(display_path(&primary.file.path))
                .annotation(AnnotationKind::Primary.span(span).label(&primary.text));
            for other in self.secondary.iter().filter(|l| l.file.path == primary.file.path) {
                snippet = snippet.annotation(
                    AnnotationKind::Context.span(clamp(&other.file.text, &other.span)).label(&other.text),
                );
            }
            title = title.element(snippet);
        }
        for other in self.secondary.iter().filter(|l| self.primary.as_ref().is_none_or(|p| p.file.path != l.file.path)) {
            title = title.element(
                Snippet::source(&*other.file.text)
                    .path(display_path(&other.file.path))
                    .annotation(AnnotationKind::Context.span(clamp(&other.file.text, &other.span)).label(&other.text)),
            );
        }
        groups.push(title);
        if let Some(help) = &self.help {
            groups.push(Group::with_title(Level::HELP.secondary_title(help)));
        }
        renderer.render(&groups).to_string()
    }

    pub fn to_json(&self) -> DiagnosticJson {
        let location = self.primary.as_ref().map(|p| {
            let (line, column) = p.file.line_col(p.span.start);
            let (end_line, end_column) = p.file.line_col(p.span.end);
            LocationJson {
                file: display_path(&p.file.path),
                line,
                column,
                end_line,
                end_column,
                label: p.text.clone(),
            }
        });
        DiagnosticJson { severity: "error", message: self.message.clone(), location, help: self.help.clone() }
    }
}

fn clamp(text: &str, span: &Range<usize>) -> Range<usize> {
    let start = floor_char_boundary(text, span.start.min(text.len()));
    let end = floor_char_boundary(text, span.end.min(text.len())).max(start);
    start..end
}

pub fn display_path(path: &Path) -> String {
    path.to_string_lossy().replace('\\', "/")
}

#[derive(Debug, Serialize)]
pub struct DiagnosticJson {
    pub severity: &'static str,
    pub message: String,
    pub location: Option<LocationJson>,
    pub help: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct LocationJson {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub end_line: usize,
    pub end_column: usize,
    pub label: String,
}

/// "did you mean `x`?" for a misspelt name, by edit distance.
pub fn did_you_mean<'a>(got: &str, valid: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    valid
        .into_iter()
        .map(|v| (edit_distance(got, v), v))
        .filter(|(d, v)| *d <= (v.len().max(got.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, v)| v)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// A list of names for "valid ... are: ..." help lines.
pub fn one_of(names: &[&str]) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}
