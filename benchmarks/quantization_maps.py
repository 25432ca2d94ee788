"""Which 8-bit map and block size for AdamW's moments (issue 24)? A study, in Python, on the CPU
(python benchmarks/quantization_maps.py).

The issue asks for exp_avg and exp_avg_sq stored as 8-bit codes with a float32 absmax scale per
block, updated inside the one fused pass: dequantize, update in float32, take each block's new
absmax, requantize to the nearest code, and update the parameter from the float32 moments. Its
reference map is the dynamic map of Dettmers et al. (8-bit Optimizers via Block-wise
Quantization), as bitsandbytes and torchao build it, signed for exp_avg and unsigned for
exp_avg_sq, block 256; another map may replace it if it is at least as accurate and cheaper to
encode. This script gathers the evidence:

  1. maps: bitsandbytes' dynamic map, built as bitsandbytes' create_dynamic_map builds it, with
     its properties checked; and 8-bit float formats whose nearest code comes from the float's
     bits (no table search): signed E4M3 (and E5M2, E3M4 for reference) for exp_avg, unsigned
     E5M3 and E4M4 for exp_avg_sq, and the same unsigned maps applied to sqrt(exp_avg_sq).
     Every encoder is checked against a brute-force argmin over the map's 256 values, on edge
     inputs (every code value, every midpoint and their float32 neighbours) and random ones; so
     is a bucketed encoder of the dynamic map (a lookup by the float's exponent and top mantissa
     bits, then at most K comparisons) that keeps the dynamic map without its 8-step search;
  2. moments: the demo's Transformer (examples/train_demo.py) trained with float32
     torch.optim.AdamW; its exp_avg / exp_avg_sq snapshotted at a few steps and quantized with
     each map and block size (64, 128, 256, 2048): relative errors, the fraction of nonzero values
     that become 0, and the error of the update direction m_hat / (sqrt(v_hat) + eps);
  3. training: the same model, weights, batches and schedule as the float32 run, with the 8-bit
     step simulated in Python for a few (map, block) choices; final loss and held-out accuracy
     against float32 (the settings of examples/low_bytes_demo.py by default);
  4. encode cost: each encoder's operations per element, and a rough Python-level timing of
     vectorized torch encoders on 1e7 elements (not the C++ kernel's cost).

Outputs in --out: quantization_maps.md (the report), quantization_maps.json (every figure) and
quantization_maps.png (the chart).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

from low_bytes_demo import SMOOTHING_WINDOW, machine_info, smoothed  # noqa: E402  (the demo's own)
from train_demo import (BETAS, EPS, EVAL_BATCH, LABEL_SMOOTHING, MAX_GRAD_NORM, WEIGHT_DECAY,  # noqa: E402
                        Seq2SeqTransformer, accuracy, loss_floor, make_batch)

from noam_ext import ScheduleLR, WarmupConstant, param_groups  # noqa: E402

FINAL_MEAN_STEPS = 50        # final loss: mean of the last 50 steps' losses (as low_bytes_demo)
BLOCKS = (64, 128, 256, 2048)
OUTLIER_FACTOR = 10.0        # an element's update counts as a blow-up when |update| > this x lr


# =================================================================================================
# 1. Maps
# =================================================================================================

def bnb_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' dynamic map, 256 sorted float32 values in [-1, 1] (signed) or [0, 1].

    Written from the algorithm of bitsandbytes' create_dynamic_map (repository
    bitsandbytes-foundation/bitsandbytes, bitsandbytes/functional.py; torchao copies it in
    torchao/optim/quant_utils.py, without the zero padding), with the same float32 torch
    operations, so the values are bit for bit bitsandbytes'. For decade i (0..6) the values are
    10^(i-6) times the midpoints of linspace(0.1, 1, n_i + 1), n_i = 2^i per sign when signed and
    2^(i+1) unsigned; then 0 and 1.0 are added. Note bitsandbytes' `non_sign_bits = total_bits -
    (1 if signed else 1)`: the unsigned map does not get an extra bit of exponent, it gets twice
    the values per decade. The signed map has +1.0 but not -1.0."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                             else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:   # not reached for 8 bits and 7 exponent bits
        boundaries = torch.linspace(0.1, 1, additional_items + 1)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    assert len(data) == 2 ** total_bits
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def check_bnb_map(q: torch.Tensor, signed: bool) -> dict:
    """The dynamic map's properties, each checked (an AssertionError names a failure)."""
    values = q.tolist()
    assert len(values) == 256, "256 values"
    assert all(a < b for a, b in zip(values, values[1:])), "strictly increasing"
    assert 0.0 in values and 1.0 in values, "contains 0 and 1"
    assert max(values) == 1.0
    positive = [v for v in values if v > 0]
    negative = [v for v in values if v < 0]
    if signed:
        assert len(negative) == 127 and len(positive) == 128
        # Symmetric except for +1.0, which has no negative twin.
        assert sorted(-v for v in negative) == positive[:-1], "signed map symmetric apart from +1.0"
    else:
        assert not negative and len(positive) == 255
    per_decade = {}
    for v in positive:
        if v < 1.0:
            k = math.floor(math.log10(v))
            per_decade[k] = per_decade.get(k, 0) + 1
    return {"values": 256, "sorted": True, "has_0_and_1": True, "min": values[0], "max": values[-1],
            "smallest_positive": positive[0], "zero_code": values.index(0.0),
            "symmetric": "yes, apart from +1.0" if signed else "n/a (unsigned)",
            "positive_values_per_decade": {f"1e{k}..1e{k + 1}": n for k, n in sorted(per_decade.items())}}


