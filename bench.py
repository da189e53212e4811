"""Benchmarks, not tests: memory and speed of the pieces of dpo.py, one markdown table per section.

    python bench.py                                   # every section, sized for the device found
    python bench.py --only logps,step                 # some sections
    python bench.py --only step --shapes 3b --batch 4 --variants live:full:cudnn,live:save_matmuls:cudnn
    XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true python bench.py --only step

Sections:
  logps     fused chunked LM head + log-softmax (dpo.sequence_logps) against full logits: peak memory
            from the compiled program's memory analysis, and time (forward + backward).
  step      one DPO train step of a model shape with random weights: tokens/s, MFU (dpo.step_flops over
            real tokens / the chip's dense bf16 peak), compile time, compiled peak memory; variants of
            reference (live / precompute), remat policy and attention backend.
  padding   every batch padded to max_seq_len against data.py's bucketed lengths, on an
            UltraFeedback-like length mix: processed tokens and step time.
  compile   compile time of the train step against the number of layers (layers are scanned).
  memory    the largest per-chip batch for the 1B, 3B and 8B shapes under FSDP: computed from the
            sizes (and on an accelerator, measured from compiled programs).
  tokenize  data.py tokenization pairs/s on UltraFeedback-sized synthetic pairs.
  flags     (GPU) the step of the largest shape under a few XLA flag sets, each in a fresh process.

On CPU everything is sized down (a tiny model, fewer tokens) and said so in the tables. Numbers are
measurements of this run on this machine; nothing here asserts a timing.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tyro

import data
import dpo
import model
import sharding

GiB = 2**30
LLAMA3_ROPE = model.Llama3RopeScaling(32.0, 1.0, 4.0, 8192)
LLAMA = dict(vocab_size=128256, num_kv_heads=8, rope_theta=500000.0, max_position_embeddings=131072)
SHAPES = {  # random weights; Hub configs of Llama 3.2 1B / 3B and Llama 3.1 8B
    "tiny": model.LlamaConfig(8192, 256, 768, 4, 4, 2, 64, rope_theta=10000.0, max_position_embeddings=4096),
    "1b": model.LlamaConfig(
        **LLAMA, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, head_dim=64,
        rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True,
    ),
    "3b": model.LlamaConfig(
        **LLAMA, hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24, head_dim=128,
        rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True,
    ),
    "8b": model.LlamaConfig(
        **LLAMA, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, head_dim=128,
        rope_scaling=dataclasses.replace(LLAMA3_ROPE, factor=8.0),
    ),
}  # fmt: skip
CHIPS = {"H100 80GB": 79.6 * GiB, "TPU v5p": 95 * 10**9}  # usable HBM per chip


@dataclasses.dataclass
class Args:
    only: str = "logps,step,padding,compile,memory,tokenize,flags"  # sections to run, comma-separated
    device: str = "auto"  # auto: whatever JAX finds (GPU/TPU first); cpu: force the CPU
    shapes: str | None = None  # step shapes, comma-separated (tiny, 1b, 3b, 8b); default: tiny on CPU, 1b,3b else
    batch: int | None = None  # pairs per step; default per shape
    seq: int | None = None  # sequence length of the step section; default 256 on CPU, 2048 else
    variants: str | None = None  # reference:remat:attention list, e.g. live:full:auto,precompute:full:auto
    steps: int | None = None  # timed steps per variant; default 3 on CPU, 10 else
    logps_time_tokens: int | None = None  # tokens of the timed logps run; default: full shape off CPU, 1024 on it
    tokenize_pairs: int = 61135  # UltraFeedback train_prefs size
    profile: str | None = None  # write a jax.profiler trace of the last step variant here (open with xprof)
    json_out: str | None = None  # also write every table as JSON here
    xla_flags: str | None = None  # added to XLA_FLAGS before JAX starts


TABLES: list[dict] = []


def table(title: str, header: list[str], rows: list[list], note: str = "") -> None:
    TABLES.append({"title": title, "header": header, "rows": rows, "note": note})
    cell = lambda x: f"{x:.3g}" if isinstance(x, float) else str(x)
    print(f"\n### {title}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(cell(x) for x in row) + " |")
    print(f"\n{note}" if note else "", flush=True)


def peak_bytes(compiled) -> int:
    """Arguments + outputs + temporaries of a compiled program (what must be resident at its peak)."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def best_time(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # warm-up
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


