// Host harness for the element-wise losses' per-element math: kernels/cuda/elementwise.cuh's
// ew_element, compiled here by g++ unchanged and run in float32 (the GPU kernels' accumulation
// type for fp32, bf16 and fp16 storage).  What differs from the GPU: FMA contraction and the
// last bits of expf / logf / log1pf.
//
// Protocol (tests/test_cuda_host_harness.py): stdin holds int64 op, n; then float32 x[n], t[n],
// w[n], pw[n]; stdout gets float32 l[n], gx[n], gt[n] (before the reduction's scale).
// op: 0 MSE, 1 KL (probability target), 2 KL (log target), 3 BCE with logits, 4 BCE.
#include <math.h>
#include <stdint.h>
#include <stdio.h>

#include <vector>

#include "elementwise.cuh"

template <int OP>
static void run(int64_t n, const float* x, const float* t, const float* w, const float* pw, float* l, float* gx,
                float* gt) {
    for (int64_t i = 0; i < n; ++i) ew_element<OP>(x[i], t[i], w[i], pw[i], l[i], gx[i], gt[i]);
}

int main() {
    int64_t hdr[2];
    if (fread(hdr, sizeof(int64_t), 2, stdin) != 2) return 2;
    const int64_t op = hdr[0], n = hdr[1];
    std::vector<float> in(4 * n), out(3 * n);
    if (fread(in.data(), sizeof(float), 4 * n, stdin) != (size_t)(4 * n)) return 2;
    const float *x = in.data(), *t = x + n, *w = t + n, *pw = w + n;
    float *l = out.data(), *gx = l + n, *gt = gx + n;
    switch (op) {
        case 0: run<0>(n, x, t, w, pw, l, gx, gt); break;
        case 1: run<1>(n, x, t, w, pw, l, gx, gt); break;
        case 2: run<2>(n, x, t, w, pw, l, gx, gt); break;
        case 3: run<3>(n, x, t, w, pw, l, gx, gt); break;
        case 4: run<4>(n, x, t, w, pw, l, gx, gt); break;
        default: return 3;
    }
    fwrite(out.data(), sizeof(float), 3 * n, stdout);
    return 0;
}
