"""A synthetic corpus of printed characters, generated at run time: pre-training data.

47 classes in the style of EMNIST-balanced (10 digits, 26 capitals, 11 lower-case letters
whose shape differs from their capital), drawn with 22 of the fonts that matplotlib ships.
Each (character, font) glyph is rendered once, scaled to fill its box; every image is then
an augmented copy, made in batches with torch: a random affine map plus an elastic wobble,
thinner or thicker strokes, one of three resolutions (half mimic optdigits: a 32x32 bitmap
summed in 4x4 blocks to 8x8 with 17 grey levels; 30% grey at 8-16 px; 20% blurred at 32 px),
contrast jitter and noise, 10% inverted, 15% tinted, and finally the same bicubic
upsampling to 32x32 that runs apply to small images. Images are ``uint8 (N, 3, 32, 32)``
like :class:`~fedtune_core.fl.data.Split`. The digits test images never enter: nothing here
reads a dataset. What defines a corpus (:class:`CorpusConfig`, the classes, the fonts) is
data in :mod:`fedtune_core.recipes`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedtune_core import files
from fedtune_core.fl.data import DIGIT_NAMES, Split
from fedtune_core.lock import Lock
from fedtune_core.recipes import CLASSES, FONTS, CorpusConfig

__all__ = ["CLASSES", "FONTS", "CorpusConfig", "class_name", "generate", "glyph_bank", "load",
           "pinned_threads"]

GLYPH_SIZE = 64  # glyphs are rendered (and thinned or thickened) at 64x64, then kept at 32x32
IMAGE_SIZE = 32
CHUNK = 4096  # images augmented per batch (part of the generator: changing it changes images)
# what the corpus and pre-training compute with: float sums split over threads round
# differently, so a thread count of the machine's would give other bytes under one hash
THREADS = 1


@contextlib.contextmanager
def pinned_threads(threads: int = THREADS) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` while the block runs, then restored:
    corpora and checkpoints are the same bytes whatever the machine or the command."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def class_name(label: int) -> str:
    """A readable name: ``seven`` for 7, ``capital A``, ``lowercase g``."""
    char = CLASSES[label]
    if char.isdigit():
        return DIGIT_NAMES[int(char)]
    return f"capital {char}" if char.isupper() else f"lowercase {char}"


@functools.cache
def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _render(char: str, font_file: str, size: int) -> np.ndarray:
    """One glyph, cropped to its ink and scaled (aspect kept) to fill a ``size`` box."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(_font_dir() / font_file), size=2 * size)
    canvas = Image.new("L", (4 * size, 4 * size), 0)
    ImageDraw.Draw(canvas).text((2 * size, 2 * size), char, fill=255, font=font, anchor="mm")
    glyph = canvas.crop(canvas.getbbox())
    scale = size / max(glyph.size)
    w, h = (max(1, round(s * scale)) for s in glyph.size)
    glyph = glyph.resize((w, h), Image.Resampling.LANCZOS)
    box = Image.new("L", (size, size), 0)
    box.paste(glyph, ((size - w) // 2, (size - h) // 2))
    return np.asarray(box, dtype=np.float32) / 255.0


@functools.cache
def glyph_bank(size: int = GLYPH_SIZE) -> torch.Tensor:
    """Every (class, font, stroke) glyph, ``float (classes, fonts, strokes, size, size)``.

    Strokes: eroded by 1 px, as drawn, dilated by 1 px, dilated by 2 px at ``size``; then
    each glyph is averaged down to the image size (anti-aliased).
    """
    bank = torch.from_numpy(np.stack([_render(c, f, size) for c in CLASSES for f in FONTS]))
    x = bank[:, None]
    strokes = [-F.max_pool2d(-x, 3, 1, 1), x, F.max_pool2d(x, 3, 1, 1), F.max_pool2d(x, 5, 1, 2)]
    small = F.avg_pool2d(torch.cat(strokes, 1), size // IMAGE_SIZE)
    return small.view(len(CLASSES), len(FONTS), len(strokes), IMAGE_SIZE, IMAGE_SIZE)


def _affine_grid(n: int, g: torch.Generator, deform: float) -> torch.Tensor:
    """Sampling grids: rotation, shear, scale with aspect, translation, elastic wobble.

    At ``deform=1``: rotation up to 0.25 rad, shear 0.3, scale 0.72-1, aspect up to
    exp(0.25), shifts up to 0.8 of the margin left by the scale, wobble up to 0.05. A
    milder set (about 0.6 of these ranges) made the ViT learn its first steps faster but
    probe digits worse on validation after 1,500 steps (0.910 against 0.944); ``deform``
    scales every range (a seconds-long test recipe uses a small one).
    """
    def u(half: float) -> torch.Tensor:  # uniform in [-half, half]
        return (2 * torch.rand(n, generator=g) - 1) * half * deform

    rot, shear = u(0.25), u(0.3)  # radians; x-shear
    scale, aspect = 1 - (u(0.14) + 0.14 * deform), torch.exp(u(0.25))
    sx, sy = 1 / (scale * aspect), aspect / scale  # output -> input, so the inverse scale
    cos, sin = torch.cos(rot), torch.sin(rot)
    a = torch.stack([torch.stack([cos * sx, (cos * shear - sin) * sy], -1),
                     torch.stack([sin * sx, (sin * shear + cos) * sy], -1)], 1)
    shift = torch.stack([u(0.8), u(0.8)], -1) * (1 - scale)[:, None]
    theta = torch.cat([a, -(a @ shift[:, :, None])], 2)
    grid = F.affine_grid(theta, [n, 1, IMAGE_SIZE, IMAGE_SIZE], align_corners=False)
    amount = (u(0.025) + 0.025 * deform)[:, None, None, None]  # 0 .. 0.05 * deform
    wobble = torch.randn(n, 2, 4, 4, generator=g) * amount
    wobble = F.interpolate(wobble, size=IMAGE_SIZE, mode="bilinear", align_corners=True)
    return grid + wobble.permute(0, 2, 3, 1)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur, one sigma per image (separable, as a grouped convolution)."""
    n, r = len(x), 3
    k = torch.exp(-(torch.arange(-r, r + 1.0)[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True))[:, None, None]  # (n, 1, 1, 2r+1)
    y = F.conv2d(F.pad(x.view(1, n, *x.shape[2:]), (r, r, 0, 0), mode="replicate"),
                 k, groups=n)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.transpose(2, 3), groups=n)
    return y.view_as(x)


def _finish(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Contrast or tint, noise, inversion on one resolution; uint8 RGB upsampled to 32.

    Half the grey images get a lower contrast (ink and background at least 0.3 apart) and
    noise; 15% of all images are tinted instead (ink and background colours at least 0.35
    apart in every channel); 10% are inverted.
    """
    n = len(x)

    def u(lo: float, hi: float, channels: int = 1) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, channels, 1, 1, generator=g)

    tint = torch.rand(n, 1, 1, 1, generator=g) < 0.15
    jitter = (torch.rand(n, 1, 1, 1, generator=g) < 0.5) & ~tint
    low, high = torch.where(jitter, u(0, 0.3), 0.0), torch.where(jitter, u(0.6, 1), 1.0)
    x = low + (high - low) * x
    x = x + torch.randn(x.shape, generator=g) * torch.where(jitter, u(0, 0.06), 0.0)
    x = torch.where(torch.rand(n, 1, 1, 1, generator=g) < 0.1, 1 - x, x).clamp(0, 1)
    bg = u(0, 0.45, 3)
    fg = (bg + u(0.35, 0.55, 3)).clamp(max=1)
    rgb = torch.where(tint, bg + (fg - bg) * x, x.expand(-1, 3, -1, -1))
    rgb = (rgb * 255).round()  # a uint8 image at its own resolution, as a dataset holds it
    if rgb.shape[-1] != IMAGE_SIZE:
        rgb = F.interpolate(rgb, size=IMAGE_SIZE, mode="bicubic", align_corners=False)
    return rgb.clamp(0, 255).round().to(torch.uint8)


def _resolutions(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Split a 32x32 batch into optdigits-like 8x8 (50%), grey 8-16 px (30%), blurred (20%)."""
    n = len(x)
    mode = torch.bucketize(torch.rand(n, generator=g), torch.tensor([0.5, 0.8]))
    side = torch.randint(8, 17, (n,), generator=g)
    sigma = 0.4 + 0.8 * torch.rand(n, generator=g)
    out = torch.empty(n, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    opt = mode == 0  # optdigits: binarise 32x32, count the ink in 4x4 blocks: 0..16 per pixel
    out[opt] = _finish(F.avg_pool2d((x[opt] > 0.3).float(), 4).mul(16).round() / 16, g)
    for s in side.unique().tolist():
        sel = (mode == 1) & (side == s)
        out[sel] = _finish(F.interpolate(x[sel], size=s, mode="area"), g)
    blur = mode == 2
    out[blur] = _finish(_blur(x[blur], sigma[blur]), g)
    return out


def _chunk(labels: torch.Tensor, g: torch.Generator, deform: float) -> torch.Tensor:
    """Augmented images of ``labels``: a random font and stroke (15% eroded, 35% as drawn,
    30% 1 px and 20% 2 px thicker at 64x64), deformed at 32x32."""
    n = len(labels)
    fonts = torch.randint(0, len(FONTS), (n,), generator=g)
    strokes = torch.bucketize(torch.rand(n, generator=g), torch.tensor([0.15, 0.5, 0.8]))
    glyphs = glyph_bank()[labels, fonts, strokes][:, None]
    x = F.grid_sample(glyphs, _affine_grid(n, g, deform), mode="bilinear", padding_mode="zeros",
                      align_corners=False)
    return _resolutions(x, g)


def generate(cfg: CorpusConfig, progress: bool = False) -> Split:
    """Generate the corpus of ``cfg``: balanced labels in a random order, deterministic.

    Args:
        cfg: size and seed.
        progress: show a tqdm bar on stderr.
    """
    from tqdm import tqdm

    g = torch.Generator().manual_seed(cfg.seed)
    reps = math.ceil(cfg.size / len(CLASSES))
    labels = torch.arange(len(CLASSES)).repeat(reps)[torch.randperm(reps * len(CLASSES),
                                                                    generator=g)][:cfg.size]
    images = torch.empty(cfg.size, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    with pinned_threads():
        for start in tqdm(range(0, cfg.size, CHUNK), desc="glyph corpus", unit="chunk",
                          disable=not progress, leave=False):
            part = labels[start:start + CHUNK]
            images[start:start + len(part)] = _chunk(part, g, cfg.deform)
    return Split(images, labels)


def load(cfg: CorpusConfig, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The corpus of ``cfg`` as numpy (images, labels), memory-mapped from the cache.

    Generated once (under a lock, so parallel processes share one) and written
    atomically, with a sidecar holding each file's sha256; a file whose content does not
    match its sidecar (or of the wrong shape) is never used: it is generated again. Temp
    files of a writer that was killed are removed by the next call.
    """
    stem = files.cache_dir() / "corpus" / f"glyphs-{cfg.hash}"
    paths = Path(f"{stem}-images.npy"), Path(f"{stem}-labels.npy")
    sidecar = Path(f"{stem}.json")
    files.clean_temps(sidecar.parent)  # what a killed writer left (only dead writers' files)
    if (found := _read(cfg, *paths, sidecar)) is not None:
        return found
    with Lock(Path(f"{stem}.lock")):
        if (found := _read(cfg, *paths, sidecar)) is None:
            split = generate(cfg, progress)
            digests = {}
            for path, array in zip(paths[::-1], (split.labels, split.images), strict=True):
                with files.staged(path, array.numpy().nbytes) as tmp, open(tmp, "wb") as f:
                    np.save(f, array.numpy())
                digests[path.name] = _sha256(path)
            with files.staged(sidecar) as tmp:
                tmp.write_text(json.dumps({"corpus": cfg.hash, "sha256": digests}, indent=1))
            found = _read(cfg, *paths, sidecar)
    return found


def _read(cfg: CorpusConfig, images: Path, labels: Path,
          sidecar: Path) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        digests = json.loads(sidecar.read_text())["sha256"]
        if any(digests.get(p.name) != _sha256(p) for p in (images, labels)):
            return None
        x, y = np.load(images, mmap_mode="r"), np.load(labels)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    size = (cfg.size, 3, IMAGE_SIZE, IMAGE_SIZE)
    return (x, y) if x.shape == size and y.shape == (cfg.size,) else None


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime: int, inode: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    """The file's sha256 (read once per process and version of the file)."""
    st = path.stat()
    return _sha256_of(str(path), st.st_size, st.st_mtime_ns, st.st_ino)
