// Fused ACmix convolution path for CPU: fc (3N head groups -> K2 maps per
// within-head channel) followed by the grouped k x k convolution (groups = d,
// K2 input maps per group, Cpg = C_out / d outputs per group), forward and
// backward, on the fused projection qkv (B, 3C, H, W), channel m * d + j.
//
//   f[j][p](y, x)   = bias[p] + sum_m fc[p][m] * qkv[m * d + j](y, x)
//   out[o](yo, xo)  = sum_p sum_(ty,tx) W[o][p][ty][tx] * f[g(o)][p](yo*s + ty - r, xo*s + tx - r)
//
// with zero padding r = k // 2 and g(o) = o / Cpg. The same multiply-adds as
// PyTorch's einsum + grouped conv (Table 1's count), without materialising f
// in memory or converting it to channels-last.
//
// Layout. Per (batch, group j) task the K2 maps of f are built once into s*s
// "phase" planes of the zero-padded map: phase (a, c) holds the padded pixels
// (u*s + a, v*s + c) at flat index u * Wq + v. Then tap (ty, tx) of output
// X = yo * Wq + xo reads phase (ty % s, tx % s) at X + (ty / s) * Wq + tx / s:
// one constant offset per tap, contiguous loops for any stride (the columns
// xo >= Wo of each output row are computed and dropped).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

template <typename T>
constexpr int kLanes = 64 / sizeof(T);

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Geom {
  int64_t B, M, d, H, W;  // M = 3N head groups; qkv has M * d channels
  int64_t K2, k, r, s;    // fc maps (k * k), kernel, padding, stride
  int64_t Cout, Cpg;      // output channels, outputs per group
  int64_t Ho, Wo, Hq, Wq;  // output size, phase-plane size
  int64_t PS;             // stride between planes (Hq * Wq plus slack)
  int64_t Mg;             // margin before the output-gradient planes
  std::vector<int64_t> tap_phase, tap_off;  // per tap: phase index, flat offset
  std::vector<int64_t> col_phase, col_v;     // per image column x: column phase, v

  Geom(const at::Tensor& qkv, int64_t K2_, int64_t k_, int64_t s_, int64_t Cout_, int64_t M_) {
    B = qkv.size(0);
    M = M_;
    d = qkv.size(1) / M;
    H = qkv.size(2);
    W = qkv.size(3);
    K2 = K2_;
    k = k_;
    r = k / 2;
    s = s_;
    Cout = Cout_;
    Cpg = Cout / d;
    Ho = (H + s - 1) / s;
    Wo = (W + s - 1) / s;
    Hq = (H + 2 * r + s - 1) / s;
    Wq = (W + 2 * r + s - 1) / s;
    const int64_t V = 32;  // >= the widest tile of any type
    const int64_t max_off = ((k - 1) / s) * Wq + (k - 1) / s;
    PS = round_up(Hq * Wq + max_off + 2 * V, V);
    Mg = round_up(max_off, V);
    col_phase.resize(W);
    col_v.resize(W);
    for (int64_t x = 0; x < W; ++x) {
      col_phase[x] = (x + r) % s;
      col_v[x] = (x + r) / s;
    }
    tap_phase.resize(k * k);
    tap_off.resize(k * k);
    for (int64_t ty = 0; ty < k; ++ty)
      for (int64_t tx = 0; tx < k; ++tx) {
        tap_phase[ty * k + tx] = (ty % s) * s + tx % s;
        tap_off[ty * k + tx] = (ty / s) * Wq + tx / s;
      }
  }
  int64_t nout() const { return Ho * Wq; }  // flat output positions (with dropped columns)
  // Stride of the output-gradient planes: margin, then reads up to Hq * Wq + 2 lanes.
  int64_t gstride() const { return round_up(Mg + Hq * Wq + 32, 16); }
};

// Row y of the task's M input planes, read in whole vectors: the full vectors
// straight from qkv, the partial last one (x0 >= Wfull) from a zero-tailed copy.
template <typename T>
struct InputRows {
  const T* base;  // row y of plane m = 0; planes are d * H * W apart
  int64_t plane, Wfull;
  T* tail;  // M vectors
  InputRows(const T* qkv, const Geom& g, int64_t b, int64_t j, int64_t y, T* tail_buf)
      : base(qkv + ((b * g.M) * g.d + j) * g.H * g.W + y * g.W),
        plane(g.d * g.H * g.W),
        Wfull(g.W / kLanes<T> * kLanes<T>),
        tail(tail_buf) {
    constexpr int V = kLanes<T>;
    if (Wfull == g.W) return;
    const int64_t rem = g.W - Wfull;
    for (int64_t m = 0; m < g.M; ++m) {
      T* t = tail + m * V;
      std::memcpy(t, base + m * plane + Wfull, rem * sizeof(T));
      std::fill(t + rem, t + V, T(0));
    }
  }
  const T* at(int64_t m, int64_t x0) const {
    return x0 < Wfull ? base + m * plane + x0 : tail + m * kLanes<T>;
  }
};

// fc's weights re-laid for register tiles, zero-padded to whole tiles: forward
// fw[pc][m][q] = fc[pc * PC + q][m] (+ bias fb[pc][q]); backward
// bw[mc][p][q] = fc[p][mc * MC + q].
template <typename T>
struct FcTiles {
  static constexpr int PC = 9, MC = 12;
  int64_t npc, nmc;
  std::vector<T> fw, fb, bw;
  FcTiles(const T* fc, const T* bias, const Geom& g)
      : npc((g.K2 + PC - 1) / PC), nmc((g.M + MC - 1) / MC) {
    fw.assign(npc * g.M * PC, T(0));
    fb.assign(npc * PC, T(0));
    bw.assign(nmc * g.K2 * MC, T(0));
    for (int64_t p = 0; p < g.K2; ++p) {
      for (int64_t m = 0; m < g.M; ++m) {
        fw[((p / PC) * g.M + m) * PC + p % PC] = fc[p * g.M + m];
        bw[((m / MC) * g.K2 + p) * MC + m % MC] = fc[p * g.M + m];
      }
      if (bias) fb[p] = bias[p];
    }
  }
};

