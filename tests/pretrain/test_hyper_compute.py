"""The hypernetwork layers' compute path gives the maths of the plain formulas (values and gradients)."""

import pytest
import torch

from pretrain.models import build_model
from pretrain.models.hyper import FixedPatchEmbed, HyperEmbedding, HyperLinear
from pretrain.models.layers import gather_patches, to_patches


def _plain_embedding(m: HyperEmbedding, patches, cond):
    """token = sum_c U_c^T (V_c^T x_c) / C + bias, with U and V formed explicitly (the first slice's order)."""
    v, u, bias = m.weights(cond)
    c = patches.shape[1]
    y = torch.einsum("bcnp,bcpr->bcnr", patches, v) / c
    return torch.einsum("bcnr,bcrd->bnd", y, u) + bias


def _plain_linear(m: HyperLinear, z, cond):
    h = m.norm(cond)
    b, c = cond.shape[:2]
    a = m.to_a(h).view(b, c, m.r, m.dim)
    bm = m.to_b(h).view(b, c, m.r, m.P)
    return torch.einsum("bnd,bcrd,bcrp->bcnp", z, a, bm) + m.to_bias(h).unsqueeze(2)


def _grads(module, out, *inputs):
    g = torch.randn_like(out)
    params = [p for p in module.parameters()] + list(inputs)
    return torch.autograd.grad(out, params, g, retain_graph=True), g


