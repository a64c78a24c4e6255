"""groups.expand_groups / group_ids against NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import groups


def test_expand_groups_interleaves_every_leaf():
  tree = {"ids": np.arange(6).reshape(3, 2), "mask": np.array([True, False, True]),
          "nested": (np.arange(3.0),)}
  out = groups.expand_groups(tree, 4)
  np.testing.assert_array_equal(out["ids"], np.repeat(tree["ids"], 4, axis=0))
  np.testing.assert_array_equal(out["mask"], np.repeat(tree["mask"], 4))
  np.testing.assert_array_equal(out["nested"][0], [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
  assert out["ids"].shape == (12, 2)


def test_group_ids_match_expanded_rows_and_offset():
  ids = groups.group_ids(3, 2, offset=10)
  assert ids.dtype == jnp.int32
  np.testing.assert_array_equal(ids, [10, 10, 11, 11, 12, 12])
  # Row b*G + j of an expanded batch belongs to group b.
  prompts = np.array([7, 8, 9])
  expanded = groups.expand_groups(prompts, 2)
  np.testing.assert_array_equal(prompts[np.asarray(groups.group_ids(3, 2))], expanded)


def test_group_ids_unique_across_hosts():
  per_host = [np.asarray(groups.group_ids(4, 3, offset=h * 4)) for h in range(3)]
  assert len(np.unique(np.concatenate(per_host))) == 12


@pytest.mark.parametrize("call, match", [
    (lambda: groups.group_ids(3, 0), "group_size"),
    (lambda: groups.group_ids(-1, 2), "num_prompts"),
    (lambda: groups.group_ids(3, 2, offset=-1), "offset"),
    (lambda: groups.group_ids(3.0, 2), "num_prompts"),
    (lambda: groups.expand_groups(np.arange(3), 0), "group_size"),
    (lambda: groups.expand_groups({"x": np.float32(1.0)}, 2), "tree"),
])
def test_bad_input_names_the_argument(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()
