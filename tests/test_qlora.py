"""QLoRA (a frozen NF4 or int8 base under the adapters) against independent references: bitsandbytes'
quantisation (codes, absmax, double quantisation, dequantised weights) on one device and on a (2, 2, 2) mesh
whose fsdp devices split a block, and on real-shaped weights; a LoRA step on the NF4 base against the same
step on bitsandbytes' dequantised base held as f32 weights, in every layout on both meshes; PEFT loading the
exported adapter onto the original base; the demo learning, resuming bit for bit and refusing a changed
base; bad input."""

import json
import math
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from _model_helpers import make_hf_checkpoint
from _tolerance import assert_metrics_close
from jax.sharding import PartitionSpec as P

import bookkeeping
import data
import dpo
import model
import sharding

bnb = pytest.importorskip("bitsandbytes.functional")
ONE_DEVICE = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
MESH = sharding.make_mesh(2, 2, 2)  # fsdp splits the 64 inputs of wq, wk, wv, w_gate and w_up: one block
CONTEXT_MESH = sharding.make_mesh(1, 2, 2, context=2)  # FSDP spans fsdp x context: 4 devices split a block
# The double quantisation through bitsandbytes' PyTorch kernel, not its CPU library, whose binary search codes
# ~1% of the absmax values with the neighbour of the nearest entry of the 8-bit map (all its kernels mean the
# nearest, and its PyTorch and CUDA ones pick it).
TORCH_KERNEL = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def bnb_nf4(w: np.ndarray):
    """bitsandbytes' quantize_4bit(quant_type="nf4", compress_statistics=True) of nn.Linear's w [out, in],
    step by step: (packed codes, 8-bit absmax, scale, offset, dequantize_4bit's weight [out, in])."""
    w = torch.from_numpy(w.astype(np.float32))
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    offset, dynamic = state.absmax.mean(), torch.from_numpy(model.DYNAMIC_MAP)  # bitsandbytes' to an ulp
    blockwise = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch
    absmax, scale = blockwise(TORCH_KERNEL, state.absmax - offset, dynamic, 256)
    second = bnb.QuantState(absmax=scale, code=dynamic, blocksize=256, dtype=torch.float32)
    nested = bnb.QuantState(absmax=absmax, shape=w.shape, dtype=torch.float32, blocksize=64, code=state.code,
                            quant_type="nf4", offset=offset, state2=second)  # fmt: skip
    return packed, absmax, scale, offset, bnb.dequantize_4bit(packed, nested)


