"""Bad input and faults through the real command lines (`python dpo.py`, `python data.py`, in subprocesses):
each gives one clear line on stderr, loses nothing and never trains on nothing."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.numpy
from _data_templates import build_tokenizer
from _fault_helpers import CHEAP_COMPILE

import bookkeeping
import data
import dpo
import losses
import model

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(train_batch_size=8, max_seq_len=64, logits_chunk_size=32, max_eval_batches=1, num_train_steps=2)


def run_cli(script: str, *args, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` on one CPU device; with file_size_limit (kB), every file it writes stops at that
    size, as on a full disk: the write fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env |= dict(JAX_PLATFORMS="cpu", XLA_FLAGS=CHEAP_COMPILE, HF_HUB_OFFLINE="1")
    command = [sys.executable, str(ROOT / script), *map(str, args)]
    if file_size_limit:  # bash's ulimit counts kB; a write past it fails once SIGXFSZ is ignored
        command = ["bash", "-c", f'ulimit -f {file_size_limit}; trap \'\' XFSZ; exec "$0" "$@"', *command]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def dpo_cli(model_dir, train_data, output_dir, *extra, file_size_limit=None, **settings):
    paths = dict(model_name_or_path=model_dir, train_data=train_data, output_dir=output_dir)
    args = [f"--config.{k}={v}" for k, v in (SMALL | paths | settings).items()]
    return run_cli("dpo.py", *args, *extra, file_size_limit=file_size_limit)


def one_line_error(result, *fragments):
    """Exit code 2 and a single `error:` line on stderr holding every fragment; no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("tokenize")]
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, (
        result.stderr
    )
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return bookkeeping.make_demo(tmp_path_factory.mktemp("demo"), seed=0)  # (model_dir, pairs.jsonl)


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    """A finished run of 2 steps with checkpoints at 1 and 2, an export and metrics."""
    run = tmp_path_factory.mktemp("trained") / "run"
    result = dpo_cli(*demo, run, num_train_steps=2, steps_per_checkpoint=1, steps_per_hf_export=2)
    assert result.returncode == 0, result.stderr
    return run


def test_data_py_never_deletes_files_it_did_not_write(demo, tmp_path):
    model_dir, pairs = demo
    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(pairs, folder / "pairs.jsonl")
    (folder / "notes.txt").write_text("mine")
    before = listing(folder)
    args = ["--tokenizer", model_dir, "--overwrite"]
    # An output holding the input, or a folder with other files: refused, even with --overwrite.
    one_line_error(
        run_cli("data.py", "--input", folder / "pairs.jsonl", "--output", folder, *args), "holds the input"
    )
    (tmp_path / "other").mkdir()
    shutil.copy(folder / "notes.txt", tmp_path / "other")
    one_line_error(
        run_cli("data.py", "--input", pairs, "--output", tmp_path / "other", *args),
        "did not write (notes.txt)",
    )
    assert listing(folder) == before and listing(tmp_path / "other") == {"notes.txt": b"mine"}
    # An earlier data.py output is replaced (here it holds dpo.py's reference cache too).
    out = tmp_path / "out"
    assert run_cli("data.py", "--input", pairs, "--output", out, "--tokenizer", model_dir).returncode == 0
    (out / "reference").mkdir()
    result = run_cli("data.py", "--input", pairs, "--output", out, *args, "--max-seq-len", "40")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "summary.json").read_text())["settings"]["max_seq_len"] == 40


