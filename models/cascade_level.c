/* One level of dlib's shape-predictor cascade on a chunk of same-size images, in the arithmetic of
 * models/shape_predictor.py (its numpy path is the reference; models/cascade_kernel.py builds and checks this).
 *
 * Compiled with -ffp-contract=off and without -ffast-math: every float operation rounds as the numpy path's does
 * (float32 similarity terms, float64 pixel coordinates, float32 leaf sums in tree order), so the points are the
 * same bit for bit on any IEEE machine. On x86-64 Linux the function is also cloned for AVX2: the clone does the
 * same element-wise operations, only more at a time (-DFIQA_NO_CLONES builds the baseline code alone).
 */
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && !defined(FIQA_NO_CLONES)
#define FIQA_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FIQA_CLONES
#endif

static double clip(double v, double lo, double hi) { return v < lo ? lo : (v > hi ? hi : v); }

FIQA_CLONES
int fiqa_cascade_level(
    int64_t n, int64_t h, int64_t w,
    const uint8_t *padded,             /* (n, h + 2, w + 2) intensities with a one-pixel zero border */
    const double *box,                 /* (n, 4) left, top, right, bottom */
    const float *a, const float *b,    /* (n,) this level's similarity from the mean shape (float32) */
    int64_t features,                  /* F */
    const int64_t *anchor,             /* (F,) landmark of each feature pixel */
    const float *delta,                /* (F, 2) offsets in mean-shape coordinates */
    int64_t trees, int64_t splits,     /* T complete trees of S splits */
    const int64_t *split_a, const int64_t *split_b, /* (T * S,) feature pixels of each split, tree-major */
    const int16_t *thresholds,         /* (T * S,) whole-number split thresholds */
    const float *leaves,               /* (T * (S + 1), D) leaf vectors, tree-major */
    int64_t dims,                      /* D = 2 * points */
    float *shape,                      /* (n, D) current shapes in the normalised box: read, then updated */
    uint8_t *values)                   /* (n, F) scratch: the feature pixels */
{
    const int64_t row = w + 2, plane = (h + 2) * (w + 2);
    for (int64_t i = 0; i < n; i++) {
        const double left = box[4 * i], top = box[4 * i + 1];
        const double width = box[4 * i + 2] - left, height = box[4 * i + 3] - top;
        const float ai = a[i], bi = b[i];
        const float *s = shape + i * dims;
        const uint8_t *origin = padded + i * plane + row + 1; /* pixel (0, 0) */
        uint8_t *val = values + i * features;
        for (int64_t f = 0; f < features; f++) {
            const float dx = delta[2 * f], dy = delta[2 * f + 1];
            const float ax = ai * dx, by = bi * dy, bx = bi * dx, ay = ai * dy;
            float u = ax - by;
            u = u + s[2 * anchor[f]];
            float v = bx + ay;
            v = v + s[2 * anchor[f] + 1];
            double x = width * (double)u;
            x += left;
            x += 0.5;
            x = clip(floor(x), -1.0, (double)w);
            double y = height * (double)v;
            y += top;
            y += 0.5;
            y = clip(floor(y), -1.0, (double)h);
            val[f] = origin[(int64_t)y * row + (int64_t)x];
        }
    }
    /* Tree by tree, every image adds its leaf: each shape receives its leaves in tree order (dlib's rounding),
     * and a tree's leaves stay in cache while all images read them. */
    for (int64_t t = 0; t < trees; t++) {
        const int64_t *sa = split_a + t * splits, *sb = split_b + t * splits;
        const int16_t *th = thresholds + t * splits;
        const float *tree_leaves = leaves + t * (splits + 1) * dims;
        for (int64_t i = 0; i < n; i++) {
            const uint8_t *val = values + i * features;
            int64_t node = 0;
            while (node < splits) { /* left child 2k + 1 where value[a] - value[b] > threshold */
                const int diff = (int)val[sa[node]] - (int)val[sb[node]];
                node = 2 * node + 2 - (diff > th[node]);
            }
            const float *leaf = tree_leaves + (node - splits) * dims;
            float *s = shape + i * dims;
            for (int64_t d = 0; d < dims; d++)
                s[d] += leaf[d];
        }
    }
    return 0;
}
