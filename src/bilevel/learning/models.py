"""Hyperparameter-learning bilevel problems: ridge, ℓ2-logistic regression, data hypercleaning.

Each model has one lower-level problem, the regularised training loss as a finite sum,

    h(w, θ) = (1/N) Σ_j c_j(θ) ℓ(w; x_j, y_j) + Ω(w, θ),

and the upper-level loss is the mean validation loss f(w) = (1/N_val) Σ_j ℓ(w; x^val_j, y^val_j).
Ridge and logistic regression use one log-strength per feature, λ_k = exp(θ_k):

    Ω(w, θ) = ½ Σ_k exp(θ_k) Σ_c w_{kc}²,   c_j ≡ 1;

hypercleaning learns one weight per training sample, c_j(θ) = σ(θ_j), with a fixed ℓ2 term.

Conventions of :class:`bilevel.BilevelProblem`: ``x`` has shape ``(B, *event_shape)`` (``B = 1``
for the one training problem; ``B > 1`` evaluates several candidate weights at once), the
training and validation data are closed over, and ``batch`` must be ``None``.

:class:`FiniteSumModel` also exposes the lower level as a finite sum for stochastic solvers:
``train_loss(w, θ, index)`` is the mean loss over the training samples ``index`` plus the full
regulariser, so that its expectation over uniformly drawn indices is h(w, θ); the model's
``problem`` carries it (and ``val_loss``) as its :class:`~bilevel.problem.FiniteSum`
(``n_lower = n_train``, ``n_upper = n_val``).

The upper-level criterion is an object given at construction: :class:`HeldOut` (the default,
the mean loss on the validation rows) or :class:`CrossValidation` (K folds of the training
rows, as K lower-level instances). A model and its problem do not change after construction,
except for the values of θ and the storage of the dense features
(:meth:`FiniteSumModel.store_features`: row- or column-major, the same values). Features may be
dense or sparse (``torch.sparse_csr``; products use sparse-dense matmul, differentiable twice).
Computations run in the dtype and on the device of ``X_train``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel.learning.datasets import (
    _check_labels,
    column_major,
    is_sparse,
    select_rows,
    to_csr,
)
from bilevel.problem import BilevelError, BilevelProblem, FiniteSum, NonFiniteError

__all__ = [
    "CrossValidation",
    "FiniteSumModel",
    "HeldOut",
    "HypercleaningModel",
    "LogisticModel",
    "RidgeModel",
    "accuracy",
    "corrupt_labels",
    "hypercleaning_model",
    "hypercleaning_problem",
    "logistic_model",
    "logistic_problem",
    "predict_logistic",
    "ridge_hypergradient",
    "ridge_model",
    "ridge_mu",
    "ridge_objective",
    "ridge_problem",
    "ridge_solution",
]

Index = Tensor | Sequence[int] | None

# Largest eigenvalue of the Hessian of one sample's loss w.r.t. its score(s): ½(z−y)² → 1,
# softplus(z) − yz → σ(1−σ) ≤ ¼, softmax cross-entropy → diag(p) − ppᵀ ≤ ½ I.
_LOSS_CURVATURE = {"squared": 1.0, "binary": 0.25, "multinomial": 0.5}

# Automatic data-curvature computation for ridge: only when the d×d Gram matrix is cheap.
_GRAM_MAX_FEATURES = 4096
_GRAM_MAX_FLOPS = 2e10


# --------------------------------------------------------------------------------------------
# Upper-level criteria
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOut:
    """Upper level: the mean loss on the model's validation rows, f(w) = mean_j ℓ(w; x^val_j)."""


@dataclass(frozen=True, eq=False)
class CrossValidation:
    """Upper level: the K-fold cross-validation loss over the model's training rows.

    The model gets K lower-level instances whose ``batch`` is the fold index: instance k is
    trained on the rows outside fold k and validated on fold k, so the batch-mean upper loss
    (and hypergradient) is that of the mean of the K fold losses. There is no minibatch access
    (SID does not apply). ``folds``: (K ≥ 2, N) boolean masks of the rows of each fold.
    """

    folds: Tensor

    def __post_init__(self) -> None:
        folds = self.folds
        if not (
            isinstance(folds, Tensor)
            and folds.dtype == torch.bool
            and folds.dim() == 2
            and folds.shape[0] >= 2
        ):
            raise BilevelError("folds must be a (K ≥ 2, N) boolean mask")
        sizes = folds.sum(dim=1)
        if bool((sizes == 0).any()) or bool((sizes == folds.shape[1]).any()):
            raise BilevelError("every fold must hold some rows and leave some for training")

    @classmethod
    def from_splitter(cls, splitter: Any, n: int, y: Any = None) -> CrossValidation:
        """The folds of a scikit-learn splitter (``KFold``, ``StratifiedKFold``, ...): fold k
        is the test part of its k-th split of ``n`` rows (labels ``y`` for stratification)."""
        splits = list(splitter.split(np.zeros((n, 1)), y))
        masks = torch.zeros(len(splits), n, dtype=torch.bool)
        for k, (_, test) in enumerate(splits):
            masks[k, torch.as_tensor(np.asarray(test), dtype=torch.int64)] = True
        return cls(masks)


Criterion = HeldOut | CrossValidation


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_features(X: Tensor, name: str, n_features: int | None = None) -> Tensor:
    if not isinstance(X, Tensor):
        raise BilevelError(f"{name} must be a tensor, got {type(X).__name__}")
    if X.dim() != 2:
        raise BilevelError(f"{name} must be 2-D (samples, features), got shape {tuple(X.shape)}")
    if not X.is_floating_point():
        raise BilevelError(f"{name} must be floating point (float32 or float64), got {X.dtype}")
    if X.shape[0] == 0:
        raise BilevelError(f"{name} has no samples")
    if n_features is not None and X.shape[1] != n_features:
        raise BilevelError(
            f"{name} has {X.shape[1]} features but the training data have {n_features}"
        )
    if is_sparse(X):
        X = to_csr(X)
    values = X.values() if is_sparse(X) else X
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteError(f"{name} contains NaN or infinite values")
    return X


