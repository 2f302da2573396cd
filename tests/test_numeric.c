/* Number formats: fp16 and bf16 against the compiler's own conversions,
 * E4M3 against its definition (all 256 codes, ties, saturation). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <math.h>
#include <string.h>

#include "numeric.h"
#include "reference.h"

static void test_f16_roundtrip_all_codes(void **state)
{
    (void)state;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = qattn_f16_to_f32((uint16_t)h);
        uint16_t back = qattn_f32_to_f16(f);
        if (isnan(f))
            assert_true((back & 0x7c00) == 0x7c00 && (back & 0x3ff));
        else
            assert_int_equal(back, h);
    }
}

static void test_f16_matches_compiler(void **state)
{
    (void)state;
#if defined(__FLT16_MAX__)
    ref_rng rng;
    ref_rng_seed_auto(&rng);
    for (int i = 0; i < 2000000; i++) {
        /* random bit patterns cover normals, subnormals, ties and overflow */
        uint32_t bits = (uint32_t)(ref_rng_uniform(&rng) * 4294967296.0);
        float f;
        memcpy(&f, &bits, 4);
        if (isnan(f))
            continue;
        __extension__ _Float16 h = (__extension__(_Float16) f);
        uint16_t want;
        memcpy(&want, &h, 2);
        assert_int_equal(qattn_f32_to_f16(f), want);
        assert_true(qattn_f16_to_f32(want) == (float)h || isnan((float)h));
    }
#else
    skip();
#endif
}

static void test_bf16(void **state)
{
    (void)state;
    assert_int_equal(qattn_f32_to_bf16(1.0f), 0x3f80);
    /* 1 + 2^-8 is a tie between 1 and 1 + 2^-7: rounds to even (1). */
    assert_int_equal(qattn_f32_to_bf16(1.00390625f), 0x3f80);
    /* 1 + 3 * 2^-8 is a tie between 1+2^-7 and 1+2^-6: rounds to even (1+2^-6). */
    assert_int_equal(qattn_f32_to_bf16(1.01171875f), 0x3f82);
    assert_true(isnan(qattn_bf16_to_f32(qattn_f32_to_bf16(NAN))));
    assert_true(isinf(qattn_bf16_to_f32(qattn_f32_to_bf16(INFINITY))));
    for (uint32_t b = 0; b < 65536; b++) {
        float f = qattn_bf16_to_f32((uint16_t)b);
        if (!isnan(f))
            assert_int_equal(qattn_f32_to_bf16(f), b);
    }
}

static void test_e4m3_codes(void **state)
{
    (void)state;
    int nans = 0;
    for (int c = 0; c < 256; c++) {
        float f = qattn_e4m3_to_f32((uint8_t)c);
        if (isnan(f)) {
            nans++;
            assert_true((c & 0x7f) == 0x7f);
            continue;
        }
        if (c == 0x80) /* -0 */
            assert_true(f == 0.0f && signbit(f));
        assert_int_equal(qattn_f32_to_e4m3(f), c);
    }
    assert_int_equal(nans, 2);
    assert_true(qattn_e4m3_to_f32(0x7e) == 448.0f);
    assert_true(qattn_e4m3_to_f32(0x01) == 0.001953125f); /* 2^-9, smallest subnormal */
    assert_true(qattn_e4m3_to_f32(0x08) == 0.015625f);    /* 2^-6, smallest normal */
}

static void test_e4m3_rounding(void **state)
{
    (void)state;
    /* Saturation (satfinite) and NaN. */
    assert_int_equal(qattn_f32_to_e4m3(1000.f), 0x7e);
    assert_int_equal(qattn_f32_to_e4m3(-1e30f), 0xfe);
    assert_int_equal(qattn_f32_to_e4m3(INFINITY), 0x7e);
    assert_int_equal(qattn_f32_to_e4m3(-INFINITY), 0xfe);
    assert_true(isnan(qattn_e4m3_to_f32(qattn_f32_to_e4m3(NAN))));
    /* Every midpoint between neighbouring codes rounds to the even code, and
     * points just off the midpoint round to the nearer code. */
    for (int c = 0; c < 0x7e; c++) {
        float lo = qattn_e4m3_to_f32((uint8_t)c), hi = qattn_e4m3_to_f32((uint8_t)(c + 1));
        float mid = 0.5f * (lo + hi);
        int even = (c & 1) ? c + 1 : c;
        assert_int_equal(qattn_f32_to_e4m3(mid), even);
        assert_int_equal(qattn_f32_to_e4m3(nextafterf(mid, 0.f)), c);
        assert_int_equal(qattn_f32_to_e4m3(nextafterf(mid, 1000.f)), c + 1);
        assert_int_equal(qattn_f32_to_e4m3(-mid), even | 0x80);
    }
    /* Between 448 and the next binade step (480) everything saturates to 448. */
    assert_int_equal(qattn_f32_to_e4m3(463.99f), 0x7e);
    assert_int_equal(qattn_f32_to_e4m3(464.0f), 0x7e);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_f16_roundtrip_all_codes),
        cmocka_unit_test(test_f16_matches_compiler),
        cmocka_unit_test(test_bf16),
        cmocka_unit_test(test_e4m3_codes),
        cmocka_unit_test(test_e4m3_rounding),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
