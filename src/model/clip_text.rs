//! The CLIP text encoder (SD2: gelu, 23 layers at full size; last_hidden_state after the final layer norm).
