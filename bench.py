"""Benchmarks, not tests: memory and speed of dpo.py's pieces, one markdown table per section.

    python bench.py                                   # every section, sized for the device found
    python bench.py --only logps,step                 # some of them
    python bench.py --only step --shapes 3b --batch 2 --variants live:full:cudnn,precompute:save_matmuls:cudnn
    python bench.py --device cpu --only memory        # the computed memory plan (and a compiled cross-check)

Sections:
  logps     model.token_logps (chunked LM head + log-softmax) against full logits, value and gradient:
            compiled peak memory at Llama 3 sizes, and time.
  step      one DPO train step with random weights: tokens/s, MFU (model.step_flops over the real tokens,
            divided by the chips' dense bf16 peak), compile time, compiled peak memory; variants
            reference:remat:attention (reference live or precompute; remat none, full, save_matmuls;
            attention auto, xla, cudnn, chunked).
  padding   data.padded_width against batches padded to max_seq_len and to multiples of 128 (the widths
            before), with and without group_by_length, on UltraFeedback-like and short-answer length
            mixes: padding efficiency (real / processed tokens), distinct widths (no plan), step time.
  shapes    data.plan_shapes: training shapes and padding over 150 steps before and after (the loader
            alone), and whole dpo.py runs: time to the first step, cold and warm compilation cache.
  agree     (accelerator) the bf16 eval step against the CPU's f32 on the same weights and batch.
  sharing   prefix sharing and packing against the plain layout on UltraFeedback-like and long-prompt
            multi-turn length mixes: tokens processed and pairs/s.
  trl       TRL's DPOTrainer (needs `pip install trl`) against ours on the same model and short pairs
            (SmolLM2-135M's shape, and a tiny Llama): step time, before and after padded_width.
  compile   the demo's and the 1B shape's train step: StableHLO lines and compile seconds of d01cd22's code
            (git archive) and of this folder's, in alternating fresh processes; compile time against depth.
  memory    the largest per-chip batch of the 1B, 3B and 8B shapes under FSDP: computed from the sizes,
            and from compiled programs (on an accelerator against its memory; on CPU as a cross-check);
            8B at long rows over context axes, with and without remat offload (computed; on CPU with 8
            fake devices, XLA_FLAGS=--xla_force_host_platform_device_count=8, checked against the compiled
            step); then LoRA on a bf16, NF4 or int8 base (QLoRA) for 8B and Qwen2.5-7B on one 24, 48 or
            80 GB GPU.
  tokenize  data.tokenize pairs/s on UltraFeedback-sized synthetic pairs.
  flags     (GPU) the step under a few XLA_FLAGS sets, each in a fresh process (XLA reads them at start).

On CPU everything is sized down (a tiny model, fewer timed tokens) and the tables say so. Other processes
on the machine skew CPU timings: the load average is printed at the start and the end.
"""

import dataclasses
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tyro

import bookkeeping
import data
import dpo
import model
import sharding

GiB = 2**30
ROPE = model.Llama3RopeScaling(32.0, 1.0, 4.0, 8192)
LLAMA = dict(vocab_size=128256, num_kv_heads=8, rope_theta=500000.0, max_position_embeddings=131072)
SHAPES = {  # Hub configs of Llama 3.2 1B and 3B and Llama 3.1 8B (weights random)
    "tiny": model.LlamaConfig(8192, 256, 768, 4, 4, 2, 64, rope_theta=10000.0, max_position_embeddings=4096),
    "1b": model.LlamaConfig(
        **LLAMA,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        head_dim=64,
        rope_scaling=ROPE,
        tie_word_embeddings=True,
    ),
    "3b": model.LlamaConfig(
        **LLAMA,
        hidden_size=3072,
        intermediate_size=8192,
        num_layers=28,
        num_heads=24,
        head_dim=128,
        rope_scaling=ROPE,
        tie_word_embeddings=True,
    ),
    "8b": model.LlamaConfig(
        **LLAMA,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        head_dim=128,
        rope_scaling=dataclasses.replace(ROPE, factor=8.0),
    ),
}
SHAPES["qwen7b"] = model.LlamaConfig(  # Qwen2.5-7B's Hub config (weights random)
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
    head_dim=128, rope_theta=1e6, max_position_embeddings=32768, model_type="qwen2",
)  # fmt: skip
DEFAULT_PAIRS = {"tiny": 8, "1b": 8, "3b": 2, "8b": 2}  # per chip at sequence 2048 (see the memory plan)
CHIPS = {"H100 80GB": 79.6 * GiB, "TPU v5p": 95e9}  # memory per chip


@dataclasses.dataclass
class Args:
    # sections to run, comma-separated
    only: str = "logps,step,padding,sharing,shapes,trl,compile,memory,tokenize,flags,agree"
    device: str = "auto"  # auto: what JAX finds (GPU/TPU first); cpu: the CPU even when there is more
    shapes: str | None = None  # step shapes (tiny, 1b, 3b, 8b); default tiny on CPU, else 1b,3b
    batch: int | None = None  # pairs per chip; default per shape (DEFAULT_PAIRS)
    seq: int | None = None  # sequence length of the step; default 256 on CPU, else 2048
    variants: str | None = None  # reference:remat:attention, comma-separated; default per device
    steps: int | None = None  # timed steps per variant; default 5 on CPU, else 10
    logps_time_tokens: int | None = None  # tokens of the timed logps run; default 8192, 1024 on CPU
    tokenize_pairs: int = 61135  # UltraFeedback's train_prefs size
    profile: str | None = None  # write a jax.profiler trace of the last step variant here (view in xprof)
    before: str | None = (
        None  # shapes: a folder holding an older dpo.py (and its files) to time beside this one
    )
    run_pairs: int = 544  # shapes: pairs of the timed dpo.py runs (32 of them held out for validation)
    json_out: str | None = None  # also write every table here as JSON
    compile_against: str = "d01cd22"  # compile: the commit whose train step the current one is set against
    compile_rounds: int = 3  # compile: fresh processes per version (medians reported)


TABLES: list[dict] = []


def table(title: str, header: str, rows: list[list], note: str = "") -> None:
    """Print a markdown table; header is "a | b | c"."""
    TABLES.append({"title": title, "header": header, "rows": rows, "note": note})
    cell = lambda x: f"{x:.3g}" if isinstance(x, float) else str(x)
    print(f"\n### {title}\n\n| {header} |\n|" + "---|" * len(header.split(" | ")))
    print("\n".join("| " + " | ".join(cell(x) for x in row) + " |" for row in rows))
    print(f"\n{note}" if note else "", flush=True)


