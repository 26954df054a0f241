/* qk_cpu: quantized matmul kernels for the CPU (the ABI and the operand layouts: qk_cpu.h).
 *
 * Built by qkernels/kernels/cpu/build.py with `-O3 -march=native -ffp-contract=off -fPIC -shared` and
 * never -ffast-math: the integer recipes' rescale must round every multiply and add on its own (no FMA
 * contraction) and `x / scale` must be an IEEE division, so that outputs equal qkernels.reference bit for
 * bit. Float accumulations use explicit fused multiply-adds (QK_FMA) where they are only required to be
 * accurate.
 *
 * Inner loops: with AVX-512 (F, BW, VNNI) the integer dots run `vpdpbusd` (u8 x s8 -> s32 in groups of four)
 * and the float ones 16-lane FMAs; elsewhere portable C written as 16 independent lanes (gcc vectorizes
 * it for the target's width; no reassociation needed). Both give the same integer accumulators.
 *
 * `vpdpbusd` multiplies an unsigned byte by a signed one, so the weight codes are offset to unsigned and
 * the offset removed with the activation sums (one per row, per group for int4), exactly in int32:
 *   int8:  sum_k (w + 128) * x - 128 * sum_k x      (w + 128 = w ^ 0x80, in 1..255)
 *   int4:  sum_k (w + 8) * x - 8 * sum_k x          (w + 8 = nibble ^ 8, in 1..15)
 * The raw sum may wrap past 2**31 (K * 255 * 127): it is computed modulo 2**32 (the instruction wraps; C
 * does it in uint32) and the difference, the true accumulator, is below 2**31 by the recipe's K bound.
 *
 * Loop order (QK_RANGE): output channels n split over threads; activation rows tiled by QK_ROW_TILE (a tile's
 * rows stay in L2 while the weight streams once per tile); within a tile, blocks of 4 rows x 4 weight rows (or
 * 1 x 4 for a GEMV: four independent accumulator chains) share every load; K innermost. Float accumulations
 * with more than 4 rows decode the weight into f32 panels per K tile (QK_KC) first (float_range); up to 4 rows
 * decode in registers (gemv_columns).
 *
 * Measured (one thread, this 2-core AMD EPYC Zen 4 shared with other jobs, so +-2x; f32 activations,
 * K = N = 4096, ctypes on NumPy arrays), milliseconds at M = 1 / 16 / 256: w8a8 0.29-0.38 / 1.9 / 35,
 * w4a8-g128 0.32-0.37 / 6.2 / 88, w8a16 0.56-1.3 / 8.8 / 99, w4a16-g128 0.60-0.76 / 6.2 / 84, fp8 1.0-1.5 /
 * 9.1 / 105, fp8a16 0.8-1.2 / 8.2 / 88 (lax.dot_general f32 with both cores: ~1.5-3.4 / 6 / 40).
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime under -std=c11 */
#include "qk_cpu.h"

#include <float.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define QK_AVX512 1
#include <immintrin.h>
#else
#define QK_AVX512 0
#endif
#if QK_AVX512 && defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#define QK_BF16DOT 1  /* gemv_bf16_columns */
#else
#define QK_BF16DOT 0
#endif

#if defined(__FMA__) || defined(__aarch64__)
#define QK_FMA(a, b, c) fmaf((a), (b), (c))
#else
#define QK_FMA(a, b, c) ((a) * (b) + (c)) /* two roundings: accurate enough for the float recipes */
#endif

#define QK_LANES 16             /* portable loops: independent partial sums per row */
#define QK_MIN_N_PER_THREAD 64  /* below this many output channels a thread costs more than it saves */

int32_t qk_abi_version(void) { return QK_ABI_VERSION; }

/* --- scalar conversions (round to nearest even, as torch and jax cast) ------------------------------- */

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline float bf16_to_f32(uint16_t h) { return u2f((uint32_t)h << 16); }

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays a (quiet) NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return u2f(sign | 0x7f800000u | (m << 13));            /* inf, NaN */
    if (e == 0) return u2f(sign | f2u((float)m * 0x1p-24f));               /* zero, subnormal: exact */
    return u2f(sign | ((e + 112u) << 23) | (m << 13));
}

static inline uint16_t f32_to_f16(float f) {
    uint32_t u = f2u(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);               /* rounds to >= 65520: inf */
    if (a < 0x38800000u) {                                                  /* below 2**-14: subnormal */
        float t = u2f(a) + 0.5f;  /* the f16 subnormal step 2**-24 is the ulp of [0.5, 1): the add rounds */
        return (uint16_t)(sign | (f2u(t) - 0x3f000000u));
    }
    a += 0xc8000fffu + ((a >> 13) & 1u);                                    /* rebias by -112, round */
    return (uint16_t)(sign | (a >> 13));
}

/* float8_e4m3fn -> magnitude as an integer in units of 2**-9 (exact: at most 15 << 14), sign apart */
static inline int32_t e4m3_units(uint8_t b) {
    int32_t e = (b >> 3) & 15, m = b & 7, normal = e != 0;
    int32_t v = (m | (normal << 3)) << (e - normal);
    return (b & 0x80) ? -v : v;
}

/* f32 with |y| <= 448 -> float8_e4m3fn, round to nearest even, subnormal codes kept, sign kept */
static inline uint8_t f32_to_e4m3(float y) {
    uint32_t u = f2u(y), sign = (u >> 24) & 0x80u;
    float a = fabsf(y);
    if (a < 0x1p-6f) return (uint8_t)(sign | (uint32_t)rintf(a * 512.0f)); /* step 2**-9; 8 is 2**-6 */
    uint32_t r = (f2u(a) + 0x7ffffu + ((f2u(a) >> 20) & 1u)) >> 20;          /* 3 mantissa bits, RNE */
    return (uint8_t)(sign | (r - (120u << 3)));                              /* rebias 127 -> 7 */
}

static inline float flush(float v) { return fabsf(v) < FLT_MIN ? 0.0f : v; }

