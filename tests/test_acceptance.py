"""Offline acceptance replay equals what the real ReDrafter loop accepts."""

import numpy as np
import pytest
from test_drafter_v2 import random_drafter
from test_generation import FakeTokenizer, tiny_model

from mlx_redrafter.bench.replay import acceptance_grid, acceptance_grids
from mlx_redrafter.drafter import init_drafter
from mlx_redrafter.generation import stream_generate


@pytest.mark.parametrize("eos", [(), (5,)])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("seed", [0, 2, 4])
def test_replay_matches_the_real_loop(seed, batched, eos):
    # A small vocabulary so a random drafter is right often enough to accept runs.
    model = tiny_model(seed, vocab=6, hidden=32)
    drafter = init_drafter(model, seed=seed)
    shapes = [(1, 3), (2, 4), (3, 5)]
    prompts = [[1, 2, 3], [4, 0, 5, 1]]
    grid = acceptance_grid(
        model, FakeTokenizer(eos), drafter, prompts, shapes, max_tokens=30, batched=batched
    )
    for W, L in shapes:
        accepted = []
        for ids in prompts:
            responses = list(
                stream_generate(
                    model,
                    FakeTokenizer(eos),
                    ids,
                    drafter,
                    max_tokens=30,
                    beam_width=W,
                    beam_length=L,
                    lookup=False,  # the replay covers the drafter's beams
                )
            )
            accepted += responses[-1].stats.accepted
        entry = grid["shapes"][f"{W}x{L}"]
        assert entry["rounds"] == len(accepted)
        assert entry["tokens_per_step"] == pytest.approx(np.mean(accepted) + 1.0)
    assert any(grid["shapes"][f"{W}x{L}"]["tokens_per_step"] > 1.2 for W, L in shapes)


@pytest.mark.parametrize("batched", [True, False])
def test_replay_of_a_multi_layer_drafter_matches_the_real_loop(batched):
    model = tiny_model(1, vocab=6, hidden=32)
    # A random fuse: with its identity start the drafter would read the last layer only.
    drafter = random_drafter(model, seed=1, feature_layers=[0])
    prompts = [[1, 2, 3], [4, 0, 5, 1]]
    grid = acceptance_grid(
        model, FakeTokenizer(()), drafter, prompts, [(2, 4)], max_tokens=30, batched=batched
    )
    accepted = []
    for ids in prompts:
        *_, last = stream_generate(
            model,
            FakeTokenizer(()),
            ids,
            drafter,
            max_tokens=30,
            beam_width=2,
            beam_length=4,
            lookup=False,
        )
        accepted += last.stats.accepted
    assert grid["shapes"]["2x4"]["rounds"] == len(accepted)
    assert grid["shapes"]["2x4"]["tokens_per_step"] == pytest.approx(np.mean(accepted) + 1.0)


def test_grids_of_several_drafters_equal_one_at_a_time():
    model = tiny_model(3, vocab=6, hidden=32)
    plain = init_drafter(model, seed=3)
    multi = random_drafter(model, seed=4, feature_layers=[0])
    prompts = [[1, 2, 3], [4, 0, 5, 1]]
    shapes = [(1, 3), (2, 4)]
    together = acceptance_grids(model, FakeTokenizer(()), [plain, multi], prompts, shapes, 30)
    for drafter, grid in zip([plain, multi], together, strict=True):
        alone = acceptance_grid(model, FakeTokenizer(()), drafter, prompts, shapes, 30)
        assert grid == alone
    assert together[0] != together[1]
