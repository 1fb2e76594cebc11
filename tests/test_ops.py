"""step_jax.analysis.ops: a program's time op by op, from a jax.profiler trace."""
import jax
import jax.numpy as jnp
import pytest

from step_jax.analysis import ops
from step_jax.models import attention
from step_jax.models import cpu_attention

HLO = """HloModule m

%fused_dot (p0: f32[4,4], p1: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  %p1 = f32[4,4]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_sin (p0.1: f32[4,4]) -> f32[4,4] {
  %p0.1 = f32[4,4]{1,0} parameter(0)
  ROOT %sin.0 = f32[4,4]{1,0} sine(%p0.1)
}

ENTRY %main.2 (a.1: f32[4,4]) -> (f32[4,4], f32[4]) {
  %a.1 = f32[4,4]{1,0} parameter(0)
  %ynn_fusion.3 = f32[4,4]{1,0} fusion(%a.1, %a.1), kind=kCustom, calls=%fused_dot
  %ynn_fusion.4 = f32[4,4]{1,0} fusion(%ynn_fusion.3), kind=kCustom, calls=%fused_sin
  ROOT %ffi_call.7 = (f32[4,4]{1,0}, f32[4]{0}) custom-call(%ynn_fusion.4), custom_call_target="k"
}
"""


def test_instructions_name_kinds_and_tell_dot_fusions_apart():
  found = ops.instructions(HLO)
  assert found["ynn_fusion.3"] == ("ynn_fusion (dot)", True)
  assert found["ynn_fusion.4"] == ("ynn_fusion", False)
  assert found["ffi_call.7"] == ("custom-call k", False)
  assert found["a.1"] == ("parameter", False)
  assert found["dot.1"] == ("dot", True)


def _vit_layer_like(x, w1, w2):
  h = jax.nn.gelu(x @ w1, approximate=False) @ w2
  return jnp.sin(h) + x


def test_op_times_find_the_dots_of_a_program():
  k = jax.random.split(jax.random.key(0), 3)
  args = (jax.random.normal(k[0], (256, 128)), jax.random.normal(k[1], (128, 512)),
          jax.random.normal(k[2], (512, 128)))
  compiled = jax.jit(_vit_layer_like).lower(*args).compile()
  rows, wall = ops.op_times(compiled, args, reps=2, warmup=1)
  assert wall > 0
  assert sum(r["share"] for r in rows) == pytest.approx(1.0)
  assert [r["ms"] for r in rows] == sorted((r["ms"] for r in rows), reverse=True)
  dots = [r for r in rows if r["dot"]]
  assert sum(r["count"] for r in dots) == 2    # the two matmuls, once per call each
  assert "| op kind |" in ops.markdown(rows, wall, "layer")


@pytest.mark.skipif(not cpu_attention.available(), reason=cpu_attention.why_not() or "")
def test_op_times_name_the_attention_kernel():
  q = jax.random.normal(jax.random.key(1), (1, 64, 2, 16))
  keep = jnp.ones((1, 64), bool)
  f = jax.jit(lambda q, keep: attention.cpu_fused_attention(q, q, q, keep))
  rows, _ = ops.op_times(f.lower(q, keep).compile(), (q, keep), reps=2)
  kernel = [r for r in rows if r["kind"] == f"custom-call {cpu_attention.TARGET}"]
  assert len(kernel) == 1 and kernel[0]["count"] == 1
