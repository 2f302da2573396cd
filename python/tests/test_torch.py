"""qattn.attention on torch tensors: CPU tensors on the CPU backend, CUDA
tensors on the CUDA backend. Skipped where torch is not importable."""
import unittest

from support import BARS, MODES, QUANTIZED, metrics, np, qattn, reference, torch

TORCH_MISSING = "torch is not importable"
CUDA_USABLE = False
if torch is not None and torch.cuda.is_available():
    CUDA_USABLE = any(b.name == "cuda" and b.usable for b in qattn.backends())


def as_numpy(t):
    return t.detach().to("cpu", torch.float64).numpy()


class TorchCase(unittest.TestCase):
    def check(self, out, ref, mode, what=""):
        cos, rel, _ = metrics(as_numpy(out), ref)
        cos_min, rel_max = BARS[mode]
        self.assertGreaterEqual(cos, cos_min, "%s %s: cosine %.7f below %g" % (mode, what, cos, cos_min))
        self.assertLessEqual(rel, rel_max, "%s %s: rel L1 %.5f above %g" % (mode, what, rel, rel_max))

    def qkv(self, device, dtype, b=1, hq=2, hkv=None, nq=128, nk=None, d=64, layout="HND", kbias=False):
        hkv = hq if hkv is None else hkv
        nk = nq if nk is None else nk
        gen = torch.Generator(device="cpu").manual_seed(99)

        def make(h, n, bias=None):
            shape = (b, h, n, d) if layout == "HND" else (b, n, h, d)
            x = torch.randn(shape, generator=gen)
            if bias is not None:
                x = x + bias
            return x.to(device=device, dtype=dtype)

        bias = 8.0 * torch.randn(d, generator=gen) if kbias else None
        return make(hq, nq), make(hkv, nk, bias), make(hkv, nk)


@unittest.skipIf(torch is None or np is None, TORCH_MISSING)
class TorchCpu(TorchCase):
    def test_dtypes_and_modes(self):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            q, k, v = self.qkv("cpu", dtype)
            ref, ref_lse = reference(as_numpy(q), as_numpy(k), as_numpy(v))
            for mode in MODES:
                with self.subTest(dtype=str(dtype), mode=mode):
                    out, lse = qattn.attention(q, k, v, precision=mode, return_lse=True)
                    self.assertEqual((out.dtype, out.device.type, tuple(out.shape)), (dtype, "cpu", tuple(q.shape)))
                    self.assertEqual((lse.dtype, tuple(lse.shape)), (torch.float32, (1, 2, 128)))
                    # bf16 outputs round to 8 bits: the exact bar is for 11
                    self.check(out, ref, "int8_fp16" if (mode == "exact" and dtype == torch.bfloat16) else mode)
                    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=0.05, rtol=0)

    def test_views_with_storage_offsets(self):
        big = torch.randn(1, 3, 100, 64, dtype=torch.float16)
        q = big[:, 1:]  # storage_offset != 0
        k = big[:, :2, 10:]
        v = big[:, 1:, 10:]
        self.assertGreater(q.storage_offset(), 0)
        ref, _ = reference(as_numpy(q), as_numpy(k), as_numpy(v), causal=True)
        self.check(qattn.attention(q, k, v, is_causal=True, precision="exact"), ref, "exact", "views")

    def test_nhd_gqa_causal(self):
        q, k, v = self.qkv("cpu", torch.float16, b=2, hq=4, hkv=2, nq=64, nk=96, layout="NHD")
        ref, _ = reference(as_numpy(q), as_numpy(k), as_numpy(v), causal=True, layout="NHD")
        out = qattn.attention(q, k, v, is_causal=True, layout="NHD", precision="int8_fp8")
        self.assertEqual(tuple(out.shape), tuple(q.shape))
        self.check(out, ref, "int8_fp8", "NHD GQA")

    def test_matches_sdpa_when_not_causal(self):
        q, k, v = self.qkv("cpu", torch.float32)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out = qattn.attention(q, k, v, precision="exact")
        self.assertLess((out - expected).abs().max().item(), 1e-4)

    def test_autograd_is_refused(self):
        q, k, v = self.qkv("cpu", torch.float32)
        q.requires_grad_(True)
        with self.assertRaises(qattn.UnsupportedError) as cm:
            qattn.attention(q, k, v)
        self.assertIn("no backward pass", cm.exception.message)
        with torch.no_grad():
            qattn.attention(q, k, v)

    def test_mixed_kinds_and_bad_dtypes(self):
        q, k, v = self.qkv("cpu", torch.float16)
        with self.assertRaises(qattn.InvalidArgumentError) as cm:
            qattn.attention(q, k.numpy(), v)
        self.assertIn("must all be torch tensors or all numpy arrays", cm.exception.message)
        with self.assertRaises(qattn.UnsupportedError) as cm:
            qattn.attention(q.double(), k.double(), v.double())
        self.assertIn("q.dtype=torch.float64 has no qattn dtype", cm.exception.message)
        with self.assertRaises(qattn.InvalidArgumentError) as cm:
            qattn.attention(q, k.float(), v)
        self.assertIn("dtypes differ", cm.exception.message)


