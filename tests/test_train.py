"""Drafter training: prompt files, batched generation, the training forward against beam
search, loss going down, determinism and exact resume, and bad input."""

import json
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from helpers import (
    RTOL,
    assert_close,
    assert_greedy_equal,
    random_model,
    reference_logits,
    tiny_llama_config,
)
from mlx.utils import tree_flatten

import mlx_redrafter.train.shards as train_shards
from mlx_redrafter import train
from mlx_redrafter.accept import process_logits
from mlx_redrafter.batch import generate_batch, teacher_forced_hidden
from mlx_redrafter.beam import beam_search
from mlx_redrafter.drafter import init_drafter, load_drafter
from mlx_redrafter.errors import PromptError
from mlx_redrafter.generation import DecodeStats, SamplingConfig, plain_steps
from mlx_redrafter.prompts import encode_chat, read_prompts
from mlx_redrafter.train import (
    DataConfig,
    FitConfig,
    TrainError,
    TrainInterrupted,
    build_dataset,
    draft_logits,
    fit,
    make_positions,
    train_drafter,
)

VOCAB = 61
EOS = 1


class TinyTokenizer:
    """Characters to ids; the chat template is [0] + text + [2]."""

    eos_token_ids = [EOS]
    eos_token_id = EOS
    chat_template = "tiny"

    def encode(self, text, add_special_tokens=True):
        return [3 + ord(c) % (VOCAB - 3) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return [0] + self.encode(messages[-1]["content"]) + [2]


def tiny_model(seed=0, hidden=32, layers=2):
    config = tiny_llama_config(
        VOCAB, hidden, layers, intermediate_size=64, tie_word_embeddings=False
    )
    model = random_model(config, seed)
    model.freeze()
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def write_alpaca(path, n=24):
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
    records = []
    for i in range(n):
        records.append(
            {
                "instruction": f"say {words[i % 8]} {words[(3 * i) % 8]} {i}",
                "input": "twice" if i % 3 == 0 else "",
                "output": f"{words[(i + 1) % 8]} {words[(i + 5) % 8]} " * (1 + i % 4),
            }
        )
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_alpaca(tmp_path_factory.mktemp("prompts") / "alpaca.json")


@pytest.fixture(scope="module")
def data(model, prompts_file, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    return build_dataset(
        model,
        TinyTokenizer(),
        prompts_file,
        work,
        new_tokens=14,
        gen_batch_size=8,
        shard_size=8,
        progress=False,
    )


# The small training settings of every run here (fit's FitConfig and train_drafter's keywords).
SMALL = dict(learning_rate=3e-3, batch_size=32, num_predict=3, num_layers=1, eval_fraction=0.1)
FIT = FitConfig(epochs=2, **SMALL, checkpoint_every=1000)
RUN = dict(progress=False, eos_token_ids=[EOS])


# ---------------------------------------------------------------------------------------------
# Prompt files


def test_dataset_target_needs_answers(model, tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"turns": ["a question"]}\n')
    with pytest.raises(TrainError, match="needs an answer"):
        build_dataset(model, TinyTokenizer(), path, tmp_path / "w", target="dataset")


# ---------------------------------------------------------------------------------------------
# Data generation


def greedy_reference(model, prompt, n, stop):
    steps = plain_steps(model, model.make_cache(), prompt, SamplingConfig(), DecodeStats())
    out = []
    for _ in range(n):
        out.append(next(steps)[0])
        if out[-1] in stop:
            break
    return out


@pytest.mark.parametrize("batch_size", [5, 2, 3])
def test_batched_generation_equals_unbatched_greedy(model, batch_size):
    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(3, VOCAB, n)] for n in (4, 11, 1, 7, 15)]
    # A stop token that the first prompt emits early, so rows finish at different steps.
    stop = [greedy_reference(model, prompts[0], 20, [])[4]]
    refs = [greedy_reference(model, p, 20, stop) for p in prompts]
    assert len({len(r) for r in refs}) > 1
    out = generate_batch(model, prompts, 20, stop, batch_size)
    for prompt, ref, (response, hidden) in zip(prompts, refs, out, strict=True):
        # Batched rows and single-row steps are different computation shapes.
        assert_greedy_equal(response, ref, reference_logits(model, prompt, ref))
        assert hidden.shape == (len(response), model.args.hidden_size)
        # The hidden states kept while generating are the teacher-forced ones.
        (forced,) = teacher_forced_hidden(model, [prompt], [response])
        assert_close(hidden, forced)


