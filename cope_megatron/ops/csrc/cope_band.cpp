// CoPE's band math on CPU: the gate, reverse-cumulative-sum, interpolation and softmax
// passes of ops/cope/blocks.py fused into one sweep down the keys (the backward adds a
// cumulative sum back up), the matmuls left to torch. Logits arrive transposed,
// [keys][rows], so that SIMD lanes are rows: each lane keeps its own running gate sum, and
// one key step is one vector op. ops/cope/native.py calls it (ops/native_build.py builds it).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "vector_math.h"

namespace {

constexpr int kLanes = 16;

// One band batch: `problems` = batch·heads·blocks matrices of `keys` × `rows` logits.
// Block n of a problem (n = problem % blocks) holds rows row0[n] + r against keys
// key0[n] + j; causal: key j is row i's iff i − width < j ≤ i (else all are).
struct Band {
  int64_t problems, blocks, rows, keys, npos, npos_max, width, causal;
  double scale;
  const int64_t* row0;
  const int64_t* key0;
  const void* z;      // [problems][rows][npos]
  const void* carry;  // [problems][rows]
};

// One work item: up to kLanes rows of one problem.
template <typename T>
struct Group {
  int64_t problem, first_row, lanes, offset;  // offset: its lane 0 in [problems][keys][rows]
  int64_t key0, row;  // its block's first key, its first row's index
  const T* z;
  const T* carry;
  int npos;
  T scale, last;  // last: npos_max − 1, where positions clamp

  Group(const Band& b, int64_t item) {
    const int64_t groups = (b.rows + kLanes - 1) / kLanes;
    problem = item / groups, first_row = item % groups * kLanes;
    lanes = std::min<int64_t>(kLanes, b.rows - first_row);
    offset = problem * b.keys * b.rows + first_row;
    key0 = b.key0[problem % b.blocks];
    row = b.row0[problem % b.blocks] + first_row;
    z = static_cast<const T*>(b.z) + (problem * b.rows + first_row) * b.npos;
    carry = static_cast<const T*>(b.carry) + problem * b.rows + first_row;
    npos = static_cast<int>(b.npos), scale = static_cast<T>(b.scale);
    last = static_cast<T>(b.npos_max - 1);
  }

  // Lanes first ≤ l < end have key j in their band (int32, so that lanes stay 16 wide).
  void band(const Band& b, int64_t j, int& first, int& end) const {
    if (!b.causal) {
      first = 0, end = kLanes;
      return;
    }
    const int64_t rel = key0 + j - row;  // lane l's row sees the key iff rel ≤ l < rel + W
    first = static_cast<int>(std::clamp<int64_t>(rel, 0, kLanes));
    end = static_cast<int>(std::clamp<int64_t>(rel + b.width, 0, kLanes));
  }
};

// A sweep's per-lane state at one key: what every sweep derives from the raw logits and
// the lanes' running gate sums, by the same code in each, so all see the same positions.
template <typename T>
struct Sweep {
  T sum[kLanes];                 // gate sum from the key to the row, plus the carry
  T x[kLanes], g[kLanes];        // scaled logit, gate (0 off the band)
  T frac[kLanes];                // position − ⌊position⌋
  T unclamped[kLanes];           // keys so far in the band at or below npos_max − 1
  int lo[kLanes], next[kLanes];  // ⌊position⌋ at the previous key, at this one
  T zl[kLanes], zd[kLanes];      // z[lo], z[lo + 1] − z[lo] (0 at the table's end)

  __attribute__((always_inline)) Sweep(const Group<T>& c, int lanes) {
    for (int l = 0; l < lanes; ++l) sum[l] = c.carry[l], unclamped[l] = 0, next[l] = 0;
    refresh(c, lanes);
  }

  // Moves to the key whose raw logits are a; returns how many lanes' ⌊position⌋ moved
  // (`next` then differs from `lo` until `refresh`).
  __attribute__((always_inline)) int step(const Group<T>& c, const T* a, int lanes, int first,
                                          int end) {
    int moved = 0;
#pragma omp simd reduction(+ : moved)
    for (int l = 0; l < lanes; ++l) {
      x[l] = c.scale * a[l];
      const bool valid = (l >= first) & (l < end);
      g[l] = valid ? T(1) / (T(1) + exp_(-x[l])) : T(0);
      sum[l] += g[l];
      unclamped[l] += valid & (sum[l] <= c.last) ? T(1) : T(0);
      const T p = std::min(sum[l], c.last);
      const int floor_p = static_cast<int>(p);
      next[l] = floor_p > 0 ? floor_p : 0;  // a NaN gate sum must not index out of the table
      frac[l] = p - static_cast<T>(next[l]);
      moved += next[l] != lo[l];
    }
    return moved;
  }

