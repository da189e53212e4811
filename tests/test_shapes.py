"""A run's few batch shapes (data.plan_shapes), compiled before the first step and cached across runs: every
batch laid out in a planned shape holds exactly what its own smallest shape holds (nothing dropped or cut,
the rest padding) and gives the same loss; at most 4 training and 2 evaluation shapes over an epoch of any
length mix; a second run of the same settings compiles nothing and says so."""

import itertools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from _tolerance import assert_metrics_close
from test_packing import pairs  # noqa: F401  (the fixture: multi-turn ChatML pairs and a tiny model)

import data
import dpo
import model
import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {"plain": None, "sharing": data.Layout(True, False), "packing": data.Layout(True, True)}


class Lengths:
    """Stands in for data.PairDataset with lengths alone (tokens are all 7): UltraFeedback-like (prompt ~110,
    replies ~260 tokens, lognormal), long prompts (~700 before replies of ~150) and short one-line answers,
    pairs over max_seq_len left out as data.py does."""

    def __init__(self, mix: str, n: int = 2000, max_seq_len: int = 2048):
        rng = np.random.default_rng(1)
        prompt_median, prompt_sigma, reply_median, reply_sigma = {
            "ultrafeedback": (110, 0.9, 260, 0.75),
            "long prompts": (700, 0.5, 150, 0.6),
            "short": (30, 0.3, 12, 0.5),
        }[mix]
        prompt = 30 + rng.lognormal(np.log(prompt_median), prompt_sigma, n).astype(int)
        lengths = prompt[:, None] + 1 + rng.lognormal(np.log(reply_median), reply_sigma, (n, 2)).astype(int)
        keep = lengths.max(1) <= max_seq_len
        self.lengths, self.shared, self.path = lengths[keep], prompt[keep], "synthetic"

    def __len__(self):
        return len(self.lengths)

    def read(self, indices):
        side = lambda i, s: (
            np.full(self.lengths[i, s], 7, np.int32),
            np.arange(self.lengths[i, s]) >= self.shared[i],
        )
        return [(side(i, 0), side(i, 1)) for i in indices]


def laid_out(dataset, steps, layout, shapes, row_multiple=1):
    layout = layout and layout._replace(row_multiple=row_multiple)
    indices = np.arange(len(dataset))
    return list(data._batches(dataset, indices, steps, 2048, None, layout, 0, 1, shapes))


