"""TRL 1.16's objective knobs against _loss_reference.py (float64 numpy from TRL's source and the papers):
f-divergences, WPO weighting, LD-DPO (also with prefix sharing and packing), ORPO, TR-DPO's moving reference
(the mixup by hand, and a resume across a sync bit for bit), and their one-line refusals."""

import itertools
import json
import shutil

import _loss_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_packing import LAYOUTS, batch_of, loss_and_grads, pairs  # noqa: F401 (pairs: a fixture)

import bookkeeping
import data
import dpo
import losses
import model
import sharding

ONE_DEVICE = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
B = 6
RNG = np.random.default_rng(5)
POLICY = -30 + 10 * RNG.normal(size=(B, 2))
REFERENCE = POLICY + 3 * RNG.normal(size=(B, 2))
TOKENS = RNG.integers(1, 20, size=(B, 2)).astype(np.float64)
PAIR_WEIGHT = RNG.uniform(0.05, 1.5, size=B)  # WPO's weights may exceed 1 (TRL 1.x does not cap them)


def central_differences(value, x, h=1e-5):
    grad = np.zeros_like(x)
    for i, j in itertools.product(*map(range, x.shape)):
        step = np.zeros_like(x)
        step[i, j] = h
        grad[i, j] = (value(x + step) - value(x - step)) / (2 * h)
    return grad


def check_value_and_gradient(config, want, pair_weight=None):
    """dpo_loss against `want(policy, reference)` (numpy) in value and in its gradient by both inputs, and
    the same with three padding pairs of weight 0 appended."""

    def loss(policy, reference, pad=0):
        extend = lambda x, fill: jnp.concatenate([jnp.asarray(x), jnp.full((pad, *x.shape[1:]), fill)])
        scale = None if pair_weight is None else extend(pair_weight, 7.0)
        args = extend(policy, -5.0), extend(reference, -1.0), extend(TOKENS, 3.0)
        return losses.dpo_loss(*args, extend(np.ones(B), 0.0), config, pair_weight=scale)[0]

    got, grads = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(POLICY), jnp.asarray(REFERENCE))
    assert float(got) == pytest.approx(want(POLICY, REFERENCE), rel=1e-6)
    assert float(loss(POLICY, REFERENCE, pad=3)) == pytest.approx(float(got), rel=1e-6)
    np.testing.assert_allclose(
        grads[0], central_differences(lambda p: want(p, REFERENCE), POLICY), rtol=2e-4, atol=1e-7
    )
    np.testing.assert_allclose(
        grads[1], central_differences(lambda r: want(POLICY, r), REFERENCE), rtol=2e-4, atol=1e-7
    )


@pytest.mark.parametrize(
    "kind, coef", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3)]
)
def test_f_divergences_match_trl_in_value_and_gradient(kind, coef):
    jax.config.update("jax_enable_x64", True)  # central differences of the formula need f64 on both sides
    try:
        knobs = dict(f_divergence_type=kind, f_alpha_divergence_coef=coef)
        for name in [
            n for n, row in losses.LOSSES.items() if row.f_divergence and row.reference
        ]:  # sft below, in a mix
            ls = 0.1 if name in losses.reading("label_smoothing") else 0.0
            config = dpo.Config(
                loss_type=(name,), label_smoothing=ls, f_divergence_type=kind, f_alpha_divergence_coef=coef
            )
            want = lambda p, r, name=name, ls=ls: ref.per_pair_losses(
                name, *p.T, *r.T, *TOKENS.T, 0.1, ls, **knobs
            ).mean()
            check_value_and_gradient(config, want)
        names, weights = ("sigmoid", "ipo", "sft"), (1.0, 0.3, 0.5)
        config = dpo.Config(
            loss_type=names, loss_weights=weights, f_divergence_type=kind, f_alpha_divergence_coef=coef
        )
        terms = lambda p, r: (
            [ref.sft_loss(p[:, 0], TOKENS[:, 0])]
            + [ref.per_pair_losses(n, *p.T, *r.T, *TOKENS.T, 0.1, **knobs).mean() for n in names[:2]]
        )
        check_value_and_gradient(config, lambda p, r: np.dot(np.roll(weights, 1), terms(p, r)))
    finally:
        jax.config.update("jax_enable_x64", False)


