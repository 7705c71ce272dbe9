/* Sparse VD KL of one layer and its gradient, fused into one pass over the weights (CPU, float32).
 *
 * Per weight: log_alpha = clip(log_sigma2 - log(w^2 + 1e-8), -clip, clip) and
 *   KL = -(K1 * sigmoid(K2 + K3 * log_alpha) - 0.5 * log1p(exp(-log_alpha)) - K1)   (Molchanov et al. 2017)
 * computed as K1 * sigmoid(-z) + 0.5 * log1p(exp(-log_alpha)), z = K2 + K3 * log_alpha, with sigmoid(z) and
 * sigmoid(-z) both from t = exp(-z): 1 - sigmoid(z) in float32 cancels near the upper clip (z ~ 13.8, where
 * it is ~1e-6 and rounds by ~5 %), which put up to 6e-4 relative error into the weights' gradient there.
 * Weights with log_alpha >= grad_below (before the clip) get no gradient: the training-time pruning of
 * `distill.train_clip` (pass +INFINITY for none).
 * Returns the summed KL over weights [0, n) and, unless grad_w is NULL, writes scale * dKL/dw and
 * scale * dKL/dlog_sigma2: the loss weight of the term is applied here, not in a second pass over the
 * gradients. With grad_w NULL (a term weighted 0, e.g. the first warm-up epoch) only the value is computed.
 * Layers over CHUNK weights are split into chunks computed on `threads` OpenMP threads (the caller passes
 * torch.get_num_threads()): built with -fopenmp and loaded into a process that has imported torch, this binds
 * to torch's own libgomp when torch's is named libgomp.so.1 (as in the CPU wheels), and so runs on its thread
 * team, whose workers are still spinning from the previous op - Python threads, or a second OpenMP runtime
 * where torch ships a renamed one, compete with them for the cores instead (still correct, slower). The
 * loop is compute-bound (glibc's vector expf/logf, ~2.7 ns a weight on one core), so two cores halve it. Built without OpenMP the pragma is ignored and the
 * same chunks run in order. The PyTorch path in variational.py is the reference; tests check that both
 * agree. Built at first use by varstudent/nn/kernels.py. */
#include <math.h>
#include <stddef.h>

#define K1 0.63576f
#define K2 1.87320f
#define K3 1.48695f

static double kl_chunk(const float *restrict w, const float *restrict log_sigma2, float *restrict grad_w,
                       float *restrict grad_log_sigma2, long n, float clip, float grad_below, float scale) {
    double total = 0.0;
    if (grad_w == NULL) {
#pragma omp simd reduction(+ : total)
        for (long i = 0; i < n; i++) {
            float log_alpha = log_sigma2[i] - logf(w[i] * w[i] + 1e-8f);
            log_alpha = fminf(fmaxf(log_alpha, -clip), clip);
            float t = expf(-(K2 + K3 * log_alpha));
            total += 0.5f * logf(1.0f + expf(-log_alpha)) + K1 * t / (1.0f + t);
        }
        return total;
    }
#pragma omp simd reduction(+ : total)
    for (long i = 0; i < n; i++) {
        float w2 = w[i] * w[i] + 1e-8f;
        float log_alpha = log_sigma2[i] - logf(w2);
        /* the clip passes no gradient, nor does a weight pruned in training */
        float unclipped = fabsf(log_alpha) < clip && log_alpha < grad_below ? scale : 0.0f;
        log_alpha = fminf(fmaxf(log_alpha, -clip), clip);
        float t = expf(-(K2 + K3 * log_alpha));
        float sig = 1.0f / (1.0f + t), sig_neg = t * sig; /* sigmoid(z), sigmoid(-z) */
        float exp_neg = expf(-log_alpha);
        total += 0.5f * logf(1.0f + exp_neg) + K1 * sig_neg;
        float d = (-K1 * K3 * sig * sig_neg - 0.5f * exp_neg / (1.0f + exp_neg)) * unclipped;
        grad_log_sigma2[i] = d;
        grad_w[i] = -2.0f * d * w[i] / w2;
    }
    return total;
}

#define CHUNK 65536L /* weights per chunk; layers of several chunks are split across OpenMP threads */
#define MAX_CHUNKS 4096L

double vd_kl(const float *w, const float *log_sigma2, float *grad_w, float *grad_log_sigma2, long n,
             float clip, float grad_below, float scale, int threads) {
    /* Per-chunk sums added in chunk order: the value does not depend on the number of threads. */
    double partial[MAX_CHUNKS];
    long chunks = (n + CHUNK - 1) / CHUNK;
    if (chunks > MAX_CHUNKS) { /* over 268M weights in one layer: in runs of MAX_CHUNKS chunks, in order */
        double total = 0.0;
        for (long start = 0; start < n; start += CHUNK * MAX_CHUNKS) {
            long count = n - start < CHUNK * MAX_CHUNKS ? n - start : CHUNK * MAX_CHUNKS;
            total += vd_kl(w + start, log_sigma2 + start, grad_w ? grad_w + start : NULL,
                           grad_w ? grad_log_sigma2 + start : NULL, count, clip, grad_below, scale, threads);
        }
        return total;
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (chunks > 1)
    for (long c = 0; c < chunks; c++) {
        long start = c * CHUNK, count = n - start < CHUNK ? n - start : CHUNK;
        partial[c] = kl_chunk(w + start, log_sigma2 + start, grad_w ? grad_w + start : NULL,
                              grad_w ? grad_log_sigma2 + start : NULL, count, clip, grad_below, scale);
    }
    double total = 0.0;
    for (long c = 0; c < chunks; c++) total += partial[c];
    return total;
}

/* distill.train_clip, the mean's weight of a training step: masked[i] = w[i] where log alpha (clipped as above)
 * is below threshold, else 0, and keep[i] = 1 or 0 - one pass, where PyTorch's keep mask took eight (log alpha,
 * the comparison, the product and its backward; +34 % on a CPU epoch of the MNIST MLP). */
static void keep_chunk(const float *restrict w, const float *restrict log_sigma2, float *restrict masked,
                       unsigned char *restrict keep, long n, float clip, float threshold) {
#pragma omp simd
    for (long i = 0; i < n; i++) {
        float log_alpha = log_sigma2[i] - logf(w[i] * w[i] + 1e-8f);
        log_alpha = fminf(fmaxf(log_alpha, -clip), clip);
        int k = log_alpha < threshold;
        keep[i] = (unsigned char)k;
        masked[i] = k ? w[i] : 0.0f;
    }
}

void keep_weights(const float *w, const float *log_sigma2, float *masked, unsigned char *keep, long n, float clip,
                  float threshold, int threads) {
    long chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static) num_threads(threads) if (chunks > 1)
    for (long c = 0; c < chunks; c++) {
        long start = c * CHUNK, count = n - start < CHUNK ? n - start : CHUNK;
        keep_chunk(w + start, log_sigma2 + start, masked + start, keep + start, count, clip, threshold);
    }
}
