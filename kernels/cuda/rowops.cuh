// The per-row arithmetic of the row kernels (rows.cu, staged.cu): the running state of a row,
// how two partial states merge, and one struct per op that says what a row accumulates, what
// it concludes, and what it writes per element.  The engines only move data and call these.
//
// Everything here is plain arithmetic on values and pointers (GL_HD): it compiles for the device
// and, unchanged, as host C++, which is how tests/host/rows_harness.cpp checks the kernels'
// arithmetic order without a GPU.
//
// Precision independent of where the logits sit.  A sum over the row that multiplies logits
// (label smoothing's sum_c w_c z_c, a probability target's sum_c w_c d_c z_c, distillation's
// sum_c d_c z_c) is kept relative to the running maximum m of the row:
//     a0 = sum_c u_c (z_c - m),   a1 = sum_c u_c     (u_c >= 0: weights, targets)
// and when m moves to mn, a0 += a1 (m - mn) (rebase_rel).  Every term of a0 has the sign of
// (z_c - m) <= 0, so a0 has no cancellation, and the loss reads a1 * log(s) - a0: two terms
// >= 0.  A sum of raw logits instead would be ~C * offset (32000 * 1e5), losing the loss's
// digits to cancellation, and overflowing fp32 (-> inf - inf = nan) for offsets near 1e37.
// The weights u_c carry the factor the loss applies to the sum (label smoothing's eps/C), so
// that sum_c u_c stays O(max weight), not O(C): |a0| is then at most that times the row's
// spread max - min.  With u_c = w_c, a0 ~ C x spread overflows fp32 although the loss does not:
// bf16 logits near 1e37 lie ~1e35-1e36 apart (8-bit significands), and 1000 x 1e36 > 3.4e38.
#pragma once
#include "common.cuh"

template <class A> struct RowState { A m, s, a0, a1, a2; };

// The slice [c0, c1) of a row of C columns that block `rank` of a K-block row handles: equal
// chunks of whole VEC-element vectors (every slice start stays 16-byte aligned), the last one
// short; nvec whole vectors in it, then the ragged rest.  Columns are 32-bit (the host admits
// C <= GL_MAX_COLS); the host's shared-memory plans size buffers by the same chunk.
struct RowSlice { int chunk, c0, c1, nvec; };

template <int VEC> GL_HD RowSlice row_slice(i64 C, int K, int rank) {
    RowSlice r;
    r.chunk = (int)(((C + K - 1) / K + VEC - 1) / VEC * VEC);
    r.c0 = rank * r.chunk;
    r.c1 = r.c0 + r.chunk < C ? r.c0 + r.chunk : (int)C;
    r.nvec = r.c1 > r.c0 ? (r.c1 - r.c0) / VEC : 0;
    return r;
}

template <class A> GL_HD RowState<A> identity_state() {
    RowState<A> r;
    r.m = -gl_inf<A>(); r.s = (A)0; r.a0 = (A)0; r.a1 = (A)0; r.a2 = (A)0;
    return r;
}

// (m, s) with s = sum exp(z - m): merge two partials.  -inf maxima (empty or all -inf) carry s=0.
template <class A, class Exp>
GL_HD void merge_ms(A& m, A& s, A m2, A s2, Exp ex) {
    A mn = gl_max(m, m2);
    if (mn == -gl_inf<A>()) { s = s + s2; m = mn; return; }
    s = s * ex(m - mn) + s2 * ex(m2 - mn);
    m = mn;
}

// a0 = sum u (z - m) with a1 = sum u, re-expressed relative to mn >= m.
template <class A>
GL_HD A rebase_rel(A a0, A a1, A m, A mn) {
    return (m == mn || a1 == (A)0) ? a0 : a0 + a1 * (m - mn);
}

// z - m for an element already folded into the running maximum m (so z <= m, or z is NaN).
// While m is still -inf every element seen is -inf (or NaN): it stays -inf (NaN) relative to
// any later maximum, instead of -inf - -inf = NaN.
template <class A>
GL_HD A rel(A z, A m) {
    return m == -gl_inf<A>() ? z : z - m;
}

