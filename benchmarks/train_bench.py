"""DenseNet-121 (15 outputs) training throughput: images/s for forward + backward + Adam step.

    python benchmarks/train_bench.py                       # this CPU, fp32
    python benchmarks/train_bench.py --size 128 160 192 224 --threads 1 2 --all-modes   # choosing a CPU run
    python benchmarks/train_bench.py --device cuda --amp --channels-last --batch-size 64

BatchNorm and dropout are in training mode (the model as ``train`` fits it). On the CPU
``--all-modes`` compares NCHW with channels_last in fp32 (bf16 autocast on this CPU is slower);
on CUDA fp32, bf16 and bf16 + channels_last.

Random input batches: the speed of the arithmetic, not of data loading (see loader_bench.py).
"""

from __future__ import annotations

import argparse
import time

import torch

from pneumoscan.networks import ChestClassifier
from pneumoscan.training.loss import masked_bce


def bench(device: str, batch: int, size: int, amp: bool, channels_last: bool, steps: int, warmup: int) -> float:
    model = ChestClassifier().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(batch, 1, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 15, device=device) > 0.8).float()
    w = torch.ones(15, device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
            loss = masked_bce(model(x), y, w)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[16])
    parser.add_argument("--size", type=int, nargs="+", default=[224])
    parser.add_argument("--threads", type=int, nargs="+", default=[0], help="CPU threads (0: torch's default)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--all-modes", action="store_true", help="fp32, then AMP, then AMP + channels_last")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    if args.all_modes:
        modes = [(False, False), (True, False), (True, True)] if cuda else [(False, False), (False, True)]
    else:
        modes = [(args.amp, args.channels_last)]
    print(f"device: {name}; torch {torch.__version__}")
    print(f"{'size':>5} {'threads':>7} {'batch':>6} {'precision':>10} {'layout':>14} {'train img/s':>12}")
    default_threads = torch.get_num_threads()
    for threads in args.threads:
        torch.set_num_threads(threads or default_threads)
        for size in args.size:
            for batch in args.batch_size:
                for amp, cl in modes:
                    ips = bench(args.device, batch, size, amp, cl, args.steps, args.warmup)
                    print(f"{size:>5} {torch.get_num_threads():>7} {batch:>6} {'bf16-mixed' if amp else 'fp32':>10} "
                          f"{'channels_last' if cl else 'NCHW':>14} {ips:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
