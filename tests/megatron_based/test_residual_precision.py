"""fp32 residual stream (``fp32_residual_connection``, BASED's default for bf16 parameters): the config defaults and
pipeline dtype, a bf16 model's forward / backward at TP 1 and TP 2 + sequence parallel (the residual fp32 between
layers, the norms' outputs bf16), and generation (prefill + decode) against the full forward with it on. The
accuracy gain itself is measured by benchmarks/residual_precision.py (tests/benchmarks/test_residual_precision.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig

from megatron_based.model.config import BasedConfig, ConfigError, as_based_config, model_spec_from_dict
from tests.distributed import run_distributed
from tests.megatron_based.helpers import (bf16_model_and_fp64_reference, initialize_parallel, loss_logits_grads,
                                          tiny_config, tiny_model)

REPO = Path(__file__).resolve().parents[2]


def test_defaults_follow_the_parameter_dtype():
    """On for bf16 / fp16 parameters (the authors' residual_in_fp32), off for fp32 / fp64 (an fp64 reference model
    keeps an fp64 residual); an explicit value wins; with it on, the pipeline stages exchange fp32."""
    assert tiny_config(params_dtype=torch.bfloat16, bf16=True).fp32_residual_connection is True
    assert tiny_config(params_dtype=torch.float16, fp16=True).fp32_residual_connection is True
    assert tiny_config().fp32_residual_connection is False
    assert tiny_config(params_dtype=torch.float64).fp32_residual_connection is False
    off = tiny_config(params_dtype=torch.bfloat16, bf16=True, fp32_residual_connection=False,
                      pipeline_dtype=torch.bfloat16)
    assert off.fp32_residual_connection is False and off.pipeline_dtype == torch.bfloat16
    on = tiny_config(params_dtype=torch.bfloat16, bf16=True, pipeline_dtype=torch.bfloat16)
    assert on.pipeline_dtype == torch.float32
    # a plain Megatron TransformerConfig leaves the field at Megatron's False: BASED's default applies
    plain = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, bf16=True,
                              params_dtype=torch.bfloat16)
    assert as_based_config(plain, layer_pattern="CL").fp32_residual_connection is True
    with pytest.raises(ConfigError, match="fp32_residual_connection"):
        tiny_config(fp32_residual_connection="yes")


@pytest.mark.parametrize("name", ["based-360m", "based-1.3b"])
def test_released_configs_and_bf16_runs_keep_the_residual_in_fp32(name):
    """configs/based-*.yaml say so; a bf16 run's model spec (training/config.py) then has fp32 pipeline traffic."""
    from megatron_based.training.config import DataConfig, ParallelConfig, RunConfig, TrainConfig

    section = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())["model"]
    assert section["fp32_residual_connection"] is True
    run = RunConfig(model=section, parallel=ParallelConfig(pipeline_model_parallel_size=2),
                    train=TrainConfig(precision="bf16"), data=DataConfig())
    config = run.model_spec().config
    assert config.bf16 and config.params_dtype == torch.bfloat16
    assert config.fp32_residual_connection and config.pipeline_dtype == torch.float32
    fp32 = RunConfig(model=section, parallel=ParallelConfig(), train=TrainConfig(precision="fp32"),
                     data=DataConfig()).model_spec().config
    assert fp32.params_dtype == torch.float32 and fp32.pipeline_dtype == torch.float32
    assert model_spec_from_dict(section, params_dtype=torch.bfloat16, bf16=True).config.fp32_residual_connection


def _dtypes_and_grads(tp, sp, fp32_residual=True):
    initialize_parallel(tp, 1, 1)
    model = tiny_model("CLSA", tensor_model_parallel_size=tp, sequence_parallel=sp, params_dtype=torch.bfloat16,
                       bf16=True, fp32_residual_connection=fp32_residual)
    seen = {"layer_out": set(), "norm_in": set(), "norm_out": set(), "mixer_in": set(), "mixer_out": set(),
            "embedding": set()}

    def record(inputs_key, output_key):
        def hook(module, inputs, output):  # returns None: the output stays as it is
            if inputs_key:
                seen[inputs_key].add(inputs[0].dtype)
            seen[output_key].add((output[0] if isinstance(output, tuple) else output).dtype)
        return hook

    for layer in model.decoder.layers:
        layer.register_forward_hook(record(None, "layer_out"))
        layer.self_attention.register_forward_hook(record("mixer_in", "mixer_out"))
    for norm in [model.decoder.final_layernorm] + [n for layer in model.decoder.layers
                                                   for n in (layer.input_layernorm, layer.pre_mlp_layernorm)]:
        norm.register_forward_hook(record("norm_in", "norm_out"))
    model.embedding.register_forward_hook(record(None, "embedding"))
    loss, logits, grads = loss_logits_grads(model)
    return ({k: sorted(str(d) for d in v) for k, v in seen.items()}, logits.detach().float(), loss.detach(),
            {k: v.float() for k, v in grads.items()})


