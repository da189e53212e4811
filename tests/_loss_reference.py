"""Independent float64 numpy reference for TRL's DPOTrainer loss family and metrics.

Written from TRL's source, not from this project's ``dpo.py``. It imports no jax or torch.

Sources read (through the stored-code index):
  * TRL 1.13.0 ``trl/trainer/dpo_trainer.py`` ``DPOTrainer._compute_loss``, read from Unsloth's
    auto-generated copy of it (header "1.13.0"). This is the newest version found, and the only stored
    text with ``sigmoid_norm`` (added by TRL PR #5406) and the PR #6559 change: nca_pair, bco_pair,
    sppo_hard and apo_down use raw log-ratios.
  * An unpatched TRL 1.x ``dpo_trainer.py`` (Copyright 2020-2026, before #5406, no ``sigmoid_norm``).
    Its losses are the same for ``f_divergence_type="reverse_kl"``.
  * TRL 0.x ``DPOTrainer.dpo_loss``, which had the ``RunningMoments`` baseline for ``bco_pair``, and TRL's
    ``RunningMoments`` from ``trl/trainer/utils.py``. Both read from stored copies of that code.
  * ``huggingface/trl`` ``trl/experimental/cpo/cpo_trainer.py`` @ 3a748cd1 and ``cpo_config.py`` @ eba8d4d0
    (SimPO).

  * TRL 1.16.0 itself, from its wheel (``pip download trl==1.16.0``): ``trl/trainer/dpo_trainer.py``
    ``_compute_loss`` (f_divergence_type and its allowed losses, ld_alpha, use_weighting),
    ``trl/trainer/callbacks.py`` ``SyncRefModelCallback`` (sync_ref_model) and
    ``trl/experimental/orpo/orpo_trainer.py`` ``odds_ratio_loss`` / ``log1mexp`` (ORPO). See the section
    "TRL 1.16's objective knobs" at the end.

Conventions. Unless a function below takes them, everything assumes ``f_divergence_type="reverse_kl"`` (the
default), ``ld_alpha=None``, ``use_weighting=False`` and a single process.
  c = chosen_logps - ref_chosen_logps      (summed over the completion tokens)
  r = rejected_logps - ref_rejected_logps
  h = c - r  (TRL: ``delta_score``; equal to (pi_c - pi_r) - (ref_c - ref_r))
"""

from __future__ import annotations

import numpy as np

# TRL defaults (DPOConfig / CPOConfig).
TRL_DEFAULT_BETA = 0.1
TRL_DEFAULT_DISCOPOP_TAU = 0.05
TRL_DEFAULT_SIMPO_GAMMA = 0.5  # CPOConfig.simpo_gamma: the full target margin gamma (not gamma / beta)
TRL_DEFAULT_CPO_ALPHA = 1.0  # CPOConfig.cpo_alpha: the NLL weight; pure SimPO needs cpo_alpha=0

PER_PAIR_LOSSES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "simpo",
)
BATCH_LOSSES = ("aot", "aot_unpaired", "sft")


# ---
# numerics
# ---
def _f64(x):
    return np.asarray(x, dtype=np.float64)


def logsigmoid(x):
    """log(sigmoid(x)) = -log(1 + exp(-x)), stable in float64."""
    return -np.logaddexp(0.0, -_f64(x))


def sigmoid(x):
    return np.exp(logsigmoid(x))


def relu(x):
    return np.maximum(_f64(x), 0.0)


