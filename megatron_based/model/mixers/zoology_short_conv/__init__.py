"""The "Z" mixer, Zoology's BaseConv with a short convolution (``mixer.py``): layer 0 of Zoology's MQAR models
(figure 2's BaseConv-only model: Z then H). No context parallelism."""
from .mixer import ZoologyShortConv

__all__ = ["ZoologyShortConv"]
