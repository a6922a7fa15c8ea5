"""Contract tests of every registered tuning method, on both backbone families.

Methods are parametrised from the registry, so a new method is picked up automatically;
its row in ``TRAINABLE`` (which parameters it must train) has to be added by whoever
registers it, or ``test_method_has_contract_row`` fails.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fedtune_core import tuning
from fedtune_core.errors import ConfigError
from fedtune_core.fl import models

MODELS = ["vit-tiny", "clip-tiny"]
METHODS = sorted(tuning.METHODS)
CLASSES = [str(i) for i in range(10)]


def _head(name: str) -> bool:
    return name.startswith("head.")


def _encoder_bias(name: str) -> bool:
    return name.startswith("encoder.") and name.rsplit(".", 1)[-1] in ("bias", "in_proj_bias")


# method -> predicate over parameter names: True for exactly the names that must train.
TRAINABLE = {
    "full": lambda n: True,
    "head": _head,
    "bias": lambda n: _head(n) or _encoder_bias(n),
    "prompt": lambda n: _head(n) or n == "prompt.embeddings",
    "adapter": lambda n: _head(n) or ".adapter." in n,
    "lora": lambda n: _head(n) or ".lora_" in n,
}

# methods (and options) that add zero-initialised modules: the model is unchanged at init
IDENTITY_AT_INIT = [("adapter", {}), ("adapter", {"input": "mlp"}), ("lora", {})]


def _build(model: str) -> models.Classifier:
    return models.build(model, CLASSES, "none", text_head=False)  # the head is not under test


def _batch(model: models.Classifier, n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, model.input_size, model.input_size, generator=g)
    y = torch.arange(n) % len(CLASSES)
    return x, y


def _loss_backward(model, x, y) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def _expected(model, method: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if TRAINABLE[method](n)}


def test_method_has_contract_row():
    missing = sorted(set(tuning.METHODS) - set(TRAINABLE))
    assert not missing, f"add a TRAINABLE row (expected trainable names) for: {missing}"
    stale = sorted(set(TRAINABLE) - set(tuning.METHODS))
    assert not stale, f"TRAINABLE rows for methods that are not registered: {stale}"


@pytest.mark.parametrize("method", METHODS)
def test_registered_method_is_complete(method):
    m = tuning.METHODS[method]
    assert m.name == method
    assert dataclasses.is_dataclass(m.config)
    cfg = tuning.method_config(method)  # every option has a default
    assert isinstance(cfg, m.config)
    assert m.config.__dataclass_params__.frozen, "method configs must be frozen (hashable)"
    for optimizer in ("sgd", "adamw"):
        assert tuning.default_lr(method, optimizer) > 0


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_prepare_trains_exactly_the_expected_parameters(method, model_name):
    assert method in TRAINABLE, f"no TRAINABLE row for {method!r}"
    model = _build(model_name)
    names = tuning.prepare(model, method)
    params = dict(model.named_parameters())
    expected = _expected(model, method)
    assert set(names) == expected
    assert names == [n for n in params if n in expected], "names must come in model order"
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == expected
    assert {n for n in params if _head(n)} <= trainable, "the head always trains"
    if method != "full":
        assert trainable != set(params), f"{method} must freeze something"
    if method != "head":
        assert any(not _head(n) for n in trainable), f"{method} trains nothing but the head"
    count, total = tuning.count_parameters(model)
    assert count == sum(params[n].numel() for n in expected)
    assert total == sum(p.numel() for p in params.values())


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_exactly_the_trainable_parameters(method, model_name):
    model = _build(model_name)
    model.train()
    names = set(tuning.prepare(model, method))
    x, y = _batch(model)
    _loss_backward(model, x, y)
    params = dict(model.named_parameters())
    with_grad = {n for n, p in params.items() if p.grad is not None}
    assert with_grad == names

    # adapter/lora are zero-initialised, so some first gradients are zero: take one step
    opt = torch.optim.SGD([params[n] for n in names], lr=0.1)
    opt.step()
    _loss_backward(model, x, y)
    with_grad = {n for n, p in params.items() if p.grad is not None}
    assert with_grad == names
    nonzero = {n for n in names if params[n].grad.abs().sum() > 0}
    assert any(_head(n) for n in nonzero)
    body = sorted(n for n in names if not _head(n))
    if method == "head":
        assert not body
    else:
        assert set(body) & nonzero, f"no non-head parameter of {method} gets a gradient"
        dead = [n for n in body if n not in nonzero]
        assert not dead, f"{method} parameters that never get a gradient: {dead}"


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method, options", IDENTITY_AT_INIT)
def test_identity_at_initialisation(method, options, model_name):
    model = _build(model_name).eval()
    x, _ = _batch(model)
    with torch.no_grad():
        before = model(x)
    names = tuning.prepare(model, method, options)
    model.eval()
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)

    # ...and the added modules are really in the forward pass: perturbing them changes it
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            if not _head(n):
                params[n].add_(0.05 * torch.randn_like(params[n]))
        perturbed = model(x)
    assert (perturbed - before).abs().max() > 1e-3


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("depth", ["shallow", "deep"])
def test_prompt_shapes_and_forward(depth, model_name):
    model = _build(model_name)
    x, _ = _batch(model)
    with torch.no_grad():
        before = model(x)
    tuning.prepare(model, "prompt", {"depth": depth, "tokens": 5})
    layers = len(model.blocks) if depth == "deep" else 1
    assert len(model.blocks) == 2
    assert tuple(model.prompt.embeddings.shape) == (layers, 5, model.width)
    with torch.no_grad():
        after = model(x)
    assert after.shape == before.shape
    assert not torch.allclose(after, before, atol=1e-4), "prompts must change the output"


@pytest.mark.parametrize("model_name", MODELS)
def test_prompt_default_tokens(model_name):
    model = _build(model_name)
    tuning.prepare(model, "prompt")
    assert tuple(model.prompt.embeddings.shape) == (1, 10, model.width)


def _body_count(model_name: str, method: str, options=None) -> int:
    model = _build(model_name)
    tuning.prepare(model, method, options)
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not _head(n))


@pytest.mark.parametrize("model_name", MODELS)
def test_lora_rank_scales_the_count(model_name):
    rank8 = _body_count(model_name, "lora")
    rank4 = _body_count(model_name, "lora", {"rank": 4})
    assert rank4 > 0
    assert rank8 == 2 * rank4  # A (r x in) and B (out x r): linear in r


def _block_parts(block):
    """(attention branch, MLP norm) of a timm or an open_clip block, called without hooks."""
    if hasattr(block, "norm2"):  # timm: x + ls1(attn(norm1(x)))
        return (lambda x: block.ls1(block.attn(block.norm1(x)))), block.norm2.forward
    return (lambda x: block.ls_1(block.attention(block.ln_1(x)))), block.ln_2.forward


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("where", ["residual", "mlp"])
def test_adapter_reads_the_tensor_its_option_names(model_name, where):
    """AdaptFormer's input is the stream after attention, before norm2; 'mlp' is norm2's output.

    Each block's output is checked against a hand computation:
    ``x' + mlp(norm2(x')) + adapter(a)`` with ``x' = x + attn(norm1(x))`` and ``a`` the input
    the option names.
    """
    model = _build(model_name).eval()
    tuning.prepare(model, "adapter", {"input": where})
    seen: dict[str, list] = {"in": [], "out": [], "adapter": []}

    def record(block, args, out):
        seen["in"].append(args[0])
        seen["out"].append(out)

    for block in model.blocks:
        block.register_forward_hook(record)
        block.adapter.register_forward_pre_hook(lambda m, args: seen["adapter"].append(args[0]))
        torch.nn.init.normal_(block.adapter.up.weight, std=0.1)  # a non-zero adapter output
    x, _ = _batch(model)
    with torch.no_grad():
        model(x)
        assert len(seen["adapter"]) == len(model.blocks) == len(seen["in"])
        for i, block in enumerate(model.blocks):
            attention, norm2 = _block_parts(block)
            entering = seen["in"][i]
            after_attention = entering + attention(entering)
            source = after_attention if where == "residual" else norm2(after_attention)
            other = norm2(after_attention) if where == "residual" else after_attention
            torch.testing.assert_close(seen["adapter"][i], source, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(seen["adapter"][i], other, atol=1e-3)
            by_hand = (after_attention + block.mlp.forward(norm2(after_attention))
                       + block.adapter.forward(source))
            torch.testing.assert_close(seen["out"][i], by_hand, atol=1e-5, rtol=1e-5)


def test_adapter_width_option():
    wide = _body_count("vit-tiny", "adapter")
    narrow = _body_count("vit-tiny", "adapter", {"width": 8})
    # per block: down 64*w + w, up w*64 + 64; two blocks
    assert narrow == 2 * (64 * 8 + 8 + 8 * 64 + 64)
    assert wide == 2 * (64 * 64 + 64 + 64 * 64 + 64)


@pytest.mark.parametrize(
    "method, options, needle",
    [
        ("lora", {"rnk": 4}, "rnk"),
        ("prompt", {"token": 5}, "token"),
        ("bias", {"rank": 4}, "rank"),
        ("lora", {"rank": 0}, "0"),
        ("prompt", {"depth": "middle"}, "middle"),
        ("adapter", {"scale": 0.0}, "0.0"),
    ],
)
def test_bad_method_option_is_a_config_error(method, options, needle):
    model = _build("vit-tiny")
    with pytest.raises(ConfigError, match=needle):
        tuning.prepare(model, method, options)
    with pytest.raises(ConfigError, match=needle):
        tuning.method_config(method, options)


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="'lorra'.*valid choices"):
        tuning.prepare(_build("vit-tiny"), "lorra")


@pytest.mark.parametrize("method", METHODS)
def test_duplicate_registration_is_refused(method):
    before = tuning.METHODS[method]
    with pytest.raises(ValueError, match=method):
        tuning.register(method, before.config, {"sgd": 1.0, "adamw": 1.0})(lambda m, c: [])
    assert tuning.METHODS[method] is before


def test_register_adds_a_method_that_prepare_uses():
    @dataclasses.dataclass(frozen=True)
    class NormConfig:
        pass

    try:
        @tuning.register("test-norms", NormConfig, {"sgd": 0.1, "adamw": 1e-3})
        def apply(model, cfg):
            return [n for n, _ in model.named_parameters() if ".norm" in n]

        model = _build("vit-tiny")
        names = tuning.prepare(model, "test-norms")
        assert names and all(".norm" in n or _head(n) for n in names)
        assert any(_head(n) for n in names)
    finally:
        tuning.METHODS.pop("test-norms", None)


def _reference(model_name: str, classes: int, method: str) -> tuple[int, int]:
    with torch.device("meta"):  # counts only: shapes without weights
        model = models.build(model_name, [str(c) for c in range(classes)], "none",
                             text_head=False)
        tuning.prepare(model, method)
    trainable, _ = tuning.count_parameters(model)
    head = sum(p.numel() for p in model.head.parameters())
    return trainable, head


@pytest.mark.parametrize("model_name", ["vit-b16", "clip-vit-b32"])
def test_reference_bias_counts(model_name):
    trainable, head = _reference(model_name, 100, "bias")
    assert trainable - head == 102_912


def test_reference_full_count_vit_b16():
    trainable, head = _reference("vit-b16", 100, "full")
    assert head == 768 * 100 + 100
    assert trainable == 85_875_556
