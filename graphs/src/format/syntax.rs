//! Stage one: the text of a graph file → statements with source spans (`lexer` makes the
//! tokens). Knows nothing of operators or models; reports every syntax error it can recover
//! from, not just the first.

use super::lexer::{lex_at, Tok};
use std::fmt;

/// A position in a file (1-based line and column, in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord)]
pub struct Span {
    pub line: u32,
    pub col: u32,
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// A message about a place in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub span: Span,
    pub message: String,
}

/// A binary operator in an expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
}

/// An expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Int(i64, Span),
    Float(f64, Span),
    Bool(bool, Span),
    None(Span),
    /// A string with `{expr}` interpolations.
    Str(Vec<Part>, Span),
    Var(String, Span),
    Index(Box<Expr>, Box<Expr>, Span),
    Neg(Box<Expr>, Span),
    Not(Box<Expr>, Span),
    Bin(BinOp, Box<Expr>, Box<Expr>, Span),
    /// `a..b` (half-open).
    Range(Box<Expr>, Box<Expr>, Span),
    /// `a, b, c`.
    List(Vec<Expr>, Span),
}

impl Expr {
    /// Where the expression starts.
    pub fn span(&self) -> Span {
        match self {
            Expr::Int(_, s)
            | Expr::Float(_, s)
            | Expr::Bool(_, s)
            | Expr::None(s)
            | Expr::Str(_, s)
            | Expr::Var(_, s)
            | Expr::Index(_, _, s)
            | Expr::Neg(_, s)
            | Expr::Not(_, s)
            | Expr::Bin(_, _, _, s)
            | Expr::Range(_, _, s)
            | Expr::List(_, s) => *s,
        }
    }
}

/// A piece of a name or string: literal text or an interpolated expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Lit(String),
    Interp(Expr),
}

/// A node or lane name, possibly with `{expr}` interpolations (`l{l}/attn_norm`).
#[derive(Debug, Clone, PartialEq)]
pub struct Name {
    pub parts: Vec<Part>,
    pub span: Span,
}

/// `node` or `node.port`.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub node: Name,
    pub port: Option<(String, Span)>,
    pub span: Span,
}

/// `key=value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Attr {
    pub key: String,
    pub span: Span,
    pub value: Expr,
}

/// One statement.
#[derive(Debug, Clone, PartialEq)]
pub enum Stmt {
    Lane { name: Name, kind: (String, Span), attrs: Vec<Attr>, span: Span },
    Process { name: Name, attrs: Vec<Attr>, span: Span },
    Default { attrs: Vec<Attr>, span: Span },
    Set { name: (String, Span), value: Expr, span: Span },
    Node { name: Name, kind: (String, Span), attrs: Vec<Attr>, span: Span },
    Edge { chain: Vec<Endpoint>, attrs: Vec<Attr>, span: Span },
    Weight { to: Endpoint, tensor: Expr, attrs: Vec<Attr>, span: Span },
    Input { to: Endpoint, span: Span },
    Output { from: Endpoint, span: Span },
    Place { attrs: Vec<Attr>, span: Span },
    Budget { attrs: Vec<Attr>, span: Span },
    For { var: (String, Span), range: Expr, body: Vec<Stmt>, span: Span },
    If { cond: Expr, then: Vec<Stmt>, otherwise: Vec<Stmt>, span: Span },
}

/// A parsed file.
#[derive(Debug, Clone, PartialEq)]
pub struct File {
    pub version: u32,
    pub stmts: Vec<Stmt>,
}

/// The format version this build reads and writes.
pub const VERSION: u32 = 1;

/// The parser: tokens → statements.
pub(super) struct Parser<'a> {
    toks: Vec<(Tok, Span)>,
    pos: usize,
    errors: &'a mut Vec<Diagnostic>,
    /// Nesting of expressions and blocks, bounded so that no input can overflow the stack.
    depth: usize,
}

/// How deeply expressions and blocks may nest.
const MAX_DEPTH: usize = 64;

fn describe(t: &Tok) -> String {
    match t {
        Tok::Word(p) => match p.as_slice() {
            [Part::Lit(s)] => format!("`{s}`"),
            _ => "a name".into(),
        },
        Tok::Int(i) => format!("`{i}`"),
        Tok::Float(f) => format!("`{f}`"),
        Tok::Str(_) => "a string".into(),
        Tok::Sym(s) => format!("`{s}`"),
        Tok::Newline => "the end of the line".into(),
        Tok::Eof => "the end of the file".into(),
    }
}

