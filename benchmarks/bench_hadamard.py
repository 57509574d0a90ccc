"""Online Hadamard rotation fused with per-token activation quantization (issue 15), bf16 in:
SmolLM2's down_proj width 1536 = 12 x 128, a power of two (4096), Llama-2's 11008 = 172 x 64 and
28672 = 28 x 1024, 8192 tokens (target: >= 80% of the copy bandwidth). Providers: the op as the
API runs it (``fused``: the Triton kernel; ``fused_api_composition``: widths it does not take,
the transform as matrix products then act_quant; ``cuda``: csrc/hadamard_quant.cu, where the API
routes the wide widths with a small factor under CBQ_HADAMARD_CUDA=smem or for fp32 inputs;
``cuda_reg``: the register kernels, its default for 16-bit inputs), the CUDA kernel timed beside
the API's path where it takes the width and is not what the API ran (``cuda``), the Triton tile
or the composition beside the CUDA kernel where the API ran the latter (``triton_tile``,
``fused_api_composition``), the CUDA kernel with its small factor on the CUDA cores instead of
the tensor cores (``cuda_fma``), the register kernels where each applies (``cuda_reg1``:
csrc/hadamard_quant_reg.cu, ``cuda_reg3``: the same with two m-tiles per warp, ``cuda_reg2``:
csrc/hadamard_quant_xch.cu; the API's default: ``cuda_reg``, variant 0), the butterfly
reference's composition (the transform, then act_quant), act_quant alone (the cost without
rotation); then, int8 codes, the Triton kernel at other rows per program / warps than its
default (``fused R=rows w=warps``: where the default came from).

    python benchmarks/bench_hadamard.py --out benchmarks/results/h200
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Environment, Table, bench, cli, write_report
from cbq_kernels import hadamard
from cbq_kernels.act_quant import act_quant
from cbq_kernels.hadamard_quant import (
    _api_kernel,
    _config,
    _fits,
    _launch,
    _launch_cuda,
    _reg_takes,
    _tile,
    _use_cuda,
    hadamard_act_quant,
    launch_configs,
)


def main() -> None:
    out = cli(__doc__)
    torch.manual_seed(0)
    table = Table(Environment.detect())
    t = 8192
    notes = []
    for n in (1536, 4096, 11008, 28672):
        x = (torch.randn(t, n, device="cuda") * 2).to(torch.bfloat16)
        dst = torch.empty_like(x)
        copy_t = bench(lambda x=x, dst=dst: dst.copy_(x))
        copy_gbps = 4 * x.numel() / copy_t.p50_ms / 1e6
        shape = f"{t}x{n}"
        table.add("copy", "torch.copy_", shape, "bf16", copy_t, nbytes=4 * x.numel(),
                  copy_gbps=copy_gbps)  # fmt: skip
        signs = hadamard.random_signs(n, 0).cuda()
        for bits in (8, 4):
            nbytes = x.numel() * 2 + x.numel() * bits // 8 + t * 4
            name = f"hadamard_int{bits}"
            plain = bench(lambda x=x, b=bits: act_quant(x, b))
            table.add(name, "act_quant_only", shape, "bf16", plain, nbytes=nbytes,
                      copy_gbps=copy_gbps)  # fmt: skip
            comp = bench(
                lambda x=x, b=bits, s=signs: act_quant(hadamard.transform(x.float(), s), b)
            )
            table.add(name, "transform_then_act_quant", shape, "bf16", comp, nbytes=nbytes,
                      copy_gbps=copy_gbps)  # fmt: skip
            try:
                fused = bench(lambda x=x, b=bits, s=signs: hadamard_act_quant(x, b, s))
            except Exception as err:  # e.g. out of shared memory at a width: noted, not fatal
                notes.append(f"- {n}, int{bits}: the fused op failed: {str(err)[:160]}")
                continue
            kernel = _api_kernel(x, bits)  # what the op above ran
            api_reg = kernel == "reg"
            api = kernel is not None
            provider = ("cuda_reg" if api_reg else "cuda" if api else "fused" if _fits(n)
                        else "fused_api_composition")  # fmt: skip
            table.add(name, provider, shape, "bf16", fused, nbytes=nbytes, copy_gbps=copy_gbps,
                      baseline=comp, baseline_name="transform_then_act_quant")  # fmt: skip
            for variant in (1, 2, 3):  # the register kernels beside it, each where it applies
                if not _reg_takes(x, bits, variant):
                    continue
                rg = bench(lambda x=x, b=bits, s=signs, v=variant: _launch_cuda(
                    x, b, s, 1.0, reg=True, variant=v))  # fmt: skip
                table.add(name, f"cuda_reg{variant}", shape, "bf16", rg, nbytes=nbytes,
                          copy_gbps=copy_gbps, baseline=comp,
                          baseline_name="transform_then_act_quant")  # fmt: skip
            if _use_cuda(x) and (api_reg or not api):  # the CUDA kernel beside what the API runs
                cu = bench(lambda x=x, b=bits, s=signs: _launch_cuda(x, b, s, 1.0))
                table.add(name, "cuda", shape, "bf16", cu, nbytes=nbytes, copy_gbps=copy_gbps,
                          baseline=comp, baseline_name="transform_then_act_quant")  # fmt: skip
            if _use_cuda(x, mma=False):  # its small factor on the CUDA cores instead
                cu = bench(lambda x=x, b=bits, s=signs: _launch_cuda(x, b, s, 1.0, mma=False))
                table.add(name, "cuda_fma", shape, "bf16", cu, nbytes=nbytes,
                          copy_gbps=copy_gbps)  # fmt: skip
            if api and _fits(n):  # the Triton tile beside the CUDA kernel
                tile = bench(lambda x=x, b=bits, s=signs: _launch(x, b, s, 1.0))
                table.add(name, "triton_tile", shape, "bf16", tile, nbytes=nbytes,
                          copy_gbps=copy_gbps)  # fmt: skip
            elif api:  # the composition that CBQ_HADAMARD_CUDA=0 runs there
                cm = bench(lambda x=x, b=bits, s=signs: act_quant(hadamard.apply(x.float(), s), b))
                table.add(name, "fused_api_composition", shape, "bf16", cm, nbytes=nbytes,
                          copy_gbps=copy_gbps)  # fmt: skip
        if _fits(n):  # the sweep of the launch configuration (int8 codes)
            m_pad, p1, p2 = _tile(n)
            nbytes = x.numel() * 3 + t * 4
            default = _config(m_pad * p1 * p2)
            for rows, warps in launch_configs(n):
                if (rows, warps) == default:
                    continue
                try:
                    tm = bench(lambda x=x, s=signs, r=rows, w=warps: _launch(x, 8, s, 1.0, r, w))
                except Exception as err:  # e.g. out of shared memory: noted, not fatal
                    notes.append(f"- {n}: fused R={rows} w={warps} failed: {str(err)[:120]}")
                    continue
                table.add("hadamard_int8", f"fused R={rows} w={warps}", shape, "bf16", tm,
                          nbytes=nbytes, copy_gbps=copy_gbps)  # fmt: skip
            notes.append(f"- {n}: tile (m_pad, p1, p2) = {(m_pad, p1, p2)}, default (rows per "
                         f"program, warps) = {default}")
        else:
            notes.append(f"- width {n}: outside the fused kernel's tile (padded small factor <= "
                         "64, m_pad x 2^j <= 32768): the API runs hadamard.transform_matmul "
                         "(matrix products) then act_quant; transform_then_act_quant is the "
                         "butterfly reference")  # fmt: skip
    columns = ("op", "provider", "shape", "p50_ms", "gbps", "frac_copy_bw", "speedup")
    print(write_report(table, out, "bench_hadamard", "Online Hadamard + activation quantization",
                       "benchmarks/bench_hadamard.py", columns, notes))  # fmt: skip


if __name__ == "__main__":
    main()
