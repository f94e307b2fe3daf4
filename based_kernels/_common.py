"""Host-side helpers shared by two or more op families: interpreter detection, the backend choice
(``resolve_backend``, ``use_backend``), autotune config lists, a low-overhead launcher, the ``cu_seqlens`` check
every varlen path (Triton and PyTorch) runs, the per-document split of the PyTorch varlen paths and the layout
helpers of the ``[B, T, ...]`` launchers. Triton device functions shared by kernels live in ``_jit_common.py``.
Nothing here imports Triton at module level (the interpreter patch and the launcher's runtime import it lazily)."""
from __future__ import annotations

import os

import torch
from torch.utils.weak import WeakIdKeyDictionary

# The Triton interpreter (CPU tests) cannot autotune over 2+ configs ("0 active drivers"): use one fixed,
# small config there. Read once at import, like Triton itself does.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRET:
    # Triton 3.6's interpreter holds scalars as 1-element arrays and converts them with int(array), which
    # numpy >= 2.5 refuses: loops with run-time bounds (range(bos, eos, BT)) then fail on CPU. Convert via item().
    import triton.runtime.interpreter as _interp

    if not getattr(_interp, "_based_index_patch", False):
        _orig_patch_lang_tensor = _interp._patch_lang_tensor

        def _patch_lang_tensor(tensor, scope):
            _orig_patch_lang_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        _interp._patch_lang_tensor = _patch_lang_tensor
        _interp._based_index_patch = True


# Triton's on-disk cache (compiled kernels and, with TRITON_CACHE_AUTOTUNING=1, autotuning results) is read from
# TRITON_CACHE_DIR at every lookup. PyTorch Inductor sets that variable, when unset, to its own directory the first
# time it loads a kernel of its own (torch.compile'd Megatron fusions run in the first training step): our kernels
# compiled or tuned before that moment go to one directory, those after it to another, and a later process looking
# in the other one compiles and tunes again (slower restarts, and a resumed run may pick other configs). Pinned
# here to Triton's own default (TRITON_HOME/.triton/cache); a user's value is kept.
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(os.environ.get("TRITON_HOME") or os.path.expanduser("~/"),
                                                       ".triton", "cache"))
# Autotuning results are kept in that cache too (TRITON_CACHE_AUTOTUNING, off in Triton by default; a user's "0"
# is kept): a restarted or resumed run on the same machine (or nodes sharing a home directory) reads each kernel's
# chosen config instead of timing every config again (~25 s at based-360m's first step), and so launches the
# configs the interrupted run launched: which config runs can change the rounding, and resumes are bitwise. Read
# when an autotuned kernel is defined, so it is set here, before any kernel module.
os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")

# Process-wide default backend of the public ops when their ``backend`` argument is None: "triton", "torch", or
# None (Triton for CUDA tensors, PyTorch otherwise). Set with based_kernels.use_backend or BASED_KERNELS_BACKEND.
_BACKEND = [os.environ.get("BASED_KERNELS_BACKEND") or None]
BACKENDS = (None, "triton", "torch")


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    return backend


def resolve_backend(backend, x) -> str:
    """The backend an op call runs: its own argument, else the process default, else by the tensor's device."""
    backend = check_backend(backend) or check_backend(_BACKEND[0])
    return backend or ("triton" if x.is_cuda else "torch")


class use_backend:
    """``with based_kernels.use_backend("torch"): ...`` runs every op whose ``backend`` is None on that backend
    (e.g. the whole model on the PyTorch reference path on a GPU, for parity checks); also a plain call."""

    def __init__(self, backend):
        self.prev, _BACKEND[0] = _BACKEND[0], check_backend(backend)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _BACKEND[0] = self.prev


# cu_seqlens tensor -> (version counter, T, offsets) of a passed check: a model's layers share one packed batch's
# cu_seqlens, so its host sync happens once, not once per layer and pass
_CHECKED_CU = WeakIdKeyDictionary()


