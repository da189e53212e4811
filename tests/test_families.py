"""Qwen2 / Qwen2.5, Qwen3, Mistral, Gemma 2, Gemma 3 and multi-query checkpoints, sliding windows among
them, against transformers' own classes: logits on one device and on a (2, 2, 2) mesh, the export round trip,
one DPO step's loss and gradients against torch (prefix sharing, and with windows packing too), LoRA adapters
against PEFT, the windows each config sets, and the configs that are refused."""

import functools
import json
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from _data_templates import WORDS, build_tokenizer
from _model_helpers import TINY, hf_logits, make_hf_checkpoint, rel_err, single_device_mesh
from _tolerance import assert_metrics_close

import data
import dpo
import model
import sharding

SLIDING, GLOBAL = "sliding_attention", "full_attention"  # transformers' layer_types
V = 512  # above the chat tokenizer's ids (~400); divides tensor=2
CHECKPOINTS = {  # name: (family, transformers config overrides)
    "qwen2": ("qwen2", dict(vocab_size=V, rope_theta=1e6)),
    "qwen2_tied": ("qwen2", dict(vocab_size=V, tie_word_embeddings=True, num_attention_heads=4,
                                 num_key_value_heads=2)),
    "qwen3": ("qwen3", dict(vocab_size=V, head_dim=16)),  # head_dim given, not hidden / heads (8)
    "qwen3_tied": ("qwen3", dict(vocab_size=V, head_dim=16, tie_word_embeddings=True)),
    "mistral": ("mistral", dict(vocab_size=V, sliding_window=None)),
    "mqa": ("qwen2", dict(vocab_size=V, num_key_value_heads=1)),  # one kv head, with biases
    # Windows of 4 tokens, shorter than the test rows; caps that bite (scores and logits reach about +-5).
    "gemma2": ("gemma2", dict(vocab_size=V, head_dim=8, sliding_window=4, query_pre_attn_scalar=12,
                              attn_logit_softcapping=3.0, final_logit_softcapping=2.0)),
    "gemma3": ("gemma3_text", dict(vocab_size=V, head_dim=16, num_key_value_heads=1, sliding_window=4,
                                   query_pre_attn_scalar=12, layer_types=[SLIDING, GLOBAL],
                                   rope_scaling={"rope_type": "linear", "factor": 8.0})),  # 1B's one kv head
    "mistral_window": ("mistral", dict(vocab_size=V, sliding_window=4)),  # v0.1: every layer
    "qwen2_window": ("qwen2", dict(vocab_size=V, use_sliding_window=True, sliding_window=4,
                                   max_window_layers=1)),
}  # fmt: skip
MESHES = {"one device": None, "2x2x2": (2, 2, 2)}
_logits = jax.jit(model.logits, static_argnames="arch")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    out = {}
    for seed, (name, (family, overrides)) in enumerate(CHECKPOINTS.items()):
        out[name] = (root / name, make_hf_checkpoint(root / name, seed, family=family, **overrides))
    return out


def mesh_of(shape):
    return single_device_mesh() if shape is None else sharding.make_mesh(*shape)


def random_tokens(batch, length, seed=0):
    return np.random.default_rng(seed).integers(0, V, (batch, length), dtype=np.int32)


def read_safetensors_dir(path) -> dict[str, np.ndarray]:
    return {
        k: a for f in sorted(path.glob("*.safetensors")) for k, a in safetensors.numpy.load_file(f).items()
    }


@pytest.mark.parametrize("mesh_shape", MESHES.values(), ids=MESHES)
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_logits_match_transformers(checkpoints, name, mesh_shape):
    path, hf_model = checkpoints[name]
    arch = model.load_config(path)
    assert arch.model_type == CHECKPOINTS[name][0]
    mesh = mesh_of(mesh_shape)
    params = model.load_params(path, arch, mesh)
    for array, spec in zip(jax.tree.leaves(params), jax.tree.leaves(model.param_specs(arch)), strict=True):
        assert array.sharding == jax.sharding.NamedSharding(mesh, spec)
    tokens = random_tokens(4, 24)
    with jax.set_mesh(mesh):
        ours = _logits(params, jax.device_put(tokens, sharding.batch_sharding(mesh, 2)), arch)
    assert rel_err(ours, hf_logits(hf_model, tokens)) < 1e-5


