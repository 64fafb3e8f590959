"""Eight simulated CPU devices for every test; must run before JAX initialises."""

import atexit
import os
import shutil
import tempfile

# Tiny models compile several times faster at XLA's lowest backend optimisation level,
# and compilation, not execution, is what the suite spends its time on.
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""),
    "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0",
]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One XLA compilation cache for the session, shared with the subprocesses tests start: a
# killed run, its resume and the in-process reference compile the same train step. A fresh
# directory each session, so no test ever sees a program compiled by an older checkout.
_cache_dir = tempfile.mkdtemp(prefix="clipjax-tests-xla-cache-")
atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

# Full-precision matmuls everywhere, subprocesses (which inherit this environment) included.
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"

import jax  # noqa: E402
assert jax.device_count() == 8, "XLA_FLAGS were read before conftest could set 8 CPU devices"
assert jax.config.jax_default_matmul_precision == "highest"

