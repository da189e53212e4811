"""LoRA against independent references: the merged full-weight model (forward and gradients), PEFT (our
adapter loaded onto the base), one device (a mesh), an uninterrupted run (resume), the DPO formula (log 2)."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

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
    table = model.lora_weights(RANK, tuple(model.LORA_TARGETS))
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
            table = model.lora_weights(RANK, tuple(model.LORA_TARGETS))
            for array, w in zip(jax.tree.leaves(lora), jax.tree.leaves(table), strict=True):
                assert array.sharding.spec == w.spec  # A like the input axes, B like the output axes
            state = jax.jit(lambda p: dpo.TrainState.create(p, optimizer))(lora)
            train_step, _ = dpo.make_steps(arch, config, optimizer)
            _, metrics = train_step(state, dpo.Frozen(base, base), sharding.global_batch(batch, mesh))
            results.append(jax.device_get(metrics))
    for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
        assert float(results[1][key]) == pytest.approx(float(results[0][key]), rel=1e-5), key


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