def test_a_tokenizer_that_does_not_match_the_model_is_refused_before_training(demo, tmp_path):
    model_dir, pairs = demo
    larger = build_tokenizer(tmp_path / "larger", "llama31")  # ~400 ids; the demo model has 66
    assert (
        run_cli("data.py", "--input", pairs, "--output", tmp_path / "d", "--tokenizer", larger).returncode
        == 0
    )
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["tokenizer"]["source"] == str(larger) and summary["max_token_id"] >= 66
    result = dpo_cli(model_dir, tmp_path / "d", tmp_path / "run", num_train_steps=2)
    one_line_error(result, "holds token id", "vocabulary has 66 entries", str(larger))
    assert not (tmp_path / "run" / "checkpoints").exists()
    # Another tokenizer whose ids fit: trained on, with a warning that says so.
    other = tmp_path / "other-tokenizer"
    shutil.copytree(model_dir, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    (other / "tokenizer.json").write_text(json.dumps(spec, indent=1))  # the same tokens, another file
    assert (
        run_cli("data.py", "--input", pairs, "--output", tmp_path / "e", "--tokenizer", other).returncode == 0
    )
    result = dpo_cli(model_dir, tmp_path / "e", tmp_path / "run2", num_train_steps=0)
    assert result.returncode == 0 and f"was tokenized with {other}, not this run's tokenizer" in result.stdout


def test_validation_data_is_used_when_given(demo, tmp_path):
    model_dir, pairs = demo
    few = tmp_path / "few.jsonl"
    few.write_text("".join(pairs.read_text().splitlines(keepends=True)[:24]))
    result = dpo_cli(
        model_dir, pairs, tmp_path / "run", num_train_steps=0, validation_data=few, max_eval_batches=9
    )
    assert result.returncode == 0, result.stderr
    assert f"validation: {few} (so validation_split_fraction is not used)" in result.stdout
    assert "data: 640 training pairs, 24 validation pairs" in result.stdout


def test_overwrite_deletes_nothing_before_the_new_config_is_checked(demo, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = listing(run)
    one_line_error(dpo_cli("/no/such/model", demo[1], run, "--config.overwrite"), "/no/such/model")
    one_line_error(dpo_cli(demo[0], "/no/such/data.jsonl", run, "--config.overwrite"), "/no/such/data.jsonl")
    assert listing(run) == before


def test_an_output_dir_that_is_a_file_or_under_one_is_one_line(demo, tmp_path):
    (tmp_path / "file").write_text("mine")
    for where in (tmp_path / "file", tmp_path / "file" / "run"):
        one_line_error(dpo_cli(*demo, where), f"{tmp_path / 'file'} is a file")
    assert (tmp_path / "file").read_text() == "mine"


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(demo, tmp_path):
    run = tmp_path / "run"
    # Each file may hold 100 kB: checkpoints fit, the export of the weights does not.
    limits = dict(steps_per_checkpoint=1, steps_per_hf_export=2, file_size_limit=100)
    result = dpo_cli(*demo, run, num_train_steps=3, **limits)
    one_line_error(result, str(run / "hf" / "step-2"), "run the same command")
    assert not list((run / "hf").iterdir())  # no half export
    assert bookkeeping.saved_steps(run)[-1] == 2
    # Tokenizing: a shard does not fit in 4 kB.
    result = run_cli(
        "data.py", "--input", demo[1], "--output", tmp_path / "e", "--tokenizer", demo[0], file_size_limit=4
    )
    one_line_error(result, str(tmp_path / "e"), "--output is left as it was")
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".*.dpo-tmp"))


def test_a_damaged_newest_checkpoint_is_skipped_and_named(demo, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    embed = run / "checkpoints" / "step-2" / "params" / "embed.npy"
    embed.write_bytes(embed.read_bytes()[:200])  # cut short, as by a disk that filled mid-write
    result = dpo_cli(*demo, run, num_train_steps=2)
    assert result.returncode == 0, result.stderr
    assert "skipped checkpoints/step-2 (params/embed.npy: " in result.stdout
    assert f"resumed from {run}/checkpoints/step-1" in result.stdout
    for step in bookkeeping.saved_steps(run):  # when none loads: one line naming the file, nothing deleted
        (run / "checkpoints" / f"step-{step}" / "params" / "embed.npy").write_bytes(b"")
    before = listing(run)
    result = dpo_cli(*demo, run, num_train_steps=2, log_every=2)
    one_line_error(result, "no checkpoint in", "embed.npy", f"all of {run}/checkpoints to start afresh")
    after = listing(run)
    assert after.pop("config.json") != before.pop("config.json")  # it records the new log_every
    assert after == before


def test_a_failed_first_run_leaves_the_directory_free_and_changed_data_is_tokenized_again(demo, tmp_path):
    model_dir, pairs = demo
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    broken = tmp_path / "pairs.jsonl"
    broken.write_text("".join(json.dumps(r | {"rejected": r["chosen"]}) + "\n" for r in rows))
    run = tmp_path / "run"
    one_line_error(
        dpo_cli(model_dir, broken, run, num_train_steps=1), "no usable row", "chosen equals rejected"
    )
    assert not (run / "config.json").exists()
    broken.write_text(pairs.read_text())  # fixed in place: the same command now runs
    assert dpo_cli(model_dir, broken, run, num_train_steps=1).returncode == 0
    # The raw data changes under a run with checkpoints: the run says so instead of resuming on other data.
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows[:600]))
    result = dpo_cli(model_dir, broken, run, num_train_steps=2)
    one_line_error(result, "changed since this run started", "--config.overwrite")


