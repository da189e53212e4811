"""sharding.py, and the model on every mesh shape against a single-device run (8 fake CPU devices)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _model_helpers import rel_err, single_device_mesh
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import bookkeeping
import dpo
import model
import sharding

# --- mesh and batch ---------------------------------------------------------------------------------------


def test_make_mesh_fills_in_the_remaining_devices():
    mesh = sharding.make_mesh(2, -1, 2)
    assert mesh.axis_names == ("data", "fsdp", "context", "tensor")
    assert tuple(mesh.shape.values()) == (2, 2, 1, 2) and mesh.axis_types == (AxisType.Explicit,) * 4
    assert dict(sharding.make_mesh().shape) == {"data": 1, "fsdp": 8, "context": 1, "tensor": 1}
    assert dict(sharding.make_mesh(1, 1, -1, devices=jax.devices()[:4]).shape)["tensor"] == 4


@pytest.mark.parametrize(
    "sizes, shown",
    [
        ((2, 2, 1), "needs 4 devices, but there are 8"),
        ((3, -1, 1), "8 devices do not divide by 3"),
        ((-1, -1, 1), "at most one -1"),
        ((0, 8, 1), "sizes must be positive"),
    ],
)
def test_make_mesh_errors_are_one_line(sizes, shown):
    with pytest.raises(ValueError) as error:
        sharding.make_mesh(*sizes)
    assert shown in str(error.value) and "\n" not in str(error.value)


def test_divisibility_errors_name_the_quantity_and_the_axes():
    mesh = sharding.make_mesh(2, 1, 4)
    fits = model.LlamaConfig(256, 64, 128, 2, num_heads=8, num_kv_heads=8, head_dim=8)
    few_kv_heads = model.LlamaConfig(256, 64, 128, 2, num_heads=4, num_kv_heads=2, head_dim=16)
    with pytest.raises(ValueError, match=r"^num_kv_heads \(2\) is not divisible by tensor=4 \(4\)$"):
        model.check_fits(few_kv_heads, mesh, batch_size=4)
    with pytest.raises(ValueError, match=r"^batch size \(3\) is not divisible by data=2 x fsdp=1 \(2\)$"):
        model.check_fits(fits, mesh, batch_size=3)
    model.check_fits(fits, mesh, batch_size=4)
    with pytest.raises(ValueError, match="^batch size"):
        model.check_fits(model.LlamaConfig(256, 64, 128, 2, 8, 8, 8), mesh, batch_size=5)
    with pytest.raises(ValueError, match=r"^hidden_size \(36\) is not divisible by fsdp=8 \(8\)$"):
        odd_width = model.LlamaConfig(256, 36, 128, 2, num_heads=2, num_kv_heads=2, head_dim=18)
        model.check_fits(odd_width, sharding.make_mesh(1, 8, 1), batch_size=8)
    # Parameters are split over fsdp x context (FSDP spans the context axis): the product must divide.
    with pytest.raises(
        ValueError, match=r"^hidden_size \(36\) is not divisible by fsdp=2 x context=4 \(8\)$"
    ):
        model.check_fits(odd_width, sharding.make_mesh(1, 2, 1, context=4), batch_size=2)
    # Each process loads the rows its devices hold: three processes of 3, 3 and 2 devices would hold
    # unequal slices of the batch, refused before anything is built.
    uneven = fake_mesh([0, 0, 0, 1, 1, 1, 2, 2], (1, 8, 1, 1))
    with pytest.raises(ValueError, match=r"^mesh data=1 x fsdp=8 x .*process 2: \[6, 7\]\)"):
        model.check_fits(fits, uneven, batch_size=8)


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """What sharding.row_slices reads of a device: which process holds it."""

    id: int
    process_index: int


def fake_mesh(processes: list[int], sizes: tuple[int, int, int, int]) -> Mesh:
    """A (data, fsdp, context, tensor) mesh over devices held by `processes`, in mesh order: the layouts of
    several processes, seen from process 0 of a one-process test."""
    devices = np.empty(len(processes), object)
    devices[:] = [FakeDevice(i, p) for i, p in enumerate(processes)]
    return Mesh(devices.reshape(sizes), sharding.AXES)


def test_row_slices_follow_the_batch_axes_not_the_processes(monkeypatch):
    for sizes in [(1, 8, 1), (2, 2, 2), (1, 1, 8), (8, 1, 1)]:
        assert sharding.row_slices(sharding.make_mesh(*sizes)) == (0, 1)  # one process holds every row
    assert sharding.row_slices(sharding.make_mesh(1, 2, 1, context=4)) == (0, 1)
    two = [0] * 4 + [1] * 4  # two processes of 4 devices, as make_mesh orders them
    split = fake_mesh(two, (2, 2, 2, 1))  # data spans the processes: each holds its own rows
    assert sharding.row_slices(split) == (0, 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert sharding.row_slices(split) == (1, 2)
    # context (or tensor) spans the processes: both hold every row, so both feed the same ones
    for sizes in [(1, 1, 8, 1), (1, 1, 2, 4)]:
        assert sharding.row_slices(fake_mesh(two, sizes)) == (0, 1)
    assert sharding.row_slices(fake_mesh([0, 0, 1, 1, 0, 0, 1, 1], (1, 2, 4, 1))) == (0, 1)
    # four processes of 2 devices, context=4 spanning pairs: 0 and 1 hold slice 0 of 2, 2 and 3 slice 1
    four = fake_mesh([0, 0, 1, 1, 2, 2, 3, 3], (2, 1, 4, 1))
    assert sharding.row_slices(four) == (0, 2)  # seen from process 1
    monkeypatch.setattr(jax, "process_index", lambda: 2)
    assert sharding.row_slices(four) == (1, 2)
    # processes that hold rows out of order (every other slice) are refused, naming what each holds
    interleaved = fake_mesh([0, 1] * 4, (1, 8, 1, 1))
    with pytest.raises(ValueError, match=r"process 0: \[0, 2, 4, 6\]; process 1: \[1, 3, 5, 7\]\)") as error:
        sharding.row_slices(interleaved)
    assert "\n" not in str(error.value)


def test_a_run_names_the_batch_field_that_does_not_split_over_the_devices(tmp_path):
    """train_batch_size 16 splits over the 8 devices, its microbatches of 4 do not: the message names
    microbatch_size, the field to change."""
    model_dir, pairs = bookkeeping.make_demo(tmp_path, seed=0)
    run = tmp_path / "run"
    settings = dict(model_name_or_path=str(model_dir), train_data=str(pairs), output_dir=str(run))
    config = dpo.Config(**settings, train_batch_size=16, microbatch_size=4)
    shown = r"^microbatch_size \(4\) is not divisible by data=1 x fsdp=8 \(8\)$"
    with pytest.raises(ValueError, match=shown):
        bookkeeping.load_inputs(run, config)


def test_global_batch_splits_the_leading_dim_over_data_and_fsdp():
    mesh = sharding.make_mesh(2, 2, 2)
    local = {"input_ids": np.arange(80, dtype=np.int32).reshape(8, 2, 5), "weight": np.ones(8, np.float32)}
    batch = sharding.global_batch(local, mesh)
    assert batch["input_ids"].sharding == NamedSharding(mesh, P(("data", "fsdp"), None, None))
    assert batch["weight"].sharding == sharding.batch_sharding(mesh, 1)
    assert {s.data.shape for s in batch["input_ids"].addressable_shards} == {(2, 2, 5)}
    np.testing.assert_array_equal(np.asarray(batch["input_ids"]), local["input_ids"])


@pytest.fixture
def distributed_calls(monkeypatch):
    for var in ["JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS"]:  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append(args))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    return calls


def test_initialize_distributed_is_a_no_op_for_one_plain_process(distributed_calls):
    sharding.initialize_distributed()
    assert distributed_calls == []


LAUNCHERS = [("SLURM_NTASKS", "4"), ("JAX_COORDINATOR_ADDRESS", "h:99"), ("TPU_WORKER_HOSTNAMES", "a,b")]


@pytest.mark.parametrize("var, value", LAUNCHERS)
def test_initialize_distributed_detects_launchers(distributed_calls, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    sharding.initialize_distributed()
    assert distributed_calls == [()]  # jax reads the details from the same environment


def test_initialize_distributed_passes_explicit_settings(distributed_calls, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task SLURM job is a plain process
    sharding.initialize_distributed()
    sharding.initialize_distributed("10.0.0.1:1234", 2, 1)
    assert distributed_calls == [("10.0.0.1:1234", 2, 1)]


# --- the model on meshes ---------------------------------------------------------------------------------

CFG = model.LlamaConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=4,
    head_dim=8, rope_scaling=model.Llama3RopeScaling(8.0, 1.0, 4.0, 8), initializer_range=0.1,
)  # fmt: skip
B, T = 8, 16
LENGTHS = np.array([16, 9, 16, 1, 12, 16, 5, 14], np.int32)
TOKENS = np.random.default_rng(0).integers(0, 256, (B, T), dtype=np.int32) * (np.arange(T) < LENGTHS[:, None])
MASK = (np.arange(T) < LENGTHS[:, None]).astype(np.float32)
PROBE = np.random.default_rng(1).normal(size=(B, T, CFG.vocab_size)).astype(np.float32)


def loss_and_logits(params, tokens, lengths):
    """A scalar touching every real position's logits, and the logits."""
    logits = model.logits(params, tokens, CFG, lengths=lengths)
    return jnp.sum(logits * PROBE * MASK[:, :, None]), logits


