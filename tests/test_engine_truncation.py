"""engine.truncation: what max_length cuts, counted before a job as the job counts it, without torch."""

from __future__ import annotations

import subprocess
import sys

from engine.chat_turns import ChatOptions
from engine.formats import Example, read_examples
from engine.tokenize import tokenize_examples
from engine.truncation import truncation_report
from tests.chat_fixtures import STYLES, build_styled_tokenizer
from tests.services import REPO


def messages(user: str, reply: str, line: int = 1) -> Example:
    return Example("messages", line, messages=(("user", user), ("assistant", reply)))


def test_counts_are_the_ones_training_makes(tiny_hero_dir):
    from transformers import AutoTokenizer

    examples = read_examples(REPO / "examples" / "chat_small.jsonl")
    training = tokenize_examples(examples, AutoTokenizer.from_pretrained(tiny_hero_dir), 32)
    report = truncation_report(examples, tiny_hero_dir, 32, context_length=1024)
    assert report.counted and report.exact and report.num_examples == len(examples)
    assert report.num_over == training.num_truncated + training.num_dropped > 0
    assert (report.num_dropped, report.tokens_cut) == (training.num_dropped, training.num_tokens_cut)
    assert report.suggested_max_length == min(1024, 1 << (training.longest - 1).bit_length())


def test_the_message_says_what_is_cut_and_how_to_fix_it(tiny_hero_dir):
    examples = [
        messages("Say a lot.", "word " * 200, 1),
        messages("context " * 100, "Short.", 2),
        messages("Hi", "Hello.", 3),
    ]
    report = truncation_report(examples, tiny_hero_dir, 32, context_length=1024)
    assert (report.num_over, report.num_dropped) == (2, 1)
    assert report.message == (
        f"2 of 3 examples exceed max_length 32 ({report.tokens_cut:,} tokens cut; 1 not trained on at all: no reply "
        "starts within it); raise it with --set max_length=1024 or shorten them"
    )
    assert report.to_dict()["message"] == report.message
    fits = truncation_report(examples, tiny_hero_dir, 1024)
    assert fits.num_over == 0 and fits.message == "no example exceeds max_length 1024"


def test_the_suggestion_never_exceeds_the_context_length(tiny_hero_dir):
    report = truncation_report([messages("Say a lot.", "word " * 2000)], tiny_hero_dir, 256, context_length=1024)
    assert report.suggested_max_length == 1024


def test_a_hostile_line_is_estimated_and_says_so(tiny_hero_dir):
    report = truncation_report([messages("Summarise.", "the harbor " * 400_000)], tiny_hero_dir, 64)
    assert report.num_over == 1 and not report.exact and report.counted
    assert report.message.startswith("about 1 of 1 examples exceed max_length 64 (about ")


def test_think_blocks_change_the_count(tiny_hero_dir, tmp_path):
    directory = build_styled_tokenizer(tiny_hero_dir, tmp_path / "qwen3", STYLES["qwen3"])
    example = [messages("Hi", "Hello there.")]
    keep = truncation_report(example, directory, 8, chat=ChatOptions("keep"))
    strip = truncation_report(example, directory, 8, chat=ChatOptions("strip"))
    assert keep.tokens_cut > strip.tokens_cut > 0


def test_without_the_model_on_this_machine_it_estimates_and_says_so(tmp_path):
    examples = [messages("Say a lot.", "word " * 200), messages("Hi", "Hello.")]
    for directory in (None, tmp_path / "not-built-yet"):
        report = truncation_report(examples, directory, 32)
        assert not report.counted and report.num_over == 1 and report.tokens_cut > 0
        assert "estimated: the hero's tokenizer is not on this machine yet" in report.message


def test_counting_imports_neither_torch_nor_transformers(tiny_hero_dir):
    code = (
        "import sys; from engine.formats import read_examples; from engine.truncation import truncation_report; "
        f"r = truncation_report(read_examples({str(REPO / 'examples' / 'chat_small.jsonl')!r}), "
        f"{str(tiny_hero_dir)!r}, 32); assert r.counted and r.num_over, r; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_a_large_dataset_can_be_counted_on_a_sample(tiny_hero_dir):
    examples = read_examples(REPO / "examples" / "chat_small.jsonl")
    full = truncation_report(examples, tiny_hero_dir, 256)
    sampled = truncation_report(examples, tiny_hero_dir, 256, max_chars=sum(e.num_chars() for e in examples) // 4)
    assert full.exact and not sampled.exact and sampled.counted and sampled.num_examples == 240
    assert abs(sampled.num_over - full.num_over) <= 0.4 * full.num_over
    assert sampled.message.startswith(f"about {sampled.num_over} of 240 examples exceed max_length 256 (about ")
    assert truncation_report(examples, tiny_hero_dir, 256, max_chars=10**9) == full
