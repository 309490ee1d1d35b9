// Selective attention on CPU, fused: F formed per query block from its first row, never (B, Nq, Nk).
//
// Math (Leviathan, Kalman, Matias, "Selective Attention Improves Transformer", ICLR 2025, section 3), with
// query row i at key index i + offset (offset = Nk - Nq, bottom-right aligned):
//   S_t[i, j] = ReLU(q_t[i] . k_t[j]) for keys strictly earlier than row i (j < i + offset; j != 0 if BOS is
//               protected), else 0                                  (q_t already carries the term's scale)
//   F[i, j]   = start[j] + sum over terms t of w_t * sum over rows i' < i of S_t[i', j]
//   out       = softmax(q k^T - F, causal) v                        (q already carries the softmax scale)
// Query blocks of `rows` rows: G[b, block] = F's first row of the block (what the backward starts from);
// inside a block F is the exclusive cumulative sum of the block's S rows on top of it. F's columns are
// independent, so each block runs over tiles of `chunk` keys: with an online softmax across them in the forward
// (as flash attention), every per-tile buffer stays in the core's cache at any length.
//
// Backward, per block from last to first (dlogits = P * (dP - delta) per head as in flash attention):
//   dF[i, j]  = -sum over heads of dlogits[h, i, j]     (-F enters every head's logits)
//   dS[i', j] = sum over rows i > i' of dF[i, j]         (a reverse running sum, carried across blocks)
//   dL_t      = w_t * dS where S_t > 0, else 0;  d q_t = dL_t k_t (the caller applies the term's scale),
//   d k_t = dL_t^T q_t;  d start = the column sums of dF over all rows (`carry`).
//
// With no selection term it is plain attention (F = 0), with q/k and v of any two widths: residual attention's
// concatenated q and k (RealFormer) attend with the layer's own narrower v, which flash kernels refuse.
//
// Work is shared out over batch elements (one thread owns a batch element's outputs, so every sum runs in a
// fixed order); with fewer batch elements than threads the forward splits a batch element's heads and the
// backward a tile's kv-head groups, with the same sums in the same order: bit-identical results for any thread
// count. Inside, each block's matrix products call the
// BLAS that torch links (sgemm_/dgemm_, which inside the parallel region runs on the calling thread) on raw
// pointers: through ATen, the tensor views and dispatch of ~15k small products took ~10% of a step. The
// per-element work (mask, -F, exp, dlogits, the running sums) is fused into loops over a (rows, chunk) tile,
// head by head, F's tile made once for all heads.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

extern "C" {
// Fortran BLAS, as the BLAS torch links exports it (MKL on x86).
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
}

namespace {

using at::Tensor;

// Row-major C (m, n) = op(A) op(B) (+ C if accumulate); lda, ldb, ldc: the row lengths as stored. Column-major
// BLAS sees a row-major matrix as its transpose, so it is asked for C^T = op(B)^T op(A)^T.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B,
          int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int M = n, N = m, K = k, LA = ldb, LB = lda, LC = ldc;
  const T one = 1, beta = accumulate ? 1 : 0;
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&ta, &tb, &M, &N, &K, &one, B, &LA, A, &LB, &beta, C, &LC);
  } else {
    dgemm_(&ta, &tb, &M, &N, &K, &one, B, &LA, A, &LB, &beta, C, &LC);
  }
}

struct Shapes {
  int64_t B, H, Nq, D, Hkv, Nk, Dv, group, offset, rows, chunk, n_blocks;
  Shapes(const Tensor& q, const Tensor& k, const Tensor& v, int64_t rows_, int64_t chunk_)
      : B(q.size(0)), H(q.size(1)), Nq(q.size(2)), D(q.size(3)), Hkv(k.size(1)), Nk(k.size(2)),
        Dv(v.size(3)), group(q.size(1) / k.size(1)), offset(k.size(2) - q.size(2)), rows(rows_), chunk(chunk_),
        n_blocks((q.size(2) + rows_ - 1) / rows_) {}
  // Keys the rows of a block ending before row i1 can see at all (<= 0: none).
  int64_t keys(int64_t i1, bool causal) const { return causal ? std::min(Nk, i1 + offset) : Nk; }
  // Keys row i sees, counted from key c0 and at most cw of them.
  int64_t visible(int64_t i, int64_t c0, int64_t cw, bool causal) const {
    return causal ? std::clamp<int64_t>(i + offset + 1 - c0, 0, cw) : cw;
  }
  // Keys strictly earlier than row i (where S may be non-zero), counted from key c0, at most cw.
  int64_t earlier(int64_t i, int64_t c0, int64_t cw) const { return std::clamp<int64_t>(i + offset - c0, 0, cw); }
};

