"""Smaller and faster sparse models: file size and CPU latency of a LeNet-300-100 ticket.

Uses a ticket at about 2 % of the weights: the run of ``contsparse ticket --mask-init -0.08`` (the
default search with a lower ``s0``), training it first if it is not there, or ``--run DIR``.
Reports the compressed file size vs the dense safetensors file, and latency dense vs sparse at
batch 1 and 256, measured interleaved in one process (plus the to_sparse graph with dense kernels
only, which separates the gain of the CSR kernels from that of inlining the layers), and batch 1
again single-threaded; predictions are compared on the whole MNIST test set.

    python benchmarks/inference.py            # writes benchmarks/results/inference.{json,md}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_times, machine, write_results

from contsparse.data import load_dataset
from contsparse.experiments import Runner, make_config
from contsparse.export import export_run, load_run_model, to_sparse
from contsparse.export.bench import time_inference


def test_set_agreement(model: torch.nn.Module, dataset: str, data_dir: str | None) -> dict[str, int]:
    """How many test predictions of the sparse conversions (batch 1 and 256) equal the dense ones."""
    test = load_dataset(dataset, data_dir).test  # MNIST: no dataset options
    counts = {"test_images": len(test)}
    with torch.inference_mode():
        dense = torch.cat([model(test.x[i:i + 256]).argmax(1) for i in range(0, len(test), 256)])
        sparse_256 = to_sparse(model, 256)
        batched = torch.cat([sparse_256(test.x[i:i + 256]).argmax(1) for i in range(0, len(test), 256)])
        sparse_1 = to_sparse(model, 1)
        single = torch.cat([sparse_1(test.x[i:i + 1]).argmax(1) for i in range(len(test))])
    counts["same_batch_256"] = int((batched == dense).sum())
    counts["same_batch_1"] = int((single == dense).sum())
    counts["dense_correct"] = int((dense == test.y).sum())
    return counts


def call_path_timing(model: torch.nn.Module, input_shape: tuple[int, ...], blocks: int) -> dict[str, float]:
    """Batch-1 latency of the sparse model called as usual (the vector path entered directly) and
    through ``nn.Module.__call__``'s machinery, interleaved: what skipping that machinery saves."""
    sparse = to_sparse(model, 1)
    x = torch.randn(1, *input_shape)
    with torch.inference_mode():
        times = interleaved_times({"direct": lambda: sparse(x),
                                   "module_call": lambda: torch.nn.Module.__call__(sparse, x)}, blocks, 500)
    return {name: seconds * 1e3 for name, seconds in times.items()}


def median_timing(runs: list[dict]) -> dict:
    """One batch size's timings over the repeats: medians, plus each repeat's speedup."""
    merged = dict(runs[0])
    for key in ("dense_ms", "inlined_dense_ms", "sparse_ms", "speedup", "dense_images_per_s", "sparse_images_per_s"):
        merged[key] = statistics.median(r[key] for r in runs)
    merged["speedups"] = [r["speedup"] for r in runs]
    merged["same_predictions"] = all(r["same_predictions"] for r in runs)
    return merged


