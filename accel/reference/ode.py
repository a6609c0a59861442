"""Adaptive explicit Runge-Kutta integration, written as plainly as Hairer, Norsett and Wanner (Solving ODEs I,
II.4 and IV.2): the reference that accel's fused step ops and accel.odeint are checked against.

A step of an s-stage method with tableau (c, A, b, b_err) from (t, y) with step h:
    g_i = y + h sum_{j<i} a_ij k_j,   k_i = f(t + c_i h, g_i),   y1 = y + h sum_i b_i k_i,   err = h sum_i e_i k_i
The error norm is RMS(err / (atol + rtol max(|y|, |y1|))) over the state; a step is accepted when it is <= 1, and
the next step is h * clamp(safety * norm^(-1/q), 0.2, 10) with q the error estimator's order + 1 (the I
controller; the PI controller multiplies by norm_prev^(beta) as well). The methods here are FSAL: the last stage
is f(t + h, y1), the first stage of the next step.

Stiffness (Hairer & Wanner IV.2, Shampine): for the last two stages, evaluated at the same time t + h,
rho = ||k_s - k_{s-1}|| / ||g_s - g_{s-1}|| estimates the dominant eigenvalue's modulus |lambda|; the step is
limited by stability when h rho exceeds the method's stability bound on the negative real axis (3.3066 for DP5,
3.5068 for Tsit5).

Every sample of a batch runs its own t and h here (per-sample step control), looping in Python.
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tableau:
    c: tuple
    a: tuple  # rows of the strictly lower triangle
    b: tuple  # propagating weights
    b_err: tuple  # b - b_hat: the error estimate's weights
    order: int  # of the propagating solution
    error_order: int  # of the embedded one
    stability_bound: float | None = None  # where the stability region meets the negative real axis
    fsal: bool = True
    # dense output: y(t + theta h) = y + h sum_i b_i(theta) k_i with b_i(theta) = sum_j P[i][j] theta^(j+1), one
    # row P[i] per stage (the same polynomials scipy's RK45 and RK23 use)
    interpolant: tuple | None = None


def quartic_through_midpoint(b, mid):
    """Dense-output rows (see Tableau.interpolant) of the quartic p(theta) with p(0) = y, p(1) = y1, p'(0) = h k_0,
    p'(1) = h k_last (FSAL: f(y1)) and p(1/2) = y + h sum_i mid_i k_i, a 4th-order-accurate midpoint value.
    Every condition is y plus h times a combination of the stages, so p(theta) - y is h sum_i b_i(theta) k_i
    with b_i(theta) = d_i theta + c_i theta^2 + e_i theta^3 + a_i theta^4, solved from the five conditions."""
    s = len(b)
    rows = []
    for i in range(s):
        f0, f1 = float(i == 0), float(i == s - 1)
        c2 = f1 - 4 * f0 - 5 * b[i] + 16 * mid[i]
        c3 = 5 * f0 - 3 * f1 + 14 * b[i] - 32 * mid[i]
        c4 = 2 * (f1 - f0) - 8 * b[i] + 16 * mid[i]
        rows.append((f0, c2, c3, c4))
    return tuple(rows)


def hermite_cubic(b):
    """Dense-output rows of the cubic Hermite interpolant through y, y1 = y + h sum_i b_i k_i and the slopes k_0 at
    the start and the last row's stage, f(t1, y1), at the end: b_i(theta) = d_i theta + (3 b_i - 2 d_i - e_i)
    theta^2 + (d_i + e_i - 2 b_i) theta^3 with d, e the indicators of the first and last rows. Third-order
    accurate, for the methods whose own interpolant would be of lower order."""
    rows = []
    for i, bi in enumerate(b):
        f0, f1 = float(i == 0), float(i == len(b) - 1)
        rows.append((f0, 3 * bi - 2 * f0 - f1, f0 + f1 - 2 * bi))
    return tuple(rows)


DOPRI5 = Tableau(
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
       (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
       (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
       (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)),
    b=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    # the embedded 4th-order weights of Shampine's Dormand-Prince variant (torchdiffeq's dopri5; Hairer's code
    # pairs the same 5th-order solution with another embedded method)
    b_err=(35 / 384 - 1951 / 21600, 0.0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
           -2187 / 6784 + 12231 / 42400, 11 / 84 - 649 / 6300, -1 / 60),
    order=5, error_order=4, stability_bound=3.3066,
    interpolant=quartic_through_midpoint(
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
        tuple(x / 2 for x in (6025192743 / 30085553152, 0.0, 51252292925 / 65400821598, -2691868925 / 45128329728,
                              187940372067 / 1594534317056, -1776094331 / 19743644256, 11237099 / 235043384))))

TSIT5 = Tableau(
    c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
    a=((), (0.161,), (-0.008480655492356989, 0.335480655492357),
       (2.8971530571054935, -6.359448489975075, 4.3622954328695815),
       (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
       (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401, -0.02826905039406838),
       (0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081, 2.324710524099774)),
    b=(0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081, 2.324710524099774, 0.0),
    # Tsitouras gives the error weights directly; the last one's sign is corrected (-1/66)
    b_err=(0.00178001105222577714, 0.0008164344596567469, -0.007880878010261995, 0.1447110071732629,
           -0.5823571654525552, 0.45808210592918697, -1 / 66),
    order=5, error_order=4, stability_bound=3.5068,
    # the midpoint is Tsitouras' continuous extension b_i(theta) at theta = 1/2
    interpolant=quartic_through_midpoint(
        (0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081, 2.324710524099774,
         0.0),
        (0.10741235230100377, 0.01135625, 0.39560903056045305, -0.34475214352593553, 1.3161853649581645,
         -1.0170608542936508, 0.03125)))

BOSH3 = Tableau(
    c=(0.0, 1 / 2, 3 / 4, 1.0),
    a=((), (1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
    b=(2 / 9, 1 / 3, 4 / 9, 0.0),
    b_err=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
    order=3, error_order=2,
    interpolant=hermite_cubic((2 / 9, 1 / 3, 4 / 9, 0.0)))


# Low-order adaptive pairs. They are not FSAL: the next step's first stage is f(t1, y1), which the dense output
# uses as its end slope (an extra row of the interpolant, after the stages).
ADAPTIVE_HEUN = Tableau(
    c=(0.0, 1.0), a=((), (1.0,)), b=(1 / 2, 1 / 2), b_err=(1 / 2, -1 / 2), order=2, error_order=1, fsal=False,
    interpolant=hermite_cubic((1 / 2, 1 / 2, 0.0)))

FEHLBERG2 = Tableau(
    c=(0.0, 1 / 2, 1.0), a=((), (1 / 2,), (1 / 256, 255 / 256)), b=(1 / 512, 255 / 256, 1 / 512),
    b_err=(-1 / 512, 0.0, 1 / 512), order=2, error_order=1, fsal=False,
    interpolant=hermite_cubic((1 / 512, 255 / 256, 1 / 512, 0.0)))


def _fixed(c, a, b, order):
    """A fixed-step method: no error estimate, not FSAL (each step evaluates f at its start)."""
    return Tableau(c=c, a=a, b=b, b_err=(0.0,) * len(b), order=order, error_order=0, fsal=False)


EULER = _fixed((0.0,), ((),), (1.0,), 1)
MIDPOINT = _fixed((0.0, 1 / 2), ((), (1 / 2,)), (0.0, 1.0), 2)
HEUN2 = _fixed((0.0, 1.0), ((), (1.0,)), (1 / 2, 1 / 2), 2)
HEUN3 = _fixed((0.0, 1 / 3, 2 / 3), ((), (1 / 3,), (0.0, 2 / 3)), (1 / 4, 0.0, 3 / 4), 3)
# Kutta's 3/8 rule (smaller error constant than the classic RK4, one more addition), torchdiffeq's 'rk4'
RK4 = _fixed((0.0, 1 / 3, 2 / 3, 1.0), ((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)), (1 / 8, 3 / 8, 3 / 8, 1 / 8), 4)

METHODS = {"dopri5": DOPRI5, "tsit5": TSIT5, "bosh3": BOSH3, "adaptive_heun": ADAPTIVE_HEUN, "fehlberg2": FEHLBERG2,
           "rk4": RK4, "euler": EULER, "midpoint": MIDPOINT, "heun2": HEUN2, "heun3": HEUN3}


def rk_step(f, t, y, h, tableau: Tableau, k1=None):
    """One step for a batch: t (B,), y (B, D), h (B,). Returns y1, err, the stages k (s, B, D) and their
    inputs g (s, B, D)."""
    hh = h[:, None]
    k, g = [], []
    for i, (ci, row) in enumerate(zip(tableau.c, tableau.a)):
        gi = y + hh * sum(aij * kj for aij, kj in zip(row, k)) if row else y
        ki = k1 if (i == 0 and k1 is not None) else f(t + ci * h, gi)
        g.append(gi)
        k.append(ki)
    y1 = y + hh * sum(bi * ki for bi, ki in zip(tableau.b, k))
    err = hh * sum(ei * ki for ei, ki in zip(tableau.b_err, k))
    return y1, err, torch.stack(k), torch.stack(g)


def combination(k, weights):
    """sum_j weights[j] k[j] over the nonzero weights, in order (0 when there are none): a stage input's or the
    error estimate's sum of stages, as the fused step ops add them."""
    terms = [w * k[j] for j, w in enumerate(weights) if w != 0.0]
    return sum(terms[1:], terms[0]) if terms else torch.zeros_like(k[0])