// A tile: rows [i0, i0 + n) of one query block against keys [c0, c0 + cw).
struct Tile {
  int64_t i0, n, c0, cw;
};

// One selection term as raw pointers: q (B, Nq, Ds) with its scale folded in, k (B, Nk, Ds).
template <typename T>
struct Term {
  const T* q;
  const T* k;
  int64_t dim;
  T weight;
  bool protect_bos;
};

template <typename T>
std::vector<Term<T>> terms_of(const std::vector<Tensor>& sel_q, const std::vector<Tensor>& sel_k,
                              const std::vector<double>& weights, const std::vector<bool>& protect_bos) {
  std::vector<Term<T>> terms;
  for (size_t t = 0; t < sel_q.size(); ++t) {
    terms.push_back({sel_q[t].data_ptr<T>(), sel_k[t].data_ptr<T>(), sel_q[t].size(2), static_cast<T>(weights[t]),
                     protect_bos[t]});
  }
  return terms;
}

// S of a tile of batch element b into S (n, cw): ReLU of the product on strictly earlier keys (never BOS if
// protected), 0 elsewhere.
template <typename T>
void selection_scores(const Shapes& s, const Term<T>& term, int64_t b, const Tile& x, T* S) {
  gemm<T>(false, true, x.n, x.cw, term.dim, term.q + (b * s.Nq + x.i0) * term.dim, term.dim,
          term.k + (b * s.Nk + x.c0) * term.dim, term.dim, S, x.cw, false);
  const int64_t first = std::min<int64_t>(term.protect_bos && x.c0 == 0 ? 1 : 0, x.cw);
  for (int64_t r = 0; r < x.n; ++r) {
    T* row = S + r * x.cw;
    const int64_t last = std::max(s.earlier(x.i0 + r, x.c0, x.cw), first);
    std::fill(row, row + first, T(0));
#pragma omp simd
    for (int64_t j = first; j < last; ++j) row[j] = row[j] <= 0 ? T(0) : row[j];  // ReLU; NaN stays NaN
    std::fill(row + last, row + x.cw, T(0));
  }
}

// F of a tile into F (n, cw): `first_row` (the tile's cw columns of F's first block row) plus the exclusive
// running sum of the weighted S rows; `first_row` is advanced past the block.
template <typename T>
void tile_penalty(const std::vector<Term<T>>& terms, const std::vector<std::vector<T>>& S, const Tile& x,
                  T* first_row, T* F) {
  for (int64_t r = 0; r < x.n; ++r) {
    std::copy_n(first_row, x.cw, F + r * x.cw);
    for (size_t t = 0; t < terms.size(); ++t) {
      const T* srow = S[t].data() + r * x.cw;
      const T w = terms[t].weight;
#pragma omp simd
      for (int64_t j = 0; j < x.cw; ++j) first_row[j] += w * srow[j];
    }
  }
}

