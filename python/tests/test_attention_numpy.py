"""qattn.attention on numpy arrays (the CPU backend) against an fp64 reference."""
import threading
import unittest

from support import BARS, MODES, NUMPY_MISSING, QUANTIZED, metrics, np, qattn, randn, reference


@unittest.skipIf(np is None, NUMPY_MISSING)
class AttentionAccuracy(unittest.TestCase):
    def setUp(self):
        self.rng = np.random.default_rng(1234)

    def check(self, out, ref, mode, what=""):
        cos, rel, _ = metrics(out, ref)
        cos_min, rel_max = BARS[mode]
        self.assertGreaterEqual(cos, cos_min, "%s %s: cosine %.7f below %g" % (mode, what, cos, cos_min))
        self.assertLessEqual(rel, rel_max, "%s %s: rel L1 %.5f above %g" % (mode, what, rel, rel_max))

    def qkv(self, b=1, hq=2, hkv=None, nq=192, nk=None, d=64, dtype="float16", kbias=False, layout="HND"):
        hkv = hq if hkv is None else hkv
        nk = nq if nk is None else nk

        def shape(h, n):
            return (b, h, n, d) if layout == "HND" else (b, n, h, d)

        bias = 8.0 * self.rng.standard_normal(d) if kbias else None
        return (randn(self.rng, shape(hq, nq), dtype), randn(self.rng, shape(hkv, nk), dtype, bias),
                randn(self.rng, shape(hkv, nk), dtype))

    def test_every_precision_meets_its_bar(self):
        q, k, v = self.qkv()
        ref, _ = reference(q, k, v)
        for mode in MODES:
            with self.subTest(mode=mode):
                out = qattn.attention(q, k, v, precision=mode)
                self.assertEqual(out.shape, q.shape)
                self.assertEqual(out.dtype, q.dtype)
                self.check(out, ref, mode)
                # the plan runs the mode asked for, never another
                self.assertEqual(qattn.attention_plan(q, k, v, precision=mode).info.precision, mode)

    def test_auto_reports_a_concrete_mode_and_meets_its_bar(self):
        q, k, v = self.qkv()
        plan = qattn.attention_plan(q, k, v, precision="auto")
        self.assertIn(plan.info.precision, MODES)
        self.assertIn("auto chose", plan.describe())
        self.check(qattn.attention(q, k, v), reference(q, k, v)[0], plan.info.precision)

    def test_quantized_modes_with_a_large_k_channel_bias(self):
        # Smooth K (on by default) removes the bias that would otherwise eat
        # the INT8 range of K.
        q, k, v = self.qkv(kbias=True)
        ref, ref_lse = reference(q, k, v)
        for mode in QUANTIZED:
            with self.subTest(mode=mode):
                out, lse = qattn.attention(q, k, v, precision=mode, return_lse=True)
                self.check(out, ref, mode, "kbias")
                np.testing.assert_allclose(lse, ref_lse, atol=0.05, rtol=0)

    def test_smooth_k_off_is_honoured(self):
        q, k, v = self.qkv(kbias=True)
        plan = qattn.attention_plan(q, k, v, precision="int8_fp16", smooth_k=False)
        self.assertFalse(plan.info.smooth_k)
        self.assertTrue(qattn.attention_plan(q, k, v, precision="int8_fp16").info.smooth_k)

    def test_granularities(self):
        q, k, v = self.qkv()
        ref, _ = reference(q, k, v)
        for granularity in ("per_block", "per_warp", "per_thread"):
            with self.subTest(granularity=granularity):
                plan = qattn.attention_plan(q, k, v, precision="int8_fp8", granularity=granularity)
                self.assertEqual(plan.info.granularity, granularity)
                out = qattn.attention(q, k, v, precision="int8_fp8", granularity=granularity)
                self.check(out, ref, "int8_fp8", granularity)

    def test_causal_with_fewer_queries_than_keys(self):
        q, k, v = self.qkv(nq=100, nk=260)
        ref, ref_lse = reference(q, k, v, causal=True)
        for mode in ("exact", "int8_fp8"):
            with self.subTest(mode=mode):
                out, lse = qattn.attention(q, k, v, is_causal=True, precision=mode, return_lse=True)
                self.check(out, ref, mode, "causal nq<nk")
                np.testing.assert_allclose(lse, ref_lse, atol=1e-3 if mode == "exact" else 0.05, rtol=0)

    def test_causal_with_more_queries_than_keys_masks_whole_rows(self):
        nq, nk = 150, 90
        q, k, v = self.qkv(nq=nq, nk=nk)
        ref, ref_lse = reference(q, k, v, causal=True)
        out, lse = qattn.attention(q, k, v, is_causal=True, precision="exact", return_lse=True)
        self.check(out, ref, "exact", "causal nq>nk")
        blind = nq - nk  # rows 0 .. nq-nk-1 see no key
        self.assertTrue(np.all(out[:, :, :blind] == 0))
        self.assertTrue(np.all(np.isneginf(lse[:, :, :blind])))
        self.assertTrue(np.all(np.isfinite(lse[:, :, blind:])))
        np.testing.assert_allclose(lse[:, :, blind:], ref_lse[:, :, blind:], atol=1e-3, rtol=0)

    def test_causal_differs_from_full(self):
        q, k, v = self.qkv(nq=64)
        full = qattn.attention(q, k, v, precision="exact").astype(np.float64)
        causal = qattn.attention(q, k, v, is_causal=True, precision="exact").astype(np.float64)
        # the last row sees every key either way; the first sees one key
        np.testing.assert_allclose(causal[:, :, -1], full[:, :, -1], atol=2e-3)
        np.testing.assert_allclose(causal[:, :, 0], v[:, :, 0].astype(np.float64), atol=2e-3)
        self.assertGreater(np.abs(causal - full).max(), 0.1)

    def test_gqa_and_mqa(self):
        for hkv in (2, 1):
            with self.subTest(hkv=hkv):
                q, k, v = self.qkv(hq=4, hkv=hkv, nq=96, nk=160)
                ref, ref_lse = reference(q, k, v, causal=True)
                for mode in ("exact", "int8_fp16"):
                    out, lse = qattn.attention(q, k, v, is_causal=True, precision=mode, return_lse=True)
                    self.check(out, ref, mode, "gqa hkv=%d" % hkv)
                    self.assertEqual(lse.shape, (1, 4, 96))

    def test_nhd_layout(self):
        q, k, v = self.qkv(b=2, hq=4, hkv=2, nq=80, nk=112, layout="NHD")
        ref, ref_lse = reference(q, k, v, causal=True, layout="NHD")
        for mode in ("exact", "int8_fp8_f16acc"):
            with self.subTest(mode=mode):
                out, lse = qattn.attention(q, k, v, is_causal=True, precision=mode, layout="NHD",
                                           return_lse=True)
                self.assertEqual(out.shape, q.shape)  # [B, N, H, D]
                self.assertTrue(out.flags.c_contiguous)
                self.assertEqual(lse.shape, (2, 4, 80))  # [B, H, N] whatever the layout
                self.check(out, ref, mode, "NHD")
                np.testing.assert_allclose(lse, ref_lse, atol=1e-3 if mode == "exact" else 0.05, rtol=0)

    def test_strided_views(self):
        # NHD memory described as HND through a transposed view, and rows padded
        # (the head dim is a slice of a wider array): strides come from the array.
        q, k, v = self.qkv(nq=70, layout="NHD")
        qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        ref, _ = reference(qt, kt, vt)
        self.check(qattn.attention(qt, kt, vt, precision="exact"), ref, "exact", "transposed view")
        wide = randn(self.rng, (1, 2, 70, 96))
        padded = wide[..., :64]
        ref, _ = reference(padded, padded, padded)
        self.check(qattn.attention(padded, padded, padded, precision="exact"), ref, "exact", "padded rows")

    def test_size_one_dims_from_newaxis(self):
        # numpy gives a newaxis a stride of 0; that dim's stride is meaningless.
        q = randn(self.rng, (2, 48, 64))[None]
        ref, _ = reference(q, q, q)
        self.check(qattn.attention(q, q, q, precision="exact"), ref, "exact", "newaxis")

    def test_float32_inputs_and_custom_scale(self):
        q, k, v = self.qkv(dtype="float32")
        ref, ref_lse = reference(q, k, v, sm_scale=0.3)
        out, lse = qattn.attention(q, k, v, sm_scale=0.3, precision="exact", return_lse=True)
        self.assertEqual(out.dtype, np.float32)
        cos, rel, _ = metrics(out, ref)
        self.assertGreater(cos, 0.999999)
        self.assertLess(rel, 1e-4)
        np.testing.assert_allclose(lse, ref_lse, atol=1e-4, rtol=0)
        default = qattn.attention(q, k, v, precision="exact")
        self.assertGreater(np.abs(default - out).max(), 1e-3)  # sm_scale really reached the library

    def test_inputs_are_not_written(self):
        q, k, v = self.qkv(nq=64)
        copies = [x.copy() for x in (q, k, v)]
        for mode in MODES:
            qattn.attention(q, k, v, precision=mode)
        for x, c in zip((q, k, v), copies):
            np.testing.assert_array_equal(x, c)

    def test_check_finite(self):
        q, k, v = self.qkv(nq=64)
        k[0, 1, 5, 3] = np.nan
        with self.assertRaises(qattn.NonfiniteInputError) as cm:
            qattn.attention(q, k, v, precision="exact", check_finite=True)
        self.assertIn("k contains NaN or Inf", cm.exception.message)
        out = qattn.attention(q, k, v, precision="exact")  # default: no scan, no error
        self.assertEqual(out.shape, q.shape)

    def test_threads_share_cached_plans(self):
        inputs = [self.qkv(nq=128) for _ in range(4)]
        refs = [reference(*x)[0] for x in inputs]
        results = [None] * len(inputs)
        errors = []

        def work(i):
            try:
                for _ in range(3):
                    results[i] = qattn.attention(*inputs[i], precision="int8_fp8")
            except Exception as e:  # reported below: a thread's exception is otherwise lost
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        for out, ref in zip(results, refs):
            self.check(out, ref, "int8_fp8", "threads")