static void load_row(const void *x, int32_t dt, int64_t offset, int64_t k, float *dst) {
    if (dt == QK_F32) {
        memcpy(dst, (const float *)x + offset, (size_t)k * sizeof(float));
    } else if (dt == QK_BF16) {
        const uint16_t *s = (const uint16_t *)x + offset;
        for (int64_t i = 0; i < k; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        const uint16_t *s = (const uint16_t *)x + offset;
        for (int64_t i = 0; i < k; i++) dst[i] = f16_to_f32(s[i]);
    }
}

static inline void store(void *out, int32_t dt, int64_t i, float y) {
    if (dt == QK_F32) ((float *)out)[i] = y;
    else if (dt == QK_BF16) ((uint16_t *)out)[i] = f32_to_bf16(y);
    else ((uint16_t *)out)[i] = f32_to_f16(y);
}

/* the activation dtype's rounding of a dequantized weight (the definition casts w to it) */
static inline float round_to(int32_t dt, float w) {
    if (dt == QK_BF16) return bf16_to_f32(f32_to_bf16(w));
    if (dt == QK_F16) return f16_to_f32(f32_to_f16(w));
    return w;
}

static int valid_dtype(int32_t dt) { return dt == QK_F32 || dt == QK_BF16 || dt == QK_F16; }

static int valid_group(int64_t g) { return g == 32 || g == 64 || g == 128 || g == 256; }

/* --- threads: split [0, n) into chunks run by the caller and helpers -----------------------------------
 *
 * Work is handed out in chunks of output channels from a shared counter, so a helper that starts late or is
 * descheduled (a busy machine) delays the call by at most one chunk, not by its whole share, and the caller
 * never waits for a helper that has not claimed a chunk: it runs every unclaimed chunk itself and then waits
 * only for the chunks other threads are running. So a helper scheduled on a pool whose threads are all busy
 * (or never run at all) cannot stall a call. The job is reference counted: the last thread out frees it, so
 * a helper that starts after the call has returned finds the counter exhausted and leaves.
 *
 * Helpers run on the calling thread's scheduler (`qk_set_thread_scheduler`: the XLA handlers schedule on
 * XLA:CPU's intra-op pool, which is then not oversubscribed); else, built with -fopenmp -DQK_OPENMP (the torch
 * binding's build), on the process's OpenMP team: loaded after torch, the library binds to the libgomp torch
 * loaded (the same soname), so its threads are torch's intra-op threads, already awake after torch's last
 * op; else on the library's own pool: threads made
 * on first need and kept, each spinning QK_SPIN_NS after its last task (a decode step's next matmul comes
 * within microseconds; waking a sleeping thread costs ~5-20 us), yielding the core to any other runnable
 * thread while it spins (torch's or XLA's own workers on a small machine), then sleeping on a condition
 * variable. A
 * fork leaves the child with no threads; its pool starts empty (pthread_atfork). */

typedef struct qk_task qk_task;
struct qk_task {
    void (*fn)(const qk_task *t, int64_t n0, int64_t n1);
    const void *args;
};

typedef struct {
    qk_task t;  /* copied: the caller's task may live on its stack */
    int64_t n, chunk, chunks, next, done, refs;
} qk_job;

static void job_release(qk_job *job) {
    if (__atomic_sub_fetch(&job->refs, 1, __ATOMIC_ACQ_REL) == 0) free(job);
}

static void job_chunks(qk_job *job) {
    for (;;) {
        const int64_t c = __atomic_fetch_add(&job->next, 1, __ATOMIC_ACQ_REL);
        if (c >= job->chunks) return;
        const int64_t lo = c * job->chunk, hi = lo + job->chunk < job->n ? lo + job->chunk : job->n;
        job->t.fn(&job->t, lo, hi);
        __atomic_add_fetch(&job->done, 1, __ATOMIC_ACQ_REL);
    }
}

static void job_helper(void *p) {
    job_chunks((qk_job *)p);
    job_release((qk_job *)p);
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

#define QK_MAX_THREADS 64
#define QK_QUEUE 256               /* pending helper tasks; a full queue runs the task on the caller */
#define QK_SPIN_NS 100000          /* a pool thread's spin after its last task before it sleeps */

typedef struct { qk_work_fn fn; void *arg; } qk_item;

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    qk_item queue[QK_QUEUE];
    int64_t head, tail;            /* under mu; tail - head pending items */
    int64_t pending;               /* atomic mirror of tail - head, read while spinning */
    int threads, sleeping;         /* under mu */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;

/* libgomp does not survive a fork after its team ran (the child's next parallel region waits for threads
 * that were not copied): a child of such a process uses the pool instead, which starts empty there */
static int omp_used, omp_forked;

static void pool_after_fork_child(void) {
    omp_forked = omp_used;
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    pool.head = pool.tail = pool.pending = 0;
    pool.threads = pool.sleeping = 0;
}

static void pool_init(void) { pthread_atfork(NULL, NULL, pool_after_fork_child); }

static int pool_pop(qk_item *it) {  /* under mu */
    if (pool.tail == pool.head) return 0;
    *it = pool.queue[pool.head % QK_QUEUE];
    pool.head++;
    __atomic_store_n(&pool.pending, pool.tail - pool.head, __ATOMIC_RELEASE);
    return 1;
}

static void *pool_thread(void *unused) {
    (void)unused;
    pthread_mutex_lock(&pool.mu);
    for (;;) {
        qk_item it;
        if (pool_pop(&it)) {
            pthread_mutex_unlock(&pool.mu);
            it.fn(it.arg);
            const uint64_t until = now_ns() + QK_SPIN_NS;
            for (int spins = 0; __atomic_load_n(&pool.pending, __ATOMIC_ACQUIRE) == 0; spins++) {
                if (spins < 256) { cpu_relax(); continue; }
                if (now_ns() >= until) break;
                sched_yield();  /* spinning, but any other runnable thread on this core (torch's, XLA's) goes first */
            }
            pthread_mutex_lock(&pool.mu);
            continue;
        }
        pool.sleeping++;
        pthread_cond_wait(&pool.cv, &pool.mu);
        pool.sleeping--;
    }
    return NULL;
}

/* the library's scheduler: queue the task for the pool, which grows to `want` threads */
static void pool_schedule(int want, qk_work_fn fn, void *arg) {
    pthread_once(&pool_once, pool_init);
    pthread_mutex_lock(&pool.mu);
    while (pool.threads < want && pool.threads < QK_MAX_THREADS - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int ok = pthread_create(&th, &attr, pool_thread, NULL) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;
        pool.threads++;
    }
    if (pool.threads == 0 || pool.tail - pool.head >= QK_QUEUE) {  /* no thread, or a full queue: run it here */
        pthread_mutex_unlock(&pool.mu);
        fn(arg);
        return;
    }
    pool.queue[pool.tail % QK_QUEUE] = (qk_item){fn, arg};
    pool.tail++;
    __atomic_store_n(&pool.pending, pool.tail - pool.head, __ATOMIC_RELEASE);
    if (pool.sleeping) pthread_cond_signal(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
}

static _Thread_local qk_schedule_fn thread_schedule;
static _Thread_local void *thread_schedule_ctx;

void qk_set_thread_scheduler(qk_schedule_fn schedule, void *ctx) {
    thread_schedule = schedule;
    thread_schedule_ctx = ctx;
}

static void parallel_n(const qk_task *t, int64_t n, int32_t threads) {
    int64_t nt = threads < 1 ? 1 : threads;
    if (nt > n / QK_MIN_N_PER_THREAD) nt = n / QK_MIN_N_PER_THREAD;
    if (nt > QK_MAX_THREADS) nt = QK_MAX_THREADS;
    qk_job *job = nt > 1 ? (qk_job *)malloc(sizeof(qk_job)) : NULL;
    if (!job) { t->fn(t, 0, n); return; }
    int64_t chunk = n / (8 * nt);  /* ~8 chunks per thread, whole 4-column blocks, at least QK_MIN_N_PER_THREAD / 2 */
    chunk = chunk < QK_MIN_N_PER_THREAD / 2 ? QK_MIN_N_PER_THREAD / 2 : chunk / 4 * 4;
    *job = (qk_job){*t, n, chunk, (n + chunk - 1) / chunk, 0, 0, nt};
#ifdef QK_OPENMP
    pthread_once(&pool_once, pool_init);
    if (!thread_schedule && !omp_forked) {  /* the process's OpenMP team (torch's own, where torch loaded it) */
        job->refs = 1;
        omp_used = 1;
#pragma omp parallel num_threads((int)nt)
        job_chunks(job);
    }
#endif
    for (int64_t i = 1; i < nt && job->refs > 1; i++) {
        if (thread_schedule) thread_schedule(thread_schedule_ctx, job_helper, job);
        else pool_schedule((int)nt - 1, job_helper, job);
    }
    job_chunks(job);
    for (int spins = 0; __atomic_load_n(&job->done, __ATOMIC_ACQUIRE) < job->chunks; spins++) {
        if (spins < 256) cpu_relax();
        else sched_yield();  /* a helper descheduled mid-chunk runs sooner */
    }
    job_release(job);
}

/* --- activation quantization (numerics.symmetric_scale / quantize_symmetric / to_codes) ---------------- */

int64_t qk_quantize_rows(const void *x, int32_t x_dtype, int64_t m, int64_t k, int64_t kp, int32_t code_kind,
                         const float *static_scale, void *codes, float *scales) {
    if (!valid_dtype(x_dtype) || (code_kind != QK_INT8 && code_kind != QK_FP8_E4M3) || m < 0 || k < 0 || kp < k)
        return QK_EINVAL;
    float *row = (float *)malloc((size_t)(k > 0 ? k : 1) * sizeof(float));
    if (!row) return QK_ENOMEM;
    const float qmax = code_kind == QK_INT8 ? 127.0f : 448.0f;
    int64_t bad = 0;
    for (int64_t i = 0; i < m; i++) {
        uint8_t *q = (uint8_t *)codes + i * kp;
        load_row(x, x_dtype, i * k, k, row);
        float amax = 0.0f;
        int finite = 1;
        for (int64_t j = 0; j < k; j++) {
            float v = flush(row[j]);
            row[j] = v;
            finite &= isfinite(v) != 0;
            amax = fabsf(v) > amax ? fabsf(v) : amax;
        }
        memset(q, 0, (size_t)kp);
        if (!finite) { bad++; scales[i] = NAN; continue; }
        float scale;
        if (static_scale) {
            scale = *static_scale;
        } else {
            scale = amax / qmax;               /* IEEE division, as numerics.symmetric_scale */
            if (scale < FLT_MIN) scale = 1.0f;
        }
        scales[i] = scale;
        if (code_kind == QK_INT8) {
            for (int64_t j = 0; j < k; j++) {  /* rintf: ties to even in the default rounding mode */
                float c = rintf(row[j] / scale);
                c = c < -127.0f ? -127.0f : (c > 127.0f ? 127.0f : c);
                ((int8_t *)q)[j] = (int8_t)c;
            }
        } else {
            for (int64_t j = 0; j < k; j++) {
                float c = row[j] / scale;
                c = c < -448.0f ? -448.0f : (c > 448.0f ? 448.0f : c);
                q[j] = f32_to_e4m3(c);
            }
        }
    }
    free(row);
    return bad;
}

/* --- blocking ------------------------------------------------------------------------------------------- */

/* A block is R activation rows x C weight rows (R * C accumulators sharing their loads): 4 x 4 where there
 * are 4 rows, 1 x 4 for the rest (a GEMV keeps 4 independent accumulator chains), 4 x 1 / 1 x 1 at the end
 * of N. Rows are tiled by QK_ROW_TILE so a tile's activations stay in L2 while the weight streams once per
 * tile. */
#define QK_MB 4
#define QK_MAXACC 16
#define QK_ROW_TILE 32
#define QK_KC 512       /* panel columns per K tile: 4 weight rows and 4 activation rows of it stay in L1 */

#define QK_RANGE(NAME, ARGS, BLOCK)                                                                          \
    static void NAME(const qk_task *t, int64_t n0, int64_t n1) {                                             \
        const ARGS *a = (const ARGS *)t->args;                                                               \
        for (int64_t i0 = 0; i0 < a->m; i0 += QK_ROW_TILE) {                                                 \
            const int64_t i1 = i0 + QK_ROW_TILE < a->m ? i0 + QK_ROW_TILE : a->m;                            \
            int64_t c = n0;                                                                                  \
            for (; c + 4 <= n1; c += 4) {                                                                    \
                int64_t i = i0;                                                                              \
                for (; i + 4 <= i1; i += 4) BLOCK(a, 4, 4, i, c);                                                          \
                for (; i < i1; i++) BLOCK(a, 1, 4, i, c);                                                    \
            }                                                                                                \
            for (; c < n1; c++) {                                                                            \
                int64_t i = i0;                                                                              \
                for (; i + 4 <= i1; i += 4) BLOCK(a, 4, 1, i, c);                                            \
                for (; i < i1; i++) BLOCK(a, 1, 1, i, c);                                                    \
            }                                                                                                \
        }                                                                                                    \
    }

#define AI static inline __attribute__((always_inline))

/* --- integer dots -------------------------------------------------------------------------------------- */

#if QK_AVX512
static inline __mmask64 tail_mask(int64_t len) { return len >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << len) - 1); }
#endif

#if QK_AVX512
/* out lane q = sum of v[q]'s 16 lanes (mod 2**32), for 16 vectors at once: a transpose by unpacks and lane
 * shuffles with 15 vector adds, where 16 separate reductions take ~8 operations each */
static inline __m512i reduce16_epi32(const __m512i *v) {
    __m512i t[8], u[4], w[2];
    for (int q = 0; q < 8; q++)  /* per 128-bit lane: v[2q], v[2q+1], v[2q], v[2q+1] partials */
        t[q] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * q], v[2 * q + 1]),
                                _mm512_unpackhi_epi32(v[2 * q], v[2 * q + 1]));
    for (int q = 0; q < 4; q++)  /* per 128-bit lane: one partial of each of v[4q .. 4q + 3] */
        u[q] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * q], t[2 * q + 1]),
                                _mm512_unpackhi_epi64(t[2 * q], t[2 * q + 1]));
    for (int q = 0; q < 2; q++)
        w[q] = _mm512_add_epi32(_mm512_shuffle_i32x4(u[2 * q], u[2 * q + 1], 0x88),
                                _mm512_shuffle_i32x4(u[2 * q], u[2 * q + 1], 0xdd));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(w[0], w[1], 0x88), _mm512_shuffle_i32x4(w[0], w[1], 0xdd));
}
#endif

