/* Every kernel table this machine runs against the scalar one, for machines pytest cannot load
 * the extension on: tests/test_kernels_cross.py builds this with a cross compiler and runs it
 * under qemu (the NEON and NEON-dotprod tables on an x86 host). test_kernels.py is the full
 * suite; this is its twin checks, in C:
 *   to_float equal (as numbers); dot within 1e-5 of sum |w x|; axpy within a few roundings;
 *   axpy4 the same bits as four of the table's axpys (rows of one row's blocks, rotated);
 *   quantize_q8 byte for byte; dot_q8 within 1e-5 of the block-wise magnitude; exp bit for bit;
 *   weighted_sum (F32 and F16 rows) within 1e-5 of sum |w r|; scores within 1e-5 of sum |q k|;
 *   to_bf16 bit for bit; gemm16 bit for bit; axpy_nonzero bit for bit; the batch packing for gemm_q8 byte
 *   for byte, gemm_q8 bit for bit.
 * Prints one line per ISA ("<isa> ok <checks>" or the first failure) and "available: ..."; the
 * exit status is the number of failing ISAs. */
#include "kernels.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint32_t next_u32(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12, rng_state ^= rng_state << 25, rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545f4914f6cdd1dull) >> 32);
}

static float uniform(void) { return (float)(next_u32() >> 8) * 0x1p-24f * 2.0f - 1.0f; }

/* values whose scale changes block to block, as test_kernels.random_floats */
static void random_floats(float *x, int64_t n) {
    float scale = 1.0f;
    for (int64_t i = 0; i < n; i++) {
        if (i % 32 == 0) scale = expf(7.0f * uniform());
        x[i] = uniform() * scale;
    }
}

static const int TYPES[] = { PS_TYPE_F32, PS_TYPE_F16, PS_TYPE_BF16, PS_TYPE_Q8_0, PS_TYPE_Q4_0, PS_TYPE_Q4_1 };
static const int64_t SIZES[] = { 32, 96, 160, 576, 1568 };

/* a row of type t: quantised random floats, then (quantised types) random code bytes, the
 * block's scales kept (the codes are the block's last bytes) */
static void random_row(const ps_type_traits *ref, void *row, int64_t n, float *tmp) {
    random_floats(tmp, n);
    ref->from_float(tmp, row, n);
    if (ref->block_size == 1) return;
    const size_t codes = ref->name[1] == '8' ? 32 : 16;
    for (int64_t b = 0; b < n / 32; b++) {
        unsigned char *block = (unsigned char *)row + b * ref->block_bytes;
        for (size_t j = ref->block_bytes - codes; j < ref->block_bytes; j++) block[j] = (unsigned char)next_u32();
    }
}

/* sum of a[i * sa] * b[i * sb] over i < n in float64, and the sum of the products' magnitudes */
static double dot64(const float *a, int64_t sa, const float *b, int64_t sb, int64_t n, double *mag) {
    double sum = 0.0;
    *mag = 0.0;
    for (int64_t i = 0; i < n; i++) {
        sum += (double)a[i * sa] * b[i * sb];
        *mag += fabs((double)a[i * sa] * b[i * sb]);
    }
    return sum;
}

static int fail(const char *isa, const char *what, int type, int64_t n, double got, double want) {
    printf("%s FAIL %s type %d n %lld: %.9g vs %.9g\n", isa, what, type, (long long)n, got, want);
    return 1;
}

/* gemm_q8: the batch packing byte for byte, then the product bit for bit, against the scalar
 * table, for each integer type over shapes with rows past a tile and tokens past a group of 16 */
