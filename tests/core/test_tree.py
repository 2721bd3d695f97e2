"""rbp.tree: flat views of states; rbp.forward's row layout of (batched) states."""

from __future__ import annotations

import pytest
import torch

from rbp import forward, tree


def _state():
    return {"a": torch.randn(4, 3), "b": (torch.randn(4), torch.randn(2, 4, 5))}


def test_flatten_unflatten_round_trip_and_vectors():
    state = _state()
    leaves, spec = tree.flatten(state)
    back = tree.unflatten(spec, leaves)
    assert back["b"][1] is state["b"][1]
    vec = tree.to_vector(leaves)
    assert vec.shape == (12 + 4 + 40,)
    parts = tree.from_vector(vec, leaves)
    assert all(torch.equal(p, q) for p, q in zip(parts, leaves, strict=True))
    single = torch.randn(3, 2)
    assert tree.to_vector([single]).data_ptr() == single.data_ptr()  # a view, no copy


def test_check_same_structure_names_the_problem():
    leaves, spec = tree.flatten(_state())
    good = _state()
    assert len(tree.check_same_structure(spec, leaves, good, 0)) == 3
    bad = _state()
    bad["b"] = (bad["b"][0], bad["b"][1][:, :3])
    with pytest.raises(ValueError, match=r"shape of state\['b'\]\[1\] at step 2"):
        tree.check_same_structure(spec, leaves, bad, 2)
    with pytest.raises(TypeError, match="different structure at step 1"):
        tree.check_same_structure(spec, leaves, {"a": good["a"]}, 1)
    wrong = _state()
    wrong["a"] = wrong["a"].double()
    with pytest.raises(TypeError, match=r"dtype of state\['a'\]"):
        tree.check_same_structure(spec, leaves, wrong, 0)


@pytest.mark.parametrize("batch_dim", [None, 0, 1, -1])
def test_rows_round_trip(batch_dim):
    if batch_dim in (0, None):
        state = [torch.randn(4, 3), torch.randn(4, 2, 2)]
    else:  # samples along dim 1 / the last dim of every leaf
        state = [torch.randn(3, 4), torch.randn(2, 4)] if batch_dim == 1 else [
            torch.randn(3, 4), torch.randn(2, 2, 4)]
    leaves, spec = tree.flatten(state)
    lay = forward.layout(leaves, spec, batch_dim)
    rows = forward.to_rows(leaves, lay)
    assert rows.shape[0] == (1 if batch_dim is None else 4)
    back = forward.from_rows(rows, lay)
    assert all(torch.equal(p, q) for p, q in zip(back, leaves, strict=True))
    if batch_dim is not None:  # a sub-batch of rows maps back to the same samples
        sub = forward.from_rows(rows[[2, 0]], lay)
        d = lay.dims
        for part, leaf, dim in zip(sub, leaves, d, strict=True):
            assert torch.equal(part, leaf.index_select(dim, torch.tensor([2, 0])))


def test_row_of_one_sample_matches_the_sample():
    x = torch.randn(5, 7)
    lay = forward.layout([x], tree.flatten(x)[1], 0)
    assert torch.equal(forward.to_rows([x], lay)[3], x[3])


def test_bare_tensor_fast_path_matches_pytree():
    x = torch.randn(3, 2)
    leaves, spec = tree.flatten(x)
    assert leaves == [x] and spec is tree.LEAF and spec == tree.flatten((x,))[1].children_specs[0]
    assert tree.unflatten(spec, leaves) is x
    assert tree.check_same_structure(spec, leaves, x * 2, 0)[0].shape == (3, 2)
    with pytest.raises(ValueError, match=r"shape of state at step 4: \(3, 2\) -> \(6,\)"):
        tree.check_same_structure(spec, leaves, x.reshape(-1), 4)
    with pytest.raises(TypeError, match="changed the dtype"):
        tree.check_same_structure(spec, leaves, x.double(), 1)
    with pytest.raises(TypeError, match="different structure"):
        tree.check_same_structure(spec, leaves, (x,), 1)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        tree.flatten(torch.ones(2, dtype=torch.long), "h0")


def test_batch_axes_normalises_and_checks_the_batch() -> None:
    a, b = torch.zeros(4, 3), torch.zeros(2, 4)
    assert tree.batch_axes([a], -2) == ((0,), 4)
    assert tree.batch_axes([a, b.T], 0) == ((0, 0), 4)
    with pytest.raises(ValueError, match="out of range"):
        tree.batch_axes([torch.zeros(3)], 1)
    with pytest.raises(ValueError, match="same batch"):
        tree.batch_axes([a, b], 0)
    with pytest.raises(ValueError, match="no samples"):
        tree.batch_axes([torch.zeros(0, 3)], 0)
