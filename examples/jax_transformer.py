"""Train a small character-level transformer language model in JAX with cuflash attention.

    python examples/jax_transformer.py                  # cuflash.jax attention, a few hundred steps
    python examples/jax_transformer.py --attention xla  # jax.nn.dot_product_attention instead
    python examples/jax_transformer.py --compare        # both, same init and batches, both loss curves
    python examples/jax_transformer.py --tiny --compare # a CPU-sized run (what the test runs)

The model is a plain pre-LayerNorm decoder (causal self-attention, GELU MLP, tied
embeddings); the train step is one jitted function (jax.value_and_grad and an Adam update
written inline, so nothing beyond JAX is needed). The text is generated: sentences of a
small made-up grammar, so the loss has somewhere to go. On a GPU the attention inputs
are bfloat16 and cuflash runs its CUDA kernels; on a CPU cuflash.jax runs its jax.numpy
reference, so the same script (and its test) runs anywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import cuflash.jax as fa  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    d_model: int = 256
    num_heads: int = 4
    num_layers: int = 4
    seq_len: int = 256
    batch: int = 32
    steps: int = 300
    learning_rate: float = 1e-3
    log_every: int = 25


TINY = Config(d_model=32, num_heads=2, num_layers=2, seq_len=32, batch=8, steps=60, learning_rate=3e-3, log_every=10)


# ---- data: sentences of a small grammar --------------------------------------------------


def generated_text(num_chars: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    words = {
        "det": ["the", "a", "every", "no"],
        "adj": ["quick", "lazy", "red", "small", "old", "bright"],
        "noun": ["fox", "dog", "kernel", "tensor", "river", "compiler", "cat"],
        "verb": ["jumps over", "reads", "follows", "ignores", "computes", "sees"],
    }
    pick = lambda kind: words[kind][rng.integers(len(words[kind]))]  # noqa: E731
    parts, size = [], 0
    while size < num_chars:
        sentence = f"{pick('det')} {pick('adj')} {pick('noun')} {pick('verb')} {pick('det')} {pick('noun')}. "
        parts.append(sentence)
        size += len(sentence)
    return "".join(parts)[:num_chars]


class Batches:
    """Random windows of the encoded text; the same seed gives the same batches."""

    def __init__(self, text: str, seq_len: int, batch: int, seed: int):
        self.vocab = sorted(set(text))
        self.data = np.array([self.vocab.index(c) for c in text], dtype=np.int32)
        self.seq_len, self.batch = seq_len, batch
        self.rng = np.random.default_rng(seed)

    def __next__(self) -> np.ndarray:
        starts = self.rng.integers(0, len(self.data) - self.seq_len - 1, size=self.batch)
        return np.stack([self.data[s : s + self.seq_len + 1] for s in starts])


# ---- the model ----------------------------------------------------------------------------


def init_params(key, cfg: Config, vocab_size: int) -> dict:
    keys = iter(jax.random.split(key, 4 + 4 * cfg.num_layers))
    normal = lambda shape, scale: scale * jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
    d = cfg.d_model
    layers = []
    for _ in range(cfg.num_layers):
        layers.append(dict(
            ln1=jnp.ones(d), ln2=jnp.ones(d),
            qkv=normal((d, 3 * d), 1 / math.sqrt(d)),
            proj=normal((d, d), 1 / math.sqrt(d) / math.sqrt(2 * cfg.num_layers)),
            fc=normal((d, 4 * d), 1 / math.sqrt(d)),
            fc_out=normal((4 * d, d), 1 / math.sqrt(4 * d) / math.sqrt(2 * cfg.num_layers)),
        ))
    return dict(embed=normal((vocab_size, d), 0.02), pos=normal((cfg.seq_len, d), 0.02), ln_f=jnp.ones(d),
                layers=layers)


def layer_norm(x, gain):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * gain


def attend(q, k, v, which: str):
    """Causal self-attention on (batch, seq, heads, head_dim) arrays."""
    if which == "cuflash":
        return fa.attention(q, k, v, causal=True)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def forward(params, tokens, cfg: Config, which: str, attn_dtype):
    b, t = tokens.shape
    h, d = cfg.num_heads, cfg.d_model
    x = params["embed"][tokens] + params["pos"][:t]
    for layer in params["layers"]:
        qkv = layer_norm(x, layer["ln1"]) @ layer["qkv"]
        q, k, v = (a.reshape(b, t, h, d // h).astype(attn_dtype) for a in jnp.split(qkv, 3, axis=-1))
        x = x + attend(q, k, v, which).astype(jnp.float32).reshape(b, t, d) @ layer["proj"]
        x = x + jax.nn.gelu(layer_norm(x, layer["ln2"]) @ layer["fc"]) @ layer["fc_out"]
    return layer_norm(x, params["ln_f"]) @ params["embed"].T


def loss_fn(params, batch, cfg: Config, which: str, attn_dtype):
    logits = forward(params, batch[:, :-1], cfg, which, attn_dtype)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1))


def make_train_step(cfg: Config, which: str, attn_dtype):
    """One jitted step: loss and gradients (jax.value_and_grad), then Adam."""
    b1, b2, eps = 0.9, 0.95, 1e-8

    @jax.jit
    def step(params, opt, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, cfg, which, attn_dtype)
        count = opt["count"] + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, opt["mu"], grads)
        nu = jax.tree.map(lambda n, g: b2 * n + (1 - b2) * g * g, opt["nu"], grads)
        lr = cfg.learning_rate * jnp.sqrt(1 - b2**count) / (1 - b1**count)
        params = jax.tree.map(lambda p, m, n: p - lr * m / (jnp.sqrt(n) + eps), params, mu, nu)
        return params, dict(mu=mu, nu=nu, count=count), loss

    return step


def train(cfg: Config, which: str, seed: int = 0, attn_dtype=None, verbose: bool = True) -> list[float]:
    """Train from a fixed init on fixed batches; returns the loss of every step."""
    if attn_dtype is None:
        attn_dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    text = generated_text(200_000 if cfg.seq_len > 64 else 20_000, seed=seed)
    batches = Batches(text, cfg.seq_len, cfg.batch, seed=seed)
    params = init_params(jax.random.PRNGKey(seed), cfg, len(batches.vocab))
    opt = dict(mu=jax.tree.map(jnp.zeros_like, params), nu=jax.tree.map(jnp.zeros_like, params),
               count=jnp.zeros((), jnp.int32))
    step = make_train_step(cfg, which, attn_dtype)
    losses = []
    start = time.perf_counter()
    for i in range(cfg.steps):
        params, opt, loss = step(params, opt, jnp.asarray(next(batches)))
        losses.append(float(loss))
        if verbose and (i % cfg.log_every == 0 or i == cfg.steps - 1):
            print(f"  [{which:7s}] step {i:4d}  loss {losses[-1]:.4f}  ({time.perf_counter() - start:.1f} s)")
    return losses


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attention", choices=("cuflash", "xla"), default="cuflash",
                        help="cuflash.jax.attention, or jax.nn.dot_product_attention (XLA)")
    parser.add_argument("--compare", action="store_true", help="train with both and print both loss curves")
    parser.add_argument("--tiny", action="store_true", help="a CPU-sized configuration")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = TINY if args.tiny else Config()
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}); cuflash attention runs "
          f"{'its CUDA kernels' if device.platform == 'gpu' else 'the jax.numpy reference'} there")
    print(f"config: {cfg}")
    which = ("cuflash", "xla") if args.compare else (args.attention,)
    curves = {name: train(cfg, name, seed=args.seed) for name in which}
    if args.compare:
        print("\n step   cuflash       xla    |diff|")
        for i in list(range(0, cfg.steps, cfg.log_every)) + [cfg.steps - 1]:
            a, b = curves["cuflash"][i], curves["xla"][i]
            print(f"{i:5d}  {a:8.4f}  {b:8.4f}  {abs(a - b):.2e}")
        diff = max(abs(a - b) for a, b in zip(curves["cuflash"], curves["xla"]))
        print(f"largest difference between the curves: {diff:.2e}")
    for name, losses in curves.items():
        print(f"{name}: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
    return curves


if __name__ == "__main__":
    main()
