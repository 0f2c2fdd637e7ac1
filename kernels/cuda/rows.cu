// Row-wise ops over (R, C) rows with a unit-stride last axis: softmax / log_softmax forward and
// backward, cross-entropy loss + dlogits, NLL, distillation KL from logits.
//
// One engine (run_rows) serves every op; the per-row arithmetic is in rowops.cuh.  A row (or,
// with a cluster, a 1/K slice of it) is handled by one block in two phases:
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
//           over a 2-block cluster that exchanges its (max, sum) partials via DSMEM.
// A second input row (op.kAux: dy, probability targets, teacher logits) is read in both phases.
// Offsets are 64-bit from the start: row * X_row_stride can pass 2^31.
#include "rowops.cuh"
#include "reduce.cuh"

#ifdef GPULOSS_HAS_CLUSTER
#define GL_CLUSTER(K) __cluster_dims__(K, 1, 1)
#else
#define GL_CLUSTER(K)
#endif

// Blocks of at most 512 threads, with ptxas free to use up to 128 registers: the fp32 paths
// settle at 40-64 (2-3 blocks per SM), float64 at up to ~110, and nothing spills.  Bounds of
// 1024 threads capped every kernel at 64 registers (ptxas aimed at 32) and spilled up to 228
// bytes in a third of the kernels.
#define GL_MAX_THREADS 512
// the longest row: column indices and c + blockDim * VEC stay inside an int
#define GL_MAX_COLS (0x7fffffff - 65536)

