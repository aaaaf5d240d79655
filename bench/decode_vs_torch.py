#!/usr/bin/env python3
"""tqkv fused decode attention (kernels/decode_attention.cu): correctness check and benchmark.

Check: the kernel against a float64 PyTorch reference on the same packed cache (dequantize,
rotate the query, softmax attention, un-rotate). Metric per (sequence, query head):
max|out - ref| / max|ref|, ref rounded to the output dtype; zero-length sequences must give exact
zeros. Outputs are poisoned with NaN before every launch.

Bench: PyTorch scaled_dot_product_attention on bf16 K/V (cuDNN and flash backends, enable_gqa)
against the kernel on the same shapes, CUDA events, L2 flushed (256 MB write, or with --flush read
a 256 MB read) before every call, median of --reps.

Usage (on the GPU machine): python3 decode_vs_torch.py [--check] [--bench] [--out DIR]
Needs torch and cupy; compiles the kernel with NVRTC (ctypes) for sm_90a, loads it with cupy.
--bench --sdpa-only --json FILE times only the PyTorch baseline (no cupy) and writes it as JSON;
--table SDPA_JSON TQKV_JSON prints the speed-up table of `tqkv bench decode --json` against it
(decode_vs_torch.sh rust runs all three).
"""
import argparse
import ctypes
import glob
import math
import os
import re
import struct
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SEED = 0x7451_4B56_5345_4544
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# struct DecodeParams: 13 u64, 6 u32, 4 f32, the exact-segment fields 6 u64, 4 u32, counters u64,
# exact_credit, exact_blocks, l2_evict_first and direct_out u32 (232 bytes; this harness times
# plain caches, or spread exact slots with plan's sinks / window_len / centered)
PARAMS_FMT = "<13Q6I4f6Q4IQ4I"


def find_file(*cands):
    for c in cands:
        if os.path.exists(c):
            return c
    raise FileNotFoundError(cands)


def repo_root():
    d = HERE
    while d != "/":
        if os.path.exists(os.path.join(d, "src/codebook/tables.rs")):
            return d
        d = os.path.dirname(d)
    raise FileNotFoundError("src/codebook/tables.rs")


def codebooks():
    """bits -> f32 centroids, parsed from src/codebook/tables.rs (f64 rounded to f32)."""
    text = open(os.path.join(repo_root(), "src/codebook/tables.rs")).read()
    out = {}
    for m in re.finditer(r"pub const CODEBOOK_(\d+): \[f64; (\d+)\] = \[(.*?)\];", text, re.S):
        vals = [float(x) for x in m.group(3).replace("\n", " ").split(",") if x.strip()]
        assert len(vals) == int(m.group(2))
        out[int(m.group(1))] = torch.tensor(vals, dtype=torch.float64).to(torch.float32)
    return out


def rotation_signs(d, seed=DEFAULT_SEED):
    """FORMAT.md: s_j = -1 if bit 63 of the j-th splitmix64 output is set."""
    mask = (1 << 64) - 1
    state = seed
    signs = []
    for _ in range(d):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        signs.append(-1.0 if z >> 63 else 1.0)
    return torch.tensor(signs, dtype=torch.float32)


def row_bytes(bits, d):
    return d * bits // 8 if bits <= 4 else d


# ---------------------------------------------------------------- NVRTC + launch

class Nvrtc:
    def __init__(self):
        cands = ["libnvrtc.so.13", "libnvrtc.so"]
        cands += sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*"))
        cands += sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "*", "lib", "libnvrtc.so*")))
        cands += sorted(glob.glob("/opt/**/nvidia/*/lib/libnvrtc.so*", recursive=True))
        self.lib = None
        for c in cands:
            if "builtins" in c:
                continue
            try:
                self.lib = ctypes.CDLL(c)
                self.path = c
                break
            except OSError:
                pass
        if self.lib is None:
            raise RuntimeError("libnvrtc not found")

    def compile(self, src, opts):
        nv = self.lib
        prog = ctypes.c_void_p()
        assert nv.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"decode_attention.cu", 0, None, None) == 0
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        rc = nv.nvrtcCompileProgram(prog, len(opts), arr)
        n = ctypes.c_size_t()
        nv.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        nv.nvrtcGetProgramLog(prog, log)
        if rc != 0:
            raise RuntimeError(f"NVRTC failed {opts}:\n{log.value.decode()}")
        nv.nvrtcGetCUBINSize(prog, ctypes.byref(n))
        cubin = ctypes.create_string_buffer(n.value)
        assert nv.nvrtcGetCUBIN(prog, cubin) == 0
        return cubin.raw, log.value.decode()


