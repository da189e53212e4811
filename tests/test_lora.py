"""LoRA against independent references: the merged full-weight model (forward and gradients), PEFT (our
adapter loaded onto the base), one device (a mesh), an uninterrupted run (resume), the DPO formula (log 2)."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from _tolerance import assert_metrics_close

import bookkeeping
import data
import dpo
import model
import sharding

ONE_DEVICE = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
RANK, SCALE = 4, 1.5
SMALL = dict(train_batch_size=8, max_seq_len=64, logits_chunk_size=32, learning_rate=1e-2, warmup=0,
             max_eval_batches=1, steps_per_eval=100, lora_rank=RANK, lora_alpha=RANK * SCALE)  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model_dir, pairs = bookkeeping.make_demo(root, seed=0)
    data.tokenize(str(pairs), str(model_dir), str(root / "tokenized"), max_seq_len=64)
    return model_dir, pairs, root / "tokenized"


def random_adapters(arch, mesh, seed=1):
    """Adapters with B != 0 too (at init B is zero, which would hide a wrong low-rank path)."""
    table = model.lora_weights(arch, RANK, tuple(model.LORA_TARGETS))
    lora = model.init_params(arch, jax.random.key(seed), mesh, table)
    noise = lambda x, k: x + 0.05 * jax.random.normal(k, x.shape, out_sharding=jax.typeof(x).sharding.spec)
    leaves, tree = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return tree.unflatten([noise(x, k) for x, k in zip(leaves, keys, strict=True)])


def test_forward_and_gradients_equal_the_merged_full_weight_model(demo):
    model_dir = demo[0]
    arch = model.load_config(model_dir)
    tokens = np.random.default_rng(0).integers(0, arch.vocab_size, (2, 12)).astype(np.int32)
    probe = np.random.default_rng(1).normal(size=(2, 12, arch.hidden_size)).astype(np.float32)
    with jax.set_mesh(ONE_DEVICE):
        base = model.load_params(model_dir, arch, ONE_DEVICE)
        lora = random_adapters(arch, ONE_DEVICE)
        loss = lambda params, lora: jnp.sum(
            probe * model.forward(params, tokens, arch, lora=lora, lora_scale=SCALE)
        )
        merged = model.merge_lora(base, lora, SCALE)
        assert float(loss(base, lora)) == pytest.approx(float(loss(merged, None)), rel=1e-5)
        d_lora = jax.grad(loss, argnums=1)(base, lora)
        d_merged = jax.grad(loss)(merged, None)["layers"]
    # W' = W + s A B, so dA = s dW' B^T and dB = s A^T dW', over each weight's input and output axes.
    for name, grads in d_lora.items():
        axes, n_in = model._weights_axes(name)
        inputs, outputs = axes[:n_in], axes[n_in:]
        a, b, dw = np.asarray(lora[name]["a"]), np.asarray(lora[name]["b"]), np.asarray(d_merged[name])
        want_a = SCALE * np.einsum(f"l{axes},lr{outputs}->l{inputs}r", dw, b)
        want_b = SCALE * np.einsum(f"l{inputs}r,l{axes}->lr{outputs}", a, dw)
        for got, want in ((grads["a"], want_a), (grads["b"], want_b)):  # f32: relative to each tensor's scale
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=name)


def test_adapters_are_sharded_like_their_weights_and_a_mesh_equals_one_device(demo):
    model_dir, _, tokenized = demo
    arch, dataset = model.load_config(model_dir), data.PairDataset(tokenized)
    batch = next(data.train_batches(dataset, range(len(dataset)), batch_size=16, seed=0, max_seq_len=64))
    config = dpo.Config(
        model_name_or_path=str(model_dir), train_data="x", **SMALL | dict(train_batch_size=16)
    )
    results = []
    optimizer = dpo.make_optimizer(config)
    for mesh in (ONE_DEVICE, sharding.make_mesh(1, 4, 2)):  # fsdp and tensor
        with jax.set_mesh(mesh):
            base = model.load_params(model_dir, arch, mesh)
            lora = random_adapters(arch, mesh)
            table = model.lora_weights(arch, RANK, tuple(model.LORA_TARGETS))
            for array, w in zip(jax.tree.leaves(lora), jax.tree.leaves(table), strict=True):
                assert array.sharding.spec == w.spec  # A like the input axes, B like the output axes
            state = jax.jit(lambda p: dpo.TrainState.create(p, optimizer))(lora)
            train_step = dpo.make_steps(arch, config)["training"]
            _, metrics = train_step(
                state, dpo.Frozen(base, base), config.hyperparameters(), sharding.global_batch(batch, mesh)
            )
            results.append(jax.device_get(metrics))
    # the loss and margins cancel: to the rounding floor of their log-probs (tests/_tolerance.py)
    keys = ("loss", "grad_norm", "rewards/margins", "logps/chosen")
    assert_metrics_close(results[1], results[0], keys, beta=0.1)


def test_step_0_is_the_reference_and_resume_is_exact_and_peft_loads_the_export(demo, tmp_path):
    model_dir, pairs, tokenized = demo
    settings = SMALL | dict(
        model_name_or_path=str(model_dir), train_data=str(tokenized), steps_per_checkpoint=2
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    dpo.main(dpo.Config(**settings, output_dir=str(straight), num_train_steps=4))
    lines = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: the policy is the base
    assert lines[-1]["eval/loss"] != lines[0]["eval/loss"]
    # A run that died after its step-2 checkpoint, then the same command: the same adapters, bit for bit.
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-4")
    dpo.main(dpo.Config(**settings, output_dir=str(resumed), num_train_steps=4))
    checkpoint = lambda run: {str(f.relative_to(run)): np.load(f) for f in sorted(run.rglob("*.npy"))}
    a, b = checkpoint(straight / "checkpoints" / "step-4"), checkpoint(resumed / "checkpoints" / "step-4")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # The checkpoint holds the adapters and their optimizer state only: no base weight.
    assert {k for k in a if k.startswith("params/")} == {
        f"params/{name}/{side}.npy" for name in model.LORA_TARGETS.values() for side in "ab"
    }

    # The export: transformers loads the merged weights; PEFT loads our adapter onto the base; same logits.
    peft = pytest.importorskip("peft")
    export = straight / "hf" / "step-4"
    tokens = torch.tensor(np.random.default_rng(0).integers(0, 66, (2, 20)))
    merged = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, export / "adapter")
    with torch.no_grad():
        want, got = merged(tokens).logits.numpy(), adapted(tokens).logits.numpy()
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()  # the export is bf16, the adapter f32
    arch = model.load_config(model_dir)
    with jax.set_mesh(ONE_DEVICE):
        ours_base = model.load_params(model_dir, arch, ONE_DEVICE)
        lora = {
            n: {s: jnp.asarray(a[f"params/{n}/{s}.npy"]) for s in "ab"} for n in model.LORA_TARGETS.values()
        }
        ours = model.logits(ours_base, tokens.numpy().astype(np.int32), arch, lora=lora, lora_scale=SCALE)
    np.testing.assert_allclose(got, np.asarray(ours), rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_a_separate_reference_model_still_works_with_lora(demo, tmp_path):
    model_dir, _, tokenized = demo
    other = tmp_path / "reference"
    shutil.copytree(model_dir, other)
    arch = model.load_config(model_dir)
    with jax.set_mesh(ONE_DEVICE):  # other weights under the same architecture
        model.save_hf(model.init_params(arch, jax.random.key(7), ONE_DEVICE), arch, other, dtype="float32")
    settings = SMALL | dict(model_name_or_path=str(model_dir), train_data=str(tokenized), num_train_steps=0)
    dpo.main(dpo.Config(**settings, output_dir=str(tmp_path / "run"), reference_model_path=str(other)))
    (line,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert abs(line["eval/loss"] - math.log(2)) > 1e-3  # compared with another model, not with the base


def test_merging_into_a_bf16_base_keeps_changes_below_its_rounding_step(demo):
    """A base held in bf16 (compute bf16) and a change far below bf16's step: the merge adds in f32 and
    rounds once, to the export's dtype, against the same sum in numpy."""
    model_dir = demo[0]
    arch = model.load_config(model_dir)
    with jax.set_mesh(ONE_DEVICE):
        base = model.load_params(model_dir, arch, ONE_DEVICE, dtype=jnp.bfloat16)
        lora = random_adapters(arch, ONE_DEVICE)
        lora = {name: {"a": ab["a"], "b": 1e-3 * ab["b"]} for name, ab in lora.items()}  # a few steps' worth
        merged = jax.jit(lambda b, lo: model.merge_lora(b, lo, SCALE))(base, lora)
        rounded = jax.jit(lambda b, lo: model.merge_lora(b, lo, SCALE, dtype=jnp.bfloat16))(base, lora)
    for name in lora:
        axes, n_in = model._weights_axes(name)
        a, b = (np.asarray(lora[name][k], np.float64) for k in "ab")
        w = np.asarray(base["layers"][name], np.float32)
        change = SCALE * np.einsum(f"l{axes[:n_in]}r,lr{axes[n_in:]}->l{axes}", a, b)
        want = (w + change).astype(np.float32)
        got = np.asarray(merged["layers"][name])
        assert got.dtype == np.float32 and np.mean(got == w) < 0.01, name  # the change is there
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7 * np.abs(change).max(), err_msg=name)
        assert rounded["layers"][name].dtype == jnp.bfloat16
        assert np.array_equal(np.asarray(rounded["layers"][name]), got.astype(jnp.bfloat16)), name
    assert merged["embed"].dtype == jnp.bfloat16  # what has no adapter is left as it is


