"""The training loop end to end on the demo's tiny model, against independent references: a run
that was never stopped, a single-batch run, HF transformers for the export, the DPO formula."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_metrics_close
from matplotlib.figure import Figure

import bookkeeping
import dpo
import model
import sharding

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(train_batch_size=8, max_seq_len=64, logits_chunk_size=32, learning_rate=3e-3, warmup=0.1,
             cooldown=0.2, steps_per_eval=3, max_eval_batches=2, log_every=100)  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's tiny HF-format Llama with its tokenizer, and its synthetic pairs."""
    return bookkeeping.make_demo(tmp_path_factory.mktemp("demo"), seed=0)


def run(demo, out: Path, **overrides) -> list[dict]:
    model_dir, pairs = demo
    fields = dict(SMALL, model_name_or_path=str(model_dir), train_data=str(pairs), output_dir=str(out))
    dpo.main(dpo.Config(**{**fields, **overrides}))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_losses(lines: list[dict]) -> list[float]:
    return [line["loss"] for line in lines if "loss" in line]


def assert_same_losses(lines: list[dict], reference: list[dict]) -> None:
    """The same training losses, step by step, to the rounding floor of the log-probs they are made from
    (tests/_tolerance.py): another mesh sums them in another order."""
    steps = lambda lines: [line for line in lines if "loss" in line]
    assert len(steps(lines)) == len(steps(reference))
    for got, want in zip(steps(lines), steps(reference), strict=True):
        assert_metrics_close(got, want, ["loss"], beta=0.1)


def newest_params(out: Path) -> dict[str, np.ndarray]:
    step = max(int(d.name[5:]) for d in (out / "checkpoints").glob("step-*"))
    folder = out / "checkpoints" / f"step-{step}" / "params"
    return {str(f.relative_to(folder)): np.load(f) for f in sorted(folder.rglob("*.npy"))}


def assert_the_report_shows_the_run(out, lines):
    """report.md says what ran and how it ended; curves.png holds every listed curve, train and eval, with
    metrics.jsonl's values; without matplotlib report.md says how to get the picture (#36)."""
    report = (out / "report.md").read_text()
    evals, train = [m for m in lines if "eval/loss" in m], [m for m in lines if "loss" in m]
    assert "`num_train_steps` | `40`" in report and f"eval/loss {evals[-1]['eval/loss']:.4g}" in report
    assert "steps 40 of 40" in report and "programs: compiled 1 training" in report
    assert (out / "curves.png").stat().st_size > 0 and "![curves](curves.png)" in report
    figure = bookkeeping.curves_figure(Figure(), train, evals)
    assert [ax.get_title() for ax in figure.axes] == list(bookkeeping.CURVES)
    for ax, key in zip(figure.axes, bookkeeping.CURVES, strict=True):
        lines_of = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines_of) == ({"train"} if key == "learning_rate" else {"train", "eval"})
        np.testing.assert_allclose(lines_of["train"].get_ydata(), [m[key] for m in train])
        if key != "learning_rate":
            np.testing.assert_allclose(lines_of["eval"].get_ydata(), [m[f"eval/{key}"] for m in evals])
    (out / "curves.png").unlink()
    installed = {name: m for name, m in sys.modules.items() if name.split(".")[0] == "matplotlib"}
    sys.modules.update(dict.fromkeys(installed))  # as if not installed:
    try:
        bookkeeping.write_report(out, {})  # the report still comes, without the picture
    finally:
        sys.modules.update(installed)
    assert not (out / "curves.png").exists() and 'pip install -e ".[plot]"' in (out / "report.md").read_text()


def test_demo_learns_the_preference_and_exports_for_transformers(tmp_path):
    import torch
    import transformers

    out = tmp_path / "run"
    settings = bookkeeping.DEMO_SETTINGS | dict(
        output_dir=str(out), num_train_steps=40, steps_per_eval=20, steps_per_hf_export=40
    )
    dpo.main(dpo.Config(**settings))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval/loss" in line]
    assert [e["step"] for e in evals] == [0, 20, 40]
    assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    assert evals[-1]["eval/rewards/accuracies"] >= 0.9 and evals[-1]["eval/loss"] < math.log(2)
    assert json.loads((out / "config.json").read_text())["num_train_steps"] == 40
    assert_the_report_shows_the_run(out, lines)

    # The export loads in transformers as it is and computes our logits.
    export = out / "hf" / "step-40"
    hf = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "please tell me some colors"}],
                                        add_generation_prompt=True, return_dict=False)  # fmt: skip
    tokens = np.array([ids + ids[:5]], dtype=np.int32)
    expected = hf(torch.tensor(tokens, dtype=torch.long)).logits.detach().numpy()
    cfg = model.load_config(export)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        got = np.asarray(model.logits(model.load_params(export, cfg, mesh), jnp.asarray(tokens), cfg))
    # bf16 export of f32 weights: compare against our own logits of the same rounded weights.
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] in (
        cfg.eos_token_id[0], list(cfg.eos_token_id))  # fmt: skip


