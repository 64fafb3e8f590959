"""Host memory: with freed memory retained, XLA:CPU's per-call buffers stop page-faulting."""

import subprocess
import sys

import jax
import pytest

from clipjax import hostmem

# A fresh process (the setting must precede JAX's backend) runs a jitted call 20 times; XLA
# allocates its 64 MiB temporary (sin(x), materialised for the matmul) and frees it inside
# every execution. The child prints the minor page faults of each call.
_CHILD = """
import resource, sys
from clipjax import hostmem
retained = hostmem.configure(sys.argv[1])
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: jnp.sin(x) @ w)
x, w = jnp.full((8192, 2048), 0.5), jnp.ones((2048, 8))
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = f(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(retained, float(y[0, 3]), *faults)
"""


def _child(choice: str) -> tuple[str, float, list[int]]:
    out = subprocess.run([sys.executable, "-c", _CHILD, choice], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return out[0], float(out[1]), [int(f) for f in out[2:]]


def test_retained_memory_is_reused_without_page_faults():
    pages = 8192 * 2048 * 4 // 4096
    retained, value_retained, faults_retained = _child("retain")
    system, value_system, faults_system = _child("system")
    assert (retained, system) == ("True", "False")
    # glibc's default maps the temporary afresh on every call and faults in all of it.
    assert min(faults_system) >= 0.9 * pages, faults_system
    # Retained, most calls find a freed block already mapped. Not all: an aligned request
    # may not fit the last call's block, or may arrive before XLA has freed it.
    assert sum(f < 0.01 * pages for f in faults_retained) >= 10, faults_retained
    assert value_retained == value_system == pytest.approx(2048 * 0.479425538604203, rel=1e-5)


def test_choices_and_platform_detection(monkeypatch):
    monkeypatch.setenv("CLIPJAX_HOST_MALLOC", "sometimes")
    with pytest.raises(ValueError, match="CLIPJAX_HOST_MALLOC='sometimes' is not one of"):
        hostmem.configure()
    assert hostmem.configure("system") is False
    assert hostmem.runs_on_cpu()  # conftest runs the suite on the CPU
    previous = jax.config.jax_platforms
    try:
        jax.config.update("jax_platforms", "cuda,cpu")
        assert not hostmem.runs_on_cpu()
        assert hostmem.configure("auto") is False  # an accelerator run keeps glibc's defaults
    finally:
        jax.config.update("jax_platforms", previous)
