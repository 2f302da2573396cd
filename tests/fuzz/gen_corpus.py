#!/usr/bin/env python3
"""Writes the seed corpus of the libFuzzer targets: tests/fuzz/corpus/<target>/.

Each seed spells out the header bytes a target reads first (see the comment
at the top of fuzz_<target>.c and its read_case), so that the seeds start
the fuzzer on every precision mode, page format, table kind, layout and
dtype, plus a few hostile mutations; the fuzzer mutates from there.
Deterministic: rerunning rewrites the same files.

    python3 tests/fuzz/gen_corpus.py [output folder, default tests/fuzz/corpus]
"""
import hashlib
import os
import random
import sys

rng = random.Random(21)


def seed_bytes():
    return bytes(rng.randrange(256) for _ in range(8))


def dense():
    seeds = []
    # header: precision, quant options, dtypes, flags, heads, Nq, Nk, D, 4 layouts
    for prec in range(5):
        for variant in range(6):
            quant = rng.randrange(256) if prec != 1 else 0
            dtype = [0, 1, 2, 4, 5, 0][variant]            # f16, bf16, f32, f16->f32 out, ...
            flags = [0x03, 0x02, 0x01, 0x0b, 0x13, 0x00][variant]  # causal, lse, sm_scale
            heads = [0, 0x0a, 0x03, 0x1b, 0x00, 0x05][variant]     # B, Hkv, GQA group
            nq = [3, 0, 40, 7, 250, 1][variant]
            nk = [3, 7, 5, 100, 2, 240][variant]
            d = [0, 6, 9, 10, 17, 3][variant]                # index into the D table
            layouts = [rng.randrange(64) for _ in range(4)]
            values = [rng.randrange(6), rng.randrange(20)] * 3
            arrangement = [rng.randrange(32) for _ in range(6)]
            body = bytes([prec, quant, dtype, flags, heads, nq, nk, d] + layouts + values) + seed_bytes()
            body += bytes(arrangement + [rng.randrange(256)])
            seeds.append(body)
    # hostile mutations: (op, args...) after a small valid case
    base = bytes([1, 0, 0, 2, 0, 3, 4, 0, 0, 0, 0, 0, 0, 8, 0, 8, 0, 8]) + seed_bytes() + bytes(7)
    mutations = [
        [0, 0, 2, 3],          # q.shape[N] = 2^31 - 1 family
        [0, 1, 0, 27],         # k.shape[B] = INT64_MAX
        [1, 0, 2, 5],          # q stride nudged: overlap
        [1, 3, 1, 200, 30],    # o stride hostile
        [2, 1, 4],             # k dtype
        [3, 0, 6],             # precision -1
        [4, 0],                # sm_scale NaN
        [4, 8],                # sm_scale FLT_MAX
        [5, 1, 0, 0, 0, 0, 0], # NaN in K
        [6, 3, 0, 32],         # o in q's buffer, overlapping
        [7, 3, 0, 40],         # o wraps q's memory
        [8, 1, 4],             # k buffer too small
        [9, 4],                # lse NULL
        [10, 0],               # q from another context
        [11], [12], [13], [14], [15],
        [16, 0, 6, 3],         # odd q offset
    ]
    for m in mutations:
        seeds.append(base + bytes(m))
    return seeds


def paged():
    seeds = []
    # header: format, heads, D, flags (batch, table, causal, lse, no-check), splits, q dtype+layout, o layout, extra
    for fmt in range(5):
        for variant in range(5):
            f = fmt | ([0, 8, 16, 32, 48][variant])
            heads = [0, 1, 2, 3, 5][variant]
            dim = [0, 2, 4, 1, 5][variant]
            flags = [0x00, 0x1d, 0x0e, 0x17, 0x2f][variant]
            splits = [0, 130, 131, 0, 133][variant]
            qd = [0, 1, 2, 5, 6][variant]
            od = [0, 1, 2, 3, 4][variant]
            extra = rng.randrange(16)
            lens = []
            for _ in range(4):
                lens += [rng.randrange(220), rng.randrange(256)]
            values = [rng.randrange(6), rng.randrange(20), rng.randrange(6), rng.randrange(20)]
            arrangement = [rng.randrange(32) for _ in range(14)]
            seeds.append(bytes([f, heads, dim, flags, splits, qd, od, extra] + lens + values) + seed_bytes() +
                         bytes(arrangement))
    base = seeds[1]
    for m in ([4, 1, 0, 200, 3], [4, 2, 1, 130], [5, 0, 1, 200, 28], [6, 0, 0, 0, 0, 0, 0], [7], [8, 0], [8, 4],
              [9, 1, 0, 3, 0, 10], [0, 1, 13], [2, 0, 200, 1, 0, 0, 4], [3, 8]):
        seeds.append(base + bytes(m))
    return seeds


