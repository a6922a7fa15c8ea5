"""Tests of the ``fedtune`` command: in-process through cli.main, and once as a real process."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from fedtune_core import tuning
from fedtune_core.fl import builtin

TINY = ["--model", "vit-tiny", "--weights", "none", "--method", "bias", "--dataset", "digits",
        "--partition", "iid", "--clients", "2", "--sample", "2", "--rounds", "1",
        "--batch-size", "64", "--device", "cpu", "--quiet"]


def _files(path):
    return sorted(p for p in path.rglob("*") if p.is_file())


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty current directory, so nothing can be written to the default results folder."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_run_prints_the_record_path(run_cli, tmp_results, workdir):
    code, out, err = run_cli(["run", *TINY, "--results", tmp_results])
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    path = tmp_results / "runs" / os.path.basename(lines[0])
    assert os.path.samefile(lines[0], path)
    record = json.loads(path.read_text())
    assert record["status"] == "ok"
    assert record["config"]["model"] == "vit-tiny" and record["config"]["rounds"] == 1
    assert _files(tmp_results) == [path]
    assert _files(workdir) == []

    # the second call is a cache hit with the same path
    code, again, _ = run_cli(["run", *TINY, "--results", tmp_results])
    assert code == 0 and again == out


def test_run_method_option(run_cli, tmp_results, workdir):
    argv = ["run", *TINY, "--results", tmp_results, "--method", "lora", "--lora-rank", "2"]
    code, out, err = run_cli(argv)
    assert code == 0, err
    record = json.loads(open(out.strip()).read())
    assert record["config"]["method"] == "lora"
    assert record["config"]["method_options"]["rank"] == 2


def test_failed_run_exits_1(run_cli, tmp_results, workdir, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory, pretend")

    monkeypatch.setattr(builtin, "execute", broken)
    code, out, err = run_cli(["run", *TINY, "--results", tmp_results])
    assert code == 1
    assert "run failed" in err and "out of memory, pretend" in err
    assert json.loads(open(out.strip()).read())["status"] == "failed"


def _garbage(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(b"\x00garbage, not a checkpoint" * 4)
    return path


BAD = [
    # (extra args, strings the one error line must hold)
    (["--model", "vit-huge"], ["'vit-huge'", "valid choices", "vit-tiny"]),
    (["--method", "lorra"], ["'lorra'", "valid choices", "lora"]),
    (["--dataset", "mnist"], ["'mnist'", "valid choices", "digits"]),
    (["--partition", "zipf:2"], ["'zipf:2'", "valid choices", "dirichlet:ALPHA"]),
    (["--partition", "dirichlet:0"], ["dirichlet alpha", "0"]),
    (["--partition", "dirichlet:-1"], ["dirichlet alpha", "-1"]),
    (["--partition", "shards:11"], ["shards:11", "10"]),
    (["--partition", "fewshot:100"], ["fewshot:100"]),
    (["--clients", "3", "--sample", "4"], ["sample", "4"]),
    (["--rounds", "0"], ["rounds", "0"]),
    (["--weights", "GARBAGE"], ["not a checkpoint", "x.pt"]),
    (["--weights", "MISSING"], ["does not exist", "nowhere.pth"]),
    (["--lora-rank", "4"], ["--lora-rank", "'lora'", "'bias'"]),
    (["--prompt-depth", "middle", "--method", "prompt"], ["'middle'", "valid choices"]),
    (["--clients", "x"], ["--clients", "'x'"]),
    (["--optimizer", "lbfgs"], ["'lbfgs'", "valid choices"]),
    (["--weights", "bogus-tag"], ["'bogus-tag'", "valid choices"]),
    pytest.param(["--seed", "-1"], ["seed", "-1"]),
    pytest.param(["--device", "foo"], ["'foo'"]),
]


def _id(case) -> str:
    return " ".join((case.values if hasattr(case, "values") else case)[0])


@pytest.mark.parametrize("extra, needles", BAD, ids=[_id(b) for b in BAD])
def test_bad_input_exits_2_with_one_line(run_cli, extra, needles, tmp_path, tmp_results, workdir):
    extra = [str(_garbage(tmp_path)) if a == "GARBAGE"
             else str(tmp_path / "nowhere.pth") if a == "MISSING" else a for a in extra]
    code, out, err = run_cli(["run", *TINY, *extra, "--results", tmp_results])
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fedtune: error: ")
    for needle in needles:
        assert needle in lines[0]
    assert "Traceback" not in err
    assert out == ""
    assert _files(tmp_results) == []
    assert _files(workdir) == []


def _params(argv, run_cli):
    code, out, err = run_cli(["params", *argv])
    assert code == 0, err
    return out


def test_params_table(run_cli):
    out = _params(["--model", "vit-tiny", "--classes", "10"], run_cli)
    lines = out.strip().splitlines()
    assert lines[0] == "vit-tiny, 10 classes"
    assert lines[1].split() == ["method", "trainable", "without", "head", "total", "%"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert set(rows) == set(tuning.METHODS)
    # head: a 64 -> 10 linear layer; full: every parameter (100 %)
    assert rows["head"][:2] == ["650", "0"]
    assert rows["full"][0] == rows["full"][2] and float(rows["full"][3]) == 100.0


def test_params_json(run_cli):
    report = json.loads(_params(["--model", "vit-tiny", "--classes", "10", "--json"], run_cli))
    assert report["model"] == "vit-tiny" and report["classes"] == 10
    methods = {r["method"]: r for r in report["methods"]}
    assert len(report["methods"]) == len(methods) == 6
    assert set(methods) == set(tuning.METHODS)
    totals = set()
    for r in report["methods"]:
        assert 0 < r["trainable"] <= r["total"]
        assert r["trainable_without_head"] == r["trainable"] - 650
        assert r["percent"] == pytest.approx(100 * r["trainable"] / r["total"])
        if r["method"] in ("full", "head", "bias"):
            totals.add(r["total"])  # methods that add no parameters share the total
    assert len(totals) == 1
    assert methods["full"]["trainable"] == methods["full"]["total"]
    assert methods["head"]["trainable_without_head"] == 0
    assert methods["lora"]["total"] > methods["full"]["total"]


def test_params_reference_counts_vit_b16(run_cli):
    report = json.loads(_params(["--model", "vit-b16", "--classes", "100", "--json"], run_cli))
    methods = {r["method"]: r for r in report["methods"]}
    assert methods["full"]["trainable"] == 85_875_556
    assert methods["bias"]["trainable_without_head"] == 102_912
    assert methods["head"]["trainable"] == 768 * 100 + 100


@pytest.mark.parametrize("argv, needle", [(["--model", "vit-huge", "--classes", "10"],
                                           "'vit-huge'"),
                                          (["--model", "vit-tiny", "--classes", "0"], "0"),
                                          (["--model", "vit-tiny"], "--classes")])
def test_params_bad_input(run_cli, argv, needle):
    code, out, err = run_cli(["params", *argv])
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err
    assert out == ""


def test_no_command_exits_2(run_cli):
    code, _, err = run_cli([])
    assert code == 2
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_console_script(tmp_results, tmp_path):
    exe = shutil.which("fedtune", path=os.path.dirname(sys.executable))
    assert exe, "the fedtune console script is not installed next to this python"
    env = dict(os.environ)  # conftest: HF_HUB_OFFLINE, TQDM_DISABLE, OMP_NUM_THREADS
    proc = subprocess.run([exe, "run", *TINY, "--results", str(tmp_results)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    path = proc.stdout.strip()
    assert os.path.isfile(path)
    assert json.loads(open(path).read())["status"] == "ok"
