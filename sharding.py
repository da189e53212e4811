"""The device mesh, how a batch is laid out on it, the multi-process start, and how files are written.

Mesh axes (every mesh here has all four, in this order):
  data    pure replicas: the batch is split over it, parameters and optimizer state are whole on each.
  fsdp    the batch is split over it AND parameters / optimizer state are sharded over it (with context);
          model.py gathers each layer's weights just before using them (ZeRO-3 / fully sharded data
          parallel).
  context each row's tokens are split over it between blocks (context parallelism for long rows):
          everything per token stays where its tokens are, and attention gathers the row's keys and values
          whole (model._attention). Row widths are padded to a multiple of its size (data.Layout).
          Parameters and optimizer state are sharded over fsdp x context (model.FSDP, as MaxText): a
          context axis of N would otherwise leave each N devices holding the same shards.
  tensor  Megatron-style split of one layer: attention heads, and the MLP hidden dimension. Keep it
          within a host (it talks every layer); kv heads must divide by it (one kv head is whole on each).

A batch's leading dimension is split over ("data", "fsdp"); the rest of every batch array is whole (the
model splits the activations' tokens over "context"). Each process feeds the rows its devices hold
(`row_slices`), so processes along a context or tensor axis that spans hosts feed the same rows.
The axes are `AxisType.Explicit`: shardings are part of each array's type, so `jax.typeof(x)` shows
them and a mismatch is an error at trace time rather than a silent copy. model.check_fits checks, once,
that every weight and the batch split evenly over their axes.

Files: process 0 writes every file of a run, each through `atomic` (a temporary sibling renamed into
place), so a kill at any moment leaves the old version or the new one, never half of one.

Left out on purpose: pipeline parallelism, ring attention (context gathers keys and values whole),
multi-slice (DCN) meshes, hand-written collectives; XLA derives every collective from the specs.
"""

import contextlib
import math
import os
import shutil
from importlib.util import find_spec
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, *, context: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, context, tensor) mesh with explicit axes over `devices` (default: all); one size may
    be -1. context is named: the first three keep their order from before it."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = [data, fsdp, context, tensor]
    shape = f"data={data} x fsdp={fsdp} x context={context} x tensor={tensor}"
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {shape}: sizes must be positive, with at most one -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if len(devices) % known:
            raise ValueError(f"mesh {shape}: {len(devices)} devices do not divide by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {shape} needs {math.prod(sizes)} devices, but there are {len(devices)}")
    # jax.make_mesh orders devices by the physical topology, with the last (tensor) axis the closest.
    return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Explicit,) * len(AXES), devices=devices)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dim over data x fsdp, every other dim whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *[None] * (ndim - 1)))


def row_slices(mesh: Mesh) -> tuple[int, int]:
    """(which slice, how many): the global batch's rows cut into `how many` equal consecutive slices, one for
    each set of processes that hold the same rows, and the one this process holds and so feeds.

    Rows split over data x fsdp only: processes that differ only along context or tensor (an axis spanning
    hosts) hold the same rows and must feed the same ones. With processes split over data / fsdp alone this
    is (process index, process count). Refused in one line: processes holding rows in some other pattern."""
    blocks = math.prod(mesh.shape[a] for a in BATCH_AXES)
    batch_axes = [mesh.axis_names.index(a) for a in BATCH_AXES]
    devices = np.moveaxis(mesh.devices, batch_axes, range(len(BATCH_AXES))).reshape(blocks, -1)
    owner = np.vectorize(lambda device: device.process_index, otypes=[int])(devices)
    held = {p: tuple(np.flatnonzero((owner == p).any(axis=1))) for p in np.unique(owner)}
    slices = sorted(set(held.values()))
    size = len(slices[0])
    # each the next `size` of the data x fsdp blocks, in order, together all of them once
    if slices != [tuple(range(start, start + size)) for start in range(0, blocks, size)]:
        shape = " x ".join(f"{a}={n}" for a, n in mesh.shape.items())
        where = "; ".join(f"process {p}: {list(map(int, b))}" for p, b in held.items())
        raise ValueError(
            f"mesh {shape}: each process must hold one consecutive block of the batch's {blocks} data x fsdp "
            f"slices, all blocks the same size, but they hold ({where}): change the mesh sizes or devices"
        )
    return slices.index(held[jax.process_index()]), len(slices)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's consecutive slice of the global batch -> global arrays sharded by `batch_sharding`.

    The processes holding row slice i of `row_slices` each pass rows [i * b, (i + 1) * b) of the global batch
    (b = global batch / slice count): the same rows where they are replicas along context or tensor.
    """
    put = lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
    return {name: put(array) for name, array in local.items()}


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a global array as numpy on this host. Every process must call it (a sharded array
    spanning processes is gathered by a collective); one array at a time keeps a host's memory peak
    at about one tensor."""
    return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))


def is_writer() -> bool:
    """Process 0 writes every file; the others only read."""
    return jax.process_index() == 0


def remove(path: Path) -> None:
    """Delete a file or a directory tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic(path: str | Path):
    """Write `path`, a file or a directory, through the temporary sibling `.STEM.dpo-tmp.SUFFIX` that this
    yields; on success the sibling replaces `path` in one rename. A directory cannot be renamed over another,
    so an old one is first moved aside to `.STEM.dpo-old.SUFFIX` and deleted after. A leftover sibling from a
    killed write is removed first; on an error the sibling goes, `path` is untouched, and an OSError without
    a file name (a full disk) gets `path`'s."""
    path = Path(path)
    # The suffix stays last: np.save would add ".npy" to a name that does not end with it.
    tmp, old = (path.with_name(f".{path.stem}.dpo-{kind}{path.suffix}") for kind in ("tmp", "old"))
    remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and path.exists():
            remove(old)
            os.replace(path, old)
        os.replace(tmp, path)
        remove(old)
    except OSError as e:  # a full disk says only "no space left": name what was being written
        e.filename = e.filename or str(path)
        raise
    finally:
        remove(tmp)


def _launched_as_several_processes(env) -> bool:
    """Whether a launcher started this program as one of several processes that form one JAX job."""
    return (
        "JAX_COORDINATOR_ADDRESS" in env  # set by hand (jax reads it; see initialize_distributed)
        or int(env.get("SLURM_NTASKS", "1")) > 1  # srun with several tasks
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1  # mpirun
        or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1  # TPU slice on GKE
        or "MEGASCALE_COORDINATOR_ADDRESS" in env  # multi-slice TPU
        # A Cloud TPU VM (libtpu installed, chips at /dev/accel* or vfio): jax asks the metadata server
        # for the slice's workers; on a single-host slice that makes a harmless one-process job.
        or (find_spec("libtpu") is not None and any(map(os.path.exists, ("/dev/accel0", "/dev/vfio/0"))))
    )


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Join the multi-process JAX job when there is one; a no-op for a single plain process.

    Call before any other JAX use. By hand: the arguments, else the environment variables
    JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID. Otherwise
    the launcher is detected (TPU pods, SLURM, Open MPI) and jax fills in the details.
    """
    if jax.distributed.is_initialized():
        return
    # jax reads JAX_COORDINATOR_ADDRESS itself, but not the process count and index: read those here.
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    # Collectives between the CPU devices of several processes go over TCP through gloo; without it a
    # multi-process CPU run (tests, or a CPU cluster) fails at its first cross-process computation.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address is not None or num_processes is not None or process_id is not None:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif _launched_as_several_processes(os.environ):
        jax.distributed.initialize()