def test_a_demo_run_copied_elsewhere_resumes_and_the_last_line_names_only_what_is_there(tmp_path, capsys):
    """The demo's model and pairs live in its run directory; config.json records the demo as given, so the
    directory (given as an absolute path) copied elsewhere resumes there, here for a longer run: with a
    learning rate that does not follow the run's length, exactly as a run of that length from the start.
    "transformers loads hf/step-N" is said only where there is an hf/."""
    settings = bookkeeping.DEMO_SETTINGS | dict(steps_per_eval=2, steps_per_checkpoint=2, max_eval_batches=1)
    settings |= dict(lr_schedule="constant", cooldown=0)  # warmup 5% of 2 or 3 steps: none
    del settings["output_dir"], settings["num_train_steps"], settings["steps_per_hf_export"]
    first, copy = tmp_path / "first", tmp_path / "elsewhere" / "copy"
    dpo.main(dpo.Config(**settings, output_dir=str(first), num_train_steps=0))
    assert "transformers loads" not in capsys.readouterr().out  # no step, no export
    dpo.main(dpo.Config(**settings, output_dir=str(first), num_train_steps=2, steps_per_hf_export=2))
    assert "(transformers loads hf/step-N as it is)" in capsys.readouterr().out
    saved = json.loads((first / "config.json").read_text())
    assert saved["model_name_or_path"] == "demo" and saved["train_data"] is None
    shutil.copytree(first, copy)
    shutil.rmtree(first)  # nothing of the first place is left to lean on
    dpo.main(dpo.Config(**settings, output_dir=str(copy), num_train_steps=3, steps_per_hf_export=2))
    assert f"resumed from {copy}/checkpoints/step-2" in capsys.readouterr().out
    straight = tmp_path / "straight"
    dpo.main(dpo.Config(**settings, output_dir=str(straight), num_train_steps=3, steps_per_hf_export=2))
    extended, whole = newest_params(copy), newest_params(straight)
    assert extended.keys() == whole.keys() and all(np.array_equal(extended[k], whole[k]) for k in whole)


def test_stop_and_resume_equals_an_uninterrupted_run(demo, tmp_path):
    settings = dict(num_train_steps=6, steps_per_checkpoint=2, keep_checkpoints=10, steps_per_hf_export=6)
    straight = run(demo, tmp_path / "straight", **settings)
    resumed_dir = tmp_path / "resumed"
    run(demo, resumed_dir, **settings)
    # Pretend the run died right after its step-2 checkpoint.
    for step in (4, 6):
        shutil.rmtree(resumed_dir / "checkpoints" / f"step-{step}")
    resumed = run(demo, resumed_dir, **settings)
    strip = lambda lines: [{k: v for k, v in ln.items() if not k.startswith("throughput")} for ln in lines]
    assert strip(resumed) == strip(straight)
    a, b = newest_params(tmp_path / "straight"), newest_params(resumed_dir)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_overfitting_a_handful_of_pairs_reaches_accuracy_one(demo, tmp_path):
    rng = np.random.default_rng(1)
    words = "red cat bread hammer blue dog rice saw green horse apple drill".split()
    pairs = tmp_path / "few.jsonl"
    with open(pairs, "w") as f:
        for _ in range(8):  # no rule to learn: the preference can only be memorised
            say = lambda: " ".join(rng.choice(words, size=4))
            row = {"prompt": "please tell me some " + say(), "chosen": say(), "rejected": say()}
            f.write(json.dumps(row) + "\n")
    lines = run(demo, tmp_path / "run", train_data=str(pairs), validation_split_fraction=None,
                validation_data=str(pairs), num_train_steps=30, learning_rate=1e-2)  # fmt: skip
    assert lines[-2]["rewards/accuracies"] == 1.0  # the last training step
    assert lines[-1]["eval/rewards/accuracies"] == 1.0 and lines[-1]["eval/loss"] < 0.1


