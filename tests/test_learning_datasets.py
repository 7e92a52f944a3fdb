"""Tests for ``bilevel.learning.datasets``: loaders, idx / svmlight / CSV readers, splits,
generators."""

from __future__ import annotations

import gzip
import pathlib
import re
import struct

import numpy as np
import pytest
import torch

from bilevel.learning import (
    SplitData,
    encode_labels,
    from_scipy,
    load_mnist,
    load_sklearn,
    make_synthetic_classification,
    make_synthetic_regression,
    predict_logistic,
    read_csv,
    read_idx,
    read_svmlight,
    select_rows,
    split_data,
    to_csr,
)
from bilevel.learning.datasets import (
    class_labels,
    column_scaling,
    random_folds,
    scale_columns,
    sparse_column_scaling,
    stack_rows,
)
from bilevel.learning.hpo import load_data
from bilevel.problem import BilevelError

MNIST = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"

sklearn_datasets = pytest.importorskip("sklearn.datasets")


def _raw(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    X, y = getattr(sklearn_datasets, f"load_{name}")(return_X_y=True)
    return torch.as_tensor(np.asarray(X, dtype=np.float64)), torch.as_tensor(y)


# --------------------------------------------------------------------------------------------
# scikit-learn loaders and splits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["breast_cancer", "digits", "iris", "wine", "diabetes"])
def test_load_sklearn_splits_are_disjoint_and_complete(name):
    data = load_sklearn(name, seed=3, val_fraction=0.25, test_fraction=0.15)
    X_raw, y_raw = _raw(name)
    n = X_raw.shape[0]
    assert isinstance(data, SplitData)
    assert data.X_train.dtype == torch.float64
    assert data.n_features == X_raw.shape[1]
    parts = [data.train_index, data.val_index, data.test_index]
    assert sum(p.numel() for p in parts) == n
    allidx = torch.cat(parts)
    assert torch.equal(torch.sort(allidx).values, torch.arange(n))
    assert data.X_train.shape[0] == data.y_train.shape[0] == parts[0].numel()
    assert data.X_val.shape[0] == data.y_val.shape[0] == parts[1].numel()
    assert data.X_test.shape[0] == data.y_test.shape[0] == parts[2].numel()
    assert abs(parts[1].numel() / n - 0.25) < 0.03
    assert abs(parts[2].numel() / n - 0.15) < 0.03
    if name == "diabetes":
        assert data.n_classes is None and data.task == "regression"
        assert data.y_train.dtype == torch.float64
        assert abs(float(data.y_train.mean())) < 1e-10
        torch.testing.assert_close(data.y_val, y_raw[parts[1]].double() - data.target_mean)
    else:
        assert data.task == "classification"
        assert data.y_train.dtype == torch.int64
        assert data.n_classes == int(y_raw.max()) + 1
        assert torch.equal(data.y_test, y_raw[parts[2]].long())


def test_load_sklearn_is_deterministic():
    a = load_sklearn("iris", seed=5)
    b = load_sklearn("iris", seed=5)
    c = load_sklearn("iris", seed=6)
    for field in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.train_index, c.train_index)
    assert a.feature_names[0] == "sepal length (cm)" and len(a.feature_names) == a.n_features
    assert a.to(dtype=torch.float32).feature_names == a.feature_names


def test_standardisation_uses_training_statistics():
    data = load_sklearn("breast_cancer", seed=1)
    X_raw, _ = _raw("breast_cancer")
    tr = X_raw[data.train_index]
    mean, std = tr.mean(0), tr.std(0, unbiased=False)
    torch.testing.assert_close(data.X_train.mean(0), torch.zeros(30, dtype=torch.float64))
    torch.testing.assert_close(data.X_train.std(0, unbiased=False), torch.ones(30).double())
    torch.testing.assert_close(data.X_val, (X_raw[data.val_index] - mean) / std)
    torch.testing.assert_close(data.X_test, (X_raw[data.test_index] - mean) / std)
    # validation statistics are not those of the training part
    assert float(data.X_val.mean(0).abs().max()) > 1e-3
    torch.testing.assert_close(data.feature_mean, mean)


