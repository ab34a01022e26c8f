"""Beams -> prefix tree: the worked example from docs/tree-attention.md, then random properties."""

import mlx_redrafter  # noqa: F401  (first: loads the BLAS before mlx.core)

# isort: split
import numpy as np
import pytest

from mlx_redrafter.tree import pack_beams

BEAMS = np.array([[91, 92, 93, 95], [91, 92, 94, 96], [91, 92, 93, 97]])


def test_worked_example():
    tree = pack_beams(BEAMS)
    assert tree.num_nodes == 7
    assert tree.tokens.tolist() == [91, 92, 93, 95, 94, 96, 97]
    assert tree.depths.tolist() == [0, 1, 2, 3, 2, 3, 3]
    assert tree.parents.tolist() == [-1, 0, 1, 2, 1, 4, 2]
    assert tree.paths.tolist() == [[0, 1, 2, 3], [0, 1, 4, 5], [0, 1, 2, 6]]
    assert tree.children.tolist() == [
        [1, -1],
        [2, 4],
        [3, 6],
        [-1, -1],
        [5, -1],
        [-1, -1],
        [-1, -1],
    ]
    for arr in (tree.tokens, tree.depths, tree.parents, tree.paths, tree.children):
        assert arr.dtype == np.int32
    assert tree.positions(10).tolist() == [10, 11, 12, 13, 12, 13, 13]
    assert tree.positions(10).dtype == np.int32


def test_worked_example_ancestor_mask():
    expected = [
        [1, 0, 0, 0, 0, 0, 0],  # 91
        [1, 1, 0, 0, 0, 0, 0],  # 92
        [1, 1, 1, 0, 0, 0, 0],  # 93
        [1, 1, 1, 1, 0, 0, 0],  # 95
        [1, 1, 0, 0, 1, 0, 0],  # 94
        [1, 1, 0, 0, 1, 1, 0],  # 96
        [1, 1, 1, 0, 0, 0, 1],  # 97
    ]
    mask = pack_beams(BEAMS).ancestor_mask()
    assert mask.dtype == bool
    assert mask.astype(int).tolist() == expected


def test_worked_example_attention_mask_offset_2():
    expected = [
        # c0 c1 91 92 93 95 94 96 97
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 1, 0, 0],
        [1, 1, 1, 1, 0, 0, 1, 1, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 1],
    ]
    mask = pack_beams(BEAMS).attention_mask(2)
    assert mask.shape == (1, 1, 7, 9)
    assert str(mask.dtype) == "mlx.core.bool"
    assert np.array(mask)[0, 0].astype(int).tolist() == expected


def test_attention_mask_offset_0_is_ancestor_mask():
    tree = pack_beams(BEAMS)
    assert np.array_equal(np.array(tree.attention_mask(0))[0, 0], tree.ancestor_mask())


def test_single_width_is_a_chain():
    tree = pack_beams(np.array([[7, 3, 3, 9, 3]]))
    assert tree.tokens.tolist() == [7, 3, 3, 9, 3]
    assert tree.depths.tolist() == [0, 1, 2, 3, 4]
    assert tree.parents.tolist() == [-1, 0, 1, 2, 3]
    assert tree.paths.tolist() == [[0, 1, 2, 3, 4]]
    assert tree.children.tolist() == [[1], [2], [3], [4], [-1]]
    assert np.array_equal(tree.ancestor_mask(), np.tril(np.ones((5, 5), bool)))


def test_identical_beams_share_one_path():
    tree = pack_beams(np.array([[1, 2, 3]] * 4))
    assert tree.num_nodes == 3
    assert tree.paths.tolist() == [[0, 1, 2]] * 4
    assert tree.children.tolist() == [[1], [2], [-1]]


def test_root_only():
    tree = pack_beams(np.array([[5], [5]]))
    assert tree.tokens.tolist() == [5]
    assert tree.parents.tolist() == [-1]
    assert tree.children.tolist() == [[-1]]
    assert tree.ancestor_mask().tolist() == [[True]]


@pytest.mark.parametrize(
    "beams",
    [np.array([[1, 2], [3, 2]]), np.zeros((0, 3), int), np.zeros((2, 0), int), np.array([1, 2])],
)
def test_bad_beams_raise(beams):
    with pytest.raises(ValueError):
        pack_beams(beams)


def test_random_beams_properties():
    rng = np.random.default_rng(0)
    for _ in range(400):
        width, length = rng.integers(1, 7, size=2)
        vocab = int(rng.integers(1, 4))  # small so that prefixes collide
        beams = rng.integers(0, vocab, size=(width, length))
        beams[:, 0] = 42
        tree = pack_beams(beams)
        n = tree.num_nodes

        # Every beam is recovered, and there is one node per distinct prefix.
        assert np.array_equal(tree.tokens[tree.paths], beams)
        strings = [None] * n
        for w in range(width):
            for k in range(length):
                s = tuple(beams[w, : k + 1])
                assert strings[tree.paths[w, k]] in (None, s)
                strings[tree.paths[w, k]] = s
        prefixes = {tuple(beams[w, : k + 1]) for w in range(width) for k in range(length)}
        assert n == len(prefixes) == len(set(strings))

        # Node order: first appearance walking row by row, position by position.
        first_seen = []
        for w in range(width):
            for k in range(length):
                if tuple(beams[w, : k + 1]) not in first_seen:
                    first_seen.append(tuple(beams[w, : k + 1]))
        assert strings == first_seen

        # Depths, parents, children agree with the node strings.
        assert tree.depths.tolist() == [len(s) - 1 for s in strings]
        for u, s in enumerate(strings):
            parent = tree.parents[u]
            assert (parent == -1) if u == 0 else strings[parent] == s[:-1]
            kids = [v for v in range(n) if tree.parents[v] == u]  # node order
            row = tree.children[u]
            assert row[: len(kids)].tolist() == kids
            assert np.all(row[len(kids) :] == -1)
        assert tree.children.shape[1] == max(1, max(np.sum(tree.parents == u) for u in range(n)))

        # ancestor_mask is exactly the prefix relation of node strings (self included).
        expected = np.array(
            [[strings[i][: len(strings[j])] == strings[j] for j in range(n)] for i in range(n)]
        )
        assert np.array_equal(tree.ancestor_mask(), expected)
        offset = int(rng.integers(0, 5))
        full = np.array(tree.attention_mask(offset))[0, 0]
        assert full.shape == (n, offset + n)
        assert full[:, :offset].all() and np.array_equal(full[:, offset:], expected)
        assert np.array_equal(tree.positions(offset), offset + tree.depths)

        if width == 1:
            assert tree.parents.tolist() == list(range(-1, length - 1))
