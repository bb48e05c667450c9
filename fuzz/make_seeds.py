#!/usr/bin/env python3
"""Writes the small valid inputs the fuzz corpora start from (stdlib only).

The model is a micro Llama (hidden 4, one layer, vocabulary 4) so each file
stays under a few KB; `fuzz_targets/common.rs` holds the same shapes.
Run from fuzz/: python3 make_seeds.py
"""
import json
import os
import struct

H, FFN, VOCAB = 4, 4, 4
HF_TENSORS = {
    "model.embed_tokens.weight": [VOCAB, H],
    "model.layers.0.input_layernorm.weight": [H],
    "model.layers.0.post_attention_layernorm.weight": [H],
    "model.layers.0.self_attn.q_proj.weight": [H, H],
    "model.layers.0.self_attn.k_proj.weight": [H, H],
    "model.layers.0.self_attn.v_proj.weight": [H, H],
    "model.layers.0.self_attn.o_proj.weight": [H, H],
    "model.layers.0.mlp.gate_proj.weight": [FFN, H],
    "model.layers.0.mlp.up_proj.weight": [FFN, H],
    "model.layers.0.mlp.down_proj.weight": [H, FFN],
    "model.norm.weight": [H],
    "lm_head.weight": [VOCAB, H],
}
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf):
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    tail = hf.split(".", 3)[3]
    return "blk.0." + GGUF_NAMES[tail]


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def values(n, salt):
    return [((i * 7 + salt) % 11 - 5) / 10.0 for i in range(n)]


# ---- GGUF ----
def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gvalue(v):
    kind, x = v
    if kind == "u32":
        return struct.pack("<I", 4) + struct.pack("<I", x)
    if kind == "f32":
        return struct.pack("<I", 6) + struct.pack("<f", x)
    if kind == "bool":
        return struct.pack("<I", 7) + struct.pack("<B", x)
    if kind == "str":
        return struct.pack("<I", 8) + gstr(x)
    if kind == "strs":
        return struct.pack("<IIQ", 9, 8, len(x)) + b"".join(gstr(s) for s in x)
    if kind == "u32s":
        return struct.pack("<IIQ", 9, 4, len(x)) + b"".join(struct.pack("<I", i) for i in x)
    raise ValueError(kind)


