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

/* A whole CPU training step of a LinearSVD layer touches its weights in two passes, these two, where separate
 * kernels took seven (keep mask, exp, KL, the mask's float copy and product, the sigma^2 product, and the two
 * sums autograd adds the KL's gradients with): on the 2-core machine each pass over the 500x784 layer costs
 * about as much as one of its matrix products once the caches are cold.
 *
 * vd_step, before the forward's products: sigma2 = exp(log_sigma2); unless dkl is NULL (a run whose loss has
 * no KL term) the KL value (returned, summed in chunk order as vd_kl: independent of the thread count) and
 * dkl = dKL/dlog alpha, zero where the clip or grad_below passes no gradient, not yet times any loss weight
 * (the weight reaches the backward as the KL output's gradient); under train_clip (masked != NULL) also the
 * kept weights (w where the clipped log alpha is below threshold, else 0) and that mask as 0/1 bytes. */
#define INLINE static inline __attribute__((always_inline)) /* with_* flags constant: one loop per call site */

/* [0, n) weight by weight; with_sigma2: also sigma2, else it is already written. Adds to *at_clip the number of
 * weights whose log alpha reaches the upper clip. */
INLINE double step_loop(const float *restrict w, const float *restrict log_sigma2, float *restrict sigma2,
                        float *restrict dkl, float *restrict masked, unsigned char *restrict keep, long n, float clip,
                        float grad_below, float threshold, const int with_kl, const int with_mask,
                        const int with_sigma2, long *at_clip) {
    double total = 0.0;
    int count = 0;
#pragma omp simd reduction(+ : total, count)
    for (long i = 0; i < n; i++) {
        if (with_sigma2) sigma2[i] = expf(log_sigma2[i]);
        float w2 = w[i] * w[i] + 1e-8f;
        float log_alpha = log_sigma2[i] - logf(w2);
        count += log_alpha >= clip;
        if (with_kl) {
            float unclipped = fabsf(log_alpha) < clip && log_alpha < grad_below ? 1.0f : 0.0f;
            float clipped = fminf(fmaxf(log_alpha, -clip), clip);
            float t = expf(-(K2 + K3 * clipped));
            float sig = 1.0f / (1.0f + t), sig_neg = t * sig;
            float exp_neg = expf(-clipped);
            total += 0.5f * logf(1.0f + exp_neg) + K1 * sig_neg;
            dkl[i] = (-K1 * K3 * sig * sig_neg - 0.5f * exp_neg / (1.0f + exp_neg)) * unclipped;
        }
        if (with_mask) {
            int k = fminf(fmaxf(log_alpha, -clip), clip) < threshold;
            keep[i] = (unsigned char)k;
            masked[i] = k ? w[i] : 0.0f;
        }
    }
    *at_clip += count;
    return total;
}

/* Once a layer is sparse most of its weights sit at the upper clip (the default run's trained 500x784 layer:
 * 88 % of them; 78 % of its 16-weight blocks entirely), where the KL is a constant, its derivative zero and the
 * weight pruned. step_blocks takes the weights SKIP_BLOCK at a time and a block whose weights are all there skips
 * the four transcendental functions of step_loop (the pass over that layer: 1.04 -> 0.72 ms on 2 cores); runs of
 * other blocks go to step_loop together. The test needs no logarithm: log_alpha >= clip <=> sigma2 >= e^clip w2,
 * taken with a relative margin of 1e-4 so that every weight it passes also has log_alpha >= clip as step_loop
 * computes it (rounding there is ~1e-6 of log alpha's terms); a weight within the margin takes step_loop. Same
 * values either way, up to the rounding of the sum. n: a multiple of SKIP_BLOCK; returns the blocks skipped in
 * *skipped. On a layer with few such blocks (a fresh student) the test is a cost (~20 %), so step_segments
 * picks one of the two loops per segment from what the previous segment held. */
#define SKIP_BLOCK 16
#define SEGMENT 1024 /* weights */

