"""Turns CLI values into a benchmark run: model, caches, modes, output sinks."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import replace
from datetime import datetime, timezone

import mlx.core as mx

from batchbench import backend, formats, presets
from batchbench.bench import BenchParams, Mode, Runner, context_layout, run_bench
from batchbench.cli import UserError, parse_fa, parse_int_list
from batchbench.kv_cache import KVCache
from batchbench.memory import activation_bytes, check_fits, kv_bytes

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
KV_TYPES = {"f16", "bf16", "f32"}
PACK_OFF = "BB_QMM_SB_PACK=0 leaves them out"
WPACK_OFF = "BB_QMM_WPACK=0 leaves them out"


def _modes(values: dict, fa: int) -> list[Mode]:
    unified = not values["no_kvu"]
    flash = fa != 0
    skip = not values["no_skip"]
    ab = values.get("ab")
    if ab == "own":
        return [Mode("llama", True, flash, skip), Mode("own-blocks", True, flash, skip, own_blocks=True)]
    own = bool(values.get("own_blocks"))
    return [replace(m, own_blocks=own and m.kv_unified) for m in _ab_modes(ab, unified, flash, skip)]


def _ab_modes(ab: str | None, unified: bool, flash: bool, skip: bool) -> list[Mode]:
    if ab is None:
        return [Mode("default", unified, flash, skip)]
    if ab == "skip":
        return [Mode("skip", unified, True, True), Mode("no-skip", unified, True, False)]
    if ab == "kv":
        return [Mode("unified", True, flash, skip), Mode("split", False, flash, skip)]
    if ab == "fa":
        return [Mode("fa-on", unified, True, skip), Mode("fa-off", unified, False, skip)]
    if ab == "all":
        return [Mode("skip", True, True, True), Mode("no-skip", True, True, False),
                Mode("split", False, True, True)]
    raise UserError(f"--ab: expected skip, kv, fa, all or own, got '{ab}'")


def _cache_bytes(cfg: dict, modes: list[Mode], n_ctx: int, n_seq_max: int, values: dict, dtype) -> int:
    """KV buffers of every cache the modes need, plus one ubatch's transient memory."""
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    n_kv_heads = cfg.get("num_key_value_heads") or heads
    kv, transient, seen = 0, 0, set()
    ub = min(values["ubatch_size"], values["batch_size"])
    for m in modes:
        n_cells = context_layout(n_ctx, n_seq_max, m.kv_unified)[1]
        if (m.kv_unified, m.own_blocks) not in seen:
            seen.add((m.kv_unified, m.own_blocks))
            kv += kv_bytes(cfg["num_hidden_layers"], n_kv_heads, head_dim, n_cells, dtype)
        # modes run one after another: only the largest ubatch transient counts
        transient = max(transient, activation_bytes(cfg, ub, n_cells, n_seq_max, dtype,
                                                    full_scores=not (m.flash and m.skip)))
    return kv + transient


def load(values: dict, dtype):
    """Load the model named by -m (default preset), checking memory first; quantized linears
    then run through batchbench's decode matmul (MLX's own kernels where it has none)."""
    from batchbench.kernels import qmm
    from batchbench.kernels.qmm import fuse_quantized_projections, use_fast_quantized_linears

    model, cfg, name, quant, n_ctx_train = _load(values, dtype)
    extra = qmm.packed_bytes(model)  # a model file's extra copies are known only now
    if extra:
        check_fits(mx.get_active_memory() + extra, f"{name}{_packed_note(qmm.packs_scales(), qmm.packs_weights())}")
    fuse_quantized_projections(model)
    use_fast_quantized_linears(model)
    note = qmm.x8_note(model)
    if note:
        print(f"note: {note}", file=sys.stderr)
    return model, cfg, name, quant, n_ctx_train


