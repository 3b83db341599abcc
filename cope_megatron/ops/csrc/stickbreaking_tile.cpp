// Stick-breaking's tile math on CPU: the σ, running survival, weight and (in the backward)
// stick-gradient passes of ops/stickbreaking_tiles.py's blocks fused into one sweep
// down the keys, nearest first, the matmuls left to torch. Logits arrive transposed,
// [keys][rows], so that SIMD lanes are rows: each lane keeps its own running sum, and one
// key step is one vector op. ops/stickbreaking_native.py calls it (ops/native_build.py
// builds it).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "vector_math.h"

namespace {

constexpr int kLanes = 16;
template <typename T>
constexpr T kMaxExponent = sizeof(T) == 4 ? T(87) : T(708);  // 1/(1 + e^x) stays normal

// One batch of tiles: `problems` (batch·heads) matrices of `keys` × `rows` raw products
// q·k, keys nearest first; key j is row r's iff j ≥ skip[r] (the keys at or after a row on
// the diagonal tile come first; skip is 0 elsewhere), for every problem alike.
struct Tile {
  int64_t problems, keys, rows;
  double scale, tiny;    // the dtype's smallest normal number: smaller weights become 0
  const int32_t* skip;   // [rows]
  const void* carry;     // [problems][rows]: Σ softplus(z) over keys nearer than the tile
};

// A sweep's per-lane state: what both sweeps derive from the raw logits, by the same code.
// The stick is kept as a product, survive = Π (1 − β) over the nearer keys, rather than as
// ops/stickbreaking_tiles.py's sum of softplus(z) = −log(1 − β): then a key costs one exp and one
// division (σ(z) and σ(−z) from the same e^{−z}) where the log form costs two exps and a
// log1p; it is as exact (a product of n factors carries n roundings, as a sum of n terms
// does). A survival below `tiny` becomes 0 (no subnormals: CPUs take microcode assists on
// them), so every farther weight is 0 too, as the log form's threshold makes them.
template <typename T>
struct Sweep {
  T survive[kLanes];  // Π (1 − β) over the keys nearer than the current one, and the carry
  T x[kLanes], beta[kLanes], w[kLanes];  // scaled logit z, β = σ(z), the weight A = β·survive
  int skip[kLanes];
  T scale, tiny;

  __attribute__((always_inline)) Sweep(const Tile& t, const T* carry, const int32_t* skip_,
                                       int lanes) {
    scale = static_cast<T>(t.scale), tiny = static_cast<T>(t.tiny);
    for (int l = 0; l < lanes; ++l) {
      const T s = std::exp(-carry[l]);
      survive[l] = s < tiny ? T(0) : s, skip[l] = skip_[l];
    }
  }

  // Moves to key j, whose raw logits are a; off a row's keys β = w = 0 and the stick is
  // unbroken. The comparisons are written so that a NaN (a diverged run) stays NaN.
  __attribute__((always_inline)) void step(int64_t j, const T* a, int lanes) {
#pragma omp simd
    for (int l = 0; l < lanes; ++l) {
      const bool valid = j >= skip[l];
      x[l] = scale * a[l];
      // e^{−z}, its exponent capped where 1/(1 + e) is still a normal number: past it the
      // flush would make σ(z) 0 and 1 − β = e·σ(z) 0, breaking a stick that β ≈ 0 leaves.
      const T e = exp_(std::min(-x[l], kMaxExponent<T>));
      const T inv = T(1) / (T(1) + e);
      beta[l] = valid ? inv : T(0);           // σ(z)
      const T keep = valid ? e * inv : T(1);  // 1 − β = σ(−z)
      const T weight = survive[l] * beta[l];
      w[l] = weight < tiny ? T(0) : weight;
      const T next = survive[l] * keep;
      survive[l] = next < tiny ? T(0) : next;
    }
  }

  // Σ softplus(z) over the keys so far and the carry: −log survive (∞ once it is 0).
  T carry(int l) const { return -std::log(survive[l]); }
};

struct Group {
  int64_t problem, first_row, lanes, offset;  // offset: its lane 0 in [problems][keys][rows]

