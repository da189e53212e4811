"""Llama-style decoders as pure functions over a pytree of jax.Arrays, with Hugging Face weights in and out.

Here: `LlamaConfig` from a transformers config.json, one table declaring every weight (axes, mesh
placement, initializer, transformers' name), sharded random init, `forward` -> final normed hidden states
(rows of one sequence, or of several, each attending within its views: prefix sharing and packing), LoRA
adapters declared beside their weights (merged for export, or saved as a PEFT adapter) on a frozen base that
may be quantised (QLoRA: NF4 or int8, as bitsandbytes), loading safetensors straight into shards, and an
export that `transformers` loads unchanged. It reproduces
`LlamaForCausalLM` checkpoints: Llama 2 and TinyLlama (rope_type default), Llama 3, 3.1 and 3.2
(rope_type llama3), grouped-query and multi-query attention and tied embeddings; and the families that are
the same block with small additions (_FAMILIES): Mistral, Qwen2 / Qwen2.5 (q, k, v biases) and Qwen3 (an
RMSNorm over each head of q and k), exported as the same family. Anything in a config.json it could not
reproduce exactly is refused in one line: other model types (MoE, Gemma), sliding-window layers (Qwen's
use_sliding_window, sliding layer_types; a Mistral window shorter than the run's max_seq_len, check_window),
other rope types, partial rotary embeddings, other biases, activations other than SiLU.
Left out on purpose: KV caches and generation, dropout, quantization other than a frozen base's (QLoRA).

Conventions
  Mesh axes (sharding.py): data = replicas, fsdp = batch split and params sharded (gathered one layer
  at a time), tensor = heads and MLP hidden split Megatron-style.
  Dimension letters: B batch, T sequence, D model, H query heads, K kv heads, Q head dim,
  F MLP hidden, V vocab, L layers (R: a LoRA adapter's rank). Einsum subscripts use the same letters in
  lower case: forward writes each projection out, e.g. "btd,dhq->bthq" for wq, on the axes the weight
  table declares (tests/test_model.py holds the two equal).
  `arch` is always a LlamaConfig (the model's shape); params are f32, layers stacked on a leading L
  axis; `_weights` lists each one's axes and spec.
  Activations between blocks are [B, T, D] in the compute dtype, B split over ("data", "fsdp").

What the DPO step gets (call inside `jax.set_mesh(mesh)`, under jit):
  forward(...)            [B, T, D] in the compute dtype, sharded P(("data", "fsdp"), None, None).
  lm_head_weight(params)  [D, V] in the params' dtype, sharded P("fsdp", "tensor") (also when tied:
                          embed.T). Gather it over fsdp before the matmul, e.g.
                          reshard(w.astype(dt), P(None, "tensor")); the logits then come out
                          P(("data", "fsdp"), None, "tensor"), vocab split, as in `logits` below.
  dtype_of(name)          the compute dtype a setting names ("auto": f32 on CPU, bf16 on accelerators).
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

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, reshard
from jax.sharding import PartitionSpec as P
from safetensors import safe_open

import sharding

BATCH = P(sharding.BATCH_AXES, None, None)  # [B, T, D] between blocks


# --- config -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's rope frequency rescaling (rope_type "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


# transformers' names for the config fields it spells differently.
_HF_KEYS = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
}


# The families read: what their config.json must hold (a key that is absent means the value shown), and
# what an export writes. Each is Llama's block; what a family adds is a property below and a weight of _LAYER.
_FAMILIES = {
    "llama": dict(architectures=["LlamaForCausalLM"], attention_bias=False, mlp_bias=False),
    "mistral": dict(architectures=["MistralForCausalLM"]),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=False),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], attention_bias=False, use_sliding_window=False),
}


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
    rope_scaling: Llama3RopeScaling | None = None
    tie_word_embeddings: bool = False  # Llama 3.2 1B/3B: the LM head is embed.T
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    initializer_range: float = 0.02  # std of the normal init of every matrix (as transformers)
    model_type: str = "llama"  # the family (_FAMILIES): its weight names, and what it adds to Llama's block
    sliding_window: int | None = None  # Mistral's attention window; a run refuses one shorter than its rows

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

    @property
    def qkv_bias(self) -> bool:  # Qwen2 / Qwen2.5: q, k and v projections with a bias
        return self.model_type == "qwen2"

    @property
    def qk_norm(self) -> bool:  # Qwen3: an RMSNorm over each head of q and of k, before RoPE
        return self.model_type == "qwen3"

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
        if family not in _FAMILIES:  # MoE (mixtral, qwen3_moe), Gemma, ...
            refuse("model_type", family)
        for key, value in (_FAMILIES[family] | dict(hidden_act="silu")).items():
            if hf.get(key) not in (None, value):
                refuse(key, hf[key])
        if "sliding_attention" in (hf.get("layer_types") or []):
            refuse("layer_types", hf["layer_types"])
        # The Hub's Llama 3.x config.json has rope_theta and rope_scaling at the top level; transformers 5
        # writes rope_parameters = {rope_type, rope_theta, scaling...}. Same precedence as transformers 5.
        rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        partial_rotary_factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        if partial_rotary_factor != 1.0:
            refuse("partial_rotary_factor", partial_rotary_factor)
        if rope_type not in ("default", "llama3"):
            refuse("rope_type", rope_type)
        scaling = None
        if rope_type == "llama3":
            factors = (float(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
            original = rope.get("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
            scaling = Llama3RopeScaling(*factors, int(original))
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
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=() if eos is None else tuple(eos) if isinstance(eos, list) else (eos,),
            pad_token_id=hf.get("pad_token_id"),
            initializer_range=hf.get("initializer_range", 0.02),
            model_type=family,
            # Qwen's window is off (use_sliding_window false, checked above); Mistral's: transformers' default
            sliding_window=hf.get("sliding_window", 4096) if family == "mistral" else None,
        )

    def to_hf(self, torch_dtype: str = "bfloat16") -> dict:
        llama3 = {} if self.rope_scaling is None else {"rope_type": "llama3", **vars(self.rope_scaling)}
        eos = list(self.eos_token_id)
        hf = dict(hidden_act="silu", use_cache=True, dtype=torch_dtype, torch_dtype=torch_dtype)
        # Every field under transformers' name for it (a window only where the family has one); eos_token_id
        # and rope_scaling are respelled below.
        fields = {_HF_KEYS.get(k, k): v for k, v in vars(self).items()}
        hf |= fields | _FAMILIES[self.model_type]
        if self.model_type != "mistral":
            del hf["sliding_window"]
        if self.model_type == "qwen2" and self.head_dim * self.num_heads == self.hidden_size:
            del hf["head_dim"]  # Qwen2's config has none (its modeling reads one when given)
        hf["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
        # transformers 5 reads rope_parameters; 4.x reads rope_theta and rope_scaling, which 5 also
        # accepts (rope_scaling first): both spell the same values.
        # llama3's rope_type, when there is one, replaces the default.
        hf["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta, **llama3}
        hf["rope_scaling"] = llama3 or None
        return hf


# --- parameters -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Weight:
    axes: str  # one dimension letter per axis (conventions header; R: a LoRA adapter's rank)
    spec: P  # where each axis lives on the mesh
    init: str  # "normal" (std initializer_range), "ones" (norm scales), "kaiming" or "zeros" (LoRA's A, B)
    hf: str = ""  # the tensor's name in transformers' Llama; a layer's weights are one tensor per layer ({})
    n_in: int = 0  # how many axes (after L) make up nn.Linear's input axis; 0: transformers' layout
    rank: int = 0  # R, for adapters
    flat: bool = False  # transformers holds it as one axis: a bias [H*Q], ours [H, Q]
    family: str = ""  # the LlamaConfig property that adds it (qkv_bias, qk_norm); "": every model has it


F, T = "fsdp", "tensor"
_ATTN = "model.layers.{}.self_attn."
# One decoder layer's weights, stacked on a leading L axis. nn.Linear stores [out, in]; we store [in, out]
# split into named axes, so ours = hf.T reshaped.
_LAYER = {
    "attn_norm": Weight("LD", P(None, None), "ones", "model.layers.{}.input_layernorm.weight"),
    "wq": Weight("LDHQ", P(None, F, T, None), "normal", "model.layers.{}.self_attn.q_proj.weight", 1),
    "wk": Weight("LDKQ", P(None, F, T, None), "normal", "model.layers.{}.self_attn.k_proj.weight", 1),
    "wv": Weight("LDKQ", P(None, F, T, None), "normal", "model.layers.{}.self_attn.v_proj.weight", 1),
    # Biases and head norms are split like their weight's output axes (heads over tensor), and small enough
    # to stay whole over fsdp.
    "bq": Weight("LHQ", P(None, T, None), "zeros", _ATTN + "q_proj.bias", flat=True, family="qkv_bias"),
    "bk": Weight("LKQ", P(None, T, None), "zeros", _ATTN + "k_proj.bias", flat=True, family="qkv_bias"),
    "bv": Weight("LKQ", P(None, T, None), "zeros", _ATTN + "v_proj.bias", flat=True, family="qkv_bias"),
    "q_norm": Weight("LQ", P(None, None), "ones", _ATTN + "q_norm.weight", family="qk_norm"),
    "k_norm": Weight("LQ", P(None, None), "ones", _ATTN + "k_norm.weight", family="qk_norm"),
    "wo": Weight("LHQD", P(None, T, None, F), "normal", "model.layers.{}.self_attn.o_proj.weight", 2),
    "mlp_norm": Weight("LD", P(None, None), "ones", "model.layers.{}.post_attention_layernorm.weight"),
    "w_gate": Weight("LDF", P(None, F, T), "normal", "model.layers.{}.mlp.gate_proj.weight", 1),
    "w_up": Weight("LDF", P(None, F, T), "normal", "model.layers.{}.mlp.up_proj.weight", 1),
    "w_down": Weight("LFD", P(None, T, F), "normal", "model.layers.{}.mlp.down_proj.weight", 1),
}
_WEIGHTS = {  # in transformers' order; embed = lm_head.T when tied, so it is laid out as its transpose
    "embed": Weight("VD", P(T, F), "normal", "model.embed_tokens.weight"),
    "layers": _LAYER,
    "final_norm": Weight("D", P(None), "ones", "model.norm.weight"),
    "lm_head": Weight("DV", P(F, T), "normal", "lm_head.weight", 1),
}


def _weights(arch: LlamaConfig) -> dict:
    """Every weight, once (no lm_head when tied). FSDP shards one non-tensor axis; tensor splits heads (q,
    k, v on their head axis, o on its input heads) and F (gate, up on their output, down on its input),
    Megatron-style, so attention and the MLP each need one all-reduce over tensor. One kv head (multi-query
    attention) cannot be split: it is whole on every tensor device, and each computes its own query heads
    against it."""
    weights = {k: w for k, w in _WEIGHTS.items() if k != "lm_head" or not arch.tie_word_embeddings}
    layer = {k: w for k, w in _LAYER.items() if not w.family or getattr(arch, w.family)}
    if arch.num_kv_heads == 1:
        whole_k = lambda w: P(*(None if a == "K" else s for a, s in zip(w.axes, w.spec, strict=True)))
        layer = {k: dataclasses.replace(w, spec=whole_k(w)) if "K" in w.axes else w for k, w in layer.items()}
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


def check_fits(arch: LlamaConfig, mesh, batch_size: int, batch_name: str = "batch size") -> None:
    """The one divisibility rule, checked once before anything is built: every weight axis splits evenly
    over the mesh axes its spec names (kv heads over tensor among them), and the batch (pairs per forward
    pass) over data x fsdp and over the processes, which each load their own rows. A one-line error, naming
    the batch as `batch_name` (the config field that set it)."""
    splits = [(batch_name, batch_size, sharding.BATCH_AXES)]
    for w in jax.tree.leaves(_weights(arch)):
        splits += zip([_SIZE_FIELDS[a] for a in w.axes], _shape(arch, w), w.spec, strict=True)
    for what, size, axes in splits:
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        n = math.prod(mesh.shape[a] for a in axes)
        if size % n:
            names = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
            raise ValueError(f"{what} ({size}) is not divisible by {names} ({n})")
    if batch_size % jax.process_count():
        processes = jax.process_count()
        raise ValueError(f"{batch_name} ({batch_size}) is not divisible by the {processes} processes")


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


def check_window(arch: LlamaConfig, max_seq_len: int, model_dir: Path) -> None:
    """A sliding window (Mistral v0.1's 4096) attends to the last sliding_window tokens only: the same as
    full attention while no sequence is longer, which is all this code computes. A shorter window than
    max_seq_len is refused in one line, naming model_dir's config.json as load_config's refusals do."""
    if arch.sliding_window is not None and arch.sliding_window < max_seq_len:
        raise ValueError(
            f"{Path(model_dir) / 'config.json'}: config.json has sliding_window={arch.sliding_window}, "
            f"shorter than max_seq_len {max_seq_len}: attention within a window is not implemented; use "
            f"max_seq_len <= {arch.sliding_window}"
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
    """[D, V], sharded P("fsdp", "tensor")."""
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
    """One layer of a quantised weight, gathered over fsdp, in our axes and `dtype` (computed in f32 and
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
    absmax with its block, or whole along the input axis where a block straddles fsdp devices; NF4's scale
    and offset, 4 bytes per 16,384 weights and per layer, whole on every device."""
    (out, inputs), layers = _hf_shape(w, _shape(arch, w)), arch.num_layers
    spec = P(None, w.spec[1], w.spec[1 + w.n_in])
    blocks = inputs // NF4_BLOCK if kind == "nf4" else 1
    straddled = blocks % (mesh.shape[spec[1]] if spec[1] else 1)
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
    where it lies) or whole bytes where fsdp does (a block may straddle those: it is gathered first). One
    line, naming the size."""
    for w in jax.tree.leaves(_weights(arch)):
        if kind != "nf4" or not _quantizable(w):
            continue
        inputs, axis = _hf_shape(w, _shape(arch, w))[1], w.spec[1]
        devices = mesh.shape[axis] if axis else 1
        size = " x ".join(_SIZE_FIELDS[a] for a in w.axes[1 : 1 + w.n_in]) + f" ({inputs})"
        if inputs % NF4_BLOCK:
            raise ValueError(f"base_quantization nf4: {size} is not a multiple of its blocks of {NF4_BLOCK}")
        need = f"whole blocks of {NF4_BLOCK}" if axis == "tensor" else "an even count (two codes a byte)"
        if inputs // devices % (NF4_BLOCK if axis == "tensor" else 2):
            raise ValueError(
                f"base_quantization nf4: {size} over {axis}={devices} leaves {inputs // devices} weights a "
                f"device, and NF4 needs {need} there"
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


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """In f32 whatever the compute dtype (as transformers), back to x's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * x32).astype(x.dtype)


def rope_inverse_frequencies(arch: LlamaConfig) -> np.ndarray:
    """[Q/2] f32, transformers' default and llama3 rope init redone in the same float32 steps (bit for bit
    at Llama 3's theta; elsewhere torch's f32 pow may be one ulp off the correctly rounded one we use)."""
    Q = arch.head_dim
    exponents = np.arange(0, Q, 2).astype(np.float32) / np.float32(Q)
    inv_freq = 1 / (np.float64(arch.rope_theta) ** exponents.astype(np.float64)).astype(np.float32)
    s = arch.rope_scaling
    if s is None:
        return inv_freq
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


def _attention(q, k, v, lengths, impl):
    """Causal attention within each row's first `lengths` tokens; with `lengths` a tuple of views, within
    each view (_view_attention)."""
    if isinstance(lengths, tuple):
        return _view_attention(q, k, v, *lengths, impl)

    def attend(q, k, v, lengths):
        masks = dict(is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths)
        return jax.nn.dot_product_attention(q, k, v, implementation=impl, **masks)

    if impl == "cudnn":
        # Explicit-mode workaround: the cuDNN kernel is a custom_partitioning primitive whose output type
        # carries no sharding, so under explicit axes the result would read as replicated. Run it under
        # auto axes and pin its output to q's sharding; its own partitioning rule splits batch and heads.
        attend = jax.sharding.auto_axes(attend, out_sharding=jax.typeof(q).sharding.spec)
    return attend(q, k, v, lengths)


def _view_attention(q, k, v, index, lengths, slot, impl):
    """Attention over views of the rows (packing, prefix sharing): view j of row b is the sequence of the
    row's positions index[b, j] ([B, J, S]), e.g. [prompt | chosen] and [prompt | rejected] of a pair. Each
    view gathers its tokens' q, k, v (already rotated at their positions), attends causally within its
    first lengths[b, j] tokens with the same kernel rows use, and every token of a row takes its output
    from the flat view position slot[b, t]. Gathers along a row stay on its device."""
    b, n, s = index.shape

    def split(x, shape):  # heads and head dim stay split as x's are (one kv head is whole: _weights)
        heads = (*jax.typeof(x).sharding.spec, None, None)[2:4]  # a spec may leave out trailing unsplit axes
        return jnp.reshape(x, shape, out_sharding=P(sharding.BATCH_AXES, None, *heads))

    flat = index.reshape(b, n * s)[..., None, None]
    views = lambda x: split(jnp.take_along_axis(x, flat, axis=1), (b * n, s, *x.shape[2:]))
    lengths = jnp.reshape(lengths, (b * n,), out_sharding=P(sharding.BATCH_AXES))
    out = split(_attention(views(q), views(k), views(v), lengths, impl), (b, n * s, *q.shape[2:]))
    return jnp.take_along_axis(out, slot[..., None, None], axis=1)


def _gathered(w: jax.Array | Quantized, dtype) -> jax.Array:
    """FSDP: one layer's weight cast to the compute dtype (halving the traffic in bf16) and gathered
    whole over "fsdp" right before use; the tensor split stays. Only one layer is whole at a time. A quantised
    weight is gathered as it is (NF4: about a quarter of bf16's bytes), then dequantised."""
    if isinstance(w, Quantized):
        return _dequantized(jax.tree.map(lambda x: _gathered(x, x.dtype), w), dtype)
    spec = jax.typeof(w).sharding.spec
    return reshard(w.astype(dtype), P(*(None if a == "fsdp" else a for a in spec)))


def _weights_axes(name: str) -> tuple[str, int]:
    """A layer weight's axes without L, as einsum letters, and how many lead ones make its input."""
    return _LAYER[name].axes[1:].lower(), _LAYER[name].n_in


def _linear(spec: str, x, w: jax.Array, adapter: dict | None, scale: float, out=None) -> jax.Array:
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
    adapter), with the family's additions: Qwen2's biases, Qwen3's RMSNorm over each head of q and k."""
    q = project("btd,dhq->bthq", h, "wq")  # B over the batch axes, heads over tensor
    k = project("btd,dkq->btkq", h, "wk")
    v = project("btd,dkq->btkq", h, "wv")
    if arch.qkv_bias:
        q, k, v = (y + w[b].astype(y.dtype) for y, b in ((q, "bq"), (k, "bk"), (v, "bv")))
    if arch.qk_norm:
        q, k = rms_norm(q, w["q_norm"], arch.rms_norm_eps), rms_norm(k, w["k_norm"], arch.rms_norm_eps)
    return q, k, v


# Per-layer activation checkpointing: "full" keeps only each layer's input; "save_matmuls" also keeps the
# projections' outputs (dots without batch dims, so not the [B, H, T, T] attention scores).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
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
    """Final RMS-normed hidden states [B, T, D] in compute_dtype, sharded P(("data", "fsdp"), None, None).

    tokens int32 [B, T], right-padded; lengths int32 [B] real tokens per row (None: all real). Positions
    are 0..T-1, or `positions` [B, T]. With `views` (index [B, J, S], lengths [B, J], slot [B, T]; see
    _view_attention) a row holds several sequences, each attending within its views. Pad positions give
    finite values that the caller masks out. lora: adapters (lora_weights' tree) added to their weights'
    projections with lora_scale (alpha / rank). attention_impl: None (cuDNN on GPU where it applies, else
    XLA), "xla" or "cudnn".
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; expected one of {list(REMAT_POLICIES)}")
    if attention_impl is None:  # jax's default is XLA everywhere; on GPU cuDNN's fused kernel is far faster
        Q = arch.head_dim
        fits_cudnn = jnp.dtype(compute_dtype) in (jnp.bfloat16, jnp.float16) and Q % 8 == 0 and Q <= 128
        attention_impl = "cudnn" if jax.default_backend() == "gpu" and fits_cudnn else "xla"
    with jax.named_scope("embed"):
        # Gather the table whole first: a lookup into a vocab/fsdp-sharded table makes XLA replicate it
        # through an inefficient path anyway; this way it is one all-gather (a reduce-scatter backward).
        table = reshard(params["embed"].astype(compute_dtype), P(None, None))
        x = table.at[tokens].get(out_sharding=BATCH)
    positions = jnp.arange(tokens.shape[1]) if positions is None else positions
    angles = positions.astype(jnp.float32)[..., None] * rope_inverse_frequencies(arch)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    # A row (view) with no real token would attend to nothing; letting position 0 see itself keeps it finite.
    if views is not None:
        lengths = (views[0], jnp.maximum(views[1], 1).astype(jnp.int32), views[2])
    elif lengths is not None:
        lengths = reshard(jnp.maximum(lengths, 1).astype(jnp.int32), P(sharding.BATCH_AXES))

    def layer(x, weights):  # one decoder layer
        w, adapters = weights

        def project(spec, h, name, out=None):  # h times the weight `name`, and its LoRA adapter if any
            adapter = None if adapters is None else adapters.get(name)
            return _linear(spec, h, w[name], adapter, lora_scale, out)

        with jax.named_scope("attention"):
            h = rms_norm(x, w["attn_norm"], arch.rms_norm_eps)
            q, k, v = _qkv(project, h, w, arch)
            o = _attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, lengths, attention_impl)
            # The sum over heads spans the tensor axis: out_sharding asks for the all-reduce.
            x = x + project("bthq,hqd->btd", o, "wo", BATCH)
        with jax.named_scope("mlp"):
            h = rms_norm(x, w["mlp_norm"], arch.rms_norm_eps)
            gate, up = project("btd,df->btf", h, "w_gate"), project("btd,df->btf", h, "w_up")  # F over tensor
            x = x + project("btf,fd->btd", jax.nn.silu(gate) * up, "w_down", BATCH)
        return x, None

    if remat != "none":
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat], prevent_cse=False)
    # One traced layer, scanned over the stacked weights: compile time does not grow with depth.
    x, _ = jax.lax.scan(layer, x, (params["layers"], lora))
    return rms_norm(x, params["final_norm"], arch.rms_norm_eps)


def logits(params: dict, tokens: jax.Array, arch: LlamaConfig, **forward_kwargs) -> jax.Array:
    """[B, T, V] f32, vocab split over tensor. For tests and teaching: DPO fuses the head into its loss."""
    hidden = forward(params, tokens, arch, **forward_kwargs)
    head = reshard(lm_head_weight(params).astype(hidden.dtype), P(None, "tensor"))
    out = P(sharding.BATCH_AXES, None, "tensor")
    return jnp.einsum("btd,dv->btv", hidden, head, preferred_element_type=jnp.float32, out_sharding=out)


def step_flops(arch: LlamaConfig, lengths, live_reference: bool, lora: bool = False, tokens=None):
    """Model FLOPs of one DPO step over the real tokens, numpy or traced: 6N per token for the policy's
    forward and backward (4N with LoRA: frozen weights get no gradient), 2N for a live reference's forward,
    plus causal attention (QK^T and PV over half the T x T square: 2 * 2 * T^2 / 2 * H * Q per layer for a
    forward pass) over each sequence of `lengths`. `tokens`: how many ran, when not their sum (a shared
    prompt runs once)."""
    passes = (4 if lora else 6) + (2 if live_reference else 0)
    lengths = lengths.astype(np.float32)
    tokens = lengths.sum() if tokens is None else tokens
    attention = 2 * arch.num_layers * arch.num_heads * arch.head_dim * (lengths**2).sum()
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
    block that straddles fsdp devices is read by each of them), then NF4's double quantisation."""
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
    def entry(key, array, layer=None):
        w = _WEIGHTS[key] if layer is None else _LAYER[key]
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