def _tp_worker(rank, world, sp):
    ref = _dtypes_and_grads(1, False)
    got = _dtypes_and_grads(2, sp)
    rel = {name: ((got[3][name] - g).norm() / g.norm()).item() for name, g in ref[3].items()}
    finite = all(torch.isfinite(g).all() for g in got[3].values()) and bool(torch.isfinite(got[2]).all())
    return ref[0], got[0], ((got[1] - ref[1]).norm() / ref[1].norm()).item(), rel, finite


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_bf16_forward_backward_keeps_the_residual_fp32(sequence_parallel):
    """A bf16 CLSA model (every mixer) with the fp32 residual: the embedding output and every layer's output are
    fp32, every norm (input, pre-MLP, final) reads fp32 and writes bf16, the mixers compute in bf16; loss and
    gradients are finite and TP 2 (with / without sequence parallelism: fp32 scatter / gather of the residual)
    equals TP 1 up to bf16 rounding (the TP reductions sum in another order)."""
    for ref_dtypes, dtypes, logits_err, grad_err, finite in run_distributed(_tp_worker, 2, sequence_parallel):
        for d in (ref_dtypes, dtypes):
            assert d["embedding"] == d["layer_out"] == d["norm_in"] == ["torch.float32"], d
            assert d["norm_out"] == d["mixer_in"] == d["mixer_out"] == ["torch.bfloat16"], d
        assert finite
        assert logits_err < 2e-2, logits_err
        assert len(grad_err) > 20
        for name, err in grad_err.items():
            assert err < 5e-2, (name, err)


def _bf16_residual_dtypes(rank, world):
    return _dtypes_and_grads(1, False, fp32_residual=False)[0]


def test_bf16_residual_when_turned_off():
    """fp32_residual_connection: false keeps the old bf16 residual stream (everything bf16)."""
    d = run_distributed(_bf16_residual_dtypes, 1)[0]
    assert all(v == ["torch.bfloat16"] for v in d.values()), d


VOCAB = 100


def _generation_worker(rank, world):
    from megatron_based.inference.generation import (Generator, at_decode_positions, decode_error_report,
                                                     teacher_forced_logits)

    initialize_parallel(world)
    model, reference = bf16_model_and_fp64_reference("CLSCLSA", VOCAB)
    assert model.config.fp32_residual_connection
    norm_io = set()

    def hook(module, inputs, output):
        norm_io.add((inputs[0].dtype, output.dtype))

    for layer in model.decoder.layers:
        layer.input_layernorm.register_forward_hook(hook)
        layer.pre_mlp_layernorm.register_forward_hook(hook)
    model.decoder.final_layernorm.register_forward_hook(hook)
    tokens = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    Ps, steps = [4, 9, 12], 12
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        full = at_decode_positions(model(tokens, pos, attention_mask=None)[..., :VOCAB].float(), Ps, steps)
        ref = at_decode_positions(reference(tokens, pos, attention_mask=None)[..., :VOCAB], Ps, steps)
    norm_io.clear()
    gen = Generator(model, vocab_size=VOCAB, max_length=64)
    report = decode_error_report(teacher_forced_logits(gen, tokens, Ps, steps), full, ref)
    return report, sorted((str(a), str(b)) for a, b in norm_io)