def test_column_scaling_rules():
    X = torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, -2.0], [5.0, 5.0, 0.0]], dtype=torch.float64)
    mean, scale = column_scaling(X)
    torch.testing.assert_close(mean, torch.tensor([3.0, 5.0, 0.0], dtype=torch.float64))
    # the constant column keeps scale 1 (no division by a roundoff-sized deviation)
    torch.testing.assert_close(scale[1], torch.tensor(1.0, dtype=torch.float64))
    Z = (X - mean) / scale
    torch.testing.assert_close(Z[:, [0, 2]].pow(2).mean(0), torch.ones(2, dtype=torch.float64))
    # without centring: root mean square about 0
    mean0, scale0 = column_scaling(X, center=False)
    assert torch.all(mean0 == 0)
    torch.testing.assert_close(scale0, X.pow(2).mean(0).sqrt())


def test_stratified_split_keeps_class_proportions():
    data = load_sklearn("digits", seed=0, val_fraction=0.2, test_fraction=0.2)
    _, y = _raw("digits")
    for c in range(10):
        n_c = int((y == c).sum())
        assert int((data.y_val == c).sum()) == round(0.2 * n_c)
        assert int((data.y_test == c).sum()) == round(0.2 * n_c)


def test_split_data_constant_feature_and_float32():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(50, 3, generator=gen, dtype=torch.float32)
    X[:, 1] = 7.0
    y = (X[:, 0] > 0).long()
    data = split_data(X, y, n_classes=2, seed=0)
    assert data.X_train.dtype == torch.float32
    assert float(data.feature_scale[1]) == 1.0
    assert float(data.X_train[:, 1].abs().max()) == 0.0
    moved = data.to(dtype=torch.float64)
    assert moved.X_train.dtype == torch.float64 and moved.y_train.dtype == torch.int64


