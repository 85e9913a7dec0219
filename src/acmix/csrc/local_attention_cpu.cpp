// Fused local (sliding-window) dot-product attention for CPU: forward and backward.
//
// Reads queries, keys and values straight from the fused projection
// qkv (B, 3C, H, W), channel which * C + head * d + j, and the positional
// encoding pe (d, H, W). For query pixel (i, j) and window position
// p = (oy, ox) the key pixel is (i + oy - r, j + ox - r), r = k // 2:
//   reflect mode: out-of-image coordinates are reflected (border keys can
//                 appear twice and then count twice, as in the authors' code);
//   zeros mode:   out-of-image keys are excluded from the softmax.
// logit = scale * q_c . (k_n - pe_n)   (q_c . pe_c is constant over the window
// and cancels in the softmax). Stride 1 only: the caller takes every s-th
// query of the result for stride s (the same function, at full resolution).
//
// Per (batch, head) plane the keys and values are copied once into padded
// planes (a few hundred KiB, per thread); every inner loop then runs over a
// contiguous block of rows with one constant offset per window position. The
// forward returns the log-sum-exp; the backward recomputes the weights from it
// and writes the gradient of qkv in one buffer (pe's follows from the keys').

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

struct Geometry {
  int64_t B, N, d, H, W, kernel, r;
  bool zeros;        // masked zero padding (else reflection)
  int64_t row_step;  // process only rows 0, row_step, 2 row_step, ... (strided queries)
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

template <typename T>
struct Plane {
  const T* q;   // (d, H, W)
  const T* k;   // (d, H, W)
  const T* v;   // (d, H, W)
  const T* pe;  // (d, H, W) or nullptr
};

// The q, k, v planes of (batch, head) plane bn inside qkv (B, 3C, H, W).
template <typename T>
inline Plane<T> plane(const T* qkv, const T* pe, const Geometry& g, int64_t bn) {
  const int64_t b = bn / g.N, n = bn % g.N, HW = g.H * g.W, C = g.N * g.d;
  const T* base = qkv + (b * 3 * C + n * g.d) * HW;
  return {base, base + C * HW, base + 2 * C * HW, pe};
}

// ---------------------------------------------------------------------------
// Padded planes, flat row-major index spaces.
//
// Per (batch, head) plane the keys (k - pe) and values are copied once into
// padded planes of width Wp = W + 2r, and the scaled queries into a plane of
// the same width. Then for window position p = (oy, ox) the key of query
// (i, j) sits at flat index (i + oy) * Wp + j + ox = x + oy * Wp + ox with
// x = i * Wp + j: one constant offset per p. Every inner loop runs over a
// contiguous block of rows (no border cases); the 2r extra columns per row
// are computed and ignored (masked to weight 0 in the backward).
// ---------------------------------------------------------------------------

template <typename T>
struct PaddedPlanes {
  int64_t Hp, Wp;
  // q: (d, H * Wp) scaled; k, v: (d, Hp * Wp) plus Wp elements of slack: the
  // extra columns of the last row read (and, in backward, add zeros to) up to
  // 2r elements past the last plane.
  std::vector<T> q, k, v;
};

template <typename T>
void build_planes(const Plane<T>& P, const Geometry& g, T scale, PaddedPlanes<T>& B) {
  const int64_t HW = g.H * g.W, Hp = B.Hp, Wp = B.Wp, r = g.r;
  for (int64_t c = 0; c < g.d; ++c) {
    const T* qs = P.q + c * HW;
    T* qd = B.q.data() + c * g.H * Wp;
    for (int64_t i = 0; i < g.H; ++i) {
      for (int64_t j = 0; j < g.W; ++j) qd[i * Wp + j] = qs[i * g.W + j] * scale;
      for (int64_t j = g.W; j < Wp; ++j) qd[i * Wp + j] = T(0);
    }
    const T* ks = P.k + c * HW;
    const T* vs = P.v + c * HW;
    const T* ps = P.pe ? P.pe + c * HW : nullptr;
    T* kd = B.k.data() + c * Hp * Wp;
    T* vd = B.v.data() + c * Hp * Wp;
    for (int64_t yp = 0; yp < Hp; ++yp) {
      const int64_t y = source(yp - r, g.H, g.zeros);
      for (int64_t xp = 0; xp < Wp; ++xp) {
        const int64_t x = source(xp - r, g.W, g.zeros);
        const int64_t o = yp * Wp + xp;
        if (y < 0 || x < 0) {
          kd[o] = T(0);
          vd[o] = T(0);
        } else {
          kd[o] = ks[y * g.W + x] - (ps ? ps[y * g.W + x] : T(0));
          vd[o] = vs[y * g.W + x];
        }
      }
    }
  }
}

// Logits of rows [i0, i1) into L[p * n + x], x = (i - i0) * Wp + j, n = (i1 - i0) * Wp.
// Register-tiled logits for a compile-time kernel size K: for V consecutive
// positions and one window row oy, the K accumulators (one per ox) stay in
// registers across all d channels, so each channel costs one query load and K
// key loads for K vector FMAs, and L is written once. Positions [0, tiled) of
// the block are done here, the tail by the generic loop.
template <typename T, int K>
int64_t block_logits_tiled(const PaddedPlanes<T>& B, const Geometry& g, int64_t i0, int64_t n,
                           T* __restrict__ L) {
  constexpr int V = 64 / sizeof(T) * 2;  // two 64-byte vectors of positions
  const int64_t Wp = B.Wp, qs = g.H * Wp, ks = B.Hp * Wp;
  const int64_t tiled = n / V * V;
  for (int64_t x0 = 0; x0 < tiled; x0 += V) {
    for (int oy = 0; oy < K; ++oy) {
      T acc[K][V] = {};
      const T* qb = B.q.data() + i0 * Wp + x0;
      const T* kb = B.k.data() + (i0 + oy) * Wp + x0;
      for (int64_t c = 0; c < g.d; ++c) {
        const T* __restrict__ q = qb + c * qs;
        const T* __restrict__ k = kb + c * ks;
#pragma GCC unroll 8
        for (int ox = 0; ox < K; ++ox) {
#pragma omp simd
          for (int v = 0; v < V; ++v) acc[ox][v] += q[v] * k[v + ox];
        }
      }
      for (int ox = 0; ox < K; ++ox) {
        T* __restrict__ Lp = L + (oy * K + ox) * n + x0;
#pragma omp simd
        for (int v = 0; v < V; ++v) Lp[v] = acc[ox][v];
      }
    }
  }
  return tiled;
}

template <typename T>
void block_logits(const PaddedPlanes<T>& B, const Geometry& g, int64_t i0, int64_t i1,
                  T* __restrict__ L) {
  const int64_t K2 = g.kernel * g.kernel, Wp = B.Wp, n = (i1 - i0) * Wp;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  int64_t start = 0;  // positions before `start` were done by a tiled kernel
  switch (g.kernel) {
    case 3: start = block_logits_tiled<T, 3>(B, g, i0, n, L); break;
    case 5: start = block_logits_tiled<T, 5>(B, g, i0, n, L); break;
    case 7: start = block_logits_tiled<T, 7>(B, g, i0, n, L); break;
    default: break;
  }
  for (int64_t p = 0; p < K2; ++p) {
    const int64_t oy = p / g.kernel, ox = p % g.kernel;
    T* __restrict__ Lp = L + p * n;
    for (int64_t x = start; x < n; ++x) Lp[x] = T(0);
    const int64_t qs = g.H * Wp, ks = B.Hp * Wp;  // channel strides
    int64_t c = 0;
    for (; c + 4 <= g.d; c += 4) {  // four channels per pass: a quarter of the L traffic
      const T* __restrict__ q = B.q.data() + c * qs + i0 * Wp;
      const T* __restrict__ k = B.k.data() + c * ks + (i0 + oy) * Wp + ox;
#pragma omp simd
      for (int64_t x = start; x < n; ++x)
        Lp[x] += q[x] * k[x] + q[x + qs] * k[x + ks] + q[x + 2 * qs] * k[x + 2 * ks] +
                 q[x + 3 * qs] * k[x + 3 * ks];
    }
    for (; c < g.d; ++c) {
      const T* __restrict__ q = B.q.data() + c * qs + i0 * Wp;
      const T* __restrict__ k = B.k.data() + c * ks + (i0 + oy) * Wp + ox;
#pragma omp simd
      for (int64_t x = start; x < n; ++x) Lp[x] += q[x] * k[x];
    }
    if (g.zeros) {  // out-of-image keys leave the softmax
      for (int64_t i = i0; i < i1; ++i) {
        T* row = Lp + (i - i0) * Wp;
        const int64_t y = i + oy - g.r;
        if (y < 0 || y >= g.H) {
          for (int64_t j = 0; j < Wp; ++j) row[j] = neg_inf;
          continue;
        }
        for (int64_t j = 0; j < g.W; ++j) {
          const int64_t xx = j + ox - g.r;
          if (xx < 0 || xx >= g.W) row[j] = neg_inf;
        }
      }
    }
  }
}

template <typename T>
void forward_s1(const T* qkv, const T* pe, const Geometry& g, T scale, T* out, T* lse) {
  const int64_t K2 = g.kernel * g.kernel, HW = g.H * g.W;
  const int64_t Wp = g.W + 2 * g.r, Hp = g.H + 2 * g.r;
  // Rows per block: keep the K2 logit rows of a block within ~256 KiB (one row when
  // only every row_step-th row is wanted).
  const int64_t R = g.row_step > 1
                        ? 1
                        : std::max<int64_t>(1, std::min<int64_t>(g.H, (1 << 16) / (K2 * Wp)));
  const int64_t advance = g.row_step > 1 ? g.row_step : R;
  at::parallel_for(0, g.B * g.N, 1, [&](int64_t begin, int64_t end) {
    PaddedPlanes<T> B{Hp, Wp, std::vector<T>(g.d * g.H * Wp), std::vector<T>(g.d * Hp * Wp + Wp),
                      std::vector<T>(g.d * Hp * Wp + Wp)};
    std::vector<T> L(K2 * R * Wp), mx(R * Wp), sum(R * Wp), acc(R * Wp);
    for (int64_t bn = begin; bn < end; ++bn) {
      build_planes(plane(qkv, pe, g, bn), g, scale, B);
      for (int64_t i0 = 0; i0 < g.H; i0 += advance) {
        const int64_t i1 = std::min(g.H, i0 + R), n = (i1 - i0) * Wp;
        block_logits(B, g, i0, i1, L.data());
        // Softmax over p, vectorised over the block.
        for (int64_t x = 0; x < n; ++x) mx[x] = -std::numeric_limits<T>::infinity();
        for (int64_t p = 0; p < K2; ++p) {
          const T* Lp = L.data() + p * n;
          for (int64_t x = 0; x < n; ++x) mx[x] = Lp[x] > mx[x] ? Lp[x] : mx[x];
        }
        for (int64_t x = 0; x < n; ++x) sum[x] = T(0);
        for (int64_t p = 0; p < K2; ++p) {
          T* __restrict__ Lp = L.data() + p * n;
#pragma omp simd
          for (int64_t x = 0; x < n; ++x) Lp[x] = std::exp(Lp[x] - mx[x]);
          for (int64_t x = 0; x < n; ++x) sum[x] += Lp[x];
        }
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = 0; j < g.W; ++j) {
            const int64_t x = (i - i0) * Wp + j;
            lse[bn * HW + i * g.W + j] = mx[x] + std::log(sum[x]);
          }
        for (int64_t x = 0; x < n; ++x) sum[x] = T(1) / sum[x];
        for (int64_t c = 0; c < g.d; ++c) {
          for (int64_t x = 0; x < n; ++x) acc[x] = T(0);
          T* __restrict__ ac = acc.data();
          const T* vc = B.v.data() + c * Hp * Wp + i0 * Wp;
          int64_t p = 0;
          for (; p + 4 <= K2; p += 4) {  // four window positions per pass
            const T* __restrict__ a = L.data() + p * n;
            const T* __restrict__ v0 = vc + (p / g.kernel) * Wp + p % g.kernel;
            const T* __restrict__ v1 = vc + ((p + 1) / g.kernel) * Wp + (p + 1) % g.kernel;
            const T* __restrict__ v2 = vc + ((p + 2) / g.kernel) * Wp + (p + 2) % g.kernel;
            const T* __restrict__ v3 = vc + ((p + 3) / g.kernel) * Wp + (p + 3) % g.kernel;
#pragma omp simd
            for (int64_t x = 0; x < n; ++x)
              ac[x] += a[x] * v0[x] + a[x + n] * v1[x] + a[x + 2 * n] * v2[x] +
                       a[x + 3 * n] * v3[x];
          }
          for (; p < K2; ++p) {
            const T* __restrict__ a = L.data() + p * n;
            const T* __restrict__ v = vc + (p / g.kernel) * Wp + p % g.kernel;
#pragma omp simd
            for (int64_t x = 0; x < n; ++x) ac[x] += a[x] * v[x];
          }
          T* o = out + (bn * g.d + c) * HW;
          for (int64_t i = i0; i < i1; ++i)
            for (int64_t j = 0; j < g.W; ++j)
              o[i * g.W + j] = acc[(i - i0) * Wp + j] * sum[(i - i0) * Wp + j];
        }
      }
    }
  });
}

