"""Data-parallel training takes the same optimizer step as one process on the whole batch.

One Ray Train run (TorchTrainer, gloo, 2 workers at half a CPU each on the 2-core machine) takes
one step of each case below with the project's network (`create_model("xs")` at 4×56², drop
path off), loss (`soft_target_cross_entropy`), optimizer (`optim.build_optimizer`) and
`_Loop.optimizer_step` (clipping, step, zero_grad); `_micro_step` mirrors the micro-batch body
of `_Loop.run` (loss / accum, DDP `no_sync` on all but the last micro-batch), which can't be
reached without a data pipeline. The references are computed in the test process, one process
on all 2b clips.

The stem's BatchNorm normalises with the statistics of each forward pass, i.e. per worker and
per micro-batch (the release's per-GPU BatchNorm; SyncBatchNorm has no CPU kernel). So
2 workers × b equal 1 worker × 2b only with those statistics fixed: the equivalence cases run
with BatchNorm in eval mode (running statistics, which are equal on every rank at the first
step). In train mode, the last case shows what DDP does compute: one process accumulating the
same per-worker shards as micro-batches.
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

from morphmlp.data import transforms
from morphmlp.models.factory import create_model
from morphmlp.train import optim
from morphmlp.train.config import OptimConfig, TrainJobConfig
from morphmlp.train.loop import _Loop, soft_target_cross_entropy

SEED = 0
WORLD = 2
CLIPS = 8  # the global batch 2b; each worker takes b = 4
LR = 1e-3
CLIP = 0.05  # well below the batch's gradient norm (~1), so clipping acts
# xs at 4 frames of 56²: its planes are 14², 7², 4², 2², so the chunk lengths shrink with them.
MODEL = {
    "num_classes": 6,
    "num_frames": 4,
    "img_size": 56,
    "chunk_lengths": (14, 7, 16, 4),
    "drop_path_rate": 0.0,  # drop path draws per rank: no equality to test with it on
}
# case: (micro-batches per step, clip_grad_norm, BatchNorm statistics fixed)
CASES = {
    "step": (1, None, True),
    "accum": (2, None, True),
    "clip": (1, CLIP, True),
    "batch_norm": (1, None, False),
}
# Gradient tolerance, relative to the largest gradient element. Measured: one process
# accumulating two halves vs one pass on the whole batch 3.7e-7 of it, DDP vs one process 3.9e-7,
# DDP with per-worker BatchNorm vs its per-shard reference 1.2e-6 (float32 summation order).
# Errors measured: a worker's own gradients (no all-reduce) are off by 73% of it, per-worker
# BatchNorm statistics by 2.9%. 1e-5 is eight times the largest noise, 1/3000 of that error.
GRAD_TOL = 1e-5
# Parameters after one AdamW step: its first move is lr·g/(|g| + eps) per weight, ≈ lr·sign(g),
# so float noise in a gradient near eps (1e-8; thousands of them lie at 1e-10..1e-7) changes
# that weight's move by a fraction of lr: measured up to 9e-3·lr. A step on other gradients
# moves weights by up to 2·lr (signs differ), so 0.1·lr still tells it. (The first AdamW step
# can't see a gradient's scale: the gradient checks do that.)
PARAM_TOL = 0.1 * LR


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """2b uint8 clips (B, T, H, W, 3) like the decoders' and soft targets like mixup's."""
    gen = torch.Generator().manual_seed(SEED + 1)
    size = (CLIPS, MODEL["num_frames"], MODEL["img_size"], MODEL["img_size"], 3)
    clips = torch.randint(0, 256, size, dtype=torch.uint8, generator=gen)
    targets = torch.softmax(3 * torch.randn(CLIPS, MODEL["num_classes"], generator=gen), dim=-1)
    return clips, targets


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    # as train_func: seeded weights, the optimizer built on the unwrapped model
    torch.manual_seed(SEED)
    model = create_model("xs", **MODEL)
    optimizer = optim.build_optimizer(model, lr=LR, weight_decay=0.05, betas=(0.9, 0.999))
    return model, optimizer


def _micro_step(net, x, targets, *, micro: int, accum: int, world: int) -> None:
    """The body of `_Loop.run` for one micro-batch (fp32: no autocast, no scaler)."""
    sync = micro == accum - 1 or world == 1
    ctx = contextlib.nullcontext() if sync else net.no_sync()
    with ctx:
        loss = soft_target_cross_entropy(net(x), targets)
    (loss / accum).backward()


def _take_step(net, optimizer, clips, targets, *, accum, clip, fixed_bn, world) -> dict:
    """One optimizer step on `clips` in `accum` micro-batches: the gradients the optimizer
    consumed (after clipping), their total norm, and the parameters after the step."""
    net.train()
    if fixed_bn:
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    x = transforms.normalize(clips, (0.45, 0.45, 0.45), (0.225, 0.225, 0.225))
    for micro, (xs, ts) in enumerate(zip(x.chunk(accum), targets.chunk(accum), strict=True)):
        _micro_step(net, xs, ts, micro=micro, accum=accum, world=world)

    seen: dict[str, torch.Tensor] = {}
    names = {id(p): n.removeprefix("module.") for n, p in net.named_parameters()}

    def capture(opt, args, kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                seen[names[id(p)]] = p.grad.detach().clone()

    hook = optimizer.register_step_pre_hook(capture)
    # The loop's own step, on a _Loop that holds only what optimizer_step reads.
    loop = _Loop.__new__(_Loop)
    loop.cfg = TrainJobConfig(optim=OptimConfig(clip_grad_norm=clip))
    loop.net, loop.optimizer, loop.scaler = net, optimizer, None
    loop.optimizer_step()
    hook.remove()
    assert all(p.grad is None for p in net.parameters()), "optimizer_step leaves no gradients"
    return {
        "grads": seen,
        # in float64: a float32 norm of the 1.3M gradients is off by ~1e-4 of itself
        "grad_norm": float(torch.cat([g.flatten() for g in seen.values()]).double().norm()),
        "params": {
            n.removeprefix("module."): p.detach().clone() for n, p in net.named_parameters()
        },
    }


def _reference(*, accum, clip, fixed_bn) -> dict:
    model, optimizer = _model_and_optimizer()
    clips, targets = _batch()
    return _take_step(
        model, optimizer, clips, targets, accum=accum, clip=clip, fixed_bn=fixed_bn, world=1
    )


def _worker(config: dict) -> None:
    """Each rank takes its contiguous half of the batch, as a sharded dataset would give it."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    clips, targets = _batch()
    per = CLIPS // world
    shard = slice(rank * per, (rank + 1) * per)
    results = {}
    for case, (accum, clip, fixed_bn) in CASES.items():
        model, optimizer = _model_and_optimizer()
        net = ray.train.torch.prepare_model(model)
        results[case] = _take_step(
            net,
            optimizer,
            clips[shard],
            targets[shard],
            accum=accum,
            clip=clip,
            fixed_bn=fixed_bn,
            world=world,
        )
    path = os.path.join(config["out"], f"rank{rank}.pt")
    torch.save(results, path + ".tmp")
    os.replace(path + ".tmp", path)