_NVRTC = None


class TqDecode:
    """One compiled variant of the kernel (bits, head_dim, GQA, dtype)."""

    def __init__(self, src, k_bits, v_bits, d, gqa, dtype, warps=4, stages=4, min_blocks=1, workdir="/tmp/tq_cubin",
                 extra=None):
        import cupy as cp
        global _NVRTC
        if _NVRTC is None:
            _NVRTC = Nvrtc()
        self.k_bits, self.v_bits, self.d, self.gqa, self.dtype, self.warps = k_bits, v_bits, d, gqa, dtype, warps
        self.stages, self.min_blocks = stages, min_blocks
        defs = dict(K_BITS=k_bits, V_BITS=v_bits, HEAD_DIM=d, GQA=gqa, DTYPE=DTYPES[dtype], WARPS=warps, STAGES=stages,
                    MIN_BLOCKS=min_blocks, **(extra or {}))
        self.merge_last = bool(defs.get("MERGE_LAST", 0))
        opts = ["--std=c++17", "-arch=sm_90a", "--ptxas-options=-v"] + [f"-D{k}={v}" for k, v in defs.items()]
        cubin, log = _NVRTC.compile(src, opts)
        m = re.search(r"tq_decode_split.*?(\d+) bytes stack frame, (\d+) bytes spill stores.*?Used (\d+) registers", log, re.S)
        self.ptxas = f"regs={m.group(3)} stack={m.group(1)} spill={m.group(2)}" if m else "?"
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "_".join(f"{k}{v}" for k, v in defs.items()) + ".cubin")
        open(path, "wb").write(cubin)
        self.mod = cp.RawModule(path=path)
        self.split_fn = self.mod.get_function("tq_decode_split")
        self.merge_fn = self.mod.get_function("tq_decode_merge")
        g = self.mod.get_global("tq_decode_smem_bytes")
        self.smem = int(cp.ndarray((1,), cp.uint32, g).get()[0])
        g = self.mod.get_global("tq_decode_smem_bytes_spread")
        self.smem_spread = int(cp.ndarray((1,), cp.uint32, g).get()[0])
        g = self.mod.get_global("tq_decode_params_bytes")
        assert int(cp.ndarray((1,), cp.uint32, g).get()[0]) == struct.calcsize(PARAMS_FMT)
        self.split_fn.max_dynamic_shared_size_bytes = self.smem
        self.sms = torch.cuda.get_device_properties(0).multi_processor_count
        self.occ = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(self.split_fn.kernel.ptr, 32 * warps, self.smem)
        self.cp = cp
        self.cb = codebooks()
        self.signs = rotation_signs(d).cuda()
        self.kcb = self.cb[k_bits].cuda()
        self.vcb = self.cb[v_bits].cuda()
        self._ws = None

    def num_splits(self, num_seqs, num_kv_heads, max_tiles):
        """Splits per (sequence, KV head): the fewest that fill the resident block slots with
        >= 85% of the last wave busy, each split keeping >= 2 tiles per warp."""
        pairs = num_seqs * num_kv_heads
        slots = self.sms * self.occ
        s_max = max(1, math.ceil(max_tiles / (2 * self.warps)))
        best, best_eff = 1, 0.0
        for s in range(1, s_max + 1):
            t = pairs * s
            eff = t / (math.ceil(t / slots) * slots)
            if t >= 0.9 * slots and eff >= 0.85:
                return s
            if eff > best_eff + 1e-9:
                best, best_eff = s, eff
        return best

    def workspace(self, n):
        if self._ws is None or self._ws.numel() < n:
            self._ws = torch.empty(n, dtype=torch.float32, device="cuda")
        return self._ws

    def __call__(self, *a, **kw):
        """Launches the two kernels now; returns the number of splits."""
        run, splits = self.plan(*a, **kw)
        run()
        return splits

    def plan(self, q, cache, seq_lens, out, *, scale, softcap=0.0, window=0, ring=False,
             ring_flags=None, splits=None, pv_scale=1.0, sf=1.0, l2_evict_first=False, sinks=0, window_len=0,
             centered=False, spread_smem=False):
        """Packs the parameters once; returns (launch both kernels on the current stream, splits).
        sinks, window_len, centered: exact sink and recent-window slots (random f16 rows, the
        packed range ending window_len before the length) and a key mean, scored by every packed
        split (exact = 3), as the library places a tq4 cache's at batch 8 (timing only)."""
        S, nkv, cap = cache["kp"].shape[:3]
        exact = sinks + window_len > 0 or centered
        extra = {}
        if exact:
            g = torch.Generator(device="cuda")
            g.manual_seed(5)
            plane = lambda n: torch.randn((S, nkv, max(n, 1), self.d), device="cuda", generator=g).half()
            extra = dict(ks=plane(sinks), vs=plane(sinks), kw=plane(window_len), vw=plane(window_len),
                         mu=torch.randn((S, nkv, self.d), device="cuda", generator=g) * 0.1 if centered else None,
                         fr=(seq_lens.to(torch.int64) - window_len).clamp(min=sinks).to(torch.int32))
        if splits is None:
            eff = int(seq_lens.max().item()) if S else 0
            eff = min(eff, cap) if ring else eff
            eff = min(eff, window) if window else eff
            splits = self.num_splits(S, nkv, max(1, math.ceil(eff / 16)))
        n_part = S * nkv * splits * self.gqa
        ws = self.workspace(n_part * (self.d + 2))
        part_o, part_ml = ws[: n_part * self.d], ws[n_part * self.d:]
        # MERGE_LAST: one counter per pair, zero between launches (the last block resets it).
        counters = torch.zeros(S * nkv, dtype=torch.int32, device="cuda")
        p = struct.pack(
            PARAMS_FMT,
            q.data_ptr(), out.data_ptr(), cache["kp"].data_ptr(), cache["kn"].data_ptr(),
            cache["vp"].data_ptr(), cache["vn"].data_ptr(), self.kcb.data_ptr(), self.vcb.data_ptr(),
            self.signs.data_ptr(), seq_lens.data_ptr(), 0 if ring_flags is None else ring_flags.data_ptr(),
            part_o.data_ptr(), part_ml.data_ptr(),
            S, nkv, cap, splits, 1 if ring else 0, window,
            scale, softcap, pv_scale, 1.0 / sf,
            *((extra["fr"].data_ptr(), 0 if extra["mu"] is None else extra["mu"].data_ptr(), extra["ks"].data_ptr(),
               extra["vs"].data_ptr(), extra["kw"].data_ptr(), extra["vw"].data_ptr(), sinks, window_len, 3, 0)
              if exact else (0,) * 10),
            counters.data_ptr(), 0, 0, 1 if l2_evict_first else 0, 0,
        )
        buf = ctypes.create_string_buffer(p, len(p))
        argv = (ctypes.c_void_p * 1)(ctypes.cast(buf, ctypes.c_void_p))
        drv = self.cp.cuda.driver
        f1, f2, w = self.split_fn.kernel.ptr, self.merge_fn.kernel.ptr, 32 * self.warps
        smem = self.smem_spread if exact or spread_smem else self.smem
        if smem > self.split_fn.max_dynamic_shared_size_bytes:
            self.split_fn.max_dynamic_shared_size_bytes = smem  # raises where the device grants less
        keep = (buf, argv, part_o, part_ml, counters, extra)
        merge_last = self.merge_last

        def run():
            stream = torch.cuda.current_stream().cuda_stream
            drv.launchKernel(f1, splits, nkv, S, w, 1, 1, smem, stream, ctypes.addressof(keep[1]), 0)
            if not merge_last:
                drv.launchKernel(f2, nkv * self.gqa, S, 1, self.d, 1, 1, 0, stream, ctypes.addressof(keep[1]), 0)

        return run, splits


