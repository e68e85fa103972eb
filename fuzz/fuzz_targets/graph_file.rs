//! Fuzzes the graph-file parser and checker: any text must give a graph or a report, never a
//! panic, a hang or a stack overflow. Run (stable toolchain):
//!   RUSTC_BOOTSTRAP=1 cargo fuzz run graph_file -- -max_total_time=600
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use weir_graphs::format::{load_str, model_vars, print::print, CheckInput, Value};

fn vars() -> &'static Vec<(String, Value)> {
    static V: OnceLock<Vec<(String, Value)>> = OnceLock::new();
    V.get_or_init(|| {
        let cfg = serde_json::json!({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 8, "intermediate_size": 12,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 16,
            "max_position_embeddings": 32, "tie_word_embeddings": true});
        let c = weir_graphs::ModelConfig::from_value(std::path::Path::new("config.json"), &cfg).expect("config");
        model_vars(&c, 1, weir_operators::KvType::F32)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let input = CheckInput { vars: vars().clone(), weights: None, cpus: vec![0, 1] };
    if let Ok(g) = load_str(text, "fuzz.weir", &input) {
        // Whatever checks must also round-trip.
        let shown = print(&g);
        let again = load_str(&shown, "shown.weir", &CheckInput { vars: vec![], weights: None, cpus: vec![0, 1] }).expect("printed graph must parse");
        assert_eq!(again, g);
    }
});