// f of task (b, j) into phase planes P[(phase * K2 + p) * PS + u * Wq + v]; the
// padding border is never written (zero from allocation). rows: M vectors of
// scratch; fr: (K2 rounded up to whole tiles) * Wr scratch.
template <typename T>
void build_f(const T* qkv, const FcTiles<T>& F, const Geom& g, int64_t b, int64_t j, T* P,
             T* rows, T* fr) {
  constexpr int V = kLanes<T>, PC = FcTiles<T>::PC;
  const int64_t Wr = round_up(g.W, V);
  for (int64_t y = 0; y < g.H; ++y) {
    const InputRows<T> in_rows(qkv, g, b, j, y, rows);
    for (int64_t x0 = 0; x0 < Wr; x0 += V) {
      for (int64_t pc = 0; pc < F.npc; ++pc) {
        T acc[PC][V];
        for (int q = 0; q < PC; ++q) {
#pragma omp simd
          for (int v = 0; v < V; ++v) acc[q][v] = F.fb[pc * PC + q];
        }
        const T* w = F.fw.data() + pc * g.M * PC;
        for (int64_t m = 0; m < g.M; ++m) {
          const T* __restrict__ in = in_rows.at(m, x0);
#pragma GCC unroll 9
          for (int q = 0; q < PC; ++q) {
            const T wq = w[m * PC + q];
#pragma omp simd
            for (int v = 0; v < V; ++v) acc[q][v] += wq * in[v];
          }
        }
#pragma GCC unroll 9
        for (int q = 0; q < PC; ++q) {
#pragma omp simd
          for (int v = 0; v < V; ++v) fr[(pc * PC + q) * Wr + x0 + v] = acc[q][v];
        }
      }
    }
    const int64_t yp = y + g.r;
    const int64_t a = yp % g.s, u = yp / g.s;
    for (int64_t p = 0; p < g.K2; ++p) {
      const T* f = fr + p * Wr;
      if (g.s == 1) {
        std::memcpy(P + p * g.PS + u * g.Wq + g.r, f, g.W * sizeof(T));
      } else {
        for (int64_t x = 0; x < g.W; ++x)
          P[((a * g.s + g.col_phase[x]) * g.K2 + p) * g.PS + u * g.Wq + g.col_v[x]] = f[x];
      }
    }
  }
}

// out[c][X] = sum_p sum_t W[o0 + c][p][t] * P[phase(t)][p][X + off(t)], CT channels.
template <typename T, int CT>
void conv_tile(const T* P, const T* Wt, const Geom& g, int64_t o0, T* out, int64_t so) {
  constexpr int V = 2 * kLanes<T>;  // two vectors per channel: >= 8 independent FMA chains
  const int64_t k2 = g.k * g.k, n = g.nout();
  for (int64_t X0 = 0; X0 < n; X0 += V) {
    T acc[CT][V] = {};
    for (int64_t p = 0; p < g.K2; ++p) {
      for (int64_t t = 0; t < k2; ++t) {
        const T* __restrict__ src = P + (g.tap_phase[t] * g.K2 + p) * g.PS + g.tap_off[t] + X0;
        const T* w = Wt + (o0 * g.K2 + p) * k2 + t;
#pragma GCC unroll 8
        for (int c = 0; c < CT; ++c) {
          const T wc = w[c * g.K2 * k2];
#pragma omp simd
          for (int v = 0; v < V; ++v) acc[c][v] += wc * src[v];
        }
      }
    }
#pragma GCC unroll 8
    for (int c = 0; c < CT; ++c) {
#pragma omp simd
      for (int v = 0; v < V; ++v) out[c * so + X0 + v] = acc[c][v];
    }
  }
}

template <typename T>
void conv_group(const T* P, const T* Wt, const Geom& g, int64_t j, T* out, int64_t so) {
  int64_t c = 0;
  const int64_t o0 = j * g.Cpg;
  for (; c + 8 <= g.Cpg; c += 8) conv_tile<T, 8>(P, Wt, g, o0 + c, out + c * so, so);
  for (; c + 4 <= g.Cpg; c += 4) conv_tile<T, 4>(P, Wt, g, o0 + c, out + c * so, so);
  for (; c < g.Cpg; ++c) conv_tile<T, 1>(P, Wt, g, o0 + c, out + c * so, so);
}

// Per-thread buffers, zero-filled once per call and reused across its tasks (the
// padding is never written, so it stays zero). They outlive the call and are
// reallocated only to grow: repeated calls do not page-fault fresh memory in.
template <typename T>
struct Scratch {
  std::vector<T>& P;
  std::vector<T>& O;
  std::vector<T>& rows;
  std::vector<T>& fr;
  std::vector<T>& G;
  std::vector<T>& GF;
  static std::vector<T>& buffer(int slot) {
    thread_local std::vector<T> buffers[6];
    return buffers[slot];
  }
  Scratch(const Geom& g, bool backward)
      : P(buffer(0)), O(buffer(1)), rows(buffer(2)), fr(buffer(3)), G(buffer(4)), GF(buffer(5)) {
    const int64_t Wr = round_up(g.W, kLanes<T>);
    P.assign(g.s * g.s * g.K2 * g.PS, T(0));
    O.assign(g.Cpg * round_up(g.nout() + 32, 32), T(0));
    rows.assign(g.M * kLanes<T>, T(0));
    fr.assign(round_up(g.K2, FcTiles<T>::PC) * Wr, T(0));
    if (backward) {
      G.assign(g.Cpg * g.gstride(), T(0));
      GF.assign(g.s * g.s * g.K2 * g.PS, T(0));
    }
  }
};

template <typename T>
void forward_impl(const T* qkv, const T* fc, const T* bias, const T* Wt, const Geom& g, T* out,
                  bool mix, T alpha, T beta) {
  const int64_t so = round_up(g.nout() + 32, 32), HWo = g.Ho * g.Wo;
  const FcTiles<T> F(fc, bias, g);
  at::parallel_for(0, g.B * g.d, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> S(g, false);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / g.d, j = t % g.d;
      build_f(qkv, F, g, b, j, S.P.data(), S.rows.data(), S.fr.data());
      conv_group(S.P.data(), Wt, g, j, S.O.data(), so);
      for (int64_t c = 0; c < g.Cpg; ++c) {
        T* o = out + (b * g.Cout + j * g.Cpg + c) * HWo;
        for (int64_t yo = 0; yo < g.Ho; ++yo) {
          const T* __restrict__ src = S.O.data() + c * so + yo * g.Wq;
          T* __restrict__ dst = o + yo * g.Wo;
          if (mix) {
#pragma omp simd
            for (int64_t x = 0; x < g.Wo; ++x) dst[x] = alpha * dst[x] + beta * src[x];
          } else {
            std::memcpy(dst, src, g.Wo * sizeof(T));
          }
        }
      }
    }
  });
}

// Backward of one task. G: the Cpg output-gradient planes in the output layout
// (width Wq, dropped columns 0) after a front margin Mg; GF: gradient of the
// phase planes.
template <typename T>
void grad_f_task(const T* G, const T* Wt, const Geom& g, int64_t j, T* GF) {
  constexpr int V = kLanes<T>;
  constexpr int KMAX = 9;  // maps per register tile
  const int64_t k2 = g.k * g.k, n = g.Hq * g.Wq, gs = g.gstride();
  for (int64_t ph = 0; ph < g.s * g.s; ++ph) {
    for (int64_t p0 = 0; p0 < g.K2; p0 += KMAX) {
      const int64_t np = std::min<int64_t>(KMAX, g.K2 - p0);
      for (int64_t U0 = 0; U0 < n; U0 += V) {
        T acc[KMAX][V] = {};
        for (int64_t c = 0; c < g.Cpg; ++c) {
          const T* Gc = G + c * gs + g.Mg + U0;
          const T* w = Wt + ((j * g.Cpg + c) * g.K2 + p0) * k2;
          for (int64_t t = 0; t < k2; ++t) {
            if (g.tap_phase[t] != ph) continue;
            const T* __restrict__ src = Gc - g.tap_off[t];
#pragma GCC unroll 9
            for (int q = 0; q < KMAX; ++q) {
              if (q >= np) break;
              const T wq = w[q * k2 + t];
#pragma omp simd
              for (int v = 0; v < V; ++v) acc[q][v] += wq * src[v];
            }
          }
        }
        for (int q = 0; q < np; ++q) {
          T* dst = GF + (ph * g.K2 + p0 + q) * g.PS + U0;
#pragma omp simd
          for (int v = 0; v < V; ++v) dst[v] = acc[q][v];
        }
      }
    }
  }
}

