"""accel.ops.rk_begin and rk_accept (the solver's per-sample step control): the C++ kernels against the PyTorch
kernels of accel/ops/rk_control.py (which run on CUDA) on random solver states, finished samples, rejected and
NaN norms, the I and PI controllers, fixed steps, FSAL and output rows; and opcheck."""
import importlib

import pytest
import torch

from accel.ops import rk_accept, rk_begin
from accel.reference import ode
from accel.reference.ode import DOPRI5

control = importlib.import_module("accel.ops.rk_control")
C = [0.0, 0.2, 0.3, 0.8, 8 / 9, 1.0, 1.0]


def state(B=33, D=5, s=7, T=4, dtype=torch.float64):
    times = torch.tensor([0.0, 0.5, 1.25, 2.0], dtype=dtype)[:T]
    next_index = torch.randint(1, T + 1, (B,))  # T: the sample has finished
    t = times[(next_index - 1).clamp(max=T - 1)] + torch.rand(B, dtype=dtype) * 0.3
    t = torch.minimum(t, times[next_index.clamp(max=T - 1)])  # at or before the next output time
    t[next_index >= T] = times[-1]
    h = torch.rand(B, dtype=dtype) * 0.6 + 1e-3
    return dict(y=torch.randn(B, D, dtype=dtype), k=torch.randn(s, B, D, dtype=dtype), t=t, h=h,
                next_index=next_index, previous=torch.where(torch.rand(B) < 0.5, torch.rand(B, dtype=dtype), 0.0),
                out=torch.randn(T, B, D, dtype=dtype)), times


def test_begin_matches_the_pytorch_kernel_and_clips_to_output_times():
    st, times = state()
    step, stage_times = rk_begin(st["t"], st["h"], st["next_index"], times, C)
    want_step, want_times = control._reference_begin(st["t"], st["h"], st["next_index"], times, C, True)
    torch.testing.assert_close(step, want_step, rtol=0, atol=0)
    torch.testing.assert_close(stage_times, want_times)
    T = times.shape[0]
    finished = st["next_index"] >= T
    assert (step[finished] == 0).all()
    nxt = times[st["next_index"].clamp(max=T - 1)]
    assert (st["t"][~finished] + step[~finished] <= nxt[~finished] + 1e-15).all()


@pytest.mark.parametrize("pi, fsal, fixed", [(False, True, False), (True, True, False), (False, False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_accept_matches_the_pytorch_kernel(pi, fsal, fixed, dtype):
    st, times = state(dtype=dtype)
    B = st["y"].shape[0]
    step, _ = control._reference_begin(st["t"], st["h"], st["next_index"], times, C, True)
    y1 = torch.randn_like(st["y"])
    norm = None if fixed else torch.rand(B, dtype=dtype) * 2
    if norm is not None:
        norm[:3] = torch.tensor([float("nan"), 0.0, 1.0])  # a NaN rejects; 0 and exactly 1 accept
    ours = {name: x.clone() for name, x in st.items()}
    theirs = {name: x.clone() for name, x in st.items()}
    args = (y1, norm, step, times, 0.9, 5, pi, fsal)
    status, unfinished = rk_accept(*ours.values(), *args)
    want_status, want_unfinished = control._reference_accept(*theirs.values(), *args, None)
    assert torch.equal(status, want_status) and int(unfinished) == int(want_unfinished)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], msg=name)
    finished = st["next_index"] >= times.shape[0]
    assert (status[finished] == -1).all() and torch.equal(ours["y"][finished], st["y"][finished])
    if not fixed:
        if not finished[0]:  # the NaN norm: rejected, the step shrunk by the most allowed
            assert status[0] == 0 and torch.isclose(ours["h"][0], 0.2 * step[0])
        accepted = status == 1
        assert torch.equal(accepted, ~finished & (norm <= 1))
        assert torch.equal(ours["y"][accepted], y1[accepted])


def test_opcheck():
    st, times = state(B=4, D=3)
    step, _ = rk_begin(st["t"], st["h"], st["next_index"], times, C)
    torch.library.opcheck(torch.ops.accel.rk_begin.default, (st["t"], st["h"], st["next_index"], times, C, True))
    for interpolant in (None, [float(x) for row in DOPRI5.interpolant for x in row]):
        torch.library.opcheck(torch.ops.accel.rk_accept.default,
                              (*st.values(), torch.randn_like(st["y"]), torch.rand(4, dtype=torch.float64), step,
                               times, 0.9, 5, True, True, interpolant))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_output_matches_the_pytorch_kernel_and_the_reference_interpolant(dtype):
    st, times = state(dtype=dtype, T=4)
    times = torch.tensor([0.0, 0.1, 0.15, 2.0], dtype=dtype)  # several output times inside one step
    st["t"] = torch.zeros_like(st["t"])
    st["next_index"] = torch.ones_like(st["next_index"])
    st["h"] = torch.rand_like(st["h"]) * 0.3
    step, _ = rk_begin(st["t"], st["h"], st["next_index"], times, C, clip=False)
    assert torch.equal(step, st["h"])  # not shortened
    y1 = torch.randn_like(st["y"])
    norm = torch.rand(st["y"].shape[0], dtype=dtype) * 1.5
    ours = {name: x.clone() for name, x in st.items()}
    theirs = {name: x.clone() for name, x in st.items()}
    args = (y1, norm, step, times, 0.9, 5, False, True)
    status, _ = rk_accept(*ours.values(), *args, DOPRI5.interpolant)
    control._reference_accept(*theirs.values(), *args, [float(x) for row in DOPRI5.interpolant for x in row])
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], msg=name)
    for b in range(st["y"].shape[0]):  # each accepted sample's rows passed: the reference interpolant
        passed = [r for r in range(1, 4) if status[b] == 1 and times[r] <= step[b]]
        assert ours["next_index"][b] == (1 + len(passed) if status[b] == 1 else 1)
        for r in passed:
            want = ode.interpolate(st["y"][b:b + 1], st["k"][:, b:b + 1], step[b:b + 1],
                                   (times[r] / step[b]).reshape(1), DOPRI5)
            torch.testing.assert_close(ours["out"][r, b], want[0])


