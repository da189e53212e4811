"""The loss family and TRL's metrics against _loss_reference.py (float64 numpy written from TRL's source and
the papers): each loss's value and gradient, their weighted sum, padding, the token metrics against full
logits, the whole-batch losses on a mesh and over microbatches against one device, and SimPO without a
reference."""

import itertools
import json

import _loss_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_metrics_close

import bookkeeping
import data
import dpo
import losses
import model
import sharding

ONE_DEVICE = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
B = 6
RNG = np.random.default_rng(0)
POLICY = -30 + 10 * RNG.normal(size=(B, 2))  # summed log-probs: chosen, rejected
REFERENCE = POLICY + 3 * RNG.normal(size=(B, 2))
TOKENS = RNG.integers(1, 20, size=(B, 2)).astype(np.float64)
# ORPO's NLL: each whole chosen sequence's log-probs and targets, prompt included
SEQUENCE = POLICY[:, 0] - 25 + 5 * RNG.normal(size=B), TOKENS[:, 0] + RNG.integers(5, 30, size=B)


def reference_loss(name, policy, reference, beta, ls, tau=0.05, gamma=0.5):
    """The numpy reference's batch loss for one loss type."""
    (pc, pr), (rc, rr), (nc, nr) = policy.T, reference.T, TOKENS.T
    if name == "aot":
        return ref.aot_loss(pc, pr, rc, rr, beta, ls)
    if name == "aot_unpaired":
        return ref.aot_unpaired_loss(pc, pr, rc, rr, beta, ls)
    if name == "sft":
        return ref.sft_loss(pc, nc)
    if name == "orpo":
        return ref.orpo_loss(pc, pr, nc, nr, beta, *SEQUENCE)
    return ref.per_pair_losses(name, pc, pr, rc, rr, nc, nr, beta, ls, tau, gamma).mean()


def ours(name, ls, **config):
    config = dpo.Config(loss_type=(name,), label_smoothing=ls, **config)
    reference = None if not config.uses_reference else jnp.asarray(REFERENCE, jnp.float32)

    sequence = tuple(map(jnp.asarray, SEQUENCE)) if losses.reads_sequence(config.loss_type) else None

    def loss(policy, reference):
        return losses.dpo_loss(policy, reference, jnp.asarray(TOKENS), jnp.ones(B), config, sequence=sequence)

    return loss, jnp.asarray(POLICY, jnp.float32), reference


@pytest.mark.parametrize("name", tuple(losses.LOSSES))
def test_every_loss_matches_its_formula_in_value_and_gradient(name):
    beta, ls = 0.1, 0.1 if name in losses.reading("label_smoothing") else 0.0
    loss, policy, reference = ours(name, ls, beta=beta)
    value = lambda p, r: reference_loss(name, p, r, beta, ls)
    (got, rewards), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(policy, reference)
    assert float(got) == pytest.approx(value(POLICY, REFERENCE), rel=1e-5)
    # The gradient with respect to the four log-prob inputs, against central differences of the formula.
    for which, grad in enumerate(grads):
        want = np.zeros((B, 2))
        for i, j in itertools.product(range(B), range(2)):
            step = np.zeros((B, 2))
            step[i, j] = 1e-5
            inputs = [POLICY, REFERENCE]
            up = value(*[x + step if k == which else x for k, x in enumerate(inputs)])
            down = value(*[x - step if k == which else x for k, x in enumerate(inputs)])
            want[i, j] = (up - down) / 2e-5
        if grad is None:  # no reference at all: the formula does not depend on it either
            np.testing.assert_allclose(want, 0, atol=1e-9)
            continue
        np.testing.assert_allclose(np.asarray(grad), want, rtol=2e-4, atol=1e-6, err_msg=f"d/d input {which}")
    # TRL's implicit rewards: beta * (policy - reference) summed; SimPO's per token, without a reference.
    want = ref.implicit_rewards(name, *POLICY.T, *REFERENCE.T, beta, *TOKENS.T)
    if name == "sft":  # alone it has no reference either: rewards as SimPO's (dpo_loss's docstring)
        want = ref.implicit_rewards("simpo", *POLICY.T, *REFERENCE.T, beta, *TOKENS.T)
    np.testing.assert_allclose(np.asarray(rewards), np.stack(want, 1), rtol=1e-5)