// gW[o][p][t] += sum_X G[c][X] * P[phase(t)][p][X + off(t)] for the task's outputs:
// CT channels x up to 9 taps of accumulators, so each loaded P vector feeds CT FMAs.
template <typename T, int CT>
void grad_w_tile(const T* G, const T* P, const Geom& g, int64_t j, int64_t c0, T* gW) {
  constexpr int V = kLanes<T>;
  constexpr int TMAX = 9;
  const int64_t k2 = g.k * g.k, n = g.nout(), gs = g.gstride();
  for (int64_t p = 0; p < g.K2; ++p) {
    for (int64_t t0 = 0; t0 < k2; t0 += TMAX) {
      const int64_t nt = std::min<int64_t>(TMAX, k2 - t0);
      T acc[CT][TMAX][V] = {};
      for (int64_t X0 = 0; X0 < n; X0 += V) {
#pragma GCC unroll 9
        for (int q = 0; q < TMAX; ++q) {
          if (q >= nt) break;
          const int64_t t = t0 + q;
          const T* __restrict__ src = P + (g.tap_phase[t] * g.K2 + p) * g.PS + g.tap_off[t] + X0;
#pragma GCC unroll 4
          for (int c = 0; c < CT; ++c) {
            const T* __restrict__ gv = G + (c0 + c) * gs + g.Mg + X0;
#pragma omp simd
            for (int v = 0; v < V; ++v) acc[c][q][v] += gv[v] * src[v];
          }
        }
      }
      for (int c = 0; c < CT; ++c) {
        T* dst = gW + ((j * g.Cpg + c0 + c) * g.K2 + p) * k2 + t0;
        for (int q = 0; q < nt; ++q) {
          T sum = T(0);
          for (int v = 0; v < V; ++v) sum += acc[c][q][v];
          dst[q] += sum;
        }
      }
    }
  }
}

template <typename T>
void grad_w_task(const T* G, const T* P, const Geom& g, int64_t j, T* gW) {
  int64_t c = 0;
  for (; c + 2 <= g.Cpg; c += 2) grad_w_tile<T, 2>(G, P, g, j, c, gW);
  for (; c < g.Cpg; ++c) grad_w_tile<T, 1>(G, P, g, j, c, gW);
}

template <typename T>
void backward_impl(const T* go, T go_scale, const T* qkv, const T* fc, const T* bias,
                   const T* Wt, const Geom& g, T* gqkv, bool accumulate, T* gfc, T* gbias,
                   T* gW) {
  constexpr int V = kLanes<T>;
  const int64_t HW = g.H * g.W, HWo = g.Ho * g.Wo, k2 = g.k * g.k;
  const int64_t gs = g.gstride();
  const int64_t nthreads = at::get_num_threads();
  const int64_t nW = g.Cout * g.K2 * k2, nfc = g.K2 * g.M;
  // Per-thread partial sums of the weight gradients, reduced below.
  std::vector<T> partial(nthreads * (nW + nfc + g.K2), T(0));
  const FcTiles<T> F(fc, bias, g);
  at::parallel_for(0, g.B * g.d, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> S(g, true);
    T* part = partial.data() + at::get_thread_num() * (nW + nfc + g.K2);
    T* pW = part;
    T* pfc = part + nW;
    T* pb = pfc + nfc;
    const int64_t Wr = round_up(g.W, V);
    std::vector<T> accfc(nfc * V), accb(g.K2 * V);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / g.d, j = t % g.d;
      build_f(qkv, F, g, b, j, S.P.data(), S.rows.data(), S.fr.data());
      for (int64_t c = 0; c < g.Cpg; ++c) {  // output gradient, width Wq, dropped columns 0
        const T* src = go + (b * g.Cout + j * g.Cpg + c) * HWo;
        T* dst = S.G.data() + c * gs + g.Mg;
        for (int64_t yo = 0; yo < g.Ho; ++yo)
          std::memcpy(dst + yo * g.Wq, src + yo * g.Wo, g.Wo * sizeof(T));
      }
      grad_w_task(S.G.data(), S.P.data(), g, j, pW);
      grad_f_task(S.G.data(), Wt, g, j, S.GF.data());
      // Per image row: gradient of f at the row's pixels, then fc's input and weights.
      std::fill(accfc.begin(), accfc.end(), T(0));
      std::fill(accb.begin(), accb.end(), T(0));
      for (int64_t y = 0; y < g.H; ++y) {
        const int64_t yp = y + g.r, a = yp % g.s, u = yp / g.s;
        // The row's f gradients: straight from the phase plane for stride 1 (the
        // columns past W hold padding gradients and meet zero inputs below), else
        // gathered from the phases.
        const T* gf_row;
        int64_t gf_stride;
        if (g.s == 1) {
          gf_row = S.GF.data() + u * g.Wq + g.r;
          gf_stride = g.PS;
        } else {
          for (int64_t p = 0; p < g.K2; ++p) {
            T* fr = S.fr.data() + p * Wr;
            for (int64_t x = 0; x < g.W; ++x)
              fr[x] = S.GF[((a * g.s + g.col_phase[x]) * g.K2 + p) * g.PS + u * g.Wq + g.col_v[x]];
          }
          gf_row = S.fr.data();
          gf_stride = Wr;
        }
        const InputRows<T> in_rows(qkv, g, b, j, y, S.rows.data());
        constexpr int MC = FcTiles<T>::MC;
        for (int64_t mc = 0; mc < F.nmc; ++mc) {
          const int64_t m0 = mc * MC, nm = std::min<int64_t>(MC, g.M - m0);
          const T* w = F.bw.data() + mc * g.K2 * MC;
          for (int64_t x0 = 0; x0 < Wr; x0 += V) {  // d qkv[m] = sum_p fc[p][m] d f[p]
            T gi[MC][V] = {};
            for (int64_t p = 0; p < g.K2; ++p) {
              const T* __restrict__ fr = gf_row + p * gf_stride + x0;
#pragma GCC unroll 12
              for (int q = 0; q < MC; ++q) {
                const T wq = w[p * MC + q];
#pragma omp simd
                for (int v = 0; v < V; ++v) gi[q][v] += wq * fr[v];
              }
            }
            const int64_t lim = std::min<int64_t>(V, g.W - x0);
            for (int q = 0; q < nm; ++q) {
              T* dst = gqkv + ((b * g.M + m0 + q) * g.d + j) * HW + y * g.W + x0;
              if (accumulate) {
                for (int64_t v = 0; v < lim; ++v) dst[v] += go_scale * gi[q][v];
              } else {
                for (int64_t v = 0; v < lim; ++v) dst[v] = go_scale * gi[q][v];
              }
            }
          }
        }
        for (int64_t p = 0; p < g.K2; ++p) {  // d fc[p][m] += d f[p] . qkv[m] over the row
          const T* __restrict__ fr = gf_row + p * gf_stride;
          for (int64_t mc = 0; mc < F.nmc; ++mc) {
            const int64_t m0 = mc * MC, nm = std::min<int64_t>(MC, g.M - m0);
            T t[MC][V] = {};
            for (int64_t x0 = 0; x0 < Wr; x0 += V) {
#pragma GCC unroll 12
              for (int q = 0; q < MC; ++q) {
                if (q >= nm) break;
                const T* __restrict__ in = in_rows.at(m0 + q, x0);
#pragma omp simd
                for (int v = 0; v < V; ++v) t[q][v] += fr[x0 + v] * in[v];
              }
            }
            for (int q = 0; q < nm; ++q) {
              T* __restrict__ af = accfc.data() + (p * g.M + m0 + q) * V;
#pragma omp simd
              for (int v = 0; v < V; ++v) af[v] += t[q][v];
            }
          }
        }
        if (gbias) {
          for (int64_t p = 0; p < g.K2; ++p) {
            const T* __restrict__ fr = gf_row + p * gf_stride;
            T* __restrict__ ab = accb.data() + p * V;
            int64_t x0 = 0;
            for (; x0 + V <= g.W; x0 += V) {
#pragma omp simd
              for (int v = 0; v < V; ++v) ab[v] += fr[x0 + v];
            }
            for (int64_t x = x0; x < g.W; ++x) ab[x - x0] += fr[x];
          }
        }
      }
      for (int64_t i = 0; i < nfc; ++i) {
        T sum = T(0);
        for (int v = 0; v < V; ++v) sum += accfc[i * V + v];
        pfc[i] += sum;
      }
      for (int64_t p = 0; p < g.K2; ++p) {
        T sum = T(0);
        for (int v = 0; v < V; ++v) sum += accb[p * V + v];
        pb[p] += sum;
      }
    }
  });
  for (int64_t th = 0; th < nthreads; ++th) {
    const T* part = partial.data() + th * (nW + nfc + g.K2);
    for (int64_t i = 0; i < nW; ++i) gW[i] += part[i];
    for (int64_t i = 0; i < nfc; ++i) gfc[i] += part[nW + i];
    if (gbias)
      for (int64_t i = 0; i < g.K2; ++i) gbias[i] += part[nW + nfc + i];
  }
}

