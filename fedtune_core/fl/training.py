"""The one training loop: the shared model, what trains in it, how it trains and evaluates.

Every mode and every engine trains through :class:`Trainer`: a fresh optimizer per call,
data order from the run's seed, evaluation in batches. What a client sends is the
trainable state, ``{name: tensor}`` (:meth:`Trainer.state`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedtune_core.config import RunConfig
from fedtune_core.errors import ConfigError
from fedtune_core.fl import data, models
from fedtune_core.fl.limits import Limits, Meter

State = dict[str, torch.Tensor]


def pick_device(device: str | None = None) -> torch.device:
    """``auto``/None: CUDA if available, else CPU; else the named device, checked.

    Raises:
        ConfigError: an unknown device name, or a CUDA device this machine does not have.
    """
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpus = torch.cuda.device_count()
    valid = ["auto", "cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(gpus)] if gpus else [])
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (
            dev.type == "cuda" and (dev.index or 0) >= gpus):
        raise ConfigError(f"unknown or unavailable device {device!r}; valid choices here: "
                          f"{', '.join(valid)}")
    return dev


def set_cpu_threads() -> int:
    """One intra-op thread per run process unless $FEDTUNE_THREADS says otherwise.

    On the 2-core machines we measured, two threads made a tiny model's training step 40-80x
    slower and a ViT-B/16 forward 1.4x slower than one (``benchmarks/threads.py``); CPU
    parallelism comes from running several runs at once (``fedtune grid --jobs``).
    """
    from fedtune_core.checks import threads as configured

    threads = configured()
    torch.set_num_threads(threads)
    return threads


@dataclass
class Client:
    """One client's own data: its local train and test splits (on the device)."""

    train: data.Split
    test: data.Split


class Trainer:
    """The shared model, what trains in it, and the loop every mode uses.

    When only the head trains (:attr:`encoder_frozen`), a run may encode its splits once and
    train on the features instead: :class:`fedtune_core.fl.features.HeadView` is this
    trainer's view for splits of features (same model, data order, batches, optimizer).

    ``amp``: forward passes under bf16 autocast (default: on CUDA only; True runs the same
    autocast path on the CPU, as the tests do). ``limits``: a rehearsal's caps
    (:class:`~fedtune_core.fl.limits.Limits`), with ``meter`` timing every training step and
    forward pass.
    """

    def __init__(self, model: models.Classifier, names: list[str], cfg: RunConfig,
                 device: torch.device, amp: bool | None = None, limits: Limits | None = None,
                 meter: Meter | None = None):
        self.model = model.to(device)
        self.params = {n: p for n, p in model.named_parameters() if n in set(names)}
        self.pre = data.Preprocess(model.input_size, model.mean, model.std,
                                   model.interpolation).to(device)
        self.cfg = cfg
        self.device = device
        self.amp = device.type == "cuda" if amp is None else amp
        self.limits = limits
        self.meter = meter

    @property
    def encoder_frozen(self) -> bool:
        """Only the head trains, so the encoder's output for an image never changes."""
        return all(n.startswith("head.") for n in self.params)

    def state(self) -> State:
        """A copy of the trainable tensors: what a client sends."""
        return {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def load(self, state: State) -> None:
        """Write a received state into the shared model."""
        for n, p in self.params.items():
            p.copy_(state[n])

    def _optimizer(self) -> torch.optim.Optimizer:
        params, cfg = list(self.params.values()), self.cfg
        if cfg.optimizer == "adamw":
            # foreach: the for-loop step's numbers, bitwise, in fewer ops (tests/test_fl.py)
            return torch.optim.AdamW(params, lr=cfg.resolved_lr, weight_decay=cfg.weight_decay,
                                     foreach=True)
        return torch.optim.SGD(params, lr=cfg.resolved_lr, momentum=0.9,
                               weight_decay=cfg.weight_decay)

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of images as model inputs (:class:`fedtune_core.fl.inputs.InputsView`:
        already done)."""
        return self.pre(images)

    def _logits(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.model(self._inputs(inputs)).float()

    def fit(self, split: data.Split, epochs: int, seed: Iterable[int]) -> float:
        """Train on ``split`` for ``epochs`` with a fresh optimizer; return the mean loss.

        ``seed`` (e.g. run seed, round, client) fixes the data order.
        """
        rng = np.random.default_rng(list(seed))
        return self.train_on(split, [rng.permutation(len(split)) for _ in range(epochs)])

    def train_on(self, split: data.Split, passes: list[np.ndarray]) -> float:
        """Train on ``split`` in the given sample order with a fresh optimizer; mean loss.

        Each array of ``passes`` (indices into ``split``) is cut into mini-batches on its own.
        """
        opt, bs = self._optimizer(), self.cfg.batch_size
        self.model.train()
        losses = []
        cap = self.limits.train_steps if self.limits else None
        for indices in passes:
            order = torch.as_tensor(indices, device=self.device)
            for start in range(0, len(order), bs):
                if cap is not None and len(losses) >= cap:
                    break
                t0 = self.meter.clock() if self.meter else 0.0
                idx = order[start:start + bs]
                loss = F.cross_entropy(self._logits(split.images[idx]), split.labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
                if self.meter:
                    self.meter.steps.append(self.meter.clock() - t0)
        return torch.stack(losses).mean().item()

    def _forward_timed(self, t0: float, images: int) -> None:
        self.meter.forward_seconds += self.meter.clock() - t0
        self.meter.forward_images += images

    @torch.inference_mode()
    def evaluate(self, split: data.Split, batch: int = 512) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) on ``split`` (a rehearsal: on its first samples)."""
        self.model.eval()
        if self.limits:
            split = data.Split(split.images[:self.limits.eval_samples],
                               split.labels[:self.limits.eval_samples])
        t0 = self.meter.clock() if self.meter else 0.0
        correct, loss = 0, 0.0
        for start in range(0, len(split), batch):
            logits = self._logits(split.images[start:start + batch])
            labels = split.labels[start:start + batch]
            correct += (logits.argmax(1) == labels).sum().item()
            loss += F.cross_entropy(logits, labels, reduction="sum").item()
        if self.meter:
            self._forward_timed(t0, len(split))
        return correct / len(split), loss / len(split)

    def per_client(self, clients: list[Client], which: str) -> np.ndarray:
        """Accuracy of the current model on each client's own ``train`` or ``test`` split."""
        return np.array([self.evaluate(getattr(c, which))[0] for c in clients])