def test_two_evaluation_sets_log_each_under_its_name_as_it_gives_alone(demo, tmp_path, capsys):
    """validation_data with two sets, one named by its file and one NAME=SOURCE: each is evaluated at every
    eval step under eval/NAME/ (the console and the report too), and its numbers are those of a run with it
    as the only set, which logs under eval/ as before; training is the same."""
    rows = demo[1].read_text().splitlines()
    (tmp_path / "first.jsonl").write_text("\n".join(rows[:24]) + "\n")
    (tmp_path / "second.jsonl").write_text("\n".join(rows[24:56]) + "\n")
    sets = [str(tmp_path / "first.jsonl"), f"held={tmp_path / 'second.jsonl'}"]
    settings = dict(num_train_steps=2, steps_per_eval=2)
    both = run(demo, tmp_path / "both", validation_data=sets, **settings)
    assert "step 2 | eval first.jsonl loss" in capsys.readouterr().out
    alone = {
        name: run(demo, tmp_path / f"alone-{name}", validation_data=[s], **settings)
        for name, s in zip(["first.jsonl", "held"], sets, strict=True)
    }
    evals = lambda lines, prefix: [
        {k[len(prefix) :]: v for k, v in m.items() if k.startswith(prefix)}
        for m in lines
        if prefix + "loss" in m
    ]
    strip = lambda lines: [
        {k: v for k, v in m.items() if "eval/" not in k and "throughput" not in k} for m in lines
    ]
    for name, lines in alone.items():
        assert len(evals(lines, "eval/")) == 2 and evals(both, f"eval/{name}/") == evals(lines, "eval/")
        assert strip(both) == strip(lines)
    report = (tmp_path / "both" / "report.md").read_text()
    assert (
        "final eval/first.jsonl (step 2)" in report and "final eval/held (step 2): eval/held/loss" in report
    )


def test_mesh_shapes_and_microbatches_give_the_same_losses(demo, tmp_path):
    base = run(demo, tmp_path / "fsdp", num_train_steps=3, mesh_fsdp=8)
    for data, fsdp, tensor in [(8, 1, 1), (2, 2, 2), (1, 4, 2)]:
        other = run(demo, tmp_path / f"m{data}{fsdp}{tensor}", num_train_steps=3, mesh_data=data,
                    mesh_fsdp=fsdp, mesh_tensor=tensor)  # fmt: skip
        assert_same_losses(other, base)
    # Accumulating two microbatches of 8 pairs gives the step that one batch of 16 gives.
    whole = run(demo, tmp_path / "whole", num_train_steps=3, train_batch_size=16, mesh_data=2)
    micro = run(demo, tmp_path / "micro", num_train_steps=3, train_batch_size=16, microbatch_size=8,
                mesh_data=2)  # fmt: skip
    assert_same_losses(micro, whole)


def test_zero_steps_only_evaluates(demo, tmp_path):
    lines = run(demo, tmp_path / "run", num_train_steps=0)
    assert len(lines) == 1 and lines[0]["step"] == 0 and "eval/loss" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run([sys.executable, str(ROOT / "dpo.py"), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)  # fmt: skip


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config.beta", "-1"], "beta must be > 0"),
        (["--config.loss-type", "dpo"], "dpo"),
        (["--config.microbatch_size", "5"], "microbatch_size 5 must divide train_batch_size"),
        (["--config.model-name-or-path", "/no/such/model", "--config.train-data", "x"], "/no/such/model"),
    ],
)
def test_bad_config_gives_a_short_error(args, message, tmp_path):
    result = cli(*args, "--config.output-dir", str(tmp_path / "run"))
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 8


def test_batch_that_does_not_split_over_the_mesh_is_refused(demo, tmp_path):
    model_dir, pairs = demo
    result = cli("--config.model-name-or-path", str(model_dir), "--config.train-data", str(pairs),
                 "--config.train-batch-size", "12", "--config.output-dir", str(tmp_path / "run"))  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error:") and "12" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_help_explains_every_field():
    result = cli("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for field in dpo.Config.__dataclass_fields__:
        assert "--config." + field.replace("_", "-") in text
    assert "strength of the pull toward the reference" in text
    assert all(name in text for name in dpo.losses.LOSSES)  # --config.loss-type's choices
    # The description is the docstring's examples, each on its line: no paragraph joined into one (#32).
    assert "python dpo.py --help" in result.stdout and "--config.reference-mode precompute" in result.stdout
    assert max(map(len, result.stdout.splitlines())) <= 200