// Checks of the weights shared by both layouts (qkv has `channels` = 3C channels).
struct WeightDims {
  int64_t K2, M, k, d;
};

WeightDims check_weights(const at::Tensor& qkv, int64_t channels, const at::Tensor& fc_w,
                         const c10::optional<at::Tensor>& fc_b, const at::Tensor& dep_w) {
  TORCH_CHECK(fc_w.dim() == 2 && fc_w.is_contiguous() && fc_w.scalar_type() == qkv.scalar_type(),
              "conv_path_cpu: fc weight must be a contiguous (K2, 3N) tensor of qkv's dtype");
  TORCH_CHECK(dep_w.dim() == 4 && dep_w.is_contiguous() && dep_w.scalar_type() == qkv.scalar_type(),
              "conv_path_cpu: grouped-conv weight must be a contiguous (C_out, K2, k, k) tensor");
  const int64_t K2 = fc_w.size(0), M = fc_w.size(1), k = dep_w.size(2);
  TORCH_CHECK(dep_w.size(1) == K2 && dep_w.size(3) == k && k % 2 == 1 && K2 == k * k,
              "conv_path_cpu: grouped-conv weight must be (C_out, k*k, k, k) with odd k");
  TORCH_CHECK(channels % M == 0, "conv_path_cpu: qkv channels not divisible by 3N");
  const int64_t d = channels / M;
  TORCH_CHECK(dep_w.size(0) % d == 0, "conv_path_cpu: C_out not divisible by d");
  if (fc_b.has_value())
    TORCH_CHECK(fc_b->numel() == K2 && fc_b->is_contiguous() && fc_b->scalar_type() == qkv.scalar_type(),
                "conv_path_cpu: fc bias must be a contiguous (K2,) tensor");
  return {K2, M, k, d};
}

Geom check_args(const at::Tensor& qkv, const at::Tensor& fc_w, const c10::optional<at::Tensor>& fc_b,
                const at::Tensor& dep_w, int64_t stride) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.dim() == 4 && qkv.is_contiguous(),
              "conv_path_cpu: qkv must be a contiguous CPU (B, 3C, H, W) tensor");
  const WeightDims w = check_weights(qkv, qkv.size(1), fc_w, fc_b, dep_w);
  TORCH_CHECK(stride >= 1, "conv_path_cpu: stride must be >= 1");
  return Geom(qkv, w.K2, w.k, stride, dep_w.size(0), w.M);
}

// The conv path's output, or with mix_into given, mix_into = alpha * mix_into +
// beta * conv path, in place (ACmix's mix without a separate pass or tensor).
at::Tensor conv_path_forward(const at::Tensor& qkv, const at::Tensor& fc_w,
                             const c10::optional<at::Tensor>& fc_b, const at::Tensor& dep_w,
                             int64_t stride, const c10::optional<at::Tensor>& mix_into,
                             double alpha, double beta) {
  const Geom g = check_args(qkv, fc_w, fc_b, dep_w, stride);
  at::Tensor out;
  if (mix_into.has_value()) {
    out = *mix_into;
    TORCH_CHECK(out.is_contiguous() && out.sizes() == at::IntArrayRef({g.B, g.Cout, g.Ho, g.Wo}) &&
                    out.scalar_type() == qkv.scalar_type(),
                "conv_path_cpu: mix_into must be a contiguous (B, C_out, ceil(H/s), ceil(W/s)) "
                "tensor of qkv's dtype");
  } else {
    out = at::empty({g.B, g.Cout, g.Ho, g.Wo}, qkv.options());
  }
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "conv_path_cpu_forward", [&] {
    forward_impl<scalar_t>(qkv.data_ptr<scalar_t>(), fc_w.data_ptr<scalar_t>(),
                           fc_b.has_value() ? fc_b->data_ptr<scalar_t>() : nullptr,
                           dep_w.data_ptr<scalar_t>(), g, out.data_ptr<scalar_t>(),
                           mix_into.has_value(), static_cast<scalar_t>(alpha),
                           static_cast<scalar_t>(beta));
  });
  return out;
}