def interpolate(y, k, h, theta, tableau: Tableau):
    """The dense output y(t + theta h) of a step from (t, y) with stages k (s, B, D) and step h (B,), at
    theta (B,) in [0, 1]."""
    powers = torch.stack([theta ** (j + 1) for j in range(len(tableau.interpolant[0]))], -1)  # (B, m)
    weights = powers @ torch.tensor(tableau.interpolant, dtype=y.dtype).T  # (B, s): b_i(theta)
    return y + h[:, None] * torch.einsum("bs,sbd->bd", weights, k)


def error_norm(err, y0, y1, rtol, atol):
    """Hairer's RMS(err / (atol + rtol max(|y0|, |y1|))) per sample, as ||.||_2 / sqrt(D): its gradient at a zero
    error is 0 (the norm's subgradient), where sqrt(mean(.^2)) would give NaN."""
    scale = atol + rtol * torch.maximum(y0.abs(), y1.abs())
    return torch.linalg.vector_norm(err / scale, dim=-1) / err.shape[-1] ** 0.5


def stiffness(k, g):
    """rho = ||k_s - k_{s-1}|| / ||g_s - g_{s-1}|| per sample (0 where the two stage inputs coincide; NaN stays
    NaN)."""
    num = (k[-1] - k[-2]).norm(dim=-1)
    den = (g[-1] - g[-2]).norm(dim=-1)
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), torch.zeros_like(num))


