"""Tokenizers: the interface every tokenizer meets, the MaskGIT-VQGAN, the trainable VQ tokenizer,
TiTok and its converter. A new tokenizer goes here."""
