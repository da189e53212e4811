"""Direct Preference Optimization: the config, the log-probs, the train step, the compiled programs, the loop.

    python dpo.py                                  # offline demo: tiny model, synthetic pairs, CPU
    python dpo.py --config.beta 0.01 \\
        --config.model-name-or-path meta-llama/Llama-3.1-8B-Instruct \\
        --config.train-data HuggingFaceH4/ultrafeedback_binarized --config.train-split train_prefs \\
        --config.validation-data HuggingFaceH4/ultrafeedback_binarized --config.validation-split test_prefs
    python dpo.py ... --config.reference-mode precompute     # the reference runs once, before training
    python dpo.py ... --config.loss-type sigmoid bco_pair sft --config.loss-weights 0.8 0.2 1.0
    python dpo.py ... --config.lora-rank 16 --config.packing      # adapters; several pairs a row
    python dpo.py ... --config.sync-ref-model --config.ld-alpha 0.5   # TR-DPO, LD-DPO; also orpo, WPO
    python dpo.py --help                           # every field, with its meaning

The DPO loss (Rafailov et al., 2023) for a pair (prompt x, chosen y_w, rejected y_l) is
    -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])
where pi is the policy being trained and ref the frozen starting model; losses.py holds it and its variants.
Here, in order: Config; the batch layouts (rows_of) and pair_logps, one forward pass over chosen and rejected
(model.forward, then model.token_logps: the fused LM head and log-softmax); the optimizer; the steps (the loop
calls train_step, which takes the gradients of `loss`); Programs, compiled before step 1; main. bookkeeping.py
keeps the run around the step. Left out on purpose: generation, KV caches, pipeline parallelism, quantization
(but LoRA's base).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from jax.sharding import PartitionSpec as P

import bookkeeping
import data
import losses
import model
import sharding

ADAPTABLE = tuple(model.LORA_TARGETS)  # lora_targets' choices
# Compiled programs outlive the run here unless --config.compilation-cache-dir says otherwise.
CACHE_DIR = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dpo-jax")


# What a sweep changes: the compiled steps take these settings as inputs (Config.hyperparameters), not as
# constants, so another value compiles nothing. Traced there, none may decide a Python `if`; None or not
# (ld_alpha, max_grad_norm, loss_weights) makes another program.
SWEPT = (
    *("beta", "label_smoothing", "loss_weights", "simpo_gamma", "discopop_tau", "ld_alpha"),
    *("f_alpha_divergence_coef", "ref_model_mixup_alpha", "ref_model_sync_steps", "learning_rate"),
    *("min_lr_ratio", "num_train_steps", "weight_decay", "max_grad_norm"),
)
need = losses.need  # a config refusal: one line, no traceback (cli)
HELP = "\n\n".join(__doc__.split("\n\n")[:2])  # --help: the examples (tyro joins prose into one line)
LossName = Literal[tuple(losses.LOSSES)]
SMOOTHING_HELP = f"flipped-label share, read by {', '.join(losses.reading('label_smoothing'))}"


@dataclasses.dataclass(frozen=True)
class Config:
    # --- model and data
    model_name_or_path: str = "demo"  # Hub id or local dir: Llama, Qwen2.5, Qwen3, Mistral, Gemma 2/3; "demo"
    reference_model_path: str | None = None  # frozen reference model; default: the policy's starting weights
    tokenizer: str | None = None  # HF Hub id or local dir; default: the model's own
    # raw data: JSON template variables, e.g. {"enable_thinking": false}
    chat_template_kwargs: str | None = None
    train_data: str | None = None  # data.py output dir, or raw data: Hub dataset id, dir, .parquet/.jsonl
    train_split: str = "train"  # split of a raw Hub dataset (UltraFeedback: train_prefs)
    # validation sets instead of a split, each SOURCE or NAME=SOURCE: one logs eval/..., several eval/NAME/...
    validation_data: tuple[str, ...] | None = None
    validation_split: str = "test"  # split of a raw Hub validation dataset (UltraFeedback: test_prefs)
    validation_split_fraction: float | None = 0.1  # train_data held out for eval when no validation_data
    max_seq_len: int = 2048  # longest side (tokens); raw data: longer pairs dropped; tokenized data: refused
    output_dir: str = "runs/dpo"  # run directory: config.json, metrics.jsonl, checkpoints/, hf/
    overwrite: bool = False  # replace a run with another config: deletes its checkpoints/, hf/, metrics.jsonl
    # --- the loss (losses.py: each one's formula, paper and what it reads)
    beta: float = 0.1  # strength of the pull toward the reference (0.01-0.05 free, 0.1-0.5 close)
    loss_type: tuple[LossName, ...] = ("sigmoid",)  # one or more losses (losses.py), summed with loss_weights
    loss_weights: tuple[float, ...] | None = None  # one weight per loss_type; None: 1 each
    label_smoothing: Annotated[float, tyro.conf.arg(help=SMOOTHING_HELP)] = 0.0
    discopop_tau: float = 0.05  # discopop's temperature
    simpo_gamma: float = 0.5  # simpo's target reward margin
    reference_mode: Literal["live", "precompute"] = "live"  # reference: each step, or once before training
    use_weighting: bool = False  # WPO: each pair's loss weighted by the policy's probability of its responses
    ld_alpha: float | None = None  # LD-DPO: weight of the log-probs past the shorter response; None: off
    # f-DPO: the divergence whose score stands in for each log-ratio (reverse_kl: DPO's own)
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5  # alpha of alpha_divergence (1: reverse_kl)
    sync_ref_model: bool = False  # TR-DPO: every ref_model_sync_steps the reference moves toward the policy
    ref_model_mixup_alpha: float = 0.6  # TR-DPO: reference <- alpha * policy + (1 - alpha) * reference
    ref_model_sync_steps: int = 512  # TR-DPO: steps between those moves
    # --- LoRA
    lora_rank: int = 0  # adapters of this rank on the frozen model, the reference its base; 0: full tuning
    lora_alpha: float | None = None  # LoRA scale alpha / rank, alpha > 0; None: alpha = 2 * rank
    lora_targets: tuple[Literal[ADAPTABLE], ...] = ADAPTABLE  # the projections adapted (with lora_rank)
    base_quantization: Literal["none", "nf4", "int8"] = "none"  # the frozen base's projections (QLoRA: nf4)
    # --- optimization
    train_batch_size: int = 128  # preference pairs per optimizer step (global, over all devices)
    microbatch_size: int | None = None  # pairs per forward/backward; gradients accumulate up to the batch
    num_train_steps: int = 2000  # optimizer steps (a resume may change it only where the steps keep their lr)
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
    # what each layer keeps for the backward pass; offload: full's, in host memory
    remat: Literal["none", "full", "save_matmuls", "offload"] = "full"
    # xla: scores of a row whole; cudnn: fused kernel (GPU); chunked: blockwise (FlashAttention-2 in jnp);
    # auto: cudnn on GPU where it fits, else xla below 8192 tokens a row and chunked from there
    attention_impl: Literal["auto", "xla", "cudnn", "chunked"] = "auto"
    logits_chunk_size: int = 4096  # vocabulary entries per chunk of the fused LM head + log-softmax
    mesh_data: int = 1  # pure data-parallel replicas
    mesh_fsdp: int = -1  # FSDP: batch and parameters sharded; -1 takes the remaining devices
    mesh_tensor: int = 1  # tensor parallel: heads and MLP hidden split
    mesh_context: int = 1  # context parallel: rows' tokens split over devices, params too (docs/scaling.md)
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
        micro, frac = self.microbatch_size, self.validation_split_fraction
        if isinstance(self.validation_data, str):  # one set, given as a string (Python, an old config.json)
            object.__setattr__(self, "validation_data", (self.validation_data,))
        for name, value in dataclasses.asdict(self).items():
            need(not isinstance(value, float) or math.isfinite(value), f"{name} must be finite, got {value}")
        positive = (
            "beta train_batch_size logits_chunk_size steps_per_eval steps_per_checkpoint keep_checkpoints"
        )
        for name in (positive + " steps_per_hf_export log_every discopop_tau ref_model_sync_steps").split():
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
        need(self.validation_data != (), "validation_data names no set: give one or more, or leave it out")
        need(self.max_seq_len >= 8, f"max_seq_len must be >= 8, got {self.max_seq_len}")
        need(self.lora_targets, f"lora_targets names no projection; give some of {' '.join(ADAPTABLE)}")
        need(len(self.lora_targets) == len(set(self.lora_targets)), "lora_targets: name each one once")
        need(self.model_name_or_path == "demo" or self.train_data is not None, "train_data is required")
        alpha, rank = self.lora_alpha, self.lora_rank
        need(alpha is None or alpha > 0, f"lora_alpha must be > 0 (or None: 2 * lora_rank), got {alpha}")
        for name, unset in [("lora_alpha", alpha is None), ("lora_targets", self.lora_targets == ADAPTABLE)]:
            need(rank or unset, f"{name} does nothing without lora_rank (a full fine-tune would run)")
        need(rank or self.base_quantization == "none", "base_quantization is for LoRA's base: set lora_rank")
        losses.check(self)  # the loss family's settings, read off its table
        self._check_knobs()

    def _check_knobs(self):
        """The objective's knobs that no row of the loss table holds: LD-DPO, f-DPO's alpha, TR-DPO."""
        ld, coef = self.ld_alpha, self.f_alpha_divergence_coef
        need(ld is None or 0 <= ld <= 1, f"ld_alpha must be in [0, 1] or None, got {ld}")
        idle = self.f_divergence_type != "alpha_divergence" and coef != Config.f_alpha_divergence_coef
        need(not idle, "f_alpha_divergence_coef without f_divergence_type alpha_divergence does nothing")
        # f-DPO's alpha-divergences run from the forward (0) to the reverse KL (1); far out, no gradient.
        need(0 <= coef <= 1, f"f_alpha_divergence_coef must be in [0, 1], got {coef}")
        if self.sync_ref_model:
            need(self.reference_mode == "live", "sync_ref_model needs reference_mode live: it moves")
            # The reference is then the adapters' base, which must not move (TRL refuses PEFT too).
            need(not self.lora_rank, "sync_ref_model with lora_rank is not supported")
            steps = self.ref_model_sync_steps
            need(steps <= self.num_train_steps, f"ref_model_sync_steps {steps} > num_train_steps: no sync")
        knobs = ("ref_model_mixup_alpha", "ref_model_sync_steps")
        idle = [n for n in knobs if getattr(self, n) != getattr(Config, n)]
        need(self.sync_ref_model or not idle, f"{', '.join(idle)} without sync_ref_model does nothing")
        need(0 <= self.ref_model_mixup_alpha <= 1, "ref_model_mixup_alpha must be in [0, 1]")

    def in_steps(self, length: float) -> int:
        """warmup or cooldown in steps: a fraction of the run when < 1, else steps."""
        return int(length * self.num_train_steps) if length < 1 else int(length)

    def hyperparameters(self) -> dict:
        """What a sweep changes, given to the compiled steps as inputs rather than built into them as
        constants, so that every value runs the same programs: SWEPT's values, and warmup and cooldown."""
        return {name: getattr(self, name) for name in SWEPT} | {"schedule_steps": self.schedule_steps()}

    def traced(self, hyperparameters: dict) -> Config:
        """This config inside a step, SWEPT's values the step's inputs (tracers: no check runs on them)."""
        config = copy.copy(self)
        config.__dict__.update({name: hyperparameters[name] for name in SWEPT})
        return config

    def schedule_steps(self) -> tuple[int, int]:
        """warmup and cooldown in steps, the cooldown within the run (lr_at)."""
        return self.in_steps(self.warmup), min(self.in_steps(self.cooldown), max(self.num_train_steps, 1))

    def lr_at(self, step, schedule_steps: tuple | None = None):
        """The learning rate at `step` (traced or numpy; optax's schedule): linear warmup from 0 to the
        peak, then lr_schedule's shape from the peak toward min_lr over the rest of the run, with the last
        `cooldown` steps annealing linearly to min_lr from wherever the shape stands (`constant`:
        warmup-stable-decay). schedule_steps: a step's input (traced); default this config's."""
        (warm, cool), total = schedule_steps or self.schedule_steps(), jnp.maximum(self.num_train_steps, 1)
        peak, low = self.learning_rate, self.learning_rate * self.min_lr_ratio

        def shape(step):
            frac = jnp.clip((step - warm) / jnp.maximum(total - warm, 1), 0.0, 1.0)
            if self.lr_schedule == "linear":
                return peak + (low - peak) * frac
            if self.lr_schedule == "cosine":
                return low + (peak - low) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
            return jnp.full_like(frac, peak)

        step = jnp.asarray(step, jnp.float32)
        value = jnp.where(step < warm, peak * step / jnp.maximum(warm, 1), shape(step))
        cool_start = total - cool
        at_start = shape(jnp.asarray(cool_start, jnp.float32))
        cooled = at_start + (low - at_start) * (step - cool_start) / jnp.maximum(cool, 1)
        return jnp.where((cool > 0) & (step >= cool_start) & (step >= warm), cooled, value)

    @property
    def num_microbatches(self) -> int:
        return self.train_batch_size // (self.microbatch_size or self.train_batch_size)

    @property
    def lora_scale(self) -> float:
        return (2 * self.lora_rank if self.lora_alpha is None else self.lora_alpha) / max(self.lora_rank, 1)

    @property
    def uses_reference(self) -> bool:
        return losses.uses_reference(self.loss_type)

    @property
    def live_reference(self) -> bool:  # the reference runs in every step
        return self.uses_reference and self.reference_mode == "live"


