/* Weight-only products for AVX-512 CPUs, reading pqctl's weights as the layers store them
 * (runtime/quant/packing.py's packed codes, or a 16-bit layer's dense weight): built at first use
 * by runtime/quant/native.py.
 *
 *   pq_int8_matmul  y[m, n] = s[n] * sum_k q[n, k] x[m, k]
 *                   int8 codes q [N, K], one bf16 scale s per output row
 *   pq_int4_matmul  y[m, n] = sum_k (q[n, k] s[n, g] + z[n, g] - 8 s[n, g]) x[m, k],  g = k / group
 *                   4-bit codes two to a byte (code 2j in the low nibble of byte j), a bf16 scale
 *                   s and zero z per group of `group` inputs
 *   pq_dense_matmul y[m, n] = sum_k w[n, k] x[m, k], w bf16 or fp32 [N, K]
 *   pq_dot_matmul   any of those weights against x rounded to bf16, in bf16 dot products
 *                   (avx512_bf16): exact products, fp32 sums, twice the multiply-adds an
 *                   instruction; what several activation rows take
 *   pq_int8_wide_matmul
 *                   int8 codes against x held as int16, a power-of-two scale per 512 inputs, in
 *                   exact integer products (avx512_vnni): what one to four rows take
 *   pq_stream_matmul
 *                   2-, 3- or 4-bit codes of packing's bit stream, fp16 or bf16 scales and zeros
 *                   per group, in bf16 dot products (avx512_bf16 and avx512_vbmi)
 *   pq_int8_dequantize_bf16, pq_int4_dequantize_bf16, pq_stream_dequantize_bf16
 *                   rows of those codes as the bf16 weight they stand for (a prefill's GEMM block)
 *   pq_rope_into_cache
 *                   a step's rotary embedding of queries and keys and its KV cache write, fp32
 *
 * x is fp32 [M, K] and y fp32 [M, N], both row-major; sums are fp32. The weight is read once per
 * 8 activation rows (a decode step's micro-batch), a few output rows at a time so that each
 * activation load serves several rows, with the next rows prefetched while these are summed
 * (one or two rows that fit in L1 read the weight as one sequential stream: ONE_ROW_STREAM).
 * Output rows are split across `threads` OpenMP threads: libgomp is loaded by torch under the
 * same soname, so the kernels run on torch's own thread pool. Grouped codes (2-4 bits) enter bf16
 * dot products as exact values c + q, and each group's sum is scaled at its end (int4_dot_block,
 * stream_dot_block): the weight is not rounded.
 */
#if !defined(__AVX512F__) || !defined(__AVX512BW__)
#error "pqctl's native kernels need AVX-512 (F and BW); torch's kernels serve other CPUs"
#endif

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

typedef int64_t i64;

#define MAX_ROWS 8   /* activation rows per pass over the weight */
#define MAX_BLOCK 4  /* output rows summed together */
#define ROW_BLOCK 16 /* output rows per unit of work handed to a thread */
#define K_CHUNK 2048 /* inputs a pass of dot_two_passes sums before the next pass */
#define TWO_PASSES_FROM 7 /* activation rows from which bf16 weights take dot_two_passes */
#define INLINE static inline __attribute__((always_inline))
#define UNROLL _Pragma("GCC unroll 8")

static inline float bf16_to_float(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as torch does */
    union { uint32_t u; float f; } v;
    v.f = f;
    return (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);
}

/* Sixteen fp32 values rounded to nearest even into bf16, in integer arithmetic (no avx512_bf16
 * needed): float_to_bf16 lane by lane. */
INLINE __m256i to_bf16(__m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16));
}

/* Group g of 4-bit row n as an fp32 multiplier and offset: w = q * sv + ov. */
INLINE void int4_group(const uint16_t *scale, const uint16_t *zero, i64 groups, i64 n, i64 g,
                       __m512 *sv, __m512 *ov) {
    float s = bf16_to_float(scale[n * groups + g]);
    *sv = _mm512_set1_ps(s);
    *ov = _mm512_set1_ps(bf16_to_float(zero[n * groups + g]) - 8.0f * s);
}

/* The 32 codes of the 16 bytes at src, dequantized in fp32 (as packing.affine_into computes
 * them): lo holds codes 0, 2, .., 30 and hi codes 1, 3, .., 31. */
INLINE void int4_dequantize32(const uint8_t *src, __m512 sv, __m512 ov, __m512 *lo, __m512 *hi) {
    const __m512i low4 = _mm512_set1_epi32(0xF);
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)src));
    *lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, low4)), sv, ov);
    *hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), sv, ov);
}

/* Rows [n0, n1): R at a time through `block_r`, then the rest one at a time through `block_1`. */
#define SPLIT_ROWS(block_r, block_1, R)                                                            \
    do {                                                                                           \
        i64 whole = n0 + (n1 - n0) / (R) * (R);                                                    \
        if (whole > n0) block_r;                                                                   \
        if (n1 > whole) { n0 = whole; block_1; }                                                   \
    } while (0)

/* Whether M activation rows of K entries of `size` bytes are read against one weight row at a
 * time: a sequential stream that the hardware prefetcher follows, with no software prefetches.
 * While the rows fit in L1 beside the stream (`limit` bytes), this read 5632 x 2048 and 2048 x
 * 2048 weights from memory in 0.7-0.9x the time of several weight rows prefetched into L1 on a
 * 2-core Zen 4 EPYC (one row of 16-bit, int8 or 4-bit codes; two of 16-bit); past 16 KiB (a down
 * projection's K = 5632 in fp32) the rows are re-read from L2 for every weight row and it took
 * 1.0-2.1x. Int8 codes, a quarter of the rows' bytes, stop at 8 KiB: one fp32 row of 4096 took
 * 1.3-1.5x. Bf16 weights never take it since rows_block prefetches into L2: against 2048-32000
 * x 2048 weights the blocks of rows ran at 1.02-1.09x the bytes a second of the stream with one
 * row and 1.16x with two (int8 and 4-bit codes: 0.97x, so they keep it). The sums, and so the
 * bits, are the same. */
#define ONE_ROW_STREAM(M, K, size, limit) ((M) <= 2 && (M) * (K) * (size) <= (limit))

/* Runs `rows(b_first_row, b_end_row)` over every block of ROW_BLOCK output rows, in parallel. */
#define FOR_ROW_BLOCKS(N, threads, rows)                                                           \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                              \
    for (i64 b = 0; b < ((N) + ROW_BLOCK - 1) / ROW_BLOCK; b++) {                                  \
        i64 b_first_row = b * ROW_BLOCK;                                                           \
        i64 b_end_row = b_first_row + ROW_BLOCK < (N) ? b_first_row + ROW_BLOCK : (N);             \
        rows;                                                                                      \
    }

/* Runs `rows` as FOR_ROW_BLOCKS does for every chunk of at most MAX_ROWS activation rows (one
 * pass over the weight each): the chunk starting at row m0 holds m of them. */
#define FOR_ROW_CHUNKS(M, N, threads, rows)                                                        \
    for (i64 m0 = 0; m0 < (M); m0 += MAX_ROWS) {                                                   \
        int m = (int)((M) - m0 < MAX_ROWS ? (M) - m0 : MAX_ROWS);                                  \
        FOR_ROW_BLOCKS(N, threads, rows)                                                           \
    }

/* ----------------------------------------------------------------- int8, bf16 and fp32 */

enum { INT8 = 1, BF16 = 2, FP32 = 4 }; /* weight kinds; the value is the bytes per weight */

/* Sixteen weights of row `row` from column k as fp32: int8 codes, bf16 values or fp32 ones. */
INLINE __m512 load16(const void *w, i64 K, i64 row, i64 k, const int KIND) {
    if (KIND == FP32) return _mm512_loadu_ps((const float *)w + row * K + k);
    if (KIND == BF16) {
        const uint16_t *src = (const uint16_t *)w + row * K + k;
        __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src));
        return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
    }
    const int8_t *src = (const int8_t *)w + row * K + k;
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)src)));
}

INLINE float load1(const void *w, i64 K, i64 row, i64 k, const int KIND) {
    if (KIND == FP32) return ((const float *)w)[row * K + k];
    if (KIND == BF16) return bf16_to_float(((const uint16_t *)w)[row * K + k]);
    return (float)((const int8_t *)w)[row * K + k];
}