def test_a_bf16_run_exports_the_whole_change_in_f32(demo, tmp_path):
    """The issue's command: compute bf16, hf_save_dtype float32. hf/step-3 is the bf16 base plus the change
    rebuilt from the exported PEFT adapter, in f32."""
    model_dir, _, tokenized = demo
    settings = SMALL | dict(model_name_or_path=str(model_dir), train_data=str(tokenized), learning_rate=1e-4)
    settings |= dict(num_train_steps=3, compute_dtype="bfloat16", hf_save_dtype="float32")
    dpo.main(dpo.Config(**settings, output_dir=str(tmp_path / "run")))
    export = tmp_path / "run" / "hf" / "step-3"
    got = safetensors.numpy.load_file(export / "model.safetensors")
    base = safetensors.numpy.load_file(model_dir / "model.safetensors")
    adapter = safetensors.numpy.load_file(export / "adapter" / "adapter_model.safetensors")
    alpha = json.loads((export / "adapter" / "adapter_config.json").read_text())["lora_alpha"]
    missed, changed = 0.0, 0.0
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        name = key.replace("base_model.model.", "").replace(".lora_A", "")
        b = adapter[key.replace("lora_A", "lora_B")].astype(np.float64)
        w = base[name].astype(jnp.bfloat16).astype(np.float32)  # the base as the run held it
        change = alpha / RANK * (b @ a.astype(np.float64))
        assert got[name].dtype == np.float32
        missed += np.sum((got[name] - (w + change)) ** 2)
        changed += np.sum(change**2)
    assert changed > 0 and missed < 1e-6 * changed  # before: 61% of the change was missing
