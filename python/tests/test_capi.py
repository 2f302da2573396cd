"""The ctypes mirror of qattn.h: enums, struct layouts, and the object layer
(Context, Buffer, Plan) on the CPU backend."""
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import unittest

from support import BARS, NUMPY_MISSING, REPO, metrics, np, qattn, randn, reference

capi = qattn.capi


class Values(unittest.TestCase):
    def test_version_matches_the_header_this_binding_mirrors(self):
        major, minor, _ = (int(x) for x in qattn.version().split("."))
        self.assertEqual((major, minor), capi.HEADER_VERSION)
        self.assertEqual(qattn.version_number() // 100, major * 100 + minor)

    def test_status_names(self):
        # The library names every status: enum values and names agree with it.
        for status in qattn.Status:
            self.assertEqual(qattn.status_str(status), "QATTN_" + status.name)
        self.assertEqual(qattn.status_str(99), "QATTN_ERR_UNKNOWN_STATUS")

    def test_dtypes(self):
        expected = {qattn.DType.F32: ("f32", 4), qattn.DType.F16: ("f16", 2), qattn.DType.BF16: ("bf16", 2),
                    qattn.DType.I8: ("i8", 1), qattn.DType.FP8_E4M3: ("fp8e4m3", 1)}
        self.assertEqual(len(expected), capi.DTYPE_COUNT)
        for dtype, (name, size) in expected.items():
            self.assertEqual(qattn.dtype_name(dtype), name)
            self.assertEqual(qattn.dtype_size(dtype), size)
        self.assertEqual(qattn.dtype_size(capi.DTYPE_COUNT), 0)

    def test_precision_and_granularity_names(self):
        self.assertEqual(len(qattn.Precision), capi.PRECISION_COUNT)
        for p in qattn.Precision:
            self.assertEqual(qattn.precision_name(p), p.name.lower())
        self.assertEqual(sorted(qattn.PRECISIONS), sorted(p.name.lower() for p in qattn.Precision))
        for g in qattn.Granularity:
            self.assertEqual(qattn.granularity_name(g), g.name.lower())

    def test_tensor_descriptors_returned_by_value(self):
        hnd = qattn.tensor_hnd(qattn.DType.F16, 2, 3, 5, 64)
        self.assertEqual(hnd.dtype, qattn.DType.F16)
        self.assertEqual(list(hnd.shape), [2, 3, 5, 64])
        self.assertEqual(list(hnd.stride), [3 * 5 * 64, 5 * 64, 64, 1])
        nhd = qattn.tensor_nhd(qattn.DType.BF16, 2, 3, 5, 64)
        self.assertEqual(list(nhd.shape), [2, 3, 5, 64])
        self.assertEqual(list(nhd.stride), [5 * 3 * 64, 64, 3 * 64, 1])
        self.assertEqual(qattn.tensor_bytes(hnd), 2 * 3 * 5 * 64 * 2)
        padded = qattn.tensor_desc(qattn.DType.F32, [1, 1, 4, 16], [1000, 1000, 20, 1])
        self.assertEqual(qattn.tensor_bytes(padded), (3 * 20 + 16) * 4)
        self.assertEqual(qattn.tensor_bytes(qattn.tensor_desc(qattn.DType.F32, [1, 1, 0, 16], [1, 1, 16, 1])), 0)

    def test_backends(self):
        infos = qattn.backends()
        self.assertEqual([b.name for b in infos], ["cpu", "cuda", "vulkan", "opencl"])
        cpu = infos[0]
        self.assertTrue(cpu.built and cpu.usable)
        self.assertEqual(cpu.device_count, 1)
        self.assertEqual(cpu.reason, "")
        for b in infos:
            if not b.usable:
                self.assertTrue(b.reason)  # why not, in words

    def test_cpu_device_info(self):
        info = qattn.device_info("cpu", 0)
        self.assertTrue(info.name)
        self.assertEqual(info.vendor, "host")
        self.assertGreaterEqual(info.compute_units, 1)
        self.assertGreater(info.memory_bytes, 1 << 20)
        self.assertTrue(info.caps & qattn.CAP_UNIFIED_MEMORY)
        self.assertEqual(set(info.precisions), set(qattn.PRECISIONS))
        self.assertIn("head dims", info.details)
        with self.assertRaises(qattn.NotFoundError) as cm:
            qattn.device_info("cpu", 3)
        self.assertIn("device 3 does not exist", cm.exception.message)


class Contexts(unittest.TestCase):
    def test_unknown_and_unbuilt_backends(self):
        with self.assertRaises(qattn.NotFoundError) as cm:
            qattn.Context("nope")
        self.assertIn("unknown backend 'nope'", cm.exception.message)
        self.assertIsInstance(cm.exception, LookupError)
        for b in qattn.backends():
            if not b.usable:
                with self.assertRaises(qattn.UnavailableError) as cm:
                    qattn.Context(b.name)
                self.assertIn("backend '%s'" % b.name, cm.exception.message)
                self.assertIn(b.reason, cm.exception.message)

    def test_cpu_context(self):
        with qattn.Context("cpu", device=0, num_threads=1) as ctx:
            self.assertEqual(ctx.backend, "cpu")
            self.assertEqual(ctx.device_info, qattn.device_info("cpu", 0))
            ctx.synchronize()
        with self.assertRaises(qattn.InvalidArgumentError) as cm:
            qattn.Context("cpu", num_threads=-1)
        self.assertIn("num_threads=-1", cm.exception.message)

    def test_buffers(self):
        ctx = qattn.Context("cpu")
        buf = ctx.create_buffer(64)
        self.assertEqual(buf.size, 64)
        buf.upload(bytes(range(64)))
        self.assertEqual(bytes(buf.download()), bytes(range(64)))
        buf.fill(7, offset=8, nbytes=4)
        self.assertEqual(bytes(buf.download(7, offset=6)), bytes([6, 7, 7, 7, 7, 7, 12]))
        with self.assertRaises(qattn.InvalidArgumentError) as cm:
            buf.upload(bytes(10), offset=60)
        self.assertIn("10 bytes at offset 60 do not fit in the 64-byte buffer", cm.exception.message)
        with self.assertRaises(qattn.InvalidArgumentError) as cm:
            ctx.create_buffer(0)
        self.assertIn("bytes is 0", cm.exception.message)
        buf.close()
        with self.assertRaises(qattn.InvalidArgumentError):
            buf.size
        # the context outlives what was made on it, even when closed first
        buf2 = ctx.create_buffer(16)
        ctx.close()
        buf2.fill(1)
        self.assertEqual(bytes(buf2.download()), b"\x01" * 16)

    def test_a_collected_cycle_frees_the_context_last(self):
        # The garbage collector finalizes a cycle's objects in no set order: a
        # context caught in one with its buffers and plans (through an
        # exception's traceback, say) must outlive them. In a child process, so
        # a crash fails this test instead of the run.
        code = textwrap.dedent("""
            import gc, sys
            sys.path.insert(0, %r)
            import qattn
            for i in range(40):
                ctx = qattn.Context("cpu")
                t = qattn.tensor_hnd(qattn.DType.F16, 1, 1, 16, 64)
                plan = ctx.create_plan(qattn.make_desc(t, t, t, t))
                cycle = {"bufs": [ctx.create_buffer(64) for _ in range(3)], "ctx": ctx, "plan": plan}
                cycle["ctx"]._cycle = cycle  # the context's native handle is only reachable from the cycle
                cycle["bufs"].insert(0, ctx.create_buffer(32))
                del ctx, plan, cycle
                gc.collect()
            print("OK")
            """ % os.path.join(REPO, "python"))
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "OK"), result.stderr)

    def test_wrapped_host_memory(self):
        ctx = qattn.Context("cpu")
        mem = bytearray(32)
        array = (ctypes.c_char * 32).from_buffer(mem)
        buf = ctx.wrap(ctypes.addressof(array), 32, keepalive=array)
        buf.fill(0xAB, offset=4, nbytes=2)
        self.assertEqual(mem[3:7], bytearray([0, 0xAB, 0xAB, 0]))
        with self.assertRaises(qattn.InvalidArgumentError) as cm:
            ctx.wrap(0, 32)
        self.assertIn("native (the memory to wrap) is NULL", cm.exception.message)


