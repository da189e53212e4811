"""Direct Preference Optimization for Llama models, in one file you can read top to bottom.

    python dpo.py                                  # offline demo: tiny model, synthetic pairs, CPU
    python dpo.py --config.beta 0.01 \\
        --config.model-name-or-path meta-llama/Llama-3.1-8B-Instruct \\
        --config.train-data HuggingFaceH4/ultrafeedback_binarized --config.train-split train_prefs \\
        --config.validation-data HuggingFaceH4/ultrafeedback_binarized --config.validation-split test_prefs
    python dpo.py ... --config.reference-mode precompute     # the reference runs once, before training
    python dpo.py ... --config.loss-type sigmoid bco_pair sft --config.loss-weights 0.8 0.2 1.0
    python dpo.py ... --config.lora-rank 16 --config.packing      # adapters; several pairs a row
    python dpo.py --help                           # every field, with its meaning

The DPO loss (Rafailov et al., 2023) for a pair (prompt x, chosen y_w, rejected y_l) is
    -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])
where pi is the policy being trained and ref the frozen starting model; `dpo_loss` holds it and the
variants researchers compare, under TRL's names. Each step runs the policy and the reference once over
[chosen; rejected] as one batch, turns final hidden states into summed log-probs with a chunked LM head
that never builds the [2B, T, V] logits, and takes one AdamW step (accumulated over microbatches when
they are set; an update whose loss or gradient is not finite is not applied). Around the step:
evaluation, atomic checkpoints with exact resume, SIGTERM-safe stopping, Hugging Face export,
metrics.jsonl and Weights & Biases. The reference's log-probs can instead be computed once before
training and cached beside the data (`reference_mode precompute`). With `lora_rank` only LoRA adapters
train and the reference is the base without them; `prefix_sharing` (the default) runs each pair's prompt
once and `packing` puts several pairs in a row (data._packed lays the rows out, pair_logps sums per pair).

Left out on purpose: generation, KV caches, quantization, pipeline parallelism.
model.py holds the Llama, sharding.py the mesh and file writing, data.py the tokenizer and loader.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import data
import model
import sharding

# dpo_loss's losses, by TRL's names; `--config.loss-type` takes one or more of them.
LOSS_TYPES = (
    "sigmoid hinge ipo exo_pair nca_pair robust bco_pair sppo_hard apo_zero apo_down discopop sigmoid_norm"
)
LOSS_TYPES = (*LOSS_TYPES.split(), "simpo", "aot", "aot_unpaired", "sft")
SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo")  # they use label_smoothing
BATCH_LOSSES = {"aot", "aot_unpaired"}  # losses over the whole batch, not sums over its pairs
ADAPTABLE = tuple(model.LORA_TARGETS)  # lora_targets' choices
# Compiled programs outlive the run here unless --config.compilation-cache-dir says otherwise.
CACHE_DIR = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dpo-jax")
# Batch shapes a run compiles (data.plan_shapes), each a program: on an accelerator a compile costs a second
# or two of steps per billion parameters and a shape, so few shapes beat a little less padding.
TRAIN_SHAPES, EVAL_SHAPES = 4, 2


@dataclasses.dataclass(frozen=True)
class Config:
    # --- model and data
    model_name_or_path: str = "demo"  # HF Hub id or local dir of a LlamaForCausalLM; "demo" builds a tiny one
    reference_model_path: str | None = None  # frozen reference model; default: the policy's starting weights
    tokenizer: str | None = None  # HF Hub id or local dir; default: the model's own
    train_data: str | None = None  # data.py output dir, or raw data: Hub dataset id, dir, .parquet/.jsonl
    train_split: str = "train"  # split of a raw Hub dataset (UltraFeedback: train_prefs)
    validation_data: str | None = None  # separate validation data; when given, used instead of a split
    validation_split: str = "test"  # split of a raw Hub validation dataset (UltraFeedback: test_prefs)
    validation_split_fraction: float | None = 0.1  # train_data held out for eval when no validation_data
    max_seq_len: int = 2048  # longest side (tokens); raw data: longer pairs dropped; tokenized data: refused
    output_dir: str = "runs/dpo"  # run directory: config.json, metrics.jsonl, checkpoints/, hf/
    overwrite: bool = False  # replace a run with another config: deletes its checkpoints/, hf/, metrics.jsonl
    # --- the loss (dpo_loss has each one's formula and paper)
    beta: float = 0.1  # strength of the pull toward the reference (0.01-0.05 free, 0.1-0.5 close)
    loss_type: tuple[Literal[LOSS_TYPES], ...] = ("sigmoid",)  # one or more losses, summed with loss_weights
    loss_weights: tuple[float, ...] | None = None  # one weight per loss_type; None: 1 each
    label_smoothing: float = 0.0  # flipped-label share (sigmoid, robust, exo_pair, aot, aot_unpaired, simpo)
    discopop_tau: float = 0.05  # discopop's temperature
    simpo_gamma: float = 0.5  # simpo's target reward margin
    reference_mode: Literal["live", "precompute"] = "live"  # reference: each step, or once before training
    # --- LoRA
    lora_rank: int = 0  # adapters of this rank on the frozen model, the reference its base; 0: full tuning
    lora_alpha: float | None = None  # LoRA scale alpha / rank, alpha > 0; None: alpha = 2 * rank
    lora_targets: tuple[Literal[ADAPTABLE], ...] = ADAPTABLE  # the projections adapted (with lora_rank)
    # --- optimization
    train_batch_size: int = 128  # preference pairs per optimizer step (global, over all devices)
    microbatch_size: int | None = None  # pairs per forward/backward; gradients accumulate up to the batch
    num_train_steps: int = 2000  # optimizer steps
    learning_rate: float = 5e-7  # peak learning rate
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"  # shape after warmup, ending at min_lr
    warmup: float = 0.1  # warmup length: a fraction of the run when < 1, else steps
    cooldown: float = 0.1  # final linear anneal to min_lr: a fraction of the run when < 1, else steps
    min_lr_ratio: float = 0.0  # final learning rate as a fraction of the peak
    weight_decay: float = 0.0  # AdamW decoupled weight decay (not applied to norm weights)
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; None: no clipping
    adam_b1: float = 0.9  # AdamW beta1
    adam_b2: float = 0.95  # AdamW beta2
    seed: int = 0  # data order and validation split
    group_by_length: bool = False  # pairs of like length share a batch (sorted in runs of 64): less padding
    prefix_sharing: bool = True  # one sequence a pair, [prompt | chosen | rejected]: the prompt runs once
    packing: bool = False  # several pairs a row, each attending within itself (exact): little padding
    # --- compute and parallelism
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU/TPU, f32 on CPU
    reference_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # frozen reference weights, as above
    remat: Literal["none", "full", "save_matmuls"] = "full"  # what each layer keeps for the backward pass
    attention_impl: Literal["auto", "xla", "cudnn"] = "auto"  # jax.nn.dot_product_attention backend
    logits_chunk_size: int = 4096  # vocabulary entries per chunk of the fused LM head + log-softmax
    mesh_data: int = 1  # pure data-parallel replicas
    mesh_fsdp: int = -1  # FSDP: batch and parameters sharded; -1 takes the remaining devices
    mesh_tensor: int = 1  # tensor parallel: heads and MLP hidden split
    coordinator_address: str | None = None  # multi-process: host:port of process 0 (auto on TPU/SLURM)
    num_processes: int | None = None  # multi-process: number of processes (auto on TPU/SLURM)
    process_id: int | None = None  # multi-process: this process's index (auto on TPU/SLURM)
    # --- evaluation, checkpoints, export, logging
    steps_per_eval: int = 500  # evaluate every this many steps (and at step 0 and the end)
    max_eval_batches: int | None = None  # cap on evaluation batches; None: the whole validation set
    steps_per_checkpoint: int = 500  # checkpoint every this many steps (and at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    steps_per_hf_export: int = 500  # export for transformers every this many steps (and at the end)
    hf_save_dtype: Literal["bfloat16", "float32"] = "bfloat16"  # dtype of exported weights
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient: stop, or skip the update
    log_every: int = 1  # console line every this many steps
    compilation_cache_dir: str | None = CACHE_DIR  # compiled programs kept for the next run; None: off
    wandb_project: str | None = None  # log to Weights & Biases too (needs `pip install wandb`)

    def __post_init__(self):
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(message)

        micro, frac = self.microbatch_size, self.validation_split_fraction
        ls, losses, weights = self.label_smoothing, self.loss_type, self.loss_weights
        for name, value in dataclasses.asdict(self).items():
            need(not isinstance(value, float) or math.isfinite(value), f"{name} must be finite, got {value}")
        need(all(map(math.isfinite, weights or ())), f"loss_weights must be finite, got {weights}")
        positive = (
            "beta train_batch_size logits_chunk_size steps_per_eval steps_per_checkpoint keep_checkpoints"
        )
        for name in (positive + " steps_per_hf_export log_every discopop_tau").split():
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_grad_norm", "max_eval_batches"):
            need(getattr(self, name) is None or getattr(self, name) > 0, f"{name} must be > 0 or None")
        divides = micro is None or micro > 0 and self.train_batch_size % micro == 0
        need(divides, f"microbatch_size {micro} must divide train_batch_size {self.train_batch_size}")
        for name in "num_train_steps learning_rate warmup cooldown weight_decay lora_rank".split():
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(0 <= self.adam_b1 < 1 and 0 <= self.adam_b2 < 1, "adam_b1 and adam_b2 must be in [0, 1)")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(frac is None or 0 < frac < 1, f"validation_split_fraction must be in (0, 1) or None, got {frac}")
        need(frac is not None or self.validation_data, "validation_split_fraction None needs validation_data")
        need(self.max_seq_len >= 8, f"max_seq_len must be >= 8, got {self.max_seq_len}")
        need(self.lora_targets, f"lora_targets names no projection; give some of {' '.join(ADAPTABLE)}")
        need(len(self.lora_targets) == len(set(self.lora_targets)), "lora_targets: name each one once")
        need(self.model_name_or_path == "demo" or self.train_data is not None, "train_data is required")
        need(losses, f"loss_type names no loss; give one or more of {' '.join(LOSS_TYPES)}")
        need(len(losses) == len(set(losses)), f"loss_type {losses}: name each loss once")
        need(weights is None or len(weights) == len(losses), "loss_weights needs one weight per loss_type")
        need(weights is None or min(weights) >= 0, f"loss_weights must be >= 0, got {weights}")
        need(weights is None or max(weights) > 0, f"loss_weights {weights} are all 0: nothing would train")
        alpha, rank = self.lora_alpha, self.lora_rank
        need(alpha is None or alpha > 0, f"lora_alpha must be > 0 (or None: 2 * lora_rank), got {alpha}")
        for name, unset in [("lora_alpha", alpha is None), ("lora_targets", self.lora_targets == ADAPTABLE)]:
            need(rank or unset, f"{name} does nothing without lora_rank (a full fine-tune would run)")
        need(
            ls == 0 or set(losses) <= set(SMOOTHED), f"label_smoothing is used by {', '.join(SMOOTHED)} only"
        )
        need("exo_pair" not in losses or 0 < ls < 1, f"exo_pair needs 0 < label_smoothing < 1, got {ls}")
        need(0 <= ls < 0.5 or losses == ("exo_pair",), f"label_smoothing must be in [0, 0.5), got {ls}")

    def in_steps(self, length: float) -> int:
        """warmup or cooldown in steps: a fraction of the run when < 1, else steps."""
        return int(length * self.num_train_steps) if length < 1 else int(length)

    @property
    def num_microbatches(self) -> int:
        return self.train_batch_size // (self.microbatch_size or self.train_batch_size)

    @property
    def lora_scale(self) -> float:
        return (2 * self.lora_rank if self.lora_alpha is None else self.lora_alpha) / max(self.lora_rank, 1)

    @property
    def uses_reference(self) -> bool:
        return not set(self.loss_type) <= {"simpo", "sft"}  # the reference-free ones


# Fields that change how a run is operated but not what it computes: a resumed run may change them.
OPERATIONAL_FIELDS = set(
    "output_dir overwrite num_train_steps steps_per_eval max_eval_batches steps_per_checkpoint "
    "keep_checkpoints steps_per_hf_export hf_save_dtype log_every wandb_project coordinator_address "
    "num_processes process_id on_nonfinite compilation_cache_dir".split()
)

# What the demo uses for the fields not given on the command line (a tiny model from scratch learns at a
# far higher rate than a pretrained 8B model tolerates). See parse_args.
DEMO_SETTINGS = {
    "train_batch_size": 32,
    "num_train_steps": 120,
    "learning_rate": 3e-3,
    "warmup": 0.05,
    "cooldown": 0.2,
    "adam_b2": 0.99,
    "max_seq_len": 64,
    "logits_chunk_size": 32,
    "steps_per_eval": 30,
    "steps_per_checkpoint": 60,
    "steps_per_hf_export": 120,
    "log_every": 10,
    "output_dir": "runs/demo",
}


def dtype_of(name: str):
    """A Config dtype field as a jnp dtype: "auto" is f32 on CPU, bf16 on accelerators."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


