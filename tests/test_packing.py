"""Prefix sharing and packing against the plain layout, the reference: the same sequences rebuilt from the
rows, and the same loss, gradients and metrics (f32, rel 1e-5) with multi-turn rows and system prompts, the
reference live and precomputed, on one device and on 8, over microbatches."""

import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _data_templates import WORDS, build_tokenizer
from _tolerance import assert_metrics_close

import data
import dpo
import losses
import model
import sharding

ONE_DEVICE = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
LAYOUTS = {"sharing": (True, False), "packing": (False, True), "both": (True, True)}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Multi-turn conversations with system prompts and earlier assistant turns (scored on both sides, in
    the shared prefix: scored_turns all), and one-turn ones of varied lengths, tokenized with a ChatML
    template."""
    root = tmp_path_factory.mktemp("packing")
    tokenizer = build_tokenizer(root / "chatml", "chatml")
    rng, rows = np.random.default_rng(0), []
    say = lambda n: " ".join(rng.choice(WORDS, n))
    for i in range(24):
        turns = [{"role": "system", "content": say(3)}] if i % 3 == 0 else []
        for _ in range(i % 3):  # earlier turns
            turns += [{"role": "user", "content": say(4)}, {"role": "assistant", "content": say(5)}]
        turns += [{"role": "user", "content": say(2 + i % 7)}]
        reply = lambda: [{"role": "assistant", "content": say(int(rng.integers(1, 12)))}]
        rows.append({"chosen": turns + reply(), "rejected": turns + reply()})
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data.tokenize(
        str(root / "rows.jsonl"), str(tokenizer), str(root / "out"), max_seq_len=256, scored_turns="all"
    )
    dataset = data.PairDataset(root / "out")
    arch = model.LlamaConfig(
        vocab_size=448,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        initializer_range=0.1,
    )
    assert dataset.summary["max_token_id"] < arch.vocab_size and (dataset.shared > 20).any()
    sides = dataset.read(range(len(dataset)))
    assert any(
        chosen[1][: dataset.shared[k] - 1].any() for k, (chosen, _) in enumerate(sides)
    )  # scored, shared
    return dataset, arch


def batch_of(dataset, layout=None, row_multiple=1, reference=None, size=8):
    loader = data.train_batches(
        dataset,
        range(len(dataset)),
        batch_size=size,
        seed=0,
        max_seq_len=256,
        layout=data.Layout(*LAYOUTS[layout], row_multiple) if layout else None,
        reference=reference,
    )
    return next(loader)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rows_hold_exactly_the_plain_sequences(pairs, layout):
    dataset, _ = pairs
    plain, packed = batch_of(dataset, size=16), batch_of(dataset, layout, row_multiple=2, size=16)
    want = {}  # (chosen tokens, rejected tokens) -> masks, from the plain batch
    for i in range(16):
        sides = [
            (plain["input_ids"][i, s, :n], plain["loss_mask"][i, s, :n])
            for s, n in enumerate(plain["lengths"][i])
        ]
        want[tuple(map(tuple, (sides[0][0], sides[1][0])))] = sides
    got = set()
    for r, j in itertools.product(range(len(packed["weight"])), range(packed["weight"].shape[1])):
        if not packed["weight"][r, j]:
            continue
        sides = []
        for s in range(2):  # each view rebuilt from the row: its tokens, its positions, its scored targets
            at = packed["views"][r, 2 * j + s, : packed["view_lengths"][r, 2 * j + s]]
            ids = packed["input_ids"][r, at]
            assert packed["positions"][r, at].tolist() == list(range(len(at)))
            assert (packed["pair"][r, at] == j).all()
            sides.append(ids)
        key = tuple(map(tuple, sides))
        (chosen, chosen_mask), (rejected, rejected_mask) = want[key]
        got.add(key)
        # A token is scored for a side when its target is, and it is on that side or shared.
        side, mask = packed["side"][r], packed["target_mask"][r]
        for s, plain_mask in enumerate((chosen_mask, rejected_mask)):
            mine = (packed["pair"][r] == j) & ((side == 0) | (side == s + 1))
            assert mask[mine].sum() == plain_mask[1:].sum()
        # Every token reads its attention output from a view slot that holds that very token.
        slots = packed["slot"][r][packed["pair"][r] == j]
        flat = packed["views"][r].reshape(-1)
        assert (packed["input_ids"][r, flat[slots]] == packed["input_ids"][r][packed["pair"][r] == j]).all()
    assert got == set(want)  # every pair once
    if LAYOUTS[layout][0]:  # the shared prompts ran once
        assert (packed["pair"] >= 0).sum() < plain["lengths"].sum()


def test_each_process_loads_its_own_rows_of_the_same_plan(pairs):
    """Two processes' rows, stacked, are the one process's rows: every process plans the same rows from the
    global batch's lengths and fills only its own."""
    dataset, _ = pairs
    kwargs = dict(batch_size=16, seed=0, max_seq_len=256, layout=data.Layout(True, True, row_multiple=2))
    whole = next(data.train_batches(dataset, range(len(dataset)), **kwargs))
    halves = [
        next(data.train_batches(dataset, range(len(dataset)), row_slice=i, row_slices=2, **kwargs))
        for i in range(2)
    ]
    assert set(whole) == set(halves[0])
    for key, value in whole.items():
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), value, err_msg=key)