# ---
# per-pair losses
# ---
def per_pair_losses(
    name,
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_tokens,
    rejected_tokens,
    beta,
    label_smoothing=0.0,
    discopop_tau=TRL_DEFAULT_DISCOPOP_TAU,
    simpo_gamma=TRL_DEFAULT_SIMPO_GAMMA,
    bco_delta=0.0,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
):
    """Per-pair loss vector [B] (before TRL's ``.mean()``) for one of TRL's per-pair loss types.

    ``*_logps`` are log-probs summed over each completion's scored tokens. ``*_tokens`` are the numbers of
    scored (completion) tokens.
    """
    pc, pr = _f64(chosen_logps), _f64(rejected_logps)
    rc, rr = _f64(ref_chosen_logps), _f64(ref_rejected_logps)
    nc, nr = _f64(chosen_tokens), _f64(rejected_tokens)
    beta = float(beta)
    ls = float(label_smoothing)
    c = pc - rc
    r = pr - rr
    # TRL 1.16 turns the log-ratios into f-divergence "scores" for the losses built on their difference
    # (sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop; it refuses the others): h and the
    # per-token delta below read the scores. reverse_kl leaves them as they are.
    sc = f_divergence_scores(c, f_divergence_type, f_alpha_divergence_coef)
    sr = f_divergence_scores(r, f_divergence_type, f_alpha_divergence_coef)
    h = sc - sr

    if name == "sigmoid":
        # DPO with cDPO label smoothing: -(1-ls)*logsig(beta*h) - ls*logsig(-beta*h).
        # TRL 0.x's sigmoid was exactly this. TRL 1.x's sigmoid ignores label_smoothing:
        #     per_sequence_loss = -F.logsigmoid(self.beta * delta_score)
        # so it is this with ls=0. In 1.x, label smoothing only enters robust, exo_pair, aot and aot_unpaired.
        return -(1.0 - ls) * logsigmoid(beta * h) - ls * logsigmoid(-beta * h)

    if name == "hinge":
        # SLiC / RSO hinge: relu(1 - beta*h)
        return relu(1.0 - beta * h)

    if name == "ipo":
        # TRL divides each side's log-ratio (policy and ref) by its completion-token count, clamped to >= 1:
        #     chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)
        #     per_sequence_loss = (ipo_delta - 1 / (2 * self.beta)) ** 2
        d = sc / np.maximum(nc, 1.0) - sr / np.maximum(nr, 1.0)
        return (d - 1.0 / (2.0 * beta)) ** 2

    if name == "exo_pair":
        # EXO-pref (Eq. 16). eps = label_smoothing, which must be > 0 (TRL 1.x raises ValueError on 0.0;
        # TRL 0.x silently replaced 0 with 1e-3).
        if ls == 0.0:
            raise ValueError("exo_pair needs label_smoothing > 0 (TRL raises; the EXO paper suggests 1e-3)")
        x = beta * h
        return sigmoid(x) * (logsigmoid(x) - np.log1p(-ls)) + sigmoid(-x) * (logsigmoid(-x) - np.log(ls))

    if name == "nca_pair":
        bc, br = beta * c, beta * r
        return -logsigmoid(bc) - 0.5 * logsigmoid(-bc) - 0.5 * logsigmoid(-br)

    if name == "robust":
        # Robust DPO (Chowdhury et al. 2024). TRL warns, but does not raise, unless 0 <= ls < 0.5.
        clean = -(1.0 - ls) * logsigmoid(beta * h)
        flipped = -ls * logsigmoid(-beta * h)
        return (clean - flipped) / (1.0 - 2.0 * ls)

    if name == "bco_pair":
        # TRL 1.x (stateless):   -logsig(beta*c) - logsig(-beta*r)                      (bco_delta = 0)
        # TRL 0.x (stateful):    -logsig(beta*c - delta) - logsig(-(beta*r - delta)), where delta is the
        #   RunningMoments mean AFTER it is updated with this batch's scalar
        #   xs = mean(concat(beta*c, beta*r)). See running_moments_update / bco_pair_delta_after_update.
        d = float(bco_delta)
        return -logsigmoid(beta * c - d) - logsigmoid(-(beta * r - d))

    if name == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2

    if name == "apo_zero":
        return (1.0 - sigmoid(beta * c)) + sigmoid(beta * r)

    if name == "apo_down":
        return sigmoid(beta * c) + (1.0 - sigmoid(beta * (c - r)))

    if name == "discopop":
        x = beta * h
        mod = sigmoid(x / float(discopop_tau))
        return -logsigmoid(x) * (1.0 - mod) + np.exp(-x) * mod

    if name == "sigmoid_norm":
        # TRL 1.13 (PR #5406, Tulu-3 Eq. 6 length-normalised DPO). It uses the reference model, and each
        # log-ratio is divided by its own completion-token count (clamped to >= 1).
        # label_smoothing is not used:
        #     chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)
        #     per_sequence_loss = -F.logsigmoid(self.beta * (chosen_avg_score - rejected_avg_score))
        d = sc / np.maximum(nc, 1.0) - sr / np.maximum(nr, 1.0)
        return -logsigmoid(beta * d)

    if name == "simpo":
        # TRL CPOTrainer, loss_type="simpo". No reference model. Log-probs are averaged per token
        # (get_batch_logps average_log_prob: sum / count, with no clamp):
        #     logits = (avg_c - avg_r) - simpo_gamma / beta
        #     losses = -logsig(beta*logits)*(1-ls) - logsig(-beta*logits)*ls
        # i.e. -(1-ls)*logsig(beta*(avg_c-avg_r) - gamma) - ls*logsig(-(beta*(avg_c-avg_r) - gamma)).
        # CPOTrainer's total loss is losses.mean() + cpo_alpha * NLL (default cpo_alpha = 1.0; see
        # simpo_total_loss). ref_* are ignored here.
        ac = pc / nc
        ar = pr / nr
        x = beta * ((ac - ar) - float(simpo_gamma) / beta)
        return -(1.0 - ls) * logsigmoid(x) - ls * logsigmoid(-x)

    raise ValueError(f"unknown per-pair loss {name!r}; batch-level ones are {BATCH_LOSSES}")