def test_dataset_shards_resume_and_layout(model, prompts_file, tmp_path, monkeypatch):
    tok = TinyTokenizer()
    kwargs = dict(new_tokens=10, gen_batch_size=4, shard_size=8, progress=False)
    first = build_dataset(model, tok, prompts_file, tmp_path, **kwargs)
    shards = sorted((tmp_path / "data").glob("shard-*.npz"))
    assert len(shards) == 3 and first.num_sequences == 24
    # Every sequence is the last prompt token followed by the greedy response.
    prompts = read_prompts(prompts_file)
    selection = train.select_prompts(prompts, None)
    for i in (0, 13):
        ids = encode_chat(tok, prompts[selection[first.prompt_index[i]]].text)
        response = greedy_reference(model, ids, 10, [EOS])
        assert first.tokens[i].tolist() == [ids[-1]] + response
        assert first.sequence_hidden(i).shape == (len(response), model.args.hidden_size)
        assert first.sequence_hidden(i).dtype == np.float16

    shards[1].unlink()  # as if interrupted while making the second shard
    calls = []
    real = train_shards.generate_batch
    monkeypatch.setattr(
        train_shards, "generate_batch", lambda *a: calls.append(len(a[1])) or real(*a)
    )
    again = build_dataset(model, tok, prompts_file, tmp_path, **kwargs)
    assert sum(calls) == 8  # only the missing shard was made again
    assert all(np.array_equal(a, b) for a, b in zip(first.tokens, again.tokens, strict=True))
    np.testing.assert_array_equal(first.hidden, again.hidden)


def test_ctrl_c_while_generating_keeps_finished_shards(model, prompts_file, tmp_path, monkeypatch):
    tok = TinyTokenizer()
    kwargs = dict(new_tokens=6, gen_batch_size=4, shard_size=8, progress=False)
    real = train_shards.generate_batch
    calls = []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train_shards, "generate_batch", flaky)
    with pytest.raises(TrainInterrupted, match="run again to resume"):
        build_dataset(model, tok, prompts_file, tmp_path, **kwargs)
    assert len(list((tmp_path / "data").glob("shard-*.npz"))) == 1
    data = build_dataset(model, tok, prompts_file, tmp_path, **kwargs)
    assert data.num_sequences == 24 and len(calls) == 4


def test_dataset_target_uses_the_file_answers(model, prompts_file, tmp_path):
    tok = TinyTokenizer()
    data = build_dataset(
        model, tok, prompts_file, tmp_path, target="dataset", new_tokens=9, progress=False
    )
    prompts = read_prompts(prompts_file)
    selection = train.select_prompts(prompts, None)
    i = 5
    p = prompts[selection[data.prompt_index[i]]]
    ids = encode_chat(tok, p.text)
    answer = tok.encode(p.answer)[:8] + [EOS]
    assert data.tokens[i].tolist() == [ids[-1]] + answer
    (forced,) = teacher_forced_hidden(model, [ids], [answer])
    # Kept in float16.
    assert_close(data.sequence_hidden(i), forced, rtol=RTOL["float16"])


def assert_labels_are_greedy(model, tok, data, prompts_file, rows) -> None:
    """Each label of the sequences `rows` is the base's greedy choice after the prompt and
    the sequence's tokens before it (the first label is -1: the last prompt token)."""
    prompts = read_prompts(prompts_file)
    selection = train.select_prompts(prompts, None)
    for i in rows:
        ids = encode_chat(tok, prompts[selection[data.prompt_index[i]]].text)
        x, y = data.tokens[i], data.labels[i]
        assert len(y) == len(x) and y[0] == -1
        for j in range(1, len(x)):
            _, logits = model(mx.array([ids + x[1:j].tolist()]))
            assert y[j] == int(mx.argmax(logits[0, -1])), (i, j)


