/* mtpd's few-row products (daemon/cpu/few_rows.py). MLX's CPU backend calls cblas_sgemm for every
 * fp32 matmul; preloaded ahead of the BLAS, this cblas_sgemm computes the products of up to
 * FEW_ROWS rows against a large row-major weight matrix (x @ W.T, a decode step's or a
 * verification's projections) itself: each row of W is read from memory once and multiplied into
 * up to GROUP rows of x at a time, on two threads. The BLAS's packed kernel reads the weights at
 * about half that speed for these shapes. Every other product goes to
 * the BLAS's own cblas_sgemm; so does everything after mtpd_few_rows_enable(0). Each output element
 * is one dot product summed in one fixed order, whatever the number of rows: a row's result does
 * not depend on the rows beside it. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <unistd.h>

#include "lanes.h"
#if defined(__x86_64__)
#define RELAX() __builtin_ia32_pause()
#else
#define RELAX() ((void)0)
#endif

typedef int blasint;
enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
enum { FEW_ROWS = 24, LARGE = 1 << 16, SPINS = 1 << 11 };

typedef void (*sgemm_fn)(int, int, int, blasint, blasint, blasint, float, const float *, blasint,
                         const float *, blasint, float, float *, blasint);

static sgemm_fn next_sgemm;
static int enabled = 1;

void mtpd_few_rows_enable(int on) { enabled = on; }

int mtpd_few_rows_enabled(void) { return enabled; }

/* GROUP input rows at a time: one weight row is read into a vector register once per LANES of it
 * and multiplied into each row's accumulator (fused multiply-adds where the CPU has them); every
 * output element is the same sequence of operations whatever the number of rows beside it */
enum { GROUP = 8 };

static inline __attribute__((always_inline)) void group(const int nx, int k, const float *x, long lda,
                                                        const float *wj, const float *ahead, float *c, long ldc,
                                                        float alpha, float beta) {
  lanes acc[GROUP];
  for (int r = 0; r < nx; r++) acc[r] = (lanes){0};
  int i = 0;
  for (; i + LANES <= k; i += LANES) {
    if (ahead) __builtin_prefetch(ahead + i, 0, 2);  /* the cache line of a later weight row, into L2 */
    lanes wv = load(wj + i);
    for (int r = 0; r < nx; r++) acc[r] += load(x + r * lda + i) * wv;
  }
  for (int r = 0; r < nx; r++) {
    float s = total(acc[r]);
    for (int t = i; t < k; t++) s += x[r * lda + t] * wj[t];
    float *out = c + r * ldc;
    *out = beta == 0.f ? alpha * s : alpha * s + beta * *out;
  }
}

/* the weight rows a few rows on, fetched into L2 while this one is multiplied: without it the
 * memory's stream and the multiply-adds took turns, and 2-12 rows cost up to twice one row's time */
enum { AHEAD = 12 };
/* weight rows that one group of input rows meets before the next group does, so each group stays in
 * L1 (its rows at most X_BYTES) and the block of weight rows in L2 */
enum { BLOCK = 16, X_BYTES = 24 << 10 };

#if defined(__x86_64__)
__attribute__((target_clones("avx512f", "arch=haswell", "default")))
#endif
static void rows(int m, int k, const float *x, int lda, const float *w, int ldb, float *c, int ldc,
                 int j0, int j1, float alpha, float beta) {
  const int size = (long)k * GROUP * (long)sizeof(float) > X_BYTES ? GROUP / 2 : GROUP;
  for (int jb = j0; jb < j1; jb += BLOCK) {
    const int je = jb + BLOCK < j1 ? jb + BLOCK : j1;
    for (int r = 0; r < m; r += size) {
      const float *xr = x + (long)r * lda;
      const int nx = m - r < size ? m - r : size;
      for (int j = jb; j < je; j++) {
        const float *wj = w + (long)j * ldb;
        /* one row is read at the memory's speed by itself; the first group fetches ahead */
        const float *ahead = r == 0 && m > 1 && j + AHEAD < j1 ? w + (long)(j + AHEAD) * ldb : 0;
        float *out = c + (long)r * ldc + j;
        switch (nx) {  /* a constant count keeps the accumulators in registers */
          case 1: group(1, k, xr, lda, wj, ahead, out, ldc, alpha, beta); break;
          case 2: group(2, k, xr, lda, wj, ahead, out, ldc, alpha, beta); break;
          case 3: group(3, k, xr, lda, wj, ahead, out, ldc, alpha, beta); break;
          case 4: group(4, k, xr, lda, wj, ahead, out, ldc, alpha, beta); break;
          case 5: group(5, k, xr, lda, wj, ahead, out, ldc, alpha, beta); break;
          case 6: group(6, k, xr, lda, wj, ahead, out, ldc, alpha, beta); break;
          case 7: group(7, k, xr, lda, wj, ahead, out, ldc, alpha, beta); break;
          default: group(8, k, xr, lda, wj, ahead, out, ldc, alpha, beta);
        }
      }
    }
  }
}