  // Positions only grow down the sweep, so a lane's ⌊position⌋ moves at most npos_max
  // times: the table is read (a gather, the costliest load) only then.
  __attribute__((always_inline)) void refresh(const Group<T>& c, int lanes) {
#pragma omp simd
    for (int l = 0; l < lanes; ++l) {
      const int at = l * c.npos + next[l];
      lo[l] = next[l];
      zl[l] = c.z[at];
      zd[l] = c.z[at + (next[l] < c.npos - 1)] - zl[l];
    }
  }
};

// Full groups have a constant lane count, so their per-lane state fits vector registers.
template <typename T, bool Full>
void forward_group(const Band& b, const Group<T>& c, T* a, T* max_out, T* norm_out,
                   T* unclamped, T* total) {
  const int lanes = Full ? kLanes : static_cast<int>(c.lanes);
  const T inf = std::numeric_limits<T>::infinity();
  T hi[kLanes], norm[kLanes];
  for (int l = 0; l < lanes; ++l) hi[l] = -inf, norm[l] = 0;
  Sweep<T> s(c, lanes);
  for (int64_t j = b.keys - 1; j >= 0; --j) {
    T* row_a = a + c.offset + j * b.rows;
    int first, end;
    c.band(b, j, first, end);
    if (s.step(c, row_a, lanes, first, end)) s.refresh(c, lanes);
#pragma omp simd
    for (int l = 0; l < lanes; ++l) {
      const bool valid = (l >= first) & (l < end);
      const T logit = s.x[l] + s.zl[l] + s.frac[l] * s.zd[l];
      const T kept = valid ? logit : -inf;
      hi[l] = kept > hi[l] ? kept : hi[l];  // (std::max would not vectorize)
      row_a[l] = kept;
    }
  }
  for (int64_t j = 0; j < b.keys; ++j) {
    T* row_a = a + c.offset + j * b.rows;
#pragma omp simd
    for (int l = 0; l < lanes; ++l) {
      const T e = row_a[l] == -inf ? T(0) : exp_(row_a[l] - hi[l]);
      row_a[l] = e;
      norm[l] += e;
    }
  }
  const int64_t r = c.problem * b.rows + c.first_row;
  for (int l = 0; l < lanes; ++l) {
    max_out[r + l] = hi[l], norm_out[r + l] = norm[l], unclamped[r + l] = s.unclamped[l];
    total[r + l] = s.sum[l];
  }
}

template <typename T, bool Full>
void backward_group(const Band& b, const Group<T>& c, T* a, T* d, T* p, T* dp, const T* lse,
                    const T* delta, T* dz, T* dp_sum) {
  const int lanes = Full ? kLanes : static_cast<int>(c.lanes);
  const int64_t r = c.problem * b.rows + c.first_row;
  T* dz_rows = dz + r * c.npos;
  std::vector<T> dzd(lanes * c.npos, T(0));
  std::fill(dz_rows, dz_rows + lanes * c.npos, T(0));
  // A lane's dz entries are sums over the runs of keys at one ⌊position⌋: summed in
  // registers and written when the run ends (a scatter per key would not vectorize).
  T dl_sum[kLanes], run_dz[kLanes], run_dzd[kLanes];
  for (int l = 0; l < lanes; ++l) dl_sum[l] = run_dz[l] = run_dzd[l] = 0;
  Sweep<T> s(c, lanes);
  for (int64_t j = b.keys - 1; j >= 0; --j) {
    const int64_t at = c.offset + j * b.rows;
    int first, end;
    c.band(b, j, first, end);
    if (s.step(c, a + at, lanes, first, end)) {
      for (int l = 0; l < lanes; ++l)
        if (s.next[l] != s.lo[l]) {
          dz_rows[l * c.npos + s.lo[l]] += run_dz[l];
          dzd[l * c.npos + s.lo[l]] += run_dzd[l];
          run_dz[l] = run_dzd[l] = 0;
        }
      s.refresh(c, lanes);
    }
#pragma omp simd
    for (int l = 0; l < lanes; ++l) {
      const bool valid = (l >= first) & (l < end);
      const T logit = s.x[l] + s.zl[l] + s.frac[l] * s.zd[l];
      const T prob = valid ? exp_(logit - lse[r + l]) : T(0);
      const T dl = prob * (d[at + l] - delta[r + l]);
      p[at + l] = prob;
      d[at + l] = dl;
      dl_sum[l] += dl;
      dp[at + l] = s.sum[l] <= c.last ? dl * s.zd[l] : T(0);
      a[at + l] = s.g[l] * (T(1) - s.g[l]);  // a is spent: keep dg/da for the sum back
      run_dz[l] += dl;
      run_dzd[l] += dl * s.frac[l];
    }
  }
  for (int l = 0; l < lanes; ++l) {
    dz_rows[l * c.npos + s.lo[l]] += run_dz[l];
    dzd[l * c.npos + s.lo[l]] += run_dzd[l];
  }
  // dL/dg_t = Σ_{j ≤ t} dp_j: a cumulative sum up the keys, the other way from the sweep.
  T dg[kLanes];
  for (int l = 0; l < lanes; ++l) dg[l] = 0;
  for (int64_t j = 0; j < b.keys; ++j) {
    const int64_t at = c.offset + j * b.rows;
#pragma omp simd
    for (int l = 0; l < lanes; ++l) {
      dg[l] += dp[at + l];
      d[at + l] += dg[l] * a[at + l];
    }
  }
  // dz from the interpolation's (z, zd) form back to z's entries; the keys beyond the
  // band, all at the last position, get the rest of the row's logit gradients, which sum
  // to zero.
  for (int l = 0; l < lanes; ++l) {
    T* row_dz = dz_rows + l * c.npos;
    const T* row_dzd = dzd.data() + l * c.npos;
    for (int n = c.npos - 1; n >= 1; --n) row_dz[n] += row_dzd[n - 1];
    for (int n = 0; n + 1 < c.npos; ++n) row_dz[n] -= row_dzd[n];
    row_dz[b.npos_max - 1] -= dl_sum[l];
    dp_sum[r + l] = dg[l];
  }
}

// In: a, the logits' raw products q·k. Out: exp(logit − row max) in a (0 off the band),
// the row max and Σ of those, the keys at or below npos_max − 1, the gate total + carry.
template <typename T>
void forward(const Band& b, T* a, T* max_out, T* norm_out, T* unclamped, T* total) {
  const int64_t items = b.problems * ((b.rows + kLanes - 1) / kLanes);
#pragma omp parallel for schedule(static)
  for (int64_t item = 0; item < items; ++item) {
    const Group<T> c(b, item);
    if (c.lanes == kLanes)
      forward_group<T, true>(b, c, a, max_out, norm_out, unclamped, total);
    else
      forward_group<T, false>(b, c, a, max_out, norm_out, unclamped, total);
  }
}

// In: a, the logits' raw products q·k; d = dO·vᵀ. Out: probs in p, dL/da in d (unscaled),
// dz per row, Σ dp per row; a and dp are scratch.
template <typename T>
void backward(const Band& b, T* a, T* d, T* p, T* dp, const T* lse, const T* delta, T* dz,
              T* dp_sum) {
  const int64_t items = b.problems * ((b.rows + kLanes - 1) / kLanes);
#pragma omp parallel for schedule(static)
  for (int64_t item = 0; item < items; ++item) {
    const Group<T> c(b, item);
    if (c.lanes == kLanes)
      backward_group<T, true>(b, c, a, d, p, dp, lse, delta, dz, dp_sum);
    else
      backward_group<T, false>(b, c, a, d, p, dp, lse, delta, dz, dp_sum);
  }
}

}  // namespace

extern "C" {
void cope_band_forward_f32(const Band* b, float* a, float* m, float* s, float* u, float* t) {
  forward<float>(*b, a, m, s, u, t);
}
void cope_band_forward_f64(const Band* b, double* a, double* m, double* s, double* u,
                           double* t) {
  forward<double>(*b, a, m, s, u, t);
}
void cope_band_backward_f32(const Band* b, float* a, float* d, float* p, float* dp,
                            const float* lse, const float* delta, float* dz, float* dps) {
  backward<float>(*b, a, d, p, dp, lse, delta, dz, dps);
}
void cope_band_backward_f64(const Band* b, double* a, double* d, double* p, double* dp,
                            const double* lse, const double* delta, double* dz,
                            double* dps) {
  backward<double>(*b, a, d, p, dp, lse, delta, dz, dps);
}
}
