"""Chat: the session keeps the conversation in the KV cache (only a new turn is prefilled,
with the same output as a fresh run); the terminal UI through a pseudo-terminal and a pipe."""

from __future__ import annotations

import io
import os
import re
import signal
import sys
import types

import pytest
from helpers import REPO_ROOT, cli_env, invoke, run_cli, write_tiny_drafter, write_tiny_model

from mlx_redrafter.chat import ChatSession, ContextFullError
from mlx_redrafter.cli import chat_input
from mlx_redrafter.cli.chat import run_chat, stats_report
from mlx_redrafter.drafter import load_drafter
from mlx_redrafter.generation import stream_generate
from mlx_redrafter.loading import load


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    model_dir = write_tiny_model(root / "model")
    drafter_dir = write_tiny_drafter(model_dir, root / "drafter")
    return model_dir, drafter_dir


@pytest.fixture(scope="module")
def loaded(tiny):
    model_dir, drafter_dir = tiny
    model, tokenizer = load(model_dir)
    return model, tokenizer, load_drafter(drafter_dir, base=model)


def fresh(model, tokenizer, ids, drafter=None, max_tokens=12):
    """Tokens of a run on a new cache: what a turn must produce whatever the cache held."""
    return [
        r.token
        for r in stream_generate(
            model, tokenizer, ids, drafter, max_tokens=max_tokens, lookup=drafter is not None
        )
    ]


