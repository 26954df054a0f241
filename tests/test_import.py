"""`import qkernels` needs neither JAX nor PyTorch (DESIGN.md section 2)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_import_without_jax_and_torch() -> None:
    script = textwrap.dedent("""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("jax", "jaxlib", "torch", "triton", "flax"):
                    raise ImportError(f"blocked for this test: {name}")

        sys.meta_path.insert(0, Block())
        import numpy as np
        import qkernels as qk
        from qkernels import dispatch, reference
        p = qk.Problem(recipe=qk.W4A16(32), m=2, n=3, k=40, act_dtype="float32", out_dtype="float32",
                       framework="torch", platform="cpu")
        assert dispatch.select(p).name == "reference", qk.explain(p)
        wq = qk.quantize(np.ones((3, 40), np.float32), qk.W4A16(32))
        y = reference.qmatmul(np.ones((2, 40), np.float32), wq, qk.W4A16(32))
        assert y.shape == (2, 3)
        for mod in ("jax", "torch", "triton"):
            assert mod not in sys.modules, mod
        for name, framework in (("linear", "torch"), ("dot_general", "jax"), ("QArray", "jax")):
            try:
                getattr(qk, name)
            except ImportError as e:  # the lazy entry point needs its framework, and says which
                assert framework in str(e), (name, e)
            else:
                raise AssertionError(f"qk.{name} loaded although {framework} cannot be imported")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
