"""Property-based fuzzing of the command line and the file readers: random option values and
malformed files end in one error line (or a valid result), never in a traceback or in silent
garbage. The jobs' work is replaced by a marker, so every example stops where work would
begin: after every option and input has been checked."""

from __future__ import annotations

import contextlib
import io
import pathlib
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bilevel.cli import main
from bilevel.config import job_record
from bilevel.imaging import apply as imaging_apply
from bilevel.imaging import job as imaging_job
from bilevel.imaging.config import DenoiseConfig, job_config
from bilevel.imaging.data import load_image
from bilevel.learning import job as hpo_job
from bilevel.learning.datasets import read_csv, read_svmlight
from bilevel.learning.hpo import load_data
from bilevel.problem import BilevelError
from bilevel.runs import save_torch, write_json

pytestmark = pytest.mark.slow

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class Reached(BaseException):
    """The job got past every check and would start working now."""


def _reached(*args, **kwargs):
    raise Reached


NUMBERS = st.sampled_from(
    ["0", "-1", "1", "2", "3", "7", "16", "25", "0.5", "1e-300", "1e300", "nan", "inf", "-inf"]
)
JUNK = st.text(alphabet="ab:,.-_/ 0123456789eé\t", max_size=10)
INTS = st.one_of(st.integers(-3, 24).map(str), NUMBERS, JUNK)
FLOATS = st.one_of(NUMBERS, st.floats(-1e3, 1e3).map(repr), JUNK)
SCHEDULES = st.one_of(
    st.sampled_from(
        ["poly:0.1,0.5", "poly:1e-2,0.25", "const:0.01", "0.05", "poly:", "poly:nan,1", "-1"]
    ),
    JUNK,
)


def _options(pairs: dict[str, st.SearchStrategy], flags: list[str]) -> st.SearchStrategy:
    """argv fragments: a random subset of the options with random values, and of the flags."""
    names = sorted(pairs)
    return st.tuples(
        st.lists(st.sampled_from(names), unique=True, max_size=5).flatmap(
            lambda chosen: st.tuples(*[pairs[n].map(lambda v, n=n: [n, v]) for n in chosen])
        ),
        st.lists(st.sampled_from(flags), unique=True, max_size=2),
    ).map(lambda t: [x for pair in t[0] for x in pair] + list(t[1]))


IMAGING = {
    "--regulariser": st.sampled_from(["foe", "ridge", "icnn", "tv", "fo"]),
    "--filters": INTS,
    "--filter-size": INTS,
    "--method": st.sampled_from(["adam-isgd", "isgd", "maid", "sgd"]),
    "--step": SCHEDULES,
    "--accuracy": SCHEDULES,
    "--batch-size": INTS,
    "--crop": INTS,
    "--train-size": INTS,
    "--test-size": INTS,
    "--sigma": FLOATS,
    "--budget": INTS,
    "--time": FLOATS,
    "--eval-every": INTS,
    "--device": st.sampled_from(["cpu", "cpu:0", "cuda", "meta", "foo", ""]),
    "--threads": st.integers(-1, 2).map(str),
    "--dtype": st.sampled_from(["float32", "float64", "half"]),
    "--seed": INTS,
    "--checkpoint-every": INTS,
    "--data": st.sampled_from(["bundled", "no/such/folder", ""]),
}
DEBLUR = {**IMAGING, "--blur": FLOATS, "--kernel-size": INTS, "--gamma": FLOATS}
INPAINT = {**IMAGING, "--keep": FLOATS, "--gamma": FLOATS}
HPO = {
    "--data": st.sampled_from(
        ["iris", "wine", "diabetes", "synthetic:60:3", "synthetic:x", "synthetic:5", "nope", ""]
    ),
    "--model": st.sampled_from(["logistic", "ridge", "hypercleaning"]),
    "--method": st.sampled_from(["sid", "aid-cg", "itd"]),
    "--cv": INTS,
    "--step": SCHEDULES,
    "--inner-steps": INTS,
    "--batch-size": INTS,
    "--budget": FLOATS,
    "--time": FLOATS,
    "--steps": INTS,
    "--label-noise": FLOATS,
    "--theta-range": st.one_of(st.sampled_from(["-5,1", "1,-5", "nan,1", "0,0"]), JUNK),
    "--init": st.one_of(st.sampled_from(["baseline", "0.5", "nan"]), JUNK),
    "--shrinkage": FLOATS,
    "--eval-every": INTS,
    "--checkpoint-every": INTS,
    "--device": st.sampled_from(["cpu", "cuda:3", "foo"]),
    "--label-column": JUNK,
    "--svmlight-indexing": st.sampled_from(["auto", "zero", "one", "two"]),
    "--sid-solver": st.sampled_from(["svrg", "sgd", "saga"]),
}


