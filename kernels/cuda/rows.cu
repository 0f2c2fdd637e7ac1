// Row-wise ops over (R, C) rows with a unit-stride last axis: softmax / log_softmax forward and
// backward, cross-entropy loss + dlogits, NLL, distillation KL from logits.
//
// One engine (run_rows) serves every op.  A row (or, with a cluster, a 1/K slice of it) is
// handled by one block in two phases:
//   phase 1  read the row once: online max / sum-of-exp of z = op.z(x) and the op's extra sums;
//            block reduction by warp shuffles, then across the K blocks of a cluster (sm_90,
//            distributed shared memory);
//   phase 2  write the output (y, dlogits, ...), one element per input element.
// Variants (template ONCHIP):
//   looped  phase 2 re-reads x from global memory: 2 reads + 1 write per element; works on any
//           GPU and any row length.
//   onchip  phase 1 also copies the row slice into dynamic shared memory in its storage dtype, and
//           phase 2 reads it from there: 1 read + 1 write per element, the floor in PERF.md.
//           The slice must fit one block's shared memory; rows too long for one block are split
//           over a K-block cluster (K = 2, 4, 8) that exchanges (max, sum) partials via DSMEM.
// Offsets are 64-bit from the start: row * X_row_stride can pass 2^31.
#include "common.cuh"

#ifdef GPULOSS_HAS_CLUSTER
#define GL_CLUSTER(K) __cluster_dims__(K, 1, 1)
#else
#define GL_CLUSTER(K)
#endif

#define GL_MAX_THREADS 1024

template <class A> struct RowState { A m, s, a0, a1, a2; };

// (m, s) with s = sum exp(z - m): merge two partials.  -inf maxima (empty or all -inf) carry s=0.
template <class A>
__device__ __forceinline__ void merge_ms(A& m, A& s, A m2, A s2) {
    A mn = gl_max(m, m2);
    if (mn == -gl_inf<A>()) { s = s + s2; m = mn; return; }
    s = s * gl_exp(m - mn) + s2 * gl_exp(m2 - mn);
    m = mn;
}

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

