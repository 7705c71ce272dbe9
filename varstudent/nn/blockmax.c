/* The Block Sparse Regularizer's l1/l_inf term of one student layer, and what its gradient needs (CPU, float32).
 *
 * Row r of the row-major (rows, cols) matrix w is block r, laid out by losses._blocks_first. Per block: the
 * entry of largest |w| - ties resolve as NumPy's argmax / argmin did before this kernel (the first largest
 * entry, unless the first smallest is larger in magnitude: a positive entry wins a tie with a negative one) -
 * and, against the teacher's constant block maximum t[r]:
 *   the term  max(t[r], |w_at|)  (summed over blocks in order, in double: independent of the thread count;
 *   the teacher's blocks past the student's add t[r], the student's side being zero padding there),
 *   coef[r] = sign(w_at) * (1 if |w_at| > t[r], 1/2 on a tie, else 0): torch.maximum's gradient share,
 *   indices[d * rows + r] = the entry's coordinate d in the layer's own (ndim-dimensional) shape,
 * so that the backward is only coef * upstream gradient, placed at `indices` as a sparse tensor.
 * Two vectorized passes per row - max and min, then the first column holding the winner as a min-reduction
 * over candidate columns (an early-exit scan does not vectorize and cost 3x more) - rows split across
 * `threads` OpenMP threads (see vdkl.c for why torch's own OpenMP runtime). The caller (kernels.bsr_linf)
 * checks cols >= 1, at least `rows` teacher blocks and dim 0 or 1. A NaN row's winner is some entry of that
 * row (the index stays in range); its term is unspecified under -ffast-math, where the cross-entropy of a
 * network with NaN weights is NaN anyway. */
#include <limits.h>
#include <math.h>

static long first_match(const float *row, long cols, float wanted) {
    long first = cols - 1; /* where nothing matches (a NaN row): still an entry of this row */
    if (cols <= INT_MAX) { /* 32-bit column numbers: twice the lanes of 64-bit ones */
        int first32 = (int)cols - 1;
#pragma omp simd reduction(min : first32)
        for (int c = 0; c < (int)cols; c++) {
            int candidate = row[c] == wanted ? c : (int)cols - 1;
            first32 = candidate < first32 ? candidate : first32;
        }
        first = first32;
    } else {
        for (long c = 0; c < cols; c++)
            if (row[c] == wanted) { first = c; break; }
    }
    return first;
}

double bsr_linf(const float *w, long rows, long cols, const float *teacher_max, long teacher_blocks, long ndim,
                const long *shape, long dim, long *indices, float *coef, float *student_max, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * cols > 65536)
    for (long r = 0; r < rows; r++) {
        const float *row = w + r * cols;
        float high = row[0], low = row[0];
#pragma omp simd reduction(max : high) reduction(min : low)
        for (long c = 1; c < cols; c++) {
            high = fmaxf(high, row[c]);
            low = fminf(low, row[c]);
        }
        float wanted = -low > high ? low : high;
        long rest = first_match(row, cols, wanted);
        for (long d = ndim - 1; d >= 0; d--) { /* unravel the column over the dims other than `dim` */
            if (d == dim) {
                indices[d * rows + r] = r;
            } else {
                indices[d * rows + r] = rest % shape[d];
                rest /= shape[d];
            }
        }
        float magnitude = fabsf(wanted);
        float share = magnitude > teacher_max[r] ? 1.0f : magnitude == teacher_max[r] ? 0.5f : 0.0f;
        coef[r] = wanted < 0 ? -share : share;
        student_max[r] = magnitude;
    }
    double total = 0.0;
    for (long r = 0; r < rows; r++)
        total += fmaxf(teacher_max[r], student_max[r]);
    for (long r = rows; r < teacher_blocks; r++) /* teacher blocks beyond the student's: its zero padding */
        total += teacher_max[r];
    return total;
}