# --- one forward pass over chosen and rejected, in either batch layout


def batch_reshape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Reshape that keeps the leading (batch) dim sharded over data x fsdp. A plain reshape may move
    part of that sharding onto a new minor dim (it does when fsdp is 1)."""
    return jnp.reshape(x, shape, out_sharding=P(sharding.BATCH_AXES, *[None] * (len(shape) - 1)))


class Rows(NamedTuple):
    """A batch of either layout (data.Layout describes both) as the model and the loss read it: the rows the
    model runs, and for each of the batch's b pairs, in one order, what the loss needs."""

    tokens: jax.Array  # [N, T] int: the rows the model runs
    inputs: dict  # model.forward's keywords for them: lengths [N]; or positions [N, T] and views
    targets: jax.Array  # [N, T] int: the token after each position
    scored: jax.Array  # [N, T] bool: True where that target's log-prob counts
    by_pair: Callable  # per-token values [N, T] -> their sums per pair and side, [b, 2]
    scored_tokens: jax.Array  # [b, 2]: the scored tokens of each pair's chosen and rejected
    weight: jax.Array  # [b]: 1 for a pair, 0 for padding
    ref_logps: jax.Array | None  # [b, 2]: the precomputed reference's log-probs, when the batch has them
    attended: jax.Array  # the lengths of the sequences attention runs over (model.step_flops)
    ran: jax.Array | None  # the tokens the model ran (model.step_flops); None: all of `attended`'s
    tail: jax.Array  # [N, T] bool: scored targets past the pair's shorter side (LD-DPO's verbose part)
    chosen_sequence: jax.Array  # [N, T] bool: every target of a chosen sequence, prompt included (ORPO's NLL)