def bench_logps(on_cpu: bool, dtype, args: Args) -> dict:
    fused = lambda h, w, t, m: dpo.sequence_logps(h, w, t, m, chunk_size=256)
    grad = lambda fn: jax.jit(jax.grad(lambda h, w, t, m: jnp.sum(fn(h, w, t, m)), argnums=(0, 1)))
    d, v, t = 4096, 128256, 2048

    def inputs(tokens: int, concrete: bool):
        shapes = [((tokens // t, t, d), dtype), ((d, v), dtype), ((tokens // t, t), jnp.int32), ((tokens // t, t), bool)]
        if not concrete:
            return [jax.ShapeDtypeStruct(s, dt) for s, dt in shapes]
        keys = jax.random.split(jax.random.key(0), 2)
        return [
            jax.random.normal(keys[0], shapes[0][0], dtype),
            jax.random.normal(keys[1], shapes[1][0], dtype) / math.sqrt(d),
            jnp.full(shapes[2][0], 7, jnp.int32),
            jnp.ones(shapes[3][0], bool),
        ]

    rows, ratios = [], {}
    for tokens in (8192, 16384):
        mem = [peak_bytes(grad(fn).lower(*inputs(tokens, False)).compile()) for fn in (fused, naive_logps)]
        rows.append([f"D {d}, V {v}, {tokens} tokens", "memory (compiled peak, GiB)", mem[0] / GiB, mem[1] / GiB, mem[0] / mem[1]])
        ratios[f"memory {tokens}"] = mem[0] / mem[1]
    timed_tokens = args.logps_time_tokens or (1024 if on_cpu else 8192)
    t = min(t, timed_tokens // 4)  # at least 4 sequences, so chunking crosses sequences as in training
    times = [best_time(grad(fn), *inputs(timed_tokens, True), reps=2) for fn in (fused, naive_logps)]
    rows.append([f"D {d}, V {v}, {timed_tokens} tokens", "time fwd+bwd (s)", times[0], times[1], times[0] / times[1]])
    ratios["time"] = times[0] / times[1]
    note = f"dtype {jnp.dtype(dtype).name}, chunk 256 positions. Targets: memory <= 0.1x naive, time <= 1.1x."
    if on_cpu and timed_tokens < 8192:
        note += f" Time measured at {timed_tokens} tokens ({timed_tokens // t} x {t}, chunk 256) to fit a CPU."
    table("Fused vs naive log-probs (value and gradient)", ["shape", "measure", "fused", "naive", "fused/naive"], rows, note)
    return ratios


# --- the train step of a model shape


def synthetic_batch(cfg, lengths: np.ndarray, width: int, seed: int = 0) -> dict[str, np.ndarray]:
    """[b, 2, width] random tokens, right-padded to each row's length; the first quarter is an unscored prompt."""
    rng, pos = np.random.default_rng(seed), np.arange(width)
    real = pos < lengths[..., None]
    return {
        "input_ids": np.where(real, rng.integers(0, cfg.vocab_size, (*lengths.shape, width)), 0).astype(np.int32),
        "loss_mask": real & (pos >= lengths[..., None] // 4),
        "lengths": lengths.astype(np.int32),
        "weight": np.ones(len(lengths), np.float32),
    }


def run_config(cfg, reference="live", remat="full", attention="auto", batch_size=8):
    return dpo.Config(
        model_name_or_path="bench", train_data="synthetic", train_batch_size=batch_size,
        reference=reference, remat=remat, attention_impl=attention,
    )  # fmt: skip


class StepRunner:
    """A train step for one (shape, variant) on fresh random weights; `run` compiles per batch width."""

    def __init__(self, cfg, config: dpo.Config, mesh, dtype):
        self.cfg, self.config, self.mesh, self.compiled, self.compile_seconds = cfg, config, mesh, {}, 0.0
        optimizer = dpo.make_optimizer(config)
        zero = jnp.zeros((), jnp.int32)
        with jax.set_mesh(mesh):
            self.step, _ = dpo.make_steps(cfg, config, optimizer, dtype)
            init = jax.jit(lambda p: dpo.TrainState(zero, p, optimizer.init(p), zero))
            self.state = init(model.init_params(cfg, jax.random.key(0), mesh))
            self.ref = None  # a separate tree: the state's params are donated at every step
            if config.reference == "live":
                cast = jax.jit(lambda p: jax.tree.map(lambda w: w.astype(dtype), p))
                self.ref = cast(model.init_params(cfg, jax.random.key(1), mesh))

    def run(self, batch: dict[str, np.ndarray]) -> float:
        """Seconds of one step (compiling first when the width is new, not counted)."""
        if self.config.reference == "precompute":
            batch = batch | {"ref_logps": np.zeros((len(batch["weight"]), 2), np.float32)}
        with jax.set_mesh(self.mesh):
            batch = sharding.global_batch(batch, self.mesh)
            width = batch["input_ids"].shape[-1]
            if width not in self.compiled:
                start = time.perf_counter()
                self.compiled[width] = self.step.lower(self.state, self.ref, batch).compile()
                self.compile_seconds += time.perf_counter() - start
                self.state, metrics = self.compiled[width](self.state, self.ref, batch)  # warm-up
                jax.block_until_ready(metrics)
            start = time.perf_counter()
            self.state, metrics = self.compiled[width](self.state, self.ref, batch)
            jax.block_until_ready(metrics)
            return time.perf_counter() - start


def bench_step(shapes, variants, batch, seq, steps, mesh, dtype, peak, profile) -> dict:
    rows, results = [], {}
    for shape in shapes:
        cfg = SHAPES[shape]
        b = batch or {"tiny": 8, "1b": 8, "3b": 4, "8b": 2}[shape]
        lengths = np.full((b, 2), seq)
        for variant in variants:
            reference, remat, attention = variant.split(":")
            name = f"{shape} {variant}"
            try:
                runner = StepRunner(cfg, run_config(cfg, reference, remat, attention, b), mesh, dtype)
                seconds = [runner.run(synthetic_batch(cfg, lengths, seq)) for _ in range(steps)]
                if profile and variant == variants[-1]:
                    with jax.profiler.trace(profile):
                        runner.run(synthetic_batch(cfg, lengths, seq))
                memory = peak_bytes(runner.compiled[seq]) / GiB
                step_s = float(np.median(seconds))
                flops = dpo.step_flops(cfg, lengths, reference == "live")
                mfu = f"{flops / step_s / (peak * mesh.devices.size):.1%}" if peak else "n/a"
                tps = lengths.sum() / step_s
                rows.append([name, b, seq, runner.compile_seconds, step_s, tps, flops / step_s / 1e12, mfu, memory])
                results[name] = dict(step_s=step_s, tokens_per_s=tps, mfu=mfu)
                del runner
            except Exception as e:  # an out-of-memory variant is a result too
                if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                    raise
                rows.append([name, b, seq, "", "", "", "", "OOM", ""])
    header = ["shape reference:remat:attention", "pairs", "seq", "compile s", "step s", "tokens/s", "TFLOP/s", "MFU", "peak GiB"]
    device = jax.devices()[0].device_kind
    note = (
        f"{mesh.devices.size} x {device}, compute {jnp.dtype(dtype).name}, random weights, full-length rows. MFU: "
        "dpo.step_flops (6N policy + 2N live reference per real token + causal attention) / dense bf16 peak."
    )
    table("DPO train step", header, rows, note)
    return results


# --- padding: max_seq_len against bucketed widths


class SyntheticPairs:
    """Stands in for data.PairDataset with UltraFeedback-like lengths (Llama 3 tokens): prompts ~
    lognormal(median 110) + 30 template tokens, each response ~ lognormal(median 260); pairs over
    max_seq_len dropped, as data.py does."""

    def __init__(self, n: int, max_seq_len: int, vocab: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        prompt = 30 + rng.lognormal(np.log(110), 0.9, n).astype(int)
        lengths = prompt[:, None] + rng.lognormal(np.log(260), 0.75, (n, 2)).astype(int)
        keep = lengths.max(1) <= max_seq_len
        self.lengths, self.prompt = lengths[keep].astype(np.int32), prompt[keep]
        self.path, self.vocab = Path("synthetic"), vocab

    def __len__(self):
        return len(self.lengths)

    def read(self, indices):
        out = []
        for i in indices:
            ids = [np.full(n, 7, np.int32) for n in self.lengths[i]]
            masks = [np.arange(n) >= self.prompt[i] for n in self.lengths[i]]
            out.append((ids[0], masks[0], ids[1], masks[1]))
        return out


def bench_padding(runner_for, batch_size: int, max_seq_len: int, steps: int) -> dict:
    pairs = SyntheticPairs(20_000, max_seq_len, 8192)
    rows, results, batches_counted = [], {}, 100
    for name, bucket in (("pad to max_seq_len", max_seq_len), ("bucketed (data.py, 128)", 128)):
        loader = data.train_batches(
            pairs, np.arange(len(pairs)), batch_size=batch_size, seed=0, max_seq_len=max_seq_len, bucket=bucket
        )
        batches = [next(loader) for _ in range(batches_counted)]
        real = sum(int(b["lengths"].sum()) for b in batches)
        processed = sum(b["input_ids"].size for b in batches)
        runner = runner_for()
        seconds = [runner.run(b) for b in batches[:steps]]
        per_token = sum(seconds) / sum(int(b["lengths"].sum()) for b in batches[:steps])
        rows.append([name, processed / batches_counted, real / processed, len(runner.compiled), per_token * 1e6])
        results[name] = dict(efficiency=real / processed, us_per_real_token=per_token * 1e6)
    # Not in data.py: sorting by length inside windows of 64 batches, then shuffling the batches.
    order = np.argsort(pairs.lengths.max(1)[: 64 * batch_size])
    widths = [min(-(-int(pairs.lengths[c].max()) // 128) * 128, max_seq_len) for c in order.reshape(64, -1)]
    grouped_eff = pairs.lengths[order].sum() / (2 * batch_size * sum(widths))
    rows.append(["length-grouped (simulated, not in data.py)", 2 * batch_size * np.mean(widths), grouped_eff, "", ""])
    note = (
        f"{len(pairs)} synthetic pairs, max_seq_len {max_seq_len}, {batch_size} pairs per batch; tokens over "
        f"{batches_counted} batches; step time over the first {steps} batches of each (compiles not counted)."
    )
    header = ["batches", "processed tokens / batch", "padding efficiency (real/processed)", "widths compiled", "step us / real token"]
    table("Padding: max_seq_len vs bucketed widths (UltraFeedback-like lengths)", header, rows, note)
    return results


# --- compile time against depth


def bench_compile(cfg, mesh, dtype, batch_size: int, seq: int, layer_counts) -> None:
    rows = []
    for layers in layer_counts:
        shape = dataclasses.replace(cfg, num_layers=layers)
        config = run_config(shape, batch_size=batch_size)
        optimizer = dpo.make_optimizer(config)
        zero = jnp.zeros((), jnp.int32)
        with jax.set_mesh(mesh):
            train_step, _ = dpo.make_steps(shape, config, optimizer, dtype)
            init = lambda p: dpo.TrainState(zero, p, optimizer.init(p), zero)
            state = jax.eval_shape(init, model.abstract_params(shape, mesh))  # nothing is allocated
            ref = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype, sharding=s.sharding), state.params)
            batch = sharding.global_batch(synthetic_batch(shape, np.full((batch_size, 2), seq), seq), mesh)
            start = time.perf_counter()
            train_step.lower(state, ref, batch).compile()
            rows.append([layers, time.perf_counter() - start])
    table(f"Compile time of the train step against depth ({cfg.hidden_size}-wide layers, scanned)", ["layers", "compile s"], rows)


# --- memory plan: the largest per-chip batch


def memory_plan_bytes(cfg, seq: int, chips: int, live_reference: bool, flash: bool, chunk: int = 256):
    """(fixed bytes, bytes per pair) on one chip under FSDP over `chips`, remat "full".

    fixed: f32 params, f32 grads, Adam mu and nu (16 bytes/param) and a bf16 reference (2), all sharded;
    one layer's weights gathered in bf16 twice (this one and the next) plus its f32 gradient; the embedding
    table and LM head gathered whole in bf16, with the head's f32 gradient.
    per pair (2 sequences of seq tokens, bf16 activations): every layer's input (what remat "full" keeps);
    one layer's recomputed intermediates and their gradients; without flash attention the f32 [H, T, T]
    scores and their gradient; the LM head's chunk of f32 logits, softmax and gradient; final hidden + grad.
    """
    d, f, v, h, k, q, n_layers = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_heads,
                                  cfg.num_kv_heads, cfg.head_dim, cfg.num_layers)  # fmt: skip
    layer = d * q * (2 * h + 2 * k) + 3 * d * f
    params = n_layers * layer + d * v * (1 if cfg.tie_word_embeddings else 2)
    fixed = (16 + (2 if live_reference else 0)) * params / chips + layer * (2 * 2 + 4) + d * v * (2 + 2 + 4)
    s = 2 * seq
    per_pair = n_layers * s * d * 2 + s * (4 * d + 3 * h * q + 3 * k * q + 3 * f) * 2 * 2 + s * d * 6
    per_pair += 0 if flash else 2 * h * seq * seq * 4 * 2
    per_pair += 2 * min(chunk, seq) * v * 4 * 3
    return fixed, per_pair


def bench_memory(on_accelerator: bool, mesh, dtype) -> None:
    rows = []
    for shape in ("1b", "3b", "8b"):
        for seq in (2048, 4096):
            row = [shape, seq]
            for chip, hbm in CHIPS.items():
                for chips in (1, 8):
                    fits = []
                    for live in (True, False):
                        fixed, per_pair = memory_plan_bytes(SHAPES[shape], seq, chips, live, flash="H100" in chip)
                        fits.append(max(0, int((0.9 * hbm - fixed) // per_pair)))
                    row.append(" / ".join(map(str, fits)))
            rows.append(row)
    header = ["shape", "seq"] + [f"{chip}, {n} chip{'s' * (n > 1)}" for chip in CHIPS for n in (1, 8)]
    note = (
        "COMPUTED, not measured: pairs per chip (live reference / precomputed reference), FSDP over the chips, "
        "remat full, bf16 compute, 10% of HBM left for workspace and fragmentation. GPU with cuDNN flash "
        "attention; TPU with XLA attention (f32 [H, T, T] scores of one layer live). See memory_plan_bytes."
    )
    table("Memory plan: largest per-chip batch (pairs)", header, rows, note)
    if not on_accelerator:
        return
    # Measured: the compiled step's peak on this device, at 1 and 2 pairs per chip, extrapolated linearly.
    device_bytes = jax.devices()[0].memory_stats().get("bytes_limit", 0)
    measured = []
    for shape in ("1b", "3b", "8b"):
        for seq in (2048, 4096):
            peaks = []
            for per_chip in (1, 2):
                b = per_chip * mesh.devices.size
                config = run_config(SHAPES[shape], batch_size=b)
                optimizer = dpo.make_optimizer(config)
                zero = jnp.zeros((), jnp.int32)
                with jax.set_mesh(mesh):
                    train_step, _ = dpo.make_steps(SHAPES[shape], config, optimizer, dtype)
                    init = lambda p, o=optimizer, z=zero: dpo.TrainState(z, p, o.init(p), z)
                    state = jax.eval_shape(init, model.abstract_params(SHAPES[shape], mesh))
                    cast = lambda s: jax.ShapeDtypeStruct(s.shape, dtype, sharding=s.sharding)
                    batch = sharding.global_batch(synthetic_batch(SHAPES[shape], np.full((b, 2), seq), seq), mesh)
                    peaks.append(peak_bytes(train_step.lower(state, jax.tree.map(cast, state.params), batch).compile()))
            fits = int((device_bytes - peaks[0]) // max(peaks[1] - peaks[0], 1)) + 1
            measured.append([shape, seq, peaks[0] / GiB, (peaks[1] - peaks[0]) / GiB, max(fits, 0) if peaks[0] <= device_bytes else 0])
    header = ["shape", "seq", "peak at 1 pair/chip (GiB)", "per extra pair (GiB)", "largest pairs/chip"]
    table(f"Memory plan, MEASURED (compiled memory analysis) on {mesh.devices.size} x {jax.devices()[0].device_kind}", header, measured)


# --- tokenization speed


def bench_tokenize(n_pairs: int) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sys.path.insert(0, str(Path(__file__).parent / "tests"))
    from _data_templates import LLAMA31  # Llama 3.1 Instruct's own chat template

    rng = np.random.default_rng(0)
    syllables = np.array("ka to ri en an the ing ed re co mo la si pe ver tion al er in st pro de com ex un".split())
    words = np.unique(["".join(rng.choice(syllables, rng.integers(1, 5))) for _ in range(40_000)])
    zipf = 1 / np.arange(1, len(words) + 1) ** 1.1
    text = lambda n: " ".join(words[rng.choice(len(words), max(n, 5), p=zipf / zipf.sum())]) + "."
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = []
        for i in range(n_pairs):  # UltraFeedback-sized: ~150-word prompts, ~250-word responses
            prompt = [{"role": "user", "content": text(int(rng.normal(150, 60)))}]
            chosen, rejected = (prompt + [{"role": "assistant", "content": text(int(rng.normal(250, 100)))}] for _ in "cr")
            rows.append({"prompt": prompt[0]["content"], "chosen": chosen, "rejected": rejected, "prompt_id": str(i)})
        pq.write_table(pa.Table.from_pylist(rows), tmp / "pairs.parquet")
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=specials, show_progress=False)
        tokenizer.train_from_iterator((r["chosen"][1]["content"] for r in rows[:3000]), trainer)
        (tmp / "tok").mkdir()
        tokenizer.save(str(tmp / "tok" / "tokenizer.json"))
        config = {"bos_token": specials[0], "eos_token": specials[-1], "chat_template": LLAMA31}
        (tmp / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
        start = time.perf_counter()
        summary = data.tokenize(str(tmp / "pairs.parquet"), str(tmp / "tok"), str(tmp / "out"), max_seq_len=4096)
        seconds = time.perf_counter() - start
    lengths = summary["token_length_percentiles"]["chosen"]
    rows = [[n_pairs, summary["rows_written"], seconds, summary["rows_written"] / seconds, f"{lengths['p50']} / {lengths['p90']}"]]
    note = (
        f"{os.cpu_count()} CPU cores; byte-level BPE (32k vocab, trained on the synthetic text) with Llama 3.1's "
        "chat template. Target: 61k pairs in under 2 minutes on 2 cores."
    )
    table("Tokenization (data.tokenize)", ["pairs", "written", "seconds", "pairs/s", "chosen tokens p50 / p90"], rows, note)
    return {"seconds": seconds, "pairs_per_s": summary["rows_written"] / seconds}


# --- XLA flags (GPU): each set needs a fresh process, since XLA reads its flags when it starts

GPU_FLAG_SETS = {
    "none": "",
    "latency hiding scheduler": "--xla_gpu_enable_latency_hiding_scheduler=true",
    "+ no triton gemm": "--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false",
    "+ command buffers off": "--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_command_buffer=",
}


def bench_flags(shape: str, batch: int | None, seq: int, steps: int) -> None:
    rows = []
    for name, flags in GPU_FLAG_SETS.items():
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, __file__, "--only", "step", "--shapes", shape, "--seq", str(seq), "--steps", str(steps)]
            cmd += ["--variants", "live:full:auto", "--json-out", out.name] + (["--batch", str(batch)] if batch else [])
            result = subprocess.run(cmd, env=os.environ | {"XLA_FLAGS": flags}, capture_output=True, text=True)
            if result.returncode:
                rows.append([name, "failed: " + result.stderr.strip().splitlines()[-1][:80], ""])
                continue
            step_row = json.loads(Path(out.name).read_text())[0]["rows"][0]
            rows.append([name, step_row[4], step_row[7]])
    table(f"XLA flags ({shape}, seq {seq}, live reference, remat full)", ["XLA_FLAGS", "step s", "MFU"], rows)


# --- main


def main(args: Args) -> None:
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags
    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    sections = set(args.only.split(","))
    on_cpu = jax.default_backend() == "cpu"
    dtype = jnp.float32 if on_cpu else jnp.bfloat16  # what dpo.py's "auto" picks
    mesh = sharding.make_mesh(1, -1, 1, devices=jax.devices()[:1] if on_cpu else None)
    peak = dpo.peak_flops(jax.devices()[0])
    shapes = (args.shapes or ("tiny" if on_cpu else "1b,3b")).split(",")
    seq = args.seq or (256 if on_cpu else 2048)
    steps = args.steps or (3 if on_cpu else 10)
    variants = (args.variants or ("live:full:auto,precompute:full:auto,live:save_matmuls:auto" + ("" if on_cpu else ",live:full:xla,precompute:save_matmuls:auto"))).split(",")
    print(f"# bench.py on {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    summary = {}
    if "logps" in sections:
        summary["logps"] = bench_logps(on_cpu, dtype, args)
    if "step" in sections:
        summary["step"] = bench_step(shapes, variants, args.batch, seq, steps, mesh, dtype, peak, args.profile)
    if "padding" in sections:
        cfg = SHAPES[shapes[0]]
        b = args.batch or (4 if on_cpu else 8)
        runner_for = lambda: StepRunner(cfg, run_config(cfg, batch_size=b), mesh, dtype)
        summary["padding"] = bench_padding(runner_for, b, 2048, steps)
    if "compile" in sections:
        layer_counts = (2, 8, 32) if on_cpu else (4, 16, 32)
        bench_compile(SHAPES[shapes[0]], mesh, dtype, args.batch or 8, seq, layer_counts)
    if "memory" in sections:
        bench_memory(not on_cpu, mesh, dtype)
    if "tokenize" in sections:
        summary["tokenize"] = bench_tokenize(args.tokenize_pairs)
    if "flags" in sections and jax.default_backend() == "gpu":
        bench_flags(shapes[-1], args.batch, seq, steps)
    print("\n## Summary\n\n" + json.dumps(summary, indent=1, default=str))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(TABLES, default=str))


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
