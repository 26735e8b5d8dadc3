"""Encoders and decoders. Each family has a base class whose docstring is its contract."""

from __future__ import annotations

from dpvae.nn.decoders import Decoder, MLPDecoder
from dpvae.nn.encoders import Encoder, MLPEncoder

__all__ = ["Decoder", "Encoder", "MLPDecoder", "MLPEncoder"]