def check_cu_seqlens(cu_seqlens: torch.Tensor, T: int, B: int = 1) -> list[int]:
    """Check FlashAttention-style document offsets ``[N + 1]`` for a ``[B=1, T, ...]`` input and return them as a
    list: integers rising (non-decreasing) from 0 to T. Kernels index memory with them, so a bad table would read
    or write outside the tensors. One host sync (``tolist``) per new tensor or in-place change; repeated calls with
    the same unchanged tensor are free."""
    if B != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (documents packed along T); got B={B}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point \
            or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [N + 1] of document offsets; got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    try:
        version = cu_seqlens._version
    except RuntimeError:  # an inference-mode tensor has no version counter: check it every time
        version = None
    hit = _CHECKED_CU.get(cu_seqlens)
    if hit is not None and version is not None and hit[:2] == (version, T):
        return hit[2]
    bounds = cu_seqlens.tolist()
    bad = None
    if bounds[0] != 0:
        bad = f"cu_seqlens[0] = {bounds[0]}"
    elif bounds[-1] != T:
        bad = f"cu_seqlens[-1] = {bounds[-1]}"
    else:
        i = next((i for i in range(1, len(bounds)) if bounds[i] < bounds[i - 1]), None)
        if i is not None:
            bad = f"cu_seqlens[{i}] = {bounds[i]} < cu_seqlens[{i - 1}] = {bounds[i - 1]}"
    if bad is not None:
        raise ValueError(f"cu_seqlens must rise from 0 to T={T} (document offsets [N + 1]); got {bad}")
    if version is not None:
        _CHECKED_CU[cu_seqlens] = (version, T, bounds)
    return bounds


# BASED_KERNELS_AUTOTUNE=0: every autotuned kernel launches the first config of its list, untimed. Tuning compiles
# every config of every kernel specialization a process meets (seconds each); the GPU test suite turns it off for
# its in-process tests (its kernel tests launch a different config each: tests/kernels/conftest.py; every config on
# small shapes: tests/kernels/test_every_config.py). Read at import.
AUTOTUNE = os.environ.get("BASED_KERNELS_AUTOTUNE", "1") != "0"


class ConfigList(list):
    """An autotune list (what Triton's autotuner gets) that keeps every GPU config in ``all`` when tuning is off."""

    def __init__(self, chosen, every):
        super().__init__(chosen)
        self.all = list(every)


def configs(gpu_configs, interpreter_config):
    """The autotune list: every GPU config (the first one only with BASED_KERNELS_AUTOTUNE=0), or the single
    interpreter config under TRITON_INTERPRET=1."""
    if INTERPRET:  # ``all`` still lists the GPU configs: tests run each of them in the interpreter too
        return ConfigList([interpreter_config], gpu_configs)
    return ConfigList(gpu_configs if AUTOTUNE else gpu_configs[:1], gpu_configs)


# Autotuning times each config for TUNE_WARMUP_MS + TUNE_REP_MS of launches (Triton's default is 25 + 100 ms, about
# an eighth of a second per config: seconds per tuned key, at the first step of every process). The kernels run
# 10 us - 2 ms, so 20 ms still averages ten or more launches per config.
TUNE_WARMUP_MS, TUNE_REP_MS = 5, 20


def tune_bench(fn, quantiles):
    """The ``do_bench`` of every autotuned kernel (``triton.autotune(..., do_bench=tune_bench)``)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, quantiles=quantiles)


def row_align(*tensors):
    """The largest power of two (elements, <= 16 bytes) dividing every row stride: the ALIGN constexpr."""
    a = 16 // tensors[0].element_size()
    for t in tensors:
        while t.stride(0) % a:
            a //= 2
    return a


_SMS = {}


def sm_count(device: torch.device, other: int) -> int:
    """The device's streaming multiprocessors (cached per device); ``other`` for a device that is not CUDA (the
    interpreter's stand-in count, which sets how a launch splits work in the CPU tests)."""
    n = _SMS.get(device)
    if n is None:
        n = _SMS[device] = (torch.cuda.get_device_properties(device).multi_processor_count
                            if device.type == "cuda" else other)
    return n