def test_biases_and_head_norms_are_split_like_their_weights_output_axes():
    qwen2 = model.LlamaConfig(V, 64, 128, 2, 8, 4, 8, model_type="qwen2")
    specs = model.param_specs(qwen2)["layers"]
    P = jax.sharding.PartitionSpec
    assert specs["bq"] == specs["bk"] == P(None, "tensor", None) and "q_norm" not in specs
    specs = model.param_specs(model.LlamaConfig(V, 64, 128, 2, 8, 1, 8, model_type="qwen3"))["layers"]
    assert specs["q_norm"] == specs["k_norm"] == P(None, None) and "bq" not in specs
    # One kv head: whole on every tensor device (its input axis split over FSDP, fsdp x context, as ever).
    assert specs["wk"] == P(None, model.FSDP, None, None)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_export_is_the_same_family_and_transformers_gives_identical_logits(checkpoints, name, tmp_path):
    path, hf_model = checkpoints[name]
    arch = model.load_config(path)
    params = model.load_params(path, arch, sharding.make_mesh(2, 2, 2))
    out = tmp_path / "export"
    model.save_hf(params, arch, out, dtype="float32")
    originals, exported = read_safetensors_dir(path), read_safetensors_dir(out)
    assert exported.keys() == originals.keys()
    for key, array in originals.items():
        np.testing.assert_array_equal(exported[key], array, err_msg=key)
    where = {"_name_or_path": None}
    assert transformers.AutoConfig.from_pretrained(out).to_dict() | where == (
        transformers.AutoConfig.from_pretrained(path).to_dict() | where
    )
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(loaded) is type(hf_model)
    tokens = random_tokens(2, 24)
    np.testing.assert_array_equal(hf_logits(loaded, tokens), hf_logits(hf_model, tokens))


# --- one DPO step against torch ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """8 chat pairs (a shared prompt, two replies) tokenized with a ChatML template."""
    root = tmp_path_factory.mktemp("pairs")
    tokenizer = build_tokenizer(root / "chatml", "chatml")
    rng, rows = np.random.default_rng(0), []
    say = lambda n: " ".join(rng.choice(WORDS, n))
    for i in range(8):
        prompt = [{"role": "user", "content": say(2 + i)}]
        reply = lambda: [{"role": "assistant", "content": say(int(rng.integers(1, 8)))}]
        rows.append({"chosen": prompt + reply(), "rejected": prompt + reply()})
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data.tokenize(str(root / "rows.jsonl"), str(tokenizer), str(root / "out"), max_seq_len=64)
    return data.PairDataset(root / "out")


def torch_logps(hf_model, ids, mask) -> torch.Tensor:
    """Summed log-probs of the scored tokens (mask 1: the token's log-prob given those before it counts)."""
    ids = torch.tensor(np.asarray(ids), dtype=torch.long)
    logp = torch.log_softmax(hf_model(ids[None]).logits[0, :-1], dim=-1)
    picked = logp.gather(-1, ids[1:, None])[:, 0]
    return (picked * torch.tensor(np.asarray(mask[1:]), dtype=torch.float32)).sum()


# (data, fsdp, context, tensor); on a context axis Qwen3's head norms, and with "chunked" attention in blocks
# of 16 keys one kv head and Gemma's windows and soft cap in packed views
PLAIN, CONTEXT, CHUNKED = ((2, 2, 1, 2), "auto"), ((1, 2, 2, 2), "auto"), ((2, 1, 2, 2), "chunked")
SEQUENCES_IN_ONE = [("qwen2_tied", False, PLAIN), ("qwen3", False, CONTEXT), ("mistral", False, PLAIN)]
SEQUENCES_IN_ONE += [("mqa", False, CHUNKED)]  # one kv head, whole on each device, under a tensor split
WINDOWS_IN_VIEWS = [("gemma2", True, CHUNKED), ("gemma3", True, CHUNKED)]  # both kinds of layer


