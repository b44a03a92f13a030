"""Algorithms by name: a plain registry from the name users type to a constructor taking the Federation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from declora.algorithms.centralized import Centralized
from declora.algorithms.dec_lora import DecLoRA
from declora.algorithms.fedavg import FedAvg
from declora.algorithms.local import LocalOnly

ALGORITHMS: dict[str, Callable[..., Any]] = {
    "dec_lora": DecLoRA,
    "local": LocalOnly,
    "fedavg": FedAvg,
    "centralized": Centralized,
}
