"""batchbench.verify.source: the exact sources MLX 0.32 generates for custom kernels.

Metal is checked against MLX itself (its verbose print while tracing under
mx.export_function); CUDA, which cannot be traced without a GPU, against text derived by
hand from mlx/backend/cuda/custom_kernel.cpp.
"""

import math

import mlx.core as mx
import numpy as np
import pytest

from batchbench.kernels import attention as A
from batchbench.kernels.attention_cases import additive, live_lists
from batchbench.kernels.spec import KernelSpec, Launch
from batchbench.verify import rewrite, source


def _metal(src, names=("a", "n"), outs=("out",), header=""):
    return KernelSpec("metal", "toy", tuple(names), tuple(outs), src, header)


TOY_METAL = [
    # scalars of each kind (0-d: constant &), a small (constant) and a large (device) array,
    # shape/strides/ndim helpers, several attributes, dtype/int/bool template arguments
    (
        _metal(
            "uint i = thread_position_in_grid.x; out[i] = a[i] + a_shape[0] + a_strides[0] + "
            "a_ndim + n + f + b + s[0] + simd_sum(1.0f) + threads_per_threadgroup.x;",
            names=("a", "n", "f", "b", "s"),
        ),
        Launch(
            [mx.zeros((4, 5), mx.bfloat16), 3, 2.5, True, mx.arange(3)],
            [(20,)],
            [mx.float32],
            (20, 1, 1),
            (32, 1, 1),
            [("T", mx.float16), ("BLOCK", -32), ("CAUSAL", False), ("ON", True)],
        ),
    ),
    # no template, two outputs, no attributes: MLX closes the signature after the last output
    (
        _metal("out[0] = a[0] + n; out2[0] = 1;", outs=("out", "out2"), header="// h\n"),
        Launch([mx.ones((9,), mx.float16), 7], [(1,), (1,)], [mx.float16, mx.int32], (1, 1, 1), (1, 1, 1)),
    ),
    # shape helper + two outputs + no attribute: MLX's ") {" placement bug is reproduced
    (
        _metal("out[0] = a_shape[0]; out2[0] = n;", outs=("out", "out2")),
        Launch([mx.ones((9,), mx.float32), 7], [(1,), (1,)], [mx.float32, mx.int32], (1, 1, 1), (1, 1, 1)),
    ),
]


@pytest.mark.parametrize("kspec,launch", TOY_METAL, ids=["scalars-template", "two-outputs", "shape-bug"])
def test_metal_source_matches_mlx_trace(kspec, launch):
    gen = source.metal_source(kspec, launch)
    assert gen.source == source.traced_metal_source(kspec, launch)


def _attention_plan(backend_name, dtype, d, g, mask_kind, live):
    rng = np.random.default_rng()
    t, n, hkv = 3, 77, 2
    vis = rng.random((t, n)) < 0.3
    q = mx.array(rng.standard_normal((1, hkv * g, t, d)).astype(np.float32)).astype(dtype)
    k = mx.array(rng.standard_normal((1, hkv, n + 5, d)).astype(np.float32)).astype(dtype)
    mask = mx.array(vis) if mask_kind == "bool" else mx.array(additive(vis)).astype(dtype)
    lb = tuple(mx.array(x) for x in live_lists(vis)) if live else None
    return A.plan_decode_attention(
        backend_name, q, k, k, mask, scale=1 / math.sqrt(d), live_blocks=lb
    )


@pytest.mark.parametrize(
    "dtype,d,g,mask_kind,live",
    [(mx.float16, 128, 7, "add", False), (mx.bfloat16, 64, 4, "bool", True)],
)
def test_metal_attention_source_matches_mlx_trace(dtype, d, g, mask_kind, live):
    kspec, launch = _attention_plan("metal", dtype, d, g, mask_kind, live)
    gen = source.metal_source(kspec, launch)
    assert gen.source == source.traced_metal_source(kspec, launch)
    assert gen.attributes  # the kernel uses built-ins: they are in the signature


