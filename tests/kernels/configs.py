"""The autotuned Triton kernels of a family and a way to launch one chosen config of each (test helpers)."""
from __future__ import annotations

import contextlib
import importlib
import pkgutil

from triton.runtime.autotuner import Autotuner

from based_kernels._common import forget_launches

# the autotuned families and their test modules
FAMILY_TESTS = {"short_conv": "test_short_conv", "sliding_window": "test_sliding_window", "rms_norm": "test_rms_norm",
                "rope": "test_rope", "cross_entropy": "test_cross_entropy"}


def autotuners(family: str) -> list[Autotuner]:
    """The autotuned kernels defined in ``based_kernels.<family>``'s modules."""
    package = importlib.import_module(f"based_kernels.{family}")
    found = []
    for info in pkgutil.iter_modules(package.__path__, f"{package.__name__}."):
        module = importlib.import_module(info.name)
        found += [k for k in vars(module).values() if isinstance(k, Autotuner) and k not in found]
    return found


@contextlib.contextmanager
def only_config(tuners: list[Autotuner], pick):
    """Each autotuner launches only ``pick(its whole GPU list)`` (a config) inside the block; its own list, and
    the launchers' compiled kernels chosen before, come back after it."""
    chosen = {t: t.configs for t in tuners}
    try:
        for t in tuners:
            t.configs = [pick(t.configs.all)]  # ConfigList.all: the whole GPU list, also when tuning is off
            t.cache.clear()  # the config each key chose before
        forget_launches()  # the launchers' compiled kernels per key
        yield [str(t.configs[0]) for t in tuners]
    finally:
        for t in tuners:
            t.configs = chosen[t]
            t.cache.clear()
        forget_launches()