# ---------------------------------------------------------------- cache, reference

def make_cache(S, nkv, cap, d, k_bits, v_bits, gen):
    nb = max(1, d // 256)

    def packed(bits):
        hi = 1 << bits if bits in (5, 6) else 256
        return torch.randint(0, hi, (S, nkv, cap, row_bytes(bits, d)), dtype=torch.uint8, device="cuda", generator=gen)

    def norms():
        n = torch.rand((S, nkv, cap, nb), dtype=torch.float32, device="cuda", generator=gen) * 1.5 + 0.5
        return n * math.sqrt(d) if d <= 256 else n

    return dict(kp=packed(k_bits), kn=norms(), vp=packed(v_bits), vn=norms(), k_bits=k_bits, v_bits=v_bits)


def unpack(bits, rows, d):
    b = rows.to(torch.int64)
    if bits == 4:
        return torch.stack([b & 15, b >> 4], -1).flatten(-2)
    if bits == 2:
        return torch.stack([(b >> s) & 3 for s in (0, 2, 4, 6)], -1).flatten(-2)
    if bits == 3:
        g = b.reshape(*b.shape[:-1], d // 8, 3)
        v = g[..., 0] | (g[..., 1] << 8) | (g[..., 2] << 16)
        return torch.stack([(v >> (3 * k)) & 7 for k in range(8)], -1).flatten(-2)
    return b


def dequant(bits, rows, norms, d, cb, sf=1.0):
    y = cb.to(torch.float64)[unpack(bits, rows, d)]
    n = norms.to(torch.float64)
    if d <= 256:
        return y * (n / math.sqrt(d))
    return (y.reshape(*y.shape[:-1], d // 256, 256) * (n / sf)[..., None]).reshape(y.shape)


def hadamard(d):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(d)).cuda()


def reference(q, cache, seq_lens, *, scale, softcap=0.0, window=0, ring_flags=None, cb, signs, sf=1.0):
    S, nkv, cap = cache["kp"].shape[:3]
    d = q.shape[-1]
    G = q.shape[1] // nkv
    H = hadamard(d)
    sg = signs.to(torch.float64)
    out = torch.zeros(q.shape, dtype=torch.float64, device="cuda")
    for s in range(S):
        L = int(seq_lens[s])
        ring = bool(ring_flags[s]) if ring_flags is not None else False
        start = max(0, L - cap) if ring else 0
        if window:
            start = max(start, L - window)
        if L == 0:
            continue
        pos = torch.arange(start, L, device="cuda")
        slots = pos % cap if ring else pos
        for h in range(nkv):
            K = dequant(cache["k_bits"], cache["kp"][s, h, slots], cache["kn"][s, h, slots], d, cb[cache["k_bits"]].cuda(), sf)
            V = dequant(cache["v_bits"], cache["vp"][s, h, slots], cache["vn"][s, h, slots], d, cb[cache["v_bits"]].cuda(), sf)
            qh = q[s, h * G:(h + 1) * G].to(torch.float64)
            qr = (qh * sg) @ H.T
            sc = scale * (qr @ K.T)
            if softcap:
                sc = softcap * torch.tanh(sc / softcap)
            p = torch.softmax(sc, -1)
            o = p @ V
            out[s, h * G:(h + 1) * G] = (o @ H.T) * sg
    return out


def rel_err(out, ref, seq_lens):
    """(||out - ref|| / ||ref|| over the whole output, worst per-(sequence, head) ||out - ref|| /
    ||ref||, worst per-(sequence, head) max|out - ref| / max|ref|), ref rounded to out's dtype.
    NaN if any output is not finite; inf if a zero-length sequence is not exactly zero."""
    r = ref.to(out.dtype).to(torch.float64)
    o = out.to(torch.float64)
    if not torch.isfinite(o).all():
        return (float("nan"),) * 3
    l2 = mx = 0.0
    for s in range(out.shape[0]):
        if int(seq_lens[s]) == 0:
            if (o[s] != 0).any():
                return (float("inf"),) * 3
            continue
        e = o[s] - r[s]
        l2 = max(l2, float((e.norm(dim=-1) / r[s].norm(dim=-1).clamp_min(1e-30)).max()))
        mx = max(mx, float((e.abs().amax(-1) / r[s].abs().amax(-1).clamp_min(1e-30)).max()))
    return float((o - r).norm() / r.norm().clamp_min(1e-30)), l2, mx


# ---------------------------------------------------------------- check

def check(src, args, log):
    gen = torch.Generator(device="cuda")
    gen.manual_seed(1234)
    cb = codebooks()
    tol = {torch.float32: 2e-3, torch.float16: 2e-3, torch.bfloat16: 2e-3 + 2 ** -8}
    configs = []
    for kb, vb in [(4, 4), (8, 8), (4, 2)]:
        for G in (1, 4, 8):
            configs.append((kb, vb, 128, G, torch.float32))
        for d in (64, 256):
            configs.append((kb, vb, d, 4, torch.float32))
    configs += [(4, 4, 128, 4, torch.bfloat16), (4, 2, 128, 8, torch.float16), (3, 3, 128, 4, torch.float32),
                (3, 2, 64, 4, torch.float32),
                (5, 6, 128, 4, torch.float32), (2, 8, 64, 8, torch.bfloat16), (4, 4, 512, 4, torch.float32)]
    if args.quick:
        configs = configs[:2]
    failures = 0
    worst = [0.0, 0.0, 0.0]
    for (kb, vb, d, G, dt) in configs:
        k = TqDecode(src, kb, vb, d, G, dt, warps=args.warps, stages=args.stages)
        nkv = 2
        cases = []
        # batch 33, global, mixed lengths incl. 0, 1, 7, 1000, 70000
        lens33 = [0, 1, 7, 1000, 70000] + torch.randint(1, 3000, (28,), generator=torch.Generator().manual_seed(d + G)).tolist()
        cases.append(dict(name="b33-global-mixed", S=33, cap=70000, lens=lens33))
        cases.append(dict(name="b1-70000", S=1, cap=70000, lens=[70000]))
        cases.append(dict(name="b3-ring-wrapped", S=3, cap=1000, lens=[2500, 1000, 999], ring=True))
        cases.append(dict(name="b2-window-softcap", S=2, cap=8192, lens=[5000, 100], window=777, softcap=20.0))
        cases.append(dict(name="b4-ring-window-flags", S=4, cap=512, lens=[3000, 0, 7, 511], window=300, ringf=[1, 0, 1, 1]))
        for cs in cases:
            S, cap = cs["S"], cs["cap"]
            cache = make_cache(S, nkv, cap, d, kb, vb, gen)
            q = (torch.randn((S, nkv * G, d), device="cuda", generator=gen) * 2.0).to(dt)
            lens = torch.tensor(cs["lens"], dtype=torch.int32, device="cuda")
            ring = cs.get("ring", False)
            rf = torch.tensor(cs["ringf"], dtype=torch.int32, device="cuda") if "ringf" in cs else None
            ref_rf = rf if rf is not None else (torch.ones(S, dtype=torch.int32) if ring else None)
            out = torch.full_like(q, float("nan"))
            scale = 1.0 / math.sqrt(d)
            splits = k(q, cache, lens, out, scale=scale, softcap=cs.get("softcap", 0.0), window=cs.get("window", 0),
                       ring=ring, ring_flags=rf)
            torch.cuda.synchronize()
            ref = reference(q, cache, lens.cpu(), scale=scale, softcap=cs.get("softcap", 0.0), window=cs.get("window", 0),
                            ring_flags=ref_rf, cb=cb, signs=k.signs)
            rel, l2, mx = rel_err(out, ref, lens.cpu())
            ok = rel <= tol[dt]
            failures += 0 if ok else 1
            worst[0] = max(worst[0], rel)
            worst[1] = max(worst[1], l2)
            worst[2] = max(worst[2], mx)
            log(f"check k{kb}v{vb} d{d} G{G} {str(dt)[6:]:8s} {cs['name']:22s} splits={splits:3d} rel={rel:.2e} "
                f"head-relL2={l2:.2e} head-maxabs/max={mx:.2e} {'ok' if ok else 'FAIL'}  [{k.ptxas} occ={k.occ} smem={k.smem}]")
            del cache
    log(f"check: {failures} failures; worst rel {worst[0]:.2e}, worst per-head relL2 {worst[1]:.2e}, "
        f"worst per-head maxabs/max {worst[2]:.2e} (gate: rel = ||out-ref||/||ref|| per case <= 2e-3, "
        f"bf16 outputs 2e-3 + 2^-8)")
    return failures


# ---------------------------------------------------------------- bench

def graphed(fn):
    """fn captured in a CUDA graph (no host gaps between its launches); fn itself if capture fails."""
    try:
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        return g.replay, "graph"
    except Exception as e:
        torch.cuda.synchronize()
        return fn, f"eager ({type(e).__name__})"


FLUSH_MODE = "write"


def flush_l2(flush):
    """Empties the L2 before a timed call: "write" zeroes the 256 MB buffer (leaving the L2 full
    of dirty lines, whose write-back the timed call pays), "read" reads it (clean lines)."""
    if FLUSH_MODE == "read":
        flush.sum()
    else:
        flush.zero_()


def timed_calls(fn, reps, flush, before=None, after=None):
    """µs of each of `reps` calls of fn between two CUDA events, after 3 untimed ones; before each
    timed call the L2 flush (unless `flush` is None) and `before()`, after it `after()`."""
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        if flush is not None:
            flush_l2(flush)
        if before is not None:
            before()
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
        if after is not None:
            after()
    return ts


def time_cuda(fn, reps, flush):
    import statistics
    return statistics.median(timed_calls(fn, reps, flush))


def copy_bandwidth(flush):
    """GB/s of a 1 GiB device-to-device copy (bytes read + written), median of 20, the current
    FLUSH_MODE before each call."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = time_cuda(lambda: b.copy_(a), 20, flush)
    return 2 * n / (t * 1e-6) / 1e9


def bench(src, args, log):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    gen = torch.Generator(device="cuda")
    gen.manual_seed(99)
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.float32, device="cuda")
    copy_bw = copy_bandwidth(flush)
    log(f"copy bandwidth: {copy_bw:.0f} GB/s (1 GiB device-to-device, read+write)")
    Hq, Hkv, d = 32, 8, 128
    G = Hq // Hkv
    bits = [tuple(map(int, x.split("/"))) for x in args.bits.split(",")]
    # Without --variants: the best measured variant per bit width (NOTES-decode.md, v3).
    best_known = {(8, 8): (4, 4, 2)}
    kernels = {}
    for kv in ([] if args.sdpa_only else bits):
        w, st, mb = best_known.get(kv, (4, 2, 3))
        kernels[kv] = TqDecode(src, kv[0], kv[1], d, G, torch.bfloat16, warps=w, stages=st, min_blocks=mb)
    if args.variants and not args.sdpa_only:
        variants = [tuple(map(int, v.split("x"))) for v in args.variants.split(",")]
        for kv in bits:
            best = None
            for (w, st, mb) in variants:
                k = TqDecode(src, kv[0], kv[1], d, G, torch.bfloat16, warps=w, stages=st, min_blocks=mb)
                tot = 0.0
                msg = []
                for (B, L) in [(8, 16384), (32, 16384), (1, 65536)]:
                    cache = make_cache(B, Hkv, L, d, kv[0], kv[1], gen)
                    q = torch.randn((B, Hq, d), device="cuda", dtype=torch.bfloat16, generator=gen)
                    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
                    out = torch.empty_like(q)
                    run, splits = k.plan(q, cache, lens, out, scale=1.0 / math.sqrt(d))
                    fn, _ = graphed(run)
                    t = time_cuda(fn, args.reps, flush)
                    tot += t
                    msg.append(f"B{B}L{L}={t:.1f}us/s{splits}")
                    del cache
                log(f"tune k{kv[0]}v{kv[1]} warps={w} stages={st} min_blocks={mb}: {' '.join(msg)} [{k.ptxas} occ={k.occ} smem={k.smem}]")
                if best is None or tot < best[0]:
                    best = (tot, k)
            kernels[kv] = best[1]
    for kv, k in kernels.items():
        log(f"tqkv k{kv[0]}v{kv[1]}: warps={k.warps} stages={k.stages} min_blocks={k.min_blocks} {k.ptxas} occ={k.occ} blocks/SM smem={k.smem}")
    rows = []
    for B in [int(x) for x in args.batches.split(",")]:
        for L in [int(x) for x in args.contexts.split(",")]:
            scale = 1.0 / math.sqrt(d)
            q4 = torch.randn((B, Hq, 1, d), device="cuda", dtype=torch.bfloat16, generator=gen)
            kk = torch.randn((B, Hkv, L, d), device="cuda", dtype=torch.bfloat16, generator=gen)
            vv = torch.randn((B, Hkv, L, d), device="cuda", dtype=torch.bfloat16, generator=gen)
            base = {}
            modes = []
            for name, be in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                             ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
                if name == "efficient" and any(v_ is not None for v_ in base.values()):
                    continue
                try:
                    with sdpa_kernel(be):
                        fn, mode = graphed(lambda: F.scaled_dot_product_attention(q4, kk, vv, enable_gqa=True, scale=scale))
                        base[name] = time_cuda(fn, args.reps, flush)
                        modes.append(f"{name}:{mode}")
                except Exception as e:  # backend unavailable for this shape
                    base[name] = None
                    log(f"  {name} B={B} L={L}: {type(e).__name__}: {str(e)[:160]}")
            if base.get("efficient") is None:
                base.pop("efficient", None)
            del kk, vv
            bbytes = B * Hkv * L * d * 2 * 2
            valid = {k_: v_ for k_, v_ in base.items() if v_ is not None}
            best_name = min(valid, key=valid.get)
            tb = valid[best_name]
            rows.append(dict(B=B, L=L, side=f"bf16 sdpa ({best_name})", us=tb, bytes=bbytes, speedup=None,
                             extra=" ".join(f"{k_}={v_:.1f}" if v_ else f"{k_}=n/a" for k_, v_ in base.items()) + " " + ",".join(modes)))
            q = q4.reshape(B, Hq, d).contiguous()
            for kv, k in kernels.items():
                cache = make_cache(B, Hkv, L, d, kv[0], kv[1], gen)
                lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
                out = torch.full_like(q, float("nan"))
                run, splits = k.plan(q, cache, lens, out, scale=scale)
                run()
                torch.cuda.synchronize()
                assert torch.isfinite(out).all(), "non-finite output"
                fn, mode = graphed(run)
                t = time_cuda(fn, args.reps, flush)
                tbytes = B * Hkv * L * (row_bytes(kv[0], d) + row_bytes(kv[1], d) + 8)
                rows.append(dict(B=B, L=L, side=f"tqkv {kv[0]}/{kv[1]}", us=t, bytes=tbytes, speedup=tb / t,
                                 extra=f"splits={splits} {mode}"))
                del cache
            del q4, q
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(0), copy_gbs=copy_bw, torch=torch.__version__, flush=FLUSH_MODE,
                           rows=[dict(batch=r["B"], context=r["L"], side=r["side"], us=r["us"], bytes=r["bytes"])
                                 for r in rows if r["speedup"] is None]), f)
    log("")
    log(f"| batch | context | side | µs | GB/s | % copy BW | speed-up vs best bf16 | notes |")
    log(f"|---|---|---|---|---|---|---|---|")
    for r in rows:
        gbs = r["bytes"] / (r["us"] * 1e-6) / 1e9
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else ""
        log(f"| {r['B']} | {r['L']} | {r['side']} | {r['us']:.1f} | {gbs:.0f} | {100 * gbs / copy_bw:.0f}% | {sp} | {r['extra']} |")


def table(sdpa_path, tqkv_path, log):
    """Speed-up of `tqkv bench decode` (Rust launch) over the bf16 SDPA baseline, same shapes."""
    import json
    sd = json.load(open(sdpa_path))
    tq = json.load(open(tqkv_path))
    base = {(r["batch"], r["context"]): r for r in sd["rows"]}
    log(f"baseline: {sd['device']}, torch {sd['torch']}, copy {sd['copy_gbs']:.0f} GB/s; "
        f"tqkv: {tq['device']}, copy {tq['copy_gbs']:.0f} GB/s")
    by = {}
    for r in tq["rows"]:
        label = r.get("label", f"{r['k_bits']}/{r['v_bits']}")
        by.setdefault((r["batch"], r["context"]), {})[label] = r["us"]
    labels = [x for x in ["8/8", "4/4", "4/2", "tq4"] if any(x in v for v in by.values())]
    log("| batch | context | bf16 SDPA µs (backend) | " + " | ".join(f"tqkv {x} µs | x" for x in labels) + " |")
    log("|---|---|---|" + "---|---|" * len(labels))
    for key in sorted(by):
        b = base.get(key)
        if b is None:
            continue
        cells = []
        for label in labels:
            us = by[key].get(label)
            cells += [f"{us:.1f}", f"{b['us'] / us:.2f}x"] if us else ["", ""]
        backend = b["side"].split("(")[-1].rstrip(")")
        log(f"| {key[0]} | {key[1]} | {b['us']:.1f} ({backend}) | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kernel", default=None)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--variants", default="", help="warps x stages x min_blocks to tune per bit width, e.g. 4x4x1,8x3x2")
    ap.add_argument("--profile", default="", help="run one variant k/v:WxSxM at --batches[0] x --contexts[0], 6 times (for ncu)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--bits", default="8/8,4/4,4/2")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--contexts", default="4096,16384,65536")
    ap.add_argument("--sdpa-only", action="store_true", help="--bench times only the PyTorch baseline")
    ap.add_argument("--json", default="", help="--bench writes the baseline rows here")
    ap.add_argument("--flush", choices=("write", "read"), default="write",
                    help="L2 flush before each timed call: a 256 MB write (default) or read")
    ap.add_argument("--table", nargs=2, metavar=("SDPA_JSON", "TQKV_JSON"), help="print the speed-up table")
    args = ap.parse_args()
    global FLUSH_MODE
    FLUSH_MODE = args.flush
    if args.table:
        table(args.table[0], args.table[1], print)
        return
    src = None
    if args.check or args.profile or not args.sdpa_only:
        kpath = args.kernel or find_file(os.path.join(HERE, "decode_attention.cu"),
                                         os.path.join(HERE, "..", "kernels", "decode_attention.cu"))
        src = open(kpath).read()
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "decode_vs_torch.log"), "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    dev = torch.cuda.get_device_properties(0)
    log(f"device: {dev.name}, {dev.multi_processor_count} SMs, torch {torch.__version__}")
    if args.profile:
        kvs, var = args.profile.split(":")
        kb, vb = map(int, kvs.split("/"))
        w, st, mb = map(int, var.split("x"))
        B, L = int(args.batches.split(",")[0]), int(args.contexts.split(",")[0])
        k = TqDecode(src, kb, vb, 128, 4, torch.bfloat16, warps=w, stages=st, min_blocks=mb)
        gen = torch.Generator(device="cuda")
        gen.manual_seed(5)
        cache = make_cache(B, 8, L, 128, kb, vb, gen)
        q = torch.randn((B, 32, 128), device="cuda", dtype=torch.bfloat16, generator=gen)
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        out = torch.empty_like(q)
        run, splits = k.plan(q, cache, lens, out, scale=128 ** -0.5)
        for _ in range(6):
            run()
        torch.cuda.synchronize()
        log(f"profile k{kb}v{vb} {var} B={B} L={L} splits={splits} {k.ptxas} occ={k.occ}")
        return
    fails = 0
    if args.check:
        fails = check(src, args, log)
    if args.bench:
        bench(src, args, log)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
