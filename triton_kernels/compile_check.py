"""Compile every kernel for a GPU target without a GPU (catches what the interpreter lets through).

The interpreter runs kernels as numpy code, so type errors, unsupported ops or shapes that the GPU
compiler rejects only show on a GPU. Triton can compile ahead of time for a target it does not
have (``GPUTarget``), down to a cubin with its bundled ``ptxas``; this module does that for each
kernel and dtype. Run it without ``TRITON_INTERPRET``::

    python -m prunepeft_triton.compile_check [fp32 fp16 bf16] [--arch 90]
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dtypes", nargs="*", default=["fp32", "fp16", "bf16"])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import bottleneck as B
    from . import scoring as S

    target = GPUTarget("cuda", args.arch, 32)

    def comp(kernel, types: dict[str, str], consts: dict[str, object], options=None) -> None:
        sig = {n: types.get(n, "constexpr") for n in kernel.arg_names}
        triton.compile(
            ASTSource(fn=kernel, signature=sig, constexprs=consts), target=target, options=options or {}
        )
        print(f"ok  sm_{args.arch}  {kernel.fn.__name__}  {types.get('d_ptr', types.get('b_ptr', '*fp32'))}")

    acts = dict(HAS_RELU=True, HAS_GELU=True, HAS_SILU=True)
    for dt in args.dtypes:
        p, f, i = "*" + dt, "*fp32", "*i64"
        prec = "ieee" if dt == "fp32" else "tf32"
        blocks = dict(DOT_PREC=prec, BLOCK_M=64, BLOCK_K=64, BLOCK_R=64, BLOCK_N=64)
        comp(
            B._bottleneck_fwd_kernel,
            dict(x_ptr=p, out_ptr=p, z_ptr=f, habs_ptr=f, stride_xm="i32", stride_om="i32", stride_zm="i32",
                 d_ptr=p, ut_ptr=p, bd_ptr=p, bu_ptr=p, doff_ptr=i, uoff_ptr=i, bdoff_ptr=i, act_ptr=i,
                 scale_ptr=p, tiles_ptr=i, M="i32", K="i32", R="i32", T="i32"),
            dict(HAS_BD=True, HAS_BU=True, STORE_Z=True, HAS_HABS=True, N_SPLIT=1, **acts, **blocks),
        )  # fmt: skip
        comp(
            B._bottleneck_bwd_dx_kernel,
            dict(g_ptr=p, z_ptr=f, dz_ptr=f, dx_ptr=p, stride_gm="i32", stride_zm="i32", stride_dxm="i32",
                 d_ptr=p, ut_ptr=p, doff_ptr=i, uoff_ptr=i, act_ptr=i, scale_ptr=p, tiles_ptr=i,
                 M="i32", K="i32", R="i32", T="i32"),
            dict(**acts, **blocks),
        )  # fmt: skip
        for from_z in (False, True):
            comp(
                B._bottleneck_wgrad_kernel,
                dict(a_ptr=f, b_ptr=p, out_ptr=p, stride_am="i32", stride_bm="i32", off_ptr=i, act_ptr=i,
                     scale_ptr=p, tiles_ptr=i, M="i32", C="i32", T="i32"),
                dict(FROM_Z=from_z, DOT_PREC=prec, BLOCK_M=64, BLOCK_R=64, BLOCK_C=64, **acts),
            )  # fmt: skip
    t32, t64, ti = "*fp32", "*fp64", "*i64"
    for ada in (False, True):
        comp(
            S._block_stats_kernel,
            dict(w_ptr=t32, g_ptr=t32, sens_ptr=t32, unc_ptr=t32, seg_ptr_ptr=ti, seg_off_ptr=ti,
                 seg_len_ptr=ti, scal_ptr=t64, stats_ptr=t64, accum_ptr=t64),
            dict(HAS_GRAD=True, HAS_ADALORA=ada, HAS_ACCUM=True, ACCUM_EMA=True, BLOCK=1024),
            {"enable_fp_fusion": False},
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