// exp in the accumulation type: accurate (looped / onchip kernels) or ex2.approx of an exactly
// reduced argument (staged kernels, where 16-bit rows leave ~30 instructions per element).
// Exp for outputs; ExpSum for the terms and rescalings of sum exp(z - max) (see gl_exp_fast_sum).
template <bool FAST> struct Exp {
    template <class A> GL_HD A operator()(A d) const { return FAST ? gl_exp_fast(d) : gl_exp(d); }
};
template <bool FAST> struct ExpSum {
    template <class A> GL_HD A operator()(A d) const { return FAST ? gl_exp_fast_sum(d) : gl_exp(d); }
};

// Fold VEC consecutive elements (columns c .. c+VEC-1, values v, second input aux) into a
// thread's running state: one max over the vector, one rescale of s, then the op's sums.
template <class Op, int VEC, class A>
GL_HD void absorb(const Op& op, RowState<A>& st, int c, const A (&v)[VEC], const A (&aux)[VEC]) {
    A z[VEC];
    A gm = -gl_inf<A>();
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        z[k] = op.z(v[k]);
        gm = gl_max(gm, z[k]);
    }
    if (Op::kLSE) {
        A mn = gl_max(st.m, gm);
        if (mn != -gl_inf<A>()) {
            op.rebase(st, mn);
            A s = st.s * op.ex_sum(st.m - mn);
#pragma unroll
            for (int k = 0; k < VEC; ++k) s += op.ex_sum(z[k] - mn);
            st.s = s;
            st.m = mn;
        } else {
            // every z so far is -inf or NaN, and gl_max (fmaxf) dropped the NaN: it must still
            // reach s, or the row's loss and outputs come out finite where torch's are NaN
#pragma unroll
            for (int k = 0; k < VEC; ++k) st.s += z[k] != z[k] ? z[k] : (A)0;
        }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) op.acc(st, c + k, v[k], z[k], aux[k]);
}

// Phase 2 for VEC consecutive elements: o = op.out per element.  Ops may overload this for a
// leaner path (CrossEntropyOp below).
template <int VEC, class Op, class A>
GL_HD void outputs(const Op& op, int c, const A (&x)[VEC], const A (&aux)[VEC], A (&o)[VEC]) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) o[k] = op.out(c + k, x[k], op.z(x[k]), Op::kAux ? aux[k] : (A)0);
}

// The combination every op with a running (m, s) and max-relative sums (a0, a1) uses; a2 is a
// plain sum.  Ops without a running maximum keep m = -inf, where this is a plain sum of a0..a2.
template <class A, class Exp>
GL_HD void combine_rel(RowState<A>& a, const RowState<A>& b, Exp ex) {
    const A mn = gl_max(a.m, b.m);
    a.a0 = rebase_rel(a.a0, a.a1, a.m, mn) + rebase_rel(b.a0, b.a1, b.m, mn);
    a.a1 += b.a1;
    a.a2 += b.a2;
    merge_ms(a.m, a.s, b.m, b.s, ex);
}

// =============================================================================================
// The ops.  Interface (all GL_HD):
//   kLSE    track the online max / sum-of-exp of z = op.z(x)
//   kReads  phase 1 reads the row (NLL reads only its target element)
//   kAux    a second row of the same shape and dtype is read alongside x (aux_row(row))
//   identity(), combine(a, b), rebase(st, mn): the state algebra
//   begin_row(row, xr)  before phase 1: per-row reads that must precede any write to the row
//                       (an in-place gradient overwrites x in phase 2)
//   acc(st, c, x, z, aux), finish(row, st, writer), out(c, x, z, aux)
//   has_phase2, O: phase 2 runs / its main output (may be null)
// =============================================================================================

