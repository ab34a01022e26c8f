"""Drafter v3: the recurrence levers (context into every RNN step, a gated cell), the prompt
mix of many kinds, conversations as prompts, and the "auto" data target."""

import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import assert_close, assert_greedy_equal, invoke, reference_logits
from test_drafter_v2 import assert_same_params, params, random_drafter, three_layer_model
from test_generation import tiny_model as sharp_model
from test_generation import tokens_of
from test_train import EOS, TinyTokenizer, tiny_model

from mlx_redrafter.beam import beam_search
from mlx_redrafter.bench import by_kind, format_by_kind
from mlx_redrafter.drafter import init_drafter, load_drafter, save_drafter
from mlx_redrafter.errors import ConvertError, DrafterError, PromptError, TrainError
from mlx_redrafter.export import check_exportable
from mlx_redrafter.prompts import load_prompts, read_prompts
from mlx_redrafter.rsd_draft import RecurrentStep
from mlx_redrafter.train import (
    DataConfig,
    FitConfig,
    build_dataset,
    draft_logits,
    select_prompts,
    train_drafter,
)
from mlx_redrafter.train import mix as mix_lib
from mlx_redrafter.train import sources as sources_lib

LEVERS = [dict(rnn_context=True), dict(rnn_gate=True), dict(rnn_context=True, rnn_gate=True)]


def lever_drafter(model, seed, **kw):
    """A drafter with the levers on and every new weight random (rnn_c starts random anyway;
    the gate's bias is pushed off 0 so a wrong mix of old and new state shows)."""
    drafter = random_drafter(model, seed, **kw)
    if "rnn_gate_u" in drafter:
        b = drafter.rnn_gate_u.bias
        drafter.rnn_gate_u.bias = b + mx.random.normal(b.shape, key=mx.random.key(seed + 7))
        mx.eval(drafter.parameters())
    return drafter


@pytest.mark.parametrize("levers", LEVERS)
@pytest.mark.parametrize("features", [None, [2, 0]])
def test_training_logits_equal_beam_search_logits(levers, features):
    model = three_layer_model()
    drafter = lever_drafter(model, 3, exit_dim=48, feature_layers=features, **levers)
    prompt = [0, 7, 19, 33, 2]
    hidden, logits = model(mx.array([prompt]), features=drafter.feature_layers)
    context = hidden[0, -1]
    g0 = int(mx.argmax(logits[0, -1]).item())
    N = 4
    beams, scores = beam_search(drafter, model, context, g0, beam_width=1, beam_length=N + 1)
    beam = np.array(beams)[0].tolist()
    logits_t = draft_logits(drafter, context[None], model.embed(mx.array([beam[:N]])))
    drafted = drafter.full_vocab_ids(mx.argmax(logits_t[:, 0], axis=-1))
    assert np.array(drafted).tolist() == beam[1:]
    logp = logits_t[:, 0] - mx.logsumexp(logits_t[:, 0], axis=-1, keepdims=True)
    picked = mx.take_along_axis(logp, drafter.head_index(mx.array(beam[1:]))[:, None], -1)
    assert_close(picked.sum(), scores[0])
    # The sampled drafter (RSD) steps the same recurrence.
    step = RecurrentStep(drafter, model, context)
    state = step.start(1)
    for i in range(N):
        state, step_logits = step(state, mx.array([[beam[i]]]))
        assert_close(step_logits[0, 0], logits_t[i, 0])


