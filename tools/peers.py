#!/usr/bin/env python3
"""The peers of the throughput benchmark: transformers in RAM, and Accelerate offloading to disk.

DESIGN.md ("What fast means here") compares flexgraph with two peers on the same
workload and under the same memory cap.  This tool runs the peers; ``tools/bench.py``
puts their numbers next to flexgraph's and the roofline's.

Workload
    ``batch`` prompts of ``prompt_len`` random token ids, drawn exactly as flexgraph's
    synthetic workload (``flexgraph.exec.prompts.synthetic_prompts``: one
    ``torch.Generator`` seeded with ``seed``, ``randint(0, vocab, (batch, prompt_len))``),
    attention mask all ones (no padding).  Greedy decoding of exactly ``gen_len`` tokens:
    ``generate(max_new_tokens=G, min_new_tokens=G, do_sample=False)``; ``min_new_tokens``
    masks EOS until G tokens exist and ``max_new_tokens`` stops there, so every sequence
    runs G steps (checked: the output must be ``[batch, P + G]``).

The two peers (both ``model.generate``, bfloat16 by default, KV cache in RAM)
    transformers   ``AutoModelForCausalLM.from_pretrained(dir, dtype=...)``: the whole
                   model in RAM, no device map.
    accelerate     weights split between RAM and disk by Accelerate's device map, built
                   from ``max_memory={"cpu": budget}`` (below); modules mapped to "disk"
                   hold meta tensors, and Accelerate's hooks read their weights from disk
                   before each forward of that module and drop them after.  Two ways to
                   get there, and ``auto`` to choose (``--offload``):
                   ``folder`` — Accelerate's own API: build the model on the
                   meta device (``init_empty_weights``), ``infer_auto_device_map`` with
                   the budget, then ``load_checkpoint_and_dispatch(...,
                   offload_folder=...)``, which copies every disk-mapped weight into
                   ``offload_folder`` as a raw ``.dat`` file (read back through numpy
                   memmaps) plus ``index.json``, and loads the cpu-mapped ones into
                   ordinary (anonymous) memory.
                   ``checkpoint`` — ``from_pretrained(dir, device_map="auto",
                   max_memory=..., offload_folder=..., dtype=...)``.  With a safetensors
                   checkpoint, transformers 5.x does *not* copy the disk part into
                   ``offload_folder`` (it stays empty): its offload index points at the
                   checkpoint's own safetensors files, which Accelerate reads per module
                   with ``safe_open(...).get_tensor``; the cpu-mapped weights stay
                   memory-mapped from the checkpoint, i.e. page cache that the kernel
                   evicts (and re-reads) under the cap.  Measured on OPT-1.3B under 3 GiB
                   (prompt 512, gen 32) it was slower than ``folder`` (batch 1: 0.77 vs
                   1.55 tok/s; batch 8: 1.68 vs 1.91 tok/s), hence ``auto``'s first choice.
                   ``auto`` (default) — ``folder`` where what it writes fits on the
                   offload folder's disk with ``OFFLOAD_ROOM_SLACK`` to spare, else
                   ``checkpoint``.  ``folder`` writes every weight while loading: the
                   disk-mapped ones to stay, the cpu-mapped ones staged by
                   ``offload_state_dict`` and read back.  Llama-3.1-8B's 16 GB did not
                   fit in the 13-15 GB free here: writing the next weight through numpy's
                   memmap killed the worker with SIGBUS (reported only as exit code -7
                   before 12-07).  ``auto`` also reads the checkpoint where the device map
                   puts a tied head (OPT's) on disk: ``folder`` writes the tied weight once,
                   under the embedding's name, and the head's hook then finds no
                   ``lm_head.weight`` (``KeyError``; (b) at batch 16 and 32).  ``folder``
                   given explicitly fails with a one-line error instead of trying.
                   All keep weights on disk; the JSON line reports the mode used
                   (``offload``, with ``offload_why`` where ``auto`` fell back), how many
                   bytes the device map put on "cpu" and on "disk" and what the folder
                   holds.

    The Accelerate weight budget is derived from the cap, not guessed: the worker
    measures its own RSS after importing torch/transformers/accelerate and reading the
    config (``base_rss``), then ``budget = cap - base_rss - kv - act - slack`` where
    ``kv`` is the full-length KV cache of the batch (2 x layers x batch x (P+G) x
    kv_heads x head_dim x itemsize, plus two layers' worth for DynamicCache's
    concatenation copies),
    ``act`` the prefill's transient activations (six [batch, P, hidden] tensors, two
    [batch, P, ffn] ones, the last position's logits; plus [batch, heads, P, P] float32
    scores with eager attention — PyTorch's CPU SDPA, the default, works in blocks), and
    ``slack`` two of the largest layer (the hooks materialise one layer's weights at a
    time, and the page cache of the file being read is charged to the cgroup too) plus
    256 MiB.  ``--max-memory`` overrides it.  The split is whatever Accelerate's
    ``infer_auto_device_map`` makes of that budget.

Timing (both peers, one process per measurement, inside the cgroup)
    1. load the model (not timed in the throughput; reported as ``load_s``);
    2. warm-up: ``generate`` on 1 prompt of 8 tokens for 2 new tokens.  It warms what
       is initialised lazily on first use: oneDNN/AMX kernel selection for bf16
       matmuls, transformers' generation setup (generation config, logits processors,
       cache classes, mask functions) and, for Accelerate, the hooks' first pass
       (it opens every offloaded file once).  For the Accelerate peer the page cache
       of the weight files is then evicted again (``posix_fadvise(DONTNEED)`` on the
       checkpoint / offload files: only our files, nothing else on the machine), so
       the measured run reads the disk-resident weights from disk, as a first run
       after dropping caches would;
    3. one measured ``generate`` of the whole batch with a streamer whose ``put`` is
       called by transformers with the prompt (before prefill) and then with each new
       token as soon as it is chosen.  ``prefill_s`` = time from calling ``generate``
       to the first new token (the prompt's forward pass + choosing token 1: what
       FlexGen calls prefill); ``decode_s`` = from there until ``generate`` returns
       (G-1 one-token steps); ``total_s = prefill_s + decode_s`` = the wall time of the
       call.  One run gives both, so they describe the same run — no second prefill.
    ``throughput = batch * gen_len / total_s`` (FlexGen's metric: generated tokens over
    prefill + decode time); ``decode_throughput = batch * (gen_len - 1) / decode_s`` is
    reported too, for comparison with decode-only figures.  ``peak_rss`` is the process's peak resident set
    (``ru_maxrss``, including loading); the driver adds the cgroup's peak (which also
    counts page cache) as ``cgroup_peak``.

The head's input (``--head-input``, default ``contiguous``): in the prefill, transformers
feeds the output head ``hidden_states[:, -1:, :]`` (``logits_to_keep=1``), a [batch, 1,
hidden] view whose batch stride is P x hidden.  PyTorch 2.13's ``matmul`` folds a 3-D
input into one 2-D product only when its strides nest (pytorch/pytorch#186148), so this
view goes to ``bmm`` with the weight expanded over the batch, and the CPU ``bmm`` copies
it: ``batch`` copies of the whole ``lm_head`` weight.  Measured 12-07 on the avx512_bf16
EPYC (``F.linear`` of that view against the same rows made contiguous): SmolLM2's
[49152, 576] head at batch 32, prompt 512: 1611 ms vs 14 ms; a [16384, 4096] slice of
Llama-3.1-8B's head at batch 8: 2400 ms vs 11 ms.  Llama-3.1-8B's whole head at batch 8
asked for 8 GiB of copies (one 8016 MiB anonymous mapping): under the 8 GiB cap the
Accelerate peer thrashed for good in that product at batch 8 and 16 before this.
flexgraph's own head takes ``x[:, -1:].contiguous()``.  So by default the peers get the
same: a forward pre-hook on the output embedding makes its input contiguous (one
[batch, 1, hidden] copy; the logits are the same numbers).  ``--head-input as-is``
measures the peers exactly as shipped; results record ``head_input``.  In (a)'s
transformers run (SmolLM2, batch 32) it made no measurable difference, though the bare
product lost 1.6 s at that shape; Accelerate's (b)-(d) gained (see the README).

Shared machines: each result records ``loadavg`` (1-minute load before and after the
run), ``threads`` and ``OMP_WAIT_POLICY``.  With other processes on the cores, libgomp's
spin-waiting makes PyTorch's default 2-thread runs collapse (SmolLM2 at load ~10:
0.39 tok/s at batch 1); ``OMP_WAIT_POLICY=PASSIVE`` in the environment (inherited by
the workers) avoids that.  Give every system in a comparison the same setting.

Allocator: a flexgraph run whose plan leaves room turns on PyTorch's
``THP_MEM_ALLOC_ENABLE`` (huge pages for large tensors, :mod:`flexgraph.hugepages`).
The peers run as shipped, with it off (``huge_pages=True`` gives it to them; recorded as
``thp_mem_alloc``): it speeds transformers up in RAM (SmolLM2 62.0 tok/s at batch 256
with it, 57.3 at batch 32 without), but made Accelerate OOM under the 3 GiB cap at
batch 4, which runs without.

Driver: ``sweep()`` runs each batch size in a fresh subprocess under
``tools/cgroup_run.run_capped`` (cgroup limit that counts page cache, page cache
dropped first).  A run that is OOM-killed, runs out of memory inside PyTorch, times
out or fails is recorded with ``ok: false`` and a ``reason``; after the first
out-of-memory batch the sweep does not try larger ones.  ``best()`` picks the highest
throughput among the successful runs.

Models: ``hf_folder(model)`` gives a Hugging Face folder (config.json + safetensors)
with exactly the weights flexgraph uses: ``smollm2-135m`` (the bundled model's store),
a built-in id (``opt-1.3b``, ``opt-6.7b``, ``llama-3.1-8b``, ...: flexgraph's dummy store
for that dtype and seed), a flexgraph store folder, or an existing HF folder (used as
is).  Stores are converted tensor by tensor into shards of at most ~1 GiB (a single
tensor larger than that gets its own shard) written by a small streaming safetensors
writer, so at most one tensor is in memory; cached under
``$FLEXGRAPH_CACHE/peers/`` (default ``~/.cache/flexgraph/peers``).

Command line::

    python tools/peers.py sweep --peer transformers --model smollm2-135m \\
        --batches 1,8,32 --prompt-len 512 --gen-len 32 --cap 8GiB
    python tools/peers.py prepare --model opt-1.3b            # just make the HF folder
    python tools/peers.py worker --peer accelerate --model-dir DIR --batch 8 \\
        --prompt-len 512 --gen-len 32 --cap 3GiB --offload-folder /tmp/off
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

PEERS = ("transformers", "accelerate")
OFFLOAD_MODES = ("auto", "folder", "checkpoint")
DEFAULT_OFFLOAD = "auto"       # folder (measured faster here) where its copy fits on the disk
# room left on the offload folder's disk beyond the copy: the checkpoint's page cache,
# index.json, and whatever else writes there meanwhile
OFFLOAD_ROOM_SLACK = 1 << 30
HEAD_INPUTS = ("contiguous", "as-is")
DEFAULT_HEAD_INPUT = "contiguous"     # see "The head's input" above
RESULT_FIELDS = ("peer", "batch", "prompt_len", "gen_len", "prefill_s", "decode_s", "total_s",
                 "throughput", "peak_rss", "ok")
SHARD_BYTES = 1 << 30
WARMUP_PROMPT, WARMUP_NEW = 8, 2
TOOLS = Path(__file__).resolve().parent
MiB = 1 << 20


# =======================================================================================
# Hugging Face folders from flexgraph stores
# =======================================================================================

_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int8": "I8",
              "uint8": "U8", "int16": "I16", "int32": "I32", "int64": "I64", "bool": "BOOL"}


def peers_dir() -> Path:
    """``$FLEXGRAPH_CACHE/peers`` (default ``~/.cache/flexgraph/peers``)."""
    from flexgraph.weights.cache import cache_root
    return cache_root() / "peers"


def _store_tensors(store) -> list[tuple[str, str]]:
    """(name in the HF folder, stored tensor it comes from), in storage order.  A tied
    head (``lm_head.weight`` aliasing the embeddings while the config ties them) is left
    out, as transformers' own checkpoints do; any other alias is written as a copy."""
    pairs = [(name, name) for name in store.names()]
    for alias, target in store.aliases.items():
        if alias == "lm_head.weight" and store.spec.tie_word_embeddings:
            continue
        pairs.append((alias, target))
    return pairs


