"""qattn.sparse_attention (sequence pruning) on numpy arrays, the CPU backend:
structured masks, block layouts and predicted layouts against an fp64
reference masked the same way; the BlockLayout converters; structured_qkv;
tune_sparsity and its command line."""
import json
import math
import os
import subprocess
import sys
import tempfile
import types
import unittest

from support import BARS, NUMPY_MISSING, REPO, metrics, np, qattn, randn, reference

HAVE_SPARSE = qattn.capi.has("qattn_sparse_run") if np is not None else False
SPARSE_MISSING = "the loaded libqattn predates sparse attention"


def masked_reference(q, k, v, mask, sm_scale=None):
    """fp64 attention of HND q, k, v under an element mask [Nq, Nk] or
    [B, Hkv, Nq, Nk] (True: visible). Returns (O, LSE)."""
    return reference(q, k, v, sm_scale=sm_scale, mask=mask)


def pv_skip_reference(q, k, v, lam, step, causal):
    """fp64 emulation of qattn.h's pv_threshold rule: online softmax over key
    steps of `step` keys; a 16-row group (aligned to absolute rows) whose P in
    a step are all below 2^-lam (relative to the rows' running maxima, log2
    domain) adds nothing to P.V, while the denominator counts them."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, hq, nq, d = q.shape
    group = hq // k.shape[1]
    k, v = np.repeat(k, group, 1), np.repeat(v, group, 1)
    nk = k.shape[2]
    s = np.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d) * math.log2(math.e)
    if causal:
        s = np.where(np.arange(nk)[None] <= np.arange(nq)[:, None] + nk - nq, s, -np.inf)
    m = np.full((b, hq, nq), -np.inf)
    num, l = np.zeros((b, hq, nq, d)), np.zeros((b, hq, nq))
    for j0 in range(0, nk, step):
        st = s[..., j0:j0 + step]
        mn = np.maximum(m, st.max(-1))
        fin = np.isfinite(mn)
        alpha = np.where(fin & np.isfinite(m), np.exp2(np.where(np.isfinite(m), m, 0) - np.where(fin, mn, 0)), 0.0)
        p = np.where(fin[..., None], np.exp2(st - np.where(fin, mn, 0)[..., None]), 0.0)
        l = l * alpha + p.sum(-1)
        small = (p < 2.0 ** -lam).all(-1).reshape(b, hq, nq // 16, 16).all(-1).repeat(16, -1)
        pv = np.einsum("bhij,bhjd->bhid", p, v[..., j0:j0 + step, :])
        num = num * alpha[..., None] + np.where(small[..., None], 0.0, pv)
        m = mn
    return num / np.where(l > 0, l, 1.0)[..., None]


class Check(unittest.TestCase):
    def assert_close(self, out, ref, mode="exact", what=""):
        cos, rel, _ = metrics(out, ref)
        cos_min, rel_max = BARS[mode]
        self.assertGreaterEqual(cos, cos_min, "%s: cosine %.7f below %g" % (what, cos, cos_min))
        self.assertLessEqual(rel, rel_max, "%s: rel L1 %.5f above %g" % (what, rel, rel_max))

    def assert_lse(self, lse, ref_lse, atol=1e-3):
        self.assertTrue(np.array_equal(np.isneginf(lse), np.isneginf(ref_lse)), "-inf rows differ")
        fin = np.isfinite(ref_lse)
        np.testing.assert_allclose(lse[fin], ref_lse[fin], atol=atol, rtol=0)


# ----------------------------------------------------------------- C API


@unittest.skipIf(np is None, NUMPY_MISSING)
@unittest.skipUnless(HAVE_SPARSE, SPARSE_MISSING)
class SparseCApi(Check):
    def setUp(self):
        self.ctx = qattn.Context("cpu")
        rng = np.random.default_rng(5)
        self.shape = (1, 2, 96, 64)
        self.q, self.k, self.v = (randn(rng, self.shape, "float32") for _ in range(3))

    def desc(self):
        t = qattn.tensor_hnd(qattn.DType.F32, *self.shape)
        return qattn.make_desc(t, t, t, t, precision=qattn.Precision.EXACT)

    def buffers(self):
        bufs = {}
        for name in ("q", "k", "v"):
            bufs[name] = self.ctx.create_buffer(getattr(self, name).nbytes)
            bufs[name].upload(getattr(self, name))
        bufs["o"] = self.ctx.create_buffer(self.q.nbytes)
        return bufs

    def out(self, bufs):
        return np.frombuffer(bufs["o"].download(), dtype=np.float32).reshape(self.shape)

    def test_layout_rows_and_describe(self):
        sd = qattn.make_sparse_desc(window=(16, 0), sink_tokens=4)
        plan = self.ctx.create_sparse_plan(self.desc(), sd)
        self.assertEqual(plan.layout_rows(), (0, 0, 0))
        self.assertIn("sparse: window of 16 keys before, 0 after, 4 sinks", plan.describe())
        self.assertEqual(plan.sparse.window_left, 16)
        predict = qattn.make_sparse_desc(layout=qattn.SparseLayoutKind.PREDICT,
                                         predict=qattn.PredictParams(q_block=0, k_block=0))
        plan = self.ctx.create_sparse_plan(self.desc(), predict)
        self.assertEqual(plan.layout_rows(), (1 * 2 * 1, 128, 64))  # 0 picks 128 x 64; ceil(96 / 128) = 1
        self.assertIn("predicted layout of 128x64 blocks", plan.describe())
        dense = self.ctx.create_sparse_plan(self.desc(), None)
        self.assertIsNone(dense.sparse)
        self.assertEqual(dense.layout_rows(), (0, 0, 0))

    def test_blocks_plan_through_buffers(self):
        sd = qattn.make_sparse_desc(layout=qattn.SparseLayoutKind.BLOCKS, q_block=32, k_block=32)
        plan = self.ctx.create_sparse_plan(self.desc(), sd)
        rows, qb, kb = plan.layout_rows()
        self.assertEqual((rows, qb, kb), (2 * 3, 32, 32))
        mask = np.tril(np.ones((3, 3), bool))
        mask[2, 1] = False
        layout = qattn.BlockLayout.from_dense(mask, 32, 32, batch=1, heads_kv=2)
        ptr, idx = self.ctx.create_buffer(layout.indptr.nbytes), self.ctx.create_buffer(layout.indices.nbytes)
        ptr.upload(layout.indptr)
        idx.upload(layout.indices)
        bufs = self.buffers()
        plan.sparse_run(bufs["q"], bufs["k"], bufs["v"], bufs["o"], block_indptr=ptr, block_indices=idx,
                        block_count=layout.nnz)
        ref, _ = masked_reference(self.q, self.k, self.v, qattn.sparse_mask(96, 96, layout=layout))
        self.assert_close(self.out(bufs), ref, what="blocks through buffers")
        with self.assertRaises(qattn.InvalidArgumentError) as cm:
            plan.run(bufs["q"], bufs["k"], bufs["v"], bufs["o"])
        self.assertIn("use qattn_sparse_run", cm.exception.message)
        with self.assertRaises(qattn.InvalidArgumentError) as cm:
            plan.sparse_run(bufs["q"], bufs["k"], bufs["v"], bufs["o"])
        self.assertIn("block_indptr is NULL", cm.exception.message)

    def test_the_library_checks_layouts_when_asked(self):
        t = qattn.tensor_hnd(qattn.DType.F32, *self.shape)
        desc = qattn.make_desc(t, t, t, t, precision=qattn.Precision.EXACT)  # flags 0: checks on
        plan = self.ctx.create_sparse_plan(desc, qattn.make_sparse_desc(layout=qattn.SparseLayoutKind.BLOCKS,
                                                                        q_block=32, k_block=32))
        bufs = self.buffers()
        indptr = np.array([0, 2, 2, 2, 2, 2, 2], np.int32)
        indices = np.array([1, 0], np.int32)  # not ascending
        ptr, idx = self.ctx.create_buffer(indptr.nbytes), self.ctx.create_buffer(indices.nbytes)
        ptr.upload(indptr)
        idx.upload(indices)
        with self.assertRaises(qattn.InvalidArgumentError) as cm:
            plan.sparse_run(bufs["q"], bufs["k"], bufs["v"], bufs["o"], block_indptr=ptr, block_indices=idx,
                            block_count=2)
        self.assertIn("block_indices[1]=0 (row 0) does not follow 1", cm.exception.message)

    def test_predicted_layout_read_through_buffers(self):
        sd = qattn.make_sparse_desc(layout=qattn.SparseLayoutKind.PREDICT, predict=qattn.PredictParams(
            sim_threshold=-1.0, topk=0.5, q_block=32, k_block=32))
        plan = self.ctx.create_sparse_plan(self.desc(), sd)
        bufs = self.buffers()
        ws = self.ctx.create_buffer(plan.workspace_size)
        plan.run(bufs["q"], bufs["k"], bufs["v"], bufs["o"], workspace=ws)
        indptr, indices, density = plan.read_layout(ws)
        layout = qattn.BlockLayout(indptr, indices, 32, 32, 1, 2, 3, 3)  # validates
        self.assertEqual(density.shape, (2,))
        np.testing.assert_allclose(density, layout.density(96, 96).ravel(), rtol=1e-6)
        ref, _ = masked_reference(self.q, self.k, self.v, qattn.sparse_mask(96, 96, layout=layout))
        self.assert_close(self.out(bufs), ref, what="predicted through buffers")

    def test_c_validation_messages(self):
        with self.assertRaises(qattn.InvalidArgumentError) as cm:
            self.ctx.create_sparse_plan(self.desc(), qattn.make_sparse_desc(
                layout=qattn.SparseLayoutKind.PREDICT, predict=qattn.PredictParams(sim_threshold=2.0)))
        self.assertIn("sim_threshold=2 must be in [-1, 1]", cm.exception.message)
        with self.assertRaises(qattn.InvalidArgumentError) as cm:
            self.ctx.create_sparse_plan(self.desc(), qattn.make_sparse_desc(
                layout=qattn.SparseLayoutKind.BLOCKS, q_block=24, k_block=32))
        self.assertIn("multiples of 16", cm.exception.message)


# ------------------------------------------------------- structured masks


@unittest.skipIf(np is None, NUMPY_MISSING)
@unittest.skipUnless(HAVE_SPARSE, SPARSE_MISSING)
class StructuredMasks(Check):
    def setUp(self):
        self.rng = np.random.default_rng(7)

    def qkv(self, b=1, hq=4, hkv=2, nq=160, nk=224, d=64, dtype="float32"):
        return (randn(self.rng, (b, hq, nq, d), dtype), randn(self.rng, (b, hkv, nk, d), dtype),
                randn(self.rng, (b, hkv, nk, d), dtype))

    def test_windows_sinks_and_causal_against_the_reference(self):
        cases = [(None, 0), ((32, 0), 0), ((32, 0), 4), ((10, 20), 0), ((-1, 5), 3), ((0, -1), 17), ((0, 0), 0),
                 ((200, 200), 2), (None, 5)]
        for dtype in ("float32", "float16"):
            for nq, nk in ((160, 224), (224, 160), (128, 128)):
                q, k, v = self.qkv(nq=nq, nk=nk, dtype=dtype)
                for causal in (False, True):
                    for window, sinks in cases:
                        what = "%s Nq=%d Nk=%d causal=%s window=%s sinks=%d" % (dtype, nq, nk, causal, window, sinks)
                        with self.subTest(what):
                            o, lse = qattn.sparse_attention(q, k, v, is_causal=causal, window=window,
                                                            sink_tokens=sinks, precision="exact", return_lse=True)
                            mask = qattn.sparse_mask(nq, nk, causal, window, sinks)
                            ref, ref_lse = masked_reference(q, k, v, mask)
                            self.assertEqual(o.dtype, q.dtype)
                            self.assert_close(o, ref, what=what)
                            self.assert_lse(lse, ref_lse)
                            empty = ~mask.any(axis=1)
                            self.assertTrue((o[:, :, empty] == 0).all())

    def test_nhd_layout_and_quantized_modes(self):
        q, k, v = self.qkv(dtype="float16")
        mask = qattn.sparse_mask(160, 224, True, (48, 0), 4)
        ref, _ = masked_reference(q, k, v, mask)
        nhd = [np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (q, k, v)]
        o = qattn.sparse_attention(*nhd, layout="NHD", is_causal=True, window=(48, 0), sink_tokens=4,
                                   precision="exact")
        self.assert_close(o.transpose(0, 2, 1, 3), ref, what="NHD")
        for mode in ("int8_fp16", "int8_fp8"):
            with self.subTest(mode=mode):
                o = qattn.sparse_attention(q, k, v, is_causal=True, window=(48, 0), sink_tokens=4, precision=mode)
                self.assert_close(o, ref, mode, what=mode)

    def test_window_equal_to_everything_is_dense(self):
        q, k, v = self.qkv()
        dense = qattn.attention(q, k, v, is_causal=True, precision="exact")
        o = qattn.sparse_attention(q, k, v, is_causal=True, window=(-1, -1), precision="exact")
        np.testing.assert_allclose(o, dense, atol=1e-6, rtol=0)

    def test_pv_threshold_follows_its_rule(self):
        # Causal rows of a long head see many steps far below their maxima.
        q, k, v = self.qkv(b=1, hq=2, hkv=1, nq=256, nk=256)
        q *= 2.0
        plan = qattn.sparse_attention_plan(q, k, v, is_causal=True, pv_threshold=0.5, precision="exact")
        self.assertIn("P.V skipped below -0.5 (log2)", plan.describe())
        dense = pv_skip_reference(q, k, v, 1e9, plan.info.kv_tile, True)
        for lam in (0.25, 0.5, 2.0):
            with self.subTest(lam=lam):
                o = qattn.sparse_attention(q, k, v, is_causal=True, pv_threshold=lam, precision="exact")
                emulated = pv_skip_reference(q, k, v, lam, plan.info.kv_tile, True)
                self.assert_close(o, emulated, what="pv_threshold=%g" % lam)
        # the rule did skip something at the smallest lambda
        self.assertGreater(metrics(pv_skip_reference(q, k, v, 0.25, plan.info.kv_tile, True), dense)[1], 1e-4)


# ------------------------------------------------------------ block layouts


@unittest.skipIf(np is None, NUMPY_MISSING)
@unittest.skipUnless(HAVE_SPARSE, SPARSE_MISSING)
class BlockLayouts(Check):
    def setUp(self):
        self.rng = np.random.default_rng(11)

    def qkv(self, b=2, hq=4, hkv=2, nq=200, nk=300, d=64, dtype="float32"):
        return (randn(self.rng, (b, hq, nq, d), dtype), randn(self.rng, (b, hkv, nk, d), dtype),
                randn(self.rng, (b, hkv, nk, d), dtype))

    def test_random_layouts_with_the_structured_masks(self):
        q, k, v = self.qkv()
        for dtype in ("float32", "float16"):
            q, k, v = (x.astype(dtype) for x in (q, k, v))
            for qb, kb in ((16, 16), (32, 48), (64, 32)):
                nqb, nkb = -(-200 // qb), -(-300 // kb)
                dense = self.rng.random((2, 2, nqb, nkb)) < 0.35
                dense[0, 1, 0] = False  # a row with no block: O = 0, LSE -inf
                layout = qattn.BlockLayout.from_dense(dense, qb, kb)
                for causal, window, sinks in ((False, None, 0), (True, None, 0), (True, (64, 0), 8)):
                    what = "%s %dx%d causal=%s window=%s" % (dtype, qb, kb, causal, window)
                    with self.subTest(what):
                        o, lse, used, density = qattn.sparse_attention(
                            q, k, v, is_causal=causal, window=window, sink_tokens=sinks, block_mask=layout,
                            precision="exact", return_lse=True, return_layout=True)
                        mask = qattn.sparse_mask(200, 300, causal, window, sinks, layout)
                        ref, ref_lse = masked_reference(q, k, v, mask)
                        self.assert_close(o, ref, what=what)
                        self.assert_lse(lse, ref_lse)
                        self.assertTrue((o[0, 2:4, :qb] == 0).all())
                        self.assertEqual(used, layout)
                        self.assertEqual(density.shape, (2, 2))

    def test_tuple_form_and_broadcast(self):
        q, k, v = self.qkv()
        shared = self.rng.random((7, 10)) < 0.5  # [Qb, Kb] for every (b, kv head)
        layout = qattn.BlockLayout.from_dense(shared, 32, 32)
        self.assertEqual(layout.shape, (1, 1, 7, 10))
        ref, _ = masked_reference(q, k, v, qattn.sparse_mask(200, 300, True, layout=layout))
        for mask in (layout, (layout.indptr, layout.indices, 32, 32),
                     (layout.expand(2, 2).indptr, layout.expand(2, 2).indices, 32, 32),
                     (list(layout.indptr), list(layout.indices), 32, 32)):
            o = qattn.sparse_attention(q, k, v, is_causal=True, block_mask=mask, precision="exact")
            self.assert_close(o, ref, what="%s" % type(mask).__name__)
        expanded = layout.expand(2, 2)
        self.assertEqual(expanded.shape, (2, 2, 7, 10))
        self.assertTrue((expanded.to_dense() == shared).all())
        empty = qattn.BlockLayout.from_dense(np.zeros((7, 10), bool), 32, 32)
        o = qattn.sparse_attention(q, k, v, block_mask=empty, precision="exact")
        self.assertTrue((o == 0).all())

    def test_validation(self):
        q, k, v = self.qkv()
        cases = [
            (lambda: qattn.BlockLayout([0, 2], [3, 1], 16, 16, 1, 1, 1, 4), "indices[1]=1 (row 0) does not follow 3"),
            (lambda: qattn.BlockLayout([0, 1], [4], 16, 16, 1, 1, 1, 4), "indices[0]=4 (row 0) is not a key block"),
            (lambda: qattn.BlockLayout([0, 1, 1], [0], 16, 16, 1, 1, 1, 4), "indptr has 3 entries"),
            (lambda: qattn.BlockLayout([1, 1], [], 16, 16, 1, 1, 1, 4), "indptr[0]=1 must be 0"),
            (lambda: qattn.BlockLayout([0, 2, 1], [0, 1], 16, 16, 1, 1, 2, 4), "indptr decreases"),
            (lambda: qattn.BlockLayout([0, 1], [0, 1], 16, 16, 1, 1, 1, 4), "indptr[-1]=1 must equal the 2"),
            (lambda: qattn.BlockLayout([0, 1], [0], 24, 16, 1, 1, 1, 4), "q_block=24: qattn's layout blocks"),
            (lambda: qattn.BlockLayout([0, 1], [0.5], 16, 16, 1, 1, 1, 4), "indices must hold integers"),
            (lambda: qattn.BlockLayout.from_dense(np.ones((7, 10)), 32, 32), "mask must be boolean"),
            (lambda: qattn.BlockLayout.from_dense(np.ones((2, 7, 10), bool), 32, 32, heads_kv=3), "cannot broadcast"),
            (lambda: qattn.sparse_attention(q, k, v, block_mask=qattn.BlockLayout.from_dense(
                np.ones((6, 10), bool), 32, 32)), "Nq=200, Nk=300 need 7 x 10"),
            (lambda: qattn.sparse_attention(q, k, v, block_mask=qattn.BlockLayout.from_dense(
                np.ones((3, 7, 10), bool), 32, 32)), "heads_kv=3 does not match the problem's 2"),
            (lambda: qattn.sparse_attention(q, k, v, block_mask=([0, 1], [0], 32, 32)), "indptr has 1 rows"),
            (lambda: qattn.sparse_attention(q, k, v, block_mask="dense"), "block_mask must be a BlockLayout"),
            (lambda: qattn.sparse_attention(q, k, v, block_mask=qattn.BlockLayout.from_dense(
                np.ones((7, 10), bool), 32, 32), predict=True), "block_mask and predict are exclusive"),
            (lambda: qattn.sparse_attention(q, k, v, window=5), "window=5 must be a pair"),
            (lambda: qattn.sparse_attention(q, k, v, window=(-2, 0)), "each side is >= 0, or -1"),
            (lambda: qattn.sparse_attention(q, k, v, sink_tokens=-1), "sink_tokens=-1"),
            (lambda: qattn.sparse_attention(q, k, v, window=(4, 4), return_layout=True), "return_layout needs"),
            (lambda: qattn.sparse_attention(q, k, v, predict={"theta": 0.5}), "predict: unknown keys ['theta']"),
            (lambda: qattn.sparse_attention(q, k, v, predict={"pv_threshold": 3}, pv_threshold=4),
             "pv_threshold=4 and predict's pv_threshold=3 disagree"),
        ]
        for fn, message in cases:
            with self.subTest(message):
                with self.assertRaises(ValueError) as cm:
                    fn()
                self.assertIn(message, str(cm.exception))


# ------------------------------------------------------------- converters


class FakeBlockMask:
    """Quacks like torch.nn.attention.flex_attention.BlockMask's fields."""

    def __init__(self, kv_num_blocks, kv_indices, full_kv_num_blocks=None, full_kv_indices=None, block=(128, 128)):
        self.kv_num_blocks, self.kv_indices = kv_num_blocks, kv_indices
        self.full_kv_num_blocks, self.full_kv_indices = full_kv_num_blocks, full_kv_indices
        self.BLOCK_SIZE = block


