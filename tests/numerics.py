"""The test suite's one comparison of floating-point results: the bound scales with the
magnitude of the reference, so that a verdict does not depend on the CPU model or its
instruction set (an absolute atol=2e-5 on gradients of magnitude ~1e2 passed on one CPU and
failed on another: issue 26).

  assert_close(actual, ref, rel)        max|actual - ref|  <= rel * max|ref|
  assert_close_norm(actual, ref, rel)   ||actual - ref||_2 <= rel * ||ref||_2
  rel_diff(actual, ref)                 max|actual - ref| / max|ref|, for "these differ"

Choosing rel by what is compared: the same program re-run, or a value copied through
another path, 1e-6; another op order or fused kernel in fp32, 1e-5 to 1e-4 (deeper
networks more); bf16 against fp32, ~1e-2. Results that must be bit-identical are not
compared with these: use np.testing.assert_array_equal.

Arguments are numbers, numpy or jax arrays (any float dtype, bf16 included; computed in
float64), lists of numbers, or pytrees (dicts, lists, tuples) of them; pytrees are compared
leaf by leaf, each leaf against its own scale, and a failure names the leaf's path.
"""
import jax
import numpy as np


def assert_close(actual, ref, rel, *, what=""):
  """Passes iff max|actual - ref| <= rel * max|ref|, for each leaf.

  Shapes must match exactly (no broadcasting). Non-finite entries must be the same in both
  (NaN where NaN, inf where inf); the bound covers the finite ones. A reference that is all
  zero has no scale of its own: the bound is then 0 and only an exact zero passes (as
  rel * max(max|ref|, max|actual|) would decide for any rel < 1). A value that is zero only
  up to rounding has its scale elsewhere (the rest of its array or tree): compare that.
  """
  for name, a, r in _leaves(actual, ref, what):
    _check(name, a, r, rel, norm=False)


def assert_close_norm(actual, ref, rel, *, what=""):
  """Passes iff ||actual - ref||_2 <= rel * ||ref||_2, for each leaf: for large tensors (e.g.
  gradients), where a few elements summed in another order may stray further than the rest.
  Otherwise as assert_close."""
  for name, a, r in _leaves(actual, ref, what):
    _check(name, a, r, rel, norm=True)


def rel_diff(actual, ref):
  """max|actual - ref| / max|ref| (the largest over a pytree's leaves), to check that two
  results differ: `assert rel_diff(a, b) > 0.1`. An all-zero ref gives inf (0 if actual is
  zero too)."""
  out = 0.0
  for name, a, r in _leaves(actual, ref, ""):
    _same_shape(name, a, r)
    if a.size:
      err, scale, _ = _err_scale(a, r, norm=False)
      out = max(out, err / scale if scale else (np.inf if err else 0.0))
  return out


def _leaves(actual, ref, what):
  """(name, actual, ref) as float64 arrays for each leaf of two pytrees of one structure."""
  numbers = lambda x: isinstance(x, (list, tuple)) and all(
      isinstance(e, (int, float, np.number)) or numbers(e) for e in x)
  fa = jax.tree_util.tree_flatten_with_path(actual, is_leaf=numbers)[0]
  fr = jax.tree_util.tree_flatten_with_path(ref, is_leaf=numbers)[0]
  ka = [jax.tree_util.keystr(p) for p, _ in fa]
  kr = [jax.tree_util.keystr(p) for p, _ in fr]
  if ka != kr:
    only_a, only_r = sorted(set(ka) - set(kr)), sorted(set(kr) - set(ka))
    raise AssertionError(f"{what or 'values'}: the trees differ: leaves only in actual "
                         f"{only_a[:5]}, only in ref {only_r[:5]} ({len(ka)} vs {len(kr)})")
  for k, (_, a), (_, r) in zip(ka, fa, fr):
    f64 = lambda x: np.asarray(x).astype(np.float64)
    yield (what + k) or "values", f64(a), f64(r)


def _same_shape(name, a, r):
  if a.shape != r.shape:
    raise AssertionError(f"{name}: shape {a.shape} (actual) != {r.shape} (ref)")


def _err_scale(a, r, norm):
  """(max or 2-norm of |a - r|, the same of |r|, |a - r|) over the entries finite in both."""
  both = np.isfinite(a) & np.isfinite(r)
  diff = np.where(both, np.abs(np.where(both, a, 0.0) - np.where(both, r, 0.0)), 0.0)
  ref = np.where(both, np.abs(r), 0.0)
  if norm:
    return np.linalg.norm(diff), np.linalg.norm(ref), diff
  return np.max(diff), np.max(ref), diff


def _check(name, a, r, rel, norm):
  _same_shape(name, a, r)
  if not a.size:
    return
  off = ~(np.isfinite(a) & np.isfinite(r))
  if not np.array_equal(a[off], r[off], equal_nan=True):
    at = [tuple(int(i) for i in ix) for ix in np.argwhere(off)[:3]]
    raise AssertionError(f"{name}: non-finite entries differ, e.g. at {at}: actual "
                         f"{[float(a[i]) for i in at]}, ref {[float(r[i]) for i in at]}")
  err, scale, diff = _err_scale(a, r, norm)
  if err > rel * scale:
    form = "||{}||_2" if norm else "max|{}|"
    at = np.unravel_index(np.argmax(diff), diff.shape)
    ratio = f"{err / scale:.3g}" if scale else "inf"
    raise AssertionError(
        f"{name}: {form.format('actual - ref')} {err:.3g} > bound "
        f"{rel:g} * {form.format('ref')} {scale:.3g} = {rel * scale:.3g} (ratio {ratio}); "
        f"worst element at {tuple(int(i) for i in at)}: actual {a[at]:.9g}, ref {r[at]:.9g} "
        f"(shape {a.shape})")