def _write_safetensors(path: Path, store, pairs: list[tuple[str, str]], dtype) -> int:
    """Write one safetensors file from ``store`` reading one tensor at a time (the
    header can be written first: shapes and dtypes are known from the index).  Returns
    the bytes of tensor data."""
    import torch
    from flexgraph.weights.store import dtype_name

    header: dict[str, Any] = {}
    offset = 0
    for out_name, src in pairs:
        e = store.entry(src)
        dt = dtype if (dtype is not None and e.dtype.is_floating_point) else e.dtype
        n = e.numel * dt.itemsize
        header[out_name] = {"dtype": _ST_DTYPES[dtype_name(dt)], "shape": list(e.shape),
                            "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)                        # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for out_name, src in pairs:
            e = store.entry(src)
            dt = dtype if (dtype is not None and e.dtype.is_floating_point) else e.dtype
            t = store.read(src, dtype=dt).contiguous()   # checks the tensor's sha256
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            del t
        f.flush()
        os.fsync(f.fileno())
    return offset


def write_hf_folder(store, out: str | Path, dtype=None, shard_bytes: int = SHARD_BYTES,
                    progress: bool = False) -> Path:
    """Write ``store`` as a Hugging Face folder at ``out``: config.json (``torch_dtype``
    set to what is written), safetensors shards of at most ``shard_bytes`` (+ a
    ``model.safetensors.index.json`` when there is more than one), the tokenizer if the
    store has one.  ``dtype``: convert floating tensors to it (None keeps the stored
    dtypes).  At most one tensor is in memory.  Written into a hidden sibling folder
    renamed into place at the end."""
    from flexgraph.weights.store import CONFIG, TOKENIZER_DIR, dtype_name

    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        pairs = _store_tensors(store)

        def size(src: str) -> int:
            e = store.entry(src)
            return e.numel * (dtype.itemsize if dtype is not None and e.dtype.is_floating_point
                              else e.dtype.itemsize)

        shards: list[list[tuple[str, str]]] = [[]]
        filled = 0
        for pair in pairs:
            n = size(pair[1])
            if shards[-1] and filled + n > shard_bytes:
                shards.append([])
                filled = 0
            shards[-1].append(pair)
            filled += n
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        total, weight_map = 0, {}
        for i, (fname, shard) in enumerate(zip(names, shards)):
            if progress:
                print(f"peers: writing {out.name}/{fname} ({i + 1}/{len(shards)})", file=sys.stderr, flush=True)
            total += _write_safetensors(tmp / fname, store, shard, dtype)
            weight_map.update({name: fname for name, _ in shard})
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        config = json.loads((store.path / CONFIG).read_text())
        if dtype is not None:
            config["torch_dtype"] = dtype_name(dtype)
            config.pop("dtype", None)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tok = store.path / TOKENIZER_DIR
        if tok.is_dir():
            for f in tok.iterdir():
                if f.is_file():
                    shutil.copyfile(f, tmp / f.name)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _store_for(model: str, dtype, seed: int, progress: bool):
    """The flexgraph store of ``model``: the bundled model, a built-in id's dummy, or a store folder."""
    from flexgraph.weights.bundled import bundled_store, is_bundled_id
    from flexgraph.weights.resolve import materialize, resolve_model
    from flexgraph.weights.store import WeightStore, INDEX

    if is_bundled_id(model):
        return bundled_store(progress=progress)
    p = Path(model).expanduser()
    if p.is_dir() and (p / INDEX).is_file():
        return WeightStore.open(p)
    ref = resolve_model(model, dummy=True, seed=seed)
    return materialize(ref, dtype=dtype, progress=progress)


def hf_folder(model: str, dtype: str = "bfloat16", seed: int = 0, progress: bool = True) -> Path:
    """A Hugging Face folder holding the same weights flexgraph runs for ``model``
    (see the module docstring), made once and cached under :func:`peers_dir`."""
    from flexgraph.weights.cache import cache_lock, safe_component
    from flexgraph.weights.store import CONFIG, INDEX, dtype_name, parse_dtype

    p = Path(model).expanduser()
    if p.is_dir() and (p / CONFIG).is_file() and not (p / INDEX).is_file():
        return p.resolve()                                # already a Hugging Face folder
    dt = parse_dtype(dtype)
    store = _store_for(model, dt, seed, progress)
    # the store's identity (sha256 of its index) names the folder: other weights, other folder
    out = peers_dir() / f"{safe_component(store.spec.name)}-{dtype_name(dt)}-{store.index_checksum[:12]}"
    with cache_lock(f"peers-{out.name}"):
        if (out / CONFIG).is_file():
            return out
        write_hf_folder(store, out, dtype=dt if dt.is_floating_point else None, progress=progress)
    return out


# =======================================================================================
# The worker: runs inside the cgroup
# =======================================================================================

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # KiB on Linux


def synthetic_ids(batch: int, prompt_len: int, vocab_size: int, seed: int = 0):
    """Same ids as ``flexgraph.exec.prompts.synthetic_prompts(batch, prompt_len, vocab, seed)``."""
    import torch
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, prompt_len), generator=g)


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def estimate_run_bytes(config, batch: int, prompt_len: int, gen_len: int, itemsize: int,
                       attn: str = "sdpa") -> dict[str, int]:
    """Memory a run needs besides the weights: the KV cache and the prefill's transients.
    ``attn``: the attention implementation; "eager" materialises [batch, heads, P, P]
    float32 scores, PyTorch's CPU SDPA (flash kernel) works in blocks and does not."""
    c = _text_config(config)
    hidden = c.hidden_size
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    layers = c.num_hidden_layers
    ffn = getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None) or 4 * hidden
    seq = prompt_len + gen_len
    # DynamicCache grows by torch.cat: the new tensor and the old one coexist for one layer
    kv = 2 * layers * batch * seq * kv_heads * head_dim * itemsize
    kv += 2 * kv // layers
    tokens = batch * prompt_len
    act = (6 * tokens * hidden + 2 * tokens * ffn) * itemsize
    if attn != "sdpa":
        act += batch * heads * prompt_len * prompt_len * 4
    act += batch * c.vocab_size * 4 * 2                   # last-position logits (float32) and their copy
    return {"kv": kv, "act": act}


