"""tools/peers.py: the benchmark's peers (transformers in RAM, Accelerate offloading to disk).

A tiny random Llama (hidden 64, 2 layers) runs through the real worker for both peers;
the sweep driver must turn an OOM kill into ``ok: false``; a flexgraph store written as
a Hugging Face folder must hold exactly the store's tensors.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
PEERS_PY = REPO / "tools" / "peers.py"


def _load(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


peers = _load("peers", PEERS_PY)
cgroup_run = _load("cgroup_run", REPO / "tools" / "cgroup_run.py")

TINY = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY))
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


def _worker(args: list[str], timeout: float = 120) -> dict:
    """The worker as the driver runs it: a subprocess printing one JSON line."""
    p = subprocess.run([sys.executable, str(PEERS_PY), "worker", "--threads", "1", *args], capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert lines, p.stdout + p.stderr[-2000:]
    return json.loads(lines[-1])


def _worker_here(capsys, args: list[str]) -> dict:
    """The same worker in this process (saves importing torch and transformers again)."""
    threads = torch.get_num_threads()
    try:
        assert peers.main(["worker", "--threads", "1", *args]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def _check_result(r: dict, batch: int, gen: int) -> None:
    for field in peers.RESULT_FIELDS:
        assert field in r, field
    assert r["ok"] is True
    assert r["batch"] == batch and r["gen_len"] == gen
    assert r["total_s"] > 0 and r["prefill_s"] > 0 and r["decode_s"] >= 0
    assert r["prefill_s"] + r["decode_s"] == pytest.approx(r["total_s"], rel=1e-9)
    assert r["throughput"] == pytest.approx(batch * gen / r["total_s"], rel=1e-9)
    assert r["tokens_timed"] == gen
    assert r["peak_rss"] > 0


def test_worker_transformers(tiny_hf):
    r = _worker(["--peer", "transformers", "--model-dir", str(tiny_hf), "--batch", "3", "--prompt-len", "16",
                 "--gen-len", "5", "--dtype", "bfloat16"])
    _check_result(r, 3, 5)
    assert r["peer"] == "transformers"
    assert r["head_input"] == "contiguous"


def test_worker_runs_the_head_as_shipped_when_asked(tiny_hf, capsys):
    r = _worker_here(capsys, ["--peer", "transformers", "--model-dir", str(tiny_hf), "--batch", "2",
                              "--prompt-len", "8", "--gen-len", "2", "--head-input", "as-is"])
    _check_result(r, 2, 2)
    assert r["head_input"] == "as-is"


def _head_inputs(model, ids) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The inputs the output head saw in one prefill forward (logits of the last position,
    as generate asks for them), and the logits."""
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    try:
        with torch.inference_mode():
            logits = model(input_ids=ids, logits_to_keep=1).logits
    finally:
        hook.remove()
    return seen, logits


def test_contiguous_head_input_gives_the_head_a_contiguous_input_and_the_same_logits():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY)).eval()
    ids = torch.randint(3, TINY["vocab_size"], (3, 16))
    shipped, want = _head_inputs(model, ids)
    assert peers.contiguous_head_input(model)
    given, got = _head_inputs(model, ids)
    assert len(shipped) == len(given) == 1
    assert given[0].shape == (3, 1, TINY["hidden_size"]) and given[0].is_contiguous()
    # what the hook is for: transformers hands the head a [B, 1, H] view of [B, P, H]
    # (batch stride P x H), which PyTorch's matmul does not fold into one product
    assert shipped[0].stride()[0] == 16 * TINY["hidden_size"], "transformers no longer slices the prefill's head input"
    torch.testing.assert_close(got, want, rtol=0, atol=0)


needs_accelerate = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                      reason="accelerate is not installed")


@needs_accelerate
def test_worker_accelerate_offloads_to_folder(tiny_hf, tmp_path, capsys):
    off = tmp_path / "offload"
    r = _worker_here(capsys, ["--peer", "accelerate", "--model-dir", str(tiny_hf), "--batch", "2", "--prompt-len", "16",
                 "--gen-len", "4", "--max-memory", "40000", "--offload", "folder", "--offload-folder", str(off)])
    _check_result(r, 2, 4)
    assert r["device_bytes"].get("disk", 0) > 0                       # the device map put weights on disk
    files = [p for p in off.rglob("*") if p.is_file() and p.name != "index.json"]
    assert files, "nothing was written to the offload folder"
    assert r["offload_folder_bytes"] >= r["device_bytes"]["disk"]
    assert r["max_memory"] == 40000