def peak_bytes(compiled) -> int:
    """Arguments + outputs + temporaries of a compiled program: what is resident at its peak."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def best_time(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


# --- logps: fused against naive


def naive_logps(hidden, lm_head, targets, mask):
    """The textbook version: [N, T, V] f32 logits, log_softmax, pick the targets."""
    logits = jnp.einsum("ntd,dv->ntv", hidden, lm_head, preferred_element_type=jnp.float32)
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(mask, picked, 0.0), -1)


def bench_logps(on_cpu: bool, dtype, time_tokens: int | None) -> dict:
    chunk = dpo.Config().logits_chunk_size
    fused = lambda h, w, t, m: model.token_logps(h, w, t, m, chunk_size=chunk)[0].sum(-1)
    grad = lambda fn: jax.jit(jax.grad(lambda h, w, t, m: jnp.sum(fn(h, w, t, m)), argnums=(0, 1)))
    d, v = 4096, 128256

    def inputs(tokens: int, seq: int, concrete: bool):
        n = tokens // seq
        shapes = [((n, seq, d), dtype), ((d, v), dtype), ((n, seq), jnp.int32), ((n, seq), bool)]
        if not concrete:  # compiling needs only shapes: full Llama 3 sizes cost nothing
            return [jax.ShapeDtypeStruct(s, dt) for s, dt in shapes]
        k1, k2 = jax.random.split(jax.random.key(0))
        hidden, lm_head = jax.random.normal(k1, (n, seq, d), dtype), jax.random.normal(k2, (d, v), dtype)
        return [hidden, lm_head / math.sqrt(d), jnp.full((n, seq), 7), jnp.ones((n, seq), bool)]

    rows, ratios = [], {}
    for tokens in (8192, 16384):
        compiled = [grad(fn).lower(*inputs(tokens, 2048, False)).compile() for fn in (fused, naive_logps)]
        temp = [c.memory_analysis().temp_size_in_bytes for c in compiled]
        peak = [peak_bytes(c) for c in compiled]
        rows.append([f"{tokens // 2048} x 2048", temp[0] / GiB, temp[1] / GiB, temp[0] / temp[1]])
        rows[-1] += [peak[0] / GiB, peak[1] / GiB, peak[0] / peak[1]]
        ratios[f"temp memory ratio, {tokens} tokens"] = temp[0] / temp[1]
    note = (
        f"Value and gradient (hidden and LM head) of summed log-probs, D {d}, V {v}, {jnp.dtype(dtype)}, "
        f"chunks of {chunk} vocabulary entries; compiled for {jax.devices()[0].device_kind}. "
        "temp: buffers beyond the inputs and gradients (those are the same for both); peak adds them. "
        "Target: <= 0.1x naive."
    )
    header = "tokens | fused temp GiB | naive temp GiB | ratio | fused peak GiB | naive peak GiB | ratio"
    table("Fused vs naive log-probs: memory", header, rows, note)

    tokens = time_tokens or (1024 if on_cpu else 8192)
    seq, reps = min(2048, tokens // 4), 1 if on_cpu else 5
    times = [best_time(grad(fn), *inputs(tokens, seq, True), reps=reps) for fn in (fused, naive_logps)]
    ratios["time ratio"] = times[0] / times[1]
    note = f"D {d}, V {v}, {jnp.dtype(dtype).name}, chunk {chunk}, best of {reps} after a warm-up."
    note += " Target: <= 1.1x."
    note += f" Measured at {tokens} tokens, not 8k, to fit a CPU's minutes." if tokens < 8192 else ""
    rows = [[f"{tokens // seq} x {seq}", times[0], times[1], times[0] / times[1]]]
    table(
        "Fused vs naive log-probs: time (value and gradient)",
        "tokens | fused s | naive s | ratio",
        rows,
        note,
    )
    return ratios


# --- the train step


def synthetic_batch(cfg, lengths: np.ndarray, width: int) -> dict[str, np.ndarray]:
    """[b, 2, width] random tokens right-padded to `lengths` [b, 2]; the first quarter an unscored prompt."""
    pos = np.arange(width)
    real, prompt = pos < lengths[..., None], pos < lengths[..., None] // 4
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (*lengths.shape, width))
    return dict(
        input_ids=np.where(real, tokens, 0).astype(np.int32),
        lengths=lengths.astype(np.int32),
        loss_mask=real & ~prompt,
        weight=np.ones(len(lengths), np.float32),
    )


def run_config(batch_size: int, variant: str = "live:full:auto", dtype=jnp.float32, **settings) -> dpo.Config:
    reference, remat, attention = variant.split(":")
    return dpo.Config(
        model_name_or_path="bench",
        train_data="synthetic",
        train_batch_size=batch_size,
        reference_mode=reference,
        remat=remat,
        attention_impl=attention,
        compute_dtype=jnp.dtype(dtype).name,
        reference_dtype=jnp.dtype(dtype).name,
        **settings,
    )


def abstract_step(cfg, config: dpo.Config, mesh, dtype, seq: int):
    """The train step lowered on shapes alone (nothing allocated): the model trained against a reference in
    `dtype`, or with config.lora_rank the adapters on a base in `dtype` (its projections quantised as
    config.base_quantization says) that is the reference too."""
    optimizer = dpo.make_optimizer(config)
    lora = model.lora_weights(cfg, config.lora_rank, config.lora_targets) if config.lora_rank else None
    in_dtype = lambda s: (
        s if isinstance(s, model.Quantized) else jax.ShapeDtypeStruct(s.shape, dtype, sharding=s.sharding)
    )
    with jax.set_mesh(mesh):
        train_step = dpo.make_steps(cfg, config)["training"]
        state = jax.eval_shape(
            lambda p: dpo.TrainState.create(p, optimizer), model.abstract_params(cfg, mesh, lora)
        )
        frozen = model.abstract_params(cfg, mesh, quantization=config.base_quantization)
        frozen = jax.tree.map(in_dtype, frozen, is_leaf=lambda x: isinstance(x, model.Quantized))
        lengths = np.full((config.train_batch_size, 2), seq)
        batch = sharding.global_batch(synthetic_batch(cfg, lengths, seq), mesh)
        frozen = dpo.Frozen(frozen if lora else None, frozen)
        return train_step.lower(state, frozen, config.hyperparameters(), batch)


class StepRunner:
    """The train step of one shape and variant on fresh random weights (or `weights`, a HF directory);
    compiles once per batch width."""

    def __init__(self, cfg, config: dpo.Config, mesh, dtype, weights: Path | None = None):
        self.config, self.mesh, self.compiled, self.compile_seconds = config, mesh, {}, 0.0
        optimizer = dpo.make_optimizer(config)
        load = lambda seed, dt=jnp.float32: (
            model.load_params(weights, cfg, mesh, dtype=dt)
            if weights
            else jax.jit(lambda p: jax.tree.map(lambda w: w.astype(dt), p))(
                model.init_params(cfg, jax.random.key(seed), mesh)
            )
        )
        with jax.set_mesh(mesh):
            self.step = dpo.make_steps(cfg, config)["training"]
            self.state = jax.jit(lambda p: dpo.TrainState.create(p, optimizer))(load(0))
            # A tree of its own: the state's params are donated at every step.
            reference = load(1, dtype) if config.live_reference else None
            self.inputs = (
                dpo.Frozen(base=None, reference=reference),
                config.hyperparameters(),
            )  # besides the state

    def run(self, batch: dict[str, np.ndarray]) -> float:
        """Seconds of one step; a new shape is compiled and run once first, uncounted."""
        if self.config.reference_mode == "precompute":  # their values do not change the speed
            batch = batch | {"ref_logps": np.zeros((*batch["weight"].shape, 2), np.float32)}
        with jax.set_mesh(self.mesh):
            batch = sharding.global_batch(batch, self.mesh)
            width = tuple(
                (k, v.shape) for k, v in sorted(batch.items())
            )  # packed rows vary in more than width
            if width not in self.compiled:
                start = time.perf_counter()
                self.compiled[width] = self.step.lower(self.state, *self.inputs, batch).compile()
                self.compile_seconds += time.perf_counter() - start
                self.state, metrics = jax.block_until_ready(
                    self.compiled[width](self.state, *self.inputs, batch)
                )
            start = time.perf_counter()
            self.state, metrics = jax.block_until_ready(self.compiled[width](self.state, *self.inputs, batch))
            return time.perf_counter() - start


def bench_step(shapes, variants, pairs, seq, steps, mesh, dtype, profile, together: bool) -> dict:
    """together: a shape's variants are all held at once and stepped in turn, so that a change in the
    machine's load hits them alike (CPU); else one at a time (an accelerator's memory holds one)."""
    rows, results, chips = [], {}, mesh.devices.size
    peak = bookkeeping.peak_flops(jax.devices()[0])
    for shape in shapes:
        cfg, b = SHAPES[shape], (pairs or DEFAULT_PAIRS[shape]) * chips
        lengths = np.full((b, 2), seq)
        batch = synthetic_batch(cfg, lengths, seq)
        for group in [variants] if together else [[v] for v in variants]:
            try:
                runners = {v: StepRunner(cfg, run_config(b, v, dtype), mesh, dtype) for v in group}
                seconds = {v: [] for v in group}
                for _ in range(steps):
                    for v, runner in runners.items():
                        seconds[v].append(runner.run(batch))
                if profile and group[-1] == variants[-1]:
                    with jax.profiler.trace(profile):
                        runners[group[-1]].run(batch)
            except Exception as e:  # out of memory is a result too
                if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                    raise
                rows += [[shape, v, b, seq, "", "", "", "", "OOM", ""] for v in group]
                continue
            for v, runner in runners.items():
                step_s, flops = (
                    float(np.median(seconds[v])),
                    model.step_flops(cfg, lengths, v.startswith("live")),
                )
                mfu = f"{flops / step_s / (peak * chips):.1%}" if peak else "n/a (no known peak)"
                rows.append([shape, v, b, seq, runner.compile_seconds, step_s, lengths.sum() / step_s])
                rows[-1] += [
                    flops / step_s / 1e12,
                    mfu,
                    peak_bytes(next(iter(runner.compiled.values()))) / GiB,
                ]
                results[f"{shape} {v}"] = dict(step_s=step_s, tokens_per_s=lengths.sum() / step_s, mfu=mfu)
            del runners
    note = (
        f"{chips} x {jax.devices()[0].device_kind}, compute {jnp.dtype(dtype)}, random weights, rows of full "
        f"length; step s: median of {steps}. MFU: model.step_flops (6N policy + 2N live reference a token + "
        "causal attention) / dense bf16 peak."
    )
    header = "shape | reference:remat:attention | pairs | seq | compile s | step s | tokens/s | TFLOP/s | MFU"
    table("DPO train step", header + " | peak GiB", rows, note)
    return results


# --- padding: widths that follow the batch against max_seq_len and multiples of 128, and TRL


class SyntheticPairs:
    """Stands in for data.PairDataset. UltraFeedback-like lengths in Llama 3 tokens: prompt ~ 30 template
    tokens + lognormal(median 110, sigma 0.9), each response ~ lognormal(median 260, sigma 0.75). Short:
    one-line answers (prompt 30-60 tokens, answers 3-30). Long prompts: the turns before the replies ~ 30
    + lognormal(median 700), replies ~ lognormal(median 150). Pairs over max_seq_len dropped, as data.py
    does."""

    def __init__(self, n: int, max_seq_len: int, short: bool = False, long_prompt: bool = False):
        rng = np.random.default_rng(0)
        if short:
            prompt = 30 + rng.integers(0, 30, n)
            lengths = prompt[:, None] + rng.integers(3, 30, (n, 2))
        elif long_prompt:  # Capybara-like multi-turn: the turns before the replies several times their length
            prompt = 30 + rng.lognormal(np.log(700), 0.5, n).astype(int)
            lengths = prompt[:, None] + rng.lognormal(np.log(150), 0.6, (n, 2)).astype(int)
        else:
            prompt = 30 + rng.lognormal(np.log(110), 0.9, n).astype(int)
            lengths = prompt[:, None] + rng.lognormal(np.log(260), 0.75, (n, 2)).astype(int)
        keep = lengths.max(1) <= max_seq_len
        self.lengths, self.prompt, self.path = lengths[keep].astype(np.int32), prompt[keep], Path("synthetic")
        self.shared = self.prompt  # both sides' tokens are the same up to the replies

    def __len__(self):
        return len(self.lengths)

    def read(self, indices):  # as PairDataset.read: ((chosen ids, mask), (rejected ids, mask)) per pair
        side = lambda i, n: (np.full(n, 7, np.int32), np.arange(n) >= self.prompt[i])
        return [(side(i, self.lengths[i, 0]), side(i, self.lengths[i, 1])) for i in indices]


def repad(batch: dict, width: int) -> dict:
    """The batch at another width (more padding): how batches were laid out before padded_width."""
    pad = ((0, 0), (0, 0), (0, width - batch["input_ids"].shape[-1]))
    return batch | {k: np.pad(batch[k], pad) for k in ("input_ids", "loss_mask")}


def bench_padding(cfg, mesh, dtype, pairs_per_batch: int, steps: int, max_seq_len: int = 2048) -> dict:
    rows, results = [], {}
    widths = {
        "pad to max_seq_len": lambda n: max_seq_len,
        "multiples of 128 (before)": lambda n: min(-(-n // 128) * 128, max_seq_len),
        "data.padded_width": lambda n: n,
    }
    for mix, grouped in itertools.product(("UltraFeedback-like", "short answers"), (False, True)):
        pairs = SyntheticPairs(20_000, max_seq_len, short=mix.startswith("short"))
        loader = partial(
            data.train_batches,
            pairs,
            np.arange(len(pairs)),
            seed=0,
            max_seq_len=max_seq_len,
            group_by_length=grouped,
        )
        small = list(itertools.islice(loader(batch_size=pairs_per_batch), 50))
        big = list(
            itertools.islice(loader(batch_size=128), len(pairs) // 128)
        )  # an epoch of 128-pair batches
        for name, width in (
            widths.items() if not grouped else [("data.padded_width", widths["data.padded_width"])]
        ):
            laid = [[repad(b, width(b["input_ids"].shape[-1])) for b in bs] for bs in (small, big)]
            efficiency = [
                sum(b["lengths"].sum() for b in bs) / sum(b["input_ids"].size for b in bs) for bs in laid
            ]
            runner = StepRunner(cfg, run_config(pairs_per_batch, dtype=dtype), mesh, dtype)
            seconds = np.mean([runner.run(b) for b in laid[0][:steps]])
            shapes = len({b["input_ids"].shape[-1] for b in laid[1]})
            label = name + (" + group_by_length" if grouped else "")
            rows.append([mix, label, *efficiency, shapes, seconds])
            results[f"{mix}: {label}"] = dict(efficiency=efficiency[0], step_s=seconds, shapes=shapes)
    note = (
        f"20,000 synthetic pairs, max_seq_len {max_seq_len}; efficiency = real / processed tokens over 50 "
        f"batches of {pairs_per_batch} pairs, and over an epoch of 128-pair batches (its distinct widths are "
        f"the shapes a run compiles); step time: mean of the first {steps} batches of {pairs_per_batch} "
        "pairs "
        f"({cfg.num_layers} layers, D {cfg.hidden_size}, V {cfg.vocab_size}), compiles not counted."
    )
    header = f"mix | widths | efficiency, {pairs_per_batch} pairs | efficiency, 128 pairs | shapes, 128 pairs"
    table("Padding: batch widths (synthetic lengths)", header + " | step s", rows, note)
    return results


def processed_flops(batch: dict) -> float:
    """FLOPs a step spends on `batch` at Llama 3.1 8B's shape, padding included: every row token, and
    attention over every sequence (plain) or view (prefix sharing, packing) at its padded width."""
    views = batch["views"].shape if "views" in batch else batch["input_ids"].shape
    widths = np.full(views[:2], views[2] if "views" in batch else views[-1])
    return float(model.step_flops(SHAPES["8b"], widths, True, tokens=batch["input_ids"].size))


def bench_sharing(cfg, mesh, dtype, pairs_per_batch: int, steps: int, max_seq_len: int = 2048) -> dict:
    """Prefix sharing and packing against the plain layout: tokens processed, pairs per second."""
    rows, results = [], {}
    layouts = {"plain": None, "prefix_sharing": (True, False), "packing": (False, True), "both": (True, True)}
    for mix, long_prompt in (("UltraFeedback-like", False), ("long-prompt multi-turn", True)):
        pairs = SyntheticPairs(20_000, max_seq_len, long_prompt=long_prompt)
        plain_s = plain_work = None
        for name, flags in layouts.items():
            layout = data.Layout(*flags, row_multiple=mesh.devices.size) if flags else None
            loader = data.train_batches(
                pairs,
                np.arange(len(pairs)),
                batch_size=pairs_per_batch,
                seed=0,
                max_seq_len=max_seq_len,
                layout=layout,
            )
            batches = list(itertools.islice(loader, steps))
            processed = np.mean([b["input_ids"].size for b in batches])
            work = sum(map(processed_flops, batches))  # at Llama 3.1 8B's shape, padding included
            runner = StepRunner(cfg, run_config(pairs_per_batch, dtype=dtype), mesh, dtype)
            seconds = float(np.mean([runner.run(b) for b in batches]))
            plain_s, plain_work = plain_s or seconds, plain_work or work
            rows.append([mix, name, processed, seconds, pairs_per_batch / seconds, plain_s / seconds])
            rows[-1].append(plain_work / work)
            results[f"{mix}: {name}"] = dict(
                processed=processed, step_s=seconds, speedup=plain_s / seconds, work_8b=plain_work / work
            )
    note = (
        f"{pairs_per_batch} pairs a step ({cfg.num_layers} layers, D {cfg.hidden_size}, V {cfg.vocab_size}, "
        f"{jnp.dtype(dtype).name}, {jax.devices()[0].device_kind}); the same first {steps} batches in each "
        "layout, each width compiled before it is timed. Targets with prefix sharing: >= 1.15x "
        "(UltraFeedback-like), >= 1.45x (long prompts). 8B work ratio: the plain layout's FLOPs over this "
        "layout's at Llama 3.1 8B's shape (model.step_flops over every processed token and attention view, "
        "padding included), computed, not timed: what a device that runs both at the same rate gains."
    )
    header = "mix | layout | tokens processed / step | step s | pairs/s | speed-up | 8B work ratio"
    table("Prefix sharing and packing (synthetic lengths)", header, rows, note)
    return results


# SmolLM2-135M's config (weights random: the speed does not depend on them), and a tiny Llama.
TRL_SHAPES = {
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        rope_theta=1e5,
    ),
    "4-layer D256": dict(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1e4,
    ),
}


def short_pairs_and_model(root: Path, shape: str, count: int, prompt_words: tuple, answer_words: tuple):
    """`count` prompt/chosen/rejected string rows of random words, and a random Llama of `shape` saved with
    a byte-level BPE tokenizer trained on them (BOS prepended, EOS and pad set) in root/model."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rng = np.random.default_rng(0)
    words = "one two three four five six seven eight nine ten plus minus times what is the answer".split()
    say = lambda span: " ".join(rng.choice(words, rng.integers(*span)))
    rows = [
        dict(
            prompt=f"Question: {say(prompt_words)}?",
            chosen=f" {say(answer_words)}",
            rejected=f" {say(answer_words)}",
        )
        for _ in range(count)
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=alphabet
    )
    tokenizer.train_from_iterator([r["prompt"] + r["chosen"] for r in rows], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    names = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **names).save_pretrained(root / "model")
    torch.manual_seed(0)
    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2, max_position_embeddings=2048)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TRL_SHAPES[shape], **ids))
    llama.float().save_pretrained(root / "model")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def trl_step_seconds(root: Path, rows: list[dict], pairs: int, steps: int) -> tuple[float, int]:
    """TRL's DPOTrainer with its defaults on root/model: median seconds of `steps` optimizer steps after a
    warm-up one, and the width of its first batch."""
    import torch
    import transformers
    import trl
    from datasets import Dataset

    marks = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            marks.append(time.perf_counter())

        def on_step_end(self, *args, **kwargs):
            marks.append(time.perf_counter())

    args = trl.DPOConfig(
        output_dir=str(root / "trl"),
        per_device_train_batch_size=pairs,
        max_steps=steps + 1,
        learning_rate=1e-6,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1000,
    )
    policy = transformers.AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "model")
    trainer = trl.DPOTrainer(
        policy,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Timer()],
    )
    trainer.train()
    first = trainer.data_collator([trainer.train_dataset[i] for i in range(pairs)])["input_ids"]
    return float(np.median(np.diff(marks)[::2][1:])), first.shape[-1]