// The engine.  Op provides: kLSE (track online max/sum of z), kReads (phase 1 reads x),
// identity(), combine(), begin_row(row), z(x), acc(st, c, x, z), finish(row, xr, st, writer),
// out(c, x, z),
// and members has_phase2 / O (main output pointer, may be null).
template <class D, class Op, int VEC, int K, bool ONCHIP>
__device__ __forceinline__ void run_rows(Op& op, const typename D::store* __restrict__ X_ptr, i64 X_row_stride,
                                         typename D::store* O_ptr, i64 O_row_stride, i64 R, i64 C) {
    typedef typename D::store S;
    typedef typename D::acc A;
    extern __shared__ uint4 gl_dyn_smem[];
    S* buf = reinterpret_cast<S*>(gl_dyn_smem);
    __shared__ RowState<A> scratch[33];
    const int tid = threadIdx.x, T = blockDim.x;
#ifdef GPULOSS_HAS_CLUSTER
    __shared__ RowState<A> cslot;
    const unsigned rank = K > 1 ? cluster_rank() : 0u;
#else
    const unsigned rank = 0u;
#endif
    // this block's slice [c0, c1) of the row; slice starts are multiples of VEC (aligned)
    const i64 chunk = ((C + K - 1) / K + VEC - 1) / VEC * VEC;
    const i64 c0 = (i64)rank * chunk;
    const i64 c1 = c0 + chunk < C ? c0 + chunk : C;
    const i64 nvec_end = c1 > c0 ? c0 + (c1 - c0) / VEC * VEC : c0;

    for (i64 row = blockIdx.x / K; row < R; row += gridDim.x / K) {
        const S* xr = X_ptr + row * X_row_stride;
        op.begin_row(row);
        RowState<A> st = Op::identity();

        // ---- phase 1: one read of the slice ----------------------------------------------
        if (Op::kReads) {
#pragma unroll 4
            for (i64 c = c0 + (i64)tid * VEC; c < nvec_end; c += (i64)T * VEC) {
                A v[VEC], z[VEC];
                load_vec<D, VEC>(xr + c, v);
                if (ONCHIP) store_vec<D, VEC>(buf + (c - c0), v);
                A gm = -gl_inf<A>();
#pragma unroll
                for (int k = 0; k < VEC; ++k) { z[k] = op.z(v[k]); gm = gl_max(gm, z[k]); }
                if (Op::kLSE) {
                    A mn = gl_max(st.m, gm);
                    if (mn != -gl_inf<A>()) {
                        A s = st.s * gl_exp(st.m - mn);
#pragma unroll
                        for (int k = 0; k < VEC; ++k) s += gl_exp(z[k] - mn);
                        st.s = s;
                        st.m = mn;
                    }
                }
#pragma unroll
                for (int k = 0; k < VEC; ++k) op.acc(st, c + k, v[k], z[k]);
            }
            for (i64 c = nvec_end + tid; c < c1; c += T) {  // ragged tail, < VEC elements
                A v = IO<D>::ld(xr[c]);
                if (ONCHIP) buf[c - c0] = xr[c];
                A z = op.z(v);
                if (Op::kLSE) merge_ms(st.m, st.s, z, (A)1);
                op.acc(st, c, v, z);
            }
        }

        // ---- reductions: block, then cluster ---------------------------------------------
        st = block_reduce<Op, A>(st, scratch);
#ifdef GPULOSS_HAS_CLUSTER
        if (K > 1) {
            if (tid == 0) cslot = st;
            cluster_sync();
            RowState<A> tot = Op::identity();
            for (unsigned r = 0; r < (unsigned)K; ++r) {
                RowState<A> p;
                p.m = ld_cluster(&cslot.m, r);
                p.s = ld_cluster(&cslot.s, r);
                p.a0 = ld_cluster(&cslot.a0, r);
                p.a1 = ld_cluster(&cslot.a1, r);
                p.a2 = ld_cluster(&cslot.a2, r);
                Op::combine(tot, p);
            }
            st = tot;
            cluster_sync();  // nobody overwrites cslot (next row) or exits while others read it
        }
#endif
        op.finish(row, xr, st, rank == 0 && tid == 0);

        // ---- phase 2: one write per element ----------------------------------------------
        if (op.has_phase2) {
            S* orow = op.O ? O_ptr + row * O_row_stride : (S*)0;
#pragma unroll 4
            for (i64 c = c0 + (i64)tid * VEC; c < nvec_end; c += (i64)T * VEC) {
                A v[VEC], o[VEC];
                if (!Op::kReads) {
#pragma unroll
                    for (int k = 0; k < VEC; ++k) v[k] = (A)0;
                } else if (ONCHIP) {
                    load_vec<D, VEC>(buf + (c - c0), v);
                } else {
                    load_vec<D, VEC>(xr + c, v);
                }
#pragma unroll
                for (int k = 0; k < VEC; ++k) o[k] = op.out(c + k, v[k], op.z(v[k]));
                if (orow) store_vec<D, VEC>(orow + c, o);
            }
            for (i64 c = nvec_end + tid; c < c1; c += T) {
                A v = !Op::kReads ? (A)0 : ONCHIP ? IO<D>::ld(buf[c - c0]) : IO<D>::ld(xr[c]);
                A o = op.out(c, v, op.z(v));
                if (orow) orow[c] = IO<D>::st(o);
            }
        }
        __syncthreads();  // scratch and buf are reused by the next row
    }
}

template <class A>
__device__ __forceinline__ void combine_ms_sums(RowState<A>& a, const RowState<A>& b) {
    merge_ms(a.m, a.s, b.m, b.s);
    a.a0 += b.a0;
    a.a1 += b.a1;
    a.a2 += b.a2;
}
template <class A> __device__ __forceinline__ RowState<A> identity_state() {
    RowState<A> r;
    r.m = -gl_inf<A>(); r.s = (A)0; r.a0 = (A)0; r.a1 = (A)0; r.a2 = (A)0;
    return r;
}