# --- the loss family


def dpo_loss(policy, reference, tokens, weight, config: Config, totals=None) -> tuple[jax.Array, jax.Array]:
    """The preference loss of a batch and each pair's implicit rewards.

    policy, reference [B, 2]: summed log-probs of (chosen, rejected) under the policy and the reference
    (reference None for the reference-free losses); tokens [B, 2]: scored tokens of each; weight [B]: 1
    for a pair, 0 for padding. With b = beta, ls = label_smoothing, the log-ratios c = policy_chosen -
    reference_chosen and r = policy_rejected - reference_rejected, h = c - r, their per-token forms
    c' = c / tokens_chosen, r' = r / tokens_rejected, and cdpo(z) = -(1 - ls) log s(z) - ls log s(-z)
    (s the sigmoid), each loss (TRL's names and numbers) is a mean over the pairs of
        sigmoid       cdpo(b h)                                DPO, Rafailov 2023 (cDPO, Mitchell 2023)
        hinge         max(0, 1 - b h)                          SLiC, Zhao 2023
        ipo           (c' - r' - 1 / (2 b))^2                  IPO, Azar 2023: per token, as its authors
                                                               confirmed to TRL (beta carries over lengths)
        exo_pair      s(b h)(log s(b h) - log(1 - ls)) + s(-b h)(log s(-b h) - log ls)    EXO, Ji 2024
        nca_pair      -log s(b c) - log s(-b c) / 2 - log s(-b r) / 2                     NCA, Chen 2024
        robust        (-(1 - ls) log s(b h) + ls log s(-b h)) / (1 - 2 ls)   robust DPO, Chowdhury 2024
        bco_pair      -log s(b c) - log s(-b r)                BCO, Jung 2024 (TRL 1.x: no running mean)
        sppo_hard     (c - 1 / (2 b))^2 + (r + 1 / (2 b))^2    SPPO, Wu 2024
        apo_zero      1 - s(b c) + s(b r)                      APO, D'Oosterlinck 2024
        apo_down      s(b c) + 1 - s(b h)                      APO, D'Oosterlinck 2024
        discopop      -log s(b h)(1 - m) + exp(-b h) m, m = s(b h / tau)   DiscoPOP, Lu 2024
        sigmoid_norm  -log s(b (c' - r'))                      length-normalised DPO, Tulu 3 (Lambert 2024)
        simpo         cdpo(b (pc' - pr') - gamma), pc' = policy_chosen / tokens_chosen, no reference
                                                               SimPO, Meng 2024
    or over the whole batch (the global batch of the step, all devices and microbatches together):
        aot           cdpo(b (sort(pc - pr) - sort(refc - refr)))   AOT, Melnyk 2024: margins matched by rank
        aot_unpaired  cdpo(b (sort(c) - sort(r)))                   AOT, unpaired
        sft           -sum(policy_chosen) / sum(tokens_chosen): the chosen tokens' mean NLL (RPO's term)
    summed with config.loss_weights. `totals` (pairs, chosen tokens) are the denominators when this batch is
    one microbatch of a larger one. Rewards [B, 2] are b (policy - reference), or b policy / tokens without a
    reference; gradient-free (metrics).
    """
    b, ls, gamma, tau = config.beta, config.label_smoothing, config.simpo_gamma, config.discopop_tau
    pairs, chosen_tokens = totals if totals is not None else (jnp.sum(weight), jnp.sum(weight * tokens[:, 0]))
    tokens = jnp.maximum(tokens, 1)
    if reference is None:  # reference-free: log-probs stand in where log-ratios would be, as SimPO reads them
        reference = jnp.zeros_like(policy)
    (c, r), (nc, nr) = (policy - reference).T, tokens.T
    h, per_token, log_s, s = c - r, c / nc - r / nr, jax.nn.log_sigmoid, jax.nn.sigmoid
    cdpo = lambda z: -(1 - ls) * log_s(z) - ls * log_s(-z)
    mean = lambda x: jnp.sum(weight * x) / pairs
    real = weight > 0  # sorted over the real pairs only: padding goes to the end, then is left out
    ranked = lambda x: jnp.sort(jnp.where(real, x, jnp.inf))
    in_rank = jnp.arange(len(weight)) < jnp.sum(real)
    rank_mean = lambda x: jnp.sum(jnp.where(in_rank, x, 0.0)) / pairs
    losses = {
        "sigmoid": lambda: mean(cdpo(b * h)),
        "hinge": lambda: mean(jax.nn.relu(1 - b * h)),
        "ipo": lambda: mean((per_token - 1 / (2 * b)) ** 2),
        "exo_pair": lambda: mean(
            s(b * h) * (log_s(b * h) - jnp.log1p(-ls)) + s(-b * h) * (log_s(-b * h) - jnp.log(ls))
        ),
        "nca_pair": lambda: mean(-log_s(b * c) - 0.5 * log_s(-b * c) - 0.5 * log_s(-b * r)),
        "robust": lambda: mean((-(1 - ls) * log_s(b * h) + ls * log_s(-b * h)) / (1 - 2 * ls)),
        "bco_pair": lambda: mean(-log_s(b * c) - log_s(-b * r)),
        "sppo_hard": lambda: mean((c - 0.5 / b) ** 2 + (r + 0.5 / b) ** 2),
        "apo_zero": lambda: mean(1 - s(b * c) + s(b * r)),
        "apo_down": lambda: mean(s(b * c) + 1 - s(b * h)),
        "discopop": lambda: mean(-log_s(b * h) * (1 - s(b * h / tau)) + jnp.exp(-b * h) * s(b * h / tau)),
        "sigmoid_norm": lambda: mean(-log_s(b * per_token)),
        "simpo": lambda: mean(cdpo(b * (policy[:, 0] / nc - policy[:, 1] / nr) - gamma)),
        "aot": lambda: rank_mean(
            cdpo(b * (ranked(policy[:, 0] - policy[:, 1]) - ranked(reference[:, 0] - reference[:, 1])))
        ),
        "aot_unpaired": lambda: rank_mean(cdpo(b * (ranked(c) - ranked(r)))),
        "sft": lambda: -jnp.sum(weight * policy[:, 0]) / chosen_tokens,
    }
    weights = config.loss_weights or (1.0,) * len(config.loss_type)
    loss = sum(w * losses[name]() for name, w in zip(config.loss_type, weights, strict=True))
    rewards = b * (policy - reference if config.uses_reference else policy / tokens)
    return loss, jax.lax.stop_gradient(rewards)