MASK_INIT = -0.08  # the default ticket search with this s0 keeps about 2 % of the weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path,
                        help=f"a finished run (default: that of `contsparse ticket --mask-init {MASK_INIT}`)")
    parser.add_argument("--blocks", type=int, default=21)
    parser.add_argument("--repeats", type=int, default=9,
                        help="independent timings, spread over the run: the figures are their medians")
    args = parser.parse_args()
    run_dir = args.run
    if run_dir is None:
        config = make_config({"mask_init": MASK_INIT})
        run_dir = Path("runs") / config.default_run_name()
        Runner(config, run_dir).execute()  # reused when finished
    run = load_run_model(run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        dense_file = export_run(run_dir, "safetensors", Path(tmp) / "dense.safetensors")
        sparse_file = export_run(run_dir, "compressed", Path(tmp) / "sparse.safetensors")
        sizes = {"dense_bytes": dense_file.stat().st_size, "compressed_bytes": sparse_file.stat().st_size}
    sizes["ratio"] = sizes["compressed_bytes"] / sizes["dense_bytes"]
    kept = sum(int(m.sum()) for m in run.masks.values()) / sum(m.numel() for m in run.masks.values())
    # The ratio moves with the shared machine's state (dense batch-1 inference streams the whole
    # weight matrix from memory, the sparse one stays in cache), so it is measured several times.
    repeats, call_paths = [], []
    for _ in range(args.repeats):
        repeats.append(time_inference(run.model, run.input_shape, (1, 256), blocks=args.blocks))
        call_paths.append(call_path_timing(run.model, run.input_shape, args.blocks))
    timings = [median_timing([r[i].as_dict() for r in repeats]) for i in range(len(repeats[0]))]
    # With two threads, the CSR kernel's second thread sometimes waits for a core the shared
    # machine has lent elsewhere: batch-1 serving usually runs single-threaded, which is timed too
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single_thread = median_timing([time_inference(run.model, run.input_shape, (1,), blocks=args.blocks)[0].as_dict()
                                       for _ in range(max(1, args.repeats // 3))])
    finally:
        torch.set_num_threads(threads)
    call_path = {name: statistics.median(c[name] for c in call_paths) for name in call_paths[0]}
    agreement = test_set_agreement(run.model, run.dataset, run.data_dir)

    command = " ".join(["python benchmarks/inference.py", *sys.argv[1:]])
    lines = [f"# Sparse CPU inference: LeNet-300-100 ticket, {100 * kept:.2f} % of the weights", "",
             f"Command: `{command}`; run: `{run_dir}`; each timing the median of {args.blocks} interleaved blocks "
             f"per variant, repeated {args.repeats} times: the figures are the medians of the repeats.", "",
             f"File size: compressed {sizes['compressed_bytes'] / 1024:.1f} KiB vs dense safetensors "
             f"{sizes['dense_bytes'] / 1024:.1f} KiB = **{100 * sizes['ratio']:.1f} %**.", "",
             "| batch | dense ms | inlined dense ms | sparse ms | **sparse speedup vs dense** | each repeat "
             "| speedup vs inlined dense | CSR layers |", "|---|---|---|---|---|---|---|---|"]
    for t in timings:
        lines.append(f"| {t['batch_size']} | {t['dense_ms']:.4f} | {t['inlined_dense_ms']:.4f} | {t['sparse_ms']:.4f} "
                     f"| **{t['speedup']:.2f}x** | {', '.join(f'{x:.2f}' for x in t['speedups'])} "
                     f"| {t['inlined_dense_ms'] / t['sparse_ms']:.2f}x | {', '.join(t['sparse_layers']) or '-'} |")
    one = single_thread
    lines += ["", f"Batch 1 single-threaded (`torch.set_num_threads(1)`, {len(one['speedups'])} repeats): "
              f"dense {one['dense_ms']:.4f} ms, sparse {one['sparse_ms']:.4f} ms, **{one['speedup']:.2f}x** "
              f"(repeats {', '.join(f'{x:.2f}' for x in one['speedups'])})."]
    lines += ["", f"Batch 1, the sparse model called as usual vs through `nn.Module.__call__` (interleaved, "
              f"medians of the repeats): {call_path['direct']:.4f} vs {call_path['module_call']:.4f} ms: skipping "
              f"that machinery saves {100 * (1 - call_path['direct'] / call_path['module_call']):.0f} %."]
    lines += ["", f"Test set: sparse predictions equal the dense ones on {agreement['same_batch_1']} / "
              f"{agreement['test_images']} images at batch 1 and {agreement['same_batch_256']} / "
              f"{agreement['test_images']} at batch 256 (dense accuracy "
              f"{100 * agreement['dense_correct'] / agreement['test_images']:.2f} %).", "",
              f"Machine: {machine()['processor']}, torch {machine()['torch']}, {machine()['threads']} threads.", ""]
    write_results("inference", {"machine": machine(), "command": command, "run": str(run_dir),
                                "weights_remaining": kept, "sizes": sizes, "timings": timings,
                                "single_thread_batch_1": single_thread,
                                "batch_1_call_path_ms": call_path,
                                "test_set": agreement}, "\n".join(lines))


if __name__ == "__main__":
    main()
