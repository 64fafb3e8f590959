"""Host memory for XLA:CPU: keep freed blocks in the process instead of returning them.

XLA:CPU allocates a step's temporaries afresh on every execution (4 GB for ViT-B-32 at
batch 32) and frees them when it ends. Under glibc's defaults a block that large is a
fresh mmap each time, so every one of its pages faults on first touch, step after step:
about a million page faults and 2-3 s of kernel time per ViT-B-32 step on a 2-core VM,
a third of the step. With one malloc arena, no mmap and no trimming, the second and later
steps reuse pages that are already mapped; the process keeps its peak memory instead.

The settings apply to threads that first allocate after they are made, so call
`retain_freed_memory` before JAX initialises its backend (before the first computation).
`clipjax train` does so when it will run on the CPU.
"""

import ctypes
import ctypes.util
import glob
import os

import jax

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# Device files of accelerators JAX may pick before the CPU: TPU, NVIDIA, AMD.
_ACCELERATOR_FILES = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")
CHOICES = ("auto", "retain", "system")


def retain_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory mapped; False where malloc is not glibc's."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False  # macOS, musl: no mallopt with these meanings
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # glibc reads the threshold as size_t, so -1 means "never trim".
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))


def runs_on_cpu() -> bool:
    """Whether JAX will pick the CPU backend, decided without initialising any backend."""
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(glob.glob(pattern) for pattern in _ACCELERATOR_FILES)


def configure(choice: str | None = None) -> bool:
    """Applies `choice` (default $CLIPJAX_HOST_MALLOC, else auto); True if memory is retained.

    auto retains freed memory when JAX will run on the CPU; retain always does; system
    leaves glibc's defaults (freed blocks go back to the OS).
    """
    choice = choice or os.environ.get("CLIPJAX_HOST_MALLOC") or "auto"
    if choice not in CHOICES:
        raise ValueError(f"CLIPJAX_HOST_MALLOC={choice!r} is not one of {', '.join(CHOICES)}; "
                         "unset it or pick one.")
    if choice == "system" or (choice == "auto" and not runs_on_cpu()):
        return False
    return retain_freed_memory()