def _largest_layer_bytes(model) -> int:
    """Bytes of the largest no-split block (or top-level child) of a meta model."""
    classes = set(getattr(model, "_no_split_modules", None) or [])
    best = 0
    for _, mod in model.named_modules():
        if type(mod).__name__ in classes:
            best = max(best, sum(p.numel() * p.element_size() for p in mod.parameters()))
    if not best:
        for mod in model.children():
            best = max(best, sum(p.numel() * p.element_size() for p in mod.parameters()))
    return best


def _evict_page_cache(paths: Iterable[Path]) -> int:
    """Drop our own files' clean pages from the page cache (pages mapped by a process
    stay).  Returns the number of files advised."""
    n = 0
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            n += 1
        finally:
            os.close(fd)
    return n


def _files_under(folder: Path | None, suffixes: tuple[str, ...]) -> list[Path]:
    if folder is None or not Path(folder).is_dir():
        return []
    return [p for p in Path(folder).rglob("*") if p.is_file() and p.name.endswith(suffixes)]


def _folder_bytes(folder: Path | None) -> int:
    return sum(p.stat().st_size for p in _files_under(folder, ("",)))


def offload_mode(asked: str, copy_bytes: int, free_bytes: int, folder: Path) -> tuple[str, str | None]:
    """``(mode, why)``: the Accelerate offload mode to use for ``asked`` when ``folder``
    mode would write ``copy_bytes`` and the offload folder's disk has ``free_bytes``
    free — ``folder`` copies weights there, ``checkpoint`` reads the checkpoint in
    place.  ``why`` says why ``auto`` chose ``checkpoint``; an explicit ``folder`` that
    does not fit raises, before the copy fills the disk."""
    if asked == "checkpoint" or copy_bytes + OFFLOAD_ROOM_SLACK <= free_bytes:
        return ("folder" if asked == "auto" else asked), None
    from flexgraph.sizes import format_size
    short = (f"the offload folder {folder} needs {format_size(copy_bytes)} while loading "
             f"(+{format_size(OFFLOAD_ROOM_SLACK)} to spare) and its disk has {format_size(free_bytes)} free")
    if asked == "folder":
        raise RuntimeError(f"{short}: free space, pass --offload-folder on a bigger disk, or use "
                           f"--offload checkpoint (reads the checkpoint in place)")
    return "checkpoint", short


