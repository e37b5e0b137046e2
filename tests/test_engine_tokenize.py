"""engine.tokenize: the loss lands on assistant tokens (with their closing token) and nowhere else."""

from __future__ import annotations

import pytest

from engine.dataset import prepare_dataset, split_sizes
from engine.errors import DatasetInvalid
from engine.formats import Example
from engine.tokenize import IGNORE_INDEX, cut_chars, render_with_spans, tokenize_examples


@pytest.fixture(scope="module")
def tokenizer(tiny_hero_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_hero_dir)


def learnt_text(tokenizer, example) -> str:
    """The decoded tokens that carry loss (targets are shifted: position t predicts token t + 1)."""
    ids = [example.input_ids[t + 1] for t, target in enumerate(example.targets) if target != IGNORE_INDEX]
    return tokenizer.decode(ids)


def messages(*pairs) -> Example:
    return Example("messages", 1, messages=tuple(pairs))


def test_messages_multi_turn_with_system_learns_only_assistant_turns_and_their_end(tokenizer):
    example = messages(
        ("system", "Be brief."),
        ("user", "Two plus two?"),
        ("assistant", "Four."),
        ("user", "And three plus three?"),
        ("assistant", "Six."),
    )
    out = tokenize_examples([example], tokenizer, max_length=256)
    assert out.num_truncated == out.num_dropped == 0
    (tokenized,) = out.examples
    assert learnt_text(tokenizer, tokenized) == "Four.<|im_end|>Six.<|im_end|>"
    # Every target is the next input id, and the last position never has one.
    for t, target in enumerate(tokenized.targets[:-1]):
        assert target in (IGNORE_INDEX, tokenized.input_ids[t + 1])
    assert tokenized.targets[-1] == IGNORE_INDEX


def test_prompt_response_is_a_user_turn_and_an_assistant_turn(tokenizer):
    example = Example("prompt_response", 3, prompt="Name a colour.", response="Blue.")
    (tokenized,) = tokenize_examples([example], tokenizer, max_length=256).examples
    assert learnt_text(tokenizer, tokenized) == "Blue.<|im_end|>"
    assert tokenizer.decode(tokenized.input_ids).startswith("<|im_start|>user\nName a colour.<|im_end|>")
    assert tokenized.line == 3


def test_text_learns_every_token_and_ends_with_eos(tokenizer):
    (tokenized,) = tokenize_examples([Example("text", 1, text="the harbor and the lantern")], tokenizer, 256).examples
    assert tokenized.input_ids[-1] == tokenizer.eos_token_id
    assert tokenized.targets[:-1] == tokenized.input_ids[1:]
    assert tokenized.targets[-1] == IGNORE_INDEX


def test_truncation_is_counted_and_keeps_the_example(tokenizer):
    long_answer = messages(("user", "Say a lot."), ("assistant", "word " * 200))
    short = messages(("user", "Hi"), ("assistant", "Hello."))
    out = tokenize_examples([long_answer, short], tokenizer, max_length=32)
    assert out.num_truncated == 1 and out.num_dropped == 0
    assert [len(e) for e in out.examples][0] == 32 and out.examples[0].truncated
    assert not out.examples[1].truncated


def test_example_whose_assistant_tokens_all_fall_beyond_max_length_is_dropped(tokenizer):
    long_prompt = messages(("user", "context " * 100), ("assistant", "Short."))
    short = messages(("user", "Hi"), ("assistant", "Hello."))
    out = tokenize_examples([long_prompt, short], tokenizer, max_length=32)
    assert out.num_dropped == 1 and out.num_truncated == 0
    assert len(out.examples) == 1 and learnt_text(tokenizer, out.examples[0]) == "Hello.<|im_end|>"


def test_every_example_dropped_is_dataset_invalid(tokenizer):
    long_prompt = messages(("user", "context " * 100), ("assistant", "Short."))
    with pytest.raises(DatasetInvalid, match="max_length=16"):
        prepare_dataset(
            [long_prompt] * 3, tokenizer, max_length=16, packing=True, eval_fraction=0.1, eval_max_examples=10, seed=0
        )


def test_spans_follow_any_prefix_stable_template(tokenizer):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    other.chat_template = (
        "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
        "{% if add_generation_prompt %}### assistant: {% endif %}"
    )
    conversation = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]
    text, spans = render_with_spans(conversation, other)
    assert [text[s:e] for s, e in spans] == ["A1", "A2"]


def test_validation_split_sizes():
    assert split_sizes(1, 0.5, 10) == 0
    assert split_sizes(2, 0.01, 10) == 1
    assert split_sizes(100, 0.05, 10) == 5
    assert split_sizes(10_000, 0.05, 200) == 200
    assert split_sizes(100, 0.0, 10) == 0


