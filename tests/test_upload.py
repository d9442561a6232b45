"""Host data for kernels: the staging ring and the host-residency advice (batchbench.upload)."""

import numpy as np
import pytest

from batchbench import backend
from batchbench.upload import Staging, to_device


def test_staging_hands_back_what_was_put_across_reused_regions():
    """Regions are rewritten in place after 3 puts; every returned array must keep the data of
    its own put (the copy has read the region before it is reused), and arrays larger than a
    region go through a fresh upload."""
    st = Staging(slots=3, slot_bytes=64)
    rng = np.random.default_rng(0)
    puts = [rng.integers(-5, 1 << 20, int(rng.integers(1, 17))).astype(np.int32) for _ in range(10)]
    outs = [st.put(h) for h in puts]
    big = np.arange(40, dtype=np.int32)  # 160 bytes > 64
    outs.append(st.put(big))
    puts.append(big)
    for h, o in zip(puts, outs):
        np.testing.assert_array_equal(np.array(o), h)


def test_staging_regions_start_on_whole_pages(monkeypatch):
    """The host advice covers whole pages only: the staging regions must start on one and span
    whole ones, and keep_on_host must refuse a view that does not (checked as on CUDA, before any
    driver call)."""
    st = Staging(slots=2, slot_bytes=backend.HOST_PAGE)
    assert st._view.ctypes.data % backend.HOST_PAGE == 0
    assert st._view.nbytes == 2 * backend.HOST_PAGE
    assert not st.on_host  # no CUDA here
    monkeypatch.setattr(backend, "BACKEND", "cuda")
    with pytest.raises(ValueError, match="whole HOST_PAGE pages"):
        backend.keep_on_host(st._view[1:])
    with pytest.raises(ValueError, match="whole HOST_PAGE pages"):
        backend.keep_on_host(st._view[: st._view.size - 1])


def test_to_device_round_trips_every_shape_and_dtype():
    for a in (np.array([7], np.int32), np.arange(3, dtype=np.int32), np.arange(12, dtype=np.uint32).reshape(3, 4),
              np.array([], np.int32), np.array([1.5, -2.0], np.float32)):
        d = to_device(a)
        assert d.shape == a.shape
        np.testing.assert_array_equal(np.array(d), a)
