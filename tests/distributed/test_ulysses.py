"""Ulysses sequence parallelism on CPU with gloo, against the single-process result.

One start of 4 processes (forked where possible) runs every check twice: over the whole
world (4 ranks) and over pairs of ranks (two groups of 2, side by side):
ulysses_attention's output and q/k/v gradients (one stream, joint streams of uneven
lengths, causal, GQA, rotary) and its errors; a tiny SD3 transformer (SD3.5 dual
attention, q/k RMSNorm, a ControlNet residual) and a DiT transformer patched with
``sequence_parallel=group`` against the unpatched models (output, and the gradients of
a few parameters summed over the group), and a Wan video transformer likewise; a
DiTPipeline; the refusals. fp32, mmfast's
torch backends. Shapes are tiny; the workers are forked from the test process with its
imports."""

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launcher import TIMEOUT, run_ranks  # noqa: F401  (TIMEOUT: importable from here as before)

CLOSE = dict(rtol=1e-5, atol=1e-5)  # fp32, the same math summed in another order


def _shard_streams(t, lens, group):
    """This rank's shards of the streams of ``t`` (concatenated along dim 1), concatenated."""
    from mmfast.distributed import shard_sequence

    parts, start = [], 0
    for n in lens:
        parts.append(shard_sequence(t[:, start:start + n], group))
        start += n
    return torch.cat(parts, dim=1)


def _check_attention(group, what):
    from mmfast.distributed import ulysses_attention
    from mmfast.ops.attention import attention

    gen = torch.Generator().manual_seed(0)  # the same global tensors on every rank
    cases = [  # (stream lengths, q heads, k/v heads, causal, rotary)
        ((12,), 4, 4, False, False),   # divides both world sizes: no padding
        ((9, 5), 4, 4, False, False),  # joint image + text streams, padded on both world sizes
        ((7,), 8, 4, True, False),     # GQA, causal: the sequence order survives the exchange
        ((6, 3), 4, 4, False, True),   # rotary tables of the whole (joint) sequence
        ((3, 2), 4, 4, False, False),  # fewer tokens than ranks: some ranks hold padding only
    ]
    for lens, hq, hk, causal, rotated in cases:
        n = sum(lens)
        q = torch.randn(2, n, hq, 8, generator=gen)
        k, v = (torch.randn(2, n, hk, 8, generator=gen) for _ in range(2))
        grad_out = torch.randn(2, n, hq, 8, generator=gen)
        angles = torch.rand(n, 4, generator=gen) * 6
        rotary = (angles.cos(), angles.sin()) if rotated else None
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = attention(*full, causal=causal, rotary=rotary, backend="torch")
        ref.backward(grad_out)

        local = [_shard_streams(t, lens, group).requires_grad_() for t in (q, k, v)]
        out = ulysses_attention(*local, group, seq_lens=lens, causal=causal, rotary=rotary, backend="torch")
        out.backward(_shard_streams(grad_out, lens, group))
        case = f"{what} lens={lens} heads={hq}/{hk} causal={causal} rotary={rotated}"
        torch.testing.assert_close(out, _shard_streams(ref.detach(), lens, group), **CLOSE, msg=case)
        for name, mine, whole in zip("qkv", local, full):
            torch.testing.assert_close(mine.grad, _shard_streams(whole.grad, lens, group), **CLOSE,
                                       msg=f"{case} d{name}")


def _check_attention_errors(group, world, what):
    from mmfast.distributed import ulysses_attention

    x = torch.randn(1, 3, 3, 8)  # 3 heads: neither 2 nor 4 divides them
    with pytest.raises(ValueError, match=rf"group: a world size of {world} does not divide the 3 heads"):
        ulysses_attention(x, x, x, group)
    x = torch.randn(1, 3, 4, 8)
    with pytest.raises(ValueError, match="seq_lens"):
        ulysses_attention(x, x, x, group, seq_lens=(100, 5))


def _tiny_sd3(heads=4):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=heads, joint_attention_dim=12, caption_projection_dim=8 * heads,
        pooled_projection_dim=6, pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()


def _sd3_inputs():
    gen = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(2, 4, 6, 6, generator=gen),  # 3 x 3 = 9 image tokens
            "encoder_hidden_states": torch.randn(2, 5, 12, generator=gen),  # 5 text tokens
            "pooled_projections": torch.randn(2, 6, generator=gen),
            "timestep": torch.tensor([3.0, 700.0]),
            "block_controlnet_hidden_states": [torch.randn(2, 9, 32, generator=gen)]}  # split like the image


def _tiny_dit(num_classes=10):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=6, patch_size=2,
                                 num_embeds_ada_norm=num_classes).eval()  # eval: no class-label dropout


def _dit_inputs():
    gen = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(2, 4, 6, 6, generator=gen),  # 9 image tokens
            "timestep": torch.tensor([10, 500]), "class_labels": torch.tensor([1, 7])}


def _tiny_wan(heads=4):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=8, in_channels=4,
                                 out_channels=4, text_dim=12, freq_dim=16, ffn_dim=24, num_layers=2,
                                 rope_max_seq_len=16).eval()


def _wan_inputs():
    gen = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(2, 4, 3, 6, 4, generator=gen),  # 3 x 3 x 2 = 18 video tokens
            "timestep": torch.tensor([3.0, 700.0]),
            "encoder_hidden_states": torch.randn(2, 5, 12, generator=gen)}


def _run(model, inputs, names):
    """Output, and the gradients of the named parameters, of a loss other than a plain sum."""
    model.zero_grad()
    out = model(**inputs).sample
    weights = torch.linspace(-1, 2, out.numel()).view_as(out)
    (out * weights).sum().backward()
    params = dict(model.named_parameters())
    return out.detach(), [params[n].grad.clone() for n in names]