def test_the_levers_change_the_drafts_and_need_the_context():
    model = three_layer_model()
    plain = init_drafter(model, seed=3)
    context = model(mx.array([[0, 7, 19, 2]]))[0][0, -1]
    emb = model.embed(mx.array([[4, 9, 16]]))
    base = np.array(draft_logits(plain, context[None], emb))
    for levers in LEVERS:
        drafter = lever_drafter(model, 3, **levers)
        # The shared weights are drawn as before: only the new ones are added.
        new = set(params(drafter)) - set(params(plain))
        expect = {"rnn_c.weight"} if levers.get("rnn_context") else set()
        if levers.get("rnn_gate"):
            expect |= {"rnn_gate_u.weight", "rnn_gate_u.bias", "rnn_gate_w.weight"}
        assert new == expect
        got = np.array(draft_logits(drafter, context[None], emb))
        assert np.abs(got - base).max() > 1e-3 * np.abs(base).max()
    # Another context changes an rnn_context drafter's second head even with the head's own
    # context input held fixed: the recurrence reads it.
    drafter = lever_drafter(model, 3, rnn_context=True)
    other = model(mx.array([[0, 30, 11, 2]]))[0][0, -1]
    s1 = drafter.next_state(drafter.initial_state(1), emb[:, 0], drafter.context_term(context))
    s2 = drafter.next_state(drafter.initial_state(1), emb[:, 0], drafter.context_term(other))
    assert np.abs(np.array(s1 - s2)).max() > 1e-4
    with pytest.raises(DrafterError, match="context_term"):
        drafter.next_state(drafter.initial_state(1), emb[:, 0])
    with pytest.raises(DrafterError, match="rnn: true"):
        init_drafter(model, rnn=False, rnn_gate=True)


@pytest.mark.parametrize("seed,W,L", [(0, 2, 4), (1, 1, 3)])
def test_greedy_with_lever_drafters_equals_plain(seed, W, L):
    model = sharp_model(seed, layers=3)
    drafter = lever_drafter(model, seed, feature_layers=[1], rnn_context=True, rnn_gate=True)
    prompt = np.random.default_rng(seed).integers(0, 64, 7).tolist()
    plain = tokens_of(model, prompt, max_tokens=20)
    spec = tokens_of(
        model, prompt, drafter, max_tokens=20, beam_width=W, beam_length=L, lookup=False
    )
    assert_greedy_equal(spec, plain, reference_logits(model, prompt, plain))


def test_lever_drafter_round_trip_and_no_apple_export(tmp_path):
    model = three_layer_model()
    drafter = lever_drafter(model, 2, rnn_context=True, rnn_gate=True)
    save_drafter(drafter, tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["rnn_context"] is True and config["rnn_gate"] is True
    loaded = load_drafter(tmp_path / "d", base=model)
    assert_same_params(params(drafter), params(loaded))
    context = model(mx.array([[0, 3, 8, 2]]))[0][0, -1]
    a, b = (
        beam_search(drafter, model, context, 5, 3, 4),
        beam_search(loaded, model, context, 5, 3, 4),
    )
    np.testing.assert_array_equal(np.array(a[0]), np.array(b[0]))
    with pytest.raises(ConvertError, match="plain cell"):
        check_exportable(drafter, "d")
    # Without the levers the config stays Apple's.
    assert not {"rnn_context", "rnn_gate"} & set(init_drafter(model).args.to_dict())


# ---------------------------------------------------------------------------------------------
# Conversations as prompts, and the "auto" target


def test_messages_records(tmp_path):
    path = tmp_path / "p.jsonl"
    convo = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]
    path.write_text(json.dumps({"id": "a", "messages": convo}) + "\n")
    (p,) = read_prompts(path)
    assert p.text == "again" and p.turns == ("hi", "again") and p.messages() == convo
    for bad in ([], [{"role": "user"}], convo[:2], [{"role": "robot", "content": "x"}], "hi"):
        path.write_text(json.dumps({"messages": bad}) + "\n")
        with pytest.raises(PromptError, match=r"p.jsonl: line 1 has 'messages'"):
            read_prompts(path)


class ConvoTokenizer(TinyTokenizer):
    """TinyTokenizer whose template keeps every turn (so a history changes the prompt)."""

    def apply_chat_template(self, messages, add_generation_prompt=True):
        out = []
        for m in messages:
            out += [0] + self.encode(m["content"]) + [2]
        return out