/* Output rows [n0, n1) of a row-scaled int8 weight, or of an unscaled bf16 or fp32 one, for M
 * activation rows, R weight rows at a time. M, R and KIND are constants where this is inlined,
 * so the M x R accumulators live in registers. With R > 1 each line of the next R rows is
 * prefetched into L2 as the same line of these is read; R = 1 is ONE_ROW_STREAM's sequential
 * read. Into L2 rather than L1, 1-4 rows against 5632 x 2048 and 2048 x 5632 bf16 and int8
 * weights from memory ran at 1.13-1.29x the bytes a second (2-core Zen 4 EPYC). */
INLINE void rows_block(const float *x, i64 K, const void *w, const uint16_t *scale, float *y,
                       i64 N, i64 n0, i64 n1, const int M, const int R, const int KIND) {
    const i64 row_bytes = K * KIND, per_line = 64 / KIND; /* weights in a cache line */
    for (i64 n = n0; n < n1; n += R) {
        __m512 acc[MAX_BLOCK][MAX_ROWS];
        UNROLL for (int j = 0; j < R; j++)
            UNROLL for (int r = 0; r < M; r++) acc[j][r] = _mm512_setzero_ps();
        i64 k = 0;
        for (; k + 16 <= K; k += 16) {
            __m512 wv[MAX_BLOCK];
            UNROLL for (int j = 0; j < R; j++) {
                if (R > 1 && (k & (per_line - 1)) == 0) {
                    const char *line = (const char *)w + (n + j + R) * row_bytes + k * KIND;
                    _mm_prefetch(line, _MM_HINT_T1);
                }
                wv[j] = load16(w, K, n + j, k, KIND);
            }
            UNROLL for (int r = 0; r < M; r++) {
                __m512 xv = _mm512_loadu_ps(x + r * K + k);
                UNROLL for (int j = 0; j < R; j++) acc[j][r] = _mm512_fmadd_ps(wv[j], xv, acc[j][r]);
            }
        }
        UNROLL for (int j = 0; j < R; j++) {
            float s = KIND == INT8 ? bf16_to_float(scale[n + j]) : 1.0f;
            UNROLL for (int r = 0; r < M; r++) {
                float t = _mm512_reduce_add_ps(acc[j][r]);
                for (i64 kk = k; kk < K; kk++) t += load1(w, K, n + j, kk, KIND) * x[r * K + kk];
                y[r * N + n + j] = KIND == INT8 ? t * s : t;
            }
        }
    }
}

#define ROWS_CASE(M, R, KIND)                                                                      \
    case M:                                                                                        \
        if (KIND != BF16 && ONE_ROW_STREAM(M, K, 4, KIND == INT8 ? 8192 : 16384))                  \
            rows_block(x, K, w, scale, y, N, n0, n1, M, 1, KIND);                                  \
        else                                                                                       \
            SPLIT_ROWS(rows_block(x, K, w, scale, y, N, n0, whole, M, R, KIND),                    \
                       rows_block(x, K, w, scale, y, N, n0, n1, M, 1, KIND), R);                   \
        break

#define DEFINE_ROWS(name, KIND)                                                                    \
    static void name(const float *x, int m, i64 K, const void *w, const uint16_t *scale,           \
                     float *y, i64 N, i64 n0, i64 n1) {                                            \
        switch (m) {                                                                               \
            ROWS_CASE(1, 4, KIND); ROWS_CASE(2, 4, KIND); ROWS_CASE(3, 4, KIND);                   \
            ROWS_CASE(4, 3, KIND); ROWS_CASE(5, 2, KIND); ROWS_CASE(6, 2, KIND);                   \
            ROWS_CASE(7, 2, KIND); default: ROWS_CASE(8, 2, KIND);                                 \
        }                                                                                          \
    }

DEFINE_ROWS(int8_rows, INT8)
DEFINE_ROWS(bf16_rows, BF16)
DEFINE_ROWS(fp32_rows, FP32)

typedef void (*rows_fn)(const float *, int, i64, const void *, const uint16_t *, float *, i64,
                        i64, i64);

static void rows_matmul(rows_fn rows, const float *x, i64 M, i64 K, const void *w,
                        const uint16_t *scale, float *y, i64 N, int threads) {
    FOR_ROW_CHUNKS(M, N, threads,
                   rows(x + m0 * K, m, K, w, scale, y + m0 * N, N, b_first_row, b_end_row))
}

void pq_int8_matmul(const float *x, i64 M, i64 K, const int8_t *w, const uint16_t *scale,
                    float *y, i64 N, int threads) {
    rows_matmul(int8_rows, x, M, K, w, scale, y, N, threads);
}

/* y [M, N] = x [M, K] times a 16-bit layer's weight [N, K] (bf16, or fp32 with `fp32` set)
 * transposed, products and sums in fp32. */
void pq_dense_matmul(const float *x, i64 M, i64 K, const void *w, int fp32, float *y, i64 N,
                     int threads) {
    rows_matmul(fp32 ? fp32_rows : bf16_rows, x, M, K, w, NULL, y, N, threads);
}

/* ------------------------------------------------------------------------------------- int4 */

/* xp holds each block of 32 inputs as its 16 even then its 16 odd entries, so the low and high
 * nibbles of 16 code bytes meet their inputs lane by lane. Each group's codes are dequantized in
 * registers (q s + (z - 8 s), fp32, as packing.affine_into computes them) and multiplied by
 * every activation row. */
INLINE void int4_block(const float *xp, i64 K, const uint8_t *w, const uint16_t *scale,
                       const uint16_t *zero, i64 group, float *y, i64 N, i64 n0, i64 n1,
                       const int M, const int R) {
    const i64 groups = K / group, row_bytes = K / 2;
    for (i64 n = n0; n < n1; n += R) {
        __m512 acc[MAX_BLOCK][MAX_ROWS];
        UNROLL for (int j = 0; j < R; j++)
            UNROLL for (int r = 0; r < M; r++) acc[j][r] = _mm512_setzero_ps();
        for (i64 g = 0; g < groups; g++) {
            __m512 sv[MAX_BLOCK], ov[MAX_BLOCK];
            UNROLL for (int j = 0; j < R; j++) int4_group(scale, zero, groups, n + j, g, &sv[j], &ov[j]);
            for (i64 k = g * group; k < (g + 1) * group; k += 32) {
                __m512 lo[MAX_BLOCK], hi[MAX_BLOCK];
                UNROLL for (int j = 0; j < R; j++) {
                    const uint8_t *src = w + (n + j) * row_bytes + k / 2;
                    if (R > 1 && (k & 127) == 0) _mm_prefetch((const char *)(src + R * row_bytes), _MM_HINT_T0);
                    int4_dequantize32(src, sv[j], ov[j], &lo[j], &hi[j]);
                }
                UNROLL for (int r = 0; r < M; r++) {
                    __m512 xe = _mm512_loadu_ps(xp + r * K + k);
                    __m512 xo = _mm512_loadu_ps(xp + r * K + k + 16);
                    UNROLL for (int j = 0; j < R; j++) {
                        acc[j][r] = _mm512_fmadd_ps(lo[j], xe, acc[j][r]);
                        acc[j][r] = _mm512_fmadd_ps(hi[j], xo, acc[j][r]);
                    }
                }
            }
        }
        UNROLL for (int j = 0; j < R; j++)
            UNROLL for (int r = 0; r < M; r++) y[r * N + n + j] = _mm512_reduce_add_ps(acc[j][r]);
    }
}

#define INT4_CASE(M, R)                                                                            \
    case M:                                                                                        \
        SPLIT_ROWS(int4_block(xp, K, w, scale, zero, group, y, N, n0, whole, M, R),                \
                   int4_block(xp, K, w, scale, zero, group, y, N, n0, n1, M, 1), R);               \
        break

static void int4_rows(const float *xp, int m, i64 K, const uint8_t *w, const uint16_t *scale,
                      const uint16_t *zero, i64 group, float *y, i64 N, i64 n0, i64 n1) {
    switch (m) {
        INT4_CASE(1, 4); INT4_CASE(2, 4); INT4_CASE(3, 4); INT4_CASE(4, 3);
        INT4_CASE(5, 2); INT4_CASE(6, 2); INT4_CASE(7, 2); default: INT4_CASE(8, 2);
    }
}

