"""Room for a large allocation, checked before it is made.

On Linux a large CPU allocation is granted whatever memory is free (the kernel overcommits)
and the process is killed later, while the tensor is written; so an analysis or a run asked
for at a size that cannot fit says so first, as a :class:`SpattnValueError`."""
from __future__ import annotations

import os

import torch

from ..dsl.errors import SpattnValueError

#: Allocations below this size are not checked (reading the free memory costs ~30 us).
CHECK_MIN_BYTES = 1 << 28


def available_memory(device) -> int | None:
    """Bytes a new allocation may take on ``device`` now, or None where that is not known:
    the kernel's MemAvailable on Linux (physical pages free otherwise), the free memory of a
    CUDA device."""
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_room(nbytes: int, device, what: str, *, min_bytes: int = CHECK_MIN_BYTES) -> None:
    """A SpattnValueError where ``nbytes`` cannot fit on ``device`` now
    (:func:`available_memory`). Sizes under ``min_bytes`` pass unchecked."""
    if nbytes < min_bytes:
        return
    free = available_memory(device if device is not None else "cpu")
    if free is not None and nbytes > free:
        raise SpattnValueError(f"{what} does not fit in memory: it needs {_gib(nbytes)} and "
                               f"{device if device is not None else 'cpu'} has "
                               f"{_gib(free)} available: use smaller sizes")


def _gib(nbytes: int) -> str:
    g = nbytes / 2 ** 30
    return f"{g:.1f} GiB" if g < 1e6 else f"{g:.3g} GiB"