step = jax.jit(jax.value_and_grad(loss_and_logits, has_aux=True))


def run_on(mesh, host_params):
    """Put the same weights on `mesh` with their declared shardings and take one loss/gradient step."""
    params = jax.device_put(
        host_params, jax.tree.map(lambda s: NamedSharding(mesh, s), model.param_specs(CFG))
    )
    with jax.set_mesh(mesh):
        tokens = jax.device_put(TOKENS, sharding.batch_sharding(mesh, 2))
        lengths = jax.device_put(LENGTHS, sharding.batch_sharding(mesh, 1))
        (loss, logits), grads = step(params, tokens, lengths)
        hidden = jax.jit(model.forward, static_argnames="arch")(params, tokens, CFG)
    return params, loss, logits, grads, hidden


@pytest.fixture(scope="module")
def reference():
    mesh = single_device_mesh()
    host_params = jax.device_get(model.init_params(CFG, jax.random.key(0), mesh))
    _, loss, logits, grads, _ = run_on(mesh, host_params)
    return host_params, loss, logits, grads


@pytest.mark.parametrize(
    "shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4), (1, 1, 2, 4)]
)  # (d, f, t[, c])
def test_mesh_gives_the_single_device_logits_and_gradients(reference, shape):
    host_params, ref_loss, ref_logits, ref_grads = reference
    mesh = sharding.make_mesh(*shape[:3], context=shape[3] if len(shape) > 3 else 1)
    params, loss, logits, grads, hidden = run_on(mesh, host_params)
    specs = model.param_specs(CFG)
    for name, array, grad, spec in zip(
        jax.tree.leaves(jax.tree_util.tree_map_with_path(lambda p, _: jax.tree_util.keystr(p), specs)),
        jax.tree.leaves(params), jax.tree.leaves(grads), jax.tree.leaves(specs), strict=True
    ):  # fmt: skip
        declared = NamedSharding(mesh, spec)
        assert array.sharding == declared and grad.sharding == declared, name
        # Really split: each device holds the declared fraction of the weight.
        split = np.prod(
            [mesh.shape[a] for axes in spec if axes is not None for a in np.atleast_1d(axes)], dtype=int
        )
        assert {s.data.size for s in array.addressable_shards} == {array.size // split}, name
    assert hidden.sharding.spec == model.BATCH and hidden.shape == (B, T, CFG.hidden_size)
    assert model.BATCH == P(("data", "fsdp"), "context", None)  # a row's tokens split over context
    assert rel_err(loss, ref_loss) < 1e-5
    assert rel_err(logits, ref_logits) < 1e-5
    for expected, actual in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads), strict=True):
        assert rel_err(actual, expected) < 1e-5


