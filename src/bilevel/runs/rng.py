"""Capture and restore the state of every random number generator a run draws from.

The captured state holds only tensors, ints, floats, strings, tuples and dicts, so it can be
stored in a checkpoint and read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from bilevel.problem import BilevelError

__all__ = ["rng_state", "set_rng_state"]

AnyGenerator = torch.Generator | np.random.Generator
Generators = AnyGenerator | Mapping[str, AnyGenerator] | Sequence[AnyGenerator] | None


def _named(generators: Generators) -> dict[str, AnyGenerator]:
    if generators is None:
        return {}
    if isinstance(generators, (torch.Generator, np.random.Generator)):
        return {"0": generators}
    if isinstance(generators, Mapping):
        items = {str(k): g for k, g in generators.items()}
    else:
        items = {str(i): g for i, g in enumerate(generators)}
    for name, g in items.items():
        if not isinstance(g, (torch.Generator, np.random.Generator)):
            raise BilevelError(
                f"generator {name!r} is a {type(g).__name__}, not a torch.Generator or "
                "numpy.random.Generator"
            )
    return items


def _pack(value: Any) -> Any:
    # numpy arrays -> tensors, so that torch.load(weights_only=True) accepts the state
    if isinstance(value, np.ndarray):
        return {"__ndarray__": torch.from_numpy(value.astype(np.int64)), "dtype": str(value.dtype)}
    if isinstance(value, dict):
        return {k: _pack(v) for k, v in value.items()}
    return value


def _unpack(value: Any) -> Any:
    if isinstance(value, dict) and "__ndarray__" in value:
        return torch.as_tensor(value["__ndarray__"]).numpy().astype(value["dtype"])
    if isinstance(value, dict):
        return {k: _unpack(v) for k, v in value.items()}
    return value


def _generator_state(g: AnyGenerator) -> Any:
    if isinstance(g, torch.Generator):
        return g.get_state()
    return {"numpy": _pack(g.bit_generator.state)}


def _set_generator_state(name: str, g: AnyGenerator, s: Any) -> None:
    if isinstance(g, torch.Generator):
        if not isinstance(s, torch.Tensor):
            raise BilevelError(f"generator {name!r}: the stored state is not a torch state")
        g.set_state(s)
    else:
        if not (isinstance(s, dict) and "numpy" in s):
            raise BilevelError(f"generator {name!r}: the stored state is not a numpy state")
        g.bit_generator.state = _unpack(s["numpy"])


def rng_state(generators: Generators = None) -> dict[str, Any]:
    """The current state of the global torch (CPU and, when available, every CUDA device),
    numpy and python ``random`` generators, plus explicit ``torch.Generator`` or
    ``numpy.random.Generator`` objects (a mapping name -> generator, a sequence, or one)."""
    np_state = np.random.get_state(legacy=False)  # noqa: NPY002 (the global legacy generator)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
        "generators": {name: _generator_state(g) for name, g in _named(generators).items()},
    }
    return state


def set_rng_state(state: Mapping[str, Any], generators: Generators = None) -> None:
    """Restore generators from :func:`rng_state` output. ``generators`` must name the same
    explicit generators (same keys, or same order) as when the state was captured. CUDA states
    are restored for the devices present (a state captured on a CPU-only machine leaves CUDA
    generators alone)."""
    try:
        torch.set_rng_state(state["torch"])
        cuda = list(state.get("cuda", []))
        if cuda and torch.cuda.is_available():
            for device, s in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, device)
        n = state["numpy"]
        np.random.set_state(  # noqa: NPY002 (the global legacy generator)
            {
                "bit_generator": n["bit_generator"],
                "state": {
                    "key": np.asarray(torch.as_tensor(n["key"]).numpy(), dtype=np.uint32),
                    "pos": int(n["pos"]),
                },
                "has_gauss": int(n["has_gauss"]),
                "gauss": float(n["gauss"]),
            }
        )
        random.setstate(_as_python_state(state["python"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise BilevelError(f"not a state captured by rng_state(): {exc}") from exc
    stored = state.get("generators", {})
    named = _named(generators)
    if set(stored) != set(named):
        raise BilevelError(
            f"the stored RNG state holds generators {sorted(stored)}, but {sorted(named)} "
            "were passed to set_rng_state"
        )
    for name, g in named.items():
        _set_generator_state(name, g, stored[name])


def _as_python_state(s: Any) -> tuple:
    # random.setstate needs tuples; some serialisers turn them into lists
    version, internal, gauss = s
    return (version, tuple(internal), gauss)
