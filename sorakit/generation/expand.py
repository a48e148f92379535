"""Prompt expansion: rewrite a short user prompt into the detailed caption style of the training data.

Sora rewrites short prompts into the detailed captions its model was trained on. Two backends sit
behind `PromptExpander(captions, backend=...).expand(prompt, seed) -> Expansion`:

* `captions` (default, offline): completes the prompt from the training captions themselves. The
  prompt's words that the corpus knows must all appear in the result; among the captions that
  contain them, one is drawn with its corpus frequency (the caption distribution conditioned on
  what the user said), with the seed. When no caption contains them all, the corpus grammar is used:
  two captions that differ in exactly one position make those two words interchangeable (a "slot",
  e.g. red/blue/green), so a caption holding most of the words has its other slots filled with the
  user's words. Nothing the user said is contradicted: a known word is never dropped, and words the
  corpus has never seen are kept by appending the user's prompt.
* `llm`: a local Hugging Face causal LM, prompted with an instruction and few-shot pairs drawn from
  the training captions. Its output is validated (non-empty, a sane length, keeps the user's known
  words) and falls back to `captions` otherwise. Quality needs a real instruction-tuned model; a
  small random one only exercises the plumbing.

Nothing here knows the toy world; it is only test data.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

# Function words a prompt may contain without them having to appear in the result.
STOPWORDS = frozenset("a an the of on in at to with and or is are that this its it by for from".split())
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
MAX_CORPUS = 200_000  # distinct captions kept for the index; enough for any caption style


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass
class Expansion:
    text: str
    backend: str  # the backend that produced `text`
    prompt: str
    seed: int
    note: str | None = None  # why a fallback or an approximation happened

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Reading a caption corpus
# --------------------------------------------------------------------------------------------


def read_captions(src: str | Path) -> list[str]:
    """Captions from shards (dir/tar/glob, KEY.txt or json caption), a .txt (one per line), .jsonl or .csv."""
    p = Path(src)
    suffix = p.suffix.lower()
    if p.is_file() and suffix == ".txt":
        out = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif p.is_file() and suffix == ".jsonl":
        out = []
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                text = row.get("caption") or row.get("text") if isinstance(row, dict) else None
                if text:
                    out.append(str(text).strip())
    elif p.is_file() and suffix == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            column = next((c for c in ("text", "caption") if c in (reader.fieldnames or [])), None)
            if column is None:
                raise ValueError(f"{p}: a captions CSV needs a 'text' or 'caption' column")
            out = [row[column].strip() for row in reader if row.get(column, "").strip()]
    else:
        from sorakit.data.captioning import sample_caption, sample_meta
        from sorakit.data.shards import iter_tar_samples, list_shards

        out = []
        for shard in list_shards(src):
            for _, members in iter_tar_samples(shard):
                c = sample_caption(members, sample_meta(members))
                if c:
                    out.append(c)
    if not out:
        raise ValueError(f"{src}: no captions found")
    return out


# --------------------------------------------------------------------------------------------
# The captions backend
# --------------------------------------------------------------------------------------------


class CaptionCorpus:
    """Distinct captions with their counts, an inverted index by word, and the interchangeable-word slots."""

    def __init__(self, captions: list[str]):
        counts = Counter(" ".join(words(c)) for c in captions if words(c))
        self.items = [(c.split(), n) for c, n in counts.most_common(MAX_CORPUS)]  # (words, count)
        self.vocab: set[str] = set()
        self.by_word: dict[str, set[int]] = {}
        for i, (ws, _) in enumerate(self.items):
            self.vocab.update(ws)
            for w in ws:
                self.by_word.setdefault(w, set()).add(i)
        self.slot = self._slots()

    def _slots(self) -> dict[str, int]:
        """Union-find of words seen in the same position of otherwise identical captions."""
        parent: dict[str, str] = {}

        def find(w: str) -> str:
            while parent.setdefault(w, w) != w:
                parent[w] = parent[parent[w]]
                w = parent[w]
            return w

        contexts: dict[tuple, str] = {}
        for ws, _ in self.items:
            for i, w in enumerate(ws):
                key = (tuple(ws[:i]), tuple(ws[i + 1 :]))
                if key in contexts:
                    a, b = find(contexts[key]), find(w)
                    if a != b:
                        parent[a] = b
                else:
                    contexts[key] = w
        roots: dict[str, int] = {}
        return {w: roots.setdefault(find(w), len(roots)) for w in parent}

    def interchangeable(self, a: str, b: str) -> bool:
        return a != b and a in self.slot and self.slot.get(a) == self.slot.get(b)

    def complete(self, prompt: str, rng: random.Random) -> tuple[str, str | None]:
        """(expanded text, note) for `prompt`."""
        prompt_words = words(prompt)
        known = list(dict.fromkeys(w for w in prompt_words if w in self.vocab and w not in STOPWORDS))
        unknown = [w for w in prompt_words if w not in self.vocab and w not in STOPWORDS]
        note = None
        # Captions containing every known word: draw one by corpus frequency.
        ids = set(range(len(self.items)))
        for w in known:
            ids &= self.by_word.get(w, set())
        if ids:
            text = " ".join(self._draw(sorted(ids), rng))
        else:
            text, note = self._substitute(known, rng)
        if not text:
            return prompt.strip(), note
        if unknown:
            text, leftover = self._place_unknown(prompt_words, known, text.split())
            placed = [w for w in unknown if w not in leftover]
            extra = f"the corpus has never seen {', '.join(repr(w) for w in unknown)}"
            if placed:
                extra += f"; put {', '.join(placed)} in the slot its neighbour gives it"
            note = f"{note}; {extra}" if note else extra
            if leftover:
                text = f"{text}, {leftover}"
        return text, note

    def _place_unknown(self, prompt_words: list[str], known: list[str], ws: list[str]) -> tuple[str, str]:
        """Put each unseen prompt word where its known neighbour puts it, replacing a variable slot word the
        user did not ask for ("a purple circle": before "circle" stands the colour). Returns the text and
        the prompt's remaining words (with their function words) to append."""
        ws = list(ws)
        used = set(known)
        left_over = [False] * len(prompt_words)
        for i, w in enumerate(prompt_words):
            if w in self.vocab or w in STOPWORDS:
                continue
            spot = None
            for nb, offset in ((i + 1, -1), (i - 1, 1)):  # right neighbour: the slot before it; left: after it
                if 0 <= nb < len(prompt_words) and prompt_words[nb] in used and prompt_words[nb] in ws:
                    j = ws.index(prompt_words[nb]) + offset
                    if 0 <= j < len(ws) and ws[j] not in used and ws[j] in self.slot:
                        spot = j
                        break
            if spot is None:
                left_over[i] = True
            else:
                ws[spot] = w
                used.add(w)
        # Keep the function words just before a left-over word ("with a hat").
        for i in range(len(prompt_words) - 1, 0, -1):
            if left_over[i] and prompt_words[i - 1] in STOPWORDS:
                left_over[i - 1] = True
        return " ".join(ws), " ".join(w for w, keep in zip(prompt_words, left_over) if keep)

    def _draw(self, ids: list[int], rng: random.Random) -> list[str]:
        weights = [self.items[i][1] for i in ids]
        return list(self.items[rng.choices(ids, weights=weights)[0]][0])

    def _substitute(self, known: list[str], rng: random.Random) -> tuple[str, str | None]:
        """Fill slots of the captions closest to the prompt with the user's words (compositions unseen together)."""
        best: list[tuple[int, list[str]]] = []
        best_score = (-1, -1)
        candidates = set().union(*(self.by_word.get(w, set()) for w in known)) if known else set(range(len(self.items)))
        for i in sorted(candidates):
            ws, count = list(self.items[i][0]), self.items[i][1]
            present = sum(w in ws for w in known)
            placed = present
            for w in known:
                if w in ws:
                    continue
                # A word of the caption in the same slot as w, that the user did not ask for, can be replaced.
                for j, u in enumerate(ws):
                    if u not in known and self.interchangeable(w, u):
                        ws[j] = w
                        placed += 1
                        break
            score = (placed, present)
            if score > best_score:
                best_score, best = score, [(count, ws)]
            elif score == best_score:
                best.append((count, ws))
        if not best:
            return "", "no caption of the corpus relates to the prompt"
        ws = rng.choices([b[1] for b in best], weights=[b[0] for b in best])[0]
        missing = [w for w in known if w not in ws]
        note = "composed from captions that each hold part of the prompt"
        if missing:
            return " ".join(ws), f"could not place {', '.join(missing)}"
        return " ".join(ws), note