// =============================================================================================
// softmax / log_softmax forward:  y = exp(x - lse)  or  x - lse.
// Traffic (onchip): read R*C, write R*C.
// =============================================================================================
template <class D> struct SoftmaxFwdOp {
    typedef typename D::acc A;
    static constexpr bool kLSE = true, kReads = true;
    bool has_phase2, log;
    void* O;
    A m, logs, inv_s;
    __device__ void begin_row(i64) {}
    static __device__ RowState<A> identity() { return identity_state<A>(); }
    static __device__ void combine(RowState<A>& a, const RowState<A>& b) { combine_ms_sums(a, b); }
    __device__ A z(A x) const { return x; }
    __device__ void acc(RowState<A>&, i64, A, A) const {}
    __device__ void finish(i64, const typename D::store*, const RowState<A>& st, bool) {
        // y from (x - max) and the sum, never from x - lse: with logits near
        // 1e4, lse = max + log(sum) rounds away log(sum) in fp32
        m = st.m;
        logs = gl_log(st.s);
        inv_s = (A)1 / st.s;
    }
    __device__ A out(i64, A x, A) const { return log ? (x - m) - logs : gl_exp(x - m) * inv_s; }
};

template <class D, int VEC, int K, bool ONCHIP>
__global__ void __launch_bounds__(GL_MAX_THREADS) GL_CLUSTER(K)
gpuloss_softmax_fwd(const typename D::store* __restrict__ X_ptr, typename D::store* Y_ptr,
                    i64 X_row_stride, i64 Y_row_stride, i64 R, i64 C, int log) {
    SoftmaxFwdOp<D> op;
    op.has_phase2 = true;
    op.log = log != 0;
    op.O = Y_ptr;
    run_rows<D, SoftmaxFwdOp<D>, VEC, K, ONCHIP>(op, X_ptr, X_row_stride, Y_ptr, Y_row_stride, R, C);
}

// =============================================================================================
// softmax backward (main row y, second input dy read in both phases):
//   softmax:     dx = y * (dy - sum(dy * y))
//   log_softmax: dx = dy - exp(y) * sum(dy)
// =============================================================================================
template <class D> struct SoftmaxBwdOp {
    typedef typename D::acc A;
    typedef typename D::store S;
    static constexpr bool kLSE = false, kReads = true;
    bool has_phase2, log;
    void* O;
    const S* DY;
    i64 DY_row_stride;
    const S* dyr;
    A tot;
    __device__ void begin_row(i64 row) { dyr = DY + row * DY_row_stride; }
    static __device__ RowState<A> identity() { return identity_state<A>(); }
    static __device__ void combine(RowState<A>& a, const RowState<A>& b) { a.a0 += b.a0; }
    __device__ A z(A x) const { return x; }
    __device__ void acc(RowState<A>& st, i64 c, A y, A) const {
        A dy = IO<D>::ld(dyr[c]);
        st.a0 += log ? dy : dy * y;
    }
    __device__ void finish(i64, const S*, const RowState<A>& st, bool) { tot = st.a0; }
    __device__ A out(i64 c, A y, A) const {
        A dy = IO<D>::ld(dyr[c]);
        return log ? dy - gl_exp(y) * tot : y * (dy - tot);
    }
};

template <class D, int VEC, int K, bool ONCHIP>
__global__ void __launch_bounds__(GL_MAX_THREADS) GL_CLUSTER(K)
gpuloss_softmax_bwd(const typename D::store* __restrict__ Y_ptr, const typename D::store* __restrict__ DY_ptr,
                    typename D::store* DX_ptr, i64 Y_row_stride, i64 DY_row_stride, i64 DX_row_stride,
                    i64 R, i64 C, int log) {
    SoftmaxBwdOp<D> op;
    op.has_phase2 = true;
    op.log = log != 0;
    op.O = DX_ptr;
    op.DY = DY_ptr;
    op.DY_row_stride = DY_row_stride;
    run_rows<D, SoftmaxBwdOp<D>, VEC, K, ONCHIP>(op, Y_ptr, Y_row_stride, DX_ptr, DX_row_stride, R, C);
}