// exp(x) for the shifted logits (x <= ~0: the logits minus their row max or log-sum-exp). float: x = n ln2 + r
// with n = round(x / ln2) and r taken in two parts of ln2 (Cody-Waite), exp(r) by the degree-6 minimax
// polynomial of Cephes' expf (within ~1 ulp of the correctly rounded exp over |r| <= ln2 / 2), times 2^n set
// in the exponent bits: plain code that the compiler vectorizes. (A degree-5 polynomial of ~1e-6 relative
// error, as PyTorch's CPU flash kernel uses, moved reductions such as differential attention's lambda
// gradients past fp32 tolerance.) Below x = -60 it returns 0: such a probability is under 1e-26 of the row's
// largest, below fp32 resolution even summed over a million keys, while letting it through makes denormals,
// in exp and in every product with it, at ~50 ns each (16k exps whose results are denormal: 830 us against
// 30 us; selective attention's F makes most of a long row's far keys that small). double: std::exp.
inline float exp_shifted(float x) {
  constexpr float cutoff = -60.0f, log2e = 1.44269504089f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  const float keep = x < cutoff ? 0.0f : 1.0f;  // selects, not branches: the loop stays vectorized
  x = x < cutoff ? cutoff : x;
  const float n = std::floor(x * log2e + 0.5f);
  const float r = (x - n * ln2_hi) - n * ln2_lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-87, 1]
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return keep * (p * two_n);
}
inline double exp_shifted(double x) { return std::exp(x); }

// Forward, one head's tile: logits L (n, cw) -> exp(L - F - m_new) over each row's visible keys, 0 elsewhere,
// with the online softmax's running row max m and sum l updated and the output rows o (n, Dv) rescaled to the
// new max (flash attention's recurrence); the caller then adds P v. F null: no selection (F = 0).
template <typename T>
void online_probabilities(const Shapes& s, bool causal, const Tile& x, const T* __restrict F, T* __restrict L,
                          T* m, T* l, T* o) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < x.n; ++r) {
    T* __restrict row = L + r * x.cw;
    const int64_t vis = s.visible(x.i0 + r, x.c0, x.cw, causal);
    if (F != nullptr) {
      const T* __restrict frow = F + r * x.cw;
#pragma omp simd
      for (int64_t j = 0; j < vis; ++j) row[j] -= frow[j];
    }
    T top = -inf;
#pragma omp simd reduction(max : top)
    for (int64_t j = 0; j < vis; ++j) top = row[j] > top ? row[j] : top;
    if (vis > 0 && top > m[r]) {  // a new max: earlier tiles' sum and output shrink by exp(old - new)
      const T shrink = std::exp(m[r] - top);
      l[r] *= shrink;
      for (int64_t d = 0; d < s.Dv; ++d) o[r * s.Dv + d] *= shrink;
      m[r] = top;
    }
    const T c = m[r];
    T total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < vis; ++j) {
      row[j] = exp_shifted(row[j] - c);
      total += row[j];
    }
    l[r] += total;
    std::fill(row + vis, row + x.cw, T(0));
  }
}

// Backward, one head's tile: logits L (n, cw) -> the probabilities exp(L - F - lse) over each row's visible
// keys, 0 elsewhere. F null: no selection (F = 0).
template <typename T>
void probabilities(const Shapes& s, bool causal, const Tile& x, const T* __restrict F, T* __restrict L,
                   const T* lse) {
  for (int64_t r = 0; r < x.n; ++r) {
    T* __restrict row = L + r * x.cw;
    const int64_t vis = s.visible(x.i0 + r, x.c0, x.cw, causal);
    const T c = lse[r];
    if (F != nullptr) {
      const T* __restrict frow = F + r * x.cw;
#pragma omp simd
      for (int64_t j = 0; j < vis; ++j) row[j] = exp_shifted(row[j] - frow[j] - c);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < vis; ++j) row[j] = exp_shifted(row[j] - c);
    }
    std::fill(row + vis, row + x.cw, T(0));
  }
}