def initial_step(f, t0, y0, f0, order, rtol, atol):
    """Hairer's starting step (Solving ODEs I, II.4) per sample: from the sizes of y0, f0 and a difference quotient
    of f."""
    scale = atol + rtol * y0.abs()
    rms = lambda v: v.pow(2).mean(-1).sqrt()  # noqa: E731
    d0 = rms(y0 / scale)
    d1 = rms(f0 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    f1 = f(t0 + h0, y0 + h0[:, None] * f0)
    d2 = rms((f1 - f0) / scale) / h0
    big = torch.maximum(d1, d2)
    h1 = torch.where(big <= 1e-15, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3),
                     (0.01 / torch.where(big > 0, big, 1.0)) ** (1.0 / (order + 1)))
    return torch.minimum(100 * h0, h1)


def odeint(f, y0, t, method="dopri5", rtol=1e-6, atol=1e-8, controller="I", safety=0.9, max_steps=100_000):
    """Solves y' = f(t, y) from t[0] for y0 (B, D) and returns y at every time of t (T,): (T, B, D), and statistics
    per sample: accepted and rejected steps, function evaluations, and per accepted step its error norm and
    stiffness estimate. Each sample steps on its own; a step that would pass the next output time is shortened
    to end on it. rk4 takes 100 fixed steps between consecutive output times."""
    tableau = METHODS[method]
    stats = {"accepted": [], "rejected": [], "nfe": [], "error": [], "stiffness": []}
    solutions = []
    for b in range(y0.shape[0]):
        ys, sample_stats = _solve_one(f, y0[b:b + 1], t, tableau, rtol, atol, controller, safety, max_steps)
        solutions.append(ys)
        for key, value in sample_stats.items():
            stats[key].append(value)
    return torch.cat(solutions, dim=1), stats


def _solve_one(f, y, t, tableau, rtol, atol, controller, safety, max_steps):
    stats = {"accepted": 0, "rejected": 0, "nfe": 1, "error": [], "stiffness": []}
    tb = t[:1].clone()
    k1 = f(tb, y)
    adaptive = tableau.error_order > 0
    if adaptive:
        h = initial_step(f, tb, y, k1, tableau.error_order, rtol, atol)
        stats["nfe"] += 1
    q = tableau.error_order + 1
    previous_norm = None
    out = [y]
    for target in t[1:].split(1):
        if not adaptive:
            h_fixed = (target - tb) / 100
            for _ in range(100):
                y, _, _, _ = rk_step(f, tb, y, h_fixed, tableau)
                tb = tb + h_fixed
            stats["nfe"] += 100 * len(tableau.c)
            stats["accepted"] += 100
            out.append(y)
            continue
        while (target - tb).item() > 0:
            if stats["accepted"] + stats["rejected"] >= max_steps:
                raise RuntimeError(f"odeint reference: more than {max_steps} steps")
            step = torch.minimum(h, target - tb)  # end exactly on the output time
            y1, err, k, g = rk_step(f, tb, y, step, tableau, k1)
            stats["nfe"] += len(tableau.c) - 1
            norm = error_norm(err, y, y1, rtol, atol).clamp_min(1e-10)
            factor = safety * norm ** (-1.0 / q)
            if controller == "PI" and previous_norm is not None:
                factor = safety * norm ** (-0.7 / q) * previous_norm ** (0.4 / q)
            factor = factor.clamp(0.2, 10.0)
            if norm.item() <= 1.0:
                tb, y, k1 = tb + step, y1, k[-1]  # FSAL: the last stage is f(t + h, y1)
                stats["accepted"] += 1
                stats["error"].append(norm.item())
                stats["stiffness"].append(stiffness(k, g).item())
                previous_norm = norm
                # a step shortened to hit an output time does not shrink the next one
                h = torch.maximum(h, step * factor) if (step < h).all() else step * factor
            else:
                stats["rejected"] += 1
                h = step * torch.clamp(factor, max=1.0)
        out.append(y)
    return torch.stack(out), stats
