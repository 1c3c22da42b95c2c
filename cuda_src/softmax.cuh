// Online softmax over key tiles, in registers.
//
// Scores arrive in log2 units (the softmax scale and 1/ln 2 already folded in), so each
// probability is one exp2. A thread holds two accumulator rows (g and g + 8); the four
// threads of a quad share a row, so row reductions are two xor-shuffles.
//
// Fully masked rows: while a row has seen only -inf, its running max is -inf and the
// exponent is taken against 0 instead (exp2(-inf - 0) = 0), never -inf - (-inf) = NaN.
//
// Non-finite scores (from NaN or inf in q or k) are not masks: a NaN score makes the
// running max NaN (max_nan), and a +inf score gives exp2(inf - inf) = NaN, so the row's
// output and LSE are NaN, as in softmax(QKᵀ)V evaluated directly. Only masking (index
// rules, boolean masks) removes a key.
#pragma once
#include "common.cuh"

template <int NT>
struct OnlineSoftmax {
    float row_max[2];
    float row_sum[2];  // per-thread partial sums; reduced across the quad in finish()

    CF_DEVICE OnlineSoftmax() {
        row_max[0] = row_max[1] = -CF_INF;
        row_sum[0] = row_sum[1] = 0.f;
    }

    // s: scores of one key tile (log2 units) -> unnormalised probabilities exp2(s - max).
    // The output accumulator is rescaled for the new running max.
    template <int DT>
    CF_DEVICE void step(float (&s)[NT][4], float (&o)[DT][4]) {
        float alpha[2];
        update(s, alpha);
        rescale(o, alpha);
    }

    // Output rows times alpha (the factor `update` returned for the new running max).
    template <int DT>
    CF_DEVICE static void rescale(float (&o)[DT][4], const float (&alpha)[2]) {
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            o[dt][0] *= alpha[0];
            o[dt][1] *= alpha[0];
            o[dt][2] *= alpha[1];
            o[dt][3] *= alpha[1];
        }
    }

    // `step` without touching the output: the caller rescales it by alpha later (when a
    // product still in flight accumulates into it under the old max).
    CF_DEVICE void update(float (&s)[NT][4], float (&alpha)[2]) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = row_max[r];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) mx = max_nan(mx, max_nan(s[nt][2 * r], s[nt][2 * r + 1]));
            mx = warp_max_quad(mx);
            const float m_ref = mx == -CF_INF ? 0.f : mx;
            alpha[r] = fast_exp2(row_max[r] - m_ref);
            row_max[r] = mx;
            row_sum[r] *= alpha[r];
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                s[nt][2 * r] = fast_exp2(s[nt][2 * r] - m_ref);
                s[nt][2 * r + 1] = fast_exp2(s[nt][2 * r + 1] - m_ref);
                sum += s[nt][2 * r] + s[nt][2 * r + 1];
            }
            row_sum[r] += sum;
        }
    }

    // Completes the row sums; returns 1/sum per row (0 for rows with no allowed key)
    // and the natural-log LSE (-inf for those rows).
    CF_DEVICE void finish(float (&inv_sum)[2], float (&lse)[2]) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float sum = warp_sum_quad(row_sum[r]);
            const bool empty = row_max[r] == -CF_INF || sum == 0.f;
            inv_sum[r] = empty ? 0.f : 1.f / sum;
            lse[r] = empty ? -CF_INF : (row_max[r] + log2f(sum)) * CF_LN2;
        }
    }
};