class FloatCode:
    """An 8-bit float format with all 256 codes finite: E exponent bits, M mantissa bits, an
    optional sign bit (bit 7). Exponent field e in [0, 2^E - 1]; a normal code is
    (1 + m/2^M) * 2^(e - emax), a subnormal (e = 0) m/2^M * 2^(1 - emax), emax = 2^E - 1, so the
    top binade is [1, 2) and the largest value is TOP = 2 - 2^-M. (Unlike OCP's E4M3FN no code is
    NaN; a signed map has +0 and -0.)

    Block scaling: r = TOP / absmax and d = absmax / TOP per block (float32, correctly rounded
    divisions, once per block); the encoder's input is y = fl(x * r) and the decoded value is
    value(code) * d, so the block's absmax element gets the top code. The encoder returns the
    nearest code of y exactly: round to nearest, ties to even (the code with an even mantissa),
    saturating at TOP."""

    def __init__(self, e_bits: int, m_bits: int, signed: bool):
        assert e_bits + m_bits + int(signed) == 8
        self.E, self.M, self.signed = e_bits, m_bits, signed
        self.emax = 2 ** e_bits - 1
        self.top = 2.0 - 2.0 ** -m_bits
        self.name = f"{'' if signed else 'u'}E{e_bits}M{m_bits}"
        self.max_mag = 2 ** (e_bits + m_bits) - 1
        mags = torch.arange(2 ** (e_bits + m_bits), dtype=torch.float64)
        e = torch.div(mags, 2 ** m_bits, rounding_mode="floor")
        m = mags - e * 2 ** m_bits
        value = torch.where(e == 0, m * 2.0 ** (1 - self.emax - m_bits),
                            (2 ** m_bits + m) * torch.pow(2.0, e - self.emax - m_bits))
        table = torch.cat([value, -value]) if signed else value
        self.table = table.to(torch.float32)                       # value of each code, exact
        assert torch.equal(self.table.double(), table)
        self.smallest_positive = 2.0 ** (1 - self.emax - m_bits)   # smallest subnormal
        self.smallest_normal = 2.0 ** (1 - self.emax)
        shift = 23 - m_bits
        self._shift = shift
        self._round_bias = (1 << (shift - 1)) - 1
        self._exp_offset = (127 - self.emax) << m_bits
        self._sub_limit = (128 - self.emax) << 23                  # bits of the smallest normal
        magic = 2.0 ** (24 - self.emax - m_bits)                   # a float32 whose ulp is the subnormal step
        self._magic = torch.tensor(magic, dtype=torch.float32)
        self._magic_bits = int(self._magic.view(torch.int32))

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        """Nearest code of each float32 y (unsigned maps: y >= 0 or -0), from y's bits; int32."""
        bits = y.contiguous().view(torch.int32)
        a = bits & 0x7FFFFFFF                                       # |y|'s bits
        # Normal codes: round the float32 mantissa to M bits, to nearest even, in integer
        # arithmetic (a carry moves into the exponent, as it should), then rebias the exponent.
        lsb = (a >> self._shift) & 1
        normal = ((a + self._round_bias + lsb) >> self._shift) - self._exp_offset
        # Subnormal codes (|y| below the smallest normal): adding a float32 whose ulp is the
        # subnormal step rounds |y| to that step, to nearest even, in the FPU; the code is the
        # difference of the bits.
        sub = (a.view(torch.float32) + self._magic).view(torch.int32) - self._magic_bits
        mag = torch.where(a < self._sub_limit, sub, normal).clamp_(max=self.max_mag)   # saturate at TOP
        if self.signed:
            mag |= (bits >> 24) & 0x80                              # the sign bit
        return mag

    def ops(self) -> str:
        return ("1 mul by the block's r; |y| bits (and); mantissa round: shift, and, 2 adds, shift; "
                "rebias: 1 sub; subnormal path: 1 float add, 1 int sub; 1 compare+select; 1 min (saturate)"
                + ("; sign: shift, and, or" if self.signed else "") + ": ~12 integer/float ops, no table reads")


class TableCode:
    """A map given as 256 sorted float32 values in [-1, 1] (bitsandbytes' dynamic map).

    Block scaling as bitsandbytes: y = fl(x / absmax) (bitsandbytes' kernel uses the fast
    approximate __fdividef), decoded value = q[code] * absmax. The exact encoder is a search of
    the 255 midpoints (searchsorted over float32 midpoints rounded down, exact): the nearest
    value, ties to the lower code."""

    def __init__(self, name: str, q: torch.Tensor):
        self.name, self.table, self.signed = name, q, bool(q[0] < 0)
        self.top = 1.0
        q64 = q.double()
        self.mid64 = (q64[:-1] + q64[1:]) / 2                    # exact in float64
        # float32 midpoints rounded down: for float32 y, y > mid <=> y > mid32_down, exactly.
        mid32 = self.mid64.float()
        too_high = mid32.double() > self.mid64
        mid32[too_high] = torch.nextafter(mid32[too_high], torch.tensor(-math.inf))
        self.mid32_down = mid32
        self.smallest_positive = float(q[q > 0].min())
        self.zero_code = int((q == 0).nonzero())

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        # The number of midpoints below y; y > mid <=> y > mid32_down for float32 y, so the search
        # runs in float32 and stays exact (ties: y == mid is not above it, the lower code).
        return torch.searchsorted(self.mid32_down, y.contiguous(), right=False).to(torch.int32)

    def ops(self) -> str:
        return ("1 division by absmax; 8-step binary search over the 256 values (8 dependent table reads, "
                "compare + select each; bitsandbytes' kernel: 7 steps, 3 pivots in registers, then a "
                "midpoint compare, and a sign fix-up read for exp_avg)")


class BucketedTableEncoder:
    """An exact encoder of a TableCode without the 8-step search: y's sign, exponent and top k
    mantissa bits index a lookup table of the smallest nearest code in that bucket (|y| < 2^-24
    goes to the zero code), then at most K steps of `code += (y > mid32_down[code])`.

    K is the largest number of midpoints inside one bucket, found by construction."""

    LOW_EXP = 127 - 24   # buckets cover |y| in [2^-24, 2); below that the nearest code is 0

    def __init__(self, code: TableCode, k: int):
        self.code, self.k = code, k
        n_exp = 127 - self.LOW_EXP + 1
        self.per_sign = n_exp << k
        lut, steps = [], 0
        for sign in (0, 1):
            for e in range(self.LOW_EXP, 128):
                for t in range(1 << k):
                    lo_bits = (sign << 31) | (e << 23) | (t << (23 - k))
                    hi_bits = lo_bits | ((1 << (23 - k)) - 1)
                    lo, hi = (torch.tensor([lo_bits, hi_bits], dtype=torch.int64).to(torch.int32)
                              .view(torch.float32))
                    y_min, y_max = (lo, hi) if sign == 0 else (hi, lo)   # hi is the more negative one
                    if sign == 0:
                        y_max = torch.clamp(y_max, max=1.0)
                    else:
                        y_min = torch.clamp(y_min, min=-1.0)
                    c_min = int(code.encode(y_min.reshape(1)))
                    c_max = int(code.encode(y_max.reshape(1)))
                    lut.append(c_min)
                    steps = max(steps, c_max - c_min)
        tiny = code.zero_code
        # Tiny |y| (< 2^-24): the zero code, and y > mid[zero - 1] holds, so the steps keep it.
        self.lut = torch.tensor(lut + [tiny], dtype=torch.int64)
        self.tiny_index = len(lut)
        self.steps = steps
        self.mids = torch.cat([code.mid32_down, torch.tensor([math.inf])])

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        bits = y.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        sign = bits >> 31
        e = (bits >> 23) & 0xFF
        t = (bits >> (23 - self.k)) & ((1 << self.k) - 1)
        idx = sign * self.per_sign + ((e - self.LOW_EXP) << self.k) + t
        idx = torch.where(e < self.LOW_EXP, torch.full_like(idx, self.tiny_index), idx)
        c = self.lut[idx]
        for _ in range(self.steps):
            c = c + (y > self.mids[c]).to(torch.int64)
        return c.to(torch.int32)

    def lut_bytes(self) -> int:
        return self.lut.numel()   # one byte per entry in a kernel


# ---- every map in the study -----------------------------------------------------------------------

BNB_SIGNED = TableCode("bnb dynamic (signed)", bnb_dynamic_map(signed=True))
BNB_UNSIGNED = TableCode("bnb dynamic (unsigned)", bnb_dynamic_map(signed=False))
E4M3 = FloatCode(4, 3, signed=True)
E5M2 = FloatCode(5, 2, signed=True)
E3M4 = FloatCode(3, 4, signed=True)
UE5M3 = FloatCode(5, 3, signed=False)
UE4M4 = FloatCode(4, 4, signed=False)