def test_attention_scores_a_device_cannot_hold_are_one_line_before_anything_runs(monkeypatch):
    """Llama 3.1 8B at 131072 tokens a side on an 80 GB device: XLA's attention would hold 2 TiB of one row's
    scores (32 heads x 131072^2 f32); over 8 context devices an eighth, still too much; 16384 tokens split 8
    ways fit. cuDNN's kernel holds none and "chunked" a block, so neither is refused, nor auto, which takes
    "chunked" from 8192 tokens where cuDNN does not apply (on this CPU, or a row split over context)."""
    arch = model.LlamaConfig(128256, 4096, 14336, 32, 32, 8, 128)
    one, eight = sharding.make_mesh(devices=jax.devices()[:1]), sharding.make_mesh(1, 1, 1, context=8)
    device = type("Device", (), {"memory_stats": lambda self: {"bytes_limit": 80 * 2**30}})()
    monkeypatch.setattr(jax, "local_devices", lambda *args: [device])  # an 80 GB accelerator's
    for mesh, tokens in ((one, 131072), (eight, 131072), (one, 32768)):
        with pytest.raises(ValueError, match="XLA's attention holds a row's scores whole: .* GiB a device"):
            model.check_attention(arch, mesh, tokens, "xla", jnp.bfloat16)
    model.check_attention(arch, eight, 16384, "xla", jnp.bfloat16)
    for impl, mesh in (("cudnn", one), ("chunked", one), ("auto", one), ("auto", eight)):
        model.check_attention(arch, mesh, 131072, impl, jnp.bfloat16)
