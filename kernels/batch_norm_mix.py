"""Triton kernels for accel::batch_norm_mix and accel::batch_norm_mix_backward on CUDA tensors.

``out = sum_k w_k BN_k(z_k)``, BatchNorm without affine parameters, with the semantics of the C++ CPU kernel
(csrc/cpu/batch_norm_mix.cpp). Every operand is walked in NCHW-contiguous order as (N * C) planes of
``plane`` elements; a program takes one BLOCK of one plane, so its channel is a scalar:

* forward, training: ``_moments_kernel`` writes each block's sums of (z - shift) and (z - shift)^2 (shift:
  the channel's first value, against cancellation); torch adds the partials in a fixed order (no atomics:
  bitwise reproducible), and the statistics and running statistics are finished in float64 on the device;
* ``_mix_kernel`` writes out = sum_k a_k (z_k - mean_k), a_k = w_k r_k;
* backward: ``_gradient_moments_kernel`` writes each block's sums of g and g (z_k - mean_k), and
  ``_gradient_kernel`` writes dz_k = w_k r_k (g - mean(g) - xhat_k mean(g xhat_k)) (w_k r_k g in eval).

The K tensors reach a kernel as a base pointer and offsets (kernels/tensor_lists.py); K is a compile-time
constant and no loop has a run-time bound (see kernels/mixed_op.py on Triton 3.6's interpreter).
"""
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from accel.kernels.tensor_lists import addresses

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _moments_kernel(z_base_ptr, z_offsets_ptr, partial_ptr, C, plane, num_blocks, VEC: tl.constexpr,
                    ACC: tl.constexpr, BLOCK: tl.constexpr):
    """partial[k, p, b] = (sum (z - shift), sum (z - shift)^2) over block b of plane p of z_k."""
    k, p, b = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    z_ptr = z_base_ptr + tl.load(z_offsets_ptr + k) * VEC
    shift = tl.load(z_ptr + (p % C) * plane).to(ACC)  # the channel's first value (sample 0)
    idx = b * BLOCK + tl.arange(0, BLOCK)
    in_bounds = idx < plane
    v = tl.where(in_bounds, tl.load(z_ptr + p * plane + idx, mask=in_bounds, other=0.0).to(ACC) - shift, 0.0)
    out = partial_ptr + ((k * tl.num_programs(1) + p) * num_blocks + b) * 2
    tl.store(out, tl.sum(v, axis=0).to(tl.float64))
    tl.store(out + 1, tl.sum(v * v, axis=0).to(tl.float64))