def test_auto_target_relabels_answers_and_generates_the_rest(tmp_path):
    model = tiny_model()
    records = [
        {"prompt": "say red", "output": "blue blue"},
        {"prompt": "say sun"},
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "moon"},
            ]
        },
        {"prompt": "say tree", "output": "green"},
    ]
    path = tmp_path / "mix.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = ConvoTokenizer()
    kw = dict(new_tokens=6, gen_batch_size=4, shard_size=4, progress=False, num_prompts=None)
    auto = build_dataset(model, tok, path, tmp_path / "auto", target="auto", **kw)
    self_data = build_dataset(model, tok, path, tmp_path / "self", target="self", **kw)
    prompts = read_prompts(path)
    selection = select_prompts(prompts, None)
    assert auto.num_sequences == 4
    answered = {i for i, p in enumerate(prompts) if p.answer is not None}
    assert answered == {0, 3}
    for j in range(4):
        i = int(selection[auto.prompt_index[j]])
        seq, labels = auto.tokens[j], auto.targets(j)
        if i in answered:
            # The file's answer (cut to new_tokens, ending in EOS), relabelled by the base.
            assert seq[1:].tolist() == tok.encode(prompts[i].answer)[:5] + [EOS]
            assert labels[0] == -1 and not np.array_equal(labels[1:], seq[1:])
        else:
            # The base's own greedy answer, as the self target makes it; its labels are its
            # tokens.
            np.testing.assert_array_equal(labels[1:], seq[1:])
            np.testing.assert_array_equal(seq, self_data.tokens[j])


def test_the_conversation_reaches_the_data(tmp_path):
    """A messages record is encoded with its earlier turns (not just the last one)."""
    import mlx_redrafter.train.shards as shards

    tok = ConvoTokenizer()
    convo = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"messages": convo}) + "\n")
    (p,) = read_prompts(path)
    assert shards._encode(tok, p) == tok.apply_chat_template(convo)


# ---------------------------------------------------------------------------------------------
# The prompt mix


def fake_stdlib(root):
    root.mkdir()
    doc = "A module that does things. " * 20
    (root / "alpha.py").write_text(
        f'"""{doc}"""\n\n'
        + "".join(
            f'def fn{i}(a, b=1):\n    """Add {i} to things.\n\n    {doc}\n    """\n'
            f"    x = a + b\n    y = x * {i}\n    return y\n\n"
            for i in range(30)
        )
    )
    (root / "textwrap.py").write_text(
        f'"""{doc}"""\n\ndef indent(t):\n    """{doc}"""\n    a = 1\n    b = 2\n    return t\n'
    )
    (root / "test").mkdir()
    (root / "test" / "skipme.py").write_text(f'"""{doc}"""\n')
    (root / "broken.py").write_text("def (:\n")
    return root


def test_build_mix_writes_every_kind_and_holds_items_out(tmp_path):
    lib = fake_stdlib(tmp_path / "lib")
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(
        json.dumps(
            [
                {
                    "instruction": f"Do thing {i}",
                    "input": "with this" if i % 2 else "",
                    "output": "ok",
                }
                for i in range(40)
            ]
            + [{"instruction": "Translate to French", "input": "cat", "output": "Le chat est ici."}]
            * 8
        )
    )
    counts = {k: 4 for k in mix_lib.DEFAULT_COUNTS}
    out = tmp_path / "mix.jsonl"
    manifest = mix_lib.build_mix(out, alpaca=alpaca, counts=counts, seed=1, stdlib_root=lib)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = {r["category"] for r in records}
    assert kinds == set(mix_lib.DEFAULT_COUNTS)
    assert manifest["records"] == len(records) and sum(manifest["kinds"].values()) == len(records)
    assert set(manifest["sources"]) <= set(sources_lib.SOURCES) and "alpaca" in manifest["sources"]
    assert not list(tmp_path.glob("*.partial"))
    prompts = read_prompts(out)  # every record reads as a prompt
    assert len(prompts) == len(records)
    text = out.read_text()
    assert "skipme" not in text and "def indent" not in text  # test dirs, bench sources
    _, funcs = sources_lib.stdlib_items(lib)
    held = {f["name"] for f in funcs if sources_lib.held_out(f["key"])}
    assert held and len(held) < len(funcs)
    for r in records:
        if r["category"].startswith("code-"):
            assert not any(f"{name}(" in r["prompt"] for name in held)
    # Same seed, same file; no Alpaca, no Alpaca kinds.
    again = tmp_path / "again.jsonl"
    mix_lib.build_mix(again, alpaca=alpaca, counts=counts, seed=1, stdlib_root=lib)
    assert again.read_text() == text
    bare = mix_lib.build_mix(tmp_path / "bare.jsonl", counts=counts, stdlib_root=lib)
    assert "alpaca" not in bare["sources"] and "chat" not in bare["kinds"]


