"""GPU kernel tests without autotuning (``BASED_KERNELS_AUTOTUNE=0``, the GPU suite's setting) launch one config
per kernel; instead of always the first, each GPU test of an autotuned family takes the next config of each of its
kernels' lists (the n-th GPU test of the family: config n modulo the list's length), so the family's GPU tests
together run its configs at model sizes at no extra compilation (a config the list's pruning would skip for a
shape runs too: pruning drops slow configs, not wrong ones). The configs each test ran are in its report
(``user_properties``; the index printed with ``-s``). ``test_every_config.py`` runs every config on small shapes."""
from __future__ import annotations

import pytest
import torch

from based_kernels._common import AUTOTUNE

from .configs import FAMILY_TESTS, autotuners, only_config

_FAMILY_OF = {module: family for family, module in FAMILY_TESTS.items()}
_turns: dict[str, int] = {}


@pytest.fixture(autouse=True)
def rotate_autotune_configs(request):
    family = _FAMILY_OF.get(request.module.__name__.rsplit(".", 1)[-1])
    if family is None or AUTOTUNE or "gpu" not in request.keywords or not torch.cuda.is_available():
        yield
        return
    n = _turns[family] = _turns.get(family, -1) + 1
    with only_config(autotuners(family), lambda every: every[n % len(every)]) as configs:
        request.node.user_properties.append(("autotune configs", configs))
        print(f"[autotune config {n}]", end=" ")
        yield