# ---
# batch-level losses (they couple pairs, so they are not per-pair functions)
# ---
def aot_per_pair(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing=0.0
):
    """TRL "aot" (paired AOT). The policy margins and the ref margins are each sorted ascending over the
    batch, on their own, then matched up by rank:
        logratios = chosen_logps - rejected_logps;  ref_logratios = ref_chosen_logps - ref_rejected_logps
        delta = sort(logratios) - sort(ref_logratios)
        loss_i = -logsig(beta*delta_i)*(1-ls) - logsig(-beta*delta_i)*ls
    (TRL 0.x named this "aot"; the unpaired one was "aot_pair".)"""
    lr = np.sort(_f64(chosen_logps) - _f64(rejected_logps), axis=0)
    rlr = np.sort(_f64(ref_chosen_logps) - _f64(ref_rejected_logps), axis=0)
    d = lr - rlr
    ls = float(label_smoothing)
    return -logsigmoid(beta * d) * (1.0 - ls) - logsigmoid(-beta * d) * ls


def aot_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing=0.0):
    return float(
        aot_per_pair(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing
        ).mean()
    )


def aot_unpaired_per_pair(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing=0.0
):
    """TRL 1.x "aot_unpaired" (called "aot_pair" in 0.x). The chosen log-ratios and the rejected log-ratios
    are each sorted ascending over the batch, on their own:
        delta = sort(chosen_logps - ref_chosen_logps) - sort(rejected_logps - ref_rejected_logps)
        loss_i = -logsig(beta*delta_i)*(1-ls) - logsig(-beta*delta_i)*ls"""
    c = np.sort(_f64(chosen_logps) - _f64(ref_chosen_logps), axis=0)
    r = np.sort(_f64(rejected_logps) - _f64(ref_rejected_logps), axis=0)
    d = c - r
    ls = float(label_smoothing)
    return -logsigmoid(beta * d) * (1.0 - ls) - logsigmoid(-beta * d) * ls


def aot_unpaired_loss(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing=0.0
):
    return float(
        aot_unpaired_per_pair(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing
        ).mean()
    )


def sft_loss(chosen_logps, chosen_tokens):
    """TRL 1.x "sft": one token-weighted NLL over ALL chosen completion tokens of the batch,
        F.cross_entropy(chosen_logits[chosen_mask], chosen_labels[chosen_mask])   (reduction='mean')
    = -sum_i chosen_logps_i / sum_i chosen_tokens_i. It is NOT the mean over pairs of per-pair means.
    TRL expands this scalar to [B] and takes .mean(), which changes nothing. With ld_alpha set, TRL still uses
    the unweighted cross-entropy, so pass unweighted summed log-probs.
    (Zero chosen tokens gives NaN in TRL.)"""
    return float(-np.sum(_f64(chosen_logps)) / np.sum(_f64(chosen_tokens)))


