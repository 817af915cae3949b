"""Model definitions: the SentenceVAE (encoder + decoder), its layers, and decoding."""
from training.models.generate import SamplingConfig, decode_full_recompute, decode_sentences, pick_next
from training.models.sentence_vae import SentenceDecoder, SentenceEncoder, SentenceVAE

__all__ = ["SamplingConfig", "SentenceDecoder", "SentenceEncoder", "SentenceVAE",
           "decode_full_recompute", "decode_sentences", "pick_next"]
