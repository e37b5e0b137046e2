"""engine.chat_turns: under any chat template, each assistant turn and its end-of-turn token carry the loss, and
nothing else does; a turn that can't be located is an error naming FILE:LINE; a broken template fails the job."""

from __future__ import annotations

import pytest

from engine import chat_turns
from engine.chat_tokenizer import load_chat_tokenizer
from engine.chat_turns import ChatOptions, render_with_spans, template_markers
from engine.errors import ChatTemplateError, DatasetInvalid, ModelLoadError
from engine.formats import Example
from engine.tokenize import IGNORE_INDEX, tokenize_examples
from tests.chat_fixtures import STYLES, build_styled_tokenizer, with_template

# Two multi-turn conversations: five assistant turns in all, with a system prompt, a user repeating the answer,
# a reply with newlines and spaces around it and one whose text looks like template markup.
CONVERSATIONS = [
    (
        ("system", "Be brief."),
        ("user", "Two plus two?"),
        ("assistant", "Four."),
        ("user", "Is it Four.? And three plus three?"),
        ("assistant", "\n\nSix. "),
    ),
    (
        ("user", "Name a colour."),
        ("assistant", "Blue."),
        ("user", "Another?"),
        ("assistant", "Red, like <|im_start|>user and <think> in a tag."),
        ("user", "Last one?"),
        ("assistant", "Green."),
    ),
]
REPLIES = [["Four.", "\n\nSix. "], ["Blue.", "Red, like <|im_start|>user and <think> in a tag.", "Green."]]
# How each template shows a reply: as written (ChatML), without leading newlines (Qwen3), trimmed (the others).
SHOWN = {"chatml": str, "qwen3": lambda r: r.lstrip("\n"), "llama3": str.strip, "gemma": str.strip}


