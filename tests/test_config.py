"""Typed job configurations, the command line built from them, and the layering rule that the
library never imports the command line (nor torch to answer ``--help``)."""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

from bilevel.cli import JOBS, build_parser, main
from bilevel.config import (  # tomllib: tomli on Python 3.10
    config_dict,
    config_from_dict,
    job_record,
    load_config,
    to_toml,
    tomllib,
)
from bilevel.errors import BilevelError
from bilevel.imaging.config import (
    DeblurConfig,
    DenoiseConfig,
    InpaintConfig,
    ReconstructConfig,
    job_config,
)
from bilevel.learning.config import HpoConfig

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
CONFIGS = (DenoiseConfig, DeblurConfig, InpaintConfig, HpoConfig, ReconstructConfig)
#: The command-line modules: the only ones that may build argparse parsers.
CLI_MODULES = ("bilevel.cli", "bilevel.__main__")


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )


def _library_modules() -> list[str]:
    names = []
    for path in sorted((SRC / "bilevel").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name not in CLI_MODULES:
            names.append(name)
    return names


def test_library_modules_do_not_use_argparse():
    """argparse lives only in the command-line modules."""
    cli_files = {SRC / "bilevel" / "cli.py", SRC / "bilevel" / "__main__.py"}
    users = [
        str(path.relative_to(SRC))
        for path in sorted((SRC / "bilevel").rglob("*.py"))
        if path not in cli_files
        and re.search(r"^\s*(import|from) argparse\b", path.read_text(encoding="utf-8"), re.M)
    ]
    assert users == []


def test_importing_the_library_imports_no_command_line_module():
    """Each library module, imported alone in a fresh interpreter, leaves bilevel.cli out."""
    optional = {"bilevel.imaging.deepinv", "bilevel.runs.tensorboard"}  # optional packages
    names = [n for n in _library_modules() if n not in optional]
    code = (
        "import importlib, sys, json\n"
        f"names = {names!r}\n"
        "bad = {}\n"
        "for n in names:\n"
        "    try:\n"
        "        importlib.import_module(n)\n"
        "    except ImportError as e:\n"  # a missing optional dependency (scikit-learn, ...)
        "        continue\n"
        f"    hit = [m for m in {CLI_MODULES!r} if m in sys.modules]\n"
        "    if hit: bad[n] = hit\n"
        "print(json.dumps(bad))\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {}
    assert len(names) > 30  # the walk found the package


@pytest.mark.parametrize("job", [None, *JOBS])
def test_help_imports_no_torch(job):
    argv = ["--help"] if job is None else [job, "--help"]
    code = (
        "import sys\n"
        "from bilevel.cli import main\n"
        f"code = main({argv!r})\n"
        "assert code == 0, code\n"
        "heavy = [m for m in ('torch', 'numpy', 'bilevel.problem') if m in sys.modules]\n"
        "print('IMPORTED', heavy)\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "IMPORTED []"


def test_help_is_fast():
    """``bilevel --help`` and ``bilevel denoise --help`` answer in a fraction of a second
    (the bound is generous for loaded machines: importing torch alone takes over a second)."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    for argv in (["--help"], ["denoise", "--help"], ["hpo", "--help"]):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "bilevel", *argv], capture_output=True, env=env
            )
            times.append(time.perf_counter() - start)
            assert done.returncode == 0
        assert min(times) < 1.0, (argv, times)


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "bilevel 0.1.0"


@pytest.mark.parametrize("job", list(JOBS))
def test_every_option_has_help_and_shows_its_default(job):
    parser = build_parser([job])
    sub = next(a for a in parser._actions if a.dest == "job").choices[job]
    for action in sub._actions:
        if action.dest in ("help",):
            continue
        assert action.help, action.dest
        if action.dest != "print_config":
            assert "default" in action.help, (action.dest, action.help)


@pytest.mark.parametrize("cls", CONFIGS)
def test_toml_round_trip(cls):
    """to_toml -> tomllib -> the same configuration, at the defaults and with odd values."""
    default = cls()
    assert config_from_dict(cls, tomllib.loads(to_toml(default))) == default
    odd = {}
    for key, value in config_dict(default).items():
        if isinstance(value, bool):
            odd[key] = not value
        elif isinstance(value, str) and key not in ("regulariser", "method", "dtype", "loss"):
            if key not in ("svmlight_indexing", "sid_solver", "model"):
                odd[key] = 'quote " and \\ backslash, ünïcode ‖∇ₓh‖'
        elif isinstance(value, float):
            odd[key] = math.inf if key == "time" else 1e-300
    changed = config_from_dict(cls, {}, overrides=odd)
    assert config_from_dict(cls, tomllib.loads(to_toml(changed))) == changed


def test_unknown_or_wrong_keys_are_one_line_errors(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("crop = 16\ncrops = 3\n")
    with pytest.raises(BilevelError, match=r"unknown key 'crops' for bilevel denoise") as err:
        load_config(DenoiseConfig, path)
    assert "\n" not in str(err.value)
    path.write_text('crop = "16"\n')
    with pytest.raises(BilevelError, match="crop must be an integer"):
        load_config(DenoiseConfig, path)
    path.write_text("step = 0.05\naccuracy = 1\n")  # numbers for text fields: schedules
    assert (load_config(DenoiseConfig, path).step, load_config(DenoiseConfig, path).accuracy) == (
        "0.05",
        "1",
    )
    path.write_text('regulariser = "foo"\n')
    with pytest.raises(BilevelError, match="regulariser must be one of"):
        load_config(DenoiseConfig, path)
    path.write_text("[table]\ncrop = 1\n")
    with pytest.raises(BilevelError, match=r"unknown table \[table\]"):
        load_config(DenoiseConfig, path)
    path.write_text("crop = \n")
    with pytest.raises(BilevelError, match="not valid TOML"):
        load_config(DenoiseConfig, path)
    with pytest.raises(BilevelError, match="does not exist"):
        load_config(DenoiseConfig, tmp_path / "missing.toml")
    with pytest.raises(BilevelError, match="unknown key 'blur'"):
        job_config("denoise", blur=1.0)  # deblurring only


def test_cli_config_file_and_flags(tmp_path, capsys):
    """--print-config prints the effective configuration; flags override the file; an unknown
    key in the file is a one-line usage error (status 2)."""
    assert main(["deblur", "--print-config", "--crop", "16", "--no-progress"]) == 0
    text = capsys.readouterr().out
    printed = config_from_dict(DeblurConfig, tomllib.loads(text))
    assert printed == DeblurConfig(crop=16, progress=False)
    path = tmp_path / "run.toml"
    path.write_text(text.replace("filters = 8", "filters = 3"))
    assert main(["deblur", "--config", str(path), "--print-config", "--blur", "2"]) == 0
    again = config_from_dict(DeblurConfig, tomllib.loads(capsys.readouterr().out))
    assert again == DeblurConfig(crop=16, progress=False, filters=3, blur=2.0)
    assert main(["deblur", "--config", str(path), "--print-config", "--progress"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["progress"] is True
    path.write_text("filterz = 3\n")
    assert main(["denoise", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'filterz'" in err[0]


def test_hpo_job_json_is_its_configuration(tmp_path, capsys):
    """job.json holds the effective configuration (the choices left to the job made); it
    loads back as an HpoConfig, and resuming with another one is refused naming the key."""
    pytest.importorskip("sklearn")
    run_dir = tmp_path / "run"
    argv = ["hpo", "--data", "iris", "--steps", "2", "--run-dir", str(run_dir)]
    assert main([*argv, "--no-progress", "--no-plots", "--json"]) == 0
    capsys.readouterr()
    record = json.loads((run_dir / "job.json").read_text())
    assert record.pop("job") == "hpo"
    config = config_from_dict(HpoConfig, record)
    assert (config.model, config.method) == ("logistic", "aid-cg")  # resolved
    assert config.shrinkage > 0 and config.run_dir == str(run_dir)
    assert job_record(config) == {"job": "hpo", **record}
    more = [*argv, "--steps", "3", "--resume", "--no-progress", "--no-plots", "--json"]
    assert main(more) == 0  # budgets may change
    capsys.readouterr()
    assert main([*argv, "--seed", "1", "--resume", "--no-progress", "--no-plots"]) == 2
    assert "seed: 0 -> 1" in capsys.readouterr().err


def test_named_grad_maps_parameter_names_to_the_hypergradient():
    """hg.named_grad(θ) for a Module θ: the names of named_parameters() (frozen ones left
    out), each with the entry of hg.grad in parameter_list's order."""
    import torch
    from torch import nn

    from bilevel import BilevelProblem, Exact

    theta = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)).double()
    theta[0].bias.requires_grad_(False)

    def lower(x, th, batch):
        return 0.5 * (x**2).sum(1) - (x * th(batch)).sum(1)

    def upper(x, th, batch):
        return 0.5 * (x**2).sum(1)

    batch = torch.randn(3, 2, dtype=torch.float64)
    problem = BilevelProblem(lower, upper, theta, mu=1.0)
    hg = Exact()(problem, batch, torch.zeros(3, 1, dtype=torch.float64), lower_tol=1e-12)
    named = hg.named_grad(theta)
    assert list(named) == ["0.weight", "1.weight", "1.bias"]
    for (name, p), g in zip(
        ((n, p) for n, p in theta.named_parameters() if p.requires_grad), hg.grad
    ):
        assert named[name] is g and g.shape == p.shape
    # x̂ = θ(batch), F = mean ½‖x̂‖²: ∂F/∂(last bias) = mean x̂
    assert torch.allclose(named["1.bias"], theta(batch).mean(0).detach())
    assert list(hg.named_grad([theta[1].weight, theta[1].bias, theta[0].weight])) == [
        "0",
        "1",
        "2",
    ]
