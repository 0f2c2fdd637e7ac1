// Host harness for the row kernels' arithmetic: runs the kernels' own per-row code
// (kernels/cuda/rowops.cuh, compiled here by g++ unchanged) in the order the engines use on
// the GPU: K blocks per row (a cluster), T threads per block, VEC-element vectors; each thread
// folds its vectors (tid, tid + T, ...) of its block's slice, then the ragged tail; the block
// reduces by the warp butterfly (xor 16..1) and warp 0's second butterfly; the cluster combines
// the K block states in rank order.  This is run_rows (rows.cu) and run_staged (staged.cu).
// What differs from the GPU: FMA contraction, and expf / ex2.approx's last bits.
//
// Protocol (tests/test_cuda_host_harness.py): stdin holds
//   int64 op, R, C, K, T, VEC, log, has_weight, fast;  float64 eps, z_loss, softcap, inv_t;
//   float32 x[R*C]; float32 aux[R*C] (ops with a second row); int64 t[R] (class targets);
//   float32 w[C] (has_weight)
// and stdout gets float32 loss[R] (row losses; unused for softmax), float32 out[R*C].
// op: 0 softmax_fwd, 1 softmax_bwd, 2 cross-entropy (class index), 3 cross-entropy
// (probabilities), 4 KL from logits with probability targets, 5 KL with teacher logits.
// fast = 1 runs the staged kernels' instantiations (FAST: exp2-based exp on the GPU, the same
// expf here; cross-entropy's lean phase 2, outputs() in rowops.cuh).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "rowops.cuh"

typedef RowState<float> St;

template <class Op>
static void butterfly(std::vector<St>& lanes) {
    for (int o = 16; o > 0; o >>= 1) {
        std::vector<St> prev = lanes;
        for (int l = 0; l < 32; ++l) {
            St a = prev[l];
            Op::combine(a, prev[l ^ o]);
            lanes[l] = a;
        }
    }
}

template <class Op>
static St block_reduce(const std::vector<St>& threads) {
    const int T = (int)threads.size(), nwarps = (T + 31) / 32;
    std::vector<St> scratch(nwarps);
    for (int w = 0; w < nwarps; ++w) {
        std::vector<St> lanes(32, Op::identity());
        for (int l = 0; l < 32 && w * 32 + l < T; ++l) lanes[l] = threads[w * 32 + l];
        butterfly<Op>(lanes);
        scratch[w] = lanes[0];
    }
    std::vector<St> lanes(32);
    for (int l = 0; l < 32; ++l) lanes[l] = l < nwarps ? scratch[l] : Op::identity();
    butterfly<Op>(lanes);
    return lanes[0];
}

template <class Op, int VEC>
static void run(Op& op, const float* X, const float* AUX, float* out, i64 R, i64 C, int K, int T) {
    for (i64 row = 0; row < R; ++row) {
        const float* xr = X + row * C;
        const float* ar = AUX ? AUX + row * C : 0;
        op.begin_row(row, xr);
        std::vector<St> ranks;
        for (int rank = 0; rank < K; ++rank) {
            const RowSlice sl = row_slice<VEC>(C, K, rank);
            const int c0 = sl.c0, c1 = sl.c1, nvec_end = sl.c0 + sl.nvec * VEC;
            std::vector<St> threads(T, Op::identity());
            for (int tid = 0; tid < T; ++tid) {
                St st = Op::identity();
                for (int c = c0 + tid * VEC; c < nvec_end; c += T * VEC) {
                    float v[VEC], aux[VEC];
                    for (int k = 0; k < VEC; ++k) {
                        v[k] = xr[c + k];
                        aux[k] = ar ? ar[c + k] : 0.f;
                    }
                    absorb<Op, VEC>(op, st, c, v, aux);
                }
                for (int c = nvec_end + tid; c < c1; c += T) {
                    float v[1] = {xr[c]}, aux[1] = {ar ? ar[c] : 0.f};
                    absorb<Op, 1>(op, st, c, v, aux);
                }
                threads[tid] = st;
            }
            ranks.push_back(block_reduce<Op>(threads));
        }
        St st = ranks[0];
        if (K > 1) {
            st = Op::identity();
            for (int r = 0; r < K; ++r) Op::combine(st, ranks[r]);
        }
        op.finish(row, st, true);
        if (!op.has_phase2) continue;
        for (int rank = 0; rank < K; ++rank) {  // phase 2 as the engines run it: outputs() per vector
            const RowSlice sl = row_slice<VEC>(C, K, rank);
            const int c0 = sl.c0, c1 = sl.c1, nvec_end = sl.c0 + sl.nvec * VEC;
            for (int c = c0; c < nvec_end; c += VEC) {
                float v[VEC], aux[VEC], o[VEC];
                for (int k = 0; k < VEC; ++k) {
                    v[k] = xr[c + k];
                    aux[k] = ar ? ar[c + k] : 0.f;
                }
                outputs<VEC>(op, c, v, aux, o);
                for (int k = 0; k < VEC; ++k) out[row * C + c + k] = o[k];
            }
            for (int c = nvec_end; c < c1; ++c) {
                float v[1] = {xr[c]}, aux[1] = {ar ? ar[c] : 0.f}, o[1];
                outputs<1>(op, c, v, aux, o);
                out[row * C + c] = o[0];
            }
        }
    }
}