template <typename T>
std::vector<Tensor> forward_impl(const Tensor& q_, const Tensor& k_, const Tensor& v_, const std::vector<Term<T>>& terms,
                                 const Tensor& start_, bool causal, int64_t rows, int64_t chunk) {
  const Shapes s(q_, k_, v_, rows, chunk);
  auto out_ = at::zeros({s.B, s.H, s.Nq, s.Dv}, q_.options());
  auto lse_ = at::empty({s.B, s.H, s.Nq}, q_.options());
  auto G_ = at::empty({s.B, s.n_blocks, s.Nk}, q_.options());
  const T *q = q_.data_ptr<T>(), *k = k_.data_ptr<T>(), *v = v_.data_ptr<T>(), *start = start_.data_ptr<T>();
  T *out = out_.data_ptr<T>(), *lse = lse_.data_ptr<T>(), *G = G_.data_ptr<T>();
  const int64_t width = std::min(rows, s.Nq) * std::min(chunk, s.Nk);
  const bool selective = !terms.empty();

  // Tasks: batch elements, each split into `parts` ranges of heads when there are fewer batch elements than
  // threads (generation's prefill runs B = 1). Each part repeats the block's S and F (one head's q.k work per
  // term) and the same running sums in the same order, so every part's F is the same; part 0 writes G.
  const int64_t parts = std::clamp<int64_t>((at::get_num_threads() + s.B - 1) / s.B, 1, s.H);
  at::parallel_for(0, s.B * parts, 1, [&](int64_t task0, int64_t task1) {
    std::vector<std::vector<T>> S(terms.size(), std::vector<T>(width));
    std::vector<T> F(selective ? width : 0), L(width), running(s.Nk), m(s.H * rows), l(s.H * rows);
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t b = task / parts, part = task % parts;
      const int64_t h0 = part * s.H / parts, h1 = (part + 1) * s.H / parts;
      std::copy_n(start + b * s.Nk, s.Nk, running.data());
      for (int64_t block = 0; block < s.n_blocks; ++block) {
        const int64_t i0 = block * rows, n = std::min(s.Nq, i0 + rows) - i0;
        const int64_t keys = s.keys(i0 + n, causal);
        if (part == 0) std::copy_n(running.data(), s.Nk, G + (b * s.n_blocks + block) * s.Nk);
        std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
        std::fill(l.begin(), l.end(), T(0));
        for (int64_t c0 = 0; c0 < keys; c0 += chunk) {
          const Tile x{i0, n, c0, std::min(chunk, keys - c0)};
          for (size_t t = 0; t < terms.size(); ++t) selection_scores<T>(s, terms[t], b, x, S[t].data());
          if (selective) tile_penalty<T>(terms, S, x, running.data() + c0, F.data());
          for (int64_t h = h0; h < h1; ++h) {
            const int64_t g = h / s.group, row0 = (b * s.H + h) * s.Nq + i0;
            gemm<T>(false, true, n, x.cw, s.D, q + row0 * s.D, s.D, k + ((b * s.Hkv + g) * s.Nk + c0) * s.D, s.D,
                    L.data(), x.cw, false);
            T* o = out + row0 * s.Dv;
            online_probabilities<T>(s, causal, x, selective ? F.data() : nullptr, L.data(), m.data() + h * rows,
                                    l.data() + h * rows, o);
            gemm<T>(false, false, n, s.Dv, x.cw, L.data(), x.cw, v + ((b * s.Hkv + g) * s.Nk + c0) * s.Dv, s.Dv,
                    o, s.Dv, true);
          }
        }
        for (int64_t h = h0; h < h1; ++h) {  // normalise; lse = max + log(sum); a row that sees no key: 0, +inf
          const int64_t row0 = (b * s.H + h) * s.Nq + i0;
          for (int64_t r = 0; r < n; ++r) {
            const T sum = l[h * rows + r];
            const bool blind = !(sum > 0);
            const T inv = blind ? T(0) : T(1) / sum;
            for (int64_t d = 0; d < s.Dv; ++d) out[(row0 + r) * s.Dv + d] *= inv;
            lse[row0 + r] = blind ? std::numeric_limits<T>::infinity() : m[h * rows + r] + std::log(sum);
          }
        }
      }
    }
  });
  return {out_, lse_, G_};
}

// Backward, one group's heads (those sharing kv head g) on one tile: dv, dk and the heads' dq rows, and (when
// `ds` is given) the sum over those heads of dlogits into ds (n, cw), overwritten. P and dP: (n, cw) scratch.
template <typename T>
struct GroupBackward {
  const Shapes& s;
  bool causal;
  const T *q, *k, *v, *dout, *lse, *delta;
  T *dq, *dk, *dv;

