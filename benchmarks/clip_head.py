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
            _print_row(kind, optimizer, init, [train(kind, optimizer, lr, data, text)
                                               for lr in RATES])
    print("\nrates:" + " ".join(f"{r:.0e}" for r in RATES))


def train_fedavg(kind: str, optimizer: str, lr: float, data, text, clients: int = 20,
                 sample: int = 5, rounds: int = 30, batch: int = 32) -> float:
    """FedAvg of the head alone (Dirichlet(0.5) clients, 1 local epoch, fresh optimizer)."""
    from fedtune_core.fl import fedavg, partition

    xtr, ytr, xte, yte = data
    params, logits = heads(kind, xtr.shape[1], text)
    parts = partition.split_clients(ytr.numpy(), "dirichlet:0.5", clients, 0, 0.0, 10).train
    sampler, g = np.random.default_rng(1), torch.Generator().manual_seed(0)
    state = [p.detach().clone() for p in params]
    for _ in range(rounds):
        updates = []
        for c in sampler.choice(clients, sample, replace=False):
            with torch.no_grad():
                for p, s in zip(params, state, strict=True):
                    p.copy_(s)
            opt = (torch.optim.SGD(params, lr=lr, momentum=0.9) if optimizer == "sgd"
                   else torch.optim.AdamW(params, lr=lr, weight_decay=0.0))
            idx_all = torch.as_tensor(parts[c])
            for idx in idx_all[torch.randperm(len(idx_all), generator=g)].split(batch):
                loss = F.cross_entropy(logits(xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            updates.append(({str(i): p.detach().clone() for i, p in enumerate(params)},
                            len(idx_all)))
        avg = fedavg.fedavg(updates)
        state = [avg[str(i)] for i in range(len(params))]
    with torch.no_grad():
        for p, s in zip(params, state, strict=True):
            p.copy_(s)
        out = logits(xte)
        return float("nan") if not torch.isfinite(out).all() else (
            (out.argmax(1) == yte).float().mean().item())


def fl_study() -> None:
    print("Part 3: the same heads trained by FedAvg (20 clients, Dirichlet(0.5), 5 a round,")
    print("30 rounds, 1 local epoch of ~2 steps, a fresh optimizer each round)\n")
    for kind, dim in (("vit", 768), ("clip-fixed-scale", 512)):
        data = _digits(dim)
        text = _text_like(data[0], data[1], noise=3.0)
        for optimizer in ("sgd", "adamw"):
            accs = [train_fedavg(kind, optimizer, lr, data, text) for lr in RATES]
            _print_row(kind, optimizer, float("nan"), accs)


def grad_study() -> None:
    """Per method and backbone: the relative step of one update per unit rate.

    SGD moves a tensor by lr * |g| / |w| relative to its norm; Adam (first step, bias-
    corrected) by lr * sqrt(n) / |w|. The median over a method's non-zero body tensors.
    """
    from fedtune_core import tuning
    from fedtune_core.fl import models

    print("Part 4: relative step per unit rate at random init (8 random images), median over")
    print("each method's body tensors (head excluded)\n")
    names = [str(i) for i in range(10)]
    x, y = torch.randn(8, 3, 224, 224), torch.arange(8) % 10
    table = {}
    for name in ("vit-b16", "clip-vit-b32"):
        for method in ("bias", "full", "prompt"):
            torch.manual_seed(0)
            model = models.build(name, names, "none")
            if model.normalize:
                model.feature_scale = SCALE
            trained = tuning.prepare(model, method)
            F.cross_entropy(model(x), y).backward()
            params = dict(model.named_parameters())
            rows = [(params[n].grad.norm() / params[n].norm(), params[n].numel() ** 0.5
                     / params[n].norm()) for n in trained
                    if not n.startswith("head.") and params[n].norm() > 0]
            sgd, adam = (float(np.median([r[i].item() for r in rows])) for i in (0, 1))
            table[name, method] = (sgd, adam)
    print(f"{'method':<9}{'SGD: ViT':>11}{'CLIP':>10}{'CLIP/ViT':>10}"
          f"{'Adam: ViT':>12}{'CLIP':>10}{'CLIP/ViT':>10}")
    for method in sorted({m for _, m in table}):
        (vs, va), (cs, ca) = table["vit-b16", method], table["clip-vit-b32", method]
        print(f"{method:<9}{vs:>11.3g}{cs:>10.3g}{cs / vs:>10.3g}{va:>12.3g}{ca:>10.3g}"
              f"{ca / va:>10.3g}")


def _print_row(kind: str, optimizer: str, init: float, accs: list[float]) -> None:
    best = int(np.nanargmax(accs))
    good = [r for r, a in zip(RATES, accs, strict=True) if a >= accs[best] - 0.02]
    cells = " ".join("   -" if math.isnan(a) else f"{a:4.2f}" for a in accs)
    print(f"{kind:<17}{optimizer:<6} init {init:4.2f} | {cells} | best {accs[best]:.3f}"
          f" at {RATES[best]:.0e}; within 0.02 of it: {min(good):.0e}..{max(good):.0e}")


def _step_moves(feats: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> float:
    """Mean |logit change| of one plain SGD step on the head ``logits = feats @ w.T``, per lr."""
    grad_w = (F.softmax(feats @ w.T, 1) - F.one_hot(y, w.shape[0])).T @ feats / len(y)
    return (feats @ grad_w.T).abs().mean().item()


def arch_study() -> None:
    from fedtune_core.fl import models

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
    parser.add_argument("--fl", action="store_true", help="also part 3 (FedAvg of the heads)")
    parser.add_argument("--grads", action="store_true", help="also part 4 (relative steps)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.archs:
        arch_study()
        print()
    head_study()
    if args.fl:
        print()
        fl_study()
    if args.grads:
        print()
        grad_study()


if __name__ == "__main__":
    main()
