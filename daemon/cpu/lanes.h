/* 16 floats as one vector (GCC vector extensions), for daemon/cpu's kernels: AVX-512 registers where
 * the CPU has them, pairs of AVX2 or quads of SSE registers elsewhere. */
#ifndef MTPD_LANES_H
#define MTPD_LANES_H
#include <string.h>

typedef float lanes __attribute__((vector_size(64)));
enum { LANES = 16 };

static inline __attribute__((always_inline)) lanes load(const float *p) {
  lanes v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline __attribute__((always_inline)) void store(float *p, lanes v) { memcpy(p, &v, sizeof v); }

/* the sum of the 16 lanes, always in this order */
static inline __attribute__((always_inline)) float total(lanes v) {
  typedef float half __attribute__((vector_size(32)));
  typedef float quarter __attribute__((vector_size(16)));
  half h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
           + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  quarter q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}
#endif
