"""Every Triton kernel of a bf16 decode step and of a bf16 training step (forward and backward) compiles for sm_90
with the arguments and constexprs the model really launches it with: a C / L / S model run on CPU tensors without
TRITON_INTERPRET, with a stand-in Triton driver (as in test_launcher.py): each kernel goes through Triton's compiler
and the ptxas that ships with triton, down to a cubin; only the launch is replaced by a record. Catches what the
interpreter cannot (lowering errors, e.g. of fp64 math, unsupported layouts) before a GPU run."""
import textwrap

from .stand_in import DRIVER, run

# the stand-in driver recording the kernels launched (``calls``), every autotuning config compiled
RECORD = DRIVER + textwrap.dedent("""
    from triton.runtime.autotuner import Autotuner

    calls = []

    def init_handles(self):  # record launches instead of loading the cubin (compiled by then)
        if self.module is None:
            name = self.name
            self._run = lambda *a: calls.append(name)
            self.module, self.function = 1, 0

    compiler.CompiledKernel._init_handles = init_handles
    driver.set_active(FakeDriver())
    Autotuner._bench = lambda self, *a, config, **k: [float(self.configs.index(config))]  # every config compiles
""")

SCRIPT = RECORD + textwrap.dedent("""
    import os

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import based_kernels
    from megatron_based.inference.generation import Generator
    from megatron_based.model import build_model
    from megatron_based.model.config import BasedConfig
    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(1)
    # based-360m's head size (64), f 16, an fp32 residual stream, the fused cross entropy; Megatron's compiled
    # SwiGLU / bias-dropout-add off (torch.compile, not ours)
    cfg = BasedConfig(layer_pattern="CLS", hidden_size=128, num_attention_heads=2, feature_dim=16, swa_window=16,
                      params_dtype=torch.bfloat16, bf16=True, use_cpu_initialization=True,
                      bias_activation_fusion=False, bias_dropout_fusion=False, cross_entropy_loss_fusion=True)
    model = build_model(cfg, vocab_size=256, max_sequence_length=64).eval()
    with based_kernels.use_backend("triton"), torch.inference_mode():
        gen = Generator(model, vocab_size=256, static_decode=True)
        gen.allocate(4)  # the decode step alone: positions as after a prefill of ragged prompts
        gen.positions, gen._host_positions = torch.tensor([3, 5, 200, 0]), [3, 5, 200, 0]
        gen.step(torch.tensor([1, 2, 3, 4]))
    print("DECODE", " ".join(sorted(set(calls))))
    calls.clear()
    with based_kernels.use_backend("triton"):
        model.train()
        ids = torch.randint(0, 256, (2, 64))
        model(ids, torch.arange(64).expand(2, 64), None, labels=ids).float().sum().backward()
    print("TRAIN", " ".join(sorted(set(calls))))
""")

DECODE = {"rms_fwd_kernel", "add_rms_fwd_kernel", "conv_step_kernel", "taylor_step_buffered_kernel", "rope_fwd_kernel",
          "swa_step_kernel"}
TRAIN = {"rms_fwd_kernel", "rms_bwd_kernel", "conv_fwd_kernel", "conv_bwd_stream_kernel", "taylor_chunk_state_kernel",
         "taylor_chunk_state_part_kernel", "taylor_chunk_output_kernel", "taylor_prep_kernel",
         "taylor_chunk_grad_kernel", "rope_fwd_kernel", "rope_bwd_kernel", "swa_fwd_kernel", "swa_bwd_dq_kernel",
         "swa_bwd_dkdv_kernel", "ce_fwd_kernel", "ce_bwd_kernel"}


def test_decode_and_training_kernels_compile_for_sm90():
    p = run(SCRIPT)
    out = {line.split()[0]: set(line.split()[1:]) for line in p.stdout.splitlines()
           if line.startswith(("DECODE", "TRAIN"))}
    assert p.returncode == 0 and set(out) == {"DECODE", "TRAIN"}, p.stdout[-3000:] + p.stderr[-5000:]
    assert out["DECODE"] == DECODE, out["DECODE"] ^ DECODE
    assert out["TRAIN"] == TRAIN, out["TRAIN"] ^ TRAIN