// softmax / log_softmax forward:  y = exp(x - max) / s  or  (x - max) - log(s).
template <class D, bool FAST = false> struct SoftmaxFwdOp {
    typedef typename D::acc A;
    typedef typename D::store S;
    static constexpr bool kLSE = true, kReads = true, kAux = false;
    bool has_phase2, log;
    void* O;
    A m, logs, inv_s;
    GL_HD A ex(A d) const { return Exp<FAST>()(d); }
    GL_HD A ex_sum(A d) const { return ExpSum<FAST>()(d); }
    GL_HD void begin_row(i64, const S*) {}
    GL_HD const S* aux_row(i64) const { return (const S*)0; }
    static GL_HD RowState<A> identity() { return identity_state<A>(); }
    static GL_HD void combine(RowState<A>& a, const RowState<A>& b) { combine_rel(a, b, ExpSum<FAST>()); }
    GL_HD void rebase(RowState<A>&, A) const {}
    GL_HD A z(A x) const { return x; }
    GL_HD void acc(RowState<A>&, int, A, A, A) const {}
    GL_HD void finish(i64, const RowState<A>& st, bool) {
        // y from (x - max) and the sum, never from x - lse: with logits near
        // 1e4, lse = max + log(sum) rounds away log(sum) in fp32
        m = st.m;
        logs = gl_log(st.s);
        inv_s = (A)1 / st.s;
    }
    GL_HD A out(int, A x, A, A) const { return log ? (x - m) - logs : ex(x - m) * inv_s; }
};

// softmax backward (x is y, aux is dy):
//   softmax:     dx = y * (dy - sum(dy * y))
//   log_softmax: dx = dy - exp(y) * sum(dy)
template <class D, bool FAST = false> struct SoftmaxBwdOp {
    typedef typename D::acc A;
    typedef typename D::store S;
    static constexpr bool kLSE = false, kReads = true, kAux = true;
    bool has_phase2, log;
    void* O;
    const S* DY;
    i64 DY_row_stride;
    A tot;
    GL_HD A ex(A d) const { return Exp<FAST>()(d); }
    GL_HD A ex_sum(A d) const { return ExpSum<FAST>()(d); }
    GL_HD void begin_row(i64, const S*) {}
    GL_HD const S* aux_row(i64 row) const { return DY + row * DY_row_stride; }
    static GL_HD RowState<A> identity() { return identity_state<A>(); }
    static GL_HD void combine(RowState<A>& a, const RowState<A>& b) { a.a0 += b.a0; }
    GL_HD void rebase(RowState<A>&, A) const {}
    GL_HD A z(A x) const { return x; }
    GL_HD void acc(RowState<A>& st, int, A y, A, A dy) const { st.a0 += log ? dy : dy * y; }
    GL_HD void finish(i64, const RowState<A>& st, bool) { tot = st.a0; }
    GL_HD A out(int, A y, A, A dy) const { return log ? dy - ex(y) * tot : y * (dy - tot); }
};