def test_generation_equals_the_full_forward_with_fp32_residual():
    """Prefill + teacher-forced decode of a bf16 model with the fp32 residual (C, L, S and A layers; BaseConv's
    bias goes through the generator's bias-add in fp32) matches its own full forward: both within bf16 rounding of
    an fp64 forward of the same weights, decode within 2x of the full forward's error; the generator's norms read
    the fp32 residual and write bf16, as the layers' do."""
    report, norm_io = run_distributed(_generation_worker, 1)[0]
    assert norm_io == [("torch.float32", "torch.bfloat16")], norm_io
    assert 1e-4 < report["full_forward_rel_rms"] < 0.05, report
    assert report["passed"] and report["decode_rel_rms"] <= 2 * report["full_forward_rel_rms"], report


def _pipeline_run(pp, weights=None):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from .test_pipeline import MICRO, PATTERN, SEQ, _batches, _global_name

    initialize_parallel(1, pp, 1)
    # pipeline_dtype bf16 as a bf16 run passes it (training/config.py): BasedConfig raises it to fp32
    model = tiny_model(PATTERN, pipeline_model_parallel_size=pp, pipeline_dtype=torch.bfloat16,
                       params_dtype=torch.bfloat16, bf16=True)
    assert model.config.fp32_residual_connection and model.config.pipeline_dtype == torch.float32
    offset = parallel_state.get_pipeline_model_parallel_rank() * (len(PATTERN) // pp)
    if weights is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(weights["embedding.word_embeddings.weight" if name == "output_layer.weight"
                                else _global_name(name, offset)])
    model = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    pos = torch.arange(SEQ).unsqueeze(0)

    def forward_step(data_iterator, model):
        ids, labels = next(data_iterator)
        out = model(ids, pos, None, labels=labels)
        return out, lambda o: (o.float().sum(), torch.tensor(o.numel()), {"loss": o.float().sum().detach()})

    losses = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(_batches()),
                                         model=[model], num_microbatches=MICRO, seq_length=SEQ, micro_batch_size=1,
                                         forward_only=False)
    finalize_model_grads([model])
    grads = {_global_name(n, offset): p.main_grad.float().clone() for n, p in model.module.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    return (sum(x["loss"] for x in losses) if losses else None), grads, weights


def _pipeline_worker(rank, world):
    ref_loss, ref_grads, weights = _pipeline_run(1)
    loss, grads, _ = _pipeline_run(2, weights)
    errs = {n: ((g - ref_grads[n]).norm() / ref_grads[n].norm()).item() for n, g in grads.items()
            if n != "output_layer.weight"}
    return (None if loss is None else abs(loss - ref_loss).item() / ref_loss.item()), errs


def test_pipeline_parallel_sends_the_fp32_residual():
    """bf16 PP=2 (1F1B over gloo) with the fp32 residual: the stages exchange fp32 activations (pipeline_dtype),
    loss and gradients equal PP=1's up to bf16 rounding."""
    (loss0, errs0), (loss1, errs1) = run_distributed(_pipeline_worker, 2)
    assert loss0 is None and loss1 < 1e-2, loss1
    assert len(errs0) + len(errs1) > 20
    for name, err in {**errs0, **errs1}.items():
        assert err < 5e-2, (name, err)


def _cp_worker(rank, world):
    import torch.distributed as dist

    from .test_context_parallel import _batch, _step

    batch = _batch(16)
    kw = dict(params_dtype=torch.bfloat16, bf16=True)
    initialize_parallel(1, 1, 1)
    ref = tiny_model("CLSA", **kw)
    ref_losses, ref_mean, *_ = _step(ref, batch, parallel_state.get_context_parallel_group())
    initialize_parallel(1, 1, 2)
    group = parallel_state.get_context_parallel_group()
    out = {}
    for recompute in (False, True):
        extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) \
            if recompute else {}
        model = tiny_model("CLSA", context_parallel_size=2, **kw, **extra)
        assert model.config.fp32_residual_connection
        losses, mean, *_ = _step(model, batch, group)
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
        for g in grads.values():
            dist.all_reduce(g, group=group)
        out[recompute] = (losses.float(), mean.float(), grads)
    L, r = 8, group.rank()
    ref_part = ref_losses[:, r * L:(r + 1) * L].float()
    return (((out[False][0] - ref_part).norm() / ref_part.norm()).item(), abs(out[False][1] - ref_mean).item(),
            all(torch.equal(out[True][2][n], g) for n, g in out[False][2].items()),
            all(torch.isfinite(g).all() for g in out[False][2].values()))


