"""qattn.PagedKVCache and qattn.paged_attention on the CPU backend: decode and
chunked prefill against the fp64 reference over what the cache holds, page
selection (a covering budget is dense; a small one is attention over the
pages it returns), page mass, eviction loops with flat pool usage, errors,
and the README's decode loop."""
import contextlib
import io
import math
import os
import re
import unittest

from support import BARS, NUMPY_MISSING, REPO, metrics, np, qattn, reference

HAVE_PAGED = (qattn.capi.has("qattn_paged_select_plan_create") and
              qattn.capi.version_at_least(qattn.capi.PAGED_VERSION)) if np is not None else False
SKIP_WHY = NUMPY_MISSING if np is None else "the loaded libqattn predates the 0.3 paged API"

HQ, HKV, D, P = 4, 2, 64, 16
EXACT = BARS["exact"]


def ref_seq(q_rows, k, v, causal=True, sm_scale=None):
    """fp64 attention of q_rows [n, Hq, D] over k, v [L, Hkv, D] (qattn's conventions):
    (O [n, Hq, D], LSE [n, Hq])."""
    o, lse = reference(q_rows.transpose(1, 0, 2)[None], k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None],
                       causal=causal, sm_scale=sm_scale)
    return o[0].transpose(1, 0, 2), lse[0].T


def ref_selected(q_rows, k, v, pages_per_head, causal=True):
    """fp64 attention where KV head hk sees only the tokens of its selected
    logical pages (in order, as if they were the whole cache)."""
    n, hq, d = q_rows.shape
    group = hq // k.shape[1]
    out = np.zeros((n, hq, d))
    lse = np.zeros((n, hq))
    for hk, pages in enumerate(pages_per_head):
        pos = np.concatenate([np.arange(p * P, min((p + 1) * P, k.shape[0])) for p in pages])
        heads = slice(hk * group, (hk + 1) * group)
        o_h, l_h = ref_seq(q_rows[:, heads], k[pos][:, hk:hk + 1], v[pos][:, hk:hk + 1], causal=causal)
        out[:, heads], lse[:, heads] = o_h, l_h
    return out, lse


def assert_close(test, out, ref, what, bars=EXACT):
    cos, rel, _ = metrics(out, ref)
    test.assertGreaterEqual(cos, bars[0], "%s: cos %.7f" % (what, cos))
    test.assertLessEqual(rel, bars[1], "%s: rel L1 %.2e" % (what, rel))


