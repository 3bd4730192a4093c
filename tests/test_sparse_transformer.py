"""Sparse Transformer invariants: the strided pattern (Child et al. 2019, eq. 15 with l = one image row
of subpixels), the factorised attention equals dense attention under that mask, causality, and the
key/value-cached sampler reads the same conditionals as the full network."""
import pytest
import torch
import torch.nn.functional as F

from trilemma.contract.family import build_config
from trilemma.contract.likelihood import bits_per_dim, from_signed
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.sparse_transformer import SparseTransformer, dihedral, strided_masks


def make(shape, **overrides):
    torch.manual_seed(0)
    return SparseTransformer(build_config(SparseTransformer, "tiny", overrides), shape)


def test_mask_has_the_strided_pattern():
    n, l = 20, 4
    row, col = strided_masks(n, l)
    for i in range(n):
        assert row[i].nonzero().flatten().tolist() == list(range(max(0, i - l), i + 1))
        assert col[i].nonzero().flatten().tolist() == list(range(i % l, i + 1, l))
    # Two steps (A2 then A1) reach every earlier position, one step does not: the factorisation.
    two = (col.float() @ row.float()) > 0
    assert torch.equal(two, torch.ones(n, n).tril().bool())
    assert not torch.equal(row | col, two)
    # Cost: O(n (l + n / l)) pairs against n (n + 1) / 2 for dense causal attention.
    assert (row | col).sum() <= n * (l + 1) + n * (n // l + 1)


@pytest.mark.parametrize("shape", [(1, 5, 4), (3, 3, 3)])
def test_factorised_attention_equals_dense_masked_attention(shape):
    model = make(shape, heads=4, width=16).double()
    block, n = model.blocks[0], model.num_dims
    x = torch.randn(2, n, 16, dtype=torch.double)
    q, k, v = block.split(x)
    masks = strided_masks(n, model.stride)  # (2, n, n)
    heads = torch.tensor([0, 0, 1, 1])  # pattern of each head: first half A1, second half A2
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[heads])  # (2, 4, n, dh)
    torch.testing.assert_close(block(x, model.stride), block.merge(x, dense))


def dependencies(model, shape):
    """dep[s, t]: the logits of subpixel s depend on token t (gradients through the input embeddings,
    whose position p holds token p - 1)."""
    model = model.double()
    captured = []

    def hook(module, inp, out):
        out.requires_grad_(True)
        captured.append(out)
        return out

    handle = model.tokens.register_forward_hook(hook)
    x = torch.randint(0, 256, (8, *shape), dtype=torch.uint8)
    logits = model.logits(x)  # (8, 256, C, H, W)
    handle.remove()
    seq = logits.permute(0, 3, 4, 2, 1).reshape(8, -1, 256)  # (8, n, 256) in sequence order
    n = seq.shape[1]
    dep = torch.zeros(n, n, dtype=torch.bool)
    for s in range(n):
        g, = torch.autograd.grad(seq[:, s].sum(), captured[0], retain_graph=True)  # (8, n, d)
        seen = g.abs().sum((0, 2)) != 0  # (n,) input positions
        dep[s, :n - 1] = seen[1:]  # input position p holds token p - 1
    return dep


@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 3, 3)])
def test_no_output_depends_on_its_own_or_a_later_subpixel(shape):
    dep = dependencies(make(shape), shape)
    n = dep.shape[0]
    assert not (dep & ~torch.ones(n, n).tril(-1).bool()).any()
    assert torch.equal(dep, torch.ones(n, n).tril(-1).bool())  # two layers: every earlier one


def test_changing_a_subpixel_changes_only_later_conditionals():
    shape = (3, 3, 3)
    model = make(shape).eval()
    x = structured_batch(1, shape)
    base = model.logits(x).permute(0, 3, 4, 2, 1).reshape(-1, 256)  # (n, 256)
    for t in range(model.num_dims):
        y = x.permute(0, 2, 3, 1).reshape(-1).clone()
        y[t] = (int(y[t]) + 128) % 256
        y = y.view(1, 3, 3, 3).permute(0, 3, 1, 2)
        out = model.logits(y).permute(0, 3, 4, 2, 1).reshape(-1, 256)
        torch.testing.assert_close(out[:t + 1], base[:t + 1])  # its own and earlier: unchanged
        if t + 1 < model.num_dims:
            assert not torch.allclose(out[t + 1], base[t + 1])


@pytest.mark.parametrize("shape", [(1, 6, 5), (3, 4, 4)])
def test_cached_sampling_equals_uncached(shape):
    model = make(shape).eval()
    seen = []  # logits of every sampling step
    hook = model.out.register_forward_hook(lambda m, inp, out: seen.append(out))
    torch.manual_seed(1)
    with torch.no_grad():
        s = model.sample(3)
        hook.remove()
        full = model.logits(from_signed(s)).permute(0, 3, 4, 2, 1).reshape(3, -1, 256)  # (3, n, 256)
    assert len(seen) == model.num_dims == model.samplers()["ancestral"]
    torch.testing.assert_close(torch.stack(seen, dim=1), full, atol=1e-4, rtol=1e-4)


def test_distaug_conditions_on_the_transformation():
    shape = (1, 4, 4)
    model = make(shape)
    x = structured_batch(2, shape)
    assert model.num_transforms == 8 and make((1, 4, 5)).num_transforms == 1
    a = model.logits(x, torch.tensor([0, 0]))
    b = model.logits(x, torch.tensor([3, 5]))
    assert not torch.allclose(a, b)
    # The 8 symmetries are distinct and the identity is symmetry 0.
    img = torch.arange(16).view(1, 4, 4)
    assert torch.equal(dihedral(img, 0), img)
    assert len({tuple(dihedral(img, t).flatten().tolist()) for t in range(8)}) == 8


def test_zeroed_output_layer_scores_exactly_8_bits_per_dim():
    shape = (3, 4, 4)
    model = make(shape)
    torch.nn.init.zeros_(model.out.weight)
    torch.nn.init.zeros_(model.out.bias)
    x = torch.randint(0, 256, (5, *shape), dtype=torch.uint8)
    torch.testing.assert_close(bits_per_dim(model.nll(x), model.num_dims), torch.full((5,), 8.0),
                               rtol=0, atol=1e-5)


def test_training_lowers_the_nll_of_a_batch():
    shape = (1, 8, 8)
    model = make(shape, lr=1e-2, aug_prob=0.0)
    update = plain_update(model)
    x = structured_batch(16, shape)
    with torch.no_grad():
        before = model.nll(x).mean()
    for _ in range(30):
        model.train_step(x, update)
    with torch.no_grad():
        after = model.nll(x).mean()
    assert after < 0.8 * before