template <typename T>
void backward_s1(const T* grad_out, const T* qkv, const T* pe, const T* lse, const Geometry& g,
                 T scale, T* grad_qkv) {
  const int64_t K2 = g.kernel * g.kernel, HW = g.H * g.W, C = g.N * g.d;
  const int64_t Wp = g.W + 2 * g.r, Hp = g.H + 2 * g.r;
  // Rows per block: keep the K2 logit rows of a block within ~256 KiB (one row when
  // only every row_step-th row is wanted).
  const int64_t R = g.row_step > 1
                        ? 1
                        : std::max<int64_t>(1, std::min<int64_t>(g.H, (1 << 16) / (K2 * Wp)));
  const int64_t advance = g.row_step > 1 ? g.row_step : R;
  at::parallel_for(0, g.B * g.N, 1, [&](int64_t begin, int64_t end) {
    PaddedPlanes<T> B{Hp, Wp, std::vector<T>(g.d * g.H * Wp), std::vector<T>(g.d * Hp * Wp + Wp),
                      std::vector<T>(g.d * Hp * Wp + Wp)};
    std::vector<T> gk(g.d * Hp * Wp + Wp), gv(g.d * Hp * Wp + Wp), gq(g.d * g.H * Wp), gp(g.d * g.H * Wp);
    std::vector<T> A(K2 * R * Wp), dA(K2 * R * Wp), D(R * Wp), l(R * Wp);
    for (int64_t bn = begin; bn < end; ++bn) {
      build_planes(plane(qkv, pe, g, bn), g, scale, B);
      std::fill(gk.begin(), gk.end(), T(0));
      std::fill(gv.begin(), gv.end(), T(0));
      std::fill(gq.begin(), gq.end(), T(0));
      // The output gradient in the padded-width layout (extra columns 0).
      for (int64_t c = 0; c < g.d; ++c)
        for (int64_t i = 0; i < g.H; ++i)
          for (int64_t j = 0; j < Wp; ++j)
            gp[c * g.H * Wp + i * Wp + j] =
                j < g.W ? grad_out[(bn * g.d + c) * HW + i * g.W + j] : T(0);
      for (int64_t i0 = 0; i0 < g.H; i0 += advance) {
        const int64_t i1 = std::min(g.H, i0 + R), n = (i1 - i0) * Wp;
        block_logits(B, g, i0, i1, A.data());
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = 0; j < Wp; ++j)
            l[(i - i0) * Wp + j] = j < g.W ? lse[bn * HW + i * g.W + j]
                                           : std::numeric_limits<T>::infinity();
        for (int64_t p = 0; p < K2; ++p) {  // weights; extra columns get exp(-inf) = 0
          T* __restrict__ a = A.data() + p * n;
#pragma omp simd
          for (int64_t x = 0; x < n; ++x) a[x] = std::exp(a[x] - l[x]);
        }
        std::fill(dA.begin(), dA.begin() + K2 * n, T(0));
        for (int64_t c = 0; c < g.d; ++c) {
          const T* __restrict__ go = gp.data() + c * g.H * Wp + i0 * Wp;
          for (int64_t p = 0; p < K2; ++p) {
            const int64_t off = c * Hp * Wp + (i0 + p / g.kernel) * Wp + p % g.kernel;
            const T* __restrict__ v = B.v.data() + off;
            T* __restrict__ gvp = gv.data() + off;
            const T* __restrict__ a = A.data() + p * n;
            T* __restrict__ da = dA.data() + p * n;
#pragma omp simd
            for (int64_t x = 0; x < n; ++x) {
              da[x] += go[x] * v[x];
              gvp[x] += a[x] * go[x];
            }
          }
        }
        for (int64_t x = 0; x < n; ++x) D[x] = T(0);
        for (int64_t p = 0; p < K2; ++p) {
          const T* a = A.data() + p * n;
          const T* da = dA.data() + p * n;
          for (int64_t x = 0; x < n; ++x) D[x] += a[x] * da[x];
        }
        for (int64_t p = 0; p < K2; ++p) {
          const T* a = A.data() + p * n;
          T* da = dA.data() + p * n;
          for (int64_t x = 0; x < n; ++x) da[x] = a[x] * (da[x] - D[x]);
        }
        for (int64_t c = 0; c < g.d; ++c) {
          const T* __restrict__ q = B.q.data() + c * g.H * Wp + i0 * Wp;  // scaled
          T* __restrict__ gqc = gq.data() + c * g.H * Wp + i0 * Wp;
          for (int64_t p = 0; p < K2; ++p) {
            const int64_t off = c * Hp * Wp + (i0 + p / g.kernel) * Wp + p % g.kernel;
            const T* __restrict__ k = B.k.data() + off;
            T* __restrict__ gkp = gk.data() + off;
            const T* __restrict__ dl = dA.data() + p * n;
#pragma omp simd
            for (int64_t x = 0; x < n; ++x) {
              gqc[x] += dl[x] * k[x];
              gkp[x] += dl[x] * q[x];
            }
          }
        }
      }
      // Fold the padded gradients back onto the image (reflection adds the mirrored
      // border onto the interior; masked zero padding drops it), q's unpadded.
      const int64_t b = bn / g.N, nh = bn % g.N;
      T* GQ = grad_qkv + (b * 3 * C + nh * g.d) * HW;
      T* GK = GQ + C * HW;
      T* GV = GQ + 2 * C * HW;
      for (int64_t c = 0; c < g.d; ++c) {
        for (int64_t i = 0; i < g.H; ++i)
          for (int64_t j = 0; j < g.W; ++j)
            GQ[c * HW + i * g.W + j] = gq[c * g.H * Wp + i * Wp + j] * scale;
        for (int64_t yp = 0; yp < Hp; ++yp) {
          const int64_t y = source(yp - g.r, g.H, g.zeros);
          if (y < 0) continue;
          for (int64_t xp = 0; xp < Wp; ++xp) {
            const int64_t x = source(xp - g.r, g.W, g.zeros);
            if (x < 0) continue;
            GK[c * HW + y * g.W + x] += gk[c * Hp * Wp + yp * Wp + xp];
            GV[c * HW + y * g.W + x] += gv[c * Hp * Wp + yp * Wp + xp];
          }
        }
      }
    }
  });
}

