// Fused local (sliding-window) dot-product attention for CPU: forward and backward.
//
// Layout: NCHW per head plane. For a plane (one batch item and head):
//   q      (d, Ho, Wo)   queries at the output positions, already scaled
//   k_pad  (d, Hp, Wp)   padded keys (positional term included)
//   v_pad  (d, Hp, Wp)   padded values
//   bias   (K2, Ho, Wo)  optional additive logits bias (masked zero padding)
// Window position p = (oy, ox) = (p / k, p % k) of query (i, j) reads padded pixel
// (i * s + oy, j * s + ox).
//
// Work is done one output row at a time with the row's K2 logits in a small
// buffer, vectorised over the row (the innermost loops run over contiguous
// columns). No window tensor is materialised. The forward returns the row
// log-sum-exp; the backward recomputes the attention weights from it
// (flash-attention style), so only q, k_pad, v_pad and lse are kept for backward.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename T>
struct Plane {
  const T* q;      // (d, Ho, Wo)
  const T* k;      // (d, Hp, Wp)
  const T* v;      // (d, Hp, Wp)
  const T* bias;   // (K2, Ho, Wo) or nullptr
  int64_t d, Ho, Wo, Hp, Wp, kernel, stride;
};

// logits[p * Wo + j] for output row i.
template <typename T>
inline void row_logits(const Plane<T>& P, int64_t i, T* __restrict__ logits) {
  const int64_t K2 = P.kernel * P.kernel, Wo = P.Wo, s = P.stride;
  const int64_t qplane = P.Ho * P.Wo, kplane = P.Hp * P.Wp;
  for (int64_t p = 0; p < K2; ++p) {
    const int64_t oy = p / P.kernel, ox = p % P.kernel;
    T* __restrict__ L = logits + p * Wo;
    if (P.bias) {
      const T* b = P.bias + p * qplane + i * Wo;
      for (int64_t j = 0; j < Wo; ++j) L[j] = b[j];
    } else {
      for (int64_t j = 0; j < Wo; ++j) L[j] = T(0);
    }
    for (int64_t c = 0; c < P.d; ++c) {
      const T* __restrict__ qr = P.q + c * qplane + i * Wo;
      const T* __restrict__ kr = P.k + c * kplane + (i * s + oy) * P.Wp + ox;
      if (s == 1) {
#pragma omp simd
        for (int64_t j = 0; j < Wo; ++j) L[j] += qr[j] * kr[j];
      } else {
        for (int64_t j = 0; j < Wo; ++j) L[j] += qr[j] * kr[j * s];
      }
    }
  }
}