def assert_nf4_equals_bitsandbytes(codes, absmax, scale, offset, w, dequantized):
    """Our NF4 arrays of one layer (codes [in / 2, out], absmax [in / 64, out]) and its dequantised weight
    [in, out] against bitsandbytes' of w [out, in]: the codes bit for bit, the rest to f32 rounding (the
    offset, a mean, is summed in another order)."""
    packed, want_absmax, want_scale, want_offset, want = bnb_nf4(w)
    out, inputs = w.shape
    assert np.array_equal(codes, packed.numpy().reshape(out, inputs // 2).T)
    assert np.array_equal(absmax, want_absmax.numpy().reshape(out, inputs // 64).T)
    np.testing.assert_allclose(scale, want_scale.numpy(), rtol=1e-6)
    np.testing.assert_allclose(offset, want_offset.item(), rtol=1e-6)
    want = want.numpy().T
    np.testing.assert_allclose(dequantized, want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_the_levels_are_bitsandbytes():
    """NF4's 16 levels exactly; the 8-bit dynamic map to an ulp (model._dynamic_map says why), which is why
    bnb_nf4 codes the absmax values with ours: a value on the midpoint of two entries may go either way."""
    assert np.array_equal(model.NF4_LEVELS, bnb.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_max_ulp(model.DYNAMIC_MAP, bnb.create_dynamic_map().numpy(), maxulp=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Llama whose q heads hold 128 inputs (8 heads of 16), so that tensor=2 splits wo into whole
    blocks of 64, and whose hidden size 64 is one block that fsdp=2 splits."""
    directory = tmp_path_factory.mktemp("qlora") / "tiny"
    make_hf_checkpoint(directory, seed=0, head_dim=16)
    return directory, model.load_config(directory)


@jax.jit
def dequantized(layers: dict) -> dict:
    """Every quantised weight of the layers, layer by layer as the forward pass sees it, in f32."""
    one = lambda q, i: model._gathered(jax.tree.map(lambda x: x[i], q), jnp.float32)
    quantized = {k: q for k, q in layers.items() if isinstance(q, model.Quantized)}
    return {k: jnp.stack([one(q, i) for i in range(q.codes.shape[0])]) for k, q in quantized.items()}


@pytest.mark.parametrize(
    "mesh", [ONE_DEVICE, MESH, CONTEXT_MESH], ids=["one_device", "mesh_2x2x2", "mesh_1x2x2x2"]
)
def test_nf4_and_int8_bases_equal_bitsandbytes(tiny, mesh):
    """load_params, quantising as it reads, and the forward pass's dequantisation (_gathered)."""
    directory, arch = tiny
    weights = safetensors.numpy.load_file(directory / "model.safetensors")
    with jax.set_mesh(mesh):
        nf4 = model.load_params(directory, arch, mesh, quantization="nf4")
        int8 = model.load_params(directory, arch, mesh, quantization="int8")
        got = dequantized(nf4["layers"]), dequantized(int8["layers"])
    assert set(got[0]) == set(model.LORA_TARGETS.values())  # the embedding, LM head and norms stay
    straddled = []
    for name, spec in model.param_specs(arch)["layers"].items():
        if name not in got[0]:
            continue
        q, n_in = nf4["layers"][name], model._LAYER[name].n_in
        assert q.codes.sharding.spec == P(None, spec[1], spec[1 + n_in])  # spread as the weight is
        straddled += [name] if q.absmax.sharding.spec[1] != spec[1] else []  # whole where a device splits it
        for layer in range(arch.num_layers):
            w = weights[model._LAYER[name].hf.format(layer)]
            ours = [np.asarray(x[layer]) for x in (q.codes, q.absmax, q.scale, q.offset)]
            assert_nf4_equals_bitsandbytes(*ours, w, np.asarray(got[0][name][layer]).reshape(w.T.shape))
            codes, absmax, _ = bnb.int8_vectorwise_quant(torch.from_numpy(w.copy()))
            assert np.array_equal(np.asarray(int8["layers"][name].codes[layer]), codes.numpy().T)
            assert np.array_equal(np.asarray(int8["layers"][name].absmax[layer])[0], absmax.numpy())
            want = bnb.int8_vectorwise_dequant(codes, absmax).numpy().T
            assert np.array_equal(np.asarray(got[1][name][layer]).reshape(want.shape), want)
    assert sorted(straddled) == ([] if mesh is ONE_DEVICE else sorted(["wq", "wk", "wv", "w_gate", "w_up"]))


def test_real_shaped_weights_equal_bitsandbytes():
    """Qwen2.5-0.5B's q_proj [896, 896] and down_proj [896, 4864] (14 and 76 blocks a row: the groups of 256
    absmax values run across rows), heavy-tailed like trained weights."""
    rng = np.random.default_rng(0)
    with jax.set_mesh(ONE_DEVICE):
        for out, inputs in [(896, 896), (896, 4864)]:
            w = (0.02 * rng.standard_t(3, (out, inputs))).astype(np.float32)
            codes, absmax = model.quantize(w.T, "nf4")
            arrays = jax.device_put((codes[None], *model._double_quantize(absmax[None])), P())
            q = model.Quantized(*arrays, shape=(inputs, out), n_in=1)
            ours = [np.asarray(x[0]) for x in (q.codes, q.absmax, q.scale, q.offset)]
            assert_nf4_equals_bitsandbytes(*ours, w, np.asarray(dequantized({"w": q})["w"][0]))
            codes, absmax = model.quantize(w.T, "int8")
            want_codes, want_absmax, _ = bnb.int8_vectorwise_quant(torch.from_numpy(w.copy()))
            assert np.array_equal(codes, want_codes.numpy().T)
            assert np.array_equal(absmax[0], want_absmax.numpy())


RANK, SCALE = 4, 1.5
STEP = dict(train_batch_size=8, max_seq_len=64, logits_chunk_size=32, learning_rate=1e-2, warmup=0,
            lora_rank=RANK, lora_alpha=RANK * SCALE, base_quantization="nf4")  # fmt: skip
LAYOUTS = {
    "plain": None,
    "prefix_sharing": data.Layout(True, False, 4),
    "packing": data.Layout(False, True, 4),
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's model and pairs, tokenized."""
    root = tmp_path_factory.mktemp("qlora-demo")
    model_dir, pairs = bookkeeping.make_demo(root, seed=0)
    data.tokenize(str(pairs), str(model_dir), str(root / "tokenized"), max_seq_len=64)
    return model_dir, pairs, data.PairDataset(root / "tokenized")


def dequantized_by_bitsandbytes(directory, arch, mesh) -> dict:
    """The f32 base whose projections are bitsandbytes' NF4 round trip of the checkpoint's."""
    weights = safetensors.numpy.load_file(directory / "model.safetensors")
    base = model.load_params(directory, arch, mesh)
    for name, spec in model.param_specs(arch)["layers"].items():
        w = model._LAYER[name]
        if w.n_in:
            shape = model._shape(arch, w)[1:]
            layers = [
                bnb_nf4(weights[w.hf.format(i)])[4].numpy().T.reshape(shape) for i in range(arch.num_layers)
            ]
            base["layers"][name] = jax.device_put(np.stack(layers), jax.NamedSharding(mesh, spec))
    return base


def grads_and_metrics(config: dpo.Config, arch, lora, base, batch):
    """The adapters' gradients of a step's loss, and its metrics."""
    step = jax.jit(lambda *args: dpo.grads_summed_over_microbatches(*args, arch, config))
    grads, sums = step(lora, dpo.Frozen(base, base), batch)
    return jax.device_get(grads), jax.device_get(dpo.normalize(sums))


@pytest.fixture(scope="module")
def dequantized_step(tiny, demo):
    """The reference: the step on bitsandbytes' dequantised base held as f32 weights, plain layout, one
    device. Adapters with B != 0, so that the low-rank path counts."""
    directory, arch = tiny
    config = dpo.Config(model_name_or_path=str(directory), train_data="x", **STEP)
    with jax.set_mesh(ONE_DEVICE):
        base = dequantized_by_bitsandbytes(directory, arch, ONE_DEVICE)
        lora = adapters(arch, ONE_DEVICE)
        batch = next(data.train_batches(demo[2], range(64), batch_size=8, seed=0, max_seq_len=64))
        return config, grads_and_metrics(config, arch, lora, base, sharding.global_batch(batch, ONE_DEVICE))


def adapters(arch, mesh):
    table = model.lora_weights(arch, RANK, tuple(model.LORA_TARGETS))
    return jax.tree.map(lambda x: x + 0.05, model.init_params(arch, jax.random.key(1), mesh, table))


@pytest.mark.parametrize(
    "mesh", [ONE_DEVICE, MESH, CONTEXT_MESH], ids=["one_device", "mesh_2x2x2", "mesh_1x2x2x2"]
)
def test_a_step_on_the_nf4_base_equals_one_on_its_dequantised_weights(tiny, demo, dequantized_step, mesh):
    """In every layout, the reference live (the quantised base without adapters): the step's metrics and the
    adapters' gradients equal the reference's, the same step on the dequantised base (the quantisation error
    is the only difference, and it is the same; the layouts and the mesh sum in other orders)."""
    (directory, arch), (config, (want, want_metrics)) = tiny, dequantized_step
    with jax.set_mesh(mesh):
        base, lora = model.load_params(directory, arch, mesh, quantization="nf4"), adapters(arch, mesh)
        for layout in LAYOUTS.values():
            loader = data.train_batches(
                demo[2], range(64), batch_size=8, seed=0, max_seq_len=64, layout=layout
            )
            got, metrics = grads_and_metrics(
                config, arch, lora, base, sharding.global_batch(next(loader), mesh)
            )
            keys = ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "entropy")
            assert_metrics_close(metrics, want_metrics, keys, beta=0.1)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_the_nf4_demo_learns_resumes_exactly_exports_the_original_base_and_refuses_a_changed_one(
    demo, tmp_path
):
    """The demo's model, pairs and settings with --config.lora-rank 8 --config.base-quantization nf4, the
    reference precomputed (by the quantised base: at step 0 the loss is log 2). A resume re-quantises the base
    and ends bit for bit where the uninterrupted run did; one whose model files changed is refused. PEFT loads
    the exported adapter onto the original base with our adapters' change, and hf/step-N is that base plus
    the change, merged in f32."""
    straight, resumed, changed, model_dir = (
        tmp_path / name for name in ("straight", "resumed", "changed", "model")
    )
    shutil.copytree(demo[0], model_dir)
    settings = bookkeeping.DEMO_SETTINGS | dict(lora_rank=8, base_quantization="nf4", hf_save_dtype="float32")
    settings |= dict(
        model_name_or_path=str(model_dir), train_data=str(demo[2].path), reference_mode="precompute"
    )
    settings |= dict(num_train_steps=20, steps_per_eval=10, steps_per_checkpoint=10)
    dpo.main(dpo.Config(**settings | dict(output_dir=str(straight))))
    evals = [line for line in map(json.loads, (straight / "metrics.jsonl").open()) if "eval/loss" in line]
    assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy is the quantised base
    assert evals[-1]["eval/rewards/accuracies"] >= 0.9 and evals[-1]["eval/loss"] < 0.65
    checkpoint = lambda run: {str(f.relative_to(run)): np.load(f) for f in sorted(run.rglob("*.npy"))}
    final = checkpoint(straight / "checkpoints" / "step-20")
    assert {k for k in final if k.startswith("params/")} == {  # the adapters; the base is made anew
        f"params/{name}/{side}.npy" for name in model.LORA_TARGETS.values() for side in "ab"
    }
    for run in (resumed, changed):  # killed after its step-10 checkpoint, then the same command
        shutil.copytree(straight, run, ignore=shutil.ignore_patterns("step-20"))
    dpo.main(dpo.Config(**settings | dict(output_dir=str(resumed))))
    again = checkpoint(resumed / "checkpoints" / "step-20")
    assert again.keys() == final.keys() and all(np.array_equal(again[k], final[k]) for k in final)
    original = safetensors.numpy.load_file(model_dir / "model.safetensors")
    weights = {name: w.copy() for name, w in original.items()}
    weights["model.layers.1.mlp.down_proj.weight"][0, :64] *= 1.5  # one block of one layer
    safetensors.numpy.save_file(weights, model_dir / "model.safetensors")
    with pytest.raises(ValueError, match=re.escape("base made from") + ".* differs from the one"):
        dpo.main(dpo.Config(**settings | dict(output_dir=str(changed))))
    safetensors.numpy.save_file(original, model_dir / "model.safetensors")

    peft = pytest.importorskip("peft")
    export, scale = straight / "hf" / "step-20", 2.0  # lora_alpha 2 * rank
    merged = safetensors.numpy.load_file(export / "model.safetensors")
    adapted = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), export / "adapter"
    )
    modules = dict(adapted.named_modules())
    for name in original:
        target = next((t for t, ours in model.LORA_TARGETS.items() if f"{t}_proj" in name), None)
        if target is None:  # no adapter: as it was
            assert np.array_equal(merged[name], original[name]), name
            continue
        ours, layer = model.LORA_TARGETS[target], int(name.split(".")[2])
        a, b = (final[f"params/{ours}/{side}.npy"][layer] for side in "ab")
        change = scale * (a.reshape(-1, 8) @ b.reshape(8, -1)).T
        with torch.no_grad():
            theirs = modules["base_model.model." + name.removesuffix(".weight")].get_delta_weight("default")
        np.testing.assert_allclose(theirs.numpy(), change, rtol=0, atol=1e-5 * np.abs(change).max())
        np.testing.assert_allclose(merged[name], original[name] + change, rtol=1e-6, atol=1e-7)


def test_what_nf4_cannot_split_is_one_line():
    """Sizes that are not whole blocks of 64, and a tensor-parallel split that would cut a block (a block is
    dequantised where it lies; fsdp may cut one, as the mesh test does, since it gathers first)."""
    shape = dict(
        vocab_size=256, intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16
    )
    odd = model.LlamaConfig(hidden_size=96, **shape)
    with pytest.raises(ValueError, match=re.escape("hidden_size (96) is not a multiple of its blocks of 64")):
        model.check_quantization(odd, ONE_DEVICE, "nf4")
    model.check_quantization(odd, ONE_DEVICE, "int8")  # per output channel: any size
    split = "num_heads x head_dim (64) over tensor=2 leaves 32 weights a device, and NF4 needs whole blocks"
    with pytest.raises(ValueError, match=re.escape(split)):
        model.check_quantization(model.LlamaConfig(hidden_size=64, **shape), MESH, "nf4")
    # FSDP splits over fsdp x context: 64 inputs over 64 devices leave one weight, half a byte, each.
    wide = jax.sharding.AbstractMesh((1, 8, 8, 1), sharding.AXES)
    split = "hidden_size (64) over fsdp=8 x context=8 leaves 1 weights a device, and NF4 needs an even count"
    with pytest.raises(ValueError, match=re.escape(split)):
        model.check_quantization(model.LlamaConfig(hidden_size=64, **shape), wide, "nf4")
