"""Faults on real `python dpo.py` processes: SIGTERM / SIGINT, kill -9 (also mid-checkpoint), non-finite
losses, pruning, a changed config. The reference is a run of the same config that nothing interrupted."""

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _fault_helpers import (
    ROOT,
    SMALL_RUN,
    checkpoints,
    dpo_args,
    finish,
    output,
    params,
    start,
    stderr,
    stdout,
    training_lines,
    wait_for_training,
    wait_until,
)

import bookkeeping
import dpo

DEVICES = 2  # fsdp=2: checkpoints hold sharded arrays, restored slice by slice
STEPS = 8


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return bookkeeping.make_demo(tmp_path_factory.mktemp("demo"), seed=0)  # (model_dir, pairs.jsonl)


@pytest.fixture(scope="module")
def uninterrupted(demo, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = start(dpo_args(*demo, run), DEVICES, run.with_name("log"))
    assert finish(proc) == [0], output(proc)
    return run


def assert_same_training(run, reference):
    """Every step logged once with the reference's loss, and the final weights bit for bit the same."""
    assert [(m["step"], m["loss"]) for m in training_lines(run)] == [
        (m["step"], m["loss"]) for m in training_lines(reference)
    ]
    ours, theirs = params(run, STEPS), params(reference, STEPS)
    assert ours.keys() == theirs.keys() and len(ours) > 0
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_only_the_newest_k_checkpoints_are_kept(uninterrupted):
    # steps_per_checkpoint=2, keep_checkpoints=2: steps 2 and 4 were written, then removed.
    assert sorted(p.name for p in (uninterrupted / "checkpoints").iterdir()) == ["step-6", "step-8"]
    assert checkpoints(uninterrupted) == [6, 8]


def test_sigterm_and_sigint_stop_at_a_checkpoint_and_the_same_command_resumes(demo, uninterrupted, tmp_path):
    run = tmp_path / "run"
    args = dpo_args(*demo, run)
    stopped_at = 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = start(args, DEVICES, tmp_path / sig.name)
        wait_for_training(proc)
        proc.send_signal(sig)
        assert finish(proc) == [0], output(proc)
        assert "Run the same command to resume" in stdout(proc)
        assert stopped_at < checkpoints(run)[-1] < STEPS  # the step it was in, scheduled or not
        if stopped_at:
            assert f"resumed from {run}/checkpoints/step-{stopped_at}" in stdout(proc)
        stopped_at = checkpoints(run)[-1]
        assert training_lines(run)[-1]["step"] == stopped_at
    proc = start(args, DEVICES, tmp_path / "last")
    assert finish(proc) == [0], output(proc)
    assert_same_training(run, uninterrupted)


def test_the_eval_and_export_a_stop_request_skipped_are_done_on_resume(demo, uninterrupted, tmp_path):
    """An eval and an export due at every step: whichever step the SIGTERM stops at, the resumed run has them
    all, and its evals equal the uninterrupted run's (which evaluated at steps 0, 4 and 8)."""
    run = tmp_path / "run"
    args = dpo_args(*demo, run, steps_per_eval=1, steps_per_hf_export=1)
    proc = start(args, DEVICES, tmp_path / "stopped")
    wait_until(proc, lambda: training_lines(run), "a training step")
    proc.send_signal(signal.SIGTERM)
    assert finish(proc) == [0], output(proc)
    stopped_at = checkpoints(run)[-1]
    assert stopped_at < STEPS and not (run / "hf" / f"step-{stopped_at}").exists()
    proc = start(args, DEVICES, tmp_path / "resumed")
    assert finish(proc) == [0], output(proc)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {m["step"]: m["eval/loss"] for m in lines if "eval/loss" in m}
    assert sorted(evals) == list(range(STEPS + 1))
    reference = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert {m["step"]: evals[m["step"]] for m in reference if "eval/loss" in m} == {
        m["step"]: m["eval/loss"] for m in reference if "eval/loss" in m
    }
    exported = sorted(int(p.parent.name.removeprefix("step-")) for p in (run / "hf").glob("*/config.json"))
    assert exported == list(range(1, STEPS + 1))
    assert_same_training(run, uninterrupted)


def test_kill_9_even_mid_checkpoint_resumes_from_the_newest_complete_one(demo, uninterrupted, tmp_path):
    run = tmp_path / "run"
    args = dpo_args(*demo, run, steps_per_checkpoint=1)  # a checkpoint every step: a kill often lands in one
    proc = start(args, DEVICES, tmp_path / "killed")
    wait_until(proc, lambda: checkpoints(run), "a checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = checkpoints(run)[-1]
    assert newest < STEPS

    # Whatever moment the kill hit, this is the worst a crash in save_checkpoint leaves: a half-written
    # .step-N.dpo-tmp, a renamed step-N still without its done.json marker (newer than any complete one,
    # with a cut-short file), and a metrics line cut short.
    folder = run / "checkpoints"
    for name in (f".step-{newest + 1}.dpo-tmp", f"step-{newest + 2}"):
        shutil.rmtree(folder / name, ignore_errors=True)
        shutil.copytree(folder / f"step-{newest}", folder / name)
        (folder / name / "done.json").unlink()
        cut = folder / name / "params" / "embed.npy"
        cut.write_bytes(cut.read_bytes()[:100])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "lo')

    proc = start(args, DEVICES, tmp_path / "resumed")
    assert finish(proc) == [0], output(proc)
    assert f"resumed from {run}/checkpoints/step-{newest}" in stdout(proc)
    assert_same_training(run, uninterrupted)
    assert sorted(p.name for p in folder.iterdir()) == [f"step-{STEPS - 1}", f"step-{STEPS}"]  # debris gone


# A learning rate of 1e38 makes step 1's update push weights to near the float32 limit, so step 2's
# loss is NaN: a real overflow, reached without any test hook in dpo.py.
EXPLODING = dict(learning_rate=1e38, warmup=0, num_train_steps=4, steps_per_checkpoint=1)


def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(demo, tmp_path):
    run = tmp_path / "run"
    proc = start(dpo_args(*demo, run, **EXPLODING), DEVICES, tmp_path / "stop")
    assert finish(proc) == [2], output(proc)
    error = stderr(proc).strip().splitlines()[-1]
    assert error.startswith("error: step 2: non-finite loss") and "newest good checkpoint: step-1" in error
    assert checkpoints(run) == [1]
    assert all(np.isfinite(w).all() for w in params(run, 1).values())
    good = params(run, 1)

    # As the message suggests: the same command with on_nonfinite=skip resumes and skips those updates.
    proc = start(dpo_args(*demo, run, **EXPLODING, on_nonfinite="skip"), DEVICES, tmp_path / "skip")
    assert finish(proc) == [0], output(proc)
    assert "step 2: non-finite loss or gradient, update skipped" in stdout(proc)
    assert [m["skipped_updates"] for m in training_lines(run)] == [0, 1, 2, 3]
    final = params(run, 4)
    for name in good:  # no skipped update touched the weights
        np.testing.assert_array_equal(final[name], good[name], err_msg=name)


def test_a_changed_config_is_refused_unless_overwrite(demo, uninterrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    proc = start(dpo_args(*demo, run, beta=0.2, num_train_steps=12), DEVICES, tmp_path / "changed")
    assert finish(proc) == [2], output(proc)
    error = stderr(proc).strip().splitlines()[-1]
    assert "holds a run with a different config (beta: 0.1 -> 0.2)" in error and "--config.overwrite" in error
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before  # nothing touched

    same = SMALL_RUN | dict(model_name_or_path=str(demo[0]), train_data=str(demo[1]), output_dir=str(run))
    overwrite = dpo.Config(**same | dict(beta=0.2, overwrite=True))
    bookkeeping.check_run_dir(run, overwrite)
    bookkeeping.start_run_dir(run, overwrite)
    assert not any((run / name).exists() for name in ("checkpoints", "hf", "metrics.jsonl"))


def test_a_resume_takes_what_computes_the_same_and_refuses_what_would_not(tmp_path):
    """On resume: the layouts and the ways of computing a step may change (exact up to rounding), as may
    lora_alpha None for its value 2 * rank and lora_targets' order; num_train_steps only where the steps
    taken keep their learning rates (written out here by hand); the rest is refused."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step-4").mkdir(parents=True)
    (run / "checkpoints" / "step-4" / "done.json").write_text("{}")
    first = dpo.Config(
        train_data="x", output_dir=str(run), num_train_steps=8, lora_rank=4, lora_targets=("q", "v")
    )
    (run / "config.json").write_text(json.dumps(json.loads(json.dumps(vars(first)))))
    check = lambda **change: bookkeeping.check_run_dir(run, dataclasses.replace(first, **change))
    check(microbatch_size=32, prefix_sharing=False, packing=True, remat="none", logits_chunk_size=64)
    check(lora_alpha=8.0, lora_targets=("v", "q"))
    for change in [dict(lora_alpha=4.0), dict(lora_targets=("q",)), dict(group_by_length=True)]:
        with pytest.raises(ValueError, match="holds a run with a different config"):
            check(**change)
    # The default schedule (linear decay, warmup and cooldown 10% of the run) depends on the run's length.
    with pytest.raises(
        ValueError, match="took 4 steps of a 8-step learning-rate schedule.*num_train_steps 8"
    ):
        check(num_train_steps=12)
    with pytest.raises(ValueError, match="has taken 4 steps, more than num_train_steps 3"):
        check(num_train_steps=3)
    # A constant rate after 2 warmup steps, then 2 steps of cooldown: steps 1-4 took 0.5, 1, 1 and 1 x the
    # peak for any length from 5 on, so the run goes on as one of the new length would; at length 4 the
    # fourth step would have been half cooled down.
    constant = dict(lr_schedule="constant", warmup=2, cooldown=2)
    first = dataclasses.replace(first, **constant)
    (run / "config.json").write_text(json.dumps(json.loads(json.dumps(vars(first)))))
    lengths, peak = [5, 8, 100], first.learning_rate
    taken = [np.asarray(dataclasses.replace(first, num_train_steps=n).lr_at(np.arange(4))) for n in lengths]
    np.testing.assert_allclose(taken, [[0.0, 0.5 * peak, peak, peak]] * 3, rtol=1e-6)  # f32 rates
    for length in lengths:
        check(num_train_steps=length)
    with pytest.raises(ValueError, match="took 4 steps of a 8-step learning-rate schedule"):
        check(num_train_steps=4)


def test_overwrite_resumes_the_same_run_and_says_what_it_deletes(tmp_path, capsys):
    """--config.overwrite kept in the command (a requeued SLURM job, or "Run the same command to resume"
    after a stop request): a run of the same config and data goes on, nothing deleted. A config that
    computes otherwise, or other data, deletes the old run's checkpoints, exports and metrics, saying so in
    one line that names them. (Before: the same command deleted them all, without a word.)"""
    run = tmp_path / "run"
    config = dpo.Config(train_data="x", output_dir=str(run), num_train_steps=8, overwrite=True)
    everything = ["checkpoints", "hf", "metrics.jsonl", "wandb-id"]

    def saved_run(first=config):  # a run stopped after its checkpoint at step 4, trained on data "d1"
        for folder in ("checkpoints/step-4", "hf/step-4"):
            (run / folder).mkdir(parents=True, exist_ok=True)
        (run / "checkpoints" / "step-4" / "done.json").write_text(json.dumps({"step": 4, "data": "d1"}))
        (run / "metrics.jsonl").write_text('{"step": 4, "loss": 0.5}\n')
        (run / "wandb-id").write_text("abc")
        (run / "config.json").write_text(json.dumps(dataclasses.asdict(first)))

    def start(now, **given):  # what dpo.main does before training
        bookkeeping.check_run_dir(run, now)
        bookkeeping.start_run_dir(run, now, **given)
        return capsys.readouterr().out.splitlines(), [n for n in everything if (run / n).exists()]

    saved_run()
    for now, given in [
        (config, {}),  # the same command
        (dataclasses.replace(config, steps_per_checkpoint=7, microbatch_size=4), {}),  # operational changes
        (config, dict(data_id="d1")),  # the same data
    ]:
        said, kept = start(now, **given)
        assert kept == everything and said == [f"overwrite: {run} holds a run of this config and data, which "
                                               "goes on: nothing deleted"]  # fmt: skip
    for now, given, why in [
        (dataclasses.replace(config, beta=0.2), {}, "(beta: 0.1 -> 0.2)"),
        (config, dict(data_id="d2"), "(the training or validation data changed since its checkpoints)"),
        (dataclasses.replace(config, num_train_steps=12), {}, "(num_train_steps: 8 -> 12)"),  # lr decays
    ]:
        saved_run()
        said, kept = start(now, **given)
        deleted = "checkpoints/, hf/, metrics.jsonl, wandb-id"
        assert kept == [] and said == [f"overwrite: {run} holds another run {why}: deleting its {deleted}"]
    # A constant rate: 12 steps take the same first 4 rates as 8, so the longer run goes on from step 4.
    constant = dataclasses.replace(config, lr_schedule="constant", warmup=0, cooldown=0)
    saved_run(constant)
    longer = dataclasses.replace(constant, num_train_steps=12)
    assert start(longer)[1] == everything


HOLD_THE_LOCK = """
import sys, bookkeeping, pathlib
with bookkeeping.run_lock(pathlib.Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_run_in_a_run_directory_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
    """Two runs in one output_dir at once wrote every metrics line twice and raced over the checkpoints: the
    second is refused in one line naming the first's host and process id. A run killed with kill -9 (or a
    lock file naming a process long gone) never blocks the resume."""
    with pytest.raises(ValueError, match="/proc/no/run/lock: "):  # a run directory that cannot be made
        with bookkeeping.run_lock(Path("/proc/no/run")):
            pass
    run, me = tmp_path / "run", f"host {socket.gethostname()}, process id"
    environment = os.environ | dict(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(run)],
        cwd=ROOT, env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ValueError, match=rf"^{run} is in use by another run \({me} {holder.pid}\): wait"):
            with bookkeeping.run_lock(run):
                pass
    finally:
        holder.kill()  # kill -9: nothing of it runs on the way out; its lock file stays, naming it
        holder.wait()
    assert (run / "lock").read_text() == f"{me} {holder.pid}\n"
    with bookkeeping.run_lock(run):
        assert (run / "lock").read_text() == f"{me} {os.getpid()}\n"
        with pytest.raises(ValueError, match="is in use by another run"):  # also from within one process
            with bookkeeping.run_lock(run):
                pass
    (run / "lock").write_text("host elsewhere, process id 1\n")  # a lost host's: nobody holds it
    with bookkeeping.run_lock(run):
        assert (run / "lock").read_text() == f"{me} {os.getpid()}\n"