/* raw[r * C + c] = sum_j u(w[c][j]) * x[r][j] mod 2**32 over j < len, u(w) = w ^ 0x80 (int8 code + 128) */
AI void dot_i8(int R, int C, const int8_t *const *x, const int8_t *const *w, int64_t len, uint32_t *raw) {
#if QK_AVX512
    __m512i acc[QK_MAXACC];
    for (int q = 0; q < R * C; q++) acc[q] = _mm512_setzero_si512();
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int64_t j = 0; j < len; j += 64) {
        const __mmask64 mk = tail_mask(len - j);
        __m512i u[4];
        for (int c = 0; c < C; c++) u[c] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, w[c] + j), flip);
        for (int r = 0; r < R; r++) {
            const __m512i xv = _mm512_maskz_loadu_epi8(mk, x[r] + j);  /* [64] s8 */
            for (int c = 0; c < C; c++) acc[r * C + c] = _mm512_dpbusd_epi32(acc[r * C + c], u[c], xv);
        }
    }
    for (int q = 0; q < R * C; q++) raw[q] = (uint32_t)_mm512_reduce_add_epi32(acc[q]);
#else
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            uint32_t lanes[QK_LANES] = {0}, s = 0;
            int64_t j = 0;
            for (; j + QK_LANES <= len; j += QK_LANES)
                for (int l = 0; l < QK_LANES; l++)
                    lanes[l] += (uint32_t)((int32_t)(uint8_t)(w[c][j + l] ^ 0x80) * (int32_t)x[r][j + l]);
            for (; j < len; j++) s += (uint32_t)((int32_t)(uint8_t)(w[c][j] ^ 0x80) * (int32_t)x[r][j]);
            for (int l = 0; l < QK_LANES; l++) s += lanes[l];
            raw[r * C + c] = s;
        }
#endif
}

/* raw[r * C + c] = sum_j u(lo(w[c][j])) * xe[r][j] + u(hi(w[c][j])) * xo[r][j] mod 2**32, u(nibble) = nibble ^ 8 */
AI void dot_i4(int R, int C, const int8_t *const *xe, const int8_t *const *xo, const uint8_t *const *w, int64_t len,
               uint32_t *raw) {
#if QK_AVX512
    __m512i acc[QK_MAXACC];
    for (int q = 0; q < R * C; q++) acc[q] = _mm512_setzero_si512();
    const __m512i low = _mm512_set1_epi8(0x0f), eight = _mm512_set1_epi8(0x08);
    for (int64_t j = 0; j < len; j += 64) {
        const __mmask64 mk = tail_mask(len - j);
        __m512i lo[4], hi[4];
        for (int c = 0; c < C; c++) {
            const __m512i b = _mm512_maskz_loadu_epi8(mk, w[c] + j);
            lo[c] = _mm512_xor_si512(_mm512_and_si512(b, low), eight);                       /* [64] even k */
            hi[c] = _mm512_xor_si512(_mm512_and_si512(_mm512_srli_epi16(b, 4), low), eight);  /* [64] odd k */
        }
        for (int r = 0; r < R; r++) {
            const __m512i ev = _mm512_maskz_loadu_epi8(mk, xe[r] + j), od = _mm512_maskz_loadu_epi8(mk, xo[r] + j);
            for (int c = 0; c < C; c++) {
                acc[r * C + c] = _mm512_dpbusd_epi32(acc[r * C + c], lo[c], ev);
                acc[r * C + c] = _mm512_dpbusd_epi32(acc[r * C + c], hi[c], od);
            }
        }
    }
    if (R * C == 16) _mm512_storeu_si512(raw, reduce16_epi32(acc));
    else for (int q = 0; q < R * C; q++) raw[q] = (uint32_t)_mm512_reduce_add_epi32(acc[q]);
#else
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            uint32_t s = 0;
            for (int64_t j = 0; j < len; j++) {
                const uint8_t b = w[c][j];
                s += (uint32_t)(((int32_t)((b & 15) ^ 8)) * xe[r][j] + ((int32_t)((b >> 4) ^ 8)) * xo[r][j]);
            }
            raw[r * C + c] = s;
        }
#endif
}

typedef struct {
    const int8_t *xq, *xe, *xo;   /* codes (M, KP); int4: even / odd columns (M, KP / 2) */
    const uint32_t *xoff;         /* the offset to remove: 128 * sum(x) per row; int4: 8 * sum(x) per row and group */
    const float *xs;              /* (M,) */
    int64_t m, kp, groups, gs;    /* groups = 0: one scale per row */
    const void *w;
    const float *ws, *bias;
    int32_t int4;
    int64_t n;
    void *out;
    int32_t odt;
} int_args;

