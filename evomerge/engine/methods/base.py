"""What a merge method is: a pure tensor function plus its declared parameters.

Each parameter is declared exactly once, here in the method, with its type,
scope, default, validity limits and the range a search explores. Recipe
validation and (later) the search space are both derived from these
declarations; nothing lists a method's parameters a second time.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from evomerge.errors import EvomergeError

if TYPE_CHECKING:
    import torch

REQUIRED = object()

# SHARED: one value per tensor. PER_INPUT: one value per input tensor, base
# included. PER_MODEL: one value per non-base input (mergekit's NON_BASE).
Scope = Literal["shared", "per_input", "per_model"]


@dataclass(frozen=True)
class Param:
    """One declared parameter of a merge method.

    ``limits`` are hard validity bounds (a value outside is a user error);
    every number must also be finite, so NaN and infinity are refused for
    all numeric parameters here. ``bounds`` is the default range a search
    explores, narrowed by a search space; a recipe may set values outside
    it (as mergekit allows), within ``limits``. ``open_low`` excludes the
    lower limit itself, e.g. density in (0, 1].
    """

    name: str
    kind: type
    scope: Scope = "shared"
    default: Any = REQUIRED
    limits: tuple[float, float] | None = None
    open_low: bool = False
    bounds: tuple[float, float] | None = None
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def interval(self) -> str | None:
        """The validity limits as an interval, e.g. ``(0.0, 1.0]``; None when unlimited."""
        if self.limits is None:
            return None
        lo, hi = self.limits
        return f"{'(' if self.open_low else '['}{lo}, {hi}]"

    @property
    def searchable(self) -> bool:
        return self.kind is float and self.bounds is not None

    def validate(self, value: Any, where: str = "") -> Any:
        """Coerce ``value`` to this parameter's type and check its limits."""
        at = f" ({where})" if where else ""
        if value is None and not self.required and self.default is None:
            return None
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise EvomergeError(
                f"parameter {self.name!r}{at} must be true or false, got {value!r}; fix it in the recipe"
            )
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise EvomergeError(
                        f"parameter {self.name!r}{at} must be a number, got {value!r}; fix it in the recipe"
                    ) from None
            if not math.isfinite(value):
                raise EvomergeError(
                    f"parameter {self.name!r}{at} = {value} is not a finite number; give it a finite value in the recipe"
                )
            if self.kind is int and value != int(value):
                raise EvomergeError(
                    f"parameter {self.name!r}{at} must be a whole number, got {value!r}; fix it in the recipe"
                )
            value = self.kind(value)
            if self.limits is not None:
                lo, hi = self.limits
                too_low = value <= lo if self.open_low else value < lo
                if too_low or value > hi:
                    raise EvomergeError(
                        f"parameter {self.name!r}{at} = {value} is outside {self.interval}; "
                        f"set it inside that range in the recipe"
                    )
            return value
        return self.kind(value)


