// The few vector operations the kernels use, for the instruction set they are compiled for.
//
// model/native.py builds the kernels once per machine with either
//   -mavx512f -mavx512bw -mavx512vnni   (16 floats or 64 bytes a vector), or
//   -mavx2 -mfma                        (8 floats or 32 bytes a vector),
// whichever the CPU has. The kernels are written once against these names, so the two
// builds run the same loops and differ only in the width of a vector and in how a byte dot
// product is formed (int8_linear.cc).
//
// Why both: AVX-512 with VNNI is on recent Intel and AMD Zen 4/5 server parts, but many
// machines (AMD Zen 1-3, most laptops and older cloud hosts) stop at AVX2.

#ifndef FLAXSTREAM_KERNELS_SIMD_H_
#define FLAXSTREAM_KERNELS_SIMD_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace flaxstream::simd {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define FLAXSTREAM_AVX512 1  // the kernels' own code for each set tests this, not the compiler's

constexpr int kFloats = 16;
constexpr int kRegisters = 32;  // vector registers: how large a tile of sums fits
using Floats = __m512;

inline Floats zero() { return _mm512_setzero_ps(); }
inline Floats splat(float x) { return _mm512_set1_ps(x); }
inline Floats load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, Floats v) { _mm512_storeu_ps(p, v); }
inline Floats fma(Floats a, Floats b, Floats c) { return _mm512_fmadd_ps(a, b, c); }
inline float sum(Floats v) { return _mm512_reduce_add_ps(v); }

// The first n < kFloats floats at p, zeros after (reads only those n).
inline Floats load_first(const float* p, int64_t n) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
}

// Four sums, one per vector: [sum(v0), sum(v1), sum(v2), sum(v3)].
inline __m128 sum4(Floats v0, Floats v1, Floats v2, Floats v3) {
  const __m512 a = _mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1));
  const __m512 b = _mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3));
  const __m512 c = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))));
  const __m256 d = _mm256_add_ps(_mm512_castps512_ps256(c),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(c), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(d), _mm256_extractf128_ps(d, 1));
}

#elif defined(__AVX2__) && defined(__FMA__)

constexpr int kFloats = 8;
constexpr int kRegisters = 16;
using Floats = __m256;

inline Floats zero() { return _mm256_setzero_ps(); }
inline Floats splat(float x) { return _mm256_set1_ps(x); }
inline Floats load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, Floats v) { _mm256_storeu_ps(p, v); }
inline Floats fma(Floats a, Floats b, Floats c) { return _mm256_fmadd_ps(a, b, c); }

inline float sum(Floats v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The first n < kFloats floats at p, zeros after (reads only those n: a copy, not a wide
// load that could run past the end of the buffer).
inline Floats load_first(const float* p, int64_t n) {
  alignas(32) float part[kFloats] = {};
  std::memcpy(part, p, n * sizeof(float));
  return _mm256_load_ps(part);
}

inline __m128 sum4(Floats v0, Floats v1, Floats v2, Floats v3) {
  // Pairwise sums within each 128-bit half, twice, leave [v0, v1, v2, v3]'s partial sums in
  // both halves; the halves' sum is the whole.
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

#else
#error "the kernels need AVX-512 (F, BW, VNNI) or AVX2 with FMA"
#endif

}  // namespace flaxstream::simd

#endif  // FLAXSTREAM_KERNELS_SIMD_H_
