"""Split-K for every matmul family: the K ranges, the partials workspace, and one reduce + epilogue kernel.

With `split_k > 1` a matmul kernel (tile or GEMV) computes each K range in its own program and
writes the raw accumulator to a workspace `[SPLIT, B, M, N]` (int32 for integer recipes, f32 for
float ones); `splitk_reduce_kernel` then sums the partials in fixed split order (deterministic;
int32 sums are exact, so W8A8 stays bit-identical to the unsplit kernel and the reference) and
applies DESIGN.md section 4's epilogue once: W8A8 `(f32(acc) * s_rhs[n]) * s_lhs[m]`, then
`+ bias[n]` (float recipes: `+ bias[n]` only), then one cast. Atomics would save the second launch
but make the f32 sum order, hence the float output, depend on scheduling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qkernels.kernels.triton._common import MatmulConfig, batch_stride, store_rescaled

__all__ = ["SplitPlan", "plan", "k_split", "splitk_reduce_kernel", "REDUCE_BLOCK_N", "reduce_block_m",
           "reduce_num_warps"]

REDUCE_BLOCK_N = 128
"""Columns per reduce program: at M=1, N=4096 that is 32 programs, each reading SPLIT x 512 bytes."""


def reduce_block_m(m: int) -> int:
    """Rows per reduce program: every row of a decode call (M <= 16) in one program."""
    return min(triton.next_power_of_2(max(m, 1)), 16)


def reduce_num_warps(block_m: int) -> int:
    """Warps per reduce program: 8 from 8 rows up (with 4, ptxas spills the f32 8-row block on sm_80)."""
    return 8 if block_m >= 8 else 4


@triton.jit
def splitk_reduce_kernel(
    # pointers
    part_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, SPLITS,
    # strides (batch stride 0: operand shared by every batch)
    stride_ps, stride_pb, stride_pm, stride_pn,
    stride_asb, stride_asm,
    stride_wsb, stride_wsn,
    stride_ob, stride_om, stride_on,
    # meta-parameters
    RESCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    offs_m = (pid // num_pid_n) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = (pid % num_pid_n) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m_ok = offs_m < M
    n_ok = offs_n < N
    mask = m_ok[:, None] & n_ok[None, :]
    p_ptrs = part_ptr + pid_b * stride_pb + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn

    # Fixed split order, in the partials' own dtype: int32 sums are exact, f32 ones deterministic.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=part_ptr.dtype.element_ty)  # [BLOCK_M, BLOCK_N] int32 or f32
    for s in range(0, SPLITS):
        acc += tl.load(p_ptrs + s * stride_ps, mask=mask, other=0)

    # Epilogue on the whole-K accumulator, DESIGN.md section 4's order.
    out_ptrs = out_ptr + pid_b * stride_ob + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    store_rescaled(acc, out_ptrs, mask, a_scale_ptr + pid_b * stride_asb + offs_m * stride_asm,
                   w_scale_ptr + pid_b * stride_wsb + offs_n * stride_wsn, bias_ptr + offs_n, m_ok, n_ok,
                   RESCALE=RESCALE, HAS_BIAS=HAS_BIAS)

@dataclass(frozen=True, kw_only=True, slots=True)
class SplitPlan:
    """Where a matmul kernel writes and how much K each split covers.

    `target` is 4-D `[SPLIT, B, M, N]`: the output itself (unsqueezed, one split) or the partials
    workspace. `partial` says the kernel must store its raw accumulator (no scales, no bias) there.
    """

    k_per_split: int  # a multiple of BLOCK_K
    splits: int
    target: torch.Tensor
    out: torch.Tensor  # [B, M, N]

    @property
    def partial(self) -> bool:
        return self.splits > 1

    def target_strides(self) -> tuple[int, int, int, int]:
        return tuple(self.target.stride())  # type: ignore[return-value]

    def finish(self, *, a_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> None:
        """Sum the partials into `out` with the epilogue (W8A8: pass both scales); nothing for one split."""
        if not self.partial:
            return
        nb, m, n = self.out.shape
        block_m = reduce_block_m(m)
        rescale = a_scale is not None
        a_s = a_scale if rescale else self.target
        w_s = w_scale if rescale else self.target
        grid = (triton.cdiv(m, block_m) * triton.cdiv(n, REDUCE_BLOCK_N), nb)
        splitk_reduce_kernel[grid](
            self.target, a_s, w_s, bias if bias is not None else self.target, self.out,
            m, n, self.splits,
            *self.target_strides(),
            a_s.stride(0) if rescale else 0, a_s.stride(1) if rescale else 0,
            batch_stride(w_s, 2) if rescale else 0, w_s.stride(-1) if rescale else 0,
            self.out.stride(0), self.out.stride(1), self.out.stride(2),
            RESCALE=rescale, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=REDUCE_BLOCK_N,
            num_warps=reduce_num_warps(block_m), enable_fp_fusion=False)


def k_split(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(K per split, number of non-empty splits) for `split_k` ranges of whole BLOCK_K tiles.

    K=300, BLOCK_K=32, split_k=4: 10 tiles, 3 per split -> (96, 4); split_k=8: 2 per split -> (64, 5).
    The count can be below `split_k`: no program is launched for an empty range.
    """
    blocks = max(triton.cdiv(k, block_k), 1)
    per = triton.cdiv(blocks, split_k)
    return per * block_k, triton.cdiv(blocks, per)


def plan(cfg: MatmulConfig, k: int, out: torch.Tensor, acc_dtype: torch.dtype) -> SplitPlan:
    """Split plan of a launch: `out` is the [B, M, N] output; partials are `acc_dtype` (int32 / f32)."""
    per, splits = k_split(k, cfg.block_k, cfg.split_k)
    if splits == 1:
        return SplitPlan(k_per_split=per, splits=1, target=out.unsqueeze(0), out=out)
    workspace = torch.empty((splits, *out.shape), dtype=acc_dtype, device=out.device)
    return SplitPlan(k_per_split=per, splits=splits, target=workspace, out=out)