// Cross-entropy from logits, loss and dlogits in one pass over the logits.
//   z = softcap ? cap * tanh(x / cap) : x,  m = max z,  s = sum exp(z - m),  lse = m + log s
// Class-index target t (PROB = false), w = weight or 1, W = sum_c w_c, eps = label smoothing:
//   loss = (1-eps) w_t ((m - z_t) + log s) + eps/C (W log s - sum_c w_c (z_c - m)) + z_loss lse^2
//   dz_j = s [ ((1-eps) w_t + eps/C W + 2 z_loss lse) p_j - (1-eps) w_t [j==t] - eps/C w_j ]
// (eps/C sum_c w_c (z_c - m) and eps/C W are the phase-1 sums a0, a1: scaled per term, so that
// they stay finite where C x the spread of the logits overflows).  Ignored rows: loss 0, gradient 0.
// A target outside [0, C) that is not ignore_index is never dereferenced: loss and gradient NaN.
// Probability target d (PROB = true, aux), smoothed d~ = (1-eps) d + eps/C, a1 = sum w d~:
//   loss = a1 log s - sum_c w_c d~_c (z_c - m) + z_loss lse^2
//   dz_j = s [ (a1 + 2 z_loss lse) p_j - w_j d~_j ],   dd_j = -s (1-eps) w_j ((z_j - m) - log s)
// Chain rule through the softcap: dx = dz (1 - (z / cap)^2).
// s = 1 / divisor for "mean" (the divisor is a device scalar: no host sync), else 1.
template <class D, class TI, bool PROB, bool FAST = false> struct CrossEntropyOp {
    typedef typename D::acc A;
    typedef typename D::store S;
    static constexpr bool kLSE = true, kReads = true, kAux = PROB;
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
    A eps, eps_c, zl, cap, inv_cap;
    // per-row state
    S* gtr;
    i64 t;
    int tc;  // the target's column, -1 for none (ignored or invalid)
    A zt, m, logs, inv_s, rs, coef_p, coef_t;
    A scale_p;  // rs * coef_p / s: the plain gradient is scale_p * exp(z - m) (outputs() below)

    GL_HD A ex(A d) const { return Exp<FAST>()(d); }
    GL_HD A ex_sum(A d) const { return ExpSum<FAST>()(d); }
    // the loss options and what is derived from them, set in one place for every kernel
    GL_HD void set_options(i64 n_classes, i64 ignore, A label_smoothing, A z_loss, A softcap) {
        C = n_classes;
        ignore_index = ignore;
        eps = label_smoothing;
        eps_c = label_smoothing / (A)n_classes;
        zl = z_loss;
        cap = softcap;
        inv_cap = softcap > (A)0 ? (A)1 / softcap : (A)0;
    }
    GL_HD void begin_row(i64 row, const S* xr) {
        if (PROB) {
            gtr = GT ? GT + row * C : (S*)0;
        } else {
            // the target logit is read here, before the row's reduction: an in-place gradient
            // may overwrite x[t] as soon as any thread (or block of the cluster) is past it
            t = (i64)Tgt[row];
            zt = (t >= 0 && t < C) ? z(IO<D>::ld(xr[t])) : (A)0;
        }
    }
    GL_HD const S* aux_row(i64 row) const { return P + row * P_row_stride; }
    static GL_HD RowState<A> identity() { return identity_state<A>(); }
    static GL_HD void combine(RowState<A>& a, const RowState<A>& b) { combine_rel(a, b, ExpSum<FAST>()); }
    GL_HD void rebase(RowState<A>& st, A mn) const {
        if (PROB || eps != (A)0) st.a0 = rebase_rel(st.a0, st.a1, st.m, mn);
    }
    GL_HD A z(A x) const { return cap > (A)0 ? gl_mul_rn(cap, gl_tanh(x * inv_cap)) : x; }
    GL_HD A wc(int c) const { return W ? W[c] : (A)1; }
    GL_HD void acc(RowState<A>& st, int c, A, A zc, A d) const {
        if (PROB) {
            A wd = wc(c) * ((1 - eps) * d + eps_c);
            st.a0 += wd * rel(zc, st.m);
            st.a1 += wd;
        } else if (eps != (A)0) {
            A u = eps_c * wc(c);  // eps/C folded in per term: sum_c w_c (z_c - m) alone overflows
            st.a0 += u * rel(zc, st.m);
            st.a1 += u;
        }
    }
    GL_HD void finish(i64 row, const RowState<A>& st, bool writer) {
        // losses and probabilities from (z - max), log(sum): lse = max + log(sum)
        // alone would lose log(sum) to rounding for logits near 1e4 in fp32
        m = st.m;
        logs = gl_log(st.s);
        inv_s = (A)1 / st.s;
        const A lse = m + logs;
        // z_loss = 0 adds nothing, even where lse^2 overflows (|logits| > 1.8e19 in fp32)
        const A zterm = zl != (A)0 ? zl * lse * lse : (A)0;
        const A zgrad = zl != (A)0 ? 2 * zl * lse : (A)0;
        A s = Div ? (A)1 / *Div : (A)1;
        A loss;
        if (PROB) {
            loss = (st.a1 * logs - st.a0) + zterm;
            rs = s;
            coef_p = st.a1 + zgrad;
        } else if (t == ignore_index) {
            loss = 0; rs = 0; coef_p = 0; coef_t = 0; tc = -1;
        } else if (t < 0 || t >= C) {
            loss = gl_nan<A>(); rs = gl_nan<A>(); coef_p = 0; coef_t = 0; tc = -1;
        } else {
            tc = (int)t;
            A wt = wc(tc);
            loss = (1 - eps) * wt * ((m - zt) + logs) + zterm;
            if (eps != (A)0) loss += st.a1 * logs - st.a0;
            rs = s;
            coef_t = (1 - eps) * wt;
            coef_p = coef_t + (eps != (A)0 ? st.a1 : (A)0) + zgrad;
        }
        scale_p = rs * coef_p * inv_s;
        if (writer) {
            Loss[row] = loss;
            if (Lse) Lse[row] = (float)lse;
        }
    }
    GL_HD A out(int c, A, A zc, A d) const {
        A p = ex(zc - m) * inv_s;
        A dz;
        if (PROB) {
            A wj = wc(c);
            dz = rs * (coef_p * p - wj * ((1 - eps) * d + eps_c));
            if (gtr) gtr[c] = IO<D>::st(-rs * (1 - eps) * wj * ((zc - m) - logs));
        } else {
            dz = coef_p * p - (c == tc ? coef_t : (A)0);
            if (eps != (A)0) dz -= eps_c * wc(c);
            dz *= rs;
        }
        if (cap > (A)0) {
            A u = zc * inv_cap;
            dz *= (1 - u * u);
        }
        return dz;
    }
};

