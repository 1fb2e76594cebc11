"""tests/numerics.py, the suite's one comparison of floating-point results, and a check that
every test file uses it (issue 26: absolute tolerances made verdicts depend on the CPU)."""
import glob
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close, assert_close_norm, rel_diff  # tests/numerics.py


@pytest.mark.parametrize("scale", [1e-30, 1e-6, 1.0, 1e6, 1e30])
def test_bound_scales_with_the_reference(scale):
  ref = np.random.default_rng(0).normal(size=(4, 5)) * scale
  assert_close(ref * (1 + 1e-7), ref, 1e-6)
  assert_close(ref + 0.9e-6 * np.abs(ref).max(), ref, 1e-6)
  with pytest.raises(AssertionError):
    assert_close(ref + 1.1e-6 * np.abs(ref).max(), ref, 1e-6)
  assert_close_norm(ref * (1 + 1e-7), ref, 1e-6)
  with pytest.raises(AssertionError):
    assert_close_norm(ref * (1 + 2e-6), ref, 1e-6)


def test_the_bound_is_the_largest_reference_value_not_each_element():
  ref = np.array([100.0, 1e-3])
  assert_close([100.0, 1.5e-3], ref, 1e-5)            # 5e-4 <= 1e-5 * 100
  with pytest.raises(AssertionError):
    assert_close([100.0, 2.5e-3], ref, 1e-5)          # 1.5e-3 > 1e-3


def test_arrays_of_any_kind_and_dtype():
  ref = np.linspace(-2, 2, 7, dtype=np.float32)
  assert_close(jnp.asarray(ref), ref, 0)              # jax against numpy, exactly
  assert_close(ref.tolist(), jnp.asarray(ref), 0)     # a list of numbers is an array
  assert_close(jnp.asarray(ref, jnp.bfloat16), ref, 2 ** -8)
  with pytest.raises(AssertionError):
    assert_close(jnp.asarray(ref, jnp.bfloat16), ref, 1e-4)
  assert_close(3.0, np.float32(3.0), 0)
  assert_close(np.arange(3), np.arange(3), 0)         # integers are compared as floats


def test_shapes_must_match_exactly():
  with pytest.raises(AssertionError, match=r"shape \(3,\) \(actual\) != \(3, 1\) \(ref\)"):
    assert_close(np.ones(3), np.ones((3, 1)), 1.0)
  with pytest.raises(AssertionError, match="shape"):
    assert_close(np.ones(3), 1.0, 1.0)                 # no broadcasting
  with pytest.raises(AssertionError, match="shape"):
    assert_close_norm(np.ones((2, 3)), np.ones((3, 2)), 1.0)
  assert_close(np.ones((0, 3)), np.zeros((0, 3)), 0)   # empty: nothing to differ


def test_pytrees_leaf_by_leaf_with_the_leaf_in_the_message():
  ref = {"a": np.ones(3), "b": [np.full(2, 1e-3), (np.zeros(1), 5.0)]}
  got = {"a": jnp.ones(3), "b": [np.full(2, 1e-3), (np.zeros(1), 5.0)]}
  assert_close(got, ref, 1e-6)
  assert_close_norm(got, ref, 1e-6)
  # Each leaf against its own scale: 1e-6 off on the 1e-3 leaf is 1e-3 of it.
  got["b"][0] = np.full(2, 1e-3 + 1e-6)
  with pytest.raises(AssertionError, match=r"^out\['b'\]\[0\]: "):
    assert_close(got, ref, 1e-4, what="out")
  with pytest.raises(AssertionError, match=r"^out\['b'\]\[0\]: "):
    assert_close_norm(got, ref, 1e-4, what="out")
  assert_close(got, ref, 2e-3)
  with pytest.raises(AssertionError, match="the trees differ.*'c'"):
    assert_close({"a": 1.0, "c": 2.0}, {"a": 1.0, "b": 2.0}, 1.0)
  with pytest.raises(AssertionError, match="the trees differ"):
    assert_close([np.ones(2)] * 2, [np.ones(2)] * 3, 1.0)


