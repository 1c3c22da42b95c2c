"""Argument checks of the context-parallel entry points that run without a collective:
the sharding helpers (torch and JAX) and cuflash.jax_distributed.ring_attention on a
one-device CPU mesh. Options are judged by the core's rules before any conversion."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")

import cuflash  # noqa: E402
import cuflash.distributed as cd  # noqa: E402
import cuflash.jax_distributed as jd  # noqa: E402


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0, world=2.0), r"world=2.0 must be an int"),
    (dict(rank=0, world=True), r"world=True must be an int"),
    (dict(rank=1.0, world=2), r"rank=1.0 must be an int"),
    (dict(rank=0, world=2, dim=7), r"dim=7 is out of range for x of shape \(1, 8, 2, 16\)"),
])
def test_torch_shard_helpers_name_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cd.zigzag_shard(torch.zeros(1, 8, 2, 16), **kwargs)


@pytest.mark.parametrize("world", [2.0, "2", True])
def test_jax_shard_helpers_name_bad_world(world):
    with pytest.raises(ValueError, match=rf"world={world!r} must be an int >= 1"):
        jd.zigzag_shard(jax.numpy.zeros((1, 8, 2, 16)), world)


def _ring(**kwargs):
    x = jax.numpy.asarray(np.random.default_rng(0).random((1, 8, 2, 16)).astype(np.float32))
    mesh = kwargs.pop("mesh", None) or jax.make_mesh((1,), ("sp",), devices=jax.devices()[:1])
    return jd.ring_attention(x, x, x, mesh=mesh, axis_name=kwargs.pop("axis_name", "sp"), **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(causal="no"), r"causal='no' must be a bool"),
    (dict(window_size=(-1.9, 0)), r"window_size=\(-1.9, 0\) must be a pair of ints"),
    (dict(window_size=5), r"window_size=5 must be a pair of ints"),
    (dict(softmax_scale="a"), r"softmax_scale='a' must be a finite number"),
    (dict(dropout_p=0.1, seed=1.7), r"seed=1.7 must be an int"),
    (dict(causal_alignment="left"), r"causal_alignment='left' must be one of"),
    (dict(deterministic="yes"), r"deterministic='yes' must be a bool"),
])
def test_jax_ring_attention_judges_options_before_converting_them(kwargs, match):
    with pytest.raises(cuflash.ValidationError, match=match):
        _ring(**kwargs)


def test_jax_ring_attention_names_a_missing_axis_and_takes_a_plain_mesh():
    with pytest.raises(ValueError, match=r"axis_name='tp' must be one of the mesh's axes \('sp',\)"):
        _ring(axis_name="tp")
    plain = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("sp",))
    np.testing.assert_allclose(np.asarray(_ring(mesh=plain, causal=True)), np.asarray(_ring(causal=True)), rtol=0, atol=0)
