"""bench/compare.py without a GPU: arguments, the problem grid, the accuracy
helpers and the output formats (the GPU run itself is the lead's)."""
import contextlib
import importlib.util
import io
import json
import math
import os
import sys
import tempfile
import unittest

from support import NUMPY_MISSING, REPO, np, reference, torch

_spec = importlib.util.spec_from_file_location("compare", os.path.join(REPO, "bench", "compare.py"))
compare = importlib.util.module_from_spec(_spec)
sys.modules["compare"] = compare  # dataclasses look their module up while the class is made
_spec.loader.exec_module(compare)


def quiet_exit(argv):
    """Runs parse_args expecting argparse to exit; returns its stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            compare.parse_args(argv)
        except SystemExit as e:
            if e.code == 0:
                raise AssertionError("argparse exited with status 0 for %s" % argv)
            return err.getvalue()
    raise AssertionError("parse_args accepted %s" % argv)


class Arguments(unittest.TestCase):
    def test_defaults_cover_the_whole_grid(self):
        args = compare.parse_args([])
        self.assertEqual(args.d, (64, 128))
        self.assertEqual(args.n, (1024, 4096, 16384, 32768))
        self.assertGreaterEqual(args.iters, 20)
        grid = compare.problems(args)
        self.assertEqual(len(grid), 2 * 4 * 2)
        self.assertEqual(compare.implementations(args),
                         ["flash", "cudnn", "qattn:exact", "qattn:int8_fp16", "qattn:int8_fp8",
                          "qattn:int8_fp8_f16acc"])

    def test_problem_sizes(self):
        args = compare.parse_args([])
        by_key = {(p.d, p.n, p.causal): p for p in compare.problems(args)}
        p = by_key[(128, 1024, False)]
        self.assertEqual((p.batch, p.heads), (16, 16))
        p = by_key[(64, 4096, True)]
        self.assertEqual((p.batch, p.heads), (4, 32))
        p = by_key[(128, 32768, False)]
        self.assertEqual((p.batch, p.heads), (1, 16))  # 16k tokens would be half a sequence: B stays 1
        for p in by_key.values():
            self.assertEqual(p.heads * p.d, 2048)
            self.assertEqual(p.batch * p.n, max(16384, p.n))

    def test_flops(self):
        full = compare.make_problem(128, 4096, False)
        self.assertEqual(full.flops, 4.0 * 4 * 16 * 4096 * 4096 * 128)
        self.assertEqual(compare.make_problem(128, 4096, True).flops, full.flops / 2)
        self.assertAlmostEqual(compare.tflops(full, 1.0), full.flops / 1e-3 / 1e12)
        self.assertTrue(math.isnan(compare.tflops(full, None)))

    def test_quick_and_filters(self):
        args = compare.parse_args(["--quick", "--backends", "qattn", "--modes", "int8_fp8,exact,int8_fp8",
                                   "--causal", "yes", "--vulkan"])
        self.assertEqual(args.d, (128,))
        self.assertEqual(args.n, (1024, 4096))
        self.assertEqual(args.iters, 20)
        self.assertEqual([p.causal for p in compare.problems(args)], [True, True])
        self.assertEqual(compare.implementations(args),
                         ["qattn:int8_fp8", "qattn:exact", "vulkan:int8_fp8", "vulkan:exact"])
        args = compare.parse_args(["--d", "64", "--n", "2048,8192", "--iters", "25", "--opencl",
                                   "--backends", "cudnn", "--modes", "auto"])
        self.assertEqual([(p.d, p.n) for p in compare.problems(args)], [(64, 2048), (64, 2048), (64, 8192),
                                                                        (64, 8192)])
        self.assertEqual(compare.implementations(args), ["cudnn", "opencl:auto"])

    def test_bad_arguments(self):
        self.assertIn("unknown mode int4", quiet_exit(["--modes", "exact,int4"]))
        self.assertIn("unknown backend xformers", quiet_exit(["--backends", "xformers"]))
        self.assertIn("must divide 2048", quiet_exit(["--d", "96"]))
        self.assertIn("positive integers", quiet_exit(["--n", "0"]))
        self.assertIn("--iters must be >= 1", quiet_exit(["--iters", "0"]))
        self.assertIn("invalid choice", quiet_exit(["--dtype", "fp8"]))

    def test_dry_run_lists_the_work_without_torch(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = compare.main(["--dry-run", "--quick", "--backends", "flash,qattn", "--modes", "exact"])
        self.assertEqual(status, 0)
        lines = out.getvalue().splitlines()
        self.assertEqual(lines, ["D=128 N=1024 full B=16 H=16: flash, qattn:exact",
                                 "D=128 N=1024 causal B=16 H=16: flash, qattn:exact",
                                 "D=128 N=4096 full B=4 H=16: flash, qattn:exact",
                                 "D=128 N=4096 causal B=4 H=16: flash, qattn:exact"])


@unittest.skipIf(np is None, NUMPY_MISSING)
class Accuracy(unittest.TestCase):
    def test_metrics(self):
        rng = np.random.default_rng(3)
        ref = rng.standard_normal((1, 2, 16, 8))
        same = compare.metrics(ref.astype(np.float32), ref)
        self.assertAlmostEqual(same["cos"], 1.0, places=6)
        self.assertLess(same["rel_l1"], 1e-6)
        self.assertTrue(same["finite"])
        out = ref.copy()
        out[0, 0, 0, 0] += 0.5
        m = compare.metrics(out, ref)
        self.assertAlmostEqual(m["max_abs"], 0.5)
        self.assertAlmostEqual(m["rel_l1"], 0.5 / np.abs(ref).sum())
        self.assertLess(m["cos"], 1.0)
        opposite = compare.metrics(-ref, ref)
        self.assertAlmostEqual(opposite["cos"], -1.0)
        self.assertAlmostEqual(opposite["rel_l1"], 2.0)
        out[0, 1, 2, 3] = np.nan
        broken = compare.metrics(out, ref)
        self.assertFalse(broken["finite"])
        self.assertTrue(math.isnan(broken["cos"]) and math.isnan(broken["max_abs"]))
        with self.assertRaises(ValueError):
            compare.metrics(ref[:, :1], ref)

    @unittest.skipIf(torch is None, "torch is not importable")
    def test_reference_matches_numpy_fp64(self):
        rng = np.random.default_rng(4)
        q, k, v = (rng.standard_normal((1, 2, n, 32)) for n in (40, 70, 70))
        for causal in (False, True):
            expected, _ = reference(q, k, v, causal=causal)
            got = compare.reference_attention(*(torch.from_numpy(x) for x in (q, k, v)), causal=causal,
                                              max_chunk_bytes=2 * 70 * 8 * 7)  # several chunks
            np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


@unittest.skipIf(np is None or torch is None, "torch is not importable")
class PortableRows(unittest.TestCase):
    """The --vulkan/--opencl rows' C-API path, driven here on a CPU context."""

    def test_bound_runs_and_reads_back_the_checked_heads(self):
        import qattn

        gen = torch.Generator().manual_seed(8)
        q, k, v = (torch.randn(2, 3, 96, 64, generator=gen).to(torch.float16) for _ in range(3))
        ctx = qattn.Context("cpu")
        for mode, causal in (("exact", True), ("int8_fp8", False)):
            bound = compare.PortableBound(qattn, ctx, mode, q, k, v, causal, check_finite=False)
            try:
                self.assertEqual(bound.timing, "host")
                self.assertIn(mode, bound.kernel)
                self.assertIsNone(bound.run())
                got = bound.output_subset(None, 2)
                self.assertEqual(got.shape, (1, 2, 96, 64))
                ref, _ = reference(*(x[0:1, :2].double().numpy() for x in (q, k, v)), causal=causal)
                m = compare.metrics(got, ref)
                self.assertGreater(m["cos"], 0.999)
                self.assertEqual(len(compare.host_time(bound.run, 1, 3)), 3)
            finally:
                compare.close_bound(bound)

    def test_unsupported_plans_are_reported_as_such(self):
        import qattn

        q = torch.randn(1, 2, 32, 40).to(torch.float16)  # the CPU backend takes head dims in multiples of 16
        with self.assertRaises(compare.Unsupported) as cm:
            compare.PortableBound(qattn, qattn.Context("cpu"), "exact", q, q, q, False, False)
        self.assertIn("head dim 40", str(cm.exception))