# The Taylor output pass at f 8 (the feature rows' constant / linear tile, ops.low_rows_tile) compiled for sm_90 as
# the library launches it (bf16, d_v 32, packed documents, the final state): the PTX's tensor-core products by shape.
TAYLOR_SCRIPT = DRIVER + textwrap.dedent("""
    import re

    ptx = {}

    def init_handles(self):  # record each compiled kernel's PTX instead of loading it
        if self.module is None:
            name, text = self.name, self.asm["ptx"]
            self._run = lambda *a: ptx.setdefault(name, []).append(text)
            self.module, self.function = 1, 0

    compiler.CompiledKernel._init_handles = init_handles
    driver.set_active(FakeDriver())
    from based_kernels.taylor_attention import taylor_linear_attention

    q, k = (torch.randn(1, 24, 4, 8, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(1, 24, 4, 32, dtype=torch.bfloat16)
    taylor_linear_attention(q, k, v, cu_seqlens=torch.tensor([0, 3, 15, 24], dtype=torch.int32),
                            output_final_state=True, backend="triton")
    shape = r"wgmma\\.mma_async\\.sync\\.aligned\\.(m\\d+n\\d+k\\d+)"
    for name in ("taylor_chunk_state_part_kernel", "taylor_chunk_output_kernel"):  # ops.OUTPUT_SPLIT on or off
        for text in ptx.get(name, []):
            print("WGMMA", name, " ".join(sorted(set(re.findall(shape, text)))))
""")


def test_taylor_output_pass_at_f8_has_no_n16_products():
    """The output pass's tile of the constant and linear feature rows at 32 rows or more (ops.low_rows_tile; at 16
    rows, f 8's, its feature products were [chunk, 16] x [16, 16], wgmma m64n16k16): the plain and the confining
    launch at f 8, d_v 32 (packed documents, final state) have no n16 product left, nor has the state-part kernel
    that computes those products where the output pass is split (ops.OUTPUT_SPLIT, the default)."""
    from based_kernels.taylor_attention import ops

    p = run(TAYLOR_SCRIPT)
    lines = [line.split() for line in p.stdout.splitlines() if line.startswith("WGMMA")]
    shapes = [set(words[2:]) for words in lines]
    assert p.returncode == 0 and shapes, p.stdout[-3000:] + p.stderr[-5000:]
    assert ("taylor_chunk_state_part_kernel" in {words[1] for words in lines}) == ops.OUTPUT_SPLIT, lines
    assert all(shapes) and not any(s.startswith("m64n16") for group in shapes for s in group), shapes


# The fused SWA backward (sliding_window ops.BWD = "fused") compiled for sm_90 as the library launches it: bf16, GQA
# with a context-parallel prefix, and packed documents at d 112 (padded to 128); plain and confining launches.
SWA_FUSED_SCRIPT = RECORD + textwrap.dedent("""
    from based_kernels import _common, sliding_window_attention
    from based_kernels.sliding_window import ops

    ops.BWD = "fused"
    _common.ALWAYS_CONFINE = True  # the confining launches run their programs too (compiled either way)

    def fwd_bwd(B, T, H, Hkv, D, P=0, cu=None):
        q = torch.randn(B, T, H, D, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(B, T, Hkv, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        pre = tuple(torch.randn(B, P, Hkv, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)) \\
            if P else None
        o = sliding_window_attention(q, k, v, window=128, kv_prefix=pre, cu_seqlens=cu, backend="triton")
        o.backward(torch.randn_like(o))

    fwd_bwd(2, 300, 8, 4, 64, P=128)
    fwd_bwd(1, 300, 4, 4, 112, cu=torch.tensor([0, 100, 101, 300], dtype=torch.int32))
    print("SWA", " ".join(sorted(set(calls))))
""")


def test_fused_swa_backward_compiles_for_sm90():
    p = run(SWA_FUSED_SCRIPT)
    lines = [line.split() for line in p.stdout.splitlines() if line.startswith("SWA")]
    assert p.returncode == 0 and lines, p.stdout[-3000:] + p.stderr[-5000:]
    assert set(lines[0][1:]) == {"swa_fwd_kernel", "swa_bwd_delta_kernel", "swa_bwd_fused_kernel"}, lines
