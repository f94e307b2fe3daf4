"""The "L" mixer, Taylor linear attention: the module with its spec, FLOPs, sizes, released-checkpoint rules and
generation (``mixer.py``) and its context-parallel state passing (``context_parallel.py``)."""
from .mixer import TaylorLinearAttention, TaylorSubmodules

__all__ = ["TaylorLinearAttention", "TaylorSubmodules"]
