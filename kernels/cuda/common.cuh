// Shared device helpers for the gpuloss CUDA kernels (compiled by NVRTC through CuPy).
//
// No standard-library or CUDA headers are included: NVRTC 13 ships no cuda_fp16.h /
// cuda_bf16.h of its own (CuPy would have to find a toolkit on disk), so the 16-bit storage
// types are handled here as raw ``unsigned short`` bits and converted with single PTX
// instructions (cvt.f32.f16, cvt.rn.f16.f32, cvt.rn.bf16.f32; bf16 -> f32 is a shift).
// The host passes bf16 buffers as uint16 views for the same reason (CuPy has no bf16 dtype).
//
// The pure arithmetic (GL_HD: the dtype tags, fp32/fp64 loads, exp/log/max, and everything in
// rowops.cuh) also compiles as host C++ without CUDA, so that a host harness
// (tests/host/rows_harness.cpp) runs the kernels' own per-row arithmetic under g++.  Anything
// that needs the device (PTX, shuffles, shared memory, vector types) sits under __CUDACC__.
#pragma once

typedef long long i64;

#ifdef __CUDACC__
#define GL_HD __host__ __device__ __forceinline__
#define GL_DEV __device__ __forceinline__
#else
#define GL_HD inline
#endif

// Bit patterns as values, usable on host and device (no __int_as_float, which is device-only).
GL_HD float gl_f32_from_bits(unsigned u) {
    union { unsigned u; float f; } c;
    c.u = u;
    return c.f;
}
#define GL_INF gl_f32_from_bits(0x7f800000u)
#define GL_NAN gl_f32_from_bits(0x7fffffffu)

// ---------------------------------------------------------------------------------------------
// Storage dtypes.  ``store`` is what lives in memory, ``acc`` what arithmetic is done in
// (fp32 for every storage type except fp64).  Values are rounded once, at the store.
// ---------------------------------------------------------------------------------------------
struct f32 { typedef float store; typedef float acc; };
struct f64 { typedef double store; typedef double acc; };
struct f16 { typedef unsigned short store; typedef float acc; };
struct bf16 { typedef unsigned short store; typedef float acc; };

template <class D> struct IO;
template <> struct IO<f32> {
    static GL_HD float ld(float v) { return v; }
    static GL_HD float st(float v) { return v; }
};
template <> struct IO<f64> {
    static GL_HD double ld(double v) { return v; }
    static GL_HD double st(double v) { return v; }
};
#ifdef __CUDACC__
template <> struct IO<f16> {
    static GL_DEV float ld(unsigned short h) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
        return f;
    }
    static GL_DEV unsigned short st(float f) {
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
    }
};
template <> struct IO<bf16> {
    // bf16 is the top half of an fp32: widening is exact.
    static GL_DEV float ld(unsigned short h) { return __int_as_float(((int)h) << 16); }
    // cvt.rn.bf16.f32 (sm_80+) rounds to nearest even and keeps NaN a NaN.
    static GL_DEV unsigned short st(float f) {
        unsigned short h;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
    }
};
#endif

// Math in the accumulation type (overloads, so one template body serves fp32 and fp64).
// Accurate expf/logf rather than the __expf intrinsics in the looped / onchip kernels: the
// fp32 tolerance (2e-5 relative) leaves little room for an exp of a rounded x * log2(e) at
// |x| ~ 50.  gl_exp_fast (the staged kernels) takes the argument already reduced (d = z - max,
// formed exactly), so its only extra error is ex2.approx's 2 ulp and the rounding of
// d * log2(e): at most 2^-24 |d| log2(e) relative, under 6e-6 for every d > -88 where the
// result is not already below the fp32 normal range.
GL_HD float gl_exp(float x) { return expf(x); }
GL_HD double gl_exp(double x) { return exp(x); }
GL_HD float gl_log(float x) { return logf(x); }
GL_HD double gl_log(double x) { return log(x); }
GL_HD float gl_log1p(float x) { return log1pf(x); }
GL_HD double gl_log1p(double x) { return log1p(x); }
GL_HD float gl_tanh(float x) { return tanhf(x); }
GL_HD double gl_tanh(double x) { return tanh(x); }
// A product rounded on its own, never contracted into a following add (nvcc and NVRTC fuse
// a * b + c into one fma by default): the logits a kernel scales (z = cap tanh(x / cap), z = x / T)
// are formed once per use, and max - z_t must be 0 where z_t is the max, not the rounding error
// of the product (~1e22 at logits near 1e30).
GL_HD float gl_mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}
GL_HD double gl_mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dmul_rn(a, b);
#else
    return a * b;
#endif
}
GL_HD float gl_max(float a, float b) { return fmaxf(a, b); }
GL_HD double gl_max(double a, double b) { return fmax(a, b); }
GL_HD float gl_abs(float a) { return fabsf(a); }
GL_HD double gl_abs(double a) { return fabs(a); }
template <class A> GL_HD A gl_inf() { return (A)GL_INF; }
template <class A> GL_HD A gl_nan() { return (A)GL_NAN; }

