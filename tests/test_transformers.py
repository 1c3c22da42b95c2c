"""cuflash inside Hugging Face transformers models (cuflash.transformers).

The promises: `cuflash.transformers.register()` gives a name that both
`from_pretrained(..., attn_implementation=name)` (and `from_config`) and
`model.set_attn_implementation(name)` accept; a model on that name runs every attention
layer through cuflash and gives the logits and parameter gradients of the same model on
transformers' own attention ("sdpa"; "eager" for Gemma-2, whose logit soft-capping SDPA
refuses), with padding masks (left and right), grouped-query heads, soft-capping and
sliding windows; names transformers would reroute are refused, naming the reason.

Tiny random models built from configs (no downloads): 2 layers, hidden 64, 4 heads over
2 key/value heads (head_dim 16). CPU tensors take cuflash's float64 reference path; the
tests marked gpu run the same comparisons on CUDA in bfloat16.

Tolerance (the tolerance method of tests/_tolerance.py, at model level): the same model
in float64 on transformers' attention is the truth X64; transformers' attention in the test
dtype gives the baseline error e_base = max|X_base - X64|; cuflash passes when
max|X_cuflash - X64| <= factor * e_base + floor, factor 2 for logits and 3 for
gradients (as for attention outputs and gradients), floor a few ulps of the test dtype at
the result's scale. The non-attention layers round identically in both runs, so the
bound says cuflash's attention adds no more error than transformers' own in that dtype.
Logits are compared at real tokens only (a padded query row attends no key: cuflash and
SDPA give 0 there, eager attention the mean of the values; no real token sees it), and
the loss counts real tokens only, so gradients are comparable everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import cuflash  # noqa: E402
import cuflash.torch as ct  # noqa: E402
import cuflash.transformers as cft  # noqa: E402

VOCAB, BATCH, SEQ = 128, 3, 12
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7}
FLOOR_ULPS = 8


def llama_config():
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )


def gemma2_config():
    # sliding_window=4 < SEQ, so the sliding layers' window removes keys; a soft-cap of 5
    # bends the scores of these random weights visibly (tanh(s/5) departs from s/5 for |s| > 1).
    return transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
        attn_logit_softcapping=5.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16,
        max_position_embeddings=64,
    )


# (config, transformers' attention to compare with, whether left padding is comparable).
# Gemma-2's float64 truth runs eager attention, which turns a query row that attends no key
# into NaN in float64 (its additive mask saturates to -inf there), and that NaN reaches
# every token through the next layer's values; so Gemma-2 is padded on the right only, by
# fewer tokens than its window, and every row keeps a key. Llama's truth runs SDPA, which
# gives such rows 0, so Llama also takes left padding.
MODELS = {"llama": (llama_config, "sdpa", True), "gemma2": (gemma2_config, "eager", False)}


def batch(device, padded=True, left=True):
    """Token ids, the padding mask and labels (-100 at padding). With `left`, one sequence
    is left-padded: its padded query rows attend no key at all."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if padded:
        mask[1, SEQ - 2:] = 0  # right padding
        if left:
            mask[2, :3] = 0  # left padding
        else:
            mask[2, SEQ - 3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(device), mask.to(device), labels.to(device)


@pytest.fixture(scope="module")
def name():
    return cft.register()


def build(kind, attn, device, dtype, seed=0):
    config_fn = MODELS[kind][0]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_fn(), attn_implementation=attn)
    return model.to(device=device, dtype=dtype)


def run(model, ids, mask, labels):
    """Logits at real tokens (float64) and every parameter's gradient of the loss."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().double().cpu()[mask.bool().cpu()], grads


def assert_within(got, base, truth, factor, eps, what):
    err = (got - truth).abs().max().item()
    base_err = (base - truth).abs().max().item()
    floor = FLOOR_ULPS * eps * max(truth.abs().max().item(), 1e-3)
    assert err <= factor * base_err + floor, (
        f"{what}: cuflash error {err:.3e} > {factor} x baseline {base_err:.3e} + floor {floor:.3e}"
    )


def compare(kind, name, device, dtype, padded=True, select="from_config"):
    """cuflash against transformers' attention on the same weights, both against float64."""
    _, anchor, left = MODELS[kind]
    ids, mask, labels = batch(device, padded, left)
    truth = run(build(kind, anchor, device, torch.float64), ids, mask, labels)
    base = run(build(kind, anchor, device, dtype), ids, mask, labels)
    if select == "from_config":
        model = build(kind, name, device, dtype)
    else:
        model = build(kind, anchor, device, dtype)
        model.set_attn_implementation(name)
    assert model.config._attn_implementation == name
    got = run(model, ids, mask, labels)
    eps = EPS[dtype]
    assert_within(got[0], base[0], truth[0], 2, eps, f"{kind} logits")
    assert got[1].keys() == truth[1].keys() and len(got[1]) > 0
    for pname, g in got[1].items():
        assert_within(g, base[1][pname], truth[1][pname], 3, eps, f"{kind} grad {pname}")


@pytest.fixture
def attention_calls(monkeypatch):
    """How many times cuflash.torch.attention ran (the integration calls it per layer)."""
    calls = []
    real = ct.attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("mask") is not None or kwargs.get("bias") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(ct, "attention", counting)
    return calls


