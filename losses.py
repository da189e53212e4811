"""The objective: the loss family as one table (LOSSES, a row per loss: its formula and properties), the
config's checks read off the rows, and the loss of a batch (dpo_loss).

Adding a loss is its row here (and, if it brings a knob, a Config field in dpo.py that the row names), its
independent formula in tests/_loss_reference.py and its line in docs/losses.md; tests/test_losses.py holds
each row's formula to that reference and its `couples` to its gradients over microbatches. Imports neither
dpo nor bookkeeping: the config is read by field name. Left out on purpose: losses that need more than the
summed log-probs of two responses (KTO's unpaired data, BCO's running mean), TRL's experimental trainers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

log_s, s = jax.nn.log_sigmoid, jax.nn.sigmoid


class Terms(NamedTuple):
    """What a row's formula reads, each [B] unless said: c and r are the log-ratios policy - reference of
    each pair's chosen and rejected (a reference-free loss reads the policy's log-probs there)."""

    b: float  # beta
    ls: float  # label_smoothing
    c: jax.Array
    r: jax.Array
    bh: jax.Array  # b (score(c) - score(r)): b (c - r) under reverse_kl, else f-DPO's (f_divergence_score)
    per_token: jax.Array  # score(c) / tokens_chosen - score(r) / tokens_rejected
    policy: jax.Array  # [B, 2] the policy's log-probs
    reference: jax.Array  # [B, 2] the reference's (zeros without one)
    tokens: jax.Array  # [B, 2] scored tokens, at least 1
    nll: jax.Array  # scalar: the chosen tokens' mean negative log-likelihood over the batch (RPO's term)
    sequence_nll: (
        jax.Array | None
    )  # the same over the whole chosen sequences, prompt included (sequence rows)
    mean: Callable  # x [B] -> its mean over the batch's pairs (WPO-weighted with use_weighting)
    weights_mean: jax.Array | float  # WPO's pair weights' mean over the batch (1.0 without use_weighting)
    ranked: Callable  # x [B] -> sorted over the real pairs, padding last (the batch losses' matching)
    rank_mean: Callable  # ranked x [B] -> its mean over the real pairs
    config: object  # a row's own knobs


def cdpo(z, ls):
    """The logistic loss with label smoothing ls (cDPO, Mitchell 2023): -(1 - ls) log s(z) - ls log s(-z)."""
    return -(1 - ls) * log_s(z) - ls * log_s(-z)


def exo_pair(t: Terms):
    return s(t.bh) * (log_s(t.bh) - jnp.log1p(-t.ls)) + s(-t.bh) * (log_s(-t.bh) - jnp.log(t.ls))


def robust(t: Terms):
    return (-(1 - t.ls) * log_s(t.bh) + t.ls * log_s(-t.bh)) / (1 - 2 * t.ls)


def discopop(t: Terms):
    m = s(t.bh / t.config.discopop_tau)
    return -log_s(t.bh) * (1 - m) + jnp.exp(-t.bh) * m


def simpo(t: Terms):  # its per-token margin has no reference
    margin = t.policy[:, 0] / t.tokens[:, 0] - t.policy[:, 1] / t.tokens[:, 1]
    return cdpo(t.b * margin - t.config.simpo_gamma, t.ls)


def aot(t: Terms):
    policy, reference = t.policy[:, 0] - t.policy[:, 1], t.reference[:, 0] - t.reference[:, 1]
    return t.rank_mean(cdpo(t.b * (t.ranked(policy) - t.ranked(reference)), t.ls))


def aot_unpaired(t: Terms):
    return t.rank_mean(cdpo(t.b * (t.ranked(t.c) - t.ranked(t.r)), t.ls))


def below_half(config) -> str | None:  # cDPO's smoothing: at 0.5 and past it the labels flip
    ls = config.label_smoothing
    return None if 0 <= ls < 0.5 else f"label_smoothing must be in [0, 0.5), got {ls}"


def in_open_unit(config) -> str | None:  # EXO's log(ls) and log(1 - ls)
    ls = config.label_smoothing
    return None if 0 < ls < 1 else f"exo_pair needs 0 < label_smoothing < 1, got {ls}"


@dataclasses.dataclass(frozen=True)
class Loss:
    """A row of the loss family: its formula and what it reads and needs."""

    # Terms -> each pair's loss [B], averaged over the pairs, or the batch's loss (a scalar) where the pairs
    # do not each have one
    formula: Callable[[Terms], jax.Array]
    paper: str
    reference: bool = True  # reads the reference's log-probs
    f_divergence: bool = False  # built on h: another f_divergence_type applies (f-DPO's normaliser cancels)
    weighted: bool = True  # WPO's pair weights apply (use_weighting)
    # Couples the batch's pairs ("always"; "weighted": with use_weighting): its gradient is then no sum of
    # per-pair terms, and the step takes it on the whole batch, over microbatches too.
    couples: Literal["never", "always", "weighted"] = "never"
    alone: bool = False  # its own objective: not summed with others
    sequence: bool = False  # reads sequence_nll: the step then scores every token of the chosen sequences
    knobs: tuple[str, ...] = ()  # the Config fields it reads that not every loss does
    requires: Callable | None = None  # config -> its refusal in one line, or None
    metrics: Callable | None = None  # (policy, tokens, weight, sequence) -> its own metric sums, as dpo's


def orpo_metrics(policy, tokens, weight, sequence) -> dict:
    """TRL's ORPO metrics, as sums over the pairs (nll_loss over the chosen sequences' tokens)."""
    odds = jax.lax.stop_gradient(log_odds(policy, tokens))
    nll = -jnp.sum(weight * jax.lax.stop_gradient(sequence[0]))
    sums = dict(log_odds_ratio=jnp.sum(weight * log_s(odds)), log_odds_chosen=jnp.sum(weight * odds))
    return sums | {"nll_loss": nll, "tokens/chosen_sequence": jnp.sum(weight * sequence[1])}


SMOOTHING = ("label_smoothing",)
SMOOTHED, F = dict(knobs=SMOOTHING, requires=below_half), dict(f_divergence=True)
# The table. b = beta, ls = label_smoothing, s = the sigmoid; Terms says what c, r, bh and per_token are.
LOSSES = {
    "sigmoid": Loss(lambda t: cdpo(t.bh, t.ls), "DPO, Rafailov 2023", **F, **SMOOTHED),
    "hinge": Loss(lambda t: jax.nn.relu(1 - t.bh), "SLiC, Zhao 2023", **F),
    # per token, as IPO's authors confirmed to TRL (beta carries over lengths)
    "ipo": Loss(lambda t: (t.per_token - 1 / (2 * t.b)) ** 2, "IPO, Azar 2023", **F),
    "exo_pair": Loss(exo_pair, "EXO, Ji 2024", **F, knobs=SMOOTHING, requires=in_open_unit),
    "nca_pair": Loss(
        lambda t: -log_s(t.b * t.c) - 0.5 * log_s(-t.b * t.c) - 0.5 * log_s(-t.b * t.r), "NCA, Chen 2024"
    ),
    "robust": Loss(robust, "robust DPO, Chowdhury 2024", **F, **SMOOTHED),
    "bco_pair": Loss(lambda t: -log_s(t.b * t.c) - log_s(-t.b * t.r), "BCO, Jung 2024 (no running mean)"),
    "sppo_hard": Loss(lambda t: (t.c - 0.5 / t.b) ** 2 + (t.r + 0.5 / t.b) ** 2, "SPPO, Wu 2024"),
    "apo_zero": Loss(lambda t: 1 - s(t.b * t.c) + s(t.b * t.r), "APO, D'Oosterlinck 2024"),
    "apo_down": Loss(lambda t: s(t.b * t.c) + 1 - s(t.bh), "APO, D'Oosterlinck 2024"),
    "discopop": Loss(discopop, "DiscoPOP, Lu 2024", **F, knobs=("discopop_tau",)),
    "sigmoid_norm": Loss(lambda t: -log_s(t.b * t.per_token), "length-normalised DPO, Tulu 3", **F),
    "simpo": Loss(
        simpo, "SimPO, Meng 2024", reference=False, knobs=(*SMOOTHING, "simpo_gamma"), requires=below_half
    ),
    # the sft term minus b log s(the log odds ratio of the sides' mean token probabilities), as TRL
    "orpo": Loss(
        lambda t: t.sequence_nll - t.b * t.mean(log_s(log_odds(t.policy, t.tokens))),
        "ORPO, Hong 2024 (TRL's ORPOTrainer)",
        reference=False,
        weighted=False,
        alone=True,
        sequence=True,  # TRL: "orpo chosen nll loss is computed over the full prompt and response"
        metrics=orpo_metrics,
    ),
    # margins matched by rank over the whole batch (every device and microbatch of the step)
    "aot": Loss(aot, "AOT, Melnyk 2024", weighted=False, couples="always", **SMOOTHED),
    "aot_unpaired": Loss(
        aot_unpaired, "AOT, Melnyk 2024 (unpaired)", weighted=False, couples="always", **SMOOTHED
    ),
    # the chosen tokens' mean NLL (RPO's term); under WPO times the weights' mean, as TRL: a batch product
    "sft": Loss(lambda t: t.nll * t.weights_mean, "RPO, Pang 2024", reference=False, **F, couples="weighted"),
}


def f_divergence_score(x, config):
    """TRL's score of a log-ratio x under config.f_divergence_type (f-DPO, Wang 2023: f'(policy / ref))."""
    kind, a = config.f_divergence_type, config.f_alpha_divergence_coef
    if kind == "forward_kl":
        return 1 - jnp.exp(-x)
    if kind == "js_divergence":
        return jnp.log(2.0) + log_s(x)
    if kind == "alpha_divergence":  # a = 1 is its limit, reverse_kl; `a` is a step's input (dpo.SWEPT)
        limit = jnp.abs(a - 1) < 1e-6
        d = jnp.where(limit, 1.0, a - 1)  # finite where its branch is not taken, so is the gradient
        return jnp.where(limit, x, jnp.expm1(jnp.minimum(d * x, 80.0)) / d)  # capped as TRL, to stay finite
    return x


def log_odds(policy, tokens):
    """ORPO's log odds ratio of each pair [B]: log(p / (1 - p)) of chosen minus rejected, p = exp(mean token
    log-prob). log(1 - exp(x)) is written -expm1 near 0 and log1p further out, as TRL's log1mexp."""
    mean_logp = policy / jnp.maximum(tokens, 1)
    # Each branch sees only inputs it is finite at: where's gradient is 0 times the branch not taken, NaN
    # when that is inf (a padding pair's mean log-prob is 0, where log1p(-exp(x)) is -inf).
    far = mean_logp < -math.log(2)
    near = jnp.minimum(jnp.where(far, -1.0, mean_logp), -1e-30)  # a mean log-prob of exactly 0 has odds +inf
    log1mexp = jnp.where(far, jnp.log1p(-jnp.exp(jnp.where(far, mean_logp, -1.0))), jnp.log(-jnp.expm1(near)))
    odds = mean_logp - log1mexp
    return odds[:, 0] - odds[:, 1]