// =============================================================================================
// Cross-entropy from logits, loss and dlogits in one pass over the logits.
//   z = softcap ? cap * tanh(x / cap) : x,  lse = logsumexp(z),  p = exp(z - lse)
// Class-index target t (PROB = false), w = weight or 1, W = sum_c w_c, eps = label smoothing:
//   loss = (1-eps) w_t (lse - z_t) + eps/C (W lse - sum_c w_c z_c) + z_loss lse^2
//   dz_j = s [ ((1-eps) w_t + eps/C W + 2 z_loss lse) p_j - (1-eps) w_t [j==t] - eps/C w_j ]
// (sum_c w_c z_c and W are phase-1 sums a0, a1).  Ignored rows: loss 0, gradient 0.  A target
// outside [0, C) that is not ignore_index is never dereferenced: loss and gradient are NaN.
// Probability target d (PROB = true), smoothed d~ = (1-eps) d + eps/C, S = sum_c w_c d~_c:
//   loss = S lse - sum_c w_c d~_c z_c + z_loss lse^2
//   dz_j = s [ (S + 2 z_loss lse) p_j - w_j d~_j ],   dd_j = -s (1-eps) w_j (z_j - lse)
// Chain rule through the softcap: dx = dz (1 - (z / cap)^2).
// s = 1 / divisor for "mean" (the divisor is a device scalar: no host sync), else 1.
// Traffic (onchip, index targets): read R*C, write R*C (+ O(R)); the target row of PROB is read
// in both phases.
// =============================================================================================
template <class D, class TI, bool PROB> struct CrossEntropyOp {
    typedef typename D::acc A;
    typedef typename D::store S;
    static constexpr bool kLSE = true, kReads = true;
    bool has_phase2;
    void* O;
    // inputs
    const TI* Tgt;
    const S* P;
    i64 P_row_stride;
    const A* W;
    const A* Div;
    A* Loss;
    float* Lse;
    S* GT;
    i64 C;
    i64 ignore_index;
    A eps, zl, cap, inv_cap;
    // per-row state
    const S* pr;
    S* gtr;
    i64 t;
    A lse, m, logs, inv_s, rs, coef_p, coef_t, eps_c;

    __device__ void begin_row(i64 row) {
        if (PROB) {
            pr = P + row * P_row_stride;
            gtr = GT ? GT + row * C : (S*)0;
        }
    }
    static __device__ RowState<A> identity() { return identity_state<A>(); }
    static __device__ void combine(RowState<A>& a, const RowState<A>& b) { combine_ms_sums(a, b); }
    __device__ A z(A x) const { return cap > (A)0 ? cap * gl_tanh(x * inv_cap) : x; }
    __device__ A wc(i64 c) const { return W ? W[c] : (A)1; }
    __device__ void acc(RowState<A>& st, i64 c, A, A zc) const {
        if (PROB) {
            A d = (1 - eps) * IO<D>::ld(pr[c]) + eps / (A)C;
            A wd = wc(c) * d;
            st.a0 += wd * zc;
            st.a1 += wd;
        } else if (eps != (A)0) {
            A w = wc(c);
            st.a0 += w * zc;
            st.a1 += w;
        }
    }
    __device__ void finish(i64 row, const S* xr, const RowState<A>& st, bool writer) {
        // losses and probabilities from (z - max), log(sum): lse = max + log(sum)
        // alone would lose log(sum) to rounding for logits near 1e4 in fp32
        m = st.m;
        logs = gl_log(st.s);
        inv_s = (A)1 / st.s;
        lse = m + logs;
        A s = Div ? (A)1 / *Div : (A)1;
        A loss;
        if (PROB) {
            loss = st.a1 * lse - st.a0 + zl * lse * lse;
            rs = s;
            coef_p = st.a1 + 2 * zl * lse;
        } else {
            t = (i64)Tgt[row];
            eps_c = eps / (A)C;
            if (t == ignore_index) {
                loss = 0;
                rs = 0;
                coef_p = 0;
                coef_t = 0;
                t = -1;
            } else if (t < 0 || t >= C) {
                loss = gl_nan<A>();
                rs = gl_nan<A>();
                coef_p = 0;
                coef_t = 0;
                t = -1;
            } else {
                A zt = z(IO<D>::ld(xr[t]));
                A wt = wc(t);
                loss = (1 - eps) * wt * ((m - zt) + logs) + zl * lse * lse;
                if (eps != (A)0) loss += eps_c * (st.a1 * lse - st.a0);
                rs = s;
                coef_t = (1 - eps) * wt;
                coef_p = coef_t + (eps != (A)0 ? eps_c * st.a1 : (A)0) + 2 * zl * lse;
            }
        }
        if (writer) {
            Loss[row] = loss;
            if (Lse) Lse[row] = (float)lse;
        }
    }
    __device__ A out(i64 c, A x, A zc) const {
        A p = gl_exp(zc - m) * inv_s;
        A dz;
        if (PROB) {
            A wj = wc(c);
            A d = (1 - eps) * IO<D>::ld(pr[c]) + eps / (A)C;
            dz = rs * (coef_p * p - wj * d);
            if (gtr) gtr[c] = IO<D>::st(-rs * (1 - eps) * wj * ((zc - m) - logs));
        } else {
            dz = coef_p * p - (c == t ? coef_t : (A)0);
            if (eps != (A)0) dz -= eps_c * wc(c);
            dz *= rs;
        }
        if (cap > (A)0) {
            A u = zc * inv_cap;
            dz *= (1 - u * u);
        }
        (void)x;
        return dz;
    }
};

