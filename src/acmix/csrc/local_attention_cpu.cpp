// Fused local (sliding-window) dot-product attention for CPU: forward and backward.
//
// Reads queries, keys and values straight from the fused projection
// qkv (B, 3C, H, W), channel which * C + head * d + j, and the positional
// encoding pe (d, H, W). For query pixel (i*s, j*s) and window position
// p = (oy, ox) the key pixel is (i*s + oy - r, j*s + ox - r), r = k // 2:
//   reflect mode: out-of-image coordinates are reflected (border keys can
//                 appear twice and then count twice, as in the authors' code);
//   zeros mode:   out-of-image keys are excluded from the softmax.
// logit = scale * q_c . (k_n - pe_n)   (q_c . pe_c is constant over the window
// and cancels in the softmax).
//
// Padding is done by index arithmetic: no padded copies, no window tensor. A
// row of output is processed at a time with its k*k logits in a small buffer,
// vectorised over the row's interior columns. The forward returns the
// log-sum-exp; the backward recomputes the weights from it and writes the
// gradient of qkv in one buffer (and the keys' gradient, from which the
// caller derives pe's).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

struct Geometry {
  int64_t B, N, d, H, W, Ho, Wo, kernel, stride, r;
  bool zeros;  // masked zero padding (else reflection)
};

inline int64_t reflect(int64_t x, int64_t n) {
  if (x < 0) return -x;
  if (x >= n) return 2 * (n - 1) - x;
  return x;
}

// Source index of a padded coordinate, or -1 where masked.
inline int64_t source(int64_t x, int64_t n, bool zeros) {
  if (x >= 0 && x < n) return x;
  return zeros ? -1 : reflect(x, n);
}

// Column plan for one window column offset ox: output columns [lo, hi) read
// source columns j*s + ox - r directly; the others go through `map`.
struct ColumnPlan {
  int64_t lo, hi;
  std::vector<int64_t> map;  // source column for every output column (-1: masked)
};

std::vector<ColumnPlan> column_plans(const Geometry& g) {
  std::vector<ColumnPlan> plans(g.kernel);
  for (int64_t ox = 0; ox < g.kernel; ++ox) {
    ColumnPlan& pl = plans[ox];
    pl.map.resize(g.Wo);
    pl.lo = g.Wo;
    pl.hi = 0;
    for (int64_t j = 0; j < g.Wo; ++j) {
      const int64_t x = j * g.stride + ox - g.r;
      pl.map[j] = source(x, g.W, g.zeros);
      if (x >= 0 && x < g.W) {
        pl.lo = std::min(pl.lo, j);
        pl.hi = std::max(pl.hi, j + 1);
      }
    }
    if (pl.lo >= pl.hi) pl.lo = pl.hi = 0;
  }
  return plans;
}

template <typename T>
struct Plane {
  const T* q;   // (d, H, W)
  const T* k;   // (d, H, W)
  const T* v;   // (d, H, W)
  const T* pe;  // (d, H, W) or nullptr
};

template <typename T>
inline Plane<T> plane(const T* qkv, const T* pe, const Geometry& g, int64_t bn) {
  const int64_t b = bn / g.N, n = bn % g.N, HW = g.H * g.W, C = g.N * g.d;
  const T* base = qkv + (b * 3 * C + n * g.d) * HW;
  return {base, base + C * HW, base + 2 * C * HW, pe};
}

