//! Graph definition files: the text format users write, in two stages.
//!
//! 1. [`syntax`] — text → statements with source spans (every syntax error reported).
//! 2. [`check`] — statements → a checked [`Graph`] (every semantic error reported): `expand`
//!    expands loops and conditions and evaluates expressions, `check` resolves lanes, nodes
//!    and edges, `weights` the weights, expert stores and transfers.
//!
//! [`print`](mod@print) writes a graph back as text (`weir graph show`); parsing that text gives the same
//! graph. `docs/graph-format.md` is the reference.

pub mod check;
mod expand;
mod lanes;
mod lexer;
pub mod print;
pub mod syntax;
mod weights;

pub use check::CheckInput;
pub use expand::{model_vars, Value};
pub use syntax::{Diagnostic, Span};

use crate::graph::Graph;

/// Every problem found in one graph file, printed as `file:line:col: message` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub file: String,
    pub diagnostics: Vec<Diagnostic>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}:{}: {}", self.file, d.span.line, d.span.col, d.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for Report {}

/// Parses and checks a graph file's text; `file` names it in messages.
pub fn load_str(text: &str, file: &str, input: &CheckInput) -> Result<Graph, Report> {
    let report = |diagnostics| Report { file: file.to_string(), diagnostics };
    let parsed = syntax::parse(text).map_err(report)?;
    check::check(&parsed, input).map_err(report)
}