// One kernel for every option; the flags that change the per-element work (softcap, smoothing,
// weight) are uniform branches on values, which cost nothing measurable in a memory-bound loop.
template <class D, class TI, bool PROB, int VEC, int K, bool ONCHIP>
__global__ void __launch_bounds__(GL_MAX_THREADS) GL_CLUSTER(K)
gpuloss_cross_entropy(const typename D::store* __restrict__ X_ptr, const TI* __restrict__ T_ptr,
                      const typename D::store* __restrict__ P_ptr, const typename D::acc* __restrict__ W_ptr,
                      const typename D::acc* __restrict__ Div_ptr, typename D::store* G_ptr,
                      typename D::acc* Loss_ptr, float* Lse_ptr, typename D::store* GT_ptr,
                      i64 X_row_stride, i64 P_row_stride, i64 G_row_stride, i64 R, i64 C,
                      i64 ignore_index, typename D::acc label_smoothing, typename D::acc z_loss,
                      typename D::acc softcap) {
    typedef typename D::acc A;
    CrossEntropyOp<D, TI, PROB> op;
    op.O = G_ptr;
    op.has_phase2 = G_ptr != 0 || (PROB && GT_ptr != 0);
    op.Tgt = T_ptr;
    op.P = P_ptr;
    op.P_row_stride = P_row_stride;
    op.W = W_ptr;
    op.Div = Div_ptr;
    op.Loss = Loss_ptr;
    op.Lse = Lse_ptr;
    op.GT = GT_ptr;
    op.C = C;
    op.ignore_index = ignore_index;
    op.eps = label_smoothing;
    op.zl = z_loss;
    op.cap = softcap;
    op.inv_cap = softcap > (A)0 ? (A)1 / softcap : (A)0;
    run_rows<D, CrossEntropyOp<D, TI, PROB>, VEC, K, ONCHIP>(op, X_ptr, X_row_stride, G_ptr, G_row_stride, R, C);
}