@unittest.skipUnless(HAVE_PAGED, SKIP_WHY)
class Decode(unittest.TestCase):
    def setUp(self):
        self.ctx = qattn.Context("cpu")
        self.rng = np.random.default_rng(5)

    def kv(self, n, dtype=np.float16):
        return (self.rng.standard_normal((n, HKV, D)).astype(dtype),
                self.rng.standard_normal((n, HKV, D)).astype(dtype))

    def test_decode_every_dtype_and_layout(self):
        scales = {"fp8": 6.0 / 448.0, "int8": 6.0 / 127.0}  # no clipping of randn
        for dtype in qattn.CACHE_DTYPES:
            for layout in ("nhd", "hnd"):
                with self.subTest(dtype=dtype, layout=layout):
                    s = scales.get(dtype)
                    cache = qattn.PagedKVCache(self.ctx, 40, P, HKV, D, dtype=dtype, layout=layout, k_scale=s,
                                               v_scale=s, metadata=True)
                    seqs, host = [], []
                    for n in (1, 37, 130):  # one token, partial pages, several pages
                        seq = cache.add_sequence()
                        k, v = self.kv(n, np.float32)
                        cache.append(seq, k[:n // 2], v[:n // 2])  # two appends: the second continues a page
                        cache.append(seq, k[n // 2:], v[n // 2:])
                        seqs.append(seq)
                        host.append((k, v))
                    self.assertEqual([cache.length(s) for s in seqs], [1, 37, 130])
                    self.assertEqual(cache.pool_free_pages, 40 - (1 + 3 + 9))
                    q = self.rng.standard_normal((3, HQ, D)).astype(np.float32)
                    o, lse = qattn.paged_attention(cache, q, seqs, return_lse=True)
                    self.assertEqual((o.shape, o.dtype, lse.shape), (q.shape, np.float32, (3, HQ)))
                    for b, seq in enumerate(seqs):
                        k, v = cache.read(seq)
                        hk, hv = host[b]
                        if dtype in ("f16", "bf16"):  # the cache holds the appended values, rounded
                            tol = 1e-2 if dtype == "bf16" else 1e-3
                            np.testing.assert_allclose(k, hk, atol=tol * 4, rtol=tol)
                        elif dtype == "fp8":  # E4M3: within half a unit of its 3-bit mantissa
                            self.assertTrue(np.all(np.abs(k - hk) <= 2.0 ** -4 * np.abs(hk) + 1e-3))
                        else:  # INT8: within half a step
                            self.assertLess(np.abs(k - hk).max(), 0.5 * 6.0 / 127.0 + 1e-6)
                        ref_o, ref_lse = ref_seq(q[b:b + 1], k, v)
                        assert_close(self, o[b:b + 1], ref_o, "%s %s seq %d" % (dtype, layout, b))
                        np.testing.assert_allclose(lse[b:b + 1], ref_lse, atol=1e-3, rtol=0)

    def test_chunked_prefill_and_float16_queries(self):
        cache = qattn.PagedKVCache(self.ctx, 64, P, HKV, D)
        seqs = [cache.add_sequence() for _ in range(3)]
        prefix = [0, 50, 96]
        chunks = [23, 40, 1]
        for seq, n in zip(seqs, prefix):
            if n:
                cache.append(seq, *self.kv(n))
        for seq, n in zip(seqs, chunks):  # the chunk's own K/V first
            cache.append(seq, *self.kv(n))
        q = self.rng.standard_normal((sum(chunks), HQ, D)).astype(np.float16)
        for splits in (0, 3):
            with self.subTest(num_splits=splits):
                o, lse = qattn.paged_attention(cache, q, seqs, q_lens=chunks, return_lse=True, num_splits=splits)
                self.assertEqual(o.dtype, np.float16)
                row = 0
                for seq, n in zip(seqs, chunks):
                    k, v = cache.read(seq)
                    ref_o, ref_lse = ref_seq(q[row:row + n], k, v)
                    assert_close(self, o[row:row + n], ref_o, "seq %d" % seq, bars=(0.99999, 2e-3))
                    np.testing.assert_allclose(lse[row:row + n], ref_lse, atol=2e-3, rtol=0)
                    row += n
        # not causal: every query sees every key
        o = qattn.paged_attention(cache, q, seqs, q_lens=chunks, causal=False, sm_scale=0.1)
        k, v = cache.read(seqs[1])
        ref_o, _ = ref_seq(q[23:63], k, v, causal=False, sm_scale=0.1)
        assert_close(self, o[23:63], ref_o, "non-causal", bars=(0.99999, 2e-3))

    def test_free_sequence_returns_pages(self):
        cache = qattn.PagedKVCache(self.ctx, 8, P, HKV, D)
        a, b = cache.add_sequence(), cache.add_sequence()
        cache.append(a, *self.kv(40))
        cache.append(b, *self.kv(17))
        self.assertEqual(cache.pool_free_pages, 3)
        self.assertEqual(len(set(cache.pages(a)) | set(cache.pages(b))), 5)
        cache.free_sequence(a)
        self.assertEqual(cache.pool_free_pages, 6)
        self.assertEqual(cache.sequences, [b])
        with self.assertRaises(qattn.InvalidArgumentError):
            cache.length(a)


@unittest.skipUnless(HAVE_PAGED, SKIP_WHY)
class Selection(unittest.TestCase):
    def setUp(self):
        self.ctx = qattn.Context("cpu")
        rng = np.random.default_rng(9)
        self.rng = rng
        self.cache = qattn.PagedKVCache(self.ctx, 64, P, HKV, D, metadata=True)
        self.seqs = []
        for n in (200, 77, 150):
            seq = self.cache.add_sequence()
            self.cache.append(seq, rng.standard_normal((n, HKV, D)).astype(np.float16),
                              rng.standard_normal((n, HKV, D)).astype(np.float16))
            self.seqs.append(seq)
        self.q = rng.standard_normal((3, HQ, D)).astype(np.float32)

    def test_a_covering_budget_is_dense(self):
        dense, dense_lse = qattn.paged_attention(self.cache, self.q, self.seqs, return_lse=True)
        for select in (dict(budget_tokens=4096), qattn.PageSelect(budget_fraction=1.0)):
            o, lse, sel = qattn.paged_attention(self.cache, self.q, self.seqs, select=select, return_lse=True,
                                                return_selection=True)
            np.testing.assert_allclose(o, dense, atol=1e-5, rtol=0)
            np.testing.assert_allclose(lse, dense_lse, atol=1e-5, rtol=0)
            for b, seq in enumerate(self.seqs):
                for hk in range(HKV):
                    np.testing.assert_array_equal(sel[(seq, hk)], np.arange(len(self.cache.pages(seq))))

    def check_selected(self, q, q_lens, select):
        o, lse, sel = qattn.paged_attention(self.cache, q, self.seqs, q_lens=q_lens, select=select,
                                            return_lse=True, return_selection=True)
        self.assertEqual(set(sel), {(s, hk) for s in self.seqs for hk in range(HKV)})
        sel_desc = select if isinstance(select, qattn.PageSelect) else qattn.PageSelect(**select)
        row = 0
        for seq, n in zip(self.seqs, q_lens):
            npages = len(self.cache.pages(seq))
            lists = [sel[(seq, hk)] for hk in range(HKV)]
            for pages in lists:
                self.assertTrue(np.all(np.diff(pages) > 0))  # ascending, distinct
                if sel_desc.sink_pages:
                    self.assertIn(0, pages)                   # the sink page
                self.assertIn(npages - 1, pages)              # the last page
            k, v = self.cache.read(seq)
            ref_o, ref_lse = ref_selected(q[row:row + n], k, v, lists)
            assert_close(self, o[row:row + n], ref_o, "seq %d %r" % (seq, select))
            np.testing.assert_allclose(lse[row:row + n], ref_lse, atol=1e-3, rtol=0)
            row += n
        return sel

    def test_a_small_budget_is_attention_over_the_returned_pages(self):
        sel = self.check_selected(self.q, [1, 1, 1], dict(budget_tokens=48, sink_pages=1, recent_pages=1))
        for seq in self.seqs:
            npages = len(self.cache.pages(seq))
            for hk in range(HKV):
                self.assertEqual(len(sel[(seq, hk)]), min(3, npages))
        self.check_selected(self.q, [1, 1, 1], qattn.PageSelect(budget_fraction=0.25, sink_pages=0, recent_pages=2))
        self.check_selected(self.q, [1, 1, 1], dict(budget_tokens=32, epsilon=0.05, max_budget_tokens=128))

    def test_selection_with_a_prefill_chunk(self):
        # the chunk's pages are always read, so causal chunked prefill stays exact over the selection
        q_lens = [20, 1, 5]
        q = self.rng.standard_normal((sum(q_lens), HQ, D)).astype(np.float32)
        self.check_selected(q, q_lens, dict(budget_tokens=64))

    def test_page_mass(self):
        o, lse, mass = qattn.paged_attention(self.cache, self.q, self.seqs, return_lse=True, return_mass=True)
        M = max(len(self.cache.pages(s)) for s in self.seqs)
        self.assertEqual(mass.shape, (3, HKV, M))
        group = HQ // HKV
        np.testing.assert_allclose(mass.sum(axis=2), group, atol=1e-3)  # each row-head's mass sums to 1
        for b, seq in enumerate(self.seqs):
            k, v = (x.astype(np.float64) for x in self.cache.read(seq))
            n = k.shape[0]
            npages = len(self.cache.pages(seq))
            self.assertTrue(np.all(mass[b, :, npages:] == 0))
            for hk in range(HKV):
                want = np.zeros(npages)
                for h in range(hk * group, (hk + 1) * group):
                    s = k[:, hk] @ self.q[b, h].astype(np.float64) / math.sqrt(D)
                    p = np.exp(s - s.max())
                    want += np.add.reduceat(p / p.sum(), np.arange(0, n, P))  # per page
                np.testing.assert_allclose(mass[b, hk, :npages], want, atol=1e-4)


@unittest.skipUnless(HAVE_PAGED, SKIP_WHY)
class Eviction(unittest.TestCase):
    def run_stream(self, policy, keep_pages=8, sink_pages=1, recent_pages=2, total=700):
        rng = np.random.default_rng(3 if policy is None else 4)
        num_pages = keep_pages + 64 // P + 2
        cache = qattn.PagedKVCache(qattn.Context("cpu"), num_pages, P, HKV, D, metadata=True)
        seq = cache.add_sequence()
        host_k, host_v = np.zeros((0, HKV, D), np.float16), np.zeros((0, HKV, D), np.float16)
        appended, steps, checked, scattered = 0, 0, 0, 0
        while appended < total:
            T = int(rng.integers(1, 64))
            k = rng.standard_normal((T, HKV, D)).astype(np.float16)
            v = rng.standard_normal((T, HKV, D)).astype(np.float16)
            cache.append(seq, k, v)
            host_k, host_v = np.concatenate([host_k, k]), np.concatenate([host_v, v])
            appended += T
            q = rng.standard_normal((1, HQ, D)).astype(np.float32)
            o, mass = qattn.paged_attention(cache, q, [seq], return_mass=True)
            cache.accumulate_mass([seq], mass)
            if steps % 3 == 0:  # the output is attention over the kept tokens
                kk, vv = cache.read(seq)
                np.testing.assert_array_equal(kk, host_k.astype(np.float32))
                ref_o, _ = ref_seq(q, host_k, host_v)
                assert_close(self, o, ref_o, "step %d" % steps)
                checked += 1
            before = cache.pages(seq)
            freed = cache.evict(seq, keep_pages, sink_pages, recent_pages, scores=policy)
            after = cache.pages(seq)
            self.assertEqual(len(before) - freed, len(after))
            self.assertEqual(len(cache.scores(seq)), len(after))
            kept_logical = [i for i, p in enumerate(before) if p in set(after)]
            self.assertEqual(kept_logical[:sink_pages], list(range(sink_pages)))  # sinks stay
            self.assertEqual(kept_logical[-recent_pages:], list(range(len(before) - recent_pages, len(before))))
            window = list(range(sink_pages)) + list(range(len(before) - (len(after) - sink_pages), len(before)))
            scattered += kept_logical != window
            pos = np.concatenate([np.arange(i * P, min((i + 1) * P, host_k.shape[0])) for i in kept_logical])
            host_k, host_v = host_k[pos], host_v[pos]
            self.assertEqual(cache.length(seq), host_k.shape[0])
            used = num_pages - cache.pool_free_pages
            self.assertEqual(used, len(after))  # every page is the sequence's or free
            if appended > keep_pages * P:
                self.assertEqual(used, keep_pages)  # flat once warm
            steps += 1
        self.assertGreater(checked, 3)
        if policy is None:
            self.assertEqual(scattered, 0)  # sinks + the most recent pages, always
        else:
            self.assertGreater(scattered, 0)  # the mass kept older pages over newer ones

    def test_window_policy(self):
        self.run_stream(None)

    def test_mass_policy(self):
        self.run_stream("mass", sink_pages=0, recent_pages=1)

    def test_explicit_scores(self):
        cache = qattn.PagedKVCache(None, 16, P, HKV, D)
        seq = cache.add_sequence()
        rng = np.random.default_rng(0)
        cache.append(seq, rng.standard_normal((6 * P - 3, HKV, D)).astype(np.float32),
                     rng.standard_normal((6 * P - 3, HKV, D)).astype(np.float32))
        pages = cache.pages(seq)
        freed = cache.evict(seq, 3, sink_pages=1, recent_pages=1, scores=[0, 5, 1, 9, 2, 0])
        self.assertEqual(freed, 3)
        np.testing.assert_array_equal(cache.pages(seq), pages[[0, 3, 5]])  # the highest score in the middle stays
        self.assertEqual(cache.length(seq), 6 * P - 3 - 3 * P)
        self.assertEqual(cache.evict(seq, 3), 0)  # within the budget: nothing


@unittest.skipUnless(HAVE_PAGED, SKIP_WHY)
class BadInputs(unittest.TestCase):
    def setUp(self):
        self.cache = qattn.PagedKVCache("cpu", 4, P, HKV, D, metadata=True)
        self.seq = self.cache.add_sequence()
        self.k = np.zeros((20, HKV, D), np.float32)
        self.cache.append(self.seq, self.k, self.k)

    def raises(self, cls, text, fn, *args, **kw):
        with self.assertRaises(cls) as cm:
            fn(*args, **kw)
        self.assertIn(text, str(cm.exception))

    def test_cache_construction(self):
        self.raises(qattn.InvalidArgumentError, "unknown KV cache dtype 'f8'", qattn.PagedKVCache, None, 4, P, 1, 64,
                    dtype="f8")
        self.raises(qattn.InvalidArgumentError, "layout='bhnd'", qattn.PagedKVCache, None, 4, P, 1, 64, layout="bhnd")
        self.raises(qattn.InvalidArgumentError, "needs k_scale", qattn.PagedKVCache, None, 4, P, 1, 64, dtype="int8")
        self.raises(qattn.InvalidArgumentError, "takes none", qattn.PagedKVCache, None, 4, P, 1, 64, k_scale=1.0)
        self.raises(qattn.InvalidArgumentError, "[heads_kv=2]", qattn.PagedKVCache, None, 4, P, 2, 64, dtype="fp8",
                    k_scale=[1.0, 2.0, 3.0])
        self.raises(qattn.InvalidArgumentError, "page_size", qattn.PagedKVCache, None, 4, 0, 1, 64)
        self.raises(qattn.InvalidArgumentError, "ctx_or_backend", qattn.PagedKVCache, 3, 4, P, 1, 64)
        self.raises(qattn.NotFoundError, "unknown backend", qattn.PagedKVCache, "nope", 4, P, 1, 64)

    def test_append(self):
        c, s = self.cache, self.seq
        self.raises(qattn.InvalidArgumentError, "float32, float16 or bfloat16", c.append, s,
                    self.k.astype(np.float64), self.k.astype(np.float64))
        self.raises(qattn.InvalidArgumentError, "[T, heads_kv=2, head_dim=64]", c.append, s,
                    np.zeros((3, 1, 64), np.float32), np.zeros((3, 1, 64), np.float32))
        self.raises(qattn.InvalidArgumentError, "differs from k's", c.append, s, self.k, self.k[:3])
        self.raises(qattn.InvalidArgumentError, "share a dtype", c.append, s, self.k, self.k.astype(np.float16))
        self.raises(qattn.InvalidArgumentError, "not in this cache", c.append, 99, self.k, self.k)
        self.raises(qattn.InvalidArgumentError, "numpy.ndarray", c.append, s, [[0.0]], [[0.0]])
        # the pool runs dry: all or nothing
        self.raises(qattn.OutOfMemoryError, "pages asked", c.append, s, np.zeros((60, HKV, D), np.float32),
                    np.zeros((60, HKV, D), np.float32))
        self.assertEqual((c.length(s), c.pool_free_pages), (20, 2))
        nan = self.k[:1].copy()
        nan[0, 0, 0] = np.nan
        self.raises(qattn.NonfiniteInputError, "", c.append, s, nan, nan, check_finite=True)
        self.assertEqual((c.length(s), c.pool_free_pages), (20, 2))

    def test_attention(self):
        c, s = self.cache, self.seq
        q = np.zeros((1, HQ, D), np.float32)
        self.raises(qattn.InvalidArgumentError, "float32, float16 or bfloat16", qattn.paged_attention, c,
                    q.astype(np.int32), [s])
        self.raises(qattn.InvalidArgumentError, "[total_q, heads_q, head_dim]", qattn.paged_attention, c, q[0], [s])
        self.raises(qattn.InvalidArgumentError, "head dim 32", qattn.paged_attention, c, q[:, :, :32], [s])
        self.raises(qattn.InvalidArgumentError, "multiple of the cache's heads_kv", qattn.paged_attention, c,
                    np.zeros((1, 3, D), np.float32), [s])
        self.raises(qattn.InvalidArgumentError, "sum to q's 1 rows", qattn.paged_attention, c, q, [s], q_lens=[2])
        self.raises(qattn.InvalidArgumentError, "only 20 cached tokens", qattn.paged_attention, c,
                    np.zeros((21, HQ, D), np.float32), [s], q_lens=[21])
        self.raises(qattn.InvalidArgumentError, "needs select", qattn.paged_attention, c, q, [s],
                    return_selection=True)
        self.raises(qattn.InvalidArgumentError, "PagedKVCache", qattn.paged_attention, None, q, [s])
        nan = q.copy()
        nan[0, 1, 2] = np.inf
        self.raises(qattn.NonfiniteInputError, "", qattn.paged_attention, c, nan, [s], check_finite=True)
        self.assertEqual(qattn.paged_attention(c, q, s, check_finite=True).shape, q.shape)  # one id works too

    def test_select_errors(self):
        c, s = self.cache, self.seq
        q = np.zeros((1, HQ, D), np.float32)
        for select, text in ((dict(budget_tokens=-1), "budget_tokens=-1"),
                             (dict(), "budget_fraction must be in (0, 1]"),
                             (dict(budget_fraction=1.5), "budget_fraction must be in (0, 1]"),
                             (dict(budget_tokens=16, budget_fraction=0.5), "not both"),
                             (dict(budget_tokens=16, sink_pages=-1), "sink_pages=-1"),
                             (dict(budget_tokens=16, epsilon=1.5), "epsilon"),
                             (dict(budget_tokens=16, max_budget_tokens=64), "max_budget_tokens"),
                             (dict(budget=16), "unknown field(s) budget"),
                             ("16", "select must be None")):
            with self.subTest(select=select):
                self.raises(qattn.InvalidArgumentError, text, qattn.paged_attention, c, q, [s], select=select)
        plain = qattn.PagedKVCache("cpu", 4, P, HKV, D)
        seq = plain.add_sequence()
        plain.append(seq, self.k, self.k)
        self.raises(qattn.InvalidArgumentError, "metadata=True", qattn.paged_attention, plain, q, [seq],
                    select=dict(budget_tokens=16))

    def test_evict_errors(self):
        c, s = self.cache, self.seq
        self.raises(qattn.InvalidArgumentError, "keep_pages=1 must be", c.evict, s, 1, sink_pages=1, recent_pages=1)
        self.raises(qattn.InvalidArgumentError, "recent_pages (0, >= 1)", c.evict, s, 4, recent_pages=0)
        self.raises(qattn.InvalidArgumentError, "one float per page", c.evict, s, 1, 0, 1, scores=[1.0])
        self.raises(qattn.InvalidArgumentError, "'mass'", c.evict, s, 1, 0, 1, scores="h2o")
        self.assertEqual((c.length(s), len(c.pages(s))), (20, 2))


@unittest.skipUnless(HAVE_PAGED, SKIP_WHY)
class ReadmeExample(unittest.TestCase):
    def test_the_readme_decode_loop_runs(self):
        with open(os.path.join(REPO, "python", "README.md")) as f:
            text = f.read()
        section = text.split("## Paged decode with page selection and eviction", 1)[1]
        code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
        namespace = {}
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "README.md (paged decode)", "exec"), namespace)  # noqa: S102 - our own README
        self.assertTrue(printed.getvalue().startswith("(2, 8, 64)"), printed.getvalue())
        cache = namespace["cache"]
        self.assertTrue(all(len(cache.pages(s)) <= 12 for s in namespace["seqs"]))


if __name__ == "__main__":
    unittest.main()