def wpo_weights(stats, tokens) -> jax.Array:
    """WPO's pair weights [B] (Zhou 2024, Eq. 2, as TRL 1.16): per side, exp of the mean over its scored
    tokens of log p(token) - log sum_v p(v)^2 (the policy's probability, aligned to its own sampling), chosen
    times rejected; gradient-free, lengths clamped at 1 as TRL, no cap on the product (TRL 1.x has none)."""
    return jnp.exp(jnp.sum(stats.wpo / jnp.maximum(tokens, 1), axis=1))


# --- the config's checks and properties, read off the rows


def uses_reference(loss_type) -> bool:
    return any(LOSSES[name].reference for name in loss_type)


def reads_sequence(loss_type) -> bool:
    return any(LOSSES[name].sequence for name in loss_type)


def couples_batch(loss_type, use_weighting: bool) -> bool:
    """Whether the loss couples the batch's pairs (a row's `couples`), so that microbatches cannot each take
    their own share of the gradient."""
    coupling = ("always", "weighted") if use_weighting else ("always",)
    return any(LOSSES[name].couples in coupling for name in loss_type)


def reading(knob: str) -> list[str]:
    """The losses whose row names `knob` among the Config fields it reads."""
    return [name for name, row in LOSSES.items() if knob in row.knobs]