def test_split_and_loader_errors():
    with pytest.raises(BilevelError, match="unknown data set"):
        load_sklearn("imagenet")
    with pytest.raises(BilevelError, match="below 1"):
        load_sklearn("iris", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(BilevelError, match="val_fraction"):
        load_sklearn("iris", val_fraction=-0.1)
    X = torch.randn(10, 2)
    with pytest.raises(BilevelError, match="outside"):
        split_data(X, torch.arange(10), n_classes=3)
    X_bad = X.clone()
    X_bad[0, 0] = float("nan")
    with pytest.raises(BilevelError, match="NaN"):
        split_data(X_bad, torch.zeros(10))
    with pytest.raises(BilevelError, match="one entry per row"):
        split_data(X, torch.zeros(9))


# --------------------------------------------------------------------------------------------
# idx files
# --------------------------------------------------------------------------------------------


_CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


def _idx_bytes(arr: np.ndarray) -> bytes:
    code = _CODES[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def _write(path: pathlib.Path, payload: bytes, gz: bool) -> pathlib.Path:
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_round_trip(tmp_path, gz, dtype):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((4, 3, 5)) * 50).astype(dtype)
    path = _write(tmp_path / "a.idx", _idx_bytes(arr), gz)
    out = read_idx(path)
    assert tuple(out.shape) == arr.shape
    np.testing.assert_array_equal(out.numpy(), arr)


def test_read_idx_one_dimensional(tmp_path):
    arr = np.arange(10, dtype=np.uint8)
    out = read_idx(_write(tmp_path / "labels.gz", _idx_bytes(arr), True))
    assert out.dtype == torch.uint8 and out.tolist() == list(range(10))


def test_read_idx_errors(tmp_path):
    good = _idx_bytes(np.zeros((2, 3), dtype=np.uint8))
    bad_magic = b"\x01" + good[1:]
    with pytest.raises(BilevelError, match="magic"):
        read_idx(_write(tmp_path / "m", bad_magic, False))
    with pytest.raises(BilevelError, match="magic"):
        read_idx(_write(tmp_path / "m.gz", bad_magic, True))
    with pytest.raises(BilevelError, match="type code"):
        read_idx(_write(tmp_path / "c", good[:2] + b"\x07" + good[3:], False))
    with pytest.raises(BilevelError, match="payload"):
        read_idx(_write(tmp_path / "t", good[:-1], False))
    with pytest.raises(BilevelError, match="payload"):
        read_idx(_write(tmp_path / "x", good + b"\x00", True))
    with pytest.raises(BilevelError, match="header"):
        read_idx(_write(tmp_path / "h", good[:6], False))
    with pytest.raises(BilevelError, match="not an idx"):
        read_idx(_write(tmp_path / "s", b"\x00\x00", False))
    with pytest.raises(BilevelError, match="gzip"):
        read_idx(_write(tmp_path / "z", gzip.compress(good)[:-6], False))


def _fake_mnist(folder: pathlib.Path, n: int = 40) -> np.ndarray:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    _write(folder / "t10k-images-idx3-ubyte.gz", _idx_bytes(images), True)
    _write(folder / "t10k-labels-idx1-ubyte", _idx_bytes(labels), False)
    return images


def test_load_mnist_from_written_files(tmp_path):
    images = _fake_mnist(tmp_path)
    data = load_mnist(tmp_path, standardize=False, val_fraction=0.2, test_fraction=0.2)
    assert data.n_features == 784 and data.n_classes == 10
    assert data.X_train.dtype == torch.float32
    expected = torch.as_tensor(images.reshape(40, -1)[data.train_index.numpy()]) / 255.0
    torch.testing.assert_close(data.X_train, expected.float())
    std = load_mnist(tmp_path, classes=(3, 8))
    assert std.n_classes == 2 and std.name == "mnist38"
    assert set(torch.cat([std.y_train, std.y_val, std.y_test]).tolist()) == {0, 1}
    with pytest.raises(FileNotFoundError):
        load_mnist(tmp_path / "missing")
    with pytest.raises(BilevelError, match="classes"):
        load_mnist(tmp_path, classes=(3, 3))


@pytest.mark.skipif(not MNIST.is_dir(), reason="shared MNIST data not available")
def test_shared_mnist():
    images = read_idx(MNIST / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and int(labels.max()) == 9
    data = load_mnist(MNIST, n_samples=600, seed=2)
    assert data.n_train + data.X_val.shape[0] + data.X_test.shape[0] == 600
    assert data.n_features == 784
    assert float(data.X_train.mean(0).abs().max()) < 1e-4
    again = load_mnist(MNIST, n_samples=600, seed=2)
    assert torch.equal(data.X_val, again.X_val)


# --------------------------------------------------------------------------------------------
# svmlight
# --------------------------------------------------------------------------------------------

SVM_TEXT = """# a comment line
1 qid:4 1:0.5 3:-2
-1 2:1.5e0  # trailing comment

+1
0 1:1 4:3
"""

SVM_DENSE = torch.tensor(
    [[0.5, 0.0, -2.0, 0.0], [0.0, 1.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 3.0]]
)


@pytest.mark.parametrize("gz", [False, True])
def test_read_svmlight_dense_and_sparse_agree(tmp_path, gz):
    path = _write(tmp_path / "f.svm", SVM_TEXT.encode(), gz)
    Xd, y = read_svmlight(path, dense=True)
    Xs, y2 = read_svmlight(path, dense=False)
    assert Xs.layout == torch.sparse_csr and Xs.shape == (4, 4)
    torch.testing.assert_close(Xd, SVM_DENSE)
    torch.testing.assert_close(Xs.to_dense(), Xd)
    assert y.tolist() == [1.0, -1.0, 1.0, 0.0] and torch.equal(y, y2)
    codes, classes = encode_labels(y)
    assert classes.tolist() == [-1.0, 0.0, 1.0] and codes.tolist() == [2, 0, 2, 1]
    wide, _ = read_svmlight(path, n_features=7, dense=True, dtype=torch.float64)
    assert wide.shape == (4, 7) and wide.dtype == torch.float64


def test_read_svmlight_matches_sklearn(tmp_path):
    path = _write(tmp_path / "f.svm", SVM_TEXT.encode(), False)
    X_ref, y_ref = sklearn_datasets.load_svmlight_file(str(path))
    X, y = read_svmlight(path, dense=True, dtype=torch.float64)
    np.testing.assert_allclose(X.numpy(), X_ref.toarray())
    np.testing.assert_allclose(y.numpy(), y_ref)


def test_read_svmlight_indexing(tmp_path):
    path = _write(tmp_path / "z.svm", b"1 0:2 2:1\n0 4:1 1:5\n", False)
    X, _ = read_svmlight(path, dense=True)  # auto: index 0 present -> zero-based
    assert X.shape == (2, 5)
    assert X[0].tolist() == [2, 0, 1, 0, 0] and X[1].tolist() == [0, 5, 0, 0, 1]
    X1, _ = read_svmlight(path, dense=True, zero_based=True)
    assert torch.equal(X, X1)
    with pytest.raises(BilevelError, match="invalid"):
        read_svmlight(path, zero_based=False)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("1 a:2\n", "not an integer"),
        ("1 3:x\n", "not a number"),
        ("1 3\n", "malformed"),
        ("1 1:2:3\n", "malformed"),
        ("1 2:1 2:3\n", "duplicate"),
        ("1,2 1:1\n", "multi-label"),
        ("1 1:nan\n", "NaN"),
    ],
)
def test_read_svmlight_errors(tmp_path, text, match):
    path = _write(tmp_path / "bad.svm", text.encode(), False)
    with pytest.raises(BilevelError, match=match):
        read_svmlight(path)


