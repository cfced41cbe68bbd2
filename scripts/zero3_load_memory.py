"""Peak host memory per rank while a ZeRO-3 teacher loads: partitioned loading vs a full copy per rank.

Builds a Qwen2-Audio-kind teacher large enough to show the difference (default about 0.8 GB of fp32
weights, saved as safetensors), then starts ``--ranks`` CPU processes (gloo) that each load it as the
trainer loads a teacher with ``teacher_zero3: true`` (:func:`caad.train.engine.load_frozen`), in
three modes:

- ``partitioned``: ``zero.Init`` while ``from_pretrained`` runs (transformers' ``HfDeepSpeedConfig``,
  needs ``accelerate``): each parameter is materialised once and cut into partitions;
- ``full_then_partition``: every rank loads the whole model, then ``deepspeed.initialize``
  partitions it (what happens without ``accelerate``);
- ``replicated``: no ZeRO (``teacher_zero3: false``), the whole model on every rank.

Per rank it reports, against the size of the weights: the peak of anonymous resident memory
(``RssAnon``, sampled every 2 ms while loading) above what the process held before, which is what a
copy of the model costs; the peak of file-backed resident memory (``RssFile``: the checkpoint's
memory-mapped pages, i.e. the shared, reclaimable page cache); and the rank's own parameter bytes.

The ranks run with ``MALLOC_MMAP_THRESHOLD_=65536`` (``--default-malloc`` to keep glibc's default):
with glibc's dynamic threshold, the many temporary full-size tensors of partitioned loading are
served from the heap and the freed space is kept, which shows up as a few hundred MiB of
fragmentation that has nothing to do with what is loaded. Run::

    .venv/bin/python scripts/zero3_load_memory.py            # ~3-5 min on 2 CPU cores
    .venv/bin/python scripts/zero3_load_memory.py --layers 6 # a smaller model
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("partitioned", "full_then_partition", "replicated")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def build_model(folder: Path, layers: int, hidden: int) -> int:
    """Save a Qwen2-Audio-kind teacher into ``folder``; returns its weight bytes (fp32)."""
    from caad.models import tiny_teacher, train_tokenizer

    tokenizer = train_tokenizer(["a small corpus for a tokenizer", "the quick brown fox"] * 20, vocab_size=300)
    heads = max(1, hidden // 64)
    model = tiny_teacher(tokenizer, layers=layers, hidden=hidden, heads=heads, kv_heads=heads, mlp=4 * hidden)
    model.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _local_bytes(parameter) -> int:
    """Bytes of ``parameter`` this rank holds (its ZeRO-3 partition, or the whole tensor)."""
    held = getattr(parameter, "ds_tensor", None)
    tensor = parameter if held is None else held
    return tensor.numel() * tensor.element_size()


def worker(folder: str, mode: str) -> None:
    """One rank: load the teacher like the trainer does, print a JSON line with the memory figures."""
    from caad.config import TrainerConfig
    from caad.train import engine
    from caad.train.distributed import init_distributed, shutdown_distributed

    dist = init_distributed()
    if mode == "full_then_partition":
        engine.partitioned_loading_available = lambda: False
    config = TrainerConfig(teacher_zero3=mode != "replicated")
    anon_before = _status_kib("RssAnon")
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for field in peaks:
                peaks[field] = max(peaks[field], _status_kib(field))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    model = engine.load_frozen(folder, config, dist.device)
    # touch every weight, as a forward would (memory-mapped pages count once they are read)
    for parameter in model.parameters():
        held = getattr(parameter, "ds_tensor", parameter)
        if held.numel():
            held.float().sum()
    done.set()
    sampler.join()
    local = sum(_local_bytes(p) for p in model.parameters())
    print(
        json.dumps(
            {
                "mode": mode,
                "rank": dist.rank,
                "anon_peak_above_before_mib": (peaks["RssAnon"] - anon_before) / 1024,
                "file_peak_mib": peaks["RssFile"] / 1024,
                "local_parameter_mib": local / 2**20,
            }
        ),
        flush=True,
    )
    shutdown_distributed()


def launch(folder: Path, mode: str, ranks: int, default_malloc: bool) -> list[dict]:
    from caad.train.distributed import find_free_port

    port = str(find_free_port())
    procs = []
    for rank in range(ranks):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(ranks),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            DS_ACCELERATOR="cpu",
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        if not default_malloc:
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--worker", str(folder), "--mode", mode],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        )
    rows = []
    for proc in procs:
        out, _ = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode}: a rank failed (exit {proc.returncode})")
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="LM layers (default 12)")
    parser.add_argument("--hidden", type=int, default=1024, help="LM width (default 1024)")
    parser.add_argument("--ranks", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's dynamic mmap threshold")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.mode)
        return
    with tempfile.TemporaryDirectory(prefix="caad_zero3_mem_") as tmp:
        folder = Path(tmp) / "teacher"
        size = build_model(folder, args.layers, args.hidden)
        print(f"model: {size / 2**20:.0f} MiB of fp32 weights; {args.ranks} ranks (CPU, gloo)")
        print(f"{'mode':<22}{'rank':>5}{'anon peak (+)':>15}{'file peak':>11}{'own params':>12}  (MiB)")
        for mode in args.modes:
            for row in launch(folder, mode, args.ranks, args.default_malloc):
                print(
                    f"{mode:<22}{row['rank']:>5}{row['anon_peak_above_before_mib']:>15.0f}"
                    f"{row['file_peak_mib']:>11.0f}{row['local_parameter_mib']:>12.0f}"
                )


if __name__ == "__main__":
    main()
