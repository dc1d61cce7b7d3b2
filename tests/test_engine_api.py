"""Bad calls to encode/denoise get clear errors and leave the engine and the cache usable."""

import pytest
import torch

import dgemma
from dgemma.random_checkpoint import write_random_checkpoint


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    return dgemma.load(write_random_checkpoint(tmp_path_factory.mktemp("api"), "tiny", seed=2), dtype=torch.float32)


def snapshot(cache):
    return [t.clone() for t in cache.keys + cache.values] + [cache.valid.clone(), cache.length]


def same(a, b):
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


@pytest.mark.parametrize("ids,message", [
    (torch.tensor([[1, 2, 512]]), r"input_ids contains token id 512, outside the vocabulary \[0, 512\)"),
    (torch.tensor([[1, -3, 2]]), r"input_ids contains token id -3"),
    (torch.tensor([1, 2, 3]), r"input_ids has shape \[3\], expected \[batch, length\]"),
    (torch.zeros(1, 0, dtype=torch.long), r"input_ids has shape \[1, 0\]: batch and length must be positive"),
    (torch.ones(1, 3), r"input_ids has dtype torch.float32, expected an integer tensor"),
])
def test_encode_rejects_bad_ids(eng, ids, message):
    with pytest.raises(dgemma.DgemmaError, match=message):
        eng.encode(ids)


def test_encode_accepts_lists(eng):
    assert eng.encode([[5, 6, 7]]).length == 3


def test_capacity_exceeded_leaves_cache_unchanged(eng):
    cache = eng.encode(torch.randint(3, 512, (2, 10)), capacity=20)
    before = snapshot(cache)
    with pytest.raises(dgemma.DgemmaError, match=r"cache capacity 20 exceeded: it holds 10 tokens and 11 more"):
        eng.encode(torch.randint(3, 512, (2, 11)), cache=cache)
    assert same(before, snapshot(cache))
    assert eng.encode(torch.randint(3, 512, (2, 10)), cache=cache).length == 20


def test_bad_ids_leave_cache_unchanged(eng):
    cache = eng.encode(torch.randint(3, 512, (1, 5)))
    before = snapshot(cache)
    with pytest.raises(dgemma.DgemmaError, match="outside the vocabulary"):
        eng.encode(torch.tensor([[4, 9999]]), cache=cache)
    assert same(before, snapshot(cache))


def test_batch_mismatch(eng):
    cache = eng.encode(torch.randint(3, 512, (2, 5)))
    with pytest.raises(dgemma.DgemmaError, match=r"batch size 1 does not match the cache's batch size 2"):
        eng.denoise(cache, torch.randint(0, 512, (1, 8)))
    with pytest.raises(dgemma.DgemmaError, match=r"batch size 3 does not match"):
        eng.encode(torch.randint(3, 512, (3, 2)), cache=cache)


def test_bad_self_conditioning_logits(eng):
    cache = eng.encode(torch.randint(3, 512, (1, 5)))
    with pytest.raises(dgemma.DgemmaError, match=r"self_conditioning_logits has shape \[1, 8, 7\], expected a float "
                                                 r"tensor \[1, 8, 512\]"):
        eng.denoise(cache, torch.randint(0, 512, (1, 8)), torch.zeros(1, 8, 7))


def test_cache_from_another_engine(eng, tmp_path):
    other = dgemma.load(write_random_checkpoint(tmp_path / "o", "tiny", seed=3))
    cache = other.encode(torch.randint(3, 512, (1, 4)))
    with pytest.raises(dgemma.DgemmaError, match="cache was created by a different engine"):
        eng.denoise(cache, torch.randint(0, 512, (1, 8)))


def test_attention_mask_shape_checked(eng):
    with pytest.raises(dgemma.DgemmaError, match=r"attention_mask has shape \[1, 2\], expected \[1, 3\]"):
        eng.encode(torch.tensor([[4, 5, 6]]), attention_mask=torch.ones(1, 2))


def test_padding_is_never_attended(eng):
    """A padded prompt scores the canvas as if the padding positions held anything else."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (1, 12), generator=g)
    mask = torch.ones(1, 12, dtype=torch.long)
    mask[0, 4:7] = 0
    other = ids.clone()
    other[0, 4:7] = torch.tensor([9, 10, 11])
    canvas = torch.randint(0, 512, (1, 8), generator=g)
    a = eng.denoise(eng.encode(ids, attention_mask=mask), canvas)
    b = eng.denoise(eng.encode(other, attention_mask=mask), canvas)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    c = eng.denoise(eng.encode(other), canvas)
    assert (a - c).abs().max() > 1e-3  # without the mask the padding tokens do matter


def test_sliding_cache_is_a_ring_of_window_minus_one(eng):
    cache = eng.new_cache(1, 100)
    window = eng.config.sliding_window
    sliding = [i for i, s in enumerate(eng.config.layers) if s.is_sliding]
    full = [i for i, s in enumerate(eng.config.layers) if not s.is_sliding]
    assert cache.keys[sliding[0]].shape[2] == window - 1
    assert cache.keys[full[0]].shape[2] == 100
    eng.encode(torch.randint(3, 512, (1, 45)), cache=cache)
    _, _, pos = cache.read(sliding[0])
    assert pos.tolist() == list(range(45 - (window - 1), 45))
    assert cache.read(full[0])[2].tolist() == list(range(45))
    assert "KVCache(batch=1, length=45, capacity=100" in repr(cache)


def test_info_and_repr(eng):
    info = eng.info
    assert info.backend == "reference" and info.dtype == "float32"
    assert info.weight_bytes == info.parameters * 4
    assert "layers=6" in repr(eng)


def test_engine_does_not_import_the_text_front_end():
    """The engine works on token ids: nothing it imports, directly or not, reaches the tokenizer, chat
    template, prompt preparation, chat sessions, loading or the CLI (they wrap the engine instead)."""
    import ast
    import os

    root = os.path.dirname(dgemma.__file__)
    front_end = {"text", "chat", "tokenizer", "session", "prompts", "loading", "cli"}

    def imports(module):
        path = os.path.join(root, *module.split(".")) + ".py"
        if not os.path.exists(path):
            path = os.path.join(root, *module.split("."), "__init__.py")
        tree = ast.parse(open(path, encoding="utf-8").read())
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = [p for p in package.split(".") if p]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + (node.module.split(".") if node.module else []))
                if node.module:  # `from .. import x` names a submodule x, not the package's __init__
                    yield target
                yield from (f"{target}.{a.name}".lstrip(".") for a in node.names)  # submodules imported by name

    seen, todo = set(), ["engine"]
    while todo:
        m = todo.pop()
        if m in seen or not (os.path.exists(os.path.join(root, *m.split(".")) + ".py")
                             or os.path.isdir(os.path.join(root, *m.split(".")))):
            continue
        seen.add(m)
        todo.extend(imports(m))
    assert {"engine", "generation", "model", "sampler"} <= seen
    assert not seen & front_end, sorted(seen & front_end)