#if defined(__AVX512BF16__)
/* The rows of x [M, K] rounded to bf16 into a new *xb [M, K]: in order, or with `block` each block
 * of `block` inputs as its even entries then its odd ones (the lanes the codes' low and high
 * nibbles meet). With xsum, also a new *xsum [M, K / group] of the rounded rows' group sums.
 * Rounded 16 at a time (to_bf16, the bits of float_to_bf16) and summed in 16 lanes: 8 rows of
 * 5632 against 16 rows of 4-bit codes took 30 us, 57 one input at a time (a Zen 4 EPYC), the
 * step's work outside the thread pool. Returns 0, or -1 with nothing allocated. */
static int rows_to_bf16(const float *x, i64 M, i64 K, int block, i64 group, uint16_t **xb,
                        float **xsum) {
    const i64 groups = xsum ? K / group : 0;
    *xb = malloc(sizeof(uint16_t) * (size_t)(M * K));
    float *sums = xsum ? malloc(sizeof(float) * (size_t)(M * groups)) : NULL;
    if (!*xb || (xsum && !sums)) {
        free(*xb);
        free(sums);
        return -1;
    }
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (i64 r = 0; r < M; r++) {
        const float *src = x + r * K;
        uint16_t *dst = *xb + r * K;
        i64 k = 0;
        if (block) /* K % block == 0: each 32 inputs give 16 even entries and 16 odd ones */
            for (; k < K; k += block)
                for (int h = 0; h < block / 32; h++) {
                    __m512 a = _mm512_loadu_ps(src + k + 32 * h);
                    __m512 b = _mm512_loadu_ps(src + k + 32 * h + 16);
                    _mm256_storeu_si256((__m256i *)(dst + k + 16 * h),
                                        to_bf16(_mm512_permutex2var_ps(a, even, b)));
                    _mm256_storeu_si256((__m256i *)(dst + k + block / 2 + 16 * h),
                                        to_bf16(_mm512_permutex2var_ps(a, odd, b)));
                }
        for (; k + 16 <= K; k += 16)
            _mm256_storeu_si256((__m256i *)(dst + k), to_bf16(_mm512_loadu_ps(src + k)));
        for (; k < K; k++) dst[k] = float_to_bf16(src[k]);
        for (i64 g = 0; g < groups; g++) { /* group % 32 == 0: 16 running sums, then theirs */
            __m512 t = _mm512_setzero_ps();
            for (i64 kk = g * group; kk < (g + 1) * group; kk += 16) {
                __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(dst + kk)));
                t = _mm512_add_ps(t, _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)));
            }
            sums[r * groups + g] = _mm512_reduce_add_ps(t);
        }
    }
    if (xsum) *xsum = sums;
    return 0;
}

/* Activation rows against 4-bit codes in bf16 dot products: each row rounded to bf16 (as torch's
 * int4 kernels round it), each code entered as the exact bf16 value 128 + q (its bits OR 0x4300,
 * one instruction), and pairs of products summed in fp32 by vdpbf16ps (32 multiply-adds an
 * instruction). xb [M, K] holds each row's blocks of 64 inputs as their 32 even then their 32 odd
 * entries; xsum [M, groups] the per-group sums of xb. Per group, y += s * dot + (z - 8 s - 128 s)
 * * xsum: the weight q s + z - 8 s unrounded, as packing.affine_into computes it in fp32. The
 * next R rows are prefetched into L2: at 2-3 rows 1.08-1.40x the bytes a second of prefetching
 * into L1, from 4 rows the same (0.99-1.00x). */
INLINE void int4_dot_block(const uint16_t *xb, const float *xsum, i64 K, const uint8_t *w,
                           const uint16_t *scale, const uint16_t *zero, i64 group, float *y,
                           i64 N, i64 n0, i64 n1, const int M, const int R) {
    const i64 groups = K / group, row_bytes = K / 2;
    const __m512i low4 = _mm512_set1_epi16(0xF), exponent = _mm512_set1_epi16(0x4300);
    for (i64 n = n0; n < n1; n += R) {
        __m512 total[MAX_BLOCK][MAX_ROWS];
        float offset[MAX_BLOCK][MAX_ROWS];
        UNROLL for (int j = 0; j < R; j++)
            UNROLL for (int r = 0; r < M; r++) total[j][r] = _mm512_setzero_ps(), offset[j][r] = 0.0f;
        for (i64 g = 0; g < groups; g++) {
            __m512 acc[MAX_BLOCK][MAX_ROWS];
            UNROLL for (int j = 0; j < R; j++)
                UNROLL for (int r = 0; r < M; r++) acc[j][r] = _mm512_setzero_ps();
            for (i64 k = g * group; k < (g + 1) * group; k += 64) {
                __m512bh lo[MAX_BLOCK], hi[MAX_BLOCK];
                UNROLL for (int j = 0; j < R; j++) {
                    const uint8_t *src = w + (n + j) * row_bytes + k / 2;
                    if (R > 1 && (k & 127) == 0) _mm_prefetch((const char *)(src + R * row_bytes), _MM_HINT_T1);
                    __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)src));
                    lo[j] = (__m512bh)_mm512_ternarylogic_epi32(b, low4, exponent, 0xEA);
                    hi[j] = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(b, 4), exponent);
                }
                UNROLL for (int r = 0; r < M; r++) {
                    __m512bh xe = (__m512bh)_mm512_loadu_si512(xb + r * K + k);
                    __m512bh xo = (__m512bh)_mm512_loadu_si512(xb + r * K + k + 32);
                    UNROLL for (int j = 0; j < R; j++) {
                        acc[j][r] = _mm512_dpbf16_ps(acc[j][r], lo[j], xe);
                        acc[j][r] = _mm512_dpbf16_ps(acc[j][r], hi[j], xo);
                    }
                }
            }
            UNROLL for (int j = 0; j < R; j++) {
                float s = bf16_to_float(scale[(n + j) * groups + g]);
                float o = bf16_to_float(zero[(n + j) * groups + g]) - 136.0f * s;
                __m512 sv = _mm512_set1_ps(s);
                UNROLL for (int r = 0; r < M; r++) {
                    total[j][r] = _mm512_fmadd_ps(acc[j][r], sv, total[j][r]);
                    offset[j][r] += o * xsum[r * groups + g];
                }
            }
        }
        UNROLL for (int j = 0; j < R; j++)
            UNROLL for (int r = 0; r < M; r++)
                y[r * N + n + j] = _mm512_reduce_add_ps(total[j][r]) + offset[j][r];
    }
}

#define INT4_DOT_CASE(M, R)                                                                        \
    case M:                                                                                        \
        if (M == 1 && ONE_ROW_STREAM(M, K, 2, 16384)) /* two rows: no faster for 4-bit codes */    \
            int4_dot_block(xb, xsum, K, w, scale, zero, group, y, N, n0, n1, M, 1);                \
        else                                                                                       \
            SPLIT_ROWS(int4_dot_block(xb, xsum, K, w, scale, zero, group, y, N, n0, whole, M, R),  \
                       int4_dot_block(xb, xsum, K, w, scale, zero, group, y, N, n0, n1, M, 1), R); \
        break

static void int4_dot_rows(const uint16_t *xb, const float *xsum, int m, i64 K, const uint8_t *w,
                          const uint16_t *scale, const uint16_t *zero, i64 group, float *y,
                          i64 N, i64 n0, i64 n1) {
    if (m > 5) { /* two passes over the block, the second from cache: fewer registers a pass */
        int4_dot_rows(xb, xsum, 4, K, w, scale, zero, group, y, N, n0, n1);
        int4_dot_rows(xb + 4 * K, xsum + 4 * (K / group), m - 4, K, w, scale, zero, group,
                      y + 4 * N, N, n0, n1);
        return;
    }
    switch (m) {
        INT4_DOT_CASE(1, 4); INT4_DOT_CASE(2, 4); INT4_DOT_CASE(3, 3); INT4_DOT_CASE(4, 2);
        default: INT4_DOT_CASE(5, 2);
    }
}

/* The rows of x rounded to bf16 in int4_dot_block's layout, with their per-group sums, and the
 * product; group % 64 == 0. Returns 0, or -1 when the scratch cannot be allocated. */
static int int4_dot_matmul(const float *x, i64 M, i64 K, const uint8_t *w, const uint16_t *scale,
                           const uint16_t *zero, i64 group, float *y, i64 N, int threads) {
    const i64 groups = K / group;
    uint16_t *xb;
    float *xsum;
    if (rows_to_bf16(x, M, K, 64, group, &xb, &xsum)) return -1;
    FOR_ROW_CHUNKS(M, N, threads,
                   int4_dot_rows(xb + m0 * K, xsum + m0 * groups, m, K, w, scale, zero, group,
                                 y + m0 * N, N, b_first_row, b_end_row))
    free(xb);
    free(xsum);
    return 0;
}
#endif

