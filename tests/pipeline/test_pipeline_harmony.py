"""ossbatch.pipeline.harmony: the harmony encoding and the llguidance tokenizer, one vocabulary."""

import ast
from pathlib import Path

import pytest

from ossbatch.pipeline import harmony as H

PIPELINE = Path(H.__file__).resolve().parent


def test_special_token_ids_match_harmony(tokenizer):
    enc = H.harmony_encoding()
    expected = {"<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008, "<|channel|>": 200005,
                "<|return|>": 200002, "<|call|>": 200012, "<|constrain|>": 200003}
    for name, tid in expected.items():
        assert enc.encode(name, allowed_special="all") == [tid]
        assert tokenizer.is_special_token(tid)
        assert tokenizer.decode_bytes([tid]) == name.encode()
    assert tokenizer.vocab_size == H.TOKENIZER_VOCAB_SIZE == 201088
    assert tokenizer.eos_token == H.RETURN
    assert tokenizer is H.lltokenizer()  # built once


@pytest.mark.parametrize("text", ['{"label": "positive", "n": [1, 2.5e-3, null]}', "Grüße, 世界! \n\n  x\t=1",
                                  "The user asks: what's 2+2? We'll answer 4."])
def test_tokenizer_matches_harmony_encoding(tokenizer, text):
    enc = H.harmony_encoding()
    ids = enc.encode(text)
    assert tokenizer.tokenize_str(text) == ids
    assert tokenizer.decode_str(ids) == text


def test_one_local_vocabulary_for_both(no_network):
    """tiktoken's definition reads the same local file openai-harmony does; nothing is downloaded."""
    folder = H.vocabulary_dir()
    assert folder is not None and (folder / H.VOCAB_FILE).is_file()
    H.o200k_harmony_definition.cache_clear()
    definition = H.o200k_harmony_definition()
    assert no_network == []
    assert len(definition["mergeable_ranks"]) == 199998
    enc = H.harmony_encoding()
    for token_bytes, rank in list(definition["mergeable_ranks"].items())[::9973]:
        assert enc._inner.decode_bytes([rank]) == token_bytes
    assert definition["special_tokens"]["<|return|>"] == H.RETURN


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_production_module_patches_or_sets_the_vocabulary_elsewhere():
    """No pipeline module imports unittest; only harmony.py names TIKTOKEN_ENCODINGS_BASE."""
    for path in sorted(PIPELINE.glob("*.py")):
        assert not any(name == "unittest" or name.startswith("unittest.") for name in _imports(path)), path.name
        if path.name != "harmony.py":
            assert "TIKTOKEN_ENCODINGS_BASE" not in path.read_text(), path.name