def test_build_mix_bad_input(tmp_path):
    with pytest.raises(TrainError, match="unknown prompt kinds: poetry"):
        mix_lib.build_mix(tmp_path / "m.jsonl", counts={"poetry": 3})
    bad = tmp_path / "alpaca.json"
    bad.write_text("{not json")
    with pytest.raises(TrainError, match="cannot read Alpaca file .*alpaca.json"):
        mix_lib.build_mix(tmp_path / "m.jsonl", alpaca=bad, counts={"chat": 1})
    assert not (tmp_path / "m.jsonl").exists()


def test_eval_set_is_held_out_of_the_mix():
    """Every library item the shipped evaluation set is made of is one the mix holds out."""
    prompts = load_prompts("kinds")
    assert len(prompts) == 40 and {p.source for p in prompts} == {"kinds"}
    records = [json.loads(x) for x in mix_lib.EVAL_FILE.read_text().splitlines() if x.strip()]
    assert len({r["category"] for r in records}) >= 6
    keys = [k for r in records for k in r.get("keys", [])]
    assert keys and all(sources_lib.held_out(k) for k in keys if not k.startswith("eval:"))


def test_acceptance_by_kind_pools_each_kinds_rounds():
    grid = {
        "shapes": {"1x3": {"tokens_per_step": 0.0}},
        "prompts": [
            {"tokens_per_step": {"1x3": 2.0}, "rounds": {"1x3": 10}},
            {"tokens_per_step": {"1x3": 1.5}, "rounds": {"1x3": 30}},
            {"tokens_per_step": {"1x3": 3.0}, "rounds": {"1x3": 5}},
            {"tokens_per_step": {"1x3": 1.0}, "rounds": {"1x3": 0}},
        ],
    }
    table = by_kind(grid, ["qa", "qa", "code", "math"])
    assert table["qa"]["1x3"] == pytest.approx(1.0 + (1.0 * 10 + 0.5 * 30) / 40)
    assert table["code"]["1x3"] == pytest.approx(3.0) and table["math"]["1x3"] == 1.0
    text = format_by_kind(table, {"shapes": {"1x3": {"tokens_per_step": 1.9}}})
    assert "| qa | 1.62 |" in text and "| **all** | 1.90 |" in text


def test_train_drafter_on_a_mix_logs_its_kinds_and_a_shard_manifest(tmp_path):
    model = tiny_model()
    kinds = ["math", "code-edit", "chat"]
    records = [
        {
            "prompt": f"say {w} {i}",
            "category": kinds[i % 3],
            "source": ["math", "stdlib", "alpaca"][i % 3],
        }
        for i, w in enumerate(["red", "blue", "sun", "moon", "tree", "cat", "dog", "sky"] * 2)
    ]
    path = tmp_path / "mix.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    log = train_drafter(
        model,
        path,
        tmp_path / "out",
        tokenizer=TinyTokenizer(),
        data_config=DataConfig(num_prompts=None, new_tokens=6, gen_batch_size=8, shard_size=8),
        fit_config=FitConfig(
            batch_size=16, num_predict=2, num_layers=1, rnn_context=True, rnn_gate=True
        ),
        progress=False,
    )
    assert log["settings"]["rnn_context"] and log["settings"]["rnn_gate"]
    assert (
        log["settings"]["prompts_file"] == "mix.jsonl" and log["settings"]["work_dir"] == "out-work"
    )
    drafter = load_drafter(tmp_path / "out", base=model)
    assert drafter.args.rnn_context and drafter.args.rnn_gate
    mix = log["data"]["mix"]
    assert set(mix["kinds"]) == set(kinds)
    assert sum(k["tokens"] for k in mix["kinds"].values()) == log["data"]["response_tokens"]
    assert set(mix["licenses"]) == {"math", "stdlib", "alpaca"}
    manifest = json.loads((tmp_path / "out" / "data_manifest.json").read_text())
    assert [s["prompts"] for s in manifest["shards"]] == [[0, 8], [8, 16]]
    assert sum(s["response_tokens"] for s in manifest["shards"]) == manifest["response_tokens"]
    assert manifest["made_with"]["prompts_file"] == "mix.jsonl" and manifest["mix"] == mix
    # The shards the manifest lists are the ones on disk.
    names = sorted(p.name for p in (tmp_path / "out-work" / "data").glob("shard-*.npz"))
    assert names == [s["file"] for s in manifest["shards"]]


