"""Tests of runtime/serve/textstream.py with the built-in byte-level BPE tokenizer, both as a
`tokenizers.Tokenizer` and as a transformers fast tokenizer: streamed text equals the full
decode, incomplete characters and stop strings are held back, eos and stop finish the stream."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
from transformers import AutoTokenizer

from runtime.model.assets import builtin_model_dir
from runtime.serve.textstream import Decoder, TextStream

ROOT = Path(__file__).resolve().parents[3]
EOS = 0  # <|endoftext|>, the built-in tokenizer's only special token
PIECES = ["the", " king", ",", " ", "\n", "é", "ü", "日本", "語", "🎉", "👍🏽", "∑", "a", "Z", "!?"]


class _Both:
    """What the tests need of either tokenizer: encode to ids, decode without special tokens."""

    def __init__(self, name: str) -> None:
        path = builtin_model_dir()
        if name == "tokenizers":
            raw = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
            self.decoder: Decoder = raw
            self._encode = lambda text: raw.encode(text).ids
        else:
            fast = AutoTokenizer.from_pretrained(path)
            self.decoder = fast
            self._encode = lambda text: fast.encode(text, add_special_tokens=False)
        self.vocab_size = 4096

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.decoder.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module", params=["tokenizers", "transformers"])
def tok(request: pytest.FixtureRequest) -> _Both:
    return _Both(request.param)


def _stream(
    tok: _Both, ids: list[int], stop: tuple[str, ...] = (), eos: tuple[int, ...] = ()
) -> tuple[TextStream, list[str]]:
    """Push ids one at a time until the stream finishes; return it and the deltas."""
    stream = TextStream(tok.decoder, stop=stop, eos_token_ids=eos)
    deltas = []
    for token_id in ids:
        deltas.append(stream.push(token_id))
        if stream.finished:
            break
    return stream, deltas


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 40)))


# --------------------------------------------------------------------------- plain streaming


def test_deltas_and_flush_concatenate_to_the_full_decode(tok: _Both) -> None:
    rng = random.Random(0)
    for _ in range(60):
        text = _random_text(rng)
        ids = tok.encode(text)
        stream, deltas = _stream(tok, ids)
        assert tok.decode(ids) == text
        assert stream.text == text
        assert not any("\ufffd" in d for d in deltas)
        assert "".join(deltas) + stream.flush() == text
        assert stream.finished is None
        assert stream.token_ids == ids


def test_random_ids_stream_to_the_full_decode_even_with_invalid_utf8(tok: _Both) -> None:
    """Arbitrary ids (lone UTF-8 bytes, the special token) still concatenate to decode(ids),
    and what was sent after each push is a prefix of the text decoded so far."""
    rng = random.Random(1)
    for _ in range(60):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 30))]
        stream = TextStream(tok.decoder)
        sent = ""
        for i, token_id in enumerate(ids, start=1):
            sent += stream.push(token_id)
            assert tok.decode(ids[:i]).startswith(sent)
            assert stream.text == tok.decode(ids[:i])
        assert sent + stream.flush() == tok.decode(ids)


def test_an_incomplete_character_is_held_until_it_completes(tok: _Both) -> None:
    ids = tok.encode("a日🎉")
    assert len(ids) == 8  # 'a', three byte tokens for 日, four for 🎉
    stream = TextStream(tok.decoder)
    assert [stream.push(i) for i in ids] == ["a", "", "", "日", "", "", "", "🎉"]


def test_flush_sends_an_unfinished_character_as_the_full_decode_does(tok: _Both) -> None:
    ids = tok.encode("ok 日")[:-1]
    stream, deltas = _stream(tok, ids)
    assert "".join(deltas) == "ok "
    assert stream.text == tok.decode(ids) == "ok \ufffd"
    assert stream.flush() == "\ufffd"
    assert stream.flush() == ""
    with pytest.raises(RuntimeError, match="flushed"):
        stream.push(ids[0])


# --------------------------------------------------------------------------- stop strings


@pytest.mark.parametrize(
    ("text", "stop"),
    [
        ("To be, or not to be: that is the question. Whether 'tis nobler", "the question"),
        ("The land of 日本 and 語 here", "日本 and"),
        ("party 🎉🎉 time", "🎉🎉"),
        ("no line\nbreak\n\nhere", "\n\n"),
    ],
)
def test_a_stop_string_spanning_tokens_is_never_sent(tok: _Both, text: str, stop: str) -> None:
    assert len(tok.encode(stop)) >= 2
    ids = tok.encode(text)
    expected = text[: text.index(stop)]
    stream = TextStream(tok.decoder, stop=[stop, "never appears"])
    sent = ""
    for token_id in ids:
        sent += stream.push(token_id)
        assert expected.startswith(sent)
        if stream.finished:
            break
    assert stream.finished == "stop"
    assert sent == stream.text == expected
    assert stream.flush() == ""
    assert stop in tok.decode(stream.token_ids)  # stopped at the id that completed it
    assert stop not in tok.decode(stream.token_ids[:-1])
    with pytest.raises(RuntimeError, match="stop"):
        stream.push(ids[-1])


def test_a_stop_string_in_the_first_token_sends_nothing(tok: _Both) -> None:
    ids = tok.encode("Hello world")
    stream = TextStream(tok.decoder, stop=["H"])
    assert stream.push(ids[0]) == ""
    assert stream.finished == "stop"
    assert stream.text == ""
    assert stream.token_ids == ids[:1]


def test_the_stop_string_that_appears_first_wins(tok: _Both) -> None:
    stream, deltas = _stream(tok, tok.encode("hello world"), stop=("world", "lo w"))
    assert stream.finished == "stop"
    assert "".join(deltas) == stream.text == "hel"


def test_a_possible_stop_start_is_held_then_released(tok: _Both) -> None:
    stop = ("xyz",)
    stream, deltas = _stream(tok, tok.encode("abc x"), stop=stop)
    assert "".join(deltas) == "abc "  # 'x' may start "xyz"
    assert stream.text == "abc x"
    assert stream.flush() == "x"
    assert stream.finished is None
    stream, deltas = _stream(tok, tok.encode("abc xy!"), stop=stop)
    assert "".join(deltas) == "abc xy!"


def test_an_overlapping_stop_prefix_releases_what_cannot_start_it(tok: _Both) -> None:
    stream = TextStream(tok.decoder, stop=["aab"])
    sent = "".join(stream.push(i) for i in tok.encode("aaa"))
    assert sent == "a"  # the last "aa" may still become "aab"
    assert stream.push(tok.encode("b")[0]) == ""
    assert stream.finished == "stop"
    assert stream.text == "a"


def test_empty_stop_strings_are_refused(tok: _Both) -> None:
    with pytest.raises(ValueError, match="empty"):
        TextStream(tok.decoder, stop=["ok", ""])


# --------------------------------------------------------------------------- eos


def test_eos_finishes_and_sends_everything_held_back(tok: _Both) -> None:
    ids = tok.encode("héllo")
    stream = TextStream(tok.decoder, stop=["llo!"], eos_token_ids={EOS})
    sent = "".join(stream.push(i) for i in ids)
    assert sent == "hé"  # "llo" may still become "llo!"
    assert stream.push(EOS) == "llo"
    assert stream.finished == "eos"
    assert stream.text == "héllo"
    assert stream.token_ids == [*ids, EOS]
    assert stream.flush() == ""
    with pytest.raises(RuntimeError, match="eos"):
        stream.push(ids[0])


def test_eos_as_the_first_token_gives_empty_text(tok: _Both) -> None:
    stream = TextStream(tok.decoder, eos_token_ids=[EOS, 5])
    assert stream.push(5) == ""
    assert stream.finished == "eos"
    assert stream.text == ""
    assert stream.token_ids == [5]


def test_eos_ids_are_ordinary_text_unless_named(tok: _Both) -> None:
    stream, deltas = _stream(tok, [*tok.encode("hi"), EOS, *tok.encode(" there")])
    assert stream.finished is None
    assert "".join(deltas) + stream.flush() == "hi there"


# --------------------------------------------------------------------------- cost, layering


class _CountingDecoder:
    def __init__(self, inner: Decoder) -> None:
        self.inner = inner
        self.lengths: list[int] = []

    def decode(self, ids: list[int], /, skip_special_tokens: bool = True) -> str:
        self.lengths.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_each_push_decodes_a_short_window(tok: _Both) -> None:
    rng = random.Random(2)
    text = "".join(_random_text(rng) for _ in range(40))
    ids = tok.encode(text)
    assert len(ids) > 500
    counting = _CountingDecoder(tok.decoder)
    stream = TextStream(counting, stop=["never"])
    sent = "".join(stream.push(i) for i in ids) + stream.flush()
    assert sent == text
    assert max(counting.lengths) <= 8
    assert len(counting.lengths) <= 2 * len(ids) + 1


def test_textstream_imports_without_torch() -> None:
    code = "import sys, runtime.serve.textstream; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
