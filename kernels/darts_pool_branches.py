"""Triton kernels for accel::darts_pool_branches and accel::darts_pool_branches_backward on CUDA tensors.

``out = w0 * BN(max_pool_3x3(x)) + w1 * BN(avg_pool_3x3(x))`` at stride 1, padding 1 (average with
count_include_pad=False), BatchNorm without affine parameters, with the semantics of the C++ CPU kernel
(csrc/cpu/darts_pool_branches.cpp): only x and the statistics are kept, and every kernel recomputes the
pools of its pixels from x (9 loads per pixel, from L1/L2). x is walked as (N * C) planes of H x W; a
program takes BLOCK pixels of one plane, so its channel is a scalar.

* forward, training: ``_pooled_moments_kernel`` writes each block's sums of both pooled values and their
  squares, in float64 (the variance E[x^2] - mean^2 cancels where a channel's mean is large next to its spread);
  torch adds the partials in a fixed order (no atomics) and finishes the statistics in float64;
* ``_mix_kernel`` writes out = a * (max - mean_max) + b * (avg - mean_avg) per channel, centred first for the
  same reason;
* backward: ``_gradient_moments_kernel`` writes each block's sums of g, g * xhat_max and g * xhat_avg;
  ``_branch_gradient_kernel`` writes the BN gradients of both branches at every window (the avg one already
  divided by its window size) and which tap of each window is its maximum; ``_input_gradient_kernel``
  gathers dx from the 3x3 windows around each pixel, so no two programs write one element.
"""
import torch
import triton
import triton.language as tl

BLOCK = 512
NUM_WARPS = 4