@pytest.mark.parametrize("n_tokens,keep", [(64, False), (64, True), (16, True)])
def test_hyper_embedding_both_orders_and_keep_match_plain_maths(n_tokens, keep):
    torch.manual_seed(0)
    b, c, P, d, r, dim = 2, 7, 16, 12, 5, 24
    m = HyperEmbedding(d, 4, r, dim).double()
    patches = torch.randn(b, c, n_tokens, P, dtype=torch.float64)
    cond = torch.randn(b, c, d, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(n_tokens)[: n_tokens // 4] for _ in range(b)]) if keep else None
    ref = _plain_embedding(m, patches, cond)
    if idx is not None:
        ref = torch.gather(ref, 1, idx.unsqueeze(-1).expand(-1, -1, dim))
    orders = set()
    for order in ("materialised", "reassociated"):
        m.contraction = lambda c_, n_, o=order: o  # force each order
        out = m(patches, cond, idx)
        orders.add(order)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        g_out, g = _grads(m, out, cond)
        g_ref = torch.autograd.grad(ref, [p for p in m.parameters()] + [cond], g, retain_graph=True)
        for x, y in zip(g_out, g_ref, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10)
    assert orders == {"materialised", "reassociated"}


def test_contraction_order_follows_the_mac_count():
    m = HyperEmbedding(128, 8, 64, 768)  # ViT-B, SpecAware's rank 64
    assert m.contraction(100, 64) == "reassociated"  # an MAE's 64 visible tokens of 256
    assert m.contraction(100, 4096) == "materialised"  # many tokens: forming U once is cheaper
    for n in (64, 4096):
        mat = 100 * 128 * 64 * 768 + n * 100 * 64 * 768
        re = n * 100 * 128 * 64 + n * 128 * 64 * 768
        assert (m.contraction(100, n) == "reassociated") == (re < mat)


def test_hyper_linear_matches_plain_maths():
    torch.manual_seed(1)
    b, c, n, d, r, dd = 2, 6, 10, 12, 5, 20
    m = HyperLinear(d, 4, r, dd).double()
    z = torch.randn(b, n, dd, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(b, c, d, dtype=torch.float64, requires_grad=True)
    out, ref = m(z, cond), _plain_linear(m, z, cond)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g_out, g = _grads(m, out, z, cond)
    g_ref = torch.autograd.grad(ref, [p for p in m.parameters()] + [z, cond], g)
    for x, y in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10)


def test_gather_patches_is_to_patches_then_gather_values_and_gradients():
    """The kept cells' patches read straight from the image equal forming every patch and gathering (a non-square
    image, so rows and columns cannot be swapped unnoticed), and so does the gradient into the image."""
    torch.manual_seed(4)
    b, c, p, hh, ww = 3, 5, 4, 12, 20
    x = torch.randn(b, c, hh, ww, dtype=torch.float64, requires_grad=True)
    cells = torch.stack([torch.randperm((hh // p) * (ww // p))[:7] for _ in range(b)])
    ref = torch.gather(to_patches(x, p), 2, cells[:, None, :, None].expand(b, c, 7, p * p))
    out = gather_patches(x, cells, p)
    assert out.shape == (b, c, 7, p * p)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_fixed_embedding_keep_equals_conv_then_gather():
    torch.manual_seed(2)
    m = FixedPatchEmbed(5, 4, 16)
    px = torch.randn(2, 5, 16, 16)
    keep = torch.tensor([[0, 3, 15], [7, 2, 9]])
    full = m(px)
    torch.testing.assert_close(m(px, keep), torch.gather(full, 1, keep.unsqueeze(-1).expand(-1, -1, 16)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("embed", ["hyper", "fixed"])
def test_encoder_embeds_visible_tokens_like_embedding_all_then_gathering(embed):
    torch.manual_seed(3)
    kw = {"patch_embed": "fixed", "fixed_bands": 6} if embed == "fixed" else {}
    enc = build_model("debug", **kw).encoder
    b, c, s = 2, 6, 32
    px = torch.randn(b, c, s, s)
    wl = torch.linspace(450, 2300, c).expand(b, -1)
    fw = torch.full((b, c), 9.0)
    keep = torch.stack([torch.randperm((s // enc.patch_size) ** 2)[:4] for _ in range(b)])
    all_tok, cond_a = enc.embed(px, wl, fw)
    vis, cond_v = enc.embed(px, wl, fw, keep=keep)
    torch.testing.assert_close(vis, torch.gather(all_tok, 1, keep.unsqueeze(-1).expand(-1, -1, all_tok.shape[-1])),
                               rtol=1e-5, atol=1e-5)
    if cond_a is not None:
        torch.testing.assert_close(cond_v, cond_a)
    assert to_patches(px, enc.patch_size).shape[2] == all_tok.shape[1]


@pytest.mark.parametrize("with_valid", [False, True])
def test_mae_embedding_pools_only_the_kept_cells_with_the_same_result(with_valid):
    """keep + cell_weight (an MAE's visible cells): the content statistics of just the kept cells equal weighting
    the masked cells 0 over all cells: conditions, tokens and the gradients of the content encoder."""
    from pretrain.models.mae import random_mask

    torch.manual_seed(5)
    enc = build_model("debug").encoder
    b, c, s = 3, 7, 32
    px = torch.randn(b, c, s, s)
    wl = torch.linspace(450, 2300, c).expand(b, -1)
    fw = torch.full((b, c), 9.0)
    valid = (torch.rand(b, s, s) > 0.2) if with_valid else None
    n = (s // enc.patch_size) ** 2
    mask, keep, _ = random_mask(b, n, 0.75, px.device, torch.Generator().manual_seed(1))
    cw = (~mask).float()
    outs, cells_seen = [], []
    enc.content.fc1.register_forward_hook(lambda m, inp, out: cells_seen.append(inp[0].shape[2]))
    for k in (keep, None):
        enc.zero_grad(set_to_none=True)
        tok, cond = enc.embed(px, wl, fw, valid=valid, cell_weight=cw, keep=k)
        if k is None:
            tok = torch.gather(tok, 1, keep.unsqueeze(-1).expand(-1, -1, tok.shape[-1]))
        (tok.square().mean() + cond.square().mean()).backward()
        outs.append((tok.detach(), cond.detach(), enc.content.fc1.weight.grad.clone()))
    assert cells_seen == [keep.shape[1], n]  # the per-cell MLP ran on the kept cells only
    for a, b_ in zip(*outs):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6)


def test_partitioned_parameters_always_run_to_u_whatever_the_shape():
    """Under ZeRO-3 (parameters carrying ``ds_id``) the embedding takes the module order for every shape, so ranks
    holding other band or token counts gather the same parameters (the reassociated order reads to_u.weight, which
    DeepSpeed gathers on access: a per-rank choice mismatched the collectives of a co-located JEPA run)."""
    torch.manual_seed(0)
    m = HyperEmbedding(12, 4, 5, 24)
    calls = []
    m.to_u.register_forward_pre_hook(lambda mod, inp: calls.append(1))
    shapes = [(7, 2), (7, 64)]  # the two orders: reassociated for few tokens, materialised for many
    assert {m.contraction(c, n) for c, n in shapes} == {"materialised", "reassociated"}
    for c, n in shapes:
        m(torch.randn(1, c, n, 16), torch.randn(1, c, 12))
    assert len(calls) == 1  # whole parameters: the cheaper order per shape
    for q in m.to_u.parameters():
        q.ds_id = 0  # what DeepSpeed's partitioning adds
    calls.clear()
    for c, n in shapes:
        m(torch.randn(1, c, n, 16), torch.randn(1, c, 12))
    assert len(calls) == 2
