"""Every test runs on the CPU with 8 fake devices, so mesh shapes can be checked without hardware. XLA's
optimisation passes are off: on these tiny shapes compiling, not running, is most of a test's time, and
unoptimised CPU code compiles in about half of it (the numbers are the same ops on the same data)."""

import os
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# dpo.py keeps compiled programs under $XDG_CACHE_HOME/dpo-jax: the tests' own, not the user's.
os.environ.setdefault("XDG_CACHE_HOME", tempfile.mkdtemp(prefix="dpo-tests-cache-"))