  void operator()(int64_t b, int64_t g, const Tile& x, const T* F, T* P, T* dP, T* ds) const {
    const int64_t n = x.n, c0 = x.c0, i0 = x.i0;
    const bool first_tile = c0 == 0;  // the rows' dq are written, later tiles add to them
    const T* k_c = k + ((b * s.Hkv + g) * s.Nk + c0) * s.D;
    const T* v_c = v + ((b * s.Hkv + g) * s.Nk + c0) * s.Dv;
    T* dk_c = dk + ((b * s.Hkv + g) * s.Nk + c0) * s.D;
    T* dv_c = dv + ((b * s.Hkv + g) * s.Nk + c0) * s.Dv;
    if (ds != nullptr) std::fill_n(ds, n * x.cw, T(0));
    for (int64_t h = g * s.group; h < (g + 1) * s.group; ++h) {
      const int64_t row0 = (b * s.H + h) * s.Nq + i0;
      const T *q_blk = q + row0 * s.D, *do_blk = dout + row0 * s.Dv;
      gemm<T>(false, true, n, x.cw, s.D, q_blk, s.D, k_c, s.D, P, x.cw, false);
      probabilities<T>(s, causal, x, F, P, lse + row0);
      gemm<T>(false, true, n, x.cw, s.Dv, do_blk, s.Dv, v_c, s.Dv, dP, x.cw, false);
      gemm<T>(true, false, x.cw, s.Dv, n, P, x.cw, do_blk, s.Dv, dv_c, s.Dv, true);
      for (int64_t r = 0; r < n; ++r) {
        const T dr = delta[row0 + r];
        const T* p = P + r * x.cw;
        T* dp = dP + r * x.cw;
#pragma omp simd
        for (int64_t j = 0; j < x.cw; ++j) dp[j] = p[j] * (dp[j] - dr);
        if (ds != nullptr) {
          T* d = ds + r * x.cw;
#pragma omp simd
          for (int64_t j = 0; j < x.cw; ++j) d[j] += dp[j];
        }
      }
      gemm<T>(false, false, n, s.D, x.cw, dP, x.cw, k_c, s.D, dq + row0 * s.D, s.D, !first_tile);
      gemm<T>(true, false, x.cw, s.D, n, dP, x.cw, q_blk, s.D, dk_c, s.D, true);
    }
  }
};