CUDA_EXPECTED = (
    "\n"
    '#include "mlx/backend/cuda/device/utils.cuh"\n'
    "\n"
    "#include <cooperative_groups.h>\n"
    "\n"
    "// header\n"
    "namespace mlx::core::cu {\n"
    "\n"
    "namespace cg = cooperative_groups;\n"
    "\n"
    "__global__ void custom_kernel_toy_float16_t_32_f_t(\n"
    "    const __half* a,\n"
    "    const __grid_constant__ Shape a_shape,\n"
    "    const __grid_constant__ Strides a_strides,\n"
    "    const __grid_constant__ int a_ndim,\n"
    "    const int32_t* n,\n"
    "    const __nv_bfloat16* b,\n"
    "    float* out,\n"
    "    __nv_bfloat16* out2) {\n"
    "  using T = __half;\n"
    "  constexpr int BLOCK = 32;\n"
    "  constexpr bool CAUSAL = false;\n"
    "  constexpr bool ON = true;\n"
    "\n"
    "out[0] = a_shape[0] + a_strides[0] + a_ndim + n[0] + b_x;\n"
    "}\n"
    "\n"
    "} // namespace mlx::core::cu\n"
)


def test_cuda_source_follows_mlx_build_kernel():
    # `b_x` is not `b_shape`: no helper parameters for b; n is 0-d: a pointer, no helpers.
    kspec = KernelSpec(
        "cuda", "toy", ("a", "n", "b"), ("out", "out2"),
        "out[0] = a_shape[0] + a_strides[0] + a_ndim + n[0] + b_x;", "// header\n",
    )
    launch = Launch(
        [mx.zeros((2, 3), mx.float16), 5, mx.zeros((4,), mx.bfloat16)],
        [(1,), (1,)],
        [mx.float32, mx.bfloat16],
        (1, 1, 1),
        (1, 1, 1),
        [("T", mx.float16), ("BLOCK", 32), ("CAUSAL", False), ("ON", True)],
    )
    gen = source.cuda_source(kspec, launch)
    assert gen.kernel_name == "custom_kernel_toy_float16_t_32_f_t"
    assert gen.source == CUDA_EXPECTED


def test_cuda_attention_source_has_mlx_wrapper():
    kspec, launch = _attention_plan("cuda", mx.float16, 64, 4, "add", False)
    gen = source.cuda_source(kspec, launch)
    assert gen.source.startswith('\n#include "mlx/backend/cuda/device/utils.cuh"\n')
    assert gen.source.index(kspec.header) < gen.source.index("namespace mlx::core::cu {")
    assert "  using T = __half;\n  using MT = __half;\n  constexpr int D = 64;\n" in gen.source
    assert "    const __grid_constant__ Shape q_shape,\n" in gen.source
    assert gen.source.endswith(kspec.source + "\n}\n\n} // namespace mlx::core::cu\n")


def test_scalars_become_mlx_dtypes():
    kspec = _metal("out[0] = n;", names=("a", "n", "f", "b"))
    launch = Launch([mx.zeros((8,)), 1, 1.0, False], [(1,)], [mx.float32], (1, 1, 1), (1, 1, 1))
    ins = source.normalize_inputs(kspec, launch)
    assert [x.dtype for x in ins[1:]] == [mx.int32, mx.float32, mx.bool_]
    assert all(x.ndim == 0 for x in ins[1:])


def test_float_template_argument_is_rejected():
    kspec = _metal("out[0] = 1;")
    launch = Launch([mx.zeros((8,)), 1], [(1,)], [mx.float32], (1, 1, 1), (1, 1, 1), [("X", 1.5)])
    with pytest.raises(ValueError, match="template"):
        source.metal_source(kspec, launch)


def test_non_contiguous_input_keeps_its_strides_without_copy():
    base = mx.arange(24, dtype=mx.float32).reshape(2, 3, 4)
    view = base[:, :2, :]
    kspec = KernelSpec("cuda", "v", ("a",), ("out",), "out[0] = a_strides[0];",
                       ensure_row_contiguous=False)
    (x,) = source.normalize_inputs(kspec, Launch([view], [(1,)], [mx.float32], (1, 1, 1), (1, 1, 1)))
    assert x.strides == (12, 4, 1)
    got = np.lib.stride_tricks.as_strided(x.data, x.shape, [s * 4 for s in x.strides])
    assert np.array_equal(got, np.array(view))
    kspec2 = KernelSpec("cuda", "v", ("a",), ("out",), "out[0] = 0;")
    (y,) = source.normalize_inputs(kspec2, Launch([view], [(1,)], [mx.float32], (1, 1, 1), (1, 1, 1)))
    assert y.strides == (8, 4, 1)  # ensure_row_contiguous: MLX copies, strides are row-major