def test_relabel_target_is_the_greedy_choice_after_each_answer_prefix(
    model, prompts_file, tmp_path
):
    tok = TinyTokenizer()
    kw = dict(new_tokens=9, progress=False)
    relabel = build_dataset(model, tok, prompts_file, tmp_path / "r", target="relabel", **kw)
    dataset = build_dataset(model, tok, prompts_file, tmp_path / "d", target="dataset", **kw)
    assert dataset.labels is None and len(relabel.labels) == relabel.num_sequences
    for i in (0, 5, 17):
        # The context is the file's answer, as for "dataset"; only the targets differ.
        assert relabel.tokens[i].tolist() == dataset.tokens[i].tolist()
        np.testing.assert_allclose(relabel.sequence_hidden(i), dataset.sequence_hidden(i))
    assert_labels_are_greedy(model, tok, relabel, prompts_file, (0, 5, 17))
    differ = sum(
        int((y[1:] != x[1:]).sum()) for x, y in zip(relabel.tokens, relabel.labels, strict=True)
    )
    assert differ > 0  # a random model does not write the file's answers


def test_sample_target_draws_answers_and_labels_the_greedy_choice(model, prompts_file, tmp_path):
    tok = TinyTokenizer()
    kw = dict(new_tokens=9, shard_size=8, gen_batch_size=4, progress=False)
    sampled = build_dataset(model, tok, prompts_file, tmp_path / "s", target="sample", **kw)
    greedy = build_dataset(model, tok, prompts_file, tmp_path / "g", target="self", **kw)
    assert len(sampled.labels) == sampled.num_sequences
    assert_labels_are_greedy(model, tok, sampled, prompts_file, (0, 9, 17))
    # The answers are drawn, not the greedy ones (a random model is far from one-hot) ...
    same = [a.tolist() == b.tolist() for a, b in zip(sampled.tokens, greedy.tokens, strict=True)]
    assert not all(same)
    # ... from the seed of their shard: made again, the same data.
    again = build_dataset(model, tok, prompts_file, tmp_path / "s2", target="sample", **kw)
    assert all(a.tolist() == b.tolist() for a, b in zip(sampled.tokens, again.tokens, strict=True))
    # Top-p warps the draws: a tiny top-p keeps only the most likely token, i.e. greedy.
    narrow = build_dataset(
        model, tok, prompts_file, tmp_path / "n", target="sample", sample_top_p=1e-6, **kw
    )
    assert all(a.tolist() == b.tolist() for a, b in zip(narrow.tokens, greedy.tokens, strict=True))
    # Other sampling settings are other data: resuming with them is refused.
    with pytest.raises(TrainError, match="sample_temp"):
        build_dataset(
            model, tok, prompts_file, tmp_path / "s", target="sample", sample_temp=1.0, **kw
        )
    with pytest.raises(TrainError, match="temperature > 0"):
        build_dataset(
            model, tok, prompts_file, tmp_path / "z", target="sample", sample_temp=0.0, **kw
        )
    assert not (tmp_path / "z" / "data").exists()


def test_sampled_generation_draws_from_the_warped_distribution(model):
    """2,000 rows of one prompt, one token each: the counts fit softmax(logits / T) over the
    top-p set (chi-square); drawing from the unwarped distribution fails the same test."""
    from test_accept import chi2_pvalue

    prompt = [0, 5, 9, 2]
    _, logits = model(mx.array([prompt]))
    rows = 2000
    sampling = SamplingConfig(0.7, 0.9)
    out = generate_batch(model, [prompt] * rows, 1, [], rows, sampling=sampling, seed=3)
    counts: dict[int, int] = {}
    for tokens, *_ in out:
        counts[tokens[0]] = counts.get(tokens[0], 0) + 1
    warped = np.exp(np.array(process_logits(logits[0, -1], sampling)))
    expected = {t: float(p) for t, p in enumerate(warped) if p > 0}
    assert chi2_pvalue(counts, expected, rows) > 1e-3
    plain = np.exp(np.array(process_logits(logits[0, -1], SamplingConfig(1.0))))
    control = {t: float(p) for t, p in enumerate(plain)}
    assert chi2_pvalue(counts, control, rows) < 1e-6


