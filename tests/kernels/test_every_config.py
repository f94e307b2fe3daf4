"""Every autotuning config of every autotuned kernel against its fp64 reference.

Autotuning launches whichever config times fastest on the machine at hand, so any config of a kernel's list can
be the one a user runs; the other kernel tests see one (on CPU the interpreter's small config; in the GPU suite,
which sets BASED_KERNELS_AUTOTUNE=0 for speed, a different config per test: tests/kernels/conftest.py). Here each
family's kernels run config i of their lists together (the last one where a list is shorter), for every i, on
shapes that end in a partial tile of every config: fp32 under the interpreter (its bf16 products are wrong; the CI
run), bf16 on a GPU (``make test`` there; not in ``make test-gpu``, whose time budget the rotation serves)."""
import pkgutil

import pytest
import torch

import based_kernels
from based_kernels._common import tune_bench

from . import test_cross_entropy as ce
from . import test_rms_norm as rms
from . import test_rope as rope
from . import test_short_conv as conv
from . import test_sliding_window as swa
from .configs import FAMILY_TESTS, autotuners, only_config

GPU = torch.cuda.is_available()
DT = torch.bfloat16 if GPU else torch.float32
T = 333 if GPU else 70  # > every BT / BM / BN (up to 128) on the GPU, > 64 in the (slow) interpreter


def check_short_conv():
    # the packed path (BaseConv's) with both backward variants: every kernel of the family once per config
    # (the unpacked ops run the same kernels; on CPU every test runs at every config's tiles too)
    tol = 1e-2 if GPU else 1e-5  # C = 520: a partial channel block of every BC (32..512)
    default = conv.ops.BWD_VARIANT
    try:
        for variant in ("tile", "stream"):
            conv.check_packed(1, T, 520, 3, cu=[0, 1, T - 20, T], dtype=DT, tol=tol, variant=variant, seed=5)
    finally:
        conv.ops.BWD_VARIANT = default


def check_sliding_window():
    # both autotuning keys (BLOCK_D 64 and 128), the context-parallel prefix and packed documents; both backwards
    tol = 1.5e-2 if GPU else 1e-5
    cu = torch.tensor([0, 1, T - 20, T], dtype=torch.int32, device=swa.DEV)
    default = swa.ops.BWD
    try:
        for variant in ("split", "fused"):
            swa.ops.BWD = variant
            swa.check_against_fp64(*swa.make(1, T, 2, 2, 64, DT, 0, seed=3), 64, tol, cu_seqlens=cu)
            swa.check_against_fp64(*swa.make(1, T, 2, 1, 112, DT, 40, seed=2), 50, tol)
    finally:
        swa.ops.BWD = default


def check_rms_norm():
    # a partial row block of every BLOCK_M and a partial BLOCK_D, bf16 weights as in bf16 models; one width (each
    # width or weight dtype is one more compilation of every config, and the GPU suite has a time budget); the
    # norm, and the residual add + norm
    x, w, dy = rms.make((T, 1000), DT, DT, seed=11)
    ours = rms.run(x, w, dy, 1e-5, backend="triton")
    theirs = rms.run(x, w, dy, 1e-5, backend="torch")
    for name, a, t, ref in zip(("y", "dx", "dw"), ours, theirs, rms.fp64_reference(x, w, dy, 1e-5)):
        err, torch_err = rms.rel(a, ref), rms.rel(t, ref)
        assert err <= 1.5 * torch_err + 1e-6, (name, err, torch_err)
    # the residual add + norm of decode (an fp32 residual and a bias, as in bf16 models)
    from based_kernels.rms_norm.reference import residual_add

    r = torch.randn(T, 1000, generator=torch.Generator().manual_seed(12)).to(x.device) * 4
    with torch.inference_mode():
        y, h = based_kernels.add_rms_norm(x, r, w, 1e-5, bias=w, out_dtype=DT, backend="triton")
        h_ref = residual_add(r, x, w)
    assert torch.equal(h, h_ref)
    assert rms.rel(y, rms.fp64_reference(h_ref, w, dy, 1e-5)[0]) < (5e-3 if GPU else 2e-6)


def check_rope():
    s, b, ng, G, D, offset = 37, 3, 4, 2, 64, 1000  # s * b * ng rows: a partial block of every BLOCK_N
    qkv = rope.make_qkv(s, b, ng, G, D, DT, seed=12)
    dq, dk, dv = rope.strided_grads(s, b, ng, G, D, DT, seed=13)
    got = rope.run(qkv, dq, dk, dv, ng, D, offset=offset, backend="triton")
    ref = rope.reference(qkv, dq, dk, dv, G, D, offset)
    errs = [rope.rel(a, r) for a, r in zip(got, ref)]
    assert max(errs) < (4e-3 if GPU else 2e-7), errs
    pos = rope.ragged_positions(s, b)  # per-token positions: the kernels' other angle source
    got = rope.run(qkv, dq, dk, dv, ng, D, positions=pos, backend="triton")
    errs = [rope.rel(a, r) for a, r in zip(got, rope.reference(qkv, dq, dk, dv, G, D, 0, positions=pos))]
    assert max(errs) < (4e-3 if GPU else 2e-7), errs


def check_cross_entropy():
    x, t, dloss = ce.make(37 if GPU else 5, 10_007, DT, seed=14)  # V: a partial block of every BLOCK_V (2048..8192)
    loss, grad = ce.run(x, t, dloss, backend="triton")
    loss_ref, grad_ref = ce.fp64_reference(x, t, dloss)
    assert (loss.double() - loss_ref).abs().max().item() < 1e-4
    assert ce.rel(grad, grad_ref) < (8e-3 if GPU else 1e-6)


FAMILIES = {"short_conv": check_short_conv, "sliding_window": check_sliding_window, "rms_norm": check_rms_norm,
            "rope": check_rope, "cross_entropy": check_cross_entropy}


def launch_key(config):
    """What of a config changes a launch's arithmetic: on a GPU the whole config; in the interpreter only its tile
    sizes and pre-hook (it runs the programs one by one: num_warps, num_stages and the like change nothing)."""
    return str(config) if GPU else (tuple(sorted(config.kwargs.items())), config.pre_hook)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_config_matches_fp64(family):
    """Config i of every kernel of the family together, for every i; in the interpreter an i whose configs each
    kernel already ran (the same tiles, only other warps / stages: ``launch_key``) is not run again."""
    tuners = autotuners(family)
    assert tuners, f"no autotuned kernel found in based_kernels.{family}"
    seen = {t: set() for t in tuners}
    for i in range(max(len(t.configs.all) for t in tuners)):
        pick = lambda every: every[min(i, len(every) - 1)]  # noqa: E731
        keys = {t: launch_key(pick(t.configs.all)) for t in tuners}
        if all(keys[t] in seen[t] for t in tuners):
            continue
        for t in tuners:
            seen[t].add(keys[t])
        with only_config(tuners, pick) as configs:
            try:
                FAMILIES[family]()
            except AssertionError as e:
                raise AssertionError(f"config {i}: {configs}: {e}") from None


def test_every_family_with_autotuning_is_covered():
    """A new autotuned family gets a check here."""
    root = based_kernels.__path__
    families = {m.name for m in pkgutil.iter_modules(root) if m.ispkg}
    assert {f for f in families if autotuners(f)} == set(FAMILIES) == set(FAMILY_TESTS)
    for family in FAMILIES:  # and times its configs with the short benchmark (Triton's default: 125 ms a config)
        assert all(t.do_bench is tune_bench for t in autotuners(family)), family