def test_read_svmlight_too_few_features(tmp_path):
    path = _write(tmp_path / "f.svm", SVM_TEXT.encode(), False)
    with pytest.raises(BilevelError, match="n_features"):
        read_svmlight(path, n_features=2)


# --------------------------------------------------------------------------------------------
# Synthetic generators and sparse helpers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_classes", [2, 4])
def test_synthetic_classification_dense(n_classes):
    X, y, coef = make_synthetic_classification(
        600, 40, 5, n_classes=n_classes, seed=1, chunk_size=128
    )
    assert X.shape == (600, 40) and X.dtype == torch.float32 and X.layout == torch.strided
    assert y.shape == (600,) and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(n_classes))
    assert coef.shape == (40, 1 if n_classes == 2 else n_classes)
    assert int((coef.abs().sum(1) > 0).sum()) == 5
    X2, y2, coef2 = make_synthetic_classification(
        600, 40, 5, n_classes=n_classes, seed=1, chunk_size=128
    )
    assert torch.equal(X, X2) and torch.equal(y, y2) and torch.equal(coef, coef2)
    X3, _, _ = make_synthetic_classification(600, 40, 5, n_classes=n_classes, seed=2)
    assert not torch.equal(X, X3)
    # the generating coefficients predict the labels far better than chance
    w = coef[:, 0] if n_classes == 2 else coef
    acc = float((predict_logistic(w.float(), X) == y).float().mean())
    assert acc > 0.7


def test_synthetic_classification_sparse():
    X, y, coef = make_synthetic_classification(
        2000, 300, 30, sparse_density=0.02, seed=0, chunk_size=512
    )
    assert X.layout == torch.sparse_csr and X.shape == (2000, 300)
    assert X.dtype == torch.float32
    density = X.values().numel() / (2000 * 300)
    assert abs(density - 0.02) < 0.002
    dense = X.to_dense()
    assert torch.count_nonzero(dense) == X.values().numel()  # no repeated entries
    X2, y2, _ = make_synthetic_classification(
        2000, 300, 30, sparse_density=0.02, seed=0, chunk_size=512
    )
    assert torch.equal(X2.to_dense(), dense) and torch.equal(y, y2)
    assert set(y.tolist()) == {0, 1}