@triton.jit
def _pools(x_ptr, plane_ptr, row, col, H, W, in_bounds):
    """3x3 max and average (count_include_pad=False) at (row, col), and the max's tap (0..8, row-major).

    As PyTorch's max pooling: the first maximum in scan order wins, and a NaN beats any number."""
    best = tl.full(row.shape, float("-inf"), tl.float32)
    tap = tl.zeros(row.shape, tl.int32)
    total = tl.zeros(row.shape, tl.float32)
    for t in tl.static_range(9):
        r = row + (t // 3 - 1)
        c = col + (t % 3 - 1)
        valid = in_bounds & (r >= 0) & (r < H) & (c >= 0) & (c < W)
        v = tl.load(x_ptr + plane_ptr + r * W + c, mask=valid, other=float("-inf")).to(tl.float32)
        take = valid & ((v > best) | (v != v))
        best = tl.where(take, v, best)
        tap = tl.where(take, t, tap)
        total += tl.where(valid, v, 0.0)
    rows = 1.0 + (row > 0).to(tl.float32) + (row + 1 < H).to(tl.float32)
    cols = 1.0 + (col > 0).to(tl.float32) + (col + 1 < W).to(tl.float32)
    # Lanes past the plane get 0, not -inf, so that no arithmetic on them makes NaNs (their stores are masked).
    return tl.where(in_bounds, best, 0.0), total / (rows * cols), tap, rows * cols


@triton.jit
def _pooled_moments_kernel(x_ptr, partial_ptr, H, W, num_blocks, BLOCK: tl.constexpr):
    p, b = tl.program_id(0).to(tl.int64), tl.program_id(1)
    idx = b * BLOCK + tl.arange(0, BLOCK)
    in_bounds = idx < H * W
    mx, av, _, _ = _pools(x_ptr, p * H * W, idx // W, idx % W, H, W, in_bounds)
    mx, av = mx.to(tl.float64), av.to(tl.float64)
    out = partial_ptr + (p * num_blocks + b) * 4
    tl.store(out, tl.sum(mx, axis=0))
    tl.store(out + 1, tl.sum(mx * mx, axis=0))
    tl.store(out + 2, tl.sum(av, axis=0))
    tl.store(out + 3, tl.sum(av * av, axis=0))


@triton.jit
def _mix_kernel(x_ptr, coef_ptr, out_ptr, C, H, W, BLOCK: tl.constexpr):
    """out = coef[0, c] * (max - coef[2, c]) + coef[1, c] * (avg - coef[3, c])."""
    p, b = tl.program_id(0).to(tl.int64), tl.program_id(1)
    c = p % C
    idx = b * BLOCK + tl.arange(0, BLOCK)
    in_bounds = idx < H * W
    mx, av, _, _ = _pools(x_ptr, p * H * W, idx // W, idx % W, H, W, in_bounds)
    out = (tl.load(coef_ptr + c) * (mx - tl.load(coef_ptr + 2 * C + c))
           + tl.load(coef_ptr + C + c) * (av - tl.load(coef_ptr + 3 * C + c)))
    tl.store(out_ptr + p * H * W + idx, out, mask=in_bounds)


@triton.jit
def _gradient_moments_kernel(x_ptr, g_ptr, stats_ptr, partial_ptr, C, H, W, num_blocks, BLOCK: tl.constexpr):
    """Per block: sum g, sum g * xhat_max, sum g * xhat_avg; stats is (4, C): mean, 1/std of max then avg."""
    p, b = tl.program_id(0).to(tl.int64), tl.program_id(1)
    c = p % C
    idx = b * BLOCK + tl.arange(0, BLOCK)
    in_bounds = idx < H * W
    mx, av, _, _ = _pools(x_ptr, p * H * W, idx // W, idx % W, H, W, in_bounds)
    g = tl.load(g_ptr + p * H * W + idx, mask=in_bounds, other=0.0).to(tl.float32)
    x_max = (mx - tl.load(stats_ptr + c)) * tl.load(stats_ptr + C + c)
    x_avg = (av - tl.load(stats_ptr + 2 * C + c)) * tl.load(stats_ptr + 3 * C + c)
    out = partial_ptr + (p * num_blocks + b) * 3
    tl.store(out, tl.sum(g, axis=0).to(tl.float64))
    tl.store(out + 1, tl.sum(tl.where(in_bounds, g * x_max, 0.0), axis=0).to(tl.float64))
    tl.store(out + 2, tl.sum(tl.where(in_bounds, g * x_avg, 0.0), axis=0).to(tl.float64))


@triton.jit
def _branch_gradient_kernel(x_ptr, g_ptr, stats_ptr, coef_ptr, d_max_ptr, d_avg_ptr, tap_ptr, C, H, W,
                            BLOCK: tl.constexpr):
    """At every window: d_max = coef_max (g - mean_g - xhat_max mean_gx_max), d_avg likewise divided by the
    window size, and the max's tap. coef is (5, C): coef_max, coef_avg, mean_g, mean_gx_max, mean_gx_avg."""
    p, b = tl.program_id(0).to(tl.int64), tl.program_id(1)
    c = p % C
    idx = b * BLOCK + tl.arange(0, BLOCK)
    in_bounds = idx < H * W
    mx, av, tap, count = _pools(x_ptr, p * H * W, idx // W, idx % W, H, W, in_bounds)
    g = tl.load(g_ptr + p * H * W + idx, mask=in_bounds, other=0.0).to(tl.float32) - tl.load(coef_ptr + 2 * C + c)
    x_max = (mx - tl.load(stats_ptr + c)) * tl.load(stats_ptr + C + c)
    x_avg = (av - tl.load(stats_ptr + 2 * C + c)) * tl.load(stats_ptr + 3 * C + c)
    d_max = tl.load(coef_ptr + c) * (g - x_max * tl.load(coef_ptr + 3 * C + c))
    d_avg = tl.load(coef_ptr + C + c) * (g - x_avg * tl.load(coef_ptr + 4 * C + c)) / count
    tl.store(d_max_ptr + p * H * W + idx, d_max, mask=in_bounds)
    tl.store(d_avg_ptr + p * H * W + idx, d_avg, mask=in_bounds)
    tl.store(tap_ptr + p * H * W + idx, tap.to(tl.int8), mask=in_bounds)


@triton.jit
def _input_gradient_kernel(d_max_ptr, d_avg_ptr, tap_ptr, dx_ptr, H, W, BLOCK: tl.constexpr):
    """dx at each pixel: the avg gradients of the 9 windows that contain it, plus the max gradients of
    those windows whose maximum it is (the window at offset t from the pixel has it at tap 8 - t)."""
    p, b = tl.program_id(0).to(tl.int64), tl.program_id(1)
    idx = b * BLOCK + tl.arange(0, BLOCK)
    in_bounds = idx < H * W
    row, col = idx // W, idx % W
    acc = tl.zeros([BLOCK], tl.float32)
    for t in tl.static_range(9):
        r = row + (t // 3 - 1)
        c = col + (t % 3 - 1)
        valid = in_bounds & (r >= 0) & (r < H) & (c >= 0) & (c < W)
        at = p * H * W + r * W + c
        acc += tl.load(d_avg_ptr + at, mask=valid, other=0.0)
        mine = valid & (tl.load(tap_ptr + at, mask=valid, other=-1).to(tl.int32) == 8 - t)
        acc += tl.load(d_max_ptr + at, mask=mine, other=0.0)
    tl.store(dx_ptr + p * H * W + idx, acc, mask=in_bounds)


def forward(x, weights, running, training: bool, momentum: float, eps: float):
    """(out, stats (4, C): mean and 1/sqrt(var + eps) of the max then the avg branch, updated running (4, C))."""
    x = x.contiguous()
    N, C, H, W = x.shape
    blocks = triton.cdiv(H * W, BLOCK)
    running64 = running.double()
    if training:
        count = N * H * W
        if count <= 1:
            raise ValueError("darts_pool_branches: training needs more than one value per channel")
        partial = torch.empty((N * C, blocks, 4), dtype=torch.float64, device=x.device)
        _pooled_moments_kernel[(N * C, blocks)](x, partial, H, W, blocks, BLOCK=BLOCK, num_warps=NUM_WARPS)
        sums = partial.view(N, C, blocks, 4).sum((0, 2)).T / count  # (4, C): E[max], E[max^2], E[avg], E[avg^2]
        mean = sums[0::2]
        var = (sums[1::2] - mean * mean).clamp(min=0)
        # As torch's BatchNorm2d: the running variance takes the unbiased estimate.
        new_running = torch.stack([(1 - momentum) * running64[0] + momentum * mean[0],
                                   (1 - momentum) * running64[1] + momentum * var[0] * count / (count - 1),
                                   (1 - momentum) * running64[2] + momentum * mean[1],
                                   (1 - momentum) * running64[3] + momentum * var[1] * count / (count - 1)])
    else:
        mean, var, new_running = running64[0::2], running64[1::2], running64
    r = torch.rsqrt(var + eps)
    stats = torch.stack([mean[0], r[0], mean[1], r[1]])
    a, b = weights.double()[0] * r[0], weights.double()[1] * r[1]
    coef = torch.stack([a, b, mean[0], mean[1]]).float().contiguous()
    out = torch.empty_like(x)
    if out.numel():
        _mix_kernel[(N * C, blocks)](x, coef, out, C, H, W, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out, stats.float(), new_running.to(running.dtype).contiguous()


def backward(grad, x, weights, stats, training: bool, eps: float):
    """(dx, grad_weights)."""
    x = x.contiguous()
    g = grad.contiguous()
    N, C, H, W = x.shape
    blocks = triton.cdiv(H * W, BLOCK)
    stats = stats.float().contiguous()
    partial = torch.zeros((N * C, blocks, 3), dtype=torch.float64, device=x.device)
    if x.numel():
        _gradient_moments_kernel[(N * C, blocks)](x, g, stats, partial, C, H, W, blocks, BLOCK=BLOCK,
                                                  num_warps=NUM_WARPS)
    sums = partial.view(N, C, blocks, 3).sum((0, 2)).T  # (3, C): sum g, sum g xhat_max, sum g xhat_avg
    grad_weights = sums[1:].sum(1).to(weights.dtype)
    count = N * H * W
    means = sums / count if training else torch.zeros_like(sums)
    w = weights.double()
    coef = torch.stack([w[0] * stats[1].double(), w[1] * stats[3].double(), means[0], means[1], means[2]])
    coef = coef.float().contiguous()
    d_max, d_avg = torch.empty_like(x), torch.empty_like(x)
    tap = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    dx = torch.empty_like(x)
    if x.numel():
        _branch_gradient_kernel[(N * C, blocks)](x, g, stats, coef, d_max, d_avg, tap, C, H, W, BLOCK=BLOCK,
                                                 num_warps=NUM_WARPS)
        _input_gradient_kernel[(N * C, blocks)](d_max, d_avg, tap, dx, H, W, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dx, grad_weights