def cdiv(a, b):
    return -(-a // b)  # triton.cdiv / next_power_of_2 are constexpr_functions in triton 3.6: ~5 us per host call


# fp32 inputs: the operand precision of the kernels' products follows torch.get_float32_matmul_precision() at call
# time. "high" gets "ieee" too: "tf32x3" in every product made the Taylor output pass need 237568 bytes of shared
# memory at its tile configuration (H200 limit 232448; Triton 3.6), and the tile configurations are shared with bf16.
FP32_DOT = {"highest": "ieee", "high": "ieee", "medium": "tf32"}


def dot_precision(dtype: torch.dtype) -> str:
    """Triton's ``input_precision`` for the products with fp32 operands (a constexpr, so a part of the launch key).

    fp32 inputs follow torch's float32 matmul setting, read at every call (forward and backward each read it):
    ``"highest"`` (torch's default) and ``"high"`` -> ``"ieee"`` (fp32 products, fp32 accuracy), ``"medium"`` ->
    ``"tf32"`` (tensor cores, ~1e-3 relative). bf16/fp16 inputs: ``"tf32"`` always (their bf16/fp16 products ignore
    it; their fp32-operand ones, e.g. Taylor's intra-chunk ``A @ v``, run on tf32)."""
    if dtype == torch.float32:
        return FP32_DOT.get(torch.get_float32_matmul_precision(), "ieee")
    return "tf32"


def next_pow2(n):
    return 1 << (n - 1).bit_length()


class Launcher:
    """Launches an autotuned Triton kernel for a fraction of the host cost of ``kernel[grid](...)``.

    ``Autotuner.run`` + ``JITFunction.run`` cost ~130 us of Python per launch of a ~50-argument kernel on a
    2-core CPU VM (dict building, O(n^2) argument filtering, specialization, cache-key strings); this path ~17.
    The first call per key goes through them (tuning, compiling); the compiled kernel and its config are then
    kept per key and later calls with the same key go straight to the kernel's C launcher with the arguments
    ``JITFunction.run`` passes it. The key holds the device, the constexprs, every scalar argument's value and
    every tensor's dtype, plus every pointer's 16-byte alignment when one is not aligned (one OR of the pointers
    otherwise): a superset of what Triton specializes on (ints: == 1 and % 16; pointers: dtype and alignment),
    so an equal key means the same compiled kernel. While no
    launch hook is set, the C launcher gets None hooks (no launch metadata, no empty hook-chain calls). Under the
    interpreter every call takes the normal path.

    ``args``: the runtime arguments in signature order (everything before the constexprs), tensors first;
    ``consts``: the constexprs the caller sets (the autotuned ones come from the chosen config); ``grid(meta)``
    as in Triton. Tested against Triton's own launch path in ``tests/kernels/test_launcher.py``.
    """

    instances: list["Launcher"] = []  # every launcher: forget_launches() empties their caches

    def __init__(self, kernel):
        self.kernel = kernel
        self.cache = {}
        self.n_tensors = None  # the leading tensor arguments (pointers); the rest are scalars
        Launcher.instances.append(self)

    def __call__(self, grid, args, **consts):
        if INTERPRET:
            self.kernel[grid](*args, **consts)
            return
        nt = self.n_tensors
        if nt is None:
            nt = self.n_tensors = next(i for i, a in enumerate(args) if not isinstance(a, torch.Tensor))
            if any(isinstance(a, torch.Tensor) for a in args[nt:]):
                raise TypeError(f"{self.kernel.fn.__name__}: tensor arguments must come before the scalars")
            _triton_runtime()
        tensors = args[:nt]
        align = 0
        for t in tensors:
            align |= t.data_ptr()
        device = _RT.driver.active.get_current_device()
        key = (device, *consts.values(), *args[nt:], *[t.dtype for t in tensors])
        if align & 15:  # some pointer not 16-byte aligned (rare: torch allocations are): which ones
            key += tuple(t.data_ptr() & 15 == 0 for t in tensors)
        hit = self.cache.get(key)
        if hit is None:
            if COMPILE_THREADS > 1 and isinstance(self.kernel, _RT.Autotuner):
                precompile_configs(self.kernel, grid, args, consts)
            try:
                compiled = self.kernel[grid](*args, **consts)
            except _RT.OutOfResources as e:
                compiled = self._next_config_that_fits(grid, args, consts, e)
            best = getattr(self.kernel, "best_config", None)  # None: a plain (not autotuned) JITFunction
            meta = {**consts, **(best.kwargs if best is not None else {})}
            tail = tuple(meta[name] for name in self.kernel.arg_names[len(args):])
            if compiled is not None and not hasattr(compiled, "result"):  # not an async-compile future
                if len(self.cache) >= 4096:  # many distinct shapes (e.g. prefill lengths): start over
                    self.cache.clear()
                self.cache[key] = (compiled, meta, tail)
            return
        compiled, meta, tail = hit
        g = grid(meta)
        stream = _RT.driver.active.get_current_stream(device)
        full = (*args, *tail)
        rt = _RT.knobs.runtime
        enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
        if (enter is None or enter.__class__ is _RT.HookChain and not enter.calls) and (
                leave is None or leave.__class__ is _RT.HookChain and not leave.calls):
            # no launch hook set (triton 3.6's default is an empty HookChain): pass None, so that the C launcher
            # skips building the launch metadata and calling the two empty chains (Python calls) per launch
            enter = leave = launch_metadata = None
        else:
            launch_metadata = compiled.launch_metadata(g, stream, *full)
        compiled.run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1, stream, compiled.function,
                     compiled.packed_metadata, launch_metadata, enter, leave, *full)

    def _next_config_that_fits(self, grid, args, consts, error):
        """Tuning off (BASED_KERNELS_AUTOTUNE=0: the autotuner has only its list's first config) and that config
        does not fit this launch on this device (shared memory or registers, e.g. fp32 tiles at d 128): launch the
        next config of the full list that does, as tuning would have skipped it. Else re-raise ``error``."""
        tuner = self.kernel
        every = getattr(tuner, "configs", None)
        if not isinstance(tuner, _RT.Autotuner) or len(every) != 1 or not isinstance(every, ConfigList):
            raise error
        try:
            for config in every.all:
                if config is every[0]:
                    continue
                tuner.configs = ConfigList([config], every.all)
                try:
                    return tuner[grid](*args, **consts)
                except _RT.OutOfResources:
                    continue
        finally:
            tuner.configs = every  # later keys start from the first config again
        raise error


