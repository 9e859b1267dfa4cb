"""`adamba chat`: an imported nanochat chat checkpoint (random weights, nanochat's files and tokenizer) answers a
one-shot prompt from exactly nanochat's rendering; the REPL driven through a real terminal (a pty)."""

import os
import pty
import select
import subprocess
import sys
import time

import pytest
from test_chat_render import nanochat_tokenizer, reference
from test_nanochat import MODEL_CONFIG, random_state, write_nanochat

from adamba.chat.session import ChatSession
from adamba.checkpoint import load_checkpoint, run_dir
from adamba.cli import main

CHAT_CONFIG = {**MODEL_CONFIG, "sequence_len": 128}


@pytest.fixture
def imported(tmp_path, capsys):
    """`adamba import nanochat` of a nanochat-format chat checkpoint: its weights, its tokenizer.pkl."""
    tokenizer = nanochat_tokenizer(tmp_path)
    folder = write_nanochat(tmp_path / "chatsft_checkpoints" / "d2", random_state(CHAT_CONFIG, seed=7), step=9,
                            model_config=CHAT_CONFIG, tokenizer=tokenizer)
    assert main(["import", "nanochat", str(folder), "--tag", "ncchat"]) == 0
    capsys.readouterr()
    return tokenizer


def test_an_imported_nanochat_model_chats_from_nanochats_rendering(imported, capsys):
    ckpt = load_checkpoint(run_dir("ncchat"))
    session = ChatSession(ckpt.model, ckpt.tokenizer, seed=0)
    session.system = "Be brief."
    prompt, dropped = session.prompt("What is 2+2?")
    conversation = {"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "What is 2+2?"}]}
    assert dropped == 0
    assert prompt == reference(imported.enc, conversation)[0] + [imported.special_id("<|assistant_start|>")]

    assert main(["chat", "ncchat", "-p", "What is 2+2?", "--seed", "0", "--max-tokens", "12", "--device",
                 "cpu"]) == 0
    out = capsys.readouterr()
    assert "error" not in out.err.lower() and out.out.strip()
    # the same reply through the session, token for token (the CLI adds nothing of its own but tool notes)
    again = ChatSession(ckpt.model, ckpt.tokenizer, seed=0, max_new_tokens=12)
    text = "".join(e.text for e in again.reply("What is 2+2?") if e.kind == "text")
    assert text.strip() in out.out
    greedy = ["chat", "ncchat", "-p", "What is 2+2?", "--temperature", "0", "--max-tokens", "12", "--device", "cpu"]
    assert main(greedy) == 0
    plain = capsys.readouterr().out
    assert main([*greedy, "--speculative", "exit:1", "--draft-tokens", "3"]) == 0  # verified: the same reply
    assert capsys.readouterr().out == plain

    assert main(["eval", "chat", "ncchat", "--tasks", "arithmetic,arc-easy", "--items", "3", "--modes", "full",
                 "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "| arithmetic |" in table and "| arc-easy |" in table and "ChatCORE" in table


def test_history_is_trimmed_with_a_notice_not_a_crash(imported):
    ckpt = load_checkpoint(run_dir("ncchat"))
    session = ChatSession(ckpt.model, ckpt.tokenizer, seed=0, max_new_tokens=8)
    notices = []
    for turn in range(12):
        notices += [e.text for e in session.reply(f"message number {turn} with some words in it") if
                    e.kind == "notice" and "trimmed" in e.text]
        prompt, _ = session.prompt("next")
        assert len(prompt) <= ckpt.model.config.sequence_len
    assert notices, "a 128-token context cannot hold 12 exchanges: the oldest must be dropped, with a notice"
    with pytest.raises(ValueError, match="the message is too long"):
        session.prompt("word " * 200)


def read_until(fd: int, marker: str, seen: list[str], timeout: float = 60.0) -> str:
    """Read the terminal until `marker` appears (bounded: fails after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while marker not in "".join(seen):
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} within {timeout}s; the terminal showed:\n{''.join(seen)}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                seen.append(os.read(fd, 4096).decode(errors="replace"))
            except OSError:  # the child closed the terminal
                break
    text = "".join(seen)
    seen.clear()
    return text


def test_the_repl_in_a_terminal(imported):
    primary, secondary = pty.openpty()
    child = subprocess.Popen([sys.executable, "-m", "adamba.cli", "chat", "ncchat", "--seed", "1", "--max-tokens",
                              "6", "--device", "cpu"], stdin=secondary, stdout=secondary, stderr=secondary,
                             env={**os.environ, "TQDM_DISABLE": "1"}, close_fds=True)
    os.close(secondary)
    seen: list[str] = []
    try:
        assert "/mode M, /clear" in read_until(primary, "> ", seen)
        os.write(primary, b"hello there\n")
        read_until(primary, "> ", seen)
        os.write(primary, b"/mode 32\n")
        assert "mode: widths" in read_until(primary, "> ", seen)
        os.write(primary, b"/mode nonsense\n")
        assert "error:" in read_until(primary, "> ", seen)
        os.write(primary, b"/system Be brief.\n")
        assert "system message set" in read_until(primary, "> ", seen)
        os.write(primary, b"/clear\n")
        assert "history cleared" in read_until(primary, "> ", seen)
        os.write(primary, b"/quit\n")
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:
            child.kill()
        os.close(primary)


def test_chat_refuses_a_checkpoint_without_a_tokenizer(tmp_path, capsys):
    write_nanochat(tmp_path / "bare", random_state(CHAT_CONFIG, seed=1), step=1, model_config=CHAT_CONFIG)
    assert main(["import", "nanochat", str(tmp_path / "bare"), "--tag", "bare"]) == 0
    assert main(["chat", "bare", "-p", "hi", "--device", "cpu"]) == 2
    assert "has no tokenizer.pkl" in capsys.readouterr().err