@unittest.skipIf(np is None, NUMPY_MISSING)
class Converters(unittest.TestCase):
    def setUp(self):
        self.rng = np.random.default_rng(3)

    def random_layout(self, b=2, h=3, qb=5, kb=7, q_block=32, k_block=64, p=0.4):
        return qattn.BlockLayout.from_dense(self.rng.random((b, h, qb, kb)) < p, q_block, k_block)

    def test_dense_round_trip(self):
        layout = self.random_layout()
        dense = layout.to_dense()
        self.assertEqual(dense.shape, (2, 3, 5, 7))
        self.assertEqual(qattn.BlockLayout.from_dense(dense, 32, 64), layout)
        self.assertEqual(layout.nnz, int(dense.sum()))
        for b, h, q in ((0, 0, 0), (1, 2, 4)):
            np.testing.assert_array_equal(layout.row(b, h, q), np.nonzero(dense[b, h, q])[0])
        self.assertNotEqual(layout, self.random_layout())
        self.assertEqual(qattn.BlockLayout.from_dense(dense.astype(np.int8), 32, 64), layout)
        self.assertEqual(qattn.BlockLayout.from_dense(dense.tolist(), 32, 64), layout)

    def test_flex_round_trip(self):
        layout = self.random_layout()
        num, idx = layout.to_flex()
        self.assertEqual((num.dtype, idx.dtype), (np.int32, np.int32))
        self.assertEqual(num.shape, (2, 3, 5))
        self.assertEqual(idx.shape, (2, 3, 5, 7))
        back = qattn.BlockLayout.from_flex(num, idx, q_block=32, k_block=64)
        self.assertEqual(back, layout)
        num2, idx2 = back.to_flex()
        np.testing.assert_array_equal(num2, num)
        np.testing.assert_array_equal(idx2, idx)
        # torch's ordering: each row's kept blocks ascending, then the others ascending
        dense = layout.to_dense()
        for b, h, q in ((0, 0, 0), (1, 2, 3)):
            kept = np.nonzero(dense[b, h, q])[0]
            rest = np.nonzero(~dense[b, h, q])[0]
            np.testing.assert_array_equal(idx[b, h, q], np.concatenate([kept, rest]))

    def test_flex_any_order_padding_and_full_blocks(self):
        # kv_indices entries past kv_num_blocks are garbage; kept ones in any order
        num = np.array([[[2, 0, 1]]])
        idx = np.array([[[[3, 1, 9, -5], [7, 7, 7, 7], [0, 0, 0, 0]]]])
        full_num = np.array([[[1, 1, 0]]])
        full_idx = np.array([[[[0, 0, 0, 0], [2, 0, 0, 0], [0, 0, 0, 0]]]])
        layout = qattn.BlockLayout.from_flex(num, idx, full_num, full_idx)
        self.assertEqual((layout.q_block, layout.k_block), (128, 128))  # FlexAttention's default
        np.testing.assert_array_equal(layout.to_dense()[0, 0],
                                      [[1, 1, 0, 1], [0, 0, 1, 0], [1, 0, 0, 0]])
        mask = FakeBlockMask(num, idx, full_num, full_idx, block=(64, 32))
        from_obj = qattn.BlockLayout.from_flex(mask)
        self.assertEqual((from_obj.q_block, from_obj.k_block), (64, 32))
        np.testing.assert_array_equal(from_obj.to_dense(), layout.to_dense())

    def test_flex_heads_broadcast_and_gqa(self):
        dense = self.rng.random((1, 4, 3, 5)) < 0.5  # 4 query heads
        num, idx = qattn.BlockLayout.from_dense(dense, 16, 16).to_flex()
        with self.assertRaises(ValueError) as cm:
            qattn.BlockLayout.from_flex(num, idx, q_block=16, k_block=16, heads_kv=2)
        self.assertIn("merge_gqa=True", str(cm.exception))
        merged = qattn.BlockLayout.from_flex(num, idx, q_block=16, k_block=16, heads_kv=2, merge_gqa=True)
        np.testing.assert_array_equal(merged.to_dense()[0], dense[0].reshape(2, 2, 3, 5).any(axis=1))
        same = qattn.BlockLayout.from_flex(num, idx, q_block=16, k_block=16, heads_kv=4)
        self.assertEqual(same.heads_kv, 4)
        one = qattn.BlockLayout.from_flex(num[:, :1], idx[:, :1], q_block=16, k_block=16, heads_kv=2)
        self.assertEqual(one.heads_kv, 1)  # broadcast by sparse_attention

    def test_flex_validation(self):
        cases = [
            (lambda: qattn.BlockLayout.from_flex(np.zeros((1, 1, 2), int), np.zeros((1, 1, 3, 4), int)),
             "they must be [B, H, Qb] and [B, H, Qb, KVb]"),
            (lambda: qattn.BlockLayout.from_flex(np.full((1, 1, 2), 5), np.zeros((1, 1, 2, 4), int)),
             "kv_num_blocks[0, 0, 0]=5 is not in [0, 4]"),
            (lambda: qattn.BlockLayout.from_flex(np.full((1, 1, 2), 2), np.zeros((1, 1, 2, 4), int)),
             "repeats a key block"),
            (lambda: qattn.BlockLayout.from_flex(np.full((1, 1, 2), 1), np.full((1, 1, 2, 4), 4)),
             "kv_indices[0, 0, 0, 0]=4 is not a key block in [0, 4)"),
            (lambda: qattn.BlockLayout.from_flex(np.ones((1, 1, 2), int), np.zeros((1, 1, 2, 4), int),
                                                 full_kv_num_blocks=np.ones((1, 1, 2), int)),
             "come together"),
            (lambda: qattn.BlockLayout.from_flex(np.ones((1, 1, 2), int), np.zeros((1, 1, 2, 4), int), q_block=8),
             "q_block=8"),
        ]
        for fn, message in cases:
            with self.subTest(message):
                with self.assertRaises(ValueError) as cm:
                    fn()
                self.assertIn(message, str(cm.exception))

    def test_bsr_round_trips(self):
        shared = self.random_layout(b=1, h=1, q_block=64, k_block=32)
        indptr, indices = shared.to_bsr()
        back = qattn.BlockLayout.from_bsr(indptr, indices, M=5 * 64, N=7 * 32, R=64, C=32)
        self.assertEqual(back, shared)
        # unsorted columns within a row are accepted and sorted; M, N need not be multiples
        rev = np.concatenate([indices[indptr[r]:indptr[r + 1]][::-1] for r in range(5)])
        self.assertEqual(qattn.BlockLayout.from_bsr(indptr, rev, M=5 * 64 - 3, N=7 * 32 - 5, R=64, C=32), shared)
        per_head = self.random_layout(b=1, h=3, q_block=64, k_block=32)
        ptrs, idxs = per_head.to_bsr(per_head=True)
        self.assertEqual(len(ptrs), 3)
        self.assertEqual(qattn.BlockLayout.from_bsr(ptrs, idxs, 320, 224, 64, 32), per_head)
        self.assertEqual(qattn.BlockLayout.from_bsr(np.stack(ptrs), idxs, 320, 224, 64, 32), per_head)
        with self.assertRaises(ValueError) as cm:
            per_head.to_bsr()
        self.assertIn("use to_bsr(per_head=True)", str(cm.exception))
        # a shared pattern expanded to every head still converts to one BSR
        self.assertEqual(qattn.BlockLayout.from_bsr(*shared.expand(2, 3).to_bsr(), 320, 224, 64, 32), shared)

    def test_bsr_validation(self):
        cases = [
            (lambda: qattn.BlockLayout.from_bsr([0, 1], [0], 64, 64, 32, 32), "indptr has 2 entries; M=64"),
            (lambda: qattn.BlockLayout.from_bsr([0, 1, 2], [0, 2], 64, 64, 32, 32), "indices[1]=2 is not a column"),
            (lambda: qattn.BlockLayout.from_bsr([0, 2, 2], [1, 1], 64, 64, 32, 32), "repeats a column block"),
            (lambda: qattn.BlockLayout.from_bsr([0, 1, 1], [0], 64, 64, 1, 32), "R=1: qattn's layout blocks"),
            (lambda: qattn.BlockLayout.from_bsr([1, 1, 1], [], 64, 64, 32, 32), "must start at 0"),
            (lambda: qattn.BlockLayout.from_bsr([[0, 1, 1]], np.zeros(1), 64, 64, 32, 32),
             "indices must be a list of Hkv arrays"),
        ]
        for fn, message in cases:
            with self.subTest(message):
                with self.assertRaises(ValueError) as cm:
                    fn()
                self.assertIn(message, str(cm.exception))

    def test_csr_rows_and_density(self):
        layout = self.random_layout(b=2, h=2, qb=4, kb=4, q_block=16, k_block=16)
        self.assertEqual(qattn.BlockLayout.from_csr(layout.indptr, layout.indices, 16, 16, 64, 64, 2, 2), layout)
        one = self.random_layout(b=1, h=1, qb=4, kb=4, q_block=16, k_block=16)
        self.assertEqual(qattn.BlockLayout.from_csr(one.indptr, one.indices, 16, 16, 60, 50, 2, 2).shape,
                         (1, 1, 4, 4))
        full = qattn.BlockLayout.from_dense(np.ones((4, 4), bool), 16, 16)
        np.testing.assert_allclose(full.density(64, 64, is_causal=True), [[1.0]])
        diag = qattn.BlockLayout.from_dense(np.eye(4, dtype=bool), 16, 16)
        np.testing.assert_allclose(diag.density(64, 64, is_causal=True), [[0.4]])  # 4 of 10 causal blocks
        vis = qattn.block_visibility(64, 64, 16, 16, is_causal=True, window=(0, 0), sink_tokens=1)
        np.testing.assert_array_equal(vis, np.eye(4, dtype=bool) | (np.arange(4)[None, :] == 0))


