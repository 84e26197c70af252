"""Model references written as local paths: directories, GGUF files and `DIR::FILE.gguf`."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.models.references import missing_local_path

pytestmark = pytest.mark.unit


def test_a_gguf_file_named_inside_a_directory_written_as_a_path_is_found(tmp_path, monkeypatch):
    """`DIR::FILE.gguf` with DIR absolute, ./ or ~ was refused as "no such directory: DIR::FILE.gguf" (the whole
    reference taken for a directory): only a bare relative DIR passed."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for reference in (f"{tmp_path}/models::m.gguf", "./models::m.gguf", "~/models::m.gguf", "~/models/m.gguf"):
        assert missing_local_path(reference) is None, reference
    assert missing_local_path("./models::other.gguf") == "model.name_or_path: GGUF file not found: models/other.gguf"
    assert missing_local_path("~/nowhere") == "model.name_or_path: no such directory: ~/nowhere"
    assert missing_local_path("org/model") is None  # a hub id: not written as a path


@pytest.mark.unit
@pytest.mark.parametrize(
    ("value", "expected"), [("", "default"), ("  ", "default"), ("~/fc", "home"), ("/x/c", "/x/c")]
)
def test_the_cache_root_of_an_empty_or_tilde_setting(monkeypatch, tmp_path, value, expected):
    """FINETUNE_CACHE= (set, empty) put the cache in the working directory; "~/fc" made a folder named "~" there."""
    from finetune.models.references import cache_root

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FINETUNE_CACHE", value)
    want = {"default": tmp_path / ".cache" / "finetune", "home": tmp_path / "fc"}.get(expected, Path(expected))
    assert cache_root() == want