def rows_of(batch: dict) -> Rows:
    """The one place that tells the two layouts apart: rows of several sequences carry views."""
    return _rows_of_sequences(batch) if "views" in batch else _rows_of_sides(batch)


def _rows_of_sides(batch: dict) -> Rows:
    """One pair a row: [b, 2, T] -> [2b, T], rows 2i and 2i + 1 pair i's chosen and rejected, so one forward
    pass serves both and a batch-sharded array keeps each pair on one device."""
    b, _, t = batch["input_ids"].shape
    tokens, mask = (batch_reshape(batch[k], (2 * b, t)) for k in ("input_ids", "loss_mask"))
    # Position t predicts token t + 1: shift targets and mask left instead of slicing the hidden states.
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    scored = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    place = jnp.cumsum(scored, axis=1)  # each scored target's place among its side's, from 1
    shorter = batch_reshape(place[:, -1], (b, 2)).min(1, keepdims=True)
    shorter = batch_reshape(jnp.broadcast_to(shorter, (b, 2)), (2 * b,))
    lengths = batch_reshape(batch["lengths"], (2 * b,))
    return Rows(
        tokens=tokens,
        inputs=dict(lengths=lengths),
        targets=targets,
        scored=scored,
        by_pair=lambda x: batch_reshape(x.sum(-1), (b, 2)),
        scored_tokens=batch["loss_mask"].sum(-1),
        weight=batch["weight"],
        ref_logps=batch.get("ref_logps"),
        attended=batch["lengths"],
        ran=None,
        tail=(place > shorter[:, None]) & (scored > 0),
        chosen_sequence=(jnp.arange(2 * b) % 2 == 0)[:, None] & (jnp.arange(t) < lengths[:, None] - 1),
    )


def _rows_of_sequences(batch: dict) -> Rows:
    """Rows of several sequences (prefix sharing, packing): per-pair arrays [R, K, ...] flattened to
    [R * K, ...], the pairs' sums gathered by slot and side; attention runs per view, a shared prompt once."""
    by_pair = partial(_per_pair_side, batch)
    flat = lambda x: batch_reshape(x, (-1, *x.shape[2:]))
    views = (batch["views"], batch["view_lengths"], batch["slot"])
    return Rows(
        tokens=batch["input_ids"],
        inputs=dict(positions=batch["positions"], views=views),
        targets=batch["targets"],
        scored=batch["target_mask"],
        by_pair=by_pair,
        scored_tokens=by_pair(batch["target_mask"]),
        weight=flat(batch["weight"]),
        ref_logps=flat(batch["ref_logps"]) if "ref_logps" in batch else None,
        attended=batch["view_lengths"],
        ran=jnp.sum(batch["pair"] >= 0, dtype=jnp.float32),
        tail=_tail_of_sequences(batch),
        chosen_sequence=_chosen_sequence(batch),
    )


def _chosen_sequence(batch: dict) -> jax.Array:
    """Rows.chosen_sequence of rows of several sequences: a shared or chosen token before its chosen
    sequence's last (positions count within each side's sequence)."""
    pair = batch["pair"]
    length = jnp.take_along_axis(batch["lengths"][..., 0], jnp.maximum(pair, 0), axis=1)  # [R, W]
    return (pair >= 0) & (batch["side"] != data.REJECTED) & (batch["positions"] < length - 1)


