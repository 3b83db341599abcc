// What the CPU kernels of this folder share: an exp that GCC vectorizes across a loop's
// SIMD lanes (libm's expf is a call the vectorizer cannot inline: this is Cephes' expf,
// ≤ 2 ulp; doubles, for tests and float64 runs, use libm), and a flush of subnormals.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace {

__attribute__((always_inline)) inline float exp_(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}
inline double exp_(double x) { return std::exp(std::min(x, 709.0)); }  // finite, as the float's

// Flushes subnormal results and operands to zero in the calling thread while it lives
// (each OpenMP thread makes its own: the mode is per thread). For kernels that treat every
// number below the smallest normal as 0 anyway, where a product can still land among the
// subnormals on its way there and cost a microcode assist (tens of cycles) each time.
class FlushSubnormals {
 public:
#if defined(__x86_64__) || defined(__i386__)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ | DAZ
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#elif defined(__aarch64__)
  FlushSubnormals() {
    asm volatile("mrs %0, fpcr" : "=r"(saved_));
    const uint64_t flushed = saved_ | (uint64_t(1) << 24);  // FZ
    asm volatile("msr fpcr, %0" : : "r"(flushed));
  }
  ~FlushSubnormals() { asm volatile("msr fpcr, %0" : : "r"(saved_)); }

 private:
  uint64_t saved_;
#endif
};

}  // namespace