impl<'a> Parser<'a> {
    pub(super) fn new(toks: Vec<(Tok, Span)>, errors: &'a mut Vec<Diagnostic>) -> Parser<'a> {
        Parser { toks, pos: 0, errors, depth: 0 }
    }

    /// The expression of an interpolation (`{…}`), from its tokens: one expression and nothing
    /// after it.
    pub(super) fn interpolated(toks: Vec<(Tok, Span)>, errors: &'a mut Vec<Diagnostic>) -> Option<Expr> {
        let mut p = Parser::new(toks, errors);
        let e = p.expr();
        if e.is_some() && !matches!(p.peek(), Tok::Newline | Tok::Eof) {
            let s = p.span();
            p.err(s, "unexpected text in `{…}`");
        }
        e
    }

    fn peek(&self) -> &Tok {
        &self.toks[self.pos.min(self.toks.len() - 1)].0
    }
    fn peek_at(&self, k: usize) -> &Tok {
        &self.toks[(self.pos + k).min(self.toks.len() - 1)].0
    }
    fn span(&self) -> Span {
        self.toks[self.pos.min(self.toks.len() - 1)].1
    }
    fn bump(&mut self) -> (Tok, Span) {
        let t = self.toks[self.pos.min(self.toks.len() - 1)].clone();
        if self.pos < self.toks.len() - 1 {
            self.pos += 1;
        }
        t
    }
    fn err(&mut self, span: Span, message: impl Into<String>) {
        self.errors.push(Diagnostic { span, message: message.into() });
    }
    fn is_sym(&self, s: &str) -> bool {
        matches!(self.peek(), Tok::Sym(x) if *x == s)
    }
    fn eat_sym(&mut self, s: &str) -> bool {
        if self.is_sym(s) {
            self.bump();
            true
        } else {
            false
        }
    }
    fn expect_sym(&mut self, s: &str, what: &str) -> Option<()> {
        if self.eat_sym(s) {
            return Some(());
        }
        let (sp, found) = (self.span(), describe(self.peek()));
        self.err(sp, format!("expected `{s}` {what}, found {found}"));
        None
    }
    /// A plain identifier (no interpolation).
    fn ident(&mut self, what: &str) -> Option<(String, Span)> {
        let sp = self.span();
        if let Tok::Word(parts) = self.peek().clone() {
            if let [Part::Lit(s)] = parts.as_slice() {
                if !s.contains('/') {
                    self.bump();
                    return Some((s.clone(), sp));
                }
            }
        }
        let found = describe(self.peek());
        self.err(sp, format!("expected {what}, found {found}"));
        None
    }
    fn name(&mut self, what: &str) -> Option<Name> {
        let sp = self.span();
        if let Tok::Word(parts) = self.peek().clone() {
            self.bump();
            return Some(Name { parts, span: sp });
        }
        let found = describe(self.peek());
        self.err(sp, format!("expected {what}, found {found}"));
        None
    }
    fn endpoint(&mut self) -> Option<Endpoint> {
        let sp = self.span();
        let node = self.name("a node name")?;
        let port = if self.eat_sym(".") { Some(self.ident("a port name after `.`")?) } else { None };
        Some(Endpoint { node, port, span: sp })
    }
    fn end_of_line(&mut self) -> Option<()> {
        match self.peek() {
            Tok::Newline => {
                self.bump();
                Some(())
            }
            Tok::Eof => Some(()),
            Tok::Sym("}") => Some(()),
            t => {
                let (sp, found) = (self.span(), describe(t));
                self.err(sp, format!("expected the end of the line, found {found}"));
                None
            }
        }
    }
    fn skip_line(&mut self) {
        while !matches!(self.peek(), Tok::Newline | Tok::Eof) {
            if self.is_sym("{") {
                self.bump();
                self.skip_block();
                continue;
            }
            self.bump();
        }
        if matches!(self.peek(), Tok::Newline) {
            self.bump();
        }
    }
    /// Skips to the `}` matching an already consumed `{`.
    fn skip_block(&mut self) {
        let mut depth = 1;
        while !matches!(self.peek(), Tok::Eof) {
            if self.eat_sym("{") {
                depth += 1;
            } else if self.eat_sym("}") {
                depth -= 1;
                if depth == 0 {
                    return;
                }
            } else {
                self.bump();
            }
        }
    }
    fn attrs(&mut self) -> Option<Vec<Attr>> {
        let mut out = Vec::new();
        while let Tok::Word(_) = self.peek() {
            let (key, span) = self.ident("a `key=value` attribute")?;
            self.expect_sym("=", &format!("after `{key}`"))?;
            let value = self.value()?;
            out.push(Attr { key, span, value });
        }
        Some(out)
    }
    /// An attribute value: an expression, a range `a..b`, or a list `a,b,c`.
    fn value(&mut self) -> Option<Expr> {
        let sp = self.span();
        let first = self.expr()?;
        if self.eat_sym("..") {
            let end = self.expr()?;
            return Some(Expr::Range(Box::new(first), Box::new(end), sp));
        }
        if self.is_sym(",") {
            let mut items = vec![first];
            while self.eat_sym(",") {
                items.push(self.expr()?);
            }
            return Some(Expr::List(items, sp));
        }
        Some(first)
    }
    fn expr(&mut self) -> Option<Expr> {
        let mut lhs = self.term()?;
        loop {
            let op = match self.peek() {
                Tok::Sym("+") => BinOp::Add,
                Tok::Sym("-") => BinOp::Sub,
                _ => return Some(lhs),
            };
            let sp = self.span();
            self.bump();
            let rhs = self.term()?;
            lhs = Expr::Bin(op, Box::new(lhs), Box::new(rhs), sp);
        }
    }
    fn term(&mut self) -> Option<Expr> {
        let mut lhs = self.factor()?;
        loop {
            let op = match self.peek() {
                Tok::Sym("*") => BinOp::Mul,
                Tok::Sym("/") => BinOp::Div,
                _ => return Some(lhs),
            };
            let sp = self.span();
            self.bump();
            let rhs = self.factor()?;
            lhs = Expr::Bin(op, Box::new(lhs), Box::new(rhs), sp);
        }
    }
    fn factor(&mut self) -> Option<Expr> {
        if self.depth >= MAX_DEPTH {
            let sp = self.span();
            self.err(sp, format!("expression nested more than {MAX_DEPTH} deep"));
            return None;
        }
        self.depth += 1;
        let r = self.factor_inner();
        self.depth -= 1;
        r
    }
    fn factor_inner(&mut self) -> Option<Expr> {
        let (t, sp) = self.bump();
        let e = match t {
            Tok::Int(i) => Expr::Int(i, sp),
            Tok::Float(f) => Expr::Float(f, sp),
            Tok::Str(p) => Expr::Str(p, sp),
            Tok::Sym("-") => Expr::Neg(Box::new(self.factor()?), sp),
            Tok::Sym("!") => Expr::Not(Box::new(self.factor()?), sp),
            Tok::Sym("(") => {
                let e = self.expr()?;
                self.expect_sym(")", "to close `(`")?;
                e
            }
            Tok::Word(parts) => match parts.as_slice() {
                [Part::Lit(s)] if s == "true" => Expr::Bool(true, sp),
                [Part::Lit(s)] if s == "false" => Expr::Bool(false, sp),
                [Part::Lit(s)] if s == "none" => Expr::None(sp),
                [Part::Lit(s)] if !s.contains('/') => Expr::Var(s.clone(), sp),
                // A name with `/` or `{…}` (`lane=cpu0/a`, `lane=l{l}`) is a name, not a
                // variable: its value is its text. (So division needs spaces: `hidden / 2`.)
                _ => Expr::Str(parts, sp),
            },
            other => {
                self.err(sp, format!("expected a value, found {}", describe(&other)));
                return None;
            }
        };
        if self.is_sym("[") {
            let isp = self.span();
            self.bump();
            let idx = self.expr()?;
            self.expect_sym("]", "to close `[`")?;
            return Some(Expr::Index(Box::new(e), Box::new(idx), isp));
        }
        Some(e)
    }

    fn block(&mut self) -> Vec<Stmt> {
        if self.depth >= MAX_DEPTH {
            let sp = self.span();
            self.err(sp, format!("blocks nested more than {MAX_DEPTH} deep"));
            self.skip_block();
            return Vec::new();
        }
        self.depth += 1;
        let r = self.block_inner();
        self.depth -= 1;
        r
    }
    fn block_inner(&mut self) -> Vec<Stmt> {
        let mut out = Vec::new();
        loop {
            match self.peek() {
                Tok::Newline => {
                    self.bump();
                }
                Tok::Sym("}") => {
                    self.bump();
                    return out;
                }
                Tok::Eof => {
                    let sp = self.span();
                    self.err(sp, "expected `}` to close the block, found the end of the file");
                    return out;
                }
                _ => {
                    if let Some(s) = self.stmt() {
                        out.push(s);
                    }
                }
            }
        }
    }

    fn stmt(&mut self) -> Option<Stmt> {
        let before = self.errors.len();
        let r = self.stmt_inner();
        if r.is_none() || self.errors.len() > before {
            // Recover: drop the rest of the statement's line.
            if !matches!(self.peek(), Tok::Sym("}")) {
                self.skip_line();
            }
            return None;
        }
        r
    }

    fn stmt_inner(&mut self) -> Option<Stmt> {
        let span = self.span();
        let (kw, _) = self.ident(
            "a statement (lane, process, default, set, node, edge, weight, input, output, place, budget, for, if)",
        )?;
        let s = match kw.as_str() {
            "lane" => {
                let name = self.name("a lane name")?;
                let kind = self.ident("a lane kind (cpu, io, gpu, nvme)")?;
                let attrs = self.attrs()?;
                Stmt::Lane { name, kind, attrs, span }
            }
            "process" => {
                let name = self.name("a process name")?;
                Stmt::Process { name, attrs: self.attrs()?, span }
            }
            "default" => Stmt::Default { attrs: self.attrs()?, span },
            "place" => Stmt::Place { attrs: self.attrs()?, span },
            "budget" => Stmt::Budget { attrs: self.attrs()?, span },
            "set" => {
                let name = self.ident("a variable name")?;
                self.expect_sym("=", "after the variable name")?;
                Stmt::Set { name, value: self.value()?, span }
            }
            "node" => {
                let name = self.name("a node name")?;
                self.expect_sym("=", "after the node name")?;
                let kind = self.ident("an operator kind")?;
                let attrs = self.attrs()?;
                Stmt::Node { name, kind, attrs, span }
            }
            "edge" => {
                let mut chain = vec![self.endpoint()?];
                while self.eat_sym("->") {
                    chain.push(self.endpoint()?);
                }
                if chain.len() < 2 {
                    let sp = self.span();
                    self.err(sp, format!("expected `->` and a second endpoint, found {}", describe(self.peek())));
                    return None;
                }
                let attrs = self.attrs()?;
                Stmt::Edge { chain, attrs, span }
            }
            "weight" => {
                let to = self.endpoint()?;
                self.expect_sym("=", "after the weight's port")?;
                let tensor = self.expr()?;
                let attrs = self.attrs()?;
                Stmt::Weight { to, tensor, attrs, span }
            }
            "input" => Stmt::Input { to: self.endpoint()?, span },
            "output" => Stmt::Output { from: self.endpoint()?, span },
            "for" => {
                let var = self.ident("a loop variable")?;
                let (w, wsp) = self.ident("`in`")?;
                if w != "in" {
                    self.err(wsp, format!("expected `in`, found `{w}`"));
                    return None;
                }
                let rsp = self.span();
                let from = self.expr()?;
                self.expect_sym("..", "in the loop range")?;
                let to = self.expr()?;
                self.expect_sym("{", "to open the loop body")?;
                let body = self.block();
                Stmt::For { var, range: Expr::Range(Box::new(from), Box::new(to), rsp), body, span }
            }
            "if" => {
                let cond = self.expr()?;
                self.expect_sym("{", "to open the `if` body")?;
                let then = self.block();
                let mut otherwise = Vec::new();
                if matches!(self.peek(), Tok::Word(p) if p == &[Part::Lit("else".into())]) {
                    self.bump();
                    self.expect_sym("{", "to open the `else` body")?;
                    otherwise = self.block();
                }
                Stmt::If { cond, then, otherwise, span }
            }
            other => {
                self.err(span, format!("unknown statement `{other}` (known: lane, process, default, set, node, edge, weight, input, output, place, budget, for, if)"));
                return None;
            }
        };
        self.end_of_line()?;
        Some(s)
    }
}

/// Parses a whole file. `Err` holds every syntax error found.
pub fn parse(text: &str) -> Result<File, Vec<Diagnostic>> {
    let mut errors = Vec::new();
    let toks = lex_at(text, 1, 1, &mut errors);
    let mut p = Parser::new(toks, &mut errors);
    while matches!(p.peek(), Tok::Newline) {
        p.bump();
    }
    let sp = p.span();
    let mut version = 0;
    match (p.peek().clone(), p.peek_at(1).clone()) {
        (Tok::Word(w), Tok::Int(v)) if w == [Part::Lit("weir".into())] => {
            p.bump();
            p.bump();
            version = v as u32;
            if v != VERSION as i64 {
                p.err(sp, format!("this is format version {v}; this weir reads version {VERSION}"));
            }
            p.end_of_line();
        }
        _ => p.err(sp, format!("a graph file starts with `weir {VERSION}` (the format version)")),
    }
    let mut stmts = Vec::new();
    loop {
        match p.peek() {
            Tok::Eof => break,
            Tok::Newline => {
                p.bump();
            }
            Tok::Sym("}") => {
                let sp = p.span();
                p.err(sp, "`}` without a matching `{`");
                p.bump();
            }
            _ => {
                if let Some(s) = p.stmt() {
                    stmts.push(s);
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(File { version, stmts })
    } else {
        errors.sort_by_key(|d| d.span);
        errors.dedup();
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_construct() {
        let f = parse(
            r#"weir 1
# a comment
lane compute cpu cores=0,1   # trailing comment
lane l{1+1} io core=1
default capacity=2 lane=compute
set half = hidden / 2
node embed = embedding vocab=vocab hidden=hidden
for l in 0..layers {
  node l{l}/norm = rmsnorm dim=hidden eps=1e-5 layer=l
  if !tied {
    weight l{l}/norm.weight = "model.layers.{l}.w"
  } else {
    place layers=0..2 lane=compute
  }
}
edge embed -> l0/norm.x -> out capacity=3
input embed.ids
output sampler.tokens
"#,
        )
        .unwrap();
        assert_eq!(f.version, 1);
        assert_eq!(f.stmts.len(), 9);
        let Stmt::For { body, .. } = &f.stmts[5] else { panic!() };
        assert_eq!(body.len(), 2);
        let Stmt::Edge { chain, attrs, .. } = &f.stmts[6] else { panic!() };
        assert_eq!(chain.len(), 3);
        assert_eq!(chain[1].port.as_ref().unwrap().0, "x");
        assert_eq!(attrs[0].key, "capacity");
    }

    #[test]
    fn reports_every_syntax_error_with_its_place() {
        let e = parse("weir 1\nnode a = \nedge a ->\nfrobnicate x\nnode b = add dim=\"x\n").unwrap_err();
        let msgs: Vec<String> = e.iter().map(|d| format!("{}: {}", d.span, d.message)).collect();
        assert!(msgs.iter().any(|m| m.starts_with("2:10: expected an operator kind")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.starts_with("3:10: expected a node name")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.starts_with("4:1: unknown statement `frobnicate`")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("unterminated string")), "{msgs:?}");
        assert!(parse("node a = add\n").unwrap_err()[0].message.contains("starts with `weir 1`"));
        assert!(parse("weir 2\n").unwrap_err()[0].message.contains("version 2"));
        assert!(parse("weir 1\nfor l in 0..2 {\nnode a = add dim=1\n").unwrap_err()[0]
            .message
            .contains("close the block"));
    }
}

#[cfg(test)]
mod limits {
    use super::*;

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = format!("weir 1\nset x = {}1{}\n", "(".repeat(10_000), ")".repeat(10_000));
        assert!(parse(&deep).unwrap_err()[0].message.contains("nested more than"));
        let blocks = format!("weir 1\n{}", "if true {\n".repeat(10_000));
        assert!(parse(&blocks).is_err());
        assert!(parse("weir 1\nnode a{b{c}} = add dim=1\n").unwrap_err()[0].message.contains("do not nest"));
    }
}