// logits[p * Wo + j] of output row i (masked entries: -inf).
template <typename T>
void row_logits(const Plane<T>& P, const Geometry& g, const std::vector<ColumnPlan>& plans,
                int64_t i, T scale, T* __restrict__ logits, T* __restrict__ qrow) {
  const int64_t K2 = g.kernel * g.kernel, Wo = g.Wo, s = g.stride, HW = g.H * g.W;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t qy = i * s;
  // The scaled query row at the output positions, all channels: qrow[c * Wo + j].
  for (int64_t c = 0; c < g.d; ++c) {
    const T* qsrc = P.q + c * HW + qy * g.W;
    T* qr = qrow + c * Wo;
    for (int64_t j = 0; j < Wo; ++j) qr[j] = qsrc[j * s] * scale;
  }
  for (int64_t p = 0; p < K2; ++p) {
    const int64_t oy = p / g.kernel, ox = p % g.kernel;
    T* __restrict__ L = logits + p * Wo;
    const int64_t y = source(qy + oy - g.r, g.H, g.zeros);
    const ColumnPlan& pl = plans[ox];
    for (int64_t j = 0; j < Wo; ++j) L[j] = T(0);
    if (y < 0) {
      for (int64_t j = 0; j < Wo; ++j) L[j] = neg_inf;
      continue;
    }
    for (int64_t c = 0; c < g.d; ++c) {
      const T* __restrict__ qr = qrow + c * Wo;
      const T* __restrict__ krow = P.k + c * HW + y * g.W;
      const T* __restrict__ prow = P.pe ? P.pe + c * HW + y * g.W : nullptr;
      const int64_t off = ox - g.r;
      if (s == 1) {
        if (prow) {
#pragma omp simd
          for (int64_t j = pl.lo; j < pl.hi; ++j) L[j] += qr[j] * (krow[j + off] - prow[j + off]);
        } else {
#pragma omp simd
          for (int64_t j = pl.lo; j < pl.hi; ++j) L[j] += qr[j] * krow[j + off];
        }
      } else {
        for (int64_t j = pl.lo; j < pl.hi; ++j) {
          const int64_t x = j * s + off;
          L[j] += qr[j] * (krow[x] - (prow ? prow[x] : T(0)));
        }
      }
      for (int64_t j = 0; j < pl.lo; ++j) {
        const int64_t x = pl.map[j];
        if (x >= 0) L[j] += qr[j] * (krow[x] - (prow ? prow[x] : T(0)));
      }
      for (int64_t j = pl.hi; j < Wo; ++j) {
        const int64_t x = pl.map[j];
        if (x >= 0) L[j] += qr[j] * (krow[x] - (prow ? prow[x] : T(0)));
      }
    }
    for (int64_t j = 0; j < pl.lo; ++j)
      if (pl.map[j] < 0) L[j] = neg_inf;
    for (int64_t j = pl.hi; j < Wo; ++j)
      if (pl.map[j] < 0) L[j] = neg_inf;
  }
}

// In place: logits -> weights; writes the log-sum-exp per column.
template <typename T>
void row_softmax(T* __restrict__ a, int64_t K2, int64_t Wo, T* __restrict__ lse,
                 T* __restrict__ mx, T* __restrict__ sum) {
  for (int64_t j = 0; j < Wo; ++j) mx[j] = -std::numeric_limits<T>::infinity();
  for (int64_t p = 0; p < K2; ++p) {
    const T* L = a + p * Wo;
    for (int64_t j = 0; j < Wo; ++j) mx[j] = L[j] > mx[j] ? L[j] : mx[j];
  }
  for (int64_t j = 0; j < Wo; ++j) sum[j] = T(0);
  for (int64_t p = 0; p < K2; ++p) {
    T* __restrict__ L = a + p * Wo;
#pragma omp simd
    for (int64_t j = 0; j < Wo; ++j) L[j] = std::exp(L[j] - mx[j]);
    for (int64_t j = 0; j < Wo; ++j) sum[j] += L[j];
  }
  for (int64_t j = 0; j < Wo; ++j) {
    lse[j] = mx[j] + std::log(sum[j]);
    sum[j] = T(1) / sum[j];
  }
  for (int64_t p = 0; p < K2; ++p) {
    T* __restrict__ L = a + p * Wo;
    for (int64_t j = 0; j < Wo; ++j) L[j] *= sum[j];
  }
}

// acc[j] += w[j] * src[col(j)] over a row, following the column plan.
template <typename T>
inline void gather_axpy(const ColumnPlan& pl, int64_t off, int64_t s, int64_t Wo,
                        const T* __restrict__ w, const T* __restrict__ src, T* __restrict__ acc) {
  if (s == 1) {
#pragma omp simd
    for (int64_t j = pl.lo; j < pl.hi; ++j) acc[j] += w[j] * src[j + off];
  } else {
    for (int64_t j = pl.lo; j < pl.hi; ++j) acc[j] += w[j] * src[j * s + off];
  }
  for (int64_t j = 0; j < pl.lo; ++j)
    if (pl.map[j] >= 0) acc[j] += w[j] * src[pl.map[j]];
  for (int64_t j = pl.hi; j < Wo; ++j)
    if (pl.map[j] >= 0) acc[j] += w[j] * src[pl.map[j]];
}

// dst[col(j)] += w[j] * val[j] over a row (the transpose of gather_axpy).
template <typename T>
inline void scatter_axpy(const ColumnPlan& pl, int64_t off, int64_t s, int64_t Wo,
                         const T* __restrict__ w, const T* __restrict__ val, T* __restrict__ dst) {
  if (s == 1) {
#pragma omp simd
    for (int64_t j = pl.lo; j < pl.hi; ++j) dst[j + off] += w[j] * val[j];
  } else {
    for (int64_t j = pl.lo; j < pl.hi; ++j) dst[j * s + off] += w[j] * val[j];
  }
  for (int64_t j = 0; j < pl.lo; ++j)
    if (pl.map[j] >= 0) dst[pl.map[j]] += w[j] * val[j];
  for (int64_t j = pl.hi; j < Wo; ++j)
    if (pl.map[j] >= 0) dst[pl.map[j]] += w[j] * val[j];
}