@unittest.skipIf(not CUDA_USABLE, "torch with CUDA and a qattn library with a usable cuda backend are needed")
class TorchCuda(TorchCase):
    def test_modes_against_fp64(self):
        for dtype in (torch.float16, torch.bfloat16):
            for causal in (False, True):
                q, k, v = self.qkv("cuda", dtype, b=2, hq=4, hkv=2, nq=300, nk=520)
                ref, ref_lse = reference(as_numpy(q), as_numpy(k), as_numpy(v), causal=causal)
                for mode in ("auto",) + MODES:
                    with self.subTest(dtype=str(dtype), causal=causal, mode=mode):
                        try:
                            plan = qattn.attention_plan(q, k, v, is_causal=causal, precision=mode)
                        except qattn.UnsupportedError as e:
                            self.assertNotEqual(mode, "exact", e.message)
                            continue
                        chosen = plan.info.precision
                        out, lse = qattn.attention(q, k, v, is_causal=causal, precision=mode, return_lse=True)
                        torch.cuda.synchronize()
                        self.assertEqual(out.device, q.device)
                        bar = "int8_fp16" if (chosen == "exact" and dtype == torch.bfloat16) else chosen
                        self.check(out, ref, bar, "cuda")
                        np.testing.assert_allclose(lse.cpu().numpy(), ref_lse, atol=0.05, rtol=0)

    def test_kbias_and_nhd(self):
        q, k, v = self.qkv("cuda", torch.float16, b=1, hq=8, nq=1024, layout="NHD", kbias=True)
        ref, _ = reference(as_numpy(q), as_numpy(k), as_numpy(v), layout="NHD")
        for mode in QUANTIZED:
            with self.subTest(mode=mode):
                try:
                    out = qattn.attention(q, k, v, precision=mode, layout="NHD")
                except qattn.UnsupportedError:
                    continue
                self.check(out, ref, mode, "kbias NHD")

    def test_side_stream_and_graph_capture(self):
        q, k, v = self.qkv("cuda", torch.float16, hq=4, nq=512)
        expected = qattn.attention(q, k, v, precision="exact")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            on_side = qattn.attention(q, k, v, precision="exact")
        torch.cuda.current_stream().wait_stream(side)
        self.assertTrue(torch.equal(on_side, expected))
        # check_finite=False (the default) enqueues only: capturable
        graph = torch.cuda.CUDAGraph()
        capture_stream = torch.cuda.Stream()
        capture_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(capture_stream):
            qattn.attention(q, k, v, precision="exact")  # warm the plan cache outside the capture
            with torch.cuda.graph(graph, stream=capture_stream):
                captured = qattn.attention(q, k, v, precision="exact")
        torch.cuda.current_stream().wait_stream(capture_stream)
        q.mul_(0.5)
        graph.replay()
        torch.cuda.synchronize()
        self.assertTrue(torch.equal(captured, qattn.attention(q, k, v, precision="exact")))

    def test_check_finite_on_cuda(self):
        q, k, v = self.qkv("cuda", torch.float16)
        v[0, 0, 3, 3] = float("nan")
        with self.assertRaises(qattn.NonfiniteInputError):
            qattn.attention(q, k, v, precision="exact", check_finite=True)

    def test_unaligned_view_is_refused_with_the_library_message(self):
        big = torch.randn(1, 2, 64, 65, device="cuda", dtype=torch.float16)
        q = big[..., 1:]  # rows start 2 bytes past 16-byte boundaries
        with self.assertRaises(qattn.QattnError) as cm:
            qattn.attention(q, q, q, precision="exact")
        self.assertTrue(cm.exception.message)


@unittest.skipIf(torch is None or not torch.cuda.is_available() or CUDA_USABLE,
                 "only where torch has CUDA but the loaded library has no usable cuda backend")
class TorchCudaWithoutBackend(unittest.TestCase):
    def test_cuda_tensors_report_the_backend_unavailable(self):
        q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.float16)
        with self.assertRaises(qattn.UnavailableError) as cm:
            qattn.attention(q, q, q)
        self.assertIn("backend 'cuda'", cm.exception.message)


if __name__ == "__main__":
    unittest.main()
