"""A small character-level GPT whose attention is cuflash, trained on generated text.

    python examples/torch_gpt.py                      # cuflash attention (GPU: bf16 autocast)
    python examples/torch_gpt.py --attention sdpa     # the same model with torch's SDPA
    python examples/torch_gpt.py --compare            # both, same seed: loss curves side by side
    python examples/torch_gpt.py --tiny --compare     # seconds on a CPU (what CI runs)

The attention layer calls cuflash.torch.flash_attn_func on (batch, seqlen, heads, head_dim)
tensors straight out of the qkv projection (no transposes), or
torch.nn.functional.scaled_dot_product_attention on the transposed (batch, heads, seqlen,
head_dim) view with --attention sdpa. Everything else is ordinary PyTorch. The training
text is generated from a small grammar inside this script, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

import cuflash.torch as cuflash_torch

# ---- data ---------------------------------------------------------------------------------

_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "a small bird", "the teacher", "our neighbour"]
_VERBS = ["sees", "likes", "follows", "paints", "finds", "hears", "forgets"]
_OBJECTS = ["the red ball", "a quiet river", "the moon", "an apple tree", "the little house", "a song"]
_ENDINGS = [".", " every day.", " in the morning.", " again and again.", " near the sea."]


def generate_text(num_sentences: int, seed: int = 1234) -> str:
    """Sentences from a tiny grammar: enough structure (words, agreement, punctuation) for a
    loss curve that falls steadily, and no download."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(num_sentences):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}"
        sentences.append(s[0].upper() + s[1:])
    return " ".join(sentences)


class CharData:
    def __init__(self, text: str, device: torch.device):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.data = torch.tensor([self.index[c] for c in text], dtype=torch.long, device=device)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def batch(self, batch_size: int, seq_len: int, generator: torch.Generator):
        starts = torch.randint(0, len(self.data) - seq_len - 1, (batch_size,), generator=generator)
        rows = starts[:, None] + torch.arange(seq_len + 1)
        tokens = self.data[rows.to(self.data.device)]
        return tokens[:, :-1], tokens[:, 1:]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


# ---- model --------------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    vocab_size: int
    seq_len: int = 128
    layers: int = 4
    dim: int = 256
    heads: int = 4
    attention: str = "cuflash"  # or "sdpa"


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.heads, self.head_dim, self.attention = cfg.heads, cfg.dim // cfg.heads, cfg.attention
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).unbind(2)  # (B, T, H, D) each
        if self.attention == "cuflash":
            y = cuflash_torch.flash_attn_func(q, k, v, causal=True)
        else:
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True).transpose(1, 2)
        return self.proj(y.reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Embedding(cfg.seq_len, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied embeddings
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

    @torch.no_grad()
    def generate(self, idx, new_tokens: int, generator: torch.Generator, temperature: float = 0.8):
        for _ in range(new_tokens):
            logits = self(idx[:, -self.cfg.seq_len:])[:, -1].float() / temperature
            probs = torch.softmax(logits, dim=-1).cpu()
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator).to(idx.device)], dim=1)
        return idx


# ---- training -----------------------------------------------------------------------------


def train(args, attention: str, data: CharData, device: torch.device, dtype: torch.dtype,
          log_every: int) -> list[float]:
    """Train one model from `args.seed`; returns the loss of every step."""
    torch.manual_seed(args.seed)
    cfg = Config(vocab_size=data.vocab_size, seq_len=args.seq_len, layers=args.layers, dim=args.dim,
                 heads=args.heads, attention=attention)
    model = GPT(cfg).to(device)
    # Low precision runs as autocast over float32 weights; float32/float64 runs as is.
    autocast = dtype in (torch.bfloat16, torch.float16)
    if not autocast:
        model = model.to(dtype)
    step_model = torch.compile(model, fullgraph=True) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    batches = torch.Generator().manual_seed(args.seed)
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / max(1, args.steps // 10))  # linear warm-up
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = data.batch(args.batch_size, args.seq_len, batches)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = step_model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == args.steps - 1):
            print(f"[{attention}] step {step:4d}  loss {losses[-1]:.4f}  ({time.perf_counter() - start:.1f} s)")
    if args.sample and log_every:
        prompt = torch.tensor([[data.index["T"]]], device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            ids = model.generate(prompt, args.sample, torch.Generator().manual_seed(args.seed))
        print(f"[{attention}] sample: {data.decode(ids[0].tolist())!r}")
    return losses


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attention", choices=["cuflash", "sdpa"], default="cuflash")
    p.add_argument("--compare", action="store_true", help="train with both attentions from one seed")
    p.add_argument("--tiny", action="store_true", help="a few steps of a tiny model on the CPU in float64")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32", "float64"], default=None,
                   help="default: bfloat16 (autocast) on a GPU, float32 on the CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) the model")
    p.add_argument("--sample", type=int, default=120, help="characters to sample after training (0: none)")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch_size, args.seq_len, args.layers, args.dim, args.heads = 40, 8, 32, 2, 32, 2
        args.lr, args.device, args.dtype, args.sample = 3e-3, args.device or "cpu", args.dtype or "float64", 0
    return args


def main(argv=None) -> dict[str, list[float]]:
    """Runs the example; returns {attention: per-step losses}."""
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    where = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    print(f"device: {where}, dtype: {dtype}, torch {torch.__version__}")
    data = CharData(generate_text(4000 if not args.tiny else 400), device)
    attentions = ["cuflash", "sdpa"] if args.compare else [args.attention]
    log_every = 0 if args.compare else max(1, args.steps // 15)
    threads = torch.get_num_threads()
    if args.tiny:
        # Tiny matrices: waking CPU worker threads costs more than the work, and on a
        # shared machine their spinning makes a seconds-long run take a minute.
        torch.set_num_threads(1)
    try:
        curves = {a: train(args, a, data, device, dtype, log_every) for a in attentions}
    finally:
        torch.set_num_threads(threads)
    if args.compare:
        print(f"{'step':>5}  {'cuflash':>10}  {'sdpa':>10}  {'difference':>10}")
        every = max(1, args.steps // 15)
        for step, (a, b) in enumerate(zip(curves["cuflash"], curves["sdpa"])):
            if step % every == 0 or step == args.steps - 1:
                print(f"{step:5d}  {a:10.4f}  {b:10.4f}  {a - b:10.2e}")
        diff = max(abs(a - b) for a, b in zip(curves["cuflash"], curves["sdpa"]))
        print(f"max |loss difference| over {args.steps} steps: {diff:.3e}")
    return curves


if __name__ == "__main__":
    main()