template <typename T>
void forward_impl(const T* qkv, const T* pe, const Geometry& g, T scale, T* out, T* lse) {
  const int64_t K2 = g.kernel * g.kernel, Wo = g.Wo, HW = g.H * g.W, oplane = g.Ho * g.Wo;
  const auto plans = column_plans(g);
  at::parallel_for(0, g.B * g.N * g.Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> a(K2 * Wo), mx(Wo), sum(Wo), qrow(g.d * Wo);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bn = row / g.Ho, i = row % g.Ho;
      const Plane<T> P = plane(qkv, pe, g, bn);
      row_logits(P, g, plans, i, scale, a.data(), qrow.data());
      row_softmax(a.data(), K2, Wo, lse + bn * oplane + i * Wo, mx.data(), sum.data());
      for (int64_t c = 0; c < g.d; ++c) {
        T* __restrict__ orow = out + (bn * g.d + c) * oplane + i * Wo;
        for (int64_t j = 0; j < Wo; ++j) orow[j] = T(0);
        for (int64_t p = 0; p < K2; ++p) {
          const int64_t oy = p / g.kernel, ox = p % g.kernel;
          const int64_t y = source(i * g.stride + oy - g.r, g.H, g.zeros);
          if (y < 0) continue;
          gather_axpy(plans[ox], ox - g.r, g.stride, Wo, a.data() + p * Wo,
                      P.v + c * HW + y * g.W, orow);
        }
      }
    }
  });
}

template <typename T>
void backward_impl(const T* grad_out, const T* qkv, const T* pe, const T* lse, const Geometry& g,
                   T scale, T* grad_qkv) {
  const int64_t K2 = g.kernel * g.kernel, Wo = g.Wo, HW = g.H * g.W, oplane = g.Ho * g.Wo;
  const int64_t C = g.N * g.d, s = g.stride;
  const auto plans = column_plans(g);
  // One task per (batch, head) plane: its keys and values are written by no other.
  at::parallel_for(0, g.B * g.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> a(K2 * Wo), da(K2 * Wo), D(Wo), qrow(g.d * Wo), tmp(Wo), tmp2(Wo);
    for (int64_t bn = begin; bn < end; ++bn) {
      const Plane<T> P = plane(qkv, pe, g, bn);
      const int64_t b = bn / g.N, n = bn % g.N;
      T* GQ = grad_qkv + (b * 3 * C + n * g.d) * HW;
      T* GK = GQ + C * HW;
      T* GV = GQ + 2 * C * HW;
      const T* G = grad_out + bn * g.d * oplane;
      for (int64_t i = 0; i < g.Ho; ++i) {
        row_logits(P, g, plans, i, scale, a.data(), qrow.data());
        const T* l = lse + bn * oplane + i * Wo;
        for (int64_t p = 0; p < K2; ++p) {
          T* __restrict__ A = a.data() + p * Wo;
#pragma omp simd
          for (int64_t j = 0; j < Wo; ++j) A[j] = std::exp(A[j] - l[j]);
        }
        // dA[p, j] = sum_c g[c, j] v[c, src];  dV[c, src] += a[p, j] g[c, j].
        for (int64_t x = 0; x < K2 * Wo; ++x) da[x] = T(0);
        for (int64_t c = 0; c < g.d; ++c) {
          const T* grow = G + c * oplane + i * Wo;
          for (int64_t p = 0; p < K2; ++p) {
            const int64_t oy = p / g.kernel, ox = p % g.kernel;
            const int64_t y = source(i * s + oy - g.r, g.H, g.zeros);
            if (y < 0) continue;
            gather_axpy(plans[ox], ox - g.r, s, Wo, grow, P.v + c * HW + y * g.W,
                        da.data() + p * Wo);
            scatter_axpy(plans[ox], ox - g.r, s, Wo, a.data() + p * Wo, grow,
                         GV + c * HW + y * g.W);
          }
        }
        // Softmax backward: dlogit = a * (dA - sum_p a dA); masked entries have a = 0.
        for (int64_t j = 0; j < Wo; ++j) D[j] = T(0);
        for (int64_t p = 0; p < K2; ++p) {
          const T* A = a.data() + p * Wo;
          const T* DA = da.data() + p * Wo;
          for (int64_t j = 0; j < Wo; ++j) D[j] += A[j] * DA[j];
        }
        for (int64_t p = 0; p < K2; ++p) {
          const T* A = a.data() + p * Wo;
          T* DA = da.data() + p * Wo;
          for (int64_t j = 0; j < Wo; ++j) DA[j] = A[j] * (DA[j] - D[j]) * scale;
        }
        // dq[c, j] = sum_p dl[p, j] (k - pe)[c, src];  dK[c, src] += dl[p, j] q[c, j].
        for (int64_t c = 0; c < g.d; ++c) {
          const T* qsrc = P.q + c * HW + i * s * g.W;
          for (int64_t j = 0; j < Wo; ++j) {
            qrow[j] = qsrc[j * s];
            tmp[j] = T(0);
            tmp2[j] = T(0);
          }
          for (int64_t p = 0; p < K2; ++p) {
            const int64_t oy = p / g.kernel, ox = p % g.kernel;
            const int64_t y = source(i * s + oy - g.r, g.H, g.zeros);
            if (y < 0) continue;
            const T* DL = da.data() + p * Wo;
            const int64_t off = ox - g.r;
            gather_axpy(plans[ox], off, s, Wo, DL, P.k + c * HW + y * g.W, tmp.data());
            if (P.pe) gather_axpy(plans[ox], off, s, Wo, DL, P.pe + c * HW + y * g.W, tmp2.data());
            scatter_axpy(plans[ox], off, s, Wo, DL, qrow.data(), GK + c * HW + y * g.W);
          }
          T* gq = GQ + c * HW + i * s * g.W;
          for (int64_t j = 0; j < Wo; ++j) gq[j * s] += tmp[j] - tmp2[j];
        }
      }
    }
  });
}

