"""Adapter for the CLIP vision encoder (transformers' ``CLIPVisionModel``: Wan 2.1 I2V's image encoder,
ViT-H/14, 1.2 GiB in bf16; ``CLIPVisionModelWithProjection``: SVD's).

An image is 257 tokens, so nothing here is sliced: as for the text encoder, the point of the unit
program is that every transformer layer is a block of its own whose weights the planner may stream
(prefetched one layer ahead). Units: ``embeddings`` (patch + class + position embeddings and the
pre-layernorm), ``encoder.layers.N`` (``CLIPEncoderLayer``, as ``CLIPEncoder`` calls them), ``outputs``
(every hidden state stacked into one value: returned when ``output_hidden_states`` is asked for, as Wan's
pipeline does to read the penultimate one). The pooled output (post-layernorm of the class token, and the
visual projection for ``...WithProjection``) is the stock epilogue's, from the last hidden state.
``CLIPVisionModelWithProjection`` prefixes the module names with ``vision_model.``; ``outputs`` is not a
module and keeps its name (a block of its own, after the layers).
"""

from __future__ import annotations

import torch

from ...planner.errors import UnsupportedArgumentError
from ..program import Op, SliceCtx, UnitSpec
from .base import CallBinding, example_maker, register


def _parts(model):
    """(vision model, its unit-name prefix, the projection or None)."""
    if hasattr(model, "vision_model"):  # CLIPVisionModelWithProjection
        return model.vision_model, "vision_model.", model.visual_projection
    return model, "", None


class CLIPVisionAdapter:
    name = "clip-vision"
    model_classes = ("CLIPVisionModel", "CLIPVisionModelWithProjection")
    method = "forward"
    component = "image_encoder"

    def ops(self, model) -> tuple[list[Op], str]:
        vision, prefix, projection = _parts(model)
        ops: list[Op] = []

        def add(name: str, inputs: tuple[str, ...], fn) -> str:
            ops.append(Op(UnitSpec(name, None, kind="image"), inputs, name, fn, "nlc"))
            return name

        def embed(ctx: SliceCtx, pixels):
            h = vision.embeddings(pixels, interpolate_pos_encoding=ctx.globals["interpolate"])
            return vision.pre_layrnorm(h)

        h = add(prefix + "embeddings", ("pixel_values",), embed)
        states = [h]
        for i, layer in enumerate(vision.encoder.layers):

            def run(ctx: SliceCtx, x, layer=layer):
                return layer(x, None)

            h = add(f"{prefix}encoder.layers.{i}", (h,), run)
            states.append(h)

        def pack(ctx: SliceCtx, *hidden):  # one value: the finish splits it again
            return torch.stack(hidden, dim=1)

        return ops, add("outputs", tuple(states), pack)

    def rehash_cuts(self, model) -> list[str]:
        return []

    def example_inputs(self, model, shape, device="cpu", seed: int = 0) -> tuple:
        """Pixel values ``[batch, channels, latent_height, latent_width]`` (an image encoder's plan shape:
        one frame of the image size; positions interpolated for another size). The program holds every hidden state whether asked or not (as Wan's
        pipeline calls it: ``output_hidden_states=True``), so one profile serves both calls."""
        make = example_maker(model, device, seed)
        other = (shape.latent_height, shape.latent_width) != (model.config.image_size,) * 2
        pixels = make(shape.batch, model.config.num_channels, shape.latent_height, shape.latent_width)
        return pixels, other  # interpolate_pos_encoding for another image size

    def bind(self, model, pixel_values=None, interpolate_pos_encoding=False, output_hidden_states=None,
             return_dict=True, **kwargs) -> CallBinding:
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.clip.modeling_clip import CLIPVisionModelOutput

        if pixel_values is None:
            raise UnsupportedArgumentError("vramplan's planned CLIP vision forward takes pixel_values")
        if kwargs.get("output_attentions"):
            raise UnsupportedArgumentError(
                "vramplan's planned CLIP vision forward does not return attention maps; remove the plan "
                "(handle.remove()) to collect them."
            )
        if return_dict is False:
            raise UnsupportedArgumentError("vramplan's planned CLIP vision forward returns a ModelOutput "
                                           "(return_dict=True); remove the plan for tuples.")
        vision, _, projection = _parts(model)
        hidden = bool(output_hidden_states if output_hidden_states is not None
                      else model.config.output_hidden_states)
        b = pixel_values.shape[0]

        def finish(out: torch.Tensor):
            chunks = out.unbind(1)
            last = chunks[-1]
            # the stock epilogue: the class token's post-layernorm (and projection), outside the program so
            # that its weights get gradients only when the pooled output is used, as in the stock forward
            pooled = vision.post_layernorm(last[:, 0, :])
            if projection is not None:
                pooled = projection(pooled)
            all_states = chunks if hidden else None
            if projection is not None:
                return CLIPVisionModelOutput(image_embeds=pooled, last_hidden_state=last, hidden_states=all_states)
            return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=all_states)

        return CallBinding(
            env={"pixel_values": pixel_values}, layouts={"pixel_values": "nchw"},
            globals={"interpolate": bool(interpolate_pos_encoding)}, finish=finish,
            shape={"batch": b, "frames": 1, "latent_height": pixel_values.shape[-2],
                   "latent_width": pixel_values.shape[-1], "dtype": model.dtype},
        )


register(CLIPVisionAdapter())
