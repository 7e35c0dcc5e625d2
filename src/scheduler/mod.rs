//! Noise schedulers (DDIM, Euler discrete, DPM-Solver++ 2M, PNDM) behind one trait,
//! configured from a checkpoint's `scheduler_config.json` as diffusers does.
