// Portable vectorisation for the CPU kernels.
//
// Kernels are plain loops over contiguous spans that the compiler vectorises. ACCEL_CPU_CLONES builds
// each hot function twice, for AVX2+FMA (Haswell and later) and for the baseline x86-64 ISA, and the
// loader picks one at run time (GCC/Clang function multiversioning), so one binary is both fast and
// portable. On other architectures the attribute is empty and the baseline build is used.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__) && \
    !defined(ACCEL_NO_CLONES)
#define ACCEL_CPU_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define ACCEL_CPU_CLONES
#endif