# ---------------------------------------------------------------------------------------------
# The training forward is the inference forward


def one_sequence(labels=None):
    """Distillation data of one sequence, the tokens 10 to 14 (its hidden states are zeros)."""
    return train.DistillData(
        tokens=[np.array([10, 11, 12, 13, 14], np.int32)],
        hidden=np.zeros((4, 2), np.float16),
        hidden_start=np.array([0, 4]),
        prompt_index=np.array([0]),
        labels=labels,
    )


def test_positions_align_heads_with_tokens():
    data = one_sequence()
    pos = make_positions(data, [0], num_predict=2)
    # t = 0, 1, 2: H_t with x_{t+1} (g0) and then x_{t+2}, x_{t+3}; -1 past the end.
    assert pos.rows.tolist() == [0, 1, 2]
    assert pos.windows.tolist() == [[11, 12, 13], [12, 13, 14], [13, 14, -1]]
    assert pos.labels.tolist() == pos.windows.tolist()
    head_index = np.full(20, -1, np.int32)
    head_index[[12, 14]] = [0, 1]  # a draft vocabulary {12, 14}
    assert train.head_targets(pos.windows, head_index).tolist() == [[0, -1], [-1, 1], [1, -2]]


def test_relabelled_positions_read_tokens_and_predict_labels():
    data = one_sequence(labels=[np.array([-1, 21, 22, 23, 24], np.int32)])
    pos = make_positions(data, [0], num_predict=2)
    # The RNN still reads the tokens x; head i predicts y_{t+i+1} instead of x_{t+i+1}.
    assert pos.windows.tolist() == [[11, 12, 13], [12, 13, 14], [13, 14, -1]]
    assert pos.labels.tolist() == [[21, 22, 23], [22, 23, 24], [23, 24, -1]]
    assert train.head_targets(pos.labels, None).tolist() == [[22, 23], [23, 24], [24, -2]]
    counts = train.target_counts(data, [0], 30)
    assert counts[21:25].tolist() == [1, 1, 1, 1] and counts[11:15].sum() == 0


@pytest.mark.parametrize("vocab", [None, [EOS, 5, 9, 17, 23, 30, 41, 42, 57]])
def test_training_logits_equal_beam_search_logits(model, vocab):
    drafter = init_drafter(model, seed=3, exit_dim=48, num_draft_layers=2, draft_vocab_ids=vocab)
    prompt = [0, 7, 19, 33, 2]
    hidden, logits = model(mx.array([prompt]))
    context = hidden[0, -1]
    g0 = int(mx.argmax(logits[0, -1]).item())
    N = 4
    beams, scores = beam_search(drafter, model, context, g0, beam_width=1, beam_length=N + 1)
    beam = np.array(beams)[0].tolist()

    # Teacher-forced on the beam's own tokens: the RNN reads g0, d1, .., d_{N-1}.
    inputs = mx.array([beam[:N]])
    logits_t = draft_logits(drafter, context[None], model.embed(inputs))  # (N, 1, K)
    # The same step by step, as inference runs it.
    state = drafter.initial_state(1)
    for i in range(N):
        state = drafter.next_state(state, model.embed(mx.array([beam[i]])))
        step_logits = drafter.head(context[None], state)
        assert_close(logits_t[i], step_logits)
    # Beam search drafted each head's argmax, and its score is the sum of their log-probs.
    drafted = drafter.full_vocab_ids(mx.argmax(logits_t[:, 0], axis=-1))
    assert np.array(drafted).tolist() == beam[1:]
    logp = logits_t[:, 0] - mx.logsumexp(logits_t[:, 0], axis=-1, keepdims=True)
    picked = mx.take_along_axis(logp, drafter.head_index(mx.array(beam[1:]))[:, None], -1)
    assert_close(picked.sum(), scores[0])


