"""Host data for kernels on MLX's back-ends.

MLX allocates every array made from host data (`mx.array(numpy)`) in CUDA managed memory. On the
H200, a kernel that first read such an array in a decode step stalled for 0.1-0.35 ms, even for
a few bytes (results/h200-2026-11-29-s4). Arrays every step reads go to device memory instead;
a decode step's own host data goes through one long-lived staging array.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from batchbench import backend


def to_device(a: np.ndarray) -> mx.array:
    """a in device memory: a kernel's copy of the host-made array is an ordinary device
    allocation, unless it has <= 8 bytes (MLX puts those in managed memory too): a short 1-D
    array is copied as 16 bytes and viewed."""
    a = np.ascontiguousarray(a)
    if a.nbytes >= 16 or a.ndim != 1:
        return mx.array(a) + 0
    buf = np.zeros(-(-16 // a.itemsize), a.dtype)
    buf[: len(a)] = a
    return (mx.array(buf) + 0)[: len(a)]


def device_int32(a: np.ndarray) -> mx.array:
    """a as an int32 array in device memory."""
    return to_device(np.asarray(a).astype(np.int32))


class Staging:
    """Host data for the device through one long-lived host-made array: each `put` writes into
    the next of `slots` regions in place (no new managed allocation per step), and a kernel
    copies the region into device memory. On CUDA the regions are advised to stay on the host
    (backend.keep_on_host), so that copy reads them over the bus without page faults. A region
    is reused only after the copy that read it last has run."""

    def __init__(self, slots: int = 8, slot_bytes: int = 4 * backend.HOST_PAGE):
        self.slots, self.slot = slots, slot_bytes // 4
        n = slots * self.slot + backend.HOST_PAGE // 4
        self._arr = mx.array(np.zeros(n, np.int32))
        mx.eval(self._arr)
        view = np.asarray(memoryview(self._arr))  # the array's own memory, writable
        off = (-view.ctypes.data % backend.HOST_PAGE) // 4  # regions start on a page
        self._off, self._view = off, view[off : off + slots * self.slot]
        self.on_host = backend.keep_on_host(self._view)
        self._last: list[mx.array | None] = [None] * slots
        self._i = 0

    def put(self, host: np.ndarray) -> mx.array:
        """host (int32, 1-D) as a device array, copied by a kernel started now."""
        if host.size > self.slot:
            out = to_device(host)
        else:
            k = self._i % self.slots
            self._i += 1
            if self._last[k] is not None:
                mx.eval(self._last[k])  # its last copy has read the region
            o = k * self.slot
            self._view[o : o + host.size] = host
            out = self._arr[self._off + o : self._off + o + host.size] + 0
            self._last[k] = out
        if not self.on_host or host.size > self.slot:
            # reading managed memory is slow: copy it while the host goes on building the step
            # (read in place from the host, the copy takes microseconds inside the step's graph)
            mx.async_eval(out)
        return out
