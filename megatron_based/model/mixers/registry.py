"""The mixer registry: layer-pattern symbol -> mixer class (the :class:`~.base.Mixer` interface).

The spec builder (``megatron_based.model.spec``), the config's pattern check, the FLOP count, the dry run and the
checkpoint conversion all look mixers up here, so a new mixer is a folder under ``mixers/`` and one line in
``BUILTIN`` below (or a :func:`register_mixer` call from outside the package; docs/architecture.md, "Adding a
mixer"). Nothing here imports ``megatron_based.model.config``: the config validates patterns against this module.
"""
from __future__ import annotations

from .base import missing_interface
from .base_conv import BaseConv
from .long_conv import ExplicitLongConvBaseConv, LongConvBaseConv
from .zoology_short_conv import ZoologyShortConv
from .sliding_window import SlidingWindowAttention
from .softmax_attention import SoftmaxAttention
from .taylor import TaylorLinearAttention

BUILTIN = (TaylorLinearAttention, SlidingWindowAttention, BaseConv, SoftmaxAttention, LongConvBaseConv,
           ZoologyShortConv, ExplicitLongConvBaseConv)

MIXERS: dict[str, type] = {}


def register_mixer(cls: type, *, replace: bool = False) -> type:
    """Add ``cls`` under ``cls.symbol`` (one character, not yet taken unless ``replace``). Returns ``cls``, so it
    works as a class decorator."""
    missing = missing_interface(cls)
    if missing:
        raise TypeError(f"{cls.__name__} is not a mixer: it lacks {', '.join(missing)} "
                        "(megatron_based.model.mixers.base.Mixer)")
    symbol = cls.symbol
    if not isinstance(symbol, str) or len(symbol) != 1 or symbol.isspace():
        raise ValueError(f"{cls.__name__}.symbol must be one character, not {symbol!r}")
    if symbol in MIXERS and MIXERS[symbol] is not cls and not replace:
        raise ValueError(f"mixer symbol {symbol!r} is taken by {MIXERS[symbol].__name__}")
    MIXERS[symbol] = cls
    return cls


def unregister_mixer(symbol: str) -> type:
    """Remove and return the mixer registered under ``symbol``."""
    return MIXERS.pop(symbol)


def get_mixer(symbol: str) -> type:
    """The mixer class of a layer-pattern symbol."""
    try:
        return MIXERS[symbol]
    except KeyError:
        raise KeyError(f"no mixer registered for symbol {symbol!r}; known: {', '.join(MIXERS)}") from None


def mixer_descriptions() -> dict[str, str]:
    """``{symbol: description}`` of every registered mixer, in registration order."""
    return {symbol: cls.description for symbol, cls in MIXERS.items()}


for _mixer in BUILTIN:
    register_mixer(_mixer)