AI void int_block(const int_args *a, int R, int C, int64_t i, int64_t c0) {
    float y[QK_MAXACC];
    uint32_t raw[QK_MAXACC];
    if (!a->int4) {  /* W8A8: y = (f32(acc) * s_w[n]) * s_x[m] + bias[n] */
        const int8_t *x[QK_MB], *w[4];
        for (int r = 0; r < R; r++) x[r] = a->xq + (i + r) * a->kp;
        for (int c = 0; c < C; c++) w[c] = (const int8_t *)a->w + (c0 + c) * a->kp;
        dot_i8(R, C, x, w, a->kp, raw);
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) {
                const int32_t acc = (int32_t)(raw[r * C + c] - a->xoff[i + r]);
                y[r * C + c] = ((float)acc * a->ws[c0 + c]) * a->xs[i + r];
            }
    } else {  /* W4A8: y = 0; y = y + f32(acc_g) * s_w[n, g] in order; y = y * s_x[m] + bias[n] */
        const int64_t half = a->kp / 2, step = a->gs / 2;
        for (int q = 0; q < R * C; q++) y[q] = 0.0f;
#if QK_AVX512
        if (R * C == 16) {  /* lanes r * 4 + c: each lane's multiply and add rounded on its own, as below */
            const __m512i rows = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
            __m512 yv = _mm512_setzero_ps();
            for (int64_t g = 0; g < a->groups; g++) {
                const int8_t *xe[QK_MB], *xo[QK_MB];
                const uint8_t *w[4];
                for (int r = 0; r < R; r++) {
                    xe[r] = a->xe + (i + r) * half + g * step;
                    xo[r] = a->xo + (i + r) * half + g * step;
                }
                for (int c = 0; c < C; c++) w[c] = (const uint8_t *)a->w + (c0 + c) * half + g * step;
                dot_i4(R, C, xe, xo, w, step, raw);
                const int64_t G = a->groups;
                const __m512i off = _mm512_permutexvar_epi32(rows, _mm512_castsi128_si512(_mm_setr_epi32(
                    (int)a->xoff[i * G + g], (int)a->xoff[(i + 1) * G + g], (int)a->xoff[(i + 2) * G + g],
                    (int)a->xoff[(i + 3) * G + g])));
                const __m512 sv = _mm512_broadcast_f32x4(_mm_setr_ps(a->ws[c0 * G + g], a->ws[(c0 + 1) * G + g],
                                                                     a->ws[(c0 + 2) * G + g], a->ws[(c0 + 3) * G + g]));
                const __m512i acc = _mm512_sub_epi32(_mm512_loadu_si512(raw), off);
                yv = _mm512_add_ps(yv, _mm512_mul_ps(_mm512_cvtepi32_ps(acc), sv));
            }
            const __m512 xs = _mm512_permutexvar_ps(rows, _mm512_castps128_ps512(_mm_loadu_ps(a->xs + i)));
            _mm512_storeu_ps(y, _mm512_mul_ps(yv, xs));
            goto epilogue;
        }
#endif
        for (int64_t g = 0; g < a->groups; g++) {
            const int8_t *xe[QK_MB], *xo[QK_MB];
            const uint8_t *w[4];
            for (int r = 0; r < R; r++) {
                xe[r] = a->xe + (i + r) * half + g * step;
                xo[r] = a->xo + (i + r) * half + g * step;
            }
            for (int c = 0; c < C; c++) w[c] = (const uint8_t *)a->w + (c0 + c) * half + g * step;
            dot_i4(R, C, xe, xo, w, step, raw);
            for (int r = 0; r < R; r++)
                for (int c = 0; c < C; c++) {
                    const int32_t acc = (int32_t)(raw[r * C + c] - a->xoff[(i + r) * a->groups + g]);
                    y[r * C + c] = y[r * C + c] + (float)acc * a->ws[(c0 + c) * a->groups + g];
                }
        }
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) y[r * C + c] = y[r * C + c] * a->xs[i + r];
    }
#if QK_AVX512
epilogue:
#endif
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            const float v = a->bias ? y[r * C + c] + a->bias[c0 + c] : y[r * C + c];
            store(a->out, a->odt, (i + r) * a->n + c0 + c, v);
        }
}

QK_RANGE(int_range, int_args, int_block)

int32_t qk_matmul_int(const int8_t *xq, const float *x_scale, int64_t m, int64_t kp, const void *w,
                      int32_t w_kind, int64_t n, const float *w_scale, int64_t group_size, const float *bias,
                      void *out, int32_t out_dtype, int32_t threads) {
    const int int4 = w_kind == QK_INT4;
    if (!valid_dtype(out_dtype) || m < 0 || n < 0 || kp < 0) return QK_EINVAL;
    if (!(w_kind == QK_INT8 && group_size == 0) && !(int4 && valid_group(group_size) && kp % group_size == 0))
        return QK_EINVAL;
    if (m == 0 || n == 0) return 0;
    const int64_t groups = int4 ? kp / group_size : 1, half = kp / 2;
    uint32_t *xoff = (uint32_t *)malloc((size_t)(m * groups > 0 ? m * groups : 1) * sizeof(uint32_t));
    int8_t *split = int4 ? (int8_t *)malloc((size_t)(m * kp > 0 ? m * kp : 1)) : NULL;
    if (!xoff || (int4 && !split)) { free(xoff); free(split); return QK_ENOMEM; }
    for (int64_t i = 0; i < m; i++) {
        const int8_t *x = xq + i * kp;
        if (!int4) {
            int32_t s = 0;
            for (int64_t j = 0; j < kp; j++) s += x[j];
            xoff[i] = 128u * (uint32_t)s;
            continue;
        }
        int8_t *xe = split + i * half, *xo = split + m * half + i * half;
        for (int64_t j = 0; j < half; j++) { xe[j] = x[2 * j]; xo[j] = x[2 * j + 1]; }
        for (int64_t g = 0; g < groups; g++) {
            int32_t s = 0;
            for (int64_t j = g * group_size; j < (g + 1) * group_size; j++) s += x[j];
            xoff[i * groups + g] = 8u * (uint32_t)s;
        }
    }
    int_args a = {.xq = xq, .xe = split, .xo = split ? split + m * half : NULL, .xoff = xoff, .xs = x_scale,
                  .m = m, .kp = kp, .groups = int4 ? groups : 0, .gs = group_size, .w = w, .ws = w_scale,
                  .bias = bias, .int4 = int4, .n = n, .out = out, .odt = out_dtype};
    qk_task t = {int_range, &a};
    parallel_n(&t, n, threads);
    free(xoff);
    free(split);
    return 0;
}

/* --- float dots (fp8 x fp8, weight-only) ---------------------------------------------------------------
 *
 * Weight rows are decoded, C at a time, into an f32 panel in the activations' column order (natural; int4:
 * the even columns, then the odd ones, as the packed bytes hold them): the definition's dequantized weight
 * `round_act((f32(q) - zero) * scale)` for weight-only recipes, the codes' values for fp8 x fp8. A panel is
 * decoded once per row tile and read by every activation row of it, so the inner loop is loads and FMAs. */

/* float8_e4m3fn code -> its value * 2**-8, exact (the f16 whose bits are the code's shifted into place) */
static inline float e4m3_f16scaled(uint8_t b) { return (float)e4m3_units(b) * 0x1p-17f; }

#if QK_AVX512
/* 32 e4m3 codes -> their values * 2**-8 as f32, exact, in two halves: e4m3 bits s.eeee.mmm placed as the f16
 * s.0eeee.mmm0000000 (exponent bias 15 against 7: a factor 2**-8, subnormals included; (v + (v & 0x80)) << 7
 * moves the sign from bit 14 to bit 15), converted by vcvtph2ps */
static inline void e4m3_32(__m256i bytes, __m512 *lo, __m512 *hi) {
    const __m512i v = _mm512_cvtepu8_epi16(bytes);
    const __m512i h = _mm512_slli_epi16(_mm512_add_epi16(v, _mm512_and_si512(v, _mm512_set1_epi16(0x80))), 7);
    *lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
    *hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
}

/* the activation dtype's rounding of 16 dequantized weights (none for f32) */
static inline __m512 round_to16(int32_t dt, __m512 w) {
    if (dt == QK_BF16) {
        __m512i u = _mm512_castps_si512(w);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
        return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
    }
    if (dt == QK_F16) return _mm512_cvtph_ps(_mm512_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return w;
}
#endif

typedef struct {
    const float *x;               /* activations (M, KP) as f32 in panel order; fp8 x fp8: the codes' values * 2**-8 */
    const float *xs;              /* fp8 x fp8: activation scales (M,); NULL for weight-only */
    int64_t m, kp, groups, gs;    /* groups = 0: one scale per row */
    const void *w;
    int32_t kind, xdt;
    const float *ws, *bias;
    const int8_t *wz;
    int64_t n;
    void *out;
    int32_t odt;
    int failed;                   /* a thread could not allocate its panel */
    const uint16_t *xb;           /* or NULL: the activations laid out for gemv_bf16_columns (M, kb) */
    const float *xf;              /* or NULL: f32 activations laid out for its e4m3 x f32 form (M, kb) */
    int late;                     /* gemv_bf16_columns: the codes are the weights, the scale applies after the dot */
    int64_t kb;
} float_args;

/* columns [j0, j0 + len) of weight row c, in panel order, -> p[0 .. len) as f32 */
static void decode_tile(const float_args *a, int64_t c, int64_t j0, int64_t len, float *p) {
    const int32_t dt = a->xdt;
    const int64_t kp = a->kp;
    if (a->kind == QK_INT8) {
        const int8_t *w = (const int8_t *)a->w + c * kp + j0;
        const float s = a->ws[c];
        int64_t j = 0;
#if QK_AVX512
        const __m512 sv = _mm512_set1_ps(s);
        for (; j + 16 <= len; j += 16)
            _mm512_storeu_ps(p + j, round_to16(dt, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_loadu_si128((const __m128i *)(w + j)))), sv)));