// Gradients for the output gradient go_scale * grad_out: the gradient of qkv is
// added into grad_qkv where one is given (and returned), else written to a new
// tensor; the weight gradients are returned for grad_out itself (unscaled: the
// caller scales these small tensors, and sum(W * dW) = sum(grad_out * out) is
// then the gradient of go_scale).
std::vector<at::Tensor> conv_path_backward(const at::Tensor& grad_out, const at::Tensor& qkv,
                                           const at::Tensor& fc_w,
                                           const c10::optional<at::Tensor>& fc_b,
                                           const at::Tensor& dep_w, int64_t stride,
                                           double go_scale,
                                           const c10::optional<at::Tensor>& grad_qkv) {
  const Geom g = check_args(qkv, fc_w, fc_b, dep_w, stride);
  at::Tensor go = grad_out.contiguous();
  TORCH_CHECK(go.sizes() == at::IntArrayRef({g.B, g.Cout, g.Ho, g.Wo}) &&
                  go.scalar_type() == qkv.scalar_type(),
              "conv_path_cpu: grad_out must be (B, C_out, ceil(H/s), ceil(W/s)) of qkv's dtype");
  const bool accumulate = grad_qkv.has_value();
  if (accumulate)
    TORCH_CHECK(grad_qkv->is_contiguous() && grad_qkv->sizes() == qkv.sizes() &&
                    grad_qkv->scalar_type() == qkv.scalar_type(),
                "conv_path_cpu: grad_qkv must be a contiguous tensor like qkv");
  at::Tensor gqkv = accumulate ? *grad_qkv : at::empty_like(qkv);
  at::Tensor gfc = at::zeros_like(fc_w);
  at::Tensor gb = fc_b.has_value() ? at::zeros_like(*fc_b) : at::Tensor();
  at::Tensor gW = at::zeros_like(dep_w);
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "conv_path_cpu_backward", [&] {
    backward_impl<scalar_t>(go.data_ptr<scalar_t>(), static_cast<scalar_t>(go_scale),
                            qkv.data_ptr<scalar_t>(), fc_w.data_ptr<scalar_t>(),
                            fc_b.has_value() ? fc_b->data_ptr<scalar_t>() : nullptr,
                            dep_w.data_ptr<scalar_t>(), g, gqkv.data_ptr<scalar_t>(), accumulate,
                            gfc.data_ptr<scalar_t>(),
                            fc_b.has_value() ? gb.data_ptr<scalar_t>() : nullptr,
                            gW.data_ptr<scalar_t>());
  });
  return {gqkv, gfc, gb, gW};
}

// ---------------------------------------------------------------------------
// Channels-last forward and backward (stride 1): qkv (B, H, W, M * d) ->
// out (B, H, W, C_out), the layout of Swin's features. Vectorised over the
// within-head channel j, which is contiguous in both f and the input pixel:
//   F[row][col][p][j]   f of a block of output rows plus r rows above and
//                       below, columns zero-padded (r left, r + tile right),
//                       j padded to dp (a multiple of the vector length);
//   out pixel (y, x), channel j * Cpg + c = sum_p sum_t Wt[c][p][t][j] * F[..]
// with Wt the grouped-conv weight regrouped so that j is innermost.
// ---------------------------------------------------------------------------

struct ClGeom {
  int64_t B, H, W, M, d, dp, K2, k, r, Cout, Cpg;
  int64_t R;   // output rows per task
  int64_t Wf;  // F columns: W + 2r + tile overrun
  int64_t pix; // F elements per pixel: K2 * dp
};

constexpr int kClX = 4;   // output pixels per register tile
constexpr int kClCC = 4;  // output channels (of one group) per register tile

// One input pixel's M * d channels with stride dp per head group: the pixel
// itself when d == dp, else a copy into inbuf (whose padding lanes stay zero).
template <typename T>
const T* cl_input_pixel(const T* src, const ClGeom& g, T* inbuf) {
  if (g.dp == g.d) return src;
  for (int64_t m = 0; m < g.M; ++m) std::memcpy(inbuf + m * g.dp, src + m * g.d, g.d * sizeof(T));
  return inbuf;
}

// f of one image pixel into dst[p * dp + j]: bias + fc . input, K2 maps.
template <typename T, int K2T>
void cl_fc_pixel(const T* __restrict__ in, const T* __restrict__ fc, const T* __restrict__ bias,
                 const ClGeom& g, T* __restrict__ dst) {
  constexpr int V = kLanes<T>;
  const int64_t K2 = K2T > 0 ? K2T : g.K2;
  for (int64_t j0 = 0; j0 < g.dp; j0 += V) {
    if constexpr (K2T > 0) {
      T acc[K2T][V];
      for (int p = 0; p < K2T; ++p) {
        const T b = bias ? bias[p] : T(0);
#pragma omp simd
        for (int v = 0; v < V; ++v) acc[p][v] = b;
      }
      for (int64_t m = 0; m < g.M; ++m) {
        const T* __restrict__ x = in + m * g.dp + j0;
#pragma GCC unroll 32
        for (int p = 0; p < K2T; ++p) {
          const T w = fc[p * g.M + m];
#pragma omp simd
          for (int v = 0; v < V; ++v) acc[p][v] += w * x[v];
        }
      }
      for (int p = 0; p < K2T; ++p) {
#pragma omp simd
        for (int v = 0; v < V; ++v) dst[p * g.dp + j0 + v] = acc[p][v];
      }
    } else {
      for (int64_t p = 0; p < K2; ++p) {
        T acc[V];
        const T b = bias ? bias[p] : T(0);
        for (int v = 0; v < V; ++v) acc[v] = b;
        for (int64_t m = 0; m < g.M; ++m) {
          const T w = fc[p * g.M + m];
          const T* __restrict__ x = in + m * g.dp + j0;
#pragma omp simd
          for (int v = 0; v < V; ++v) acc[v] += w * x[v];
        }
        for (int v = 0; v < V; ++v) dst[p * g.dp + j0 + v] = acc[v];
      }
    }
  }
}

// CC output channels c0.. of one group and kClX output pixels, lanes j0..j0+V:
// acc[x][c][v] = sum_p sum_t Wt[c0 + c][p][t][j0 + v] * F(x + tx, row + ty)[p][j0 + v].
template <typename T, int CC>
void cl_conv_tile(const T* __restrict__ F, int64_t frow, const T* __restrict__ Wt,
                  const ClGeom& g, T (*out)[kClCC][kLanes<T>]) {
  constexpr int V = kLanes<T>;
  const int64_t k = g.k, k2 = k * k, wc = g.K2 * k2 * g.dp;  // Wt stride per channel c
  T acc[kClX][CC][V] = {};
  for (int64_t p = 0; p < g.K2; ++p)
    for (int64_t ty = 0; ty < k; ++ty)
      for (int64_t tx = 0; tx < k; ++tx) {
        const T* __restrict__ f = F + ty * frow + tx * g.pix + p * g.dp;
        const T* __restrict__ w = Wt + (p * k2 + ty * k + tx) * g.dp;
#pragma GCC unroll 4
        for (int c = 0; c < CC; ++c) {
#pragma GCC unroll 4
          for (int x = 0; x < kClX; ++x) {
#pragma omp simd
            for (int v = 0; v < V; ++v) acc[x][c][v] += w[c * wc + v] * f[x * g.pix + v];
          }
        }
      }
  for (int x = 0; x < kClX; ++x)
    for (int c = 0; c < CC; ++c)
      for (int v = 0; v < V; ++v) out[x][c][v] = acc[x][c][v];
}