M_MAPS = {"bnb": BNB_SIGNED, "E4M3": E4M3, "E5M2": E5M2, "E3M4": E3M4}
# exp_avg_sq maps: (map, stored form). "sqrt": the map holds sqrt(exp_avg_sq), decoded as its square;
# "floor": exp_avg_sq itself, but a nonzero value never gets the zero code (the smallest positive
# code instead), so a stored exp_avg_sq is never 0 while the true one is not.
V_MAPS = {"bnb": (BNB_UNSIGNED, "v"), "bnb-floor": (BNB_UNSIGNED, "floor"),
          "uE5M3": (UE5M3, "v"), "uE4M4": (UE4M4, "v"),
          "bnb-sqrt": (BNB_UNSIGNED, "sqrt"), "uE5M3-sqrt": (UE5M3, "sqrt"), "uE4M4-sqrt": (UE4M4, "sqrt")}
# (exp_avg map, exp_avg_sq map) pairs: the candidates for the optimizer.
PAIRS = {
    "bnb": ("bnb", "bnb"),
    "E4M3/uE5M3": ("E4M3", "uE5M3"),
    "E4M3/uE4M4": ("E4M3", "uE4M4"),
    "E4M3/uE4M4-sqrt": ("E4M3", "uE4M4-sqrt"),
    "E4M3/uE5M3-sqrt": ("E4M3", "uE5M3-sqrt"),
    "bnb/bnb-sqrt": ("bnb", "bnb-sqrt"),
    "bnb/bnb-floor": ("bnb", "bnb-floor"),
}


# =================================================================================================
# 1b. Encoder checks against a brute-force argmin
# =================================================================================================

def check_inputs(code, samples: int, generator: torch.Generator) -> torch.Tensor:
    """float32 inputs for an encoder check, in the encoder's domain ([-2 TOP, 2 TOP], or
    [0, 2 TOP] unsigned): every code value and midpoint with their float32 neighbours, every
    bfloat16-pattern float, random bit patterns, uniform and log-uniform values, and edge cases."""
    inf = torch.tensor(math.inf)
    q = code.table.double().unique()
    mids = ((q[:-1] + q[1:]) / 2)
    exact_mids = mids.float()[mids.float().double() == mids]
    points = torch.cat([q.float(), exact_mids, mids.float()])
    points = torch.cat([points, torch.nextafter(points, inf), torch.nextafter(points, -inf)])
    bf16_patterns = (torch.arange(1 << 16, dtype=torch.int64) << 16).to(torch.int32).view(torch.float32)
    random_bits = torch.randint(-(1 << 31), 1 << 31, (samples,), generator=generator,
                                dtype=torch.int64).to(torch.int32).view(torch.float32)
    top = code.top
    uniform = (torch.rand(samples, generator=generator) * 2 - 1) * top * 1.05
    log_uniform = torch.exp2(torch.rand(samples, generator=generator) * 42 - 40) * torch.sign(
        torch.rand(samples, generator=generator) - 0.5)
    tiny = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, 1.17549435e-38, 2.0 ** -126, 2.0 ** -149])
    edges = torch.tensor([top, -top, 2 * top, -2 * top, 1.0, -1.0, 2.0, -2.0, 1.5, -1.5])
    edges = torch.cat([edges, torch.nextafter(edges, inf), torch.nextafter(edges, -inf)])
    x = torch.cat([points, bf16_patterns, random_bits, uniform, log_uniform, tiny, edges]).float()
    x = x[torch.isfinite(x) & (x.abs() <= 2 * top)]
    if not code.signed:
        x = x.abs()
    return x


def brute_force_check(code, encoder, x: torch.Tensor, tie_rule: str) -> dict:
    """Compares encoder(x) with the argmin over the 256 decoded values, in float64 (exact for
    these float32 values). A code is correct when its value's distance is the minimum; at a tie
    (two distinct values equally near) the tie rule is checked too."""
    table = code.table.double()
    got = encoder(x).long()
    wrong = ties = tie_wrong = 0
    for start in range(0, x.numel(), 8192):
        xs = x[start:start + 8192].double()
        dist = (xs[:, None] - table[None, :]).abs()
        best = dist.min(dim=1).values
        g = got[start:start + 8192]
        got_dist = (xs - table[g]).abs()
        wrong += int((got_dist != best).sum())
        # Ties: more than one distinct value at the minimum distance.
        at_min = dist == best[:, None]
        distinct = torch.stack([(at_min & (table[None, :] < xs[:, None])).any(1),
                                (at_min & (table[None, :] > xs[:, None])).any(1)], 1).all(1)
        ties += int(distinct.sum())
        if distinct.any():
            xt, gt = xs[distinct], g[distinct]
            if tie_rule == "even":       # the chosen code's mantissa LSB is 0
                tie_wrong += int(((gt & 1) != 0).sum())
            elif tie_rule == "lower":    # the chosen value is the lower of the two
                tie_wrong += int((table[gt] > xt).sum())
    return {"inputs": x.numel(), "mismatches": wrong, "ties": ties, "tie_rule": tie_rule,
            "tie_rule_violations": tie_wrong}