def _run_cli(argv: list[str]) -> tuple[str, int | None, str]:
    """("reached" | "exit", status, stderr) of ``bilevel ARGV`` with the work replaced."""
    err, out = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    except Reached:
        return "reached", None, err.getvalue()
    finally:
        torch.set_num_threads(threads)
    return "exit", code, err.getvalue()


def _check_outcome(argv: list[str], outcome: tuple[str, int | None, str]) -> None:
    kind, code, err = outcome
    assert "Traceback" not in err, (argv, err)
    if kind == "reached":
        return
    assert code == 2, (argv, code, err)  # a user mistake, not an unexpected failure (1)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and "error: " in lines[-1], (argv, err)
    assert "--debug" not in lines[-1], (argv, err)
    if not lines[0].startswith("usage:"):  # argparse's own message has its usage line
        assert len(lines) == 1, (argv, err)


@pytest.fixture
def no_work(monkeypatch):
    monkeypatch.setattr(imaging_job, "train", _reached)
    monkeypatch.setattr(hpo_job, "_train", _reached)
    monkeypatch.setattr(imaging_apply, "reconstruct", _reached)


@pytest.mark.parametrize(
    "job, options", [("denoise", IMAGING), ("deblur", DEBLUR), ("inpaint", INPAINT)]
)
def test_imaging_options_fuzz(job, options, no_work):
    @FUZZ
    @given(extra=_options(options, ["--color", "--resume", "--overwrite", "--json"]))
    def check(extra):
        with tempfile.TemporaryDirectory() as tmp:
            argv = [job, "--no-progress", "--run-dir", str(pathlib.Path(tmp) / "run"), *extra]
            _check_outcome(argv, _run_cli(argv))

    check()