def _weight_bytes(cfg: dict, dtype, quant: str) -> tuple[int, str]:
    """A preset's weights as the swaps will hold them, and what a memory error adds about the
    packed pairs that BB_QMM_SB_PACK keeps on CUDA."""
    from batchbench.kernels import qmm

    packed = qmm.packs_scales() and quant != "none"
    wpacked = qmm.packs_weights() and quant != "none"
    return presets.weight_bytes(cfg, dtype, quant, packed=packed, wpacked=wpacked), _packed_note(packed, wpacked)


def _packed_note(packed: bool, wpacked: bool) -> str:
    """What a memory error adds about the swaps' extra copies."""
    parts = ([f"packed scales ({PACK_OFF})"] if packed else []) + ([f"repacked weights ({WPACK_OFF})"] if wpacked else [])
    return f" with {' and '.join(parts)}" if parts else ""


def _load(values: dict, dtype):
    spec = values["model"] or f"preset:{presets.DEFAULT_PRESET}"
    if spec.startswith("preset:"):
        name = spec.split(":", 1)[1]
        cfg = presets.preset_config(name)
        need, note = _weight_bytes(cfg, dtype, values["quant"])
        check_fits(need, f"preset {name}{note}")
        model, cfg = presets.make_preset(name, dtype, values["quant"])
        return model, cfg, spec, values["quant"], cfg["max_position_embeddings"]
    if values["quant"] != "none":
        raise UserError("--quant applies to presets only; model files keep their own format")
    if not os.path.exists(spec):
        raise UserError(f"model not found: {spec}")
    from batchbench.loaders import load_model

    if os.path.isfile(spec):
        check_fits(os.path.getsize(spec), f"model {spec}")
    loaded = load_model(spec, dtype=dtype)
    return loaded.model, loaded.config, spec, loaded.quant, loaded.n_ctx_train