@unittest.skipIf(np is None, NUMPY_MISSING)
class PlanCache(unittest.TestCase):
    def test_hits_misses_and_eviction(self):
        rng = np.random.default_rng(5)
        q = randn(rng, (1, 2, 64, 64))
        ctx = qattn.get_context("cpu")
        ctx.clear_plan_cache()
        old_size = ctx.plan_cache_size
        try:
            first = qattn.attention_plan(q, q, q, precision="exact")
            self.assertIs(qattn.attention_plan(q, q, q, precision="exact"), first)
            self.assertIsNot(qattn.attention_plan(q, q, q, precision="exact", is_causal=True), first)
            self.assertIsNot(qattn.attention_plan(q, q, q, precision="exact", sm_scale=0.5), first)
            # a different stride is a different plan
            self.assertIsNot(qattn.attention_plan(q.transpose(0, 2, 1, 3), q.transpose(0, 2, 1, 3),
                                                  q.transpose(0, 2, 1, 3), precision="exact", layout="NHD"),
                             first)
            self.assertEqual(ctx.plan_cache_len, 4)
            ctx.plan_cache_size = 2
            a = qattn.attention_plan(q, q, q, precision="int8_fp16")
            self.assertEqual(ctx.plan_cache_len, 2)
            self.assertIsNot(qattn.attention_plan(q, q, q, precision="exact"), first)  # evicted, rebuilt
            self.assertIs(qattn.attention_plan(q, q, q, precision="int8_fp16"), a)
            # an evicted plan that a caller still holds stays usable
            out = first.describe()
            self.assertIn("cpu_flash_exact", out)
        finally:
            ctx.plan_cache_size = old_size
            ctx.clear_plan_cache()


    def test_a_closed_cached_context_is_replaced(self):
        rng = np.random.default_rng(6)
        q = randn(rng, (1, 1, 32, 64))
        ctx = qattn.get_context("cpu")
        self.assertIs(qattn.get_context("cpu"), ctx)
        ctx.close()
        out = qattn.attention(q, q, q)
        self.assertIsNot(qattn.get_context("cpu"), ctx)
        self.check_close(out, reference(q, q, q)[0])

    def check_close(self, out, ref):
        cos, rel, _ = metrics(out, ref)
        self.assertGreater(cos, 0.9999)