// f of image rows [ya, yb) of image b into F rows 0.. (zero outside the image and
// in the padding columns). inbuf: M * dp scratch whose padding lanes are zero.
template <typename T>
void cl_build_f_rows(const T* qkv, const T* fc, const T* bias, const ClGeom& g, int64_t b,
                     int64_t ya, int64_t yb, T* F, T* inbuf) {
  const int64_t frow = g.Wf * g.pix, Cin = g.M * g.d;
  for (int64_t y = ya; y < yb; ++y) {
    T* Frow = F + (y - ya) * frow;
    if (y < 0 || y >= g.H) {
      std::fill(Frow, Frow + frow, T(0));
      continue;
    }
    std::fill(Frow, Frow + g.r * g.pix, T(0));
    std::fill(Frow + (g.r + g.W) * g.pix, Frow + frow, T(0));
    for (int64_t x = 0; x < g.W; ++x) {
      const T* src = cl_input_pixel(qkv + ((b * g.H + y) * g.W + x) * Cin, g, inbuf);
      T* dst = Frow + (g.r + x) * g.pix;
      if (g.K2 == 9) cl_fc_pixel<T, 9>(src, fc, bias, g, dst);
      else if (g.K2 == 25) cl_fc_pixel<T, 25>(src, fc, bias, g, dst);
      else cl_fc_pixel<T, 0>(src, fc, bias, g, dst);
    }
  }
}

template <typename T>
void forward_cl_impl(const T* qkv, const T* fc, const T* bias, const T* Wt, const ClGeom& g,
                     T* out) {
  constexpr int V = kLanes<T>;
  const int64_t tasks_per_image = (g.H + g.R - 1) / g.R, frow = g.Wf * g.pix;
  const int64_t k2 = g.k * g.k;
  at::parallel_for(0, g.B * tasks_per_image, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<T> Fbuf, inbuf;
    Fbuf.resize((g.R + 2 * g.r) * frow);
    inbuf.assign(g.M * g.dp, T(0));
    T obuf[kClX][kClCC][V];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tasks_per_image, y0 = (task % tasks_per_image) * g.R;
      const int64_t y1 = std::min(g.H, y0 + g.R);
      cl_build_f_rows(qkv, fc, bias, g, b, y0 - g.r, y1 + g.r, Fbuf.data(), inbuf.data());
      for (int64_t y = y0; y < y1; ++y) {
        const T* Fy = Fbuf.data() + (y - y0) * frow;  // the tap rows start r above
        T* orow = out + (b * g.H + y) * g.W * g.Cout;
        for (int64_t j0 = 0; j0 < g.dp; j0 += V) {
          const int64_t nj = std::min<int64_t>(V, g.d - j0);
          for (int64_t c0 = 0; c0 < g.Cpg; c0 += kClCC) {
            const int64_t nc = std::min<int64_t>(kClCC, g.Cpg - c0);
            const T* w = Wt + c0 * g.K2 * k2 * g.dp + j0;
            for (int64_t x0 = 0; x0 < g.W; x0 += kClX) {
              const T* f = Fy + x0 * g.pix + j0;
              switch (nc) {
                case 4: cl_conv_tile<T, 4>(f, frow, w, g, obuf); break;
                case 3: cl_conv_tile<T, 3>(f, frow, w, g, obuf); break;
                case 2: cl_conv_tile<T, 2>(f, frow, w, g, obuf); break;
                default: cl_conv_tile<T, 1>(f, frow, w, g, obuf); break;
              }
              const int64_t nx = std::min<int64_t>(kClX, g.W - x0);
              for (int64_t x = 0; x < nx; ++x) {
                T* o = orow + (x0 + x) * g.Cout;
                for (int64_t v = 0; v < nj; ++v)
                  for (int64_t c = 0; c < nc; ++c) o[(j0 + v) * g.Cpg + c0 + c] = obuf[x][c][v];
              }
            }
          }
        }
      }
    }
  });
}

// Backward, per task (image b, rows [y0, y1)): the output gradient G regrouped
// per pixel as [c][j] (rows y0 - r .. y1 + r, zero-padded like F), then
//   gF[y'][x'][p][j] = sum_c sum_t Wt[c][p][t][j] G[y' - ty + r][x' - tx + r][c][j]
// for the task's own f rows (each f row belongs to one task), and from it the
// qkv gradient (fc^T gF), fc's and the bias's gradients; the grouped-conv
// weight gradient sums G * F over the task's output rows (F recomputed with
// its halo, as in the forward). Weight gradients are per-thread partial sums.
constexpr int kClPT = 9;  // maps per register tile (gF, fc gradient)
constexpr int kClMT = 3;  // head groups per register tile (fc gradient)
constexpr int kClCT = 3;  // output channels per register tile (weight gradient)

template <typename T>
void cl_build_g_rows(const T* go, const ClGeom& g, int64_t b, int64_t ya, int64_t yb, T* Gb) {
  const int64_t gpix = g.Cpg * g.dp, grow = g.Wf * gpix;
  for (int64_t y = ya; y < yb; ++y) {
    T* Grow = Gb + (y - ya) * grow;
    if (y < 0 || y >= g.H) {
      std::fill(Grow, Grow + grow, T(0));
      continue;
    }
    std::fill(Grow, Grow + g.r * gpix, T(0));
    std::fill(Grow + (g.r + g.W) * gpix, Grow + grow, T(0));
    for (int64_t x = 0; x < g.W; ++x) {
      const T* src = go + ((b * g.H + y) * g.W + x) * g.Cout;
      T* dst = Grow + (g.r + x) * gpix;
      for (int64_t c = 0; c < g.Cpg; ++c) {
        for (int64_t j = 0; j < g.d; ++j) dst[c * g.dp + j] = src[j * g.Cpg + c];
        for (int64_t j = g.d; j < g.dp; ++j) dst[c * g.dp + j] = T(0);
      }
    }
  }
}