def mapped_device(dmap: dict[str, Any], name: str) -> Any:
    """The device ``dmap`` gives module ``name``: its longest entry naming the module or
    one of its parents ("" is the whole model); None if none does."""
    keys = [k for k in dmap if k == "" or name == k or name.startswith(k + ".")]
    return dmap[max(keys, key=len)] if keys else None


def tied_head_on_disk(model, dmap: dict[str, Any]) -> str | None:
    """The output head's module name, where its weight is the input embedding's (tied,
    as OPT's is) and ``dmap`` puts the head on disk; else None.  Accelerate's ``folder``
    offload then fails: it writes the tied weight once, under the embedding's name, and
    the head's hook asks the folder for ``<head>.weight`` (``KeyError: 'lm_head.weight'``
    for (b)'s OPT-1.3B at batch 16 and 32 under 3 GiB, whose budget maps all to disk)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or head.weight is not embed.weight:
        return None
    name = next(n for n, m in model.named_modules() if m is head)
    return name if mapped_device(dmap, name) == "disk" else None


def _device_bytes(model, dmap: dict[str, Any] | None = None) -> dict[str, int]:
    """Parameter bytes per device-map entry ("cpu", "disk") of ``dmap`` (default: the
    model's own ``hf_device_map``)."""
    dmap = dmap or getattr(model, "hf_device_map", None) or {"": "cpu"}
    out: dict[str, int] = {}
    params = dict(model.named_parameters())
    # meta tensors still know their shape and dtype
    for name, p in params.items():
        dev = mapped_device(dmap, name)
        dev = "cpu" if dev is None else str(dev)
        out[dev] = out.get(dev, 0) + p.numel() * p.element_size()
    return out


class _Clock:
    """A transformers streamer that only timestamps: ``put`` is called with the prompt
    before prefill, then once per generated token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _load(args, config, dtype) -> tuple[Any, dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM

    info: dict[str, Any] = {}
    if args.peer == "transformers":
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
        return model.eval(), info

    # ---- accelerate: derive the weight budget from the cap ---------------------------
    from accelerate import init_empty_weights
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config, dtype=dtype)
    largest = _largest_layer_bytes(meta)
    no_split = list(getattr(meta, "_no_split_modules", None) or [])
    base = _rss()
    need = estimate_run_bytes(config, args.batch, args.prompt_len, args.gen_len, dtype.itemsize,
                              attn=str(getattr(meta.config, "_attn_implementation", None) or "sdpa"))
    slack = 2 * largest + 256 * MiB
    if args.max_memory is not None:
        budget = int(args.max_memory)
    elif args.cap is not None:
        budget = int(args.cap) - base - need["kv"] - need["act"] - slack
    else:
        raise SystemExit("peers worker: the accelerate peer needs --cap or --max-memory")
    budget = max(budget, 0)
    info.update(base_rss=base, kv_bytes=need["kv"], act_bytes=need["act"], slack_bytes=slack,
                largest_layer_bytes=largest, max_memory=budget)
    max_memory = {"cpu": budget}
    folder = Path(args.offload_folder)
    folder.mkdir(parents=True, exist_ok=True)
    info["offload_folder"] = str(folder)

    mode, dmap = args.offload, None
    if mode != "checkpoint":
        from accelerate import infer_auto_device_map
        meta.tie_weights()
        dmap = infer_auto_device_map(meta, max_memory={**max_memory, "disk": 1 << 50},
                                     no_split_module_classes=no_split, dtype=dtype)
        # the folder gets the disk-mapped weights, and while loading the cpu-mapped ones
        # too: offload_state_dict stages them on disk (a mkdtemp under TMPDIR, which
        # run_one points at the same disk) and reads them back
        placed = _device_bytes(meta, dmap)
        mode, why = offload_mode(mode, placed.get("disk", 0) + placed.get("cpu", 0), shutil.disk_usage(folder).free,
                                 folder)
        head = tied_head_on_disk(meta, dmap) if mode == "folder" else None
        if head:
            why = (f"the head {head!r} is tied to the input embedding and mapped to disk: Accelerate's "
                   f"folder offload writes the tied weight once, under the embedding's name, and the "
                   f"head's hook then finds no {head}.weight (KeyError)")
            if args.offload == "folder":
                raise RuntimeError(f"{why}; use --offload checkpoint or a larger --max-memory")
            mode = "checkpoint"
        if why:
            info["offload_why"] = why
    info["offload"] = mode

    if mode == "checkpoint":
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, device_map="auto", max_memory=max_memory,
                                                     offload_folder=str(folder), dtype=dtype)
    else:
        from accelerate import load_checkpoint_and_dispatch
        if set(dmap.values()) == {"disk"}:
            # accelerate's load_state_dict hands a single-device map's device to
            # safetensors, which rejects "disk": map each module with parameters
            # explicitly and keep the smallest (a norm) on cpu
            own = {n: sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
                   for n, m in meta.named_modules() if next(m.parameters(recurse=False), None) is not None}
            dmap = {n: "disk" for n in own}
            dmap[min(own, key=own.get)] = "cpu"
        model = load_checkpoint_and_dispatch(meta, args.model_dir, device_map=dmap, offload_folder=str(folder),
                                             dtype=dtype, no_split_module_classes=no_split,
                                             offload_state_dict=True)
        model.hf_device_map = dmap
    del meta
    model.eval()
    info["device_bytes"] = _device_bytes(model)
    info["offload_folder_bytes"] = _folder_bytes(folder)
    return model, info


def contiguous_head_input(model) -> bool:
    """Make the output head's input contiguous before its product (see "The head's input"
    in the module docstring); False where the model has no output embedding."""
    import torch
    head = model.get_output_embeddings()
    if head is None:
        return False

    def _contiguous(module, args):
        return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)

    head.register_forward_pre_hook(_contiguous)
    return True


def run_worker(args) -> dict[str, Any]:
    """Load, warm up, measure; returns the result dict (see the module docstring)."""
    t0 = time.perf_counter()
    import torch
    import transformers
    from transformers import AutoConfig
    if args.peer == "accelerate":
        import accelerate  # noqa: F401  (imported before measuring base_rss)
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    dtype = getattr(torch, args.dtype)
    config = AutoConfig.from_pretrained(args.model_dir)
    vocab = _text_config(config).vocab_size
    result: dict[str, Any] = {"peer": args.peer, "batch": args.batch, "prompt_len": args.prompt_len,
                              "gen_len": args.gen_len, "dtype": args.dtype, "model_dir": str(args.model_dir),
                              "threads": torch.get_num_threads(),
                              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                              "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE")}
    model, info = _load(args, config, dtype)
    result.update(info)
    head_input = args.head_input
    if head_input == "contiguous" and not contiguous_head_input(model):
        head_input = "as-is (no output embedding)"
    result["head_input"] = head_input
    result["load_s"] = round(time.perf_counter() - t0, 3)
    result["rss_after_load"] = _rss()

    pad = _text_config(config).pad_token_id
    eos = _text_config(config).eos_token_id
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos) or 0
    ids = synthetic_ids(args.batch, args.prompt_len, vocab, args.seed)
    gen_kwargs = dict(do_sample=False, pad_token_id=pad, num_beams=1, use_cache=True)
    with torch.inference_mode():
        # warm-up: 1 prompt, 8 tokens, 2 new tokens (see the module docstring)
        w = ids[:1, :min(WARMUP_PROMPT, args.prompt_len)]
        model.generate(input_ids=w, attention_mask=torch.ones_like(w), max_new_tokens=WARMUP_NEW,
                       min_new_tokens=WARMUP_NEW, **gen_kwargs)
        if args.peer == "accelerate":
            files = _files_under(Path(args.model_dir), (".safetensors",)) + \
                _files_under(Path(result["offload_folder"]), (".dat", ".safetensors"))
            result["evicted_files"] = _evict_page_cache(files)

        clock = _Clock()
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.gen_len,
                             min_new_tokens=args.gen_len, streamer=clock, **gen_kwargs)
        end = time.perf_counter()
    shape = tuple(out.shape)
    if shape != (args.batch, args.prompt_len + args.gen_len):
        raise RuntimeError(f"generate returned shape {shape}, expected {(args.batch, args.prompt_len + args.gen_len)}")
    first = clock.times[1] if len(clock.times) > 1 else end     # times[0]: the prompt
    prefill, total = first - start, end - start
    result.update(prefill_s=prefill, decode_s=total - prefill, total_s=total,
                  throughput=args.batch * args.gen_len / total, peak_rss=_peak_rss(), ok=True,
                  decode_throughput=args.batch * (args.gen_len - 1) / (total - prefill) if args.gen_len > 1 else None,
                  tokens_timed=len(clock.times) - 1, loadavg=[round(load_before, 2), round(os.getloadavg()[0], 2)])
    if args.peer == "accelerate":
        result["offload_folder_bytes"] = _folder_bytes(Path(result["offload_folder"]))
    return result


def _is_oom_message(text: str) -> bool:
    t = text.lower()
    return any(s in t for s in ("out of memory", "can't allocate memory", "cannot allocate memory",
                                "memoryerror", "not enough memory"))


def worker_main(args) -> int:
    own_folder = None
    if args.peer == "accelerate" and not args.offload_folder:
        own_folder = args.offload_folder = tempfile.mkdtemp(prefix="peers-offload-")
    try:
        result = run_worker(args)
        code = 0
    except BaseException as e:       # report, do not crash silently: the driver reads this line
        if isinstance(e, KeyboardInterrupt):
            raise
        traceback.print_exc(file=sys.stderr)
        msg = f"{type(e).__name__}: {e}".strip().splitlines()[0][:500]
        result = {"peer": args.peer, "batch": args.batch, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
                  "prefill_s": None, "decode_s": None, "total_s": None, "throughput": None,
                  "peak_rss": _peak_rss(), "ok": False, "reason": msg,
                  "oom": isinstance(e, MemoryError) or _is_oom_message(msg)}
        code = 1
    finally:
        if own_folder:
            shutil.rmtree(own_folder, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return code


# =======================================================================================
# The driver: one capped subprocess per batch size
# =======================================================================================

def _cgroup_run():
    """tools/cgroup_run.py as a module (tools/ is not a package)."""
    if "cgroup_run" in sys.modules:
        return sys.modules["cgroup_run"]
    import importlib.util
    spec = importlib.util.spec_from_file_location("cgroup_run", TOOLS / "cgroup_run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["cgroup_run"] = mod
    spec.loader.exec_module(mod)
    return mod


def worker_command(peer: str, model_dir: str | Path, batch: int, prompt_len: int, gen_len: int,
                   dtype: str = "bfloat16", cap_bytes: int | None = None, max_memory: int | None = None,
                   offload_folder: str | Path | None = None, offload: str = DEFAULT_OFFLOAD,
                   seed: int = 0, threads: int | None = None, head_input: str = DEFAULT_HEAD_INPUT) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "worker", "--peer", peer, "--model-dir", str(model_dir),
           "--batch", str(batch), "--prompt-len", str(prompt_len), "--gen-len", str(gen_len), "--dtype", dtype,
           "--seed", str(seed), "--head-input", head_input]
    if cap_bytes is not None:
        cmd += ["--cap", str(int(cap_bytes))]
    if max_memory is not None:
        cmd += ["--max-memory", str(int(max_memory))]
    if offload_folder is not None:
        cmd += ["--offload-folder", str(offload_folder)]
    if peer == "accelerate":
        cmd += ["--offload", offload]
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


def _last_json(stdout: bytes | None) -> dict | None:
    for line in reversed((stdout or b"").decode(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def _tail(data: bytes | None, n: int = 1) -> str:
    lines = [ln for ln in (data or b"").decode(errors="replace").splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[:500]


def exit_reason(returncode: int, last_line: str) -> str:
    """Why a worker that printed no result ended: its signal by name (a SIGBUS comes from a
    memory-mapped file the kernel could not back, most often a full disk under numpy's
    memmap in the offload folder), or its exit code, and its last line of stderr."""
    if returncode < 0:
        import signal
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (a memory-mapped file could not be backed: is the offload folder's disk full?)" \
            if name == "SIGBUS" else ""
        return f"worker killed by {name}{hint}: {last_line or 'no output'}"
    return f"worker exited with {returncode}: {last_line or 'no output'}"


def run_one(peer: str, model_dir: str | Path, batch: int, prompt_len: int, gen_len: int, cap_bytes: int,
            dtype: str = "bfloat16", *, max_memory: int | None = None, offload: str = DEFAULT_OFFLOAD,
            timeout: float | None = None, seed: int = 0, threads: int | None = None,
            drop_caches: bool = True, huge_pages: bool = False,
            head_input: str = DEFAULT_HEAD_INPUT) -> dict[str, Any]:
    """One worker run in a fresh cgroup capped at ``cap_bytes``; never raises for the
    run's own failures (they come back with ``ok: false`` and a ``reason``)."""
    from flexgraph.sizes import format_size, parse_size
    cg = _cgroup_run()
    cap_bytes = parse_size(cap_bytes)
    base = {"peer": peer, "batch": batch, "prompt_len": prompt_len, "gen_len": gen_len, "prefill_s": None,
            "decode_s": None, "total_s": None, "throughput": None, "peak_rss": None, "ok": False,
            "cap": cap_bytes}
    peers_dir().mkdir(parents=True, exist_ok=True)       # on the same disk as the cache, not tmpfs
    # the worker's own temporary files (transformers stages offloaded shards in a mkdtemp)
    # go here too, so that a worker killed by the cap or a signal leaves nothing behind
    scratch = Path(tempfile.mkdtemp(prefix="offload-", dir=peers_dir()))
    cmd = worker_command(peer, model_dir, batch, prompt_len, gen_len, dtype, cap_bytes=cap_bytes,
                         max_memory=max_memory, offload_folder=scratch / "offload" if peer == "accelerate" else None,
                         offload=offload, seed=seed, threads=threads, head_input=head_input)
    env = {**os.environ, "TMPDIR": str(scratch), "THP_MEM_ALLOC_ENABLE": "1" if huge_pages else "0"}
    try:
        r = cg.run_capped(cmd, cap_bytes, capture_output=True, timeout=timeout, drop_caches=drop_caches, env=env)
    except Exception as e:      # timeout (run_capped killed the worker), cgroup trouble
        import subprocess
        why = f"timed out after {timeout} s" if isinstance(e, subprocess.TimeoutExpired) else f"{type(e).__name__}: {e}"
        return {**base, "reason": why, "oom": False}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    line = _last_json(r.stdout)
    res = {**base, **(line or {})}
    res.update(cap=cap_bytes, cgroup_peak=r.peak_bytes, wall_s=round(r.wall_seconds, 3), returncode=r.returncode,
               caches_dropped=r.caches_dropped)
    if r.oom_killed:
        res.update(ok=False, oom=True, reason=f"OOM-killed by the cgroup (cap {format_size(cap_bytes)}, "
                                                f"peak {format_size(r.peak_bytes or 0)})")
    elif line is None or r.returncode != 0:
        res["ok"] = False
        res.setdefault("reason", exit_reason(r.returncode, _tail(r.stderr)))
        res.setdefault("oom", _is_oom_message(_tail(r.stderr, 5)))
    else:
        res.setdefault("oom", False)
    return res