def test_synthetic_regression():
    X, y, coef = make_synthetic_regression(500, 20, 4, noise=0.1, seed=0, dtype=torch.float64)
    assert X.shape == (500, 20) and y.shape == (500,) and coef.shape == (20,)
    assert int((coef != 0).sum()) == 4
    resid = y - X @ coef
    assert 0.05 < float(resid.std()) < 0.15
    Xs, ys, _ = make_synthetic_regression(500, 20, 4, sparse_density=0.3, seed=0)
    assert Xs.layout == torch.sparse_csr and ys.dtype == torch.float32


def test_synthetic_argument_errors():
    with pytest.raises(BilevelError, match="n_informative"):
        make_synthetic_classification(10, 5, 6)
    with pytest.raises(BilevelError, match="sparse_density"):
        make_synthetic_classification(10, 5, 2, sparse_density=0.0)
    with pytest.raises(BilevelError, match="n_samples"):
        make_synthetic_regression(0, 5)


def test_select_rows_and_sparse_split():
    X, y, _ = make_synthetic_classification(300, 50, 5, sparse_density=0.1, seed=3)
    idx = torch.tensor([5, 0, 299, 5, 17])
    torch.testing.assert_close(select_rows(X, idx).to_dense(), X.to_dense()[idx])
    assert select_rows(X, torch.tensor([], dtype=torch.long)).shape == (0, 50)
    coo = X.to_dense().to_sparse()
    torch.testing.assert_close(to_csr(coo).to_dense(), X.to_dense())
    data = split_data(X, y, n_classes=2, seed=0)
    assert data.sparse and data.X_val.layout == torch.sparse_csr
    assert set(data.train_index.tolist()).isdisjoint(data.val_index.tolist())
    rms = data.X_train.to_dense().pow(2).mean(0).sqrt()
    torch.testing.assert_close(rms, torch.ones(50), rtol=1e-5, atol=1e-5)
    raw_val = X.to_dense()[data.val_index] / data.feature_scale
    torch.testing.assert_close(data.X_val.to_dense(), raw_val)


def test_from_scipy_and_sparse_scaling():
    scipy_sparse = pytest.importorskip("scipy.sparse")
    rows, cols = np.array([0, 0, 2, 2, 1]), np.array([3, 0, 1, 1, 3])
    vals = np.array([1.0, -2.0, 0.5, 1.5, 4.0])
    coo = scipy_sparse.coo_matrix((vals, (rows, cols)), shape=(3, 5))  # (2, 1) twice
    X = from_scipy(coo)
    assert X.layout == torch.sparse_csr and X.crow_indices().dtype == torch.int64
    assert X.dtype == torch.float64 and X.shape == (3, 5)
    dense = torch.from_numpy(coo.toarray())
    assert torch.equal(X.to_dense(), dense) and float(X.to_dense()[2, 1]) == 2.0
    assert from_scipy(coo.astype(np.float32)).dtype == torch.float32
    # root mean square per column, 1 for the empty columns 2 and 4; nothing is centred
    scale = sparse_column_scaling(X)
    expected = (dense**2).mean(0).sqrt()
    expected[[2, 4]] = 1.0
    assert torch.allclose(scale, expected)
    assert torch.allclose(scale_columns(X, scale).to_dense(), dense / expected)


def test_read_csv_header_names_and_text_labels(tmp_path):
    path = tmp_path / "flowers.csv"
    path.write_text(
        "# measurements\nlength, width,species\n1.5,0.2,setosa\n\n4.7,1.4, versicolor\n"
        "5.1,1.9,virginica\n"
    )
    X, labels, names = read_csv(path)
    assert X.dtype == torch.float32 and names == ["length", "width"]
    torch.testing.assert_close(X, torch.tensor([[1.5, 0.2], [4.7, 1.4], [5.1, 1.9]]))
    assert labels.tolist() == ["setosa", "versicolor", "virginica"]
    # a label column by name; numeric labels come back as float64
    numeric = tmp_path / "numeric.csv"
    numeric.write_text("length,width,code\n1.5,0.2,0\n4.7,1.4,1\n")
    X, widths, names = read_csv(numeric, "width", dtype=torch.float64)
    assert widths.dtype == np.float64 and widths.tolist() == [0.2, 1.4]
    assert names == ["length", "code"] and X.tolist() == [[1.5, 0.0], [4.7, 1.0]]
    # a text column among the features is an error that names it
    with pytest.raises(BilevelError, match="line 3: feature 'setosa' is not a number"):
        read_csv(path, "length")


