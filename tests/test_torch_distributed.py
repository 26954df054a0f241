"""QLinear under torch.distributed on CPU (gloo, 2 and 4 processes on loopback): tensor parallelism
(`qk.ColwiseParallel` / `qk.RowwiseParallel`, HF tp_plan names) and FSDP2, against the unsharded layer.

Each world size spawns its processes once (`spawn`) and runs every scenario there, in order (a failing
scenario is recorded with each rank's traceback and the next one runs). Integer recipes are
compared with ==; float partial sums within `qkernels.testing.tolerances`.
"""

from __future__ import annotations

import copy
import datetime
import os
import tempfile
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import qkernels as qk
from qkernels import reference, testing
from qkernels.numerics import INT4
from torch_bindings.ops import _to_numpy

WORLDS = (2, 4)
K, H = 256, 128  # K: 256 / 4 ranks = 64 per rank, two groups of 32
RECIPES = [qk.W8A8, qk.W8A16, qk.W4A16(32), qk.W4A16(32, zero_point=True), qk.W4A8(32), qk.FP8]
EXACT = ("w8a8",)  # int32 accumulators summed exactly: bit-identical when split along K


def _mlp(recipe: qk.Recipe, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(K, H), nn.GELU(), nn.Linear(H, K))
    qk.quantize_(model, recipe)
    return model


