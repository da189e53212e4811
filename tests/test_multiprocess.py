"""Two `python dpo.py` processes with 4 fake CPU devices each, joined by jax.distributed (gloo over
loopback), against one process with 8 devices: the same run, step for step, whether the processes hold
different rows of the batch (data spans them) or the same rows (context spans them)."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _fault_helpers import (
    ROOT,
    WAIT,
    checkpoints,
    dpo_args,
    environment,
    finish,
    free_port,
    output,
    params,
    start,
    stdout,
    training_lines,
    wait_for_training,
)

import bookkeeping
import data

STEPS = 6
# data spans the two processes; fsdp and context (each row's tokens split in two) lie within each
SETTINGS = dict(num_train_steps=STEPS, steps_per_checkpoint=3, mesh_data=2, mesh_fsdp=-1, mesh_context=2)
# context spans the two processes (a row's 8 token chunks, 4 on each): both hold every row of the batch, and
# so both must feed all of them. The reference precomputed: its pass loads the rows the same way (each run
# on a copy of the tokenized data, beside which the table is kept, so that each computes its own).
CONTEXT = SETTINGS | dict(mesh_data=1, mesh_fsdp=1, mesh_context=8, reference_mode="precompute")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The demo model and its pairs, tokenized beforehand: a data.py output dir is read where it is."""
    root = tmp_path_factory.mktemp("demo")
    model_dir, pairs = bookkeeping.make_demo(root, seed=0)
    data.tokenize(str(pairs), str(model_dir), str(root / "tokenized"), max_seq_len=64)
    return model_dir, root / "tokenized"


@pytest.fixture(scope="module")
def one_process(inputs, tmp_path_factory):
    run = tmp_path_factory.mktemp("one") / "run"
    proc = start(dpo_args(*inputs, run, **SETTINGS), 8, run.with_name("log"))
    assert finish(proc) == [0], output(proc)
    return run


@pytest.fixture(scope="module")
def one_process_context(inputs, tmp_path_factory):
    run = tmp_path_factory.mktemp("one-context") / "run"
    proc = start(
        dpo_args(inputs[0], own_copy(inputs[1], run.parent), run, **CONTEXT), 8, run.with_name("log")
    )
    assert finish(proc) == [0], output(proc)
    return run


def own_copy(tokenized: Path, folder: Path) -> Path:
    return Path(shutil.copytree(tokenized, folder / "tokenized"))


def start_two(args: list[str], log_dir: Path, cwds=(ROOT, ROOT)) -> list:
    """Process 0 joins through the config flags, process 1 through the environment (a launch by hand)."""
    address = f"127.0.0.1:{free_port()}"
    flags = [f"--config.coordinator-address={address}", "--config.num-processes=2", "--config.process-id=0"]
    env = dict(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
    return [
        start(args + flags, 4, log_dir / "p0", cwd=cwds[0]),
        start(args, 4, log_dir / "p1", cwd=cwds[1], **env),
    ]


def assert_same_training(run, reference):
    """Each step logged once, with the single process's metrics; the same final weights (f32, CPU)."""
    ours, theirs = training_lines(run), training_lines(reference)
    assert [m["step"] for m in ours] == [m["step"] for m in theirs] == list(range(1, STEPS + 1))
    for key in ("grad_norm", "logps/chosen", "logps/rejected"):
        np.testing.assert_allclose([m[key] for m in ours], [m[key] for m in theirs], rtol=1e-5, err_msg=key)
    # A margin is beta * a difference of log-probs that nearly cancel, and the loss a sigmoid of it: their
    # floor is that of the log-probs they are made from (f32, all-reduced in another order over two processes
    # and carried through 6 updates), not of themselves (tests/_tolerance.py says why).
    floor = 1e-5 * 0.1 * max(abs(m[k]) for m in theirs for k in ("logps/chosen", "logps/rejected"))
    for key in ("loss", "rewards/margins"):
        np.testing.assert_allclose(
            [m[key] for m in ours], [m[key] for m in theirs], rtol=1e-5, atol=floor, err_msg=key
        )
    final, expected = params(run, STEPS), params(reference, STEPS)
    assert final.keys() == expected.keys()
    for name in final:
        np.testing.assert_allclose(final[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_two_processes_train_like_one_and_only_process_0_writes(inputs, one_process, tmp_path):
    # The same command with a relative output_dir, each process in a directory of its own (as hosts
    # without a shared disk would be): whatever shows up under process 1's, process 1 wrote. A fresh
    # run with tokenized data reads nothing from its run directory, so the run is unchanged.
    cwds = tmp_path / "p0", tmp_path / "p1"
    for cwd in cwds:
        cwd.mkdir()
    procs = start_two(dpo_args(*inputs, "run", **SETTINGS), tmp_path, cwds)
    assert finish(*procs) == [0, 0], output(procs[0])
    run = cwds[0] / "run"
    assert_same_training(run, one_process)
    assert checkpoints(run) == [3, 6] and (run / "hf" / f"step-{STEPS}" / "model.safetensors").exists()
    assert list(cwds[1].iterdir()) == []


def test_context_spanning_both_processes_trains_like_one_and_a_sigterm_to_one_stops_both_and_both_resume(
    inputs, one_process_context, tmp_path
):
    """The processes hold the same rows (context spans them): both compute the reference and train as one
    process does, and a preemption notice to one of them stops both at one checkpoint, from which both
    resume."""
    run, tokenized = tmp_path / "run", own_copy(inputs[1], tmp_path)
    args = dpo_args(inputs[0], tokenized, run, **CONTEXT)
    procs = start_two(args, tmp_path)
    wait_for_training(procs[0])
    procs[1].send_signal(signal.SIGTERM)  # a preemption notice that reached one host only
    assert finish(*procs) == [0, 0], output(procs[0])
    assert f"of {len(data.PairDataset(tokenized))} pairs to compute" in stdout(procs[0])
    stopped_at = checkpoints(run)[-1]
    assert 1 <= stopped_at < STEPS and f"stopped at step {stopped_at}" in stdout(procs[0])

    procs = start_two(args, tmp_path)
    assert finish(*procs) == [0, 0], output(procs[0])
    assert f"resumed from {run}/checkpoints/step-{stopped_at}" in stdout(procs[0])
    assert_same_training(run, one_process_context)


# Two processes that only build meshes (no model, nothing compiled): which process holds which devices along
# each axis, and which rows of the batch each then feeds.
PROBE = """
import json, sys
import sharding
sharding.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
for data, fsdp, context in [(1, 1, 8), (2, 2, 2)]:
    mesh = sharding.make_mesh(data, fsdp, 1, context=context)
    owners = [[device.process_index for device in mesh.devices[i, :, :, 0].flat] for i in range(data)]
    print(json.dumps([owners, sharding.row_slices(mesh)]))
"""


def test_row_slices_of_two_real_processes():
    address = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PROBE, address, str(p)],
            cwd=ROOT,
            env=environment(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in (0, 1)
    ]
    outputs = [proc.communicate(timeout=WAIT) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    for p, (out, _) in enumerate(outputs):
        spanning, split = map(json.loads, out.splitlines())
        # (which process holds each device, by data index; the row slice this process feeds, of how many)
        # context=8 crosses from process 0's devices to process 1's: both hold (and feed) every row
        assert spanning == [[[0, 0, 0, 0, 1, 1, 1, 1]], [0, 1]]
        # data=2 splits the processes (fsdp and context within each): process p feeds slice p of 2, as before
        assert split == [[[0, 0, 0, 0], [1, 1, 1, 1]], [p, 2]]