@pytest.mark.parametrize("use_drafter", [False, True])
def test_second_turn_prefills_only_the_new_turn(loaded, use_drafter):
    model, tokenizer, drafter = loaded
    draft = drafter if use_drafter else None
    session = ChatSession(model, tokenizer, draft, max_tokens=12, system="Be brief.")

    ids1 = session.turn_ids("hello world")
    first = [r.token for r in session.send("hello world")]
    assert session.turns[-1].prompt_tokens == len(ids1)
    assert first == fresh(model, tokenizer, ids1, draft)
    held = list(session.cache.tokens)
    assert held == session.ids[: len(held)] and len(held) >= len(session.ids) - 1

    ids2 = session.turn_ids("Tell me a story")
    assert ids2[: len(session.ids)] == session.ids  # history as generated, not re-tokenized
    text = tokenizer.decode(ids2, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello")
    assert text.endswith("<|im_start|>user\nTell me a story<|im_end|>\n<|im_start|>assistant\n")

    second = [r.token for r in session.send("Tell me a story")]
    # Only what the cache did not hold is prefilled: at most the last answer token, the
    # template's end of turn and the new user turn.
    assert session.turns[-1].prompt_tokens == len(ids2) - len(held)
    assert session.turns[-1].prompt_tokens <= len(ids2) - len(ids1) - len(first) + 1
    # The same tokens as generating from the whole conversation on an empty cache.
    assert second == fresh(model, tokenizer, ids2, draft)


def test_interrupted_answer_stays_in_the_conversation(loaded):
    model, tokenizer, drafter = loaded
    session = ChatSession(model, tokenizer, drafter, max_tokens=40)
    ids1 = session.turn_ids("Tell me a story")
    stream = session.send("Tell me a story")
    shown = [next(stream) for _ in range(5)]
    stream.close()  # what Ctrl-C does
    partial = [r.token for r in shown]
    assert session.turns[-1].finish_reason == "interrupted"
    assert session.ids == ids1 + partial
    assert session.messages[-1] == {
        "role": "assistant",
        "content": "".join(r.text for r in shown),
    }
    ids2 = session.turn_ids("go on")
    assert ids2[: len(session.ids)] == session.ids
    second = [r.token for r in session.send("go on")]
    assert session.turns[-1].prompt_tokens <= len(ids2) - len(ids1)
    assert second == fresh(model, tokenizer, ids2, drafter, max_tokens=40)


def test_interrupt_inside_generation_keeps_cache_consistent(loaded):
    """A KeyboardInterrupt raised inside the decode loop (where Ctrl-C usually lands)."""
    model, tokenizer, drafter = loaded
    session = ChatSession(model, tokenizer, drafter, max_tokens=40)
    stream = session.send("hello world")
    got = []
    with pytest.raises(KeyboardInterrupt):
        for r in stream:
            got.append(r.token)
            if len(got) == 7:
                stream.throw(KeyboardInterrupt)
    assert session.turns[-1].finish_reason == "interrupted"
    assert session.cache.offset == len(session.cache.tokens) <= len(session.ids)
    assert session.cache.tokens == session.ids[: len(session.cache.tokens)]
    ids2 = session.turn_ids("go on")
    assert [r.token for r in session.send("go on")] == fresh(
        model, tokenizer, ids2, drafter, max_tokens=40
    )


def test_reset_forgets_the_conversation(loaded):
    model, tokenizer, _ = loaded
    session = ChatSession(model, tokenizer, max_tokens=6)
    ids1 = session.turn_ids("hello world")
    list(session.send("hello world"))
    list(session.send("more"))
    session.reset()
    assert session.ids == [] and session.turns == [] and session.cache.offset == 0
    assert session.turn_ids("hello world") == ids1
    list(session.send("hello world"))
    assert session.turns[-1].prompt_tokens == len(ids1)


def test_turn_that_overflows_the_context_keeps_the_conversation(loaded, monkeypatch):
    model, tokenizer, _ = loaded
    session = ChatSession(model, tokenizer, max_tokens=8, lookup=False)  # plain: 1 token of room
    list(session.send("hello world"))
    before = (list(session.ids), list(session.messages), len(session.turns))
    monkeypatch.setattr(model.args, "max_position_embeddings", len(session.ids) + 20)
    with pytest.raises(ContextFullError, match="/reset"):
        session.send("a much longer message that cannot fit in what is left of the context")
    assert (session.ids, session.messages, len(session.turns)) == before
    # A short turn still fits, with the answer capped to the room left.
    list(session.send("hi"))
    assert session.turns[-1].capped
    assert len(session.ids) <= model.context_length


# ---------------------------------------------------------------------------------------------
# The terminal UI


def test_piped_stdin(tiny, loaded):
    model_dir, drafter_dir = tiny
    model, tokenizer, drafter = loaded
    proc = run_cli(
        ["chat", "--model", str(model_dir), "--drafter", str(drafter_dir), "-n", "8"],
        env=cli_env(config_dir=model_dir.parent / "config"),
        input="hello world\n\n   \n/stats\nq\nnever sent\n",
    )
    assert proc.returncode == 0, proc.stderr
    session = ChatSession(model, tokenizer, drafter, max_tokens=8)
    expected = "".join(r.text for r in session.send("hello world"))
    # stdout has only the answer (no prompt, no header); notes and stats go to stderr.
    assert proc.stdout == expected + ("" if expected.endswith("\n") else "\n")
    assert "tokens/step" in proc.stderr
    assert "last answer: 8 tokens" in proc.stderr
    assert "1 turn," in proc.stderr
    assert ">>>" not in proc.stdout + proc.stderr


def test_stats_report_names_each_source(loaded):
    model, tokenizer, drafter = loaded
    text = "red green blue red green blue red green blue red green blue"
    both = ChatSession(model, tokenizer, drafter, max_tokens=24)
    list(both.send(text))
    report = stats_report(both)
    stats = both.turns[-1].stats
    assert "context lookup + ReDrafter W=" in report and "tokens/step" in report
    assert sum(stats.accepted_from.values()) == sum(stats.accepted)
    for source, n in stats.accepted_from.items():
        assert f"{source} {n}" in report
    alone = ChatSession(model, tokenizer, None, max_tokens=24)
    list(alone.send(text))
    assert "  context lookup: " in stats_report(alone) and "accepted by source:" in stats_report(
        alone
    )
    plain = ChatSession(model, tokenizer, None, max_tokens=8, lookup=False)
    list(plain.send(text))
    assert "tokens/step" not in stats_report(plain)


def test_bad_option_is_one_line(tiny):
    model_dir, _ = tiny
    proc = invoke(["chat", "--model", str(model_dir), "--temp", "-1"], input="")
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "temperature" in proc.stderr


STATS = re.compile(r"(\d+) tokens · [\d.]+ tok/s · [\d.]+ tokens/step · prompt (\d+) tokens")


def _default_sigint():
    # A suite started in the background (`cmd &` in a script) runs with SIGINT ignored, and
    # the child would inherit that: Python then never raises KeyboardInterrupt on Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn_chat(pexpect, tiny, max_tokens: int, *extra: str):
    model_dir, drafter_dir = tiny
    env = cli_env(config_dir=model_dir.parent / "config")
    env["TERM"] = "dumb"
    child = pexpect.spawn(
        sys.executable,
        [
            str(REPO_ROOT / "cli.py"),
            "chat",
            "--model",
            str(model_dir),
            "--drafter",
            str(drafter_dir),
            "-n",
            str(max_tokens),
            *extra,
        ],
        cwd=str(REPO_ROOT),
        env=env,
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 200),
        preexec_fn=_default_sigint,
    )
    child.expect(r"mlx-redrafter chat · ([^\r\n]*)")
    child.title = child.match.group(1)
    child.expect("Ctrl-D or /quit exits")
    child.expect_exact(">>> ")
    return child