// Cross-entropy phase 2 in the staged kernels (FAST): with class-index targets and no softcap,
// weight or smoothing (the common LLM case) the gradient is scale_p exp(z - m) but at the
// target, so the options' per-element branches and the target compare leave the loop: one
// compare per vector, and the target's element is redone as out() would.
template <int VEC, class D, class TI, bool PROB, bool FAST, class A>
GL_HD void outputs(const CrossEntropyOp<D, TI, PROB, FAST>& op, int c, const A (&x)[VEC], const A (&aux)[VEC],
                   A (&o)[VEC]) {
    if (!FAST || PROB || op.cap > (A)0 || op.W || op.eps != (A)0) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) o[k] = op.out(c + k, x[k], op.z(x[k]), PROB ? aux[k] : (A)0);
        return;
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) o[k] = op.scale_p * op.ex(x[k] - op.m);
    if ((unsigned)(op.tc - c) < (unsigned)VEC) {
#pragma unroll
        for (int k = 0; k < VEC; ++k)
            if (c + k == op.tc) o[k] = op.out(c + k, x[k], x[k], (A)0);
    }
}

// NLL on log-probabilities: loss = -w_t logp_t, dlogp_j = -s w_t [j == t].  Reads only the
// target element of each row (kReads = false) and writes the whole gradient row.
template <class D, class TI> struct NllOp {
    typedef typename D::acc A;
    typedef typename D::store S;
    static constexpr bool kLSE = false, kReads = false, kAux = false;
    bool has_phase2;
    void* O;
    const TI* Tgt;
    const A* W;
    const A* Div;
    A* Loss;
    i64 C, ignore_index, t;
    int tc;  // the target's column; -1 none (ignored), -2 invalid (the whole row is NaN)
    A xt, g;
    GL_HD A ex(A d) const { return gl_exp(d); }
    GL_HD A ex_sum(A d) const { return gl_exp(d); }
    GL_HD void begin_row(i64 row, const S* xr) {
        t = (i64)Tgt[row];
        xt = (t >= 0 && t < C) ? IO<D>::ld(xr[t]) : (A)0;
    }
    GL_HD const S* aux_row(i64) const { return (const S*)0; }
    static GL_HD RowState<A> identity() { return identity_state<A>(); }
    static GL_HD void combine(RowState<A>&, const RowState<A>&) {}
    GL_HD void rebase(RowState<A>&, A) const {}
    GL_HD A z(A x) const { return x; }
    GL_HD void acc(RowState<A>&, int, A, A, A) const {}
    GL_HD void finish(i64 row, const RowState<A>&, bool writer) {
        A s = Div ? (A)1 / *Div : (A)1;
        A loss;
        if (t == ignore_index) {
            loss = 0; g = 0; tc = -1;
        } else if (t < 0 || t >= C) {
            loss = gl_nan<A>(); g = gl_nan<A>(); tc = -2;
        } else {
            tc = (int)t;
            A wt = W ? W[t] : (A)1;
            loss = -wt * xt;
            g = -wt * s;
        }
        if (writer) Loss[row] = loss;
    }
    GL_HD A out(int c, A, A, A) const { return tc == -2 ? g : (c == tc ? g : (A)0); }
};

