"""Precomputed reference log-probs (`--config.reference precompute`) against the live reference: the same
training and evaluation numbers, a fresh cache when the model or the data change, and an interrupted
precompute that resumes from its progress file."""

import json
import shutil

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
from _tolerance import assert_metrics_close

import bookkeeping
import data
import dpo
import model
import sharding

SMALL = dict(train_batch_size=8, max_seq_len=64, logits_chunk_size=32)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute")
    model_dir, pairs = bookkeeping.make_demo(root / "demo", seed=0)
    tokenized = root / "tokenized"
    data.tokenize(str(pairs), str(model_dir), str(tokenized), max_seq_len=64)
    return root, model_dir, tokenized


def precompute(model_dir, tokenized) -> np.ndarray:
    """The reference table of one dataset, as dpo.main computes it (8 fake devices, FSDP)."""
    mesh = sharding.make_mesh(1, -1, 1)
    config = dpo.Config(model_name_or_path=str(model_dir), train_data=str(tokenized), **SMALL)
    arch = model.load_config(model_dir)
    with jax.set_mesh(mesh):
        cache = bookkeeping.ReferenceCache(data.PairDataset(tokenized), model_dir, config, mesh)
        weights = model.load_params(model_dir, arch, mesh)
        programs = dpo.Programs(dpo.make_steps(arch, config), {})
        start = dpo.Start(None, None, dpo.Frozen(None, None), {None: cache}, weights)
        return dpo.precompute_reference(programs, start, config.hyperparameters(), mesh)[None]


def test_precomputed_reference_trains_like_the_live_one(demo, capsys):
    root, model_dir, tokenized = demo
    runs = {}
    for reference in ("live", "precompute"):
        config = dpo.Config(
            model_name_or_path=str(model_dir),
            train_data=str(tokenized),
            output_dir=str(root / reference),
            reference_mode=reference,
            num_train_steps=6,
            learning_rate=3e-3,
            warmup=0,
            steps_per_eval=3,
            max_eval_batches=2,
            steps_per_checkpoint=100,
            **SMALL,
        )
        dpo.main(config)
        # validation is a split of the training data: one cache, one pass
        assert capsys.readouterr().out.count("reference log-probs: ") == (reference == "precompute")
        runs[reference] = [
            json.loads(line) for line in (root / reference / "metrics.jsonl").read_text().splitlines()
        ]
    assert len(list((tokenized / "reference").glob("*.npy"))) == 1  # cached beside the data
    live, precomputed = runs["live"], runs["precompute"]
    assert [line["step"] for line in live] == [line["step"] for line in precomputed]
    compared = ("loss", "rewards/", "logps/", "grad_norm", "eval/")
    for want, got in zip(live, precomputed, strict=True):
        keys = [k for k in want if k.startswith(compared)]
        assert keys and keys == [k for k in got if k.startswith(compared)]
        # the loss and rewards cancel: to the rounding floor of their log-probs (tests/_tolerance.py)
        assert_metrics_close(got, want, keys, beta=0.1, atol=1e-6)
    assert any(line.get("loss", 0.7) < 0.68 for line in live)  # the policy moved away from the reference


def test_changed_model_or_data_gets_a_new_cache(demo, tmp_path):
    root, model_dir, tokenized = demo
    model_copy, data_copy = tmp_path / "model", tmp_path / "tokenized"
    shutil.copytree(model_dir, model_copy)
    shutil.copytree(tokenized, data_copy, ignore=shutil.ignore_patterns("reference"))
    before = precompute(model_copy, data_copy)

    # The same data with chosen and rejected swapped, written over the shard in place.
    for shard in data_copy.glob("part-*.parquet"):
        table = pq.read_table(shard)
        swap = {"chosen": "rejected", "rejected": "chosen"}
        names = [
            swap[n.split("_")[0]] + n[n.index("_") :] if n.split("_")[0] in swap else n
            for n in table.column_names
        ]
        pq.write_table(table.rename_columns(names).select(table.column_names), shard)
    swapped = precompute(model_copy, data_copy)
    np.testing.assert_allclose(swapped, before[:, ::-1], rtol=1e-5, atol=1e-5)

    # Other weights saved over the model in place: same path, names, sizes and header.
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    cfg = model.load_config(model_copy)
    with jax.set_mesh(mesh):
        model.save_hf(model.init_params(cfg, jax.random.key(1), mesh), cfg, model_copy, dtype="float32")
    retrained = precompute(model_copy, data_copy)
    assert not np.allclose(retrained, swapped, atol=1e-3)
    assert len(list((data_copy / "reference").glob("*.npy"))) == 3


def test_interrupted_precompute_resumes(demo, tmp_path):
    _, model_dir, tokenized = demo
    data_copy = tmp_path / "tokenized"
    shutil.copytree(tokenized, data_copy, ignore=shutil.ignore_patterns("reference"))
    complete = precompute(model_dir, data_copy)
    (final,) = (data_copy / "reference").glob("*.npy")
    # What a killed run leaves: its progress file, with the rows it finished (pairs go shortest first, so
    # scattered rows) holding values no model gives, NaN elsewhere, and no table.
    done, marker = np.zeros(len(complete), bool), np.float32(123.0)
    done[::3] = True
    logps = np.where(done[:, None], marker, np.full_like(complete, np.nan))
    np.savez(final.with_name(final.stem + ".partial.npz"), logps=logps)
    final.unlink()
    resumed = precompute(model_dir, data_copy)
    assert np.all(resumed[done] == marker)  # kept, not recomputed
    np.testing.assert_allclose(resumed[~done], complete[~done], rtol=1e-5, atol=1e-5)
    assert not list((data_copy / "reference").glob("*.partial.npz"))


def test_a_long_pass_says_how_far_it_is(capsys, monkeypatch):
    """The reference's pass and an evaluation say done of total, the rate and what is left now and then (#32),
    not only once they end."""
    clock = iter([0.0, 10.0, 40.0, 50.0, 100.0])
    monkeypatch.setattr(bookkeeping.time, "time", lambda: next(clock))
    progress = bookkeeping.Progress("reference log-probs", "pairs", total=400, every=30.0)  # starts at 0 s
    for _ in range(4):  # at 10 s (too soon to say), 40 s, 50 s (too soon again), 100 s
        progress.advance(100)
    assert capsys.readouterr().out.splitlines() == [
        "reference log-probs: 200 of 400 pairs, 5.0 pairs/s, about 40 s left",
        "reference log-probs: 400 of 400 pairs, 4.0 pairs/s, about 0 s left",
    ]
