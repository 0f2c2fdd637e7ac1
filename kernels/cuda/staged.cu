// Staged row kernels: each element read from device memory once, by the copy engine, into
// shared memory several rows ahead; written once.  softmax / log_softmax forward and backward,
// cross-entropy (class-index targets) loss and dlogits.  Not the default: selected with
// GPULOSS_CUPY_VARIANT=staged (see gpuloss/backends/cupy/plan.py, plan_staged).
//
// Why not the "onchip" kernels of rows.cu: there every thread loads its share of the row
// itself, so the bytes in flight per SM are bounded by registers x resident threads, and a block
// stops reading while it reduces and writes; its clusters met twice per row at a full cluster
// barrier, every thread reading every peer's partial through DSMEM.  On the H200 that reached
// 0.42-0.70 of the copy floor, and clusters of 4 and 8 lost to re-reading the row (RESULTS.md).
//
// Here a persistent block (one per SM, or a K-block cluster over K SMs for long rows) owns
// NBUF shared-memory buffers, each holding its 1/K slice of one row (and of dy for the
// backward pass).  Rows are dealt to clusters round robin; while the block works on row j,
// rows j+1 .. j+NBUF-1 are already being copied in:
//   sm_90  one thread issues cp.async.bulk (the TMA engine, 16-byte aligned bulk copies)
//          completing on the buffer's mbarrier: the whole slice in flight, no registers held;
//   sm_80  every thread issues 16-byte cp.async for its vectors, one commit group per row.
// Per row: pass A over the slice in shared memory (online max / sum and the op's sums,
// rowops.cuh: the same arithmetic and thread order as rows.cu), block reduction, then with
// K > 1 the cluster exchange: each block sends its 5-value partial to every block of the
// cluster (itself included) with st.async, completing on the receiver's mbarrier, so no
// block waits at a cluster barrier or reads a peer's memory, and every block combines the K
// partials in rank order (identical results); two slots by row parity make one exchange per
// row enough.  Then pass B writes the output from shared memory with 16-byte stores, and the
// buffer is refilled with row j+NBUF.  exp is ex2.approx of the exactly reduced argument (z - m)
// (gl_exp_fast): 16-bit rows leave ~30 instructions per element at the copy floor.
// Traffic: read R*C (+ R*C of dy), write R*C; no second read, no global-memory rendezvous.
// Requires every row start 16-byte aligned (the host falls back otherwise); a ragged tail of
// fewer than 16 bytes at the row's end is read from global memory directly.
#include "rowops.cuh"
#include "reduce.cuh"

#ifdef GPULOSS_HAS_CLUSTER
#define GL_CLUSTER(K) __cluster_dims__(K, 1, 1)
#else
#define GL_CLUSTER(K)
#endif

// Launch bound: 1024 threads (64 registers) for fp32 arithmetic, 512 for fp64, which needs ~70.
// The host picks the block size up to it (gpuloss/backends/cupy/plan.py, staged_max_threads).
template <class D> struct StagedThreads {
    static constexpr int value = sizeof(typename D::acc) == 8 ? 512 : 1024;
};
#define GL_STAGED_MAX_BUF 4

