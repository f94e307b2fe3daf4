"""``split_linear``: ``F.linear`` for few rows (decode steps) with the K reduction split across programs and summed
in a fixed order (deterministic). ``ops.py``: the API and launch; ``kernels.py``: the Triton kernel."""
from .ops import default_config, split_linear

__all__ = ["split_linear", "default_config"]