def test_several_losses_sum_with_their_weights_and_padding_changes_nothing():
    names, weights = ("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0)  # MPO's mix
    config = dpo.Config(loss_type=names, loss_weights=weights, beta=0.2)
    args = jnp.asarray(POLICY), jnp.asarray(REFERENCE), jnp.asarray(TOKENS)
    loss = float(losses.dpo_loss(*args, jnp.ones(B), config)[0])
    want = ref.combined_loss(names, *POLICY.T, *REFERENCE.T, *TOKENS.T, 0.2, loss_weights=weights)
    parts = [
        float(losses.dpo_loss(*args, jnp.ones(B), dpo.Config(loss_type=(n,), beta=0.2))[0]) for n in names
    ]
    assert loss == pytest.approx(want, rel=1e-5) and loss == pytest.approx(np.dot(weights, parts), rel=1e-6)
    # Pairs of weight 0 (an evaluation batch's padding) count for nothing, in the sorted losses too.
    for names in [("sigmoid", "sft"), ("aot",), ("aot_unpaired", "ipo")]:
        config = dpo.Config(loss_type=names, beta=0.2)
        padded = [jnp.concatenate([x, x[:3]]) for x in args]
        with_padding = losses.dpo_loss(*padded, jnp.concatenate([jnp.ones(B), jnp.zeros(3)]), config)[0]
        assert float(with_padding) == pytest.approx(
            float(losses.dpo_loss(*args, jnp.ones(B), config)[0]), rel=1e-6
        )


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(loss_type=("exo_pair",)), "exo_pair needs 0 < label_smoothing < 1"),
        (dict(loss_type=("robust",), label_smoothing=0.5), "label_smoothing must be in [0, 0.5)"),
        (dict(loss_type=("hinge",), label_smoothing=0.1), "label_smoothing is used by"),
        (
            dict(loss_type=("sigmoid", "sft"), loss_weights=(1.0,)),
            "loss_weights needs one weight per loss_type",
        ),
        (dict(loss_type=("sigmoid", "sigmoid")), "name each loss once"),
    ],
)
def test_a_loss_outside_its_range_is_refused(settings, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        dpo.Config(**settings)


@pytest.mark.parametrize("use_weighting", [False, True])
def test_a_loss_couples_the_batch_exactly_where_its_row_says(use_weighting):
    """A loss whose gradient over two microbatches (each with the whole batch's totals, as the step takes it)
    differs from the whole batch's couples the pairs, and its row must say so, or the step would silently
    train another objective; a row that says so must couple them (the step then takes the slow path)."""
    rng = np.random.default_rng(7)
    policy, reference = rng.normal(-30, 10, (8, 2)), rng.normal(-30, 10, (8, 2))
    tokens, pair_weight = rng.integers(1, 20, (8, 2)).astype(np.float64), rng.uniform(0.2, 1.0, 8)
    for name, row in losses.LOSSES.items():
        if use_weighting and not row.weighted:
            continue
        ls = 0.1 if "label_smoothing" in row.knobs else 0.0
        config = dpo.Config(loss_type=(name,), label_smoothing=ls, use_weighting=use_weighting)
        ref_logps = jnp.asarray(reference) if row.reference else None
        sequence = (jnp.asarray(policy[:, 0] - 40), jnp.asarray(tokens[:, 0] + 30)) if row.sequence else None
        totals = (jnp.float32(8), jnp.sum(jnp.asarray(tokens)[:, 0]), row.sequence and jnp.sum(sequence[1]))

        def grad(rows, totals=None, config=config, ref_logps=ref_logps, sequence=sequence):
            scale = jnp.asarray(pair_weight[rows]) if use_weighting else None
            loss = lambda p: losses.dpo_loss(
                p,
                None if ref_logps is None else ref_logps[rows],
                jnp.asarray(tokens[rows]),
                jnp.ones(len(rows)),
                config,
                totals,
                scale,
                None if sequence is None else tuple(x[rows] for x in sequence),
            )[0]
            return np.asarray(jax.grad(loss)(jnp.asarray(policy[rows], jnp.float32)))

        whole = grad(np.arange(8))
        halves = np.concatenate([grad(np.arange(0, 8, 2), totals), grad(np.arange(1, 8, 2), totals)])
        halves[np.r_[0:8:2, 1:8:2]] = halves.copy()
        coupled = not np.allclose(halves, whole, rtol=1e-5, atol=1e-7)
        assert coupled == losses.couples_batch((name,), use_weighting), (name, use_weighting)
        # a whole-sequence NLL has its gradient only where the step sums per-pair terms (grads_whole_batch
        # differentiates the replies' log-probs alone)
        assert not (row.sequence and row.couples != "never"), name


def test_token_accuracy_counts_a_tie_for_the_first_index_only():
    """TRL's mean_token_accuracy is argmax(logits) == target, torch's argmax taking the first index of the
    maximum: a tie is a hit only for that index. (A collapsed model, all logits equal, read 1.0.) Small whole
    numbers make every logit exact in f32, so the ties are exact in the kernel and in numpy alike."""
    rng = np.random.default_rng(6)
    n, t, d, v = 3, 8, 4, 50
    hidden = rng.integers(-3, 4, size=(n, t, d)).astype(np.float32)
    lm_head = np.zeros((d, v), np.float32)
    lm_head[:, 5] = lm_head[:, 37] = rng.integers(-3, 4, size=d)  # tied at the top where positive
    targets = rng.choice([0, 1, 5, 37, 49], size=(n, t)).astype(np.int32)
    mask = rng.random((n, t)) < 0.8
    for head in (np.zeros_like(lm_head), lm_head):  # every logit equal; two columns tied, in other chunks
        logits = hidden.astype(np.float64) @ head
        want = (np.argmax(logits, axis=-1) == targets) & mask  # np.argmax: the first index, as torch
        with jax.set_mesh(ONE_DEVICE):
            _, stats = model.token_logps(hidden, head, targets, mask, chunk_size=16)
        np.testing.assert_array_equal(np.asarray(stats.argmax_hit), want.astype(np.float32))
        assert float(stats.argmax_hit.sum()) / mask.sum() == ref.mean_token_accuracy(logits, targets, mask)


def test_token_metrics_match_full_logits():
    rng = np.random.default_rng(3)
    n, t, d, v = 4, 9, 16, 70
    hidden = rng.normal(size=(n, t, d)).astype(np.float32)
    lm_head = (2 * rng.normal(size=(d, v)) / np.sqrt(d)).astype(np.float32)
    logits = hidden.astype(np.float64) @ lm_head
    targets = np.where(rng.random((n, t)) < 0.4, logits.argmax(-1), rng.integers(0, v, (n, t)))  # some hits
    mask = rng.random((n, t)) < 0.7
    with jax.set_mesh(ONE_DEVICE):
        logps, stats = model.token_logps(hidden, lm_head, targets.astype(np.int32), mask, chunk_size=16)
    logps, stats = logps.sum(-1), jax.tree.map(lambda x: x.sum(-1), stats)  # 0 where not scored: per row
    for row in range(n):  # the kernel's per-row sums over the scored tokens, divided by their count
        one = lambda fn, *args, row=row: fn(*(x[row : row + 1] for x in args))
        count = mask[row].sum()
        assert float(stats.mean_logit[row]) / count == pytest.approx(
            one(ref.logits_mean_metric, logits, mask), rel=1e-5
        )
        assert float(stats.entropy[row]) / count == pytest.approx(
            one(ref.entropy_metric, logits, mask), rel=1e-5
        )
        assert float(stats.argmax_hit[row]) / count == one(ref.mean_token_accuracy, logits, targets, mask)
        assert float(logps[row]) == pytest.approx(
            one(ref.sequence_logps, logits, targets, mask)[0][0], rel=1e-5
        )
    # Through metric_sums: rows 0, 1 are pair 0's chosen and rejected, rows 2, 3 pair 1's; TRL's definitions.
    pairs = lambda x: jnp.asarray(x).reshape(2, 2, *x.shape[1:])
    tokens = pairs(mask.sum(-1).astype(np.float32))
    metrics = dpo.normalize(
        dpo.metric_sums(pairs(logps), jnp.zeros((2, 2)), jax.tree.map(pairs, stats), tokens, jnp.ones(2))
    )
    chosen, rejected = [0, 2], [1, 3]
    want = {
        "logits/chosen": ref.logits_mean_metric(logits[chosen], mask[chosen]),
        "logits/rejected": ref.logits_mean_metric(logits[rejected], mask[rejected]),
        "entropy": ref.entropy_metric(logits, mask),
        "mean_token_accuracy": ref.mean_token_accuracy(logits[chosen], targets[chosen], mask[chosen]),
    }
    for key, value in want.items():
        assert float(metrics[key]) == pytest.approx(value, rel=1e-5), key


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("losses")
    model_dir, pairs = bookkeeping.make_demo(root, seed=0)
    data.tokenize(str(pairs), str(model_dir), str(root / "tokenized"), max_seq_len=64)
    return model_dir, data.PairDataset(root / "tokenized")


def one_step(demo, mesh, batch=None, **settings):
    """Metrics of one train step of the demo model on `batch` (default: its first batch of 16 pairs), and
    the batch."""
    model_dir, dataset = demo
    small = dict(train_batch_size=16, max_seq_len=64, logits_chunk_size=32, learning_rate=1e-2, warmup=0)
    config = dpo.Config(model_name_or_path=str(model_dir), train_data="x", **small, **settings)
    if batch is None:
        batch = next(data.train_batches(dataset, range(len(dataset)), batch_size=16, seed=0, max_seq_len=64))
    arch, optimizer = model.load_config(model_dir), dpo.make_optimizer(config)
    with jax.set_mesh(mesh):
        train_step = dpo.make_steps(arch, config)["training"]
        state = jax.jit(lambda p: dpo.TrainState.create(p, optimizer))(
            model.load_params(model_dir, arch, mesh)
        )
        # A reference that differs from the policy, so that the log-ratios are not all zero.
        reference = model.init_params(arch, jax.random.key(1), mesh) if config.uses_reference else None
        state, metrics = train_step(
            state, dpo.Frozen(None, reference), config.hyperparameters(), sharding.global_batch(batch, mesh)
        )
    return jax.device_get(metrics), batch


def test_whole_batch_losses_on_a_mesh_and_over_microbatches_equal_one_device(demo):
    """'The batch' of aot and sft is the global batch of the step: the same number on one device, on 8
    devices (data, fsdp and tensor), and in 2 microbatches of 8 pairs on 8 devices, beside a pair loss."""
    loss_type = ("aot", "aot_unpaired", "sft", "sigmoid")
    base, _ = one_step(demo, ONE_DEVICE, loss_type=loss_type)
    for mesh, micro in [
        (sharding.make_mesh(2, 2, 2), None),
        (sharding.make_mesh(1, 8, 1), 8),
        (ONE_DEVICE, 4),
    ]:
        metrics, _ = one_step(demo, mesh, loss_type=loss_type, microbatch_size=micro)
        keys = ("loss", "grad_norm", "rewards/margins", "logps/rejected", "entropy", "mean_token_accuracy")
        # loss and margins cancel: to the rounding floor of their log-probs (aot, aot_unpaired and sigmoid
        # are sigmoid-shaped; sft has no cancellation and rides on the relative tolerance)
        assert_metrics_close(metrics, base, keys, beta=0.1, atol=1e-7, losses=3)


def test_simpo_holds_no_reference_and_counts_6n_flops(demo, tmp_path, monkeypatch):
    metrics, batch = one_step(demo, ONE_DEVICE, loss_type=("simpo",))
    arch = model.load_config(demo[0])
    lengths = batch["lengths"].astype(np.float64)
    attention = 2 * arch.num_layers * arch.num_heads * arch.head_dim * (lengths**2).sum()
    assert float(metrics["flops"]) == pytest.approx(
        6 * arch.num_matmul_params * lengths.sum() + 3 * attention
    )
    loaded, real = [], model.load_params
    monkeypatch.setattr(
        model, "load_params", lambda path, *a, **k: loaded.append(path) or real(path, *a, **k)
    )
    run = tmp_path / "run"
    settings = dict(model_name_or_path=str(demo[0]), train_data=str(demo[1].path), output_dir=str(run))
    small = dict(
        train_batch_size=8, max_seq_len=64, logits_chunk_size=32, num_train_steps=2, max_eval_batches=1
    )
    dpo.main(dpo.Config(**settings, **small, loss_type=("simpo",)))  # no reference is loaded or computed
    assert loaded == [demo[0]]  # the policy's weights, once
    assert not (demo[1].path / "reference").exists()  # nor a reference pass
    # Reference settings do nothing for a reference-free loss: refused in one line (#32), not ignored.
    for setting in [
        dict(reference_mode="precompute"),
        dict(reference_model_path="x"),
        dict(reference_dtype="float32"),
    ]:
        with pytest.raises(ValueError, match="read no reference"):
            dpo.Config(**settings, **small, loss_type=("simpo",), **setting)


def test_a_changed_loss_is_refused_on_resume(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    first = dpo.Config(
        train_data="x", output_dir=str(run), loss_type=("sigmoid", "sft"), loss_weights=(1.0, 0.5)
    )
    (run / "config.json").write_text(json.dumps(json.loads(json.dumps(vars(first)))))
    bookkeeping.check_run_dir(run, first)  # the same losses read back from JSON (lists, not tuples): accepted
    for change in [dict(loss_type=("ipo", "sft")), dict(loss_weights=(1.0, 0.2))]:
        with pytest.raises(ValueError, match="holds a run with a different config"):
            bookkeeping.check_run_dir(run, dpo.Config(**vars(first) | change))


def test_the_command_line_takes_several_losses_and_help_lists_them():
    args = ["--config.model-name-or-path", "m", "--config.train-data", "d", "--config.loss-type", "sigmoid"]
    args += ["bco_pair", "sft", "--config.loss-weights", "0.8", "0.2", "1.0"]
    config = dpo.parse_args(args)
    assert config.loss_type == ("sigmoid", "bco_pair", "sft") and config.loss_weights == (0.8, 0.2, 1.0)
    assert dpo.parse_args(args[:6]).loss_type == ("sigmoid",)  # one name stays the simple case
    with pytest.raises(SystemExit):
        dpo.parse_args(["--help"])


def test_the_same_pairs_give_the_same_loss_and_gradient_at_every_width(demo):
    """A batch padded wider than it needs (what the loader's widths do) changes no number, f32."""
    _, dataset = demo
    batch = next(data.train_batches(dataset, range(len(dataset)), batch_size=16, seed=0, max_seq_len=64))
    width, results = batch["input_ids"].shape[-1], []
    for pad in (0, 8, 64 - width):
        padded = dict(
            batch, **{k: np.pad(batch[k], ((0, 0), (0, 0), (0, pad))) for k in ("input_ids", "loss_mask")}
        )
        results.append(one_step(demo, ONE_DEVICE, batch=padded, loss_type=("sigmoid", "sft"))[0])
    keys = ("loss", "grad_norm", "rewards/chosen", "logps/rejected", "entropy", "mean_token_accuracy")
    for other in results[1:]:  # the loss and rewards/chosen cancel: to their log-probs' rounding floor
        assert_metrics_close(other, results[0], keys, beta=0.1)