def run_encoder_checks(samples: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    results = {}
    for code in (E4M3, E5M2, E3M4, UE5M3, UE4M4):
        x = check_inputs(code, samples, generator)
        results[code.name] = brute_force_check(code, code.encode, x, "even")
        print(f"  {code.name:<6} encoder vs brute force: {results[code.name]}")
    for code in (BNB_SIGNED, BNB_UNSIGNED):
        x = check_inputs(code, samples, generator)
        results[code.name] = brute_force_check(code, code.encode, x, "lower")
        print(f"  {code.name} (searchsorted) vs brute force: {results[code.name]}")
    buckets = {}
    for code in (BNB_SIGNED, BNB_UNSIGNED):
        x = check_inputs(code, samples, generator)
        x = x[x.abs() <= 1.0]   # the bucketed encoder's domain: y = x / absmax
        exact = code.encode(x)
        for k in range(0, 7):
            enc = BucketedTableEncoder(code, k)
            mismatches = int((enc.encode(x) != exact).sum())
            buckets[f"{code.name}, k={k}"] = {"mantissa_bits_in_index": k, "lut_entries": enc.lut_bytes(),
                                              "max_compare_steps": enc.steps, "inputs": x.numel(),
                                              "mismatches_vs_exact": mismatches}
            print(f"  {code.name} bucketed k={k}: LUT {enc.lut_bytes()} entries, "
                  f"<= {enc.steps} compare steps, {mismatches} mismatches on {x.numel()} inputs")
    return {"encoders": results, "bnb_bucketed": buckets}


# =================================================================================================
# 2. Block-wise quantization of a flat buffer of tensors
# =================================================================================================

class BlockLayout:
    """Blocks of `block` elements over a flat buffer holding several tensors one after another;
    each tensor is blocked from its own first element, and its last block (numel not divisible by
    the block) is a shorter block with its own absmax. A tensor smaller than a block is one
    short block."""

    def __init__(self, sizes: list[int], block: int):
        ids, nblocks = [], 0
        for n in sizes:
            b = (n + block - 1) // block
            ids.append(torch.arange(n) // block + nblocks)
            nblocks += b
        self.block, self.sizes, self.nblocks = block, sizes, nblocks
        self.block_id = torch.cat(ids)

    def absmax(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.nblocks, dtype=torch.float32)
        return out.scatter_reduce_(0, self.block_id, x.abs(), reduce="amax", include_self=True)


@dataclass
class Quantizer:
    """One moment's 8-bit storage: a map and the stored form ("v", "sqrt" or "floor")."""

    code: object
    form: str = "v"

    def quantize(self, x: torch.Tensor, layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, absmax per block) of the float32 flat buffer x."""
        if self.form == "sqrt":
            x = x.sqrt()
        absmax = layout.absmax(x)
        bid = layout.block_id
        if isinstance(self.code, FloatCode):
            r = torch.where(absmax > 0, torch.tensor(self.code.top, dtype=torch.float32) / absmax,
                            torch.zeros_like(absmax))
            codes = self.code.encode(x * r[bid])
        else:
            safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
            y = torch.where(absmax[bid] > 0, x / safe[bid], torch.zeros_like(x))
            # The bucketed encoder: equal to the exact search on |y| <= 1 (checked in part 1), faster here.
            codes = _fast_table_encoder(self.code).encode(y)
        if self.form == "floor":   # unsigned maps only: the zero code is the smallest value
            codes = torch.where((x > 0) & (codes == 0), torch.ones_like(codes), codes)
        return codes, absmax

    def dequantize(self, codes: torch.Tensor, absmax: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
        if isinstance(self.code, FloatCode):
            d = absmax / torch.tensor(self.code.top, dtype=torch.float32)
        else:
            d = absmax
        x = self.code.table[codes.long()] * d[layout.block_id]
        return x * x if self.form == "sqrt" else x

    def roundtrip(self, x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
        return self.dequantize(*self.quantize(x, layout), layout)


_FAST = {}


def _fast_table_encoder(code: TableCode) -> BucketedTableEncoder:
    if id(code) not in _FAST:
        _FAST[id(code)] = BucketedTableEncoder(code, 6)
    return _FAST[id(code)]


def m_quantizer(name: str) -> Quantizer:
    return Quantizer(M_MAPS[name], "v")


def v_quantizer(name: str) -> Quantizer:
    code, form = V_MAPS[name]
    return Quantizer(code, form)


# =================================================================================================
# 3. The optimizer: torch's AdamW math, with the moments stored as 8-bit codes between steps
# =================================================================================================

class QuantAdamW(torch.optim.Optimizer):
    """AdamW with torch's single-tensor (foreach=False) math, run on one flat buffer: the
    parameters are made views of it. Between steps each moment is held as 8-bit codes and a
    float32 absmax per block (or in float32 when its quantizer is None). A step dequantizes,
    updates the moments in float32, updates the parameter from those float32 moments, then takes
    each block's new absmax and requantizes to the nearest code: what the fused kernel would do.

    With both quantizers None it is torch.optim.AdamW(foreach=False) up to the vectorized
    elementwise kernels' rounding (checked in main: the identity self-check)."""

    def __init__(self, groups, lr, betas, eps, m_q: Quantizer | None, v_q: Quantizer | None, block: int):
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0))
        self.params = [p for g in self.param_groups for p in g["params"]]
        sizes = [p.numel() for p in self.params]
        self.layout = BlockLayout(sizes, block)
        n = sum(sizes)
        flat = torch.empty(n, dtype=torch.float32)
        self.decay = torch.empty(n, dtype=torch.bool)
        offset = 0
        for g in self.param_groups:
            for p in g["params"]:
                k = p.numel()
                flat[offset:offset + k] = p.detach().reshape(-1)
                p.data = flat[offset:offset + k].view_as(p)
                self.decay[offset:offset + k] = g["weight_decay"] != 0
                offset += k
        self.flat = flat
        self.m_q, self.v_q = m_q, v_q
        self.m = torch.zeros(n)
        self.v = torch.zeros(n)
        self.m_state = self.m_q.quantize(self.m, self.layout) if m_q else None
        self.v_state = self.v_q.quantize(self.v, self.layout) if v_q else None
        self.t = 0
        self.blowups = 0

    @torch.no_grad()
    def step(self, closure=None):
        self.t += 1
        t = self.t
        group = self.param_groups[0]
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        wds = {g["weight_decay"] for g in self.param_groups}
        assert all(g["lr"] == lr for g in self.param_groups) and len(wds - {0.0}) <= 1
        wd = max(wds)
        grad = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                          for p in self.params])
        m = self.m_q.dequantize(*self.m_state, self.layout) if self.m_q else self.m
        v = self.v_q.dequantize(*self.v_state, self.layout) if self.v_q else self.v
        # torch's _single_tensor_adamw, term for term (scalars in Python double, as torch).
        factor = torch.where(self.decay, torch.tensor(1 - lr * wd, dtype=torch.float32),
                             torch.tensor(1.0, dtype=torch.float32))
        self.flat.mul_(factor)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** t
        bias_correction2 = 1 - beta2 ** t
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2 ** 0.5
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        if lr > 0:
            update = m / denom * step_size
            self.blowups += int((update.abs() > OUTLIER_FACTOR * lr).sum())
        self.flat.addcdiv_(m, denom, value=-step_size)
        # Requantize the new float32 moments (new absmax per block, nearest code).
        if self.m_q:
            self.m_state = self.m_q.quantize(m, self.layout)
        else:
            self.m = m
        if self.v_q:
            self.v_state = self.v_q.quantize(v, self.layout)
        else:
            self.v = v

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.m_q.dequantize(*self.m_state, self.layout) if self.m_q else self.m
        v = self.v_q.dequantize(*self.v_state, self.layout) if self.v_q else self.v
        return m, v


# =================================================================================================
# 4. Training runs
# =================================================================================================

@dataclass
class Variant:
    key: str
    pair: str | None      # None: float32 torch.optim.AdamW
    block: int = 256


@dataclass
class RunResult:
    variant: Variant
    losses: list[float]
    sequence_accuracy: float
    token_accuracy: float
    seconds: float
    blowups: int = 0
    snapshots: dict = field(default_factory=dict)


def initial_state(args) -> dict[str, torch.Tensor]:
    torch.manual_seed(args.seed)
    model = Seq2SeqTransformer(args.vocab, args.d_model, args.heads, args.layers, args.seq_len)
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def make_model(args, state) -> nn.Module:
    model = Seq2SeqTransformer(args.vocab, args.d_model, args.heads, args.layers, args.seq_len)
    model.load_state_dict(state)
    return model


def loss_on_batch(model, src, tgt_in, labels):
    logits = model(src, tgt_in)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                       label_smoothing=LABEL_SMOOTHING)


def flat_state(optimizer: torch.optim.AdamW, params) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.cat([optimizer.state[p]["exp_avg"].reshape(-1) for p in params])
    v = torch.cat([optimizer.state[p]["exp_avg_sq"].reshape(-1) for p in params])
    return m.clone(), v.clone()