#endif
        for (; j < len; j++) p[j] = round_to(dt, (float)w[j] * s);
    } else if (a->kind == QK_FP8_E4M3) {
        const uint8_t *w = (const uint8_t *)a->w + c * kp + j0;
        const int codes = a->xs != NULL;  /* fp8 x fp8: the codes alone; else the dequantized weight */
        const float s = codes ? 1.0f : a->ws[c] * 256.0f;  /* decoded values carry 2**-8: exact */
        int64_t j = 0;
#if QK_AVX512
        const __m512 sv = _mm512_set1_ps(s);
        for (; j + 32 <= len; j += 32) {
            __m512 lo, hi;
            e4m3_32(_mm256_loadu_si256((const __m256i *)(w + j)), &lo, &hi);
            if (!codes) {
                lo = round_to16(dt, _mm512_mul_ps(lo, sv));
                hi = round_to16(dt, _mm512_mul_ps(hi, sv));
            }
            _mm512_storeu_ps(p + j, lo);
            _mm512_storeu_ps(p + j + 16, hi);
        }
#endif
        for (; j < len; j++) p[j] = codes ? e4m3_f16scaled(w[j]) : round_to(dt, e4m3_f16scaled(w[j]) * s);
    } else {  /* a tile of packed bytes [b0, b0 + nb): its even columns to p[0 .. nb), odd ones to p[nb .. 2 nb) */
        const int64_t step = a->gs / 2, G = a->groups, b0 = j0 / 2, nb = len / 2;
        const uint8_t *w = (const uint8_t *)a->w + c * (kp / 2);
        const int zp = a->kind == QK_UINT4;
        const int32_t flip = zp ? 0 : 8;  /* int4: a two's complement nibble t is (t ^ 8) - 8 */
        for (int64_t g = b0 / step; g < G && g * step < b0 + nb; g++) {
            const float s = a->ws[c * G + g];
            const int32_t z = zp ? a->wz[c * G + g] : 8;
            int64_t j = g * step > b0 ? g * step : b0;
            const int64_t end = (g + 1) * step < b0 + nb ? (g + 1) * step : b0 + nb;
#if QK_AVX512
            const __m512 sv = _mm512_set1_ps(s);
            const __m512i zv = _mm512_set1_epi32(z), fv = _mm512_set1_epi32(flip), low = _mm512_set1_epi32(15);
            for (; j + 16 <= end; j += 16) {
                const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + j)));
                const __m512i lo = _mm512_xor_si512(_mm512_and_si512(b, low), fv);
                const __m512i hi = _mm512_xor_si512(_mm512_srli_epi32(b, 4), fv);
                _mm512_storeu_ps(p + j - b0, round_to16(dt, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(lo, zv)), sv)));
                _mm512_storeu_ps(p + nb + j - b0,
                                 round_to16(dt, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(hi, zv)), sv)));
            }
#endif
            for (; j < end; j++) {
                const int32_t lo = (w[j] & 15) ^ flip, hi = (w[j] >> 4) ^ flip;
                p[j - b0] = round_to(dt, (float)(lo - z) * s);
                p[nb + j - b0] = round_to(dt, (float)(hi - z) * s);
            }
        }
    }
}

/* acc[r * C + c] = sum_j x[r][j] * p[c][j] over j < len */
AI void dot_f32(int R, int C, const float *const *x, const float *const *p, int64_t len, float *acc) {
#if QK_AVX512
    __m512 v[QK_MAXACC];
    for (int q = 0; q < R * C; q++) v[q] = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; j += 16) {
        const __mmask16 mk = len - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (len - j)) - 1);
        __m512 pv[4];
        for (int c = 0; c < C; c++) pv[c] = _mm512_maskz_loadu_ps(mk, p[c] + j);
        for (int r = 0; r < R; r++) {
            const __m512 xv = _mm512_maskz_loadu_ps(mk, x[r] + j);
            for (int c = 0; c < C; c++) v[r * C + c] = _mm512_fmadd_ps(pv[c], xv, v[r * C + c]);
        }
    }
    for (int q = 0; q < R * C; q++) acc[q] = _mm512_reduce_add_ps(v[q]);
#else
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float lanes[QK_LANES] = {0}, s = 0.0f;
            int64_t j = 0;
            for (; j + QK_LANES <= len; j += QK_LANES)
                for (int l = 0; l < QK_LANES; l++) lanes[l] = QK_FMA(x[r][j + l], p[c][j + l], lanes[l]);
            for (; j < len; j++) s = QK_FMA(x[r][j], p[c][j], s);
            for (int l = 0; l < QK_LANES; l++) s += lanes[l];
            acc[r * C + c] = s;
        }
#endif
}

/* y[(i - i0) * 4 + c] += the dot of activation rows i .. i + R and panel rows 0 .. C over one K tile */
AI void float_block(const float_args *a, int R, int C, int64_t i, int64_t j0, int64_t len, const float *panel,
                    float *y) {
    const float *x[QK_MB], *p[4];
    float part[QK_MAXACC];
    for (int r = 0; r < R; r++) x[r] = a->x + (i + r) * a->kp + j0;
    for (int c = 0; c < C; c++) p[c] = panel + c * QK_KC;
    dot_f32(R, C, x, p, len, part);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) y[r * 4 + c] += part[r * C + c];
}

AI void float_columns(const float_args *a, int C, int64_t i0, int64_t i1, int64_t c0, float *panel, float *y) {
    for (int64_t q = 0; q < (i1 - i0) * 4; q++) y[q] = 0.0f;
    for (int64_t j0 = 0; j0 < a->kp; j0 += QK_KC) {
        const int64_t len = a->kp - j0 < QK_KC ? a->kp - j0 : QK_KC;
        for (int c = 0; c < C; c++) decode_tile(a, c0 + c, j0, len, panel + c * QK_KC);
        int64_t i = i0;
        for (; i + 4 <= i1; i += 4) float_block(a, 4, C, i, j0, len, panel, y + (i - i0) * 4);
        for (; i < i1; i++) float_block(a, 1, C, i, j0, len, panel, y + (i - i0) * 4);
    }
    for (int64_t i = i0; i < i1; i++)
        for (int c = 0; c < C; c++) {
            float v = y[(i - i0) * 4 + c];
            if (a->xs)  /* fp8 x fp8: both sides carry 2**-8 (an exact power-of-two rescale), then W8A8's order */
                v = ((v * 0x1p16f) * a->ws[c0 + c]) * a->xs[i];
            if (a->bias) v = v + a->bias[c0 + c];
            store(a->out, a->odt, i * a->n + c0 + c, v);
        }
}

#if QK_AVX512
static inline __m512 i8_16(__mmask16 mk, const int8_t *w) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, w)));
}

/* GEMV (at most 4 activation rows, R): C weight rows decoded in registers and used by the R rows at once,
 * no panel (R * C independent accumulator chains). f32 activations apply a per-row scale after the dot (the
 * weight needs no rounding to the activation dtype); bf16 / f16 round each dequantized weight as the panel does. */