def test_read_csv_without_header_tsv_and_gzip(tmp_path):
    rows = np.arange(12, dtype=float).reshape(4, 3)
    text = "\n".join("\t".join(f"{v:g}" for v in row) for row in rows) + "\n"
    (tmp_path / "t.tsv").write_text(text)
    (tmp_path / "t.tsv.gz").write_bytes(gzip.compress(text.encode()))
    for name in ("t.tsv", "t.tsv.gz"):
        X, labels, names = read_csv(tmp_path / name, 0, dtype=torch.float64)
        assert names is None and labels.tolist() == [0.0, 3.0, 6.0, 9.0]
        assert torch.equal(X, torch.from_numpy(rows[:, 1:]))


@pytest.mark.parametrize(
    ("text", "options", "message"),
    [
        ("a,b\n1,2\n3\n", {}, "line 3: 1 fields, expected 2"),
        ("1,2\n3,x\n", {"label_column": 0}, "line 2: feature 'x' is not a number"),
        ("1,2,0\n3,,1\n", {}, "line 2: empty field in feature column 2"),
        ("1,2\n3,\n", {}, "line 2: empty label"),
        ("a,b\n1,2\n", {"label_column": "c"}, "no column named 'c'"),
        ("1,2\n", {"label_column": "c"}, "the file has no header"),
        ("1,2\n", {"label_column": 5}, "outside the 2 columns"),
        ("1\n2\n", {}, "at least one feature column"),
        ("a,b\n", {}, "a header but no data rows"),
        ("# nothing\n", {}, "no data rows"),
        ("1,inf\n", {"label_column": 0}, "NaN or infinite"),
    ],
)
def test_read_csv_errors(tmp_path, text, options, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(BilevelError, match=re.escape(message)):
        read_csv(path, **options)


def test_stack_rows_and_random_folds():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(4, 3, generator=gen, dtype=torch.float64) * (
        torch.rand(4, 3, generator=gen) < 0.5
    )
    B = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    assert torch.equal(stack_rows(A, B), torch.cat([A, B]))
    sparse = stack_rows(to_csr(A), B)
    assert sparse.layout == torch.sparse_csr and torch.equal(sparse.to_dense(), torch.cat([A, B]))
    with pytest.raises(BilevelError, match="cannot stack"):
        stack_rows(to_csr(A), torch.zeros(1, 2, dtype=torch.float64))
    folds = random_folds(11, 3, seed=4)
    assert folds.shape == (3, 11) and torch.equal(folds.sum(0), torch.ones(11, dtype=torch.long))
    assert sorted(folds.sum(1).tolist()) == [3, 4, 4]
    assert torch.equal(folds, random_folds(11, 3, seed=4))
    assert not torch.equal(folds, random_folds(11, 3, seed=5))
    for bad in (1, 12):
        with pytest.raises(BilevelError, match="folds"):
            random_folds(11, bad)


# --------------------------------------------------------------------------------------------
# class labels must be explicit or unambiguous
# --------------------------------------------------------------------------------------------


def test_class_labels_accepts_integers_and_text():
    codes, k = class_labels(np.array([3.0, 1.0, 3.0, 2.0, 1.0, 2.0]), "y")
    assert k == 3 and codes.tolist() == [2, 0, 2, 1, 0, 1]
    codes, k = class_labels(np.array(["b", "a", "b", "a"]), "y")
    assert k == 2 and codes.tolist() == [1, 0, 1, 0]
    codes, k = class_labels(torch.tensor([-1.0, 1.0, 1.0, -1.0]), "y")
    assert k == 2 and codes.tolist() == [0, 1, 1, 0]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([0.0, 1.0, np.nan, 1.0]), "row 3 has a missing or non-finite label"),
        (np.array(["a", "b", "NA", "a"]), "row 3 has a missing label \\('NA'\\)"),
        (np.array(["a", " ", "b", "a"]), "row 2 has a missing label"),
        (np.array([1.0, 1.25, 1.0, 2.0]), "non-integer values \\(row 2: 1.25\\)"),
        (np.arange(10.0), "10 distinct values in 10 rows, so it looks continuous"),
        (np.ones(6), "all labels are equal"),
    ],
)
def test_class_labels_refuses_what_is_not_class_labels(labels, message):
    with pytest.raises(BilevelError, match=f"my column.*{message}|{message}"):
        class_labels(labels, "my column")