def test_wpo_weights_each_pair_without_a_gradient_through_the_weight():
    jax.config.update("jax_enable_x64", True)
    try:
        for names in [("sigmoid",), ("hinge", "sft"), ("simpo",)]:
            config = dpo.Config(loss_type=names, use_weighting=True, loss_weights=(0.7, 0.4)[: len(names)])

            def want(p, r, names=names, w=config.loss_weights):
                args = lambda n: (p[:, 0], TOKENS[:, 0]) if n == "sft" else (*p.T, *r.T, *TOKENS.T, 0.1)
                return sum(
                    wi * ref.weighted_loss(n, PAIR_WEIGHT, *args(n)) for n, wi in zip(names, w, strict=True)
                )

            check_value_and_gradient(config, want, PAIR_WEIGHT)  # simpo's formula ignores the reference
    finally:
        jax.config.update("jax_enable_x64", False)


def test_wpo_weights_from_the_fused_head_match_full_logits():
    """token_logps' WPO statistic against full float64 logits: log p(target) - log sum_v p_v^2, per pair."""
    rng = np.random.default_rng(3)
    n, t, d, v = 4, 9, 16, 70  # rows 2i, 2i + 1: pair i's chosen and rejected
    hidden = rng.normal(size=(n, t, d)).astype(np.float32)
    lm_head = (2 * rng.normal(size=(d, v)) / np.sqrt(d)).astype(np.float32)
    targets = rng.integers(0, v, (n, t))
    mask = rng.random((n, t)) < 0.7
    with jax.set_mesh(ONE_DEVICE):
        _, stats = model.token_logps(hidden, lm_head, targets.astype(np.int32), mask, chunk_size=16)
    per_pair = lambda x: jnp.asarray(x).sum(-1).reshape(2, 2)
    got = losses.wpo_weights(jax.tree.map(per_pair, stats), per_pair(mask.astype(np.float32)))
    chosen_first = [0, 2, 1, 3]
    logits = hidden.astype(np.float64) @ lm_head
    want = ref.wpo_weights(logits[chosen_first], targets[chosen_first], mask[chosen_first])
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5)


def test_ld_dpo_scales_the_verbose_tail_as_trl_and_every_layout_agrees(pairs):  # noqa: F811
    """The log-probs past the shorter side's length count ld_alpha (TRL's shared and tail masks, numpy), and
    prefix sharing and packing give the plain layout's log-probs, loss and gradients."""
    dataset, arch = pairs
    config = dpo.Config(train_data="x", ld_alpha=0.3, logits_chunk_size=64, loss_type=("sigmoid", "ipo"))
    with jax.set_mesh(ONE_DEVICE):
        params, reference = (model.init_params(arch, jax.random.key(seed), ONE_DEVICE) for seed in (0, 1))
        plain = sharding.global_batch(batch_of(dataset), ONE_DEVICE)
        rows = dpo.rows_of(plain)
        hidden = model.forward(params, rows.tokens, arch, compute_dtype=jnp.float32, **rows.inputs)
        head = model.lm_head_weight(params)
        per_token, _ = jax.device_get(model.token_logps(hidden, head, rows.targets, rows.scored, 64))
        scored = np.asarray(rows.scored)
        got = {}
        for layout in (None, *LAYOUTS):
            batch = sharding.global_batch(batch_of(dataset, layout), ONE_DEVICE)
            logps = np.asarray(jax.jit(dpo.pair_logps, static_argnums=(2, 3))(params, batch, arch, config)[0])
            real = np.asarray(dpo.rows_of(batch).weight) > 0
            got[layout] = logps[real][
                np.lexsort(logps[real].T)
            ]  # packed rows hold the pairs in another order
    b = len(per_token) // 2
    chosen_first = np.r_[0 : 2 * b : 2, 1 : 2 * b : 2]
    want = ref.ld_logps(per_token[chosen_first], scored[chosen_first], 0.3).reshape(2, b).T
    np.testing.assert_allclose(got[None], want[np.lexsort(want.T)], rtol=1e-5)
    assert not np.allclose(
        want, ref.ld_logps(per_token[chosen_first], scored[chosen_first], 1.0).reshape(2, b).T
    )
    for layout in LAYOUTS:
        np.testing.assert_allclose(got[layout], got[None], rtol=1e-5, err_msg=layout)
    with jax.set_mesh(ONE_DEVICE):  # loss and gradients, the reference's log-probs scaled the same way
        (plain_loss, plain_grads), (loss, grads) = (
            jax.device_get(
                loss_and_grads(
                    params,
                    sharding.global_batch(batch_of(dataset, kind), ONE_DEVICE),
                    arch,
                    config,
                    reference,
                )
            )
            for kind in (None, "both")
        )
    assert float(loss) == pytest.approx(float(plain_loss), rel=1e-5)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max())


