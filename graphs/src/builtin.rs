//! The built-in architectures, as graph files shipped in the binary. They go through the same
//! parser and checker as a user's file.

use crate::config::Architecture;

/// `graphs/llama.weir`: Llama, Mistral and Qwen2.
pub const LLAMA: &str = include_str!("../llama.weir");

/// `graphs/mixtral.weir`: Mixtral.
pub const MIXTRAL: &str = include_str!("../mixtral.weir");

/// `graphs/qwen2_moe.weir`: Qwen2-MoE.
pub const QWEN2_MOE: &str = include_str!("../qwen2_moe.weir");

/// The built-in graph file for an architecture: (file name, text).
pub fn for_architecture(a: Architecture) -> (&'static str, &'static str) {
    match a {
        Architecture::Llama | Architecture::Mistral | Architecture::Qwen2 => ("graphs/llama.weir", LLAMA),
        Architecture::Mixtral => ("graphs/mixtral.weir", MIXTRAL),
        Architecture::Qwen2Moe => ("graphs/qwen2_moe.weir", QWEN2_MOE),
    }
}