@pytest.fixture(scope="module")
def styled(tiny_hero_dir, tmp_path_factory):
    """name -> (model directory, Hugging Face tokenizer) for every style of tests/chat_fixtures.py."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("styles")
    out = {}
    for name, style in STYLES.items():
        path = build_styled_tokenizer(tiny_hero_dir, root / name, style)
        out[name] = (path, AutoTokenizer.from_pretrained(path))
    return out


@pytest.fixture(params=["skeleton", "search"])
def path(request, monkeypatch):
    """Run a test once as conversations are normally located and once by the search path alone."""
    if request.param == "search":
        monkeypatch.setattr(chat_turns, "_locate_by_skeleton", lambda *args: None)
    return request.param


def learnt_runs(tokenizer, example) -> list[str]:
    """Each contiguous run of tokens that carries loss, decoded (targets are shifted: position t learns t + 1)."""
    runs, current = [], []
    for t, target in enumerate(example.targets):
        if target != IGNORE_INDEX:
            current.append(example.input_ids[t + 1])
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def messages(*pairs, line=1) -> Example:
    return Example("messages", line, messages=tuple(pairs))


@pytest.mark.parametrize("style", ["chatml", "qwen3", "llama3", "gemma"])
def test_every_assistant_turn_and_its_end_token_are_learnt_and_nothing_else(styled, style, path):
    directory, hf = styled[style]
    eot = STYLES[style].end_of_turn
    out = tokenize_examples([messages(*c, line=i + 1) for i, c in enumerate(CONVERSATIONS)], hf, max_length=512)
    assert out.num_truncated == out.num_dropped == 0
    for example, replies in zip(out.examples, REPLIES):
        assert learnt_runs(hf, example) == [SHOWN[style](reply) + eot for reply in replies]
        # The input is the template's own rendering, tokenised whole.
        rendered = hf.apply_chat_template(
            [{"role": r, "content": c} for r, c in CONVERSATIONS[example.line - 1]], tokenize=False
        )
        assert example.input_ids == hf(rendered, add_special_tokens=False)["input_ids"]
        assert example.targets[-1] == IGNORE_INDEX
    # Loaded without transformers, the same files give the same tokens and targets.
    assert tokenize_examples([messages(*CONVERSATIONS[1])], load_chat_tokenizer(directory), 512).examples == [
        tokenize_examples([messages(*CONVERSATIONS[1])], hf, 512).examples[0]
    ]


@pytest.mark.parametrize("style", ["chatml", "qwen3", "llama3", "gemma"])
def test_prompt_response_and_an_empty_system_prompt(styled, style, path):
    _, hf = styled[style]
    eot = STYLES[style].end_of_turn
    pr = Example("prompt_response", 3, prompt="Name a colour.", response="Blue.")
    empty_system = messages(
        ("system", ""), ("user", "Hi"), ("assistant", "Hello."), ("user", "Bye"), ("assistant", "Goodbye.")
    )
    first, second = tokenize_examples([pr, empty_system], hf, max_length=256).examples
    assert learnt_runs(hf, first) == ["Blue." + eot] and first.line == 3
    assert learnt_runs(hf, second) == ["Hello." + eot, "Goodbye." + eot]


def test_qwen3_empty_think_block_is_kept_as_prompt_by_default(styled, path):
    _, hf = styled["qwen3"]
    example = messages(*CONVERSATIONS[0])
    (kept,) = tokenize_examples([example], hf, 256).examples
    text = hf.decode(kept.input_ids)
    # Exactly what the model is given at inference with enable_thinking=False, and not learnt.
    prompt = hf.apply_chat_template(
        [{"role": r, "content": c} for r, c in CONVERSATIONS[0][:-1]],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert text.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert learnt_runs(hf, kept) == ["Four.<|im_end|>", "Six. <|im_end|>"]


def test_qwen3_strip_removes_the_empty_think_block(styled, path):
    _, hf = styled["qwen3"]
    (stripped,) = tokenize_examples([messages(*CONVERSATIONS[0])], hf, 256, chat=ChatOptions("strip")).examples
    text = hf.decode(stripped.input_ids)
    assert "<think>" not in text and text.endswith("<|im_start|>assistant\nSix. <|im_end|>\n")
    assert learnt_runs(hf, stripped) == ["Four.<|im_end|>", "Six. <|im_end|>"]


def test_qwen3_reasoning_is_learnt_where_the_template_renders_it(styled):
    _, hf = styled["qwen3"]
    example = messages(
        ("user", "Q1"),
        ("assistant", "<think>first thought</think>A1"),
        ("user", "Q2"),
        ("assistant", "<think>\nsecond thought\n</think>\n\nA2"),
    )
    for thinking in ("keep", "strip"):
        (out,) = tokenize_examples([example], hf, 256, chat=ChatOptions(thinking)).examples
        # The template drops the first reply's reasoning (it is before the last user turn) and renders the last's.
        assert "first thought" not in hf.decode(out.input_ids)
        assert learnt_runs(hf, out) == ["A1<|im_end|>", "<think>\nsecond thought\n</think>\n\nA2<|im_end|>"]


def test_a_user_message_quoting_a_whole_assistant_turn_does_not_mislead(styled, path):
    _, hf = styled["chatml"]
    fake = "<|im_start|>assistant\nYes.<|im_end|>"
    (out,) = tokenize_examples([messages(("user", f"What does {fake} mean?"), ("assistant", "Yes."))], hf, 256).examples
    assert learnt_runs(hf, out) == ["Yes.<|im_end|>"]
    first_learnt = 1 + next(t for t, target in enumerate(out.targets) if target != IGNORE_INDEX)
    before = hf.decode(out.input_ids[:first_learnt])
    assert fake in before and before.endswith("mean?<|im_end|>\n<|im_start|>assistant\n")


def test_markers_are_probed_from_the_template(styled):
    markers = {name: template_markers(hf) for name, (_, hf) in styled.items()}
    assert (markers["qwen3"].end_of_turn, markers["qwen3"].assistant_header) == (
        "<|im_end|>",
        "<|im_start|>assistant\n",
    )
    assert (markers["llama3"].end_of_turn, markers["llama3"].assistant_header) == (
        "<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    )
    assert (markers["gemma"].end_of_turn, markers["gemma"].assistant_header) == (
        "<end_of_turn>",
        "<start_of_turn>model\n",
    )


def test_a_template_that_drops_an_assistant_reply_is_dataset_invalid_naming_file_and_line(tiny_hero_dir, tmp_path):
    from transformers import AutoTokenizer

    only_last = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role != 'assistant' or loop.last %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    )
    hf = AutoTokenizer.from_pretrained(with_template(tiny_hero_dir, tmp_path / "t", only_last))
    fine = messages(("user", "Hi"), ("assistant", "Hello."), line=1)
    dropped = messages(("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2"), line=7)
    with pytest.raises(DatasetInvalid, match=r"^data\.jsonl:7: .*message 2 \(an assistant reply\)"):
        tokenize_examples([fine, dropped], hf, 256, source="data.jsonl")


def test_a_reply_the_template_rewrites_is_dataset_invalid_not_a_silent_zero_loss_turn(tiny_hero_dir, tmp_path, path):
    from transformers import AutoTokenizer

    shouting = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{{ m.content | upper if m.role == 'assistant' and not loop.last else m.content }}<|im_end|>\n{% endfor %}"
    )
    hf = AutoTokenizer.from_pretrained(with_template(tiny_hero_dir, tmp_path / "t", shouting))
    with pytest.raises(DatasetInvalid, match=r"^data\.jsonl:4: .*assistant"):
        tokenize_examples(
            [messages(("user", "Q"), ("assistant", "quiet"), ("user", "Q2"), ("assistant", "ok"), line=4)],
            hf,
            256,
            source="data.jsonl",
        )


def test_a_conversation_the_template_rejects_is_a_data_problem_naming_file_and_line(styled):
    _, hf = styled["gemma"]
    bad_order = messages(("user", "Hi"), ("user", "Again"), ("assistant", "Hello."), line=5)
    with pytest.raises(DatasetInvalid, match=r"^d\.jsonl:5: .*roles must alternate"):
        tokenize_examples([bad_order], hf, 256, source="d.jsonl")


@pytest.mark.parametrize(
    "template, says",
    [
        ("{{ raise_exception('this template is broken') }}", "fails on a plain"),
        ("{% for m in messages %}{% endfor %}", "renders nothing"),
        ("{% for m in messages %}<|im_start|>{{ m.role }}<|im_end|>{% endfor %}", "leaves the messages' text out"),
        ("{% for m in messages %}{{ m.content }", "does not compile"),
    ],
)
def test_a_broken_template_is_a_model_error_naming_where_it_lives(tiny_hero_dir, tmp_path, template, says):
    directory = tmp_path / "broken"
    try:
        with_template(tiny_hero_dir, directory, template)
    except Exception:  # transformers may refuse to save a template that does not compile: write it by hand
        with_template(tiny_hero_dir, directory, "x")
        (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
    with pytest.raises(ChatTemplateError, match=says) as info:
        tokenize_examples([messages(("user", "Hi"), ("assistant", "Hello."))], load_chat_tokenizer(directory), 256)
    assert isinstance(info.value, ModelLoadError) and str(directory / "chat_template.jinja") in str(info.value)


def test_render_with_spans_returns_the_learnt_character_spans(styled):
    _, hf = styled["llama3"]
    conversation = [{"role": r, "content": c} for r, c in CONVERSATIONS[0]]
    text, spans = render_with_spans(conversation, hf)
    assert [text[s:e] for s, e in spans] == ["Four.<|eot_id|>", "Six.<|eot_id|>"]
    assert "\n\nSix. " not in text


def test_training_names_the_dataset_file_and_line(tiny_hero_dir, tmp_path):
    """The trainer passes the dataset's path down, so an error at training time names FILE:LINE too."""
    import json

    from config.schema import TrainerConfig
    from engine.trainer import TrainerEngine

    only_last = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role != 'assistant' or loop.last %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    )
    model = with_template(tiny_hero_dir, tmp_path / "model", only_last)
    data = tmp_path / "chats.jsonl"
    rows = [
        [("user", "Hi"), ("assistant", "Hello.")],
        [("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")],
    ]
    data.write_text(
        "".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in row]}) + "\n" for row in rows),
        encoding="utf-8",
    )
    with pytest.raises(DatasetInvalid, match=rf"^{data}:2: .*message 2 \(an assistant reply\)"):
        TrainerEngine(device="cpu").prepare(str(data), TrainerConfig(), model_path=str(model))


def test_an_empty_reply_learns_only_its_end_token_and_the_search_refuses_to_guess(styled, monkeypatch):
    _, hf = styled["qwen3"]
    example = messages(
        ("user", "Say nothing."), ("assistant", ""), ("user", "Now say hi."), ("assistant", "Hi."), line=9
    )
    (out,) = tokenize_examples([example], hf, 256).examples
    assert learnt_runs(hf, out) == ["<|im_end|>", "Hi.<|im_end|>"]
    monkeypatch.setattr(chat_turns, "_locate_by_skeleton", lambda *args: None)
    with pytest.raises(DatasetInvalid, match=r"^x\.jsonl:9: assistant reply 1 \(message 2\) is empty"):
        tokenize_examples([example], hf, 256, source="x.jsonl")