#if defined(__AVX512BF16__)
/* ------------------------------------------------ several rows in bf16 dot products */

enum { INT4 = 8 }; /* 4-bit codes (two a byte) beside INT8 and BF16 */

/* Thirty-two weights of row `row` from column k as bf16, in the order of the activations' layout:
 * bf16 weights as stored; int8 codes exactly (|q| <= 128 is a bf16 value), scaled after the sum;
 * 4-bit codes dequantized in fp32 (q s + (z - 8 s), as packing.affine_into computes them) and
 * rounded once, the bf16 weight packing.dequantize gives, even codes first then odd ones. */
INLINE __m512bh load32_bh(const void *w, i64 K, i64 row, i64 k, __m512 sv, __m512 ov,
                          const int KIND) {
    if (KIND == BF16) return (__m512bh)_mm512_loadu_si512((const uint16_t *)w + row * K + k);
    if (KIND == INT8) {
        const int8_t *src = (const int8_t *)w + row * K + k;
        __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)src)));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(src + 16))));
        return _mm512_cvtne2ps_pbh(hi, lo);
    }
    __m512 lo, hi;
    int4_dequantize32((const uint8_t *)w + row * (K / 2) + k / 2, sv, ov, &lo, &hi);
    return _mm512_cvtne2ps_pbh(hi, lo);
}

/* One output of the dot form: the 16 lanes of `acc` (inputs [0, done) of activation row xr
 * against weight row `row`) summed, the inputs from `done` added one by one, an int8 row's scale
 * applied. */
INLINE float dot_total(__m512 acc, const uint16_t *xr, i64 K, i64 done, const void *w,
                       const uint16_t *scale, i64 row, const int KIND) {
    float t = _mm512_reduce_add_ps(acc);
    for (i64 kk = done; kk < K; kk++) t += load1(w, K, row, kk, KIND) * bf16_to_float(xr[kk]);
    return KIND == INT8 ? t * bf16_to_float(scale[row]) : t;
}

/* Output rows [n0, n1) for M activation rows held as bf16 in xb [M, K] (for 4-bit codes each
 * block of 32 inputs as its 16 even then its 16 odd entries), R weight rows at a time: each
 * vdpbf16ps sums 32 exact products into 16 fp32 lanes. K % 32 inputs of bf16 and int8 rows
 * are summed one by one; 4-bit groups fill whole blocks of 32. Each line of the next R rows is
 * prefetched into L2 only, where it does not evict the activation rows from L1 (8 rows of 2048
 * bf16 fill it): at 8 rows 0.85-0.91x the time for bf16 weights from memory, 0.78-0.86x for
 * int8, at 6 rows 0.77-0.98x, int8 at 4 rows 0.72-0.94x, against prefetching into L1 (2-core
 * Zen 4 EPYC). */
INLINE void dot_block(const uint16_t *xb, i64 K, const void *w, const uint16_t *scale,
                      const uint16_t *zero, i64 group, float *y, i64 N, i64 n0, i64 n1,
                      const int M, const int R, const int KIND) {
    const i64 line = KIND == INT4 ? 128 : 64 / KIND; /* weights in a cache line */
    const i64 row_bytes = KIND == INT4 ? K / 2 : K * KIND, groups = KIND == INT4 ? K / group : 1;
    for (i64 n = n0; n < n1; n += R) {
        __m512 acc[MAX_BLOCK][MAX_ROWS], sv[MAX_BLOCK], ov[MAX_BLOCK];
        UNROLL for (int j = 0; j < R; j++) {
            sv[j] = ov[j] = _mm512_setzero_ps();
            UNROLL for (int r = 0; r < M; r++) acc[j][r] = _mm512_setzero_ps();
        }
        i64 k = 0;
        for (; k + 32 <= K; k += 32) {
            __m512bh wv[MAX_BLOCK];
            UNROLL for (int j = 0; j < R; j++) {
                if (R > 1 && (k & (line - 1)) == 0) {
                    const char *next = (const char *)w + (n + j + R) * row_bytes;
                    _mm_prefetch(next + (KIND == INT4 ? k / 2 : k * KIND), _MM_HINT_T1);
                }
                if (KIND == INT4 && k % group == 0)
                    int4_group(scale, zero, groups, n + j, k / group, &sv[j], &ov[j]);
                wv[j] = load32_bh(w, K, n + j, k, sv[j], ov[j], KIND);
            }
            UNROLL for (int r = 0; r < M; r++) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + r * K + k);
                UNROLL for (int j = 0; j < R; j++) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], wv[j], xv);
            }
        }
        UNROLL for (int j = 0; j < R; j++)
            UNROLL for (int r = 0; r < M; r++)
                y[r * N + n + j] = dot_total(acc[j][r], xb + r * K, K, k, w, scale, n + j, KIND);
    }
}

/* dot_block's sums over inputs [k0, k1) for M (at most 4) activation rows and R weight rows from
 * row n, continuing the accumulators in `held`. */
INLINE void dot_pass(const uint16_t *xb, i64 K, const void *w, i64 n, i64 k0, i64 k1,
                     __m512 held[MAX_BLOCK][4], const int M, const int R, const int KIND) {
    const i64 line = 64 / KIND, row_bytes = K * KIND;
    const __m512 none = _mm512_setzero_ps();
    __m512 acc[MAX_BLOCK][4];
    UNROLL for (int j = 0; j < R; j++)
        UNROLL for (int r = 0; r < M; r++) acc[j][r] = held[j][r];
    for (i64 k = k0; k < k1; k += 32) {
        __m512bh wv[MAX_BLOCK];
        UNROLL for (int j = 0; j < R; j++) {
            if ((k & (line - 1)) == 0)
                _mm_prefetch((const char *)w + (n + j + R) * row_bytes + k * KIND, _MM_HINT_T1);
            wv[j] = load32_bh(w, K, n + j, k, none, none, KIND);
        }
        UNROLL for (int r = 0; r < M; r++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + r * K + k);
            UNROLL for (int j = 0; j < R; j++) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], wv[j], xv);
        }
    }
    UNROLL for (int j = 0; j < R; j++)
        UNROLL for (int r = 0; r < M; r++) held[j][r] = acc[j][r];
}

/* dot_block for 5-8 activation rows (bf16 weights from TWO_PASSES_FROM rows): each R weight
 * rows met by the first 4 activation rows and then by the rest, K_CHUNK inputs at a time, so that
 * the 4 rows' chunk and the weight rows' (7 x 2048 bf16 inputs, 28 KiB) stay in L1 and the
 * second pass reads the weights from there, not from memory. All 8 rows in one pass fill L1 with
 * 32 KiB of activations alone: their loads go to L2 and the weights' reads from memory stop
 * overlapping the products (one thread read 5632 x 2048 bf16 weights at 14 GB/s, 58 G
 * multiply-adds a second, where the products alone, in cache, ran at 97 G and 4 rows read
 * 18.5 GB/s). Against 5632 x 2048 and 2048 x 5632 bf16 weights in huge pages from memory on a
 * 2-core Zen 4 EPYC, two threads: 1.11-1.28x and 0.98-1.12x the bytes a second of one pass at 8
 * rows (up to 92 % of the machine's bandwidth probe), 1.13-1.23x against Llama-7B's shapes,
 * 1.11x at 7 rows; 0.96x and 1.03x at 5 and 6 rows, which keep one pass. Int8 codes keep one
 * pass: their conversion to bf16 sets their pace at 8 rows, and two passes took 0.77-0.87x (each
 * converting) or 0.65-0.94x (the first keeping its bf16 weights in an L1 buffer for the second).
 * Each lane adds the same products in the same order as dot_block's, so the bits are the same. */
INLINE void dot_two_passes(const uint16_t *xb, i64 K, const void *w, const uint16_t *scale,
                           float *y, i64 N, i64 n0, i64 n1, const int M, const int R,
                           const int KIND) {
    const i64 whole = K / 32 * 32;
    for (i64 n = n0; n < n1; n += R) {
        __m512 held[2][MAX_BLOCK][4];
        UNROLL for (int j = 0; j < R; j++)
            UNROLL for (int r = 0; r < 4; r++) held[0][j][r] = held[1][j][r] = _mm512_setzero_ps();
        for (i64 k0 = 0; k0 < whole; k0 += K_CHUNK) {
            const i64 k1 = k0 + K_CHUNK < whole ? k0 + K_CHUNK : whole;
            dot_pass(xb, K, w, n, k0, k1, held[0], 4, R, KIND);
            dot_pass(xb + 4 * K, K, w, n, k0, k1, held[1], M - 4, R, KIND);
        }
        UNROLL for (int j = 0; j < R; j++)
            UNROLL for (int r = 0; r < M; r++)
                y[r * N + n + j] =
                    dot_total(held[r / 4][j][r % 4], xb + r * K, K, whole, w, scale, n + j, KIND);
    }
}