def simpo_total_loss(
    chosen_logps,
    rejected_logps,
    chosen_tokens,
    rejected_tokens,
    beta,
    label_smoothing=0.0,
    simpo_gamma=TRL_DEFAULT_SIMPO_GAMMA,
    cpo_alpha=TRL_DEFAULT_CPO_ALPHA,
):
    """CPOTrainer(loss_type="simpo"): losses.mean() + cpo_alpha * nll, where nll is the token-mean
    cross-entropy over the chosen labels (CrossEntropyLoss, ignore_index=-100), i.e. sft_loss."""
    z = np.zeros_like(_f64(chosen_logps))
    pp = per_pair_losses(
        "simpo",
        chosen_logps,
        rejected_logps,
        z,
        z,
        chosen_tokens,
        rejected_tokens,
        beta,
        label_smoothing=label_smoothing,
        simpo_gamma=simpo_gamma,
    )
    nll = sft_loss(chosen_logps, chosen_tokens) if cpo_alpha != 0 else 0.0
    return float(pp.mean() + cpo_alpha * nll)


# ---
# combining loss types
# ---
def combined_loss(
    loss_types,
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_tokens,
    rejected_tokens,
    beta,
    loss_weights=None,
    label_smoothing=0.0,
    discopop_tau=TRL_DEFAULT_DISCOPOP_TAU,
    simpo_gamma=TRL_DEFAULT_SIMPO_GAMMA,
    bco_delta=0.0,
):
    """TRL 1.x:  loss = sum_i loss_weights[i] * per_sequence_loss_i.mean()
    (``loss_weights`` defaults to [1.0] * len(loss_type); zip(..., strict=True) so the lengths must match).
    Every term is a plain mean over the B pairs, and sft is the scalar token-mean above."""
    loss_types = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(loss_types):
        raise ValueError("loss_weights must have one entry per loss type")
    total = 0.0
    for name, w in zip(loss_types, weights, strict=True):
        if name == "sft":
            term = sft_loss(chosen_logps, chosen_tokens)
        elif name == "aot":
            term = aot_loss(
                chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing
            )
        elif name == "aot_unpaired":
            term = aot_unpaired_loss(
                chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing
            )
        else:
            term = float(
                per_pair_losses(
                    name,
                    chosen_logps,
                    rejected_logps,
                    ref_chosen_logps,
                    ref_rejected_logps,
                    chosen_tokens,
                    rejected_tokens,
                    beta,
                    label_smoothing=label_smoothing,
                    discopop_tau=discopop_tau,
                    simpo_gamma=simpo_gamma,
                    bco_delta=bco_delta,
                ).mean()
            )
        total += float(w) * term
    return total


# ---
# RunningMoments (TRL 0.x bco_pair baseline)
# ---
RUNNING_MOMENTS_INIT = {"mean": 0.0, "std": 1.0, "var": 1.0, "count": 1e-24}


def running_moments_update_full(mean, var, count, xs):
    """TRL ``RunningMoments.update`` (single process), in float64. Returns (mean, var, std, count).
        xs_count = numel(xs); xs_var, xs_mean = var_mean(xs, unbiased=False)
        delta = xs_mean - mean; tot = count + xs_count
        old_sum = var*count + delta**2 * count * xs_count / tot;  new_sum = xs_var * xs_count
        mean += delta * xs_count / tot; var = (old_sum + new_sum) / tot
        std = sqrt(var * tot / (tot - 1)); count = tot
    Initial state: mean=0, std=1, var=1, count=1e-24. In float64, 1e-24 + 1 == 1.0, so the first update sets
    mean = xs exactly and gives std = inf/nan (tot - 1 == 0). bco_pair never reads std."""
    xs = _f64(xs).reshape(-1)
    n = xs.size
    xs_mean = xs.mean()
    xs_var = xs.var()  # unbiased=False
    delta = xs_mean - mean
    tot = count + n
    old_sum = var * count + delta**2 * count * n / tot
    new_sum = xs_var * n
    new_mean = mean + delta * n / tot
    new_var = (old_sum + new_sum) / tot
    with np.errstate(divide="ignore", invalid="ignore"):
        new_std = float(np.sqrt(np.float64(new_var) * tot / np.float64(tot - 1)))
    return float(new_mean), float(new_var), new_std, float(tot)


def running_moments_update(mean, count, xs):
    """Mean/count part of TRL's RunningMoments.update; the mean update does not depend on var.
    Returns (new_mean, new_count). For bco_pair, xs is ONE scalar per step, so this is a cumulative average of
    the per-batch mean rewards (count counts batches; distributed, it is the world size per step)."""
    xs = _f64(xs).reshape(-1)
    n = xs.size
    tot = count + n
    return float(mean + (xs.mean() - mean) * n / tot), float(tot)


