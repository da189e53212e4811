"""Every test runs on the CPU with 8 fake devices, so mesh shapes can be checked without hardware.

On these tiny shapes compiling, not running, is most of a test's time, so the tests compile cheaply: LLVM's
optimisation off, and XLA:CPU's older elemental emitter for fused loops in place of its MLIR fusion emitters
(about a third of the compile time at that level: the demo's train step in 0.7 s instead of 2.2 s; the suite
in 349 s instead of 430 s on 2 cores). Both are XLA:CPU backend settings: the program JAX lowers (its ops,
shapes, shardings, collectives) is the same, and what changes is the machine code of its loops, so the
rounding of a few elementwise functions (exp, log) by an ulp here and there: numbers are not bit for bit the
default build's (neither are they at optimisation level 0 alone). Every tolerance against a reference is set
above that rounding floor (_tolerance.py), and every bit-exact test compares two runs under the same flags, so
a bug of this code shows the same under either; only a bug of XLA's emitters could hide, and that is not what
these test."""

import os
import tempfile

from _fault_helpers import CHEAP_COMPILE  # the same flags for every process a test starts (no jax imported)

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {CHEAP_COMPILE}"
)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# dpo.py keeps compiled programs under $XDG_CACHE_HOME/dpo-jax: the tests' own, not the user's.
os.environ.setdefault("XDG_CACHE_HOME", tempfile.mkdtemp(prefix="dpo-tests-cache-"))
