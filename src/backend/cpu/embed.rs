//! The sinusoidal timestep embedding of diffusers' `get_timestep_embedding`, computed in
//! f32 in the same order of operations as the PyTorch code so that values agree to rounding.

/// `[timesteps.len(), dim]`: for `half = dim / 2`, frequencies
/// `exp(−ln(10000) · i / (half − freq_shift))`, arguments `t · freq`, rows `[sin, cos]`
/// (or `[cos, sin]` with `flip_sin_to_cos`), zero-padded by one column when `dim` is odd.
pub fn timestep_embedding(timesteps: &[f32], dim: usize, flip_sin_to_cos: bool, freq_shift: f32) -> Vec<f32> {
    let half = dim / 2;
    let log_max_period = -(10000.0f64.ln() as f32);
    let freqs: Vec<f32> =
        (0..half).map(|i| (log_max_period * i as f32 / (half as f32 - freq_shift)).exp()).collect();
    let mut out = vec![0.0f32; timesteps.len() * dim];
    for (row, &t) in out.chunks_exact_mut(dim.max(1)).zip(timesteps) {
        let (first, rest) = row.split_at_mut(half);
        let second = &mut rest[..half];
        for ((a, b), &f) in first.iter_mut().zip(second.iter_mut()).zip(&freqs) {
            let arg = t * f;
            let (s, c) = (arg.sin(), arg.cos());
            if flip_sin_to_cos {
                (*a, *b) = (c, s);
            } else {
                (*a, *b) = (s, c);
            }
        }
    }
    out
}