@needs_accelerate
def test_worker_accelerate_float32_from_a_bfloat16_checkpoint_offloads_bfloat16(tiny_hf, tmp_path, capsys):
    """What ``bench.py --peer-checkpoint bfloat16`` rests on: computing in float32 from a
    bfloat16 checkpoint, Accelerate writes the disk part as the checkpoint holds it and
    converts as it reads, so a step reads half the bytes of its float32 parameters."""
    off = tmp_path / "offload"
    r = _worker_here(capsys, ["--peer", "accelerate", "--model-dir", str(tiny_hf), "--batch", "2", "--prompt-len", "8",
                              "--gen-len", "3", "--dtype", "float32", "--max-memory", "40000",
                              "--offload", "folder", "--offload-folder", str(off)])
    _check_result(r, 2, 3)
    assert r["dtype"] == "float32"
    disk = r["device_bytes"]["disk"]                                  # float32 parameters mapped to disk
    assert disk > 0
    assert 0.5 * disk <= r["offload_folder_bytes"] < 0.6 * disk       # held in bfloat16 (+ index.json)


@needs_accelerate
def test_worker_accelerate_checkpoint_mode(tiny_hf, tmp_path, capsys):
    """from_pretrained(device_map=...): disk weights stay in (and are read from) the checkpoint."""
    r = _worker_here(capsys, ["--peer", "accelerate", "--model-dir", str(tiny_hf), "--batch", "2", "--prompt-len", "8",
                 "--gen-len", "3", "--max-memory", "40000", "--offload", "checkpoint",
                                "--offload-folder", str(tmp_path / "off")])
    _check_result(r, 2, 3)
    assert r["offload"] == "checkpoint"
    assert r["device_bytes"].get("disk", 0) > 0


def _small_disk(monkeypatch, free: int) -> None:
    """The offload folder's disk as ``shutil.disk_usage`` reports it: ``free`` bytes free."""
    real = peers.shutil.disk_usage
    monkeypatch.setattr(peers.shutil, "disk_usage", lambda path: real(path)._replace(free=free))


@needs_accelerate
def test_worker_accelerate_auto_copies_to_the_folder_where_it_fits(tiny_hf, tmp_path, capsys):
    off = tmp_path / "offload"
    r = _worker_here(capsys, ["--peer", "accelerate", "--model-dir", str(tiny_hf), "--batch", "2", "--prompt-len", "8",
                              "--gen-len", "3", "--max-memory", "40000", "--offload-folder", str(off)])
    _check_result(r, 2, 3)
    assert r["offload"] == "folder" and "offload_why" not in r
    assert r["offload_folder_bytes"] >= r["device_bytes"]["disk"] > 0


@needs_accelerate
def test_worker_accelerate_auto_reads_the_checkpoint_where_the_copy_would_fill_the_disk(
        tiny_hf, tmp_path, capsys, monkeypatch):
    """Llama-3.1-8B's copy filled this machine's disk and the worker died of SIGBUS:
    ``auto`` sees that coming and reads the checkpoint in place instead."""
    _small_disk(monkeypatch, peers.OFFLOAD_ROOM_SLACK)              # room for the slack, none for the copy
    off = tmp_path / "offload"
    r = _worker_here(capsys, ["--peer", "accelerate", "--model-dir", str(tiny_hf), "--batch", "2", "--prompt-len", "8",
                              "--gen-len", "3", "--max-memory", "40000", "--offload-folder", str(off)])
    _check_result(r, 2, 3)
    assert r["offload"] == "checkpoint"
    assert "needs" in r["offload_why"] and "free" in r["offload_why"]
    assert r["device_bytes"].get("disk", 0) > 0                       # still offloaded, from the checkpoint
    assert not [p for p in off.rglob("*") if p.is_file()]             # nothing copied


@needs_accelerate
def test_worker_accelerate_folder_that_cannot_fit_fails_in_one_line(tiny_hf, tmp_path, capsys, monkeypatch):
    _small_disk(monkeypatch, 0)
    off = tmp_path / "offload"
    code = peers.main(["worker", "--threads", "1", "--peer", "accelerate", "--model-dir", str(tiny_hf),
                       "--batch", "1", "--prompt-len", "8", "--gen-len", "2", "--max-memory", "40000",
                       "--offload", "folder", "--offload-folder", str(off)])
    r = json.loads([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][-1])
    assert code == 1 and r["ok"] is False and r["oom"] is False
    assert "needs" in r["reason"] and "--offload checkpoint" in r["reason"] and "\n" not in r["reason"]
    assert not [p for p in off.rglob("*") if p.is_file()]


