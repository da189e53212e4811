"""The context axis: each row's tokens split over devices between blocks, attention gathering the row's keys
and values whole. A step on meshes with a context axis against the single-device step (f32), in every
layout, with LoRA; the per-device memory of a long row; a resume onto another mesh_context."""

import dataclasses
import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from _tolerance import assert_metrics_close
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_packing import batch_of, pairs  # noqa: F401  (the fixture: multi-turn ChatML pairs and a tiny model)
from test_train import SMALL, assert_same_losses, demo, run  # noqa: F401  (demo: the fixture)

import data
import dpo
import model
import sharding

ONE_DEVICE = dict(fsdp=1, devices=jax.devices()[:1])
KEYS = ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected", "entropy")


def step_metrics(arch, config, mesh_sizes, batch, lora: bool):
    """One train step's metrics on a mesh of `mesh_sizes` (random weights, a reference apart; with LoRA the
    base is the reference and the adapters train)."""
    mesh = sharding.make_mesh(**mesh_sizes)
    optimizer = dpo.make_optimizer(config)
    with jax.set_mesh(mesh):
        weights = model.init_params(arch, jax.random.key(0), mesh)
        table = model.lora_weights(arch, 4, tuple(model.LORA_TARGETS)) if lora else None
        trained = model.init_params(arch, jax.random.key(2), mesh, table) if lora else weights
        state = jax.jit(lambda p: dpo.TrainState.create(p, optimizer))(trained)
        frozen = (
            dpo.Frozen(weights, weights)
            if lora
            else dpo.Frozen(None, model.init_params(arch, jax.random.key(1), mesh))
        )
        step = dpo.make_steps(arch, config)["training"]
        return jax.device_get(
            step(state, frozen, config.hyperparameters(), sharding.global_batch(batch, mesh))[1]
        )


# Microbatches (2 of 4 pairs), and a loss that couples the batch's pairs (AOT: the gradient of the whole batch
# taken over microbatches), with prefix sharing and packing.
MICRO, COUPLED = dict(microbatch_size=4), dict(microbatch_size=4, loss_type=("sigmoid", "aot"))


@pytest.mark.parametrize(
    "layout, meshes, lora, settings",
    [
        (None, [dict(fsdp=1, context=8), dict(data=2, fsdp=1, context=2, tensor=2)], False, {}),
        ("sharing", [dict(fsdp=1, context=8), dict(data=2, fsdp=1, context=2, tensor=2)], False, MICRO),
        ("packing", [dict(fsdp=1, context=8), dict(data=2, fsdp=1, context=2, tensor=2)], False, COUPLED),
        ("both", [dict(fsdp=2, context=4), dict(fsdp=2, context=2, tensor=2)], True, {}),
    ],
)
def test_a_step_on_a_context_axis_equals_the_single_device_step(
    pairs,  # noqa: F811
    layout,
    meshes,
    lora,
    settings,
    monkeypatch,
):
    """Rows of uneven lengths with padding, split into 2 to 8 chunks of tokens (pairs and views straddle
    them): loss, gradient norm and metrics as on one device, to the rounding floor (tests/_tolerance.py).
    The second mesh runs "chunked" attention, in blocks of 32 keys (several a row, the last one padded)."""
    monkeypatch.setattr(model, "ATTENTION_BLOCK", 32)
    dataset, arch = pairs
    config = dpo.Config(
        train_data="x", train_batch_size=8, logits_chunk_size=64, lora_rank=4 if lora else 0, **settings
    )
    # Rows a multiple of 4 (2 microbatches on up to 2 batch devices), widths of 8: every context size here
    # splits them evenly.
    loader = (
        data.Layout(*(dict(sharing=(1, 0), packing=(0, 1), both=(1, 1))[layout]), 4, 8) if layout else None
    )
    batch = next(
        data.train_batches(dataset, range(len(dataset)), batch_size=8, seed=0, max_seq_len=256, layout=loader)
    )
    width = batch["input_ids"].shape[-1]
    assert width % 8 == 0 and (batch.get("views") is None or batch["views"].shape[-1] % 8 == 0)
    want = step_metrics(arch, config, ONE_DEVICE, batch, lora)
    for sizes, attention in zip(meshes, ("auto", "chunked"), strict=True):
        got = step_metrics(arch, dataclasses.replace(config, attention_impl=attention), sizes, batch, lora)
        assert_metrics_close(got, want, KEYS, config.beta, losses=len(config.loss_type))