def test_hpo_options_fuzz(no_work):
    @FUZZ
    @given(extra=_options(HPO, ["--resume", "--overwrite", "--json", "--no-plots"]))
    def check(extra):
        with tempfile.TemporaryDirectory() as tmp:
            argv = ["hpo", "--no-progress", "--run-dir", str(pathlib.Path(tmp) / "run"), *extra]
            _check_outcome(argv, _run_cli(argv))

    check()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished denoise run directory (tiny FoE; θ as initialised)."""
    run_dir = tmp_path_factory.mktemp("run")
    config = job_config("denoise", filters=2, filter_size=3)
    regulariser = imaging_job.make_regulariser(config, 1)
    write_json(run_dir / "job.json", job_record(config))
    state = {f"regulariser.{k}": v for k, v in regulariser.state_dict().items()}
    save_torch(run_dir / "model.pt", state)
    write_json(run_dir / "result.json", {"status": "budget", "finished": True})
    return run_dir


IMAGE_BYTES = st.one_of(
    st.binary(max_size=64).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
    st.binary(max_size=64),
    st.builds(
        lambda h, w, mode, depth: _png_bytes(h, w, mode, depth),
        st.integers(0, 24),
        st.integers(0, 24),
        st.sampled_from(["L", "RGB", "RGBA", "LA", "P", "1", "I;16"]),
        st.integers(0, 255),
    ),
)


def _png_bytes(h: int, w: int, mode: str, level: int) -> bytes:
    from PIL import Image

    if h == 0 or w == 0:
        return b""
    buffer = io.BytesIO()
    if mode == "I;16":
        Image.fromarray(np.full((h, w), level * 257, dtype=np.uint16)).save(buffer, "PNG")
    else:
        Image.new(mode, (w, h), level if mode in ("L", "P", "1") else None).save(buffer, "PNG")
    return buffer.getvalue()


def test_reconstruct_options_and_image_files_fuzz(finished_run, no_work):
    options = {
        "--tol": FLOATS,
        "--max-iter": INTS,
        "--seed": INTS,
        "--out": st.sampled_from(["out", "job.json"]),
        "--mask": st.sampled_from(["mask.png", "missing.png"]),
    }

    @FUZZ
    @given(
        extra=_options(options, ["--add-noise", "--final", "--json"]),
        image=IMAGE_BYTES,
        mask=IMAGE_BYTES,
    )
    def check(extra, image, mask):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = pathlib.Path(tmp)
            (tmp / "image.png").write_bytes(image)
            (tmp / "mask.png").write_bytes(mask)
            extra = [str(tmp / v) if v in ("out", "mask.png", "missing.png") else v for v in extra]
            extra = [str(finished_run / v) if v == "job.json" else v for v in extra]
            argv = ["reconstruct", str(finished_run), str(tmp / "image.png"), *extra]
            _check_outcome(argv, _run_cli(argv))

    check()


CSV_TEXT = st.lists(
    st.lists(
        st.one_of(
            st.sampled_from(["1", "0", "2", "-1.5", "nan", "NA", "", "x", "inf", "3e2", "#"]),
            st.floats(-10, 10).map(lambda v: f"{v:.3g}"),
        ),
        min_size=1,
        max_size=4,
    ).map(",".join),
    max_size=12,
).map("\n".join)

SVM_TEXT = st.lists(
    st.tuples(
        st.sampled_from(["1", "-1", "0", "2.5", "nan", "x", "+1"]),
        st.lists(
            st.tuples(
                st.sampled_from(["0", "1", "2", "3", "-1", "a", "1.5", ""]),
                st.sampled_from(["1", "0.5", "-2", "nan", "x", ""]),
            ).map(":".join),
            max_size=3,
        ).map(" ".join),
    ).map(" ".join),
    max_size=8,
).map("\n".join)


@FUZZ
@given(text=CSV_TEXT, label=st.sampled_from(["-1", "0", "1", "label", "9"]))
def test_csv_reader_and_labels_fuzz(text, label):
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "data.csv"
        path.write_text(text)
        try:
            X, labels, _ = read_csv(path, label)
        except BilevelError:
            return
        assert bool(torch.isfinite(X).all()) and X.shape[0] == len(labels) >= 1
        try:
            data = load_data(str(path), label_column=label)
        except BilevelError:
            return
        assert data.n_classes >= 2
        for y in (data.y_train, data.y_val, data.y_test):
            assert int(y.min()) >= 0 and int(y.max()) < data.n_classes


@FUZZ
@given(text=SVM_TEXT, zero_based=st.sampled_from(["auto", True, False]))
def test_svmlight_reader_fuzz(text, zero_based):
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "data.svm"
        path.write_text(text)
        try:
            X, y = read_svmlight(path, zero_based=zero_based, dense=True)
        except BilevelError:
            return
        assert bool(torch.isfinite(X).all()) and bool(torch.isfinite(y).all())
        assert X.shape[0] == y.shape[0]


@FUZZ
@given(data=IMAGE_BYTES, color=st.booleans())
def test_image_reader_fuzz(data, color):
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "image.png"
        path.write_bytes(data)
        try:
            x = load_image(path, color=color)
        except BilevelError:
            return
        assert x.shape[0] == (3 if color else 1) and min(x.shape[1:]) >= 1
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_namespace_marker_is_not_a_user_option():
    """The fuzzers stop at the work functions; make sure those are what the jobs call."""
    assert callable(imaging_job.train) and callable(hpo_job._train)
    assert isinstance(job_config("denoise"), DenoiseConfig)
