"""model.py against transformers' LlamaForCausalLM: configs, logits, padding, loading, export round trips."""

import functools
import hashlib
import json
import shutil
import sys

import huggingface_hub
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from _model_helpers import TINY, hf_logits, make_hf_checkpoint, rel_err, single_device_mesh
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import model
import sharding

T = 80  # past original_max_position_embeddings=64 of the llama3 checkpoint
LLAMA3_ROPE = dict(
    rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=64,
)  # fmt: skip
CHECKPOINTS = {
    "gqa": dict(),  # 8 query heads sharing 4 kv heads
    "tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    # head_dim 16 at theta 5e5 puts the rotary wavelengths in all three llama3 bands: 6 (< 64/4, kept),
    # 32 (between, interpolated), 167 and up (> 64, stretched).
    "llama3": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_parameters=LLAMA3_ROPE),
    "sharded": dict(num_hidden_layers=3, max_shard_size="40KB"),  # several files + index
    "mqa": dict(num_key_value_heads=1),  # multi-query attention: 8 query heads, one kv head
}

# Llama 3.1 8B's config.json as published on the Hub (top-level rope_theta and rope_scaling).
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}  # fmt: skip

_logits = jax.jit(model.logits, static_argnames=("arch", "compute_dtype", "remat", "attention_impl"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for seed, (name, overrides) in enumerate(CHECKPOINTS.items()):
        out[name] = (root / name, make_hf_checkpoint(root / name, seed, **overrides))
    return out


def random_tokens(batch, length, seed=0):
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], (batch, length), dtype=np.int32)


def read_safetensors_dir(path) -> dict[str, np.ndarray]:
    files = sorted(path.glob("*.safetensors"))
    return {name: array for f in files for name, array in safetensors.numpy.load_file(f).items()}


# --- config ---------------------------------------------------------------------------------------------


def test_config_from_hub_and_transformers5_styles(tmp_path):
    hub = model.LlamaConfig.from_hf(LLAMA_31_8B)
    transformers.LlamaConfig(**LLAMA_31_8B).save_pretrained(tmp_path)  # transformers 5 re-writes it
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written and "rope_scaling" not in written
    assert model.LlamaConfig.from_hf(written) == hub
    assert (hub.num_kv_heads, hub.head_dim, hub.rope_theta) == (8, 128, 500000.0)
    assert hub.rope_scaling == model.Llama3RopeScaling(8.0, 1.0, 4.0, 8192)
    assert hub.eos_token_id == (128001, 128008, 128009) and not hub.tie_word_embeddings
    # Published total 8,030,261,248 minus the embedding lookup and the 65 RMSNorm scales.
    assert hub.num_matmul_params == 8_030_261_248 - 128256 * 4096 - 65 * 4096
    assert hash(hub) == hash(model.LlamaConfig.from_hf(written))  # usable as a static jit argument


def test_rope_frequencies_match_transformers():
    for rope_scaling in [LLAMA_31_8B["rope_scaling"], None]:
        hf_config = transformers.LlamaConfig(**{**LLAMA_31_8B, "rope_scaling": rope_scaling})
        rope_type = "llama3" if rope_scaling else "default"
        init = ROPE_INIT_FUNCTIONS.get(rope_type, LlamaRotaryEmbedding.compute_default_rope_parameters)
        expected, _ = init(hf_config)
        ours = model.rope_inverse_frequencies(model.LlamaConfig.from_hf(hf_config.to_dict()))
        np.testing.assert_array_equal(ours, expected.numpy())


@pytest.mark.parametrize(
    "change, shown",
    [
        ({"attention_bias": True}, "attention_bias=True"),
        ({"mlp_bias": True}, "mlp_bias=True"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"architectures": ["MistralForCausalLM"]}, "architectures=['MistralForCausalLM']"),
        ({"model_type": "mixtral"}, "model_type='mixtral'"),  # mistral is read since #22
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
        ({"rope_scaling": None, "rope_parameters": {"rope_type": "linear"}}, "rope_type='linear'"),
    ],
)
def test_config_refuses_what_it_cannot_reproduce(change, shown):
    with pytest.raises(ValueError) as error:
        model.LlamaConfig.from_hf({**LLAMA_31_8B, **change})
    assert shown in str(error.value) and "\n" not in str(error.value)


def test_num_matmul_params_counts_every_linear_layer(checkpoints):
    for name in ["gqa", "tied"]:
        path, hf_model = checkpoints[name]
        linears = sum(m.weight.numel() for m in hf_model.modules() if isinstance(m, torch.nn.Linear))
        assert model.load_config(path).num_matmul_params == linears  # lm_head counts also when tied