def fake_result(impl, status="ok", d=128, n=4096, causal=False):
    p = compare.make_problem(d, n, causal)
    r = {"impl": impl, "d": d, "n": n, "causal": causal, "batch": p.batch, "heads": p.heads, "flops": p.flops,
         "status": status, "message": "", "kernel": "", "median_ms": None, "tflops": None, "times_ms": [],
         "timing": None, "accuracy": {}}
    if status == "ok":
        r.update(median_ms=2.5, tflops=compare.tflops(p, 2.5), times_ms=[2.4, 2.5, 2.6], timing="cuda_events",
                 accuracy={"randn": {"cos": 0.9999, "rel_l1": 0.0123, "max_abs": 0.02, "finite": True},
                           "kbias": {"cos": float("nan"), "rel_l1": 0.05, "max_abs": 0.1, "finite": False}})
    elif status == "unsupported":
        r["message"] = "int8_fp8 needs FP8 matrix units"
    else:
        r["message"] = "RuntimeError: boom | bang"
    return r


class Outputs(unittest.TestCase):
    def setUp(self):
        self.results = [fake_result("flash"), fake_result("qattn:int8_fp8", "unsupported"),
                        fake_result("qattn:exact", "error"), fake_result("cudnn", causal=True)]
        self.meta = {"date": "2026-01-01 00:00 UTC", "device": "Test GPU", "torch": "2.11.0", "cuda": "13.0",
                     "command": "python3 bench/compare.py --quick", "iters": 30, "warmup": 5,
                     "ref_dtype": "float64", "ref_heads": 2, "qattn": "0.1.0", "dtype": "fp16"}

    def test_text_rows(self):
        ok = compare.text_row(self.results[0])
        self.assertIn("D=128 N=4096 full B=4 H=16", ok)
        self.assertIn("2.500", ok)
        self.assertIn("%.1f" % self.results[0]["tflops"], ok)
        self.assertIn("0.999900", ok)
        self.assertIn("nan", ok)
        self.assertIn("unsupported", compare.text_row(self.results[1]))
        self.assertIn("error: RuntimeError: boom", compare.text_row(self.results[2]))
        self.assertEqual(len(compare.TEXT_HEADER.split()), 10)

    def test_markdown(self):
        text = compare.markdown(self.results, self.meta)
        self.assertIn("## qattn vs torch SDPA on Test GPU", text)
        for needle in ("- date: 2026-01-01 00:00 UTC", "- torch: 2.11.0", "`python3 bench/compare.py --quick`",
                       "### D=128, full attention", "### D=128, causal", "| unsupported |",
                       "error: RuntimeError: boom \\| bang"):
            self.assertIn(needle, text)
        tables = [l for l in text.splitlines() if l.startswith("|")]
        widths = {l.count(" | ") for l in tables if not l.startswith("|---")}
        self.assertEqual(len(widths), 1, "every table row has the same number of cells")
        row = [l for l in tables if "| flash |" in l][0]
        self.assertIn("| 4096 | 4×16 | flash | 2.500 |", row)

    def test_json_is_strict(self):
        with tempfile.TemporaryDirectory() as tmp:
            args = compare.parse_args(["--json", os.path.join(tmp, "r.json"), "--markdown", os.path.join(tmp, "r.md")])
            compare.write_outputs(args, self.meta, self.results)
            with open(os.path.join(tmp, "r.json")) as f:
                data = json.loads(f.read(), parse_constant=lambda c: self.fail("non-strict JSON constant " + c))
            self.assertEqual(len(data["results"]), 4)
            self.assertIsNone(data["results"][0]["accuracy"]["kbias"]["cos"])
            with open(os.path.join(tmp, "r.md")) as f:
                self.assertIn("### D=128, causal", f.read())


if __name__ == "__main__":
    unittest.main()