def test_a_context_axis_splits_the_parameters_and_a_long_rows_memory(pairs):  # noqa: F811
    """FSDP spans fsdp x context: on (1, 2, 4, 1) each device holds 1/8 of every weight split over FSDP, and
    the compiled step's arguments (params, reference, Adam state) on (1, 1, 8, 1) take about 1/8 of one
    device's. Its temporary memory per device for one pair of 2048-token sides: at most about 1/4 on
    (1, 1, 8, 1) of one device's (the attention scores of each device's queries, against the whole row)."""
    _, arch = pairs
    mesh = sharding.make_mesh(fsdp=2, context=4)
    params = model.init_params(arch, jax.random.key(0), mesh)
    specs = jax.tree.leaves(
        model.param_specs(arch), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    split = [x for x, spec in zip(jax.tree.leaves(params), specs, strict=True) if model.FSDP in spec]
    assert len(split) >= 8  # the projections, the embedding (the LM head when untied)
    for x in split:
        assert all(shard.data.size * 8 == x.size for shard in x.addressable_shards), jax.typeof(x)
    config = dpo.Config(train_data="x", train_batch_size=1, logits_chunk_size=64, prefix_sharing=False)
    temporary, arguments = [], []
    for sizes in (ONE_DEVICE, dict(fsdp=1, context=8)):
        mesh = sharding.make_mesh(**sizes)
        optimizer = dpo.make_optimizer(config)
        with jax.set_mesh(mesh):
            params = model.abstract_params(arch, mesh)
            state = jax.eval_shape(lambda p, o=optimizer: dpo.TrainState.create(p, o), params)
            batch = sharding.global_batch(data.blank_batch(data.Shape(1, 2048)), mesh)
            step = dpo.make_steps(arch, config)["training"]
            lowered = step.lower(state, dpo.Frozen(None, params), config.hyperparameters(), batch)
            memory = lowered.compile().memory_analysis()
        # The batch (one row, whole on every device) is an argument too: the params' part is the rest.
        batch_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(batch))
        arguments.append(memory.argument_size_in_bytes - batch_bytes)
        temporary.append(memory.temp_size_in_bytes)
    # Norm scales and scalars stay whole on every device: a little over 1/8.
    assert arguments[0] / 8 <= arguments[1] <= arguments[0] / 8 * 1.05, arguments
    assert temporary[1] <= temporary[0] / 4, temporary


def test_a_run_resumed_on_another_context_axis_takes_the_same_steps(demo, tmp_path):  # noqa: F811
    """A run stopped at its step-2 checkpoint and resumed with mesh_context 4 instead of 2 (an operational
    field: the same numbers up to float rounding) takes the steps the uninterrupted run took."""
    settings = dict(num_train_steps=4, steps_per_checkpoint=2, lr_schedule="constant", cooldown=0)
    straight = run(demo, tmp_path / "straight", mesh_context=2, **settings)
    run(demo, tmp_path / "resumed", mesh_context=2, **settings | dict(num_train_steps=2))
    resumed = run(demo, tmp_path / "resumed", mesh_context=4, **settings)
    assert_same_losses(resumed, straight)
    evals = lambda lines: [m["eval/loss"] for m in lines if "eval/loss" in m]
    np.testing.assert_allclose(evals(resumed)[-1], evals(straight)[-1], rtol=1e-5)


def test_rows_of_131072_tokens_go_through_data_py_the_loader_and_rope(demo, tmp_path):  # noqa: F811
    """A pair whose sides run to 131072 tokens: tokenized (nothing dropped at max_seq_len 131072), planned
    and laid out at a width a context axis of 8 splits; and RoPE with Llama 3.1's rescaling at positions up
    to 131071 gives transformers' angles (its f32 positions times its frequencies)."""
    model_dir, _ = demo
    words = "bread cheese rice apple nut cake".split()
    side = lambda n: " ".join(words[i % len(words)] for i in range(n))
    row = {"prompt": "please tell me some foods", "chosen": side(131000), "rejected": side(70000)}
    (tmp_path / "long.jsonl").write_text(json.dumps(row) + "\n")
    data.tokenize(str(tmp_path / "long.jsonl"), str(model_dir), str(tmp_path / "out"), max_seq_len=131072)
    dataset = data.PairDataset(tmp_path / "out")
    assert len(dataset) == 1 and 131000 < int(dataset.lengths.max()) <= 131072
    layout = data.Layout(row_multiple=1, width_multiple=8)
    batch = next(data.train_batches(dataset, [0], batch_size=1, seed=0, max_seq_len=131072, layout=layout))
    assert batch["input_ids"].shape == (1, 2, 131072) and batch["lengths"].max() == dataset.lengths.max()
    hf_config = transformers.LlamaConfig(
        vocab_size=8, hidden_size=64, num_attention_heads=1, head_dim=64, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )  # fmt: skip
    positions, llama = np.array([[0, 4095, 8192, 65536, 131071]]), transformers.models.llama.modeling_llama
    cos, sin = llama.LlamaRotaryEmbedding(hf_config)(torch.zeros(1), torch.tensor(positions))
    x = np.random.default_rng(0).normal(size=(1, 5, 1, 64)).astype(np.float32)  # [B, T, heads, Q]
    theirs = llama.apply_rotary_pos_emb(*[torch.tensor(x).transpose(1, 2)] * 2, cos, sin)[0].transpose(1, 2)
    angles = positions.astype(np.float32)[..., None] * model.rope_inverse_frequencies(
        model.LlamaConfig.from_hf(hf_config.to_dict())
    )  # as model.forward computes them, in f32
    ours = model.apply_rope(jnp.asarray(x), jnp.cos(angles), jnp.sin(angles))
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-5)