AI void gemv_columns(const float_args *a, int R, int C, int64_t c0) {
    const int32_t dt = a->xdt;
    const int64_t kp = a->kp;
    __m512 v[QK_MAXACC];
    float scale[4];
    for (int q = 0; q < R * C; q++) v[q] = _mm512_setzero_ps();
    if (a->kind == QK_INT8 || a->kind == QK_FP8_E4M3) {
        const int fp8 = a->kind == QK_FP8_E4M3, codes = a->xs != NULL, late = dt == QK_F32 || codes;
        __m512 sv[4];
        for (int c = 0; c < C; c++) {
            const float s = codes ? 1.0f : a->ws[c0 + c] * (fp8 ? 256.0f : 1.0f);
            scale[c] = late ? s : 1.0f;
            sv[c] = _mm512_set1_ps(s);
        }
        for (int64_t j = 0; j < kp; j += 32) {
            const __mmask32 mk = kp - j >= 32 ? ~(__mmask32)0 : (((__mmask32)1 << (kp - j)) - 1);
            const __mmask16 m0 = (__mmask16)mk, m1 = (__mmask16)(mk >> 16);
            __m512 x0[QK_MB], x1[QK_MB];
            for (int r = 0; r < R; r++) {
                x0[r] = _mm512_maskz_loadu_ps(m0, a->x + r * kp + j);
                x1[r] = _mm512_maskz_loadu_ps(m1, a->x + r * kp + j + 16);
            }
            for (int c = 0; c < C; c++) {
                __m512 w0, w1;
                if (fp8) {
                    e4m3_32(_mm256_maskz_loadu_epi8(mk, (const uint8_t *)a->w + (c0 + c) * kp + j), &w0, &w1);
                } else {
                    w0 = i8_16(m0, (const int8_t *)a->w + (c0 + c) * kp + j);
                    w1 = i8_16(m1, (const int8_t *)a->w + (c0 + c) * kp + j + 16);
                }
                if (!late) {
                    w0 = round_to16(dt, _mm512_mul_ps(w0, sv[c]));
                    w1 = round_to16(dt, _mm512_mul_ps(w1, sv[c]));
                }
                for (int r = 0; r < R; r++) {
                    v[r * C + c] = _mm512_fmadd_ps(w0, x0[r], v[r * C + c]);
                    v[r * C + c] = _mm512_fmadd_ps(w1, x1[r], v[r * C + c]);
                }
            }
        }
    } else {  /* int4 / uint4 per group; activations in panel order (per K tile: even columns, then odd) */
        /* a group's dequantized weights take 16 values, one per nibble: round_act((f32(nibble') - zero) * scale),
         * with nibble' = t ^ 8 for int4 (two's complement) and t for uint4; one table of 16 f32 per group and
         * column, read by `vpermps` (which indexes by the low four bits: no mask for the low nibble). The
         * same values as decoding each weight (the definition's rounding, per value), 2 permutes and a shift
         * per 32 weights instead of ~10 integer and float ops: K = N = 4096, M = 1, two threads, W4A16 g128
         * against F.linear f32 (2-core Intel Xeon): f32 activations 1.38x -> 2.23x, bf16 1.05x -> 1.94x. */
        const int64_t step = a->gs / 2, G = a->groups;
        const int zp = a->kind == QK_UINT4;
        const __m512i nibbles = _mm512_xor_si512(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                 _mm512_set1_epi32(zp ? 0 : 8));
        for (int c = 0; c < C; c++) scale[c] = 1.0f;
        for (int64_t g = 0; g < G; g++) {
            const int64_t b = g * step, j0 = (2 * b) / QK_KC * QK_KC;  /* a group never straddles a K tile */
            const int64_t nb = (kp - j0 < QK_KC ? kp - j0 : QK_KC) / 2;
            const float *xe = a->x + j0 + (b - j0 / 2), *xo = xe + nb;
            __m512 table[4];
            for (int c = 0; c < C; c++) {
                const __m512i z = _mm512_set1_epi32(zp ? a->wz[(c0 + c) * G + g] : 8);
                table[c] = round_to16(dt, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(nibbles, z)),
                                                        _mm512_set1_ps(a->ws[(c0 + c) * G + g])));
            }
            for (int64_t j = 0; j < step; j += 16) {
                __m512 e[QK_MB], o[QK_MB];
                for (int r = 0; r < R; r++) {
                    e[r] = _mm512_loadu_ps(xe + r * kp + j);
                    o[r] = _mm512_loadu_ps(xo + r * kp + j);
                }
                for (int c = 0; c < C; c++) {
                    const uint8_t *w = (const uint8_t *)a->w + (c0 + c) * (kp / 2) + b + j;
                    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)w));
                    const __m512 we = _mm512_permutexvar_ps(q, table[c]);                        /* low nibble */
                    const __m512 wo = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table[c]);  /* high nibble */
                    for (int r = 0; r < R; r++) {
                        v[r * C + c] = _mm512_fmadd_ps(we, e[r], v[r * C + c]);
                        v[r * C + c] = _mm512_fmadd_ps(wo, o[r], v[r * C + c]);
                    }
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float y = _mm512_reduce_add_ps(v[r * C + c]) * scale[c];
            if (a->xs) y = ((y * 0x1p16f) * a->ws[c0 + c]) * a->xs[r];
            if (a->bias) y = y + a->bias[c0 + c];
            store(a->out, a->odt, r * a->n + c0 + c, y);
        }
}

AI void gemv_range(const float_args *a, int R, int64_t n0, int64_t n1) {
    int64_t c = n0;
    for (; c + 4 <= n1; c += 4) gemv_columns(a, R, 4, c);
    for (; c < n1; c++) gemv_columns(a, R, 1, c);
}
#endif

#if QK_BF16DOT
/* --- GEMV through bf16 dot products (AVX-512 BF16 + VBMI) ---------------------------------------------
 *
 * `vdpbf16ps` multiplies bf16 pairs exactly into f32 and accumulates in f32 (32 multiply-adds an instruction),
 * so it computes the definition's products exactly wherever both operands are bf16 values:
 *   fp8 x fp8: e4m3 codes are exact in bf16 (4 significant bits, exponents in range); the scales apply after
 *     the dot in W8A8's order. 0.99 against 1.24 ms for gemv_columns' f16-converting FMAs (K = N = 4096, M = 1,
 *     one thread, this repo's 2-core Intel Xeon with AMX; 56 against 69 us at 1536 x 576).
 *   weight-only with bf16 activations (int8 / e4m3 weights): the definition rounds each dequantized weight to
 *     bf16, `bf16(f32(q) * s)`, which for one output channel takes at most 128 values (one per magnitude; the
 *     rounding is symmetric in the sign): a table per channel, made with the channel's scale. With a bf16
 *     output the codes themselves are the weights and the scale applies after the dot (as torch's
 *     _weight_int8pack_mm does): that differs from rounding each weight by at most 2**-9 of |x| @ |w|^T, a
 *     quarter of the output's own rounding step (2**-7, which qkernels.testing's tolerance holds), and skips
 *     the tables (K = N = 4096, M = 1, one thread: fp8a16 0.96 ms against 1.41 with tables, 2.52 in
 *     gemv_columns).
 * The instruction reads bf16 subnormals as zero and flushes subnormal sums: codes never are subnormal (the
 * smallest e4m3 value is 2**-9); a call whose activations hold a nonzero |x| < QK_BF16_TINY, or whose scales
 * could make a weight or a product subnormal (s < QK_BF16_MIN_SCALE), runs gemv_columns instead.
 * e4m3 weights with f32 activations take the same table for the weight (a bf16 is the upper half of the f32 of the
 * same value: widened by an interleave with zeros) and f32 FMAs, the scale after the dot as gemv_columns does,
 * cheaper than its f16 conversion (1.41 against 1.64 ms at K = N = 4096, 63 against 72 us at 1536 x 576). Tried and dropped: f32 activations split into three bf16 terms (x = t0 +
 * t1 + t2 to 2**-24) was 1.8x slower than gemv_columns (1787 against 965 us, int8 weights, K = N = 4096, M = 1).
 *
 * Codes become bf16 by table: a 128-entry lookup (`vpermt2b`, high and low bytes apart), the sign bit merged
 * in, the bytes interleaved into words. e4m3 indexes by its magnitude bits; int8 by |v| - 1 (a zero code
 * masked to zero), so -128 decodes too. The interleave orders each 64 codes as 0-7, 16-23, 32-39, 48-55 |
 * 8-15, 24-31, ...; the activations are laid out in the same order once per call, so the pairs the
 * instruction multiplies match. */
#define QK_BF16_TINY 0x1p-100f
#define QK_BF16_MIN_SCALE 0x1p-17f  /* with |x| >= 2**-100 and |code| >= 2**-9: products >= 2**-126 */

typedef struct { __m512i hi0, hi1, lo0, lo1; } bf16_table;

/* the f32 magnitudes a table holds: entry i of e4m3 (its value; 0x7f is NaN) or of int8 (i + 1) */
static void table_magnitudes(int32_t kind, __m512 *mags) {
    float v[128];
    for (int i = 0; i < 128; i++)
        v[i] = kind == QK_INT8 ? (float)(i + 1) : i == 127 ? NAN : (float)e4m3_units((uint8_t)i) * 0x1p-9f;
    for (int q = 0; q < 8; q++) mags[q] = _mm512_loadu_ps(v + 16 * q);
}

/* bf16(mags * s) per entry (s = 1: the magnitudes themselves, exact) */
static inline bf16_table make_table(const __m512 *mags, float s) {
    uint8_t hi[128], lo[128];
    const __m512 sv = _mm512_set1_ps(s);
    for (int q = 0; q < 8; q++) {
        const __m512i u = _mm512_castps_si512(round_to16(QK_BF16, _mm512_mul_ps(mags[q], sv)));
        _mm_storeu_si128((__m128i *)(hi + 16 * q), _mm512_cvtepi32_epi8(_mm512_srli_epi32(u, 24)));
        _mm_storeu_si128((__m128i *)(lo + 16 * q), _mm512_cvtepi32_epi8(_mm512_srli_epi32(u, 16)));
    }
    bf16_table t = {_mm512_loadu_si512(hi), _mm512_loadu_si512(hi + 64), _mm512_loadu_si512(lo),
                    _mm512_loadu_si512(lo + 64)};
    return t;
}