def test_data_that_cannot_fill_the_plan_is_refused_before_the_run_directory_is_written(demo, tmp_path):
    """Too few pairs for one batch, and tokenized pairs over max_seq_len, are found when the batch shapes are
    planned: before config.json (so the corrected command runs) and before a reference pass."""
    model_dir, pairs = demo
    run = tmp_path / "run"
    one_line_error(dpo_cli(model_dir, pairs, run, train_batch_size=1024), "fewer than one batch of 1024")
    assert not (run / "config.json").exists()
    tokenized = tmp_path / "tokenized"
    made = run_cli("data.py", "--input", pairs, "--output", tokenized, "--tokenizer", model_dir)
    assert made.returncode == 0, made.stderr
    result = dpo_cli(model_dir, tokenized, run, max_seq_len=10, reference_mode="precompute")  # pairs hold 12
    one_line_error(result, "over max_seq_len 10")
    assert not (run / "config.json").exists() and not (tokenized / "reference").exists()
    assert dpo_cli(model_dir, tokenized, run, num_train_steps=1, reference_mode="precompute").returncode == 0


def test_messages_name_the_remedy_for_this_command_line(demo, tmp_path):
    model_dir, pairs = demo
    no_template = tmp_path / "no-template"
    shutil.copytree(model_dir, no_template)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    (no_template / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": None}))
    chat = tmp_path / "chat.jsonl"
    row = {"chosen": [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": "red"}]}
    chat.write_text(
        json.dumps(row | {"rejected": [row["chosen"][0], {"role": "assistant", "content": "cat"}]})
    )
    result = dpo_cli(model_dir, chat, tmp_path / "run", tokenizer=no_template)
    one_line_error(result, "has no chat template", "--config.tokenizer")
    assert "--format plain" not in result.stderr  # data.py's flags are not dpo.py's
    result = run_cli(
        "data.py",
        "--input",
        chat,
        "--output",
        tmp_path / "d",
        "--tokenizer",
        demo[0],
        "--system-field",
        "sys",
    )
    one_line_error(result, "--system-field sys names no column; columns: chosen, rejected")


def test_a_reference_that_differs_only_in_token_ids_is_accepted(demo, tmp_path):
    model_dir, pairs = demo
    for change, accepted in [({"pad_token_id": 3}, True), ({"num_hidden_layers": 1}, False)]:
        reference = tmp_path / f"reference-{accepted}"
        shutil.copytree(model_dir, reference)
        config = json.loads((reference / "config.json").read_text())
        (reference / "config.json").write_text(json.dumps(config | change))
        result = dpo_cli(
            model_dir, pairs, tmp_path / f"run-{accepted}", num_train_steps=0, reference_model_path=reference
        )
        if accepted:
            assert result.returncode == 0, result.stderr
        else:
            one_line_error(result, "differs from the policy in num_layers (1 vs 2)")


def test_warmup_longer_than_the_run_is_said_and_metrics_have_one_line_per_step(demo, tmp_path):
    run = tmp_path / "run"
    for _ in range(2):  # killed before its first checkpoint, then run again: one step-0 line, not two
        result = dpo_cli(*demo, run, num_train_steps=0)
        assert result.returncode == 0, result.stderr
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0]
    result = dpo_cli(*demo, tmp_path / "run2", num_train_steps=0, warmup=10)
    assert "warning: warmup (10 steps) is longer than the run" in result.stdout


def test_wandb_offline_continues_the_same_run_on_resume_and_ids_differ_per_directory(demo, tmp_path):
    pytest.importorskip("wandb")
    os.environ["WANDB_MODE"] = "offline"
    try:
        runs = [tmp_path / "a" / "runs" / "dpo", tmp_path / "b" / "runs" / "dpo"]  # the same base name
        inputs = dict(model_name_or_path=str(demo[0]), train_data=str(demo[1]), wandb_project="test")
        config = lambda run, steps: dpo.Config(
            **SMALL | inputs | dict(output_dir=str(run), num_train_steps=steps)
        )
        for run in runs:
            dpo.main(config(run, 1))
        dpo.main(config(runs[1], 2))  # resumes runs[1]
    finally:
        del os.environ["WANDB_MODE"]
    ids = [(run / "wandb-id").read_text() for run in runs]
    assert ids[0] != ids[1]
    offline = sorted(p.name for p in (runs[1] / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(ids[1]) for name in offline)
    steps = [json.loads(line)["step"] for line in (runs[1] / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 1, 2, 2]  # eval at 0, then training and eval lines at 1 and 2, each once


def test_what_a_run_must_never_overwrite_is_refused_before_anything_is_written(demo, trained, tmp_path):
    model_dir, pairs = demo
    # The output_dir is the model's own folder: refused, --config.overwrite or not; the model intact.
    own = tmp_path / "model"
    shutil.copytree(model_dir, own)
    before = listing(own)
    for extra in ([], ["--config.overwrite"]):
        one_line_error(dpo_cli(own, pairs, own, *extra), f"holds the model_name_or_path {own}")
    assert listing(own) == before
    # A model with a tensor missing, with --config.overwrite: found from the headers, before the old run goes.
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    tensors = safetensors.numpy.load_file(broken / "model.safetensors")
    del tensors["model.norm.weight"]
    safetensors.numpy.save_file(tensors, broken / "model.safetensors")
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = listing(run)
    one_line_error(dpo_cli(broken, pairs, run, "--config.overwrite"), "has no tensor model.norm.weight")
    assert listing(run) == before
    # A folder with someone's metrics.jsonl and no dpo.py run in it.
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "metrics.jsonl").write_text('{"mine": 1}\n')
    one_line_error(dpo_cli(*demo, tmp_path / "theirs"), "holds metrics.jsonl but no dpo.py run")
    assert (tmp_path / "theirs" / "metrics.jsonl").read_text() == '{"mine": 1}\n'


def test_data_that_changes_under_a_run_is_refused_and_training_and_validation_never_share_a_copy(
    demo, tmp_path
):
    model_dir, pairs = demo
    tokenized = tmp_path / "tokenized"
    assert (
        run_cli("data.py", "--input", pairs, "--output", tokenized, "--tokenizer", model_dir).returncode == 0
    )
    run, extensible = tmp_path / "run", dict(lr_schedule="constant", cooldown=0)  # a longer run is exact
    assert dpo_cli(model_dir, tokenized, run, steps_per_checkpoint=1, **extensible).returncode == 0
    few = tmp_path / "few.jsonl"
    few.write_text("".join(pairs.read_text().splitlines(keepends=True)[:100]))
    result = run_cli(
        "data.py", "--input", few, "--output", tokenized, "--tokenizer", model_dir, "--overwrite"
    )
    assert result.returncode == 0
    result = dpo_cli(model_dir, tokenized, run, num_train_steps=4, **extensible)
    one_line_error(result, "data changed since", "step-2")
    # A shard gone from a tokenized folder: refused, not trained on what is left.
    shutil.copytree(tokenized, tmp_path / "cut")
    (tmp_path / "cut" / "part-00000.parquet").unlink()
    one_line_error(dpo_cli(model_dir, tmp_path / "cut", tmp_path / "run2"), "lacks part-00000.parquet")
    # The same file for training and validation: two copies, and the run resumes.
    run = tmp_path / "run3"
    settings = dict(validation_data=pairs, validation_split="train", max_eval_batches=1, **extensible)
    result = dpo_cli(model_dir, pairs, run, **settings, steps_per_checkpoint=1)
    assert result.returncode == 0 and "every validation pair is a training pair" in result.stdout
    copies = sorted(p.name for p in (run / "data").iterdir() if p.is_dir())
    assert copies == ["train-pairs.jsonl-train", "validation-pairs.jsonl-train"]
    assert dpo_cli(model_dir, pairs, run, **settings, num_train_steps=3).returncode == 0


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(max_grad_norm=-1.0), "max_grad_norm must be > 0"),  # it trained uphill
        (dict(beta=float("nan")), "beta must be finite"),
        (dict(loss_type=("sigmoid", "sft"), loss_weights=(1.0, float("inf"))), "loss_weights must be finite"),
        (dict(loss_type=("sigmoid", "sft"), loss_weights=(1.0, -1.0)), "loss_weights must be >= 0"),
        (dict(adam_b2=1.0), "adam_b1 and adam_b2 must be in [0, 1)"),
        (dict(max_eval_batches=0), "max_eval_batches must be > 0"),
        (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
        (dict(lora_rank=4, lora_alpha=0.0), "lora_alpha must be > 0"),  # it trained with alpha 2 * rank
        (dict(lora_rank=4, lora_alpha=-8.0), "lora_alpha must be > 0"),  # with a negative scale
        # Flags that did nothing: a full fine-tune ran, or nothing trained.
        (dict(lora_alpha=8.0), "lora_alpha does nothing without lora_rank"),
        (dict(lora_targets=("q", "v")), "lora_targets does nothing without lora_rank"),
        (dict(base_quantization="nf4"), "base_quantization is for LoRA's base: set lora_rank"),
        (dict(loss_weights=(0.0,)), "loss_weights (0.0,) are all 0: nothing would train"),
        (dict(loss_type=("sigmoid", "sft"), loss_weights=(0.0, 0.0)), "are all 0"),
        (dict(validation_data=()), "validation_data names no set"),  # it would evaluate nothing
    ],
)
def test_nonsense_numbers_are_refused(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        dpo.Config(**settings)


def test_two_validation_sets_of_one_name_are_refused_before_any_is_read(tmp_path):
    for sets in (["a=x.jsonl", "a=y.jsonl"], ["one/a", "two/a"], ["org/a", "a=b.jsonl"]):
        config = dpo.Config(train_data="t", validation_data=sets)
        with pytest.raises(ValueError, match="more than one set is named a: NAME=SOURCE names one"):
            bookkeeping.validation_sets(tmp_path, config, "tokenizer", None)
    config = dpo.Config(train_data="t", validation_data=["a=x.jsonl", "held="])  # a name without its source
    with pytest.raises(ValueError, match="validation_data: held= names no source"):
        bookkeeping.validation_sets(tmp_path, config, "tokenizer", None)


def test_a_run_saved_before_a_field_existed_resumes(demo, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    saved = json.loads((run / "config.json").read_text())
    for name in ("lora_rank", "lora_alpha", "lora_targets", "simpo_gamma"):  # as an older dpo.py wrote it
        del saved[name]
    (run / "config.json").write_text(json.dumps(saved))
    result = dpo_cli(*demo, run, num_train_steps=2)
    assert result.returncode == 0 and f"resumed from {run}/checkpoints/step-2" in result.stdout


def test_broken_files_are_named(demo, tmp_path):
    model_dir, pairs = demo
    for name, text in [("bad-json", "{not json"), ("no-width", json.dumps({"num_hidden_layers": 2}))]:
        shutil.copytree(model_dir, tmp_path / name)
        (tmp_path / name / "config.json").write_text(text)
        with pytest.raises(ValueError, match=f"^{tmp_path / name / 'config.json'}: "):
            model.load_config(tmp_path / name)
    (tmp_path / "bytes.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "noise.jsonl").write_bytes(bytes(range(256)) * 8)
    cases = [
        ("bytes.parquet", "bytes.parquet: not a readable Parquet file"),
        ("noise.jsonl", "are not usable (noise.jsonl line 1"),
        ("missing.jsonl", "missing.jsonl: no such file"),
    ]
    for file, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            data.tokenize(str(tmp_path / file), str(model_dir), str(tmp_path / "out"))
    for size in ("rows_per_shard", "row_group_size"):  # 0 once wrote empty shards without end
        with pytest.raises(ValueError, match=f"--{size.replace('_', '-')} must be >= 1"):
            data.tokenize(str(pairs), str(model_dir), str(tmp_path / "out"), **{size: 0})


def test_data_py_replaces_only_its_own_complete_outputs(demo, tmp_path):
    model_dir, pairs = demo
    tokenize = lambda output, **kw: data.tokenize(
        str(pairs), str(model_dir), str(output), overwrite=True, **kw
    )
    only_summary, reference = tmp_path / "only-summary", tmp_path / "reference"
    only_summary.mkdir()
    (only_summary / "summary.json").write_text('{"mine": true}')
    tokenize(reference)
    (reference / "reference").mkdir()
    (reference / "reference" / "model.safetensors").write_text("mine")
    for folder in (only_summary, reference):
        before = listing(folder)
        with pytest.raises(ValueError, match="holds files data.py did not write"):
            tokenize(folder, max_seq_len=40)
        assert listing(folder) == before
    rejects = tmp_path / "out.rejects.jsonl"  # the file a failed run would leave its reasons in
    shutil.copy(pairs, rejects)
    with pytest.raises(ValueError, match="the input is where this output's rejected rows would go"):
        data.tokenize(str(rejects), str(model_dir), str(tmp_path / "out"))
    # The format is what most rows have: a first row without a prompt string does not decide it.
    rows = [{"prompt": None, "chosen": "red", "rejected": "cat"}] + [
        json.loads(line) for line in pairs.open()
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        data.tokenize(str(tmp_path / "rows.jsonl"), str(model_dir), str(tmp_path / "o"))["format"] == "plain"
    )


def test_data_from_an_older_data_py_is_refused_in_one_line(demo, tmp_path):
    model_dir, pairs = demo
    out = tmp_path / "old"
    data.tokenize(str(pairs), str(model_dir), str(out))
    summary = json.loads((out / "summary.json").read_text())
    # 2: before shared_length, which prefix sharing reads; 3: every assistant turn scored (scored_turns)
    for version in (2, 3):
        summary["settings"]["version"] = version
        (out / "summary.json").write_text(json.dumps(summary))
        with pytest.raises(ValueError, match="made by an older data.py: tokenize it again"):
            data.PairDataset(out)


def test_raw_data_tokenized_by_an_older_data_py_is_tokenized_again_or_refused(demo, trained, tmp_path):
    """A run's own copy of raw data made before scored_turns (format 3 scored every assistant turn): made
    again while the run has no checkpoint, refused in one line naming what changed once it has."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (copy,) = (run / "data").iterdir()
    summary = json.loads((copy / "summary.json").read_text())
    del summary["settings"]["scored_turns"]
    (copy / "summary.json").write_text(
        json.dumps(summary | {"settings": summary["settings"] | {"version": 3}})
    )
    one_line_error(dpo_cli(*demo, run, num_train_steps=2), "changed since this run started", "scored_turns")
    shutil.rmtree(run / "checkpoints")
    assert dpo_cli(*demo, run, num_train_steps=0).returncode == 0
    assert json.loads((copy / "summary.json").read_text())["settings"]["version"] == data.VERSION


def test_a_lora_rank_above_a_projections_size_is_one_line_before_anything_is_written(demo, tmp_path):
    """The demo's k and v projections are 64 x 32 (2 kv heads of 16): a rank above 32 adds nothing."""
    run = tmp_path / "run"
    one_line_error(dpo_cli(*demo, run, lora_rank=1000), "lora_rank 1000 is larger than", "at most 32")
    one_line_error(
        dpo_cli(*demo, run, lora_rank=65, lora_targets="q"), "adapted q projection allows (64 x 64)"
    )
    assert not (run / "config.json").exists()
    assert dpo_cli(*demo, run, lora_rank=32, num_train_steps=0).returncode == 0


def test_chat_template_kwargs_that_are_not_a_json_object_are_one_line(demo, tmp_path):
    run = tmp_path / "run"
    result = dpo_cli(*demo, run, chat_template_kwargs="enable_thinking=false")
    one_line_error(result, "chat_template_kwargs 'enable_thinking=false' is not JSON")
    # add_generation_prompt would end each side with an assistant header, scored as part of the reply
    result = dpo_cli(*demo, run, chat_template_kwargs='{"add_generation_prompt": true}')
    one_line_error(result, "chat_template_kwargs may not set add_generation_prompt")
    assert not (run / "config.json").exists()


def test_a_lone_surrogate_in_raw_training_data_is_a_rejected_row(demo, tmp_path):
    model_dir, pairs = demo
    rows = pairs.read_text().splitlines()
    bad = json.dumps({"prompt": "What is 1+1?", "chosen": "2 \ud800", "rejected": "3"})
    (tmp_path / "pairs.jsonl").write_text("\n".join([rows[0], bad, *rows[1:]]) + "\n")
    result = dpo_cli(model_dir, tmp_path / "pairs.jsonl", tmp_path / "run", num_train_steps=0)
    assert result.returncode == 0, result.stderr
    (tokenized,) = (tmp_path / "run" / "data").iterdir()
    summary = json.loads((tokenized / "summary.json").read_text())
    assert summary["rows_written"] == len(rows) and summary["rows_dropped"] == {"invalid text": 1}
    (reject,) = [json.loads(line) for line in (tokenized / "rejects.jsonl").read_text().splitlines()]
    assert reject["index"] == 1 and "lone UTF-16 surrogate" in reject["detail"]


def test_command_line_mistakes_are_one_line(demo, tmp_path):
    """tyro's own messages (a value of the wrong type, an unknown or misspelt flag, a flag without its value,
    a value the config refuses) come as one line, not a box of many."""
    run = ["--config.output-dir", tmp_path / "run", "--config.num-train-steps", "0"]
    cases = [
        (["--config.beta", "abc"], ["--config.beta", "could not convert string to float: 'abc'"]),
        (
            ["--config.learning-rat", "3"],
            ["--config.learning-rat", "Perhaps you meant: --config.learning-rate"],
        ),
        (["--config.lr-schedule", "steep"], ["invalid choice 'steep'", "cosine"]),
        (["--config.loss-type"], ["loss_type names no loss; give one or more of sigmoid hinge"]),
        (["--config.lora-rank", "4", "--config.lora-alpha", "0"], ["lora_alpha must be > 0"]),
        # the demo's batch is 32, not the default's 128: the refusal names the one the run would have
        (["--config.microbatch-size", "12"], ["microbatch_size 12 must divide train_batch_size 32"]),
        # refused once the demo is made: the demo goes with it, and the run directory it made
        (["--config.train-data", tmp_path / "none.jsonl"], [f"{tmp_path / 'none.jsonl'}: no such file"]),
    ]
    for args, fragments in cases:
        line = one_line_error(run_cli("dpo.py", *args, *run), *fragments)
        assert "Error parsing config" not in line
    assert not (tmp_path / "run").exists()
    result = run_cli("dpo.py", "--help")
    assert result.returncode == 0 and "--config.beta" in result.stdout and not result.stderr
    # data.py's command line too.
    args = ["--input", demo[1], "--tokenizer", demo[0], "--output", tmp_path / "out"]
    one_line_error(run_cli("data.py", *args, "--max-seq-len", "x"), "--max-seq-len", "'x'")
    one_line_error(run_cli("data.py", "--input", demo[1]), "Missing from", "--tokenizer, --output")
    assert not (tmp_path / "out").exists()


def test_help_says_what_overwrite_deletes_what_max_seq_len_does_and_who_uses_label_smoothing():
    result = run_cli("dpo.py", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.replace("│", " ").split())  # the help of a flag: up to the next flag
    help_of = lambda flag: text.split(f"--config.{flag} ")[1].split(" --config.")[0]
    assert all(word in help_of("overwrite,") for word in ("deletes", "checkpoints/", "hf/", "metrics.jsonl"))
    assert "raw data: longer pairs dropped; tokenized data: refused" in help_of("max-seq-len")
    assert all(name in help_of("label-smoothing") for name in losses.reading("label_smoothing"))
    # Every flag says what it does, not only its default.
    for flag, metavar in [("chat-template-kwargs", "|STR"), ("f-divergence-type", "alpha_divergence}")]:
        assert not help_of(flag).split(metavar, 1)[1].split()[0].startswith("(default"), help_of(flag)


def test_copies_of_a_pair_never_straddle_the_validation_split(demo, tmp_path):
    """Each of 200 pairs three times over: the run's split keeps a pair's copies together, and the copies are
    counted in summary.json."""
    model_dir, pairs = demo
    rows = pairs.read_text().splitlines()[:200] * 3
    (tmp_path / "copies.jsonl").write_text("\n".join(rows) + "\n")
    config = dpo.Config(
        **SMALL | dict(model_name_or_path=str(model_dir), train_data=str(tmp_path / "copies.jsonl")),
        output_dir=str(tmp_path / "run"),
    )
    inputs = bookkeeping.load_inputs(tmp_path / "run", config)
    assert inputs.train_set.summary["duplicate_pairs"] == 400
    copies = inputs.train_set.first_copy
    (split, val_idx), *_ = inputs.validation.values()  # a split of the training data: one set
    assert split is inputs.train_set and len(inputs.validation) == 1
    assert len(set(copies)) == 200 and not set(copies[inputs.train_idx]) & set(copies[val_idx])
    assert 55 <= len(val_idx) <= 62 and len(val_idx) % 3 == 0  # whole pairs, about a tenth


def test_chat_template_kwargs_other_than_tokenized_datas_are_one_line(demo, tmp_path):
    """Tokenized data is used as it is: kwargs it was not made with would be silently ignored."""
    model_dir, pairs = demo
    kwargs = '{"enable_thinking": false}'
    for name, given in [("plain", None), ("kw", kwargs)]:
        out = str(tmp_path / name)
        data.tokenize(str(pairs), str(model_dir), out, max_seq_len=64, chat_template_kwargs=given)
    run = tmp_path / "run"
    result = dpo_cli(model_dir, tmp_path / "plain", run, chat_template_kwargs=kwargs)
    one_line_error(result, "chat_template_kwargs {", "does not apply to train_data", "--chat-template-kwargs")
    assert not (run / "config.json").exists()
    for made_with, given in [("kw", kwargs), ("kw", None), ("plain", None)]:  # the same, or not given: runs
        extra = {} if given is None else dict(chat_template_kwargs=given)
        result = dpo_cli(model_dir, tmp_path / made_with, tmp_path / f"ok-{made_with}-{given is None}",
                         num_train_steps=0, **extra)  # fmt: skip
        assert result.returncode == 0, result.stderr


def test_an_unusable_compilation_cache_is_said_and_turned_off(tmp_path, capsys):
    """A cache directory that cannot be made or written (a file in its path; a read-only folder where this
    user is not root, who may write anyway) is one line at the start and the cache off, not a run that caches
    nothing and says so only in its last line ("0 of 2 from the cache")."""
    import jax

    before = jax.config.jax_compilation_cache_dir
    (tmp_path / "file").write_text("mine")
    cases = [tmp_path / "file", tmp_path / "file" / "cache"]
    if os.geteuid() != 0:
        (tmp_path / "read-only").mkdir(mode=0o555)
        cases.append(tmp_path / "read-only" / "cache")
    try:
        for where in cases:
            bookkeeping.use_compilation_cache(str(where))
            said = capsys.readouterr().out.splitlines()
            assert len(said) == 1 and said[0].startswith(f"compilation cache off: {where}"), said
            assert jax.config.jax_compilation_cache_dir is None
        bookkeeping.use_compilation_cache(str(tmp_path / "cache"))  # usable: made, and used silently
        assert not capsys.readouterr().out and jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
        assert (tmp_path / "file").read_text() == "mine" and not list((tmp_path / "cache").iterdir())
    finally:
        bookkeeping.use_compilation_cache(before)


def test_validation_pairs_that_are_all_training_pairs_are_said_in_one_line(demo, tmp_path, capsys):
    """Validation data that is the training data (the same folder, another copy of the same file, or some of
    its rows) gives eval numbers about pairs the model trains on: one warning line. Other pairs, even among
    some training pairs, are no warning."""
    model_dir, pairs = demo
    lines = pairs.read_text().splitlines(keepends=True)
    rows = dict(train=lines[:600], copy=lines[:600], some=lines[100:124], other=lines[600:])
    rows["mixed"] = lines[:20] + lines[630:]
    made = {}
    for name, chosen in rows.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(chosen))
        data.tokenize(str(tmp_path / f"{name}.jsonl"), str(model_dir), str(tmp_path / name))
        made[name] = data.PairDataset(tmp_path / name)
    train = made["train"]
    for name in ("train", "copy", "some"):
        bookkeeping.check_validation(train, made[name])
        where = f"{made[name].path} in {train.path}"
        assert capsys.readouterr().out.splitlines() == [
            f"warning: every validation pair is a training pair ({where}): the eval numbers are about pairs "
            "the model trains on"
        ]
    for name in ("other", "mixed"):  # none, or 20 of 30, of them among the training pairs
        bookkeeping.check_validation(train, made[name])
        assert not capsys.readouterr().out