// In place: logits -> attention weights; writes the log-sum-exp per column.
template <typename T>
inline void row_softmax(T* __restrict__ a, int64_t K2, int64_t Wo, T* __restrict__ lse,
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
    for (int64_t j = 0; j < Wo; ++j) {
      L[j] = std::exp(L[j] - mx[j]);
    }
#pragma omp simd
    for (int64_t j = 0; j < Wo; ++j) sum[j] += L[j];
  }
  for (int64_t j = 0; j < Wo; ++j) {
    const T inv = T(1) / sum[j];
    lse[j] = mx[j] + std::log(sum[j]);
    sum[j] = inv;
  }
  for (int64_t p = 0; p < K2; ++p) {
    T* L = a + p * Wo;
    for (int64_t j = 0; j < Wo; ++j) L[j] *= sum[j];
  }
}

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k_pad, const at::Tensor& v_pad,
                  const at::Tensor& bias, int64_t kernel, int64_t stride, at::Tensor& out,
                  at::Tensor& lse) {
  const int64_t BN = q.size(0), d = q.size(1), Ho = q.size(2), Wo = q.size(3);
  const int64_t Hp = k_pad.size(2), Wp = k_pad.size(3), K2 = kernel * kernel;
  const T* qp = q.data_ptr<T>();
  const T* kp = k_pad.data_ptr<T>();
  const T* vp = v_pad.data_ptr<T>();
  const T* bp = bias.defined() ? bias.data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  T* lp = lse.data_ptr<T>();
  const int64_t qplane = Ho * Wo, kplane = Hp * Wp;
  at::parallel_for(0, BN * Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> a(K2 * Wo), mx(Wo), sum(Wo);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bn = r / Ho, i = r % Ho;
      Plane<T> P{qp + bn * d * qplane, kp + bn * d * kplane, vp + bn * d * kplane, bp,
                 d, Ho, Wo, Hp, Wp, kernel, stride};
      row_logits(P, i, a.data());
      row_softmax(a.data(), K2, Wo, lp + bn * qplane + i * Wo, mx.data(), sum.data());
      for (int64_t c = 0; c < d; ++c) {
        T* __restrict__ orow = op + (bn * d + c) * qplane + i * Wo;
        for (int64_t j = 0; j < Wo; ++j) orow[j] = T(0);
        for (int64_t p = 0; p < K2; ++p) {
          const int64_t oy = p / kernel, ox = p % kernel;
          const T* __restrict__ A = a.data() + p * Wo;
          const T* __restrict__ vr = P.v + c * kplane + (i * stride + oy) * Wp + ox;
          if (stride == 1) {
#pragma omp simd
            for (int64_t j = 0; j < Wo; ++j) orow[j] += A[j] * vr[j];
          } else {
            for (int64_t j = 0; j < Wo; ++j) orow[j] += A[j] * vr[j * stride];
          }
        }
      }
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k_pad,
                   const at::Tensor& v_pad, const at::Tensor& bias, const at::Tensor& lse,
                   int64_t kernel, int64_t stride, at::Tensor& grad_q, at::Tensor& grad_k,
                   at::Tensor& grad_v) {
  const int64_t BN = q.size(0), d = q.size(1), Ho = q.size(2), Wo = q.size(3);
  const int64_t Hp = k_pad.size(2), Wp = k_pad.size(3), K2 = kernel * kernel;
  const T* gp = grad_out.data_ptr<T>();
  const T* qp = q.data_ptr<T>();
  const T* kp = k_pad.data_ptr<T>();
  const T* vp = v_pad.data_ptr<T>();
  const T* bp = bias.defined() ? bias.data_ptr<T>() : nullptr;
  const T* lp = lse.data_ptr<T>();
  T* gq = grad_q.data_ptr<T>();
  T* gk = grad_k.data_ptr<T>();
  T* gv = grad_v.data_ptr<T>();
  const int64_t qplane = Ho * Wo, kplane = Hp * Wp;
  const int64_t s = stride;
  // Keys and values of neighbouring rows overlap: one task per plane, no write races.
  at::parallel_for(0, BN, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> a(K2 * Wo), da(K2 * Wo), D(Wo);
    for (int64_t bn = begin; bn < end; ++bn) {
      Plane<T> P{qp + bn * d * qplane, kp + bn * d * kplane, vp + bn * d * kplane, bp,
                 d, Ho, Wo, Hp, Wp, kernel, stride};
      const T* G = gp + bn * d * qplane;
      T* GQ = gq + bn * d * qplane;
      T* GK = gk + bn * d * kplane;
      T* GV = gv + bn * d * kplane;
      for (int64_t i = 0; i < Ho; ++i) {
        // Attention weights from the saved log-sum-exp.
        row_logits(P, i, a.data());
        const T* l = lp + bn * qplane + i * Wo;
        for (int64_t p = 0; p < K2; ++p) {
          T* __restrict__ A = a.data() + p * Wo;
#pragma omp simd
          for (int64_t j = 0; j < Wo; ++j) A[j] = std::exp(A[j] - l[j]);
        }
        // dA[p, j] = sum_c g[c, j] v[c, p, j];  dV[c, p, j] += a[p, j] g[c, j].
        for (int64_t x = 0; x < K2 * Wo; ++x) da[x] = T(0);
        for (int64_t c = 0; c < d; ++c) {
          const T* __restrict__ grow = G + c * qplane + i * Wo;
          for (int64_t p = 0; p < K2; ++p) {
            const int64_t oy = p / kernel, ox = p % kernel;
            const int64_t off = c * kplane + (i * s + oy) * Wp + ox;
            const T* __restrict__ vr = P.v + off;
            T* __restrict__ gvr = GV + off;
            const T* __restrict__ A = a.data() + p * Wo;
            T* __restrict__ DA = da.data() + p * Wo;
            if (s == 1) {
#pragma omp simd
              for (int64_t j = 0; j < Wo; ++j) {
                DA[j] += grow[j] * vr[j];
                gvr[j] += A[j] * grow[j];
              }
            } else {
              for (int64_t j = 0; j < Wo; ++j) {
                DA[j] += grow[j] * vr[j * s];
                gvr[j * s] += A[j] * grow[j];
              }
            }
          }
        }
        // Softmax backward: dlogit = a * (dA - sum_p a dA).
        for (int64_t j = 0; j < Wo; ++j) D[j] = T(0);
        for (int64_t p = 0; p < K2; ++p) {
          const T* A = a.data() + p * Wo;
          const T* DA = da.data() + p * Wo;
          for (int64_t j = 0; j < Wo; ++j) D[j] += A[j] * DA[j];
        }
        for (int64_t p = 0; p < K2; ++p) {
          const T* A = a.data() + p * Wo;
          T* DA = da.data() + p * Wo;
          for (int64_t j = 0; j < Wo; ++j) DA[j] = A[j] * (DA[j] - D[j]);
        }
        // dq[c, j] = sum_p dl[p, j] k[c, p, j];  dK[c, p, j] += dl[p, j] q[c, j].
        for (int64_t c = 0; c < d; ++c) {
          const T* __restrict__ qr = P.q + c * qplane + i * Wo;
          T* __restrict__ gqr = GQ + c * qplane + i * Wo;
          for (int64_t p = 0; p < K2; ++p) {
            const int64_t oy = p / kernel, ox = p % kernel;
            const int64_t off = c * kplane + (i * s + oy) * Wp + ox;
            const T* __restrict__ kr = P.k + off;
            T* __restrict__ gkr = GK + off;
            const T* __restrict__ DL = da.data() + p * Wo;
            if (s == 1) {
#pragma omp simd
              for (int64_t j = 0; j < Wo; ++j) {
                gqr[j] += DL[j] * kr[j];
                gkr[j] += DL[j] * qr[j];
              }
            } else {
              for (int64_t j = 0; j < Wo; ++j) {
                gqr[j] += DL[j] * kr[j * s];
                gkr[j * s] += DL[j] * qr[j];
              }
            }
          }
        }
      }
    }
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k_pad, const at::Tensor& v_pad,
                  const at::Tensor& bias, int64_t kernel, int64_t stride) {
  TORCH_CHECK(q.device().is_cpu(), "local_attention_cpu: tensors must be on the CPU");
  TORCH_CHECK(q.dim() == 4 && k_pad.dim() == 4 && v_pad.dim() == 4,
              "local_attention_cpu: q, k_pad, v_pad must be (BN, d, H, W)");
  TORCH_CHECK(q.is_contiguous() && k_pad.is_contiguous() && v_pad.is_contiguous(),
              "local_attention_cpu: inputs must be contiguous");
  TORCH_CHECK(k_pad.sizes() == v_pad.sizes(), "local_attention_cpu: k_pad and v_pad differ");
  TORCH_CHECK(q.scalar_type() == k_pad.scalar_type() && q.scalar_type() == v_pad.scalar_type(),
              "local_attention_cpu: dtypes differ");
  TORCH_CHECK((q.size(2) - 1) * stride + kernel <= k_pad.size(2) &&
                  (q.size(3) - 1) * stride + kernel <= k_pad.size(3),
              "local_attention_cpu: padded maps too small for the output size");
  if (bias.defined()) {
    TORCH_CHECK(bias.is_contiguous() && bias.scalar_type() == q.scalar_type() &&
                    bias.size(0) == kernel * kernel && bias.size(1) == q.size(2) &&
                    bias.size(2) == q.size(3),
                "local_attention_cpu: bias must be contiguous (K2, Ho, Wo) of q's dtype");
  }
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k_pad,
                                const at::Tensor& v_pad, const c10::optional<at::Tensor>& bias,
                                int64_t kernel, int64_t stride) {
  at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  check_inputs(q, k_pad, v_pad, b, kernel, stride);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(3)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "local_attention_cpu_forward", [&] {
    forward_impl<scalar_t>(q, k_pad, v_pad, b, kernel, stride, out, lse);
  });
  return {out, lse};
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q,
                                 const at::Tensor& k_pad, const at::Tensor& v_pad,
                                 const c10::optional<at::Tensor>& bias, const at::Tensor& lse,
                                 int64_t kernel, int64_t stride) {
  at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  check_inputs(q, k_pad, v_pad, b, kernel, stride);
  at::Tensor g = grad_out.contiguous();
  at::Tensor grad_q = at::zeros_like(q);
  at::Tensor grad_k = at::zeros_like(k_pad);
  at::Tensor grad_v = at::zeros_like(v_pad);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "local_attention_cpu_backward", [&] {
    backward_impl<scalar_t>(g, q, k_pad, v_pad, b, lse, kernel, stride, grad_q, grad_k, grad_v);
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused local attention forward (CPU)");
  m.def("backward", &backward, "fused local attention backward (CPU)");
}
