"""How fast a classifier head learns, per unit learning rate: CLIP's cosine head vs ViT's.

    .venv/bin/python benchmarks/clip_head.py            # the head study (seconds)
    .venv/bin/python benchmarks/clip_head.py --archs    # + norms of the full-size archs

Part 1 (``--archs``): at random initialisation of clip-vit-b32 and vit-b16 (no weights
here), the norms a head sees (feature and row norms) and how much one SGD step moves the
logits, per unit rate, under each head parametrisation.

Part 2: head-only training on features with real class structure: scikit-learn's digits
pixels, standardised and embedded isometrically into CLIP B/32's 512 (resp. ViT-B's 768)
dimensions. CLIP-like: unit-norm features, a zero-shot-like head (normalised noisy class
means) times a logit scale of 100. ViT-like: features of norm sqrt(D) (a LayerNorm's
output), a fresh head (trunc-normal, std 0.02). Heads:

- ``vit``: ``W f``, ``W`` fresh;
- ``clip-scaled-rows`` (this project before): ``W f^``, ``W = 100 t^`` (rows of norm 100);
- ``clip-unit-rms``: ``W (sqrt(D) f^)``, ``W = 100 t^ / sqrt(D)``: the
  same logits, features of a LayerNorm's per-element scale like ViT's;
- ``clip-fixed-scale``: ``100 f^ W^T``, ``W = t^`` (unit rows), the scale a constant:
  CLIP's own similarity, the rows in the text embeddings' place (this project now);
- ``clip-cosine``: ``100 f^ normalize(W)^T``: rows renormalised in every forward.

Each is trained for a few epochs with SGD (momentum 0.9) and AdamW over a log grid of
rates; the table gives test accuracy per rate, the best rate, and the accuracy at init.
"""

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F

RATES = [10.0 ** e for e in np.arange(-5, 0.01, 0.5)]
SCALE = 100.0  # OpenAI CLIP's logit scale


def _digits(dim: int, seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, x.shape[1])))
    x = x @ q.T  # isometric embedding into `dim` dimensions
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
    t = torch.tensor
    return t(xtr, dtype=torch.float32), t(ytr), t(xte, dtype=torch.float32), t(yte)


def _text_like(feats: torch.Tensor, labels: torch.Tensor, noise: float, seed: int = 0):
    """Zero-shot-like class directions: normalised class means plus noise."""
    g = torch.Generator().manual_seed(seed)
    unit = F.normalize(feats, dim=1)
    means = torch.stack([unit[labels == c].mean(0) for c in range(10)])
    means = F.normalize(means, dim=1)
    return F.normalize(means + noise * torch.randn(means.shape, generator=g) / math.sqrt(
        feats.shape[1]), dim=1)


def heads(kind: str, dim: int, text: torch.Tensor):
    """(parameters, logits function) of one head parametrisation."""
    if kind == "vit":
        w = torch.nn.init.trunc_normal_(torch.empty(10, dim), std=0.02).requires_grad_()
        return [w], lambda f: (math.sqrt(dim) * F.normalize(f, dim=1)) @ w.T
    if kind == "clip-scaled-rows":
        w = (SCALE * text).clone().requires_grad_()
        return [w], lambda f: F.normalize(f, dim=1) @ w.T
    if kind == "clip-unit-rms":
        w = (SCALE * text / math.sqrt(dim)).clone().requires_grad_()
        return [w], lambda f: (math.sqrt(dim) * F.normalize(f, dim=1)) @ w.T
    if kind == "clip-fixed-scale":
        w = text.clone().requires_grad_()
        return [w], lambda f: SCALE * F.normalize(f, dim=1) @ w.T
    if kind == "clip-cosine":
        w = text.clone().requires_grad_()
        return [w], lambda f: SCALE * F.normalize(f, dim=1) @ F.normalize(w, dim=1).T
    raise ValueError(kind)


def train(kind: str, optimizer: str, lr: float, data, text, epochs: int = 3,
          batch: int = 32) -> float:
    xtr, ytr, xte, yte = data
    params, logits = heads(kind, xtr.shape[1], text)
    opt = (torch.optim.SGD(params, lr=lr, momentum=0.9) if optimizer == "sgd"
           else torch.optim.AdamW(params, lr=lr, weight_decay=0.0))
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(ytr), generator=g).split(batch):
            loss = F.cross_entropy(logits(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        out = logits(xte)
        return float("nan") if not torch.isfinite(out).all() else (
            (out.argmax(1) == yte).float().mean().item())


def head_study() -> None:
    print("Part 2: head-only training on digits features; test accuracy after 3 epochs")
    print("(rate grid: 1e-5 .. 1 in half-decades; '-' = diverged)\n")
    for kind, dim in (("vit", 768), ("clip-scaled-rows", 512), ("clip-unit-rms", 512),
                      ("clip-fixed-scale", 512), ("clip-cosine", 512)):
        data = _digits(dim)
        text = _text_like(data[0], data[1], noise=3.0)
        params, logits = heads(kind, dim, text)
        with torch.no_grad():
            init = (logits(data[2]).argmax(1) == data[3]).float().mean().item()
        for optimizer in ("sgd", "adamw"):
            accs = [train(kind, optimizer, lr, data, text) for lr in RATES]
            best = int(np.nanargmax(accs))
            good = [r for r, a in zip(RATES, accs, strict=True) if a >= accs[best] - 0.02]
            cells = " ".join("   -" if math.isnan(a) else f"{a:4.2f}" for a in accs)
            print(f"{kind:<17}{optimizer:<6} init {init:4.2f} | {cells} | best {accs[best]:.3f}"
                  f" at {RATES[best]:.0e}; within 0.02 of it: {min(good):.0e}..{max(good):.0e}")
    print("\nrates:" + " ".join(f"{r:.0e}" for r in RATES))


def _step_moves(feats: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> float:
    """Mean |logit change| of one plain SGD step on the head ``logits = feats @ w.T``, per lr."""
    grad_w = (F.softmax(feats @ w.T, 1) - F.one_hot(y, w.shape[0])).T @ feats / len(y)
    return (feats @ grad_w.T).abs().mean().item()


def arch_study() -> None:
    from fedtune_core import models

    print("Part 1: full-size architectures at random init, 16 random images; CLIP with")
    print(f"OpenAI's logit scale s = {SCALE:g} (random init has 14.3)")
    names = [str(i) for i in range(10)]
    x = torch.randn(16, 3, 224, 224)
    y = torch.arange(16) % 10
    for name in ("vit-b16", "clip-vit-b32"):
        torch.manual_seed(0)
        model = models.build(name, names, "none").eval()
        with torch.no_grad():
            feats = model.encoder(x)
        w = model.head.weight.detach()
        if not model.normalize:
            print(f"{name}: feature norm {feats.norm(dim=1).mean():.1f}, head row norm "
                  f"{w.norm(dim=1).mean():.2f}; one SGD step moves the logits by "
                  f"{_step_moves(feats, w, y):.3g} x lr")
            continue
        unit = F.normalize(feats, dim=1)
        for label, f, rows in (("rows of norm s, unit features (before)", unit, SCALE * w),
                               ("unit rows, features of norm s (now)", SCALE * unit, w)):
            print(f"{name}, {label}: one SGD step moves the logits by "
                  f"{_step_moves(f, rows, y):.3g} x lr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", action="store_true", help="also part 1 (builds B/16, B/32)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.archs:
        arch_study()
        print()
    head_study()


if __name__ == "__main__":
    main()
