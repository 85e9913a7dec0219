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
// and cancels in the softmax). Stride s: the queries are the pixels (s i, s j);
// only their rows are computed (at full width), the output is (ceil(H/s), ceil(W/s)).
//
// Layout. Per (batch, head) plane the keys (k - pe) and values are copied once
// into padded planes of width Wp = W + 2r, and the scaled queries into a plane
// of the same width. Query (i, j) has the flat index x = i * Wp + j and its key
// at window position p the flat index x + off[p], off[p] = oy * Wp + ox: one
// constant offset per p, so every loop runs over a contiguous block of rows
// with no border cases (the 2r extra columns per row are computed and dropped).
//
// All the work is four register-tiled primitives over those flat index spaces
// (logits, aggregation, and, in the backward, the same two on gradients plus
// their transposes), a vectorised exp and a few elementwise passes. The
// forward returns the log-sum-exp; the backward recomputes the weights from it.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// Elements per tile column: one 64-byte vector (AVX-512) or two 32-byte ones.
template <typename T>
constexpr int kLanes = 64 / sizeof(T);

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Per-thread scratch that outlives the call: refilled (n zeros) on every use but
// reallocated only when it must grow, so repeated calls do not page-fault fresh
// memory in (on the development VMs that cost more than the kernel's arithmetic).
template <typename T>
std::vector<T>& scratch(int slot, int64_t n) {
  thread_local std::vector<T> buffers[12];
  std::vector<T>& b = buffers[slot];
  b.assign(n, T(0));
  return b;
}

// ---------------------------------------------------------------------------
// exp. float: Cephes' single-precision range reduction and polynomial (about
// 1 ulp), written so the compiler vectorises it; double: std::exp.
// ---------------------------------------------------------------------------

inline float exp_approx(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float t = xc * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float s = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  return x < -87.0f ? 0.0f : p * s;
}

// a[x] = exp(a[x] - m[x]) for x in [0, n).
inline void exp_sub(float* __restrict__ a, const float* __restrict__ m, int64_t n) {
#pragma omp simd
  for (int64_t x = 0; x < n; ++x) a[x] = exp_approx(a[x] - m[x]);
}
inline void exp_sub(double* __restrict__ a, const double* __restrict__ m, int64_t n) {
  for (int64_t x = 0; x < n; ++x) a[x] = std::exp(a[x] - m[x]);
}

// ---------------------------------------------------------------------------
// Register-tiled primitives. Every pointer array holds one pointer per window
// position; tiles cover kLanes * U consecutive flat positions, so the caller
// rounds n up and gives every buffer that much slack.
// ---------------------------------------------------------------------------

// Dots: out[p][x] = sum_c a[c * sa + x] * b[p][c * sb + x] for p in [p0, p0 + M).
// M accumulator tiles stay in registers across all channels: per channel one
// load of a and M loads of b for M vector FMAs.
template <typename T, int M>
void dots_tile(const T* a, int64_t sa, const T* const* b, int64_t sb, int64_t d, int64_t n,
               T* out, int64_t so) {
  constexpr int V = kLanes<T>;
  for (int64_t x0 = 0; x0 < n; x0 += V) {
    T acc[M][V] = {};
    for (int64_t c = 0; c < d; ++c) {
      const T* __restrict__ ac = a + c * sa + x0;
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) {
        const T* __restrict__ bc = b[m] + c * sb + x0;
#pragma omp simd
        for (int v = 0; v < V; ++v) acc[m][v] += ac[v] * bc[v];
      }
    }
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
#pragma omp simd
      for (int v = 0; v < V; ++v) out[m * so + x0 + v] = acc[m][v];
    }
  }
}