GL_HD float gl_exp_fast(float d) {
#ifdef __CUDA_ARCH__
    float r;
    asm("ex2.approx.f32 %0, %1;" : "=f"(r) : "f"(d * 1.4426950408889634f));
    return r;
#else
    return expf(d);  // host harness: the formulation is what it checks, not ex2's last bits
#endif
}
GL_HD double gl_exp_fast(double d) { return exp(d); }
// The same for terms of a sum that holds its largest term, exp(0) = 1 (sum of exp(z - max),
// and its rescalings): results below 2^-126 are flushed to zero (.ftz: 1 instruction instead of
// 4), which cannot change an fp32 sum >= 1.  Outputs use gl_exp_fast, which keeps subnormals.
GL_HD float gl_exp_fast_sum(float d) {
#ifdef __CUDA_ARCH__
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d * 1.4426950408889634f));
    return r;
#else
    return expf(d);
#endif
}
GL_HD double gl_exp_fast_sum(double d) { return exp(d); }

#ifdef __CUDACC__
// ---------------------------------------------------------------------------------------------
// Vector access.  VEC elements = 16 bytes when the host found every row start 16-byte aligned
// (base pointer and row stride), else VEC = 1.  Columns handed to these are multiples of VEC.
// Raw vectors keep the storage bits (16-bit inputs staged on chip take half the bytes of fp32);
// ``unpack`` widens them to the accumulation type.
// ---------------------------------------------------------------------------------------------
template <class D, int VEC, bool WIDE = (VEC * sizeof(typename D::store) == 16)> struct Raw;
template <class D, int VEC> struct Raw<D, VEC, true> {
    union { uint4 u; typename D::store s[VEC]; };
};
template <class D, int VEC> struct Raw<D, VEC, false> {
    typename D::store s[VEC];
};

template <class D, int VEC>
GL_DEV Raw<D, VEC> load_raw(const typename D::store* p) {
    Raw<D, VEC> r;
    if constexpr (VEC * sizeof(typename D::store) == 16) {
        r.u = *reinterpret_cast<const uint4*>(p);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) r.s[k] = p[k];
    }
    return r;
}

template <class D, int VEC>
GL_DEV void store_raw(typename D::store* p, const Raw<D, VEC>& r) {
    if constexpr (VEC * sizeof(typename D::store) == 16) {
        *reinterpret_cast<uint4*>(p) = r.u;
    } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) p[k] = r.s[k];
    }
}

template <class D, int VEC>
GL_DEV void unpack(const Raw<D, VEC>& r, typename D::acc (&v)[VEC]) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = IO<D>::ld(r.s[k]);
}

template <class D, int VEC>
GL_DEV void load_vec(const typename D::store* p, typename D::acc (&v)[VEC]) {
    unpack<D, VEC>(load_raw<D, VEC>(p), v);
}

// Two fp32 values rounded (to nearest even) into one 32-bit word of 16-bit values, lo in the
// low half: cvt.rn.{bf16x2,f16x2}.f32 (sm_80+) puts its first source in the upper half.
template <class D> struct Pack2;
template <> struct Pack2<bf16> {
    static GL_DEV unsigned run(float lo, float hi) {
        unsigned r;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
};
template <> struct Pack2<f16> {
    static GL_DEV unsigned run(float lo, float hi) {
        unsigned r;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
};

// One 16-byte store to global memory.  Written in PTX: in the larger kernels NVVM split the
// plain uint4 store into four 4-byte stores (seen in rows.cu's looped cross-entropy and the
// staged kernels at -O3).
GL_DEV void st_global16(void* p, uint4 v) {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

// VEC accumulation-type values rounded to the storage type, stored to global memory (outputs).
template <class D, int VEC>
GL_DEV void store_vec(typename D::store* p, const typename D::acc (&v)[VEC]) {
    Raw<D, VEC> r;
    if constexpr (VEC == 8 && sizeof(typename D::store) == 2) {  // 16-bit rows, 16-byte vectors
        r.u = make_uint4(Pack2<D>::run(v[0], v[1]), Pack2<D>::run(v[2], v[3]), Pack2<D>::run(v[4], v[5]),
                         Pack2<D>::run(v[6], v[7]));
    } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) r.s[k] = IO<D>::st(v[k]);
    }
    if constexpr (VEC * sizeof(typename D::store) == 16) {
        st_global16(p, r.u);
    } else {
        store_raw<D, VEC>(p, r);
    }
}

// 32-bit shared-memory address of a generic pointer into shared memory
GL_DEV unsigned smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// ---------------------------------------------------------------------------------------------
// Thread-block clusters (sm_90): rank, barrier and distributed-shared-memory loads in inline
// PTX, so no cooperative_groups header is needed under NVRTC.  Only compiled when the host
// defines GPULOSS_HAS_CLUSTER (device compute capability >= 9.0).
// ---------------------------------------------------------------------------------------------
#ifdef GPULOSS_HAS_CLUSTER
GL_DEV unsigned cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
// Release/acquire: shared-memory writes before the barrier are visible to every block of the
// cluster after it.
GL_DEV void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// Read a float from the shared memory of block ``rank`` of this cluster.
GL_DEV float ld_cluster(const float* local, unsigned rank) {
    unsigned a = smem_addr(local), r;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(r) : "memory");
    return v;
}
GL_DEV double ld_cluster(const double* local, unsigned rank) {
    unsigned a = smem_addr(local), r;
    double v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
    asm volatile("ld.shared::cluster.f64 %0, [%1];" : "=d"(v) : "r"(r) : "memory");
    return v;
}
#endif  // GPULOSS_HAS_CLUSTER
#endif  // __CUDACC__