// ---------------------------------------------------------------------------------------------
// Asynchronous copies and barriers (inline PTX: no CUDA headers under NVRTC).
// ---------------------------------------------------------------------------------------------
#if GPULOSS_CC >= 90
GL_DEV void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
// make the initialised barriers visible to the copy engine and to the other blocks of the cluster
GL_DEV void fence_mbar_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
GL_DEV void mbar_arrive_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
GL_DEV void mbar_wait(unsigned bar, unsigned parity) {
    unsigned done;
    do {
        asm volatile(
            "{\n\t.reg .pred p;\n\t"
            "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
            "selp.u32 %0, 1, 0, p;\n\t}"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}
// The same at cluster scope, for a barrier that other blocks' st.async complete: the wait's
// acquire must cover their writes.
GL_DEV void mbar_arrive_expect_tx_cluster(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
                 : "memory");
}
GL_DEV void mbar_wait_cluster(unsigned bar, unsigned parity) {
    unsigned done;
    do {
        asm volatile(
            "{\n\t.reg .pred p;\n\t"
            "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n\t"
            "selp.u32 %0, 1, 0, p;\n\t}"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}
// order this block's earlier generic-proxy reads of a buffer before the copy engine refills it
GL_DEV void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// bulk copy global -> this block's shared memory, completing ``bytes`` on ``bar``
GL_DEV void bulk_load(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}
#else
GL_DEV void cp_async16(unsigned dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
GL_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// wait until at most n of this thread's commit groups are pending (n < GL_STAGED_MAX_BUF)
GL_DEV void cp_async_wait(int n) {
    switch (n) {
        case 0: asm volatile("cp.async.wait_group 0;" ::: "memory"); break;
        case 1: asm volatile("cp.async.wait_group 1;" ::: "memory"); break;
        case 2: asm volatile("cp.async.wait_group 2;" ::: "memory"); break;
        default: asm volatile("cp.async.wait_group 3;" ::: "memory"); break;
    }
}
#endif

#ifdef GPULOSS_HAS_CLUSTER
// A row state as whole 16-byte words, the unit of st.async.
template <class A> union alignas(16) StateMsg {
    RowState<A> st;
    uint4 w[(sizeof(RowState<A>) + 15) / 16];
};
GL_DEV unsigned mapa(unsigned addr, unsigned rank) {
    unsigned r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(addr), "r"(rank));
    return r;
}
GL_DEV void st_async16(unsigned raddr, uint4 v, unsigned rbar) {
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];"
                 ::"r"(raddr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(rbar)
                 : "memory");
}

// Every block sends its partial into slot [rank] of every block (lanes 0..K-1 of warp 0, one
// receiver each), then waits for the K partials to land in its own slots and combines them in
// rank order.  ``slots`` / ``bar`` are this row parity's; the barrier's phase flips every
// second row.
template <class Op, int K, class A>
GL_DEV RowState<A> cluster_exchange(const RowState<A>& st, StateMsg<A>* slots, unsigned long long* bar,
                                    unsigned parity, unsigned rank) {
    const unsigned lbar = smem_addr(bar);
    if (threadIdx.x == 0) mbar_arrive_expect_tx_cluster(lbar, K * (unsigned)sizeof(StateMsg<A>));
    if (threadIdx.x < K) {
        StateMsg<A> msg;
        msg.st = st;
        const unsigned peer = threadIdx.x;
        const unsigned dst = mapa(smem_addr(&slots[rank]), peer), rbar = mapa(lbar, peer);
#pragma unroll
        for (int i = 0; i < (int)(sizeof(msg.w) / 16); ++i) st_async16(dst + 16 * i, msg.w[i], rbar);
    }
    mbar_wait_cluster(lbar, parity);
    RowState<A> tot = Op::identity();
#pragma unroll
    for (int r = 0; r < K; ++r) Op::combine(tot, slots[r].st);
    return tot;
}
#endif

// ---------------------------------------------------------------------------------------------
// The engine.  Op: see rowops.cuh; Op::kAux rows (dy) are staged beside x.
// ---------------------------------------------------------------------------------------------
template <class D, class Op, int K>
__device__ __forceinline__ void run_staged(Op& op, const typename D::store* __restrict__ X_ptr, i64 X_row_stride,
                                           typename D::store* O_ptr, i64 O_row_stride, i64 R, i64 C, int nbuf) {
    typedef typename D::store S;
    typedef typename D::acc A;
    constexpr int VEC = 16 / (int)sizeof(S);
    constexpr int NIN = Op::kAux ? 2 : 1;
    extern __shared__ uint4 gl_dyn_smem[];
    __shared__ RowState<A> scratch[33];
    const int tid = threadIdx.x, T = blockDim.x;
#if GPULOSS_CC >= 90
    __shared__ unsigned long long full[GL_STAGED_MAX_BUF];
#endif
#ifdef GPULOSS_HAS_CLUSTER
    __shared__ StateMsg<A> xslot[2][K];
    __shared__ unsigned long long xbar[2];
    const unsigned rank = K > 1 ? cluster_rank() : 0u;
#else
    const unsigned rank = 0u;
#endif
    // this block's slice [c0, c1) of every row: whole 16-byte vectors staged, the ragged rest
    // (only at the row's end) read directly
    const RowSlice sl = row_slice<VEC>(C, K, (int)rank);
    const int chunk = sl.chunk, c0 = sl.c0, c1 = sl.c1, nvec = sl.nvec;
#if GPULOSS_CC >= 90
    const unsigned bytes = (unsigned)nvec * 16u;  // one bulk copy per staged input
#endif
    const i64 cid = blockIdx.x / K, ncl = gridDim.x / K;
    const i64 nrows = cid < R ? (R - 1 - cid) / ncl + 1 : 0;
    S* const stage = reinterpret_cast<S*>(gl_dyn_smem);
    auto buf = [&](int b, int in) { return stage + ((i64)b * NIN + in) * chunk; };

    // start copying local row j (global row cid + j * ncl) into buffer b
    auto issue = [&](i64 j, int b) {
        const i64 row = cid + j * ncl;
        const S* x = X_ptr + row * X_row_stride + c0;
        const S* a = Op::kAux ? op.aux_row(row) + c0 : (const S*)0;
#if GPULOSS_CC >= 90
        if (tid == 0) {
            const unsigned bar = smem_addr(&full[b]);
            mbar_arrive_expect_tx(bar, NIN * bytes);  // 0 bytes: the phase completes here
            if (bytes) {
                bulk_load(smem_addr(buf(b, 0)), x, bytes, bar);
                if (Op::kAux) bulk_load(smem_addr(buf(b, 1)), a, bytes, bar);
            }
        }
#else
        for (int v = tid; v < nvec; v += T) {
            cp_async16(smem_addr(buf(b, 0) + v * VEC), x + v * VEC);
            if (Op::kAux) cp_async16(smem_addr(buf(b, 1) + v * VEC), a + v * VEC);
        }
#endif
    };

#if GPULOSS_CC >= 90
    if (tid == 0) {
        for (int b = 0; b < nbuf; ++b) mbar_init(smem_addr(&full[b]), 1);
#ifdef GPULOSS_HAS_CLUSTER
        if (K > 1) {
            mbar_init(smem_addr(&xbar[0]), 1);
            mbar_init(smem_addr(&xbar[1]), 1);
        }
#endif
        fence_mbar_init();
    }
#endif
#ifdef GPULOSS_HAS_CLUSTER
    if (K > 1) {
        cluster_sync();  // every block's barriers exist before any peer signals them
    } else {
        __syncthreads();
    }
#else
    __syncthreads();
#endif
    for (int b = 0; b < nbuf; ++b) {
        if (b < nrows) issue(b, b);
#if GPULOSS_CC < 90
        cp_async_commit();  // one group per buffer, empty or not: the wait count stays nbuf - 1
#endif
    }

    for (i64 j = 0; j < nrows; ++j) {
        const int b = (int)(j % nbuf);
        const i64 row = cid + j * ncl;
        const S* xr = X_ptr + row * X_row_stride;
        const S* ar = Op::kAux ? op.aux_row(row) : (const S*)0;
        op.begin_row(row, xr);  // before any block of the cluster can write this row (in place)
#if GPULOSS_CC >= 90
        mbar_wait(smem_addr(&full[b]), (unsigned)((j / nbuf) & 1));
#else
        cp_async_wait(nbuf - 1);
        __syncthreads();
#endif
        const S* xs = buf(b, 0);
        const S* as = buf(b, NIN - 1);

        // ---- pass A: the slice from shared memory -----------------------------------------
        RowState<A> st = Op::identity();
        for (int v = tid; v < nvec; v += T) {
            A x[VEC], a[VEC];
            unpack<D, VEC>(load_raw<D, VEC>(xs + v * VEC), x);
            if (Op::kAux) {
                unpack<D, VEC>(load_raw<D, VEC>(as + v * VEC), a);
            } else {
#pragma unroll
                for (int k = 0; k < VEC; ++k) a[k] = (A)0;
            }
            absorb<Op, VEC>(op, st, c0 + v * VEC, x, a);
        }
        for (int c = c0 + nvec * VEC + tid; c < c1; c += T) {
            A x[1] = {IO<D>::ld(xr[c])}, a[1] = {Op::kAux ? IO<D>::ld(ar[c]) : (A)0};
            absorb<Op, 1>(op, st, c, x, a);
        }

        // ---- reductions: block, then cluster ------------------------------------------------
        st = block_reduce<Op, A>(st, scratch);
#ifdef GPULOSS_HAS_CLUSTER
        if (K > 1) st = cluster_exchange<Op, K>(st, xslot[j & 1], &xbar[j & 1], (unsigned)((j >> 1) & 1), rank);
#endif
        op.finish(row, st, rank == 0 && tid == 0);

        // ---- pass B: one write per element --------------------------------------------------
        if (op.has_phase2) {
            S* orow = op.O ? O_ptr + row * O_row_stride : (S*)0;
            for (int v = tid; v < nvec; v += T) {
                const int c = c0 + v * VEC;
                A x[VEC], a[VEC], o[VEC];
                unpack<D, VEC>(load_raw<D, VEC>(xs + v * VEC), x);
                if (Op::kAux) unpack<D, VEC>(load_raw<D, VEC>(as + v * VEC), a);
                outputs<VEC>(op, c, x, a, o);
                if (orow) store_vec<D, VEC>(orow + c, o);
            }
            for (int c = c0 + nvec * VEC + tid; c < c1; c += T) {
                const A x = IO<D>::ld(xr[c]);
                const A o = op.out(c, x, op.z(x), Op::kAux ? IO<D>::ld(ar[c]) : (A)0);
                if (orow) orow[c] = IO<D>::st(o);
            }
        }

        __syncthreads();  // buffer b, scratch and this parity's slots are free again
        if (j + nbuf < nrows) {
#if GPULOSS_CC >= 90
            if (tid == 0) fence_proxy_async();
#endif
            issue(j + nbuf, b);
        }
#if GPULOSS_CC < 90
        cp_async_commit();
#endif
    }
#ifdef GPULOSS_HAS_CLUSTER
    if (K > 1) cluster_sync();  // no block leaves while a peer may still address its shared memory
#endif
}

// ---------------------------------------------------------------------------------------------
// The ops, as in rows.cu (same argument names and grouping, plus nbuf), with exp fast.
// ---------------------------------------------------------------------------------------------
template <class D, int K>
__device__ __forceinline__ void staged_softmax_fwd(const typename D::store* __restrict__ X_ptr,
                                                   typename D::store* Y_ptr, i64 X_row_stride, i64 Y_row_stride,
                                                   i64 R, i64 C, int log, int nbuf) {
    SoftmaxFwdOp<D, true> op;
    op.has_phase2 = true;
    op.log = log != 0;
    op.O = Y_ptr;
    run_staged<D, SoftmaxFwdOp<D, true>, K>(op, X_ptr, X_row_stride, Y_ptr, Y_row_stride, R, C, nbuf);
}

template <class D, int K>
__device__ __forceinline__ void staged_softmax_bwd(const typename D::store* __restrict__ Y_ptr,
                                                   const typename D::store* __restrict__ DY_ptr,
                                                   typename D::store* DX_ptr, i64 Y_row_stride, i64 DY_row_stride,
                                                   i64 DX_row_stride, i64 R, i64 C, int log, int nbuf) {
    SoftmaxBwdOp<D, true> op;
    op.has_phase2 = true;
    op.log = log != 0;
    op.O = DX_ptr;
    op.DY = DY_ptr;
    op.DY_row_stride = DY_row_stride;
    run_staged<D, SoftmaxBwdOp<D, true>, K>(op, Y_ptr, Y_row_stride, DX_ptr, DX_row_stride, R, C, nbuf);
}

// class-index targets as int64 (the host widens int32 targets: O(R) bytes)
template <class D, int K>
__device__ __forceinline__ void staged_cross_entropy(
    const typename D::store* __restrict__ X_ptr, const long long* __restrict__ T_ptr,
    const typename D::acc* __restrict__ W_ptr, const typename D::acc* __restrict__ Div_ptr, typename D::store* G_ptr,
    typename D::acc* Loss_ptr, float* Lse_ptr, i64 X_row_stride, i64 G_row_stride, i64 R, i64 C, i64 ignore_index,
    typename D::acc label_smoothing, typename D::acc z_loss, typename D::acc softcap, int nbuf) {
    typedef CrossEntropyOp<D, long long, false, true> Op;
    Op op;
    op.O = G_ptr;
    op.has_phase2 = G_ptr != 0;
    op.Tgt = T_ptr;
    op.P = 0;
    op.P_row_stride = 0;
    op.W = W_ptr;
    op.Div = Div_ptr;
    op.Loss = Loss_ptr;
    op.Lse = Lse_ptr;
    op.GT = 0;
    op.set_options(C, ignore_index, label_smoothing, z_loss, softcap);
    run_staged<D, Op, K>(op, X_ptr, X_row_stride, G_ptr, G_row_stride, R, C, nbuf);
}

// Thin extern "C" wrappers, gpuloss_<op>_staged_k<K>_<dtype>.
#define GL_STAGED_KERNELS(K, ATTR, TAG)                                                                  \
    extern "C" __global__ void __launch_bounds__(StagedThreads<TAG>::value, 1) ATTR                            \
    gpuloss_softmax_fwd_staged_k##K##_##TAG(const TAG::store* __restrict__ X_ptr, TAG::store* Y_ptr,   \
                                            i64 X_row_stride, i64 Y_row_stride, i64 R, i64 C, int log,   \
                                            int nbuf) {                                                  \
        staged_softmax_fwd<TAG, K>(X_ptr, Y_ptr, X_row_stride, Y_row_stride, R, C, log, nbuf);          \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(StagedThreads<TAG>::value, 1) ATTR                            \
    gpuloss_softmax_bwd_staged_k##K##_##TAG(const TAG::store* __restrict__ Y_ptr,                        \
                                            const TAG::store* __restrict__ DY_ptr, TAG::store* DX_ptr,   \
                                            i64 Y_row_stride, i64 DY_row_stride, i64 DX_row_stride, i64 R, \
                                            i64 C, int log, int nbuf) {                                  \
        staged_softmax_bwd<TAG, K>(Y_ptr, DY_ptr, DX_ptr, Y_row_stride, DY_row_stride, DX_row_stride, R, \
                                   C, log, nbuf);                                                        \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(StagedThreads<TAG>::value, 1) ATTR                            \
    gpuloss_cross_entropy_staged_k##K##_##TAG(                                                           \
        const TAG::store* __restrict__ X_ptr, const long long* __restrict__ T_ptr,                       \
        const TAG::acc* __restrict__ W_ptr, const TAG::acc* __restrict__ Div_ptr, TAG::store* G_ptr,     \
        TAG::acc* Loss_ptr, float* Lse_ptr, i64 X_row_stride, i64 G_row_stride, i64 R, i64 C,            \
        i64 ignore_index, TAG::acc label_smoothing, TAG::acc z_loss, TAG::acc softcap, int nbuf) {      \
        staged_cross_entropy<TAG, K>(X_ptr, T_ptr, W_ptr, Div_ptr, G_ptr, Loss_ptr, Lse_ptr, X_row_stride, \
                                     G_row_stride, R, C, ignore_index, label_smoothing, z_loss, softcap, \
                                     nbuf);                                                              \
    }

// The host builds one (cluster size, dtype) at a time: -DGPULOSS_STAGED_K=K and
// -DGPULOSS_STAGED_DTYPE=1 f32 | 2 f64 | 3 f16 | 4 bf16 (3 kernels); with neither, every
// combination is built (the CI compile and spill check).
#if !defined(GPULOSS_STAGED_DTYPE) || GPULOSS_STAGED_DTYPE == 1
#define GL_STAGED_F32(K, ATTR) GL_STAGED_KERNELS(K, ATTR, f32)
#else
#define GL_STAGED_F32(K, ATTR)
#endif
#if !defined(GPULOSS_STAGED_DTYPE) || GPULOSS_STAGED_DTYPE == 2
#define GL_STAGED_F64(K, ATTR) GL_STAGED_KERNELS(K, ATTR, f64)
#else
#define GL_STAGED_F64(K, ATTR)
#endif
#if !defined(GPULOSS_STAGED_DTYPE) || GPULOSS_STAGED_DTYPE == 3
#define GL_STAGED_F16(K, ATTR) GL_STAGED_KERNELS(K, ATTR, f16)
#else
#define GL_STAGED_F16(K, ATTR)
#endif
#if !defined(GPULOSS_STAGED_DTYPE) || GPULOSS_STAGED_DTYPE == 4
#define GL_STAGED_BF16(K, ATTR) GL_STAGED_KERNELS(K, ATTR, bf16)
#else
#define GL_STAGED_BF16(K, ATTR)
#endif
#define GL_STAGED_ALL_DTYPES(K, ATTR) GL_STAGED_F32(K, ATTR) GL_STAGED_F64(K, ATTR) GL_STAGED_F16(K, ATTR) GL_STAGED_BF16(K, ATTR)

#if !defined(GPULOSS_STAGED_K) || GPULOSS_STAGED_K == 1
GL_STAGED_ALL_DTYPES(1, )
#endif
#ifdef GPULOSS_HAS_CLUSTER
#if !defined(GPULOSS_STAGED_K) || GPULOSS_STAGED_K == 2
GL_STAGED_ALL_DTYPES(2, GL_CLUSTER(2))
#endif
#if !defined(GPULOSS_STAGED_K) || GPULOSS_STAGED_K == 4
GL_STAGED_ALL_DTYPES(4, GL_CLUSTER(4))
#endif
#if !defined(GPULOSS_STAGED_K) || GPULOSS_STAGED_K == 8
GL_STAGED_ALL_DTYPES(8, GL_CLUSTER(8))
#endif
#endif
