"""`batchbench`: llama-batched-bench's command line on MLX."""

from __future__ import annotations

import shlex
import sys
from typing import List, Optional

import typer

from batchbench import SettingError

app = typer.Typer(add_completion=False, no_args_is_help=False,
                  context_settings={"help_option_names": ["-h", "--help"]})

# llama.cpp flags that mean nothing on MLX: accepted so a command line can be pasted as is.
IGNORED_VALUE_FLAGS = ["-ngl", "--gpu-layers", "--n-gpu-layers", "-t", "--threads", "-tb",
                       "--threads-batch", "-np", "--parallel", "-dev", "--device-llama", "-sm",
                       "--split-mode", "-ts", "--tensor-split", "-mg", "--main-gpu", "--numa",
                       "-ot", "--override-tensor", "-ncmoe", "--n-cpu-moe"]
IGNORED_BOOL_FLAGS = ["-nkvo", "--no-kv-offload", "--swa-full", "--no-host", "--no-op-offload",
                      "-cmoe", "--cpu-moe", "--perf", "--no-perf", "-nr", "--no-repack",
                      "--repack", "--verbose", "-v", "--log-disable"]


class UserError(Exception):
    """Bad input: printed as one line, exit code 1."""


def fail(msg: str, code: int = 1) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def parse_int_list(values: List[str], flag: str, min_value: int) -> list[int]:
    out = []
    for v in values:
        for part in v.split(","):
            part = part.strip()
            try:
                n = int(part)
            except ValueError:
                raise UserError(f"{flag}: '{part}' in '{v}' is not an integer") from None
            if n < min_value:
                raise UserError(f"{flag}: {n} must be >= {min_value}")
            out.append(n)
    return out


def parse_fa(value: str) -> int:
    v = value.lower()
    if v in ("on", "enabled", "true", "1"):
        return 1
    if v in ("off", "disabled", "false", "0"):
        return 0
    if v in ("auto", "-1"):
        return -1
    raise UserError(f"-fa: expected on|off|auto, got '{value}'")


