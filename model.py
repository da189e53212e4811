"""Llama-style decoders as pure functions over a pytree of jax.Arrays, with Hugging Face weights in and out.

Here: `LlamaConfig` from a transformers config.json, one table declaring every weight (axes, mesh
placement, initializer, transformers' name), sharded random init, `forward` -> final normed hidden states
(rows of one sequence, or of several, each attending within its views: prefix sharing and packing), LoRA
adapters declared beside their weights (merged for export, or saved as a PEFT adapter) on a frozen base that
may be quantised (QLoRA: NF4 or int8, as bitsandbytes), loading safetensors straight into shards, and an
export that `transformers` loads unchanged. It reproduces
`LlamaForCausalLM` checkpoints: Llama 2 and TinyLlama (rope_type default), Llama 3, 3.1 and 3.2
(rope_type llama3), grouped-query and multi-query attention and tied embeddings; and the families that are
the same block with small additions (_FAMILIES): Mistral (v0.1's sliding window), Qwen2 / Qwen2.5 (q, k, v
biases; windows with use_sliding_window), Qwen3 (an RMSNorm over each head of q and k), Gemma 2 (1 + weight
norms, a scaled embedding, GeGLU, sandwich norms, soft caps on scores and logits, alternating sliding and
global layers) and Gemma 3 text (q and k norms, a local RoPE base for its sliding layers), exported as the
same family. A sliding layer attends to its last sliding_window tokens (layer_types: each layer's kind).
Attention runs whole (XLA: a row's scores at once), chunked (FlashAttention-2 written in jnp: a block of
keys at a time, for long rows and rows split over a context axis) or in cuDNN's fused kernel (GPU).
Anything in a config.json it could not reproduce exactly is refused in one line: other model types (MoE,
Gemma 1, Gemma 3 with its vision tower), bidirectional attention, other rope types, partial rotary
embeddings, other biases, other activations.
Left out on purpose: KV caches and generation, dropout, quantization other than a frozen base's (QLoRA).

Conventions
  Mesh axes (sharding.py): data = replicas, fsdp = batch split, context = a row's tokens split between
  blocks (attention gathers its keys and values whole), tensor = heads and MLP hidden split Megatron-style.
  Params and optimizer state are sharded over fsdp x context (FSDP, gathered one layer at a time).
  Dimension letters: B batch, T sequence, D model, H query heads, K kv heads, Q head dim,
  F MLP hidden, V vocab, L layers (R: a LoRA adapter's rank). Einsum subscripts use the same letters in
  lower case: forward writes each projection out, e.g. "btd,dhq->bthq" for wq, on the axes the weight
  table declares (tests/test_model.py holds the two equal).
  `arch` is always a LlamaConfig (the model's shape); params are f32, layers stacked on a leading L
  axis; `_weights` lists each one's axes and spec.
  Activations between blocks are [B, T, D] in the compute dtype, B split over ("data", "fsdp") and T over
  "context" (BATCH); attention gathers a row's keys and values whole (_whole_row).

What the DPO step gets (call inside `jax.set_mesh(mesh)`, under jit):
  forward(...)            [B, T, D] in the compute dtype, sharded P(("data", "fsdp"), "context", None).
  lm_head_weight(params)  [D, V] in the params' dtype, sharded P(FSDP, "tensor") (also when tied:
                          embed.T). Gather it over FSDP before the matmul, e.g.
                          reshard(w.astype(dt), P(None, "tensor")); the logits then come out
                          P(("data", "fsdp"), None, "tensor"), vocab split, as in `logits` below.
  dtype_of(name)          the compute dtype a setting names ("auto": f32 on CPU, bf16 on accelerators).
  token_logps(...)        the targets' log-probs from forward's hidden states and that gathered head, fused
                          and chunked over the vocabulary: no [B, T, V] logits (and TokenStats for TRL's
                          metrics).
"""

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, reshard
from jax.sharding import PartitionSpec as P
from safetensors import safe_open

import sharding

BATCH = P(sharding.BATCH_AXES, "context", None)  # [B, T, D] between blocks: tokens split over context


# --- config -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's rope frequency rescaling (rope_type "llama3")."""

    rope_type: ClassVar[str] = "llama3"
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class LinearRopeScaling:
    """Every frequency divided by `factor` (rope_type "linear"): Gemma 3's global layers, 4B and up."""

    rope_type: ClassVar[str] = "linear"
    factor: float


# transformers' names for the config fields it spells differently.
_HF_KEYS = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "local_rope_theta": "rope_local_base_freq",
}


