"""The run's bookkeeping around dpo.py's train step, in the order main meets it; nothing here is traced.

  say                the one console writer: process 0's lines
  run directory      open_run: check_run_dir (before anything is written; what a resume may change:
                     OPERATIONAL_FIELDS, and num_train_steps where the steps taken keep their learning
                     rates), run_lock (one run at a time in it), start_run_dir (config.json; overwrite)
  inputs             load_inputs: model and reference configs, mesh, tokenizer and data, all checked first;
                     validation_sets (a split, or one or more sets by name); loaders: the batches and the
                     few batch shapes planned for the whole run
  QLoRA's base       check_base: base.json, so that a resume re-quantises the same base
  checkpoints        one .npy file per array, written atomically, each host reading back only its slices
  the reference      ReferenceCache: its log-probs' files beside the tokenized data, what is left to compute
  metrics            MetricsLog (metrics.jsonl, Weights & Biases, the console line, MFU), Progress lines
  compiled programs  compile_lowered (what dpo lowered, compiled on threads), programs_report, the
                     persistent compilation cache and its hits
  stopping           stop_requests (SIGTERM, Ctrl-C), one_line_errors (the command line's exits),
                     check_update (a step whose update was not finite),
                     skipped_at_resume (the eval and export a stop or a kill skipped)
  export             export_files, save_export: hf/step-N for transformers, with LoRA also a PEFT adapter
                     (QLoRA: merged into the original base's weights, read back from its files)
  the report         write_report: report.md and curves.png (matplotlib, optional), report_command
  the demo           make_demo and DEMO_SETTINGS: a tiny Llama, its tokenizer and synthetic pairs

It imports model, data and sharding, never dpo, and receives none of its functions: it reads the Config by
field name (and its lr_at), and stores and loads what dpo's programs compute. Left out on purpose: other
checkpoint formats (Orbax, tensorstore), remote storage, asynchronous saving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import re
import signal
import socket
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import data
import model
import sharding


def say(*message) -> None:
    """A line on the console, from process 0 only: every process runs the same program. Before the
    multi-process start (the command line is parsed before it) every process says it: asking which process
    this is would start JAX too early."""
    if not jax.distributed.is_initialized() or sharding.is_writer():
        print(*message, flush=True)


# --- the run directory


# Fields that change how a run is operated, not what it computes: a resumed run may change them. The
# layouts and the ways of computing a step give the same numbers up to float rounding (docs/performance.md).
OPERATIONAL_FIELDS = set(
    "output_dir overwrite steps_per_eval max_eval_batches steps_per_checkpoint keep_checkpoints "
    "steps_per_hf_export hf_save_dtype log_every wandb_project coordinator_address num_processes "
    "process_id on_nonfinite compilation_cache_dir microbatch_size prefix_sharing packing remat "
    "attention_impl logits_chunk_size mesh_context".split()
)


def check_run_dir(run: Path, config) -> None:
    """Refuse an output_dir that is (or lies under) a file, that holds an input a run would overwrite or
    delete, that holds files of no dpo.py run, or that holds a run whose config differs in anything that
    changes what it computes (unless overwrite). Deletes and writes nothing: see start_run_dir."""
    for folder in (run, *run.parents):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"output_dir {run}: {folder} is a file, not a directory")
    own = run.resolve()
    inputs = [(n, getattr(config, n)) for n in ("model_name_or_path", "reference_model_path", "tokenizer")]
    inputs += [
        ("train_data", config.train_data),
        *(("validation_data", s) for _, s in validation_sources(config)),
    ]
    for name, value in inputs:
        if name == "model_name_or_path" and value == "demo":  # made inside the run directory, as it should be
            continue
        where = Path(value).resolve() if value and Path(value).exists() else None
        if where and (where == own or {own / "checkpoints", own / "hf"} & set(where.parents)):
            raise ValueError(f"output_dir {run} holds the {name} {where}, which a run would overwrite")
    if not (run / "config.json").exists():  # a run writes config.json before anything else it keeps
        foreign = [n for n in ("metrics.jsonl", "checkpoints", "hf", "wandb-id") if (run / n).exists()]
        if foreign:
            raise ValueError(
                f"output_dir {run} holds {', '.join(foreign)} but no dpo.py run: use another one"
            )
        return
    difference = _difference(run, config)
    if difference and not config.overwrite:
        raise ValueError(difference[1])


def _difference(run: Path, config) -> tuple[str, str] | None:
    """How the run saved in `run` differs from `config`'s in what it computes, as (a few words, the refusal
    without overwrite); None: it is the same run, which `config` resumes."""
    # Compared as JSON (a tuple reads back as a list); a field newer than the saved run counts as its default.
    defaults, now = (json.loads(json.dumps(dataclasses.asdict(c))) for c in (type(config)(), config))
    saved, now = _as_computed(defaults | json.loads((run / "config.json").read_text())), _as_computed(now)
    fixed = set(now) - OPERATIONAL_FIELDS - {"num_train_steps"}
    changed = sorted(k for k in fixed if saved.get(k) != now[k])
    if changed:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        refusal = f"{run} holds a run with a different config ({diff}); use another output_dir or "
        return diff, refusal + "--config.overwrite"
    taken = saved_steps(run)
    if taken and saved["num_train_steps"] != config.num_train_steps:
        before = dataclasses.replace(config, num_train_steps=saved["num_train_steps"])
        if problem := _new_length_problem(run, taken[-1], before, config):
            return f"num_train_steps: {before.num_train_steps} -> {config.num_train_steps}", problem
    return None


def _as_computed(fields: dict) -> dict:
    """A config's fields with the values that compute the same thing spelled one way: lora_alpha None is
    2 * lora_rank, lora_targets is a set, and one validation set may be a string (as before #36)."""
    alpha, rank, sets = fields.get("lora_alpha"), fields.get("lora_rank", 0), fields.get("validation_data")
    return fields | dict(
        lora_alpha=2 * rank if alpha is None else alpha,
        lora_targets=sorted(fields["lora_targets"]),
        validation_data=one_or_more(sets),
    )


def one_or_more(sets) -> list | None:
    """validation_data as a list; a config.json from before #36 holds one set as a string."""
    return [sets] if isinstance(sets, str) else sets


def _new_length_problem(run: Path, taken: int, before, now) -> str | None:
    """A run resumed with another num_train_steps goes on exactly as a run of the new length would have
    gone, or not at all: the data order does not depend on the length, but the learning rate can (warmup
    and cooldown as fractions of the run, a decaying schedule). So the steps already taken must have had
    the new length's learning rates, and none may lie past its end. Why not, or None."""
    length, steps = now.num_train_steps, np.arange(taken)
    if taken > length:
        return f"{run} has taken {taken} steps, more than num_train_steps {length}; use another output_dir"
    if not np.array_equal(np.asarray(before.lr_at(steps)), np.asarray(now.lr_at(steps))):
        return (
            f"{run} took {taken} steps of a {before.num_train_steps}-step learning-rate schedule, which "
            f"num_train_steps {length} changes (warmup and cooldown as fractions of the run, a decaying "
            f"lr_schedule): keep num_train_steps {before.num_train_steps}, or start another run from an "
            "export in its hf/"
        )
    return None


def say_done(run: Path) -> None:
    """The run's last line: what its directory holds."""
    names = ("config.json", "metrics.jsonl", "checkpoints/", "hf/", "report.md", "curves.png")
    made = [name for name in names if (run / name).exists()]
    loads = " (transformers loads hf/step-N as it is)" if "hf/" in made else ""
    say(f"done. run directory {run.resolve()}: {', '.join(made)}{loads}")


def start_run_dir(run: Path, config, data_id: str | None = None) -> None:
    """Once every input has been checked: with overwrite, delete the checkpoints, exports and metrics of a
    run in `run` that computes otherwise (_difference; given `data_id`, also one whose checkpoints were
    trained on other data), saying so; the same run is kept and resumes. Then process 0 writes
    config.json."""
    if sharding.is_writer():
        if config.overwrite and (run / "config.json").exists():
            _delete_another_run(run, config, data_id)
        run.mkdir(parents=True, exist_ok=True)
        with sharding.atomic(run / "config.json") as tmp:
            tmp.write_text(json.dumps(dataclasses.asdict(config), indent=2))
    multihost_utils.sync_global_devices("run directory ready")  # nobody lists checkpoints before they go


def _delete_another_run(run: Path, config, data_id: str | None) -> None:
    """overwrite starts afresh only where the run in `run` is another run: the same command after a stop
    request (or a requeued job that keeps the flag) resumes, as the stop message says it will."""
    difference, taken = _difference(run, config), saved_steps(run)
    if (
        not difference
        and data_id
        and taken
        and _other_data(run / "checkpoints" / f"step-{taken[-1]}", data_id)
    ):
        difference = ("the training or validation data changed since its checkpoints", "")
    if not difference:
        say(f"overwrite: {run} holds a run of this config and data, which goes on: nothing deleted")
        return
    names = [f"{n}/" if (run / n).is_dir() else n for n in ("checkpoints", "hf", "metrics.jsonl", "wandb-id")]
    names = [n for n in names if (run / n).exists()]
    if names:
        say(f"overwrite: {run} holds another run ({difference[0]}): deleting its {', '.join(names)}")
    for name in names:
        sharding.remove(run / name)


@contextlib.contextmanager
def run_lock(run: Path):
    """One run at a time in `run`: while inside, process 0 holds an flock on run/lock, which names its host
    and process id; a second run is refused in one line naming them. The OS releases an flock when its process
    dies, however (kill -9 included), and a lost host's lease runs out on a network file system, so a run
    that died never blocks the resume: its file stays, naming the last holder, and is taken over. A run that
    ends (done, stopped, refused) removes the file, so the run directory holds nothing of it. Where the file
    system cannot lock, says so and goes on. Every process enters; a refusal stops them all."""
    refusal, lock, path, created = None, None, run / "lock", not run.exists()
    while sharding.is_writer() and lock is None and refusal is None:
        try:
            run.mkdir(parents=True, exist_ok=True)
            lock = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not path.exists() or os.stat(path).st_ino != os.fstat(lock).st_ino:  # its holder removed it
                os.close(lock)
                lock = None
                continue
            os.ftruncate(lock, 0)
            os.pwrite(lock, f"host {socket.gethostname()}, process id {os.getpid()}\n".encode(), 0)
        except BlockingIOError:  # held: the file names the holder
            holder = os.pread(lock, 200, 0).decode(errors="replace").strip() or "it is starting"
            refusal = f"{run} is in use by another run ({holder}): wait for it to end, or use another "
            refusal += "output_dir"
        except OSError as e:  # no run directory (a read-only disk); no locks (a FUSE mount, NFS without them)
            if lock is None:
                refusal = f"{path}: {e.strerror or e}"
            else:
                say(f"warning: {path}: {e.strerror}, so a second run in {run} at once would not be refused")
    # The other processes stop too, rather than wait for process 0 in a collective until they time out.
    if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(np.int32(refusal is not None)):
        refusal = refusal or f"{run} is in use by another run (process 0 names it)"
    try:
        if refusal:
            raise ValueError(refusal)
        yield
    finally:
        if lock is not None and not refusal:
            path.unlink(missing_ok=True)  # before the flock goes: a run that opened it meanwhile retries
            if created and not any(run.iterdir()):  # a run refused before it wrote anything
                run.rmdir()
        if lock is not None:
            os.close(lock)  # releases the flock


# --- inputs: everything a run reads, checked before anything is written


class Inputs(NamedTuple):
    """What a run reads (load_inputs)."""

    model_dir: Path
    reference_dir: Path
    arch: model.LlamaConfig
    mesh: jax.sharding.Mesh
    tokenizer_dir: Path
    train_set: data.PairDataset
    train_idx: np.ndarray
    validation: dict[str, tuple[data.PairDataset, np.ndarray]]  # each set by name: its pairs, the rows used
    data_id: str  # a hash of the tokenized data's summaries: checkpoints record it


def load_inputs(run: Path, config) -> Inputs:
    """Everything a run reads, checked before anything is written: the model and reference configs, the mesh,
    the tokenizer and the data (tokenized into the run's data/ when raw)."""

    def resolved(name: str) -> Path:  # which option a path came from goes into the error
        try:
            return model.resolve_path(getattr(config, name))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{name}: {e}") from None

    model_dir = resolved("model_name_or_path")
    arch = model.load_config(model_dir)
    mesh = sharding.make_mesh(
        config.mesh_data, config.mesh_fsdp, config.mesh_tensor, context=config.mesh_context
    )
    field = "microbatch_size" if config.microbatch_size else "train_batch_size"  # what to change, named
    model.check_fits(arch, mesh, getattr(config, field), field)
    model.check_lora(arch, config.lora_rank, config.lora_targets)
    model.check_quantization(arch, mesh, config.base_quantization)
    dtype = model.dtype_of(config.compute_dtype)
    model.check_attention(arch, mesh, config.max_seq_len, config.attention_impl, dtype)
    model.check_weights(model_dir, arch)  # from the file headers: no weight is read yet
    reference_dir = resolved("reference_model_path") if config.reference_model_path else model_dir
    reference_arch = model.load_config(reference_dir)
    for field in dataclasses.fields(arch):
        ours, theirs = getattr(arch, field.name), getattr(reference_arch, field.name)
        if field.name not in model.NOT_COMPUTED and ours != theirs:
            raise ValueError(
                f"reference model {reference_dir} differs from the policy in {field.name} "
                f"({theirs} vs {ours})"
            )
    if reference_dir != model_dir and config.uses_reference:
        model.check_weights(reference_dir, arch)
    for name, length in (("warmup", config.warmup), ("cooldown", config.cooldown)):
        if (steps := config.in_steps(length)) > config.num_train_steps:
            say(f"warning: {name} ({steps} steps) is longer than the run ({config.num_train_steps} steps)")
    tokenizer = config.tokenizer or str(model_dir)
    tokenizer_dir = resolved("tokenizer") if config.tokenizer else model_dir
    train_set = prepare_data(
        "train", Path(config.train_data or "").name, config.train_data, tokenizer, run, config
    )
    train_idx, validation = validation_sets(run, config, tokenizer, train_set)
    datasets = [train_set, *(dataset for dataset, _ in validation.values())]
    for dataset in {dataset.path: dataset for dataset in datasets}.values():
        check_vocabulary(dataset, arch, tokenizer_dir)
    named = lambda name: f" in {name}" if len(validation) > 1 else ""
    pairs = ", ".join(f"{len(rows)} validation pairs{named(name)}" for name, (_, rows) in validation.items())
    say(f"data: {len(train_idx)} training pairs, {pairs}")
    summaries = b"".join((dataset.path / "summary.json").read_bytes() for dataset in datasets)
    data_id = hashlib.sha256(summaries).hexdigest()[:16]
    return Inputs(
        model_dir, reference_dir, arch, mesh, tokenizer_dir, train_set, train_idx, validation, data_id
    )


def validation_sources(config) -> list[tuple[str, str]]:
    """validation_data's sets as (name, source): NAME=SOURCE, or SOURCE named by its file or dataset name."""
    split = lambda source: (
        source.split("=", 1) if re.match(r"[\w.-]+=", source) else (Path(source).name, source)
    )
    named = [tuple(split(source)) for source in config.validation_data or ()]
    if empty := [name for name, source in named if not source]:
        raise ValueError(
            f"validation_data: {', '.join(empty)}= names no source: NAME=SOURCE, e.g. held=held.jsonl"
        )
    names = [name for name, _ in named]
    if twice := sorted({name for name in names if names.count(name) > 1}):
        raise ValueError(
            f"validation_data: more than one set is named {', '.join(twice)}: NAME=SOURCE names one"
        )
    return named


def validation_sets(run: Path, config, tokenizer: str, train_set: data.PairDataset):
    """(the training rows, the validation sets by name: (their pairs, the rows evaluated)): validation_data's
    sets, each SOURCE (named by its file or dataset name) or NAME=SOURCE; else a split of the training
    data."""
    if config.validation_data is None:
        fraction, copies = config.validation_split_fraction, train_set.first_copy  # copies stay on one side
        train_idx, val_idx = data.split_indices(len(train_set), fraction, config.seed, copies)
        return train_idx, {"validation": (train_set, val_idx)}
    named = validation_sources(config)  # checked already by check_run_dir
    if config.validation_split_fraction is not None:
        say(f"validation: {' '.join(config.validation_data)} (so validation_split_fraction is not used)")
    sets = {name: prepare_data("validation", name, source, tokenizer, run, config) for name, source in named}
    if sharding.is_writer():  # it only says something
        for dataset in sets.values():
            check_validation(train_set, dataset)
    return np.arange(len(train_set)), {
        name: (dataset, np.arange(len(dataset))) for name, dataset in sets.items()
    }


def prepare_data(role: str, name: str, source: str, tokenizer: str, run: Path, config) -> data.PairDataset:
    """The training data or a validation set, as `role` says (with train_split or validation_split): a
    data.py output dir as it is; raw data is tokenized once into the run's data/ (process 0). That copy is
    made again when the raw data or its settings change, unless the run has checkpoints to resume."""
    split = getattr(config, f"{role}_split")
    if data.is_tokenized(source):
        dataset = data.PairDataset(source)
        _check_template_kwargs(dataset, role, config)
        return dataset
    out = run / "data" / f"{role}-{name or 'data'}-{split}"  # training and each validation set apart
    replace = config.overwrite or not saved_steps(run)
    if sharding.is_writer():
        try:
            kwargs = dict(max_seq_len=config.max_seq_len, chat_template_kwargs=config.chat_template_kwargs)
            data.tokenize(source, tokenizer, str(out), split=split, overwrite=replace, **kwargs)
        except data.NoChatTemplate:
            raise ValueError(
                f"{tokenizer} has no chat template and {source} holds chat messages: pass "
                "--config.tokenizer with a tokenizer that has one, or tokenize with python data.py "
                "--chat-template FILE and pass its output"
            ) from None
        except data.SettingsChanged as e:
            raise ValueError(
                f"{source} changed since this run started (other {e.changed}): use another output_dir, or "
                "--config.overwrite to start afresh"
            ) from None
    multihost_utils.sync_global_devices(f"tokenized {out}")
    return data.PairDataset(out)


def check_validation(train_set: data.PairDataset, val_set: data.PairDataset) -> None:
    """A warning when every validation pair is also a training pair (the same tokens: the same folder, a
    copy of the same file, some of its rows): its eval numbers would say nothing about pairs the model has
    not seen. Rows are compared by a digest of their token ids, and read only where the lengths allow it:
    a validation pair of a length no training pair has settles it without reading."""
    trained_on = train_set.path.resolve() == val_set.path.resolve()
    key = lambda lengths: lengths[:, 0].astype(np.int64) << 32 | lengths[:, 1]  # (chosen, rejected) lengths
    train_keys, val_keys = key(train_set.lengths), key(val_set.lengths)
    if not trained_on and np.isin(val_keys, train_keys).all():
        digests = lambda dataset, rows: {
            hashlib.blake2b(np.int64(len(ids)).tobytes() + ids.tobytes() + other.tobytes()).digest()
            for (ids, _), (other, _) in dataset.read(rows)
        }
        candidates = np.flatnonzero(np.isin(train_keys, val_keys))  # the only training rows that can match
        chunks = lambda rows: (rows[at : at + 4096] for at in range(0, len(rows), 4096))  # memory bounded
        ours = set().union(*(digests(train_set, rows) for rows in chunks(candidates)))
        trained_on = all(digests(val_set, rows) <= ours for rows in chunks(np.arange(len(val_set))))
    if trained_on:
        where = f"{val_set.path} in {train_set.path}"
        say(
            f"warning: every validation pair is a training pair ({where}): the eval numbers are about pairs "
            "the model trains on"
        )


def _check_template_kwargs(dataset: data.PairDataset, role: str, config) -> None:
    """chat_template_kwargs tokenizes raw data; tokenized data is used as it is, so kwargs other than the ones
    it was made with would be silently ignored (Qwen3 thinking blocks scored after all): refused."""
    if config.chat_template_kwargs is None:
        return
    given = data.parse_template_kwargs(config.chat_template_kwargs)
    made_with = dataset.summary.get("settings", {}).get("chat_template_kwargs", {})
    if given != made_with:
        raise ValueError(
            f"chat_template_kwargs {json.dumps(given)} does not apply to {role}_data {dataset.path}, "
            f"tokenized with chat_template_kwargs {json.dumps(made_with)}: tokenize the raw data again with "
            "python data.py ... --chat-template-kwargs, or leave the option out"
        )


def check_vocabulary(dataset: data.PairDataset, arch: model.LlamaConfig, tokenizer_dir: Path) -> None:
    """Token ids must be the model's: data tokenized for a larger vocabulary would train on nothing."""
    summary, made_with = dataset.summary, dataset.summary.get("tokenizer", {})
    if summary["max_token_id"] >= arch.vocab_size:
        raise ValueError(
            f"{dataset.path} holds token id {summary['max_token_id']}, but the model's vocabulary has "
            f"{arch.vocab_size} entries (the data's tokenizer {made_with.get('source')} has "
            f"{made_with.get('vocab_size')}): tokenize the data with the model's tokenizer"
        )
    ours = tokenizer_dir / "tokenizer.json"
    ours = hashlib.sha256(ours.read_bytes()).hexdigest() if ours.exists() else None
    if summary["settings"]["tokenizer"]["tokenizer.json"] != ours:
        say(f"warning: {dataset.path} was tokenized with {made_with.get('source')}, not this run's tokenizer")


class Loaders(NamedTuple):
    train: Callable  # (start_step, reference=None) -> the training batches from that step on
    validation: Callable  # (name, reference=None) -> a pass over that validation set's batches
    shapes: dict  # "training", "evaluation" -> the batch shapes planned for them (data.plan_shapes)
    blank: Callable  # (kind, shape) -> a batch of that shape, all padding: what its program compiles on


def loaders(config, inputs: Inputs) -> Loaders:
    """The training batches from where a run starts, a pass over each validation set's pairs (the first
    max_eval_batches batches' worth, shortest first: the sums do not care about order, and like lengths pad
    less), and the few batch shapes that every batch of the run is laid out in, planned over all of the
    run's steps and its validation passes so that they compile before the first step. Planning is the last
    check on the data (too few pairs for a batch, tokenized pairs over max_seq_len): it runs before the
    run directory is written. `reference`: the precomputed reference's log-probs of each pair, by row."""
    # Packed rows split evenly over the batch axes' devices and the microbatches (evaluation's too).
    devices = math.prod(inputs.mesh.shape[axis] for axis in sharding.BATCH_AXES)
    rows = devices * config.num_microbatches
    layout = data.Layout(config.prefix_sharing, config.packing, rows, config.mesh_context)
    # Each process loads the rows its devices hold: processes along context or tensor load the same ones.
    mine, slices = sharding.row_slices(inputs.mesh)
    size, processes = config.train_batch_size, dict(row_slices=slices)
    cap = None if config.max_eval_batches is None else config.max_eval_batches * size
    shuffle = dict(batch_size=size, seed=config.seed, group_by_length=config.group_by_length)
    order = data.train_order(inputs.train_set, inputs.train_idx, **shuffle)
    # Planned over the whole run whatever the start, so that a resumed run meets the programs it compiled
    # before (from the cache); each validation set's pass apart.
    plan = dict(max_seq_len=config.max_seq_len, layout=layout, **processes)
    planned = lambda dataset, batches, count: (
        data.plan_shapes(dataset, batches, count=count, **plan) if batches else []
    )
    steps = [order(step) for step in range(config.num_train_steps)]
    evaluated = {name: (d, data.by_length(d, rows[:cap])) for name, (d, rows) in inputs.validation.items()}
    passes = {
        name: planned(d, data.eval_order(rows, size), data.EVAL_SHAPES)
        for name, (d, rows) in evaluated.items()
    }
    shapes = dict(
        training=planned(inputs.train_set, steps, data.TRAIN_SHAPES),
        evaluation=list(dict.fromkeys(shape for each in passes.values() for shape in each)),
    )
    common = dict(max_seq_len=config.max_seq_len, row_slice=mine, layout=layout, **processes)
    train = lambda start_step, reference=None: data.train_batches(
        inputs.train_set,
        inputs.train_idx,
        start_step=start_step,
        reference=reference,
        shapes=shapes["training"],
        **shuffle,
        **common,
    )
    validation = lambda name, reference=None: data.eval_batches(
        *evaluated[name], reference=reference, shapes=passes[name], batch_size=size, **common
    )
    with_reference = lambda kind: (
        config.reference_mode == "precompute" and kind != "reference"
    )  # it makes them
    blank = lambda kind, shape: data.blank_batch(shape, with_reference(kind), slices)
    return Loaders(train, validation, shapes, blank)


@contextlib.contextmanager
def open_run(config):
    """The run directory checked, then held (one run at a time in it), the inputs loaded and checked, the
    batches planned (the last check on the data), config.json written: everything is checked before anything
    is written or deleted. Yields (run directory, config, inputs, loaders)."""
    run, given = Path(config.output_dir), config  # config.json records the config as given
    demo = config.model_name_or_path == "demo"
    if demo:  # the demo's model and pairs, made in the run directory once it has passed its check
        pairs = config.train_data or str(run / "demo" / "pairs.jsonl")
        config = dataclasses.replace(config, model_name_or_path=str(run / "demo" / "model"), train_data=pairs)
    check_run_dir(run, given)  # a copied demo run finds its files anew
    with run_lock(run):  # a second run in the same directory is refused, naming this one
        made = demo and not (run / "demo").exists()
        try:
            if demo:
                make_demo(run / "demo", config.seed)
            inputs = load_inputs(run, config)
            batches = loaders(config, inputs)  # plans the batch shapes: the last check on the data
            start_run_dir(run, given, inputs.data_id)
        except BaseException:  # refused: the demo it made goes too
            if made and sharding.is_writer():
                sharding.remove(run / "demo")
            raise
        yield run, config, inputs, batches


# --- checkpoints: one .npy file per array, so a restoring host reads only its slices


def _leaf_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")  # e.g. opt_state/1/0/mu/layers/wq


def _other_data(folder: Path, data_id: str) -> bool:
    """Whether the checkpoint in `folder` was trained on other data than `data_id` (its done.json records
    the data's id; one written before it did says nothing)."""
    return json.loads((folder / "done.json").read_text()).get("data", data_id) != data_id


def saved_steps(run: Path) -> list[int]:
    """Steps of the complete checkpoints: those with the done.json marker, which is written last."""
    return sorted(int(d.name[5:]) for d in (run / "checkpoints").glob("step-*") if (d / "done.json").exists())


def save_checkpoint(run: Path, state, keep: int, data_id: str) -> None:
    """Write checkpoints/step-N through a temporary directory renamed into place, then the done.json marker.
    Only a directory with the marker counts, so a crash at any moment leaves the newest complete checkpoint
    in charge. The marker records `data_id`, what the run trains on. Keeps the newest `keep`. Every process
    takes part (arrays are gathered); process 0 writes."""
    step, writer = int(state.step), sharding.is_writer()
    final = run / "checkpoints" / f"step-{step}"
    with sharding.atomic(final) if writer else contextlib.nullcontext() as tmp:
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
            array = sharding.to_host(leaf)
            if writer:
                (tmp / _leaf_name(path)).parent.mkdir(parents=True, exist_ok=True)
                np.save(tmp / f"{_leaf_name(path)}.npy", array)
        if writer:
            os.sync()  # every file on disk before the checkpoint can look complete (power loss too)
    if writer:
        # The marker goes last, into the renamed directory: that stays safe where a directory rename
        # is not atomic (file systems over object stores copy file by file).
        (final / "done.json").write_text(json.dumps({"step": step, "data": data_id}))
        os.sync()
        kept = {f"step-{s}" for s in saved_steps(run)[-keep:]}
        for old in (run / "checkpoints").iterdir():
            if old.name not in kept:
                (old / "done.json").unlink(missing_ok=True)  # first: a half-deleted one never counts
                sharding.remove(old)
    multihost_utils.sync_global_devices(f"checkpoint {step}")


def _unreadable(folder: Path, abstract) -> str | None:
    """Why the checkpoint in `folder` would not load completely (a file missing, cut short, empty, a pickle,
    of another shape), or None. Reads each file's header only."""
    for path, like in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        name = f"{_leaf_name(path)}.npy"
        try:
            shape = np.load(folder / name, mmap_mode="r").shape
        except (OSError, ValueError, EOFError) as e:
            return f"{name}: {e}"
        if shape != like.shape:
            return f"{name} has shape {shape}, expected {like.shape}"
    return None


def check_base(run: Path, config, base: dict | None, resuming: bool) -> None:
    """A quantised base is made anew at every start (model.load_params): a resume checks that it is the one
    its checkpoints were trained on, by the fingerprint that the start before wrote to base.json (the model's
    files may have changed under the same name, e.g. a Hub revision)."""
    if config.base_quantization == "none":
        return
    file, fingerprint = run / "base.json", model.fingerprint(base)
    if resuming and file.exists() and json.loads(file.read_text())["fingerprint"] != fingerprint:
        raise ValueError(
            f"the {config.base_quantization} base made from {config.model_name_or_path} differs from the one "
            f"{run}/checkpoints were trained on (its files changed): use another output_dir, or "
            "--config.overwrite to start afresh"
        )
    if sharding.is_writer():
        with sharding.atomic(file) as tmp:
            tmp.write_text(json.dumps({"fingerprint": fingerprint}))


def restore_checkpoint(run: Path, abstract, mesh, data_id: str):
    """The newest checkpoint that loads completely (None: there is none yet), each process reading through
    a memory map only the slices its own devices hold. A damaged newer one is skipped, saying why; one
    written for other data than `data_id` is refused."""
    skipped = []
    for step in reversed(saved_steps(run)):
        folder = run / "checkpoints" / f"step-{step}"
        if problem := _unreadable(folder, abstract):
            skipped.append(f"checkpoints/step-{step} ({problem})")
            continue
        if skipped:
            say(f"skipped {'; '.join(skipped)}: it does not load completely")
        if _other_data(folder, data_id):
            raise ValueError(
                f"the training or validation data changed since {folder} was written (tokenized anew): use "
                "another output_dir, or --config.overwrite to start afresh"
            )

        def load(path, like, folder=folder):
            array = np.load(folder / f"{_leaf_name(path)}.npy", mmap_mode="r")
            # eval_shape gives specs on the abstract mesh; scalars (step, counts) have none: replicated.
            where = NamedSharding(mesh, like.sharding.spec if like.sharding is not None else P())
            return jax.make_array_from_callback(
                like.shape, where, lambda idx: np.asarray(array[idx], like.dtype)
            )

        say(f"resumed from {folder}")
        return jax.tree_util.tree_map_with_path(load, abstract)
    if skipped:
        raise ValueError(
            f"no checkpoint in {run}/checkpoints loads completely: {'; '.join(skipped)}. Delete the "
            f"damaged ones to resume from an older one, or all of {run}/checkpoints to start afresh"
        )
    return None


# --- precomputed reference log-probs: the reference runs once, not at every step (8N -> 6N per token)


def _reference_key(reference_dir: Path, dataset: data.PairDataset, config) -> str:
    """Hash of everything the reference log-probs depend on, so a changed model or data never reuses a stale
    file: the model and data files by identity (real path, size, modification time: a Hub snapshot's
    files resolve to blobs named by their content hash), not by reading 16 GB; the settings that change
    the numbers."""
    files = [reference_dir / "config.json", *sorted(reference_dir.glob("*.safetensors"))]
    files += sorted(dataset.path.glob("part-*.parquet"))
    identity = [[os.path.realpath(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    settings = [config.reference_dtype, config.compute_dtype, config.attention_impl]
    settings += [] if config.ld_alpha is None else [config.ld_alpha]  # LD-DPO scales the reference's too
    settings += [] if config.base_quantization == "none" else [config.base_quantization]  # LoRA's base
    identity += [dataset.summary.get("settings"), *settings]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def reference_caches(inputs: Inputs, config) -> dict:
    """The precomputed reference's caches by what each serves, None the training pairs and each validation
    set its name: one cache for every use of one dataset (a split of the training data), so that its pass
    runs once."""
    uses = {None: inputs.train_set} | {name: dataset for name, (dataset, _) in inputs.validation.items()}
    caches = {}
    for dataset in uses.values():
        if dataset.path not in caches:
            caches[dataset.path] = ReferenceCache(dataset, inputs.reference_dir, config, inputs.mesh)
    return {use: caches[dataset.path] for use, dataset in uses.items()}


class ReferenceCache:
    """One dataset's reference log-probs [len(dataset), 2] (chosen, rejected) by row, kept beside its
    tokenized data in reference/<key>.npy (see `_reference_key`), with the rows it still lacks (`todo`, all
    at first) and the few batch shapes planned for them (the reference's pass is compiled with the run's
    programs). dpo.precompute_reference computes them; progress goes to reference/<key>.partial.npz now and
    then, so an interrupted run resumes where it stopped, and the .npy is renamed into place only when
    complete. Process 0 writes."""

    def __init__(self, dataset: data.PairDataset, reference_dir: Path, config, mesh):
        self.dataset, self.final = (
            dataset,
            dataset.path / "reference" / f"{_reference_key(reference_dir, dataset, config)}.npy",
        )
        self.progress = self.final.with_suffix(".partial.npz")
        multihost_utils.sync_global_devices(f"reference {self.final}")
        self.logps = np.full((len(dataset), 2), np.nan, np.float32)
        if self.final.exists():
            self.logps = np.load(self.final)
        elif self.progress.exists():
            with np.load(self.progress) as saved:
                self.logps = saved["logps"]
        # What is left (rows still NaN), shortest first: batches of like length pad little.
        self.todo = data.by_length(dataset, np.flatnonzero(np.isnan(self.logps).any(axis=1)))
        self.size = config.microbatch_size or config.train_batch_size  # no gradients: a microbatch fits
        self.row_slice, slices = sharding.row_slices(mesh)  # the rows this process loads (loaders)
        self.loader = dict(max_seq_len=config.max_seq_len, row_slices=slices)
        self.loader |= dict(layout=data.Layout(width_multiple=config.mesh_context))  # one pair a row
        # A few shapes for the whole pass: its batches run shortest first, so they span every length.
        order = data.eval_order(self.todo, self.size)
        self.shapes = (
            data.plan_shapes(dataset, order, count=data.TRAIN_SHAPES, **self.loader) if len(self.todo) else []
        )

    def batches(self):
        """(the rows, a host-local batch of them) for every batch of the rows still lacking."""
        if not len(self.todo):
            return
        say(f"reference log-probs: {len(self.todo)} of {len(self.dataset)} pairs to compute -> {self.final}")
        if sharding.is_writer():
            self.final.parent.mkdir(parents=True, exist_ok=True)
        options = dict(batch_size=self.size, row_slice=self.row_slice, shapes=self.shapes)
        batches = data.eval_batches(self.dataset, self.todo, **options, **self.loader)
        self.saved_at, self.counter = time.time(), Progress("reference log-probs", "pairs", len(self.todo))
        for at, batch in zip(range(0, len(self.todo), self.size), batches, strict=True):
            yield self.todo[at : at + self.size], batch

    def record(self, rows: np.ndarray, logps: np.ndarray) -> None:
        """The log-probs [>= len(rows), 2] of `rows` (a batch's padding after them); saved now and then."""
        self.logps[rows] = logps[: len(rows)]
        self.counter.advance(len(rows))
        if sharding.is_writer() and time.time() - self.saved_at > 60:  # a kill loses at most a minute of work
            with sharding.atomic(self.progress) as tmp:
                np.savez(tmp, logps=self.logps)
            self.saved_at = time.time()

    def finish(self) -> None:
        """The complete table (`logps`), written once: nothing is left to do."""
        if sharding.is_writer() and not self.final.exists():
            with sharding.atomic(self.final) as tmp:
                np.save(tmp, self.logps)
            self.progress.unlink(missing_ok=True)
        if len(self.todo):
            multihost_utils.sync_global_devices(f"reference done {self.final}")
        self.todo = self.todo[:0]


class Progress:
    """A progress line for a long pass (the reference's, an evaluation) on process 0: done of total, the rate
    and what is left, every `every` seconds, and only once the pass has run that long."""

    def __init__(self, what: str, unit: str, total: int | None = None, every: float = 30.0):
        self.what, self.unit, self.total, self.every = what, unit, total, every
        self.started = self.shown = time.time()
        self.done = 0

    def advance(self, count: int) -> None:
        self.done += count
        now = time.time()
        if now - self.shown < self.every:
            return
        self.shown, rate = now, self.done / (now - self.started)
        left = f", about {(self.total - self.done) / rate:.0f} s left" if self.total else ""
        of = f" of {self.total}" if self.total else ""
        say(f"{self.what}: {self.done}{of} {self.unit}, {rate:.1f} {self.unit}/s{left}")


# --- metrics and the console


def _step_of(line: str) -> int:
    """The step of one metrics.jsonl line; -1 for a line cut short by a crash."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1


class MetricsLog:
    """metrics.jsonl (process 0), Weights & Biases, and the console. One line per step and kind: lines past
    the checkpoint a run resumes from (every line, on a fresh start) were written by an interrupted run and
    will be written again, so they go, as does a line a crash cut short."""

    def __init__(self, run: Path, config, resume_step: int | None):
        self.path, self.config, self.wandb = run / "metrics.jsonl", config, None
        self.peak, self.devices = peak_flops(jax.devices()[0]), jax.device_count()
        self.start, self.started = resume_step or 0, time.time()
        self.last, self.evaluated = self.started, set()  # evaluated: the steps with an eval line kept
        if not sharding.is_writer():
            return
        lines = self.path.read_text().splitlines() if self.path.exists() and resume_step is not None else []
        kept = [line for line in lines if 0 <= _step_of(line) <= resume_step]
        with sharding.atomic(self.path) as tmp:  # replaced whole: a crash here loses no lines
            tmp.write_text("".join(line + "\n" for line in kept))
        self.evaluated = {_step_of(line) for line in kept if eval_sets([json.loads(line)])}
        if config.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ValueError("wandb_project is set but wandb is not installed: pip install wandb") from e
            # One W&B run per run directory, made at its fresh start, continued after.
            id_file, settings = run / "wandb-id", dataclasses.asdict(config)
            if resume_step is None or not id_file.exists():
                id_file.write_text(uuid.uuid4().hex[:16])
            where = dict(dir=str(run), id=id_file.read_text(), resume="allow", name=run.resolve().name)
            self.wandb = wandb.init(project=config.wandb_project, config=settings, **where)

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exception) -> None:
        if self.wandb:
            self.wandb.finish()

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if sharding.is_writer():
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            if self.wandb:
                self.wandb.log(metrics, step=step)

    def train(self, step: int, metrics: dict[str, float]) -> None:
        """One training step's line, with throughput from the step's token and FLOP counts."""
        now, tokens, flops = time.time(), metrics.pop("tokens"), metrics.pop("flops")
        metrics["throughput/tokens_per_second"] = tokens / (now - self.last)
        if self.peak:
            metrics["throughput/mfu"] = flops / (now - self.last) / (self.peak * self.devices)
        self.last, total = now, self.config.num_train_steps
        self.write(step, metrics)
        if step % self.config.log_every == 0 or step == total:
            eta = (now - self.started) / (step - self.start) * (total - step)
            say(
                f"step {step}/{total} | loss {metrics['loss']:.4f} acc {metrics['rewards/accuracies']:.3f} "
                f"margin {metrics['rewards/margins']:.4f} | {metrics['throughput/tokens_per_second']:.0f} "
                f"tok/s | eta {eta:.0f}s"
            )

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        self.write(step, metrics)
        for prefix in eval_sets([metrics]):  # "eval/", or "eval/NAME/" for each of several sets
            name = prefix[len("eval/") : -1] + " " if prefix != "eval/" else ""
            loss, accuracy = metrics[f"{prefix}loss"], metrics[f"{prefix}rewards/accuracies"]
            say(f"step {step} | eval {name}loss {loss:.4f} acc {accuracy:.3f}")


def eval_prefix(name: str, sets: int) -> str:
    """A validation set's metric keys' prefix: "eval/" for the only set, "eval/NAME/" for each of several."""
    return "eval/" if sets == 1 else f"eval/{name}/"


def eval_sets(records: list[dict]) -> list[str]:
    """The key prefixes of the validation sets in metrics records (eval_prefix's), read back."""
    keys = {key for record in records for key in record}
    return sorted(key[: -len("loss")] for key in keys if key.startswith("eval/") and key.endswith("/loss"))


def skipped_at_resume(run: Path, done: int, config, log: MetricsLog) -> tuple[bool, bool]:
    """(eval, export): whether the eval and the export due at the checkpoint's step `done` are missing from
    the run: a stop request skips them to checkpoint in time, and a kill between checkpoint and export loses
    the export. Process 0 looks (it writes both); every process gets what it found."""
    last = done == config.num_train_steps
    missing = [
        (done % config.steps_per_eval == 0 or last) and done not in log.evaluated,
        (done % config.steps_per_hf_export == 0 or last) and not (run / "hf" / f"step-{done}").exists(),
    ]
    return tuple(map(bool, multihost_utils.broadcast_one_to_all(np.array(missing))))


PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops(device: jax.Device) -> float | None:
    """Dense bf16 peak of one chip, when known."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k.lower() in device.device_kind.lower()), None)


# --- the persistent compilation cache

_cache_hits = []  # one entry per program the persistent compilation cache served
jax.monitoring.register_event_listener(
    lambda event, **_: _cache_hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None
)


def use_compilation_cache(directory: str | None) -> None:
    """XLA's persistent compilation cache in `directory` (None: off), every program kept however fast it
    compiled, so a rerun, a resume or another run of the same shapes compiles nothing. Every process reads
    it and JAX writes from process 0 only, so one directory that all hosts share is safe. A local directory
    that cannot be made or written (a file in its path, a read-only disk) turns it off, saying why: JAX would
    otherwise cache nothing, silently, on every run."""
    if directory and "://" not in directory:  # gs://... goes through JAX's own file layer: not checked
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=directory).close()
        except OSError as e:
            why = "a file, not a folder" if isinstance(e, FileExistsError) else e.strerror or e
            say(f"compilation cache off: {directory}: {why}, so every program compiles anew")
            directory = None
    jax.config.update("jax_compilation_cache_dir", directory)
    # A cache entry that cannot be written (a full disk) costs a compile next time, nothing now; the run's
    # own files say it in one line when they cannot be written.
    warnings.filterwarnings("ignore", message="Error writing persistent compilation cache entry")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()  # JAX decides once per process whether to use it: decide again


def cache_hits() -> int:
    """Programs served by the persistent compilation cache so far, in this process."""
    return len(_cache_hits)


def compile_lowered(lowered: dict) -> tuple[dict, float, int]:
    """Programs that dpo lowered, by key, compiled on threads (XLA compiles them in parallel): (the compiled
    programs by key, the seconds it took, how many the persistent cache served). Nothing is traced here."""
    started, hits = time.time(), cache_hits()
    with ThreadPoolExecutor(max(min(len(lowered), os.cpu_count() or 1), 1)) as pool:
        compiled = dict(
            zip(lowered, pool.map(lambda program: program.compile(), lowered.values()), strict=True)
        )
    return compiled, time.time() - started, cache_hits() - hits


def programs_report(shapes: dict, compiled: int, seconds: float, from_cache: int, unplanned: int) -> str:
    """The run's last word on its programs: what was compiled for which shapes, how long it took, how many
    programs the cache served."""
    if not compiled:
        return "none: no step is left to run"
    text = lambda shape: "x".join(map(str, shape if shape.slots else shape[:2]))
    shown = lambda s: f" ({', '.join(map(text, s))})" if s[0] else ""
    planned = [f"{len(s)} {kind}{shown(s)}" for kind, s in shapes.items() if s]
    extra = f" and {unplanned} unplanned" if unplanned else ""
    rows = any(shape and shape.slots for kind_shapes in shapes.values() for shape in kind_shapes)
    legend = "rows x width x pair slots x view width" if rows else "pairs x width"
    return (
        f"compiled {', '.join(planned)}{extra} in {seconds:.1f} s, {from_cache} of {compiled} from the cache "
        f"(batch shapes: {legend})"
    )


# --- stopping


@contextlib.contextmanager
def stop_requests():
    """While inside, SIGTERM (preemption) and SIGINT (Ctrl-C) only note a request, which the loop honours
    after the current step: checkpoint, exit 0. A second Ctrl-C quits at once; a repeated SIGTERM (launchers
    send several) changes nothing. Yields a function that says, the same on every process, whether any was
    asked to stop. The previous handlers come back on exit."""
    requested = []

    def request(signum, frame):
        requested.append(signum)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def asked() -> bool:  # every process must stop at the same step
        if jax.process_count() == 1:
            return bool(requested)
        return bool(np.max(multihost_utils.process_allgather(np.int32(bool(requested)))))

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield asked
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def one_line_errors():
    """The command line's exits: a user's mistake, a full disk or a lost file is one line on stderr and exit
    code 2 (DPO_TRACEBACK=1 shows the traceback instead); a second Ctrl-C, or one before training, 130."""
    try:
        yield
    except KeyboardInterrupt:  # nothing half-written stays
        print("error: interrupted; run the same command to go on from the newest checkpoint", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, FloatingPointError) as e:
        if os.environ.get("DPO_TRACEBACK"):
            raise
        if isinstance(e, OSError) and e.filename:  # a full disk, no permission
            e = (
                f"{e.filename}: {e.strerror or e}. Fix that (a full disk: free some space) and run the same "
                "command: it resumes from the newest complete checkpoint"
            )
        print(f"error: {e}  (DPO_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)


def check_update(step: int, metrics: dict, config, run: Path) -> None:
    """A non-finite loss or gradient (the step left the weights as they were): stop, or say it was skipped;
    stop too when every update so far was skipped, which trains on nothing."""
    if not metrics.pop("nonfinite"):
        return
    if config.on_nonfinite == "stop":
        good = ([f"step-{s}" for s in saved_steps(run)] or ["none"])[-1]
        raise FloatingPointError(
            f"step {step}: non-finite loss or gradient (loss {metrics['loss']}, grad_norm "
            f"{metrics['grad_norm']}); the update was not applied; newest good checkpoint: {good}. "
            "Rerun with --config.on-nonfinite skip to resume from it and skip such updates"
        )
    say(f"step {step}: non-finite loss or gradient, update skipped")
    if metrics["skipped_updates"] == step >= 10:
        raise FloatingPointError(
            f"every update of steps 1..{step} was non-finite, so the run trains on nothing: check "
            "learning_rate, beta and the loss settings"
        )


# --- export


class ExportFiles(NamedTuple):
    """What every export carries beside the weights, found once at the start: a Hub tokenizer is not looked
    up again mid-run, where a network hiccup would fail an export."""

    generation: dict | None  # generation_config.json: the end-of-turn ids the model was given
    tokenizer: list[Path]  # the tokenizer's files, so that transformers loads it from the export too
    config: object
    arch: model.LlamaConfig
    model_dir: Path  # the model as resolved at the start: QLoRA's export merges into its original weights


def export_files(config, inputs: Inputs) -> ExportFiles:
    generation = inputs.model_dir / "generation_config.json"
    generation = json.loads(generation.read_text()) if generation.exists() else None
    files = [path for name in data.TOKENIZER_FILES if (path := inputs.tokenizer_dir / name).exists()]
    return ExportFiles(generation, files, config, inputs.arch, inputs.model_dir)


def save_export(run: Path, step: int, params, adapters, files: ExportFiles) -> None:
    """hf/step-N: `params` for transformers and, with LoRA (`adapters`, `params` the merged weights), the
    adapters for PEFT in hf/step-N/adapter. A quantised base's weights are merged into their originals, read
    back from the model's files: the export is the original base plus the adapters."""
    config, out, extra = files.config, run / "hf" / f"step-{step}", files.tokenizer
    original = config.base_quantization != "none"
    if original:
        params = model.merge_lora_from_file(files.model_dir, files.arch, params, adapters, config.lora_scale)
    with tempfile.TemporaryDirectory() as tmp:
        if adapters is not None:
            alpha, adapter = config.lora_rank * config.lora_scale, Path(tmp) / "adapter"
            model.save_peft_adapter(
                adapters, files.arch, config.lora_rank, alpha, adapter, config.model_name_or_path
            )
            extra = extra + [adapter]
        saved = dict(dtype=config.hf_save_dtype, generation_config=files.generation, extra_files=extra)
        model.save_hf(params, files.arch, out, **saved)
    merged = f" (the original base, not the {config.base_quantization} one, with the adapters merged in f32)"
    say(f"step {step} | exported {out}{merged if original else ''}")


# --- the run report: report.md and curves.png, from config.json and metrics.jsonl

CURVES = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "learning_rate")


def write_report(
    run: Path, defaults: dict, seconds: float | None = None, programs: str | None = None
) -> Path:
    """run/report.md: what ran (model, data, the settings that differ from `defaults`, steps, wall time,
    tokens/s and MFU), the final train and eval numbers, the compiled programs (when the run that ends gives
    them); and run/curves.png of CURVES against steps, train and eval, where matplotlib is installed (the
    report says how to get it where not). Process 0 reads and writes both (atomically): the others may see
    no run directory at all."""
    if not sharding.is_writer():
        return run / "report.md"
    config, defaults = json.loads((run / "config.json").read_text()), json.loads(json.dumps(defaults))
    lines = [
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if _step_of(line) >= 0
    ]
    train, evals = [m for m in lines if "loss" in m], [m for m in lines if eval_sets([m])]
    changed = [f"| `{k}` | `{v}` |" for k, v in config.items() if k in defaults and v != defaults[k]]
    mean = lambda key: np.mean([m[key] for m in train if key in m]) if any(key in m for m in train) else None
    rate, mfu = mean("throughput/tokens_per_second"), mean("throughput/mfu")
    final = lambda m, keys: " | ".join(f"{k} {m[k]:.4g}" for k in keys if k in m) if m else "none"
    text = [
        f"# Run report: {run.resolve().name}",
        f"model `{config['model_name_or_path']}`, data `{config['train_data'] or 'the demo pairs'}`, "
        f"validation `{' '.join(one_or_more(config['validation_data']) or ['a split of the data'])}`",
        f"steps {train[-1]['step'] if train else 0} of {config['num_train_steps']}"
        + (f", wall time {seconds:.0f} s" if seconds is not None else "")
        + (f", {rate:.0f} tokens/s" if rate is not None else "")
        + (f", MFU {mfu:.1%}" if mfu is not None else ""),
        "",
        "| setting (not the default) | value |",
        "|---|---|",
        *changed,
        "",
        f"final train (step {train[-1]['step'] if train else '-'}): "
        + final(train[-1] if train else {}, CURVES[:-1]),
        *(
            f"final {prefix[:-1]} (step {evals[-1]['step']}): "
            + final(evals[-1], [prefix + k for k in CURVES[:-1]])
            for prefix in eval_sets(evals[-1:])
        ),
    ]
    text += [f"programs: {programs}"] if programs else []
    text += ["", _plot_curves(run, train, evals)]
    with sharding.atomic(run / "report.md") as tmp:
        tmp.write_text("\n".join(text) + "\n")
    return run / "report.md"


def _plot_curves(run: Path, train: list[dict], evals: list[dict]) -> str:
    """curves.png, where matplotlib is installed; the report's line about it."""
    try:
        from matplotlib.figure import Figure  # drawn to a file by Agg, with no pyplot state or display
    except ImportError:
        return (
            'curves.png: needs matplotlib (`pip install -e ".[plot]"`), then `python dpo.py report RUN_DIR`'
        )
    with sharding.atomic(run / "curves.png") as tmp:
        curves_figure(Figure(figsize=(13, 7)), train, evals).savefig(tmp, format="png", dpi=80)
    return "![curves](curves.png)"


def curves_figure(figure, train: list[dict], evals: list[dict]):
    """A panel per CURVES key against steps on `figure`: the train line and each validation set's eval line
    (metrics.jsonl's lines)."""
    axes = figure.subplots(2, 3)
    # fixed margins: matplotlib's constrained layout would double the drawing time, paid at every run's end
    figure.subplots_adjust(left=0.05, right=0.98, bottom=0.08, top=0.95, wspace=0.22, hspace=0.35)
    lines = [("train", train, ""), *((prefix[:-1], evals, prefix) for prefix in eval_sets(evals))]
    for ax, key in zip(axes.flat, CURVES, strict=True):
        for name, rows, field in ((name, rows, prefix + key) for name, rows, prefix in lines):
            if points := [(m["step"], m[field]) for m in rows if field in m]:
                ax.plot(*zip(*points, strict=True), label=name, marker="." if rows is evals else None)
        ax.set(title=key, xlabel="step")
        if ax.get_lines():  # a run with no step yet has no train line
            ax.legend()
    return figure


def report_command(args: list[str], defaults: dict) -> None:
    """`python dpo.py report RUN_DIR`: the report of a run, finished or not."""
    if len(args) != 1 or not (Path(args[0]) / "metrics.jsonl").exists():
        raise ValueError(
            f"usage: python dpo.py report RUN_DIR (a run directory with metrics.jsonl), got {args}"
        )
    say(f"wrote {write_report(Path(args[0]), defaults)}")


# --- the offline demo (a tiny Llama, a word-level tokenizer with a chat template, synthetic pairs)


# What the demo uses for the fields not given on the command line (a tiny model from scratch learns at a
# far higher rate than a pretrained 8B model tolerates). See dpo.parse_args.
DEMO_SETTINGS = {
    "train_batch_size": 32,
    "num_train_steps": 120,
    "learning_rate": 3e-3,
    "warmup": 0.05,
    "cooldown": 0.2,
    "adam_b2": 0.99,
    "max_seq_len": 64,
    "logits_chunk_size": 32,
    "steps_per_eval": 30,
    "steps_per_checkpoint": 60,
    "steps_per_hf_export": 120,
    "log_every": 10,
    "output_dir": "runs/demo",
}


def demo_config(given, demo):
    """The demo's config: `demo`, the command line parsed over DEMO_SETTINGS, where `given` is it parsed over
    the defaults (None: refused there, as values that only the demo's settings hold); says which of the
    demo's settings apply (a field not on the command line parses to whichever default it is given, and a
    value given always wins)."""
    default = type(demo)()
    unset = lambda k: given is None or getattr(given, k) == getattr(default, k)
    kept = lambda k: unset(k) and getattr(demo, k) == DEMO_SETTINGS[k]
    if applied := ", ".join(f"{k}={v}" for k, v in DEMO_SETTINGS.items() if kept(k)):
        say(f"demo: {applied} (change any with --config.FIELD VALUE)")
    return demo


DEMO_TOPICS = {
    "colors": "red blue green yellow purple orange pink brown black white grey violet",
    "animals": "cat dog horse cow sheep goat mouse lion tiger bear wolf fox",
    "foods": "bread rice apple pear cheese soup cake plum bean corn nut egg",
    "tools": "hammer saw drill wrench knife axe rope nail screw file chisel lever",
}
DEMO_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def make_demo(root: Path, seed: int) -> tuple[Path, Path]:
    """A tiny HF-format Llama with its tokenizer, and preference pairs whose rule (answer with words of the
    topic the prompt names) a small model learns from a few hundred pairs and applies to pairs it has not
    seen. Returns (model_dir, data_file); each is written whole or not at all."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    model_dir, data_file = root / "model", root / "pairs.jsonl"
    if model_dir.exists() and data_file.exists():
        return model_dir, data_file
    specials = "<|pad|> <|begin_of_text|> <|end_of_text|> <|start_header_id|> <|end_header_id|> <|eot_id|>"
    specials = specials.split()
    words = {w for ws in DEMO_TOPICS.values() for w in ws.split()} | set(DEMO_TOPICS)
    words |= {"user", "assistant", "system", "tell", "me", "some", "please", "[UNK]"}
    vocab = {token: i for i, token in enumerate(specials + sorted(words))}
    ids = dict(bos_token_id=1, eos_token_id=(5,), pad_token_id=0, max_position_embeddings=256)
    arch = model.LlamaConfig(len(vocab), 64, 192, 2, 4, 2, 16, rope_theta=10000.0, **ids)
    writer = sharding.is_writer()
    with tempfile.TemporaryDirectory() as tmp:
        if writer:
            tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
            tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
            tokenizer.add_special_tokens(specials)
            tokenizer.save(f"{tmp}/tokenizer.json")
            names = dict(bos_token=specials[1], eos_token=specials[5], pad_token=specials[0])
            settings = dict(tokenizer_class="PreTrainedTokenizerFast", **names, chat_template=DEMO_TEMPLATE)
            settings["model_max_length"] = 4096
            Path(tmp, "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
        mesh = sharding.make_mesh(-1, 1, 1)  # replicated: every process can take part in the export
        with jax.set_mesh(mesh):
            files = [Path(tmp, "tokenizer.json"), Path(tmp, "tokenizer_config.json")] if writer else []
            params = model.init_params(arch, jax.random.key(seed), mesh)
            model.save_hf(params, arch, model_dir, dtype="float32", extra_files=files)
    if writer:
        rng = np.random.default_rng(seed)
        with sharding.atomic(data_file) as tmp, open(tmp, "w") as f:
            for _ in range(640):
                topic, other = rng.choice(list(DEMO_TOPICS), size=2, replace=False)
                pick = lambda t: " ".join(rng.choice(DEMO_TOPICS[t].split(), size=rng.integers(3, 7)))
                pair = dict(prompt=f"please tell me some {topic}", chosen=pick(topic), rejected=pick(other))
                f.write(json.dumps(pair) + "\n")
    multihost_utils.sync_global_devices("demo ready")
    return model_dir, data_file
