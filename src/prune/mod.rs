//! Pruning: which layers are prunable, magnitude / random scores, layer or global scope,
//! unstructured or 2:4 patterns. Produces the masks and compressed weights `format/` stores.
