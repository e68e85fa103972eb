//! The graph-format reference page and the example graph files are checked, so they stay true.

mod common;
use common::*;
use weir::{Engine, EngineOptions, Model, Request};

fn blocks(doc: &str, lang: &str) -> Vec<(usize, String)> {
    let fence = format!("```{lang}\n");
    let mut out = Vec::new();
    let mut rest = doc;
    let mut offset = 0;
    while let Some(i) = rest.find(&fence) {
        let start = i + fence.len();
        let end = rest[start..].find("```").map(|e| start + e).expect("unclosed block");
        let line = doc[..offset + i].lines().count() + 1;
        out.push((line, rest[start..end].to_string()));
        offset += end;
        rest = &rest[end..];
    }
    out
}

#[test]
fn every_complete_example_in_the_reference_checks_and_every_error_example_gives_its_messages() {
    let doc =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/graph-format.md")).unwrap();
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let complete = blocks(&doc, "weir");
    assert!(complete.len() >= 2);
    for (line, text) in &complete {
        // The lane fragment is documented as incomplete; the others must check.
        let r = model.expand(Some((text, "doc.weir")), 1, weir::KvType::F32);
        if text.lines().count() <= 3 {
            assert!(r.is_err(), "docs line {line}: a fragment unexpectedly checked");
            continue;
        }
        if let Err(e) = r {
            panic!("docs/graph-format.md line {line}: example does not check:\n{e}");
        }
    }
    let errors = blocks(&doc, "weir-error");
    let outputs = blocks(&doc, "text");
    assert_eq!(errors.len(), 1);
    let (line, text) = &errors[0];
    let want = &outputs.iter().find(|(l, _)| l > line).expect("the messages follow the example").1;
    match model.expand(Some((text, "broken.weir")), 1, weir::KvType::F32) {
        Err(weir::Error::Graph(r)) => assert_eq!(r.to_string().trim(), want.trim()),
        other => panic!("docs line {line}: expected a report, got {:?}", other.map(|_| ())),
    }
    // Fragments parse (they are checked in context by the example files).
    for (line, text) in blocks(&doc, "weir-fragment") {
        let wrapped = format!("weir 1\n{text}");
        if let Err(e) = weir_graphs::format::syntax::parse(&wrapped) {
            panic!("docs line {line}: fragment does not parse: {e:?}");
        }
    }
}

#[test]
fn the_example_graph_files_run() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/graphs");
    let g = golden("tiny-llama");
    for name in ["no-layers.weir", "two-lanes.weir"] {
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        let engine =
            Engine::new(&model, EngineOptions { threads: 1, graph: Some((text, name.into())), ..Default::default() })
                .unwrap();
        let p = &g["prompts"][0];
        let out = engine.generate(Request { stop_at_eos: false, ..Request::greedy(ids(&p["input_ids"]), 24) }).unwrap();
        assert_eq!(out.tokens.len(), 24);
        if name == "two-lanes.weir" {
            // The same model, placed differently: the same tokens.
            assert_eq!(out.tokens, ids(&p["greedy"]["new_ids"]));
        }
        engine.shutdown().unwrap();
    }
}