def test_forward_multiplies_on_the_axes_the_weight_table_declares(monkeypatch):
    """forward writes each projection out as an einsum; the weight table declares the shapes. Traced (shapes
    only) with every dimension of a different size, each of forward's einsums gets operands of the sizes its
    letters name, and the weight operands spell exactly the table's layer matrices and LoRA adapters."""
    arch = model.LlamaConfig(50, 24, 40, 2, 4, 2, 6)  # V, D, F, L, H, K, Q
    size = dict(b=3, t=7, d=24, f=40, h=4, k=2, q=6, r=5)
    einsum, seen = jnp.einsum, []

    def recorded(spec, *operands, **kwargs):
        if sys._getframe(1).f_code.co_name == "_linear":  # a projection or its adapter, not attention's
            seen.append((spec, [x.shape for x in operands]))
        return einsum(spec, *operands, **kwargs)

    monkeypatch.setattr(jnp, "einsum", recorded)
    mesh, adapters = single_device_mesh(), model.lora_weights(arch, size["r"], model.LORA_TARGETS)
    with jax.set_mesh(mesh):
        params, lora = model.abstract_params(arch, mesh), model.abstract_params(arch, mesh, adapters)
        tokens = jax.ShapeDtypeStruct((size["b"], size["t"]), jnp.int32)
        jax.eval_shape(functools.partial(model.forward, arch=arch, lora=lora), params, tokens)
    weights = set()
    for spec, shapes in seen:
        *operands, _ = spec.replace("->", ",").split(",")
        for letters, shape in zip(operands, shapes, strict=True):
            assert shape == tuple(size[a] for a in letters), (spec, shape)
        weights.add(operands[1])
    declared = [w for w in model._LAYER.values() if w.n_in] + jax.tree.leaves(adapters)
    assert weights == {w.axes[1:].lower() for w in declared}


# --- forward against transformers ----------------------------------------------------------------------


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_logits_match_transformers(checkpoints, name):
    path, hf_model = checkpoints[name]
    cfg = model.load_config(path)
    if name == "sharded":
        assert (path / "model.safetensors.index.json").exists() and len(list(path.glob("*.safetensors"))) > 2
    if name == "tied":
        assert "lm_head.weight" not in read_safetensors_dir(path)
    if name == "llama3":
        assert T > cfg.rope_scaling.original_max_position_embeddings
    mesh = single_device_mesh()
    params = model.load_params(path, cfg, mesh)
    assert ("lm_head" in params) == (not cfg.tie_word_embeddings)
    tokens = random_tokens(2, T)
    with jax.set_mesh(mesh):
        ours = _logits(params, tokens, cfg)
    assert rel_err(ours, hf_logits(hf_model, tokens)) < 1e-5


def test_one_kv_head_is_whole_on_every_tensor_device(checkpoints):
    """Multi-query attention on a mesh with a tensor axis, in plain rows and in rows of views (prefix
    sharing's and packing's path; here one view a row, the row itself)."""
    path, hf_model = checkpoints["mqa"]
    cfg = model.load_config(path)
    mesh = sharding.make_mesh(2, 2, 2)
    params = model.load_params(path, cfg, mesh)
    assert params["layers"]["wk"].sharding.spec == jax.sharding.PartitionSpec(None, model.FSDP, None, None)
    tokens = random_tokens(4, 24)
    (b, t), put = tokens.shape, lambda x: jax.device_put(x, sharding.batch_sharding(mesh, np.ndim(x)))
    every = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    views = put(every[:, None, :]), put(np.full((b, 1), t, np.int32)), put(every)
    expected = hf_logits(hf_model, tokens)
    with jax.set_mesh(mesh):
        for kwargs in ({}, {"views": views}):
            assert rel_err(_logits(params, put(tokens), cfg, **kwargs), expected) < 1e-5


def test_right_padded_rows_equal_unpadded_sequences(checkpoints):
    path, hf_model = checkpoints["gqa"]
    cfg = model.load_config(path)
    mesh = single_device_mesh()
    params = model.load_params(path, cfg, mesh)
    lengths = np.array([T, 37, 5, 0], np.int32)  # the last row is all padding
    tokens = random_tokens(4, T, seed=1) * (np.arange(T) < lengths[:, None])
    with jax.set_mesh(mesh):
        ours = np.asarray(_logits(params, tokens, cfg, lengths=lengths))

        def masked_sum(params):
            out = model.logits(params, tokens, cfg, lengths=lengths)
            return jnp.sum(jnp.where((np.arange(T) < lengths[:, None])[:, :, None], out, 0.0))

        grads = jax.jit(jax.grad(masked_sum))(params)
    assert np.isfinite(ours).all()
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    for row, n in enumerate(lengths[lengths > 0]):
        assert rel_err(ours[row, :n], hf_logits(hf_model, tokens[row : row + 1, :n])[0]) < 1e-5