def ask(child, text: str) -> tuple[int, int]:
    """Send a message; return (tokens, prompt tokens) from the stats line."""
    child.sendline(text)
    child.expect(STATS)
    n, prompt = int(child.match.group(1)), int(child.match.group(2))
    child.expect_exact(">>> ")
    return n, prompt


def test_terminal_turns_reset_and_ctrl_d(tiny, loaded):
    pexpect = pytest.importorskip("pexpect")
    model, tokenizer, drafter = loaded
    expected = ChatSession(model, tokenizer, drafter, max_tokens=10)
    list(expected.send("hello world"))
    ids2 = expected.turn_ids("Tell me a story")
    list(expected.send("Tell me a story"))

    child = spawn_chat(pexpect, tiny, 10)
    assert "ReDrafter W=" in child.title
    n1, p1 = ask(child, "hello world")
    assert (n1, p1) == (10, expected.turns[0].prompt_tokens)
    n2, p2 = ask(child, "Tell me a story")
    assert p2 == expected.turns[1].prompt_tokens < len(ids2) - p1

    child.sendline("/help")
    child.expect("partial answer stays")
    child.expect_exact(">>> ")
    child.sendline("/stats")
    child.expect(r"conversation: 2 turns, 20 tokens generated")
    child.expect_exact(">>> ")
    child.sendline("/bogus")
    child.expect("unknown command /bogus")
    child.expect_exact(">>> ")

    child.sendline("/reset")
    child.expect("new conversation")
    child.expect_exact(">>> ")
    assert ask(child, "hello world") == (n1, p1)  # the whole prompt again

    child.sendeof()  # Ctrl-D
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_terminal_ctrl_c_stops_the_answer_and_keeps_history(tiny):
    pexpect = pytest.importorskip("pexpect")
    # Without lookup the tiny model's repetitive answer is not copied ~5 tokens a round: at
    # ~1,300 tok/s a 3,000-token answer with lookup could finish before the Ctrl-C landed.
    child = spawn_chat(pexpect, tiny, 4000, "--no-lookup")
    child.sendline("Tell me a story")
    child.expect(r"Tell me a story\r?\n")  # the echo
    child.expect(r"[^\r\n]{30}")  # the answer is streaming
    child.sendintr()  # Ctrl-C
    child.expect_exact("[stopped; the partial answer stays in the conversation]")
    child.expect_exact(">>> ")
    child.sendline("/stats")
    child.expect(r"last answer: (\d+) tokens \(interrupted\)")
    shown = int(child.match.group(1))
    assert 0 < shown < 4000
    child.expect(r"conversation: 1 turn,")
    child.expect_exact(">>> ")

    # The next turn follows the partial answer: only a few tokens are prefilled.
    child.sendline("go on")
    child.expect(r"go on\r?\n")
    child.expect(r"[^\r\n]{30}")
    child.sendintr()
    child.expect_exact("[stopped")
    child.expect_exact(">>> ")
    child.sendline("/stats")
    child.expect(r"(\d+) prompt tokens prefilled")
    assert int(child.match.group(1)) < 20
    child.expect(r"conversation: 2 turns")
    child.expect_exact(">>> ")

    child.sendintr()  # Ctrl-C at the prompt: a new prompt, not an exit
    child.expect_exact("Ctrl-D or /quit exits")
    child.expect_exact(">>> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# ---------------------------------------------------------------------------------------------
# Multi-line messages: a """ block, a paste


class _RecordingSession:
    """What run_chat needs of a session, recording the messages it is sent."""

    drafter = None
    lookup = False
    lookup_max = None

    def __init__(self):
        self.sent, self.turns = [], []

    def send(self, text):
        self.sent.append(text)
        self.turns.append(types.SimpleNamespace(stats=None, capped=False, finish_reason="stop"))
        yield from ()


def test_a_triple_quoted_block_is_one_message():
    session = _RecordingSession()
    stdin = io.StringIO(
        'first\n"""\nline one\n\n  line two\n"""\n"""inline"""\n""" opens\ncloses """\nlast\n'
    )
    code = run_chat(session, stdin=stdin, stdout=io.StringIO(), stderr=io.StringIO())
    assert code == 0
    assert session.sent == ["first", "line one\n\n  line two", "inline", "opens\ncloses", "last"]


def test_an_unclosed_block_at_the_end_is_sent_and_bad_lines_are_named():
    session = _RecordingSession()
    err = io.StringIO()
    stdin = io.TextIOWrapper(io.BytesIO(b'ok\n"""\na\nb\n'), encoding="utf-8")
    run_chat(session, stdin=stdin, stdout=io.StringIO(), stderr=err)
    assert session.sent == ["ok", "a\nb"]
    session = _RecordingSession()
    stdin = io.TextIOWrapper(io.BytesIO(b'"""\na\n\xff\nb\n"""\nnext\n'), encoding="utf-8")
    run_chat(session, stdin=stdin, stdout=io.StringIO(), stderr=err)
    assert "input line 3 is not UTF-8" in err.getvalue()  # counted across the block's lines
    assert session.sent[-1] == "next"


def test_waiting_input_is_the_rest_of_a_paste(monkeypatch):
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd) as reader, os.fdopen(write_fd, "w") as writer:
        assert not chat_input._waiting(reader)  # nothing typed yet
        writer.write("second line\n")
        writer.flush()
        assert chat_input._waiting(reader)
    # On a terminal, lines that are already waiting join the first into one message.
    typed = ["line one", "line two", "line three"]
    monkeypatch.setattr("builtins.input", lambda prompt="": typed.pop(0))
    monkeypatch.setattr(chat_input, "_waiting", lambda stdin: bool(typed))
    assert chat_input.read_message(True, sys.stdin, 1) == ("line one\nline two\nline three", 3)