def attention_and_grads(impl, sizes, q, k, v, lengths, window=None, cap=None, dtype=jnp.float32):
    """model._attention's output and the gradients of a weighted sum of it (real tokens only) on a mesh, in
    `dtype` (the results in f32)."""
    mesh = sharding.make_mesh(**sizes)
    heads, row = P(sharding.BATCH_AXES, "context", "tensor", None), P(sharding.BATCH_AXES)
    real = np.arange(q.shape[1]) < (q.shape[1] if lengths is None else lengths[:, None])
    weights = np.random.default_rng(1).normal(size=q.shape).astype(np.float32) * real[..., None, None]
    with jax.set_mesh(mesh):
        put = lambda x, spec: None if x is None else jax.device_put(x, NamedSharding(mesh, spec))

        def weighted(q, k, v, lengths):
            out = model._attention(*(x.astype(dtype) for x in (q, k, v)), lengths, impl, window, None, cap)
            return jnp.sum(out.astype(jnp.float32) * weights), out.astype(jnp.float32)

        grads = jax.jit(jax.grad(weighted, argnums=(0, 1, 2), has_aux=True))
        (d_q, d_k, d_v), out = grads(*(put(x, heads) for x in (q, k, v)), put(lengths, row))
        return [np.asarray(x) for x in (out * real[..., None, None], d_q, d_k, d_v)]


@pytest.mark.parametrize("window, cap, lengths", [(None, None, True), (70, None, True), (None, 20.0, False)])
def test_chunked_attention_equals_xlas_and_holds_a_fraction_of_its_memory(window, cap, lengths, monkeypatch):
    """ "chunked" (FlashAttention-2's online softmax and recomputing backward, in jnp) against XLA's
    attention on one device: outputs and q, k, v gradients with grouped heads, rows of uneven length (one
    blank), a sliding window, Gemma 2's soft cap; blocks of 64 keys (the last one padded) on one device and
    split over context and tensor. In bf16, as close to the f32 answer as XLA's attention in bf16 is. Then
    the compiled gradient's temporary memory for an 8192-token row."""
    monkeypatch.setattr(model, "ATTENTION_BLOCK", 64)
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(4, 200, heads, 16)).astype(np.float32) for heads in (4, 2, 2))
    row_lengths = np.array([200, 131, 1, 64], np.int32) if lengths else None
    want = attention_and_grads("xla", ONE_DEVICE, q, k, v, row_lengths, window, cap)
    for sizes in (ONE_DEVICE, dict(fsdp=1, context=8), dict(data=2, fsdp=1, context=2, tensor=2)):
        got = attention_and_grads("chunked", sizes, q, k, v, row_lengths, window, cap)
        for name, ours, theirs in zip(("out", "d_q", "d_k", "d_v"), got, want, strict=True):
            np.testing.assert_allclose(
                ours, theirs, rtol=1e-5, atol=2e-6 * np.abs(theirs).max(), err_msg=name
            )
    if window is None and cap is None:
        bf16 = [
            attention_and_grads(i, ONE_DEVICE, q, k, v, row_lengths, dtype=jnp.bfloat16)
            for i in ("xla", "chunked")
        ]
        for name, xla, chunked, f32 in zip(("out", "d_q", "d_k", "d_v"), *bf16, want, strict=True):
            error = lambda x, f32=f32: np.abs(x - f32).max() / np.abs(f32).max()
            assert error(chunked) <= 2 * error(xla), (name, error(chunked), error(xla))
        monkeypatch.setattr(model, "ATTENTION_BLOCK", 512)
        row = jax.ShapeDtypeStruct((1, 8192, 4, 16), jnp.float32)
        total = lambda q, k, v, impl: jnp.sum(model._attention(q, k, v, None, impl))
        with jax.set_mesh(sharding.make_mesh(**ONE_DEVICE)):
            grads = [jax.jit(jax.grad(partial(total, impl=i), argnums=(0, 1, 2))) for i in ("xla", "chunked")]
            temp = [g.lower(row, row, row).compile().memory_analysis().temp_size_in_bytes for g in grads]
        assert temp[1] <= temp[0] / 8, temp
