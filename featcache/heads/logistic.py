"""``--heads logistic``: scikit-learn's L2 logistic regression on standardized features, C from a grid.

Each C of the grid (or the one ``--C`` gives) is fitted on train and scored
on val; the chosen fit is exported as its linear map (normalize, affine,
softmax), which is what ``head.pt`` stores. Multi-label targets are fitted
one-vs-rest: one regression per label on the rows where it is known, exported
as one linear map with a sigmoid per label.
"""

from __future__ import annotations

import numpy as np

from featcache.heads.base import FeatureNorm, Head, HeadSettings, LinearHead, register

DEFAULT_C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


@register
class LogisticHead(LinearHead, Head):
    """Standardize with train statistics, then scikit-learn's L2 logistic regression.

    Fitted here, it predicts with scikit-learn's model; exported or loaded, with
    its linear map (the same probabilities to float rounding).
    """

    kind = "logistic"
    help = "scikit-learn, C from a grid"
    takes_multilabel = True
    model_ = None  # scikit-learn's model, once fitted here

    def __init__(self, C: float = 1.0, class_weight: str = "none", max_iter: int = 200):
        super().__init__()
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter

    def fit(self, X: np.ndarray, y: np.ndarray, n_classes: int | None = None) -> "LogisticHead":
        """Fit on (X, y); the linear map covers ``n_classes`` (default: up to the largest label).

        (N, L) multi-label targets (NaN unknown) fit one regression per label.
        """
        self.norm_ = FeatureNorm("standard").fit(X)
        if np.ndim(y) == 2:
            return self._fit_one_vs_rest(self.norm_.transform(X), np.asarray(y, dtype=np.float64))
        self.model_ = self._model().fit(self.norm_.transform(X), y)
        self.n_classes_ = int(n_classes) if n_classes is not None else int(np.max(y)) + 1
        self.norm, self.weight, self.bias = self._linear_map(self.n_classes_)
        return self

    def _model(self):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(
            C=self.C,
            class_weight="balanced" if self.class_weight == "balanced" else None,
            max_iter=self.max_iter,
            # Newton steps with a D x D Cholesky: a handful of iterations on
            # cache-sized problems (D <= 4096), and tighter optima than lbfgs.
            solver="newton-cholesky",
        )

    def _fit_one_vs_rest(self, Z: np.ndarray, targets: np.ndarray) -> "LogisticHead":
        """One regression per label on its known rows; a label with one value known there predicts its rate."""
        weight = np.zeros((Z.shape[1], targets.shape[1]))
        bias = np.zeros(targets.shape[1])
        for j, column in enumerate(targets.T):
            known = ~np.isnan(column)
            t = column[known].astype(np.int64)
            if len(np.unique(t)) < 2:
                rate = np.clip(t.mean() if len(t) else 0.5, 1e-6, 1 - 1e-6)
                bias[j] = np.log(rate / (1 - rate))
                continue
            model = self._model().fit(Z[known], t)
            weight[:, j], bias[j] = model.coef_[0], model.intercept_[0]
        self.model_, self.n_classes_ = None, targets.shape[1]
        self.norm, self.weight, self.bias = self.norm_, weight.astype(np.float32), bias.astype(np.float32)
        self.multilabel = True
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        if self.model_ is None:
            return super().predict_proba(X)
        return self.model_.predict_proba(self.norm_.transform(X))

    def _linear_map(self, n_classes: int):
        coef, intercept = self.model_.coef_, self.model_.intercept_
        if coef.shape[0] == 1:  # binary: softmax([0, z]) is sigmoid(z)
            weight = np.stack([np.zeros(coef.shape[1]), coef[0]], axis=1)
            bias = np.array([0.0, intercept[0]])
        else:
            weight, bias = coef.T, intercept
        full_w = np.zeros((coef.shape[1], n_classes))
        full_b = np.full(n_classes, -1e9)  # a class absent from train is never predicted
        full_w[:, self.model_.classes_] = weight
        full_b[self.model_.classes_] = bias
        return self.norm_, full_w.astype(np.float32), full_b.astype(np.float32)

    def export(self, n_classes: int | None = None) -> "LogisticHead":
        """The fitted head as its linear map alone, over ``n_classes`` classes: what head.pt stores."""
        head = LogisticHead(self.C, self.class_weight, self.max_iter)
        if self.multilabel:
            head.norm, head.weight, head.bias, head.multilabel = self.norm, self.weight, self.bias, True
        else:
            head.norm, head.weight, head.bias = self._linear_map(n_classes or self.n_classes_)
        return head

    @classmethod
    def candidates(cls, train, val, n_classes, score, settings: HeadSettings):
        X, y = train
        Xv, yv = val
        class_weight = settings.class_weight or "none"
        out = []
        for c in (settings.C,) if settings.C is not None else DEFAULT_C_GRID:
            head = cls(C=c, class_weight=class_weight).fit(X, y, n_classes)
            out.append({
                "name": f"logistic_C_{c:g}_cw_{class_weight}",
                "params": {"C": c, "class_weight": class_weight, "norm": "standard"},
                "val_auroc": score(yv, head.predict_proba(Xv)),
                "rank": (-c,),  # smaller C = stronger regularization
                "export": (lambda h=head: h.export(n_classes)),
            })
        return out
