// The adaptive solver's per-sample step control on the CPU (accel/ops/rk_control.py): what happens in one
// iteration of accel.odeint before the stages (rk_begin: the step each sample takes and its stage times) and
// after rk_finalize's error norm (rk_accept: accept or reject, the next step size, the new time and state, the
// FSAL stage, the outputs), one loop over the batch each.
//
// Written as a few dozen tensor operations on (B,) vectors, this took about 1 ms per iteration at B = 256 on
// this CPU (a few microseconds of fixed cost per operation), more than the six function evaluations of a small
// neural ODE. Here each is one call. The per-sample work is a handful of scalar operations; the only per-element
// work is copying the accepted samples' rows (y1 into y, the last stage into the first, the outputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

namespace accel {
namespace {

// Output rows index times and out: a negative one would read and write outside them.
void check_rows(const at::Tensor& next_index) {
  const int64_t* nx = next_index.data_ptr<int64_t>();
  for (int64_t b = 0; b < next_index.size(0); ++b)
    TORCH_CHECK(nx[b] >= 0, "rk_control: `next_index` must be >= 0, got ", nx[b], " for sample ", b);
}

void check_vector(const at::Tensor& x, int64_t B, const at::Tensor& like, const char* name) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) == B && x.is_contiguous(), "rk_control: `", name,
              "` must be a contiguous (B,) tensor with B = ", B);
  TORCH_CHECK(x.scalar_type() == like.scalar_type(), "rk_control: `", name, "` must have dtype ", like.scalar_type());
}

// Output times shared by the batch (T,), or every sample's own (T, B): sample b's time of row r is
// times[r * row_stride + b * sample_stride].
void check_times(const at::Tensor& times, int64_t B, const at::Tensor& like) {
  TORCH_CHECK((times.dim() == 1 || (times.dim() == 2 && times.size(1) == B)) &&
                  times.scalar_type() == like.scalar_type() && times.is_contiguous(),
              "rk_control: `times` must be a contiguous (T,) or (T, B) tensor of the state's dtype");
}

// step = min(h, times[next] - t) per sample, or h with `clip` false (dense output); 0 once a sample has passed its
// last output time; and the stage times t + c_i step (s, B).
std::tuple<at::Tensor, at::Tensor> begin_cpu(const at::Tensor& t, const at::Tensor& h, const at::Tensor& next_index,
                                             const at::Tensor& times, at::ArrayRef<double> c, bool clip) {
  const int64_t B = t.size(0), T = times.size(0), s = static_cast<int64_t>(c.size());
  check_vector(t, B, t, "t");
  check_vector(h, B, t, "h");
  TORCH_CHECK(next_index.dim() == 1 && next_index.size(0) == B && next_index.scalar_type() == at::kLong &&
                  next_index.is_contiguous(), "rk_control: `next_index` must be a contiguous (B,) int64 tensor");
  check_times(times, B, t);
  check_rows(next_index);
  auto step = at::empty({B}, t.options());
  auto stage_times = at::empty({s, B}, t.options());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "rk_begin", [&] {
    const scalar_t *tp = t.data_ptr<scalar_t>(), *hp = h.data_ptr<scalar_t>(), *tm = times.data_ptr<scalar_t>();
    const int64_t* nx = next_index.data_ptr<int64_t>();
    scalar_t *sp = step.data_ptr<scalar_t>(), *st = stage_times.data_ptr<scalar_t>();
    const int64_t row_stride = times.dim() == 2 ? B : 1, sample_stride = times.dim() == 2 ? 1 : 0;
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t remaining = nx[b] < T ? tm[nx[b] * row_stride + b * sample_stride] - tp[b] : scalar_t(0);
      sp[b] = nx[b] >= T ? scalar_t(0) : (clip && hp[b] >= remaining) ? remaining : hp[b];
      for (int64_t i = 0; i < s; ++i) st[i * B + b] = tp[b] + static_cast<scalar_t>(c[i]) * sp[b];
    }
  });
  return {step, stage_times};
}

