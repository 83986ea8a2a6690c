"""A tiny word-level tokenizer (with a chat template) for the synthetic data, demos and tests.

`build_tiny_tokenizer(out_dir)` writes a `transformers` tokenizer directory that
`AutoTokenizer.from_pretrained(out_dir)` loads as a `PreTrainedTokenizerFast`:

  ids 0..4: <pad> <s> </s> <unk> <image>, then the words of every synthetic_vqa question/answer,
  single letters, digits (numbers are split into digits), ASCII punctuation and the chat words.

Chat template (Vicuna-like): "<s>USER: {user} ASSISTANT: {assistant}</s>USER: ..." and, with
`add_generation_prompt=True`, a trailing "ASSISTANT:". A 'system' message is emitted as its bare
text before the first turn.
"""

from __future__ import annotations

import copy
import os
import string
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from llvm_jax.data import synthetic

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# LLaVA-1.5's conv_vicuna_v1 ("{system} USER: q ASSISTANT: a</s>USER: q2 ASSISTANT:"), for Vicuna
# tokenizers, which ship without a chat template.
VICUNA_V1_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }} "
    "{% else %}" + VICUNA_V1_SYSTEM + " {% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
CHAT_TEMPLATES = {"tiny": CHAT_TEMPLATE, "vicuna_v1": VICUNA_V1_TEMPLATE}

_CHAT_WORDS = ("USER", "ASSISTANT", "A", "chat", "between", "a", "user", "and", "an", "assistant")


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
  return pre_tokenizers.Sequence(
      [
          pre_tokenizers.WhitespaceSplit(),
          pre_tokenizers.Punctuation("isolated"),
          pre_tokenizers.Digits(individual_digits=True),
      ]
  )


def split_words(text: str) -> list[str]:
  """The word pieces the tiny tokenizer splits `text` into (before the vocabulary lookup)."""
  return [w for w, _ in _pre_tokenizer().pre_tokenize_str(text)]


def tiny_vocabulary(extra_words: Iterable[str] = ()) -> dict[str, int]:
  """Token -> id: the special tokens first (ids 0..4), then the sorted words."""
  words: set[str] = set(string.ascii_letters) | set(string.digits) | set(string.punctuation)
  for text in list(synthetic.corpus_texts()) + list(synthetic.COLORS) + list(_CHAT_WORDS):
    words.update(split_words(text))
  for text in extra_words:
    words.update(split_words(text))
  words -= set(SPECIAL_TOKENS)
  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
  for w in sorted(words):
    vocab[w] = len(vocab)
  return vocab


def build_tiny_tokenizer(out_dir: str | os.PathLike, extra_words: Iterable[str] = ()) -> str:
  """Builds the tiny word-level tokenizer, saves it to `out_dir` and returns that path.

  `extra_words`: more text whose words are added to the vocabulary (split like any text).
  """
  from transformers import PreTrainedTokenizerFast  # heavy import, only when building

  vocab = tiny_vocabulary(extra_words)
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  tok.pre_tokenizer = _pre_tokenizer()
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok,
      bos_token=BOS,
      eos_token=EOS,
      unk_token=UNK,
      pad_token=PAD,
      extra_special_tokens=[IMAGE],
      chat_template=CHAT_TEMPLATE,
      model_max_length=1 << 20,
      padding_side="right",
  )
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  fast.save_pretrained(out_dir)
  return out_dir


def load_tokenizer(path_or_tokenizer, chat_template: str | None = None):
  """`AutoTokenizer.from_pretrained(path)` for a path; a tokenizer object is used as is.

  chat_template: None / '' keeps the tokenizer's own template; a name from CHAT_TEMPLATES
  ('vicuna_v1', 'tiny') or a Jinja string replaces it (on a copy of a given tokenizer object).
  """
  if isinstance(path_or_tokenizer, (str, os.PathLike)):
    from transformers import AutoTokenizer  # lazy: a heavy import, only paid when an HF model is actually used

    tok = AutoTokenizer.from_pretrained(os.fspath(path_or_tokenizer))
  else:
    tok = copy.deepcopy(path_or_tokenizer) if chat_template else path_or_tokenizer
  if chat_template:
    tok.chat_template = CHAT_TEMPLATES.get(chat_template, chat_template)
  return tok