template <typename T>
void dots(const T* a, int64_t sa, const T* const* b, int64_t sb, int64_t d, int64_t n,
          int64_t K2, T* out, int64_t so) {
  constexpr int64_t M = 7;
  int64_t p = 0;
  for (; p + M <= K2; p += M) dots_tile<T, M>(a, sa, b + p, sb, d, n, out + p * so, so);
  const T* const* bp = b + p;
  T* op = out + p * so;
  switch (K2 - p) {
    case 1: dots_tile<T, 1>(a, sa, bp, sb, d, n, op, so); break;
    case 2: dots_tile<T, 2>(a, sa, bp, sb, d, n, op, so); break;
    case 3: dots_tile<T, 3>(a, sa, bp, sb, d, n, op, so); break;
    case 4: dots_tile<T, 4>(a, sa, bp, sb, d, n, op, so); break;
    case 5: dots_tile<T, 5>(a, sa, bp, sb, d, n, op, so); break;
    case 6: dots_tile<T, 6>(a, sa, bp, sb, d, n, op, so); break;
    default: break;
  }
}

// Weighted sums: out[c * so + x] (+)= sum_p w[p][x] * b[p][c * sb + x], channels
// [c0, c0 + CT). CT accumulator tiles stay in registers across all window
// positions: per position one load of w and CT loads of b for CT vector FMAs.
template <typename T, int CT, bool kAccumulate>
void wsum_tile(const T* const* w, const T* const* b, int64_t sb, int64_t K2, int64_t c0,
               int64_t n, T* out, int64_t so) {
  constexpr int V = kLanes<T>;
  for (int64_t x0 = 0; x0 < n; x0 += V) {
    T acc[CT][V] = {};
    for (int64_t p = 0; p < K2; ++p) {
      const T* __restrict__ wp = w[p] + x0;
      const T* __restrict__ bp = b[p] + c0 * sb + x0;
#pragma GCC unroll 16
      for (int c = 0; c < CT; ++c) {
#pragma omp simd
        for (int v = 0; v < V; ++v) acc[c][v] += wp[v] * bp[c * sb + v];
      }
    }
#pragma GCC unroll 16
    for (int c = 0; c < CT; ++c) {
      T* __restrict__ o = out + (c0 + c) * so + x0;
#pragma omp simd
      for (int v = 0; v < V; ++v) o[v] = kAccumulate ? o[v] + acc[c][v] : acc[c][v];
    }
  }
}

template <typename T, bool kAccumulate>
void wsum(const T* const* w, const T* const* b, int64_t sb, int64_t K2, int64_t d, int64_t n,
          T* out, int64_t so) {
  constexpr int64_t CT = 8;
  int64_t c = 0;
  for (; c + CT <= d; c += CT) wsum_tile<T, CT, kAccumulate>(w, b, sb, K2, c, n, out, so);
  for (; c < d; ++c) wsum_tile<T, 1, kAccumulate>(w, b, sb, K2, c, n, out, so);
}

// ---------------------------------------------------------------------------
// Per-plane geometry and buffers.
// ---------------------------------------------------------------------------

struct Geometry {
  int64_t B, N, d, H, W, kernel, r;
  bool zeros;        // masked zero padding (else reflection)
  int64_t stride;  // queries at (stride * i, stride * j)
  int64_t Ho, Wo;  // output size: ceil(H / stride), ceil(W / stride)
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

// Flat index spaces of one (batch, head) plane and its scratch buffers.
template <typename T>
struct Workspace {
  int64_t H, W, d, K2, r, Wp, Hp;
  int64_t R;      // query rows per block
  int64_t advance;  // rows from one block to the next
  int64_t slack;  // lanes of slack after every channel (tiles overrun n by < V)
  int64_t M;      // margin before / after a weight row: the largest window offset, rounded
  int64_t sq;     // channel stride of query-layout planes (H rows of Wp) plus slack
  int64_t sk;     // channel stride of key-layout planes (Hp rows of Wp) plus slack
  int64_t sL;     // stride of one weight row: margin, R * Wp (rounded), margin
  std::vector<int64_t> off;  // window offsets
  // The query-layout planes have a front margin of M elements: the transposed
  // sums read up to M before a block (where the weights are zero).
  std::vector<T>& q;
  std::vector<T>& k;
  std::vector<T>& v;