// The "mean" divisor of class-index cross-entropy and NLL (PyTorch): sum of w[t_i] over the
// valid rows, those whose target is not ignore_index and lies in [0, C) (1 per row without
// weight).  An out-of-range target is not counted: its own row's loss and gradient are NaN, the
// other rows keep theirs (the contract of gpuloss/rules.py, the same on every backend).  One
// block, O(R) reads; it writes a device scalar the loss kernel reads, so nothing syncs the host.
template <class A, class TI>
__global__ void __launch_bounds__(GL_MAX_THREADS)
gpuloss_mean_divisor(const TI* __restrict__ T_ptr, const A* __restrict__ W_ptr, A* Div_ptr,
                     i64 R, i64 C, i64 ignore_index) {
    __shared__ RowState<A> scratch[33];
    struct SumOp {
        static __device__ RowState<A> identity() { return identity_state<A>(); }
        static __device__ void combine(RowState<A>& a, const RowState<A>& b) { a.a0 += b.a0; }
    };
    RowState<A> st = identity_state<A>();
    for (i64 i = threadIdx.x; i < R; i += blockDim.x) {
        i64 t = (i64)T_ptr[i];
        if (t == ignore_index || t < 0 || t >= C) continue;
        st.a0 += W_ptr ? W_ptr[t] : (A)1;
    }
    st = block_reduce<SumOp, A>(st, scratch);
    if (threadIdx.x == 0) *Div_ptr = st.a0;
}

// =============================================================================================
// NLL on log-probabilities: loss = -w_t logp_t, dlogp_j = -s w_t [j == t].  Reads only the
// target element of each row (kReads = false) and writes the whole gradient row.
// =============================================================================================
template <class D, class TI> struct NllOp {
    typedef typename D::acc A;
    typedef typename D::store S;
    static constexpr bool kLSE = false, kReads = false;
    bool has_phase2;
    void* O;
    const TI* Tgt;
    const A* W;
    const A* Div;
    A* Loss;
    i64 C, ignore_index, t;
    A g;
    __device__ void begin_row(i64) {}
    static __device__ RowState<A> identity() { return identity_state<A>(); }
    static __device__ void combine(RowState<A>&, const RowState<A>&) {}
    __device__ A z(A x) const { return x; }
    __device__ void acc(RowState<A>&, i64, A, A) const {}
    __device__ void finish(i64 row, const S* xr, const RowState<A>&, bool writer) {
        t = (i64)Tgt[row];
        A s = Div ? (A)1 / *Div : (A)1;
        A loss;
        if (t == ignore_index) {
            loss = 0; g = 0; t = -1;
        } else if (t < 0 || t >= C) {
            loss = gl_nan<A>(); g = gl_nan<A>(); t = -2;
        } else {
            A wt = W ? W[t] : (A)1;
            loss = -wt * IO<D>::ld(xr[t]);
            g = -wt * s;
        }
        if (writer) Loss[row] = loss;
    }
    __device__ A out(i64 c, A, A) const { return t == -2 ? g : (c == t ? g : (A)0); }
};

template <class D, class TI>
__global__ void __launch_bounds__(GL_MAX_THREADS)
gpuloss_nll(const typename D::store* __restrict__ X_ptr, const TI* __restrict__ T_ptr,
            const typename D::acc* __restrict__ W_ptr, const typename D::acc* __restrict__ Div_ptr,
            typename D::store* G_ptr, typename D::acc* Loss_ptr, i64 X_row_stride, i64 G_row_stride,
            i64 R, i64 C, i64 ignore_index) {
    NllOp<D, TI> op;
    op.O = G_ptr;
    op.has_phase2 = G_ptr != 0;
    op.Tgt = T_ptr;
    op.W = W_ptr;
    op.Div = Div_ptr;
    op.Loss = Loss_ptr;
    op.C = C;
    op.ignore_index = ignore_index;
    run_rows<D, NllOp<D, TI>, 1, 1, false>(op, X_ptr, X_row_stride, G_ptr, G_row_stride, R, C);
}

