"""Drop sets: one type, one label rule.

A drop set names the modules to remove: ``module`` (``attn``, ``mlp``, ``block`` or ``joint``),
its ``indices`` (layers; ``"attn:i"``/``"mlp:i"`` for ``joint``), how it was chosen (``method``:
a consensus method, ``own:<distribution>``, ``greedy:<objective>``, ``random:<seed>``) and from
which importance ``metric``.  Its label is ``<metric>/<module>-<k>:<method>`` (``none`` for the
unpruned model); :func:`parse_label` reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InputError
from .pruning import joint_to_lists

UNPRUNED = "none"


@dataclass(frozen=True)
class DropSet:
    """A set of modules to drop and how it was chosen."""

    module: str
    indices: tuple
    method: str
    metric: str = "cosine"
    sources: tuple[str, ...] = field(default=())

    @property
    def k(self) -> int:
        return len(self.indices)

    @property
    def label(self) -> str:
        """``<metric>/<module>-<k>:<method>``."""
        return f"{self.metric}/{self.module}-{self.k}:{self.method}"

    def candidates(self) -> list[tuple[str, int]]:
        """The ``(kind, layer)`` pairs dropped (kind in attn, mlp, block)."""
        if self.module == "joint":
            attn, mlp = joint_to_lists(self.indices)
            return [("attn", i) for i in attn] + [("mlp", i) for i in mlp]
        return [(self.module, int(i)) for i in self.indices]

    def record(self) -> dict:
        """The JSON record ``calibdrop consensus`` writes and ``drop_modules`` reads (``module``, ``indices``)."""
        return {"module": self.module, "k": self.k, "indices": list(self.indices), "method": self.method, "metric": self.metric}


def make_drop_set(module: str, indices, method: str, metric: str = "cosine") -> DropSet:
    """A :class:`DropSet` with indices normalised (ints for layers, ``"attn:i"`` strings for joint; sorted unless joint)."""
    if module == "joint":
        return DropSet(module, tuple(str(i) for i in indices), method, metric)
    return DropSet(module, tuple(sorted(int(i) for i in indices)), method, metric)


def parse_label(label: str) -> dict:
    """``"cosine/attn-8:own:code"`` → ``{"metric": "cosine", "module": "attn", "k": 8, "method": "own:code"}``."""
    if label == UNPRUNED:
        return {"metric": None, "module": None, "k": 0, "method": UNPRUNED}
    try:
        metric, rest = label.split("/", 1)
        head, method = rest.split(":", 1)
        module, k = head.rsplit("-", 1)
        return {"metric": metric, "module": module, "k": int(k), "method": method}
    except ValueError:
        raise InputError(f"{label!r} is not a drop-set label of the form <metric>/<module>-<k>:<method>") from None