Geometry geometry(const at::Tensor& qkv, int64_t heads, int64_t kernel, bool zeros,
                  int64_t row_step) {
  TORCH_CHECK(qkv.device().is_cpu(), "local_attention_cpu: tensors must be on the CPU");
  TORCH_CHECK(qkv.dim() == 4 && qkv.is_contiguous(),
              "local_attention_cpu: qkv must be a contiguous (B, 3C, H, W) tensor");
  TORCH_CHECK(qkv.size(1) % (3 * heads) == 0, "local_attention_cpu: 3C not divisible by 3 heads");
  TORCH_CHECK(kernel % 2 == 1 && kernel >= 1, "local_attention_cpu: kernel must be odd");
  TORCH_CHECK(row_step >= 1, "local_attention_cpu: row_step must be >= 1");
  Geometry g;
  g.B = qkv.size(0);
  g.N = heads;
  g.d = qkv.size(1) / (3 * heads);
  g.H = qkv.size(2);
  g.W = qkv.size(3);
  g.kernel = kernel;
  g.r = kernel / 2;
  g.zeros = zeros;
  g.row_step = row_step;
  TORCH_CHECK(zeros || (g.r < g.H && g.r < g.W),
              "local_attention_cpu: map too small for reflection padding");
  return g;
}

std::vector<at::Tensor> forward(const at::Tensor& qkv, const c10::optional<at::Tensor>& pe,
                                int64_t heads, int64_t kernel, bool zeros,
                                double scale, int64_t row_step) {
  const Geometry g = geometry(qkv, heads, kernel, zeros, row_step);
  if (pe.has_value()) {
    TORCH_CHECK(pe->is_contiguous() && pe->numel() == g.d * g.H * g.W &&
                    pe->scalar_type() == qkv.scalar_type(),
                "local_attention_cpu: pe must be a contiguous (d, H, W) tensor of qkv's dtype");
  }
  // Zeros: with row_step > 1 the rows in between are not computed.
  at::Tensor out = at::zeros({g.B, g.N * g.d, g.H, g.W}, qkv.options());
  at::Tensor lse = at::empty({g.B, g.N, g.H, g.W}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "local_attention_cpu_forward", [&] {
    forward_s1<scalar_t>(qkv.data_ptr<scalar_t>(),
                           pe.has_value() ? pe->data_ptr<scalar_t>() : nullptr, g,
                           static_cast<scalar_t>(scale), out.data_ptr<scalar_t>(),
                           lse.data_ptr<scalar_t>());
  });
  return {out, lse};
}

at::Tensor backward(const at::Tensor& grad_out, const at::Tensor& qkv,
                    const c10::optional<at::Tensor>& pe, const at::Tensor& lse, int64_t heads,
                    int64_t kernel, bool zeros, double scale, int64_t row_step) {
  const Geometry g = geometry(qkv, heads, kernel, zeros, row_step);
  at::Tensor go = grad_out.contiguous();
  at::Tensor grad_qkv = at::zeros_like(qkv);
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "local_attention_cpu_backward", [&] {
    backward_s1<scalar_t>(go.data_ptr<scalar_t>(), qkv.data_ptr<scalar_t>(),
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
