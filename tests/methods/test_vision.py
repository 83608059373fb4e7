"""Every method on a ViT through the real trainer (pixel_values batches), timm-style fused qkv,
and FacT's closed-form counts on the ViT's shape."""

import json

import pytest
import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from slimtune.methods.base import all_methods
from slimtune.core.arch import Arch
from slimtune.runner import evaluate_run, train_run
from slimtune.recipe import load_recipe
from tests.fixtures import attach
from tests.fixtures import write_folder

# Method fields that fit a hidden-32 ViT (compacter's default bottleneck 32 // 32 = 1 < phm_dim 4).
FITS_TINY = {"compacter": {"reduction_factor": 4}, "compacter++": {"reduction_factor": 4}, "prompt": {"num_tokens": 3}}
VISION_METHODS = ["lora", "houlsby", "pfeiffer", "compacter", "compacter++", "kadaptation", "fact-tt", "fact-tk",
                  "bitfit", "ia3", "prompt", "linear-probe", "full", "lst", "dsee", "hyperformer", "rank-pruning"]


@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, num_labels=3)
    ViTForImageClassification(config).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 8, "width": 8}, "image_mean": [0.5], "image_std": [0.5]}))
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("imgs") / "shapes", per_class=8)


def test_every_registered_method_is_covered():
    # a method that cannot run on a ViT would be listed here with the reason; none is today
    assert set(VISION_METHODS) == set(all_methods())


@pytest.mark.parametrize("name", VISION_METHODS)
def test_each_method_trains_a_few_steps_on_a_vit(name, tiny_vit_dir, image_folder, tmp_path):
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(json.dumps({
        "model": {"name": str(tiny_vit_dir)},
        "task": {"images": str(image_folder)},
        "method": {"name": name, **FITS_TINY.get(name, {})},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-2, "warmup_ratio": 0.0, "eval_each_epoch": False},
        "measure": {"latency": False, "flops": name == "lora", "memory": False},
    }))
    recipe = load_recipe(recipe_path)
    before = ViTForImageClassification.from_pretrained(tiny_vit_dir).state_dict()
    report = train_run(recipe, tmp_path / "run", progress=False)
    assert report["train"]["steps"] == 3
    assert report["task"]["n_train"] + report["task"]["n_validation"] + report["task"]["n_test"] == 24
    assert 0.0 <= report["metrics"]["accuracy"] <= 1.0
    assert report["params"]["trainable"] > 0
    if name == "lora":
        assert report["inference"]["flops_per_example"] > 0
        # base + saved delta, rebuilt from the run directory: the same test accuracy
        assert evaluate_run(tmp_path / "run")["metrics"]["accuracy"] == report["metrics"]["accuracy"]
    after = ViTForImageClassification.from_pretrained(tiny_vit_dir).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base files are never written


# -- timm-style fused qkv --------------------------------------------------------------------


class TimmAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TimmMlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = nn.LayerNorm(d), TimmAttention(d, heads), nn.LayerNorm(d), TimmMlp(d, 4 * d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyTimmViT(nn.Module):
    """The module layout of timm's VisionTransformer (patch_embed.proj, blocks.i.attn.qkv/proj,
    blocks.i.mlp.fc1/fc2, norm, head), random weights."""

    def __init__(self, d=32, depth=2, heads=4, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.embed_dim = d
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(1, d, 4, 4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, d) * 0.02)
        self.blocks = nn.ModuleList([TimmBlock(d, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, pixel_values):
        x = self.patch_embed.proj(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


@pytest.mark.parametrize("name,fields", [("lora", {"r": 2}), ("fact-tt", {"rank": 2}), ("fact-tk", {"rank": 2}),
                                         ("kadaptation", {"n": 4}), ("bitfit", {}), ("houlsby", {}), ("pfeiffer", {}),
                                         ("compacter", {"reduction_factor": 4})])
def test_timm_fused_qkv_is_a_target(name, fields):
    model = TinyTimmViT()
    arch = Arch.of(model)
    assert (arch.family, arch.hidden_size, arch.num_layers, arch.num_heads) == ("timm", 32, 2, 4)
    x = torch.randn(3, 1, 8, 8)
    base_out = model(x)
    delta = attach(model, (name, fields))
    trainable = delta.trainable_parameters(model)
    assert trainable
    if name in ("lora", "fact-tt", "fact-tk", "kadaptation"):  # the fused qkv is wrapped, the update starts at 0
        assert any(n.endswith("attn.qkv") and hasattr(m, "base") for n, m in model.named_modules())
        torch.testing.assert_close(model(x), base_out)
    else:  # adapters start near the identity (std 1e-3 init)
        torch.testing.assert_close(model(x), base_out, atol=1e-2, rtol=0)
    with torch.no_grad():
        for p in trainable.values():
            p.add_(torch.randn_like(p) * 0.1)
    loss = model(x).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in trainable.values())
    assert not torch.allclose(model(x), base_out)


def test_fact_on_fused_qkv_counts_like_separate_q_k_v():
    """timm's qkv (3d x d) is 3 slices, exactly HF's q, k, v: the same FacT tensor and count."""
    timm = TinyTimmViT()
    hf = ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=128, num_labels=3))
    for kind in ("fact-tt", "fact-tk"):
        a, b = TinyTimmViT(), ViTForImageClassification(hf.config)
        da, db = attach(a, (kind, {"rank": 3})), attach(b, (kind, {"rank": 3}))
        assert da.methods[0].num_slices(a) == db.methods[0].num_slices(b) == 2 * 12
        assert da.methods[0].param_count(a) == db.methods[0].param_count(b)
    del timm


# -- FacT closed forms on the ViT's shape -------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 2, 4, 8])
def test_fact_counts_on_vit_fmnist_shape_are_the_closed_forms(rank):
    """vit-fmnist (d = 96, L = 6, MLP 4d): q, k, v, o + 4 + 4 FFN slices = 12 per layer, so
    TT = 2 d r + 12 L r^2 = 192 r + 72 r^2 and TK = 2 d r + r^3 + 12 L r = 192 r + r^3 + 72 r
    (ViT-B, d = 768, L = 12: 1536 r + 144 r^2, the paper's)."""
    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=96, num_hidden_layers=6,
                       num_attention_heads=3, intermediate_size=384, num_labels=10)
    d, layers = 96, 6
    for kind, closed in (("fact-tt", 2 * d * rank + 12 * layers * rank**2), ("fact-tk", 2 * d * rank + rank**3 + 12 * layers * rank)):
        model = ViTForImageClassification(config)
        delta = attach(model, (kind, {"rank": rank}))
        method = delta.methods[0]
        assert method.param_count(model) == method.expected_param_count(model) == closed
    assert 2 * d * rank + 12 * layers * rank**2 == 192 * rank + 72 * rank**2
