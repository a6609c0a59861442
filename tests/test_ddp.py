"""DistributedDataParallel: accel's modules train under DDP (gloo backend, 2 processes on the CPU) with the
gradients and parameters of single-process training on the concatenated batch.

Two SGD steps of three models: the DARTS search network (C=4, 2 cells of 2 nodes, 8x8 images), a Hopfield model
and an LSSL model. Each process takes half of the batch; DDP averages the gradients, which equals the gradient of
the mean loss over the whole batch. The DARTS network normalises with BatchNorm in training mode, over each
process's own half (DDP does not synchronise batch statistics; SyncBatchNorm needs a GPU), so its single-process
reference runs the two halves through the network and averages their losses: the same gradient DDP must produce.
Both processes' gradients are compared, so a rank that received a different average fails as well.
"""
from datetime import timedelta
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import accel.nn

WORLD = 2
STEPS = 2
HALF = 4  # samples per process


class HopfieldModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.hopfield = accel.nn.Hopfield(input_size=8, num_heads=2, update_steps_max=2, update_steps_eps=None)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.hopfield(x).mean(1))


class LSSLModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lssl = accel.nn.LSSL(d_model=4, d_state=8, channels=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.lssl(x).mean(1))


def _models():
    """(name, model, inputs (2 * HALF, ...), targets, per_half_forward) with fixed seeds: every process builds
    the same ones."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    # 2 nodes a cell: cheap; the alphas as Parameters, so that DDP replicates and reduces them
    darts = accel.nn.darts.Network(C=4, num_classes=10, layers=2, steps=2, multiplier=2, register_arch_parameters=True)
    hopfield, lssl = HopfieldModel(), LSSLModel()
    return [
        ("darts", darts, torch.randn(2 * HALF, 3, 8, 8, generator=gen),
         torch.randint(0, 10, (2 * HALF,), generator=gen), True),
        ("hopfield", hopfield, torch.randn(2 * HALF, 5, 8, generator=gen),
         torch.randn(2 * HALF, 3, generator=gen), False),
        ("lssl", lssl, torch.randn(2 * HALF, 33, 4, generator=gen), torch.randn(2 * HALF, 3, generator=gen), False),
    ]


def _loss(name, out, target):
    return F.cross_entropy(out, target) if name == "darts" else F.mse_loss(out, target)


def _grads(model):
    # alphas_normal gets no gradient with 2 cells (both are reduction cells): None and zero alike
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def _train(name, model, step_loss):
    """STEPS SGD steps; returns the gradients of each step and the final parameters."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    record = {"grads": []}
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        step_loss().backward()
        record["grads"].append(_grads(model.module if hasattr(model, "module") else model))
        optimizer.step()
    record["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    record["params"] = {n.removeprefix("module."): p for n, p in record["params"].items()}
    return record


def _worker(rank, store_path, out_dir):
    torch.set_num_threads(1)  # two processes on a shared 2-core machine
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        results = {}
        for name, model, x, target, _ in _models():
            # DARTS: alphas_normal is unused with 2 cells; Hopfield: with one input tensor the first step maps the
            # state patterns for all three inputs (as hflayers does), so two normalisations get no gradient
            ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=name in ("darts", "hopfield"))
            mine = slice(rank * HALF, (rank + 1) * HALF)
            results[name] = _train(name, ddp, lambda: _loss(name, ddp(x[mine]), target[mine]))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _reference():
    results = {}
    for name, model, x, target, per_half in _models():
        if per_half:
            def step_loss():
                return sum(_loss(name, model(x[r * HALF:(r + 1) * HALF]), target[r * HALF:(r + 1) * HALF])
                           for r in range(WORLD)) / WORLD
        else:
            def step_loss():
                return _loss(name, model(x), target)
        results[name] = _train(name, model, step_loss)
    return results


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference_results():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting (the comparison is at tight tolerance, not bitwise)
    try:
        return _reference()
    finally:
        torch.set_num_threads(before)


def _unused(name, step, param):
    """alphas_normal with 2 cells. The Hopfield model's normalisations while they are equal (see _worker): in
    step 0 all three are, so only the state patterns' gets a gradient; in step 1 the stored patterns' and the
    projections' still are, so the projections' gets none."""
    if name == "darts":
        return param == "alphas_normal"
    norm = param.split(".")[1] if name == "hopfield" else None
    return norm == "norm_pattern_projection" or (norm == "norm_stored_pattern" and step == 0)


@pytest.mark.parametrize("name", ["darts", "hopfield", "lssl"])
def test_ddp_matches_single_process_training(ddp_results, reference_results, name):
    want = reference_results[name]
    for rank, results in enumerate(ddp_results):
        got = results[name]
        for step in range(STEPS):
            assert got["grads"][step].keys() == want["grads"][step].keys()
            for param, g in want["grads"][step].items():
                assert g.abs().max() > 0 or _unused(name, step, param), f"{name}: {param} has no gradient"
                torch.testing.assert_close(got["grads"][step][param], g, rtol=1e-5, atol=1e-7,
                                           msg=lambda m: f"{name}, rank {rank}, step {step}, grad {param}: {m}")
        for param, p in want["params"].items():
            torch.testing.assert_close(got["params"][param], p, rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"{name}, rank {rank}, parameter {param}: {m}")