def _inputs(m: int = 6, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    x = testing.activations(np.random.default_rng(seed), (2, m // 2, K))  # (batch, seq, K) with outliers
    return torch.from_numpy(x).to(dtype)


def _check(actual: torch.Tensor, x: torch.Tensor, layer: qk.QLinear, expected: torch.Tensor, what: str) -> None:
    """== for integer recipes split exactly, else within the tolerance of `layer` on `x` (the float operands
    that layer multiplies, `testing.float_operands`)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual.shape, expected.shape)
    if layer.recipe.tag in EXACT:
        assert torch.equal(actual, expected), f"{what}: {layer.recipe.name} differs from the unsharded layer"
        return
    x2 = x.detach().reshape(-1, x.shape[-1]).float().numpy()
    w = reference.RefQuantized(qvalue=_to_numpy(layer.qvalue), scale=layer.scale.numpy(),
                               zero_point=None if layer.zero_point is None else layer.zero_point.numpy(),
                               fmt=layer.recipe.rhs, k=layer.in_features)
    lhs, rhs = testing.float_operands(x2, w, layer.recipe, act_dtype=_to_numpy(x[:0]).dtype)
    bias = None if layer.bias is None else layer.bias.detach().float().numpy()
    testing.assert_close(actual.detach().reshape(-1, actual.shape[-1]).float().numpy(),
                         expected.detach().reshape(-1, expected.shape[-1]).float().numpy(), lhs, rhs,
                         _to_numpy(actual[:0]).dtype, bias, what)


# --- scenarios: run on every rank, SPMD --------------------------------------------------------------

def _scenario_colwise(rank: int, world: int, mesh, tmp: Path) -> None:
    for recipe in RECIPES:
        layer = _mlp(recipe)[0]
        ref = copy.deepcopy(layer)
        x = _inputs()
        qk.parallelize(layer, mesh, {"": "colwise_rep"})  # output gathered: the whole (.., H) on every rank
        assert layer.qvalue.to_local().shape[0] == H // world and layer.bias.to_local().shape == (H // world,)
        assert f"recipe={recipe.name}" in repr(layer) and layer.weight.shape == (H, K)  # the logical layer
        y, want = layer(x), ref(x)
        # every output column is that column's unsharded dot: integer recipes exactly, float ones within bound
        if recipe.accumulation.integer:
            assert torch.equal(y, want), recipe.name
        else:
            _check(y, x, ref, want, f"colwise {recipe.name}")


def _scenario_rowwise(rank: int, world: int, mesh, tmp: Path) -> None:
    for recipe in RECIPES:
        for dtype in (torch.float32, torch.bfloat16):
            layer = _mlp(recipe)[2]
            layer.bias.data = layer.bias.data.to(dtype)
            ref = copy.deepcopy(layer)
            x = torch.nn.functional.gelu(_inputs(dtype=dtype)[..., :H] * 0.5)
            qk.parallelize(layer, mesh, {"": "rowwise"})  # input: this rank's slice of K
            local = x.chunk(world, dim=-1)[rank]
            assert layer.qvalue.to_local().shape[1] == layer.qvalue.shape[1] // world
            _check(layer(local), x, ref, ref(x), f"rowwise {recipe.name} {dtype}")
            if recipe.tag in EXACT:  # the shard's accumulators come from the backend dispatch picks: the NumPy
                # reference, and the Triton kernel's `accumulate` (what runs on CUDA) under its interpreter
                for backend in ("reference", f"triton.interpret.{recipe.tag}")[:2 if dtype == torch.float32 else 1]:
                    with qk.use_backend(backend):
                        assert torch.equal(layer(local), ref(x)), f"{backend}, {recipe.name} {dtype}"
                whole_input = qk.parallelize(copy.deepcopy(ref), mesh, {"": "rowwise_rep"})  # takes its slice itself
                assert torch.equal(whole_input(x), ref(x)), f"rowwise_rep {recipe.name} {dtype}"


def _scenario_static_and_smooth(rank: int, world: int, mesh, tmp: Path) -> None:
    """Calibrated static W8A8 (no MAX reduce: its scale is global already) and SmoothQuant'ed layers (factors
    split along K with the weight rowwise, whole colwise), dynamic and static: bit-identical."""
    from torch.distributed.tensor.debug import CommDebugMode

    def float_mlp() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(K, H), nn.GELU(), nn.Linear(H, K))

    batches = [_inputs(seed=s) for s in range(3)]
    static = _mlp(qk.W8A8(static=True))
    qk.calibrate(static, batches)
    smoothed = {recipe.name: float_mlp() for recipe in (qk.W8A8, qk.W8A8(static=True))}
    for recipe, model in zip((qk.W8A8, qk.W8A8(static=True)), smoothed.values()):
        qk.smoothquant_(model, batches, recipe)
        assert model[2].smooth is not None and model[2].recipe == recipe
    for what, model in {"static": static, **{f"smoothed {n}": m for n, m in smoothed.items()}}.items():
        ref = copy.deepcopy(model)
        qk.parallelize(model, mesh, {"0": "colwise", "2": "rowwise"})
        x = _inputs(seed=7)
        with CommDebugMode() as comms:
            y = model(x)
        assert torch.equal(y, ref(x)), what
        assert comms.get_total_counts() == (1 if model[2].recipe.static else 2), (what, comms.get_comm_counts())
        if model[2].smooth is not None:
            assert model[2].smooth.to_local().shape == (H // world,)


def _scenario_mlp_collectives(rank: int, world: int, mesh, tmp: Path) -> None:
    """Colwise then rowwise: the unsharded output, one all-reduce (SUM) of the output per pair, plus the MAX of
    the M row maxima for recipes quantizing activations per token; nothing in the colwise layer."""
    from torch.distributed.tensor import parallel as tp
    from torch.distributed.tensor.debug import CommDebugMode

    plans = {
        "torch parallelize_module, qk styles": lambda m: tp.parallelize_module(
            m, mesh, {"0": qk.ColwiseParallel(), "2": qk.RowwiseParallel()}),
        "qk.parallelize, tp_plan names": lambda m: qk.parallelize(m, mesh, {"0": "colwise", "2": "rowwise"}),
        "qk.parallelize, torch's stock styles": lambda m: qk.parallelize(
            m, mesh, {"0": tp.ColwiseParallel(), "2": tp.RowwiseParallel()}),
    }
    for recipe in (qk.W8A8, qk.W4A16(32)):
        for how, apply in plans.items():
            model = _mlp(recipe)
            ref = copy.deepcopy(model)
            apply(model)
            x = _inputs()
            hidden = {}
            model[0].register_forward_hook(lambda mod, args, out: hidden.update(local=out))
            with CommDebugMode() as comms:
                y = model(x)
            counts = {str(op).split(".")[-1]: n for op, n in comms.get_comm_counts().items()}
            per_layer = {fqn: sum(c["forward"].values()) for fqn, c in comms.comm_module_counts.items()
                         if fqn in ("Sequential.0", "Sequential.2")}
            want = 2 if recipe.lhs is not None else 1
            assert counts == {"all_reduce": want}, (recipe.name, how, counts)
            assert per_layer.get("Sequential.0", 0) == 0 and per_layer["Sequential.2"] == want, (how, per_layer)
            if recipe.tag in EXACT:
                assert torch.equal(y, ref(x)), (recipe.name, how)
                continue
            # weight-only: the colwise hidden is within bound of the unsharded one, and the rowwise output within
            # bound of the unsharded second layer applied to that hidden
            gathered = torch.cat(_all_gather(hidden["local"], world), dim=-1)
            _check(gathered, x, ref[0], ref[0](x), f"{how}: hidden")
            h = ref[1](gathered)
            _check(y, h, ref[2], ref[2](h), f"{how}: output")


def _scenario_backward(rank: int, world: int, mesh, tmp: Path) -> None:
    """Gradients reach the input (straight-through the dequantized weight: the unsharded gradient up to the
    order of its f32 sum over N, `testing.tolerances` of grad_out @ W) and the bias (split colwise, replicated
    rowwise: the unsharded column sums, exactly)."""
    for recipe in (qk.W8A8, qk.W4A16(32)):
        for style, index in (("colwise_rep", 0), ("rowwise", 2)):
            layer = _mlp(recipe)[index]
            ref = copy.deepcopy(layer)
            qk.parallelize(layer, mesh, {"": style})
            x = _inputs()[..., :layer.in_features].requires_grad_()
            x_ref = x.detach().clone().requires_grad_()
            g = torch.from_numpy(testing.activations(np.random.default_rng(9), (*x.shape[:-1], layer.out_features)))
            ours = x if style == "colwise_rep" else x.chunk(world, dim=-1)[rank]
            (layer(ours) * g).sum().backward()
            (ref(x_ref) * g).sum().backward()
            cols = slice(None) if style == "colwise_rep" else slice(rank * ours.shape[-1], (rank + 1) * ours.shape[-1])
            w = ref.weight.dequantize()
            testing.assert_close(x.grad[..., cols].reshape(-1, ours.shape[-1]).numpy(),
                                 x_ref.grad[..., cols].reshape(-1, ours.shape[-1]).numpy(),
                                 g.reshape(-1, g.shape[-1]).numpy(), w.T[cols].numpy(), np.float32,
                                 what=f"{style} {recipe.name} input grad")
            assert torch.equal(layer.bias.grad.full_tensor(), ref.bias.grad), (style, recipe.name)


def _scenario_refusals(rank: int, world: int, mesh, tmp: Path) -> None:
    """Layouts that do not split evenly are refused by parallelize_module, naming the values."""
    from torch.distributed.tensor import parallel as tp

    cases = [
        (nn.Linear(100, 64), qk.W4A16(32), "rowwise", "in_features=100 is stored padded to 128"),
        (nn.Linear(64 * world, 64), qk.W4A16(128), "rowwise", "is 64 per rank, which cuts the weight's groups of 128"),
        (nn.Linear(64, 64 * world + 1), qk.W8A8, "colwise", f"out_features={64 * world + 1} is not divisible by {world}"),
        (nn.Linear(64 * world + 1, 64), qk.W8A8, "rowwise", f"in_features={64 * world + 1} is not divisible"),
    ]
    for linear, recipe, style, words in cases:
        layer = qk.QLinear.from_float(linear, recipe)
        with pytest.raises(ValueError, match=words.replace("(", r"\(")):
            qk.parallelize(layer, mesh, {"": style})
        assert layer.parallel is None and type(layer.qvalue) is torch.Tensor  # untouched
    with pytest.raises(NotImplementedError, match="only support nn.Linear"):  # why qk has its own styles
        tp.parallelize_module(qk.QLinear.from_float(nn.Linear(64, 64)), mesh, tp.ColwiseParallel())
    layer = qk.parallelize(_mlp(qk.W8A8)[2], mesh, {"": "rowwise"})
    with pytest.raises(ValueError, match=f"takes this rank's {H // world} of in_features={H}, got an input shard"):
        layer(_inputs()[..., :H])  # the whole input where the layer expects its slice
    with pytest.raises(ValueError, match="unknown style 'sequence_parallel'"):
        qk.parallelize(_mlp(qk.W8A8), mesh, {"0": "sequence_parallel"})


def _scenario_tp_checkpoint(rank: int, world: int, mesh, tmp: Path) -> None:
    """A tensor-parallel model's state dict holds DTensor shards; torch.distributed.checkpoint saves them and
    loads them back into a model split the same way, and into an unsharded one (resharded to whole tensors)."""
    import torch.distributed.checkpoint as dcp

    path = str(tmp / "tp-ckpt")
    model = _mlp(qk.W4A16(32))
    whole = copy.deepcopy(model)
    qk.parallelize(model, mesh, {"0": "colwise", "2": "rowwise"})
    dcp.save(model.state_dict(), checkpoint_id=path)
    x = _inputs()
    for target in (qk.parallelize(_mlp(qk.W4A16(32), seed=5), mesh, {"0": "colwise", "2": "rowwise"}),
                   _mlp(qk.W4A16(32), seed=5)):
        state = target.state_dict()
        dcp.load(state, checkpoint_id=path)
        target.load_state_dict(state)
        assert torch.equal(target(x), model(x) if target[0].parallel else whole(x))


def _scenario_fsdp_lora(rank: int, world: int, mesh, tmp: Path) -> None:
    """FSDP2 over a quantized model with LoRA adapters: codes and scales stay frozen replicated buffers, the
    adapters (sharded) train; forward, backward and an optimizer step as unsharded; the state dict round-trips
    through torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    def build(seed: int) -> nn.Module:
        model = _mlp(qk.W4A16(32))
        torch.manual_seed(seed)
        qk.add_lora(model, rank=4)
        for m in model.modules():
            if isinstance(m, qk.LoRALinear):
                nn.init.normal_(m.lora_B, std=0.02)  # a trained-looking adapter: B is zero when fresh
        return model

    def shard(model: nn.Module) -> nn.Module:
        for i in (0, 2):
            fully_shard(model[i], mesh=mesh)
        return fully_shard(model, mesh=mesh)

    model, ref = shard(build(3)), build(3)
    assert isinstance(model[0].lora_A, DTensor) and type(model[0].base.qvalue) is torch.Tensor
    x = _inputs()
    opt, opt_ref = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(2):
        loss, loss_ref = (model(x) ** 2).mean(), (ref(x) ** 2).mean()
        loss.backward()
        loss_ref.backward()
        assert torch.equal(loss, loss_ref), step  # the same gathered weights, the same local compute
        for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
            assert p.requires_grad == p_ref.requires_grad, name
            if p.requires_grad:  # averaged over ranks holding the same batch: the unsharded gradient
                assert torch.equal(p.grad.full_tensor(), p_ref.grad), name
        opt.step(), opt_ref.step(), opt.zero_grad(), opt_ref.zero_grad()
    assert torch.equal(model[0].base.qvalue, ref[0].base.qvalue)  # frozen
    path = str(tmp / "fsdp-ckpt")
    dcp.save(model.state_dict(), checkpoint_id=path)
    restored = shard(build(11))
    state = restored.state_dict()
    dcp.load(state, checkpoint_id=path)
    restored.load_state_dict(state)
    assert torch.equal(restored(x), model(x))


class _SwiGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(K, H), nn.Linear(K, H), nn.Linear(H, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def _scenario_tp_plan(rank: int, world: int, mesh, tmp: Path) -> None:
    """HF's tp_plan form (`config.base_model_tp_plan`: `*` patterns, "colwise" / "rowwise") on a Llama-shaped
    stack of SwiGLU MLPs quantized W8A8: every matched layer split, the unsharded output bit for bit."""
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList(nn.ModuleDict({"mlp": _SwiGLU()}) for _ in range(2))
    qk.quantize_(model, qk.W8A8)
    ref = copy.deepcopy(model)
    plan = {"layers.*.mlp.gate_proj": "colwise", "layers.*.mlp.up_proj": "colwise", "layers.*.mlp.down_proj": "rowwise"}
    qk.parallelize(model, mesh, plan)
    styles = {fqn: m.parallel.style for fqn, m in model.named_modules() if isinstance(m, qk.QLinear)}
    assert styles == {f"layers.{i}.mlp.{name}": "rowwise" if name == "down_proj" else "colwise"
                      for i in range(2) for name in ("gate_proj", "up_proj", "down_proj")}, styles

    def run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for layer in m.layers:
            x = x + layer["mlp"](x)
        return x

    x = _inputs()
    assert torch.equal(run(model, x), run(ref, x))


def _all_gather(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    import torch.distributed as dist

    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return out


SCENARIOS = {name.removeprefix("_scenario_"): fn for name, fn in dict(globals()).items()
             if name.startswith("_scenario_")}


def _worker(rank: int, world: int, store: str, tmp: str, names: tuple[str, ...]) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (world,))
    for name in names:
        try:
            SCENARIOS[name](rank, world, mesh, Path(tmp))
            outcome = ""
        except (Exception, pytest.fail.Exception):  # recorded for this scenario's test; later ones still run
            outcome = traceback.format_exc()
        Path(tmp, f"{name}.{rank}.txt").write_text(outcome)
        dist.barrier()
    dist.destroy_process_group()


def spawn(world: int, names: tuple[str, ...]) -> dict[str, str]:
    """Run the scenarios `names` on `world` processes: each one's outcome, '' when every rank passed, else the
    ranks' tracebacks."""
    import torch.multiprocessing as mp

    tmp = tempfile.mkdtemp(prefix=f"qkernels-dist{world}-")
    mp.start_processes(_worker, args=(world, os.path.join(tmp, "store"), tmp, names), nprocs=world, join=True,
                       start_method="spawn")
    return {name: "\n".join(t for r in range(world) if (t := Path(tmp, f"{name}.{r}.txt").read_text()))
            for name in names}


@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"{w}ranks")
def test_distributed(world: int) -> None:
    """Every scenario on `world` processes (one spawn: starting the processes dominates the time)."""
    failed = {name: outcome for name, outcome in spawn(world, tuple(SCENARIOS)).items() if outcome}
    assert not failed, "\n".join(f"--- {name} failed on {world} ranks:\n{tb}" for name, tb in failed.items())


def test_split_refusal_names_the_values() -> None:
    """The pure layout check (no process group): every refusal names the sizes and the fix."""
    from torch_bindings.distributed import split_refusal

    def layer(k: int, n: int, recipe: qk.Recipe) -> qk.QLinear:
        return qk.QLinear(k, n, recipe=recipe, device="meta")

    assert split_refusal(layer(256, 64, qk.W4A16(32)), "rowwise", 4) is None
    assert split_refusal(layer(256, 64, qk.W4A16(128)), "colwise", 4) is None
    assert "cuts the weight's groups of 128" in split_refusal(layer(256, 64, qk.W4A16(128)), "rowwise", 4)
    int4_rows = qk.Recipe(tag="w4rowsdist", lhs=None, rhs=qk.OperandFormat(qtype=INT4, granularity=qk.Granularity.ROW))
    assert "packed bytes" in split_refusal(layer(6, 8, int4_rows), "rowwise", 2)
    assert "stored padded to 128" in split_refusal(layer(100, 64, qk.W4A8(32)), "rowwise", 2)
    assert "exceeds 133144" in split_refusal(layer(133144 + 8, 8, qk.W8A8), "rowwise", 8)
    assert "out_features=10 is not divisible by 4" in split_refusal(layer(64, 10, qk.W8A8), "colwise", 4)
