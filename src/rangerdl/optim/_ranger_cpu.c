/* Ranger's step for contiguous float32 CPU tensors in one pass over memory.
 *
 * Per row of a tensor (a "row" is everything behind index 0: the dimensions gradient
 * centralisation averages over), the kernel sums the gradient row while it streams into cache,
 * then updates the row: centralised gradient, decoupled weight decay, exp_avg (lerp, ATen's
 * formula), exp_avg_sq, the parameter, and on a Lookahead step the slow weights, whose value the
 * parameter then takes. Each value of g, p, m, v is read once and p, m, v written once (28 bytes
 * per value, as torch's fused AdamW), plus the slow buffer on the k-th step.
 *
 * Rows are independent and every row is computed by one thread in a fixed order, so the result
 * does not depend on the number of threads.
 *
 * Built at run time by rangerdl/optim/_cpu_kernel.py with the system C compiler, loaded through
 * ctypes. The formulas are those of ranger.py's single-tensor reference step.
 */
#include <math.h>
#include <stdint.h>

typedef struct {
    float sign;    /* -1 to maximize */
    float decay;   /* 1 - lr * weight_decay */
    float w1;      /* 1 - beta1, the lerp weight of exp_avg */
    float beta2;
    float w2;      /* 1 - beta2 */
    float eps;
    float neg_ss;  /* minus the step size */
    float alpha;   /* Lookahead lerp weight */
} ranger_scalars;

static inline __attribute__((always_inline)) float lerp(float a, float b, float w) {
    /* ATen's lerp: exact at both ends. */
    float d = b - a;
    return (w < 0.5f) ? a + w * d : b - d * (1.0f - w);
}

/* Eight floats at any float-aligned address, read through a float pointer. */
typedef float vec8 __attribute__((vector_size(32), aligned(4), may_alias));

/* Sum of g[0..n) with four independent 8-wide partial sums, added in a fixed order: a single
 * accumulator would wait on each add's latency (rows of a few hundred values are
 * latency-bound). */
static inline __attribute__((always_inline)) float row_sum(const float *restrict g, int64_t n) {
    vec8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
        a0 += *(const vec8 *)(g + j);
        a1 += *(const vec8 *)(g + j + 8);
        a2 += *(const vec8 *)(g + j + 16);
        a3 += *(const vec8 *)(g + j + 24);
    }
    vec8 a = (a0 + a1) + (a2 + a3);
    float acc = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
    for (; j < n; j++) acc += g[j];
    return acc;
}

static inline __attribute__((always_inline)) void row_update(
    float *restrict p, const float *restrict g, float *restrict m, float *restrict v,
    float *restrict s, int64_t n, int center, const ranger_scalars *c, int rect, int sync,
    int decay) {
    float mu = 0.0f;
    if (center) {
        mu = c->sign * row_sum(g, n) / (float)n;
    }
    const float sign = c->sign, dec = c->decay, w1 = c->w1, b2 = c->beta2, w2 = c->w2;
    const float eps = c->eps, neg_ss = c->neg_ss, alpha = c->alpha;
#pragma omp simd
    for (int64_t j = 0; j < n; j++) {
        float gj = sign * g[j] - mu;
        float pj = decay ? p[j] * dec : p[j];
        float mj = lerp(m[j], gj, w1);
        float vj = v[j] * b2 + w2 * gj * gj;
        m[j] = mj;
        v[j] = vj;
        pj = rect ? pj + neg_ss * mj / (sqrtf(vj) + eps) : pj + neg_ss * mj;
        if (sync) {
            pj = lerp(s[j], pj, alpha);
            s[j] = pj;
        }
        p[j] = pj;
    }
}

/* One parallel region for all tensors; no barrier between tensors. The flags are compile-time
 * constants in each expansion, so every variant of the row loop is vectorised on its own.
 * Tensor t has numel[t] values in rows of cols[t] (the last row may be shorter: uncentred tensors
 * only); center[t] subtracts each row's gradient mean. s is read only on a Lookahead step. */
#define RANGER_LOOP(RECT, SYNC, DECAY)                                                         \
    _Pragma("omp parallel num_threads(num_threads)") for (int64_t t = 0; t < num; t++) {      \
        const int64_t cols = ncols[t], numel = nnumel[t];                                      \
        const int64_t rows = cols ? (numel + cols - 1) / cols : 0;                             \
        _Pragma("omp for schedule(static) nowait") for (int64_t r = 0; r < rows; r++) {        \
            int64_t o = r * cols;                                                              \
            int64_t n = numel - o < cols ? numel - o : cols;                                   \
            row_update(p[t] + o, g[t] + o, m[t] + o, v[t] + o, (SYNC) ? s[t] + o : 0, n,       \
                       center[t], c, (RECT), (SYNC), (DECAY));                                 \
        }                                                                                      \
    }

/* The tensors come as parallel arrays (pointers, sizes, flags): the caller builds each with one
 * call instead of one record per tensor. */
void ranger_step(float *const *p, const float *const *g, float *const *m, float *const *v,
                 float *const *s, const int64_t *nnumel, const int64_t *ncols,
                 const uint8_t *center, int64_t num, int num_threads, const ranger_scalars *c,
                 int rect, int sync, int decay) {
    switch ((rect ? 4 : 0) | (sync ? 2 : 0) | (decay ? 1 : 0)) {
        case 0: RANGER_LOOP(0, 0, 0) break;
        case 1: RANGER_LOOP(0, 0, 1) break;
        case 2: RANGER_LOOP(0, 1, 0) break;
        case 3: RANGER_LOOP(0, 1, 1) break;
        case 4: RANGER_LOOP(1, 0, 0) break;
        case 5: RANGER_LOOP(1, 0, 1) break;
        case 6: RANGER_LOOP(1, 1, 0) break;
        default: RANGER_LOOP(1, 1, 1) break;
    }
}
