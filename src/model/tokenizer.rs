//! The CLIP BPE tokenizer as SD2 uses it (transformers' CLIPTokenizer behaviour).