def gguf(metadata, tensors, dtype=0, alignment=32):
    """tensors: [(name, shape, data bytes)]; dtype 0 = f32, 1 = f16."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for k, v in metadata:
        out += gstr(k) + gvalue(v)
    offset = 0
    blobs = []
    for name, shape, data in tensors:
        out += gstr(name) + struct.pack("<I", len(shape))
        out += b"".join(struct.pack("<Q", d) for d in reversed(shape))
        out += struct.pack("<IQ", dtype, offset)
        pad = (-len(data)) % alignment
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
    out += b"\0" * ((-len(out)) % alignment)
    return out + b"".join(blobs)


def llama_metadata(arch="llama", tokenizer=True):
    md = [
        ("general.architecture", ("str", arch)),
        ("general.name", ("str", "micro")),
        (f"{arch}.embedding_length", ("u32", H)),
        (f"{arch}.feed_forward_length", ("u32", FFN)),
        (f"{arch}.block_count", ("u32", 1)),
        (f"{arch}.attention.head_count", ("u32", 1)),
        (f"{arch}.attention.head_count_kv", ("u32", 1)),
        (f"{arch}.context_length", ("u32", 16)),
        (f"{arch}.vocab_size", ("u32", VOCAB)),
        (f"{arch}.rope.freq_base", ("f32", 10000.0)),
        (f"{arch}.attention.layer_norm_rms_epsilon", ("f32", 1e-5)),
    ]
    if tokenizer:
        md += [
            ("tokenizer.ggml.model", ("str", "gpt2")),
            ("tokenizer.ggml.pre", ("str", "smollm")),
            ("tokenizer.ggml.tokens", ("strs", ["<s>", "a", "b", "ab"])),
            ("tokenizer.ggml.merges", ("strs", ["a b"])),
            ("tokenizer.ggml.token_type", ("u32s", [3, 1, 1, 1])),
            ("tokenizer.ggml.bos_token_id", ("u32", 0)),
            ("tokenizer.ggml.add_bos_token", ("bool", 1)),
            ("tokenizer.chat_template", ("str", "{{ bos_token }}{{ messages[0].content }}")),
        ]
    return md


def f32_tensors(tie=False):
    out = []
    for i, (hf, shape) in enumerate(HF_TENSORS.items()):
        if tie and hf == "lm_head.weight":
            continue
        data = struct.pack(f"<{numel(shape)}f", *values(numel(shape), i))
        out.append((gguf_name(hf), shape, data))
    return out


def f16_tensors():
    return [(n, s, struct.pack(f"<{numel(s)}e", *values(numel(s), i)))
            for i, (n, s, _) in enumerate(f32_tensors())]


# ---- safetensors ----
ST_DTYPES = {"F32": ("f", 4), "F16": ("e", 2), "F64": ("d", 8)}


def safetensors(tensors, dtype="F32"):
    fmt, size = ST_DTYPES[dtype]
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for i, (name, shape) in enumerate(tensors.items()):
        data = struct.pack(f"<{numel(shape)}{fmt}", *values(numel(shape), i))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def write(folder, name, data):
    os.makedirs(os.path.join("seeds", folder), exist_ok=True)
    with open(os.path.join("seeds", folder, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


write("gguf", "micro-llama-f32.gguf", gguf(llama_metadata(), f32_tensors()))
write("gguf", "micro-llama-f16-tied.gguf", gguf(llama_metadata(), f16_tensors()[:-1], dtype=1))
write("gguf", "micro-qwen2-no-tokenizer.gguf", gguf(llama_metadata("qwen2", False), f32_tensors(True)))
deci = llama_metadata("deci", False)
deci = [(k, ("u32s", [0]) if k == "deci.attention.head_count" else v) for k, v in deci]
write("gguf", "micro-deci-noop-attn.gguf",
      gguf(deci, [t for t in f32_tensors() if "attn_" not in t[0] or "norm" in t[0]]))

micro_config = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
    "intermediate_size": FFN, "num_hidden_layers": 1, "num_attention_heads": 1,
    "num_key_value_heads": 1, "vocab_size": VOCAB, "max_position_embeddings": 16,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": [1, 2],
}
write("safetensors", "micro-llama-f32.safetensors", safetensors(HF_TENSORS))
write("safetensors", "micro-llama-f16.safetensors", safetensors(HF_TENSORS, "F16"))
write("safetensors", "micro-llama-f64.safetensors", safetensors(HF_TENSORS, "F64"))

write("hf_config", "micro-llama.json", json.dumps(micro_config, indent=1))
write("hf_config", "micro-mistral.json", json.dumps(dict(
    micro_config, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=8)))
llama3 = dict(micro_config, rope_scaling={"rope_type": "llama3", "factor": 8.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8})
write("hf_config", "micro-llama3-rope.json", json.dumps(llama3))
deci_cfg = dict(micro_config, architectures=["DeciLMForCausalLM"], model_type="nemotron-nas",
                block_configs=[{"attention": {"no_op": True, "n_heads_in_group": 1},
                                "ffn": {"no_op": False, "ffn_mult": 3.0}}])
del deci_cfg["intermediate_size"]
# Not a seed (seeds must load): ffn_mult 3.0 rounds the FFN up to 256 wide, the
# micro weights are 4 wide, and a width that disagrees with the config is
# refused by name. Kept in the corpus as corpus/hf_config/micro-deci-ffn-mult.json.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "corpus/hf_config/micro-deci-ffn-mult.json"), "w") as f:
    f.write(json.dumps(deci_cfg))

plan = {
    "format": "scalpel-plan", "version": 1,
    "model": {"name": "micro", "architecture": "llama", "n_layers": 4, "content_hash": "ab12"},
    "skip": ["attn.1", "mlp.3"],
    "scales": [{"b_att": 1.0, "s_att": 1.0, "b_mlp": 0.5, "s_mlp": 1.0}] * 4,
    "metrics": {"ppl": 12.5}, "provenance": {"tool": "scalpel 0.1.0", "command": "search"},
}
write("plan", "v1-skips-and-scales.json", json.dumps(plan, indent=2))
write("plan", "v1-base.json", json.dumps(dict(plan, skip=[], scales=None)))
write("plan", "v1-blocks-names.json", json.dumps(dict(plan, skip=["blocks.2.attn", "ffn.0"])))
