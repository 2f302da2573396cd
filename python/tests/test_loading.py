"""How the binding finds libqattn: $QATTN_LIBRARY alone when set, else the
installed library, else the repository's build folders; and what it refuses."""
import ctypes.util
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import unittest

from support import REPO, qattn

capi = qattn.capi
PACKAGE_DIR = os.path.join(REPO, "python")


def run_python(code, env_changes):
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    env["PYTHONPATH"] = PACKAGE_DIR
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          cwd=tempfile.gettempdir(), timeout=120)


class Search(unittest.TestCase):
    def test_a_set_variable_is_used_alone(self):
        result = run_python("""
            import qattn
            try:
                qattn.version()
            except qattn.LibraryNotFound as e:
                print("NOTFOUND", e)
            """, {"QATTN_LIBRARY": "/nonexistent/libqattn.so.0"})
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("NOTFOUND", result.stdout)
        self.assertIn("/nonexistent/libqattn.so.0 [$QATTN_LIBRARY]", result.stdout)
        self.assertNotIn("build folder", result.stdout)  # no silent fallback

    def test_without_the_variable(self):
        if not (ctypes.util.find_library("qattn") or capi._build_folder_candidates()):
            self.skipTest("no installed libqattn and no build*/ folder to find")
        result = run_python("""
            import qattn
            print("LOADED", qattn.library_path(), qattn.version())
            """, {"QATTN_LIBRARY": None})
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("LOADED", result.stdout)

    def test_build_folders_newest_first(self):
        candidates = capi._build_folder_candidates()
        for path in candidates:
            self.assertTrue(os.path.basename(os.path.dirname(path)).startswith("build"))
        times = [os.path.getmtime(p) for p in candidates]
        self.assertEqual(times, sorted(times, reverse=True))

    def test_a_second_library_is_refused(self):
        qattn.version()
        with self.assertRaises(RuntimeError):
            capi.load("/some/other/libqattn.so.0")


class Refusals(unittest.TestCase):
    def test_not_a_qattn_library(self):
        libm = ctypes.util.find_library("m")
        if libm is None:
            self.skipTest("no libm to load")
        lib, why = capi._try_load(libm)
        self.assertIsNone(lib)
        self.assertIn("not a qattn %d.%d library" % capi.HEADER_VERSION, why)

    def test_another_version(self):
        cc = shutil.which(os.environ.get("CC", "cc"))
        if cc is None:
            self.skipTest("needs a C compiler")
        # Every entry point, as stubs; only the version differs from the binding's.
        stubs = ["unsigned qattn_version_number(void) { return 10203; }",
                 'const char *qattn_version(void) { return "1.2.3"; }']
        for name in capi._PROTOTYPES:
            if name not in ("qattn_version_number", "qattn_version"):
                stubs.append("void %s(void) {}" % name)
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "fake.c")
            lib_path = os.path.join(tmp, "libqattn.so.0")
            with open(src, "w") as f:
                f.write("\n".join(stubs) + "\n")
            subprocess.run([cc, "-shared", "-fPIC", src, "-o", lib_path], check=True)
            lib, why = capi._try_load(lib_path)
        self.assertIsNone(lib)
        self.assertIn("library version 1.2.3, but this binding mirrors qattn.h %d.%d" % capi.HEADER_VERSION, why)


def build_stub_library(folder, version_number, version_text):
    """A library exporting every required entry point as a stub, of the given
    version; None without a C compiler."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return None
    stubs = ["unsigned qattn_version_number(void) { return %d; }" % version_number,
             'const char *qattn_version(void) { return "%s"; }' % version_text,
             'const char *qattn_last_error(const void *ctx) { (void)ctx; return ""; }']
    for name in capi._PROTOTYPES:
        if name not in ("qattn_version_number", "qattn_version", "qattn_last_error"):
            stubs.append("void %s(void) {}" % name)
    src = os.path.join(folder, "fake.c")
    lib_path = os.path.join(folder, "libqattn.so.0")
    with open(src, "w") as f:
        f.write("\n".join(stubs) + "\n")
    subprocess.run([cc, "-shared", "-fPIC", src, "-o", lib_path], check=True)
    return lib_path


class OlderMinors(unittest.TestCase):
    def test_a_0_2_library_loads_and_the_paged_api_says_what_is_missing(self):
        with tempfile.TemporaryDirectory() as tmp:
            lib_path = build_stub_library(tmp, 200, "0.2.0")
            if lib_path is None:
                self.skipTest("needs a C compiler")
            result = run_python("""
                import qattn
                print("VERSION", qattn.version(), qattn.capi.version_at_least((0, 3)))
                for call in (lambda: qattn.PagedKVCache(None, 8, 16, 1, 64),
                             lambda: qattn.create_paged_plan(None, None)):
                    try:
                        call()
                    except qattn.UnavailableError as e:
                        print("UNAVAILABLE", e)
                """, {"QATTN_LIBRARY": lib_path})
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("VERSION 0.2.0 False", result.stdout)
        self.assertEqual(result.stdout.count("UNAVAILABLE QATTN_ERR_UNAVAILABLE"), 2, result.stdout)
        self.assertIn("version 0.2.0) predates the paged KV cache and pruning API of qattn 0.3", result.stdout)


if __name__ == "__main__":
    unittest.main()
