"""The third-party warnings and log lines we know to be harmless, filtered before torch or Megatron is imported.

Every command-line entry point calls :func:`quiet_known_warnings` first (``--verbose`` keeps them). Imports neither
torch nor Megatron at import (:func:`report_cuda_graph_captures`, called where Megatron runs, imports one of its
modules).
"""
from __future__ import annotations

import importlib
import logging
import os
import re
import warnings

# Warnings raised through ``warnings``: (message regex, category, module regex). Each says a fallback we expect on
# machines without TransformerEngine / Apex / CUDA, or a deprecation in code we do not call ourselves.
KNOWN_WARNINGS = [
    (r"Transformer Engine (and Apex )?(is|are) not installed", UserWarning, ""),
    (r"Apex is not installed", UserWarning, ""),
    (r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to (save|load) in a "
     r"single process", UserWarning, ""),
    (r"invalid escape sequence", SyntaxWarning, r".*megatron"),  # megatron's kv_block_allocator.py, compiled once
    (r"full scope is deprecated", UserWarning, ""),  # TransformerConfig's own default cuda_graph_modules="full"
    (r"MimoModelConfig is experimental", UserWarning, ""),  # defined when megatron.core.models is imported
    (r"The argument order of load has been changed", UserWarning, ""),  # Megatron's positional dcp.load call
    # NCCL barriers (ours and dist_checkpointing's) without a bound device: initialize_parallel set each rank's
    # device, which is the one used; it binds none on purpose (runtime/parallel.py says why).
    (r"barrier\(\): using the device under current context", UserWarning, ""),
    # CUDA graphs (cuda_graph_impl local): Megatron's DDP keeps the parameters' AccumulateGrad nodes (its gradient
    # hooks) from before the graphs were captured on their side stream; autograd orders the two streams itself.
    (r"The AccumulateGrad node's stream does not match the stream of the node that produced", UserWarning, ""),
    # The distributed optimizer's fp32 shards are slices of the parameters (not leaves); its zero_grad reads .grad.
    (r"The \.grad attribute of a Tensor that is not a leaf Tensor", UserWarning, r"megatron\.core\.optimizer"),
]
# Megatron's CUDA-graph module and logger
MCORE_CUDA_GRAPHS = "megatron.core.transformer.cuda_graphs"
# Messages Megatron and torch print through ``logging``, by logger name.
KNOWN_LOG_MESSAGES = {
    "megatron.core.models.gpt.gpt_model": r"GPTModel IS DEPRECATED",
    "megatron.core.dist_checkpointing.strategies.torch": r"MCore's async save is deprecated",
    "megatron.core.distributed.distributed_data_parallel": r"full_param_layout not provided",
    "torch.utils.cpp_extension": r"No CUDA runtime is found",
    # at each CUDA-graph capture (model.cuda_graph_impl local / auto): without TransformerEngine the graphs' buffers
    # are not shared across graphs; based-360m's graphed step still peaks below its eager one (docs/benchmarks.md)
    MCORE_CUDA_GRAPHS: r"Transformer Engine was not detected while capturing",
}


# Megatron's summary of a CUDA-graph capture ("> built 54 cuda graph(s) in 1.31 sec, with total memory usage:
# allocated 3.2 gb, reserved 7.1 gb."), logged at INFO on rank 0 after its per-graph progress bar. Its "memory
# usage" is the change of the allocator's counters over the capture (negative where the cache shrank).
CUDA_GRAPH_SUMMARY = (MCORE_CUDA_GRAPHS, r"^> (built \d+ cuda graph.*?)(?:, with total memory usage: (.*?))?\.?$")


class _Forward(logging.Handler):
    """Hands the messages matching ``pattern`` to ``print_fn`` as "CUDA graphs: <its first group>" (and "(memory
    change over the capture: <its second>)" where that matched); ignores the others."""

    def __init__(self, pattern: str, print_fn):
        super().__init__(logging.INFO)
        self.pattern, self.print_fn = re.compile(pattern), print_fn

    def emit(self, record: logging.LogRecord) -> None:
        match = self.pattern.search(record.getMessage())
        if match:
            memory = f" (memory change over the capture: {match.group(2)})" if match.group(2) else ""
            self.print_fn(f"CUDA graphs: {match.group(1)}{memory}")


def report_cuda_graph_captures(print_fn) -> None:
    """Print Megatron's CUDA-graph capture summary through ``print_fn`` as "CUDA graphs: built N cuda graph(s) in X sec
    (memory change over the capture: ...)" (its logger set to INFO; its other INFO records still reach only the handlers
    a user configured), and turn off its per-graph tqdm bar (two lines per graph in a log file; a capture takes
    seconds). Imports Megatron's ``cuda_graphs`` module: call it where Megatron is in use. Replaces the handler of an
    earlier call."""
    name, pattern = CUDA_GRAPH_SUMMARY
    importlib.import_module(name).HAVE_TQDM = False
    logger = logging.getLogger(name)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    for h in [h for h in logger.handlers if isinstance(h, _Forward)]:
        logger.removeHandler(h)
    logger.addHandler(_Forward(pattern, print_fn))


class _DropMessage(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def filter_known_warnings() -> None:
    """Ignore :data:`KNOWN_WARNINGS` in this process: the warnings filters alone (the test suite sets them per test,
    tests/conftest.py)."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def quiet_known_warnings(verbose: bool = False) -> None:
    """Hide the known third-party warnings and log lines (:data:`KNOWN_WARNINGS`, :data:`KNOWN_LOG_MESSAGES`) in
    this process and, through ``PYTHONWARNINGS``, in the Python processes it starts (data-loader and checkpoint
    workers). Any other warning still shows. ``verbose``: change nothing."""
    if verbose:
        return
    filter_known_warnings()
    for name, pattern in KNOWN_LOG_MESSAGES.items():
        logger = logging.getLogger(name)  # the same object the library gets later from getLogger(__name__)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(pattern))
    # PYTHONWARNINGS takes no regex and matches a message's start: the literal beginnings of the messages above.
    inherited = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    for start in ("ignore:Transformer Engine and Apex are not installed", "ignore:Transformer Engine is not installed",
                  "ignore:torch.distributed is disabled"):
        if start not in inherited:
            inherited.append(start)
    os.environ["PYTHONWARNINGS"] = ",".join(inherited)