@unittest.skipIf(np is None, NUMPY_MISSING)
class BadInputs(unittest.TestCase):
    def setUp(self):
        rng = np.random.default_rng(7)
        self.q = randn(rng, (1, 2, 32, 64))
        self.k = randn(rng, (1, 2, 48, 64))
        self.v = randn(rng, (1, 2, 48, 64))

    def raises(self, cls, text, *args, **kwargs):
        with self.assertRaises(cls) as cm:
            qattn.attention(*args, **kwargs)
        self.assertIsInstance(cm.exception, qattn.QattnError)
        self.assertIn(text, cm.exception.message)
        self.assertIn(text, str(cm.exception))
        return cm.exception

    def test_dtype_the_library_rejects(self):
        i8 = [x.astype(np.int8) for x in (self.q, self.k, self.v)]
        e = self.raises(qattn.UnsupportedError, "q.dtype=i8: attention inputs must be f32, f16 or bf16", *i8)
        self.assertEqual(e.status, qattn.Status.ERR_UNSUPPORTED)
        self.assertIn("QATTN_ERR_UNSUPPORTED", str(e))

    def test_dtype_without_a_qattn_dtype(self):
        f64 = [x.astype(np.float64) for x in (self.q, self.k, self.v)]
        self.raises(qattn.UnsupportedError, "q.dtype=float64 has no qattn dtype", *f64)

    def test_mixed_dtypes(self):
        e = self.raises(qattn.InvalidArgumentError, "dtypes differ: q=f16 k=f32 v=f16", self.q,
                        self.k.astype(np.float32), self.v)
        self.assertIsInstance(e, ValueError)
        self.assertEqual(e.status, qattn.Status.ERR_INVALID_ARGUMENT)

    def test_mismatched_shapes(self):
        self.raises(qattn.InvalidArgumentError, "batch sizes differ", self.q, np.concatenate([self.k, self.k]),
                    np.concatenate([self.v, self.v]))
        self.raises(qattn.InvalidArgumentError, "head dims differ", self.q, self.k[..., :32], self.v[..., :32])
        self.raises(qattn.InvalidArgumentError, "must match k", self.q, self.k, self.v[:, :, :40])
        q3 = np.concatenate([self.q, self.q[:, :1]], axis=1)  # 3 query heads over 2 kv heads
        self.raises(qattn.InvalidArgumentError, "q heads (3) must be a multiple of k/v heads (2)", q3, self.k, self.v)

    def test_non_contiguous_head_dim(self):
        wide = np.repeat(self.q, 2, axis=-1)
        self.raises(qattn.InvalidArgumentError, "q.stride[3] must be 1 (the head dim is contiguous), got 2",
                    wide[..., ::2], self.k, self.v)
        # [B, H, D, N] passed as [B, H, N, D]
        kt = np.ascontiguousarray(self.k.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
        self.raises(qattn.InvalidArgumentError, "k.stride[3] must be 1", self.q, kt, self.v)

    def test_broadcast_stride_zero(self):
        k = np.broadcast_to(self.k[:, :, :1], self.k.shape)
        self.raises(qattn.InvalidArgumentError, "k.stride[2] (N) must be > 0, got 0", self.q, k, self.v)

    def test_unknown_precision(self):
        self.raises(qattn.InvalidArgumentError, "unknown precision 'int4'", self.q, self.k, self.v, precision="int4")
        # an integer goes to the library, which names it
        self.raises(qattn.InvalidArgumentError, "precision=9 is not a qattn_precision", self.q, self.k, self.v,
                    precision=9)

    def test_unknown_granularity_and_layout(self):
        self.raises(qattn.InvalidArgumentError, "unknown granularity 'per_row'", self.q, self.k, self.v,
                    precision="int8_fp8", granularity="per_row")
        self.raises(qattn.InvalidArgumentError, "layout='BHSD'", self.q, self.k, self.v, layout="BHSD")

    def test_quantization_options_on_exact(self):
        self.raises(qattn.InvalidArgumentError, "granularity and smooth_k apply to quantized precisions only",
                    self.q, self.k, self.v, precision="exact", granularity="per_block")

    def test_unsupported_head_dim(self):
        q, k, v = (x[..., :40] for x in (self.q, self.k, self.v))
        self.raises(qattn.UnsupportedError, "head dim 40 is not supported by the cpu backend", q, k, v)

    def test_scale(self):
        self.raises(qattn.InvalidArgumentError, "sm_scale must be finite", self.q, self.k, self.v,
                    sm_scale=float("inf"))
        self.raises(qattn.InvalidArgumentError, "sm_scale=0 is not supported", self.q, self.k, self.v, sm_scale=0)

    def test_rank_and_kinds(self):
        self.raises(qattn.InvalidArgumentError, "q must be 4-D", self.q[0], self.k, self.v)
        self.raises(qattn.InvalidArgumentError, "must be a torch.Tensor or a numpy.ndarray", self.q.tolist(),
                    self.k, self.v)

    def test_empty_sequence(self):
        self.raises(qattn.InvalidArgumentError, "k.shape[2] (N) must be > 0, got 0", self.q, self.k[:, :, :0],
                    self.v[:, :, :0])


if __name__ == "__main__":
    unittest.main()