@app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "-m", "--model", help="GGUF file, HF/mlx-lm folder or preset:NAME (default: preset:small)"),
    ctx_size: int = typer.Option(0, "-c", "--ctx-size", help="Total context; 0 = model's training context"),
    batch_size: int = typer.Option(2048, "-b", "--batch-size"),
    ubatch_size: int = typer.Option(512, "-ub", "--ubatch-size"),
    npp: List[str] = typer.Option([], "-npp", help="Prompt lengths, comma list, repeatable"),
    ntg: List[str] = typer.Option([], "-ntg", help="Generated tokens per sequence"),
    npl: List[str] = typer.Option([], "-npl", help="Parallel sequence counts"),
    pps: bool = typer.Option(False, "-pps", help="Shared prompt"),
    tgs: bool = typer.Option(False, "-tgs", help="Generate sequences one after another"),
    kvu: bool = typer.Option(False, "-kvu", "--kv-unified", help="Unified KV cache (the default here)"),
    no_kvu: bool = typer.Option(False, "-no-kvu", "--no-kv-unified", help="One KV stream per sequence"),
    flash_attn: str = typer.Option("auto", "-fa", "--flash-attn", help="on|off|auto"),
    output_format: str = typer.Option("md", "--output-format", help="md|jsonl"),
    seed: int = typer.Option(1, "-s", "--seed"),
    csv_path: Optional[str] = typer.Option(None, "--csv", help="Append one CSV row per finished config"),
    no_skip: bool = typer.Option(False, "--no-skip", help="Flash path without masked-block skipping"),
    own_blocks: bool = typer.Option(False, "--own-blocks", help="Unified cache: decode tokens in 32-cell blocks of their own sequence (beyond llama.cpp, whose step takes consecutive cells)"),
    ab: Optional[str] = typer.Option(None, "--ab", help="A/B in one run: skip | kv | fa | all (unified+skip, unified no-skip, split) | own (llama.cpp's cells, --own-blocks)"),
    repetitions: int = typer.Option(1, "-r", "--repetitions", help="Repeat each config; report medians"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu|gpu (default: MLX's default)"),
    dtype: str = typer.Option("auto", "--dtype", help="auto|float16|bfloat16|float32 (auto: float16 on a GPU, float32 on the CPU)"),
    quant: str = typer.Option("none", "--quant", help="Preset weights: none|q8_0|q4_0"),
    cache_type_k: str = typer.Option("f16", "-ctk", "--cache-type-k"),
    cache_type_v: str = typer.Option("f16", "-ctv", "--cache-type-v"),
    config: Optional[str] = typer.Option(None, "--config", help="TOML sweep config; flags override it"),
):
    """Run the batched benchmark (llama-batched-bench's procedure and output)."""
    if ctx.invoked_subcommand is not None:
        return
    from batchbench.run import run_from_cli

    from batchbench.sweep_config import explicit_options

    values = dict(ctx.params)
    explicit = explicit_options(ctx)
    try:
        code = run_from_cli(values, explicit, command=_command_line())
    except (UserError, ValueError, MemoryError, OSError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    raise typer.Exit(code)


@app.command()
def presets():
    """List the built-in random-weight models."""
    from batchbench.presets import PRESETS, param_count, weight_bytes
    import mlx.core as mx

    typer.echo(f"{'name':14s} {'arch':6s} {'params':>8s} {'f16 GB':>7s} {'q4_0 GB':>8s}")
    for name, cfg in PRESETS.items():
        typer.echo(f"{name:14s} {cfg['model_type']:6s} {param_count(cfg) / 1e9:7.2f}B "
                   f"{weight_bytes(cfg, mx.float16) / 1e9:7.2f} {weight_bytes(cfg, mx.float16, 'q4_0') / 1e9:8.2f}")


@app.command("bench-attention")
def bench_attention(
    bs: str = typer.Option("2,3,8,32", "--b", help="Sequence counts"),
    ctxs: str = typer.Option("4096,8192", "--ctx", help="Cells per sequence"),
    out: Optional[str] = typer.Option(None, "--out", help="Write the table here too"),
    variants: str = typer.Option("all", "--variants",
                                 help="Comma-separated subset of list,model,scan,noskip,sdpa_unified,sdpa_separate"),
):
    """Micro-benchmark of the decode attention kernel (skip, no-skip, SDPA)."""
    from batchbench import bench_attention as ba

    try:
        b_list = parse_int_list([bs], "--b", 1)
        c_list = parse_int_list([ctxs], "--ctx", 32)
        names = ba.VARIANTS if variants == "all" else tuple(v.strip() for v in variants.split(",") if v.strip())
        unknown = [v for v in names if v not in ba.VARIANTS]
        if unknown or not names:
            raise UserError(f"--variants: unknown {', '.join(unknown) or '(none given)'}; "
                            f"choose from {','.join(ba.VARIANTS)}")
    except UserError as e:
        fail(str(e))
    ba.main(bs=tuple(b_list), ctxs=tuple(c_list), out=out, variants=names)


def _command_line() -> str:
    return "batchbench " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _register_optional() -> None:
    for modname in ("batchbench.compare", "batchbench.loaders.export_gguf"):
        try:
            mod = __import__(modname, fromlist=["register"])
        except ImportError:
            continue
        if hasattr(mod, "register"):
            mod.register(app)


def _strip_ignored(argv: list[str]) -> tuple[list[str], list[str]]:
    """Drop llama.cpp flags that mean nothing here, noting each once on stderr."""
    kept, ignored = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in IGNORED_VALUE_FLAGS:
            ignored.append(a if "=" in a or i + 1 >= len(argv) else f"{a} {argv[i + 1]}")
            i += 1 if "=" in a else 2
            continue
        if name in IGNORED_BOOL_FLAGS:
            ignored.append(a)
            i += 1
            continue
        kept.append(a)
        i += 1
    return kept, ignored


def main() -> None:
    _register_optional()
    argv, ignored = _strip_ignored(sys.argv[1:])
    for flag in ignored:
        typer.echo(f"note: '{flag}' has no meaning on MLX and is ignored", err=True)
    try:
        rc = app(args=argv, prog_name="batchbench", standalone_mode=False)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except SettingError as e:  # an environment setting read when a command imports the back-end
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except Exception as e:
        # Usage errors: one line, no traceback. (Typer vendors its own click, so match by shape.)
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            typer.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code or 2)
        if type(e).__name__ == "Abort":
            typer.echo("error: aborted", err=True)
            sys.exit(130)
        raise
    sys.exit(rc or 0)
