"""Data sets for hyperparameter learning: loaders, file readers, splits and synthetic generators.

Every loader returns a :class:`SplitData` with train / validation / test tensors. Splits are
deterministic functions of ``seed`` (stratified by class for classification), and features are
standardised with statistics of the *training* part only:

    x ↦ (x − m) / s,   m, s = per-feature mean and standard deviation over the training rows

(constant features keep ``s = 1``). Sparse feature matrices are only scaled, x ↦ x / s with
s the training root-mean-square, so that they stay sparse.

Sparse matrices are ``torch.sparse_csr`` tensors; :func:`select_rows` slices their rows.
Nothing here downloads: scikit-learn's bundled data sets, idx / svmlight files on disk and
synthetic generators only. scikit-learn is an optional dependency, imported when needed.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pathlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bilevel.problem import BilevelError

__all__ = [
    "SplitData",
    "class_labels",
    "column_major",
    "column_scaling",
    "encode_labels",
    "is_sparse",
    "load_mnist",
    "load_sklearn",
    "make_synthetic_classification",
    "make_synthetic_regression",
    "read_idx",
    "read_svmlight",
    "select_rows",
    "split_data",
    "to_csr",
]

SKLEARN_DATASETS = ("breast_cancer", "digits", "diabetes", "iris", "wine")

_IDX_DTYPES: dict[int, tuple[str, np.dtype, torch.dtype]] = {
    0x08: ("uint8", np.dtype(">u1"), torch.uint8),
    0x09: ("int8", np.dtype(">i1"), torch.int8),
    0x0B: ("int16", np.dtype(">i2"), torch.int16),
    0x0C: ("int32", np.dtype(">i4"), torch.int32),
    0x0D: ("float32", np.dtype(">f4"), torch.float32),
    0x0E: ("float64", np.dtype(">f8"), torch.float64),
}

_GZIP_MAGIC = b"\x1f\x8b"


# --------------------------------------------------------------------------------------------
# Sparse helpers
# --------------------------------------------------------------------------------------------


def is_sparse(X: Tensor) -> bool:
    """True for a sparse (COO or compressed) tensor."""
    return X.layout != torch.strided


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A CSR tensor from its parts (indices int64), without torch's beta-state warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return torch.sparse_csr_tensor(
            crow.to(torch.int64), col.to(torch.int64), values, size, check_invariants=False
        )


def to_csr(X: Tensor) -> Tensor:
    """``X`` as a 2-D ``torch.sparse_csr`` tensor with int64 indices (dense or COO input)."""
    if X.dim() != 2:
        raise BilevelError(f"expected a 2-D feature matrix, got shape {tuple(X.shape)}")
    if X.layout == torch.sparse_csr:
        if X.crow_indices().dtype == torch.int64:
            return X
        return _csr(X.crow_indices(), X.col_indices(), X.values(), tuple(X.shape))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        if X.layout == torch.sparse_coo:
            X = X.coalesce()
        Y = X.to_sparse_csr()
    return _csr(Y.crow_indices(), Y.col_indices(), Y.values(), tuple(Y.shape))


def from_scipy(X: Any) -> Tensor:
    """A ``scipy.sparse`` matrix (any format) as a ``torch.sparse_csr`` tensor with int64
    indices and the matrix's dtype; duplicate entries are summed, column indices sorted."""
    X = X.tocsr(copy=True)
    X.sum_duplicates()
    return _csr(
        torch.from_numpy(X.indptr.astype(np.int64)),
        torch.from_numpy(X.indices.astype(np.int64)),
        torch.from_numpy(X.data),
        tuple(X.shape),
    )


def column_major(X: Tensor, column: bool = True) -> Tensor:
    """Dense 2-D ``X`` stored column-major (Fortran order: each feature's values adjacent;
    ``column=False``: row-major), the same values and shape; ``X`` itself when it is stored so
    already, and sparse ``X`` as it is.

    On one CPU thread the products of a linear model with one vector, z = Xv and Xᵀr, are
    2–4× faster on column-major storage for tall X (16 000 × 200 and 200 000 × 100, float32
    and float64: ``benchmarks/layout.py``), while gathering scattered minibatch rows is 4–5×
    cheaper from row-major storage (each row one contiguous read).
    """
    if is_sparse(X) or X.dim() != 2:
        return X
    if column:
        return X if X.t().is_contiguous() else X.t().contiguous().t()
    return X.contiguous()


def select_rows(X: Tensor, index: Tensor | None) -> Tensor:
    """Rows ``index`` of a dense or sparse matrix ``X`` (sparse results are CSR).

    For CSR the rows are gathered directly from ``crow_indices`` in O(nnz of the selected rows).
    """
    if index is None:
        return X
    if not is_sparse(X):
        return X.index_select(0, index)
    X = to_csr(X)
    crow, col, val = X.crow_indices(), X.col_indices(), X.values()
    index = index.to(device=crow.device, dtype=torch.int64)
    starts = crow[index]
    counts = crow[index + 1] - starts
    new_crow = torch.zeros(index.numel() + 1, dtype=torch.int64, device=crow.device)
    torch.cumsum(counts, 0, out=new_crow[1:])
    total = int(new_crow[-1])
    pos = torch.repeat_interleave(starts - new_crow[:-1], counts, output_size=total)
    pos = pos + torch.arange(total, device=crow.device)
    return _csr(new_crow, col[pos], val[pos], (index.numel(), X.shape[1]))