// =============================================================================================
// Distillation KL from logits, per row: KL(d || q), q = softmax(x / T).
// Target logits y (TLOGITS): d = softmax(y / T).  With y' = y / T, z = x / T, a second online
// (max, sum) over y' in (a0, a1) and a2 = sum exp(y' - a0) (y' - z) rescaled alongside a1:
//   KL = a2 / a1 + lse_z - lse_y,   dx_j = s (q_j - d_j) / T
// Target probabilities d: a0 = sum xlogy(d, d) - d z, a1 = sum d:
//   KL = a0 + lse_z a1,              dx_j = s (a1 q_j - d_j) / T
// Traffic: x read once (onchip), the target row twice, dx written once.
// =============================================================================================
template <class D, bool TLOGITS> struct KlLogitsOp {
    typedef typename D::acc A;
    typedef typename D::store S;
    static constexpr bool kLSE = true, kReads = true;
    bool has_phase2;
    void* O;
    const S* Y;
    i64 Y_row_stride;
    A* Loss;
    A inv_t, scale;
    const S* yr;
    A lse, lse_y, sum_d;
    __device__ void begin_row(i64 row) { yr = Y + row * Y_row_stride; }
    static __device__ RowState<A> identity() {
        RowState<A> r = identity_state<A>();
        if (TLOGITS) r.a0 = -gl_inf<A>();  // a0 is the running max of y / T
        return r;
    }
    static __device__ void combine(RowState<A>& a, const RowState<A>& b) {
        merge_ms(a.m, a.s, b.m, b.s);
        if (TLOGITS) {
            A mn = gl_max(a.a0, b.a0);
            if (mn != -gl_inf<A>()) {
                A fa = gl_exp(a.a0 - mn), fb = gl_exp(b.a0 - mn);
                a.a1 = a.a1 * fa + b.a1 * fb;
                a.a2 = a.a2 * fa + b.a2 * fb;
            }
            a.a0 = mn;
        } else {
            a.a0 += b.a0;
            a.a1 += b.a1;
        }
    }
    __device__ A z(A x) const { return x * inv_t; }
    __device__ void acc(RowState<A>& st, i64 c, A, A zc) const {
        A y = IO<D>::ld(yr[c]);
        if (TLOGITS) {
            A yp = y * inv_t;
            RowState<A> one;
            one.m = -gl_inf<A>(); one.s = 0;
            one.a0 = yp; one.a1 = 1; one.a2 = yp - zc;
            combine(st, one);
        } else {
            st.a0 += (y == (A)0 ? (A)0 : y * gl_log(y)) - y * zc;
            st.a1 += y;
        }
    }
    __device__ void finish(i64 row, const S*, const RowState<A>& st, bool writer) {
        lse = st.m + gl_log(st.s);
        A kl;
        if (TLOGITS) {
            lse_y = st.a0 + gl_log(st.a1);
            kl = st.a2 / st.a1 + lse - lse_y;
            sum_d = 1;
        } else {
            kl = st.a0 + lse * st.a1;
            sum_d = st.a1;
        }
        if (writer) Loss[row] = kl;
    }
    __device__ A out(i64 c, A, A zc) const {
        A y = IO<D>::ld(yr[c]);
        A d = TLOGITS ? gl_exp(y * inv_t - lse_y) : y;
        return scale * (sum_d * gl_exp(zc - lse) - d) * inv_t;
    }
};

template <class D, bool TLOGITS, int VEC, int K, bool ONCHIP>
__global__ void __launch_bounds__(GL_MAX_THREADS) GL_CLUSTER(K)
gpuloss_kl_div_logits(const typename D::store* __restrict__ X_ptr, const typename D::store* __restrict__ Y_ptr,
                      typename D::store* G_ptr, typename D::acc* Loss_ptr, i64 X_row_stride, i64 Y_row_stride,
                      i64 G_row_stride, i64 R, i64 C, typename D::acc inv_temperature,
                      typename D::acc grad_scale) {
    KlLogitsOp<D, TLOGITS> op;
    op.O = G_ptr;
    op.has_phase2 = G_ptr != 0;
    op.Y = Y_ptr;
    op.Y_row_stride = Y_row_stride;
    op.Loss = Loss_ptr;
    op.inv_t = inv_temperature;
    op.scale = grad_scale;
    run_rows<D, KlLogitsOp<D, TLOGITS>, VEC, K, ONCHIP>(op, X_ptr, X_row_stride, G_ptr, G_row_stride, R, C);
}
