from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from batchbench.sweep_config import explicit_options, load_sweep_config, merge_config, validate

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _toml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_shipped_seed_config_is_the_seed_command():
    cfg = load_sweep_config(CONFIGS / "seed-pr13493.toml")
    # -c 40000 -b 2048 -ub 512 -npp 0,512,4096,8192 -ntg 32 -npl 2,3 -fa on
    assert cfg["ctx_size"] == 40000 and cfg["batch_size"] == 2048 and cfg["ubatch_size"] == 512
    assert cfg["npp"] == [0, 512, 4096, 8192] and cfg["ntg"] == [32] and cfg["npl"] == [2, 3]
    assert cfg["flash_attn"] == "on"


def test_shipped_scaling_and_quick_configs():
    cfg = load_sweep_config(CONFIGS / "scaling.toml")
    assert cfg["ctx_size"] == 140000 and cfg["npp"] == [4096] and cfg["ntg"] == [32]
    assert cfg["npl"] == [1, 2, 4, 8, 16, 32]
    # Every config fits its context: llama.cpp would silently skip rows that do not.
    for name in ("seed-pr13493.toml", "scaling.toml", "quick-cpu.toml"):
        c = load_sweep_config(CONFIGS / name)
        need = max(b * (pp + tg) for pp in c["npp"] for tg in c["ntg"] for b in c["npl"])
        assert need <= c["ctx_size"], name
    quick = load_sweep_config(CONFIGS / "quick-cpu.toml")
    assert max(quick["npl"]) * (max(quick["npp"]) + max(quick["ntg"])) <= 256  # tiny on purpose


def test_values_are_normalized(tmp_path):
    cfg = load_sweep_config(
        _toml(
            tmp_path,
            'npp = "0,512"\nntg = 32\nnpl = [1, 2]\nflash-attn = true\nkv_unified = false\n',
        )
    )
    assert cfg == {
        "npp": [0, 512],
        "ntg": [32],
        "npl": [1, 2],
        "flash_attn": "on",
        "kv_unified": False,
    }
    assert validate({"flash_attn": -1})["flash_attn"] == "auto"
    assert validate({"flash_attn": "disabled"})["flash_attn"] == "off"


@pytest.mark.parametrize(
    "text,needle",
    [
        ("ctx = 4096\n", "unknown key 'ctx'"),
        ("batch_sise = 4\n", "did you mean 'batch_size'"),
        ("npl = [1, 0]\n", "key 'npl' must be a list of integers >= 1"),
        ("npp = [0, -1]\n", "key 'npp' must be a list of integers >= 0"),
        ("npp = [1.5]\n", "key 'npp'"),
        ("npp = []\n", "key 'npp'"),
        ('ctx_size = "big"\n', "key 'ctx_size' must be an integer >= 0"),
        ("repetitions = 0\n", "key 'repetitions' must be an integer >= 1"),
        ("pps = 1\n", "key 'pps' must be true or false"),
        ('flash_attn = "maybe"\n', "key 'flash_attn'"),
        ('output_format = "xml"\n', 'key \'output_format\' must be one of "md", "jsonl"'),
        ('quant = "q5_k"\n', "key 'quant'"),
        ("batch_size = true\n", "key 'batch_size'"),
        ("[bench]\nnpp = [1]\n", "[bench] tables are not supported"),
        ("ctx_size = 1\nctx-size = 2\n", "given twice"),
        ("npp = [1, 2\n", "invalid TOML"),
    ],
)
def test_bad_configs_name_file_and_key(tmp_path, text, needle):
    p = _toml(tmp_path, text)
    with pytest.raises(ValueError) as e:
        load_sweep_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: "), msg
    assert needle in msg, msg
    assert "\n" not in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read config .*nope.toml"):
        load_sweep_config(tmp_path / "nope.toml")


def test_merge_command_line_over_file_over_defaults():
    defaults = {"ctx_size": 0, "npp": [], "ntg": [], "npl": [], "flash_attn": "auto", "seed": 42}
    cli = dict(defaults, npl=[4, 8], flash_attn="off")
    file_values = {
        "ctx_size": 40000,
        "npp": [0, 512],
        "npl": [2, 3],
        "flash_attn": "on",
        "repetitions": 3,
    }
    merged = merge_config(file_values, cli, explicit={"npl", "flash_attn"})
    assert merged == {
        "ctx_size": 40000,  # file over default
        "npp": ["0", "512"],  # the shape `-npp 0 -npp 512` gives
        "ntg": [],  # neither: default stays
        "npl": [4, 8],  # typed list replaces the file's list
        "flash_attn": "off",  # typed value wins
        "seed": 42,
        "repetitions": 3,  # only in the file
    }
    assert cli["npl"] == [4, 8] and "repetitions" not in cli  # inputs untouched
    # A value typed equal to the default still counts as typed.
    assert merge_config({"seed": 7}, {"seed": 42}, explicit={"seed"})["seed"] == 42
    assert merge_config({"seed": 7}, {"seed": 42}, explicit=set())["seed"] == 7


def test_merge_maps_file_keys_onto_the_cli_parameters():
    # The CLI's names: -kvu/-no-kvu are two flags, --csv lands in csv_path.
    cli = {"kvu": False, "no_kvu": False, "csv_path": None, "npl": [], "flash_attn": "auto"}
    file_values = {"kv_unified": False, "csv": "out.csv", "npl": [1, 2], "flash_attn": "on"}
    merged = merge_config(file_values, cli, explicit=set())
    assert merged == {
        "kvu": False,
        "no_kvu": True,
        "csv_path": "out.csv",
        "npl": ["1", "2"],
        "flash_attn": "on",
    }
    typed = dict(cli, kvu=True, csv_path="mine.csv")
    merged = merge_config(file_values, typed, explicit={"kvu", "csv_path"})
    assert merged["kvu"] is True and merged["no_kvu"] is False  # -kvu typed: the file's false loses
    assert merged["csv_path"] == "mine.csv"
    assert merge_config({"kv_unified": True}, cli, set())["kvu"] is True


def test_explicit_options_from_a_typer_context(tmp_path):
    seen = {}
    app = typer.Typer()

    @app.command()
    def bench(
        ctx: typer.Context,
        ctx_size: int = typer.Option(0, "-c", "--ctx-size"),
        seed: int = typer.Option(42, "-s", "--seed"),
        config: str = typer.Option("", "--config"),
    ) -> None:
        seen["explicit"] = explicit_options(ctx)
        seen["merged"] = merge_config(load_sweep_config(config), ctx.params, seen["explicit"])

    cfg = _toml(tmp_path, "ctx_size = 40000\nseed = 1\n")
    res = CliRunner().invoke(app, ["-s", "42", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert seen["explicit"] == {"seed", "config"}
    assert seen["merged"]["ctx_size"] == 40000 and seen["merged"]["seed"] == 42
