"""Train a small causal language model on long sequences with block-sparse attention.

    python examples/block_sparse_train.py                  # GPU: seqlen 16k, bf16, sparse vs dense
    python examples/block_sparse_train.py --tiny           # seconds on a CPU (what CI runs)
    python examples/block_sparse_train.py --pattern strided --seqlen 32768

Each attention layer calls cuflash.torch.attention with the same compact block mask
(cuflash.block_sparse.compact, built once and reused by every layer and step) and
causal=True: a query block sees a local window of key blocks around its diagonal plus a
few global blocks at the start (Longformer / BigBird, `local_global`) or the Sparse
Transformer's strided summary columns (`strided`). The same model is trained with dense
causal attention from the same seed, and the script prints, for both, the loss, the step
time and the peak memory (GPU) of the training steps.

The data is a synthetic copy task that needs long-range attention only through the
global blocks: a random key sequence at the start of each row is repeated later on, so
the loss of the repeated half falls only if the model learns to look back.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import cuflash.torch as cuflash_torch
from cuflash import block_sparse


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, block_mask):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).unbind(2)
        if block_mask is None:
            att = cuflash_torch.attention(q, k, v, causal=True)
        else:
            att = cuflash_torch.attention(q, k, v, causal=True, block_mask=block_mask)
        x = x + self.proj(att.reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class Model(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, layers: int, seqlen: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seqlen, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, block_mask=None):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for blk in self.blocks:
            x = blk(x, block_mask)
        return self.head(x)


def copy_task(batch: int, seqlen: int, vocab: int, key_len: int, generator: torch.Generator, device):
    """Rows of random filler whose first key_len tokens reappear at the end of the row."""
    tokens = torch.randint(1, vocab, (batch, seqlen + 1), generator=generator)
    tokens[:, seqlen + 1 - key_len:] = tokens[:, :key_len]
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def make_block_mask(pattern: str, seqlen: int, block: int, device):
    size = (block, block)
    if pattern == "local_global":
        blocks = block_sparse.local_global(seqlen, seqlen, size, window_blocks=2, global_blocks=1, causal=True)
    elif pattern == "strided":
        blocks = block_sparse.strided(seqlen, seqlen, size, stride=8, local_blocks=2, causal=True)
    else:
        raise ValueError(f"pattern={pattern!r} must be 'local_global' or 'strided'")
    # Density among the causally reachable blocks, which is what dense causal attention computes.
    reachable = torch.ones(blocks.shape).tril().sum().item()
    compact = block_sparse.compact(torch.from_numpy(blocks).to(device), size)
    return compact, float(blocks.sum()) / reachable


def train(args, sparse: bool, device, dtype) -> dict:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = Model(args.vocab, args.dim, args.heads, args.layers, args.seqlen).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    block_mask, density = (make_block_mask(args.pattern, args.seqlen, args.block, device) if sparse else (None, 1.0))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(args.steps):
        tokens, targets = copy_task(args.batch, args.seqlen, args.vocab, args.key_len, gen, device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(tokens, block_mask)
        loss = F.cross_entropy(logits.float().reshape(-1, args.vocab), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"  {'sparse' if sparse else 'dense '} step {step:4d}  loss {loss.item():.4f}  "
                  f"{times[-1] * 1e3:8.1f} ms", flush=True)
    steady = times[min(2, len(times) - 1):]  # the first steps compile kernels
    return {
        "density": density,
        "ms_per_step": 1e3 * sum(steady) / len(steady),
        "final_loss": sum(losses[-3:]) / len(losses[-3:]),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU-sized: seqlen 512, 2 layers, a few steps")
    ap.add_argument("--pattern", default="local_global", choices=("local_global", "strided"))
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--block", type=int, default=128, choices=block_sparse.BLOCK_SIZES)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--key-len", type=int, default=64, help="tokens copied from the row's start to its end")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sparse-only", action="store_true", help="skip the dense run")
    args = ap.parse_args(argv)
    if args.tiny:
        args.seqlen, args.block, args.batch, args.dim, args.heads, args.layers = 384, 64, 2, 32, 2, 2
        args.key_len, args.steps = 16, 4
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The CPU takes cuflash's float64 reference path: train in float32 there.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"device {device}, seqlen {args.seqlen}, {args.layers} layers, dim {args.dim}, {args.heads} heads, "
          f"pattern {args.pattern}, block {args.block}")
    results = {"sparse": train(args, True, device, dtype)}
    if not args.sparse_only:
        results["dense"] = train(args, False, device, dtype)
    print()
    print(f"{'':8s} {'density':>8s} {'ms/step':>10s} {'peak GiB':>9s} {'loss':>8s}")
    for name, r in results.items():
        print(f"{name:8s} {r['density']:8.3f} {r['ms_per_step']:10.1f} {r['peak_gib']:9.2f} {r['final_loss']:8.4f}")
    if "dense" in results and math.isfinite(results["dense"]["ms_per_step"]):
        print(f"step time sparse / dense: {results['sparse']['ms_per_step'] / results['dense']['ms_per_step']:.2f}")
    return results


if __name__ == "__main__":
    main()
