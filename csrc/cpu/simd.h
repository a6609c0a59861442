// Portable vectorisation helpers for the CPU kernels.
//
// Kernels are plain loops over contiguous spans that the compiler vectorises. ACCEL_CPU_CLONES builds
// each hot function twice, for AVX2+FMA (x86-64-v3: Haswell, Zen and later) and for the baseline x86-64 ISA, and the
// loader picks one at run time (GCC/Clang function multiversioning), so one binary is both fast and
// portable. On other architectures the attribute is empty and the baseline build is used.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

// The AVX2 clone is named by the x86-64-v3 ISA level, not by a CPU: GCC's resolver tests "arch=haswell" with
// __builtin_cpu_is("haswell"), which is false on every AMD CPU and every Intel one after Haswell, so such a
// clone is never picked there; "arch=x86-64-v3" is tested by CPU features (AVX2, FMA, BMI2, ...).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__) && \
    !defined(ACCEL_NO_CLONES)
#define ACCEL_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ACCEL_CPU_CLONES
#endif

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

// Hand-written AVX2 + FMA paths (intrinsics in functions marked ACCEL_AVX2), picked at run time with
// cpu_has_avx2(); every such path has a portable twin for other CPUs. Used where GCC's clones of the portable
// loop come out several times slower (accumulators kept in memory, no vector exp).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define ACCEL_X86_AVX2 1
#define ACCEL_AVX2 __attribute__((target("avx2,fma")))
#include <immintrin.h>
#endif

namespace accel {

// A kernel that touches more than this many bytes (reads and writes) writes its outputs with
// non-temporal stores: they cannot stay in cache anyway (about half a server L3), and streaming them skips
// the read-for-ownership that a normal store to a line not in cache costs: a third of a write-heavy
// pass's traffic.
constexpr int64_t kStreamingStoreBytes = int64_t{16} << 20;

// Copies `bytes` bytes from src (a buffer in L1) to dst, bypassing the cache when `stream` is set and
// dst is 16-byte aligned. Call stream_fence() once a thread has finished its streamed stores.
inline void store_span(void* dst, const void* src, int64_t bytes, bool stream) {
#if defined(__SSE2__)
  if (stream && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    auto* d = static_cast<__m128i*>(dst);
    const auto* s = static_cast<const char*>(src);
    int64_t i = 0;
    for (; i + 16 <= bytes; i += 16) _mm_stream_si128(d++, _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    std::memcpy(static_cast<char*>(dst) + i, s + i, bytes - i);
    return;
  }
#endif
  (void)stream;
  std::memcpy(dst, src, bytes);
}

// Whether this CPU runs the ACCEL_AVX2 paths (checked once).
// Whether ACCEL_CPU_ISA=avx2 asks to keep to the AVX2 paths (checked once).
inline bool avx2_requested() {
  static const bool yes = [] {
    const char* isa = std::getenv("ACCEL_CPU_ISA");
    return isa != nullptr && std::strcmp(isa, "avx2") == 0;
  }();
  return yes;
}

inline bool cpu_has_avx2() {
#if defined(ACCEL_X86_AVX2)
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

// AVX-512 with VNNI (vpdpbusd: four byte products added into each int32 lane in one instruction), picked at run
// time with cpu_has_avx512_vnni() beside the AVX2 path; ACCEL_CPU_ISA=avx2 in the environment holds the kernels to
// AVX2 (to compare the two paths on one machine).
#if defined(ACCEL_X86_AVX2)
#define ACCEL_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
#endif

inline bool cpu_has_avx512_vnni() {
#if defined(ACCEL_X86_AVX2)
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vnni") && !avx2_requested();
  return yes;
#else
  return false;
#endif
}

#if defined(ACCEL_X86_AVX2)
// The sum and the maximum of a vector's eight floats.
ACCEL_AVX2 inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

ACCEL_AVX2 inline float horizontal_max(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
#endif

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace accel
