"""With tuning off (``BASED_KERNELS_AUTOTUNE=0``, a documented user setting) an autotuned kernel gets only its list's
first config; where that config does not fit the device (Triton's ``OutOfResources`` at load: shared memory or
registers, e.g. the SWA forward's fp32 tiles at head dim 128 on an H100), the launcher takes the next config of the
full list that fits, as tuning would, instead of failing; when none fits, Triton's error comes through.

Runs in a subprocess without TRITON_INTERPRET and with a stand-in Triton driver (as test_launcher.py): the kernels
compile for sm_90, the load of a refused config raises OutOfResources as Triton's own load does."""
import textwrap

from .stand_in import DRIVER, run

SCRIPT = 'import os\nos.environ["BASED_KERNELS_AUTOTUNE"] = "0"\n' + DRIVER + textwrap.dedent("""
    from triton.runtime.errors import OutOfResources

    launched = []
    limit = {}  # the stand-in device's shared memory for swa_fwd_kernel: just below what its first load needs

    def init_handles(self):
        if self.module is None:
            if self.name == "swa_fwd_kernel":
                cap = limit.setdefault("smem", self.metadata.shared - 1)
                if self.metadata.shared > cap:
                    raise OutOfResources(self.metadata.shared, cap, "shared memory")
            key = (self.name, self.metadata.shared)
            self._run = lambda *a: launched.append(key)
            self.module, self.function = 1, 0

    compiler.CompiledKernel._init_handles = init_handles
    driver.set_active(FakeDriver())

    from based_kernels import sliding_window_attention
    from based_kernels._common import forget_launches
    from based_kernels.sliding_window import forward

    tuner = forward.swa_fwd_kernel
    first = tuner.configs.all[0]
    assert len(tuner.configs) == 1 and tuner.configs[0] is first
    q, k, v = (torch.randn(1, 100, 2, 128, dtype=torch.bfloat16) for _ in range(3))
    sliding_window_attention(q, k, v, window=32, backend="triton")
    fwd = [c for c in launched if c[0] == "swa_fwd_kernel"]
    # plain and confining launch, each with the first config of the list after the first that fits
    fits = [c for c in tuner.configs.all[1:] if c.kwargs["BN"] < first.kwargs["BN"] or c.num_stages < first.num_stages]
    assert len(fwd) == 2 and all(s <= limit["smem"] for _, s in fwd), (fwd, limit)
    assert tuner.best_config is tuner.configs.all[1] and tuner.configs.all[1] in fits, tuner.best_config
    assert len(tuner.configs) == 1 and tuner.configs[0] is first  # the next key starts from the first again
    launched.clear()
    sliding_window_attention(q, k, v, window=32, backend="triton")  # cached: the same config, no retry
    assert [c for c in launched if c[0] == "swa_fwd_kernel"] == fwd, launched
    # no config fits (a head dim of its own: new compilations, each loaded once): Triton's error, the list restored
    forget_launches()
    limit["smem"] = 0
    try:
        sliding_window_attention(q[..., :112], k[..., :112], v[..., :112], window=32, backend="triton")
    except OutOfResources as e:
        assert "shared memory" in str(e), e
    else:
        raise AssertionError("no OutOfResources with every config refused")
    assert len(tuner.configs) == 1 and tuner.configs[0] is first
    print("OK")
""")


def test_first_config_that_does_not_fit_falls_back_to_the_next():
    p = run(SCRIPT)
    assert p.returncode == 0 and p.stdout.strip().endswith("OK"), p.stdout[-3000:] + p.stderr[-3000:]