def train(variant: Variant, args, state, eval_batch, snapshot_steps=()) -> RunResult:
    """One run from `state`, on the batches of low_bytes_demo (seed + 1), with its schedule
    (linear warmup, then constant). For the float32 run, `snapshot_steps` records the moments
    after those steps and the (clipped) gradient of the step after each."""
    started = time.perf_counter()
    model = make_model(args, state)
    groups = param_groups(model, weight_decay=WEIGHT_DECAY)
    params = [p for g in groups for p in g["params"]]
    if variant.pair is None:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=BETAS, eps=EPS, foreach=False)
    else:
        m_name, v_name = PAIRS[variant.pair]
        optimizer = QuantAdamW(groups, args.lr, BETAS, EPS, m_quantizer(m_name), v_quantizer(v_name), variant.block)
    scheduler = ScheduleLR(optimizer, WarmupConstant(args.warmup))
    generator = torch.Generator().manual_seed(args.seed + 1)
    losses, snapshots = [], {}
    pending = None
    for step in range(1, args.steps + 1):
        batch = make_batch(args.batch_size, args.seq_len, args.vocab, generator, torch.device("cpu"))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad()
        loss = loss_on_batch(model, *batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        if pending is not None:   # the gradient of the step after a snapshot
            pending["next_grad"] = torch.cat([p.grad.reshape(-1) for p in params]).clone()
            pending["next_lr"] = lr
            pending = None
        optimizer.step()
        scheduler.step()
        losses.append(loss.detach())
        if step in snapshot_steps and step < args.steps:
            m, v = flat_state(optimizer, params)
            names = {id(p): n for n, p in model.named_parameters()}
            pending = snapshots[step] = {"m": m, "v": v, "sizes": [p.numel() for p in params],
                                         "names": [names[id(p)] for p in params]}
        if step % 100 == 0 or step == args.steps:
            print(f"\r  {variant.key:<24} step {step:>5}/{args.steps}  loss {loss.item():.4f}", end="", flush=True)
    src, _, target = eval_batch
    sequence_acc, token_acc = accuracy(model, src, target)
    seconds = time.perf_counter() - started
    blowups = getattr(optimizer, "blowups", 0)
    print(f"   exact {sequence_acc:.1%} tokens {token_acc:.1%}  ({seconds:.0f} s)")
    return RunResult(variant, torch.stack(losses).tolist(), sequence_acc, token_acc, seconds, blowups, snapshots)


def identity_check(args, state) -> dict:
    """QuantAdamW with float32 moments against torch.optim.AdamW(foreach=False): the simulated
    step is torch's math."""
    steps = 20
    results = {}
    models = []
    for kind in ("torch", "flat"):
        model = make_model(args, state)
        groups = param_groups(model, weight_decay=WEIGHT_DECAY)
        opt = (torch.optim.AdamW(groups, lr=1e-3, betas=BETAS, eps=EPS, foreach=False) if kind == "torch"
               else QuantAdamW(groups, 1e-3, BETAS, EPS, None, None, 256))
        generator = torch.Generator().manual_seed(args.seed + 1)
        for _ in range(steps):
            batch = make_batch(args.batch_size, args.seq_len, args.vocab, generator, torch.device("cpu"))
            opt.zero_grad()
            loss_on_batch(model, *batch).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            opt.step()
        models.append(model)
    diffs = [(a - b).abs().max().item() for a, b in zip(models[0].parameters(), models[1].parameters())]
    equal = sum(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))
    results = {"steps": steps, "lr": 1e-3, "largest_param_difference": max(diffs),
               "tensors_bitwise_equal": f"{equal}/{len(diffs)}"}
    return results


# =================================================================================================
# 5. Moment errors on the float32 run's snapshots
# =================================================================================================

def moment_errors(snapshots: dict, blocks, betas=BETAS, eps=EPS) -> dict:
    """Per map and block: the round trip's relative errors over all snapshots' nonzero values;
    per pair and block: the update direction's relative L2 error per tensor."""
    beta1, beta2 = betas
    out = {"m": {}, "v": {}, "direction": {}}
    key_bias = torch.cat([_key_bias_mask(s) for s in snapshots.values()])
    for block in blocks:
        for name in M_MAPS:
            out["m"][f"{name}@{block}"] = _relative_errors(
                [(s["m"], m_quantizer(name).roundtrip(s["m"], BlockLayout(s["sizes"], block)))
                 for s in snapshots.values()],
                key_bias)
        for name in V_MAPS:
            out["v"][f"{name}@{block}"] = _relative_errors(
                [(s["v"], v_quantizer(name).roundtrip(s["v"], BlockLayout(s["sizes"], block)))
                 for s in snapshots.values()],
                key_bias)
        for pair, (m_name, v_name) in PAIRS.items():
            stored, nxt = [], []
            for step, s in snapshots.items():
                layout = BlockLayout(s["sizes"], block)
                mq = m_quantizer(m_name).roundtrip(s["m"], layout)
                vq = v_quantizer(v_name).roundtrip(s["v"], layout)
                stored += _direction_errors(s["m"], s["v"], mq, vq, step, s, beta1, beta2, eps)
                g = s["next_grad"]
                m1, v1 = s["m"] * beta1 + (1 - beta1) * g, s["v"] * beta2 + (1 - beta2) * g * g
                m1q, v1q = mq * beta1 + (1 - beta1) * g, vq * beta2 + (1 - beta2) * g * g
                nxt += _direction_errors(m1, v1, m1q, v1q, step + 1, s, beta1, beta2, eps)
            worst = max(nxt)
            out["direction"][f"{pair}@{block}"] = {
                "next_step_median": _median([e for e, _ in nxt]), "next_step_max": worst[0],
                "next_step_worst_tensor": worst[1],
                "stored_median": _median([e for e, _ in stored]), "stored_max": max(stored)[0],
                "tensors": len(nxt)}
    return out


def _median(values: list[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).median())


