#!/usr/bin/env python3
"""llama.cpp (through llama-cpp-python) on the same model as `weir bench`, for BENCHMARKS.md.

    python benches/peers/llamacpp_peer.py convert MODEL_DIR OUT.gguf --type f16|bf16|f32
    python benches/peers/llamacpp_peer.py bench OUT.gguf --threads 2 [--prompt-len 512] [--gen-len 32] [--batch B]

`convert` writes a Llama safetensors folder (as `weir synth` makes) as GGUF with numpy and
the `gguf` package only (no torch): the same weights, the byte-level BPE tokenizer, q/k rows
permuted to llama.cpp's rotary layout as its own converter does. `bench` times, like `weir
bench`, a prefill of random prompt ids and greedy decode steps after it, and prints one JSON
line; with `--batch B` (B > 1), B sequences at once through llama.cpp's own batch API (one
`llama_decode` for all prompts, then one per step with a token of every sequence), as `weir
bench --batch B` runs them. Needs `pip install llama-cpp-python gguf numpy`.
"""
import argparse
import json
import os
import random
import struct
import sys
import time

import numpy as np


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        raw = data[base + a : base + b]
        if t["dtype"] == "BF16":
            arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif t["dtype"] == "F16":
            arr = raw.view(np.float16).astype(np.float32)
        elif t["dtype"] == "F32":
            arr = raw.view(np.float32)
        else:
            sys.exit(f"{path}: tensor {name}: dtype {t['dtype']} not handled")
        out[name] = arr.reshape(t["shape"])
    return out


def permute(w, heads):
    # Hugging Face's rotate-half rows → llama.cpp's interleaved pairs (convert_hf_to_gguf.py).
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(args):
    import gguf

    cfg = json.load(open(os.path.join(args.model, "config.json")))
    tok = json.load(open(os.path.join(args.model, "tokenizer.json")))
    tensors = read_safetensors(os.path.join(args.model, "model.safetensors"))
    w = gguf.GGUFWriter(args.out, "llama")
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(cfg.get("head_dim", h // heads))
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    ftype = {"f32": 0, "f16": 1, "bf16": 32}[args.type]
    w.add_file_type(ftype)
    vocab = tok["model"]["vocab"]
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    types = [1] * len(tokens)
    for a in tok.get("added_tokens", []):
        tokens[a["id"]] = a["content"]
        types[a["id"]] = 3
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    merges = tok["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(cfg.get("bos_token_id", 1))
    w.add_eos_token_id(cfg.get("eos_token_id", 2))
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for name, arr in tensors.items():
        if name in names:
            out = names[name]
        else:
            parts = name.split(".")  # model.layers.N.rest
            out = f"blk.{parts[2]}." + per_layer[".".join(parts[3:])]
        if out.endswith("attn_q.weight"):
            arr = permute(arr, heads)
        elif out.endswith("attn_k.weight"):
            arr = permute(arr, kv)
        if arr.ndim == 1 or args.type == "f32":
            w.add_tensor(out, np.ascontiguousarray(arr, dtype=np.float32))
        elif args.type == "f16":
            w.add_tensor(out, np.ascontiguousarray(arr, dtype=np.float16))
        else:
            bits = (np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
            w.add_tensor(out, bits, raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def bench(args):
    import llama_cpp
    from llama_cpp import Llama

    n_ctx = args.prompt_len + args.gen_len + 16
    llm = Llama(
        model_path=args.gguf,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=n_ctx,
        n_batch=n_ctx,  # the logits array has n_batch rows: one per position
        n_ubatch=max(args.prompt_len, 1),
        verbose=False,
    )
    rng = random.Random(args.seed)
    vocab = llm.n_vocab()
    # Warm up (weights paged in, threads started), as `weir bench` does.
    llm.eval([1, 2, 3])
    llm.reset()
    prompt = [rng.randrange(3, vocab) for _ in range(args.prompt_len)]
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - t0
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t0 = time.perf_counter()
    for _ in range(args.gen_len - 1):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    decode_s = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "engine": "llama.cpp",
                "llama_cpp_python": llama_cpp.__version__,
                "gguf": os.path.basename(args.gguf),
                "threads": args.threads,
                "prompt_len": args.prompt_len,
                "gen_len": args.gen_len,
                "prefill_tokens_per_s": args.prompt_len / prefill_s,
                "decode_tokens_per_s": (args.gen_len - 1) / decode_s,
            }
        )
    )


def bench_batch(args):
    import ctypes

    import llama_cpp as L

    B, P, G = args.batch, args.prompt_len, args.gen_len
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(args.gguf.encode(), mp)
    if not model:
        sys.exit(f"{args.gguf}: llama.cpp could not load it")
    cp = L.llama_context_default_params()
    cp.n_ctx = B * (P + G + 16)
    cp.n_batch = B * P
    cp.n_ubatch = min(B * P, 512)
    cp.n_seq_max = B
    cp.n_threads = cp.n_threads_batch = args.threads
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        sys.exit("llama.cpp could not make a context for this batch")
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(B * P, 0, B)

    def run(tokens):  # [(token, position, sequence, wants logits)]
        batch.n_tokens = len(tokens)
        for i, (tok, pos, seq, out) in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, out
            batch.seq_id[i][0] = seq
        if L.llama_decode(ctx, batch) != 0:
            sys.exit("llama_decode failed")
        rows = [i for i, t in enumerate(tokens) if t[3]]
        return [
            int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(vocab,)))) for i in rows
        ]

    rng = random.Random(args.seed)
    run([(1, 0, 0, True), (2, 1, 0, True)])  # warm up
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    prompts = [[rng.randrange(3, vocab) for _ in range(P)] for _ in range(B)]
    t0 = time.perf_counter()
    last = run([(t, j, s, j == P - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)])
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for step in range(G - 1):
        last = run([(last[s], P + step, s, True) for s in range(B)])
    decode_s = time.perf_counter() - t0
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    print(
        json.dumps(
            {
                "engine": "llama.cpp",
                "llama_cpp_python": L.__version__,
                "gguf": os.path.basename(args.gguf),
                "threads": args.threads,
                "batch": B,
                "prompt_len": P,
                "gen_len": G,
                "prefill_tokens_per_s": B * P / prefill_s,
                "decode_tokens_per_s": B * (G - 1) / decode_s,
            }
        )
    )


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("model")
    c.add_argument("out")
    c.add_argument("--type", choices=["f32", "f16", "bf16"], default="f16")
    b = sub.add_parser("bench")
    b.add_argument("gguf")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--prompt-len", type=int, default=512)
    b.add_argument("--gen-len", type=int, default=32)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--batch", type=int, default=1)
    a = p.parse_args()
    if a.cmd == "bench" and a.batch < 1:
        p.error(f"--batch {a.batch}: must be at least 1")
    if a.cmd == "convert":
        convert(a)
    elif a.batch > 1:
        bench_batch(a)
    else:
        bench(a)


if __name__ == "__main__":
    main()