def test_orpo_nll_scores_the_whole_chosen_sequence_as_trl_in_every_layout(pairs):  # noqa: F811
    """ORPO's NLL reads each chosen sequence's every target, prompt included (TRL's ORPOTrainer), against full
    logits in numpy; prefix sharing and packing give the plain layout's sums, and the scored log-probs stay
    the replies' (the same as without ORPO)."""
    dataset, arch = pairs
    config = dpo.Config(train_data="x", loss_type=("orpo",), logits_chunk_size=64)
    with jax.set_mesh(ONE_DEVICE):
        params = model.init_params(arch, jax.random.key(0), ONE_DEVICE)
        plain = sharding.global_batch(batch_of(dataset), ONE_DEVICE)
        rows = dpo.rows_of(plain)
        hidden = model.forward(params, rows.tokens, arch, compute_dtype=jnp.float32, **rows.inputs)
        logits = np.asarray(hidden, np.float64) @ np.asarray(model.lm_head_weight(params), np.float64)
        got, replies = {}, {}
        for layout in (None, *LAYOUTS):
            batch = sharding.global_batch(batch_of(dataset, layout), ONE_DEVICE)
            logps, _, (whole, count) = jax.jit(dpo.pair_logps, static_argnums=(2, 3))(
                params, batch, arch, config
            )
            real = np.asarray(dpo.rows_of(batch).weight) > 0
            got[layout] = np.stack([whole, count], 1)[real][np.lexsort(np.asarray(whole)[real][None])]
            replies[layout] = np.sort(np.asarray(logps)[real].ravel())
    lengths, tokens = np.asarray(plain["lengths"])[:, 0], np.asarray(rows.tokens)[::2]  # the chosen sides
    log_softmax = logits[::2] - np.log(np.exp(logits[::2]).sum(-1, keepdims=True))
    want = []
    for i, n in enumerate(lengths):  # targets 1..n-1, each given the tokens before it
        want.append([log_softmax[i, np.arange(n - 1), tokens[i, 1:n]].sum(), n - 1])
    want = np.array(want)[np.argsort(np.array(want)[:, 0])]
    for layout, value in got.items():
        np.testing.assert_allclose(value, want, rtol=1e-5, err_msg=str(layout))
        np.testing.assert_allclose(replies[layout], replies[None], rtol=1e-5, err_msg=str(layout))
    scored = np.asarray(plain["loss_mask"])[:, 0].sum(-1)
    assert np.all(lengths - 1 > scored)  # the prompts' tokens count too


def test_orpo_loss_and_metrics_match_trl_and_it_runs_without_a_reference(pairs):  # noqa: F811
    config = dpo.Config(loss_type=("orpo",), beta=0.25)
    assert not config.uses_reference
    policy = jnp.asarray(POLICY / 10)  # mean token log-probs near 0 too, where log(1 - exp) needs care
    sequence = POLICY[:, 0] / 10 - 20, TOKENS[:, 0] + 9  # whole chosen sequences: the prompt's tokens too
    stats = model.TokenStats(*[jnp.zeros((B, 2))] * 3)
    logps = dpo.PairLogps(
        policy, None, stats, jnp.asarray(TOKENS), jnp.ones(B), tuple(map(jnp.asarray, sequence))
    )
    with jax.set_mesh(ONE_DEVICE):
        loss, sums = dpo.objective(logps, config)
    metrics = dpo.normalize(sums)
    (pc, pr), (nc, nr) = (POLICY / 10).T, TOKENS.T
    assert float(loss) == pytest.approx(ref.orpo_loss(pc, pr, nc, nr, 0.25, *sequence), rel=1e-5)
    for key, value in ref.orpo_metrics(pc, pr, nc, nr, *sequence).items():
        assert float(metrics[key]) == pytest.approx(value, rel=1e-5), key
    want = ref.implicit_rewards("orpo", pc, pr, None, None, 0.25, nc, nr)
    assert float(metrics["rewards/margins"]) == pytest.approx(np.mean(want[0] - want[1]), rel=1e-5)
    dataset, arch = pairs  # a train step holds and runs no reference
    with jax.set_mesh(ONE_DEVICE):
        optimizer = dpo.make_optimizer(config)
        train_step = dpo.make_steps(arch, config)["training"]
        create = jax.jit(lambda p: dpo.TrainState.create(p, optimizer))  # fresh buffers: donated
        state = create(model.init_params(arch, jax.random.key(0), ONE_DEVICE))
        _, metrics = train_step(
            state,
            dpo.Frozen(None, None),
            config.hyperparameters(),
            sharding.global_batch(batch_of(dataset, "both"), ONE_DEVICE),
        )
    assert np.isfinite(float(metrics["loss"])) and {"log_odds_ratio", "log_odds_chosen", "nll_loss"} <= set(
        metrics
    )
    # the packed rows' empty slots are weight-0 pairs: no NaN gradient from them
    assert np.isfinite(float(metrics["grad_norm"])) and not float(metrics["nonfinite"])