def _key_bias_mask(snapshot) -> torch.Tensor:
    """True on the attention key biases (the middle third of each in_proj_bias): their gradient
    is zero but for rounding (softmax ignores a shift shared by a query's logits), so their
    moments are ~1e-10 of their neighbours' and any 8-bit map in a shared block stores 0."""
    parts = []
    for n, name in zip(snapshot["sizes"], snapshot["names"]):
        mask = torch.zeros(n, dtype=torch.bool)
        if name.endswith("in_proj_bias"):
            mask[n // 3: 2 * n // 3] = True
        parts.append(mask)
    return torch.cat(parts)


def _relative_errors(pairs, key_bias: torch.Tensor) -> dict:
    exact = torch.cat([a for a, _ in pairs])
    approx = torch.cat([b for _, b in pairs])
    nonzero = exact != 0
    zeroed_elsewhere = int(((approx == 0) & nonzero & ~key_bias).sum())
    x, y = exact[nonzero].double(), approx[nonzero].double()
    rel = ((y - x).abs() / x.abs()).float()
    # A quantile of a large tensor: sort once.
    srt = rel.sort().values
    q = lambda p: float(srt[min(len(srt) - 1, int(p * (len(srt) - 1)))])   # noqa: E731
    return {"median": q(0.5), "p99": q(0.99), "max": float(srt[-1]),
            "zeroed": float((y == 0).double().mean()), "zeroed_outside_key_biases": zeroed_elsewhere,
            "elements": int(nonzero.sum())}


def _direction_errors(m, v, mq, vq, step, snapshot, beta1, beta2, eps) -> list[tuple[float, str]]:
    """(relative L2 error, "step N name") per tensor whose direction is not all zero."""
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    d = (m / bc1) / ((v / bc2).sqrt() + eps)
    dq = (mq / bc1) / ((vq / bc2).sqrt() + eps)
    errors, offset = [], 0
    for n, name in zip(snapshot["sizes"], snapshot["names"]):
        a, b = d[offset:offset + n].double(), dq[offset:offset + n].double()
        offset += n
        norm = a.norm()
        if norm > 0:
            errors.append((float((b - a).norm() / norm), f"step {step} {name}"))
    return errors


# =================================================================================================
# 6. Encode cost (Python-level timing of vectorized torch encoders)
# =================================================================================================

def encoder_timings(n: int, seed: int, repeats: int = 3) -> dict:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=generator) * torch.exp(torch.randn(n, generator=generator) * 2)
    absmax = x.abs().max()
    signed_y = x / absmax
    unsigned_y = signed_y.abs()
    bucket_s = BucketedTableEncoder(BNB_SIGNED, 5)

    def torchao_search(y, qmap=BNB_SIGNED.table):
        # torchao's quantize_8bit_with_qmap: branchless 8-step binary search with table reads, then rounding.
        codes = torch.where(y >= qmap[128], 128, 0)
        for step in (64, 32, 16, 8, 4, 2, 1):
            codes += torch.where(y >= qmap[codes + step], step, 0)
        up = (codes + 1).clamp(max=255)
        down_v, up_v = qmap[codes], qmap[up]
        return torch.where(y - down_v >= (up_v - down_v) * 0.5, up, codes)

    cases = {
        "bnb dynamic: torch.searchsorted over midpoints": lambda: torch.searchsorted(BNB_SIGNED.mid32_down, signed_y),
        "bnb dynamic: torchao's 8-step branchless search": lambda: torchao_search(signed_y),
        f"bnb dynamic: bucketed LUT (k=5, <= {bucket_s.steps} compares)": lambda: bucket_s.encode(signed_y),
        "E4M3 (signed) from bits": lambda: E4M3.encode(signed_y * E4M3.top),
        "uE4M4 from bits": lambda: UE4M4.encode(unsigned_y * UE4M4.top),
        "uE5M3 from bits": lambda: UE5M3.encode(unsigned_y * UE5M3.top),
        "torch .to(float8_e4m3fn) (C++ conversion, reference)": lambda: (signed_y * 448).to(torch.float8_e4m3fn),
    }
    out = {}
    for name, fn in cases.items():
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[name] = best
        print(f"  {name}: {best * 1e3:.0f} ms for {n:.0e} elements")
    return out


# =================================================================================================
# 7. Report
# =================================================================================================

def training_summary(results: list[RunResult]) -> dict:
    reference = next(r for r in results if r.variant.pair is None)
    ref_final = mean(reference.losses[-FINAL_MEAN_STEPS:])
    ref_curve = smoothed(reference.losses)
    out = {}
    for r in results:
        final = mean(r.losses[-FINAL_MEAN_STEPS:])
        out[r.variant.key] = {
            "pair": r.variant.pair, "block": r.variant.block if r.variant.pair else None,
            "final_loss": final, "vs_float32": final - ref_final, "relative": final / ref_final - 1,
            "largest_gap": max(abs(a - b) for a, b in zip(smoothed(r.losses), ref_curve)),
            "sequence_accuracy": r.sequence_accuracy, "token_accuracy": r.token_accuracy,
            "blowups": r.blowups, "seconds": r.seconds, "losses": r.losses}
    return out


