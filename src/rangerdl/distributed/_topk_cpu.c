/* The positions of the k largest of each row of non-negative int32 keys (the bits of float
 * magnitudes, which order as the magnitudes do, NaN above inf): top-k compression's selection
 * (rangerdl/distributed/compression.py, _largest) on CPU tensors.
 *
 * Per row of n keys, no sort and few branches:
 *   1. the maxima of G = 32 strided groups (group j: positions j, j + G, ...), one vector pass;
 *   2. t = the smallest of the maxima that fewer than k maxima exceed. At least k keys are >= t
 *      (the maxima of rank < k), and each of the k largest is >= t (a key below t is below k
 *      maxima), so the k largest are the k largest of the candidates >= t, which lie in the
 *      groups whose maximum is >= t;
 *   3. the candidates, as (key << 32 | position): distinct, so the k largest are well defined
 *      (of equal keys the higher position wins), ranked by comparison (a few dozen), or by
 *      quickselect when there are many (ties at t, e.g. a chunk of zeros).
 * Rows are independent; each is computed by one thread, so the result does not depend on the
 * number of threads.
 *
 * Built at run time by rangerdl/_native.py with the system C compiler, loaded through ctypes.
 */
#include <stdint.h>
#include <stdlib.h>

#define G 32

static void row_largest(const int32_t *restrict row, int64_t n, int64_t k,
                        int64_t *restrict out, int64_t *restrict cand) {
    int32_t mx[G];
    for (int j = 0; j < G; j++) mx[j] = -1;
    int64_t i = 0;
    for (; i + G <= n; i += G)
        for (int j = 0; j < G; j++) mx[j] = row[i + j] > mx[j] ? row[i + j] : mx[j];
    for (int64_t j = 0; i + j < n; j++) mx[j] = row[i + j] > mx[j] ? row[i + j] : mx[j];
    int32_t t = INT32_MAX;
    for (int a = 0; a < G; a++) {
        int32_t v = mx[a];
        int rank = 0;
        for (int b = 0; b < G; b++) rank += mx[b] > v;
        t = (rank < k && v < t) ? v : t;
    }
    int64_t m = 0;
    for (int j = 0; j < G; j++) {
        if (mx[j] < t) continue;
        for (int64_t p = j; p < n; p += G) {
            cand[m] = ((int64_t)row[p] << 32) | p;
            m += row[p] >= t;
        }
    }
    if (m == k) {
        for (int64_t c = 0; c < k; c++) out[c] = cand[c] & 0xffffffff;
    } else if (m <= 4 * k) { /* rank by comparison: the k largest, largest first */
        for (int64_t c = 0; c < m; c++) {
            int64_t v = cand[c], rank = 0;
            for (int64_t d = 0; d < m; d++) rank += cand[d] > v;
            if (rank < k) out[rank] = v & 0xffffffff;
        }
    } else { /* quickselect: the k largest to the front */
        int64_t lo = 0, hi = m - 1;
        while (lo < hi) {
            int64_t pivot = cand[lo + (hi - lo) / 2], a = lo, b = hi;
            while (a <= b) {
                while (cand[a] > pivot) a++;
                while (cand[b] < pivot) b--;
                if (a <= b) {
                    int64_t v = cand[a];
                    cand[a++] = cand[b];
                    cand[b--] = v;
                }
            }
            if (k - 1 <= b)
                hi = b;
            else if (k - 1 >= a)
                lo = a;
            else
                break;
        }
        for (int64_t c = 0; c < k; c++) out[c] = cand[c] & 0xffffffff;
    }
}

/* keys: (rows, n) int32 >= 0, contiguous; out: (rows, k) int64; 1 <= k <= min(n, G).
 * Returns 0, or -1 when a thread's scratch could not be allocated (out is then incomplete). */
int topk_rows(const int32_t *keys, int64_t rows, int64_t n, int64_t k, int64_t *out,
              int num_threads) {
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        int64_t *cand = malloc(sizeof(int64_t) * (size_t)n);
        failed |= cand == NULL;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++)
            if (cand != NULL) row_largest(keys + r * n, n, k, out + r * k, cand);
        free(cand);
    }
    return failed ? -1 : 0;
}