/* 64 codes -> two vectors of 32 bf16 (in the interleaved order) */
AI void codes_bf16(const bf16_table *t, int32_t kind, __m512i b, __m512i *w0, __m512i *w1) {
    __m512i idx = b;
    __mmask64 nz = ~(__mmask64)0;
    if (kind == QK_INT8) {
        nz = _mm512_test_epi8_mask(b, b);
        idx = _mm512_add_epi8(_mm512_abs_epi8(b), _mm512_set1_epi8(127));  /* |v| - 1, mod 128 */
    }
    __m512i hi = _mm512_maskz_permutex2var_epi8(nz, t->hi0, idx, t->hi1);  /* indexes by the low seven bits */
    const __m512i lo = _mm512_maskz_permutex2var_epi8(nz, t->lo0, idx, t->lo1);
    hi = _mm512_ternarylogic_epi32(hi, b, _mm512_set1_epi8((char)0x80), 0xf8);  /* hi | (b & 0x80) */
    *w0 = _mm512_unpacklo_epi8(lo, hi);
    *w1 = _mm512_unpackhi_epi8(lo, hi);
}

static inline int64_t interleaved(int64_t p) { return 16 * ((p % 32) / 8) + (p % 8) + 8 * (p / 32); }

/* activations (M, K): e4m3 codes (fp8 x fp8) or bf16 values, row stride `stride` -> bf16 (M, KB) in the
 * interleaved order, KB = K rounded up to 64, zero-padded; 0 where a value is too small (QK_BF16_TINY) */
static int bf16_activations(const void *x, int codes, int64_t m, int64_t k, int64_t stride, int64_t kb,
                            uint16_t *dst) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t p = 0; p < kb; p++) {
            const int64_t j = (p / 64) * 64 + interleaved(p % 64);
            uint16_t h = 0;
            if (j < k && codes) {
                h = (uint16_t)(f2u((float)e4m3_units(((const uint8_t *)x)[i * stride + j]) * 0x1p-9f) >> 16);
            } else if (j < k) {
                h = ((const uint16_t *)x)[i * stride + j];
                const float v = bf16_to_f32(h);
                if (v != 0.0f && fabsf(v) < QK_BF16_TINY) return 0;
            }
            dst[i * kb + p] = h;
        }
    return 1;
}

/* f32 activations (M, K), row stride `stride` -> (M, KB) in the order e4m3_f32 widens codes: per 64, vector v,
 * lane group L, element j hold column 16 L + 4 v + j; zero-padded */
static void f32_activations(const float *x, int64_t m, int64_t k, int64_t stride, int64_t kb, float *dst) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t p = 0; p < kb; p++) {
            const int64_t q = p % 64, j = (p / 64) * 64 + 16 * ((q % 16) / 4) + 4 * (q / 16) + q % 4;
            dst[i * kb + p] = j < k ? x[i * stride + j] : 0.0f;
        }
}

/* the two bf16 vectors of 64 codes widened to four f32 vectors (a bf16 is the upper half of its f32) */
AI void bf16_f32(__m512i w0, __m512i w1, __m512 *f) {
    const __m512i zero = _mm512_setzero_si512();
    f[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, w0));
    f[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, w0));
    f[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, w1));
    f[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, w1));
}

/* R activation rows x C weight rows; `tab`: the codes' table (`late`), or NULL: each row's own table of its
 * dequantized weights, decoded into `panel` (4 x kb) first */