def assert_same_contents(planned: dict, own: dict) -> None:
    """`planned` is `own` padded further: cropped to own's shape every array is equal, the rest padding
    (0, and -1 for `pair`). A token's attention slot is compared as (view, position): its number depends on
    the view width."""
    assert planned.keys() == own.keys()
    for key, small in own.items():
        big = planned[key]
        if key == "slot":
            width, own_width = planned["views"].shape[-1], own["views"].shape[-1]
            big = np.where(planned["pair"] >= 0, big // width * own_width + big % width, 0)
        crop = tuple(slice(0, n) for n in small.shape)
        np.testing.assert_array_equal(big[crop], small, err_msg=key)
        rest = np.ones(big.shape, bool)
        rest[crop] = False
        assert (big[rest] == (-1 if key == "pair" else 0)).all(), key


@pytest.mark.parametrize("mix", ["ultrafeedback", "long prompts", "short"])
@pytest.mark.parametrize("batch_size", [32, 128])
def test_an_epoch_takes_at_most_4_training_and_2_evaluation_shapes_and_loses_nothing(mix, batch_size):
    dataset = Lengths(mix)
    order = data.train_order(dataset, np.arange(len(dataset)), batch_size=batch_size, seed=0)
    epoch = [order(s) for s in range(len(dataset) // batch_size)]
    evaluation = data.eval_order(data.by_length(dataset, np.arange(500)), batch_size)
    for name, layout in LAYOUTS.items():
        for steps, count in ((epoch, data.TRAIN_SHAPES), (evaluation, data.EVAL_SHAPES)):
            plan = dict(count=count, max_seq_len=2048, layout=layout and layout._replace(row_multiple=2))
            shapes = data.plan_shapes(dataset, steps, **plan)
            planned, own = (laid_out(dataset, steps, layout, s, row_multiple=2) for s in (shapes, None))
            assert len(shapes) <= count and {data.shape_of(b) for b in planned} <= set(shapes), name
            for big, small in zip(planned, own, strict=True):
                assert_same_contents(big, small)
            # Training pads within 5 points of each batch's own smallest shape. A validation pass runs its
            # pairs shortest first, so its batches span every length and 2 shapes pad more (bench.py shapes).
            ran = lambda bs: sum((b["pair"] >= 0).sum() if "pair" in b else b["lengths"].sum() for b in bs)
            efficiency = [ran(bs) / sum(b["input_ids"].size for b in bs) for bs in (planned, own)]
            assert steps is evaluation or efficiency[0] > efficiency[1] - 0.05, (name, efficiency)


def test_planned_shapes_give_the_same_loss_as_each_batchs_own(pairs):  # noqa: F811
    dataset, arch = pairs
    config = dpo.Config(
        logits_chunk_size=64, train_data="x", train_batch_size=4, loss_type=("sigmoid", "ipo")
    )
    mesh = sharding.make_mesh(1, 2, 1, devices=jax.devices()[:2])
    # batches of one long and three short pairs beside batches of short ones: the plan pads the short ones
    order = np.argsort(dataset.lengths.max(1))
    steps = [(np.r_[order[-1 - i], order[3 * i : 3 * i + 3]], np.ones(4, np.float32)) for i in range(3)]
    steps += [(order[12 + 4 * i : 16 + 4 * i], np.ones(4, np.float32)) for i in range(2)]
    with jax.set_mesh(mesh):
        params, reference = (model.init_params(arch, jax.random.key(seed), mesh) for seed in (0, 1))
        eval_step = dpo.make_steps(arch, config)["evaluation"]
        for layout in LAYOUTS.values():
            layout = layout and layout._replace(row_multiple=2)
            shapes = data.plan_shapes(dataset, steps, count=2, max_seq_len=256, layout=layout)
            laid = [
                list(data._batches(dataset, order, steps, 256, None, layout, 0, 1, s)) for s in (shapes, None)
            ]
            assert len({data.shape_of(b) for b in laid[0]}) <= 2 < len({data.shape_of(b) for b in laid[1]})
            for planned, own in zip(*laid, strict=True):
                sums = [
                    dpo.normalize(
                        jax.device_get(
                            eval_step(
                                params,
                                dpo.Frozen(None, reference),
                                config.hyperparameters(),
                                sharding.global_batch(b, mesh),
                            )
                        )
                    )
                    for b in (planned, own)
                ]
                assert_metrics_close(*sums, sums[1].keys(), config.beta, losses=1)


def test_a_sweep_compiles_nothing_after_its_first_run_and_says_so(tmp_path):
    """A first run, then a run of the same shapes with every setting a sweep changes changed (dpo.SWEPT and
    the schedule's): the second adds no entry to the compilation cache and says its programs came from it
    (a rerun, a resume or a sweep alike), and its numbers are those of the same run compiled afresh."""
    swept = dict(
        beta=0.3, learning_rate=2e-3, label_smoothing=0.1, warmup=1, cooldown=0.5, num_train_steps=3,
        min_lr_ratio=0.1, weight_decay=0.01, max_grad_norm=0.5,
    )  # fmt: skip
    runs = []
    for name, cache, changed in [
        ("first", "cache", {}),
        ("second", "cache", swept),
        ("afresh", "own", swept),
    ]:
        settings = dict(
            output_dir=tmp_path / name,
            compilation_cache_dir=tmp_path / cache,
            num_train_steps=2,
            steps_per_eval=2,
            max_eval_batches=2,
            train_batch_size=8,
        )
        flags = [f"--config.{key.replace('_', '-')}={value}" for key, value in (settings | changed).items()]
        done = subprocess.run(
            [sys.executable, os.path.join(ROOT, "dpo.py"), *flags],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=os.environ | {"DPO_TRACEBACK": "1"},
        )
        assert done.returncode == 0, done.stderr
        runs.append((done.stdout, sorted(p.name for p in (tmp_path / cache).iterdir())))
    (first, entries), (second, again), _ = runs
    line = lambda out: next(x for x in out.splitlines() if x.startswith("programs: compiled"))
    assert "0 of" in line(first) and entries
    count = line(second).split(" from the cache")[0].rsplit(" of ", 1)
    assert count[0].endswith(count[1]) and int(count[1]) >= 2, line(second)  # "..., N of N from the cache"
    assert again == entries
    metrics = {
        name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("second", "afresh")
    }
    assert [m["step"] for m in metrics["second"] if "loss" in m] == [1, 2, 3]
    timing = "throughput/tokens_per_second"
    equal = lambda m: [{k: v for k, v in record.items() if k != timing} for record in m]
    assert equal(metrics["second"]) == equal(metrics["afresh"])  # bit for bit
    lr = {m["step"]: m["learning_rate"] for m in metrics["second"] if "loss" in m}  # at the step's start
    # warmup 1 step, then linear toward min_lr (2e-4) at step 3: halfway at the last step's start
    assert lr == {1: 0.0, 2: pytest.approx(2e-3), 3: pytest.approx(1.1e-3)}
    assert not list(itertools.chain((tmp_path / "cache").glob("*.tmp"), (tmp_path / "cache").glob("*-tmp")))