  explicit Workspace(const Geometry& g)
      : H(g.H), W(g.W), d(g.d), K2(g.kernel * g.kernel), r(g.r), q(scratch<T>(0, 0)),
        k(scratch<T>(1, 0)), v(scratch<T>(2, 0)) {
    constexpr int64_t V = kLanes<T>;
    Wp = W + 2 * r;
    Hp = H + 2 * r;
    // Keep a block's K2 weight rows within ~256 KiB. Strided: one block per
    // query row (only every stride-th row has queries).
    R = g.stride > 1
            ? 1
            : std::max<int64_t>(1, std::min<int64_t>(H, (int64_t(1) << 16) / (K2 * Wp)));
    advance = g.stride > 1 ? g.stride : R;
    slack = 4 * V + 2 * r;
    M = round_up((g.kernel - 1) * Wp + (g.kernel - 1), V);
    sq = round_up(H * Wp + slack, V);
    sk = round_up(Hp * Wp + slack, V);
    sL = M + round_up(R * Wp, V) + M + V;
    off.resize(K2);
    for (int64_t p = 0; p < K2; ++p) off[p] = (p / g.kernel) * Wp + p % g.kernel;
    q.assign(M + d * sq + M, T(0));
    k.assign(d * sk, T(0));
    v.assign(d * sk, T(0));
  }

  T* qp() { return q.data() + M; }
};

template <typename T>
void build_planes(const T* qkv, const T* pe, const Geometry& g, int64_t bn, T scale,
                  Workspace<T>& S) {
  const int64_t b = bn / g.N, nh = bn % g.N, HW = g.H * g.W, C = g.N * g.d;
  const T* Q = qkv + (b * 3 * C + nh * g.d) * HW;
  const T* K = Q + C * HW;
  const T* Vv = Q + 2 * C * HW;
  const int64_t Wp = S.Wp, r = g.r;
  for (int64_t c = 0; c < g.d; ++c) {
    T* qd = S.qp() + c * S.sq;
    for (int64_t i = 0; i < g.H; ++i) {
      const T* qs = Q + c * HW + i * g.W;
      for (int64_t j = 0; j < g.W; ++j) qd[i * Wp + j] = qs[j] * scale;
      // columns [W, Wp) stay 0 from construction
    }
    const T* ks = K + c * HW;
    const T* vs = Vv + c * HW;
    const T* ps = pe ? pe + c * HW : nullptr;
    T* kd = S.k.data() + c * S.sk;
    T* vd = S.v.data() + c * S.sk;
    for (int64_t yp = 0; yp < S.Hp; ++yp) {
      T* __restrict__ kr = kd + yp * Wp;
      T* __restrict__ vr = vd + yp * Wp;
      const int64_t y = source(yp - r, g.H, g.zeros);
      if (y < 0) {
        std::fill(kr, kr + Wp, T(0));
        std::fill(vr, vr + Wp, T(0));
        continue;
      }
      const T* __restrict__ kin = ks + y * g.W;
      const T* __restrict__ vin = vs + y * g.W;
      if (ps) {
        const T* __restrict__ pin = ps + y * g.W;
#pragma omp simd
        for (int64_t j = 0; j < g.W; ++j) kr[r + j] = kin[j] - pin[j];
      } else {
        std::memcpy(kr + r, kin, g.W * sizeof(T));
      }
      std::memcpy(vr + r, vin, g.W * sizeof(T));
      for (int64_t e = 0; e < r; ++e) {  // the 2r border columns: copies of interior ones or 0
        for (const int64_t xp : {e, Wp - 1 - e}) {
          const int64_t x = source(xp - r, g.W, g.zeros);
          kr[xp] = x < 0 ? T(0) : kr[r + x];
          vr[xp] = x < 0 ? T(0) : vr[r + x];
        }
      }
    }
  }
}

// Logits of query rows [i0, i1) into L[p * sL + x], x in [0, nr).
template <typename T>
void block_logits(Workspace<T>& S, const Geometry& g, int64_t i0, int64_t i1, int64_t nr,
                  T* L, std::vector<const T*>& ptr) {
  const int64_t Wp = S.Wp, base = i0 * Wp;
  for (int64_t p = 0; p < S.K2; ++p) ptr[p] = S.k.data() + base + S.off[p];
  dots(S.qp() + base, S.sq, ptr.data(), S.sk, g.d, nr, S.K2, L, S.sL);
  if (!g.zeros) return;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t p = 0; p < S.K2; ++p) {  // out-of-image keys leave the softmax
    const int64_t oy = p / g.kernel, ox = p % g.kernel;
    for (int64_t i = i0; i < i1; ++i) {
      T* row = L + p * S.sL + (i - i0) * Wp;
      const int64_t y = i + oy - g.r;
      if (y < 0 || y >= g.H) {
        for (int64_t j = 0; j < g.W; ++j) row[j] = neg_inf;
        continue;
      }
      for (int64_t j = 0; j < g.W; ++j) {
        const int64_t xx = j + ox - g.r;
        if (xx < 0 || xx >= g.W) row[j] = neg_inf;
      }
    }
  }
}