template <class Op>
static void run_vec(Op& op, const float* X, const float* AUX, float* out, i64 R, i64 C, int K, int T, int VEC) {
    switch (VEC) {
        case 1: run<Op, 1>(op, X, AUX, out, R, C, K, T); break;
        case 2: run<Op, 2>(op, X, AUX, out, R, C, K, T); break;
        case 4: run<Op, 4>(op, X, AUX, out, R, C, K, T); break;
        case 8: run<Op, 8>(op, X, AUX, out, R, C, K, T); break;
        default: fprintf(stderr, "VEC %d\n", VEC); exit(2);
    }
}

template <class T_>
static std::vector<T_> read_n(size_t n) {
    std::vector<T_> v(n);
    if (n && fread(v.data(), sizeof(T_), n, stdin) != n) {
        fprintf(stderr, "short input\n");
        exit(2);
    }
    return v;
}

int main() {
    std::vector<i64> h = read_n<i64>(9);
    std::vector<double> p = read_n<double>(4);
    const i64 op = h[0], R = h[1], C = h[2];
    const int K = (int)h[3], T = (int)h[4], VEC = (int)h[5];
    const bool log = h[6] != 0, has_w = h[7] != 0, fast = h[8] != 0;
    const float eps = (float)p[0], zl = (float)p[1], cap = (float)p[2], inv_t = (float)p[3];
    const bool has_aux = op == 1 || op == 3 || op == 4 || op == 5;
    std::vector<float> x = read_n<float>(R * C);
    std::vector<float> aux = has_aux ? read_n<float>(R * C) : std::vector<float>();
    std::vector<i64> t = op == 2 ? read_n<i64>(R) : std::vector<i64>();
    std::vector<float> w = has_w ? read_n<float>(C) : std::vector<float>();
    std::vector<float> loss(R, 0.f), lse(R, 0.f), out(R * C, nanf(""));
    const float* A = has_aux ? aux.data() : 0;
    if (op == 0) {
        auto go = [&](auto& o) {
            o.has_phase2 = true; o.log = log; o.O = out.data();
            run_vec(o, x.data(), A, out.data(), R, C, K, T, VEC);
        };
        SoftmaxFwdOp<f32> o;
        SoftmaxFwdOp<f32, true> of;
        if (fast) go(of); else go(o);
    } else if (op == 1) {
        auto go = [&](auto& o) {
            o.has_phase2 = true; o.log = log; o.O = out.data(); o.DY = aux.data(); o.DY_row_stride = C;
            run_vec(o, x.data(), A, out.data(), R, C, K, T, VEC);
        };
        SoftmaxBwdOp<f32> o;
        SoftmaxBwdOp<f32, true> of;
        if (fast) go(of); else go(o);
    } else if (op == 2 || op == 3) {
        // both instantiations share the setup; PROB reads the targets as the second row
        auto setup = [&](auto& o) {
            o.has_phase2 = true; o.O = out.data();
            o.P = aux.data(); o.P_row_stride = C; o.W = has_w ? w.data() : 0; o.Div = 0;
            o.Loss = loss.data(); o.Lse = lse.data(); o.GT = 0;
            o.set_options(C, -100, eps, zl, cap);
        };
        if (op == 2 && fast) {
            CrossEntropyOp<f32, i64, false, true> o;
            setup(o);
            o.Tgt = t.data();
            run_vec(o, x.data(), A, out.data(), R, C, K, T, VEC);
        } else if (op == 2) {
            CrossEntropyOp<f32, i64, false> o;
            setup(o);
            o.Tgt = t.data();
            run_vec(o, x.data(), A, out.data(), R, C, K, T, VEC);
        } else {
            CrossEntropyOp<f32, i64, true> o;
            setup(o);
            o.Tgt = 0;
            run_vec(o, x.data(), A, out.data(), R, C, K, T, VEC);
        }
    } else if (op == 4 || op == 5) {
        auto setup = [&](auto& o) {
            o.has_phase2 = true; o.O = out.data(); o.Y = aux.data(); o.Y_row_stride = C;
            o.Loss = loss.data(); o.inv_t = inv_t; o.scale = 1.f;
        };
        if (op == 4) {
            KlLogitsOp<f32, false> o;
            setup(o);
            run_vec(o, x.data(), A, out.data(), R, C, K, T, VEC);
        } else {
            KlLogitsOp<f32, true> o;
            setup(o);
            run_vec(o, x.data(), A, out.data(), R, C, K, T, VEC);
        }
    } else {
        fprintf(stderr, "op %lld\n", op);
        return 2;
    }
    fwrite(loss.data(), sizeof(float), R, stdout);
    fwrite(out.data(), sizeof(float), R * C, stdout);
    return 0;
}