// Per sample that has not finished: accept the step when its error norm is <= 1 (always, without a norm: fixed
// steps); the next step size from the I or PI controller; on acceptance the new time (exactly the output time
// when the step was shortened to it), y <- y1, the FSAL stage k[0] <- k[s-1], and the outputs: the row of the
// output time the step ended on, or with an interpolant (dense output, steps not shortened) every output time
// the step passed, y + step sum_i b_i(theta) k_i. Returns the status per sample (1 accepted, 0 rejected, -1 had finished) and how many
// samples have not finished.
std::tuple<at::Tensor, at::Tensor> accept_cpu(const at::Tensor& y, const at::Tensor& k, const at::Tensor& t,
                                              const at::Tensor& h, const at::Tensor& next_index,
                                              const at::Tensor& previous, const at::Tensor& out, const at::Tensor& y1,
                                              const std::optional<at::Tensor>& norm, const at::Tensor& step,
                                              const at::Tensor& times, double safety, int64_t order, bool pi,
                                              bool fsal, std::optional<at::ArrayRef<double>> interpolant) {
  const int64_t B = y.size(0), D = y.size(1), s = k.size(0), T = times.size(0);
  TORCH_CHECK(y.dim() == 2 && y.is_contiguous() && y1.sizes() == y.sizes() && y1.is_contiguous() &&
                  y1.scalar_type() == y.scalar_type(), "rk_control: `y` and `y1` must be contiguous (B, D) tensors");
  TORCH_CHECK(k.dim() == 3 && k.size(1) == B && k.size(2) == D && k.is_contiguous() && k.scalar_type() == y.scalar_type(),
              "rk_control: `k` must be a contiguous (s, B, D) tensor like `y`");
  TORCH_CHECK(out.dim() == 3 && out.size(0) >= T && out.size(1) == B && out.size(2) == D && out.is_contiguous() &&
                  out.scalar_type() == y.scalar_type(), "rk_control: `out` must be a contiguous (T, B, D) tensor like `y`");
  for (const auto* x : {&t, &h, &previous, &step}) check_vector(*x, B, y, "t, h, previous and step");
  if (norm.has_value()) check_vector(*norm, B, y, "norm");
  TORCH_CHECK(next_index.dim() == 1 && next_index.size(0) == B && next_index.scalar_type() == at::kLong &&
                  next_index.is_contiguous(), "rk_control: `next_index` must be a contiguous (B,) int64 tensor");
  check_times(times, B, y);
  TORCH_CHECK(order >= 1, "rk_control: `order` must be >= 1");
  TORCH_CHECK(s >= 1, "rk_control: `k` must hold at least one stage");
  check_rows(next_index);
  const bool dense = interpolant.has_value();
  const int64_t m = dense ? static_cast<int64_t>(interpolant->size()) / s : 0;  // polynomial degree
  TORCH_CHECK(!dense || (m >= 1 && m * s == static_cast<int64_t>(interpolant->size())),
              "rk_control: `interpolant` must hold s rows of equal length");
  std::vector<double> weights(s);
  auto status = at::empty({B}, y.options().dtype(at::kChar));
  int64_t unfinished = 0;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "rk_accept", [&] {
    using T_ = scalar_t;
    T_ *yp = y.data_ptr<T_>(), *kp = k.data_ptr<T_>(), *tp = t.data_ptr<T_>(), *hp = h.data_ptr<T_>();
    T_ *prev = previous.data_ptr<T_>(), *op = out.data_ptr<T_>();
    const T_ *y1p = y1.data_ptr<T_>(), *sp = step.data_ptr<T_>(), *tm = times.data_ptr<T_>();
    const T_* np = norm.has_value() ? norm->data_ptr<T_>() : nullptr;
    int64_t* nx = next_index.data_ptr<int64_t>();
    int8_t* st = status.data_ptr<int8_t>();
    const double q = static_cast<double>(order);
    const int64_t row_stride = times.dim() == 2 ? B : 1, sample_stride = times.dim() == 2 ? 1 : 0;
    for (int64_t b = 0; b < B; ++b) {
      const T_* tb = tm + b * sample_stride;
      if (nx[b] >= T) {
        st[b] = -1;
        continue;
      }
      const T_ t_next = tb[nx[b] * row_stride];
      const bool hit = !dense && hp[b] >= t_next - tp[b];  // rk_begin shortened the step to end on the output time
      bool accept = true;
      if (np) {
        const double e = static_cast<double>(np[b]);
        accept = e <= 1.0;  // a NaN norm rejects, and shrinks the step by the most allowed
        const double n = std::max(e, 1e-10);
        double factor = prev[b] > 0 ? safety * std::pow(n, -0.7 / q) * std::pow(static_cast<double>(prev[b]), 0.4 / q)
                                    : safety * std::pow(n, -1.0 / q);
        factor = std::isnan(factor) ? 0.2 : std::min(10.0, std::max(0.2, factor));
        const T_ next = static_cast<T_>(sp[b] * factor);
        if (accept) {
          if (pi) prev[b] = static_cast<T_>(n);
          hp[b] = sp[b] < hp[b] ? std::max(hp[b], next) : next;  // a shortened step does not shrink the next
        } else {
          hp[b] = std::min(next, sp[b]);
        }
      }
      st[b] = accept ? 1 : 0;
      if (accept) {
        const T_ t_old = tp[b];
        tp[b] = hit ? t_next : t_old + sp[b];
        while (dense && nx[b] < T && tb[nx[b] * row_stride] <= tp[b]) {  // from y and the stages, before they are replaced
          const double theta = sp[b] > 0 ? static_cast<double>(tb[nx[b] * row_stride] - t_old) / sp[b] : 1.0;
          for (int64_t i = 0; i < s; ++i) {
            double w = 0, power = 1;
            for (int64_t j = 0; j < m; ++j) w += (*interpolant)[i * m + j] * (power *= theta);
            weights[i] = static_cast<double>(sp[b]) * w;
          }
          T_* row = op + (nx[b] * B + b) * D;
          for (int64_t d = 0; d < D; ++d) {
            double value = yp[b * D + d];
            for (int64_t i = 0; i < s; ++i) value += weights[i] * kp[(i * B + b) * D + d];
            row[d] = static_cast<T_>(value);
          }
          ++nx[b];
        }
        std::memcpy(yp + b * D, y1p + b * D, D * sizeof(T_));
        if (fsal) std::memcpy(kp + b * D, kp + ((s - 1) * B + b) * D, D * sizeof(T_));
        if (hit) {
          std::memcpy(op + (nx[b] * B + b) * D, yp + b * D, D * sizeof(T_));
          ++nx[b];
        }
      }
      unfinished += nx[b] < T;
    }
  });
  return {status, at::scalar_tensor(unfinished, at::kLong)};
}

}  // namespace

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("rk_begin", &begin_cpu);
  m.impl("rk_accept", &accept_cpu);
}

}  // namespace accel
