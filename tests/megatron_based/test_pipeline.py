"""Pipeline parallelism: PP=2 (Megatron's 1F1B schedule over gloo, 2 micro-batches) equals PP=1 — loss and every
parameter gradient, each stage holding the right slice of the layer pattern."""
import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..distributed import run_distributed
from .helpers import initialize_parallel, tiny_model
from .test_data import corpus  # noqa: F401 - the session fixture
from .test_train import tiny_config

PATTERN, MICRO, SEQ = "CLSC", 2, 12


def _batches():
    g = torch.Generator().manual_seed(3)
    return [(torch.randint(0, 64, (1, SEQ), generator=g), torch.randint(0, 64, (1, SEQ), generator=g))
            for _ in range(MICRO)]


def _global_name(name, offset):
    if name.startswith("decoder.layers."):
        i, rest = name[len("decoder.layers."):].split(".", 1)
        return f"decoder.layers.{int(i) + offset}.{rest}"
    return name


def _run(pp, weights=None):
    initialize_parallel(1, pp, 1)
    model = tiny_model(PATTERN, pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32)
    offset = parallel_state.get_pipeline_model_parallel_rank() * (len(PATTERN) // pp)
    if weights is not None:  # a stage builds only its layers, so its init draws differ: take the PP=1 weights
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(weights["embedding.word_embeddings.weight" if name == "output_layer.weight"
                                else _global_name(name, offset)])
    # PP=1 runs as DP=2 on identical data, so the DP average leaves its gradients unchanged.
    model = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    data = iter(_batches())
    pos = torch.arange(SEQ).unsqueeze(0)

    def forward_step(data_iterator, model):
        ids, labels = next(data_iterator)
        loss = model(ids, pos, None, labels=labels)

        def loss_func(out):
            total = out.float().sum()
            return total, torch.tensor(out.numel()), {"loss": total.detach()}

        return loss, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=[model], num_microbatches=MICRO, seq_length=SEQ,
        micro_batch_size=1, forward_only=False)
    finalize_model_grads([model])  # ties the embedding gradient of the first and last stage
    grads = {_global_name(name, offset): p.main_grad.clone() for name, p in model.module.named_parameters()}
    loss = sum(x["loss"] for x in losses) if losses else None
    kinds = [type(layer.self_attention).__name__ for layer in model.module.decoder.layers]
    weights = {name: p.detach().clone() for name, p in model.module.named_parameters()}
    return loss, grads, kinds, weights


def _worker(rank, world):
    ref_loss, ref_grads, _, weights = _run(1)
    loss, grads, kinds, _ = _run(2, weights)
    errs = {name: ((g - ref_grads[name]).norm() / ref_grads[name].norm()).item() for name, g in grads.items()
            if name != "output_layer.weight"}
    return (None if loss is None else abs(loss - ref_loss).item() / ref_loss.item()), errs, kinds


def test_pipeline_parallel_equals_single_stage():
    (loss0, errs0, kinds0), (loss1, errs1, kinds1) = run_distributed(_worker, 2)
    assert kinds0 == ["BaseConv", "TaylorLinearAttention"] and kinds1 == ["SlidingWindowAttention", "BaseConv"]
    assert loss0 is None and loss1 < 1e-6  # the loss lives on the last stage
    assert "embedding.word_embeddings.weight" in errs0 and "decoder.final_layernorm.weight" in errs1
    assert len(errs0) + len(errs1) > 20
    for name, err in {**errs0, **errs1}.items():
        assert err < 1e-5, (name, err)


def _train_pp(rank, world, cfg):
    from megatron_based.training.loop import train

    losses = {}
    train(cfg, step_hook=lambda step, loss, model: losses.__setitem__(step, loss))
    return losses


def test_training_with_pipeline_parallel(tmp_path, corpus):  # noqa: F811
    """megatron-based-train with PP=2 (1F1B over gloo): runs, and the loss (on the last stage) falls."""
    cfg = tiny_config(tmp_path, corpus, ["parallel.pipeline_model_parallel_size=2", "train.train_steps=12"],
                      world_size=2)
    first, last = run_distributed(_train_pp, 2, cfg)
    assert first == last  # the loss is computed on the last stage and reported on every rank
    losses = last
    steps = sorted(losses)
    assert len(steps) == 12 and all(torch.isfinite(torch.tensor(losses[s])) for s in steps)
    assert sum(losses[s] for s in steps[-3:]) / 3 < losses[steps[0]] - 0.3