# --------------------------------------------------------------------------------------------
# The llm backend
# --------------------------------------------------------------------------------------------

INSTRUCTION = (
    "Rewrite the short video prompt as one detailed caption, in exactly the style of the examples. "
    "Keep every detail the prompt gives and add only what it leaves out."
)


def few_shot_pairs(corpus: CaptionCorpus, rng: random.Random, k: int = 4) -> list[tuple[str, str]]:
    """(short prompt, caption) pairs: a caption and a few of its content words as its short form."""
    pairs = []
    for _ in range(k):
        ws = corpus._draw(list(range(len(corpus.items))), rng)
        content = [w for w in ws if w not in STOPWORDS]
        keep = sorted(rng.sample(range(len(content)), min(2, len(content))))
        pairs.append((" ".join(content[i] for i in keep), " ".join(ws)))
    return pairs


def validate_expansion(prompt: str, text: str, corpus: CaptionCorpus, max_words: int | None = None) -> str | None:
    """None when `text` is an acceptable expansion of `prompt`, else the reason it is not."""
    ws = words(text)
    if not ws:
        return "empty output"
    longest = max(len(c[0]) for c in corpus.items)
    limit = max_words or 2 * longest + len(words(prompt))
    if len(ws) > limit:
        return f"too long ({len(ws)} words, at most {limit})"
    needed = [w for w in words(prompt) if w in corpus.vocab and w not in STOPWORDS]
    lost = [w for w in needed if w not in ws]
    if lost:
        return f"drops the prompt's words {', '.join(lost)}"
    return None