def _tail_of_sequences(batch: dict) -> jax.Array:
    """Rows.tail of rows of several sequences: a scored target counts among its pair slot and side's (a shared
    one among both sides', and being the prompt's it comes first, so it is never past the shorter side)."""
    slots = jax.nn.one_hot(batch["pair"], batch["weight"].shape[1], dtype=jnp.float32)  # [R, W, K]
    sides = jnp.stack([batch["side"] != data.REJECTED, batch["side"] != data.CHOSEN], -1)  # [R, W, 2]
    counted = batch["target_mask"][..., None, None] * slots[..., None] * sides[..., None, :]  # [R, W, K, 2]
    place = jnp.cumsum(counted, axis=1)
    shorter = place[:, -1].min(-1)  # [R, K]
    return jnp.any((counted > 0) & (place > shorter[:, None, :, None]), axis=(2, 3))


def _per_pair_side(batch: dict, x: jax.Array) -> jax.Array:
    """Per-token values of rows of several pairs ([R, W]) summed per pair slot and side, [R * K, 2]: a shared
    token (data.SHARED) counts for both sides."""
    slots = jax.nn.one_hot(batch["pair"], batch["weight"].shape[1], dtype=jnp.float32)  # [R, W, K]; -1: none
    sides = jnp.stack([batch["side"] != data.REJECTED, batch["side"] != data.CHOSEN], -1).astype(jnp.float32)
    # HIGHEST: default precision multiplies f32 in bf16 on TPU (TF32 on GPU), which would round each log-prob.
    summed = jnp.einsum("rt,rtk,rts->rks", x.astype(jnp.float32), slots, sides, precision="highest")
    return batch_reshape(summed, (-1, *summed.shape[2:]))


def pair_logps(params, batch: dict, arch: model.LlamaConfig, config: Config, lora=None):
    """(summed log-probs [b, 2], TokenStats each [b, 2], sequence) of each pair's chosen (column 0) and
    rejected (column 1) under `params` (and, with LoRA, the adapters `lora` on them), in rows_of's pair order;
    sequence: for a loss that reads it (losses.reads_sequence), the summed log-probs [b] and the tokens [b]
    of each whole chosen sequence, prompt included, else None. One forward pass over the batch's rows; rows
    of several sequences run a shared prompt once."""
    dtype = model.dtype_of(config.compute_dtype)
    # forward casts each layer's weights to the compute dtype as it gathers them: no full-model copy.
    options = dict(lora=lora, lora_scale=config.lora_scale, remat=config.remat)
    options |= dict(attention_impl=config.attention_impl)
    # Gather the FSDP shards of the LM head once; its vocabulary stays split over the tensor axis.
    lm_head = jax.sharding.reshard(model.lm_head_weight(params).astype(dtype), P(None, "tensor"))
    rows = rows_of(batch)
    hidden = model.forward(params, rows.tokens, arch, compute_dtype=dtype, **rows.inputs, **options)
    whole = losses.reads_sequence(config.loss_type)
    mask = rows.scored | rows.chosen_sequence if whole else rows.scored
    cap, chunk = arch.final_logit_softcapping, config.logits_chunk_size
    logps, stats = model.token_logps(hidden, lm_head, rows.targets, mask, chunk, cap)
    # Back from the hidden states' split of the tokens (context) to the rows' masks': [N, T] floats, small.
    logps, stats = jax.tree.map(
        lambda x: jax.sharding.reshard(x, jax.typeof(mask).sharding.spec), (logps, stats)
    )
    sequence = None
    if whole:  # the chosen sequences' sums, then the scored targets' as without them
        chosen = lambda x: rows.by_pair(jnp.where(rows.chosen_sequence, x, 0))[:, 0]
        sequence = chosen(logps), chosen(jnp.ones_like(logps))
        logps, stats = jax.tree.map(lambda x: jnp.where(rows.scored, x, 0.0), (logps, stats))
    if config.ld_alpha is not None:  # LD-DPO: the verbose part of the longer side counts ld_alpha
        logps = jnp.where(rows.tail, config.ld_alpha * logps, logps)
    return rows.by_pair(logps), jax.tree.map(rows.by_pair, stats), sequence


# --- optimizer and learning-rate schedule


def make_optimizer(config: Config, schedule_steps: tuple | None = None) -> optax.GradientTransformation:
    """AdamW after clipping; in a step, `config` is traced and `schedule_steps` its input (Config.lr_at)."""
    not_norm = partial(jax.tree.map_with_path, lambda path, _: "norm" not in jax.tree_util.keystr(path))
    clip = (
        optax.identity() if config.max_grad_norm is None else optax.clip_by_global_norm(config.max_grad_norm)
    )
    lr, (b1, b2) = partial(config.lr_at, schedule_steps=schedule_steps), (config.adam_b1, config.adam_b2)
    return optax.chain(clip, optax.adamw(lr, b1, b2, weight_decay=config.weight_decay, mask=not_norm))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict  # f32 master weights (with LoRA: the adapters), sharded as declared in model.py
    opt_state: optax.OptState  # sharded like params
    skipped: jax.Array  # int32 scalar: updates skipped for a non-finite loss or gradient
    reference: dict | None = None  # TR-DPO's moving reference (sync_ref_model), so checkpoints hold it

    @classmethod
    def create(cls, params: dict, optimizer) -> TrainState:
        zero = jnp.zeros((), jnp.int32)
        return cls(zero, params, optimizer.init(params), zero)


# --- the train and eval steps


class Frozen(NamedTuple):
    """The weights a step reads but does not train."""

    base: dict | None  # what LoRA's adapters sit on (projections model.Quantized with QLoRA); None: no LoRA
    reference: dict | None  # with LoRA by default the base; None: precomputed (ref_logps) or not used


def with_reference(state: TrainState, frozen: Frozen) -> Frozen:
    """The weights a step reads: the moving reference (sync_ref_model) lives in the state, not in Frozen."""
    return frozen if state.reference is None else frozen._replace(reference=state.reference)