def test_terminal_paste_of_several_lines_is_one_turn(tiny):
    pexpect = pytest.importorskip("pexpect")
    child = spawn_chat(pexpect, tiny, 4)
    child.send("Summarise this:\nthe first line\nthe second line\n")  # one paste
    child.expect(STATS)
    child.expect_exact(">>> ")
    child.sendline("/stats")
    child.expect(r"conversation: 1 turn,")
    child.expect_exact(">>> ")
    child.sendline('"""')
    child.expect_exact("... ")
    child.sendline("a block")
    child.expect_exact("... ")
    child.sendline('"""')
    child.expect(STATS)
    child.expect_exact(">>> ")
    child.sendline("/stats")
    child.expect(r"conversation: 2 turns,")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_earlier_conversations_feed_lookup_and_output_is_unchanged(loaded):
    from mlx_redrafter.lookup_memory import LookupMemory

    model, tokenizer, drafter = loaded
    memory = LookupMemory(max_clients=1)
    session = ChatSession(model, tokenizer, drafter, max_tokens=24, lookup_memory=memory)
    ids = session.turn_ids("Tell me a story about a cat and a hat")
    first = [r.token for r in session.send("Tell me a story about a cat and a hat")]
    assert first == fresh(model, tokenizer, ids, drafter, max_tokens=24)
    session.reset()  # a new conversation: the old one stays in the memory
    again = list(session.send("Tell me a story about a cat and a hat"))
    assert [r.token for r in again] == first
    assert again[-1].stats.accepted_from.get("memory", 0) > 0
    assert memory.client(None).documents[0][: len(ids)] == ids


def test_lookup_history_file(tiny, tmp_path):
    model_dir, drafter_dir = tiny
    env = cli_env()
    env["MLX_REDRAFTER_HOME"] = str(tmp_path / "home")
    args = ["chat", "--model", str(model_dir), "--drafter", str(drafter_dir), "-n", "8"]
    proc = run_cli([*args, "--lookup-history"], env=env, input="hello world\n")
    assert proc.returncode == 0, proc.stderr
    saved = tmp_path / "home" / "lookup-history" / f"{model_dir.name}.json"
    documents = __import__("json").loads(saved.read_text())["documents"]
    assert len(documents) == 1 and len(documents[0]) > 8
    proc = run_cli(args, env=env, input="hello again\n")  # off by default: the file stays
    assert proc.returncode == 0 and saved.stat().st_size > 0
    assert __import__("json").loads(saved.read_text())["documents"] == documents


def test_a_session_with_a_plan_answers_as_one_with_keywords_and_reads_no_store(loaded, monkeypatch):
    from mlx_redrafter import defaults
    from mlx_redrafter.errors import GenerationError
    from mlx_redrafter.plan import DecodePlan

    model, tokenizer, drafter = loaded
    plan = DecodePlan.resolve(model, beam_width=2, beam_length=3)
    keywords = ChatSession(model, tokenizer, drafter, max_tokens=10, beam_width=2, beam_length=3)
    want = [r.token for r in keywords.send("Hello there")]

    def no_store(*args, **kwargs):
        raise AssertionError("the decode path read tuned.json")

    monkeypatch.setattr(defaults, "_entry", no_store)
    session = ChatSession(model, tokenizer, drafter, max_tokens=10, plan=plan)
    assert (session.beam_width, session.beam_length) == (2, 3)
    assert [r.token for r in session.send("Hello there")] == want
    with pytest.raises(GenerationError, match="plan= or"):
        ChatSession(model, tokenizer, drafter, plan=plan, lookup=False)