# ---------------------------------------------------------------------------------------------
# Training


def params(drafter):
    return {k: np.array(v) for k, v in tree_flatten(drafter.parameters())}


def test_training_lowers_loss_and_writes_a_loadable_drafter(model, prompts_file, tmp_path):
    log = train_drafter(
        model,
        prompts_file,
        tmp_path / "out",
        tokenizer=TinyTokenizer(),
        data_config=DataConfig(num_prompts=None, new_tokens=14, gen_batch_size=8, shard_size=8),
        fit_config=FitConfig(epochs=4, **SMALL, draft_vocab_size=12, save_dtype="float16"),
        progress=False,
    )
    loss = log["curves"]["loss"]
    assert log["finished"] and len(loss) == log["steps"] > 10
    assert np.mean(loss[-3:]) < 0.7 * np.mean(loss[:3])
    assert log["evals"][-1]["loss"] < log["evals"][0]["loss"]
    assert 0 < log["draft_vocab"]["coverage_train"] <= 1
    assert log["data"]["sequences"] == 24

    assert {v.dtype for v in mx.load(str(tmp_path / "out" / "model.safetensors")).values()} == {
        mx.float16
    }
    drafter = load_drafter(tmp_path / "out", base=model)
    assert drafter.head_size == 12 and EOS in np.array(drafter.draft_vocab_ids).tolist()
    assert drafter.dtype == mx.float32  # saved in float16, run in the base model's dtype
    saved = json.loads((tmp_path / "out" / "training_log.json").read_text())
    for key in ("settings", "data", "draft_vocab", "curves", "evals", "seconds", "machine"):
        assert key in saved
    assert saved["machine"]["blas"]


def test_training_predicts_the_labels_not_the_tokens(model, data, tmp_path):
    # Labels that are always one rare token: the drafter learns them whatever the tokens are.
    counts = np.bincount(np.concatenate([x[1:] for x in data.tokens]), minlength=VOCAB)
    rare = int(np.argmin(counts))
    labels = [np.array([-1] + [rare] * (len(x) - 1), np.int32) for x in data.tokens]
    relabelled = train.DistillData(
        data.tokens, data.hidden, data.hidden_start, data.prompt_index, labels=labels
    )
    log = fit(model, relabelled, tmp_path / "out", work_dir=tmp_path / "w", config=FIT, **RUN)
    assert min(log["final_eval"]["head_accuracy"]) > 0.95
    assert counts[rare] / counts.sum() < 0.05


