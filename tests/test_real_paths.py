"""The notebooks' real-model path against a local stand-in of the Hugging Face Hub.

With ``USE_REAL_MIXTRAL = True`` every notebook calls ``rt.load_model(...)`` and ``rt.tokenizer()``
(moe_colab.notebook.runtime). Here huggingface_hub's two download functions are replaced by
functions that serve files from a folder this test writes (a small Mixtral checkpoint in the
original layout with a tokenizer, as the mistralai repository holds it, and the same model in the
paper authors' HQQ 0.1 layout), and record every file they hand out. The test then runs those
two calls the way a notebook does, on CPU, and checks:

  * which files each path downloads, and how many bytes: the authors' path takes every file of
    the authors' repository and only the tokenizer files of the mistralai one; the mistral path
    takes config, index and shards, never an unrelated file; a tokenizer never pulls weights;
  * the model is planned (experts_on_device="auto") and generates;
  * a second notebook on the same machine downloads nothing and loads the same directory.
"""
from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import pytest
import torch

from conftest import write_checkpoint, write_tokenizer
from moe_colab.notebook import runtime as R

pytestmark = pytest.mark.slow


class StandInHub:
    """Repositories as folders under ``root``; every file served is recorded (repo, name, bytes)."""

    def __init__(self, root: Path):
        self.root, self.served = root, []

    def repo(self, repo_id: str) -> Path:
        return self.root / repo_id.replace("/", "--")

    def _serve(self, repo_id, filename, local_dir):
        src = self.repo(repo_id) / filename
        if not src.is_file():
            from huggingface_hub.errors import EntryNotFoundError
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        dst = Path(local_dir) / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        self.served.append((repo_id, filename, src.stat().st_size))
        return str(dst)

    def hf_hub_download(self, repo_id, filename, *, revision=None, local_dir=None, token=None, **kw):
        return self._serve(repo_id, filename, local_dir or self.root / "cache" / repo_id.replace("/", "--"))

    def snapshot_download(self, repo_id, *, revision=None, local_dir=None, allow_patterns=None, token=None, **kw):
        out = Path(local_dir or self.root / "snapshots" / repo_id.replace("/", "--"))
        for f in sorted(self.repo(repo_id).iterdir()):
            if allow_patterns is None or any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                self._serve(repo_id, f.name, out)
        return str(out)

    def files(self, repo_id=None):
        return sorted(name for r, name, _ in self.served if repo_id in (None, r))

    def bytes(self, repo_id=None):
        return sum(n for r, _, n in self.served if repo_id in (None, r))


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory):
    from test_authors_format import write_authors_checkpoint
    root = tmp_path_factory.mktemp("hub")
    mistral = write_checkpoint(root / R.MISTRAL_REPO.replace("/", "--"), layers=2, experts=4, top_k=2, heads=4,
                               kv_heads=2, hidden=64, intermediate=128, vocab=320, seed=3, shard_size="200KB")
    write_tokenizer(mistral, 320)
    (mistral / "consolidated.00.pt").write_bytes(b"\0" * 4096)   # an unrelated large file of the repository
    write_authors_checkpoint(mistral, root / R.AUTHORS_REPO.replace("/", "--"))
    return root


@pytest.fixture
def hub(hub_root, tmp_path, monkeypatch):
    import huggingface_hub
    h = StandInHub(hub_root)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", h.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", h.snapshot_download)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))                 # real_weights_dir's default place
    monkeypatch.delenv("MOE_COLAB_MIXTRAL", raising=False)
    return h


def real_runtime() -> R.Runtime:
    """What check_runtime(True) returns on a GPU machine, but on this CPU."""
    return R.Runtime(colab=False, device="cpu", gpu_name=None, gpu_memory_gb=None, model=R.REAL_MODEL,
                     dtype_name="float32", real_mixtral=True)