def run_from_cli(values: dict, explicit: set[str], command: str) -> int:
    if values.get("config"):
        from batchbench.sweep_config import load_sweep_config, merge_config

        values = merge_config(load_sweep_config(values["config"]), values, explicit)
    if values["output_format"] not in ("md", "jsonl"):
        raise UserError(f"--output-format: expected md or jsonl, got '{values['output_format']}'")
    if values["dtype"] == "auto":
        # MLX's CPU matmuls in float16 are many times slower than in float32.
        values["dtype"] = "float32" if (values["device"] or "") == "cpu" or (
            not values["device"] and mx.default_device() == mx.cpu) else "float16"
    if values["dtype"] not in DTYPES:
        raise UserError(f"--dtype: expected one of {', '.join(DTYPES)}, got '{values['dtype']}'")
    for flag, v in (("-ctk", values["cache_type_k"]), ("-ctv", values["cache_type_v"])):
        if v not in KV_TYPES:
            print(f"note: {flag} {v}: the KV cache uses --dtype ({values['dtype']}) here", file=sys.stderr)
    if values["kvu"] and values["no_kvu"]:
        raise UserError("-kvu and -no-kvu contradict each other")
    if values.get("own_blocks") and values["no_kvu"] and not values.get("ab"):
        print("note: --own-blocks places decode tokens in a unified cache; -no-kvu has none", file=sys.stderr)
    fa = parse_fa(values["flash_attn"])
    npp = parse_int_list(values["npp"], "-npp", 0)
    ntg = parse_int_list(values["ntg"], "-ntg", 0)
    npl = parse_int_list(values["npl"], "-npl", 1)
    for flag, key, lo in (("-b", "batch_size", 1), ("-ub", "ubatch_size", 1), ("-c", "ctx_size", 0),
                          ("-r", "repetitions", 1)):
        if values[key] < lo:
            raise UserError(f"{flag}: {values[key]} must be >= {lo}")
    if npl and max(npl) > 256:
        raise UserError(f"-npl: at most 256 parallel sequences, got {max(npl)}")
    modes = _modes(values, fa)
    if values["device"]:
        backend.set_device(values["device"])
    dtype = DTYPES[values["dtype"]]
    n_seq_max = max(npl) if npl else 1
    spec = values["model"] or f"preset:{presets.DEFAULT_PRESET}"
    if spec.startswith("preset:"):
        # Weights and caches of a preset are known before anything is built: check them together.
        cfg = presets.preset_config(spec.split(":", 1)[1])
        n_ctx = values["ctx_size"] or cfg["max_position_embeddings"]
        need, note = _weight_bytes(cfg, dtype, values["quant"])
        check_fits(need + _cache_bytes(cfg, modes, n_ctx, n_seq_max, values, dtype), f"{spec}{note} and its KV cache")
    model, cfg, model_name, quant, n_ctx_train = load(values, dtype)
    n_ctx = values["ctx_size"] or n_ctx_train
    check_fits(mx.get_active_memory() + _cache_bytes(cfg, modes, n_ctx, n_seq_max, values, dtype),
               "the KV cache")
    params = BenchParams(n_ctx=n_ctx, n_batch=values["batch_size"], n_ubatch=values["ubatch_size"],
                         npp=npp, ntg=ntg, npl=npl, is_pp_shared=values["pps"],
                         is_tg_separate=values["tgs"], seed=values["seed"],
                         repetitions=values["repetitions"])
    args = model.args
    runners, n_kv_max, caches = {}, {}, {}
    for m in modes:
        kv_size, n_kv_max[m.name] = context_layout(n_ctx, n_seq_max, m.kv_unified)
        key = (m.kv_unified, m.own_blocks)
        if key not in caches:
            caches[key] = KVCache(args.num_hidden_layers, args.num_key_value_heads, args.head_dim,
                                  kv_size, n_seq_max, m.kv_unified, dtype, own_blocks=m.own_blocks)
        runners[m.name] = Runner(model, caches[key], m, params.n_batch, params.n_ubatch)

    first = modes[0]
    header = formats.Header(
        n_kv_max=n_kv_max[first.name], n_batch=params.n_batch, n_ubatch=params.n_ubatch,
        flash_attn=fa, is_pp_shared=int(params.is_pp_shared),
        is_tg_separate=int(params.is_tg_separate), n_gpu_layers=-1,
        n_threads=os.cpu_count() or 1, n_threads_batch=os.cpu_count() or 1,
    )
    meta = {
        "model": model_name, "dtype": values["dtype"], "quant": quant,
        "kv_unified": int(first.kv_unified), "skip": int(first.skip),
        "own_blocks": int(first.own_blocks),
        "backend": backend.BACKEND, "mlx_version": mx.__version__,
        "machine": f"{platform.node()} {platform.machine()} {_device_name()}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "command": command,
    }
    ab = len(modes) > 1
    reps = params.repetitions > 1
    md = values["output_format"] == "md"
    sink = formats.CsvSink(values["csv_path"], meta) if values["csv_path"] else None
    out = sys.stdout
    if md:
        out.write("\n" + formats.header_line(header) + "\n\n" + formats.table_header(ab, reps) + "\n")
        out.flush()

    def note(msg: str) -> None:
        print(f"note: {msg}", file=sys.stderr)

    n_rows = 0
    progress = _progress(len(npp) * len(ntg) * len(npl) * len(modes))
    try:
        for row in run_bench(model, params, runners, n_kv_max, note):
            n_rows += 1
            if sink:
                sink.write(header, row)
            line = formats.md_row(row, ab, reps) if md else formats.jsonl_row(header, row, meta)
            out.write(line + "\n")
            out.flush()
            if progress:
                progress.update(progress.task_ids[0], advance=1,
                                description=f"PP={row.pp} TG={row.tg} B={row.pl} {row.mode}")
    except KeyboardInterrupt:
        print(f"\ninterrupted: {n_rows} finished rows kept", file=sys.stderr)
        return 130
    finally:
        if progress:
            progress.stop()
        if sink:
            sink.close()
    if md:
        out.write("\n")
    return 0


def _device_name() -> str:
    try:
        return mx.device_info().get("device_name", "")
    except Exception:
        return ""


def _progress(total: int):
    """A progress bar on stderr when it is a terminal; piped output stays plain."""
    if not sys.stderr.isatty() or total == 0:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=Console(stderr=True), transient=True)
    progress.add_task("warming up", total=total)
    progress.start()
    return progress