def test_remat_policies_give_the_same_gradients(checkpoints):
    path, _ = checkpoints["gqa"]
    cfg = model.load_config(path)
    mesh = single_device_mesh()
    params = model.load_params(path, cfg, mesh)
    tokens = random_tokens(2, 16)
    with jax.set_mesh(mesh):
        grads, saved = {}, {}
        for remat in model.REMAT_POLICIES:
            loss = lambda p, remat=remat: model.logits(p, tokens, cfg, remat=remat).sum()
            grads[remat] = jax.tree.leaves(jax.jit(jax.grad(loss))(params))
            saved[remat] = str(jax.make_jaxpr(jax.grad(loss))(params))
    for remat in ["full", "save_matmuls", "offload"]:
        for expected, actual in zip(grads["none"], grads[remat], strict=True):
            assert rel_err(actual, expected) < 1e-5
    # offload recomputes what full does, from the same layer inputs, kept in host memory meanwhile
    assert all(np.array_equal(a, b) for a, b in zip(grads["full"], grads["offload"], strict=True))
    assert "f32<host>[" in saved["offload"] and "<host>" not in saved["full"]
    with pytest.raises(ValueError, match="remat='some'"):
        model.forward(params, tokens, cfg, remat="some")


def test_bf16_compute_stays_close_to_f32(checkpoints):
    path, hf_model = checkpoints["gqa"]
    cfg = model.load_config(path)
    mesh = single_device_mesh()
    params = model.load_params(path, cfg, mesh)
    tokens = random_tokens(2, 32)
    with jax.set_mesh(mesh):
        hidden = jax.jit(model.forward, static_argnames=("arch", "compute_dtype"))(
            params, tokens, cfg, compute_dtype=jnp.bfloat16
        )
        ours = _logits(params, tokens, cfg, compute_dtype=jnp.bfloat16)
    assert hidden.dtype == jnp.bfloat16 and ours.dtype == jnp.float32
    assert rel_err(ours, hf_logits(hf_model, tokens)) < 3e-2


# --- loading -----------------------------------------------------------------------------------------------


def test_load_onto_a_mesh_reads_only_each_devices_slices(checkpoints, monkeypatch):
    path, _ = checkpoints["sharded"]
    cfg = model.load_config(path)
    reference = model.load_params(path, cfg, single_device_mesh())
    fractions, read_part = [], model._read_part

    def spy(tensor, index, shape, n_in):  # the fraction of a (per-layer) weight each read returns
        part = read_part(tensor, index, shape, n_in)
        fractions.append((len(shape), part.size / np.prod(shape)))
        return part

    monkeypatch.setattr(model, "_read_part", spy)
    model.load_params(path, cfg, sharding.make_mesh(1, 8, 1))
    # Every matrix has one axis split 8 ways over fsdp (norm scales are whole everywhere).
    assert {fraction for ndim, fraction in fractions if ndim > 1} == {1 / 8}
    mesh = sharding.make_mesh(1, 2, 4)
    params = model.load_params(path, cfg, mesh)
    specs = model.param_specs(cfg)
    for array, spec, expected in zip(*map(jax.tree.leaves, (params, specs, reference)), strict=True):
        assert array.sharding == jax.sharding.NamedSharding(mesh, spec)
        np.testing.assert_array_equal(np.asarray(array), np.asarray(expected))


