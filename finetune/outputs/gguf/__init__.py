"""A merged decoder as one GGUF file for llama.cpp, Ollama and LM Studio (gguf-py), and its parity check.

`architectures` (llama.cpp's per-architecture conversion rules), `vocab` (the tokenizer as llama.cpp reads it),
`pretokenizers` with `llama_cpp_hashes` (which named pre-tokenizer splits the vocabulary's text), `writer` (the
file), `parity` (the file loaded in llama.cpp against the merged model).
"""

from finetune.outputs.gguf.architectures import ARCHITECTURES, export_arch
from finetune.outputs.gguf.writer import QUANTS, write_gguf

__all__ = ["ARCHITECTURES", "QUANTS", "export_arch", "write_gguf"]
