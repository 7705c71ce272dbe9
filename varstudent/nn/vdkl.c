/* Sparse VD KL of one layer and its gradient, fused into one pass over the weights (CPU, float32).
 *
 * Per weight: log_alpha = clip(log_sigma2 - log(w^2 + 1e-8), -clip, clip) and
 *   KL = -(K1 * sigmoid(K2 + K3 * log_alpha) - 0.5 * log1p(exp(-log_alpha)) - K1)   (Molchanov et al. 2017)
 * Writes dKL/dw and dKL/dlog_sigma2 and returns the summed KL. The PyTorch path in variational.py is the
 * reference; tests check that both agree. Built at first use by varstudent/nn/kernels.py. */
#include <math.h>

#define K1 0.63576f
#define K2 1.87320f
#define K3 1.48695f

double vd_kl(const float *restrict w, const float *restrict log_sigma2, float *restrict grad_w,
             float *restrict grad_log_sigma2, long n, float clip) {
    double total = 0.0;
#pragma omp simd reduction(+ : total)
    for (long i = 0; i < n; i++) {
        float w2 = w[i] * w[i] + 1e-8f;
        float log_alpha = log_sigma2[i] - logf(w2);
        float unclipped = fabsf(log_alpha) < clip ? 1.0f : 0.0f; /* the clip passes no gradient */
        log_alpha = fminf(fmaxf(log_alpha, -clip), clip);
        float sig = 1.0f / (1.0f + expf(-(K2 + K3 * log_alpha)));
        float exp_neg = expf(-log_alpha);
        total += 0.5f * logf(1.0f + exp_neg) - K1 * sig + K1;
        float d = (-K1 * K3 * sig * (1.0f - sig) - 0.5f * exp_neg / (1.0f + exp_neg)) * unclipped;
        grad_log_sigma2[i] = d;
        grad_w[i] = -2.0f * d * w[i] / w2;
    }
    return total;
}