/* one helper thread takes the second half of each product's output columns */
static struct {
  int m, k, lda, ldb, ldc, j0, j1;
  const float *x, *w;
  float *c, alpha, beta;
} job;
static atomic_int posted, finished;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t busy = PTHREAD_MUTEX_INITIALIZER;  /* one product at a time uses the helper */
static pid_t helper_pid;  /* the process whose helper runs: a forked child starts its own */

static void *helper(void *from) {
  for (int seen = (int)(intptr_t)from;;) {  /* the tickets posted before it started are not its */
    for (int spins = 0; atomic_load_explicit(&posted, memory_order_acquire) == seen;) {
      if (++spins < SPINS) {  /* a forward's next product comes within microseconds */
        RELAX();
        continue;
      }
      pthread_mutex_lock(&lock);
      while (atomic_load(&posted) == seen) pthread_cond_wait(&wake, &lock);
      pthread_mutex_unlock(&lock);
    }
    seen = atomic_load(&posted);
    rows(job.m, job.k, job.x, job.lda, job.w, job.ldb, job.c, job.ldc, job.j0, job.j1, job.alpha, job.beta);
    atomic_store_explicit(&finished, seen, memory_order_release);
  }
  return 0;
}

/* a fork waits for the product in flight; the child gets fresh locks and condition variable, as
 * the parent's helper may be waiting on `wake` there (a waiter the child does not have, which a
 * signal could go to) */
static void before_fork(void) {
  pthread_mutex_lock(&busy);
  pthread_mutex_lock(&lock);
}

static void parent_after_fork(void) {
  pthread_mutex_unlock(&lock);
  pthread_mutex_unlock(&busy);
}

static void child_after_fork(void) {
  pthread_mutex_init(&lock, 0);
  pthread_cond_init(&wake, 0);
  pthread_mutex_init(&busy, 0);
}

static int helper_ready(void) {  /* called holding `busy` */
  if (helper_pid == getpid()) return 1;
  pthread_t thread;
  if (pthread_create(&thread, 0, helper, (void *)(intptr_t)atomic_load(&posted)) != 0) return 0;
  pthread_detach(thread);
  if (helper_pid == 0) pthread_atfork(before_fork, parent_after_fork, child_after_fork);
  helper_pid = getpid();
  return 1;
}

static void few(int m, int n, int k, float alpha, const float *x, int lda, const float *w, int ldb,
                float beta, float *c, int ldc) {
  if (pthread_mutex_trylock(&busy) != 0) {  /* another thread has the helper: this one works alone */
    rows(m, k, x, lda, w, ldb, c, ldc, 0, n, alpha, beta);
    return;
  }
  if (!helper_ready()) {
    pthread_mutex_unlock(&busy);
    rows(m, k, x, lda, w, ldb, c, ldc, 0, n, alpha, beta);
    return;
  }
  int half = n / 2;
  job.m = m, job.k = k, job.x = x, job.lda = lda, job.w = w, job.ldb = ldb, job.c = c, job.ldc = ldc;
  job.j0 = half, job.j1 = n, job.alpha = alpha, job.beta = beta;
  pthread_mutex_lock(&lock);
  int ticket = atomic_load(&posted) + 1;
  atomic_store_explicit(&posted, ticket, memory_order_release);
  pthread_cond_signal(&wake);
  pthread_mutex_unlock(&lock);
  rows(m, k, x, lda, w, ldb, c, ldc, 0, half, alpha, beta);
  while (atomic_load_explicit(&finished, memory_order_acquire) != ticket) RELAX();
  pthread_mutex_unlock(&busy);
}

void cblas_sgemm(int order, int trans_a, int trans_b, blasint m, blasint n, blasint k, float alpha,
                 const float *a, blasint lda, const float *b, blasint ldb, float beta, float *c, blasint ldc) {
  if (enabled && order == ROW_MAJOR && trans_a == NO_TRANS && trans_b == TRANS && m >= 1 && m <= FEW_ROWS
      && (long)n * k >= LARGE) {
    few(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  if (!next_sgemm) next_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
  next_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