TINY_OPT = dict(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4, vocab_size=256,
                max_position_embeddings=128, word_embed_proj_dim=64, pad_token_id=1, bos_token_id=2,
                eos_token_id=2)


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory) -> Path:
    """A tiny OPT: its head is tied to the input embedding, and the checkpoint holds the
    weight once (no lm_head.weight), as flexgraph's OPT folders do."""
    folder = tmp_path_factory.mktemp("tiny-opt")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.OPTConfig(**TINY_OPT))
    model.to(torch.bfloat16).save_pretrained(folder)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    return folder


@needs_accelerate
def test_worker_accelerate_auto_reads_the_checkpoint_where_a_tied_head_is_mapped_to_disk(tiny_opt, tmp_path, capsys):
    """(b)'s OPT-1.3B at batch 16 under 3 GiB: a budget of ~nothing maps all to disk, and
    folder offload then failed with KeyError: 'lm_head.weight'."""
    r = _worker_here(capsys, ["--peer", "accelerate", "--model-dir", str(tiny_opt), "--batch", "2", "--prompt-len", "8",
                              "--gen-len", "3", "--max-memory", "1", "--offload-folder", str(tmp_path / "off")])
    _check_result(r, 2, 3)
    assert r["offload"] == "checkpoint" and "tied" in r["offload_why"]
    assert r["device_bytes"].get("disk", 0) > 0


@needs_accelerate
def test_worker_accelerate_folder_with_a_tied_head_on_disk_fails_in_one_line(tiny_opt, tmp_path, capsys):
    code = peers.main(["worker", "--threads", "1", "--peer", "accelerate", "--model-dir", str(tiny_opt),
                       "--batch", "1", "--prompt-len", "8", "--gen-len", "2", "--max-memory", "1",
                       "--offload", "folder", "--offload-folder", str(tmp_path / "off")])
    r = json.loads([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][-1])
    assert code == 1 and r["ok"] is False
    assert "tied" in r["reason"] and "--offload checkpoint" in r["reason"] and "\n" not in r["reason"]


@needs_accelerate
def test_worker_accelerate_folder_serves_a_tied_head_kept_in_ram(tiny_opt, tmp_path, capsys):
    r = _worker_here(capsys, ["--peer", "accelerate", "--model-dir", str(tiny_opt), "--batch", "2", "--prompt-len", "8",
                              "--gen-len", "3", "--max-memory", "100000", "--offload-folder", str(tmp_path / "off")])
    _check_result(r, 2, 3)
    assert r["offload"] == "folder" and "offload_why" not in r


def test_mapped_device():
    dmap = {"model.decoder.embed_tokens": "cpu", "model.decoder.layers": "disk", "model.decoder.layers.0": "cpu"}
    assert peers.mapped_device(dmap, "model.decoder.embed_tokens") == "cpu"
    assert peers.mapped_device(dmap, "model.decoder.layers.0.fc1") == "cpu"
    assert peers.mapped_device(dmap, "model.decoder.layers.10.fc1") == "disk"
    assert peers.mapped_device(dmap, "model.decoder.layers_x") is None
    assert peers.mapped_device({"": "disk"}, "lm_head") == "disk"


def test_offload_mode():
    slack, folder = peers.OFFLOAD_ROOM_SLACK, Path("/x")
    assert peers.offload_mode("auto", 10, 10 + slack, folder) == ("folder", None)
    mode, why = peers.offload_mode("auto", 11, 10 + slack, folder)
    assert mode == "checkpoint" and "/x" in why
    assert peers.offload_mode("checkpoint", 11, 0, folder) == ("checkpoint", None)
    assert peers.offload_mode("folder", 10, 10 + slack, folder) == ("folder", None)
    with pytest.raises(RuntimeError, match="--offload checkpoint"):
        peers.offload_mode("folder", 11, 10 + slack, folder)


def test_exit_reason_names_the_signal():
    bus = peers.exit_reason(-7, "loading weights")
    assert "SIGBUS" in bus and "disk full" in bus and bus.endswith("loading weights")
    assert peers.exit_reason(-9, "") == "worker killed by SIGKILL: no output"
    assert peers.exit_reason(3, "boom") == "worker exited with 3: boom"


@needs_accelerate
def test_budget_is_derived_from_the_cap(tiny_hf, capsys):
    cap = 3 << 30
    r = _worker_here(capsys, ["--peer", "accelerate", "--model-dir", str(tiny_hf), "--batch", "1", "--prompt-len", "8",
                 "--gen-len", "2", "--cap", str(cap)])
    assert r["ok"]
    assert r["max_memory"] == cap - r["base_rss"] - r["kv_bytes"] - r["act_bytes"] - r["slack_bytes"]
    assert 0 < r["base_rss"] < cap
    assert r["device_bytes"] == {"cpu": r["device_bytes"]["cpu"]}     # a tiny model fits: nothing on disk


