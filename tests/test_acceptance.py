"""Offline acceptance replay equals what the real ReDrafter loop accepts."""

import numpy as np
import pytest
from test_generation import FakeTokenizer, tiny_model

from mlx_redrafter.bench.replay import acceptance_grid
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
