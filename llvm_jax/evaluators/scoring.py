"""Answer scoring: the VQA normalisation and accuracy, option-letter extraction, exact match.

`normalize_answer` follows the official VQA evaluation script (punctuation, periods not inside
numbers, number words to digits, articles dropped, common contractions restored).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence

_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id": "I'd",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itll": "it'll",
    "lets": "let's",
    "mightnt": "mightn't",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "shant": "shan't",
    "shed": "she'd",
    "shes": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "thats": "that's",
    "thered": "there'd",
    "theres": "there's",
    "theyd": "they'd",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "wasnt": "wasn't",
    "wed": "we'd",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "yall": "y'all",
    "youd": "you'd",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
OPTION_LETTERS = "ABCDEFGH"


def _process_punctuation(text: str) -> str:
  out = text
  for p in _PUNCTUATION:
    if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_STRIP.sub("", out)


def normalize_answer(text: str) -> str:
  """The VQA evaluation's answer normalisation."""
  text = text.replace("\n", " ").replace("\t", " ").strip().lower()
  text = _process_punctuation(text)
  words = []
  for word in text.split():
    word = _NUMBERS.get(word, word)
    if word in _ARTICLES:
      continue
    words.append(_CONTRACTIONS.get(word, word))
  return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """VQA accuracy of one prediction against the human answers.

  With 10 answers (VQAv2): min(1, matches among the other 9 / 3) averaged over the 10 leave-one-out
  subsets; with a single reference answer this is exact match after normalisation.
  """
  if not answers:
    raise ValueError("vqa_accuracy needs at least one reference answer")
  pred = normalize_answer(prediction)
  refs = [normalize_answer(a) for a in answers]
  if len(refs) == 1:
    return float(pred == refs[0])
  scores = []
  for i in range(len(refs)):
    others = refs[:i] + refs[i + 1 :]
    scores.append(min(1.0, sum(r == pred for r in others) / 3.0))
  return sum(scores) / len(scores)


def option_letter(prediction: str, options: Sequence[str]) -> str | None:
  """The option a prediction picks: a standalone letter ('B', '(B)', 'B.', 'The answer is B'), else
  the option whose text the prediction equals after normalisation; None if neither."""
  letters = OPTION_LETTERS[: len(options)]
  if not letters:
    return None
  match = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", prediction.strip())
  if match:
    return match.group(1)
  norm = normalize_answer(prediction)
  for letter, option in zip(letters, options):
    if norm and norm == normalize_answer(option):
      return letter
  return None


def exact_match(prediction: str, answer: str) -> bool:
  return prediction.strip() == answer.strip()


def question_prior(train_examples: Sequence[tuple[str, str, bool]]):
  """A blind baseline: for each question text, the answer most frequent in training.

  train_examples: (question, answer, multiple_choice). Returns guess(question, multiple_choice) ->
  answer; an unseen question gets the most frequent answer of its kind (open or multiple choice).
  Its accuracy is the chance level a model must beat to show that it uses the image.
  """
  if not train_examples:
    raise ValueError("question_prior needs training examples")
  by_question: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  by_kind: dict[bool, collections.Counter] = collections.defaultdict(collections.Counter)
  for question, answer, multiple_choice in train_examples:
    by_question[question][answer] += 1
    by_kind[bool(multiple_choice)][answer] += 1
  overall = by_kind[True] + by_kind[False]

  def guess(question: str, multiple_choice: bool) -> str:
    counts = by_question.get(question) or by_kind.get(bool(multiple_choice)) or overall
    return counts.most_common(1)[0][0]

  return guess