template <typename T>
std::vector<Tensor> backward_impl(const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& dout_,
                                  const Tensor& lse_, const Tensor& delta_, const Tensor& G_,
                                  const std::vector<Term<T>>& terms, const std::vector<Tensor>& sel_q,
                                  const std::vector<Tensor>& sel_k, bool causal, int64_t rows, int64_t chunk) {
  const Shapes s(q_, k_, v_, rows, chunk);
  auto dq_ = at::zeros_like(q_), dk_ = at::zeros_like(k_), dv_ = at::zeros_like(v_);
  std::vector<Tensor> d_sel_q, d_sel_k;
  for (size_t t = 0; t < terms.size(); ++t) {
    d_sel_q.push_back(at::zeros_like(sel_q[t]));
    d_sel_k.push_back(at::zeros_like(sel_k[t]));
  }
  auto carry_ = at::zeros({s.B, s.Nk}, q_.options());  // per batch element: column sums of dF over the rows done
  const T *G = G_.data_ptr<T>();
  T* carry = carry_.data_ptr<T>();
  const int64_t width = std::min(rows, s.Nq) * std::min(chunk, s.Nk);
  const bool selective = !terms.empty();
  const GroupBackward<T> group_backward{s, causal, q_.data_ptr<T>(), k_.data_ptr<T>(), v_.data_ptr<T>(),
                                        dout_.data_ptr<T>(), lse_.data_ptr<T>(), delta_.data_ptr<T>(),
                                        dq_.data_ptr<T>(), dk_.data_ptr<T>(), dv_.data_ptr<T>()};

  // Tasks: batch elements, or, with fewer batch elements than threads, a tile's kv-head groups (a group's heads
  // share their dk and dv rows, so one thread owns a group). Either way the sum over heads of dlogits is
  // formed per group and the groups' sums are added in group order: the same bits for any thread count.
  const bool split_groups = s.B < at::get_num_threads() && s.Hkv > 1;
  auto batch_element = [&](int64_t b, std::vector<T>& P, std::vector<T>& dP, std::vector<T>& partial) {
    std::vector<std::vector<T>> S(terms.size(), std::vector<T>(width));
    std::vector<T> F(selective ? width : 0), dsum(selective ? width : 0), first_row(s.Nk);
    const T* F_or_null = selective ? F.data() : nullptr;
    for (int64_t block = s.n_blocks - 1; block >= 0; --block) {
      const int64_t i0 = block * rows, n = std::min(s.Nq, i0 + rows) - i0;
      const int64_t keys = s.keys(i0 + n, causal);
      std::copy_n(G + (b * s.n_blocks + block) * s.Nk, std::max<int64_t>(keys, 0), first_row.data());
      for (int64_t c0 = 0; c0 < keys; c0 += chunk) {
        const Tile x{i0, n, c0, std::min(chunk, keys - c0)};
        const bool first_tile = c0 == 0;
        for (size_t t = 0; t < terms.size(); ++t) selection_scores<T>(s, terms[t], b, x, S[t].data());
        if (selective) tile_penalty<T>(terms, S, x, first_row.data() + c0, F.data());
        T* ds = selective ? dsum.data() : nullptr;  // sum over heads of dlogits (= -dF), then dS
        const int64_t area = n * x.cw;
        auto add = [&](const T* part) {
#pragma omp simd
          for (int64_t e = 0; e < area; ++e) ds[e] += part[e];
        };
        if (split_groups) {  // group g's sum into partial's g-th slot (into ds itself for group 0)
          at::parallel_for(0, s.Hkv, 1, [&](int64_t g0, int64_t g1) {
            for (int64_t g = g0; g < g1; ++g) {
              T* sum = ds == nullptr ? nullptr : g == 0 ? ds : partial.data() + g * width;
              group_backward(b, g, x, F_or_null, P.data() + g * width, dP.data() + g * width, sum);
            }
          });
          for (int64_t g = 1; ds != nullptr && g < s.Hkv; ++g) add(partial.data() + g * width);
        } else {
          for (int64_t g = 0; g < s.Hkv; ++g) {
            T* sum = ds == nullptr ? nullptr : g == 0 ? ds : partial.data();
            group_backward(b, g, x, F_or_null, P.data(), dP.data(), sum);
            if (ds != nullptr && g > 0) add(partial.data());
          }
        }
        if (!selective) continue;
        // dS[r] = sum of dF over the rows after r (this block's, and the later blocks' in c); dF = -dsum.
        T* c = carry + b * s.Nk + c0;
        for (int64_t r = n - 1; r >= 0; --r) {
          T* row = ds + r * x.cw;
#pragma omp simd
          for (int64_t j = 0; j < x.cw; ++j) {
            const T minus_dF = row[j];
            row[j] = c[j];
            c[j] -= minus_dF;
          }
        }
        for (size_t t = 0; t < terms.size(); ++t) {
          T* dL = S[t].data();
          const Term<T>& term = terms[t];
          const T w = term.weight;
#pragma omp simd
          for (int64_t e = 0; e < area; ++e) dL[e] = dL[e] > 0 ? w * ds[e] : T(0);  // w dS where S > 0
          gemm<T>(false, false, n, term.dim, x.cw, dL, x.cw, term.k + (b * s.Nk + c0) * term.dim, term.dim,
                  d_sel_q[t].data_ptr<T>() + (b * s.Nq + i0) * term.dim, term.dim, !first_tile);
          gemm<T>(true, false, x.cw, term.dim, n, dL, x.cw, term.q + (b * s.Nq + i0) * term.dim, term.dim,
                  d_sel_k[t].data_ptr<T>() + (b * s.Nk + c0) * term.dim, term.dim, true);
        }
      }
    }
  };

  if (split_groups) {
    std::vector<T> P(s.Hkv * width), dP(s.Hkv * width), partial(selective ? s.Hkv * width : 0);
    for (int64_t b = 0; b < s.B; ++b) batch_element(b, P, dP, partial);
  } else {
    at::parallel_for(0, s.B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<T> P(width), dP(width), partial(selective ? width : 0);
      for (int64_t b = b0; b < b1; ++b) batch_element(b, P, dP, partial);
    });
  }
  std::vector<Tensor> result{dq_, dk_, dv_, carry_};
  result.insert(result.end(), d_sel_q.begin(), d_sel_q.end());
  result.insert(result.end(), d_sel_k.begin(), d_sel_k.end());
  return result;
}

