"""Prompt expansion: the captions backend on the toy grammar, the llm backend's plumbing and fallback."""

from __future__ import annotations

import itertools
import json

import pytest

from sorakit.cli import main
from sorakit.data.toyworld import BACKGROUNDS, COLORS, MOTIONS, SHAPES, caption, parse_caption
from sorakit.generation.expand import (
    CaptionCorpus,
    Expansion,
    LLMExpander,
    PromptExpander,
    read_captions,
    validate_expansion,
)

ALL = [caption(*a) for a in itertools.product(COLORS, SHAPES, MOTIONS, BACKGROUNDS)]


@pytest.fixture(scope="module")
def expander() -> PromptExpander:
    return PromptExpander(ALL)


def test_red_circle_becomes_a_full_toy_caption(expander):
    seen = set()
    for seed in range(8):
        out = expander.expand("a red circle", seed=seed)
        attrs = parse_caption(out.text)
        assert attrs is not None, out.text  # a complete, valid toy caption
        assert attrs["color"] == "red" and attrs["shape"] == "circle"
        assert out.backend == "captions" and out.note is None
        assert expander.expand("a red circle", seed=seed).text == out.text  # deterministic for a seed
        seen.add(out.text)
    assert len(seen) > 1  # what the user left unsaid is drawn from the distribution


@pytest.mark.parametrize(
    "prompt, expect",
    [
        ("a blue square moving up", {"color": "blue", "shape": "square", "motion": "up"}),
        ("triangle standing still on white", {"shape": "triangle", "motion": "still", "background": "white"}),
        ("yellow", {"color": "yellow"}),
    ],
)
def test_never_contradicts_the_prompt(expander, prompt, expect):
    for seed in range(3):
        attrs = parse_caption(expander.expand(prompt, seed=seed).text)
        assert attrs is not None and {k: attrs[k] for k in expect} == expect


def test_draws_by_corpus_frequency():
    corpus = [caption("red", "circle", "left", "black")] * 50 + [caption("red", "circle", "up", "white")]
    texts = [PromptExpander(corpus).expand("red circle", seed=s).text for s in range(20)]
    assert texts.count(corpus[0]) >= 15


def test_unseen_combination_is_composed_from_the_grammar():
    corpus = [c for c in ALL if not ("green" in c and "triangle" in c)]
    corpus_ex = PromptExpander(corpus)
    assert corpus_ex.corpus.interchangeable("circle", "triangle")  # slots induced from the captions
    out = corpus_ex.expand("a green triangle moving down", seed=1)
    attrs = parse_caption(out.text)
    assert attrs is not None and (attrs["color"], attrs["shape"], attrs["motion"]) == ("green", "triangle", "down")
    assert out.note and "composed" in out.note


def test_unknown_words_are_kept_not_dropped(expander):
    out = expander.expand("a purple circle with a hat", seed=0)
    # "purple" takes the slot before "circle" (no red/blue... to contradict it); "with a hat" is appended
    assert out.text.startswith("a purple circle ") and out.text.endswith(" background, with a hat")
    assert "purple" in out.note and "hat" in out.note


def test_read_captions_from_files_and_shards(tmp_path):
    (tmp_path / "c.txt").write_text("a red circle moving left on a black background\n\n  a b  \n")
    assert read_captions(tmp_path / "c.txt") == ["a red circle moving left on a black background", "a b"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"caption": "x y"}) + "\n" + json.dumps({"text": "z"}) + "\n")
    assert read_captions(tmp_path / "c.jsonl") == ["x y", "z"]
    (tmp_path / "c.csv").write_text("path,text\na.mp4,hello there\n")
    assert read_captions(tmp_path / "c.csv") == ["hello there"]
    from sorakit.data.shards import write_tar_atomic

    write_tar_atomic(tmp_path / "s" / "shard-000000.tar", [("k1", {"mp4": b"", "txt": "cap one"}),
                                                            ("k2", {"mp4": b"", "json": {"caption": "cap two"}})])
    assert read_captions(tmp_path / "s") == ["cap one", "cap two"]
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(ValueError, match="no captions"):
        read_captions(tmp_path / "e.txt")


def test_validation_rules():
    corpus = CaptionCorpus(ALL)
    assert validate_expansion("a red circle", "a red circle moving up on a gray background", corpus) is None
    assert validate_expansion("a red circle", "", corpus) == "empty output"
    assert "drops" in validate_expansion("a red circle", "a blue circle moving up on a gray background", corpus)
    assert "too long" in validate_expansion("a red circle", "a red circle " * 20, corpus)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A tiny randomly initialised causal LM built from a config, with a real (MiniLM) tokenizer, on disk."""
    import torch
    import transformers as tf

    from tests.models.test_text_encoder import minilm_dir

    path = tmp_path_factory.mktemp("llm")
    tok = tf.AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    tok.save_pretrained(path)
    cfg = tf.GPT2Config(vocab_size=tok.vocab_size, n_positions=512, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    torch.manual_seed(0)
    tf.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def test_llm_backend_plumbing_and_fallback(tiny_llm):
    ex = PromptExpander(ALL, backend="llm", llm=tiny_llm)
    prompt = ex.llm.build_prompt("a red circle", [("red circle", ALL[0])])
    assert prompt.startswith("Rewrite") and "Prompt: a red circle\nCaption:" in prompt
    out = ex.expand("a red circle", seed=0)
    # a random model writes nonsense: it is rejected and the captions backend answers
    assert out.backend == "captions" and "llm output rejected" in out.note
    attrs = parse_caption(out.text)
    assert attrs and attrs["color"] == "red" and attrs["shape"] == "circle"
    assert ex.expand("a red circle", seed=0).text == out.text


def test_llm_backend_accepts_a_valid_output(tiny_llm, monkeypatch):
    good = "a red circle moving right on a white background"
    monkeypatch.setattr(LLMExpander, "generate", lambda self, text, seed: good)
    out = PromptExpander(ALL, backend="llm", llm=tiny_llm).expand("a red circle", seed=0)
    assert out == Expansion(good, "llm", "a red circle", 0)


def test_cli(tmp_path, capsys):
    (tmp_path / "caps.txt").write_text("\n".join(ALL))
    assert main(["expand", "a red circle", "--captions", str(tmp_path / "caps.txt"), "--seed", "4"]) == 0
    text = capsys.readouterr().out.strip()
    assert parse_caption(text)["color"] == "red"
    assert main(["expand", "a red circle", "--captions", str(tmp_path / "caps.txt"), "--seed", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == text
    assert main(["expand", "a red circle", "--captions", str(tmp_path / "caps.txt"), "--backend", "llm"]) == 1
    assert "--llm" in capsys.readouterr().err
    assert main(["expand", "a red circle"]) == 1