@pytest.mark.parametrize("dense", [False, True])
def test_per_sample_output_times_match_the_pytorch_kernel_and_each_sample_alone(dense):
    """times (T, B): every sample steps towards its own next output time; the same as the shared-times kernels
    run on that sample alone with its own column of times."""
    st, _ = state(B=6, T=4)
    times = torch.sort(torch.rand(4, 6, dtype=torch.float64) * 2, dim=0).values.contiguous()
    st["next_index"] = torch.tensor([1, 2, 3, 4, 1, 2])
    st["t"] = torch.minimum(times[(st["next_index"] - 1).clamp(max=3), torch.arange(6)],
                            times[st["next_index"].clamp(max=3), torch.arange(6)])
    interpolant = DOPRI5.interpolant if dense else None
    step, stage_times = rk_begin(st["t"], st["h"], st["next_index"], times, C, clip=not dense)
    want_step, want_times = control._reference_begin(st["t"], st["h"], st["next_index"], times, C, not dense)
    torch.testing.assert_close(step, want_step, rtol=0, atol=0)
    torch.testing.assert_close(stage_times, want_times)
    y1, norm = torch.randn_like(st["y"]), torch.rand(6, dtype=torch.float64) * 1.5
    ours = {name: x.clone() for name, x in st.items()}
    theirs = {name: x.clone() for name, x in st.items()}
    args = (y1, norm, step, times, 0.9, 5, False, True)
    status, _ = rk_accept(*ours.values(), *args, interpolant)
    flat = None if interpolant is None else [float(x) for row in interpolant for x in row]
    control._reference_accept(*theirs.values(), *args, flat)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], msg=name)
    for b in range(6):
        alone = {name: (x[:, b:b + 1] if name in ("k", "out") else x[b:b + 1]).clone() for name, x in st.items()}
        one_step, _ = rk_begin(alone["t"], alone["h"], alone["next_index"], times[:, b].contiguous(), C,
                               clip=not dense)
        assert one_step.item() == step[b].item()
        rk_accept(*alone.values(), y1[b:b + 1], norm[b:b + 1], one_step, times[:, b].contiguous(), 0.9, 5, False,
                  True, interpolant)
        for name, x in alone.items():
            got = ours[name][:, b:b + 1] if name in ("k", "out") else ours[name][b:b + 1]
            torch.testing.assert_close(got, x, rtol=0, atol=0, msg=name)