def notebook_cells(rt, **load):
    """What a notebook's loading cell does with the real-model flag: one model, one tokenizer."""
    tokenizer = rt.tokenizer() if "source" not in load else rt.tokenizer(load["source"])
    model = rt.load_model(**load)
    ids = tokenizer("def f(x):", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    return model, tokenizer, out


def test_authors_path_downloads_their_files_and_only_the_tokenizer_of_mistral(hub, hub_root, capsys):
    rt = real_runtime()
    model, tok, out = notebook_cells(rt)
    authors = hub.repo(R.AUTHORS_REPO)
    expected_authors = sorted(f.name for f in authors.iterdir())
    got = hub.files(R.AUTHORS_REPO)
    assert sorted(set(got)) == expected_authors                       # every file of the repository
    weights = [f for f in got if f.endswith(".safetensors")]
    assert len(weights) == len(set(weights))                          # each weight file exactly once
    assert hub.bytes(R.AUTHORS_REPO) - sum(f.stat().st_size for f in authors.iterdir()) < 4096   # + small json re-reads
    mistral_files = hub.files(R.MISTRAL_REPO)
    assert mistral_files and set(mistral_files) <= set(R.TOKENIZER_FILES)   # tokenizer files only
    assert not any(f.endswith((".safetensors", ".pt")) for f in mistral_files)
    assert R.is_complete(R.real_weights_dir("authors"))
    assert model.offload_options.experts_on_device >= 1 and out.shape[1] == 4 + len(tok("def f(x):").input_ids)
    with capsys.disabled():
        print(f"\n[stand-in hub] authors path: {len(expected_authors)} files, {hub.bytes(R.AUTHORS_REPO)} bytes "
              f"from {R.AUTHORS_REPO}; tokenizer: {mistral_files}, {hub.bytes(R.MISTRAL_REPO)} bytes "
              f"from {R.MISTRAL_REPO}")

    # A second notebook on the same machine: nothing more to download (the tokenizer is cached
    # by huggingface_hub on a real machine; the stand-in serves it again, and only it).
    before = list(hub.served)
    notebook_cells(rt)
    again = [f for _, f, _ in hub.served[len(before):]]
    assert set(again) <= set(R.TOKENIZER_FILES)


def test_mistral_path_downloads_config_index_and_shards_never_other_files(hub, hub_root, capsys):
    rt = real_runtime()
    model, tok, out = notebook_cells(rt, source="mistral")
    repo = hub.repo(R.MISTRAL_REPO)
    shards = sorted(f.name for f in repo.glob("model-*.safetensors"))
    weights = [f for f in hub.files(R.MISTRAL_REPO) if f not in R.TOKENIZER_FILES]
    assert len(shards) > 1
    assert sorted(set(weights)) == sorted(set(["config.json", "model.safetensors.index.json", "generation_config.json"]
                                              + shards) & set(weights))
    assert set(shards) <= set(weights) and "consolidated.00.pt" not in hub.files()
    assert hub.files(R.AUTHORS_REPO) == []
    shard_bytes = sum((repo / s).stat().st_size for s in shards)
    assert hub.bytes(R.MISTRAL_REPO) >= shard_bytes
    assert R.is_complete(R.real_weights_dir("mistral"))
    with capsys.disabled():
        print(f"\n[stand-in hub] mistral path: {len(shards)} shards, {shard_bytes} bytes of weights; all files: "
              f"{sorted(set(hub.files(R.MISTRAL_REPO)))}, {hub.bytes(R.MISTRAL_REPO)} bytes")


def test_the_plan_picks_the_experts_on_device(hub, monkeypatch):
    """A budget too small for every expert: the planner (not a fixed 4) chooses, and says so."""
    import moe_colab
    rt = real_runtime()
    directory = R.real_weights("authors")
    full = moe_colab.plan(directory, device="cpu", dtype=torch.float32)
    model = rt.load_model()
    assert (model.offload_options.experts_on_device, model.offload_options.swap) == (full.experts_on_device, full.swap)
    assert rt.load_kwargs()["experts_on_device"] == "auto"