def plot(payload: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    blocks = payload["blocks"]
    # (a) update-direction error against block size, per pair.
    ax = axes[0][0]
    for pair in PAIRS:
        ys = [payload["moments"]["direction"][f"{pair}@{b}"]["next_step_median"] for b in blocks]
        ax.plot(blocks, ys, marker="o", label=pair)
    ax.set(xscale="log", yscale="log", xlabel="block size", ylabel="relative L2 error (median over tensors)",
           title="Next step's update direction m_hat/(sqrt(v_hat)+eps), quantized vs float32 moments")
    ax.set_xticks(blocks, [str(b) for b in blocks])
    ax.legend(fontsize=8)
    # (b) exp_avg_sq: median / p99 relative error and fraction zeroed at block 256.
    ax = axes[0][1]
    names = list(V_MAPS) + [f"m:{n}" for n in M_MAPS]
    med = [payload["moments"]["v"][f"{n}@256"]["median"] for n in V_MAPS] + \
          [payload["moments"]["m"][f"{n}@256"]["median"] for n in M_MAPS]
    p99 = [payload["moments"]["v"][f"{n}@256"]["p99"] for n in V_MAPS] + \
          [payload["moments"]["m"][f"{n}@256"]["p99"] for n in M_MAPS]
    zeroed = [payload["moments"]["v"][f"{n}@256"]["zeroed"] for n in V_MAPS] + \
             [payload["moments"]["m"][f"{n}@256"]["zeroed"] for n in M_MAPS]
    xs = range(len(names))
    ax.bar([x - 0.27 for x in xs], med, width=0.27, label="median relative error")
    ax.bar(xs, p99, width=0.27, label="p99 relative error")
    ax.bar([x + 0.27 for x in xs], zeroed, width=0.27, label="fraction of nonzero values stored as 0")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), [n.replace("-", "\n") for n in names], fontsize=8)
    ax.set(title="Round trip of the moments, block 256 (v maps: exp_avg_sq; m: exp_avg)")
    ax.legend(fontsize=8)
    # (c) loss curves and (d) difference from float32.
    training = payload.get("training")
    if training:
        ref = next(e for e in training.values() if e["pair"] is None)
        ref_curve = smoothed(ref["losses"])
        for key, e in training.items():
            steps = range(1, len(e["losses"]) + 1)
            curve = smoothed(e["losses"])
            style = dict(color="black", linestyle="--", linewidth=1.6, zorder=10) if e["pair"] is None else {}
            axes[1][0].plot(steps, curve, label=f"{key}: {e['final_loss']:.4f}", **style)
            axes[1][1].plot(steps, [c - r for c, r in zip(curve, ref_curve)], label=key, **style)
        axes[1][0].set(xlabel="optimizer step", ylabel=f"training loss ({SMOOTHING_WINDOW}-step moving mean)",
                       title="Training loss (legend: final loss, mean of the last 50 steps)")
        axes[1][0].legend(fontsize=8)
        axes[1][1].set_yscale("symlog", linthresh=0.01)
        axes[1][1].set(xlabel="optimizer step", ylabel="loss minus float32's (moving means, symlog)",
                       title="Difference from float32 torch AdamW")
        axes[1][1].legend(fontsize=8)
    for row in axes:
        for ax in row:
            ax.grid(True, alpha=0.3, which="both")
    fig.suptitle(f"8-bit AdamW moments: maps and block sizes ({payload['machine']['date']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 0.01 and abs(x) < 1000:
        return f"{x:.3f}"
    return f"{x:.2e}"


def markdown(payload: dict) -> str:
    m = payload["machine"]
    a = payload["args"]
    lines = [
        "# 8-bit AdamW moments: maps and block sizes (issue 24)",
        "",
        f"Command: `{payload['command']}`  ",
        f"Machine: {m['cpu']} ({m['cores']} cores, {m['threads']} torch thread(s)), {m['platform']}, "
        f"torch {m['torch']}, {m['date']}. Total time {payload['seconds']:.0f} s.",
        "",
        "## Maps",
        "",
        "bitsandbytes' dynamic map (built as `create_dynamic_map` builds it; checked properties):",
        "",
    ]
    for key, props in payload["bnb_map"].items():
        lines.append(f"- {key}: " + ", ".join(f"{k} {v}" for k, v in props.items()))
    lines += ["", "8-bit float formats (all codes finite; top binade [1, 2); block scale r = TOP/absmax):", "",
              "| map | sign | exponent bits | mantissa bits | TOP | smallest positive / TOP | smallest normal / TOP "
              "| max relative rounding error (normals) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for code in (E4M3, E5M2, E3M4, UE5M3, UE4M4):
        lines.append(f"| {code.name} | {'yes' if code.signed else 'no'} | {code.E} | {code.M} | {code.top} "
                     f"| {code.smallest_positive / code.top:.2e} | {code.smallest_normal / code.top:.2e} "
                     f"| {2.0 ** -(code.M + 1):.4f} |")
    lines += ["", "### Encoders against a brute-force argmin over the 256 decoded values", "",
              "| encoder | inputs | mismatches | ties met | tie rule | tie-rule violations |",
              "|---|---:|---:|---:|---|---:|"]
    for name, r in payload["checks"]["encoders"].items():
        lines.append(f"| {name} | {r['inputs']} | {r['mismatches']} | {r['ties']} | {r['tie_rule']} "
                     f"| {r['tie_rule_violations']} |")
    lines += ["", "Bucketed encoder of the dynamic map (lookup by sign, exponent and k top mantissa bits, then "
              "`code += y > mid[code]` at most K times), against the exact encoder:", "",
              "| map, k | LUT entries (bytes) | K (max compare steps) | inputs | mismatches |",
              "|---|---:|---:|---:|---:|"]
    for name, r in payload["checks"]["bnb_bucketed"].items():
        lines.append(f"| {name} | {r['lut_entries']} | {r['max_compare_steps']} | {r['inputs']} "
                     f"| {r['mismatches_vs_exact']} |")
    lines += ["", "## Moments of the float32 run, quantized (round trip)", "",
              f"Snapshots of exp_avg and exp_avg_sq after steps {payload['snapshot_steps']} of the float32 "
              "torch.optim.AdamW run below (all 67 tensors, tails as short blocks). Relative error over the "
              "nonzero elements of all snapshots; zeroed: fraction of nonzero values stored as 0; outside key "
              "biases: how many of those are not attention key biases (in_proj_bias[d:2d], whose gradient is "
              "rounding noise, ~1e-10 of their neighbours', and which cannot change the model's output).", "",
              "| moment | map | block | median rel. error | p99 | max | zeroed | zeroed outside key biases |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for moment, maps in (("exp_avg", M_MAPS), ("exp_avg_sq", V_MAPS)):
        key = "m" if moment == "exp_avg" else "v"
        for name in maps:
            for b in payload["blocks"]:
                r = payload["moments"][key][f"{name}@{b}"]
                lines.append(f"| {moment} | {name} | {b} | {fmt(r['median'])} | {fmt(r['p99'])} | {fmt(r['max'])} "
                             f"| {fmt(r['zeroed'])} | {r['zeroed_outside_key_biases']} of {r['elements']} |")
    lines += ["", "Update direction m_hat / (sqrt(v_hat) + eps), relative L2 error per tensor (median and worst "
              "over tensors x snapshots). Next step: the direction the following step computes from the "
              "quantized moments and its true gradient (what the kernel would use); stored: the snapshot "
              "itself.", "",
              "| pair (exp_avg / exp_avg_sq) | block | next step, median | next step, worst | worst tensor "
              "| stored, median | stored, worst |",
              "|---|---:|---:|---:|---|---:|---:|"]
    for pair in PAIRS:
        for b in payload["blocks"]:
            r = payload["moments"]["direction"][f"{pair}@{b}"]
            lines.append(f"| {pair} | {b} | {fmt(r['next_step_median'])} | {fmt(r['next_step_max'])} "
                         f"| {r['next_step_worst_tensor']} | {fmt(r['stored_median'])} | {fmt(r['stored_max'])} |")
    training = payload.get("training")
    if training:
        lines += ["", "## Training with 8-bit moments (simulated step)", "",
                  f"Settings (low_bytes_demo's): float32 parameters, {a['steps']} steps, batch {a['batch_size']}, "
                  f"lr {a['lr']:g} "
                  f"(linear warmup over {a['warmup']} steps, then constant), betas {BETAS}, eps {EPS:g}, weight decay "
                  f"{WEIGHT_DECAY} on matrices, gradients clipped to norm {MAX_GRAD_NORM}, label smoothing "
                  f"{LABEL_SMOOTHING}; d_model {a['d_model']}, {a['heads']} heads, {a['layers']}+{a['layers']} layers, "
                  f"reversing {a['seq_len']} tokens of a vocabulary of {a['vocab'] - 1}; seed {a['seed']}. "
                  "Every tensor's moments are 8-bit (no size threshold). Final loss: mean of the last "
                  f"{FINAL_MEAN_STEPS} steps (lowest possible {payload['loss_floor']:.4f}). Largest gap: largest "
                  "difference "
                  f"of the {SMOOTHING_WINDOW}-step moving means from float32's. Blow-ups: element updates with "
                  f"|update| > {OUTLIER_FACTOR:g} x lr over the run (float32 Adam's bound is about 1.7 x lr "
                  "for these betas). Accuracy: greedy decoding of "
                  f"{EVAL_BATCH} held-out sequences.", "",
                  "| variant | final loss | vs float32 | relative | largest gap | exact sequences | tokens "
                  "| blow-ups | seconds |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key, e in training.items():
            lines.append(f"| {key} | {e['final_loss']:.4f} | {e['vs_float32']:+.5f} | {e['relative']:+.3%} "
                         f"| {e['largest_gap']:.4f} | {e['sequence_accuracy']:.1%} | {e['token_accuracy']:.1%} "
                         f"| {e['blowups']} | {e['seconds']:.0f} |")
        ic = payload["identity_check"]
        lines += ["", f"Identity self-check: the simulated step with float32 moments against torch.optim.AdamW"
                  f"(foreach=False), {ic['steps']} steps at lr {ic['lr']:g}: largest parameter difference "
                  f"{ic['largest_param_difference']:.1e}, tensors bitwise equal {ic['tensors_bitwise_equal']}."]
    if payload.get("timings"):
        lines += ["", "## Encode cost", "", "Operations per element:", ""]
        for name, ops in payload["encoder_ops"].items():
            lines.append(f"- {name}: {ops}")
        lines += ["", f"Python-level timing of vectorized torch encoders on {payload['timing_elements']:.0e} "
                  "float32 elements, one thread, best of 3 (each torch op is a pass over memory: this ranks "
                  "the encoders' work roughly, it is NOT the fused C++ kernel's cost):", "",
                  "| encoder | ms |", "|---|---:|"]
        for name, s in payload["timings"].items():
            lines.append(f"| {name} | {s * 1e3:.0f} |")
    lines += ["", "![chart](quantization_maps.png)", ""]
    return "\n".join(lines)


# =================================================================================================
# command line
# =================================================================================================

DEFAULT_TRAIN = ["bnb@256", "bnb/bnb-floor@256", "bnb/bnb-sqrt@256", "E4M3/uE5M3@256", "E4M3/uE4M4@256",
                 "E4M3/uE4M4-sqrt@256", "E4M3/uE4M4-sqrt@64"]


def parse_variant(text: str) -> Variant:
    pair, _, block = text.rpartition("@")
    if pair not in PAIRS or not block.isdigit() or int(block) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PAIR@BLOCK with PAIR one of {list(PAIRS)}")
    return Variant(text, pair, int(block))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     epilog="Pairs: " + ", ".join(f"{k} = exp_avg {v[0]} / exp_avg_sq {v[1]}"
                                                                   for k, v in PAIRS.items()))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "quantization_maps",
                        help="folder for the report, JSON and chart")
    parser.add_argument("--steps", type=int, default=1200, help="training steps per run (low_bytes_demo: 1200)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak lr (low_bytes_demo: 1e-4)")
    parser.add_argument("--warmup", type=int, default=100, help="linear warmup steps (low_bytes_demo: 100)")
    parser.add_argument("--train", type=parse_variant, nargs="*", default=None, metavar="PAIR@BLOCK",
                        help="8-bit training runs besides float32 (default: " + " ".join(DEFAULT_TRAIN) + "); "
                        "given with no value: none, the float32 run still runs for the snapshots")
    parser.add_argument("--snapshot-steps", default="10,100,400,1000",
                        help="steps of the float32 run whose moments are quantized (comma-separated)")
    parser.add_argument("--check-samples", type=int, default=200_000,
                        help="random inputs of each kind per encoder check")
    parser.add_argument("--timing-elements", type=int, default=10_000_000,
                        help="elements for the encoder timing (0: skip)")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=11, help="vocabulary size, BOS included")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.train is None:
        args.train = [parse_variant(v) for v in DEFAULT_TRAIN]
    args.snapshot_steps = sorted({int(s) for s in args.snapshot_steps.split(",") if s.strip()})
    if min(args.steps, args.warmup, args.d_model, args.batch_size, args.seq_len) <= 0:
        parser.error("--steps, --warmup, --d-model, --batch-size and --seq-len must be positive")
    if not args.snapshot_steps or max(args.snapshot_steps) >= args.steps or min(args.snapshot_steps) < 1:
        parser.error("--snapshot-steps must lie in [1, --steps - 1]")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    print("1. maps")
    bnb_map = {"bnb dynamic, signed (exp_avg)": check_bnb_map(BNB_SIGNED.table, True),
               "bnb dynamic, unsigned (exp_avg_sq)": check_bnb_map(BNB_UNSIGNED.table, False)}
    for k, v in bnb_map.items():
        print(f"  {k}: {v}")
    checks = run_encoder_checks(args.check_samples, args.seed)
    failures = sum(r["mismatches"] + r["tie_rule_violations"] for r in checks["encoders"].values()) + \
        sum(r["mismatches_vs_exact"] for r in checks["bnb_bucketed"].values())

    state = initial_state(args)
    eval_batch = make_batch(EVAL_BATCH, args.seq_len, args.vocab, torch.Generator().manual_seed(args.seed + 2),
                            torch.device("cpu"))
    print("2. identity self-check of the simulated step")
    identity = identity_check(args, state)
    print(f"  {identity}")
    print(f"3. float32 run (snapshots after steps {args.snapshot_steps}) and 8-bit runs")
    results = [train(Variant("float32 torch AdamW", None), args, state, eval_batch, set(args.snapshot_steps))]
    print("4. moment errors on the snapshots")
    moments = moment_errors(results[0].snapshots, BLOCKS)
    for key in ("bnb@256", "E4M3/uE4M4-sqrt@256"):
        print(f"  direction {key}: {moments['direction'][key]}")
    for v in args.train:
        results.append(train(v, args, state, eval_batch))
    timings = {}
    if args.timing_elements:
        print("5. encoder timings (Python level)")
        timings = encoder_timings(args.timing_elements, args.seed)
    bucket = BucketedTableEncoder(BNB_SIGNED, 5)
    payload = {
        "machine": machine_info(),
        "command": shlex.join(["python", "benchmarks/quantization_maps.py", *(sys.argv[1:] if argv is None else argv)]),
        "args": {k: (str(v) if isinstance(v, Path) else [x.key for x in v] if k == "train" else v)
                 for k, v in vars(args).items()},
        "blocks": list(BLOCKS), "snapshot_steps": args.snapshot_steps, "loss_floor": loss_floor(args.vocab),
        "bnb_map": bnb_map, "checks": checks, "identity_check": identity, "moments": moments,
        "training": training_summary(results),
        "encoder_ops": {
            "bnb dynamic, bitsandbytes' kernel": BNB_SIGNED.ops(),
            f"bnb dynamic, bucketed LUT (k=5, {bucket.lut_bytes()}-byte LUT)":
                f"1 division; bits: 3 shifts/ands, 1 compare+select (tiny), 1 LUT read, then <= {bucket.steps} x "
                "(1 midpoint table read, compare, add)",
            "E4M3 / E5M2 / E3M4 (signed)": E4M3.ops(),
            "uE5M3 / uE4M4": UE5M3.ops(),
            "sqrt forms": "the kernel computes sqrt(v) for the update anyway: encoding it costs nothing more; "
                          "decoding squares it (1 mul)",
            "decode, any map": "1 table read (256 entries) or, for float formats, shift into float bits and 1 mul "
                               "by a power of two; then 1 mul by the block's scale",
        },
        "timings": timings, "timing_elements": args.timing_elements,
        "seconds": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantization_maps.json").write_text(json.dumps(payload, indent=1))
    report = markdown(payload)
    (args.out / "quantization_maps.md").write_text(report)
    drew = plot(payload, args.out / "quantization_maps.png")
    print(report)
    chart = f", chart: {args.out / 'quantization_maps.png'}" if drew else ""
    print(f"report: {args.out / 'quantization_maps.md'}{chart}")
    print(f"total time: {time.perf_counter() - started:.0f} s")
    if failures:
        print(f"ENCODER CHECK FAILURES: {failures}")
        sys.exit(1)
    return payload


if __name__ == "__main__":
    main()