def test_synthetic_ids_match_flexgraph():
    from flexgraph.exec.prompts import synthetic_prompts
    ids = peers.synthetic_ids(3, 7, 500, seed=4)
    assert [tuple(r) for r in ids.tolist()] == [p.input_ids for p in synthetic_prompts(3, 7, 500, seed=4)]


def test_sweep_records_oom_and_stops(tiny_hf):
    why = cgroup_run.cgroup_problem()
    if why:
        pytest.skip(why)
    seen = []
    results = peers.sweep("transformers", tiny_hf, [4, 1, 2], 8, 2, "48MiB", on_result=seen.append)
    assert len(results) == 1 and seen == results                      # batch 1 OOMs: 2 and 4 not tried
    r = results[0]
    assert r["batch"] == 1 and r["ok"] is False and r["oom"] is True
    assert "OOM" in r["reason"]
    assert r["throughput"] is None
    assert peers.best(results) is None
    assert "no:" in peers.markdown_table(results)


def test_peers_run_as_shipped_unless_given_flexgraphs_allocator_setting(tiny_hf):
    why = cgroup_run.cgroup_problem()
    if why:
        pytest.skip(why)
    shipped = peers.run_one("transformers", tiny_hf, 1, 8, 2, "2GiB")
    given = peers.run_one("transformers", tiny_hf, 1, 8, 2, "2GiB", huge_pages=True)
    assert shipped["ok"] and given["ok"]
    assert (shipped["thp_mem_alloc"], given["thp_mem_alloc"]) == ("0", "1")


def test_best_and_table():
    rs = [{"peer": "x", "batch": 1, "ok": True, "throughput": 2.0, "total_s": 1.0},
          {"peer": "x", "batch": 8, "ok": True, "throughput": 5.0, "total_s": 1.0},
          {"peer": "x", "batch": 32, "ok": False, "throughput": None, "reason": "OOM-killed"}]
    assert peers.best(rs)["batch"] == 8
    table = peers.markdown_table(rs)
    assert "**best**" in table and table.count("\n") == 4


# --- Hugging Face folders from stores ------------------------------------------------------

def _dummy_store(tmp_path: Path, config: dict, dtype=torch.bfloat16):
    from flexgraph.models.spec import ModelSpec
    from flexgraph.weights.dummy import write_dummy
    spec = ModelSpec.from_hf_config(config, name="tiny")
    return write_dummy(spec, tmp_path / "store", dtype, seed=3, progress=False)


def _read_folder(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    out = {}
    for f in files:
        with safe_open(folder / f, framework="pt") as st:
            assert st.metadata() == {"format": "pt"}
            for k in st.keys():
                assert k not in out
                out[k] = st.get_tensor(k)
    return out


@pytest.mark.parametrize("family", ["opt", "llama-untied"])
def test_hf_folder_round_trip(tmp_path, family):
    if family == "opt":
        config = transformers.OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                                        word_embed_proj_dim=64, vocab_size=300, max_position_embeddings=64).to_dict()
    else:
        config = transformers.LlamaConfig(**TINY, tie_word_embeddings=False).to_dict()
    store = _dummy_store(tmp_path, config)
    # small shards: several files plus an index, and one tensor (the embeddings) bigger than a shard
    folder = peers.write_hf_folder(store, tmp_path / "hf", shard_bytes=20_000)
    tensors = _read_folder(folder)
    assert (folder / "model.safetensors.index.json").exists()
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map) == set(tensors)
    expected = set(store.names()) | ({"lm_head.weight"} if family != "opt" else set())
    assert set(tensors) == expected                                   # OPT's tied head is not written
    for name, t in tensors.items():
        assert torch.equal(t, store.read(name)), name
    # transformers loads it and sees the same weights (tied head included)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    sd = model.state_dict()
    for name in store.spec.all_weights():
        assert torch.equal(sd[name.name], store.read(name.name)), name.name


def test_hf_folder_converts_dtype_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXGRAPH_CACHE", str(tmp_path / "cache"))
    store = _dummy_store(tmp_path, transformers.LlamaConfig(**TINY, tie_word_embeddings=True).to_dict(),
                         dtype=torch.float32)
    folder = peers.hf_folder(str(store.path), dtype="bfloat16", progress=False)
    assert folder.parent == tmp_path / "cache" / "peers"
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    tensors = _read_folder(folder)
    assert "lm_head.weight" not in tensors                            # tied: the alias is not written
    for name, t in tensors.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, store.read(name, dtype=torch.bfloat16)), name
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert peers.hf_folder(str(store.path), dtype="bfloat16", progress=False) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime       # reused, not rewritten
    # an existing Hugging Face folder is used as it is
    assert peers.hf_folder(str(folder)) == folder