INLINE double step_blocks(const float *restrict w, const float *restrict log_sigma2, float *restrict sigma2,
                          float *restrict dkl, float *restrict masked, unsigned char *restrict keep, long n,
                          float clip, float grad_below, float threshold, const int with_kl, const int with_mask,
                          long *skipped) {
    const float past_clip = expf(clip) * 1.0001f;
    const float t = expf(-(K2 + K3 * clip)), sig_neg = t / (1.0f + t); /* one weight's KL at the clip */
    const double kl_at_clip = 0.5f * logf(1.0f + expf(-clip)) + K1 * sig_neg;
    const int kept_at_clip = clip < threshold;
    double total = 0.0;
    long run = 0, unused = 0; /* [run, i): blocks not skipped, for step_loop */
    for (long i = 0; i < n; i += SKIP_BLOCK) {
        int past = 1;
#pragma omp simd reduction(& : past)
        for (long j = i; j < i + SKIP_BLOCK; j++) {
            sigma2[j] = expf(log_sigma2[j]);
            past &= sigma2[j] >= past_clip * (w[j] * w[j] + 1e-8f);
        }
        if (!past) continue;
        if (run < i)
            total += step_loop(w + run, log_sigma2 + run, sigma2 + run, with_kl ? dkl + run : NULL,
                               with_mask ? masked + run : NULL, with_mask ? keep + run : NULL, i - run, clip,
                               grad_below, threshold, with_kl, with_mask, 0, &unused);
        run = i + SKIP_BLOCK;
        *skipped += 1;
        if (with_kl) {
            total += SKIP_BLOCK * kl_at_clip;
            for (long j = i; j < i + SKIP_BLOCK; j++) dkl[j] = 0.0f;
        }
        if (with_mask)
            for (long j = i; j < i + SKIP_BLOCK; j++) {
                keep[j] = (unsigned char)kept_at_clip;
                masked[j] = kept_at_clip ? w[j] : 0.0f;
            }
    }
    return total + step_loop(w + run, log_sigma2 + run, sigma2 + run, with_kl ? dkl + run : NULL,
                             with_mask ? masked + run : NULL, with_mask ? keep + run : NULL, n - run, clip,
                             grad_below, threshold, with_kl, with_mask, 0, &unused);
}

/* [0, n) in segments of SEGMENT weights: block by block (step_blocks) while the previous segment had at least a
 * quarter of its blocks skipped, or after one where step_loop found half its weights at the clip; else by
 * step_loop. The choice changes only the speed (the skip test is the break-even point's neighbourhood). */
INLINE double step_segments(const float *w, const float *log_sigma2, float *sigma2, float *dkl, float *masked,
                            unsigned char *keep, long n, float clip, float grad_below, float threshold,
                            const int with_kl, const int with_mask) {
    if (!with_kl && !with_mask) {
#pragma omp simd
        for (long i = 0; i < n; i++) sigma2[i] = expf(log_sigma2[i]);
        return 0.0;
    }
    double total = 0.0;
    int blockwise = 1;
    for (long start = 0; start < n; start += SEGMENT) {
        long count = n - start < SEGMENT ? n - start : SEGMENT, found = 0;
        if (blockwise && count == SEGMENT) {
            total += step_blocks(w + start, log_sigma2 + start, sigma2 + start, with_kl ? dkl + start : NULL,
                                 with_mask ? masked + start : NULL, with_mask ? keep + start : NULL, count, clip,
                                 grad_below, threshold, with_kl, with_mask, &found);
            blockwise = 4 * found * SKIP_BLOCK >= count;
        } else {
            total += step_loop(w + start, log_sigma2 + start, sigma2 + start, with_kl ? dkl + start : NULL,
                               with_mask ? masked + start : NULL, with_mask ? keep + start : NULL, count, clip,
                               grad_below, threshold, with_kl, with_mask, 1, &found);
            blockwise = 2 * found >= count;
        }
    }
    return total;
}

static double step_chunk(const float *w, const float *log_sigma2, float *sigma2, float *dkl, float *masked,
                         unsigned char *keep, long n, float clip, float grad_below, float threshold) {
    if (dkl && masked) return step_segments(w, log_sigma2, sigma2, dkl, masked, keep, n, clip, grad_below, threshold, 1, 1);
    if (dkl) return step_segments(w, log_sigma2, sigma2, dkl, NULL, NULL, n, clip, grad_below, threshold, 1, 0);
    if (masked) return step_segments(w, log_sigma2, sigma2, NULL, masked, keep, n, clip, grad_below, threshold, 0, 1);
    return step_segments(w, log_sigma2, sigma2, NULL, NULL, NULL, n, clip, grad_below, threshold, 0, 0);
}