def bco_pair_delta_after_update(
    mean, count, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
):
    """TRL 0.x bco_pair step:
        rewards = torch.cat((beta*c, beta*r), 0).mean().detach()   # a scalar
        self.running.update(rewards)
        delta = self.running.mean                                   # the mean AFTER this update
    Returns (delta, new_mean, new_count)."""
    c = _f64(chosen_logps) - _f64(ref_chosen_logps)
    r = _f64(rejected_logps) - _f64(ref_rejected_logps)
    xs = np.concatenate([beta * c, beta * r]).mean()
    new_mean, new_count = running_moments_update(mean, count, xs)
    return new_mean, new_mean, new_count


# ---
# implicit rewards
# ---
def implicit_rewards(
    name,
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta,
    chosen_tokens=None,
    rejected_tokens=None,
):
    """DPOTrainer (1.x, every loss type, sigmoid_norm/ipo/sft/aot included): beta * (logps - ref_logps) on the
    SUMMED log-probs. The length normalisation inside ipo/sigmoid_norm does not reach the rewards.
    CPOTrainer simpo (reference-free): beta * avg_logps, where avg = sum / tokens."""
    if name in ("simpo", "orpo"):  # ORPOTrainer: beta * the mean token log-prob, as CPOTrainer's simpo
        return beta * _f64(chosen_logps) / _f64(chosen_tokens), beta * _f64(rejected_logps) / _f64(
            rejected_tokens
        )
    return beta * (_f64(chosen_logps) - _f64(ref_chosen_logps)), beta * (
        _f64(rejected_logps) - _f64(ref_rejected_logps)
    )


def reward_metrics(chosen_rewards, rejected_rewards):
    """rewards/chosen, rewards/rejected: means over pairs. rewards/accuracies: mean of (chosen > rejected),
    strict, so ties count 0. rewards/margins: mean(chosen - rejected)."""
    cr, rr = _f64(chosen_rewards), _f64(rejected_rewards)
    return {
        "rewards/chosen": float(cr.mean()),
        "rewards/rejected": float(rr.mean()),
        "rewards/accuracies": float((cr > rr).astype(np.float64).mean()),
        "rewards/margins": float((cr - rr).mean()),
    }


# ---
# token-level metrics
# ---
def trl_shift(logits, input_ids, completion_mask):
    """TRL's alignment: shift_logits = logits[:, :-1], shift_labels = input_ids[:, 1:],
    shift_completion_mask = completion_mask[:, 1:]. The metric functions below take these aligned arrays
    (logits[:, t] predicts targets[:, t]; mask marks the scored completion tokens)."""
    return _f64(logits)[:, :-1, :], np.asarray(input_ids)[:, 1:], _f64(completion_mask)[:, 1:]


def log_softmax(logits):
    x = _f64(logits)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def per_token_logps(logits, targets):
    lp = log_softmax(logits)
    return np.take_along_axis(lp, np.asarray(targets)[..., None].astype(np.int64), axis=-1)[..., 0]


def sequence_logps(logits, targets, mask):
    """TRL: per_token_logps[mask == 0] = 0; logps = per_token_logps.sum(1).
    Returns ([N] sums, [N] token counts)."""
    m = _f64(mask)
    return (per_token_logps(logits, targets) * m).sum(axis=1), m.sum(axis=1)


def logits_mean_metric(logits, mask):
    """logits/chosen (or /rejected), computed on that half only:
        total = logits[mask.bool()].mean(-1).sum();  avg = total / mask.sum()   (0.0 if there are no tokens)
    i.e. the vocab-mean logit averaged over all masked tokens of the half, token-weighted."""
    x = _f64(logits)
    m = _f64(mask) > 0
    n = m.sum()
    return float(x[m].mean(axis=-1).sum() / n) if n > 0 else 0.0


