/* qk_cpu: quantized matmul kernels for the CPU in plain C (qkernels issue 18).
 *
 * The canonical problem of DESIGN.md section 3, out[m, n] = rescale(sum_k x[m, k] * w[n, k]), with
 * every operand in the canonical layout of qkernels/formats.py:
 *
 *   x      (M, K) row-major, contiguous; f32 / bf16 / f16 (QK_F32 / QK_BF16 / QK_F16), or for the
 *          *_matmul_* entry points codes already quantized per row (int8 or e4m3 bytes, (M, KP))
 *   w      (N, KS) row-major codes: int8 (KS = KP), int4 or uint4 packed two per byte (KS = KP / 2,
 *          byte j holds k = 2j in the low nibble, k = 2j + 1 in the high nibble), float8_e4m3fn
 *   w_scale f32 (N,) per output channel, or (N, KP / group_size) per group along K
 *   w_zero int8 (N, KP / group_size), uint4 only (the zero point, 0..15); NULL otherwise
 *   bias   f32 (N,) or NULL
 *   out    (M, N) row-major written once as f32 / bf16 / f16, rounded to nearest even
 *
 * KP is the padded K (formats.OperandFormat.padded_k: a multiple of the group size, even when packed);
 * activations hold the logical K <= KP columns and are zero-padded here.
 *
 * Return values: >= 0 success (the quantizing entry points return the number of activation rows with
 * a NaN/Inf, whose output rows are written as NaN: the caller raises the error it raises today), < 0 an
 * argument error (QK_EINVAL: a kind, dtype or size the kernels do not take; QK_ENOMEM: scratch).
 * `threads` (>= 1) splits the output channels N over that many threads: the caller and threads-1 helpers,
 * run on the calling thread's scheduler (qk_set_thread_scheduler) or else on the library's own pool of
 * persistent threads (made on first need; a forked child starts with none).
 * Sizes are int64; every pointer is a raw pointer to contiguous memory; no allocation is returned.
 */
#ifndef QK_CPU_H
#define QK_CPU_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define QK_ABI_VERSION 2

/* float dtypes (activations, outputs) */
#define QK_F32 0
#define QK_BF16 1
#define QK_F16 2

/* weight code kinds */
#define QK_INT8 0
#define QK_INT4 1       /* two's complement nibbles */
#define QK_UINT4 2      /* unsigned nibbles with a zero point per group */
#define QK_FP8_E4M3 3   /* float8_e4m3fn */

#define QK_EINVAL (-1)
#define QK_ENOMEM (-2)

int32_t qk_abi_version(void);

/* Where the calling thread's later calls run their helpers: schedule(ctx, work, arg) must run work(arg) once,
 * on any thread, now or later (XLA's intra-op pool, for example); a call never waits for a helper that has
 * not started, so a scheduler whose threads are all busy only costs parallelism. NULL: the library's pool. */
typedef void (*qk_work_fn)(void *arg);
typedef void (*qk_schedule_fn)(void *ctx, qk_work_fn work, void *arg);
void qk_set_thread_scheduler(qk_schedule_fn schedule, void *ctx);

/* Quantize activations per row as qkernels.numerics does: subnormals flushed to 0, then
 *   dynamic (static_scale == NULL): scale = amax / QMAX (IEEE division), scale < FLT_MIN -> 1;
 *   static: scale = *static_scale for every row;
 *   codes = QK_INT8: clamp(rint(x / scale), -127, 127); QK_FP8_E4M3: e4m3(clamp(x / scale, -448, 448)) (RNE,
 *   subnormal codes kept); columns k..kp-1 get code 0.
 * codes (M, KP) int8 / e4m3 bytes, scales (M,) f32. Returns the number of rows holding a NaN/Inf (their
 * codes are 0 and their scale NaN). */
int64_t qk_quantize_rows(const void *x, int32_t x_dtype, int64_t m, int64_t k, int64_t kp, int32_t code_kind,
                         const float *static_scale, void *codes, float *scales);

/* Integer accumulation (W8A8: w_kind QK_INT8, group_size 0; W4A8: QK_INT4, group_size 32..256):
 * exact int32 dots of the int8 activation codes (M, KP) against the weight codes, rescaled in order
 *   per row:   y = (f32(acc) * w_scale[n]) * x_scale[m] + bias[n]
 *   per group: y = 0; for g in order: y = y + f32(acc_g) * w_scale[n, g]; y = y * x_scale[m] + bias[n]
 * with no fused multiply-add, then one cast: bit-identical to qkernels.reference. */
int32_t qk_matmul_int(const int8_t *xq, const float *x_scale, int64_t m, int64_t kp, const void *w,
                      int32_t w_kind, int64_t n, const float *w_scale, int64_t group_size, const float *bias,
                      void *out, int32_t out_dtype, int32_t threads);

/* Float codes (FP8: e4m3 x e4m3 weights per row): exact products, f32 sum, W8A8's rescale order. */
int32_t qk_matmul_fp8(const uint8_t *xq, const float *x_scale, int64_t m, int64_t kp, const uint8_t *w,
                      int64_t n, const float *w_scale, const float *bias, void *out, int32_t out_dtype,
                      int32_t threads);

/* The two above with the activations quantized here first (qk_quantize_rows), code_kind implied by the
 * weight kind (int8 for QK_INT8 / QK_INT4, e4m3 for QK_FP8_E4M3). Returns the non-finite row count. */
int64_t qk_linear_quantized(const void *x, int32_t x_dtype, int64_t m, int64_t k, int64_t kp,
                            const float *static_scale, const void *w, int32_t w_kind, int64_t n,
                            const float *w_scale, int64_t group_size, const float *bias, void *out,
                            int32_t out_dtype, int32_t threads);

/* Weight-only (W8A16: QK_INT8 per row; W4A16: QK_INT4 / QK_UINT4 per group; FP8A16: QK_FP8_E4M3 per row):
 * y = x @ dequant(w)^T + bias accumulated in f32, dequant(w) = (f32(q) - zero) * scale, per group summed in
 * order (sum_g scale[n, g] * sum_{k in g} x[k] * (q[k] - zero[n, g])). Accurate, not bit-exact. */
int32_t qk_linear_float(const void *x, int32_t x_dtype, int64_t m, int64_t k, int64_t kp, const void *w,
                        int32_t w_kind, int64_t n, const float *w_scale, const int8_t *w_zero, int64_t group_size,
                        const float *bias, void *out, int32_t out_dtype, int32_t threads);

/* One of the two float-activation entry points above with everything but the activations fixed, for calls
 * repeated on the same weight (a layer's forward): one call with five arguments, where a foreign-function
 * call's cost grows with the count (ctypes: ~2.4 us for the fifteen above, ~1 us for these). */
#define QK_CALL_LINEAR_FLOAT 0      /* qk_linear_float */
#define QK_CALL_LINEAR_QUANTIZED 1  /* qk_linear_quantized, dynamic activations (static_scale NULL) */
typedef struct {
    int32_t entry, x_dtype, w_kind, out_dtype;
    int64_t k, kp, n, group_size;
    const void *w;
    const float *w_scale;
    const int8_t *w_zero;  /* qk_linear_float only */
    const float *bias;
} qk_linear_call;
/* The entry point's return value (the quantizing one: the non-finite row count). */
int64_t qk_run_linear(const qk_linear_call *call, const void *x, int64_t m, void *out, int32_t threads);

#ifdef __cplusplus
}
#endif

#endif /* QK_CPU_H */