def test_the_flop_count_of_rows_does_not_wrap_at_a_real_model_size():
    """Rows count the tokens that ran as a traced integer; at Llama 3.1 8B's size the product is ~1e15."""
    arch = model.LlamaConfig(128256, 4096, 14336, 32, 32, 8, 128)
    lengths = np.array([[900, 700], [300, 0]], np.int32)
    flops = jax.jit(lambda t: model.step_flops(arch, lengths, True, tokens=t))(jnp.int32(1500))
    attention = 2 * 32 * 32 * 128 * float((lengths.astype(np.float64) ** 2).sum())
    assert float(flops) == pytest.approx(8 * arch.num_matmul_params * 1500 + 4 * attention, rel=1e-6)
    # Every other layer sliding with a window of 400: its queries past 400 see 400 keys, not all before them,
    # so its part of the square loses the triangle beyond the band ((900 - 400)^2 / 2 and (700 - 400)^2 / 2).
    windowed = dataclasses.replace(
        arch, sliding_window=400, layer_types=("sliding_attention", "full_attention") * 16
    )
    flops = jax.jit(lambda t: model.step_flops(windowed, lengths, True, tokens=t))(jnp.int32(1500))
    band = attention - 2 * 32 * 32 * 128 * (500.0**2 + 300.0**2)
    assert float(flops) == pytest.approx(
        8 * arch.num_matmul_params * 1500 + 4 * (attention + band) / 2, rel=1e-6
    )