@pytest.mark.parametrize("name, packing, mesh_and_attention", SEQUENCES_IN_ONE + WINDOWS_IN_VIEWS)
def test_one_dpo_step_loss_and_gradients_equal_torch(
    checkpoints, pairs, name, packing, mesh_and_attention, tmp_path, monkeypatch
):
    """The policy is the checkpoint, the reference another of the same family; prefix sharing (the default
    layout), with packing too for the windowed families (each sequence's window within its view), on a mesh
    of 8 (a context axis for some), against torch running each sequence alone. Our gradients, exported under
    transformers' names, against torch's."""
    (data_, fsdp, context, tensor), attention = mesh_and_attention
    monkeypatch.setattr(model, "ATTENTION_BLOCK", 16)
    path, hf_model = checkpoints[name]
    family, overrides = CHECKPOINTS[name]
    hf_reference = make_hf_checkpoint(tmp_path / "reference", 99, family=family, **overrides)
    mesh, beta = sharding.make_mesh(data_, fsdp, tensor, context=context), 0.1
    arch = model.load_config(path)
    config = dpo.Config(
        train_data="x", beta=beta, logits_chunk_size=128, max_seq_len=64, attention_impl=attention
    )
    layout = data.Layout(prefix_sharing=True, packing=packing, row_multiple=4, width_multiple=context)
    batch = next(data.train_batches(pairs, range(8), batch_size=8, seed=0, max_seq_len=64, layout=layout))
    assert not packing or batch["pair"].max() > 0  # a row holds several pairs
    with jax.set_mesh(mesh):
        params = model.load_params(path, arch, mesh)
        frozen = dpo.Frozen(None, model.load_params(tmp_path / "reference", arch, mesh))
        step = jax.jit(dpo.grads_summed_over_microbatches, static_argnames=("arch", "config"))
        grads, sums = step(params, frozen, sharding.global_batch(batch, mesh), arch=arch, config=config)
        model.save_hf(grads, arch, tmp_path / "grads", dtype="float32")
    ours = {k: float(v) for k, v in dpo.normalize(jax.device_get(sums)).items()}

    losses, chosen, rejected = [], [], []
    for (c_ids, c_mask), (r_ids, r_mask) in pairs.read(range(8)):
        pc, pr = torch_logps(hf_model, c_ids, c_mask), torch_logps(hf_model, r_ids, r_mask)
        with torch.no_grad():
            rc, rr = torch_logps(hf_reference, c_ids, c_mask), torch_logps(hf_reference, r_ids, r_mask)
        losses.append(-torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr))))
        chosen.append(float(pc.detach()))
        rejected.append(float(pr.detach()))
    hf_model.zero_grad()
    loss = torch.stack(losses).mean()
    loss.backward()
    want = {"loss": float(loss), "logps/chosen": np.mean(chosen), "logps/rejected": np.mean(rejected)}
    assert_metrics_close(ours, want, ["loss", "logps/chosen", "logps/rejected"], beta=beta)
    got = read_safetensors_dir(tmp_path / "grads")
    torch_grads = {k: p.grad.numpy() for k, p in hf_model.named_parameters()}
    assert got.keys() == torch_grads.keys()
    for key, expected in torch_grads.items():
        np.testing.assert_allclose(
            got[key], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max(), err_msg=key
        )


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "mistral_window"])
def test_dpo_trains_a_checkpoint_transformers_wrote(checkpoints, pairs, name, tmp_path):
    """`python dpo.py` on the checkpoint as transformers saved it (with a tokenizer beside it): two steps
    lower the evaluation loss on the training pairs, and the export loads as the family's class."""
    path, hf_model = checkpoints[name]
    shutil.copytree(path, tmp_path / "model")
    for file in (pairs.path.parent / "chatml").iterdir():
        shutil.copy(file, tmp_path / "model")
    settings = dict(train_batch_size=8, num_train_steps=2, learning_rate=1e-2, warmup=0, max_seq_len=64,
                    logits_chunk_size=128, steps_per_eval=2, mesh_fsdp=4, mesh_tensor=2)  # fmt: skip
    paths = dict(
        train_data=str(pairs.path), validation_data=str(pairs.path), output_dir=str(tmp_path / "run")
    )
    dpo.main(dpo.Config(model_name_or_path=str(tmp_path / "model"), **paths, **settings))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = (line["eval/loss"] for line in (lines[0], lines[-1]))
    assert last < first == pytest.approx(np.log(2), rel=1e-6)  # the policy starts as the reference
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf" / "step-2")
    assert type(exported) is type(hf_model)