def synced_reference(reference: dict | None, params: dict, step, config: Config) -> dict | None:
    """TR-DPO (Gorbatovski 2024), as TRL's SyncRefModelCallback: after every ref_model_sync_steps-th step the
    reference becomes alpha * policy + (1 - alpha) * reference (in f32, kept in the reference's dtype)."""
    if not config.sync_ref_model:
        return reference
    a = config.ref_model_mixup_alpha
    mix = lambda p, r: (a * p.astype(jnp.float32) + (1 - a) * r.astype(jnp.float32)).astype(r.dtype)
    due = step % config.ref_model_sync_steps == 0
    return jax.lax.cond(due, lambda: jax.tree.map(mix, params, reference), lambda: reference)


class PairLogps(NamedTuple):
    """What the loss reads of a batch, per pair in rows_of's order."""

    policy: jax.Array  # [b, 2] summed log-probs of chosen and rejected under the policy
    reference: jax.Array | None  # [b, 2] under the reference; None for the reference-free losses
    stats: model.TokenStats  # each [b, 2]: the policy's token stats, summed
    tokens: jax.Array  # [b, 2]: scored tokens
    weight: jax.Array  # [b]: 1 for a pair, 0 for padding
    sequence: tuple | None = None  # the whole chosen sequences' log-probs and tokens, each [b] (pair_logps)


def policy_logps(params, base, batch: dict, arch, config: Config):
    """pair_logps under the weights that train: the whole model, or LoRA's adapters `params` on the base."""
    weights, lora = (base, params) if config.lora_rank else (params, None)
    return pair_logps(weights, batch, arch, config, lora=lora)


def batch_logps(params, frozen: Frozen, batch: dict, arch, config: Config) -> PairLogps:
    """The policy's log-probs of the batch's pairs and the reference's: run live on its weights, read from the
    batch when precomputed, or none for a reference-free loss."""
    rows = rows_of(batch)
    policy, stats, sequence = policy_logps(params, frozen.base, batch, arch, config)
    reference = rows.ref_logps if config.uses_reference else None
    if config.live_reference:
        reference = jax.lax.stop_gradient(pair_logps(frozen.reference, batch, arch, config)[0])
    return PairLogps(policy, reference, stats, rows.scored_tokens, rows.weight, sequence)


def loss(params, frozen: Frozen, batch: dict, arch, config: Config, totals=None):
    """The loss of a batch's pairs and their metric sums: what the train step differentiates. `totals`: the
    whole batch's when this batch is one of its microbatches (losses.dpo_loss)."""
    return objective(batch_logps(params, frozen, batch, arch, config), config, totals)