void check(const Tensor& q, const Tensor& k, const Tensor& v, const std::vector<Tensor>& sel_q,
           const std::vector<Tensor>& sel_k, const std::vector<double>& weights,
           const std::vector<bool>& protect_bos, int64_t rows, int64_t chunk) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be (B, heads, N, head dim)");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(rows > 0 && chunk > 0, "rows and chunk must be positive");
  TORCH_CHECK(sel_q.size() == sel_k.size() && sel_q.size() == weights.size() && sel_q.size() == protect_bos.size(),
              "one q, k, weight and protect_bos per selection term (none: plain attention)");
  TORCH_CHECK(q.size(3) == k.size(3) && k.size(2) == v.size(2) && q.size(0) == k.size(0) && k.size(0) == v.size(0) &&
                  k.size(1) == v.size(1),
              "q (B, H, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) expected");
  for (const Tensor& t : {q, k, v}) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == q.scalar_type(), "q, k, v must be CPU tensors of one dtype");
  }
  for (size_t t = 0; t < sel_q.size(); ++t) {
    TORCH_CHECK(sel_q[t].scalar_type() == q.scalar_type() && sel_k[t].scalar_type() == q.scalar_type(),
                "selection q and k must be of q's dtype");
  }
}

// Contiguous copies where needed (a no-op for contiguous tensors; under torch.compile an input's strides may
// differ from eager's).
std::vector<Tensor> contiguous(const std::vector<Tensor>& tensors) {
  std::vector<Tensor> result;
  for (const Tensor& t : tensors) result.push_back(t.contiguous());
  return result;
}

std::vector<Tensor> forward(const Tensor& q, const Tensor& k, const Tensor& v, const std::vector<Tensor>& sel_q,
                            const std::vector<Tensor>& sel_k, const std::vector<double>& weights,
                            const std::vector<bool>& protect_bos, const Tensor& start, bool causal,
                            int64_t rows, int64_t chunk) {
  check(q, k, v, sel_q, sel_k, weights, protect_bos, rows, chunk);
  TORCH_CHECK(start.scalar_type() == q.scalar_type(), "start must be of q's dtype");
  const auto in = contiguous({q, k, v, start});
  const auto sq = contiguous(sel_q), sk = contiguous(sel_k);
  std::vector<Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "selective_forward", [&] {
    result = forward_impl<scalar_t>(in[0], in[1], in[2], terms_of<scalar_t>(sq, sk, weights, protect_bos), in[3],
                                    causal, rows, chunk);
  });
  return result;
}

std::vector<Tensor> backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout,
                             const Tensor& lse, const Tensor& delta, const Tensor& G,
                             const std::vector<Tensor>& sel_q, const std::vector<Tensor>& sel_k,
                             const std::vector<double>& weights, const std::vector<bool>& protect_bos,
                             bool causal, int64_t rows, int64_t chunk) {
  check(q, k, v, sel_q, sel_k, weights, protect_bos, rows, chunk);
  for (const Tensor& t : {dout, lse, delta, G}) {
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "dout, lse, delta and G must be of q's dtype");
  }
  const auto in = contiguous({q, k, v, dout, lse, delta, G});
  const auto sq = contiguous(sel_q), sk = contiguous(sel_k);
  std::vector<Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "selective_backward", [&] {
    result = backward_impl<scalar_t>(in[0], in[1], in[2], in[3], in[4], in[5], in[6],
                                     terms_of<scalar_t>(sq, sk, weights, protect_bos), sq, sk, causal, rows, chunk);
  });
  return result;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "out, lse, G of selective attention (see the file's header)",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, "dq, dk, dv, carry, d selection q per term, d selection k per term",
        py::call_guard<py::gil_scoped_release>());
}