# NaN / inf confinement by re-launch (the SWA kernels and the Taylor output pass; their READMEs say what each
# confines): a kernel runs plain (operands straight from memory into its products; every program sets a flag when a
# result row is not finite: a non-finite operand row reaches every result row of its tile, 0 * NaN), then with its
# CONFINE constexpr on, a launch whose programs return at once unless the flag is set, and otherwise recompute
# their tiles with each non-finite operand row confined to the pairs that see it. ALWAYS_CONFINE: the confining
# launches recompute on every call (tests).
ALWAYS_CONFINE = False


def confine_flags(ref: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``n`` int32 flags on ``ref``'s device for plain launches to set, 16 bytes apart (aligned pointers); set
    already with ALWAYS_CONFINE."""
    f = (torch.ones if ALWAYS_CONFINE else torch.zeros)(4 * n, dtype=torch.int32, device=ref.device)
    return [f] if n == 1 else [f[4 * i:] for i in range(n)]


def launch_confined(launcher: "Launcher", grid, args, consts: dict) -> None:
    """``launcher(grid, args)`` plain, then confining (its flag argument is in ``args``)."""
    launcher(grid, args, **consts, CONFINE=False)
    launcher(grid, args, **consts, CONFINE=True)


def forget_launches():
    """Empty every launcher's cache of compiled kernels and chosen configs (after an autotuner's list or choice
    was changed: the next launch per key goes through the autotuner again)."""
    for launcher in Launcher.instances:
        launcher.cache.clear()


class _RT:
    """Triton's runtime modules, imported at the first compiled launch (not at import: the interpreter tests)."""
    driver = knobs = HookChain = Autotuner = OutOfResources = None


def _triton_runtime():
    if _RT.driver is None:
        from triton import knobs
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.driver import driver
        from triton.runtime.errors import OutOfResources

        _RT.driver, _RT.knobs, _RT.HookChain = driver, knobs, getattr(knobs, "HookChain", None)
        _RT.Autotuner, _RT.OutOfResources = Autotuner, OutOfResources


# Autotuning compiles every config of a kernel before timing them, and Triton compiles them one after another
# (seconds each: most of a process's first training step). The first launch of an autotuned kernel whose tuning key
# is new compiles the configs the autotuner will time at once, in COMPILE_THREADS threads (Triton's AsyncCompileMode:
# ptxas runs as a subprocess, so the compilations overlap); the autotuner then times the compiled kernels. 0 or 1:
# Triton's serial path. Read at import.
def _compile_threads() -> int:
    """BASED_KERNELS_COMPILE_THREADS, else up to 8 threads from this process's share of the node's CPUs (torchrun's
    LOCAL_WORLD_SIZE processes compile at the same time)."""
    value = os.environ.get("BASED_KERNELS_COMPILE_THREADS", "")
    if not value:
        local = os.environ.get("LOCAL_WORLD_SIZE", "1")
        share = (os.cpu_count() or 1) // (int(local) if local.isdigit() and int(local) > 0 else 1)
        return max(1, min(8, share))
    if not value.isdigit():
        raise ValueError(f"BASED_KERNELS_COMPILE_THREADS={value!r}: set it to a whole number of threads "
                         "(0 or 1: compile autotune configs one at a time)")
    return int(value)