template <typename T>
void forward_plane_loop(const T* qkv, const T* pe, const Geometry& g, T scale, T* out, T* lse) {
  const int64_t HW = g.H * g.W;
  at::parallel_for(0, g.B * g.N, 1, [&](int64_t begin, int64_t end) {
    Workspace<T> S(g);
    constexpr int64_t V = kLanes<T>;
    const int64_t Wp = S.Wp, K2 = S.K2, nmax = round_up(S.R * Wp, V) + V;
    std::vector<T>& Lbuf = scratch<T>(3, K2 * S.sL);
    std::vector<T>& mx = scratch<T>(4, nmax);
    std::vector<T>& sum = scratch<T>(5, nmax);
    std::vector<T>& acc = scratch<T>(6, g.d * nmax);
    std::vector<const T*> ptr(K2), wptr(K2);
    T* L = Lbuf.data() + S.M;
    for (int64_t p = 0; p < K2; ++p) wptr[p] = L + p * S.sL;
    for (int64_t bn = begin; bn < end; ++bn) {
      build_planes(qkv, pe, g, bn, scale, S);
      for (int64_t i0 = 0; i0 < g.H; i0 += S.advance) {
        const int64_t i1 = std::min(g.H, i0 + S.R), n = (i1 - i0) * Wp, nr = round_up(n, V);
        block_logits(S, g, i0, i1, nr, L, ptr);
        // Softmax over p, vectorised over the block.
        std::fill(mx.begin(), mx.begin() + nr, -std::numeric_limits<T>::infinity());
        for (int64_t p = 0; p < K2; ++p) {
          const T* __restrict__ Lp = L + p * S.sL;
          T* __restrict__ m = mx.data();
#pragma omp simd
          for (int64_t x = 0; x < nr; ++x) m[x] = Lp[x] > m[x] ? Lp[x] : m[x];
        }
        std::fill(sum.begin(), sum.begin() + nr, T(0));
        for (int64_t p = 0; p < K2; ++p) {
          T* __restrict__ Lp = L + p * S.sL;
          T* __restrict__ s = sum.data();
          exp_sub(Lp, mx.data(), nr);
#pragma omp simd
          for (int64_t x = 0; x < nr; ++x) s[x] += Lp[x];
        }
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = 0; j < g.W; ++j) {
            const int64_t x = (i - i0) * Wp + j;
            lse[bn * HW + i * g.W + j] = mx[x] + std::log(sum[x]);
          }
        // Unnormalised weighted sum of the values, then scaled by 1 / sum.
        for (int64_t p = 0; p < K2; ++p) ptr[p] = S.v.data() + i0 * Wp + S.off[p];
        wsum<T, false>(wptr.data(), ptr.data(), S.sk, K2, g.d, nr, acc.data(), nmax);
        for (int64_t c = 0; c < g.d; ++c) {
          T* o = out + (bn * g.d + c) * g.Ho * g.Wo;
          const T* a = acc.data() + c * nmax;
          for (int64_t i = i0; i < i1; ++i) {  // (the rows of a strided block are queries)
            T* orow = o + (i / g.stride) * g.Wo;
            for (int64_t j = 0; j < g.W; j += g.stride) {
              const int64_t x = (i - i0) * Wp + j;
              orow[j / g.stride] = a[x] / sum[x];
            }
          }
        }
      }
    }
  });
}