  Group(const Tile& t, int64_t item) {
    const int64_t groups = (t.rows + kLanes - 1) / kLanes;
    problem = item / groups, first_row = item % groups * kLanes;
    lanes = std::min<int64_t>(kLanes, t.rows - first_row);
    offset = problem * t.keys * t.rows + first_row;
  }
};

// Full groups have a constant lane count, so their per-lane state fits vector registers.
template <typename T, bool Full>
void forward_group(const Tile& t, const Group& g, T* a, T* mass, T* carry_out) {
  const int lanes = Full ? kLanes : static_cast<int>(g.lanes);
  const int64_t r = g.problem * t.rows + g.first_row;
  Sweep<T> s(t, static_cast<const T*>(t.carry) + r, t.skip + g.first_row, lanes);
  T sum[kLanes];
  for (int l = 0; l < lanes; ++l) sum[l] = 0;
  for (int64_t j = 0; j < t.keys; ++j) {
    T* row_a = a + g.offset + j * t.rows;
    s.step(j, row_a, lanes);
#pragma omp simd
    for (int l = 0; l < lanes; ++l) {
      row_a[l] = s.w[l];
      sum[l] += s.w[l];
    }
  }
  for (int l = 0; l < lanes; ++l) mass[r + l] = sum[l], carry_out[r + l] = s.carry(l);
}

// dL = A ⊙ (dO·v − dO·v_self); dz_t = dL_t − β_t · (F − Σ_{j nearer than t} dL_j), F the
// row's Σ dL over this tile's keys and all farther ones (`farther`). The first sweep leaves
// β in a and dL in d; the second turns them into dz.
template <typename T, bool Full>
void backward_group(const Tile& t, const Group& g, T* a, T* d, T* w, const T* self_dot,
                    const T* farther, T* total, T* carry_out) {
  const int lanes = Full ? kLanes : static_cast<int>(g.lanes);
  const int64_t r = g.problem * t.rows + g.first_row;
  Sweep<T> s(t, static_cast<const T*>(t.carry) + r, t.skip + g.first_row, lanes);
  T dl_sum[kLanes];
  for (int l = 0; l < lanes; ++l) dl_sum[l] = 0;
  for (int64_t j = 0; j < t.keys; ++j) {
    const int64_t at = g.offset + j * t.rows;
    s.step(j, a + at, lanes);
#pragma omp simd
    for (int l = 0; l < lanes; ++l) {
      const T dl = s.w[l] * (d[at + l] - self_dot[r + l]);
      a[at + l] = s.beta[l];
      d[at + l] = dl;
      w[at + l] = s.w[l];
      dl_sum[l] += dl;
    }
  }
  T rest[kLanes];  // F − Σ dL over the keys nearer than the current one
  for (int l = 0; l < lanes; ++l) rest[l] = farther[r + l];
  for (int64_t j = 0; j < t.keys; ++j) {
    const int64_t at = g.offset + j * t.rows;
#pragma omp simd
    for (int l = 0; l < lanes; ++l) {
      const T dl = d[at + l];
      a[at + l] = dl - a[at + l] * rest[l];
      rest[l] -= dl;
    }
  }
  for (int l = 0; l < lanes; ++l) total[r + l] = dl_sum[l], carry_out[r + l] = s.carry(l);
}

// Calls body(group) for every lane group of the batch, in parallel, with subnormals flushed
// in each thread.
template <typename Body>
void for_each_group(const Tile& t, const Body& body) {
  const int64_t items = t.problems * ((t.rows + kLanes - 1) / kLanes);
#pragma omp parallel
  {
    const FlushSubnormals flush;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) body(Group(t, item));
  }
}

// In: a, the raw products q·k. Out: the weights A in a, Σ A and the carry past the tile.
template <typename T>
void forward(const Tile& t, T* a, T* mass, T* carry_out) {
  for_each_group(t, [&](const Group& g) {
    if (g.lanes == kLanes)
      forward_group<T, true>(t, g, a, mass, carry_out);
    else
      forward_group<T, false>(t, g, a, mass, carry_out);
  });
}

// In: a, the raw products q·k; d = v·dO. Out: dz (unscaled) in a, A in w, Σ dL and the
// carry past the tile; d is scratch.
template <typename T>
void backward(const Tile& t, T* a, T* d, T* w, const T* self_dot, const T* farther, T* total,
              T* carry_out) {
  for_each_group(t, [&](const Group& g) {
    if (g.lanes == kLanes)
      backward_group<T, true>(t, g, a, d, w, self_dot, farther, total, carry_out);
    else
      backward_group<T, false>(t, g, a, d, w, self_dot, farther, total, carry_out);
  });
}

}  // namespace

extern "C" {
void stickbreaking_forward_f32(const Tile* t, float* a, float* mass, float* carry) {
  forward<float>(*t, a, mass, carry);
}
void stickbreaking_forward_f64(const Tile* t, double* a, double* mass, double* carry) {
  forward<double>(*t, a, mass, carry);
}
void stickbreaking_backward_f32(const Tile* t, float* a, float* d, float* w,
                                const float* self_dot, const float* farther, float* total,
                                float* carry) {
  backward<float>(*t, a, d, w, self_dot, farther, total, carry);
}
void stickbreaking_backward_f64(const Tile* t, double* a, double* d, double* w,
                                const double* self_dot, const double* farther, double* total,
                                double* carry) {
  backward<double>(*t, a, d, w, self_dot, farther, total, carry);
}
}