def test_same_seed_same_curve_and_resume_is_exact(model, data, tmp_path):
    ref = fit(model, data, tmp_path / "a", work_dir=tmp_path / "wa", config=FIT, **RUN)
    again = fit(model, data, tmp_path / "b", work_dir=tmp_path / "wb", config=FIT, **RUN)
    assert ref["curves"]["loss"] == again["curves"]["loss"]
    other = fit(
        model, data, tmp_path / "c", work_dir=tmp_path / "wc", config=replace(FIT, seed=1), **RUN
    )
    assert other["curves"]["loss"] != ref["curves"]["loss"]
    total = ref["steps"]
    per_epoch = total // FIT.epochs

    # Ctrl-C in the middle of the second epoch (raised from the step callback).
    def interrupt(step, metrics):
        if step == per_epoch + 2:
            raise KeyboardInterrupt

    work = tmp_path / "wi"
    with pytest.raises(TrainInterrupted, match="resume"):
        fit(model, data, tmp_path / "i", work_dir=work, config=FIT, callback=interrupt, **RUN)
    resumed = fit(model, data, tmp_path / "i", work_dir=work, config=FIT, **RUN)
    assert resumed["curves"] == ref["curves"]
    assert resumed["evals"] == ref["evals"]

    # A run stopped after a few steps (a crash after a checkpoint) and started again.
    work = tmp_path / "ws"
    part = fit(model, data, tmp_path / "s", work_dir=work, config=replace(FIT, max_steps=3), **RUN)
    assert not part["finished"] and part["steps"] == 3
    resumed2 = fit(model, data, tmp_path / "s", work_dir=work, config=FIT, **RUN)
    assert resumed2["curves"] == ref["curves"]

    a = params(load_drafter(tmp_path / "a"))
    for out in ("i", "s"):
        b = params(load_drafter(tmp_path / out))
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_with_other_settings_is_refused(model, data, tmp_path):
    work = tmp_path / "w"
    fit(model, data, tmp_path / "o", work_dir=work, config=replace(FIT, max_steps=2), **RUN)
    with pytest.raises(TrainError, match="learning_rate"):
        fit(
            model,
            data,
            tmp_path / "o",
            work_dir=work,
            config=replace(FIT, learning_rate=1e-2),
            **RUN,
        )
    # --no-resume starts over.
    log = fit(
        model,
        data,
        tmp_path / "o",
        work_dir=work,
        config=replace(FIT, max_steps=1),
        resume=False,
        **RUN,
    )
    assert log["steps"] == 1


def test_work_dir_of_another_base_model_is_refused(model, data, prompts_file, tmp_path):
    tok = TinyTokenizer()
    kwargs = dict(new_tokens=6, gen_batch_size=8, shard_size=8, num_prompts=8, progress=False)
    build_dataset(model, tok, prompts_file, tmp_path, **kwargs)
    other = tiny_model(seed=5, hidden=48)
    with pytest.raises(TrainError, match="another base model"):
        build_dataset(other, tok, prompts_file, tmp_path, **kwargs)
    same_shape = tiny_model(seed=6)
    with pytest.raises(TrainError, match="another base model"):
        build_dataset(same_shape, tok, prompts_file, tmp_path, **kwargs)
    # --no-resume starts over with the new base.
    fresh = build_dataset(other, tok, prompts_file, tmp_path, resume=False, **kwargs)
    assert fresh.hidden.shape[1] == 48
    # Data made for one base cannot train a drafter for another.
    with pytest.raises(TrainError, match="another base model"):
        fit(other, data, tmp_path / "o", work_dir=tmp_path / "w2", config=FIT, **RUN)
    with pytest.raises(TrainError, match="another base model"):
        fit(same_shape, data, tmp_path / "o", work_dir=tmp_path / "w2", config=FIT, **RUN)


def test_bad_training_settings(model, data, prompts_file, tmp_path):
    with pytest.raises(TrainError, match="target must be"):
        build_dataset(model, TinyTokenizer(), prompts_file, tmp_path, target="teacher")
    with pytest.raises(TrainError, match="epochs"):
        fit(
            model,
            data,
            tmp_path / "o",
            work_dir=tmp_path / "w",
            config=replace(FIT, epochs=0),
            **RUN,
        )
    with pytest.raises(TrainError, match="tokenizer"):
        train_drafter(model, prompts_file, tmp_path / "o")
    with pytest.raises(PromptError, match="does not exist"):
        train_drafter(model, tmp_path / "missing.json", tmp_path / "o", tokenizer=TinyTokenizer())


def test_the_cli_defaults_are_the_configs():
    # Each default is written once, in DataConfig or FitConfig; `train --help` shows it.
    import inspect

    from mlx_redrafter.cli.train import train as train_command

    options = inspect.signature(train_command).parameters
    renamed = {"draft_vocab": "draft_vocab_size"}
    parsed = {"feature_layers", "time_budget"}  # text options the command parses
    checked = 0
    for config in (DataConfig(), FitConfig()):
        for name, value in vars(config).items():
            option = next((o for o, f in renamed.items() if f == name), name)
            if option in options and option not in parsed:
                assert options[option].default == value, (option, options[option].default)
                checked += 1
    assert checked >= 20