template <typename T>
void backward_cl_impl(const T* go, const T* qkv, const T* fc, const T* bias, const T* Wt,
                      const ClGeom& g, T* gqkv, T* gWt, T* gfc, T* gbias) {
  constexpr int V = kLanes<T>;
  const int64_t tasks_per_image = (g.H + g.R - 1) / g.R, frow = g.Wf * g.pix;
  const int64_t k = g.k, k2 = k * k, r = g.r, Cin = g.M * g.d;
  const int64_t gpix = g.Cpg * g.dp, grow = g.Wf * gpix, gfrow = g.Wf * g.pix;
  const int64_t nW = g.Cpg * g.K2 * k2 * g.dp, nfc = g.K2 * g.M;
  const int64_t nthreads = at::get_num_threads();
  std::vector<T> partial(nthreads * (nW + (nfc + g.K2) * V), T(0));
  at::parallel_for(0, g.B * tasks_per_image, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<T> Fbuf, Gbuf, gFbuf, inbuf;
    Fbuf.resize((g.R + 2 * r) * frow);
    Gbuf.resize((g.R + 2 * r) * grow);
    gFbuf.resize(g.R * gfrow);
    inbuf.assign(g.M * g.dp, T(0));
    T* pW = partial.data() + at::get_thread_num() * (nW + (nfc + g.K2) * V);
    T* pfc = pW + nW;          // [p][m][V]
    T* pb = pfc + nfc * V;     // [p][V]
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tasks_per_image, y0 = (task % tasks_per_image) * g.R;
      const int64_t y1 = std::min(g.H, y0 + g.R), R = y1 - y0;
      cl_build_g_rows(go, g, b, y0 - r, y1 + r, Gbuf.data());
      cl_build_f_rows(qkv, fc, bias, g, b, y0 - r, y1 + r, Fbuf.data(), inbuf.data());
      // gF of f rows [y0, y1), columns [0, W) (tiles of 2 may compute column W too).
      for (int64_t yy = 0; yy < R; ++yy) {
        // G block row of image row y' - ty + r is yy - ty + 2r.
        const T* Gy = Gbuf.data() + (yy + 2 * r) * grow;
        T* gFy = gFbuf.data() + yy * gfrow;
        for (int64_t p0 = 0; p0 < g.K2; p0 += kClPT) {
          const int64_t np = std::min<int64_t>(kClPT, g.K2 - p0);
          for (int64_t j0 = 0; j0 < g.dp; j0 += V) {
            for (int64_t x0 = 0; x0 < g.W; x0 += 2) {
              T acc[2][kClPT][V] = {};
              for (int64_t c = 0; c < g.Cpg; ++c)
                for (int64_t ty = 0; ty < k; ++ty)
                  for (int64_t tx = 0; tx < k; ++tx) {
                    const T* __restrict__ gsrc =
                        Gy - ty * grow + (x0 - tx + 2 * r) * gpix + c * g.dp + j0;
                    const T* __restrict__ w =
                        Wt + ((c * g.K2 + p0) * k2 + ty * k + tx) * g.dp + j0;
#pragma GCC unroll 9
                    for (int q = 0; q < kClPT; ++q) {
                      if (q >= np) break;
#pragma omp simd
                      for (int v = 0; v < V; ++v) {
                        acc[0][q][v] += w[q * k2 * g.dp + v] * gsrc[v];
                        acc[1][q][v] += w[q * k2 * g.dp + v] * gsrc[gpix + v];
                      }
                    }
                  }
              for (int xx = 0; xx < 2; ++xx)
                for (int q = 0; q < np; ++q) {
                  T* dst = gFy + (x0 + xx) * g.pix + (p0 + q) * g.dp + j0;
#pragma omp simd
                  for (int v = 0; v < V; ++v) dst[v] = acc[xx][q][v];
                }
            }
          }
        }
      }
      // qkv gradient (fc^T gF), the bias gradient and the fc gradient (gF . input).
      for (int64_t yy = 0; yy < R; ++yy) {
        const int64_t y = y0 + yy;
        for (int64_t x = 0; x < g.W; ++x) {
          const T* gF = gFbuf.data() + yy * gfrow + x * g.pix;
          const T* in = cl_input_pixel(qkv + ((b * g.H + y) * g.W + x) * Cin, g, inbuf.data());
          T* gin = gqkv + ((b * g.H + y) * g.W + x) * Cin;
          for (int64_t j0 = 0; j0 < g.dp; j0 += V) {
            const int64_t nj = std::min<int64_t>(V, g.d - j0);
            for (int64_t m = 0; m < g.M; ++m) {
              T acc[V] = {};
              for (int64_t p = 0; p < g.K2; ++p) {
                const T w = fc[p * g.M + m];
                const T* __restrict__ gp = gF + p * g.dp + j0;
#pragma omp simd
                for (int v = 0; v < V; ++v) acc[v] += w * gp[v];
              }
              for (int64_t v = 0; v < nj; ++v) gin[m * g.d + j0 + v] = acc[v];
            }
            for (int64_t p = 0; p < g.K2; ++p) {
              const T* __restrict__ gp = gF + p * g.dp + j0;
#pragma omp simd
              for (int v = 0; v < V; ++v) pb[p * V + v] += gp[v];
            }
            for (int64_t p0 = 0; p0 < g.K2; p0 += kClPT) {
              const int64_t np = std::min<int64_t>(kClPT, g.K2 - p0);
              for (int64_t m0 = 0; m0 < g.M; m0 += kClMT) {
                const int64_t nm = std::min<int64_t>(kClMT, g.M - m0);
                T acc[kClPT][kClMT][V] = {};
#pragma GCC unroll 9
                for (int q = 0; q < kClPT; ++q) {
                  if (q >= np) break;
                  const T* __restrict__ gp = gF + (p0 + q) * g.dp + j0;
#pragma GCC unroll 3
                  for (int mm = 0; mm < kClMT; ++mm) {
                    if (mm >= nm) break;
                    const T* __restrict__ ip = in + (m0 + mm) * g.dp + j0;
#pragma omp simd
                    for (int v = 0; v < V; ++v) acc[q][mm][v] += gp[v] * ip[v];
                  }
                }
                for (int q = 0; q < np; ++q)
                  for (int mm = 0; mm < nm; ++mm) {
                    T* dst = pfc + ((p0 + q) * g.M + m0 + mm) * V;
#pragma omp simd
                    for (int v = 0; v < V; ++v) dst[v] += acc[q][mm][v];
                  }
              }
            }
          }
        }
      }
      // Grouped-conv weight gradient over the task's output rows:
      // gWt[c][p][t][j] += G[y][x][c][j] * F[y + ty - r][x + tx - r][p][j].
      for (int64_t c0 = 0; c0 < g.Cpg; c0 += kClCT) {
        const int64_t nc = std::min<int64_t>(kClCT, g.Cpg - c0);
        for (int64_t p = 0; p < g.K2; ++p)
          for (int64_t t0 = 0; t0 < k2; t0 += kClPT) {
            const int64_t nt = std::min<int64_t>(kClPT, k2 - t0);
            for (int64_t j0 = 0; j0 < g.dp; j0 += V) {
              T acc[kClCT][kClPT][V] = {};
              for (int64_t yy = 0; yy < R; ++yy) {
                const T* Grow = Gbuf.data() + (yy + r) * grow + r * gpix + j0;
                const T* Frow = Fbuf.data() + yy * frow + p * g.dp + j0;
                for (int64_t x = 0; x < g.W; ++x) {
                  const T* __restrict__ gx = Grow + x * gpix;
                  const T* __restrict__ fx = Frow + x * g.pix;
#pragma GCC unroll 9
                  for (int q = 0; q < kClPT; ++q) {
                    if (q >= nt) break;
                    const int64_t t = t0 + q;
                    const T* __restrict__ f = fx + (t / k) * frow + (t % k) * g.pix;
#pragma GCC unroll 3
                    for (int c = 0; c < kClCT; ++c) {
                      if (c >= nc) break;
#pragma omp simd
                      for (int v = 0; v < V; ++v) acc[c][q][v] += gx[(c0 + c) * g.dp + v] * f[v];
                    }
                  }
                }
              }
              for (int c = 0; c < nc; ++c)
                for (int q = 0; q < nt; ++q) {
                  T* dst = pW + (((c0 + c) * g.K2 + p) * k2 + t0 + q) * g.dp + j0;
#pragma omp simd
                  for (int v = 0; v < V; ++v) dst[v] += acc[c][q][v];
                }
            }
          }
      }
    }
  });
  for (int64_t th = 0; th < nthreads; ++th) {
    const T* part = partial.data() + th * (nW + (nfc + g.K2) * V);
    for (int64_t i = 0; i < nW; ++i) gWt[i] += part[i];
    for (int64_t i = 0; i < nfc; ++i)
      for (int v = 0; v < V; ++v) gfc[i] += part[nW + i * V + v];
    if (gbias)
      for (int64_t p = 0; p < g.K2; ++p)
        for (int v = 0; v < V; ++v) gbias[p] += part[nW + nfc * V + p * V + v];
  }
}