COMPILE_THREADS = _compile_threads()
_COMPILE_POOL: list = []  # the thread pool, made at first use
_PRECOMPILE_FAILED: list = []  # the first error: later launches skip the parallel compile


def tuning_key(tuner, args, consts) -> tuple:
    """The key ``tuner`` (a Triton Autotuner) files its choice under for these arguments: the values of its
    ``key`` arguments, then the dtype of every argument that has one (as Triton 3.6's ``Autotuner.run``)."""
    named = {**dict(zip(tuner.arg_names, args)), **consts}
    named = {k: v for k, v in named.items() if k in tuner.arg_names}
    return tuple([named[k] for k in tuner.keys if k in named] + [str(v.dtype) for v in named.values()
                                                                 if hasattr(v, "dtype")])


def precompile_configs(tuner, grid, args, consts) -> None:
    """Compile, in ``COMPILE_THREADS`` threads, every config ``tuner`` is about to time for this launch (nothing
    when it has one config or has tuned this key already). A compilation that fails is left to the autotuner, which
    compiles it again and skips the config as Triton does; any other error turns the parallel compile off for the
    process, with one warning, and the autotuner compiles serially."""
    if len(tuner.configs) < 2 or _PRECOMPILE_FAILED or tuning_key(tuner, args, consts) in tuner.cache:
        return
    from concurrent.futures import ThreadPoolExecutor

    from triton.runtime._async_compile import AsyncCompileMode

    if not _COMPILE_POOL:
        _COMPILE_POOL.append(ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="based_kernels-compile"))
    try:
        with AsyncCompileMode(_COMPILE_POOL[0], ignore_errors=True):
            tuner.warmup(*args, grid=grid, **consts)
    except Exception as e:  # noqa: BLE001 - the serial path below still compiles and reports real errors
        _PRECOMPILE_FAILED.append(e)
        import warnings

        warnings.warn(f"based_kernels: compiling autotune configs in parallel failed ({type(e).__name__}: {e}); "
                      "compiling them one at a time from now on (BASED_KERNELS_COMPILE_THREADS=1 silences this)",
                      RuntimeWarning, stacklevel=2)


# ------------------------------------------------------------- varlen and layout helpers of the ops modules
def split_varlen(fn, cu_seqlens: torch.Tensor, tensors, initial_state, output_final_state: bool):
    """Run ``fn(*tensors_of_one_doc, initial_state=state_i)`` per document of a ``cu_seqlens`` batch (B = 1).

    ``tensors`` are ``[1, T, ...]``; ``initial_state`` is a tuple of tensors with a leading document dimension
    (or None). Returns the concatenated output and, if asked, the per-document final states stacked.
    """
    bounds = check_cu_seqlens(cu_seqlens, tensors[0].shape[1], tensors[0].shape[0])
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        state = None if initial_state is None else tuple(s[i : i + 1] for s in initial_state)
        o, fin = fn(*(t[:, a:b] for t in tensors), initial_state=state, output_final_state=output_final_state)
        outs.append(o)
        finals.append(fin)
    out = torch.cat(outs, dim=1)
    if not output_final_state:
        return out, None
    return out, tuple(torch.cat(parts, dim=0) for parts in zip(*finals))


def lastdim_contiguous(t):
    """t (None stays None) with a contiguous last dim: itself when it has one, else a contiguous copy."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def token_major(t):
    """Whether a ``[B, T, ...]`` tensor (B > 1) is laid out token-major (``[T, B, ...]`` in memory)."""
    return t.dim() >= 2 and t.shape[0] > 1 and t.stride(0) < t.stride(1)


def empty_like_layout(ref, shape, dtype=None):
    """An empty ``[B, T, ...]`` tensor laid out token-major (``[T, B, ...]`` in memory) when ``ref`` is."""
    dtype = ref.dtype if dtype is None else dtype
    if token_major(ref):
        return torch.empty((shape[1], shape[0], *shape[2:]), dtype=dtype, device=ref.device).transpose(0, 1)
    return torch.empty(shape, dtype=dtype, device=ref.device)


def doc_ids(cu_seqlens, T, device):
    """Per-token document index ``[T]`` int32 from ``cu_seqlens`` (checked first: one host sync per new cu_seqlens
    tensor, see ``check_cu_seqlens``), on the device; None without cu_seqlens."""
    if cu_seqlens is None:
        return None
    check_cu_seqlens(cu_seqlens, T)
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    pos = torch.arange(T, device=device, dtype=torch.int64)
    return (torch.searchsorted(cu[1:], pos, right=True)).to(torch.int32)
