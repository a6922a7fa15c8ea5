"""Files are not trusted for what they claim to be (issue 19, part 2).

Image folders with links out of or back into the tree, pipes named like images, images of
every pixel mode (each decoded to 8-bit by one defined conversion, or refused in one line),
and records and locks that are not regular files (a folder, a pipe) or are too large: each
is refused in one line with exit code 2 and nothing written, or set aside and recomputed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_bad_inputs import TINY, _files, _images, _refused, _tiny_profile

from fedtune_core import cli
from fedtune_core.config import RunConfig
from fedtune_core.fl import builtin, data
from fedtune_core.runs import claims, store
from fedtune_core.study.profile import load_profile

ONE = dict(model="vit-tiny", weights="none", method="bias", dataset="digits", partition="iid",
           clients=2, sample=2, rounds=1, local_epochs=1, batch_size=64)


def _forbidden(*args, **kwargs):
    raise AssertionError("nothing may be computed")


# ---------------------------------------------------------------- image folders


@pytest.mark.parametrize("plant", ["loop back up", "link to a class", "link out of the tree",
                                   "linked image", "pipe named like an image"])
def test_imagefolder_links_and_pipes_are_refused_in_one_line(plant, run_cli, tmp_path,
                                                              monkeypatch):
    monkeypatch.setattr(builtin, "execute", _forbidden)
    root = tmp_path / "imgs"
    _images(root, {"cat": 6, "dog": 6})
    outside = tmp_path / "elsewhere"
    _images(outside, {"x": 6})
    if plant == "loop back up":
        (root / "cat" / "again").symlink_to(root)
    elif plant == "link to a class":
        (root / "dog" / "more").symlink_to(root / "cat")
    elif plant == "link out of the tree":
        (root / "cat" / "extra").symlink_to(outside / "x")
    elif plant == "linked image":
        (root / "dog" / "copy.png").symlink_to(root / "cat" / "0.png")
    else:
        os.mkfifo(root / "cat" / "99.png")
    out = tmp_path / "res"
    code, stdout, err = run_cli(["run", *TINY, "--dataset", f"imagefolder:{root}",
                                 "--results", out])
    needle = "not a regular file" if plant.startswith("pipe") else "symbolic link"
    _refused(code, stdout, err, [needle])
    assert _files(out) == []


def _png16(path: Path) -> None:
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(ramp).save(path)


def test_a_16_bit_image_is_scaled_not_clipped_to_two_levels(tmp_path):
    _png16(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    grey = np.asarray(data.decode_image(str(tmp_path / "deep.png")))
    assert grey.dtype == np.uint8 and grey.shape == (32, 32, 3)
    assert len(np.unique(grey)) > 200, "16-bit ramp kept its levels"
    assert grey[0, 0, 0] == 0 and grey[-1, -1, 0] == round(65472 * 255 / 65535)


@pytest.mark.parametrize("make, expected", [
    (lambda: Image.new("RGBA", (4, 4), (200, 100, 50, 128)), (100, 50, 25)),  # onto black
    (lambda: Image.new("LA", (4, 4), (200, 0)), (0, 0, 0)),  # fully transparent
    (lambda: Image.new("CMYK", (4, 4), (0, 255, 0, 0)), (255, 0, 255)),  # magenta
    (lambda: Image.new("1", (4, 4), 1), (255, 255, 255)),
])
def test_every_pixel_mode_has_one_defined_conversion(make, expected, tmp_path):
    path = tmp_path / "img.tiff"
    make().save(path)
    rgb = np.asarray(data.decode_image(str(path)))
    assert rgb.dtype == np.uint8 and tuple(rgb[0, 0]) == expected


def test_a_palette_image_gives_its_colours_and_flattens_its_transparency(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    img.save(tmp_path / "p.png")
    assert tuple(np.asarray(data.decode_image(str(tmp_path / "p.png")))[0, 0]) == (10, 20, 30)
    img.save(tmp_path / "t.png", transparency=1)
    assert tuple(np.asarray(data.decode_image(str(tmp_path / "t.png")))[0, 0]) == (0, 0, 0)


def test_an_image_without_a_defined_conversion_is_refused_in_one_line(run_cli, tmp_path):
    root = tmp_path / "imgs"
    _images(root, {"cat": 6, "dog": 6})
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(root / "dog" / "float.tiff")
    out = tmp_path / "res"
    code, stdout, err = run_cli(["run", *TINY, "--dataset", f"imagefolder:{root}",
                                 "--results", out])
    _refused(code, stdout, err, ["float.tiff", "pixel mode 'F'"])
    assert _files(out) == []


def test_a_16_bit_imagefolder_loads_with_its_grey_levels(tmp_path):
    root = tmp_path / "imgs"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(5):
            _png16(root / name / f"{i}.png")
    loaded = data.load(f"imagefolder:{root}", image_size=32)
    assert len(loaded.train) + len(loaded.test) == 10, "each image once"
    assert len(np.unique(loaded.train.images.numpy())) > 200


# ---------------------------------------------------------------- records and locks


def _kind(path: Path, kind: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "folder":
        path.mkdir()
    else:
        os.mkfifo(path)


@pytest.mark.parametrize("where", ["record", "lock"])
@pytest.mark.parametrize("kind", ["folder", "pipe"])
def test_run_refuses_a_record_or_lock_that_is_not_a_file_before_computing(
        where, kind, run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "execute", _forbidden)
    out = tmp_path / "res"
    path = store.record_path(out, RunConfig(**ONE))
    target = path if where == "record" else path.with_suffix(".lock")
    _kind(target, kind)
    code, stdout, err = run_cli(["run", *TINY, "--results", out])
    _refused(code, stdout, err, [f"is a {kind}, not a regular file", target.name])
    assert [p.name for p in out.rglob("*")] == ["runs", target.name], "nothing else written"


def test_grid_refuses_a_record_that_is_a_folder_before_computing_any_run(run_cli, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(builtin, "execute", _forbidden)
    profile = _tiny_profile(tmp_path, 'weights = "none"\npartition = "iid"\nclients = 2\n'
                                      "sample = 2\nbatch_size = 64")
    out = tmp_path / "res"
    cfg = load_profile(profile).runs()[-1]
    store.record_path(out, cfg).mkdir(parents=True)
    code, stdout, err = run_cli(["grid", "--profile", profile, "--results", out, "--jobs", "1",
                                 "--quiet"])
    assert code == 2, err
    assert err.strip().splitlines() == [err.strip()] and "is a folder" in err
    assert _files(out) == []


def test_a_pipe_among_records_is_named_not_read(tmp_path, capsys):
    pipe = tmp_path / "runs" / f"{RunConfig(**ONE).hash}.json"
    pipe.parent.mkdir()
    os.mkfifo(pipe)  # open() would block until a writer came
    assert store.read_record(pipe) is None
    assert store.load_records(tmp_path) == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "it is a pipe, not a regular file" in err[0]


def test_what_is_read_of_a_record_is_capped(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(store, "MAX_RECORD_BYTES", 1000)
    path = tmp_path / "runs" / f"{RunConfig(**ONE).hash}.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"padding": "x" * 5000}))
    assert store.read_record(path) is None
    assert "larger than 1,000 bytes" in capsys.readouterr().err


@pytest.mark.parametrize("round_value", ["one", 1.5, None, True])
def test_a_record_whose_round_is_not_a_number_is_named_and_counts_as_missing(
        round_value, tmp_path, tiny_config):
    cfg = tiny_config(rounds=1)
    record = claims.run(cfg, tmp_path)
    record["rounds"][0]["round"] = round_value
    why = store.problem(record, store.record_path(tmp_path, cfg))
    assert why is not None and "not a whole number" in why


def test_index_of_a_grid_is_not_blocked_by_a_pipe(tmp_path, capsys):
    out = tmp_path / "res"
    profile = _tiny_profile(tmp_path, 'weights = "none"\npartition = "iid"\nclients = 2\n'
                                      "sample = 2\nbatch_size = 64")
    cfg = load_profile(profile).runs()[0]
    pipe = store.record_path(out, cfg)
    pipe.parent.mkdir(parents=True)
    os.mkfifo(pipe)
    assert cli.main(["index", "--profile", str(profile), "--results", str(out)]) == 0
    assert cfg.hash in (out / "index.html").read_text(), "the run it could not read is named"
