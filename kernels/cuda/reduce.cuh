// Block reduction of a row's state (rows.cu, staged.cu): warp shuffles, then warp 0 over the
// warps' partials.  Device only.
#pragma once
#include "rowops.cuh"

template <class A>
__device__ __forceinline__ RowState<A> shfl_state(const RowState<A>& st, int o) {
    RowState<A> r;
    r.m = __shfl_xor_sync(0xffffffffu, st.m, o);
    r.s = __shfl_xor_sync(0xffffffffu, st.s, o);
    r.a0 = __shfl_xor_sync(0xffffffffu, st.a0, o);
    r.a1 = __shfl_xor_sync(0xffffffffu, st.a1, o);
    r.a2 = __shfl_xor_sync(0xffffffffu, st.a2, o);
    return r;
}

// Block reduction of a RowState with Op::combine.  Every thread gets the result.  The
// combination order is fixed, so every block of a cluster later merges the partials alike.
template <class Op, class A>
__device__ RowState<A> block_reduce(RowState<A> st, RowState<A>* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) Op::combine(st, shfl_state(st, o));
    if (lane == 0) scratch[warp] = st;
    __syncthreads();
    if (warp == 0) {
        st = lane < nwarps ? scratch[lane] : Op::identity();
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) Op::combine(st, shfl_state(st, o));
        if (lane == 0) scratch[32] = st;
    }
    __syncthreads();
    st = scratch[32];
    return st;
}
