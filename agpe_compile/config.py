"""Backend options -> a frozen, validated configuration.

``torch.compile(model, backend="agpe", options={...})`` hands the options dict to the
backend, which turns it into :class:`BackendConfig` here. Every key is checked: an unknown
key or a bad value raises ``ValueError`` naming the key, the value and what is accepted.

Example::

    >>> BackendConfig.from_options({"block_size": 64, "exclude": ["head"]}).block_size
    64
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping, Optional, Sequence, Tuple

CONFIG_VERSION = 1

SALIENCY_MODES = ("taylor", "gradient", "magnitude", "movement")
DEFAULT_BLOCK_SIZE = 32
DEFAULT_SALIENCY = "taylor"
MAX_BLOCK_SIZE = 1024


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    """What the agpe backend rewrites and how it lowers the result.

    Attributes:
        block_size: side of the square weight blocks that are masked together. ``None``
            means "the block size the layer was prepared with, else 32".
        include: fnmatch patterns on layer names (``"blocks.*.mlp.fc1"``); a layer is a
            candidate when any pattern matches. The layer name is the owning module's
            name for a ``weight`` parameter, otherwise the parameter's full name.
        exclude: fnmatch patterns; a matching layer stays dense (and is reported).
        inductor: lower the rewritten graph with Inductor (``compile_fx``); ``False``
            uses aot_eager, which is slower to run but quick to compile and easy to debug.
        saliency: per-block score accumulated by the backward pass: ``"taylor"``
            (sum |w*g|), ``"gradient"`` (sum |g|), ``"magnitude"`` (sum |w|) or
            ``"movement"`` (sum -w*g). ``None`` (not given): the ``AGPEConfig.saliency`` of
            the Sparsifier driving the layer, else ``"taylor"``. Given, it must match
            that Sparsifier's (the compile raises if not).
    """

    block_size: Optional[int] = None
    include: Tuple[str, ...] = ("*",)
    exclude: Tuple[str, ...] = ()
    inductor: bool = True
    saliency: Optional[str] = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        _check_block_size("block_size", self.block_size, allow_none=True)
        if self.block_size is not None:  # a numpy integer passes the check: keep a plain int (re-audit CT)
            object.__setattr__(self, "block_size", int(self.block_size))
        _check_patterns("include", self.include)
        _check_patterns("exclude", self.exclude)
        if not isinstance(self.inductor, bool):
            raise ValueError(_bad("inductor", self.inductor, "True or False"))
        if self.saliency is not None and self.saliency not in SALIENCY_MODES:
            raise ValueError(_bad("saliency", self.saliency, f"one of {SALIENCY_MODES}"))

    @property
    def resolved_block_size(self) -> int:
        return DEFAULT_BLOCK_SIZE if self.block_size is None else self.block_size

    def saliency_for(self, name: str, driver_saliency: Optional[str]) -> str:
        """The score a layer's graph computes: this option, else the saliency of the
        Sparsifier driving the layer (``driver_saliency``), else ``"taylor"``."""
        if self.saliency is None:
            return driver_saliency or DEFAULT_SALIENCY
        if driver_saliency is not None and driver_saliency != self.saliency:
            raise ValueError(
                f"agpe: option 'saliency' is {self.saliency!r}, but layer {name!r} is driven by a Sparsifier with "
                f"AGPEConfig.saliency={driver_saliency!r}; give one value (leave the option out and the backend "
                f"uses the Sparsifier's)")
        return self.saliency

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]], also_accepted: Sequence[str] = (),
                     handled: Sequence[str] = ()) -> "BackendConfig":
        """Build a config from ``torch.compile``'s ``options`` dict (``None`` = defaults).

        ``handled`` names keys the caller took out of ``options`` itself (the backend:
        ``mode``) and ``also_accepted`` those it handles elsewhere (AGPEConfig fields of
        zero-code mode); both are listed in the unknown-option error, nothing more."""
        if options is None:
            return cls()
        if isinstance(options, BackendConfig):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(_bad("options", options, "a dict of agpe options or None"))
        known = {f.name for f in dataclasses.fields(cls) if f.name != "version"}
        unknown = sorted(set(options) - known)
        if unknown:
            key = unknown[0]
            accepted = f"one of the keys {sorted(known | set(handled))}"
            if also_accepted:
                accepted += f", or, for zero-code mode, one of {sorted(also_accepted)}"
            raise ValueError(_bad(key, options[key], accepted, kind="option"))
        values = dict(options)
        for key in ("include", "exclude"):
            if key in values and isinstance(values[key], (list, tuple)):
                values[key] = tuple(values[key])
            elif key in values and isinstance(values[key], str):
                values[key] = (values[key],)
        return cls(**values)


def _bad(key: str, value: Any, accepted: str, kind: str = "value") -> str:
    if kind == "option":
        return f"agpe: unknown option {key!r} (value {value!r}); accepted: {accepted}"
    return f"agpe: option {key!r} got {value!r}; expected {accepted}"


def _check_block_size(key: str, value: Any, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MAX_BLOCK_SIZE:
        raise ValueError(_bad(key, value, f"an int in [1, {MAX_BLOCK_SIZE}]"))


def _check_patterns(key: str, value: Any) -> None:
    if not isinstance(value, tuple) or not all(isinstance(p, str) and p for p in value):
        raise ValueError(_bad(key, value, "a list of non-empty fnmatch pattern strings"))
