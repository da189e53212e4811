"""The math of dpo.py against independent references: the fused log-probs against full logits and
log_softmax, the losses against their formulas written out by hand, the schedule against its
definition."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import dpo
import losses
import model
import sharding

ONE_DEVICE = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def naive_logps(hidden, lm_head, targets, mask):
    logits = jnp.einsum("ntd,dv->ntv", hidden, lm_head)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask, picked, 0.0), axis=-1)


def random_inputs(seed, n=6, t=20, d=16, v=50):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(n, t, d)).astype(np.float32)
    lm_head = (rng.normal(size=(d, v)) / np.sqrt(d)).astype(np.float32)
    targets = rng.integers(0, v, size=(n, t)).astype(np.int32)
    lengths = rng.integers(3, t + 1, size=n)
    # Right padding plus a prompt that is not scored, as data.py produces.
    mask = (np.arange(t) < lengths[:, None] - 1) & (np.arange(t) >= 2)
    return hidden, lm_head, targets, mask


@pytest.mark.parametrize("chunk", [4, 7, 20, 64])  # divides T, does not divide T, equals T, exceeds T
def test_fused_logps_equal_naive_in_value_and_gradient(chunk):
    hidden, lm_head, targets, mask = random_inputs(chunk)
    cotangent = np.random.default_rng(1).normal(size=hidden.shape[0]).astype(np.float32)

    def weighted(fn):
        return lambda h, w: jnp.sum(cotangent * fn(h, w, targets, mask))

    fused = lambda h, w, t, m: model.token_logps(h, w, t, m, chunk_size=chunk)[0].sum(-1)
    with jax.set_mesh(ONE_DEVICE):
        value = model.token_logps(hidden, lm_head, targets, mask, chunk_size=chunk)[0].sum(-1)
        grads = jax.grad(weighted(fused), argnums=(0, 1))(hidden, lm_head)
    np.testing.assert_allclose(value, naive_logps(hidden, lm_head, targets, mask), rtol=1e-5, atol=1e-4)
    expected = jax.grad(weighted(naive_logps), argnums=(0, 1))(hidden, lm_head)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [8, 12])  # 12: chunks padded inside each tensor shard
def test_fused_logps_on_a_mesh_equal_naive_in_value_and_gradient(chunk):
    hidden, lm_head, targets, mask = random_inputs(3, n=8, t=16, d=16, v=64)
    loss = lambda fn: lambda h, w: jnp.sum(jnp.arange(8.0) * fn(h, w, targets, mask))
    expected = jax.value_and_grad(loss(naive_logps), argnums=(0, 1))(hidden, lm_head)
    fused = lambda h, w, t, m: model.token_logps(h, w, t, m, chunk_size=chunk)[0].sum(-1)
    with jax.set_mesh(sharding.make_mesh(2, 2, 2)):
        batch = P(("data", "fsdp"))
        hidden_s, head_s = jax.device_put(hidden, batch), jax.device_put(lm_head, P(None, "tensor"))
        targets, mask = jax.device_put(targets, batch), jax.device_put(mask, batch)
        value, grads = jax.jit(jax.value_and_grad(loss(fused), argnums=(0, 1)))(hidden_s, head_s)
        assert jax.typeof(grads[1]).sharding.spec == P(None, "tensor")  # sharded like the head
    np.testing.assert_allclose(value, expected[0], rtol=1e-5)
    for got, want in zip(grads, expected[1], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fused_logps_in_bfloat16_stay_close_to_the_f32_formula():
    hidden, lm_head, targets, mask = random_inputs(5, n=4, t=32, d=32, v=300)
    loss = lambda fn: lambda h, w: jnp.sum(fn(h, w, targets, mask))
    want, want_grads = jax.value_and_grad(loss(naive_logps), argnums=(0, 1))(hidden, lm_head)
    fused = lambda h, w, t, m: model.token_logps(h, w, t, m, chunk_size=64)[0].sum(-1)
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    with jax.set_mesh(ONE_DEVICE):
        got, grads = jax.value_and_grad(loss(fused), argnums=(0, 1))(bf16(hidden), bf16(lm_head))
    assert grads[0].dtype == grads[1].dtype == jnp.bfloat16
    assert abs(float(got) - float(want)) <= 1e-2 * abs(float(want))
    for g, w in zip(grads, want_grads, strict=True):
        error = np.linalg.norm(np.asarray(g, np.float32) - w) / np.linalg.norm(w)
        assert error < 2e-2, error


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def one_pair_loss(pc, pr, rc, rr, tokens=(1, 1), **config):
    """dpo_loss of a batch holding just this pair, and its rewards."""
    pair = lambda *x: jnp.array([x], jnp.float32)
    loss, rewards = losses.dpo_loss(
        pair(pc, pr), pair(rc, rr), pair(*tokens), jnp.ones(1), dpo.Config(**config)
    )
    return float(loss), np.asarray(rewards[0])


@pytest.mark.parametrize(
    "loss_type,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)]
)
def test_dpo_loss_matches_the_formulas(loss_type, smoothing):
    beta = 0.3
    pc, pr, rc, rr = (np.array([-12.0, -30.5, -7.25]), np.array([-15.0, -28.0, -7.0]),
                      np.array([-13.0, -29.0, -8.0]), np.array([-14.0, -29.5, -6.5]))  # fmt: skip
    tokens = np.array([[3, 5], [8, 2], [1, 1]])
    for i in range(3):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        if loss_type == "sigmoid":
            want = -(1 - smoothing) * log_sigmoid(beta * h) - smoothing * log_sigmoid(-beta * h)
        elif loss_type == "ipo":  # TRL's IPO: each side's log-ratio per scored token
            want = ((pc[i] - rc[i]) / tokens[i, 0] - (pr[i] - rr[i]) / tokens[i, 1] - 1 / (2 * beta)) ** 2
        else:
            want = max(0.0, 1 - beta * h)
        config = dict(beta=beta, loss_type=(loss_type,), label_smoothing=smoothing)
        loss, rewards = one_pair_loss(pc[i], pr[i], rc[i], rr[i], tokens[i], **config)
        assert loss == pytest.approx(want, rel=1e-6)
        assert rewards[0] == pytest.approx(beta * (pc[i] - rc[i])) and rewards[1] == pytest.approx(
            beta * (pr[i] - rr[i])
        )


def test_dpo_loss_gradient_pushes_chosen_up_and_rejected_down():
    loss = lambda policy: losses.dpo_loss(
        policy, jnp.zeros((1, 2)), jnp.ones((1, 2)), jnp.ones(1), dpo.Config()
    )[0]
    d_chosen, d_rejected = jax.grad(loss)(jnp.array([[-10.0, -10.0]]))[0]
    # At equal log-ratios the sigmoid loss is log 2 with slope -beta/2 for chosen, +beta/2 for rejected.
    assert float(d_chosen) == pytest.approx(-0.05) and float(d_rejected) == pytest.approx(0.05)


def test_pair_metrics_follow_the_guide_definitions():
    config = dpo.Config(beta=0.5)
    policy = jnp.array([[-1.0, -3.0], [-2.0, -1.0], [-5.0, -5.0]])
    reference = jnp.array([[-2.0, -2.0], [-2.0, -2.0], [-5.0, -5.0]])
    weight = jnp.array([1.0, 1.0, 0.0])  # the third pair is padding and must not count
    tokens, stats = jnp.ones((3, 2)), model.TokenStats(*[jnp.zeros((3, 2))] * 3)
    _, rewards = losses.dpo_loss(policy, reference, tokens, weight, config)
    sums = dpo.metric_sums(policy, rewards, stats, tokens, weight)
    assert float(sums["pairs"]) == 2
    assert float(sums["rewards/chosen"]) == pytest.approx(0.5 * (1 + 0))
    assert float(sums["rewards/rejected"]) == pytest.approx(0.5 * (-1 + 1))
    assert float(sums["rewards/accuracies"]) == 1  # pair 0: 0.5 > -0.5; pair 1: 0 > 0.5 is false
    assert float(sums["rewards/margins"]) == pytest.approx(1.0 + -0.5)
    assert float(sums["logps/chosen"]) == pytest.approx(-3.0)


def test_schedule_warmup_linear_decay_and_cooldown():
    config = dpo.Config(
        learning_rate=1.0,
        num_train_steps=100,
        warmup=0.1,
        cooldown=0.2,
        min_lr_ratio=0.1,
        lr_schedule="linear",
    )
    lr = lambda s: float(config.lr_at(s))
    assert lr(0) == 0 and lr(5) == pytest.approx(0.5) and lr(10) == pytest.approx(1.0)
    # Linear from the peak at step 10 toward 0.1 at step 100, until the cooldown starts at step 80...
    assert lr(50) == pytest.approx(1.0 - 0.9 * 40 / 90)
    at80 = 1.0 - 0.9 * 70 / 90
    assert lr(80) == pytest.approx(at80)
    # ...then linearly from there to min_lr at the last step.
    assert lr(90) == pytest.approx(at80 + (0.1 - at80) * 0.5) and lr(100) == pytest.approx(0.1)


def test_constant_schedule_with_cooldown_is_warmup_stable_decay():
    config = dpo.Config(learning_rate=2.0, num_train_steps=10, warmup=2, cooldown=4, lr_schedule="constant")
    lrs = [float(config.lr_at(s)) for s in range(11)]
    np.testing.assert_allclose(lrs, [0, 1, 2, 2, 2, 2, 2, 1.5, 1, 0.5, 0], atol=1e-6)


def test_cosine_schedule_ends_at_min_lr():
    config = dpo.Config(learning_rate=1.0, num_train_steps=20, warmup=0, cooldown=0, lr_schedule="cosine",
                        min_lr_ratio=0.25)  # fmt: skip
    lr = lambda s: float(config.lr_at(s))
    assert lr(0) == pytest.approx(1.0) and lr(10) == pytest.approx(0.625) and lr(20) == pytest.approx(0.25)