#define DOT_CASE(M, R, KIND)                                                                       \
    case M:                                                                                        \
        if (KIND == BF16 && M >= TWO_PASSES_FROM)                                                  \
            SPLIT_ROWS(dot_two_passes(xb, K, w, scale, y, N, n0, whole, M, R, KIND),               \
                       dot_block(xb, K, w, scale, zero, group, y, N, n0, n1, M, 1, KIND), R);      \
        else                                                                                       \
            SPLIT_ROWS(dot_block(xb, K, w, scale, zero, group, y, N, n0, whole, M, R, KIND),       \
                       dot_block(xb, K, w, scale, zero, group, y, N, n0, n1, M, 1, KIND), R);      \
        break

/* Up to 24 accumulators (M x R) beside the R weight vectors and one activation vector: each
 * activation load serves R rows. From 5 rows, R = 4 or 3 rather than 3 or 2 took 0.85-0.95x the
 * time for 5632 x 2048 and 2048 x 5632 weights from memory on a 2-core Zen 4 EPYC (bf16 and int8
 * codes; int8 at 7-8 rows of 2048 x 2048, 0.98-1.07x); the sums, and so the bits, are the same.
 * Bf16 weights take 7-8 rows in two passes (dot_two_passes). */
#define DEFINE_DOT_ROWS(name, KIND)                                                                \
    static void name(const uint16_t *xb, int m, i64 K, const void *w, const uint16_t *scale,       \
                     const uint16_t *zero, i64 group, float *y, i64 N, i64 n0, i64 n1) {           \
        switch (m) {                                                                               \
            DOT_CASE(1, 4, KIND); DOT_CASE(2, 4, KIND); DOT_CASE(3, 4, KIND);                      \
            DOT_CASE(4, 4, KIND); DOT_CASE(5, 4, KIND); DOT_CASE(6, 4, KIND);                      \
            DOT_CASE(7, 3, KIND); default: DOT_CASE(8, 3, KIND);                                   \
        }                                                                                          \
    }

DEFINE_DOT_ROWS(int8_dot_rows, INT8)
DEFINE_DOT_ROWS(bf16_dot_rows, BF16)
DEFINE_DOT_ROWS(int4_dequantized_dot_rows, INT4)

/* y [M, N] = x [M, K], rounded to bf16, times the weight of `kind` transposed, products exact
 * and sums in fp32: 1, int8 codes with row scales; 2, bf16; 8, 4-bit codes in groups (K % group
 * == 0, group % 32 == 0), groups of a multiple of 64 through int4_dot_block (the weight
 * unrounded), others dequantized to packing.dequantize's bf16 weight. Returns 0, -1 when the bf16
 * copy of x cannot be allocated, -2 for an unknown kind. */
int pq_dot_matmul(int kind, const float *x, i64 M, i64 K, const void *w, const uint16_t *scale,
                  const uint16_t *zero, i64 group, float *y, i64 N, int threads) {
    typedef void (*dot_fn)(const uint16_t *, int, i64, const void *, const uint16_t *,
                           const uint16_t *, i64, float *, i64, i64, i64);
    dot_fn rows = kind == INT8 ? int8_dot_rows : kind == BF16 ? bf16_dot_rows
                : kind == INT4 ? int4_dequantized_dot_rows : NULL;
    if (kind == INT4 && group % 64 == 0) /* codes as 128 + q: no dequantization */
        return int4_dot_matmul(x, M, K, w, scale, zero, group, y, N, threads);
    if (!rows) return -2;
    uint16_t *xb;
    if (rows_to_bf16(x, M, K, kind == INT4 ? 32 : 0, 0, &xb, NULL)) return -1;
    FOR_ROW_CHUNKS(M, N, threads,
                   rows(xb + m0 * K, m, K, w, scale, zero, group, y + m0 * N, N, b_first_row,
                        b_end_row))
    free(xb);
    return 0;
}
#endif

#if defined(__AVX512VNNI__)
/* ------------------------------------------- int8 codes against rows held as int16 (VNNI) */

#define WIDE_BLOCK 512 /* inputs of an activation row that share one power-of-two scale */
#define WIDE_BLOCKS(K) (((K) + WIDE_BLOCK - 1) / WIDE_BLOCK) /* the last one may be partial */

/* The rows of x [M, K] as int16 in a new *xq [M, K], with a new *xs [M, blocks] of the
 * power-of-two scale of each WIDE_BLOCK inputs: a block whose largest |x| is f 2^e (f in [0.5,
 * 1)) holds x 2^(15 - e) rounded to the nearest integer (ties to even; 2^15 itself saturates to
 * 32767) and its scale is 2^(e - 15); an all-zero block holds zeros, scale 1. Returns 0; 1 when an input is not finite, -1 when the memory cannot be
 * allocated (nothing allocated either way). */
static int rows_to_int16(const float *x, i64 M, i64 K, int16_t **xq, float **xs) {
    const i64 blocks = WIDE_BLOCKS(K);
    *xq = malloc(sizeof(int16_t) * (size_t)(M * K));
    *xs = malloc(sizeof(float) * (size_t)(M * blocks));
    if (!*xq || !*xs) {
        free(*xq);
        free(*xs);
        return -1;
    }
    for (i64 r = 0; r < M; r++) {
        const float *src = x + r * K;
        int16_t *dst = *xq + r * K;
        for (i64 b = 0; b < blocks; b++) {
            const i64 k0 = b * WIDE_BLOCK, k1 = k0 + WIDE_BLOCK < K ? k0 + WIDE_BLOCK : K;
            __m512 top = _mm512_setzero_ps();
            __mmask16 bad = 0;
            for (i64 k = k0; k < k1; k += 16) {
                __mmask16 in = k1 - k >= 16 ? 0xFFFF : (__mmask16)((1u << (k1 - k)) - 1);
                __m512 v = _mm512_maskz_loadu_ps(in, src + k);
                bad |= _mm512_fpclass_ps_mask(v, 0x99); /* NaN or infinity */
                top = _mm512_max_ps(top, _mm512_abs_ps(v));
            }
            if (bad) {
                free(*xq);
                free(*xs);
                return 1;
            }
            const __m128 largest = _mm_set_ss(_mm512_reduce_max_ps(top));
            /* e - 1 = floor(log2 largest), subnormals included */
            const float e = _mm_cvtss_f32(largest) > 0.0f
                                ? _mm_cvtss_f32(_mm_getexp_ss(largest, largest)) + 1.0f
                                : 15.0f;
            const __m512 up = _mm512_set1_ps(15.0f - e);
            const __m128 down = _mm_scalef_ss(_mm_set_ss(1.0f), _mm_set_ss(e - 15.0f));
            (*xs)[r * blocks + b] = _mm_cvtss_f32(down);
            for (i64 k = k0; k < k1; k += 16) {
                __mmask16 in = k1 - k >= 16 ? 0xFFFF : (__mmask16)((1u << (k1 - k)) - 1);
                __m512 v = _mm512_scalef_ps(_mm512_maskz_loadu_ps(in, src + k), up);
                const __m256i held = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(v)); /* saturating */
                _mm256_mask_storeu_epi16(dst + k, in, held);
            }
        }
    }
    return 0;
}

/* *sum += the pairwise products of a and b (vpdpwssd) in place: GCC's intrinsic left every sum
 * copied to another register and back around each instruction. */
INLINE void dpwssd(__m512i *sum, __m512i a, __m512i b) {
    __asm__("vpdpwssd %2, %1, %0" : "+v"(*sum) : "v"(a), "v"(b));
}

/* 32 inputs from k of R weight rows from n against M int16 rows, into the int32 sums. */
INLINE void wide_chunk(const int16_t *xq, const int8_t *w, i64 K, i64 n, i64 k,
                       __m512i sum[MAX_BLOCK][MAX_ROWS], const int M, const int R) {
    __m512i wv[MAX_BLOCK];
    UNROLL for (int j = 0; j < R; j++) {
        const int8_t *row = w + (n + j) * K;
        if (R > 1 && (k & 63) == 0) _mm_prefetch((const char *)(row + R * K + k), _MM_HINT_T1);
        wv[j] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(row + k)));
    }
    UNROLL for (int r = 0; r < M; r++) {
        const __m512i xv = _mm512_loadu_si512(xq + r * K + k);
        UNROLL for (int j = 0; j < R; j++) dpwssd(&sum[j][r], wv[j], xv);
    }
}