double vd_step(const float *w, const float *log_sigma2, float *sigma2, float *dkl, float *masked,
               unsigned char *keep, long n, float clip, float grad_below, float threshold, int threads) {
    double partial[MAX_CHUNKS];
    long chunks = (n + CHUNK - 1) / CHUNK;
    if (chunks > MAX_CHUNKS) { /* as vd_kl: in runs of MAX_CHUNKS chunks, in order */
        double total = 0.0;
        for (long start = 0; start < n; start += CHUNK * MAX_CHUNKS) {
            long count = n - start < CHUNK * MAX_CHUNKS ? n - start : CHUNK * MAX_CHUNKS;
            total += vd_step(w + start, log_sigma2 + start, sigma2 + start, dkl ? dkl + start : NULL,
                             masked ? masked + start : NULL, masked ? keep + start : NULL, count, clip, grad_below,
                             threshold, threads);
        }
        return total;
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (chunks > 1)
    for (long c = 0; c < chunks; c++) {
        long start = c * CHUNK, count = n - start < CHUNK ? n - start : CHUNK;
        partial[c] = step_chunk(w + start, log_sigma2 + start, sigma2 + start, dkl ? dkl + start : NULL,
                                masked ? masked + start : NULL, masked ? keep + start : NULL, count, clip,
                                grad_below, threshold);
    }
    double total = 0.0;
    for (long c = 0; c < chunks; c++) total += partial[c];
    return total;
}

/* vd_step_grads, after the backward's products, in place: grad_log_sigma2 (in: the data term's
 * grad_var^T x^2) becomes that times sigma2 plus kl_scale * dkl; grad_w (in: grad^T x) gets
 * kl_scale * dkl * dlog alpha/dw = kl_scale * dkl * -2w / (w^2 + 1e-8) added, and under train_clip
 * (keep != NULL) is zero where the weight is pruned. Either gradient may be NULL (not wanted), and dkl
 * (no KL term: kl_scale is then ignored). */
static void grads_chunk(float *restrict grad_w, float *restrict grad_log_sigma2, const float *restrict w,
                        const float *restrict sigma2, const float *restrict dkl, const unsigned char *restrict keep,
                        long n, float kl_scale) {
    if (grad_log_sigma2 && dkl) {
#pragma omp simd
        for (long i = 0; i < n; i++) grad_log_sigma2[i] = grad_log_sigma2[i] * sigma2[i] + kl_scale * dkl[i];
    } else if (grad_log_sigma2) {
#pragma omp simd
        for (long i = 0; i < n; i++) grad_log_sigma2[i] *= sigma2[i];
    }
    if (!grad_w) return;
    if (dkl) {
#pragma omp simd
        for (long i = 0; i < n; i++) grad_w[i] += -2.0f * kl_scale * dkl[i] * w[i] / (w[i] * w[i] + 1e-8f);
    }
    if (keep) {
#pragma omp simd
        for (long i = 0; i < n; i++) grad_w[i] = keep[i] ? grad_w[i] : 0.0f;
    }
}

void vd_step_grads(float *grad_w, float *grad_log_sigma2, const float *w, const float *sigma2, const float *dkl,
                   const unsigned char *keep, long n, float kl_scale, int threads) {
    long chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static) num_threads(threads) if (chunks > 1)
    for (long c = 0; c < chunks; c++) {
        long start = c * CHUNK, count = n - start < CHUNK ? n - start : CHUNK;
        grads_chunk(grad_w ? grad_w + start : NULL, grad_log_sigma2 ? grad_log_sigma2 + start : NULL, w + start,
                    sigma2 + start, dkl ? dkl + start : NULL, keep ? keep + start : NULL, count, kl_scale);
    }
}

/* The mean's products over the kept weights only (train_clip). Within a few epochs training-time pruning
 * zeroes most of a large layer's mean weights (the default run's 500x784 layer keeps under 10 % from its
 * fifth epoch), yet the dense products x kept^T and grad^T x still cost as much as at the start. Here the
 * kept entries of each row are listed (`keep_index`), and the products run over them only, on transposed
 * (feature-major) batches so that each kept weight touches one contiguous run of `batch` floats. Rows are
 * split across the threads, and every output is summed in the same order whatever their number. */

/* The number of kept weights of each row (keep: nonzero bytes) into count[i]; returns their total. One vectorized
 * pass: a denser layer then uses the dense products without having listed anything. */
long keep_count(const unsigned char *keep, long rows, long cols, long *count, int threads) {
    long total = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : total) if (rows * cols > CHUNK)
    for (long i = 0; i < rows; i++) {
        const unsigned char *row = keep + i * cols;
        int n = 0; /* an int sum vectorizes four times wider than a long one */
#pragma omp simd reduction(+ : n)
        for (long j = 0; j < cols; j++) n += row[j] != 0;
        count[i] = n;
        total += n;
    }
    return total;
}

/* Row i's kept column indices into col_index[start[i] .. start[i + 1]) (start: keep_count's counts summed, with
 * start[0] = 0). Eight mask bytes at a time: a zero word is skipped, a nonzero one's nonzero bytes found by their
 * bits (keep holds 0 or 1, torch's bool). */
