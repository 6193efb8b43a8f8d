"""The reference engine's model: its presets, grouped-query attention, and the static decode step
(fixed shapes, the position on the device) that a CUDA graph captures."""
import importlib.util

import pytest
import torch

from xllm_sampling.paths import TARGET_TEMPLATE

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# decode() attends over the whole cache with a mask: the same products as forward() over the
# prefix plus masked keys that weigh exp(-inf) = 0 exactly, summed in another order (another
# attention kernel): float32 rounding of a few ulps per layer and step, ~1e-7 of the logits' scale
# after 3 layers; 1e-5 of the largest logit bounds ten steps with a wide margin.
BOUND = 1e-5


@pytest.fixture(scope="module")
def model():
    spec = importlib.util.spec_from_file_location("refengine_model", TARGET_TEMPLATE / "engine" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small(model, kv_heads):
    return model.Config(vocab=300, dim=96, layers=3, heads=6, kv_heads=kv_heads, hidden=200, max_len=40)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_heads", [0, 2])
def test_static_decode_equals_forward(model, device, kv_heads):
    """Ten greedy steps through decode() (position a device tensor) give forward()'s logits, with
    as many key/value heads as query heads and with three query heads per key/value head."""
    cfg = small(model, kv_heads)
    net = model.Llama(cfg).to(device).eval()
    prompts = torch.randint(0, cfg.vocab, (3, 6), generator=torch.Generator().manual_seed(1)).to(device)
    dynamic, static = model.KVCache(cfg, 3, device), model.KVCache(cfg, 3, device)
    a, b = net(prompts, dynamic), net(prompts, static)
    position = torch.tensor([prompts.shape[1]], device=device)
    for _ in range(10):
        tokens = a.argmax(-1)[:, None]
        a, b = net(tokens, dynamic), net.decode(tokens, static, position)
        position += 1
        assert (a - b).abs().max() <= BOUND * a.abs().max()


def test_presets(model):
    """"tiny" is the default configuration; "0.5b" has a small real model's shape (Qwen2-0.5B's);
    an unknown name is a ValueError naming the argument."""
    assert model.preset("tiny") == model.Config()
    big = model.preset("0.5b", max_len=64)
    assert (big.vocab, big.dim, big.layers, big.heads, big.kv, big.head_dim, big.hidden, big.tied, big.max_len) == \
        (151936, 896, 24, 14, 2, 64, 4864, True, 64)
    with pytest.raises(ValueError, match="preset: 'huge'"):
        model.preset("huge")


def test_grouped_attention_shapes_and_tied_head(model):
    """Two key/value heads for six query heads: the projection and the cache hold two heads; a tied
    head is the embedding itself."""
    cfg = small(model, 2)
    net = model.Llama(cfg)
    assert net.blocks[0].qkv.weight.shape == (96 + 2 * 2 * 16, 96)
    assert model.KVCache(cfg, 5, "cpu").k.shape == (3, 5, 2, 40, 16)
    tied = model.Llama(model.Config(vocab=300, dim=96, layers=1, heads=6, kv_heads=2, hidden=200, tied=True))
    assert tied.head.weight is tied.embed.weight


@pytest.mark.cuda
def test_decode_step_replays_from_a_cuda_graph_bit_for_bit(model):
    """decode() captured once in a CUDA graph and replayed (tokens copied in, the position advanced
    in place between replays) gives eager decode()'s logits bit for bit."""
    cfg = small(model, 2)
    net = model.Llama(cfg).cuda().eval()
    prompts = torch.randint(0, cfg.vocab, (4, 5), generator=torch.Generator().manual_seed(2)).cuda()
    eager_cache, graph_cache = model.KVCache(cfg, 4, "cuda"), model.KVCache(cfg, 4, "cuda")
    logits = net(prompts, eager_cache)
    net(prompts, graph_cache)
    eager_position, graph_position = (torch.tensor([prompts.shape[1]], device="cuda") for _ in range(2))
    tokens = torch.zeros(4, 1, dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        net.decode(tokens, graph_cache, graph_position)  # warm up (its write is overwritten by the first replay)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = net.decode(tokens, graph_cache, graph_position)
    for _ in range(8):
        tokens.copy_(logits.argmax(-1)[:, None])
        graph.replay()
        logits = net.decode(tokens.clone(), eager_cache, eager_position)
        assert torch.equal(replayed, logits)
        eager_position += 1
        graph_position += 1