class LLMExpander:
    def __init__(self, path: str | Path, max_new_tokens: int = 64):
        import transformers as tf

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such language model directory")
        try:
            self.tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = tf.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot load a causal language model ({str(e).splitlines()[0]})") from None
        self.max_new_tokens = max_new_tokens

    def build_prompt(self, prompt: str, pairs: list[tuple[str, str]]) -> str:
        shots = "\n\n".join(f"Prompt: {s}\nCaption: {c}" for s, c in pairs)
        return f"{INSTRUCTION}\n\n{shots}\n\nPrompt: {prompt.strip()}\nCaption:"

    def generate(self, text: str, seed: int) -> str:
        import torch

        batch = self.tokenizer(text, return_tensors="pt")
        torch.manual_seed(seed)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(
                **batch, max_new_tokens=self.max_new_tokens, do_sample=True, temperature=0.7, top_p=0.9,
                pad_token_id=pad,
            )
        new = self.tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        return new.strip().split("\n")[0].strip()  # one caption: the first line


class PromptExpander:
    """Expands prompts with one backend; loads the corpus (and the LLM) once for many prompts."""

    BACKENDS = ("captions", "llm")

    def __init__(self, captions: str | Path | list[str], backend: str = "captions", llm: str | Path | None = None):
        if backend not in self.BACKENDS:
            raise ValueError(f"unknown expansion backend {backend!r} (known: {', '.join(self.BACKENDS)})")
        if backend == "llm" and llm is None:
            raise ValueError("the llm backend needs --llm PATH (a local Hugging Face causal LM directory)")
        texts = captions if isinstance(captions, list) else read_captions(captions)
        self.corpus = CaptionCorpus(texts)
        self.backend = backend
        self.llm = LLMExpander(llm) if backend == "llm" else None

    def expand(self, prompt: str, seed: int = 0) -> Expansion:
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        rng = random.Random(seed)
        if self.llm is not None:
            pairs = few_shot_pairs(self.corpus, rng)
            output = self.llm.generate(self.llm.build_prompt(prompt, pairs), seed)
            problem = validate_expansion(prompt, output, self.corpus)
            if problem is None:
                return Expansion(output, "llm", prompt, seed)
            text, note = self.corpus.complete(prompt, random.Random(seed))
            reason = f"llm output rejected ({problem}): {output[:80]!r}; used the captions backend"
            return Expansion(text, "captions", prompt, seed, f"{reason}; {note}" if note else reason)
        text, note = self.corpus.complete(prompt, rng)
        return Expansion(text, "captions", prompt, seed, note)


def expand_prompt(prompt: str, captions, backend: str = "captions", llm=None, seed: int = 0) -> Expansion:
    """One-off expansion; use `PromptExpander` for many prompts."""
    return PromptExpander(captions, backend=backend, llm=llm).expand(prompt, seed)
