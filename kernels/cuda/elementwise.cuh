// The element-wise losses' per-element math (formulas in elementwise.cu's header), one function
// for the GPU kernel (gpuloss_elementwise) and the host harness (tests/host/elementwise_harness.cpp),
// which runs it on the CPU against torch in float64.
#pragma once
#include "common.cuh"

// loss l and the gradients gx (input) and gt (target) of one element, before the reduction's
// scale; w and pw are the weight and pos_weight (1 where the op has none).
template <int OP, class A>
GL_HD void ew_element(A x, A t, A w, A pw, A& l, A& gx, A& gt) {
    if (OP == 0) {
        A d = x - t;
        l = d * d;
        gx = 2 * d;
        gt = -gx;
    } else if (OP == 1) {
        l = (t == (A)0 ? (A)0 : t * gl_log(t)) - t * x;
        gx = -t;
        gt = t == (A)0 ? gl_nan<A>() : gl_log(t) + 1 - x;  // torch: xlogy's derivative at 0 is NaN
    } else if (OP == 2) {
        A et = gl_exp(t);
        l = et * (t - x);
        gx = -et;
        gt = et * (t - x + 1);
    } else if (OP == 3) {
        // per sign of x, each form free of cancellation where its value is small (elementwise.cu)
        const A lw = 1 + (pw - 1) * t;
        const A e = gl_exp(-gl_abs(x));  // in (0, 1]: no overflow
        const A l1 = gl_log1p(e);
        const A q = e / (1 + e);  // sigmoid(-|x|)
        const bool pos = x >= (A)0;
        // x = -inf: NaN, as torch's -inf + inf (the x < 0 form would give the limit, +inf)
        l = w * (pos ? (1 - t) * x + lw * l1 : x == -gl_inf<A>() ? gl_nan<A>() : lw * l1 - pw * t * x);
        gx = w * (pos ? (1 - t) - lw * q : lw * q - pw * t);
        gt = w * ((pw - 1) * l1 - (pos ? x : pw * x));
    } else {
        const A lpu = gl_log(x), l1pu = gl_log1p(-x);
        const A lp = lpu != lpu ? lpu : gl_max(lpu, (A)-100);
        const A l1p = l1pu != l1pu ? l1pu : gl_max(l1pu, (A)-100);
        l = -w * (t * lp + (1 - t) * l1p);
        gx = w * (x - t) / gl_max(x * (1 - x), (A)1e-12f);
        gt = w * (l1pu - lpu);
    }
}