def stack_rows(A: Tensor, B: Tensor) -> Tensor:
    """The rows of A, then those of B: dense, or CSR when either is sparse."""
    if not (is_sparse(A) or is_sparse(B)):
        return torch.cat([A, B])
    A, B = to_csr(A), to_csr(B)
    if A.shape[1] != B.shape[1]:
        raise BilevelError(f"cannot stack {A.shape[1]} and {B.shape[1]} columns")
    nnz = A.crow_indices()[-1]
    crow = torch.cat([A.crow_indices(), B.crow_indices()[1:] + nnz])
    col = torch.cat([A.col_indices(), B.col_indices()])
    values = torch.cat([A.values(), B.values()])
    return _csr(crow, col, values, (A.shape[0] + B.shape[0], A.shape[1]))


def random_folds(n: int, k: int, seed: int = 0) -> Tensor:
    """(k, n) boolean masks of k folds of n rows: a seeded random permutation cut into k parts
    whose sizes differ by at most one.

    Not scikit-learn's ``KFold``: scikit-learn is an optional dependency (``bilevel hpo --cv``
    runs on CSV, svmlight and synthetic data without it), and this seeded torch permutation
    defines the folds of recorded cross-validation results."""
    if not (isinstance(k, int) and 2 <= k <= n):
        raise BilevelError(f"need 2 <= folds <= {n} rows, got {k!r}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    masks = torch.zeros(k, n, dtype=torch.bool)
    for j, part in enumerate(order.chunk(k)):
        masks[j, part] = True
    return masks


def scale_columns(X: Tensor, scale: Tensor) -> Tensor:
    """X diag(1/scale) for a sparse matrix (the result is CSR)."""
    X = to_csr(X)
    return _csr(X.crow_indices(), X.col_indices(), X.values() / scale[X.col_indices()], X.shape)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


@dataclass
class SplitData:
    """Train / validation / test split of one data set.

    Attributes:
        X_train, X_val, X_test: features (N_split, d), dense or ``torch.sparse_csr``.
        y_train, y_val, y_test: int64 class labels in ``[0, n_classes)``, or float targets
            (regression, ``n_classes is None``).
        n_classes: number of classes, ``None`` for regression.
        name: a short name of the data set.
        train_index, val_index, test_index: rows of the original data in each split.
        feature_mean, feature_scale: the standardisation x ↦ (x − mean)/scale (mean is
            ``None`` for sparse data, which is only scaled); ``None`` when not standardised.
        target_mean: the training mean subtracted from regression targets (else ``None``).
        feature_names: the d column names, when the source has them (else ``None``).
    """

    X_train: Tensor
    y_train: Tensor
    X_val: Tensor
    y_val: Tensor
    X_test: Tensor
    y_test: Tensor
    n_classes: int | None
    name: str = "data"
    train_index: Tensor | None = None
    val_index: Tensor | None = None
    test_index: Tensor | None = None
    feature_mean: Tensor | None = None
    feature_scale: Tensor | None = None
    target_mean: float | None = None
    feature_names: list[str] | None = None

    @property
    def n_features(self) -> int:
        return int(self.X_train.shape[1])

    @property
    def n_train(self) -> int:
        return int(self.X_train.shape[0])

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"``."""
        return "regression" if self.n_classes is None else "classification"

    @property
    def sparse(self) -> bool:
        return is_sparse(self.X_train)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """A copy with features (and regression targets) moved / cast; labels stay int64."""

        def feat(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype)

        def targ(t: Tensor) -> Tensor:
            return t.to(device=device) if self.n_classes is not None else feat(t)

        def maybe(t: Tensor | None) -> Tensor | None:
            return None if t is None else feat(t)

        return replace(
            self,
            feature_mean=maybe(self.feature_mean),
            feature_scale=maybe(self.feature_scale),
            X_train=feat(self.X_train),
            X_val=feat(self.X_val),
            X_test=feat(self.X_test),
            y_train=targ(self.y_train),
            y_val=targ(self.y_val),
            y_test=targ(self.y_test),
        )

    def __repr__(self) -> str:
        kind = "sparse" if self.sparse else "dense"
        return (
            f"SplitData(name={self.name!r}, {kind}, d={self.n_features}, "
            f"train={self.n_train}, val={self.X_val.shape[0]}, test={self.X_test.shape[0]}, "
            f"n_classes={self.n_classes}, dtype={self.X_train.dtype})"
        )


def _split_indices(
    n: int,
    labels: Tensor | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Disjoint sorted index sets (train, val, test), stratified by ``labels`` when given."""
    gen = torch.Generator().manual_seed(int(seed))
    if labels is None:
        groups = [torch.arange(n)]
    else:
        labels = labels.cpu()
        groups = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels)]
    parts: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
    for g in groups:
        m = g.numel()
        perm = g[torch.randperm(m, generator=gen)]
        n_test = int(round(test_fraction * m))
        n_val = min(int(round(val_fraction * m)), m - n_test)
        parts[2].append(perm[:n_test])
        parts[1].append(perm[n_test : n_test + n_val])
        parts[0].append(perm[n_test + n_val :])
    tr, va, te = (torch.sort(torch.cat(p)).values for p in parts)
    return tr, va, te


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v < 1.0):
            raise BilevelError(f"{name} must be a number in [0, 1), got {v!r}")
    if val_fraction + test_fraction >= 1.0:
        raise BilevelError(
            f"val_fraction + test_fraction must be below 1 (got {val_fraction} + {test_fraction})"
        )


def split_data(
    X: Tensor,
    y: Tensor,
    *,
    n_classes: int | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    standardize: bool = True,
    stratify: bool = True,
    center_target: bool = True,
    name: str = "data",
    dtype: torch.dtype | None = None,
) -> SplitData:
    """Split (X, y) into train / validation / test and standardise with training statistics.

    Not scikit-learn's ``train_test_split``: scikit-learn is an optional dependency, the split
    keeps sparse CSR tensors and the row indices of each part (``train_index``, ...), and its
    seeded torch permutation defines the data sets of recorded results.

    Args:
        X: features (N, d), dense or sparse (sparse becomes CSR).
        y: labels (N,) in ``[0, n_classes)`` for classification, float targets otherwise.
        n_classes: number of classes; ``None`` for regression. For classification the split is
            stratified (``stratify=True``): each class is split in the given proportions.
        val_fraction: fraction of each class (or of all rows) held out for validation.
        test_fraction: fraction of each class (or of all rows) held out for testing.
        seed: the split is a deterministic function of the seed.
        standardize: dense x ↦ (x − m)/s, sparse x ↦ x/s, with training m, s.
        center_target: for regression, subtract the training mean of y from every split.
        dtype: cast the features (default: keep; integer features become float32).
    """
    _check_fractions(val_fraction, test_fraction)
    if not isinstance(X, Tensor) or X.dim() != 2:
        raise BilevelError(f"X must be a 2-D tensor (N, d), got {getattr(X, 'shape', type(X))}")
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != X.shape[0]:
        raise BilevelError(
            f"y must be a 1-D tensor with one entry per row of X ({X.shape[0]}), got "
            f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}"
        )
    if is_sparse(X):
        X = to_csr(X)
    if dtype is None and not X.is_floating_point():
        dtype = torch.float32
    if dtype is not None:
        X = X.to(dtype)
    values = X.values() if is_sparse(X) else X
    if not bool(torch.isfinite(values).all()):
        raise BilevelError(f"{name}: features contain NaN or infinite values")
    if n_classes is not None:
        y = _check_labels(y, n_classes, f"{name}: y")
    else:
        y = y.to(X.dtype)
        if not bool(torch.isfinite(y).all()):
            raise BilevelError(f"{name}: targets contain NaN or infinite values")
    tr, va, te = _split_indices(
        X.shape[0],
        y if (n_classes is not None and stratify) else None,
        val_fraction,
        test_fraction,
        seed,
    )
    if tr.numel() == 0:
        raise BilevelError(f"{name}: the training split is empty ({X.shape[0]} rows)")
    dev = X.device
    tr_d, va_d, te_d = tr.to(dev), va.to(dev), te.to(dev)
    Xs = [select_rows(X, i) for i in (tr_d, va_d, te_d)]
    ys = [y.index_select(0, i.to(y.device)) for i in (tr, va, te)]
    mean = scale = None
    if standardize:
        Xs, mean, scale = _standardize(Xs)
    target_mean = None
    if n_classes is None and center_target:
        target_mean = float(ys[0].mean())
        ys = [t - target_mean for t in ys]
    return SplitData(
        Xs[0],
        ys[0],
        Xs[1],
        ys[1],
        Xs[2],
        ys[2],
        n_classes,
        name,
        tr,
        va,
        te,
        mean,
        scale,
        target_mean,
    )


def _standardize(Xs: list[Tensor]) -> tuple[list[Tensor], Tensor | None, Tensor]:
    """Standardise [train, val, test] with the training statistics."""
    X_tr = Xs[0]
    if is_sparse(X_tr):
        scale = sparse_column_scaling(X_tr)
        return [scale_columns(X, scale) for X in Xs], None, scale
    mean, scale = column_scaling(X_tr)
    return [(X - mean) / scale for X in Xs], mean, scale


def sparse_column_scaling(X: Tensor) -> Tensor:
    """s of the scaling x/s of the sparse rows X (n, d), without centring (which would fill the
    matrix): the root mean square of each column, or 1 for a column that is zero up to
    roundoff (s ≤ ε, the dtype's machine epsilon)."""
    X = to_csr(X)
    n, d = X.shape
    sq = torch.zeros(d, dtype=torch.float64, device=X.values().device)
    sq.index_add_(0, X.col_indices(), X.values().to(torch.float64) ** 2)
    rms = torch.sqrt(sq / max(n, 1)).to(X.dtype)
    eps = torch.finfo(X.dtype).eps
    return torch.where(rms > eps, rms, torch.ones_like(rms))


def column_scaling(X: Tensor, center: bool = True) -> tuple[Tensor, Tensor]:
    """(m, s) of the standardisation (x − m)/s of the dense rows X (n, d): m the column means
    (zeros when not ``center``), s the root mean square of x − m per column, or 1 for a column
    that is constant up to roundoff (s ≤ 10 ε (|m| + 1), ε the dtype's machine epsilon)."""
    mean = X.mean(dim=0) if center else torch.zeros_like(X[0])
    std = ((X - mean) ** 2).mean(dim=0).sqrt()
    eps = torch.finfo(X.dtype).eps
    scale = torch.where(std > 10 * eps * (mean.abs() + 1), std, torch.ones_like(std))
    return mean, scale


def _check_labels(y: Tensor, n_classes: int, what: str) -> Tensor:
    """int64 labels in [0, n_classes) (integer-valued floats accepted)."""
    if not isinstance(n_classes, int) or n_classes < 2:
        raise BilevelError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    if y.is_floating_point():
        if not bool(torch.isfinite(y).all()) or not bool((y == torch.round(y)).all()):
            raise BilevelError(f"{what} must hold integer class labels")
    elif y.dtype == torch.bool or y.is_complex():
        raise BilevelError(f"{what} must hold integer class labels, got dtype {y.dtype}")
    y = y.to(torch.int64)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise BilevelError(
            f"{what} has labels outside [0, {n_classes}): min {int(y.min())}, max {int(y.max())}"
        )
    return y


def encode_labels(y: Tensor) -> tuple[Tensor, Tensor]:
    """Map arbitrary label values to ``0, …, K−1`` (sorted order): (codes int64, classes)."""
    classes, codes = torch.unique(y, sorted=True, return_inverse=True)
    return codes.to(torch.int64), classes


#: Text that marks a missing label in a data file (compared case-insensitively).
MISSING_LABELS = frozenset({"", "nan", "na", "n/a", "null", "none", "?"})


def class_labels(labels: np.ndarray | Tensor, where: str) -> tuple[Tensor, int]:
    """Class labels coded ``0, …, K−1`` (sorted order) and K, from a column of labels (text
    or numbers), refusing a column that does not hold class labels:

    * a missing label (NaN, or text such as "", "NA", "?"; see :data:`MISSING_LABELS`);
    * a number that is not an integer (a continuous column: regression targets or a feature);
    * more distinct values than half the rows (integer-valued, but no class has two rows on
      average: counts or identifiers, not classes);
    * fewer than two classes.

    ``where`` names the column in the messages (e.g. "data.csv, label column 'y'").

    Raises:
        BilevelError: naming ``where`` and the first offending row (1-based, data rows).
    """
    values = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    n = len(values)
    hint = (
        "; give the column of class labels with --label-column, or use --model ridge for "
        "real-valued targets"
    )
    if values.dtype.kind in "fiub":
        numbers = values.astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(numbers))
        if bad.size:
            raise BilevelError(
                f"{where}: row {bad[0] + 1} has a missing or non-finite label ({numbers[bad[0]]})"
            )
        frac = np.flatnonzero(numbers != np.round(numbers))
        if frac.size:
            raise BilevelError(
                f"{where} holds non-integer values (row {frac[0] + 1}: {numbers[frac[0]]:g}), "
                f"so it is not a column of class labels{hint}"
            )
        classes, codes = np.unique(numbers, return_inverse=True)
    else:
        text = np.char.strip(values.astype(str))
        missing = np.flatnonzero(np.isin(np.char.lower(text), list(MISSING_LABELS)))
        if missing.size:
            raise BilevelError(
                f"{where}: row {missing[0] + 1} has a missing label ({str(text[missing[0]])!r})"
            )
        classes, codes = np.unique(text, return_inverse=True)
    k = len(classes)
    if k < 2:
        raise BilevelError(f"{where}: all labels are equal; classification needs two classes")
    if k > max(2, n // 2):
        raise BilevelError(
            f"{where} holds {k} distinct values in {n} rows, so it looks continuous (a count "
            f"or an identifier), not like class labels{hint}"
        )
    return torch.from_numpy(codes.reshape(-1).astype(np.int64)), k


# --------------------------------------------------------------------------------------------
# scikit-learn's bundled data sets
# --------------------------------------------------------------------------------------------


def _require_sklearn():
    try:
        import sklearn.datasets as skd
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise BilevelError(
            "this loader needs scikit-learn (an optional dependency): "
            "pip install 'bilevel[learning]' or pip install scikit-learn"
        ) from err
    return skd


def load_sklearn(
    name: str,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    dtype: torch.dtype = torch.float64,
    standardize: bool = True,
    device: torch.device | str | None = None,
) -> SplitData:
    """One of scikit-learn's bundled data sets (no download), split and standardised.

    ``name``: ``"breast_cancer"`` (569×30, 2 classes), ``"digits"`` (1797×64, 10 classes),
    ``"iris"`` (150×4, 3 classes), ``"wine"`` (178×13, 3 classes) or ``"diabetes"`` (442×10,
    regression; targets centred with the training mean).
    """
    if name not in SKLEARN_DATASETS:
        raise BilevelError(f"unknown data set {name!r}; choose one of {SKLEARN_DATASETS}")
    skd = _require_sklearn()
    bunch = getattr(skd, f"load_{name}")()
    X_np, y_np = bunch.data, bunch.target
    X = torch.as_tensor(np.asarray(X_np, dtype=np.float64)).to(dtype)
    if name == "diabetes":
        y = torch.as_tensor(np.asarray(y_np, dtype=np.float64)).to(dtype)
        n_classes = None
    else:
        y = torch.as_tensor(np.asarray(y_np, dtype=np.int64))
        n_classes = int(y.max()) + 1
    data = split_data(
        X,
        y,
        n_classes=n_classes,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        standardize=standardize,
        name=name,
    )
    data = replace(data, feature_names=[str(n) for n in bunch.feature_names])
    return data.to(device=device) if device is not None else data


# --------------------------------------------------------------------------------------------
# idx files (MNIST)
# --------------------------------------------------------------------------------------------


def _read_bytes(path: str | os.PathLike) -> bytes:
    """File contents, decompressed when the file starts with the gzip magic number."""
    path = pathlib.Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, ValueError) as err:
            raise BilevelError(f"{path}: corrupt gzip stream ({err})") from err
    return raw


def read_idx(path: str | os.PathLike) -> Tensor:
    """Read an idx file (the MNIST format), gzip-compressed or raw.

    Layout: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions n, then n big-endian uint32 sizes,
    then the data in big-endian C order. Returns a tensor of that dtype and shape.

    Raises:
        BilevelError: bad magic number, unknown type code, or a size that does not match.
    """
    data = _read_bytes(path)
    if len(data) < 4:
        raise BilevelError(f"{path}: not an idx file (only {len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise BilevelError(
            f"{path}: bad idx magic number {data[:4].hex()} (must start with two zero bytes)"
        )
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X} ({v[0]})" for c, v in _IDX_DTYPES.items())
        raise BilevelError(f"{path}: unknown idx type code 0x{code:02X}; known codes: {known}")
    if ndim == 0:
        raise BilevelError(f"{path}: idx file declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise BilevelError(f"{path}: truncated idx header ({len(data)} bytes, need {header})")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    _, np_dtype, torch_dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
    if len(data) - header != expected:
        raise BilevelError(
            f"{path}: idx payload has {len(data) - header} bytes but shape {shape} of "
            f"{np_dtype.name} needs {expected}"
        )
    arr = np.frombuffer(data, dtype=np_dtype, offset=header).reshape(shape)
    return torch.from_numpy(arr.astype(np_dtype.newbyteorder("="), copy=True))


def _default_mnist_folder() -> pathlib.Path:
    """``../shared/data/mnist`` relative to the working directory, else beside the project."""
    candidates = [
        pathlib.Path.cwd().parent / "shared" / "data" / "mnist",
        pathlib.Path(__file__).resolve().parents[4] / "shared" / "data" / "mnist",
    ]
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


def load_mnist(
    folder: str | os.PathLike | None = None,
    *,
    n_samples: int | None = None,
    classes: Sequence[int] | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    dtype: torch.dtype = torch.float32,
    standardize: bool = True,
    device: torch.device | str | None = None,
) -> SplitData:
    """The MNIST 10k test set (``t10k-*-idx*-ubyte[.gz]``) as a split classification problem.

    Pixels are flattened to 784 features, scaled to [0, 1] and then standardised with the
    training statistics (constant border pixels stay 0).

    Args:
        folder: directory of the idx files; default ``../shared/data/mnist`` (relative to the
            working directory, then to the project's parent directory).
        n_samples: keep a seeded random subset of this many images (after class filtering).
        classes: keep only these digits, relabelled ``0, 1, …`` in the given order, e.g.
            ``(4, 9)`` for a binary problem.
    """
    folder = pathlib.Path(folder) if folder is not None else _default_mnist_folder()
    files = {}
    for kind, stem in (("images", "t10k-images-idx3-ubyte"), ("labels", "t10k-labels-idx1-ubyte")):
        for cand in (folder / f"{stem}.gz", folder / stem):
            if cand.is_file():
                files[kind] = cand
                break
        else:
            raise FileNotFoundError(f"MNIST file {stem}[.gz] not found in {folder}")
    images = read_idx(files["images"])
    labels = read_idx(files["labels"]).to(torch.int64)
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise BilevelError(
            f"MNIST files disagree: images {tuple(images.shape)}, labels {tuple(labels.shape)}"
        )
    X = images.reshape(images.shape[0], -1)
    n_classes = 10
    if classes is not None:
        classes = [int(c) for c in classes]
        if (
            len(classes) < 2
            or len(set(classes)) != len(classes)
            or not set(classes) <= set(range(10))
        ):
            raise BilevelError(f"classes must be at least two distinct digits, got {classes}")
        keep = torch.isin(labels, torch.tensor(classes))
        X, labels = X[keep], labels[keep]
        remap = torch.full((10,), -1, dtype=torch.int64)
        remap[torch.tensor(classes)] = torch.arange(len(classes))
        labels = remap[labels]
        n_classes = len(classes)
    if n_samples is not None:
        if not 0 < n_samples <= X.shape[0]:
            raise BilevelError(f"n_samples must be in [1, {X.shape[0]}], got {n_samples}")
        gen = torch.Generator().manual_seed(int(seed) + 7919)
        sub = torch.sort(torch.randperm(X.shape[0], generator=gen)[:n_samples]).values
        X, labels = X[sub], labels[sub]
    X = X.to(dtype) / 255.0
    name = "mnist" if classes is None else "mnist" + "".join(str(c) for c in classes)
    data = split_data(
        X,
        labels,
        n_classes=n_classes,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        standardize=standardize,
        name=name,
    )
    return data.to(device=device) if device is not None else data


# --------------------------------------------------------------------------------------------
# svmlight / LIBSVM text files
# --------------------------------------------------------------------------------------------


def read_svmlight(
    path: str | os.PathLike,
    n_features: int | None = None,
    *,
    zero_based: bool | str = "auto",
    dense: bool = False,
    dtype: torch.dtype = torch.float32,
    info: dict[str, Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """Read an svmlight / LIBSVM file: lines ``label idx:value idx:value ... [# comment]``.

    ``qid:`` tokens are ignored; the file may be gzip-compressed. Feature indices are one-based
    unless ``zero_based`` is True; ``"auto"`` (scikit-learn's ``load_svmlight_file``
    convention, with the same result) treats the file as zero-based when index 0 occurs.
    ``info``, if given, receives ``"zero_based"``: the convention used.

    Why not scikit-learn's ``load_svmlight_file`` (which the tests use as the oracle): it
    refuses feature indices that are not sorted within a line, which files written by other
    tools can have; this reader sorts them, refuses duplicates and names the line of any bad
    token; and scikit-learn is an optional dependency.

    Returns:
        (X, y): X (N, n_features) dense or ``torch.sparse_csr`` of ``dtype``; y (N,) float64
        labels as written (see :func:`encode_labels` to map them to ``0, …, K−1``).
    """
    if zero_based not in (True, False, "auto"):
        raise BilevelError(f"zero_based must be True, False or 'auto', got {zero_based!r}")
    text = _read_bytes(path).decode("utf-8", errors="strict")
    labels: list[str] = []
    tokens: list[str] = []
    counts: list[int] = []
    line_nos: list[int] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        toks = line.split()
        feats = toks[1:]
        if "qid:" in line:
            feats = [t for t in feats if not t.startswith("qid:")]
        labels.append(toks[0])
        tokens.extend(feats)
        counts.append(len(feats))
        line_nos.append(line_no)
    n = len(labels)
    try:
        y = np.array(labels, dtype=np.float64)
    except ValueError:
        bad = next(i for i, s in enumerate(labels) if not _is_float(s))
        raise BilevelError(
            f"{path}, line {line_nos[bad]}: label {labels[bad]!r} is not a number "
            "(multi-label files are not supported)"
        ) from None
    counts_np = np.asarray(counts, dtype=np.int64)
    token_line = np.repeat(np.asarray(line_nos, dtype=np.int64), counts_np)
    parsed = _parse_pairs(tokens)
    if parsed is not None:
        idx, val = parsed
    else:  # the fast parser refused a token: parse token by token, naming a bad one
        parts = np.char.partition(np.asarray(tokens), ":")
        before, sep, after = parts[:, 0], parts[:, 1], parts[:, 2]
        bad = np.flatnonzero((sep != ":") | (np.char.find(after, ":") >= 0) | (after == ""))
        if bad.size:
            i = int(bad[0])
            raise BilevelError(
                f"{path}, line {token_line[i]}: malformed feature {tokens[i]!r} (want idx:value)"
            )
        try:
            idx = before.astype(np.int64)
        except ValueError:
            i = next(i for i, s in enumerate(before) if not s.lstrip("+-").isdigit())
            raise BilevelError(
                f"{path}, line {token_line[i]}: feature index {str(before[i])!r} is not an integer"
            ) from None
        try:
            val = after.astype(np.float64)
        except ValueError:
            i = next(i for i, s in enumerate(after) if not _is_float(s))
            raise BilevelError(
                f"{path}, line {token_line[i]}: feature value {str(after[i])!r} is not a number"
            ) from None
    if not np.isfinite(y).all() or not np.isfinite(val).all():
        raise BilevelError(f"{path}: NaN or infinite label or feature value")
    if zero_based == "auto":
        zero_based = bool(idx.size) and int(idx.min()) == 0
    if info is not None:
        info["zero_based"] = bool(zero_based)
    if not zero_based:
        idx = idx - 1
    if idx.size and int(idx.min()) < 0:
        i = int(np.argmin(idx))
        raise BilevelError(
            f"{path}, line {token_line[i]}: feature index {tokens[i].split(':')[0]} is invalid "
            f"for a {'zero' if zero_based else 'one'}-based file"
        )
    d_min = int(idx.max()) + 1 if idx.size else 0
    if n_features is None:
        n_features = d_min
    elif n_features < d_min:
        raise BilevelError(f"{path}: n_features={n_features} but the file uses {d_min} features")
    rows = np.repeat(np.arange(n, dtype=np.int64), counts_np)
    keys = rows * max(n_features, 1) + idx
    order = np.argsort(keys, kind="stable")
    keys_sorted = keys[order]
    dup = np.flatnonzero(keys_sorted[1:] == keys_sorted[:-1])
    if dup.size:
        i = int(order[dup[0]])
        raise BilevelError(f"{path}, line {token_line[i]}: duplicate feature index")
    rows_t = torch.from_numpy(rows[order])
    cols_t = torch.from_numpy(idx[order])
    vals_t = torch.from_numpy(val[order]).to(dtype)
    y_t = torch.from_numpy(y)
    if dense:
        X = torch.zeros(n, n_features, dtype=dtype)
        X[rows_t, cols_t] = vals_t
        return X, y_t
    crow = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(torch.from_numpy(counts_np), 0, out=crow[1:])
    return _csr(crow, cols_t, vals_t, (n, n_features)), y_t


# --------------------------------------------------------------------------------------------
# delimited text (CSV / TSV)
# --------------------------------------------------------------------------------------------

#: File name endings read as delimited text by :func:`read_csv` (optionally with ``.gz``).
CSV_SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t"}


def read_csv(
    path: str | os.PathLike,
    label_column: str | int = -1,
    *,
    delimiter: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, np.ndarray, list[str] | None]:
    """Read a table of numbers, one sample per row, one column of which holds the labels.

    The delimiter is ``,`` for ``.csv`` and a tab for ``.tsv`` / ``.tab`` files (also when
    gzip-compressed, ``.csv.gz``) unless given. The first row is a header when one of its
    fields is not a number. ``label_column``: a column index (negative counts from the end;
    default the last) or, with a header, a column name. Blank lines and lines starting with
    ``#`` are skipped; every other row must have the same number of numeric fields, except
    the label, which may be text (class names).

    Returns:
        (X, labels, header): X (N, D) dense of ``dtype``; the labels as a NumPy array (float64
        when every label is a number, else strings); the header's feature names or None.

    Raises:
        BilevelError: a row with another number of fields, a field that is not a number, an
            empty field, an unknown label column, or fewer than one feature column.
    """
    path = pathlib.Path(path)
    if delimiter is None:
        suffix = (
            path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix
        )
        delimiter = CSV_SUFFIXES.get(suffix.lower(), ",")
    text = _read_bytes(path).decode("utf-8-sig", errors="strict")
    numbered = [
        (line_no, line)
        for line_no, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not numbered:
        raise BilevelError(f"{path}: no data rows")
    first = [field.strip() for field in numbered[0][1].split(delimiter)]
    header = None
    if not all(_is_float(field) for field in first):
        header, numbered = first, numbered[1:]
        if not numbered:
            raise BilevelError(f"{path}: a header but no data rows")
    width = len(first)
    for line_no, line in numbered:
        if line.count(delimiter) != width - 1:
            raise BilevelError(
                f"{path}, line {line_no}: {line.count(delimiter) + 1} fields, expected {width} "
                f"(delimiter {delimiter!r})"
            )
    if width < 2:
        raise BilevelError(f"{path}: need a label column and at least one feature column")
    label = _column_index(label_column, header, width, path)
    names = None if header is None else [h for i, h in enumerate(header) if i != label]
    lines = [line for _, line in numbered]
    try:  # NumPy's C parser; a malformed field sends us to the checks below, which name it
        body = "\n".join(lines)
        features = [c for c in range(width) if c != label]
        options = {"delimiter": delimiter, "comments": None, "ndmin": 2}
        X = np.loadtxt(io.StringIO(body), usecols=features, dtype=np.float64, **options)
        labels = np.loadtxt(io.StringIO(body), usecols=[label], dtype=str, **options)[:, 0]
        labels = np.char.strip(labels)
        if np.isfinite(X).all() and not np.any(labels == ""):
            if all(_is_float(v) for v in np.unique(labels)):
                labels = labels.astype(np.float64)
            return torch.from_numpy(X).to(dtype), labels, names
    except ValueError:
        pass
    line_nos = [line_no for line_no, _ in numbered]
    rows = [[field.strip() for field in line.split(delimiter)] for line in lines]
    table = np.asarray(rows, dtype=object)
    labels = table[:, label].astype(str)
    features = np.delete(table, label, axis=1).astype(str)
    empty = np.argwhere(features == "")
    if empty.size:
        r, c = (int(v) for v in empty[0])
        raise BilevelError(f"{path}, line {line_nos[r]}: empty field in feature column {c + 1}")
    try:
        X = features.astype(np.float64)
    except ValueError:
        r, c = next(
            (r, c)
            for r in range(features.shape[0])
            for c in range(features.shape[1])
            if not _is_float(features[r, c])
        )
        raise BilevelError(
            f"{path}, line {line_nos[r]}: feature {str(features[r, c])!r} is not a number"
        ) from None
    if not np.isfinite(X).all():
        raise BilevelError(f"{path}: NaN or infinite feature value")
    if np.any(labels == ""):
        r = int(np.flatnonzero(labels == "")[0])
        raise BilevelError(f"{path}, line {line_nos[r]}: empty label")
    raise BilevelError(f"{path}: NumPy could not read the table (quoted fields are not supported)")


def _column_index(column: str | int, header: list[str] | None, width: int, path) -> int:
    """The index of ``column`` (an int, negative from the end, or a header name)."""
    if isinstance(column, str) and not column.lstrip("-").isdigit():
        if header is None or column not in header:
            known = "the file has no header" if header is None else f"columns: {header}"
            raise BilevelError(f"{path}: no column named {column!r} ({known})")
        return header.index(column)
    index = int(column)
    if not -width <= index < width:
        raise BilevelError(f"{path}: label column {index} outside the {width} columns")
    return index % width


def _parse_pairs(tokens: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(indices, values) of ``idx:value`` tokens, parsed in one C pass; None when a token is
    malformed (no ``:``, several, an empty side, text, a non-integral index)."""
    if not tokens:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    text = " ".join(tokens)
    if text.count(":") != len(tokens):
        return None
    try:
        flat = np.fromstring(text.replace(":", " "), dtype=np.float64, sep=" ")
    except ValueError:
        return None
    if flat.size != 2 * len(tokens):
        return None
    index = flat[0::2]
    as_int = index.astype(np.int64)
    if not np.array_equal(as_int, index):
        return None
    return as_int, np.ascontiguousarray(flat[1::2])


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Synthetic problems
# --------------------------------------------------------------------------------------------


def _check_synthetic_args(
    n_samples: int, n_features: int, n_informative: int | None, sparse_density: float | None
) -> int:
    for name, v in (("n_samples", n_samples), ("n_features", n_features)):
        if not isinstance(v, int) or v < 1:
            raise BilevelError(f"{name} must be a positive integer, got {v!r}")
    if n_informative is None:
        n_informative = max(1, n_features // 10)
    if not isinstance(n_informative, int) or not 1 <= n_informative <= n_features:
        raise BilevelError(f"n_informative must be in [1, n_features={n_features}]")
    if sparse_density is not None and not (0.0 < sparse_density <= 1.0):
        raise BilevelError(f"sparse_density must be in (0, 1], got {sparse_density}")
    return n_informative


def _generate_features(
    n_samples: int,
    n_features: int,
    sparse_density: float | None,
    gen: torch.Generator,
    dtype: torch.dtype,
    device: torch.device | str | None,
    chunk_size: int,
) -> Tensor:
    """Standard normal features, dense or with each entry present with probability density."""
    if sparse_density is None:
        X = torch.empty(n_samples, n_features, dtype=dtype, device=device)
        for start in range(0, n_samples, chunk_size):
            stop = min(start + chunk_size, n_samples)
            X[start:stop] = torch.randn(stop - start, n_features, generator=gen, dtype=dtype)
        return X
    crow_parts, col_parts, val_parts = [torch.zeros(1, dtype=torch.int64)], [], []
    offset = 0
    for start in range(0, n_samples, chunk_size):
        m = min(start + chunk_size, n_samples) - start
        per_row = torch.binomial(
            torch.full((m,), float(n_features), dtype=torch.float64),
            torch.full((m,), float(sparse_density), dtype=torch.float64),
            generator=gen,
        ).to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(m), per_row)
        cols = torch.randint(n_features, (rows.numel(),), generator=gen)
        # sampling with replacement: drop repeated (row, col) pairs; unique also sorts by row
        keys = torch.unique(rows * n_features + cols, sorted=True)
        rows, cols = keys // n_features, keys % n_features
        vals = torch.randn(keys.numel(), generator=gen, dtype=dtype)
        crow = torch.bincount(rows, minlength=m).cumsum(0) + offset
        offset += keys.numel()
        crow_parts.append(crow)
        col_parts.append(cols)
        val_parts.append(vals)
    crow = torch.cat(crow_parts).to(device)
    cols = torch.cat(col_parts).to(device)
    vals = torch.cat(val_parts).to(device)
    return _csr(crow, cols, vals, (n_samples, n_features))


def _matvec_chunks(X: Tensor, W: Tensor, chunk_size: int) -> Tensor:
    """X @ W computed over row chunks (dense) or at once (sparse)."""
    if is_sparse(X):
        return X @ W
    out = torch.empty(X.shape[0], W.shape[1], dtype=X.dtype, device=X.device)
    for start in range(0, X.shape[0], chunk_size):
        out[start : start + chunk_size] = X[start : start + chunk_size] @ W
    return out


def _informative_coef(
    n_features: int,
    n_informative: int,
    n_out: int,
    signal: float,
    density: float,
    gen: torch.Generator,
) -> Tensor:
    """Coefficients (d, n_out), nonzero on ``n_informative`` random rows, scaled so that each
    output x·coef has standard deviation ``signal`` for features with variance ``density``."""
    coef = torch.zeros(n_features, n_out, dtype=torch.float64)
    rows = torch.randperm(n_features, generator=gen)[:n_informative]
    vals = torch.randn(n_informative, n_out, generator=gen, dtype=torch.float64)
    vals = vals * (signal / torch.sqrt(density * (vals**2).sum(0, keepdim=True)))
    coef[rows] = vals
    return coef


def make_synthetic_classification(
    n_samples: int,
    n_features: int,
    n_informative: int | None = None,
    *,
    n_classes: int = 2,
    sparse_density: float | None = None,
    logit_scale: float = 4.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    chunk_size: int = 65536,
) -> tuple[Tensor, Tensor, Tensor]:
    """A logistic / softmax classification problem in which few features matter.

    x_j has i.i.d. N(0, 1) entries (dense), or entries present with probability
    ``sparse_density`` (CSR, N(0, 1) values). A coefficient matrix W* (d, K) is nonzero on
    ``n_informative`` random rows (default d/10), scaled so that each logit x·W*_c has
    standard deviation ``logit_scale``; labels are drawn from softmax(x W*) by the Gumbel-max
    trick (binary: y ~ Bernoulli(σ(x·w*)), W* of shape (d, 1)). The remaining features are pure
    noise, so a per-feature ℓ2 strength can learn to suppress them.

    Memory: features are generated chunk by chunk (``chunk_size`` rows) directly into the
    output, in float32 by default; 10⁶ × 100 dense is 400 MB, sparse costs ~12 bytes per
    nonzero. Results are deterministic given all arguments (including ``chunk_size``).

    Returns:
        (X, y, coef): X (n, d); y (n,) int64 in [0, n_classes); coef W* (d, 1) or (d, K),
        float64 (its nonzero rows are the informative features).
    """
    n_informative = _check_synthetic_args(n_samples, n_features, n_informative, sparse_density)
    if not isinstance(n_classes, int) or n_classes < 2:
        raise BilevelError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    gen = torch.Generator().manual_seed(int(seed))
    density = 1.0 if sparse_density is None else float(sparse_density)
    n_out = 1 if n_classes == 2 else n_classes
    coef = _informative_coef(n_features, n_informative, n_out, logit_scale, density, gen)
    X = _generate_features(n_samples, n_features, sparse_density, gen, dtype, device, chunk_size)
    logits = _matvec_chunks(X, coef.to(dtype=dtype, device=X.device), chunk_size)
    u = torch.rand(logits.shape, generator=gen, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    u = u.to(logits.device)
    if n_classes == 2:
        # y = 1 iff z + logistic noise > 0, i.e. y ~ Bernoulli(σ(z))
        y = (logits[:, 0].to(torch.float64) + torch.log(u[:, 0] / (1 - u[:, 0])) > 0).long()
    else:
        y = torch.argmax(logits.to(torch.float64) - torch.log(-torch.log(u)), dim=1)
    return X, y, coef.to(device=X.device)


def make_synthetic_regression(
    n_samples: int,
    n_features: int,
    n_informative: int | None = None,
    *,
    sparse_density: float | None = None,
    noise: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    chunk_size: int = 65536,
) -> tuple[Tensor, Tensor, Tensor]:
    """Linear regression y = x·w* + noise·N(0, 1) in which few features matter.

    Features as in :func:`make_synthetic_classification`; w* is nonzero on ``n_informative``
    random features and scaled so that x·w* has unit standard deviation.

    Returns:
        (X, y, coef): X (n, d); y (n,) of ``dtype``; coef w* (d,) float64.
    """
    n_informative = _check_synthetic_args(n_samples, n_features, n_informative, sparse_density)
    if not (math.isfinite(noise) and noise >= 0):
        raise BilevelError(f"noise must be a finite non-negative number, got {noise}")
    gen = torch.Generator().manual_seed(int(seed))
    density = 1.0 if sparse_density is None else float(sparse_density)
    coef = _informative_coef(n_features, n_informative, 1, 1.0, density, gen)
    X = _generate_features(n_samples, n_features, sparse_density, gen, dtype, device, chunk_size)
    signal = _matvec_chunks(X, coef.to(dtype=dtype, device=X.device), chunk_size)[:, 0]
    eps = torch.randn(n_samples, generator=gen, dtype=dtype).to(signal.device)
    return X, signal + noise * eps, coef[:, 0].to(device=X.device)
