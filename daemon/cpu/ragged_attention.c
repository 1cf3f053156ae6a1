/* The attention of a batch's forward (daemon/cpu/ragged_attention.py): every sequence's query rows
 * against its own KV cache, all sequences in one call. MLX runs a sequence's attention as ~8 ops,
 * each a graph node, a dispatch and a task on its scheduler; for a few query rows against a few
 * hundred keys those costs are most of the time. Here each (sequence, KV head) reads its keys and
 * values once for the query heads that share them, in one pass over the rows of the cache.
 *
 * Layouts: q and out [N, H, D] (the step's rows laid end to end); a sequence's keys and values
 * [G, cap, D] (an mlx-lm KVCache's buffer, batch 1), `keys` of them filled; row j of a sequence's L
 * rows sees keys up to keys - L + j. Every query row is computed alone, in the same order of
 * operations whatever rows or sequences sit beside it. */
#include <stdlib.h>
#include <string.h>

typedef float lanes __attribute__((vector_size(64)));
typedef int ilanes __attribute__((vector_size(64)));
enum { LANES = 16 };

static inline __attribute__((always_inline)) lanes load(const float *p) {
  lanes v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline __attribute__((always_inline)) void store(float *p, lanes v) { memcpy(p, &v, sizeof v); }

static inline __attribute__((always_inline)) float total(lanes v) {
  typedef float half __attribute__((vector_size(32)));
  typedef float quarter __attribute__((vector_size(16)));
  half h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
           + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  quarter q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

static inline __attribute__((always_inline)) ilanes bits_of(lanes x) {
  ilanes b;
  memcpy(&b, &x, sizeof b);
  return b;
}

static inline __attribute__((always_inline)) lanes floats_of(ilanes b) {
  lanes x;
  memcpy(&x, &b, sizeof x);
  return x;
}

/* exp(x) for x <= 0 (scores less their maximum), 16 at a time: 2^n * 2^f with n = round(x log2 e)
 * and 2^f = e^(f ln 2) by its degree-6 Taylor polynomial on |f| <= 0.5 (relative error ~1e-7);
 * 0 below -87, where a float's exponent ends */
static inline __attribute__((always_inline)) lanes exp_lanes(lanes x) {
  const ilanes small = x < -87.0f;
  x = floats_of((bits_of(x) & ~small) | (bits_of((lanes){0} - 87.0f) & small));
  const lanes y = x * 1.44269504088896341f;
  const ilanes sign = bits_of(y) & (int)0x80000000;
  const ilanes n = __builtin_convertvector(y + floats_of(bits_of((lanes){0} + 0.5f) | sign), ilanes);
  const lanes f = (y - __builtin_convertvector(n, lanes)) * 0.693147180559945309f;
  lanes p = (lanes){0} + 1.0f / 720;
  p = p * f + 1.0f / 120;
  p = p * f + 1.0f / 24;
  p = p * f + 1.0f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  return floats_of(bits_of(p * floats_of((n + 127) << 23)) & ~small);
}

/* one sequence's rows against one KV head: R query heads x L rows */
static inline __attribute__((always_inline)) void head_group(const float *q, float *out, int H, int D, int R, int g, int start, int L, int keys,
                       const float *k, const float *v, float *scores) {
  const int blocks = D / LANES;
  for (int r = 0; r < R; r++) {
    for (int j = 0; j < L; j++) {
      const float *qr = q + ((long)(start + j) * H + (long)g * R + r) * D;
      const int seen = keys - L + j + 1;
      float top = -__builtin_inff();
      for (int t = 0; t < seen; t++) {
        const float *kt = k + (long)t * D;
        lanes acc = load(qr) * load(kt);
        for (int b = 1; b < blocks; b++)
          acc += load(qr + b * LANES) * load(kt + b * LANES);
        const float s = total(acc);
        scores[t] = s;
        top = s > top ? s : top;
      }
      lanes sums = {0};
      int t = 0;
      for (; t + LANES <= seen; t += LANES) {
        lanes e = exp_lanes(load(scores + t) - top);
        store(scores + t, e);
        sums += e;
      }
      float sum = total(sums);
      if (t < seen) {
        float rest[LANES] = {0};
        memcpy(rest, scores + t, (size_t)(seen - t) * sizeof(float));
        lanes e = exp_lanes(load(rest) - top);
        store(rest, e);
        for (int i = 0; i < seen - t; i++) {
          scores[t + i] = rest[i];
          sum += rest[i];
        }
      }
      lanes o[8] = {{0}};
      for (int u = 0; u < seen; u++) {
        const float p = scores[u];
        const float *vu = v + (long)u * D;
        for (int b = 0; b < blocks; b++)
          o[b] += p * load(vu + b * LANES);
      }
      float *orow = out + ((long)(start + j) * H + (long)g * R + r) * D;
      for (int b = 0; b < blocks; b++)
        store(orow + b * LANES, o[b] / sum);
    }
  }
}

/* q, out [N, H, D]; for sequence s: its rows start[s] .. start[s] + rows[s], its cache's buffers
 * k[s], v[s] [G, cap[s], D] with keys[s] filled. D a multiple of 16, at most 128. Returns 0, or -1
 * when D does not fit (nothing written) or no memory. */
__attribute__((target_clones("avx512f", "arch=haswell", "default")))
int mtpd_ragged_attention(const float *q, float *out, int H, int G, int D, int sequences, const int *start,
                          const int *rows, const int *keys, const int *cap, const float *const *k,
                          const float *const *v) {
  if (D % LANES != 0 || D > 8 * LANES || H % G != 0)
    return -1;
  int most = 0;
  for (int s = 0; s < sequences; s++)
    most = keys[s] > most ? keys[s] : most;
  float *scores = malloc(((size_t)most + LANES) * sizeof(float));
  if (scores == NULL)
    return -1;
  const int R = H / G;
  for (int s = 0; s < sequences; s++)
    for (int g = 0; g < G; g++)
      head_group(q, out, H, D, R, g, start[s], rows[s], keys[s], k[s] + (long)g * cap[s] * D,
                 v[s] + (long)g * cap[s] * D, scores);
  free(scores);
  return 0;
}
