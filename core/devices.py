"""Device and precision rules shared by training, evaluation and inference.

Kept free of scikit-learn and SciPy so that inference can import it without their memory.
"""

from __future__ import annotations

import contextlib
import os

import torch

from core.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when present, else CPU; a named device must exist. Plain ``cuda`` means
    this process's GPU (``local_rank`` under torchrun)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} was asked for, but no CUDA GPU is visible; "
                              "use --device cpu.")
        if name == "cuda":
            return torch.device("cuda", local_rank)
        try:
            return torch.device(name)
        except RuntimeError as exc:
            raise ConfigError(f"--device {name!r} is not valid; use cuda or cuda:N") from exc
    if name != "cpu":
        raise ConfigError(f"--device {name!r} is not valid; choose auto, cpu or cuda[:N]")
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 natively (AVX512-BF16 or AMX), i.e. where it is faster;
    elsewhere it is emulated and about 10x slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (auto, fp32, bf16, fp16), or None for fp32.

    ``auto``: bf16 on CUDA GPUs that support it (else fp16), bf16 on CPUs with native bf16,
    fp32 otherwise.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not valid; choose {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        if precision == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if precision == "bf16" or cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``, or nothing for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def trim_heap() -> None:
    """Hand the free pages at the top of glibc's heap back to the OS (``malloc_trim``); a
    no-op elsewhere. Cheap (no garbage collection): callable after every batch."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc (musl...): nothing to do
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


_MADV_PAGEOUT = 21  # linux/mman-common.h; Linux 5.4 and later


def page_out_file(path: str | os.PathLike[str]) -> int:
    """Ask Linux to reclaim this process's resident pages of every mapping of ``path``
    (``madvise(MADV_PAGEOUT)``); returns how many bytes of mappings were asked (0 where
    nothing is mapped, or off Linux, or on a kernel before 5.4).

    Safe for any file mapping: a clean page of a file is dropped and read back from the file
    if it is touched again, so the mapping's content never changes; pages shared with
    another process are left alone by the kernel. Used where a runtime keeps a weights file
    mapped that it no longer reads (``core.network``: OpenVINO's bf16 network keeps its fp32
    source weights mapped beside the bf16 copies it computes with)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return 0
    target = os.path.realpath(path)
    ranges = []
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") == target:
                lo, hi = (int(v, 16) for v in fields[0].split("-"))
                ranges.append((lo, hi - lo))
    if not ranges:
        return 0
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    asked = 0
    for start, length in ranges:
        if madvise(start, length, _MADV_PAGEOUT) == 0:  # EINVAL before Linux 5.4: skip
            asked += length
    return asked


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``).

    Loading copies ~100 MB of weights more than once (the checkpoint, the exported graph's
    metadata read, the runtime's own copy); glibc keeps most of the freed blocks in its heap, where they
    would count as the server's resident memory for ever. A no-op elsewhere.
    """
    import gc

    gc.collect()
    trim_heap()