static int check_gemm_q8(int isa, const char *name, long *checks) {
    static const int64_t shapes[][3] = { { 16, 40, 576 }, { 5, 17, 96 }, { 1, 1, 32 } };
    static const int types[] = { PS_TYPE_Q8_0, PS_TYPE_Q4_0, PS_TYPE_Q4_1 };
    int failed = 0;
    for (size_t ti = 0; ti < sizeof types / sizeof types[0] && !failed; ti++)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0] && !failed; si++) {
            const int64_t m = shapes[si][0], nb = shapes[si][1], k = shapes[si][2];
            const int64_t lanes = ps_q8_batch_groups(nb) * 16;
            const ps_type_traits *ref = ps_type_traits_for(types[ti], PS_ISA_SCALAR);
            const size_t row_bytes = ps_row_bytes(types[ti], k);
            char *rows = malloc(row_bytes * (size_t)m);
            float *x = malloc(sizeof(float) * (size_t)(nb * k)), *tmp = malloc(sizeof(float) * (size_t)k);
            float *c = malloc(sizeof(float) * (size_t)(nb * m)), *c_ref = malloc(sizeof(float) * (size_t)(nb * m));
            ps_q8_vec one = { malloc((size_t)k), malloc(sizeof(float) * (size_t)(k / 32)), malloc(sizeof(float) * (size_t)(k / 32)), NULL };
            ps_q8_batch xb[2];
            for (int v = 0; v < 2; v++)
                xb[v] = (ps_q8_batch){ malloc((size_t)(lanes * k)), malloc(sizeof(float) * (size_t)(lanes * k / 32)),
                                       malloc(sizeof(float) * (size_t)(lanes * k / 32)),
                                       malloc(sizeof(int32_t) * (size_t)(lanes * k / 32)) };
            for (int64_t r = 0; r < m; r++) random_row(ref, rows + (size_t)r * row_bytes, k, tmp);
            random_floats(x, nb * k);
            ps_quantize_q8_batch_isa(PS_ISA_SCALAR, x, nb, k, &one, &xb[0]);
            ps_quantize_q8_batch_isa(isa, x, nb, k, &one, &xb[1]);
            const size_t meta = sizeof(float) * (size_t)(lanes * k / 32);
            if (memcmp(xb[0].qs, xb[1].qs, (size_t)(lanes * k)) != 0 || memcmp(xb[0].d, xb[1].d, meta) != 0 ||
                memcmp(xb[0].s, xb[1].s, meta) != 0 || memcmp(xb[0].sum, xb[1].sum, meta) != 0)
                failed = fail(name, "quantize_q8_batch", types[ti], k, 0, 0);
            if (!failed && (ps_gemm_q8_isa(PS_ISA_SCALAR, types[ti], rows, m, &xb[0], nb, k, c_ref, m) != 0 ||
                            ps_gemm_q8_isa(isa, types[ti], rows, m, &xb[0], nb, k, c, m) != 0))
                failed = fail(name, "gemm_q8 missing", types[ti], k, 0, 0);
            for (int64_t i = 0; i < nb * m && !failed; i++)
                if (memcmp(&c[i], &c_ref[i], sizeof(float)) != 0) failed = fail(name, "gemm_q8", types[ti], k, c[i], c_ref[i]);
            *checks += 2;
            for (int v = 0; v < 2; v++) { free(xb[v].qs); free(xb[v].d); free(xb[v].s); free(xb[v].sum); }
            free(one.qs); free(one.d); free(one.s);
            free(rows); free(x); free(tmp); free(c); free(c_ref);
        }
    return failed;
}

