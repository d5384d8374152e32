"""What a forward's keyword arguments tell the RSL: the padding masks its routers read (`TokenMasks`, built by
`token_masks`), and the weight of its RSL next to the task loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

# Cross-attention projections that read the encoder's tokens (their router sees the encoder's padding mask).
CROSS_ATTENTION_BLOCKS = ("EncDecAttention", "encoder_attn", "crossattention")
CROSS_ATTENTION_ENCODER_INPUTS = ("k", "v", "k_proj", "v_proj", "key", "value")


@dataclass
class TokenMasks:
    """The padding masks of one forward (batch x length, True = counts), and which one each router reads.

    Decoder-only and SSM models have one (`decoder`); encoder-decoders also have the encoder's, read by the
    encoder's routers and by the cross-attention projections fed the encoder's output.
    """

    decoder: Optional[torch.Tensor] = None
    encoder: Optional[torch.Tensor] = None

    def for_router(self, module_name: str, token_shape: torch.Size) -> Optional[torch.Tensor]:
        """The mask for the router of `module_name`, if its tokens (of `token_shape`) are the ones it describes."""
        mask = self.encoder if self.encoder is not None and _reads_encoder_tokens(module_name) else self.decoder
        if mask is not None and tuple(mask.shape) == tuple(token_shape):
            return mask
        return None


def _reads_encoder_tokens(module_name: str) -> bool:
    parts = module_name.split(".")
    if "encoder" in parts:
        return True
    return any(block in parts for block in CROSS_ATTENTION_BLOCKS) and parts[-1] in CROSS_ATTENTION_ENCODER_INPUTS


def token_masks(kwargs: dict[str, Any], is_encoder_decoder: bool) -> TokenMasks:
    """The padding masks: the 2-D `attention_mask`; for encoder-decoders it is the encoder's, and the decoder's is
    `decoder_attention_mask`, else the labelled positions (labels != -100), else every token."""
    attention_mask = kwargs.get("attention_mask")
    mask = attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None
    if not is_encoder_decoder:
        return TokenMasks(decoder=mask)
    decoder_mask, labels = kwargs.get("decoder_attention_mask"), kwargs.get("labels")
    if decoder_mask is None and labels is not None and kwargs.get("decoder_input_ids") is None:
        decoder_mask = labels.ne(-100)  # the decoder's inputs are the labels shifted right: one per label
    if decoder_mask is not None and decoder_mask.dim() == 2:
        decoder_mask = decoder_mask.bool()
    else:
        decoder_mask = None
    return TokenMasks(decoder=decoder_mask, encoder=mask)


def loss_scale(
    kwargs: dict[str, Any], is_encoder_decoder: bool, accumulation_steps: int = 1
) -> Union[float, torch.Tensor]:
    """The weight of this forward's RSL, chosen so that an optimizer step sees the RSL as the Trainer sees its loss.

    With `num_items_in_batch` and `labels` (the Trainer passes the label tokens of all micro-batches of the step,
    and of all processes with its default `average_tokens_across_devices`): this micro-batch's share of them, times
    the number of processes when they are counted (data parallelism averages the gradients, and the Trainer
    multiplies its loss back). The step then sees the token-weighted mean RSL. Otherwise `1 / accumulation_steps`
    (set by `RoutingCallback` from the Trainer's arguments; 1 in a hand loop): the mean over micro-batches, as TRL
    weights MoE auxiliary losses. A tensor on the labels' device when counted (no synchronisation).
    """
    labels, num_items = kwargs.get("labels"), kwargs.get("num_items_in_batch")
    if num_items is None or labels is None:
        return 1.0 / accumulation_steps
    counted = labels if is_encoder_decoder else labels[..., 1:]
    share = counted.ne(-100).sum() / torch.as_tensor(num_items, device=labels.device)
    if dist.is_available() and dist.is_initialized():
        share = share * dist.get_world_size()
    return share