def metric_sums(policy, rewards, stats, tokens, weight) -> dict[str, jax.Array]:
    """Weighted sums over a batch's pairs of everything logged (TRL's keys and definitions): each metric is
    sums[key] / sums[DENOMINATORS.get(key, "pairs")], so sums of several batches add up. stats [B, 2, 3]:
    the scored tokens' summed mean logit, entropy and argmax hits (token_logps)."""
    w, stats = weight[:, None], weight[:, None, None] * stats
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    return {
        "rewards/chosen": jnp.sum(weight * chosen),
        "rewards/rejected": jnp.sum(weight * rejected),
        "rewards/accuracies": jnp.sum(weight * (chosen > rejected)),
        "rewards/margins": jnp.sum(weight * (chosen - rejected)),
        "logps/chosen": jnp.sum(weight * policy[:, 0]),
        "logps/rejected": jnp.sum(weight * policy[:, 1]),
        "logits/chosen": jnp.sum(stats[:, 0, 0]),
        "logits/rejected": jnp.sum(stats[:, 1, 0]),
        "entropy": jnp.sum(stats[..., 1]),  # over the tokens of both sides
        "mean_token_accuracy": jnp.sum(stats[:, 0, 2]),  # over the chosen tokens, as TRL
        "pairs": jnp.sum(weight),
        "tokens": jnp.sum(w * tokens),
        "tokens/chosen": jnp.sum(weight * tokens[:, 0]),
        "tokens/rejected": jnp.sum(weight * tokens[:, 1]),
    }


DENOMINATORS = {
    "logits/chosen": "tokens/chosen",
    "logits/rejected": "tokens/rejected",
    "entropy": "tokens",
    "mean_token_accuracy": "tokens/chosen",
    "loss": "pairs",
}
COUNTS = ("pairs", "tokens", "tokens/chosen", "tokens/rejected")


def normalize(sums: dict) -> dict:
    """Metrics from metric_sums' sums (also of several batches)."""
    return {
        k: v / jnp.maximum(sums[DENOMINATORS.get(k, "pairs")], 1e-9)
        for k, v in sums.items()
        if k not in COUNTS
    }


# --- one forward pass over chosen and rejected


def batch_reshape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Reshape that keeps the leading (batch) dim sharded over data x fsdp. A plain reshape may move
    part of that sharding onto a new minor dim (it does when fsdp is 1)."""
    return jnp.reshape(x, shape, out_sharding=P(sharding.BATCH_AXES, *[None] * (len(shape) - 1)))


def pair_logps(params, batch: dict, arch: model.LlamaConfig, config: Config, lora=None):
    """([b, 2] summed log-probs, [b, 2, 3] token stats) of chosen (column 0) and rejected (column 1) under
    `params` (and, with LoRA, the adapters `lora` on them), in the order of pair_counts. A batch of rows
    holding several sequences (data._packed: prefix sharing, packing) runs a shared prompt once."""
    dtype = dtype_of(config.compute_dtype)
    # forward casts each layer's weights to the compute dtype as it gathers them: no full-model copy.
    attention = None if config.attention_impl == "auto" else config.attention_impl
    options = dict(lora=lora, lora_scale=config.lora_scale, remat=config.remat, attention_impl=attention)
    run = partial(model.forward, arch=arch, compute_dtype=dtype, **options)
    # Gather the FSDP shards of the LM head once; its vocabulary stays split over the tensor axis.
    lm_head = jax.sharding.reshard(model.lm_head_weight(params).astype(dtype), P(None, "tensor"))
    if "views" in batch:
        views = batch["views"], batch["view_lengths"], batch["slot"]
        hidden = run(params, batch["input_ids"], positions=batch["positions"], views=views)
        logps, stats = token_logps(
            hidden, lm_head, batch["targets"], batch["target_mask"], config.logits_chunk_size
        )
        return _per_pair_side(batch, logps), _per_pair_side(batch, stats)
    b, _, t = batch["input_ids"].shape
    # [b, 2, T] -> [2b, T]: rows 2i and 2i+1 are pair i's chosen and rejected, so one forward pass
    # serves both and a batch-sharded array keeps each pair on one device.
    tokens, mask = (batch_reshape(batch[k], (2 * b, t)) for k in ("input_ids", "loss_mask"))
    hidden = run(params, tokens, lengths=batch_reshape(batch["lengths"], (2 * b,)))
    # Position t predicts token t + 1: shift targets and mask left instead of slicing the hidden states.
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    logps, stats = token_logps(hidden, lm_head, targets, mask, config.logits_chunk_size)
    return batch_reshape(logps.sum(-1), (b, 2)), batch_reshape(stats.sum(-2), (b, 2, 3))


def _per_pair_side(batch: dict, x: jax.Array) -> jax.Array:
    """Per-token values of rows of several pairs ([R, W, ...]) summed per pair slot and side, [R * K, 2, ...]:
    a shared token (side 0) counts for both sides."""
    slots = jax.nn.one_hot(batch["pair"], batch["weight"].shape[1], dtype=jnp.float32)  # [R, W, K]; -1: none
    sides = jnp.stack([batch["side"] != 2, batch["side"] != 1], -1).astype(jnp.float32)  # [R, W, 2]
    # HIGHEST: default precision multiplies f32 in bf16 on TPU (TF32 on GPU), which would round each log-prob.
    summed = jnp.einsum("rt...,rtk,rts->rks...", x.astype(jnp.float32), slots, sides, precision="highest")
    return batch_reshape(summed, (-1, *summed.shape[2:]))


def per_pair(batch: dict, key: str) -> jax.Array:
    """batch[key] (weight, lengths, ref_logps) as [b, ...] in pair_logps' order, rows of pairs flattened."""
    return batch_reshape(batch[key], (-1, *batch[key].shape[2:])) if "views" in batch else batch[key]


def pair_counts(batch: dict) -> tuple[jax.Array, jax.Array]:
    """(scored tokens [b, 2], weight [b]) of the batch's pairs, in pair_logps' order."""
    if "views" in batch:
        return _per_pair_side(batch, batch["target_mask"]), per_pair(batch, "weight")
    return batch["loss_mask"].sum(-1), batch["weight"]


# --- the fused LM head and log-softmax


def token_logps(hidden, lm_head, targets, mask, chunk_size: int = 4096) -> tuple[jax.Array, jax.Array]:
    """Log-probs of the scored targets, without ever materialising [N, T, V] logits.

    hidden [N, T, D] final hidden states; lm_head [D, V]; targets [N, T] int (targets[n, t] is the
    token after position t); mask [N, T] bool (True: targets[n, t] is scored). Returns [N, T] f32:
        mask[n, t] * log_softmax(hidden[n, t] @ lm_head)[targets[n, t]]
    and, gradient-free, [N, T, 3] of the mean logit over the vocabulary, the next-token distribution's
    entropy, and 1 where the target is the argmax (TRL's logit, entropy and token-accuracy metrics), 0
    where the mask is. Computed over chunks of about `chunk_size` vocabulary entries: the forward
    pass keeps a running log-sum-exp (f32) and the target's logit; the backward pass (a custom VJP)
    recomputes one chunk's logits at a time, writes that chunk's LM-head gradient columns in place and
    adds its share of the hidden-state gradient. Only one chunk's [N, T, C] logits are alive at any
    moment, and no [D, V]-sized buffer is ever accumulated. Call it under a mesh (jax.set_mesh).
    """
    return _logps_forward(hidden, lm_head, targets, mask, chunk_size)[0]