ClGeom cl_geometry(const at::Tensor& qkv, const at::Tensor& fc_w,
                   const c10::optional<at::Tensor>& fc_b, const at::Tensor& dep_w) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.dim() == 4 && qkv.is_contiguous(),
              "conv_path_cpu: qkv must be a contiguous CPU (B, H, W, 3C) tensor");
  const WeightDims w = check_weights(qkv, qkv.size(3), fc_w, fc_b, dep_w);
  ClGeom g;
  g.B = qkv.size(0);
  g.H = qkv.size(1);
  g.W = qkv.size(2);
  g.K2 = w.K2;
  g.M = w.M;
  g.k = w.k;
  g.d = w.d;
  g.Cout = dep_w.size(0);
  g.Cpg = g.Cout / g.d;
  g.r = g.k / 2;
  const int64_t V = qkv.scalar_type() == at::kDouble ? kLanes<double> : kLanes<float>;
  g.dp = round_up(g.d, V);
  g.pix = g.K2 * g.dp;
  g.Wf = g.W + 2 * g.r + kClX;
  // Rows per task: F within ~512 KiB (each task recomputes f on 2r extra rows).
  const int64_t row_bytes = g.Wf * g.pix * qkv.element_size();
  g.R = std::max<int64_t>(4, (int64_t(1) << 19) / row_bytes - 2 * g.r);
  g.R = std::min(g.R, g.H);
  return g;
}

// Wt[c][p][t][j] = dep_w[j * Cpg + c][p][t], zero for j >= d.
at::Tensor cl_weights(const at::Tensor& dep_w, const ClGeom& g) {
  at::Tensor Wt = at::zeros({g.Cpg, g.K2, g.k * g.k, g.dp}, dep_w.options());
  Wt.narrow(3, 0, g.d).copy_(dep_w.reshape({g.d, g.Cpg, g.K2, g.k * g.k}).permute({1, 2, 3, 0}));
  return Wt;
}

// Channels-last forward: qkv (B, H, W, M * d) contiguous, stride 1; returns
// (B, H, W, C_out).
at::Tensor conv_path_forward_cl(const at::Tensor& qkv, const at::Tensor& fc_w,
                                const c10::optional<at::Tensor>& fc_b, const at::Tensor& dep_w) {
  const ClGeom g = cl_geometry(qkv, fc_w, fc_b, dep_w);
  const at::Tensor Wt = cl_weights(dep_w, g);
  at::Tensor out = at::empty({g.B, g.H, g.W, g.Cout}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "conv_path_cpu_forward_cl", [&] {
    forward_cl_impl<scalar_t>(qkv.data_ptr<scalar_t>(), fc_w.data_ptr<scalar_t>(),
                              fc_b.has_value() ? fc_b->data_ptr<scalar_t>() : nullptr,
                              Wt.data_ptr<scalar_t>(), g, out.data_ptr<scalar_t>());
  });
  return out;
}

// Channels-last backward: returns (the gradient of qkv (B, H, W, M * d), of fc,
// of the fc bias (undefined without one), of the grouped-conv weight).
std::vector<at::Tensor> conv_path_backward_cl(const at::Tensor& grad_out, const at::Tensor& qkv,
                                              const at::Tensor& fc_w,
                                              const c10::optional<at::Tensor>& fc_b,
                                              const at::Tensor& dep_w) {
  const ClGeom g = cl_geometry(qkv, fc_w, fc_b, dep_w);
  at::Tensor go = grad_out.contiguous();
  TORCH_CHECK(go.sizes() == at::IntArrayRef({g.B, g.H, g.W, g.Cout}) &&
                  go.scalar_type() == qkv.scalar_type(),
              "conv_path_cpu: grad_out must be (B, H, W, C_out) of qkv's dtype");
  const at::Tensor Wt = cl_weights(dep_w, g);
  at::Tensor gqkv = at::empty_like(qkv);
  at::Tensor gWt = at::zeros_like(Wt);
  at::Tensor gfc = at::zeros_like(fc_w);
  at::Tensor gb = fc_b.has_value() ? at::zeros_like(*fc_b) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "conv_path_cpu_backward_cl", [&] {
    backward_cl_impl<scalar_t>(go.data_ptr<scalar_t>(), qkv.data_ptr<scalar_t>(),
                               fc_w.data_ptr<scalar_t>(),
                               fc_b.has_value() ? fc_b->data_ptr<scalar_t>() : nullptr,
                               Wt.data_ptr<scalar_t>(), g, gqkv.data_ptr<scalar_t>(),
                               gWt.data_ptr<scalar_t>(), gfc.data_ptr<scalar_t>(),
                               fc_b.has_value() ? gb.data_ptr<scalar_t>() : nullptr);
  });
  // gW[j * Cpg + c][p][t] = gWt[c][p][t][j]
  at::Tensor gW = gWt.narrow(3, 0, g.d).permute({3, 0, 1, 2}).reshape(dep_w.sizes()).contiguous();
  return {gqkv, gfc, gb, gW};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &conv_path_forward, "fused ACmix convolution path forward (CPU)",
        py::arg("qkv"), py::arg("fc_w"), py::arg("fc_b"), py::arg("dep_w"), py::arg("stride"),
        py::arg("mix_into") = py::none(), py::arg("alpha") = 1.0, py::arg("beta") = 1.0);
  m.def("backward", &conv_path_backward, "fused ACmix convolution path backward (CPU)");
  m.def("forward_cl", &conv_path_forward_cl,
        "fused ACmix convolution path forward on channels-last features (CPU, stride 1)");
  m.def("backward_cl", &conv_path_backward_cl,
        "fused ACmix convolution path backward on channels-last features (CPU, stride 1)");
}
