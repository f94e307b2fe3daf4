"""The "C" mixer, BaseConv: the module with its spec, FLOPs, sizes, released-checkpoint rules and generation
(``mixer.py``) and its context-parallel conv halo (``context_parallel.py``)."""
from .mixer import BaseConv, BaseConvSubmodules

__all__ = ["BaseConv", "BaseConvSubmodules"]
