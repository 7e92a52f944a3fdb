"""Step-size and accuracy schedules: values, composition, configuration and parsing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bilevel.problem import BilevelError
from bilevel.schedules import (
    Accuracy,
    Clipped,
    Constant,
    FromCallable,
    Geometric,
    Logarithmic,
    Polynomial,
    Scaled,
    Schedule,
    accuracy_from_config,
    as_accuracy,
    as_schedule,
    parse_accuracy,
    parse_schedule,
    schedule_from_config,
)


def test_values_of_each_family():
    assert Constant(0.3).values(3) == [0.3, 0.3, 0.3]
    p = Polynomial(1e-2, 0.5)
    assert p(0) == pytest.approx(1e-2)
    assert p(3) == pytest.approx(1e-2 / 2.0)
    assert p(99) == pytest.approx(1e-3)
    lg = Logarithmic(2.0, 1.0)
    assert lg(0) == pytest.approx(2.0 / math.log(2))
    assert lg(5) == pytest.approx(2.0 / math.log(7))
    g = Geometric(0.1, 0.5)
    assert g.values(4) == pytest.approx([0.1, 0.05, 0.025, 0.0125])
    assert Polynomial(3.0, 0.0).values(4) == [3.0] * 4
    assert Geometric(3.0, 1.0)(1000) == 3.0


def test_schedules_decrease_monotonically():
    for s in (Polynomial(1.0, 0.25), Logarithmic(1.0, 2.0), Geometric(1.0, 0.9)):
        v = s.values(50)
        assert all(a > b for a, b in zip(v, v[1:], strict=False))


def test_iteration_index_is_validated():
    s = Polynomial(1.0, 1.0)
    assert s(np.int64(1)) == pytest.approx(0.5)
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(BilevelError, match="non-negative integer"):
            s(bad)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Constant(0.0), "finite and positive"),
        (lambda: Constant(float("nan")), "finite and positive"),
        (lambda: Polynomial(float("inf"), 1.0), "finite and positive"),
        (lambda: Polynomial(1.0, -0.5), ">= 0"),
        (lambda: Logarithmic(-1.0, 1.0), "finite and positive"),
        (lambda: Geometric(1.0, 0.0), "0 < ratio <= 1"),
        (lambda: Geometric(1.0, 1.1), "0 < ratio <= 1"),
        (lambda: Clipped(Constant(1.0)), "minimum, a maximum"),
        (lambda: Clipped(Constant(1.0), minimum=2.0, maximum=1.0), "minimum <= maximum"),
        (lambda: Constant(1.0) * 0.0, "finite and positive"),
        (lambda: Constant("1"), "real number"),
    ],
)
def test_invalid_parameters_raise(make, message):
    with pytest.raises(BilevelError, match=message):
        make()


def test_clipping_and_scaling_compose():
    g = Geometric(1.0, 0.5).clip(minimum=0.1)
    assert g.values(6) == pytest.approx([1.0, 0.5, 0.25, 0.125, 0.1, 0.1])
    both = Polynomial(10.0, 1.0).clip(minimum=1.0, maximum=4.0)
    assert both.values(12)[:4] == pytest.approx([4.0, 4.0, 10 / 3, 2.5])
    assert both(11) == 1.0
    # clipping twice intersects the intervals
    twice = Polynomial(10.0, 1.0).clip(maximum=4.0).clip(minimum=1.0)
    assert twice == both
    with pytest.raises(BilevelError, match="empty interval"):
        Polynomial(10.0, 1.0).clip(maximum=1.0).clip(minimum=2.0)
    # scaling folds into the parameters of the built-in families
    assert Polynomial(1e-2, 0.5) * 2 == Polynomial(2e-2, 0.5)
    assert 0.5 * Geometric(1.0, 0.9) == Geometric(0.5, 0.9)
    assert Constant(3.0) / 3 == Constant(1.0)
    assert (g * 2).values(6) == pytest.approx([2 * v for v in g.values(6)])
    f = FromCallable(lambda k: 1.0 / (k + 1), name="harmonic") * 3
    assert isinstance(f, Scaled)
    assert f(2) == pytest.approx(1.0)
    assert (f * 2).factor == 6.0


def test_repr_and_text_are_readable():
    assert repr(Polynomial(0.01, 0.5)) == "Polynomial(initial=0.01, power=0.5)"
    assert str(Polynomial(0.01, 0.5)) == "poly:0.01,0.5"
    assert str(Geometric(0.1, 0.9).clip(minimum=1e-6)) == "geom:0.1,0.9,min=1e-06"
    assert repr(FromCallable(lambda k: 1.0, name="mine")) == "FromCallable(name='mine')"

    def decay(k):
        return 1.0

    assert FromCallable(decay).name == "decay"
    assert str(FromCallable(decay)) == "FromCallable(name='decay')"


ROUND_TRIP = [
    Constant(1e-3),
    Polynomial(1e-2, 0.5),
    Logarithmic(0.3, 2.0),
    Geometric(0.1, 0.9),
    Geometric(0.1, 0.9).clip(minimum=1e-5, maximum=0.05),
    Polynomial(1.0, 0.25).clip(maximum=0.5),
    Scaled(Polynomial(1.0, 0.25), 3.0),
]


@pytest.mark.parametrize("schedule", ROUND_TRIP, ids=repr)
def test_config_round_trip_through_json(schedule):
    config = json.loads(json.dumps(schedule.to_config()))
    again = schedule_from_config(config)
    assert again == schedule
    assert again.values(20) == schedule.values(20)


@pytest.mark.parametrize("schedule", [s for s in ROUND_TRIP if not isinstance(s, Scaled)])
def test_text_round_trip(schedule):
    assert parse_schedule(schedule.to_text()) == schedule


@given(
    initial=st.floats(1e-12, 1e6, allow_nan=False),
    power=st.floats(0.0, 4.0, allow_nan=False),
    kind=st.sampled_from(["poly", "log"]),
    k=st.integers(0, 10**6),
)
def test_parsed_text_round_trip_property(initial, power, kind, k):
    s = parse_schedule(f"{kind}:{initial!r},{power!r}")
    assert parse_schedule(s.to_text()) == s
    assert schedule_from_config(s.to_config()) == s
    v = s(k)
    assert 0 < v <= s(0)
    assert s(0) == (initial if kind == "poly" else initial / math.log(2) ** power)


def test_from_callable_cannot_be_stored_and_checks_values():
    s = FromCallable(lambda k: 0.1 * (k + 1), name="growing")
    assert s(4) == pytest.approx(0.5)
    with pytest.raises(BilevelError, match="cannot be stored"):
        s.to_config()
    with pytest.raises(BilevelError, match="cannot be stored"):
        s.clip(minimum=0.01).to_config()
    with pytest.raises(BilevelError, match="no command-line form"):
        s.to_text()
    bad = FromCallable(lambda k: -1.0 if k else 1.0, name="bad")
    assert bad(0) == 1.0
    with pytest.raises(BilevelError, match="'bad' returned -1.0 at k=1"):
        bad(1)
    with pytest.raises(BilevelError, match="callable"):
        FromCallable(3.0)


def test_schedule_from_config_errors():
    assert schedule_from_config(0.5) == Constant(0.5)
    with pytest.raises(BilevelError, match="unknown schedule kind 'cosine'"):
        schedule_from_config({"kind": "cosine", "initial": 1.0})
    with pytest.raises(BilevelError, match="missing \\['power'\\]"):
        schedule_from_config({"kind": "polynomial", "initial": 1.0})
    with pytest.raises(BilevelError, match="unknown \\['rate'\\]"):
        schedule_from_config({"kind": "geometric", "initial": 1.0, "ratio": 0.5, "rate": 1})
    with pytest.raises(BilevelError, match="dict or a number"):
        schedule_from_config([1.0])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1e-3", Constant(1e-3)),
        ("  2 ", Constant(2.0)),
        ("const:1e-3", Constant(1e-3)),
        ("constant:0.5", Constant(0.5)),
        ("poly:1e-2,0.5", Polynomial(1e-2, 0.5)),
        ("POLY: 1e-2 , 0.5", Polynomial(1e-2, 0.5)),
        ("log:1e-2,1", Logarithmic(1e-2, 1.0)),
        ("geom:1e-1,0.9", Geometric(1e-1, 0.9)),
        ("geometric:1e-1,1", Geometric(1e-1, 1.0)),
        ("geom:1e-1,0.9,min=1e-4", Clipped(Geometric(1e-1, 0.9), minimum=1e-4)),
        ("poly:1,0.5,max=0.5,min=1e-3", Clipped(Polynomial(1.0, 0.5), 1e-3, 0.5)),
    ],
)
def test_parse_good_strings(text, expected):
    assert parse_schedule(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty schedule"),
        ("abc", "cannot read value 'abc'"),
        ("cosine:1,2", "unknown schedule kind 'cosine'"),
        ("poly:1e-2", "takes 2 number"),
        ("poly:1e-2,0.5,3", "takes 2 number"),
        ("const:1,2", "takes 1 number"),
        ("poly:1e-2,x", "cannot read argument 'x'"),
        ("poly:-1e-2,0.5", "finite and positive"),
        ("poly:1e-2,-0.5", ">= 0"),
        ("geom:1e-1,1.5", "0 < ratio <= 1"),
        ("geom:1e-1,0", "0 < ratio <= 1"),
        ("inf", "finite and positive"),
        ("nan", "finite and positive"),
        ("0", "finite and positive"),
        ("poly:1,1,step=3", "unexpected option"),
        ("poly:1,1,min=1,min=2", "unexpected option"),
        ("poly:1,1,min=2,max=1", "minimum <= maximum"),
        ("poly:1,min=1e-3,1", "follows min="),
    ],
)
def test_parse_bad_strings_name_the_accepted_forms(text, message):
    with pytest.raises(BilevelError, match=message) as info:
        parse_schedule(text)
    assert "accepted forms" in str(info.value)
    assert "poly:A,POWER" in str(info.value)


def test_as_schedule():
    p = Polynomial(1.0, 0.5)
    assert as_schedule(p) is p
    assert as_schedule(0.1) == Constant(0.1)
    assert as_schedule(2) == Constant(2.0)
    assert as_schedule(np.float32(0.5)) == Constant(0.5)
    assert as_schedule("poly:1,0.5") == p
    assert as_schedule({"kind": "polynomial", "initial": 1.0, "power": 0.5}) == p
    s = as_schedule(lambda k: 2.0**-k)
    assert isinstance(s, FromCallable) and s(3) == 0.125
    assert isinstance(s, Schedule)
    for bad in (True, None, [1.0]):
        with pytest.raises(BilevelError, match="cannot make a schedule"):
            as_schedule(bad)
    with pytest.raises(BilevelError, match="finite and positive"):
        as_schedule(-1.0)


def test_schedules_are_immutable_and_hashable():
    p = Polynomial(1.0, 0.5)
    with pytest.raises(AttributeError):
        p.initial = 2.0
    assert len({p, Polynomial(1.0, 0.5), Constant(1.0)}) == 2


def test_accuracy_defaults_adjoint_to_lower():
    a = Accuracy(Polynomial(1e-2, 0.25))
    assert a.lower(15) == a.adjoint(15) == pytest.approx(1e-2 / 2)
    assert a(15) == (a.lower(15), a.adjoint(15))
    b = Accuracy(lower=1e-3, adjoint="geom:1e-2,0.5")
    assert b.lower(3) == 1e-3
    assert b.adjoint(3) == pytest.approx(1.25e-3)
    assert accuracy_from_config(json.loads(json.dumps(b.to_config()))) == b
    assert accuracy_from_config({"lower": {"kind": "constant", "value": 0.1}}) == Accuracy(0.1)
    assert as_accuracy(b) is b
    assert as_accuracy(0.1) == Accuracy(Constant(0.1))
    assert as_accuracy((0.1, 0.2)).adjoint(0) == 0.2
    assert parse_accuracy("poly:1e-2,0.25") == a
    assert parse_accuracy("1e-3", "geom:1e-2,0.5") == b
    with pytest.raises(BilevelError, match="'lower'"):
        accuracy_from_config({"adjoint": 0.1})
    with pytest.raises(BilevelError, match="\\(lower, adjoint\\)"):
        as_accuracy((0.1, 0.2, 0.3))
