"""SD3's three tokenizers behind one call, and tiny CLIP/T5 tokenizers for random test-size stacks.

`SD3Tokenizer(texts)` tokenizes each prompt as diffusers' StableDiffusion3Pipeline does (padding="max_length",
truncation) for CLIP-L (77), CLIP-G (77) and T5 (t5_length), and returns them side by side as one int32 row
(77 + 77 + t5_length): the layout SD3TextStack splits again. transformers is imported only when a tokenizer is built.

The tiny tokenizers are real transformers tokenizers (CLIPTokenizer over a byte-pair vocabulary, a T5 tokenizer over a
unigram model) with a vocabulary of single characters plus whole words, so a CPU run with a tiny "sd3" stack goes
through the same code as the released SD3 tokenizers.
"""

import json
import pathlib
import tempfile
from typing import Sequence

import numpy as np

from rflow_jax.model.text import sd3

_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-"


class SD3Tokenizer:
  """Texts -> (B, 2·clip_length + t5_length) int32 ids [CLIP-L | CLIP-G | T5].

  Attributes:
    clip_l, clip_g: transformers CLIP tokenizers (SD3's pad with EOS and with "!" respectively).
    t5: a transformers T5 tokenizer, or None (T5 off: its ids are zeros).
    t5_length: T5 tokens per prompt.
    clip_length: tokens per CLIP tower.
  """

  def __init__(self, clip_l, clip_g, t5, t5_length: int, clip_length: int = sd3.CLIP_LENGTH):
    self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
    self.t5_length, self.clip_length = t5_length, clip_length
    self.max_length = 2 * clip_length + t5_length

  def _ids(self, tokenizer, texts, length):
    if tokenizer is None:
      return np.zeros((len(texts), length), np.int32)
    ids = tokenizer(list(texts), padding="max_length", max_length=length, truncation=True).input_ids
    return np.asarray(ids, np.int32)

  def batch(self, texts: Sequence[str]) -> np.ndarray:
    """(B, max_length) int32 ids of B texts."""
    return np.concatenate(
        [
            self._ids(self.clip_l, texts, self.clip_length),
            self._ids(self.clip_g, texts, self.clip_length),
            self._ids(self.t5, texts, self.t5_length),
        ],
        axis=1,
    )

  def __call__(self, text: str) -> np.ndarray:
    """(max_length,) int32 ids of one text."""
    return self.batch([text])[0]

  def problems(self, text: str) -> list[str]:
    """What of `text` an encoder will not see: the tokens cut at each tokenizer's length (diffusers warns likewise)."""
    out = []
    for name, tokenizer, length in (("CLIP", self.clip_l, self.clip_length), ("T5", self.t5, self.t5_length)):
      if tokenizer is not None:
        n = len(tokenizer(text).input_ids)
        if n > length:
          out.append(f"{n} {name} tokens, cut at {length}: the end of the prompt is dropped")
    return out

  def empty(self) -> tuple[int, ...]:
    """The empty prompt's ids (the classifier-free guidance negative)."""
    return tuple(int(i) for i in self(""))


def _bpe_files(directory: pathlib.Path, words: Sequence[str]) -> None:
  """vocab.json + merges.txt of a CLIP-style BPE: characters, characters ending a word, and `words` whole."""
  vocab = {}
  for c in _CHARS:
    vocab.setdefault(c, len(vocab))
  for c in _CHARS:
    vocab.setdefault(c + "</w>", len(vocab))
  merges = []
  for word in words:  # Merge left to right: "r e" -> "re", then "re d</w>" -> "red</w>".
    left = word[0]
    for i, c in enumerate(word[1:], 1):
      right = c + "</w>" if i == len(word) - 1 else c
      if f"{left} {right}" not in merges:
        merges.append(f"{left} {right}")
      left += right
      vocab.setdefault(left, len(vocab))
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  (directory / "vocab.json").write_text(json.dumps(vocab))
  (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def tiny_clip_tokenizer(words: Sequence[str], pad_token: str = "<|endoftext|>", directory=None):
  """A CLIPTokenizer over characters and `words`; written to `directory` (kept) or a temporary one.

  Args:
    words: lower-case words that become single tokens (others split into characters).
    pad_token: "<|endoftext|>" as CLIP-L's tokenizer, "!" as bigG's.
    directory: where vocab.json and merges.txt go (None: a temporary directory, removed after loading).

  Returns:
    The tokenizer (model_max_length 77).
  """
  import transformers  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(directory or tmp)
    _bpe_files(path, words)
    return transformers.CLIPTokenizer.from_pretrained(str(path), pad_token=pad_token, model_max_length=sd3.CLIP_LENGTH)


def tiny_t5_tokenizer(words: Sequence[str]):
  """A T5 tokenizer (unigram, "▁" word boundaries, EOS appended) over characters and `words`.

  Ids: 0 <pad>, 1 </s>, 2 <unk>, then "▁" + each word, "▁", and the characters.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in dict.fromkeys(words)]
  pieces += [("▁", -3.0)] + [(c, -5.0) for c in _CHARS]
  model = tokenizers.Tokenizer(tokenizers.models.Unigram(pieces, unk_id=2, byte_fallback=False))
  model.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
  model.decoder = tokenizers.decoders.Metaspace()
  model.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  return transformers.T5TokenizerFast(
      tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0
  )