# ---------------------------------------------------------------- predicted


@unittest.skipIf(np is None, NUMPY_MISSING)
@unittest.skipUnless(HAVE_SPARSE, SPARSE_MISSING)
class PredictedLayouts(Check):
    def setUp(self):
        self.q, self.k, self.v, self.info = qattn.structured_qkv(2, 4, 2, 512, 512, 64, seed=3, dtype="float32")

    def test_read_back_layout_is_valid_and_the_run_equals_its_mask(self):
        for causal in (False, True):
            for params in (dict(sim_threshold=0.3, cdf_threshold=0.8, q_block=64, k_block=32),
                           dict(sim_threshold=-1.0, topk=0.25, q_block=32, k_block=64, sink_blocks=1,
                                recent_blocks=2, last_q_blocks=1),
                           qattn.PredictParams(sim_threshold=0.5, cdf_threshold=0.9)):
                with self.subTest(causal=causal, params=params):
                    o, lse, layout, density = qattn.sparse_attention(
                        self.q, self.k, self.v, is_causal=causal, predict=params, precision="exact",
                        return_lse=True, return_layout=True)
                    p = qattn.PredictParams.coerce(params)
                    self.assertEqual((layout.q_block, layout.k_block), (p.q_block, p.k_block))
                    self.assertEqual(layout.shape[:2], (2, 2))
                    self.assertEqual(density.shape, (2, 2))
                    self.assertEqual(density.dtype, np.float32)
                    np.testing.assert_allclose(density, layout.density(512, 512, causal), rtol=1e-6)
                    vis = qattn.block_visibility(512, 512, p.q_block, p.k_block, causal)
                    self.assertFalse((layout.to_dense() & ~vis).any(), "a kept block is not visible")
                    self.assertTrue(density.max() < 1.0)
                    ref, ref_lse = masked_reference(self.q, self.k, self.v,
                                                    qattn.sparse_mask(512, 512, causal, layout=layout))
                    self.assert_close(o, ref, what="predicted")
                    self.assert_lse(lse, ref_lse)
                    dense = layout.to_dense()
                    if p.last_q_blocks:
                        self.assertTrue((dense[:, :, -1] == vis[-1]).all())
                    if p.sink_blocks:
                        self.assertTrue(dense[:, :, :, 0].all())
                    if p.topk:  # at least ceil(topk * visible) per row
                        need = np.ceil(p.topk * vis.sum(axis=1))
                        self.assertTrue((dense.sum(axis=3) >= need).all())

    def test_theta_one_keeps_every_visible_block(self):
        o, layout, density = qattn.sparse_attention(self.q, self.k, self.v, is_causal=True, precision="exact",
                                                    predict=dict(sim_threshold=1.0, cdf_threshold=0.1),
                                                    return_layout=True)
        np.testing.assert_array_equal(density, np.ones((2, 2)))
        dense = qattn.attention(self.q, self.k, self.v, is_causal=True, precision="exact")
        np.testing.assert_allclose(o, dense, atol=1e-6, rtol=0)

    def test_with_a_window_and_pv_threshold(self):
        params = qattn.PredictParams(sim_threshold=0.0, cdf_threshold=0.9, q_block=64, k_block=64,
                                     pv_threshold=4.0)
        o, layout, density = qattn.sparse_attention(self.q, self.k, self.v, is_causal=True, window=(256, 0),
                                                    sink_tokens=8, predict=params, precision="exact",
                                                    return_layout=True)
        vis = qattn.block_visibility(512, 512, 64, 64, True, (256, 0), 8)
        self.assertFalse((layout.to_dense() & ~vis).any())
        np.testing.assert_allclose(density, layout.density(512, 512, True, (256, 0), 8), rtol=1e-6)
        no_pv = qattn.sparse_attention(self.q, self.k, self.v, is_causal=True, window=(256, 0), sink_tokens=8,
                                       block_mask=layout, precision="exact")
        self.assertLess(metrics(o, no_pv)[1], 0.01)

    def test_torch_like_objects_are_not_needed(self):
        # predict accepts any object with the fields (e.g. an argparse namespace)
        ns = types.SimpleNamespace(sim_threshold=0.2, cdf_threshold=0.7, q_block=64, k_block=64)
        plan = qattn.sparse_attention_plan(self.q, self.k, self.v, predict=ns)
        self.assertEqual(plan.sparse.q_block, 64)
        self.assertAlmostEqual(plan.sparse.cdf_threshold, 0.7, places=6)