template <typename T>
double backward_plane_loop(const T* grad_out, const T* qkv, const T* pe, const T* lse,
                           const Geometry& g, T scale, T go_scale, T* grad_qkv,
                           T* grad_pe) {
  const int64_t HW = g.H * g.W, C = g.N * g.d;
  // Per-thread sums of D = sum_p A * dA = grad_out . out over all queries (the
  // gradient of a scale on the output, e.g. ACmix's alpha, for free).
  std::vector<double> dsum(at::get_num_threads(), 0.0);
  at::parallel_for(0, g.B * g.N, 1, [&](int64_t begin, int64_t end) {
    double& dsum_thread = dsum[at::get_thread_num()];
    const bool strided = g.stride > 1;  // one block per query row (see Workspace)
    Workspace<T> S(g);
    constexpr int64_t V = kLanes<T>;
    const int64_t Wp = S.Wp, K2 = S.K2, M = S.M, nmax = round_up(S.R * Wp, V) + V;
    // Padded-key-layout gradients, query-layout gradient and output gradient (the
    // latter with the same front margin as the queries).
    std::vector<T>& gk = scratch<T>(3, g.d * S.sk);
    std::vector<T>& gv = scratch<T>(4, g.d * S.sk);
    std::vector<T>& gq = scratch<T>(5, g.d * S.sq);
    std::vector<T>& gob = scratch<T>(6, M + g.d * S.sq + M);
    std::vector<T>& Abuf = scratch<T>(7, K2 * S.sL);
    std::vector<T>& dAbuf = scratch<T>(8, K2 * S.sL);
    std::vector<T>& D = scratch<T>(9, nmax);
    std::vector<T>& l = scratch<T>(10, nmax);
    std::vector<const T*> ptr(std::max(K2, 2 * g.kernel)), wptr(K2), wptr2(K2);
    T* A = Abuf.data() + M;
    T* dA = dAbuf.data() + M;
    T* go = gob.data() + M;
    for (int64_t bn = begin; bn < end; ++bn) {
      build_planes(qkv, pe, g, bn, scale, S);
      std::fill(gk.begin(), gk.end(), T(0));
      std::fill(gv.begin(), gv.end(), T(0));
      // Output gradient at the query pixels of the padded-width layout; every other
      // position stays 0. (go_scale is applied when the gradients are folded.)
      for (int64_t c = 0; c < g.d; ++c)
        for (int64_t io = 0; io < g.Ho; ++io) {
          const T* src = grad_out + ((bn * g.d + c) * g.Ho + io) * g.Wo;
          T* dst = go + c * S.sq + io * g.stride * Wp;
          for (int64_t jo = 0; jo < g.Wo; ++jo) dst[jo * g.stride] = src[jo];
        }
      for (int64_t i0 = 0; i0 < g.H; i0 += S.advance) {
        const int64_t i1 = std::min(g.H, i0 + S.R), n = (i1 - i0) * Wp, nr = round_up(n, V);
        const int64_t base = i0 * Wp;
        block_logits(S, g, i0, i1, nr, A, ptr);
        // Weights exp(logit - lse); 0 at extra columns, rows without queries and the
        // tile overrun (there l = +inf), and in the margins (never written).
        std::fill(l.begin(), l.begin() + nr, std::numeric_limits<T>::infinity());
        for (int64_t i = i0; i < i1; ++i) {
          if (i % g.stride != 0) continue;
          std::memcpy(l.data() + (i - i0) * Wp, lse + bn * HW + i * g.W, g.W * sizeof(T));
        }
        for (int64_t p = 0; p < K2; ++p) {
          exp_sub(A + p * S.sL, l.data(), nr);
          std::fill(A + p * S.sL + nr, A + p * S.sL + nr + M + V, T(0));
          std::fill(dA + p * S.sL + nr, dA + p * S.sL + nr + M + V, T(0));
        }
        // dA[p][x] = go . v at the key (the gradient of the weights).
        for (int64_t p = 0; p < K2; ++p) ptr[p] = S.v.data() + base + S.off[p];
        dots(go + base, S.sq, ptr.data(), S.sk, g.d, nr, K2, dA, S.sL);
        // Softmax backward: dlogit = A * (dA - sum_p A * dA), in place in dA.
        std::fill(D.begin(), D.begin() + nr, T(0));
        for (int64_t p = 0; p < K2; ++p) {
          const T* __restrict__ a = A + p * S.sL;
          const T* __restrict__ da = dA + p * S.sL;
          T* __restrict__ Dp = D.data();
#pragma omp simd
          for (int64_t x = 0; x < nr; ++x) Dp[x] += a[x] * da[x];
        }
        double dblock = 0.0;  // (zero at extra columns, overrun and non-query rows)
        for (int64_t x = 0; x < nr; ++x) dblock += D[x];
        dsum_thread += dblock;
        for (int64_t p = 0; p < K2; ++p) {
          const T* __restrict__ a = A + p * S.sL;
          T* __restrict__ da = dA + p * S.sL;
          const T* __restrict__ Dp = D.data();
#pragma omp simd
          for (int64_t x = 0; x < nr; ++x) da[x] = a[x] * (da[x] - Dp[x]);
        }
        // Queries: gq[c][x] = sum_p dlogit[p][x] * k[c][x + off[p]] (scaled below).
        for (int64_t p = 0; p < K2; ++p) {
          ptr[p] = S.k.data() + base + S.off[p];
          wptr[p] = dA + p * S.sL;
        }
        wsum<T, false>(wptr.data(), ptr.data(), S.sk, K2, g.d, nr, gq.data() + base, S.sq);
        if (strided) {
          // A single query row: gather per key row oy over its k window columns,
          //   gv[c][z] += sum_ox A[p][z - ox] * go[c][z - ox],  z = x + oy * Wp + ox,
          // gk likewise (zero weights outside [0, nr) again).
          const int64_t k = g.kernel, nzr = round_up(nr + k - 1, V);
          for (int64_t oy = 0; oy < k; ++oy) {
            for (int64_t ox = 0; ox < k; ++ox) {
              wptr[ox] = A + (oy * k + ox) * S.sL - ox;
              wptr2[ox] = dA + (oy * k + ox) * S.sL - ox;
              ptr[ox] = go + base - ox;
              ptr[k + ox] = S.qp() + base - ox;
            }
            const int64_t zb = base + oy * Wp;
            wsum<T, true>(wptr.data(), ptr.data(), S.sq, k, g.d, nzr, gv.data() + zb, S.sk);
            wsum<T, true>(wptr2.data(), ptr.data() + k, S.sq, k, g.d, nzr, gk.data() + zb, S.sk);
          }
          continue;
        }
        // Keys and values, gathered at each key z = x + off[p] of the block:
        //   gv[c][z] += sum_p A[p][z - off[p]] * go[c][z - off[p]]
        //   gk[c][z] += sum_p dlogit[p][z - off[p]] * q[c][z - off[p]]
        // (zero weights outside [0, nr) make the out-of-block terms vanish).
        const int64_t nz = round_up(nr + M, V);
        for (int64_t p = 0; p < K2; ++p) {
          wptr[p] = A + p * S.sL - S.off[p];
          wptr2[p] = dA + p * S.sL - S.off[p];
          ptr[p] = go + base - S.off[p];
        }
        wsum<T, true>(wptr.data(), ptr.data(), S.sq, K2, g.d, nz, gv.data() + base, S.sk);
        for (int64_t p = 0; p < K2; ++p) ptr[p] = S.qp() + base - S.off[p];
        wsum<T, true>(wptr2.data(), ptr.data(), S.sq, K2, g.d, nz, gk.data() + base, S.sk);
      }
      // Fold the padded gradients back onto the image: the interior is assigned
      // (every element of grad_qkv belongs to exactly one plane), then reflection
      // adds the mirrored border onto it (masked zero padding drops the border).
      const int64_t b = bn / g.N, nh = bn % g.N;
      T* GQ = grad_qkv + (b * 3 * C + nh * g.d) * HW;
      T* GK = GQ + C * HW;
      T* GV = GQ + 2 * C * HW;
      const T qs = scale * go_scale;
      for (int64_t c = 0; c < g.d; ++c) {
        T* __restrict__ gqc = GQ + c * HW;
        T* __restrict__ gkc = GK + c * HW;
        T* __restrict__ gvc = GV + c * HW;
        const T* gqs = gq.data() + c * S.sq;
        const T* gks = gk.data() + c * S.sk;
        const T* gvs = gv.data() + c * S.sk;
        for (int64_t i = 0; i < g.H; ++i) {
          const T* __restrict__ qr = gqs + i * Wp;
          const T* __restrict__ kr = gks + (i + g.r) * Wp + g.r;
          const T* __restrict__ vr = gvs + (i + g.r) * Wp + g.r;
          T* __restrict__ qo = gqc + i * g.W;
          T* __restrict__ ko = gkc + i * g.W;
          T* __restrict__ vo = gvc + i * g.W;
#pragma omp simd
          for (int64_t j = 0; j < g.W; ++j) {
            qo[j] = qr[j] * qs;
            ko[j] = kr[j] * go_scale;
            vo[j] = vr[j] * go_scale;
          }
        }
        if (!g.zeros) {
          for (int64_t yp = 0; yp < S.Hp; ++yp) {
            const int64_t y = source(yp - g.r, g.H, g.zeros);
            const bool inner_row = yp >= g.r && yp < g.r + g.H;
            for (int64_t xp = 0; xp < Wp; ++xp) {
              if (inner_row && xp >= g.r && xp < g.r + g.W) continue;
              const int64_t x = source(xp - g.r, g.W, g.zeros);
              gkc[y * g.W + x] += gks[yp * Wp + xp] * go_scale;
              gvc[y * g.W + x] += gvs[yp * Wp + xp] * go_scale;
            }
          }
        }
        if (grad_pe) {  // keys enter as k - pe: pe's gradient is minus the keys', summed
          T* __restrict__ gp = grad_pe + (at::get_thread_num() * g.d + c) * HW;
#pragma omp simd
          for (int64_t x = 0; x < HW; ++x) gp[x] -= gkc[x];
        }
      }
    }
  });
  double total = 0.0;
  for (const double t : dsum) total += t;
  return total;
}