Geometry geometry(const at::Tensor& qkv, int64_t heads, int64_t kernel, int64_t stride,
                  bool zeros) {
  TORCH_CHECK(qkv.device().is_cpu(), "local_attention_cpu: tensors must be on the CPU");
  TORCH_CHECK(qkv.dim() == 4 && qkv.is_contiguous(),
              "local_attention_cpu: qkv must be a contiguous (B, 3C, H, W) tensor");
  TORCH_CHECK(qkv.size(1) % (3 * heads) == 0, "local_attention_cpu: 3C not divisible by 3 heads");
  TORCH_CHECK(kernel % 2 == 1 && kernel >= 1 && stride >= 1,
              "local_attention_cpu: kernel must be odd and stride >= 1");
  Geometry g;
  g.B = qkv.size(0);
  g.N = heads;
  g.d = qkv.size(1) / (3 * heads);
  g.H = qkv.size(2);
  g.W = qkv.size(3);
  g.kernel = kernel;
  g.stride = stride;
  g.r = kernel / 2;
  g.zeros = zeros;
  g.Ho = (g.H + stride - 1) / stride;
  g.Wo = (g.W + stride - 1) / stride;
  TORCH_CHECK(zeros || (g.r < g.H && g.r < g.W),
              "local_attention_cpu: map too small for reflection padding");
  return g;
}

std::vector<at::Tensor> forward(const at::Tensor& qkv, const c10::optional<at::Tensor>& pe,
                                int64_t heads, int64_t kernel, int64_t stride, bool zeros,
                                double scale) {
  const Geometry g = geometry(qkv, heads, kernel, stride, zeros);
  if (pe.has_value()) {
    TORCH_CHECK(pe->is_contiguous() && pe->numel() == g.d * g.H * g.W &&
                    pe->scalar_type() == qkv.scalar_type(),
                "local_attention_cpu: pe must be a contiguous (d, H, W) tensor of qkv's dtype");
  }
  at::Tensor out = at::empty({g.B, g.N * g.d, g.Ho, g.Wo}, qkv.options());
  at::Tensor lse = at::empty({g.B, g.N, g.Ho, g.Wo}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "local_attention_cpu_forward", [&] {
    forward_impl<scalar_t>(qkv.data_ptr<scalar_t>(),
                           pe.has_value() ? pe->data_ptr<scalar_t>() : nullptr, g,
                           static_cast<scalar_t>(scale), out.data_ptr<scalar_t>(),
                           lse.data_ptr<scalar_t>());
  });
  return {out, lse};
}

at::Tensor backward(const at::Tensor& grad_out, const at::Tensor& qkv,
                    const c10::optional<at::Tensor>& pe, const at::Tensor& lse, int64_t heads,
                    int64_t kernel, int64_t stride, bool zeros, double scale) {
  const Geometry g = geometry(qkv, heads, kernel, stride, zeros);
  at::Tensor go = grad_out.contiguous();
  at::Tensor grad_qkv = at::zeros_like(qkv);
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "local_attention_cpu_backward", [&] {
    backward_impl<scalar_t>(go.data_ptr<scalar_t>(), qkv.data_ptr<scalar_t>(),
                            pe.has_value() ? pe->data_ptr<scalar_t>() : nullptr,
                            lse.data_ptr<scalar_t>(), g, static_cast<scalar_t>(scale),
                            grad_qkv.data_ptr<scalar_t>());
  });
  return grad_qkv;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused local attention forward (CPU)");
  m.def("backward", &backward, "fused local attention backward (CPU)");
}