def test_rewrite_for_emulation_only_touches_shared_declarations():
    src = (
        "namespace mlx::core::cu {\n__global__ void k(float* out) {\n"
        "  extern __shared__ __align__(16) unsigned char smem[];\n"
        "  __shared__ float red[32], other[4];\n"
        "  float* p = (float*)smem; // __shared__ float not_this[3];\n"
        "}\n}\n"
        "template <typename T>\n[[kernel]] void mk(device T* q [[buffer(0)]]) {\n"
        "  threadgroup float buf[64];\n  threadgroup T* p = (threadgroup T*)buf;\n"
        "  threadgroup_barrier(mem_flags::mem_threadgroup);\n}\n"
        'template [[host_name("mk_x")]] [[kernel]] decltype(mk<float>) mk<float>;\n'
    )
    cuda = rewrite.for_emulation(src, "cuda")
    assert "__shared__ __align__(16) unsigned char smem[BB_DYN_SMEM_BYTES];" in cuda
    assert "::bbemu::touch_shared(&red, sizeof(red)); ::bbemu::touch_shared(&other" in cuda
    assert "// __shared__ float not_this[3];" in cuda
    metal = rewrite.for_emulation(src, "metal")
    assert "static threadgroup float buf[64]; ::bbemu::touch_shared(&buf, sizeof(buf));" in metal
    assert "  threadgroup T* p = (threadgroup T*)buf;" in metal
    assert "template decltype(mk<float>) mk<float>;" in metal


def test_compact_drops_comments_but_keeps_literals_and_directives():
    from batchbench.kernels.spec import compact

    src = (
        "// header comment\n"
        "#ifdef BB_PORTABLE   // trailing\n"
        "  int a = 1; /* block\n comment */ int b = 2;\n"
        "#endif\n"
        '    asm("ld.global // not a comment {%0};" : "=r"(x));\n'
        "\n\n    char c = '/';  // slash\n"
    )
    out = compact(src)
    assert out.splitlines() == [
        "#ifdef BB_PORTABLE",
        "int a = 1; int b = 2;",
        "#endif",
        'asm("ld.global // not a comment {%0};" : "=r"(x));',
        "char c = '/';",
    ]


def test_long_cuda_headers_go_to_an_included_file(tmp_path, monkeypatch):
    """MLX hashes the generated source at every launch: long headers are handed over as an
    #include of a file named by their hash, holding exactly the header."""
    from batchbench.kernels import spec as S

    monkeypatch.setenv("BATCHBENCH_KERNEL_DIR", str(tmp_path))
    header = "// a kernel header\n" + "int x;\n" * 400
    inc = S.cuda_header(header)
    assert inc.startswith('#include "') and len(inc) < 200
    path = inc.split('"')[1]
    assert path.startswith(str(tmp_path)) and open(path).read() == header
    assert S.cuda_header(header) == inc  # same content, same file
    other = S.cuda_header(header + "int y;\n")
    assert other != inc and open(other.split('"')[1]).read().endswith("int y;\n")
    assert S.cuda_header("int z;\n") == "int z;\n"  # short headers stay inline
    monkeypatch.setattr(S, "INCLUDE_HEADERS", False)
    assert S.cuda_header(header) == header


def test_unwritable_header_dir_falls_back_inline_and_says_so(tmp_path, monkeypatch, capsys):
    from batchbench.kernels import spec as S

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("BATCHBENCH_KERNEL_DIR", str(blocker / "sub"))  # cannot be created
    header = "int x;\n" * 400
    assert S.cuda_header(header) == header
    assert "kernel header passed inline" in capsys.readouterr().err