Geometry geometry(const at::Tensor& qkv, int64_t heads, int64_t kernel, bool zeros,
                  int64_t stride) {
  TORCH_CHECK(qkv.device().is_cpu(), "local_attention_cpu: tensors must be on the CPU");
  TORCH_CHECK(qkv.dim() == 4 && qkv.is_contiguous(),
              "local_attention_cpu: qkv must be a contiguous (B, 3C, H, W) tensor");
  TORCH_CHECK(qkv.size(1) % (3 * heads) == 0, "local_attention_cpu: 3C not divisible by 3 heads");
  TORCH_CHECK(kernel % 2 == 1 && kernel >= 1, "local_attention_cpu: kernel must be odd");
  TORCH_CHECK(stride >= 1, "local_attention_cpu: stride must be >= 1");
  Geometry g;
  g.B = qkv.size(0);
  g.N = heads;
  g.d = qkv.size(1) / (3 * heads);
  g.H = qkv.size(2);
  g.W = qkv.size(3);
  g.kernel = kernel;
  g.r = kernel / 2;
  g.zeros = zeros;
  g.stride = stride;
  g.Ho = (g.H + stride - 1) / stride;
  g.Wo = (g.W + stride - 1) / stride;
  TORCH_CHECK(zeros || (g.r < g.H && g.r < g.W),
              "local_attention_cpu: map too small for reflection padding");
  return g;
}

