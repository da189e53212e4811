"""Real `python dpo.py` processes for the fault and multi-process tests: start, watch, signal, read back.

Every run uses the demo's tiny model on the CPU with a few fake devices, batch 8 and a few steps, so a
process takes seconds, most of it start-up and compilation.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# XLA:CPU backend flags every test compiles with, in its own process and in each it starts (conftest.py says
# what they change and why that cannot hide a bug of this code).
CHEAP_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
WAIT = 300  # seconds before a test gives up on a process that should have moved on (never a pass/fail bar)

SMALL_RUN = dict(
    train_batch_size=8,
    num_train_steps=8,
    learning_rate=1e-3,  # large enough that every step visibly changes the weights
    warmup=2,
    max_seq_len=64,
    logits_chunk_size=32,
    steps_per_eval=4,
    max_eval_batches=1,
    steps_per_checkpoint=2,
    keep_checkpoints=2,
    steps_per_hf_export=100,  # only the final export
)


def dpo_args(model_dir: Path, train_data: Path, output_dir: Path, **overrides) -> list[str]:
    settings = SMALL_RUN | dict(model_name_or_path=model_dir, train_data=train_data, output_dir=output_dir)
    return [f"--config.{k}={v}" for k, v in (settings | overrides).items()]


def environment(devices: int, **env) -> dict[str, str]:
    """A child process's environment: `devices` fake CPU devices, no launcher's variables but `env`."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "DPO_"))}
    return inherited | dict(
        JAX_PLATFORMS="cpu",
        # The flags of every test (conftest.py says why they cannot hide a bug of this code): compiling is
        # most of a short run. Every run a test compares uses the same flags. (No persistent compilation
        # cache: executables loaded from it have deadlocked in collectives between fake devices.)
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {CHEAP_COMPILE}",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        **env,
    )


def start(args: list[str], devices: int, log: Path, cwd: Path = ROOT, **env) -> subprocess.Popen:
    """`python dpo.py ARGS` in `cwd` on `devices` fake CPU devices; stdout to LOG.out, stderr to LOG.err."""
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "dpo.py"), *args],
            cwd=cwd,
            env=environment(devices, **env),
            stdout=out,
            stderr=err,
        )
    proc.log = log
    return proc


def stdout(proc: subprocess.Popen) -> str:
    return proc.log.with_suffix(".out").read_text()


def stderr(proc: subprocess.Popen) -> str:
    return proc.log.with_suffix(".err").read_text()


def output(proc: subprocess.Popen) -> str:
    """What the process wrote so far, stdout then stderr."""
    return stdout(proc) + stderr(proc)


def finish(*procs: subprocess.Popen) -> list[int]:
    """Wait for every process; the exit codes. If one fails, the others (stuck in a collective) are killed."""
    deadline = time.monotonic() + WAIT
    while any(p.poll() is None for p in procs):
        failed = any(p.poll() not in (None, 0) for p in procs)
        if failed or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()
            logs = "\n".join(f"--- process {i}:\n{output(p)[-3000:]}" for i, p in enumerate(procs))
            raise AssertionError(f"{'a process failed' if failed else 'timed out'}\n{logs}")
        time.sleep(0.05)
    return [p.returncode for p in procs]


def training_lines(run: Path) -> list[dict]:
    """metrics.jsonl's training lines (eval lines left out) in file order; safe while the run appends."""
    try:
        text = (run / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    # Every line ends with a newline once written whole: the last piece is "" or a half-written line.
    return [m for m in map(json.loads, text.split("\n")[:-1]) if "loss" in m]


def wait_until(proc: subprocess.Popen, condition, what: str) -> None:
    """Return as soon as `condition()` holds, while the process goes on running."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert proc.poll() is None, f"exited with {proc.returncode} before {what}:\n{output(proc)}"
        assert time.monotonic() < deadline, f"no {what} after {WAIT}s:\n{output(proc)}"
        time.sleep(0.02)


def wait_for_training(proc: subprocess.Popen) -> None:
    """Return once process 0 has printed "training steps": it does so just before the first step, after
    installing the SIGTERM/SIGINT handler (and, in a fresh run, after an evaluation that every process
    takes part in, so they all have theirs). From then on, a signal means "stop after this step"."""
    wait_until(proc, lambda: "training steps" in stdout(proc), "the training loop")


def checkpoints(run: Path) -> list[int]:
    """Steps of the complete checkpoints (with the done.json marker)."""
    folder = run / "checkpoints"
    marked = folder.glob("step-*/done.json") if folder.exists() else []
    return sorted(int(f.parent.name.removeprefix("step-")) for f in marked)


def params(run: Path, step: int) -> dict[str, np.ndarray]:
    """The f32 weights of checkpoint step-N, by file name."""
    folder = run / "checkpoints" / f"step-{step}" / "params"
    return {str(f.relative_to(folder)): np.load(f) for f in sorted(folder.rglob("*.npy"))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