# The families read: what their config.json must hold (a key that is absent means the value shown), and
# what an export writes. Each is Llama's block; what a family adds is a property below and a weight of _LAYER.
_GEMMA = ("gemma2", "gemma3_text")
_SILU, _GEGLU = dict(hidden_act="silu"), dict(hidden_activation="gelu_pytorch_tanh", attention_bias=False)
_FAMILIES = {
    "llama": dict(architectures=["LlamaForCausalLM"], **_SILU, attention_bias=False, mlp_bias=False),
    "mistral": dict(architectures=["MistralForCausalLM"], **_SILU),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], **_SILU),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], **_SILU, attention_bias=False),
    "gemma2": dict(architectures=["Gemma2ForCausalLM"], **_GEGLU),
    "gemma3_text": dict(architectures=["Gemma3ForCausalLM"], **_GEGLU),
}
# What an absent key means where a family's transformers config differs from Llama's.
_QWEN_DEFAULTS = dict(use_sliding_window=False, sliding_window=4096, max_window_layers=28)
_GEMMA_DEFAULTS = dict(head_dim=256, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096)
_DEFAULTS = {
    "mistral": dict(sliding_window=4096),
    "qwen2": _QWEN_DEFAULTS,
    "qwen3": _QWEN_DEFAULTS,
    "gemma2": dict(**_GEMMA_DEFAULTS, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(
        **_GEMMA_DEFAULTS, rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=6
    ),
}
# Our fields that only some families' config.json holds (read and exported for those alone).
_FIELDS_OF = {
    "sliding_window": ("mistral", "qwen2", "qwen3", *_GEMMA),
    "layer_types": ("qwen2", "qwen3", *_GEMMA),
    "query_pre_attn_scalar": _GEMMA,
    "attn_logit_softcapping": _GEMMA,
    "final_logit_softcapping": _GEMMA,
    "local_rope_theta": ("gemma3_text",),
}
SLIDING, GLOBAL = "sliding_attention", "full_attention"  # transformers' layer_types


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # H
    num_kv_heads: int  # K (grouped-query attention: H // K query heads share one kv head)
    head_dim: int  # Q
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: Llama3RopeScaling | LinearRopeScaling | None = None
    tie_word_embeddings: bool = False  # Llama 3.2 1B/3B: the LM head is embed.T
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    initializer_range: float = 0.02  # std of the normal init of every matrix (as transformers)
    model_type: str = "llama"  # the family (_FAMILIES): its weight names, and what it adds to Llama's block
    sliding_window: int | None = None  # a sliding layer sees the last sliding_window tokens, itself included
    layer_types: tuple[str, ...] = ()  # each layer's SLIDING or GLOBAL (transformers' names); (): all global
    query_pre_attn_scalar: float | None = None  # Gemma: scores are scaled by its -1/2 power (else head_dim's)
    attn_logit_softcapping: float | None = None  # Gemma 2: scores become cap * tanh(scores / cap) (softcap)
    final_logit_softcapping: float | None = None  # Gemma 2: the same on the LM head's logits
    local_rope_theta: float | None = None  # Gemma 3: sliding layers' RoPE base, unscaled (else rope_theta)

    def __post_init__(self):
        sizes = "vocab_size hidden_size intermediate_size num_layers num_heads num_kv_heads head_dim".split()
        for name in sizes:
            value = getattr(self, name)  # a config.json holds anything: None, "4096", -1, 0
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} {value!r} is not a positive whole number")
        if self.model_type not in _FAMILIES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {list(_FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        types = self.layer_types
        if types and (len(types) != self.num_layers or not set(types) <= {SLIDING, GLOBAL}):
            raise ValueError(f"layer_types {list(types)} is not {SLIDING} or {GLOBAL} for each layer")
        scales = "query_pre_attn_scalar attn_logit_softcapping final_logit_softcapping local_rope_theta"
        for name in scales.split() + (["sliding_window"] if any(self.sliding_layers) else []):
            value = getattr(self, name)  # None: not used
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
            ):
                raise ValueError(f"{name} {value!r} is not a positive number")

    @property
    def sliding_layers(self) -> tuple[bool, ...]:  # per layer: attends within its window (layer_types)
        return tuple(kind == SLIDING for kind in self.layer_types) or (False,) * self.num_layers

    @property
    def qkv_bias(self) -> bool:  # Qwen2 / Qwen2.5: q, k and v projections with a bias
        return self.model_type == "qwen2"

    @property
    def qk_norm(self) -> bool:  # Qwen3, Gemma 3: an RMSNorm over each head of q and of k, before RoPE
        return self.model_type in ("qwen3", "gemma3_text")

    @property
    def gemma(self) -> bool:
        """Gemma 2 and 3: RMSNorm scales by 1 + weight, the embedding is multiplied by sqrt(D), the MLP is
        GeGLU (tanh GELU), and attention's and the MLP's outputs are normed too (sandwich norms)."""
        return self.model_type in _GEMMA

    @property
    def num_matmul_params(self) -> int:
        """Weights used in matmuls (for MFU): all but the embedding lookup and the norm scales; the LM
        head counts, also when tied."""
        D, F, V, Q = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attention = D * Q * (2 * self.num_heads + 2 * self.num_kv_heads)
        return self.num_layers * (attention + 3 * D * F) + D * V

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        def refuse(key, value):
            families = ", ".join(_FAMILIES)
            raise ValueError(
                f"config.json has {key}={value!r}, which this code ({families}) cannot reproduce"
            )

        family = hf.get("model_type", "llama")
        if family not in _FAMILIES:  # MoE (mixtral, qwen3_moe), Gemma 1, Gemma 3 with its vision tower, ...
            refuse("model_type", family)
        hf = _DEFAULTS.get(family, {}) | hf
        for key, value in _FAMILIES[family].items():
            if hf.get(key) not in (None, value):
                refuse(key, hf[key])
        if hf.get("use_bidirectional_attention"):  # EmbeddingGemma: an encoder, not a causal LM
            refuse("use_bidirectional_attention", hf["use_bidirectional_attention"])
        rope_theta, scaling, local_rope_theta = _rope_from_hf(hf, family, refuse)
        sliding_window, layer_types = _windows_from_hf(hf, family)
        gemma = ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping")
        eos, heads = hf.get("eos_token_id"), hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or (hf["hidden_size"] // heads if heads else 0),  # 0: refused
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=() if eos is None else tuple(eos) if isinstance(eos, list) else (eos,),
            pad_token_id=hf.get("pad_token_id"),
            initializer_range=hf.get("initializer_range", 0.02),
            model_type=family,
            sliding_window=sliding_window,
            layer_types=layer_types,
            local_rope_theta=local_rope_theta,
            **{key: hf.get(key) for key in gemma if family in _FIELDS_OF[key]},
        )

    def to_hf(self, torch_dtype: str = "bfloat16") -> dict:
        s = self.rope_scaling
        scaling = {} if s is None else {"rope_type": s.rope_type, **vars(s)}
        eos = list(self.eos_token_id)
        hf = dict(use_cache=True, dtype=torch_dtype, torch_dtype=torch_dtype)
        # Every field under transformers' name for it, those of some families only there (_FIELDS_OF);
        # eos_token_id, rope_scaling and the layer types are respelled below.
        mine = lambda k: self.model_type in _FIELDS_OF.get(k, [self.model_type])
        hf |= {_HF_KEYS.get(k, k): v for k, v in vars(self).items() if mine(k)} | _FAMILIES[self.model_type]
        if self.model_type == "qwen2" and self.head_dim * self.num_heads == self.hidden_size:
            del hf["head_dim"]  # Qwen2's config has none (its modeling reads one when given)
        hf["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
        # transformers 5 reads rope_parameters; 4.x reads rope_theta and rope_scaling, which 5 also
        # accepts (rope_scaling first): both spell the same values.
        # A scaling's rope_type, when there is one, replaces the default.
        hf["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta, **scaling}
        hf["rope_scaling"] = scaling or None
        if self.local_rope_theta is not None:  # Gemma 3 in transformers 5: rope_parameters per layer type
            local = {"rope_type": "default", "rope_theta": self.local_rope_theta}
            hf["rope_parameters"] = {GLOBAL: hf["rope_parameters"], SLIDING: local}
        if mine("layer_types"):
            hf["layer_types"] = [SLIDING if sliding else GLOBAL for sliding in self.sliding_layers]
        if self.model_type in ("qwen2", "qwen3"):  # Qwen's window: on from layer max_window_layers
            hf["use_sliding_window"] = any(self.sliding_layers)
            if any(self.sliding_layers):
                hf["max_window_layers"] = self.sliding_layers.index(True)
        return hf


def _rope_from_hf(hf: dict, family: str, refuse) -> tuple:
    """(rope_theta, rope_scaling, local_rope_theta) of a config.json. The Hub's Llama 3.x config.json has
    rope_theta and rope_scaling at the top level, Gemma 3's also rope_local_base_freq; transformers 5 writes
    rope_parameters = {rope_type, rope_theta, scaling...}, for Gemma 3 one per layer type. Same precedence as
    transformers 5."""
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    local = dict(rope.pop(SLIDING, None) or {})
    rope = dict(rope.pop(GLOBAL, rope))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    partial_rotary_factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial_rotary_factor != 1.0:
        refuse("partial_rotary_factor", partial_rotary_factor)
    if rope_type not in (("default", "linear") if family == "gemma3_text" else ("default", "llama3")):
        refuse("rope_type", rope_type)
    if local.get("rope_type", "default") != "default":
        refuse("rope_type", local["rope_type"])
    scaling = None
    if rope_type == "llama3":
        factors = (float(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        original = rope.get("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
        scaling = Llama3RopeScaling(*factors, int(original))
    if rope_type == "linear":
        scaling = LinearRopeScaling(float(rope["factor"]))
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    local_theta = local.get("rope_theta", hf.get("rope_local_base_freq"))
    return theta, scaling, None if family != "gemma3_text" else float(local_theta)


def _windows_from_hf(hf: dict, family: str) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window, layer_types) as transformers reads them: Mistral's window is every layer's; Qwen's is
    on with use_sliding_window, from layer max_window_layers on; Gemma 2 alternates sliding and global layers,
    Gemma 3 has a global one every sliding_window_pattern; a layer_types list (Qwen, Gemma) names each layer.
    No window: every layer is global."""
    layers, window = hf["num_hidden_layers"], hf.get("sliding_window")
    if family == "llama" or window is None or not hf.get("use_sliding_window", True):
        return None, ()
    if not isinstance(layers, int):
        return window, ()  # refused as num_layers
    if family in ("mistral", "qwen2", "qwen3"):
        first = hf["max_window_layers"] if family != "mistral" else 0
        sliding = [i >= first for i in range(layers)]
    else:
        pattern = 2 if family == "gemma2" else hf["sliding_window_pattern"]
        sliding = [(i + 1) % pattern != 0 for i in range(layers)]
    named = hf.get("layer_types") if family != "mistral" else None  # MistralConfig ignores layer_types
    return window, tuple(named or (SLIDING if s else GLOBAL for s in sliding))


# --- parameters -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Weight:
    axes: str  # one dimension letter per axis (conventions header; R: a LoRA adapter's rank)
    spec: P  # where each axis lives on the mesh
    init: str  # "normal" (std initializer_range), "ones" (norm scales), "kaiming" or "zeros" (LoRA's A, B)
    hf: str = ""  # the tensor's name in transformers (Llama's; _weights renames Gemma's); {}: the layer
    n_in: int = 0  # how many axes (after L) make up nn.Linear's input axis; 0: transformers' layout
    rank: int = 0  # R, for adapters
    flat: bool = False  # transformers holds it as one axis: a bias [H*Q], ours [H, Q]
    family: str = (
        ""  # the LlamaConfig property that adds it (qkv_bias, qk_norm, gemma); "": every model has it
    )


# FSDP spans the context axis too (as MaxText's): a context axis of N would otherwise leave each group of N
# devices holding the same parameter shards. Both axes, in this order; with context 1 it is plain fsdp.
FSDP = ("fsdp", "context")
F, T = FSDP, "tensor"
_ATTN = "model.layers.{}.self_attn."
_LN = "model.layers.{}."
# One decoder layer's weights, stacked on a leading L axis. nn.Linear stores [out, in]; we store [in, out]
# split into named axes, so ours = hf.T reshaped.
_LAYER = {
    "attn_norm": Weight("LD", P(None, None), "ones", "model.layers.{}.input_layernorm.weight"),
    "wq": Weight("LDHQ", P(None, F, T, None), "normal", "model.layers.{}.self_attn.q_proj.weight", 1),
    "wk": Weight("LDKQ", P(None, F, T, None), "normal", "model.layers.{}.self_attn.k_proj.weight", 1),
    "wv": Weight("LDKQ", P(None, F, T, None), "normal", "model.layers.{}.self_attn.v_proj.weight", 1),
    # Biases and head norms are split like their weight's output axes (heads over tensor), and small enough
    # to stay whole over FSDP.
    "bq": Weight("LHQ", P(None, T, None), "zeros", _ATTN + "q_proj.bias", flat=True, family="qkv_bias"),
    "bk": Weight("LKQ", P(None, T, None), "zeros", _ATTN + "k_proj.bias", flat=True, family="qkv_bias"),
    "bv": Weight("LKQ", P(None, T, None), "zeros", _ATTN + "v_proj.bias", flat=True, family="qkv_bias"),
    "q_norm": Weight("LQ", P(None, None), "ones", _ATTN + "q_norm.weight", family="qk_norm"),
    "k_norm": Weight("LQ", P(None, None), "ones", _ATTN + "k_norm.weight", family="qk_norm"),
    "wo": Weight("LHQD", P(None, T, None, F), "normal", "model.layers.{}.self_attn.o_proj.weight", 2),
    # Gemma's sandwich norms: its post_attention_layernorm norms attention's output (Llama's is mlp_norm).
    "attn_out_norm": Weight(
        "LD", P(None, None), "ones", _LN + "post_attention_layernorm.weight", family="gemma"
    ),
    "mlp_norm": Weight("LD", P(None, None), "ones", "model.layers.{}.post_attention_layernorm.weight"),
    "w_gate": Weight("LDF", P(None, F, T), "normal", "model.layers.{}.mlp.gate_proj.weight", 1),
    "w_up": Weight("LDF", P(None, F, T), "normal", "model.layers.{}.mlp.up_proj.weight", 1),
    "w_down": Weight("LFD", P(None, T, F), "normal", "model.layers.{}.mlp.down_proj.weight", 1),
    "mlp_out_norm": Weight(
        "LD", P(None, None), "ones", _LN + "post_feedforward_layernorm.weight", family="gemma"
    ),
}
_WEIGHTS = {  # in transformers' order; embed = lm_head.T when tied, so it is laid out as its transpose
    "embed": Weight("VD", P(T, F), "normal", "model.embed_tokens.weight"),
    "layers": _LAYER,
    "final_norm": Weight("D", P(None), "ones", "model.norm.weight"),
    "lm_head": Weight("DV", P(F, T), "normal", "lm_head.weight", 1),
}


def _weights(arch: LlamaConfig) -> dict:
    """Every weight, once (no lm_head when tied). FSDP shards one non-tensor axis over fsdp x context; tensor
    splits heads (q, k, v on their head axis, o on its input heads) and F (gate, up on their output, down on
    its input), Megatron-style, so attention and the MLP each need one all-reduce over tensor. One kv head
    (multi-query attention) cannot be split: it is whole on every tensor device, and each computes its own
    query heads against it."""
    weights = {k: w for k, w in _WEIGHTS.items() if k != "lm_head" or not arch.tie_word_embeddings}
    layer = {k: w for k, w in _LAYER.items() if not w.family or getattr(arch, w.family)}
    if arch.num_kv_heads == 1:
        whole_k = lambda w: P(*(None if a == "K" else s for a, s in zip(w.axes, w.spec, strict=True)))
        layer = {k: dataclasses.replace(w, spec=whole_k(w)) if "K" in w.axes else w for k, w in layer.items()}
    if arch.gemma:  # the norm before the MLP has another name; norms scale by 1 + weight (zeros: identity)
        layer["mlp_norm"] = dataclasses.replace(
            layer["mlp_norm"], hf=_LN + "pre_feedforward_layernorm.weight"
        )
        ones_to_zeros = lambda w: dataclasses.replace(w, init="zeros") if w.init == "ones" else w
        return jax.tree.map(ones_to_zeros, weights | {"layers": layer})
    return weights | {"layers": layer}


_SIZE_FIELDS = dict(L="num_layers", D="hidden_size", H="num_heads", K="num_kv_heads", Q="head_dim")
_SIZE_FIELDS |= dict(F="intermediate_size", V="vocab_size")


def _shape(arch: LlamaConfig, w: Weight) -> tuple[int, ...]:
    return tuple(w.rank if a == "R" else getattr(arch, _SIZE_FIELDS[a]) for a in w.axes)


# LoRA's names for the projections, and ours.
LORA_TARGETS = dict(q="wq", k="wk", v="wv", o="wo", gate="w_gate", up="w_up", down="w_down")


def lora_weights(arch: LlamaConfig, rank: int, targets) -> dict:
    """The LoRA adapters of `targets` (LORA_TARGETS' names), declared beside their base weights: W [in, out]
    becomes W + (alpha / rank) A B with A [L, in, R] sharded like W's input axes and B [L, R, out] like its
    output axes, so the low-rank path splits as the weight does. A is Kaiming-uniform and B zero, as in
    PEFT: at step 0 the adapted model is the base. Biases stay frozen."""
    adapters, layer = {}, _weights(arch)["layers"]
    for target in targets:
        name = LORA_TARGETS[target]
        w = layer[name]
        inputs, outputs = slice(1, 1 + w.n_in), slice(1 + w.n_in, None)
        a = Weight(f"L{w.axes[inputs]}R", P(None, *w.spec[inputs], None), "kaiming", rank=rank)
        b = Weight(f"LR{w.axes[outputs]}", P(None, None, *w.spec[outputs]), "zeros", rank=rank)
        adapters[name] = {"a": a, "b": b}
    return adapters


# Fields that change nothing the forward pass computes (a reference model may differ in them).
NOT_COMPUTED = {
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
}


def _axis_names(entry) -> tuple[str, ...]:
    """The mesh axes one PartitionSpec entry names: none, one, or several (FSDP)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _split_count(mesh, entry) -> int:
    """How many ways one PartitionSpec entry splits its dimension on `mesh` (concrete or abstract)."""
    return math.prod(mesh.shape[a] for a in _axis_names(entry))


def _named_split(mesh, entry) -> str:
    """The axes of a split, for an error: "fsdp=2 x context=4"; a context axis of 1 (no long rows) unnamed."""
    axes = [a for a in _axis_names(entry) if a != "context" or mesh.shape[a] > 1]
    return " x ".join(f"{a}={mesh.shape[a]}" for a in axes)


def check_fits(arch: LlamaConfig, mesh, batch_size: int, batch_name: str = "batch size") -> None:
    """The one divisibility rule, checked once before anything is built: every weight axis splits evenly
    over the mesh axes its spec names (kv heads over tensor among them), and the batch (pairs per forward
    pass) over data x fsdp, and so over the processes' row slices (sharding.row_slices: whole blocks of data x
    fsdp), whose layout is checked here too. A one-line error, naming the batch as `batch_name` (the config
    field that set it)."""
    splits = [(batch_name, batch_size, sharding.BATCH_AXES)]
    for w in jax.tree.leaves(_weights(arch)):
        splits += zip([_SIZE_FIELDS[a] for a in w.axes], _shape(arch, w), w.spec, strict=True)
    for what, size, axes in splits:
        n = _split_count(mesh, axes)
        if size % n:
            raise ValueError(f"{what} ({size}) is not divisible by {_named_split(mesh, axes)} ({n})")
    sharding.row_slices(mesh)


def check_lora(arch: LlamaConfig, rank: int, targets) -> None:
    """A rank above an adapted weight's smaller side (of [in, out], heads flattened) adds parameters and
    nothing else, A B reaching at most that rank anyway: refused in one line, naming the smallest."""
    sides = {}
    for target in targets:
        w = _LAYER[LORA_TARGETS[target]]
        shape = _shape(arch, w)[1:]
        sides[target] = math.prod(shape[: w.n_in]), math.prod(shape[w.n_in :])
    smallest = min(sides, key=lambda target: min(sides[target]), default=None)
    if smallest and rank > min(sides[smallest]):
        size = " x ".join(map(str, sides[smallest]))
        raise ValueError(
            f"lora_rank {rank} is larger than the adapted {smallest} projection allows ({size}): "
            f"at most {min(sides[smallest])}"
        )


def param_specs(arch: LlamaConfig) -> dict:
    """PartitionSpec of every weight, same tree as the params."""
    return jax.tree.map(lambda w: w.spec, _weights(arch))


def abstract_params(arch: LlamaConfig, mesh, weights: dict | None = None, quantization: str = "none") -> dict:
    """Shape, dtype and sharding of every f32 weight (of `weights`, e.g. lora_weights; default the model's),
    building nothing (to restore into); with quantization, the projections' Quantized arrays."""

    def one(w: Weight):
        if quantization != "none" and _quantizable(w):
            parts = _quantized_parts(arch, w, quantization, mesh)
            return Quantized(**parts, shape=_shape(arch, w)[1:], n_in=w.n_in)
        return jax.ShapeDtypeStruct(_shape(arch, w), jnp.float32, sharding=NamedSharding(mesh, w.spec))

    return jax.tree.map(one, weights or _weights(arch))


def init_params(arch: LlamaConfig, key: jax.Array, mesh, weights: dict | None = None) -> dict:
    """Random f32 params (transformers' init: normal(0, initializer_range), norm scales 1; adapters as PEFT's)
    of `weights` (default the model's), each built directly in its shards."""
    weights, treedef = jax.tree.flatten(weights or _weights(arch))

    def one(w: Weight, key):
        shape = _shape(arch, w)
        if w.init in ("ones", "zeros"):
            return (jnp.ones if w.init == "ones" else jnp.zeros)(shape)
        if w.init == "kaiming":  # PEFT: kaiming_uniform_(a=sqrt(5)), a bound of 1 / sqrt(fan_in)
            bound = 1 / math.sqrt(math.prod(shape[1:-1]))
            return jax.random.uniform(key, shape, minval=-bound, maxval=bound, out_sharding=w.spec)
        return arch.initializer_range * jax.random.normal(key, shape, out_sharding=w.spec)

    def build(key):
        keys = jax.random.split(key, len(weights))
        return treedef.unflatten([one(w, k) for w, k in zip(weights, keys, strict=True)])

    shardings = treedef.unflatten([NamedSharding(mesh, w.spec) for w in weights])
    with jax.set_mesh(mesh):
        return jax.jit(build, out_shardings=shardings)(key)


def lm_head_weight(params: dict) -> jax.Array:
    """[D, V], sharded P(FSDP, "tensor")."""
    return params["lm_head"] if "lm_head" in params else params["embed"].T


# --- the quantised base (QLoRA): the frozen projections in NF4 or int8 under the adapters ----------------

# QLoRA's 4-bit NormalFloat levels (Dettmers et al. 2023; bitsandbytes' table): quantiles of a normal
# distribution scaled to [-1, 1], with an exact 0.
NF4_LEVELS = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
                      np.float32)  # fmt: skip
NF4_BLOCK = 64  # weights per absmax, along the input axis
SCALE_BLOCK = 256  # absmax values per second-level scale (double quantisation)


def _dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map), the 256 values that NF4's double
    quantisation codes the absmax values with: for k = 0..6, the midpoints of 2^k + 1 points evenly spaced
    over [0.1, 1] times 10^(k - 6), with both signs, then 0 and 1. In float64, rounded once (bitsandbytes'
    torch.linspace leaves a few of them an ulp away from that)."""
    halves = []
    for k in range(7):
        points = np.linspace(0.1, 1, 2**k + 1)
        halves.append(10.0 ** (k - 6) * (points[:-1] + points[1:]) / 2)
    half = np.concatenate(halves)
    return np.sort(np.concatenate([-half, half, [0.0, 1.0]]).astype(np.float32))


DYNAMIC_MAP = _dynamic_map()
# Each value is coded as the nearest level, a tie going to the lower one (torch.bucketize, as bitsandbytes).
_NF4_BOUNDS, _DYNAMIC_BOUNDS = ((v[:-1] + v[1:]) / np.float32(2) for v in (NF4_LEVELS, DYNAMIC_MAP))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Quantized:
    """A frozen projection [L, in, out] (nn.Linear's [out, in] transposed: its input axes flattened, then its
    output axes), quantised in blocks along the input axis as bitsandbytes quantises nn.Linear. NF4: codes
    [L, in / 2, out] uint8, two 4-bit levels a byte (the first input in the high nibble), and absmax
    [L, in / 64, out] uint8, each block's absmax double-quantised: DYNAMIC_MAP[absmax] * scale + offset, with
    scale the largest |absmax - offset| of its group of 256 blocks in nn.Linear's order. int8: codes
    [L, in, out] int8, absmax [L, 1, out] f32 per output channel."""

    codes: jax.Array
    absmax: jax.Array
    scale: jax.Array | None = None  # NF4: [L, groups of 256 blocks] f32
    offset: jax.Array | None = None  # NF4: [L] f32, the mean absmax of each layer's weight
    shape: tuple = dataclasses.field(default=(), metadata=dict(static=True))  # one layer's, in our axes
    n_in: int = dataclasses.field(default=1, metadata=dict(static=True))  # how many of them are inputs


def _blockwise(blocks: np.ndarray, bounds: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes' blockwise quantisation (its PyTorch kernels), in f32 as they compute: (codes, absmax)
    with each value coded as the nearest level to value / its block's absmax (`bounds`: the midpoints
    between the levels; a tie goes to the lower one, as torch.bucketize)."""
    absmax = np.abs(blocks).max(axis=axis, keepdims=True)
    scaled = np.clip(blocks * (np.float32(1) / np.maximum(absmax, np.float32(1e-38))), -1, 1)
    return np.searchsorted(bounds, scaled).astype(np.uint8), absmax


def quantize(x: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes, absmax [in / block, out]) of one layer's weight x [in, out] f32, quantised along its input
    axis as bitsandbytes does: nf4 (quantize_4bit) in blocks of 64, packed two codes a byte, the first in
    the high nibble; int8 (int8_vectorwise_quant) one block per output channel, round(x * 127 / absmax)."""
    if kind == "int8":  # torch's 127 / absmax is (1 / absmax) * 127; an all-zero channel stays 0
        absmax = np.abs(x).max(axis=0, keepdims=True)
        inverse = np.divide(np.float32(1), absmax, out=np.zeros_like(absmax), where=absmax > 0)
        return np.round(x * (inverse * np.float32(127))).astype(np.int8), absmax
    codes, absmax = _blockwise(x.reshape(-1, NF4_BLOCK, x.shape[1]), _NF4_BOUNDS, axis=1)
    codes = codes.reshape(x.shape)
    return codes[0::2] << 4 | codes[1::2], absmax[:, 0]


def _double_quantize(absmax: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """bitsandbytes' double quantisation (quantize_4bit's compress_statistics) of the NF4 absmax of a stacked
    weight [L, in / 64, out] f32: (codes uint8 of the same shape, scale [L, groups], offset [L]). Each layer's
    absmax in nn.Linear's order ([out, in / 64] flattened), less their mean (the offset), is coded in groups
    of 256 with DYNAMIC_MAP."""
    layers, blocks, out = absmax.shape
    flat = absmax.transpose(0, 2, 1).reshape(layers, -1)
    offset = flat.mean(axis=1, dtype=np.float64).astype(np.float32)  # rounded once
    groups = -(-flat.shape[1] // SCALE_BLOCK)
    centred = np.zeros((layers, groups * SCALE_BLOCK), np.float32)  # the last group padded with zeros
    centred[:, : flat.shape[1]] = flat - offset[:, None]
    codes, scale = _blockwise(centred.reshape(layers, groups, SCALE_BLOCK), _DYNAMIC_BOUNDS, axis=2)
    codes = codes.reshape(layers, -1)[:, : flat.shape[1]].reshape(layers, out, blocks)
    return codes.transpose(0, 2, 1), scale[..., 0], offset


def _dequantized(w: Quantized, dtype) -> jax.Array:
    """One layer of a quantised weight, gathered over FSDP, in our axes and `dtype` (computed in f32 and
    rounded once, as bitsandbytes' dequantize_4bit and int8_vectorwise_dequant)."""
    (blocks, outputs), spec = w.absmax.shape, jax.typeof(w.codes).sharding.spec
    if w.scale is None:  # int8
        x = w.codes.astype(jnp.float32) * w.absmax * np.float32(1 / 127)
    else:  # each block's group of 256 in nn.Linear's order ([out, blocks] flattened)
        group = (jnp.arange(outputs) * blocks + jnp.arange(blocks)[:, None]) // SCALE_BLOCK
        absmax = _lookup(DYNAMIC_MAP, w.absmax) * w.scale[group] + w.offset
        levels = _lookup(NF4_LEVELS, jnp.stack([w.codes >> 4, w.codes & 15], axis=1))
        levels = jnp.reshape(levels, (blocks, NF4_BLOCK, outputs), out_sharding=P(spec[0], None, spec[1]))
        x = levels * absmax[:, None]
    lead = lambda axes, split: (split, *[None] * (len(axes) - 1))
    ours = P(*lead(w.shape[: w.n_in], spec[0]), *lead(w.shape[w.n_in :], spec[1]))
    return jnp.reshape(x.astype(dtype), w.shape, out_sharding=ours)


def _lookup(table: np.ndarray, codes: jax.Array) -> jax.Array:
    """table[codes], sharded as the codes."""
    return jnp.asarray(table).at[codes].get(out_sharding=jax.typeof(codes).sharding)


def _quantizable(w: Weight) -> bool:
    """A layer's projection (QLoRA quantises the nn.Linear layers; the embedding, the LM head, the norms and
    the biases stay in the compute dtype)."""
    return w.axes[0] == "L" and w.n_in > 0


def _quantized_parts(arch: LlamaConfig, w: Weight, kind: str, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape, dtype and sharding of each array of the projection `w` quantised (Quantized's fields). The codes
    lie as the weight does (its input axes split like the first of them, its output axes like theirs); each
    absmax with its block, or whole along the input axis where a block straddles FSDP devices; NF4's scale
    and offset, 4 bytes per 16,384 weights and per layer, whole on every device."""
    (out, inputs), layers = _hf_shape(w, _shape(arch, w)), arch.num_layers
    spec = P(None, w.spec[1], w.spec[1 + w.n_in])
    blocks = inputs // NF4_BLOCK if kind == "nf4" else 1
    straddled = blocks % _split_count(mesh, spec[1])
    absmax_spec = P(None, None, spec[2]) if straddled else spec

    def part(shape, dtype, where=spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, where))

    if kind == "int8":
        return dict(
            codes=part((layers, inputs, out), jnp.int8),
            absmax=part((layers, 1, out), jnp.float32, absmax_spec),
        )
    return dict(
        codes=part((layers, inputs // 2, out), jnp.uint8),
        absmax=part((layers, blocks, out), jnp.uint8, absmax_spec),
        scale=part((layers, -(-blocks * out // SCALE_BLOCK)), jnp.float32, P()),
        offset=part((layers,), jnp.float32, P()),
    )


def check_quantization(arch: LlamaConfig, mesh, kind: str) -> None:
    """NF4 codes a projection in blocks of 64 along its input axis, two codes a byte: that axis must hold
    whole blocks, and on each device whole blocks where tensor parallelism splits it (a block is dequantised
    where it lies) or whole bytes where FSDP (fsdp x context) does (a block may straddle those: it is
    gathered first). One line, naming the size."""
    for w in jax.tree.leaves(_weights(arch)):
        if kind != "nf4" or not _quantizable(w):
            continue
        inputs, axis = _hf_shape(w, _shape(arch, w))[1], w.spec[1]
        devices, tensor = _split_count(mesh, axis), axis == "tensor"
        size = " x ".join(_SIZE_FIELDS[a] for a in w.axes[1 : 1 + w.n_in]) + f" ({inputs})"
        if inputs % NF4_BLOCK:
            raise ValueError(f"base_quantization nf4: {size} is not a multiple of its blocks of {NF4_BLOCK}")
        need = f"whole blocks of {NF4_BLOCK}" if tensor else "an even count (two codes a byte)"
        if inputs // devices % (NF4_BLOCK if tensor else 2):
            raise ValueError(
                f"base_quantization nf4: {size} over {_named_split(mesh, axis)} leaves {inputs // devices} "
                f"weights a device, and NF4 needs {need} there"
            )


def fingerprint(params: dict) -> str:
    """A checksum of every array's bits (a resume re-quantises its base and compares it with the one its
    checkpoints were trained on)."""
    return hashlib.sha256(np.asarray(_checksums(params)).tobytes()).hexdigest()[:16]


@jax.jit
def _checksums(params: dict) -> jax.Array:
    """[leaves] uint32: each array's bits, each position weighted by its own odd number, summed in uint32,
    whose wrap-around makes every summation order (mesh, device) give the same."""

    def checksum(x):
        bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
        position = jnp.uint32(0)
        for axis, size in enumerate(x.shape):  # the row-major index
            position = position * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
        return jnp.sum(bits * (2 * position * jnp.uint32(2654435761) + 1), dtype=jnp.uint32)

    return jnp.stack([checksum(x) for x in jax.tree.leaves(params)])


# --- forward ----------------------------------------------------------------------------------------------


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """In f32 whatever the compute dtype (as transformers), back to x's dtype; scaled by offset + scale
    (Gemma's offset is 1)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return ((offset + scale.astype(jnp.float32)) * x32).astype(x.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's soft cap, cap * tanh(x / cap): about x while small, never beyond +-cap; None: x."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def rope_inverse_frequencies(arch: LlamaConfig, sliding: bool = False) -> np.ndarray:
    """[Q/2] f32, transformers' default, linear and llama3 rope init redone in the same float32 steps (bit for
    bit at Llama 3's theta; elsewhere torch's f32 pow may be one ulp off the correctly rounded one we use).
    sliding: a sliding layer's, with Gemma 3's own base and no scaling."""
    Q, local = arch.head_dim, sliding and arch.local_rope_theta is not None
    exponents = np.arange(0, Q, 2).astype(np.float32) / np.float32(Q)
    theta = arch.local_rope_theta if local else arch.rope_theta
    inv_freq = 1 / (np.float64(theta) ** exponents.astype(np.float64)).astype(np.float32)
    s = None if local else arch.rope_scaling
    if s is None:
        return inv_freq
    if isinstance(s, LinearRopeScaling):
        return inv_freq / np.float32(s.factor)
    # Llama 3.1: wavelengths longer than the pretraining context are stretched by `factor`, shorter than
    # context / high_freq_factor are kept, and the band between is interpolated smoothly.
    # torch computes `scalar / tensor` as (1 / tensor) * scalar; written the same way to match bit for bit.
    wavelen = (1 / inv_freq) * np.float32(2 * math.pi)
    context, low, high = s.original_max_position_embeddings, s.low_freq_factor, s.high_freq_factor
    scaled = np.where(wavelen > context / low, inv_freq / np.float32(s.factor), inv_freq)
    smooth = ((1 / wavelen) * np.float32(context) - low) / (high - low)
    smoothed = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, Q]; cos, sin [T, Q/2], or [B, T, Q/2] for positions of each row's own.

    Rotate-half layout: dimension i pairs with i + Q/2 (not 2i with 2i + 1 as in Meta's original code).
    transformers' conversion script permuted the rows of q_proj and k_proj into this layout once and
    for all, and its Llama applies rotate_half; we apply the same rotation to the same rows, so the
    weights load and export with no permutation and match transformers exactly.
    """
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[..., None, :], sin[..., None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _attention(q, k, v, lengths, impl, window=None, scale=None, cap=None):
    """Causal attention within each row's first `lengths` tokens; with `lengths` a tuple of views, within
    each view (_view_attention). window: each token sees only the last `window` tokens, itself included
    (transformers' sliding window: key > query - window). scale: of the scores (None: 1/sqrt(Q)); cap: Gemma
    2's soft cap on them, before the masks."""
    if isinstance(lengths, tuple):
        return _view_attention(q, k, v, *lengths, impl, window=window, scale=scale, cap=cap)
    # Each query sees the whole row's keys and values: gathered over context (their queries stay split).
    k, v = _whole_row(k), _whole_row(v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl != "cudnn":
        lengths = jnp.full(q.shape[:1], k.shape[1], jnp.int32) if lengths is None else lengths
        attend = _chunked_attention if impl == "chunked" else _whole_attention
        return attend(q, k, v, lengths, window, scale, cap)

    def attend(q, k, v, lengths):
        masks = dict(is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths)
        local = None if window is None else (window - 1, 0)  # (left, right) besides the token itself
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, local_window_size=local, implementation="cudnn", **masks
        )

    # Explicit-mode workaround: the cuDNN kernel is a custom_partitioning primitive whose output type carries
    # no sharding, so under explicit axes the result would read as replicated. Run it under auto axes and pin
    # its output to q's sharding; its own partitioning rule splits batch and heads.
    return jax.sharding.auto_axes(attend, out_sharding=jax.typeof(q).sharding.spec)(q, k, v, lengths)


def _visible(queries: int, keys: int, lengths, window, first: int = 0) -> jax.Array:
    """[B, T, S]: whether query t sees key first + s: causally, within the window (transformers' sliding
    window: key > query - window), both among their row's first `lengths` [B] tokens (so the padding's keys,
    and a block's padded ones, are never seen, and a padding query sees nothing)."""
    query, key = jnp.arange(queries)[:, None], first + jnp.arange(keys)
    seen = key <= query
    if window is not None:
        seen = seen & (key > query - window)
    within = lambda i: i < lengths[:, None, None]
    return seen & within(query) & within(key)


def _whole_attention(q, k, v, lengths, window, scale: float, cap):
    """XLA's attention: each device's queries against the whole row, [B, K, G, T / context, S] f32 scores at
    once. jax.nn.dot_product_attention's XLA path written out (its masks, its fill, its padding queries' zero
    outputs: the same numbers), with Gemma 2's soft cap, which it cannot take, before the masks."""
    seen = _visible(q.shape[1], k.shape[1], lengths, window)[:, None]  # [B, 1, T, S]
    real = jnp.arange(q.shape[1]) < lengths[:, None]  # [B, T]

    def one_group(q):  # [B, T, K, Q]: one query of each kv head's group
        scores = jnp.einsum("btkq,bskq->bkts", q, k, preferred_element_type=jnp.float32)
        scores = softcap(scores * jnp.float32(scale), cap)
        masked = jnp.where(seen, scores, -0.7 * jnp.finfo(jnp.float32).max)  # jax's fill
        probs = jax.nn.softmax(masked, axis=-1)
        return jnp.einsum("bkts,bskq->btkq", probs.astype(v.dtype), v)

    out = jax.vmap(one_group, in_axes=3, out_axes=3)(_grouped(q, k.shape[2]))
    return (out * real[:, :, None, None, None].astype(out.dtype)).reshape(q.shape)


# "chunked" attention (_chunked_attention): a block of keys at a time
ATTENTION_BLOCK = 512  # keys a step scores: it holds [heads, T, 512] scores at a time
CHUNKED_FROM = 8192  # auto: rows (views) at least this long run "chunked" where cuDNN's kernel does not


def _key_blocks(k: jax.Array, v: jax.Array) -> tuple:
    """What the forward and backward passes scan over: each block's index, and k and v [B, S, K, Q] as
    [S / block, B, block, K, Q], zero-padded to whole blocks (the padding masked: _scores)."""
    b, s = k.shape[:2]
    n = -(-s // ATTENTION_BLOCK)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, n * ATTENTION_BLOCK - s), (0, 0), (0, 0)))
    blocked = lambda x: jnp.moveaxis(pad(x).reshape(b, n, ATTENTION_BLOCK, *x.shape[2:]), 1, 0)
    return jnp.arange(n), blocked(k), blocked(v)


def _unblocked(blocks: jax.Array, like: jax.Array) -> jax.Array:
    """_key_blocks undone for one array: [S / block, B, block, K, Q] -> [B, S, K, Q], the padding dropped."""
    return jnp.moveaxis(blocks, 0, 1).reshape(like.shape[0], -1, *like.shape[2:])[:, : like.shape[1]]


def _scores(q, k_block, first, lengths, window, scale, cap):
    """One block's masked scores [B, K, G, T, block] (f32) of grouped queries q [B, T, K, G, Q] against
    keys first.. of k_block, and the capped scores' slope (1 without a cap) for the backward pass."""
    raw = jnp.einsum("btkgq,bskq->bkgts", q, k_block, preferred_element_type=jnp.float32) * scale
    capped = softcap(raw, cap)
    seen = _visible(q.shape[1], k_block.shape[1], lengths, window, first)[:, None, None]  # [B, 1, 1, T, S]
    slope = 1.0 if cap is None else 1 - jnp.square(capped / cap)
    # A large finite fill, not -inf: a query that sees nothing (padding) stays finite.
    return jnp.where(seen, capped, -1e30), slope


def _grouped(q, kv_heads: int) -> jax.Array:
    return q.reshape(*q.shape[:2], kv_heads, q.shape[2] // kv_heads, q.shape[3])  # each kv head's queries


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_attention(q, k, v, lengths, window, scale, cap):
    """attention_impl "chunked": FlashAttention-2's algorithm written in jnp, for any backend. The queries
    meet the keys a block at a time, keeping a running max and sum of their scores (the online softmax), so
    a device holds [heads, T / context, ATTENTION_BLOCK] scores, never [T, S]; the backward pass recomputes
    each block's probabilities from the saved log-sum-exp. The masks are _visible's, as _whole_attention's,
    from the global positions of queries and keys (so a row split over context needs nothing more); the
    same numbers up to f32 rounding (the sum over keys is taken a block at a time) for every real token."""
    return _chunked_forward(q, k, v, lengths, window, scale, cap)[0]


def _chunked_forward(q, k, v, lengths, window, scale, cap):
    grouped = _grouped(q, k.shape[2])
    b, t, kv, g, d = grouped.shape
    spec = (*jax.typeof(grouped).sharding.spec, None, None, None)  # B, T, K, G as the queries' are split
    rows = P(spec[0], spec[2], spec[3], spec[1])  # [B, K, G, T]

    def step(carry, block):
        top, total, out = carry  # running max, sum of exp(score - max) [B, K, G, T]; output [B, K, G, T, Q]
        i, k_block, v_block = block
        scores, _ = _scores(grouped, k_block, i * ATTENTION_BLOCK, lengths, window, scale, cap)
        new_top = jnp.maximum(top, scores.max(-1))
        probs, rescale = jnp.exp(scores - new_top[..., None]), jnp.exp(top - new_top)
        weighted = jnp.einsum(
            "bkgts,bskq->bkgtq", probs.astype(v.dtype), v_block, preferred_element_type=jnp.float32
        )
        return (new_top, total * rescale + probs.sum(-1), out * rescale[..., None] + weighted), None

    start = jnp.zeros((b, kv, g, t), jnp.float32, out_sharding=rows)
    init = (start - jnp.inf, start, jnp.zeros((b, kv, g, t, d), jnp.float32, out_sharding=P(*rows, None)))
    (top, total, out), _ = jax.lax.scan(step, init, _key_blocks(k, v))
    out = jnp.moveaxis(out / total[..., None], 3, 1).reshape(q.shape).astype(q.dtype)
    return out, (q, k, v, lengths, out, top + jnp.log(total))


def _chunked_backward(window, scale, cap, residuals, d_out):
    q, k, v, lengths, out, logsumexp = residuals
    grouped, d_grouped = _grouped(q, k.shape[2]), _grouped(d_out, k.shape[2])
    # FlashAttention-2's D: sum over a query's keys of P * dP, which is d_out . out
    delta = jnp.moveaxis(jnp.sum(d_grouped.astype(jnp.float32) * _grouped(out, k.shape[2]), -1), 1, 3)
    f32 = dict(preferred_element_type=jnp.float32)
    kv_spec = P(*jax.typeof(k).sharding.spec)  # a block's key gradient: summed over the queries' devices

    def step(d_q, block):
        i, k_block, v_block = block
        scores, slope = _scores(grouped, k_block, i * ATTENTION_BLOCK, lengths, window, scale, cap)
        probs = jnp.exp(scores - logsumexp[..., None])
        d_v = jnp.einsum("bkgts,btkgq->bskq", probs.astype(v.dtype), d_grouped, **f32, out_sharding=kv_spec)
        d_probs = jnp.einsum("btkgq,bskq->bkgts", d_grouped, v_block, **f32)
        d_scores = probs * (d_probs - delta[..., None]) * slope * scale
        d_q = d_q + jnp.einsum("bkgts,bskq->btkgq", d_scores.astype(k.dtype), k_block, **f32)
        d_k = jnp.einsum("bkgts,btkgq->bskq", d_scores.astype(q.dtype), grouped, **f32, out_sharding=kv_spec)
        return d_q, (d_k, d_v)

    start = jnp.zeros(grouped.shape, jnp.float32, out_sharding=P(*jax.typeof(grouped).sharding.spec))
    d_q, (d_k, d_v) = jax.lax.scan(step, start, _key_blocks(k, v))
    d_k, d_v = (_unblocked(d, x).astype(x.dtype) for d, x in ((d_k, k), (d_v, v)))
    return d_q.reshape(q.shape).astype(q.dtype), d_k, d_v, None


_chunked_attention.defvjp(_chunked_forward, _chunked_backward)


def _view_attention(q, k, v, index, lengths, slot, impl, **scores):
    """Attention over views of the rows (packing, prefix sharing): view j of row b is the sequence of the
    row's positions index[b, j] ([B, J, S]), e.g. [prompt | chosen] and [prompt | rejected] of a pair. Each
    view gathers its tokens' q, k, v (already rotated at their positions), attends causally within its
    first lengths[b, j] tokens with the same kernel and masks rows use (`scores`: _attention's window, scale
    and cap; a window counts the view's positions, which are its sequence's), and every token of a row takes
    its output from the flat view position slot[b, t]. Gathers along a row stay on its device."""
    b, n, s = index.shape
    tokens = jax.typeof(q).sharding.spec[1]  # how the row's tokens are split (context), and so the output's

    def split(x, shape, over=None):  # heads and head dim stay split as x's (one kv head is whole: _weights)
        heads = (*jax.typeof(x).sharding.spec, None, None)[2:4]  # a spec may leave out trailing unsplit axes
        return jnp.reshape(x, shape, out_sharding=P(sharding.BATCH_AXES, over, *heads))

    # Views gather along the whole row; each view's queries are then split over context as the row's were,
    # and its output is gathered whole again for each token to take its own (slot).
    flat = index.reshape(b, n * s)[..., None, None]
    views = lambda x, over=None: split(
        jnp.take_along_axis(_whole_row(x), flat, axis=1), (b * n, s, *x.shape[2:]), over
    )
    lengths = jnp.reshape(lengths, (b * n,), out_sharding=P(sharding.BATCH_AXES))
    out = _attention(views(q, tokens), views(k), views(v), lengths, impl, **scores)
    out = split(out, (b, n * s, *q.shape[2:]))
    return split(jnp.take_along_axis(out, slot[..., None, None], axis=1), q.shape, tokens)


def _whole_row(x: jax.Array) -> jax.Array:
    """x [B, T, ...] with its tokens whole on every device: gathered over context (a no-op without it)."""
    return reshard(x, P(*(None if axis == "context" else axis for axis in jax.typeof(x).sharding.spec)))


def _gathered(w: jax.Array | Quantized, dtype) -> jax.Array:
    """FSDP: one layer's weight cast to the compute dtype (halving the traffic in bf16) and gathered
    whole over fsdp x context right before use; the tensor split stays. Only one layer is whole at a time.
    A quantised weight is gathered as it is (NF4: about a quarter of bf16's bytes), then dequantised."""
    if isinstance(w, Quantized):
        return _dequantized(jax.tree.map(lambda x: _gathered(x, x.dtype), w), dtype)
    spec = jax.typeof(w).sharding.spec
    return reshard(w.astype(dtype), P(*(None if a == FSDP else a for a in spec)))


def _weights_axes(name: str) -> tuple[str, int]:
    """A layer weight's axes without L, as einsum letters, and how many lead ones make its input."""
    return _LAYER[name].axes[1:].lower(), _LAYER[name].n_in


def _linear(
    spec: str, x, w: "jax.Array | Quantized", adapter: dict | None, scale: float, out=None
) -> jax.Array:
    """jnp.einsum(spec, x, w) for one layer's weight w, e.g. "btd,dhq->bthq" for wq [D, H, Q] (the weight
    table's axes; tests/test_model.py holds the two equal), plus with a LoRA adapter the low-rank path
    scale * (x A) B beside it: A [inputs, R] takes w's input axes (those x has) to the rank, B [R, outputs]
    the rank to its output axes. out: the sharding of a sum over the tensor axis."""
    y = jnp.einsum(spec, x, _gathered(w, x.dtype), out_sharding=out)
    if adapter is None:
        return y
    x_axes, w_axes, y_axes = spec.replace("->", ",").split(",")
    inputs, outputs = ("".join(a for a in w_axes if a in axes) for axes in (x_axes, y_axes))
    a, b = (_gathered(adapter[k], x.dtype) for k in "ab")
    low = jnp.einsum(f"{x_axes},{inputs}r->btr", x, a, out_sharding=BATCH)
    return y + scale * jnp.einsum(f"btr,r{outputs}->{y_axes}", low, b, out_sharding=out)


def _qkv(project, h, w: dict, arch: LlamaConfig):
    """q [B, T, H, Q], k and v [B, T, K, Q] of a layer's normed input h (`project`: h times a weight and its
    adapter), with the family's additions: Qwen2's biases, Qwen3's and Gemma 3's RMSNorm over each head of q
    and k."""
    q = project("btd,dhq->bthq", h, "wq")  # B over the batch axes, heads over tensor
    k = project("btd,dkq->btkq", h, "wk")
    v = project("btd,dkq->btkq", h, "wv")
    if arch.qkv_bias:
        q, k, v = (y + w[b].astype(y.dtype) for y, b in ((q, "bq"), (k, "bk"), (v, "bv")))
    if arch.qk_norm:
        q, k = _norm(q, w["q_norm"], arch), _norm(k, w["k_norm"], arch)
    return q, k, v


def _norm(x: jax.Array, scale: jax.Array, arch: LlamaConfig) -> jax.Array:
    return rms_norm(x, scale, arch.rms_norm_eps, 1.0 if arch.gemma else 0.0)


def _embed(embed: jax.Array, tokens: jax.Array, arch: LlamaConfig, dtype) -> jax.Array:
    with jax.named_scope("embed"):
        # Gather the table whole first: a lookup into a vocab/fsdp-sharded table makes XLA replicate it
        # through an inefficient path anyway; this way it is one all-gather (a reduce-scatter backward).
        table = reshard(embed.astype(dtype), P(None, None))
        x = table.at[tokens].get(out_sharding=BATCH)
    # Gemma: times sqrt(D), rounded to the compute dtype first, as transformers does
    return x * jnp.asarray(math.sqrt(arch.hidden_size), dtype) if arch.gemma else x


def _attention_impl(arch: LlamaConfig, impl: str | None, dtype, context: int = 1, width: int = 0) -> str:
    """None or "auto": cuDNN's fused kernel on GPU where it applies (far faster; jax's default is XLA
    everywhere); elsewhere XLA's for rows or views (`width` tokens) shorter than CHUNKED_FROM, "chunked"
    from there (XLA's holds a row's scores whole). Gemma 2's soft-capped scores and queries split over a
    context axis do not go to cuDNN (its partitioning refuses a split sequence, and its causal mask would be
    in local positions)."""
    capped = arch.attn_logit_softcapping is not None
    if capped and impl == "cudnn":
        raise ValueError(
            "attention_impl cudnn cannot soft-cap attention scores (Gemma 2): use auto or chunked"
        )
    if context > 1 and impl == "cudnn":
        raise ValueError(
            "attention_impl cudnn cannot take a row split over mesh_context: use chunked or auto"
        )
    Q = arch.head_dim
    fits_cudnn = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and Q % 8 == 0 and Q <= 128
    fits_cudnn = fits_cudnn and not capped and context == 1
    if impl not in (None, "auto"):
        return impl
    if jax.default_backend() == "gpu" and fits_cudnn:
        return "cudnn"
    return "chunked" if width >= CHUNKED_FROM else "xla"


def check_attention(arch: LlamaConfig, mesh, max_seq_len: int, impl: str | None, dtype) -> None:
    """XLA's attention holds a row's scores whole, [heads, T / context, T] f32 on each device ("chunked" and
    cuDNN's kernel hold a block or none): where one row's take over half of a device's memory, refused in
    one line before anything runs. The CPU reports no limit."""
    if _attention_impl(arch, impl, dtype, mesh.shape["context"], max_seq_len) != "xla":
        return
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")  # this process's own
    heads, queries = arch.num_heads // mesh.shape["tensor"], -(-max_seq_len // mesh.shape["context"])
    if limit and (scores := 4 * heads * queries * max_seq_len) > limit / 2:
        raise ValueError(
            f"XLA's attention holds a row's scores whole: {scores / 2**30:.1f} GiB a device at max_seq_len "
            f"{max_seq_len} ({heads} heads, {queries} queries a device), over half of its "
            f"{limit / 2**30:.0f} GiB: use attention_impl chunked (or cudnn on a GPU)"
        )


def _attention_kinds(arch: LlamaConfig, positions, lengths, impl) -> list:
    """The attention of each kind of layer the model has, global and/or sliding (in that order), as functions
    of q, k, v: each rotates q and k with its own tables (Gemma 3: its own base), computed once here, and
    attends within its window with the model's scale and soft cap."""
    scale = None if arch.query_pre_attn_scalar is None else arch.query_pre_attn_scalar**-0.5

    def kind(sliding: bool):
        angles = positions.astype(jnp.float32)[..., None] * rope_inverse_frequencies(arch, sliding)
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        window = arch.sliding_window if sliding else None

        def attention(q, k, v):
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            return _attention(q, k, v, lengths, impl, window, scale, arch.attn_logit_softcapping)

        return attention

    return [kind(sliding) for sliding in sorted(set(arch.sliding_layers))]


# Per-layer activation checkpointing: "full" keeps only each layer's input; "save_matmuls" also keeps the
# projections' outputs (dots without batch dims, so not the [B, H, T, T] attention scores).
# "offload" keeps what "full" keeps, each layer's input ([B, T, D], L of them), in host memory between the
# forward and the backward pass (pinned_host: the accelerator copies it back as the backward pass reaches it).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=["layer_input"],
        offload_src="device",
        offload_dst="pinned_host",
    ),
}


def dtype_of(name: str):
    """A dtype setting (dpo.Config's compute_dtype, reference_dtype) as a jnp dtype: "auto" is f32 on CPU,
    bf16 on accelerators."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def forward(
    params: dict,
    tokens: jax.Array,
    arch: LlamaConfig,
    *,
    lengths: jax.Array | None = None,
    positions: jax.Array | None = None,
    views: tuple | None = None,
    lora: dict | None = None,
    lora_scale: float = 1.0,
    compute_dtype=jnp.float32,
    remat: str = "full",
    attention_impl: str | None = None,
) -> jax.Array:
    """Final RMS-normed hidden states [B, T, D] in compute_dtype, sharded P(("data", "fsdp"), "context", None)
    (BATCH).

    tokens int32 [B, T], right-padded; lengths int32 [B] real tokens per row (None: all real). Positions
    are 0..T-1, or `positions` [B, T]. With `views` (index [B, J, S], lengths [B, J], slot [B, T]; see
    _view_attention) a row holds several sequences, each attending within its views. Pad positions give
    finite values that the caller masks out. lora: adapters (lora_weights' tree) added to their weights'
    projections with lora_scale (alpha / rank). attention_impl: None or "auto" (_attention_impl), "xla",
    "cudnn" or "chunked" (_chunked_attention).
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; expected one of {list(REMAT_POLICIES)}")
    context = jax.sharding.get_abstract_mesh().shape.get("context", 1)
    width = tokens.shape[1] if views is None else views[0].shape[-1]  # what a query attends over
    impl = _attention_impl(arch, attention_impl, compute_dtype, context, width)
    x = _embed(params["embed"], tokens, arch, compute_dtype)
    positions = jnp.arange(tokens.shape[1]) if positions is None else positions
    # A row (view) with no real token would attend to nothing; letting position 0 see itself keeps it finite.
    if views is not None:
        lengths = (views[0], jnp.maximum(views[1], 1).astype(jnp.int32), views[2])
    elif lengths is not None:
        lengths = reshard(jnp.maximum(lengths, 1).astype(jnp.int32), P(sharding.BATCH_AXES))
    kinds = _attention_kinds(arch, positions, lengths, impl)
    mlp_activation = functools.partial(jax.nn.gelu, approximate=True) if arch.gemma else jax.nn.silu

    def layer(x, weights):  # one decoder layer
        w, adapters, sliding = weights
        x = checkpoint_name(x, "layer_input")  # what remat "offload" moves to the host
        out_norm = lambda y, name: _norm(y, w[name], arch) if arch.gemma else y  # Gemma's sandwich norms

        def project(spec, h, name, out=None):  # h times the weight `name`, and its LoRA adapter if any
            adapter = None if adapters is None else adapters.get(name)
            return _linear(spec, h, w[name], adapter, lora_scale, out)

        with jax.named_scope("attention"):
            q, k, v = _qkv(project, _norm(x, w["attn_norm"], arch), w, arch)
            # Layers of both kinds (Gemma, Qwen's max_window_layers): each picks its own as it runs.
            o = jax.lax.switch(sliding, kinds, q, k, v) if len(kinds) > 1 else kinds[0](q, k, v)
            # The sum over heads spans the tensor axis: out_sharding asks for the all-reduce.
            x = x + out_norm(project("bthq,hqd->btd", o, "wo", BATCH), "attn_out_norm")
        with jax.named_scope("mlp"):
            h = _norm(x, w["mlp_norm"], arch)
            gate, up = project("btd,df->btf", h, "w_gate"), project("btd,df->btf", h, "w_up")  # F over tensor
            y = project("btf,fd->btd", mlp_activation(gate) * up, "w_down", BATCH)
            x = x + out_norm(y, "mlp_out_norm")
        return x, None

    if remat != "none":
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat], prevent_cse=False)
    # One traced layer, scanned over the stacked weights: compile time does not grow with depth.
    sliding = jnp.asarray(arch.sliding_layers, jnp.int32)  # indexes kinds when there are two
    x, _ = jax.lax.scan(layer, x, (params["layers"], lora, sliding))
    return _norm(x, params["final_norm"], arch)


def logits(params: dict, tokens: jax.Array, arch: LlamaConfig, **forward_kwargs) -> jax.Array:
    """[B, T, V] f32, vocab split over tensor. For tests and teaching: DPO fuses the head into its loss."""
    hidden = forward(params, tokens, arch, **forward_kwargs)
    head = reshard(lm_head_weight(params).astype(hidden.dtype), P(None, "tensor"))
    out = P(sharding.BATCH_AXES, None, "tensor")
    logits = jnp.einsum("btd,dv->btv", hidden, head, preferred_element_type=jnp.float32, out_sharding=out)
    return softcap(logits, arch.final_logit_softcapping)


# --- the fused LM head and log-softmax: the log-probs of a DPO step -----------------------------------


class TokenStats(NamedTuple):
    """Per target, gradient-free, 0 where it is not scored: TRL's logit, entropy and accuracy metrics."""

    mean_logit: jax.Array  # the mean logit over the vocabulary
    entropy: jax.Array  # of the next-token distribution
    argmax_hit: jax.Array  # 1 where the target is the argmax (its first id, as torch), else 0
    wpo: jax.Array | None = None  # log p(target) - log sum_v p(v)^2: WPO's per-token weight (wpo_weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def token_logps(hidden, lm_head, targets, mask, chunk_size=4096, cap=None) -> tuple[jax.Array, TokenStats]:
    """Log-probs of the scored targets, without ever materialising [N, T, V] logits.

    hidden [N, T, D] final hidden states; lm_head [D, V]; targets [N, T] int (targets[n, t] is the
    token after position t); mask [N, T] bool (True: targets[n, t] is scored). Returns [N, T] f32:
        mask[n, t] * log_softmax(softcap(hidden[n, t] @ lm_head, cap))[targets[n, t]]   (cap: Gemma 2's)
    and the TokenStats, each [N, T]. Computed over chunks of about `chunk_size` vocabulary entries: the
    forward pass keeps a running log-sum-exp (f32) and the target's logit (_Running); the backward pass (a
    custom VJP) recomputes one chunk's logits at a time, writes that chunk's LM-head gradient columns in place
    and adds its share of the hidden-state gradient. Only one chunk's [N, T, C] logits are alive at any
    moment, and no [D, V]-sized buffer is ever accumulated. Call it under a mesh (jax.set_mesh).
    """
    return _logps_forward(hidden, lm_head, targets, mask, chunk_size, cap)[0]


def _spec(x: jax.Array) -> tuple:
    spec = tuple(jax.typeof(x).sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def _chunking(lm_head: jax.Array, chunk_size: int) -> tuple[int, int, int]:
    """(S, n, C): the head's vocabulary is split over S tensor-parallel shards (S = 1 without tensor
    parallelism); each shard's columns are cut into n contiguous chunks of C."""
    shards = _split_count(jax.sharding.get_abstract_mesh(), _spec(lm_head)[1])
    count = math.ceil(lm_head.shape[1] / chunk_size)
    return shards, count, math.ceil(lm_head.shape[1] // shards / count)


class _Chunk(NamedTuple):
    """Chunk i of the LM head: C consecutive columns of every one of its S shards, so that it stays split over
    the tensor axis like the whole head. The last chunk starts early enough to end at the shard's end; its
    columns that the chunk before already covered are not new."""

    head: jax.Array  # [D, S, C]
    start: jax.Array  # where the chunk starts inside a shard
    new: jax.Array  # [C] bool: the columns no chunk before covered
    ids: jax.Array  # [S, C]: each new column's vocabulary id, -1 for the others
    logits: jax.Array  # [N, T, S, C] f32 (soft-capped), -inf in the columns that are not new


def _chunk_logits(hidden, lm_head, i, chunk_size, cap) -> _Chunk:
    (d, v), (shards, _, width) = lm_head.shape, _chunking(lm_head, chunk_size)
    # Viewing the head as [D, S, V/S] here, inside the loop, lets XLA slice it where it lies; the same
    # reshape outside the loop made XLA:CPU copy the whole head.
    view = jnp.reshape(lm_head, (d, shards, v // shards), out_sharding=P(*_spec(lm_head), None))
    start = jnp.minimum(i * width, v // shards - width)
    head = jax.lax.dynamic_slice_in_dim(view, start, width, axis=2)
    logits = softcap(jnp.einsum("ntd,dsc->ntsc", hidden, head, preferred_element_type=jnp.float32), cap)
    offset = start + jnp.arange(width)  # column inside the shard
    new = offset >= i * width
    ids = jnp.where(new, jnp.arange(shards)[:, None] * (v // shards) + offset, -1)
    return _Chunk(head, start, new, ids, jnp.where(new, logits, -jnp.inf))


class _Running(NamedTuple):
    """The forward pass's scan carry: per token [N, T], over the chunks so far."""

    high: jax.Array  # the largest logit
    first: jax.Array  # int32: the smallest vocabulary id holding it (the argmax as torch takes it)
    total: jax.Array  # sum of exp(logit - high)
    weighted: jax.Array  # sum of exp(logit - high) * logit
    target: jax.Array  # the target's logit
    plain: jax.Array  # sum of the logits
    squared: jax.Array  # sum of exp(logit - high)^2 (WPO's sum of squared probabilities)


def _logps_forward(hidden, lm_head, targets, mask, chunk_size, cap):
    def step(running: _Running, i) -> tuple[_Running, None]:
        chunk = _chunk_logits(hidden, lm_head, i, chunk_size, cap)
        top = chunk.logits.max((-2, -1))
        high = jnp.maximum(running.high, top)
        # The chunk's first id at its top: chunks do not come in id order (each spans every tensor shard).
        at_top = jnp.where(chunk.logits == top[..., None, None], chunk.ids, jnp.iinfo(jnp.int32).max)
        at_top = jnp.min(at_top, (-2, -1))
        first = jnp.where(top == running.high, jnp.minimum(running.first, at_top), running.first)
        shrink, exp = jnp.exp(running.high - high), jnp.exp(chunk.logits - high[..., None, None])
        finite = jnp.where(chunk.new, chunk.logits, 0.0)
        # A one-hot select rather than a gather: it stays local when the vocabulary is split.
        target = jnp.sum(jnp.where(chunk.ids == targets[..., None, None], chunk.logits, 0.0), (-2, -1))
        return _Running(
            high=high,
            first=jnp.where(top > running.high, at_top, first),
            total=running.total * shrink + exp.sum((-2, -1)),
            weighted=running.weighted * shrink + (exp * finite).sum((-2, -1)),
            target=running.target + target,
            plain=running.plain + finite.sum((-2, -1)),
            squared=running.squared * shrink**2 + (exp * exp).sum((-2, -1)),
        ), None

    zero = jnp.zeros_like(hidden[..., 0], dtype=jnp.float32)  # [N, T], sharded like the rows
    count = _chunking(lm_head, chunk_size)[1]
    start = _Running(zero - jnp.inf, jnp.zeros_like(zero, dtype=jnp.int32), zero, zero, zero, zero, zero)
    running, _ = jax.lax.scan(step, start, jnp.arange(count))
    logsumexp = running.high + jnp.log(running.total)
    logp = running.target - logsumexp
    stats = TokenStats(
        mean_logit=running.plain / lm_head.shape[1],
        entropy=logsumexp - running.weighted / running.total,
        argmax_hit=(running.first == targets).astype(jnp.float32),  # a tie counts for its first id only
        # log sum_v p(v)^2 = log squared - 2 log total: both scaled by the same running maximum
        wpo=logp - jnp.log(running.squared) + 2 * jnp.log(running.total),
    )
    stats = jax.lax.stop_gradient(jax.tree.map(lambda x: jnp.where(mask, x, 0.0), stats))
    residuals = (hidden, lm_head, targets, mask, logsumexp)
    return (jnp.where(mask, logp, 0.0), stats), residuals


def _logps_backward(chunk_size, cap, residuals, grads):
    hidden, lm_head, targets, mask, logsumexp = residuals
    (d, v), (shards, count, width) = lm_head.shape, _chunking(lm_head, chunk_size)
    scale = jnp.where(mask, grads[0], 0.0)[..., None, None]  # d loss / d log p(target)
    head_spec = P(*_spec(lm_head), None)

    def step(carry, i):
        d_hidden, d_head = carry
        chunk = _chunk_logits(hidden, lm_head, i, chunk_size, cap)
        # d log p(target) / d logits = (onehot(target) - softmax) * the soft cap's slope, a chunk at a time.
        probs = jnp.exp(chunk.logits - logsumexp[..., None, None])
        slope = 1.0 if cap is None else jnp.where(chunk.new, 1 - jnp.square(chunk.logits / cap), 0.0)
        d_logits = (scale * slope * ((chunk.ids == targets[..., None, None]) - probs)).astype(hidden.dtype)
        # Sums over the chunk's columns (split over tensor) and over the rows (split over data x fsdp):
        # the out_shardings ask for those all-reduces.
        f32 = dict(preferred_element_type=jnp.float32)
        d_hidden += jnp.einsum("ntsc,dsc->ntd", d_logits, chunk.head, **f32, out_sharding=P(*_spec(hidden)))
        d_w = jnp.einsum("ntd,ntsc->dsc", hidden, d_logits, **f32, out_sharding=head_spec)
        # Added in place rather than set: the columns the last chunk shares with the one before
        # carry a zero gradient here and keep theirs.
        d_w += jax.lax.dynamic_slice_in_dim(d_head, chunk.start, width, axis=2)
        d_head = jax.lax.dynamic_update_slice_in_dim(d_head, d_w.astype(d_head.dtype), chunk.start, axis=2)
        return (d_hidden, d_head), None

    d_head = jnp.zeros((d, shards, v // shards), lm_head.dtype, out_sharding=head_spec)
    zero = (jnp.zeros_like(hidden, dtype=jnp.float32), d_head)
    (d_hidden, d_head), _ = jax.lax.scan(step, zero, jnp.arange(count))
    d_head = jnp.reshape(d_head, (d, v), out_sharding=P(*_spec(lm_head)))
    return d_hidden.astype(hidden.dtype), d_head, None, None


token_logps.defvjp(_logps_forward, _logps_backward)


def step_flops(arch: LlamaConfig, lengths, live_reference: bool, lora: bool = False, tokens=None):
    """Model FLOPs of one DPO step over the real tokens, numpy or traced: 6N per token for the policy's
    forward and backward (4N with LoRA: frozen weights get no gradient), 2N for a live reference's forward,
    plus causal attention (QK^T and PV over half the T x T square: 2 * 2 * T^2 / 2 * H * Q per layer for a
    forward pass; a sliding layer's band of the square, less the triangle of its (T - window)^2 / 2 pairs
    beyond the window) over each sequence of `lengths`. `tokens`: how many ran, when not their sum (a shared
    prompt runs once)."""
    passes = (4 if lora else 6) + (2 if live_reference else 0)
    lengths = lengths.astype(np.float32)
    tokens = lengths.sum() if tokens is None else tokens
    squares, sliding = (lengths**2).sum(), sum(arch.sliding_layers)
    banded = 0.0 if not sliding else squares - ((lengths - arch.sliding_window).clip(0) ** 2).sum()
    attention = (
        2 * arch.num_heads * arch.head_dim * ((arch.num_layers - sliding) * squares + sliding * banded)
    )
    return passes * float(arch.num_matmul_params) * tokens + passes / 2 * attention  # float: no int32 wrap


def merge_lora(params: dict, lora: dict, scale: float, dtype=jnp.float32) -> dict:
    """The params with each adapter folded into its weight, W + scale * A B (sharded as W), for export. The
    sum is taken in f32 and rounded once, to `dtype` (the export's): in the base's own dtype (bf16 when it
    computes in bf16) a change under half its rounding step would be lost, as most of a run's are. Quantised
    weights are left out: the export merges into their originals (merge_lora_from_file)."""
    layers = {name: w for name, w in params["layers"].items() if not isinstance(w, Quantized)}
    for name, adapter in lora.items():
        if name not in layers:
            continue
        axes, n_in = _weights_axes(name)
        inputs, outputs = axes[:n_in], axes[n_in:]
        spec = P(*jax.typeof(layers[name]).sharding.spec)
        f32 = dict(precision="highest", preferred_element_type=jnp.float32, out_sharding=spec)
        delta = jnp.einsum(f"l{inputs}r,lr{outputs}->l{axes}", adapter["a"], adapter["b"], **f32)
        layers[name] = (layers[name].astype(jnp.float32) + scale * delta).astype(dtype)
    return params | {"layers": layers}


def merge_lora_from_file(path, arch: LlamaConfig, params: dict, lora: dict, scale: float) -> dict:
    """For save_hf, merge_lora's result completed on the host: each layer weight that it left out (a quantised
    base's) becomes a function of the layer that reads the original weight back from the checkpoint at `path`
    (f32) and adds its adapter's change scale * A B in f32, so that the export holds the original base plus
    the adapters, not the quantised base. Every process must call it (the adapters are gathered)."""
    path, weights = resolve_path(path), _weights(arch)["layers"]
    adapters = {name: [sharding.to_host(ab[k]).astype(np.float32) for k in "ab"] for name, ab in lora.items()}

    def merged(name: str, layer: int) -> np.ndarray:
        w = weights[name]
        hf_shape = _hf_shape(w, _shape(arch, w))
        with _checkpoint(path) as tensor:
            x = tensor(w.hf.format(layer), hf_shape)[:, :].T.astype(np.float32)  # [in, out]
        if name in adapters:
            a, b = (ab[layer] for ab in adapters[name])
            x += scale * (a.reshape(len(x), -1) @ b.reshape(-1, x.shape[1]))
        return x.reshape(_shape(arch, w)[1:])

    ours = params["layers"]
    layers = {name: ours[name] if name in ours else functools.partial(merged, name) for name in weights}
    return params | {"layers": layers}


# --- Hugging Face checkpoints -------------------------------------------------------------------------------


def resolve_path(name_or_path: str, allow_patterns=("*.json", "*.safetensors", "*.jinja")) -> Path:
    """A local directory as is; otherwise a Hub id, fetched (or found in the cache) with
    huggingface_hub.snapshot_download, only the files matching allow_patterns."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    try:
        return Path(huggingface_hub.snapshot_download(str(name_or_path), allow_patterns=list(allow_patterns)))
    except HFValidationError:
        raise FileNotFoundError(f"{name_or_path!r} is neither a local directory nor a Hub model id") from None
    except LocalEntryNotFoundError:
        cache = huggingface_hub.constants.HF_HUB_CACHE
        raise FileNotFoundError(
            f"{name_or_path!r} is not a local directory, not in the Hugging Face cache ({cache}), "
            "and the Hub cannot be reached (offline: HF_HUB_OFFLINE is set or there is no network)"
        ) from None


def load_config(path) -> LlamaConfig:
    file = resolve_path(path) / "config.json"
    try:
        return LlamaConfig.from_hf(json.loads(file.read_text()))
    except (ValueError, KeyError, TypeError) as e:  # not JSON, a field missing or of the wrong kind
        raise ValueError(f"{file}: {e if isinstance(e, ValueError) else f'no usable {e}'}") from None


def _read_part(tensor, index: tuple[slice, ...], shape: tuple[int, ...], n_in: int) -> np.ndarray:
    """ours[index] of one (per-layer) weight of shape `shape`, reading only the rows/columns of the
    transformers tensor it needs (a safetensors slice reads just those bytes of the file)."""

    def covering(idx, dims):  # contiguous range of the flattened axes, then what is left to pick
        inner = math.prod(dims[1:])
        return slice(idx[0].start * inner, idx[0].stop * inner), (slice(None), *idx[1:])

    if n_in == 0 and len(tensor.get_shape()) < len(shape):  # flat: a bias [H*Q] holds our [H, Q]
        rows, pick = covering(index, shape)
        return tensor[rows].reshape(index[0].stop - index[0].start, *shape[1:])[pick]
    if n_in == 0:
        return tensor[index]
    cols, pick_in = covering(index[:n_in], shape[:n_in])
    rows, pick_out = covering(index[n_in:], shape[n_in:])
    lead_in = (index[0].stop - index[0].start, *shape[1:n_in])
    lead_out = (index[n_in].stop - index[n_in].start, *shape[n_in + 1 :])
    return tensor[rows, cols].T.reshape(*lead_in, *lead_out)[(*pick_in, *pick_out)]


@contextlib.contextmanager
def _checkpoint(path: Path):
    """tensor(name, shape): a lazy slice of transformers' tensor `name` in the checkpoint at `path` (one file
    or sharded with an index), checked against `shape`. Missing tensors, other shapes and files that are not
    safetensors (a pickle, a cut-short download) are refused, naming the file."""
    with contextlib.ExitStack() as stack:

        @functools.cache  # each file opened once
        def opened(file: str):
            try:
                return stack.enter_context(safe_open(path / file, "numpy"))
            except Exception as e:
                raise ValueError(f"{path / file}: not a readable safetensors file ({e})") from None

        index_file = path / "model.safetensors.index.json"
        if index_file.exists():
            file_of = json.loads(index_file.read_text())["weight_map"]
        elif (path / "model.safetensors").exists():
            file_of = dict.fromkeys(opened("model.safetensors").keys(), "model.safetensors")
        else:
            raise ValueError(f"{path} has no model.safetensors or model.safetensors.index.json")

        def tensor(name: str, expected_shape: tuple[int, ...]):
            if name not in file_of:
                raise ValueError(f"{path} has no tensor {name}")
            part = opened(file_of[name]).get_slice(name)
            if tuple(part.get_shape()) != expected_shape:
                raise ValueError(f"{path}: {name} has shape {part.get_shape()}, not {list(expected_shape)}")
            return part

        yield tensor


def _hf_shape(w: Weight, shape: tuple[int, ...]) -> tuple[int, ...]:
    """transformers' shape of one layer of `w` given our `shape`: nn.Linear's [out, in], a bias flat, else
    the same."""
    one = shape[1:] if w.axes[0] == "L" else shape
    if w.flat:
        return (math.prod(one),)
    return (math.prod(one[w.n_in :]), math.prod(one[: w.n_in])) if w.n_in else tuple(one)


def check_weights(path, arch: LlamaConfig) -> None:
    """Every tensor the model needs is in the checkpoint at `path`, with its shape, in files that open: from
    the headers alone, so that a run can check it before it writes anything."""
    with _checkpoint(resolve_path(path)) as tensor:
        for w in jax.tree.leaves(_weights(arch)):
            for layer in range(arch.num_layers) if w.axes[0] == "L" else [None]:
                tensor(w.hf.format(layer), _hf_shape(w, _shape(arch, w)))


def load_params(path, arch: LlamaConfig, mesh, dtype=jnp.float32, quantization: str = "none") -> dict:
    """Weights from a transformers safetensors checkpoint (one file or sharded with an index), each put
    straight into its NamedSharding. Every host reads only the slices its own devices hold. quantization
    "nf4" or "int8": the layers' projections are quantised as they are read (Quantized), the rest in dtype."""
    np_dtype = np.dtype(dtype)
    with _checkpoint(resolve_path(path)) as tensor:

        def load(w: Weight):
            if quantization != "none" and _quantizable(w):
                return _load_quantized(tensor, arch, mesh, w, quantization)
            shape = _shape(arch, w)
            hf_shape = _hf_shape(w, shape)

            @functools.cache  # devices holding the same slice (replicas) share one read
            def read_block(bounds: tuple[tuple[int, int], ...]) -> np.ndarray:
                index = tuple(slice(*b) for b in bounds)
                if w.axes[0] != "L":
                    return _read_part(tensor(w.hf, hf_shape), index, shape, w.n_in).astype(np_dtype)
                parts = [tensor(w.hf.format(i), hf_shape) for i in range(*bounds[0])]
                return np.stack([_read_part(p, index[1:], shape[1:], w.n_in) for p in parts]).astype(np_dtype)

            def read(index):
                return read_block(tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True)))

            return jax.make_array_from_callback(shape, NamedSharding(mesh, w.spec), read, dtype=np_dtype)

        return jax.tree.map(load, _weights(arch))


def _load_quantized(tensor, arch: LlamaConfig, mesh, w: Weight, kind: str) -> Quantized:
    """The projection `w` of the checkpoint (`tensor`: _checkpoint's), quantised as it is read: each device's
    slice of the codes and of the absmax from the whole blocks that hold it, one layer at a time in f32 (a
    block that straddles FSDP devices is read by each of them), then NF4's double quantisation."""
    parts, (out, inputs) = _quantized_parts(arch, w, kind, mesh), _hf_shape(w, _shape(arch, w))
    block = NF4_BLOCK if kind == "nf4" else inputs
    rows_per = dict(codes=2 if kind == "nf4" else 1, absmax=block)  # input rows per row of each

    @functools.cache  # a device's codes and absmax share one read, and so do replicas
    def read_blocks(layers: tuple, rows: tuple, cols: tuple) -> list[np.ndarray]:
        def one(layer: int) -> np.ndarray:  # [rows, cols] of the layer's weight
            return tensor(w.hf.format(layer), (out, inputs))[slice(*cols), slice(*rows)].T.astype(np.float32)

        quantized = [quantize(one(i), kind) for i in range(*layers)]  # (codes, absmax) of each layer
        return [np.stack(arrays) for arrays in zip(*quantized, strict=True)]

    def read(name: str, index: tuple) -> np.ndarray:
        layers, rows, cols = (s.indices(n)[:2] for s, n in zip(index, parts[name].shape, strict=True))
        first, last = (row * rows_per[name] for row in rows)  # the input rows asked for
        start = first // block * block
        codes, absmax = read_blocks(layers, (start, -(-last // block) * block), cols)
        if name == "absmax":  # whole blocks
            return absmax
        return codes[:, (first - start) // rows_per["codes"] : (last - start) // rows_per["codes"]]

    made = lambda name, read: jax.make_array_from_callback(parts[name].shape, parts[name].sharding, read)
    arrays = {name: made(name, functools.partial(read, name)) for name in ("codes", "absmax")}
    if kind == "nf4":  # the second level's groups run across devices: on the whole absmax, on each host
        second = _double_quantize(sharding.to_host(arrays["absmax"]))
        arrays |= {
            k: made(k, x.__getitem__) for k, x in zip(("absmax", "scale", "offset"), second, strict=True)
        }
    return Quantized(**arrays, shape=_shape(arch, w)[1:], n_in=w.n_in)


@functools.partial(jax.jit, static_argnames="dtype")
def _export_cast(x, layer, dtype):
    """One tensor for the export: layer `layer` of a stacked weight (None: the whole array), cast."""
    return (x if layer is None else x[layer]).astype(dtype)


def save_hf(
    params: dict,
    arch: LlamaConfig,
    out_dir,
    *,
    dtype: str = "bfloat16",
    max_shard_bytes: int = 5 * 2**30,
    generation_config: dict | None = None,
    extra_files=(),
) -> None:
    """Write a directory that transformers.AutoModelForCausalLM.from_pretrained loads unchanged:
    config.json, generation_config.json, safetensors shards of about max_shard_bytes (+ index when more
    than one), plus `extra_files` (tokenizer files, a LoRA adapter's folder) copied in.

    Every process must call it: each tensor is gathered whole, one at a time (host memory peak about
    one tensor), and only process 0 writes, atomically (sharding.atomic).
    """
    st_dtypes = {"float32": "F32", "bfloat16": "BF16"}  # safetensors' names
    if dtype not in st_dtypes:
        raise ValueError(f"dtype={dtype!r}; expected one of {list(st_dtypes)}")
    np_dtype, st_dtype = jnp.dtype(dtype), st_dtypes[dtype]

    # Every tensor in transformers' order: (name, shape, fetch), planned into shards before any is read.
    table = _weights(arch)

    def entry(key, array, layer=None):
        w = table[key] if layer is None else table["layers"][key]
        hf_shape = _hf_shape(w, _shape(arch, w))

        def fetch():
            if callable(array):  # an original weight read back and merged on the host (merge_lora_from_file)
                x = array(layer).astype(np_dtype)
            else:
                x = sharding.to_host(_export_cast(array, layer, np_dtype))  # whole on every host
            return x.reshape(hf_shape[1], hf_shape[0]).T if w.n_in else x.reshape(hf_shape)

        return w.hf.format(layer), hf_shape, fetch

    layers = [entry(key, array, i) for i in range(arch.num_layers) for key, array in params["layers"].items()]
    tail = [entry(key, params[key]) for key in ("final_norm", "lm_head") if key in params]
    entries = [entry("embed", params["embed"]), *layers, *tail]
    headers = _plan_shards([(name, shape) for name, shape, _ in entries], max_shard_bytes, st_dtype, np_dtype)
    fetches = {name: fetch for name, _, fetch in entries}
    names = [f"model-{i + 1:05d}-of-{len(headers):05d}.safetensors" for i in range(len(headers))]
    names = names if len(headers) > 1 else ["model.safetensors"]

    writer = sharding.is_writer()
    with sharding.atomic(out_dir) if writer else contextlib.nullcontext() as tmp:
        if writer:
            tmp.mkdir(parents=True)
        for header, file_name in zip(headers, names, strict=True):
            # Every process takes part in each gather; only the writer's bytes land in a file.
            with open(tmp / file_name if writer else os.devnull, "wb") as f:
                # safetensors: header length (u64 little-endian), JSON header padded to 8 bytes, the data.
                blob = json.dumps({"__metadata__": {"format": "pt"}} | header, separators=(",", ":")).encode()
                blob += b" " * (-len(blob) % 8)
                f.write(struct.pack("<Q", len(blob)) + blob)
                for name in header:
                    f.write(np.ascontiguousarray(fetches[name]()).tobytes())
        if writer:
            if len(headers) > 1:
                weight_map = {n: file for header, file in zip(headers, names, strict=True) for n in header}
                total_size = sum(math.prod(s) for _, s, _ in entries) * np_dtype.itemsize
                index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            _write_beside_weights(tmp, arch, dtype, generation_config, extra_files)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"save_hf {out_dir}")


def _plan_shards(tensors, max_shard_bytes: int, st_dtype: str, dtype) -> list[dict]:
    """(name, shape) of consecutive tensors into shards of up to max_shard_bytes, each planned as its
    safetensors header (where each tensor's raw row-major bytes lie), so that the tensors can then be
    fetched and written one at a time."""
    headers, end = [{}], 0
    for name, shape in tensors:
        size = math.prod(shape) * dtype.itemsize
        if headers[-1] and end + size > max_shard_bytes:
            headers.append({})
            end = 0
        headers[-1][name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [end, end + size]}
        end += size
    return headers


def _write_beside_weights(folder: Path, arch: LlamaConfig, dtype: str, generation_config, extra_files):
    """An export's config.json and generation_config.json (the model's ids, then `generation_config`'s), and
    `extra_files` copied in: files, or folders (a LoRA adapter)."""
    (folder / "config.json").write_text(json.dumps(arch.to_hf(dtype), indent=2))
    generation = {"bos_token_id": arch.bos_token_id, "eos_token_id": arch.to_hf()["eos_token_id"]}
    if arch.pad_token_id is not None:
        generation["pad_token_id"] = arch.pad_token_id
    generation |= generation_config or {}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    for extra in map(Path, extra_files):
        (shutil.copytree if extra.is_dir() else shutil.copy)(extra, folder / extra.name)


def save_peft_adapter(
    lora: dict, arch: LlamaConfig, rank: int, alpha: float, out_dir, base_model: str
) -> None:
    """The adapters as a PEFT LoRA adapter folder that peft.PeftModel.from_pretrained(base, out_dir) loads:
    adapter_config.json and adapter_model.safetensors with PEFT's names, lora_A [R, in] and lora_B [out, R]
    per layer (transformers' layout of our [in, R] and [R, out]). Every process must call it (the adapters
    are gathered); process 0 writes, atomically."""
    tensors = {}
    for name, adapter in lora.items():
        module = "base_model.model." + _LAYER[name].hf.removesuffix(".weight")
        a, b = (sharding.to_host(adapter[k]).astype(np.float32) for k in "ab")
        for i in range(arch.num_layers):
            tensors[f"{module.format(i)}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, rank).T)
            tensors[f"{module.format(i)}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(rank, -1).T)
    modules = sorted({_LAYER[name].hf.split(".")[-2] for name in lora})  # q_proj, ...
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=rank, lora_alpha=alpha, target_modules=modules)
    config |= dict(lora_dropout=0.0, bias="none", fan_in_fan_out=False, use_rslora=False, inference_mode=True)
    config["base_model_name_or_path"] = base_model
    if sharding.is_writer():
        with sharding.atomic(out_dir) as tmp:
            tmp.mkdir(parents=True)
            safetensors.numpy.save_file(tensors, tmp / "adapter_model.safetensors")
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