std::vector<at::Tensor> forward(const at::Tensor& qkv, const c10::optional<at::Tensor>& pe,
                                int64_t heads, int64_t kernel, bool zeros,
                                double scale, int64_t stride) {
  const Geometry g = geometry(qkv, heads, kernel, zeros, stride);
  if (pe.has_value()) {
    TORCH_CHECK(pe->is_contiguous() && pe->numel() == g.d * g.H * g.W &&
                    pe->scalar_type() == qkv.scalar_type(),
                "local_attention_cpu: pe must be a contiguous (d, H, W) tensor of qkv's dtype");
  }
  at::Tensor out = at::empty({g.B, g.N * g.d, g.Ho, g.Wo}, qkv.options());
  // Full resolution; the backward reads only the query rows (the others stay 0).
  at::Tensor lse = stride > 1 ? at::zeros({g.B, g.N, g.H, g.W}, qkv.options())
                              : at::empty({g.B, g.N, g.H, g.W}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "local_attention_cpu_forward", [&] {
    forward_plane_loop<scalar_t>(qkv.data_ptr<scalar_t>(),
                                 pe.has_value() ? pe->data_ptr<scalar_t>() : nullptr, g,
                                 static_cast<scalar_t>(scale), out.data_ptr<scalar_t>(),
                                 lse.data_ptr<scalar_t>());
  });
  return {out, lse};
}

