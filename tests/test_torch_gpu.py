"""PyTorch on a CUDA GPU (skipped without one; `make device-check` runs it on a lent GPU): kernel launches
per call, `torch.compile(mode="reduce-overhead")` (CUDA graphs) around the custom op, and tensor
parallelism on a 1-rank NCCL mesh (its gloo twin on CPU runs everywhere)."""

from __future__ import annotations

import pytest
import torch

import qkernels as qk

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# The budget: one launch for weight-only recipes, two for recipes that quantize activations
# (the activation quantize, then the matmul with the rescale fused).
LAUNCHES = {"w8a16": 1, "w4a16-g128": 1, "fp8a16": 1, "w8a8": 2, "w4a8-g128": 2, "fp8": 2}


def _launches(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@gpu
@pytest.mark.parametrize("name", sorted(LAUNCHES))
def test_launches_per_call(name: str) -> None:
    recipe = qk.parse_recipe(name)
    if recipe.tag.startswith("fp8") and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm_89+")
    w_q = qk.quantize(torch.randn(4096, 4096, device="cuda"), recipe)
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        n = _launches(lambda: qk.linear(x, w_q))
    assert n <= LAUNCHES[name], (name, n, str(qk.explain(x, w_q)))


@gpu
def test_reduce_overhead_compile_runs_the_custom_op_in_cuda_graphs() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.SiLU(), torch.nn.Linear(1024, 512))
    model = model.to("cuda", torch.bfloat16)
    qk.quantize_(model, qk.W4A16(128))
    x = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        want = model(x)
        for _ in range(3):  # warm-up, record, replay
            got = compiled(x)
    torch.testing.assert_close(got, want)


def _one_rank_tensor_parallel(backend: str, device: str, tmp_path) -> None:
    """A 1-rank process group and mesh: colwise then rowwise through qk.parallelize, equal to the unsharded
    model (W8A8 bit for bit): the code path a multi-GPU run takes, on one device."""
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh(device, (1,))
        for recipe in (qk.W8A8, qk.W4A16(32)):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
            dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the GPU kernels' activations
            model = qk.quantize_(model.to(device, dtype), recipe).model
            ref = copy.deepcopy(model)
            qk.parallelize(model, mesh, {"0": "colwise", "2": "rowwise"})
            x = torch.randn(6, 64, device=device, dtype=dtype)
            with torch.no_grad():
                y, want = model(x), ref(x)
            if recipe.lhs is not None:
                assert torch.equal(y, want), recipe.name
            else:
                torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=2e-2)  # f32 partials vs the kernel
    finally:
        dist.destroy_process_group()


@gpu
def test_one_rank_tensor_parallel_nccl(tmp_path) -> None:
    _one_rank_tensor_parallel("nccl", "cuda", tmp_path)


def test_one_rank_tensor_parallel_gloo(tmp_path) -> None:
    _one_rank_tensor_parallel("gloo", "cpu", tmp_path)
