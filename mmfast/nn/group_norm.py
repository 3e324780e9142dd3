"""``nn.GroupNorm`` on mmfast's kernel, optionally with the SiLU that follows it fused
(a VAE's or UNet's ``conv_norm_out`` + ``conv_act``; see :mod:`mmfast.ops.group_norm`)."""

from __future__ import annotations

from torch import Tensor, nn

from mmfast.ops.group_norm import ACTIVATIONS, group_norm


class GroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm`` (same parameters, same state_dict) computed in one pass in
    either memory format, followed by ``activation`` (None or "silu") in the same pass."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 activation: str | None = None, device=None, dtype=None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        self.activation = activation

    @classmethod
    def like(cls, norm: nn.GroupNorm, activation: str | None = None) -> "GroupNorm":
        """One with ``norm``'s configuration (weights not copied)."""
        return cls(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine, activation=activation)

    def forward(self, x: Tensor) -> Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")


def fuse_norm_out_silu(model: nn.Module) -> list[str]:
    """``conv_norm_out`` (a GroupNorm) + ``conv_act`` (SiLU) of ``model`` and its submodules
    (a diffusers UNet, or a VAE's Encoder / Decoder) -> one GroupNorm+SiLU pass; the SiLU
    module becomes an Identity (it has no parameters). Returns the names fused."""
    fused = []
    for name, owner in model.named_modules():
        norm, act = getattr(owner, "conv_norm_out", None), getattr(owner, "conv_act", None)
        if type(norm) is not nn.GroupNorm or not norm.affine or not isinstance(act, nn.SiLU):
            continue
        new = GroupNorm.like(norm, activation="silu")
        new.load_state_dict(norm.state_dict())
        new.to(device=norm.weight.device, dtype=norm.weight.dtype)
        owner.conv_norm_out, owner.conv_act = new, nn.Identity()
        fused.append(f"{name}.conv_norm_out" if name else "conv_norm_out")
    return fused
