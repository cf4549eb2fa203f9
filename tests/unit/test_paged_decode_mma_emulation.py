"""The tensor-core FP8 decode kernel's data movement (csrc/paged_decode_mma.cuh), emulated lane by
lane on the CPU: the swizzled ring the cp.async copies fill, each lane's shared-memory loads, the
byte permutes, and the three warp-wide PTX instructions it relies on, written from the PTX ISA's
fragment layouts (mma.m16n8k16 .row.col f16 -> f32, movmatrix.m8n8.trans.b16, prmt). The kernel's
index arithmetic is transcribed here line for line; the fragment layouts are not the kernel's,
so a lane reading the wrong byte, a permutation applied on one operand only, or a transposed
fragment shows as a wrong attention output against float64 attention on the dequantised cache.
The CUDA code itself is held to the same reference by tests/gpu/test_paged_decode_cuda_gpu.py."""
import math

import numpy as np
import pytest
import torch

from tests.unit.test_rollout_fp8_error import paged_decode_case

WARPS, CHUNK = 4, 16


def ring_piece(key, part, pieces):
    return part ^ (((((key >> 1) & 3) << 1) ^ ((key & 1) << 2)) & (pieces - 1))


def e4m3_f16(byte_values):
    """e4m3 bytes -> float16 (exact: every e4m3 value is an f16 value)."""
    t = torch.tensor(np.asarray(byte_values, dtype=np.uint8)).view(torch.float8_e4m3fn)
    return t.to(torch.float16).numpy()


def byte_perm(x, y, sel):
    pool = list(x.to_bytes(4, "little")) + list(y.to_bytes(4, "little"))
    return int.from_bytes(bytes(pool[(sel >> (4 * n)) & 7] for n in range(4)), "little")


def word(buf, offset):
    return int.from_bytes(bytes(buf[offset:offset + 4]), "little")


# PTX ISA, "Matrix fragments for mma.m16n8k16 with floating point type": lane = 4 * group + pair
def mma_16816(c, a, b):
    """c[lane] (4 floats) += A (16x16) B (16x8) with a[lane] = 4 registers of two f16 each
    (low half first) and b[lane] = 2 such registers; float32 accumulation."""
    A, B, C = np.zeros((16, 16)), np.zeros((16, 8)), np.zeros((16, 8))
    for lane in range(32):
        g, j = divmod(lane, 4)
        A[g, 2 * j:2 * j + 2], A[g + 8, 2 * j:2 * j + 2] = a[lane][0], a[lane][1]
        A[g, 2 * j + 8:2 * j + 10], A[g + 8, 2 * j + 8:2 * j + 10] = a[lane][2], a[lane][3]
        B[2 * j:2 * j + 2, g], B[2 * j + 8:2 * j + 10, g] = b[lane][0], b[lane][1]
        C[g, 2 * j:2 * j + 2], C[g + 8, 2 * j:2 * j + 2] = c[lane][0:2], c[lane][2:4]
    D = (A @ B + C).astype(np.float32)
    return [np.array([D[g, 2 * j], D[g, 2 * j + 1], D[g + 8, 2 * j], D[g + 8, 2 * j + 1]])
            for g, j in (divmod(lane, 4) for lane in range(32))]


def movmatrix_trans(x):
    """x[lane] = (M[g, 2j], M[g, 2j + 1]) of an 8x8 matrix -> the same layout of M.T."""
    M = np.zeros((8, 8), dtype=np.float16)
    for lane in range(32):
        g, j = divmod(lane, 4)
        M[g, 2 * j:2 * j + 2] = x[lane]
    return [M.T[g, 2 * j:2 * j + 2].copy() for g, j in (divmod(lane, 4) for lane in range(32))]


def h2(word16):
    """The f16x2 an e4m3 pair converts to (low byte -> low half)."""
    return e4m3_f16([word16 & 0xFF, (word16 >> 8) & 0xFF])


