"""Tiny random transformers Llama checkpoints and comparison helpers shared by the model and mesh tests."""

from pathlib import Path

import jax
import numpy as np
import torch
import transformers

import sharding

# Small enough for a 2-core CPU; H=8, K=4 and V=256 divide tensor=4 and D=64 divides fsdp=8.
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    initializer_range=0.1,  # larger than real models so attention is far from uniform
    bos_token_id=1,
    eos_token_id=[2, 3],
)


# transformers' config class names of each family model.py reads
FAMILY_CLASSES = dict(
    llama="Llama", mistral="Mistral", qwen2="Qwen2", qwen3="Qwen3", gemma2="Gemma2", gemma3_text="Gemma3Text"
)


def make_hf_checkpoint(directory: Path, seed: int, max_shard_size=None, family="llama", **overrides):
    """A random f32 LlamaForCausalLM (or the family's: Qwen2ForCausalLM, Gemma3ForCausalLM, ...) saved with
    save_pretrained; returns the torch model (eval mode)."""
    torch.manual_seed(seed)
    name = FAMILY_CLASSES[family]
    config = getattr(transformers, f"{name}Config")(**{**TINY, **overrides}, attn_implementation="eager")
    hf_model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # norm scales are ones and biases zeros at init: randomize them so a mix-up shows
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    hf_model.save_pretrained(directory, **kwargs)
    return hf_model


def hf_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def single_device_mesh():
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
