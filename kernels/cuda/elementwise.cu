// Element-wise losses with their gradients in the same pass over (R, C) rows:
//   OP 0  MSE                 l = (x - t)^2                   dx = 2 (x - t),  dt = -dx
//   OP 1  KL (prob target)    l = xlogy(t, t) - t x           dx = -t,         dt = log t + 1 - x (NaN at 0)
//   OP 2  KL (log target)     l = e^t (t - x)                 dx = -e^t,       dt = e^t (t - x + 1)
//   OP 3  BCE with logits     l = w ((1-t) x + lw sp(-x)),  lw = 1 + (pw - 1) t,  sp = softplus
//                             dx = w ((1 - t) - lw sigmoid(-x)) = w (lw sigmoid(x) - pw t)
//                             dt = w (-x + (pw - 1) sp(-x))
//                             each formed per sign of x with l1 = log1p(e^-|x|), q = sigmoid(-|x|):
//                             x >= 0: w ((1-t) x + lw l1), w ((1-t) - lw q), w ((pw-1) l1 - x);
//                             x < 0:  w (lw l1 - pw t x),  w (lw q - pw t),  w ((pw-1) l1 - pw x)
//   OP 4  BCE on probs        l = -w (t max(log p, -100) + (1-t) max(log(1-p), -100))
//                             dp = w (p - t) / max(p (1 - p), 1e-12),
//                             dt = w (log(1 - p) - log p), unclamped as torch's (+-inf at p = 1, 0);
//                             a NaN p gives NaN (fmaxf would drop it from the clamp)
// Every gradient is multiplied by ``scale`` (1, or 1/divisor for mean-like reductions, which
// the host knows).  Reduction "none" writes the loss element-wise; otherwise each block writes
// its partial sum (deterministic; the host sums the partials on the device).
// weight / pos_weight: mode 0 absent, 1 a (C,) vector, 2 a full (R, C) array with a row stride.
// Traffic: read x, t (and w) once; write loss or nothing, and the gradients once.
#include "elementwise.cuh"

#define GL_EW_THREADS 256
// (256, 1): without the minimum-blocks argument ptxas aims at full occupancy (32 registers) and
// spilled the fp32 MSE kernel; with it the kernels take 26-56 registers and spill nothing.

template <class A>
__device__ __forceinline__ A ew_aux(const A* P, int mode, i64 stride, i64 r, i64 c) {
    return mode == 0 ? (A)1 : mode == 1 ? P[c] : P[r * stride + c];
}

template <class D, int OP>
__global__ void __launch_bounds__(GL_EW_THREADS, 1)
gpuloss_elementwise(const typename D::store* __restrict__ X_ptr, const typename D::store* __restrict__ T_ptr,
                    const typename D::acc* __restrict__ W_ptr, const typename D::acc* __restrict__ PW_ptr,
                    typename D::store* GX_ptr, typename D::store* GT_ptr, typename D::acc* L_ptr,
                    typename D::acc* Part_ptr, i64 X_row_stride, i64 T_row_stride, i64 W_row_stride,
                    i64 PW_row_stride, i64 R, i64 C, int w_mode, int pw_mode, typename D::acc scale) {
    typedef typename D::acc A;
    __shared__ A warp_sums[32];
    const i64 n = R * C;
    A part = 0;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const i64 r = i / C, c = i - r * C;
        const A x = IO<D>::ld(X_ptr[r * X_row_stride + c]);
        const A t = IO<D>::ld(T_ptr[r * T_row_stride + c]);
        // weight and pos_weight are read only by the ops that take them (OP is a constant)
        const A w = OP >= 3 ? ew_aux(W_ptr, w_mode, W_row_stride, r, c) : (A)1;
        const A pw = OP == 3 ? ew_aux(PW_ptr, pw_mode, PW_row_stride, r, c) : (A)1;
        A l, gx, gt;
        ew_element<OP>(x, t, w, pw, l, gx, gt);
        if (L_ptr) L_ptr[i] = l;
        part += l;
        if (GX_ptr) GX_ptr[i] = IO<D>::st(gx * scale);
        if (GT_ptr) GT_ptr[i] = IO<D>::st(gt * scale);
    }
    if (Part_ptr) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
        if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = part;
        __syncthreads();
        if (threadIdx.x < 32) {
            part = threadIdx.x < (blockDim.x + 31) / 32 ? warp_sums[threadIdx.x] : (A)0;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
            if (threadIdx.x == 0) Part_ptr[blockIdx.x] = part;
        }
    }
}