def bench_vs_trl(steps: int) -> dict:
    """TRL's DPOTrainer against ours on the same model and pairs: CPU, f32, each with its defaults (TRL: no
    gradient checkpointing, padding to the batch's longest; ours: remat full, data.padded_width), step time
    the median of `steps` after a warm-up. Needs `pip install trl` (not a dependency)."""
    import torch
    import trl

    rows, results = [], {}
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    for shape, pairs, prompt_words, answer_words in [
        ("smollm2-135m", 8, (14, 20), (1, 4)),
        ("4-layer D256", 16, (40, 60), (25, 40)),
    ]:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            pair_rows = short_pairs_and_model(root, shape, pairs * (steps + 1), prompt_words, answer_words)
            trl_s, trl_width = trl_step_seconds(root, pair_rows, pairs, steps)
            summary = data.tokenize(
                str(root / "pairs.jsonl"), str(root / "model"), str(root / "ours"), max_seq_len=512
            )
            dataset, arch = data.PairDataset(root / "ours"), model.load_config(root / "model")
            loader = data.train_batches(
                dataset, range(len(dataset)), batch_size=pairs, seed=0, max_seq_len=512
            )
            batches = list(itertools.islice(loader, steps))
            width = batches[0]["input_ids"].shape[-1]
            seconds = []
            for layout in (lambda b: repad(b, 128 * -(-b["input_ids"].shape[-1] // 128)), lambda b: b):
                runner = StepRunner(arch, run_config(pairs), mesh, jnp.float32, weights=root / "model")
                seconds.append(float(np.median([runner.run(layout(b)) for b in batches])))
        tokens = summary["token_length_percentiles"]["chosen"]["p50"]
        rows.append(
            [shape, pairs, tokens, trl_width, trl_s, 128 * -(-width // 128), seconds[0], width, seconds[1]]
        )
        rows[-1].append(seconds[1] / trl_s)
        results[shape] = dict(
            trl_s=trl_s, before_s=seconds[0], ours_s=seconds[1], ours_over_trl=seconds[1] / trl_s
        )
    note = (
        f"CPU ({os.cpu_count()} cores), f32, trl {trl.__version__}, torch {torch.__version__}, each with its "
        "defaults "
        "(TRL: no gradient checkpointing; ours: remat full). Random weights, byte-level BPE tokens."
    )
    header = "shape | pairs | chosen tokens p50 | TRL width | TRL step s | width before | step s before"
    table(
        "Ours against TRL's DPOTrainer (short pairs)", header + " | width | step s | ours / TRL", rows, note
    )
    return results


# --- compile: the train step's program against an older commit's, and compile time against depth

# What a child process lowers and compiles in the folder of one version of the code (its dpo, model, bench):
# the demo's train step (its model, settings and planned training shape, 32 pairs of 24 tokens with prefix
# sharing) and the 1B shape's, abstract (bf16, one pair of 2048 tokens, as the memory plan lowers it). Only
# functions both versions have are used, or each version's spelling.
PROBE = """
import json, resource, sys, tempfile, time
from pathlib import Path
import jax, jax.numpy as jnp
import bench, bookkeeping, data, dpo, model, sharding

cpu = lambda: (lambda r: r.ru_utime + r.ru_stime)(resource.getrusage(resource.RUSAGE_SELF))
mesh = sharding.make_mesh(1, -1, 1, devices=jax.devices()[:1])

def demo():
    model_dir, _ = bookkeeping.make_demo(Path(tempfile.mkdtemp()), 0)
    arch = model.LlamaConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    settings = getattr(dpo, "DEMO_SETTINGS", None) or bookkeeping.DEMO_SETTINGS  # moved in #31
    config = dpo.Config(**{k: v for k, v in settings.items() if k != "output_dir"})
    optimizer = dpo.make_optimizer(config)
    swept = hasattr(config, "hyperparameters")  # step inputs since #36
    with jax.set_mesh(mesh):
        steps = dpo.make_steps(arch, config) if swept else dpo.make_steps(arch, config, optimizer)
        train_step = steps["training"] if isinstance(steps, dict) else steps[0]  # a dict by kind since #31
        params = model.init_params(arch, jax.random.key(0), mesh)
        state = jax.jit(lambda p: dpo.TrainState.create(p, optimizer))(params)
        batch = sharding.global_batch(data.blank_batch(data.Shape(32, 24, 1, 16)), mesh)
        inputs = (config.hyperparameters(),) if swept else ()
        return train_step.lower(state, dpo.Frozen(None, params), *inputs, batch)

bf16 = jnp.bfloat16
one_b = lambda: bench.abstract_step(bench.SHAPES["1b"], bench.run_config(1, dtype=bf16), mesh, bf16, 2048)
out = {}
for name, lower in [("demo", demo), ("1b", one_b)]:
    lowered = lower()
    text = lowered.as_text()
    start, used = time.perf_counter(), cpu()
    lowered.compile()
    out[name] = dict(lines=len(text.splitlines()), constraints=text.count("sdy.sharding_constraint"),
                     seconds=time.perf_counter() - start, cpu_seconds=cpu() - used)
print(json.dumps(out))
"""


def probe_compile(folder: Path) -> dict:
    """PROBE's figures for the code in `folder`, in a fresh process (nothing cached, the same XLA_FLAGS)."""
    env = dict(os.environ, PYTHONPATH=str(folder), JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=folder, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"compile probe in {folder} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_compile_against(commit: str, rounds: int) -> dict:
    """The demo's and the 1B shape's train step, StableHLO lines (and how many of them are explicit mode's
    sharding constraints) and compile seconds, of the code at `commit` (its files from `git archive`) and of
    this folder's, measured in alternating fresh processes, `rounds` each: the medians, and their ratio."""
    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        git = ["git", "-C", str(here), "archive", commit]
        archive = subprocess.run(git, capture_output=True, check=False)
        if archive.returncode:
            print(f"\n(compile against {commit}: skipped, no git history here)")
            return {}
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        runs = {commit: [], "now": []}
        for _ in range(rounds):
            for name, folder in ((commit, Path(tmp)), ("now", here)):
                runs[name].append(probe_compile(folder))
    median = lambda xs: sorted(xs)[len(xs) // 2]
    rows, summary = [], {}
    for program in ("demo", "1b"):
        figures = {
            name: {k: median([r[program][k] for r in found]) for k in found[0][program]}
            for name, found in runs.items()
        }
        before, now = figures[commit], figures["now"]
        for key in ("lines", "constraints", "seconds", "cpu_seconds"):
            rows.append([program, key.replace("_", " "), before[key], now[key], now[key] / before[key]])
        summary[program] = figures
    note = (
        f"Medians of {rounds} fresh processes each, alternating, on {os.cpu_count()} CPU cores, XLA_FLAGS "
        f"{os.environ.get('XLA_FLAGS', '') or 'unset'}. demo: the demo's train step (32 pairs of 24 tokens, "
        "prefix sharing); 1b: Llama 3.2 1B's, abstract, bf16, 1 pair of 2048 tokens (the memory plan's). "
        "constraints: the lines that are sdy.sharding_constraint (explicit mode writes one after each op). "
        "cpu seconds: compile time summed over threads, steadier than wall time on a shared machine."
    )
    header = f"program | figure | {commit} | now | ratio"
    table(f"Train step program: {commit} against now", header, rows, note)
    return summary


def bench_compile(cfg, mesh, dtype, pairs: int, seq: int, depths) -> None:
    rows = []
    for layers in depths:
        lowered = abstract_step(
            dataclasses.replace(cfg, num_layers=layers), run_config(pairs, dtype=dtype), mesh, dtype, seq
        )
        start = time.perf_counter()
        lowered.compile()
        rows.append([layers, time.perf_counter() - start])
    title = f"Compile time of the train step against depth (D {cfg.hidden_size}, layers scanned)"
    table(title, "layers | compile s", rows, f"{pairs} pairs x {seq} tokens, {jax.devices()[0].device_kind}")


# --- memory plan: the largest per-chip batch


# Bytes per weight of a LoRA base's projections: bf16, or quantised (NF4: 4 bits, an 8-bit absmax per 64 and
# an f32 scale per 64 x 256; int8: 8 bits, an f32 absmax per output channel, left out).
BASE_BYTES = {"none": 2.0, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0}
LORA_RANK = 16  # the memory plan's adapters: rank 16 on all seven projections


def memory_plan_bytes(
    cfg,
    seq: int,
    chips: int,
    live_reference: bool,
    flash: bool,
    chunk: int = 4096,
    lora: bool = False,
    quantization: str = "none",
    context: int = 1,
    offload: bool = False,
    block: int | None = None,
):
    """(fixed bytes, bytes per pair) on one chip under FSDP over `chips`, remat "full", bf16 compute. With
    `context`, each pair's tokens are split `context` ways, its keys and values gathered whole (and their
    gradients), and FSDP still spans all the chips (fsdp x context); offload: each layer's input lives on
    the host.

    fixed: f32 params, grads and Adam update, Adam mu and nu (20 bytes/param) and a bf16 reference (2), all
    sharded; one layer's weights gathered in bf16 twice (this one and the next) with its f32 gradient; the
    embedding table and the LM head gathered whole in bf16, with the head's f32 gradient. With LoRA: the
    frozen base alone (it is the reference too; its projections BASE_BYTES[quantization] a weight, the rest
    bf16), the adapters (LORA_RANK) at 20 bytes a parameter, no weight gradients, and the layer gathered
    dequantised, in bf16.
    per pair (2 sequences of seq tokens, bf16): each layer's input (what remat "full" keeps); one layer's
    recomputed intermediates and their gradients; without flash attention, the [H, T, T] scores and
    probabilities and their gradients (f32), or with "chunked" attention those of one `block` of keys;
    the fused LM head's chunk of `chunk` vocabulary entries: f32 logits, softmax and gradient for each of
    the pair's tokens.
    """
    d, f, v, h, k, q = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.vocab_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    )
    layer = d * q * (2 * h + 2 * k) + 3 * d * f
    head = d * v * (1 if cfg.tie_word_embeddings else 2)
    gradients = 0 if lora else 4  # f32 bytes per parameter of the gathered layer's and the head's gradient
    state = (20 + 2 * live_reference) * (cfg.num_layers * layer + head)
    if lora:
        adapters = LORA_RANK * cfg.num_layers * (7 * d + 2 * h * q + 2 * k * q + 3 * f)
        state = cfg.num_layers * layer * BASE_BYTES[quantization] + 2 * head + 20 * adapters
    fixed = state / chips + layer * (2 * 2 + gradients) + d * v * (2 + 2 + gradients)
    s = 2 * seq
    inputs = 0 if offload else cfg.num_layers * s * d * 2
    per_pair = inputs + s * (4 * d + 3 * h * q + 3 * k * q + 3 * f) * 2 * 2 + s * d * 6
    per_pair += 0 if flash else 2 * h * seq * (block or seq) * 4 * 4
    whole_kv = 0 if context == 1 else s * k * q * 2 * 2 * 2  # k and v gathered, with their gradients
    if block and not flash:  # chunked: k and v padded to whole blocks, their gradients stacked in f32
        whole_kv += s * k * q * (2 + 4) * 2
    return fixed, (per_pair + s * min(chunk, v) * 4 * 3) / context + whole_kv


def bench_memory(on_accelerator: bool, mesh) -> None:
    rows = []
    for shape in ("1b", "3b", "8b"):
        for seq in (2048, 4096):
            rows.append([shape, seq])
            for chip, hbm in CHIPS.items():
                for chips in (1, 8):
                    fits = [
                        max(0, int((0.9 * hbm - fixed) // per_pair))
                        for fixed, per_pair in (
                            memory_plan_bytes(SHAPES[shape], seq, chips, live, flash=chip.startswith("H100"))
                            for live in (True, False)
                        )
                    ]
                    rows[-1].append(f"{fits[0]} / {fits[1]}")
            fixed, per_pair = memory_plan_bytes(SHAPES[shape], seq, 1, True, flash=True, lora=True)
            rows[-1].append(max(0, int((0.9 * CHIPS["H100 80GB"] - fixed) // per_pair)))
    header = "shape | seq | " + " | ".join(
        f"{chip}, {n} chip{'s' * (n > 1)}" for chip in CHIPS for n in (1, 8)
    )
    header += " | H100 80GB, 1 chip, LoRA"
    note = (
        "COMPUTED, not measured (bench.memory_plan_bytes): pairs per chip, live / precomputed reference; "
        "FSDP over the chips, remat full, bf16 compute, 10% of memory kept free. H100 with cuDNN flash "
        "attention; TPU with XLA attention (one layer's [H, T, T] scores live). LoRA: the bf16 base is the "
        "reference too."
    )
    table("Memory plan: largest per-chip batch (pairs)", header, rows, note)
    # The same from XLA's buffer assignment of the real step: on an accelerator, the largest batch that fits
    # its memory; on CPU, a cross-check of the formula (CPU compiler, XLA attention).
    rows, chips = [], mesh.devices.size
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0) if on_accelerator else 0
    for shape in ("1b", "3b", "8b"):
        for seq in (2048, 4096):
            lowered = [
                abstract_step(
                    SHAPES[shape], run_config(p * chips, dtype=jnp.bfloat16), mesh, jnp.bfloat16, seq
                )
                for p in (1, 2)
            ]
            one, two = (peak_bytes(x.compile()) for x in lowered)
            flash = jax.default_backend() == "gpu"  # cuDNN attention; XLA's elsewhere
            fixed, per_pair = memory_plan_bytes(SHAPES[shape], seq, chips, True, flash=flash)
            fits = "n/a"
            if limit:  # the first pair costs `one`, each further pair `two - one`
                fits = int((limit - one) // max(two - one, 1)) + 1 if one <= limit else 0
            rows.append(
                [shape, seq, one / GiB, (fixed + per_pair) / GiB, (two - one) / GiB, per_pair / GiB, fits]
            )
    header = (
        "shape | seq | compiled @1 pair GiB | formula | compiled per more pair GiB | formula | pairs/chip"
    )
    note = "Live reference, remat full, bf16. " + (
        f"MEASURED: largest batch from the compiled peaks against {limit / GiB:.1f} GiB."
        if limit
        else "CPU compiler with XLA attention: a cross-check of the formula, not a GPU or TPU measurement."
    )
    table(
        f"Memory of the compiled train step on {chips} x {jax.devices()[0].device_kind}", header, rows, note
    )


CARDS = {"24 GB": 24 * GiB, "48 GB": 48 * GiB, "80 GB": 79.6 * GiB}  # one GPU's memory


def bench_context_memory() -> None:
    """Long rows (#33): Llama-3.1-8B's pairs per step at 8k, 32k and 128k tokens a side on 8 and 32 H100s or
    TPU v5p chips, over context axes of 1, 4 and 8, with and without remat offload: computed from the sizes.
    Attention as auto picks it at these lengths (model._attention_impl): cuDNN's on whole rows on an H100,
    "chunked" (a block of keys' scores held) on a split row and on a TPU."""
    rows, cfg = [], SHAPES["8b"]
    for chip, seq, chips in itertools.product(CHIPS, (8192, 32768, 131072), (8, 32)):
        row = [chip, seq, chips]
        for context, offload in itertools.product((1, 4, 8), (False, True)):
            flash = chip.startswith("H100") and context == 1
            plan = dict(flash=flash, block=model.ATTENTION_BLOCK, context=context, offload=offload)
            fixed, per_pair = memory_plan_bytes(cfg, seq, chips, False, **plan)
            row.append(max(0, int((0.9 * CHIPS[chip] - fixed) // per_pair)) * (chips // context))
        rows.append(row)
    header = "chip | seq a side | chips | " + " | ".join(
        f"context {c}{', offload' * o}" for c in (1, 4, 8) for o in (0, 1)
    )
    note = (
        "COMPUTED, not measured (bench.memory_plan_bytes with context and offload): pairs per step (each "
        "pair over `context` chips), precomputed reference, FSDP over all the chips (parameters sharded over "
        "fsdp x context), cuDNN attention on an H100 without context, chunked attention (blocks of "
        f"{model.ATTENTION_BLOCK} keys) otherwise, remat full or offload, bf16, 10% of memory kept free."
    )
    table("Long rows: Llama-3.1-8B pairs per step", header, rows, note)
    bench_context_compiled()


def bench_context_compiled(seq: int = 8192) -> None:
    """The context columns' formula against XLA's buffer assignment of the real step on the CPU (a check,
    as bench_memory's): Llama-3.2-1B's shape, one and two pairs of `seq` tokens a side, on (1, 1, N, 1)
    meshes of fake CPU devices (auto attention: "chunked" at this length; live reference, bf16)."""
    if jax.default_backend() != "cpu" or jax.device_count() < 8:
        need = "XLA_FLAGS=--xla_force_host_platform_device_count=8"
        print(f"\n(context cross-check skipped: it runs on the CPU with 8 fake devices, {need})")
        return
    rows, cfg = [], SHAPES["1b"]
    for context in (1, 4, 8):
        mesh = sharding.make_mesh(1, 1, 1, context=context, devices=jax.devices()[:context])
        config = partial(run_config, dtype=jnp.bfloat16)
        lowered = [abstract_step(cfg, config(p), mesh, jnp.bfloat16, seq) for p in (1, 2)]
        one, two = (peak_bytes(x.compile()) for x in lowered)
        plan = dict(flash=False, block=model.ATTENTION_BLOCK, context=context)
        fixed, per_pair = memory_plan_bytes(cfg, seq, context, True, **plan)
        rows.append([context, one / GiB, (fixed + per_pair) / GiB, (two - one) / GiB, per_pair / GiB])
    header = "context | compiled @1 pair GiB | formula | compiled per more pair GiB | formula"
    note = f"Llama-3.2-1B's shape, {seq} tokens a side, live reference, remat full, bf16, CPU compiler."
    table(
        f"Long rows: the compiled train step on (1, 1, N, 1) x {jax.devices()[0].device_kind}",
        header,
        rows,
        note,
    )


def bench_qlora_memory(mesh) -> None:
    """LoRA on a bf16, NF4 or int8 base (QLoRA), one GPU: the largest batch computed from the sizes, and a
    cross-check of the formula against XLA's buffer assignment of the real train step on the CPU."""
    shapes, rows = {"8b": "Llama-3.1-8B", "qwen7b": "Qwen2.5-7B"}, []
    for (shape, name), quantization, seq in itertools.product(shapes.items(), BASE_BYTES, (2048, 4096)):
        plan = memory_plan_bytes(SHAPES[shape], seq, 1, True, True, lora=True, quantization=quantization)
        fits = [max(0, int((0.9 * memory - plan[0]) // plan[1])) for memory in CARDS.values()]
        rows.append([name, quantization.replace("none", "bf16"), seq, plan[0] / GiB, *fits])
    note = (
        "COMPUTED, not measured (bench.memory_plan_bytes): pairs a forward pass (microbatch_size) on one GPU "
        f"with cuDNN flash attention; LoRA rank {LORA_RANK} on all seven projections, the base the reference "
        "too, remat full, bf16 compute, 10% of memory kept free. fixed: the base, the adapters' state, one "
        "layer and the embedding and LM head gathered."
    )
    header = "model | base | seq | fixed GiB | " + " | ".join(CARDS)
    table("QLoRA memory plan: largest batch on one GPU (pairs)", header, rows, note)
    rows = []
    for shape, quantization, seq in itertools.product(shapes, ("nf4", "int8"), (2048, 4096)):
        config = partial(run_config, dtype=jnp.bfloat16, lora_rank=LORA_RANK, base_quantization=quantization)
        lowered = [abstract_step(SHAPES[shape], config(p), mesh, jnp.bfloat16, seq) for p in (1, 2)]
        base = abstract_base_bytes(SHAPES[shape], quantization, mesh)  # the reference: the same arrays
        one, two = (peak_bytes(x.compile()) - base for x in lowered)
        fixed, per_pair = memory_plan_bytes(
            SHAPES[shape], seq, 1, True, False, lora=True, quantization=quantization
        )
        rows.append(
            [shape, quantization, seq, one / GiB, (fixed + per_pair) / GiB, (two - one) / GiB, per_pair / GiB]
        )
    header = "shape | base | seq | compiled @1 pair GiB | formula | compiled per more pair GiB | formula"
    note = (
        "CPU compiler with XLA attention (the formula without flash attention): a cross-check, not a GPU "
        "measurement. The base is an argument twice (as the base and as the reference), counted once."
    )
    table(
        f"QLoRA: memory of the compiled train step on 1 x {jax.devices()[0].device_kind}", header, rows, note
    )


def abstract_base_bytes(cfg, quantization: str, mesh) -> int:
    """The bytes of a LoRA base in bf16 with its projections quantised."""
    base = model.abstract_params(cfg, mesh, quantization=quantization)
    quantized = lambda x: isinstance(x, model.Quantized)
    size = lambda x: (
        sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(x)) if quantized(x) else 2 * x.size
    )
    return sum(size(x) for x in jax.tree.leaves(base, is_leaf=quantized))


# --- shapes: the few batch shapes a run compiles, and what a short run spends before its first step


def bench_shapes(shape: str, before: str | None, run_pairs: int, loader: bool) -> dict:
    """The loader alone (lengths, no model): distinct training shapes and padding efficiency over 150 steps,
    each batch in its own smallest shape (before: data.py at aa42811 laid every batch out so) against
    data.plan_shapes' few; then whole `python dpo.py` runs of a random `shape` model on UltraFeedback-like
    pairs: time to the first step, compile seconds and cache hits, with a cold and a warm compilation cache
    (and the older dpo.py in `before`, when given)."""
    rows, results = [], {}
    mixes = ("UltraFeedback-like", "long prompts", "short") if loader else ()
    for mix, batch_size in itertools.product(mixes, (32, 128)):
        pairs = SyntheticPairs(20_000, 2048, short=mix == "short", long_prompt=mix == "long prompts")
        order = data.train_order(pairs, np.arange(len(pairs)), batch_size=batch_size, seed=0)
        steps = [order(s) for s in range(150)]
        for name, layout in (
            ("plain", None),
            ("prefix sharing", data.Layout(True)),
            ("packing", data.Layout(True, True)),
        ):
            counts = []
            for shapes in (
                None,
                data.plan_shapes(pairs, steps, count=data.TRAIN_SHAPES, max_seq_len=2048, layout=layout),
            ):
                laid = list(
                    data._batches(pairs, np.arange(len(pairs)), steps, 2048, None, layout, 0, 1, shapes)
                )
                ran = sum((b["pair"] >= 0).sum() if "pair" in b else b["lengths"].sum() for b in laid)
                counts += [
                    len({data.shape_of(b) for b in laid}),
                    ran / sum(b["input_ids"].size for b in laid),
                ]
            rows.append([mix, batch_size, name, *counts])
            results[f"{mix} {batch_size} {name}"] = counts
    note = (
        "150 steps of 20,000 synthetic pairs (bench.py SyntheticPairs), max_seq_len 2048; efficiency = "
        "tokens that ran / tokens processed (padding included); before: each batch in its own smallest shape."
    )
    header = (
        "mix | pairs a step | layout | shapes before | efficiency before | shapes after | efficiency after"
    )
    if loader:  # the same numbers on any machine: the accelerator's time is better spent below
        table("Batch shapes over 150 steps (the loader alone)", header, rows, note)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, pairs_file = run_inputs(Path(tmp), SHAPES[shape], run_pairs)
        runs = [("this dpo.py, cold cache", "dpo.py"), ("this dpo.py, warm cache", "dpo.py")]
        runs = ([("before (aa42811)", str(Path(before) / "dpo.py"))] if before else []) + runs
        rows = []
        for label, script in runs:
            flags = dict(
                model_name_or_path=model_dir, train_data=pairs_file, output_dir=Path(tmp) / label.split()[0]
            )
            flags |= dict(
                train_batch_size=32,
                num_train_steps=20,
                steps_per_eval=10,
                validation_split_fraction=0.06,
                max_seq_len=1024,
            )
            flags |= dict(
                steps_per_checkpoint=20, steps_per_hf_export=20, compilation_cache_dir=Path(tmp) / "cache"
            )
            if script != "dpo.py":
                del flags["compilation_cache_dir"]
            shutil.rmtree(flags["output_dir"], ignore_errors=True)
            first, total, out = timed_run(script, flags)
            programs = next((x for x in out if x.startswith(("programs:", "batch shapes compiled"))), "?")
            rows.append([label, first, total, programs.split(":", 1)[1].strip()])
            results[label] = dict(first_step_s=first, total_s=total, programs=rows[-1][-1])
    note = (
        f"python dpo.py on a random {shape} model (bf16 on accelerators), {run_pairs} UltraFeedback-like "
        "pairs (6% for validation), 32 pairs a step, 20 steps, evaluation every 10, checkpoint and export at "
        f"the end; {jax.devices()[0].device_kind}. First step: seconds from launch until step 1 is logged."
    )
    table(f"A short run ({shape})", "run | first step s | total s | programs", rows, note)
    return results


def run_inputs(root: Path, cfg, count: int) -> tuple[Path, Path]:
    """A random `cfg` model in HF layout with the demo's word-level tokenizer, and `count` pairs of demo words
    with UltraFeedback-like lengths (prompt ~110 words, replies ~260, lognormal), one token a word."""
    demo_model, _ = bookkeeping.make_demo(root / "demo", seed=0)
    words = [w for ws in bookkeeping.DEMO_TOPICS.values() for w in ws.split()]
    rng = np.random.default_rng(0)
    say = lambda median, sigma: " ".join(rng.choice(words, max(1, int(rng.lognormal(np.log(median), sigma)))))
    with open(root / "pairs.jsonl", "w") as f:
        for _ in range(count):
            row = dict(prompt=say(110, 0.9), chosen=say(260, 0.75), rejected=say(260, 0.75))
            f.write(json.dumps(row) + "\n")
    mesh = sharding.make_mesh(-1, 1, 1)
    with jax.set_mesh(mesh):
        params = model.init_params(cfg, jax.random.key(0), mesh)
        files = [demo_model / name for name in ("tokenizer.json", "tokenizer_config.json")]
        model.save_hf(params, cfg, root / "model", dtype="bfloat16", extra_files=files)
    return root / "model", root / "pairs.jsonl"


def timed_run(script: str, flags: dict) -> tuple[float, float, list[str]]:
    """(seconds to the first step's line, total seconds, output lines) of `python script --config.K V ...`."""
    command = [sys.executable, script] + [f"--config.{k.replace('_', '-')}={v}" for k, v in flags.items()]
    started, first, lines = time.time(), float("nan"), []
    # This process holds a little of the accelerator (it made the weights), unreserved: the run takes most.
    env = os.environ | dict(XLA_PYTHON_CLIENT_PREALLOCATE="true", XLA_PYTHON_CLIENT_MEM_FRACTION="0.85")
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as run:
        for line in run.stdout:
            lines.append(line.rstrip())
            if line.startswith("step 1/") and first != first:
                first = time.time() - started
    if run.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n" + "\n".join(lines[-20:]))
    return first, time.time() - started, lines


# --- agreement: the accelerator's bf16 against the CPU's f32


def bench_agree(shape: str, pairs: int = 2, seq: int = 256) -> dict:
    """The eval step's metrics (the train step's loss and log-probs, without the update) on the accelerator in
    bf16 against the CPU in f32, on the same weights (made on the CPU) and batch. METHOD.md's range for bf16
    operands: a relative difference between 1e-3 and 1e-2."""
    cfg, cpu = SHAPES[shape], jax.devices("cpu")[0]
    batch = synthetic_batch(cfg, np.full((pairs, 2), seq), seq)
    with jax.default_device(cpu), jax.set_mesh(one := sharding.make_mesh(1, 1, 1, devices=[cpu])):
        weights = [jax.device_get(model.init_params(cfg, jax.random.key(seed), one)) for seed in (0, 1)]
    results = []
    for device, dtype in ((cpu, jnp.float32), (jax.devices()[0], jnp.bfloat16)):
        mesh, config = sharding.make_mesh(1, 1, 1, devices=[device]), run_config(pairs, dtype=dtype)
        with jax.set_mesh(mesh):
            where = [w.sharding for w in jax.tree.leaves(model.abstract_params(cfg, mesh))]
            put = lambda tree, where=where: jax.tree.unflatten(
                jax.tree.structure(tree), list(map(jax.device_put, jax.tree.leaves(tree), where))
            )
            params, reference = map(put, weights)
            eval_step = dpo.make_steps(cfg, config)["evaluation"]
            sums = eval_step(
                params,
                dpo.Frozen(None, reference),
                config.hyperparameters(),
                sharding.global_batch(batch, mesh),
            )
            results.append({k: float(v) for k, v in dpo.normalize(jax.device_get(sums)).items()})
    cpu_metrics, accelerator = results
    keys = ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "entropy")
    rows = [
        [k, cpu_metrics[k], accelerator[k], abs(accelerator[k] - cpu_metrics[k]) / abs(cpu_metrics[k])]
        for k in keys
    ]
    device = jax.devices()[0].device_kind
    note = f"{shape}, {pairs} pairs of {seq} tokens, random weights; {device} bf16, CPU f32."
    table(
        "The accelerator's bf16 step against the CPU's f32",
        "metric | CPU f32 | bf16 | relative difference",
        rows,
        note,
    )
    return {row[0]: row[-1] for row in rows}


# --- tokenization speed


def bench_tokenize(n_pairs: int) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sys.path.insert(0, str(Path(__file__).parent / "tests"))
    from _data_templates import LLAMA31  # Llama 3.1 Instruct's own chat template

    rng = np.random.default_rng(0)
    syllables = "ka to ri en an the ing ed re co mo la si pe ver tion al er in st pro de com ex un".split()
    words = np.unique(["".join(rng.choice(syllables, rng.integers(1, 5))) for _ in range(40_000)])
    zipf = 1 / np.arange(1, len(words) + 1) ** 1.1
    text = lambda mean: " ".join(
        words[rng.choice(len(words), max(5, int(rng.normal(mean, mean / 2.5))), p=zipf / zipf.sum())]
    )
    rows = []
    for i in range(n_pairs):  # UltraFeedback-sized: ~150-word prompts, ~250-word responses
        prompt = [{"role": "user", "content": text(150)}]
        chosen, rejected = (prompt + [{"role": "assistant", "content": text(250)}] for _ in range(2))
        rows.append(
            {"prompt": prompt[0]["content"], "chosen": chosen, "rejected": rejected, "prompt_id": str(i)}
        )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pq.write_table(pa.Table.from_pylist(rows), tmp / "pairs.parquet")
        specials = (
            "<|begin_of_text|> <|end_of_text|> <|start_header_id|> <|end_header_id|> <|eot_id|>".split()
        )
        tokenizer = Tokenizer(models.BPE())  # byte-level BPE, as Llama 3's
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(
            vocab_size=32000, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
        )
        tokenizer.train_from_iterator((r["chosen"][1]["content"] for r in rows[:3000]), trainer)
        (tmp / "tok").mkdir()
        tokenizer.save(str(tmp / "tok" / "tokenizer.json"))
        config = {"bos_token": specials[0], "eos_token": specials[-1], "chat_template": LLAMA31}
        (tmp / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
        start = time.perf_counter()
        summary = data.tokenize(
            str(tmp / "pairs.parquet"), str(tmp / "tok"), str(tmp / "out"), max_seq_len=4096
        )
        seconds = time.perf_counter() - start
    p, written = summary["token_length_percentiles"]["chosen"], summary["rows_written"]
    rows = [[n_pairs, written, seconds, written / seconds, f"{p['p50']} / {p['p90']}"]]
    note = (
        f"{os.cpu_count()} CPU cores; byte-level BPE (32k vocab, trained on the synthetic text), Llama 3.1's "
        "chat template. Target: 61k pairs in under 2 minutes on 2 cores."
    )
    header = "pairs | written | seconds | pairs/s | chosen tokens p50 / p90"
    table("Tokenization (data.tokenize)", header, rows, note)
    return {"seconds": seconds, "pairs_per_s": written / seconds}


# --- XLA flags (GPU)

GPU_FLAG_SETS = {
    "(none)": "",
    "latency hiding scheduler": "--xla_gpu_enable_latency_hiding_scheduler=true",
    "+ cuBLAS, not Triton, GEMMs": "--xla_gpu_enable_latency_hiding_scheduler=true "
    "--xla_gpu_enable_triton_gemm=false",
    "+ no command buffers": "--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_command_buffer=",
}


def bench_flags(shape: str, pairs: int | None, seq: int, steps: int) -> None:
    rows = []
    for name, flags in GPU_FLAG_SETS.items():
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [
                sys.executable,
                __file__,
                "--only",
                "step",
                "--shapes",
                shape,
                "--seq",
                str(seq),
                "--steps",
                str(steps),
            ]
            cmd += ["--variants", "precompute:full:auto", "--json-out", out.name] + (
                ["--batch", str(pairs)] if pairs else []
            )
            done = subprocess.run(cmd, env=os.environ | {"XLA_FLAGS": flags}, capture_output=True, text=True)
            if done.returncode:
                rows.append([name, "failed: " + done.stderr.strip().splitlines()[-1][:100], ""])
                continue
            step = json.loads(Path(out.name).read_text())[0]["rows"][0]
            rows.append([name, step[5], step[8]])
    table(f"XLA_FLAGS ({shape}, seq {seq}, precomputed reference, remat full)", "flags | step s | MFU", rows)


# --- main


def main(args: Args) -> None:
    # JAX takes 75% of a GPU's memory by default; a 3B model on one 80 GB GPU needs more. Read at start.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    sections, on_cpu = set(args.only.split(",")), jax.default_backend() == "cpu"
    dtype = jnp.float32 if on_cpu else jnp.bfloat16  # what dpo.py's "auto" picks
    mesh = sharding.make_mesh(1, -1, 1, devices=jax.devices()[:1] if on_cpu else None)
    shapes = (args.shapes or ("tiny" if on_cpu else "1b,3b")).split(",")
    seq, steps = args.seq or (256 if on_cpu else 2048), args.steps or (5 if on_cpu else 10)
    variants = ["live:full:auto", "precompute:full:auto", "live:save_matmuls:auto"]
    if not on_cpu:  # remat policies and the attention backend, without the reference's memory
        variants += ["precompute:save_matmuls:auto", "precompute:none:auto", "precompute:full:xla"]
    variants = args.variants.split(",") if args.variants else variants
    load = lambda: "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"# bench.py on {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"{load()}"
    )
    summary = {}
    if "logps" in sections:
        with jax.set_mesh(mesh):  # the fused kernel reads the mesh its head lies on
            summary["logps"] = bench_logps(on_cpu, dtype, args.logps_time_tokens)
    if "step" in sections:
        step = bench_step(shapes, variants, args.batch, seq, steps, mesh, dtype, args.profile, on_cpu)
        summary["step"] = step
    if "padding" in sections:
        pairs = (args.batch or (4 if on_cpu else 8)) * mesh.devices.size
        summary["padding"] = bench_padding(SHAPES[shapes[0]], mesh, dtype, pairs, 2 if on_cpu else steps)
    if "sharing" in sections:
        pairs = (args.batch or (4 if on_cpu else 8)) * mesh.devices.size
        summary["sharing"] = bench_sharing(SHAPES[shapes[0]], mesh, dtype, pairs, 3 if on_cpu else steps)
    if "shapes" in sections:
        summary["shapes"] = bench_shapes(shapes[0], args.before, args.run_pairs, loader=on_cpu)
    if "trl" in sections:
        summary["trl"] = bench_vs_trl(3 if on_cpu else steps)
    if "compile" in sections:
        summary["compile"] = bench_compile_against(args.compile_against, args.compile_rounds)
        depths = (2, 8, 32) if on_cpu else (4, 16, 32)
        bench_compile(SHAPES[shapes[0]], mesh, dtype, (args.batch or 8) * mesh.devices.size, seq, depths)
    if "memory" in sections:
        bench_memory(not on_cpu, mesh)
        bench_context_memory()
        bench_qlora_memory(mesh)
    if "tokenize" in sections:
        summary["tokenize"] = bench_tokenize(args.tokenize_pairs)
    if "agree" in sections and not on_cpu:
        summary["agree"] = bench_agree(shapes[0])
    if "flags" in sections and jax.default_backend() == "gpu":
        bench_flags(shapes[-1], args.batch, seq, steps)
    print(f"\n## Summary ({load()})\n\n" + json.dumps(summary, indent=1, default=str))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(TABLES, default=str))


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
