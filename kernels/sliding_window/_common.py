"""Shared helpers of the Triton kernels: interpreter detection and autotune config lists."""
from __future__ import annotations

import os

# The Triton interpreter (CPU tests) cannot autotune over 2+ configs ("0 active drivers"): use one fixed,
# small config there. Read once at import, like Triton itself does.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def configs(gpu_configs, interpreter_config):
    """The autotune list: every GPU config, or the single interpreter config under TRITON_INTERPRET=1."""
    return [interpreter_config] if INTERPRET else gpu_configs