def need(ok, message: str) -> None:
    """A config refusal: one line, no traceback."""
    if not ok:
        raise ValueError(message)


def check(config) -> None:
    """The objective's settings, each refused in one line where TRL refuses it or where it would do nothing:
    a knob that no loss given reads, a row's own condition, a feature that a loss given does not take."""
    losses, weights, kind = config.loss_type, config.loss_weights, config.f_divergence_type
    need(losses, f"loss_type names no loss; give one or more of {' '.join(LOSSES)}")
    need(len(losses) == len(set(losses)), f"loss_type {losses}: name each loss once")
    need(weights is None or len(weights) == len(losses), "loss_weights needs one weight per loss_type")
    need(all(map(math.isfinite, weights or ())), f"loss_weights must be finite, got {weights}")
    need(weights is None or min(weights) >= 0, f"loss_weights must be >= 0, got {weights}")
    need(weights is None or max(weights) > 0, f"loss_weights {weights} are all 0: nothing would train")
    given = lambda *fields: [f for f in fields if getattr(config, f) != getattr(type(config), f)]
    for knob in given(*dict.fromkeys(k for row in LOSSES.values() for k in row.knobs)):
        need(set(reading(knob)) & set(losses), f"{knob} is used by {', '.join(reading(knob))} only")
    for name in losses:
        need(not LOSSES[name].alone or len(losses) == 1, f"{name} is its own objective (TRL's): alone")
        need(not (refusal := LOSSES[name].requires and LOSSES[name].requires(config)), refusal)
    # A setting that every loss given must take: (it is on, the row's property it needs, the refusal).
    # ld_alpha: TRL's sft reads the unscaled log-probs, which the step does not keep apart.
    f_rows = ", ".join(name for name, row in LOSSES.items() if row.f_divergence)
    f_losses = f"f_divergence_type {kind} works with {f_rows} only, not {{}}"
    for on, flag, refusal in [
        (config.use_weighting, "weighted", "use_weighting does not apply to {}"),
        (config.ld_alpha is not None, "reference", "ld_alpha does not apply to {}"),
        (kind != "reverse_kl", "f_divergence", f_losses),
    ]:
        lacking = [name for name in losses if not getattr(LOSSES[name], flag)]
        need(not on or not lacking, refusal.format(", ".join(lacking)))
    need(uses_reference(losses) or not config.sync_ref_model, "sync_ref_model moves a reference: none read")
    # f_divergence_type scores log-ratios: sft admits it beside others, but alone reads no reference
    idle = given("reference_mode", "reference_model_path", "reference_dtype", "f_divergence_type")
    need(uses_reference(losses) or not idle, f"{', '.join(idle)}: the losses given read no reference")