def _fake_hub_cache(cache, repo_id, source_dir, revision="0123456789abcdef0123456789abcdef01234567"):
    """huggingface_hub's cache layout: blobs named by hash, snapshots/<rev>/ linking to them, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in source_dir.iterdir():
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, repo / "blobs" / digest)
        (snapshot / file.name).symlink_to(f"../../blobs/{digest}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_hub_id_loads_from_the_cache_offline(checkpoints, tmp_path, monkeypatch):
    path, hf_model = checkpoints["tied"]
    snapshot = _fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert model.resolve_path("tiny-org/tiny-llama") == snapshot
    cfg = model.load_config("tiny-org/tiny-llama")
    mesh = single_device_mesh()
    params = model.load_params("tiny-org/tiny-llama", cfg, mesh)
    tokens = random_tokens(1, 24)
    with jax.set_mesh(mesh):
        assert rel_err(_logits(params, tokens, cfg), hf_logits(hf_model, tokens)) < 1e-5


def test_uncached_hub_id_offline_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError) as error:
        model.load_config("tiny-org/never-downloaded")
    message = str(error.value)
    assert "tiny-org/never-downloaded" in message and "offline" in message and "\n" not in message


# --- export ------------------------------------------------------------------------------------------------


def test_ours_to_export_to_transformers_gives_the_same_logits(tmp_path):
    rope = model.Llama3RopeScaling(8.0, 1.0, 4.0, 64)
    cfg = model.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=4,
        head_dim=8, rope_scaling=rope, max_position_embeddings=128, bos_token_id=1, eos_token_id=(2, 3),
        initializer_range=0.1,
    )  # fmt: skip
    mesh = sharding.make_mesh(2, 2, 2)
    params = model.init_params(cfg, jax.random.key(0), mesh)
    for array, spec in zip(jax.tree.leaves(params), jax.tree.leaves(model.param_specs(cfg)), strict=True):
        assert array.sharding == jax.sharding.NamedSharding(mesh, spec) and array.dtype == jnp.float32
    model.save_hf(params, cfg, tmp_path / "export", dtype="float32", max_shard_bytes=100_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary left behind
    load = transformers.AutoModelForCausalLM.from_pretrained
    hf_model = load(tmp_path / "export", attn_implementation="eager").eval()
    assert hf_model.dtype == torch.float32 and hf_model.config.rope_parameters["rope_type"] == "llama3"
    assert hf_model.generation_config.eos_token_id == [2, 3]
    tokens = random_tokens(8, T)
    with jax.set_mesh(mesh):
        ours = _logits(params, jax.device_put(tokens, sharding.batch_sharding(mesh, 2)), cfg)
    assert rel_err(ours, hf_logits(hf_model, tokens)) < 1e-5


@pytest.mark.parametrize("name", ["tied", "sharded"])
def test_transformers_to_ours_to_export_is_identical(checkpoints, name, tmp_path):
    path, hf_model = checkpoints[name]
    cfg = model.load_config(path)
    params = model.load_params(path, cfg, sharding.make_mesh(1, 2, 4))
    out = tmp_path / "export"
    model.save_hf(params, cfg, out, dtype="float32", max_shard_bytes=40_000)
    originals, exported = read_safetensors_dir(path), read_safetensors_dir(out)
    assert exported.keys() == originals.keys()
    for key, array in originals.items():
        assert exported[key].dtype == np.float32
        np.testing.assert_array_equal(exported[key], array, err_msg=key)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(originals) and len(set(index["weight_map"].values())) > 1
    where = {"_name_or_path": None}
    assert transformers.AutoConfig.from_pretrained(out).to_dict() | where == (
        transformers.AutoConfig.from_pretrained(path).to_dict() | where
    )

    model.save_hf(params, cfg, out, dtype="bfloat16")  # replaces the f32 export
    assert {p.name for p in out.iterdir()} == {"config.json", "generation_config.json", "model.safetensors"}
    exported = read_safetensors_dir(out)
    for key, tensor in hf_model.state_dict().items():
        if key in originals:
            assert exported[key].dtype == ml_dtypes.bfloat16
            expected = tensor.bfloat16().view(torch.int16).numpy()
            np.testing.assert_array_equal(exported[key].view(np.int16), expected, err_msg=key)


def test_export_refuses_an_unknown_dtype(checkpoints, tmp_path):
    path, _ = checkpoints["tied"]
    cfg = model.load_config(path)
    params = model.load_params(path, cfg, single_device_mesh())
    with pytest.raises(ValueError, match="dtype='float16'"):
        model.save_hf(params, cfg, tmp_path / "x", dtype="float16")


def test_a_weight_file_that_is_not_safetensors_is_named(checkpoints, tmp_path):
    import pickle

    path, _ = checkpoints["tied"]
    fake = tmp_path / "fake"
    shutil.copytree(path, fake)
    (fake / "model.safetensors").write_bytes(
        pickle.dumps({"model.embed_tokens.weight": [1.0]})
    )  # never unpickled
    with pytest.raises(ValueError, match=f"^{fake / 'model.safetensors'}: not a readable safetensors file"):
        model.load_params(fake, model.load_config(fake), single_device_mesh())
    (fake / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no model.safetensors or model.safetensors.index.json"):
        model.load_params(fake, model.load_config(fake), single_device_mesh())
