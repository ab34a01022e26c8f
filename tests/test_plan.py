"""DecodePlan: decoding settings resolved once (plan.py), and stream_generate(plan=)."""

from __future__ import annotations

import pytest
from test_generation import FakeTokenizer, tiny_model

from mlx_redrafter import defaults
from mlx_redrafter.drafter import init_drafter
from mlx_redrafter.errors import GenerationError
from mlx_redrafter.generation import stream_generate
from mlx_redrafter.plan import DecodePlan

PROMPT = [5, 9, 3, 7, 5, 9, 3, 7, 5, 9, 3, 1, 2, 5, 9]


def tokens(model, drafter, **kw):
    return [r.token for r in stream_generate(model, FakeTokenizer(), PROMPT, drafter, **kw)]


def test_a_plan_built_once_gives_the_tokens_of_keyword_arguments():
    model = tiny_model(3)
    drafter = init_drafter(model, seed=1)
    settings = {"beam_width": 2, "beam_length": 3, "lookup_max": 6}
    plan = DecodePlan.resolve(model, **settings)
    assert plan.beam == (2, 3) and plan.lookup.max_tokens == 6 and plan.lookup_max_given
    for source in (drafter, None):
        want = tokens(model, source, max_tokens=24, **settings)
        assert tokens(model, source, max_tokens=24, plan=plan) == want
        assert tokens(model, source, max_tokens=24, plan=plan) == want  # reused: same again
    off = DecodePlan.resolve(model, lookup=False)
    assert tokens(model, None, max_tokens=12, plan=off) == tokens(
        model, None, max_tokens=12, lookup=False
    )


def test_generation_with_a_plan_reads_no_tuned_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_REDRAFTER_CONFIG_DIR", str(tmp_path))
    model = tiny_model(4)
    model.source_path = str(tmp_path / "model")
    defaults.save_tuned_beam(model.source_path, 2, 4)
    defaults.save_cost_curve(model.source_path, [{"n": 1, "ratio": 1.0}, {"n": 2, "ratio": 1.5}])
    plan = DecodePlan.resolve(model)
    assert plan.beam == (2, 4) and plan.cost_curve == (1.0, 1.5)
    drafter = init_drafter(model, seed=2)
    want = tokens(model, drafter, max_tokens=16, plan=plan)

    def no_store(*args, **kwargs):
        raise AssertionError("the decode path read tuned.json")

    monkeypatch.setattr(defaults, "_entry", no_store)
    monkeypatch.setattr(defaults, "config_path", no_store)
    del model.source_path  # and no model.source_path either
    assert tokens(model, drafter, max_tokens=16, plan=plan) == want
    with pytest.raises(AssertionError, match="tuned.json"):  # the keyword path does read it
        model.source_path = str(tmp_path / "model")
        tokens(model, drafter, max_tokens=4)


def test_a_plan_and_decoding_keywords_together_are_refused():
    model = tiny_model(5)
    plan = DecodePlan.resolve(model)
    with pytest.raises(GenerationError, match="plan= or"):
        tokens(model, None, max_tokens=2, plan=plan, beam_width=2)


def test_each_generation_gets_a_fresh_policy_from_the_plan_curve():
    model = tiny_model(6)
    plan = DecodePlan.resolve(model)
    a, b = plan.tree_policy(model), plan.tree_policy(model)
    assert a is not b and a.curve.tolist() == b.curve.tolist()
    assert a.curve.tolist() == list(plan.cost_curve[: a.curve.size])


def test_bad_settings_fail_when_the_plan_is_built():
    model = tiny_model(7)
    with pytest.raises(GenerationError, match="beam width"):
        DecodePlan.resolve(model, beam_width=0)
    with pytest.raises(GenerationError, match="lookup max"):
        DecodePlan.resolve(model, lookup_max=0)


@pytest.mark.parametrize(
    "settings, with_drafter, want",
    [
        ({}, True, 9),  # 32-token copies shrink to 8 at the context's end: 8 + 1
        ({}, False, 9),
        ({"lookup_max": 20}, True, 21),  # an explicit lookup_max does not shrink
        ({"lookup": False}, True, 3),  # the beam's depth (L = 3, the default)
        ({"lookup": False, "beam_length": 5}, True, 5),
        ({"lookup": False, "beam_length": 5}, False, 1),  # plain decoding
    ],
)
def test_headroom_is_the_lookahead_a_request_at_the_context_end_needs(settings, with_drafter, want):
    model = tiny_model(8)  # 1024 positions
    plan = DecodePlan.resolve(model, **settings)
    assert plan.headroom(with_drafter) == want
    drafter = init_drafter(model, seed=3) if with_drafter else None
    prompt = [5, 9, 3] * 300  # 900 tokens
    room = model.context_length - len(prompt) - want
    fits = stream_generate(model, FakeTokenizer(), prompt, drafter, max_tokens=room, plan=plan)
    next(fits)  # accepted: the fit check passed
    fits.close()
    with pytest.raises(GenerationError, match="context length"):
        over = stream_generate(
            model, FakeTokenizer(), prompt, drafter, max_tokens=room + 1, plan=plan
        )
        next(over)


def test_cli_python_and_server_defaults_are_the_same_objects():
    """Each decoding setting's default is written once: GenerateOptions' (OPTION_DEFAULTS),
    with the lookup default in plan.py and the beam shape left to the DecodePlan (None)."""
    import dataclasses
    import inspect

    from mlx_redrafter.chat import ChatSession
    from mlx_redrafter.cli.chat import chat
    from mlx_redrafter.cli.generate import generate
    from mlx_redrafter.cli.serve import serve
    from mlx_redrafter.generation import OPTION_DEFAULTS, GenerateOptions
    from mlx_redrafter.plan import DEFAULT_LOOKUP
    from mlx_redrafter.server.engine import Engine

    cli_names = {"temperature": "temp"}
    chat_fields = {f.name: f.default for f in dataclasses.fields(ChatSession)}
    engine = Engine(tiny_model(9), FakeTokenizer(), None, model_name="tiny")
    for name in ("max_tokens", "temperature", "top_p", "top_k"):
        want = getattr(OPTION_DEFAULTS, name)
        assert want is GenerateOptions.__dataclass_fields__[name].default
        for command in (generate, chat, serve):
            got = inspect.signature(command).parameters[cli_names.get(name, name)].default
            assert got is want, (command.__name__, name)
        assert chat_fields[name] is want, name
        assert engine.defaults[name] is want, name
    for command in (generate, chat):  # serve passes None: the library's default
        assert inspect.signature(command).parameters["lookup"].default is DEFAULT_LOOKUP
    for name in ("beam_width", "beam_length", "lookup_max"):  # None: resolved by the plan
        for command in (generate, chat, serve):
            assert inspect.signature(command).parameters[name].default is None
        assert chat_fields[name] is None and getattr(OPTION_DEFAULTS, name) is None
    # the server's plan is the plan of those defaults, and its headroom the plan's
    assert engine.plan == DecodePlan.resolve(engine.model)
    assert engine.headroom == engine.plan.headroom(False)
