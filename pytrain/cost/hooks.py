"""Data-parallel step time of each DDP comm hook over a link of a given rate: which hook to turn on.

Per hook h on W ranks, for a model of N fp32 parameters whose step computes for c seconds:

    step(h) = ddp_step(N, compute_s=c, link, compression_ratio=r_h, codec_s=k_h N, host_s_per_byte=kappa)
    link    = Link(alpha, 8 / (rate * efficiency))                                       (bytes/s on the wire)

r_h: bytes on the wire / bytes of the fp32 all-reduce (``compression_ratio``: PowerSGD rank r ~ 2 r / width for
square width x width weights, top-k 2 x ratio (values and indices), int8 / fp8 (1 + 4 / block) / 4);
k_h: the codec's seconds per parameter per step (compress + decompress + error feedback), measured by
``bench/bench_links.py`` as the step time the model without codec does not explain.  ``CODEC_S_PER_PARAM`` holds
those of the 2-core AVX2 EPYC of ``bench/results/links-2026-12-07-pipelined-cpu-avx2.md`` (CPU, one thread per rank): rerun the
bench on your own machine before trusting them there (a GPU codes orders of magnitude faster).  ``LINK_EFFICIENCY`` and
``LINK_ALPHA_S`` come from calibrating the emulated links (the Xeon run of 2026-12-06; the EPYC run gave 95-96%, ``pytrain.cost.calibrate`` over tbf-limited
veth pairs): the all-reduce reaches ``efficiency`` of the nominal rate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from ._checks import count, real
from .collectives import Link
from .ddp import ddp_step

#: hook -> codec seconds per parameter per step: bench/results/links-2026-12-07-pipelined-cpu-avx2.md (25.2M params,
#: 2 ranks, one thread each, on a 2-core AVX2 EPYC; pipelined hooks, the 8-bit ones on their fused codec ops),
#: codec ms / 25.2M, fitted with the host work below
CODEC_S_PER_PARAM: Dict[str, float] = {"powersgd_r1": 3.65e-9, "powersgd_r4": 4.51e-9, "powersgd_r8": 5.18e-9,
                                       "topk_0.1%": 2.57e-9, "topk_1%": 4.16e-9, "int8": 4.30e-9, "fp8": 6.36e-9}
LINK_EFFICIENCY = 0.97  # all-reduce bandwidth / tbf rate at 0.5 and 1 Gbit/s (10 Gbit/s: 37%, CPU-bound there)
LINK_ALPHA_S = 1e-3  # the calibrated alphas scatter from 0 to 2.5 ms on the loaded machine
#: kappa: CPU seconds a rank spends per byte it sends over TCP (``Calibration.host_s_per_byte``), the median of
#: the emulated links' calibrations in bench/results/links-2026-12-07-pipelined-cpu-avx2.md (0.78-1.02 ns/byte at
#: 0.5-10 Gbit/s; 0 for NCCL on GPUs)
LINK_HOST_S_PER_BYTE = 1.01e-9
QUANT_BLOCK = 256


def compression_ratio(hook: str, width: int) -> float:
    """Bytes on the wire over those of the fp32 all-reduce for ``hook`` ("plain", "powersgd_r<k>",
    "topk_<pct>%", "int8", "fp8") on square ``width`` x ``width`` weight matrices."""
    if hook == "plain":
        return 1.0
    if hook.startswith("powersgd_r"):
        return min(1.0, 2 * int(hook[len("powersgd_r"):]) / count("width", width))
    if hook.startswith("topk_") and hook.endswith("%"):
        return 2 * float(hook[len("topk_"):-1]) / 100
    if hook in ("int8", "fp8"):
        return (1 + 4 / QUANT_BLOCK) / 4
    raise ValueError(f"unknown hook {hook!r}; expected plain, powersgd_r<k>, topk_<pct>%, int8 or fp8")


@dataclass(frozen=True)
class HookEstimate:
    hook: str
    step_s: float
    comm_s: float
    codec_s: float
    compression_ratio: float


def link_for_rate(rate_bits: float, efficiency: float = LINK_EFFICIENCY, alpha_s: float = LINK_ALPHA_S) -> Link:
    """The alpha-beta link of a ``rate_bits`` bit/s link whose collectives reach ``efficiency`` of it."""
    return Link(real("alpha_s", alpha_s), 8 / (real("rate_bits", rate_bits, strict=True) * efficiency))


def hook_steps(n_params: int, width: int, compute_s: float, link: Link, world_size: int = 2,
               codec_s_per_param: Dict[str, float] = None,
               host_s_per_byte: float = LINK_HOST_S_PER_BYTE) -> List[HookEstimate]:
    """Predicted step of every hook of ``codec_s_per_param`` (default ``CODEC_S_PER_PARAM``, and plain),
    fastest first; ``host_s_per_byte``: the ranks' compute per byte sent (see ``pytrain.cost.ddp``)."""
    codecs = dict(CODEC_S_PER_PARAM if codec_s_per_param is None else codec_s_per_param)
    codecs.setdefault("plain", 0.0)
    out = []
    for hook, k in codecs.items():
        r = compression_ratio(hook, width)
        est = ddp_step(count("n_params", n_params), compute_s=compute_s, world_size=world_size, link=link,
                       compression_ratio=r, codec_s=k * n_params, host_s_per_byte=host_s_per_byte)
        out.append(HookEstimate(hook, est.step_s, est.comm_s, k * n_params, r))
    return sorted(out, key=lambda e: e.step_s)
