"""Starting a vLLM engine in this process: the environment defaults and the llvmlite workaround.

Collect (`engines/scoring.py`, scoring) and serve (`serve/engines.py`, generation) both call
`set_env_defaults` before importing vLLM and build the engine inside `llvmlite_hidden`.
Importing this module loads neither vLLM nor llvmlite.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

CPU_KVCACHE_GIB = "1"  # VLLM_CPU_KVCACHE_SPACE: vLLM's CPU default is far larger


@contextmanager
def llvmlite_hidden() -> Iterator[None]:
    """Hide llvmlite's `ffi.lib` while a vLLM engine starts.

    vllm-cpu 0.32 patches kernels by scanning every module namespace with `vars()`;
    llvmlite's `ffi.lib` (loaded once numba has compiled anything in this process,
    e.g. the aligner) answers `vars()` with a non-dict and breaks that scan.
    """
    ffi = sys.modules.get("llvmlite.binding.ffi")
    lib = ffi.__dict__.pop("lib", None) if ffi is not None else None
    try:
        yield
    finally:
        if lib is not None:
            ffi.lib = lib


def set_env_defaults(*, in_process: bool = False) -> None:
    """vLLM's environment defaults for our engines, where the environment does not set them:
    a 1 GiB CPU KV cache (vllm-cpu), and with `in_process` the engine core in this process."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
    if in_process:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
