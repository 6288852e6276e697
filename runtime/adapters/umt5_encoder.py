"""Adapter for ``UMT5EncoderModel`` (the text encoder of Wan 2.1 / 2.2: UMT5-XXL, 10.6 GiB in bf16).

The prompt is short (512 tokens), so nothing here is sliced: the point of the unit program is that
every layer is its own block, whose weights the planner may stream (prefetched one layer ahead)
instead of holding the whole encoder on the GPU. The 2 GiB token-embedding table is a gathered table
(``Op.gathers``, :mod:`..gather`): streamed, it stays in host memory and only the rows of the call's
ids are copied to the device. Units: ``encoder.embed_tokens`` (the lookup),
``encoder.block.N`` (self-attention with its own relative position bias + feed-forward, as
``UMT5Stack`` calls them), ``encoder.final_layer_norm``. The attention mask is the stock
prologue's own (``create_bidirectional_mask``).
"""

from __future__ import annotations

import torch

from ...planner.errors import UnsupportedArgumentError
from ..gather import gather_rows
from ..program import Op, SliceCtx, UnitSpec
from .base import CallBinding, register


class UMT5EncoderAdapter:
    name = "umt5-encoder"
    model_classes = ("UMT5EncoderModel",)
    method = "forward"
    component = "text_encoder"

    def ops(self, model) -> tuple[list[Op], str]:
        stack = model.encoder
        ops: list[Op] = []

        def add(name: str, inputs: tuple[str, ...], fn, gathers: str | None = None) -> str:
            ops.append(Op(UnitSpec(name, None, kind="text"), inputs, name, fn, "nlc", gathers=gathers))
            return name

        table = stack.embed_tokens  # the model's ``shared`` embedding, tied

        def embed(ctx: SliceCtx, ids):  # the stock lookup; the prompt's rows only when the table stays on host
            return stack.dropout(gather_rows(table.weight, ids))

        h = add("encoder.embed_tokens", ("input_ids",), embed, gathers="input_ids")
        for i, block in enumerate(stack.block):

            def layer(ctx: SliceCtx, x, block=block):
                return block(x, ctx.globals["mask"], None, encoder_attention_mask=None, cache=None)

            h = add(f"encoder.block.{i}", (h,), layer)
        return ops, add("encoder.final_layer_norm", (h,), lambda ctx, x: stack.dropout(stack.final_layer_norm(x)))

    def rehash_cuts(self, model) -> list[str]:
        return []

    def example_inputs(self, model, shape, device="cpu", seed: int = 0) -> tuple:
        """Token ids ``[batch, latent_width]`` (a text encoder's plan shape: one "frame" of tokens) and a
        mask of ones (none on meta)."""
        b, n = shape.batch, shape.latent_width
        gen = torch.Generator().manual_seed(seed)
        if torch.device(device).type == "meta":  # no mask: building one reads its values (.item())
            return torch.empty(b, n, dtype=torch.long, device=device), None
        ids = torch.randint(0, model.config.vocab_size, (b, n), generator=gen).to(device)
        return ids, torch.ones(b, n, dtype=torch.long, device=device)

    def bind(self, model, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs) -> CallBinding:
        from transformers.masking_utils import create_bidirectional_mask
        from transformers.modeling_outputs import BaseModelOutput

        if inputs_embeds is not None or input_ids is None:
            raise UnsupportedArgumentError(
                "vramplan's planned UMT5EncoderModel forward takes input_ids (not inputs_embeds); remove the plan "
                "(handle.remove()) to pass embeddings."
            )
        if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
            raise UnsupportedArgumentError(
                "vramplan's planned UMT5EncoderModel forward returns the last hidden state only; remove the plan to "
                "collect hidden states or attentions."
            )
        stack = model.encoder
        probe = torch.empty(*input_ids.shape, stack.config.d_model, dtype=model.dtype, device=input_ids.device)
        mask = create_bidirectional_mask(config=stack.config, inputs_embeds=probe, attention_mask=attention_mask)
        del probe
        b, n = input_ids.shape

        def finish(out: torch.Tensor):
            return BaseModelOutput(last_hidden_state=out)

        return CallBinding(
            env={"input_ids": input_ids}, layouts={"input_ids": "nlc"}, globals={"mask": mask}, finish=finish,
            shape={"batch": b, "frames": 1, "latent_height": 1, "latent_width": n, "dtype": model.dtype},
        )


register(UMT5EncoderAdapter())