# --- the objective of a batch, and its metrics


def dpo_loss(
    policy, reference, tokens, weight, config, totals=None, pair_weight=None, sequence=None
) -> tuple[jax.Array, jax.Array]:
    """The loss of a batch (config.loss_type's rows summed with config.loss_weights) and each pair's implicit
    rewards.

    policy, reference [B, 2]: summed log-probs of (chosen, rejected) under the policy and the reference
    (reference None for the reference-free losses); tokens [B, 2]: scored tokens of each; weight [B]: 1
    for a pair, 0 for padding; pair_weight [B]: WPO's weights (use_weighting), gradient-free, or None;
    sequence ([B], [B]): the summed log-probs and the tokens of each whole chosen sequence, prompt included
    (for a `sequence` row, else None). `totals` (pairs, chosen tokens, chosen sequences' tokens or None) are
    the denominators when this batch is one microbatch of a larger one.
    Rewards [B, 2] are b (policy - reference), or b policy / tokens without a reference; gradient-free.
    """
    b, ls = config.beta, config.label_smoothing
    if totals is None:
        totals = jnp.sum(weight), jnp.sum(weight * tokens[:, 0]), sequence and jnp.sum(weight * sequence[1])
    pairs, chosen_tokens, sequence_tokens = totals
    tokens = jnp.maximum(tokens, 1)
    if reference is None:  # reference-free: log-probs stand in where log-ratios would be, as SimPO reads them
        reference = jnp.zeros_like(policy)
    (c, r), (nc, nr) = (policy - reference).T, tokens.T
    score_c, score_r = f_divergence_score(c, config), f_divergence_score(r, config)
    bh, per_token = b * (score_c - score_r), score_c / nc - score_r / nr
    scaled = weight if pair_weight is None else weight * pair_weight
    mean = lambda x: jnp.sum(scaled * x) / pairs
    nll, w_mean = -jnp.sum(weight * policy[:, 0]) / chosen_tokens, 1.0 if pair_weight is None else mean(1.0)
    real = weight > 0  # sorted over the real pairs only: padding goes to the end, then is left out
    ranked = lambda x: jnp.sort(jnp.where(real, x, jnp.inf))
    rank_mean = lambda x: jnp.sum(jnp.where(jnp.arange(len(x)) < jnp.sum(real), x, 0.0)) / pairs
    sequence_nll = None if sequence is None else -jnp.sum(weight * sequence[0]) / sequence_tokens
    parts = b, ls, c, r, bh, per_token, policy, reference, tokens, nll, sequence_nll, mean, w_mean
    terms = Terms(*parts, ranked, rank_mean, config)
    weights = config.loss_weights or (1.0,) * len(config.loss_type)
    loss = 0.0
    for name, w in zip(config.loss_type, weights, strict=True):
        value = LOSSES[name].formula(terms)
        loss += w * (mean(value) if value.ndim else value)  # each pair's, or the batch's
    rewards = b * (policy - reference if uses_reference(config.loss_type) else policy / tokens)
    return loss, jax.lax.stop_gradient(rewards)