@unittest.skipIf(np is None, NUMPY_MISSING)
class PlansThroughTheCApi(unittest.TestCase):
    """Plans and runs built by hand from descriptors, on library-owned buffers."""

    def setUp(self):
        self.ctx = qattn.Context("cpu")
        rng = np.random.default_rng(11)
        self.b, self.h, self.n, self.d = 1, 2, 96, 64
        self.q, self.k, self.v = (randn(rng, (self.b, self.h, self.n, self.d)) for _ in range(3))

    def desc(self, precision, **kw):
        t = qattn.tensor_hnd(qattn.DType.F16, self.b, self.h, self.n, self.d)
        return qattn.make_desc(t, t, t, t, precision=precision, return_lse=True, **kw)

    def buffers(self):
        bufs = {}
        for name in ("q", "k", "v"):
            bufs[name] = self.ctx.create_buffer(getattr(self, name).nbytes)
            bufs[name].upload(getattr(self, name))
        bufs["o"] = self.ctx.create_buffer(self.q.nbytes)
        bufs["lse"] = self.ctx.create_buffer(4 * self.b * self.h * self.n)
        return bufs

    def test_plan_info_fields(self):
        exact = self.ctx.create_plan(self.desc(qattn.Precision.EXACT))
        self.assertEqual(exact.info.precision, "exact")
        self.assertEqual(exact.info.granularity, "default")
        self.assertFalse(exact.info.smooth_k)
        self.assertEqual(exact.info.workspace_bytes, 0)
        self.assertEqual(exact.info.kernel, "cpu_flash_exact_d64")
        self.assertGreater(exact.info.q_tile, 0)
        self.assertEqual(exact.info.kv_tile, 64)
        f16acc = self.ctx.create_plan(self.desc(qattn.Precision.INT8_FP8_F16ACC,
                                                granularity=qattn.Granularity.PER_THREAD))
        info = f16acc.info
        self.assertEqual(info.precision, "int8_fp8_f16acc")
        self.assertEqual(info.granularity, "per_thread")
        self.assertTrue(info.smooth_k)
        self.assertEqual((info.q_quant_interleave, info.k_quant_interleave), (8, 8))
        self.assertGreater(info.q_quant_block, 0)
        self.assertGreater(info.k_quant_block, 0)
        self.assertEqual(info.v_fp8_max, 2.25)  # qattn.h: F16ACC scales V into [-2.25, 2.25]
        self.assertEqual(info.p_fp8_scale, 448.0)
        self.assertGreater(info.pv_f16_chunk, 0)
        self.assertEqual(info.workspace_bytes, f16acc.workspace_size)
        self.assertGreater(f16acc.workspace_size, self.q.size * 2)  # INT8 Q and K at least
        self.assertEqual(info.kernel, "cpu_flash_int8_fp8_f16acc_d64")
        self.assertIn("per_thread INT8 scales", f16acc.describe())
        fp8 = self.ctx.create_plan(self.desc(qattn.Precision.INT8_FP8)).info
        self.assertEqual((fp8.v_fp8_max, fp8.pv_f16_chunk), (448.0, 0))

    def test_run_each_mode(self):
        ref, ref_lse = reference(self.q, self.k, self.v)
        bufs = self.buffers()
        for precision in (qattn.Precision.EXACT, qattn.Precision.INT8_FP16, qattn.Precision.INT8_FP8,
                          qattn.Precision.INT8_FP8_F16ACC):
            with self.subTest(precision=precision.name):
                plan = self.ctx.plan(self.desc(precision))
                ws = self.ctx.create_buffer(plan.workspace_size) if plan.workspace_size else None
                bufs["o"].fill(0xFF)  # NaN poison
                plan.run(bufs["q"], bufs["k"], bufs["v"], bufs["o"], lse=bufs["lse"], workspace=ws)
                self.ctx.synchronize()
                out = np.frombuffer(bufs["o"].download(), dtype=np.float16).reshape(self.q.shape)
                lse = np.frombuffer(bufs["lse"].download(), dtype=np.float32).reshape(ref_lse.shape)
                cos, rel, _ = metrics(out, ref)
                self.assertGreaterEqual(cos, BARS[precision.name.lower()][0])
                self.assertLessEqual(rel, BARS[precision.name.lower()][1])
                np.testing.assert_allclose(lse, ref_lse, atol=0.05, rtol=0)

    def test_run_argument_errors(self):
        bufs = self.buffers()
        plan = self.ctx.create_plan(self.desc(qattn.Precision.INT8_FP8))
        with self.assertRaises(qattn.InvalidArgumentError) as cm:
            plan.run(bufs["q"], bufs["k"], bufs["v"], bufs["o"], lse=bufs["lse"])
        self.assertIn("args.workspace is NULL", cm.exception.message)
        ws = self.ctx.create_buffer(plan.workspace_size)
        with self.assertRaises(qattn.InvalidArgumentError) as cm:
            plan.run(bufs["q"], bufs["k"], bufs["v"], bufs["o"], lse=bufs["lse"], workspace=ws, stream=0x1234)
        self.assertIn("args.stream must be NULL on the cpu backend", cm.exception.message)
        with self.assertRaises(qattn.InvalidArgumentError) as cm:
            plan.run(bufs["q"], bufs["k"], bufs["v"], bufs["o"], lse=bufs["lse"], workspace=ws, o_offset=2)
        self.assertIn("args.o: ", cm.exception.message)
        with self.assertRaises(qattn.InvalidArgumentError) as cm:
            plan.run(bufs["q"], bufs["k"], bufs["v"], bufs["q"], lse=bufs["lse"], workspace=ws)
        self.assertIn("args.o overlaps args.q", cm.exception.message)
        other = qattn.Context("cpu").create_buffer(self.q.nbytes)
        with self.assertRaises(qattn.InvalidArgumentError) as cm:
            plan.run(bufs["q"], bufs["k"], bufs["v"], other, lse=bufs["lse"], workspace=ws)
        self.assertIn("args.o belongs to another context", cm.exception.message)

    def test_plan_errors_carry_the_message(self):
        t = qattn.tensor_hnd(qattn.DType.F16, 1, 2, 96, 64)
        bad = qattn.tensor_desc(qattn.DType.F16, [1, 2, 96, 64], [12288, 6144, 64, 2])
        with self.assertRaises(qattn.InvalidArgumentError) as cm:
            self.ctx.create_plan(qattn.make_desc(t, bad, t, t))
        self.assertIn("k.stride[3] must be 1", cm.exception.message)
        self.assertEqual(self.ctx.last_error, cm.exception.message)
        with self.assertRaises(qattn.InvalidArgumentError) as cm:
            self.ctx.create_plan(qattn.make_desc(t, t, t, t, flags=0x80))
        self.assertIn("flags=0x80 has unknown bits", cm.exception.message)