def test_split_is_deterministic_by_seed(tokenizer):
    examples = [messages(("user", f"Question {i}"), ("assistant", f"Answer {i}")) for i in range(20)]

    def val_ids(seed):
        data = prepare_dataset(
            examples, tokenizer, max_length=64, packing=True, eval_fraction=0.2, eval_max_examples=10, seed=seed
        )
        return [e.input_ids for e in data.val]

    assert len(val_ids(1)) == 4
    assert val_ids(1) == val_ids(1)
    assert val_ids(1) != val_ids(2)


# ------------------------------------------------------------------------------------------- bounded work


@pytest.fixture
def encoded_lengths(monkeypatch):
    """The length in characters of every text handed to the Rust tokenizer."""
    from engine.chat_tokenizer import ChatTokenizer

    seen: list[int] = []
    real = ChatTokenizer.encode_batch

    def spy(self, texts, add_special_tokens):
        seen.extend(len(t) for t in texts)
        return real(self, texts, add_special_tokens)

    monkeypatch.setattr(ChatTokenizer, "encode_batch", spy)
    return seen


def test_a_multi_megabyte_line_tokenises_only_what_max_length_can_use(tokenizer, encoded_lengths):
    huge = messages(("user", "Summarise."), ("assistant", "the harbor and the lantern " * 150_000))  # 4 MB
    short = messages(("user", "Hi"), ("assistant", "Hello."))
    out = tokenize_examples([huge, short], tokenizer, max_length=64)
    assert len(huge.messages[1][1]) > 4_000_000
    assert [len(e) for e in out.examples] == [64, len(out.examples[1])] and out.examples[0].truncated
    assert out.num_truncated == 1 and out.num_dropped == 0 and not out.tokens_cut_exact
    assert max(encoded_lengths) <= cut_chars(64)
    # The estimate of what was cut is of the right size: the whole text makes about 0.6 million tokens.
    assert 300_000 < out.num_tokens_cut < 1_500_000


@pytest.mark.parametrize("chars_per_token", [12, 1])
def test_a_cut_text_keeps_exactly_the_tokens_of_the_whole_text(tokenizer, encoded_lengths, monkeypatch,
                                                               chars_per_token):
    """At 1 character a token the first cut is too short for prose, which is cut longer and tokenised again."""
    import engine.tokenize

    prose = messages(("user", "Go on."), ("assistant", "the harbor and the lantern, said the keeper. " * 400))
    runs = Example("text", 2, text="=" * 20_000 + " and " + "\n" * 20_000)
    max_length = 48
    whole = {e.line: tokenize_examples([e], tokenizer, 100_000).examples[0] for e in (prose, runs)}
    monkeypatch.setattr(engine.tokenize, "_CHARS_PER_TOKEN", chars_per_token)
    monkeypatch.setattr(engine.tokenize, "_MIN_CUT_CHARS", 0)
    encoded_lengths.clear()
    for example in (prose, runs):
        (cut,) = tokenize_examples([example], tokenizer, max_length).examples
        assert cut.input_ids == whole[example.line].input_ids[:max_length]
        assert cut.targets[:-1] == whole[example.line].targets[: max_length - 1] and cut.truncated
    first_cut = cut_chars(max_length)
    if chars_per_token == 12:
        assert len(encoded_lengths) == 2 and max(encoded_lengths) <= first_cut
    else:
        # The prose (about 3 characters a token) is cut again 4 times longer; the run of "=" is 1 a token already.
        assert first_cut == max_length + 64 and encoded_lengths == [111, 443, 112]


def test_tokens_cut_are_counted_exactly_when_every_text_is_tokenised_whole(tokenizer):
    long_reply = messages(("user", "Say a lot."), ("assistant", "word " * 200))
    long_prompt = messages(("user", "context " * 100), ("assistant", "Short."))
    short = messages(("user", "Hi"), ("assistant", "Hello."))
    lengths = [len(tokenize_examples([e], tokenizer, 10_000).examples[0]) for e in (long_reply, long_prompt)]
    out = tokenize_examples([long_reply, long_prompt, short], tokenizer, max_length=32)
    assert (out.num_truncated, out.num_dropped) == (1, 1) and out.tokens_cut_exact
    assert out.num_tokens_cut == sum(n - 32 for n in lengths) and out.longest == max(lengths)


def test_a_text_example_cut_at_max_length_gets_no_end_token(tokenizer):
    (out,) = tokenize_examples([Example("text", 1, text="lantern " * 5_000)], tokenizer, 16).examples
    assert len(out) == 16 and out.truncated and tokenizer.eos_token_id not in out.input_ids