def entropy_metric(logits, mask):
    """entropy: per-token entropy of softmax(logits) over the vocab, averaged over ALL masked completion
    tokens of the whole concatenated batch (chosen AND rejected), token-weighted (1.13:
    sum(H*mask)/sum(mask); older 1.x:
    H[mask].mean(); the same on one process)."""
    lp = log_softmax(logits)
    ent = -(np.exp(lp) * lp).sum(axis=-1)
    m = _f64(mask)
    n = m.sum()
    return float((ent * m).sum() / n) if n > 0 else 0.0


def mean_token_accuracy(logits, targets, mask):
    """mean_token_accuracy, CHOSEN half only in TRL: argmax(shift_logits) == shift_labels over the chosen
    shift_completion_mask, sum(correct) / sum(mask), token-weighted over the batch
    (0.0 if there are no tokens).
    Pass the chosen half. (np.argmax takes the first max on ties, like torch on CPU in practice.)"""
    pred = np.argmax(_f64(logits), axis=-1)
    m = _f64(mask) > 0
    n = m.sum()
    return float(((pred == np.asarray(targets)) & m).sum() / n) if n > 0 else 0.0


def dpo_metrics_from_logits(policy_logits, ref_logits, input_ids, completion_mask, beta):
    """All DPOTrainer 1.x logged metrics (other than the loss) from full, unshifted [2B, T, V] logits and
    [2B, T]
    ids/mask, with chosen rows first and then rejected rows."""
    sl, lab, sm = trl_shift(policy_logits, input_ids, completion_mask)
    rsl, _, _ = trl_shift(ref_logits, input_ids, completion_mask)
    logps, _ = sequence_logps(sl, lab, sm)
    ref_logps, _ = sequence_logps(rsl, lab, sm)
    b = logps.shape[0] // 2
    cr = beta * (logps[:b] - ref_logps[:b])
    rr = beta * (logps[b:] - ref_logps[b:])
    out = reward_metrics(cr, rr)
    out.update(
        {
            "entropy": entropy_metric(sl, sm),
            "logits/chosen": logits_mean_metric(sl[:b], sm[:b]),
            "logits/rejected": logits_mean_metric(sl[b:], sm[b:]),
            "mean_token_accuracy": mean_token_accuracy(sl[:b], lab[:b], sm[:b]),
            "logps/chosen": float(logps[:b].mean()),
            "logps/rejected": float(logps[b:].mean()),
        }
    )
    return out


# ---
# TRL 1.16's objective knobs
# ---
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


def f_divergence_scores(logratios, kind="reverse_kl", coef=0.5):
    """TRL 1.16 ``_compute_loss``: the score f'(t) of t = pi / ref, from x = log t:
    reverse_kl        x
    forward_kl        1 - exp(-x)                      (f'(t) = 1 - 1/t)
    js_divergence     log 2 + logsigmoid(x)            (f'(t) = log(2t / (t + 1)))
    alpha_divergence  (exp(min((a - 1) x, 80)) - 1) / (a - 1), a = f_alpha_divergence_coef (default 0.5);
                      |a - 1| < 1e-6 falls back to reverse_kl. The cap 80 is TRL's for float32/bfloat16."""
    x = _f64(logratios)
    if kind == "reverse_kl":
        return x
    if kind == "forward_kl":
        return 1.0 - np.exp(-x)
    if kind == "js_divergence":
        return np.log(2.0) + logsigmoid(x)
    if kind == "alpha_divergence":
        if abs(coef - 1.0) < 1e-6:
            return x
        return (np.exp(np.minimum((coef - 1.0) * x, 80.0)) - 1.0) / (coef - 1.0)
    raise ValueError(kind)


def ld_logps(per_token_logps, mask, ld_alpha):
    """TRL 1.16 LD-DPO (Liu et al. 2024) on [2B, T] aligned per-token log-probs (chosen rows first, then
    rejected) and their completion mask:
        comp_pos = cumsum(mask); comp_lens = sum(mask); shared = min(chosen_lens, rejected_lens), per pair
        shared_mask = (comp_pos > 0) & (comp_pos <= shared);  tail_mask = comp_pos > shared
        logps = sum(logp * shared_mask) + ld_alpha * sum(logp * tail_mask)
    Note: tail_mask is not multiplied by the mask; TRL's per-token log-probs are 0 off the mask, so the
    masked-out positions past the tail add 0. Returns [2B]."""
    lp, m = _f64(per_token_logps) * _f64(mask), _f64(mask)
    pos = np.cumsum(m, axis=1)
    lens = m.sum(axis=1)
    b = len(lens) // 2
    shared = np.minimum(lens[:b], lens[b:])
    shared = np.concatenate([shared, shared])[:, None]
    shared_mask = (pos > 0) & (pos <= shared)
    tail_mask = pos > shared
    return (lp * shared_mask).sum(1) + float(ld_alpha) * (lp * tail_mask).sum(1)