def _find_config_header():
    """include/qattn/qattn_config.h of the build the loaded library came from."""
    path = qattn.library_path()
    folder = os.path.dirname(os.path.abspath(path)) if os.path.sep in path else None
    if folder and os.path.isfile(os.path.join(folder, "include", "qattn", "qattn_config.h")):
        return os.path.join(folder, "include")
    return None


class StructLayouts(unittest.TestCase):
    """Compiles a probe against qattn.h and compares every struct's size and
    field offsets with the ctypes mirror."""

    STRUCTS = {
        "qattn_backend_info": capi.BackendInfo,
        "qattn_device_info": capi.DeviceInfo,
        "qattn_ctx_params": capi.CtxParams,
        "qattn_tensor_desc": capi.TensorDesc,
        "qattn_attention_desc": capi.AttentionDesc,
        "qattn_plan_info": capi.PlanInfo,
        "qattn_run_args": capi.RunArgs,
        "qattn_sparse_desc": capi.SparseDesc,
        "qattn_sparse_args": capi.SparseArgs,
        "qattn_kv_cache_desc": capi.KVCacheDesc,
        "qattn_kv_cache_sizes": capi.KVCacheSizes,
        "qattn_kv_cache_buffers": capi.KVCacheBuffers,
        "qattn_kv_meta_sizes": capi.KVMetaSizes,
        "qattn_kv_append_args": capi.KVAppendArgs,
        "qattn_paged_desc": capi.PagedDesc,
        "qattn_paged_args": capi.PagedArgs,
        "qattn_page_select_desc": capi.PageSelectDesc,
        "qattn_merge_desc": capi.MergeDesc,
        "qattn_merge_args": capi.MergeArgs,
        "qattn_evict_policy": capi.EvictPolicy,
    }

    def test_layouts_match_the_c_compiler(self):
        cc = shutil.which(os.environ.get("CC", "cc"))
        config = _find_config_header()
        if cc is None or config is None:
            self.skipTest("needs a C compiler and the build folder of the loaded library (for qattn_config.h)")
        lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "qattn/qattn.h"', "int main(void) {"]
        for cname, py in self.STRUCTS.items():
            lines.append('printf("%s sizeof %%zu\\n", sizeof(%s));' % (cname, cname))
            for field, _ in py._fields_:
                lines.append('printf("%s %s %%zu\\n", offsetof(%s, %s));' % (cname, field, cname, field))
        lines.append("return 0; }")
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.c")
            exe = os.path.join(tmp, "probe")
            with open(src, "w") as f:
                f.write("\n".join(lines))
            subprocess.run([cc, "-std=c11", "-I", os.path.join(REPO, "include"), "-I", config, src, "-o", exe],
                           check=True)
            output = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
        c_layout = {}
        for line in output.splitlines():
            cname, field, value = line.split()
            c_layout[(cname, field)] = int(value)
        for cname, py in self.STRUCTS.items():
            self.assertEqual(ctypes.sizeof(py), c_layout[(cname, "sizeof")], cname)
            for field, _ in py._fields_:
                self.assertEqual(getattr(py, field).offset, c_layout[(cname, field)], "%s.%s" % (cname, field))


if __name__ == "__main__":
    unittest.main()
