#!/usr/bin/env python3
"""The torch side of benches/compare-torch.sh: training steps of the reference Llama.

usage: torch_llama.py [--ranks N] [--threads T] [--dtype float32|bf16] [--warmup 3] [--steps 20]
                      [--json OUT.json] [--device cpu|cuda] [--config CONFIG.json] [--batch 8]
                      [--seq 128]

Model: transformers.LlamaForCausalLM from benches/compare/llama-ref.json (hidden 256,
intermediate 688, 4 layers, 8 heads, vocab 4096, untied), eager attention, float32 parameters;
a global batch of 8 x 128 tokens. One step = forward with labels (mean cross-entropy) +
backward + torch.optim.AdamW(lr 1e-3, betas (0.9, 0.95), eps 1e-8, weight decay 0.1) + zero_grad,
the hyperparameters of benches/compare/job.toml.

--ranks 1: one process with T threads (default: every core).
--ranks N: DistributedDataParallel over gloo, N processes of T threads each (default: the cores
shared equally), each on 8/N rows: the data-parallel baseline kiln's ZeRO ranks compare with.
bf16 is torch.autocast(cpu, bfloat16) over float32 parameters, as torch users run it.

--device cuda (benches/gpu-bench.sh): one process on the first GPU, float32 products without
TF32 (as kiln computes them), autocast on cuda for bf16; --config, --batch, --seq change the
model and the batch; the JSON line adds the peak of torch.cuda.max_memory_allocated.

Prints one JSON line: median step time over --steps timed steps after --warmup untimed ones,
tokens/s of the global batch, and the peak RSS of each process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH, SEQ = 8, 128
CONFIG = os.path.join(HERE, "llama-ref.json")
DEVICE = "cpu"


def build(dtype: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    with open(CONFIG) as f:
        cfg = json.load(f)
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    config = LlamaConfig(**cfg, attn_implementation="eager")
    model = LlamaForCausalLM(config).float().to(DEVICE)
    model.train()
    return model, config.vocab_size


def run(rank: int, ranks: int, threads: int, dtype: str, warmup: int, steps: int, out):
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    if ranks > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=ranks)
    model, vocab = build(dtype)
    if ranks > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    rows = BATCH // ranks
    ids = ids[rank * rows:(rank + 1) * rows].to(DEVICE)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=(dtype == "bf16")):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if ranks > 1:
        import torch.distributed as dist

        gathered = [None] * ranks
        dist.all_gather_object(gathered, (statistics.median(times), rss))
        dist.destroy_process_group()
    else:
        gathered = [(statistics.median(times), rss)]
    if rank == 0:
        step = max(t for t, _ in gathered)
        out.put({
            "ranks": ranks, "threads_per_rank": threads, "dtype": dtype,
            "median_step_s": step, "tokens_per_s": BATCH * SEQ / step,
            "peak_rss_bytes": [r for _, r in gathered],
            "torch": torch.__version__,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0,
        })


def worker(rank, ranks, threads, dtype, warmup, steps, queue, shape):
    global BATCH, SEQ, CONFIG, DEVICE
    BATCH, SEQ, CONFIG, DEVICE = shape
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    run(rank, ranks, threads, dtype, warmup, steps, queue)


def main():
    global BATCH, SEQ, CONFIG, DEVICE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bf16"], default="float32")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--seq", type=int, default=SEQ)
    args = ap.parse_args()
    BATCH, SEQ, CONFIG, DEVICE = args.batch, args.seq, args.config, args.device
    if DEVICE == "cuda":
        if args.ranks != 1:
            ap.error("--device cuda runs one rank")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // args.ranks)
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    if args.ranks == 1:
        run(0, 1, threads, args.dtype, args.warmup, args.steps, queue)
    else:
        mp.spawn(worker, args=(args.ranks, threads, args.dtype, args.warmup, args.steps, queue,
                                 (BATCH, SEQ, CONFIG, DEVICE)),
                 nprocs=args.ranks, join=True)
    result = queue.get()
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