void keep_index(const unsigned char *keep, long rows, long cols, const long *start, int *col_index, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * cols > CHUNK)
    for (long i = 0; i < rows; i++) {
        const unsigned char *row = keep + i * cols;
        int *index = col_index + start[i];
        long n = 0, j = 0;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        for (; j + 8 <= cols; j += 8) {
            unsigned long long word;
            __builtin_memcpy(&word, row + j, 8);
            while (word) { /* byte k of the word is bits 8k..8k+7; each nonzero byte a single 1 bit */
                index[n++] = (int)(j + (__builtin_ctzll(word) >> 3));
                word &= word - 1;
            }
        }
#endif
        for (; j < cols; j++)
            if (row[j]) index[n++] = (int)j;
    }
}

/* out_t (rows x batch) = W_kept x_t (+ bias): out_t[i] = sum over the kept j of w[i, j] * x_t[j], four kept
 * weights at a time (one load and store of the partial sums for four products), in index order. */
void kept_matmul(const float *restrict x_t, const float *restrict w, const long *restrict start,
                 const int *restrict col_index, const float *restrict bias, float *restrict out_t, long rows,
                 long cols, long batch, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * batch > CHUNK)
    for (long i = 0; i < rows; i++) {
        float *restrict out = out_t + i * batch;
        const int *index = col_index + start[i];
        const float *row = w + i * cols;
        const float first = bias ? bias[i] : 0.0f;
        long k = 0, n = start[i + 1] - start[i];
#pragma omp simd
        for (long b = 0; b < batch; b++) out[b] = first;
        for (; k + 4 <= n; k += 4) {
            const float w0 = row[index[k]], w1 = row[index[k + 1]], w2 = row[index[k + 2]], w3 = row[index[k + 3]];
            const float *restrict x0 = x_t + (long)index[k] * batch, *restrict x1 = x_t + (long)index[k + 1] * batch;
            const float *restrict x2 = x_t + (long)index[k + 2] * batch, *restrict x3 = x_t + (long)index[k + 3] * batch;
#pragma omp simd
            for (long b = 0; b < batch; b++) out[b] += (w0 * x0[b] + w1 * x1[b]) + (w2 * x2[b] + w3 * x3[b]);
        }
        for (; k < n; k++) {
            const float weight = row[index[k]];
            const float *restrict x = x_t + (long)index[k] * batch;
#pragma omp simd
            for (long b = 0; b < batch; b++) out[b] += weight * x[b];
        }
    }
}

/* grad_w (rows x cols) = grad^T x at the kept entries, 0 elsewhere: grad_w[i, j] = <grad_t[i], x_t[j]>. */
void kept_grad(const float *restrict grad_t, const float *restrict x_t, const long *restrict start,
               const int *restrict col_index, float *restrict grad_w, long rows, long cols, long batch, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * cols > CHUNK)
    for (long i = 0; i < rows; i++) {
        float *restrict out = grad_w + i * cols;
        const int *index = col_index + start[i];
        const float *restrict g = grad_t + i * batch;
        __builtin_memset(out, 0, sizeof(float) * cols);
        long k = 0, n = start[i + 1] - start[i];
        for (; k + 4 <= n; k += 4) { /* four products per load of g */
            const float *restrict x0 = x_t + (long)index[k] * batch, *restrict x1 = x_t + (long)index[k + 1] * batch;
            const float *restrict x2 = x_t + (long)index[k + 2] * batch, *restrict x3 = x_t + (long)index[k + 3] * batch;
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (long b = 0; b < batch; b++) {
                s0 += g[b] * x0[b];
                s1 += g[b] * x1[b];
                s2 += g[b] * x2[b];
                s3 += g[b] * x3[b];
            }
            out[index[k]] = s0, out[index[k + 1]] = s1, out[index[k + 2]] = s2, out[index[k + 3]] = s3;
        }
        for (; k < n; k++) {
            const float *restrict x = x_t + (long)index[k] * batch;
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (long b = 0; b < batch; b++) sum += g[b] * x[b];
            out[index[k]] = sum;
        }
    }
}

/* dst (cols x rows) = src (rows x cols)^T: the kept products' feature-major batches. Eight source columns at a
 * time, 64 rows of them a block, so that the writes run along dst's rows; blocks of columns split across the
 * threads. torch's strided copy (.t().contiguous()) took ~100 us for a 100 x 784 batch, ~35 us this way. */
void transpose(const float *restrict src, float *restrict dst, long rows, long cols, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * cols > CHUNK)
    for (long j0 = 0; j0 < cols; j0 += 8) {
        long j1 = j0 + 8 < cols ? j0 + 8 : cols;
        for (long i0 = 0; i0 < rows; i0 += 64) {
            long i1 = i0 + 64 < rows ? i0 + 64 : rows;
            for (long j = j0; j < j1; j++)
                for (long i = i0; i < i1; i++) dst[j * rows + i] = src[i * cols + j];
        }
    }
}
