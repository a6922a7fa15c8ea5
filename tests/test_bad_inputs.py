"""Bad input, table by table: exit code 2, exactly one line on stderr, nothing written.

Each case runs the ``fedtune`` command in-process (``cli.main``); the tables cover run
arguments (numbers, datasets, image folders, partitions, results folders, checkpoint
files), ``params`` and ``grid`` arguments, profiles, and a grid whose runs cannot start.
Diverged runs (a failed record, exit 1) and odd records (named once, recomputed) follow.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fedtune_core import cli
from fedtune_core.config import RunConfig
from fedtune_core.fl import builtin
from fedtune_core.runs import claims, store
from fedtune_core.study import grid, report

# the smallest run that still does everything: 2 clients, 1 round, tiny ViT on digits
ONE_ROUND = dict(model="vit-tiny", weights="none", method="bias", dataset="digits",
                 partition="iid", clients=2, sample=2, rounds=1, local_epochs=1, batch_size=64)

TINY = ["--model", "vit-tiny", "--weights", "none", "--method", "bias", "--dataset", "digits",
        "--partition", "iid", "--clients", "2", "--sample", "2", "--rounds", "1",
        "--batch-size", "64", "--device", "cpu", "--quiet"]


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def _refused(code: int, out: str, err: str, needles) -> str:
    """Assert exit 2 with exactly one 'fedtune: error:' line holding every needle."""
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fedtune: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


# ---------------------------------------------------------------- planted files


def _images(folder: Path, per_class: dict[str, int], broken: str | None = None) -> None:
    from PIL import Image

    for name, count in per_class.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (40 * i % 256, len(name) * 30, 0)).save(
                folder / name / f"{i}.png")
    if broken:
        (folder / broken).write_bytes(b"not a png at all")


def _checkpoint(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "unrelated":
        torch.save({"foo.weight": torch.zeros(3), "bar": torch.ones(2)}, path)
    elif kind == "shapes":  # vit-tiny's keys, wrong widths
        from fedtune_core.fl import models

        state = models.build("vit-tiny", ["a", "b"], "none").encoder.state_dict()
        torch.save({k: torch.zeros(*(s + 1 for s in v.shape)) for k, v in state.items()}, path)
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "empty":
        torch.save({}, path)
    elif kind == "json":
        path.write_text(json.dumps({"state_dict": {"a": 1}}))
    elif kind == "text":
        path.write_text("these are not weights\n")
    else:
        path.write_bytes(os.urandom(2048))
    return path


def _plant(tmp_path: Path, spec: str) -> str:
    """Replace placeholders: IMG:<layout>, CKPT:<kind>, FILE (a plain file)."""
    if spec.startswith("IMG:"):
        layout = spec[4:]
        folder = tmp_path / "images" / layout
        folder.mkdir(parents=True)
        if layout == "one_class":
            _images(folder, {"a": 6})
        elif layout == "few_images":
            _images(folder, {"a": 6, "b": 1})
        elif layout == "not_images":
            _images(folder, {"a": 6})
            (folder / "b").mkdir()
            (folder / "b" / "notes.txt").write_text("x")
        elif layout == "broken":
            _images(folder, {"a": 6, "b": 6}, broken="a/3.png")
        return f"imagefolder:{folder}"
    if spec.startswith("CKPT:"):
        return str(_checkpoint(tmp_path, spec[5:]))
    if spec.split("/")[0] == "FILE":
        path = tmp_path / "a_file"
        path.write_text("keep me")
        return str(path) + spec[len("FILE"):]
    return spec


RUN_CASES = [
    # (arguments, strings the one line must hold)
    (["--model", "nope"], ["'nope'", "valid choices", "vit-tiny"]),
    (["--lr", "nan"], ["lr", "finite", "nan"]),
    (["--lr", "inf"], ["lr", "finite", "inf"]),
    (["--lr", "0"], ["lr", "> 0"]),
    (["--weight-decay", "nan"], ["weight_decay", "finite"]),
    (["--weight-decay", "-1"], ["weight_decay", ">= 0"]),
    (["--local-test-fraction", "nan"], ["local_test_fraction", "finite"]),
    (["--local-test-fraction", "0"], ["local_test_fraction", "> 0"]),
    (["--local-test-fraction", "0.95"], ["local_test_fraction", "<= 0.9"]),
    (["--seed", str(2**32)], ["seed", "4294967295", str(2**32)]),
    (["--seed", str(2**64)], ["seed", str(2**64)]),
    (["--rounds", str(10**12)], ["rounds", "<= 10000"]),
    (["--clients", "20000", "--sample", "2"], ["clients", "<= 10000"]),
    (["--local-epochs", "100000"], ["local_epochs", "<= 1000"]),
    (["--batch-size", "0"], ["batch_size", ">= 1"]),
    (["--eval-every", "0"], ["eval_every", ">= 1"]),
    (["--method", "adapter", "--adapter-scale", "nan"], ["adapter scale", "finite"]),
    (["--method", "adapter", "--adapter-width", "0"], ["adapter width", ">= 1"]),
    (["--method", "lora", "--lora-alpha", "inf"], ["lora alpha", "finite"]),
    (["--method", "lora", "--lora-rank", "100000"], ["lora rank", "<= 4096"]),
    (["--method", "lora", "--lora-dropout", "nan"], ["lora dropout", "finite"]),
    (["--method", "prompt", "--prompt-tokens", "0"], ["prompt tokens", ">= 1"]),
    (["--dataset", "imagefolder:"], ["imagefolder needs a path"]),
    (["--dataset", "imagefolder:/nonexistent/x"], ["not a directory"]),
    (["--dataset", "IMG:one_class"], ["1 class folder", "at least 2"]),
    (["--dataset", "IMG:few_images"], ["has 1 image", "at least 5"]),
    (["--dataset", "IMG:not_images"], ["has 0 image", "at least 5"]),
    (["--dataset", "IMG:broken"], ["3.png", "cannot be read"]),
    (["--partition", "iid", "--clients", "1000"], ["1000 clients", "without test samples",
                                                  "fewer clients"]),
    (["--partition", "fewshot:200"], ["fewshot:200"]),
    (["--results", "FILE"], ["is a file", "--results"]),
    (["--results", "FILE/sub"], ["is a file", "--results"]),
    pytest.param(["--results", "/proc/fedtune-results"], ["not writable", "--results"],
                 marks=pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")),
    (["--weights", "CKPT:unrelated"], ["does not fit vit-tiny", "0 of", "keys", "missing (e.g.",
                                       "unexpected (e.g. 'foo.weight')"]),
    (["--weights", "CKPT:shapes"], ["does not fit vit-tiny", "of another shape (e.g."]),
    (["--weights", "CKPT:list"], ["is not a checkpoint", "a list"]),
    (["--weights", "CKPT:empty"], ["is not a checkpoint", "an empty dict"]),
    (["--weights", "CKPT:json"], ["is not a checkpoint"]),
    (["--weights", "CKPT:text"], ["is not a checkpoint"]),
    (["--weights", "CKPT:random"], ["is not a checkpoint"]),
]


def _case_id(case) -> str:
    return " ".join((case.values if hasattr(case, "values") else case)[0])


@pytest.mark.parametrize("extra, needles", RUN_CASES, ids=[_case_id(c) for c in RUN_CASES])
def test_run_refuses_bad_input_with_one_line(run_cli, extra, needles, tmp_path, workdir):
    planted = [_plant(tmp_path, a) for a in extra]
    if "--results" in extra:
        argv = ["run", *TINY, *planted]
        results_dir = Path(planted[planted.index("--results") + 1])
    else:
        results_dir = tmp_path / "results"
        argv = ["run", *TINY, *planted, "--results", results_dir]
    before = {p: p.read_bytes() for p in _files(tmp_path)}
    code, out, err = run_cli(argv)
    _refused(code, out, err, needles)
    assert out == ""
    assert {p: p.read_bytes() for p in _files(tmp_path)} == before, "nothing written"
    assert not results_dir.exists() or results_dir.is_file()


@pytest.mark.parametrize("argv, needles", [
    (["params", "--model", "vit-tiny", "--classes", "100000000000"], ["--classes", "100000"]),
    (["params", "--model", "vit-tiny", "--classes", "1e11"], ["--classes", "'1e11'"]),
    (["grid", "--jobs", "-3"], ["--jobs", "'-3'", "0 (automatic) to 256"]),
    (["grid", "--jobs", "x"], ["--jobs", "'x'"]),
    (["grid", "--profile", "smoke", "--results", "FILE"], ["is a file"]),
])
def test_other_commands_refuse_bad_arguments(run_cli, argv, needles, tmp_path, workdir):
    argv = [_plant(tmp_path, a) for a in argv]
    code, out, err = run_cli(argv)
    _refused(code, out, err, needles)
    assert out == "" and _files(workdir) == []


# ---------------------------------------------------------------- profiles

PROFILE_CASES = [
    # (profile text, strings the one line must hold besides the file name)
    ("seeds = [0\n[base\n", ["not valid TOML", "line"]),
    ('[lr]\nhead = "fast"\n', ["lr.head", "finite number > 0", "'fast'"]),
    ("[lr]\nhed = 0.1\n", ["lr.hed", "unknown tuning method 'hed'", "head"]),
    ("[lr]\nhead = nan\n", ["lr.head", "nan"]),
    ("seeds = 5\n", ["seeds", "list of integers", "got 5"]),
    ("seeds = [-1]\n", ["seeds", "4294967295"]),
    ('pretrained = "yes"\n', ["pretrained", "true or false"]),
    ("description = 3\n", ["description", "a string"]),
    ('base = "x"\n', ["base", "a table"]),
    ('[variants]\nhead = "head"\n', ["variants.head", "table of run settings", "'head'"]),
    ("bogus = 1\n", ["unknown key(s) bogus", "valid keys"]),
    ('[tuning_methods]\nmodel = "vit-tiny"\n', ["tuning_methods", "list of blocks"]),
    ("[[few_shot]]\nmodel = []\n", ["model = []", "at least one value"]),
    ('[[few_shot]]\nclients = "5"\n', ["[[few_shot]] block 1", "clients", "integer"]),
    ("[[few_shot]]\nlr = nan\n", ["[[few_shot]] block 1", "lr", "finite"]),
    ("[[few_shot]]\nbogus = 1\n", ["[[few_shot]] block 1", "unknown config field(s) bogus"]),
    ('[[few_shot]]\nvariant = "nope"\n', ["unknown variant 'nope'"]),
    ('[[few_shot]]\nmethod_options = 3\n', ["method_options", "table"]),
    ("[[few_shot]]\nseed = 4294967296\n", ["seed", "4294967295"]),
]


@pytest.mark.parametrize("text, needles", PROFILE_CASES, ids=[c[0][:30] for c in PROFILE_CASES])
def test_bad_profile_is_one_line_naming_file_and_key(run_cli, text, needles, tmp_path, workdir):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    line = _refused(*run_cli(["grid", "--profile", path, "--dry-run"]), needles)
    assert str(path) in line
    assert _files(workdir) == []


def test_profile_that_is_not_text_is_one_line(run_cli, tmp_path):
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe\x00")
    _refused(*run_cli(["grid", "--profile", path, "--dry-run"]), [str(path), "read"])


# ---------------------------------------------------------------- a grid whose runs cannot start

def _tiny_profile(tmp_path: Path, base: str) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text('seeds = [0]\n[base]\nmodel = "vit-tiny"\ndataset = "digits"\n'
                    f'rounds = 1\n{base}\n[[tuning_methods]]\nmethod = ["head", "bias"]\n')
    return path


@pytest.mark.parametrize("base, needles", [
    ('weights = "none"\npartition = "iid"\nclients = 1000\nsample = 2',
     ["1000 clients", "without test samples"]),
    ('weights = "CKPT:unrelated"', ["does not fit vit-tiny"]),
    ('weights = "CKPT:text"', ["is not a checkpoint"]),
])
def test_grid_checks_every_run_before_starting(run_cli, base, needles, tmp_path, workdir,
                                               monkeypatch):
    monkeypatch.setattr(builtin, "execute", _forbidden)
    base = base.replace('"CKPT:unrelated"', json.dumps(_plant(tmp_path, "CKPT:unrelated")))
    base = base.replace('"CKPT:text"', json.dumps(_plant(tmp_path, "CKPT:text")))
    out_dir = tmp_path / "res"
    code, out, err = run_cli(["grid", "--profile", _tiny_profile(tmp_path, base), "--results",
                            out_dir, "--jobs", "1", "--quiet"])
    _refused(code, out, err, needles)
    assert _files(out_dir) == []


def test_grid_offline_without_weights_stops_with_one_line(run_cli, tmp_path, workdir, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(builtin, "execute", _forbidden)
    monkeypatch.delenv("FEDTUNE_WEIGHTS_DIR", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    profile = tmp_path / "hub.toml"
    profile.write_text('seeds = [0]\n[base]\nmodel = "vit-b32"\nrounds = 1\n'
                       '[[tuning_methods]]\nmethod = ["head", "bias"]\n')
    out_dir = tmp_path / "res"
    code, out, err = run_cli(["grid", "--profile", profile, "--results", out_dir, "--quiet"])
    _refused(code, out, err, ["vit-b32", "FEDTUNE_WEIGHTS_DIR", "--weights", "HF_HUB_OFFLINE=1"])
    assert _files(out_dir) == []


def _forbidden(*args, **kwargs):
    raise AssertionError("no run may start")


# ---------------------------------------------------------------- diverged runs

def test_diverged_run_is_a_failed_record_kept_until_asked(run_cli, tmp_path, workdir, monkeypatch):
    calls = []
    real = builtin.execute
    monkeypatch.setattr(builtin, "execute", lambda *a, **k: calls.append(1) or real(*a, **k))
    argv = ["run", *TINY, "--rounds", "2", "--optimizer", "sgd", "--lr", "1e6", "--results",
            tmp_path / "res"]
    code, out, err = run_cli(argv)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "run failed: diverged at round 1" in err
    record = json.loads(Path(out.strip()).read_text())
    assert record["status"] == "failed" and record["failure"] == "diverged"
    assert record["diverged_round"] == 1 and record["rounds"] == [] and record["final"] == {}

    code, _, err = run_cli(argv)  # deterministic: kept, not run again
    assert code == 1 and "--retry-failed" in err and calls == [1]
    code, _, err = run_cli([*argv, "--retry-failed"])
    assert code == 1 and "diverged at round 1" in err and calls == [1, 1]


def test_diverged_run_appears_in_no_figure_or_verdict(tmp_path, tiny_config):
    ok = claims.run(tiny_config(rounds=1), tmp_path)
    bad = claims.run(tiny_config(rounds=1, seed=1, optimizer="sgd", lr=1e6), tmp_path)
    assert bad["failure"] == "diverged"
    runs, rounds = report.frames([ok, bad])
    assert list(runs["hash"]) == [ok["hash"]] and set(rounds["hash"]) == {ok["hash"]}
    header = report.header(grid.load_profile("smoke"), [ok, bad])
    assert "**1 failed**" in header and bad["hash"] in header and "diverged at round" in header
    table = report.findings(grid.load_profile("smoke"), {"tuning_methods": [ok, bad]})
    assert "1 failed run(s) left out" in table.set_index("finding").loc["F1", "evidence"]


# ---------------------------------------------------------------- odd records

@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> tuple[RunConfig, dict]:
    """One finished tiny run and its record, computed once for the table."""
    cfg = RunConfig(**ONE_ROUND)
    return cfg, claims.run(cfg, tmp_path_factory.mktemp("valid"))


def _without(record: dict, *keys: str) -> dict:
    out = json.loads(json.dumps(record))
    for key in keys:
        target = out
        *parents, last = key.split(".")
        for p in parents:
            target = target[p]
        del target[last]
    return out


def _diverged_ok(record: dict) -> dict:
    out = json.loads(json.dumps(record))
    for row in out["rounds"]:
        row["test_loss"] = None
    return out


RECORD_CASES = [
    # (what the file holds: a function of a valid record, words of the warning)
    (lambda r: {"schema": 1, "status": "ok"}, "hash"),
    (lambda r: [1, 2], "JSON list"),
    (lambda r: "a string", "JSON str"),
    (lambda r: None, "JSON NoneType"),
    (lambda r: _without(r, "config.model"), "lacks model"),
    (lambda r: _without(r, "config"), "no config"),
    (lambda r: r | {"schema": 2}, "schema 2"),
    (lambda r: r | {"status": "done"}, "status 'done'"),
    (lambda r: r | {"rounds": {"0": 1}}, "rounds"),
    (lambda r: r | {"final": []}, "final"),
    (lambda r: r | {"config": r["config"] | {"seed": 7}}, "hashes to"),
    (lambda r: r | {"config": r["config"] | {"lr": "fast"}}, "not valid"),
    (_diverged_ok, "diverged run recorded as ok"),
]
RAW_CASES = [("", "not valid JSON"), ('{"schema": 1, "status": "ok", "tr', "not valid JSON"),
             ("\xff", "not valid JSON")]


@pytest.mark.parametrize("content, words", RECORD_CASES + RAW_CASES)
def test_invalid_record_is_named_once_and_counts_as_missing(content, words, tmp_path, valid,
                                                            capsys):
    cfg, record = valid
    path = store.record_path(tmp_path, cfg)
    path.parent.mkdir()
    path.write_text(json.dumps(record))
    assert store.kept(tmp_path, cfg) == record, "the untouched record is valid"
    text = content if isinstance(content, str) else json.dumps(content(record))
    path.write_text(text)
    assert store.kept(tmp_path, cfg) is None and store.kept(tmp_path, cfg) is None
    assert store.load_records(tmp_path, status=None) == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and words in err[0], err
    assert err[0].startswith("fedtune: warning: ignoring run record")
    store.read_record(path)
    assert capsys.readouterr().err == "", "named once"


def test_index_and_grid_skip_an_invalid_record_and_recompute_it(tmp_path, capsys):
    out_dir = tmp_path / "res"
    argv = ["--profile", str(_tiny_profile(tmp_path, 'weights = "none"\npartition = "iid"\n'
                                           "clients = 2\nsample = 2\nbatch_size = 64")),
            "--results", str(out_dir)]
    assert cli.main(["grid", *argv, "--jobs", "1", "--quiet"]) == 0
    victim = sorted((out_dir / "runs").glob("*.json"))[0]
    victim.write_text(json.dumps([1, 2]))
    capsys.readouterr()
    assert cli.main(["index", *argv]) == 0
    err = capsys.readouterr().err
    assert err.count(str(victim)) == 1 and "JSON list" in err
    code = cli.main(["grid", *argv, "--jobs", "1", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "1 to run" in out
    assert store.read_record(victim)["status"] == "ok"