def _check_model(build, inputs, names, group, what):
    import mmfast

    model = build()
    out_ref, grads_ref = _run(model, inputs, names)
    handle = mmfast.patch(model, sequence_parallel=group)
    assert handle.family and any("Ulysses" in w for _, w in handle.replaced), handle.replaced
    out, grads = _run(model, inputs, names)
    torch.testing.assert_close(out, out_ref, **CLOSE, msg=f"{what}: output")
    for name, grad, grad_ref in zip(names, grads, grads_ref):
        dist.all_reduce(grad, group=group)  # each rank holds its tokens' share
        torch.testing.assert_close(grad, grad_ref, **CLOSE, msg=f"{what}: grad of {name}")
    handle.undo()
    torch.testing.assert_close(_run(model, inputs, names)[0], out_ref, rtol=0, atol=0, msg=f"{what}: undone")


def _check_models(group, world, what):
    import mmfast

    _check_model(_tiny_sd3, _sd3_inputs(), [
        "pos_embed.proj.weight", "context_embedder.weight", "transformer_blocks.0.attn.to_q.weight",
        "transformer_blocks.0.attn2.to_k.weight", "transformer_blocks.1.attn.add_k_proj.weight",
        "transformer_blocks.0.ff_context.net.2.weight", "time_text_embed.timestep_embedder.linear_1.weight",
        "proj_out.weight"], group, f"{what} SD3")
    _check_model(_tiny_dit, _dit_inputs(), [
        "pos_embed.proj.weight", "transformer_blocks.0.attn1.to_v.weight", "transformer_blocks.1.ff.net.0.proj.weight",
        "proj_out_2.weight"], group, f"{what} DiT")
    _check_model(_tiny_wan, _wan_inputs(), [
        "patch_embedding.weight", "blocks.0.attn1.to_q.weight", "blocks.0.attn1.norm_k.weight",
        "blocks.1.attn2.to_v.weight", "blocks.1.ffn.net.2.weight", "blocks.0.scale_shift_table",
        "condition_embedder.time_embedder.linear_1.weight", "proj_out.weight"], group, f"{what} Wan")
    _check_wan_refusals(group, world)
    _check_pipeline_and_refusals(group, what)
    model = _tiny_sd3(heads=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"sequence_parallel: a world size of {world} does not divide the 3 heads"):
        mmfast.patch(model, sequence_parallel=group)
    assert "forward" not in model.__dict__ and not hasattr(model, "_mmfast_patch_handle")  # nothing left patched
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _check_wan_refusals(group, world):
    import mmfast

    model = _tiny_wan()
    handle = mmfast.patch(model, sequence_parallel=group)
    inputs = _wan_inputs()
    inputs["timestep"] = torch.full((2, 18), 3.0)  # Wan 2.2 TI2V's per-token timesteps
    with torch.no_grad(), pytest.raises(ValueError, match=r"timestep: expected \[B\]"):
        model(**inputs)
    handle.undo()
    with pytest.raises(ValueError, match=rf"sequence_parallel: a world size of {world} does not divide the 3 heads"):
        mmfast.patch(_tiny_wan(heads=3), sequence_parallel=group)


def _check_pipeline_and_refusals(group, what):
    """A pipeline patched with sequence_parallel runs its denoiser sequence-parallel and
    generates the unpatched pipeline's image; a model with no sequence-parallel form (a
    VAE) is refused and left as it was; a deep copy of a patched model runs too."""
    import copy

    import mmfast
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4).eval()
    # DiTPipeline's "no class" label is ImageNet's 1000.
    pipe = DiTPipeline(transformer=_tiny_dit(num_classes=1000), vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe(class_labels=[3], num_inference_steps=2, guidance_scale=4.0, output_type="np",
                    generator=torch.Generator().manual_seed(5)).images

    expected = generate()
    with mmfast.patch(pipe, sequence_parallel=group) as handle:
        assert any("Ulysses" in w for _, w in handle.replaced), handle.replaced
        got = generate()
        twin = copy.deepcopy(pipe.transformer)  # shares the group, not the original's token counts
        inputs = _dit_inputs()
        inputs["class_labels"] = torch.tensor([1, 999])
        with torch.no_grad():
            torch.testing.assert_close(twin(**inputs).sample, pipe.transformer(**inputs).sample, rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=f"{what} DiTPipeline")

    with pytest.raises(ValueError, match="sequence_parallel: AutoencoderKL holds no model mmfast runs sequence-par"):
        mmfast.patch(vae, sequence_parallel=group)
    assert not any("forward" in vars(m) for m in vae.modules()) and not hasattr(vae, "_mmfast_patch_handle")


def _check_ranks(rank, world):
    import mmfast

    mmfast.set_backend("torch")  # the Triton interpreter would make the workers slow
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    for group, size in ((pairs[rank // 2], 2), (dist.group.WORLD, world)):
        what = f"rank {rank}, {size} ranks"
        _check_attention(group, what)
        _check_attention_errors(group, size, what)
        _check_models(group, size, what)


def test_ulysses_two_and_four_ranks_equal_single_process(tmp_path):
    pytest.importorskip("diffusers")
    import diffusers.models  # noqa: F401  (imported once here: forked workers inherit it)

    import mmfast.integrations.diffusers.sequence_parallel  # noqa: F401

    # Forked workers (where the platform forks) start with torch, mmfast and diffusers
    # imported: a spawned worker pays ~20 s of imports on a quiet CPU, four far more on a
    # loaded one.
    run_ranks(_check_ranks, 4, tmp_path)