def _flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[name].flatten() for name in sorted(tensors)])


def _assert_close(got: dict, want: dict, atol: float, what: str) -> None:
    assert sorted(got) == sorted(want)
    worst = max(want, key=lambda n: float((got[n] - want[n]).abs().max()))
    torch.testing.assert_close(
        _flat(got), _flat(want), rtol=0, atol=atol, msg=lambda m: f"{what} ({worst} worst): {m}"
    )


def _grad_atol(ref: dict) -> float:
    return GRAD_TOL * float(_flat(ref["grads"]).abs().max())


@pytest.fixture(scope="module")
def ddp_results(ray_session, tmp_path_factory) -> list[dict]:
    """Every case's step on both ranks of one 2-worker TorchTrainer run."""
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # pytest imports this file from tests/, which Ray's workers can't import: ship it by value
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    out = tmp_path_factory.mktemp("ddp")
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"out": str(out)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=WORLD, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="ddp-equivalence", storage_path=str(out / "ray")),
    )
    try:
        trainer.fit()
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.slow
def test_ddp_matches_one_process_on_the_whole_batch(ddp_results):
    # 1. One step: 2 workers × b give the mean gradient of 1 worker × 2b, hence its AdamW step.
    full = _reference(accum=1, clip=None, fixed_bn=True)
    atol = _grad_atol(full)
    for rank, results in enumerate(ddp_results):
        _assert_close(results["step"]["grads"], full["grads"], atol, f"rank {rank} gradients")
        _assert_close(results["step"]["params"], full["params"], PARAM_TOL, f"rank {rank} step")
    # DDP keeps the replicas identical: the same all-reduced gradients, the same update.
    for case in CASES:
        _assert_close(ddp_results[1][case]["params"], ddp_results[0][case]["params"], 0.0, case)

    # 2. Accumulation: 2 micro-batches of b at loss / 2 equal one pass on 2b, in one process and
    # under DDP (no_sync on the first micro-batch, all-reduce on the second).
    accumulated = _reference(accum=2, clip=None, fixed_bn=True)
    _assert_close(accumulated["grads"], full["grads"], atol, "accumulated gradients")
    for rank, results in enumerate(ddp_results):
        _assert_close(results["accum"]["grads"], full["grads"], atol, f"rank {rank} accumulated")
        _assert_close(results["accum"]["params"], full["params"], PARAM_TOL, f"rank {rank} accum")

    # 3. Clipping acts on the all-reduced gradient: its norm is the clip value on every rank,
    # and the clipped gradient is one process's.
    assert full["grad_norm"] > 10 * CLIP, "the batch's gradient must be large enough to clip"
    clipped = _reference(accum=1, clip=CLIP, fixed_bn=True)
    assert clipped["grad_norm"] == pytest.approx(CLIP, rel=1e-5)
    for rank, results in enumerate(ddp_results):
        assert results["clip"]["grad_norm"] == pytest.approx(CLIP, rel=1e-5)
        _assert_close(
            results["clip"]["grads"], clipped["grads"], _grad_atol(clipped), f"rank {rank} clipped"
        )
        _assert_close(results["clip"]["params"], clipped["params"], PARAM_TOL, f"rank {rank}")


@pytest.mark.slow
def test_batch_norm_statistics_are_per_worker(ddp_results):
    # In train mode each worker's BatchNorm normalises its own b clips: the DDP step is one
    # process accumulating the workers' shards as micro-batches ...
    per_shard = _reference(accum=WORLD, clip=None, fixed_bn=False)
    for rank, results in enumerate(ddp_results):
        _assert_close(
            results["batch_norm"]["grads"],
            per_shard["grads"],
            _grad_atol(per_shard),
            f"rank {rank} gradients",
        )
    # ... not one pass on 2b (percent-level differences, far above the tolerance).
    full = _reference(accum=1, clip=None, fixed_bn=False)
    gap = float((_flat(per_shard["grads"]) - _flat(full["grads"])).abs().max())
    assert gap > 100 * _grad_atol(full)