def test_context_parallel_with_fp32_residual():
    """bf16 CP=2 (every mixer's CP path: halos, all-gathers; the fp32 residual between them) with and without full
    recompute: per-token losses equal CP=1's up to bf16 rounding, recompute gives bitwise the same gradients."""
    for loss_err, mean_err, recompute_equal, finite in run_distributed(_cp_worker, 2):
        assert loss_err < 2e-2 and mean_err < 2e-2, (loss_err, mean_err)
        assert recompute_equal and finite


@pytest.mark.gpu
def test_cuda_graph_decode_with_fp32_residual(monkeypatch):
    """bf16 with the fp32 residual on the GPU (Triton kernels): CUDA-graph decode gives eager decode's greedy tokens
    and teacher-forced logits, and both are as close to an fp32 full forward of the same weights as the bf16 full
    forward is (decode_error_report)."""
    from megatron_based.inference.generation import (Generator, at_decode_positions, decode_error_report,
                                                     teacher_forced_logits)
    from megatron_based.model import build_model

    from .helpers import in_process_group

    with in_process_group(monkeypatch):
        kw = dict(layer_pattern="CLSC", hidden_size=128, num_attention_heads=4, feature_dim=8, swa_window=8)
        torch.manual_seed(0)
        model = build_model(BasedConfig(**kw, params_dtype=torch.bfloat16, bf16=True), vocab_size=VOCAB,
                            max_sequence_length=512).cuda().eval()
        assert model.config.fp32_residual_connection
        reference = build_model(BasedConfig(**kw), vocab_size=VOCAB, max_sequence_length=512).cuda().eval()
        with torch.no_grad():
            for ref_param, param in zip(reference.parameters(), model.parameters(), strict=True):
                ref_param.copy_(param)
        prompts = [list(range(1, 1 + n)) for n in (3, 12, 9)]
        eager, graphed = Generator(model, vocab_size=VOCAB), Generator(model, vocab_size=VOCAB, cuda_graph=True)
        assert graphed.generate(prompts, 20) == eager.generate(prompts, 20)
        tokens = torch.randint(0, VOCAB, (3, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        Ps, steps = [3, 12, 9], 28
        pos = torch.arange(40, device="cuda").expand(3, 40)
        with torch.no_grad():
            full = at_decode_positions(model(tokens, pos, attention_mask=None)[..., :VOCAB].float(), Ps, steps)
            ref = at_decode_positions(reference(tokens, pos, attention_mask=None)[..., :VOCAB], Ps, steps)
        got_eager = teacher_forced_logits(eager, tokens, Ps, steps)
        got_graph = teacher_forced_logits(graphed, tokens, Ps, steps)
        assert (got_graph - got_eager).abs().max().item() <= 1e-3 * got_eager.abs().max().item()
        report = decode_error_report(got_graph, full, ref)
        assert report["passed"], report


@pytest.mark.parametrize("res_dtype, out_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                                  (torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_decode_residual_add_is_one_kernel_and_bitwise(res_dtype, out_dtype):
    """Generator's residual add (_add, every sublayer of every prefill / decode step): without a bias, one add
    whose type promotion casts the bf16 output to the fp32 residual inside the kernel, bit for bit the explicit
    cast-then-add; a result in the residual's dtype; with a bias, out + bias first, in the residual's dtype."""
    from torch.profiler import ProfilerActivity, profile

    from megatron_based.inference.generation import _add

    g = torch.Generator().manual_seed(0)
    residual = (torch.randn(3, 5, 64, generator=g) * 30).to(res_dtype)
    out = torch.randn(3, 5, 64, generator=g).to(out_dtype)
    bias = torch.randn(64, generator=g).to(out_dtype)
    want = residual + out.to(res_dtype)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = _add(residual, (out, None))
    assert got.dtype == res_dtype and torch.equal(got, want)
    ops = [e.name for e in prof.events()  # the ops that launch work (promote_types reads two dtypes on the host)
           if e.name.startswith("aten::") and e.cpu_parent is None and e.name != "aten::promote_types"]
    assert ops == ["aten::add"] if torch.promote_types(res_dtype, out_dtype) == res_dtype else len(ops) == 2, ops
    with_bias = _add(residual, (out, bias))
    assert with_bias.dtype == res_dtype
    assert torch.equal(with_bias, residual + (out.to(res_dtype) + bias.to(res_dtype)))
