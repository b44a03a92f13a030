"""Communication: codecs for what nodes send (with exact byte counts) and the exchanges that move it."""

from declora.comm.codecs import CODECS, CastCodec, Codec, Encoded, QuantizeCodec, TopKCodec, build_codec

__all__ = ["CODECS", "CastCodec", "Codec", "Encoded", "QuantizeCodec", "TopKCodec", "build_codec"]
