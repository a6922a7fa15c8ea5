"""How good a backbone is as a pre-trained model, measured on digits without training it.

* linear probe: a logistic regression on the frozen features that the classifier's head
  sees (through the model's own preprocessing), fitted on the digits training pool and
  scored on the digits test set; its regularisation is chosen by 5-fold cross-validation
  on the training pool, whose mean is reported as the validation accuracy;
* zero-shot (CLIP only): the head built from the text of ``"a photo of a {digit name}."``
  before any training, on the test set (and on the training pool, as validation).

Design decisions about pre-training are made on the validation numbers; the test numbers
are reported.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from fedtune_core.fl import data, models
from fedtune_core.proxy import objectives

# inverse regularisation strengths tried by the probe: weak features (random init) do best
# at the weak-regularisation end, so the grid reaches far enough for the CV to find it
PROBE_C = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


@torch.no_grad()
def features(clf: models.Classifier, images: torch.Tensor, batch: int = 512) -> np.ndarray:
    """The frozen features of uint8 images, as the head sees them."""
    pre = data.Preprocess(clf.input_size, clf.mean, clf.std, clf.interpolation)
    clf.eval()
    return torch.cat([clf.features(pre(images[s:s + batch]))
                      for s in range(0, len(images), batch)]).numpy()


@torch.no_grad()
def head_accuracy(clf: models.Classifier, split: data.Split, batch: int = 512) -> float:
    """Accuracy of the classifier as built (CLIP: zero-shot), without training."""
    pre = data.Preprocess(clf.input_size, clf.mean, clf.std, clf.interpolation)
    clf.eval()
    pred = torch.cat([clf(pre(split.images[s:s + batch])).argmax(1)
                      for s in range(0, len(split), batch)])
    return (pred == split.labels).float().mean().item()


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray) -> dict[str, float]:
    """Standardised logistic regression; C by 5-fold CV on train; scored on test.

    BLAS runs on one thread: with two on a busy 2-core machine, the fits took minutes
    instead of a second (the same spin-waiting as torch's, see ``fl.set_cpu_threads``).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    def pipe(c: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))

    # the weakest regularisation may stop at max_iter on poor features: a valid (if not
    # optimal) fit for that C, which the cross-validation then scores like any other
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        val = {c: cross_val_score(pipe(c), train_x, train_y, cv=5).mean() for c in PROBE_C}
        best = max(PROBE_C, key=lambda c: (val[c], -c))
        test = pipe(best).fit(train_x, train_y).score(test_x, test_y)
    return {"probe_acc": float(test), "probe_val_acc": float(val[best]), "probe_C": best}


def proxy_quality(model: str, weights: str | os.PathLike, seed: int = 0
                  ) -> dict[str, float | None]:
    """Linear probe (both families) and zero-shot accuracy (CLIP) of ``model`` on digits.

    ``weights`` goes through :func:`models.build` like any run's (e.g. a checkpoint file);
    ``seed`` initialises what the weights leave random (all of it for ``none``), without
    touching the caller's random state.
    """
    digits = data.load("digits")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clf = models.build(model, digits.class_names, str(weights))
    out: dict[str, float | None] = linear_probe(
        features(clf, digits.train.images), digits.train.labels.numpy(),
        features(clf, digits.test.images), digits.test.labels.numpy())
    zero_shot = objectives.OBJECTIVES[models.BACKBONES[model].family].zero_shot
    out["zeroshot_acc"] = head_accuracy(clf, digits.test) if zero_shot else None
    out["zeroshot_val_acc"] = head_accuracy(clf, digits.train) if zero_shot else None
    return out