@triton.jit
def _mix_kernel(z_base_ptr, z_offsets_ptr, coef_ptr, mean_ptr, out_ptr, C, plane, K: tl.constexpr,
                VEC: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """out = sum_k coef[k, c] (z_k - mean[k, c]) over one block of one plane."""
    p, b = tl.program_id(0).to(tl.int64), tl.program_id(1)
    c = p % C
    idx = b * BLOCK + tl.arange(0, BLOCK)
    in_bounds = idx < plane
    acc = tl.zeros([BLOCK], dtype=ACC)
    for k in range(K):
        z_ptr = z_base_ptr + tl.load(z_offsets_ptr + k) * VEC
        z = tl.load(z_ptr + p * plane + idx, mask=in_bounds, other=0.0).to(ACC)
        acc += tl.load(coef_ptr + k * C + c) * (z - tl.load(mean_ptr + k * C + c))
    tl.store(out_ptr + p * plane + idx, acc.to(out_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def _gradient_moments_kernel(g_ptr, z_base_ptr, z_offsets_ptr, mean_ptr, partial_ptr, C, plane, num_blocks,
                             K: tl.constexpr, VEC: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """partial[p, b] = (sum g, sum g (z_0 - mean_0), ..., sum g (z_{K-1} - mean_{K-1})) over one block."""
    p, b = tl.program_id(0).to(tl.int64), tl.program_id(1)
    c = p % C
    idx = b * BLOCK + tl.arange(0, BLOCK)
    in_bounds = idx < plane
    g = tl.load(g_ptr + p * plane + idx, mask=in_bounds, other=0.0).to(ACC)
    out = partial_ptr + (p * num_blocks + b) * (K + 1)
    tl.store(out, tl.sum(g, axis=0).to(tl.float64))
    for k in range(K):
        z_ptr = z_base_ptr + tl.load(z_offsets_ptr + k) * VEC
        z = tl.load(z_ptr + p * plane + idx, mask=in_bounds, other=0.0).to(ACC)
        centred = tl.where(in_bounds, z - tl.load(mean_ptr + k * C + c), 0.0)
        tl.store(out + 1 + k, tl.sum(g * centred, axis=0).to(tl.float64))


@triton.jit
def _gradient_kernel(g_ptr, z_base_ptr, z_offsets_ptr, dz_base_ptr, dz_offsets_ptr, coef_ptr, mean_ptr, slope_ptr,
                     mean_g_ptr, C, plane, K: tl.constexpr, VEC: tl.constexpr, DZ_VEC: tl.constexpr,
                     ACC: tl.constexpr, BLOCK: tl.constexpr):
    """dz_k = coef[k, c] (g - mean_g[c] - (z_k - mean[k, c]) slope[k, c]) over one block of one plane."""
    p, b = tl.program_id(0).to(tl.int64), tl.program_id(1)
    c = p % C
    idx = b * BLOCK + tl.arange(0, BLOCK)
    in_bounds = idx < plane
    g = tl.load(g_ptr + p * plane + idx, mask=in_bounds, other=0.0).to(ACC) - tl.load(mean_g_ptr + c)
    for k in range(K):
        z_ptr = z_base_ptr + tl.load(z_offsets_ptr + k) * VEC
        z = tl.load(z_ptr + p * plane + idx, mask=in_bounds, other=0.0).to(ACC)
        dz = tl.load(coef_ptr + k * C + c) * (g - (z - tl.load(mean_ptr + k * C + c)) * tl.load(slope_ptr + k * C + c))
        dz_ptr = dz_base_ptr + tl.load(dz_offsets_ptr + k) * DZ_VEC
        tl.store(dz_ptr + p * plane + idx, dz.to(dz_base_ptr.dtype.element_ty), mask=in_bounds)


_INTERPRETED = isinstance(_mix_kernel, InterpretedFunction)


def forward(zs, weights, running, training: bool, momentum: float, eps: float):
    """(out, stats (K, 2, C): mean and 1/sqrt(var + eps) used, updated running statistics (K, 2, C))."""
    zs = [z.contiguous() for z in zs]
    K, (N, C), plane = len(zs), zs[0].shape[:2], _plane(zs[0])
    blocks = triton.cdiv(plane, BLOCK)
    base, offsets, vec = addresses(zs, _INTERPRETED)
    running64 = running.double()
    if training and N * plane <= 1:
        raise ValueError("batch_norm_mix: training needs more than one value per channel")
    if training:
        count = N * plane
        partial = torch.empty((K, N * C, blocks, 2), dtype=torch.float64, device=zs[0].device)
        _moments_kernel[(K, N * C, blocks)](base, offsets, partial, C, plane, blocks, VEC=vec, ACC=_acc(zs[0]),
                                            BLOCK=BLOCK, num_warps=NUM_WARPS)
        sums = partial.view(K, N, C, blocks, 2).sum((1, 3))
        shift = torch.stack([z.reshape(N, C, -1)[0, :, 0] for z in zs]).double()
        centred = sums[..., 0] / count
        mean = shift + centred
        var = (sums[..., 1] / count - centred * centred).clamp(min=0)
        # As torch's BatchNorm2d: the running variance takes the unbiased estimate.
        new_running = torch.stack([(1 - momentum) * running64[:, 0] + momentum * mean,
                                   (1 - momentum) * running64[:, 1] + momentum * var * count / (count - 1)], 1)
    else:
        mean, var, new_running = running64[:, 0], running64[:, 1], running64
    stats = torch.stack([mean, torch.rsqrt(var + eps)], 1)
    acc = _acc_dtype(zs[0])
    coef = (weights.double()[:, None] * stats[:, 1]).to(acc)
    out = torch.empty_like(zs[0])
    if out.numel():
        _mix_kernel[(N * C, blocks)](base, offsets, coef, stats[:, 0].to(acc).contiguous(), out, C, plane, K=K,
                                     VEC=vec, ACC=_acc(zs[0]), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out, stats.to(zs[0].dtype), new_running.to(running.dtype).contiguous()


def backward(grad, zs, weights, stats, training: bool, eps: float):
    """(grad_zs, grad_weights): K separate tensors (no output aliases another), and the weights' gradient."""
    zs = [z.contiguous() for z in zs]
    g = grad.contiguous()
    K, (N, C), plane = len(zs), zs[0].shape[:2], _plane(zs[0])
    blocks = triton.cdiv(plane, BLOCK)
    base, offsets, vec = addresses(zs, _INTERPRETED)
    stats64 = stats.double()
    acc = _acc_dtype(zs[0])
    mean = stats64[:, 0].to(acc).contiguous()
    partial = torch.zeros((N * C, blocks, K + 1), dtype=torch.float64, device=g.device)
    grad_zs = [torch.empty_like(z) for z in zs]
    if g.numel():
        _gradient_moments_kernel[(N * C, blocks)](g, base, offsets, mean, partial, C, plane, blocks, K=K, VEC=vec,
                                                  ACC=_acc(zs[0]), BLOCK=BLOCK, num_warps=NUM_WARPS)
    sums = partial.view(N, C, blocks, K + 1).sum((0, 2))  # (C, 1 + K)
    gx = sums[:, 1:].T * stats64[:, 1]  # (K, C): sum g xhat_k per channel
    grad_weights = gx.sum(1).to(weights.dtype)
    count = N * plane
    mean_g = (sums[:, 0] / count if training else torch.zeros_like(sums[:, 0])).to(acc)
    slope = (stats64[:, 1] * gx / count if training else torch.zeros_like(gx)).to(acc)
    coef = (weights.double()[:, None] * stats64[:, 1]).to(acc)
    if g.numel():
        dz_base, dz_offsets, dz_vec = addresses(grad_zs, _INTERPRETED)
        if _INTERPRETED and dz_base.device.type != "cpu":
            raise NotImplementedError("interpreted Triton backward runs on CPU tensors only")
        _gradient_kernel[(N * C, blocks)](g, base, offsets, dz_base, dz_offsets, coef, mean, slope, mean_g, C, plane,
                                          K=K, VEC=vec, DZ_VEC=dz_vec, ACC=_acc(zs[0]), BLOCK=BLOCK,
                                          num_warps=NUM_WARPS)
    return grad_zs, grad_weights


def _acc_dtype(z: torch.Tensor) -> torch.dtype:
    """The accumulation dtype: float64 for float64 tensors, else float32."""
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _acc(z: torch.Tensor):
    return tl.float64 if z.dtype == torch.float64 else tl.float32


def _plane(z: torch.Tensor) -> int:
    """Elements per (sample, channel) plane."""
    return z[0, 0].numel() if z.shape[0] and z.shape[1] else 0