def _spec(x: jax.Array) -> tuple:
    spec = tuple(jax.typeof(x).sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def _chunking(lm_head: jax.Array, chunk_size: int) -> tuple[int, int, int]:
    """(S, n, C): the head's vocabulary is split over S tensor-parallel shards (S = 1 without tensor
    parallelism); each shard's columns are cut into n contiguous chunks of C."""
    spec = _spec(lm_head)
    axes = () if spec[1] is None else spec[1] if isinstance(spec[1], tuple) else (spec[1],)
    shards = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes)
    count = math.ceil(lm_head.shape[1] / chunk_size)
    return shards, count, math.ceil(lm_head.shape[1] // shards / count)


def _chunk_logits(hidden, lm_head, i, chunk_size):
    """Chunk i of the head [D, S, C] (C consecutive columns of every shard, so it stays split over the
    tensor axis like the whole head), its f32 logits [N, T, S, C], which of its columns are new, each
    column's vocabulary id, and where the chunk starts inside a shard. The last chunk starts early enough
    to end at the shard's end; its columns that the chunk before already covered get id -1, logit -inf."""
    (d, v), (shards, _, width) = lm_head.shape, _chunking(lm_head, chunk_size)
    # Viewing the head as [D, S, V/S] here, inside the loop, lets XLA slice it where it lies; the same
    # reshape outside the loop made XLA:CPU copy the whole head.
    view = jnp.reshape(lm_head, (d, shards, v // shards), out_sharding=P(*_spec(lm_head), None))
    start = jnp.minimum(i * width, v // shards - width)
    head = jax.lax.dynamic_slice_in_dim(view, start, width, axis=2)
    logits = jnp.einsum("ntd,dsc->ntsc", hidden, head, preferred_element_type=jnp.float32)
    offset = start + jnp.arange(width)  # column inside the shard
    new = offset >= i * width
    ids = jnp.where(new, jnp.arange(shards)[:, None] * (v // shards) + offset, -1)
    return jnp.where(new, logits, -jnp.inf), new, ids, head, start


def _logps_forward(hidden, lm_head, targets, mask, chunk_size):
    zero = jnp.zeros_like(hidden[..., 0], dtype=jnp.float32)  # [N, T], sharded like the rows

    def step(carry, i):  # running: max logit, sum of exp(logit - max), of that times the logit, target, sum
        high, total, weighted, target, plain = carry
        logits, new, ids, _, _ = _chunk_logits(hidden, lm_head, i, chunk_size)
        new_high = jnp.maximum(high, logits.max((-2, -1)))
        shrink, exp = jnp.exp(high - new_high), jnp.exp(logits - new_high[..., None, None])
        finite = jnp.where(new, logits, 0.0)
        total, weighted = total * shrink + exp.sum((-2, -1)), weighted * shrink + (exp * finite).sum((-2, -1))
        # A one-hot select rather than a gather: it stays local when the vocabulary is split.
        target += jnp.sum(jnp.where(ids == targets[..., None, None], logits, 0.0), (-2, -1))
        return (new_high, total, weighted, target, plain + finite.sum((-2, -1))), None

    count = _chunking(lm_head, chunk_size)[1]
    init = (zero - jnp.inf, zero, zero, zero, zero)
    (high, total, weighted, target, plain), _ = jax.lax.scan(step, init, jnp.arange(count))
    logsumexp = high + jnp.log(total)
    stats = [plain / lm_head.shape[1], logsumexp - weighted / total, (target >= high).astype(jnp.float32)]
    stats = jax.lax.stop_gradient(jnp.stack([jnp.where(mask, x, 0.0) for x in stats], -1))
    return (jnp.where(mask, target - logsumexp, 0.0), stats), (hidden, lm_head, targets, mask, logsumexp)


def _logps_backward(chunk_size, residuals, grads):
    hidden, lm_head, targets, mask, logsumexp = residuals
    (d, v), (shards, count, width) = lm_head.shape, _chunking(lm_head, chunk_size)
    scale = jnp.where(mask, grads[0], 0.0)[..., None, None]  # d loss / d log p(target)
    head_spec = P(*_spec(lm_head), None)

    def step(carry, i):
        d_hidden, d_head = carry
        logits, _, ids, head, start = _chunk_logits(hidden, lm_head, i, chunk_size)
        # d log p(target) / d logits = onehot(target) - softmax(logits), one chunk of columns at a time.
        probs = jnp.exp(logits - logsumexp[..., None, None])
        d_logits = (scale * ((ids == targets[..., None, None]) - probs)).astype(hidden.dtype)
        # Sums over the chunk's columns (split over tensor) and over the rows (split over data x fsdp):
        # the out_shardings ask for those all-reduces.
        f32 = dict(preferred_element_type=jnp.float32)
        d_hidden += jnp.einsum("ntsc,dsc->ntd", d_logits, head, **f32, out_sharding=P(*_spec(hidden)))
        d_w = jnp.einsum("ntd,ntsc->dsc", hidden, d_logits, **f32, out_sharding=head_spec)
        # Added in place rather than set: the columns the last chunk shares with the one before
        # carry a zero gradient here and keep theirs.
        d_w += jax.lax.dynamic_slice_in_dim(d_head, start, width, axis=2)
        d_head = jax.lax.dynamic_update_slice_in_dim(d_head, d_w.astype(d_head.dtype), start, axis=2)
        return (d_hidden, d_head), None

    d_head = jnp.zeros((d, shards, v // shards), lm_head.dtype, out_sharding=head_spec)
    zero = (jnp.zeros_like(hidden, dtype=jnp.float32), d_head)
    (d_hidden, d_head), _ = jax.lax.scan(step, zero, jnp.arange(count))
    d_head = jnp.reshape(d_head, (d, v), out_sharding=P(*_spec(lm_head)))
    return d_hidden.astype(hidden.dtype), d_head, None, None


token_logps = jax.custom_vjp(token_logps, nondiff_argnums=(4,))
token_logps.defvjp(_logps_forward, _logps_backward)


# --- optimizer and learning-rate schedule


def lr_schedule(config: Config):
    """Linear warmup from 0 to the peak, then the chosen shape from the peak toward min_lr over the
    rest of the run, with the last `cooldown` steps annealing linearly to min_lr from wherever the
    shape stands (for `constant` this is warmup-stable-decay)."""
    peak_lr, total = config.learning_rate, max(config.num_train_steps, 1)
    warm, cool = config.in_steps(config.warmup), min(config.in_steps(config.cooldown), total)
    low = peak_lr * config.min_lr_ratio

    def shape(step):
        frac = jnp.clip((step - warm) / max(total - warm, 1), 0.0, 1.0)
        if config.lr_schedule == "linear":
            return peak_lr + (low - peak_lr) * frac
        if config.lr_schedule == "cosine":
            return low + (peak_lr - low) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
        return jnp.full_like(frac, peak_lr)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        value = jnp.where(step < warm, peak_lr * step / max(warm, 1), shape(step))
        cool_start = total - cool
        at_start = shape(jnp.float32(cool_start))
        cooled = at_start + (low - at_start) * (step - cool_start) / max(cool, 1)
        return jnp.where((cool > 0) & (step >= cool_start) & (step >= warm), cooled, value)

    return schedule


def make_optimizer(config: Config) -> optax.GradientTransformation:
    keystr = jax.tree_util.keystr
    not_norm = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: "norm" not in keystr(path), params
    )
    clip = optax.clip_by_global_norm(config.max_grad_norm) if config.max_grad_norm else optax.identity()
    adamw = optax.adamw(
        lr_schedule(config), config.adam_b1, config.adam_b2, weight_decay=config.weight_decay, mask=not_norm
    )
    return optax.chain(clip, adamw)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict  # f32 master weights (with LoRA: the adapters), sharded as declared in model.py
    opt_state: optax.OptState  # sharded like params
    skipped: jax.Array  # int32 scalar: updates skipped for a non-finite loss or gradient

    @classmethod
    def create(cls, params: dict, optimizer) -> TrainState:
        zero = jnp.zeros((), jnp.int32)
        return cls(zero, params, optimizer.init(params), zero)


# --- the train and eval steps


def step_flops(arch: model.LlamaConfig, lengths, live_reference: bool, lora: bool = False, tokens=None):
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


def make_steps(arch: model.LlamaConfig, config: Config, optimizer):
    """The jitted train step (state donated) and eval step, both taking the frozen weights as (base,
    reference): the base is what LoRA's adapters sit on (None without LoRA), the reference the frozen model
    whose log-probs the loss compares with (with LoRA by default the base itself; None when precomputed,
    then "ref_logps" ([b, 2]; [R, K, 2] in rows of pairs) come in the batch, or for a reference-free loss)."""
    num_micro = config.num_microbatches
    live = config.uses_reference and config.reference_mode == "live"

    def policy_logps(params, base, batch):  # the trained weights: the whole model, or LoRA's adapters
        if config.lora_rank:
            return pair_logps(base, batch, arch, config, lora=params)
        return pair_logps(params, batch, arch, config)

    def logps(params, frozen, batch):  # policy [b, 2], reference [b, 2] (or None), stats
        policy, stats = policy_logps(params, frozen[0], batch)
        reference = per_pair(batch, "ref_logps") if config.uses_reference and "ref_logps" in batch else None
        if live:
            reference = jax.lax.stop_gradient(pair_logps(frozen[1], batch, arch, config)[0])
        return policy, reference, stats

    def loss_and_sums(outputs, tokens, weight, totals=None):  # on replicated arrays: the loss may sort them
        policy, reference, stats = (None if x is None else jax.sharding.reshard(x, P()) for x in outputs)
        tokens, weight = jax.sharding.reshard(tokens, P()), jax.sharding.reshard(weight, P())
        loss, rewards = dpo_loss(policy, reference, tokens, weight, config, totals)
        pairs = jnp.sum(weight) if totals is None else totals[0]
        return loss, metric_sums(policy, rewards, stats, tokens, weight) | {"loss": loss * pairs}

    def batch_loss(params, frozen, batch, totals=None):
        return loss_and_sums(logps(params, frozen, batch), *pair_counts(batch), totals)

    def grads_and_sums(params, frozen, batch):
        if num_micro == 1:
            return jax.grad(batch_loss, has_aux=True)(params, frozen, batch)
        # Microbatch m takes rows m, m + M, m + 2M, ...: splitting the batch axis this way leaves every
        # microbatch spread over all devices. The loss is the whole batch's, never one microbatch's.
        micro = jax.tree.map(
            lambda x: jnp.swapaxes(batch_reshape(x, (-1, num_micro, *x.shape[1:])), 0, 1), batch
        )
        if not BATCH_LOSSES & set(config.loss_type):  # a sum over pairs: add up the microbatches' gradients
            tokens, weight = pair_counts(batch)
            totals = jnp.sum(weight), jnp.sum(weight * tokens[:, 0])
            grad = lambda m: jax.grad(batch_loss, has_aux=True)(params, frozen, m, totals)
            sums = jax.eval_shape(grad, jax.tree.map(lambda x: x[0], micro))[1]
            add = lambda acc, m: (jax.tree.map(jnp.add, acc, grad(m)), None)
            return jax.lax.scan(add, jax.tree.map(jnp.zeros_like, (params, sums)), micro)[0]
        # A loss over the whole batch (aot sorts it): its gradient with respect to every pair's log-probs
        # first, then each microbatch's backward pass with its share of that gradient.
        policy, *rest = jax.lax.map(lambda m: logps(params, frozen, m), micro)
        whole = lambda x: None if x is None else jax.sharding.reshard(x, P()).reshape(-1, *x.shape[2:])
        counts = jax.lax.map(pair_counts, micro)
        loss_of = lambda p: loss_and_sums((p, *map(whole, rest)), *map(whole, counts))
        d_policy, sums = jax.grad(loss_of, has_aux=True)(whole(policy))
        d_policy = jax.sharding.reshard(d_policy.reshape(policy.shape), P(None, sharding.BATCH_AXES, None))
        vjp = lambda m, d: jax.grad(lambda p: jnp.sum(policy_logps(p, frozen[0], m)[0] * d))(params)
        add = lambda acc, m_d: (jax.tree.map(jnp.add, acc, vjp(*m_d)), None)
        return jax.lax.scan(add, jax.tree.map(jnp.zeros_like, params), (micro, d_policy))[0], sums

    @partial(jax.jit, donate_argnums=0)
    def train_step(state: TrainState, frozen, batch):
        with jax.named_scope("forward_backward"):
            grads, sums = grads_and_sums(state.params, frozen, batch)
        metrics = normalize(sums)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = lr_schedule(config)(state.step)
        metrics["tokens"] = jnp.sum(batch["lengths"])  # for throughput, counted where the batch already is
        # Rows of several sequences: attention per view; a shared prompt ran once, so count what ran.
        lengths = batch["view_lengths"] if "views" in batch else batch["lengths"]
        ran = jnp.sum(batch["pair"] >= 0, dtype=jnp.float32) if "views" in batch else None
        metrics["flops"] = step_flops(arch, lengths, live, lora=config.lora_rank > 0, tokens=ran)
        with jax.named_scope("optimizer"):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        # A non-finite loss or gradient leaves the weights untouched; the host decides whether to stop.
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        skipped = state.skipped + (~finite).astype(jnp.int32)
        metrics |= {"nonfinite": ~finite, "skipped_updates": skipped}
        return TrainState(
            state.step + 1, keep(params, state.params), keep(opt_state, state.opt_state), skipped
        ), metrics

    @jax.jit
    def eval_step(params, frozen, batch):
        return batch_loss(params, frozen, batch)[1]

    return train_step, eval_step


# --- checkpoints and the run directory: one .npy file per array, so a restoring host reads only its slices


def _leaf_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")  # e.g. opt_state/1/0/mu/layers/wq


def saved_steps(run: Path) -> list[int]:
    """Steps of the complete checkpoints: those with the done.json marker, which is written last."""
    return sorted(int(d.name[5:]) for d in (run / "checkpoints").glob("step-*") if (d / "done.json").exists())


def save_checkpoint(run: Path, state: TrainState, keep: int, data_id: str) -> None:
    """Write checkpoints/step-N through a temporary directory renamed into place, then the done.json marker.
    Only a directory with the marker counts, so a crash at any moment leaves the newest complete checkpoint
    in charge. The marker records `data_id`, what the run trains on. Keeps the newest `keep`. Every process
    takes part (arrays are gathered); process 0 writes."""
    step, writer = int(state.step), sharding.is_writer()
    final = run / "checkpoints" / f"step-{step}"
    with sharding.atomic(final) if writer else contextlib.nullcontext() as tmp:
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
            array = sharding.to_host(leaf)
            if writer:
                (tmp / _leaf_name(path)).parent.mkdir(parents=True, exist_ok=True)
                np.save(tmp / f"{_leaf_name(path)}.npy", array)
        if writer:
            os.sync()  # every file on disk before the checkpoint can look complete (power loss too)
    if writer:
        # The marker goes last, into the renamed directory: that stays safe where a directory rename
        # is not atomic (file systems over object stores copy file by file).
        (final / "done.json").write_text(json.dumps({"step": step, "data": data_id}))
        os.sync()
        kept = {f"step-{s}" for s in saved_steps(run)[-keep:]}
        for old in (run / "checkpoints").iterdir():
            if old.name not in kept:
                (old / "done.json").unlink(missing_ok=True)  # first: a half-deleted one never counts
                sharding.remove(old)
    multihost_utils.sync_global_devices(f"checkpoint {step}")


def _unreadable(folder: Path, abstract: TrainState) -> str | None:
    """Why the checkpoint in `folder` would not load completely (a file missing, cut short, empty, a pickle,
    of another shape), or None. Reads each file's header only."""
    for path, like in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        name = f"{_leaf_name(path)}.npy"
        try:
            shape = np.load(folder / name, mmap_mode="r").shape
        except (OSError, ValueError, EOFError) as e:
            return f"{name}: {e}"
        if shape != like.shape:
            return f"{name} has shape {shape}, expected {like.shape}"
    return None


def restore_checkpoint(run: Path, abstract: TrainState, mesh, say, data_id: str) -> TrainState | None:
    """The newest checkpoint that loads completely (None: there is none yet), each process reading through
    a memory map only the slices its own devices hold. A damaged newer one is skipped, saying why; one
    written for other data than `data_id` is refused."""
    skipped = []
    for step in reversed(saved_steps(run)):
        folder = run / "checkpoints" / f"step-{step}"
        if problem := _unreadable(folder, abstract):
            skipped.append(f"checkpoints/step-{step} ({problem})")
            continue
        if skipped:
            say(f"skipped {'; '.join(skipped)}: it does not load completely")
        if json.loads((folder / "done.json").read_text()).get("data", data_id) != data_id:
            raise ValueError(
                f"the training or validation data changed since {folder} was written (tokenized anew): use "
                "another output_dir, or --config.overwrite to start afresh"
            )

        def load(path, like, folder=folder):
            array = np.load(folder / f"{_leaf_name(path)}.npy", mmap_mode="r")
            # eval_shape gives specs on the abstract mesh; scalars (step, counts) have none: replicated.
            where = NamedSharding(mesh, like.sharding.spec if like.sharding is not None else P())
            return jax.make_array_from_callback(
                like.shape, where, lambda idx: np.asarray(array[idx], like.dtype)
            )

        say(f"resumed from {folder}")
        return jax.tree_util.tree_map_with_path(load, abstract)
    if skipped:
        raise ValueError(
            f"no checkpoint in {run}/checkpoints loads completely: {'; '.join(skipped)}. Delete the "
            "damaged ones to resume from an older one, or pass --config.overwrite to start afresh"
        )
    return None


def check_run_dir(run: Path, config: Config) -> None:
    """Refuse an output_dir that is (or lies under) a file, that holds an input a run would overwrite or
    delete, that holds files of no dpo.py run, or that holds a run whose config differs in anything that
    changes what it computes (unless overwrite). Deletes and writes nothing: see start_run_dir."""
    for folder in (run, *run.parents):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"output_dir {run}: {folder} is a file, not a directory")
    own = run.resolve()
    for name in ["model_name_or_path", "reference_model_path", "tokenizer", "train_data", "validation_data"]:
        value = getattr(config, name)
        if name == "model_name_or_path" and value == "demo":  # made inside the run directory, as it should be
            continue
        where = Path(value).resolve() if value and Path(value).exists() else None
        if where and (where == own or {own / "checkpoints", own / "hf"} & set(where.parents)):
            raise ValueError(f"output_dir {run} holds the {name} {where}, which a run would overwrite")
    if not (run / "config.json").exists():  # a run writes config.json before anything else it keeps
        foreign = [n for n in ("metrics.jsonl", "checkpoints", "hf", "wandb-id") if (run / n).exists()]
        if foreign:
            raise ValueError(
                f"output_dir {run} holds {', '.join(foreign)} but no dpo.py run: use another one"
            )
        return
    if config.overwrite:
        return
    # Compared as JSON (a tuple reads back as a list); a field newer than the saved run counts as its default.
    defaults, now = (json.loads(json.dumps(dataclasses.asdict(c))) for c in (Config(), config))
    saved = defaults | json.loads((run / "config.json").read_text())
    changed = sorted(k for k in now if k not in OPERATIONAL_FIELDS and saved.get(k) != now[k])
    if changed:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ValueError(
            f"{run} holds a run with a different config ({diff}); use another output_dir or "
            "--config.overwrite"
        )


def start_run_dir(run: Path, config: Config) -> None:
    """Once every input has been checked: with overwrite, clear the old run's checkpoints, exports and
    metrics; then write config.json (process 0)."""
    if sharding.is_writer():
        for name in ("checkpoints", "hf", "metrics.jsonl", "wandb-id") if config.overwrite else ():
            sharding.remove(run / name)
        run.mkdir(parents=True, exist_ok=True)
        with sharding.atomic(run / "config.json") as tmp:
            tmp.write_text(json.dumps(dataclasses.asdict(config), indent=2))
    multihost_utils.sync_global_devices("run directory ready")  # nobody lists checkpoints before they go


def _step_of(line: str) -> int:
    """The step of one metrics.jsonl line; -1 for a line cut short by a crash."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1


class MetricsLog:
    """metrics.jsonl (process 0), Weights & Biases, and the console. One line per step and kind: lines past
    the checkpoint a run resumes from (every line, on a fresh start) were written by an interrupted run and
    will be written again, so they go, as does a line a crash cut short."""

    def __init__(self, run: Path, config: Config, resume_step: int | None, say):
        self.path, self.config, self.say, self.wandb = run / "metrics.jsonl", config, say, None
        self.peak, self.devices = peak_flops(jax.devices()[0]), jax.device_count()
        self.start, self.started = resume_step or 0, time.time()
        self.last = self.started
        if not sharding.is_writer():
            return
        lines = self.path.read_text().splitlines() if self.path.exists() and resume_step is not None else []
        with sharding.atomic(self.path) as tmp:  # replaced whole: a crash here loses no lines
            tmp.write_text("".join(line + "\n" for line in lines if 0 <= _step_of(line) <= resume_step))
        if config.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ValueError("wandb_project is set but wandb is not installed: pip install wandb") from e
            # One W&B run per run directory, made at its fresh start, continued after.
            id_file, settings = run / "wandb-id", dataclasses.asdict(config)
            if resume_step is None or not id_file.exists():
                id_file.write_text(uuid.uuid4().hex[:16])
            where = dict(dir=str(run), id=id_file.read_text(), resume="allow", name=run.resolve().name)
            self.wandb = wandb.init(project=config.wandb_project, config=settings, **where)

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exception) -> None:
        if self.wandb:
            self.wandb.finish()

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if sharding.is_writer():
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            if self.wandb:
                self.wandb.log(metrics, step=step)

    def train(self, step: int, metrics: dict[str, float]) -> None:
        """One training step's line, with throughput from the step's token and FLOP counts."""
        now, tokens, flops = time.time(), metrics.pop("tokens"), metrics.pop("flops")
        metrics["throughput/tokens_per_second"] = tokens / (now - self.last)
        if self.peak:
            metrics["throughput/mfu"] = flops / (now - self.last) / (self.peak * self.devices)
        self.last, total = now, self.config.num_train_steps
        self.write(step, metrics)
        if step % self.config.log_every == 0 or step == total:
            eta = (now - self.started) / (step - self.start) * (total - step)
            self.say(
                f"step {step}/{total} | loss {metrics['loss']:.4f} acc {metrics['rewards/accuracies']:.3f} "
                f"margin {metrics['rewards/margins']:.4f} | {metrics['throughput/tokens_per_second']:.0f} "
                f"tok/s | eta {eta:.0f}s"
            )

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        self.write(step, metrics)
        self.say(
            f"step {step} | eval loss {metrics['eval/loss']:.4f} acc {metrics['eval/rewards/accuracies']:.3f}"
        )


PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops(device: jax.Device) -> float | None:
    """Dense bf16 peak of one chip, when known."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k.lower() in device.device_kind.lower()), None)


# --- precomputed reference log-probs: the reference runs once, not at every step (8N -> 6N per token)


def _reference_key(reference_dir: Path, dataset: data.PairDataset, config: Config) -> str:
    """Hash of everything the reference log-probs depend on, so a changed model or data never reuses a stale
    file: the model and data files by identity (real path, size, modification time: a Hub snapshot's
    files resolve to blobs named by their content hash), not by reading 16 GB; the settings that change
    the numbers."""
    files = [reference_dir / "config.json", *sorted(reference_dir.glob("*.safetensors"))]
    files += sorted(dataset.path.glob("part-*.parquet"))
    identity = [[os.path.realpath(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    settings = [config.reference_dtype, config.compute_dtype, config.attention_impl]
    identity += [dataset.summary.get("settings"), *settings]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def precompute_reference_logps(
    datasets: list[data.PairDataset], reference_dir: Path, arch: model.LlamaConfig, config: Config, mesh
) -> list[np.ndarray]:
    """For each dataset, [len(dataset), 2] f32 reference log-probs (chosen, rejected) of every pair, by row.

    Computed once, forward only, and kept beside the tokenized data in reference/<key>.npy (see
    `_reference_key`). Progress goes to reference/<key>.partial.npz now and then, so an interrupted run
    resumes where it stopped; the .npy is renamed into place only when complete. Process 0 writes.
    The reference weights are loaded only when something is left to compute, and freed on return.
    """
    params, tables = None, []
    logps_of = jax.jit(lambda p, b: jax.sharding.reshard(pair_logps(p, b, arch, config)[0], P()))
    for dataset in datasets:
        final = dataset.path / "reference" / f"{_reference_key(reference_dir, dataset, config)}.npy"
        multihost_utils.sync_global_devices(f"reference {final}")
        if not final.exists():
            dtype = dtype_of(config.reference_dtype)
            params = params or model.load_params(reference_dir, arch, mesh, dtype=dtype)
            _fill_reference(final, dataset, partial(logps_of, params), config, mesh)
            multihost_utils.sync_global_devices(f"reference done {final}")
        tables.append(np.load(final))
    return tables


def _fill_reference(final: Path, dataset: data.PairDataset, logps_of, config: Config, mesh) -> None:
    """Compute with `logps_of(batch)` the rows `final`'s progress file lacks (all, at first) and write
    `final` when complete."""
    progress, writer = final.with_suffix(".partial.npz"), sharding.is_writer()
    logps = np.full((len(dataset), 2), np.nan, np.float32)
    if progress.exists():
        with np.load(progress) as saved:
            logps = saved["logps"]
    # What is left (rows still NaN), shortest first: batches of like length pad little.
    todo = data.by_length(dataset, np.flatnonzero(np.isnan(logps).any(axis=1)))
    if writer:
        final.parent.mkdir(parents=True, exist_ok=True)
        print(f"reference log-probs: {len(todo)} of {len(dataset)} pairs to compute -> {final}", flush=True)
    size = config.microbatch_size or config.train_batch_size  # no gradients: a microbatch fits
    loader = dict(process_index=jax.process_index(), process_count=jax.process_count())
    batches = data.eval_batches(dataset, todo, batch_size=size, max_seq_len=config.max_seq_len, **loader)
    saved_at = time.time()
    for at, batch in zip(range(0, len(todo), size), batches, strict=True):
        rows = todo[at : at + size]
        logps[rows] = np.asarray(logps_of(sharding.global_batch(batch, mesh)))[: len(rows)]
        if writer and time.time() - saved_at > 60:  # a kill loses at most a minute of work
            with sharding.atomic(progress) as tmp:
                np.savez(tmp, logps=logps)
            saved_at = time.time()
    if writer:
        with sharding.atomic(final) as tmp:
            np.save(tmp, logps)
        progress.unlink(missing_ok=True)


# --- compiled programs: a few batch shapes, compiled before the first step and kept across runs

_cache_hits = []  # one entry per program the persistent compilation cache served
jax.monitoring.register_event_listener(
    lambda event, **_: _cache_hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None
)


def use_compilation_cache(directory: str | None) -> None:
    """XLA's persistent compilation cache in `directory` (None: off), every program kept however fast it
    compiled, so a rerun, a resume or another run of the same shapes compiles nothing. Every process reads
    it and JAX writes from process 0 only, so one directory that all hosts share is safe."""
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()  # JAX decides once per process whether to use it: decide again


class Programs:
    """The train and eval steps compiled for each planned batch shape (data.plan_shapes), called by the
    shape of the batch they are given. A batch that no planned shape holds (a run extended past its plan)
    compiles when first met, and is counted."""

    def __init__(self, steps: dict, shapes: dict):
        self.steps, self.shapes, self.compiled = steps, shapes, {}  # kind -> step; kind -> shapes
        self.seconds, self.from_cache, self.unplanned = 0.0, 0, 0

    def compile(self, arguments) -> None:
        """Every planned program at once: traced here one after another (tracing holds the GIL), then
        compiled on threads, which XLA runs in parallel. `arguments(kind, shape)`: the step's arguments
        with a blank batch of that shape."""
        started, hits = time.time(), len(_cache_hits)
        kinds = [(kind, shape) for kind, shapes in self.shapes.items() for shape in shapes]
        lowered = [self.steps[kind].lower(*arguments(kind, shape)) for kind, shape in kinds]
        with ThreadPoolExecutor(max(len(lowered), 1)) as pool:
            self.compiled |= dict(
                zip(kinds, pool.map(lambda program: program.compile(), lowered), strict=True)
            )
        self.seconds, self.from_cache = time.time() - started, len(_cache_hits) - hits

    def __call__(self, kind: str, *args):
        key = (kind, data.shape_of(args[-1]))  # the batch comes last
        if key not in self.compiled:
            started, self.unplanned = time.time(), self.unplanned + 1
            self.compiled[key] = self.steps[kind].lower(*args).compile()
            self.seconds += time.time() - started
        return self.compiled[key](*args)

    def report(self) -> str:
        planned = ", ".join(
            f"{len(s)} {kind} ({', '.join(map(_shape_text, s))})" for kind, s in self.shapes.items()
        )
        extra = f" and {self.unplanned} unplanned" if self.unplanned else ""
        return (
            f"compiled {planned}{extra} in {self.seconds:.1f} s, {self.from_cache} of "
            f"{len(self.compiled)} from the cache"
        )


def _shape_text(shape: data.Shape) -> str:
    """A batch shape as the console shows it: pairs x width; rows x width x pair slots x view width."""
    return "x".join(map(str, shape if shape.slots else shape[:2]))


# --- main: the inputs, the state, the batches and the loop, top to bottom


class Inputs(NamedTuple):
    model_dir: Path
    reference_dir: Path
    arch: model.LlamaConfig
    mesh: jax.sharding.Mesh
    tokenizer_dir: Path
    train_set: data.PairDataset
    val_set: data.PairDataset
    train_idx: np.ndarray
    val_idx: np.ndarray
    data_id: str  # a hash of the tokenized data's summaries: checkpoints record it


def load_inputs(run: Path, config: Config, say) -> Inputs:
    """Everything a run reads, checked before anything is written: the model and reference configs, the mesh,
    the tokenizer and the data (tokenized into the run's data/ when raw)."""

    def resolved(name: str) -> Path:  # which option a path came from goes into the error
        try:
            return model.resolve_path(getattr(config, name))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{name}: {e}") from None

    model_dir = resolved("model_name_or_path")
    arch = model.load_config(model_dir)
    mesh = sharding.make_mesh(config.mesh_data, config.mesh_fsdp, config.mesh_tensor)
    model.check_fits(arch, mesh, config.microbatch_size or config.train_batch_size)
    model.check_lora(arch, config.lora_rank, config.lora_targets)
    model.check_weights(model_dir, arch)  # from the file headers: no weight is read yet
    reference_dir = resolved("reference_model_path") if config.reference_model_path else model_dir
    reference_arch = model.load_config(reference_dir)
    for field in dataclasses.fields(arch):
        ours, theirs = getattr(arch, field.name), getattr(reference_arch, field.name)
        if field.name not in model.NOT_COMPUTED and ours != theirs:
            raise ValueError(
                f"reference model {reference_dir} differs from the policy in {field.name} "
                f"({theirs} vs {ours})"
            )
    if reference_dir != model_dir and config.uses_reference:
        model.check_weights(reference_dir, arch)
    for name, length in (("warmup", config.warmup), ("cooldown", config.cooldown)):
        if (steps := config.in_steps(length)) > config.num_train_steps:
            say(f"warning: {name} ({steps} steps) is longer than the run ({config.num_train_steps} steps)")
    if config.validation_data == config.train_data:
        say("warning: validation_data is train_data: evaluation is on the training pairs")
    tokenizer = config.tokenizer or str(model_dir)
    tokenizer_dir = resolved("tokenizer") if config.tokenizer else model_dir
    train_set = prepare_data("train", tokenizer, run, config)
    if config.validation_data is not None:
        val_set = prepare_data("validation", tokenizer, run, config)
        train_idx, val_idx = np.arange(len(train_set)), np.arange(len(val_set))
        if config.validation_split_fraction is not None:
            say(f"validation: {config.validation_data} (so validation_split_fraction is not used)")
    else:
        val_set = train_set
        fraction, copies = config.validation_split_fraction, train_set.first_copy  # copies stay on one side
        train_idx, val_idx = data.split_indices(len(train_set), fraction, config.seed, copies)
    for dataset in {train_set.path: train_set, val_set.path: val_set}.values():
        check_vocabulary(dataset, arch, tokenizer_dir, say)
    say(f"data: {len(train_idx)} training pairs, {len(val_idx)} validation pairs")
    summaries = b"".join((dataset.path / "summary.json").read_bytes() for dataset in (train_set, val_set))
    data_id = hashlib.sha256(summaries).hexdigest()[:16]
    return Inputs(
        model_dir, reference_dir, arch, mesh, tokenizer_dir, train_set, val_set, train_idx, val_idx, data_id
    )


def prepare_data(role: str, tokenizer: str, run: Path, config: Config) -> data.PairDataset:
    """train_data or validation_data (with train_split or validation_split), as `role` says: a data.py
    output dir as it is; raw data is tokenized once into the run's data/ (process 0). That copy is made
    again when the raw data or its settings change, unless the run has checkpoints to resume."""
    source, split = getattr(config, f"{role}_data"), getattr(config, f"{role}_split")
    if data.is_tokenized(source):
        return data.PairDataset(source)
    out = run / "data" / f"{role}-{Path(source).name or 'data'}-{split}"  # training and validation apart
    replace = config.overwrite or not saved_steps(run)
    if sharding.is_writer():
        try:
            data.tokenize(
                source, tokenizer, str(out), split=split, max_seq_len=config.max_seq_len, overwrite=replace
            )
        except data.NoChatTemplate:
            raise ValueError(
                f"{tokenizer} has no chat template and {source} holds chat messages: pass "
                "--config.tokenizer with a tokenizer that has one, or tokenize with python data.py "
                "--chat-template FILE and pass its output"
            ) from None
        except data.SettingsChanged as e:
            raise ValueError(
                f"{source} changed since this run started (other {e.changed}): use another output_dir, or "
                "--config.overwrite to start afresh"
            ) from None
    multihost_utils.sync_global_devices(f"tokenized {out}")
    return data.PairDataset(out)


def check_vocabulary(dataset: data.PairDataset, arch: model.LlamaConfig, tokenizer_dir: Path, say) -> None:
    """Token ids must be the model's: data tokenized for a larger vocabulary would train on nothing."""
    summary, made_with = dataset.summary, dataset.summary.get("tokenizer", {})
    if summary["max_token_id"] >= arch.vocab_size:
        raise ValueError(
            f"{dataset.path} holds token id {summary['max_token_id']}, but the model's vocabulary has "
            f"{arch.vocab_size} entries (the data's tokenizer {made_with.get('source')} has "
            f"{made_with.get('vocab_size')}): tokenize the data with the model's tokenizer"
        )
    ours = tokenizer_dir / "tokenizer.json"
    ours = hashlib.sha256(ours.read_bytes()).hexdigest() if ours.exists() else None
    if summary["settings"]["tokenizer"]["tokenizer.json"] != ours:
        say(f"warning: {dataset.path} was tokenized with {made_with.get('source')}, not this run's tokenizer")


def evaluate(eval_step, params, frozen, batches, mesh) -> dict[str, float]:
    """The eval/ metrics over every batch: their sums added up, then divided once."""
    totals = {}
    for batch in batches:
        sums = eval_step(params, frozen, sharding.global_batch(batch, mesh))
        for k, v in jax.device_get(sums).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return {f"eval/{k}": float(v) for k, v in normalize(totals).items()}


def exporter(run: Path, config: Config, inputs: Inputs, base, say):
    """export(state): hf/step-N, with LoRA the base with its adapters merged in and, in hf/step-N/adapter, a
    PEFT adapter. What every export carries beside the weights is found once, here: a Hub tokenizer is not
    looked up again mid-run, where a network hiccup would fail an export."""
    generation = inputs.model_dir / "generation_config.json"  # keeps the end-of-turn ids the model was given
    generation = json.loads(generation.read_text()) if generation.exists() else None
    # The tokenizer goes beside the weights, so that transformers loads it from the export too.
    files = [path for name in data.TOKENIZER_FILES if (path := inputs.tokenizer_dir / name).exists()]
    merge = jax.jit(partial(model.merge_lora, scale=config.lora_scale, dtype=config.hf_save_dtype))

    def export(state: TrainState) -> None:
        out, params, extra = run / "hf" / f"step-{int(state.step)}", state.params, files
        with tempfile.TemporaryDirectory() as tmp:
            if config.lora_rank:
                alpha, adapter = config.lora_rank * config.lora_scale, Path(tmp) / "adapter"
                model.save_peft_adapter(
                    params, inputs.arch, config.lora_rank, alpha, adapter, config.model_name_or_path
                )
                params, extra = merge(base, params), files + [adapter]
            saved = dict(dtype=config.hf_save_dtype, generation_config=generation, extra_files=extra)
            model.save_hf(params, inputs.arch, out, **saved)
        say(f"step {int(state.step)} | exported {out}")

    return export


@contextlib.contextmanager
def stop_requests():
    """While inside, SIGTERM (preemption) and SIGINT (Ctrl-C) only note a request, which the loop honours
    after the current step: checkpoint, exit 0. A second Ctrl-C quits at once; a repeated SIGTERM (launchers
    send several) changes nothing. Yields a function that says, the same on every process, whether any was
    asked to stop. The previous handlers come back on exit."""
    requested = []

    def request(signum, frame):
        requested.append(signum)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def asked() -> bool:  # every process must stop at the same step
        if jax.process_count() == 1:
            return bool(requested)
        return bool(np.max(multihost_utils.process_allgather(np.int32(bool(requested)))))

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield asked
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def start_state(run: Path, config: Config, inputs: Inputs, optimizer, say):
    """(state, resume step or None, frozen weights, reference log-prob tables). What trains (the model, or
    LoRA's adapters) resumes from the newest checkpoint that loads; the frozen weights are LoRA's base and
    the reference (live: its weights; precompute: its log-probs, computed once, and no weights)."""
    arch, mesh = inputs.arch, inputs.mesh
    create = partial(TrainState.create, optimizer=optimizer)
    lora = model.lora_weights(config.lora_rank, config.lora_targets) if config.lora_rank else None
    compute_dtype = dtype_of(config.compute_dtype)
    base = model.load_params(inputs.model_dir, arch, mesh, dtype=compute_dtype) if lora else None
    abstract = jax.eval_shape(create, model.abstract_params(arch, mesh, lora))
    state = restore_checkpoint(run, abstract, mesh, say, inputs.data_id)
    resume_step = None if state is None else int(state.step)
    if state is None and lora:
        state = jax.jit(create)(model.init_params(arch, jax.random.key(config.seed), mesh, lora))
    elif state is None:
        state = jax.jit(create)(model.load_params(inputs.model_dir, arch, mesh))
    reference, tables = None, (None, None)
    if config.uses_reference and config.reference_mode == "live":
        if lora and inputs.reference_dir == inputs.model_dir:  # the base without its adapters
            reference = base
        else:
            reference_dtype = dtype_of(config.reference_dtype)
            reference = model.load_params(inputs.reference_dir, arch, mesh, dtype=reference_dtype)
    elif config.uses_reference:  # once over every pair, cached beside the data
        datasets = [inputs.train_set, inputs.val_set]
        tables = precompute_reference_logps(datasets, inputs.reference_dir, arch, config, mesh)
    return state, resume_step, (base, reference), tables


class Loaders(NamedTuple):
    train: object  # the training batches from the start step on
    validation: object  # () -> a pass over the validation batches
    shapes: dict  # "training", "evaluation" -> the batch shapes planned for them (data.plan_shapes)
    blank: object  # (kind, shape) -> a batch of that shape, all padding: what its program is compiled on


def loaders(config: Config, inputs: Inputs, start: int, tables) -> Loaders:
    """The training batches from step `start` on, a function that starts a pass over the validation pairs
    (the first max_eval_batches batches' worth, shortest first: the sums do not care about order, and like
    lengths pad less), and the few batch shapes that every batch of the run is laid out in, planned over
    all of the run's steps and its validation pass, so that they compile before the first step."""
    # Packed rows split evenly over the batch axes' devices and, in training, over the microbatches.
    devices = math.prod(inputs.mesh.shape[axis] for axis in sharding.BATCH_AXES)
    layouts = dict(evaluation=data.Layout(config.prefix_sharing, config.packing, row_multiple=devices))
    layouts["training"] = layouts["evaluation"]._replace(row_multiple=devices * config.num_microbatches)
    size, processes = config.train_batch_size, dict(process_count=jax.process_count())
    cap = None if config.max_eval_batches is None else config.max_eval_batches * size
    val_idx = data.by_length(inputs.val_set, inputs.val_idx[:cap])
    order = partial(
        data.train_order, batch_size=size, seed=config.seed, group_by_length=config.group_by_length
    )
    steps = dict(
        training=(
            inputs.train_set,
            [*map(order(inputs.train_set, inputs.train_idx), range(config.num_train_steps))],
        ),
        evaluation=(inputs.val_set, data.eval_order(val_idx, size)),
    )
    counts, plan = (
        dict(training=TRAIN_SHAPES, evaluation=EVAL_SHAPES),
        dict(max_seq_len=config.max_seq_len, **processes),
    )
    # Planned over the whole run whatever the start, so that a resumed run meets the programs it compiled
    # before (from the cache); none when nothing is left to run.
    left = start < config.num_train_steps
    shapes = {
        kind: data.plan_shapes(dataset, batches, count=counts[kind], layout=layouts[kind], **plan)
        if batches and left
        else []
        for kind, (dataset, batches) in steps.items()
    }
    common = dict(
        batch_size=size, max_seq_len=config.max_seq_len, process_index=jax.process_index(), **processes
    )
    train = data.train_batches(
        inputs.train_set,
        inputs.train_idx,
        seed=config.seed,
        start_step=start,
        group_by_length=config.group_by_length,
        reference=tables[0],
        layout=layouts["training"],
        shapes=shapes["training"],
        **common,
    )
    evaluation = dict(
        reference=tables[1], layout=layouts["evaluation"], shapes=shapes["evaluation"], **common
    )
    references = dict(training=tables[0] is not None, evaluation=tables[1] is not None)
    blank = lambda kind, shape: data.blank_batch(shape, references[kind], jax.process_count())
    return Loaders(train, partial(data.eval_batches, inputs.val_set, val_idx, **evaluation), shapes, blank)


def check_update(step: int, metrics: dict, config: Config, run: Path, say) -> None:
    """A non-finite loss or gradient (the step left the weights as they were): stop, or say it was skipped;
    stop too when every update so far was skipped, which trains on nothing."""
    if not metrics.pop("nonfinite"):
        return
    if config.on_nonfinite == "stop":
        good = ([f"step-{s}" for s in saved_steps(run)] or ["none"])[-1]
        raise FloatingPointError(
            f"step {step}: non-finite loss or gradient (loss {metrics['loss']}, grad_norm "
            f"{metrics['grad_norm']}); the update was not applied; newest good checkpoint: {good}. "
            "Rerun with --config.on-nonfinite skip to resume from it and skip such updates"
        )
    say(f"step {step}: non-finite loss or gradient, update skipped")
    if metrics["skipped_updates"] == step >= 10:
        raise FloatingPointError(
            f"every update of steps 1..{step} was non-finite, so the run trains on nothing: check "
            "learning_rate, beta and the loss settings"
        )


def main(config: Config) -> Path:
    started = time.time()
    sharding.initialize_distributed(config.coordinator_address, config.num_processes, config.process_id)
    use_compilation_cache(config.compilation_cache_dir)
    run = Path(config.output_dir)
    say = (lambda *a: print(*a, flush=True)) if sharding.is_writer() else (lambda *a: None)

    # --- inputs: everything is checked before anything is written or deleted
    demo, given = config.model_name_or_path == "demo", config  # config.json records the config as given
    if demo:  # the demo's model and pairs, made in the run directory once it has passed its check
        pairs = config.train_data or str(run / "demo" / "pairs.jsonl")
        config = dataclasses.replace(config, model_name_or_path=str(run / "demo" / "model"), train_data=pairs)
    check_run_dir(run, given)  # a demo run copied elsewhere resumes: its files are found under it anew
    if demo:
        make_demo(run / "demo", config.seed)
    inputs = load_inputs(run, config, say)
    start_run_dir(run, given)

    # --- state, then the batches from where it stands
    mesh, optimizer = inputs.mesh, make_optimizer(config)
    with jax.set_mesh(mesh):
        train_step, eval_step = make_steps(inputs.arch, config, optimizer)
        state, resume_step, frozen, tables = start_state(run, config, inputs, optimizer, say)
    start = resume_step or 0
    batches = loaders(config, inputs, start, tables)
    programs = Programs(dict(training=train_step, evaluation=eval_step), batches.shapes)
    count = sum(map(len, batches.shapes.values()))
    say(f"compiling {count} programs (batch shapes) before the first step ...")
    with jax.set_mesh(mesh):
        first = dict(training=state, evaluation=state.params)  # the arguments before the batch
        blank = lambda kind, shape: sharding.global_batch(batches.blank(kind, shape), mesh)
        programs.compile(lambda kind, shape: (first[kind], frozen, blank(kind, shape)))
    eval_metrics = lambda s: evaluate(
        partial(programs, "evaluation"), s.params, frozen, batches.validation(), mesh
    )
    export = exporter(run, config, inputs, frozen[0], say)

    # --- the loop
    with MetricsLog(run, config, resume_step, say) as log, jax.set_mesh(mesh), stop_requests() as stop_asked:
        if start == 0:
            log.eval(0, eval_metrics(state))
        if start < config.num_train_steps:
            steps, dtype = f"{start + 1}..{config.num_train_steps}", jnp.dtype(dtype_of(config.compute_dtype))
            say(
                f"training steps {steps} on {mesh.devices.size} device(s), batch {config.train_batch_size} "
                f"pairs, compute {dtype.name}"
            )
        upcoming = next(batches.train)
        for step in range(start + 1, config.num_train_steps + 1):
            state, metrics = programs("training", state, frozen, sharding.global_batch(upcoming, mesh))
            if step < config.num_train_steps:  # dispatch is async: read the next batch while the step runs
                upcoming = next(batches.train)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if step == start + 1:
                say(f"first step done {time.time() - started:.1f} s after start")
            check_update(step, metrics, config, run, say)
            log.train(step, metrics)
            last = step == config.num_train_steps
            # A preempted job has seconds: on a stop request only the checkpoint is written, and the
            # eval or export due at this step is skipped (the last step finishes the run as usual).
            if not last and stop_asked():
                save_checkpoint(run, state, config.keep_checkpoints, inputs.data_id)
                say(f"stopped at step {step} on request; checkpoint written. Run the same command to resume.")
                return run
            if step % config.steps_per_eval == 0 or last:
                log.eval(step, eval_metrics(state))
            if step % config.steps_per_checkpoint == 0 or last:
                save_checkpoint(run, state, config.keep_checkpoints, inputs.data_id)
            if step % config.steps_per_hf_export == 0 or last:
                export(state)
    legend = (
        "rows x width x pair slots x view width"
        if config.prefix_sharing or config.packing
        else "pairs x width"
    )
    say(f"programs: {programs.report()} (batch shapes: {legend})")
    made = [name for name in ("config.json", "metrics.jsonl", "checkpoints/", "hf/") if (run / name).exists()]
    loads = " (transformers loads hf/step-N as it is)" if "hf/" in made else ""
    say(f"done. run directory {run.resolve()}: {', '.join(made)}{loads}")
    return run


# --- appendix: the offline demo (a tiny Llama, a word-level tokenizer with a chat template, synthetic pairs)

DEMO_TOPICS = {
    "colors": "red blue green yellow purple orange pink brown black white grey violet",
    "animals": "cat dog horse cow sheep goat mouse lion tiger bear wolf fox",
    "foods": "bread rice apple pear cheese soup cake plum bean corn nut egg",
    "tools": "hammer saw drill wrench knife axe rope nail screw file chisel lever",
}
DEMO_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def make_demo(root: Path, seed: int) -> tuple[Path, Path]:
    """A tiny HF-format Llama with its tokenizer, and preference pairs whose rule (answer with words of the
    topic the prompt names) a small model learns from a few hundred pairs and applies to pairs it has not
    seen. Returns (model_dir, data_file); each is written whole or not at all."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    model_dir, data_file = root / "model", root / "pairs.jsonl"
    if model_dir.exists() and data_file.exists():
        return model_dir, data_file
    specials = "<|pad|> <|begin_of_text|> <|end_of_text|> <|start_header_id|> <|end_header_id|> <|eot_id|>"
    specials = specials.split()
    words = {w for ws in DEMO_TOPICS.values() for w in ws.split()} | set(DEMO_TOPICS)
    words |= {"user", "assistant", "system", "tell", "me", "some", "please", "[UNK]"}
    vocab = {token: i for i, token in enumerate(specials + sorted(words))}
    ids = dict(bos_token_id=1, eos_token_id=(5,), pad_token_id=0, max_position_embeddings=256)
    arch = model.LlamaConfig(len(vocab), 64, 192, 2, 4, 2, 16, rope_theta=10000.0, **ids)
    writer = sharding.is_writer()
    with tempfile.TemporaryDirectory() as tmp:
        if writer:
            tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
            tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
            tokenizer.add_special_tokens(specials)
            tokenizer.save(f"{tmp}/tokenizer.json")
            names = dict(bos_token=specials[1], eos_token=specials[5], pad_token=specials[0])
            settings = dict(tokenizer_class="PreTrainedTokenizerFast", **names, chat_template=DEMO_TEMPLATE)
            settings["model_max_length"] = 4096
            Path(tmp, "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
        mesh = sharding.make_mesh(-1, 1, 1)  # replicated: every process can take part in the export
        with jax.set_mesh(mesh):
            files = [Path(tmp, "tokenizer.json"), Path(tmp, "tokenizer_config.json")] if writer else []
            params = model.init_params(arch, jax.random.key(seed), mesh)
            model.save_hf(params, arch, model_dir, dtype="float32", extra_files=files)
    if writer:
        rng = np.random.default_rng(seed)
        with sharding.atomic(data_file) as tmp, open(tmp, "w") as f:
            for _ in range(640):
                topic, other = rng.choice(list(DEMO_TOPICS), size=2, replace=False)
                pick = lambda t: " ".join(rng.choice(DEMO_TOPICS[t].split(), size=rng.integers(3, 7)))
                pair = dict(prompt=f"please tell me some {topic}", chosen=pick(topic), rejected=pick(other))
                f.write(json.dumps(pair) + "\n")
    multihost_utils.sync_global_devices("demo ready")
    return model_dir, data_file


# --- the command line


def parse_args(args: list[str] | None = None) -> Config:
    """The Config from the command line. When the model is the demo, the fields not given take the demo's
    values (DEMO_SETTINGS), and the demo says which; a value given on the command line always wins."""

    def parse(default: Config) -> Config:
        def command(config: Config = default) -> Config:
            return config

        return data.tyro_cli(command, args=args, description=__doc__)

    config = parse(Config())
    if config.model_name_or_path != "demo":
        return config
    demo, default = parse(Config(**DEMO_SETTINGS)), Config()
    # A field not on the command line parses to whichever default it is given.
    not_given = lambda k: getattr(config, k) == getattr(default, k) and getattr(demo, k) == DEMO_SETTINGS[k]
    applied = ", ".join(f"{k}={v}" for k, v in DEMO_SETTINGS.items() if not_given(k))
    if applied:
        print(f"demo: {applied} (change any with --config.FIELD VALUE)")
    return demo


def cli() -> None:
    """`python dpo.py`: a user's mistake, a full disk or a lost file is one line on stderr and exit code 2."""
    try:
        main(parse_args())
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training: nothing half-written stays
        print("error: interrupted; run the same command to go on from the newest checkpoint", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, FloatingPointError) as e:
        if os.environ.get("DPO_TRACEBACK"):
            raise
        if isinstance(e, OSError) and e.filename:  # a full disk, no permission
            e = (
                f"{e.filename}: {e.strerror or e}. Fix that (a full disk: free some space) and run the same "
                "command: it resumes from the newest complete checkpoint"
            )
        print(f"error: {e}  (DPO_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