def _breast_cancer_csv(path, with_label=True, nan_row=None):
    X, y = sklearn_datasets.load_breast_cancer(return_X_y=True)
    names = list(sklearn_datasets.load_breast_cancer().feature_names)
    table, header = X, [n.replace(" ", "_") for n in names]
    if with_label:
        labels = y.astype(float)
        if nan_row is not None:
            labels[nan_row] = np.nan
        table, header = np.column_stack([X, labels]), [*header, "label"]
    np.savetxt(path, table, delimiter=",", header=",".join(header), comments="")
    return path


def test_hpo_data_refuses_a_continuous_or_missing_label_column(tmp_path):
    """`bilevel hpo` on a CSV with no label column took the last (continuous) column as the
    label: 535 classes, one validation row, accuracy 0, no warning; a NaN label became a
    class."""
    no_label = _breast_cancer_csv(tmp_path / "features.csv", with_label=False)
    with pytest.raises(BilevelError, match="column -1, the last: no --label-column given.*non-int"):
        load_data(str(no_label))
    with pytest.raises(BilevelError, match="column 'worst_area'.*non-integer"):
        load_data(str(no_label), label_column="worst_area")
    nan_label = _breast_cancer_csv(tmp_path / "nan.csv", nan_row=7)
    with pytest.raises(BilevelError, match="row 8 has a missing or non-finite label"):
        load_data(str(nan_label), label_column="label")
    good = load_data(str(_breast_cancer_csv(tmp_path / "ok.csv")), label_column="label")
    assert good.n_classes == 2 and good.n_features == 30
    with pytest.raises(BilevelError, match="row 8 has a missing or non-finite target"):
        load_data(str(nan_label), regression=True, label_column="label")


@pytest.mark.parametrize("text", [b"1 0:2 2:1\n0 1:5 4:1\n", b"1 1:2 3:1\n0 2:5 5:1\n"])
def test_svmlight_indexing_follows_scikit_learn_auto(tmp_path, text):
    """Index 0 was accepted without a word about zero- or one-based indexing; the indexing
    is scikit-learn's zero_based="auto", reported, and can be set."""
    path = _write(tmp_path / "f.svm", text, False)
    X_ref, _ = sklearn_datasets.load_svmlight_file(str(path), zero_based="auto")
    info: dict = {}
    X, _ = read_svmlight(path, dense=True, dtype=torch.float64, info=info)
    np.testing.assert_array_equal(X.numpy(), X_ref.toarray())
    assert info["zero_based"] is (b" 0:" in text)
    for zero_based in (True, False):
        try:
            X_ref, _ = sklearn_datasets.load_svmlight_file(str(path), zero_based=zero_based)
        except ValueError:
            with pytest.raises(BilevelError, match="invalid"):
                read_svmlight(path, zero_based=zero_based)
            continue
        X, _ = read_svmlight(path, dense=True, dtype=torch.float64, zero_based=zero_based)
        np.testing.assert_array_equal(X.numpy(), X_ref.toarray()[:, : X.shape[1]])
