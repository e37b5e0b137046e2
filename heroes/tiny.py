"""Build the ``tiny-qwen3`` hero offline: a byte-level BPE tokenizer trained on the shipped examples and a
randomly initialised few-million-parameter Qwen3, saved as an ordinary Hugging Face model directory.

Deterministic: the same examples and seed give the same tokenizer and weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
# The files the tokenizer learns from, named so that adding an example file never changes the test hero.
TOKENIZER_CORPUS = ("chat_small.jsonl", "messages.jsonl", "prompt_response.jsonl", "text.jsonl")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, as Qwen uses it. The assistant turn ends with <|im_end|> so the model learns to stop.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MODEL_SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64)


def _corpus(examples_dir: Path):
    for path in (examples_dir / name for name in TOKENIZER_CORPUS):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if "messages" in row:
                for m in row["messages"]:
                    yield f"{m['role']}\n{m['content']}"
            else:
                yield "\n".join(str(v) for v in row.values())


def build_tiny_qwen3(target: Path, vocab_size: int = 4096, context_length: int = 1024, seed: int = 0,
                     examples_dir: Path = EXAMPLES_DIR) -> Path:
    """Write the tiny hero's tokenizer and weights into ``target`` (which must not exist yet).

    Returns:
        ``target``.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(examples_dir), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, model_max_length=context_length)
    fast.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab_size, max_position_embeddings=context_length, tie_word_embeddings=True,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=None,
                         rope_theta=10000.0, **MODEL_SHAPE)
    config.architectures = ["Qwen3ForCausalLM"]
    model = Qwen3ForCausalLM(config)
    target.mkdir(parents=True)
    model.save_pretrained(target, safe_serialization=True)
    fast.save_pretrained(target)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("built tiny-qwen3 at %s: %d parameters, vocab %d", target, n_params, len(fast))
    return target