def sweep(peer: str, model_dir: str | Path, batches: Sequence[int], prompt_len: int, gen_len: int,
          cap_bytes: int | str, dtype: str = "bfloat16", *, offload: str = DEFAULT_OFFLOAD,
          max_memory: int | None = None, timeout: float | None = None, seed: int = 0,
          threads: int | None = None, on_result: Callable[[dict], None] | None = None,
          huge_pages: bool = False, head_input: str = DEFAULT_HEAD_INPUT) -> list[dict[str, Any]]:
    """Run ``peer`` for each batch size (ascending), each in a fresh capped subprocess.
    Failed runs are results with ``ok: false``; after the first out-of-memory batch the
    larger ones are not tried (a timeout or other failure does not stop the sweep)."""
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")
    results = []
    for b in sorted(set(int(x) for x in batches)):
        res = run_one(peer, model_dir, b, prompt_len, gen_len, cap_bytes, dtype, max_memory=max_memory,
                      offload=offload, timeout=timeout, seed=seed, threads=threads, huge_pages=huge_pages,
                      head_input=head_input)
        results.append(res)
        if on_result is not None:
            on_result(res)
        if not res["ok"] and res.get("oom"):
            break
    return results


def best(results: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The successful result with the highest throughput, or None."""
    ok = [r for r in results if r.get("ok") and r.get("throughput")]
    return max(ok, key=lambda r: r["throughput"]) if ok else None


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    from flexgraph.sizes import format_size

    def f(x, fmt="{:.2f}"):
        return "—" if x is None else fmt.format(x)

    rows = ["| peer | batch | prefill s | decode s | total s | tok/s | peak RSS | cgroup peak | ok |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    top = best(results)
    for r in results:
        mark = " **best**" if r is top else ""
        status = "yes" if r.get("ok") else f"no: {r.get('reason', '?')}"
        rows.append(f"| {r['peer']} | {r['batch']} | {f(r.get('prefill_s'))} | {f(r.get('decode_s'))} | "
                    f"{f(r.get('total_s'))} | {f(r.get('throughput'))}{mark} | "
                    f"{format_size(r['peak_rss']) if r.get('peak_rss') else '—'} | "
                    f"{format_size(r['cgroup_peak']) if r.get('cgroup_peak') else '—'} | {status} |")
    return "\n".join(rows)


# =======================================================================================
# Command line
# =======================================================================================

def _parse(argv: Sequence[str]) -> argparse.Namespace:
    from_size = None

    def size(text: str) -> int:
        nonlocal from_size
        if from_size is None:
            from flexgraph.sizes import parse_size
            from_size = parse_size
        return from_size(text)

    ap = argparse.ArgumentParser(prog="peers.py", description="Run the benchmark's peers (transformers, Accelerate).")
    sub = ap.add_subparsers(dest="cmd", required=True)

    w = sub.add_parser("worker", help="one measurement (run inside the cgroup by the driver)")
    w.add_argument("--peer", choices=PEERS, required=True)
    w.add_argument("--model-dir", required=True)
    w.add_argument("--batch", type=int, required=True)
    w.add_argument("--prompt-len", type=int, required=True)
    w.add_argument("--gen-len", type=int, required=True)
    w.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    w.add_argument("--cap", type=size, help="the cgroup cap (accelerate: the weight budget is derived from it)")
    w.add_argument("--max-memory", type=size, help="accelerate: CPU bytes for weights (overrides the derivation)")
    w.add_argument("--offload-folder", help="accelerate: offload folder (default: a temporary one, removed)")
    w.add_argument("--offload", choices=OFFLOAD_MODES, default=DEFAULT_OFFLOAD)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    w.add_argument("--head-input", choices=HEAD_INPUTS, default=DEFAULT_HEAD_INPUT,
                   help="contiguous: copy the head's [batch, 1, hidden] input first (avoids PyTorch's "
                        "batch copies of lm_head); as-is: as shipped")

    p = sub.add_parser("prepare", help="make (or find) the Hugging Face folder of a model and print its path")
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("sweep", help="a batch sweep under a memory cap; JSON lines + a markdown table")
    s.add_argument("--peer", choices=PEERS, required=True)
    s.add_argument("--model", required=True, help="smollm2-135m, a built-in id (dummy weights), a store or HF folder")
    s.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    s.add_argument("--prompt-len", type=int, default=512)
    s.add_argument("--gen-len", type=int, default=32)
    s.add_argument("--cap", type=size, required=True)
    s.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    s.add_argument("--offload", choices=OFFLOAD_MODES, default=DEFAULT_OFFLOAD)
    s.add_argument("--max-memory", type=size, help="accelerate: CPU bytes for weights (default: derived from --cap)")
    s.add_argument("--timeout", type=float, help="seconds per run")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, help="torch threads in the worker (default: torch's)")
    s.add_argument("--head-input", choices=HEAD_INPUTS, default=DEFAULT_HEAD_INPUT,
                   help="see the worker's --head-input")
    s.add_argument("--out", help="also append the JSON lines to this file")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.cmd == "worker":
        return worker_main(args)
    if args.cmd == "prepare":
        print(hf_folder(args.model, args.dtype, args.seed))
        return 0
    import signal

    def _terminated(signum, frame):          # SIGTERM unwinds like Ctrl-C: run_capped kills the
        raise KeyboardInterrupt              # worker and removes its cgroup on the way out

    signal.signal(signal.SIGTERM, _terminated)
    folder = hf_folder(args.model, args.dtype, args.seed)
    batches = [int(x) for x in args.batches.split(",") if x.strip()]

    def emit(r: dict) -> None:
        line = json.dumps(r)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    results = sweep(args.peer, folder, batches, args.prompt_len, args.gen_len, args.cap, args.dtype,
                    offload=args.offload, max_memory=args.max_memory, timeout=args.timeout, seed=args.seed,
                    threads=args.threads, on_result=emit, head_input=args.head_input)
    print()
    print(markdown_table(results))
    top = best(results)
    print(f"\nbest: batch {top['batch']}, {top['throughput']:.2f} tok/s" if top else "\nbest: no batch succeeded")
    return 0 if top else 1


if __name__ == "__main__":
    sys.exit(main())