def objective(logps: PairLogps, config: Config, totals=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """losses.dpo_loss of the pairs and their metric sums (with the loss times the pairs, so that it adds up
    too), on replicated arrays: a loss that couples the batch sorts them."""
    replicated = jax.tree.map(lambda x: jax.sharding.reshard(x, P()), logps)
    policy, reference, stats, tokens, weight, sequence = replicated
    pair_weight = losses.wpo_weights(stats, tokens) if config.use_weighting else None
    value, rewards = losses.dpo_loss(policy, reference, tokens, weight, config, totals, pair_weight, sequence)
    pairs = jnp.sum(weight) if totals is None else totals[0]
    sums = metric_sums(policy, rewards, stats, tokens, weight) | {"loss": value * pairs}
    for row in map(losses.LOSSES.get, config.loss_type):  # a loss's own metrics (ORPO's)
        sums |= row.metrics(policy, tokens, weight, sequence) if row.metrics else {}
    return value, sums


def metric_sums(policy, rewards, stats: model.TokenStats, tokens, weight) -> dict[str, jax.Array]:
    """Weighted sums over a batch's pairs of everything logged (TRL's keys and definitions): each metric is
    sums[key] / sums[DENOMINATORS.get(key, "pairs")], so sums of several batches add up. stats: each [B, 2],
    the scored tokens' summed token stats (model.token_logps)."""
    w, chosen, rejected = weight[:, None], rewards[:, 0], rewards[:, 1]
    return {
        "rewards/chosen": jnp.sum(weight * chosen),
        "rewards/rejected": jnp.sum(weight * rejected),
        "rewards/accuracies": jnp.sum(weight * (chosen > rejected)),
        "rewards/margins": jnp.sum(weight * (chosen - rejected)),
        "logps/chosen": jnp.sum(weight * policy[:, 0]),
        "logps/rejected": jnp.sum(weight * policy[:, 1]),
        "logits/chosen": jnp.sum(weight * stats.mean_logit[:, 0]),
        "logits/rejected": jnp.sum(weight * stats.mean_logit[:, 1]),
        "entropy": jnp.sum(w * stats.entropy),  # over the tokens of both sides
        "mean_token_accuracy": jnp.sum(weight * stats.argmax_hit[:, 0]),  # over the chosen tokens, as TRL
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
    "nll_loss": "tokens/chosen_sequence",
    "loss": "pairs",
}
COUNTS = ("pairs", "tokens", "tokens/chosen", "tokens/rejected", "tokens/chosen_sequence")


def normalize(sums: dict) -> dict:
    """Metrics from metric_sums' sums (also of several batches)."""
    return {
        k: v / jnp.maximum(sums[DENOMINATORS.get(k, "pairs")], 1e-9)
        for k, v in sums.items()
        if k not in COUNTS
    }


def microbatches(batch: dict, count: int) -> dict:
    """The batch as `count` microbatches stacked on a new leading axis. Microbatch m takes rows m, m + M,
    m + 2M, ...: splitting the batch axis this way leaves every microbatch spread over all devices."""
    return jax.tree.map(lambda x: jnp.swapaxes(batch_reshape(x, (-1, count, *x.shape[1:])), 0, 1), batch)


def grads_summed_over_microbatches(params, frozen: Frozen, batch: dict, arch, config: Config):
    """The gradients and metric sums of a loss that sums over pairs (a row of losses.LOSSES that does not
    couple the batch). Microbatches run one after another in a scan, so only one microbatch's activations
    are alive at a time; the loss of each is its share of the batch's (the whole batch's `totals`), so their
    gradients and sums add up to the batch's."""
    if config.num_microbatches == 1:
        return jax.grad(loss, has_aux=True)(params, frozen, batch, arch, config)
    rows = rows_of(batch)
    sequence = None  # the chosen sequences' tokens, where a loss reads them
    if losses.reads_sequence(config.loss_type):
        sequence = jnp.sum(rows.weight * rows.by_pair(rows.chosen_sequence)[:, 0])
    totals = jnp.sum(rows.weight), jnp.sum(rows.weight * rows.scored_tokens[:, 0]), sequence

    def add(grads, micro):
        more, sums = jax.grad(loss, has_aux=True)(params, frozen, micro, arch, config, totals)
        return jax.tree.map(jnp.add, grads, more), sums

    micro = microbatches(batch, config.num_microbatches)
    grads, sums = jax.lax.scan(add, jax.tree.map(jnp.zeros_like, params), micro)
    return grads, jax.tree.map(partial(jnp.sum, axis=0), sums)  # each microbatch's sums, added up


def whole_batch_logps(params, frozen: Frozen, batch: dict, arch, config: Config):
    """(the batch as microbatches, their PairLogps as one replicated batch [b, ...]): every microbatch's
    log-probs, forward only, one after another (only one microbatch's activations alive at a time)."""
    micro = microbatches(batch, config.num_microbatches)
    logps = jax.lax.map(lambda m: batch_logps(params, frozen, m, arch, config), micro)
    return micro, jax.tree.map(lambda x: jax.sharding.reshard(x, P()).reshape(-1, *x.shape[2:]), logps)


def grads_whole_batch(params, frozen: Frozen, batch: dict, arch, config: Config):
    """The gradients and metric sums of a loss that couples the batch's pairs (losses.couples_batch: aot sorts
    them all), in microbatches: every microbatch's log-probs (forward only), the loss's gradient with respect
    to all of them, then each microbatch's backward pass with its share of that gradient (a VJP), summed."""
    micro, whole = whole_batch_logps(params, frozen, batch, arch, config)
    of_policy = lambda policy: objective(whole._replace(policy=policy), config)
    d_policy, sums = jax.grad(of_policy, has_aux=True)(whole.policy)
    d_policy = d_policy.reshape(config.num_microbatches, -1, *d_policy.shape[1:])
    d_policy = jax.sharding.reshard(d_policy, P(None, sharding.BATCH_AXES, None))
    # A microbatch's backward pass: the gradient of its policy log-probs, weighted by their share of d_policy.
    weighted = lambda p, m, d: jnp.sum(policy_logps(p, frozen.base, m, arch, config)[0] * d)
    add = lambda grads, m_d: (jax.tree.map(jnp.add, grads, jax.grad(weighted)(params, *m_d)), None)
    return jax.lax.scan(add, jax.tree.map(jnp.zeros_like, params), (micro, d_policy))[0], sums


def train_step(state: TrainState, frozen: Frozen, hyperparameters: dict, batch: dict, arch, config: Config):
    """One optimizer step on a batch: the gradients, summed over microbatches or, for a batch loss split into
    microbatches, of the whole batch; AdamW; the step's metrics. An update whose loss or gradient is not
    finite is not applied (bookkeeping.check_update decides whether to stop)."""
    config, schedule_steps = config.traced(hyperparameters), hyperparameters["schedule_steps"]
    whole_batch = config.num_microbatches > 1 and losses.couples_batch(config.loss_type, config.use_weighting)
    gradients = grads_whole_batch if whole_batch else grads_summed_over_microbatches
    with jax.named_scope("forward_backward"):
        grads, sums = gradients(state.params, with_reference(state, frozen), batch, arch, config)
    metrics = normalize(sums)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = config.lr_at(state.step, schedule_steps)
    metrics["tokens"] = jnp.sum(batch["lengths"])  # for throughput, counted where the batch already is
    rows, live = rows_of(batch), config.live_reference
    metrics["flops"] = model.step_flops(arch, rows.attended, live, lora=config.lora_rank > 0, tokens=rows.ran)
    with jax.named_scope("optimizer"):
        updates, opt_state = make_optimizer(config, schedule_steps).update(
            grads, state.opt_state, state.params
        )
        params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient leaves the weights untouched; the host decides whether to stop.
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    skipped = state.skipped + (~finite).astype(jnp.int32)
    metrics |= {"nonfinite": ~finite, "skipped_updates": skipped}
    params = keep(params, state.params)
    reference = synced_reference(state.reference, params, state.step + 1, config)
    state = TrainState(state.step + 1, params, keep(opt_state, state.opt_state), skipped, reference)
    return state, metrics


def eval_step(params, frozen: Frozen, hyperparameters: dict, batch: dict, arch, config: Config) -> dict:
    """The metric sums of a batch, in training's microbatches (forward only, so one microbatch's activations
    at a time) with the objective over the whole batch; evaluate adds them up over the validation pairs."""
    config = config.traced(hyperparameters)
    if config.num_microbatches == 1:
        return loss(params, frozen, batch, arch, config)[1]
    return objective(whole_batch_logps(params, frozen, batch, arch, config)[1], config)[1]


def make_steps(arch: model.LlamaConfig, config: Config) -> dict:
    """The run's jitted functions by kind: training(state, frozen, hyperparameters, batch) with the state
    donated, evaluation(params, frozen, hyperparameters, batch), reference(params, hyperparameters, batch)
    (the log-probs that reference_mode precompute caches) and merge(base, adapters) (LoRA's export); the
    hyperparameters are config.hyperparameters()."""
    merge = partial(model.merge_lora, scale=config.lora_scale, dtype=config.hf_save_dtype)
    reference = lambda params, hyper, batch: pair_logps(params, batch, arch, config.traced(hyper))[0]
    return dict(
        training=jax.jit(partial(train_step, arch=arch, config=config), donate_argnums=0),
        evaluation=jax.jit(partial(eval_step, arch=arch, config=config)),
        reference=jax.jit(reference),
        merge=jax.jit(merge),
    )


# --- compiled programs: every program of the run, compiled before the first step


class Programs:
    """make_steps' functions compiled for the shapes they are planned for (compile_programs), called by kind
    with their arguments, a batch last (its shape picks the program; the merge has none). A batch that no
    planned shape holds (none should: the plan covers every batch of the run) compiles when first met, and
    is counted as unplanned."""

    def __init__(self, steps: dict, shapes: dict):
        self.steps, self.shapes, self.compiled = steps, shapes, {}  # kind -> step; kind -> shapes
        self.seconds, self.from_cache, self.unplanned = 0.0, 0, 0

    def compile(self, lowered: dict) -> None:
        compiled, seconds, hits = bookkeeping.compile_lowered(lowered)
        self.compiled |= compiled
        self.seconds, self.from_cache = self.seconds + seconds, self.from_cache + hits

    def __call__(self, kind: str, *args):
        key = (kind, None if kind == "merge" else data.shape_of(args[-1]))
        if key not in self.compiled:
            self.unplanned += 1
            self.compile({key: self.steps[kind].lower(*args)})
        return self.compiled[key](*args)

    def report(self) -> str:
        counts = len(self.compiled), self.seconds, self.from_cache, self.unplanned
        return bookkeeping.programs_report(self.shapes, *counts)


def compile_programs(steps: dict, batches: bookkeeping.Loaders, start: Start, config: Config, mesh):
    """Programs of the run, compiled before the first step (or found in the compilation cache) for every
    shape of its plan that is left to run: training while steps are left, evaluation then and at step 0, the
    reference's pass for the pairs its cache lacks, the LoRA merge while exports are left."""
    done, state, frozen = start.resume_step or 0, start.state, start.frozen
    left = done < config.num_train_steps
    shapes = dict(
        training=batches.shapes["training"] if left else [],
        evaluation=batches.shapes["evaluation"] if left or done == 0 else [],
        reference=list(dict.fromkeys(s for cache in start.caches.values() for s in cache.shapes)),
        merge=[None] if config.lora_rank and (left or done) else [],  # a resume may owe an export
    )
    programs = Programs(steps, shapes)
    if count := sum(map(len, shapes.values())):
        bookkeeping.say(f"compiling {count} program{'s' * (count > 1)} before the first step ...")
    # each program's arguments before its batch (a blank one of the shape: all padding); the merge has none
    hyper, reference = config.hyperparameters(), with_reference(state, frozen)
    arguments = dict(training=(state, frozen, hyper), evaluation=(state.params, reference, hyper))
    arguments |= dict(reference=(start.reference_weights, hyper), merge=(frozen.base, state.params))
    with jax.set_mesh(mesh):  # traced one after another (tracing holds the GIL), then compiled on threads
        blank = lambda kind, shape: [sharding.global_batch(batches.blank(kind, shape), mesh)] if shape else []
        lowered = {(k, s): steps[k].lower(*arguments[k], *blank(k, s)) for k in shapes for s in shapes[k]}
        programs.compile(lowered)
    return programs


# --- main: the inputs, the state, the batches and the loop, top to bottom


class Start(NamedTuple):
    """Where a run starts (start_state)."""

    state: TrainState
    resume_step: int | None  # the step of the checkpoint it resumed from; None: a fresh start
    frozen: Frozen
    caches: dict  # reference_mode precompute: the train and validation pairs' (bookkeeping.reference_caches)
    reference_weights: dict | None  # precompute: the reference's weights while a cache lacks log-probs


def start_state(run: Path, config: Config, inputs: bookkeeping.Inputs) -> Start:
    """What trains (the model, or LoRA's adapters) resumes from the newest checkpoint that loads, or starts
    fresh; the frozen weights are LoRA's base and the reference (live: its weights; precompute: its caches
    of log-probs, and its weights while they lack some)."""
    arch, mesh = inputs.arch, inputs.mesh
    create = partial(TrainState.create, optimizer=make_optimizer(config))
    lora = model.lora_weights(arch, config.lora_rank, config.lora_targets) if config.lora_rank else None
    compute_dtype, reference_dtype = map(model.dtype_of, (config.compute_dtype, config.reference_dtype))
    quantized = config.base_quantization
    base = model.load_params(inputs.model_dir, arch, mesh, compute_dtype, quantized) if lora else None
    abstract = jax.eval_shape(create, model.abstract_params(arch, mesh, lora))
    if config.sync_ref_model:  # TR-DPO's moving reference is state: checkpoints hold it
        like = lambda x: jax.ShapeDtypeStruct(x.shape, reference_dtype, sharding=x.sharding)
        abstract = dataclasses.replace(abstract, reference=jax.tree.map(like, abstract.params))
    state = bookkeeping.restore_checkpoint(run, abstract, mesh, inputs.data_id)
    resume_step = None if state is None else int(state.step)
    bookkeeping.check_base(run, config, base, resume_step is not None)  # a quantised base is made anew
    if state is None and lora:
        state = jax.jit(create)(model.init_params(arch, jax.random.key(config.seed), mesh, lora))
    elif state is None:
        state = jax.jit(create)(model.load_params(inputs.model_dir, arch, mesh))
    caches = bookkeeping.reference_caches(inputs, config) if config.reference_mode == "precompute" else {}
    todo = any(len(cache.todo) for cache in caches.values())  # the precomputed reference lacks some log-probs
    load_reference = todo or config.live_reference and state.reference is None
    reference = None  # a moving one came back with its checkpoint
    if load_reference and lora and inputs.reference_dir == inputs.model_dir:  # the base without its adapters
        reference = base
    elif load_reference:
        reference = model.load_params(inputs.reference_dir, arch, mesh, dtype=reference_dtype)
    if caches:  # the reference runs once, before training (precompute_reference), and not in the steps
        return Start(state, resume_step, Frozen(base, None), caches, reference)
    if config.sync_ref_model and state.reference is None:  # it moves with the state (with_reference),
        state, reference = dataclasses.replace(state, reference=reference), None  # so Frozen does not hold it
    return Start(state, resume_step, Frozen(base, reference), {}, None)


def precompute_reference(programs: Programs, start: Start, hyper: dict, mesh) -> dict[str | None, np.ndarray]:
    """reference_mode precompute: the reference's log-probs of every pair that its caches lack, by the
    compiled forward pass, kept as they come (bookkeeping.ReferenceCache); then each cache's table [n, 2],
    by what it serves (None: the training pairs; a validation set's name)."""
    for cache in start.caches.values():  # one cache may serve several (finish: nothing left to do)
        for rows, batch in cache.batches():
            logps = programs("reference", start.reference_weights, hyper, sharding.global_batch(batch, mesh))
            cache.record(rows, sharding.to_host(logps))
        cache.finish()
    return {use: cache.logps for use, cache in start.caches.items()}


def evaluate(evaluation, params, frozen: Frozen, hyper: dict, passes: dict, mesh) -> dict[str, float]:
    """The eval/ metrics of each validation set (passes: its name -> its batches), over every batch of it:
    their sums added up, then divided once; with several sets, each set's under eval/NAME/."""
    metrics = {}
    for name, batches in passes.items():
        label = "evaluation" if len(passes) == 1 else f"evaluation of {name}"
        totals, progress = {}, bookkeeping.Progress(label, "batches")
        for batch in batches:
            sums = evaluation(params, frozen, hyper, sharding.global_batch(batch, mesh))
            for k, v in jax.device_get(sums).items():
                totals[k] = totals.get(k, 0.0) + float(v)
            progress.advance(1)
        prefix = bookkeeping.eval_prefix(name, len(passes))
        metrics |= {prefix + k: float(v) for k, v in normalize(totals).items()}
    return metrics


def export_hf(programs: Programs, run: Path, state: TrainState, frozen: Frozen, files) -> None:
    """hf/step-N for transformers: the weights, with LoRA the base with its adapters merged in (the compiled
    merge) and the adapters themselves for PEFT."""
    lora = frozen.base is not None
    merged = programs("merge", frozen.base, state.params) if lora else state.params
    bookkeeping.save_export(run, int(state.step), merged, state.params if lora else None, files)


def main(config: Config) -> Path:
    started, say = time.time(), bookkeeping.say
    sharding.initialize_distributed(config.coordinator_address, config.num_processes, config.process_id)
    bookkeeping.use_compilation_cache(config.compilation_cache_dir)
    with bookkeeping.open_run(config) as (run, config, inputs, batches):
        # --- the state, the programs; the batches from where the state stands
        mesh, hyper = inputs.mesh, config.hyperparameters()
        with jax.set_mesh(mesh):
            start = start_state(run, config, inputs)
        programs = compile_programs(make_steps(inputs.arch, config), batches, start, config, mesh)
        with jax.set_mesh(mesh):
            tables = precompute_reference(programs, start, hyper, mesh)
        start = start._replace(reference_weights=None)  # freed: training never reads them
        state, frozen, done = start.state, start.frozen, start.resume_step or 0  # done: steps taken before
        train_batches, evaluation = batches.train(done, tables.get(None)), partial(programs, "evaluation")
        passes = lambda: {name: batches.validation(name, tables.get(name)) for name in inputs.validation}
        eval_now = lambda s: evaluate(evaluation, s.params, with_reference(s, frozen), hyper, passes(), mesh)
        files = bookkeeping.export_files(config, inputs)

        # --- the loop
        log = bookkeeping.MetricsLog(run, config, start.resume_step)
        with log, jax.set_mesh(mesh), bookkeeping.stop_requests() as stop_asked:
            # A fresh start evaluates at step 0; a resume does the eval and export its last run skipped.
            due = bookkeeping.skipped_at_resume(run, done, config, log) if done else (True, False)
            if due[0]:
                log.eval(done, eval_now(state))
            if due[1]:
                export_hf(programs, run, state, frozen, files)
            if done < config.num_train_steps:
                dtype = jnp.dtype(model.dtype_of(config.compute_dtype)).name
                say(f"training steps {done + 1}..{config.num_train_steps} on {mesh.devices.size} device(s), "
                    f"batch {config.train_batch_size} pairs, compute {dtype}")  # fmt: skip
                upcoming = next(train_batches)
            for step in range(done + 1, config.num_train_steps + 1):
                state, metrics = programs(
                    "training", state, frozen, hyper, sharding.global_batch(upcoming, mesh)
                )
                if step < config.num_train_steps:  # dispatch is async: read the next batch while it runs
                    upcoming = next(train_batches)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if step == done + 1:
                    say(f"first step done {time.time() - started:.1f} s after start")
                bookkeeping.check_update(step, metrics, config, run)
                log.train(step, metrics)
                last = step == config.num_train_steps
                # A preempted job has seconds: on a stop request only the checkpoint is written, and the
                # eval or export due at this step is skipped (the resumed run does them: skipped_at_resume).
                if not last and stop_asked():
                    bookkeeping.save_checkpoint(run, state, config.keep_checkpoints, inputs.data_id)
                    say(f"stopped at step {step} on request; checkpoint written. Run the same command to "
                        "resume.")  # fmt: skip
                    return run
                if step % config.steps_per_eval == 0 or last:
                    log.eval(step, eval_now(state))
                if step % config.steps_per_checkpoint == 0 or last:
                    bookkeeping.save_checkpoint(run, state, config.keep_checkpoints, inputs.data_id)
                if step % config.steps_per_hf_export == 0 or last:
                    export_hf(programs, run, state, frozen, files)
    say(f"programs: {(compiled := programs.report())}")
    bookkeeping.write_report(run, dataclasses.asdict(Config()), time.time() - started, compiled)
    bookkeeping.say_done(run)
    return run


# --- the command line


def parse_args(args: list[str] | None = None) -> Config:
    """The Config from the command line. When the model is the demo, the fields not given take the demo's
    values (bookkeeping.DEMO_SETTINGS), and the demo says which; a value given always wins."""

    def parse(default: Config) -> Config:
        def command(config: Config = default) -> Config:
            return config

        return data.tyro_cli(command, args=args, description=HELP)

    try:
        config = parse(Config())
    except ValueError:  # values that may hold only with the demo's settings (its batch of 32)
        args = sys.argv[1:] if args is None else args
        if any(a.split("=")[0].replace("_", "-") == "--config.model-name-or-path" for a in args):
            raise  # not the demo
        config = None
    if config is not None and config.model_name_or_path != "demo":
        return config
    return bookkeeping.demo_config(config, parse(Config(**bookkeeping.DEMO_SETTINGS)))


def cli() -> None:
    """`python dpo.py`: a user's mistake, a full disk or a lost file is one line on stderr and exit code 2."""
    with bookkeeping.one_line_errors():
        if sys.argv[1:2] == ["report"]:  # python dpo.py report RUN_DIR: report.md and curves.png of a run
            return bookkeeping.report_command(sys.argv[2:], dataclasses.asdict(Config()))
        main(parse_args())


if __name__ == "__main__":
    cli()