static int check_isa(int isa) {
    const char *name = ps_kernels_isa_name(isa);
    long checks = 0;
    const int64_t max_n = 1568;
    float *x = malloc(sizeof(float) * max_n), *w = malloc(sizeof(float) * max_n), *w2 = malloc(sizeof(float) * max_n);
    float *y = malloc(sizeof(float) * max_n), *y_ref = malloc(sizeof(float) * max_n), *tmp = malloc(sizeof(float) * max_n);
    void *row = malloc(sizeof(float) * max_n);
    int8_t *qs = malloc(max_n), *qs_ref = malloc(max_n), *q4 = malloc(max_n);
    float *d = malloc(sizeof(float) * max_n / 32), *s = malloc(sizeof(float) * max_n / 32);
    float *d_ref = malloc(sizeof(float) * max_n / 32), *s_ref = malloc(sizeof(float) * max_n / 32);
    const ps_q8_vec xq = { qs, d, s, q4 }, xq_ref = { qs_ref, d_ref, s_ref, NULL };   /* q4: as the runtime asks */
    int failed = 0;
    for (size_t k = 0; k < sizeof TYPES / sizeof TYPES[0] && !failed; k++) {
        const ps_type_traits *ref = ps_type_traits_for(TYPES[k], PS_ISA_SCALAR), *t = ps_type_traits_for(TYPES[k], isa);
        for (size_t si = 0; si < sizeof SIZES / sizeof SIZES[0] && !failed; si++) {
            const int64_t n = SIZES[si];
            random_row(ref, row, n, tmp);
            random_floats(x, n);
            ref->to_float(row, w, n);
            t->to_float(row, w2, n);
            for (int64_t i = 0; i < n && !failed; i++) /* equal; a zero's sign may differ (8d - 8d) */
                if (w[i] != w2[i]) failed = fail(name, "to_float", TYPES[k], n, w2[i], w[i]);
            double mag = 0.0;
            for (int64_t i = 0; i < n; i++) mag += fabs((double)w[i] * x[i]);
            const double got = t->dot(row, x, n), want = ref->dot(row, x, n);
            if (fabs(got - want) > 1e-5 * mag + 1e-30) { failed = fail(name, "dot", TYPES[k], n, got, want); break; }
            for (int64_t i = 0; i < n; i++) y[i] = y_ref[i] = x[i];
            t->axpy(1.7f, row, y, n);
            ref->axpy(1.7f, row, y_ref, n);
            for (int64_t i = 0; i < n && !failed; i++)
                if (fabs((double)y[i] - y_ref[i]) > 1e-6 * (fabs(x[i]) + fabs(1.7 * w[i])) + 1e-30)
                    failed = fail(name, "axpy", TYPES[k], n, y[i], y_ref[i]);
            /* axpy4 against four axpys of the same table: rows starting at blocks 0, 1, 2, 3 of
             * row (each n - 96 long, so n >= 128), coefficients far apart in size */
            if (n >= 128 && !failed) {
                const int64_t m = n - 96;
                const float a[4] = { 1.7f, -3e4f, 2e-3f, -0.5f };
                const void *rows[4];
                for (int r = 0; r < 4; r++) rows[r] = (const char *)row + r * 32 / ref->block_size * ref->block_bytes;
                for (int64_t i = 0; i < m; i++) y[i] = y_ref[i] = x[i];
                t->axpy4(a, rows, y, m);
                for (int r = 0; r < 4; r++) t->axpy(a[r], rows[r], y_ref, m);
                if (memcmp(y, y_ref, sizeof(float) * (size_t)m) != 0)
                    for (int64_t i = 0; i < m && !failed; i++)
                        if (y[i] != y_ref[i]) failed = fail(name, "axpy4", TYPES[k], m, y[i], y_ref[i]);
                checks += 1;
            }
            checks += 3;
            if (!ref->dot_q8 || failed) continue;
            /* activations: the same bytes from every quantiser */
            ps_quantize_q8_isa(PS_ISA_SCALAR, x, &xq_ref, n);
            ps_quantize_q8_isa(isa, x, &xq, n);
            if (memcmp(qs, qs_ref, (size_t)n) != 0 || memcmp(d, d_ref, sizeof(float) * (n / 32)) != 0 ||
                memcmp(s, s_ref, sizeof(float) * (n / 32)) != 0) {
                failed = fail(name, "quantize_q8", TYPES[k], n, 0, 0);
                break;
            }
            /* magnitude: per block, (largest |w| + 8 |d|-sized offsets, bounded by 16 max|w|)
             * times sum |x_q| */
            double qmag = 0.0;
            for (int64_t b = 0; b < n / 32; b++) {
                double wmax = 0.0, xsum = 0.0;
                for (int j = 0; j < 32; j++) {
                    wmax = fmax(wmax, fabs(w[32 * b + j]));
                    xsum += fabs((double)qs[32 * b + j] * d[b]);
                }
                qmag += 16.0 * wmax * xsum;
            }
            const double got_q8 = t->dot_q8(row, &xq, n), want_q8 = ref->dot_q8(row, &xq, n);
            if (fabs(got_q8 - want_q8) > 1e-6 * qmag + 1e-30) { failed = fail(name, "dot_q8", TYPES[k], n, got_q8, want_q8); break; }
            checks += 2;
        }
    }
    /* the f32 operations: exp the same bits (a ramp over every range: zero, subnormal, normal,
     * overflow), weighted_sum within 1e-5 of sum |w r| per column */
    const ps_f32_ops *ops = ps_f32_ops_for(isa), *ops_ref = ps_f32_ops_for(PS_ISA_SCALAR);
    for (int64_t i = 0; i < max_n; i++) x[i] = -110.0f + 200.0f * (float)i / (float)max_n;
    ops->exp(x, y, max_n);
    ops_ref->exp(x, y_ref, max_n);
    for (int64_t i = 0; i < max_n && !failed; i++)
        if (memcmp(&y[i], &y_ref[i], sizeof(float)) != 0) failed = fail(name, "exp", 0, max_n, y[i], y_ref[i]);
    checks += 1;
    const int64_t rows = 11, ld = 131; /* rows * ld <= max_n */
    for (int64_t k = 1; k <= 130 && !failed; k += 43) {
        random_floats(w, rows);
        random_floats(tmp, rows * ld);
        ops->weighted_sum(w, rows, tmp, ld, k, PS_TYPE_F32, y);
        ops_ref->weighted_sum(w, rows, tmp, ld, k, PS_TYPE_F32, y_ref);
        for (int64_t i = 0; i < k && !failed; i++) {
            double mag = 0.0;
            for (int64_t t = 0; t < rows; t++) mag += fabs((double)w[t] * tmp[t * ld + i]);
            if (fabs((double)y[i] - y_ref[i]) > 1e-5 * mag + 1e-30) failed = fail(name, "weighted_sum", 0, k, y[i], y_ref[i]);
        }
        checks += 1;
    }
    /* scores within 1e-5 of sum |q k| per position, F32 and F16 keys (the F16 rows in `row`,
     * their floats in tmp), n = 1..11 positions ld apart; to_bf16 the same bits as the scalar */
    const int64_t n_keys = 11, ldk = 131, hd = 81;   /* n_keys * ldk <= max_n */
    random_floats(x, hd);
    random_floats(tmp, n_keys * ldk);
    const ps_type_traits *f16 = ps_type_traits_for(PS_TYPE_F16, PS_ISA_SCALAR);
    f16->from_float(tmp, row, n_keys * ldk);
    f16->to_float(row, w2, n_keys * ldk);
    for (int kt = 0; kt < 2 && !failed; kt++) {
        const int k_type = kt ? PS_TYPE_F16 : PS_TYPE_F32;
        const float *keys = kt ? w2 : tmp;
        for (int64_t n = 1; n <= n_keys && !failed; n += 5) {
            ops->scores(x, kt ? row : (const void *)tmp, ldk, n, hd, k_type, y);
            for (int64_t t = 0; t < n && !failed; t++) {
                double mag;
                const double want = dot64(x, 1, keys + t * ldk, 1, hd, &mag);
                if (fabs(y[t] - want) > 1e-5 * mag + 1e-30) failed = fail(name, "scores", k_type, n, y[t], want);
            }
            checks += 1;
        }
    }
    /* weighted_sum of F16 rows within 1e-5 of sum |w v| per column, over the F16 rows above */
    for (int64_t k = 1; k <= 130 && !failed; k += 43) {
        random_floats(w, n_keys);
        ops->weighted_sum(w, n_keys, row, ldk, k, PS_TYPE_F16, y);
        for (int64_t i = 0; i < k && !failed; i++) {
            double mag;
            const double want = dot64(w, 1, w2 + i, ldk, n_keys, &mag);
            if (fabs(y[i] - want) > 1e-5 * mag + 1e-30) failed = fail(name, "weighted_sum", PS_TYPE_F16, k, y[i], want);
        }
        checks += 1;
    }
    /* gemm16 bit for bit (one fma chain per output), a read along its rows and down its columns:
     * 22 x 40 of x against 40 x 16 of tmp, into y (22 x 16 floats) */
    for (int form = 0; form < 2 && !failed; form++) {
        const int64_t m = 22, k = 40, a_rs = form ? 1 : k, a_ks = form ? m : 1;
        random_floats(x, m * k);
        random_floats(tmp, k * 16);
        ops->gemm16(x, a_rs, a_ks, m, tmp, 16, k, y, 16);
        ops_ref->gemm16(x, a_rs, a_ks, m, tmp, 16, k, y_ref, 16);
        if (memcmp(y, y_ref, sizeof(float) * (size_t)(m * 16)) != 0) failed = fail(name, "gemm16", 0, k, y[0], y_ref[0]);
        checks += 1;
    }
    /* axpy_nonzero bit for bit: 64 rows (its most) and 10, 19 and 140 columns (register passes
     * of every width); the rows whose a is zero hold NaN, which must not be read */
    for (int form = 0; form < 2 && !failed; form++) {
        const int64_t n = form ? 10 : 64, ld = form ? 150 : 21, k = form ? 140 : 19, off = form ? 3 : 2;
        random_floats(x, n);
        random_floats(w2, n * ld);
        for (int64_t j = 0; j < n; j++)
            if (next_u32() % 3 == 0) {
                x[j] = 0.0f;
                for (int64_t i = 0; i < ld; i++) w2[j * ld + i] = NAN;
            }
        random_floats(y, k);
        memcpy(y_ref, y, sizeof(float) * (size_t)k);
        ops->axpy_nonzero(x, n, w2, ld, off, y, k);
        ops_ref->axpy_nonzero(x, n, w2, ld, off, y_ref, k);
        if (memcmp(y, y_ref, sizeof(float) * (size_t)k) != 0 || y_ref[0] != y_ref[0])
            failed = fail(name, "axpy_nonzero", 0, k, y[0], y_ref[0]);
        checks += 1;
    }
    uint16_t *b16 = (uint16_t *)w, *b16_ref = (uint16_t *)w + max_n;   /* w holds 2 max_n halves */
    ops->to_bf16(tmp, b16, max_n / 2);
    ops_ref->to_bf16(tmp, b16_ref, max_n / 2);
    if (!failed && memcmp(b16, b16_ref, sizeof(uint16_t) * (max_n / 2)) != 0)
        failed = fail(name, "to_bf16", 0, max_n / 2, 0, 0);
    checks += 1;
    if (!failed) failed = check_gemm_q8(isa, name, &checks);
    if (!failed) printf("%s ok %ld\n", name, checks);
    free(x); free(w); free(w2); free(y); free(y_ref); free(tmp); free(row);
    free(qs); free(qs_ref); free(q4); free(d); free(s); free(d_ref); free(s_ref);
    return failed;
}

int main(void) {
    int failures = 0;
    printf("available:");
    for (int isa = 0; isa < PS_ISA_COUNT; isa++)
        if (ps_kernels_isa_available(isa)) printf(" %s", ps_kernels_isa_name(isa));
    printf("\n");
    for (int isa = 0; isa < PS_ISA_COUNT; isa++)
        if (ps_kernels_isa_available(isa)) failures += check_isa(isa);
    return failures;
}