/* Output rows [n0, n1) of int8 codes for M rows of int16 activations (rows_to_int16), R weight rows
 * at a time: vpdpwssd sums 32 exact products into 16 int32 lanes, and each WIDE_BLOCK inputs'
 * lanes (at most 32 products of |q| <= 128 and |x| <= 2^15: no overflow) are converted and
 * scaled into fp32 sums. The codes need one widening where the bf16 form converts them twice and
 * rounds; the rows keep 15 bits where bf16 keeps 8. */
INLINE void wide_block(const int16_t *xq, const float *xs, i64 K, const int8_t *w,
                       const uint16_t *scale, float *y, i64 N, i64 n0, i64 n1, const int M,
                       const int R) {
    const i64 blocks = WIDE_BLOCKS(K);
    for (i64 n = n0; n < n1; n += R) {
        /* fp32 sums in memory, touched once a block: the registers hold the int32 ones */
        float acc[MAX_BLOCK][MAX_ROWS][16] __attribute__((aligned(64)));
        UNROLL for (int j = 0; j < R; j++)
            UNROLL for (int r = 0; r < M; r++) _mm512_store_ps(acc[j][r], _mm512_setzero_ps());
        for (i64 b = 0; b < blocks; b++) {
            const i64 k0 = b * WIDE_BLOCK, k1 = k0 + WIDE_BLOCK < K ? k0 + WIDE_BLOCK : K;
            __m512i sum[MAX_BLOCK][MAX_ROWS];
            UNROLL for (int j = 0; j < R; j++)
                UNROLL for (int r = 0; r < M; r++) sum[j][r] = _mm512_setzero_si512();
            for (i64 k = k0; k + 32 <= k1; k += 32) wide_chunk(xq, w, K, n, k, sum, M, R);
            UNROLL for (int r = 0; r < M; r++) {
                const __m512 s = _mm512_set1_ps(xs[r * blocks + b]);
                UNROLL for (int j = 0; j < R; j++) {
                    const __m512 t = _mm512_cvtepi32_ps(sum[j][r]);
                    _mm512_store_ps(acc[j][r], _mm512_fmadd_ps(t, s, _mm512_load_ps(acc[j][r])));
                }
            }
        }
        UNROLL for (int j = 0; j < R; j++) {
            const float s = bf16_to_float(scale[n + j]);
            UNROLL for (int r = 0; r < M; r++) {
                int32_t tail = 0; /* the row's last K % 32 inputs, in the last block */
                for (i64 k = K / 32 * 32; k < K; k++) tail += w[(n + j) * K + k] * xq[r * K + k];
                const float last = (float)tail * xs[r * blocks + blocks - 1];
                y[r * N + n + j] = (_mm512_reduce_add_ps(_mm512_load_ps(acc[j][r])) + last) * s;
            }
        }
    }
}

#define WIDE_CASE(M, R)                                                                            \
    case M:                                                                                        \
        SPLIT_ROWS(wide_block(xq, xs, K, w, scale, y, N, n0, whole, M, R),                         \
                   wide_block(xq, xs, K, w, scale, y, N, n0, n1, M, 1), R);                        \
        break

/* From 5 rows, 2 weight rows at a time: with 3 (24 int32 sums) 8 rows took 1.1-1.4x the time in
 * cache on a Zen 4. There the int16 form serves 1-4 rows (DOT_FROM_ROWS in native.py): from
 * memory, 4 rows read 1.03-1.26x the bytes a second of the bf16 dot form, 6-8 rows 1.04-1.21x
 * against 5632 x 2048 weights but 0.71-0.94x against 2048 x 5632, whose 8 int16 rows (90 KiB) are
 * re-read from L2 for every 2 weight rows where the dot form reads its rows for every 3. CPUs with
 * avx512_vnni and no avx512_bf16 take it at every size. */
static void int8_wide_rows(const int16_t *xq, const float *xs, int m, i64 K, const int8_t *w,
                           const uint16_t *scale, float *y, i64 N, i64 n0, i64 n1) {
    switch (m) {
        WIDE_CASE(1, 4); WIDE_CASE(2, 4); WIDE_CASE(3, 4); WIDE_CASE(4, 4);
        WIDE_CASE(5, 2); WIDE_CASE(6, 2); WIDE_CASE(7, 2); default: WIDE_CASE(8, 2);
    }
}
#endif

/* y [M, N] = x [M, K] times int8 codes [N, K] with bf16 row scales, transposed, the rows held as
 * int16 with a power-of-two scale per WIDE_BLOCK inputs (rows_to_int16; avx512_vnni): exact
 * integer products and sums within a block, fp32 across blocks. Returns 0; 1 when x holds a value
 * that is not finite or the CPU lacks avx512_vnni (nothing computed: the caller takes another
 * form); -1 when the int16 copy of x cannot be allocated. */
int pq_int8_wide_matmul(const float *x, i64 M, i64 K, const int8_t *w, const uint16_t *scale,
                        float *y, i64 N, int threads) {
#if defined(__AVX512VNNI__)
    int16_t *xq;
    float *xs;
    int status = rows_to_int16(x, M, K, &xq, &xs);
    if (status) return status;
    const i64 blocks = WIDE_BLOCKS(K);
    FOR_ROW_CHUNKS(M, N, threads,
                   int8_wide_rows(xq + m0 * K, xs + m0 * blocks, m, K, w, scale, y + m0 * N, N,
                                  b_first_row, b_end_row))
    free(xq);
    free(xs);
    return 0;
#else
    (void)x, (void)M, (void)K, (void)w, (void)scale, (void)y, (void)N, (void)threads;
    return 1;
#endif
}

