"""Your own model from the command line: FILE.py:FUNCTION with data in .json, .npz or .csv."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_runner import run_cli

from vimodels.cli.main import main
from vimodels.errors import DataError, OptionError, UnknownNameError
from vimodels.usermodel import is_model_spec, load_data, load_model_spec, read_data_map

MODEL = '''
import pyro
import pyro.distributions as dist
import torch


def regression(x, y=None):
    """y = a + b x + noise."""
    a = pyro.sample("a", dist.Normal(0.0, 5.0))
    b = pyro.sample("b", dist.Normal(0.0, 5.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(a + b * x, sigma), obs=y)


def _helper():
    pass
'''


def run(*args, cache):
    return run_cli(*args, env={"VIMODELS_CACHE": str(cache)})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("usermodel")
    (d / "model.py").write_text(MODEL)
    rng = np.random.default_rng(0)
    x = np.linspace(-1, 1, 20)
    y = 1.0 + 2.0 * x + 0.3 * rng.standard_normal(20)
    (d / "data.json").write_text(json.dumps({"x": x.tolist(), "y": y.tolist()}))
    np.savez(d / "data.npz", x=x, y=y)
    lines = ["xx,yy,unused"] + [f"{a},{b},0" for a, b in zip(x, y)]
    (d / "data.csv").write_text("\n".join(lines) + "\n")
    (d / "map.toml").write_text('[data]\nx = "xx"\ny = "yy"\n')
    (d / "map.json").write_text(json.dumps({"x": "xx", "y": "yy"}))
    (d / "broken.py").write_text("import pyro\n\ndef model(:\n    pass\n")
    (d / "raises.py").write_text("raise RuntimeError('boom')\n")
    return d


def test_spec_and_loaders(files):
    assert is_model_spec(f"{files}/model.py:regression")
    assert not is_model_spec("eight_schools_noncentered")
    fn = load_model_spec(f"{files / 'model.py'}:regression")
    assert fn.__name__ == "regression"
    data = load_data(files / "data.csv", read_data_map(files / "map.toml"), fn)
    assert set(data) == {"x", "y"} and data["x"].shape == (20,)
    assert np.allclose(data["x"], load_data(files / "data.json", None, fn)["x"])
    assert np.allclose(data["y"], load_data(files / "data.npz", None, fn)["y"])
    assert read_data_map(files / "map.json", ["y=unused"]) == {"x": "xx", "y": "unused"}
    with pytest.raises(UnknownNameError, match="regression"):
        load_model_spec(f"{files / 'model.py'}:nope")
    with pytest.raises(OptionError, match="SyntaxError"):
        load_model_spec(f"{files / 'broken.py'}:model")
    with pytest.raises(OptionError, match="RuntimeError: boom"):
        load_model_spec(f"{files / 'raises.py'}:model")
    with pytest.raises(DataError, match="no column"):
        load_data(files / "data.csv", {"x": "nope"}, fn)
    with pytest.raises(OptionError, match="ARGUMENT=COLUMN"):
        read_data_map(None, ["x"])


@pytest.mark.parametrize(
    ("data_args", "in_subprocess"),
    [
        (["--data", "data.json"], False),
        (["--data", "data.npz"], True),
        (["--data", "data.csv", "--data-map", "map.toml"], False),
        (["--data", "data.csv", "--arg", "x=xx", "--arg", "y=yy"], True),
    ],
    ids=["json", "npz", "csv-toml", "csv-arg"],
)
def test_fit_user_model_from_each_format(files, data_args, in_subprocess, tmp_path, capsys):
    """Two formats through ``python -m vimodels.cli``, two through ``main`` (the same code)."""
    data_args = [str(files / a) if a.startswith(("data.", "map.")) else a for a in data_args]
    out = tmp_path / "out"
    argv = [
        "fit",
        f"{files / 'model.py'}:regression",
        *data_args,
        "--steps",
        "150",
        "--draws",
        "50",
        "--quiet",
        "--sites",
        "b",
        "--out",
        str(out),
    ]
    if in_subprocess:
        r = run(*argv, cache=tmp_path / "cache")
        assert r.returncode == 0, r.stderr
        stdout = r.stdout
    else:
        assert main(argv) == 0
        stdout = capsys.readouterr().out
    assert "regression / auto_normal / trace" in stdout
    (written,) = out.glob("regression__auto_normal__trace*.json")
    summary = json.loads(written.read_text())
    assert summary["model"] == "regression"


@pytest.mark.parametrize(
    ("spec", "extra", "needle"),
    [
        ("missing.py:regression", ["--data", "data.json"], "does not exist"),
        ("broken.py:model", ["--data", "data.json"], "SyntaxError"),
        ("model.py:nope", ["--data", "data.json"], "has no function 'nope'"),
        ("model.py:regression", ["--data", "data.csv", "--arg", "x=zz"], "no column(s) zz"),
        ("model.py:regression", ["--data", "data.csv"], "missing key(s) x"),
        ("model.py:regression", ["--data", "nothing.json"], "does not exist"),
        ("model.py:regression", ["--data", "data.json", "--sites", "zz"], "zz"),
    ],
)
@pytest.mark.parametrize("command", ["fit", "nuts", "compare"])
def test_user_model_mistakes_exit_2(files, tmp_path, capsys, command, spec, extra, needle):
    """In process (the subprocess path is the same ``main``): exit 2 and one line."""
    extra = [str(files / a) if a.startswith(("data.", "nothing.")) else a for a in extra]
    args = [command, str(files / spec), *extra, "--out", str(tmp_path / "o")]
    assert main([*args, "--cache", str(tmp_path / "c")] if command != "fit" else args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vimodels: error:") and needle in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_help_says_the_file_is_run(tmp_path):
    r = run("fit", "--help", cache=tmp_path)
    assert r.returncode == 0
    assert "FILE.py:FUNCTION" in r.stdout and "code runs" in r.stdout


@pytest.mark.slow
def test_nuts_and_compare_user_model(files, tmp_path):
    cache = tmp_path / "cache"
    common = [f"{files / 'model.py'}:regression", "--data", files / "data.npz"]
    nuts = ["--chains", "2", "--warmup", "150", "--samples", "150"]
    r = run("nuts", *common, *nuts, "--quiet", cache=cache)
    assert r.returncode in (0, 1), r.stderr  # 1: a short run may fail its checks
    assert "nuts reference for regression" in r.stdout
    r2 = run("nuts", *common, *nuts, "--quiet", cache=cache)
    assert "loaded from cache" in r2.stdout
    out = tmp_path / "cmp"
    r3 = run(
        "compare",
        *common,
        *nuts,
        "--guides",
        "auto_normal",
        "--steps",
        "200",
        "--draws",
        "200",
        "--no-netcdf",
        "--quiet",
        "--out",
        out,
        cache=cache,
    )
    assert r3.returncode == 0, r3.stderr
    assert (out / "report.md").exists()
    assert "bridge sampling" in (out / "report.md").read_text()