// The engine.  Op: see rowops.cuh.
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
    // this block's slice [c0, c1) of the row (row offsets stay 64-bit)
    const RowSlice sl = row_slice<VEC>(C, K, (int)rank);
    const int c0 = sl.c0, c1 = sl.c1, nvec_end = sl.c0 + sl.nvec * VEC;

    for (i64 row = blockIdx.x / K; row < R; row += gridDim.x / K) {
        const S* xr = X_ptr + row * X_row_stride;
        const S* ar = Op::kAux ? op.aux_row(row) : (const S*)0;
        op.begin_row(row, xr);
        RowState<A> st = Op::identity();

        // ---- phase 1: one read of the slice ----------------------------------------------
        if (Op::kReads) {
#pragma unroll 2
            for (int c = c0 + tid * VEC; c < nvec_end; c += T * VEC) {
                A v[VEC], aux[VEC];
                const Raw<D, VEC> raw = load_raw<D, VEC>(xr + c);
                if (ONCHIP) store_raw<D, VEC>(buf + (c - c0), raw);
                unpack<D, VEC>(raw, v);
                if (Op::kAux) load_vec<D, VEC>(ar + c, aux);
                absorb<Op, VEC>(op, st, c, v, aux);
            }
            for (int c = nvec_end + tid; c < c1; c += T) {  // ragged tail, < VEC elements
                A v[1], aux[1] = {(A)0};
                if (ONCHIP) buf[c - c0] = xr[c];
                v[0] = IO<D>::ld(xr[c]);
                if (Op::kAux) aux[0] = IO<D>::ld(ar[c]);
                absorb<Op, 1>(op, st, c, v, aux);
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
        op.finish(row, st, rank == 0 && tid == 0);

        // ---- phase 2: one write per element ----------------------------------------------
        if (op.has_phase2) {
            S* orow = op.O ? O_ptr + row * O_row_stride : (S*)0;
#pragma unroll 2
            for (int c = c0 + tid * VEC; c < nvec_end; c += T * VEC) {
                A v[VEC], aux[VEC], o[VEC];
                if (!Op::kReads) {
#pragma unroll
                    for (int k = 0; k < VEC; ++k) v[k] = (A)0;
                } else if (ONCHIP) {
                    load_vec<D, VEC>(buf + (c - c0), v);
                } else {
                    load_vec<D, VEC>(xr + c, v);
                }
                if (Op::kAux) load_vec<D, VEC>(ar + c, aux);
                outputs<VEC>(op, c, v, aux, o);
                if (orow) store_vec<D, VEC>(orow + c, o);
            }
            for (int c = nvec_end + tid; c < c1; c += T) {
                A v = !Op::kReads ? (A)0 : ONCHIP ? IO<D>::ld(buf[c - c0]) : IO<D>::ld(xr[c]);
                A a = Op::kAux ? IO<D>::ld(ar[c]) : (A)0;
                A o = op.out(c, v, op.z(v), a);
                if (orow) orow[c] = IO<D>::st(o);
            }
        }
        __syncthreads();  // scratch and buf are reused by the next row
    }
}

// =============================================================================================
// softmax / log_softmax forward.  Traffic (onchip): read R*C, write R*C.
// =============================================================================================
template <class D, int VEC, int K, bool ONCHIP>
__global__ void __launch_bounds__(GL_MAX_THREADS, 1) GL_CLUSTER(K)
gpuloss_softmax_fwd(const typename D::store* __restrict__ X_ptr, typename D::store* Y_ptr,
                    i64 X_row_stride, i64 Y_row_stride, i64 R, i64 C, int log) {
    SoftmaxFwdOp<D> op;
    op.has_phase2 = true;
    op.log = log != 0;
    op.O = Y_ptr;
    run_rows<D, SoftmaxFwdOp<D>, VEC, K, ONCHIP>(op, X_ptr, X_row_stride, Y_ptr, Y_row_stride, R, C);
}

// =============================================================================================
// softmax backward (main row y, second input dy read in both phases).
// =============================================================================================
template <class D, int VEC, int K, bool ONCHIP>
__global__ void __launch_bounds__(GL_MAX_THREADS, 1) GL_CLUSTER(K)
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
// Cross-entropy from logits, loss and dlogits in one pass (math: CrossEntropyOp in rowops.cuh).
// Traffic (onchip, index targets): read R*C, write R*C (+ O(R)); the target row of PROB is read
// in both phases.
// One kernel for every option; the flags that change the per-element work (softcap, smoothing,
// weight) are uniform branches on values, which cost nothing measurable in a memory-bound loop.
// =============================================================================================
template <class D, class TI, bool PROB, int VEC, int K, bool ONCHIP>
__global__ void __launch_bounds__(GL_MAX_THREADS, 1) GL_CLUSTER(K)
gpuloss_cross_entropy(const typename D::store* __restrict__ X_ptr, const TI* __restrict__ T_ptr,
                      const typename D::store* __restrict__ P_ptr, const typename D::acc* __restrict__ W_ptr,
                      const typename D::acc* __restrict__ Div_ptr, typename D::store* G_ptr,
                      typename D::acc* Loss_ptr, float* Lse_ptr, typename D::store* GT_ptr,
                      i64 X_row_stride, i64 P_row_stride, i64 G_row_stride, i64 R, i64 C,
                      i64 ignore_index, typename D::acc label_smoothing, typename D::acc z_loss,
                      typename D::acc softcap) {
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
    op.set_options(C, ignore_index, label_smoothing, z_loss, softcap);
    run_rows<D, CrossEntropyOp<D, TI, PROB>, VEC, K, ONCHIP>(op, X_ptr, X_row_stride, G_ptr, G_row_stride, R, C);
}

// The "mean" divisor of class-index cross-entropy and NLL (PyTorch): sum of w[t_i] over the
// valid rows, those whose target is not ignore_index and lies in [0, C) (1 per row without
// weight).  An out-of-range target is not counted: its own row's loss and gradient are NaN, the
// other rows keep theirs (the contract of gpuloss/rules.py, the same on every backend).  One
// block, O(R) reads; it writes a device scalar the loss kernel reads, so nothing syncs the host.
template <class A, class TI>
__global__ void __launch_bounds__(GL_MAX_THREADS, 1)
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
    // a zero divisor as NaN: "mean" = sum / Div is NaN as torch's (also with a nonzero smoothing
    // sum), valid rows' scale 1 / Div NaN; ignored rows' scale is selected, never multiplied
    if (threadIdx.x == 0) *Div_ptr = st.a0 == (A)0 ? gl_nan<A>() : st.a0;
}

// =============================================================================================
// NLL on log-probabilities (NllOp): reads the target element of each row, writes the gradient.
// =============================================================================================
template <class D, class TI>
__global__ void __launch_bounds__(GL_MAX_THREADS, 1)
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
// Distillation KL from logits (KlLogitsOp).  Traffic: x read once (onchip), the target row twice,
// dx written once.
// =============================================================================================
template <class D, bool TLOGITS, int VEC, int K, bool ONCHIP>
__global__ void __launch_bounds__(GL_MAX_THREADS, 1) GL_CLUSTER(K)
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
