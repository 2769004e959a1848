"""One face for a Hugging Face `tokenizers` tokenizer and a sentencepiece model, the one function
that loads either from a file or a folder (a data dir, a run's tokenizer/, an HF model), and the
byte-level BPE trainer that data preparation uses when a job names no tokenizer.

A tokenizer.json is saved with a tokenizer_config.json that transformers reads: `AutoTokenizer`
then loads the folder as `PreTrainedTokenizerFast` over that very tokenizer.json, so it gives the
ids training used (the export of a run, lm_eval's `--model hf`).
"""
from __future__ import annotations

import glob
import json
import os
from typing import Iterable, Optional

from core.files import write_file_atomic

# Tokens that conventionally end a document in tokenizer.json files that do not say which one is EOS.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")
END_OF_TEXT = "<|endoftext|>"  # GPT-2's document separator, the trained tokenizer's one special token


class Tokenizer:
    """Built from the serialized model rather than a path, so that it pickles into `datasets.map`
    worker processes and saving it anywhere is a plain write."""

    def __init__(self, kind: str, blob, eos_token: Optional[str] = None, what: str = "tokenizer"):
        self.kind = kind
        self._blob = blob
        self._eos_token = eos_token
        self._what = what
        if kind == "sentencepiece":
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_proto=blob)
            self.vocab_size = self._sp.get_piece_size()
            self.eos_id = self._sp.eos_id()
            if self.eos_id < 0:
                raise ValueError(f"{what}: the sentencepiece model has no EOS piece (eos_id is -1); "
                                 "train it with an eos_id >= 0")
        elif kind == "huggingface":
            import tokenizers

            self._hf = tokenizers.Tokenizer.from_str(blob)
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            names = [eos_token] if eos_token else list(EOS_CANDIDATES)
            ids = [self._hf.token_to_id(n) for n in names]
            found = [(n, i) for n, i in zip(names, ids) if i is not None]
            if not found:
                raise ValueError(f"{what}: the tokenizer has no end-of-sequence token (looked for "
                                 f"{names}); set eos_token in a tokenizer_config.json next to it")
            self._eos_token, self.eos_id = found[0]
        else:
            raise ValueError(f"{what}: unknown tokenizer kind {kind!r}")
        # Some tokenizer.json files place added tokens past the declared vocab size.
        self.vocab_size = max(self.vocab_size, self.eos_id + 1)

    def __getstate__(self):
        return (self.kind, self._blob, self._eos_token, self._what)

    def __setstate__(self, state):
        self.__init__(*state)

    @property
    def file_name(self) -> str:
        return "tokenizer.model" if self.kind == "sentencepiece" else "tokenizer.json"

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str], threads: int = 0) -> list[list[int]]:
        """Ids of each text (no special tokens added). `threads`: sentencepiece's count (0: every
        core); the Rust tokenizers follow TOKENIZERS_PARALLELISM."""
        if self.kind == "sentencepiece":
            return self._sp.encode(texts, out_type=int, num_threads=threads or (os.cpu_count() or 1))
        # Without offsets when this tokenizers has the faster call: the ids are the same.
        encode = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=False)

    def save(self, directory: str, max_length: Optional[int] = None) -> str:
        """Writes the tokenizer into `directory` (atomically) and returns its file name. A tokenizer.json
        goes with a tokenizer_config.json naming its EOS (tokenizer.json does not say which token
        ends a document) and the class transformers loads it as; `max_length`: the model's context."""
        os.makedirs(directory, exist_ok=True)
        write_file_atomic(os.path.join(directory, self.file_name), self._blob)
        if self.kind == "huggingface":
            # GPT-2's convention: one end-of-text token begins and ends documents. Our own class over the
            # file as it is, never one that rebuilds the tokenizer from vocab/merges with its own rules.
            config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self._eos_token,
                      "bos_token": self._eos_token, "add_bos_token": False, "clean_up_tokenization_spaces": False,
                      **({"model_max_length": max_length} if max_length else {})}
            write_file_atomic(os.path.join(directory, "tokenizer_config.json"), json.dumps(config, indent=2) + "\n")
        return self.file_name


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, what: str = "data.vocab_size") -> Tokenizer:
    """A byte-level BPE (GPT-2's kind: every string encodable, no unknown token, decoding exact)
    with `vocab_size` entries, END_OF_TEXT among them, trained on `texts`. The same texts give the
    same tokenizer whatever the thread count."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"{what}={vocab_size}: a byte-level BPE needs at least 257 entries (256 bytes and "
                         f"{END_OF_TEXT})")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return Tokenizer("huggingface", tok.to_str(), END_OF_TEXT, what="data.tokenizer")


def load_tokenizer(path_or_dir: str, what: str = "tokenizer") -> Tokenizer:
    """A sentencepiece `.model`, a `tokenizer.json`, or a directory holding one of them or a
    `transformers` tokenizer."""
    path = os.path.expanduser(path_or_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: no such file or directory: {path_or_dir!r}")
    if os.path.isdir(path):
        for name in ("tokenizer.model", "tokenizer.json"):
            if os.path.isfile(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name), what)
        models = sorted(glob.glob(os.path.join(path, "*.model")))  # e.g. spiece.model
        if models:
            return load_tokenizer(models[0], what)
        return _load_transformers_tokenizer(path, what)
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            blob = f.read()
        return Tokenizer("huggingface", blob, _configured_eos(os.path.dirname(path)), what)
    with open(path, "rb") as f:
        blob = f.read()
    try:
        return Tokenizer("sentencepiece", blob, what=what)
    except RuntimeError as e:  # sentencepiece's "cannot parse model" comes as RuntimeError
        raise ValueError(f"{what}: {path_or_dir!r} is neither a sentencepiece model nor a "
                         f"tokenizer.json ({e})") from e


def _configured_eos(directory: str) -> Optional[str]:
    """The eos_token named by a transformers-style config next to a tokenizer.json, if any."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
        except (OSError, ValueError):
            continue
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    return None


def _load_transformers_tokenizer(path: str, what: str) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{what}: {path!r} holds no tokenizer.model, tokenizer.json or "
                         f"transformers tokenizer ({e})") from e
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{what}: the transformers tokenizer in {path!r} has no fast "
                         "(tokenizer.json) form; save it with a fast tokenizer first")
    return Tokenizer("huggingface", tok.backend_tokenizer.to_str(), tok.eos_token, what)