# --- LoRA against PEFT -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral", "mqa", "gemma2", "gemma3"])
def test_lora_adapter_loads_in_peft_with_our_logits(checkpoints, name, tmp_path):
    peft = pytest.importorskip("peft")
    path, _ = checkpoints[name]
    arch, mesh, rank, scale = model.load_config(path), sharding.make_mesh(2, 2, 2), 4, 1.5
    table = model.lora_weights(arch, rank, tuple(model.LORA_TARGETS))
    tokens = random_tokens(4, 20)
    with jax.set_mesh(mesh):
        params = model.load_params(path, arch, mesh)
        lora = model.init_params(arch, jax.random.key(1), mesh, table)  # B != 0, else the adapter is a no-op
        lora = jax.tree.map(lambda x: x + 0.05, lora)
        for array, w in zip(jax.tree.leaves(lora), jax.tree.leaves(table), strict=True):
            assert array.sharding.spec == w.spec
        ours = _logits(params, jax.device_put(tokens, sharding.batch_sharding(mesh, 2)), arch, lora=lora,
                       lora_scale=scale)  # fmt: skip
        model.save_peft_adapter(lora, arch, rank, rank * scale, tmp_path / "adapter", str(path))
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert rel_err(ours, hf_logits(adapted, tokens)) < 1e-5


# --- what is refused ---------------------------------------------------------------------------------------


def hf_config(family, **changes) -> dict:
    return getattr(transformers, f"{family}Config")(**TINY).to_dict() | changes


@pytest.mark.parametrize(
    "config, shown",
    [
        (hf_config("Qwen3", attention_bias=True), "attention_bias=True"),
        (
            hf_config("Qwen2", layer_types=[GLOBAL], use_sliding_window=True, sliding_window=4),
            "layer_types [",
        ),
        (hf_config("Gemma3Text", model_type="gemma3"), "model_type='gemma3'"),  # with its vision tower
        (hf_config("Gemma3Text", use_bidirectional_attention=True), "use_bidirectional_attention=True"),
        (hf_config("Gemma2", hidden_activation="gelu"), "hidden_activation='gelu'"),
        (hf_config("Gemma2", attn_logit_softcapping=-1.0), "attn_logit_softcapping -1.0"),
        (hf_config("Gemma2", rope_parameters={"rope_type": "linear", "factor": 2.0}), "rope_type='linear'"),
        (hf_config("Qwen3", model_type="qwen3_moe"), "model_type='qwen3_moe'"),
        (hf_config("Mistral", model_type="mixtral"), "model_type='mixtral'"),
        (hf_config("Mistral", model_type="gemma"), "model_type='gemma'"),
        (hf_config("Qwen3", architectures=["Qwen2ForCausalLM"]), "architectures=['Qwen2ForCausalLM']"),
        (hf_config("Llama", attention_bias=True), "attention_bias=True"),
    ],
)
def test_configs_it_cannot_reproduce_are_refused_in_one_line(config, shown):
    with pytest.raises(ValueError) as error:
        model.LlamaConfig.from_hf(config)
    assert shown in str(error.value) and "\n" not in str(error.value)