/* Whether this build has pq_int8_wide_matmul's form (a CPU with avx512_vnni). */
int pq_has_int8_wide(void) {
#if defined(__AVX512VNNI__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
/* --------------------------------------- 2-, 3- and 4-bit codes of packing's bit stream */

/* How a block of 32 `bits`-bit codes (4 * bits bytes of the row's little-endian bit stream)
 * becomes 32 bf16 values 2^bits + q: word i gets two bytes of the block, loaded from one byte
 * before it, chosen so that code i starts at or above bit t = 7 - bits of the word (the byte
 * holding its first bit, or the one before when it starts below t there); one shift right puts
 * the code at bits t..6, the top of the bf16 mantissa, then it is masked and given the exponent
 * of 2^bits. (A smaller constant than int4's 128 + q: less fp32 cancellation when the constant's
 * share is taken off the sum.) */
typedef struct {
    __m512i index, shift, mask, exponent;
    __mmask64 bytes;
    int bits, fp16; /* fp16: scales and zeros are fp16, else bf16 */
} stream_codes;

static stream_codes stream_codes_for(int bits, int fp16) {
    uint8_t index[64];
    uint16_t shift[32];
    const int top = 7 - bits;
    for (int i = 0; i < 32; i++) {
        int bit = bits * i, offset = bit % 8, before = offset < top;
        int first = bit / 8 + 1 - before; /* in the load from one byte before the block */
        index[2 * i] = (uint8_t)first;
        index[2 * i + 1] = (uint8_t)(first + 1); /* past the block: a zero byte of the load */
        shift[i] = (uint16_t)(offset + 8 * before - top);
    }
    stream_codes u;
    u.index = _mm512_loadu_si512(index);
    u.shift = _mm512_loadu_si512(shift);
    u.mask = _mm512_set1_epi16((short)(((1 << bits) - 1) << top));
    u.exponent = _mm512_set1_epi16((short)((127 + bits) << 7));
    u.bytes = (__mmask64)(((1ULL << (4 * bits)) - 1) << 1); /* not the byte before the block */
    u.bits = bits;
    u.fp16 = fp16;
    return u;
}

/* A group's scale or zero as fp32 (exact from either 16-bit type). */
INLINE float stream_param(const stream_codes *u, uint16_t h) {
    return u->fp16 ? _cvtsh_ss(h) : bf16_to_float(h);
}

/* The 32 codes at src as the exact bf16 values 2^bits + q, in order. The masked load reads only
 * the block's own bytes (a masked-off byte is never touched, so src - 1 may lie before the row). */
INLINE __m512bh stream_codes32(const uint8_t *src, const stream_codes *u) {
    __m512i v = u->bits <= 3 /* 13 bytes at most: one 16-byte load, rarely across two lines */
        ? _mm512_zextsi128_si512(_mm_maskz_loadu_epi8((__mmask16)u->bytes, src - 1))
        : _mm512_zextsi256_si512(_mm256_maskz_loadu_epi8((__mmask32)u->bytes, src - 1));
    v = _mm512_srlv_epi16(_mm512_permutexvar_epi8(u->index, v), u->shift);
    return (__m512bh)_mm512_ternarylogic_epi32(v, u->mask, u->exponent, 0xEA);
}

/* Output rows [n0, n1) for M activation rows, in int4_dot_block's way (one block for both, the
 * codes' unpacking a parameter, measured 12-20 % slower for 4-bit codes at 4-8 rows with GCC 12,
 * so the two stay apart): xb [M, K] the rows in bf16 in their own order, xsum [M, groups] their
 * group sums; per group y += s * dot + (z - 2^(bits-1) s - 2^bits s) * xsum, the weight
 * (q - 2^(bits-1)) s + z unrounded. */
INLINE void stream_dot_block(const uint16_t *xb, const float *xsum, i64 K, const uint8_t *w,
                             const uint16_t *scale, const uint16_t *zero, i64 group,
                             const stream_codes *u, float *y, i64 N, i64 n0, i64 n1, const int M,
                             const int R) {
    const i64 groups = K / group, row_bytes = K * u->bits / 8, block_bytes = 4 * u->bits;
    const float middle = (float)(3 << (u->bits - 1)); /* 2^bits + 2^(bits-1) */
    for (i64 n = n0; n < n1; n += R) {
        __m512 total[MAX_BLOCK][MAX_ROWS];
        float offset[MAX_BLOCK][MAX_ROWS];
        UNROLL for (int j = 0; j < R; j++)
            UNROLL for (int r = 0; r < M; r++) total[j][r] = _mm512_setzero_ps(), offset[j][r] = 0.0f;
        for (i64 g = 0; g < groups; g++) {
            __m512 acc[MAX_BLOCK][MAX_ROWS];
            UNROLL for (int j = 0; j < R; j++)
                UNROLL for (int r = 0; r < M; r++) acc[j][r] = _mm512_setzero_ps();
            for (i64 k = g * group; k < (g + 1) * group; k += 32) {
                __m512bh wv[MAX_BLOCK];
                UNROLL for (int j = 0; j < R; j++) {
                    const uint8_t *src = w + (n + j) * row_bytes + k / 32 * block_bytes;
                    if ((k & 127) == 0) /* 128 codes: at most 64 bytes, one line ahead */
                        _mm_prefetch((const char *)(src + R * row_bytes), _MM_HINT_T0);
                    wv[j] = stream_codes32(src, u);
                }
                UNROLL for (int r = 0; r < M; r++) {
                    __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + r * K + k);
                    UNROLL for (int j = 0; j < R; j++) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], wv[j], xv);
                }
            }
            UNROLL for (int j = 0; j < R; j++) {
                float s = stream_param(u, scale[(n + j) * groups + g]);
                float o = stream_param(u, zero[(n + j) * groups + g]) - middle * s;
                __m512 sv = _mm512_set1_ps(s);
                UNROLL for (int r = 0; r < M; r++) {
                    total[j][r] = _mm512_fmadd_ps(acc[j][r], sv, total[j][r]);
                    offset[j][r] += o * xsum[r * groups + g];
                }
            }
        }
        UNROLL for (int j = 0; j < R; j++)
            UNROLL for (int r = 0; r < M; r++)
                y[r * N + n + j] = _mm512_reduce_add_ps(total[j][r]) + offset[j][r];
    }
}

#define STREAM_CASE(M, R)                                                                          \
    case M:                                                                                        \
        SPLIT_ROWS(stream_dot_block(xb, xsum, K, w, scale, zero, group, u, y, N, n0, whole, M, R), \
                   stream_dot_block(xb, xsum, K, w, scale, zero, group, u, y, N, n0, n1, M, 1),    \
                   R);                                                                             \
        break

static void stream_dot_rows(const uint16_t *xb, const float *xsum, int m, i64 K, const uint8_t *w,
                            const uint16_t *scale, const uint16_t *zero, i64 group,
                            const stream_codes *u, float *y, i64 N, i64 n0, i64 n1) {
    switch (m) { /* four weight rows even for one activation row: unpacking the codes, not memory,
                  * bounds it, and one weight row at a time measured 1.2-1.4x slower */
        STREAM_CASE(1, 4); STREAM_CASE(2, 4); STREAM_CASE(3, 3); STREAM_CASE(4, 2);
        STREAM_CASE(5, 2); STREAM_CASE(6, 1); STREAM_CASE(7, 1); default: STREAM_CASE(8, 1);
    }
}

/* y [M, N] = x [M, K], rounded to bf16, times the `bits`-bit weight (2, 3 or 4) of packing's bit
 * stream [N, K * bits / 8] with scales and zeros per group (fp16 with `fp16`, else bf16)
 * transposed; K % group == 0 and group % 32 == 0. Returns 0, -1 when the scratch cannot be allocated, -2 for
 * another number of bits. */
int pq_stream_matmul(const float *x, i64 M, i64 K, const uint8_t *w, const uint16_t *scale,
                     const uint16_t *zero, int fp16, i64 group, int bits, float *y, i64 N,
                     int threads) {
    if (bits < 2 || bits > 4) return -2;
    const stream_codes u = stream_codes_for(bits, fp16);
    const i64 groups = K / group;
    uint16_t *xb;
    float *xsum;
    if (rows_to_bf16(x, M, K, 0, group, &xb, &xsum)) return -1;
    FOR_ROW_CHUNKS(M, N, threads,
                   stream_dot_rows(xb + m0 * K, xsum + m0 * groups, m, K, w, scale, zero, group,
                                   &u, y + m0 * N, N, b_first_row, b_end_row))
    free(xb);
    free(xsum);
    return 0;
}

/* Rows [n0, n1) of a 2-, 3- or 4-bit bit-stream weight, dequantized in fp32 (q s + (z -
 * 2^(bits-1) s), as packing.affine_into computes them) and rounded once to bf16 into out [n1 -
 * n0, K]: a prefill's GEMM block. */
void pq_stream_dequantize_bf16(const uint8_t *w, const uint16_t *scale, const uint16_t *zero,
                               int fp16, i64 group, int bits, i64 K, i64 n0, i64 n1,
                               uint16_t *out, int threads) {
    const stream_codes u = stream_codes_for(bits, fp16);
    const i64 groups = K / group, row_bytes = K * bits / 8, block_bytes = 4 * bits;
    const __m512 base = _mm512_set1_ps((float)(1 << bits));
#pragma omp parallel for schedule(static) num_threads(threads)
    for (i64 n = n0; n < n1; n++) {
        uint16_t *dst = out + (n - n0) * K;
        for (i64 g = 0; g < groups; g++) {
            float s = stream_param(&u, scale[n * groups + g]);
            __m512 sv = _mm512_set1_ps(s);
            __m512 ov = _mm512_set1_ps(stream_param(&u, zero[n * groups + g]) - (float)(1 << (bits - 1)) * s);
            for (i64 k = g * group; k < (g + 1) * group; k += 32) {
                __m512i v = (__m512i)stream_codes32(w + n * row_bytes + k / 32 * block_bytes, &u);
                __m512i lo = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16);
                __m512i hi = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16);
                __m512 qlo = _mm512_sub_ps(_mm512_castsi512_ps(lo), base); /* q, exactly */
                __m512 qhi = _mm512_sub_ps(_mm512_castsi512_ps(hi), base);
                _mm256_storeu_si256((__m256i *)(dst + k), to_bf16(_mm512_fmadd_ps(qlo, sv, ov)));
                _mm256_storeu_si256((__m256i *)(dst + k + 16), to_bf16(_mm512_fmadd_ps(qhi, sv, ov)));
            }
        }
    }
}
#endif

/* Whether this build has pq_stream_matmul (avx512_bf16 and avx512_vbmi). */
int pq_has_stream_dot(void) {
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
    return 1;
#else
    return 0;
#endif
}

/* vdpbf16ps `rounds` x 24 times in each of `threads` threads on registers alone (24 independent
 * sums, so the instruction's throughput, not its latency, sets the pace): the most the dot-product
 * kernels could reach with no memory traffic. Returns the sums, so that the work is done. */
