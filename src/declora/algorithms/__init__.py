"""Algorithms by name: a plain registry from the name users type to a constructor, called as
``cls(fed, cfg=cfg, schedule=schedule)``."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from declora.algorithms.adf_lora import ADFLoRA
from declora.algorithms.base import RoundPlan
from declora.algorithms.centralized import Centralized
from declora.algorithms.dec_gt import DecGT
from declora.algorithms.dec_lora import DecLoRA
from declora.algorithms.decaf import DeCAF
from declora.algorithms.dlora_fa import DLoRAFA
from declora.algorithms.fed_sb import DecSB, FedSB
from declora.algorithms.fedavg import FedAvg
from declora.algorithms.fedex_lora import FedExLoRA
from declora.algorithms.fedprox import DecProx, FedProx
from declora.algorithms.fedsa_lora import FedSALoRA
from declora.algorithms.ffa_lora import FFALoRA
from declora.algorithms.flexlora import FlexLoRA
from declora.algorithms.flora import FLoRA
from declora.algorithms.fslora import FSLoRA
from declora.algorithms.hetlora import HetLoRA
from declora.algorithms.local import LocalOnly
from declora.algorithms.rolora import RoLoRA
from declora.algorithms.rolora_dfl import RoLoRADFL
from declora.algorithms.scaffold import Scaffold
from declora.algorithms.tad_lora import TADLoRA
from declora.config import ConfigError

ALGORITHMS: dict[str, Callable[..., Any]] = {
    "dec_lora": DecLoRA,
    "local": LocalOnly,
    "fedavg": FedAvg,
    "centralized": Centralized,
    "decaf": DeCAF,
    "dlora_fa": DLoRAFA,
    "ffa_lora": FFALoRA,
    "adf_lora": ADFLoRA,
    "tad_lora": TADLoRA,
    "rolora": RoLoRA,
    "rolora_dfl": RoLoRADFL,
    "fslora": FSLoRA,
    "hetlora": HetLoRA,
    "flexlora": FlexLoRA,
    "fedprox": FedProx,
    "scaffold": Scaffold,
    "fedsa_lora": FedSALoRA,
    "fedex_lora": FedExLoRA,
    "flora": FLoRA,
    "dec_prox": DecProx,
    "fed_sb": FedSB,
    "dec_sb": DecSB,
    "dec_gt": DecGT,
}

SHIPPED = frozenset(ALGORITHMS)


NEEDED = ("plan", "communicate", "server_tensors")  # declora.algorithms.base.Algorithm
WHAT_IT_NEEDS = "declora.algorithms.base.Algorithm lists what an algorithm needs"


def _source(obj: Any) -> Path | None:
    """The file a class or function was written in; None for one typed at a prompt or built in."""
    try:
        path = Path(inspect.getfile(obj))
    except (TypeError, OSError):
        return None
    return path.resolve() if path.is_file() else None


def _same_definition(a: Any, b: Any) -> bool:
    """One definition executed twice: the same qualified name from the same module (a notebook cell run
    again) or from the same file (a module imported by name and also executed as a plugins file)."""
    name = getattr(a, "__qualname__", None)
    if name is None or name != getattr(b, "__qualname__", None):
        return False
    if getattr(a, "__module__", None) == getattr(b, "__module__", None):
        return True
    return _source(a) is not None and _source(a) == _source(b)


def _check_call(name: str, constructor: Callable[..., Any]) -> None:
    """The engine builds it as constructor(fed, cfg=cfg, schedule=schedule): a signature that cannot
    take that fails at register(), not after the model has loaded."""
    try:
        signature = inspect.signature(constructor)
    except (TypeError, ValueError):  # a builtin or C type: nothing to read, the members check still runs
        return
    try:
        signature.bind(None, cfg=None, schedule=None)
    except TypeError as err:
        label = getattr(constructor, "__qualname__", repr(constructor))
        raise ValueError(
            f"algorithm {name!r}: {label}{signature} cannot be called as {label}(fed, cfg=cfg, "
            f"schedule=schedule) ({err}); give it cfg=None and schedule=None keywords"
        ) from None


def register(name: str, constructor: Callable[..., Any]) -> None:
    """Add a user's algorithm under ``name`` (docs/extending.md): ``constructor(fed, cfg=cfg,
    schedule=schedule)`` returns an object with the members of ``base.Algorithm``; an optional
    ``constructor.check_config(cfg)`` raising ValueError is called when a config is checked, before any
    work. Registering the same constructor twice, or a new definition of it (the same qualified name from
    the same module or file: a notebook cell run again, a plugin file edited and executed again, a module
    imported by name and also named in ``plugins``), replaces it; a shipped name, or a name another
    constructor holds, is refused."""
    if not name.isidentifier():
        raise ValueError(f"algorithm name {name!r} must be a Python identifier (letters, digits, _)")
    if not callable(constructor):
        raise ValueError(f"algorithm {name!r}: {constructor!r} is not a class or function")
    held = ALGORITHMS.get(name)
    if held is not None and _same_definition(held, constructor) and name not in SHIPPED:
        held = None  # the same class defined again (a notebook cell run twice, a module reloaded)
    if held is not None and held is not constructor:
        if name in SHIPPED:
            raise ValueError(f"algorithm name {name!r} is declora's own; choose another name")
        raise ValueError(f"algorithm name {name!r} is already registered by {held!r}")
    missing = [m for m in NEEDED if not callable(getattr(constructor, m, None))]
    if isinstance(constructor, type) and missing:  # a factory function's object is checked when built
        raise ValueError(
            f"algorithm {name!r}: {constructor.__qualname__} has no {', '.join(missing)} ({WHAT_IT_NEEDS})"
        )
    _check_call(name, constructor)
    ALGORITHMS[name] = constructor


def unregister_module(module: str) -> dict[str, Callable[..., Any]]:
    """Remove, and return, the registered algorithms defined in ``module``: a plugin file executed again
    after an edit registers its new code in their place (under a renamed class too)."""
    gone = {
        k: c for k, c in ALGORITHMS.items() if k not in SHIPPED and getattr(c, "__module__", None) == module
    }
    for k in gone:
        del ALGORITHMS[k]
    return gone


def build_algorithm(fed: Any, cfg: Any, schedule: Any) -> Any:
    """The run's algorithm, built as ``constructor(fed, cfg=cfg, schedule=schedule)``. A registered one is
    checked here, before the run folder is made: a factory's object must have the members register()
    could not see. What its ``plan`` returns can only be seen when it is called: a value that is not a
    RoundPlan is then named in one line (not an AttributeError deep in the engine)."""
    name = cfg.algorithm.name
    algorithm = ALGORITHMS[name](fed, cfg=cfg, schedule=schedule)
    if name in SHIPPED:
        return algorithm
    missing = [m for m in NEEDED if not callable(getattr(algorithm, m, None))]
    if missing:
        raise ConfigError(
            f"algorithm.name={name}: the {type(algorithm).__qualname__} its constructor returned has no "
            f"{', '.join(missing)} ({WHAT_IT_NEEDS})"
        )
    with contextlib.suppress(AttributeError, TypeError):  # __slots__ without plan: left unchecked
        object.__setattr__(algorithm, "plan", _checked_plan(name, algorithm.plan))
    return algorithm


def _checked_plan(name: str, plan: Callable[[int], Any]) -> Callable[[int], RoundPlan]:
    def checked(t: int) -> RoundPlan:
        out = plan(t)
        if not isinstance(out, RoundPlan):
            raise TypeError(
                f"algorithm.name={name}: plan({t}) returned a {type(out).__name__}; it must return a "
                "declora.algorithms.base.RoundPlan(train=..., active=...)"
            )
        return out

    return checked


# Algorithms whose nodes upload whole states (factors, heads) to a server, not changes: a sparsifying
# codec is unsound for them (config refuses comm.codec=topk).
SENDS_STATES = frozenset(
    {
        "fedavg",
        "ffa_lora",
        "rolora",
        "flexlora",
        "fedprox",
        "scaffold",
        "fedsa_lora",
        "fedex_lora",
        "flora",
        "fed_sb",
    }
)

# Algorithms with one server model (server_tensors), scored as acc_server / ppl_server: a headline on
# *_server for another algorithm would name a metric the run never logs (config refuses it).
SERVER_MODEL = frozenset(
    {
        "fedavg",
        "ffa_lora",
        "fed_sb",
        "fedprox",
        "rolora",
        "scaffold",
        "fslora",
        "hetlora",
        "flexlora",
        "fedex_lora",
        "flora",
    }
)

# Algorithms whose nodes share no model (local training alone; FedSA-LoRA's B stays on its node): the
# averaged factors are a model no node holds, so eval.headline=auto reports each node's own model.
PERSONAL = frozenset({"local", "fedsa_lora"})

# Every algorithm with a server (server.* applies): those with a server model, and FedSA-LoRA, whose
# server aggregates A alone (each node keeps its own B, so there is no one server model).
SERVED = SERVER_MODEL | {"fedsa_lora"}

# Algorithms that never gossip (a server, or no exchange at all): the graph, its weights and the schedule's
# links are never read, only which nodes a round takes offline (topology.node_dropout, a deadline).
NO_GOSSIP = SERVED | {"local", "centralized"}
# Algorithms that send no message at all: comm.* is never read.
SILENT = frozenset({"local", "centralized"})

# Algorithms that fold the aggregate into the shared frozen base: the factors alone do not reproduce the
# model, so the config refuses a PEFT export for them.
FOLDS_INTO_BASE = frozenset({"fedex_lora", "flora"})

# Which exchange each algorithm's messages go through (declora.guard): robust rules need a plain gossip or
# a server mean. scaffold: both its uploads, the factors and the control-variate changes, go through the
# server rule.
GOSSIP_ALGORITHMS = ("dec_lora", "dlora_fa", "adf_lora", "tad_lora", "rolora_dfl")
SERVER_ALGORITHMS = ("fedavg", "ffa_lora", "rolora", "fedprox", "fedsa_lora", "fed_sb", "scaffold")
# Algorithms whose nodes upload only some components (upload_masked): DP and attacks act on those only.
MASKED_UPLOADS = ("fslora", "hetlora", "flexlora", "fedex_lora", "flora")
# dec_gt's tracking message d_i is in gradient units, not a model or its change: node-level DP's clip and
# its one-message-per-round accounting do not cover it.
NO_NODE_DP = ("dec_gt",)

# Algorithms whose only exchange is gossip of the node tensors (algorithms/mixing.py): asynchronous
# stragglers replace that gossip (declora.stragglers). Server algorithms and DeCAF's product sharing are
# synchronous by construction.
ASYNC_GOSSIP = frozenset({"dec_lora", "dec_prox", "dlora_fa", "rolora_dfl", "tad_lora", "adf_lora"})