def test_build_mix_leaves_out_what_an_evaluation_prompt_quotes(tmp_path, monkeypatch):
    lib = fake_stdlib(tmp_path / "lib")
    _, funcs = sources_lib.stdlib_items(lib)
    kept = [f for f in funcs if not sources_lib.held_out(f["key"])]
    quoted = kept[0]
    monkeypatch.setattr(mix_lib, "_eval_prompts", lambda: [f"Explain:\n{quoted['code']}\n"])
    counts = {"code-edit": 60, "code-write": 60}
    mix_lib.build_mix(tmp_path / "m.jsonl", counts=counts, stdlib_root=lib)
    text = (tmp_path / "m.jsonl").read_text()
    assert f"{quoted['name']}(" not in text
    assert f"{kept[1]['name']}(" in text  # the others are still drawn


def test_train_mix_cli_bad_input(tmp_path):
    out = tmp_path / "mix.jsonl"
    proc = invoke(["train-mix", "-o", str(out), "--scale", "0"])
    assert proc.returncode != 0 and "--scale must be > 0, got 0.0" in proc.stderr
    bad = tmp_path / "alpaca.json"
    bad.write_text('{"not": "a list"}')
    proc = invoke(["train-mix", "-o", str(out), "--alpaca", str(bad)])
    assert proc.returncode != 0 and "alpaca.json is not Alpaca's JSON" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_warm_start_goes_on_from_the_given_drafter(tmp_path):
    """--init-from: training starts from that drafter (its weights, architecture and draft
    vocabulary), not from a random one; the log names it; a bad path is one clear error."""
    model = tiny_model()
    words = ["red", "blue", "sun", "moon", "tree", "cat", "dog", "sky"]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"say {w}"}) + "\n" for w in words * 2))
    data = DataConfig(num_prompts=None, new_tokens=6, gen_batch_size=8, shard_size=8)

    def train(out, **fit):
        return train_drafter(
            model, path, tmp_path / out, tokenizer=TinyTokenizer(), data_config=data,
            work_dir=tmp_path / "work", resume=False, progress=False,
            fit_config=FitConfig(batch_size=16, num_predict=2, **fit),
        )  # fmt: skip

    train("first", num_layers=2, draft_vocab_size=8, seed=1)
    first = load_drafter(tmp_path / "first", base=model)
    # A near-zero rate: one step barely moves the weights, so the result is the start.
    log = train(
        "warm", num_layers=1, draft_vocab_size=0, seed=2, max_steps=1,
        learning_rate=1e-9, init_from=str(tmp_path / "first"),
    )  # fmt: skip
    warm = load_drafter(tmp_path / "warm", base=model)
    assert warm.args.num_draft_layers == 2
    assert np.array_equal(np.array(warm.draft_vocab_ids), np.array(first.draft_vocab_ids))
    start, got = params(first), params(warm)
    assert start.keys() == got.keys()
    for name in start:
        assert_close(got[name], start[name], what=name)
    assert log["settings"]["init_from"]["drafter"] == "first"
    assert len(log["settings"]["init_from"]["weights_sha256"]) == 16
    cold = train("cold", num_layers=2, draft_vocab_size=8, seed=2, max_steps=1, learning_rate=1e-9)
    assert cold["settings"]["init_from"] is None
    cold_params = params(load_drafter(tmp_path / "cold", base=model))
    assert any(not np.allclose(cold_params[k], start[k], rtol=1e-3, atol=1e-3) for k in start)
    with pytest.raises(TrainError, match="--init-from: drafter .*nowhere"):
        train("bad", init_from=str(tmp_path / "nowhere"))
    assert not (tmp_path / "bad").exists()