float pq_dot_peak(i64 rounds, int threads) {
    float total = 0.0f;
#if defined(__AVX512BF16__)
    _Pragma("omp parallel num_threads(threads) reduction(+ : total)") {
        __m512 acc[24];
        __m512bh a = (__m512bh)_mm512_set1_epi16(0x3F80), b = (__m512bh)_mm512_set1_epi16(0x3400);
        /* distinct starts: 24 equal chains would be folded into one */
        _Pragma("GCC unroll 24") for (int j = 0; j < 24; j++) acc[j] = _mm512_set1_ps((float)j);
        for (i64 i = 0; i < rounds; i++) {
            _Pragma("GCC unroll 24") for (int j = 0; j < 24; j++) acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
            __asm__ volatile("" : "+v"(a)); /* a is unknown to the compiler each round */
        }
        _Pragma("GCC unroll 24") for (int j = 0; j < 24; j++) total += _mm512_reduce_add_ps(acc[j]);
    }
#else
    (void)rounds;
    (void)threads;
#endif
    return total;
}

/* Whether this build has pq_dot_matmul (a CPU with avx512_bf16). */
int pq_has_bf16_dot(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

/* Needs K % group == 0 and group % 32 == 0. Returns 0, or -1 when the scratch for the reordered
 * inputs cannot be allocated. */
int pq_int4_matmul(const float *x, i64 M, i64 K, const uint8_t *w, const uint16_t *scale,
                   const uint16_t *zero, i64 group, float *y, i64 N, int threads) {
#if defined(__AVX512BF16__)
    if (M == 1 && group % 64 == 0) return int4_dot_matmul(x, 1, K, w, scale, zero, group, y, N, threads);
#endif
    float *xp = malloc(sizeof(float) * (size_t)(M * K));
    if (!xp) return -1;
    for (i64 r = 0; r < M; r++)
        for (i64 k = 0; k < K; k += 32)
            for (int i = 0; i < 16; i++) {
                xp[r * K + k + i] = x[r * K + k + 2 * i];
                xp[r * K + k + 16 + i] = x[r * K + k + 2 * i + 1];
            }
    FOR_ROW_CHUNKS(M, N, threads,
                   int4_rows(xp + m0 * K, m, K, w, scale, zero, group, y + m0 * N, N, b_first_row,
                             b_end_row))
    free(xp);
    return 0;
}

/* Which int4 form one activation row takes in this build. */
const char *pq_int4_row_form(void) {
#if defined(__AVX512BF16__)
    return "bf16-dot";
#else
    return "fp32";
#endif
}

/* ------------------------------------------------------------------- dequantizing to bf16 */

/* Rows [n0, n1) of the weight, dequantized in fp32 (as packing.affine_into computes them) and
 * rounded once to bf16 into out [n1 - n0, K]: the block a prefill multiplies by in one GEMM. */
void pq_int8_dequantize_bf16(const int8_t *w, const uint16_t *scale, i64 K, i64 n0, i64 n1,
                             uint16_t *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (i64 n = n0; n < n1; n++) {
        const int8_t *src = w + n * K;
        uint16_t *dst = out + (n - n0) * K;
        float s = bf16_to_float(scale[n]);
        __m512 sv = _mm512_set1_ps(s);
        i64 k = 0;
        for (; k + 16 <= K; k += 16) {
            __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(src + k))));
            _mm256_storeu_si256((__m256i *)(dst + k), to_bf16(_mm512_mul_ps(v, sv)));
        }
        for (; k < K; k++) dst[k] = float_to_bf16((float)src[k] * s);
    }
}

void pq_int4_dequantize_bf16(const uint8_t *w, const uint16_t *scale, const uint16_t *zero,
                             i64 group, i64 K, i64 n0, i64 n1, uint16_t *out, int threads) {
    const i64 groups = K / group, row_bytes = K / 2;
    /* lanes 0-15 of lo hold codes 0, 2, .., 30 and of hi 1, 3, .., 31: interleave them back */
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (i64 n = n0; n < n1; n++) {
        uint16_t *dst = out + (n - n0) * K;
        for (i64 g = 0; g < groups; g++) {
            __m512 sv, ov;
            int4_group(scale, zero, groups, n, g, &sv, &ov);
            for (i64 k = g * group; k < (g + 1) * group; k += 32) {
                __m512 lo, hi;
                int4_dequantize32(w + n * row_bytes + k / 2, sv, ov, &lo, &hi);
                _mm256_storeu_si256((__m256i *)(dst + k), to_bf16(_mm512_permutex2var_ps(lo, first, hi)));
                _mm256_storeu_si256((__m256i *)(dst + k + 16), to_bf16(_mm512_permutex2var_ps(lo, second, hi)));
            }
        }
    }
}

/* ---------------------------------------------------------- rotary embedding into the cache */

INLINE __m512 negated(__m512 v) { /* the sign bit flipped, as torch's neg: -0 from +0 */
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32(INT32_MIN)));
}

/* x * cos + rotate_half(x) * sin for `heads` heads of hd fp32 values at src (head h at src + h *
 * hd) into dst (head h at dst + h * dst_head): each product and the sum rounded in fp32, as
 * torch's three elementwise operations round them (explicit rounding modes: never fused into an
 * FMA). rotate_half(x) is (-x[half:], x[:half]). */
static void rope_heads(const float *src, i64 heads, i64 hd, const float *cos, const float *sin,
                       float *dst, i64 dst_head) {
    const i64 half = hd / 2;
    enum { RN = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC };
    for (i64 h = 0; h < heads; h++) {
        const float *x = src + h * hd;
        float *out = dst + h * dst_head;
        i64 d = 0;
        for (; d + 16 <= half; d += 16) {
            __m512 x1 = _mm512_loadu_ps(x + d), x2 = _mm512_loadu_ps(x + half + d);
            __m512 first = _mm512_add_round_ps(
                _mm512_mul_round_ps(x1, _mm512_loadu_ps(cos + d), RN),
                _mm512_mul_round_ps(negated(x2), _mm512_loadu_ps(sin + d), RN), RN);
            __m512 second = _mm512_add_round_ps(
                _mm512_mul_round_ps(x2, _mm512_loadu_ps(cos + half + d), RN),
                _mm512_mul_round_ps(x1, _mm512_loadu_ps(sin + half + d), RN), RN);
            _mm512_storeu_ps(out + d, first);
            _mm512_storeu_ps(out + half + d, second);
        }
        for (; d < half; d++) { /* volatile: each rounded on its own, never contracted */
            volatile float a = x[d] * cos[d], b = -x[half + d] * sin[d];
            volatile float c = x[half + d] * cos[half + d], e = x[d] * sin[half + d];
            out[d] = a + b;
            out[half + d] = c + e;
        }
    }
}

/* A step's new queries, keys and values of rows (b, t), b < bsz, t < seq (row r = b * seq + t of
 * q [r, heads * hd], k and v [r, kv_heads * hd], rows `q_row`, `k_row` and `v_row` floats apart):
 * queries rotated into q_out [bsz, seq, heads, hd]; keys rotated and values copied into the
 * cache, k_cache and v_cache [bsz, kv_heads, max_len, hd] from the micro-batch's first slot, at
 * position past + t. cos and sin are [bsz, seq, hd]. */
void pq_rope_into_cache(const float *q, const float *k, const float *v, i64 bsz, i64 seq,
                        i64 q_row, i64 k_row, i64 v_row, i64 heads, i64 kv_heads, i64 hd,
                        const float *cos, const float *sin, float *q_out, float *k_cache,
                        float *v_cache, i64 max_len, i64 past, int threads) {
    const i64 rows = bsz * seq;
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * (heads + kv_heads) * hd >= 65536)
    for (i64 r = 0; r < rows; r++) {
        const i64 b = r / seq, t = r % seq;
        const float *c = cos + r * hd, *s = sin + r * hd;
        rope_heads(q + r * q_row, heads, hd, c, s, q_out + r * heads * hd, hd);
        const i64 at = (b * kv_heads * max_len + past + t) * hd; /* head 0 of this position */
        rope_heads(k + r * k_row, kv_heads, hd, c, s, k_cache + at, max_len * hd);
        for (i64 h = 0; h < kv_heads; h++)
            for (i64 d = 0; d < hd; d++) v_cache[at + h * max_len * hd + d] = v[r * v_row + h * hd + d];
    }
}