def wpo_weights(logits, targets, mask):
    """TRL 1.16 use_weighting (WPO, Zhou et al. 2024, Eq. 2) from aligned [2B, T, V] logits, [2B, T] targets
    and mask (chosen rows first): per token logp(target) - log sum_v p_v^2 (TRL's ``log_sum_sq_probs``),
    masked, summed, divided by the completion length clamped at >= 1, exp; a pair's weight is chosen times
    rejected. No cap at 1 (TRL 0.x clamped the product at 1; 1.x does not). Computed under no_grad. [B]."""
    lp = log_softmax(logits)
    token = np.take_along_axis(lp, np.asarray(targets)[..., None].astype(np.int64), axis=-1)[..., 0]
    log_sum_sq = np.log(np.exp(2.0 * lp).sum(-1))
    m = _f64(mask)
    mean = ((token - log_sum_sq) * m).sum(1) / np.maximum(m.sum(1), 1.0)
    w = np.exp(mean)
    b = len(w) // 2
    return w[:b] * w[b:]


def weighted_loss(name, weights, *args, **kwargs):
    """TRL 1.16 with use_weighting: ``loss += (per_sequence_loss * chosen_w * rejected_w).mean() * weight``
    for every loss type (sft's scalar is expanded to [B] first, so it is scaled by the mean weight). Takes
    per_pair_losses' arguments for the per-pair losses; for sft, (chosen_logps, chosen_tokens)."""
    w = _f64(weights)
    if name == "sft":
        return float(sft_loss(*args) * w.mean())
    return float((per_pair_losses(name, *args, **kwargs) * w).mean())


def log1mexp(x):
    """TRL's ORPO log(1 - exp(x)), branching at -log 2 to avoid cancellation."""
    x = _f64(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x < -np.log(2.0), np.log1p(-np.exp(x)), np.log(-np.expm1(x)))


def orpo_log_odds(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens):
    """ORPOTrainer.odds_ratio_loss: with the MEAN token log-probs (get_batch_logps(average_log_prob=True)),
    log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))"""
    pc = _f64(chosen_logps) / _f64(chosen_tokens)
    pr = _f64(rejected_logps) / _f64(rejected_tokens)
    return (pc - pr) - (log1mexp(pc) - log1mexp(pr))


def orpo_loss(
    chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, beta, sequence_logps, sequence_tokens
):
    """ORPO (Hong et al. 2024), ORPOTrainer: loss = nll - mean(beta * logsigmoid(log_odds)), lambda = beta.
    The log odds read the completions' mean token log-probs; nll is TRL 1.16's over the chosen prompt and
    completion tokens together (its comment: "orpo chosen nll loss is computed over the full prompt and
    response"): sequence_logps and sequence_tokens are each whole chosen sequence's summed log-probs and
    its targets (every token after the first)."""
    odds = orpo_log_odds(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens)
    return float(sft_loss(sequence_logps, sequence_tokens) - np.mean(beta * logsigmoid(odds)))


def orpo_metrics(
    chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, sequence_logps, sequence_tokens
):
    """ORPOTrainer's logged log_odds_ratio = mean(logsigmoid(log_odds)), log_odds_chosen = mean(log_odds),
    nll_loss (the whole chosen sequences' mean NLL, as in orpo_loss)."""
    odds = orpo_log_odds(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens)
    return {
        "log_odds_ratio": float(np.mean(logsigmoid(odds))),
        "log_odds_chosen": float(np.mean(odds)),
        "nll_loss": sft_loss(sequence_logps, sequence_tokens),
    }


def tr_dpo_sync(policy, reference, alpha):
    """TRL's SyncRefModelCallback after every ref_model_sync_steps-th step (global_step % N == 0):
    ref <- (1 - alpha) * ref + alpha * policy, for every parameter."""
    return (1.0 - float(alpha)) * _f64(reference) + float(alpha) * _f64(policy)