@dataclass(frozen=True)
class MergeMethod:
    """A named merge: ``fn(inputs, **params) -> tensor`` with its contract.

    ``fn`` receives a :class:`TensorInputs` and keyword parameters: shared
    ones as scalars, per-input and per-model ones as lists aligned with
    ``inputs.indices`` and ``inputs.non_base`` respectively. ``options`` are
    fixed keyword arguments, so one function serves several registered names
    (TIES, DARE and DELLA are all options of generalized task arithmetic).
    ``base_is_endpoint`` marks a method whose base is one end of an
    interpolation between its inputs rather than a reference the others are
    measured from (slerp): a search space takes such a base from its models,
    using the config's base only to complete the inputs. ``check(tensor
    name, params)``, when set, refuses parameters that are valid one by one
    but not together (linear's weights cancelling out under normalize);
    planning calls it for every output tensor, before any tensor is read.
    ``min_non_base`` is the fewest non-base inputs the method takes
    (multislerp needs one besides an optional base).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[Param, ...]
    base: Literal["required", "optional", "ignored"] = "ignored"
    min_inputs: int = 1
    max_inputs: int | None = None
    exact_non_base: int | None = None
    min_non_base: int = 0
    base_is_endpoint: bool = False
    random: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    reference: str = ""
    check: Callable[[str, dict], None] | None = None

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def check_inputs(self, n_inputs: int, has_base: bool, where: str = "") -> None:
        """Raise a user error when an input count or base presence is wrong."""
        at = f" in {where}" if where else ""
        if self.base == "required" and not has_base:
            raise EvomergeError(f"method {self.name!r} needs a base model{at}; add base_model to the recipe")
        n_non_base = n_inputs - (1 if has_base and self.base != "ignored" else 0)
        if n_inputs < self.min_inputs:
            raise EvomergeError(
                f"method {self.name!r} needs at least {self.min_inputs} models{at}, got {n_inputs}; add models"
            )
        if self.max_inputs is not None and n_inputs > self.max_inputs:
            raise EvomergeError(
                f"method {self.name!r} takes at most {self.max_inputs} model(s){at}, got {n_inputs}; remove models"
            )
        if n_non_base < self.min_non_base:
            raise EvomergeError(
                f"method {self.name!r} needs at least {self.min_non_base} non-base model(s){at}, "
                f"got {n_non_base}; add models"
            )
        if self.exact_non_base is not None and n_non_base != self.exact_non_base:
            raise EvomergeError(
                f"method {self.name!r} needs exactly {self.exact_non_base} non-base models{at}, "
                f"got {n_non_base}; fix the model list"
            )


class TensorInputs:
    """The inputs of one output tensor, as a merge function sees them.

    ``tensors`` are in input order and already in the compute dtype and on the
    compute device. Task vectors (``delta``), magnitude orders and per-row
    ranks are computed on demand, and served from ``cache`` when one is given:
    the in-place merger keeps them resident across candidates, the to-disk
    path computes them once. Both paths run the same arithmetic, so their
    outputs are bit-identical.
    """

    def __init__(
        self,
        name: str,
        tensors: list[torch.Tensor],
        base_index: int | None,
        seed: int,
        cache: dict | None = None,
        keys: list[Any] | None = None,
        resident: bool = False,
        fuse: bool = False,
    ):
        self.name = name
        self.tensors = tensors
        self.base_index = base_index
        self.seed = seed
        self._cache = cache if cache is not None else {}
        self._keys = keys if keys is not None else list(range(len(tensors)))
        # True when the cache outlives this call (the in-place merger): then
        # it pays to keep magnitude orders rather than select each time.
        self.resident = resident
        # True to run elementwise tails through torch.compile (same bits, one pass).
        self.fuse = fuse
        # Where a method may write its result directly (the live parameter);
        # methods that ignore it return a new tensor instead.
        self.out: torch.Tensor | None = None

    @property
    def indices(self) -> list[int]:
        return list(range(len(self.tensors)))

    @property
    def non_base(self) -> list[int]:
        return [i for i in range(len(self.tensors)) if i != self.base_index]

    @property
    def base(self) -> torch.Tensor:
        assert self.base_index is not None
        return self.tensors[self.base_index]

    def _memo(self, key: tuple, make: Callable[[], Any]) -> Any:
        value = self._cache.get(key)
        if value is None:
            value = make()
            self._cache[key] = value
        return value

    def _cached(self, kind: str, i: int, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        t = self.tensors[i]
        base_key = self._keys[self.base_index] if self.base_index is not None else None
        return self._memo((kind, self._keys[i], base_key, t.dtype, t.device), make)

    def cached(self, kind: str, make: Callable[[], Any]) -> Any:
        """A value of all the inputs together (SCE's variance across the task
        vectors, say), served from the cache like the per-input ones."""
        t = self.tensors[0]
        return self._memo((kind, tuple(self._keys), self.base_index, t.dtype, t.device), make)

    def delta(self, i: int) -> torch.Tensor:
        """Task vector of input ``i``: tensor minus base."""
        return self._cached("delta", i, lambda: self.tensors[i] - self.base)

    def magnitude_order(
        self, i: int, order: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The task vector's flat indices in ascending magnitude order, and
        the magnitudes in that order. ``order`` (task vector -> such indices)
        decides how equal magnitudes rank; by position (a stable sort) when
        None. Cached per order."""
        import torch

        def make():
            d = self.delta(i)
            m = d.abs().reshape(-1)
            perm = order(d) if order is not None else torch.sort(m.float(), stable=True).indices
            if d.numel() < 2**31:
                perm = perm.to(torch.int32)
            return perm, m[perm.long()]

        return self._cached(f"order:{getattr(order, '__name__', 'stable')}", i, make)

    def magnitude_rank(self, i: int, order: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Each entry's place in ``magnitude_order`` (its inverse), int32, flat."""
        import torch

        def make():
            perm = self.magnitude_order(i, order)[0].long()
            rank = torch.empty(perm.numel(), dtype=torch.int32, device=perm.device)
            rank[perm] = torch.arange(perm.numel(), dtype=torch.int32, device=perm.device)
            return rank

        return self._cached(f"rank:{getattr(order, '__name__', 'stable')}", i, make)

    def row_rank_norm(self, i: int) -> torch.Tensor:
        """Per-row magnitude rank of the task vector, scaled to [0, 1] (DELLA)."""

        def make():
            d = self.delta(i)
            d = d.unsqueeze(0) if d.dim() < 2 else d.reshape(d.shape[0], -1)
            ranks = d.abs().argsort(dim=1, stable=True).argsort(dim=1, stable=True).float()
            width = max(d.shape[1] - 1, 1)
            return (ranks / width).clamp(0, 1)

        return self._cached("rank_norm", i, make)

    def generator(self, i: int) -> torch.Generator:
        """A generator seeded from (run seed, tensor name, input index).

        Seeding per tensor, not from a global stream, makes random masks
        independent of the order tensors are merged in, so the to-disk and
        in-place paths draw the same masks.
        """
        import torch

        digest = hashlib.blake2b(f"{self.seed}:{self.name}:{i}".encode(), digest_size=8).digest()
        g = torch.Generator(device=self.tensors[i].device)
        g.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
        return g