def test_the_message_says_what_where_and_by_how_much():
  ref = np.zeros((2, 3))
  ref[0, 0] = 200.0
  got = ref.copy()
  got[1, 2] = 0.5
  with pytest.raises(AssertionError) as e:
    assert_close(got, ref, 1e-3, what="logits")
  msg = str(e.value)
  for part in ("logits", "max|actual - ref| 0.5", "bound 0.001 * max|ref| 200 = 0.2",
               "at (1, 2)", "actual 0.5, ref 0", "shape (2, 3)"):
    assert part in msg, (part, msg)
  with pytest.raises(AssertionError, match=r"\|\|actual - ref\|\|_2 0.5 > bound"):
    assert_close_norm(got, ref, 1e-3)


def test_norm_variant_tolerates_a_lone_straggler_the_max_variant_does_not():
  ref = np.ones(10_000)
  got = ref.copy()
  got[17] += 1e-2                                    # ||diff|| / ||ref|| = 1e-4
  assert_close_norm(got, ref, 2e-4)
  with pytest.raises(AssertionError):
    assert_close_norm(got, ref, 0.5e-4)
  with pytest.raises(AssertionError, match=r"at \(17,\)"):
    assert_close(got, ref, 2e-4)


def test_an_all_zero_reference_has_no_scale():
  """Only an exact zero is close to zero; which is what rel * max(|ref|, |actual|) says too."""
  zero = np.zeros(4)
  assert_close(zero, zero, 1e-6)
  assert_close_norm(-zero, zero, 1e-6)
  for check in (assert_close, assert_close_norm):
    with pytest.raises(AssertionError, match=r"ratio inf"):
      check(np.full(4, 1e-30), zero, 0.5)
  assert rel_diff(zero, zero) == 0.0 and rel_diff(np.full(4, 1e-30), zero) == np.inf


def test_non_finite_entries_must_agree():
  ref = np.array([1.0, np.nan, np.inf, -np.inf])
  assert_close(ref.copy(), ref, 0)
  for bad in ([1.0, 0.0, np.inf, -np.inf], [1.0, np.nan, -np.inf, -np.inf],
              [1.0, np.nan, np.inf, 5.0]):
    with pytest.raises(AssertionError, match="non-finite entries differ"):
      assert_close(bad, ref, 1.0)
  with pytest.raises(AssertionError):     # the finite rest is still compared
    assert_close([2.0, np.nan, np.inf, -np.inf], ref, 0.5)


def test_rel_diff():
  assert rel_diff(np.array([1.0, 3.0]), np.array([1.0, 2.0])) == 0.5
  assert rel_diff({"a": np.ones(2), "b": [np.ones(1)]},
                  {"a": np.ones(2), "b": [np.full(1, 4.0)]}) == 0.75   # the worst leaf
  with pytest.raises(AssertionError, match="shape"):
    rel_diff(np.ones(2), np.ones(3))


# Absolute tolerances (atol, pytest.approx's abs, np.allclose's and np.isclose's defaults,
# assert_almost_equal's decimals) ignore the scale of what they compare. (The pattern does
# not match its own text.)
_FORBIDDEN = re.compile(r"\b(atol|rtol|abs)\s*=(?!=)|(allclose|isclose|almost_equal)\s*\(")


def test_no_test_compares_floats_with_an_absolute_tolerance():
  here = os.path.dirname(os.path.abspath(__file__))
  files = sorted(glob.glob(os.path.join(here, "*.py")))
  assert len(files) > 20
  found = []
  for path in files:
    if os.path.basename(path) == "numerics.py":
      continue
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f, 1):
        if _FORBIDDEN.search(line):
          found.append(f"{os.path.basename(path)}:{i}: {line.strip()}")
  assert not found, ("use tests/numerics.py (assert_close, assert_close_norm, rel_diff) "
                     "instead:\n" + "\n".join(found))
