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

#include "lanes.h"

typedef int ilanes __attribute__((vector_size(64)));

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

#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)

/* 16 vectors to the 16 sums of their lanes, in one vector: acc[i] lands in lane BITREV[i] */
static inline __attribute__((always_inline)) lanes sums16(const lanes *acc) {
  lanes one[8], two[4], three[2];
  for (int i = 0; i < 8; i++)
    one[i] = SHUFFLE(acc[2 * i], acc[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + SHUFFLE(acc[2 * i], acc[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; i++)
    two[i] = SHUFFLE(one[2 * i], one[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27)
             + SHUFFLE(one[2 * i], one[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int i = 0; i < 2; i++)
    three[i] = SHUFFLE(two[2 * i], two[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29)
               + SHUFFLE(two[2 * i], two[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  return SHUFFLE(three[0], three[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30)
         + SHUFFLE(three[0], three[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

static const int BITREV[LANES] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

/* the scores of one query row against keys t .. t + 15 (rows of `k`, D = 16 x blocks floats each) */
static inline __attribute__((always_inline)) lanes scores16(const float *qr, const float *k, const int blocks) {
  const int D = blocks * LANES;
  lanes acc[LANES];
  for (int i = 0; i < LANES; i++) {
    const float *kt = k + (long)BITREV[i] * D;
    acc[i] = load(qr) * load(kt);
    for (int b = 1; b < blocks; b++)
      acc[i] += load(qr + b * LANES) * load(kt + b * LANES);
  }
  return sums16(acc);
}

/* one sequence's rows against one KV head: R query heads x L rows. The scores are computed 16
 * keys at a time, past the last key a row sees (within the cache's buffer, or from a zeroed copy
 * of the last keys where the buffer ends first), and only those it sees are used */
static inline __attribute__((always_inline)) void head_group(const float *q, float *out, int H, const int blocks, int R,
                                                             int g, int start, int L, int keys, int cap,
                                                             const float *k, const float *v, float scale,
                                                             float *scores, float *tail) {
  const int D = blocks * LANES;
  const int whole = cap / LANES * LANES;  /* keys in whole blocks of the buffer */
  const int spare = keys - whole;          /* keys past them: from a padded copy */
  if (spare > 0) {
    memset(tail, 0, (size_t)LANES * D * sizeof(float));
    memcpy(tail, k + (long)whole * D, (size_t)spare * D * sizeof(float));
  }
  for (int r = 0; r < R; r++) {
    for (int j = 0; j < L; j++) {
      const float *qr = q + ((long)(start + j) * H + (long)g * R + r) * D;
      const int seen = keys - L + j + 1;
      lanes tops = (lanes){0} - __builtin_inff();
      for (int t = 0; t < seen; t += LANES) {
        lanes s = scores16(qr, t < whole ? k + (long)t * D : tail, blocks) * scale;
        store(scores + t, s);
        if (t + LANES > seen) {  /* keys it does not see take no part in the maximum */
          for (int i = seen - t; i < LANES; i++)
            s[i] = -__builtin_inff();
        }
        const ilanes higher = tops > s;
        tops = floats_of((bits_of(tops) & higher) | (bits_of(s) & ~higher));
      }
      float top = tops[0];
      for (int i = 1; i < LANES; i++)
        top = tops[i] > top ? tops[i] : top;
      lanes sums = {0};
      for (int t = 0; t < seen; t += LANES) {
        lanes e = exp_lanes(load(scores + t) - top);
        if (t + LANES > seen) {
          for (int i = seen - t; i < LANES; i++)
            e[i] = 0;
        }
        store(scores + t, e);
        sums += e;
      }
      const float sum = total(sums);
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

/* q, out [N, H, D], each score q.k times `scale`; for sequence s: its rows start[s] .. start[s] + rows[s], its cache's buffers
 * k[s], v[s] [G, cap[s], D] with keys[s] filled. D 16, 32, 64 or 128. Returns 0, or -1
 * when D does not fit (nothing written) or no memory. */
__attribute__((target_clones("avx512f", "arch=haswell", "default")))
int mtpd_ragged_attention(const float *q, float *out, float scale, int H, int G, int D, int sequences, const int *start,
                          const int *rows, const int *keys, const int *cap, const float *const *k,
                          const float *const *v) {
  if ((D != LANES && D != 2 * LANES && D != 4 * LANES && D != 8 * LANES) || H % G != 0)
    return -1;
  int most = 0;
  for (int s = 0; s < sequences; s++)
    most = keys[s] > most ? keys[s] : most;
  float *scores = malloc(((size_t)most + 2 * LANES + (size_t)LANES * D) * sizeof(float));
  if (scores == NULL)
    return -1;
  float *tail = scores + most + 2 * LANES;
  const int R = H / G;
  for (int s = 0; s < sequences; s++)
    for (int g = 0; g < G; g++) {
      const float *ks = k[s] + (long)g * cap[s] * D, *vs = v[s] + (long)g * cap[s] * D;
      switch (D / LANES) {  /* a constant count of vectors per row: the accumulators stay in registers */
      case 1: head_group(q, out, H, 1, R, g, start[s], rows[s], keys[s], cap[s], ks, vs, scale, scores, tail); break;
      case 2: head_group(q, out, H, 2, R, g, start[s], rows[s], keys[s], cap[s], ks, vs, scale, scores, tail); break;
      case 4: head_group(q, out, H, 4, R, g, start[s], rows[s], keys[s], cap[s], ks, vs, scale, scores, tail); break;
      default: head_group(q, out, H, 8, R, g, start[s], rows[s], keys[s], cap[s], ks, vs, scale, scores, tail);
      }
    }
  free(scores);
  return 0;
}