def _check_targets(y: Tensor, n: int, name: str, n_classes: int | None, like: Tensor) -> Tensor:
    if not isinstance(y, Tensor):
        raise BilevelError(f"{name} must be a tensor, got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != n:
        raise BilevelError(f"{name} must have shape ({n},) (one per sample), got {tuple(y.shape)}")
    if y.device != like.device:
        raise BilevelError(f"{name} is on {y.device} but the features are on {like.device}")
    if n_classes is not None:
        return _check_labels(y, n_classes, name)
    if not y.is_floating_point():
        y = y.to(like.dtype)
    if not bool(torch.isfinite(y).all()):
        raise NonFiniteError(f"{name} contains NaN or infinite values")
    return y.to(like.dtype)


def _cross_entropy_loss(n_classes: int | None, *ys: Tensor) -> tuple[int, str]:
    """(K, loss) of a classifier: K given (an integer ≥ 2) or inferred from the labels ``ys``,
    and the binary (K = 2) or multinomial cross-entropy."""
    if n_classes is not None and (not isinstance(n_classes, int) or n_classes < 2):
        raise BilevelError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    if n_classes is None:
        n_classes = max(2, max(int(y.max()) for y in ys if y.numel()) + 1)
    return n_classes, "binary" if n_classes == 2 else "multinomial"


def _as_index(index: Index, n: int, device: torch.device, what: str) -> Tensor | None:
    """A validated int64 index tensor into ``n`` samples (``None`` = all)."""
    if index is None:
        return None
    if isinstance(index, slice):
        return torch.arange(n, device=device)[index]
    if not isinstance(index, Tensor):
        index = torch.as_tensor(index)
    if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
        raise BilevelError(f"{what} index must hold integers, got dtype {index.dtype}")
    if index.dim() != 1 or index.numel() == 0:
        raise BilevelError(f"{what} index must be a non-empty 1-D tensor of sample indices")
    index = index.to(device=device, dtype=torch.int64)
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= n:
        raise BilevelError(f"{what} index out of range [0, {n}): min {lo}, max {hi}")
    return index


def _matmul(X: Tensor, M: Tensor) -> Tensor:
    """X @ M for dense or CSR X (twice differentiable in M)."""
    return X @ M.contiguous() if is_sparse(X) else X @ M


def _rows(X: Tensor, idx: Tensor | None) -> Tensor:
    """:func:`select_rows` for reading: a contiguous run of rows of a dense X (the block of a
    data-parallel process, :mod:`bilevel.distributed`) is a view, not a copy (gathering 3·10⁵
    rows of 20 features took 55 ms, the product with them 3 ms)."""
    if idx is not None and idx.numel() > 1 and idx.device.type == "cpu" and not is_sparse(X):
        start, n = int(idx[0]), idx.numel()
        if int(idx[-1]) - start == n - 1 and bool((idx.diff() == 1).all()):
            return X.narrow(0, start, n)
    return select_rows(X, idx)


def _xt_v(X: Tensor, v: Tensor) -> Tensor:
    """Xᵀ v in float64 for dense or CSR X, v of shape (N,)."""
    if not is_sparse(X):
        return X.to(torch.float64).T @ v.to(torch.float64)
    crow = X.crow_indices()
    rows = torch.repeat_interleave(torch.arange(X.shape[0], device=crow.device), crow.diff())
    out = torch.zeros(X.shape[1], dtype=torch.float64, device=crow.device)
    out.index_add_(0, X.col_indices(), X.values().to(torch.float64) * v.to(torch.float64)[rows])
    return out


def _squared_entries(X: Tensor) -> Tensor:
    """X ⊙ X, dense or CSR."""
    if not is_sparse(X):
        return X * X
    X = to_csr(X)
    values = X.values()
    return torch.sparse_csr_tensor(
        X.crow_indices(),
        X.col_indices(),
        values * values,
        X.shape,
        dtype=values.dtype,
        check_invariants=False,
    )


def _gram(X: Tensor, chunk: int = 8192) -> Tensor:
    """XᵀX in float64, accumulated over row chunks (sparse chunks are densified)."""
    d = X.shape[1]
    G = torch.zeros(d, d, dtype=torch.float64, device=X.device)
    for start in range(0, X.shape[0], chunk):
        idx = torch.arange(start, min(start + chunk, X.shape[0]), device=X.device)
        Xc = select_rows(X, idx)
        Xc = (Xc.to_dense() if is_sparse(Xc) else Xc).to(torch.float64)
        G += Xc.T @ Xc
    return G


def _spectral_norm_sq(X: Tensor, iters: int = 50, seed: int = 0) -> float:
    """Estimate of ‖X‖₂² = λ_max(XᵀX) by power iteration (a lower estimate)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(X.shape[1], 1, generator=gen, dtype=torch.float64).to(X.device)
    v /= v.norm()
    est = 0.0
    Xd = X if is_sparse(X) else X.to(torch.float64)
    for _ in range(iters):
        u = _matmul(Xd, v.to(Xd.dtype)).to(torch.float64)
        w = _xt_v(Xd, u[:, 0])[:, None]  # Xd: converted once, not per iteration
        est = float(w.norm())
        if est == 0.0:
            return 0.0
        v = w / est
    return est


# --------------------------------------------------------------------------------------------
# The finite-sum model
# --------------------------------------------------------------------------------------------


class FiniteSumModel:
    """Lower level h(w, θ) = (1/N) Σ_j c_j(θ) ℓ_j(w) + Ω(w, θ) and upper level f = validation loss.

    Subclasses fix the loss ℓ, the sample weights c_j(θ) and the regulariser Ω.

    Attributes:
        X_train, y_train, X_val, y_val: the data (features dense or CSR).
        loss: ``"squared"``, ``"binary"`` (logistic, labels {0, 1}) or ``"multinomial"``.
        n_train, n_val, n_features, n_classes: sizes (``n_classes`` is ``None`` for ridge).
        fit_intercept: whether w carries a bias (the last row of w).
        event_shape: shape of one w: (p,) or (p, K) with p = d (+1 with an intercept).
        theta: the learnable leaf tensor θ.
        problem: the :class:`BilevelProblem` (shares ``theta``; ``mu`` as documented by the
            subclass, valid at the initial θ or for θ ≥ ``theta_lower``; with a
            ``lipschitz_margin``, the Lipschitz bound margin · :meth:`smoothness` at the
            current θ).
        criterion: :class:`HeldOut` or :class:`CrossValidation` (then the validation rows
            given must be the training rows: every row validates once).
        folds: ``None``, or the (K, N) boolean fold masks of the cross validation.
    """

    loss: str

    def __init__(
        self,
        X_train: Tensor,
        y_train: Tensor,
        X_val: Tensor,
        y_val: Tensor,
        *,
        loss: str,
        n_classes: int | None,
        fit_intercept: bool,
        criterion: Criterion | None = None,
        lipschitz_margin: float | None = None,
    ) -> None:
        criterion = HeldOut() if criterion is None else criterion
        if not isinstance(criterion, (HeldOut, CrossValidation)):
            raise BilevelError(
                f"criterion must be HeldOut() or CrossValidation(folds), got {criterion!r}"
            )
        cross = isinstance(criterion, CrossValidation)
        if cross and (X_val is not X_train or y_val is not y_train):
            raise BilevelError(
                "cross validation validates on the training rows: pass them as the "
                "validation rows too (X_val = X_train, y_val = y_train)"
            )
        if lipschitz_margin is not None and not (
            math.isfinite(lipschitz_margin) and lipschitz_margin >= 1
        ):
            raise BilevelError(f"lipschitz_margin must be a number ≥ 1, got {lipschitz_margin!r}")
        self.criterion = criterion
        self.lipschitz_margin = lipschitz_margin
        self.X_train = _check_features(X_train, "X_train")
        self.n_train, self.n_features = (int(s) for s in self.X_train.shape)
        self.X_val = _check_features(X_val, "X_val", self.n_features)
        if self.X_val.dtype != self.X_train.dtype or self.X_val.device != self.X_train.device:
            raise BilevelError(
                f"X_val ({self.X_val.dtype}, {self.X_val.device}) must match X_train "
                f"({self.X_train.dtype}, {self.X_train.device})"
            )
        self.n_val = int(self.X_val.shape[0])
        self.loss = loss
        if loss == "squared":
            self.n_classes = None
        else:
            self.n_classes, _ = _cross_entropy_loss(n_classes, y_train, y_val)
        self.y_train = _check_targets(y_train, self.n_train, "y_train", self.n_classes, X_train)
        self.y_val = _check_targets(y_val, self.n_val, "y_val", self.n_classes, X_train)
        self.fit_intercept = bool(fit_intercept)
        p = self.n_features + int(self.fit_intercept)
        self.n_out = self.n_classes if self.loss == "multinomial" else 1
        self.event_shape: tuple[int, ...] = (p,) if self.n_out == 1 else (p, self.n_out)
        self._sq_norm: float | None = None
        self.folds: Tensor | None = None
        if isinstance(criterion, CrossValidation):
            self._set_folds(criterion.folds)

    def _set_folds(self, folds: Tensor) -> None:
        if folds.shape[1] != self.n_train:
            raise BilevelError(f"folds must be a (K ≥ 2, {self.n_train}) boolean mask")
        folds = folds.to(self.device)
        train = (~folds).to(self.dtype)
        sizes = folds.sum(dim=1)
        self.folds = folds
        self._train_weights = train / train.sum(dim=1, keepdim=True)
        self._val_weights = folds.to(self.dtype) / sizes.to(self.dtype)[:, None]
        self._rows_per_instance = int((~folds).sum(dim=1).min())

    # -- shapes ------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.X_train.dtype

    @property
    def device(self) -> torch.device:
        return self.X_train.device

    @property
    def sparse(self) -> bool:
        return is_sparse(self.X_train)

    def store_features(self, train: str = "column", val: str = "column") -> None:
        """Store the dense training and validation features ``"row"``- or ``"column"``-major
        (:func:`~bilevel.learning.datasets.column_major`): the same values, so every result is
        the same up to rounding; sparse features stay as they are. Full-batch products with
        one vector (the lower solvers' gradients and Hessian products, the validation loss)
        are 2–4× faster on column-major X, minibatch rows (SID) 4–5× cheaper to gather from
        row-major X. With folds the validation rows are the training rows (``train``'s)."""
        for layout in (train, val):
            if layout not in ("row", "column"):
                raise BilevelError(f"layout must be 'row' or 'column', got {layout!r}")
        shared = self.X_val is self.X_train
        self.X_train = column_major(self.X_train, train == "column")
        self.X_val = self.X_train if shared else column_major(self.X_val, val == "column")
        self._kept_rows = None  # rows gathered from the previous storage

    def init_w(self, n_instances: int = 1) -> Tensor:
        """Zero weights of shape (n_instances, *event_shape)."""
        return torch.zeros((n_instances, *self.event_shape), dtype=self.dtype, device=self.device)

    def _as_batch(self, w: Tensor) -> tuple[Tensor, bool]:
        """(B, *event) view of w and whether w was a single instance."""
        if not isinstance(w, Tensor):
            raise BilevelError(f"w must be a tensor, got {type(w).__name__}")
        ev = self.event_shape
        if tuple(w.shape) == ev:
            return w.unsqueeze(0), True
        if w.dim() == len(ev) + 1 and tuple(w.shape[1:]) == ev:
            return w, w.shape[0] == 1
        raise BilevelError(
            f"w must have shape {ev} or (B, {', '.join(map(str, ev))}), got {tuple(w.shape)}"
        )

    # -- the pieces --------------------------------------------------------------------------

    def _scores(self, W: Tensor, X: Tensor) -> Tensor:
        """Scores of B weight vectors on the rows of X: (B, n) or (B, n, K) (multinomial)."""
        B, d, K = W.shape[0], self.n_features, self.n_out
        Wk = W.reshape(B, -1, K)
        M = Wk[:, :d, :].permute(1, 0, 2).reshape(d, B * K)
        Z = _matmul(X, M).reshape(X.shape[0], B, K).permute(1, 0, 2)
        if self.fit_intercept:
            Z = Z + Wk[:, d, :].unsqueeze(1)
        return Z if self.loss == "multinomial" else Z[..., 0]

    def _sample_losses(self, W: Tensor, X: Tensor, y: Tensor) -> Tensor:
        """ℓ(w_b; x_j, y_j), shape (B, n)."""
        Z = self._scores(W, X)
        if self.loss == "squared":
            return 0.5 * (Z - y) ** 2
        if self.loss == "binary":
            return F.softplus(Z) - y.to(Z.dtype) * Z
        picked = Z.gather(2, y.view(1, -1, 1).expand(Z.shape[0], -1, 1))[..., 0]
        return torch.logsumexp(Z, dim=2) - picked

    def _sample_weights(self, theta, index: Tensor | None) -> Tensor | None:
        """c_j(θ) for the samples ``index`` (``None``: all ones)."""
        return None

    def _train_rows(self, idx: Tensor | None) -> tuple[Tensor, Tensor]:
        """(X_train, y_train) rows ``idx`` (None: all). The last minibatch's rows are kept, so
        that SID's several energies on one minibatch (a variance-reduced gradient at the
        iterate and at the anchor, the Hessian diagonal) gather its rows once: the gather
        of 4096 of 120 000 rows of 300 float32 features costs more than a product with them.
        The rows are reused only for the same index tensor, with it and the data unmodified
        (their versions)."""
        if idx is None:
            return self.X_train, self.y_train
        versions = (idx._version, self.X_train._version, self.y_train._version)
        kept = getattr(self, "_kept_rows", None)
        if kept is not None and kept[0] is idx and kept[1] == versions:
            return kept[2], kept[3]
        rows = (_rows(self.X_train, idx), self.y_train.index_select(0, idx))
        self._kept_rows = (idx, versions, *rows)
        return rows

    def _prepare_rows(self, index: Tensor) -> None:
        """Gather the training rows of the minibatch ``index`` now (``FiniteSum.prepare``)."""
        self._train_rows(_as_index(index, self.n_train, self.device, "training"))

    def _regulariser(self, W: Tensor, theta) -> Tensor:
        """Ω(w_b, θ), shape (B,)."""
        raise NotImplementedError

    def _regulariser_diagonal(self, theta) -> Tensor:
        """a of the separable quadratic Ω = ½ Σ a_i w_i², shaped like one w (detached)."""
        raise NotImplementedError

    def check_theta(self, theta) -> Tensor:
        """Validate the shape of θ; returns it."""
        return theta

    # -- finite-sum interface ----------------------------------------------------------------

    def train_loss(self, w: Tensor, theta: Tensor | None = None, index: Index = None) -> Tensor:
        """(1/|I|) Σ_{j∈I} c_j(θ) ℓ(w; x_j, y_j) + Ω(w, θ) over training samples I = ``index``.

        ``index=None`` uses all samples (then this equals h(w, θ)). Returns a scalar for one w
        (shape ``event_shape`` or ``(1, *event_shape)``), else one value per instance (B,).
        """
        theta = self.theta if theta is None else self.check_theta(theta)
        W, single = self._as_batch(w)
        idx = _as_index(index, self.n_train, self.device, "training")
        X, y = self._train_rows(idx)
        losses = self._sample_losses(W, X, y)
        c = self._sample_weights(theta, idx)
        data = (losses if c is None else losses * c).mean(dim=1)
        out = data + self._regulariser(W, theta)
        return out[0] if single else out

    def val_loss(self, w: Tensor, theta: Tensor | None = None, index: Index = None) -> Tensor:
        """(1/|I|) Σ_{j∈I} ℓ(w; x^val_j, y^val_j) over validation samples I (default all).

        θ does not enter the validation loss; the argument keeps the finite-sum signature.
        """
        W, single = self._as_batch(w)
        idx = _as_index(index, self.n_val, self.device, "validation")
        X = _rows(self.X_val, idx)
        y = self.y_val if idx is None else self.y_val.index_select(0, idx)
        out = self._sample_losses(W, X, y).mean(dim=1)
        return out[0] if single else out

    # -- BilevelProblem callables --------------------------------------------------------------

    def _check_x(self, x: Tensor, batch) -> None:
        if self.folds is not None:
            ok = (
                isinstance(batch, Tensor)
                and batch.dtype == torch.int64
                and tuple(batch.shape) == (x.shape[0],)
                and bool(((batch >= 0) & (batch < len(self.folds))).all())
            )
            if not ok:
                raise BilevelError(
                    f"with {len(self.folds)} cross-validation folds, batch must be the (B,) "
                    "int64 fold index of each instance"
                )
        elif batch is not None:
            raise BilevelError(
                "this problem closes over its training data: batch must be None (use "
                "train_loss(w, theta, index) for minibatches)"
            )
        if not isinstance(x, Tensor) or tuple(x.shape[1:]) != self.event_shape or x.dim() < 1:
            raise BilevelError(
                f"x must have shape (B, {', '.join(map(str, self.event_shape))}), got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )

    def lower_energy(self, x: Tensor, theta, batch=None) -> Tensor:
        """h(x_b, θ) for each instance, shape (B,); with folds, instance b trains on the rows
        outside its fold ``batch[b]``."""
        self._check_x(x, batch)
        theta = self.check_theta(theta)
        losses = self._sample_losses(x, self.X_train, self.y_train)
        if self.folds is not None:
            data = (losses * self._train_weights[batch]).sum(dim=1)
        else:
            c = self._sample_weights(theta, None)
            data = (losses if c is None else losses * c).mean(dim=1)
        return data + self._regulariser(x, theta)

    def upper_loss(self, x: Tensor, theta, batch=None) -> Tensor:
        """f(x_b) = mean validation loss for each instance, shape (B,); with folds, the mean
        over the rows of fold ``batch[b]``."""
        self._check_x(x, batch)
        losses = self._sample_losses(x, self.X_val, self.y_val)
        if self.folds is not None:
            return (losses * self._val_weights[batch]).sum(dim=1)
        return losses.mean(dim=1)

    @property
    def n_instances(self) -> int:
        """Lower-level instances: 1, or K with cross-validation folds."""
        return 1 if self.folds is None else len(self.folds)

    def instance_batch(self) -> Tensor | None:
        """The ``batch`` of all instances: None, or the fold indices 0, …, K−1."""
        if self.folds is None:
            return None
        return torch.arange(len(self.folds), device=self.device)

    def lower_sample_energy(self, x: Tensor, theta, index: Tensor) -> Tensor:
        """ĥ(x_b, θ; I) = :meth:`train_loss` over the training samples ``index``, shape (B,).

        Unbiased for h(x_b, θ) when ``index`` is drawn uniformly (the problem's
        ``lower_sample_energy``, with ``n_lower_samples = n_train``).
        """
        self._check_x(x, None)
        return self.train_loss(x, self.check_theta(theta), index).reshape(x.shape[0])

    def lower_sample_diagonal(self, x: Tensor, theta, index: Tensor | None = None) -> Tensor:
        """diag ∇²_ww ĥ(x_b, θ; I): the Hessian diagonal of :meth:`train_loss` over the
        training samples ``index`` (``None``: all, i.e. of h), shape of x (B, *event_shape).

        For a score z = xᵀw_c (+ b_c) the data part is (1/|I|) Σ_j c_j(θ) s_jc x_jk², with s
        the loss curvature in the score (1; σ(z)(1 − σ(z)); p_c(1 − p_c) for the softmax), and
        the regulariser, a separable quadratic ½ Σ a_i w_i², adds a_i = ∂_i Ω(1). Costs about
        one minibatch gradient; the Jacobi preconditioner of SID's solvers. Detached.
        """
        if self.folds is not None:
            raise BilevelError("the sample Hessian diagonal needs a model without folds")
        self._check_x(x, None)
        theta = self.check_theta(theta)
        idx = _as_index(index, self.n_train, self.device, "training")
        X, _ = self._train_rows(idx)
        B, d, K = x.shape[0], self.n_features, self.n_out
        with torch.no_grad():
            Z = self._scores(x.detach(), X)
            if self.loss == "squared":
                S = torch.ones_like(Z)
            elif self.loss == "binary":
                s = torch.sigmoid(Z)
                S = s * (1 - s)
            else:
                p = torch.softmax(Z, dim=2)
                S = p * (1 - p)
            S = S.reshape(B, X.shape[0], K)
            c = self._sample_weights(theta, idx)
            if c is not None:
                S = S * c.detach()[None, :, None]
        S2 = S.permute(1, 0, 2).reshape(X.shape[0], B * K)
        X2 = _squared_entries(X)
        with torch.enable_grad():  # X2ᵀ S2 through the (sparse-capable) product's gradient
            M = torch.zeros(d, B * K, dtype=self.dtype, device=self.device, requires_grad=True)
            (data,) = torch.autograd.grad((_matmul(X2, M) * S2).sum(), M)
        data = data.reshape(d, B, K).permute(1, 0, 2) / X.shape[0]
        diag = torch.empty(B, d + int(self.fit_intercept), K, dtype=self.dtype, device=self.device)
        diag[:, :d] = data
        if self.fit_intercept:
            diag[:, d] = S.mean(dim=1)
        return diag.reshape(x.shape) + self._regulariser_diagonal(theta)

    def lower_sample_hessian(self, x: Tensor, theta, index: Tensor | None = None) -> SampleHessian:
        """The minibatch gradient and Hessian of ĥ(x, θ; I) = :meth:`train_loss` over the
        training samples ``index`` (``None``: all, i.e. of h) at the fixed point (x, θ), in
        closed form (:class:`SampleHessian`): SID's ``sample_hessian``. Needs a model without
        folds."""
        if self.folds is not None:
            raise BilevelError("the sample Hessian needs a model without folds")
        self._check_x(x, None)
        return SampleHessian(self, x, self.check_theta(theta), index)

    def upper_sample_loss(self, x: Tensor, theta, index: Tensor) -> Tensor:
        """f̂(x_b; I) = :meth:`val_loss` over the validation samples ``index``, shape (B,)."""
        self._check_x(x, None)
        return self.val_loss(x, theta, index).reshape(x.shape[0])

    def _upper_penalty(self) -> Callable[[Tensor], Tensor] | None:
        """r(θ) added to the upper level (none by default)."""
        return None

    def _make_problem(self, mu: float) -> None:
        """The problem, once, at the end of the constructor: minibatch access without folds,
        the Lipschitz bound with a margin."""
        finite_sum = None
        if self.folds is None:
            finite_sum = FiniteSum(
                self.lower_sample_energy,
                self.n_train,
                self.upper_sample_loss,
                self.n_val,
                prepare=self._prepare_rows,
            )
        self.problem = BilevelProblem(
            self.lower_energy,
            self.upper_loss,
            self.theta,
            mu=mu,
            upper_regulariser=self._upper_penalty(),
            lipschitz=None if self.lipschitz_margin is None else self.lipschitz_bound,
            finite_sum=finite_sum,
        )

    def lipschitz_bound(self) -> float:
        """L(θ) = margin · :meth:`smoothness` at the current θ: the stated Lipschitz bound of
        ∇_w h, so that solvers take steps 1/L(θ) without estimating it at every call (‖X‖₂² is
        computed once, by power iteration: an estimate from below, hence the margin)."""
        margin = 1.0 if self.lipschitz_margin is None else self.lipschitz_margin
        return margin * self.smoothness()

    # -- constants -----------------------------------------------------------------------------

    def mu(self, theta: Tensor | None = None) -> float:
        """A strong-convexity modulus of h(·, θ)."""
        raise NotImplementedError

    def _max_strength(self, theta) -> float:
        raise NotImplementedError

    def smoothness(self, theta: Tensor | None = None, certified: bool = False) -> float:
        """An upper bound L on the Lipschitz constant of ∇_w h(·, θ) (the largest eigenvalue).

        L ≤ c_ℓ · ‖[X 1]‖₂² / N + max regularisation strength, c_ℓ the loss curvature (1, ¼,
        ½), N the training rows (with folds: those of the smallest training part). With
        ``certified=False`` ‖X‖₂² comes from power iteration (an estimate, slightly low);
        ``certified=True`` uses the Frobenius norm ‖X‖_F² ≥ ‖X‖₂² (valid, often loose).
        """
        theta = self.theta if theta is None else self.check_theta(theta)
        if certified:
            vals = self.X_train.values() if self.sparse else self.X_train
            sq = float((vals.to(torch.float64) ** 2).sum())
        else:
            if self._sq_norm is None:
                self._sq_norm = _spectral_norm_sq(self.X_train)
            sq = self._sq_norm
        rows = self.n_train if self.folds is None else self._rows_per_instance
        data = sq / rows + (1.0 if self.fit_intercept else 0.0)
        return _LOSS_CURVATURE[self.loss] * data + self._max_strength(theta)


class SampleHessian:
    """∇_w ĥ(w, θ; I) and v ↦ Ĥ(w, θ; I) v of a :class:`FiniteSumModel` in closed form.

    With scores z_j = x_jᵀW (+ b) of the rows I, ĥ = (1/|I|) Σ_j c_j ℓ(z_j; y_j) + Ω(w, θ):

        ∇_w ĥ = Xᵀ G / |I| + a ⊙ w,    Ĥ v = Xᵀ (∇²_z ℓ [X v]) / |I| + a ⊙ v,

    G_j = c_j ∂_z ℓ (σ(z) − y, z − y, softmax(z) − onehot(y)), ∇²_z ℓ[u] = c_j s_j u_j
    (s = σ(1 − σ) or 1), or c_j (p ⊙ u − p (pᵀu)) for the softmax; the intercept's rows are
    the sums of G and of the curvature products; a is the diagonal of the separable
    quadratic Ω = ½ Σ a_i w_i² (:meth:`FiniteSumModel.lower_sample_diagonal` assumes the
    same). The same values as autograd's second derivatives of :meth:`train_loss`, with fewer
    passes over the rows: the scores of w and of a first vector v in one product, and the
    back-projections Xᵀ[G, ∇²ℓ[Xv]] in one (dense rows: ``F.linear`` with the vectors as
    rows, the fast layout of a tall product); autograd builds the gradient graph (two
    passes) and then differentiates it (two more). The rows are gathered once per index
    (:meth:`FiniteSumModel._train_rows`). Results are detached and shaped like w.
    """

    def __init__(self, model: FiniteSumModel, w: Tensor, theta: Tensor, index: Tensor | None):
        idx = _as_index(index, model.n_train, model.device, "training")
        self.model = model
        self.w = w.detach()
        self.X, y = model._train_rows(idx)
        self.rows = int(self.X.shape[0])
        c = model._sample_weights(theta, idx)
        self.c = None if c is None else c.detach()
        self.y = y
        self.a = model._regulariser_diagonal(theta)
        self._z: Tensor | None = None  # scores of w, (B, rows, K)
        self._grad: Tensor | None = None
        self._primed = False  # products leave the gradient to gradient()

    def _scores(self, vectors: Sequence[Tensor]) -> Tensor:
        """Scores of every vector (each shaped like w) on the rows, (m, B, rows, K), from one
        product with the data."""
        m, B = len(vectors), self.w.shape[0]
        d, K = self.model.n_features, self.model.n_out
        Wk = torch.stack(vectors).reshape(m * B, -1, K)
        coef = Wk[:, :d, :].permute(0, 2, 1).reshape(m * B * K, d)
        if is_sparse(self.X):
            Z = _matmul(self.X, coef.T)
        else:
            Z = F.linear(self.X, coef.contiguous())
        Z = Z.reshape(self.rows, m, B, K).permute(1, 2, 0, 3)
        if self.model.fit_intercept:
            Z = Z + Wk[:, d, :].reshape(m, B, 1, K)
        return Z

    def _back(self, R: Tensor) -> Tensor:
        """Σ_j (x_j; 1) R_j per vector: (m, B, rows, K) score weights to (m, *w.shape)."""
        m, B = R.shape[0], self.w.shape[0]
        d, K = self.model.n_features, self.model.n_out
        flat = R.permute(2, 0, 1, 3).reshape(self.rows, m * B * K)
        if is_sparse(self.X):
            with torch.enable_grad():  # Xᵀ R through the (sparse-capable) product's gradient
                M = torch.zeros(d, flat.shape[1], dtype=flat.dtype, device=flat.device)
                M.requires_grad_(True)
                (data,) = torch.autograd.grad((_matmul(self.X, M) * flat).sum(), M)
            data = data.T
        else:
            data = flat.T.contiguous() @ self.X
        out = torch.zeros(m, B, self.w.shape[1], K, dtype=R.dtype, device=R.device)
        out[:, :, :d, :] = data.reshape(m, B, K, d).permute(0, 1, 3, 2)
        if self.model.fit_intercept:
            out[:, :, d, :] = R.sum(dim=2)
        return out.reshape(m, *self.w.shape)

    def _weighted(self, t: Tensor) -> Tensor:
        """c_j t_j / |I| over the rows (dimension 1 of the (B, rows, K) score arrays)."""
        t = t / self.rows
        return t if self.c is None else t * self.c[None, :, None]

    def _score_gradient(self, z: Tensor) -> Tensor:
        loss = self.model.loss
        if loss == "squared":
            return z - self.y.to(z.dtype)[None, :, None]
        if loss == "binary":
            return torch.sigmoid(z) - self.y.to(z.dtype)[None, :, None]
        p = torch.softmax(z, dim=2)
        return p - F.one_hot(self.y, z.shape[2]).to(z.dtype)[None]

    def _curvature(self, z: Tensor, u: Tensor) -> Tensor:
        """∇²_z ℓ [u] per row."""
        loss = self.model.loss
        if loss == "squared":
            return u
        if loss == "binary":
            s = torch.sigmoid(z)
            return s * (1 - s) * u
        p = torch.softmax(z, dim=2)
        return p * u - p * (p * u).sum(dim=2, keepdim=True)

    def gradient(self) -> Tensor:
        """∇_w ĥ(w, θ; I)."""
        if self._grad is None:
            if self._z is None:
                self._z = self._scores([self.w])[0]
            g = self._back(self._weighted(self._score_gradient(self._z))[None])[0]
            self._grad = g + self.a * self.w
        return self._grad

    def prime(self) -> None:
        """Compute the scores of w now, the part of every product that does not depend on v
        (SID computes it while an all-reduce is in flight); the products then pass over the
        rows for v alone and leave the gradient to :meth:`gradient` (one pass over 5·10⁴
        float32 rows of 20 features: 0.35 ms, then 0.6 ms per product, against 2.1 ms for a
        first product with the gradient)."""
        if self._z is None:
            self._z = self._scores([self.w])[0]
        self._primed = True

    def product(self, v: Tensor) -> Tensor:
        """Ĥ(w, θ; I) v (v shaped like w); unless :meth:`prime` was called, the first product
        also yields the gradient."""
        v = v.detach()
        if self._z is None:
            self._z, u = self._scores([self.w, v])
        else:
            u = self._scores([v])[0]
        hu = self._weighted(self._curvature(self._z, u))
        if self._grad is None and not self._primed:
            g, hv = self._back(torch.stack([self._weighted(self._score_gradient(self._z)), hu]))
            self._grad = g + self.a * self.w
        else:
            hv = self._back(hu[None])[0]
        return hv + self.a * v


def _init_log_theta(
    theta0: Tensor | float | None,
    shapes: Sequence[tuple[int, ...]],
    default_shape: tuple[int, ...],
    like: Tensor,
    what: str,
) -> Tensor:
    """A leaf θ (requires_grad) of the data's dtype / device from ``theta0``."""
    if theta0 is None:
        theta0 = 0.0
    if isinstance(theta0, (int, float)):
        if not math.isfinite(theta0):
            raise NonFiniteError(f"theta0 must be finite, got {theta0}")
        return torch.full(
            default_shape, float(theta0), dtype=like.dtype, device=like.device, requires_grad=True
        )
    if not isinstance(theta0, Tensor):
        raise BilevelError(f"theta0 must be a tensor or a number, got {type(theta0).__name__}")
    if tuple(theta0.shape) not in [tuple(s) for s in shapes]:
        raise BilevelError(
            f"theta0 has shape {tuple(theta0.shape)}; {what} needs one of "
            f"{[tuple(s) for s in shapes]}"
        )
    if not theta0.is_floating_point():
        theta0 = theta0.to(like.dtype)
    if not bool(torch.isfinite(theta0.detach()).all()):
        raise NonFiniteError("theta0 contains NaN or infinite values")
    if theta0.requires_grad and theta0.is_leaf:
        if theta0.dtype != like.dtype or theta0.device != like.device:
            raise BilevelError(
                f"theta0 ({theta0.dtype}, {theta0.device}) must match the data "
                f"({like.dtype}, {like.device}); pass a tensor without requires_grad to convert"
            )
        return theta0
    return theta0.detach().to(dtype=like.dtype, device=like.device).clone().requires_grad_(True)


class _PerFeatureL2(FiniteSumModel):
    """Shared code of ridge and logistic regression: Ω = ½ Σ_k exp(θ_k) Σ_c w_kc².

    ``shrinkage`` ρ ≥ 0 adds r(θ) = (ρ/2) Σ_k (θ_k − θ̄)² to the upper level, θ̄ the mean of θ:
    a Gaussian prior that pulls the per-feature log-strengths towards a common value, so that
    they do not overfit a small validation set (ρ = 0: none; ρ → ∞: one common strength).
    """

    shrinkage: float = 0.0

    def _set_shrinkage(self, shrinkage: float) -> None:
        shrinkage = float(shrinkage)
        if not (math.isfinite(shrinkage) and shrinkage >= 0):
            raise BilevelError(f"shrinkage must be a finite non-negative number, got {shrinkage}")
        self.shrinkage = shrinkage

    def shrinkage_penalty(self, theta: Tensor) -> Tensor:
        """r(θ) = (ρ/2) Σ_k (θ_k − θ̄)², a scalar."""
        return 0.5 * self.shrinkage * ((theta - theta.mean()) ** 2).sum()

    def _upper_penalty(self) -> Callable[[Tensor], Tensor] | None:
        return self.shrinkage_penalty if self.shrinkage else None

    def _theta_shapes(self) -> list[tuple[int, ...]]:
        shapes = [(self.n_features,), (1,)]
        if self.n_out > 1:
            shapes.append((self.n_features, self.n_out))
        return shapes

    def check_theta(self, theta) -> Tensor:
        if not isinstance(theta, Tensor):
            raise BilevelError(f"theta must be a tensor, got {type(theta).__name__}")
        if tuple(theta.shape) not in self._theta_shapes():
            raise BilevelError(
                f"theta has shape {tuple(theta.shape)}; expected one log-strength per feature "
                f"{self._theta_shapes()[0]} (or one of {self._theta_shapes()[1:]})"
            )
        return theta

    def _strengths(self, theta: Tensor) -> Tensor:
        """λ broadcast against the coefficient block (1, d, K)."""
        lam = torch.exp(theta)
        return lam.reshape(1, -1, self.n_out) if lam.dim() == 2 else lam.reshape(1, -1, 1)

    def _coef_penalty(self, W: Tensor, theta: Tensor) -> Tensor:
        Wk = W.reshape(W.shape[0], -1, self.n_out)
        coef = Wk[:, : self.n_features, :]
        return 0.5 * (self._strengths(theta) * coef**2).sum(dim=(1, 2))

    def _regulariser_diagonal(self, theta) -> Tensor:
        """a = exp θ_k on the rows of feature k (an intercept row: 0)."""
        d, K = self.n_features, self.n_out
        a = torch.zeros(d + int(self.fit_intercept), K, dtype=self.dtype, device=self.device)
        a[:d] = self._strengths(theta.detach())[0]
        return a.reshape(self.event_shape)

    def _floor_theta(self, theta_lower: float | None) -> float:
        low = float(self.theta.detach().min())
        if theta_lower is not None:
            if not math.isfinite(theta_lower):
                raise BilevelError(f"theta_lower must be finite, got {theta_lower}")
            low = min(low, float(theta_lower))
        return low

    def _max_strength(self, theta) -> float:
        return float(torch.exp(theta.detach()).max())


class RidgeModel(_PerFeatureL2):
    """Ridge regression with one strength per feature.

        h(w, θ) = (1/2N) ‖X w − y‖² + ½ Σ_k exp(θ_k) w_k²,   f(w) = (1/2N_val) ‖X_val w − y_val‖².

    Strong convexity: ∇²h = XᵀX/N + diag(exp θ), so μ(θ) = λ_min(XᵀX/N) + min_k exp(θ_k)
    (:meth:`mu`). μ depends on θ; the problem's ``mu`` is μ at θ₀, or at
    min(θ₀, ``theta_lower``) when a lower bound on the visited θ is given, valid for every θ
    whose entries stay above it. λ_min(XᵀX/N) is included when ``exact_mu`` (default: when
    the d×d Gram matrix is cheap); otherwise μ = min_k exp(θ_k), still a valid bound.

    With :class:`CrossValidation`, μ comes from the strengths alone, since λ_min(XᵀX/N) of all
    rows does not bound that of a training part.

    :meth:`solution`, :meth:`objective` and :meth:`hypergradient` give the exact w(θ), F(θ)
    and ∇F(θ) via dense float64 linear solves (reference values; small d), F including the
    ``shrinkage`` penalty on θ (see :class:`_PerFeatureL2`).
    """

    def __init__(
        self,
        X_train: Tensor,
        y_train: Tensor,
        X_val: Tensor,
        y_val: Tensor,
        theta0: Tensor | float | None = 0.0,
        *,
        theta_lower: float | None = None,
        exact_mu: bool | None = None,
        shrinkage: float = 0.0,
        criterion: Criterion | None = None,
        lipschitz_margin: float | None = None,
    ) -> None:
        super().__init__(
            X_train,
            y_train,
            X_val,
            y_val,
            loss="squared",
            n_classes=None,
            fit_intercept=False,
            criterion=criterion,
            lipschitz_margin=lipschitz_margin,
        )
        self._set_shrinkage(shrinkage)
        self.theta = _init_log_theta(
            theta0, self._theta_shapes(), (self.n_features,), self.X_train, "ridge"
        )
        if exact_mu is None:
            d = self.n_features
            exact_mu = d <= _GRAM_MAX_FEATURES and self.n_train * d * d <= _GRAM_MAX_FLOPS
        exact_mu = exact_mu and self.folds is None
        self.data_curvature = ridge_mu(self.X_train, None) if exact_mu else 0.0
        floor = self._floor_theta(theta_lower)
        self._make_problem(self.data_curvature + math.exp(floor))

    def _regulariser(self, W: Tensor, theta) -> Tensor:
        return self._coef_penalty(W, theta)

    def mu(self, theta: Tensor | None = None) -> float:
        """μ(θ) = λ_min(XᵀX/N) (if computed) + min_k exp(θ_k)."""
        theta = self.theta if theta is None else self.check_theta(theta)
        return self.data_curvature + float(torch.exp(theta.detach()).min())

    def solution(self, theta: Tensor | None = None) -> Tensor:
        """w(θ) = (XᵀX/N + diag λ)⁻¹ Xᵀy/N, float64, shape (d,)."""
        theta = self.theta if theta is None else self.check_theta(theta)
        return ridge_solution(self.X_train, self.y_train, theta)

    def objective(self, theta: Tensor | None = None) -> Tensor:
        """F(θ) = f(w(θ)), float64 scalar."""
        theta = self.theta if theta is None else self.check_theta(theta)
        value = ridge_objective(self.X_train, self.y_train, self.X_val, self.y_val, theta)
        return value + self.shrinkage_penalty(theta.detach().to(value.dtype))

    def hypergradient(self, theta: Tensor | None = None) -> Tensor:
        """∇F(θ), float64, shape of θ."""
        theta = self.theta if theta is None else self.check_theta(theta)
        grad = ridge_hypergradient(self.X_train, self.y_train, self.X_val, self.y_val, theta)
        centred = theta.detach().to(grad.dtype) - theta.detach().to(grad.dtype).mean()
        return grad + self.shrinkage * centred


class LogisticModel(_PerFeatureL2):
    """ℓ2-regularised logistic regression with one strength per feature.

    Binary (``n_classes == 2``, labels {0, 1}, w ∈ R^d) or multinomial (w ∈ R^{d×K}):

        h(w, θ) = (1/N) Σ_j CE(w; x_j, y_j) + ½ Σ_k exp(θ_k) Σ_c w_kc² [+ ½ γ_b ‖b‖²],
        f(w) = (1/N_val) Σ_j CE(w; x^val_j, y^val_j),

    CE(w; x, y) = softplus(z) − y z with z = x·w (+ b) (binary), or logsumexp(z) − z_y with
    z = xᵀW (+ b) (multinomial). θ has shape (d,) (shared by the K classes), (1,) (one
    strength) or (d, K) (one per coefficient).

    Intercept: off by default. With ``fit_intercept=True`` the bias b (the last row of w) is
    regularised with the fixed strength γ_b = ``intercept_l2``, so h stays strongly convex.

    Strong convexity: the cross-entropy is convex, so μ(θ) = min(min_k exp(θ_k), γ_b) bounds the
    smallest Hessian eigenvalue (the data curvature is not counted). The problem's ``mu`` is μ
    at θ₀, or at min(θ₀, ``theta_lower``): valid as long as no θ_k goes below that value.
    ``shrinkage`` ρ adds (ρ/2) Σ_k (θ_k − θ̄)² to F (see :class:`_PerFeatureL2`).
    """

    def __init__(
        self,
        X_train: Tensor,
        y_train: Tensor,
        X_val: Tensor,
        y_val: Tensor,
        theta0: Tensor | float | None = 0.0,
        n_classes: int | None = None,
        *,
        fit_intercept: bool = False,
        intercept_l2: float = 1e-4,
        theta_lower: float | None = None,
        shrinkage: float = 0.0,
        criterion: Criterion | None = None,
        lipschitz_margin: float | None = None,
    ) -> None:
        n_classes, loss = _cross_entropy_loss(n_classes, y_train, y_val)
        super().__init__(
            X_train,
            y_train,
            X_val,
            y_val,
            loss=loss,
            n_classes=n_classes,
            fit_intercept=fit_intercept,
            criterion=criterion,
            lipschitz_margin=lipschitz_margin,
        )
        if fit_intercept and not (math.isfinite(intercept_l2) and intercept_l2 > 0):
            raise BilevelError(f"intercept_l2 must be positive and finite, got {intercept_l2}")
        self.intercept_l2 = float(intercept_l2)
        self._set_shrinkage(shrinkage)
        self.theta = _init_log_theta(
            theta0, self._theta_shapes(), (self.n_features,), self.X_train, "logistic"
        )
        mu = math.exp(self._floor_theta(theta_lower))
        if self.fit_intercept:
            mu = min(mu, self.intercept_l2)
        self._make_problem(mu)

    def _regulariser(self, W: Tensor, theta) -> Tensor:
        reg = self._coef_penalty(W, theta)
        if self.fit_intercept:
            b = W.reshape(W.shape[0], -1, self.n_out)[:, self.n_features, :]
            reg = reg + 0.5 * self.intercept_l2 * (b**2).sum(dim=1)
        return reg

    def _regulariser_diagonal(self, theta) -> Tensor:
        """a = exp θ_k on the rows of feature k, γ_b on the intercept's row."""
        a = super()._regulariser_diagonal(theta)
        if self.fit_intercept:
            a.reshape(-1, self.n_out)[self.n_features] = self.intercept_l2
        return a

    def mu(self, theta: Tensor | None = None) -> float:
        """μ(θ) = min(min_k exp(θ_k), γ_b)."""
        theta = self.theta if theta is None else self.check_theta(theta)
        mu = float(torch.exp(theta.detach()).min())
        return min(mu, self.intercept_l2) if self.fit_intercept else mu

    def _max_strength(self, theta) -> float:
        top = super()._max_strength(theta)
        return max(top, self.intercept_l2) if self.fit_intercept else top


class HypercleaningModel(FiniteSumModel):
    """Data hypercleaning: learn a weight σ(θ_j) ∈ (0, 1) for every (possibly mislabelled)
    training sample.

        h(w, θ) = (1/N) Σ_j σ(θ_j) CE(w; x_j, ỹ_j) + (γ/2) ‖w‖²,
        f(w) = (1/N_val) Σ_j CE(w; x^val_j, y^val_j),

    with the binary or multinomial cross-entropy of :class:`LogisticModel` (the bias, when
    fitted, is part of w and regularised by γ too). μ = γ = ``l2`` for every θ.

    ``corrupted``: the boolean mask of the training labels known to be wrong (as returned by
    :func:`corrupt_labels`), for :meth:`detection` only; the optimisation never sees it.
    """

    def __init__(
        self,
        X_train: Tensor,
        y_train_noisy: Tensor,
        X_val: Tensor,
        y_val: Tensor,
        theta0: Tensor | float | None = 0.0,
        n_classes: int | None = None,
        *,
        l2: float = 1e-3,
        fit_intercept: bool = False,
        corrupted: Tensor | None = None,
        criterion: Criterion | None = None,
        lipschitz_margin: float | None = None,
    ) -> None:
        if isinstance(criterion, CrossValidation):
            raise BilevelError("cross validation applies to the per-feature models")
        n_classes, loss = _cross_entropy_loss(n_classes, y_train_noisy, y_val)
        super().__init__(
            X_train,
            y_train_noisy,
            X_val,
            y_val,
            loss=loss,
            n_classes=n_classes,
            fit_intercept=fit_intercept,
            criterion=criterion,
            lipschitz_margin=lipschitz_margin,
        )
        if not (math.isfinite(l2) and l2 > 0):
            raise BilevelError(f"l2 must be positive and finite (it is μ), got {l2}")
        self.l2 = float(l2)
        if corrupted is not None and not (
            isinstance(corrupted, Tensor)
            and corrupted.dtype == torch.bool
            and tuple(corrupted.shape) == (self.n_train,)
        ):
            got = tuple(corrupted.shape) if isinstance(corrupted, Tensor) else type(corrupted)
            raise BilevelError(
                f"corrupted must be a boolean mask of shape ({self.n_train},), got {got}"
            )
        self.corrupted = corrupted
        self.theta = _init_log_theta(
            theta0, [(self.n_train,)], (self.n_train,), self.X_train, "hypercleaning"
        )
        self._make_problem(self.l2)

    def check_theta(self, theta) -> Tensor:
        if not isinstance(theta, Tensor) or tuple(theta.shape) != (self.n_train,):
            shape = tuple(theta.shape) if isinstance(theta, Tensor) else type(theta).__name__
            raise BilevelError(
                f"theta must hold one weight logit per training sample, shape "
                f"({self.n_train},); got {shape}"
            )
        return theta

    def sample_weights(self, theta: Tensor | None = None) -> Tensor:
        """σ(θ_j) for all training samples (detached)."""
        theta = self.theta if theta is None else self.check_theta(theta)
        return torch.sigmoid(theta.detach())

    def _sample_weights(self, theta, index: Tensor | None) -> Tensor:
        t = theta if index is None else theta.index_select(0, index)
        return torch.sigmoid(t)

    def detection(self, theta: Tensor | None = None) -> dict[str, float]:
        """How well the weights σ(θ_j) separate the clean from the corrupted samples:
        ``n_corrupted``, the mean weight of each group, and ``auc``, the probability that a
        random clean sample outweighs a random corrupted one (ties count one half; 0.5 is
        chance, 1 a perfect separation). Needs the ``corrupted`` mask."""
        if self.corrupted is None:
            raise BilevelError("detection needs the mask of corrupted labels (corrupted=...)")
        w = self.sample_weights(theta).to("cpu", torch.float64)
        bad = self.corrupted.to("cpu")
        clean, wrong = w[~bad], w[bad]
        if clean.numel() == 0 or wrong.numel() == 0:
            raise BilevelError("detection needs both clean and corrupted samples")
        return {
            "n_corrupted": int(wrong.numel()),
            "weight_clean_mean": float(clean.mean()),
            "weight_corrupted_mean": float(wrong.mean()),
            "auc": _rank_auc(clean, wrong),
        }

    def _regulariser(self, W: Tensor, theta) -> Tensor:
        return 0.5 * self.l2 * (W.reshape(W.shape[0], -1) ** 2).sum(dim=1)

    def _regulariser_diagonal(self, theta) -> Tensor:
        return torch.full(self.event_shape, self.l2, dtype=self.dtype, device=self.device)

    def mu(self, theta: Tensor | None = None) -> float:
        """μ = γ, independent of θ."""
        return self.l2

    def _max_strength(self, theta) -> float:
        return self.l2


# --------------------------------------------------------------------------------------------
# Factories
# --------------------------------------------------------------------------------------------


#: ``ridge_model(...)``, ``logistic_model(...)`` and ``hypercleaning_model(...)`` build the
#: models (the finite-sum interface, closed forms where they exist, and ``.problem``); the
#: ``*_problem`` functions below return only their :class:`BilevelProblem`.
ridge_model = RidgeModel
logistic_model = LogisticModel
hypercleaning_model = HypercleaningModel


def ridge_problem(*args: Any, **kwargs: Any) -> BilevelProblem:
    """Per-feature ridge regression as a :class:`BilevelProblem`: ``ridge_model(...).problem``,
    with the arguments of :class:`RidgeModel`."""
    return ridge_model(*args, **kwargs).problem


def logistic_problem(*args: Any, **kwargs: Any) -> BilevelProblem:
    """Per-feature ℓ2 logistic regression as a :class:`BilevelProblem`:
    ``logistic_model(...).problem``, with the arguments of :class:`LogisticModel`."""
    return logistic_model(*args, **kwargs).problem


def hypercleaning_problem(*args: Any, **kwargs: Any) -> BilevelProblem:
    """Data hypercleaning as a :class:`BilevelProblem`: ``hypercleaning_model(...).problem``,
    with the arguments of :class:`HypercleaningModel`."""
    return hypercleaning_model(*args, **kwargs).problem


def _rank_auc(positive: Tensor, negative: Tensor) -> float:
    """P(a positive score > a negative one) + ½ P(equal), by the Mann–Whitney rank sum with
    tied scores given their average rank: O(n log n)."""
    scores = torch.cat([positive, negative])
    order = scores.argsort()
    _, inverse, counts = torch.unique_consecutive(
        scores[order], return_inverse=True, return_counts=True
    )
    average_rank = counts.cumsum(0).double() - (counts.double() - 1.0) / 2.0  # 1-based
    ranks = torch.empty_like(scores, dtype=torch.float64)
    ranks[order] = average_rank[inverse]
    n_pos, n_neg = positive.numel(), negative.numel()
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def corrupt_labels(
    y: Tensor, fraction: float, n_classes: int, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Replace the labels of round(fraction·N) random samples by a different random class.

    Returns:
        (y_noisy, corrupted): int64 labels and the boolean mask of changed samples.
    """
    if not (isinstance(fraction, (int, float)) and 0.0 <= fraction <= 1.0):
        raise BilevelError(f"fraction must be in [0, 1], got {fraction!r}")
    y = _check_labels(y, n_classes, "y")
    if y.dim() != 1:
        raise BilevelError(f"y must be 1-D, got shape {tuple(y.shape)}")
    gen = torch.Generator().manual_seed(int(seed))
    n = y.numel()
    k = int(round(fraction * n))
    chosen = torch.randperm(n, generator=gen)[:k]
    shift = torch.randint(1, n_classes, (k,), generator=gen)
    y_noisy = y.clone()
    y_noisy[chosen.to(y.device)] = (y[chosen.to(y.device)] + shift.to(y.device)) % n_classes
    mask = torch.zeros(n, dtype=torch.bool, device=y.device)
    mask[chosen.to(y.device)] = True
    return y_noisy, mask


# --------------------------------------------------------------------------------------------
# Closed forms for ridge (float64 references)
# --------------------------------------------------------------------------------------------


def _full_strengths(theta: Tensor, d: int) -> Tensor:
    if theta.dim() != 1 or theta.shape[0] not in (d, 1):
        raise BilevelError(f"theta must have shape ({d},) or (1,), got {tuple(theta.shape)}")
    return torch.exp(theta.detach().to(torch.float64)).expand(d)


def ridge_mu(X_train: Tensor, theta: Tensor | None) -> float:
    """μ(θ) = λ_min(XᵀX/N) + min_k exp(θ_k) (``theta=None``: the data part alone)."""
    X = _check_features(X_train, "X_train")
    G = _gram(X) / X.shape[0]
    data = max(float(torch.linalg.eigvalsh(G)[0]), 0.0)
    if theta is None:
        return data
    return data + float(_full_strengths(theta, X.shape[1]).min())


def ridge_solution(X_train: Tensor, y_train: Tensor, theta: Tensor) -> Tensor:
    """w(θ) = (XᵀX/N + diag(exp θ))⁻¹ Xᵀy/N in float64 (dense solve), shape (d,)."""
    X = _check_features(X_train, "X_train")
    n, d = X.shape
    A = _gram(X) / n + torch.diag(_full_strengths(theta, d).to(X.device))
    b = _xt_v(X, y_train) / n
    return torch.linalg.solve(A, b)


def ridge_objective(
    X_train: Tensor, y_train: Tensor, X_val: Tensor, y_val: Tensor, theta: Tensor
) -> Tensor:
    """F(θ) = (1/2N_val) ‖X_val w(θ) − y_val‖², float64 scalar."""
    w = ridge_solution(X_train, y_train, theta)
    r = _val_residual(X_val, y_val, w)
    return 0.5 * (r**2).mean()


def _val_residual(X_val: Tensor, y_val: Tensor, w: Tensor) -> Tensor:
    Xv = _check_features(X_val, "X_val", w.shape[0])
    pred = _matmul(Xv.to(torch.float64), w[:, None])[:, 0]
    return pred - y_val.to(torch.float64)


def ridge_hypergradient(
    X_train: Tensor, y_train: Tensor, X_val: Tensor, y_val: Tensor, theta: Tensor
) -> Tensor:
    """Exact ∇F(θ) for per-feature ridge, float64, shape of θ.

    With A = XᵀX/N + diag(λ), w = A⁻¹Xᵀy/N, g = ∇f(w) = X_valᵀ(X_val w − y_val)/N_val and
    q = A⁻¹ g:  ∂F/∂θ_k = −q_k λ_k w_k (summed over k when θ is one shared strength).
    """
    X = _check_features(X_train, "X_train")
    n, d = X.shape
    lam = _full_strengths(theta, d).to(X.device)
    A = _gram(X) / n + torch.diag(lam)
    w = torch.linalg.solve(A, _xt_v(X, y_train) / n)
    r = _val_residual(X_val, y_val, w)
    Xv = X_val if not is_sparse(X_val) else to_csr(X_val)
    g = _xt_v(Xv, r) / X_val.shape[0]
    q = torch.linalg.solve(A, g)
    grad = -q * lam * w
    return grad.sum().reshape(1) if theta.shape[0] == 1 and d != 1 else grad


# --------------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------------


def _logistic_scores(w: Tensor, X: Tensor) -> Tensor:
    """Scores of one weight w on X: (N,) (binary) or (N, K); intercept inferred from shape."""
    if not isinstance(w, Tensor) or not isinstance(X, Tensor) or X.dim() != 2:
        raise BilevelError("predict_logistic needs a weight tensor w and a 2-D feature matrix X")
    d = X.shape[1]
    w = w.detach()
    if w.dim() == 3 and w.shape[0] == 1:
        w = w[0]
    elif w.dim() == 2 and w.shape[0] == 1 and w.shape[1] in (d, d + 1) and d >= 2:
        w = w[0]  # (1, p): one binary weight vector with an instance axis
    if w.dim() == 1:
        w = w[:, None]
        binary = True
    elif w.dim() == 2:
        binary = False
    else:
        raise BilevelError(f"w must have shape (p,) or (p, K) with p = d or d + 1, got {w.shape}")
    p = w.shape[0]
    if p not in (d, d + 1):
        raise BilevelError(f"w has {p} rows but X has {d} features (expected {d} or {d + 1})")
    if is_sparse(X):
        X = to_csr(X)
    Z = _matmul(X, w[:d].to(X.dtype))
    if p == d + 1:
        Z = Z + w[d].to(X.dtype)
    return Z[:, 0] if binary else Z


def predict_logistic(w: Tensor, X: Tensor) -> Tensor:
    """Predicted classes (N,) int64 of a (binary or multinomial) logistic model w on X.

    w: (p,) binary or (p, K) multinomial, optionally with a leading instance axis of size 1;
    p = d, or d + 1 when the last row is the intercept.
    """
    Z = _logistic_scores(w, X)
    return (Z > 0).long() if Z.dim() == 1 else Z.argmax(dim=1)


def accuracy(w: Tensor, X: Tensor, y: Tensor) -> float:
    """Fraction of the samples of (X, y) classified correctly by the logistic model w."""
    pred = predict_logistic(w, X)
    if not isinstance(y, Tensor) or y.shape != pred.shape:
        raise BilevelError(f"y must have shape {tuple(pred.shape)}")
    return float((pred == y.to(pred.device).long()).double().mean())
