/* mtpd's one-row products: MLX's CPU backend calls cblas_sgemm for every fp32 matmul, a one-row
 * input included (a decode step, a drafter call), and OpenBLAS runs those through its packed matrix
 * kernel at about half the speed of its matrix-vector one (daemon/cpu/gemv.py). Preloaded ahead of
 * the BLAS, this cblas_sgemm hands row-major products with one row of output to cblas_sgemv and
 * everything else to the BLAS's own cblas_sgemm. mtpd_gemv_enable(0) passes everything through. */
#define _GNU_SOURCE
#include <dlfcn.h>

typedef int blasint;
enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

typedef void (*sgemm_fn)(int, int, int, blasint, blasint, blasint, float, const float *, blasint,
                         const float *, blasint, float, float *, blasint);
typedef void (*sgemv_fn)(int, int, blasint, blasint, float, const float *, blasint, const float *,
                         blasint, float, float *, blasint);

static sgemm_fn next_sgemm;
static sgemv_fn next_sgemv;
static int enabled = 1;

void mtpd_gemv_enable(int on) { enabled = on; }

int mtpd_gemv_enabled(void) { return enabled; }

void cblas_sgemm(int order, int trans_a, int trans_b, blasint m, blasint n, blasint k, float alpha,
                 const float *a, blasint lda, const float *b, blasint ldb, float beta, float *c, blasint ldc) {
  if (!next_sgemm) {
    next_sgemv = (sgemv_fn)dlsym(RTLD_NEXT, "cblas_sgemv");
    next_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
  }
  if (enabled && next_sgemv && order == ROW_MAJOR && m == 1) {
    /* c[0, :] = alpha * op(a)[0, :] op(b) + beta * c[0, :] = alpha * op(b)^T x + beta * y, with x
     * the one row of op(a) (a column of a when it is transposed: stride lda) */
    blasint rows = trans_b == NO_TRANS ? k : n, cols = trans_b == NO_TRANS ? n : k;
    next_sgemv(ROW_MAJOR, trans_b == NO_TRANS ? TRANS : NO_TRANS, rows, cols, alpha, b, ldb, a,
               trans_a == NO_TRANS ? 1 : lda, beta, c, 1);
    return;
  }
  next_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