// Returns (the gradient of qkv for the output gradient go_scale * grad_out
// (B, C, Ho, Wo), the scalar sum(grad_out * out), pe's gradient (d, H, W) or
// None without pe); the scalar is the gradient of a scale applied to the
// output, computed on the way (see backward_plane_loop).
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& qkv,
                                 const c10::optional<at::Tensor>& pe, const at::Tensor& lse,
                                 int64_t heads, int64_t kernel, bool zeros, double scale,
                                 int64_t stride, double go_scale) {
  const Geometry g = geometry(qkv, heads, kernel, zeros, stride);
  at::Tensor go = grad_out.contiguous();
  TORCH_CHECK(go.sizes() == at::IntArrayRef({g.B, g.N * g.d, g.Ho, g.Wo}) &&
                  go.scalar_type() == qkv.scalar_type(),
              "local_attention_cpu: grad_out must be (B, C, ceil(H/s), ceil(W/s)) of qkv's dtype");
  at::Tensor grad_qkv = at::empty_like(qkv);
  // Per-thread partial sums of pe's gradient, reduced after the loop.
  at::Tensor grad_pe_parts =
      pe.has_value() ? at::zeros({at::get_num_threads(), g.d, g.H, g.W}, qkv.options())
                     : at::Tensor();
  double dot = 0.0;
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "local_attention_cpu_backward", [&] {
    dot = backward_plane_loop<scalar_t>(go.data_ptr<scalar_t>(), qkv.data_ptr<scalar_t>(),
                                        pe.has_value() ? pe->data_ptr<scalar_t>() : nullptr,
                                        lse.data_ptr<scalar_t>(), g, static_cast<scalar_t>(scale),
                                        static_cast<scalar_t>(go_scale),
                                        grad_qkv.data_ptr<scalar_t>(),
                                        pe.has_value() ? grad_pe_parts.data_ptr<scalar_t>()
                                                       : nullptr);
  });
  at::Tensor grad_pe = pe.has_value() ? grad_pe_parts.sum(0) : at::Tensor();
  return {grad_qkv, at::scalar_tensor(dot, qkv.options()), grad_pe};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused local attention forward (CPU)");
  m.def("backward", &backward, "fused local attention backward (CPU)");
}
