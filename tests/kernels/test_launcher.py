"""The low-overhead launcher (`based_kernels._common.Launcher`) passes the kernels' C launcher
exactly what Triton's own launch path passes it.

Runs in a subprocess without TRITON_INTERPRET and with a stand-in Triton driver: the kernels really compile for
sm_90 (ptxas ships with triton), only the C launcher is replaced by a recorder. The first call of each shape goes
through the autotuner and JITFunction.run, the second through the cached kernel; both launch records (grid and
every argument: tensors as dtype, shape, strides, and the storage they point into) must be identical. A call with
a tensor that is not 16-byte aligned is keyed apart; launch hooks, when set, reach the C launcher. The first
launch of an autotuned kernel compiles every config of its list up front in the compile threads
(``precompile_configs``); a later launch of a key already tuned compiles nothing up front (``tuning_key`` files
under the autotuner's own key)."""
import textwrap

from .stand_in import DRIVER, run

SCRIPT = DRIVER + textwrap.dedent("""
    import triton.runtime.jit as jit
    from triton.runtime.autotuner import Autotuner

    calls, slow, hooks = [], [], []

    def init_handles(self):  # record launches instead of loading the cubin
        if self.module is None:
            name = self.name
            self._run = lambda *a: (calls.append((name, a[:3], a[9:])), hooks.append(a[7]))
            self.module, self.function = 1, 0

    compiler.CompiledKernel._init_handles = init_handles
    driver.set_active(FakeDriver())
    Autotuner._bench = lambda self, *a, config, **k: [float(self.configs.index(config))]  # no benchmarking
    run = jit.JITFunction.run
    warm = []  # (kernel, config) of each run with warmup=True: the parallel precompile of the autotune configs
    jit.JITFunction.run = lambda self, *a, **k: ((warm.append((self.fn.__name__, k.get("num_warps"),
                                                               k.get("num_stages"), k.get("maxnreg"), k.get("BM"),
                                                               k.get("BN")))
                                                   if k.get("warmup") else slow.append(self.fn.__name__)),
                                                  run(self, *a, **k))[1]
    import threading
    import triton.compiler as tc
    compiled_in = []  # the thread of every compilation
    compile_fn = tc.compile
    tc.compile = lambda *a, **k: (compiled_in.append(threading.current_thread().name), compile_fn(*a, **k))[1]

    from based_kernels import base_conv, sliding_window_attention
    from based_kernels.short_conv import base_conv_step

    def norm(a):
        if isinstance(a, torch.Tensor):
            return (a.dtype, tuple(a.shape), a.stride(), a.data_ptr() - a.untyped_storage().data_ptr())
        return a

    def record(fn, inputs):
        calls.clear(); slow.clear()
        outs = fn(*inputs)
        grads = torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], [torch.ones_like(o) for o in outs])
        return [(n, g, [norm(a) for a in args]) for n, g, args in calls], list(slow)

    torch.manual_seed(0)
    r = lambda *s: torch.randn(*s, dtype=torch.bfloat16, requires_grad=True)
    q, k, v, kp, vp = r(2, 300, 4, 112), r(2, 300, 2, 112), r(2, 300, 2, 112), r(2, 40, 2, 112), r(2, 40, 2, 112)
    swa = lambda q, k, v, kp, vp: (sliding_window_attention(q, k, v, window=64, kv_prefix=(kp, vp), backend="triton"),)
    cu = torch.tensor([0, 100, 101, 300])
    swa_var = lambda q, k, v: (sliding_window_attention(q, k, v, window=64, cu_seqlens=cu, backend="triton"),)
    u = r(500, 2, 2 * 96)  # Megatron [s, b, 2c] in-projection, halves seen as [b, s, c]
    w, init = torch.randn(96, 3, requires_grad=True), r(2, 2, 96)
    conv = lambda u, w, init: base_conv(u[..., :96].transpose(0, 1), u[..., 96:].transpose(0, 1), w,
                                        initial_state=init, output_final_state=True, backend="triton")
    step = lambda x, g, st: base_conv_step(x, g, w, st, backend="triton")
    # plain SWA (cached-plan path), Megatron token-major GQA inputs
    tm = lambda *s: torch.randn(*s, dtype=torch.bfloat16).transpose(0, 1).requires_grad_()
    qt, kt, vt = tm(300, 2, 4, 64), tm(300, 2, 2, 64), tm(300, 2, 2, 64)
    swa_plain = lambda q, k, v: (sliding_window_attention(q, k, v, window=128, backend="triton"),)
    # q one element past a 16-byte boundary: its own compiled kernels (cached under their own key)
    qm = torch.randn(2 * 300 * 4 * 64 + 1, dtype=torch.bfloat16)[1:].view(2, 300, 4, 64).requires_grad_()
    # SWA: three kernels, each launched plain and confining (sliding_window.ops._launch_confined)
    cases = [(swa, (q, k, v, kp, vp), 6), (swa_var, (q[:1], k[:1], v[:1]), 6), (conv, (u, w, init), 3),
             (swa_plain, (qt, kt, vt), 6), (swa_plain, (qm, kt, vt), 6)]
    for i, (fn, inputs, n_kernels) in enumerate(cases):
        warm.clear(); compiled_in.clear()
        first, slow_first = record(fn, inputs)
        second, slow_second = record(fn, inputs)
        assert len(first) == n_kernels and len(slow_first) == n_kernels, (first, slow_first)
        assert slow_second == [], slow_second  # the second call never entered JITFunction.run
        assert first == second, (first, second)
        if i == 0:  # SWA's three autotuned kernels: every config compiled up front, in the compile threads
            import based_kernels.sliding_window.forward as fwd, based_kernels.sliding_window.backward as bwd
            tuned = (fwd.swa_fwd_kernel, bwd.swa_bwd_dq_kernel, bwd.swa_bwd_dkdv_kernel)
            n_configs = sum(len(k.configs) for k in tuned)
            assert len(warm) == n_configs and len(set(warm)) == n_configs, warm  # each config once
            # the plain launches' configs in the compile threads; each confining launch compiles the one config its
            # plain launch tuned, in the main thread (a tuned key: nothing to compile up front)
            threads = [t for t in compiled_in if t != "MainThread"]
            assert len(compiled_in) - len(threads) == 3, compiled_in
            assert threads and all(t.startswith("based_kernels-compile") for t in threads), compiled_in
    assert first[0][2][0][3] == 2  # the unaligned q (byte offset 2) reached the launcher as such
    # launch hooks: None to the C launcher while none is set; the hook chain once one is
    from triton import knobs
    hooks.clear()
    record(swa_plain, (qt, kt, vt))
    assert hooks == [None] * 6, hooks
    seen = []
    knobs.runtime.launch_enter_hook.add(seen.append)
    try:
        hooks.clear()
        record(swa_plain, (qt, kt, vt))
        assert slow == [] and hooks == [knobs.runtime.launch_enter_hook] * 6, (slow, hooks)
    finally:
        knobs.runtime.launch_enter_hook.remove(seen.append)
    x, g, st = torch.randn(2, 96, dtype=torch.bfloat16), torch.randn(2, 96, dtype=torch.bfloat16), torch.randn(2, 2, 96)
    records = []
    for _ in range(2):  # the decode step: one kernel, no autograd
        calls.clear(); slow.clear()
        step(x, g, st)
        records.append(([(n, gr, [norm(a) for a in args]) for n, gr, args in calls], list(slow)))
    assert records[0][1] == ["conv_step_kernel"] and records[1][1] == [] and len(records[0][0]) == 1
    assert records[0][0] == records[1][0], records
    from based_kernels._common import forget_launches
    for fn, inputs, n_kernels in cases[:1]:  # new launches of keys already tuned: nothing compiled up front
        forget_launches()
        warm.clear()
        record(fn, inputs)
        assert warm == [], warm
    print("OK")
""")


def test_fast_launch_passes_the_same_arguments_as_triton():
    p = run(SCRIPT)
    assert p.returncode == 0 and p.stdout.strip().endswith("OK"), p.stdout[-3000:] + p.stderr[-5000:]
