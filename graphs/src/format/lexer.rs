//! Stage one, first half: the text of a graph file → tokens with source spans.

use super::syntax::{Diagnostic, Expr, Parser, Part, Span};

/// A token.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Tok {
    /// A word: identifier or name, with interpolations.
    Word(Vec<Part>),
    Int(i64),
    Float(f64),
    Str(Vec<Part>),
    Sym(&'static str),
    Newline,
    Eof,
}

struct Lexer<'a> {
    chars: Vec<char>,
    pos: usize,
    line: u32,
    col: u32,
    errors: &'a mut Vec<Diagnostic>,
}

const SYMS: &[&str] = &["->", "..", "==", "=", ".", "{", "}", "(", ")", "[", "]", ",", "+", "-", "*", "/", "!"];

fn is_word_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}
fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '/'
}

impl Lexer<'_> {
    fn peek(&self, k: usize) -> Option<char> {
        self.chars.get(self.pos + k).copied()
    }
    fn bump(&mut self) -> Option<char> {
        let c = self.chars.get(self.pos).copied()?;
        self.pos += 1;
        if c == '\n' {
            self.line += 1;
            self.col = 1;
        } else {
            self.col += 1;
        }
        Some(c)
    }
    fn here(&self) -> Span {
        Span { line: self.line, col: self.col }
    }
    fn err(&mut self, span: Span, message: impl Into<String>) {
        self.errors.push(Diagnostic { span, message: message.into() });
    }

    /// `{expr}` inside a word or string: lexes and parses the expression in place.
    fn interpolation(&mut self) -> Option<Expr> {
        let open = self.here();
        self.bump(); // {
        let start_line = self.line;
        let start_col = self.col;
        let mut text = String::new();
        while let Some(c) = self.peek(0) {
            if c == '\n' {
                break;
            }
            self.bump();
            if c == '{' {
                self.err(open, "`{` inside `{…}`: interpolations do not nest");
                return None;
            } else if c == '}' {
                let mut errs = Vec::new();
                let e = Parser::interpolated(lex_at(&text, start_line, start_col, &mut errs), &mut errs);
                let ok = errs.is_empty();
                self.errors.extend(errs);
                return if ok { e } else { None };
            }
            text.push(c);
        }
        self.err(open, "unclosed `{` in a name or string");
        None
    }

    /// Skips blanks, comments and escaped line ends.
    fn skip_blank(&mut self) {
        loop {
            match self.peek(0) {
                Some(' ' | '\t' | '\r') => {
                    self.bump();
                }
                Some('\\') if self.peek(1) == Some('\n') => {
                    self.bump();
                    self.bump();
                }
                Some('#') => {
                    while self.peek(0).is_some_and(|c| c != '\n') {
                        self.bump();
                    }
                }
                _ => return,
            }
        }
    }

    /// The next token and where it starts.
    pub(super) fn next(&mut self) -> (Tok, Span) {
        self.skip_blank();
        let span = self.here();
        let Some(c) = self.peek(0) else { return (Tok::Eof, span) };
        if c == '\n' {
            self.bump();
            return (Tok::Newline, span);
        }
        // A word may also start with an interpolation (`{x}/norm`); a block's `{` is always
        // followed by a space or the end of its line, so the two never meet.
        let interp_start = c == '{' && self.peek(1).is_some_and(|d| is_word_start(d) || d.is_ascii_digit() || d == '(');
        if is_word_start(c) || interp_start {
            return (self.word(), span);
        }
        if c.is_ascii_digit() {
            return (self.number(span), span);
        }
        if c == '"' {
            return (self.string(span), span);
        }
        for s in SYMS {
            if s.chars().enumerate().all(|(i, sc)| self.peek(i) == Some(sc)) {
                for _ in 0..s.len() {
                    self.bump();
                }
                return (Tok::Sym(s), span);
            }
        }
        self.bump();
        self.err(span, format!("unexpected character `{c}`"));
        self.next()
    }

    /// A word: letters, digits, `_`, `/` and interpolations.
    fn word(&mut self) -> Tok {
        let mut parts: Vec<Part> = Vec::new();
        let mut lit = String::new();
        loop {
            match self.peek(0) {
                Some(c) if is_word_char(c) => {
                    lit.push(c);
                    self.bump();
                }
                Some('{') => {
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    match self.interpolation() {
                        Some(e) => parts.push(Part::Interp(e)),
                        None => parts.push(Part::Lit("?".into())),
                    }
                }
                _ => break,
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Tok::Word(parts)
    }

    /// An integer or a float (`1_000`, `1e-5`, `10000.0`) starting at `span`.
    fn number(&mut self, span: Span) -> Tok {
        let mut s = String::new();
        let digits = |lx: &mut Self, s: &mut String, underscore: bool| {
            while let Some(d) = lx.peek(0).filter(|d| d.is_ascii_digit() || (underscore && *d == '_')) {
                s.push(d);
                lx.bump();
            }
        };
        digits(self, &mut s, true);
        let mut float = false;
        if self.peek(0) == Some('.') && self.peek(1).is_some_and(|d| d.is_ascii_digit()) {
            float = true;
            s.push('.');
            self.bump();
            digits(self, &mut s, false);
        }
        if matches!(self.peek(0), Some('e' | 'E'))
            && self.peek(1).is_some_and(|d| d.is_ascii_digit() || d == '-' || d == '+')
        {
            float = true;
            s.push('e');
            self.bump();
            if let Some(sign) = self.peek(0).filter(|d| *d == '-' || *d == '+') {
                s.push(sign);
                self.bump();
            }
            digits(self, &mut s, false);
        }
        let s = s.replace('_', "");
        if float {
            s.parse().map(Tok::Float).unwrap_or_else(|_| {
                self.err(span, format!("`{s}` is not a number"));
                Tok::Float(0.0)
            })
        } else {
            s.parse().map(Tok::Int).unwrap_or_else(|_| {
                self.err(span, format!("`{s}` is too large"));
                Tok::Int(0)
            })
        }
    }

    /// A string in double quotes, with escapes and interpolations, starting at `span`.
    fn string(&mut self, span: Span) -> Tok {
        self.bump();
        let mut parts = Vec::new();
        let mut lit = String::new();
        loop {
            match self.peek(0) {
                None | Some('\n') => {
                    self.err(span, "unterminated string");
                    break;
                }
                Some('"') => {
                    self.bump();
                    break;
                }
                Some('\\') => {
                    self.bump();
                    match self.bump() {
                        Some('n') => lit.push('\n'),
                        Some(c @ ('"' | '\\' | '{' | '}')) => lit.push(c),
                        other => {
                            let s = self.here();
                            self.err(s, format!("unknown escape `\\{}` in a string", other.unwrap_or(' ')));
                        }
                    }
                }
                Some('{') => {
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    if let Some(e) = self.interpolation() {
                        parts.push(Part::Interp(e));
                    }
                }
                Some(c) => {
                    lit.push(c);
                    self.bump();
                }
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Tok::Str(parts)
    }
}

/// The tokens of `text`, which starts at `line`:`col` of its file.
pub(super) fn lex_at(text: &str, line: u32, col: u32, errors: &mut Vec<Diagnostic>) -> Vec<(Tok, Span)> {
    let mut lx = Lexer { chars: text.chars().collect(), pos: 0, line, col, errors };
    let mut out = Vec::new();
    loop {
        let t = lx.next();
        let eof = t.0 == Tok::Eof;
        out.push(t);
        if eof {
            return out;
        }
    }
}