def test_orpo_gradient_matches_trl_and_a_padding_pair_adds_nothing():
    """The gradient over the log-probs (the sides' and the whole chosen sequences') against central
    differences of TRL's formula in float64; a padding pair (log-prob 0 over 0 tokens, weight 0) gets a
    gradient of exactly 0, not NaN."""
    config = dpo.Config(loss_type=("orpo",), beta=0.25)
    policy, tokens = np.vstack([POLICY / 10, [[0.0, 0.0]]]), np.vstack([TOKENS, [[0, 0]]])
    sequence = np.c_[policy[:, 0] - 20, tokens[:, 0] + 9] * np.r_[np.ones(B), 0.0][:, None]  # [logps, tokens]
    weight = jnp.asarray(np.r_[np.ones(B), 0.0])
    loss = lambda x, s: losses.dpo_loss(
        x, None, jnp.asarray(tokens), weight, config, sequence=(s, sequence[:, 1])
    )[0]
    grads = [
        np.asarray(g)
        for g in jax.grad(loss, argnums=(0, 1))(jnp.asarray(policy), jnp.asarray(sequence[:, 0]))
    ]
    assert np.all(grads[0][B:] == 0) and np.all(grads[1][B:] == 0)
    f = lambda x, s: ref.orpo_loss(
        x[:B, 0], x[:B, 1], TOKENS[:, 0], TOKENS[:, 1], 0.25, s[:B], sequence[:B, 1]
    )
    step, want = 1e-6, [np.zeros((B, 2)), np.zeros(B)]
    for i, j in np.ndindex(B, 2):
        bump = np.zeros_like(policy)
        bump[i, j] = step
        want[0][i, j] = (f(policy + bump, sequence[:, 0]) - f(policy - bump, sequence[:, 0])) / (2 * step)
    for i in range(B):
        bump = np.zeros(B + 1)
        bump[i] = step
        want[1][i] = (f(policy, sequence[:, 0] + bump) - f(policy, sequence[:, 0] - bump)) / (2 * step)
    np.testing.assert_allclose(grads[0][:B], want[0], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(grads[1][:B], want[1], rtol=1e-3, atol=1e-6)


def test_wpo_with_sft_over_microbatches_equals_one_batch(pairs):  # noqa: F811
    """sft's WPO term is its batch scalar times the mean weight, a product of whole-batch sums: microbatches
    must give the one batch's loss and gradient."""
    dataset, arch = pairs
    results = []
    for micro in (None, 4):
        settings = dict(train_data="x", train_batch_size=8, use_weighting=True, logits_chunk_size=64)
        config = dpo.Config(microbatch_size=micro, loss_type=("sigmoid", "sft"), **settings)
        with jax.set_mesh(ONE_DEVICE):
            optimizer = dpo.make_optimizer(config)
            train_step = dpo.make_steps(arch, config)["training"]
            create = jax.jit(lambda p, o=optimizer: dpo.TrainState.create(p, o))
            state = create(model.init_params(arch, jax.random.key(0), ONE_DEVICE))
            reference = model.init_params(arch, jax.random.key(1), ONE_DEVICE)
            rows = 1 if micro is None else 2
            batch = sharding.global_batch(batch_of(dataset, "both", row_multiple=rows), ONE_DEVICE)
            results.append(
                jax.device_get(
                    train_step(state, dpo.Frozen(None, reference), config.hyperparameters(), batch)[1]
                )
            )
    for key in ("loss", "grad_norm"):
        assert float(results[1][key]) == pytest.approx(float(results[0][key]), rel=1e-5), key


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(use_weighting=True, loss_type=("aot",)), "use_weighting does not apply to aot"),
        (dict(loss_type=("orpo", "sft")), "orpo is its own objective"),
        (dict(ld_alpha=1.5), "ld_alpha must be in [0, 1]"),
        (dict(ld_alpha=0.5, loss_type=("sigmoid", "sft")), "ld_alpha does not apply to sft"),
        (
            dict(f_divergence_type="js_divergence", loss_type=("bco_pair",)),
            "f_divergence_type js_divergence works with",
        ),
        (dict(sync_ref_model=True, loss_type=("simpo",)), "sync_ref_model moves a reference"),
        (dict(sync_ref_model=True, reference_mode="precompute"), "sync_ref_model needs reference_mode live"),
        (dict(sync_ref_model=True, lora_rank=4), "sync_ref_model with lora_rank is not supported"),
        (dict(ref_model_sync_steps=0, sync_ref_model=True), "ref_model_sync_steps must be > 0"),
        (dict(ref_model_mixup_alpha=0.5), "ref_model_mixup_alpha without sync_ref_model does nothing"),
        (dict(f_alpha_divergence_coef=0.3), "f_alpha_divergence_coef without f_divergence_type alpha_div"),
        (
            dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1e9),
            "f_alpha_divergence_coef must",
        ),
        (
            dict(sync_ref_model=True, ref_model_sync_steps=5, num_train_steps=3),
            "ref_model_sync_steps 5 > num_",
        ),
        (
            dict(f_divergence_type="forward_kl", loss_type=("sft",)),
            "f_divergence_type: the losses given read",
        ),
    ],
)
def test_a_knob_where_it_does_not_apply_is_refused(settings, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        dpo.Config(**settings)
    # where one loss given takes it, a mix is accepted (TRL's too): a knob is refused only where idle
    dpo.Config(loss_type=("sigmoid", "sft"), sync_ref_model=True, f_divergence_type="js_divergence")
    dpo.Config(loss_type=("sigmoid", "hinge"), label_smoothing=0.1)


# --- TR-DPO's moving reference: the mixup by hand, checkpoints that hold it, and an exact resume

SYNC = dict(
    sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.6, learning_rate=1e-3, warmup=0
)
SMALL = dict(train_batch_size=8, num_train_steps=4, max_seq_len=64, logits_chunk_size=32, steps_per_eval=100)
SMALL |= dict(max_eval_batches=1, steps_per_checkpoint=1, keep_checkpoints=4, steps_per_hf_export=100)


def saved(run, step, part):
    folder = run / "checkpoints" / f"step-{step}" / part
    return {str(f.relative_to(folder)): np.load(f) for f in sorted(folder.rglob("*.npy"))}


@pytest.fixture(scope="module")
def synced_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trdpo")
    model_dir, pairs_file = bookkeeping.make_demo(root, seed=0)
    data.tokenize(str(pairs_file), str(model_dir), str(root / "tokenized"), max_seq_len=64)
    config = dpo.Config(
        model_name_or_path=str(model_dir),
        train_data=str(root / "tokenized"),
        output_dir=str(root / "run"),
        **SMALL,
        **SYNC,
    )
    return dpo.main(config), config


def test_the_reference_after_each_sync_is_the_mixup_by_hand(synced_run):
    run, config = synced_run
    mesh = ONE_DEVICE
    start = model.load_params(config.model_name_or_path, model.load_config(config.model_name_or_path), mesh)
    start = {
        f"{bookkeeping._leaf_name(p)}.npy": np.asarray(x)
        for p, x in jax.tree_util.tree_flatten_with_path(start)[0]
    }
    want = start
    for step in range(1, 5):  # synced after steps 2 and 4: a = 0.6 of the policy then, 0.4 of the reference
        if step % 2 == 0:
            want = {k: ref.tr_dpo_sync(saved(run, step, "params")[k], want[k], 0.6) for k in want}
        got = saved(run, step, "reference")
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=f"step {step} {k}")
    assert not np.allclose(saved(run, 4, "reference")["layers/wq.npy"], start["layers/wq.npy"])


def test_a_resume_across_a_sync_is_exact(synced_run):
    """Killed after step 2's checkpoint, just after a sync (the newer checkpoints gone), the run resumes from
    the moved reference it saved, through the sync at step 4, to the same weights and reference, bit for bit,
    and the same losses."""
    run, config = synced_run
    final = {part: saved(run, 4, part) for part in ("params", "reference")}
    lines = (run / "metrics.jsonl").read_text()
    for step in (3, 4):
        shutil.rmtree(run / "checkpoints" / f"step-{step}")
    dpo.main(config)
    for part, arrays in final.items():
        again = saved(run, 4, part)
        for k in arrays:
            np.testing.assert_array_equal(again[k], arrays[k], err_msg=f"{part}/{k}")
    losses = lambda text: [(m["step"], m["loss"]) for m in map(json.loads, text.splitlines()) if "loss" in m]
    assert losses((run / "metrics.jsonl").read_text()) == losses(lines)