WINDOWS = {  # transformers' config class and what a config.json sets
    "Mistral v0.1": ("Mistral", dict(sliding_window=4096)),
    "Mistral v0.2": ("Mistral", dict(sliding_window=None)),
    "Qwen2.5": ("Qwen2", dict(sliding_window=8, max_window_layers=1)),  # use_sliding_window false
    "Qwen2 windowed": ("Qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "Qwen3 windowed": ("Qwen3", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0)),
    "Qwen2 named": ("Qwen2", dict(use_sliding_window=True, layer_types=[SLIDING, GLOBAL])),
    "Gemma 2": ("Gemma2", dict(num_hidden_layers=5, sliding_window=16)),
    "Gemma 3": ("Gemma3Text", dict(num_hidden_layers=8, sliding_window=16)),
    "Gemma 3 pattern 2": ("Gemma3Text", dict(num_hidden_layers=5, sliding_window_pattern=2)),
}  # fmt: skip


@pytest.mark.parametrize("family, settings", WINDOWS.values(), ids=WINDOWS)
def test_every_layer_gets_the_window_transformers_gives_it(family, settings):
    """Mistral v0.1 at any length, Qwen's use_sliding_window from max_window_layers on, Gemma's alternation:
    each layer's window (None: global) as transformers' config sets it, read from what transformers 5 writes
    and from a Hub config.json (no layer_types: the pattern it implies)."""
    hf = getattr(transformers, f"{family}Config")(**TINY | settings)
    types = getattr(hf, "layer_types", None) or [SLIDING] * hf.num_hidden_layers  # Mistral: every layer
    want = [hf.sliding_window if kind == SLIDING else None for kind in types]
    written = hf.to_dict()
    for config in (written, {k: v for k, v in written.items() if k != "layer_types"} | settings):
        ours = model.LlamaConfig.from_hf(config)
        assert [ours.sliding_window if sliding else None for sliding in ours.sliding_layers] == want


def test_cudnn_attention_cannot_soft_cap_the_scores_and_says_so():
    gemma2 = model.LlamaConfig.from_hf(hf_config("Gemma2", vocab_size=V, head_dim=8))
    mesh = single_device_mesh()
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="^attention_impl cudnn cannot soft-cap"):
        forward = functools.partial(model.forward, arch=gemma2, attention_impl="cudnn")
        jax.eval_shape(forward, model.abstract_params(gemma2, mesh), jax.ShapeDtypeStruct((2, 8), np.int32))


@pytest.mark.parametrize(
    "change, shown",
    [
        (dict(num_attention_heads=0, head_dim=None), "num_heads 0"),  # was a ZeroDivisionError
        (dict(num_attention_heads=0), "num_heads 0"),
        (dict(vocab_size="x"), "vocab_size 'x'"),
        (dict(hidden_size=-64), "hidden_size -64"),
        (dict(intermediate_size=None), "intermediate_size None"),
        (dict(num_hidden_layers=0), "num_layers 0"),
        (dict(head_dim=-8), "head_dim -8"),
        (dict(num_key_value_heads=3), "num_heads (8) is not a multiple of num_kv_heads"),
        (dict(model_type="gemma"), "config.json has model_type='gemma'"),
    ],
)
def test_every_refusal_of_a_config_json_names_the_file(tmp_path, change, shown):
    """Sizes that are not positive whole numbers are refused when config.json is read (not a traceback, nor a
    model of -64 features), each refusal in one line that starts with the file."""
    (tmp_path / "config.json").write_text(json.dumps(hf_config("Llama") | change))
    with pytest.raises(ValueError) as error:
        model.load_config(tmp_path)
    assert str(error.value).startswith(f"{tmp_path / 'config.json'}: ") and shown in str(error.value)
    assert "\n" not in str(error.value)