// Distillation KL from logits, per row: KL(d || q), q = softmax(x / T), z = x / T.
// Target logits y (TLOGITS), aux: d = softmax(y / T).  With y' = y / T, a second online
// (max, sum) over y' in (a0 = max y', a1 = sum exp(y' - a0)) and a2 = sum exp(y' - a0)(y' - z):
//   KL = a2 / a1 + (m - a0) + (log s - log a1),   dx_j = s (q_j - d_j) / T
// Target probabilities d (aux): a0 = sum d (z - m) (max-relative), a1 = sum d,
// a2 = sum xlogy(d, d):
//   KL = a2 - a0 + a1 log s,                      dx_j = s (a1 q_j - d_j) / T
// The maxima are subtracted before the logs are added throughout, as for cross-entropy.
template <class D, bool TLOGITS, bool FAST = false> struct KlLogitsOp {
    typedef typename D::acc A;
    typedef typename D::store S;
    static constexpr bool kLSE = true, kReads = true, kAux = true;
    bool has_phase2;
    void* O;
    const S* Y;
    i64 Y_row_stride;
    A* Loss;
    A inv_t, scale;
    A m, inv_s, ym, inv_ys, sum_d;
    GL_HD A ex(A d) const { return Exp<FAST>()(d); }
    GL_HD A ex_sum(A d) const { return ExpSum<FAST>()(d); }
    GL_HD void begin_row(i64, const S*) {}
    GL_HD const S* aux_row(i64 row) const { return Y + row * Y_row_stride; }
    static GL_HD RowState<A> identity() {
        RowState<A> r = identity_state<A>();
        if (TLOGITS) r.a0 = -gl_inf<A>();  // a0 is the running max of y / T
        return r;
    }
    // fold (max y' = b0, sum exp(y' - b0) = b1, its (y' - z)-weighted sum b2) into a
    static GL_HD void merge_y(RowState<A>& a, A b0, A b1, A b2) {
        A mn = gl_max(a.a0, b0);
        if (mn != -gl_inf<A>()) {
            A fa = ExpSum<FAST>()(a.a0 - mn), fb = ExpSum<FAST>()(b0 - mn);
            a.a1 = a.a1 * fa + b1 * fb;
            // a weight of 0 (a masked teacher class, y' = -inf) drops its term: -inf * 0 would be NaN
            a.a2 = (fa == (A)0 ? (A)0 : a.a2 * fa) + (fb == (A)0 ? (A)0 : b2 * fb);
        } else if (b0 != b0 || b1 != b1) {
            // only masked (-inf) teacher logits so far and a NaN one, which fmaxf dropped from
            // the max: the row's teacher distribution is NaN, as torch's softmax of it
            a.a1 = gl_nan<A>();
        }
        a.a0 = mn;
    }
    static GL_HD void combine(RowState<A>& a, const RowState<A>& b) {
        if (TLOGITS) {
            merge_ms(a.m, a.s, b.m, b.s, ExpSum<FAST>());
            merge_y(a, b.a0, b.a1, b.a2);
        } else {
            combine_rel(a, b, ExpSum<FAST>());
        }
    }
    GL_HD void rebase(RowState<A>& st, A mn) const {
        if (!TLOGITS) st.a0 = rebase_rel(st.a0, st.a1, st.m, mn);
    }
    GL_HD A z(A x) const { return gl_mul_rn(x, inv_t); }
    GL_HD void acc(RowState<A>& st, int, A, A zc, A y) const {
        if (TLOGITS) {
            A yp = gl_mul_rn(y, inv_t);
            merge_y(st, yp, (A)1, yp - zc);
        } else {
            if (y != (A)0) st.a0 += y * rel(zc, st.m);  // no probability, no term (z may be -inf)
            st.a1 += y;
            st.a2 += y == (A)0 ? (A)0 : y * gl_log(y);
        }
    }
    GL_HD void finish(i64 row, const RowState<A>& st, bool writer) {
        m = st.m;
        const A logs = gl_log(st.s);
        inv_s = (A)1 / st.s;
        A kl;
        if (TLOGITS) {
            ym = st.a0;
            inv_ys = (A)1 / st.a1;
            kl = st.a2 / st.a1 + (m - ym) + (logs - gl_log(st.a1));
            sum_d = 1;
        } else {
            kl = st.a2 - st.a0 + st.a1 * logs;
            sum_d = st.a1;
        }
        if (writer) Loss[row] = kl;
    }
    GL_HD A out(int, A, A zc, A y) const {
        A d = TLOGITS ? ex(gl_mul_rn(y, inv_t) - ym) * inv_ys : y;
        return scale * (sum_d * ex(zc - m) * inv_s - d) * inv_t;
    }
};