def append():
    seeds = []
    # header: pages+page size, heads+D, format+layout, tokens, new dtype+layout, flags, scale factor, spare
    for fmt in range(5):
        for variant in range(5):
            seeds.append(bytes([rng.randrange(48), rng.randrange(24), fmt | (8 * (variant & 1)),
                                [1, 5, 12, 0, 9][variant], [0, 1, 2, 0x14, 0x19][variant], variant == 4,
                                rng.randrange(8), 0, rng.randrange(6), rng.randrange(20)]) + seed_bytes() +
                         bytes(rng.randrange(32) for _ in range(7)))
    base = seeds[12]
    for m in ([5, 0, 1], [5, 0, 200, 0], [6, 0, 0], [6, 0, 1], [7, 0, 0, 0, 0, 0, 0], [2, 1, 0], [0, 0, 0],
              [4, 0, 200, 29], [9, 4], [9, 1], [10, 0, 2, 0, 40]):
        seeds.append(base + bytes(m))
    return seeds


def merge():
    seeds = []
    # header: sizes, dims, dtypes, flags, v/s/o layouts, empty states
    for variant in range(16):
        seeds.append(bytes([rng.randrange(48), rng.randrange(32), rng.randrange(12), variant & 1,
                            rng.randrange(16), rng.randrange(16), rng.randrange(2), rng.randrange(4),
                            rng.randrange(6), rng.randrange(20)]) + seed_bytes() +
                     bytes(rng.randrange(32) for _ in range(4)))
    base = seeds[3]
    for m in ([0, 1, 0], [1, 0, 5], [1, 4, 200, 27], [2, 1, 4], [3, 0, 0, 0, 0, 0], [3, 0, 0, 0, 0, 2], [4], [5],
              [6, 0, 2, 0, 32], [6, 1, 2, 1, 33]):
        seeds.append(base + bytes(m))
    return seeds


def pool():
    seeds = []
    for variant in range(24):
        ops = []
        for _ in range(rng.randrange(4, 24)):
            ops += [rng.randrange(4)] + [rng.randrange(256) for _ in range(rng.randrange(1, 6))]
        create = [rng.randrange(224)] if variant % 6 else [230, rng.randrange(34)]
        seeds.append(bytes(create + ops))
    return seeds


def prune():
    seeds = []
    # header: format+layout+page size, heads+D, flags (batch, table, causal, lse, no-check, q dtype), selection
    # mode (fraction, adaptive, cap, rewrite, stale scales, splits), budget, sinks+recent, epsilon+cap, eviction
    # policy, eviction scores+extra pages; then (kv_len, q_len) per sequence, values, seed, arrangement
    for fmt in range(5):
        for variant in range(6):
            f = fmt | (8 * (variant & 1)) | (16 * [0, 2, 4, 5, 6, 7][variant])
            heads = [0, 1, 2, 3, 5, 8][variant]
            flags = [0x00, 0x1d, 0x4e, 0x17, 0xaf, 0x1a][variant]
            mode = [0x00, 0x02, 0x04, 0x0e, 0x16, 0x64][variant]
            lens = []
            for _ in range(3):
                lens += [rng.choice([0, 1, 2, rng.randrange(200), rng.randrange(200, 256)]), rng.randrange(256)]
            values = [rng.randrange(6), rng.randrange(20), rng.randrange(6), rng.randrange(20)]
            arrangement = [rng.randrange(32) for _ in range(19)]
            seeds.append(bytes([f, heads, flags, mode, rng.randrange(256), rng.randrange(256), rng.randrange(256),
                                rng.randrange(256), rng.randrange(256)] + lens + values) + seed_bytes() +
                         bytes(arrangement))
    base = seeds[7]
    for m in ([0, 27], [0, 1], [1, 0], [1, 1], [1, 12], [2, 0], [2, 2], [2, 12], [3, 5], [3, 27],
              [4, 1, 27], [4, 0, 1], [5, 1, 0, 200, 28], [6, 0, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0], [8, 0], [8, 1],
              [8, 2, 0], [8, 2, 1], [8, 3], [9, 0, 1], [9, 1, 27], [9, 2, 0], [10, 1, 0, 210], [10, 0, 1],
              [11, 3, 4], [12, 0, 4, 0, 40], [13, 4, 18]):
        seeds.append(base + bytes(m))
    return seeds


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
    for name, make in (("dense", dense), ("paged", paged), ("append", append), ("merge", merge), ("pool", pool),
                       ("prune", prune)):
        folder = os.path.join(out, name)
        os.makedirs(folder, exist_ok=True)
        for seed in make():
            with open(os.path.join(folder, hashlib.sha1(seed).hexdigest()[:16]), "wb") as f:
                f.write(seed)
        print(f"{folder}: {len(os.listdir(folder))} seeds")


if __name__ == "__main__":
    main()
