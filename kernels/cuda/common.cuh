// Shared device helpers for the gpuloss CUDA kernels (compiled by NVRTC through CuPy).
//
// No standard-library or CUDA headers are included: NVRTC 13 ships no cuda_fp16.h /
// cuda_bf16.h of its own (CuPy would have to find a toolkit on disk), so the 16-bit storage
// types are handled here as raw ``unsigned short`` bits and converted with single PTX
// instructions (cvt.f32.f16, cvt.rn.f16.f32, cvt.rn.bf16.f32; bf16 -> f32 is a shift).
// The host passes bf16 buffers as uint16 views for the same reason (CuPy has no bf16 dtype).
#pragma once

typedef long long i64;

#define GL_INF __int_as_float(0x7f800000)
#define GL_NAN __int_as_float(0x7fffffff)

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
    static __device__ __forceinline__ float ld(float v) { return v; }
    static __device__ __forceinline__ float st(float v) { return v; }
};
template <> struct IO<f64> {
    static __device__ __forceinline__ double ld(double v) { return v; }
    static __device__ __forceinline__ double st(double v) { return v; }
};
template <> struct IO<f16> {
    static __device__ __forceinline__ float ld(unsigned short h) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
        return f;
    }
    static __device__ __forceinline__ unsigned short st(float f) {
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
    }
};
template <> struct IO<bf16> {
    // bf16 is the top half of an fp32: widening is exact.
    static __device__ __forceinline__ float ld(unsigned short h) {
        return __int_as_float(((int)h) << 16);
    }
    // cvt.rn.bf16.f32 (sm_80+) rounds to nearest even and keeps NaN a NaN.
    static __device__ __forceinline__ unsigned short st(float f) {
        unsigned short h;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
    }
};

// Math in the accumulation type (overloads, so one template body serves fp32 and fp64).
// Accurate expf/logf rather than the __expf intrinsics: these kernels are memory bound, and
// the fp32 tolerance (2e-5 relative) leaves no room for __expf's error at |x| ~ 50.
__device__ __forceinline__ float gl_exp(float x) { return expf(x); }
__device__ __forceinline__ double gl_exp(double x) { return exp(x); }
__device__ __forceinline__ float gl_log(float x) { return logf(x); }
__device__ __forceinline__ double gl_log(double x) { return log(x); }
__device__ __forceinline__ float gl_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double gl_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float gl_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double gl_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float gl_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double gl_max(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float gl_abs(float a) { return fabsf(a); }
__device__ __forceinline__ double gl_abs(double a) { return fabs(a); }
template <class A> __device__ __forceinline__ A gl_inf() { return (A)GL_INF; }
template <class A> __device__ __forceinline__ A gl_nan() { return (A)GL_NAN; }

// ---------------------------------------------------------------------------------------------
// Vector access.  VEC elements = 16 bytes when the host found every row start 16-byte aligned
// (base pointer and row stride), else VEC = 1.  Columns handed to these are multiples of VEC.
// ---------------------------------------------------------------------------------------------
template <class D, int VEC>
__device__ __forceinline__ void load_vec(const typename D::store* p, typename D::acc (&v)[VEC]) {
    typedef typename D::store S;
    if constexpr (VEC * sizeof(S) == 16) {
        union { uint4 u; S s[VEC]; } r;
        r.u = *reinterpret_cast<const uint4*>(p);
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = IO<D>::ld(r.s[k]);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = IO<D>::ld(p[k]);
    }
}

template <class D, int VEC>
__device__ __forceinline__ void store_vec(typename D::store* p, const typename D::acc (&v)[VEC]) {
    typedef typename D::store S;
    if constexpr (VEC * sizeof(S) == 16) {
        union { uint4 u; S s[VEC]; } r;
#pragma unroll
        for (int k = 0; k < VEC; ++k) r.s[k] = IO<D>::st(v[k]);
        *reinterpret_cast<uint4*>(p) = r.u;
    } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) p[k] = IO<D>::st(v[k]);
    }
}

// Raw 16-byte copy (global -> shared staging keeps the storage dtype: half the bytes of fp32
// for 16-bit inputs, so twice the row fits on chip).
template <class D, int VEC>
__device__ __forceinline__ void copy_raw(typename D::store* dst, const typename D::store* src) {
    typedef typename D::store S;
    if constexpr (VEC * sizeof(S) == 16) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) dst[k] = src[k];
    }
}

// ---------------------------------------------------------------------------------------------
// Thread-block clusters (sm_90): rank, barrier and distributed-shared-memory loads in inline
// PTX, so no cooperative_groups header is needed under NVRTC.  Only compiled when the host
// defines GPULOSS_HAS_CLUSTER (device compute capability >= 9.0).
// ---------------------------------------------------------------------------------------------
#ifdef GPULOSS_HAS_CLUSTER
__device__ __forceinline__ unsigned cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
// Release/acquire: shared-memory writes before the barrier are visible to every block of the
// cluster after it.
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned long long g = (unsigned long long)p;
    unsigned long long s;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(s) : "l"(g));
    return (unsigned)s;
}
// Read a float from the shared memory of block ``rank`` of this cluster.
__device__ __forceinline__ float ld_cluster(const float* local, unsigned rank) {
    unsigned a = smem_addr(local), r;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(r) : "memory");
    return v;
}
__device__ __forceinline__ double ld_cluster(const double* local, unsigned rank) {
    unsigned a = smem_addr(local), r;
    double v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
    asm volatile("ld.shared::cluster.f64 %0, [%1];" : "=d"(v) : "r"(r) : "memory");
    return v;
}
#endif