# ------------------------------------------------------- structured data


@unittest.skipIf(np is None, NUMPY_MISSING)
class StructuredData(unittest.TestCase):
    def test_shapes_determinism_and_info(self):
        q, k, v, info = qattn.structured_qkv(2, 4, 2, 256, 384, 64, seed=9)
        self.assertEqual((q.shape, k.shape, v.shape), ((2, 4, 256, 64), (2, 2, 384, 64), (2, 2, 384, 64)))
        self.assertEqual(q.dtype, np.float16)
        q2, k2, v2, info2 = qattn.structured_qkv(2, 4, 2, 256, 384, 64, seed=9)
        self.assertTrue(np.array_equal(q, q2) and np.array_equal(k, k2) and np.array_equal(v, v2))
        self.assertEqual(info["needle_query"], info2["needle_query"])
        nhd = qattn.structured_qkv(2, 4, 2, 256, 384, 64, seed=9, layout="NHD")[0]
        self.assertTrue(np.array_equal(nhd.transpose(0, 2, 1, 3), q))
        self.assertTrue(0 <= info["needle_key"] < 384 - info["needle_len"])
        self.assertGreater(info["needle_query"] + 128, info["needle_key"] + info["needle_len"])
        self.assertEqual(info["segment_starts"][0], 0)
        none = qattn.structured_qkv(1, 2, 1, 128, 128, 64, seed=1, needle_len=0)[3]
        self.assertEqual((none["needle_query"], none["needle_key"]), (-1, -1))
        with self.assertRaises(ValueError):
            qattn.structured_qkv(1, 3, 2, 128, 128, 64)

    def test_the_structure_shows_in_the_attention_weights(self):
        q, k, v, info = qattn.structured_qkv(1, 2, 1, 1024, 1024, 64, seed=4, dtype="float32")
        q64, k64 = q[0].astype(np.float64), k[0, 0].astype(np.float64)
        s = q64 @ k64.T * info["sm_scale"]
        causal = np.arange(1024)[None] <= np.arange(1024)[:, None]
        s = np.where(causal, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        nq, nk, n = info["needle_query"], info["needle_key"], info["needle_len"]
        # the needle queries retrieve the needle keys
        self.assertGreater(p[:, nq:nq + n, nk:nk + n].sum(-1).mean(), 0.5)
        # sinks draw weight from far queries; local keys (within 16) hold much of the rest
        # (measured: 0.7 % on 4 sink keys, 88 % local)
        rows = np.arange(512, 1024, 37)
        self.assertGreater(p[:, rows, :info["sink_tokens"]].sum(-1).mean(), 0.003)
        local = np.abs(np.arange(1024)[None] - np.arange(1024)[:, None]) < 16
        self.assertGreater((p * local[None]).sum(-1)[:, rows].mean(), 0.5)
        # per key, the own segment's far keys draw more than other segments' (measured: 9.4x)
        seg = np.searchsorted(info["segment_starts"], np.arange(1024), side="right") - 1
        same = (seg[None] == seg[:, None]) & ~local & causal
        other = (seg[None] != seg[:, None]) & ~local & causal & (np.arange(1024)[None] >= info["sink_tokens"])
        per_key_same = (p * same).sum(-1) / np.maximum(same.sum(-1), 1)
        per_key_other = (p * other).sum(-1) / np.maximum(other.sum(-1), 1)
        self.assertGreater(per_key_same[:, rows].mean(), 5 * per_key_other[:, rows].mean())

    @unittest.skipUnless(HAVE_SPARSE, SPARSE_MISSING)
    def test_predicted_sparsity_and_error_at_2048(self):
        # Measured 2026-12-07 (cpu backend): sparsity 0.58-0.77 at rel L1 0.016-0.024 over seeds 0-2.
        params = dict(sim_threshold=0.3, cdf_threshold=0.9, sink_blocks=1, recent_blocks=3)
        for seed in (0, 1):
            q, k, v, info = qattn.structured_qkv(1, 4, 2, 2048, 2048, 64, seed=seed)
            dense = qattn.attention(q, k, v, is_causal=True, precision="exact")
            o, layout, density = qattn.sparse_attention(q, k, v, is_causal=True, precision="exact",
                                                        predict=params, return_layout=True)
            cos, rel, _ = metrics(o, dense)
            sparsity = 1.0 - float(density.mean())
            print("\n  structured N=2048 seed %d: sparsity %.3f (per kv head %s), rel L1 %.4f, cos %.5f" %
                  (seed, sparsity, np.round(1 - density.ravel(), 3), rel, cos), end="")
            self.assertGreaterEqual(sparsity, 0.45)
            self.assertLessEqual(rel, 0.04)

    @unittest.skipUnless(HAVE_SPARSE, SPARSE_MISSING)
    def test_needle_block_is_kept(self):
        q, k, v, info = qattn.structured_qkv(1, 4, 2, 2048, 2048, 64, seed=2)
        qb, kb = info["needle_query"] // 128, info["needle_key"] // 64
        # The needle query sits in the last quarter of the prompt: last_q_blocks covering it keeps every
        # block its queries see, the needle's included.
        last = 2048 // 128 - qb
        _, layout, density = qattn.sparse_attention(
            q, k, v, is_causal=True, return_layout=True,
            predict=dict(sim_threshold=0.0, cdf_threshold=0.5, sink_blocks=1, recent_blocks=3, last_q_blocks=last))
        for h in range(2):
            self.assertIn(kb, layout.row(0, h, qb))
        self.assertLess(float(density.mean()), 0.6)
        # Without it, pooled scores miss it (at tau 0.5) and the similarity test flags the needle's blocks
        # from theta 0.6 (measured over seeds 0-2: both KV heads keep it from theta 0.6-0.7).
        _, layout, _ = qattn.sparse_attention(q, k, v, is_causal=True, return_layout=True, predict=dict(
            sim_threshold=0.0, cdf_threshold=0.5, sink_blocks=1, recent_blocks=3))
        self.assertNotIn(kb, layout.row(0, 0, qb))
        _, layout, _ = qattn.sparse_attention(q, k, v, is_causal=True, return_layout=True, predict=dict(
            sim_threshold=0.6, cdf_threshold=0.5, sink_blocks=1, recent_blocks=3))
        for h in range(2):
            self.assertIn(kb, layout.row(0, h, qb))


# ------------------------------------------------------------------ tuning


@unittest.skipIf(np is None, NUMPY_MISSING)
@unittest.skipUnless(HAVE_SPARSE, SPARSE_MISSING)
class Tuning(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.q, cls.k, cls.v, _ = qattn.structured_qkv(1, 4, 2, 1024, 1024, 64, seed=5)
        cls.target = 0.03
        cls.result = qattn.tune_sparsity(cls.q, cls.k, cls.v, cls.target, is_causal=True, precision="exact",
                                         q_block=64, k_block=64, sim_grid=(0.0, 0.4, 0.7), cdf_iters=6)

    def test_meets_its_target(self):
        r = self.result
        print("\n" + r.table())
        self.assertEqual(len(r.heads), 2)
        for h in r.heads:
            self.assertTrue(h.met)
            self.assertLessEqual(h.rel_l1, self.target)
            self.assertLessEqual(h.rel_l1_blocks, 0.9 * self.target + 1e-12)
            self.assertGreater(h.sparsity, 0.2)
            self.assertEqual(h.params.recent_blocks, 2)  # q_block / k_block + 1
        self.assertTrue(r.common_met)
        c = r.common
        self.assertEqual(c.sim_threshold, max(h.params.sim_threshold for h in r.heads))
        self.assertEqual(c.cdf_threshold, max(h.params.cdf_threshold for h in r.heads))
        # the common parameters, run by sparse_attention, reach what the tuning measured
        dense = qattn.attention(self.q, self.k, self.v, is_causal=True, precision="exact")
        o, _, density = qattn.sparse_attention(self.q, self.k, self.v, is_causal=True, precision="exact",
                                               predict=r, return_layout=True)
        for h in range(2):
            rel = metrics(o[:, 2 * h:2 * h + 2], dense[:, 2 * h:2 * h + 2])[1]
            self.assertAlmostEqual(rel, r.common_rel_l1[h], places=6)
            self.assertAlmostEqual(float(density[0, h]), r.common_density[h], places=6)

    def test_per_head_runs(self):
        r = self.result
        o = r.attention(self.q, self.k, self.v, is_causal=True, precision="exact")
        dense = qattn.attention(self.q, self.k, self.v, is_causal=True, precision="exact")
        for h in range(2):
            rel = metrics(o[:, 2 * h:2 * h + 2], dense[:, 2 * h:2 * h + 2])[1]
            self.assertAlmostEqual(rel, r.heads[h].rel_l1, places=6)
        common = r.attention(self.q, self.k, self.v, per_head=False, is_causal=True, precision="exact")
        self.assertEqual(common.shape, self.q.shape)

    def test_json_round_trip(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "t.json")
            self.result.save(path)
            with open(path) as f:
                doc = json.load(f)
            back = qattn.SparsityTuning.load(path)
        self.assertEqual(doc["format"], "qattn.sparsity/1")
        self.assertEqual(back.common, self.result.common)
        self.assertEqual([h.params for h in back.heads], [h.params for h in self.result.heads])
        # the "common" object is a predict= argument as it stands
        plan = qattn.sparse_attention_plan(self.q, self.k, self.v, is_causal=True, predict=doc["common"])
        self.assertEqual(plan.sparse.recent_blocks, doc["common"]["recent_blocks"])
        with self.assertRaises(ValueError):
            qattn.SparsityTuning.from_dict({"format": "other"})

    def test_command_line(self):
        env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "python"))
        env.setdefault("QATTN_LIBRARY", qattn.library_path())
        help_text = subprocess.run([sys.executable, "-m", "qattn.tune_sparsity", "--help"], env=env,
                                   capture_output=True, text=True, check=True).stdout
        self.assertIn("--synthetic", help_text)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "t.json")
            run = subprocess.run([sys.executable, "-m", "qattn.tune_sparsity", "--synthetic", "--seq", "512",
                                  "--heads-q", "2", "--heads-kv", "1", "--causal", "--q-block", "64", "--k-block",
                                  "64", "--sim-grid", "0,0.5", "--cdf-iters", "4", "--quiet", "--out", out],
                                 env=env, capture_output=True, text=True)
            self.assertIn(run.returncode, (0, 1), run.stderr)
            self.assertIn("kv head", run.stdout)
            self.assertIn("common", run.stdout)
            self.assertEqual(qattn.SparsityTuning.load(out).problem["seq_q"], 512)
            np.save(os.path.join(tmp, "q.npy"), self.q[:, :2, :256])
            np.save(os.path.join(tmp, "k.npy"), self.k[:, :1, :256])
            np.save(os.path.join(tmp, "v.npy"), self.v[:, :1, :256])
            run = subprocess.run([sys.executable, "-m", "qattn.tune_sparsity", "--q", os.path.join(tmp, "q.npy"),
                                  "--k", os.path.join(tmp, "k.npy"), "--v", os.path.join(tmp, "v.npy"),
                                  "--q-block", "64", "--k-block", "64", "--sim-grid", "0", "--cdf-iters", "3",
                                  "--no-pv", "--quiet", "--out", "-"], env=env, capture_output=True, text=True)
            self.assertIn(run.returncode, (0, 1), run.stderr)
            self.assertIn("q.npy", run.stdout)
            bad = subprocess.run([sys.executable, "-m", "qattn.tune_sparsity"], env=env, capture_output=True,
                                 text=True)
            self.assertEqual(bad.returncode, 2)
            self.assertIn("give either --q/--k/--v or --synthetic", bad.stderr)


if __name__ == "__main__":
    unittest.main()