def cta(q, k8, v8, ks, vs, bt_row, ctx, h, group, scale_log2, warps=WARPS):
    """One CTA (sequence, KV head) of the kernel, ``warps`` warps splitting the head's chunks ->
    (group, D) float32."""
    d = q.shape[-1]
    pieces, kt, vb = d // 16, d // 16, d // 8
    bs = k8.shape[1]
    kb = k8.view(torch.uint8).numpy()
    vbytes = v8.view(torch.uint8).numpy()
    n_chunks = -(-ctx // CHUNK)
    parts = []
    for warp in range(warps):
        # q^T as B: k rows 2j, 2j + 1 (+8, +9) of k-step t are dims d0, d0 + 1 (d0 + 2, d0 + 3)
        qb = []
        for lane in range(32):
            g, j = divmod(lane, 4)
            regs = []
            for t in range(kt):
                d0 = 64 * (t // 4) + 16 * j + 4 * (t % 4)
                f = (q[h * group + g, d0:d0 + 4] * scale_log2 if g < group else np.zeros(4))
                regs.append((f[0:2].astype(np.float16), f[2:4].astype(np.float16)))
            qb.append(regs)
        m = np.full((32, 2), -np.inf, dtype=np.float32)
        l = np.zeros((32, 2), dtype=np.float32)
        vref = np.float32(1.17549435e-38)
        acc = [[np.zeros(4, dtype=np.float32) for _ in range(kt)] for _ in range(32)]
        for c in range(warp, n_chunks, warps):
            n0 = c * CHUNK
            blk, slot0 = int(bt_row[n0 // bs]), n0 % bs
            kr = np.zeros(CHUNK * d, dtype=np.uint8)   # the ring slice, zero-filled past ctx
            vr = np.zeros(CHUNK * d, dtype=np.uint8)
            sc = np.zeros(2 * CHUNK, dtype=np.float32)
            for key in range(CHUNK):
                if n0 + key >= ctx:
                    continue
                for part in range(pieces):
                    dst = key * d + ring_piece(key, part, pieces) * 16
                    kr[dst:dst + 16] = kb[blk, slot0 + key, h, part * 16:part * 16 + 16]
                    vr[dst:dst + 16] = vbytes[blk, slot0 + key, h, part * 16:part * 16 + 16]
                sc[key], sc[CHUNK + key] = ks[blk, slot0 + key, h], vs[blk, slot0 + key, h]
            s = [np.zeros(4, dtype=np.float32) for _ in range(32)]
            for i in range(d // 64):
                for tt in range(4):
                    a = []
                    for lane in range(32):
                        g, j = divmod(lane, 4)
                        wl = word(kr, g * d + ring_piece(g, 4 * i + j, pieces) * 16 + 4 * tt)
                        wh = word(kr, (g + 8) * d + ring_piece(g + 8, 4 * i + j, pieces) * 16 + 4 * tt)
                        a.append((h2(wl), h2(wh), h2(wl >> 16), h2(wh >> 16)))
                    s = mma_16816(s, a, [qb[lane][4 * i + tt] for lane in range(32)])
            pb0, pb1, new_m, p_all, w_all = [], [], [], [], []
            for lane in range(32):
                g, j = divmod(lane, 4)
                ok0, ok1 = n0 + g < ctx, n0 + g + 8 < ctx
                sv = s[lane] * np.array([sc[g], sc[g], sc[g + 8], sc[g + 8]], dtype=np.float32)
                s[lane] = np.where([ok0, ok0, ok1, ok1], sv, -np.inf).astype(np.float32)
            for lane in range(32):  # the shuffles: max over the lanes of one column pair j
                j = lane % 4
                same = [s[o] for o in range(j, 32, 4)]
                c0 = max(max(x[0], x[2]) for x in same)
                c1 = max(max(x[1], x[3]) for x in same)
                cv = max(max(sc[CHUNK + o // 4], sc[CHUNK + o // 4 + 8]) for o in range(j, 32, 4))
                new_m.append((np.float32(max(m[lane, 0], c0)), np.float32(max(m[lane, 1], c1)), cv))
            vnew = np.float32(max(vref, new_m[0][2]))
            beta = np.float32(vref / vnew)
            for lane in range(32):
                g, j = divmod(lane, 4)
                mn0, mn1, _ = new_m[lane]
                a0, a1 = np.exp2(m[lane, 0] - mn0), np.exp2(m[lane, 1] - mn1)
                m[lane] = (mn0, mn1)
                p = np.exp2(s[lane] - np.array([mn0, mn1, mn0, mn1], dtype=np.float32))
                l[lane] = (l[lane, 0] * a0 + p[0] + p[2], l[lane, 1] * a1 + p[1] + p[3])
                for t in range(kt):
                    acc[lane][t] *= np.array([a0, a1, a0, a1], dtype=np.float32) * beta
                w0, w1 = sc[CHUNK + g] / vnew, sc[CHUNK + g + 8] / vnew
                pb0.append(np.array([p[0] * w0, p[1] * w0], dtype=np.float16))
                pb1.append(np.array([p[2] * w1, p[3] * w1], dtype=np.float16))
            vref = vnew
            pb0, pb1 = movmatrix_trans(pb0), movmatrix_trans(pb1)

            def v_words(key, g):
                if d >= 128:
                    out = []
                    for u in range(d // 128):
                        off = key * d + ring_piece(key, (d // 128) * g + u, pieces) * 16
                        out += [word(vr, off + 4 * x) for x in range(4)]
                    return out
                off = key * d + ring_piece(key, g // 2, pieces) * 16 + (g % 2) * 8
                return [word(vr, off), word(vr, off + 4)]

            vw = [[v_words(key, lane // 4) for key in (2 * (lane % 4), 2 * (lane % 4) + 1,
                                                       2 * (lane % 4) + 8, 2 * (lane % 4) + 9)]
                  for lane in range(32)]
            for t in range(kt):
                sel = 0x7362 if t & 1 else 0x5140
                a = []
                for lane in range(32):
                    v0, v1, v8_, v9 = vw[lane]
                    lo = byte_perm(v0[t // 2], v1[t // 2], sel)
                    hi = byte_perm(v8_[t // 2], v9[t // 2], sel)
                    a.append((h2(lo), h2(lo >> 16), h2(hi), h2(hi >> 16)))
                res = mma_16816([acc[lane][t] for lane in range(32)], a,
                                [(pb0[lane], pb1[lane]) for lane in range(32)])
                for lane in range(32):
                    acc[lane][t] = res[lane]
        # the warp's results as the kernel stores them for the merge
        lsum = [l[[o for o in range(32) if o % 4 == j]].sum(0) for j in range(4)]
        ms, ls, out = np.full(8, -np.inf), np.zeros(8), np.zeros((8, d))
        for j in range(4):
            ms[2 * j:2 * j + 2], ls[2 * j:2 * j + 2] = m[j], lsum[j]
        for lane in range(32):
            g, j = divmod(lane, 4)
            for t in range(kt):
                dd = vb * g + 2 * t
                out[2 * j, dd], out[2 * j + 1, dd] = acc[lane][t][0], acc[lane][t][1]
                out[2 * j, dd + 1], out[2 * j + 1, dd + 1] = acc[lane][t][2], acc[lane][t][3]
        parts.append((ms, ls, out, vref))
    mx = np.max([p[0] for p in parts], axis=0)
    f = [np.exp2(p[0] - mx) for p in parts]
    den = sum(p[1] * fi for p, fi in zip(parts, f))
    num = sum(p[2] * p[3] * fi[:, None] for p, fi in zip(parts, f))
    return (num / den[:, None])[:group]


@pytest.mark.parametrize("shape,seqs", [((16, 4, 128, 16), [0, 1, 3, 5]), ((8, 8, 64, 16), [2, 4]),
                                        ((4, 2, 256, 32), [1, 3])],
                         ids=["16q-4kv-d128", "8q-8kv-d64", "4q-2kv-d256-bs32"])
def test_lane_level_emulation_equals_float64_attention(shape, seqs):
    _check_emulation(shape, seqs, paged_decode_case(*shape))


def test_long_contexts():
    """Contexts of 2,100 and 4,200 keys: 33 and 66 chunks a warp, blocks all over the cache."""
    shape = (4, 2, 64, 16)
    _check_emulation(shape, [0, 1], paged_decode_case(*shape, ctx=(2100, 4200)), heads=[1])


@pytest.mark.parametrize("warps", [1, 2])
def test_fewer_warps_a_head(warps):
    """R1MEGA_PAGED_FP8_WARPS: 2 or 1 warps split a head's chunks (one warp: no merge)."""
    shape = (16, 4, 128, 16)
    _check_emulation(shape, [0, 3, 5], paged_decode_case(*shape), heads=[2], warps=warps)


def _check_emulation(shape, seqs, case, heads=None, warps=WARPS):
    from r1mega.rollout.attention import attend_decode_gather
    from r1mega.rollout.kv_cache import dequantize_rows, quantize_rows

    q, k, v, bt, ctx = case
    k8, ks = quantize_rows(k)
    v8, vs = quantize_rows(v)
    hq, hkv, d, _ = shape
    group, scale = hq // hkv, 1 / math.sqrt(d)
    ref = attend_decode_gather(q.double(), dequantize_rows(k8, ks, torch.float64),
                               dequantize_rows(v8, vs, torch.float64), bt, ctx, scale)
    qn, ksn, vsn = q.numpy(), ks.numpy(), vs.numpy()
    for b in seqs:
        for h in heads or range(hkv):
            got = cta(qn[b], k8, v8, ksn, vsn, bt[b].tolist(), int(ctx[b]), h, group,
                      scale * math.log2(math.e), warps)
            want = ref[b, h * group:(h + 1) * group].numpy()
            # f16 q and p * v_scale / reference: ~2^-11 relative each, against |out| <~ 3
            np.testing.assert_allclose(got, want, atol=6e-3, rtol=6e-3,
                                       err_msg=f"sequence {b} (ctx {int(ctx[b])}), KV head {h}")