# ---------------------------------------------------------------------------------------
# Selection


def test_register_gives_a_name_without_flash_and_is_idempotent(name):
    assert name == cft.DEFAULT_NAME and "flash" not in name
    assert cft.register() == name
    assert name in transformers.AttentionInterface().valid_keys()


@pytest.mark.parametrize("bad", ["cuflash", "my_flash", "sdpa_cuflash", "org/repo", "paged|x", ""])
def test_register_refuses_names_transformers_reroutes(bad):
    with pytest.raises(ValueError, match=f"name={bad!r}"):
        cft.register(bad)


def test_from_pretrained_selects_cuflash(name, tmp_path, attention_calls):
    build("llama", "sdpa", "cpu", torch.float32).save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=name)
    assert model.config._attn_implementation == name
    ids, mask, _ = batch("cpu")
    model(input_ids=ids, attention_mask=mask)
    # One call per layer, each with the padding mask transformers built.
    assert attention_calls == [True, True]


def test_set_attn_implementation_switches_to_cuflash_and_back(name, attention_calls):
    model = build("llama", "sdpa", "cpu", torch.float32)
    ids, _, _ = batch("cpu", padded=False)
    model(input_ids=ids)
    assert attention_calls == []
    model.set_attn_implementation(name)
    model(input_ids=ids)
    # No padding: transformers builds no mask and the kernels apply causality themselves.
    assert attention_calls == [False, False]
    model.set_attn_implementation("sdpa")
    model(input_ids=ids)
    assert len(attention_calls) == 2


# ---------------------------------------------------------------------------------------
# Values and gradients against transformers' own attention (CPU: float32 models)


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
@pytest.mark.parametrize("select", ["from_config", "set_attn_implementation"])
def test_logits_and_gradients_equal_transformers_attention_with_padding(name, kind, select):
    compare(kind, name, "cpu", torch.float32, padded=True, select=select)


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_logits_and_gradients_equal_transformers_attention_without_padding(name, kind):
    compare(kind, name, "cpu", torch.float32, padded=False)


def test_additive_float_mask_is_an_additive_bias(name):
    """Releases before the mask interface pass eager's additive float mask; it must act
    as the same additive bias (here a padding mask plus causality, as eager builds it)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 6, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 6, 16, generator=g, dtype=torch.float64) for _ in range(2))
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    allowed[1, :, :, :2] = False
    allowed[1, :, :2, 0] = True  # every row keeps a key, so eager and cuflash agree everywhere
    additive = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    module = torch.nn.Module()
    out, weights = cft.attention_forward(module, q, k, v, additive, scaling=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=allowed, scale=0.3)
    assert weights is None and out.shape == (2, 6, 4, 16)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs, words", [
    (dict(dropout="x"), "dropout='x' must satisfy 0 <= dropout_p < 1"),
    (dict(dropout=1.5), "dropout=1.5 must satisfy"),
    (dict(scaling="a"), "scaling='a' must be a finite number"),
    (dict(softcap="1"), "softcap='1' must be a finite number >= 0"),
    (dict(is_causal="no"), "is_causal='no' must be a bool"),
    (dict(sliding_window="3"), "sliding_window='3' must be an int or None"),
    (dict(sliding_window=2.5), "sliding_window=2.5 must be an int or None"),
    (dict(attention_mask=np.ones((1, 1, 5, 5), bool)),
     "attention_mask must be a torch.Tensor or None; got ndarray"),
])
def test_bad_options_are_judged_by_the_cores_rules_and_named_as_transformers_names_them(kwargs, words):
    """The attention function takes what cuflash.attention takes: no bool("no") turned
    causal, no float("x") crash, no numpy mask reaching .detach(); the error names the
    argument as the model passed it."""
    q = torch.randn(1, 2, 5, 16)
    kwargs.setdefault("attention_mask", None)
    with pytest.raises(cuflash.ValidationError) as info:
        cft.attention_forward(torch.nn.Module(), q, q, q, **kwargs)
    assert words in str(info.value) and "cuflash.transformers.attention_forward" in str(info.value)


def test_numpy_scalars_and_none_options_are_taken_as_before():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 5, 16, generator=g, dtype=torch.float64) for _ in range(3))
    module = torch.nn.Module()
    got, _ = cft.attention_forward(module, q, k, v, None, dropout=None, scaling=np.float64(0.25),
                                   sliding_window=np.int64(3), softcap=np.float32(2.0), is_causal=np.bool_(True))
    want, _ = cft.attention_forward(module, q, k, v, None, dropout=0.0, scaling=0.25, sliding_window=3,
                                    softcap=2.0, is_causal=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    plain, _ = cft.attention_forward(module, q, k, v, None, scaling=0.25, is_causal=True)
    assert not torch.equal(got, plain)  # the window and the soft-cap were applied


# ---------------------------------------------------------------------------------------
# The same on a GPU, in bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "gemma2"])
@pytest.mark.parametrize("select", ["from_config", "set_attn_implementation"])
@pytest.mark.parametrize("padded", [True, False])
def test_gpu_bf16_logits_and_gradients_equal_transformers_attention(name, kind, select, padded):
    compare(kind, name, "cuda", torch.bfloat16, padded=padded, select=select)