AI void gemv_bf16_columns(const float_args *a, int R, int C, int64_t c0, const bf16_table *tab, const __m512 *mags,
                          uint16_t *panel) {
    const int64_t kp = a->kp, kb = a->kb;
    const int32_t kind = a->kind;
    const uint8_t *w = (const uint8_t *)a->w;
    if (!tab)
        for (int c = 0; c < C; c++) {
            const bf16_table own = make_table(mags, a->ws[c0 + c]);
            for (int64_t j = 0; j < kp; j += 64) {
                __m512i w0, w1;
                codes_bf16(&own, kind, _mm512_maskz_loadu_epi8(tail_mask(kp - j), w + (c0 + c) * kp + j), &w0, &w1);
                _mm512_storeu_si512(panel + c * kb + j, w0);
                _mm512_storeu_si512(panel + c * kb + j + 32, w1);
            }
        }
    __m512 v[QK_MAXACC];
    for (int q = 0; q < R * C; q++) v[q] = _mm512_setzero_ps();
    for (int64_t j = 0; j < kp; j += 64) {
        __m512i w0[4], w1[4];
        for (int c = 0; c < C; c++) {
            if (tab) {
                codes_bf16(tab, kind, _mm512_maskz_loadu_epi8(tail_mask(kp - j), w + (c0 + c) * kp + j), &w0[c], &w1[c]);
            } else {
                w0[c] = _mm512_loadu_si512(panel + c * kb + j);
                w1[c] = _mm512_loadu_si512(panel + c * kb + j + 32);
            }
        }
        if (a->xf) {  /* f32 activations: the codes widened, f32 FMAs */
            for (int c = 0; c < C; c++) {
                __m512 f[4];
                bf16_f32(w0[c], w1[c], f);
                for (int r = 0; r < R; r++)
                    for (int q = 0; q < 4; q++)
                        v[r * C + c] = _mm512_fmadd_ps(f[q], _mm512_loadu_ps(a->xf + r * kb + j + 16 * q), v[r * C + c]);
            }
            continue;
        }
        for (int r = 0; r < R; r++) {
            const __m512bh x0 = (__m512bh)_mm512_loadu_si512(a->xb + r * kb + j);
            const __m512bh x1 = (__m512bh)_mm512_loadu_si512(a->xb + r * kb + j + 32);
            for (int c = 0; c < C; c++) {
                v[r * C + c] = _mm512_dpbf16_ps(v[r * C + c], (__m512bh)w0[c], x0);
                v[r * C + c] = _mm512_dpbf16_ps(v[r * C + c], (__m512bh)w1[c], x1);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float y = _mm512_reduce_add_ps(v[r * C + c]);
            if (a->xs) y = (y * a->ws[c0 + c]) * a->xs[r];  /* fp8 x fp8: W8A8's order */
            else if (a->late) y = y * a->ws[c0 + c];
            if (a->bias) y = y + a->bias[c0 + c];
            store(a->out, a->odt, r * a->n + c0 + c, y);
        }
}

AI void gemv_bf16_range(float_args *a, int R, int64_t n0, int64_t n1) {
    __m512 mags[8];
    table_magnitudes(a->kind, mags);
    bf16_table shared;
    uint16_t *panel = NULL;
    if (a->late) {
        shared = make_table(mags, 1.0f);
    } else if (!(panel = (uint16_t *)malloc((size_t)(4 * a->kb) * sizeof(uint16_t)))) {
        a->failed = 1;
        return;
    }
    const bf16_table *tab = a->late ? &shared : NULL;
    int64_t c = n0;
    for (; c + 4 <= n1; c += 4) gemv_bf16_columns(a, R, 4, c, tab, mags, panel);
    for (; c < n1; c++) gemv_bf16_columns(a, R, 1, c, tab, mags, panel);
    free(panel);
}
#endif

/* Where gemv_bf16_columns serves the call (module comment above: up to QK_MB rows; fp8 x fp8; int8 / e4m3
 * weights with bf16 activations; e4m3 weights with f32 activations), point `a` at the activations laid out
 * for it (`x`: codes or values, row stride `stride`); returns the buffer to free, or NULL: the other kernels run. */
static void *attach_bf16(float_args *a, const void *x, int codes, int64_t k, int64_t stride) {
#if QK_BF16DOT
    if (a->m > QK_MB || !(a->kind == QK_FP8_E4M3 || (a->kind == QK_INT8 && !codes))) return NULL;
    const int64_t kb = (a->kp + 63) / 64 * 64, cells = a->m * kb > 0 ? a->m * kb : 1;
    a->kb = kb;
    if (!codes && a->xdt == QK_F32) {
        float *xf = a->kind == QK_FP8_E4M3 ? (float *)malloc((size_t)cells * sizeof(float)) : NULL;
        if (xf) {
            f32_activations((const float *)x, a->m, k, stride, kb, xf);
            a->xf = xf;
            a->late = 1;
        }
        return xf;
    }
    a->late = codes || a->odt == QK_BF16;
    if (!codes) {
        if (a->xdt != QK_BF16) return NULL;
        for (int64_t c = 0; c < a->n && !a->late; c++)
            if (!(a->ws[c] >= QK_BF16_MIN_SCALE)) return NULL;  /* also NaN, and negative (the sign is the code's) */
    }
    uint16_t *xb = (uint16_t *)malloc((size_t)cells * sizeof(uint16_t));
    if (!xb || !bf16_activations(x, codes, a->m, k, stride, kb, xb)) { free(xb); return NULL; }
    a->xb = xb;
    return xb;
#else
    (void)a; (void)x; (void)codes; (void)k; (void)stride;
    return NULL;
#endif
}

/* FN(a, R, n0, n1) with R = a->m (1 .. QK_MB) a constant, so the always-inline GEMV kernels unroll by it */
#define QK_BY_ROWS(FN, a, n0, n1)                                                                            \
    do {                                                                                                     \
        if ((a)->m == 1) FN(a, 1, n0, n1);                                                                   \
        else if ((a)->m == 2) FN(a, 2, n0, n1);                                                              \
        else if ((a)->m == 3) FN(a, 3, n0, n1);                                                              \
        else FN(a, 4, n0, n1);                                                                               \
    } while (0)

static void float_range(const qk_task *t, int64_t n0, int64_t n1) {
    float_args *a = (float_args *)t->args;
#if QK_BF16DOT
    if (a->xb || a->xf) {
        QK_BY_ROWS(gemv_bf16_range, a, n0, n1);
        return;
    }
#endif
#if QK_AVX512
    if (a->m <= QK_MB) {
        QK_BY_ROWS(gemv_range, a, n0, n1);
        return;
    }
#endif
    float *panel = (float *)malloc(4 * QK_KC * sizeof(float));
    float *y = (float *)malloc(4 * QK_ROW_TILE * sizeof(float));
    if (!panel || !y) { a->failed = 1; free(panel); free(y); return; }
    for (int64_t i0 = 0; i0 < a->m; i0 += QK_ROW_TILE) {
        const int64_t i1 = i0 + QK_ROW_TILE < a->m ? i0 + QK_ROW_TILE : a->m;
        int64_t c = n0;
        for (; c + 4 <= n1; c += 4) float_columns(a, 4, i0, i1, c, panel, y);
        for (; c < n1; c++) float_columns(a, 1, i0, i1, c, panel, y);
    }
    free(panel);
    free(y);
}

static int32_t run_float(float_args *a, int32_t threads) {
    qk_task t = {float_range, a};
    parallel_n(&t, a->n, threads);
    return a->failed ? QK_ENOMEM : 0;
}

int32_t qk_matmul_fp8(const uint8_t *xq, const float *x_scale, int64_t m, int64_t kp, const uint8_t *w,
                      int64_t n, const float *w_scale, const float *bias, void *out, int32_t out_dtype,
                      int32_t threads) {
    if (!valid_dtype(out_dtype) || m < 0 || n < 0 || kp < 0) return QK_EINVAL;
    if (m == 0 || n == 0) return 0;
    float_args a = {.x = NULL, .xs = x_scale, .m = m, .kp = kp, .groups = 0, .gs = 0, .w = w, .kind = QK_FP8_E4M3,
                    .xdt = QK_F32, .ws = w_scale, .bias = bias, .wz = NULL, .n = n, .out = out, .odt = out_dtype,
                    .failed = 0};
    void *xb = attach_bf16(&a, xq, 1, kp, kp);
    float *xu = NULL;
    if (!xb) {  /* the other kernels read the codes' values as f32 */
        if (!(xu = (float *)malloc((size_t)(m * kp > 0 ? m * kp : 1) * sizeof(float)))) return QK_ENOMEM;
        for (int64_t j = 0; j < m * kp; j++) xu[j] = e4m3_f16scaled(xq[j]);
        a.x = xu;
    }
    const int32_t rc = run_float(&a, threads);
    free(xu);
    free(xb);
    return rc;
}

int64_t qk_linear_quantized(const void *x, int32_t x_dtype, int64_t m, int64_t k, int64_t kp,
                            const float *static_scale, const void *w, int32_t w_kind, int64_t n,
                            const float *w_scale, int64_t group_size, const float *bias, void *out,
                            int32_t out_dtype, int32_t threads) {
    const int fp8 = w_kind == QK_FP8_E4M3;
    if (m < 0 || kp < 0 || (fp8 && group_size != 0)) return QK_EINVAL;
    void *codes = malloc((size_t)(m * kp > 0 ? m * kp : 1));
    float *scales = (float *)malloc((size_t)(m > 0 ? m : 1) * sizeof(float));
    if (!codes || !scales) { free(codes); free(scales); return QK_ENOMEM; }
    int64_t rc = qk_quantize_rows(x, x_dtype, m, k, kp, fp8 ? QK_FP8_E4M3 : QK_INT8, static_scale, codes, scales);
    if (rc >= 0) {
        const int32_t r = fp8 ? qk_matmul_fp8((const uint8_t *)codes, scales, m, kp, (const uint8_t *)w, n, w_scale,
                                              bias, out, out_dtype, threads)
                              : qk_matmul_int((const int8_t *)codes, scales, m, kp, w, w_kind, n, w_scale,
                                              group_size, bias, out, out_dtype, threads);
        if (r < 0) rc = r;
    }
    free(codes);
    free(scales);
    return rc;
}

int32_t qk_linear_float(const void *x, int32_t x_dtype, int64_t m, int64_t k, int64_t kp, const void *w,
                        int32_t w_kind, int64_t n, const float *w_scale, const int8_t *w_zero, int64_t group_size,
                        const float *bias, void *out, int32_t out_dtype, int32_t threads) {
    const int grouped = w_kind == QK_INT4 || w_kind == QK_UINT4;
    if (!valid_dtype(x_dtype) || !valid_dtype(out_dtype) || m < 0 || n < 0 || k < 0 || kp < k) return QK_EINVAL;
    if (grouped ? !(valid_group(group_size) && kp % group_size == 0 && (w_kind == QK_INT4 || w_zero))
                : !((w_kind == QK_INT8 || w_kind == QK_FP8_E4M3) && group_size == 0))
        return QK_EINVAL;
    if (m == 0 || n == 0) return 0;
    float_args a = {.x = NULL, .xs = NULL, .m = m, .kp = kp, .groups = grouped ? kp / group_size : 0,
                    .gs = group_size, .w = w, .kind = w_kind, .xdt = x_dtype, .ws = w_scale, .bias = bias,
                    .wz = w_zero, .n = n, .out = out, .odt = out_dtype, .failed = 0};
    void *xb = attach_bf16(&a, x, 0, k, k);
    if (xb) {  /* gemv_bf16_columns reads its own layout of the activations */
        const int32_t rc = run_float(&a, threads);
        free(xb);
        return rc;
    }
    float *buf = (float *)malloc((size_t)(m * kp > 0 ? m * kp : 1) * sizeof(float));
    float *row = grouped ? (float *)malloc((size_t)(kp > 0 ? kp : 1) * sizeof(float)) : NULL;
    if (!buf || (grouped && !row)) { free(buf); free(row); return QK_ENOMEM; }
    for (int64_t i = 0; i < m; i++) {  /* f32, zero-padded to kp; int4: per K tile, even columns, then odd ones */
        float *dst = grouped ? row : buf + i * kp;
        load_row(x, x_dtype, i * k, k, dst);
        for (int64_t j = k; j < kp; j++) dst[j] = 0.0f;
        if (grouped)
            for (int64_t j0 = 0; j0 < kp; j0 += QK_KC) {
                const int64_t nb = (kp - j0 < QK_KC ? kp - j0 : QK_KC) / 2;
                for (int64_t t = 0; t < nb; t++) {
                    buf[i * kp + j0 + t] = row[j0 + 2 * t];
                    buf[i * kp + j0 + nb + t] = row[j0 + 2 * t + 1];
                }
            }
    }
    a.x = buf;
    const int32_t rc = run_float(&a, threads);
    free(buf);
    free(row);
    return rc;
}

int64_t qk_run_linear(const qk_linear_call *c, const void *x, int64_t m, void *out, int32_t threads) {
    if (c->entry == QK_CALL_LINEAR_FLOAT)
        return qk_linear_float(x, c->x_dtype, m, c->k, c->kp, c->w, c->w_kind, c->n, c->w_scale, c->w_zero,
                               c->group_size, c->bias, out, c->out_dtype, threads);
    if (c->entry == QK_CALL_LINEAR_QUANTIZED)
        return qk_linear_quantized(x, c->x_dtype, m, c->k, c->kp, NULL, c->w, c->w_kind, c->n, c->w_scale,
                                   c->group_size, c->bias, out, c->out_dtype, threads);
    return QK_EINVAL;
}