def loss_and_grads(params, batch, arch, config, reference):
    """The DPO loss of the batch and its gradient, from dpo.py's pieces."""

    def loss(params):
        policy = dpo.pair_logps(params, batch, arch, config)[0]
        rows = dpo.rows_of(batch)
        ref = rows.ref_logps if "ref_logps" in batch else dpo.pair_logps(reference, batch, arch, config)[0]
        return losses.dpo_loss(policy, jax.lax.stop_gradient(ref), rows.scored_tokens, rows.weight, config)[0]

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("layout, mesh_shape", [("sharing", None), ("packing", None), ("both", (2, 2, 2))])
def test_the_same_loss_and_gradients_as_the_plain_layout(pairs, layout, mesh_shape):
    dataset, arch = pairs
    mesh = ONE_DEVICE if mesh_shape is None else sharding.make_mesh(*mesh_shape)
    devices = mesh.shape["data"] * mesh.shape["fsdp"]
    config = dpo.Config(loss_type=("sigmoid", "sft", "ipo"), logits_chunk_size=64, train_data="x")
    with jax.set_mesh(mesh):
        params, reference = (model.init_params(arch, jax.random.key(seed), mesh) for seed in (0, 1))
        results = []
        for kind in (None, layout):
            batch = sharding.global_batch(batch_of(dataset, kind, row_multiple=devices), mesh)
            results.append(jax.device_get(loss_and_grads(params, batch, arch, config, reference)))
    (plain_loss, plain_grads), (loss, grads) = results
    assert float(loss) == pytest.approx(float(plain_loss), rel=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_train_and_eval_steps_match_with_microbatches_and_a_precomputed_reference(pairs, layout="both"):
    dataset, arch = pairs
    mesh = sharding.make_mesh(1, 4, 2)
    table = np.random.default_rng(2).normal(-40, 5, (len(dataset), 2)).astype(np.float32)  # stands in for one
    runs = []
    for kind, micro in ((None, None), (layout, None), (layout, 4)):
        config = dpo.Config(
            train_data="x",
            train_batch_size=8,
            microbatch_size=micro,
            loss_type=("aot", "sigmoid"),
            logits_chunk_size=64,
            reference_mode="precompute",
            learning_rate=1e-3,
            warmup=0,
        )
        optimizer = dpo.make_optimizer(config)
        with jax.set_mesh(mesh):
            steps = dpo.make_steps(arch, config)
            train_step, eval_step = steps["training"], steps["evaluation"]
            state = jax.jit(lambda p, o=optimizer: dpo.TrainState.create(p, o))(
                model.init_params(arch, jax.random.key(0), mesh)
            )
            rows = 4 * (micro and config.train_batch_size // micro or 1)
            batch = sharding.global_batch(batch_of(dataset, kind, row_multiple=rows, reference=table), mesh)
            sums = jax.device_get(
                eval_step(state.params, dpo.Frozen(None, None), config.hyperparameters(), batch)
            )
            _, metrics = train_step(state, dpo.Frozen(None, None), config.hyperparameters(), batch)
            runs.append((dpo.normalize(sums), jax.device_get(metrics)))
    keys = ("loss", "rewards/margins", "logps/chosen", "entropy", "mean_token_accuracy", "logits/rejected")
    for (sums, metrics), (plain_sums, plain_metrics) in zip(runs[1:], [runs[0]] * 2, strict=True):
        # loss and margins cancel: to the rounding floor of their log-probs (tests/_tolerance.py)
        assert_metrics_close(sums, plain_sums, keys, config.beta, losses=2)
        assert_metrics_close(metrics, plain_metrics, (*keys, "grad_norm"), config.beta, losses=2)
        assert float(metrics["tokens"]) == float(
            plain_metrics["tokens"]
        )  # the pairs' tokens, as plain counts them
        assert float(metrics["flops"]) < float(plain_metrics["flops"])  # but fewer ran: the prompts once


def test_evaluation_runs_in_training_microbatches(pairs):
    """A run that fits in memory by microbatches must not evaluate train_batch_size pairs at once (#32):
    the eval program's temporary memory with microbatch_size is below the whole batch's, its sums the same."""
    dataset, arch = pairs
    temp, metrics = [], []
    with jax.set_mesh(ONE_DEVICE):
        params, reference = (model.init_params(arch, jax.random.key(seed), ONE_DEVICE) for seed in (0, 1))
        batch = sharding.global_batch(batch_of(dataset), ONE_DEVICE)
        for micro in (None, 2):
            config = dpo.Config(
                train_data="x", train_batch_size=8, microbatch_size=micro, logits_chunk_size=64
            )
            eval_step = dpo.make_steps(arch, config)["evaluation"]
            compiled = eval_step.lower(
                params, dpo.Frozen(None, reference), config.hyperparameters(), batch
            ).compile()
            temp.append(compiled.memory_analysis().temp_size_in_bytes)
            metrics.append(
                dpo.normalize(
                    jax.device_get(
                        compiled(params, dpo.Frozen(None, reference), config.hyperparameters(), batch)
                    )
                )
            )
    assert temp[1] < temp[0], temp
    assert_metrics_close(metrics[1], metrics[0], metrics[0].keys(), config.beta)


def test_packed_evaluation_leaves_out_the_fill_up_copies_and_sums_the_same(pairs):
    """An eval pass whose last batch is filled up with weight-0 copies: packed rows hold only the real pairs
    of it, and the eval metrics equal the plain layout's."""
    dataset, arch = pairs
    config = dpo.Config(logits_chunk_size=64, train_data="x", train_batch_size=8)
    batches = lambda layout: data.eval_batches(
        dataset, range(11), batch_size=8, max_seq_len=256, layout=layout
    )
    with jax.set_mesh(ONE_DEVICE):
        params, reference = (model.init_params(arch, jax.random.key(seed), ONE_DEVICE) for seed in (0, 1))
        eval_step = dpo.make_steps(arch, config)["evaluation"]
        plain, packed = (
            dpo.evaluate(
                eval_step,
                params,
                dpo.Frozen(None, reference),
                config.hyperparameters(),
                {"the pairs": batches(layout)},
                ONE_DEVICE,
            )
            for layout in (None, data.Layout(True, True))
        )
    last = list(batches(data.Layout(True, True)))[-1]
    assert (last["view_lengths"] > 0).sum() == 2 * 3  # the tail's 3 real pairs, chosen and rejected
    # rewards and the loss cancel: to the rounding floor of their log-probs (tests/_tolerance.py, #26)
    assert_metrics_close(packed, plain, plain.keys(), config.beta)
